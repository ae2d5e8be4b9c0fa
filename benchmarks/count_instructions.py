"""Instructions per event, counted by valgrind: a noise-free companion to the timings.

On a shared 2-core machine wall-clock ratios move by 5-10% from run to run;
the number of instructions a benchmark executes does not. This script runs
one benchmark of ``run_loop_benchmarks.py`` under ``valgrind --tool=callgrind``
twice per contender, with ``n`` and ``3n`` events, and divides the difference
by ``2n``: the cost of one event without start-up and teardown. It prints the
figures and each dartloop contender's ratio to the stock loop of its backend
(below 1.0: fewer instructions than stock)::

    python benchmarks/count_instructions.py call_soon_chain
    python benchmarks/count_instructions.py future_pingpong --n 2000
    python benchmarks/count_instructions.py isolate_round_trip

``isolate_round_trip`` counts one round trip of ``run_isolate_benchmarks.py``
(dartloop isolate <-> isolate, and raw ``call_soon_threadsafe`` between two
stock loops, asyncio and uvloop). valgrind runs one thread at a time, and
where it switches threads changes what the two loops do between messages,
so these counts move by a few percent from run to run.

Instructions are not time (cache misses and system calls are not counted the
same way), so the timings in ``run_loop_benchmarks.py`` stay the measure;
this tells whether a change made the work smaller. Needs valgrind; a run takes
a minute or more. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PAIRS = {"dartloop(asyncio)": "asyncio", "dartloop(uvloop)": "uvloop"}

_CHILD = """
import sys
sys.path.insert(0, {here!r})
import run_loop_benchmarks as rb
b = next(b for b in rb.BENCHES if b.key == {key!r})
c = next(c for c in rb.make_contenders(False) if c.name == {name!r})
rb.measure(b, c, {n})
"""

ROUND_TRIP = "isolate_round_trip"
ROUND_TRIP_PAIRS = {"dartloop(asyncio)": "raw asyncio", "dartloop(uvloop)": "raw uvloop"}

_ROUND_TRIP_CHILD = """
import asyncio, sys
sys.path.insert(0, {here!r})
import run_isolate_benchmarks as ib
name = {name!r}
if name.startswith("dartloop("):
    ib.dart_round_trip(name[len("dartloop("):-1], {n})
elif name == "raw asyncio":
    ib.raw_round_trip(asyncio.SelectorEventLoop, {n})
else:
    import uvloop
    ib.raw_round_trip(uvloop.new_event_loop, {n})
"""


def count(key: str, name: str, n: int) -> int:
    """Instructions of one run of benchmark ``key`` on contender ``name`` with ``n`` events."""
    child = _ROUND_TRIP_CHILD if key == ROUND_TRIP else _CHILD
    code = child.format(here=HERE, key=key, name=name, n=n)
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"valgrind run of {key} on {name} failed:\n{proc.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, HERE)
    import run_loop_benchmarks as rb

    keys = [b.key for b in rb.BENCHES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=[*keys, ROUND_TRIP])
    parser.add_argument("--n", type=int, default=None, help="events of the smaller run (default: the bench's quick size / 5; 1000 round trips)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    if args.bench == ROUND_TRIP:
        n = args.n or 1000
        names = ["raw asyncio", "dartloop(asyncio)"]
        if rb.uvloop is not None:
            names += ["raw uvloop", "dartloop(uvloop)"]
        title, unit, pairs = "isolate round trip", "round trip", ROUND_TRIP_PAIRS
    else:
        bench = next(b for b in rb.BENCHES if b.key == args.bench)
        n = args.n or max(bench.quick // 5, 100)
        names = [c.name for c in rb.make_contenders(False) if not c.reference and rb.applies(bench, c)]
        title, unit, pairs = bench.title, "event", PAIRS
    per_event: dict[str, float] = {}
    print(f"{title}: instructions per {unit} (runs of {n} and {3 * n}), Python {sys.version.split()[0]}")
    for name in names:
        small, large = count(args.bench, name, n), count(args.bench, name, 3 * n)
        per_event[name] = (large - small) / (2 * n)
        print(f"  {name:<22} {per_event[name]:>10.0f}", flush=True)
    for name, stock in pairs.items():
        if name in per_event and stock in per_event:
            print(f"  {name} / {stock}: {per_event[name] / per_event[stock]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
