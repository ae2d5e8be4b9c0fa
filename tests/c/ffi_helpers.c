/*
 * ffi_helpers.c - the native side of tests/test_ffi.py.
 *
 * Compiled at test time (tests/_native_build.py) with
 *     cc -shared -fPIC -pthread -I <dartloop.ffi.include_dir()>
 * Every function that involves threads starts real pthreads that Python never
 * saw: they call NativeCallable function pointers and DartloopApi posting
 * functions exactly as a native library would.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dartloop_api.h"

typedef void (*listener_fn)(int64_t thread, int64_t seq);
typedef intptr_t (*ii_fn)(intptr_t);
typedef double (*dd_fn)(double);

static void
start_or_die(pthread_t *th, void *(*main)(void *), void *arg)
{
    if (pthread_create(th, NULL, main, arg) != 0) {
        abort();
    }
}

/* ------------------------------------------------------------------------ */
/* Listener calls: n threads, each calls fn(t, i) for i in [0, count).       */
/* ------------------------------------------------------------------------ */

typedef struct {
    listener_fn fn;
    int t;
    int64_t count;
    atomic_int *done;
} calls_arg;

typedef struct {
    int n;
    atomic_int done;
    pthread_t *th;
    calls_arg *args;
} calls_group;

static void *
calls_main(void *p)
{
    calls_arg *a = (calls_arg *)p;
    for (int64_t i = 0; i < a->count; i++) {
        a->fn(a->t, i);
    }
    atomic_fetch_add(a->done, 1);
    return NULL;
}

void *
calls_start(listener_fn fn, int n, int64_t count)
{
    calls_group *g = calloc(1, sizeof *g);
    g->n = n;
    atomic_init(&g->done, 0);
    g->th = calloc((size_t)n, sizeof(pthread_t));
    g->args = calloc((size_t)n, sizeof(calls_arg));
    for (int t = 0; t < n; t++) {
        g->args[t] = (calls_arg){fn, t, count, &g->done};
    }
    for (int t = 0; t < n; t++) {
        start_or_die(&g->th[t], calls_main, &g->args[t]);
    }
    return g;
}

int
calls_done(void *p)
{
    return atomic_load(&((calls_group *)p)->done);
}

void
calls_join(void *p)
{
    calls_group *g = (calls_group *)p;
    for (int t = 0; t < g->n; t++) {
        pthread_join(g->th[t], NULL);
    }
    free(g->th);
    free(g->args);
    free(g);
}

/* One call fn(t, i) on a new thread, joined. */
typedef struct {
    listener_fn fn;
    int64_t t, i;
} one_call;

static void *
one_call_main(void *p)
{
    one_call *c = (one_call *)p;
    c->fn(c->t, c->i);
    return NULL;
}

void
listener_in_thread(listener_fn fn, int64_t t, int64_t i)
{
    one_call c = {fn, t, i};
    pthread_t th;
    start_or_die(&th, one_call_main, &c);
    pthread_join(th, NULL);
}

/* Start and join: the calling thread is blocked inside C meanwhile. */
void
calls_run(listener_fn fn, int n, int64_t count)
{
    calls_join(calls_start(fn, n, count));
}

/* ------------------------------------------------------------------------ */
/* One call of an intptr_t(intptr_t) pointer on a new thread; the result is  */
/* posted to a port (post_intptr) once the call has returned.                */
/* ------------------------------------------------------------------------ */

typedef struct {
    const DartloopApi *api;
    int64_t port;
    ii_fn fn;
    intptr_t arg;
    int repeat;
    pthread_t th;
} ii_call;

static void *
ii_main(void *p)
{
    ii_call *c = (ii_call *)p;
    for (int k = 0; k < c->repeat; k++) {
        intptr_t r = c->fn(c->arg + k);
        (void)c->api->post_intptr(c->port, r); /* false: the test is over */
    }
    return NULL;
}

void *
ii_start(const DartloopApi *api, int64_t port, ii_fn fn, intptr_t arg, int repeat)
{
    ii_call *c = calloc(1, sizeof *c);
    c->api = api;
    c->port = port;
    c->fn = fn;
    c->arg = arg;
    c->repeat = repeat;
    start_or_die(&c->th, ii_main, c);
    return c;
}

