"""Where the time of ``await Isolate.run(noop)`` goes, phase by phase.

Usage: ``python benchmarks/profile_isolate_run.py [asyncio|uvloop] [--runs N]``

A diagnostic, not a benchmark to compare loops with (see
``run_isolate_benchmarks.py`` for that): it wraps the isolate's internal steps
with time stamps (``time.perf_counter``) and prints, for each pair of
consecutive stamps seen in most runs, the median gap in microseconds, largest
first. The stamps are taken in two threads (spawner and isolate), so a gap can
include waiting for the GIL or for the scheduler; on a busy machine the thread
start dominates. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
from typing import Any, Callable

import dartloop
from dartloop import Isolate
from dartloop import _isolate

_stamps: dict[str, float] = {}


def _wrap(owner: Any, attr: str, before: str | None, after: str | None) -> None:
    original: Callable[..., Any] = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            _stamps[before] = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                _stamps[after] = time.perf_counter()

    setattr(owner, attr, wrapper)


def _instrument() -> None:
    state = _isolate._IsolateState
    _wrap(state, "prepare", "loop made: start", "loop made: end")
    _wrap(state, "thread_main", "isolate thread: start", "isolate thread: end")
    _wrap(state, "_run_entry", "entry runs", None)
    _wrap(state, "_finish", "finish: start", "finish: end")
    _wrap(state, "_cancel_leftovers", "cancel leftovers: start", "cancel leftovers: end")
    _wrap(threading.Thread, "start", "Thread.start: start", "Thread.start: end")
    join = _isolate._join

    async def timed_join(state: Any) -> None:
        _stamps["join: start"] = time.perf_counter()
        await join(state)
        _stamps["join: end"] = time.perf_counter()

    _isolate._join = timed_join  # type: ignore[assignment]


def _noop() -> None:
    return None


async def _main(runs: int) -> None:
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    totals: list[float] = []
    for _ in range(50):  # warm-up
        await Isolate.run(_noop)
    for _ in range(runs):
        _stamps.clear()
        t0 = _stamps["Isolate.run called"] = time.perf_counter()
        await Isolate.run(_noop)
        _stamps["result back"] = time.perf_counter()
        totals.append((_stamps["result back"] - t0) * 1e6)
        names = sorted(_stamps, key=_stamps.__getitem__)
        for a, b in zip(names, names[1:]):
            gaps[(a, b)].append((_stamps[b] - _stamps[a]) * 1e6)
    print(f"Isolate.run(noop): median {statistics.median(totals):.0f} us over {runs} runs")
    common = [(k, v) for k, v in gaps.items() if len(v) > runs // 2]
    for (a, b), v in sorted(common, key=lambda kv: -statistics.median(kv[1])):
        print(f"  {statistics.median(v):8.1f} us  {a} -> {b}  (in {len(v)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backend", nargs="?", choices=dartloop.available_backends(), default="asyncio")
    parser.add_argument("--runs", type=int, default=500)
    args = parser.parse_args()
    _instrument()
    dartloop.run(_main(args.runs), backend=args.backend)


if __name__ == "__main__":
    main()
