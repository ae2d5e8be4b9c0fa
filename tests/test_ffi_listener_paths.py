"""``NativeCallable.listener``: the native (libffi, GIL-free) and ctypes paths.

Every test that takes the ``impl`` fixture runs on both implementations,
picked with ``dartloop.ffi._callable.listener_impl`` (``"native"`` fails
instead of falling back, so a native run really is native). The native run is
skipped when ``dartloop.ffi._nativequeue`` is not in use or was built without
libffi. Async tests run on both backends (``[dartloop-asyncio]`` and
``[dartloop-uvloop]``).

The C side is ``tests/c/listener_paths.c``: pthreads that Python never saw
calling the listener pointers.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dartloop import Isolate
from dartloop.ffi import NativeCallable, _callable

from _isolate_helpers import join_isolate_threads
from _native_build import build_helper, build_library

NATIVE = _callable._make_listener_closure is not None

SEQ_FN = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int64)
FP_TYPE = ctypes.CFUNCTYPE(None)
INT_P = ctypes.POINTER(ctypes.c_int)
STR_FN = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_char_p, ctypes.c_wchar_p)

# (field, ctypes type in the argument list, ctypes type of the struct field)
ALL_FIELDS: list[tuple[str, Any, Any]] = [
    ("b", ctypes.c_bool, ctypes.c_bool),
    ("i8", ctypes.c_int8, ctypes.c_int8),
    ("u8", ctypes.c_uint8, ctypes.c_uint8),
    ("i16", ctypes.c_int16, ctypes.c_int16),
    ("u16", ctypes.c_uint16, ctypes.c_uint16),
    ("i32", ctypes.c_int32, ctypes.c_int32),
    ("u32", ctypes.c_uint32, ctypes.c_uint32),
    ("i64", ctypes.c_int64, ctypes.c_int64),
    ("u64", ctypes.c_uint64, ctypes.c_uint64),
    ("l", ctypes.c_long, ctypes.c_long),
    ("ul", ctypes.c_ulong, ctypes.c_ulong),
    ("ll", ctypes.c_longlong, ctypes.c_longlong),
    ("ull", ctypes.c_ulonglong, ctypes.c_ulonglong),
    ("sz", ctypes.c_size_t, ctypes.c_size_t),
    ("ssz", ctypes.c_ssize_t, ctypes.c_ssize_t),
    ("f", ctypes.c_float, ctypes.c_float),
    ("d", ctypes.c_double, ctypes.c_double),
    ("ld", ctypes.c_longdouble, ctypes.c_longdouble),
    ("c", ctypes.c_char, ctypes.c_char),
    # wchar_t: an int field, so that invalid code points can be written too.
    ("wc", ctypes.c_wchar, ctypes.c_int32 if ctypes.sizeof(ctypes.c_wchar) == 4 else ctypes.c_uint16),
    ("p", ctypes.c_void_p, ctypes.c_void_p),
    ("s", ctypes.c_char_p, ctypes.c_char_p),
    ("ws", ctypes.c_wchar_p, ctypes.c_wchar_p),
    ("ip", INT_P, INT_P),
    ("fp", FP_TYPE, FP_TYPE),
]


class AllT(ctypes.Structure):
    _fields_ = [(name, field_type) for name, _, field_type in ALL_FIELDS]


ALL_FN = ctypes.CFUNCTYPE(None, *[arg_type for _, arg_type, _ in ALL_FIELDS])


class Lib:
    def __init__(self, path: Path) -> None:
        self.cdll = ctypes.CDLL(str(path))
        self.pydll = ctypes.PyDLL(str(path))  # calls keep holding the GIL
        c = self.cdll
        c.seq_start.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
        c.seq_start.restype = ctypes.c_void_p
        c.seq_done.argtypes = [ctypes.c_void_p]
        c.seq_done.restype = ctypes.c_int
        c.seq_join.argtypes = [ctypes.c_void_p]
        c.seq_join.restype = None
        self.pydll.seq_run_holding_gil.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)
        ]
        self.pydll.seq_run_holding_gil.restype = ctypes.c_int
        c.all_call_in_thread.argtypes = [ctypes.c_void_p, ctypes.POINTER(AllT), ctypes.c_int]
        c.all_call_in_thread.restype = None
        c.str_call_in_thread.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        c.str_call_in_thread.restype = None


@pytest.fixture(scope="session")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Lib:
    return Lib(build_helper("listener_paths.c", tmp_path_factory.mktemp("listener_paths")))


@pytest.fixture(params=["native", "ctypes"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "native" and not NATIVE:
        pytest.skip("dartloop.ffi._nativequeue is not in use or was built without libffi")
    monkeypatch.setattr(_callable, "listener_impl", request.param)
    yield request.param


def scaled(impl: str, native_n: int, ctypes_n: int) -> int:
    """Calls per thread: the ctypes path takes ~25 us and the GIL per call."""
    return native_n if impl == "native" else ctypes_n


class Collector:
    """A callback that records its calls and can be awaited for a count."""

    def __init__(self, expected: int) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.expected = expected
        self.done = asyncio.get_running_loop().create_future()
        self.thread_ids: set[int] = set()

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)
        self.thread_ids.add(threading.get_ident())
        if len(self.calls) == self.expected and not self.done.done():
            self.done.set_result(None)


async def wait_threads(lib: Lib, group: int) -> None:
    """Join the C threads of ``group`` without blocking the loop."""
    while not lib.cdll.seq_done(group):
        await asyncio.sleep(0.001)
    lib.cdll.seq_join(group)


# -- which implementation ------------------------------------------------


async def test_impl_is_selected(impl: str) -> None:
    nc = NativeCallable.listener(SEQ_FN, lambda t, i: None)
    try:
        assert nc._impl == impl
        assert isinstance(nc.pointer, SEQ_FN)
        assert nc.address == ctypes.cast(nc.pointer, ctypes.c_void_p).value != 0
    finally:
        nc.close()


class Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_int), ("b", ctypes.c_double)]


class MyInt(ctypes.c_int):
    pass


@pytest.mark.parametrize(
    "functype",
    [
        pytest.param(ctypes.CFUNCTYPE(None, Pair), id="struct-by-value"),
        pytest.param(ctypes.CFUNCTYPE(None, MyInt), id="simple-subclass"),
        pytest.param(ctypes.CFUNCTYPE(None, ctypes.py_object), id="py_object"),
        pytest.param(ctypes.CFUNCTYPE(None, *[ctypes.c_int] * 65), id="65-args"),
    ],
)
async def test_unsupported_types_fall_back_to_ctypes(functype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_callable, "listener_impl", "auto")
    nc = NativeCallable.listener(functype, lambda *a: None)
    assert nc._impl == "ctypes"
    nc.close()
    monkeypatch.setattr(_callable, "listener_impl", "native")
    with pytest.raises(TypeError, match="no native listener"):
        NativeCallable.listener(functype, lambda *a: None)


async def test_auto_is_native_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_callable, "listener_impl", "auto")
    nc = NativeCallable.listener(ALL_FN, lambda *a: None)
    assert nc._impl == ("native" if NATIVE else "ctypes")
    nc.close()


async def test_bad_listener_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_callable, "listener_impl", "fast")
    with pytest.raises(ValueError, match="listener_impl"):
        NativeCallable.listener(SEQ_FN, lambda t, i: None)


# -- delivery ------------------------------------------------------------


async def test_eight_threads_complete_and_in_order(impl: str, lib: Lib) -> None:
    n_threads, count = 8, scaled(impl, 100_000, 5_000)
    seen: list[list[int]] = [[] for _ in range(n_threads)]
    done = asyncio.get_running_loop().create_future()
    total = n_threads * count
    received = 0

    def callback(t: int, i: int) -> None:
        nonlocal received
        seen[t].append(i)
        received += 1
        if received == total:
            done.set_result(None)

    nc = NativeCallable.listener(SEQ_FN, callback)
    group = lib.cdll.seq_start(nc.address, n_threads, count)
    await wait_threads(lib, group)
    await asyncio.wait_for(done, 60)
    nc.close()
    for t in range(n_threads):
        assert seen[t] == list(range(count)), f"thread {t}"


async def test_native_calls_do_not_need_the_gil(lib: Lib) -> None:
    if not NATIVE:
        pytest.skip("no native listener")
    collector = Collector(4 * 10_000)
    nc = NativeCallable.listener(SEQ_FN, collector)
    assert nc._impl == "native"
    group = ctypes.c_void_p()
    # PyDLL: this thread holds the GIL until the call returns, so the C
    # threads can only finish if their listener calls never take it.
    finished = lib.pydll.seq_run_holding_gil(nc.address, 4, 10_000, 20_000, ctypes.byref(group))
    lib.cdll.seq_join(group)
    assert finished == 1
    await asyncio.wait_for(collector.done, 30)
    assert len(collector.calls) == 4 * 10_000
    nc.close()


async def test_call_on_owner_thread_is_asynchronous(impl: str) -> None:
    collector = Collector(2)
    nc = NativeCallable.listener(SEQ_FN, collector)
    nc.pointer(1, 2)
    nc.pointer(3, 4)
    assert collector.calls == []  # not run inside the call
    await asyncio.sleep(0)
    await asyncio.wait_for(collector.done, 10)
    assert collector.calls == [(1, 2), (3, 4)]
    assert collector.thread_ids == {threading.get_ident()}
    nc.close()


async def test_callback_runs_on_owner_thread_then_microtasks(impl: str, lib: Lib) -> None:
    from dartloop import schedule_microtask

    order: list[str] = []
    done = asyncio.get_running_loop().create_future()
    owner = threading.get_ident()

    def callback(t: int, i: int) -> None:
        assert threading.get_ident() == owner
        order.append(f"call {i}")
        schedule_microtask(lambda: order.append(f"micro {i}"))
        if i == 2:
            schedule_microtask(lambda: done.set_result(None))

    nc = NativeCallable.listener(SEQ_FN, callback)
    group = lib.cdll.seq_start(nc.address, 1, 3)
    await wait_threads(lib, group)
    await asyncio.wait_for(done, 10)
    # Each event is followed by its microtask drain, as for port messages.
    assert order == ["call 0", "micro 0", "call 1", "micro 1", "call 2", "micro 2"]
    nc.close()


async def test_raising_callback_is_reported_and_later_calls_still_run(impl: str, lib: Lib, loop_errors: Any) -> None:
    calls: list[int] = []
    done = asyncio.get_running_loop().create_future()

    def callback(t: int, i: int) -> None:
        calls.append(i)
        if i == 1:
            raise ValueError("boom 1")
        if i == 3:
            done.set_result(None)

    nc = NativeCallable.listener(SEQ_FN, callback)
    group = lib.cdll.seq_start(nc.address, 1, 4)
    await wait_threads(lib, group)
    await asyncio.wait_for(done, 10)
    nc.close()
    assert calls == [0, 1, 2, 3]
    (context,) = loop_errors.take()
    assert isinstance(context["exception"], ValueError)
    assert str(context["exception"]) == "boom 1"


# -- argument values -----------------------------------------------------


def _fp_address(fp: Any) -> int | None:
    return ctypes.cast(fp, ctypes.c_void_p).value


_INT_TARGETS = (ctypes.c_int * 4)(10, 20, 30, 40)
_FP_TARGET = FP_TYPE(lambda: None)  # any valid function address


def _value_sets() -> list[AllT]:
    """Edge values of every type, then random ones (fixed seed)."""
    sets: list[AllT] = []
    int_p = ctypes.cast(_INT_TARGETS, INT_P)
    wc_is_4 = ctypes.sizeof(ctypes.c_wchar) == 4
    for edge in ("min", "max", "zero"):
        v = AllT()
        for name, _, field_type in ALL_FIELDS:
            if field_type in (ctypes.c_float, ctypes.c_double, ctypes.c_longdouble):
                value: Any = {"min": -1.5e30, "max": 3.25e30, "zero": -0.0}[edge]
            elif field_type is ctypes.c_bool:
                value = edge == "max"
            elif field_type is ctypes.c_char:
                value = {"min": b"\x80", "max": b"\xff", "zero": b"\x00"}[edge]
            elif name == "wc":
                value = {"min": 0, "max": 0x10FFFF if wc_is_4 else 0xFFFF, "zero": 0xE9}[edge]
            elif name == "p":
                value = {"min": None, "max": (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1, "zero": 1}[edge]
            elif name == "s":
                value = {"min": None, "max": bytes(range(1, 256)), "zero": b""}[edge]
            elif name == "ws":
                value = {"min": None, "max": "\u00e9\u4e2d\U0001f600" if wc_is_4 else "\u00e9\u4e2d", "zero": ""}[edge]
            elif name == "ip":
                value = {"min": None, "max": int_p, "zero": ctypes.cast(ctypes.byref(_INT_TARGETS, 8), INT_P)}[edge]
            elif name == "fp":
                value = {"min": None, "max": _FP_TARGET, "zero": None}[edge]
            else:
                bits = 8 * ctypes.sizeof(field_type)
                signed = field_type(-1).value == -1
                lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
                value = {"min": lo, "max": hi, "zero": 0}[edge]
            if value is not None:
                setattr(v, name, value)
        sets.append(v)
    rng = random.Random(20261123)
    for _ in range(40):
        v = AllT()
        for name, _, field_type in ALL_FIELDS:
            if field_type in (ctypes.c_float, ctypes.c_double, ctypes.c_longdouble):
                setattr(v, name, rng.choice([math.inf, -math.inf, math.nan, rng.uniform(-1e6, 1e6), 1e-310]))
            elif field_type is ctypes.c_bool:
                v.b = rng.random() < 0.5
            elif field_type is ctypes.c_char:
                v.c = bytes([rng.randrange(256)])
            elif name == "wc":
                v.wc = rng.randrange(0xD800) if rng.random() < 0.5 else rng.randrange(0xE000, 0x10000)
            elif name == "p":
                v.p = rng.choice([None, rng.randrange(1, 1 << 48)])
            elif name == "s":
                v.s = rng.choice([None, bytes(rng.randrange(1, 256) for _ in range(rng.randrange(40)))])
            elif name == "ws":
                v.ws = rng.choice([None, "".join(chr(rng.randrange(1, 0xD800)) for _ in range(rng.randrange(10)))])
            elif name == "ip":
                v.ip = rng.choice([None, ctypes.cast(ctypes.byref(_INT_TARGETS, 4 * rng.randrange(4)), INT_P)])
            elif name == "fp":
                v.fp = rng.choice([FP_TYPE(), _FP_TARGET])
            else:
                bits = 8 * ctypes.sizeof(field_type)
                setattr(v, name, rng.getrandbits(bits))  # ctypes truncates into range
        sets.append(v)
    return sets


def normalize(value: Any) -> Any:
    """A comparable form that keeps the type (so True != 1, b'' != None)."""
    if isinstance(value, (ctypes._Pointer, ctypes._CFuncPtr)):  # type: ignore[attr-defined]
        return (type(value).__name__, _fp_address(value))
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value.hex())
    return (type(value).__name__, value)


def expected_args(v: AllT) -> tuple[Any, ...]:
    out = []
    for name, _, _ in ALL_FIELDS:
        value = getattr(v, name)
        if name == "wc":
            value = chr(value & 0xFFFFFFFF)
        out.append(value)
    return tuple(out)


async def test_every_type_round_trips_from_a_c_thread(lib: Lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths give the same values, the ones ctypes reads from the struct."""
    values = _value_sets()
    array = (AllT * len(values))(*values)
    results: dict[str, list[tuple[Any, ...]]] = {}
    for impl in ("native", "ctypes") if NATIVE else ("ctypes",):
        monkeypatch.setattr(_callable, "listener_impl", impl)
        collector = Collector(len(values))
        nc = NativeCallable.listener(ALL_FN, collector)
        assert nc._impl == impl
        await asyncio.to_thread(lib.cdll.all_call_in_thread, nc.address, array, len(values))
        await asyncio.wait_for(collector.done, 30)
        nc.close()
        results[impl] = collector.calls
    expected = [tuple(map(normalize, expected_args(v))) for v in values]
    for impl, calls in results.items():
        got = [tuple(map(normalize, call)) for call in calls]
        for k, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"{impl} path, value set {k}"
    if NATIVE:
        # The pointer instances point where C said, and can be used.
        for call in results["native"]:
            ip = call[ALL_FIELDS.index(("ip", INT_P, INT_P))]
            assert type(ip) is INT_P
            if ip:
                assert ip.contents.value in (10, 20, 30, 40)


