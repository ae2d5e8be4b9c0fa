/*
 * dartloop.ffi._nativequeue - the native message queue behind the C posting
 * API (dartloop/include/dartloop_api.h).
 *
 * C threads that Python never saw post messages to dartloop ports; each
 * isolate (an event loop on its own thread) owns one NativeQueue, watches its
 * wakeup fd with add_reader, and drains every queued message in one batch.
 *
 * Structure
 * ---------
 *   port table   process-wide, port number -> nq_core*.  Split into
 *                NQ_SHARDS shards, each an open-addressing hash table guarded
 *                by its own mutex, so that posts to ports of different
 *                isolates rarely touch the same lock.
 *   nq_core      one per NativeQueue: a mutex, a FIFO of fixed-size chunks of
 *                message records, the "wakeup pending" flag and the fd(s).
 *
 * Locking (the whole argument for memory safety)
 * ---------------------------------------------
 *   Lock order: shard lock -> queue lock.  Nobody takes a shard lock while
 *   holding a queue lock.
 *
 *   post:   lock shard, look the port up, lock queue, append, maybe write the
 *           wakeup fd, unlock queue, unlock shard.  The shard lock is held for
 *           the whole time the poster touches the nq_core, and that is what
 *           keeps the nq_core alive: close() removes the queue's ports from
 *           every shard under the shard locks, so once it has gone over every
 *           shard no poster can still be inside (or ever reach) the core, and
 *           the Python object that embeds it may be freed.
 *   drain:  lock queue only, swap the chunk list out, unlock; then convert
 *           without any lock held.
 *   close:  lock queue, mark closed, detach the list, unlock; then remove the
 *           queue's ports from every shard; then free the detached messages
 *           and close the fd.  Posters test `closed` under the queue lock, so
 *           no post can append or write the fd after close() marked it.
 *
 *   Every shared field is read and written under one of these mutexes, so
 *   pthread mutex acquire/release provides all the memory ordering we need:
 *   a record written by a poster before its unlock is fully visible to the
 *   drainer after its lock.  No atomics, no GIL on the post path.
 *
 * Wakeups (one per burst)
 * -----------------------
 *   Invariant, under the queue lock: wakeup_pending is true exactly when the
 *   fd holds one unconsumed wakeup (eventfd counter 1 / one byte in the pipe).
 *   A post sets the flag and writes the fd only on the false -> true edge;
 *   drain() reads the fd and clears the flag in the same critical section in
 *   which it takes the messages.  A post that happens while drain() runs is
 *   therefore either before that critical section (its message is in this
 *   batch) or after it (it sees the flag clear and writes a new wakeup): no
 *   wakeup is lost and none is spurious.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* NQ_FORCE_PIPE=1 builds the pipe fallback on Linux too (to test it). */
#if defined(__linux__) && !(defined(NQ_FORCE_PIPE) && NQ_FORCE_PIPE)
#include <sys/eventfd.h>
#define NQ_HAVE_EVENTFD 1
#else
#define NQ_HAVE_EVENTFD 0
#endif

#include "dartloop_api.h"

/* NQ_HAVE_FFI=1 (set by setup.py when it finds ffi.h and libffi) adds the
 * GIL-free NativeCallable.listener: make_listener_closure(). */
#if defined(NQ_HAVE_FFI) && NQ_HAVE_FFI
#include <ffi.h>
#include <wchar.h>
#undef NQ_HAVE_FFI
#define NQ_HAVE_FFI 1
#else
#undef NQ_HAVE_FFI
#define NQ_HAVE_FFI 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NQ_LIKELY(x) __builtin_expect(!!(x), 1)
#define NQ_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define NQ_CACHE_ALIGNED __attribute__((aligned(64)))
#else
#define NQ_LIKELY(x) (x)
#define NQ_UNLIKELY(x) (x)
#define NQ_CACHE_ALIGNED
#endif

/* intptr_t values are stored in the int64 slot. */
_Static_assert(sizeof(intptr_t) <= sizeof(int64_t), "intptr_t wider than int64_t");

/* ------------------------------------------------------------------------ */
/* Message records                                                          */
/* ------------------------------------------------------------------------ */

enum {
    NQ_NULL = 0,
    NQ_INT64,        /* post_int64 and post_intptr */
    NQ_DOUBLE,
    NQ_STRING_ASCII, /* validated, all bytes < 0x80: built with a memcpy */
    NQ_STRING_UTF8,  /* validated UTF-8 with non-ASCII characters */
    NQ_BYTES,
    NQ_CALL,         /* a listener call: header + argument records, below */
};

/* Copied string/bytes payload.  len is stored with the data so that a record
 * stays 24 bytes.  A zero-length payload is represented by a NULL blob. */
typedef struct {
    Py_ssize_t len;
    char data[];
} nq_blob;

struct nq_sig;

typedef union {
    int64_t i;
    double d;
    nq_blob *blob;
    const struct nq_sig *sig; /* NQ_CALL: the listener's argument types */
} nq_payload;

typedef struct {
    int64_t port;
    int32_t type;
    nq_payload u;
} nq_msg;

/* One argument of a listener call, as captured in the calling thread: ints
 * widened to 64 bits (sign- or zero-extended by type), floating point as a
 * double, pointers as an address, and char / wchar_t strings copied into a
 * blob (NULL blob = NULL pointer; an empty string is a blob of length 0). */
typedef union {
    int64_t i;
    uint64_t u;
    double d;
    nq_blob *blob;
} nq_arg;

/* A listener call is ONE message stored in 1 + sig->nrec consecutive
 * records of a chunk: the header (port, NQ_CALL, u.sig) and then the
 * arguments, NQ_ARGS_PER_REC (3) to a record, so 2 records (48 bytes) for
 * up to 3 arguments.  Calls never span chunks. */
#define NQ_ARGS_PER_REC (sizeof(nq_msg) / sizeof(nq_arg))
_Static_assert(sizeof(nq_msg) % sizeof(nq_arg) == 0, "nq_msg not a whole number of nq_arg");
#define NQ_MAX_ARGS 64

/* ctypes type codes (a simple type's _type_) of a listener's arguments.  It
 * is part of the listener, which is never freed, so queued calls may point
 * at it for as long as they like. */
typedef struct nq_sig {
    uint32_t nargs;
    uint32_t nrec;         /* argument records after the header */
    bool has_blobs;        /* some argument is 'z' or 'Z' */
    char codes[NQ_MAX_ARGS + 1];
} nq_sig;

static inline nq_arg *
nq_call_args(nq_msg *header)
{
    return (nq_arg *)(void *)(header + 1);
}

static void
nq_free_call_blobs(nq_msg *header)
{
    const nq_sig *sig = header->u.sig;
    if (sig->has_blobs) {
        nq_arg *a = nq_call_args(header);
        for (uint32_t k = 0; k < sig->nargs; k++) {
            if (sig->codes[k] == 'z' || sig->codes[k] == 'Z') {
                free(a[k].blob);
            }
        }
    }
}

/* Records live in chunks so that a post costs a malloc only for the payload
 * copy of strings/bytes, and one chunk malloc every NQ_CHUNK_CAP records. */
#define NQ_CHUNK_CAP 1024
_Static_assert(1 + (NQ_MAX_ARGS + NQ_ARGS_PER_REC - 1) / NQ_ARGS_PER_REC <= NQ_CHUNK_CAP,
               "a listener call must fit in one chunk");

