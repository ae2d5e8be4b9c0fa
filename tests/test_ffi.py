"""dartloop.ffi end to end: NativeCallable and the C posting API, driven from C.

Everything here is called from real pthreads that Python never saw, started by
a small C library compiled at test time (``tests/c/ffi_helpers.c``, built once
per session by ``tests/_native_build.py`` with ``cc -shared -fPIC -pthread -I
<dartloop.ffi.include_dir()>``; the tests skip without a C compiler).

* ``listener``: calls from C threads queue one event each on the owner isolate
  and return at once; the callback runs on the owner's thread; an open
  listener keeps a spawned isolate alive; calls after ``close()`` or after the
  owner ended are dropped without a crash, also while racing them.
* ``isolate_local``: synchronous on the owner's thread; from any other thread
  the callback does not run, C gets ``exceptional_return`` and a
  ``NativeCallbackError`` reaches the owner's uncaught-error path.
* ``blocking``: the C thread waits for the result of a plain or ``async``
  callback; inline on the owner's thread; ``exceptional_return`` on timeout
  and when the owner is paused, killed or gone (no thread is left waiting).
* the ``DartloopApi`` posting functions: every type, FIFO, 8 threads x
  100,000 posts, every refusal, and posts racing port close and isolate exit.

The queue behind the posting API has two implementations (the C extension and
the pure-Python one): the suite runs on the selected one, and
``test_other_queue_implementation`` runs a condensed scenario on the other in
a subprocess; ``DARTLOOP_NO_EXTENSIONS=1 python -m pytest`` (as ``.ci/run``
does) runs everything on the pure one. Every ``async def`` test runs on both
backends. Nothing sleeps where an event can be awaited; the only timeouts are
``NativeCallable.blocking``'s own and pytest-timeout.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _isolate_helpers import Inbox, turns
from _native_build import build_helper

import dartloop
from dartloop import Isolate, NativeCallbackError, RawReceivePort, schedule_microtask
from dartloop.ffi import DartloopApi, NativeCallable, include_dir, native_api
from dartloop.ffi import _queue

LISTENER = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64)
II = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_ssize_t)
DD = ctypes.CFUNCTYPE(ctypes.c_double, ctypes.c_double)

OUTSIDE = "Cannot invoke native callback outside an isolate"
TAG_MASK = (1 << 40) - 1

# Repetitions of the tests that race C threads against close and exit: enough
# to catch a regression in CI, small enough to keep the suite fast (the
# flakiness check loops over the whole file many times instead).
RACE_REPEAT = 3

# Seconds after which a test that waits for something that must happen on its
# own (an isolate ending) reports it as stuck instead of hanging.
STUCK_AFTER = 5.0


# --------------------------------------------------------------------------
# The C helper library
# --------------------------------------------------------------------------


@dataclass
class PosterResult:
    ok: int
    first_false: int
    true_after_false: int


class Helpers:
    """ctypes bindings of tests/c/ffi_helpers.c."""

    _loaded: dict[str, Helpers] = {}

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        vp, i64, ip = ctypes.c_void_p, ctypes.c_int64, ctypes.c_ssize_t
        sig = {
            "calls_start": ([vp, ctypes.c_int, i64], vp),
            "calls_done": ([vp], ctypes.c_int),
            "calls_join": ([vp], None),
            "calls_run": ([vp, ctypes.c_int, i64], None),
            "listener_in_thread": ([vp, i64, i64], None),
            "ii_start": ([vp, i64, vp, ip, ctypes.c_int], vp),
            "ii_join": ([vp], None),
            "ii_here": ([vp, ip], ip),
            "dd_here": ([vp, ctypes.c_double], ctypes.c_double),
            "dd_in_thread": ([vp, ctypes.c_double], ctypes.c_double),
            "mixed_start": ([vp, vp, i64, vp, i64], vp),
            "mixed_join": ([vp], None),
            "interleave_start": ([vp, i64, vp, i64], vp),
            "interleave_join": ([vp], None),
            "api_version": ([vp], ctypes.c_int32),
            "post_all_types": ([vp, i64], ctypes.c_int),
            "post_all_types_in_thread": ([vp, i64], ctypes.c_int),
            "c_post_null": ([vp, i64], ctypes.c_bool),
            "c_post_int64": ([vp, i64, i64], ctypes.c_bool),
            "c_post_double": ([vp, i64, ctypes.c_double], ctypes.c_bool),
            "c_post_string": ([vp, i64, ctypes.c_char_p], ctypes.c_bool),
            "c_post_bytes": ([vp, i64, ctypes.c_char_p, ip], ctypes.c_bool),
            "c_post_intptr": ([vp, i64, ip], ctypes.c_bool),
            "posters_start": ([vp, ctypes.c_int, i64, i64, ctypes.c_int], vp),
            "posters_done": ([vp], ctypes.c_int),
            "posters_join": ([vp, ctypes.POINTER(ctypes.c_int64)], None),
        }
        for name, (argtypes, restype) in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = restype
        self.lib = lib
        self.path = path
        self.api = ctypes.addressof(native_api())

    @classmethod
    def load(cls, path: str) -> Helpers:
        """The bindings of ``path``; usable from any isolate (one per process)."""
        helpers = cls._loaded.get(path)
        if helpers is None:
            helpers = cls._loaded[path] = cls(path)
        return helpers

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lib, name)

    def start_call(self, port: int, fn: Any, arg: int, repeat: int = 1) -> int:
        """Call ``fn(arg + k)`` for k < repeat on a new C thread; each result is posted to ``port``."""
        return self.lib.ii_start(self.api, port, _address(fn), arg, repeat)

    def start_posters(self, n: int, port: int, count: int, *, until_false: bool = False) -> int:
        return self.lib.posters_start(self.api, n, port, count, int(until_false))

    def join_posters(self, group: int, n: int) -> list[PosterResult]:
        out = (ctypes.c_int64 * (3 * n))()
        self.lib.posters_join(group, out)
        return [PosterResult(out[3 * t], out[3 * t + 1], out[3 * t + 2]) for t in range(n)]


def _address(fn: Any) -> int:
    if isinstance(fn, int):
        return fn
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


@pytest.fixture(scope="session")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Helpers:
    return Helpers.load(str(build_helper("ffi_helpers.c", tmp_path_factory.mktemp("ffi"))))


# --------------------------------------------------------------------------
# Waiting for events
# --------------------------------------------------------------------------


class ErrorSignal:
    """Forwards the loop's exception-handler calls to the test's recorder
    (``loop_errors``, whose ``take()`` then claims them) and lets a test await them."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.previous = self.loop.get_exception_handler()
        self.count = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        assert self.previous is not None
        self.previous(loop, context)
        self.count += 1
        for want, fut in self._waiters:
            if self.count >= want and not fut.done():
                fut.set_result(None)

    async def wait_for(self, count: int) -> None:
        if self.count < count:
            fut = self.loop.create_future()
            self._waiters.append((count, fut))
            await fut

    def restore(self) -> None:
        self.loop.set_exception_handler(self.previous)


@pytest.fixture
async def loop_error_signal(loop_errors: Any) -> Any:
    signal = ErrorSignal()
    yield signal
    signal.restore()


async def first_of(**awaitables: Awaitable[Any]) -> str:
    """The name of the awaitable that completes first (the others are cancelled)."""
    tasks = {asyncio.ensure_future(a): name for name, a in awaitables.items()}
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return tasks[next(iter(done))]


