"""Event-loop benchmarks: stock asyncio, uvloop and dartloop's two backends.

One command, every contender in the same process and the same run::

    python benchmarks/run_loop_benchmarks.py            # full run (about 5 min)
    python benchmarks/run_loop_benchmarks.py --quick    # short run (about 1 min)
    python benchmarks/run_loop_benchmarks.py --pure     # also dartloop without its C accelerator

Contenders: ``asyncio`` (the stdlib selector loop), ``uvloop``,
``dartloop(asyncio)`` and ``dartloop(uvloop)``; with ``--pure`` also the
same two dartloop backends built on the pure-Python path
(``dartloop._loop.SPEEDUPS = None`` while they are created, and the pure
``schedule_microtask``). The microtask rows also run a bare ``deque`` +
call drain, the reference a microtask queue can't beat in pure Python.

Method: each measurement runs in a fresh loop (creation and closing are not
timed; ``gc.collect()`` before each); one warm-up round at a tenth of the
size is discarded; then every round runs each benchmark for every contender.
Within a round a dartloop backend runs right next to its stock counterpart
(contenders are grouped by backend), and the order is rotated by one each
round and reversed every other round, so no contender always runs first or
last on a noisy machine. The table shows the median throughput (higher is
better) and the ratios ``dartloop(asyncio) / asyncio`` and
``dartloop(uvloop) / uvloop`` (above 1: dartloop is faster), each the median
of the per-round ratios, which cancels most of a shared machine's drifting
load. All raw samples go to a JSON file.

Network use: TCP echo over 127.0.0.1 only, one server and one client in the
process, each round trip bounded by a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dartloop  # noqa: E402
from dartloop import _loop as dl_loop  # noqa: E402
from dartloop import _microtasks as dl_microtasks  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

TCP_TIMEOUT = 60.0  # seconds for a whole echo measurement before it is abandoned


# ---------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    dart: bool = False
    reference: bool = False  # the bare deque drain: microtask rows only
    schedule_microtask: Callable[..., None] | None = None


def _pure_schedule_microtask() -> Callable[..., None]:
    return getattr(dl_microtasks, "_schedule_microtask_py", dl_microtasks.schedule_microtask)


def _dart_factory(backend: str, pure: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    def factory() -> asyncio.AbstractEventLoop:
        if not pure:
            return dartloop.new_event_loop(backend=backend)
        saved = getattr(dl_loop, "SPEEDUPS", None)
        dl_loop.SPEEDUPS = None  # type: ignore[attr-defined]
        try:
            return dartloop.new_event_loop(backend=backend)
        finally:
            dl_loop.SPEEDUPS = saved  # type: ignore[attr-defined]

    return factory


def make_contenders(pure: bool) -> list[Contender]:
    accelerated = getattr(dl_loop, "SPEEDUPS", None) is not None
    tag = "" if accelerated else " pure"
    out = [Contender("asyncio", asyncio.SelectorEventLoop)]
    if uvloop is not None:
        out.append(Contender("uvloop", uvloop.new_event_loop))
    backends = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
    for backend in backends:
        out.append(
            Contender(
                f"dartloop({backend}){tag}",
                _dart_factory(backend, False),
                dart=True,
                schedule_microtask=dartloop.schedule_microtask,
            )
        )
    if pure and accelerated:
        for backend in backends:
            out.append(
                Contender(
                    f"dartloop({backend}) pure",
                    _dart_factory(backend, True),
                    dart=True,
                    schedule_microtask=_pure_schedule_microtask(),
                )
            )
    out.append(Contender("deque drain (ref)", None, reference=True))
    return out


# ---------------------------------------------------------------------------
# Benchmarks. Each takes (loop, contender, n) and returns (count, seconds).
# ---------------------------------------------------------------------------


def bench_call_soon_chain(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """n events, each scheduling the next with call_soon."""
    left = n
    done = loop.create_future()
    call_soon = loop.call_soon

    def step() -> None:
        nonlocal left
        left -= 1
        if left:
            call_soon(step)
        else:
            done.set_result(time.perf_counter())

    async def main() -> float:
        t0 = time.perf_counter()
        call_soon(step)
        return (await done) - t0

    return n, loop.run_until_complete(main())


def bench_call_soon_fanout(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """One callback schedules 1000 callbacks, n/1000 times in a row (scheduling is timed)."""
    width = 1000
    batches = max(1, n // width)
    left = batches * width
    done = loop.create_future()
    call_soon = loop.call_soon

    def leaf() -> None:
        nonlocal left
        left -= 1
        if not left:
            done.set_result(time.perf_counter())
        elif left % width == 0:
            call_soon(fan)

    def fan() -> None:
        for _ in range(width):
            call_soon(leaf)

    async def main() -> float:
        t0 = time.perf_counter()
        call_soon(fan)
        return (await done) - t0

    return batches * width, loop.run_until_complete(main())


def bench_microtask_chain(loop: asyncio.AbstractEventLoop | None, c: Contender, n: int) -> tuple[int, float]:
    """n microtasks, each scheduling the next (schedule_microtask), drained after one event."""
    if c.reference:
        q: collections.deque[Any] = collections.deque()
        append = q.append
        left = n

        def rstep() -> None:
            nonlocal left
            left -= 1
            if left:
                append((rstep, ()))

        t0 = time.perf_counter()
        append((rstep, ()))
        popleft = q.popleft
        while q:
            cb, args = popleft()
            cb(*args)
        return n, time.perf_counter() - t0

    assert loop is not None and c.schedule_microtask is not None
    schedule = c.schedule_microtask
    left = n
    t0 = t1 = 0.0

    def step() -> None:
        nonlocal left, t1
        left -= 1
        if left:
            schedule(step)
        else:
            t1 = time.perf_counter()

    def start() -> None:
        nonlocal t0
        t0 = time.perf_counter()
        schedule(step)

    async def main() -> None:
        loop.call_soon(start)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert left == 0
    return n, t1 - t0


def bench_microtask_burst(loop: asyncio.AbstractEventLoop | None, c: Contender, n: int) -> tuple[int, float]:
    """One event schedules n microtasks, then the drain runs them (scheduling is timed)."""
    count = 0
    if c.reference:
        q: collections.deque[Any] = collections.deque()
        append = q.append

        def rleaf() -> None:
            nonlocal count
            count += 1

        t0 = time.perf_counter()
        for _ in range(n):
            append((rleaf, ()))
        popleft = q.popleft
        while q:
            cb, args = popleft()
            cb(*args)
        t1 = time.perf_counter()
        assert count == n
        return n, t1 - t0

    assert loop is not None and c.schedule_microtask is not None
    schedule = c.schedule_microtask
    t0 = t1 = 0.0

    def leaf() -> None:
        nonlocal count, t1
        count += 1
        if count == n:
            t1 = time.perf_counter()

    def start() -> None:
        nonlocal t0
        t0 = time.perf_counter()
        for _ in range(n):
            schedule(leaf)

    async def main() -> None:
        loop.call_soon(start)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert count == n
    return n, t1 - t0


def _delays(n: int) -> list[float]:
    rng = random.Random(1234)
    return [rng.random() * 0.002 for _ in range(n)]  # 0..2 ms


def bench_call_later(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """n call_later timers with random delays (0-2 ms), all scheduled from one callback; count fired."""
    delays = _delays(n)
    fired = 0
    done = loop.create_future()

    def cb() -> None:
        nonlocal fired
        fired += 1
        if fired == n:
            done.set_result(time.perf_counter())

    async def main() -> float:
        call_later = loop.call_later
        t0 = time.perf_counter()
        for d in delays:
            call_later(d, cb)
        return (await done) - t0

    secs = loop.run_until_complete(main())
    assert fired == n
    return n, secs


def bench_dart_timer(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """Same as call_later, with dartloop.Timer (dartloop only)."""
    delays = _delays(n)
    fired = 0
    done = loop.create_future()
    Timer = dartloop.Timer

    def cb() -> None:
        nonlocal fired
        fired += 1
        if fired == n:
            done.set_result(time.perf_counter())

    async def main() -> float:
        t0 = time.perf_counter()
        for d in delays:
            Timer(d, cb)
        return (await done) - t0

    secs = loop.run_until_complete(main())
    assert fired == n
    return n, secs


def bench_future_pingpong(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """Two tasks wake each other through futures, n round trips."""
    box = [loop.create_future(), loop.create_future()]  # [ping's, pong's]
    create_future = loop.create_future

    async def ping() -> None:
        for i in range(n):
            box[0] = mine = create_future()
            box[1].set_result(i)
            await mine

    async def pong() -> None:
        for _ in range(n):
            v = await box[1]
            box[1] = create_future()
            box[0].set_result(v)

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(pong(), ping())
        return time.perf_counter() - t0

    return n, loop.run_until_complete(main())


def bench_sleep0(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """One task doing ``await asyncio.sleep(0)`` n times."""

    async def main() -> float:
        sleep = asyncio.sleep
        t0 = time.perf_counter()
        for _ in range(n):
            await sleep(0)
        return time.perf_counter() - t0

    return n, loop.run_until_complete(main())


MESSAGE = b"x" * 64


def bench_tcp_streams(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """Streams echo over 127.0.0.1: one client, n round trips of 64 bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def main() -> float:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            size = len(MESSAGE)
            t0 = time.perf_counter()
            for _ in range(n):
                writer.write(MESSAGE)
                await reader.readexactly(size)
            t1 = time.perf_counter()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return t1 - t0
        finally:
            server.close()
            await server.wait_closed()

    return n, loop.run_until_complete(asyncio.wait_for(main(), TCP_TIMEOUT))