typedef struct nq_chunk {
    struct nq_chunk *next;
    /* Records in use.  The last chunk of a list is partial; an earlier one
     * may end early too, when the next listener call did not fit. */
    size_t n;
    Py_ssize_t nmsg; /* messages starting in this chunk */
    nq_msg items[NQ_CHUNK_CAP];
} nq_chunk;

static void
nq_free_chunks(nq_chunk *c)
{
    while (c != NULL) {
        nq_chunk *next = c->next;
        for (size_t i = 0; i < c->n; i++) {
            int32_t t = c->items[i].type;
            if (t == NQ_STRING_ASCII || t == NQ_STRING_UTF8 || t == NQ_BYTES) {
                free(c->items[i].u.blob);
            }
            else if (t == NQ_CALL) {
                nq_free_call_blobs(&c->items[i]);
                i += c->items[i].u.sig->nrec;  /* skip the argument records */
            }
        }
        free(c);
        c = next;
    }
}

/* ------------------------------------------------------------------------ */
/* The per-queue core                                                       */
/* ------------------------------------------------------------------------ */

typedef struct nq_core {
    pthread_mutex_t lock;  /* guards every field below */
    nq_chunk *head;
    nq_chunk *tail;
    Py_ssize_t count;
    bool wakeup_pending;
    bool closed;
    int rfd;  /* the fd the loop watches; the eventfd itself on Linux */
    int wfd;  /* == rfd for an eventfd; the pipe's write end otherwise */
} nq_core;

static void
nq_mutex_init(pthread_mutex_t *m)
{
    /* Critical sections here are a few dozen instructions, so on glibc an
     * adaptive mutex (spin briefly before sleeping in the kernel) avoids a
     * futex round trip when a poster and the drainer collide. */
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP) && defined(__GLIBC__)
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
#endif
    pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
}

/* Must be called with q->lock held and q->wakeup_pending just set. */
static void
nq_signal_locked(nq_core *q)
{
#if NQ_HAVE_EVENTFD
    uint64_t one = 1;
    for (;;) {
        ssize_t r = write(q->wfd, &one, sizeof one);
        if (r == (ssize_t)sizeof one) {
            return;
        }
        if (r < 0 && errno == EINTR) {
            continue;
        }
        break;
    }
#else
    char one = 1;
    for (;;) {
        ssize_t r = write(q->wfd, &one, 1);
        if (r == 1) {
            return;
        }
        if (r < 0 && errno == EINTR) {
            continue;
        }
        break;
    }
#endif
    /* The write failed (it cannot, by the invariant: at most one wakeup is
     * ever outstanding).  Keep the invariant anyway: with the flag clear the
     * next post tries again instead of the queue stalling forever. */
    q->wakeup_pending = false;
}

/* Must be called with q->lock held.  Consumes the outstanding wakeup.
 * EAGAIN is fine: someone may have read the fd behind our back. */
static void
nq_consume_locked(nq_core *q)
{
#if NQ_HAVE_EVENTFD
    uint64_t value;
    ssize_t r;
    do {
        r = read(q->rfd, &value, sizeof value);
    } while (r < 0 && errno == EINTR);
#else
    char buf[64];
    ssize_t r;
    do {
        r = read(q->rfd, buf, sizeof buf);
    } while (r > 0 || (r < 0 && errno == EINTR));
#endif
    (void)r;
}

/* Must be called with q->lock held; returns nrec (1 <= nrec <= NQ_CHUNK_CAP)
 * consecutive free records or NULL (out of memory).  malloc under the lock
 * happens once per NQ_CHUNK_CAP records. */
static inline nq_msg *
nq_reserve_locked(nq_core *q, size_t nrec)
{
    nq_chunk *t = q->tail;
    if (NQ_LIKELY(t != NULL && t->n + nrec <= NQ_CHUNK_CAP)) {
        nq_msg *m = &t->items[t->n];
        t->n += nrec;
        t->nmsg++;
        return m;
    }
    nq_chunk *c = (nq_chunk *)malloc(sizeof(nq_chunk));
    if (c == NULL) {
        return NULL;
    }
    c->next = NULL;
    c->n = nrec;
    c->nmsg = 1;
    if (t == NULL) {
        q->head = c;
    }
    else {
        t->next = c;
    }
    q->tail = c;
    return &c->items[0];
}

/* ------------------------------------------------------------------------ */
/* The process-wide port table                                              */
/* ------------------------------------------------------------------------ */

#define NQ_SHARD_BITS 4
#define NQ_SHARDS (1u << NQ_SHARD_BITS)
#define NQ_EMPTY ((int64_t)0)   /* ports are > 0, so 0 and -1 are free */
#define NQ_TOMB ((int64_t)-1)

typedef struct {
    int64_t key;
    nq_core *q;
} nq_slot;

typedef struct {
    pthread_mutex_t lock;  /* guards the fields below and the cores they lead to */
    nq_slot *slots;
    size_t cap;     /* 0 or a power of two */
    size_t live;    /* bound ports */
    size_t filled;  /* live + tombstones; kept <= 3/4 cap so probes end */
} NQ_CACHE_ALIGNED nq_shard;

static nq_shard nq_shards[NQ_SHARDS];
static pthread_once_t nq_shards_once = PTHREAD_ONCE_INIT;

static void
nq_shards_init(void)
{
    for (unsigned i = 0; i < NQ_SHARDS; i++) {
        nq_mutex_init(&nq_shards[i].lock);
    }
}

/* splitmix64 finalizer: ports chosen by Python may be sequential or random;
 * mixing spreads both over shards and slots. */
