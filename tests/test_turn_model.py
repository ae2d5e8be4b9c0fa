"""Property test of the turn: random programs against a model of Dart's loop.

A program is a tree of callbacks. Each callback logs its name, then
schedules its children, each as an event (``loop.call_soon``, ``Timer.run``,
``Timer(0, ...)``, ``future(...)``, ``call_soon_threadsafe``) or as a
microtask (``schedule_microtask``, ``future_microtask``). The model is the
Dart VM's: one FIFO of events; after every event, drain the FIFO of
microtasks completely, including microtasks scheduled meanwhile. Both
backends, both modes, must log exactly the model's order.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dartloop
from dartloop import Timer, future, future_microtask, schedule_microtask

EVENT_KINDS = ("call_soon", "timer_run", "timer_zero", "future", "threadsafe")
MICROTASK_KINDS = ("microtask", "future_microtask")


@dataclass
class Node:
    name: int
    children: list[tuple[str, Node]] = field(default_factory=list)


def _trees(max_leaves: int = 25) -> st.SearchStrategy[list[tuple[str, Node]]]:
    counter = itertools.count()
    kinds = st.sampled_from(EVENT_KINDS + MICROTASK_KINDS)
    leaf = st.builds(lambda: Node(next(counter)))

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        return st.builds(
            lambda kids: Node(next(counter), kids),
            st.lists(st.tuples(kinds, children), max_size=4),
        )

    node = st.recursive(leaf, extend, max_leaves=max_leaves)
    return st.lists(st.tuples(kinds, node), min_size=1, max_size=5)


def model(roots: list[tuple[str, Node]]) -> list[int]:
    """What Dart's loop logs: the roots are scheduled from one event."""
    log: list[int] = []
    events: collections.deque[Node] = collections.deque()
    microtasks: collections.deque[Node] = collections.deque()

    def schedule(children: list[tuple[str, Node]]) -> None:
        for kind, child in children:
            (microtasks if kind in MICROTASK_KINDS else events).append(child)

    def run(node: Node) -> None:
        log.append(node.name)
        schedule(node.children)

    schedule(roots)
    while microtasks:
        run(microtasks.popleft())
    while events:
        run(events.popleft())
        while microtasks:
            run(microtasks.popleft())
    return log


def count(roots: list[tuple[str, Node]]) -> int:
    return sum(1 + count(node.children) for _, node in roots)


async def real(roots: list[tuple[str, Node]]) -> list[int]:
    loop = asyncio.get_running_loop()
    log: list[int] = []
    total = count(roots)
    done = loop.create_future()

    def schedule(children: list[tuple[str, Node]]) -> None:
        for kind, child in children:
            if kind == "call_soon":
                loop.call_soon(run, child)
            elif kind == "threadsafe":  # from the loop's own thread: FIFO too
                loop.call_soon_threadsafe(run, child)
            elif kind == "timer_run":
                Timer.run(lambda c=child: run(c))
            elif kind == "timer_zero":
                Timer(0, lambda c=child: run(c))
            elif kind == "future":
                future(lambda c=child: run(c))
            elif kind == "microtask":
                schedule_microtask(run, child)
            else:
                future_microtask(lambda c=child: run(c))

    def run(node: Node) -> None:
        log.append(node.name)
        schedule(node.children)
        if len(log) == total:
            done.set_result(None)

    # The roots are scheduled from one event, as in the model.
    loop.call_soon(schedule, roots)
    await done
    return log


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("backend", dartloop.available_backends())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(roots=_trees())
def test_random_programs_follow_the_model(backend: str, strict: bool, roots: list[tuple[str, Node]]) -> None:
    expected = model(roots)
    assert dartloop.run(real(roots), backend=backend, strict=strict) == expected
