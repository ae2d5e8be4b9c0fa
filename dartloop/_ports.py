"""Ports: ``RawReceivePort``, ``ReceivePort``, ``SendPort``, ``Capability``.

A receive port belongs to the isolate (the running dartloop loop) of the
thread that opened it. Its ``SendPort`` may be used from any thread. How a
message crosses:

* sent from the owner isolate's own thread, it is an event queued with
  ``call_soon``, so it is FIFO with ``Timer.run`` and ``call_soon`` callbacks;
* sent from any other thread, it is appended to the owner's inbox, and one
  ``call_soon_threadsafe`` wakeup is scheduled per burst (see
  :meth:`dartloop._isolate._IsolateState.post`); once the owner has a native
  queue (a port's ``native_port`` was read, or a native listener exists), it
  goes through that queue instead, so one thread's messages from C and from
  Python reach a port in the order that thread sent them.

Either way the dispatch of one message is ``handler(message)`` followed by
``_run_pending_immediate_callback()``. Messages to a closed port, to a dead
isolate, or to a ``RawReceivePort`` whose handler is ``None`` are dropped
silently, as in Dart; nothing else is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import random
import threading
from _thread import get_ident as _get_ident
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ._loop import SPEEDUPS
from ._message import _ATOMIC, prepare_message
from ._microtasks import running_dart_loop

if TYPE_CHECKING:
    from ._isolate import _IsolateState

__all__ = ["Capability", "SendPort", "RawReceivePort", "ReceivePort"]

# Every open receive port by number, for native posts and for debugging.
# Numbers are random 62-bit integers, so a stale number held by C code is
# very unlikely to reach a newer port.
_registry: dict[int, _PortCore] = {}
_registry_lock = threading.Lock()


# Port numbers and capability ids: random, so that a stale number is very
# unlikely to name a newer port. A seeded (from os.urandom) Mersenne Twister,
# not secrets: ten times cheaper (one urandom syscall per id otherwise), and a
# Python capability can't be made unforgeable by its id anyway.
_randbits = random.Random().getrandbits


def _new_port_id() -> int:
    with _registry_lock:
        while True:
            pid = _randbits(62) | 1
            if pid not in _registry:
                return pid


class Capability:
    """An unforgeable token (Dart's ``Capability``); equal by identity of its id.

    Shared as it is when sent, so equality survives sending. Used as pause,
    resume and terminate tokens.
    """

    __slots__ = ("_id",)
    __dartloop_shareable__ = True

    def __init__(self) -> None:
        self._id = _randbits(53)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Capability) and other._id == self._id

    def __hash__(self) -> int:
        return hash(("dartloop.Capability", self._id))

    def __repr__(self) -> str:
        return f"<dartloop.Capability {self._id:#x}>"

    # Immutable tokens: copying one gives the same token.
    def __copy__(self) -> Capability:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Capability:
        return self


class _PortCore:
    """The receiving end's state, shared by the receive port and its send ports."""

    __slots__ = ("id", "isolate", "handler", "closed", "keepalive", "name", "control", "native_bound")

    def __init__(self, isolate: _IsolateState, handler: Callable[[Any], object] | None, name: str | None, *, control: bool = False) -> None:
        self.id = _new_port_id()
        self.isolate = isolate
        self.handler = handler
        self.closed = False
        self.keepalive = False
        self.name = name
        self.control = control
        self.native_bound = False
        with _registry_lock:
            _registry[self.id] = self
        isolate.cores.add(self)

    def set_keepalive(self, flag: bool) -> None:
        """Count or uncount this port in its isolate's liveness. Owner thread."""
        if self.closed:
            return
        if flag and not self.keepalive:
            self.keepalive = True
            self.isolate.loop._keepalive += 1
        elif not flag and self.keepalive:
            self.keepalive = False
            self.isolate.loop._keepalive -= 1

    def close(self) -> None:
        """Close: later and already queued messages are dropped. Idempotent."""
        if self.closed:
            return
        self.set_keepalive(False)
        self.closed = True
        self.handler = None
        with _registry_lock:
            _registry.pop(self.id, None)
        self.isolate.cores.discard(self)
        if self.native_bound:
            self.native_bound = False
            self.isolate.unbind_native(self.id)


class SendPort:
    """The sending end of a port (Dart's ``SendPort``).

    Hashable and equal by port. May be used from any thread, also one that
    is not an isolate (an executor thread, a thread started by C code).
    Shared as it is when sent in a message.
    """

    __slots__ = ("_core", "__weakref__")
    __dartloop_shareable__ = True

    def __init__(self) -> None:
        raise TypeError("SendPort has no public constructor: use RawReceivePort().send_port or ReceivePort().send_port")

    @classmethod
    def _of(cls, core: _PortCore) -> SendPort:
        self = object.__new__(cls)
        self._core = core
        return self

    def send(self, message: object) -> None:
        """Send ``message`` to the port; returns at once. Any thread.

        The message is checked and copied now, in the calling thread (see
        the contract's message rules): changing it afterwards does not
        change what arrives. Messages from one thread to one port arrive in
        the order they were sent.

        Raises ``TypeError`` naming the type and the path of an object that
        can't be sent; nothing is delivered then. Sending to a closed port or
        a dead isolate drops the message silently and never raises.

        This is the pure-Python reference, also reachable as
        ``SendPort._send_py``; with the accelerator ``SendPort.send`` is its
        C twin (``_speedups.LoopMethod("send")``, see the end of this module).
        """
        # The hot path of every message: _IsolateState.post inlined (keep
        # the two in step), and no call at all for a shared scalar message.
        if type(message) not in _ATOMIC:
            message = prepare_message(message)
        core = self._core
        if core.closed:  # also once its isolate is dead: it closes its ports
            return
        iso = core.isolate
        if _get_ident() == iso.thread_id:
            iso.loop.call_soon(iso._deliver, core, message)
            return
        if iso.relay_port and iso.relay(core, message):
            return
        # Two entries, not a (core, message) tuple: a queued tuple would be
        # one more object for the cyclic GC to track and traverse (~10% of
        # a message's cost under a flood). One extend() is one step under
        # the GIL, so another sender's pair can't land between the two.
        iso.inbox.extend((core, message))
        if not iso.inbox_scheduled:
            iso.inbox_scheduled = True
            try:
                iso.loop.call_soon_threadsafe(iso._drain_inbox)
            except (RuntimeError, AttributeError):  # closed, or None once closed
                pass  # the loop closed meanwhile: the isolate is gone, drop

    _send_py = send

    @property
    def native_port(self) -> int:
        """The port's number, for C code posting through ``dartloop.ffi.native_api()``.

        Reading it makes the port reachable from C (the owner isolate starts
        watching its native queue).
        """
        core = self._core
        if not core.native_bound and not core.closed and not core.control:
            core.isolate.bind_native(core)
        return core.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SendPort) and other._core.id == self._core.id

    def __hash__(self) -> int:
        return hash(("dartloop.SendPort", self._core.id))

    def __repr__(self) -> str:
        name = f" {self._core.name!r}" if self._core.name else ""
        return f"<dartloop.SendPort{name} {self._core.id:#x}>"

    def __reduce__(self) -> Any:
        raise TypeError("a SendPort can't be pickled; send it through a port instead")

    def __copy__(self) -> SendPort:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SendPort:
        return self


