/*
 * listener_paths.c - the native side of tests/test_ffi_listener_paths.py.
 *
 * Compiled at test time (tests/_native_build.py) with
 *     cc -shared -fPIC -pthread -I <dartloop.ffi.include_dir()>
 * Threads started here are pthreads that Python never saw; they call
 * NativeCallable.listener pointers as a native library would.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <wchar.h>

static void
start_or_die(pthread_t *th, void *(*main)(void *), void *arg)
{
    if (pthread_create(th, NULL, main, arg) != 0) {
        abort();
    }
}

/* ------------------------------------------------------------------------ */
/* n threads, each calls fn(t, i) for i in [0, count)                       */
/* ------------------------------------------------------------------------ */

typedef void (*seq_fn)(int32_t thread, int64_t seq);

typedef struct {
    seq_fn fn;
    int32_t t;
    int64_t count;
    atomic_int *done;
} seq_arg;

typedef struct {
    int n;
    atomic_int done;
    pthread_t *th;
    seq_arg *args;
} seq_group;

static void *
seq_main(void *p)
{
    seq_arg *a = (seq_arg *)p;
    for (int64_t i = 0; i < a->count; i++) {
        a->fn(a->t, i);
    }
    atomic_fetch_add(a->done, 1);
    return NULL;
}

void *
seq_start(seq_fn fn, int n, int64_t count)
{
    seq_group *g = (seq_group *)calloc(1, sizeof *g);
    g->n = n;
    atomic_init(&g->done, 0);
    g->th = (pthread_t *)calloc((size_t)n, sizeof(pthread_t));
    g->args = (seq_arg *)calloc((size_t)n, sizeof(seq_arg));
    for (int t = 0; t < n; t++) {
        g->args[t] = (seq_arg){fn, t, count, &g->done};
        start_or_die(&g->th[t], seq_main, &g->args[t]);
    }
    return g;
}

int
seq_done(void *p)
{
    seq_group *g = (seq_group *)p;
    return atomic_load(&g->done) == g->n;
}

void
seq_join(void *p)
{
    seq_group *g = (seq_group *)p;
    for (int t = 0; t < g->n; t++) {
        pthread_join(g->th[t], NULL);
    }
    free(g->th);
    free(g->args);
    free(g);
}

/* Called through ctypes.PyDLL, i.e. WITH the GIL held for the whole call:
 * starts the threads and waits up to timeout_ms for all of them to finish.
 * Returns 1 if they did (their calls never needed the GIL), 0 otherwise (the
 * threads are then left to finish once the GIL is released; join them with
 * seq_join). */
int
seq_run_holding_gil(seq_fn fn, int n, int64_t count, int timeout_ms, void **group)
{
    *group = seq_start(fn, n, count);
    struct timespec tick = {0, 1000000};
    for (int ms = 0; ms < timeout_ms; ms++) {
        if (seq_done(*group)) {
            return 1;
        }
        nanosleep(&tick, NULL);
    }
    return seq_done(*group);
}

/* ------------------------------------------------------------------------ */
/* Every supported argument type                                            */
/* ------------------------------------------------------------------------ */

typedef struct {
    bool b;
    int8_t i8;
    uint8_t u8;
    int16_t i16;
    uint16_t u16;
    int32_t i32;
    uint32_t u32;
    int64_t i64;
    uint64_t u64;
    long l;
    unsigned long ul;
    long long ll;
    unsigned long long ull;
    size_t sz;
    ptrdiff_t ssz;
    float f;
    double d;
    long double ld;
    char c;
    wchar_t wc;
    void *p;
    const char *s;
    const wchar_t *ws;
    int *ip;
    void (*fp)(void);
} all_t;

typedef void (*all_fn)(bool, int8_t, uint8_t, int16_t, uint16_t, int32_t, uint32_t, int64_t,
                       uint64_t, long, unsigned long, long long, unsigned long long, size_t,
                       ptrdiff_t, float, double, long double, char, wchar_t, void *,
                       const char *, const wchar_t *, int *, void (*)(void));

typedef struct {
    all_fn fn;
    const all_t *v;
    int n;
} all_arg;

static void *
all_main(void *p)
{
    all_arg *a = (all_arg *)p;
    for (int k = 0; k < a->n; k++) {
        const all_t *v = &a->v[k];
        a->fn(v->b, v->i8, v->u8, v->i16, v->u16, v->i32, v->u32, v->i64, v->u64, v->l, v->ul,
              v->ll, v->ull, v->sz, v->ssz, v->f, v->d, v->ld, v->c, v->wc, v->p, v->s, v->ws,
              v->ip, v->fp);
    }
    return NULL;
}

/* Calls fn once per element of values[0..n), in order, on a new thread. */
void
all_call_in_thread(all_fn fn, const all_t *values, int n)
{
    all_arg a = {fn, values, n};
    pthread_t th;
    start_or_die(&th, all_main, &a);
    pthread_join(th, NULL);
}

/* Strings that live only during the call: the listener must copy them. */
typedef void (*str_fn)(int64_t seq, const char *s, const wchar_t *ws);

typedef struct {
    str_fn fn;
    int64_t count;
} str_arg;

static void *
str_main(void *p)
{
    str_arg *a = (str_arg *)p;
    for (int64_t i = 0; i < a->count; i++) {
        char s[32];
        wchar_t ws[32];
        int len = (int)(i % 20);
        for (int j = 0; j < len; j++) {
            s[j] = (char)('a' + (i + j) % 26);
            ws[j] = (wchar_t)(0x3b1 + (i + j) % 24); /* Greek letters */
        }
        s[len] = '\0';
        ws[len] = L'\0';
        a->fn(i, s, ws);
        /* Scribble over the buffers: the call must already have copied them. */
        for (int j = 0; j < 32; j++) {
            s[j] = 'X';
            ws[j] = L'X';
        }
    }
    return NULL;
}

void
str_call_in_thread(str_fn fn, int64_t count)
{
    str_arg a = {fn, count};
    pthread_t th;
    start_or_die(&th, str_main, &a);
    pthread_join(th, NULL);
}