static inline uint64_t
nq_hash(int64_t port)
{
    uint64_t x = (uint64_t)port;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline nq_shard *
nq_shard_for(uint64_t h)
{
    return &nq_shards[h & (NQ_SHARDS - 1)];
}

/* Shard lock held.  Returns the slot holding port, or NULL. */
static inline nq_slot *
nq_shard_find(nq_shard *s, int64_t port, uint64_t h)
{
    if (s->cap == 0) {
        return NULL;
    }
    size_t mask = s->cap - 1;
    size_t i = (size_t)(h >> NQ_SHARD_BITS) & mask;
    for (;;) {
        nq_slot *sl = &s->slots[i];
        if (sl->key == port) {
            return sl;
        }
        if (sl->key == NQ_EMPTY) {
            return NULL;
        }
        i = (i + 1) & mask;
    }
}

/* Shard lock held.  Rebuilds the table with room for at least one more port,
 * dropping tombstones.  Returns -1 on out-of-memory (table unchanged). */
static int
nq_shard_grow(nq_shard *s)
{
    size_t cap = 8;
    while ((s->live + 1) * 2 > cap) {
        cap *= 2;
    }
    nq_slot *slots = (nq_slot *)calloc(cap, sizeof(nq_slot));
    if (slots == NULL) {
        return -1;
    }
    size_t mask = cap - 1;
    for (size_t j = 0; j < s->cap; j++) {
        nq_slot *old = &s->slots[j];
        if (old->key > 0) {
            size_t i = (size_t)(nq_hash(old->key) >> NQ_SHARD_BITS) & mask;
            while (slots[i].key != NQ_EMPTY) {
                i = (i + 1) & mask;
            }
            slots[i] = *old;
        }
    }
    free(s->slots);
    s->slots = slots;
    s->cap = cap;
    s->filled = s->live;
    return 0;
}

/* Shard lock held; port not present.  Returns -1 on out-of-memory. */
static int
nq_shard_insert(nq_shard *s, int64_t port, uint64_t h, nq_core *q)
{
    if ((s->filled + 1) * 4 > s->cap * 3) {
        if (nq_shard_grow(s) < 0) {
            return -1;
        }
    }
    size_t mask = s->cap - 1;
    size_t i = (size_t)(h >> NQ_SHARD_BITS) & mask;
    /* The port is absent, so the first tombstone or empty slot on its probe
     * sequence is where it goes. */
    while (s->slots[i].key > 0) {
        i = (i + 1) & mask;
    }
    if (s->slots[i].key == NQ_EMPTY) {
        s->filled++;
    }
    s->slots[i].key = port;
    s->slots[i].q = q;
    s->live++;
    return 0;
}

/* Shard lock held. */
static inline void
nq_shard_remove_slot(nq_shard *s, nq_slot *sl)
{
    sl->key = NQ_TOMB;
    sl->q = NULL;
    s->live--;
    if (s->live == 0) {
        /* Everything is a tombstone: start over so probes stay short. */
        memset(s->slots, 0, s->cap * sizeof(nq_slot));
        s->filled = 0;
    }
}

/* ------------------------------------------------------------------------ */
/* The C posting API (any thread, no GIL)                                   */
/* ------------------------------------------------------------------------ */

/* Queues one message: a record, followed for NQ_CALL by the call's nargs
 * arguments.  On false the caller still owns any blob in u or args. */
/* A port argument from Python: an int that fits in int64 and is positive.
 * 0, or -1 with TypeError / OverflowError / ValueError set. */
static int
nq_port_arg(PyObject *o, long long *port)
{
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "port must be an int");
        return -1;
    }
    *port = PyLong_AsLongLong(o);
    if (*port == -1 && PyErr_Occurred()) {
        return -1;  /* OverflowError: not an int64 */
    }
    if (*port <= 0) {
        PyErr_Format(PyExc_ValueError, "port must be positive, not %lld", *port);
        return -1;
    }
    return 0;
}

static inline bool
nq_post_message(int64_t port, int32_t type, nq_payload u, const nq_arg *args, uint32_t nargs, uint32_t nrec)
{
    if (NQ_UNLIKELY(port <= 0)) {
        return false;
    }
    uint64_t h = nq_hash(port);
    nq_shard *s = nq_shard_for(h);
    bool ok = false;

    pthread_mutex_lock(&s->lock);
    nq_slot *sl = nq_shard_find(s, port, h);
    if (sl != NULL) {
        /* Holding the shard lock keeps the core alive (see the header). */
        nq_core *q = sl->q;
        pthread_mutex_lock(&q->lock);
        if (NQ_LIKELY(!q->closed)) {
            nq_msg *m = nq_reserve_locked(q, 1 + (size_t)nrec);
            if (NQ_LIKELY(m != NULL)) {
                m->port = port;
                m->type = type;
                m->u = u;
                if (nargs > 0) {
                    memcpy(nq_call_args(m), args, nargs * sizeof(nq_arg));
                }
                q->count++;
                ok = true;
                /* Only the first post of a burst pays for the syscall.  It is
                 * done under the queue lock so that close() cannot close the
                 * fd in between, and so that drain() sees flag and fd agree. */
                if (!q->wakeup_pending) {
                    q->wakeup_pending = true;
                    nq_signal_locked(q);
                }
            }
        }
        pthread_mutex_unlock(&q->lock);
    }
    pthread_mutex_unlock(&s->lock);
    return ok;
}

static bool
nq_post(int64_t port, int32_t type, nq_payload u)
{
    return nq_post_message(port, type, u, NULL, 0, 0);
}

static bool
nq_post_null(int64_t port)
{
    nq_payload u;
    u.i = 0;
    return nq_post(port, NQ_NULL, u);
}

static bool
nq_post_int64(int64_t port, int64_t value)
{
    nq_payload u;
    u.i = value;
    return nq_post(port, NQ_INT64, u);
}

static bool
nq_post_double(int64_t port, double value)
{
    nq_payload u;
    u.d = value;
    return nq_post(port, NQ_DOUBLE, u);
}

static bool
nq_post_intptr(int64_t port, intptr_t value)
{
    nq_payload u;
    u.i = (int64_t)value;
    return nq_post(port, NQ_INT64, u);
}

/* Strict UTF-8 validation (Unicode Table 3-7, the same set of strings that
 * Python's strict decoder accepts): rejects overlong forms, surrogates
 * (U+D800..U+DFFF) and anything above U+10FFFF.  *ascii is set when every
 * byte is < 0x80. */
static bool
nq_utf8_valid(const unsigned char *s, size_t len, bool *ascii)
{
    size_t i = 0;
    bool all_ascii = true;
    while (i < len) {
        /* Skip ASCII runs eight bytes at a time; memcpy keeps it aligned-safe. */
        while (i + 8 <= len) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL) {
                break;
            }
            i += 8;
        }
        if (i >= len) {
            break;
        }
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        all_ascii = false;
        size_t need;
        unsigned char lo = 0x80, hi = 0xBF;  /* range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        }
        else if (c == 0xE0) {
            need = 2; lo = 0xA0;
        }
        else if (c == 0xED) {
            need = 2; hi = 0x9F;
        }
        else if (c >= 0xE1 && c <= 0xEF) {
            need = 2;
        }
        else if (c == 0xF0) {
            need = 3; lo = 0x90;
        }
        else if (c == 0xF4) {
            need = 3; hi = 0x8F;
        }
        else if (c >= 0xF1 && c <= 0xF3) {
            need = 3;
        }
        else {
            return false;  /* 0x80..0xC1, 0xF5..0xFF */
        }
        if (len - i - 1 < need) {
            return false;  /* truncated sequence */
        }
        if (s[i + 1] < lo || s[i + 1] > hi) {
            return false;
        }
        for (size_t k = 2; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) {
                return false;
            }
        }
        i += need + 1;
    }
    *ascii = all_ascii;
    return true;
}

static nq_blob *
nq_blob_new(const void *data, size_t len)
{
    if (len > (size_t)PY_SSIZE_T_MAX - sizeof(nq_blob)) {
        return NULL;
    }
    nq_blob *b = (nq_blob *)malloc(sizeof(nq_blob) + len);
    if (b != NULL) {
        b->len = (Py_ssize_t)len;
        memcpy(b->data, data, len);
    }
    return b;
}

static bool
nq_post_string(int64_t port, const char *utf8)
{
    if (utf8 == NULL || port <= 0) {
        return false;
    }
    size_t len = strlen(utf8);
    bool ascii = true;
    if (!nq_utf8_valid((const unsigned char *)utf8, len, &ascii)) {
        return false;
    }
    nq_payload u;
    u.blob = NULL;
    if (len > 0) {
        /* Copy before taking any lock: malloc may be slow. */
        u.blob = nq_blob_new(utf8, len);
        if (u.blob == NULL) {
            return false;
        }
    }
    if (!nq_post(port, ascii ? NQ_STRING_ASCII : NQ_STRING_UTF8, u)) {
        free(u.blob);
        return false;
    }
    return true;
}

