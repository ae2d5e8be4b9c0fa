"""Regressions found by running other projects' suites (anyio, pytest-asyncio) on dartloop."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref

import pytest

import dartloop

BACKENDS = dartloop.available_backends()


async def _echo_round_trip() -> bytes:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    infos = await asyncio.get_running_loop().getaddrinfo("127.0.0.1", port)
    assert infos
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping\n")
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return line


async def _subprocess_output() -> tuple[bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import os; print(oct(os.umask(0)))", stdout=asyncio.subprocess.PIPE, umask=0o027
    )
    out, _ = await proc.communicate()
    return out, b""


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_mode_streams_and_dns(backend: str) -> None:
    # uvloop completes DNS and socket futures from its own C callbacks; in
    # strict mode the task wake-ups they queue as microtasks must still run.
    assert dartloop.run(_echo_round_trip(), backend=backend, strict=True) == b"ping\n"


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_subprocess_communicate_and_umask(backend: str, strict: bool) -> None:
    # strict, asyncio backend: connection_made (an event) must run before the
    # waiter's wake-up (a microtask) hands the Process out. uvloop backend:
    # subprocess's umask/user/group options are applied in a preexec_fn.
    out, _ = dartloop.run(_subprocess_output(), backend=backend, strict=strict)
    assert out.strip() == b"0o27"
    assert asyncio.run(_subprocess_output())[0] == out  # same as stock asyncio


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_loop_is_not_kept_alive_by_its_isolate(backend: str) -> None:
    loop = dartloop.new_event_loop(backend=backend)
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None
