"""What a message may hold, and how it crosses from one isolate to another.

``SendPort.send``, ``Isolate.spawn`` and ``Isolate.run`` pass their message through
:func:`prepare_message`, in the sender's thread; ``Isolate.exit`` passes its message
through :func:`check_message`. This is dartloop's version of Dart's
``SendPort.send`` rules (``object_graph_copy.cc``): immutable values are shared,
everything else is copied deeply, a few things are refused.

Shared as they are (the receiver gets the very same object):

- ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``range``,
  ``Ellipsis``, ``NotImplemented``;
- ``tuple`` and ``frozenset`` whose members are all shared, recursively; one holding
  something that is copied is rebuilt as a new ``tuple``/``frozenset`` of the copies.
  Named tuples (tuple subclasses with ``_fields`` and ``_make`` and no instance
  ``__dict__``) follow the same rule and are rebuilt with ``_make``;
- Python functions (their closure cells, defaults, globals and attributes are *not*
  copied: a closure over a mutable object shares that object, as threads do), code
  objects, classes (instances of ``type`` and of every metaclass), modules;
- builtin functions, method-wrappers and bound methods whose ``__self__`` (and
  ``__func__``) are shared, such as ``len`` or ``send_port.send``; one bound to a
  copied object is rebuilt on the copy (``obj.method`` arrives as
  ``copy_of_obj.method``, ``[].append`` as the copied list's ``append``), as
  ``copy.deepcopy`` does for bound methods;
- C-level descriptors and ``property`` objects;
- these deeply immutable standard-library values, by exact type only (a subclass
  may add mutable state, so it is copied): ``decimal.Decimal``,
  ``fractions.Fraction``, ``datetime.date``/``time``/``datetime``/``timedelta``/
  ``timezone`` (a ``tzinfo`` inside one travels with it), ``zoneinfo.ZoneInfo``,
  ``uuid.UUID``, ``ipaddress`` addresses, networks and interfaces, ``re.Pattern``,
  the ``pathlib`` path classes; and members of every ``enum.Enum`` (singletons);
- instances of a class that sets ``__dartloop_shareable__ = True`` (``SendPort`` and
  ``Capability`` do).

Transferred (the same object arrives, nothing is copied): :class:`TransferableTypedData`.

Copied deeply, keeping identity and cycles inside the message (an object reached
twice arrives as one copy reached twice; a list holding itself arrives as a copy
holding itself): ``list``, ``dict``, ``set``, ``bytearray``, and every other object
that can be copied:

- plain class instances (dataclasses included) get a new instance of the same
  class with a copy of ``__dict__``, without calling ``__init__``;
- an object defining ``__deepcopy__`` is copied by calling it with the copy's memo
  (as ``copy.deepcopy`` would); what it copies is not validated by dartloop;
- everything else through the reduce protocol (``copyreg.dispatch_table``, then
  ``__reduce_ex__(4)``), rebuilt as ``copy._reconstruct`` does but with dartloop's
  own copier, so that the arguments, state and items are validated too. This also
  covers subclasses of ``list``, ``dict``, ``set``, ``tuple``, ``str`` ... (the
  subclass and its instance attributes are kept), ``collections`` types, slotted
  classes and exceptions (their traceback, ``__cause__`` and ``__context__`` are
  dropped, as pickling drops them). An object whose reduce returns a string (a
  global's name) is shared.

Refused, with :exc:`TypeError`: locks, conditions, semaphores, events, barriers
and queues of :mod:`threading`, :mod:`asyncio` and :mod:`queue`; threads and
``threading.local``; asyncio futures and tasks (anything with
``_asyncio_future_blocking``), ``concurrent.futures`` futures and executors; event
loops, handles, transports, servers, streams, runners, timeouts and task groups;
sockets, selectors, ``mmap`` and every :class:`io.IOBase` (open files, but also
``io.BytesIO``/``io.StringIO``); generators, coroutines, async generators, frames and
tracebacks; ``memoryview`` (it aliases another object's memory: send ``bytes(view)``
or a :class:`TransferableTypedData` instead); weak references, weak proxies,
``weakref.finalize`` and the weak containers; instances of a class that sets
``__dartloop_unsendable__ = True`` (``ReceivePort``, ``RawReceivePort``, ``Isolate``
and ``Timer`` do); and any object whose copy fails (its reduce, ``__deepcopy__`` or
reconstruction raises; ctypes pointers, for one). The decisions above are made once
per class and cached.

The error says where the offending object is::

    message[2]['key'] is a _thread.lock: it can't be sent between isolates

``message`` is the whole message, then, from the outside in:

- ``[i]``: item ``i`` of a list or tuple (also of a list-like object rebuilt through
  reduce, such as a list subclass or a ``deque``);
- ``[key]``: the value under ``key`` in a dict, or a dict-like object rebuilt through
  reduce (``repr(key)``, cut to 60 characters with ``...``);
- ``list(...)[i]``: key ``i`` of a dict, or member ``i`` of a set or frozenset, in
  iteration order;
- ``.name``: an attribute (an instance ``__dict__`` or slot, a named tuple field, the
  ``__self__`` or ``__func__`` of a bound method); ``getattr(..., 'name')`` when the
  name is not an identifier;
- ``<arg i>``: argument ``i`` that ``__reduce_ex__`` asks to rebuild the object with;
- ``<state>``: the state ``__reduce_ex__`` returned, when it is not an attribute dict.

A path without ``<...>`` steps, whose keys' reprs evaluate back to the keys, is a
Python expression: evaluated with ``message`` bound to the message, it gives the
offending object. When the copy of an object failed, the original exception is the
``TypeError``'s ``__cause__``.

The copy recurses: a message nested deeper than about half of
:func:`sys.getrecursionlimit` may raise :exc:`RecursionError`, as ``copy.deepcopy``
does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copyreg
import enum
import io
import mmap
import queue
import selectors
import socket
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from operator import is_
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias, TypeVar, cast

if TYPE_CHECKING:
    if sys.version_info >= (3, 12):
        from collections.abc import Buffer
    else:
        from typing_extensions import Buffer

__all__ = ("TransferableTypedData", "check_message", "prepare_message")

_T = TypeVar("_T")


class TransferableTypedData:
    """Bytes that travel to another isolate without being copied (Dart's
    ``TransferableTypedData.fromList``).

    The constructor copies the bytes of all *buffers* (anything supporting the buffer
    protocol: ``bytes``, ``bytearray``, ``memoryview``, ``array.array``, ...),
    concatenated, into one private ``bytearray``. Sending the object, alone or inside a
    message, hands over this very object: the receiver gets it as is. Its bytes are
    reached with :meth:`materialize`, once, from whichever isolate or thread calls it
    first.

    Thread: any thread.

    Raises:
        TypeError: if one of *buffers* does not support the buffer protocol.
    """

    __slots__ = ("__weakref__", "_box", "_nbytes")

    def __init__(self, *buffers: Buffer) -> None:
        data = bytearray()
        for buffer in buffers:
            with memoryview(buffer) as view:
                # bytearray += view takes any C-contiguous buffer without an
                # intermediate copy; a strided view has to be flattened first.
                data += view if view.contiguous else view.tobytes()
        # The bytes live in a one-item list so that materialize() can take them
        # with list.pop(), which is atomic (under the GIL, and under the list's own
        # lock on free-threaded builds): two threads can't both get them.
        self._box: list[bytearray] = [data]
        self._nbytes = len(data)

    def materialize(self) -> memoryview:
        """Return a writable ``memoryview`` over the bytes; only the first call succeeds.

        Thread: any thread.

        Raises:
            ValueError: if the object has already been materialized, here or in
                another isolate.
        """
        try:
            data = self._box.pop()
        except IndexError:
            raise ValueError("TransferableTypedData has already been materialized") from None
        return memoryview(data)

    def __copy__(self) -> TransferableTypedData:
        # Copying would let the same bytes be materialized twice: a copy is a transfer.
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> TransferableTypedData:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("TransferableTypedData can't be pickled; send it through a port")

    def __repr__(self) -> str:
        state = "materialized" if not self._box else f"{self._nbytes} bytes"
        return f"<{type(self).__name__} {state}>"


_Memo: TypeAlias = dict[int, Any]
_Copier: TypeAlias = Callable[[Any, _Memo], Any]
_Seen: TypeAlias = dict[int, object]
_Checker: TypeAlias = Callable[[Any, _Seen], None]

#: Types whose every instance is shared without looking inside. Exact types only
#: (``type(x) in _ATOMIC``): this is the fast path for scalars and strings, and what
#: lets flat containers be copied with one C-level shallow copy plus one type check
#: per item. Every member is hashable, so it doubles as the test for dict keys and set
#: members that need no copy.
_ATOMIC: Final[frozenset[type]] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        type(Ellipsis),
        type(NotImplemented),
        types.FunctionType,
        types.CodeType,
        types.ModuleType,
        type,
        TransferableTypedData,
    }
)

_MISSING: Final = object()

# Steps of an error path, recorded innermost first while the error unwinds.
_ITEM: Final = 0  # [i]
_VALUE: Final = 1  # [key]
_POS: Final = 2  # list(...)[i]
_ATTR: Final = 3  # .name
_ARG: Final = 4  # <arg i>
_STATE: Final = 5  # <state>

_Step: TypeAlias = tuple[int, Any]


class _Unsendable(Exception):
    """Raised at the object that can't be sent; every container it unwinds through
    adds its step to :attr:`path`. Never escapes this module: the public functions
    turn it into the documented ``TypeError``."""

    def __init__(self, cls: type, cause: BaseException | None = None) -> None:
        super().__init__(cls)
        self.cls = cls
        self.cause = cause
        self.path: list[_Step] = []

    def type_error(self) -> TypeError:
        path = "message"
        for kind, data in reversed(self.path):
            if kind == _ITEM:
                path = f"{path}[{data}]"
            elif kind == _VALUE:
                path = f"{path}[{_short_repr(data)}]"
            elif kind == _POS:
                path = f"list({path})[{data}]"
            elif kind == _ATTR:
                path = f"{path}.{data}" if str.isidentifier(data) else f"getattr({path}, {data!r})"
            elif kind == _ARG:
                path = f"{path}<arg {data}>"
            else:
                path = f"{path}<state>"
        name = _type_name(self.cls)
        article = "an" if name[:1].lower() in ("a", "e", "i", "o", "u") else "a"
        return TypeError(f"{path} is {article} {name}: it can't be sent between isolates")


def _type_name(cls: type) -> str:
    qualname = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "?")
    module = getattr(cls, "__module__", None)
    if not isinstance(module, str) or module == "builtins":
        return str(qualname)
    return f"{module}.{qualname}"


def _short_repr(key: object) -> str:
    try:
        text = repr(key)
    except Exception:
        return f"<{_type_name(type(key))} object>"
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------
# Per-class decisions for the types without a dedicated copier.

_SHARE, _REFUSE, _PLAIN, _NAMEDTUPLE, _DEEPCOPY, _REDUCE = range(6)


def _classes(*candidates: object) -> tuple[type, ...]:
    return tuple(c for c in candidates if isinstance(c, type))


#: Refused by subclass check. ``getattr`` for names that not every supported Python
#: version has (``threading._PyRLock`` is private and may go away).
_REFUSED_TYPES: Final[tuple[type, ...]] = _classes(
    type(threading.Lock()),
    type(threading.RLock()),
    getattr(threading, "_PyRLock", None),
    threading.Condition,
    threading.Semaphore,
    threading.Event,
    threading.Barrier,
    threading.Thread,
    threading.local,
    asyncio.Lock,
    asyncio.Event,
    asyncio.Condition,
    asyncio.Semaphore,
    asyncio.Barrier,
    asyncio.Queue,
    asyncio.AbstractEventLoop,
    asyncio.Handle,
    asyncio.BaseTransport,
    asyncio.AbstractServer,
    asyncio.StreamReader,
    asyncio.StreamWriter,
    asyncio.Runner,
    asyncio.Timeout,
    asyncio.TaskGroup,
    concurrent.futures.Future,
    concurrent.futures.Executor,
    queue.Queue,
    queue.SimpleQueue,
    socket.SocketType,
    selectors.BaseSelector,
    mmap.mmap,
    io.IOBase,
    types.GeneratorType,
    types.CoroutineType,
    types.AsyncGeneratorType,
    types.FrameType,
    types.TracebackType,
    memoryview,
    weakref.ReferenceType,
    weakref.ProxyType,
    weakref.CallableProxyType,
    weakref.WeakKeyDictionary,
    weakref.WeakValueDictionary,
    weakref.WeakSet,
    weakref.finalize,
)

#: Shared by exact type.
_SHARED_TYPES: Final[frozenset[type]] = frozenset(
    _classes(
        property,
        types.WrapperDescriptorType,
        types.MethodDescriptorType,
        types.ClassMethodDescriptorType,
        types.GetSetDescriptorType,
        types.MemberDescriptorType,
    )
)

#: Shared by exact type, looked up by module so that none of them is imported here
#: (if the module isn't imported, no instance can be in a message).
_SHARED_BY_MODULE: Final[dict[str, tuple[str, ...]]] = {
    "decimal": ("Decimal",),
    "fractions": ("Fraction",),
    "datetime": ("date", "time", "datetime", "timedelta", "timezone"),
    "zoneinfo": ("ZoneInfo",),
    "uuid": ("UUID",),
    "ipaddress": (
        "IPv4Address",
        "IPv6Address",
        "IPv4Network",
        "IPv6Network",
        "IPv4Interface",
        "IPv6Interface",
    ),
    "re": ("Pattern",),
    "pathlib": (
        "PurePath",
        "PurePosixPath",
        "PureWindowsPath",
        "Path",
        "PosixPath",
        "WindowsPath",
    ),
}


def _is_shared_stdlib_type(cls: type) -> bool:
    if cls in _SHARED_TYPES:
        return True
    for module_name, names in _SHARED_BY_MODULE.items():
        module = sys.modules.get(module_name)
        if module is not None and any(getattr(module, name, None) is cls for name in names):
            return True
    return False


_object_getstate = getattr(object, "__getstate__", None)


def _is_plain(cls: type) -> bool:
    """True if ``__reduce_ex__(4)`` would rebuild an instance as ``cls.__new__(cls)``
    plus a copy of its ``__dict__``, so the copier may do just that, faster."""
    return (
        getattr(cls, "__new__", None) is object.__new__
        and getattr(cls, "__reduce_ex__", None) is object.__reduce_ex__
        and getattr(cls, "__reduce__", None) is object.__reduce__
        and getattr(cls, "__getstate__", None) is _object_getstate
        and not hasattr(cls, "__setstate__")
        and not hasattr(cls, "__getnewargs_ex__")
        and not hasattr(cls, "__getnewargs__")
        and cls not in copyreg.dispatch_table
        and cls.__dictoffset__ != 0
        and not any(map(_slot_names, cls.__mro__))
    )


def _slot_names(cls: type) -> list[str]:
    """The slots ``cls`` itself declares, other than ``__dict__`` and ``__weakref__``
    (``typing.Generic`` and ``Protocol`` declare ``__slots__ = ()``)."""
    slots = vars(cls).get("__slots__", ())
    if isinstance(slots, str):
        slots = (slots,)
    return [name for name in slots if name not in ("__dict__", "__weakref__")]


def _kind_of(cls: type) -> int:
    """Decide once per class how its instances cross (see the module docstring)."""
    if getattr(cls, "__dartloop_unsendable__", False):
        return _REFUSE
    if getattr(cls, "__dartloop_shareable__", False):
        return _SHARE
    if issubclass(cls, _REFUSED_TYPES) or hasattr(cls, "_asyncio_future_blocking"):
        # The attribute is how asyncio.isfuture() knows a future: it catches the C and
        # the pure-Python Future and Task, and third-party loops' futures.
        return _REFUSE
    if issubclass(cls, (type, enum.Enum)) or _is_shared_stdlib_type(cls):
        return _SHARE
    if (
        issubclass(cls, tuple)
        and isinstance(getattr(cls, "_fields", None), tuple)
        and callable(getattr(cls, "_make", None))
        and cls.__dictoffset__ == 0
    ):
        return _NAMEDTUPLE
    if getattr(cls, "__deepcopy__", None) is not None:
        return _DEEPCOPY
    if _is_plain(cls):
        return _PLAIN
    return _REDUCE


#: Bound on the per-class caches below: a program that makes classes on the fly
#: (namedtuple factories, make_dataclass) must not grow them without end. When full
#: they start again from their fixed part.
_CACHE_LIMIT: Final = 4096


def _classify(cls: type) -> int:
    try:
        return _kind_of(cls)
    except Exception as exc:
        # A class whose attribute lookup or subclass check raises can't be reasoned
        # about: refuse it, saying why.
        raise _Unsendable(cls, exc) from None


def _cache(cache: dict[type, Any], fixed: dict[type, Any], cls: type, handler: Any) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
        cache.update(fixed)
    cache[cls] = handler


def _reduce(x: object, cls: type) -> tuple[Any, ...] | str:
    """``x``'s reduce value, as ``copy.deepcopy`` gets it, validated."""
    try:
        reductor = copyreg.dispatch_table.get(cls)
        rv = reductor(x) if reductor is not None else x.__reduce_ex__(4)
        if isinstance(rv, str):
            return rv
        if not isinstance(rv, tuple) or not 2 <= len(rv) <= 5:
            raise TypeError(f"{_type_name(cls)} reduced to {_short_repr(rv)}")
        if not callable(rv[0]) or not isinstance(rv[1], tuple):
            raise TypeError(f"{_type_name(cls)} reduced to {_short_repr(rv)}")
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(cls, exc) from None
    return rv


