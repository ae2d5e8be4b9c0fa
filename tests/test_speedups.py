"""The C accelerator (``dartloop._speedups``) behaves exactly like the pure path.

Every scenario runs on both backends, in both modes, once on loops built on
the pure-Python reference code (``dartloop._loop.SPEEDUPS = None`` while the
loop is created, and the pure ``schedule_microtask``) and once on the
accelerated classes, and must give the same, expected, trace. The ``c``
cases are skipped when the extension is not built, unless
``DARTLOOP_REQUIRE_EXTENSIONS=1``; with ``DARTLOOP_NO_EXTENSIONS=1`` only the
pure path exists.

``dartloop.schedule_microtask`` and the uvloop backend's protocol proxies
pick their version once, at import: here both versions are called side by
side; a whole-suite run with ``DARTLOOP_NO_EXTENSIONS=1`` covers the rest of
the pure path. ``test_c_mirrors_are_in_step_with_the_python_reference``
fails when a mirrored Python method changes, until its C twin is checked.

Plain pytest: each test builds its loops and drives them with
``run_until_complete``.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import hashlib
import inspect
import os
import socket
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dartloop
from dartloop import _loop, _microtasks

from _isolate_helpers import Inbox
from _loop_helpers import busy_wait

BACKENDS = dartloop.available_backends()
PATHS = ("pure", "c")
REQUIRE = os.environ.get("DARTLOOP_REQUIRE_EXTENSIONS") == "1"


class Kit:
    """A loop built on one path, its schedule_microtask, and what it reported."""

    def __init__(self, loop: dartloop.DartEventLoop, schedule: Callable[..., None]) -> None:
        self.loop = loop
        self.schedule = schedule
        self.errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: self.errors.append(context))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


def _require_c() -> None:
    if _loop.SPEEDUPS is None:
        if REQUIRE:
            pytest.fail("DARTLOOP_REQUIRE_EXTENSIONS=1 but dartloop._speedups is not available")
        pytest.skip("dartloop._speedups is not built (or DARTLOOP_NO_EXTENSIONS=1)")


def make_loop(backend: str, path: str, strict: bool = False) -> tuple[dartloop.DartEventLoop, Callable[..., None]]:
    """A new loop on ``path`` ("pure" or "c") and the matching schedule_microtask."""
    if path == "c":
        _require_c()
        loop = dartloop.new_event_loop(backend=backend, strict=strict)
        assert isinstance(loop, tuple(_loop._ACCELERATED.values()))
        return loop, _loop.SPEEDUPS.schedule_microtask
    saved = _loop.SPEEDUPS
    _loop.SPEEDUPS = None
    try:
        loop = dartloop.new_event_loop(backend=backend, strict=strict)
    finally:
        _loop.SPEEDUPS = saved
    assert not any(isinstance(loop, cls) for cls in _loop._ACCELERATED.values())
    return loop, _microtasks._schedule_microtask_py


@pytest.fixture(params=[(b, p, s) for b in BACKENDS for s in (False, True) for p in PATHS],
                ids=lambda v: f"{v[0]}-{v[1]}{'-strict' if v[2] else ''}")
def kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    backend, path, strict = request.param
    loop, schedule = make_loop(backend, path, strict)
    k = Kit(loop, schedule)
    try:
        yield k
    finally:
        loop.close()


def _ids(v: tuple[str, str]) -> str:
    return f"{v[0]}-{v[1]}"


@pytest.fixture(params=[(b, p) for b in BACKENDS for p in PATHS], ids=_ids)
def plain_kit(request: pytest.FixtureRequest) -> Iterator[Kit]:
    backend, path = request.param
    loop, schedule = make_loop(backend, path)
    k = Kit(loop, schedule)
    try:
        yield k
    finally:
        loop.close()


async def _settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------
# Ordering
# ---------------------------------------------------------------------------


def test_every_event_is_followed_by_a_full_drain(kit: Kit) -> None:
    out: list[str] = []
    sched = kit.schedule
    loop = kit.loop

    def event(tag: str) -> None:
        out.append(tag)
        sched(out.append, f"{tag}.m1")
        sched(nested, tag)
        sched(out.append, f"{tag}.m2")

    def nested(tag: str) -> None:
        out.append(f"{tag}.n")
        sched(out.append, f"{tag}.n.m")  # joins the same drain, after m2

    async def main() -> None:
        loop.call_soon(event, "a")
        loop.call_soon(event, "b")
        await _settle()

    kit.run(main())
    assert out == [
        "a", "a.m1", "a.n", "a.m2", "a.n.m",
        "b", "b.m1", "b.n", "b.m2", "b.n.m",
    ]  # fmt: skip
    assert not kit.errors


def test_timers_call_later_and_dart_timers(kit: Kit) -> None:
    out: list[str] = []
    sched = kit.schedule
    loop = kit.loop

    def event(tag: str) -> None:
        out.append(tag)
        sched(out.append, f"{tag}.m")

    async def main() -> None:
        # Deadlines 10 ms apart: libuv's timers have millisecond resolution.
        loop.call_later(0.03, event, "later2")
        loop.call_later(0.01, event, "later1")
        loop.call_at(loop.time() + 0.04, event, "at")
        dartloop.Timer(0.02, lambda: event("timer"))
        dartloop.Timer.run(lambda: event("run"))
        loop.call_soon(event, "soon")
        cancelled = loop.call_later(0.005, event, "cancelled")
        cancelled.cancel()
        await asyncio.sleep(0.1)

    kit.run(main())
    assert out == [
        "run", "run.m", "soon", "soon.m", "later1", "later1.m", "timer", "timer.m",
        "later2", "later2.m", "at", "at.m",
    ]  # fmt: skip
    if kit.loop.backend == "uvloop":
        assert not {h for h in kit.loop._dart_timer_handles if not h.cancelled()}  # type: ignore[attr-defined]


def _overdue(loop: asyncio.AbstractEventLoop, when: float) -> None:
    # Block until ``when`` has passed by a millisecond, so that timers due
    # then come due together, in one look at the timers.
    while loop.time() < when + 0.001:
        busy_wait(0.001)


def test_timers_due_together_run_in_order_before_what_they_queue(kit: Kit) -> None:
    # On the uvloop backend the C path queues due timers as one batch (see
    # TimerEvent in _speedups.c): each still runs as its own event with its
    # own drain, cancelled ones are skipped, and what they queue runs after
    # the last of them, as with one queue entry per timer.
    out: list[str] = []
    sched = kit.schedule
    loop = kit.loop
    handles: dict[str, asyncio.TimerHandle] = {}

    def timer(tag: str) -> None:
        out.append(tag)
        sched(out.append, f"{tag}.m")
        if tag == "t1":
            loop.call_soon(out.append, "queued by t1")
            loop.call_soon(done.set_result, None)
            handles["t3"].cancel()

    def arm() -> None:
        when = loop.time() + 0.002
        for i in (1, 2, 3, 4):
            handles[f"t{i}"] = loop.call_at(when + i * 1e-6, timer, f"t{i}")
        _overdue(loop, when)
        loop.call_soon(out.append, "queued before they came due")

    done = loop.create_future()

    async def main() -> None:
        loop.call_soon(arm)
        await done

    kit.run(main())
    assert out == [
        "queued before they came due", "t1", "t1.m", "t2", "t2.m", "t4", "t4.m", "queued by t1",
    ]  # fmt: skip
    assert not kit.errors


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_a_base_exception_from_a_timer_leaves_the_timers_due_with_it_to_run(plain_kit: Kit, exc_type: type[BaseException]) -> None:
    out: list[str] = []
    loop = plain_kit.loop

    def timer(tag: str) -> None:
        out.append(tag)
        if tag == "t1":
            raise exc_type("stop")

    def arm() -> None:
        when = loop.time() + 0.002
        for i in (1, 2, 3):
            loop.call_at(when + i * 1e-6, timer, f"t{i}")
        _overdue(loop, when)

    loop.call_soon(arm)
    with pytest.raises(exc_type):
        loop.run_forever()
    # uvloop runs the rest of its ready queue before run_forever raises, the
    # asyncio backend in the next run.
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert out == ["t1", "t2", "t3"]
    assert not plain_kit.errors


@pytest.mark.parametrize("path", PATHS)
def test_uvloop_timers_due_together_keep_their_order_across_debug_mode(path: str) -> None:
    # A timer made in debug mode comes due through the Python path; the ones
    # made before and after it run in deadline order around it.
    if "uvloop" not in BACKENDS:
        pytest.skip("needs uvloop")
    loop, _ = make_loop("uvloop", path)
    out: list[str] = []

    def arm() -> None:
        when = loop.time() + 0.002
        loop.call_at(when, out.append, "t1")
        loop.call_at(when + 1e-6, out.append, "t2")
        loop.set_debug(True)
        loop.call_at(when + 2e-6, out.append, "t3 (debug)")
        loop.set_debug(False)
        loop.call_at(when + 3e-6, out.append, "t4")
        loop.call_at(when + 4e-6, done.set_result, None)
        _overdue(loop, when)

    done = loop.create_future()

    async def main() -> None:
        loop.call_soon(arm)
        await done

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert out == ["t1", "t2", "t3 (debug)", "t4"]


@pytest.mark.parametrize("path", PATHS)
def test_uvloop_a_timer_batch_never_spans_two_runs(path: str) -> None:
    # uvloop queues callbacks of its own (a transport's connection_lost, ...)
    # that dartloop does not see, e.g. between two runs. A timer that comes
    # due at the start of the next run goes behind them, not into the batch
    # of a timer that came due as the last run ended.
    if "uvloop" not in BACKENDS:
        pytest.skip("needs uvloop")
    import uvloop

    loop, _ = make_loop("uvloop", path)
    out: list[str] = []
    marks: dict[str, float] = {}

    def arm() -> None:
        now = loop.time()
        marks["a"], marks["b"] = now + 0.002, now + 0.1
        loop.call_at(marks["a"], out.append, "a")
        loop.call_at(marks["b"], out.append, "b")
        loop.stop()  # the loop stops after its next iteration, whose last phase runs due timers
        loop.call_soon(_overdue, loop, marks["a"])

    try:
        loop.call_soon(arm)
        loop.run_forever()
        assert out == []  # "a" came due in the last timer phase; its turn is the next run's
        if loop.time() >= marks["b"]:
            pytest.skip("the machine stalled: b came due with a")
        _overdue(loop, marks["b"])
        uvloop.Loop.call_soon(loop, out.append, "queued by uvloop")
        uvloop.Loop.call_later(loop, 0.02, loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert out == ["a", "queued by uvloop", "b"]


def test_long_microtask_chain_is_fifo(kit: Kit) -> None:
    seen: list[int] = []
    sched = kit.schedule

    def step(i: int) -> None:
        seen.append(i)
        if i < 2000:
            sched(step, i + 2)  # two interleaved chains

    async def main() -> None:
        sched(step, 1)
        sched(step, 2)
        await _settle()

    kit.run(main())
    assert seen == list(range(1, 2002))


def test_futures_and_tasks_order(kit: Kit) -> None:
    out: list[str] = []
    loop = kit.loop

    async def child(fut: asyncio.Future[str]) -> None:
        out.append("child waits")
        out.append(await fut)
        kit.schedule(out.append, "child.m")

    async def main() -> None:
        fut = loop.create_future()
        task = loop.create_task(child(fut))
        await asyncio.sleep(0)
        loop.call_soon(out.append, "event")
        c = dartloop.Completer()
        c.future.add_done_callback(lambda f: out.append(f"completer {f.result()}"))
        c.complete("done")
        fut.set_result("woken")
        await task
        await _settle()

    kit.run(main())
    if kit.loop.strict:
        # Done callbacks are microtasks: everything happens in main's drain.
        expected = ["child waits", "woken", "completer done", "child.m", "event"]
    else:
        # The completer's future completes in main's drain; its callback and
        # the task wake-up are events, queued after "event".
        expected = ["child waits", "event", "woken", "child.m", "completer done"]
    assert out == expected


def test_debug_mode(plain_kit: Kit) -> None:
    # In debug mode the accelerated uvloop class hands call_soon/call_later
    # to the Python methods (which check callbacks and name handles).
    out: list[str] = []
    sched = plain_kit.schedule
    loop = plain_kit.loop
    loop.set_debug(True)
    loop.slow_callback_duration = 10.0

    def event(tag: str) -> None:
        out.append(tag)
        sched(out.append, f"{tag}.m")

    async def main() -> None:
        loop.call_soon(event, "a")
        loop.call_soon_threadsafe(event, "b")
        await _settle()
        loop.call_later(0.001, event, "t")
        await asyncio.sleep(0.02)

    plain_kit.run(main())
    assert out == ["a", "a.m", "b", "b.m", "t", "t.m"]
    line = sys._getframe().f_lineno + 1
    handle = loop.call_soon(event, "x")
    # Named after the user's callback, created at the caller's line.
    assert "test_debug_mode.<locals>.event" in repr(handle)
    assert f"created at {__file__}:{line}" in repr(handle)
    handle.cancel()
    assert not plain_kit.errors


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_exceptions_are_reported_and_the_drain_carries_on(kit: Kit) -> None:
    out: list[str] = []
    sched = kit.schedule
    loop = kit.loop
    boom = ValueError("boom")
    bang = KeyError("bang")

    def bad_microtask(x: int) -> None:
        raise boom

    def bad_event() -> None:
        sched(out.append, "after-raise.m")
        raise bang

    def event() -> None:
        sched(out.append, "m1")
        sched(bad_microtask, 1)
        sched(out.append, "m2")

    async def main() -> None:
        loop.call_soon(event)
        loop.call_soon(bad_event)
        loop.call_soon(out.append, "next")
        await _settle()

    kit.run(main())
    assert out == ["m1", "m2", "after-raise.m", "next"]
    assert [c["exception"] for c in kit.errors] == [boom, bang]
    assert kit.errors[0]["message"].startswith("Exception in microtask ")
    assert "bad_microtask(" in kit.errors[0]["message"]  # 3.13 leaves out the arguments
    assert set(kit.errors[0]) == {"message", "exception"}
    assert kit.errors[1]["message"].startswith("Exception in callback ")
    assert "bad_event()" in kit.errors[1]["message"]
    tb = boom.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code is bad_microtask.__code__


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_propagate_and_leave_the_rest_queued(plain_kit: Kit, exc_type: type[BaseException]) -> None:
    out: list[str] = []
    sched = plain_kit.schedule
    loop = plain_kit.loop

    def stop() -> None:
        raise exc_type("stop")

    def event() -> None:
        sched(out.append, "m1")
        sched(stop)
        sched(out.append, "m3")

    async def main() -> None:
        loop.call_soon(event)
        await _settle()

    with pytest.raises(exc_type):
        plain_kit.run(main())
    # The drain stopped at the exception. What was left is still queued
    # (asyncio backend) or ran after a later event (uvloop finishes its
    # batch of ready callbacks before it stops).
    assert out + list(loop._microtasks) in (["m1", "m3"], ["m1", (out.append, ("m3",))])
    if loop.backend == "asyncio":
        assert len(loop._microtasks) == 1
    loop._microtasks.clear()
    assert not plain_kit.errors


@pytest.mark.parametrize("where", ["event", "microtask"])
def test_an_exception_raised_while_reporting_propagates(plain_kit: Kit, where: str) -> None:
    # A spawned isolate's _report_uncaught raises _IsolateUnwind (a SystemExit).
    loop = plain_kit.loop
    sched = plain_kit.schedule
    seen: list[tuple[type[BaseException], BaseException | None]] = []

    class Unwind(SystemExit):
        pass

    def report(exc: BaseException, context: dict[str, Any]) -> None:
        seen.append((type(exc), sys.exc_info()[1]))
        raise Unwind

    loop._report_uncaught = report  # type: ignore[method-assign]

    def bad() -> None:
        raise ValueError("bad")

    async def main() -> None:
        if where == "event":
            loop.call_soon(bad)
        else:
            loop.call_soon(sched, bad)
        await _settle()

    with pytest.raises(Unwind) as info:
        plain_kit.run(main())
    assert [t for t, _ in seen] == [ValueError]
    handled = seen[0][1]
    assert isinstance(handled, ValueError)  # reported while "handling" it
    assert info.value.__context__ is handled


def test_non_tuple_args_and_bad_queue_entries(plain_kit: Kit) -> None:
    loop = plain_kit.loop
    out: list[Any] = []

    def event() -> None:
        loop._mt_append((lambda *a: out.append(a), [1, 2]))  # any iterable works as args
        loop._mt_append((lambda *a: 1 / 0, [1, 2]))

    async def main() -> None:
        loop.call_soon(event)
        await _settle()

    plain_kit.run(main())
    assert out == [(1, 2)]
    assert [type(c["exception"]) for c in plain_kit.errors] == [ZeroDivisionError]

    def broken() -> None:
        loop._mt_append(("not a pair",))

    async def main2() -> None:
        loop.call_soon(broken)
        await _settle()

    # The drain unpacks an entry outside its try: the error leaves the drain.
    # uvloop then reports it as the event's error; the asyncio backend's
    # turn lets it out of run_until_complete.
    plain_kit.errors.clear()
    if loop.backend == "asyncio":
        with pytest.raises(ValueError, match="not enough values to unpack"):
            plain_kit.run(main2())
        assert not plain_kit.errors
    else:
        plain_kit.run(main2())
        assert [type(c["exception"]) for c in plain_kit.errors] == [ValueError]
        assert plain_kit.errors[0]["message"].startswith("Exception in callback")


# ---------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_contexts(plain_kit: Kit) -> None:
    loop = plain_kit.loop
    sched = plain_kit.schedule
    out: list[str] = []

    def event(tag: str) -> None:
        out.append(f"{tag}:{VAR.get()}")
        VAR.set(f"set-by-{tag}")
        sched(lambda: out.append(f"{tag}.m:{VAR.get()}"))

    ctx = contextvars.Context()
    ctx.run(VAR.set, "ctx")

    async def main() -> None:
        loop.call_soon(event, "own", context=ctx)
        loop.call_soon(event, "copied")
        await _settle()
        loop.call_later(0.001, event, "timer", context=ctx)
        await asyncio.sleep(0.01)

    VAR.set("outside")
    plain_kit.run(main())
    # Microtasks run in the loop's context, not in the event's.
    microtask_ctx = "unset" if loop.backend == "uvloop" else "outside"
    assert out == [
        "own:ctx", f"own.m:{microtask_ctx}",
        "copied:outside", f"copied.m:{microtask_ctx}",
        "timer:set-by-own", f"timer.m:{microtask_ctx}",
    ]  # fmt: skip
    assert ctx[VAR] == "set-by-timer"


def _context_trace(loop: asyncio.AbstractEventLoop, schedule: Callable[..., None] | None) -> list[str]:
    """What events queued without a context see of their context, on ``loop``.

    Each event gets a copy of the context current at ``call_soon``, sets the
    variable in it without leaking to the caller or to other events, and,
    with ``schedule``, queues a microtask that records what the drain sees.
    A failing event's report is recorded by the exception handler.
    """
    out: list[str] = []

    def event(tag: str) -> None:
        out.append(f"{tag}:{VAR.get()}")
        VAR.set(f"set-by-{tag}")
        if schedule is not None:
            schedule(lambda: out.append(f"{tag}.m:{VAR.get()}"))
        if tag == "bad":
            raise ValueError(tag)

    def handler(_loop: object, context: dict[str, Any]) -> None:
        out.append(f"report:{type(context['exception']).__name__}:{VAR.get()}")

    async def main() -> None:
        VAR.set("a")
        loop.call_soon(event, "e1")
        VAR.set("b")  # after the copy: e1 still sees "a"
        loop.call_soon(event, "e2")
        loop.call_soon_threadsafe(event, "e3")
        loop.call_soon(event, "bad")
        await _settle()
        out.append(f"caller:{VAR.get()}")

    loop.set_exception_handler(handler)
    VAR.set("outside")
    try:
        loop.run_until_complete(main())
    finally:
        VAR.set("unset")
    return out


def test_events_without_a_context_run_in_a_copy_like_stock_loops(plain_kit: Kit) -> None:
    # uvloop is handed these without a context on the C path, and makes and
    # enters the copy itself (the direct form of the event runner); the pure
    # path passes the copy. The events' own view must match the stock loop
    # of the backend in the same run, and the drain and the report must run
    # outside the event's context on both paths.
    loop = plain_kit.loop
    stock = asyncio.SelectorEventLoop() if loop.backend == "asyncio" else _uvloop_new()
    try:
        want = _context_trace(stock, None)
    finally:
        stock.close()
    got = _context_trace(loop, plain_kit.schedule)
    assert [x for x in got if ".m:" not in x and not x.startswith("report:")] == [
        x for x in want if not x.startswith("report:")
    ]
    assert want[:4] == ["e1:a", "e2:b", "e3:b", "bad:b"] and want[-1] == "caller:b"
    drain = "unset" if loop.backend == "uvloop" else "outside"
    # asyncio 3.12+ calls the exception handler in the handle's context.
    report = "set-by-bad" if loop.backend == "asyncio" and sys.version_info >= (3, 12) else drain
    assert [x for x in got if ".m:" in x or x.startswith("report:")] == [
        f"e1.m:{drain}", f"e2.m:{drain}", f"e3.m:{drain}", f"report:ValueError:{report}", f"bad.m:{drain}",
    ]  # fmt: skip


def _uvloop_new() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


@pytest.mark.skipif("uvloop" not in BACKENDS, reason="uvloop is not installed")
def test_the_event_runner_called_outside_uvloop_runs_the_event_and_drains() -> None:
    # The direct form leaves the context uvloop entered for the drain; called
    # by anyone else (no context of its own entered, or inside ctx.run), it
    # runs the event and the drain all the same and leaves the caller's
    # context as it was. uvloop calls it through tp_call with a tuple, which
    # Python code reaches through the type's __call__.
    _require_c()
    loop, _ = make_loop("uvloop", "c")
    kit = Kit(loop, loop._schedule_microtask)  # no running loop: the loop's own method
    out: list[str] = []
    try:
        runner = loop._dart_run_event  # type: ignore[attr-defined]

        def event(tag: str) -> None:
            out.append(f"{tag}:{VAR.get()}")
            kit.schedule(lambda: out.append(f"{tag}.m:{VAR.get()}"))

        runner(event, "plain")
        ctx = contextvars.Context()
        ctx.run(VAR.set, "ctx")
        ctx.run(runner, event, "in-ctx")
        ctx.run(lambda: out.append(f"after:{VAR.get()}"))
        call = type(runner).__call__
        call(runner, event, "tp-call")
        with pytest.raises(TypeError, match="takes no keyword arguments"):
            call(runner, event, "kw", x=1)
        with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
            runner(event, "kw", x=1)
    finally:
        loop.close()
    assert out == [
        "plain:unset", "plain.m:unset", "in-ctx:ctx", "in-ctx.m:unset", "after:ctx", "tp-call:unset", "tp-call.m:unset",
    ]  # fmt: skip
    assert not kit.errors


def test_a_context_that_is_already_entered_fails_the_event(plain_kit: Kit) -> None:
    loop = plain_kit.loop
    out: list[str] = []
    ctx = contextvars.Context()

    async def main() -> None:
        loop.call_soon(out.append, "never", context=ctx)  # ctx is entered: it runs the loop
        loop.call_soon(plain_kit.schedule, out.append, "m")
        await _settle()

    ctx.run(plain_kit.run, main())
    assert out == ["m"]
    if loop.backend == "asyncio" and sys.version_info >= (3, 12):
        # 3.12+ runs the exception handler in the handle's context, which
        # fails the same way: asyncio logs it and the handler never sees it.
        return
    assert [type(c["exception"]) for c in plain_kit.errors] == [RuntimeError]
    assert "already entered" in str(plain_kit.errors[0]["exception"])


# ---------------------------------------------------------------------------
# The uvloop backend's methods
# ---------------------------------------------------------------------------

needs_uvloop = pytest.mark.skipif("uvloop" not in BACKENDS, reason="uvloop is not installed")


@needs_uvloop
@pytest.mark.parametrize("path", PATHS)
def test_uvloop_methods_check_like_the_pure_ones(path: str) -> None:
    loop, _ = make_loop("uvloop", path)
    try:
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            loop.call_soon(print, bogus=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            loop.call_soon()  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            loop.call_later(1.0)  # type: ignore[call-arg]
        h = loop.call_later(10.0, print)
        assert h not in loop._dart_timer_handles  # type: ignore[attr-defined]  # not an isolate's loop
        h.cancel()
        loop._dart_watch_idle = True  # type: ignore[attr-defined]  # as a spawned isolate's loop
        h = loop.call_later(10.0, print)
        assert h in loop._dart_timer_handles  # type: ignore[attr-defined]
        h.cancel()
        loop._dart_watch_idle = False  # type: ignore[attr-defined]
        handle = loop.call_soon(print, 1, 2)
        assert type(handle).__name__ == "Handle"
        handle.cancel()
        loop.set_debug(True)
        with pytest.raises(TypeError, match="coroutines cannot be used with call_soon"):
            loop.call_soon(_settle)
        with pytest.raises(TypeError, match="a callable object was expected by call_later"):
            loop.call_later(1.0, 42)  # type: ignore[arg-type]
        loop.set_debug(False)
        loop.run_until_complete(asyncio.sleep(0))
        events = loop._dart_events  # type: ignore[attr-defined]
        assert events >= 1
        loop._dart_events = events + 10  # type: ignore[attr-defined]
        assert loop._dart_events == events + 10  # type: ignore[attr-defined]
        assert loop._dart_watch_idle is False  # type: ignore[attr-defined]
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(print)
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_later(1.0, print)


@needs_uvloop
@pytest.mark.parametrize("path", PATHS)
def test_uvloop_call_soon_threadsafe(path: str) -> None:
    loop, sched = make_loop("uvloop", path)
    out: list[str] = []

    async def main() -> None:
        done = loop.create_future()

        def from_thread() -> None:
            for i in range(100):
                loop.call_soon_threadsafe(out.append, str(i))
            loop.call_soon_threadsafe(lambda: (sched(out.append, "m"), done.set_result(None)))

        t = threading.Thread(target=from_thread)
        t.start()
        await done
        await _settle()
        t.join()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert out == [str(i) for i in range(100)] + ["m"]


@needs_uvloop
@pytest.mark.parametrize("path", PATHS)
def test_uvloop_post_event_hooks(path: str) -> None:
    # After the drain the uvloop runner serves the isolate's control queue
    # and, for a watched isolate, checks for idleness.
    loop, sched = make_loop("uvloop", path)
    calls: list[str] = []

    class FakeIsolate:
        spawned = False

        def serve_control(self) -> None:
            calls.append("control")
            loop._dart_oob.clear()  # type: ignore[attr-defined]

    async def main() -> None:
        real = loop._isolate
        loop._isolate = FakeIsolate()  # type: ignore[assignment]
        try:
            loop._dart_oob.append("x")  # type: ignore[attr-defined]
            loop.call_soon(lambda: sched(calls.append, "m"))
            await asyncio.sleep(0)
            loop._dart_check_idle = lambda: calls.append("idle")  # type: ignore[method-assign]
            loop._dart_watch_idle = True  # type: ignore[attr-defined]
            loop.call_soon(calls.append, "e")
            await asyncio.sleep(0)
        finally:
            loop._dart_watch_idle = False  # type: ignore[attr-defined]
            loop._dart_oob.clear()  # type: ignore[attr-defined]
            loop._isolate = real
            vars(loop).pop("_dart_check_idle", None)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    # main's first step queued the control action: it is served right after
    # that step's event; its second step turned the idle watch on.
    assert calls == ["control", "m", "idle", "e", "idle"]


# ---------------------------------------------------------------------------
# Protocol proxies (uvloop backend)
# ---------------------------------------------------------------------------


def _proxy_classes() -> list[Any]:
    from dartloop import _protocols

    def make(method: Any) -> type:
        return type("Proxy", (_protocols._ProxyBase, asyncio.Protocol), {"__slots__": (), "data_received": method})

    out = [pytest.param(make(_protocols._drained_py("data_received")), id="pure")]
    if _loop.SPEEDUPS is not None:
        out.append(pytest.param(make(_loop.SPEEDUPS.LoopMethod("drained", _protocols._drained_py("data_received"))), id="c"))
    elif REQUIRE:
        pytest.fail("DARTLOOP_REQUIRE_EXTENSIONS=1 but dartloop._speedups is not available")
    return out


@pytest.mark.parametrize("proxy_cls", _proxy_classes())
def test_protocol_proxy_drains_after_each_callback(proxy_cls: type) -> None:
    loop = dartloop.new_event_loop(backend="asyncio")
    out: list[Any] = []
    boom = ValueError("boom")

    class Target(asyncio.Protocol):
        def data_received(self, data: bytes) -> Any:
            out.append(data)
            loop._schedule_microtask(out.append, f"{data!r}.m")
            if data == b"raise":
                raise boom
            return len(data)

    proxy = proxy_cls(loop, Target())
    try:
        assert proxy.data_received(b"ab") == 2
        assert out == [b"ab", "b'ab'.m"]
        with pytest.raises(ValueError) as info:
            proxy.data_received(b"raise")
        assert info.value is boom
        assert out[2:] == [b"raise", "b'raise'.m"]  # drained before the error left
        with pytest.raises(TypeError):
            proxy.data_received()  # the target's own error

        class Unwind(SystemExit):
            pass

        def report(exc: BaseException, context: dict[str, Any]) -> None:
            raise Unwind

        loop._report_uncaught = report  # type: ignore[method-assign]
        loop._schedule_microtask(lambda: 1 / 0)
        with pytest.raises(Unwind) as info2:  # the drain's error replaces the target's
            proxy.data_received(b"raise")
        assert isinstance(info2.value.__context__, ZeroDivisionError)
        assert info2.value.__context__.__context__ is boom
    finally:
        loop._microtasks.clear()
        loop.close()


@needs_uvloop
def test_protocol_callbacks_drain_on_uvloop() -> None:
    loop, sched = make_loop("uvloop", "c" if _loop.SPEEDUPS is not None else "pure")
    out: list[str] = []

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            out.append(f"server {data!r}")
            sched(out.append, "server.m")
            self.transport.write(data)

    class Client(asyncio.Protocol):
        def __init__(self, done: asyncio.Future[None]) -> None:
            self.done = done

        def data_received(self, data: bytes) -> None:
            out.append(f"client {data!r}")
            sched(out.append, "client.m")
            sched(self.done.set_result, None)

    async def main() -> None:
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        done = loop.create_future()
        transport, _ = await loop.create_connection(lambda: Client(done), "127.0.0.1", port)
        transport.write(b"x")
        await asyncio.wait_for(done, 30)
        transport.close()
        server.close()
        await server.wait_closed()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert out == ["server b'x'", "server.m", "client b'x'", "client.m"]


# ---------------------------------------------------------------------------
# schedule_microtask
# ---------------------------------------------------------------------------


def _schedulers() -> list[Any]:
    out = [pytest.param(_microtasks._schedule_microtask_py, id="pure")]
    if _loop.SPEEDUPS is not None:
        out.append(pytest.param(_loop.SPEEDUPS.schedule_microtask, id="c"))
    return out


@pytest.mark.parametrize("schedule", _schedulers())
def test_schedule_microtask_errors(schedule: Callable[..., None]) -> None:
    with pytest.raises(RuntimeError, match="there is no running event loop") as info:
        schedule(print)
    assert info.value.__suppress_context__ and info.value.__cause__ is None

    async def on_stock() -> None:
        schedule(print)

    stock = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="not a dartloop loop"):
            stock.run_until_complete(on_stock())
    finally:
        stock.close()

    loop = dartloop.new_event_loop(backend="asyncio")

    async def bad_args() -> None:
        with pytest.raises(TypeError, match="needs a callable, got int 42"):
            schedule(42)
        with pytest.raises(TypeError):
            schedule(print, end="")  # type: ignore[call-arg]

    try:
        loop.run_until_complete(bad_args())
    finally:
        loop.close()


@pytest.mark.parametrize("schedule", _schedulers())
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_microtask_after_the_loop_is_gone(schedule: Callable[..., None], backend: str) -> None:
    # The C version finds the running loop through a thread-local that
    # run_forever sets and clears: once the run is over it must not match.
    loop = dartloop.new_event_loop(backend=backend)
    out: list[str] = []

    async def main() -> None:
        schedule(out.append, "m")
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    loop.close()
    assert out == ["m"]
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError, match="no running event loop"):
        schedule(out.append, "late")
    assert out == ["m"]


@pytest.mark.parametrize("schedule", _schedulers())
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_microtask_finds_each_threads_own_loop(schedule: Callable[..., None], backend: str) -> None:
    # Two threads run a loop each at the same time, while a third has none:
    # every microtask lands in the loop of the thread that scheduled it.
    both_running = threading.Barrier(3)
    finished = threading.Barrier(3)
    out: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        loop = dartloop.new_event_loop(backend=backend)

        async def main() -> None:
            await loop.run_in_executor(None, both_running.wait)
            for i in range(3):
                schedule(out[name].append, f"{name}{i}")
                await asyncio.sleep(0)
            await loop.run_in_executor(None, finished.wait)

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            loop.close()

    threads = [threading.Thread(target=run, args=(name,)) for name in out]
    for t in threads:
        t.start()
    both_running.wait()
    with pytest.raises(RuntimeError, match="no running event loop"):
        schedule(print)
    finished.wait()
    for t in threads:
        t.join()
    assert errors == []
    assert out == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_nested_run_keeps_the_running_loop(backend: str) -> None:
    # run_forever refuses to start a second loop in this thread; the running
    # loop must still be the one schedule_microtask finds afterwards.
    outer = dartloop.new_event_loop(backend=backend)
    inner = dartloop.new_event_loop(backend=backend)
    out: list[str] = []

    async def main() -> None:
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="another loop is running|already running"):
            inner.run_until_complete(coro)
        coro.close()
        dartloop.schedule_microtask(out.append, "outer")
        await asyncio.sleep(0)

    try:
        outer.run_until_complete(main())
    finally:
        outer.close()
        inner.close()
    assert out == ["outer"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forked_child_has_no_running_loop(backend: str, tmp_path: Any) -> None:
    # asyncio forgets the running loop in a forked child; so must
    # schedule_microtask. In a fresh single-threaded interpreter, so that
    # fork() has no other threads to warn about.
    script = tmp_path / "fork_child.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, os, sys
            import dartloop

            async def main():
                pid = os.fork()
                if pid == 0:
                    try:
                        dartloop.schedule_microtask(print)
                    except RuntimeError as exc:
                        os._exit(0 if "no running event loop" in str(exc) else 3)
                    os._exit(4)
                _, status = os.waitpid(pid, 0)
                out = []
                dartloop.schedule_microtask(out.append, "parent")
                await asyncio.sleep(0)
                assert out == ["parent"], out
                sys.exit(os.waitstatus_to_exitcode(status))

            dartloop.run(main(), backend={backend!r})
            """
        )
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)


