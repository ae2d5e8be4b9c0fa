"""dartloop: the Dart VM's concurrency model on asyncio.

An asyncio event loop whose turn is Dart's (every event is followed by a
full microtask drain), Dart timers and futures, ports and isolates, and
native callbacks from foreign threads. See the README for the tour.
"""

from __future__ import annotations

from ._errors import IsolateSpawnException as IsolateSpawnException
from ._errors import NativeCallbackError as NativeCallbackError
from ._errors import RemoteError as RemoteError
from ._futures import Completer as Completer
from ._futures import future as future
from ._futures import future_delayed as future_delayed
from ._futures import future_microtask as future_microtask
from ._futures import future_sync as future_sync
from ._futures import future_value as future_value
from ._isolate import Isolate as Isolate
from ._loop import DartEventLoop as DartEventLoop
from ._loop import available_backends as available_backends
from ._loop import default_backend as default_backend
from ._loop import new_event_loop as new_event_loop
from ._message import TransferableTypedData as TransferableTypedData
from ._microtasks import schedule_microtask as schedule_microtask
from ._ports import Capability as Capability
from ._ports import RawReceivePort as RawReceivePort
from ._ports import ReceivePort as ReceivePort
from ._ports import SendPort as SendPort
from ._runner import EventLoopPolicy as EventLoopPolicy
from ._runner import run as run
from ._timers import Timer as Timer

__version__ = "0.1.0"

__all__ = (
    "Capability",
    "Completer",
    "DartEventLoop",
    "EventLoopPolicy",
    "Isolate",
    "IsolateSpawnException",
    "NativeCallbackError",
    "RawReceivePort",
    "ReceivePort",
    "RemoteError",
    "SendPort",
    "Timer",
    "TransferableTypedData",
    "available_backends",
    "default_backend",
    "future",
    "future_delayed",
    "future_microtask",
    "future_sync",
    "future_value",
    "new_event_loop",
    "run",
    "schedule_microtask",
)


def _fix_module_names() -> None:
    # Reprs and docs should say dartloop.Timer, not dartloop._timers.Timer.
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and obj.__module__.startswith("dartloop._"):
            obj.__module__ = "dartloop"


_fix_module_names()