def _state_steps(error: _Unsendable, state: object) -> None:
    """Add the step from an object to the part of its reduce state ``error`` came from.

    A state that is the attribute dict (or the ``(dict, slots)`` pair that
    ``object.__getstate__`` returns for slotted classes) becomes ``.name``; any other
    state becomes ``<state>`` followed by the path inside it.
    """
    path = error.path
    if type(state) is dict and path and path[-1][0] == _VALUE and type(path[-1][1]) is str:
        path[-1] = (_ATTR, path[-1][1])
        return
    if (
        type(state) is tuple
        and len(state) == 2
        and all(part is None or type(part) is dict for part in state)
        and len(path) >= 2
        and path[-1][0] == _ITEM
        and path[-2][0] == _VALUE
        and type(path[-2][1]) is str
    ):
        path.pop()
        path[-1] = (_ATTR, path[-1][1])
        return
    path.append((_STATE, None))


# --------------------------------------------------------------------------------------
# The copier: prepare_message.
#
# Every function takes the memo, a dict from id(original) to its copy, as copy.deepcopy
# does (an object's own __deepcopy__ receives this same dict). Objects that are not
# held by the message itself but are memoized (items of reduce iterators) are kept
# alive in memo[id(memo)], copy's own convention, so that their ids can't be reused
# during the copy.
#
# Hot paths bind module globals as default arguments (LOAD_FAST instead of a dict
# lookup) and copy a container with one C-level shallow copy, then one pass of type
# checks; only the items that are not atomic go through _copy().


