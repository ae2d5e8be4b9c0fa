"""The event-loop turn: every event is followed by a full microtask drain.

Async tests run on both dartloop backends (``[dartloop-asyncio]``,
``[dartloop-uvloop]``). A "probe" callback appends its name to a log and
schedules a microtask that appends ``name + ".mt"``; the turn rule means the
log is a sequence of ``name, name.mt`` pairs, whatever order the events
arrive in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import threading
from typing import Any

import pytest
from _loop_helpers import assert_each_followed_by_its_microtask

from dartloop import Timer, schedule_microtask


def probe(log: list[Any], name: str) -> None:
    log.append(name)
    schedule_microtask(log.append, f"{name}.mt")


# -- plain events ------------------------------------------------------------


async def test_call_soon_each_event_then_its_microtasks() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []

    def a() -> None:
        log.append("a")
        schedule_microtask(m1)
        schedule_microtask(log.append, "m2")

    def m1() -> None:
        log.append("m1")
        schedule_microtask(m3)  # scheduled by a microtask: same drain, at the tail

    def m3() -> None:
        log.append("m3")
        schedule_microtask(log.append, "m4")

    done = loop.create_future()
    loop.call_soon(a)
    loop.call_soon(probe, log, "b")
    loop.call_soon(done.set_result, None)
    await done
    assert log == ["a", "m1", "m2", "m3", "m4", "b", "b.mt"]


async def test_call_later_and_call_at_due_together() -> None:
    # Three timer handles that expire in the same loop iteration. (Stock
    # asyncio does not order handles with *equal* deadlines, so these differ
    # by a microsecond.)
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    when = loop.time() + 0.01
    loop.call_at(when, probe, log, "at1")
    loop.call_at(when + 1e-6, probe, log, "at2")
    loop.call_at(when + 2e-6, probe, log, "at3")
    loop.call_later(0.02, probe, log, "later")
    loop.call_later(0.03, done.set_result, None)
    await done
    assert log == ["at1", "at1.mt", "at2", "at2.mt", "at3", "at3.mt", "later", "later.mt"]


async def test_call_at_keeps_deadline_order_when_the_clock_ticks_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # uvloop's call_at reads the clock for the delay, and libuv reads it again
    # to start the timer: a millisecond ticking in between put a timer behind
    # one with a later deadline (seen under load). Here the first read lags
    # the second by 2 ms, for at1 only.
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()
    when = loop.time() + 0.02
    real_time = loop.time
    monkeypatch.setattr(loop, "time", lambda: real_time() - 0.002)
    h1 = loop.call_at(when, probe, log, "at1")
    monkeypatch.undo()
    h2 = loop.call_at(when + 1e-6, probe, log, "at2")
    loop.call_at(when + 0.01, done.set_result, None)
    await done
    assert log == ["at1", "at1.mt", "at2", "at2.mt"]
    assert h1.when() <= h2.when() and not h1.cancelled()


async def test_call_soon_threadsafe() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()

    def other_thread() -> None:
        for name in ("t1", "t2", "t3"):
            loop.call_soon_threadsafe(probe, log, name)
        loop.call_soon_threadsafe(done.set_result, None)

    thread = threading.Thread(target=other_thread)
    thread.start()
    await done
    thread.join()
    assert log == ["t1", "t1.mt", "t2", "t2.mt", "t3", "t3.mt"]


async def test_drain_follows_an_event_that_raised(loop_errors: Any) -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    error = ValueError("boom")

    def boom() -> None:
        schedule_microtask(log.append, "after boom")
        raise error

    done = loop.create_future()
    loop.call_soon(boom)
    loop.call_soon(log.append, "next event")
    loop.call_soon(done.set_result, None)
    await done
    assert log == ["after boom", "next event"]
    [context] = loop_errors.take()
    assert context["exception"] is error
    assert context["message"].startswith("Exception in callback")


async def test_microtask_queue_is_empty_when_the_loop_polls() -> None:
    # A reader is ready before the chain starts; the whole chain of 1000
    # microtasks (each scheduling the next) runs before the reader's event.
    loop = asyncio.get_running_loop()
    r, w = socket.socketpair()
    try:
        w.send(b"x")
        seen: list[tuple[int, int]] = []
        count = 0
        done = loop.create_future()

        def link() -> None:
            nonlocal count
            count += 1
            if count < 1000:
                schedule_microtask(link)

        def on_readable() -> None:
            loop.remove_reader(r)
            seen.append((count, len(loop._microtasks)))  # type: ignore[attr-defined]
            done.set_result(None)

        loop.add_reader(r, on_readable)
        schedule_microtask(link)
        await done
        assert seen == [(1000, 0)]
    finally:
        r.close()
        w.close()


# -- I/O callbacks -------------------------------------------------------------


async def test_add_reader_and_add_writer_callbacks() -> None:
    loop = asyncio.get_running_loop()
    r1, w1 = socket.socketpair()
    r2, w2 = socket.socketpair()
    log: list[str] = []
    done = loop.create_future()
    try:
        w1.send(b"1")
        w2.send(b"2")

        def reader(sock: socket.socket, name: str) -> None:
            sock.recv(1)
            loop.remove_reader(sock)
            probe(log, name)
            schedule_microtask(finish_if_all_ran)

        def writer() -> None:
            loop.remove_writer(w1)
            probe(log, "writer")
            schedule_microtask(finish_if_all_ran)

        def finish_if_all_ran() -> None:
            if len(log) == 6:
                done.set_result(None)

        # Three callbacks that are all ready in the same poll.
        loop.add_reader(r1, reader, r1, "reader1")
        loop.add_reader(r2, reader, r2, "reader2")
        loop.add_writer(w1, writer)
        await done
        assert sorted(log[::2]) == ["reader1", "reader2", "writer"]
        assert_each_followed_by_its_microtask(log)
    finally:
        for s in (r1, w1, r2, w2):
            s.close()


class RecordingProtocol(asyncio.Protocol):
    """Logs each callback as ``name:callback`` followed by a microtask."""

    def __init__(self, log: list[str], name: str, eof_future: asyncio.Future[None] | None = None) -> None:
        self.log = log
        self.name = name
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        probe(self.log, f"{self.name}:made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        probe(self.log, f"{self.name}:data")

    def eof_received(self) -> None:
        probe(self.log, f"{self.name}:eof")

    def connection_lost(self, exc: BaseException | None) -> None:
        probe(self.log, f"{self.name}:lost")
        self.lost.set_result(None)


async def test_two_protocols_readable_in_the_same_poll() -> None:
    # Both sockets become readable before the loop polls again; the first
    # data_received's microtask runs before the second data_received.
    loop = asyncio.get_running_loop()
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    log: list[str] = []
    got_both = loop.create_future()

    class P(asyncio.Protocol):
        def __init__(self, name: str) -> None:
            self.name = name

        def data_received(self, data: bytes) -> None:
            log.append(self.name)
            schedule_microtask(log.append, f"{self.name}.mt")
            if len(log) == 3:
                # Only after both: proves nothing ran between data and drain.
                schedule_microtask(got_both.set_result, None)

    ta, _ = await loop.connect_accepted_socket(lambda: P("A"), a)
    tb, _ = await loop.connect_accepted_socket(lambda: P("B"), b)
    try:

        def write_both() -> None:
            a_peer.send(b"a")
            b_peer.send(b"b")

        loop.call_soon(write_both)
        await got_both
        assert log in (["A", "A.mt", "B", "B.mt"], ["B", "B.mt", "A", "A.mt"])
    finally:
        ta.close()
        tb.close()
        a_peer.close()
        b_peer.close()


async def test_tcp_protocol_callbacks() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    server_protocol: asyncio.Future[RecordingProtocol] = loop.create_future()

    def server_factory() -> RecordingProtocol:
        proto = RecordingProtocol(log, "server")
        server_protocol.set_result(proto)
        return proto

    server = await loop.create_server(server_factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, client = await loop.create_connection(lambda: RecordingProtocol(log, "client"), "127.0.0.1", port)
    assert isinstance(client, RecordingProtocol)
    transport.write(b"hello")
    transport.write_eof()
    proto = await server_protocol
    await proto.lost
    await client.lost
    server.close()
    await server.wait_closed()
    assert proto.data == b"hello"
    assert_each_followed_by_its_microtask(log)
    server_events = [e for e in log if e.startswith("server:") and not e.endswith(".mt")]
    assert server_events[0] == "server:made"
    assert server_events[-2:] == ["server:eof", "server:lost"]


async def test_udp_protocol_callbacks() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    received: asyncio.Future[tuple[bytes, Any]] = loop.create_future()

    class Udp(asyncio.DatagramProtocol):
        def __init__(self, name: str) -> None:
            self.name = name

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            probe(log, f"{self.name}:made")

        def datagram_received(self, data: bytes, addr: Any) -> None:
            probe(log, f"{self.name}:datagram")
            schedule_microtask(lambda: received.done() or received.set_result((data, addr)))

    server_t, _ = await loop.create_datagram_endpoint(lambda: Udp("server"), local_addr=("127.0.0.1", 0))
    addr = server_t.get_extra_info("sockname")
    client_t, _ = await loop.create_datagram_endpoint(lambda: Udp("client"), remote_addr=addr)
    try:
        client_t.sendto(b"ping")
        data, _ = await received
        assert data == b"ping"
        assert_each_followed_by_its_microtask(log)
        assert "server:datagram" in log
    finally:
        client_t.close()
        server_t.close()


async def test_unix_socket_protocol_callbacks() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    server_protocol: asyncio.Future[RecordingProtocol] = loop.create_future()

    def server_factory() -> RecordingProtocol:
        proto = RecordingProtocol(log, "server")
        server_protocol.set_result(proto)
        return proto

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sock")
        server = await loop.create_unix_server(server_factory, path)
        transport, client = await loop.create_unix_connection(lambda: RecordingProtocol(log, "client"), path)
        transport.write(b"over unix")
        transport.write_eof()
        proto = await server_protocol
        await proto.lost
        proto.transport.close()  # type: ignore[attr-defined]
        await client.lost
        server.close()
        await server.wait_closed()
    assert proto.data == b"over unix"
    assert_each_followed_by_its_microtask(log)


async def test_pipe_protocol_callbacks() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    rfd, wfd = os.pipe()
    read_t, reader = await loop.connect_read_pipe(lambda: RecordingProtocol(log, "read"), os.fdopen(rfd, "rb", 0))
    write_t, writer = await loop.connect_write_pipe(lambda: RecordingProtocol(log, "write"), os.fdopen(wfd, "wb", 0))
    write_t.write(b"through the pipe")
    write_t.close()
    await reader.lost
    await writer.lost
    read_t.close()
    assert reader.data == b"through the pipe"
    assert_each_followed_by_its_microtask(log)
    read_events = [e for e in log if e.startswith("read:") and not e.endswith(".mt")]
    assert read_events[0] == "read:made"
    assert read_events[-2:] == ["read:eof", "read:lost"]


async def test_subprocess_protocol_callbacks() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    exited = loop.create_future()
    stdout_closed = loop.create_future()
    out: list[bytes] = []

    class Proc(asyncio.SubprocessProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            probe(log, "made")

        def pipe_data_received(self, fd: int, data: bytes) -> None:
            out.append(data)
            probe(log, f"data{fd}")

        def pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
            probe(log, f"pipe_lost{fd}")
            if fd == 1:
                stdout_closed.set_result(None)

        def process_exited(self) -> None:
            probe(log, "exited")
            exited.set_result(None)

        def connection_lost(self, exc: BaseException | None) -> None:
            probe(log, "lost")

    transport, _ = await loop.subprocess_exec(
        Proc, sys.executable, "-c", "print('child')", stdin=None, stdout=asyncio.subprocess.PIPE, stderr=None
    )
    await exited
    await stdout_closed
    assert transport.get_returncode() == 0
    transport.close()
    assert b"".join(out) == b"child\n"
    assert_each_followed_by_its_microtask(log)
    assert log[0] == "made"


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
async def test_signal_handler() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    done = loop.create_future()

    def on_signal() -> None:
        probe(log, "signal")
        loop.call_soon(done.set_result, None)

    loop.add_signal_handler(signal.SIGUSR1, on_signal)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        await done
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert log == ["signal", "signal.mt"]


# -- uncaught errors in the root isolate -------------------------------------


async def test_exception_in_microtask_goes_to_handler_and_drain_continues(loop_errors: Any) -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    error = KeyError("in microtask")

    def bad() -> None:
        log.append("bad")
        raise error

    def event() -> None:
        schedule_microtask(bad)
        schedule_microtask(log.append, "m2")

    done = loop.create_future()
    loop.call_soon(event)
    loop.call_soon(log.append, "next event")
    loop.call_soon(done.set_result, None)
    await done
    assert log == ["bad", "m2", "next event"]
    [context] = loop_errors.take()
    assert context["exception"] is error
    assert context["message"].startswith("Exception in microtask")
    assert "bad" in context["message"]


async def test_exception_in_timer_callback_goes_to_handler(loop_errors: Any) -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    error = RuntimeError("in timer")

    def bad() -> None:
        schedule_microtask(log.append, "bad.mt")
        raise error

    done = loop.create_future()
    Timer.run(bad)
    Timer.run(lambda: log.append("next timer"))
    Timer(0.001, lambda: done.set_result(None))
    await done
    assert log == ["bad.mt", "next timer"]
    [context] = loop_errors.take()
    assert context["exception"] is error
    assert context["message"].startswith("Exception in callback")


async def test_exception_in_call_soon_callback_with_more_microtasks(loop_errors: Any) -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    e1, e2 = ValueError("one"), ValueError("two")

    def raise_(exc: BaseException) -> None:
        raise exc

    def event() -> None:
        schedule_microtask(raise_, e2)
        schedule_microtask(log.append, "survivor")
        raise e1

    done = loop.create_future()
    loop.call_soon(event)
    loop.call_soon(done.set_result, None)
    await done
    assert log == ["survivor"]
    assert [c["exception"] for c in loop_errors.take()] == [e1, e2]
