"""Pure-Python fallback for :mod:`dartloop.ffi._nativequeue`.

Same interface as the C extension; used when the extension was not built or
when ``DARTLOOP_NO_EXTENSIONS=1`` is set (see :mod:`dartloop.ffi._queue`).

The C posting API is provided by ctypes callbacks (``CFUNCTYPE``): a C thread
calling one of them enters Python and takes the GIL for the duration of the
call.  That is correct from any thread, but roughly two orders of magnitude
slower than the native queue, whose post path never touches the GIL.

The locking and wakeup protocol is the native one (see the comment at the top
of ``_nativequeue.c``): the queue lock guards the message deque, the
"wakeup pending" flag and the fd, and the flag is true exactly when one wakeup
is outstanding on the fd, so a burst of posts costs one ``write`` and a post
racing with :meth:`NativeQueue.drain` is either in that batch or writes a new
wakeup.
"""

from __future__ import annotations

import collections
import ctypes
import operator
import os
import sys
import threading
import weakref
from typing import Final

__all__ = [
    "API_VERSION",
    "HAVE_EVENTFD",
    "NativeQueue",
    "api_address",
    "api_struct_size",
    "bind_port",
    "unbind_port",
]

API_VERSION: Final = 1
HAVE_EVENTFD: Final = hasattr(os, "eventfd")

_INT64_MAX: Final = (1 << 63) - 1
_EVENTFD_ONE: Final = (1).to_bytes(8, sys.byteorder)  # eventfd takes a native uint64


