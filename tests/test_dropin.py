"""dartloop as a drop-in asyncio loop.

Each scenario runs on stock asyncio, stock uvloop and both dartloop backends
(``run_everywhere``) and the results must be equal: dartloop changes when
microtasks run, nothing else an asyncio program can observe.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import pytest
from _loop_helpers import (
    DART_BACKENDS,
    DART_KINDS,
    LOOP_KINDS,
    PY312,
    assert_all_equal,
    busy_wait,
    run_everywhere,
    run_on,
)

import dartloop

IN_MAIN_THREAD = threading.current_thread() is threading.main_thread()


def test_call_soon_call_later_order() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done = loop.create_future()
        loop.call_later(0.02, log.append, "later 20ms")
        loop.call_later(0.01, log.append, "later 10ms")
        loop.call_at(loop.time() + 0.015, log.append, "at 15ms")
        for i in range(5):
            loop.call_soon(log.append, f"soon {i}")
        h = loop.call_soon(log.append, "cancelled")
        h.cancel()
        assert h.cancelled()

        def nested() -> None:
            log.append("nested")
            loop.call_soon(log.append, "queued by nested")

        loop.call_soon(nested)
        loop.call_soon(log.append, "after nested")
        loop.call_later(0.03, done.set_result, None)
        await done
        return log

    assert assert_all_equal(run_everywhere(main)) == [
        *(f"soon {i}" for i in range(5)),
        "nested",
        "after nested",
        "queued by nested",
        "later 10ms",
        "at 15ms",
        "later 20ms",
    ]


def test_tasks_and_gather_order() -> None:
    async def main() -> list[str]:
        log: list[str] = []

        async def worker(name: str, hops: int) -> str:
            for i in range(hops):
                log.append(f"{name}{i}")
                await asyncio.sleep(0)
            return name

        results = await asyncio.gather(worker("a", 3), worker("b", 2), worker("c", 1))
        log.extend(results)
        return log

    assert assert_all_equal(run_everywhere(main)) == ["a0", "b0", "c0", "a1", "b1", "a2", "a", "b", "c"]


def test_stream_echo() -> None:
    async def main() -> list[bytes]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                writer.write(line.upper())
                await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = []
        for line in (b"hello\n", b"dart\n", b"x" * 60_000 + b"\n"):
            writer.write(line)
            await writer.drain()
            got.append(await reader.readline())
        writer.write_eof()
        got.append(await reader.read())
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    assert assert_all_equal(run_everywhere(main)) == [b"HELLO\n", b"DART\n", b"X" * 60_000 + b"\n", b""]


def test_create_server_create_connection() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        events: list[Any] = []
        closed = loop.create_future()
        server_lost = loop.create_future()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                events.append("server made")

            def data_received(self, data: bytes) -> None:
                self.transport.write(data[::-1])  # type: ignore[attr-defined]

            def eof_received(self) -> None:
                events.append("server eof")
                return None  # close

            def connection_lost(self, exc: BaseException | None) -> None:
                events.append(("server lost", exc))
                server_lost.set_result(None)

        class Client(asyncio.Protocol):
            def __init__(self) -> None:
                self.data = b""

            def data_received(self, data: bytes) -> None:
                self.data += data
                if self.data == b"olleh":
                    self.transport.write_eof()  # type: ignore[attr-defined]

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def connection_lost(self, exc: BaseException | None) -> None:
                closed.set_result(self.data)

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        assert server.is_serving()
        port = server.sockets[0].getsockname()[1]
        transport, proto = await loop.create_connection(Client, "127.0.0.1", port)
        assert isinstance(proto, Client)
        assert transport.get_protocol() is not None
        transport.write(b"hello")
        events.append(await closed)
        server.close()
        await server.wait_closed()
        await server_lost
        return sorted(map(repr, events))

    assert_all_equal(run_everywhere(main))


def test_udp_echo() -> None:
    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        class Server(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.transport.sendto(data * 2, addr)  # type: ignore[attr-defined]

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                answers.put_nowait(data)

        server_t, _ = await loop.create_datagram_endpoint(Server, local_addr=("127.0.0.1", 0))
        client_t, _ = await loop.create_datagram_endpoint(Client, remote_addr=server_t.get_extra_info("sockname"))
        got = []
        for msg in (b"a", b"bc", b"def"):
            client_t.sendto(msg)
            got.append(await answers.get())
        client_t.close()
        server_t.close()
        return got

    assert assert_all_equal(run_everywhere(main)) == [b"aa", b"bcbc", b"defdef"]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX datagram sockets")
def test_aborting_a_udp_transport_with_a_queued_datagram() -> None:
    """No error reaches the handler, as on asyncio (stock uvloop reports two,
    MagicStack/uvloop#771; dartloop's uvloop backend keeps them out)."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        events: list[str] = []
        with tempfile.TemporaryDirectory() as d, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as peer:
            peer.bind(os.path.join(d, "peer"))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(os.path.join(d, "local"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)
            sock.connect(os.path.join(d, "peer"))
            sock.setblocking(False)
            try:  # fill the send buffer: the transport must queue what comes next
                while True:
                    sock.send(b"\0" * 64)
            except BlockingIOError:
                pass
            lost = loop.create_future()

            class Proto(asyncio.DatagramProtocol):
                def pause_writing(self) -> None:
                    events.append("pause")

                def resume_writing(self) -> None:
                    events.append("resume")

                def connection_lost(self, exc: Exception | None) -> None:
                    events.append(f"lost {exc!r}")
                    lost.set_result(None)

            transport, _ = await loop.create_datagram_endpoint(Proto, sock=sock)
            transport.set_write_buffer_limits(high=1)
            transport.sendto(b"\0" * 64)
            await asyncio.sleep(0)
            transport.abort()
            await lost
            for _ in range(5):  # let any late report of the cancelled send come
                await asyncio.sleep(0)
        return events

    kinds = tuple(k for k in LOOP_KINDS if k != "uvloop")
    assert assert_all_equal(run_everywhere(main, kinds)) == ["pause", "lost None"]


def test_unix_streams() -> None:
    async def main() -> list[bytes]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()
            writer.write(b"got " + data)
            writer.close()
            await writer.wait_closed()

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "s")
            server = await asyncio.start_unix_server(handle, path)
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"unix data")
            writer.write_eof()
            answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            server.close()
            await server.wait_closed()
        return [answer]

    assert assert_all_equal(run_everywhere(main)) == [b"got unix data"]


