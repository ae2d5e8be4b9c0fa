"""Isolate and port benchmarks: dartloop next to the raw asyncio / uvloop ways.

One command, all contenders side by side in one run::

    python benchmarks/run_isolate_benchmarks.py            # full
    python benchmarks/run_isolate_benchmarks.py --quick    # a few seconds

Three groups, each a table of medians over rounds, with ratios to the group's
reference row. In every round each contender runs once; the order of the
contenders alternates from round to round (forward, then backward), so that
a slow phase of a loaded machine does not always hit the same contender.

* one-way throughput (messages/s): N ints from a sender to a receiver that
  counts them. dartloop: a sender isolate (and a plain thread) posting to a
  ``RawReceivePort`` of the root isolate, on both backends. Raw: a thread
  calling ``loop.call_soon_threadsafe(count, i)`` on stock asyncio and on
  uvloop; and a ``queue.Queue`` drained with ``await asyncio.to_thread(q.get)``
  (the naive hand-off; fewer messages, rate scaled).
* round trip (µs per ping-pong): dartloop between two isolates (handlers
  only); raw: two loops in two threads bouncing ``call_soon_threadsafe``.
* spawn latency (µs): ``Isolate.spawn`` until the entry has run (it sends a
  message), ``await Isolate.run(noop)`` (also from a "busy spawner", one
  with ``BUSY_TASKS`` tasks waiting, which must not slow it), next to ``threading.Thread``
  start+join, ``await asyncio.to_thread(noop)`` (stock asyncio, warm
  executor), and a floor for any loop-per-thread design: a thread that makes
  a stock selector loop, hands one result back with
  ``call_soon_threadsafe``, closes the loop and is joined.
* events (events/s): a ``call_soon`` chain in the root isolate and inside
  ``Isolate.run`` (a spawned isolate with no open port, whose liveness the
  uvloop backend checks with a probe event each loop iteration).

Targets (from the issue): one-way >= 2 M messages/s on both backends; round
trip no worse than raw uvloop ``call_soon_threadsafe``; ``Isolate.run(noop)``
<= 0.3 ms median on the asyncio backend. The last lines say which are met.

Set ``DARTLOOP_NO_EXTENSIONS=1`` to measure the pure-Python loop (without
dartloop's optional C accelerator for the loop turn).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dartloop  # noqa: E402
from dartloop import Isolate, RawReceivePort, SendPort  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

BACKENDS = dartloop.available_backends()[::-1]  # ("asyncio", "uvloop")
perf = time.perf_counter


# ---------------------------------------------------------------------------
# Child entry points (module level: they run in spawned isolates)


def _sender_entry(reply: SendPort) -> None:
    """Sends its port; on ``n`` it sends ``0 .. n-1`` to ``reply`` and ends."""
    own = RawReceivePort()

    def go(n: int) -> None:
        send = reply.send
        for i in range(n):
            send(i)
        own.close()

    own.handler = go
    reply.send(own.send_port)


def _echo_entry(reply: SendPort) -> None:
    """Sends its port; echoes every message to ``reply``; ``None`` ends it."""
    own = RawReceivePort()
    send = reply.send

    def echo(m: Any) -> None:
        if m is None:
            own.close()
        else:
            send(m)

    own.handler = echo
    reply.send(own.send_port)


def _ran_entry(reply: SendPort) -> None:
    reply.send(None)


def _noop() -> None:
    return None


# ---------------------------------------------------------------------------
# One-way throughput: each returns seconds for n messages


def dart_isolate_oneway(backend: str, n: int) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        got_port: asyncio.Future[SendPort] = loop.create_future()
        done: asyncio.Future[float] = loop.create_future()
        count = 0

        def handler(m: Any) -> None:
            nonlocal count
            if type(m) is int:
                count += 1
                if count == n:
                    done.set_result(perf())
            elif m is None:
                exited.set_result(None)
            else:
                got_port.set_result(m)

        exited: asyncio.Future[None] = loop.create_future()
        port = RawReceivePort(handler)
        await Isolate.spawn(_sender_entry, port.send_port, on_exit=port.send_port)
        sender = await got_port
        t0 = perf()
        sender.send(n)
        t1 = await done
        await exited
        port.close()
        return t1 - t0

    return dartloop.run(main(), backend=backend)


def dart_thread_oneway(backend: str, n: int) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        count = 0

        def handler(m: int) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set_result(perf())

        port = RawReceivePort(handler)
        send = port.send_port.send

        def sender() -> None:
            for i in range(n):
                send(i)

        t = threading.Thread(target=sender)
        t0 = perf()
        t.start()
        t1 = await done
        t.join()
        port.close()
        return t1 - t0

    return dartloop.run(main(), backend=backend)


def raw_oneway(factory: Callable[[], asyncio.AbstractEventLoop], n: int) -> float:
    loop = factory()
    try:
        done = loop.create_future()
        count = 0

        def cb(i: int) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set_result(perf())

        def sender() -> None:
            cst = loop.call_soon_threadsafe
            for i in range(n):
                cst(cb, i)

        async def main() -> float:
            t = threading.Thread(target=sender)
            t0 = perf()
            t.start()
            t1 = await done
            t.join()
            return t1 - t0

        return loop.run_until_complete(main())
    finally:
        loop.close()


def to_thread_oneway(n: int) -> float:
    """queue.Queue filled by a thread, drained with await asyncio.to_thread(q.get)."""

    async def main() -> float:
        q: queue.Queue[int] = queue.Queue()

        def sender() -> None:
            for i in range(n):
                q.put(i)

        t = threading.Thread(target=sender)
        t0 = perf()
        t.start()
        for _ in range(n):
            await asyncio.to_thread(q.get)
        t1 = perf()
        t.join()
        return t1 - t0

    return asyncio.run(main())


# ---------------------------------------------------------------------------
# Round trip: each returns a list of per-round-trip seconds (k samples)


def dart_round_trip(backend: str, k: int) -> list[float]:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        got_port: asyncio.Future[SendPort] = loop.create_future()
        done: asyncio.Future[None] = loop.create_future()
        exited: asyncio.Future[None] = loop.create_future()
        samples: list[float] = []
        t0 = 0.0
        child: SendPort | None = None

        def handler(m: Any) -> None:
            nonlocal t0
            if type(m) is int:
                t1 = perf()
                samples.append(t1 - t0)
                if m + 1 == k:
                    done.set_result(None)
                else:
                    t0 = perf()
                    child.send(m + 1)  # type: ignore[union-attr]
            elif m is None:
                exited.set_result(None)
            else:
                got_port.set_result(m)

        port = RawReceivePort(handler)
        await Isolate.spawn(_echo_entry, port.send_port, on_exit=port.send_port)
        child = await got_port
        t0 = perf()
        child.send(0)
        await done
        child.send(None)
        await exited
        port.close()
        return samples

    return dartloop.run(main(), backend=backend)


def raw_round_trip(factory: Callable[[], asyncio.AbstractEventLoop], k: int) -> list[float]:
    other = factory()
    started = threading.Event()

    def run_other() -> None:
        asyncio.set_event_loop(other)
        other.call_soon(started.set)
        other.run_forever()

    thread = threading.Thread(target=run_other)
    thread.start()
    started.wait()
    loop = factory()
    try:
        done = loop.create_future()
        samples: list[float] = []
        t0 = 0.0
        reply = loop.call_soon_threadsafe
        ping = other.call_soon_threadsafe

        def echo(i: int) -> None:
            reply(on_reply, i)

        def on_reply(i: int) -> None:
            nonlocal t0
            samples.append(perf() - t0)
            if i + 1 == k:
                done.set_result(None)
            else:
                t0 = perf()
                ping(echo, i + 1)

        async def main() -> None:
            nonlocal t0
            t0 = perf()
            ping(echo, 0)
            await done

        loop.run_until_complete(main())
        return samples
    finally:
        loop.close()
        other.call_soon_threadsafe(other.stop)
        thread.join()
        other.close()


# ---------------------------------------------------------------------------
# Spawn latency: each returns a list of per-operation seconds (k samples)


def dart_spawn_latency(backend: str, k: int) -> list[float]:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        samples = []
        for _ in range(k):
            ran: asyncio.Future[None] = loop.create_future()
            exited: asyncio.Future[None] = loop.create_future()

            def handler(m: Any, ran: asyncio.Future[None] = ran, exited: asyncio.Future[None] = exited) -> None:
                (exited if ran.done() else ran).set_result(None)

            port = RawReceivePort(handler)
            t0 = perf()
            await Isolate.spawn(_ran_entry, port.send_port, on_exit=port.send_port, debug_name="bench-spawn")
            await ran
            samples.append(perf() - t0)
            await exited  # untimed: let it end before the next one
            port.close()
            for t in threading.enumerate():
                if t.name == "dartloop-isolate-bench-spawn":
                    t.join()
        return samples

    return dartloop.run(main(), backend=backend)


# Tasks the spawner holds while it times Isolate.run (the "busy spawner" rows):
# an ending isolate must find its own leftover tasks without walking these.
BUSY_TASKS = 10_000


def dart_run_latency(backend: str, k: int, busy: int = 0) -> list[float]:
    async def main() -> list[float]:
        release = asyncio.Event()
        held = [asyncio.create_task(release.wait()) for _ in range(busy)]
        await asyncio.sleep(0)
        samples = []
        for _ in range(k):
            t0 = perf()
            await Isolate.run(_noop)
            samples.append(perf() - t0)
        release.set()
        await asyncio.gather(*held)
        return samples

    return dartloop.run(main(), backend=backend)


def thread_latency(k: int) -> list[float]:
    samples = []
    for _ in range(k):
        t0 = perf()
        t = threading.Thread(target=_noop)
        t.start()
        t.join()
        samples.append(perf() - t0)
    return samples


def loop_thread_floor_latency(k: int) -> list[float]:
    """What any loop-per-thread ``run`` must do, with stock asyncio and no dartloop:
    start a thread, make a selector loop in it, run one callback that hands a
    result back with ``call_soon_threadsafe``, close the loop, join the thread."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        samples = []
        for _ in range(k):
            t0 = perf()
            fut: asyncio.Future[None] = loop.create_future()

            def body(fut: asyncio.Future[None] = fut) -> None:
                child = asyncio.SelectorEventLoop()

                def entry() -> None:
                    loop.call_soon_threadsafe(fut.set_result, None)
                    child.stop()

                child.call_soon(entry)
                child.run_forever()
                child.close()

            thread = threading.Thread(target=body)
            thread.start()
            await fut
            thread.join()
            samples.append(perf() - t0)
        return samples

    return asyncio.run(main())


