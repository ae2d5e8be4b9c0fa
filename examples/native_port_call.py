"""C threads calling Python through a port: the Dart SDK's ``sample_native_port_call``.

Run it with ``python examples/native_port_call.py`` (``--backend
asyncio|uvloop`` to pick a loop; needs a C compiler, ``cc`` or ``$CC``). It
compiles its C part into a temporary directory, runs, checks the sample's
expectations and exits 0 (1 if one fails).

No function pointers into Python at all: the C worker threads post requests
to an ordinary dartloop port with the ``DartloopApi`` posting functions (the
``Dart_PostCObject`` family, ``dartloop/include/dartloop_api.h``), and Python
answers by calling back into C, which wakes the waiting thread. This is how
``samples/ffi/async/sample_native_port_call.dart`` works, where Dart replies
through a native port:

* a request is ONE message (``post_bytes``), so that requests from different
  threads can't interleave: the id of the C thread's pending call, the method
  name, a NUL, and the argument bytes;
* ``myCallback1(a) -> a + 3`` is answered: Python calls the C function
  ``RespondToPendingCall(id, data, length)``, which copies the answer and
  signals the condition variable the C thread waits on (its ``PostAndWait``);
* ``myCallback2(a)`` adds ``a`` to ``globalResult`` and is not answered.

The C threads do, as in the sample::

    T1: sleep; r = myCallback1(3)  (-> 6); sleep; myCallback2(r - 1)  (5)
    T2: myCallback2(5); r = myCallback1(1)  (-> 4); myCallback2(r)  (4)

and the sample expects ``numCallbacks1 == 2``, ``numCallbacks2 == 3`` and
``globalResult == 14``. The port's handler runs on the isolate's thread, one
message per event; the isolate keeps running its loop meanwhile.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dartloop
from dartloop.ffi import include_dir, native_api

C_SOURCE = r"""
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "dartloop_api.h"

static const DartloopApi *api;
static int64_t send_port;
static pthread_t thread1, thread2;

void RegisterSendPort(const DartloopApi *a, int64_t port) { api = a; send_port = port; }

/* One call waiting for its answer (the sample's PendingCall). */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t answered_cv;
    bool answered;
    uint8_t response[64];
    intptr_t response_length;
} PendingCall;

/* Called by Python on its own thread: hand the answer to the waiting C thread. */
void RespondToPendingCall(int64_t id, const uint8_t *data, intptr_t length)
{
    PendingCall *call = (PendingCall *)(intptr_t)id;
    pthread_mutex_lock(&call->lock);
    if (length > (intptr_t)sizeof call->response) length = (intptr_t)sizeof call->response;
    memcpy(call->response, data, (size_t)length);
    call->response_length = length;
    call->answered = true;
    pthread_cond_signal(&call->answered_cv);
    pthread_mutex_unlock(&call->lock);
}

/* One request = one message: [call id, 8 bytes][method]\0[argument bytes]. */
static bool Post(int64_t id, const char *method, const uint8_t *arg, size_t arg_length)
{
    uint8_t message[128];
    size_t name_length = strlen(method) + 1;
    memcpy(message, &id, 8);
    memcpy(message + 8, method, name_length);
    memcpy(message + 8 + name_length, arg, arg_length);
    return api->post_bytes(send_port, message, (intptr_t)(8 + name_length + arg_length));
}

static void PostAndWait(const char *method, const uint8_t *arg, size_t arg_length, PendingCall *call)
{
    pthread_mutex_init(&call->lock, NULL);
    pthread_cond_init(&call->answered_cv, NULL);
    call->answered = false;
    if (!Post((int64_t)(intptr_t)call, method, arg, arg_length)) {
        fprintf(stderr, "C   : posting to the port failed (closed port or dead isolate)\n");
        abort();
    }
    pthread_mutex_lock(&call->lock);
    while (!call->answered) pthread_cond_wait(&call->answered_cv, &call->lock);
    pthread_mutex_unlock(&call->lock);
    pthread_cond_destroy(&call->answered_cv);
    pthread_mutex_destroy(&call->lock);
}

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