def _copy(
    x: Any,
    memo: _Memo,
    _atomic: frozenset[type] = _ATOMIC,
    _missing: object = _MISSING,
) -> Any:
    cls = type(x)
    if cls in _atomic:
        return x
    y = memo.get(id(x), _missing)
    if y is not _missing:
        return y
    copier = _COPIERS.get(cls)
    if copier is None:
        copier = _copier_for(cls)
    return copier(x, memo)


def _copy_list(
    x: list[Any], memo: _Memo, _atomic: frozenset[type] = _ATOMIC, _copy: _Copier = _copy
) -> list[Any]:
    y = x.copy()
    memo[id(x)] = y
    for v in y:
        if type(v) not in _atomic:
            break
    else:
        return y
    i = 0
    try:
        for i, v in enumerate(y):
            if type(v) not in _atomic:
                y[i] = _copy(v, memo)
    except _Unsendable as e:
        e.path.append((_ITEM, i))
        raise
    return y


def _copy_dict(
    x: dict[Any, Any], memo: _Memo, _atomic: frozenset[type] = _ATOMIC, _copy: _Copier = _copy
) -> dict[Any, Any]:
    y = x.copy()
    memo[id(x)] = y
    # Replacing the values of existing keys while iterating is allowed: the dict's
    # size does not change.
    k = None
    try:
        for k, v in y.items():
            if type(k) not in _atomic:
                break
            if type(v) not in _atomic:
                y[k] = _copy(v, memo)
        else:
            return y
    except _Unsendable as e:
        e.path.append((_VALUE, k))
        raise
    return _copy_dict_keys(x, y, memo)