def test_subprocess_exec_with_pipes() -> None:
    async def main() -> list[Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; data = sys.stdin.read(); print(data.upper()); print('err', file=sys.stderr); sys.exit(3)",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(b"to the child")
        rc = await proc.wait()
        shell = await asyncio.create_subprocess_shell("exit 5")
        return [out, err, rc, proc.returncode, await shell.wait()]

    assert assert_all_equal(run_everywhere(main)) == [b"TO THE CHILD\n", b"err\n", 3, 3, 5]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
@pytest.mark.parametrize("pipe", ["pipe2", "socketpair"])
@pytest.mark.parametrize("path", ["pure", "c"])
def test_the_asyncio_backend_self_pipe_works_as_stocks(path: str, pipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # dartloop's self-pipe is a pipe (see _AsyncioDartLoop._make_self_pipe),
    # or asyncio's socket pair where there is no os.pipe2: as many
    # descriptors as stock asyncio's, both ends non-blocking and
    # close-on-exec, all released by close(), other threads wake the loop
    # through it, and a write after close() is a no-op.
    from dartloop import _loop

    if pipe == "socketpair":
        monkeypatch.setattr(_loop, "_PIPE_FLAGS", None)
    if path == "pure":
        monkeypatch.setattr(_loop, "SPEEDUPS", None)
    elif _loop.SPEEDUPS is None:
        pytest.skip("dartloop._speedups is not built")

    def probe(factory: Callable[[], asyncio.AbstractEventLoop]) -> list[Any]:
        before = len(os.listdir("/proc/self/fd"))
        loop = factory()
        opened = len(os.listdir("/proc/self/fd")) - before
        fds = [loop._ssock.fileno(), loop._csock.fileno()]  # type: ignore[attr-defined]
        modes = [(os.get_blocking(fd), os.get_inheritable(fd)) for fd in fds]

        async def woken() -> str:
            fut = loop.create_future()
            threading.Thread(target=loop.call_soon_threadsafe, args=(fut.set_result, "woken")).start()
            return await fut

        result = loop.run_until_complete(woken())
        loop.close()
        loop._write_to_self()  # type: ignore[attr-defined]
        return [opened, modes, result, len(os.listdir("/proc/self/fd")) - before, loop._ssock, loop._csock]  # type: ignore[attr-defined]

    stock = probe(asyncio.SelectorEventLoop)
    loop = dartloop.new_event_loop(backend="asyncio")
    assert type(loop._ssock).__name__ == ("FileIO" if pipe == "pipe2" else "socket")  # type: ignore[attr-defined]
    loop.close()
    ours = probe(functools.partial(dartloop.new_event_loop, backend="asyncio"))
    assert ours == stock == [3, [(False, False), (False, False)], "woken", 0, None, None]


@pytest.mark.parametrize("pipe", ["pipe2", "socketpair"])
@pytest.mark.parametrize("backlog", [1, 4095, 4096, 10_000])
def test_the_self_pipe_is_emptied_also_beyond_one_read(backlog: int, pipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # However many wakeup bytes are queued (one read takes 4096), all are
    # read, as by stock asyncio, and each reaches _process_self_data (signals).
    from dartloop import _loop

    if pipe == "socketpair":
        monkeypatch.setattr(_loop, "_PIPE_FLAGS", None)

    def left_over(factory: Callable[[], asyncio.AbstractEventLoop]) -> list[Any]:
        loop = factory()
        seen: list[bytes] = []
        process = loop._process_self_data  # type: ignore[attr-defined]

        def record(data: bytes) -> None:
            seen.append(data)
            process(data)

        loop._process_self_data = record  # type: ignore[attr-defined]
        try:
            os.write(loop._csock.fileno(), b"\0" * backlog)  # type: ignore[attr-defined]

            async def turns() -> None:
                for _ in range(5):
                    await asyncio.sleep(0)

            loop.run_until_complete(turns())
            try:
                rest = len(os.read(loop._ssock.fileno(), 65536))  # type: ignore[attr-defined]
            except BlockingIOError:
                rest = 0
            return [rest, sum(map(len, seen))]
        finally:
            loop.close()

    assert left_over(asyncio.SelectorEventLoop) == left_over(functools.partial(dartloop.new_event_loop, backend="asyncio")) == [0, backlog]


def _readiness_scenario(loop: asyncio.AbstractEventLoop) -> list[Any]:
    # What an I/O turn dispatches, in order: several descriptors ready in one
    # poll, a descriptor readable and writable in the same poll (reader
    # first), a cancelled reader handle (unregistered by the turn that
    # finds it), and a hang-up, which wakes the reader.
    events: list[Any] = []
    pairs = [socket.socketpair() for _ in range(3)]
    for a, _ in pairs:
        a.setblocking(False)
    a0, a1, a2 = (a for a, _ in pairs)
    b0, b1, b2 = (b for _, b in pairs)
    try:

        async def main() -> None:
            waiting: list[Any] = []

            def record(event: Any) -> None:
                events.append(event)
                if waiting and len(events) >= waiting[0][0]:
                    waiting.pop()[1].set_result(None)

            async def until(count: int) -> None:
                fut = loop.create_future()
                waiting.append((count, fut))
                await fut

            def on_read(i: int, sock: socket.socket) -> None:
                data = sock.recv(16)
                if not data:  # hung up: readable for good
                    loop.remove_reader(sock)
                record(("read", i, data))

            def on_write() -> None:
                loop.remove_writer(a0)
                record(("write", 0))

            for i, a in enumerate((a0, a1, a2)):
                loop.add_reader(a, on_read, i, a)
            for i, b in enumerate((b0, b1, b2)):
                b.send(b"x%d" % i)
            await until(3)
            b0.send(b"again")
            loop.add_writer(a0, on_write)
            await until(5)
            loop._selector.get_key(a1.fileno()).data[0].cancel()  # type: ignore[attr-defined]
            b1.send(b"lost")
            b2.send(b"last")
            await until(6)
            events.append(("a1 registered", a1.fileno() in loop._selector.get_map()))  # type: ignore[attr-defined]
            b2.close()
            await until(8)
            b0.send(b"end")
            await until(9)
            events.append(("a2 registered", a2.fileno() in loop._selector.get_map()))  # type: ignore[attr-defined]
            loop.remove_reader(a0)

        loop.run_until_complete(main())
        return events
    finally:
        loop.close()
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("selector", ["epoll", "poll", "epoll-subclass", "own-process-events"])
@pytest.mark.parametrize("path", ["pure", "c"])
def test_the_asyncio_backend_turn_dispatches_io_as_the_selector_loop(path: str, selector: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the stdlib EpollSelector and asyncio's _process_events the turn
    # polls epoll itself (see _AsyncioDartLoop._run_once); with any other
    # selector, or a subclass that has its own _process_events, it goes
    # through select() and _process_events(). Either way it dispatches what
    # stock asyncio's loop with the same selector dispatches, in its order.
    import selectors

    from dartloop import _loop

    if not hasattr(selectors, "EpollSelector"):
        pytest.skip("needs epoll")
    if path == "pure":
        monkeypatch.setattr(_loop, "SPEEDUPS", None)
    elif _loop.SPEEDUPS is None:
        pytest.skip("dartloop._speedups is not built")

    class OwnSelector(selectors.EpollSelector):
        pass

    def make_selector() -> selectors.BaseSelector:
        kind = {"poll": selectors.PollSelector, "epoll-subclass": OwnSelector}.get(selector, selectors.EpollSelector)
        return kind()

    processed: list[int] = []
    base = _loop._loop_class("asyncio", False)
    if selector == "own-process-events":

        class Own(base):  # type: ignore[valid-type,misc]
            def _process_events(self, event_list: list[Any]) -> None:
                processed.append(len(event_list))
                super()._process_events(event_list)

        base = Own
    ours = base(make_selector())  # type: ignore[call-arg]
    assert (ours._dart_state._dart_epoll is not None) == (selector == "epoll")  # type: ignore[attr-defined]
    got = _readiness_scenario(ours)
    assert got == _readiness_scenario(asyncio.SelectorEventLoop(make_selector()))
    assert got == [
        ("read", 0, b"x0"),
        ("read", 1, b"x1"),
        ("read", 2, b"x2"),
        ("read", 0, b"again"),
        ("write", 0),
        ("read", 2, b"last"),
        ("a1 registered", False),
        ("read", 2, b""),
        ("read", 0, b"end"),
        ("a2 registered", False),
    ]
    assert (sum(processed) > 0) == (selector == "own-process-events")


@pytest.mark.skipif(not IN_MAIN_THREAD, reason="signals need the main thread")
def test_signal_handlers() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[Any] = asyncio.Queue()
        loop.add_signal_handler(signal.SIGUSR1, got.put_nowait, "usr1")
        loop.add_signal_handler(signal.SIGUSR2, got.put_nowait, "usr2")
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            first = await got.get()
            os.kill(os.getpid(), signal.SIGUSR2)
            second = await got.get()
        finally:
            removed = [loop.remove_signal_handler(signal.SIGUSR1), loop.remove_signal_handler(signal.SIGUSR2)]
        removed.append(loop.remove_signal_handler(signal.SIGUSR1))
        with pytest.raises(TypeError):
            loop.add_signal_handler(signal.SIGUSR1, main)
        return [first, second, removed]

    assert assert_all_equal(run_everywhere(main)) == ["usr1", "usr2", [True, True, False]]


def test_executor_and_to_thread() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        main_thread = threading.get_ident()
        r1 = await loop.run_in_executor(None, lambda: threading.get_ident() != main_thread)
        r2 = await asyncio.to_thread(sum, [1, 2, 3])
        with pytest.raises(ZeroDivisionError):
            await loop.run_in_executor(None, lambda: 1 / 0)
        results = await asyncio.gather(*(asyncio.to_thread(pow, 2, i) for i in range(8)))
        return [r1, r2, results]

    assert assert_all_equal(run_everywhere(main)) == [True, 6, [2**i for i in range(8)]]


def test_cancellation_timeout_wait_for() -> None:
    async def main() -> list[Any]:
        log: list[Any] = []

        async def sleeper() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                log.append("cancelled inside")
                raise

        task = asyncio.get_running_loop().create_task(sleeper())
        await asyncio.sleep(0)
        task.cancel("why")
        try:
            await task
        except asyncio.CancelledError as e:
            log.append(("cancelled", e.args))
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        except TimeoutError:
            log.append("timeout")
        try:
            await asyncio.wait_for(asyncio.sleep(10), 0.01)
        except TimeoutError:
            log.append("wait_for timeout")
        log.append(await asyncio.wait_for(asyncio.sleep(0, "in time"), 10))
        shielded = asyncio.ensure_future(asyncio.sleep(0.01, "shielded"))
        try:
            await asyncio.wait_for(asyncio.shield(shielded), 0.001)
        except TimeoutError:
            log.append(await shielded)
        return log

    assert assert_all_equal(run_everywhere(main)) == [
        "cancelled inside",
        ("cancelled", ("why",)),
        "timeout",
        "wait_for timeout",
        "in time",
        "shielded",
    ]


def test_runner_life_cycle() -> None:
    def scenario(factory: Any) -> list[Any]:
        log: list[Any] = []
        keep: list[Any] = []  # keeps the generator alive until shutdown_asyncgens
        release_job = threading.Event()

        async def agen() -> Any:
            try:
                yield 1
                yield 2
            finally:
                log.append("agen finalized")
                release_job.set()

        async def first() -> int:
            gen = agen()
            keep.append(gen)
            log.append(await gen.__anext__())  # left suspended
            asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: log.append(("error", ctx["message"])))
            return 1

        def blocking_job() -> None:
            # Still running when the runner closes: shutdown_default_executor waits.
            release_job.wait(30)
            log.append("executor job done")

        async def second() -> int:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, blocking_job)  # not awaited
            return 2

        async def leftover() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                log.append("leftover task cancelled")
                raise

        async def third() -> int:
            asyncio.get_running_loop().create_task(leftover())
            await asyncio.sleep(0)
            return 3

        with asyncio.Runner(loop_factory=factory) as runner:
            loop = runner.get_loop()
            log.append(runner.run(first()))
            log.append(runner.run(second()))
            log.append(runner.run(third()))
            log.append(loop.is_closed())
        log.append(loop.is_closed())
        return log

    results = {kind: scenario(factory) for kind, factory in LOOP_KINDS.items()}
    expected = assert_all_equal(results)
    assert expected == [
        1,
        1,
        2,
        3,
        False,
        "leftover task cancelled",
        "agen finalized",
        "executor job done",
        True,
    ]


@pytest.mark.skipif(not PY312, reason="asyncio.run(loop_factory=...) is new in 3.12")
@pytest.mark.parametrize("backend", DART_BACKENDS)
def test_asyncio_run_with_loop_factory(backend: str) -> None:
    async def main() -> tuple[str, bool, bool]:
        loop = asyncio.get_running_loop()
        return loop.backend, loop.strict, isinstance(loop, dartloop.DartEventLoop)  # type: ignore[attr-defined]

    factory = functools.partial(dartloop.new_event_loop, backend=backend)
    assert asyncio.run(main(), loop_factory=factory) == (backend, False, True)  # type: ignore[call-arg]
    assert asyncio.run(main(), loop_factory=dartloop.new_event_loop) == (dartloop.default_backend(), False, True)  # type: ignore[call-arg]


@pytest.mark.parametrize("backend", [None, *DART_BACKENDS])
def test_event_loop_policy(backend: str | None) -> None:
    async def main() -> tuple[str, bool]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, dartloop.DartEventLoop)
        return loop.backend, loop.strict

    old = asyncio.get_event_loop_policy()
    try:
        asyncio.set_event_loop_policy(dartloop.EventLoopPolicy(backend=backend, strict=True))
        assert asyncio.run(main()) == (backend or dartloop.default_backend(), True)
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, dartloop.DartEventLoop)
        finally:
            loop.close()
    finally:
        asyncio.set_event_loop_policy(old)
    with pytest.raises(ValueError):
        dartloop.EventLoopPolicy(backend="nope")