async def test_every_type_round_trips_from_the_owner_thread(impl: str) -> None:
    values = _value_sets()[:10]
    collector = Collector(len(values))
    nc = NativeCallable.listener(ALL_FN, collector)
    for v in values:
        nc.pointer(*[getattr(v, name) if name != "wc" else chr(v.wc) for name, _, _ in ALL_FIELDS])
    await asyncio.wait_for(collector.done, 10)
    nc.close()
    assert [tuple(map(normalize, c)) for c in collector.calls] == [
        tuple(map(normalize, expected_args(v))) for v in values
    ]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_invalid_wchar_drops_the_call(impl: str, lib: Lib, capfd: pytest.CaptureFixture[str]) -> None:
    if ctypes.sizeof(ctypes.c_wchar) != 4:
        pytest.skip("wchar_t is 16 bits: every value is a valid code unit")
    good, bad_wc, bad_ws, neg_wc = AllT(), AllT(), AllT(), AllT()
    bad_wc.wc = 0x110000
    neg_wc.wc = -1
    bad_ws.ws = None
    bad = (ctypes.c_int32 * 3)(0x41, 0x110000, 0)  # "A\U00110000"
    ctypes.c_void_p.from_buffer(bad_ws, AllT.ws.offset).value = ctypes.addressof(bad)
    array = (AllT * 5)(bad_wc, good, neg_wc, bad_ws, good)
    collector = Collector(2)
    nc = NativeCallable.listener(ALL_FN, collector)
    await asyncio.to_thread(lib.cdll.all_call_in_thread, nc.address, array, 5)
    await asyncio.wait_for(collector.done, 10)
    await asyncio.sleep(0.05)
    nc.close()
    assert len(collector.calls) == 2
    capfd.readouterr()  # ctypes prints the conversion errors