# The C twin of SendPort.send (same behaviour, no Python frame per message;
# tests/test_speedups.py keeps the two in step). Chosen once, at import, as
# schedule_microtask is: DARTLOOP_NO_EXTENSIONS=1 keeps the pure method.
if SPEEDUPS is not None:
    SendPort.send = SPEEDUPS.LoopMethod("send", SendPort._send_py)  # type: ignore[method-assign]


def _check_handler(handler: object, what: str) -> None:
    if handler is not None and not callable(handler):
        raise TypeError(f"{what}: handler must be callable or None, got {type(handler).__name__} {handler!r}")


class RawReceivePort:
    """A receive port with a plain handler (Dart's ``RawReceivePort``).

    Each message is one event: ``handler(message)``, then the microtask
    drain. With ``handler`` ``None`` messages are dropped. The handler can be
    replaced at any time, also from inside itself. An open port keeps its
    isolate alive while ``keep_isolate_alive`` is true (the default).

    Thread: open, close and set attributes on the owner isolate's thread;
    ``send_port`` may be handed to any thread. Raises ``RuntimeError``
    without a running dartloop loop in this thread.
    """

    __slots__ = ("_core", "_send_port", "__weakref__")
    __dartloop_unsendable__ = True

    def __init__(self, handler: Callable[[Any], object] | None = None, *, debug_name: str | None = None) -> None:
        _check_handler(handler, "RawReceivePort()")
        loop = running_dart_loop("RawReceivePort()")
        iso = loop._isolate
        assert iso is not None
        self._core = _PortCore(iso, handler, debug_name)
        self._core.set_keepalive(True)
        self._send_port = SendPort._of(self._core)

    @property
    def handler(self) -> Callable[[Any], object] | None:
        return self._core.handler

    @handler.setter
    def handler(self, handler: Callable[[Any], object] | None) -> None:
        _check_handler(handler, "RawReceivePort.handler")
        if not self._core.closed:
            self._core.handler = handler

    @property
    def send_port(self) -> SendPort:
        return self._send_port

    @property
    def keep_isolate_alive(self) -> bool:
        return self._core.keepalive

    @keep_isolate_alive.setter
    def keep_isolate_alive(self, flag: bool) -> None:
        self._core.set_keepalive(bool(flag))

    @property
    def is_closed(self) -> bool:
        return self._core.closed

    def close(self) -> None:
        """Close the port: queued and later messages are dropped. Idempotent."""
        self._core.close()

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else "open"
        name = f" {self._core.name!r}" if self._core.name else ""
        return f"<dartloop.RawReceivePort{name} {self._core.id:#x} {state}>"


