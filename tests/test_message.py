"""The message rules of dartloop._message: share, copy, transfer, refuse.

Synchronous tests: no event loop is needed (the few asyncio objects made here are
only refused). The property tests at the end generate arbitrary messages, with
shared sub-objects and cycles, and check what the receiver would get.
"""

from __future__ import annotations

import array
import asyncio
import collections
import copy
import ctypes
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import io
import ipaddress
import math
import mmap
import pathlib
import pickle
import queue
import re
import selectors
import socket
import sys
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from operator import is_
from typing import Any, ClassVar, NamedTuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dartloop import _message
from dartloop._message import TransferableTypedData, check_message, prepare_message

#: prepare_message typed loosely, so that tests can look into what it returns.
prepare: Callable[[Any], Any] = prepare_message

TAIL = ": it can't be sent between isolates"


def error_text(message: object) -> str:
    """The TypeError text of prepare_message, checked to be check_message's too."""
    with pytest.raises(TypeError) as copy_error:
        prepare(message)
    with pytest.raises(TypeError) as check_error:
        check_message(message)
    assert str(check_error.value) == str(copy_error.value)
    return str(copy_error.value)


# --------------------------------------------------------------------------------------
# Test types


@dataclasses.dataclass
class Record:
    a: Any
    b: Any


@dataclasses.dataclass(frozen=True)
class FrozenRecord:
    a: Any
    b: Any


@dataclasses.dataclass(slots=True)
class Slotted:
    a: Any
    b: Any


class Obj:
    """A plain class: its instances are hashable by identity."""


def make_obj(**attrs: Any) -> Any:
    obj = Obj()
    vars(obj).update(attrs)
    return obj


class Pair(NamedTuple):
    x: Any
    y: Any


class PairWithDict(Pair):  # no __slots__: instances have a __dict__
    pass


class MyList(list):  # type: ignore[type-arg]
    pass


class MyDict(dict):  # type: ignore[type-arg]
    pass


class MySet(set):  # type: ignore[type-arg]
    pass


class MyInt(int):
    pass


class Color(enum.Enum):
    RED = [1]  # a mutable value: members are shared all the same


class Shareable:
    __dartloop_shareable__ = True

    def __init__(self) -> None:
        self.items: list[int] = []

    def method(self) -> None:
        pass


class Unsendable:
    __dartloop_unsendable__ = True


class UnsendableSubclass(Unsendable):
    pass


class Both(Shareable, Unsendable):
    pass


class WithState:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __getstate__(self) -> tuple[str, Any]:
        return ("v1", self.value)

    def __setstate__(self, state: tuple[str, Any]) -> None:
        self.value = state[1]


