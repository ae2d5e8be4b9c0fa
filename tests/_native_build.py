"""Compiling small C libraries at test time (not a test module).

``build_library(source, directory)`` runs ``cc -shared -fPIC -pthread -I
<dartloop.ffi.include_dir()>`` (``$CC`` if set) and returns the path of the
shared library. Results are cached per process by source text, so a session
fixture and the tests that use it compile each library once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dartloop.ffi import include_dir

C_DIR = Path(__file__).resolve().parent / "c"

_built: dict[str, Path] = {}


def compiler() -> str | None:
    """The C compiler to use, or ``None`` when there is none."""
    cc = os.environ.get("CC") or "cc"
    return cc if shutil.which(cc) else None


def build_library(source: str, directory: Path, *, name: str = "helpers") -> Path:
    """Compile ``source`` into ``directory/lib<name>-<hash>.so`` (once per process).

    Skips the calling test when there is no C compiler; fails it with the
    compiler's output when compiling fails.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    cached = _built.get(digest)
    if cached is not None and cached.exists():
        return cached
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler (cc, or $CC) to build the native test helpers")
    src = directory / f"{name}-{digest}.c"
    lib = directory / f"lib{name}-{digest}.so"
    src.write_text(source)
    cmd = [cc, "-O2", "-std=c11", "-Wall", "-Werror", "-shared", "-fPIC", "-pthread",
           f"-I{include_dir()}", str(src), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"compiling {name} failed:\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}", pytrace=False)
    _built[digest] = lib
    return lib


def build_helper(filename: str, directory: Path) -> Path:
    """``build_library`` of ``tests/c/<filename>``."""
    return build_library((C_DIR / filename).read_text(), directory, name=Path(filename).stem)