class ReceivePort:
    """A single-subscription stream of messages (Dart's ``ReceivePort``).

    Messages are buffered until someone listens, with :meth:`listen`,
    ``async for`` or :meth:`first`; only one listener is allowed. A listener's
    ``on_data`` runs as the port's own event (``on_data(message)`` then the
    microtask drain); buffered messages are handed out one event each, in
    order. ``async for`` ends when the port is closed. The port keeps its
    isolate alive until closed.

    Thread: the owner isolate's thread; ``send_port`` may go to any thread.
    """

    __slots__ = ("_raw", "_buffer", "_on_data", "_on_done", "_listened", "_replaying", "_waiter", "_loop", "__weakref__")
    __dartloop_unsendable__ = True

    def __init__(self, *, debug_name: str | None = None) -> None:
        self._loop = running_dart_loop("ReceivePort()")
        self._raw = RawReceivePort(self._receive, debug_name=debug_name)
        self._buffer: collections.deque[Any] = collections.deque()
        self._on_data: Callable[[Any], object] | None = None
        self._on_done: Callable[[], object] | None = None
        self._listened = False
        self._replaying = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def send_port(self) -> SendPort:
        return self._raw.send_port

    @property
    def keep_isolate_alive(self) -> bool:
        return self._raw.keep_isolate_alive

    @keep_isolate_alive.setter
    def keep_isolate_alive(self, flag: bool) -> None:
        self._raw.keep_isolate_alive = flag

    @property
    def is_closed(self) -> bool:
        return self._raw.is_closed

    def _receive(self, message: Any) -> None:
        on_data = self._on_data
        if on_data is None or self._replaying:
            self._buffer.append(message)
            self._wake()
        else:
            on_data(message)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _claim(self, what: str) -> None:
        if self._listened:
            raise RuntimeError(f"{what}: the ReceivePort has already been listened to (it is single-subscription)")
        self._listened = True

    def listen(self, on_data: Callable[[Any], object], *, on_done: Callable[[], object] | None = None) -> None:
        """Hand every message to ``on_data``, each as its own event.

        ``on_done()`` runs once, when the port is closed. Raises
        ``RuntimeError`` if the port already has a listener.
        """
        if not callable(on_data):
            raise TypeError(f"ReceivePort.listen(): on_data must be callable, got {type(on_data).__name__}")
        self._claim("ReceivePort.listen()")
        self._on_data = on_data
        self._on_done = on_done
        if self._buffer:
            self._replaying = True
            self._loop.call_soon(self._replay_one)
        elif self._raw.is_closed:
            self._done()

    def _replay_one(self) -> None:
        # Messages that arrived before listen() go out one event each; new
        # ones queue behind them in the buffer meanwhile, to keep the order.
        if self._on_data is None:
            return
        if self._buffer:
            message = self._buffer.popleft()
            if self._buffer:
                self._loop.call_soon(self._replay_one)
            else:
                self._replaying = False
            self._on_data(message)
        else:
            self._replaying = False
        if not self._replaying and self._raw.is_closed:
            self._done()

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def close(self) -> None:
        """Close the port; ``async for`` ends and ``on_done`` runs. Idempotent."""
        if self._raw.is_closed:
            return
        self._raw.close()
        self._wake()
        if self._on_data is not None and not self._replaying:
            self._done()

    def __aiter__(self) -> AsyncIterator[Any]:
        self._claim("ReceivePort.__aiter__()")
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        buffer = self._buffer
        try:
            while True:
                if buffer:
                    yield buffer.popleft()
                    continue
                if self._raw.is_closed:
                    return
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            # Leaving the loop early cancels the subscription, which closes
            # the port (Dart: onCancel = close).
            self._raw.close()

    async def first(self) -> Any:
        """The first message; then the port is closed.

        Raises ``RuntimeError`` if the port already has a listener, or if
        it is closed before any message arrives (Dart's "No element").
        """
        self._claim("ReceivePort.first()")
        try:
            while not self._buffer:
                if self._raw.is_closed:
                    raise RuntimeError("ReceivePort.first(): the port was closed before any message arrived")
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            return self._buffer.popleft()
        finally:
            self._raw.close()

    def __repr__(self) -> str:
        return f"<dartloop.ReceivePort {self._raw._core.id:#x} {'closed' if self.is_closed else 'open'}>"