static intptr_t MyCallback1(const char *who, intptr_t a)
{
    say(who, "myCallback1", (long)a);
    uint8_t arg = (uint8_t)a;
    PendingCall call;
    PostAndWait("myCallback1", &arg, 1, &call);
    intptr_t result = call.response[0];
    say(who, "  ... received", (long)result);
    return result;
}

static void MyCallback2(const char *who, intptr_t a)
{
    say(who, "myCallback2", (long)a);
    uint8_t arg = (uint8_t)a;
    if (!Post(0, "myCallback2", &arg, 1)) abort();
}

static void *Work1(void *unused)
{
    (void)unused;
    sleep_ms(200);
    intptr_t r = MyCallback1("C T1", 3);   /* 6 */
    sleep_ms(200);
    MyCallback2("C T1", r - 1);            /* 5 */
    return NULL;
}

static void *Work2(void *unused)
{
    (void)unused;
    MyCallback2("C T2", 5);
    intptr_t r = MyCallback1("C T2", 1);   /* 4 */
    MyCallback2("C T2", r);                /* 4 */
    return NULL;
}

int StartWorkSimulator2(void)
{
    if (pthread_create(&thread1, NULL, Work1, NULL) != 0) return -1;
    if (pthread_create(&thread2, NULL, Work2, NULL) != 0) return -1;
    return 0;
}

void StopWorkSimulator2(void)
{
    pthread_join(thread1, NULL);
    pthread_join(thread2, NULL);
}
"""


def build(directory: Path) -> ctypes.CDLL:
    """Compile the C part into ``directory`` and load it."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        sys.exit(f"this example needs a C compiler ({cc!r} not found; set $CC)")
    src = directory / "native_port_call.c"
    lib_path = directory / "libnative_port_call.so"
    src.write_text(C_SOURCE)
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-pthread", f"-I{include_dir()}", str(src), "-o", str(lib_path)],
        check=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    lib.RegisterSendPort.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.RespondToPendingCall.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_ssize_t]
    lib.StartWorkSimulator2.restype = ctypes.c_int
    return lib


def say(what: str) -> None:
    print(f"Py  : {what}", flush=True)


async def main(lib: ctypes.CDLL) -> tuple[int, int, int]:
    num_callbacks1 = 0
    num_callbacks2 = 0
    global_result = 0
    three_callbacks2: dartloop.Completer[None] = dartloop.Completer()

    def my_callback1(a: int) -> int:
        nonlocal num_callbacks1
        say(f"    myCallback1({a})")
        num_callbacks1 += 1
        return a + 3

    def my_callback2(a: int) -> None:
        nonlocal num_callbacks2, global_result
        say(f"    myCallback2({a})")
        global_result += a
        num_callbacks2 += 1
        if num_callbacks2 == 3:
            three_callbacks2.complete()

    def handle_cpp_request(message: bytes) -> None:
        # One request per message, one message per event.
        pending_call = int.from_bytes(message[:8], sys.byteorder, signed=True)
        method, _, data = message[8:].partition(b"\0")
        say(f"  got {method.decode()} ({len(data)} byte argument)")
        if method == b"myCallback1":
            result = my_callback1(data[0])
            response = bytes([result])
            say(f"  responding {list(response)}")
            lib.RespondToPendingCall(pending_call, response, len(response))
        elif method == b"myCallback2":
            my_callback2(data[0])

    requests = dartloop.RawReceivePort(handle_cpp_request, debug_name="cpp-requests")
    lib.RegisterSendPort(ctypes.addressof(native_api()), requests.send_port.native_port)

    say("tell C to start its worker threads")
    if lib.StartWorkSimulator2() != 0:
        raise OSError("pthread_create failed")
    say("waiting for three calls of myCallback2")
    await three_callbacks2.future
    say("received the expected number of callbacks")

    say("tell C to stop its worker threads")
    lib.StopWorkSimulator2()
    requests.close()
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