class Counter:
    """A callback that counts calls and can be awaited for a total."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[int] = set()
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        self.threads.add(threading.get_ident())
        n = len(self.calls)
        for want, fut in self._waiters:
            if n >= want and not fut.done():
                fut.set_result(None)

    async def wait_for(self, count: int) -> None:
        if len(self.calls) < count:
            fut = self._loop.create_future()
            self._waiters.append((count, fut))
            await fut


def per_thread(calls: list[tuple[Any, ...]], n_threads: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n_threads)]
    for t, i in calls:
        out[t].append(i)
    return out


# --------------------------------------------------------------------------
# Entry points of spawned isolates (module level: they are sent by reference)
# --------------------------------------------------------------------------

CLOSE = -1  # a listener call with t == CLOSE closes the listener


def _listener_entry(message: tuple[Any, bool]) -> None:
    """A listener whose calls are reported to the parent; t == CLOSE closes it."""
    parent, keep_alive = message

    def callback(t: int, i: int) -> None:
        parent.send(("call", t, i))
        if t == CLOSE:
            callable_.close()

    callable_ = NativeCallable.listener(LISTENER, callback)
    callable_.keep_isolate_alive = keep_alive
    parent.send(("address", callable_.address))


def _listener_exit_after_entry(message: tuple[Any, int]) -> None:
    """Counts calls; exits the isolate at the n-th (C threads are still calling)."""
    parent, n = message
    count = 0

    def callback(t: int, i: int) -> None:
        nonlocal count
        count += 1
        if count == n:
            parent.send(("exiting", count))
            Isolate.exit()

    callable_ = NativeCallable.listener(LISTENER, callback)
    parent.send(("address", callable_.address))


def _isolate_local_entry(message: tuple[Any, Any]) -> None:
    parent, _unused = message

    def callback(a: int) -> int:
        parent.send(("ran", a))
        return a * 2

    callable_ = NativeCallable.isolate_local(II, callback, exceptional_return=-1)
    parent.send(("address", callable_.address))


def _blocking_entry(message: tuple[Any, str]) -> None:
    """A blocking callable; mode says how its callback behaves."""
    parent, mode = message
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def plain(a: int) -> int:
        parent.send(("ran", a))
        return a + 100

    async def waits_for_ever(a: int) -> int:
        parent.send(("waiting", a))
        await forever
        return 0

    def spins(a: int) -> int:
        parent.send(("spinning", a))
        while True:
            pass

    callback = {"plain": plain, "waits": waits_for_ever, "spins": spins}[mode]
    callable_ = NativeCallable.blocking(II, callback, exceptional_return=-1)
    parent.send(("address", callable_.address))


def _port_entry(message: tuple[Any, int]) -> None:
    """A port reachable from C; the isolate exits at the n-th message (0: never)."""
    parent, n = message
    count = 0

    def handler(value: Any) -> None:
        nonlocal count
        count += 1
        if count == n:
            parent.send(("exiting", count))
            Isolate.exit()

    port = RawReceivePort(handler)
    parent.send(("port", port.send_port.native_port))


async def spawn(entry: Any, message: Any, **kwargs: Any) -> tuple[Isolate, Inbox]:
    """Spawn with a fresh inbox as the first element of the message."""
    inbox = Inbox("parent")
    iso = await Isolate.spawn(entry, (inbox.send_port, *message), **kwargs)
    return iso, inbox


# --------------------------------------------------------------------------
# NativeCallable.listener
# --------------------------------------------------------------------------


async def test_listener_calls_from_c_threads_return_at_once_and_run_on_owner(helpers: Helpers) -> None:
    owner = threading.get_ident()
    n_threads, count = 4, 2_000
    log: list[Any] = []
    counter = Counter()

    def callback(t: int, i: int) -> None:
        counter(t, i)
        log.append("cb")
        schedule_microtask(log.append, "mt")

    listener = NativeCallable.listener(LISTENER, callback)
    # This thread is inside C until every call has returned: no callback can
    # have run yet, so each call returned without waiting for it.
    helpers.calls_run(listener.pointer, n_threads, count)
    assert counter.calls == []
    await counter.wait_for(n_threads * count)
    listener.close()
    assert counter.threads == {owner}
    assert per_thread(counter.calls, n_threads) == [list(range(count))] * n_threads
    # One event per call: each callback is followed by its microtask drain.
    assert log == ["cb", "mt"] * (n_threads * count)


async def test_listener_calls_while_owner_runs(helpers: Helpers) -> None:
    """C threads call while the owner is busy awaiting and running other events."""
    n_threads, count = 4, 5_000
    counter = Counter()
    listener = NativeCallable.listener(LISTENER, counter)
    group = helpers.calls_start(listener.address, n_threads, count)
    try:
        await counter.wait_for(n_threads * count)
    finally:
        helpers.calls_join(group)
    listener.close()
    assert len(counter.calls) == n_threads * count
    assert per_thread(counter.calls, n_threads) == [list(range(count))] * n_threads


async def test_listener_called_on_owner_thread_is_still_an_event() -> None:
    counter = Counter()
    listener = NativeCallable.listener(LISTENER, counter)
    listener.pointer(7, 8)
    assert counter.calls == []
    await counter.wait_for(1)
    assert counter.calls == [(7, 8)]
    listener.close()


async def test_listener_close_inside_callback_drops_later_calls(helpers: Helpers) -> None:
    counter = Counter()

    def callback(t: int, i: int) -> None:
        counter(t, i)
        listener.close()
        listener.close()  # idempotent

    listener = NativeCallable.listener(LISTENER, callback)
    address = listener.address
    helpers.calls_run(address, 1, 10)  # ten queued calls
    await counter.wait_for(1)
    await turns()
    helpers.calls_run(address, 4, 1_000)  # after close: dropped
    await turns()
    assert counter.calls == [(0, 0)]


async def test_listener_after_close_is_dropped_without_crash(helpers: Helpers) -> None:
    counter = Counter()
    listener = NativeCallable.listener(LISTENER, counter)
    address = listener.address
    listener.close()
    assert listener.is_closed
    helpers.calls_run(address, 4, 1_000)
    helpers.listener_in_thread(address, 1, 2)
    del listener
    gc.collect()
    helpers.calls_run(address, 4, 1_000)
    await turns()
    assert counter.calls == []


async def test_listener_dropped_without_close_still_safe(helpers: Helpers) -> None:
    """Dart keeps an unclosed NativeCallable alive; dartloop keeps its pointer valid."""
    counter = Counter()
    listener = NativeCallable.listener(LISTENER, counter)
    listener.keep_isolate_alive = False
    address = listener.address
    del listener
    gc.collect()
    helpers.calls_run(address, 2, 100)
    await counter.wait_for(200)
    assert per_thread(counter.calls, 2) == [list(range(100))] * 2


async def test_listener_keeps_spawned_isolate_alive_until_closed(helpers: Helpers) -> None:
    exits = Inbox("exits")
    pong = Inbox("pong")
    iso, inbox = await spawn(_listener_entry, (True,), on_exit=exits.send_port)
    kind, address = await inbox.next()
    assert kind == "address"
    # The entry has returned; only the open listener keeps the isolate alive.
    iso.ping(pong.send_port, "alive")
    assert await first_of(pong=pong.next(), exit=exits.next()) == "pong"
    helpers.listener_in_thread(address, 1, 2)
    assert await first_of(call=inbox.next(), exit=exits.next()) == "call"
    assert inbox.messages[-1] == ("call", 1, 2)
    helpers.calls_run(address, 4, 100)
    await inbox.wait_for(2 + 400)
    assert exits.messages == []
    helpers.listener_in_thread(address, CLOSE, 0)  # the callback closes it
    await exits.wait_for(1)
    assert inbox.messages[-1] == ("call", CLOSE, 0)
    seen = len(inbox.messages)
    # The owner is gone (and its NativeCallable object with it): dropped, no crash.
    gc.collect()
    helpers.calls_run(address, 4, 1_000)
    await turns()
    assert len(inbox.messages) == seen
    for port in (exits, pong, inbox):
        port.close()


def _native_listener() -> bool:
    """Whether ``NativeCallable.listener`` of ``LISTENER`` is a native closure (posting to the native queue)."""
    from dartloop.ffi import _callable

    return getattr(_callable, "_make_listener_closure", None) is not None and getattr(_callable, "listener_impl", "ctypes") != "ctypes"


async def test_listener_without_keepalive_lets_isolate_end(helpers: Helpers) -> None:
    exits = Inbox("exits")
    iso, inbox = await spawn(_listener_entry, (False,), on_exit=exits.send_port)
    kind, address = await inbox.next()
    assert kind == "address"
    # It ends on its own despite the open listener. (An isolate that stays
    # alive sends no event to wait for: give up after a generous deadline.)
    outcome = await first_of(exit=exits.wait_for(1), stuck=dartloop.future_delayed(STUCK_AFTER))
    if outcome == "stuck":
        iso.kill(priority=Isolate.IMMEDIATE)
        await exits.wait_for(1)
    assert outcome == "exit", "the isolate did not end"
    gc.collect()
    helpers.calls_run(address, 4, 1_000)  # owner gone: dropped, no crash
    await turns()
    assert inbox.messages == [("address", address)]
    exits.close()
    inbox.close()


@pytest.mark.parametrize("rep", range(RACE_REPEAT))
async def test_listener_calls_racing_close(helpers: Helpers, rep: int) -> None:
    n_threads = 4
    counter = Counter()

    def callback(t: int, i: int) -> None:
        counter(t, i)
        if len(counter.calls) == 300:
            listener.close()

    listener = NativeCallable.listener(LISTENER, callback)
    group = helpers.calls_start(listener.address, n_threads, 20_000)
    await counter.wait_for(300)
    helpers.calls_join(group)  # the threads finish on their own: nothing waits for the owner
    await turns()
    assert len(counter.calls) == 300
    for calls in per_thread(counter.calls, n_threads):
        assert calls == list(range(len(calls)))


@pytest.mark.parametrize("rep", range(RACE_REPEAT))
async def test_listener_calls_racing_isolate_exit(helpers: Helpers, rep: int) -> None:
    exits = Inbox("exits")
    _iso, inbox = await spawn(_listener_exit_after_entry, (300,), on_exit=exits.send_port)
    kind, address = await inbox.next()
    assert kind == "address"
    group = helpers.calls_start(address, 4, 20_000)
    await exits.wait_for(1)
    gc.collect()  # the dead isolate's NativeCallable goes while C still calls it
    helpers.calls_join(group)
    assert inbox.messages[1] == ("exiting", 300)
    exits.close()
    inbox.close()


# --------------------------------------------------------------------------
# NativeCallable.isolate_local
# --------------------------------------------------------------------------


async def test_isolate_local_runs_synchronously_on_owner(helpers: Helpers) -> None:
    owner = threading.get_ident()
    log: list[Any] = []

    def callback(a: int) -> int:
        log.append(("cb", a, threading.get_ident()))
        schedule_microtask(log.append, "mt")
        return a * 2

    local = NativeCallable.isolate_local(II, callback, exceptional_return=-1)
    assert helpers.ii_here(local.pointer, 21) == 42
    assert log == [("cb", 21, owner)]  # no turn, no drain inside the call
    await turns(1)
    assert log == [("cb", 21, owner), "mt"]
    assert local.pointer(5) == 10  # called from Python through ctypes: the same
    local.close()


async def test_isolate_local_raising_callback_gives_exceptional_return(helpers: Helpers, loop_errors: Any, loop_error_signal: ErrorSignal) -> None:
    def callback(a: int) -> int:
        raise ValueError(f"boom {a}")

    local = NativeCallable.isolate_local(II, callback, exceptional_return=-7)
    assert helpers.ii_here(local.pointer, 3) == -7
    await loop_error_signal.wait_for(1)
    (context,) = loop_errors.take()
    assert isinstance(context["exception"], ValueError)
    assert str(context["exception"]) == "boom 3"
    local.close()


async def test_isolate_local_default_exceptional_return_is_zero(helpers: Helpers, loop_errors: Any, loop_error_signal: ErrorSignal) -> None:
    local = NativeCallable.isolate_local(DD, lambda x: 1 / 0)
    assert helpers.dd_here(local.pointer, 2.0) == 0.0
    await loop_error_signal.wait_for(1)
    (context,) = loop_errors.take()
    assert isinstance(context["exception"], ZeroDivisionError)
    local.close()


async def test_isolate_local_from_c_thread_does_not_run(helpers: Helpers, loop_errors: Any, loop_error_signal: ErrorSignal) -> None:
    ran: list[int] = []

    def callback(a: int) -> int:
        ran.append(a)
        return a

    local = NativeCallable.isolate_local(II, callback, exceptional_return=-1)
    inbox = Inbox()
    call = helpers.start_call(inbox.send_port.native_port, local.pointer, 5)
    assert await inbox.next() == -1
    helpers.ii_join(call)
    await loop_error_signal.wait_for(1)
    (context,) = loop_errors.take()
    exc = context["exception"]
    assert type(exc) is NativeCallbackError
    assert str(exc) == OUTSIDE
    assert ran == []
    # A double return type, from a joined C thread.
    local2 = NativeCallable.isolate_local(DD, lambda x: x, exceptional_return=1.5)
    assert helpers.dd_in_thread(local2.pointer, 4.0) == 1.5
    await loop_error_signal.wait_for(2)
    (context,) = loop_errors.take()
    assert type(context["exception"]) is NativeCallbackError
    assert ran == []
    for closable in (local, local2, inbox):
        closable.close()


async def test_isolate_local_wrong_thread_reaches_spawned_error_listener(helpers: Helpers) -> None:
    errors = Inbox("errors")
    exits = Inbox("exits")
    _iso, inbox = await spawn(_isolate_local_entry, (None,), on_error=errors.send_port, on_exit=exits.send_port)
    kind, address = await inbox.next()
    assert kind == "address"
    results = Inbox("results")
    call = helpers.start_call(results.send_port.native_port, address, 4)
    assert await results.next() == -1
    helpers.ii_join(call)
    description, trace = await errors.next()
    assert description == f"dartloop.NativeCallbackError: {OUTSIDE}"
    assert "NativeCallbackError" in trace
    await exits.wait_for(1)  # errors are fatal by default
    assert inbox.messages == [("address", address)]  # the callback never ran
    # The owner is gone: C still gets the exceptional return, nothing crashes.
    gc.collect()
    assert helpers.ii_here(address, 4) == -1
    for port in (errors, exits, inbox, results):
        port.close()


async def test_isolate_local_called_from_another_isolates_thread(helpers: Helpers) -> None:
    """The root isolate's thread is not the owner's: the same refusal."""
    errors = Inbox("errors")
    iso, inbox = await spawn(_isolate_local_entry, (None,), on_error=errors.send_port, errors_are_fatal=False)
    kind, address = await inbox.next()
    assert helpers.ii_here(address, 4) == -1
    description, _trace = await errors.next()
    assert description == f"dartloop.NativeCallbackError: {OUTSIDE}"
    assert inbox.messages == [("address", address)]
    iso.kill(priority=Isolate.IMMEDIATE)
    errors.close()
    inbox.close()


# --------------------------------------------------------------------------
# NativeCallable.blocking
# --------------------------------------------------------------------------


async def test_blocking_c_thread_waits_for_plain_callback(helpers: Helpers) -> None:
    owner = threading.get_ident()
    threads: set[int] = set()

    def callback(a: int) -> int:
        threads.add(threading.get_ident())
        return a * 3

    blocking = NativeCallable.blocking(II, callback, exceptional_return=-1)
    results = Inbox()
    call = helpers.start_call(results.send_port.native_port, blocking.pointer, 10, repeat=3)
    assert await results.wait_for(3) == [30, 33, 36]
    helpers.ii_join(call)
    assert threads == {owner}
    blocking.close()
    results.close()


async def test_blocking_c_thread_waits_for_async_callback(helpers: Helpers) -> None:
    owner = threading.get_ident()
    threads: set[int] = set()

    async def callback(a: int) -> int:
        await asyncio.sleep(0)
        await dartloop.future_value()
        threads.add(threading.get_ident())
        return a + 1

    blocking = NativeCallable.blocking(II, callback, exceptional_return=-1)
    results = Inbox()
    calls = [helpers.start_call(results.send_port.native_port, blocking.pointer, 100 * k, repeat=2) for k in range(4)]
    got = await results.wait_for(8)
    for call in calls:
        helpers.ii_join(call)
    assert sorted(got) == sorted(100 * k + j + 1 for k in range(4) for j in range(2))
    assert threads == {owner}
    blocking.close()
    results.close()


async def test_blocking_on_owner_thread_runs_inline(helpers: Helpers) -> None:
    log: list[Any] = []

    def plain(a: int) -> int:
        log.append(("plain", a))
        return a - 1

    async def no_suspension(a: int) -> int:
        log.append(("async", a))
        return a * 10

    b1 = NativeCallable.blocking(II, plain, exceptional_return=-1)
    b2 = NativeCallable.blocking(II, no_suspension, exceptional_return=-1)
    assert helpers.ii_here(b1.pointer, 5) == 4
    assert helpers.ii_here(b2.pointer, 5) == 50
    assert log == [("plain", 5), ("async", 5)]
    b1.close()
    b2.close()


async def test_blocking_inline_async_callback_that_suspends(helpers: Helpers, loop_errors: Any, loop_error_signal: ErrorSignal) -> None:
    async def suspends(a: int) -> int:
        await asyncio.sleep(0)
        return a

    blocking = NativeCallable.blocking(II, suspends, exceptional_return=-9)
    assert helpers.ii_here(blocking.pointer, 5) == -9
    await loop_error_signal.wait_for(1)
    (context,) = loop_errors.take()
    assert type(context["exception"]) is NativeCallbackError
    blocking.close()


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_blocking_raising_callback_gives_exceptional_return(helpers: Helpers, kind: str, loop_errors: Any, loop_error_signal: ErrorSignal) -> None:
    def plain(a: int) -> int:
        raise ValueError(f"plain {a}")

    async def coro(a: int) -> int:
        await asyncio.sleep(0)
        raise ValueError(f"async {a}")

    blocking = NativeCallable.blocking(II, plain if kind == "plain" else coro, exceptional_return=-5)
    results = Inbox()
    call = helpers.start_call(results.send_port.native_port, blocking.pointer, 1)
    assert await results.next() == -5
    helpers.ii_join(call)
    await loop_error_signal.wait_for(1)
    (context,) = loop_errors.take()
    assert isinstance(context["exception"], ValueError)
    assert str(context["exception"]) == f"{kind} 1"
    # Inline, on the owner's thread: the same (an async callback that
    # suspends can't run inline at all).
    assert helpers.ii_here(blocking.pointer, 2) == -5
    await loop_error_signal.wait_for(2)
    (context,) = loop_errors.take()
    assert type(context["exception"]) is (ValueError if kind == "plain" else NativeCallbackError)
    blocking.close()
    results.close()


async def test_result_of_wrong_type_gives_exceptional_return(helpers: Helpers, loop_errors: Any, loop_error_signal: ErrorSignal) -> None:
    """A result ctypes can't return is reported like an exception (not printed by ctypes)."""

    async def async_wrong(a: int) -> str:
        await asyncio.sleep(0)
        return "wrong"

    local = NativeCallable.isolate_local(II, lambda a: "wrong", exceptional_return=-1)
    plain = NativeCallable.blocking(II, lambda a: 1.5, exceptional_return=-2)
    coro = NativeCallable.blocking(II, async_wrong, exceptional_return=-3)
    assert helpers.ii_here(local.pointer, 1) == -1
    assert helpers.ii_here(plain.pointer, 1) == -2  # inline
    results = Inbox()
    calls = [helpers.start_call(results.send_port.native_port, c.pointer, 1) for c in (plain, coro)]
    assert sorted(await results.wait_for(2)) == [-3, -2]
    for call in calls:
        helpers.ii_join(call)
    await loop_error_signal.wait_for(4)
    errors = [c["exception"] for c in loop_errors.take()]
    assert [type(e) for e in errors] == [TypeError] * 4
    assert all("can't be converted to its return type" in str(e) for e in errors)
    for closable in (local, plain, coro, results):
        closable.close()


