/*
 * dartloop._speedups: optional C versions of the event loop's hot paths.
 *
 * The pure-Python code in dartloop/_loop.py, _microtasks.py and _isolate.py is the
 * reference implementation; everything here does exactly what the Python
 * method it stands for does, only without a Python frame per event or per
 * microtask.  When this module is missing (not built, or
 * DARTLOOP_NO_EXTENSIONS=1) dartloop runs the pure code.  tests/test_speedups.py
 * runs the same ordering scenarios through both.
 *
 *   drain(loop)              DartEventLoop._run_pending_immediate_callback
 *   EventRunner(loop)        _UVDartLoop._run_event
 *   TimerEvent               _UVDartLoop._run_timer_event and _run_due_timer,
 *                            one per timer (made by the C call_later); timers
 *                            that come due together are queued as one
 *                            TimerBatch, same order (see there)
 *   LoopMethod(kind, ...)    a method descriptor for the accelerated loop
 *                            classes: call_soon / call_soon_threadsafe /
 *                            call_later of the uvloop backend, and the drain;
 *                            and ("drained") for the uvloop backend's protocol
 *                            proxies: dartloop._protocols._drained
 *   schedule_microtask(cb, *args)   dartloop.schedule_microtask
 *   dispatch_native(state, batch, registry)
 *                            dartloop._isolate._dispatch_native (used by the
 *                            accelerated loop classes' isolates)
 *   LoopMethod("send", ...)  dartloop._ports.SendPort.send (which inlines
 *                            _IsolateState.post); SendPort.send is this
 *                            descriptor whenever the module is present
 *   drain_inbox(state)       dartloop._isolate._IsolateState._drain_inbox
 *                            (bound in its place for the accelerated loop
 *                            classes' isolates, see _IsolateState.bind_loop)
 *
 * Keep in sync: if one of the Python methods above changes, change its C
 * counterpart here (tests/test_speedups.py fails until the recorded hash of
 * the Python source is updated, as a reminder).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h> /* PyMemberDef, PyMember_GetOne (3.11) */

#include <stddef.h>

#if PY_VERSION_HEX < 0x030B0000
#error "dartloop._speedups needs Python 3.11 or newer"
#endif

/* ----------------------------------------------------------------------- */
/* Module-wide state (looked up once at import).                           */

static PyTypeObject *deque_type;     /* collections.deque */
static PyObject *deque_popleft;      /* collections.deque.popleft (unbound) */
static PyObject *deque_append;       /* collections.deque.append (unbound) */
static int deque_size_ok;            /* Py_SIZE(deque) is its length */
static PyObject *get_running_loop;   /* asyncio.events._get_running_loop */
static PyObject *kwnames_context;    /* ("context",) */

static PyObject *str_target, *str_proxy_loop;
static PyObject *str_context, *str_run, *str_microtasks, *str_neutral_ctx,
    *str_report_callback_error, *str_report_uncaught, *str_get_debug,
    *str_message, *str_exception, *str_isolate, *str_serve_control,
    *str_check_idle, *str_timer_handles, *str_discard, *str_add,
    *str_popleft, *str_run_pending, *str_mt_append, *str_runner,
    *str_keep_unwinding, *str_exc_in_microtask, *str_loop, *str_relay_port,
    *str_relay_box, *str_oob, *str_resume_caps, *str_held, *str_hold_message,
    *str_pop, *str_isolate_attr, *str_handler, *str_core, *str_closed,
    *str_thread_id, *str_deliver, *str_relay, *str_inbox, *str_inbox_scheduled,
    *str_call_soon_threadsafe, *str_drain_inbox, *str_extend, *str_inbox_drain, *str_getattribute;

/* Lazily imported from dartloop (which imports this module first). */
static PyObject *format_callback; /* dartloop._loop._format_callback */
static PyObject *no_loop;         /* dartloop._microtasks._no_loop */
static PyObject *atomic_types;    /* dartloop._message._ATOMIC */
static PyObject *prepare_message; /* dartloop._message.prepare_message */

static PyObject *
lazy_attr(PyObject **slot, const char *module, const char *name)
{
    if (*slot == NULL) {
        PyObject *mod = PyImport_ImportModule(module);
        if (mod == NULL) {
            return NULL;
        }
        *slot = PyObject_GetAttrString(mod, name);
        Py_DECREF(mod);
    }
    return *slot;
}

/* ----------------------------------------------------------------------- */
/* Helpers                                                                 */

/* The exception being raised, normalized, with its traceback; clears it. */
static PyObject *
fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* `except (SystemExit, KeyboardInterrupt): raise` */
static int
must_propagate(void)
{
    return PyErr_ExceptionMatches(PyExc_SystemExit) ||
           PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
}

/* Truth value, with the cases met on every event first. */
static inline int
is_true(PyObject *o)
{
    if (o == NULL || o == Py_False || o == Py_None) {
        return 0;
    }
    if (o == Py_True) {
        return 1;
    }
    if (deque_size_ok && Py_IS_TYPE(o, deque_type)) {
        return Py_SIZE(o) != 0;
    }
    return PyObject_IsTrue(o);
}

/* loop._report_callback_error(exc, callback, cbargs), run with `exc` as the
 * exception being handled (as inside `except ... as exc`); 0 or -1. */
static int
report_callback_error(PyObject *loop, PyObject *exc, PyObject *callback, PyObject *cbargs)
{
    PyObject *handled = PyErr_GetHandledException();
    PyErr_SetHandledException(exc);
    PyObject *res = PyObject_CallMethodObjArgs(loop, str_report_callback_error, exc, callback, cbargs, NULL);
    PyErr_SetHandledException(handled);
    Py_XDECREF(handled);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* ----------------------------------------------------------------------- */
/* The drain: DartEventLoop._run_pending_immediate_callback                */

/* Report an exception that escaped a microtask, as the Python drain does:
 *   self._report_uncaught(exc, {"message": "Exception in microtask "
 *       + _format_callback(callback, args, self.get_debug()), "exception": exc})
 * run with `exc` as the exception being handled (as inside `except ... as exc`),
 * so an exception raised while reporting gets it as __context__. */
static int
report_microtask_error(PyObject *loop, PyObject *exc, PyObject *callback, PyObject *args)
{
    int rc = -1;
    PyObject *report = NULL, *debug = NULL, *text = NULL, *msg = NULL, *context = NULL, *res;
    PyObject *handled = PyErr_GetHandledException();
    PyErr_SetHandledException(exc);

    report = PyObject_GetAttr(loop, str_report_uncaught);
    if (report == NULL) {
        goto done;
    }
    if (lazy_attr(&format_callback, "dartloop._loop", "_format_callback") == NULL) {
        goto done;
    }
    debug = PyObject_CallMethodNoArgs(loop, str_get_debug);
    if (debug == NULL) {
        goto done;
    }
    text = PyObject_CallFunctionObjArgs(format_callback, callback, args, debug, NULL);
    if (text == NULL) {
        goto done;
    }
    msg = PyNumber_Add(str_exc_in_microtask, text);
    if (msg == NULL) {
        goto done;
    }
    context = PyDict_New();
    if (context == NULL || PyDict_SetItem(context, str_message, msg) < 0 ||
        PyDict_SetItem(context, str_exception, exc) < 0) {
        goto done;
    }
    res = PyObject_CallFunctionObjArgs(report, exc, context, NULL);
    if (res != NULL) {
        Py_DECREF(res);
        rc = 0;
    }
done:
    PyErr_SetHandledException(handled);
    Py_XDECREF(handled);
    Py_XDECREF(report);
    Py_XDECREF(debug);
    Py_XDECREF(text);
    Py_XDECREF(msg);
    Py_XDECREF(context);
    return rc;
}

/* `callback, args = item`: borrowed references into a new `*owner`. */
static int
unpack_pair(PyObject *item, PyObject **owner, PyObject **callback, PyObject **args)
{
    if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2) {
        *owner = Py_NewRef(item);
    }
    else {
        /* Rare: whatever Python's unpacking accepts (any iterable of two). */
        PyObject *t = PySequence_Tuple(item);
        if (t == NULL) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Format(PyExc_TypeError, "cannot unpack non-iterable %.200s object",
                             Py_TYPE(item)->tp_name);
            }
            return -1;
        }
        if (PyTuple_GET_SIZE(t) != 2) {
            if (PyTuple_GET_SIZE(t) > 2) {
                PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 2)");
            }
            else {
                PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 2, got %zd)",
                             PyTuple_GET_SIZE(t));
            }
            Py_DECREF(t);
            return -1;
        }
        *owner = t;
    }
    *callback = PyTuple_GET_ITEM(*owner, 0);
    *args = PyTuple_GET_ITEM(*owner, 1);
    return 0;
}

/* `callback(*args)` */
static PyObject *
call_star(PyObject *callback, PyObject *args)
{
    if (PyTuple_CheckExact(args)) {
        return PyObject_Vectorcall(callback, &PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args), NULL);
    }
    PyObject *t = PySequence_Tuple(args);
    if (t == NULL) {
        return NULL;
    }
    PyObject *res = PyObject_Call(callback, t, NULL);
    Py_DECREF(t);
    return res;
}

static PyObject *
queue_popleft(PyObject *q)
{
    if (Py_IS_TYPE(q, deque_type)) {
        return PyObject_Vectorcall(deque_popleft, &q, 1, NULL);
    }
    return PyObject_CallMethodNoArgs(q, str_popleft);
}

/* Run every queued microtask, including ones queued meanwhile (FIFO).  An
 * exception escaping a microtask is reported and the drain carries on;
 * SystemExit and KeyboardInterrupt propagate and leave the rest queued. */
static int
drain_queue(PyObject *loop, PyObject *q)
{
    for (;;) {
        int more = is_true(q);
        if (more <= 0) {
            return more;
        }
        PyObject *item = queue_popleft(q);
        if (item == NULL) {
            return -1;
        }
        PyObject *pair, *callback, *args;
        int rc = unpack_pair(item, &pair, &callback, &args);
        Py_DECREF(item);
        if (rc < 0) {
            return -1;
        }
        PyObject *res = call_star(callback, args);
        if (res != NULL) {
            Py_DECREF(res);
        }
        else {
            if (must_propagate()) {
                Py_DECREF(pair);
                return -1;
            }
            PyObject *exc = fetch_exception();
            rc = report_microtask_error(loop, exc, callback, args);
            Py_XDECREF(exc);
            if (rc < 0) {
                Py_DECREF(pair);
                return -1;
            }
        }
        Py_DECREF(pair);
        /* The Python loop checks for signals at every turn of `while q`. */
        if (PyErr_CheckSignals() < 0) {
            return -1;
        }
    }
}

static int
drain_loop(PyObject *loop)
{
    PyObject *q = PyObject_GetAttr(loop, str_microtasks);
    if (q == NULL) {
        return -1;
    }
    int rc = drain_queue(loop, q);
    Py_DECREF(q);
    return rc;
}

PyDoc_STRVAR(drain_doc,
"drain(loop)\n--\n\n"
"Run loop's queued microtasks to the end, like\n"
"DartEventLoop._run_pending_immediate_callback.");

static PyObject *
speedups_drain(PyObject *module, PyObject *loop)
{
    if (drain_loop(loop) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------- */
/* EventRunner: _UVDartLoop._run_event (and _run_timer_event)              */

typedef struct EventRunner {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *loop;
    PyObject *microtasks;   /* loop._microtasks (fixed for the loop's life) */
    PyObject *neutral;      /* loop._neutral_ctx */
    /* Loop attributes read on every event, kept here by properties of the
     * accelerated loop class (_dart_debug, _dart_oob, _dart_watch_idle,
     * _dart_events). */
    PyObject *debug;
    PyObject *oob;
    PyObject *watch_idle;
    PyObject *unwinding;
    /* The timer batch queued last (a TimerBatch, see there) while due timers
     * may still join it, else NULL. */
    PyObject *batch;
    Py_ssize_t events;
    int c_drain;            /* the loop class drains with LoopMethod "drain" */
    int bound;
} EventRunner;

/* Anything else may have been appended to uvloop's ready queue behind the
 * open timer batch: due timers must not join it any more. */
static inline void
runner_close_batch(EventRunner *self)
{
    Py_CLEAR(self->batch);
}

#define SMALL_STACK 12

static void restore_exception(PyObject *exc);

static PyTypeObject EventRunner_Type;
static PyTypeObject LoopMethod_Type;
static int load_timer_handle_type(void);

/* The runner of the loop that scheduled last, so that call_soon finds it
 * without a dict lookup. Borrowed: a runner clears it when it goes away, and
 * a runner holds its loop, so `last_runner->loop == loop` can't be a stale
 * match. Protected by the GIL (no cache on free-threaded builds). */
static EventRunner *last_runner;

static PyObject *runner_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames);

static EventRunner *
runner_alloc(PyObject *loop)
{
    EventRunner *self = PyObject_GC_New(EventRunner, &EventRunner_Type);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = runner_vectorcall;
    self->loop = Py_NewRef(loop);
    self->microtasks = NULL;
    self->neutral = NULL;
    self->debug = Py_NewRef(Py_False);
    self->oob = NULL;
    self->watch_idle = Py_NewRef(Py_False);
    self->unwinding = Py_NewRef(Py_False);
    self->batch = NULL;
    self->events = 0;
    self->c_drain = 0;
    self->bound = 0;
    PyObject_GC_Track(self);
    return self;
}

static PyObject *
runner_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *loop;
    static char *kwlist[] = {"loop", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:EventRunner", kwlist, &loop)) {
        return NULL;
    }
    return (PyObject *)runner_alloc(loop);
}

