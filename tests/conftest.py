"""Test configuration for dartloop's own suite.

dartloop's pytest plugin is enabled for this project by ``dartloop = true``
in ``[tool.pytest.ini_options]`` and ``asyncio_mode = "auto"``, so every
``async def`` test runs twice, as ``[dartloop-asyncio]`` and
``[dartloop-uvloop]``. Tests that must compare with stock asyncio and uvloop
are plain functions that build each loop themselves (see ``_loop_helpers``).

Every async test gets the ``loop_errors`` fixture: it records calls of the
running loop's exception handler and fails the test at teardown if any call
was not taken with ``loop_errors.take()``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pytest_asyncio import is_async_test


def _plugin_autoloaded() -> bool:
    """Whether pytest loads dartloop's plugin through its entry point."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "dartloop.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


# Running from a source tree that is not pip-installed: load the plugin here.
pytest_plugins = ["pytester"] if _plugin_autoloaded() else ["pytester", "dartloop.pytest_plugin"]


class LoopErrors:
    """Records the contexts given to the loop's exception handler."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)

    def take(self) -> list[dict[str, Any]]:
        """Return the recorded contexts and forget them (they were expected)."""
        taken = self.contexts[:]
        self.contexts.clear()
        return taken


@pytest.fixture
async def loop_errors() -> AsyncIterator[LoopErrors]:
    loop = asyncio.get_running_loop()
    errors = LoopErrors()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(errors)
    yield errors
    loop.set_exception_handler(previous)
    if errors.contexts:
        messages = "\n".join(f"  {c.get('message')!r}: {c.get('exception')!r}" for c in errors.contexts)
        pytest.fail(f"unexpected calls of the loop's exception handler:\n{messages}", pytrace=False)


@pytest.fixture(autouse=True)
def _guard_loop_errors(request: pytest.FixtureRequest) -> None:
    if is_async_test(request.node):
        request.getfixturevalue("loop_errors")
