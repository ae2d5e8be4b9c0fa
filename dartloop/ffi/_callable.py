"""``NativeCallable``: C function pointers that call back into an isolate.

The Dart VM aborts the process when C calls a Dart callback from a thread
that is not the isolate's ("Cannot invoke native callback outside an
isolate"). dartloop gives the three answers Dart has, or goes further:

* ``listener``: from any thread, the call is queued as one event on the owner
  isolate (FIFO with its other events) and returns at once;
* ``isolate_local``: runs synchronously, but only on the owner isolate's
  thread; elsewhere the callback does not run, the C caller gets
  ``exceptional_return`` and a ``NativeCallbackError`` reaches the owner's
  uncaught-error path (instead of an abort);
* ``blocking`` (beyond Dart): the calling thread waits until the owner has
  run the callback (plain or ``async``) and gets its result.

Every callable owns a port of the owner isolate: its events travel through
it, and ``keep_isolate_alive`` is that port's flag. A function pointer stays
valid for the life of the process, also after ``close()`` (the ctypes thunk
is kept), so a late call from C is dropped safely instead of jumping into
freed memory.

Two implementations of ``listener``:

* native (the default when ``dartloop.ffi._nativequeue`` is built with
  libffi): the pointer is a libffi closure in C. A call reads its arguments
  and posts them as one message to the port's native queue, the one behind
  ``native_api()``, without Python, the GIL or a thread state; the isolate
  drains a burst of calls with one wakeup and calls ``callback(*args)`` for
  each. Used when every argument type is one of the plain ctypes types whose
  callback arguments ctypes turns into Python values (``c_bool``, the
  integer types of every width, ``c_float``, ``c_double``, ``c_longdouble``,
  ``c_char``, ``c_wchar``, ``c_char_p``, ``c_wchar_p``, ``c_void_p``) or a
  ``POINTER(...)`` or ``CFUNCTYPE(...)`` type, with at most 64 arguments.
  ``callback`` gets the same values as from a ctypes callback of the same
  ``functype``: ``int``, ``bool``, ``float``, ``bytes`` of length 1 for
  ``c_char``, ``str`` for ``c_wchar``/``c_wchar_p``, ``bytes`` for
  ``c_char_p`` (copied during the call), an ``int`` address for
  ``c_void_p``, ``None`` for a NULL ``c_char_p``/``c_wchar_p``/``c_void_p``,
  and a fresh instance of the pointer or function type, holding the address,
  for ``POINTER``/``CFUNCTYPE`` arguments (made on the isolate, not in the
  calling thread). A ``c_wchar``/``c_wchar_p`` beyond U+10FFFF drops the call,
  as ctypes does (ctypes also prints the error). Order: a C thread's calls
  stay in order with each other and with its ``native_api()`` posts to the
  same isolate (one queue), but not with events that come another way, e.g.
  its ``blocking`` calls or ``SendPort.send`` from Python threads.
* ctypes (the reference; any other argument type, e.g. structures by value,
  or when the extension or libffi is missing): a ``CFUNCTYPE`` thunk whose
  trampoline takes the GIL, in a thread state CPython makes for each call
  from a thread it never saw, and posts the argument tuple.

``_callable.listener_impl`` picks one: ``"auto"`` (default), ``"native"``
(``TypeError`` if the native closure can't be used) or ``"ctypes"``; its
initial value comes from the ``DARTLOOP_LISTENER`` environment variable.
``NativeCallable._impl`` says which one a callable got.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

from .._errors import NativeCallbackError, _IsolateUnwind
from .._isolate import _IsolateState
from .._microtasks import running_dart_loop
from .._ports import RawReceivePort
from . import _queue

if _queue.IMPLEMENTATION == "c":
    from . import _nativequeue

    _make_listener_closure: Callable[[int, str], tuple[int, int]] | None = getattr(
        _nativequeue, "make_listener_closure", None
    )
    _retire_listener_closure: Callable[[int], None] | None = getattr(_nativequeue, "retire_listener_closure", None)
    _NATIVE_CODES: str = getattr(_nativequeue, "LISTENER_TYPE_CODES", "")
else:
    _make_listener_closure = _retire_listener_closure = None
    _NATIVE_CODES = ""

#: How ``NativeCallable.listener`` is implemented: "auto", "native" or "ctypes"
#: (see the module docstring). Tests and benchmarks set it.
listener_impl: str = os.environ.get("DARTLOOP_LISTENER", "auto")

# ctypes' own simple types: a ctypes callback gets their arguments as Python
# values (subclasses of them arrive as instances, so they don't qualify).
_SIMPLE_TYPES = frozenset(
    getattr(ctypes, name)
    for name in (
        "c_bool", "c_byte", "c_ubyte", "c_short", "c_ushort", "c_int", "c_uint", "c_long", "c_ulong",
        "c_longlong", "c_ulonglong", "c_float", "c_double", "c_longdouble", "c_char", "c_wchar",
        "c_char_p", "c_wchar_p", "c_void_p",
    )
)  # fmt: skip
_MAX_NATIVE_ARGS = 64

__all__ = ["NativeCallable"]

_CFuncPtr = ctypes._CFuncPtr  # type: ignore[attr-defined]
_FUNCFLAG_PYTHONAPI = getattr(ctypes, "_FUNCFLAG_PYTHONAPI", 0x4)

# Thunks of closed callables: C may still hold their addresses.
_retired: list[Any] = []
_retired_lock = threading.Lock()

_OUTSIDE = "Cannot invoke native callback outside an isolate"


def _check_functype(functype: object, what: str) -> type:
    if not (isinstance(functype, type) and issubclass(functype, _CFuncPtr)):
        raise TypeError(
            f"{what}: functype must be a ctypes function type made with ctypes.CFUNCTYPE(...), "
            f"got {functype!r}"
        )
    if functype._flags_ & _FUNCFLAG_PYTHONAPI:  # type: ignore[attr-defined]
        raise TypeError(
            f"{what}: {functype.__name__} is a PYFUNCTYPE (it assumes the caller holds the GIL); "
            "use ctypes.CFUNCTYPE so that any thread can call it"
        )
    return functype


def _check_callback(callback: object, what: str) -> None:
    if not callable(callback):
        raise TypeError(f"{what}: callback must be callable, got {type(callback).__name__} {callback!r}")


def _exceptional(functype: type, value: object, what: str) -> object:
    """The value C gets when the callback can't give one, checked now."""
    restype = functype._restype_  # type: ignore[attr-defined]
    if restype is None:
        if value is not None:
            raise TypeError(f"{what}: exceptional_return must be None for a function returning void")
        return None
    if value is None:
        return restype().value  # the type's zero: 0, 0.0, NULL
    try:
        restype(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what}: exceptional_return {value!r} can't be converted to the return type {restype.__name__}"
        ) from exc
    return value


