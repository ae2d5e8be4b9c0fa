"""C worker threads calling back into Python: the Dart SDK's ``sample_async_callback``.

Run it with ``python examples/native_async_callback.py`` (``--backend
asyncio|uvloop`` to pick a loop; needs a C compiler, ``cc`` or ``$CC``). It
compiles its C part into a temporary directory, runs, checks the sample's
expectations and exits 0 (1 if one fails).

The Dart sample (``samples/ffi/async/sample_async_callback.dart``) has two
C worker threads call two Dart functions:

* ``callback1(a) -> a + 3``, which the C thread needs the result of (a
  *blocking* call: the thread waits until the isolate has run it);
* ``callback2(a)``, fire and forget (*non-blocking*: the call returns at once
  and the isolate runs it later); it adds ``a`` to ``globalResult``.

The C threads do::

    T1: sleep; r = callback1(3)  (-> 6); sleep; callback2(r - 1)  (5)
    T2: callback2(5); r = callback1(1)  (-> 4); callback2(r)  (4)

and the sample expects ``numCallbacks1 == 2``, ``numCallbacks2 == 3`` and
``globalResult == 14``. Where the Dart sample needed a port, a work queue and
a condition variable written by hand in C, dartloop has
``NativeCallable.blocking`` and ``NativeCallable.listener``: the C code just
calls two function pointers, from threads Python never saw, and every callback
runs on the isolate's own thread, one event each. As in the sample, the
isolate must keep running its event loop meanwhile (here it awaits a
``Completer``), or the blocking calls would wait for ever.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import dartloop
from dartloop.ffi import NativeCallable, include_dir

C_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

typedef intptr_t (*blocking_fn)(intptr_t);
typedef void (*non_blocking_fn)(intptr_t);

static blocking_fn my_callback_blocking;
static non_blocking_fn my_callback_non_blocking;
static pthread_t thread1, thread2;

void RegisterMyCallbackBlocking(blocking_fn fp) { my_callback_blocking = fp; }
void RegisterMyCallbackNonBlocking(non_blocking_fn fp) { my_callback_non_blocking = fp; }

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void say(const char *who, const char *what, long value)
{
    printf("%s: %s(%ld)\n", who, what, value);
    fflush(stdout);
}

/* Blocking: returns once Python has run callback1 and given its result. */
static intptr_t MyCallbackBlocking(const char *who, intptr_t a)
{
    say(who, "MyCallbackBlocking", (long)a);
    intptr_t result = my_callback_blocking(a);
    say(who, "  ... received", (long)result);
    return result;
}

/* Non-blocking: returns at once; Python runs callback2 later. */
static void MyCallbackNonBlocking(const char *who, intptr_t a)
{
    say(who, "MyCallbackNonBlocking", (long)a);
    my_callback_non_blocking(a);
}

static void *Work1(void *arg)
{
    (void)arg;
    sleep_ms(200);
    intptr_t r = MyCallbackBlocking("C T1", 3);   /* 6 */
    sleep_ms(200);
    MyCallbackNonBlocking("C T1", r - 1);         /* 5 */
    return NULL;
}

static void *Work2(void *arg)
{
    (void)arg;
    MyCallbackNonBlocking("C T2", 5);
    intptr_t r = MyCallbackBlocking("C T2", 1);   /* 4 */
    MyCallbackNonBlocking("C T2", r);             /* 4 */
    return NULL;
}

int StartWorkSimulator(void)
{
    if (pthread_create(&thread1, NULL, Work1, NULL) != 0) return -1;
    if (pthread_create(&thread2, NULL, Work2, NULL) != 0) return -1;
    return 0;
}

void StopWorkSimulator(void)
{
    pthread_join(thread1, NULL);
    pthread_join(thread2, NULL);
}
"""

CALLBACK1 = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_ssize_t)  # intptr_t (*)(intptr_t)
CALLBACK2 = ctypes.CFUNCTYPE(None, ctypes.c_ssize_t)  # void (*)(intptr_t)


def build(directory: Path) -> ctypes.CDLL:
    """Compile the C part into ``directory`` and load it."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        sys.exit(f"this example needs a C compiler ({cc!r} not found; set $CC)")
    src = directory / "async_callback.c"
    lib_path = directory / "libasync_callback.so"
    src.write_text(C_SOURCE)
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-pthread", f"-I{include_dir()}", str(src), "-o", str(lib_path)],
        check=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    lib.RegisterMyCallbackBlocking.argtypes = [CALLBACK1]
    lib.RegisterMyCallbackNonBlocking.argtypes = [CALLBACK2]
    lib.StartWorkSimulator.restype = ctypes.c_int
    return lib


def say(what: str) -> None:
    print(f"Py  : {what}", flush=True)


async def main(lib: ctypes.CDLL) -> tuple[int, int, int]:
    owner = threading.get_ident()
    num_callbacks1 = 0
    num_callbacks2 = 0
    global_result = 0
    three_callbacks2: dartloop.Completer[None] = dartloop.Completer()

    def callback1(a: int) -> int:
        nonlocal num_callbacks1
        assert threading.get_ident() == owner  # never on the C thread
        say(f"    callback1({a})")
        num_callbacks1 += 1
        return a + 3

    def callback2(a: int) -> None:
        nonlocal num_callbacks2, global_result
        assert threading.get_ident() == owner
        say(f"    callback2({a})")
        global_result += a
        num_callbacks2 += 1
        if num_callbacks2 == 3:
            three_callbacks2.complete()

    blocking = NativeCallable.blocking(CALLBACK1, callback1, exceptional_return=-1)
    listener = NativeCallable.listener(CALLBACK2, callback2)
    lib.RegisterMyCallbackBlocking(blocking.pointer)
    lib.RegisterMyCallbackNonBlocking(listener.pointer)

    say("tell C to start its worker threads")
    if lib.StartWorkSimulator() != 0:
        raise OSError("pthread_create failed")
    # The isolate keeps running its loop: the callbacks arrive as events.
    say("waiting for three calls of callback2")
    await three_callbacks2.future
    say("received the expected number of callbacks")

    say("tell C to stop its worker threads")
    lib.StopWorkSimulator()  # joins them; their last calls have returned
    blocking.close()
    listener.close()
    return num_callbacks1, num_callbacks2, global_result


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=dartloop.available_backends(), default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dartloop-example-") as tmp:
        lib = build(Path(tmp))
        num_callbacks1, num_callbacks2, global_result = dartloop.run(main(lib), backend=args.backend)
    print(f"numCallbacks1 = {num_callbacks1}, numCallbacks2 = {num_callbacks2}, globalResult = {global_result}")
    if (num_callbacks1, num_callbacks2, global_result) != (2, 3, 14):
        print("FAILED: expected numCallbacks1 == 2, numCallbacks2 == 3, globalResult == 14")
        return 1
    print("OK: the sample's expectations hold")
    return 0


if __name__ == "__main__":
    sys.exit(run())
