"""The event-loop turn: Dart's ``handler(event)`` then ``_run_pending_immediate_callback()``.

This module is the heart of dartloop. Two backends share one ordering:

* ``"asyncio"``: a subclass of the stdlib selector loop that owns the turn
  (``_run_once``): each ready handle runs, then the microtask queue is
  drained completely, before the next handle runs, timers are looked at or
  I/O is polled.
* ``"uvloop"``: a subclass of ``uvloop.Loop``. libuv runs the callbacks, so
  every callback that reaches Python through the loop's public methods is
  routed through :meth:`_UVDartLoop._run_event`, which runs it and drains.
  Protocol callbacks are called by uvloop's C code directly, so protocols are
  wrapped in a proxy (:mod:`dartloop._protocols`) whose every method drains
  after it returns.

Microtasks run in the loop's own contextvars context, not in the context of
whoever scheduled them (capturing a context per microtask halves their
throughput); strict-mode future callbacks keep the context asyncio gives them.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import io
import math
import operator
import os
import select
import selectors
import sys
import threading
import weakref
from asyncio import base_events
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._isolate import _IsolateState
    from ._timers import _TimerQueue

__all__ = ["DartEventLoop", "new_event_loop", "available_backends", "default_backend"]

from asyncio.log import logger  # slow-callback warnings go where asyncio users look

try:
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
    _uvloop = None

# The optional C accelerator (dartloop/_speedups.c): C versions of the hot
# paths below, same behaviour. The pure-Python code in this module is the
# reference and runs whenever SPEEDUPS is None: the extension was not built,
# or DARTLOOP_NO_EXTENSIONS=1. new_event_loop() reads SPEEDUPS when it builds
# a loop, so tests can set it to None to get the pure path (see
# _loop_class and the accelerated classes at the end of this module).
SPEEDUPS: Any = None
if os.environ.get("DARTLOOP_NO_EXTENSIONS") != "1":
    try:
        from . import _speedups as SPEEDUPS
    except ImportError:
        pass
    else:
        # asyncio forgets its running loop in a forked child; so does the C side.
        os.register_at_fork(after_in_child=SPEEDUPS.clear_thread_loop)

_Future = asyncio.Future
# The context of the handles that _report_callback_error makes up: never run.
_NO_CONTEXT = contextvars.Context()
_MAXIMUM_SELECT_TIMEOUT = 24 * 3600
# uvloop clamps delays at about 100 years; call_at checks libuv's deadline
# below that (see _UVDartLoop.call_at).
_MAXIMUM_CHECKED_DELAY = 365 * 24 * 3600.0
# Same pruning thresholds as asyncio's BaseEventLoop.
_MIN_SCHEDULED_TIMER_HANDLES = 100
_MIN_CANCELLED_TIMER_HANDLES_FRACTION = 0.5


def _format_callback(callback: object, args: tuple[Any, ...], debug: bool) -> str:
    from asyncio import format_helpers

    try:
        return format_helpers._format_callback_source(callback, args, debug=debug)  # type: ignore[call-arg]
    except TypeError:  # Python 3.11/3.12 take no ``debug``
        return format_helpers._format_callback_source(callback, args)


class DartEventLoop(asyncio.AbstractEventLoop):
    """An asyncio event loop whose turn is the Dart VM's.

    Every event (a ``call_soon``/``call_later``/``call_at``/
    ``call_soon_threadsafe`` callback, an I/O readiness callback, a protocol
    callback, a signal handler, a :class:`~dartloop.Timer` callback, a port
    message) is followed by a complete drain of the microtask queue, including
    microtasks scheduled by microtasks, before anything else happens. The
    microtask queue is empty whenever the loop polls for I/O.

    This is the common base of the concrete loop classes; ``isinstance(loop,
    DartEventLoop)`` is how to recognise a dartloop loop. Create loops with
    :func:`dartloop.new_event_loop`. ``backend`` is ``"asyncio"`` or
    ``"uvloop"``; ``strict`` says whether asyncio future callbacks run as
    microtasks.

    Threads: like any asyncio loop, only ``call_soon_threadsafe`` (and
    dartloop's ``SendPort.send``) may be called from other threads.
    """

    backend: str
    strict: bool
    _microtasks: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]]
    _isolate: _IsolateState | None
    _dart_timers: _TimerQueue | None
    _mt_append: Callable[[tuple[Callable[..., object], tuple[Any, ...]]], None]
    _dart_thread_id: int | None
    _keepalive: int
    _executor_jobs: int
    _dart_used_executor: bool
    _dart_used_asyncgens: bool
    _dart_oob: collections.deque[Any]
    _dart_unwinding: bool

    # True for the classes whose hot paths are in dartloop/_speedups.c; the
    # isolate then dispatches native batches with the C loop too.
    _dart_accelerated = False

    def _dart_setup(self, strict: bool, fields: Any = None) -> None:
        """Set dartloop's per-loop fields: on ``fields`` where given (the
        asyncio backend's ``_dart_state``), else on the loop; ``_microtasks``
        and ``_isolate`` always on the loop."""
        f = self if fields is None else fields
        f.strict = strict
        self._microtasks = microtasks = collections.deque()
        # Bound once: schedule_microtask looks this up on the running loop.
        f._mt_append = microtasks.append
        self._isolate = None
        f._dart_timers = None
        f._dart_thread_id = None
        # Sources that keep a spawned isolate alive and that the backend can't
        # see itself: keep-alive ports, open NativeCallables, Dart timers,
        # executor jobs. Read by the isolate's liveness check.
        f._keepalive = 0
        f._executor_jobs = 0
        f._dart_used_executor = False
        # Set once an async generator started here: only then does an
        # ending isolate need to run shutdown_asyncgens().
        f._dart_used_asyncgens = False
        # The isolate's control queue (set by the isolate); served after
        # every event so that control actions run before the next event.
        f._dart_oob = collections.deque()
        # Set when a spawned isolate starts to end (exit, kill, fatal
        # error): from then on only what cancelling its leftover tasks needs
        # runs (see _dart_keep_while_unwinding).
        f._dart_unwinding = False

    @staticmethod
    def _dart_keep_while_unwinding(callback: Callable[..., object], args: tuple[Any, ...]) -> bool:
        """Whether a callback still runs once the isolate is ending.

        Dart runs nothing of an isolate after its exit; Python must still
        cancel its leftover tasks (so that their ``finally`` blocks run).
        What that needs is kept: task steps and wake-ups, and callbacks of
        futures (``add_done_callback``, timers that complete a future).
        Every other callback, e.g. a ``call_soon(port.send, ...)`` queued
        before the exit, is dropped.
        """
        return isinstance(getattr(callback, "__self__", None), asyncio.Future) or (
            bool(args) and isinstance(args[0], asyncio.Future)
        )

    # -- the drain --------------------------------------------------------

    def _run_pending_immediate_callback(self) -> None:
        """Run every queued microtask, including ones queued meanwhile (FIFO).

        The Dart VM's name for the drain. Called by the loop after every
        event. An exception escaping a microtask is an uncaught error (see
        :meth:`_report_uncaught`); the drain then carries on with the next
        microtask. ``SystemExit`` and ``KeyboardInterrupt`` propagate and
        leave the rest queued.
        """
        q = self._microtasks
        popleft = q.popleft
        while q:
            callback, args = popleft()
            try:
                callback(*args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report_uncaught(
                    exc,
                    {
                        "message": "Exception in microtask "
                        + _format_callback(callback, args, self.get_debug()),
                        "exception": exc,
                    },
                )

    def _schedule_microtask(self, callback: Callable[..., object], *args: Any) -> None:
        """Append a microtask. Loop thread only."""
        self._mt_append((callback, args))

    # -- uncaught errors --------------------------------------------------

    def _report_uncaught(self, exc: BaseException, context: dict[str, Any]) -> None:
        """Route an exception that escaped an event or a microtask.

        The root isolate hands it to the loop's exception handler, as asyncio
        does, and carries on. A spawned isolate sends it to its error
        listeners and, while errors are fatal, ends (this raises
        ``_IsolateUnwind`` out of the turn).
        """
        iso = self._isolate
        if iso is not None and iso.spawned:
            iso.uncaught(exc)
        else:
            self.call_exception_handler(context)

    def _report_callback_error(self, exc: BaseException, callback: object, args: tuple[Any, ...], handle: object = None) -> None:
        context: dict[str, Any] = {
            "message": "Exception in callback " + _format_callback(callback, args, self.get_debug()),
            "exception": exc,
        }
        if handle is not None:
            tb = getattr(handle, "_source_traceback", None)
            if tb:
                context["source_traceback"] = tb
        else:
            # Where dartloop ran the callback itself (uvloop runs our wrapper,
            # Dart timers and port handlers run inside one), the real handle
            # is not at hand. Stock loops always put one in the context, and
            # handlers read context["handle"]: describe the callback with one.
            handle = asyncio.Handle(callback, args, self, _NO_CONTEXT)
            handle._source_traceback = None  # the report's stack, not the callback's
        context["handle"] = handle
        self._report_uncaught(exc, context)

    # -- isolate plumbing -------------------------------------------------

    def run_forever(self) -> None:
        """Run until ``stop()``; the loop is the root isolate of its thread.

        A loop that is not a spawned isolate becomes the root isolate of the
        thread that runs it, with ports and ``Isolate.current``.
        """
        if self._isolate is None:
            from ._isolate import _attach_root

            _attach_root(self)
        self._dart_thread_id = threading.get_ident()
        speedups = SPEEDUPS
        if speedups is None:
            super().run_forever()  # type: ignore[safe-super]
            return
        # The C schedule_microtask finds the running loop through this
        # thread-local instead of asking asyncio (a getpid() call on 3.11).
        previous = speedups.set_thread_loop(self)
        try:
            super().run_forever()  # type: ignore[safe-super]
        finally:
            speedups.set_thread_loop(previous)

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        # A pending executor job keeps a spawned isolate alive.
        fut = super().run_in_executor(executor, func, *args)  # type: ignore[safe-super]
        self._dart_used_executor = True
        self._executor_jobs += 1
        fut.add_done_callback(self._executor_job_done)
        return fut

    def _executor_job_done(self, fut: object) -> None:
        self._executor_jobs -= 1

    def _asyncgen_firstiter_hook(self, agen: Any) -> None:
        self._dart_used_asyncgens = True
        super()._asyncgen_firstiter_hook(agen)  # type: ignore[misc]

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        iso = self._isolate
        if iso is not None and not self.is_closed():
            iso.loop_closed()
        super().close()  # type: ignore[safe-super]
        # Drop the references that point back at the loop (isolate state,
        # timer queue, bound event runner) so that a closed loop is freed as
        # soon as the last outside reference goes, as a stock loop is.
        self._isolate = None
        self._dart_timers = None
        if iso is not None and iso.loop is self:
            iso.loop = None  # type: ignore[assignment]
        self._dart_release_refs()

    def _dart_release_refs(self) -> None:
        """Backend hook: drop backend-specific references to the loop."""

    def _dart_has_pending_work(self) -> bool:
        """True while something queued in dartloop's own structures can run."""
        return bool(self._microtasks) or self._keepalive > 0 or self._executor_jobs > 0

    def _dart_native_fd(self) -> int:
        """The fd of the isolate's native-queue reader, or -1.

        Not I/O for the liveness rule: the ports C can reach (``native_port``,
        ``NativeCallable.listener``) count through ``_keepalive``
        (``keep_isolate_alive``) like any port, and what C has queued already
        counts as pending work (:meth:`_dart_native_pending`).
        """
        iso = self._isolate
        queue = iso.native_queue if iso is not None else None
        return queue.fileno() if queue is not None else -1

    def _dart_native_pending(self) -> bool:
        """Posts or listener calls from C queued but not yet delivered."""
        iso = self._isolate
        queue = iso.native_queue if iso is not None else None
        return queue is not None and queue.pending() > 0


# os.pipe2 flags for the asyncio backend's self-pipe (see _make_self_pipe),
# or None where there is no pipe2 (asyncio's socket pair is used there).
_PIPE_FLAGS: int | None = os.O_NONBLOCK | os.O_CLOEXEC if hasattr(os, "pipe2") else None
_SELF_PIPE_READ = 4096  # bytes per read, as asyncio's
_STOCK_PROCESS_EVENTS = asyncio.selector_events.BaseSelectorEventLoop._process_events
# An epoll event is a read event unless it is only EPOLLOUT, and a write
# event unless it is only EPOLLIN (EPOLLERR / EPOLLHUP wake both), as in
# selectors.EpollSelector.
_NOT_EPOLLIN = ~getattr(select, "EPOLLIN", 0)
_NOT_EPOLLOUT = ~getattr(select, "EPOLLOUT", 0)
_EVENT_READ, _EVENT_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _AsyncioDartLoop(DartEventLoop, asyncio.SelectorEventLoop):  # type: ignore[misc]
    """The ``"asyncio"`` backend: stdlib selector loop with an owned turn."""

    backend = "asyncio"

    # Performance, not behaviour. asyncio's Python code reads ``self._ready``,
    # ``self._debug``, ``self.call_soon`` ... on every event, and CPython's
    # specializer makes those reads fast only while the instance dict keeps
    # its keys shared with the class: at most 29 keys, and on 3.13 also no
    # __slots__ anywhere in the class (a slotted subclass loses the inline
    # values, and then every method load takes the generic path: -25% on
    # call_soon chains). asyncio itself has 26 keys. So the instance dict
    # gets only the two fields the turn reads most, _microtasks and
    # _isolate, and the _dart_state holder; dartloop's other fields live in
    # the holder's slots, behind the forwarding properties made below.
    # tests/test_speedups.py checks the key count and the layout.
    _DIRECT_FIELDS = ("_microtasks", "_isolate")

    def __init__(self, selector: selectors.BaseSelector | None = None, *, strict: bool = False) -> None:
        self._dart_state = state = _AsyncioLoopState()
        self._dart_setup(strict, state)
        state._wakeup_pending = False
        state._dart_watch_idle = False
        # Transports made by this loop, to tell whether a spawned isolate
        # still has I/O that can produce events (paused readers included).
        state._dart_transports = weakref.WeakSet()
        super().__init__(selector)
        # The turn polls epoll itself where nothing it would skip can differ:
        # the stdlib EpollSelector, and asyncio's own _process_events.
        sel = self._selector
        fuse = type(sel) is selectors.EpollSelector and type(self)._process_events is _STOCK_PROCESS_EVENTS
        state._dart_epoll = sel._selector if fuse else None

    def _make_self_pipe(self) -> None:
        # A pipe, not asyncio's socket pair: writing and reading one byte
        # costs about a third of what it costs on an AF_UNIX socket (0.7 vs
        # 2.0 µs each, measured here), and the write is on the path of every
        # cross-thread wakeup (call_soon_threadsafe, port messages from other
        # isolates). Signal wakeups (signal.set_wakeup_fd, one byte per
        # signal) work the same on a pipe. The ends are unbuffered FileIO
        # objects: like the sockets, their write reads the descriptor inside
        # the call, under the GIL, so a write from another thread racing
        # close() can't hit a reused descriptor, and a closed end refuses
        # writes; on a full pipe write() returns None instead of raising.
        if _PIPE_FLAGS is None:
            super()._make_self_pipe()  # type: ignore[misc]
            return
        r, w = os.pipe2(_PIPE_FLAGS)
        self._ssock, self._csock = io.FileIO(r, "rb"), io.FileIO(w, "wb")
        self._internal_fds += 1
        self._add_reader(r, self._read_from_self)

    def _read_from_self(self) -> None:
        # One read takes every wakeup byte queued, unless there are 4096 or
        # more; then read on. Stock asyncio reads until EAGAIN, which costs
        # an exception per wakeup; a byte written after the last read keeps
        # the pipe readable, so the next poll comes back here for it.
        ssock = self._ssock
        if type(ssock) is not io.FileIO:  # asyncio's socket pair (no pipe2)
            super()._read_from_self()  # type: ignore[misc]
            return
        read = ssock.read  # retries EINTR itself (PEP 475)
        while True:
            data = read(_SELF_PIPE_READ)
            if not data:  # None: empty (EAGAIN); b"": no writer left
                return
            self._process_self_data(data)
            if len(data) < _SELF_PIPE_READ:
                return

    def _write_to_self(self) -> None:
        # Any thread, possibly while or after close() runs (as in asyncio).
        csock = self._csock
        if type(csock) is not io.FileIO:  # None, or asyncio's socket pair
            super()._write_to_self()  # type: ignore[misc]
            return
        try:
            csock.write(b"\0")
        except (OSError, ValueError):  # ValueError: a FileIO closed meanwhile
            if self._debug:
                logger.debug("Fail to write a null byte into the self-pipe", exc_info=True)

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None) -> asyncio.Handle:
        """Like ``call_soon()``, from any thread, with one wakeup per burst.

        Stock asyncio writes the self-pipe on every call; here a write happens
        only when no wakeup is pending, so a burst of calls from other threads
        costs one ``select`` wakeup. The flag is cleared right after
        ``select`` returns and before the ready queue is measured, so a call
        that skipped the write is always run by the iteration that follows.
        """
        if self._closed:
            raise RuntimeError("Event loop is closed")  # as _check_closed()
        if self._debug:
            self._check_callback(callback, "call_soon_threadsafe")
            handle = self._call_soon(callback, args, context)
            if handle._source_traceback:
                del handle._source_traceback[-1]
        else:
            # _call_soon() inlined: this is on the path of every message
            # from another isolate.
            handle = asyncio.Handle(callback, args, self, context)
            self._ready.append(handle)
        state = self._dart_state
        if not state._wakeup_pending:
            state._wakeup_pending = True
            self._write_to_self()
        return handle

    def _track_transport(self, transport: Any) -> Any:
        self._dart_transports.add(transport)
        return transport

    def _make_socket_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._track_transport(super()._make_socket_transport(*args, **kwargs))

    def _make_ssl_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._track_transport(super()._make_ssl_transport(*args, **kwargs))

    def _make_datagram_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._track_transport(super()._make_datagram_transport(*args, **kwargs))

    def _make_read_pipe_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._track_transport(super()._make_read_pipe_transport(*args, **kwargs))

    def _make_write_pipe_transport(self, *args: Any, **kwargs: Any) -> Any:
        return self._track_transport(super()._make_write_pipe_transport(*args, **kwargs))

    async def _make_subprocess_transport(self, *args: Any, **kwargs: Any) -> Any:
        transport = self._track_transport(await super()._make_subprocess_transport(*args, **kwargs))
        if self.strict:
            # asyncio's subprocess transport queues protocol.connection_made
            # with call_soon, then completes its waiter directly. In strict
            # mode the waiter's wake-up is a microtask and would overtake
            # connection_made (Process would see protocol.stdout still None):
            # wait one event, behind it.
            hop = self.create_future()
            self.call_soon(hop.set_result, None)
            await hop
        return transport

    def _dart_is_idle(self) -> bool:
        """No event can come any more (for a spawned isolate's lifetime rule)."""
        if self._ready or self._dart_has_pending_work():
            return False
        if any(not h._cancelled for h in self._scheduled):
            return False
        if self._signal_handlers:
            return False
        for transport in self._dart_transports:
            if not transport.is_closing():
                return False
        # The self-pipe is always registered and the native queue's reader
        # does not count (see _dart_native_fd); anything else is user I/O.
        fds = self._selector.get_map()
        native_fd = self._dart_native_fd()
        if len(fds) > 1 + (native_fd >= 0 and native_fd in fds):
            return False
        return not self._dart_native_pending()

    def _run_once(self) -> None:
        """One iteration: poll, then run each ready event followed by a drain.

        Same structure as ``BaseEventLoop._run_once``; the differences are
        the body of the dispatch loop, which calls the handle's callback
        directly and then ``_run_pending_immediate_callback()``, and, with the
        stdlib ``EpollSelector``, a poll that queues the ready I/O handles in
        the same pass (what ``select()`` and ``_process_events()`` do, in
        their order).
        """
        scheduled = self._scheduled
        sched_count = len(scheduled)
        if (
            sched_count > _MIN_SCHEDULED_TIMER_HANDLES
            and self._timer_cancelled_count / sched_count > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
        ):
            live = []
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
                else:
                    live.append(handle)
            heapq.heapify(live)
            self._scheduled = scheduled = live
            self._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                self._timer_cancelled_count -= 1
                handle = heapq.heappop(scheduled)
                handle._scheduled = False

        ready = self._ready
        timeout: float | None = None
        if ready or self._stopping:
            timeout = 0
        elif scheduled:
            timeout = min(max(0.0, scheduled[0]._when - self.time()), _MAXIMUM_SELECT_TIMEOUT)
        else:
            iso = self._isolate
            if iso is not None and iso.spawned and self._dart_is_idle():
                iso.idle()
                return

        state = self._dart_state
        epoll = state._dart_epoll
        if epoll is None:
            event_list = self._selector.select(timeout)
            state._wakeup_pending = False
            self._process_events(event_list)
            event_list = None
        else:
            # EpollSelector.select() and _process_events() in one pass, as
            # their code does it, without the (key, mask) list in between:
            # this is on the path of every wakeup from another thread.
            if timeout is None:
                timeout = -1
            elif timeout > 0:
                timeout = math.ceil(timeout * 1e3) * 1e-3  # at least timeout
            fd_to_key = self._selector._fd_to_key
            try:
                fd_events = epoll.poll(timeout, len(fd_to_key) or 1)
            except InterruptedError:
                fd_events = ()
            state._wakeup_pending = False
            for fd, event in fd_events:
                key = fd_to_key.get(fd)
                if key is None:
                    continue
                reader, writer = key.data
                if event & _NOT_EPOLLOUT and reader is not None and key.events & _EVENT_READ:
                    if reader._cancelled:
                        self._remove_reader(key.fileobj)
                    else:
                        ready.append(reader)
                if event & _NOT_EPOLLIN and writer is not None and key.events & _EVENT_WRITE:
                    if writer._cancelled:
                        self._remove_writer(key.fileobj)
                    else:
                        ready.append(writer)
            fd_events = None

        if scheduled:  # no clock read in a turn without timers
            end_time = self.time() + self._clock_resolution
            while scheduled:
                handle = scheduled[0]
                if handle._when >= end_time:
                    break
                handle = heapq.heappop(scheduled)
                handle._scheduled = False
                ready.append(handle)

        if state._dart_unwinding:
            self._dart_drop_unwound(ready)
        microtasks = self._microtasks
        oob = state._dart_oob
        if self._debug:
            for _ in range(len(ready)):
                handle = ready.popleft()
                if not handle._cancelled:
                    self._run_handle_debug(handle)
                    if oob:
                        self._isolate.serve_control()  # type: ignore[union-attr]
            handle = None  # break cycles, as asyncio does
            return
        # ready.popleft() each time, not a bound popleft: most turns run one
        # or two handles, and binding it costs an allocation per turn.
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            try:
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report_callback_error(exc, handle._callback, handle._args, handle)
            if microtasks:
                self._run_pending_immediate_callback()
            if oob:
                self._isolate.serve_control()  # type: ignore[union-attr]
        handle = None

    def _dart_drop_unwound(self, ready: collections.deque[asyncio.Handle]) -> None:
        # Not inline in _run_once: the comprehension's closure would make
        # _run_once allocate a cell on every call (3.11).
        keep = self._dart_keep_while_unwinding
        kept = [h for h in ready if not h._cancelled and keep(h._callback, h._args)]
        ready.clear()
        ready.extend(kept)

    def _run_handle_debug(self, handle: asyncio.Handle) -> None:
        # Debug mode: the same dispatch, timed, with asyncio's slow-callback
        # warning; the drain is timed on its own.
        self._current_handle = handle
        try:
            t0 = self.time()
            try:
                handle._context.run(handle._callback, *handle._args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report_callback_error(exc, handle._callback, handle._args, handle)
            dt = self.time() - t0
            if dt >= self.slow_callback_duration:
                logger.warning("Executing %s took %.3f seconds", base_events._format_handle(handle), dt)  # type: ignore[attr-defined]
        finally:
            self._current_handle = None
        if self._microtasks:
            t0 = self.time()
            self._run_pending_immediate_callback()
            dt = self.time() - t0
            if dt >= self.slow_callback_duration:
                logger.warning("Microtasks after %s took %.3f seconds", base_events._format_handle(handle), dt)  # type: ignore[attr-defined]
        handle = None  # type: ignore[assignment]  # break cycles, as asyncio does


class _AsyncioLoopState:
    """dartloop's per-loop fields of the ``"asyncio"`` backend, out of its dict.

    Only the loop's own code touches it: on the loop's thread, except
    ``_wakeup_pending``, which ``call_soon_threadsafe`` sets from any thread
    (a flag, as it was on the loop). See ``_AsyncioDartLoop._DIRECT_FIELDS``
    for why it exists.
    """

    __slots__ = (
        "strict",
        "_mt_append",
        "_dart_timers",
        "_dart_thread_id",
        "_keepalive",
        "_executor_jobs",
        "_dart_used_executor",
        "_dart_used_asyncgens",
        "_dart_oob",
        "_dart_unwinding",
        "_dart_watch_idle",
        "_wakeup_pending",
        "_dart_transports",
        "_dart_epoll",
        "_dart_tasks",
    )


def _forward_to_state(name: str) -> property:
    # attrgetter keeps the read in C; a read is as fast as a slot's.
    def fset(self: Any, value: Any) -> None:
        setattr(self._dart_state, name, value)

    return property(operator.attrgetter(f"_dart_state.{name}"), fset, doc=f"kept in ``_dart_state.{name}``")


for _name in _AsyncioLoopState.__slots__:
    setattr(_AsyncioDartLoop, _name, _forward_to_state(_name))
del _name


class _StrictMixin:
    """``strict=True``: asyncio future callbacks run as microtasks.

    A future schedules its done callbacks with ``loop.call_soon(cb, future,
    context=ctx)`` (both the C and the Python ``Future``), and only then, so a
    ``call_soon`` whose sole argument is a done future is a future callback.
    Task steps (``call_soon(step)``, no argument) stay events, so
    ``create_task`` still starts the task in a later event.
    """

    def call_soon(self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None) -> Any:
        if len(args) == 1 and isinstance(args[0], _Future) and args[0].done():
            if self.is_closed():  # type: ignore[attr-defined]
                raise RuntimeError("Event loop is closed")
            was_empty = not self._microtasks  # type: ignore[attr-defined]
            if context is None:
                self._mt_append((callback, args))  # type: ignore[attr-defined]
            else:
                self._mt_append((context.run, (callback, *args)))  # type: ignore[attr-defined]
            if was_empty and self.backend == "uvloop":  # type: ignore[attr-defined]
                # uvloop completes some futures (DNS, sock_*) from its own C
                # callbacks, outside any dartloop event, and no drain would
                # follow: make sure one does.
                self._dart_schedule_drain()  # type: ignore[attr-defined]
            return _MicrotaskHandle(callback, args, self, context)
        return super().call_soon(callback, *args, context=context)  # type: ignore[misc]


class _SpawnedMixin:
    """A spawned isolate's loop: it remembers the tasks it makes.

    An ending isolate cancels its leftover tasks. ``asyncio.all_tasks(loop)``
    would find them by walking every task of the process, on every loop, so
    each ``Isolate.run`` would cost time in proportion to the tasks that the
    spawner and the other isolates hold (3 ms with 10,000 tasks waiting
    elsewhere). The loop's own weak set holds just its tasks: every task
    made through ``create_task``, which is what ``asyncio.create_task``,
    ``ensure_future``, ``gather``, ``TaskGroup`` and ``run_until_complete``
    call. (A ``Task`` constructed directly, which asyncio's documentation
    discourages, is not in it.)

    Only spawned isolates' loops get this class (``_loop_class(...,
    spawned=True)``), so no other loop pays for the extra call in
    ``create_task``.
    """

    _dart_tasks: weakref.WeakSet[asyncio.Task[Any]]

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__(strict=strict)  # type: ignore[call-arg]
        self._dart_tasks = weakref.WeakSet()

    def create_task(self, coro: Any, *args: Any, **kwargs: Any) -> Any:
        task = super().create_task(coro, *args, **kwargs)  # type: ignore[misc]
        self._dart_tasks.add(task)
        return task

    def _dart_leftover_tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks this loop made that are not done yet."""
        return [t for t in self._dart_tasks if not t.done()]


class _MicrotaskHandle(asyncio.Handle):
    """What ``call_soon`` returns for a callback queued as a microtask.

    Futures ignore the handle; ``cancel()`` is accepted but the microtask,
    already queued, still runs (microtasks can't be withdrawn, as in Dart).
    """

    __slots__ = ()


class _DebugEvent:
    """Debug mode, uvloop backend: the event wrapper of one callback.

    uvloop names a handle after the callable it was given (reprs, "Executing
    <Handle ...> took 0.2 seconds"): outside debug mode that is dartloop's
    shared event runner. In debug mode each callback gets one of these,
    which calls ``run(*args)`` and answers ``__qualname__``, ``__name__``
    and ``__self__`` (a task's wake-up shows as the task) with the user's
    callback's.
    """

    __slots__ = ("_run", "_callback", "_args")

    def __init__(self, run: Callable[..., object], callback: object, args: tuple[Any, ...]) -> None:
        self._run = run
        self._callback = callback
        self._args = args

    def __call__(self) -> None:
        self._run(*self._args)
        self = None  # type: ignore[assignment]  # break cycles, as asyncio does

    def __getattr__(self, name: str) -> Any:
        if name in ("__qualname__", "__name__", "__self__"):
            return getattr(self._callback, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return repr(self._callback)


def _posix_spawn_options(kwargs: dict[str, Any]) -> None:
    """uvloop lacks ``subprocess``'s ``process_group``, ``extra_groups``,
    ``group``, ``user`` and ``umask``: apply them in a ``preexec_fn`` instead,
    in the order ``subprocess`` applies them, before the caller's own."""
    process_group = kwargs.pop("process_group", None)
    extra_groups = kwargs.pop("extra_groups", None)
    group = kwargs.pop("group", None)
    user = kwargs.pop("user", None)
    umask = kwargs.pop("umask", -1)
    if process_group is None and extra_groups is None and group is None and user is None and umask < 0:
        return
    import grp
    import pwd

    def gid(g: Any) -> int:
        return grp.getgrnam(g).gr_gid if isinstance(g, str) else int(g)

    gids = None if extra_groups is None else [gid(g) for g in extra_groups]
    group_id = None if group is None else gid(group)
    user_id = None if user is None else (pwd.getpwnam(user).pw_uid if isinstance(user, str) else int(user))
    then = kwargs.pop("preexec_fn", None)

    def preexec() -> None:
        if process_group is not None:
            os.setpgid(0, process_group)
        if gids is not None:
            os.setgroups(gids)
        if group_id is not None:
            os.setregid(group_id, group_id)
        if user_id is not None:
            os.setreuid(user_id, user_id)
        if umask >= 0:
            os.umask(umask)
        if then is not None:
            then()

    kwargs["preexec_fn"] = preexec


def _closed_loop_runner(*args: Any) -> None:
    raise RuntimeError("Event loop is closed")


def _drop_own_frames(handle: Any, count: int) -> Any:
    # Debug mode: uvloop records the stack where a handle was made; drop
    # dartloop's own frames so that "created at" points at the caller.
    tb = handle._source_traceback
    if tb:
        del tb[-count:]
    return handle


if _uvloop is not None:

    def _is_uvloop_udp_abort_noise(context: dict[str, Any]) -> bool:
        exc = context.get("exception")
        transport = context.get("transport")
        if type(transport).__name__ != "UDPTransport" or not transport.is_closing():
            return False
        if isinstance(exc, asyncio.CancelledError):
            # "Fatal write error on datagram transport": the send was cancelled
            # by the transport's own close, not failed.
            return True
        return (
            isinstance(exc, AttributeError)
            and context.get("protocol") is None
            and context.get("message") == "protocol.resume_writing() failed"
        )

    class _UVDartLoop(DartEventLoop, _uvloop.Loop):  # type: ignore[misc]
        """The ``"uvloop"`` backend: libuv runs the callbacks, we drain after each.

        Every callback is registered as ``_run_event(ctx, callback, *args)`` in
        the loop's neutral context: the user's callback runs in its own
        context (as asyncio would run it), and the drain runs outside it, so
        a microtask may enter any task's context.
        """

        backend = "uvloop"

        def __init__(self, *, strict: bool = False) -> None:
            self._dart_setup(strict)
            self._neutral_ctx = contextvars.Context()
            self._dart_run_event = self._run_event
            self._dart_readers: dict[int, Any] = {}
            self._dart_writers: dict[int, Any] = {}
            self._dart_signals: set[int] = set()
            self._dart_transports: weakref.WeakSet[Any] = weakref.WeakSet()
            self._dart_servers: weakref.WeakSet[Any] = weakref.WeakSet()
            # Timer handles that may still fire; pruned when they fire or are
            # found cancelled. Kept only while _dart_watch_idle (a spawned
            # isolate's loop, set before it runs anything).
            self._dart_timer_handles: set[Any] = set()
            # Counts events run, for the idle probe (see _dart_probe).
            self._dart_events = 0
            self._dart_probe_pending = False
            # Set by a spawned isolate: check for quiet after every event.
            self._dart_watch_idle = False
            self._dart_drain_pending = False
            self._dart_debug = False
            super().__init__()
            self._dart_debug = bool(super().get_debug())

        def call_exception_handler(self, context: dict[str, Any]) -> None:
            """The handler, except for two reports uvloop makes of its own UDP
            transports that asyncio does not make: aborting one with a datagram
            still queued cancels the send, which uvloop reports as a fatal
            error, and then calls ``resume_writing`` of the protocol it has
            already dropped (MagicStack/uvloop#771)."""
            if _is_uvloop_udp_abort_noise(context):
                return
            super().call_exception_handler(context)

        def set_debug(self, enabled: bool) -> None:
            # uvloop keeps its flag in C; mirror it for the checks done here.
            super().set_debug(enabled)
            self._dart_debug = bool(enabled)

        def _run_event(self, ctx: contextvars.Context, callback: Callable[..., object], *args: Any) -> None:
            """One event: ``ctx.run(callback, *args)``, then the drain."""
            if self._dart_unwinding and not self._dart_keep_while_unwinding(callback, args):
                return
            self._dart_events += 1
            try:
                ctx.run(callback, *args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report_callback_error(exc, callback, args)
            # A traceback that outlives this frame must not keep the
            # finished callback and its arguments alive (asyncio: "Needed to
            # break cycles when an exception occurs").
            del ctx, callback, args
            if self._microtasks:
                self._run_pending_immediate_callback()
            if self._dart_oob:
                self._isolate.serve_control()  # type: ignore[union-attr]
            if self._dart_watch_idle:
                self._dart_check_idle()

        def _dart_release_refs(self) -> None:
            # The bound runner is a loop -> method -> loop cycle. A closed
            # uvloop refuses new callbacks before it looks at this one.
            if "_dart_run_event" in self.__dict__ and self.__dict__["_dart_run_event"] == self._run_event:
                self._dart_run_event = _closed_loop_runner

        def _dart_schedule_drain(self) -> None:
            # A drain as an event of its own (strict mode; see _StrictMixin).
            # Inside an event the event's own drain gets there first and this
            # one finds the queue empty.
            if not self._dart_drain_pending:
                self._dart_drain_pending = True
                _uvloop.Loop.call_soon(self, self._dart_drain_event, context=self._neutral_ctx)

        def _dart_drain_event(self) -> None:
            self._dart_drain_pending = False
            if self._microtasks:
                self._run_pending_immediate_callback()
            if self._dart_oob:
                self._isolate.serve_control()  # type: ignore[union-attr]

        def _run_timer_event(self, token: list[Any], ctx: contextvars.Context, callback: Callable[..., object], *args: Any) -> None:
            # The timer is due: its callback becomes an event at the back of
            # the ready queue, where asyncio puts a due timer and where Dart
            # posts its timer wake-up. libuv runs due timers before uvloop's
            # ready callbacks, which would let it overtake events queued
            # before it came due.
            if self._dart_debug:
                event = _DebugEvent(self._run_due_timer, callback, (token, ctx, callback, *args))
                _uvloop.Loop.call_soon(self, event, context=self._neutral_ctx)
            else:
                _uvloop.Loop.call_soon(self, self._run_due_timer, token, ctx, callback, *args, context=self._neutral_ctx)

        def _run_due_timer(self, token: list[Any], ctx: contextvars.Context, callback: Callable[..., object], *args: Any) -> None:
            handle = token[0]
            if self._dart_watch_idle:
                self._dart_timer_handles.discard(handle)
            if handle is not None and handle.cancelled():
                return  # cancelled after it came due, before its turn (as in asyncio)
            self._run_event(ctx, callback, *args)

        def call_soon(self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None) -> Any:
            if self._dart_debug:
                self._check_callback_dart(callback, "call_soon")
                ctx = context if context is not None else contextvars.copy_context()
                event = _DebugEvent(self._dart_run_event, callback, (ctx, callback, *args))
                return _drop_own_frames(super().call_soon(event, context=self._neutral_ctx), 1)
            return super().call_soon(
                self._dart_run_event,
                context if context is not None else contextvars.copy_context(),
                callback,
                *args,
                context=self._neutral_ctx,
            )

        def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None) -> Any:
            if self._dart_debug:
                self._check_callback_dart(callback, "call_soon_threadsafe")
                ctx = context if context is not None else contextvars.copy_context()
                event = _DebugEvent(self._dart_run_event, callback, (ctx, callback, *args))
                return _drop_own_frames(super().call_soon_threadsafe(event, context=self._neutral_ctx), 1)
            return super().call_soon_threadsafe(
                self._dart_run_event,
                context if context is not None else contextvars.copy_context(),
                callback,
                *args,
                context=self._neutral_ctx,
            )

        # uvloop's call_at() calls self.call_later(), so call_later is the one
        # place to wrap timer callbacks.
        def call_later(self, delay: float, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None) -> Any:
            if self._dart_debug:
                self._check_callback_dart(callback, "call_later")
            token: list[Any] = [None]
            if self._dart_debug:
                ctx = context if context is not None else contextvars.copy_context()
                event = _DebugEvent(self._run_timer_event, callback, (token, ctx, callback, *args))
                handle = _drop_own_frames(super().call_later(delay, event, context=self._neutral_ctx), 1)
            else:
                handle = super().call_later(
                    delay,
                    self._run_timer_event,
                    token,
                    context if context is not None else contextvars.copy_context(),
                    callback,
                    *args,
                    context=self._neutral_ctx,
                )
            token[0] = handle
            if self._dart_watch_idle:  # only a spawned isolate's liveness needs them
                self._dart_timer_handles.add(handle)
            return handle

        def call_at(self, when: float, callback: Callable[..., object], *args: Any, context: contextvars.Context | None = None) -> Any:
            """``call_later(when - self.time())``, as uvloop does, checked.

            uvloop reads the clock for the delay and libuv reads it again
            when it starts the timer; when a millisecond ticks between the
            two reads (it does under load), the timer lands a millisecond
            late, behind timers with later deadlines. So the timer is
            checked against the millisecond that first read asked for and
            re-armed with the difference when it landed elsewhere. (libuv's
            timers have whole milliseconds: handles due in the same one run
            in the order they were made.)
            """
            now = self.time()
            delay = when - now
            handle = self.call_later(delay, callback, *args, context=context)
            # A delay that rounds to 0 ms gives a ready Handle, without when();
            # a huge one is clamped by uvloop.
            if not 0 < delay < _MAXIMUM_CHECKED_DELAY:
                return handle
            want = round(now * 1000) + round(delay * 1000)
            for _ in range(3):
                when_of = getattr(handle, "when", None)
                off = 0 if when_of is None else want - round(when_of() * 1000)
                if not off:
                    break
                handle.cancel()
                delay += off / 1000
                handle = self.call_later(delay, callback, *args, context=context)
            return handle

        def _check_callback_dart(self, callback: object, method: str) -> None:
            if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
                raise TypeError(f"coroutines cannot be used with {method}()")
            if not callable(callback):
                raise TypeError(f"a callable object was expected by {method}(), got {callback!r}")

        def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
            super().add_reader(fd, self._dart_run_event, contextvars.copy_context(), callback, *args)
            self._dart_readers[_fileno(fd)] = fd

        def remove_reader(self, fd: Any) -> bool:
            self._dart_readers.pop(_fileno(fd), None)
            return bool(super().remove_reader(fd))

        def add_writer(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
            super().add_writer(fd, self._dart_run_event, contextvars.copy_context(), callback, *args)
            self._dart_writers[_fileno(fd)] = fd

        def remove_writer(self, fd: Any) -> bool:
            self._dart_writers.pop(_fileno(fd), None)
            return bool(super().remove_writer(fd))

        def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
            if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
                raise TypeError("coroutines cannot be used with add_signal_handler()")
            super().add_signal_handler(sig, self._dart_run_event, contextvars.copy_context(), callback, *args)
            self._dart_signals.add(sig)

        def remove_signal_handler(self, sig: int) -> bool:
            self._dart_signals.discard(sig)
            return bool(super().remove_signal_handler(sig))

        # Protocol-creating methods: wrap the protocol so that each of its
        # callbacks, called by uvloop's C code, is followed by a drain.

        def _wrap_factory(self, protocol_factory: Callable[[], Any]) -> Callable[[], Any]:
            from ._protocols import wrap_protocol

            def factory() -> Any:
                return wrap_protocol(self, protocol_factory())

            return factory

        async def create_connection(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            transport, proto = await super().create_connection(self._wrap_factory(protocol_factory), *args, **kwargs)
            return transport, _unwrap(proto)

        async def create_unix_connection(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            transport, proto = await super().create_unix_connection(self._wrap_factory(protocol_factory), *args, **kwargs)
            return transport, _unwrap(proto)

        async def connect_accepted_socket(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            transport, proto = await super().connect_accepted_socket(self._wrap_factory(protocol_factory), *args, **kwargs)
            return transport, _unwrap(proto)

        async def create_datagram_endpoint(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            transport, proto = await super().create_datagram_endpoint(self._wrap_factory(protocol_factory), *args, **kwargs)
            return transport, _unwrap(proto)

        async def connect_read_pipe(self, protocol_factory: Callable[[], Any], pipe: Any) -> Any:
            transport, proto = await super().connect_read_pipe(self._wrap_factory(protocol_factory), pipe)
            return transport, _unwrap(proto)

        async def connect_write_pipe(self, protocol_factory: Callable[[], Any], pipe: Any) -> Any:
            transport, proto = await super().connect_write_pipe(self._wrap_factory(protocol_factory), pipe)
            return transport, _unwrap(proto)

        async def subprocess_exec(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            _posix_spawn_options(kwargs)
            transport, proto = await super().subprocess_exec(self._wrap_factory(protocol_factory), *args, **kwargs)
            return transport, _unwrap(proto)

        async def subprocess_shell(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            _posix_spawn_options(kwargs)
            transport, proto = await super().subprocess_shell(self._wrap_factory(protocol_factory), *args, **kwargs)
            return transport, _unwrap(proto)

        async def create_server(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            server = await super().create_server(self._wrap_factory(protocol_factory), *args, **kwargs)
            self._dart_servers.add(server)
            return server

        async def create_unix_server(self, protocol_factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            server = await super().create_unix_server(self._wrap_factory(protocol_factory), *args, **kwargs)
            self._dart_servers.add(server)
            return server

        async def start_tls(self, transport: Any, protocol: Any, *args: Any, **kwargs: Any) -> Any:
            from ._protocols import wrap_protocol

            return await super().start_tls(transport, wrap_protocol(self, _unwrap(protocol)), *args, **kwargs)

        # Liveness, for spawned isolates. uvloop does not expose its handles,
        # so what can produce events is tracked here; the ready queue, which
        # can't be seen either, is covered by the probe.

        def _dart_sources_alive(self) -> bool:
            if self._dart_has_pending_work():
                return True
            readers = self._dart_readers
            # The native queue's reader does not count (see _dart_native_fd).
            if readers and (len(readers) > 1 or self._dart_native_fd() not in readers):
                return True
            if self._dart_writers or self._dart_signals:
                return True
            # Called after every event: stop at the first timer that can
            # still fire, dropping the cancelled ones met on the way, so that
            # each check costs O(1) amortized however many timers wait.
            handles = self._dart_timer_handles
            if handles:
                dead = []
                live = False
                for handle in handles:
                    if not handle.cancelled():
                        live = True
                        break
                    dead.append(handle)
                handles.difference_update(dead)
                if live:
                    return True
            # Iterating a WeakSet costs a guard object and a generator; this
            # runs in every probe, and most isolates have no transport.
            transports, servers = self._dart_transports, self._dart_servers
            if transports:
                for transport in transports:
                    if not transport.is_closing():
                        return True
            if servers:
                for server in servers:
                    if server.is_serving():
                        return True
            return self._dart_native_pending()

        def _dart_check_idle(self) -> None:
            """Called after events of a spawned isolate: probe when quiet."""
            if self._keepalive > 0 or self._dart_probe_pending:
                return  # the common case first: an open port keeps it alive
            if not self._dart_sources_alive():
                self._dart_probe_pending = True
                super().call_soon(self._dart_probe, self._dart_events, context=self._neutral_ctx)

        def _dart_probe(self, events_at_schedule: int) -> None:
            # The probe was queued behind every event that was ready then. If
            # no event ran since, nothing is ready now; with no source left,
            # no event can come any more.
            self._dart_probe_pending = False
            iso = self._isolate
            if iso is None or not iso.spawned:
                return
            if self._microtasks or self._dart_sources_alive():
                return
            if self._dart_events != events_at_schedule:
                self._dart_probe_pending = True
                super().call_soon(self._dart_probe, self._dart_events, context=self._neutral_ctx)
                return
            iso.idle()

else:  # pragma: no cover
    _UVDartLoop = None  # type: ignore[assignment,misc]


# -- the accelerated classes ------------------------------------------------
#
# Subclasses of the two backends that swap a few hot methods for their C
# versions in dartloop/_speedups.c; all behaviour is the pure classes'.
# new_event_loop() builds them while SPEEDUPS is set (_loop_class). The C
# code mirrors, and must be kept in step with (tests/test_speedups.py holds
# a hash of each Python source and fails when one changes):
#   DartEventLoop._run_pending_immediate_callback  -> LoopMethod("drain")
#   _UVDartLoop._run_event / _run_timer_event / _run_due_timer -> EventRunner / TimerEvent
#   DartEventLoop._dart_keep_while_unwinding       -> called by EventRunner
#   _UVDartLoop.call_soon / call_soon_threadsafe / call_later -> LoopMethod(...)
#   dartloop._isolate._dispatch_native            -> dispatch_native (isolates of
#                                                    these classes, _dart_accelerated)
#   dartloop._isolate._IsolateState._drain_inbox  -> drain_inbox (bound by the
#                                                    isolates of these classes)
#   dartloop._ports.SendPort.send (inlines post)  -> LoopMethod("send"), chosen at
#                                                    import for every SendPort
# A LoopMethod falls back to the Python method in debug mode.

_ACCELERATED: dict[type[DartEventLoop], type[DartEventLoop]] = {}

if SPEEDUPS is not None:

    class _AsyncioDartLoopC(_AsyncioDartLoop):
        """``_AsyncioDartLoop`` with the microtask drain in C."""

        __slots__ = ()
        _dart_accelerated = True
        _run_pending_immediate_callback = SPEEDUPS.LoopMethod("drain", DartEventLoop._run_pending_immediate_callback)

    _ACCELERATED[_AsyncioDartLoop] = _AsyncioDartLoopC

    if _UVDartLoop is not None:

        def _runner_field(name: str) -> Any:
            # A loop attribute that the C event runner reads on every event,
            # stored in the runner itself.
            def fget(self: Any) -> Any:
                return getattr(self._dart_runner, name)

            def fset(self: Any, value: Any) -> None:
                setattr(self._dart_runner, name, value)

            return property(fget, fset, doc=f"kept in the C event runner as ``{name}``")

        class _UVDartLoopC(_UVDartLoop):  # type: ignore[misc,valid-type]
            """``_UVDartLoop`` whose per-callback wrapper, scheduling and drain are in C.

            ``self._dart_run_event`` is a C ``EventRunner`` instead of the
            bound ``_run_event``; ``call_soon`` and ``call_soon_threadsafe``
            register it with uvloop directly, without a Python frame (with no
            ``context`` given, as ``runner(callback, *args)``: uvloop makes
            and enters the copy of the context itself, and the runner steps
            out of it into the neutral context for what follows the
            callback, where the pure ``_run_event`` never entered it), and
            ``call_later`` registers a C ``TimerEvent`` (``_run_timer_event``
            bound to the timer's handle). Timers that libuv finds due one
            after the other are queued as one C ``TimerBatch`` instead of one
            ready callback each, in the same order (see ``TimerEvent`` in
            ``_speedups.c``).
            """

            def __init__(self, *, strict: bool = False) -> None:
                # First, so that the properties below can store into it while
                # _UVDartLoop.__init__ sets those attributes.
                self._dart_runner = runner = SPEEDUPS.EventRunner(self)
                super().__init__(strict=strict)
                runner.bind()
                self._dart_run_event = runner

            def _dart_release_refs(self) -> None:
                # Like the pure class's: a closed loop must not be kept alive
                # by its runner (a closed uvloop refuses new callbacks first).
                super()._dart_release_refs()
                self._dart_run_event = _closed_loop_runner
                self._dart_runner.release()

            # Due timers join the timer batch queued last (see TimerEvent in
            # _speedups.c) only while nothing else can have been queued
            # behind it: a new run, or a timer that comes due through the
            # Python path (debug mode), closes it.
            def run_forever(self) -> None:
                self._dart_runner.close_batch()
                super().run_forever()

            def _run_timer_event(self, *args: Any) -> None:
                self._dart_runner.close_batch()
                super()._run_timer_event(*args)

            _dart_accelerated = True
            _dart_events = _runner_field("events")
            _dart_debug = _runner_field("debug")
            _dart_oob = _runner_field("oob")
            _dart_watch_idle = _runner_field("watch_idle")
            _dart_unwinding = _runner_field("unwinding")

            _run_pending_immediate_callback = SPEEDUPS.LoopMethod("drain", DartEventLoop._run_pending_immediate_callback)
            call_soon = SPEEDUPS.LoopMethod("call_soon", _UVDartLoop.call_soon, _uvloop.Loop.call_soon)
            call_soon_threadsafe = SPEEDUPS.LoopMethod(
                "call_soon_threadsafe", _UVDartLoop.call_soon_threadsafe, _uvloop.Loop.call_soon_threadsafe
            )
            call_later = SPEEDUPS.LoopMethod("call_later", _UVDartLoop.call_later, _uvloop.Loop.call_later)

        _ACCELERATED[_UVDartLoop] = _UVDartLoopC


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else int(fd.fileno())


def _unwrap(proto: Any) -> Any:
    return getattr(proto, "_dartloop_target", proto)


_CLASSES: dict[tuple[str, bool, bool, bool], type[DartEventLoop]] = {}


def _loop_class(backend: str, strict: bool, spawned: bool = False) -> type[DartEventLoop]:
    accelerated = SPEEDUPS is not None and bool(_ACCELERATED)  # read per call: tests flip SPEEDUPS
    key = (backend, strict, accelerated, spawned)
    cls = _CLASSES.get(key)
    if cls is None:
        if spawned:
            base = _loop_class(backend, strict)
            cls = type(base.__name__.replace("Loop", "SpawnedLoop"), (_SpawnedMixin, base), {"__module__": __name__})
        else:
            base = _AsyncioDartLoop if backend == "asyncio" else _UVDartLoop  # type: ignore[assignment]
            if accelerated:
                base = _ACCELERATED.get(base, base)
            if strict:
                cls = type(base.__name__.replace("Loop", "StrictLoop"), (_StrictMixin, base), {"__module__": __name__})
            else:
                cls = base
        _CLASSES[key] = cls
    return cls


def available_backends() -> tuple[str, ...]:
    """The backends this interpreter can run: ``("uvloop", "asyncio")`` or ``("asyncio",)``."""
    return ("uvloop", "asyncio") if _UVDartLoop is not None else ("asyncio",)


def default_backend() -> str:
    """``"uvloop"`` where uvloop is installed, else ``"asyncio"``."""
    return "uvloop" if _UVDartLoop is not None else "asyncio"


def new_event_loop(*, backend: str | None = None, strict: bool = False) -> DartEventLoop:
    """Create a new dartloop event loop.

    ``backend``: ``"uvloop"``, ``"asyncio"`` (the stdlib selector loop) or
    ``None`` for uvloop where it is installed, else asyncio. ``strict=True``
    runs asyncio future callbacks (every ``await`` resumption) as microtasks.

    Any thread may call it. Raises ``ValueError`` for an unknown backend and
    ``RuntimeError`` if uvloop was asked for but is not installed.
    """
    if backend is None:
        backend = default_backend()
    elif backend not in ("asyncio", "uvloop"):
        raise ValueError(f"unknown dartloop backend {backend!r}: expected 'uvloop', 'asyncio' or None")
    elif backend == "uvloop" and _UVDartLoop is None:
        raise RuntimeError("the 'uvloop' backend needs uvloop, which is not installed")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, not {type(strict).__name__}")
    return _loop_class(backend, strict)(strict=strict)


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("dartloop needs a POSIX platform (selector loop with Unix signals)")
