"""Isolates (placeholder: root isolate state only; completed in the isolate work)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from ._loop import DartEventLoop


class _IsolateState:
    spawned = False

    def __init__(self, loop: DartEventLoop) -> None:
        self.loop = loop
        self.paused = False
        self._held: collections.deque[Callable[[], None]] = collections.deque()

    def hold(self, event: Callable[[], None]) -> None:
        self._held.append(event)

    def uncaught(self, exc: BaseException) -> None:
        raise NotImplementedError

    def idle(self) -> None:
        raise NotImplementedError

    def loop_closed(self) -> None:
        pass


def _attach_root(loop: DartEventLoop) -> Any:
    loop._isolate = _IsolateState(loop)
    return loop._isolate