static int
runner_traverse(EventRunner *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->microtasks);
    Py_VISIT(self->neutral);
    Py_VISIT(self->debug);
    Py_VISIT(self->oob);
    Py_VISIT(self->watch_idle);
    Py_VISIT(self->unwinding);
    Py_VISIT(self->batch);
    return 0;
}

static int
runner_clear(EventRunner *self)
{
    if (last_runner == self) {
        last_runner = NULL;
    }
    self->bound = 0;
    Py_CLEAR(self->loop);
    Py_CLEAR(self->microtasks);
    Py_CLEAR(self->neutral);
    Py_CLEAR(self->debug);
    Py_CLEAR(self->oob);
    Py_CLEAR(self->watch_idle);
    Py_CLEAR(self->unwinding);
    Py_CLEAR(self->batch);
    return 0;
}

static void
runner_dealloc(EventRunner *self)
{
    PyObject_GC_UnTrack(self);
    runner_clear(self);
    PyObject_GC_Del(self);
}

/* self._dart_keep_while_unwinding(callback, args): 1 keep, 0 drop, -1 error. */
static int
keep_while_unwinding(PyObject *loop, PyObject *callback, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *cbargs = PyTuple_New(nargs);
    if (cbargs == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(cbargs, i, Py_NewRef(args[i]));
    }
    PyObject *keep = PyObject_CallMethodObjArgs(loop, str_keep_unwinding, callback, cbargs, NULL);
    Py_DECREF(cbargs);
    if (keep == NULL) {
        return -1;
    }
    int u = PyObject_IsTrue(keep);
    Py_DECREF(keep);
    return u;
}

/* What comes before an event's callback, cb = (callback, *args): the
 * runner must be bound; what the event queues goes behind the open timer
 * batch; `if self._dart_unwinding and not self._dart_keep_while_unwinding(
 * callback, args): return`; the event is counted. 1 run it, 0 skip it, -1
 * error. */
static int
event_prologue(EventRunner *self, PyObject *const *cb, Py_ssize_t ncb)
{
    if (!self->bound || self->loop == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "dartloop event runner used before bind()");
        return -1;
    }
    runner_close_batch(self);
    int u = is_true(self->unwinding);
    if (u < 0) {
        return -1;
    }
    if (u) {
        u = keep_while_unwinding(self->loop, cb[0], cb + 1, ncb - 1);
        if (u <= 0) {
            return u;
        }
    }
    self->events++;
    return 1;
}

/* The callback's result res (stolen): 0 with *exc the error to report, or
 * NULL; -1 if the error must propagate instead (must_propagate()). */
static inline int
event_outcome(PyObject *res, PyObject **exc)
{
    *exc = NULL;
    if (res != NULL) {
        Py_DECREF(res);
        return 0;
    }
    if (must_propagate()) {
        return -1;
    }
    *exc = fetch_exception();
    return 0;
}

/* What follows an event's callback, outside its context: report `exc` (if
 * not NULL; stolen) as _report_callback_error, drain, serve the control
 * queue, check for quiet.  cb = (callback, *args).  0 or -1. */
static int event_epilogue(EventRunner *self, PyObject *loop, PyObject *exc, PyObject *const *cb, Py_ssize_t ncb);

/* One event: `ctx.run(callback, *args)`, then the drain, then the isolate's
 * control queue and idle check.  args = (ctx, callback, *args).  (The Python
 * method deletes its locals before the drain so that a traceback can't keep
 * the callback alive; there is no frame here to do that.) */
static PyObject *
run_event(EventRunner *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *loop = self->loop, *res;
    if (nargs < 2) {
        PyErr_SetString(PyExc_TypeError, "_run_event() needs a context and a callback");
        return NULL;
    }
    PyObject *ctx = args[0], *callback = args[1];
    int run = event_prologue(self, args + 1, nargs - 1);
    if (run <= 0) {
        return run < 0 ? NULL : Py_NewRef(Py_None);
    }
    Py_INCREF(loop); /* the callback may close and drop everything */
    if (PyContext_CheckExact(ctx)) {
        if (PyContext_Enter(ctx) < 0) {
            res = NULL;
        }
        else {
            res = PyObject_Vectorcall(callback, args + 2, nargs - 2, NULL);
            if (PyContext_Exit(ctx) < 0) {
                Py_CLEAR(res);
            }
        }
    }
    else {
        /* args is (ctx, callback, *args): ctx.run(callback, *args) */
        res = PyObject_VectorcallMethod(str_run, args, nargs, NULL);
    }
    PyObject *exc;
    if (event_outcome(res, &exc) < 0) {
        Py_DECREF(loop);
        return NULL;
    }
    int rc = event_epilogue(self, loop, exc, args + 1, nargs - 1);
    Py_DECREF(loop);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
event_epilogue(EventRunner *self, PyObject *loop, PyObject *exc, PyObject *const *cb, Py_ssize_t ncb)
{
    PyObject *res;
    if (exc != NULL) {
        PyObject *cbargs = PyTuple_New(ncb - 1);
        if (cbargs == NULL) {
            Py_DECREF(exc);
            return -1;
        }
        for (Py_ssize_t i = 1; i < ncb; i++) {
            PyTuple_SET_ITEM(cbargs, i - 1, Py_NewRef(cb[i]));
        }
        int rc = report_callback_error(loop, exc, cb[0], cbargs);
        Py_DECREF(cbargs);
        Py_DECREF(exc);
        if (rc < 0) {
            return -1;
        }
    }
    /* if self._microtasks: self._run_pending_immediate_callback() */
    int t = is_true(self->microtasks);
    if (t < 0) {
        return -1;
    }
    if (t) {
        if (self->c_drain) {
            if (drain_queue(loop, self->microtasks) < 0) {
                return -1;
            }
        }
        else {
            res = PyObject_CallMethodNoArgs(loop, str_run_pending);
            if (res == NULL) {
                return -1;
            }
            Py_DECREF(res);
        }
    }
    /* if self._dart_oob: self._isolate.serve_control() */
    t = is_true(self->oob);
    if (t < 0) {
        return -1;
    }
    if (t) {
        PyObject *iso = PyObject_GetAttr(loop, str_isolate);
        if (iso == NULL) {
            return -1;
        }
        res = PyObject_CallMethodNoArgs(iso, str_serve_control);
        Py_DECREF(iso);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    /* if self._dart_watch_idle: self._dart_check_idle() */
    t = is_true(self->watch_idle);
    if (t < 0) {
        return -1;
    }
    if (t) {
        res = PyObject_CallMethodNoArgs(loop, str_check_idle);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    return 0;
}

/* The direct form, runner(callback, *args): uvloop has already entered the
 * event's context (registered with context=ctx), so the callback is called
 * as it is; what comes after it must run outside that context, as in the
 * ctx form (the drain may enter the same context for a microtask), so the
 * runner leaves it for the neutral context and enters it again before
 * returning to uvloop, which exits it. An event with nothing to do after
 * its callback (no error, no microtask, no control message, no idle watch)
 * never leaves it. */
static PyObject *
run_event_direct(EventRunner *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *loop = self->loop, *res;
    PyObject *callback = args[0];
    int run = event_prologue(self, args, nargs);
    if (run <= 0) {
        return run < 0 ? NULL : Py_NewRef(Py_None);
    }
    Py_INCREF(loop); /* the callback may close and drop everything */
    res = PyObject_Vectorcall(callback, args + 1, nargs - 1, NULL);
    PyObject *exc;
    if (event_outcome(res, &exc) < 0) {
        Py_DECREF(loop);
        return NULL;
    }
    if (exc == NULL && !is_true(self->microtasks) && !is_true(self->oob) && !is_true(self->watch_idle)) {
        Py_DECREF(loop);
        Py_RETURN_NONE;
    }
    /* Leave the event's context for the neutral one, and come back. */
    PyObject *ctx = PyThreadState_Get()->context;
    int left = ctx != NULL && PyContext_CheckExact(ctx);
    if (left) {
        Py_INCREF(ctx);
        if (PyContext_Exit(ctx) < 0) {
            /* not entered: called from elsewhere than uvloop's handle */
            PyErr_Clear();
            Py_CLEAR(ctx);
            left = 0;
        }
    }
    int rc = PyContext_Enter(self->neutral);
    if (rc == 0) {
        rc = event_epilogue(self, loop, exc, args, nargs);
        exc = NULL;
        if (PyContext_Exit(self->neutral) < 0) {
            rc = -1;
        }
    }
    Py_XDECREF(exc);
    if (left) {
        PyObject *err = PyErr_Occurred() ? fetch_exception() : NULL;
        if (PyContext_Enter(ctx) < 0) {
            Py_XDECREF(err);
            rc = -1;
        }
        else if (err != NULL) {
            restore_exception(err);
        }
        Py_DECREF(ctx);
    }
    Py_DECREF(loop);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* runner(ctx, callback, *args) or runner(callback, *args): a Context first
 * is the ctx form (the pure _run_event), anything else the direct form. */
static inline PyObject *
runner_dispatch(EventRunner *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs >= 1 && !PyContext_CheckExact(args[0])) {
        return run_event_direct(self, args, nargs);
    }
    return run_event(self, args, nargs);
}

static PyObject *
runner_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_Format(PyExc_TypeError, "_run_event() got an unexpected keyword argument '%U'",
                     PyTuple_GET_ITEM(kwnames, 0));
        return NULL;
    }
    return runner_dispatch((EventRunner *)self, args, PyVectorcall_NARGS(nargsf));
}

/* uvloop calls its callbacks with an args tuple (tp_call): take its items as
 * they are instead of going through PyVectorcall_Call. */
static PyObject *
runner_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "_run_event() takes no keyword arguments");
        return NULL;
    }
    return runner_dispatch((EventRunner *)self, &PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args));
}

PyDoc_STRVAR(runner_bind_doc,
"bind()\n--\n\n"
"Read the loop's microtask queue and neutral context; call once, after the\n"
"loop's __init__ set them, before the runner is handed to uvloop.");

static PyObject *
runner_bind(EventRunner *self, PyObject *unused)
{
    if (self->loop == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the runner has no loop");
        return NULL;
    }
    PyObject *q = PyObject_GetAttr(self->loop, str_microtasks);
    if (q == NULL) {
        return NULL;
    }
    PyObject *neutral = PyObject_GetAttr(self->loop, str_neutral_ctx);
    if (neutral == NULL) {
        Py_DECREF(q);
        return NULL;
    }
    Py_XSETREF(self->microtasks, q);
    Py_XSETREF(self->neutral, neutral);
    /* Drain in C only if the loop's class drains with our LoopMethod; an
     * override in Python is called instead. */
    PyObject *drain = PyObject_GetAttr((PyObject *)Py_TYPE(self->loop), str_run_pending);
    if (drain == NULL) {
        return NULL;
    }
    self->c_drain = Py_IS_TYPE(drain, &LoopMethod_Type);
    Py_DECREF(drain);
    if (load_timer_handle_type() < 0) {
        /* an unknown uvloop: every timer is queued on its own */
        PyErr_Clear();
    }
    self->bound = 1;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runner_release_doc,
"release()\n--\n\n"
"Forget the loop (called when it closes, so that nothing here keeps a\n"
"closed loop alive); the runner then refuses to run events.");

