/*
 * dartloop_api.h - posting messages to dartloop ports from C.
 *
 * The counterpart of the Dart VM's Dart_PostCObject / Dart_PostInteger family
 * (dart_native_api.h).  Get the process-wide table of function pointers from
 * Python with `dartloop.ffi.native_api()` (a ctypes structure whose address is
 * `ctypes.addressof(...)`), hand that address to your C code, and call:
 *
 *     const DartloopApi *api = (const DartloopApi *)address;
 *     if (api->version >= 1) api->post_int64(port, 42);
 *
 * Contract of every post_* function:
 *   - It may be called from ANY thread, including threads that Python never
 *     saw.  In the native implementation it neither needs nor takes the GIL
 *     and never blocks for long: it only takes short internal locks and may
 *     write one wakeup to the receiving isolate's event fd.  (The pure-Python
 *     fallback, used when the extension is not built, takes the GIL for each
 *     call; it must not be called once the interpreter is finalizing.)
 *   - It returns true iff the message was queued to an open port.  A message
 *     that was queued is delivered to the port's isolate in FIFO order with
 *     the other messages posted to that isolate, or freed if the isolate
 *     closes the queue first.
 *   - It returns false, and queues nothing, for: an unknown or non-positive
 *     port number, a closed port, a dead isolate, and invalid input: a NULL
 *     string, a string that is not valid UTF-8 (overlong forms, surrogates
 *     and code points above U+10FFFF are invalid), NULL data with a length
 *     greater than 0, or a negative length.
 *   - Strings and byte buffers are copied before the call returns; the caller
 *     keeps ownership of its memory.
 *   - Values arrive in Python as: post_null -> None, post_int64 -> int,
 *     post_double -> float, post_string -> str, post_bytes -> bytes,
 *     post_intptr -> int.
 *
 * The structure is versioned: fields are only ever added at the end, and
 * `version` tells which ones exist (1: the fields below).
 */
#ifndef DARTLOOP_API_H
#define DARTLOOP_API_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct DartloopApi {
  int32_t version;                                            /* 1 */
  bool (*post_null)(int64_t port);                            /* arrives as None  */
  bool (*post_int64)(int64_t port, int64_t value);            /* arrives as int   */
  bool (*post_double)(int64_t port, double value);            /* arrives as float */
  bool (*post_string)(int64_t port, const char *utf8);        /* copied; str      */
  bool (*post_bytes)(int64_t port, const uint8_t *data, intptr_t length); /* copied; bytes */
  bool (*post_intptr)(int64_t port, intptr_t value);          /* pointer-sized; int */
} DartloopApi;

#define DARTLOOP_API_VERSION 1

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* DARTLOOP_API_H */