async def test_blocking_timeout_gives_exceptional_return(helpers: Helpers) -> None:
    loop = asyncio.get_running_loop()
    release = loop.create_future()
    finished = loop.create_future()

    async def slow(a: int) -> int:
        await release
        finished.set_result(a)
        return a

    blocking = NativeCallable.blocking(II, slow, exceptional_return=-3, timeout=0.05)
    results = Inbox()
    call = helpers.start_call(results.send_port.native_port, blocking.pointer, 8)
    assert await results.next() == -3  # gave up waiting: the callback is still running
    helpers.ii_join(call)
    assert not finished.done()
    release.set_result(None)
    assert await finished == 8  # it completes later; its result goes nowhere
    blocking.close()
    results.close()


async def test_blocking_closed_gives_exceptional_return(helpers: Helpers) -> None:
    ran: list[int] = []
    blocking = NativeCallable.blocking(II, ran.append, exceptional_return=-4)
    address = blocking.address
    blocking.close()
    assert helpers.ii_here(address, 1) == -4
    results = Inbox()
    call = helpers.start_call(results.send_port.native_port, address, 2)
    assert await results.next() == -4
    helpers.ii_join(call)
    assert ran == []
    results.close()


async def test_blocking_owner_paused_gives_exceptional_return(helpers: Helpers) -> None:
    iso, inbox = await spawn(_blocking_entry, ("plain",))
    kind, address = await inbox.next()
    assert kind == "address"
    results = Inbox("results")
    pong = Inbox("pong")
    resume = iso.pause()
    iso.ping(pong.send_port, "paused")  # served after the pause
    await pong.next()
    call = helpers.start_call(results.send_port.native_port, address, 1)
    assert await results.next() == -1
    helpers.ii_join(call)
    iso.resume(resume)
    iso.ping(pong.send_port, "resumed")  # served after the resume
    await pong.next()
    call = helpers.start_call(results.send_port.native_port, address, 2)
    assert await results.next() == 102
    helpers.ii_join(call)
    assert inbox.messages == [("address", address), ("ran", 2)]
    iso.kill(priority=Isolate.IMMEDIATE)
    for port in (inbox, results, pong):
        port.close()