class _EchoServer(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _EchoClient(asyncio.Protocol):
    def __init__(self, n: int, done: asyncio.Future[float]) -> None:
        self.left = n
        self.done = done
        self.got = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got < len(MESSAGE):
            return
        self.got = 0
        self.left -= 1
        if self.left:
            self.transport.write(MESSAGE)
        elif not self.done.done():
            self.done.set_result(time.perf_counter())


def bench_tcp_protocol(loop: asyncio.AbstractEventLoop, c: Contender, n: int) -> tuple[int, float]:
    """Protocol echo over 127.0.0.1: one client, n round trips of 64 bytes."""

    async def main() -> float:
        server = await loop.create_server(_EchoServer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            done: asyncio.Future[float] = loop.create_future()
            transport, _ = await loop.create_connection(lambda: _EchoClient(n, done), "127.0.0.1", port)
            t0 = time.perf_counter()
            transport.write(MESSAGE)
            t1 = await done
            transport.close()
            return t1 - t0
        finally:
            server.close()
            await server.wait_closed()

    return n, loop.run_until_complete(asyncio.wait_for(main(), TCP_TIMEOUT))


@dataclass
class Bench:
    key: str
    title: str
    unit: str
    func: Callable[..., tuple[int, float]]
    full: int
    quick: int
    dart_only: bool = False
    reference: bool = False  # also run the bare deque drain
    target: str = ""  # what the issue asks of dartloop here


BENCHES = [
    Bench("call_soon_chain", "call_soon chain", "events/s", bench_call_soon_chain, 100_000, 20_000, target="events"),
    Bench("call_soon_fanout", "call_soon fan-out x1000", "events/s", bench_call_soon_fanout, 200_000, 40_000, target="events"),
    Bench("microtask_chain", "microtask chain", "microtasks/s", bench_microtask_chain, 1_000_000, 200_000, dart_only=True, reference=True, target="microtasks"),
    Bench("microtask_burst", "microtask burst (1 event)", "microtasks/s", bench_microtask_burst, 1_000_000, 200_000, dart_only=True, reference=True, target="microtasks"),
    Bench("call_later", "call_later 10k (0-2 ms)", "timers/s", bench_call_later, 10_000, 10_000, target="timers"),
    Bench("dart_timer", "dartloop.Timer 10k (0-2 ms)", "timers/s", bench_dart_timer, 10_000, 10_000, dart_only=True),
    Bench("future_pingpong", "future ping-pong (2 tasks)", "round trips/s", bench_future_pingpong, 50_000, 10_000, target="futures"),
    Bench("sleep0", "await asyncio.sleep(0)", "iterations/s", bench_sleep0, 50_000, 10_000, target="futures"),
    Bench("tcp_streams", "TCP echo, streams (64 B)", "round trips/s", bench_tcp_streams, 10_000, 2_000, target="tcp"),
    Bench("tcp_protocol", "TCP echo, protocols (64 B)", "round trips/s", bench_tcp_protocol, 20_000, 4_000, target="tcp"),
]


# ---------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------


@dataclass
class Samples:
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, bench: str, contender: str, value: float) -> None:
        self.values.setdefault((bench, contender), []).append(value)

    def median(self, bench: str, contender: str) -> float | None:
        v = self.values.get((bench, contender))
        return statistics.median(v) if v else None

    def ratio(self, bench: str, a: str, b: str) -> float | None:
        """Median over rounds of a / b, each pair measured in the same round."""
        va, vb = self.values.get((bench, a)), self.values.get((bench, b))
        if not va or not vb or len(va) != len(vb):
            return None
        return statistics.median(x / y for x, y in zip(va, vb))


def applies(b: Bench, c: Contender) -> bool:
    if c.reference:
        return b.reference
    if b.dart_only:
        return c.dart
    return True


def measure(b: Bench, c: Contender, n: int) -> float:
    gc.collect()
    if c.reference:
        count, secs = b.func(None, c, n)
        return count / secs
    assert c.factory is not None
    loop = c.factory()
    try:
        asyncio.set_event_loop(loop)
        count, secs = b.func(loop, c, n)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return count / secs


def rotated(items: list[Any], r: int) -> list[Any]:
    k = r % len(items)
    out = items[k:] + items[:k]
    return out[::-1] if r % 2 else out


def round_order(contenders: list[Contender], r: int) -> list[Contender]:
    """Contenders grouped by backend (so compared ones run back to back), rotated."""
    groups: dict[str, list[Contender]] = {}
    for c in contenders:
        family = "asyncio" if "asyncio" in c.name else "uvloop" if "uvloop" in c.name else c.name
        groups.setdefault(family, []).append(c)
    return [c for g in rotated(list(groups.values()), r) for c in rotated(g, r)]


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def print_table(benches: list[Bench], contenders: list[Contender], s: Samples, out: Any = sys.stdout) -> None:
    names = [c.name for c in contenders]
    ratio_pairs = []
    for dname, base in (("dartloop(asyncio)", "asyncio"), ("dartloop(uvloop)", "uvloop")):
        for name in names:
            if name.startswith(dname) and base in names:
                ratio_pairs.append((name, base))
    headers = ["benchmark", "unit"] + names + [f"{a.replace('dartloop', 'd')}/{b}" for a, b in ratio_pairs]
    rows = []
    for b in benches:
        row = [b.title, b.unit]
        for c in contenders:
            row.append(fmt_rate(s.median(b.key, c.name)) if applies(b, c) else "")
        for a, base in ratio_pairs:
            if b.dart_only:
                ref = "deque drain (ref)"
                row.append(fmt_ratio(s.ratio(b.key, a, ref)) + " of ref" if b.reference else "")
            else:
                row.append(fmt_ratio(s.ratio(b.key, a, base)))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = " | ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for r in rows:
        print(" | ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))), file=out)


def targets(benches: list[Bench], contenders: list[Contender], s: Samples) -> list[str]:
    """The issue's targets, checked against the medians of this run."""
    names = {c.name for c in contenders}
    lines = []
    for dname, base, goal in (("dartloop(asyncio)", "asyncio", 1.0), ("dartloop(uvloop)", "uvloop", 0.95)):
        if dname not in names or base not in names:
            continue
        for b in benches:
            if b.dart_only or b.target not in ("events", "futures", "timers", "tcp"):
                continue
            ratio = s.ratio(b.key, dname, base)
            if ratio is None:
                continue
            verdict = "ok" if ratio >= goal else f"missed by {(goal - ratio) * 100:.1f} points"
            lines.append(f"{dname} / {base} on {b.title}: {ratio:.3f}x (target >= {goal:.2f}x) {verdict}")
    for c in contenders:
        if not c.dart:
            continue
        m = s.median("microtask_chain", c.name)
        if m is not None:
            verdict = "ok" if m >= 5e6 else f"missed ({m / 5e6:.2f} of the target)"
            ref = s.ratio("microtask_chain", c.name, "deque drain (ref)")
            vs_ref = f", {ref:.2f}x the bare deque drain" if ref else ""
            lines.append(f"{c.name} microtask chain: {m / 1e6:.2f} M/s{vs_ref} (target >= 5 M/s on 3.11) {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 7, --quick 3)")
    p.add_argument("--pure", action="store_true", help="also run dartloop without its C accelerator")
    p.add_argument("--only", default="", help="comma-separated benchmark keys to run")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/loop-pyXY[-pure][-quick].json)")
    args = p.parse_args(argv)

    rounds = args.rounds or (3 if args.quick else 7)
    benches = [b for b in BENCHES if not args.only or b.key in args.only.split(",")]
    contenders = make_contenders(args.pure)
    size = {b.key: (b.quick if args.quick else b.full) for b in benches}
    speedups = getattr(dl_loop, "SPEEDUPS", None)
    info = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "uvloop": getattr(uvloop, "__version__", None),
        "dartloop": dartloop.__version__,
        "speedups": speedups is not None,
        "quick": args.quick,
        "rounds": rounds,
        "sizes": size,
        "contenders": [c.name for c in contenders],
    }
    print(
        f"Python {info['python']}, uvloop {info['uvloop']}, dartloop accelerator "
        f"{'on' if info['speedups'] else 'off'}; {rounds} rounds + 1 warm-up; {os.cpu_count()} CPUs",
        flush=True,
    )

    samples = Samples()
    t_start = time.perf_counter()
    for r in range(-1, rounds):  # round -1 is the warm-up, at a tenth of the size
        for b in benches:
            n = size[b.key] if r >= 0 else max(1000, size[b.key] // 10)
            for c in round_order([c for c in contenders if applies(b, c)], max(r, 0)):
                rate = measure(b, c, n)
                if r >= 0:
                    samples.add(b.key, c.name, rate)
        print(f"  round {r + 1 if r >= 0 else 'warm-up'} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    print()
    print_table(benches, contenders, samples)
    print()
    for line in targets(benches, contenders, samples):
        print(line)

    tags = ("" if speedups is not None else "-pure") + ("-quick" if args.quick else "")
    path = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / (
        f"loop-py{sys.version_info[0]}{sys.version_info[1]}{tags}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "info": info,
        "medians": {
            b.key: {c.name: samples.median(b.key, c.name) for c in contenders if applies(b, c)} for b in benches
        },
        "units": {b.key: b.unit for b in benches},
        "ratios": {
            b.key: {
                f"{a}/{base}": s_ratio
                for a in (c.name for c in contenders if c.dart)
                for base in ("asyncio", "uvloop", "deque drain (ref)")
                if (base in a or base.startswith("deque"))
                and (s_ratio := samples.ratio(b.key, a, base)) is not None
            }
            for b in benches
        },
        "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.values.items()},
        "targets": targets(benches, contenders, samples),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