class ReducedTo:
    """Rebuilt as ReducedTo(*args)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReducedTo, self.args)


class DeepCopied:
    """Copies itself with copy.deepcopy, recording the memo it got."""

    memos: ClassVar[list[dict[int, Any]]] = []

    def __init__(self, child: Any) -> None:
        self.child = child

    def __deepcopy__(self, memo: dict[int, Any]) -> DeepCopied:
        DeepCopied.memos.append(memo)
        return DeepCopied(copy.deepcopy(self.child, memo))


class Singleton:
    def __reduce__(self) -> str:
        return "SINGLETON"


SINGLETON = Singleton()


class Failing:
    """Its reduce raises."""

    def __reduce_ex__(self, protocol: object) -> Any:
        raise ValueError("no reduce for you")


class FailingDeepCopy:
    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        raise RuntimeError("no deepcopy for you")


def explode(*args: object) -> Any:
    raise LookupError("can't rebuild")


class FailingRebuild:
    def __reduce__(self) -> tuple[Any, ...]:
        return (explode, (1,))


class FailingSetState:
    def __init__(self) -> None:
        self.x = 1

    def __setstate__(self, state: Any) -> None:
        raise KeyError("bad state")


class BadReduce:
    def __reduce__(self) -> Any:
        return 42


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def function() -> int:
    return 1


def generator() -> Iterator[int]:
    yield 1


async def coroutine_function() -> None:
    pass


async def async_generator_function() -> Any:
    yield 1


LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# TransferableTypedData


def test_transferable_concatenates_buffers() -> None:
    numbers = array.array("H", [1, 2])
    strided = memoryview(bytes(range(10)))[::3]
    data = TransferableTypedData(b"ab", bytearray(b"cd"), memoryview(b"ef"), numbers, strided)
    assert bytes(data.materialize()) == b"abcdef" + numbers.tobytes() + bytes([0, 3, 6, 9])


def test_transferable_copies_at_construction() -> None:
    source = bytearray(b"abc")
    data = TransferableTypedData(source)
    source[0] = ord("x")
    assert bytes(data.materialize()) == b"abc"


def test_transferable_materialize_is_writable_and_once() -> None:
    data = TransferableTypedData(b"abc")
    assert repr(data) == "<TransferableTypedData 3 bytes>"
    view = data.materialize()
    view[0] = ord("x")
    assert bytes(view) == b"xbc"
    assert repr(data) == "<TransferableTypedData materialized>"
    with pytest.raises(ValueError, match=r"^TransferableTypedData has already been materialized$"):
        data.materialize()


def test_transferable_empty() -> None:
    assert bytes(TransferableTypedData().materialize()) == b""


@pytest.mark.parametrize("bad", ["text", 3, [1, 2], None])
def test_transferable_rejects_non_buffers(bad: Any) -> None:
    with pytest.raises(TypeError):
        TransferableTypedData(bad)


def test_transferable_is_transferred_not_copied() -> None:
    data = TransferableTypedData(b"abc")
    assert prepare(data) is data
    check_message(data)
    # Dart's transferable_test: [tr, tr] arrives as one object twice; materializing
    # one element works and the other then fails.
    received = prepare([data, data])
    assert received[0] is data and received[1] is data
    assert bytes(received[0].materialize()) == b"abc"
    with pytest.raises(ValueError):
        received[1].materialize()


def test_transferable_copy_is_itself_and_pickle_refused() -> None:
    data = TransferableTypedData(b"abc")
    assert copy.copy(data) is data
    assert copy.deepcopy([data])[0] is data
    with pytest.raises(TypeError, match="can't be pickled"):
        pickle.dumps(data)


def test_transferable_materialize_races_once() -> None:
    threads_count = 8
    for _ in range(30):
        data = TransferableTypedData(b"x" * 100)
        barrier = threading.Barrier(threads_count)
        results: list[str] = []

        def take(
            data: TransferableTypedData = data, barrier: threading.Barrier = barrier, results: list[str] = results
        ) -> None:
            barrier.wait()
            try:
                data.materialize()
            except ValueError:
                results.append("refused")
            else:
                results.append("got")

        threads = [threading.Thread(target=take) for _ in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == ["got"] + ["refused"] * (threads_count - 1)


# --------------------------------------------------------------------------------------
# Shared as is


SHARED_VALUES: list[Any] = [
    None,
    True,
    0,
    2**100,
    1.5,
    float("nan"),
    -0.0,
    1 + 2j,
    "text",
    "",
    b"bytes",
    range(3),
    ...,
    NotImplemented,
    function,
    lambda: None,
    len,
    math.sqrt,
    "abc".upper,  # builtin method bound to a str
    int,
    Record,
    type,
    Color,  # a class with a metaclass
    math,
    function.__code__,
    str.upper,  # method descriptor
    int.real,  # getset descriptor
    vars(Slotted)["a"],  # member descriptor
    object.__init__,  # wrapper descriptor
    property(lambda self: 1),
    decimal.Decimal("1.5"),
    fractions.Fraction(1, 3),
    datetime.date(2024, 1, 2),
    datetime.datetime(2024, 1, 2, 3, 4, tzinfo=datetime.UTC),
    datetime.time(1, 2),
    datetime.timedelta(seconds=3),
    datetime.UTC,
    uuid.UUID(int=5),
    ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("::1"),
    ipaddress.ip_network("10.0.0.0/8"),
    re.compile("a+"),
    Color.RED,
    pathlib.PurePosixPath("/a/b"),
    pathlib.Path("/tmp"),
    (),
    (1, "a", (b"b", (None,))),
    frozenset({1, "a", (2, 3)}),
    Pair(1, (2, "x")),
    Shareable(),
    Shareable().method,
    TransferableTypedData(b"x"),
    SINGLETON,
]


@pytest.mark.parametrize("value", SHARED_VALUES, ids=lambda v: type(v).__name__)
def test_shared_values_arrive_as_the_same_object(value: Any) -> None:
    assert prepare(value) is value
    check_message(value)
    received = prepare([value, {"k": value}, (value, [value])])
    assert received[0] is value
    assert received[1]["k"] is value
    assert received[2][0] is value and received[2][1][0] is value


def test_shareable_hook_shares_subclasses_too() -> None:
    class Sub(Shareable):
        pass

    obj = Sub()
    assert prepare([obj])[0] is obj


def test_functions_are_shared_with_their_closure() -> None:
    # Documented: a function is shared as is; what its closure holds is not copied.
    items: list[int] = []

    def closure() -> list[int]:
        return items

    assert prepare(closure) is closure


# --------------------------------------------------------------------------------------
# Copied


def test_flat_containers_are_copied() -> None:
    for value in ([1, "a", None], {"a": 1, 2: b"x"}, {1, 2, "x"}, bytearray(b"abc"), [], {}, set()):
        received = prepare(value)
        assert received == value
        assert received is not value
        assert type(received) is type(value)


def test_copy_is_taken_at_send_time() -> None:
    message = {"items": [1, 2]}
    received = prepare(message)
    message["items"].append(3)
    assert received == {"items": [1, 2]}


def test_nested_copy_shares_immutables() -> None:
    text = "x" * 50
    blob = b"y" * 50
    inner = (1, text)
    message = {"a": [text, blob, inner], "b": {"c": [inner]}}
    received = prepare(message)
    assert received == message
    assert received["a"] is not message["a"]
    assert received["a"][0] is text and received["a"][1] is blob
    assert received["a"][2] is inner and received["b"]["c"][0] is inner


def test_tuple_holding_a_list_is_rebuilt() -> None:
    inner = [1, 2]
    message = (1, inner, "x")
    received = prepare(message)
    assert type(received) is tuple and received is not message
    assert received == message
    assert received[1] is not inner
    assert received[0] is message[0] and received[2] is message[2]


def test_frozenset_holding_a_copied_object_is_rebuilt() -> None:
    obj = make_obj(a=[1])
    message = frozenset({1, obj})
    received = prepare(message)
    assert type(received) is frozenset and received is not message
    (copied,) = [m for m in received if isinstance(m, Obj)]
    assert copied is not obj and vars(copied) == {"a": [1]}


def test_set_holding_a_copied_object() -> None:
    obj = make_obj()
    message = {obj, 1}
    received = prepare(message)
    assert len(received) == 2 and obj not in received and 1 in received


def test_dict_with_copied_keys_keeps_order() -> None:
    key1, key2 = make_obj(n=1), make_obj(n=2)
    shared = [1]
    message = {"first": shared, key1: "a", (1, 2): shared, key2: "b"}
    received = prepare(message)
    keys = list(received)
    assert keys[0] == "first" and keys[2] == (1, 2)
    assert keys[1].n == 1 and keys[3].n == 2 and keys[1] is not key1
    assert received["first"] is received[(1, 2)] and received["first"] is not shared


def test_identity_is_kept() -> None:
    shared = [1, 2]
    message = [shared, {"again": shared}, (shared,)]
    received = prepare(message)
    assert received[0] is not shared
    assert received[1]["again"] is received[0]
    assert received[2][0] is received[0]


def test_cycles_are_kept() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    received = prepare(loop)
    assert received is not loop and received[1] is received

    parent: dict[str, Any] = {"children": []}
    parent["children"].append({"parent": parent})
    received = prepare(parent)
    assert received["children"][0]["parent"] is received

    node = make_obj()
    node.me = node
    received = prepare(node)
    assert received.me is received and received is not node


def test_cycle_through_a_tuple() -> None:
    holder: list[Any] = []
    tup = (holder, 1)
    holder.append(tup)
    received = prepare(tup)
    assert received is not tup and received[0] is not holder
    assert received[0][0] is received


def test_dataclass_and_plain_instances() -> None:
    record = Record([1], {"x": 2})
    received = prepare(record)
    assert type(received) is Record and received == record and received is not record
    assert received.a is not record.a

    frozen = FrozenRecord([1], "x")
    received = prepare(frozen)
    assert received == frozen and received is not frozen and received.a is not frozen.a

    obj = make_obj(a=1, b=[2])
    received = prepare(obj)
    assert type(received) is Obj and vars(received) == {"a": 1, "b": [2]}


def test_plain_instance_is_copied_without_init() -> None:
    calls: list[int] = []

    class Counted:
        def __init__(self) -> None:
            calls.append(1)
            self.x = [1]

    obj = Counted()
    received = prepare(obj)
    assert calls == [1] and received.x == [1] and received.x is not obj.x


def test_slotted_and_getstate_objects() -> None:
    slotted = Slotted([1], "b")
    received = prepare(slotted)
    assert type(received) is Slotted and received == slotted and received.a is not slotted.a

    with_state = WithState([1])
    received = prepare(with_state)
    assert type(received) is WithState and received.value == [1] and received.value is not with_state.value


def test_namedtuples() -> None:
    flat = Pair(1, "a")
    assert prepare(flat) is flat
    holding = Pair(1, [2])
    received = prepare(holding)
    assert type(received) is Pair and received == holding and received.y is not holding.y
    with_dict: Any = PairWithDict(1, 2)
    with_dict.extra = [3]
    received = prepare(with_dict)
    assert type(received) is PairWithDict and received is not with_dict
    assert received == (1, 2) and vars(received) == {"extra": [3]}


def test_container_subclasses_keep_their_class_and_attributes() -> None:
    my_list: Any = MyList([1, [2]])
    my_list.tag = "t"
    received = prepare(my_list)
    assert type(received) is MyList and received == my_list and vars(received) == {"tag": "t"}
    assert received[1] is not my_list[1]

    my_dict = MyDict(a=[1])
    received = prepare(my_dict)
    assert type(received) is MyDict and received == my_dict and received["a"] is not my_dict["a"]

    my_set = MySet({1, 2})
    received = prepare(my_set)
    assert type(received) is MySet and received == my_set and received is not my_set

    number = MyInt(5)
    received = prepare(number)
    assert type(received) is MyInt and received == 5


def test_collections_types() -> None:
    ordered = collections.OrderedDict([("b", [1]), ("a", 2)])
    received = prepare(ordered)
    assert type(received) is collections.OrderedDict and list(received.items()) == [("b", [1]), ("a", 2)]

    default = collections.defaultdict(list, {"a": [1]})
    received = prepare(default)
    assert received.default_factory is list and received == default and received["a"] is not default["a"]

    dq = collections.deque([1, [2]], maxlen=5)
    received = prepare(dq)
    assert received == dq and received.maxlen == 5 and received[1] is not dq[1]

    counter = collections.Counter("abca")
    assert prepare(counter) == counter


def test_exceptions_are_copied() -> None:
    error = ValueError("boom", [1])
    received = prepare(error)
    assert type(received) is ValueError and received.args == ("boom", [1]) and received is not error


def test_partial_is_copied() -> None:
    part = functools.partial(max, [1, 2])
    received = prepare(part)
    assert received is not part and received.func is max and received() == 2
    assert received.args == ([1, 2],) and received.args[0] is not part.args[0]


def test_bound_methods_follow_their_object() -> None:
    obj = make_obj()
    obj.items = [1]

    class WithMethod:
        def __init__(self) -> None:
            self.items = [1]

        def get(self) -> list[int]:
            return self.items

    target = WithMethod()
    received = prepare([target, target.get])
    assert received[1].__self__ is received[0] and received[0] is not target
    assert received[1].__func__ is WithMethod.get
    assert received[1]() == [1]

    items = [1, 2]
    received = prepare([items.append, items])
    assert received[0].__self__ is received[1] and received[1] is not items
    received[0](3)
    assert received[1] == [1, 2, 3] and items == [1, 2]

    received = prepare(items.__len__)  # a method-wrapper
    assert received is not items.__len__ and received() == 2


def test_deepcopy_hook_gets_the_memo() -> None:
    DeepCopied.memos.clear()
    shared = [1]
    message = [shared, DeepCopied(shared)]
    received = prepare(message)
    assert len(DeepCopied.memos) == 1
    # copy.deepcopy inside __deepcopy__ found the list already copied in our memo.
    assert received[1].child is received[0] and received[0] is not shared


def test_check_message_does_not_call_deepcopy() -> None:
    DeepCopied.memos.clear()
    check_message([DeepCopied(LOCK)])
    assert DeepCopied.memos == []


def test_reduce_returning_a_name_is_shared() -> None:
    assert prepare([SINGLETON])[0] is SINGLETON


def test_object_sentinel_is_copied() -> None:
    sentinel = object()
    received = prepare([sentinel, sentinel])
    assert type(received[0]) is object and received[0] is not sentinel and received[1] is received[0]


def test_ctypes_value_is_copied() -> None:
    value = ctypes.c_int(5)
    received = prepare(value)
    assert received is not value and received.value == 5


def test_classification_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_message, "_CACHE_LIMIT", len(_message._BASE_COPIERS) + 5)
    for n in range(30):
        cls = type(f"Dynamic{n}", (), {})
        assert type(prepare(cls())) is cls
        check_message(cls())
        assert len(_message._COPIERS) <= len(_message._BASE_COPIERS) + 5
        assert len(_message._CHECKERS) <= len(_message._BASE_CHECKERS) + 5
    assert prepare([1, [2]]) == [1, [2]]


def test_sending_from_many_threads() -> None:
    errors: list[BaseException] = []

    def send_many() -> None:
        try:
            for n in range(200):
                cls = type(f"T{n}", (), {})
                message = {"obj": cls(), "items": [n, [n]], "record": Record(n, [n])}
                received = prepare(message)
                assert type(received["obj"]) is cls and received["items"] == [n, [n]]
                assert received["record"] == Record(n, [n])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --------------------------------------------------------------------------------------
# Refused


def _refused_cases() -> Iterator[tuple[str, Callable[[], Any], Callable[[Any], None] | None, str | None]]:
    """(id, factory, cleanup, article and type name in the error, if not the type's own)."""
    yield "lock", threading.Lock, None, "a _thread.lock"
    yield "rlock", threading.RLock, None, "a _thread.RLock"
    yield "condition", threading.Condition, None, "a threading.Condition"
    yield "semaphore", threading.Semaphore, None, "a threading.Semaphore"
    yield "bounded", threading.BoundedSemaphore, None, "a threading.BoundedSemaphore"
    yield "event", threading.Event, None, "a threading.Event"
    yield "barrier", lambda: threading.Barrier(2), None, "a threading.Barrier"
    yield "thread", threading.Thread, None, "a threading.Thread"
    yield "local", threading.local, None, "a _thread._local"
    yield "asyncio-lock", asyncio.Lock, None, "an asyncio.locks.Lock"
    yield "asyncio-event", asyncio.Event, None, "an asyncio.locks.Event"
    yield "asyncio-condition", asyncio.Condition, None, "an asyncio.locks.Condition"
    yield "asyncio-semaphore", asyncio.Semaphore, None, "an asyncio.locks.Semaphore"
    yield "asyncio-barrier", lambda: asyncio.Barrier(2), None, "an asyncio.locks.Barrier"
    yield "asyncio-queue", asyncio.Queue, None, "an asyncio.queues.Queue"
    yield "loop", asyncio.new_event_loop, lambda loop: loop.close(), None
    yield "concurrent-future", ConcurrentFuture, None, "a concurrent.futures._base.Future"
    executor = "a concurrent.futures.thread.ThreadPoolExecutor"
    yield "executor", ThreadPoolExecutor, lambda ex: ex.shutdown(), executor
    yield "queue", queue.Queue, None, "a queue.Queue"
    yield "simple-queue", queue.SimpleQueue, None, "a _queue.SimpleQueue"
    yield "socket", socket.socket, lambda s: s.close(), "a socket.socket"
    selector = f"a selectors.{selectors.DefaultSelector.__name__}"
    yield "selector", selectors.DefaultSelector, lambda s: s.close(), selector
    yield "bytesio", io.BytesIO, None, "a _io.BytesIO"
    yield "stringio", io.StringIO, None, "a _io.StringIO"
    yield "mmap", lambda: mmap.mmap(-1, 16), lambda m: m.close(), "a mmap.mmap"
    yield "generator", generator, lambda g: g.close(), "a generator"
    yield "coroutine", coroutine_function, lambda c: c.close(), "a coroutine"
    yield "async-generator", async_generator_function, None, "an async_generator"
    yield "frame", sys._getframe, None, "a frame"
    yield "memoryview", lambda: memoryview(b"abc"), None, "a memoryview"
    yield "weakref", lambda: weakref.ref(Obj), None, "a weakref.ReferenceType"
    yield "weakproxy", lambda: weakref.proxy(PROXY_TARGET), None, "a weakref.ProxyType"
    yield "weak-value-dict", weakref.WeakValueDictionary, None, "a weakref.WeakValueDictionary"
    yield "weak-set", weakref.WeakSet, None, "a _weakrefset.WeakSet"
    yield "unsendable", Unsendable, None, "a test_message.Unsendable"
    yield "unsendable-subclass", UnsendableSubclass, None, "a test_message.UnsendableSubclass"
    yield "unsendable-wins", Both, None, "a test_message.Both"


PROXY_TARGET = make_obj()


REFUSED_CASES = list(_refused_cases())


@pytest.mark.parametrize(
    ("factory", "cleanup", "name"),
    [case[1:] for case in REFUSED_CASES],
    ids=[case[0] for case in REFUSED_CASES],
)
def test_refused(factory: Callable[[], Any], cleanup: Callable[[Any], None] | None, name: str | None) -> None:
    obj = factory()
    try:
        if name is None:  # the event loop's class depends on the platform
            name = f"an {type(obj).__module__}.{type(obj).__qualname__}"
        assert error_text(obj) == f"message is {name}{TAIL}"
        assert error_text([1, {"k": obj}]) == f"message[1]['k'] is {name}{TAIL}"
    finally:
        if cleanup is not None:
            cleanup(obj)


def test_refused_open_file(tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "f", "w") as text, open(tmp_path / "g", "wb") as binary:
        assert error_text({"f": text}) == f"message['f'] is a _io.TextIOWrapper{TAIL}"
        assert error_text({"f": binary}) == f"message['f'] is a _io.BufferedWriter{TAIL}"


def test_refused_futures() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert error_text([loop.create_future()]) == f"message[0] is a _asyncio.Future{TAIL}"
        py_future = asyncio.futures._PyFuture(loop=loop)  # type: ignore[attr-defined]
        assert error_text([py_future]) == f"message[0] is an asyncio.futures.Future{TAIL}"
    finally:
        loop.close()


def test_refused_traceback() -> None:
    try:
        raise ValueError("x")
    except ValueError as exc:
        tb = exc.__traceback__
    assert error_text((tb,)) == f"message[0] is a traceback{TAIL}"


# --------------------------------------------------------------------------------------
# Error paths


def test_path_from_the_contract() -> None:
    assert error_text([0, 1, {"key": LOCK}]) == f"message[2]['key'] is a _thread.lock{TAIL}"


def test_path_list_tuple_dict() -> None:
    assert error_text(LOCK) == f"message is a _thread.lock{TAIL}"
    assert error_text({"a": [1, (2, LOCK)]}) == f"message['a'][1][1] is a _thread.lock{TAIL}"
    assert error_text({1: {None: LOCK}}) == f"message[1][None] is a _thread.lock{TAIL}"
    assert error_text({(1, "x"): LOCK}) == f"message[(1, 'x')] is a _thread.lock{TAIL}"


def test_path_dict_key() -> None:
    assert error_text({"a": 1, LOCK: 2}) == f"list(message)[1] is a _thread.lock{TAIL}"
    assert error_text({"a": {(1, LOCK): 2}}) == f"list(message['a'])[0][1] is a _thread.lock{TAIL}"


def test_path_set_members() -> None:
    members = {1, 2, 3, LOCK}
    position = list(members).index(LOCK)
    assert error_text([members]) == f"list(message[0])[{position}] is a _thread.lock{TAIL}"
    frozen = frozenset({"a", (1, LOCK)})
    position = list(frozen).index((1, LOCK))
    assert error_text(frozen) == f"list(message)[{position}][1] is a _thread.lock{TAIL}"


def test_path_attributes() -> None:
    assert error_text([make_obj(lock=LOCK)]) == f"message[0].lock is a _thread.lock{TAIL}"
    assert error_text(Record(1, make_obj(child=[LOCK]))) == f"message.b.child[0] is a _thread.lock{TAIL}"
    assert error_text(FrozenRecord(LOCK, 1)) == f"message.a is a _thread.lock{TAIL}"
    assert error_text(Slotted(1, LOCK)) == f"message.b is a _thread.lock{TAIL}"
    assert error_text(Pair(1, [LOCK])) == f"message.y[0] is a _thread.lock{TAIL}"
    odd = make_obj()
    setattr(odd, "not an identifier", LOCK)
    assert error_text(odd) == f"getattr(message, 'not an identifier') is a _thread.lock{TAIL}"


def test_path_bound_method() -> None:
    holder = make_obj(lock=LOCK)

    class WithMethod:
        def __init__(self) -> None:
            self.lock = LOCK

        def method(self) -> None:
            pass

    assert error_text([WithMethod().method]) == f"message[0].__self__.lock is a _thread.lock{TAIL}"
    assert error_text(types.MethodType(function, holder)) == f"message.__self__.lock is a _thread.lock{TAIL}"
    assert error_text([[LOCK].copy]) == f"message[0].__self__[0] is a _thread.lock{TAIL}"
    assert error_text([LOCK.acquire]) == f"message[0].__self__ is a _thread.lock{TAIL}"


def test_path_reduce_parts() -> None:
    assert error_text(ReducedTo(1, [LOCK])) == f"message<arg 1>[0] is a _thread.lock{TAIL}"
    assert error_text([WithState(LOCK)]) == f"message[0]<state>[1] is a _thread.lock{TAIL}"
    assert error_text(functools.partial(print, LOCK)) == f"message<state>[1][0] is a _thread.lock{TAIL}"
    assert error_text(MyList([1, LOCK])) == f"message[1] is a _thread.lock{TAIL}"
    assert error_text(MyDict(a=LOCK)) == f"message['a'] is a _thread.lock{TAIL}"
    assert error_text(collections.OrderedDict({LOCK: 1})) == f"list(message)[0] is a _thread.lock{TAIL}"
    assert error_text(collections.deque([1, 2, LOCK])) == f"message[2] is a _thread.lock{TAIL}"
    with_dict = PairWithDict(1, 2)
    with_dict.lock = LOCK  # type: ignore[attr-defined]
    assert error_text(with_dict) == f"message.lock is a _thread.lock{TAIL}"


def test_path_key_repr_is_shortened() -> None:
    key = "k" * 100
    assert error_text({key: LOCK}) == f"message[{repr(key)[:57]}...] is a _thread.lock{TAIL}"
    bad = BadRepr()
    assert error_text({bad: LOCK}) == f"message[<test_message.BadRepr object>] is a _thread.lock{TAIL}"


@pytest.mark.parametrize(
    "message",
    [
        [0, 1, {"key": LOCK}],
        {"a": 1, LOCK: 2},
        [{1, 2, LOCK}],
        [make_obj(lock=LOCK)],
        Slotted(1, [LOCK]),
        Pair(1, [LOCK]),
        MyList([1, LOCK]),
        collections.OrderedDict({LOCK: 1}),
        {"a": {(1, LOCK): 2}},
    ],
    ids=repr,
)
def test_paths_evaluate_to_the_offending_object(message: Any) -> None:
    path = error_text(message).split(" is a ")[0]
    assert eval(path, {"message": message}) is LOCK


def test_cause_of_failed_reduce() -> None:
    with pytest.raises(TypeError) as info:
        prepare({"x": [Failing()]})
    assert str(info.value) == f"message['x'][0] is a test_message.Failing{TAIL}"
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "no reduce for you"
    with pytest.raises(TypeError) as info:
        check_message({"x": [Failing()]})
    assert isinstance(info.value.__cause__, ValueError)


def test_cause_of_failed_deepcopy_rebuild_and_setstate() -> None:
    for obj, cause in [
        (FailingDeepCopy(), RuntimeError),
        (FailingRebuild(), LookupError),
        (FailingSetState(), KeyError),
        (BadReduce(), TypeError),
    ]:
        with pytest.raises(TypeError) as info:
            prepare([obj])
        assert str(info.value) == f"message[0] is a test_message.{type(obj).__name__}{TAIL}"
        assert isinstance(info.value.__cause__, cause)


def test_deepcopy_hook_failing_inside() -> None:
    # The object's own __deepcopy__ meets the lock: reported at the object, the copy
    # module's error as the cause. check_message trusts such objects.
    with pytest.raises(TypeError) as info:
        prepare([DeepCopied(LOCK)])
    assert str(info.value) == f"message[0] is a test_message.DeepCopied{TAIL}"
    assert isinstance(info.value.__cause__, TypeError)


def test_ctypes_pointer_refused() -> None:
    value = ctypes.c_int(5)
    with pytest.raises(TypeError) as info:
        prepare([ctypes.pointer(value)])
    assert str(info.value).startswith("message[0] is a ") and str(info.value).endswith(TAIL)
    assert info.value.__cause__ is not None


def test_no_internal_exception_leaks() -> None:
    with pytest.raises(TypeError) as info:
        prepare([LOCK])
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_deep_nesting_is_copied_or_raises_recursion_error() -> None:
    # Past the recursion limit CPython 3.11/3.12 raise RecursionError (as
    # copy.deepcopy does); 3.13.0 lets these calls go deeper. Never a TypeError.
    depth = sys.getrecursionlimit() * 2
    deep: list[Any] = []
    for _ in range(depth):
        deep = [deep]
    for send in (prepare_message, check_message):
        try:
            received = send(deep)
        except RecursionError:
            continue
        if send is prepare_message:
            for _ in range(depth):
                assert type(received) is list and len(received) == 1
                received = received[0]
            assert received == []


# --------------------------------------------------------------------------------------
# Property tests


SHAREABLE_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.complex_numbers(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.sampled_from([len, function, int, math, ..., range(3), Color.RED, decimal.Decimal(2)]),
)

HASHABLES = st.recursive(
    SHAREABLE_LEAVES,
    lambda children: st.lists(children, max_size=3).map(tuple) | st.frozensets(children, max_size=3),
    max_leaves=6,
)


def _mutables(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(HASHABLES, children, max_size=4),
        st.sets(HASHABLES, max_size=4),
        st.binary(max_size=4).map(bytearray),
        st.builds(Record, children, children),
        st.builds(Slotted, children, children),
        st.builds(Pair, children, children),
        st.lists(children, max_size=3).map(MyList),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), children, max_size=3).map(lambda d: make_obj(**d)),
    )


