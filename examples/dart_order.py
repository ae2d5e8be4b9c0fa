"""Dart's event-loop order on dartloop: sync code, microtasks, then timers.

Run it with ``python examples/dart_order.py`` (default backend: uvloop where it
is installed, else the stdlib selector loop) or pick one with
``--backend asyncio|uvloop``. It prints what ran, in the order it ran, checks
that order against the one the Dart VM gives the same program, and exits 1 if
they differ.

The Dart program it mirrors::

    void main() {
      print('sync: main starts');
      Timer.run(() { print('timer: zero-duration timer');
                     scheduleMicrotask(() => print('microtask: queued by the zero timer')); });
      Timer(Duration(milliseconds: 20), () => ...);   // timer A
      Timer(Duration(milliseconds: 20), () => ...);   // timer B
      scheduleMicrotask(() { print('microtask: 1');
                             scheduleMicrotask(() => print('microtask: 3, queued by 1')); });
      scheduleMicrotask(() => print('microtask: 2'));
      print('sync: main ends');
    }
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import dartloop

EXPECTED = [
    "sync: main starts",
    "sync: main schedules timers and microtasks",
    "sync: main is busy for 50 ms, so timers A and B fall due together",
    "sync: main's synchronous part ends",
    "microtask: 1",
    "microtask: 2",
    "microtask: 3, queued by microtask 1 (the drain runs it too)",
    "timer: zero-duration timer (Timer.run)",
    "microtask: queued by the zero timer",
    "timer: A (20 ms)",
    "microtask: queued by timer A, runs before timer B",
    "timer: B (20 ms), same batch as A",
    "microtask: queued by timer B",
]

EXPLANATION = """\
Why this order (the Dart VM's event-loop turn, which dartloop follows):
  1. Synchronous code runs to its end first: nothing interrupts it.
  2. After every event (here, main's first step) the loop drains the
     microtask queue completely, including microtasks queued by microtasks,
     before it looks at anything else.
  3. Only then do timers run. Timers due together run as one batch, and the
     microtask queue is drained after each single timer callback, so timer
     A's microtask runs before timer B.
On stock asyncio there is no microtask queue; call_soon callbacks queued by
timer A would run only after timer B."""


async def main(log: list[str]) -> None:
    def say(line: str) -> None:
        log.append(line)
        print(f"  {line}")

    done = asyncio.get_running_loop().create_future()

    def zero_timer() -> None:
        say("timer: zero-duration timer (Timer.run)")
        dartloop.schedule_microtask(say, "microtask: queued by the zero timer")

    def timer_a() -> None:
        say("timer: A (20 ms)")
        dartloop.schedule_microtask(say, "microtask: queued by timer A, runs before timer B")

    def timer_b() -> None:
        say("timer: B (20 ms), same batch as A")

        def last() -> None:
            say("microtask: queued by timer B")
            done.set_result(None)

        dartloop.schedule_microtask(last)

    def microtask_1() -> None:
        say("microtask: 1")
        dartloop.schedule_microtask(say, "microtask: 3, queued by microtask 1 (the drain runs it too)")

    say("sync: main starts")
    say("sync: main schedules timers and microtasks")
    dartloop.Timer.run(zero_timer)
    dartloop.Timer(0.020, timer_a)
    dartloop.Timer(0.020, timer_b)
    dartloop.schedule_microtask(microtask_1)
    dartloop.schedule_microtask(say, "microtask: 2")
    say("sync: main is busy for 50 ms, so timers A and B fall due together")
    time.sleep(0.050)  # blocks the loop on purpose, as busy Dart code would
    say("sync: main's synchronous part ends")
    await asyncio.wait_for(done, timeout=5)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=dartloop.available_backends(),
        default=None,
        help=f"dartloop backend (default: {dartloop.default_backend()})",
    )
    args = parser.parse_args(argv)
    backend = args.backend or dartloop.default_backend()

    print(f"dartloop {dartloop.__version__}, backend {backend!r}, Python {sys.version.split()[0]}")
    print("What ran, in order:")
    log: list[str] = []
    dartloop.run(main(log), backend=backend)
    print()
    print(EXPLANATION)
    print()
    if log != EXPECTED:
        print("MISMATCH: this is not the order the Dart VM gives. Expected:", file=sys.stderr)
        for line in EXPECTED:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"OK: {len(log)} steps in Dart's order on the {backend!r} backend.")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
