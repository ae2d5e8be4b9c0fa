"""Dart's future constructors and ``Completer``, on ``asyncio.Future``.

Each function returns a plain ``asyncio.Future`` of the running dartloop
loop. Where Dart completes a future in a microtask or an event, so does
dartloop; what differs is when *listeners* run: asyncio schedules a future's
done callbacks (and so every ``await`` resumption) with ``call_soon``, which
is an event by default and a microtask with ``strict=True``. ``computation``
may be a plain function or an ``async`` one; an ``async`` computation runs as
a task, which starts in a later event (as ``create_task`` does).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ._microtasks import running_dart_loop
from ._timers import Timer, check_duration

__all__ = [
    "Completer",
    "future",
    "future_microtask",
    "future_delayed",
    "future_value",
    "future_sync",
]

T = TypeVar("T")


def _settle(fut: asyncio.Future[Any], value: object) -> None:
    """Complete ``fut`` with ``value``, following it if it is awaitable."""
    if fut.done():  # cancelled by a consumer meanwhile
        return
    if isinstance(value, asyncio.Future) or inspect.isawaitable(value):
        loop = fut.get_loop()
        source = asyncio.ensure_future(value, loop=loop)  # type: ignore[arg-type]
        _chain(source, fut)
    else:
        fut.set_result(value)


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    def copy(src: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if src.cancelled():
            target.cancel()
        elif (exc := src.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(src.result())

    source.add_done_callback(copy)

    def cancel_source(tgt: asyncio.Future[Any]) -> None:
        if tgt.cancelled() and not source.done():
            source.cancel()

    target.add_done_callback(cancel_source)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _run_into(fut: asyncio.Future[Any], computation: Callable[[], object]) -> None:
    if fut.done():
        return
    try:
        value = computation()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        fut.set_exception(exc)
        return
    _settle(fut, value)


def _check_computation(computation: object, what: str) -> None:
    if not callable(computation):
        raise TypeError(f"{what}: computation must be callable, got {type(computation).__name__} {computation!r}")


def _check_exception(exc: object, what: str) -> BaseException:
    if isinstance(exc, type) and issubclass(exc, BaseException):
        return exc()
    if not isinstance(exc, BaseException):
        raise TypeError(f"{what}: expected an exception, got {type(exc).__name__} {exc!r}")
    return exc


class Completer(Generic[T]):
    """Dart's ``Completer``: a future plus the means to complete it.

    ``Completer()`` completes its future one microtask after ``complete()``
    (Dart's default); ``Completer(sync=True)`` completes it inside
    ``complete()``. Completing twice raises ``RuntimeError`` ("Future already
    completed", Dart's ``StateError``). Completing with an awaitable makes the
    future follow it. If a consumer cancelled the future, completing it is a
    no-op.

    Thread: the loop's thread only. Raises ``RuntimeError`` without a running
    dartloop loop in this thread.
    """

    __slots__ = ("future", "_sync", "_completed")
    __dartloop_unsendable__ = True

    def __init__(self, *, sync: bool = False) -> None:
        loop = running_dart_loop("Completer()")
        self.future: asyncio.Future[T] = loop.create_future()
        self._sync = bool(sync)
        self._completed = False

    @property
    def is_completed(self) -> bool:
        """True once ``complete`` or ``complete_error`` has been called."""
        return self._completed

    def _claim(self, what: str) -> None:
        if self._completed:
            raise RuntimeError(f"{what}: Future already completed")
        self._completed = True

    def complete(self, value: T | Awaitable[T] | None = None) -> None:
        """Complete the future with ``value`` (or with the outcome of an awaitable)."""
        self._claim("Completer.complete()")
        if self._sync:
            _settle(self.future, value)
        else:
            self.future.get_loop()._schedule_microtask(_settle, self.future, value)  # type: ignore[attr-defined]

    def complete_error(self, exc: BaseException | type[BaseException]) -> None:
        """Complete the future with the exception ``exc``."""
        error = _check_exception(exc, "Completer.complete_error()")
        self._claim("Completer.complete_error()")
        if self._sync:
            _fail(self.future, error)
        else:
            self.future.get_loop()._schedule_microtask(_fail, self.future, error)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        kind = "sync " if self._sync else ""
        return f"<dartloop.Completer {kind}completed={self._completed} future={self.future!r}>"


def future(computation: Callable[[], T | Awaitable[T]]) -> asyncio.Future[T]:
    """Dart's ``Future(computation)``: run ``computation`` in a later event.

    The event is queued like ``Timer.run`` (FIFO with ``call_soon``). The
    future completes with its result or exception.
    """
    _check_computation(computation, "future()")
    loop = running_dart_loop("future()")
    fut: asyncio.Future[T] = loop.create_future()
    Timer.run(lambda: _run_into(fut, computation))
    return fut


def future_microtask(computation: Callable[[], T | Awaitable[T]]) -> asyncio.Future[T]:
    """Dart's ``Future.microtask``: run ``computation`` as a microtask."""
    _check_computation(computation, "future_microtask()")
    loop = running_dart_loop("future_microtask()")
    fut: asyncio.Future[T] = loop.create_future()
    loop._schedule_microtask(_run_into, fut, computation)
    return fut


def future_delayed(duration: float, computation: Callable[[], T | Awaitable[T]] | None = None) -> asyncio.Future[T | None]:
    """Dart's ``Future.delayed``: after ``duration`` seconds (a ``Timer``), run
    ``computation`` (if any) and complete with its result, else with ``None``."""
    d = check_duration(duration, "future_delayed()")
    if computation is not None:
        _check_computation(computation, "future_delayed()")
    loop = running_dart_loop("future_delayed()")
    fut: asyncio.Future[Any] = loop.create_future()
    if computation is None:
        Timer(d, lambda: None if fut.done() else fut.set_result(None))
    else:
        Timer(d, lambda: _run_into(fut, computation))
    return fut


def future_value(value: T | Awaitable[T] | None = None) -> asyncio.Future[T]:
    """Dart's ``Future.value``: completes with ``value`` in a microtask queued now.

    An awaitable ``value`` is followed instead.
    """
    loop = running_dart_loop("future_value()")
    fut: asyncio.Future[T] = loop.create_future()
    loop._schedule_microtask(_settle, fut, value)
    return fut


def future_sync(computation: Callable[[], T | Awaitable[T]]) -> asyncio.Future[T]:
    """Dart's ``Future.sync``: run ``computation`` now, in the caller.

    The returned future is already done when ``computation`` returns a plain
    value or raises (so awaiting it costs no hop); an awaitable result is
    followed.
    """
    _check_computation(computation, "future_sync()")
    loop = running_dart_loop("future_sync()")
    fut: asyncio.Future[T] = loop.create_future()
    _run_into(fut, computation)
    return fut