def _raise(exc: BaseException) -> None:
    raise exc


def _result_error(restype: Any, value: Any) -> TypeError | None:
    """The error ctypes would hit returning ``value`` as ``restype`` to C, or ``None``.

    Checked on the owner's side, so that a wrong result gives C the
    exceptional return and becomes an uncaught error of the owner, instead of
    ctypes printing it and returning garbage (or 0) to C.
    """
    if restype is None:
        return None
    try:
        restype(value)
    except (TypeError, ValueError) as exc:
        error = TypeError(f"the native callback returned {value!r}, which can't be converted to its return type {restype.__name__}")
        error.__cause__ = exc
        return error
    return None


class NativeCallable:
    """A C function pointer whose calls reach a Python callback on its owner isolate.

    Make one with :meth:`listener`, :meth:`isolate_local` or :meth:`blocking`
    on the thread of the isolate that should own it (a running dartloop
    loop; ``RuntimeError`` otherwise). ``functype`` is a ``ctypes.CFUNCTYPE``
    type. Hand ``.pointer`` (the ctypes function pointer) or ``.address``
    (an ``int``) to C.

    Thread: create and close on the owner isolate's thread; the pointer may
    be called from any thread, also threads Python never saw.
    """

    __dartloop_unsendable__ = True

    _kind: str
    _pointer: Any
    _port: RawReceivePort
    _isolate: _IsolateState
    _functype: type
    _impl: str = "ctypes"
    # The native listener closure's handle (for retire_listener_closure).
    _native_handle: int | None = None

    def __init__(self) -> None:
        raise TypeError("use NativeCallable.listener(), .isolate_local() or .blocking()")

    @classmethod
    def _create(cls, kind: str, functype: type, port_handler: Callable[[Any], object], debug_name: str) -> NativeCallable:
        self = object.__new__(cls)
        loop = running_dart_loop(f"NativeCallable.{kind}()")
        assert loop._isolate is not None
        self._kind = kind
        self._functype = functype
        self._isolate = loop._isolate
        self._port = RawReceivePort(port_handler, debug_name=debug_name)
        self._pointer = None
        return self

    # -- constructors -----------------------------------------------------

    @classmethod
    def listener(cls, functype: type, callback: Callable[..., object]) -> NativeCallable:
        """A pointer that queues ``callback(*args)`` as an event on this isolate.

        Callable from any thread; the call returns at once, and the callback
        runs later on the owner isolate (never in the calling thread, also
        when called on the owner's own thread), followed by the microtask
        drain. Calls from one thread run in order. ``functype`` must return
        void (``None``); ``TypeError`` otherwise. After ``close()``, or once
        the isolate has ended, calls are dropped.

        Where the C extension was built with libffi and every argument type
        is supported, the pointer is a libffi closure that never takes the
        GIL (a C thread queues millions of calls a second; the isolate's
        dispatch, under a microsecond a call, is the limit); otherwise a
        ctypes callback. ``callback`` gets the same values either way; see
        the module docstring.
        """
        what = "NativeCallable.listener()"
        _check_functype(functype, what)
        _check_callback(callback, what)
        if functype._restype_ is not None:  # type: ignore[attr-defined]
            raise TypeError(
                f"{what}: a listener can't return a value to C (the call returns before the callback runs); "
                f"{functype.__name__} returns {functype._restype_.__name__}, use restype None"  # type: ignore[attr-defined]
            )

        impl = listener_impl
        if impl not in ("auto", "native", "ctypes"):
            raise ValueError(f"dartloop.ffi._callable.listener_impl must be 'auto', 'native' or 'ctypes', not {impl!r}")
        native = None if impl == "ctypes" else _native_signature(functype)
        if native is None and impl == "native":
            raise TypeError(f"{what}: no native listener for {functype.__name__} ({_native_unavailable(functype)})")
        if native is not None:
            return cls._native_listener(functype, callback, *native)

        def handler(args: tuple[Any, ...]) -> None:
            callback(*args)

        self = cls._create("listener", functype, handler, "NativeCallable.listener")
        core = self._port._core
        post = self._isolate.post

        # ctypes builds fresh, immutable-or-private argument objects for
        # every call, so they cross without the message copier.
        def trampoline(*args: Any) -> None:
            if not core.closed:
                post(core, args)

        self._pointer = functype(trampoline)
        return self

    @classmethod
    def _native_listener(
        cls, functype: type, callback: Callable[..., object], codes: str, converters: tuple[tuple[int, type], ...]
    ) -> NativeCallable:
        assert _make_listener_closure is not None
        handler: Callable[[tuple[Any, ...]], object]
        if converters:
            # POINTER / CFUNCTYPE arguments crossed as addresses: make the
            # instances a ctypes callback gets.
            def convert_and_call(args: tuple[Any, ...]) -> None:
                values = list(args)
                for i, ptype in converters:
                    values[i] = _to_pointer(values[i], ptype)
                callback(*values)

            handler = convert_and_call
        else:
            # handler(args) is callback(*args), in C: no Python frame per call.
            handler = _nativequeue.StarCall(callback)

        self = cls._create("listener", functype, handler, "NativeCallable.listener")
        core = self._port._core
        # The calls arrive through the isolate's native queue, as posts to
        # SendPort.native_port do.
        self._isolate.bind_native(core)
        if not core.native_bound:  # pragma: no cover - the isolate is ending
            self._port.close()
            raise RuntimeError("NativeCallable.listener(): the isolate is shutting down")
        try:
            address, handle = _make_listener_closure(core.id, codes)
        except BaseException:
            self._port.close()
            raise
        self._native_handle = handle
        self._impl = "native"
        # A foreign function object at the closure's address: callable from
        # Python too, and what ctypes APIs taking a functype expect.
        self._pointer = functype(address)
        return self

    @classmethod
    def isolate_local(cls, functype: type, callback: Callable[..., Any], *, exceptional_return: Any = None) -> NativeCallable:
        """A pointer that runs ``callback(*args)`` synchronously on the owner's thread.

        Called on the owner isolate's thread, the callback runs at once
        (nested in whatever Python code called into C; no turn, no drain)
        and its result goes back to C. Called from any other thread, the
        callback does not run, C gets ``exceptional_return``, and a
        ``NativeCallbackError("Cannot invoke native callback outside an
        isolate")`` reaches the owner isolate's uncaught-error path. If the
        callback raises, C gets ``exceptional_return`` and the exception is
        an uncaught error of the owner isolate, raised in its next event.
        ``exceptional_return`` ``None`` means the return type's zero.
        """
        what = "NativeCallable.isolate_local()"
        _check_functype(functype, what)
        _check_callback(callback, what)
        fallback = _exceptional(functype, exceptional_return, what)
        self = cls._create("isolate_local", functype, _raise, "NativeCallable.isolate_local")
        core = self._port._core
        iso = self._isolate
        owner = iso.thread_id
        post = iso.post
        restype = functype._restype_  # type: ignore[attr-defined]

        def trampoline(*args: Any) -> Any:
            if core.closed:
                return fallback
            if threading.get_ident() != owner:
                post(core, NativeCallbackError(_OUTSIDE))
                return fallback
            try:
                result = callback(*args)
            except BaseException as exc:
                # The exception can't cross the C frames: report it from
                # the owner's next event instead.
                post(core, exc)
                return fallback
            if restype is not None:
                error = _result_error(restype, result)
                if error is not None:
                    post(core, error)
                    return fallback
            return result

        self._pointer = functype(trampoline)
        return self

    @classmethod
    def blocking(
        cls,
        functype: type,
        callback: Callable[..., Any],
        *,
        exceptional_return: Any = None,
        timeout: float | None = None,
    ) -> NativeCallable:
        """A pointer whose caller waits for ``callback(*args)`` to run on the owner.

        From another thread, the call is queued as an event on the owner
        isolate and the calling thread blocks (without the GIL) until the
        callback, plain or ``async``, has finished; C gets its result. On the
        owner's own thread it runs inline (an ``async`` callback must then
        finish without suspending). C gets ``exceptional_return`` instead
        after ``timeout`` seconds, if the callback raises (also reported as
        an uncaught error), or if the owner is paused, killed or gone, now
        or while the caller waits: no thread is left waiting forever on a
        dead or paused isolate.
        """
        what = "NativeCallable.blocking()"
        _check_functype(functype, what)
        _check_callback(callback, what)
        fallback = _exceptional(functype, exceptional_return, what)
        if timeout is not None:
            from .._timers import check_duration

            timeout = check_duration(timeout, what)
            if timeout < 0:
                raise ValueError(f"{what}: timeout must not be negative, got {timeout!r}")

        self = cls._create("blocking", functype, _run_blocking_call, "NativeCallable.blocking")
        core = self._port._core
        iso = self._isolate
        owner = iso.thread_id
        post = iso.post
        is_async = inspect.iscoroutinefunction(callback)
        restype = functype._restype_  # type: ignore[attr-defined]

        def trampoline(*args: Any) -> Any:
            if core.closed or iso.dead:
                return fallback
            if threading.get_ident() == owner:
                return _run_inline(callback, args, fallback, post, core, restype)
            call = _BlockingCall(callback, args, is_async, fallback, restype)
            with iso.lock:
                # Both under the lock: a pause served after this point finds
                # the call in blocking_calls and wakes it (the pause adds its
                # capability before it sweeps the set under this lock).
                if iso.dead or iso.resume_caps:
                    return fallback  # gone, or paused: it would not run until resumed
                iso.blocking_calls.add(call)
            post(core, call)
            call.done.wait(timeout)
            with iso.lock:
                iso.blocking_calls.discard(call)
                call.abandoned = True
            return call.result if call.finished else fallback

        self._pointer = functype(trampoline)
        return self

    # -- the handle -------------------------------------------------------

    @property
    def pointer(self) -> Any:
        """The ctypes function pointer. ``RuntimeError`` once closed."""
        if self._port.is_closed:
            raise RuntimeError(f"NativeCallable.{self._kind} is already closed")
        return self._pointer

    @property
    def address(self) -> int:
        """The function pointer's address as an ``int``. ``RuntimeError`` once closed."""
        return ctypes.cast(self.pointer, ctypes.c_void_p).value or 0

    @property
    def keep_isolate_alive(self) -> bool:
        """Whether this open callable keeps its isolate alive (default ``True``)."""
        return self._port.keep_isolate_alive

    @keep_isolate_alive.setter
    def keep_isolate_alive(self, flag: bool) -> None:
        # Ignored once closed, as in Dart.
        self._port.keep_isolate_alive = flag

    @property
    def is_closed(self) -> bool:
        return self._port.is_closed

    def close(self) -> None:
        """Stop delivering calls; later calls from C are dropped safely. Idempotent.

        Safe to call inside the callback. The function pointer stays valid.
        """
        if self._port.is_closed:
            return
        self._port.close()
        if self._native_handle is not None and _retire_listener_closure is not None:
            # The port is unbound already; this also makes later calls
            # return before taking any lock.
            _retire_listener_closure(self._native_handle)
        with _retired_lock:
            _retired.append(self._pointer)

    def __del__(self) -> None:
        # Dropped without close() (also: its isolate ended, which closed the
        # port but not the callable): C may still hold the address, so keep
        # the thunk for the life of the process, as close() does. A closed
        # callable's thunk was retired by close(). No lock: __del__ may run
        # at any allocation, also inside close() on this thread; a list
        # append is atomic.
        pointer = self.__dict__.get("_pointer")
        port = self.__dict__.get("_port")
        if pointer is not None and (port is None or not port.is_closed or self._isolate.dead):
            _retired.append(pointer)

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<dartloop.ffi.NativeCallable.{self._kind} {self._functype.__name__} {state}>"