static bool
nq_post_bytes(int64_t port, const uint8_t *data, intptr_t length)
{
    if (length < 0 || (data == NULL && length > 0) || port <= 0) {
        return false;
    }
    nq_payload u;
    u.blob = NULL;
    if (length > 0) {
        u.blob = nq_blob_new(data, (size_t)length);
        if (u.blob == NULL) {
            return false;
        }
    }
    if (!nq_post(port, NQ_BYTES, u)) {
        free(u.blob);
        return false;
    }
    return true;
}

/* Read-only: writing through ctypes would fault rather than silently
 * redirect every poster in the process. */
static const DartloopApi nq_api = {
    DARTLOOP_API_VERSION,
    nq_post_null,
    nq_post_int64,
    nq_post_double,
    nq_post_string,
    nq_post_bytes,
    nq_post_intptr,
};

/* ------------------------------------------------------------------------ */
/* GIL-free listener closures (NativeCallable.listener)                     */
/* ------------------------------------------------------------------------ */

/* A libffi closure with the C signature of a ctypes CFUNCTYPE(None, ...).
 * Called from any thread, it reads its arguments by their ctypes type codes
 * into nq_args (copying char / wchar_t strings, which need to stay valid only
 * for the duration of the call) and posts them as ONE NQ_CALL message to its
 * port, through the same shard and queue locks as the post_* functions: no
 * Python, no GIL, no thread state.  The owner isolate drains the call with
 * its other native messages and converts the arguments to exactly the values
 * a ctypes callback of the same type would get (nq_call_to_tuple).
 *
 * Lifetime: a listener and its closure are never freed (C may keep and call
 * the address forever).  Closing the NativeCallable unbinds its port, so
 * later calls find no port and are dropped (post fails, copies are freed);
 * retire_listener_closure() also zeroes the listener's port so that such
 * calls return before taking any lock. */

/* The type codes make_listener_closure() accepts, i.e. the ctypes simple
 * types whose callback arguments ctypes converts to plain Python values. */
#if NQ_HAVE_FFI && WCHAR_MAX > 0xFFFF
#define NQ_LISTENER_CODES "?bBhHiIlLqQfdgcuPzZ"
#elif NQ_HAVE_FFI
#define NQ_LISTENER_CODES "?bBhHiIlLqQfdgcPz"
#else
#define NQ_LISTENER_CODES ""
#endif

#if NQ_HAVE_FFI

typedef struct {
    nq_sig sig;
    int64_t port;          /* atomic: 0 once retired */
    ffi_cif cif;
    ffi_type *atypes[NQ_MAX_ARGS];
    ffi_closure *closure;  /* the writable half */
    void *code;            /* the executable entry point handed to C */
} nq_listener;

_Static_assert(sizeof(bool) == 1, "_Bool is not one byte");
_Static_assert(sizeof(long long) == 8, "long long is not 64 bits");
_Static_assert(sizeof(void *) <= sizeof(uint64_t), "pointers wider than 64 bits");

static ffi_type *
nq_ffi_type(char code)
{
    switch (code) {
    case '?': return &ffi_type_uint8;
    case 'b': return &ffi_type_sint8;
    case 'B': return &ffi_type_uint8;
    case 'h': return &ffi_type_sshort;
    case 'H': return &ffi_type_ushort;
    case 'i': return &ffi_type_sint;
    case 'I': return &ffi_type_uint;
    case 'l': return &ffi_type_slong;
    case 'L': return &ffi_type_ulong;
    case 'q': return &ffi_type_sint64;
    case 'Q': return &ffi_type_uint64;
    case 'f': return &ffi_type_float;
    case 'd': return &ffi_type_double;
    case 'g': return &ffi_type_longdouble;
    case 'c': return &ffi_type_schar;
    case 'u': return sizeof(wchar_t) == 4 ? &ffi_type_sint32 : &ffi_type_uint16;
    case 'P': case 'z': case 'Z': return &ffi_type_pointer;
    default: return NULL;
    }
}

static void
nq_free_args(const nq_sig *sig, nq_arg *a, uint32_t n)
{
    for (uint32_t k = 0; k < n; k++) {
        if (sig->codes[k] == 'z' || sig->codes[k] == 'Z') {
            free(a[k].blob);
        }
    }
}

/* The closure's body: any thread, never the GIL. */
static void
nq_listener_entry(ffi_cif *cif, void *ret, void **args, void *user_data)
{
    (void)cif;
    (void)ret;  /* listeners return void */
    nq_listener *L = (nq_listener *)user_data;
    int64_t port = __atomic_load_n(&L->port, __ATOMIC_RELAXED);
    if (port <= 0) {
        return;  /* closed: drop the call */
    }
    int saved_errno = errno;  /* the C caller's errno survives the call */
    const nq_sig *sig = &L->sig;
    uint32_t n = sig->nargs;
    nq_arg a[NQ_MAX_ARGS];
    uint32_t k;
    for (k = 0; k < n; k++) {
        const void *p = args[k];
        switch (sig->codes[k]) {
        case '?': a[k].i = *(const unsigned char *)p != 0; break;
        case 'b': a[k].i = *(const signed char *)p; break;
        case 'B': a[k].u = *(const unsigned char *)p; break;
        case 'h': a[k].i = *(const short *)p; break;
        case 'H': a[k].u = *(const unsigned short *)p; break;
        case 'i': a[k].i = *(const int *)p; break;
        case 'I': a[k].u = *(const unsigned int *)p; break;
        case 'l': a[k].i = *(const long *)p; break;
        case 'L': a[k].u = *(const unsigned long *)p; break;
        case 'q': a[k].i = *(const long long *)p; break;
        case 'Q': a[k].u = *(const unsigned long long *)p; break;
        case 'f': a[k].d = (double)*(const float *)p; break;
        case 'd': a[k].d = *(const double *)p; break;
        case 'g': a[k].d = (double)*(const long double *)p; break;
        case 'c': a[k].i = *(const char *)p; break;
        case 'u': {
            /* As ctypes: a wchar_t beyond U+10FFFF can't become a str, and
             * the call is dropped. */
            uint32_t w = (uint32_t)*(const wchar_t *)p;
            if (w > 0x10FFFF) {
                goto drop;
            }
            a[k].i = (int64_t)w;
            break;
        }
        case 'P':
            a[k].u = (uint64_t)(uintptr_t)*(void *const *)p;
            break;
        case 'z': {
            const char *str = *(const char *const *)p;
            a[k].blob = NULL;
            if (str != NULL) {
                a[k].blob = nq_blob_new(str, strlen(str));
                if (a[k].blob == NULL) {
                    goto drop;
                }
            }
            break;
        }
        case 'Z': {
            const wchar_t *w = *(const wchar_t *const *)p;
            a[k].blob = NULL;
            if (w != NULL) {
                size_t len = wcslen(w);
                for (size_t j = 0; j < len; j++) {
                    if ((uint32_t)w[j] > 0x10FFFF) {
                        goto drop;
                    }
                }
                /* wchar_t is 4 bytes wherever 'Z' is accepted: UCS-4. */
                a[k].blob = nq_blob_new(w, len * sizeof(wchar_t));
                if (a[k].blob == NULL) {
                    goto drop;
                }
            }
            break;
        }
        default:
            goto drop;  /* unreachable: codes are checked at creation */
        }
    }
    {
        nq_payload u;
        u.sig = sig;
        if (NQ_LIKELY(nq_post_message(port, NQ_CALL, u, a, n, sig->nrec))) {
            errno = saved_errno;
            return;
        }
    }
drop:
    /* a[0..k) are filled in: free their copies. */
    nq_free_args(sig, a, k);
    errno = saved_errno;
}