async def test_blocking_paused_while_c_thread_waits(helpers: Helpers) -> None:
    iso, inbox = await spawn(_blocking_entry, ("waits",))
    _kind, address = await inbox.next()
    results = Inbox("results")
    call = helpers.start_call(results.send_port.native_port, address, 1)
    assert await inbox.next() == ("waiting", 1)  # the C thread is blocked now
    iso.pause()
    assert await results.next() == -1
    helpers.ii_join(call)
    iso.kill(priority=Isolate.IMMEDIATE)
    inbox.close()
    results.close()


@pytest.mark.parametrize(
    ("mode", "priority"),
    [("waits", Isolate.BEFORE_NEXT_EVENT), ("waits", Isolate.IMMEDIATE), ("spins", Isolate.IMMEDIATE)],
)
async def test_blocking_owner_killed_while_c_thread_waits(helpers: Helpers, mode: str, priority: int) -> None:
    exits = Inbox("exits")
    iso, inbox = await spawn(_blocking_entry, (mode,), on_exit=exits.send_port)
    _kind, address = await inbox.next()
    results = Inbox("results")
    call = helpers.start_call(results.send_port.native_port, address, 1)
    assert (await inbox.next())[1] == 1  # the callback is running; the C thread waits
    iso.kill(priority=priority)
    assert await results.next() == -1  # the C thread returned
    helpers.ii_join(call)
    await exits.wait_for(1)
    # Gone: later calls return at once, from any thread.
    gc.collect()
    assert helpers.ii_here(address, 2) == -1
    call = helpers.start_call(results.send_port.native_port, address, 3, repeat=5)
    assert await results.wait_for(6) == [-1] * 6
    helpers.ii_join(call)
    for port in (exits, inbox, results):
        port.close()