def _native_signature(functype: type) -> tuple[str, tuple[tuple[int, type], ...]] | None:
    """``(type codes, converters)`` for a native listener closure, or ``None``."""
    if _make_listener_closure is None:
        return None
    argtypes = functype._argtypes_ or ()  # type: ignore[attr-defined]
    if len(argtypes) > _MAX_NATIVE_ARGS:
        return None
    codes: list[str] = []
    converters: list[tuple[int, type]] = []
    for i, t in enumerate(argtypes):
        if t in _SIMPLE_TYPES:
            code = t._type_
            if code not in _NATIVE_CODES:
                return None
        elif isinstance(t, type) and (issubclass(t, ctypes._Pointer) or issubclass(t, _CFuncPtr)):
            code = "P"
            converters.append((i, t))
        else:
            return None
        codes.append(code)
    return "".join(codes), tuple(converters)


def _native_unavailable(functype: type) -> str:
    """Why :func:`_native_signature` said no, for the error message."""
    if _queue.IMPLEMENTATION != "c":
        return "the C extension dartloop.ffi._nativequeue is not in use"
    if _make_listener_closure is None:
        return "dartloop.ffi._nativequeue was built without libffi"
    argtypes = functype._argtypes_ or ()  # type: ignore[attr-defined]
    if len(argtypes) > _MAX_NATIVE_ARGS:
        return f"more than {_MAX_NATIVE_ARGS} arguments"
    return "an argument type is not supported natively: " + ", ".join(
        getattr(t, "__name__", repr(t)) for t in argtypes
    )


