"""Benchmark: ``NativeCallable.listener`` calls from C threads, end to end.

Standalone (``python benchmarks/bench_listener.py``; needs ``cc`` and the
package importable). In one run, for each event loop backend, it measures
calls per second from 1 and 4 C threads (pthreads Python never saw, each
calling a ``void f(int32_t thread, int64_t seq)`` pointer in a tight loop),
the clock running from the threads' start until the last Python callback has
run on the loop:

* ``listener native``: the libffi closure (no GIL in the calling thread; the
  isolate drains bursts from the native queue);
* ``listener ctypes``: the ctypes trampoline (``_callable.listener_impl =
  "ctypes"``), the reference implementation;
* ``call_soon_threadsafe``: a hand-written ``CFUNCTYPE`` callback doing
  ``loop.call_soon_threadsafe(callback, t, i)``;
* ``ctypes floor``: a ``CFUNCTYPE`` callback that does nothing, timed in C
  until the threads have finished (no event loop involved): the cost of
  entering Python from a foreign thread at all.

Every figure is the median of ``--runs`` runs. The callback is the same
closure everywhere (count, and finish a future at the last call). The last
column is the CPU time the loop's thread spent per call (``time.thread_time``):
on a busy machine, where the wall-clock rate depends on how much of a core
the loop gets, 1e9 / that is the rate the loop would sustain on a core of its
own.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dartloop  # noqa: E402
from dartloop.ffi import NativeCallable, _callable  # noqa: E402
from dartloop.ffi import _queue  # noqa: E402

BENCH_C = r"""
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

typedef void (*seq_fn)(int32_t, int64_t);
typedef struct { seq_fn fn; int32_t t; int64_t n; atomic_int *done; } arg_t;
typedef struct { int n; atomic_int done; pthread_t *th; arg_t *args; struct timespec t0, t1; } group_t;

static void *run(void *p)
{
    arg_t *a = p;
    seq_fn fn = a->fn;
    for (int64_t i = 0; i < a->n; i++) fn(a->t, i);
    atomic_fetch_add(a->done, 1);
    return NULL;
}

void *bench_start(seq_fn fn, int n, int64_t per_thread)
{
    group_t *g = calloc(1, sizeof *g);
    g->n = n;
    atomic_init(&g->done, 0);
    g->th = calloc((size_t)n, sizeof(pthread_t));
    g->args = calloc((size_t)n, sizeof(arg_t));
    clock_gettime(CLOCK_MONOTONIC, &g->t0);
    for (int t = 0; t < n; t++) {
        g->args[t] = (arg_t){fn, t, per_thread, &g->done};
        pthread_create(&g->th[t], NULL, run, &g->args[t]);
    }
    return g;
}

int bench_done(void *p) { group_t *g = p; return atomic_load(&g->done) == g->n; }