static PyObject *
nq_make_listener_closure(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "make_listener_closure() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    long long port;
    if (nq_port_arg(args[0], &port) < 0) {
        return NULL;
    }
    if (!PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "codes must be a str");
        return NULL;
    }
    Py_ssize_t n;
    const char *codes = PyUnicode_AsUTF8AndSize(args[1], &n);
    if (codes == NULL) {
        return NULL;
    }
    if (n > NQ_MAX_ARGS) {
        PyErr_Format(PyExc_ValueError, "a listener closure takes at most %d arguments, not %zd",
                     NQ_MAX_ARGS, n);
        return NULL;
    }
    nq_listener *L = (nq_listener *)calloc(1, sizeof(nq_listener));
    if (L == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        if (codes[k] == '\0' || strchr(NQ_LISTENER_CODES, codes[k]) == NULL ||
            (L->atypes[k] = nq_ffi_type(codes[k])) == NULL) {
            free(L);
            PyErr_Format(PyExc_ValueError,
                         "unsupported listener argument type code at index %zd of %R", k, args[1]);
            return NULL;
        }
        L->sig.codes[k] = codes[k];
        if (codes[k] == 'z' || codes[k] == 'Z') {
            L->sig.has_blobs = true;
        }
    }
    L->sig.nargs = (uint32_t)n;
    L->sig.nrec = (uint32_t)((n + NQ_ARGS_PER_REC - 1) / NQ_ARGS_PER_REC);
    L->port = (int64_t)port;
    if (ffi_prep_cif(&L->cif, FFI_DEFAULT_ABI, (unsigned int)n, &ffi_type_void, L->atypes) != FFI_OK) {
        free(L);
        PyErr_SetString(PyExc_RuntimeError, "ffi_prep_cif failed for a listener closure");
        return NULL;
    }
    L->closure = (ffi_closure *)ffi_closure_alloc(sizeof(ffi_closure), &L->code);
    if (L->closure == NULL) {
        free(L);
        return PyErr_NoMemory();
    }
    if (ffi_prep_closure_loc(L->closure, &L->cif, nq_listener_entry, L, L->code) != FFI_OK) {
        ffi_closure_free(L->closure);
        free(L);
        PyErr_SetString(PyExc_RuntimeError, "ffi_prep_closure_loc failed for a listener closure");
        return NULL;
    }
    PyObject *address = PyLong_FromVoidPtr(L->code);
    PyObject *handle = PyLong_FromVoidPtr(L);
    if (address == NULL || handle == NULL) {
        /* Leaked on purpose, like every listener: nothing can call it yet,
         * but freeing it would need care for no gain. */
        Py_XDECREF(address);
        Py_XDECREF(handle);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, address, handle);
    Py_DECREF(address);
    Py_DECREF(handle);
    return result;
}

static PyObject *
nq_retire_listener_closure(PyObject *Py_UNUSED(module), PyObject *arg)
{
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "not a listener handle");
        }
        return NULL;
    }
    __atomic_store_n(&((nq_listener *)p)->port, (int64_t)0, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

#endif /* NQ_HAVE_FFI */

/* ------------------------------------------------------------------------ */
/* NativeQueue                                                              */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    nq_core core;
    Py_ssize_t discarded;  /* messages freed by close() without a drain */
    PyObject *weakreflist;
} NativeQueueObject;

static PyTypeObject NativeQueue_Type;

static int
nq_open_fds(nq_core *q)
{
#if NQ_HAVE_EVENTFD
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    q->rfd = q->wfd = fd;
    return 0;
#else
    int fds[2];
    if (pipe(fds) < 0) {
        return -1;
    }
    for (int k = 0; k < 2; k++) {
        int fl = fcntl(fds[k], F_GETFL);
        if (fl < 0 || fcntl(fds[k], F_SETFL, fl | O_NONBLOCK) < 0 ||
            fcntl(fds[k], F_SETFD, FD_CLOEXEC) < 0) {
            close(fds[0]);
            close(fds[1]);
            return -1;
        }
    }
    q->rfd = fds[0];
    q->wfd = fds[1];
    return 0;
#endif
}