TREES = st.recursive(HASHABLES, _mutables, max_leaves=12)

SHARED_LEAF_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    range,
    type(...),
    types.FunctionType,
    types.BuiltinFunctionType,
    type,
    types.ModuleType,
    Color,
    decimal.Decimal,
)


def deeply_shared(x: Any) -> bool:
    """Whether the generated value x must arrive as the very same object."""
    if type(x) in SHARED_LEAF_TYPES:
        return True
    if type(x) in (tuple, frozenset, Pair):
        return all(deeply_shared(m) for m in x)
    return False


def children(x: Any) -> list[Any]:
    """What a generated value holds (not looking into shared leaves such as enum
    members, which must never be changed by add_links)."""
    t = type(x)
    out: list[Any] = []
    if t in (list, tuple, set, frozenset, Pair, MyList):
        out.extend(x)
    elif t is dict:
        out.extend(x.keys())
        out.extend(x.values())
    elif t is Slotted:
        out.extend([x.a, x.b])
    if t in (Record, Obj, MyList):
        out.extend(vars(x).values())
    return out


def nodes(root: Any) -> list[Any]:
    """Every object reachable in a generated message, each once."""
    seen: dict[int, Any] = {}
    stack = [root]
    while stack:
        x = stack.pop()
        if id(x) not in seen:
            seen[id(x)] = x
            stack.extend(children(x))
    return list(seen.values())


