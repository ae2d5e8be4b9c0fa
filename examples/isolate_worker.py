"""A long-lived worker isolate answering requests, with reply ports and a clean shutdown.

Run it with ``python examples/isolate_worker.py`` (``--backend asyncio|uvloop``).
Exits 0 in well under a second.

The pattern (Dart's "long-lived isolate" pattern):

* The worker's entry point opens a ``ReceivePort`` and sends its ``SendPort``
  back to the spawner: that is the worker's address.
* Every request carries its own reply port: ``(command, argument, reply)``.
  The client makes a fresh ``ReceivePort`` per request and awaits
  ``reply_port.first()``; many requests can be in flight at once.
* Errors travel as values: the worker answers ``("error", text)`` and keeps
  serving; the client turns that into an exception.
* Shutdown: the client sends ``None``. The worker closes its port, so nothing
  keeps its isolate alive any more, and it ends; the exit notification
  (``on_exit``) is its last act, so once it arrives every reply has too.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from typing import Any

import dartloop
from dartloop import Isolate, ReceivePort, SendPort


class WorkerError(Exception):
    pass


async def worker_main(client: SendPort) -> None:
    """The worker isolate's entry point."""
    requests = ReceivePort(debug_name="worker requests")
    client.send(requests.send_port)
    state: dict[str, Any] = {"served": 0}
    async for request in requests:  # ends when the port is closed
        if request is None:
            requests.close()
            break
        command, argument, reply = request
        state["served"] += 1
        try:
            if command == "square":
                reply.send(("ok", argument * argument))
            elif command == "slow_sum":
                # An async handler: other requests are still queued meanwhile,
                # and are served in order once this one is done.
                await asyncio.sleep(0.01)
                reply.send(("ok", sum(argument)))
            elif command == "stats":
                reply.send(("ok", {"served": state["served"], "thread": threading.current_thread().name}))
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as exc:
            reply.send(("error", f"{type(exc).__name__}: {exc}"))
    # Returning here with the port closed: no event can come, the isolate ends.


class WorkerClient:
    """The spawner's side: ``await client.ask(command, argument)``."""

    def __init__(self, isolate: Isolate, address: SendPort, exited: ReceivePort) -> None:
        self.isolate = isolate
        self.address = address
        self._exited = exited

    @classmethod
    async def start(cls) -> WorkerClient:
        hello = ReceivePort()
        exited = ReceivePort()
        isolate = await Isolate.spawn(worker_main, hello.send_port, on_exit=exited.send_port, debug_name="worker")
        address = await hello.first()
        return cls(isolate, address, exited)

    async def ask(self, command: str, argument: Any = None) -> Any:
        reply = ReceivePort()
        self.address.send((command, argument, reply.send_port))
        status, value = await reply.first()
        if status == "error":
            raise WorkerError(value)
        return value

    async def shutdown(self) -> None:
        self.address.send(None)
        await self._exited.first()  # its last act: every reply has arrived before this


async def main() -> None:
    worker = await WorkerClient.start()
    print(f"worker isolate {worker.isolate.debug_name!r} is up")

    print("square(12) =", await worker.ask("square", 12))

    # Several requests in flight at once; each has its own reply port.
    results = await asyncio.gather(
        worker.ask("slow_sum", [1, 2, 3]),
        worker.ask("square", 7),
        worker.ask("slow_sum", list(range(100))),
    )
    print("concurrent requests ->", results)

    try:
        await worker.ask("divide", 1)
    except WorkerError as exc:
        print("error answered as a value:", exc)

    stats = await worker.ask("stats")
    print(f"worker served {stats['served']} requests on thread {stats['thread']!r}")

    await worker.shutdown()
    print("worker shut down cleanly: its exit notification arrived after every reply")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A long-lived worker isolate.")
    parser.add_argument("--backend", choices=dartloop.available_backends(), default=None)
    args = parser.parse_args()
    dartloop.run(main(), backend=args.backend)