def test_dartloop_run() -> None:
    async def main(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    assert dartloop.run(main(21)) == 42
    for backend in DART_BACKENDS:
        assert dartloop.run(main(1), backend=backend, debug=True) == 2
    with pytest.raises(ValueError, match="coroutine was expected"):
        dartloop.run(main)  # type: ignore[arg-type]

    async def nested() -> None:
        coro = main(1)
        try:
            with pytest.raises(RuntimeError):
                dartloop.run(coro)
        finally:
            coro.close()

    dartloop.run(nested())


def test_contextvars() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done = loop.create_future()
        var.set("main")
        loop.call_soon(lambda: log.append(f"call_soon sees {var.get()}"))
        ctx = contextvars.copy_context()
        ctx.run(var.set, "explicit")
        loop.call_soon(lambda: log.append(f"explicit context sees {var.get()}"), context=ctx)

        def setter() -> None:
            var.set("changed in callback")  # in the callback's own copy

        loop.call_soon(setter)

        async def child() -> str:
            seen = var.get()
            var.set("child")
            return seen

        log.append(f"task sees {await loop.create_task(child())}")
        log.append(f"main still sees {var.get()}")

        def later() -> None:
            log.append(f"call_later sees {var.get()}")
            done.set_result(None)

        loop.call_later(0.001, later)
        await done
        return log

    assert assert_all_equal(run_everywhere(main)) == [
        "call_soon sees main",
        "explicit context sees explicit",
        "task sees main",
        "main still sees main",
        "call_later sees main",
    ]


def test_debug_mode_logs_slow_callbacks(caplog: pytest.LogCaptureFixture) -> None:
    def slow_callback() -> None:
        busy_wait(0.06)

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        assert loop.get_debug()
        loop.slow_callback_duration = 0.05
        done = loop.create_future()
        loop.call_soon(slow_callback)
        loop.call_soon(done.set_result, None)
        await done
        return True

    for kind, factory in LOOP_KINDS.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="asyncio"):
            assert run_on(factory, main, debug=True)
        slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "Executing" in r.getMessage()]
        assert slow, f"{kind}: no slow-callback warning"
        assert any("slow_callback" in m and "took" in m for m in slow), (kind, slow)


