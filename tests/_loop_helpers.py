"""Helpers shared by the loop tests: building each kind of loop, running a
scenario on it with a recording exception handler, comparing results."""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import dartloop

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency
    uvloop = None  # type: ignore[assignment]

DART_BACKENDS = dartloop.available_backends()

#: Every loop kind a drop-in scenario is compared on: stock first.
LOOP_KINDS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOP_KINDS["uvloop"] = uvloop.new_event_loop
LOOP_KINDS["dartloop-asyncio"] = functools.partial(dartloop.new_event_loop, backend="asyncio")
if "uvloop" in DART_BACKENDS:
    LOOP_KINDS["dartloop-uvloop"] = functools.partial(dartloop.new_event_loop, backend="uvloop")
# Strict mode changes only when future callbacks run: drop-in behaviour holds too.
for _backend in DART_BACKENDS:
    LOOP_KINDS[f"dartloop-{_backend}-strict"] = functools.partial(dartloop.new_event_loop, backend=_backend, strict=True)

STOCK_KINDS = tuple(k for k in LOOP_KINDS if not k.startswith("dartloop"))
DART_KINDS = tuple(k for k in LOOP_KINDS if k.startswith("dartloop"))

PY312 = sys.version_info >= (3, 12)


class Recorder:
    """An exception handler that records contexts."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)


def run_on(
    factory: Callable[[], asyncio.AbstractEventLoop],
    main: Callable[[], Coroutine[Any, Any, Any]],
    *,
    debug: bool = False,
    expect_errors: bool = False,
) -> Any:
    """Run ``main()`` to completion on a new loop from ``factory``, the asyncio.run way.

    Fails if the loop's exception handler was called, unless
    ``expect_errors``: then returns ``(result, contexts)``.
    """
    errors = Recorder()

    async def wrapper() -> Any:
        asyncio.get_running_loop().set_exception_handler(errors)
        return await main()

    with asyncio.Runner(loop_factory=factory, debug=debug) as runner:
        result = runner.run(wrapper())
    if expect_errors:
        return result, errors.contexts
    assert not errors.contexts, [(c.get("message"), c.get("exception")) for c in errors.contexts]
    return result


def run_everywhere(main: Callable[[], Coroutine[Any, Any, Any]], kinds: tuple[str, ...] | None = None, **kwargs: Any) -> dict[str, Any]:
    """``run_on`` each loop kind; ``{kind: result}``."""
    return {kind: run_on(LOOP_KINDS[kind], main, **kwargs) for kind in (kinds or tuple(LOOP_KINDS))}


def assert_all_equal(results: dict[str, Any]) -> Any:
    """All kinds gave the same result; return it."""
    first_kind = next(iter(results))
    expected = results[first_kind]
    for kind, result in results.items():
        assert result == expected, f"{kind} differs from {first_kind}:\n{result!r}\n!=\n{expected!r}"
    return expected


def busy_wait(seconds: float) -> None:
    """Block the running loop for ``seconds`` (wall clock)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def assert_each_followed_by_its_microtask(log: list[Any]) -> None:
    """Every ``name`` entry is directly followed by ``name + ".mt"``."""
    i = 0
    while i < len(log):
        entry = log[i]
        assert not str(entry).endswith(".mt"), f"stray microtask at {i}: {log}"
        assert i + 1 < len(log) and log[i + 1] == f"{entry}.mt", f"{entry!r} at {i} not followed by its microtask: {log}"
        i += 2