/* Joins and frees; returns seconds from start until every thread has exited. */
double bench_join(void *p)
{
    group_t *g = p;
    for (int t = 0; t < g->n; t++) pthread_join(g->th[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &g->t1);
    double s = (double)(g->t1.tv_sec - g->t0.tv_sec) + (double)(g->t1.tv_nsec - g->t0.tv_nsec) / 1e9;
    free(g->th); free(g->args); free(g);
    return s;
}
"""

SEQ_FN = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int64)


def build(tmp: Path) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        sys.exit("needs a C compiler (cc)")
    src, lib = tmp / "bench_listener.c", tmp / "libbench_listener.so"
    src.write_text(BENCH_C)
    subprocess.run([cc, "-O2", "-std=c11", "-shared", "-fPIC", "-pthread", str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.bench_start.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    dll.bench_start.restype = ctypes.c_void_p
    dll.bench_done.argtypes = [ctypes.c_void_p]
    dll.bench_done.restype = ctypes.c_int
    dll.bench_join.argtypes = [ctypes.c_void_p]
    dll.bench_join.restype = ctypes.c_double
    return dll


def make_callback(total: int) -> tuple[Callable[[int, int], None], asyncio.Future[None]]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    count = 0

    def callback(t: int, i: int) -> None:
        nonlocal count
        count += 1
        if count == total:
            done.set_result(None)

    return callback, done


async def end_to_end(
    lib: ctypes.CDLL, address: int, threads: int, total: int, done: asyncio.Future[None]
) -> tuple[float, float]:
    """(calls/s, loop CPU ns/call) from ``threads`` C threads until the last callback has run."""
    t0, c0 = time.perf_counter(), time.thread_time()
    group = lib.bench_start(address, threads, total // threads)
    await done
    elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
    while not lib.bench_done(group):
        await asyncio.sleep(0.001)
    lib.bench_join(group)
    return total / elapsed, cpu * 1e9 / total


async def listener(lib: ctypes.CDLL, impl: str, threads: int, total: int) -> tuple[float, float]:
    _callable.listener_impl = impl
    try:
        callback, done = make_callback(total)
        nc = NativeCallable.listener(SEQ_FN, callback)
        assert nc._impl == impl, nc._impl
        rate = await end_to_end(lib, nc.address, threads, total, done)
        nc.close()
        return rate
    finally:
        _callable.listener_impl = "auto"


async def call_soon_threadsafe(lib: ctypes.CDLL, threads: int, total: int) -> tuple[float, float]:
    callback, done = make_callback(total)
    call_soon_threadsafe = asyncio.get_running_loop().call_soon_threadsafe

    def thunk(t: int, i: int) -> None:
        call_soon_threadsafe(callback, t, i)

    pointer = SEQ_FN(thunk)
    address = ctypes.cast(pointer, ctypes.c_void_p).value or 0
    rate = await end_to_end(lib, address, threads, total, done)
    del pointer  # every thread has exited
    return rate


def ctypes_floor(lib: ctypes.CDLL, threads: int, total: int) -> float:
    pointer = SEQ_FN(lambda t, i: None)
    address = ctypes.cast(pointer, ctypes.c_void_p).value or 0
    group = lib.bench_start(address, threads, total // threads)
    return total / lib.bench_join(group)  # the GIL is free while ctypes waits in C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1_000_000, help="calls per measurement, native listener")
    parser.add_argument("--slow-calls", type=int, default=40_000, help="calls per measurement, GIL-taking paths")
    parser.add_argument("--backend", action="append", choices=["asyncio", "uvloop"])
    args = parser.parse_args()
    backends = args.backend or ["asyncio", "uvloop"]
    native = _callable._make_listener_closure is not None

    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        print(f"Python {sys.version.split()[0]}, native queue: {_queue.IMPLEMENTATION}, "
              f"native listener: {'yes' if native else 'no (libffi missing)'}; median of {args.runs} runs")
        print(f"{'backend':8} {'path':24} {'threads':>7} {'calls/s':>12} {'loop CPU/call':>14}")
        for threads in (1, 4):
            rates = [ctypes_floor(lib, threads, args.slow_calls) for _ in range(args.runs)]
            print(f"{'-':8} {'ctypes floor (no loop)':24} {threads:>7} {statistics.median(rates):>12,.0f}")
        for backend in backends:
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}

            async def measure() -> None:
                for _ in range(args.runs):
                    for threads in (1, 4):
                        cases: list[tuple[str, Any]] = []
                        if native:
                            cases.append(("listener native", listener(lib, "native", threads, args.calls)))
                        cases.append(("listener ctypes", listener(lib, "ctypes", threads, args.slow_calls)))
                        cases.append(("call_soon_threadsafe", call_soon_threadsafe(lib, threads, args.slow_calls)))
                        for name, coro in cases:
                            results.setdefault((name, threads), []).append(await coro)

            dartloop.run(measure(), backend=backend)
            for (name, threads), runs in results.items():
                rate = statistics.median(r for r, _ in runs)
                cpu = statistics.median(c for _, c in runs)
                print(f"{backend:8} {name:24} {threads:>7} {rate:>12,.0f} {cpu:>11,.0f} ns")


if __name__ == "__main__":
    main()