def test_debug_mode_call_soon_from_another_thread_raises() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        outcomes: list[str] = []

        def other_thread() -> None:
            for name, call in (
                ("call_soon", lambda: loop.call_soon(print)),
                ("call_later", lambda: loop.call_later(10, print).cancel()),
                ("call_at", lambda: loop.call_at(loop.time() + 10, print).cancel()),
            ):
                try:
                    call()
                    outcomes.append(f"{name}: allowed")
                except RuntimeError as exc:
                    outcomes.append(f"{name}: {exc}")

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        return outcomes

    results = run_everywhere(main, debug=True)
    expected = assert_all_equal(results)
    assert all("Non-thread-safe operation" in o for o in expected), expected


def test_debug_mode_coroutine_checks() -> None:
    async def coro_fn() -> None:
        pass

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        out = []
        for name, call in (
            ("call_soon", lambda: loop.call_soon(coro_fn)),
            ("call_later", lambda: loop.call_later(1, coro_fn)),
        ):
            try:
                call()
                out.append(f"{name}: allowed")
            except TypeError:
                out.append(f"{name}: TypeError")
        return out

    # Stock uvloop does not check (it would call coro_fn and drop the
    # coroutine); both dartloop backends check, as stock asyncio does.
    kinds = ("asyncio", *DART_KINDS)
    assert assert_all_equal(run_everywhere(main, kinds, debug=True)) == ["call_soon: TypeError", "call_later: TypeError"]