class NativeQueue:
    """The queue of messages posted from C to one isolate's ports.

    One per isolate.  Owns a wakeup fd: ``os.eventfd(0, EFD_NONBLOCK |
    EFD_CLOEXEC)`` where available, else a non-blocking pipe whose read end is
    returned by :meth:`fileno`.
    """

    __slots__ = ("__weakref__", "_closed", "_items", "_lock", "_ndiscarded", "_pending_wakeup", "_rfd", "_wfd")

    def __init__(self) -> None:
        """Any thread.  Raises OSError if no fd can be created."""
        self._lock = threading.Lock()
        # Guarded by _lock: _items, _pending_wakeup, _closed, and the right to
        # write the fd (only while not closed).
        self._items: collections.deque[tuple[int, object]] = collections.deque()
        self._pending_wakeup = False
        self._closed = False
        self._ndiscarded = 0
        if HAVE_EVENTFD:
            self._rfd = self._wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self._rfd, self._wfd = os.pipe()  # non-inheritable by default (PEP 446)
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)

    def __repr__(self) -> str:
        with self._lock:
            if self._closed:
                return f"<{type(self).__name__} closed>"
            return f"<{type(self).__name__} fd={self._rfd} pending={len(self._items)}>"

    def fileno(self) -> int:
        """Any thread.  The fd for the owning loop's ``add_reader``; -1 once closed."""
        return self._rfd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    @property
    def _discarded(self) -> int:
        """Messages freed by :meth:`close` without being drained (for tests)."""
        return self._ndiscarded

    def pending(self) -> int:
        """Any thread.  Number of queued messages (0 once closed)."""
        with self._lock:
            return len(self._items)

    def drain(self, limit: int | None = None) -> list[tuple[int, object]]:
        """Owning isolate thread.  Consume the wakeup and return every queued message.

        Returns ``(port, value)`` pairs in FIFO order across all ports of this
        queue, or ``[]`` if none is queued or the queue is closed.  A post that
        races with this call is either in the returned batch or writes a new
        wakeup.  With a positive ``limit``, when more than ``limit`` messages
        are queued, returns the oldest ``limit`` and leaves the wakeup pending
        (the fd readable) for the rest.
        """
        if limit is not None:
            limit = operator.index(limit)
            if limit <= 0:
                raise ValueError("drain() limit must be positive (or None)")
        with self._lock:
            if limit is not None and len(self._items) > limit:
                popleft = self._items.popleft
                return [popleft() for _ in range(limit)]
            if self._pending_wakeup:
                self._consume_wakeup_locked()
                self._pending_wakeup = False
            items = self._items
            if not items:
                return []
            self._items = collections.deque()
        return list(items)

    def drain_flat(self, limit: int | None = None) -> list[object]:
        """Owning isolate thread.  :meth:`drain`, flattened.

        ``[port, value, port, value, ...]``: the same messages in the same
        order, without a tuple per message (what the isolate's dispatch loop
        reads, see ``dartloop._isolate._dispatch_native``).  Consecutive
        messages to one port share one int object for the port.
        """
        flat: list[object] = []
        append = flat.append
        last: object = None
        for port, value in self.drain(limit):
            # As the C queue: one int object for a run of one port's messages.
            if port == last:
                port = last
            last = port
            append(port)
            append(value)
        return flat

    def close(self) -> None:
        """Any thread; idempotent.  Unbind this queue's ports, drop pending messages, close the fd.

        Posts to its ports return false afterwards.
        """
        with self._lock:
            if self._closed:
                return
            # Marked first: a poster that still finds us in the table sees
            # this under the lock and neither appends nor writes the fd.
            self._closed = True
            self._ndiscarded += len(self._items)
            self._items = collections.deque()
            self._pending_wakeup = False
        with _table_lock:
            # Dead references too: during __del__ ours may already be cleared.
            for port in [p for p, r in _table.items() if (q := r()) is None or q is self]:
                del _table[port]
        os.close(self._rfd)
        if self._wfd != self._rfd:
            os.close(self._wfd)
        self._rfd = self._wfd = -1

    def __del__(self) -> None:
        # As the C type's dealloc: a queue dropped while bound closes itself
        # (the table holds only weak references).
        if getattr(self, "_closed", True) is False:
            try:
                self.close()
            except Exception:  # e.g. module globals already torn down at exit
                pass

    # -- called by the post callbacks -------------------------------------

    def _post(self, port: int, value: object) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._items.append((port, value))
            if not self._pending_wakeup:
                self._pending_wakeup = True
                self._signal_locked()
            return True

    def _signal_locked(self) -> None:
        try:
            if self._wfd == self._rfd:
                os.write(self._wfd, _EVENTFD_ONE)
            else:
                os.write(self._wfd, b"\x01")
        except OSError:
            # Cannot happen (one wakeup outstanding at most); keep the
            # invariant so that the next post retries.
            self._pending_wakeup = False

    def _consume_wakeup_locked(self) -> None:
        try:
            os.read(self._rfd, 8 if self._wfd == self._rfd else 64)
        except (BlockingIOError, InterruptedError):
            pass  # someone read the fd behind our back: nothing to consume


# -- the process-wide port table ----------------------------------------------

# port -> weak reference to its queue (weak, as the C table holds plain
# pointers: dropping the last reference to a queue closes it).  Lookups from
# the post callbacks are single dict.get calls, atomic under the GIL;
# _table_lock makes bind's check-then-insert and close's sweep atomic with
# respect to each other.  A poster that looked a queue up just before it was
# unbound or closed finds it closed under the queue lock, or posts before the
# close (and close then discards the message).
_table: dict[int, weakref.ref[NativeQueue]] = {}
_table_lock = threading.Lock()


def _check_port(port: object) -> int:
    if not isinstance(port, int):
        raise TypeError("port must be an int")
    if not -_INT64_MAX - 1 <= port <= _INT64_MAX:
        raise OverflowError("port does not fit in a signed 64-bit integer")
    return port


def bind_port(port: int, queue: NativeQueue) -> None:
    """Any thread.  Route posts to ``port`` (a positive int64) into ``queue``.

    Raises:
        ValueError: ``port`` is not positive, is already bound, or ``queue``
            is closed.
        OverflowError: ``port`` does not fit in an int64.
        TypeError: wrong argument types.
    """
    port = _check_port(port)
    if port <= 0:
        raise ValueError(f"port must be positive, not {port}")
    if not isinstance(queue, NativeQueue):
        raise TypeError(f"queue must be a NativeQueue, not {type(queue).__name__}")
    with _table_lock:
        # Same order as the native module: closed is checked with the table
        # locked, and close() marks closed before sweeping the table.
        if queue._closed:
            raise ValueError("cannot bind a port to a closed NativeQueue")
        ref = _table.get(port)
        if ref is not None and ref() is not None:
            raise ValueError(f"port {port} is already bound")
        _table[port] = weakref.ref(queue)