static PyObject *
runner_release(EventRunner *self, PyObject *unused)
{
    if (last_runner == self) {
        last_runner = NULL;
    }
    self->bound = 0;
    Py_CLEAR(self->batch);
    Py_CLEAR(self->loop);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runner_close_batch_doc,
"close_batch()\n--\n\n"
"Due timers must not join the timer batch queued last any more (something\n"
"else may have been queued behind it).");

static PyObject *
runner_close_batch_meth(EventRunner *self, PyObject *unused)
{
    runner_close_batch(self);
    Py_RETURN_NONE;
}

static PyObject *
runner_repr(EventRunner *self)
{
    return PyUnicode_FromFormat("<dartloop event runner of %R>", self->loop ? self->loop : Py_None);
}

static PyObject *
runner_get_events(EventRunner *self, void *c)
{
    return PyLong_FromSsize_t(self->events);
}

static int
runner_set_events(EventRunner *self, PyObject *value, void *c)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "can't delete the event count");
        return -1;
    }
    Py_ssize_t v = PyNumber_AsSsize_t(value, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    self->events = v;
    return 0;
}

#define OBJECT_FIELD(name)                                                   \
    static PyObject *runner_get_##name(EventRunner *self, void *c)          \
    {                                                                        \
        if (self->name == NULL) {                                            \
            PyErr_SetString(PyExc_AttributeError, #name);                    \
            return NULL;                                                     \
        }                                                                    \
        return Py_NewRef(self->name);                                        \
    }                                                                        \
    static int runner_set_##name(EventRunner *self, PyObject *value, void *c) \
    {                                                                        \
        Py_XSETREF(self->name, Py_XNewRef(value));                           \
        return 0;                                                            \
    }

OBJECT_FIELD(debug)
OBJECT_FIELD(oob)
OBJECT_FIELD(watch_idle)
OBJECT_FIELD(unwinding)

static PyObject *
runner_get_loop(EventRunner *self, void *c)
{
    return Py_NewRef(self->loop ? self->loop : Py_None);
}

static PyGetSetDef runner_getset[] = {
    {"events", (getter)runner_get_events, (setter)runner_set_events, "events run (loop._dart_events)", NULL},
    {"debug", (getter)runner_get_debug, (setter)runner_set_debug, "loop._dart_debug", NULL},
    {"oob", (getter)runner_get_oob, (setter)runner_set_oob, "loop._dart_oob", NULL},
    {"watch_idle", (getter)runner_get_watch_idle, (setter)runner_set_watch_idle, "loop._dart_watch_idle", NULL},
    {"unwinding", (getter)runner_get_unwinding, (setter)runner_set_unwinding, "loop._dart_unwinding", NULL},
    {"loop", (getter)runner_get_loop, NULL, "the loop", NULL},
    {NULL},
};

static PyMethodDef runner_methods[] = {
    {"bind", (PyCFunction)runner_bind, METH_NOARGS, runner_bind_doc},
    {"release", (PyCFunction)runner_release, METH_NOARGS, runner_release_doc},
    {"close_batch", (PyCFunction)runner_close_batch_meth, METH_NOARGS, runner_close_batch_doc},
    {NULL},
};

PyDoc_STRVAR(runner_doc,
"EventRunner(loop)\n--\n\n"
"The uvloop backend's per-event wrapper: runner(ctx, callback, *args) is\n"
"_UVDartLoop._run_event; runner(callback, *args) is the same for an event\n"
"whose context uvloop has entered (the drain runs in the neutral context).");

static PyTypeObject EventRunner_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dartloop._speedups.EventRunner",
    .tp_basicsize = sizeof(EventRunner),
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_vectorcall_offset = offsetof(EventRunner, vectorcall),
    .tp_repr = (reprfunc)runner_repr,
    .tp_call = runner_call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = runner_doc,
    .tp_traverse = (traverseproc)runner_traverse,
    .tp_clear = (inquiry)runner_clear,
    .tp_methods = runner_methods,
    .tp_getset = runner_getset,
    .tp_new = runner_new,
};

/* ----------------------------------------------------------------------- */
/* TimerEvent: _UVDartLoop._run_timer_event, bound to one timer            */

/* The Python call_later registers `_run_timer_event(token, ctx, callback,
 * *args)` with a one-item list `token` that receives the handle; the C
 * call_later registers one of these instead (one object per timer instead
 * of an args tuple and a token list), which does the same when it fires.
 * First call (the timer is due): queue itself at the back of the ready queue,
 *     uvloop.Loop.call_soon(loop, self, context=neutral)
 * second call (its turn, _run_due_timer):
 *     self._dart_timer_handles.discard(handle)
 *     if not handle.cancelled(): self._run_event(ctx, callback, *args)
 *
 * Timer batches.  Due timers that libuv runs one after the other in its
 * timer phase would each be queued at the back of the ready queue, one
 * behind the other.  Instead, the first one queues a TimerBatch, and the
 * ones that come due after it in the same phase join that batch, which then
 * runs each one's second call in order, as their own queue entries would
 * have.  That is the same order as long as nothing else was queued behind
 * the batch meanwhile, so the runner forgets the batch ("closes" it) at
 * every other call_soon / call_soon_threadsafe / call_later of the loop, at
 * every event, when the batch starts to run, at run_forever() and when a
 * Python-level timer comes due (runner_close_batch, close_batch()).  uvloop
 * queues callbacks of its own (a transport's connection_made, ...) only
 * from I/O callbacks, from code run by events, or between two runs, never
 * between two timers of one timer phase: what is queued there has run by
 * the time libuv's next timer phase (or next run) comes.  A zero-delay
 * call_later is a ready callback in uvloop, not a timer: its first call is
 * made from the ready queue, where code can run between two of them, so it
 * is queued on its own, as before, and closes the batch. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    EventRunner *runner;
    PyObject *handle; /* set as soon as uvloop returned it */
    PyObject *ctx;
    PyObject *callback;
    PyObject *args; /* tuple */
    int due;        /* called once: queued as a ready event */
    int ready;      /* uvloop made it a ready callback (zero delay), not a timer */
} TimerEvent;

/* The due timers of one batch, queued as one ready callback. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    EventRunner *runner;
    PyObject *events; /* list of TimerEvent, NULL once it ran */
} TimerBatch;

static PyTypeObject TimerEvent_Type, TimerBatch_Type;
static PyObject *timer_batch_vectorcall(PyObject *op, PyObject *const *a, size_t nargsf, PyObject *kwnames);

static PyObject *uv_call_soon;         /* uvloop.Loop.call_soon, lazily */
static PyTypeObject *uv_timer_handle;  /* uvloop.loop.TimerHandle, lazily */
static PyObject *uv_timer_cancelled;   /* uvloop.loop.TimerHandle.cancelled */

/* loop._dart_timer_handles.add(handle) (add) or .discard(handle); 0 or -1. */
static int
timer_handles_update(PyObject *loop, PyObject *handle, int add)
{
    PyObject *handles = PyObject_GetAttr(loop, str_timer_handles);
    if (handles == NULL) {
        return -1;
    }
    int rc;
    if (PySet_CheckExact(handles)) {
        rc = add ? PySet_Add(handles, handle) : PySet_Discard(handles, handle);
    }
    else {
        PyObject *r = PyObject_CallMethodOneArg(handles, add ? str_add : str_discard, handle);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    Py_DECREF(handles);
    return rc < 0 ? -1 : 0;
}
static PyObject *str_call_soon, *str_cancelled;

/* uvloop.Loop.call_soon(loop, callback, context=neutral); 0 or -1. */
static int
uv_queue(EventRunner *runner, PyObject *callback)
{
    if (uv_call_soon == NULL) {
        PyObject *loop_type = NULL;
        if (lazy_attr(&loop_type, "uvloop", "Loop") == NULL) {
            return -1;
        }
        uv_call_soon = PyObject_GetAttr(loop_type, str_call_soon);
        Py_DECREF(loop_type);
        if (uv_call_soon == NULL) {
            return -1;
        }
    }
    PyObject *stack[3] = {runner->loop, callback, runner->neutral};
    PyObject *h = PyObject_Vectorcall(uv_call_soon, stack, 2, kwnames_context);
    if (h == NULL) {
        return -1;
    }
    Py_DECREF(h);
    return 0;
}

/* uvloop.loop.TimerHandle and its cancelled(), looked up once; 0 or -1. */
static int
load_timer_handle_type(void)
{
    if (uv_timer_handle != NULL) {
        return 0;
    }
    PyObject *t = NULL;
    if (lazy_attr(&t, "uvloop.loop", "TimerHandle") == NULL) {
        return -1;
    }
    if (!PyType_Check(t)) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_TypeError, "uvloop.loop.TimerHandle is not a type");
        return -1;
    }
    PyObject *c = PyObject_GetAttr(t, str_cancelled);
    if (c == NULL) {
        Py_DECREF(t);
        return -1;
    }
    uv_timer_cancelled = c;
    uv_timer_handle = (PyTypeObject *)t;
    return 0;
}

/* The second call: its turn in the ready queue (_run_due_timer). */
static PyObject *
timer_event_run_due(TimerEvent *self)
{
    EventRunner *runner = self->runner;
    PyObject *handle = self->handle ? self->handle : Py_None;
    int watching = is_true(runner->watch_idle);
    if (watching < 0) {
        return NULL;
    }
    if (watching && timer_handles_update(runner->loop, handle, 0) < 0) {
        return NULL;
    }
    if (handle != Py_None) {
        /* cancelled after it came due, before its turn (as in asyncio) */
        PyObject *c = (uv_timer_cancelled != NULL && Py_IS_TYPE(handle, uv_timer_handle))
                          ? PyObject_Vectorcall(uv_timer_cancelled, &handle, 1, NULL)
                          : PyObject_CallMethodNoArgs(handle, str_cancelled);
        if (c == NULL) {
            return NULL;
        }
        int cancelled = c == Py_False ? 0 : c == Py_True ? 1 : PyObject_IsTrue(c);
        Py_DECREF(c);
        if (cancelled) {
            return cancelled < 0 ? NULL : Py_NewRef(Py_None);
        }
    }
    Py_ssize_t nargs = PyTuple_GET_SIZE(self->args);
    PyObject *small[SMALL_STACK];
    PyObject **stack = small;
    if (nargs + 2 > SMALL_STACK) {
        stack = PyMem_Malloc((nargs + 2) * sizeof(PyObject *));
        if (stack == NULL) {
            return PyErr_NoMemory();
        }
    }
    stack[0] = self->ctx;
    stack[1] = self->callback;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        stack[i + 2] = PyTuple_GET_ITEM(self->args, i);
    }
    PyObject *res = run_event(runner, stack, nargs + 2);
    if (stack != small) {
        PyMem_Free(stack);
    }
    return res;
}

/* A new batch of `events` (a list of TimerEvent; stolen). */
static TimerBatch *
timer_batch_new(EventRunner *runner, PyObject *events)
{
    TimerBatch *b = PyObject_GC_New(TimerBatch, &TimerBatch_Type);
    if (b == NULL) {
        Py_DECREF(events);
        return NULL;
    }
    b->vectorcall = timer_batch_vectorcall;
    b->runner = (EventRunner *)Py_NewRef((PyObject *)runner);
    b->events = events;
    PyObject_GC_Track(b);
    return b;
}

/* The event can run: it still has its loop and context; 0, or -1 with
 * RuntimeError. */
static int
timer_event_check(TimerEvent *self)
{
    if (self->runner == NULL || self->runner->loop == NULL || self->ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "dartloop timer event used without its loop");
        return -1;
    }
    return 0;
}

/* The first call, from a libuv timer: join the open batch or queue a new
 * one; 0 or -1. */
static int
timer_event_join(TimerEvent *self)
{
    EventRunner *runner = self->runner;
#ifndef Py_GIL_DISABLED
    TimerBatch *open = (TimerBatch *)runner->batch;
    if (open != NULL && open->events != NULL) {
        return PyList_Append(open->events, (PyObject *)self);
    }
#endif
    PyObject *events = PyList_New(1);
    if (events == NULL) {
        return -1;
    }
    PyList_SET_ITEM(events, 0, Py_NewRef((PyObject *)self));
    TimerBatch *b = timer_batch_new(runner, events);
    if (b == NULL) {
        return -1;
    }
    int rc = uv_queue(runner, (PyObject *)b);
#ifndef Py_GIL_DISABLED
    if (rc == 0) {
        Py_XSETREF(runner->batch, Py_NewRef((PyObject *)b));
    }
#endif
    Py_DECREF(b);
    return rc;
}

