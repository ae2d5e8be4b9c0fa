"""dartloop's pytest plugin (``dartloop.pytest_plugin``), run through pytester."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os

import pytest
from _loop_helpers import DART_BACKENDS

import dartloop
from dartloop import pytest_plugin

pytest_plugins = ["pytester"]


def _autoloaded() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "dartloop.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


# Source tree not pip-installed: the inner pytest must be told to load the plugin.
PLUGIN = [] if _autoloaded() else ["-p", "dartloop.pytest_plugin"]
# Hypothesis's report header re-imports hypothesis in every inner run (pytester
# restores sys.modules afterwards): a second each. Not needed here.
PLUGIN += ["-p", "no:hypothesispytest", "-p", "no:cacheprovider"]
EXPECTED_IDS = [f"dartloop-{b}" for b in ("asyncio", "uvloop") if b in DART_BACKENDS]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
filterwarnings = error
{extra}
"""

TEST_FILE = """
import asyncio
import dartloop

async def test_loop(request):
    loop = asyncio.get_running_loop()
    callspec = getattr(request.node, "callspec", None)
    factory_id = callspec.id if callspec else None
    print("LOOP", factory_id, type(loop).__name__, getattr(loop, "strict", None))
    if factory_id and factory_id.startswith("dartloop-"):
        assert isinstance(loop, dartloop.DartEventLoop)
        assert loop.backend == factory_id.removeprefix("dartloop-")
    elif factory_id is None:
        assert not isinstance(loop, dartloop.DartEventLoop)

def test_sync():
    pass
"""


def run(pytester: pytest.Pytester, *args: str, ini: str = "", conftest: str | None = None) -> pytest.RunResult:
    pytester.makeini(INI.format(extra=ini))
    pytester.makepyfile(test_it=TEST_FILE)
    if conftest is not None:
        pytester.makeconftest(conftest)
    return pytester.runpytest_inprocess(*PLUGIN, "-v", "-s", *args)


def passed_ids(result: pytest.RunResult) -> list[str]:
    passed, _, _ = result.reprec.listoutcomes()  # type: ignore[attr-defined]
    return sorted(r.nodeid.split("::")[1] for r in passed if "::test_loop" in r.nodeid)


def test_disabled_by_default_changes_nothing(pytester: pytest.Pytester) -> None:
    result = run(pytester)
    result.assert_outcomes(passed=2)
    assert passed_ids(result) == ["test_loop"]
    assert not any("dartloop:" in line for line in result.outlines)


def test_command_line_flag(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--dartloop")
    result.assert_outcomes(passed=len(EXPECTED_IDS) + 1)
    assert passed_ids(result) == sorted(f"test_loop[{i}]" for i in EXPECTED_IDS)
    result.stdout.fnmatch_lines([f"dartloop: loop factories {', '.join(EXPECTED_IDS)}"])


def test_ini_option(pytester: pytest.Pytester) -> None:
    result = run(pytester, ini="dartloop = true")
    result.assert_outcomes(passed=len(EXPECTED_IDS) + 1)
    assert passed_ids(result) == sorted(f"test_loop[{i}]" for i in EXPECTED_IDS)


def test_no_dartloop_overrides_the_ini_option(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--no-dartloop", ini="dartloop = true")
    result.assert_outcomes(passed=2)
    assert passed_ids(result) == ["test_loop"]


def test_strict_flag(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--dartloop-strict")
    result.assert_outcomes(passed=len(EXPECTED_IDS) + 1)
    loop_lines = [line for line in result.outlines if line.startswith("LOOP") or "LOOP dartloop" in line]
    assert loop_lines and all(line.rstrip().endswith("True") for line in loop_lines), result.outlines
    result.stdout.fnmatch_lines(["dartloop: loop factories * (strict=True)"])


def test_strict_ini(pytester: pytest.Pytester) -> None:
    result = run(pytester, ini="dartloop = true\ndartloop_strict = true")
    result.assert_outcomes(passed=len(EXPECTED_IDS) + 1)
    assert any("StrictLoop" in line for line in result.outlines)


def test_users_own_hook_wins(pytester: pytest.Pytester) -> None:
    conftest = """
import asyncio

def pytest_asyncio_loop_factories(config, item):
    return {"mine": asyncio.new_event_loop, "mine-too": asyncio.new_event_loop}
"""
    result = run(pytester, "--dartloop", conftest=conftest)
    result.assert_outcomes(passed=3)
    assert passed_ids(result) == ["test_loop[mine-too]", "test_loop[mine]"]


def test_users_hook_answering_none_falls_back_to_dartloop(pytester: pytest.Pytester) -> None:
    conftest = """
def pytest_asyncio_loop_factories(config, item):
    return None
"""
    result = run(pytester, "--dartloop", conftest=conftest)
    result.assert_outcomes(passed=len(EXPECTED_IDS) + 1)
    assert passed_ids(result) == sorted(f"test_loop[{i}]" for i in EXPECTED_IDS)


def test_marker_selects_a_factory(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI.format(extra="dartloop = true"))
    pytester.makepyfile(
        test_sel="""
import asyncio
import pytest

@pytest.mark.asyncio(loop_factories=["dartloop-asyncio"])
async def test_one():
    assert asyncio.get_running_loop().backend == "asyncio"
"""
    )
    result = pytester.runpytest_inprocess(*PLUGIN, "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_one*PASSED*"])


def test_without_pytest_asyncio(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN, "-p", "no:asyncio", "--dartloop")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["dartloop: enabled, but pytest-asyncio >= 1.4 is not active: nothing to do"])
    assert result.ret == 0


def test_plugin_is_registered_as_pytest11_entry_point() -> None:
    # The distribution metadata (pyproject.toml) names the module; when the
    # project is installed the entry point must resolve to it.
    import pathlib
    import tomllib

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text())
    assert data["project"]["entry-points"]["pytest11"] == {"dartloop": "dartloop.pytest_plugin"}
    assert data["tool"]["pytest"]["ini_options"]["dartloop"] is True


def test_public_factories() -> None:
    factories = pytest_plugin.loop_factories()
    assert list(factories) == EXPECTED_IDS
    made = []
    for name, factory in [
        ("asyncio", pytest_plugin.new_asyncio_backend_loop),
        ("uvloop", pytest_plugin.new_uvloop_backend_loop),
        ("asyncio", pytest_plugin.new_asyncio_backend_strict_loop),
        ("uvloop", pytest_plugin.new_uvloop_backend_strict_loop),
    ]:
        if name not in DART_BACKENDS:
            continue
        loop = factory()
        made.append((loop.backend, loop.strict))  # type: ignore[attr-defined]
        assert isinstance(loop, dartloop.DartEventLoop) and isinstance(loop, asyncio.AbstractEventLoop)
        loop.close()
    expected = [(b, s) for s in (False, True) for b in ("asyncio", "uvloop") if b in DART_BACKENDS]
    assert sorted(made) == sorted(expected)
    strict = pytest_plugin.loop_factories(strict=True)
    assert list(strict) == EXPECTED_IDS
    loop = strict["dartloop-asyncio"]()
    assert loop.strict  # type: ignore[attr-defined]
    loop.close()


async def test_this_suite_runs_on_dartloop(request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, dartloop.DartEventLoop)
    assert request.node.callspec.id == f"dartloop-{loop.backend}"