async def test_strings_are_copied_during_the_call(impl: str, lib: Lib) -> None:
    count = scaled(impl, 20_000, 2_000)
    collector = Collector(count)
    nc = NativeCallable.listener(STR_FN, collector)
    await asyncio.to_thread(lib.cdll.str_call_in_thread, nc.address, count)
    await asyncio.wait_for(collector.done, 30)
    nc.close()
    for i, s, ws in collector.calls:
        n = i % 20
        assert s == bytes(ord("a") + (i + j) % 26 for j in range(n))
        assert ws == "".join(chr(0x3B1 + (i + j) % 24) for j in range(n))
    assert [c[0] for c in collector.calls] == list(range(count))


def _wide_source(types: list[tuple[str, str]]) -> str:
    params = ", ".join(f"{ctype} a{k}" for k, (ctype, _) in enumerate(types))
    args = []
    for k, (ctype, _) in enumerate(types):
        if ctype == "const char *":
            args.append(f"(i % 3 == 0 ? NULL : (i % 3 == 1 ? \"\" : \"s{k}\"))")
        elif ctype == "double":
            args.append(f"(double)i + {k} / 4.0")
        else:
            args.append(f"({ctype})(i * 1000 + {k})")
    return (
        "#include <pthread.h>\n#include <stddef.h>\n#include <stdint.h>\n"
        f"typedef void (*wide_fn)({params});\n"
        "typedef struct { wide_fn fn; int64_t n; } wide_arg;\n"
        "static void *wide_main(void *p) { wide_arg *a = (wide_arg *)p;\n"
        f"  for (int64_t i = 0; i < a->n; i++) a->fn({', '.join(args)});\n"
        "  return NULL; }\n"
        "void wide_call_in_thread(wide_fn fn, int64_t n) { wide_arg a = {fn, n}; pthread_t th;\n"
        "  pthread_create(&th, NULL, wide_main, &a); pthread_join(th, NULL); }\n"
    )