def _copy_dict_keys(
    x: dict[Any, Any], y: dict[Any, Any], memo: _Memo, _atomic: frozenset[type] = _ATOMIC
) -> dict[Any, Any]:
    """Finish the copy ``y`` (already in the memo) of a dict ``x`` some of whose keys
    are not atomic: refill it, in order, with copied keys and values. The values
    copied before the first such key are found again in the memo."""
    y.clear()
    for i, (k, v) in enumerate(list(x.items())):
        key = k
        if type(k) not in _atomic:
            try:
                key = _copy(k, memo)
            except _Unsendable as e:
                e.path.append((_POS, i))
                raise
        if type(v) not in _atomic:
            try:
                v = _copy(v, memo)
            except _Unsendable as e:
                e.path.append((_VALUE, k))
                raise
        y[key] = v
    return y


def _copy_members(x: Iterable[Any], memo: _Memo, _atomic: frozenset[type] = _ATOMIC) -> list[Any]:
    """Copies of a set's or frozenset's members, in ``x``'s iteration order."""
    out = []
    for i, m in enumerate(x):
        if type(m) not in _atomic:
            try:
                m = _copy(m, memo)
            except _Unsendable as e:
                e.path.append((_POS, i))
                raise
        out.append(m)
    return out


def _copy_set(x: set[Any], memo: _Memo, _atomic: frozenset[type] = _ATOMIC) -> set[Any]:
    y = x.copy()
    memo[id(x)] = y
    for m in y:
        if type(m) not in _atomic:
            break
    else:
        return y
    # Iterate x, not y: positions in error paths are positions in list(x).
    members = _copy_members(x, memo)
    y.clear()
    y.update(members)
    return y