static PyObject *
NativeQueue_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "NativeQueue() takes no arguments");
        return NULL;
    }
    NativeQueueObject *self = (NativeQueueObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    nq_core *q = &self->core;
    q->head = q->tail = NULL;
    q->count = 0;
    q->wakeup_pending = false;
    q->closed = true;  /* until the fd exists, so dealloc does nothing */
    q->rfd = q->wfd = -1;
    self->discarded = 0;
    self->weakreflist = NULL;
    nq_mutex_init(&q->lock);
    if (nq_open_fds(q) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    q->closed = false;
    return (PyObject *)self;
}

/* Called with the GIL held, from close() or dealloc. */
static void
NativeQueue_do_close(NativeQueueObject *self)
{
    nq_core *q = &self->core;

    /* 1. Mark closed and take the messages.  From here on every poster that
     *    reaches this core sees `closed` and returns false without touching
     *    the list or the fd.  Waiting for the lock with the GIL held cannot
     *    deadlock: posters never need the GIL. */
    pthread_mutex_lock(&q->lock);
    if (q->closed) {
        pthread_mutex_unlock(&q->lock);
        return;
    }
    q->closed = true;
    nq_chunk *head = q->head;
    Py_ssize_t count = q->count;
    q->head = q->tail = NULL;
    q->count = 0;
    q->wakeup_pending = false;
    pthread_mutex_unlock(&q->lock);

    /* 2. Unbind every port that leads here.  Taking each shard lock also
     *    waits out any poster still inside this core, so afterwards nothing
     *    references it and dealloc may free it. */
    for (unsigned i = 0; i < NQ_SHARDS; i++) {
        nq_shard *s = &nq_shards[i];
        pthread_mutex_lock(&s->lock);
        for (size_t j = 0; j < s->cap && s->live > 0; j++) {
            if (s->slots[j].key > 0 && s->slots[j].q == q) {
                nq_shard_remove_slot(s, &s->slots[j]);
            }
        }
        pthread_mutex_unlock(&s->lock);
    }

    /* 3. Free what was queued but never drained, and the fd(s). */
    nq_free_chunks(head);
    self->discarded += count;
    if (q->wfd >= 0 && q->wfd != q->rfd) {
        close(q->wfd);
    }
    if (q->rfd >= 0) {
        close(q->rfd);
    }
    q->rfd = q->wfd = -1;
}

static void
NativeQueue_dealloc(NativeQueueObject *self)
{
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    NativeQueue_do_close(self);
    pthread_mutex_destroy(&self->core.lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
NativeQueue_fileno(NativeQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    /* rfd only changes in close(), under the GIL. */
    return PyLong_FromLong(self->core.rfd);
}

/* The arguments of a queued listener call as a tuple of Python values, the
 * same values a ctypes callback of the same CFUNCTYPE gets (see
 * make_listener_closure).  New reference; NULL with an exception set. */
static PyObject *
nq_call_to_tuple(nq_msg *header)
{
    const nq_sig *sig = header->u.sig;
    nq_arg *a = nq_call_args(header);
    PyObject *tuple = PyTuple_New((Py_ssize_t)sig->nargs);
    if (tuple == NULL) {
        return NULL;
    }
    for (uint32_t k = 0; k < sig->nargs; k++) {
        PyObject *v;
        switch (sig->codes[k]) {
        case '?':
            v = PyBool_FromLong(a[k].i != 0);
            break;
        case 'b': case 'h': case 'i': case 'l': case 'q':
            v = PyLong_FromLongLong(a[k].i);
            break;
        case 'B': case 'H': case 'I': case 'L': case 'Q':
            v = PyLong_FromUnsignedLongLong(a[k].u);
            break;
        case 'f': case 'd': case 'g':
            v = PyFloat_FromDouble(a[k].d);
            break;
        case 'c': {
            char ch = (char)a[k].i;
            v = PyBytes_FromStringAndSize(&ch, 1);
            break;
        }
        case 'u':
            /* Checked <= U+10FFFF in the calling thread. */
            v = PyUnicode_FromOrdinal((int)a[k].i);
            break;
        case 'P':
            v = a[k].u == 0 ? Py_NewRef(Py_None) : PyLong_FromUnsignedLongLong(a[k].u);
            break;
        case 'z':
            v = a[k].blob == NULL ? Py_NewRef(Py_None)
                                  : PyBytes_FromStringAndSize(a[k].blob->data, a[k].blob->len);
            break;
        case 'Z':
            /* UCS-4 code units, checked <= U+10FFFF in the calling thread. */
            v = a[k].blob == NULL
                    ? Py_NewRef(Py_None)
                    : PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, a[k].blob->data,
                                                a[k].blob->len / 4);
            break;
        default:
            v = NULL;
            PyErr_Format(PyExc_SystemError, "listener argument type code %c", sig->codes[k]);
            break;
        }
        if (v == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, (Py_ssize_t)k, v);
    }
    if (sig->nargs > 0) {
        /* Only atomic values inside: it can never be part of a cycle. */
        PyObject_GC_UnTrack(tuple);
    }
    return tuple;
}

/* drain() and drain_flat(): the same batch, as (port, value) pairs or as a
 * flat [port, value, port, value, ...] list (flat). */
static PyObject *
nq_drain(NativeQueueObject *self, PyObject *const *args, Py_ssize_t nargs, bool flat)
{
    const char *name = flat ? "drain_flat" : "drain";
    nq_core *q = &self->core;
    Py_ssize_t limit = 0;
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (%zd given)", name, nargs);
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None) {
        limit = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
        if (limit == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (limit <= 0) {
            PyErr_Format(PyExc_ValueError, "%s() limit must be positive (or None)", name);
            return NULL;
        }
    }

    /* The critical section is a constant-time swap (plus one read(2) when a
     * wakeup is outstanding, or a walk over limit / NQ_CHUNK_CAP chunks), so
     * posters are held up for microseconds at most, however large the
     * queue. */
    pthread_mutex_lock(&q->lock);
    nq_chunk *head = q->head;
    Py_ssize_t count = q->count;
    if (limit > 0 && count > limit) {
        /* Take whole chunks, at least `limit` messages.  If some are left,
         * the wakeup stays pending and the fd readable: the owner's loop
         * calls again on its next iteration, after its other ready events.
         * Converting a few thousand at a time also keeps the objects in the
         * CPU caches between their creation here and their use. */
        Py_ssize_t taken = 0;
        nq_chunk *last = NULL, *c = head;
        while (c != NULL && taken < limit) {
            taken += c->nmsg;
            last = c;
            c = c->next;
        }
        if (c != NULL) {
            last->next = NULL;
            q->head = c;
            q->count -= taken;
            count = taken;
            pthread_mutex_unlock(&q->lock);
            goto convert;
        }
    }
    if (q->wakeup_pending) {
        nq_consume_locked(q);
        q->wakeup_pending = false;
    }
    q->head = q->tail = NULL;
    q->count = 0;
    pthread_mutex_unlock(&q->lock);

convert:;

    /* count <= PY_SSIZE_T_MAX / sizeof(nq_msg): it counts records in memory. */
    PyObject *list = PyList_New(flat ? 2 * count : count);
    if (list == NULL || count == 0) {
        nq_free_chunks(head);
        return list;
    }

    /* Garbage-collector cost dominates a large batch otherwise:
     *  - each (port, value) pair holds only an int and an atomic value (None,
     *    int, float, str, bytes), so it can never be part of a reference
     *    cycle.  CPython untracks such tuples itself, lazily, during a
     *    collection; untracking them at birth keeps the collections that the
     *    allocations trigger from scanning (and promoting) millions of them;
     *  - the list is untracked while it is being filled, so that those
     *    collections do not traverse it again and again, and tracked again
     *    before anyone else can see it.
     * The flat list has no pairs at all: no tuple to allocate, untrack and
     * free per message (about a tenth of the isolate's work per post). */
    PyObject_GC_UnTrack(list);

    /* Consecutive messages usually go to the same port: reuse its int. */
    int64_t last_port = 0;
    PyObject *port_obj = NULL;
    Py_ssize_t k = 0;
    bool failed = false;
    for (nq_chunk *c = head; c != NULL && !failed; c = c->next) {
        for (size_t i = 0; i < c->n; i++) {
            nq_msg *m = &c->items[i];
            if (port_obj == NULL || m->port != last_port) {
                Py_XDECREF(port_obj);
                port_obj = PyLong_FromLongLong(m->port);
                if (port_obj == NULL) {
                    failed = true;
                    break;
                }
                last_port = m->port;
            }
            PyObject *value;
            switch (m->type) {
            case NQ_INT64:
                value = PyLong_FromLongLong(m->u.i);
                break;
            case NQ_DOUBLE:
                value = PyFloat_FromDouble(m->u.d);
                break;
            case NQ_STRING_ASCII:
                if (m->u.blob == NULL) {
                    value = PyUnicode_New(0, 0);
                }
                else {
                    value = PyUnicode_New(m->u.blob->len, 127);
                    if (value != NULL) {
                        memcpy(PyUnicode_1BYTE_DATA(value), m->u.blob->data,
                               (size_t)m->u.blob->len);
                    }
                }
                break;
            case NQ_STRING_UTF8:
                /* Validated at post time, so only MemoryError is possible. */
                value = PyUnicode_DecodeUTF8(m->u.blob->data, m->u.blob->len, "strict");
                break;
            case NQ_BYTES:
                if (m->u.blob == NULL) {
                    value = PyBytes_FromStringAndSize(NULL, 0);
                }
                else {
                    value = PyBytes_FromStringAndSize(m->u.blob->data, m->u.blob->len);
                }
                break;
            case NQ_CALL:
                value = nq_call_to_tuple(m);
                i += m->u.sig->nrec;  /* skip the argument records */
                break;
            default: /* NQ_NULL */
                value = Py_NewRef(Py_None);
                break;
            }
            if (value == NULL) {
                failed = true;
                break;
            }
            if (flat) {
                /* The same int object for a run of one port's messages, which
                 * lets the dispatcher resolve the port once per run. */
                PyList_SET_ITEM(list, k, Py_NewRef(port_obj));
                PyList_SET_ITEM(list, k + 1, value);
                k += 2;
                continue;
            }
            PyObject *pair = PyTuple_New(2);
            if (pair == NULL) {
                Py_DECREF(value);
                failed = true;
                break;
            }
            PyTuple_SET_ITEM(pair, 0, Py_NewRef(port_obj));
            PyTuple_SET_ITEM(pair, 1, value);
            PyObject_GC_UnTrack(pair);
            PyList_SET_ITEM(list, k, pair);
            k++;
        }
    }
    Py_XDECREF(port_obj);
    /* Blobs were copied into Python objects; free records and blobs alike
     * (on failure this also frees what was not converted). */
    nq_free_chunks(head);
    PyObject_GC_Track(list);
    if (failed) {
        /* list_dealloc tolerates the NULL slots past k. */
        Py_DECREF(list);
        return NULL;
    }
    return list;
}

static PyObject *
NativeQueue_drain(NativeQueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return nq_drain(self, args, nargs, false);
}

static PyObject *
NativeQueue_drain_flat(NativeQueueObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return nq_drain(self, args, nargs, true);
}

static PyObject *
NativeQueue_close(NativeQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    NativeQueue_do_close(self);
    Py_RETURN_NONE;
}

static PyObject *
NativeQueue_pending(NativeQueueObject *self, PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&self->core.lock);
    Py_ssize_t n = self->core.count;
    pthread_mutex_unlock(&self->core.lock);
    return PyLong_FromSsize_t(n);
}

static PyObject *
NativeQueue_get_closed(NativeQueueObject *self, void *Py_UNUSED(closure))
{
    pthread_mutex_lock(&self->core.lock);
    bool closed = self->core.closed;
    pthread_mutex_unlock(&self->core.lock);
    return PyBool_FromLong(closed);
}

static PyObject *
NativeQueue_get_discarded(NativeQueueObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->discarded);
}

