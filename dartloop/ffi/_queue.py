"""The native message queue: the C extension if available, else the pure fallback.

``dartloop.ffi._nativequeue`` is used unless ``DARTLOOP_NO_EXTENSIONS=1`` is
set in the environment or it cannot be imported (not built); then
``dartloop.ffi._pyqueue``, which has the same interface.  ``IMPLEMENTATION``
says which one was picked (``"c"`` or ``"python"``).

Also defines :class:`DartloopApi`, the ctypes mirror of
``dartloop/include/dartloop_api.h``, and :func:`native_api`.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Literal

__all__ = [
    "IMPLEMENTATION",
    "DartloopApi",
    "NativeQueue",
    "api_address",
    "api_struct_size",
    "bind_port",
    "native_api",
    "post_int64",
    "unbind_port",
]

IMPLEMENTATION: Literal["c", "python"]

if TYPE_CHECKING:
    from ._pyqueue import NativeQueue, api_address, api_struct_size, bind_port, post_int64, unbind_port
elif os.environ.get("DARTLOOP_NO_EXTENSIONS") == "1":
    from ._pyqueue import NativeQueue, api_address, api_struct_size, bind_port, post_int64, unbind_port

    IMPLEMENTATION = "python"
else:
    try:
        from ._nativequeue import NativeQueue, api_address, api_struct_size, bind_port, post_int64, unbind_port
    except ImportError:
        from ._pyqueue import NativeQueue, api_address, api_struct_size, bind_port, post_int64, unbind_port

        IMPLEMENTATION = "python"
    else:
        IMPLEMENTATION = "c"


class DartloopApi(ctypes.Structure):
    """ctypes mirror of ``struct DartloopApi`` (``dartloop/include/dartloop_api.h``).

    Every ``post_*`` field may be called from any thread and returns ``True``
    iff the message was queued to an open port.  Obtain the process-wide
    instance with :func:`native_api`; ``ctypes.addressof()`` of it is the
    ``const DartloopApi *`` to hand to C code.  Treat it as read-only (the
    native implementation's table lives in read-only memory).
    """

    _fields_ = (
        ("version", ctypes.c_int32),
        ("post_null", ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64)),
        ("post_int64", ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_int64)),
        ("post_double", ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_double)),
        ("post_string", ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_char_p)),
        (
            "post_bytes",
            ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_void_p, ctypes.c_ssize_t),
        ),
        # intptr_t: ctypes has no c_intptr_t; ssize_t has its size everywhere we build.
        ("post_intptr", ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int64, ctypes.c_ssize_t)),
    )


def native_api() -> DartloopApi:
    """Any thread.  The process-wide ``DartloopApi`` of the selected implementation."""
    return DartloopApi.from_address(api_address())