def unbind_port(port: int) -> bool:
    """Any thread.  True if ``port`` was bound; afterwards posts to it return false.

    Raises TypeError if ``port`` is not an int.
    """
    if not isinstance(port, int):
        raise TypeError("port must be an int")
    with _table_lock:
        ref = _table.pop(port, None)
    return ref is not None and ref() is not None


# -- the C posting API, as ctypes callbacks -------------------------------------

_POST_NULL = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64)
_POST_INT64 = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_int64)
_POST_DOUBLE = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_double)
_POST_STRING = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_char_p)
_POST_BYTES = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_void_p, ctypes.c_ssize_t)
_POST_INTPTR = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_ssize_t)


class _DartloopApi(ctypes.Structure):
    # Mirrors dartloop/include/dartloop_api.h (and _queue.DartloopApi; kept
    # separate so that this module imports nothing from the package).
    _fields_ = (
        ("version", ctypes.c_int32),
        ("post_null", _POST_NULL),
        ("post_int64", _POST_INT64),
        ("post_double", _POST_DOUBLE),
        ("post_string", _POST_STRING),
        ("post_bytes", _POST_BYTES),
        ("post_intptr", _POST_INTPTR),
    )


# Each callback runs on the posting C thread with the GIL held (ctypes takes
# it).  An exception must not escape into ctypes (it would print a traceback
# and return a zeroed bool), so anything unexpected is reported as false.


def _post(port: int, value: object) -> bool:
    ref = _table.get(port)
    queue = ref() if ref is not None else None
    return queue is not None and queue._post(port, value)


def _post_null(port: int) -> bool:
    try:
        return _post(port, None)
    except Exception:
        return False


def _post_int64(port: int, value: int) -> bool:
    try:
        return _post(port, value)
    except Exception:
        return False


def post_int64(port: int, value: int) -> bool:
    """Any thread.  ``DartloopApi.post_int64`` for Python callers: True iff queued."""
    return _post(port, value)


def _post_double(port: int, value: float) -> bool:
    try:
        return _post(port, value)
    except Exception:
        return False


def _post_string(port: int, utf8: bytes | None) -> bool:
    try:
        if utf8 is None:
            return False
        # The strict decoder rejects exactly what the C validator rejects:
        # overlong forms, surrogates, code points above U+10FFFF.
        return _post(port, utf8.decode("utf-8"))
    except Exception:  # UnicodeDecodeError among others
        return False


def _post_bytes(port: int, data: int | None, length: int) -> bool:
    try:
        if length == 0:
            return _post(port, b"")
        if length < 0 or data is None:
            return False
        return _post(port, ctypes.string_at(data, length))
    except Exception:
        return False


def _post_intptr(port: int, value: int) -> bool:
    try:
        return _post(port, value)
    except Exception:
        return False


# Kept alive for the life of the process: C code may hold the function
# pointers long after whoever asked for the address is gone.
_API = _DartloopApi(
    API_VERSION,
    _POST_NULL(_post_null),
    _POST_INT64(_post_int64),
    _POST_DOUBLE(_post_double),
    _POST_STRING(_post_string),
    _POST_BYTES(_post_bytes),
    _POST_INTPTR(_post_intptr),
)


def api_address() -> int:
    """Any thread.  Address of the process-wide ``DartloopApi`` (version 1).

    Its functions are ctypes callbacks that take the GIL on every call; they
    must not be called once the interpreter is finalizing.
    """
    return ctypes.addressof(_API)


def api_struct_size() -> int:
    """Any thread.  ``sizeof(DartloopApi)``."""
    return ctypes.sizeof(_DartloopApi)
