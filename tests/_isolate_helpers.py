"""Helpers shared by the port and isolate tests (not a test module).

Everything here waits for events; nothing sleeps. A test that never gets the
message it waits for is stopped by pytest-timeout.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from dartloop import RawReceivePort, SendPort


class Inbox:
    """A ``RawReceivePort`` that records what it gets and can be awaited.

    Must be made on the isolate's thread, inside a running dartloop loop.
    """

    def __init__(self, debug_name: str | None = None) -> None:
        self.messages: list[Any] = []
        self._read = 0  # how many messages next() and wait_for() have returned
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._loop = asyncio.get_running_loop()
        self.port = RawReceivePort(self._on_message, debug_name=debug_name)

    @property
    def send_port(self) -> SendPort:
        return self.port.send_port

    def _on_message(self, message: Any) -> None:
        self.messages.append(message)
        count = len(self.messages)
        keep = []
        for want, fut in self._waiters:
            if count >= want:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((want, fut))
        self._waiters = keep

    async def wait_for(self, count: int) -> list[Any]:
        """Wait until ``count`` messages have arrived in all; return them all.

        The messages returned count as read (see :meth:`next`).
        """
        if len(self.messages) < count:
            fut = self._loop.create_future()
            self._waiters.append((count, fut))
            await fut
        self._read = max(self._read, count)
        return list(self.messages)

    async def next(self) -> Any:
        """The next message not read yet (waiting for it if need be)."""
        n = self._read + 1
        await self.wait_for(n)
        return self.messages[n - 1]

    def close(self) -> None:
        self.port.close()


async def turns(n: int = 3) -> None:
    """Let the loop run ``n`` more iterations (single-thread ordering only)."""
    for _ in range(n):
        await asyncio.sleep(0)


def isolate_threads(debug_name: str) -> list[threading.Thread]:
    """The threads of spawned isolates named ``debug_name``."""
    name = f"dartloop-isolate-{debug_name}"
    return [t for t in threading.enumerate() if t.name == name]


def join_isolate_threads(debug_name: str) -> None:
    """Join the (ending) threads of isolates named ``debug_name``."""
    for t in isolate_threads(debug_name):
        t.join()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
