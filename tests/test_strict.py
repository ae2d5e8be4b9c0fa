"""``strict=True``: asyncio future callbacks run as microtasks, on both backends.

Each scenario runs on a strict loop and on a default loop of the same
backend, and the two event lists are compared with what each mode promises.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from _loop_helpers import DART_BACKENDS, run_on

import dartloop
from dartloop import Timer, schedule_microtask

pytestmark = pytest.mark.parametrize("backend", DART_BACKENDS)


def run_mode(backend: str, strict: bool, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    def factory() -> asyncio.AbstractEventLoop:
        loop = dartloop.new_event_loop(backend=backend, strict=strict)
        assert loop.strict is strict
        return loop

    return run_on(factory, main)


def both_modes(backend: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[Any, Any]:
    return run_mode(backend, True, main), run_mode(backend, False, main)


async def in_one_event(body: Callable[[], None], log: list[str]) -> list[str]:
    """Run ``body`` as one event, then wait until everything it queued ran."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def event() -> None:
        body()
        Timer(0.005, lambda: done.set_result(None))

    loop.call_soon(event)
    await done
    return log


def test_done_callback_runs_before_a_queued_timer_event(backend: str) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        fut = loop.create_future()
        fut.add_done_callback(lambda f: log.append(f"done callback {f.result()}"))

        def body() -> None:
            Timer.run(lambda: log.append("Timer.run"))
            fut.set_result(1)
            schedule_microtask(log.append, "microtask")

        return await in_one_event(body, log)

    strict, default = both_modes(backend, main)
    assert strict == ["done callback 1", "microtask", "Timer.run"]
    assert default == ["microtask", "Timer.run", "done callback 1"]


def test_add_done_callback_on_a_done_future(backend: str) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        fut = loop.create_future()
        fut.set_result("x")

        def body() -> None:
            Timer.run(lambda: log.append("Timer.run"))
            fut.add_done_callback(lambda f: log.append("late listener"))
            schedule_microtask(log.append, "microtask")

        return await in_one_event(body, log)

    strict, default = both_modes(backend, main)
    assert strict == ["late listener", "microtask", "Timer.run"]
    assert default == ["microtask", "Timer.run", "late listener"]


def test_task_wakeup_is_a_microtask(backend: str) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        fut = loop.create_future()

        async def waiter() -> None:
            log.append(f"resumed with {await fut}")
            schedule_microtask(log.append, "microtask of resumed task")

        task = loop.create_task(waiter())
        await asyncio.sleep(0)  # the task starts and waits

        def body() -> None:
            Timer.run(lambda: log.append("Timer.run"))
            fut.set_result("v")
            schedule_microtask(log.append, "microtask")

        await in_one_event(body, log)
        await task
        return log

    strict, default = both_modes(backend, main)
    assert strict == ["resumed with v", "microtask", "microtask of resumed task", "Timer.run"]
    assert default == ["microtask", "Timer.run", "resumed with v", "microtask of resumed task"]


def test_create_task_still_starts_in_a_later_event(backend: str) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []

        async def child() -> None:
            log.append("task started")

        def body() -> None:
            Timer.run(lambda: log.append("Timer.run before"))
            loop.create_task(child())
            schedule_microtask(log.append, "microtask")
            Timer.run(lambda: log.append("Timer.run after"))

        return await in_one_event(body, log)

    strict, default = both_modes(backend, main)
    assert strict == default == ["microtask", "Timer.run before", "task started", "Timer.run after"]


def test_awaiting_a_done_future_costs_no_hop(backend: str) -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done_fut = loop.create_future()
        done_fut.set_result("ready")
        Timer.run(lambda: log.append("Timer.run"))
        schedule_microtask(log.append, "microtask")
        log.append(await done_fut)
        log.append("continued")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return log

    strict, default = both_modes(backend, main)
    assert strict == default == ["ready", "continued", "microtask", "Timer.run"]


def test_await_chain_completes_in_one_drain(backend: str) -> None:
    # Tasks a -> b -> c awaiting each other: completing c's future resumes
    # all three in the same drain under strict=True; each resumption is its
    # own event otherwise.
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        fut = loop.create_future()

        async def c() -> str:
            return await fut

        async def b() -> str:
            r = await loop.create_task(c())
            log.append("b resumed")
            return r

        async def a() -> None:
            await loop.create_task(b())
            log.append("a resumed")

        task = loop.create_task(a())
        await asyncio.sleep(0)

        def body() -> None:
            fut.set_result(None)
            loop.call_soon(log.append, "event queued with the completion")

        await in_one_event(body, log)
        await task
        return log

    strict, default = both_modes(backend, main)
    assert strict == ["b resumed", "a resumed", "event queued with the completion"]
    assert default == ["event queued with the completion", "b resumed", "a resumed"]


def test_strict_loop_cancellation_and_gather(backend: str) -> None:
    async def main() -> list[Any]:
        async def sleeper() -> None:
            await asyncio.sleep(10)

        task = asyncio.get_running_loop().create_task(sleeper())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        results = await asyncio.gather(*(asyncio.sleep(0, result=i) for i in range(5)))
        async with asyncio.timeout(0.01):
            await asyncio.sleep(0)
        return results

    strict, default = both_modes(backend, main)
    assert strict == default == [0, 1, 2, 3, 4]


def test_strict_microtask_handle_cancel_is_accepted(backend: str) -> None:
    async def main() -> bool:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.set_result(None)
        ran: list[bool] = []
        handle = loop.call_soon(lambda f: ran.append(True), fut)
        handle.cancel()
        await asyncio.sleep(0)
        return bool(ran)

    # Strict: it was queued as a microtask, which can't be withdrawn.
    assert run_mode(backend, True, main) is True
    assert run_mode(backend, False, main) is False


def test_strict_policy_and_run(backend: str) -> None:
    async def main() -> tuple[str, bool]:
        loop = asyncio.get_running_loop()
        return loop.backend, loop.strict  # type: ignore[attr-defined]

    assert dartloop.run(main(), backend=backend, strict=True) == (backend, True)
    factory = functools.partial(dartloop.new_event_loop, backend=backend, strict=True)
    assert run_on(factory, main) == (backend, True)