def shape(root: Any) -> str:
    """For hypothesis statistics: whether a generated message has a cycle or an object
    reached twice."""
    state: dict[int, int] = {}  # 1: being walked, 2: done
    reached_twice = False

    def walk(x: Any) -> bool:
        nonlocal reached_twice
        if deeply_shared(x):
            return False
        mark = state.get(id(x))
        if mark == 1:
            return True
        if mark == 2:
            reached_twice = True
            return False
        state[id(x)] = 1
        cyclic = False
        for child in children(x):  # all of them: a later one may be reached twice
            cyclic = walk(child) or cyclic
        state[id(x)] = 2
        return cyclic

    if walk(root):
        return "cycle"
    return "reached twice" if reached_twice else "tree"


def add_links(data: st.DataObject, root: Any) -> Any:
    """Make some objects reachable twice, and some cycles: insert references to drawn
    nodes into drawn mutable containers."""
    root = [root]  # so that the root itself can be a link target and source
    for n in range(data.draw(st.integers(0, 4), label="links")):
        everything = nodes(root)
        sources = [x for x in everything if type(x) in (list, dict, Record, Obj, MyList)]
        source = data.draw(st.sampled_from(sources), label="source")
        target = data.draw(st.sampled_from(everything), label="target")
        if isinstance(source, list):
            source.append(target)
        elif isinstance(source, dict):
            source[f"link{n}"] = target
        else:
            setattr(source, f"link{n}", target)
    return root


