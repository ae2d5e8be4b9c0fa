"""Native interop benchmarks: C threads calling into isolates, end to end.

One command, everything in one run: ``python benchmarks/run_native_benchmarks.py``
(``--quick`` for a short run; ``--backend`` to pick one loop; needs ``cc`` or
``$CC``). It compiles its C part into a temporary directory, then, on each
event loop backend, runs every case ``--runs`` times and prints the medians:

* ``listener``: ``NativeCallable.listener`` called in a tight loop from 1 and
  from 4 pthreads that Python never saw; the clock runs from the threads'
  start until the last Python callback has run on the isolate (end to end);
* ``ctypes + call_soon_threadsafe``: what one would write by hand, a
  ``CFUNCTYPE`` callback doing ``loop.call_soon_threadsafe(callback, t, i)``,
  timed the same way;
* ``ctypes do-nothing (floor)``: a ``CFUNCTYPE`` callback that does nothing,
  timed in C until the threads have finished; the cost of entering Python
  from a foreign thread at all, with no loop involved;
* ``blocking round trip``: one C thread makes sequential
  ``NativeCallable.blocking`` calls (C thread -> owner isolate -> result back
  to the waiting thread); the latency of one call, timed in C;
* ``posts``: ``DartloopApi.post_int64`` in a tight loop from 1 (and 4) C
  threads to a ``RawReceivePort``; the clock stops when the port's handler
  has run for the last message (end to end). The C side's rate (until the
  posting threads finished, while the isolate drains) is shown too. The port's
  handler is a plain counting function; one more row uses the ``Finish``
  object of the other cases (a class ``__call__``), and one times the function
  handler alone in a bare loop.

The listener and call_soon_threadsafe cases count with a ``Finish`` object. Ratios and the
targets (listener >= 1 M calls/s from one C thread, or within 1.2x of the
do-nothing floor; >= 3 M posts/s) are printed at the end of each backend's
table.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dartloop
from dartloop.ffi import NativeCallable, include_dir, native_api
from dartloop.ffi import _queue

BENCH_C = r"""
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include "dartloop_api.h"

typedef void (*seq_fn)(int64_t, int64_t);
typedef intptr_t (*ii_fn)(intptr_t);

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct {
    seq_fn fn;
    const DartloopApi *api;
    int64_t port;
    int64_t t;
    int64_t count;
    int64_t failed;
    double t_end;
} arg_t;

typedef struct {
    int n;
    pthread_t *th;
    arg_t *args;
    double t0;
} group_t;

static void *call_main(void *p)
{
    arg_t *a = (arg_t *)p;
    seq_fn fn = a->fn;
    for (int64_t i = 0; i < a->count; i++) fn(a->t, i);
    a->t_end = now();
    return NULL;
}

static void *post_main(void *p)
{
    arg_t *a = (arg_t *)p;
    bool (*post)(int64_t, int64_t) = a->api->post_int64;
    for (int64_t i = 0; i < a->count; i++) {
        if (!post(a->port, i)) a->failed++;
    }
    a->t_end = now();
    return NULL;
}

static group_t *start(int n, void *(*main)(void *), seq_fn fn, const DartloopApi *api, int64_t port, int64_t count)
{
    group_t *g = calloc(1, sizeof *g);
    g->n = n;
    g->th = calloc((size_t)n, sizeof(pthread_t));
    g->args = calloc((size_t)n, sizeof(arg_t));
    for (int t = 0; t < n; t++) g->args[t] = (arg_t){fn, api, port, t, count, 0, 0.0};
    g->t0 = now();
    for (int t = 0; t < n; t++) {
        if (pthread_create(&g->th[t], NULL, main, &g->args[t]) != 0) abort();
    }
    return g;
}

void *calls_start(seq_fn fn, int n, int64_t count) { return start(n, call_main, fn, NULL, 0, count); }
void *posts_start(const DartloopApi *api, int64_t port, int n, int64_t count) { return start(n, post_main, NULL, api, port, count); }

/* Joins; seconds from the start until the last thread had finished its
 * calls (-1 if a post failed). */