def test_public_schedule_microtask_is_the_selected_one() -> None:
    expected = _microtasks._schedule_microtask_py if _loop.SPEEDUPS is None else _loop.SPEEDUPS.schedule_microtask
    assert dartloop.schedule_microtask is expected


# ---------------------------------------------------------------------------
# Ports: SendPort.send and _IsolateState._drain_inbox
# ---------------------------------------------------------------------------
#
# SendPort.send is chosen once, at import: the pure method stays reachable as
# SendPort._send_py. The inbox drain follows the loop's class (the C one for
# an accelerated loop's isolate). The "c" path is C send + C drain, "pure"
# both pure; the mixed paths check that both agree on the inbox's format.

# name -> (the loop's path, so the drain's; the send's path)
SEND_PATHS = {
    "pure": ("pure", "pure"),
    "c": ("c", "c"),
    "c-loop+pure-send": ("c", "pure"),
    "pure-loop+c-send": ("pure", "c"),
}


class PortKit(Kit):
    """A Kit whose ``send(send_port, message)`` is the pure or the C send."""

    def __init__(self, loop: dartloop.DartEventLoop, schedule: Callable[..., None], send_path: str) -> None:
        super().__init__(loop, schedule)
        self.send_path = send_path
        self.send: Callable[[dartloop.SendPort, object], None] = _send_for(send_path)


