"""Cost of one cross-thread port message, split into its two halves.

    python benchmarks/bench_port_send.py [--backend asyncio|uvloop] [--rounds 15]

* send: ``SendPort.send`` from a plain thread while the receiving isolate is
  blocked inside an event, so that nothing but the sends runs; the pure
  method (``SendPort._send_py``) and the selected one (the C twin when
  dartloop's accelerator is present) side by side, minimum of the rounds.
* drain: the receiving isolate dispatching that burst (``_drain_inbox``: one
  Dart turn per message, a counting handler), minimum of the rounds. The
  drain is the loop's: the C one on an accelerated loop, the pure one with
  ``DARTLOOP_NO_EXTENSIONS=1``.

Numbers are ns per message; the loop overhead of the sending ``for`` loop
is printed too and included in "send".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dartloop  # noqa: E402
from dartloop import RawReceivePort, SendPort  # noqa: E402
from dartloop._loop import SPEEDUPS  # noqa: E402

N = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="asyncio", choices=dartloop.available_backends())
    parser.add_argument("--rounds", type=int, default=15)
    opts = parser.parse_args()

    blocked = threading.Event()
    release = threading.Event()
    finished = threading.Event()
    box: dict[str, Any] = {"drain": []}

    def owner() -> None:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            count = 0
            started = 0.0

            def handler(m: int) -> None:
                nonlocal count
                count += 1
                if count == N:
                    box["drain"].append(time.perf_counter() - started)
                    loop.call_soon(block)  # ready for the next round

            def block() -> None:
                # One event: the burst is sent meanwhile; it is drained after.
                nonlocal count, started
                blocked.set()
                release.wait()
                release.clear()
                if finished.is_set():
                    return
                count = 0
                started = time.perf_counter()

            port = RawReceivePort(handler)
            box["port"] = port.send_port
            box["inbox"] = loop._isolate.inbox  # type: ignore[union-attr]
            loop.call_soon(block)
            await loop.run_in_executor(None, finished.wait)
            port.close()

        dartloop.run(run(), backend=opts.backend)

    thread = threading.Thread(target=owner)
    thread.start()
    blocked.wait()
    port = box["port"]

    def burst(send: Any, n: int = N) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            send(port, i)
        return time.perf_counter() - t0

    def empty(n: int = N) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t0

    pure: list[float] = []
    selected: list[float] = []
    loop_overhead: list[float] = []
    for _ in range(opts.rounds):
        # The pure send's burst is thrown away undrained; the selected one's
        # is drained by the loop (timed by the owner thread).
        pure.append(burst(SendPort._send_py))
        box["inbox"].clear()
        selected.append(burst(SendPort.send))
        blocked.clear()
        release.set()
        blocked.wait()  # drained, and the owner is blocked again
        loop_overhead.append(empty())
    finished.set()
    release.set()
    thread.join()

    def ns(values: list[float]) -> float:
        return 1e9 * min(values) / N

    which = "C" if SPEEDUPS is not None else "pure, no accelerator"
    print(f"Python {sys.version.split()[0]}, backend {opts.backend}, {N} messages a round, min of {opts.rounds} rounds")
    rows = [
        ("for-loop overhead", loop_overhead),
        ("send, pure (SendPort._send_py)", pure),
        (f"send, selected ({which})", selected),
        ("drain, the loop's", box["drain"]),
    ]
    for label, values in rows:
        print(f"  {label:<40} {ns(values):6.0f} ns")

if __name__ == "__main__":
    main()