double group_join(void *p)
{
    group_t *g = (group_t *)p;
    int64_t failed = 0;
    double t_end = g->t0;
    for (int t = 0; t < g->n; t++) {
        pthread_join(g->th[t], NULL);
        failed += g->args[t].failed;
        if (g->args[t].t_end > t_end) t_end = g->args[t].t_end;
    }
    double dt = t_end - g->t0;
    free(g->th);
    free(g->args);
    free(g);
    return failed ? -1.0 : dt;
}

/* One thread makes count sequential calls of a blocking pointer; when done it
 * posts the mean seconds per call (as nanoseconds) to port. */
typedef struct {
    ii_fn fn;
    int64_t count;
    const DartloopApi *api;
    int64_t port;
    pthread_t th;
} rt_t;

static void *rt_main(void *p)
{
    rt_t *r = (rt_t *)p;
    int64_t bad = 0;
    double t0 = now();
    for (int64_t i = 0; i < r->count; i++) {
        if (r->fn((intptr_t)i) != (intptr_t)i + 1) bad++;
    }
    double dt = now() - t0;
    r->api->post_int64(r->port, bad ? -1 : (int64_t)(dt / (double)r->count * 1e9));
    return NULL;
}

void *round_trips_start(ii_fn fn, int64_t count, const DartloopApi *api, int64_t port)
{
    rt_t *r = calloc(1, sizeof *r);
    *r = (rt_t){fn, count, api, port};
    if (pthread_create(&r->th, NULL, rt_main, r) != 0) abort();
    return r;
}

void round_trips_join(void *p)
{
    rt_t *r = (rt_t *)p;
    pthread_join(r->th, NULL);
    free(r);
}
"""

SEQ_FN = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64)
II_FN = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_ssize_t)


def build(directory: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        sys.exit(f"the native benchmarks need a C compiler ({cc!r} not found; set $CC)")
    src = directory / "native_bench.c"
    out = directory / "libnative_bench.so"
    src.write_text(BENCH_C)
    subprocess.run(
        [cc, "-O2", "-std=c11", "-shared", "-fPIC", "-pthread", f"-I{include_dir()}", str(src), "-o", str(out)],
        check=True,
    )
    lib = ctypes.CDLL(str(out))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, argtypes, restype in (
        ("calls_start", [vp, ctypes.c_int, i64], vp),
        ("posts_start", [vp, i64, ctypes.c_int, i64], vp),
        ("group_join", [vp], ctypes.c_double),
        ("round_trips_start", [vp, i64, vp, i64], vp),
        ("round_trips_join", [vp], None),
    ):
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


class Finish:
    """A counting callback that finishes a future at the n-th call."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __call__(self, *args: Any) -> None:
        self.count += 1
        if self.count == self.total:
            self.future.set_result(None)


# -- the cases (each returns a rate per second, or seconds per call) ---------


async def listener_rate(lib: ctypes.CDLL, threads: int, per_thread: int) -> float:
    finish = Finish(threads * per_thread)
    listener = NativeCallable.listener(SEQ_FN, finish)
    t0 = time.perf_counter()
    group = lib.calls_start(listener.address, threads, per_thread)
    await finish.future
    dt = time.perf_counter() - t0
    lib.group_join(group)
    listener.close()
    return threads * per_thread / dt


async def call_soon_threadsafe_rate(lib: ctypes.CDLL, threads: int, per_thread: int) -> float:
    loop = asyncio.get_running_loop()
    finish = Finish(threads * per_thread)
    call_soon_threadsafe = loop.call_soon_threadsafe

    def trampoline(t: int, i: int) -> None:
        call_soon_threadsafe(finish, t, i)

    pointer = SEQ_FN(trampoline)
    t0 = time.perf_counter()
    group = lib.calls_start(ctypes.cast(pointer, ctypes.c_void_p), threads, per_thread)
    await finish.future
    dt = time.perf_counter() - t0
    lib.group_join(group)
    return threads * per_thread / dt


_NOOP = SEQ_FN(lambda t, i: None)


async def floor_rate(lib: ctypes.CDLL, threads: int, per_thread: int) -> float:
    # Timed in C; this thread waits inside group_join without the GIL.
    dt = lib.group_join(lib.calls_start(ctypes.cast(_NOOP, ctypes.c_void_p), threads, per_thread))
    return threads * per_thread / dt