@pytest.mark.parametrize("n_args", [0, 1, 3, 4, 7, 64])
async def test_argument_counts(impl: str, n_args: int, tmp_path: Path) -> None:
    """Calls of 0..64 arguments (1..23 records each, across chunk boundaries)."""
    cycle = [("int64_t", "q"), ("double", "d"), ("const char *", "z"), ("uint8_t", "B"), ("int32_t", "i")]
    types = [cycle[k % len(cycle)] for k in range(n_args)]
    ctypes_for = {"q": ctypes.c_int64, "d": ctypes.c_double, "z": ctypes.c_char_p, "B": ctypes.c_uint8, "i": ctypes.c_int32}
    functype = ctypes.CFUNCTYPE(None, *[ctypes_for[code] for _, code in types])
    wide = ctypes.CDLL(str(build_library(_wide_source(types), tmp_path, name=f"wide{n_args}")))
    wide.wide_call_in_thread.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    wide.wide_call_in_thread.restype = None
    count = 3000 if impl == "native" else 300
    collector = Collector(count)
    nc = NativeCallable.listener(functype, collector)
    assert nc._impl == impl
    await asyncio.to_thread(wide.wide_call_in_thread, nc.address, count)
    await asyncio.wait_for(collector.done, 30)
    nc.close()
    for i, call in enumerate(collector.calls):
        expected: list[Any] = []
        for k, (_, code) in enumerate(types):
            if code == "z":
                expected.append(None if i % 3 == 0 else (b"" if i % 3 == 1 else f"s{k}".encode()))
            elif code == "d":
                expected.append(i + k / 4.0)
            elif code == "B":
                expected.append((i * 1000 + k) & 0xFF)
            elif code == "i":
                expected.append(ctypes.c_int32(i * 1000 + k).value)
            else:
                expected.append(i * 1000 + k)
        assert call == tuple(expected), f"call {i}"