static PyObject *
timer_event_vectorcall(PyObject *op, PyObject *const *a, size_t nargsf, PyObject *kwnames)
{
    TimerEvent *self = (TimerEvent *)op;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "a dartloop timer event takes no arguments");
        return NULL;
    }
    if (timer_event_check(self) < 0) {
        return NULL;
    }
    EventRunner *runner = self->runner;
    Py_INCREF(self);
    Py_INCREF(runner);
    PyObject *res = NULL;
    if (!self->due) {
        self->due = 1;
        int rc;
        if (self->ready) {
            /* zero delay: queued on its own (see above) */
            runner_close_batch(runner);
            rc = uv_queue(runner, op);
        }
        else {
            rc = timer_event_join(self);
        }
        res = rc < 0 ? NULL : Py_NewRef(Py_None);
    }
    else {
        res = timer_event_run_due(self);
    }
    Py_DECREF(runner);
    Py_DECREF(self);
    return res;
}

static int
timer_event_traverse(TimerEvent *self, visitproc visit, void *arg)
{
    Py_VISIT((PyObject *)self->runner);
    Py_VISIT(self->handle);
    Py_VISIT(self->ctx);
    Py_VISIT(self->callback);
    Py_VISIT(self->args);
    return 0;
}

static int
timer_event_clear(TimerEvent *self)
{
    Py_CLEAR(self->runner);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->callback);
    Py_CLEAR(self->args);
    return 0;
}

static void
timer_event_dealloc(TimerEvent *self)
{
    PyObject_GC_UnTrack(self);
    timer_event_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *
timer_event_repr(TimerEvent *self)
{
    return PyUnicode_FromFormat("<dartloop timer event %R%R>", self->callback ? self->callback : Py_None,
                                self->args ? self->args : Py_None);
}

static PyTypeObject TimerEvent_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dartloop._speedups.TimerEvent",
    .tp_basicsize = sizeof(TimerEvent),
    .tp_dealloc = (destructor)timer_event_dealloc,
    .tp_vectorcall_offset = offsetof(TimerEvent, vectorcall),
    .tp_repr = (reprfunc)timer_event_repr,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "One timer's event on the uvloop backend (made by the C call_later).",
    .tp_traverse = (traverseproc)timer_event_traverse,
    .tp_clear = (inquiry)timer_event_clear,
};

/* A batch's turn: each timer's second call, in the order they came due.
 * If one raises (SystemExit, KeyboardInterrupt: the rest is reported), the
 * timers after it are queued as a batch of their own, at the back, and the
 * exception propagates as it would have out of that timer's own entry. */
static PyObject *
timer_batch_vectorcall(PyObject *op, PyObject *const *a, size_t nargsf, PyObject *kwnames)
{
    TimerBatch *self = (TimerBatch *)op;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "a dartloop timer batch takes no arguments");
        return NULL;
    }
    EventRunner *runner = self->runner;
    PyObject *events = self->events;
    if (runner == NULL || events == NULL) {
        Py_RETURN_NONE; /* ran already */
    }
    Py_INCREF(self);
    Py_INCREF(runner);
    if (runner->batch == op) {
        runner_close_batch(runner); /* it runs: nothing joins it any more */
    }
    self->events = NULL;
    PyObject *res = Py_None;
    Py_ssize_t n = PyList_GET_SIZE(events), i;
    for (i = 0; i < n; i++) {
        TimerEvent *ev = (TimerEvent *)PyList_GET_ITEM(events, i);
        Py_INCREF(ev);
        PyObject *r = timer_event_check(ev) < 0 ? NULL : timer_event_run_due(ev);
        Py_DECREF(ev);
        if (r == NULL) {
            res = NULL;
            break;
        }
        Py_DECREF(r);
    }
    if (res == NULL && i + 1 < n && runner->loop != NULL) {
        /* the rest, queued as a batch of its own (closed: nothing joins it) */
        PyObject *exc = fetch_exception();
        PyObject *rest = PyList_GetSlice(events, i + 1, n);
        TimerBatch *b = rest == NULL ? NULL : timer_batch_new(runner, rest);
        if (b == NULL || uv_queue(runner, (PyObject *)b) < 0) {
            PyErr_WriteUnraisable(op);
        }
        Py_XDECREF(b);
        restore_exception(exc); /* steals */
    }
    Py_DECREF(events);
    Py_DECREF(runner);
    Py_DECREF(self);
    return res == NULL ? NULL : Py_NewRef(Py_None);
}

static int
timer_batch_traverse(TimerBatch *self, visitproc visit, void *arg)
{
    Py_VISIT((PyObject *)self->runner);
    Py_VISIT(self->events);
    return 0;
}

static int
timer_batch_clear(TimerBatch *self)
{
    Py_CLEAR(self->runner);
    Py_CLEAR(self->events);
    return 0;
}

static void
timer_batch_dealloc(TimerBatch *self)
{
    PyObject_GC_UnTrack(self);
    timer_batch_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *
timer_batch_repr(TimerBatch *self)
{
    return PyUnicode_FromFormat("<dartloop timer batch %R>", self->events ? self->events : Py_None);
}

static PyTypeObject TimerBatch_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dartloop._speedups.TimerBatch",
    .tp_basicsize = sizeof(TimerBatch),
    .tp_dealloc = (destructor)timer_batch_dealloc,
    .tp_vectorcall_offset = offsetof(TimerBatch, vectorcall),
    .tp_repr = (reprfunc)timer_batch_repr,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Due timers of the uvloop backend run as one ready callback, in order.",
    .tp_traverse = (traverseproc)timer_batch_traverse,
    .tp_clear = (inquiry)timer_batch_clear,
};

static TimerEvent *
timer_event_new(EventRunner *runner, PyObject *ctx, PyObject *callback, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *t = PyTuple_New(nargs);
    if (t == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(t, i, Py_NewRef(args[i]));
    }
    TimerEvent *self = PyObject_GC_New(TimerEvent, &TimerEvent_Type);
    if (self == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    self->vectorcall = timer_event_vectorcall;
    self->runner = (EventRunner *)Py_NewRef((PyObject *)runner);
    self->handle = NULL;
    self->ctx = Py_NewRef(ctx);
    self->callback = Py_NewRef(callback);
    self->args = t;
    self->due = 0;
    self->ready = 1; /* until call_later says it got a timer */
    PyObject_GC_Track(self);
    return self;
}

/* ----------------------------------------------------------------------- */
/* LoopMethod: a method descriptor for the accelerated loop classes        */

enum { K_CALL_SOON, K_CALL_SOON_THREADSAFE, K_CALL_LATER, K_DRAIN, K_DRAINED, K_SEND };

static PyObject *port_send(PyObject *send_port, PyObject *message);

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    PyObject *fallback; /* the pure-Python method (debug mode, odd calls) */
    PyObject *base;     /* uvloop.Loop's method the Python one calls via super() */
    PyObject *name;
    PyObject *qualname;
    PyObject *doc;
} LoopMethod;

static PyObject *
fallback_call(LoopMethod *m, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    return PyObject_Vectorcall(m->fallback, args, nargsf & ~PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
}

/* self._dart_runner, if it is a bound EventRunner of this loop, else NULL
 * (no exception set). */
static EventRunner *
loop_runner(PyObject *loop)
{
#ifndef Py_GIL_DISABLED
    if (last_runner != NULL && last_runner->loop == loop && last_runner->bound) {
        return (EventRunner *)Py_NewRef((PyObject *)last_runner);
    }
#endif
    PyObject *r = PyObject_GetAttr(loop, str_runner);
    if (r == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!Py_IS_TYPE(r, &EventRunner_Type) || ((EventRunner *)r)->loop != loop ||
        !((EventRunner *)r)->bound) {
        Py_DECREF(r);
        return NULL;
    }
#ifndef Py_GIL_DISABLED
    last_runner = (EventRunner *)r;
#endif
    return (EventRunner *)r;
}


/* call_soon / call_soon_threadsafe (lead = 1) and call_later (lead = 2):
 *     super().call_soon(self._dart_run_event, ctx, callback, *args, context=self._neutral_ctx)
 *     token = [None]
 *     handle = super().call_later(delay, self._run_timer_event, token, ctx, callback, *args,
 *                                 context=self._neutral_ctx)
 *     token[0] = handle; self._dart_timer_handles.add(handle); return handle
 * with ctx = context if context is not None else contextvars.copy_context().
 * (The C call_later registers a TimerEvent in place of the method and token.) */
/* The last "context" keyword name that was not str_context itself. */
static PyObject *context_kw_seen;

static PyObject *
loopmethod_schedule(LoopMethod *m, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int timer = m->kind == K_CALL_LATER;
    Py_ssize_t lead = timer ? 2 : 1; /* self (and delay) before the callback */
    PyObject *context = NULL;
    if (nargs < lead + 1) {
        return fallback_call(m, args, nargsf, kwnames);
    }
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, i);
            if (key != str_context && key != context_kw_seen) {
                if (!(PyUnicode_Check(key) && PyUnicode_Compare(key, str_context) == 0)) {
                    return fallback_call(m, args, nargsf, kwnames); /* raises the TypeError */
                }
                /* Python 3.11's C futures name it with a string of their
                 * own, the same object every time: remember it. */
                Py_XSETREF(context_kw_seen, Py_NewRef(key));
            }
            context = args[nargs + i];
        }
    }
    PyObject *loop = args[0];
    EventRunner *runner = loop_runner(loop);
    if (runner == NULL) {
        return fallback_call(m, args, nargsf, kwnames);
    }
    /* Whatever this queues goes behind the open timer batch. */
    runner_close_batch(runner);
    int debug = is_true(runner->debug);
    if (debug != 0) {
        Py_DECREF(runner);
        if (debug < 0) {
            return NULL;
        }
        /* Debug mode checks the callback first: the Python method does it. */
        return fallback_call(m, args, nargsf, kwnames);
    }
    if (context == Py_None) {
        context = NULL;
    }
    PyObject *handle;
    if (!timer && context == NULL && !PyContext_CheckExact(args[1])) {
        /* The direct form, [self, runner, callback, *args]: uvloop makes
         * the copy of the current context and enters it itself, as it does
         * for its own callbacks, which saves entering it a second time and
         * the keyword argument. Only when no context is given, as uvloop's
         * fresh copy can't be entered anywhere else: an explicit one may be
         * entered already when the event runs (the loop run inside it),
         * which uvloop does not survive (its Context_Exit then fails and
         * stops the loop), while the ctx form reports it as the event's
         * error, as asyncio does. A Context as the callback would read as
         * the ctx form. */
        Py_ssize_t n = nargs + 1;
        PyObject *small[SMALL_STACK];
        PyObject **stack = small;
        if (n > SMALL_STACK) {
            stack = PyMem_Malloc(n * sizeof(PyObject *));
            if (stack == NULL) {
                Py_DECREF(runner);
                return PyErr_NoMemory();
            }
        }
        stack[0] = loop;
        stack[1] = (PyObject *)runner;
        for (Py_ssize_t i = 1; i < nargs; i++) {
            stack[i + 1] = args[i];
        }
        handle = PyObject_Vectorcall(m->base, stack, n, NULL);
        if (stack != small) {
            PyMem_Free(stack);
        }
        Py_DECREF(runner);
        return handle;
    }
    PyObject *ctx = context != NULL ? Py_NewRef(context) : PyContext_CopyCurrent();
    if (ctx == NULL) {
        Py_DECREF(runner);
        return NULL;
    }
    if (!timer) {
        /* The ctx form: [self, runner, ctx, callback, *args] + context=neutral */
        Py_ssize_t n = nargs + 2;
        PyObject *small[SMALL_STACK + 1];
        PyObject **stack = small;
        if (n + 1 > SMALL_STACK) {
            stack = PyMem_Malloc((n + 1) * sizeof(PyObject *));
            if (stack == NULL) {
                Py_DECREF(ctx);
                Py_DECREF(runner);
                return PyErr_NoMemory();
            }
        }
        stack[0] = loop;
        stack[1] = (PyObject *)runner;
        stack[2] = ctx;
        for (Py_ssize_t i = 1; i < nargs; i++) {
            stack[i + 2] = args[i];
        }
        stack[n] = runner->neutral;
        handle = PyObject_Vectorcall(m->base, stack, n, kwnames_context);
        if (stack != small) {
            PyMem_Free(stack);
        }
    }
    else {
        TimerEvent *ev = timer_event_new(runner, ctx, args[2], args + 3, nargs - 3);
        if (ev == NULL) {
            Py_DECREF(ctx);
            Py_DECREF(runner);
            return NULL;
        }
        PyObject *stack[4] = {loop, args[1], (PyObject *)ev, runner->neutral};
        handle = PyObject_Vectorcall(m->base, stack, 3, kwnames_context);
        int watching = handle == NULL ? 0 : is_true(runner->watch_idle);
        if (watching < 0) {
            Py_CLEAR(handle);
        }
        if (handle != NULL) {
            ev->handle = Py_NewRef(handle);
            /* a libuv timer, not a ready callback (zero delay) */
            ev->ready = !(uv_timer_handle != NULL && Py_IS_TYPE(handle, uv_timer_handle));
        }
        /* if self._dart_watch_idle: self._dart_timer_handles.add(handle) */
        if (handle != NULL && watching && timer_handles_update(loop, handle, 1) < 0) {
            Py_CLEAR(handle);
        }
        Py_DECREF(ev);
    }
    Py_DECREF(ctx);
    Py_DECREF(runner);
    return handle;
}

