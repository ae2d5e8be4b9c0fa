"""pytest plugin: run pytest-asyncio tests on dartloop loops.

Registered as the ``pytest11`` entry point ``dartloop``. It implements
pytest-asyncio's ``pytest_asyncio_loop_factories`` hook (pytest-asyncio 1.4
and later), so that every async test runs once per dartloop backend, with the
test ids ``[dartloop-asyncio]`` and ``[dartloop-uvloop]`` (the latter only
where uvloop is installed).

Opt-in, because pytest-asyncio refuses a hook implementation that answers
``None``: with the plugin installed but not enabled, no hook implementation
is registered at all and pytest-asyncio behaves exactly as without dartloop.
Enable it with

* the command line flag ``--dartloop`` (``--no-dartloop`` overrides the ini
  option), or
* the ini option ``dartloop = true``.

``--dartloop-strict`` (or ini ``dartloop_strict = true``) makes the loops
``strict=True`` loops, under the same factory names; ``--dartloop-strict``
also enables the plugin.

The hook implementation is ``trylast``: a ``pytest_asyncio_loop_factories``
in the user's own ``conftest.py`` answers first and wins (the hook is
``firstresult``); where it answers ``None`` for an item, dartloop's answer is
used. Without pytest-asyncio (or with one older than 1.4) the plugin loads
and does nothing.

The factories are public so that other harnesses can use them directly:
``dartloop.pytest_plugin:new_asyncio_backend_loop`` and
``dartloop.pytest_plugin:new_uvloop_backend_loop`` (and their ``_strict_``
variants). This module imports nothing of dartloop until a factory or the
hook is called, so merely having dartloop installed costs pytest nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

__all__ = [
    "new_asyncio_backend_loop",
    "new_uvloop_backend_loop",
    "new_asyncio_backend_strict_loop",
    "new_uvloop_backend_strict_loop",
    "loop_factories",
]

_HOOK = "pytest_asyncio_loop_factories"
_PLUGIN_NAME = "dartloop-loop-factories"


def new_asyncio_backend_loop() -> asyncio.AbstractEventLoop:
    """A new dartloop loop on the stdlib selector backend (default mode)."""
    from dartloop import new_event_loop

    return new_event_loop(backend="asyncio")


def new_uvloop_backend_loop() -> asyncio.AbstractEventLoop:
    """A new dartloop loop on the uvloop backend (default mode).

    Raises ``RuntimeError`` if uvloop is not installed.
    """
    from dartloop import new_event_loop

    return new_event_loop(backend="uvloop")


def new_asyncio_backend_strict_loop() -> asyncio.AbstractEventLoop:
    """A new ``strict=True`` dartloop loop on the stdlib selector backend."""
    from dartloop import new_event_loop

    return new_event_loop(backend="asyncio", strict=True)


def new_uvloop_backend_strict_loop() -> asyncio.AbstractEventLoop:
    """A new ``strict=True`` dartloop loop on the uvloop backend."""
    from dartloop import new_event_loop

    return new_event_loop(backend="uvloop", strict=True)


def loop_factories(*, strict: bool = False) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The mapping the hook answers: ``{"dartloop-asyncio": ..., "dartloop-uvloop": ...}``.

    ``dartloop-uvloop`` is present only where uvloop can be used.
    """
    from dartloop import available_backends

    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "dartloop-asyncio": new_asyncio_backend_strict_loop if strict else new_asyncio_backend_loop,
    }
    if "uvloop" in available_backends():
        factories["dartloop-uvloop"] = new_uvloop_backend_strict_loop if strict else new_uvloop_backend_loop
    return factories


class _LoopFactories:
    """The hook implementation, registered only when the plugin is enabled."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict

    @pytest.hookimpl(trylast=True, optionalhook=True)
    def pytest_asyncio_loop_factories(self, config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
        return loop_factories(strict=self.strict)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dartloop", "dartloop event loops for pytest-asyncio")
    group.addoption(
        "--dartloop",
        action="store_true",
        dest="dartloop",
        default=None,
        help="run pytest-asyncio tests on dartloop loops, once per backend "
        "(dartloop-asyncio, dartloop-uvloop); overrides the ini option 'dartloop'",
    )
    group.addoption(
        "--no-dartloop",
        action="store_false",
        dest="dartloop",
        help="don't use dartloop loops, even if the ini option 'dartloop' is true",
    )
    group.addoption(
        "--dartloop-strict",
        action="store_true",
        dest="dartloop_strict",
        default=False,
        help="like --dartloop, with strict=True loops (future callbacks run as microtasks)",
    )
    parser.addini("dartloop", type="bool", default=False, help="run pytest-asyncio tests on dartloop loops (see --dartloop)")
    parser.addini(
        "dartloop_strict",
        type="bool",
        default=False,
        help="with dartloop enabled, make the loops strict=True (see --dartloop-strict)",
    )


def _settings(config: pytest.Config) -> tuple[bool, bool]:
    strict_flag = bool(config.getoption("dartloop_strict"))
    enabled = config.getoption("dartloop")
    if enabled is None:
        enabled = bool(config.getini("dartloop")) or strict_flag
    strict = strict_flag or bool(config.getini("dartloop_strict"))
    return bool(enabled), strict


def _hook_available(config: pytest.Config) -> bool:
    """pytest-asyncio (≥ 1.4) is active and has declared the hook."""
    caller = getattr(config.pluginmanager.hook, _HOOK, None)
    return caller is not None and getattr(caller, "spec", None) is not None


def pytest_configure(config: pytest.Config) -> None:
    enabled, strict = _settings(config)
    if enabled and _hook_available(config) and not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        config.pluginmanager.register(_LoopFactories(strict), _PLUGIN_NAME)


def pytest_report_header(config: pytest.Config) -> str | None:
    enabled, strict = _settings(config)
    if not enabled:
        return None
    if not config.pluginmanager.has_plugin(_PLUGIN_NAME):
        return "dartloop: enabled, but pytest-asyncio >= 1.4 is not active: nothing to do"
    names = ", ".join(loop_factories(strict=strict))
    return f"dartloop: loop factories {names}" + (" (strict=True)" if strict else "")
