"""Splitting work over isolates with ``Isolate.run`` -- and what the GIL does to it.

Run it with ``python examples/isolate_parallel_work.py`` (``--backend
asyncio|uvloop``, ``--workers N``). Exits 0 after a few seconds at most.

An isolate is a dartloop loop on its own OS thread. On a regular CPython
build the threads share one global interpreter lock (GIL): only one of them
runs Python bytecode at a time. So:

1. Pure-Python CPU work (counting primes here) split over N isolates takes
   about as long as doing it in one: the API works, the answers are right, but
   there is no speed-up. (On a free-threaded build, ``python3.13t``, it does
   scale; the script says which build it runs on.)
2. Work done by C code that releases the GIL -- ``hashlib.sha256`` over large
   buffers, ``zlib.compress`` -- runs truly in parallel, and N isolates on N
   cores finish up to N times sooner.

Each job is ``await Isolate.run(function, *args)``; the jobs run concurrently
with ``asyncio.gather``. The inputs are ``bytes``, which cross to the isolate
as they are (immutable values are shared, not copied); results come back
without a copy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
import zlib

import dartloop
from dartloop import Isolate


def count_primes(lo: int, hi: int) -> int:
    """Pure Python, CPU-bound: holds the GIL the whole time."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            count += n == 2
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def digest_and_compress(data: bytes, rounds: int) -> tuple[str, int]:
    """C code that releases the GIL for big buffers: sha256 and zlib."""
    h = hashlib.sha256()
    for _ in range(rounds):
        h.update(data)  # > 2 KiB: hashed with the GIL released
    size = len(zlib.compress(data, 6))  # deflate runs with the GIL released
    return h.hexdigest()[:16], size


async def timed(label: str, coro_factory) -> tuple[float, object]:
    """Run; print wall time and how many cores were busy on average (CPU time / wall time)."""
    c0, t0 = time.process_time(), time.perf_counter()
    result = await coro_factory()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"    {label:40s} {dt * 1000:7.1f} ms wall, {cpu / dt:4.2f} cores busy")
    return dt, result


async def main(workers: int) -> None:
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, GIL {'enabled' if gil else 'disabled (free-threaded build)'}, "
          f"{workers} isolates, backend {asyncio.get_running_loop().backend}")  # type: ignore[attr-defined]

    # 1. Pure Python: split a range of numbers over the isolates.
    limit = 120_000
    step = limit // workers
    chunks = [(i * step, limit if i == workers - 1 else (i + 1) * step) for i in range(workers)]
    print(f"\n1. Pure-Python work: count the primes below {limit}")
    t_one, expected = await timed("one isolate (Isolate.run, whole range)", lambda: Isolate.run(count_primes, 0, limit))
    t_par, parts = await timed(f"{workers} isolates at once (gather)", lambda: asyncio.gather(*(Isolate.run(count_primes, lo, hi) for lo, hi in chunks)))
    assert sum(parts) == expected  # type: ignore[arg-type]
    print(f"    {expected} primes either way; speed-up {t_one / t_par:.2f}x", end="")
    if gil:
        print(" -- about 1x: the GIL lets one thread run Python at a time")
    else:
        print(" -- no GIL on this build: the isolates run Python in parallel")

    # 2. C code that releases the GIL: hash and compress big buffers.
    size = 4 * 1024 * 1024
    blocks = [os.urandom(size // 2) * 2 for _ in range(workers)]
    rounds = 6
    print(f"\n2. GIL-releasing C work: sha256 x{rounds} + zlib.compress of {workers} x {size // (1024 * 1024)} MiB")

    async def sequential() -> list[object]:
        return [await Isolate.run(digest_and_compress, block, rounds) for block in blocks]

    t_seq, seq = await timed("one after the other (each in an isolate)", sequential)
    t_par, par = await timed(f"{workers} isolates at once (gather)", lambda: asyncio.gather(*(Isolate.run(digest_and_compress, b, rounds) for b in blocks)))
    assert list(par) == seq  # type: ignore[arg-type]
    print(f"    same results; speed-up {t_seq / t_par:.2f}x (up to {min(workers, os.cpu_count() or 1)}x on idle cores: "
          "hashlib and zlib release the GIL,\n    so the isolates' threads run at once -- see 'cores busy'; a loaded machine shows less)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="CPU work over isolates, with and without the GIL.")
    parser.add_argument("--backend", choices=dartloop.available_backends(), default=None)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    dartloop.run(main(max(1, args.workers)), backend=args.backend)