def assert_received(original: Any, received: Any) -> None:
    """received is what the receiver of original gets: equal in structure, with the
    same sharing and cycles, no mutable object of original in it, and every shared
    value the same object."""
    original_ids = {id(x) for x in nodes(original)}
    mapping: dict[int, Any] = {}
    reverse: dict[int, Any] = {}
    stack = [(original, received)]
    while stack:
        a, b = stack.pop()
        if deeply_shared(a):
            assert b is a
            continue
        assert type(b) is type(a)
        if id(a) in mapping:
            assert mapping[id(a)] is b  # one object, one copy
            continue
        mapping[id(a)] = b
        assert reverse.setdefault(id(b), a) is a  # two objects, two copies
        assert id(b) not in original_ids  # no mutable object shared
        if isinstance(a, (list, tuple)):
            assert len(b) == len(a)
            stack.extend(zip(a, b))
        elif isinstance(a, dict):
            # Keys are shareable here: the same objects, in the same order.
            assert len(b) == len(a) and all(map(is_, a, b))
            stack.extend(zip(a.values(), b.values()))
        elif isinstance(a, set):
            assert {id(m) for m in a} == {id(m) for m in b}
        elif isinstance(a, bytearray):
            assert b == a
        elif isinstance(a, Slotted):
            stack.extend([(a.a, b.a), (a.b, b.b)])
        if hasattr(a, "__dict__"):
            assert vars(b).keys() == vars(a).keys()
            stack.extend(zip(vars(a).values(), vars(b).values()))


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(HASHABLES)
def test_property_shareable_values_are_shared(value: Any) -> None:
    assert prepare(value) is value
    check_message(value)


