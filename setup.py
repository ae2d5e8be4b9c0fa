"""Build script for dartloop's optional C extension.

Project metadata lives in pyproject.toml; this file only declares the native
message queue ``dartloop.ffi._nativequeue``.  The extension is optional: when
it cannot be compiled (no compiler, missing headers, a non-POSIX platform) the
build warns and carries on, and ``dartloop.ffi._queue`` falls back to the
pure-Python implementation.  Set ``DARTLOOP_NO_EXTENSIONS=1`` at build time to
skip the extension altogether (and at run time to ignore a built one).

When libffi's headers and library are found (``pkg-config libffi``, else the
compiler's default paths), ``_nativequeue`` is also built with
``NQ_HAVE_FFI=1`` and linked with libffi: that adds the GIL-free closures
behind ``NativeCallable.listener``.  Without libffi it builds as before and
listeners use ctypes callbacks.  ``DARTLOOP_NO_LIBFFI=1`` skips the probe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# pyproject.toml requires setuptools >= 77, which has these.
from setuptools.errors import CCompilerError, ExecError, PlatformError

_BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError, ValueError)


class OptionalBuildExt(build_ext):
    """``build_ext`` that turns a failed compile into a warning.

    ``pip install .`` must succeed on a machine without a C compiler; the
    package then runs on its pure-Python fallbacks.
    """

    def run(self) -> None:
        try:
            super().run()
        except _BUILD_ERRORS as exc:  # e.g. no compiler found at all
            self._warn_skipped("*", exc)

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "dartloop.ffi._nativequeue":
            self._add_libffi(ext)
        try:
            super().build_extension(ext)
        except _BUILD_ERRORS as exc:
            self._warn_skipped(ext.name, exc)

    def _add_libffi(self, ext: Extension) -> None:
        """Build ``ext`` with ``NQ_HAVE_FFI=1`` and ``-lffi`` if libffi links."""
        if os.environ.get("DARTLOOP_NO_LIBFFI") == "1":
            return
        cflags, libs = _pkg_config_libffi()
        include_dirs = [f[2:] for f in cflags if f.startswith("-I")]
        library_dirs = [f[2:] for f in libs if f.startswith("-L")]
        if not self._links_libffi(include_dirs, library_dirs):
            self.warn("libffi not found: NativeCallable.listener will use ctypes callbacks (they take the GIL)")
            return
        ext.define_macros.append(("NQ_HAVE_FFI", "1"))
        ext.include_dirs.extend(include_dirs)
        ext.library_dirs.extend(library_dirs)
        ext.libraries.append("ffi")

    def _links_libffi(self, include_dirs: list[str], library_dirs: list[str]) -> bool:
        """Compile and link a program calling ffi_prep_closure_loc; quietly."""
        tmp = tempfile.mkdtemp(prefix="dartloop-ffi-probe-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(
                    "#include <ffi.h>\n"
                    "int main(void) {\n"
                    "  void *code; ffi_closure *c = ffi_closure_alloc(sizeof(ffi_closure), &code);\n"
                    "  ffi_status (*volatile prep)(ffi_closure *, ffi_cif *, void (*)(ffi_cif *, void *, void **, void *),\n"
                    "                              void *, void *) = ffi_prep_closure_loc;\n"
                    "  return c != 0 && prep != 0 ? 0 : 1;\n"
                    "}\n"
                )
            try:
                objects = self.compiler.compile([src], output_dir=tmp, include_dirs=include_dirs)
                self.compiler.link_executable(
                    objects, "probe", output_dir=tmp, libraries=["ffi"], library_dirs=library_dirs
                )
            except Exception:  # CompileError, LinkError: no libffi
                return False
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _warn_skipped(self, name: str, exc: BaseException) -> None:
        message = (
            f"WARNING: the optional C extension {name} could not be built "
            f"({type(exc).__name__}: {exc}); dartloop will use its pure-Python "
            "fallback instead."
        )
        self.warn(message)


def _pkg_config_libffi() -> tuple[list[str], list[str]]:
    """``pkg-config --cflags/--libs libffi`` as flag lists; empty if unavailable."""
    if shutil.which("pkg-config") is None:
        return [], []
    try:
        cflags = subprocess.run(
            ["pkg-config", "--cflags", "libffi"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        libs = subprocess.run(
            ["pkg-config", "--libs", "libffi"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return [], []
    return cflags, libs


def _extensions() -> list[Extension]:
    if os.environ.get("DARTLOOP_NO_EXTENSIONS") == "1" or os.name != "posix":
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    return [
        Extension(
            "dartloop.ffi._nativequeue",
            sources=["dartloop/ffi/_nativequeue.c"],
            include_dirs=[os.path.join(here, "dartloop", "include")],
            depends=["dartloop/include/dartloop_api.h"],
            extra_compile_args=["-pthread", "-std=c11"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        # The event loop's hot paths in C (dartloop/_loop.py falls back to
        # its pure-Python reference code without it).
        Extension(
            "dartloop._speedups",
            sources=["dartloop/_speedups.c"],
            optional=True,
        ),
    ]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