void
ii_join(void *p)
{
    ii_call *c = (ii_call *)p;
    pthread_join(c->th, NULL);
    free(c);
}

/* One thread alternates: listener(0, i), then blocking(i), for i < count;
 * then posts the number of blocking calls that returned a wrong result. */
typedef struct {
    listener_fn listener;
    ii_fn blocking;
    int64_t count;
    const DartloopApi *api;
    int64_t port;
    pthread_t th;
} mixed_call;

static void *
mixed_main(void *p)
{
    mixed_call *c = (mixed_call *)p;
    int64_t bad = 0;
    for (int64_t i = 0; i < c->count; i++) {
        c->listener(0, i);
        if (c->blocking((intptr_t)i) != (intptr_t)i) {
            bad++;
        }
    }
    (void)c->api->post_int64(c->port, bad);
    return NULL;
}

void *
mixed_start(listener_fn listener, ii_fn blocking, int64_t count, const DartloopApi *api, int64_t port)
{
    mixed_call *c = calloc(1, sizeof *c);
    c->listener = listener;
    c->blocking = blocking;
    c->count = count;
    c->api = api;
    c->port = port;
    start_or_die(&c->th, mixed_main, c);
    return c;
}

void
mixed_join(void *p)
{
    mixed_call *c = (mixed_call *)p;
    pthread_join(c->th, NULL);
    free(c);
}

/* One thread alternates: post_int64(port, 2i), then py(2i + 1), for i < count
 * (py is a plain ctypes callback that sends 2i + 1 to the same port from
 * Python: SendPort.send). */
typedef void (*value_fn)(int64_t);

typedef struct {
    const DartloopApi *api;
    int64_t port;
    value_fn py;
    int64_t count;
    pthread_t th;
} interleave_call;

static void *
interleave_main(void *p)
{
    interleave_call *c = (interleave_call *)p;
    for (int64_t i = 0; i < c->count; i++) {
        (void)c->api->post_int64(c->port, 2 * i);
        c->py(2 * i + 1);
    }
    return NULL;
}

void *
interleave_start(const DartloopApi *api, int64_t port, value_fn py, int64_t count)
{
    interleave_call *c = calloc(1, sizeof *c);
    c->api = api;
    c->port = port;
    c->py = py;
    c->count = count;
    start_or_die(&c->th, interleave_main, c);
    return c;
}

void
interleave_join(void *p)
{
    interleave_call *c = (interleave_call *)p;
    pthread_join(c->th, NULL);
    free(c);
}

/* A call on the calling thread, from C. */
intptr_t
ii_here(ii_fn fn, intptr_t arg)
{
    return fn(arg);
}

double
dd_here(dd_fn fn, double arg)
{
    return fn(arg);
}

/* A call on a new thread, joined: the result comes back to the caller. */
typedef struct {
    dd_fn fn;
    double arg;
    double result;
} dd_call;

static void *
dd_main(void *p)
{
    dd_call *c = (dd_call *)p;
    c->result = c->fn(c->arg);
    return NULL;
}

double
dd_in_thread(dd_fn fn, double arg)
{
    dd_call c = {fn, arg, 0.0};
    pthread_t th;
    start_or_die(&th, dd_main, &c);
    pthread_join(th, NULL);
    return c.result;
}

/* ------------------------------------------------------------------------ */
/* The posting API                                                          */
/* ------------------------------------------------------------------------ */

int32_t
api_version(const DartloopApi *api)
{
    return api->version;
}

/* One post of every type, in this order; the number of posts that returned true. */
int
post_all_types(const DartloopApi *api, int64_t port)
{
    static const uint8_t data[] = {0, 1, 2, 255};
    int ok = 0;
    ok += api->post_null(port);
    ok += api->post_int64(port, INT64_MIN);
    ok += api->post_int64(port, INT64_MAX);
    ok += api->post_double(port, -2.5);
    ok += api->post_string(port, "h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80");
    ok += api->post_string(port, "");
    ok += api->post_bytes(port, data, (intptr_t)sizeof data);
    ok += api->post_bytes(port, NULL, 0);
    ok += api->post_intptr(port, INTPTR_MIN);
    ok += api->post_intptr(port, (intptr_t)-7);
    return ok;
}

