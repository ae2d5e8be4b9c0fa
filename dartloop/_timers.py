"""Dart timers: ``Timer``, ``Timer.run``, ``Timer.periodic``.

Modelled on the Dart VM's ``timer_impl.dart``:

* a zero-duration timer (``Timer.run``, ``Timer(0, cb)``, a negative
  duration) queues one event in the loop's FIFO at creation, so it is ordered
  with ``call_soon`` callbacks and port messages sent from the same thread;
  that event runs the first zero timer still queued, after any heap timer
  that is due before it;
* other timers sit in a heap ordered by ``(deadline, creation number)``, so
  equal deadlines fire in creation order; one asyncio timer is armed for the
  earliest deadline, and when it fires every expired timer runs in one batch;
* the microtask queue is drained after every single timer callback, also
  inside a batch; timers created while a batch runs never join it;
* a periodic timer's deadline advances by its period from the scheduled
  time, not the actual one; when it is more than a period late, the missed
  ticks are skipped and ``tick`` jumps (Dart's rule).

While an isolate is paused, timer events wait and run in order on resume.
An active timer keeps a spawned isolate alive.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import heapq
import math
from collections.abc import Callable

from ._loop import DartEventLoop
from ._microtasks import running_dart_loop

__all__ = ["Timer", "check_duration"]


def check_duration(duration: object, what: str) -> float:
    """Validate a Dart duration given in seconds; return it as a float.

    Raises ``TypeError`` for a non-number (``timedelta`` included: dartloop
    durations are seconds, the Python convention) and ``ValueError`` for NaN
    or an infinite duration.
    """
    if isinstance(duration, bool) or not isinstance(duration, (int, float)):
        if isinstance(duration, datetime.timedelta):
            raise TypeError(
                f"{what}: durations are seconds as a float, not timedelta (use {duration!r}.total_seconds())"
            )
        try:
            import numbers

            if isinstance(duration, numbers.Real) and not isinstance(duration, bool):
                duration = float(duration)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(
                f"{what}: duration must be a number of seconds, not {type(duration).__name__}"
            ) from None
    d = float(duration)  # type: ignore[arg-type]
    if math.isnan(d) or math.isinf(d):
        raise ValueError(f"{what}: duration must be a finite number of seconds, got {d!r}")
    return d


def _check_callback(callback: object, what: str) -> None:
    if not callable(callback):
        raise TypeError(f"{what}: callback must be callable, got {type(callback).__name__} {callback!r}")


class Timer:
    """A Dart ``Timer``: run ``callback()`` once after ``duration`` seconds.

    ``Timer(duration, callback)`` starts at once. A zero or negative duration
    behaves like :meth:`Timer.run`. The callback runs as its own event on the
    loop that created the timer, and the microtask queue is drained right
    after it. If the callback returns an awaitable, it is run as a task.

    Thread: create, cancel and inspect timers on the loop's thread only.

    Raises ``RuntimeError`` without a running dartloop loop in this thread,
    ``TypeError`` for a non-callable or a duration that is not a number,
    ``ValueError`` for NaN or an infinite duration.
    """

    __slots__ = ("_callback", "_periodic", "_period", "_deadline", "_seq", "_tick", "_queue", "_zero", "__weakref__")
    __dartloop_unsendable__ = True

    _callback: Callable[..., object] | None

    def __init__(self, duration: float, callback: Callable[[], object]) -> None:
        d = check_duration(duration, "Timer()")
        _check_callback(callback, "Timer()")
        self._start(running_dart_loop("Timer()"), d, callback, False)

    def _start(self, loop: DartEventLoop, duration: float, callback: Callable[..., object], periodic: bool) -> None:
        queue = loop._dart_timers
        if queue is None:
            queue = loop._dart_timers = _TimerQueue(loop)
        self._callback = callback
        self._periodic = periodic
        self._period = duration if duration > 0 else 0.0
        self._tick = 0
        self._queue = queue
        queue.add(self)

    @classmethod
    def run(cls, callback: Callable[[], object]) -> None:
        """Run ``callback()`` as an event, queued now in the loop's FIFO.

        Dart's ``Timer.run``: ``Timer.run(a); port.send(x); Timer.run(b)``
        runs ``a``, the handler of ``x``, then ``b``. Returns ``None``.
        """
        _check_callback(callback, "Timer.run()")
        timer = cls.__new__(cls)
        timer._start(running_dart_loop("Timer.run()"), 0.0, callback, False)

    @classmethod
    def periodic(cls, duration: float, callback: Callable[[Timer], object]) -> Timer:
        """Run ``callback(timer)`` every ``duration`` seconds until cancelled.

        The first tick is due ``duration`` after creation; later ones advance
        from the scheduled time, so the rate does not drift. A tick more than
        one period late skips the missed ones: ``tick`` counts elapsed periods,
        not calls. A zero period ticks once per event-loop turn.
        """
        d = check_duration(duration, "Timer.periodic()")
        _check_callback(callback, "Timer.periodic()")
        timer = cls.__new__(cls)
        timer._start(running_dart_loop("Timer.periodic()"), d, callback, True)
        return timer

    def cancel(self) -> None:
        """Stop the timer; idempotent. A cancelled timer's callback never runs again."""
        if self._callback is not None:
            self._callback = None
            self._queue.deactivated()

    @property
    def is_active(self) -> bool:
        """True until a one-shot timer has fired (set before its callback runs) or the timer is cancelled."""
        return self._callback is not None

    @property
    def tick(self) -> int:
        """Elapsed periods (periodic), or 1 once a one-shot timer has fired."""
        return self._tick

    def __lt__(self, other: Timer) -> bool:
        return (self._deadline, self._seq) < (other._deadline, other._seq)

    def __repr__(self) -> str:
        state = "active" if self._callback is not None else "inactive"
        kind = f"periodic {self._period}s" if self._periodic else f"{self._period}s"
        return f"<dartloop.Timer {kind} {state} tick={self._tick}>"