def _to_pointer(address: int | None, ptype: type) -> Any:
    """An instance of a POINTER or CFUNCTYPE type holding ``address``."""
    if issubclass(ptype, _CFuncPtr):
        return ptype(address) if address else ptype()
    return ctypes.cast(address, ptype)


class _BlockingCall:
    """One waiting C call: the arguments in, the result out."""

    __slots__ = ("callback", "args", "is_async", "restype", "result", "finished", "abandoned", "done")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...], is_async: bool, fallback: Any, restype: Any) -> None:
        self.callback = callback
        self.args = args
        self.is_async = is_async
        self.restype = restype
        self.result = fallback
        self.finished = False
        self.abandoned = False
        self.done = threading.Event()

    def finish(self, value: Any) -> None:
        self.result = value
        self.finished = True
        self.done.set()

    def fail(self) -> None:
        """Wake the caller with the exceptional return (isolate paused or gone)."""
        self.abandoned = True
        self.done.set()


def _run_blocking_call(call: _BlockingCall | BaseException) -> None:
    # The port handler on the owner isolate: one event per C call.
    if isinstance(call, BaseException):
        raise call  # the error of an inline call (see _run_inline), reported now
    if call.abandoned:
        return
    try:
        result = call.callback(*call.args)
    except BaseException:
        call.done.set()
        raise
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)

        def finished(t: asyncio.Future[Any]) -> None:
            if t.cancelled():
                call.done.set()
            elif t.exception() is not None:
                call.done.set()
                exc = t.exception()
                assert exc is not None
                if not isinstance(exc, _IsolateUnwind):
                    t.get_loop()._report_uncaught(exc, {"message": "Exception in blocking native callback", "exception": exc})  # type: ignore[attr-defined]
            elif not call.abandoned:
                error = _result_error(call.restype, t.result())
                if error is None:
                    call.finish(t.result())
                else:
                    call.done.set()
                    t.get_loop()._report_uncaught(error, {"message": "Exception in blocking native callback", "exception": error})  # type: ignore[attr-defined]

        task.add_done_callback(finished)
    elif not call.abandoned:
        error = _result_error(call.restype, result)
        if error is not None:
            call.done.set()
            raise error
        call.finish(result)


def _run_inline(
    callback: Callable[..., Any], args: tuple[Any, ...], fallback: Any, post: Callable[..., None], core: Any, restype: Any
) -> Any:
    try:
        result = callback(*args)
        if inspect.iscoroutine(result):
            # No event loop turn can happen here (the loop's thread is inside
            # C), so the coroutine must finish without suspending.
            try:
                result.send(None)
            except StopIteration as stop:
                result = stop.value
            else:
                result.close()
                raise NativeCallbackError(
                    "an async blocking callback called on its own isolate's thread must finish without suspending"
                )
        error = _result_error(restype, result)
        if error is not None:
            raise error
        return result
    except BaseException as exc:
        post(core, exc)
        return fallback