def test_loop_attributes() -> None:
    for kind in DART_KINDS:
        loop = LOOP_KINDS[kind]()
        try:
            assert isinstance(loop, dartloop.DartEventLoop)
            assert isinstance(loop, asyncio.AbstractEventLoop)
            assert loop.backend == kind.removeprefix("dartloop-").removesuffix("-strict")
            assert loop.strict is kind.endswith("-strict")
            assert not loop.is_running() and not loop.is_closed()
        finally:
            loop.close()
        assert loop.is_closed()
        with pytest.raises(RuntimeError, match="closed"):
            loop.call_soon(print)
    for kind in ("asyncio", "uvloop"):
        if kind in LOOP_KINDS:
            stock = LOOP_KINDS[kind]()
            assert not isinstance(stock, dartloop.DartEventLoop)
            stock.close()


def test_loop_methods_match_stock_on_errors() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        out = []
        with pytest.raises(RuntimeError):
            loop.run_until_complete(loop.create_future())
        with pytest.raises(RuntimeError):
            loop.run_forever()
        out.append("ok")
        return out

    assert assert_all_equal(run_everywhere(main)) == ["ok"]


def _log_after(first: Callable[[asyncio.AbstractEventLoop, list[str]], None]) -> dict[str, list[str]]:
    """Run ``first(loop, log)`` as an event, then wait 20 ms; ``{kind: log}`` on
    every loop kind but stock uvloop (libuv runs due timers first)."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        done = loop.create_future()

        def event() -> None:
            first(loop, log)
            loop.call_later(0.02, done.set_result, None)

        loop.call_soon(event)
        await done
        return log

    return run_everywhere(main, tuple(k for k in LOOP_KINDS if k != "uvloop"))


def test_a_due_timer_runs_after_the_callbacks_queued_before_it() -> None:
    """asyncio's order (and Dart's: a due timer's wake-up joins the tail of the
    queue) on every dartloop backend; stock uvloop runs due timers first."""

    def first(loop: asyncio.AbstractEventLoop, log: list[str]) -> None:
        loop.call_later(0.001, log.append, "timer")
        loop.call_soon(log.append, "call_soon")
        busy_wait(0.005)  # the timer is due before the loop looks again

    assert assert_all_equal(_log_after(first)) == ["call_soon", "timer"]


def test_a_timer_cancelled_after_it_came_due_does_not_run() -> None:
    def first(loop: asyncio.AbstractEventLoop, log: list[str]) -> None:
        handle = loop.call_later(0.001, log.append, "timer")
        loop.call_soon(handle.cancel)  # queued before the timer's turn
        busy_wait(0.005)

    assert assert_all_equal(_log_after(first)) == []


def test_exception_in_callback_reaches_handler_everywhere() -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        def timer_callback() -> None:
            loop.call_soon(done.set_result, None)
            {}["k"]

        loop.call_soon(lambda: 1 / 0)
        loop.call_later(0.001, timer_callback)
        await done
        return []

    for kind, factory in LOOP_KINDS.items():
        _, contexts = run_on(factory, main, expect_errors=True)
        # Stock uvloop may run the timer first on a slow machine (libuv runs
        # due timers before ready callbacks): the order is tested elsewhere.
        assert sorted(type(c["exception"]).__name__ for c in contexts) == ["KeyError", "ZeroDivisionError"], kind
        assert all(c["message"].startswith("Exception in callback") for c in contexts), kind
        # The keys of stock asyncio's and uvloop's contexts, with a handle
        # that names the callback (handlers read context["handle"]).
        assert [sorted(c) for c in contexts] == [["exception", "handle", "message"]] * 2, kind
        assert any("<lambda>" in repr(c["handle"]) for c in contexts), (kind, [repr(c["handle"]) for c in contexts])
