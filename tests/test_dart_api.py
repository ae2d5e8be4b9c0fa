"""The Dart API: schedule_microtask, Timer, Completer and the future_* functions.

Async tests run on both dartloop backends. Ordering is checked with exact
event lists; nothing sleeps where an event can be awaited.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import fractions
import math
from collections.abc import Callable
from typing import Any

import pytest
from _loop_helpers import DART_BACKENDS, busy_wait, run_on

import dartloop
from dartloop import (
    Completer,
    Timer,
    future,
    future_delayed,
    future_microtask,
    future_sync,
    future_value,
    schedule_microtask,
)


def mt(log: list[Any], name: str) -> None:
    """Schedule a microtask that logs ``name``."""
    schedule_microtask(log.append, name)


# -- schedule_microtask --------------------------------------------------------


async def test_schedule_microtask_fifo_with_args() -> None:
    log: list[Any] = []
    schedule_microtask(log.append, 1)
    schedule_microtask(lambda *a: log.append(a), 2, 3)
    schedule_microtask(log.extend, [4, 5])
    assert log == []  # not run synchronously
    await asyncio.sleep(0)
    assert log == [1, (2, 3), 4, 5]


async def test_schedule_microtask_returns_none_and_runs_before_next_event() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    loop.call_soon(log.append, "event")
    assert schedule_microtask(log.append, "mt") is None
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done
    assert log == ["mt", "event"]


# -- Timer ------------------------------------------------------------------------


async def test_timer_run_is_fifo_with_call_soon() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    assert Timer.run(lambda: log.append("a")) is None
    loop.call_soon(log.append, "x")
    Timer.run(lambda: log.append("b"))
    loop.call_soon(done.set_result, None)
    await done
    assert log == ["a", "x", "b"]


async def test_zero_and_negative_timers_behave_like_timer_run() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    t0 = Timer(0, lambda: log.append("zero"))
    loop.call_soon(log.append, "x")
    tneg = Timer(-5, lambda: log.append("negative"))
    Timer.run(lambda: log.append("run"))
    Timer(0.0, lambda: log.append("zero float"))
    loop.call_soon(done.set_result, None)
    assert t0.is_active and tneg.is_active
    await done
    assert log == ["zero", "x", "negative", "run", "zero float"]
    assert not t0.is_active and not tneg.is_active
    assert (t0.tick, tneg.tick) == (1, 1)


def _fake_time(loop: asyncio.AbstractEventLoop, now: float) -> Callable[[], None]:
    """Freeze ``loop.time()`` at ``now`` (while timers are created); returns the undo."""
    real = loop.time
    loop.time = lambda: now  # type: ignore[method-assign]

    def undo() -> None:
        loop.time = real  # type: ignore[method-assign]

    return undo


async def test_timers_fire_by_deadline_then_creation() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    # Created in one event at one (frozen) instant: equal durations give
    # equal deadlines, which fire in creation order.
    undo = _fake_time(loop, loop.time())
    try:
        Timer(0.02, lambda: log.append("c 20ms"))
        Timer(0.01, lambda: log.append("a 10ms"))
        Timer(0.01, lambda: log.append("b 10ms"))
        Timer(0.02, lambda: log.append("d 20ms"))
        Timer(0.01, lambda: log.append("e 10ms"))
        Timer(0.03, lambda: done.set_result(None))
    finally:
        undo()
    await done
    assert log == ["a 10ms", "b 10ms", "e 10ms", "c 20ms", "d 20ms"]


async def test_microtasks_drained_between_timers_of_one_batch() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()

    def first() -> None:
        log.append("first")
        mt(log, "first.mt")
        loop.call_soon(log.append, "event queued by first")

    def second() -> None:
        log.append("second")
        mt(log, "second.mt")

    undo = _fake_time(loop, loop.time())
    try:
        Timer(0.005, first)
        Timer(0.005, second)  # same deadline: same batch
    finally:
        undo()
    Timer(0.02, lambda: done.set_result(None))
    await done
    assert log == ["first", "first.mt", "second", "second.mt", "event queued by first"]


async def test_timers_created_during_a_batch_never_join_it() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()

    def first() -> None:
        log.append("first")
        created = loop.time()
        # Both timers are created at one (frozen) instant. Without this the
        # clock could step between them (uvloop's clock has millisecond
        # steps), giving the heap timer the zero timer's deadline and an
        # earlier creation number: it would then rightly run first, as in
        # Dart's _queueFromZeroEvent.
        undo_inner = _fake_time(loop, created)
        try:
            Timer(0.001, lambda: (log.append("new heap timer"), done.set_result(None)))
            Timer.run(lambda: log.append("new zero timer"))
        finally:
            undo_inner()
        loop.call_soon(log.append, "event")
        # Make the new heap timer overdue before the batch ends.
        while loop.time() < created + 0.003:
            busy_wait(0.001)

    def second() -> None:
        log.append("second")

    undo = _fake_time(loop, loop.time())
    try:
        Timer(0.002, first)
        Timer(0.002, second)
    finally:
        undo()
    await done
    assert log == ["first", "second", "new zero timer", "event", "new heap timer"]


async def test_an_overdue_heap_timer_runs_before_a_later_zero_timer() -> None:
    # Dart's _queueFromZeroEvent: the event of a zero timer first runs every
    # heap timer ordered before it, so an overdue timer never waits behind a
    # zero timer created after its deadline, whichever event comes first.
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()

    def create() -> None:
        created = loop.time()
        Timer(0.001, lambda: log.append("heap, due first"))
        while loop.time() < created + 0.002:
            busy_wait(0.001)
        Timer.run(lambda: log.append("zero, created after that deadline"))
        Timer(0.01, lambda: done.set_result(None))

    loop.call_soon(create)
    await done
    assert log == ["heap, due first", "zero, created after that deadline"]


async def test_cancel_and_is_active() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    seen_inside: list[bool] = []

    t1 = Timer(0.001, lambda: seen_inside.append(t1.is_active))
    t2 = Timer(0.001, lambda: log.append("cancelled, never runs"))
    z = Timer(0, lambda: log.append("cancelled zero timer, never runs"))
    assert t1.is_active and t2.is_active and z.is_active
    assert (t1.tick, t2.tick) == (0, 0)
    t2.cancel()
    t2.cancel()  # idempotent
    z.cancel()
    assert not t2.is_active and not z.is_active
    Timer(0.01, lambda: done.set_result(None))
    await done
    assert seen_inside == [False]  # a one-shot is inactive inside its callback
    assert log == []
    assert not t1.is_active and t1.tick == 1
    assert t2.tick == 0
    t1.cancel()  # after firing: no effect
    assert "inactive" in repr(t1) and "Timer" in repr(t1)


async def test_earlier_timer_of_a_batch_cancels_a_later_one() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    timers: list[Timer] = []

    def first() -> None:
        log.append("first")
        timers[1].cancel()

    undo = _fake_time(loop, loop.time())
    try:
        timers.append(Timer(0.002, first))
        timers.append(Timer(0.002, lambda: log.append("second")))
        timers.append(Timer(0.002, lambda: log.append("third")))
    finally:
        undo()
    Timer(0.02, lambda: done.set_result(None))
    await done
    assert log == ["first", "third"]


async def test_timer_callback_returning_a_coroutine_runs_it() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    async def body() -> None:
        done.set_result("ran")

    Timer.run(body)
    assert await done == "ran"


async def test_periodic_zero_ticks_once_per_turn() -> None:
    loop = asyncio.get_running_loop()
    log: list[Any] = []
    done = loop.create_future()

    def tick(timer: Timer) -> None:
        log.append(timer.tick)
        loop.call_soon(log.append, f"event after tick {timer.tick}")
        if timer.tick == 3:
            timer.cancel()
            loop.call_soon(done.set_result, None)

    p = Timer.periodic(0, tick)
    assert p.is_active
    await done
    # The next tick's event is queued after the callback returns, so behind
    # the event the callback queued.
    assert log == [1, "event after tick 1", 2, "event after tick 2", 3, "event after tick 3"]
    assert not p.is_active


async def test_periodic_ticks_stay_active_and_cancel_inside() -> None:
    loop = asyncio.get_running_loop()
    ticks: list[tuple[int, bool]] = []
    done = loop.create_future()

    def tick(timer: Timer) -> None:
        ticks.append((timer.tick, timer.is_active))
        mt(ticks, "mt")  # type: ignore[arg-type]
        if len(ticks) == 5:
            timer.cancel()
            Timer(0.05, lambda: done.set_result(None))  # would see a 4th call

    Timer.periodic(0.02, tick)
    await done
    # (On a busy machine a late call skips ticks: tick may jump.)
    assert ticks[1::2] == ["mt", "mt", "mt"]
    numbers = [t for t, _ in ticks[::2]]
    assert numbers[0] >= 1 and numbers == sorted(set(numbers))
    assert all(active for _, active in ticks[::2])


async def test_periodic_missed_ticks_are_skipped() -> None:
    # Period 10 ms; the first callback blocks the loop for 55 ms, so the next
    # one is late by more than a period: the missed ticks get no callback and
    # tick jumps by at least 5. Only the arithmetic is asserted, which holds
    # however late a busy machine runs the callbacks: at every call, tick
    # periods have elapsed since creation, and fewer than tick + 1 plus the
    # time between the timer's clock read and the callback's.
    loop = asyncio.get_running_loop()
    period = 0.01
    seen: list[tuple[int, float]] = []
    done = loop.create_future()
    start = loop.time()

    def tick(timer: Timer) -> None:
        seen.append((timer.tick, loop.time() - start))
        if len(seen) == 1:
            busy_wait(0.055)
        elif len(seen) == 3:
            timer.cancel()
            done.set_result(None)

    undo = _fake_time(loop, start)  # created exactly at ``start``
    try:
        Timer.periodic(period, tick)
    finally:
        undo()
    await done
    ticks = [t for t, _ in seen]
    assert ticks[0] >= 1  # 1 unless the machine was slow to run it
    assert ticks[1] - ticks[0] >= 5
    assert ticks[2] > ticks[1]
    clock_step = 0.0015  # uvloop's clock moves in milliseconds
    for tick_no, elapsed in seen:
        assert tick_no * period <= elapsed + clock_step
        assert elapsed < (tick_no + 1) * period + clock_step + 0.005


# -- Completer ----------------------------------------------------------------------


async def test_completer_async_completes_one_microtask_later() -> None:
    log: list[Any] = []
    c: Completer[int] = Completer()
    assert not c.is_completed
    schedule_microtask(lambda: log.append(("before", c.future.done())))
    c.complete(42)
    assert c.is_completed
    assert not c.future.done()
    schedule_microtask(lambda: log.append(("after", c.future.done())))
    assert await c.future == 42
    assert log == [("before", False), ("after", True)]


async def test_completer_sync_completes_inside_complete() -> None:
    c: Completer[str] = Completer(sync=True)
    c.complete("now")
    assert c.future.done() and c.future.result() == "now"
    with pytest.raises(RuntimeError, match="Future already completed"):
        c.complete("again")
    with pytest.raises(RuntimeError, match="Future already completed"):
        c.complete_error(ValueError())


async def test_completer_errors() -> None:
    c: Completer[None] = Completer()
    c.complete_error(ValueError)  # a class is instantiated
    with pytest.raises(ValueError):
        await c.future
    s: Completer[None] = Completer(sync=True)
    err = KeyError("k")
    s.complete_error(err)
    assert s.future.exception() is err
    with pytest.raises(TypeError):
        Completer().complete_error("not an exception")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        s.complete(None)


async def test_completer_follows_an_awaitable() -> None:
    inner: Completer[int] = Completer()
    outer: Completer[int] = Completer()
    outer.complete(inner.future)
    await asyncio.sleep(0)
    assert not outer.future.done()
    inner.complete(7)
    assert await outer.future == 7

    async def coro() -> str:
        return "from coroutine"

    c: Completer[str] = Completer(sync=True)
    c.complete(coro())
    assert await c.future == "from coroutine"


async def test_completing_a_cancelled_future_is_a_no_op() -> None:
    c: Completer[int] = Completer(sync=True)
    c.future.cancel()
    c.complete(1)
    assert c.future.cancelled()


# -- future constructors ----------------------------------------------------------


async def test_future_runs_computation_in_a_later_event() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    loop.call_soon(log.append, "queued before")

    def computation() -> str:
        log.append("computation")
        return "value"

    f = future(computation)
    loop.call_soon(log.append, "queued after")
    mt(log, "microtask")
    assert isinstance(f, asyncio.Future) and not f.done()
    assert await f == "value"
    await asyncio.sleep(0)
    assert log == ["microtask", "queued before", "computation", "queued after"]


async def test_future_with_exception_and_async_computation() -> None:
    def fail() -> None:
        raise ValueError("computation failed")

    with pytest.raises(ValueError, match="computation failed"):
        await future(fail)

    async def acomp() -> int:
        await asyncio.sleep(0)
        return 5

    assert await future(acomp) == 5

    async def afail() -> None:
        raise KeyError("async")

    with pytest.raises(KeyError):
        await future(afail)


async def test_future_microtask() -> None:
    log: list[str] = []
    mt(log, "m1")
    f = future_microtask(lambda: log.append("computation") or "v")
    mt(log, "m2")
    assert not f.done()
    await asyncio.sleep(0)
    assert log == ["m1", "computation", "m2"]
    assert f.result() == "v"

    def fail() -> None:
        raise ValueError("x")

    g = future_microtask(fail)
    with pytest.raises(ValueError):
        await g


async def test_future_delayed() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await future_delayed(0.01) is None
    assert loop.time() - start >= 0.01 - 0.0015
    assert await future_delayed(0, lambda: "computed") == "computed"

    async def acomp() -> str:
        return "async computed"

    assert await future_delayed(0.001, acomp) == "async computed"
    with pytest.raises(ZeroDivisionError):
        await future_delayed(0, lambda: 1 / 0)


async def test_future_value() -> None:
    f = future_value(3)
    assert not f.done()
    await asyncio.sleep(0)
    assert f.result() == 3
    assert await future_value() is None
    c: Completer[str] = Completer()
    g = future_value(c.future)
    c.complete("followed")
    assert await g == "followed"


async def test_future_sync() -> None:
    log: list[str] = []
    f = future_sync(lambda: log.append("ran") or 9)
    assert log == ["ran"]
    assert f.done() and f.result() == 9

    def fail() -> None:
        raise OSError("sync failure")

    g = future_sync(fail)
    assert g.done() and isinstance(g.exception(), OSError)

    async def acomp() -> int:
        await asyncio.sleep(0)
        return 11

    h = future_sync(acomp)
    assert not h.done()
    assert await h == 11


# -- argument and context errors ----------------------------------------------------

ALL_CALLS: list[tuple[str, Callable[[], object]]] = [
    ("schedule_microtask()", lambda: schedule_microtask(print)),
    ("Timer()", lambda: Timer(1, print)),
    ("Timer.run()", lambda: Timer.run(print)),
    ("Timer.periodic()", lambda: Timer.periodic(1, print)),
    ("Completer()", lambda: Completer()),
    ("future()", lambda: future(print)),
    ("future_microtask()", lambda: future_microtask(print)),
    ("future_delayed()", lambda: future_delayed(1)),
    ("future_value()", lambda: future_value(1)),
    ("future_sync()", lambda: future_sync(print)),
]


@pytest.mark.parametrize(("name", "call"), ALL_CALLS, ids=[n for n, _ in ALL_CALLS])
def test_needs_a_running_loop(name: str, call: Callable[[], object]) -> None:
    with pytest.raises(RuntimeError, match=r"needs a running dartloop event loop.*no running event loop") as info:
        call()
    assert name in str(info.value)


@pytest.mark.parametrize(("name", "call"), ALL_CALLS, ids=[n for n, _ in ALL_CALLS])
def test_refuses_a_stock_asyncio_loop(name: str, call: Callable[[], object]) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="not a dartloop loop") as info:
            call()
        assert name in str(info.value)

    run_on(asyncio.new_event_loop, main)


NOT_CALLABLE: list[tuple[str, Callable[[], object]]] = [
    ("schedule_microtask", lambda: schedule_microtask(42)),  # type: ignore[arg-type]
    ("Timer", lambda: Timer(1, "nope")),  # type: ignore[arg-type]
    ("Timer.run", lambda: Timer.run(None)),  # type: ignore[arg-type]
    ("Timer.periodic", lambda: Timer.periodic(1, 3.5)),  # type: ignore[arg-type]
    ("future", lambda: future(1)),  # type: ignore[arg-type]
    ("future_microtask", lambda: future_microtask(1)),  # type: ignore[arg-type]
    ("future_delayed", lambda: future_delayed(1, 1)),  # type: ignore[arg-type]
    ("future_sync", lambda: future_sync(1)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("name", "call"), NOT_CALLABLE, ids=[n for n, _ in NOT_CALLABLE])
async def test_type_error_for_non_callables(name: str, call: Callable[[], object]) -> None:
    with pytest.raises(TypeError, match="callable") as info:
        call()
    assert name in str(info.value)


BAD_DURATIONS: list[tuple[object, type[Exception]]] = [
    (datetime.timedelta(seconds=1), TypeError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-math.inf, ValueError),
    ("1", TypeError),
    (True, TypeError),
    (None, TypeError),
    (1j, TypeError),
]


@pytest.mark.parametrize(("duration", "error"), BAD_DURATIONS, ids=repr)
async def test_bad_durations(duration: object, error: type[Exception]) -> None:
    for call, what in (
        (lambda: Timer(duration, print), "Timer()"),  # type: ignore[arg-type]
        (lambda: Timer.periodic(duration, print), "Timer.periodic()"),  # type: ignore[arg-type]
        (lambda: future_delayed(duration), "future_delayed()"),  # type: ignore[arg-type]
    ):
        with pytest.raises(error) as info:
            call()
        assert what in str(info.value)
    if isinstance(duration, datetime.timedelta):
        assert "total_seconds" in str(info.value)


async def test_other_real_durations_are_accepted() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    Timer(fractions.Fraction(1, 1000), lambda: None)
    with pytest.raises(TypeError, match="Decimal"):  # not numbers.Real
        Timer(decimal.Decimal("0.001"), lambda: None)
    Timer(0, lambda: done.set_result(None))
    await done


def test_new_event_loop_arguments() -> None:
    with pytest.raises(ValueError, match="unknown dartloop backend"):
        dartloop.new_event_loop(backend="tokio")
    with pytest.raises(TypeError, match="strict must be a bool"):
        dartloop.new_event_loop(strict=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dartloop.new_event_loop("asyncio")  # type: ignore[misc]
    assert dartloop.default_backend() == DART_BACKENDS[0]
    for backend in DART_BACKENDS:
        for strict in (False, True):
            loop = dartloop.new_event_loop(backend=backend, strict=strict)
            try:
                assert isinstance(loop, dartloop.DartEventLoop)
                assert isinstance(loop, asyncio.AbstractEventLoop)
                assert (loop.backend, loop.strict) == (backend, strict)
            finally:
                loop.close()
    default = dartloop.new_event_loop()
    try:
        assert default.backend == dartloop.default_backend()
        assert default.strict is False
    finally:
        default.close()