def _copy_frozenset(
    x: frozenset[Any], memo: _Memo, _atomic: frozenset[type] = _ATOMIC, _missing: object = _MISSING
) -> frozenset[Any]:
    for m in x:
        if type(m) not in _atomic:
            break
    else:
        return x
    members = list(x)
    out = _copy_members(members, memo)
    # Immutable containers are memoized only once complete, so a cycle through one
    # (a member whose state refers back to it) has rebuilt it already: use that one,
    # as copy.deepcopy does for tuples.
    y = memo.get(id(x), _missing)
    if y is not _missing:
        return cast("frozenset[Any]", y)
    y = x if all(map(is_, members, out)) else frozenset(out)
    memo[id(x)] = y
    return y


def _copy_tuple(
    x: tuple[Any, ...],
    memo: _Memo,
    _atomic: frozenset[type] = _ATOMIC,
    _missing: object = _MISSING,
    _copy: _Copier = _copy,
) -> tuple[Any, ...]:
    for v in x:
        if type(v) not in _atomic:
            break
    else:
        return x
    out = list(x)
    i = 0
    try:
        for i, v in enumerate(out):
            if type(v) not in _atomic:
                out[i] = _copy(v, memo)
    except _Unsendable as e:
        e.path.append((_ITEM, i))
        raise
    y = memo.get(id(x), _missing)  # see _copy_frozenset
    if y is not _missing:
        return cast("tuple[Any, ...]", y)
    # A tuple of shared things is shared, even when they had to be looked into;
    # memoizing it spares walking it again if it is reached again.
    y = x if all(map(is_, x, out)) else tuple(out)
    memo[id(x)] = y
    return y


def _copy_bytearray(x: bytearray, memo: _Memo) -> bytearray:
    y = x.copy()
    memo[id(x)] = y
    return y


def _copy_method(x: types.MethodType, memo: _Memo) -> types.MethodType:
    func = x.__func__
    obj = x.__self__
    try:
        new_func = _copy(func, memo)
    except _Unsendable as e:
        e.path.append((_ATTR, "__func__"))
        raise
    try:
        new_obj = _copy(obj, memo)
    except _Unsendable as e:
        e.path.append((_ATTR, "__self__"))
        raise
    y = x if new_func is func and new_obj is obj else types.MethodType(new_func, new_obj)
    memo[id(x)] = y
    return y


