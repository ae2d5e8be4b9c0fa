"""Tests for the native message queue behind the C posting API.

Every test runs against both implementations: the C extension
``dartloop.ffi._nativequeue`` (skipped if it was not built, unless
``DARTLOOP_REQUIRE_EXTENSIONS=1``) and the pure fallback ``dartloop.ffi._pyqueue``.
The multi-threaded tests compile a small C library at test time whose pthreads
post through the ``DartloopApi`` table, as a real native library would; no
event loop is involved, the test thread waits for wakeups with a selector.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import random
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dartloop.ffi import _queue
from dartloop.ffi._queue import DartloopApi

INCLUDE_DIR = Path(_queue.__file__).resolve().parents[1] / "include"
WAIT_TIMEOUT = 90.0  # seconds without progress before a drain loop gives up

# --------------------------------------------------------------------------
# The C helper library
# --------------------------------------------------------------------------

POSTERS_C = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "dartloop_api.h"

enum { MODE_INT64 = 0, MODE_MIXED = 1, MODE_MIXED_UNTIL_FALSE = 2 };

typedef struct {
    const DartloopApi *api;
    int64_t port;
    int thread_id;
    int mode;
    int64_t count;
    int64_t ok;               /* posts that returned true before the first false */
    int64_t first_false;      /* sequence number of the first false, or -1 */
    int64_t true_after_false; /* must stay 0: a port never reopens */
    atomic_int *done;
} poster;

typedef struct {
    int n;
    atomic_int done;
    pthread_t *threads;
    poster *posters;
} group;

static int64_t tag_of(int t, int64_t i) { return ((int64_t)t << 40) | i; }

/* The value of message i of thread t is recomputed by expected_value() in Python. */
static bool post_one(const poster *p, int64_t i)
{
    const DartloopApi *api = p->api;
    int t = p->thread_id;
    int64_t tag = tag_of(t, i);
    if (p->mode == MODE_INT64) {
        return api->post_int64(p->port, tag);
    }
    switch (i % 6) {
    case 0:
        return api->post_null(p->port);
    case 1:
        return api->post_int64(p->port, tag);
    case 2:
        return api->post_double(p->port, (double)t * 1e9 + (double)i + 0.5);
    case 3: {
        char buf[64];
        if ((i / 6) % 2 == 0) {
            snprintf(buf, sizeof buf, "t%d:%lld", t, (long long)i);
        } else {
            snprintf(buf, sizeof buf, "t%d:%lld:\xc3\xbc\xe2\x82\xac\xf0\x9f\x98\x80", t, (long long)i);
        }
        return api->post_string(p->port, buf);
    }
    case 4: {
        if ((i / 6) % 3 == 2) {
            return api->post_bytes(p->port, NULL, 0);
        }
        uint8_t buf[10];
        buf[0] = 'b';
        buf[1] = 0;
        for (int k = 0; k < 8; k++) {
            buf[2 + k] = (uint8_t)((uint64_t)tag >> (8 * k));
        }
        return api->post_bytes(p->port, buf, 10);
    }
    default:
        return api->post_intptr(p->port, -(intptr_t)tag);
    }
}

static void *poster_main(void *arg)
{
    poster *p = (poster *)arg;
    int64_t extra = 0;
    for (int64_t i = 0; i < p->count; i++) {
        if (post_one(p, i)) {
            if (p->first_false < 0) {
                p->ok++;
            } else {
                p->true_after_false++;
            }
        } else if (p->first_false < 0) {
            p->first_false = i;
        }
        /* Until-false mode: after the first failure, check 1000 more posts fail too. */
        if (p->mode == MODE_MIXED_UNTIL_FALSE && p->first_false >= 0 && ++extra > 1000) {
            break;
        }
    }
    atomic_fetch_add_explicit(p->done, 1, memory_order_release);
    return NULL;
}

void *start_posters(const DartloopApi *api, int n, const int64_t *ports, int mode, int64_t count)
{
    group *g = calloc(1, sizeof *g);
    g->n = n;
    atomic_init(&g->done, 0);
    g->threads = calloc((size_t)n, sizeof(pthread_t));
    g->posters = calloc((size_t)n, sizeof(poster));
    for (int t = 0; t < n; t++) {
        poster *p = &g->posters[t];
        p->api = api;
        p->port = ports[t];
        p->thread_id = t;
        p->mode = mode;
        p->count = count;
        p->first_false = -1;
        p->done = &g->done;
    }
    for (int t = 0; t < n; t++) {
        if (pthread_create(&g->threads[t], NULL, poster_main, &g->posters[t]) != 0) {
            abort();
        }
    }
    return g;
}

int posters_done(void *gp)
{
    return atomic_load_explicit(&((group *)gp)->done, memory_order_acquire);
}

/* Joins and frees the group; out receives (ok, first_false, true_after_false) per thread. */
void join_posters(void *gp, int64_t *out)
{
    group *g = (group *)gp;
    for (int t = 0; t < g->n; t++) {
        pthread_join(g->threads[t], NULL);
        out[3 * t] = g->posters[t].ok;
        out[3 * t + 1] = g->posters[t].first_false;
        out[3 * t + 2] = g->posters[t].true_after_false;
    }
    free(g->threads);
    free(g->posters);
    free(g);
}

size_t api_size(void) { return sizeof(DartloopApi); }

size_t api_offset(int i)
{
    static const size_t offsets[] = {
        offsetof(DartloopApi, version), offsetof(DartloopApi, post_null),
        offsetof(DartloopApi, post_int64), offsetof(DartloopApi, post_double),
        offsetof(DartloopApi, post_string), offsetof(DartloopApi, post_bytes),
        offsetof(DartloopApi, post_intptr),
    };
    return offsets[i];
}

/* Direct C calls, to test invalid inputs exactly as C code would pass them. */
bool c_post_string(const DartloopApi *api, int64_t port, const char *s) { return api->post_string(port, s); }
bool c_post_bytes(const DartloopApi *api, int64_t port, const uint8_t *d, intptr_t n) { return api->post_bytes(port, d, n); }
"""

