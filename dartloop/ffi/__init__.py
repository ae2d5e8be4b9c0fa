"""Native interop: C code calling back into isolates, on any thread.

``NativeCallable`` makes C function pointers whose calls reach a Python
callback on the isolate that created them; ``native_api()`` gives C code the
``DartloopApi`` table of ``post_*`` functions (the ``Dart_PostCObject``
family) to post plain values to any port by its ``SendPort.native_port``
number. ``include_dir()`` is where ``dartloop_api.h`` lives.
"""

from __future__ import annotations

import os

from .._errors import NativeCallbackError as NativeCallbackError
from ._callable import NativeCallable as NativeCallable
from ._queue import IMPLEMENTATION as IMPLEMENTATION
from ._queue import DartloopApi as DartloopApi
from ._queue import native_api as native_api

__all__ = ("DartloopApi", "IMPLEMENTATION", "NativeCallable", "NativeCallbackError", "include_dir", "native_api")


def include_dir() -> str:
    """The directory holding ``dartloop_api.h`` (for ``cc -I``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "include")


for _name in ("NativeCallable", "DartloopApi"):
    globals()[_name].__module__ = "dartloop.ffi"
del _name
