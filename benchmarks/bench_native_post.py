"""Micro-benchmark: posting from C threads into a dartloop NativeQueue.

Standalone (``python benchmarks/bench_native_post.py``; needs ``cc`` and the
package importable).  For each implementation of ``dartloop.ffi._queue`` (the C
extension if built, and the pure-Python fallback) it measures:

* end to end: T C threads (1 and 4) post N int64 each into one queue while the
  main Python thread waits on the queue's fd and drains as fast as it can; the
  clock stops when every message has been drained and converted;
* post only: the same posts with nobody draining (time taken by the C threads);
* drain only: one drain() of an already-queued batch of int64 messages
  (for the C implementation that is the conversion to Python objects; the
  pure one created them in the callbacks already, so it only copies a deque).

Every figure is the median of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INCLUDE_DIR = ROOT / "dartloop" / "include"

BENCH_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include "dartloop_api.h"

typedef struct { const DartloopApi *api; int64_t port; int64_t count; int64_t failed; } arg_t;
typedef struct { int n; pthread_t *th; arg_t *args; struct timespec t0; } group_t;

static void *run(void *p)
{
    arg_t *a = p;
    bool (*post)(int64_t, int64_t) = a->api->post_int64;
    for (int64_t i = 0; i < a->count; i++) {
        if (!post(a->port, i)) a->failed++;
    }
    return NULL;
}

void *bench_start(const DartloopApi *api, int n, int64_t port, int64_t count)
{
    group_t *g = calloc(1, sizeof *g);
    g->n = n;
    g->th = calloc((size_t)n, sizeof(pthread_t));
    g->args = calloc((size_t)n, sizeof(arg_t));
    clock_gettime(CLOCK_MONOTONIC, &g->t0);
    for (int t = 0; t < n; t++) {
        g->args[t] = (arg_t){api, port, count, 0};
        pthread_create(&g->th[t], NULL, run, &g->args[t]);
    }
    return g;
}

/* Joins; returns seconds from start to the last thread's exit, or -1 if any post failed. */
double bench_join(void *p)
{
    group_t *g = p;
    int64_t failed = 0;
    for (int t = 0; t < g->n; t++) {
        pthread_join(g->th[t], NULL);
        failed += g->args[t].failed;
    }
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double dt = (double)(t1.tv_sec - g->t0.tv_sec) + (double)(t1.tv_nsec - g->t0.tv_nsec) * 1e-9;
    free(g->th);
    free(g->args);
    free(g);
    return failed ? -1.0 : dt;
}
"""


def build_helper(tmp: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        sys.exit(f"no C compiler ({cc})")
    src = tmp / "bench.c"
    src.write_text(BENCH_C)
    out = tmp / "libbench.so"
    subprocess.run(
        [cc, "-O2", "-std=c11", "-shared", "-fPIC", "-pthread", f"-I{INCLUDE_DIR}", str(src), "-o", str(out)],
        check=True,
    )
    lib = ctypes.CDLL(str(out))
    lib.bench_start.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.bench_start.restype = ctypes.c_void_p
    lib.bench_join.argtypes = [ctypes.c_void_p]
    lib.bench_join.restype = ctypes.c_double
    return lib


_port = 1 << 45


def fresh(mod: ModuleType) -> tuple[Any, int]:
    global _port
    _port += 1
    q = mod.NativeQueue()
    mod.bind_port(_port, q)
    return q, _port


def end_to_end(lib: ctypes.CDLL, mod: ModuleType, threads: int, count: int) -> tuple[float, int]:
    """Seconds until threads*count posts are all drained, and the number of drain batches."""
    q, port = fresh(mod)
    total = threads * count
    received = 0
    batches = 0
    sel = selectors.DefaultSelector()
    sel.register(q, selectors.EVENT_READ)
    drain = q.drain
    t0 = time.perf_counter()
    group = lib.bench_start(mod.api_address(), threads, port, count)
    while received < total:
        sel.select()
        received += len(drain())
        batches += 1
    t1 = time.perf_counter()
    if lib.bench_join(group) < 0:
        raise RuntimeError("a post failed")
    sel.close()
    q.close()
    return t1 - t0, batches


def post_only(lib: ctypes.CDLL, mod: ModuleType, threads: int, count: int) -> float:
    q, port = fresh(mod)
    dt = float(lib.bench_join(lib.bench_start(mod.api_address(), threads, port, count)))
    if dt < 0:
        raise RuntimeError("a post failed")
    q.close()
    return dt


def drain_only(lib: ctypes.CDLL, mod: ModuleType, count: int) -> float:
    q, port = fresh(mod)
    if lib.bench_join(lib.bench_start(mod.api_address(), 1, port, count)) < 0:
        raise RuntimeError("a post failed")
    t0 = time.perf_counter()
    items = q.drain()
    dt = time.perf_counter() - t0
    assert len(items) == count
    del items  # freeing the batch is not part of the conversion
    q.close()
    return dt


def fmt(rate: float) -> str:
    return f"{rate / 1e6:8.2f} M/s" if rate >= 1e6 else f"{rate / 1e3:8.1f} k/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--count", type=int, default=2_000_000, help="posts per C thread (C implementation)")
    parser.add_argument("--py-count", type=int, default=50_000, help="posts per C thread (pure implementation)")
    parser.add_argument("--impl", choices=["c", "python", "both"], default="both")
    args = parser.parse_args()

    impls: list[tuple[str, ModuleType, int]] = []
    if args.impl in ("c", "both"):
        try:
            impls.append(("c", importlib.import_module("dartloop.ffi._nativequeue"), args.count))
        except ImportError as exc:
            print(f"C implementation not built ({exc}); skipped")
    if args.impl in ("python", "both"):
        impls.append(("python", importlib.import_module("dartloop.ffi._pyqueue"), args.py_count))

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, median of {args.runs} runs")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_helper(Path(tmp))
        for name, mod, count in impls:
            print(f"\n[{name}] {count:,} int64 posts per C thread")
            for threads in (1, 4):
                runs = [end_to_end(lib, mod, threads, count) for _ in range(args.runs)]
                dt = statistics.median(r[0] for r in runs)
                batches = statistics.median(r[1] for r in runs)
                print(
                    f"  end to end, {threads} C thread(s) -> 1 queue, Python draining: "
                    f"{fmt(threads * count / dt)}  ({batches:.0f} batches, median)"
                )
            for threads in (1, 4):
                dt = statistics.median(post_only(lib, mod, threads, count) for _ in range(args.runs))
                print(f"  post only,  {threads} C thread(s), nobody draining:      {fmt(threads * count / dt)}")
            for batch in (10_000, count):
                dt = statistics.median(drain_only(lib, mod, batch) for _ in range(args.runs))
                print(f"  drain only, one batch of {batch:>9,} queued int64:   {fmt(batch / dt)}")


if __name__ == "__main__":
    main()