# -- NativeQueue.drain(limit), which the isolate uses ----------------------


@pytest.mark.parametrize("queue_impl", ["c", "python"])
def test_drain_limit_leaves_the_rest_and_the_wakeup(queue_impl: str) -> None:
    import importlib
    import select

    from dartloop.ffi import DartloopApi

    name = "dartloop.ffi._nativequeue" if queue_impl == "c" else "dartloop.ffi._pyqueue"
    try:
        mod = importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not built")
    api = DartloopApi.from_address(mod.api_address())
    queue = mod.NativeQueue()
    port = random.getrandbits(62) | 1
    mod.bind_port(port, queue)
    try:
        with pytest.raises(ValueError):
            queue.drain(0)
        with pytest.raises(ValueError):
            queue.drain(-5)
        assert queue.drain(10) == []
        total = 5000
        for i in range(total):
            assert api.post_int64(port, i)
        got: list[int] = []
        drains = 0
        while select.select([queue.fileno()], [], [], 0)[0]:
            batch = queue.drain(1000)
            drains += 1
            assert len(batch) >= min(1000, total - len(got))
            assert len(batch) <= 1000 + 1024  # whole chunks of the C queue
            got.extend(value for _, value in batch)
        assert got == list(range(total))
        assert 3 <= drains <= 5
        assert queue.pending() == 0
        # The wakeup was consumed with the last batch and is re-armed by a post.
        assert api.post_int64(port, -1)
        assert select.select([queue.fileno()], [], [], 0)[0]
        assert queue.drain(None) == [(port, -1)]
        assert not select.select([queue.fileno()], [], [], 0)[0]
    finally:
        queue.close()


