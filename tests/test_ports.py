"""Ports: RawReceivePort, ReceivePort, SendPort, Capability, TransferableTypedData.

Every ``async def`` test runs on both backends (``[dartloop-asyncio]`` and
``[dartloop-uvloop]``, see tests/conftest.py). Ordering is checked with exact
event lists; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import types
from typing import Any

import pytest
from _isolate_helpers import Inbox, turns

import dartloop
from dartloop import (
    Capability,
    Isolate,
    RawReceivePort,
    ReceivePort,
    SendPort,
    Timer,
    TransferableTypedData,
    schedule_microtask,
)

# --------------------------------------------------------------------------
# RawReceivePort: one message is one event, FIFO with call_soon and Timer.run


async def test_send_from_own_thread_is_fifo_with_timer_run() -> None:
    events: list[Any] = []
    done = asyncio.get_running_loop().create_future()
    port = RawReceivePort(lambda m: events.append(("handler", m)))
    Timer.run(lambda: events.append("a"))
    port.send_port.send("x")
    Timer.run(lambda: (events.append("b"), done.set_result(None)))
    await done
    port.close()
    assert events == ["a", ("handler", "x"), "b"]


async def test_send_is_fifo_with_call_soon_and_future() -> None:
    loop = asyncio.get_running_loop()
    events: list[Any] = []
    port = RawReceivePort(lambda m: events.append(m))
    loop.call_soon(events.append, "soon-1")
    port.send_port.send("msg-1")
    fut = dartloop.future(lambda: events.append("future"))
    port.send_port.send("msg-2")
    loop.call_soon(events.append, "soon-2")
    await fut
    await turns()
    port.close()
    assert events == ["soon-1", "msg-1", "future", "msg-2", "soon-2"]


async def test_microtasks_drain_after_each_handler_same_thread() -> None:
    events: list[Any] = []
    done = asyncio.get_running_loop().create_future()

    def handler(m: Any) -> None:
        events.append(("h", m))
        schedule_microtask(lambda: (events.append(("mt", m)), schedule_microtask(events.append, ("mt2", m))))
        Timer.run(lambda: events.append(("timer", m)))

    port = RawReceivePort(handler)
    port.send_port.send(1)
    port.send_port.send(2)
    Timer.run(lambda: Timer.run(lambda: Timer.run(lambda: done.set_result(None))))
    await done
    port.close()
    assert events == [
        ("h", 1), ("mt", 1), ("mt2", 1),
        ("h", 2), ("mt", 2), ("mt2", 2),
        ("timer", 1), ("timer", 2),
    ]


async def test_microtasks_drain_after_each_handler_other_thread() -> None:
    # The three messages arrive in one burst in the inbox (the loop is blocked
    # while the thread sends): each is still its own turn.
    events: list[Any] = []
    inbox_done = asyncio.get_running_loop().create_future()

    def handler(m: Any) -> None:
        events.append(("h", m))
        schedule_microtask(events.append, ("mt", m))
        if m == 3:
            inbox_done.set_result(None)

    port = RawReceivePort(handler)
    sender = threading.Thread(target=lambda: [port.send_port.send(i) for i in (1, 2, 3)])
    sender.start()
    sender.join()  # blocks the loop: the burst is queued before any dispatch
    await inbox_done
    port.close()
    assert events == [("h", 1), ("mt", 1), ("h", 2), ("mt", 2), ("h", 3), ("mt", 3)]


async def test_handler_none_drops_messages() -> None:
    events: list[Any] = []
    marker = asyncio.get_running_loop().create_future()
    port = RawReceivePort()
    assert port.handler is None
    port.send_port.send("lost")
    Timer.run(lambda: marker.set_result(None))
    await marker  # "lost" has been dispatched (and dropped) by now
    done = asyncio.get_running_loop().create_future()
    port.handler = lambda m: (events.append(m), done.set_result(None))
    port.send_port.send("kept")
    await done
    port.close()
    assert events == ["kept"]


async def test_handler_none_drops_messages_from_other_thread() -> None:
    port = RawReceivePort()
    sender = threading.Thread(target=port.send_port.send, args=("lost",))
    sender.start()
    sender.join()
    await turns()
    inbox = Inbox()
    # The FIFO of one sender thread across the ports of one isolate: once the
    # later message reached inbox, the first one has been dispatched.
    sender = threading.Thread(target=lambda: (port.send_port.send("lost too"), inbox.send_port.send("probe")))
    sender.start()
    sender.join()
    assert await inbox.next() == "probe"
    events: list[Any] = []
    port.handler = events.append
    port.send_port.send("kept")
    await turns()
    port.close()
    inbox.close()
    assert events == ["kept"]


async def test_handler_replaced_inside_itself() -> None:
    events: list[Any] = []
    done = asyncio.get_running_loop().create_future()
    port = RawReceivePort()

    def first(m: Any) -> None:
        events.append(("first", m))
        port.handler = second

    def second(m: Any) -> None:
        events.append(("second", m))
        if m == 3:
            done.set_result(None)

    port.handler = first
    for i in (1, 2, 3):
        port.send_port.send(i)
    await done
    port.close()
    assert events == [("first", 1), ("second", 2), ("second", 3)]


async def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError):
        RawReceivePort(42)  # type: ignore[arg-type]
    port = RawReceivePort()
    with pytest.raises(TypeError):
        port.handler = "nope"  # type: ignore[assignment]
    port.close()


async def test_close_drops_queued_messages_same_thread() -> None:
    events: list[Any] = []
    marker = asyncio.get_running_loop().create_future()
    port = RawReceivePort()

    def handler(m: Any) -> None:
        events.append(m)
        port.close()

    port.handler = handler
    for i in range(4):
        port.send_port.send(i)
    Timer.run(lambda: marker.set_result(None))  # after the four messages
    await marker
    assert events == [0]
    assert port.is_closed and port.handler is None
    port.send_port.send("after close")  # dropped, never raises
    port.close()  # idempotent
    await turns()
    assert events == [0]


async def test_close_drops_queued_messages_other_thread() -> None:
    events: list[Any] = []
    port = RawReceivePort()
    probe = Inbox()

    def handler(m: Any) -> None:
        events.append(m)
        port.close()

    port.handler = handler

    def send_all() -> None:
        for i in range(100):
            port.send_port.send(i)
        probe.send_port.send("probe")

    sender = threading.Thread(target=send_all)
    sender.start()
    sender.join()
    assert await probe.next() == "probe"
    probe.close()
    assert events == [0]


async def test_close_before_dispatch_drops() -> None:
    events: list[Any] = []
    port = RawReceivePort(events.append)
    port.send_port.send("queued")
    port.close()
    await turns()
    assert events == []


async def test_keep_isolate_alive_property() -> None:
    port = RawReceivePort()
    assert port.keep_isolate_alive is True
    port.keep_isolate_alive = False
    assert port.keep_isolate_alive is False
    port.keep_isolate_alive = True
    assert port.keep_isolate_alive is True
    port.close()
    assert port.keep_isolate_alive is False
    rp = ReceivePort()
    assert rp.keep_isolate_alive is True
    rp.keep_isolate_alive = False
    assert rp.keep_isolate_alive is False
    rp.close()


def _entry_keepalive_false(port: SendPort) -> None:
    # A port that does not keep the isolate alive: the isolate ends although
    # the port is open, and a message sent to it later is dropped.
    own = RawReceivePort(lambda m: port.send(("got", m)))
    own.keep_isolate_alive = False
    port.send(("port", own.send_port))


def _entry_keepalive_true(port: SendPort) -> None:
    own = RawReceivePort()

    def handler(m: Any) -> None:
        port.send(("got", m))
        if m == "quit":
            own.close()

    own.handler = handler
    port.send(("port", own.send_port))


async def test_keep_isolate_alive_false_lets_isolate_end() -> None:
    inbox = Inbox()
    await Isolate.spawn(_entry_keepalive_false, inbox.send_port, on_exit=inbox.send_port)
    messages = await inbox.wait_for(2)
    assert messages[0][0] == "port" and messages[1] is None  # the exit notification
    messages[0][1].send("too late")  # the isolate is gone: dropped silently
    inbox.close()


async def test_keep_isolate_alive_true_keeps_isolate() -> None:
    inbox = Inbox()
    iso = await Isolate.spawn(_entry_keepalive_true, inbox.send_port, on_exit=inbox.send_port)
    kind, child_port = await inbox.next()
    assert kind == "port"
    iso.ping(inbox.send_port, "alive")
    assert await inbox.next() == "alive"
    child_port.send("hello")
    child_port.send("quit")
    assert await inbox.wait_for(5) == [("port", child_port), "alive", ("got", "hello"), ("got", "quit"), None]
    inbox.close()


# --------------------------------------------------------------------------
# ReceivePort


async def test_receive_port_buffers_until_listened_then_one_event_each() -> None:
    events: list[Any] = []
    loop = asyncio.get_running_loop()
    port = ReceivePort()
    for i in range(3):
        port.send_port.send(i)
    marker = loop.create_future()
    Timer.run(lambda: marker.set_result(None))
    await marker  # the three messages are in the port's buffer now
    assert events == []
    done = loop.create_future()

    def on_data(m: Any) -> None:
        events.append(("data", m))
        schedule_microtask(events.append, ("mt", m))
        if m == 4:
            done.set_result(None)

    port.listen(on_data)
    port.send_port.send(3)
    port.send_port.send(4)
    await done
    port.close()
    assert events == [
        ("data", 0), ("mt", 0),
        ("data", 1), ("mt", 1),
        ("data", 2), ("mt", 2),
        ("data", 3), ("mt", 3),
        ("data", 4), ("mt", 4),
    ]


async def test_receive_port_listen_on_data_is_an_event() -> None:
    events: list[Any] = []
    done = asyncio.get_running_loop().create_future()
    port = ReceivePort()

    def on_data(m: Any) -> None:
        events.append(("data", m))
        schedule_microtask(events.append, ("mt", m))

    port.listen(on_data, on_done=lambda: (events.append("done"), done.set_result(None)))
    Timer.run(lambda: events.append("a"))
    port.send_port.send("x")
    Timer.run(lambda: (events.append("b"), port.close()))
    await done
    assert events == ["a", ("data", "x"), ("mt", "x"), "b", "done"]


async def test_receive_port_single_subscription() -> None:
    port = ReceivePort()
    port.listen(lambda m: None)
    with pytest.raises(RuntimeError, match="single-subscription"):
        port.listen(lambda m: None)
    with pytest.raises(RuntimeError, match="single-subscription"):
        port.__aiter__()
    with pytest.raises(RuntimeError, match="single-subscription"):
        await port.first()
    port.close()

    port2 = ReceivePort()
    port2.send_port.send(1)
    assert await port2.first() == 1
    with pytest.raises(RuntimeError, match="single-subscription"):
        port2.listen(lambda m: None)


async def test_receive_port_async_for_ends_on_close() -> None:
    port = ReceivePort()
    for i in range(3):
        port.send_port.send(i)
    Timer.run(port.close)  # after the three messages: they are buffered, then delivered
    received = [m async for m in port]
    assert received == [0, 1, 2]
    assert port.is_closed


async def test_receive_port_async_for_close_from_body() -> None:
    port = ReceivePort()
    sender = threading.Thread(target=lambda: [port.send_port.send(i) for i in range(10)])
    sender.start()
    received = []
    async for m in port:
        received.append(m)
        if m == 9:
            port.close()
    sender.join()
    assert received == list(range(10))


async def test_receive_port_async_for_break_closes_port() -> None:
    port = ReceivePort()
    port.send_port.send("a")
    port.send_port.send("b")
    async for m in port:
        assert m == "a"
        break
    await turns()
    assert port.is_closed


async def test_receive_port_first() -> None:
    port = ReceivePort()
    Timer.run(lambda: port.send_port.send("one"))
    port.send_port.send("zero")
    assert await port.first() == "zero"
    assert port.is_closed
    port.send_port.send("dropped")  # never raises

    closed = ReceivePort()
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        await closed.first()


async def test_receive_port_listen_on_closed_port_calls_on_done() -> None:
    port = ReceivePort()
    port.close()
    events: list[str] = []
    port.listen(events.append, on_done=lambda: events.append("done"))
    assert events == ["done"]


# --------------------------------------------------------------------------
# SendPort from any thread


async def test_send_from_plain_thread_in_order() -> None:
    inbox = Inbox()
    n = 1000
    sender = threading.Thread(target=lambda: [inbox.send_port.send(i) for i in range(n)])
    sender.start()
    assert await inbox.wait_for(n) == list(range(n))
    sender.join()
    inbox.close()


async def test_send_from_thread_keeps_order_across_ports_of_one_isolate() -> None:
    order: list[Any] = []
    done = asyncio.get_running_loop().create_future()
    a = RawReceivePort(lambda m: order.append(("a", m)))
    b = RawReceivePort(lambda m: (order.append(("b", m)), m == "last" and done.set_result(None)))

    def send() -> None:
        for i in range(50):
            (a if i % 2 else b).send_port.send(i)
        b.send_port.send("last")

    sender = threading.Thread(target=send)
    sender.start()
    await done
    sender.join()
    a.close()
    b.close()
    assert order == [("a" if i % 2 else "b", i) for i in range(50)] + [("b", "last")]


async def test_send_from_executor_thread() -> None:
    loop = asyncio.get_running_loop()
    inbox = Inbox()
    sent_from: list[str] = []

    def job(i: int) -> None:
        sent_from.append(threading.current_thread().name)
        inbox.send_port.send(("job", i))

    await loop.run_in_executor(None, job, 1)
    await asyncio.to_thread(job, 2)
    assert await inbox.wait_for(2) == [("job", 1), ("job", 2)]
    assert threading.current_thread().name not in sent_from
    inbox.close()


async def test_send_after_close_from_other_thread_never_raises() -> None:
    port = RawReceivePort(lambda m: None)
    port.close()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for i in range(100):
                port.send_port.send(i)
        except BaseException as exc:  # pragma: no cover - the failure case
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    sender.join()
    assert errors == []


# --------------------------------------------------------------------------
# SendPort identity, Capability


async def test_send_port_hashable_and_equal_by_port() -> None:
    inbox = Inbox()
    other = RawReceivePort()
    sp = inbox.send_port
    assert sp == inbox.port.send_port
    assert hash(sp) == hash(inbox.port.send_port)
    assert sp != other.send_port
    assert sp != "not a port"
    table = {sp: "inbox", other.send_port: "other"}
    inbox.send_port.send([sp, other.send_port])
    received_sp, received_other = await inbox.next()
    assert received_sp == sp and hash(received_sp) == hash(sp)
    assert table[received_sp] == "inbox" and table[received_other] == "other"
    assert {sp, received_sp, inbox.send_port} == {sp}
    with pytest.raises(TypeError):
        SendPort()
    other.close()
    inbox.close()


async def test_native_port_is_an_int() -> None:
    inbox = Inbox()
    other = RawReceivePort()
    number = inbox.send_port.native_port
    assert type(number) is int
    assert number == inbox.send_port.native_port
    assert number != other.send_port.native_port
    inbox.send_port.send(inbox.send_port)
    received = await inbox.next()
    assert received.native_port == number
    other.close()
    inbox.close()


async def test_capability_equality_after_sending() -> None:
    inbox = Inbox()
    cap, other = Capability(), Capability()
    assert cap == cap and cap != other and cap != "cap"
    inbox.send_port.send({"cap": cap, "caps": [cap, other]})
    received = await inbox.next()
    assert received["cap"] == cap and hash(received["cap"]) == hash(cap)
    assert received["cap"] is cap  # shared as it is
    assert received["caps"] == [cap, other]
    inbox.close()


def _echo_entry(port: SendPort) -> None:
    # Sends its own port, then echoes every message back as it received it.
    own = RawReceivePort()

    def handler(m: Any) -> None:
        if m == "quit":
            own.close()
        else:
            port.send(m)

    own.handler = handler
    port.send(own.send_port)


async def test_capability_and_send_port_equality_across_isolates() -> None:
    inbox = Inbox()
    await Isolate.spawn(_echo_entry, inbox.send_port)
    child = await inbox.next()
    cap = Capability()
    child.send([cap, inbox.send_port, child])
    back = await inbox.next()
    assert back == [cap, inbox.send_port, child]
    assert back[0] is cap
    assert {back[1]: 1}[inbox.send_port] == 1
    child.send("quit")
    inbox.close()


# --------------------------------------------------------------------------
# TransferableTypedData


async def test_transferable_typed_data_is_transferred() -> None:
    inbox = Inbox()
    ttd = TransferableTypedData(b"abc", bytearray(b"def"), memoryview(b"ghi"))
    inbox.send_port.send(ttd)
    received = await inbox.next()
    assert received is ttd
    view = received.materialize()
    assert isinstance(view, memoryview) and bytes(view) == b"abcdefghi"
    view[0] = ord("A")  # writable, and the receiver's own bytes
    assert bytes(view[:3]) == b"Abc"
    with pytest.raises(ValueError):
        received.materialize()
    inbox.close()


async def test_transferable_typed_data_twice_in_one_message() -> None:
    inbox = Inbox()
    ttd = TransferableTypedData(b"xyz")
    inbox.send_port.send([ttd, ttd])
    first, second = await inbox.next()
    assert first is ttd and second is ttd
    assert bytes(first.materialize()) == b"xyz"
    with pytest.raises(ValueError):
        second.materialize()
    inbox.close()


def _materialize_entry(message: tuple[SendPort, TransferableTypedData]) -> None:
    port, ttd = message
    port.send((ttd, bytes(ttd.materialize())))


async def test_transferable_typed_data_materialized_in_other_isolate() -> None:
    inbox = Inbox()
    ttd = TransferableTypedData(b"payload" * 1000)
    await Isolate.spawn(_materialize_entry, (inbox.send_port, ttd))
    back, data = await inbox.next()
    assert back is ttd
    assert data == b"payload" * 1000
    with pytest.raises(ValueError):
        ttd.materialize()
    inbox.close()


# --------------------------------------------------------------------------
# The message rules end to end, between two isolates

SHARED_STR = "".join(["shared ", "string ", "built at run time"])
SHARED_BYTES = bytes(range(200))
SHARED_TUPLE = (1, 2.5, "three", (4, None), frozenset({5, 6}))
SHARED_BIG_INT = 10**40 + 7
MUTABLE_LIST = [1, [2, 3], {"k": "v"}]
MUTABLE_DICT = {"a": [1, 2], "b": {3, 4}}


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


def _shared_function() -> str:
    return "f"


def _identity_entry(message: tuple[SendPort, dict[str, Any]]) -> None:
    """Checks, in the child, what arrived shared and what copied; reports back."""
    port, m = message
    point = m["point"]
    report = {
        "str is": m["str"] is SHARED_STR,
        "bytes is": m["bytes"] is SHARED_BYTES,
        "tuple is": m["tuple"] is SHARED_TUPLE,
        "int is": m["int"] is SHARED_BIG_INT,
        "function is": m["function"] is _shared_function,
        "class is": m["class"] is Point,
        "module is": m["module"] is types,
        "port is": m["port"] is port,
        "list is not": m["list"] is not MUTABLE_LIST and m["list"] == MUTABLE_LIST,
        "inner list copied": m["list"][1] is not MUTABLE_LIST[1],
        "dict is not": m["dict"] is not MUTABLE_DICT and m["dict"] == MUTABLE_DICT,
        "point copied": type(point) is Point and (point.x, point.y) == (1, 2),
        "alias kept": m["alias"][0] is m["alias"][1] and m["alias"][0] == [7],
        "cycle kept": m["cycle"][0] is m["cycle"],
    }
    # Mutating the copy does not touch the sender's objects.
    m["list"].append("child")
    port.send(report)
    port.send(m["list"])


async def test_message_rules_between_isolates() -> None:
    inbox = Inbox()
    alias = [7]
    cycle: list[Any] = []
    cycle.append(cycle)
    point = Point(1, 2)
    message = {
        "str": SHARED_STR,
        "bytes": SHARED_BYTES,
        "tuple": SHARED_TUPLE,
        "int": SHARED_BIG_INT,
        "function": _shared_function,
        "class": Point,
        "module": types,
        "port": inbox.send_port,
        "list": MUTABLE_LIST,
        "dict": MUTABLE_DICT,
        "point": point,
        "alias": [alias, alias],
        "cycle": cycle,
    }
    await Isolate.spawn(_identity_entry, (inbox.send_port, message))
    report, child_list = await inbox.wait_for(2)
    assert report == {key: True for key in report}, report
    assert MUTABLE_LIST == [1, [2, 3], {"k": "v"}]
    assert child_list == [1, [2, 3], {"k": "v"}, "child"] and child_list is not MUTABLE_LIST
    inbox.close()


async def test_mutation_after_send_does_not_change_message() -> None:
    inbox = Inbox()
    payload = {"items": [1, 2]}
    inbox.send_port.send(payload)
    payload["items"].append(3)
    received = await inbox.next()
    assert received == {"items": [1, 2]} and received is not payload
    inbox.close()


async def test_unsendable_message_raises_with_path_and_delivers_nothing() -> None:
    inbox = Inbox()
    await Isolate.spawn(_echo_entry, inbox.send_port)
    child = await inbox.next()
    lock = threading.Lock()
    with pytest.raises(TypeError) as info:
        child.send([1, 2, {"key": lock}])
    text = str(info.value)
    assert "message[2]['key']" in text and "lock" in text
    with pytest.raises(TypeError, match=r"^message is a .*Future"):
        child.send(asyncio.get_running_loop().create_future())
    with pytest.raises(TypeError, match=r"^message\[1\] is a generator"):
        child.send((1, (x for x in ())))
    rp = ReceivePort()
    with pytest.raises(TypeError, match=r"message\[0\].*ReceivePort"):
        child.send([rp])
    rp.close()
    raw = RawReceivePort()
    with pytest.raises(TypeError, match=r"message\.port"):
        inbox.send_port.send(types.SimpleNamespace(port=raw))
    raw.close()
    # Nothing of the refused messages was delivered: the next echo is this one.
    child.send("after")
    assert await inbox.next() == "after"
    assert inbox.messages == [child, "after"]
    child.send("quit")
    inbox.close()