# --------------------------------------------------------------------------
# Order across kinds of calls
# --------------------------------------------------------------------------


async def test_listener_then_blocking_from_one_thread_keep_their_order(helpers: Helpers) -> None:
    """Each call is an event of the owner, FIFO with its other events (as in Dart)."""
    log: list[tuple[str, int]] = []

    def on_blocking(i: int) -> int:
        log.append(("blocking", i))
        return i

    listener = NativeCallable.listener(LISTENER, lambda t, i: log.append(("listener", i)))
    blocking = NativeCallable.blocking(II, on_blocking, exceptional_return=-1)
    done = Inbox()
    count = 200
    call = helpers.mixed_start(listener.address, blocking.address, count, helpers.api, done.send_port.native_port)
    try:
        assert await done.next() == 0
    finally:
        helpers.mixed_join(call)
    await turns()
    listener.close()
    blocking.close()
    done.close()
    assert log == [(kind, i) for i in range(count) for kind in ("listener", "blocking")]


VALUE_FN = ctypes.CFUNCTYPE(None, ctypes.c_int64)


async def test_posts_and_sends_from_one_thread_to_one_port_keep_their_order(helpers: Helpers) -> None:
    """"Messages to one port arrive in the order they were sent from one thread" (api.md)."""
    inbox = Inbox()
    send_port = inbox.send_port
    send = VALUE_FN(send_port.send)  # a plain ctypes callback: SendPort.send on the C thread
    count = 500
    call = helpers.interleave_start(helpers.api, send_port.native_port, send, count)
    try:
        got = await inbox.wait_for(2 * count)
    finally:
        helpers.interleave_join(call)
    inbox.close()
    assert got == list(range(2 * count))


async def test_per_sender_order_holds_while_the_isolate_gets_its_native_queue() -> None:
    """Python threads keep sending while the owner switches them to the native queue."""
    inbox = Inbox()
    send = inbox.send_port.send
    senders, count = 4, 5000
    halfway = threading.Barrier(senders + 1)
    switched = threading.Event()

    def sender(k: int) -> None:
        for i in range(count):
            if i == count // 4:
                halfway.wait()
            if i == count // 2:
                switched.wait()
            send((k, i))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    try:
        await asyncio.to_thread(halfway.wait)  # every sender is a quarter through
        other = RawReceivePort()
        assert other.send_port.native_port > 0  # the isolate now has a native queue
        assert asyncio.get_running_loop()._isolate.relay_port  # type: ignore[attr-defined]
        switched.set()
        got = await inbox.wait_for(senders * count)
    finally:
        switched.set()
        for t in threads:
            t.join()
    other.close()
    inbox.close()
    assert len(got) == senders * count
    for k in range(senders):
        assert [i for s, i in got if s == k] == list(range(count)), f"sender {k}"