static PyObject *
NativeQueue_repr(NativeQueueObject *self)
{
    pthread_mutex_lock(&self->core.lock);
    bool closed = self->core.closed;
    Py_ssize_t count = self->core.count;
    pthread_mutex_unlock(&self->core.lock);
    if (closed) {
        return PyUnicode_FromFormat("<%s closed>", Py_TYPE(self)->tp_name);
    }
    return PyUnicode_FromFormat("<%s fd=%d pending=%zd>", Py_TYPE(self)->tp_name,
                                self->core.rfd, count);
}

static PyMethodDef NativeQueue_methods[] = {
    {"fileno", (PyCFunction)NativeQueue_fileno, METH_NOARGS,
     "fileno() -> int\n\n"
     "The wakeup fd for the owning loop's add_reader (an eventfd on Linux, the\n"
     "read end of a pipe elsewhere); -1 once closed.  Any thread."},
    {"drain", (PyCFunction)(void (*)(void))NativeQueue_drain, METH_FASTCALL,
     "drain(limit=None) -> list[tuple[int, object]]\n\n"
     "Owning isolate thread.  Consume the wakeup and return every queued\n"
     "(port, value) in FIFO order, converted to None/int/float/str/bytes\n"
     "(a listener call: a tuple of its arguments); [] if nothing is queued\n"
     "or the queue is closed.  A post that races with drain() is either in\n"
     "this batch or triggers a new wakeup.  With a positive limit, when more\n"
     "than limit messages are queued, return only the oldest ones, at least\n"
     "limit (whole internal chunks, so up to about limit + 1024), and leave\n"
     "the wakeup pending for the rest.  Raises MemoryError (the batch is\n"
     "then lost)."},
    {"drain_flat", (PyCFunction)(void (*)(void))NativeQueue_drain_flat, METH_FASTCALL,
     "drain_flat(limit=None) -> list[object]\n\n"
     "Owning isolate thread.  drain(limit), flattened: [port, value, port,\n"
     "value, ...] with the same messages in the same order, and no tuple per\n"
     "message.  Consecutive messages to one port share one int object for\n"
     "the port."},
    {"close", (PyCFunction)NativeQueue_close, METH_NOARGS,
     "close() -> None\n\n"
     "Any thread; idempotent.  Unbind every port bound to this queue, free\n"
     "pending messages and close the fd.  Later posts to its ports return\n"
     "false."},
    {"pending", (PyCFunction)NativeQueue_pending, METH_NOARGS,
     "pending() -> int\n\nAny thread.  Number of queued messages (0 once closed)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef NativeQueue_getset[] = {
    {"closed", (getter)NativeQueue_get_closed, NULL,
     "True once close() has run.", NULL},
    {"_discarded", (getter)NativeQueue_get_discarded, NULL,
     "Messages freed by close() without being drained (for tests).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject NativeQueue_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dartloop.ffi._nativequeue.NativeQueue",
    .tp_basicsize = sizeof(NativeQueueObject),
    .tp_dealloc = (destructor)NativeQueue_dealloc,
    .tp_repr = (reprfunc)NativeQueue_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NativeQueue()\n\n"
              "The queue of messages posted from C to one isolate's ports.  One per\n"
              "isolate; owns a wakeup fd (eventfd on Linux, a pipe elsewhere).",
    .tp_weaklistoffset = offsetof(NativeQueueObject, weakreflist),
    .tp_methods = NativeQueue_methods,
    .tp_getset = NativeQueue_getset,
    .tp_new = NativeQueue_new,
};

/* ------------------------------------------------------------------------ */
/* StarCall: the port handler of a native listener                          */
/* ------------------------------------------------------------------------ */

/* StarCall(callback)(args) is callback(*args), without the Python frame a
 * `def handler(args): callback(*args)` costs on every listener call (about
 * a quarter of the isolate's per-call work).  Vectorcall, so the isolate's
 * `handler(value)` doesn't build a 1-tuple either. */
typedef struct {
    PyObject_HEAD
    PyObject *callback;
    vectorcallfunc vectorcall;
} StarCallObject;

static PyObject *
StarCall_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "StarCall takes exactly one positional argument (a tuple)");
        return NULL;
    }
    if (!PyTuple_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "StarCall expects a tuple, not %.100s", Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    return PyObject_Call(((StarCallObject *)self)->callback, args[0], NULL);
}

static PyObject *
StarCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *callback;
    if ((kwds != NULL && PyDict_GET_SIZE(kwds) != 0) || !PyArg_UnpackTuple(args, "StarCall", 1, 1, &callback)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "StarCall() takes no keyword arguments");
        }
        return NULL;
    }
    if (!PyCallable_Check(callback)) {
        PyErr_Format(PyExc_TypeError, "StarCall() needs a callable, not %.100s", Py_TYPE(callback)->tp_name);
        return NULL;
    }
    StarCallObject *self = (StarCallObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->callback = Py_NewRef(callback);
    self->vectorcall = StarCall_vectorcall;
    return (PyObject *)self;
}

static int
StarCall_traverse(StarCallObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->callback);
    return 0;
}

static int
StarCall_clear(StarCallObject *self)
{
    Py_CLEAR(self->callback);
    return 0;
}

