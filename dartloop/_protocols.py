"""Protocol proxies for the uvloop backend.

uvloop's transports call protocol methods from C, not through the loop's
ready queue, so the loop can't drain microtasks after them on its own. Each
protocol a dartloop uvloop loop creates is wrapped in a proxy whose every
callback calls the real one and then drains: ``data_received`` of two
connections made readable in one poll see the first one's microtasks run
before the second one runs. The stdlib backend needs none of this (its
transports run from the ready queue).

The proxy forwards other attribute reads and writes to the real protocol;
``create_connection`` and friends return the real protocol, but
``transport.get_protocol()`` returns the proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _loop

if TYPE_CHECKING:
    from ._loop import DartEventLoop

__all__ = ["wrap_protocol"]


def _drained(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any) -> Any:
        try:
            return getattr(self._dartloop_target, name)(*args)
        finally:
            loop = self._dartloop_loop
            if loop._microtasks:
                loop._run_pending_immediate_callback()

    method.__name__ = name
    return method


# The C accelerator's proxy methods do the same without a Python frame per
# protocol callback (dartloop/_speedups.c, LoopMethod "drained"). Chosen once,
# at import, for the proxy classes below; the pure ones run with
# DARTLOOP_NO_EXTENSIONS=1 or when the extension is not built.
_drained_py = _drained
if _loop.SPEEDUPS is not None:

    def _drained(name: str) -> Callable[..., Any]:  # noqa: F811
        return _loop.SPEEDUPS.LoopMethod("drained", _drained_py(name))  # type: ignore[no-any-return]


def _plain(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any) -> Any:
        return getattr(self._dartloop_target, name)(*args)

    method.__name__ = name
    return method


class _TransportRef:
    """Stands for a transport that can't be weakly referenced (uvloop's
    subprocess transport) in the loop's weak set of transports.

    The proxy holds it, and the transport holds the proxy, so it lives as
    long as the transport does.
    """

    __slots__ = ("transport", "__weakref__")

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def is_closing(self) -> bool:
        return bool(self.transport.is_closing())


class _ProxyBase:
    __slots__ = ("_dartloop_target", "_dartloop_loop", "_dartloop_ref")
    _dartloop_target: Any
    _dartloop_loop: DartEventLoop

    def __init__(self, loop: DartEventLoop, target: Any) -> None:
        object.__setattr__(self, "_dartloop_target", target)
        object.__setattr__(self, "_dartloop_loop", loop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dartloop_target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._dartloop_target, name, value)

    def __repr__(self) -> str:
        return f"<dartloop drain proxy for {self._dartloop_target!r}>"

    def connection_made(self, transport: Any) -> None:
        try:
            self._dartloop_loop._dart_transports.add(transport)  # type: ignore[attr-defined]
        except TypeError:  # not weakly referenceable
            ref = _TransportRef(transport)
            object.__setattr__(self, "_dartloop_ref", ref)
            self._dartloop_loop._dart_transports.add(ref)  # type: ignore[attr-defined]
        try:
            self._dartloop_target.connection_made(transport)
        finally:
            loop = self._dartloop_loop
            if loop._microtasks:
                loop._run_pending_immediate_callback()

    connection_lost = _drained("connection_lost")
    pause_writing = _drained("pause_writing")
    resume_writing = _drained("resume_writing")


def _make(name: str, base: type, methods: dict[str, Callable[..., Any]]) -> type:
    return type(name, (_ProxyBase, base), {"__slots__": (), **methods})


_StreamProxy = _make(
    "_StreamProxy",
    asyncio.Protocol,
    {"data_received": _drained("data_received"), "eof_received": _drained("eof_received")},
)
_BufferedProxy = _make(
    "_BufferedProxy",
    asyncio.BufferedProtocol,
    {
        "get_buffer": _plain("get_buffer"),
        "buffer_updated": _drained("buffer_updated"),
        "eof_received": _drained("eof_received"),
    },
)
_DatagramProxy = _make(
    "_DatagramProxy",
    asyncio.DatagramProtocol,
    {"datagram_received": _drained("datagram_received"), "error_received": _drained("error_received")},
)
_SubprocessProxy = _make(
    "_SubprocessProxy",
    asyncio.SubprocessProtocol,
    {
        "pipe_data_received": _drained("pipe_data_received"),
        "pipe_connection_lost": _drained("pipe_connection_lost"),
        "process_exited": _drained("process_exited"),
    },
)


def wrap_protocol(loop: DartEventLoop, protocol: Any) -> Any:
    """Return a draining proxy for ``protocol`` (or ``protocol`` if already one).

    The proxy's class matches the protocol's kind, because uvloop chooses a
    transport's code path by ``isinstance`` (buffered or not).
    """
    if isinstance(protocol, _ProxyBase):
        return protocol
    if isinstance(protocol, asyncio.BufferedProtocol) and not isinstance(protocol, asyncio.Protocol):
        return _BufferedProxy(loop, protocol)
    if isinstance(protocol, asyncio.SubprocessProtocol):
        return _SubprocessProxy(loop, protocol)
    if isinstance(protocol, asyncio.DatagramProtocol):
        return _DatagramProxy(loop, protocol)
    if hasattr(protocol, "get_buffer") and not hasattr(protocol, "data_received"):
        return _BufferedProxy(loop, protocol)
    if hasattr(protocol, "datagram_received"):
        return _DatagramProxy(loop, protocol)
    if hasattr(protocol, "pipe_data_received") or hasattr(protocol, "process_exited"):
        return _SubprocessProxy(loop, protocol)
    return _StreamProxy(loop, protocol)