def to_thread_latency(k: int) -> list[float]:
    async def main() -> list[float]:
        await asyncio.to_thread(_noop)  # warm the executor
        samples = []
        for _ in range(k):
            t0 = perf()
            await asyncio.to_thread(_noop)
            samples.append(perf() - t0)
        return samples

    return asyncio.run(main())


async def _call_soon_chain(n: int) -> float:
    """Seconds for n call_soon events, each scheduling the next."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = n

    def step() -> None:
        nonlocal left
        left -= 1
        if left:
            loop.call_soon(step)
        else:
            done.set_result(None)

    t0 = perf()
    loop.call_soon(step)
    await done
    return perf() - t0


def root_chain(backend: str, n: int) -> float:
    return dartloop.run(_call_soon_chain(n), backend=backend)


def isolate_chain(backend: str, n: int) -> float:
    """The same chain inside ``Isolate.run``: a spawned isolate with no open
    port, whose liveness is checked as it runs."""

    async def main() -> float:
        return await Isolate.run(functools.partial(_call_soon_chain, n))

    return dartloop.run(main(), backend=backend)


# ---------------------------------------------------------------------------
# The harness


@dataclass
class Row:
    name: str
    run: Callable[[], float]  # one round's figure
    reference: bool = False
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def run_group(rows: list[Row], rounds: int) -> None:
    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]
        for row in order:
            row.values.append(row.run())
        print(".", end="", flush=True)
    print()


def print_table(title: str, unit: str, rows: list[Row], higher_is_better: bool, fmt: Callable[[float], str]) -> None:
    ref = next(r for r in rows if r.reference)
    print(f"\n{title}")
    print(f"  {'contender':52s} {unit:>14s} {'vs ' + ref.name[:28]:>34s}")
    for row in rows:
        ratio = row.median / ref.median
        if higher_is_better:
            rel = f"{ratio:.2f}x"
        else:
            rel = f"{ratio:.2f}x the time"
        spread = f"  (min {fmt(min(row.values))}, max {fmt(max(row.values))})"
        print(f"  {row.name:52s} {fmt(row.median):>14s} {rel:>34s}{spread}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds (a few seconds)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per group (default 7, quick 3)")
    parser.add_argument("--only", choices=["oneway", "roundtrip", "spawn", "events"], action="append", help="run only these groups")
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or (3 if quick else 7)
    n = 50_000 if quick else 300_000  # one-way messages per round
    k_rt = 500 if quick else 3_000  # round trips per round
    k_spawn = 40 if quick else 200  # spawns per round
    k_events = 20_000 if quick else 200_000  # call_soon events per round
    groups = args.only or ["oneway", "roundtrip", "spawn", "events"]

    accelerated = getattr(sys.modules["dartloop._loop"], "SPEEDUPS", None) is not None
    print(
        f"dartloop isolate benchmarks: Python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, uvloop {getattr(uvloop, '__version__', 'absent')}, "
        f"loop accelerator {'on' if accelerated else 'off'}, rounds {rounds}"
        + (" (quick)" if quick else "")
    )
    results: dict[str, float] = {}

    if "oneway" in groups:
        rows = []
        for b in BACKENDS:
            rows.append(Row(f"dartloop({b}) isolate -> isolate", lambda b=b: n / dart_isolate_oneway(b, n)))
            rows.append(Row(f"dartloop({b}) thread -> isolate", lambda b=b: n / dart_thread_oneway(b, n)))
        rows.append(Row("raw call_soon_threadsafe, stock asyncio", lambda: n / raw_oneway(asyncio.SelectorEventLoop, n)))
        if uvloop is not None:
            rows.append(Row("raw call_soon_threadsafe, uvloop", lambda: n / raw_oneway(uvloop.new_event_loop, n), reference=True))
        else:  # pragma: no cover
            rows[-1].reference = True
        m = max(200, n // 100)
        rows.append(Row(f"queue.Queue + await asyncio.to_thread(q.get) ({m} msgs)", lambda: m / to_thread_oneway(m)))
        print(f"one-way throughput, {n} ints per round", end=" ", flush=True)
        run_group(rows, rounds)
        print_table(f"One-way throughput (messages/s, median of {rounds} rounds of {n})", "msgs/s", rows, True, lambda v: f"{v / 1e6:.3f} M")
        for row in rows:
            results[row.name] = row.median

    if "roundtrip" in groups:
        rows = []
        for b in BACKENDS:
            rows.append(Row(f"dartloop({b}) isolate <-> isolate", lambda b=b: statistics.median(dart_round_trip(b, k_rt))))
        rows.append(Row("raw call_soon_threadsafe, stock asyncio", lambda: statistics.median(raw_round_trip(asyncio.SelectorEventLoop, k_rt))))
        if uvloop is not None:
            rows.append(Row("raw call_soon_threadsafe, uvloop", lambda: statistics.median(raw_round_trip(uvloop.new_event_loop, k_rt)), reference=True))
        else:  # pragma: no cover
            rows[-1].reference = True
        print(f"round trip, {k_rt} ping-pongs per round", end=" ", flush=True)
        run_group(rows, rounds)
        print_table(f"Round trip (µs, median of per-round medians, {rounds} rounds of {k_rt})", "µs", rows, False, lambda v: f"{v * 1e6:.1f}")
        for row in rows:
            results[row.name] = row.median

    if "spawn" in groups:
        rows = []
        for b in BACKENDS:
            rows.append(Row(f"dartloop({b}) Isolate.spawn until entry ran", lambda b=b: statistics.median(dart_spawn_latency(b, k_spawn))))
            rows.append(Row(f"dartloop({b}) await Isolate.run(noop)", lambda b=b: statistics.median(dart_run_latency(b, k_spawn))))
            rows.append(Row(f"dartloop({b}) Isolate.run(noop), busy spawner",
                            lambda b=b: statistics.median(dart_run_latency(b, k_spawn, BUSY_TASKS))))
        rows.append(Row("threading.Thread(noop) start + join", lambda: statistics.median(thread_latency(k_spawn)), reference=True))
        rows.append(Row("floor: thread + stock loop in it + one reply + join", lambda: statistics.median(loop_thread_floor_latency(k_spawn))))
        rows.append(Row("await asyncio.to_thread(noop) (stock asyncio)", lambda: statistics.median(to_thread_latency(k_spawn))))
        print(f"spawn latency, {k_spawn} per round", end=" ", flush=True)
        run_group(rows, rounds)
        print_table(f"Spawn latency (µs, median of per-round medians, {rounds} rounds of {k_spawn})", "µs", rows, False, lambda v: f"{v * 1e6:.1f}")
        for row in rows:
            results[row.name] = row.median

    if "events" in groups:
        rows = []
        for b in BACKENDS:
            rows.append(Row(f"dartloop({b}) root isolate", lambda b=b: k_events / root_chain(b, k_events), reference=(b == "asyncio")))
            rows.append(Row(f"dartloop({b}) inside Isolate.run", lambda b=b: k_events / isolate_chain(b, k_events)))
        print(f"events in an isolate, call_soon chain of {k_events}", end=" ", flush=True)
        run_group(rows, rounds)
        print_table(f"Event rate, root vs spawned isolate (events/s, median of {rounds} rounds)", "events/s", rows, True, lambda v: f"{v / 1e6:.3f} M")

    print("\nTargets:")
    if "oneway" in groups:
        for b in BACKENDS:
            v = results[f"dartloop({b}) isolate -> isolate"]
            print(f"  one-way dartloop({b}) >= 2 M msgs/s: {v / 1e6:.2f} M -> {'met' if v >= 2e6 else 'NOT met (%.0f%% of target)' % (100 * v / 2e6)}")
    if "roundtrip" in groups and uvloop is not None:
        ref = results["raw call_soon_threadsafe, uvloop"]
        for b in BACKENDS:
            v = results[f"dartloop({b}) isolate <-> isolate"]
            print(f"  round trip dartloop({b}) <= raw uvloop ({ref * 1e6:.1f} µs): {v * 1e6:.1f} µs -> {'met' if v <= ref else 'NOT met (%.2fx)' % (v / ref)}")
    if "spawn" in groups:
        v = results["dartloop(asyncio) await Isolate.run(noop)"]
        print(f"  Isolate.run(noop) on asyncio <= 300 µs: {v * 1e6:.1f} µs -> {'met' if v <= 300e-6 else 'NOT met (%.2fx)' % (v / 300e-6)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
