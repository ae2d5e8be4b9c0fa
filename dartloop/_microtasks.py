"""``schedule_microtask`` and the running-loop lookup shared by the Dart API."""

from __future__ import annotations

from asyncio.events import _get_running_loop
from collections.abc import Callable
from typing import Any

from . import _loop
from ._loop import DartEventLoop

__all__ = ["schedule_microtask", "running_dart_loop"]


def _no_loop(what: str, loop: object) -> RuntimeError:
    if loop is None:
        why = "there is no running event loop in this thread"
    else:
        why = f"the running loop is a {type(loop).__module__}.{type(loop).__qualname__}, not a dartloop loop"
    return RuntimeError(
        f"{what} needs a running dartloop event loop in the calling thread, but {why} "
        "(start one with dartloop.run(main()) or asyncio.run(main(), loop_factory=dartloop.new_event_loop))"
    )


def running_dart_loop(what: str) -> DartEventLoop:
    """The dartloop loop running in this thread, or ``RuntimeError`` naming ``what``."""
    loop = _get_running_loop()
    if not isinstance(loop, DartEventLoop):
        raise _no_loop(what, loop)
    return loop


def schedule_microtask(callback: Callable[..., object], *args: Any) -> None:
    """Queue ``callback(*args)`` to run in the current turn's microtask drain.

    Dart's ``scheduleMicrotask``. Microtasks run in FIFO order after the
    event that is running now (or after the microtask that is running now and
    every microtask queued before this one), before any other event, timer or
    I/O poll. A microtask that keeps scheduling microtasks starves the loop,
    as in Dart.

    Thread: the loop's own thread only (use ``SendPort.send`` or
    ``loop.call_soon_threadsafe`` from other threads).

    Raises ``RuntimeError`` with no running dartloop loop in this thread and
    ``TypeError`` if ``callback`` is not callable.
    """
    loop = _get_running_loop()
    try:
        append = loop._mt_append  # type: ignore[union-attr]
    except AttributeError:
        raise _no_loop("schedule_microtask()", loop) from None
    if not callable(callback):
        raise TypeError(f"schedule_microtask() needs a callable, got {type(callback).__name__} {callback!r}")
    append((callback, args))


# The pure function above is the reference; the C accelerator's is the same
# without the Python frame (dartloop/_speedups.c). Chosen once, at import;
# the pure one stays reachable for tests and benchmarks.
_schedule_microtask_py = schedule_microtask
if _loop.SPEEDUPS is not None:
    schedule_microtask = _loop.SPEEDUPS.schedule_microtask  # noqa: F811