def _send_for(path: str) -> Callable[[dartloop.SendPort, object], None]:
    from dartloop._ports import SendPort

    if path == "pure":
        return SendPort._send_py
    _require_c()
    assert isinstance(SendPort.send, _loop.SPEEDUPS.LoopMethod)
    return SendPort.send


@pytest.fixture(params=[(b, p) for b in BACKENDS for p in SEND_PATHS], ids=lambda v: f"{v[0]}-{v[1]}")
def port_kit(request: pytest.FixtureRequest) -> Iterator[PortKit]:
    backend, path = request.param
    loop_path, send_path = SEND_PATHS[path]
    if "c" in (loop_path, send_path):
        _require_c()
    loop, schedule = make_loop(backend, loop_path)
    k = PortKit(loop, schedule, send_path)
    try:
        yield k
    finally:
        loop.close()


@pytest.fixture(params=[(b, p) for b in BACKENDS for p in PATHS], ids=_ids)
def plain_port_kit(request: pytest.FixtureRequest) -> Iterator[PortKit]:
    backend, path = request.param
    loop, schedule = make_loop(backend, path)
    k = PortKit(loop, schedule, path)
    try:
        yield k
    finally:
        loop.close()


def _run_thread(target: Callable[[], None]) -> None:
    t = threading.Thread(target=target)
    t.start()
    t.join()