static void
restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

static PyObject *proxy_slot_get(PyObject *proxy, PyObject *name, int which);

/* A protocol proxy's method (dartloop._protocols._drained(name)):
 *     try:
 *         return getattr(self._dartloop_target, name)(*args)
 *     finally:
 *         loop = self._dartloop_loop
 *         if loop._microtasks:
 *             loop._run_pending_immediate_callback()
 * The proxy's two slots are read directly (proxy_slot_get), and the uvloop
 * backend's microtask queue is its runner's (the same deque). */
static PyObject *
loopmethod_drained(LoopMethod *m, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        return fallback_call(m, args, nargsf, kwnames);
    }
    PyObject *proxy = args[0];
    PyObject *res = NULL, *target = proxy_slot_get(proxy, str_target, 0);
    if (target != NULL) {
        PyObject *small[SMALL_STACK];
        PyObject **stack = small;
        if (nargs > SMALL_STACK) {
            stack = PyMem_Malloc(nargs * sizeof(PyObject *));
        }
        if (stack == NULL) {
            PyErr_NoMemory();
        }
        else {
            stack[0] = target;
            for (Py_ssize_t i = 1; i < nargs; i++) {
                stack[i] = args[i];
            }
            res = PyObject_VectorcallMethod(m->name, stack, nargs, NULL);
            if (stack != small) {
                PyMem_Free(stack);
            }
        }
        Py_DECREF(target);
    }
    /* finally: with the exception in flight as the one being handled */
    PyObject *exc = res == NULL ? fetch_exception() : NULL;
    PyObject *handled = NULL;
    if (exc != NULL) {
        handled = PyErr_GetHandledException();
        PyErr_SetHandledException(exc);
    }
    int rc = -1;
    PyObject *loop = proxy_slot_get(proxy, str_proxy_loop, 1);
    if (loop != NULL) {
        /* loop._microtasks: the uvloop backend's runner holds it */
        EventRunner *runner = loop_runner(loop);
        PyObject *q = runner != NULL && runner->microtasks != NULL ? Py_NewRef(runner->microtasks)
                                                                   : PyObject_GetAttr(loop, str_microtasks);
        Py_XDECREF(runner);
        if (q != NULL) {
            int t = is_true(q);
            Py_DECREF(q);
            if (t > 0) {
                PyObject *r = PyObject_CallMethodNoArgs(loop, str_run_pending);
                rc = r == NULL ? -1 : 0;
                Py_XDECREF(r);
            }
            else {
                rc = t;
            }
        }
        Py_DECREF(loop);
    }
    if (exc != NULL) {
        PyErr_SetHandledException(handled);
        Py_XDECREF(handled);
        if (rc == 0) {
            restore_exception(exc); /* steals */
        }
        else {
            Py_DECREF(exc); /* the finally block's exception replaces it */
        }
        return NULL;
    }
    if (rc < 0) {
        Py_XDECREF(res);
        return NULL;
    }
    return res;
}

static PyObject *
loopmethod_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    LoopMethod *m = (LoopMethod *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) {
        PyErr_Format(PyExc_TypeError, "unbound method %U() needs an argument", m->name);
        return NULL;
    }
    if (m->kind == K_DRAINED) {
        return loopmethod_drained(m, args, nargsf, kwnames);
    }
    if (m->kind == K_SEND) {
        if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
            return fallback_call(m, args, nargsf, kwnames); /* raises the TypeError */
        }
        return port_send(args[0], args[1]);
    }
    if (m->kind == K_DRAIN) {
        if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
            return fallback_call(m, args, nargsf, kwnames);
        }
        if (drain_loop(args[0]) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return loopmethod_schedule(m, args, nargsf, kwnames);
}

static PyObject *
loopmethod_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyObject *
loopmethod_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "fallback", "base", NULL};
    const char *kind;
    PyObject *fallback, *base = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sO|O:LoopMethod", kwlist, &kind, &fallback, &base)) {
        return NULL;
    }
    int k;
    if (strcmp(kind, "call_soon") == 0) {
        k = K_CALL_SOON;
    }
    else if (strcmp(kind, "call_soon_threadsafe") == 0) {
        k = K_CALL_SOON_THREADSAFE;
    }
    else if (strcmp(kind, "call_later") == 0) {
        k = K_CALL_LATER;
    }
    else if (strcmp(kind, "drain") == 0) {
        k = K_DRAIN;
    }
    else if (strcmp(kind, "drained") == 0) {
        k = K_DRAINED;
    }
    else if (strcmp(kind, "send") == 0) {
        k = K_SEND;
    }
    else {
        PyErr_Format(PyExc_ValueError, "unknown LoopMethod kind %s", kind);
        return NULL;
    }
    if (!PyCallable_Check(fallback) || (k < K_DRAIN && !PyCallable_Check(base))) {
        PyErr_SetString(PyExc_TypeError, "LoopMethod needs a callable fallback (and base)");
        return NULL;
    }
    LoopMethod *m = PyObject_GC_New(LoopMethod, type);
    if (m == NULL) {
        return NULL;
    }
    m->vectorcall = loopmethod_vectorcall;
    m->kind = k;
    m->fallback = Py_NewRef(fallback);
    m->base = Py_NewRef(base);
    m->name = PyObject_GetAttrString(fallback, "__name__");
    m->qualname = m->name ? PyObject_GetAttrString(fallback, "__qualname__") : NULL;
    m->doc = m->qualname ? PyObject_GetAttrString(fallback, "__doc__") : NULL;
    PyObject_GC_Track(m);
    if (m->doc == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    return (PyObject *)m;
}

static int
loopmethod_traverse(LoopMethod *m, visitproc visit, void *arg)
{
    Py_VISIT(m->fallback);
    Py_VISIT(m->base);
    Py_VISIT(m->name);
    Py_VISIT(m->qualname);
    Py_VISIT(m->doc);
    return 0;
}

static int
loopmethod_clear(LoopMethod *m)
{
    Py_CLEAR(m->fallback);
    Py_CLEAR(m->base);
    Py_CLEAR(m->name);
    Py_CLEAR(m->qualname);
    Py_CLEAR(m->doc);
    return 0;
}

static void
loopmethod_dealloc(LoopMethod *m)
{
    PyObject_GC_UnTrack(m);
    loopmethod_clear(m);
    PyObject_GC_Del(m);
}

static PyObject *
loopmethod_repr(LoopMethod *m)
{
    return PyUnicode_FromFormat("<dartloop accelerated method %U>", m->qualname ? m->qualname : Py_None);
}

static PyObject *
loopmethod_get_attr(LoopMethod *m, void *which)
{
    PyObject *v = which == (void *)0 ? m->name : which == (void *)1 ? m->qualname : which == (void *)2 ? m->doc : m->fallback;
    return Py_NewRef(v ? v : Py_None);
}

static PyGetSetDef loopmethod_getset[] = {
    {"__name__", (getter)loopmethod_get_attr, NULL, NULL, (void *)0},
    {"__qualname__", (getter)loopmethod_get_attr, NULL, NULL, (void *)1},
    {"__doc__", (getter)loopmethod_get_attr, NULL, NULL, (void *)2},
    {"__wrapped__", (getter)loopmethod_get_attr, NULL, "the pure-Python method", (void *)3},
    {NULL},
};

static PyTypeObject LoopMethod_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dartloop._speedups.LoopMethod",
    .tp_basicsize = sizeof(LoopMethod),
    .tp_dealloc = (destructor)loopmethod_dealloc,
    .tp_vectorcall_offset = offsetof(LoopMethod, vectorcall),
    .tp_repr = (reprfunc)loopmethod_repr,
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "LoopMethod(kind, fallback, base=None)\n--\n\n"
              "A method of an accelerated loop class, in C. kind: 'call_soon',\n"
              "'call_soon_threadsafe', 'call_later' (uvloop backend; base is\n"
              "uvloop.Loop's method), 'drain', 'drained' (a protocol proxy's\n"
              "method, named like fallback), or 'send' (SendPort.send). fallback\n"
              "is the pure-Python method, used in debug mode and for calls it\n"
              "would reject.",
    .tp_traverse = (traverseproc)loopmethod_traverse,
    .tp_clear = (inquiry)loopmethod_clear,
    .tp_getset = loopmethod_getset,
    .tp_descr_get = loopmethod_descr_get,
    .tp_new = loopmethod_new,
};

/* ----------------------------------------------------------------------- */
/* schedule_microtask                                                      */

/* The dartloop loop whose run_forever() is running in this thread, and its
 * _mt_append, set by set_thread_loop() for the length of the run.  Python
 * 3.11's _get_running_loop() makes a getpid() system call on every call (its
 * fork check), which cost schedule_microtask a third of its time there; a
 * thread-local is free.  The loop reference is borrowed (run_forever's `self`
 * holds it for as long as it is set); _mt_append is bound once, in
 * DartEventLoop._dart_setup, and never reassigned.  A forked child clears it
 * (dartloop/_loop.py registers clear_thread_loop with os.register_at_fork), as
 * asyncio forgets its running loop there.  Outside a run, schedule_microtask
 * asks asyncio, so it raises the same errors as the pure function. */
static _Thread_local PyObject *thread_loop;
static _Thread_local PyObject *thread_mt_append; /* strong */

/* Make `loop` (or nobody, for None) this thread's running dartloop loop;
 * returns the previous one (None if none), for run_forever to restore. */
static PyObject *
speedups_set_thread_loop(PyObject *module, PyObject *loop)
{
    PyObject *append = NULL;
    if (loop != Py_None) {
        append = PyObject_GetAttr(loop, str_mt_append);
        if (append == NULL) {
            return NULL;
        }
    }
    PyObject *previous = Py_NewRef(thread_loop != NULL ? thread_loop : Py_None);
    Py_XSETREF(thread_mt_append, append);
    thread_loop = loop != Py_None ? loop : NULL;
    return previous;
}

PyDoc_STRVAR(set_thread_loop_doc,
"set_thread_loop(loop)\n--\n\n"
"Mark loop (None: no loop) as the dartloop loop running in this thread\n"
"and return the previous one; DartEventLoop.run_forever calls it around\n"
"the run. Thread: the one that runs the loop.");