typedef struct {
    const DartloopApi *api;
    int64_t port;
    int result;
} all_types_call;

static void *
all_types_main(void *p)
{
    all_types_call *c = (all_types_call *)p;
    c->result = post_all_types(c->api, c->port);
    return NULL;
}

int
post_all_types_in_thread(const DartloopApi *api, int64_t port)
{
    all_types_call c = {api, port, 0};
    pthread_t th;
    start_or_die(&th, all_types_main, &c);
    pthread_join(th, NULL);
    return c.result;
}

/* Direct calls, to pass invalid input exactly as C code would. */
bool c_post_null(const DartloopApi *api, int64_t port) { return api->post_null(port); }
bool c_post_int64(const DartloopApi *api, int64_t port, int64_t v) { return api->post_int64(port, v); }
bool c_post_double(const DartloopApi *api, int64_t port, double v) { return api->post_double(port, v); }
bool c_post_string(const DartloopApi *api, int64_t port, const char *s) { return api->post_string(port, s); }
bool c_post_bytes(const DartloopApi *api, int64_t port, const uint8_t *d, intptr_t n) { return api->post_bytes(port, d, n); }
bool c_post_intptr(const DartloopApi *api, int64_t port, intptr_t v) { return api->post_intptr(port, v); }

/* Posters: n threads post int64 tags (t << 40 | i) to one port.  With
 * until_false, a thread goes on until a post fails, then makes 1000 more
 * posts that must all fail too (a port never reopens). */
typedef struct {
    const DartloopApi *api;
    int64_t port;
    int t;
    int64_t count;
    bool until_false;
    int64_t ok;               /* posts that returned true before the first false */
    int64_t first_false;      /* sequence number of the first false, or -1 */
    int64_t true_after_false; /* must stay 0 */
    atomic_int *done;
} poster;

typedef struct {
    int n;
    atomic_int done;
    pthread_t *th;
    poster *p;
} poster_group;

static void *
poster_main(void *arg)
{
    poster *p = (poster *)arg;
    int64_t after = 0;
    for (int64_t i = 0; p->until_false || i < p->count; i++) {
        bool ok = p->api->post_int64(p->port, ((int64_t)p->t << 40) | i);
        if (ok) {
            if (p->first_false < 0) {
                p->ok++;
            }
            else {
                p->true_after_false++;
            }
        }
        else if (p->first_false < 0) {
            p->first_false = i;
        }
        if (p->first_false >= 0 && p->until_false && ++after > 1000) {
            break;
        }
    }
    atomic_fetch_add(p->done, 1);
    return NULL;
}

void *
posters_start(const DartloopApi *api, int n, int64_t port, int64_t count, int until_false)
{
    poster_group *g = calloc(1, sizeof *g);
    g->n = n;
    atomic_init(&g->done, 0);
    g->th = calloc((size_t)n, sizeof(pthread_t));
    g->p = calloc((size_t)n, sizeof(poster));
    for (int t = 0; t < n; t++) {
        poster *p = &g->p[t];
        p->api = api;
        p->port = port;
        p->t = t;
        p->count = count;
        p->until_false = until_false != 0;
        p->first_false = -1;
        p->done = &g->done;
    }
    for (int t = 0; t < n; t++) {
        start_or_die(&g->th[t], poster_main, &g->p[t]);
    }
    return g;
}

int
posters_done(void *p)
{
    return atomic_load(&((poster_group *)p)->done);
}

/* Joins and frees; out gets (ok, first_false, true_after_false) per thread. */
void
posters_join(void *gp, int64_t *out)
{
    poster_group *g = (poster_group *)gp;
    for (int t = 0; t < g->n; t++) {
        pthread_join(g->th[t], NULL);
        out[3 * t] = g->p[t].ok;
        out[3 * t + 1] = g->p[t].first_false;
        out[3 * t + 2] = g->p[t].true_after_false;
    }
    free(g->th);
    free(g->p);
    free(g);
}