MODE_INT64, MODE_MIXED, MODE_MIXED_UNTIL_FALSE = 0, 1, 2


@dataclass
class PosterResult:
    ok: int
    first_false: int
    true_after_false: int


class Posters:
    """The compiled helper library (ctypes)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.start_posters.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_int,
            ctypes.c_int64,
        ]
        lib.start_posters.restype = ctypes.c_void_p
        lib.posters_done.argtypes = [ctypes.c_void_p]
        lib.posters_done.restype = ctypes.c_int
        lib.join_posters.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)]
        lib.join_posters.restype = None
        lib.api_size.restype = ctypes.c_size_t
        lib.api_offset.argtypes = [ctypes.c_int]
        lib.api_offset.restype = ctypes.c_size_t
        lib.c_post_string.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p]
        lib.c_post_string.restype = ctypes.c_bool
        lib.c_post_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_ssize_t]
        lib.c_post_bytes.restype = ctypes.c_bool
        self.lib = lib

    def start(self, api_address: int, ports: Sequence[int], mode: int, count: int) -> PosterGroup:
        arr = (ctypes.c_int64 * len(ports))(*ports)
        handle = self.lib.start_posters(api_address, len(ports), arr, mode, count)
        return PosterGroup(self.lib, handle, len(ports))


class PosterGroup:
    def __init__(self, lib: ctypes.CDLL, handle: int, n: int) -> None:
        self._lib = lib
        self._handle: int | None = handle
        self.n = n

    def all_done(self) -> bool:
        assert self._handle is not None
        return bool(self._lib.posters_done(self._handle) == self.n)

    def join(self) -> list[PosterResult]:
        assert self._handle is not None
        out = (ctypes.c_int64 * (3 * self.n))()
        self._lib.join_posters(self._handle, out)
        self._handle = None
        return [PosterResult(out[3 * t], out[3 * t + 1], out[3 * t + 2]) for t in range(self.n)]


@pytest.fixture(scope="session")
def posters(tmp_path_factory: pytest.TempPathFactory) -> Posters:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc})")
    tmp = tmp_path_factory.mktemp("posters")
    src = tmp / "posters.c"
    src.write_text(POSTERS_C)
    lib = tmp / "libposters.so"
    proc = subprocess.run(
        [cc, "-O2", "-std=c11", "-Wall", "-Werror", "-shared", "-fPIC", "-pthread",
         f"-I{INCLUDE_DIR}", str(src), "-o", str(lib)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"compiling the poster library failed:\n{proc.stderr}")
    return Posters(lib)


# --------------------------------------------------------------------------
# The two implementations
# --------------------------------------------------------------------------


@dataclass
class Impl:
    name: str
    mod: ModuleType
    api: DartloopApi
    fast: bool  # the native post path; the pure one takes the GIL per post

    def scaled(self, n: int, python_n: int | None = None) -> int:
        return n if self.fast or python_n is None else python_n


_next_port = random.Random().randrange(1 << 40, 1 << 50)


def new_port() -> int:
    """A fresh port number (distinct per call; large, like the real ones)."""
    global _next_port
    _next_port += 7919
    return _next_port


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> Iterator[Impl]:
    if request.param == "c":
        try:
            mod = importlib.import_module("dartloop.ffi._nativequeue")
        except ImportError as exc:
            if os.environ.get("DARTLOOP_REQUIRE_EXTENSIONS") == "1":
                raise
            pytest.skip(f"C extension not built: {exc}")
    else:
        mod = importlib.import_module("dartloop.ffi._pyqueue")
    yield Impl(request.param, mod, DartloopApi.from_address(mod.api_address()), request.param == "c")


@pytest.fixture
def queue(impl: Impl) -> Iterator[Any]:
    q = impl.mod.NativeQueue()
    yield q
    q.close()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def expected_value(t: int, i: int, mode: int) -> object:
    """What message i of poster thread t must arrive as (mirrors post_one in C)."""
    tag = (t << 40) | i
    if mode == MODE_INT64:
        return tag
    k = i % 6
    if k == 0:
        return None
    if k == 1:
        return tag
    if k == 2:
        return t * 1e9 + i + 0.5
    if k == 3:
        return f"t{t}:{i}" if (i // 6) % 2 == 0 else f"t{t}:{i}:ü€😀"
    if k == 4:
        return b"" if (i // 6) % 3 == 2 else b"b\x00" + tag.to_bytes(8, "little")
    return -tag


def check_stream(values: list[object], t: int, mode: int, start: int = 0) -> None:
    """values are consecutive messages of thread t starting at sequence start."""
    for offset, value in enumerate(values):
        want = expected_value(t, start + offset, mode)
        if value != want or type(value) is not type(want):
            pytest.fail(f"thread {t} message {start + offset}: got {value!r}, want {want!r}")


def drain_all(
    queues: Sequence[Any], stop: Any, *, on_batch: Any = None
) -> dict[Any, list[tuple[int, object]]]:
    """Drain queues, waiting for their wakeups, until stop() is true.

    Returns everything drained, per queue.  Waits only on the fds (no sleeps);
    a lost wakeup shows up as a timeout.
    """
    got: dict[Any, list[tuple[int, object]]] = {q: [] for q in queues}
    sel = selectors.DefaultSelector()
    for q in queues:
        sel.register(q, selectors.EVENT_READ)
    try:
        last_progress = time.monotonic()
        while not stop(got):
            events = sel.select(timeout=0.5)
            for key, _ in events:
                batch = key.fileobj.drain()  # type: ignore[union-attr]
                if batch:
                    last_progress = time.monotonic()
                    got[key.fileobj].extend(batch)
                    if on_batch is not None:
                        on_batch(key.fileobj, batch)
            if time.monotonic() - last_progress > WAIT_TIMEOUT:
                pytest.fail("no wakeup for too long: a wakeup was lost or posters hung")
    finally:
        sel.close()
    return got


def readable(q: Any) -> bool:
    sel = selectors.DefaultSelector()
    try:
        sel.register(q, selectors.EVENT_READ)
        return bool(sel.select(timeout=0))
    finally:
        sel.close()


def split_by_port(items: list[tuple[int, object]]) -> dict[int, list[object]]:
    out: dict[int, list[object]] = {}
    for port, value in items:
        out.setdefault(port, []).append(value)
    return out


# --------------------------------------------------------------------------
# The ABI
# --------------------------------------------------------------------------


def test_selected_implementation() -> None:
    want = "python" if os.environ.get("DARTLOOP_NO_EXTENSIONS") == "1" else None
    assert _queue.IMPLEMENTATION in ("c", "python")
    if want is not None:
        assert _queue.IMPLEMENTATION == want
    assert _queue.native_api().version == 1
    assert _queue.api_struct_size() == ctypes.sizeof(DartloopApi)


def test_struct_layout_matches_header(impl: Impl, posters: Posters) -> None:
    assert impl.mod.api_struct_size() == posters.lib.api_size() == ctypes.sizeof(DartloopApi)
    names = [name for name, _ in DartloopApi._fields_]
    assert names == ["version", "post_null", "post_int64", "post_double", "post_string", "post_bytes", "post_intptr"]
    for i, name in enumerate(names):
        assert getattr(DartloopApi, name).offset == posters.lib.api_offset(i), name
    assert impl.api.version == 1
    assert all(getattr(impl.api, name) for name in names[1:])  # non-NULL pointers


def test_pure_struct_mirrors_public_struct() -> None:
    from dartloop.ffi import _pyqueue

    ours = [(n, ctypes.sizeof(t)) for n, t in _pyqueue._DartloopApi._fields_]
    public = [(n, ctypes.sizeof(t)) for n, t in DartloopApi._fields_]
    assert ours == public
    for (_, ta), (_, tb) in zip(_pyqueue._DartloopApi._fields_[1:], DartloopApi._fields_[1:]):
        assert (ta._restype_, ta._argtypes_) == (tb._restype_, tb._argtypes_)


# --------------------------------------------------------------------------
# Single-threaded behaviour
# --------------------------------------------------------------------------


def test_round_trip_all_types(impl: Impl, queue: Any) -> None:
    port = new_port()
    impl.mod.bind_port(port, queue)
    api = impl.api
    assert queue.drain() == []
    assert api.post_null(port)
    assert api.post_int64(port, -(2**63))
    assert api.post_int64(port, 2**63 - 1)
    assert api.post_double(port, -0.25)
    assert api.post_double(port, float("inf"))
    assert api.post_string(port, b"")
    assert api.post_string(port, b"plain ascii, longer than eight bytes")
    assert api.post_string(port, "héllo wörld €😀 \U0010ffff \uffff".encode())
    assert api.post_bytes(port, b"\x00\xff\x00", 3)
    assert api.post_bytes(port, None, 0)
    assert api.post_intptr(port, -1)
    assert api.post_intptr(port, 2**63 - 1 if ctypes.sizeof(ctypes.c_void_p) == 8 else 2**31 - 1)
    assert queue.pending() == 12
    items = queue.drain()
    assert queue.pending() == 0
    values = [v for _, v in items]
    assert {p for p, _ in items} == {port}
    assert values[:4] == [None, -(2**63), 2**63 - 1, -0.25]
    assert values[4] == float("inf")
    assert values[5:8] == ["", "plain ascii, longer than eight bytes", "héllo wörld €😀 \U0010ffff \uffff"]
    assert values[8:10] == [b"\x00\xff\x00", b""]
    assert values[10] == -1
    assert [type(v) for v in values] == [
        type(None), int, int, float, float, str, str, str, bytes, bytes, int, int
    ]
    assert queue.drain() == []


def test_fifo_across_ports_of_one_queue(impl: Impl, queue: Any) -> None:
    ports = [new_port() for _ in range(3)]
    for p in ports:
        impl.mod.bind_port(p, queue)
    sent = [(ports[i % 3], i) for i in range(3000)]
    for p, v in sent:
        assert impl.api.post_int64(p, v)
    assert queue.drain() == sent


def test_drain_flat_is_drain_flattened(impl: Impl, queue: Any) -> None:
    """drain_flat(): drain()'s messages in the same order as [port, value, ...],
    one int object for the port of a run of messages to it."""
    a, b = new_port(), new_port()
    impl.mod.bind_port(a, queue)
    impl.mod.bind_port(b, queue)
    assert queue.drain_flat() == []
    sent = [(a, 1), (a, 2), (b, 3), (a, 4), (a, 5), (a, 6), (b, 7)]
    for p, v in sent:
        assert impl.api.post_int64(p, v)
    assert impl.api.post_string(b, b"s")
    assert impl.api.post_null(b)
    sent += [(b, "s"), (b, None)]
    flat = queue.drain_flat()
    assert flat == [x for pair in sent for x in pair]
    ports = flat[0::2]
    assert ports[0] is ports[1]
    assert ports[3] is ports[4] is ports[5]
    assert ports[6] is ports[7] is ports[8]
    assert not readable(queue)
    assert queue.drain_flat() == []


def test_drain_flat_limit(impl: Impl, queue: Any) -> None:
    port = new_port()
    impl.mod.bind_port(port, queue)
    for i in range(3000):
        assert impl.api.post_int64(port, i)
    first = queue.drain_flat(10)
    # At least the limit (the C queue takes whole chunks), oldest first; the
    # wakeup stays pending for the rest.
    assert 20 <= len(first) < 6000
    assert first[1::2] == list(range(len(first) // 2))
    assert readable(queue)
    rest = queue.drain_flat()
    assert (first + rest)[1::2] == list(range(3000))
    assert set((first + rest)[0::2]) == {port}
    assert not readable(queue)
    with pytest.raises(ValueError):
        queue.drain_flat(0)
    with pytest.raises(TypeError):
        queue.drain_flat(1, 2)


def test_unknown_and_unbound_ports_return_false(impl: Impl, queue: Any) -> None:
    api = impl.api
    port = new_port()
    for bad in (port, 0, -1, -(2**63), 2**63 - 1):
        assert not api.post_null(bad)
        assert not api.post_int64(bad, 1)
        assert not api.post_double(bad, 1.0)
        assert not api.post_string(bad, b"x")
        assert not api.post_bytes(bad, b"x", 1)
        assert not api.post_intptr(bad, 1)
    impl.mod.bind_port(port, queue)
    assert api.post_int64(port, 1)
    assert impl.mod.unbind_port(port) is True
    assert impl.mod.unbind_port(port) is False
    assert not api.post_int64(port, 2)
    assert not api.post_string(port, b"y")
    assert queue.drain() == [(port, 1)]
    # An unbound port can be bound again.
    impl.mod.bind_port(port, queue)
    assert api.post_int64(port, 3)
    assert queue.drain() == [(port, 3)]


def test_invalid_inputs_return_false(impl: Impl, queue: Any, posters: Posters) -> None:
    port = new_port()
    impl.mod.bind_port(port, queue)
    addr = impl.mod.api_address()
    lib = posters.lib
    assert not lib.c_post_string(addr, port, None)
    assert not lib.c_post_bytes(addr, port, None, 1)
    assert not lib.c_post_bytes(addr, port, b"abc", -1)
    assert not lib.c_post_bytes(addr, port, None, -5)
    assert not impl.api.post_string(port, None)
    assert not impl.api.post_bytes(port, None, 7)
    assert not impl.api.post_bytes(port, b"abc", -(2**62))
    assert queue.pending() == 0
    assert not readable(queue)
    assert lib.c_post_bytes(addr, port, None, 0)
    assert lib.c_post_bytes(addr, port, b"abc", 2)
    assert queue.drain() == [(port, b""), (port, b"ab")]


INVALID_UTF8 = [
    b"\x80",  # lone continuation byte
    b"\xbf",
    b"\xc0\x80",  # overlong NUL
    b"\xc1\xbf",  # overlong
    b"\xc2",  # truncated
    b"\xe0\x80\x80",  # overlong 3-byte
    b"\xe0\x9f\xbf",
    b"\xe2\x82",  # truncated 3-byte
    b"\xe2\x28\xa1",  # bad continuation
    b"\xed\xa0\x80",  # surrogate U+D800
    b"\xed\xbf\xbf",  # surrogate U+DFFF
    b"\xf0\x80\x80\x80",  # overlong 4-byte
    b"\xf0\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\xfe",
    b"\xff",
    b"\xf0\x9f\x98",  # truncated emoji
    b"abcdefghij\xe2\x82",  # invalid after the 8-byte ASCII fast path
    b"abcdefgh\x80ijklmnop",
    "ok é".encode() + b"\xc3",
]
VALID_UTF8 = [
    b"\x7f",
    b"\xc2\x80",
    b"\xdf\xbf",
    b"\xe0\xa0\x80",
    b"\xed\x9f\xbf",  # U+D7FF, just below the surrogates
    b"\xee\x80\x80",  # U+E000, just above
    b"\xef\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",  # U+10FFFF
    b"abcdefgh" * 5 + "é".encode(),
]


def test_string_utf8_validation(impl: Impl, queue: Any, posters: Posters) -> None:
    port = new_port()
    impl.mod.bind_port(port, queue)
    addr = impl.mod.api_address()
    for raw in INVALID_UTF8:
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        assert not posters.lib.c_post_string(addr, port, raw), raw
    assert queue.pending() == 0
    for raw in VALID_UTF8:
        assert posters.lib.c_post_string(addr, port, raw), raw
    assert [v for _, v in queue.drain()] == [raw.decode("utf-8") for raw in VALID_UTF8]


def test_string_utf8_validation_agrees_with_python(impl: Impl, queue: Any) -> None:
    port = new_port()
    impl.mod.bind_port(port, queue)
    rng = random.Random(1234)
    alphabet = [0x41, 0x7F, 0x80, 0xBF, 0xC0, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF, 0x9F, 0xA0, 0x8F, 0x90]
    expected: list[str] = []
    for _ in range(impl.scaled(20000, 4000)):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
        try:
            want: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            want = None
        assert impl.api.post_string(port, raw) == (want is not None), raw
        if want is not None:
            expected.append(want)
    assert [v for _, v in queue.drain()] == expected


def test_bind_port_errors(impl: Impl, queue: Any) -> None:
    mod = impl.mod
    port = new_port()
    mod.bind_port(port, queue)
    with pytest.raises(ValueError, match="already bound"):
        mod.bind_port(port, queue)
    other = mod.NativeQueue()
    try:
        with pytest.raises(ValueError, match="already bound"):
            mod.bind_port(port, other)
    finally:
        other.close()
    for bad in (0, -1, -(2**63)):
        with pytest.raises(ValueError):
            mod.bind_port(bad, queue)
    for huge in (2**63, -(2**63) - 1):
        with pytest.raises(OverflowError):
            mod.bind_port(huge, queue)
    with pytest.raises(TypeError):
        mod.bind_port("1", queue)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mod.bind_port(new_port(), object())
    with pytest.raises(TypeError):
        mod.unbind_port(1.5)  # type: ignore[arg-type]
    assert mod.unbind_port(0) is False
    assert mod.unbind_port(-3) is False
    assert mod.unbind_port(2**70) is False
    mod.bind_port(2**63 - 1, queue)  # the largest port works
    assert impl.api.post_null(2**63 - 1)
    assert queue.drain() == [(2**63 - 1, None)]
    assert mod.unbind_port(2**63 - 1) is True


def test_many_ports_table_growth(impl: Impl) -> None:
    queues = [impl.mod.NativeQueue() for _ in range(4)]
    try:
        ports = [new_port() for _ in range(3000)]
        for i, p in enumerate(ports):
            impl.mod.bind_port(p, queues[i % 4])
        for i, p in enumerate(ports):
            assert impl.api.post_int64(p, i)
        for k, q in enumerate(queues):
            assert q.drain() == [(p, i) for i, p in enumerate(ports) if i % 4 == k]
        # Unbind every other port, then check lookups still find the rest.
        for p in ports[::2]:
            assert impl.mod.unbind_port(p)
        for i, p in enumerate(ports):
            assert impl.api.post_int64(p, i) == (i % 2 == 1)
        assert sum(q.pending() for q in queues) == len(ports) // 2
        # Closing a queue unbinds exactly its ports.
        queues[1].close()
        for i, p in enumerate(ports):
            assert impl.api.post_null(p) == (i % 2 == 1 and i % 4 != 1)
    finally:
        for q in queues:
            q.close()


def test_close(impl: Impl) -> None:
    mod = impl.mod
    q = mod.NativeQueue()
    fd = q.fileno()
    assert fd >= 0 and not q.closed
    ports = [new_port(), new_port()]
    for p in ports:
        mod.bind_port(p, q)
    for i in range(10):
        assert impl.api.post_string(ports[i % 2], f"msg {i}".encode())
    assert q.pending() == 10
    q.close()
    assert q.closed
    assert q.fileno() == -1
    assert q.pending() == 0
    assert q.drain() == []
    assert q._discarded == 10
    with pytest.raises(OSError):
        os.fstat(fd)  # the fd is closed
    for p in ports:
        assert not impl.api.post_int64(p, 1)
        assert mod.unbind_port(p) is False  # close unbound them
    q.close()  # idempotent
    assert q._discarded == 10
    with pytest.raises(ValueError, match="closed"):
        mod.bind_port(new_port(), q)
    # The ports are free for another queue.
    q2 = mod.NativeQueue()
    try:
        mod.bind_port(ports[0], q2)
        assert impl.api.post_int64(ports[0], 5)
        assert q2.drain() == [(ports[0], 5)]
    finally:
        q2.close()


def test_dropping_a_queue_unbinds_its_ports(impl: Impl) -> None:
    q = impl.mod.NativeQueue()
    port = new_port()
    impl.mod.bind_port(port, q)
    assert impl.api.post_bytes(port, b"pending", 7)
    del q
    gc.collect()
    assert not impl.api.post_int64(port, 1)
    assert impl.mod.unbind_port(port) is False


def test_queues_have_their_own_fds(impl: Impl) -> None:
    qs = [impl.mod.NativeQueue() for _ in range(3)]
    try:
        assert len({q.fileno() for q in qs}) == 3
        for q in qs:
            assert os.get_inheritable(q.fileno()) is False
            assert os.get_blocking(q.fileno()) is False
    finally:
        for q in qs:
            q.close()


def test_wakeup_is_consumed_and_rearmed(impl: Impl, queue: Any) -> None:
    port = new_port()
    impl.mod.bind_port(port, queue)
    assert not readable(queue)
    assert queue.drain() == []  # no wakeup pending: returns at once
    for round_ in range(3):
        assert impl.api.post_int64(port, round_)
        assert readable(queue)
        assert impl.api.post_int64(port, round_ + 100)
        assert queue.drain() == [(port, round_), (port, round_ + 100)]
        assert not readable(queue)


def test_wakeup_coalescing(impl: Impl, queue: Any, posters: Posters) -> None:
    """100,000 posts with no drain in between leave exactly one wakeup."""
    port = new_port()
    impl.mod.bind_port(port, queue)
    n = 100_000
    group = posters.start(impl.mod.api_address(), [port], MODE_INT64, n)
    (result,) = group.join()
    assert result == PosterResult(n, -1, 0)
    assert queue.pending() == n
    assert readable(queue)
    if impl.mod.HAVE_EVENTFD:
        counter = int.from_bytes(os.read(queue.fileno(), 8), sys.byteorder)
        assert counter == 1
    else:
        assert os.read(queue.fileno(), 4096) == b"\x01"
    assert not readable(queue)
    # drain() copes with a wakeup that someone else consumed.
    items = queue.drain()
    assert len(items) == n
    check_stream([v for _, v in items], 0, MODE_INT64)
    assert not readable(queue)


# --------------------------------------------------------------------------
# C threads
# --------------------------------------------------------------------------


def test_eight_threads_int64_per_thread_fifo(impl: Impl, queue: Any, posters: Posters) -> None:
    """8 C threads x 100,000 int64 posts to one port, drained while they run."""
    n_threads, n = 8, 100_000
    port = new_port()
    impl.mod.bind_port(port, queue)
    total = n_threads * n
    batches: list[int] = []
    group = posters.start(impl.mod.api_address(), [port] * n_threads, MODE_INT64, n)
    got = drain_all([queue], lambda g: len(g[queue]) >= total, on_batch=lambda q, b: batches.append(len(b)))
    results = group.join()
    assert all(r == PosterResult(n, -1, 0) for r in results)
    items = got[queue]
    assert len(items) == total
    assert queue.pending() == 0
    assert queue.drain() == []
    assert not readable(queue)
    per_thread: list[list[int]] = [[] for _ in range(n_threads)]
    for p, v in items:
        assert p == port
        assert type(v) is int
        per_thread[v >> 40].append(v & ((1 << 40) - 1))  # type: ignore[operator]
    for t in range(n_threads):
        assert per_thread[t] == list(range(n)), f"thread {t} out of order"
    assert sum(batches) == total


def test_mixed_types_two_queues(impl: Impl, posters: Posters) -> None:
    """4 C threads post every type to ports of two queues; exact contents, per-thread FIFO."""
    n = impl.scaled(60_000, 12_000)
    q1, q2 = impl.mod.NativeQueue(), impl.mod.NativeQueue()
    try:
        ports = [new_port() for _ in range(4)]
        owner = [q1, q2, q1, q2]
        for p, q in zip(ports, owner):
            impl.mod.bind_port(p, q)
        group = posters.start(impl.mod.api_address(), ports, MODE_MIXED, n)
        got = drain_all([q1, q2], lambda g: len(g[q1]) + len(g[q2]) >= 4 * n)
        results = group.join()
        assert all(r == PosterResult(n, -1, 0) for r in results)
        assert len(got[q1]) == len(got[q2]) == 2 * n
        for q in (q1, q2):
            by_port = split_by_port(got[q])
            assert set(by_port) == {p for p, o in zip(ports, owner) if o is q}
            for t, p in enumerate(ports):
                if owner[t] is q:
                    assert len(by_port[p]) == n
                    check_stream(by_port[p], t, MODE_MIXED)
            assert not readable(q)
    finally:
        q1.close()
        q2.close()


def test_unbind_while_threads_post(impl: Impl, queue: Any, posters: Posters) -> None:
    n_threads = 4
    ports = [new_port() for _ in range(n_threads)]
    for p in ports:
        impl.mod.bind_port(p, queue)
    unbound: list[int] = []

    def on_batch(q: Any, batch: list[tuple[int, object]]) -> None:
        if not unbound:
            for p in ports:
                assert impl.mod.unbind_port(p)
            unbound.append(1)

    group = posters.start(impl.mod.api_address(), ports, MODE_MIXED_UNTIL_FALSE, 10**9)
    got = drain_all([queue], lambda g: bool(unbound) and group.all_done(), on_batch=on_batch)
    results = group.join()
    got[queue].extend(queue.drain())
    by_port = split_by_port(got[queue])
    for t, (p, r) in enumerate(zip(ports, results)):
        assert r.true_after_false == 0
        assert r.first_false == r.ok  # every post before the unbind succeeded
        # The queue stayed open: every accepted message was delivered, in order.
        assert len(by_port.get(p, [])) == r.ok
        check_stream(by_port.get(p, []), t, MODE_MIXED)


@pytest.mark.parametrize("n_threads", [1, 8])
def test_close_while_threads_post(impl: Impl, posters: Posters, n_threads: int) -> None:
    """Every post that returned true was either drained or freed by close()."""
    rounds = impl.scaled(15, 3)
    for _ in range(rounds):
        q = impl.mod.NativeQueue()
        ports = [new_port() for _ in range(n_threads)]
        for p in ports:
            impl.mod.bind_port(p, q)
        drained: list[tuple[int, object]] = []
        group = posters.start(impl.mod.api_address(), ports, MODE_MIXED_UNTIL_FALSE, 10**9)
        # Let some messages through, then close while the threads still post.
        got = drain_all([q], lambda g: len(g[q]) >= 100)
        drained.extend(got[q])
        q.close()
        results = group.join()
        by_port = split_by_port(drained)
        for t, (p, r) in enumerate(zip(ports, results)):
            assert r.first_false >= 0, "every thread must have seen the close"
            assert r.first_false == r.ok
            assert r.true_after_false == 0
            mine = by_port.get(p, [])
            assert len(mine) <= r.ok
            check_stream(mine, t, MODE_MIXED)  # a FIFO prefix of what was accepted
        assert sum(r.ok for r in results) == len(drained) + q._discarded
        assert q.pending() == 0
        assert q.drain() == []
        for p in ports:
            assert not impl.api.post_int64(p, 0)


def test_drop_queue_while_threads_post(impl: Impl, posters: Posters) -> None:
    """Dropping the last reference while C threads post is as safe as close()."""
    ports = [new_port() for _ in range(4)]
    q = impl.mod.NativeQueue()
    for p in ports:
        impl.mod.bind_port(p, q)
    group = posters.start(impl.mod.api_address(), ports, MODE_MIXED_UNTIL_FALSE, 10**9)
    drain_all([q], lambda g: len(g[q]) >= 50)
    del q
    gc.collect()
    results = group.join()
    assert all(r.first_false >= 0 and r.true_after_false == 0 for r in results)


def test_pure_pipe_fallback(monkeypatch: pytest.MonkeyPatch, posters: Posters) -> None:
    """The pure queue on a platform without eventfd: a non-blocking pipe, same protocol."""
    from dartloop.ffi import _pyqueue

    monkeypatch.setattr(_pyqueue, "HAVE_EVENTFD", False)
    q = _pyqueue.NativeQueue()
    try:
        assert os.get_blocking(q.fileno()) is False
        port = new_port()
        _pyqueue.bind_port(port, q)
        api = DartloopApi.from_address(_pyqueue.api_address())
        assert not readable(q)
        assert api.post_string(port, "pipé".encode())
        assert readable(q)
        assert q.drain() == [(port, "pipé")]
        assert not readable(q)
        (result,) = posters.start(_pyqueue.api_address(), [port], MODE_MIXED, 3000).join()
        assert result == PosterResult(3000, -1, 0)
        assert os.read(q.fileno(), 4096) == b"\x01"  # one wakeup for the burst
        items = q.drain()
        check_stream([v for _, v in items], 0, MODE_MIXED)
        assert len(items) == 3000
        assert api.post_null(port)
        rfd = q.fileno()
    finally:
        q.close()
    assert q._discarded == 1
    with pytest.raises(OSError):
        os.fstat(rfd)