static PyObject *
speedups_clear_thread_loop(PyObject *module, PyObject *unused)
{
    thread_loop = NULL;
    Py_CLEAR(thread_mt_append);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(clear_thread_loop_doc,
"clear_thread_loop()\n--\n\n"
"Forget this thread's running dartloop loop (in a forked child).");

/* The running loop's _mt_append (a new reference), or NULL with AttributeError
 * set when the running loop is not a dartloop loop (`*loop_out` is then that
 * loop, a new reference, else NULL). */
static PyObject *
running_mt_append(PyObject **loop_out)
{
    *loop_out = NULL;
    if (thread_loop != NULL) {
        return Py_NewRef(thread_mt_append);
    }
    PyObject *loop = PyObject_Vectorcall(get_running_loop, NULL, 0, NULL);
    if (loop == NULL) {
        return NULL;
    }
    PyObject *append = PyObject_GetAttr(loop, str_mt_append);
    if (append == NULL) {
        *loop_out = loop;
        return NULL;
    }
    Py_DECREF(loop);
    return append;
}

PyDoc_STRVAR(schedule_microtask_doc,
"schedule_microtask(callback, *args)\n--\n\n"
"Queue callback(*args) to run in the current turn's microtask drain\n"
"(the C version of dartloop.schedule_microtask; same behaviour).");

static PyObject *
speedups_schedule_microtask(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_Format(PyExc_TypeError, "schedule_microtask() got an unexpected keyword argument '%U'",
                     PyTuple_GET_ITEM(kwnames, 0));
        return NULL;
    }
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError,
                        "schedule_microtask() missing 1 required positional argument: 'callback'");
        return NULL;
    }
    PyObject *loop;
    PyObject *append = running_mt_append(&loop);
    if (append == NULL) {
        if (loop == NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) {
            Py_XDECREF(loop);
            return NULL;
        }
        /* raise _no_loop("schedule_microtask()", loop) from None */
        PyErr_Clear();
        if (lazy_attr(&no_loop, "dartloop._microtasks", "_no_loop") != NULL) {
            PyObject *what = PyUnicode_FromString("schedule_microtask()");
            PyObject *err = what ? PyObject_CallFunctionObjArgs(no_loop, what, loop, NULL) : NULL;
            Py_XDECREF(what);
            if (err != NULL) {
                PyException_SetCause(err, NULL); /* also sets __suppress_context__ */
                PyErr_SetObject((PyObject *)Py_TYPE(err), err);
                Py_DECREF(err);
            }
        }
        Py_DECREF(loop);
        return NULL;
    }
    PyObject *callback = args[0];
    if (!PyCallable_Check(callback)) {
        PyErr_Format(PyExc_TypeError, "schedule_microtask() needs a callable, got %s %R",
                     Py_TYPE(callback)->tp_name, callback);
        Py_DECREF(append);
        return NULL;
    }
    PyObject *cbargs = PyTuple_New(nargs - 1);
    if (cbargs == NULL) {
        Py_DECREF(append);
        return NULL;
    }
    for (Py_ssize_t i = 1; i < nargs; i++) {
        PyTuple_SET_ITEM(cbargs, i - 1, Py_NewRef(args[i]));
    }
    PyObject *item = PyTuple_Pack(2, callback, cbargs);
    Py_DECREF(cbargs);
    if (item == NULL) {
        Py_DECREF(append);
        return NULL;
    }
    PyObject *res = PyObject_Vectorcall(append, &item, 1, NULL);
    Py_DECREF(item);
    Py_DECREF(append);
    if (res == NULL) {
        return NULL;
    }
    Py_DECREF(res);
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------- */
/* dispatch_native: dartloop._isolate._dispatch_native                     */

/* Reading a __slots__ attribute (SendPort._core, _PortCore.closed / isolate /
 * handler, the _IsolateState slots) without the generic lookup.  Python's own
 * bytecode reads these through inline caches, so a C version that called
 * PyObject_GetAttr for each was hardly faster than the pure method (measured:
 * about 235 ns a send against 270 ns); this is the same idea: remember,
 * per call site, the member descriptor that the type lookup found, and use
 * it while the type is unchanged.  Any change to a type (or a base) resets
 * its tp_version_tag, and tags are never reused, so a matching tag means the
 * lookup would find the same descriptor.  Reading through PyMember_GetOne is
 * what the descriptor's own __get__ does (AttributeError for an empty slot).
 * Anything else (another type, a __getattribute__ or __getattr__, no member
 * descriptor, no valid tag yet) takes the ordinary PyObject_GetAttr. */
typedef struct {
    PyTypeObject *type; /* strong */
    unsigned int version;
    PyMemberDef *member;
} SlotCache;

#ifndef Py_GIL_DISABLED
/* The cache describes `tp` as it is now. */
static inline int
slot_cache_hit(const SlotCache *cache, PyTypeObject *tp)
{
    return tp == cache->type && tp->tp_version_tag == cache->version && cache->version != 0;
}

/* The member descriptor that `name` finds on `tp`, from the cache or looked
 * up and cached; NULL (nothing cached) when it is not one or `generic` is
 * false (the type has its own __getattribute__/__setattr__). */
static PyMemberDef *
slot_member(PyTypeObject *tp, PyObject *name, SlotCache *cache, int generic)
{
    if (slot_cache_hit(cache, tp)) {
        return cache->member;
    }
    if (!generic) {
        return NULL;
    }
    PyObject *descr = _PyType_Lookup(tp, name); /* borrowed; assigns a version tag */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) || tp->tp_version_tag == 0) {
        return NULL;
    }
    Py_XSETREF(cache->type, (PyTypeObject *)Py_NewRef((PyObject *)tp));
    cache->version = tp->tp_version_tag;
    cache->member = ((PyMemberDescrObject *)descr)->d_member;
    return cache->member;
}
#endif

static PyObject *
slot_get(PyObject *obj, PyObject *name, SlotCache *cache)
{
#ifndef Py_GIL_DISABLED
    PyTypeObject *tp = Py_TYPE(obj);
    PyMemberDef *member = slot_member(tp, name, cache, tp->tp_getattro == PyObject_GenericGetAttr);
    if (member != NULL) {
        return PyMember_GetOne((const char *)obj, member);
    }
#endif
    return PyObject_GetAttr(obj, name);
}

/* The store through the same kind of cache (one cache per call site kind:
 * a type with its own __setattr__ takes the ordinary path). */
static int
slot_set(PyObject *obj, PyObject *name, PyObject *value, SlotCache *cache)
{
#ifndef Py_GIL_DISABLED
    PyTypeObject *tp = Py_TYPE(obj);
    PyMemberDef *member = slot_member(tp, name, cache, tp->tp_setattro == PyObject_GenericSetAttr);
    if (member != NULL) {
        return PyMember_SetOne((char *)obj, member, value);
    }
#endif
    return PyObject_SetAttr(obj, name, value);
}

/* A protocol proxy's own slot (_dartloop_target, _dartloop_loop), read as
 * getattr(proxy, name) would: the proxy classes have a __getattr__, which
 * Python calls only when the ordinary lookup fails, and the ordinary lookup
 * finds the slot's member descriptor first.  So the slot is read directly
 * when the type's lookup is the ordinary one (object.__getattribute__) and
 * the name is a member of it; anything else, and an empty slot, go through
 * getattr. */
static SlotCache cache_proxy_slot[2];
static PyObject *object_getattribute; /* object.__getattribute__ (the slot wrapper) */

static PyObject *
proxy_slot_get(PyObject *proxy, PyObject *name, int which)
{
#ifndef Py_GIL_DISABLED
    SlotCache *cache = &cache_proxy_slot[which];
    PyTypeObject *tp = Py_TYPE(proxy);
    if (!slot_cache_hit(cache, tp)) {
        cache->version = 0;
        if (object_getattribute == NULL) {
            object_getattribute = _PyType_Lookup(&PyBaseObject_Type, str_getattribute);
            Py_XINCREF(object_getattribute);
        }
        PyObject *descr = _PyType_Lookup(tp, name); /* borrowed; assigns a version tag */
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
            ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX && object_getattribute != NULL &&
            _PyType_Lookup(tp, str_getattribute) == object_getattribute && tp->tp_version_tag != 0) {
            Py_XSETREF(cache->type, (PyTypeObject *)Py_NewRef((PyObject *)tp));
            cache->version = tp->tp_version_tag;
            cache->member = ((PyMemberDescrObject *)descr)->d_member;
        }
    }
    if (cache->version != 0) {
        PyObject *v = *(PyObject **)((char *)proxy + cache->member->offset);
        if (v != NULL) {
            return Py_NewRef(v);
        }
    }
#endif
    return PyObject_GetAttr(proxy, name);
}

static SlotCache cache_send_port_core, cache_core_closed, cache_core_isolate, cache_core_handler,
    cache_iso_thread_id, cache_iso_relay_port, cache_iso_inbox, cache_iso_inbox_scheduled,
    cache_iso_inbox_drain, cache_iso_loop, cache_iso_oob, cache_iso_resume_caps, cache_iso_held,
    cache_set_inbox_scheduled;

/* bool(state.resume_caps) or bool(state.held) */
static int
isolate_waiting(PyObject *state)
{
    PyObject *o = slot_get(state, str_resume_caps, &cache_iso_resume_caps);
    if (o == NULL) {
        return -1;
    }
    int t = PyObject_IsTrue(o);
    Py_DECREF(o);
    if (t != 0) {
        return t;
    }
    o = slot_get(state, str_held, &cache_iso_held);
    if (o == NULL) {
        return -1;
    }
    t = PyObject_IsTrue(o);
    Py_DECREF(o);
    return t;
}

/* One message: `handler(value)`, an exception reported as the Python loop
 * does (`loop._report_callback_error(exc, handler, (value,))`), then the
 * drain if microtasks are queued.  0, or -1 with an exception set. */