async def blocking_latency(lib: ctypes.CDLL, count: int) -> float:
    blocking = NativeCallable.blocking(II_FN, lambda a: a + 1, exceptional_return=-1)
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    port = dartloop.RawReceivePort(done.set_result)
    call = lib.round_trips_start(blocking.address, count, ctypes.addressof(native_api()), port.send_port.native_port)
    ns = await done
    lib.round_trips_join(call)
    port.close()
    blocking.close()
    if ns < 0:
        raise RuntimeError("a blocking call returned a wrong result")
    return ns * 1e-9


def counting_function(total: int, future: asyncio.Future[None]) -> Callable[[Any], None]:
    """A plain function that finishes ``future`` at its ``total``-th call: the
    cheapest Python handler, so that a post's figure is mostly dartloop's cost."""
    count = 0

    def handler(_message: Any) -> None:
        nonlocal count
        count += 1
        if count == total:
            future.set_result(None)

    return handler


async def posts_rate(lib: ctypes.CDLL, threads: int, per_thread: int, *, handler: str = "function") -> tuple[float, float]:
    """(end to end, C side): posts per second until the handler ran for the
    last one, and until the posting threads had finished (timed in C).
    ``handler``: ``"function"`` (a closure counting calls) or ``"object"``
    (a ``Finish`` instance, called through its class's ``__call__``)."""
    total = threads * per_thread
    if handler == "function":
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        port = dartloop.RawReceivePort(counting_function(total, future))
    else:
        finish = Finish(total)
        future = finish.future
        port = dartloop.RawReceivePort(finish)
    number = port.send_port.native_port
    t0 = time.perf_counter()
    group = lib.posts_start(ctypes.addressof(native_api()), number, threads, per_thread)
    await future
    dt = time.perf_counter() - t0
    c_side = lib.group_join(group)
    if c_side < 0:
        raise RuntimeError("a post failed")
    port.close()
    return total / dt, total / c_side