static void
StarCall_dealloc(StarCallObject *self)
{
    PyObject_GC_UnTrack(self);
    StarCall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
StarCall_repr(StarCallObject *self)
{
    if (self->callback == NULL) {
        return PyUnicode_FromString("<StarCall cleared>");
    }
    return PyUnicode_FromFormat("<StarCall of %R>", self->callback);
}

static PyMemberDef StarCall_members[] = {
    {"callback", T_OBJECT_EX, offsetof(StarCallObject, callback), READONLY, "The callback."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StarCall_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dartloop.ffi._nativequeue.StarCall",
    .tp_basicsize = sizeof(StarCallObject),
    .tp_dealloc = (destructor)StarCall_dealloc,
    .tp_vectorcall_offset = offsetof(StarCallObject, vectorcall),
    .tp_repr = (reprfunc)StarCall_repr,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "StarCall(callback)\n\n"
              "StarCall(callback)(args) calls callback(*args): args must be a tuple.",
    .tp_traverse = (traverseproc)StarCall_traverse,
    .tp_clear = (inquiry)StarCall_clear,
    .tp_members = StarCall_members,
    .tp_new = StarCall_new,
};

/* ------------------------------------------------------------------------ */
/* Module functions                                                         */
/* ------------------------------------------------------------------------ */

static PyObject *
nq_bind_port(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "bind_port() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    long long port;
    if (nq_port_arg(args[0], &port) < 0) {
        return NULL;
    }
    if (!PyObject_TypeCheck(args[1], &NativeQueue_Type)) {
        PyErr_Format(PyExc_TypeError, "queue must be a NativeQueue, not %.100s",
                     Py_TYPE(args[1])->tp_name);
        return NULL;
    }
    nq_core *q = &((NativeQueueObject *)args[1])->core;

    uint64_t h = nq_hash((int64_t)port);
    nq_shard *s = nq_shard_for(h);
    int err = 0;
    pthread_mutex_lock(&s->lock);
    /* Lock order shard -> queue, as in nq_post.  Checking `closed` under both
     * locks means close() (which marks closed first, then sweeps the shards)
     * can never leave a stale entry behind. */
    pthread_mutex_lock(&q->lock);
    if (q->closed) {
        err = 1;
    }
    else if (nq_shard_find(s, (int64_t)port, h) != NULL) {
        err = 2;
    }
    else if (nq_shard_insert(s, (int64_t)port, h, q) < 0) {
        err = 3;
    }
    pthread_mutex_unlock(&q->lock);
    pthread_mutex_unlock(&s->lock);

    switch (err) {
    case 1:
        PyErr_SetString(PyExc_ValueError, "cannot bind a port to a closed NativeQueue");
        return NULL;
    case 2:
        PyErr_Format(PyExc_ValueError, "port %lld is already bound", port);
        return NULL;
    case 3:
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyObject *
nq_unbind_port(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyLong_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "port must be an int");
        return NULL;
    }
    int overflow = 0;
    long long port = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (port == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow != 0 || port <= 0) {
        Py_RETURN_FALSE;  /* could never have been bound */
    }
    uint64_t h = nq_hash((int64_t)port);
    nq_shard *s = nq_shard_for(h);
    /* Under the shard lock, so a concurrent post either completed before
     * (its message is queued) or runs after and finds nothing. */
    pthread_mutex_lock(&s->lock);
    nq_slot *sl = nq_shard_find(s, (int64_t)port, h);
    if (sl != NULL) {
        nq_shard_remove_slot(s, sl);
    }
    pthread_mutex_unlock(&s->lock);
    return PyBool_FromLong(sl != NULL);
}

static PyObject *
nq_py_post_int64(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    /* The isolate's relay (Python senders on other threads) posts through
     * here, holding the GIL: the same queue, and so the same FIFO, as the
     * C threads' posts. */
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "post_int64() takes exactly 2 arguments (port, value)");
        return NULL;
    }
    long long port = PyLong_AsLongLong(args[0]);
    if (port == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long value = PyLong_AsLongLong(args[1]);
    if (value == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return PyBool_FromLong(nq_post_int64((int64_t)port, (int64_t)value));
}

static PyObject *
nq_api_address(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromVoidPtr((void *)&nq_api);
}

static PyObject *
nq_api_struct_size(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(DartloopApi));
}

static PyMethodDef nq_module_methods[] = {
    {"bind_port", (PyCFunction)(void (*)(void))nq_bind_port, METH_FASTCALL,
     "bind_port(port: int, queue: NativeQueue) -> None\n\n"
     "Any thread.  Route posts to port (a positive int64) into queue.\n"
     "Raises ValueError if port is not positive, already bound, or queue is\n"
     "closed; OverflowError if port does not fit in int64; TypeError for\n"
     "wrong argument types."},
    {"unbind_port", (PyCFunction)nq_unbind_port, METH_O,
     "unbind_port(port: int) -> bool\n\n"
     "Any thread.  True if port was bound; afterwards posts to it return\n"
     "false.  Safe against concurrent posts."},
    {"post_int64", (PyCFunction)(void (*)(void))nq_py_post_int64, METH_FASTCALL,
     "post_int64(port: int, value: int) -> bool\n\n"
     "Any thread.  DartloopApi.post_int64 for Python callers: True iff queued\n"
     "to an open port.  OverflowError if either does not fit in int64."},
    {"api_address", (PyCFunction)nq_api_address, METH_NOARGS,
     "api_address() -> int\n\n"
     "Address of the process-wide, read-only DartloopApi (version 1)."},
    {"api_struct_size", (PyCFunction)nq_api_struct_size, METH_NOARGS,
     "api_struct_size() -> int\n\nsizeof(DartloopApi) as compiled."},
#if NQ_HAVE_FFI
    {"make_listener_closure", (PyCFunction)(void (*)(void))nq_make_listener_closure, METH_FASTCALL,
     "make_listener_closure(port: int, codes: str) -> tuple[int, int]\n\n"
     "A libffi closure void f(args...) whose argument types are the ctypes type\n"
     "codes in codes (each one of LISTENER_TYPE_CODES, at most 64).  Called from\n"
     "any thread, without the GIL, it posts its arguments as one message to\n"
     "port; the message drains as a tuple of the values a ctypes callback of\n"
     "the same type gets.  Returns (code address, handle for\n"
     "retire_listener_closure).  Never freed.  Only present when built with\n"
     "libffi."},
    {"retire_listener_closure", (PyCFunction)nq_retire_listener_closure, METH_O,
     "retire_listener_closure(handle: int) -> None\n\n"
     "Make the listener closure drop every later call.  Idempotent."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef nq_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dartloop.ffi._nativequeue",
    .m_doc = "Native message queue behind dartloop's C posting API (dartloop_api.h).",
    .m_size = -1,
    .m_methods = nq_module_methods,
};

PyMODINIT_FUNC
PyInit__nativequeue(void)
{
    pthread_once(&nq_shards_once, nq_shards_init);
    if (PyType_Ready(&NativeQueue_Type) < 0 || PyType_Ready(&StarCall_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&nq_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "NativeQueue", (PyObject *)&NativeQueue_Type) < 0 ||
        PyModule_AddObjectRef(m, "StarCall", (PyObject *)&StarCall_Type) < 0 ||
        PyModule_AddIntConstant(m, "API_VERSION", DARTLOOP_API_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "HAVE_EVENTFD", NQ_HAVE_EVENTFD) < 0 ||
        PyModule_AddStringConstant(m, "LISTENER_TYPE_CODES", NQ_LISTENER_CODES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
