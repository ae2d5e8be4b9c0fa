"""Nothing lost, nothing leaked: isolates and ports under load.

Sized to finish in seconds per backend on a loaded 2-core machine, but real:
a thousand isolate lifetimes, 800,000 messages from 8 threads, senders
hammering a port while its isolate ends. Every wait is for an event (a
message, a thread's end); there are no sleeps and no timing assertions.
Every ``async def`` test runs on both backends (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from _isolate_helpers import Inbox, isolate_threads, join_isolate_threads, open_fds

from dartloop import Isolate, RawReceivePort, SendPort


def _noop() -> None:
    return None


def _exit_entry(port: SendPort) -> None:
    port.send("ran")


async def test_thousand_isolate_run_cycles_leak_nothing() -> None:
    # One warm-up cycle: imports and caches made once per process are not leaks.
    await Isolate.run(_noop)
    threads, fds = threading.active_count(), open_fds()
    for i in range(1000):
        assert await Isolate.run(abs, -i) == i
    assert threading.active_count() == threads
    assert open_fds() == fds


async def test_spawn_exit_cycles_leak_nothing() -> None:
    await Isolate.run(_noop)
    inbox = Inbox()
    threads, fds = threading.active_count(), open_fds()
    for i in range(300):
        await Isolate.spawn(_exit_entry, inbox.send_port, on_exit=inbox.send_port, debug_name="cycle")
        assert await inbox.next() == "ran"
        assert await inbox.next() is None  # the exit notification: the isolate's last act
        join_isolate_threads("cycle")
    assert isolate_threads("cycle") == []
    inbox.close()
    assert threading.active_count() == threads
    assert open_fds() == fds


async def test_many_isolates_at_once_leak_nothing() -> None:
    await Isolate.run(_noop)
    threads, fds = threading.active_count(), open_fds()
    for _ in range(5):
        results = await asyncio.gather(*(Isolate.run(pow, i, 2) for i in range(40)))
        assert results == [i * i for i in range(40)]
    assert threading.active_count() == threads
    assert open_fds() == fds


SENDERS = 8
PER_SENDER = 100_000


async def test_eight_threads_times_100k_messages_complete_and_in_order() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    expected = [0] * SENDERS
    out_of_order: list[tuple[int, int, int]] = []
    total = SENDERS * PER_SENDER
    received = 0

    def handler(message: int) -> None:
        nonlocal received
        sender, seq = message >> 32, message & 0xFFFFFFFF
        if expected[sender] != seq:
            out_of_order.append((sender, seq, expected[sender]))
        expected[sender] = seq + 1
        received += 1
        if received == total:
            done.set_result(None)

    port = RawReceivePort(handler)
    send = port.send_port.send
    errors: list[BaseException] = []

    def sender(index: int) -> None:
        base = index << 32
        try:
            for seq in range(PER_SENDER):
                send(base | seq)
        except BaseException as exc:  # pragma: no cover - the failure case
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(SENDERS)]
    for t in threads:
        t.start()
    await done
    for t in threads:
        t.join()
    port.close()
    assert errors == []
    assert out_of_order == []
    assert expected == [PER_SENDER] * SENDERS
    assert received == total


def _counting_entry(message: tuple[SendPort, int]) -> None:
    """Counts messages in order per sender; ends (closes its port) after ``stop_after``."""
    port, stop_after = message
    expected: dict[int, int] = {}
    count = 0
    own = RawReceivePort()

    def handler(m: tuple[int, int]) -> None:
        nonlocal count
        sender, seq = m
        if expected.get(sender, 0) > seq:
            port.send(("out of order", sender, seq))
        expected[sender] = seq + 1
        count += 1
        if count == stop_after:
            own.close()  # the isolate ends while senders keep sending

    own.handler = handler
    port.send(own.send_port)


async def test_sending_while_the_receiver_ends_never_raises() -> None:
    for round_ in range(3):
        inbox = Inbox()
        await Isolate.spawn(_counting_entry, (inbox.send_port, 20_000), on_exit=inbox.send_port, debug_name="ending")
        child = await inbox.next()
        stop = threading.Event()
        errors: list[BaseException] = []
        sent = [0] * 4

        def hammer(index: int) -> None:
            seq = 0
            try:
                # Until the isolate is known dead, then a burst more into the void.
                while not stop.is_set():
                    child.send((index, seq))
                    seq += 1
                for _ in range(5_000):
                    child.send((index, seq))
                    seq += 1
            except BaseException as exc:  # pragma: no cover - the failure case
                errors.append(exc)
            sent[index] = seq

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert await inbox.next() is None  # the exit notification
        stop.set()
        for t in threads:
            t.join()
        join_isolate_threads("ending")
        assert errors == []
        assert inbox.messages == [child, None]  # and nothing out of order
        assert sum(sent) > 20_000
        inbox.close()


def _busy_receiver_entry(port: SendPort) -> None:
    own = RawReceivePort(lambda m: None)
    port.send(own.send_port)


async def test_kill_immediate_while_senders_hammer() -> None:
    for _ in range(3):
        inbox = Inbox()
        iso = await Isolate.spawn(_busy_receiver_entry, inbox.send_port, on_exit=inbox.send_port, debug_name="killed")
        child = await inbox.next()
        stop = threading.Event()
        errors: list[BaseException] = []
        started = threading.Barrier(5)

        def hammer() -> None:
            try:
                started.wait()
                while not stop.is_set():
                    child.send([1, 2, 3])
                for _ in range(2_000):
                    child.send([1, 2, 3])
            except BaseException as exc:  # pragma: no cover - the failure case
                errors.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        await asyncio.to_thread(started.wait)
        iso.kill(priority=Isolate.IMMEDIATE)
        assert await inbox.next() is None
        stop.set()
        for t in threads:
            t.join()
        join_isolate_threads("killed")
        assert errors == []
        inbox.close()


async def test_messages_to_dead_isolate_dropped_and_nothing_else() -> None:
    inbox = Inbox()
    await Isolate.spawn(_counting_entry, (inbox.send_port, 1), on_exit=inbox.send_port, debug_name="dead")
    dead_port = await inbox.next()
    dead_port.send((0, 0))  # its one message: the isolate ends
    assert await inbox.next() is None
    join_isolate_threads("dead")

    live_expected = [0] * 4
    live_problems: list[Any] = []
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    per_thread = 20_000
    received = 0

    def live_handler(m: tuple[int, int]) -> None:
        nonlocal received
        sender, seq = m
        if live_expected[sender] != seq:
            live_problems.append(m)
        live_expected[sender] = seq + 1
        received += 1
        if received == 4 * per_thread:
            done.set_result(None)

    live = RawReceivePort(live_handler)
    errors: list[BaseException] = []

    def mixed(index: int) -> None:
        try:
            for seq in range(per_thread):
                dead_port.send((index, seq))
                live.send_port.send((index, seq))
                dead_port.send(["more", "for", "the", "dead"])
        except BaseException as exc:  # pragma: no cover - the failure case
            errors.append(exc)

    threads = [threading.Thread(target=mixed, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    await done
    for t in threads:
        t.join()
    live.close()
    assert errors == []
    assert live_problems == []
    assert live_expected == [per_thread] * 4
    assert inbox.messages == [dead_port, None]
    inbox.close()


async def test_many_isolates_echo_everything_in_order() -> None:
    isolates, per_isolate = 16, 2_000
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    all_ports = loop.create_future()
    expected = [0] * isolates
    problems: list[Any] = []
    ports: dict[int, SendPort] = {}
    exits = 0
    received = 0

    def handler(m: Any) -> None:
        nonlocal exits, received
        if m is None:
            exits += 1
        elif isinstance(m, tuple) and m[0] == "port":
            ports[m[1]] = m[2]
            if len(ports) == isolates:
                all_ports.set_result(None)
        else:
            index, seq = m
            if expected[index] != seq:
                problems.append(m)
            expected[index] = seq + 1
            received += 1
        if exits == isolates and not done.done():
            done.set_result(None)

    port = RawReceivePort(handler)

    def entry(message: tuple[SendPort, int]) -> None:
        reply, index = message
        own = RawReceivePort()

        def child_handler(m: Any) -> None:
            if m is None:
                own.close()
            else:
                reply.send(m)

        own.handler = child_handler
        reply.send(("port", index, own.send_port))

    for i in range(isolates):
        await Isolate.spawn(entry, (port.send_port, i), on_exit=port.send_port, debug_name="echo-many")
    await all_ports
    for seq in range(per_isolate):
        for i in range(isolates):
            ports[i].send((i, seq))
    for i in range(isolates):
        ports[i].send(None)
    await done
    join_isolate_threads("echo-many")
    port.close()
    assert problems == []
    assert received == isolates * per_isolate
    assert expected == [per_isolate] * isolates
