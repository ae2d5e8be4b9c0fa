"""A plain asyncio program, run unchanged on dartloop, stock asyncio and uvloop.

The program (``echo_session``) is ordinary asyncio code that knows nothing of
dartloop: a TCP echo server on 127.0.0.1 (an ephemeral port), a few concurrent
clients that each send some lines and read the echoes back, then a clean
shutdown. Everything is bounded by a timeout, so it always exits by itself.

Only the choice of loop differs, made where the program is started:

    python examples/echo_asyncio.py                      # every loop, compared
    python examples/echo_asyncio.py --loop dartloop      # dartloop (default backend)
    python examples/echo_asyncio.py --loop dartloop-asyncio --policy
    python examples/echo_asyncio.py --loop asyncio       # stock asyncio

``--loop all`` (the default) runs the session on each available loop (the
strict dartloop variants, ``--loop dartloop-asyncio-strict`` and
``--loop dartloop-uvloop-strict``, only when named) and checks that every run
produced the same transcript; it exits 1 otherwise.
By default the loop is picked with ``asyncio.Runner(loop_factory=...)``;
``--policy`` picks it with ``asyncio.set_event_loop_policy(...)`` and a plain
``asyncio.run(...)``, as existing applications do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

# --------------------------------------------------------------------------
# The program: plain asyncio, nothing dartloop-specific below this line
# until the "Choosing the loop" section.
# --------------------------------------------------------------------------

CLIENTS = 3
LINES_PER_CLIENT = 5
TIMEOUT = 10.0


async def handle_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server side: echo every line back, upper-cased, until EOF."""
    try:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def client(port: int, n: int) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    for i in range(LINES_PER_CLIENT):
        writer.write(f"hello {i} from client {n}\n".encode())
        await writer.drain()
        replies.append((await reader.readline()).decode().rstrip("\n"))
    writer.write_eof()
    assert await reader.read() == b"", "server sent more than the echoes"
    writer.close()
    await writer.wait_closed()
    return replies


async def echo_session() -> tuple[str, list[list[str]]]:
    """Start a server, run the clients concurrently, stop; return the transcript."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(handle_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        replies = await asyncio.gather(*(client(port, n) for n in range(CLIENTS)))
    loop_name = f"{type(loop).__module__}.{type(loop).__qualname__}"
    return loop_name, replies


async def bounded_session() -> tuple[str, list[list[str]]]:
    """The whole session, given TIMEOUT seconds at most."""
    return await asyncio.wait_for(echo_session(), timeout=TIMEOUT)


# --------------------------------------------------------------------------
# Choosing the loop: the only place that names dartloop or uvloop.
# --------------------------------------------------------------------------


def loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        factories["uvloop"] = uvloop.new_event_loop
    try:
        import dartloop
    except ImportError:
        pass
    else:
        factories["dartloop"] = dartloop.new_event_loop
        for backend in dartloop.available_backends():
            factories[f"dartloop-{backend}"] = lambda b=backend: dartloop.new_event_loop(backend=b)
        for backend in dartloop.available_backends():
            factories[f"dartloop-{backend}-strict"] = lambda b=backend: dartloop.new_event_loop(backend=b, strict=True)
    return factories


def policy_for(name: str) -> asyncio.AbstractEventLoopPolicy:
    if name == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    if name == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    import dartloop

    _, _, rest = name.partition("-")  # "", "asyncio", "uvloop-strict", ...
    backend, _, strict = rest.partition("-")
    return dartloop.EventLoopPolicy(backend=backend or None, strict=strict == "strict")


def run_on(name: str, use_policy: bool) -> tuple[str, list[list[str]]]:
    if use_policy:
        old = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(policy_for(name))
        try:
            return asyncio.run(bounded_session())
        finally:
            asyncio.set_event_loop_policy(old)
    with asyncio.Runner(loop_factory=loop_factories()[name]) as runner:
        return runner.run(bounded_session())


def main(argv: list[str] | None = None) -> int:
    factories = loop_factories()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--loop",
        choices=[*factories, "all"],
        default="all",
        help="the loop to run on; 'all' (default): every loop above except the strict ones",
    )
    parser.add_argument("--policy", action="store_true", help="pick the loop with set_event_loop_policy")
    args = parser.parse_args(argv)

    names = [n for n in factories if not n.endswith("-strict")] if args.loop == "all" else [args.loop]
    reference = [[f"HELLO {i} FROM CLIENT {n}" for i in range(LINES_PER_CLIENT)] for n in range(CLIENTS)]
    transcripts = {}
    bad = []
    for name in names:
        try:
            loop_type, replies = run_on(name, args.policy)
        except (TimeoutError, asyncio.TimeoutError):
            print(f"{name:23} TIMED OUT after {TIMEOUT} s")
            bad.append(name)
            continue
        transcripts[name] = replies
        lines = sum(len(r) for r in replies)
        print(f"{name:23} ran on {loop_type}: {len(replies)} clients, {lines} echoes")
        if replies != reference:
            bad.append(name)
    if bad:
        print(f"FAILED (timeout or different transcript) on {', '.join(bad)}", file=sys.stderr)
        return 1
    how = "set_event_loop_policy + asyncio.run" if args.policy else "asyncio.Runner(loop_factory=...)"
    print(f"OK: the same transcript on {len(transcripts)} loop(s), chosen with {how}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