static int
dispatch_one(PyObject *loop, PyObject *microtasks, PyObject *handler, PyObject *value)
{
    /* With the slot in front of the argument free for the callee, a bound
     * method handler (RawReceivePort(self.on_message)) puts self there
     * instead of copying the arguments into a new array. */
    PyObject *stack[2] = {NULL, value};
    PyObject *res = PyObject_Vectorcall(handler, stack + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (res != NULL) {
        Py_DECREF(res);
    }
    else {
        if (must_propagate()) {
            return -1;
        }
        PyObject *exc = fetch_exception();
        PyObject *cbargs = PyTuple_Pack(1, value);
        if (cbargs == NULL) {
            Py_XDECREF(exc);
            return -1;
        }
        int rc = report_callback_error(loop, exc, handler, cbargs);
        Py_DECREF(cbargs);
        Py_XDECREF(exc);
        if (rc < 0) {
            return -1;
        }
    }
    int t = is_true(microtasks);
    if (t < 0) {
        return -1;
    }
    if (t) {
        res = PyObject_CallMethodNoArgs(loop, str_run_pending);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    return 0;
}

/* ----------------------------------------------------------------------- */
/* Ports: SendPort.send and _IsolateState._drain_inbox                     */


/* ----------------------------------------------------------------------- */
/* dispatch_native: dartloop._isolate._dispatch_native                     */
/* (here, after slot_get, which it uses; its other helpers are above)      */

PyDoc_STRVAR(dispatch_native_doc,
"dispatch_native(state, batch, registry)\n--\n\n"
"The C version of dartloop._isolate._dispatch_native: dispatch a batch\n"
"drained from an isolate's native queue (NativeQueue.drain_flat(): [port,\n"
"value, port, value, ...]), each message its own turn.");

/* core, value = relay_box.pop(ticket): new references, or -1. */
static int
relay_pop(PyObject *relay_box, PyObject *ticket, PyObject **core, PyObject **value)
{
    PyObject *pair = PyObject_CallMethodOneArg(relay_box, str_pop, ticket);
    if (pair == NULL) {
        return -1;
    }
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        Py_DECREF(pair);
        PyErr_SetString(PyExc_TypeError, "dispatch_native: a relay entry must be a (core, message) tuple");
        return -1;
    }
    *core = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
    *value = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
    Py_DECREF(pair);
    return 0;
}

/* *core = the core a run of messages to `port` goes to (a new reference),
 * or NULL when it is not an open port of this isolate (the run is dropped);
 * 0, or -1 with an exception set.
 *     core = registry.get(port)
 *     if core is not None and core.isolate is not state: core = None     */
static int
resolve_port(PyObject *registry, PyObject *state, PyObject *port, PyObject **core)
{
    *core = NULL;
    PyObject *c = PyDict_GetItemWithError(registry, port);
    if (c == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(c);
    PyObject *owner = slot_get(c, str_isolate_attr, &cache_core_isolate);
    if (owner == NULL) {
        Py_DECREF(c);
        return -1;
    }
    Py_DECREF(owner); /* only its identity is compared */
    if (owner != state) {
        Py_DECREF(c);
        return 0;
    }
    *core = c;
    return 0;
}

/* _isolate._dispatch_native, line by line; the per-message work is what
 * decides the native posts' rate, so:
 *   - a run of messages to one port (one port object, see drain_flat) is
 *     resolved once: the relay comparison, the registry lookup and the
 *     isolate check.  Holding on to the core for the whole run is what the
 *     Python version does too, and is right: a port closed meanwhile keeps
 *     its core, whose handler is None from then on (RawReceivePort.handler
 *     can't be set on a closed port), and a core's isolate never changes;
 *   - core.handler is still read for every message (a handler may replace
 *     it or close the port), through the slot cache, not the generic
 *     attribute lookup. */
static PyObject *
speedups_dispatch_native(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_CheckExact(args[1]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "dispatch_native(state, batch: list, registry: dict)");
        return NULL;
    }
    PyObject *state = args[0], *batch = args[1], *registry = args[2];
    PyObject *loop = NULL, *microtasks = NULL, *relay_port = NULL, *relay_box = NULL, *oob = NULL;
    PyObject *result = NULL;
    /* The current run: its port object (strong, so that a new int can't take
     * its address while we compare against it) and its core (strong; NULL:
     * drop the run). */
    PyObject *last_port = NULL, *last_core = NULL;
    int is_relay = 0;
    Py_INCREF(batch); /* a handler can't take it away from us */
    if (PyList_GET_SIZE(batch) % 2 != 0) {
        PyErr_SetString(PyExc_TypeError, "dispatch_native: the batch must be [port, value, port, value, ...]");
        goto done;
    }
    if ((loop = PyObject_GetAttr(state, str_loop)) == NULL ||
        (microtasks = PyObject_GetAttr(loop, str_microtasks)) == NULL ||
        (relay_port = PyObject_GetAttr(state, str_relay_port)) == NULL ||
        (relay_box = PyObject_GetAttr(state, str_relay_box)) == NULL ||
        (oob = PyObject_GetAttr(state, str_oob)) == NULL) {
        goto done;
    }
    int waiting = isolate_waiting(state);
    if (waiting < 0) {
        goto done;
    }
    /* Nobody else holds the batch (drain_flat made it for us), but the size
     * is read on every step anyway: a list is never trusted to stay put
     * across a call into Python. */
    for (Py_ssize_t i = 0; i + 1 < PyList_GET_SIZE(batch); i += 2) {
        PyObject *port = PyList_GET_ITEM(batch, i);
        PyObject *core, *value;
        if (port != last_port) {
            Py_INCREF(port);
            Py_XSETREF(last_port, port);
            Py_CLEAR(last_core);
            is_relay = PyObject_RichCompareBool(port, relay_port, Py_EQ);
            if (is_relay < 0 || (!is_relay && resolve_port(registry, state, port, &last_core) < 0)) {
                goto done;
            }
        }
        if (is_relay) {
            if (relay_pop(relay_box, PyList_GET_ITEM(batch, i + 1), &core, &value) < 0) {
                goto done;
            }
        }
        else if (last_core == NULL) {
            continue;
        }
        else {
            core = Py_NewRef(last_core);
            value = Py_NewRef(PyList_GET_ITEM(batch, i + 1));
        }
        int rc = 0;
        if (waiting) {
            PyObject *r = PyObject_CallMethodObjArgs(state, str_hold_message, core, value, NULL);
            rc = r == NULL ? -1 : 0;
            Py_XDECREF(r);
        }
        else {
            PyObject *handler = slot_get(core, str_handler, &cache_core_handler);
            if (handler == NULL) {
                rc = -1;
            }
            else {
                if (handler != Py_None) {
                    rc = dispatch_one(loop, microtasks, handler, value);
                    if (rc == 0) {
                        int t = is_true(oob);
                        if (t < 0) {
                            rc = -1;
                        }
                        else if (t) {
                            PyObject *r = PyObject_CallMethodNoArgs(state, str_serve_control);
                            if (r == NULL) {
                                rc = -1;
                            }
                            else {
                                Py_DECREF(r);
                                waiting = isolate_waiting(state);
                                rc = waiting < 0 ? -1 : 0;
                            }
                        }
                    }
                }
                Py_DECREF(handler);
            }
        }
        Py_DECREF(core);
        Py_DECREF(value);
        if (rc < 0) {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(batch);
    Py_XDECREF(last_port);
    Py_XDECREF(last_core);
    Py_XDECREF(loop);
    Py_XDECREF(microtasks);
    Py_XDECREF(relay_port);
    Py_XDECREF(relay_box);
    Py_XDECREF(oob);
    return result;
}

/* Exact types that are surely in dartloop._message._ATOMIC (checked when it
 * is first read): most messages are one of these, and then the set lookup of
 * `type(message) in _ATOMIC` can be skipped. */
static int atomic_fast_ok;

static int
load_message_helpers(void)
{
    if (atomic_types != NULL) {
        return 0;
    }
    if (lazy_attr(&prepare_message, "dartloop._message", "prepare_message") == NULL) {
        return -1;
    }
    PyObject *atomic = PyImport_ImportModule("dartloop._message");
    PyObject *types = atomic == NULL ? NULL : PyObject_GetAttrString(atomic, "_ATOMIC");
    Py_XDECREF(atomic);
    if (types == NULL) {
        return -1;
    }
    PyTypeObject *fast[] = {&PyLong_Type, &PyUnicode_Type, &PyFloat_Type, &PyBool_Type, Py_TYPE(Py_None)};
    int ok = PyFrozenSet_CheckExact(types);
    for (size_t i = 0; ok > 0 && i < sizeof(fast) / sizeof(fast[0]); i++) {
        ok = PySet_Contains(types, (PyObject *)fast[i]);
    }
    if (ok < 0) {
        Py_DECREF(types);
        return -1;
    }
    atomic_fast_ok = ok;
    atomic_types = types;
    return 0;
}

/* type(message) in _ATOMIC */
static inline int
is_atomic(PyObject *message)
{
    if (atomic_fast_ok && (PyLong_CheckExact(message) || PyUnicode_CheckExact(message) ||
                           PyFloat_CheckExact(message) || message == Py_None || PyBool_Check(message))) {
        return 1;
    }
    return PySet_Contains(atomic_types, (PyObject *)Py_TYPE(message));
}

/* The inbox holds two entries a message, its core then the message itself,
 * not a (core, message) tuple: under a flood hundreds of thousands of queued
 * tuples are that many more objects for the cyclic GC to track and traverse
 * (about a tenth of a message's cost).  The pure code appends a pair with one
 * deque.extend(); here the two appends run with nothing in between that
 * could let another thread in (no Python code, no GC-tracked allocation,
 * the GIL held throughout), so pairs from several senders never interleave.
 * Without a GIL each append locks the deque on its own: there the pair goes
 * in with one extend(), as in Python. */
static int
inbox_append_pair(PyObject *inbox, PyObject *core, PyObject *message)
{
#ifndef Py_GIL_DISABLED
    if (Py_IS_TYPE(inbox, deque_type)) {
        PyObject *stack[2] = {inbox, core};
        PyObject *r = PyObject_Vectorcall(deque_append, stack, 2, NULL);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
        stack[1] = message;
        r = PyObject_Vectorcall(deque_append, stack, 2, NULL);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
        return 0;
    }
#endif
    PyObject *pair = PyTuple_Pack(2, core, message);
    if (pair == NULL) {
        return -1;
    }
    PyObject *r = PyObject_CallMethodOneArg(inbox, str_extend, pair);
    Py_DECREF(pair);
    if (r == NULL) {
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

/* _get_ident() == iso.thread_id (None until the isolate's thread runs) */
static int
on_isolate_thread(PyObject *iso)
{
    PyObject *tid = slot_get(iso, str_thread_id, &cache_iso_thread_id);
    if (tid == NULL) {
        return -1;
    }
    unsigned long me = PyThread_get_thread_ident();
    int same;
    if (tid == Py_None) {
        same = 0;
    }
    else if (PyLong_CheckExact(tid)) {
        unsigned long v = PyLong_AsUnsignedLong(tid);
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear(); /* negative or too big: no thread's ident */
            same = 0;
        }
        else {
            same = v == me;
        }
    }
    else {
        PyObject *mine = PyLong_FromUnsignedLong(me);
        same = mine == NULL ? -1 : PyObject_RichCompareBool(mine, tid, Py_EQ);
        Py_XDECREF(mine);
    }
    Py_DECREF(tid);
    return same;
}

/* SendPort.send(self, message), the pure method line by line:
 *     if type(message) not in _ATOMIC:
 *         message = prepare_message(message)
 *     core = self._core
 *     if core.closed:
 *         return
 *     iso = core.isolate
 *     if _get_ident() == iso.thread_id:
 *         iso.loop.call_soon(iso._deliver, core, message)
 *         return
 *     if iso.relay_port and iso.relay(core, message):
 *         return
 *     iso.inbox.extend((core, message))
 *     if not iso.inbox_scheduled:
 *         iso.inbox_scheduled = True
 *         try:
 *             iso.loop.call_soon_threadsafe(iso._drain_inbox)
 *         except (RuntimeError, AttributeError):
 *             pass
 * Any thread. */
static PyObject *
port_send(PyObject *send_port, PyObject *message)
{
    PyObject *core = NULL, *iso = NULL, *result = NULL;
    if (load_message_helpers() < 0) {
        return NULL;
    }
    int atomic = is_atomic(message);
    if (atomic < 0) {
        return NULL;
    }
    if (atomic) {
        Py_INCREF(message);
    }
    else if ((message = PyObject_CallOneArg(prepare_message, message)) == NULL) {
        return NULL;
    }
    if ((core = slot_get(send_port, str_core, &cache_send_port_core)) == NULL) {
        goto done;
    }
    PyObject *o = slot_get(core, str_closed, &cache_core_closed);
    int t = is_true(o);
    Py_XDECREF(o);
    if (t != 0) {
        result = t < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    if ((iso = slot_get(core, str_isolate_attr, &cache_core_isolate)) == NULL) {
        goto done;
    }
    t = on_isolate_thread(iso);
    if (t < 0) {
        goto done;
    }
    if (t) {
        /* The owner's own thread: an event in its loop's FIFO. */
        PyObject *loop = PyObject_GetAttr(iso, str_loop);
        PyObject *deliver = loop == NULL ? NULL : PyObject_GetAttr(iso, str_deliver);
        if (deliver != NULL) {
            PyObject *stack[4] = {loop, deliver, core, message};
            PyObject *handle = PyObject_VectorcallMethod(str_call_soon, stack, 4, NULL);
            if (handle != NULL) {
                Py_DECREF(handle);
                result = Py_NewRef(Py_None);
            }
            Py_DECREF(deliver);
        }
        Py_XDECREF(loop);
        goto done;
    }
    o = slot_get(iso, str_relay_port, &cache_iso_relay_port);
    t = is_true(o);
    Py_XDECREF(o);
    if (t > 0) {
        o = PyObject_CallMethodObjArgs(iso, str_relay, core, message, NULL);
        t = is_true(o);
        Py_XDECREF(o);
        if (t != 0) {
            result = t < 0 ? NULL : Py_NewRef(Py_None);
            goto done;
        }
    }
    else if (t < 0) {
        goto done;
    }
    PyObject *inbox = slot_get(iso, str_inbox, &cache_iso_inbox);
    if (inbox == NULL) {
        goto done;
    }
    t = inbox_append_pair(inbox, core, message);
    Py_DECREF(inbox);
    if (t < 0) {
        goto done;
    }
    /* One wakeup per burst: the isolate clears the flag before it looks at
     * the inbox, so a message appended after that schedules its own. */
    o = slot_get(iso, str_inbox_scheduled, &cache_iso_inbox_scheduled);
    t = is_true(o);
    Py_XDECREF(o);
    if (t < 0) {
        goto done;
    }
    if (!t) {
        if (slot_set(iso, str_inbox_scheduled, Py_True, &cache_set_inbox_scheduled) < 0) {
            goto done;
        }
        /* iso.inbox_drain is iso._drain_inbox bound once (bind_loop), and
         * iso.loop a slot: no attribute lookups but the method's, which an
         * instance attribute may still override, as in the Python code. */
        PyObject *loop = slot_get(iso, str_loop, &cache_iso_loop);
        PyObject *drain = loop == NULL ? NULL : slot_get(iso, str_inbox_drain, &cache_iso_inbox_drain);
        if (drain == Py_None) {
            Py_SETREF(drain, PyObject_GetAttr(iso, str_drain_inbox));
        }
        PyObject *handle = NULL;
        if (drain != NULL) {
            PyObject *stack[2] = {loop, drain};
            handle = PyObject_VectorcallMethod(str_call_soon_threadsafe, stack, 2, NULL);
            Py_DECREF(drain);
        }
        Py_XDECREF(loop);
        if (handle != NULL) {
            Py_DECREF(handle);
        }
        else if (PyErr_ExceptionMatches(PyExc_RuntimeError) || PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear(); /* the loop closed meanwhile (loop None once closed): the isolate is gone, drop */
        }
        else {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_DECREF(message);
    Py_XDECREF(core);
    Py_XDECREF(iso);
    return result;
}

/* len(q), with deque's length read directly where that is checked to work */
static Py_ssize_t
queue_length(PyObject *q)
{
    if (deque_size_ok && Py_IS_TYPE(q, deque_type)) {
        return Py_SIZE(q);
    }
    return PyObject_Length(q);
}

/* `core = popleft(); message = popleft()`: one inbox entry (two items, see
 * _IsolateState.inbox); new references, or -1 with an exception set. */
static int
pop_inbox_pair(PyObject *inbox, PyObject **core, PyObject **message)
{
    *core = queue_popleft(inbox);
    if (*core == NULL) {
        return -1;
    }
    *message = queue_popleft(inbox);
    if (*message == NULL) {
        Py_CLEAR(*core);
        return -1;
    }
    return 0;
}

/* state._hold_message(popleft(), popleft()) while the inbox is not empty */
static int
hold_inbox(PyObject *state, PyObject *inbox)
{
    for (;;) {
        int t = is_true(inbox);
        if (t <= 0) {
            return t;
        }
        PyObject *core, *message;
        if (pop_inbox_pair(inbox, &core, &message) < 0) {
            return -1;
        }
        PyObject *r = PyObject_CallMethodObjArgs(state, str_hold_message, core, message, NULL);
        Py_DECREF(core);
        Py_DECREF(message);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
    }
}

PyDoc_STRVAR(drain_inbox_doc,
"drain_inbox(state)\n--\n\n"
"The C version of dartloop._isolate._IsolateState._drain_inbox: dispatch\n"
"the messages other threads queued in state's inbox, one Dart turn each\n"
"(handler, then the microtask drain). Isolate thread.");

/* _IsolateState._drain_inbox(self), line by line:
 *     self.inbox_scheduled = False
 *     inbox, loop, oob = self.inbox, self.loop, self.oob
 *     microtasks = loop._microtasks
 *     waiting = self.resume_caps or self.held
 *     for _ in range(len(inbox) // 2):
 *         if oob:
 *             self.serve_control()
 *             waiting = self.resume_caps or self.held
 *         if waiting:
 *             while inbox:
 *                 self._hold_message(popleft(), popleft())
 *             return
 *         core = popleft(); message = popleft()
 *         handler = core.handler
 *         if handler is None:
 *             continue
 *         <dispatch_one: handler(message), report, drain>
 *     if inbox and not self.inbox_scheduled:
 *         self.inbox_scheduled = True
 *         loop.call_soon(self._drain_inbox)                                 */
static PyObject *
speedups_drain_inbox(PyObject *module, PyObject *state)
{
    PyObject *inbox = NULL, *loop = NULL, *microtasks = NULL, *oob = NULL, *result = NULL;
    if (slot_set(state, str_inbox_scheduled, Py_False, &cache_set_inbox_scheduled) < 0) {
        return NULL;
    }
    if ((inbox = slot_get(state, str_inbox, &cache_iso_inbox)) == NULL ||
        (loop = slot_get(state, str_loop, &cache_iso_loop)) == NULL ||
        (microtasks = PyObject_GetAttr(loop, str_microtasks)) == NULL ||
        (oob = slot_get(state, str_oob, &cache_iso_oob)) == NULL) {
        goto done;
    }
    /* As in the Python method: whether messages must wait changes only when
     * control actions are served. */
    int waiting = isolate_waiting(state);
    if (waiting < 0) {
        goto done;
    }
    Py_ssize_t n = queue_length(inbox);
    if (n < 0) {
        goto done;
    }
    for (n /= 2; n > 0; n--) {
        int t = is_true(oob);
        if (t < 0) {
            goto done;
        }
        if (t) {
            PyObject *r = PyObject_CallMethodNoArgs(state, str_serve_control);
            if (r == NULL) {
                goto done;
            }
            Py_DECREF(r);
            if ((waiting = isolate_waiting(state)) < 0) {
                goto done;
            }
        }
        if (waiting) {
            /* The rest of the inbox waits behind the held events, in order. */
            if (hold_inbox(state, inbox) == 0) {
                result = Py_NewRef(Py_None);
            }
            goto done;
        }
        PyObject *core, *message;
        if (pop_inbox_pair(inbox, &core, &message) < 0) {
            goto done;
        }
        PyObject *handler = slot_get(core, str_handler, &cache_core_handler);
        Py_DECREF(core);
        int rc = handler == NULL ? -1 : 0;
        if (handler != NULL && handler != Py_None) {
            rc = dispatch_one(loop, microtasks, handler, message);
        }
        Py_XDECREF(handler);
        Py_DECREF(message);
        if (rc < 0) {
            goto done;
        }
        /* The Python loop checks for signals between messages. */
        if (PyErr_CheckSignals() < 0) {
            goto done;
        }
    }
    /* What came meanwhile gets an event of its own, behind the ready ones. */
    int more = is_true(inbox);
    if (more < 0) {
        goto done;
    }
    if (more) {
        PyObject *o = slot_get(state, str_inbox_scheduled, &cache_iso_inbox_scheduled);
        int scheduled = is_true(o);
        Py_XDECREF(o);
        if (scheduled < 0) {
            goto done;
        }
        if (!scheduled) {
            if (slot_set(state, str_inbox_scheduled, Py_True, &cache_set_inbox_scheduled) < 0) {
                goto done;
            }
            PyObject *drain = PyObject_GetAttr(state, str_drain_inbox);
            if (drain == NULL) {
                goto done;
            }
            PyObject *handle = PyObject_CallMethodOneArg(loop, str_call_soon, drain);
            Py_DECREF(drain);
            if (handle == NULL) {
                goto done;
            }
            Py_DECREF(handle);
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(inbox);
    Py_XDECREF(loop);
    Py_XDECREF(microtasks);
    Py_XDECREF(oob);
    return result;
}

/* ----------------------------------------------------------------------- */
/* Module                                                                  */

static PyMethodDef speedups_methods[] = {
    {"drain", (PyCFunction)speedups_drain, METH_O, drain_doc},
    {"dispatch_native", (PyCFunction)(void (*)(void))speedups_dispatch_native, METH_FASTCALL, dispatch_native_doc},
    {"drain_inbox", (PyCFunction)speedups_drain_inbox, METH_O, drain_inbox_doc},
    {"schedule_microtask", (PyCFunction)(void (*)(void))speedups_schedule_microtask,
     METH_FASTCALL | METH_KEYWORDS, schedule_microtask_doc},
    {"set_thread_loop", (PyCFunction)speedups_set_thread_loop, METH_O, set_thread_loop_doc},
    {"clear_thread_loop", (PyCFunction)speedups_clear_thread_loop, METH_NOARGS, clear_thread_loop_doc},
    {NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dartloop._speedups",
    .m_doc = "C versions of dartloop's event-loop hot paths (optional; see dartloop/_loop.py).",
    .m_size = -1,
    .m_methods = speedups_methods,
};

static int
intern(PyObject **slot, const char *s)
{
    *slot = PyUnicode_InternFromString(s);
    return *slot == NULL ? -1 : 0;
}

static int
check_deque_size(void)
{
    /* Py_SIZE(deque) is its length in CPython (PyObject_VAR_HEAD); check. */
    PyObject *d = PyObject_CallNoArgs((PyObject *)deque_type);
    if (d == NULL) {
        return -1;
    }
    int ok = 1;
    for (int i = 0; i < 3 && ok; i++) {
        PyObject *r = PyObject_CallMethod(d, "append", "O", Py_None);
        if (r == NULL) {
            Py_DECREF(d);
            return -1;
        }
        Py_DECREF(r);
        ok = Py_SIZE(d) == i + 1;
    }
    Py_DECREF(d);
    deque_size_ok = ok;
    return 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern(&str_context, "context") < 0 || intern(&str_run, "run") < 0 ||
        intern(&str_microtasks, "_microtasks") < 0 || intern(&str_neutral_ctx, "_neutral_ctx") < 0 ||
        intern(&str_report_callback_error, "_report_callback_error") < 0 ||
        intern(&str_report_uncaught, "_report_uncaught") < 0 || intern(&str_get_debug, "get_debug") < 0 ||
        intern(&str_message, "message") < 0 || intern(&str_exception, "exception") < 0 ||
        intern(&str_isolate, "_isolate") < 0 || intern(&str_serve_control, "serve_control") < 0 ||
        intern(&str_check_idle, "_dart_check_idle") < 0 ||
        intern(&str_timer_handles, "_dart_timer_handles") < 0 || intern(&str_discard, "discard") < 0 ||
        intern(&str_add, "add") < 0 || intern(&str_popleft, "popleft") < 0 ||
        intern(&str_run_pending, "_run_pending_immediate_callback") < 0 ||
        intern(&str_mt_append, "_mt_append") < 0 || intern(&str_runner, "_dart_runner") < 0 ||
        intern(&str_keep_unwinding, "_dart_keep_while_unwinding") < 0 ||
        intern(&str_call_soon, "call_soon") < 0 || intern(&str_cancelled, "cancelled") < 0 ||
        intern(&str_loop, "loop") < 0 || intern(&str_relay_port, "relay_port") < 0 ||
        intern(&str_relay_box, "relay_box") < 0 || intern(&str_oob, "oob") < 0 ||
        intern(&str_resume_caps, "resume_caps") < 0 || intern(&str_held, "held") < 0 ||
        intern(&str_hold_message, "_hold_message") < 0 || intern(&str_pop, "pop") < 0 ||
        intern(&str_isolate_attr, "isolate") < 0 || intern(&str_handler, "handler") < 0 ||
        intern(&str_target, "_dartloop_target") < 0 || intern(&str_proxy_loop, "_dartloop_loop") < 0 ||
        intern(&str_core, "_core") < 0 || intern(&str_closed, "closed") < 0 ||
        intern(&str_thread_id, "thread_id") < 0 || intern(&str_deliver, "_deliver") < 0 ||
        intern(&str_relay, "relay") < 0 || intern(&str_inbox, "inbox") < 0 ||
        intern(&str_inbox_scheduled, "inbox_scheduled") < 0 ||
        intern(&str_call_soon_threadsafe, "call_soon_threadsafe") < 0 ||
        intern(&str_drain_inbox, "_drain_inbox") < 0 || intern(&str_extend, "extend") < 0 ||
        intern(&str_inbox_drain, "inbox_drain") < 0 || intern(&str_getattribute, "__getattribute__") < 0) {
        return NULL;
    }
    str_exc_in_microtask = PyUnicode_FromString("Exception in microtask ");
    if (str_exc_in_microtask == NULL) {
        return NULL;
    }
    kwnames_context = PyTuple_Pack(1, str_context);
    if (kwnames_context == NULL) {
        return NULL;
    }

    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL) {
        return NULL;
    }
    deque_type = (PyTypeObject *)PyObject_GetAttrString(collections, "deque");
    Py_DECREF(collections);
    if (deque_type == NULL) {
        return NULL;
    }
    if (!PyType_Check(deque_type)) {
        PyErr_SetString(PyExc_ImportError, "collections.deque is not a type");
        return NULL;
    }
    deque_popleft = PyObject_GetAttrString((PyObject *)deque_type, "popleft");
    deque_append = deque_popleft == NULL ? NULL : PyObject_GetAttrString((PyObject *)deque_type, "append");
    if (deque_append == NULL || check_deque_size() < 0) {
        return NULL;
    }

    PyObject *events = PyImport_ImportModule("asyncio.events");
    if (events == NULL) {
        return NULL;
    }
    get_running_loop = PyObject_GetAttrString(events, "_get_running_loop");
    Py_DECREF(events);
    if (get_running_loop == NULL) {
        return NULL;
    }

    if (PyType_Ready(&EventRunner_Type) < 0 || PyType_Ready(&LoopMethod_Type) < 0 ||
        PyType_Ready(&TimerEvent_Type) < 0 || PyType_Ready(&TimerBatch_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "EventRunner", (PyObject *)&EventRunner_Type) < 0 ||
        PyModule_AddObjectRef(m, "LoopMethod", (PyObject *)&LoopMethod_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