# -- closed callables and ended isolates -----------------------------------


async def test_calls_after_close_are_dropped(impl: str, lib: Lib) -> None:
    n_threads, count = 4, scaled(impl, 200_000, 3_000)
    closed = False
    received = 0
    enough = asyncio.get_running_loop().create_future()

    def callback(t: int, i: int) -> None:
        nonlocal received
        assert not closed
        received += 1
        if received == 1000 and not enough.done():
            enough.set_result(None)

    nc = NativeCallable.listener(SEQ_FN, callback)
    address = nc.address
    group = lib.cdll.seq_start(address, n_threads, count)
    await asyncio.wait_for(enough, 30)
    nc.close()
    closed = True
    await wait_threads(lib, group)  # they kept calling the closed pointer
    # And more calls, from C threads and from this one, on the same address.
    group = lib.cdll.seq_start(address, 2, 1000)
    await wait_threads(lib, group)
    SEQ_FN(address)(0, 0)
    await asyncio.sleep(0.05)
    assert 1000 <= received <= n_threads * count
    with pytest.raises(RuntimeError, match="closed"):
        nc.pointer  # noqa: B018


async def test_close_inside_the_callback(impl: str, lib: Lib) -> None:
    calls: list[int] = []

    def callback(t: int, i: int) -> None:
        calls.append(i)
        if i == 10:
            nc.close()

    nc = NativeCallable.listener(SEQ_FN, callback)
    group = lib.cdll.seq_start(nc.address, 1, 1000)
    await wait_threads(lib, group)
    await asyncio.sleep(0.05)
    assert calls == list(range(11))