@pytest.mark.parametrize("dispatcher", ["c", "python"])
async def test_native_batches_dispatch_alike_in_c_and_python(dispatcher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """C posts and relayed sends from one thread, each its own turn (handler,
    then its microtask), in order, with either dispatch loop."""
    from dartloop import _isolate

    loop = asyncio.get_running_loop()
    if dispatcher == "python":
        monkeypatch.setattr(_isolate, "_speedups_dispatch_native", _isolate._dispatch_native)
    elif not loop._dart_accelerated or _isolate._speedups_dispatch_native is _isolate._dispatch_native:  # type: ignore[attr-defined]
        pytest.skip("the C dispatch loop is not in use")
    log: list[object] = []
    done = loop.create_future()

    def on_message(message: object) -> None:
        log.append(message)
        schedule_microtask(log.append, f"mt {message}")
        if message == "end":
            schedule_microtask(done.set_result, None)

    port = RawReceivePort(on_message)
    number = port.send_port.native_port
    api = native_api()

    def sender() -> None:
        for i in range(200):
            if i % 2:
                port.send_port.send(i)  # through the relay
            else:
                assert api.post_int64(number, i)
        port.send_port.send("end")

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        await done
    finally:
        thread.join()
    port.close()
    assert log == [x for i in [*range(200), "end"] for x in (i, f"mt {i}")]


@pytest.fixture(params=["c", "python"])
def native_dispatch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Native batches go through the C (``_speedups.dispatch_native``) or the
    Python dispatch loop, on either backend. Returns the list that gets each
    batch's size, in messages."""
    from dartloop import _isolate

    if request.param == "c":
        impl = _isolate._speedups_dispatch_native
        if impl is _isolate._dispatch_native:
            pytest.skip("no C dispatch loop (not built, or DARTLOOP_NO_EXTENSIONS=1)")
    else:
        impl = _isolate._dispatch_native
    sizes: list[int] = []

    def dispatch(state: Any, batch: list[Any], registry: dict[int, Any]) -> None:
        sizes.append(len(batch) // 2)
        impl(state, batch, registry)

    monkeypatch.setattr(_isolate, "_speedups_dispatch_native", dispatch)
    monkeypatch.setattr(_isolate, "_dispatch_native", dispatch)
    return sizes


def end_port(done: asyncio.Future[None]) -> RawReceivePort:
    """A port whose message ends the test's batch: the last one posted, so a
    message dropped or run out of turn fails an assertion instead of a wait."""
    return RawReceivePort(lambda _: done.set_result(None))


def post_batch(posts: list[tuple[RawReceivePort, int]]) -> None:
    """Post int64s from the isolate's own thread: the loop can't dispatch any
    before the caller yields, so together they make one batch."""
    api = native_api()
    for port, value in posts:
        assert api.post_int64(port.send_port.native_port, value)


async def test_native_batch_to_several_ports_keeps_its_order(native_dispatch: list[int]) -> None:
    """Runs of messages to one port, interleaved with other ports' and a
    relayed send: one turn each (handler, then its microtask), in FIFO order."""
    done = asyncio.get_running_loop().create_future()
    log: list[Any] = []

    def handler(name: str) -> Any:
        def on_message(value: int) -> None:
            log.append((name, value))
            schedule_microtask(log.append, f"mt {value}")

        return on_message

    a, b, c = (RawReceivePort(handler(name)) for name in "abc")
    end = end_port(done)
    names = {a: "a", b: "b", c: "c"}
    first = [(a, 1), (a, 2), (b, 3), (a, 4)]
    post_batch(first)
    # From another thread, through the relay: between the posts in the queue.
    sender = threading.Thread(target=b.send_port.send, args=(50,))
    sender.start()
    sender.join()
    second = [(c, 5), (c, 6), (b, 7), (a, 8), (a, 9), (c, 10)]
    post_batch([*second, (end, 0)])
    await done
    order = [(names[p], v) for p, v in first] + [("b", 50)] + [(names[p], v) for p, v in second]
    assert log == [x for name, v in order for x in ((name, v), f"mt {v}")]
    assert native_dispatch == [len(order) + 1]
    for port in (a, b, c, end):
        port.close()


async def test_native_batch_handler_errors_are_reported_and_the_batch_goes_on(
    native_dispatch: list[int], loop_errors: Any
) -> None:
    done = asyncio.get_running_loop().create_future()
    log: list[Any] = []

    def on_a(value: int) -> None:
        log.append(value)
        schedule_microtask(log.append, f"mt {value}")  # drained after the error too
        if value % 2:
            raise ValueError(f"odd {value}")

    a, b, end = RawReceivePort(on_a), RawReceivePort(log.append), end_port(done)
    post_batch([(a, 1), (a, 2), (a, 3), (b, 4), (a, 5), (b, 6), (end, 0)])
    await done
    assert log == [1, "mt 1", 2, "mt 2", 3, "mt 3", 4, 5, "mt 5", 6]
    errors = loop_errors.take()
    assert [(type(c["exception"]), str(c["exception"])) for c in errors] == [
        (ValueError, "odd 1"), (ValueError, "odd 3"), (ValueError, "odd 5")
    ]
    assert native_dispatch == [7]
    for port in (a, b, end):
        port.close()


async def test_native_batch_drops_the_rest_for_a_port_closed_meanwhile(native_dispatch: list[int]) -> None:
    """A port closed by a handler gets nothing more of the batch: neither the
    rest of the run of messages being dispatched nor later ones; a handler
    replaced by a handler takes the rest."""
    done = asyncio.get_running_loop().create_future()
    log: list[Any] = []

    def on_a(value: int) -> None:
        log.append(("a", value))
        if value == 2:
            a.close()  # 3 (same run) and 5 (a later run) are dropped

    def on_b(value: int) -> None:
        log.append(("b", value))
        if value == 4:
            c.close()  # after c's 31: its 6 is dropped

    def on_c(value: int) -> None:
        log.append(("c", value))

    def on_d(value: int) -> None:
        log.append(("d", value))
        if value == 10:
            d.handler = on_d2

    def on_d2(value: int) -> None:
        log.append(("d2", value))

    a, b, c, d = RawReceivePort(on_a), RawReceivePort(on_b), RawReceivePort(on_c), RawReceivePort(on_d)
    end = end_port(done)
    post_batch([(a, 1), (a, 2), (a, 3), (c, 31), (b, 4), (a, 5), (c, 6), (b, 7), (d, 10), (d, 11), (d, 12), (end, 0)])
    await done
    assert log == [("a", 1), ("a", 2), ("c", 31), ("b", 4), ("b", 7), ("d", 10), ("d2", 11), ("d2", 12)]
    assert native_dispatch == [12]
    for port in (b, d, end):
        port.close()


async def test_native_batch_paused_by_a_handler_holds_the_rest_in_order(native_dispatch: list[int]) -> None:
    loop = asyncio.get_running_loop()
    me = Isolate.current
    state = loop._isolate  # type: ignore[attr-defined]
    paused = loop.create_future()
    done = loop.create_future()
    log: list[Any] = []
    caps: list[Any] = []

    def on_a(value: int) -> None:
        log.append(value)
        schedule_microtask(log.append, f"mt {value}")
        if value == 2:
            # Served after this turn (its microtask included), before 3.
            caps.append(me.pause())
            paused.set_result(None)

    a, b, end = RawReceivePort(on_a), RawReceivePort(log.append), end_port(done)
    post_batch([(a, 1), (a, 2), (a, 3), (b, 4), (a, 5), (a, 6)])
    await paused
    assert log == [1, "mt 1", 2, "mt 2"]
    assert len(state.held) == 4
    post_batch([(b, 7), (end, 0)])  # a later batch, held behind the rest of the first
    me.resume(caps[0])
    await done
    assert log == [1, "mt 1", 2, "mt 2", 3, "mt 3", 4, 5, "mt 5", 6, "mt 6", 7]
    assert native_dispatch == [6, 2]
    for port in (a, b, end):
        port.close()


async def test_sends_still_arrive_after_the_last_native_port_closes() -> None:
    native = RawReceivePort()
    assert native.send_port.native_port > 0
    native.close()
    inbox = Inbox()
    send = inbox.send_port.send
    thread = threading.Thread(target=lambda: [send(i) for i in range(1000)])
    thread.start()
    try:
        got = await inbox.wait_for(1000)
    finally:
        thread.join()
    inbox.close()
    assert got == list(range(1000))


# --------------------------------------------------------------------------
# The C posting API
# --------------------------------------------------------------------------

ALL_TYPES = [
    None,
    -(1 << 63),
    (1 << 63) - 1,
    -2.5,
    "héllo € 😀",
    "",
    b"\x00\x01\x02\xff",
    b"",
    -(1 << (8 * ctypes.sizeof(ctypes.c_void_p) - 1)),
    -7,
]


def test_native_api_fields(helpers: Helpers) -> None:
    api = native_api()
    assert isinstance(api, DartloopApi)
    assert api.version == 1
    assert helpers.api_version(ctypes.addressof(api)) == 1
    assert ctypes.addressof(native_api()) == ctypes.addressof(api)  # one table per process
    assert [name for name, _ in DartloopApi._fields_] == [
        "version", "post_null", "post_int64", "post_double", "post_string", "post_bytes", "post_intptr",
    ]
    for name, _ in DartloopApi._fields_[1:]:
        assert ctypes.cast(getattr(api, name), ctypes.c_void_p).value, name
    assert Path(include_dir(), "dartloop_api.h").is_file()
    if os.environ.get("DARTLOOP_NO_EXTENSIONS") == "1":
        assert _queue.IMPLEMENTATION == "python"


@pytest.mark.parametrize("where", ["owner thread", "C thread"])
async def test_every_post_type_arrives_as_documented_in_order(helpers: Helpers, where: str) -> None:
    inbox = Inbox()
    port = inbox.send_port.native_port
    post = helpers.post_all_types if where == "owner thread" else helpers.post_all_types_in_thread
    assert post(helpers.api, port) == len(ALL_TYPES)
    assert post(helpers.api, port) == len(ALL_TYPES)
    got = await inbox.wait_for(2 * len(ALL_TYPES))
    assert got == ALL_TYPES * 2
    assert [type(v) for v in got] == [type(v) for v in ALL_TYPES] * 2
    inbox.close()


async def test_posts_from_python_through_the_struct() -> None:
    api = native_api()
    inbox = Inbox()
    port = inbox.send_port.native_port
    assert api.post_null(port)
    assert api.post_int64(port, 5)
    assert api.post_double(port, 0.25)
    assert api.post_string(port, "ü".encode())
    assert api.post_bytes(port, b"ab", 2)
    assert api.post_intptr(port, -1)
    got = await inbox.wait_for(6)
    assert got == [None, 5, 0.25, "ü", b"ab", -1]
    inbox.close()


async def test_posts_are_events_of_the_owner_with_drain(helpers: Helpers) -> None:
    owner = threading.get_ident()
    log: list[Any] = []
    done = asyncio.get_running_loop().create_future()

    def handler(value: Any) -> None:
        log.append((value, threading.get_ident() == owner))
        schedule_microtask(log.append, "mt")
        if value == -7:
            done.set_result(None)

    port = RawReceivePort(handler)
    assert helpers.post_all_types_in_thread(helpers.api, port.send_port.native_port) == len(ALL_TYPES)
    await done
    port.close()
    expected: list[Any] = []
    for value in ALL_TYPES:
        expected += [(value, True), "mt"]
    assert log == expected


async def test_eight_c_threads_100k_posts_each_in_order(helpers: Helpers) -> None:
    # The pure-Python queue takes the GIL for every post (about 20 s for the
    # full count); tests/test_native_queue.py runs it at 8 x 100,000 without
    # a loop. Here it gets a quarter, to keep the suite fast.
    n_threads, n = 8, 100_000 if _queue.IMPLEMENTATION == "c" else 25_000
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    next_seq = [0] * n_threads
    disorder: list[tuple[int, int, int]] = []
    received = 0

    def handler(value: int) -> None:
        nonlocal received
        t, i = value >> 40, value & TAG_MASK
        if i != next_seq[t]:
            disorder.append((t, i, next_seq[t]))
        next_seq[t] = i + 1
        received += 1
        if received == n_threads * n:
            done.set_result(None)

    port = RawReceivePort(handler)
    group = helpers.start_posters(n_threads, port.send_port.native_port, n)
    await done
    results = helpers.join_posters(group, n_threads)
    port.close()
    assert results == [PosterResult(n, -1, 0)] * n_threads
    assert disorder == []
    assert next_seq == [n] * n_threads


async def test_posts_to_unknown_ports_return_false(helpers: Helpers) -> None:
    api = native_api()
    inbox = Inbox()
    live = inbox.send_port.native_port
    control = Isolate.current.control_port.native_port  # a port number, but not one C may post to
    for port in (0, -1, -(1 << 63), (1 << 63) - 1, live + 2, live ^ (1 << 40), control):
        assert not api.post_null(port), port
        assert not helpers.c_post_int64(helpers.api, port, 1), port
        assert not helpers.c_post_double(helpers.api, port, 1.0), port
        assert not helpers.c_post_string(helpers.api, port, b"x"), port
        assert not helpers.c_post_bytes(helpers.api, port, b"x", 1), port
        assert not helpers.c_post_intptr(helpers.api, port, 1), port
        assert helpers.post_all_types_in_thread(helpers.api, port) == 0
    assert helpers.c_post_int64(helpers.api, live, 1)
    assert await inbox.next() == 1
    inbox.close()


async def test_posts_to_closed_port_return_false(helpers: Helpers) -> None:
    port = RawReceivePort(lambda value: None)
    number = port.send_port.native_port
    assert helpers.c_post_null(helpers.api, number)
    port.close()
    assert not helpers.c_post_null(helpers.api, number)
    assert helpers.post_all_types_in_thread(helpers.api, number) == 0
    assert port.send_port.native_port == number  # still the same number; still closed
    assert not helpers.c_post_null(helpers.api, number)
    await turns()


async def test_posts_to_dead_isolate_return_false(helpers: Helpers) -> None:
    exits = Inbox("exits")
    iso, inbox = await spawn(_port_entry, (0,), on_exit=exits.send_port)
    kind, number = await inbox.next()
    assert kind == "port"
    assert helpers.c_post_int64(helpers.api, number, 1)
    iso.kill()
    await exits.wait_for(1)
    assert not helpers.c_post_int64(helpers.api, number, 2)
    assert helpers.post_all_types_in_thread(helpers.api, number) == 0
    exits.close()
    inbox.close()


async def test_invalid_input_returns_false(helpers: Helpers) -> None:
    inbox = Inbox()
    port = inbox.send_port.native_port
    api, h = helpers.api, helpers
    assert not h.c_post_string(api, port, None)  # NULL
    for bad in (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82", b"\x80", b"a\xfe"):
        assert not h.c_post_string(api, port, bad), bad
    assert not h.c_post_bytes(api, port, None, 1)  # NULL data, length > 0
    assert not h.c_post_bytes(api, port, b"abc", -1)  # negative length
    assert h.c_post_bytes(api, port, None, 0)  # NULL with length 0: empty bytes
    assert h.c_post_string(api, port, "\U0010ffff".encode())
    assert await inbox.wait_for(2) == [b"", "\U0010ffff"]
    await turns()
    assert inbox.messages == [b"", "\U0010ffff"]  # nothing else was queued
    inbox.close()


async def test_native_port_reachable_from_other_threads() -> None:
    """``native_port`` may be read anywhere; the owner starts watching its queue."""
    inbox = Inbox()
    send_port = inbox.send_port
    numbers: list[int] = []
    reader = threading.Thread(target=lambda: numbers.append(send_port.native_port))
    reader.start()
    reader.join()
    assert native_api().post_int64(numbers[0], 99)
    assert await inbox.next() == 99
    inbox.close()


async def test_native_port_does_not_keep_spawned_isolate_alive() -> None:
    exits = Inbox("exits")
    iso, inbox = await spawn(_port_entry, (1,), on_exit=exits.send_port)
    _kind, number = await inbox.next()
    assert native_api().post_int64(number, 1)  # the isolate exits at this message
    await exits.wait_for(1)
    exits.close()
    inbox.close()


def _port_without_keepalive_entry(message: tuple[Any]) -> None:
    (parent,) = message
    port = RawReceivePort(lambda value: None)
    port.keep_isolate_alive = False
    parent.send(("port", port.send_port.native_port))


async def test_native_port_without_keepalive_lets_isolate_end() -> None:
    exits = Inbox("exits")
    iso, inbox = await spawn(_port_without_keepalive_entry, (), on_exit=exits.send_port)
    _kind, number = await inbox.next()
    outcome = await first_of(exit=exits.wait_for(1), stuck=dartloop.future_delayed(STUCK_AFTER))
    if outcome == "stuck":
        iso.kill(priority=Isolate.IMMEDIATE)
        await exits.wait_for(1)
    assert outcome == "exit", "the isolate did not end"
    assert not native_api().post_null(number)
    exits.close()
    inbox.close()


@pytest.mark.parametrize("rep", range(RACE_REPEAT))
async def test_posts_racing_port_close(helpers: Helpers, rep: int) -> None:
    n_threads = 4
    got: list[int] = []
    done = asyncio.get_running_loop().create_future()

    def handler(value: int) -> None:
        got.append(value)
        if len(got) == 200:
            port.close()
            done.set_result(None)

    port = RawReceivePort(handler)
    group = helpers.start_posters(n_threads, port.send_port.native_port, 0, until_false=True)
    await done
    results = helpers.join_posters(group, n_threads)  # every thread saw the close
    await turns()
    assert len(got) == 200
    for t, result in enumerate(results):
        assert result.first_false >= 0
        assert result.first_false == result.ok
        assert result.true_after_false == 0
        mine = [v & TAG_MASK for v in got if v >> 40 == t]
        assert mine == list(range(len(mine)))
        assert len(mine) <= result.ok


@pytest.mark.parametrize("rep", range(RACE_REPEAT))
async def test_posts_racing_isolate_exit(helpers: Helpers, rep: int) -> None:
    n_threads = 4
    exits = Inbox("exits")
    _iso, inbox = await spawn(_port_entry, (500,), on_exit=exits.send_port)
    _kind, number = await inbox.next()
    group = helpers.start_posters(n_threads, number, 0, until_false=True)
    await exits.wait_for(1)
    results = helpers.join_posters(group, n_threads)
    assert inbox.messages[1] == ("exiting", 500)
    assert sum(r.ok for r in results) >= 500
    for result in results:
        assert result.first_false == result.ok
        assert result.true_after_false == 0
    exits.close()
    inbox.close()


# --------------------------------------------------------------------------
# Wrong input from Python
# --------------------------------------------------------------------------


async def test_listener_must_return_void() -> None:
    with pytest.raises(TypeError, match="listener.*c_int"):
        NativeCallable.listener(ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int), lambda a: a)


@pytest.mark.parametrize("make", ["listener", "isolate_local", "blocking"])
async def test_functype_must_be_a_cfunctype(make: str) -> None:
    factory = getattr(NativeCallable, make)
    for bad in (int, ctypes.c_int, None, lambda: None, II(lambda a: a), "CFUNCTYPE"):
        with pytest.raises(TypeError, match="CFUNCTYPE"):
            factory(bad, lambda *args: None)
    with pytest.raises(TypeError, match="PYFUNCTYPE"):
        factory(ctypes.PYFUNCTYPE(None, ctypes.c_int), lambda *args: None)


@pytest.mark.parametrize("make", ["listener", "isolate_local", "blocking"])
async def test_callback_must_be_callable(make: str) -> None:
    factory = getattr(NativeCallable, make)
    functype = LISTENER if make == "listener" else II
    for bad in (None, 3, "f"):
        with pytest.raises(TypeError, match="callback must be callable"):
            factory(functype, bad)


@pytest.mark.parametrize("make", ["isolate_local", "blocking"])
async def test_bad_exceptional_return(make: str) -> None:
    factory = getattr(NativeCallable, make)
    with pytest.raises(TypeError, match="exceptional_return"):
        factory(II, lambda a: a, exceptional_return="x")
    with pytest.raises(TypeError, match="exceptional_return"):
        factory(II, lambda a: a, exceptional_return=1.5)
    with pytest.raises(TypeError, match="exceptional_return must be None"):
        factory(LISTENER, lambda t, i: None, exceptional_return=0)
    ok = factory(DD, lambda x: x, exceptional_return=2)  # an int is a fine double
    ok.close()


async def test_bad_blocking_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        NativeCallable.blocking(II, lambda a: a, timeout=-1)
    with pytest.raises(TypeError):
        NativeCallable.blocking(II, lambda a: a, timeout="soon")  # type: ignore[arg-type]


@pytest.mark.parametrize("make", ["listener", "isolate_local", "blocking"])
async def test_closed_callable(make: str) -> None:
    functype = LISTENER if make == "listener" else II
    callable_ = getattr(NativeCallable, make)(functype, lambda *args: None)
    assert callable_.keep_isolate_alive is True
    assert isinstance(callable_.pointer, functype)
    assert callable_.address == ctypes.cast(callable_.pointer, ctypes.c_void_p).value
    assert "open" in repr(callable_)
    callable_.close()
    callable_.close()
    assert callable_.is_closed
    assert "closed" in repr(callable_)
    with pytest.raises(RuntimeError, match="already closed"):
        callable_.pointer  # noqa: B018
    with pytest.raises(RuntimeError, match="already closed"):
        callable_.address  # noqa: B018
    callable_.keep_isolate_alive = True  # ignored once closed, as in Dart
    assert callable_.keep_isolate_alive is False


async def test_native_callable_is_not_constructible_nor_sendable() -> None:
    with pytest.raises(TypeError, match="listener"):
        NativeCallable()
    callable_ = NativeCallable.listener(LISTENER, lambda t, i: None)
    port = RawReceivePort()
    with pytest.raises(TypeError, match="NativeCallable"):
        port.send_port.send([callable_])
    port.close()
    callable_.close()


@pytest.mark.parametrize("make", ["listener", "isolate_local", "blocking"])
def test_native_callable_needs_a_running_loop(make: str) -> None:
    functype = LISTENER if make == "listener" else II
    with pytest.raises(RuntimeError, match="running"):
        getattr(NativeCallable, make)(functype, lambda *args: None)


def test_posting_api_without_any_loop(helpers: Helpers) -> None:
    """The posting functions work from any thread, also with no loop anywhere."""
    assert not native_api().post_null(12345)
    assert helpers.post_all_types_in_thread(helpers.api, 12345) == 0


# --------------------------------------------------------------------------
# The other implementation of the queue, in a subprocess
# --------------------------------------------------------------------------

OTHER_IMPL_SCRIPT = r"""
import asyncio, ctypes, sys, threading
import dartloop
from dartloop.ffi import NativeCallable, native_api, _queue

want = sys.argv[2]
assert _queue.IMPLEMENTATION == want, (_queue.IMPLEMENTATION, want)
lib = ctypes.CDLL(sys.argv[1])
vp, i64, ip = ctypes.c_void_p, ctypes.c_int64, ctypes.c_ssize_t
lib.calls_run.argtypes = [vp, ctypes.c_int, i64]
lib.ii_start.argtypes = [vp, i64, vp, ip, ctypes.c_int]
lib.ii_start.restype = vp
lib.ii_join.argtypes = [vp]
lib.post_all_types_in_thread.argtypes = [vp, i64]
lib.posters_start.argtypes = [vp, ctypes.c_int, i64, i64, ctypes.c_int]
lib.posters_start.restype = vp
lib.posters_join.argtypes = [vp, ctypes.POINTER(ctypes.c_int64)]
API = ctypes.addressof(native_api())
LISTENER = ctypes.CFUNCTYPE(None, i64, i64)
II = ctypes.CFUNCTYPE(ip, ip)

async def main():
    loop = asyncio.get_running_loop()
    got = []
    done = loop.create_future()
    def handler(v):
        got.append(v)
        if len(got) == 10 + 4 * 5000 + 2:
            done.set_result(None)
    port = dartloop.RawReceivePort(handler)
    number = port.send_port.native_port
    assert lib.post_all_types_in_thread(API, number) == 10
    group = lib.posters_start(API, 4, number, 5000, 0)
    calls = []
    all_called = loop.create_future()
    def on_call(t, i):
        calls.append((t, i))
        if len(calls) == 1000:
            all_called.set_result(None)
    listener = NativeCallable.listener(LISTENER, on_call)
    lib.calls_run(listener.pointer, 2, 500)
    blocking = NativeCallable.blocking(II, lambda a: a * 2, exceptional_return=-1)
    call = lib.ii_start(API, number, blocking.pointer, -21, 2)
    await done
    out = (ctypes.c_int64 * 12)()
    lib.posters_join(group, out)
    lib.ii_join(call)
    assert list(out) == [5000, -1, 0] * 4, list(out)
    assert got[:10] == [None, -(1 << 63), (1 << 63) - 1, -2.5, "h\u00e9llo \u20ac \U0001F600", "",
                        b"\x00\x01\x02\xff", b"", -(1 << 63), -7], got[:10]
    assert sorted(v for v in got[10:] if v < 0) == [-42, -40]
    ints = [v for v in got[10:] if v >= 0]
    for t in range(4):
        assert [v & ((1 << 40) - 1) for v in ints if v >> 40 == t] == list(range(5000))
    await all_called
    assert sorted(calls) == sorted((t, i) for t in range(2) for i in range(500))
    port.close(); listener.close(); blocking.close()
    assert not native_api().post_null(number)
    print("ok", loop.backend, _queue.IMPLEMENTATION)

for backend in dartloop.available_backends():
    dartloop.run(main(), backend=backend)
"""


def _extension_available() -> bool:
    return importlib.util.find_spec("dartloop.ffi._nativequeue") is not None


def test_other_queue_implementation(helpers: Helpers) -> None:
    """The same end-to-end scenario on the queue implementation this run does not use."""
    env = dict(os.environ)
    if _queue.IMPLEMENTATION == "c":
        env["DARTLOOP_NO_EXTENSIONS"] = "1"
        other = "python"
    else:
        if os.environ.get("DARTLOOP_NO_EXTENSIONS") != "1" or not _extension_available():
            pytest.skip("the C extension is not built")
        env.pop("DARTLOOP_NO_EXTENSIONS")
        other = "c"
    proc = subprocess.run(
        [sys.executable, "-c", OTHER_IMPL_SCRIPT, helpers.path, other],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split()
    assert lines.count("ok") == len(dartloop.available_backends()), proc.stdout


# --------------------------------------------------------------------------
# The examples
# --------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("example", ["native_async_callback.py", "native_port_call.py"])
def test_native_example_runs(helpers: Helpers, example: str) -> None:
    """Each example builds its C part, checks the Dart sample's expectations and exits 0."""
    path = EXAMPLES / example
    if not path.is_file():
        pytest.skip(f"{path} is not in this tree")
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numCallbacks1 = 2, numCallbacks2 = 3, globalResult = 14" in proc.stdout