def _copy_builtin_method(x: types.BuiltinFunctionType | types.MethodWrapperType, memo: _Memo) -> Any:
    obj = x.__self__
    if type(obj) in _ATOMIC:  # None for some, the module for module functions
        return x
    try:
        new_obj = _copy(obj, memo)
    except _Unsendable as e:
        e.path.append((_ATTR, "__self__"))
        raise
    if new_obj is obj:
        return x
    try:
        y = getattr(new_obj, x.__name__)
    except Exception as exc:
        raise _Unsendable(type(x), exc) from None
    memo[id(x)] = y
    return y


def _share(x: Any, memo: Any) -> Any:
    return x


def _refuse(x: Any, memo: Any) -> NoReturn:
    raise _Unsendable(type(x))


def _copy_plain(x: Any, memo: _Memo, _atomic: frozenset[type] = _ATOMIC) -> Any:
    # What copy._reconstruct does with object.__reduce_ex__(4)'s value for such a
    # class, without building that value.
    try:
        y = object.__new__(type(x))
    except Exception as exc:  # an abstract method added to the class since, say
        raise _Unsendable(type(x), exc) from None
    memo[id(x)] = y
    state = x.__dict__
    if not state:
        return y
    new_state = y.__dict__
    new_state.update(state)
    for v in new_state.values():
        if type(v) not in _atomic:
            break
    else:
        return y
    name = None
    try:
        for name, v in new_state.items():
            if type(v) not in _atomic:
                new_state[name] = _copy(v, memo)
    except _Unsendable as e:
        e.path.append((_ATTR, name))
        raise
    return y


def _copy_namedtuple(
    x: tuple[Any, ...], memo: _Memo, _atomic: frozenset[type] = _ATOMIC, _missing: object = _MISSING
) -> tuple[Any, ...]:
    for v in x:
        if type(v) not in _atomic:
            break
    else:
        return x
    cls = type(x)
    fields = cls._fields  # type: ignore[attr-defined]
    out = list(x)
    for i, v in enumerate(out):
        if type(v) not in _atomic:
            try:
                out[i] = _copy(v, memo)
            except _Unsendable as e:
                e.path.append((_ATTR, fields[i]) if i < len(fields) else (_ITEM, i))
                raise
    y = memo.get(id(x), _missing)  # see _copy_frozenset
    if y is not _missing:
        return cast("tuple[Any, ...]", y)
    if all(map(is_, x, out)):
        y = x
    else:
        try:
            y = cls._make(out)  # type: ignore[attr-defined]
        except (RecursionError, MemoryError):
            raise
        except Exception as exc:
            raise _Unsendable(cls, exc) from None
    memo[id(x)] = y
    return cast("tuple[Any, ...]", y)


def _copy_via_deepcopy(x: Any, memo: _Memo) -> Any:
    try:
        y = x.__deepcopy__(memo)
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(type(x), exc) from None
    if y is not x:  # an object that is its own copy is not memoized (copy does the same)
        memo[id(x)] = y
    return y


def _keep_alive(memo: _Memo) -> list[object]:
    keep: list[object] | None = memo.get(id(memo))
    if keep is None:
        keep = memo[id(memo)] = []
    return keep


def _copy_via_reduce(x: Any, memo: _Memo, _atomic: frozenset[type] = _ATOMIC) -> Any:
    cls = type(x)
    rv = _reduce(x, cls)
    if isinstance(rv, str):
        return x  # the name of a global: the object is a singleton
    keep = _keep_alive(memo)
    keep.append(rv)
    func, args, state, listiter, dictiter = rv + (None,) * (5 - len(rv))
    new_args = list(args)
    for i, a in enumerate(new_args):
        if type(a) not in _atomic:
            try:
                new_args[i] = _copy(a, memo)
            except _Unsendable as e:
                e.path.append((_ARG, i))
                raise
    try:
        y = func(*new_args)
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(cls, exc) from None
    memo[id(x)] = y
    if state is not None:
        try:
            state = _copy(state, memo)
        except _Unsendable as e:
            _state_steps(e, state)
            raise
        _set_state(y, state, cls)
    if listiter is not None:
        _append_items(y, listiter, memo, keep, cls)
    if dictiter is not None:
        _set_items(y, dictiter, memo, keep, cls)
    return y


def _set_state(y: Any, state: Any, cls: type) -> None:
    # As copy._reconstruct.
    try:
        setstate = getattr(y, "__setstate__", None)
        if setstate is not None:
            setstate(state)
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        if state:
            y.__dict__.update(state)
        if slotstate:
            for name, value in slotstate.items():
                setattr(y, name, value)
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(cls, exc) from None


def _append_items(
    y: Any, items: Iterable[Any], memo: _Memo, keep: list[object], cls: type, _atomic: frozenset[type] = _ATOMIC
) -> None:
    i = 0
    try:
        append = y.append
        for i, v in enumerate(items):
            if type(v) not in _atomic:
                keep.append(v)
                v = _copy(v, memo)
            append(v)
    except _Unsendable as e:
        e.path.append((_ITEM, i))
        raise
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(cls, exc) from None


