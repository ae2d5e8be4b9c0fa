"""Isolates: spawn, run, exit, current, kill, pause/resume, ping, listeners,
errors, the lifetime rule, inheritance of backend and mode, wrong inputs.

Every ``async def`` test runs on both backends (``[dartloop-asyncio]`` and
``[dartloop-uvloop]``, see tests/conftest.py); the few synchronous tests loop
over the backends themselves. Ordering is checked with exact message lists.
Messages from one thread to the ports of one isolate arrive in send order, so
a message sent after another by the same isolate is a reliable marker ("the
earlier one has been sent, or never will be"). Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import threading
import traceback
import weakref
from typing import Any

import pytest
from _isolate_helpers import Inbox, isolate_threads, join_isolate_threads, turns

import dartloop
from dartloop import (
    Capability,
    Completer,
    Isolate,
    IsolateSpawnException,
    RawReceivePort,
    ReceivePort,
    RemoteError,
    SendPort,
    Timer,
    schedule_microtask,
)

BACKENDS = dartloop.available_backends()

# Strong references to tasks that wait on a future nothing else references.
# Such a task is garbage: the cyclic GC may collect it (closing its coroutine
# in whichever thread collects) before the isolate ends and cancels it, so a
# test that expects it to be cancelled keeps it here and clears the list.
_KEPT: list[Any] = []


def _command_entry(port: SendPort) -> None:
    """A child that stays alive and obeys commands sent to the port it sends back.

    ``"quit"`` closes its port (so it ends), ``"raise"`` raises ValueError("boom")
    in the handler, anything else is echoed back.
    """
    own = RawReceivePort()

    def handler(m: Any) -> None:
        if m == "quit":
            own.close()
        elif m == "raise":
            raise ValueError("boom")
        else:
            port.send(("echo", m))

    own.handler = handler
    port.send(own.send_port)


async def _spawn_commanded(inbox: Inbox, **kwargs: Any) -> tuple[Isolate, SendPort]:
    iso = await Isolate.spawn(_command_entry, inbox.send_port, **kwargs)
    child = await inbox.next()
    assert isinstance(child, SendPort)
    return iso, child


async def _flush_after_thread(inbox: Inbox, debug_name: str) -> None:
    """Wait until everything the (ending) isolate ``debug_name`` sent to
    ``inbox`` has been dispatched: join its thread, then send a marker from
    another thread, which queues behind all of it."""
    await asyncio.to_thread(join_isolate_threads, debug_name)
    await asyncio.to_thread(inbox.send_port.send, "flush")
    while "flush" not in inbox.messages:
        await inbox.next()


# --------------------------------------------------------------------------
# spawn


def _hello_entry(port: SendPort) -> None:
    me = Isolate.current
    port.send(("hello", me.debug_name, threading.current_thread() is not threading.main_thread(), me.control_port))


async def test_spawn_plain_entry() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_hello_entry, inbox.send_port, on_exit=inbox.send_port)
    assert isinstance(iso, Isolate)
    assert iso.debug_name == "_hello_entry"
    assert isinstance(iso.control_port, SendPort)
    assert isinstance(iso.pause_capability, Capability) and isinstance(iso.terminate_capability, Capability)
    hello, exited = await inbox.wait_for(2)
    assert hello == ("hello", "_hello_entry", True, iso.control_port)
    assert exited is None
    inbox.close()


async def test_spawn_debug_name() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_hello_entry, inbox.send_port, debug_name="worker-7")
    assert iso.debug_name == "worker-7"
    hello = await inbox.next()
    assert hello[1] == "worker-7"
    inbox.close()


async def _async_entry(port: SendPort) -> None:
    events: list[str] = ["start"]
    await asyncio.sleep(0)
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    Timer.run(lambda: fut.set_result("timer"))
    events.append(await fut)
    schedule_microtask(events.append, "mt")
    Timer.run(lambda: port.send(events))
    events.append("end")


async def test_spawn_async_entry() -> None:
    inbox = Inbox()
    await Isolate.spawn(_async_entry, inbox.send_port, on_exit=inbox.send_port)
    assert await inbox.wait_for(2) == [["start", "timer", "end", "mt"], None]
    inbox.close()


def _first_event_entry(port: SendPort) -> None:
    events: list[str] = []
    loop = asyncio.get_running_loop()
    loop.call_soon(events.append, "call_soon")
    Timer.run(lambda: port.send(events))
    schedule_microtask(lambda: (events.append("mt"), schedule_microtask(events.append, "mt2")))
    events.append("entry")


async def test_entry_runs_as_first_event_and_its_microtasks_drain_after_it() -> None:
    inbox = Inbox()
    await Isolate.spawn(_first_event_entry, inbox.send_port)
    assert await inbox.next() == ["entry", "mt", "mt2", "call_soon"]
    inbox.close()


def _entry_sends(port: SendPort) -> None:
    port.send("entry ran")


async def test_spawn_paused() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_entry_sends, inbox.send_port, paused=True, on_exit=inbox.send_port)
    # Control messages are served while paused; the entry waits.
    iso.ping(inbox.send_port, "pong")
    assert await inbox.next() == "pong"
    iso.add_on_exit_listener(inbox.send_port, "bye")  # safe: it can't have ended
    iso.resume(iso.pause_capability)
    assert await inbox.wait_for(3) == ["pong", "entry ran", "bye"]
    inbox.close()


def _raise_entry(port: SendPort) -> None:
    schedule_microtask(port.send, "microtask")
    Timer.run(lambda: port.send("timer"))
    raise ValueError("boom")


async def test_spawn_on_error_and_on_exit_errors_fatal() -> None:
    inbox = Inbox()
    await Isolate.spawn(_raise_entry, inbox.send_port, on_error=inbox.send_port, on_exit=inbox.send_port)
    error, exited = await inbox.wait_for(2)
    assert exited is None
    description, trace = error
    assert description == "ValueError: boom"
    assert "Traceback (most recent call last)" in trace and "_raise_entry" in trace and trace.rstrip().endswith("ValueError: boom")
    await _flush_after_thread(inbox, "_raise_entry")
    # Fatal: the queued microtask was dropped and the timer never ran.
    assert inbox.messages == [error, None, "flush"]
    inbox.close()


async def test_spawn_errors_not_fatal() -> None:
    inbox = Inbox()
    await Isolate.spawn(
        _raise_entry, inbox.send_port, errors_are_fatal=False, on_error=inbox.send_port, on_exit=inbox.send_port
    )
    messages = await inbox.wait_for(4)
    assert messages[0][0] == "ValueError: boom"
    # Not fatal: the drain follows the failed event, then the timer runs, then
    # the isolate ends on its own.
    assert messages[1:] == ["microtask", "timer", None]
    inbox.close()


# --------------------------------------------------------------------------
# Isolate.run

HOLDER: list[Any] = []


def _make_result(tag: str) -> dict[str, Any]:
    result = {"tag": tag, "items": [1, 2, 3]}
    HOLDER.append(result)
    return result


async def _make_result_async(tag: str) -> dict[str, Any]:
    await asyncio.sleep(0)
    return _make_result(tag)


async def test_run_result_is_not_copied() -> None:
    result = await Isolate.run(_make_result, "plain")
    assert result is HOLDER[-1] and result["tag"] == "plain"
    result = await Isolate.run(_make_result_async, tag="async")
    assert result is HOLDER[-1] and result["tag"] == "async"
    assert await Isolate.run(pow, 3, 4) == 81
    assert await Isolate.run(lambda: threading.current_thread().name, debug_name="named") == "dartloop-isolate-named"


async def test_run_joins_its_thread() -> None:
    before = threading.active_count()
    for i in range(20):
        assert await Isolate.run(abs, -i) == i
    assert threading.active_count() == before


class CustomError(Exception):
    pass


def _raise_custom(x: int) -> None:
    raise CustomError(f"custom {x}")


async def _raise_async() -> None:
    await asyncio.sleep(0)
    raise KeyError("missing")


async def test_run_exception_same_type_with_remote_cause() -> None:
    with pytest.raises(CustomError, match="custom 5") as info:
        await Isolate.run(_raise_custom, 5)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert cause.description == "test_isolates.CustomError: custom 5" or cause.description.endswith("CustomError: custom 5")
    assert "Traceback (most recent call last)" in cause.stack_trace
    assert "_raise_custom" in cause.stack_trace
    assert str(cause) == cause.description

    with pytest.raises(KeyError) as kinfo:
        await Isolate.run(_raise_async)
    assert isinstance(kinfo.value.__cause__, RemoteError)
    assert "_raise_async" in kinfo.value.__cause__.stack_trace


class UnsendableError(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def _raise_unsendable() -> None:
    raise UnsendableError()


def _return_unsendable() -> Any:
    return threading.Lock()


async def test_run_unsendable_exception_or_result_is_remote_error() -> None:
    with pytest.raises(RemoteError) as info:
        await Isolate.run(_raise_unsendable)
    assert type(info.value) is RemoteError
    assert info.value.description.startswith("TypeError:") and "lock" in info.value.description
    with pytest.raises(RemoteError) as info:
        await Isolate.run(_return_unsendable)
    assert info.value.description.startswith("TypeError:") and "lock" in info.value.description


async def _hang_on_future() -> None:
    await asyncio.get_running_loop().create_future()


async def _hang_on_completer() -> None:
    await Completer().future


def _exit_without_port() -> None:
    Isolate.exit()


def _kill_self() -> None:
    Isolate.current.kill(priority=Isolate.IMMEDIATE)


async def test_run_ended_without_result() -> None:
    for computation in (_hang_on_future, _hang_on_completer, _exit_without_port, _kill_self):
        with pytest.raises(RemoteError) as info:
            await Isolate.run(computation)
        assert type(info.value) is RemoteError
        assert str(info.value) == "Computation ended without result"


async def _uncaught_in_child() -> None:
    def boom() -> None:
        raise ValueError("boom")

    Timer.run(boom)
    await asyncio.get_running_loop().create_future()


async def test_run_uncaught_error_is_remote_error() -> None:
    with pytest.raises(RemoteError) as info:
        await Isolate.run(_uncaught_in_child)
    assert type(info.value) is RemoteError
    assert info.value.description == "ValueError: boom"
    assert "boom" in info.value.stack_trace and "Traceback" in info.value.stack_trace


def test_isolate_thread_start_does_not_wait_for_the_thread() -> None:
    # The stock Thread.start() returns only once the new thread has run far
    # enough to report that it started (so is_alive() is True at return); an
    # isolate's thread is started without that wait, which costs the spawner
    # two cross-core hand-overs. With a 60 s switch interval the new thread
    # can't take the GIL from this one before it blocks.
    from dartloop._isolate import _IsolateThread

    ran, release = threading.Event(), threading.Event()
    saved = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        thread = _IsolateThread(ran.set, "start-probe")
        stock = threading.Thread(target=release.wait)
        thread.start()
        alive_at_return = thread.is_alive()
        stock.start()
        stock_alive_at_return = stock.is_alive()
        # join() before the thread has started waits for it, where the
        # stock join() would raise "cannot join thread before it is started".
        thread.join()
        release.set()
        stock.join()
    finally:
        sys.setswitchinterval(saved)
    assert (alive_at_return, stock_alive_at_return) == (False, True)
    assert ran.is_set() and not thread.is_alive() and not stock.is_alive()


def test_isolate_thread_join_with_a_timeout_before_it_starts() -> None:
    from dartloop._isolate import _IsolateThread

    go = threading.Event()
    saved = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        thread = _IsolateThread(go.wait, "join-probe")
        thread.start()
        thread.join(0)  # returns at once, started or not, without raising
        go.set()
        thread.join()
    finally:
        sys.setswitchinterval(saved)
    assert not thread.is_alive()


async def test_run_joins_a_slow_teardown_without_blocking_the_loop() -> None:
    # The uncaught error reaches the caller at once; the isolate then cancels
    # a leftover task whose cleanup waits for the caller's loop: Isolate.run
    # must wait for the thread without blocking that loop.
    gate = threading.Event()
    tearing_down = RawReceivePort(lambda m: gate.set())
    signal = tearing_down.send_port

    async def computation() -> None:
        async def lingering() -> None:
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                signal.send("tearing down")
                gate.wait()

        def boom() -> None:
            raise ValueError("boom")

        # Kept: a task waiting on a future that nothing else references is
        # garbage, and the cyclic GC may collect it (and run its finally in
        # whichever thread collects) before the isolate ends.
        _KEPT.append(asyncio.get_running_loop().create_task(lingering()))
        Timer.run(boom)
        await asyncio.get_running_loop().create_future()

    before = threading.active_count()
    with pytest.raises(RemoteError, match="ValueError: boom"):
        await Isolate.run(computation, debug_name="slow-teardown")
    assert gate.is_set()
    assert isolate_threads("slow-teardown") == []
    assert threading.active_count() == before
    tearing_down.close()
    _KEPT.clear()


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_the_root_loop_ends_its_isolates(backend: str) -> None:
    async def main() -> None:
        inbox = Inbox()
        await Isolate.spawn(_busy_entry, inbox.send_port, debug_name="orphan")
        assert await inbox.next() == "spinning"
        await Isolate.spawn(_command_entry, inbox.send_port, debug_name="orphan")
        assert isinstance(await inbox.next(), SendPort)
        # Returning leaves both running: closing the loop kills and joins them.

    before = threading.active_count()
    dartloop.run(main(), backend=backend)
    assert isolate_threads("orphan") == []
    assert threading.active_count() == before


async def test_run_wrong_inputs() -> None:
    before = threading.active_count()
    with pytest.raises(IsolateSpawnException):
        await Isolate.run(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"lock"):
        await Isolate.run(print, threading.Lock())
    with pytest.raises(TypeError, match=r"lock"):
        await Isolate.run(print, key=threading.Lock())
    assert threading.active_count() == before


# --------------------------------------------------------------------------
# Isolate.exit

EXIT_HOLDER: list[Any] = []


def _exit_entry(port: SendPort) -> None:
    message = {"big": list(range(10)), "nested": [[1], [2]]}
    EXIT_HOLDER.append(message)
    schedule_microtask(port.send, "never")
    try:
        Isolate.exit(port, message)
    finally:
        EXIT_HOLDER.append("finally")
    port.send("not reached")  # pragma: no cover


async def test_exit_message_before_exit_notification_same_object() -> None:
    inbox = Inbox()
    await Isolate.spawn(_exit_entry, inbox.send_port, on_exit=inbox.send_port)
    message, exited = await inbox.wait_for(2)
    assert message is EXIT_HOLDER[-2] and exited is None
    assert EXIT_HOLDER[-1] == "finally"
    await _flush_after_thread(inbox, "_exit_entry")
    assert inbox.messages == [message, None, "flush"]
    inbox.close()


def _exit_with_callbacks_queued(port: SendPort) -> None:
    loop = asyncio.get_running_loop()

    async def leftover() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            port.send("leftover task's finally")

    loop.create_task(leftover())
    loop.call_soon(port.send, "before exit")
    loop.call_soon(Isolate.exit, port, "exit")
    loop.call_soon(port.send, "queued after exit: must not run")
    loop.call_later(0, port.send, "timer after exit: must not run")
    Timer.run(lambda: port.send("Dart timer after exit: must not run"))


async def test_nothing_queued_after_exit_runs_but_leftover_tasks_unwind() -> None:
    """Dart runs nothing of an isolate after its exit; Python still cancels its
    tasks. On uvloop too, which runs the rest of its ready queue after a
    ``SystemExit`` escaped a callback."""
    inbox = Inbox()
    await Isolate.spawn(_exit_with_callbacks_queued, inbox.send_port, on_exit=inbox.send_port,
                        debug_name="exit-with-callbacks")
    await inbox.wait_for(4)
    await _flush_after_thread(inbox, "exit-with-callbacks")
    inbox.close()
    assert inbox.messages == ["before exit", "leftover task's finally", "exit", None, "flush"]


def _exit_unsendable_entry(port: SendPort) -> None:
    try:
        Isolate.exit(port, [threading.Lock()])
    except TypeError as exc:
        port.send(("refused", str(exc)))
    port.send("still alive")


async def test_exit_with_unsendable_message_raises_and_does_not_exit() -> None:
    inbox = Inbox()
    await Isolate.spawn(_exit_unsendable_entry, inbox.send_port, on_exit=inbox.send_port)
    refused, alive, exited = await inbox.wait_for(3)
    assert refused[0] == "refused" and "message[0]" in refused[1]
    assert alive == "still alive" and exited is None
    inbox.close()


# --------------------------------------------------------------------------
# Isolate.current


async def test_current_in_root_isolate() -> None:
    me = Isolate.current
    assert isinstance(me, Isolate)
    assert me == Isolate.current and hash(me) == hash(Isolate.current)
    assert me.debug_name == "main"
    assert isinstance(me.control_port, SendPort)
    assert isinstance(me.pause_capability, Capability)
    assert isinstance(me.terminate_capability, Capability)
    with pytest.raises(TypeError):
        RawReceivePort().send_port.send(me)  # an Isolate can't be sent


def _current_entry(port: SendPort) -> None:
    me = Isolate.current
    port.send([me.control_port, me.pause_capability, me.terminate_capability, me.debug_name])


async def test_current_in_spawned_isolate_matches_spawn_handle() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_current_entry, inbox.send_port, debug_name="cur")
    assert await inbox.next() == [iso.control_port, iso.pause_capability, iso.terminate_capability, "cur"]
    assert iso != Isolate.current
    inbox.close()


def test_current_without_loop_raises() -> None:
    with pytest.raises(RuntimeError, match="dartloop"):
        Isolate.current  # noqa: B018

    async def on_stock_asyncio() -> None:
        with pytest.raises(RuntimeError, match="dartloop"):
            Isolate.current  # noqa: B018
        with pytest.raises(RuntimeError, match="dartloop"):
            await Isolate.spawn(print, None)
        with pytest.raises(RuntimeError, match="dartloop"):
            RawReceivePort()
        with pytest.raises(RuntimeError, match="dartloop"):
            Isolate.exit()

    asyncio.run(on_stock_asyncio())
    with pytest.raises(RuntimeError, match="dartloop"):
        ReceivePort()


# --------------------------------------------------------------------------
# kill


async def test_kill_before_next_event() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    child.send("hello")
    assert await inbox.next() == ("echo", "hello")
    iso.kill()
    assert await inbox.next() is None
    child.send("dropped")  # dead isolate: dropped silently
    inbox.close()


def _kill_self_before_next_event(port: SendPort) -> None:
    # Only the isolate's own queues: plain asyncio callbacks already queued
    # with call_soon may still run while the isolate ends on uvloop (which
    # runs the rest of its ready queue before run_forever returns).
    own = RawReceivePort(lambda m: port.send(m))
    Timer.run(lambda: port.send("timer"))
    own.send_port.send("own message")
    Isolate.current.kill(priority=Isolate.BEFORE_NEXT_EVENT)
    schedule_microtask(port.send, "microtask")
    port.send("after kill")


async def test_kill_self_before_next_event_ends_after_current_event() -> None:
    inbox = Inbox()
    await Isolate.spawn(_kill_self_before_next_event, inbox.send_port, on_exit=inbox.send_port)
    await _flush_after_thread(inbox, "_kill_self_before_next_event")
    # The current event and its microtasks complete; no later event runs.
    assert inbox.messages == ["after kill", "microtask", None, "flush"]
    inbox.close()


def _busy_entry(port: SendPort) -> None:
    port.send("spinning")
    while True:
        pass


async def test_kill_immediate_interrupts_busy_loop() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_busy_entry, inbox.send_port, on_exit=inbox.send_port, debug_name="busy")
    assert await inbox.next() == "spinning"
    iso.kill(priority=Isolate.IMMEDIATE)
    assert await inbox.next() is None
    await asyncio.to_thread(join_isolate_threads, "busy")
    assert isolate_threads("busy") == []
    inbox.close()


def _busy_with_weakref_callbacks(port: SendPort) -> None:
    class Thing:
        pass

    things: weakref.WeakSet[Thing] = weakref.WeakSet()
    port.send("spinning")
    while True:
        thing = Thing()
        things.add(thing)
        del thing  # runs the WeakSet's weakref callback


async def test_kill_immediate_is_not_lost_in_a_weakref_callback() -> None:
    """The asynchronous exception may land in a weakref callback, where Python
    reports and forgets it: it is raised again, and nothing is reported."""
    for round_ in range(20):
        inbox = Inbox()
        name = f"busy-weakrefs-{round_}"
        iso = await Isolate.spawn(_busy_with_weakref_callbacks, inbox.send_port, on_exit=inbox.send_port,
                                  debug_name=name)
        assert await inbox.next() == "spinning"
        iso.kill(priority=Isolate.IMMEDIATE)
        assert await inbox.next() is None, f"round {round_}"
        await asyncio.to_thread(join_isolate_threads, name)
        inbox.close()


def _kill_self_immediate(port: SendPort) -> None:
    schedule_microtask(port.send, "microtask")
    try:
        Isolate.current.kill(priority=Isolate.IMMEDIATE)
        port.send("kill returned")
    except Exception:  # the unwind is not an Exception
        port.send("caught as Exception")
    finally:
        port.send("finally")


async def test_kill_self_immediate_does_not_return() -> None:
    inbox = Inbox()
    await Isolate.spawn(_kill_self_immediate, inbox.send_port, on_exit=inbox.send_port)
    await _flush_after_thread(inbox, "_kill_self_immediate")
    assert inbox.messages == ["finally", None, "flush"]
    inbox.close()


async def test_kill_idle_isolate_immediate() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port, debug_name="idle-kill")
    iso.kill(priority=Isolate.IMMEDIATE)
    assert await inbox.next() is None
    await asyncio.to_thread(join_isolate_threads, "idle-kill")
    inbox.close()


async def test_kill_needs_terminate_capability() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    restricted = Isolate(iso.control_port, pause_capability=iso.pause_capability)
    restricted.kill()
    Isolate(iso.control_port, terminate_capability=Capability()).kill(priority=Isolate.IMMEDIATE)
    iso.ping(inbox.send_port, "still alive")
    assert await inbox.next() == "still alive"
    iso.kill()
    assert await inbox.next() is None
    inbox.close()


async def test_bad_priority() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox)
    with pytest.raises(ValueError):
        iso.kill(priority=7)
    with pytest.raises(ValueError):
        iso.ping(inbox.send_port, priority=-1)
    child.send("quit")
    inbox.close()


# --------------------------------------------------------------------------
# pause / resume


async def test_pause_holds_messages_in_order_control_still_served() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    resume = iso.pause()
    assert isinstance(resume, Capability)
    for i in range(5):
        child.send(i)
    iso.ping(inbox.send_port, "pong")  # served while paused
    assert await inbox.next() == "pong"
    iso.resume(resume)
    child.send("quit")
    messages = await inbox.wait_for(8)
    assert messages[1:] == ["pong", ("echo", 0), ("echo", 1), ("echo", 2), ("echo", 3), ("echo", 4), None]
    inbox.close()


async def test_pause_wrong_capability_ignored() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    resume = iso.pause(Capability())
    child.send("held")
    iso.resume(Capability())  # wrong: ignored
    iso.resume(iso.pause_capability)  # the pause capability is not the resume capability
    iso.ping(inbox.send_port, "pong")
    assert await inbox.next() == "pong"
    # A handle without the pause capability can't pause or resume.
    Isolate(iso.control_port).resume(resume)
    iso.ping(inbox.send_port, "pong 2")
    assert await inbox.next() == "pong 2"
    iso.resume(resume)
    assert await inbox.next() == ("echo", "held")
    Isolate(iso.control_port).pause()  # ignored: not paused
    child.send("free")
    assert await inbox.next() == ("echo", "free")
    child.send("quit")
    assert await inbox.next() is None
    inbox.close()


def _pause_self_entry(port: SendPort) -> None:
    me = Isolate.current
    cap = me.pause()
    own = RawReceivePort()

    def handler(m: Any) -> None:
        port.send(("got", m))
        own.close()

    own.handler = handler
    Timer.run(lambda: port.send("timer.run"))
    Timer(0, lambda: port.send("timer 0"))
    asyncio.get_running_loop().call_later(0, port.send, "call_later")
    port.send(("paused", cap, own.send_port))


async def test_pause_holds_timers_and_messages_in_order() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_pause_self_entry, inbox.send_port, on_exit=inbox.send_port)
    kind, cap, child = await inbox.next()
    assert kind == "paused"
    child.send("m1")
    iso.ping(inbox.send_port, "pong")
    while "pong" not in inbox.messages:
        await inbox.next()
    iso.resume(cap)
    messages = await inbox.wait_for(7)
    # call_later is a plain asyncio event: pause holds Dart timers and port
    # messages (the isolate's own queue), not asyncio's callbacks.
    assert "call_later" in messages
    rest = [m for m in messages[1:] if m != "call_later"]
    assert rest == ["pong", "timer.run", "timer 0", ("got", "m1"), None]
    inbox.close()


async def test_pause_distinct_capabilities_need_each_resume() -> None:
    # Pausing the root isolate itself: single-threaded, so the ordering is exact.
    me = Isolate.current
    events: list[Any] = []
    port = RawReceivePort(events.append)
    c1, c2 = Capability(), Capability()
    assert me.pause(c1) is c1
    me.pause(c2)
    port.send_port.send("m1")
    Timer.run(lambda: events.append("t1"))
    port.send_port.send("m2")
    await turns()
    assert events == []
    me.resume(c1)
    await turns()
    assert events == []  # still paused by c2
    me.resume(Capability())  # wrong capability
    await turns()
    assert events == []
    me.resume(c2)
    while len(events) < 3:
        await asyncio.sleep(0)
    assert events == ["m1", "t1", "m2"]
    port.close()


async def test_pause_twice_same_capability_needs_one_resume() -> None:
    me = Isolate.current
    events: list[Any] = []
    port = RawReceivePort(events.append)
    cap = me.pause()
    me.pause(cap)
    port.send_port.send("m1")
    await turns()
    assert events == []
    me.resume(cap)
    while not events:
        await asyncio.sleep(0)
    assert events == ["m1"]
    port.close()


# --------------------------------------------------------------------------
# ping


async def test_ping() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    iso.ping(inbox.send_port)
    iso.ping(inbox.send_port, "immediate", priority=Isolate.IMMEDIATE)
    iso.ping(inbox.send_port, 42, priority=Isolate.BEFORE_NEXT_EVENT)
    assert await inbox.wait_for(4) == [child, None, "immediate", 42]
    with pytest.raises(TypeError):
        iso.ping(inbox.send_port, [1, 2])  # responses are simple values
    child.send("quit")
    assert await inbox.next() is None
    iso.ping(inbox.send_port, "to the dead")  # dropped, never raises
    await _flush_after_thread(inbox, "_command_entry")
    assert inbox.messages[-2:] == [None, "flush"]
    inbox.close()


# --------------------------------------------------------------------------
# exit and error listeners


async def test_exit_listeners_readding_replaces_response() -> None:
    a, b, c = Inbox(), Inbox(), Inbox()
    iso, child = await _spawn_commanded(a, debug_name="exit-listeners")
    iso.add_on_exit_listener(a.send_port, "first")
    iso.add_on_exit_listener(a.send_port, "second")
    iso.add_on_exit_listener(b.send_port)
    iso.add_on_exit_listener(c.send_port, "c")
    iso.remove_on_exit_listener(c.send_port)
    with pytest.raises(TypeError):
        iso.add_on_exit_listener(a.send_port, {"not": "simple"})
    with pytest.raises(TypeError):
        iso.add_on_exit_listener("not a port")  # type: ignore[arg-type]
    child.send("quit")
    await _flush_after_thread(a, "exit-listeners")
    await _flush_after_thread(b, "exit-listeners")
    await _flush_after_thread(c, "exit-listeners")
    assert a.messages == [child, "second", "flush"]
    assert b.messages == [None, "flush"]
    assert c.messages == ["flush"]
    for inbox in (a, b, c):
        inbox.close()


async def test_error_listeners_format_and_duplicates() -> None:
    errors, removed, inbox = Inbox(), Inbox(), Inbox()
    iso, child = await _spawn_commanded(inbox, errors_are_fatal=False, debug_name="error-listeners")
    iso.add_error_listener(errors.send_port)
    iso.add_error_listener(errors.send_port)  # duplicates are ignored
    iso.add_error_listener(removed.send_port)
    iso.remove_error_listener(removed.send_port)
    child.send("raise")
    child.send("after")
    assert await inbox.next() == ("echo", "after")
    child.send("quit")
    await _flush_after_thread(errors, "error-listeners")
    await _flush_after_thread(removed, "error-listeners")
    assert len(errors.messages) == 2 and errors.messages[-1] == "flush"
    report = errors.messages[0]
    assert isinstance(report, list) and len(report) == 2
    description, trace = report
    assert description == "ValueError: boom"
    assert description == traceback.format_exception_only(ValueError, ValueError("boom"))[-1].strip()
    assert trace.startswith("Traceback (most recent call last)") and "in handler" in trace
    assert trace.rstrip().endswith("ValueError: boom")
    assert removed.messages == ["flush"]
    for box in (errors, removed, inbox):
        box.close()


async def test_set_errors_fatal_false_keeps_isolate_alive() -> None:
    inbox, errors = Inbox(), Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    iso.add_error_listener(errors.send_port)
    iso.set_errors_fatal(False)
    child.send("raise")
    child.send("still here")
    assert await inbox.next() == ("echo", "still here")
    assert (await errors.next())[0] == "ValueError: boom"
    # Without the terminate capability the flag can't be changed.
    Isolate(iso.control_port).set_errors_fatal(True)
    child.send("raise")
    child.send("still here 2")
    assert await inbox.next() == ("echo", "still here 2")
    iso.set_errors_fatal(True)
    child.send("raise")
    child.send("never answered")
    assert await inbox.next() is None
    assert [e[0] for e in await errors.wait_for(3)] == ["ValueError: boom"] * 3
    inbox.close()
    errors.close()


# --------------------------------------------------------------------------
# The lifetime rule


def _nothing_entry(port: SendPort) -> None:
    pass


def _microtask_entry(port: SendPort) -> None:
    schedule_microtask(lambda: None)


def _dart_timer_entry(port: SendPort) -> None:
    Timer(0.005, lambda: port.send("dart timer"))


def _zero_timer_entry(port: SendPort) -> None:
    Timer(0, lambda: port.send("zero timer"))


def _periodic_timer_entry(port: SendPort) -> None:
    calls = 0

    def tick(timer: Timer) -> None:
        nonlocal calls
        calls += 1  # (timer.tick may skip on a loaded machine: it counts periods)
        port.send(("tick", calls))
        if calls == 3:
            timer.cancel()

    Timer.periodic(0.001, tick)


def _call_later_entry(port: SendPort) -> None:
    asyncio.get_running_loop().call_later(0.005, port.send, "call_later")


async def _sleeping_task_entry(port: SendPort) -> None:
    async def later() -> None:
        await asyncio.sleep(0.005)
        port.send("slept")

    asyncio.get_running_loop().create_task(later())


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (_nothing_entry, [None]),
        (_microtask_entry, [None]),
        (_zero_timer_entry, ["zero timer", None]),
        (_dart_timer_entry, ["dart timer", None]),
        (_periodic_timer_entry, [("tick", 1), ("tick", 2), ("tick", 3), None]),
        (_call_later_entry, ["call_later", None]),
        (_sleeping_task_entry, ["slept", None]),
    ],
)
async def test_isolate_ends_when_no_event_can_come(entry: Any, expected: list[Any]) -> None:
    inbox = Inbox()
    await Isolate.spawn(entry, inbox.send_port, on_exit=inbox.send_port)
    assert await inbox.wait_for(len(expected)) == expected
    inbox.close()


async def test_io_registration_keeps_isolate_alive() -> None:
    inbox = Inbox()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)

    def entry(port: SendPort) -> None:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            data = theirs.recv(100)
            loop.remove_reader(theirs)
            port.send(("read", data))

        loop.add_reader(theirs, readable)

    try:
        iso = await Isolate.spawn(entry, inbox.send_port, on_exit=inbox.send_port)
        iso.ping(inbox.send_port, "pong")
        assert await inbox.next() == "pong"
        ours.send(b"data")
        assert await inbox.wait_for(3) == ["pong", ("read", b"data"), None]
    finally:
        ours.close()
        theirs.close()
        inbox.close()


async def test_executor_job_keeps_isolate_alive() -> None:
    inbox = Inbox()
    release = threading.Event()

    def entry(port: SendPort) -> None:
        job = asyncio.get_running_loop().run_in_executor(None, release.wait)
        job.add_done_callback(lambda f: port.send(("job done", f.result())))

    iso = await Isolate.spawn(entry, inbox.send_port, on_exit=inbox.send_port, debug_name="executor")
    iso.ping(inbox.send_port, "pong")
    assert await inbox.next() == "pong"
    release.set()
    assert await inbox.wait_for(3) == ["pong", ("job done", True), None]
    await asyncio.to_thread(join_isolate_threads, "executor")
    inbox.close()


async def test_to_thread_keeps_isolate_alive() -> None:
    inbox = Inbox()
    release = threading.Event()

    async def entry(port: SendPort) -> None:
        port.send(("waited", await asyncio.to_thread(release.wait)))

    iso = await Isolate.spawn(entry, inbox.send_port, on_exit=inbox.send_port)
    iso.ping(inbox.send_port, "pong")
    assert await inbox.next() == "pong"
    release.set()
    assert await inbox.wait_for(3) == ["pong", ("waited", True), None]
    inbox.close()


async def _leftover_task_entry(port: SendPort) -> None:
    async def waiter() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            port.send("cancelled")
            raise
        finally:
            port.send("finally ran")

    _KEPT.append(asyncio.get_running_loop().create_task(waiter()))  # see _KEPT
    port.send("entry done")


async def test_waiting_tasks_are_cancelled_at_the_end() -> None:
    inbox = Inbox()
    await Isolate.spawn(_leftover_task_entry, inbox.send_port, on_exit=inbox.send_port)
    assert await inbox.wait_for(4) == ["entry done", "cancelled", "finally ran", None]
    inbox.close()
    _KEPT.clear()


async def _many_ways_tasks_entry(message: tuple[SendPort, str]) -> None:
    port, ending = message
    loop = asyncio.get_running_loop()

    waiting: list[str] = []
    all_waiting = asyncio.Event()

    async def waiter(name: str) -> None:
        waiting.append(name)
        if len(waiting) == 4:
            all_waiting.set()
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            port.send(f"cancelled {name}")
            raise

    async def group() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(waiter("TaskGroup child"))

    async def done_soon() -> None:
        return None

    finished = loop.create_task(done_soon())
    await finished
    gone = weakref.ref(finished)
    del finished
    _KEPT.extend([  # see _KEPT
        loop.create_task(waiter("loop.create_task")),
        asyncio.create_task(waiter("asyncio.create_task")),
        asyncio.ensure_future(waiter("ensure_future")),
        loop.create_task(group()),
    ])
    await all_waiting.wait()
    # A finished task is not kept by the isolate's own set of tasks.
    port.send(("finished task freed", gone() is None))
    if ending == "exit":
        Isolate.exit(port, "exit")


@pytest.mark.parametrize("ending", ["idle", "exit"])
async def test_leftover_tasks_are_cancelled_without_walking_every_task(
    monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """An ending isolate finds its leftover tasks in its loop's own set, not
    with asyncio.all_tasks(), which walks every task of every loop (so that an
    Isolate.run would cost time in proportion to the tasks held elsewhere)."""
    walked: list[object] = []
    real_all_tasks = asyncio.all_tasks

    def all_tasks(loop: Any = None) -> Any:
        walked.append(loop)
        return real_all_tasks(loop)

    monkeypatch.setattr(asyncio, "all_tasks", all_tasks)
    release = asyncio.Event()
    elsewhere = [asyncio.create_task(release.wait()) for _ in range(3)]  # the spawner's tasks
    inbox = Inbox()
    await Isolate.spawn(_many_ways_tasks_entry, (inbox.send_port, ending),
                        on_exit=inbox.send_port, debug_name="many-ways")
    expected = {
        "cancelled loop.create_task",
        "cancelled asyncio.create_task",
        "cancelled ensure_future",
        "cancelled TaskGroup child",
    }
    first, *rest = await inbox.wait_for(1 + len(expected) + (2 if ending == "exit" else 1))
    inbox.close()
    join_isolate_threads("many-ways")
    release.set()
    await asyncio.gather(*elsewhere)
    _KEPT.clear()
    assert first == ("finished task freed", True)
    assert rest[-1] is None and set(rest[:len(expected)]) == expected
    if ending == "exit":
        assert rest[-2] == "exit"
    assert walked == []


async def _async_answer() -> int:
    await asyncio.sleep(0)
    return 42


async def _subtask_exits_entry(port: SendPort) -> None:
    async def failing() -> None:
        raise ValueError("nobody awaits this task")

    async def exiting() -> None:
        await asyncio.sleep(0)
        Isolate.exit(port, "exit from a task")

    asyncio.create_task(failing())
    await asyncio.sleep(0)
    asyncio.create_task(exiting())


async def test_the_task_that_unwinds_an_isolate_is_not_reported_as_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The task whose step called Isolate.exit ends with the exception that
    unwinds the isolate; asyncio must not log "Task exception was never
    retrieved" for it when it is collected (it did on the asyncio backend, for
    every Isolate.run of a coroutine function). A task that failed with an
    error of its own and was never awaited is still reported."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    assert await Isolate.run(_async_answer) == 42
    inbox = Inbox()
    await Isolate.spawn(_subtask_exits_entry, inbox.send_port, on_exit=inbox.send_port, debug_name="subtask-exits")
    assert await inbox.wait_for(2) == ["exit from a task", None]
    inbox.close()
    join_isolate_threads("subtask-exits")
    gc.collect()
    unretrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(unretrieved) == 1 and "nobody awaits this task" in caplog.text
    assert "_IsolateUnwind" not in caplog.text


class _CountingSet(set):  # type: ignore[type-arg]
    """A set that counts the items its iterations hand out."""

    handed_out = 0

    def __iter__(self) -> Any:
        for item in super().__iter__():
            _CountingSet.handed_out += 1
            yield item


def _many_timers_entry(port: SendPort) -> None:
    loop = asyncio.get_running_loop()
    watched = hasattr(loop, "_dart_timer_handles")  # the uvloop backend's liveness set
    if watched:
        loop._dart_timer_handles = _CountingSet(loop._dart_timer_handles)  # type: ignore[attr-defined]
    fired: list[int] = []
    n = 2000
    handles = [loop.call_later(0.001 * (1 + i % 10), fired.append, i) for i in range(n)]
    for h in handles[::2]:
        h.cancel()

    def report() -> None:
        port.send((sorted(fired) == list(range(1, n, 2)), _CountingSet.handed_out if watched else None))

    loop.call_later(0.02, report)


async def test_a_spawned_isolate_checks_its_timers_in_constant_time_per_event() -> None:
    """The liveness check after each event stops at the first timer that can
    still fire: with 1,000 timers firing (and 1,000 cancelled), it hands out
    a few items per event, not every waiting timer each time (2,000 events
    x 1,000 timers before)."""
    _CountingSet.handed_out = 0
    inbox = Inbox()
    await Isolate.spawn(_many_timers_entry, inbox.send_port, on_exit=inbox.send_port)
    (all_fired, handed_out), exited = await inbox.wait_for(2)
    inbox.close()
    assert all_fired and exited is None
    if handed_out is not None:
        assert handed_out < 10 * 2000


def _closed_port_entry(port: SendPort) -> None:
    own = RawReceivePort()
    port.send(own.send_port)
    own.close()


async def test_closing_last_port_ends_isolate() -> None:
    inbox = Inbox()
    await Isolate.spawn(_closed_port_entry, inbox.send_port, on_exit=inbox.send_port)
    child, exited = await inbox.wait_for(2)
    assert isinstance(child, SendPort) and exited is None
    child.send("dropped")
    inbox.close()


# --------------------------------------------------------------------------
# Inheritance: backend and mode


def _mode_entry(port: SendPort) -> None:
    loop = asyncio.get_running_loop()
    port.send((loop.backend, loop.strict, type(loop).__name__))


async def test_spawned_isolate_inherits_backend() -> None:
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    await Isolate.spawn(_mode_entry, inbox.send_port)
    backend, strict, _ = await inbox.next()
    assert (backend, strict) == (loop.backend, loop.strict)  # type: ignore[attr-defined]
    inbox.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strict", [False, True])
def test_spawned_isolate_inherits_backend_and_strict_mode(backend: str, strict: bool) -> None:
    async def main() -> tuple[Any, Any]:
        port = ReceivePort()
        await Isolate.spawn(_mode_entry, port.send_port)
        got = await port.first()
        grandchild = await Isolate.run(_run_mode)
        return got, grandchild

    got, grandchild = dartloop.run(main(), backend=backend, strict=strict)
    assert got[:2] == (backend, strict)
    assert grandchild == (backend, strict)


def _run_mode() -> tuple[str, bool]:
    loop = asyncio.get_running_loop()
    return loop.backend, loop.strict  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Wrong inputs


async def test_spawn_non_callable_entry() -> None:
    with pytest.raises(IsolateSpawnException):
        await Isolate.spawn("not callable", None)  # type: ignore[arg-type]


async def test_spawn_unsendable_message_starts_nothing() -> None:
    before = threading.active_count()
    with pytest.raises(TypeError, match=r"message\[1\]\['lock'\] is a .*lock"):
        await Isolate.spawn(_hello_entry, [1, {"lock": threading.Lock()}], debug_name="never-started")
    assert threading.active_count() == before
    assert isolate_threads("never-started") == []


async def test_spawn_bad_ports() -> None:
    with pytest.raises(TypeError):
        await Isolate.spawn(_nothing_entry, None, on_exit="port")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await Isolate.spawn(_nothing_entry, None, on_error=42)  # type: ignore[arg-type]


async def test_isolate_handle_from_parts() -> None:
    inbox = Inbox()
    iso, child = await _spawn_commanded(inbox, on_exit=inbox.send_port)
    # The control port and the capabilities can be sent; a handle built from
    # them controls the isolate.
    inbox.send_port.send((iso.control_port, iso.terminate_capability))
    control, term = await inbox.next()
    handle = Isolate(control, terminate_capability=term)
    assert handle == iso
    handle.kill()
    assert await inbox.next() is None
    with pytest.raises(TypeError):
        Isolate("not a port")  # type: ignore[arg-type]
    inbox.close()