def handler_only_rate(total: int) -> float:
    """Calls per second of the function handler alone, in a bare loop (the
    part of a post's end-to-end cost that is the handler's, not dartloop's)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    handler = counting_function(total, future)
    t0 = time.perf_counter()
    for i in range(total):
        handler(i)
    dt = time.perf_counter() - t0
    assert future.done()
    return total / dt


# -- running and printing -----------------------------------------------------


def fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:7.2f} M/s" if rate >= 1e6 else f"{rate / 1e3:7.1f} k/s"


async def measure(runs: int, case: Callable[[], Awaitable[Any]]) -> Any:
    """The median of ``runs`` results (element-wise for tuples), after a warm-up run."""
    await case()
    results = [await case() for _ in range(runs)]
    if isinstance(results[0], tuple):
        return tuple(statistics.median(column) for column in zip(*results))
    return statistics.median(results)


async def bench_backend(lib: ctypes.CDLL, args: argparse.Namespace) -> dict[str, float]:
    n = args.calls
    r: dict[str, float] = {}
    for threads in (1, 4):
        per = n // threads
        r[f"listener/{threads}"] = await measure(args.runs, lambda: listener_rate(lib, threads, per))
        r[f"csts/{threads}"] = await measure(args.runs, lambda: call_soon_threadsafe_rate(lib, threads, args.slow_calls // threads))
        r[f"floor/{threads}"] = await measure(args.runs, lambda: floor_rate(lib, threads, args.slow_calls // threads))
    r["blocking"] = await measure(args.runs, lambda: blocking_latency(lib, args.round_trips))
    for threads in (1, 4):
        r[f"posts/{threads}"], r[f"posts-c/{threads}"] = await measure(
            args.runs, lambda: posts_rate(lib, threads, args.posts // threads)
        )
    r["posts-object/1"], _ = await measure(args.runs, lambda: posts_rate(lib, 1, args.posts, handler="object"))
    r["handler-only"] = await measure(args.runs, _awaitable(lambda: handler_only_rate(args.posts)))
    return r


def _awaitable(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return fn()

    return run


def report(backend: str, r: dict[str, float], args: argparse.Namespace) -> list[str]:
    rows = [
        ("listener, 1 C thread (end to end)", fmt_rate(r["listener/1"])),
        ("listener, 4 C threads (end to end)", fmt_rate(r["listener/4"])),
        ("ctypes + call_soon_threadsafe, 1 C thread", fmt_rate(r["csts/1"])),
        ("ctypes + call_soon_threadsafe, 4 C threads", fmt_rate(r["csts/4"])),
        ("ctypes do-nothing (floor), 1 C thread", fmt_rate(r["floor/1"])),
        ("ctypes do-nothing (floor), 4 C threads", fmt_rate(r["floor/4"])),
        ("blocking round trip (C -> owner -> C)", f"{r['blocking'] * 1e6:7.1f} us"),
        ("posts, 1 C thread (end to end)", fmt_rate(r["posts/1"])),
        ("posts, 4 C threads (end to end)", fmt_rate(r["posts/4"])),
        ("posts, 1 C thread (end to end, Finish object handler)", fmt_rate(r["posts-object/1"])),
        ("the function handler alone, in a bare loop", fmt_rate(r["handler-only"])),
        ("posts, 1 C thread (C side: until it finished)", fmt_rate(r["posts-c/1"])),
        ("posts, 4 C threads (C side: until they finished)", fmt_rate(r["posts-c/4"])),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"\n[{backend}]  median of {args.runs} runs"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append("  ratios:")
    for threads in (1, 4):
        lines.append(
            f"    listener / floor, {threads} thread(s):                 {r[f'listener/{threads}'] / r[f'floor/{threads}']:6.2f}x"
        )
        lines.append(
            f"    listener / call_soon_threadsafe, {threads} thread(s):  {r[f'listener/{threads}'] / r[f'csts/{threads}']:6.2f}x"
        )
    listener_ok = r["listener/1"] >= 1e6 or r["listener/1"] * 1.2 >= r["floor/1"]
    posts_ok = r["posts/1"] >= 3e6
    lines.append("  targets:")
    lines.append(
        f"    listener >= 1 M calls/s from one C thread, or within 1.2x of the floor: "
        f"{'met' if listener_ok else 'NOT met'} ({fmt_rate(r['listener/1']).strip()}, floor {fmt_rate(r['floor/1']).strip()})"
    )
    lines.append(
        f"    >= 3 M posts/s from one C thread, end to end: {'met' if posts_ok else 'NOT met'} "
        f"({fmt_rate(r['posts/1']).strip()}; C side {fmt_rate(r['posts-c/1']).strip()})"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and runs (a few seconds per backend)")
    parser.add_argument("--runs", type=int, default=None, help="runs per case (median); default 5, quick 3")
    parser.add_argument("--backend", choices=dartloop.available_backends(), action="append",
                        help="backend(s) to run; default: every available one")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    args.runs = args.runs or (3 if args.quick else 5)
    args.calls = 1_000_000 // scale          # listener calls per case (fast path)
    args.slow_calls = 100_000 // scale       # calls per case through ctypes callbacks (GIL per call)
    args.round_trips = 10_000 // scale
    args.posts = 2_000_000 // scale
    if _queue.IMPLEMENTATION != "c":         # the pure queue takes the GIL per post
        args.calls = args.slow_calls
        args.posts = args.slow_calls
    backends = args.backend or dartloop.available_backends()

    from dartloop.ffi import _callable

    probe_impl = getattr(_callable, "listener_impl", "ctypes")
    print(
        f"dartloop native benchmarks: Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; queue: {_queue.IMPLEMENTATION}; listener_impl: {probe_impl}"
    )
    print(
        f"  listener: {args.calls:,} calls per case; ctypes cases: {args.slow_calls:,}; "
        f"blocking: {args.round_trips:,} round trips; posts: {args.posts:,}"
    )
    with tempfile.TemporaryDirectory(prefix="dartloop-bench-") as tmp:
        lib = build(Path(tmp))
        for backend in backends:
            results = dartloop.run(bench_backend(lib, args), backend=backend)
            for line in report(backend, results, args):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