@PROPERTY_SETTINGS
@given(TREES, st.data())
def test_property_received_message(tree: Any, data: st.DataObject) -> None:
    message = add_links(data, tree)
    event(shape(message))
    check_message(message)
    received = prepare(message)
    assert_received(message, received)
    # What arrives can be sent again, and gives an equivalent message.
    assert_received(received, prepare(received))


@PROPERTY_SETTINGS
@given(TREES)
def test_property_acyclic_message_equals_deepcopy(tree: Any) -> None:
    received = prepare(tree)
    try:
        expected = copy.deepcopy(tree)
    except TypeError:  # copy refuses modules, which a message shares
        return
    everything = nodes(tree)
    # A NaN is shared (the very same object), but it equals itself only where
    # == checks identity first: lists and tuples do, dataclasses compare field
    # by field since 3.13 and do not. The other property tests check NaNs by
    # identity (assert_received).
    if any(isinstance(x, float) and x != x for x in everything):
        return
    # Obj has identity equality; compare everything else with ==.
    if not any(isinstance(x, Obj) for x in everything):
        assert received == expected


def _with_lock(data: st.DataObject, root: Any) -> Any:
    """Put LOCK somewhere in root (wrapped in a tuple or frozenset, maybe)."""
    wrap = data.draw(st.sampled_from(["bare", "tuple", "frozenset"]), label="wrap")
    thing: Any = LOCK if wrap == "bare" else (1, LOCK) if wrap == "tuple" else frozenset({LOCK, 2})
    everything = nodes(root)
    places = [x for x in everything if type(x) in (list, dict, set, Record, Obj, MyList)]
    place = data.draw(st.sampled_from(places), label="place")
    if isinstance(place, list):
        place.insert(data.draw(st.integers(0, len(place)), label="index"), thing)
    elif isinstance(place, set):
        place.add(thing)
    elif isinstance(place, dict):
        if data.draw(st.booleans(), label="as key"):
            place[thing] = "value"
        else:
            place["lock"] = thing
    else:
        place.lock = thing
    return root


@PROPERTY_SETTINGS
@given(TREES, st.data())
def test_property_error_path_finds_the_lock(tree: Any, data: st.DataObject) -> None:
    message = _with_lock(data, add_links(data, tree))
    with pytest.raises(TypeError) as copy_error:
        prepare(message)
    with pytest.raises(TypeError) as check_error:
        check_message(message)
    # The two walks may meet a shared sub-object first by different routes,
    # so the paths can differ; each must lead to the lock.
    for error in (copy_error, check_error):
        text = str(error.value)
        match = re.fullmatch(r"(.*) is a _thread\.lock: it can't be sent between isolates", text)
        assert match is not None, text
        path = match.group(1)
        # Keys whose repr is not an expression (<built-in function len>, nan) or is cut
        # short (...) can't be evaluated; every other path can.
        if not re.search(r"<|\.\.\.|nan|inf", path):
            assert eval(path, {"message": message, "Decimal": decimal.Decimal}) is LOCK
