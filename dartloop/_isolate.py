"""Isolates: a dartloop loop pinned to its own thread, talking through ports.

Every running dartloop loop is an isolate. A loop started by ``dartloop.run``,
``asyncio.run(..., loop_factory=...)``, ``asyncio.Runner`` or
``run_until_complete`` is the *root* isolate of its thread; ``Isolate.spawn``
starts a *spawned* isolate on a new thread, with a new loop of the spawner's
backend and mode.

Control messages (kill, pause, resume, ping, listeners, errors-fatal) go to
an isolate's out-of-band queue, which the loop serves after the current event
(and between inbox messages), also while the isolate is paused. Ordinary
messages and Dart timers wait while it is paused.

A spawned isolate ends when no event can come any more (see
``DartEventLoop`` liveness), on ``Isolate.exit``, on ``kill``, or on an
uncaught error while errors are fatal. Then its ports are closed, tasks
still waiting are cancelled (as ``asyncio.run`` does; the ones its loop's
``create_task`` made, see ``_loop._SpawnedMixin``), its loop is closed,
and last its exit listeners are told; the thread then ends and is joined by
whoever waits for it (``Isolate.run``, or the root isolate when it closes).
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import ctypes
import functools
import inspect
import itertools
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from ._errors import IsolateSpawnException, RemoteError, _IsolateKilled, _IsolateUnwind
from ._loop import SPEEDUPS, DartEventLoop, _loop_class
from ._message import check_message, prepare_message
from ._microtasks import running_dart_loop
from ._ports import Capability, RawReceivePort, SendPort, _new_port_id, _PortCore

__all__ = ["Isolate"]

IMMEDIATE = 0
BEFORE_NEXT_EVENT = 1

# Control message kinds (Dart's numbers).
_PAUSE, _RESUME, _PING, _KILL, _ADD_EXIT, _DEL_EXIT, _ADD_ERROR, _DEL_ERROR, _ERROR_FATAL = range(1, 10)

_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
# The same function with NULL: clears a pending asynchronous exception.
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)

_state_by_control: dict[int, _IsolateState] = {}
_state_lock = threading.Lock()


# kill(IMMEDIATE) raises an asynchronous exception in the isolate's thread.
# Where it lands in a weakref callback, a __del__ or a GC callback, Python
# reports it through sys.unraisablehook and forgets it ("Exception ignored
# in ..."): the kill would be lost in a loop that never awaits (a WeakSet
# in the loop is enough). This hook takes those reports out and raises the
# exception once more, from another thread, so that it lands in the
# isolate's own code. Installed on the first kill(IMMEDIATE), in front of
# whatever hook is set then (re-installed if replaced); every other report
# goes to that hook.
_previous_unraisablehook: Callable[[Any], Any] | None = None


def _unraisable_hook(unraisable: Any) -> None:
    exc_type = unraisable.exc_type
    if isinstance(exc_type, type) and issubclass(exc_type, _IsolateKilled):
        loop = asyncio._get_running_loop()
        state = getattr(loop, "_isolate", None)
        if isinstance(state, _IsolateState) and state.thread_id == threading.get_ident():
            # Not threading.Thread: its start() waits, and the new exception
            # would land in this hook. A bare thread, a moment later.
            _thread.start_new_thread(_interrupt_again, (state,))
        return
    (_previous_unraisablehook or sys.__unraisablehook__)(unraisable)


def _no_relay(port: int, ticket: int) -> bool:
    return False  # no native queue (yet): the caller uses the inbox


def _interrupt_again(state: _IsolateState) -> None:
    time.sleep(0.001)
    state._interrupt()


def _install_unraisable_hook() -> None:
    global _previous_unraisablehook
    with _state_lock:
        if sys.unraisablehook is not _unraisable_hook:
            _previous_unraisablehook = sys.unraisablehook
            sys.unraisablehook = _unraisable_hook


def _describe(exc: BaseException) -> list[str]:
    """``[description, traceback_text]`` as error listeners get it."""
    description = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return [description, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]


class _IsolateState:
    """The isolate side of a loop. Most methods run on the isolate's thread;
    ``post`` and ``control`` are the thread-safe entry points."""

    # Performance, not behaviour: what every message from another thread
    # reads lives in slots, which both the bytecode's attribute caches and
    # the C SendPort.send (dartloop/_speedups.c, slot_get) read without a
    # dict lookup; everything else stays in the instance __dict__.
    __slots__ = (
        "thread_id",
        "relay_port",
        "inbox",
        "inbox_scheduled",
        "loop",
        "oob",
        "resume_caps",
        "held",
        "inbox_drain",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        loop: DartEventLoop | None,
        *,
        spawned: bool,
        debug_name: str | None,
        errors_are_fatal: bool = True,
        parent: _IsolateState | None = None,
    ) -> None:
        self.loop: DartEventLoop = loop  # type: ignore[assignment]  # set before use for spawned
        self.spawned = spawned
        self.debug_name = debug_name
        self.errors_are_fatal = errors_are_fatal
        self.parent = parent
        self.thread_id: int | None = None
        self.thread: _IsolateThread | None = None
        self.dead = False
        self.children: weakref.WeakSet[_IsolateState] = weakref.WeakSet()
        # Open receive ports of this isolate (closed when it ends).
        self.cores: set[_PortCore] = set()
        # Messages from other threads, each as two entries, its core then
        # itself (no tuple per message for the cyclic GC to track), appended
        # by one extend() (or, in C, two appends with nothing in between) so
        # that pairs from several threads never interleave. One wakeup per
        # burst (inbox_scheduled).
        self.inbox: collections.deque[Any] = collections.deque()
        self.inbox_scheduled = False
        # self._drain_inbox, bound once the loop is known: what the C
        # SendPort.send hands to loop.call_soon_threadsafe for a burst.
        self.inbox_drain: Callable[[], None] | None = None
        # Control actions from any thread, served after the current event.
        self.oob: collections.deque[tuple[Any, ...]] = collections.deque()
        self.resume_caps: set[Capability] = set()
        self.held: collections.deque[Callable[[], None]] = collections.deque()
        # Held events run one per turn after a resume (see _pump).
        self.pump_scheduled = False
        self.pumping = False
        self.exit_listeners: dict[SendPort, Any] = {}
        self.error_listeners: dict[SendPort, None] = {}
        self.bequest: tuple[SendPort, Any] | None = None
        # C threads waiting in NativeCallable.blocking calls to this isolate;
        # woken with the exceptional return on pause or death.
        self.blocking_calls: set[Any] = set()
        self.in_event = False
        self.native_queue: Any = None
        # Ports bound to native_queue (posts from C reach them).
        self.native_ports: set[int] = set()
        # Once the isolate has a native queue, messages from other Python
        # threads travel through it too (see relay), so a thread's posts from
        # C and its sends from Python share one FIFO, as Dart's port queue.
        # relay_port (0: no queue) is bound to the queue; each message is
        # posted there as a ticket into relay_box.
        self.relay_port = 0
        self.relay_box: dict[int, tuple[_PortCore, Any]] = {}
        self._relay_tickets = itertools.count()
        self._relay_post: Callable[[int, int], bool] = _no_relay  # the queue module's post_int64 once bound
        self.pause_capability = Capability()
        self.terminate_capability = Capability()
        self.lock = threading.Lock()
        self._control_core: _PortCore | None = None
        # Set (under lock) once kill(IMMEDIATE) may have raised into the thread.
        self.interrupted = False
        # Set (under lock) when the thread has done its last Python work;
        # _join waiters are told then (see _thread_done).
        self.finished = False
        self.finish_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.entry: tuple[Callable[[Any], Any], Any] | None = None

    # -- setup ------------------------------------------------------------

    def bind_loop(self, loop: DartEventLoop) -> None:
        self.loop = loop
        loop._isolate = self
        self.thread_id = threading.get_ident()
        # The loop checks this deque after every event: control actions run
        # "before the next event".
        loop._dart_oob = self.oob
        self._control_core = _PortCore(self, None, "control", control=True)
        with _state_lock:
            _state_by_control[self._control_core.id] = self
        if self.spawned:
            loop._dart_watch_idle = True
        if loop._dart_accelerated:
            # The C twin of _drain_inbox for the accelerated loop classes, as
            # deliver_native picks dispatch_native for them. An instance
            # attribute, so every `self._drain_inbox` (the wakeup that send
            # schedules, _release_held, deliver_native) finds it.
            self._drain_inbox = types.MethodType(_speedups_drain_inbox, self)  # type: ignore[method-assign]
        self.inbox_drain = self._drain_inbox

    @property
    def control_port(self) -> SendPort:
        assert self._control_core is not None
        return SendPort._of(self._control_core)

    @property
    def paused(self) -> bool:
        """Whether an ordinary event (a message, a Dart timer) must wait now.

        While the isolate is paused, and after it was resumed until every
        event held meanwhile has run (they run one per turn, see
        :meth:`_pump`): an event that comes meanwhile queues behind them.
        """
        return bool(self.resume_caps) or (bool(self.held) and not self.pumping)

    # -- messages ---------------------------------------------------------

    def post(self, core: _PortCore, message: Any) -> None:
        """Queue ``message`` for ``core``'s handler. Any thread; never raises.

        From the isolate's own thread the message is an event in the loop's
        FIFO. From another thread it goes to the inbox; only the first
        message of a burst schedules a wakeup. The flag is cleared by the
        isolate before it empties the inbox, so a message appended after
        that point schedules its own wakeup and none is stranded.
        """
        if self.dead:
            return
        if threading.get_ident() == self.thread_id:
            self.loop.call_soon(self._deliver, core, message)
            return
        if self.relay_port and self.relay(core, message):
            return
        self.inbox.extend((core, message))  # one step: see self.inbox
        if not self.inbox_scheduled:
            self.inbox_scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain_inbox)
            except (RuntimeError, AttributeError):  # closed, or None once closed
                pass  # the loop closed meanwhile: the isolate is gone, drop

    def relay(self, core: _PortCore, message: Any) -> bool:
        """Queue a message from another thread through the native queue. Any thread.

        False when the queue is gone (the isolate ended): the caller then
        falls back on the inbox, which drops it as a dead isolate's.
        """
        ticket = next(self._relay_tickets)  # atomic under the GIL
        self.relay_box[ticket] = (core, message)
        if self._relay_post(self.relay_port, ticket):
            return True
        self.relay_box.pop(ticket, None)
        return False

    def _deliver(self, core: _PortCore, message: Any) -> None:
        # One same-thread message; the loop's turn drains microtasks after it.
        if self.resume_caps or self.held:
            self.hold(functools.partial(self._dispatch, core, message))
            return
        handler = core.handler
        if handler is not None:
            handler(message)

    @staticmethod
    def _dispatch(core: _PortCore, message: Any) -> None:
        # A held message, run by _pump: the handler, if the port still has one.
        handler = core.handler
        if handler is not None:
            handler(message)

    def _drain_inbox(self) -> None:
        """Dispatch the inbox, one message per Dart turn: handler, then drain.

        Isolate thread (an event of its loop, or called by deliver_native).
        Messages run in the order they were appended, so each sender's stay
        in order; those to ports closed meanwhile (handler ``None``) are
        dropped. An exception from a handler is reported through
        ``loop._report_callback_error``; ``SystemExit`` and
        ``KeyboardInterrupt`` propagate, leaving the rest queued.

        Handles only what was queued when it started, so a flood from other
        threads can't starve timers and I/O; the rest gets another event.
        ``_speedups.drain_inbox`` is the C version, bound in place of this
        one for the accelerated loop classes (kept in step:
        tests/test_speedups.py).
        """
        self.inbox_scheduled = False
        inbox = self.inbox
        popleft = inbox.popleft
        loop = self.loop
        microtasks = loop._microtasks
        oob = self.oob
        # Whether messages must wait (paused, or events held by a pause still
        # to run) changes only when control actions are served: looked at
        # first and after each serve_control, not for every message.
        waiting = self.resume_caps or self.held
        for _ in range(len(inbox) // 2):  # two entries a message: see __init__
            if oob:
                self.serve_control()
                waiting = self.resume_caps or self.held
            if waiting:
                # The rest of the inbox waits behind the held events, in order.
                while inbox:
                    self._hold_message(popleft(), popleft())
                return
            core = popleft()
            message = popleft()
            handler = core.handler
            if handler is None:
                continue
            try:
                handler(message)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                loop._report_callback_error(exc, handler, (message,))
            if microtasks:
                loop._run_pending_immediate_callback()
        if inbox and not self.inbox_scheduled:
            self.inbox_scheduled = True
            loop.call_soon(self._drain_inbox)

    def deliver_native(self) -> None:
        """Reader callback of the native queue's wakeup fd: dispatch its batch."""
        queue = self.native_queue
        if queue is None:
            return
        # At most ~1024 per call (the rest keeps the fd readable, so the loop
        # comes back after its other ready events): fair to them under a
        # flood from C, and the batch's objects stay in the CPU caches.
        batch = queue.drain_flat(1024)
        if self.inbox:
            # Sent before the relay existed (or by a thread that had not yet
            # seen it): older than anything of the same sender in the batch.
            self._drain_inbox()
        if batch:
            dispatch = _speedups_dispatch_native if self.loop._dart_accelerated else _dispatch_native
            dispatch(self, batch, _registry_ref())

    def _hold_message(self, core: _PortCore, message: Any) -> None:
        self.hold(functools.partial(self._dispatch, core, message))

    def bind_native(self, core: _PortCore) -> None:
        from .ffi import _queue

        with self.lock:
            if self.dead or core.closed or core.native_bound:
                return
            if self.native_queue is None:
                self.native_queue = _queue.NativeQueue()
                relay_port = _new_port_id()
                _queue.bind_port(relay_port, self.native_queue)
                self._relay_post = _queue.post_int64
                self.relay_port = relay_port
                self.loop.call_soon_threadsafe(self._watch_native)
            _queue.bind_port(core.id, self.native_queue)
            core.native_bound = True
            self.native_ports.add(core.id)

    def _watch_native(self) -> None:
        queue = self.native_queue
        if queue is not None and not self.dead:
            self.loop.add_reader(queue.fileno(), self.deliver_native)

    def unbind_native(self, port_id: int) -> None:
        """A native-bound port closed. Isolate thread.

        The queue itself stays until the isolate ends: other threads'
        messages may be on their way through it (the relay), and its reader
        does not keep the isolate alive (see ``_dart_native_fd``).
        """
        from .ffi import _queue

        _queue.unbind_port(port_id)
        with self.lock:
            self.native_ports.discard(port_id)

    # -- pause ------------------------------------------------------------

    def hold(self, event: Callable[[], None]) -> None:
        """Keep an ordinary event until the isolate is resumed. Isolate thread."""
        self.held.append(event)
        self.loop._keepalive += 1

    def _release_held(self) -> None:
        """The pause ended: run the held events, in order, one per turn."""
        if self.held and not self.pump_scheduled:
            self.pump_scheduled = True
            self.loop.call_soon(self._pump)
        if self.inbox and not self.inbox_scheduled:
            self.inbox_scheduled = True
            self.loop.call_soon(self._drain_inbox)

    def _pump(self) -> None:
        """Run the oldest held event as this turn's event; queue the next.

        Until the backlog is empty, ordinary events that come meanwhile are
        held behind it (see :attr:`paused`), so the order in which the loop
        reached them is kept across a pause.
        """
        self.pump_scheduled = False
        held = self.held
        if self.resume_caps or not held:
            return  # paused again: the next resume restarts the pump
        event = held.popleft()
        self.loop._keepalive -= 1
        if held:
            self.pump_scheduled = True
            self.loop.call_soon(self._pump)
        self.pumping = True
        try:
            event()
        finally:
            self.pumping = False

    # -- control ----------------------------------------------------------

    def control(self, *action: Any) -> None:
        """Queue a control action for this isolate. Any thread; never raises."""
        if self.dead:
            return
        self.oob.append(action)
        if threading.get_ident() == self.thread_id:
            return  # the loop serves it after the current event
        try:
            self.loop.call_soon_threadsafe(self.serve_control)
        except (RuntimeError, AttributeError):  # the loop closed (or was dropped) meanwhile
            pass
        if action[0] == _KILL and action[2] == IMMEDIATE:
            self._interrupt()

    def _interrupt(self) -> None:
        # kill(IMMEDIATE) also stops Python code that is running in the
        # isolate now, even a loop that never awaits: an asynchronous
        # exception raised at its next bytecode boundary.
        _install_unraisable_hook()
        with self.lock:
            if self.dead or not self.in_event or self.thread is None:
                return
            ident = self.thread.ident
            if ident is not None:
                self.interrupted = True
                # The rest of the loop's ready queue must not run either
                # (uvloop runs it after the exception escapes a callback).
                self.loop._dart_unwinding = True
                _set_async_exc(ident, _IsolateKilled)

    def serve_control(self) -> None:
        """Run queued control actions. Isolate thread, between events."""
        oob = self.oob
        while oob:
            kind, *args = oob.popleft()
            if kind == _PAUSE:
                cap = args[0]
                self.resume_caps.add(cap)
                self._fail_blocking_calls()
            elif kind == _RESUME:
                cap = args[0]
                if cap in self.resume_caps:
                    self.resume_caps.discard(cap)
                    if not self.resume_caps:
                        self._release_held()
            elif kind == _PING:
                port, response, priority = args
                if priority == IMMEDIATE:
                    port.send(response)
                else:
                    self.loop.call_soon(port.send, response)
            elif kind == _KILL:
                self.unwind("isolate terminated by Isolate.kill")
            elif kind == _ADD_EXIT:
                port, response = args
                self.exit_listeners[port] = response
            elif kind == _DEL_EXIT:
                self.exit_listeners.pop(args[0], None)
            elif kind == _ADD_ERROR:
                self.error_listeners[args[0]] = None
            elif kind == _DEL_ERROR:
                self.error_listeners.pop(args[0], None)
            elif kind == _ERROR_FATAL:
                self.errors_are_fatal = bool(args[0])

    # -- errors and the end -----------------------------------------------

    def uncaught(self, exc: BaseException) -> None:
        """An uncaught error: tell the error listeners; end if errors are fatal."""
        report = _describe(exc)
        for port in list(self.error_listeners):
            port.send(report)
        if self.errors_are_fatal:
            self.unwind("isolate terminated by an uncaught error", cause=exc)

    def unwind(self, reason: str, *, cause: BaseException | None = None, kind: type[_IsolateUnwind] = _IsolateUnwind) -> NoReturn:
        """End the isolate from its own thread: raise ``kind`` out of the turn.

        A spawned isolate first stops taking work, so that nothing of it
        runs on the way out: its ports close (queued messages are dropped),
        its Dart timers are cancelled, its queued microtasks dropped, and its
        tasks cancelled. This matters on uvloop, which runs the rest of its
        ready queue after a ``SystemExit`` escaped a callback, before
        ``run_forever`` returns; on the asyncio backend the same is done by
        the thread main afterwards. (Plain asyncio callbacks already queued
        with ``call_soon`` are dropped: from now on the loop runs only task
        steps and future callbacks, see ``_dart_keep_while_unwinding``.)
        """
        if self.spawned:
            loop = self.loop
            loop._dart_unwinding = True
            self._mark_dead()
            _drop_dart_work(loop)
            if loop.backend == "uvloop":
                # Only uvloop steps tasks on the way out; the asyncio backend
                # leaves run_forever at once and _finish cancels them.
                for task in loop._dart_leftover_tasks():  # type: ignore[attr-defined]
                    task.cancel()
        raise kind(reason) from cause

    def idle(self) -> None:
        """No event can come any more: stop the loop; the thread main ends the isolate."""
        self.loop.stop()

    def loop_closed(self) -> None:
        """The loop is closing (root isolate): close ports, end spawned children."""
        if not self.spawned:
            self._shutdown_children()
            self._mark_dead()

    def _shutdown_children(self) -> None:
        for child in list(self.children):
            child.control(_KILL, child.terminate_capability, IMMEDIATE)
        for child in list(self.children):
            if child.thread is not None and child.thread is not threading.current_thread():
                child.thread.join()

    def _fail_blocking_calls(self) -> None:
        with self.lock:
            calls, self.blocking_calls = self.blocking_calls, set()
        for call in calls:
            call.fail()

    def _mark_dead(self) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = True
        self._fail_blocking_calls()
        for core in list(self.cores):
            core.close()
        if self._control_core is not None:
            with _state_lock:
                _state_by_control.pop(self._control_core.id, None)
            self._control_core.close()
        queue, self.native_queue = self.native_queue, None
        if queue is not None:
            from .ffi import _queue

            _queue.unbind_port(self.relay_port)
            try:
                if not self.loop.is_closed():
                    self.loop.remove_reader(queue.fileno())
            except Exception:  # pragma: no cover - loop already torn down
                pass
            queue.close()
        self.inbox.clear()
        self.relay_box.clear()
        self.oob.clear()

    # -- the spawned isolate's thread ---------------------------------------

    def prepare(self, backend: str, strict: bool) -> None:
        """Make the isolate's loop and queue its entry. Spawner's thread, before
        the isolate's thread starts (which then has only to run the loop, so
        the spawner need not wait for it)."""
        loop = _loop_class(backend, strict, spawned=True)(strict=strict)
        self.bind_loop(loop)
        self.thread_id = None  # set by thread_main, in the isolate's own thread
        if self.resume_caps:
            # spawn(paused=True): the entry is the first ordinary event,
            # held until the pause capability is resumed.
            self.hold(self._run_entry)
        else:
            loop.call_soon(self._run_entry)

    def abandon(self) -> None:
        """The thread could not be started: undo :meth:`prepare`."""
        self._mark_dead()
        self.loop.close()

    def thread_main(self) -> None:
        loop = self.loop
        self.thread_id = threading.get_ident()
        try:
            self.in_event = True
            try:
                loop.run_forever()
            except _IsolateUnwind:
                pass  # Isolate.exit, kill, or a fatal uncaught error
        finally:
            while True:
                try:
                    self._disarm()
                    break
                except _IsolateKilled:
                    continue  # a kill(IMMEDIATE) that landed just now
            try:
                self._finish(loop)
            finally:
                self._thread_done()

    def _thread_done(self) -> None:
        """The thread's last act: wake whoever waits to join it (see _join)."""
        with self.lock:
            self.finished = True
            waiters, self.finish_waiters = self.finish_waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_set_done, fut)
            except (RuntimeError, AttributeError):  # pragma: no cover - that loop is gone
                pass

    def _finished_future(self) -> asyncio.Future[None]:
        """A future of the running loop, done once the thread's last act is done."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self.lock:
            if not self.finished:
                self.finish_waiters.append((loop, fut))
                return fut
        fut.set_result(None)
        return fut

    def _disarm(self) -> None:
        """Make sure no kill(IMMEDIATE) exception can land during the cleanup."""
        while True:
            try:
                with self.lock:
                    self.in_event = False
                    if self.interrupted:
                        _clear_async_exc(threading.get_ident(), None)
                return
            except _IsolateKilled:
                continue

    def _run_entry(self) -> None:
        assert self.entry is not None
        entry, message = self.entry
        self.entry = None
        result = entry(message)
        if inspect.isawaitable(result):
            task = self.loop.create_task(_as_coroutine(result))
            task.add_done_callback(self._entry_done)

    def _entry_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            if isinstance(exc, _IsolateUnwind):
                return  # the task's step already unwound the isolate
            self.loop._report_uncaught(exc, {"message": "Exception in isolate entry point", "exception": exc})

    def _finish(self, loop: DartEventLoop) -> None:
        """End the isolate: close ports, cancel tasks, close the loop, tell listeners.

        Called by thread_main after _disarm."""
        self._mark_dead()
        # Nothing of the isolate's own queues runs any more: its ports are
        # closed (queued messages are dropped), its Dart timers cancelled, its
        # queued microtasks dropped. Only leftover asyncio tasks get to run,
        # to be cancelled.
        _drop_dart_work(loop)
        try:
            self._cancel_leftovers(loop)
        except _IsolateUnwind:
            pass  # a leftover task called Isolate.exit or raised fatally
        except Exception as exc:  # e.g. a cancelled task that never ends
            try:
                loop.call_exception_handler({"message": f"error while ending isolate {self.debug_name!r}", "exception": exc})
            except Exception:  # pragma: no cover
                pass
        _retrieve_unwinds(loop)
        try:
            loop.close()
        except Exception:  # pragma: no cover
            pass
        bequest, self.bequest = self.bequest, None
        if bequest is not None:
            port, message = bequest
            if not port._core.closed:
                port._core.isolate.post(port._core, message)
        for port, response in list(self.exit_listeners.items()):
            port.send(response)

    def _cancel_leftovers(self, loop: DartEventLoop) -> None:
        if loop.is_closed():
            return
        tasks = loop._dart_leftover_tasks()  # type: ignore[attr-defined]
        for task in tasks:
            task.cancel()
        if tasks:
            if loop._microtasks:
                # Kept task wake-ups (strict mode) run in the drain after
                # an event: make sure one comes (a future's callback, so
                # that the ending loop runs it).
                loop.call_soon(_set_done, loop.create_future())
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop._microtasks.clear()
        # Each of these runs the loop again: only when there is something to
        # shut down (most isolates have neither).
        if loop._dart_used_asyncgens:
            loop.run_until_complete(loop.shutdown_asyncgens())
        if loop._dart_used_executor:
            # Only when an executor was made: shutting it down starts a thread,
            # which the liveness check can't see; counted as an executor job
            # so that the loop is not stopped as idle meanwhile.
            loop._executor_jobs += 1
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop._executor_jobs -= 1


def _retrieve_unwinds(loop: DartEventLoop) -> None:
    """Mark the ``_IsolateUnwind`` that ended a task as retrieved.

    The task whose step called ``Isolate.exit`` (or was interrupted by
    ``kill``, or raised while errors are fatal) ends with the exception that
    unwinds the thread. Nothing awaits that task any more, and asyncio would
    log "Task exception was never retrieved" when it is collected (on the
    asyncio backend, which leaves ``run_forever`` at once, even for the
    ``Isolate.run`` entry task). Other exceptions are left to be reported.
    """
    for task in list(loop._dart_tasks):  # type: ignore[attr-defined]
        # _exception reads it without retrieving it (both the C and the Python Task).
        if task.done() and isinstance(getattr(task, "_exception", None), _IsolateUnwind):
            task.exception()


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _drop_dart_work(loop: DartEventLoop) -> None:
    """Drop what the isolate's own queues still hold: its queued microtasks
    and its Dart timers (an ending isolate runs none of them).

    In strict mode asyncio future callbacks are microtasks too; those are
    kept, since cancelling the leftover tasks needs their wake-ups.
    """
    timers = loop._dart_timers
    if timers is not None:
        for timer in [*timers._zero, *timers._heap]:
            timer.cancel()
    microtasks = loop._microtasks
    if microtasks:
        kept = [mt for mt in microtasks if mt[1] and isinstance(mt[1][-1], asyncio.Future)] if loop.strict else []
        microtasks.clear()
        microtasks.extend(kept)


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


def _dispatch_native(state: _IsolateState, batch: list[Any], registry: dict[int, _PortCore]) -> None:
    """Dispatch a batch drained from the native queue; isolate thread.

    ``batch`` is ``NativeQueue.drain_flat()``'s ``[port, value, port, value,
    ...]``, in the queue's FIFO order (so each C thread's posts to a port
    stay in order). Each message is its own turn: ``handler(message)``, then
    the drain. Messages to closed ports are dropped (also those behind a
    message whose handler closed the port); relay tickets (see
    ``_IsolateState.relay``) are exchanged for their message. While the
    isolate is paused (also by a control action served after a handler),
    messages are held in order. ``_speedups.dispatch_native`` is the C
    version (kept in step: tests/test_speedups.py).
    """
    loop = state.loop
    microtasks = loop._microtasks
    relay_port, relay_box = state.relay_port, state.relay_box
    get = registry.get
    oob = state.oob
    # As in _drain_inbox: whether messages must wait changes only when
    # control actions are served.
    waiting = state.resume_caps or state.held
    # A run of messages to one port shares one port object (drain_flat): the
    # port is resolved once per run. Its core stays right for the whole
    # batch: a port that closes meanwhile keeps its core, whose handler is
    # None from then on, and a core's isolate never changes.
    last_port: object = None
    last_core: _PortCore | None = None
    is_relay = False
    items = iter(batch)
    for port_id, value in zip(items, items):
        if port_id is not last_port:
            last_port = port_id
            is_relay = port_id == relay_port
            if not is_relay:
                last_core = get(port_id)  # type: ignore[arg-type]
                if last_core is not None and last_core.isolate is not state:
                    last_core = None
        if is_relay:
            core, value = relay_box.pop(value)
        elif last_core is None:
            continue
        else:
            core = last_core
        if waiting:
            state._hold_message(core, value)
            continue
        handler = core.handler
        if handler is None:
            continue
        try:
            handler(value)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            loop._report_callback_error(exc, handler, (value,))
        if microtasks:
            loop._run_pending_immediate_callback()
        if oob:
            state.serve_control()
            waiting = state.resume_caps or state.held


_speedups_dispatch_native: Callable[..., None] = getattr(SPEEDUPS, "dispatch_native", _dispatch_native)
_speedups_drain_inbox: Callable[[_IsolateState], None] = getattr(SPEEDUPS, "drain_inbox", _IsolateState._drain_inbox)


def _registry_ref() -> dict[int, _PortCore]:
    from ._ports import _registry

    return _registry


def _attach_root(loop: DartEventLoop) -> _IsolateState:
    """Make ``loop`` the root isolate of the current thread (called by run_forever)."""
    iso = _IsolateState(None, spawned=False, debug_name="main")
    iso.bind_loop(loop)
    return iso


def _current_state(what: str) -> _IsolateState:
    loop = running_dart_loop(what)
    iso = loop._isolate
    assert iso is not None
    return iso


class _IsolateMeta(type):
    @property
    def current(cls) -> Isolate:
        """The isolate running in this thread (``RuntimeError`` if none)."""
        iso = _current_state("Isolate.current")
        return Isolate._of(iso)


class Isolate(metaclass=_IsolateMeta):
    """A handle on an isolate: its control port and capabilities.

    Get one from :meth:`spawn` or :attr:`Isolate.current`; ``Isolate(control_port,
    pause_capability=..., terminate_capability=...)`` builds a restricted
    handle from parts. Control methods may be called from any thread that
    runs a dartloop loop; they return at once and act on the target isolate
    after its current event (control messages are served also while it is
    paused). An ``Isolate`` object can't be sent; its control port and
    capabilities can.
    """

    IMMEDIATE = IMMEDIATE
    BEFORE_NEXT_EVENT = BEFORE_NEXT_EVENT
    __dartloop_unsendable__ = True

    def __init__(
        self,
        control_port: SendPort,
        *,
        pause_capability: Capability | None = None,
        terminate_capability: Capability | None = None,
        debug_name: str | None = None,
    ) -> None:
        if not isinstance(control_port, SendPort):
            raise TypeError(f"Isolate(): control_port must be a SendPort, got {type(control_port).__name__}")
        self.control_port = control_port
        # The isolate itself, when this handle came from spawn or current
        # (kept after it died, to join its thread).
        self._state: _IsolateState | None = None
        self.pause_capability = pause_capability
        self.terminate_capability = terminate_capability
        self._debug_name = debug_name

    @classmethod
    def _of(cls, iso: _IsolateState) -> Isolate:
        handle = cls(
            iso.control_port,
            pause_capability=iso.pause_capability,
            terminate_capability=iso.terminate_capability,
            debug_name=iso.debug_name,
        )
        handle._state = iso
        return handle

    @property
    def debug_name(self) -> str | None:
        return self._debug_name

    def _target(self) -> _IsolateState | None:
        with _state_lock:
            return _state_by_control.get(self.control_port._core.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Isolate) and other.control_port == self.control_port

    def __hash__(self) -> int:
        return hash(self.control_port)

    def __repr__(self) -> str:
        return f"<dartloop.Isolate {self._debug_name!r} {self.control_port._core.id:#x}>"

    # -- spawning ---------------------------------------------------------

    @staticmethod
    async def spawn(
        entry: Callable[[Any], Any],
        message: Any,
        *,
        paused: bool = False,
        errors_are_fatal: bool = True,
        on_exit: SendPort | None = None,
        on_error: SendPort | None = None,
        debug_name: str | None = None,
    ) -> Isolate:
        """Start ``entry(message)`` in a new isolate on a new thread.

        The new isolate uses the backend and mode of the calling one; its
        entry point runs as its first event (``entry`` may be ``async``).
        ``message`` crosses like a ``send``. ``on_exit``/``on_error`` are
        registered before any user code runs. The returned future completes
        once the isolate exists.

        Raises ``IsolateSpawnException`` for a non-callable entry,
        ``TypeError`` for an unsendable message (nothing is started), and
        ``RuntimeError`` without a running dartloop loop in this thread.
        """
        parent = _current_state("Isolate.spawn()")
        return await _spawn(parent, entry, message, paused=paused, errors_are_fatal=errors_are_fatal,
                            on_exit=on_exit, on_error=on_error, debug_name=debug_name)

    @staticmethod
    async def run(computation: Callable[..., Any], *args: Any, debug_name: str | None = None, **kwargs: Any) -> Any:
        """Run ``computation(*args, **kwargs)`` in a new isolate and return its result.

        The result comes back without a copy (``Isolate.exit``). An exception
        raised by ``computation`` is raised here with the same type, its
        ``__cause__`` a ``RemoteError`` holding the remote traceback. An
        error that can't be sent back, an uncaught error of the isolate, or
        an isolate that ends without a result raise ``RemoteError`` (the
        last: "Computation ended without result"). The isolate's thread is
        joined before this returns.
        """
        parent = _current_state("Isolate.run()")
        if not callable(computation):
            raise IsolateSpawnException(f"Isolate.run(): computation must be callable, got {type(computation).__name__}")
        loop = parent.loop
        result: asyncio.Future[Any] = loop.create_future()

        def on_response(response: Any) -> None:
            port.close()
            if result.done():
                return
            if response is None:
                result.set_exception(RemoteError("Computation ended without result", ""))
            elif type(response) is list:
                result.set_exception(RemoteError(str(response[0]), str(response[1] or "")))
            elif response[0] == "ok":
                result.set_result(response[1])
            else:
                _, exc, description, trace = response
                exc.__cause__ = RemoteError(description, trace)
                result.set_exception(exc)

        port = RawReceivePort(on_response, debug_name="Isolate.run")
        try:
            request = (port.send_port, computation, args, kwargs) if kwargs else (port.send_port, computation, args)
            child = await _spawn(parent, _remote_run, request,
                                 paused=False, errors_are_fatal=True, on_exit=port.send_port,
                                 on_error=port.send_port,
                                 debug_name=debug_name or getattr(computation, "__qualname__", None))
        except BaseException:
            port.close()
            raise
        try:
            return await result
        finally:
            if child._state is not None:
                await _join(child._state)

    # -- exit -------------------------------------------------------------

    @staticmethod
    def exit(port: SendPort | None = None, message: Any = None) -> None:
        """End the current isolate at once; never returns.

        ``message`` goes to ``port`` without a copy (checked like ``send``),
        before any exit notification. Python ``finally`` blocks on the way
        out still run (Python can't skip them, unlike the Dart VM). Raises
        ``TypeError`` for an unsendable message (and does not exit).
        """
        iso = _current_state("Isolate.exit()")
        if port is not None:
            if not isinstance(port, SendPort):
                raise TypeError(f"Isolate.exit(): port must be a SendPort or None, got {type(port).__name__}")
            check_message(message)
            iso.bequest = (port, message)
        if not iso.spawned:
            iso.loop._microtasks.clear()
            bequest, iso.bequest = iso.bequest, None
            if bequest is not None:
                bequest[0]._core.isolate.post(bequest[0]._core, bequest[1])
        iso.unwind("isolate terminated by Isolate.exit")

    # -- control ----------------------------------------------------------

    def _control(self, *action: Any) -> None:
        target = self._target()
        if target is not None:
            target.control(*action)

    def kill(self, priority: int = BEFORE_NEXT_EVENT) -> None:
        """End the isolate (needs the terminate capability).

        ``BEFORE_NEXT_EVENT`` (default): after its current event.
        ``IMMEDIATE``: as soon as possible, interrupting Python code running
        in it; killing the current isolate this way does not return.
        """
        _check_priority(priority)
        target = self._target()
        if target is None or self.terminate_capability != target.terminate_capability:
            return
        if priority == IMMEDIATE and target.thread_id == threading.get_ident():
            target.unwind("isolate terminated by Isolate.kill", kind=_IsolateKilled)
        target.control(_KILL, self.terminate_capability, priority)

    def pause(self, capability: Capability | None = None) -> Capability:
        """Pause the isolate; returns the capability that resumes it.

        Ordinary messages and timers wait, in order, until every distinct
        pause capability is resumed; control messages are still served.
        Needs the pause capability (ignored otherwise).
        """
        if capability is None:
            capability = Capability()
        elif not isinstance(capability, Capability):
            raise TypeError(f"pause(): capability must be a Capability or None, got {type(capability).__name__}")
        target = self._target()
        if target is not None and self.pause_capability == target.pause_capability:
            target.control(_PAUSE, capability)
        return capability

    def resume(self, capability: Capability) -> None:
        """End the pause made with ``capability``; a wrong one is ignored."""
        if not isinstance(capability, Capability):
            raise TypeError(f"resume(): capability must be a Capability, got {type(capability).__name__}")
        target = self._target()
        if target is not None and self.pause_capability == target.pause_capability:
            target.control(_RESUME, capability)

    def ping(self, port: SendPort, response: Any = None, priority: int = IMMEDIATE) -> None:
        """Ask the isolate to send ``response`` to ``port`` (a simple value)."""
        _check_priority(priority)
        _check_simple(response, "ping()")
        self._control(_PING, port, response, priority)

    def add_on_exit_listener(self, port: SendPort, response: Any = None) -> None:
        """``port`` gets ``response`` as the isolate's last act. Re-adding replaces the response."""
        _check_port(port, "add_on_exit_listener()")
        _check_simple(response, "add_on_exit_listener()")
        self._control(_ADD_EXIT, port, response)

    def remove_on_exit_listener(self, port: SendPort) -> None:
        _check_port(port, "remove_on_exit_listener()")
        self._control(_DEL_EXIT, port)

    def add_error_listener(self, port: SendPort) -> None:
        """``port`` gets ``[description, traceback_text]`` for each uncaught error."""
        _check_port(port, "add_error_listener()")
        self._control(_ADD_ERROR, port)

    def remove_error_listener(self, port: SendPort) -> None:
        _check_port(port, "remove_error_listener()")
        self._control(_DEL_ERROR, port)

    def set_errors_fatal(self, flag: bool) -> None:
        """Whether an uncaught error ends the isolate (needs the terminate capability)."""
        target = self._target()
        if target is not None and self.terminate_capability == target.terminate_capability:
            target.control(_ERROR_FATAL, bool(flag))


def _check_priority(priority: int) -> None:
    if priority not in (IMMEDIATE, BEFORE_NEXT_EVENT):
        raise ValueError(f"priority must be Isolate.IMMEDIATE or Isolate.BEFORE_NEXT_EVENT, got {priority!r}")


def _check_port(port: object, what: str) -> None:
    if not isinstance(port, SendPort):
        raise TypeError(f"{what}: port must be a SendPort, got {type(port).__name__}")


def _check_simple(value: object, what: str) -> None:
    if value is not None and type(value) not in (bool, int, float, str, SendPort, Capability):
        raise TypeError(f"{what}: the response must be a simple value (None, bool, int, float, str, SendPort, Capability), got {type(value).__name__}")


class _StartedFlag(threading.Event):
    """``Thread._started`` of an isolate thread: the one wait on it that the
    stock ``Thread.start()`` makes returns at once (see :class:`_IsolateThread`).
    Set by the new thread as usual."""

    def wait(self, timeout: float | None = None) -> bool:
        return self.is_set()


class _IsolateThread(threading.Thread):
    """The thread of one spawned isolate.

    ``start()`` returns without waiting for the new thread to run. The stock
    ``Thread.start()`` blocks until the thread reports that it started: the
    spawner goes to sleep, is woken from another core, and then waits for the
    GIL that the new thread holds. The isolate needs none of that, since its
    loop and entry are made before the thread starts (:meth:`_IsolateState.prepare`);
    without the wait an ``Isolate.run(noop)`` makes 2.0 voluntary context
    switches instead of 5.6. ``join()`` first waits, for real, until the
    thread has started, as ``Thread.join`` requires.

    Any thread may call ``join()``; it is called once the isolate has ended,
    or by the root isolate as it closes.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(target=target, name=name, daemon=True)
        started = getattr(self, "_started", None)
        if type(started) is threading.Event:
            started.__class__ = _StartedFlag  # the same event, without the wait

    def join(self, timeout: float | None = None) -> None:
        started = getattr(self, "_started", None)
        if isinstance(started, _StartedFlag) and not started.is_set():
            if not threading.Event.wait(started, timeout):
                return  # not started within the timeout: still alive
        super().join(timeout)

    def has_ended(self) -> bool:
        """Started and no longer alive (``is_alive()`` is also false before the start)."""
        started = getattr(self, "_started", None)
        return (started is None or started.is_set()) and not self.is_alive()


async def _spawn(
    parent: _IsolateState,
    entry: Callable[[Any], Any],
    message: Any,
    *,
    paused: bool,
    errors_are_fatal: bool,
    on_exit: SendPort | None,
    on_error: SendPort | None,
    debug_name: str | None,
) -> Isolate:
    if not callable(entry):
        raise IsolateSpawnException(f"Isolate.spawn(): entry point must be callable, got {type(entry).__name__} {entry!r}")
    if on_exit is not None:
        _check_port(on_exit, "Isolate.spawn(on_exit=...)")
    if on_error is not None:
        _check_port(on_error, "Isolate.spawn(on_error=...)")
    payload = prepare_message(message)
    if debug_name is None:
        debug_name = getattr(entry, "__qualname__", None) or repr(entry)
    child = _IsolateState(None, spawned=True, debug_name=debug_name, errors_are_fatal=errors_are_fatal, parent=parent)
    child.entry = (entry, payload)
    if paused:
        child.resume_caps.add(child.pause_capability)
    if on_exit is not None:
        child.exit_listeners[on_exit] = None
    if on_error is not None:
        child.error_listeners[on_error] = None
    loop = parent.loop
    try:
        child.prepare(loop.backend, loop.strict)
    except Exception as exc:  # pragma: no cover - resource exhaustion
        raise IsolateSpawnException(f"Unable to spawn isolate: {exc!r}") from exc
    thread = _IsolateThread(child.thread_main, f"dartloop-isolate-{debug_name}")
    child.thread = thread
    parent.children.add(child)
    try:
        thread.start()
    except Exception as exc:  # pragma: no cover - resource exhaustion
        parent.children.discard(child)
        child.abandon()
        raise IsolateSpawnException(f"Unable to spawn isolate: {exc!r}") from exc
    return Isolate._of(child)


async def _join(state: _IsolateState) -> None:
    thread = state.thread
    if thread is None or thread is threading.current_thread():
        return
    # After an exit message the thread is at its very end: a short blocking
    # wait is cheaper than a loop round trip. An isolate that is still
    # cancelling leftover tasks (after an error report, say) is waited for
    # without blocking the loop: its thread wakes us when it is done.
    thread.join(0.02)
    if not thread.has_ended():
        await state._finished_future()
        thread.join()


def _remote_run(message: tuple[Any, ...]) -> Any:
    # (port, computation, args[, kwargs]): kwargs only when there are some.
    port, computation, args = message[:3]
    try:
        result = computation(*args, **message[3]) if len(message) > 3 else computation(*args)
    except BaseException as exc:
        if isinstance(exc, _IsolateUnwind):
            raise
        _exit_with_error(port, exc)
    if inspect.isawaitable(result):
        return _remote_await(port, result)
    Isolate.exit(port, ("ok", result))


async def _remote_await(port: SendPort, awaitable: Any) -> None:
    try:
        result = await awaitable
    except BaseException as exc:
        if isinstance(exc, (_IsolateUnwind, asyncio.CancelledError, GeneratorExit)):
            raise
        _exit_with_error(port, exc)
    Isolate.exit(port, ("ok", result))


def _exit_with_error(port: SendPort, exc: BaseException) -> None:
    description, trace = _describe(exc)
    # If the exception can't be sent, check_message raises TypeError here,
    # which becomes the isolate's uncaught error: the caller gets RemoteError.
    Isolate.exit(port, ("error", exc, description, trace))