class _TimerQueue:
    """The timers of one loop. Loop thread only."""

    def __init__(self, loop: DartEventLoop) -> None:
        self._loop = loop
        self._heap: list[Timer] = []
        self._zero: collections.deque[Timer] = collections.deque()
        self._seq = 0
        self._active = 0
        self._handling = False
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at = math.inf
        # A deadline this close to loop.time() counts as reached, as in
        # asyncio's own _run_once. uvloop's clock has millisecond steps and
        # its timers round the delay to the nearest millisecond, so they
        # may fire up to half a millisecond before the deadline: without the
        # slack the wakeup would find nothing due and re-arm, spinning.
        self._slack = 1e-3 if loop.backend == "uvloop" else getattr(loop, "_clock_resolution", 1e-9)

    def add(self, timer: Timer) -> None:
        self._active += 1
        self._loop._keepalive += 1
        self._enqueue(timer, self._loop.time())

    def _enqueue(self, timer: Timer, now: float) -> None:
        self._seq += 1
        timer._seq = self._seq
        if timer._period == 0.0:
            timer._deadline = now
            timer._zero = True
            self._zero.append(timer)
            # Every zero timer gets its own event, in the loop's FIFO.
            self._loop.call_soon(self._zero_event)
        else:
            if timer._tick == 0 or not timer._periodic:
                timer._deadline = now + timer._period
            timer._zero = False
            heapq.heappush(self._heap, timer)
            if not self._handling:
                self._arm()

    def deactivated(self) -> None:
        self._active -= 1
        self._loop._keepalive -= 1
        if self._active == 0 and self._wakeup is not None:
            # Nothing left to wait for: drop the wakeup so it does not keep
            # the loop (or a spawned isolate) busy. Cancelled timers stay in
            # the heap and are skipped when popped.
            self._wakeup.cancel()
            self._wakeup = None
            self._wakeup_at = math.inf
            self._heap.clear()

    def _arm(self) -> None:
        heap = self._heap
        while heap and heap[0]._callback is None:
            heapq.heappop(heap)
        if not heap:
            return
        when = heap[0]._deadline
        if when < self._wakeup_at:
            if self._wakeup is not None:
                self._wakeup.cancel()
            self._wakeup_at = when
            self._wakeup = self._loop.call_at(when, self._timeout_event)

    def _held(self, event: Callable[[], None]) -> bool:
        loop = self._loop
        iso = loop._isolate
        if iso is not None and iso.paused:
            iso.hold(event)
            return True
        return False

    def _zero_event(self) -> None:
        if self._held(self._zero_event):
            return
        if not self._zero:
            return
        first = self._zero[0]
        batch = self._pop_heap_before(first)
        self._zero.popleft()
        batch.append(first)
        self._run(batch)

    def _timeout_event(self) -> None:
        self._wakeup = None
        self._wakeup_at = math.inf
        if self._held(self._timeout_event):
            return
        if self._zero:
            batch = self._pop_heap_before(self._zero[0])
        else:
            now = self._loop.time() + self._slack
            batch = []
            heap = self._heap
            while heap and heap[0]._deadline <= now:
                batch.append(heapq.heappop(heap))
        self._run(batch)

    def _pop_heap_before(self, limit: Timer) -> list[Timer]:
        heap = self._heap
        batch = []
        while heap and heap[0] < limit:
            batch.append(heapq.heappop(heap))
        return batch

    def _run(self, batch: list[Timer]) -> None:
        loop = self._loop
        self._handling = True
        i = 0
        try:
            while i < len(batch):
                timer = batch[i]
                i += 1
                callback = timer._callback
                if callback is None:
                    continue
                if not timer._periodic:
                    timer._callback = None
                    self.deactivated()
                elif timer._period > 0:
                    overdue = loop.time() - timer._deadline
                    if overdue > timer._period:
                        missed = int(overdue // timer._period)
                        timer._deadline += missed * timer._period
                        timer._tick += missed
                timer._tick += 1
                try:
                    result = callback(timer) if timer._periodic else callback()
                    if result is not None and hasattr(result, "__await__"):
                        loop.create_task(result)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    loop._report_callback_error(exc, callback, ())
                if timer._periodic and timer._callback is not None:
                    if timer._period > 0:
                        timer._deadline += timer._period
                        self._seq += 1
                        timer._seq = self._seq
                        heapq.heappush(self._heap, timer)
                    else:
                        self._enqueue(timer, loop.time())
                if loop._microtasks:
                    loop._run_pending_immediate_callback()
        finally:
            self._handling = False
            # Timers of the batch that did not run (an exception unwound it)
            # go back to wait for a later event, as in Dart.
            for timer in batch[i:]:
                if timer._callback is not None:
                    if timer._zero:
                        self._zero.appendleft(timer)
                        loop.call_soon(self._zero_event)
                    else:
                        heapq.heappush(self._heap, timer)
            self._arm()
