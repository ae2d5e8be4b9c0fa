"""Two isolates playing ping-pong over ports.

Run it with ``python examples/isolate_ping_pong.py`` (``--backend asyncio|uvloop``
to pick a backend, ``--rounds N`` for a longer rally). The root isolate
spawns a "pong" isolate on its own thread, they exchange messages through
``SendPort``s, and the pong isolate ends on its own once its port is closed:
the exit notification arrives last, after every reply. Prints the rally and
the median round trip, and exits 0.

The Dart program it mirrors::

    void pong(SendPort ping) {
      final port = ReceivePort();
      ping.send(port.sendPort);
      port.listen((msg) {
        if (msg == null) { port.close(); return; }   // the isolate then ends
        ping.send(['pong', msg[1]]);
      });
    }

    Future<void> main() async {
      final port = ReceivePort(), exit = ReceivePort();
      await Isolate.spawn(pong, port.sendPort, onExit: exit.sendPort);
      ...
    }
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

import dartloop
from dartloop import Isolate, ReceivePort, SendPort


def pong(ping: SendPort) -> None:
    """The pong isolate's entry point: answer every ball, stop on ``None``."""
    port = ReceivePort()
    ping.send(port.send_port)

    def on_ball(msg: Any) -> None:
        if msg is None:
            port.close()  # nothing keeps this isolate alive any more: it ends
            return
        kind, n = msg
        ping.send(("pong", n, threading.current_thread().name))

    port.listen(on_ball)


async def main(rounds: int) -> None:
    me = Isolate.current
    print(f"root isolate {me.debug_name!r} on thread {threading.current_thread().name!r}")
    replies = ReceivePort()
    exited = ReceivePort()
    await Isolate.spawn(pong, replies.send_port, on_exit=exited.send_port, debug_name="pong")

    it = aiter(replies)
    pong_port: SendPort = await anext(it)  # the first message is pong's SendPort
    times = []
    for n in range(rounds):
        t0 = time.perf_counter()
        pong_port.send(("ping", n))
        kind, got, thread_name = await anext(it)
        times.append(time.perf_counter() - t0)
        assert (kind, got) == ("pong", n)
        if n < 3 or n == rounds - 1:
            print(f"  ping {n} -> {kind} {got} (answered on thread {thread_name!r})")
        elif n == 3:
            print("  ...")
    pong_port.send(None)  # game over: pong closes its port and its isolate ends
    await exited.first()  # the exit notification: the pong isolate's last act
    replies.close()
    print(f"{rounds} round trips, median {statistics.median(times) * 1e6:.0f} µs; the pong isolate has ended")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Two isolates playing ping-pong.")
    parser.add_argument("--backend", choices=dartloop.available_backends(), default=None)
    parser.add_argument("--rounds", type=int, default=1000)
    args = parser.parse_args()
    dartloop.run(main(args.rounds), backend=args.backend)