def burst_while_blocked(loop: asyncio.AbstractEventLoop, produce: Callable[[], None], then: Callable[[], None] | None = None) -> None:
    """Run ``produce`` in another thread during one event of ``loop``.

    Everything it sends is then in the inbox, behind one wakeup, before the
    drain runs; ``then()`` runs at the end of that event (still before it).
    """

    def event() -> None:
        _run_thread(produce)
        if then is not None:
            then()

    loop.call_soon(event)


class Recorder:
    """Port handlers that record ``(port name, message)``; ``done`` resolves
    when ``expected`` messages were recorded in all."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int) -> None:
        self.out: list[Any] = []
        self.expected = expected
        self.done: asyncio.Future[None] = loop.create_future()

    def record(self, item: Any) -> None:
        self.out.append(item)
        if len(self.out) == self.expected and not self.done.done():
            self.done.set_result(None)

    def handler(self, name: str) -> Callable[[Any], None]:
        return lambda m: self.record((name, m))


def test_port_send_and_drain_are_the_selected_ones() -> None:
    from dartloop._isolate import _IsolateState
    from dartloop._ports import SendPort

    if _loop.SPEEDUPS is None:
        assert SendPort.send is SendPort._send_py
        return
    assert SendPort.send.__wrapped__ is SendPort._send_py
    assert SendPort.send.__name__ == "send" and SendPort.send.__qualname__ == "SendPort.send"
    assert SendPort.send.__doc__ == SendPort._send_py.__doc__
    for path, expected in (("pure", _IsolateState._drain_inbox), ("c", _loop.SPEEDUPS.drain_inbox)):
        loop, _ = make_loop("asyncio", path)
        try:

            async def main() -> Any:
                return loop._isolate._drain_inbox  # type: ignore[union-attr]

            assert loop.run_until_complete(main()).__func__ is expected
        finally:
            loop.close()


def test_send_from_threads_keeps_each_senders_order(port_kit: PortKit) -> None:
    loop, send = port_kit.loop, port_kit.send
    n, senders = 3000, 3

    async def main() -> dict[str, list[Any]]:
        rec = Recorder(loop, 2 * n * senders)
        a = dartloop.RawReceivePort(rec.handler("a"))
        b = dartloop.RawReceivePort(rec.handler("b"))

        def sender(tag: int) -> None:
            for i in range(n):
                send(a.send_port, (tag, i))
                send(b.send_port, (tag, i))

        threads = [threading.Thread(target=sender, args=(tag,)) for tag in range(senders)]
        for t in threads:
            t.start()
        await rec.done
        for t in threads:
            t.join()
        a.close()
        b.close()
        by_port_and_sender: dict[str, list[Any]] = {}
        for name, (tag, i) in rec.out:
            by_port_and_sender.setdefault(f"{name}{tag}", []).append(i)
        return by_port_and_sender

    got = port_kit.run(main())
    assert got == {f"{name}{tag}": list(range(n)) for name in "ab" for tag in range(senders)}
    assert not port_kit.errors


def test_one_wakeup_per_burst(port_kit: PortKit) -> None:
    loop, send = port_kit.loop, port_kit.send
    wakeups: list[Any] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        wakeups.append(callback)
        return real(callback, *args, **kwargs)

    async def main() -> list[int]:
        rec = Recorder(loop, 200)
        port = dartloop.RawReceivePort(lambda m: rec.record(m))
        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        try:
            burst_while_blocked(loop, lambda: [send(port.send_port, i) for i in range(200)])
            await rec.done
            assert len(wakeups) == 1  # the whole burst: one wakeup
            rec.expected, rec.done = 400, loop.create_future()
            # After the drain cleared the flag, the next burst gets its own.
            burst_while_blocked(loop, lambda: [send(port.send_port, i) for i in range(200, 400)])
            await rec.done
            assert len(wakeups) == 2
        finally:
            del loop.call_soon_threadsafe
            port.close()
        return rec.out

    assert port_kit.run(main()) == list(range(400))
    iso = loop._isolate
    assert iso is not None
    assert {getattr(w, "__func__", None) for w in wakeups} == {iso._drain_inbox.__func__}


def test_drop_rules_and_closing_a_port_mid_burst(port_kit: PortKit) -> None:
    loop, send = port_kit.loop, port_kit.send

    async def main() -> list[Any]:
        rec = Recorder(loop, 0)
        kept = dartloop.RawReceivePort(rec.handler("kept"))
        closed_early = dartloop.RawReceivePort(rec.handler("closed-early"))
        muted = dartloop.RawReceivePort(rec.handler("muted"))

        def closing(m: int) -> None:
            rec.record(("closing", m))
            if m == 3:
                closing_port.close()  # the rest of the burst to it is dropped

        closing_port = dartloop.RawReceivePort(closing)
        ports = [kept, closed_early, muted, closing_port]

        def produce() -> None:
            for i in range(8):
                for p in ports:
                    send(p.send_port, i)

        def then() -> None:
            # Still in the blocking event: the burst is queued but not drained.
            closed_early.close()
            muted.handler = None

        burst_while_blocked(loop, produce, then)
        rec.expected = 8 + 4
        await rec.done
        muted.handler = rec.handler("muted")
        # A closed port and a dead end stay silent for later sends too.
        done = loop.create_future()
        last = dartloop.RawReceivePort(lambda m: done.set_result(m))

        def later() -> None:
            send(closed_early.send_port, "late")
            send(closing_port.send_port, "late")
            send(muted.send_port, "heard")
            send(last.send_port, "end")

        _run_thread(later)
        await done
        for p in (kept, muted, last):
            p.close()
        return rec.out

    out = port_kit.run(main())
    expected = []
    for i in range(8):
        expected.append(("kept", i))
        if i <= 3:
            expected.append(("closing", i))
    assert out == expected + [("muted", "heard")]
    assert not port_kit.errors


def test_unsendable_messages_raise_the_same_error_and_deliver_nothing(port_kit: PortKit) -> None:
    from dartloop._message import prepare_message

    loop, send = port_kit.loop, port_kit.send
    bad = [1, {"key": threading.Lock()}]
    with pytest.raises(TypeError) as reference:
        prepare_message(bad)

    async def main() -> list[Any]:
        rec = Recorder(loop, 2)
        port = dartloop.RawReceivePort(lambda m: rec.record(m))
        errors: list[str] = []
        with pytest.raises(TypeError) as own_thread:
            send(port.send_port, bad)
        errors.append(str(own_thread.value))

        def from_thread() -> None:
            try:
                send(port.send_port, bad)
            except TypeError as exc:
                errors.append(str(exc))
            send(port.send_port, [1, {"key": "copied"}])

        _run_thread(from_thread)
        send(port.send_port, "own")
        await rec.done
        port.close()
        assert errors == [str(reference.value)] * 2
        return rec.out

    assert sorted(map(repr, port_kit.run(main()))) == sorted(map(repr, [[1, {"key": "copied"}], "own"]))


def test_send_checks_its_arguments_like_the_pure_method(plain_port_kit: PortKit) -> None:
    send = plain_port_kit.send

    async def main() -> None:
        port = dartloop.RawReceivePort()
        with pytest.raises(TypeError):
            send(port.send_port)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            send(port.send_port, 1, 2)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
            send(port.send_port, bogus=1)  # type: ignore[call-arg]
        send(port.send_port, message=1)  # type: ignore[call-arg]  # the pure signature
        port.close()

    plain_port_kit.run(main())


def test_handler_errors_reach_the_exception_handler(port_kit: PortKit) -> None:
    loop, send, sched = port_kit.loop, port_kit.send, port_kit.schedule
    boom = ValueError("boom")
    out: list[Any] = []
    done = loop.create_future()

    def handler(m: int) -> None:
        out.append(m)
        sched(out.append, f"{m}.m")
        if m == 2:
            raise boom
        if m == 4:
            done.set_result(None)

    async def main() -> None:
        port = dartloop.RawReceivePort(handler)
        burst_while_blocked(loop, lambda: [send(port.send_port, i) for i in range(5)])
        await done
        port.close()

    port_kit.run(main())
    assert out == [0, "0.m", 1, "1.m", 2, "2.m", 3, "3.m", 4, "4.m"]
    assert [c["exception"] for c in port_kit.errors] == [boom]
    assert port_kit.errors[0]["message"] == "Exception in callback " + _loop._format_callback(handler, (2,), False)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_from_a_handler_leave_the_rest_queued(plain_port_kit: PortKit, exc_type: type[BaseException]) -> None:
    loop, send = plain_port_kit.loop, plain_port_kit.send
    out: list[int] = []

    def handler(m: int) -> None:
        out.append(m)
        if m == 1:
            raise exc_type("stop")

    async def main() -> None:
        port = dartloop.RawReceivePort(handler)
        burst_while_blocked(loop, lambda: [send(port.send_port, i) for i in range(5)])
        await loop.create_future()  # never: the handler's exception leaves the run

    with pytest.raises(exc_type):
        plain_port_kit.run(main())
    iso = loop._isolate
    assert iso is not None
    assert out == [0, 1]
    assert len(iso.inbox) == 2 * 3  # messages 2..4, core and message each
    assert not iso.inbox_scheduled  # cleared by the drain that was left
    iso.inbox.clear()


def test_pause_holds_messages_in_order(port_kit: PortKit) -> None:
    loop, send = port_kit.loop, port_kit.send

    async def main() -> list[Any]:
        rec = Recorder(loop, 0)
        me = dartloop.Isolate.current
        iso = loop._isolate
        assert iso is not None
        paused_at = []

        def handler(m: int) -> None:
            rec.record(m)
            if m == 3:
                # A pause from inside the drain: served before the next
                # message, which then waits with the rest of the burst.
                paused_at.append(me.pause())

        port = dartloop.RawReceivePort(handler)
        seen: asyncio.Future[None] = loop.create_future()
        burst_while_blocked(
            loop, lambda: [send(port.send_port, i) for i in range(10)], lambda: loop.call_soon(seen.set_result, None)
        )
        await seen  # queued behind the drain's wakeup: the drain has run
        assert rec.out == [0, 1, 2, 3]
        assert len(iso.held) == 6
        # Sent while paused: held behind them, in order.
        _run_thread(lambda: [send(port.send_port, i) for i in range(10, 15)])
        hop: asyncio.Future[None] = loop.create_future()
        loop.call_soon_threadsafe(hop.set_result, None)
        await hop
        assert rec.out == [0, 1, 2, 3] and len(iso.held) == 11
        rec.expected = 15
        me.resume(paused_at[0])
        await rec.done
        port.close()
        return rec.out

    assert port_kit.run(main()) == list(range(15))
    assert not port_kit.errors


def _flood_target_entry(reply: dartloop.SendPort) -> None:
    """Takes 300 messages, reports them, then closes its only port (the isolate ends)."""
    got: list[int] = []

    def handler(m: int) -> None:
        got.append(m)
        if len(got) == 300:
            port.close()
            reply.send(got)

    port = dartloop.RawReceivePort(handler)
    reply.send(port.send_port)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_sending_from_a_plain_thread_while_the_isolate_ends(backend: str, path: str) -> None:
    send = _send_for(path)
    loop, _ = make_loop(backend, path)
    stop = threading.Event()
    sent: list[int] = []
    raised: list[BaseException] = []

    async def main() -> tuple[list[int], Any]:
        inbox = Inbox()
        saved = _loop.SPEEDUPS
        if path == "pure":
            _loop.SPEEDUPS = None  # the spawned isolate's loop too
        try:
            await dartloop.Isolate.spawn(_flood_target_entry, inbox.send_port, on_exit=inbox.send_port, debug_name="flooded")
        finally:
            _loop.SPEEDUPS = saved
        target = await inbox.next()
        t = threading.Thread(target=_flood, args=(send, target, stop, raised, sent))
        t.start()
        got = await inbox.next()
        exited = await inbox.next()  # the isolate is dead; the flood goes on
        assert not sent
        await asyncio.to_thread(_send_many, target, send)
        stop.set()
        t.join()
        inbox.close()
        return got, exited

    try:
        got, exited = loop.run_until_complete(main())
    finally:
        loop.close()
    assert raised == []
    assert got == list(range(300))
    assert exited is None
    assert sent and sent[0] >= 300


def _flood(
    send: Callable[[dartloop.SendPort, object], None],
    target: dartloop.SendPort,
    stop: threading.Event,
    raised: list[BaseException],
    counts: list[int],
) -> None:
    # Sends 0, 1, 2, ... until stop is set; then records how many it sent
    # (and anything the sends raised, which must be nothing).
    i = 0
    try:
        while not stop.is_set():
            send(target, i)
            i += 1
    except BaseException as exc:  # pragma: no cover - the failure reported below
        raised.append(exc)
    counts.append(i)


def _send_many(target: dartloop.SendPort, send: Callable[[dartloop.SendPort, object], None]) -> None:
    # Sends to a dead isolate return at once without raising.
    for i in range(1000):
        send(target, i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_sending_while_the_root_isolate_closes_never_raises(backend: str, path: str) -> None:
    send = _send_for(path)
    loop, _ = make_loop(backend, path)
    stop = threading.Event()
    raised: list[BaseException] = []
    counts: list[int] = []

    async def main() -> tuple[dartloop.SendPort, list[int]]:
        rec = Recorder(loop, 500)
        port = dartloop.RawReceivePort(lambda m: rec.record(m))
        sp = port.send_port

        t = threading.Thread(target=_flood, args=(send, sp, stop, raised, counts))
        t.start()
        threads.append(t)
        await rec.done
        return sp, rec.out

    threads: list[threading.Thread] = []
    try:
        sp, out = loop.run_until_complete(main())
    finally:
        loop.close()  # ports closed, inbox cleared, loop gone: while the flood goes on
    _send_many(sp, send)
    stop.set()
    for t in threads:
        t.join()
    assert raised == []
    assert out[:500] == list(range(500))
    assert counts and counts[0] >= 500


def test_no_leaks_and_the_state_is_collected(plain_port_kit: PortKit) -> None:
    import tracemalloc

    loop, send = plain_port_kit.loop, plain_port_kit.send
    probe = "leak probe " + plain_port_kit.send_path  # a str: shared as it is
    copied = [probe, {"k": probe}]
    unsendable = [probe, threading.Lock()]

    def handler(m: Any) -> None:
        if m == "raise":
            # A new one each time: a reused exception would collect the
            # traceback (and frames) of every raise.
            raise ValueError("boom")

    async def burst(port: dartloop.RawReceivePort, closed: dartloop.SendPort) -> None:
        done = loop.create_future()
        marker = dartloop.RawReceivePort(lambda m: done.set_result(None))

        def produce() -> None:
            for _ in range(500):
                send(port.send_port, probe)
                send(port.send_port, copied)
                send(closed, probe)
                try:
                    send(port.send_port, unsendable)
                except TypeError:
                    pass
            send(port.send_port, "raise")
            send(marker.send_port, None)

        _run_thread(produce)
        await done
        marker.close()

    async def main() -> tuple[int, int, list[int]]:
        port = dartloop.RawReceivePort(handler)
        gone = dartloop.RawReceivePort()
        gone.close()
        core = port._core
        await burst(port, gone.send_port)  # warm up: caches, deque blocks
        plain_port_kit.errors.clear()
        gc.collect()
        refs = [sys.getrefcount(x) for x in (probe, copied, unsendable, core, handler, port.send_port, loop._isolate)]
        tracemalloc.start()
        try:
            await burst(port, gone.send_port)
            plain_port_kit.errors.clear()
            gc.collect()
            first = tracemalloc.get_traced_memory()[0]
            for _ in range(5):
                await burst(port, gone.send_port)
                plain_port_kit.errors.clear()
            gc.collect()
            last = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        after = [sys.getrefcount(x) for x in (probe, copied, unsendable, core, handler, port.send_port, loop._isolate)]
        port.close()
        assert after == refs
        return first, last, refs

    first, last, _ = plain_port_kit.run(main())
    assert last - first < 64 * 1024, (first, last)
    state = weakref.ref(loop._isolate)  # type: ignore[arg-type]
    loop.close()
    for _ in range(3):
        gc.collect()
    assert state() is None  # the C drain bound to the state is no uncollectable cycle


# ---------------------------------------------------------------------------
# Housekeeping
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_loops_are_collected(backend: str, path: str) -> None:
    loop, _ = make_loop(backend, path)
    loop.run_until_complete(asyncio.sleep(0))
    loop.call_later(5, print)
    loop.close()
    ref = weakref.ref(loop)
    del loop
    for _ in range(3):
        gc.collect()
    assert ref() is None


def _loop_dict_size() -> int:
    return len(vars(asyncio.get_running_loop()))


async def _use_every_loop_feature() -> int:
    # Everything that makes dartloop store a field on its loop: an async
    # generator, an executor job, a Dart timer, a transport, a spawned isolate.
    loop = asyncio.get_running_loop()

    async def agen() -> Any:
        yield 1

    assert [x async for x in agen()] == [1]
    assert await loop.run_in_executor(None, int, "7") == 7
    fired = loop.create_future()
    dartloop.Timer.run(lambda: fired.set_result(None))
    await fired
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    b.sendall(b"x")
    assert await reader.readexactly(1) == b"x"
    writer.close()
    await writer.wait_closed()
    b.close()
    in_isolate = await dartloop.Isolate.run(_loop_dict_size)
    return max(in_isolate, len(vars(loop)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_instance_dict_keeps_its_keys_shared(backend: str, path: str) -> None:
    # CPython's specializer makes asyncio's ``self._ready``-style reads and
    # ``self.call_soon``-style method loads fast only while the instance dict
    # shares its keys with the class: at most 29 keys, and (3.13) no
    # __slots__ in the class, which would drop the inline values. Both held
    # on the asyncio backend cost 25% of a call_soon chain on 3.13.
    loop, _ = make_loop(backend, path)
    try:
        most = loop.run_until_complete(_use_every_loop_feature())
        assert most <= 29, sorted(vars(loop))
        if backend == "asyncio":
            stock = asyncio.SelectorEventLoop()
            try:
                assert type(loop).__basicsize__ == type(stock).__basicsize__
                # A spawned isolate's loop class too (its mixin has no slots).
                spawned = _loop._loop_class("asyncio", loop.strict, spawned=True)  # type: ignore[attr-defined]
                assert spawned.__basicsize__ == type(stock).__basicsize__
                assert spawned.__flags__ == type(loop).__flags__
            finally:
                stock.close()
    finally:
        loop.close()


def test_accelerator_selection() -> None:
    if os.environ.get("DARTLOOP_NO_EXTENSIONS") == "1":
        assert _loop.SPEEDUPS is None
    elif REQUIRE:
        assert _loop.SPEEDUPS is not None


@pytest.mark.parametrize("path", PATHS)
def test_write_to_self_after_close_is_a_no_op(path: str) -> None:
    loop, _ = make_loop("asyncio", path)
    loop._write_to_self()  # type: ignore[attr-defined]
    assert os.read(loop._ssock.fileno(), 16) == b"\0"  # type: ignore[attr-defined]
    loop.close()
    loop._write_to_self()  # type: ignore[attr-defined]


def _source_hash(func: Callable[..., Any]) -> str:
    src = textwrap.dedent(inspect.getsource(func))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


# The Python methods that dartloop/_speedups.c mirrors. When one of them
# changes, change its C counterpart to match, then update the hash here.
MIRRORED = {
    "DartEventLoop._run_pending_immediate_callback": "b257e6708a009aa6",
    "schedule_microtask": "303a44b42e9756d6",
    "_UVDartLoop._run_event": "ca677250b0c20477",
    "_UVDartLoop._run_timer_event": "00b33f051114bb54",
    "_UVDartLoop._run_due_timer": "cb0c673b9d8ee4e3",
    "_UVDartLoop.call_soon": "ba7142835d333406",
    "_UVDartLoop.call_soon_threadsafe": "df13abcf335f8690",
    "_UVDartLoop.call_later": "0566a20e56a9dcc6",
    "_protocols._drained": "ae63bbf359714992",
    "_isolate._dispatch_native": "af4cd94b17cf1625",
    "SendPort.send": "4431a5413dd17b12",
    "_IsolateState.post": "c89785f21f6bf10c",
    "_IsolateState._drain_inbox": "453434d38276479d",
}


def _mirrored_functions() -> dict[str, Callable[..., Any]]:
    from dartloop import _isolate, _ports, _protocols

    out: dict[str, Callable[..., Any]] = {
        "DartEventLoop._run_pending_immediate_callback": _loop.DartEventLoop._run_pending_immediate_callback,
        "schedule_microtask": _microtasks._schedule_microtask_py,
        "_protocols._drained": _protocols._drained_py,
        "_isolate._dispatch_native": _isolate._dispatch_native,
        # The C send inlines post, as the pure send does.
        "SendPort.send": _ports.SendPort._send_py,
        "_IsolateState.post": _isolate._IsolateState.post,
        "_IsolateState._drain_inbox": _isolate._IsolateState._drain_inbox,
    }
    if _loop._UVDartLoop is not None:
        for name in ("_run_event", "_run_timer_event", "_run_due_timer", "call_soon", "call_soon_threadsafe", "call_later"):
            out[f"_UVDartLoop.{name}"] = getattr(_loop._UVDartLoop, name)
    return out


def test_c_mirrors_are_in_step_with_the_python_reference() -> None:
    changed = {
        name: _source_hash(func)
        for name, func in _mirrored_functions().items()
        if _source_hash(func) != MIRRORED[name]
    }
    assert not changed, (
        "these pure-Python methods changed; update their C versions in dartloop/_speedups.c "
        f"to match, then the hashes in MIRRORED: {changed}"
    )