def _set_items(
    y: Any, items: Iterable[Any], memo: _Memo, keep: list[object], cls: type, _atomic: frozenset[type] = _ATOMIC
) -> None:
    try:
        for i, (k, v) in enumerate(items):
            key = k
            if type(k) not in _atomic:
                keep.append(k)
                try:
                    key = _copy(k, memo)
                except _Unsendable as e:
                    e.path.append((_POS, i))
                    raise
            if type(v) not in _atomic:
                keep.append(v)
                try:
                    v = _copy(v, memo)
                except _Unsendable as e:
                    e.path.append((_VALUE, k))
                    raise
            y[key] = v
    except _Unsendable:
        raise
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(cls, exc) from None


_BASE_COPIERS: Final[dict[type, _Copier]] = {
    list: _copy_list,
    dict: _copy_dict,
    tuple: _copy_tuple,
    set: _copy_set,
    frozenset: _copy_frozenset,
    bytearray: _copy_bytearray,
    types.MethodType: _copy_method,
    types.BuiltinFunctionType: _copy_builtin_method,
    types.MethodWrapperType: _copy_builtin_method,
}

_COPY_BY_KIND: Final[dict[int, _Copier]] = {
    _SHARE: _share,
    _REFUSE: _refuse,
    _PLAIN: _copy_plain,
    _NAMEDTUPLE: _copy_namedtuple,
    _DEEPCOPY: _copy_via_deepcopy,
    _REDUCE: _copy_via_reduce,
}

#: The copier for each type met so far: _BASE_COPIERS plus a cache of decisions.
_COPIERS: Final[dict[type, _Copier]] = dict(_BASE_COPIERS)


def _copier_for(cls: type) -> _Copier:
    copier = _BASE_COPIERS.get(cls)  # the cache may have just been reset by another thread
    if copier is None:
        copier = _COPY_BY_KIND[_classify(cls)]
    _cache(_COPIERS, _BASE_COPIERS, cls, copier)
    return copier


def prepare_message(message: _T) -> _T:
    """Return what the receiver of *message* gets, after checking that it can be sent.

    Shared values come back as the same objects, mutable ones as deep copies that keep
    the identities and cycles inside the message, ``TransferableTypedData`` as the same
    object; see the module docstring for the rules. The copy is made now: changing
    *message* afterwards does not change what is delivered.

    Thread: any thread (``SendPort.send`` calls it in the sender's thread). Another
    thread must not change *message* meanwhile.

    Raises:
        TypeError: if *message* holds something that can't be sent; the text names its
            type and its path in the message (``message[2]['key'] is a _thread.lock:
            it can't be sent between isolates``), and ``__cause__`` is the error the
            copy of that object raised, if any. Nothing has been delivered then.
        RecursionError: if *message* is nested too deeply (see the module docstring).
    """
    cls = type(message)
    atomic = _ATOMIC
    if cls in atomic:
        return message
    # A flat list or dict at the top is the most common message: one shallow copy and
    # one pass of type checks, without a memo (nothing in it can be reached twice).
    if cls is list:
        items: list[Any] = message.copy()  # type: ignore[attr-defined]
        for v in items:
            if type(v) not in atomic:
                break
        else:
            return items  # type: ignore[return-value]
    elif cls is dict:
        mapping: dict[Any, Any] = message.copy()  # type: ignore[attr-defined]
        for k, v in mapping.items():
            if type(k) not in atomic or type(v) not in atomic:
                break
        else:
            return mapping  # type: ignore[return-value]
    try:
        copier = _COPIERS.get(cls)
        if copier is None:
            copier = _copier_for(cls)
        return copier(message, {})  # type: ignore[no-any-return]
    except _Unsendable as e:
        raise e.type_error() from e.cause


# --------------------------------------------------------------------------------------
# The validator: check_message. The same walk as the copier, in the same order (so both
# report the same offending object), without building anything. ``seen`` maps the id of
# every object looked into to the object, which also keeps temporaries (reduce values,
# iterator items) alive so that their ids can't be reused.


