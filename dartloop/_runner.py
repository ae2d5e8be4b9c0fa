"""Ways in: ``run``, ``EventLoopPolicy``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._loop import DartEventLoop, new_event_loop

__all__ = ["run", "EventLoopPolicy"]

T = TypeVar("T")


def run(
    main: Coroutine[Any, Any, T],
    *,
    backend: str | None = None,
    strict: bool = False,
    debug: bool | None = None,
) -> T:
    """Run coroutine ``main`` on a new dartloop loop and return its result.

    Like ``asyncio.run(main)``: the loop is the root isolate of this thread;
    when ``main`` returns, remaining tasks are cancelled, async generators and
    the default executor are shut down, and the loop is closed.

    Raises ``RuntimeError`` if an event loop is already running in this
    thread, ``ValueError`` for a ``main`` that is not a coroutine.
    """
    if asyncio.events._get_running_loop() is not None:
        # Checked first, as asyncio.run does: a Runner would make a loop it
        # then can't close.
        raise RuntimeError("dartloop.run() cannot be called from a running event loop")
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    factory = functools.partial(new_event_loop, backend=backend, strict=strict)
    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose loops are dartloop loops.

    For applications that configure asyncio with
    ``asyncio.set_event_loop_policy(dartloop.EventLoopPolicy())``. Policies are
    deprecated from Python 3.14 on; there this follows asyncio's deprecation.
    """

    def __init__(self, *, backend: str | None = None, strict: bool = False) -> None:
        super().__init__()
        # Fail now, not at the first new_event_loop(), on a bad backend.
        new_event_loop(backend=backend, strict=strict).close()
        self._backend = backend
        self._strict = strict

    def new_event_loop(self) -> DartEventLoop:
        return new_event_loop(backend=self._backend, strict=self._strict)