def _make_listener_in_isolate(debug_name: str) -> int:
    """Runs in a spawned isolate: a listener that does not keep it alive."""
    nc = NativeCallable.listener(SEQ_FN, lambda t, i: None)
    nc.keep_isolate_alive = False
    return nc.address


async def test_calls_after_the_owner_isolate_ended(impl: str, lib: Lib) -> None:
    address = await Isolate.run(_make_listener_in_isolate, "listener-owner", debug_name="listener-owner")
    await asyncio.to_thread(join_isolate_threads, "listener-owner")
    group = lib.cdll.seq_start(address, 4, scaled(impl, 50_000, 1_000))
    await wait_threads(lib, group)
    SEQ_FN(address)(0, 0)


async def test_isolate_ends_while_c_threads_call(impl: str, lib: Lib) -> None:
    """The owner isolate is killed while 4 threads keep calling: no crash."""
    ready = asyncio.get_running_loop().create_future()
    from dartloop import RawReceivePort

    port = RawReceivePort(lambda address: ready.set_result(address))
    iso = await Isolate.spawn(_listen_forever, port.send_port, debug_name="listener-killed")
    address = await asyncio.wait_for(ready, 10)
    port.close()
    group = lib.cdll.seq_start(address, 4, scaled(impl, 200_000, 2_000))
    await asyncio.sleep(0.02)
    # BEFORE_NEXT_EVENT: IMMEDIATE raises inside whatever the isolate runs,
    # which may be a weakref callback ("Exception ignored"), a separate matter.
    iso.kill()
    await asyncio.to_thread(join_isolate_threads, "listener-killed")
    await wait_threads(lib, group)


def _listen_forever(reply: Any) -> None:
    count = 0

    def callback(t: int, i: int) -> None:
        nonlocal count
        count += 1

    nc = NativeCallable.listener(SEQ_FN, callback)  # keeps the isolate alive
    reply.send(nc.address)


async def test_paused_isolate_holds_listener_calls(impl: str, lib: Lib) -> None:
    """Calls to a paused isolate wait, in order, until it is resumed."""
    from dartloop import RawReceivePort

    results = asyncio.get_running_loop().create_future()
    got_address = asyncio.get_running_loop().create_future()

    def on_message(message: Any) -> None:
        if not got_address.done():
            got_address.set_result(message)
        else:
            results.set_result(message)

    port = RawReceivePort(on_message)
    iso = await Isolate.spawn(_record_calls, port.send_port, debug_name="listener-paused")
    address = await asyncio.wait_for(got_address, 10)
    cap = iso.pause()
    group = lib.cdll.seq_start(address, 2, 500)
    await wait_threads(lib, group)
    await asyncio.sleep(0.05)
    assert not results.done()
    iso.resume(cap)
    seen = await asyncio.wait_for(results, 10)
    port.close()
    assert seen == {0: list(range(500)), 1: list(range(500))}
    await asyncio.to_thread(join_isolate_threads, "listener-paused")


def _record_calls(reply: Any) -> None:
    seen: dict[int, list[int]] = {0: [], 1: []}

    def callback(t: int, i: int) -> None:
        seen[t].append(i)
        if len(seen[0]) + len(seen[1]) == 1000:
            nc.close()
            reply.send(seen)

    nc = NativeCallable.listener(SEQ_FN, callback)
    reply.send(nc.address)