def _check(x: Any, seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    cls = type(x)
    if cls in _atomic:
        return
    key = id(x)
    if key in seen:
        return
    seen[key] = x
    checker = _CHECKERS.get(cls)
    if checker is None:
        checker = _checker_for(cls)
    checker(x, seen)


def _check_sequence(x: Iterable[Any], seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    i = 0
    try:
        for i, v in enumerate(x):
            if type(v) not in _atomic:
                _check(v, seen)
    except _Unsendable as e:
        e.path.append((_ITEM, i))
        raise


def _check_dict(x: dict[Any, Any], seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    for k, v in x.items():
        if type(k) not in _atomic or type(v) not in _atomic:
            _check_pairs(x.items(), seen)
            return


def _check_pairs(pairs: Iterable[tuple[Any, Any]], seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    for i, (k, v) in enumerate(pairs):
        if type(k) not in _atomic:
            try:
                _check(k, seen)
            except _Unsendable as e:
                e.path.append((_POS, i))
                raise
        if type(v) not in _atomic:
            try:
                _check(v, seen)
            except _Unsendable as e:
                e.path.append((_VALUE, k))
                raise


def _check_members(x: Iterable[Any], seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    i = 0
    try:
        for i, m in enumerate(x):
            if type(m) not in _atomic:
                _check(m, seen)
    except _Unsendable as e:
        e.path.append((_POS, i))
        raise


def _check_nothing(x: Any, seen: _Seen) -> None:
    pass


def _check_method(x: types.MethodType, seen: _Seen) -> None:
    try:
        _check(x.__func__, seen)
    except _Unsendable as e:
        e.path.append((_ATTR, "__func__"))
        raise
    try:
        _check(x.__self__, seen)
    except _Unsendable as e:
        e.path.append((_ATTR, "__self__"))
        raise


def _check_builtin_method(x: types.BuiltinFunctionType | types.MethodWrapperType, seen: _Seen) -> None:
    try:
        _check(x.__self__, seen)
    except _Unsendable as e:
        e.path.append((_ATTR, "__self__"))
        raise


def _check_plain(x: Any, seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    name = None
    try:
        for name, v in list(x.__dict__.items()):
            if type(v) not in _atomic:
                _check(v, seen)
    except _Unsendable as e:
        e.path.append((_ATTR, name))
        raise


def _check_namedtuple(x: tuple[Any, ...], seen: _Seen, _atomic: frozenset[type] = _ATOMIC) -> None:
    fields = type(x)._fields  # type: ignore[attr-defined]
    for i, v in enumerate(x):
        if type(v) not in _atomic:
            try:
                _check(v, seen)
            except _Unsendable as e:
                e.path.append((_ATTR, fields[i]) if i < len(fields) else (_ITEM, i))
                raise


def _check_via_reduce(x: Any, seen: _Seen) -> None:
    cls = type(x)
    rv = _reduce(x, cls)
    if isinstance(rv, str):
        return
    seen[id(rv)] = rv
    _, args, state, listiter, dictiter = rv + (None,) * (5 - len(rv))
    for i, a in enumerate(args):
        try:
            _check(a, seen)
        except _Unsendable as e:
            e.path.append((_ARG, i))
            raise
    if state is not None:
        try:
            _check(state, seen)
        except _Unsendable as e:
            _state_steps(e, state)
            raise
    try:
        if listiter is not None:
            # Items are stored in seen (which keeps them alive) by _check.
            _check_sequence(listiter, seen)
        if dictiter is not None:
            pairs = list(dictiter)
            seen[id(pairs)] = pairs  # keeps the pairs alive
            _check_pairs(pairs, seen)
    except _Unsendable:
        raise
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _Unsendable(cls, exc) from None


_BASE_CHECKERS: Final[dict[type, _Checker]] = {
    list: _check_sequence,
    tuple: _check_sequence,
    dict: _check_dict,
    set: _check_members,
    frozenset: _check_members,
    bytearray: _check_nothing,
    types.MethodType: _check_method,
    types.BuiltinFunctionType: _check_builtin_method,
    types.MethodWrapperType: _check_builtin_method,
}

_CHECK_BY_KIND: Final[dict[int, _Checker]] = {
    _SHARE: _check_nothing,
    _REFUSE: _refuse,
    _PLAIN: _check_plain,
    _NAMEDTUPLE: _check_namedtuple,
    # Can't look inside without calling __deepcopy__, i.e. without copying: trusted.
    _DEEPCOPY: _check_nothing,
    _REDUCE: _check_via_reduce,
}

_CHECKERS: Final[dict[type, _Checker]] = dict(_BASE_CHECKERS)


def _checker_for(cls: type) -> _Checker:
    checker = _BASE_CHECKERS.get(cls)
    if checker is None:
        checker = _CHECK_BY_KIND[_classify(cls)]
    _cache(_CHECKERS, _BASE_CHECKERS, cls, checker)
    return checker


def check_message(message: object) -> None:
    """Check that *message* can be sent, without copying it (for ``Isolate.exit``,
    whose receiver gets the very same object).

    Applies the rules of :func:`prepare_message` and raises the same error for the
    same message, except where only making the copy could tell: an object that
    defines ``__deepcopy__`` is accepted without looking inside it, and rebuilding
    an object from its reduce value (the callable, ``__setstate__``) is not tried.

    Thread: any thread.

    Raises:
        TypeError: as :func:`prepare_message`.
        RecursionError: if *message* is nested too deeply (see the module docstring).
    """
    cls = type(message)
    atomic = _ATOMIC
    if cls in atomic:
        return
    # Flat lists, tuples and dicts, as in prepare_message.
    if cls is list or cls is tuple:
        for v in message:  # type: ignore[attr-defined]
            if type(v) not in atomic:
                break
        else:
            return
    elif cls is dict:
        for k, v in message.items():  # type: ignore[attr-defined]
            if type(k) not in atomic or type(v) not in atomic:
                break
        else:
            return
    try:
        _check(message, {})
    except _Unsendable as e:
        raise e.type_error() from e.cause
