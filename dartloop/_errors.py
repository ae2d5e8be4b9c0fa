"""Exceptions of dartloop, public and internal."""

from __future__ import annotations

__all__ = ["RemoteError", "IsolateSpawnException", "NativeCallbackError"]


class RemoteError(Exception):
    """An error that happened in another isolate, carried as text.

    ``description`` is the last line of ``traceback.format_exception_only``
    (``"ValueError: boom"``); ``stack_trace`` is the remote traceback text.
    ``str(err)`` is the description, as Dart's ``RemoteError.toString``.
    """

    def __init__(self, description: str, stack_trace: str = "") -> None:
        super().__init__(description, stack_trace)
        self.description = description
        self.stack_trace = stack_trace

    def __str__(self) -> str:
        return self.description

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str]]:
        return (RemoteError, (self.description, self.stack_trace))


class IsolateSpawnException(Exception):
    """``Isolate.spawn`` could not start the isolate (for example: not callable)."""


class NativeCallbackError(RuntimeError):
    """A native callback was invoked where it can't run.

    Reported to the owner isolate's uncaught-error path, as the Dart VM's
    fatal "Cannot invoke native callback outside an isolate" is, but without
    taking the process down.
    """


class _IsolateUnwind(SystemExit):
    """Unwinds an isolate's thread: ``Isolate.exit``, ``kill`` or a fatal error.

    A ``SystemExit`` subclass on purpose: asyncio's ``Task.__step`` swallows
    every other ``BaseException`` into the task, and ``Handle._run`` re-raises
    only ``SystemExit`` and ``KeyboardInterrupt``; this one must get all the
    way out of ``run_forever`` to the isolate's thread main.
    """


class _IsolateKilled(_IsolateUnwind):
    """Raised asynchronously (``PyThreadState_SetAsyncExc``) by ``kill(IMMEDIATE)``."""
