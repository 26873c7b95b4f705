/* Gear-hash content-defined chunking (FastCDC-style) for chunkvault.
 *
 * The per-byte loop lives here; Python only wraps results, once per buffer.
 * The algorithm is specified in chunker/FORMAT.md.  The chunker state between
 * two bytes is just (hash, length of the current chunk), so a stream can be
 * fed in buffers of any size without re-scanning or copying anything, and the
 * cuts equal those of one call over the whole stream.
 *
 * Types:
 *   Cutter(gear: bytes[2048], min_size, max_size, normal_size, mask_s, mask_l)
 *       immutable after construction, so threads may share one; scanning
 *       releases the GIL.
 *     .cut_points(buf) -> bytes   native uint64 end offsets, whole stream
 *     .stream() -> Stream
 *   Stream
 *     .feed(buf) -> bytes         native uint64 lengths of chunks completed
 *     .finish() -> bytes          the last partial chunk's length, if any
 *     .pending                    bytes of the current, unfinished chunk
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define GEAR_WINDOW 64
#define MIN_SIZE_LOWER 64
#define MAX_SIZE_UPPER ((uint64_t)1 << 30)

typedef struct {
    uint64_t gear[256];
    uint64_t min_size, max_size, normal_size, mask_s, mask_l;
} cdc_cfg;

typedef struct {
    uint64_t h;   /* gear hash; 0 until hashing starts at min_size - 64 */
    uint64_t pos; /* bytes already in the current chunk */
} cdc_state;

/* Hash p[0..n) into *hp, stopping after the first byte whose hash has no
 * bit of `mask` set.  Returns bytes consumed; *hit tells whether it stopped. */
static inline size_t
scan_mask(const uint64_t *restrict g, uint64_t *hp, const uint8_t *restrict p, size_t n,
          uint64_t mask, int *hit)
{
    uint64_t h = *hp;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
#define STEP(k)                                  \
        h = (h << 1) + g[p[i + (k)]];            \
        if (__builtin_expect(!(h & mask), 0)) {  \
            i += (k) + 1;                        \
            goto found;                          \
        }
        STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
#undef STEP
    }
    for (; i < n; i++) {
        h = (h << 1) + g[p[i]];
        if (!(h & mask)) {
            i++;
            goto found;
        }
    }
    *hp = h;
    *hit = 0;
    return n;
found:
    *hp = h;
    *hit = 1;
    return i;
}

static inline uint64_t
min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Add bytes p[0..n) to the current chunk.  Returns bytes consumed: all n, or
 * fewer when the chunk ended inside p (then *cut = 1 and the state is reset). */
static size_t
cdc_step(const cdc_cfg *c, cdc_state *st, const uint8_t *p, size_t n, int *cut)
{
    uint64_t pos = st->pos, h = st->h, k;
    size_t i = 0, used;
    int hit;
    const uint64_t hash_from = c->min_size - GEAR_WINDOW;
    const uint64_t last_s = min_u64(c->normal_size, c->max_size - 1);

    *cut = 0;
    /* Lengths up to min_size - 64: no byte there reaches a tested hash. */
    if (pos < hash_from) {
        k = min_u64(hash_from - pos, n);
        i += k;
        pos += k;
    }
    /* Lengths below min_size: hash, no test. */
    if (i < n && pos < c->min_size - 1) {
        k = min_u64(c->min_size - 1 - pos, n - i);
        for (uint64_t j = 0; j < k; j++)
            h = (h << 1) + c->gear[p[i + j]];
        i += k;
        pos += k;
    }
    /* Lengths min_size .. normal_size: the strict mask. */
    if (i < n && pos < last_s) {
        k = min_u64(last_s - pos, n - i);
        used = scan_mask(c->gear, &h, p + i, k, c->mask_s, &hit);
        i += used;
        pos += used;
        if (hit)
            goto cut;
    }
    /* Lengths above normal_size, below max_size: the loose mask. */
    if (i < n && pos < c->max_size - 1) {
        k = min_u64(c->max_size - 1 - pos, n - i);
        used = scan_mask(c->gear, &h, p + i, k, c->mask_l, &hit);
        i += used;
        pos += used;
        if (hit)
            goto cut;
    }
    /* Length max_size: always a cut. */
    if (i < n) {
        i++;
        goto cut;
    }
    st->pos = pos;
    st->h = h;
    return i;
cut:
    st->pos = 0;
    st->h = 0;
    *cut = 1;
    return i;
}

/* Growable array of uint64, allocated without the GIL. */
typedef struct {
    uint64_t *v;
    size_t n, cap;
} u64vec;

static int
vec_push(u64vec *o, uint64_t x)
{
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        uint64_t *v = PyMem_RawRealloc(o->v, cap * sizeof(uint64_t));
        if (!v)
            return -1;
        o->v = v;
        o->cap = cap;
    }
    o->v[o->n++] = x;
    return 0;
}

/* Scan p[0..n) from state st.  Appends end offsets (relative to p) when
 * `lengths` is 0, chunk lengths otherwise.  Returns -1 on out of memory. */
static int
cdc_scan(const cdc_cfg *c, cdc_state *st, const uint8_t *p, size_t n, int lengths, u64vec *out)
{
    size_t off = 0;
    int cut;
    while (off < n) {
        uint64_t before = st->pos;
        size_t used = cdc_step(c, st, p + off, n - off, &cut);
        off += used;
        if (cut && vec_push(out, lengths ? before + used : (uint64_t)off) < 0)
            return -1;
    }
    return 0;
}

static PyObject *
vec_to_bytes(u64vec *v)
{
    PyObject *r = PyBytes_FromStringAndSize((const char *)v->v, (Py_ssize_t)(v->n * sizeof(uint64_t)));
    PyMem_RawFree(v->v);
    v->v = NULL;
    return r;
}

/* Borrow a C-contiguous byte view of any buffer, with a clear error otherwise. */
static int
get_bytes_view(PyObject *obj, Py_buffer *view)
{
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "data must be a bytes-like object, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "data must be a C-contiguous buffer");
        }
        return -1;
    }
    return 0;
}

/* ---- Cutter ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    cdc_cfg cfg;
} CutterObject;

typedef struct {
    PyObject_HEAD
    CutterObject *cutter;
    cdc_state st;
    int busy; /* set while a feed runs without the GIL */
} StreamObject;

static PyTypeObject StreamType;

static int
parse_u64(PyObject *o, const char *name, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be in [0, 2**64)", name);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *
Cutter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"gear", "min_size", "max_size", "normal_size", "mask_s", "mask_l", NULL};
    Py_buffer gear;
    PyObject *o_min, *o_max, *o_normal, *o_ms, *o_ml;
    cdc_cfg cfg;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*OOOOO:Cutter", kwlist, &gear, &o_min, &o_max, &o_normal,
                                     &o_ms, &o_ml))
        return NULL;
    if (gear.len != 256 * 8) {
        PyBuffer_Release(&gear);
        PyErr_SetString(PyExc_ValueError, "gear table must be 2048 bytes");
        return NULL;
    }
    const uint8_t *g = gear.buf;
    for (int i = 0; i < 256; i++) {
        uint64_t v = 0;
        for (int b = 7; b >= 0; b--)
            v = (v << 8) | g[8 * i + b];
        cfg.gear[i] = v; /* little-endian on every host */
    }
    PyBuffer_Release(&gear);
    if (parse_u64(o_min, "min_size", &cfg.min_size) < 0 || parse_u64(o_max, "max_size", &cfg.max_size) < 0 ||
        parse_u64(o_normal, "normal_size", &cfg.normal_size) < 0 || parse_u64(o_ms, "mask_s", &cfg.mask_s) < 0 ||
        parse_u64(o_ml, "mask_l", &cfg.mask_l) < 0)
        return NULL;
    if (cfg.min_size < MIN_SIZE_LOWER || cfg.max_size <= cfg.min_size || cfg.max_size > MAX_SIZE_UPPER) {
        PyErr_SetString(PyExc_ValueError, "need 64 <= min_size < max_size <= 2**30");
        return NULL;
    }
    CutterObject *self = (CutterObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->cfg = cfg;
    return (PyObject *)self;
}

static PyObject *
Cutter_cut_points(CutterObject *self, PyObject *data)
{
    Py_buffer view;
    u64vec out = {NULL, 0, 0};
    cdc_state st = {0, 0};
    int rc;
    if (get_bytes_view(data, &view) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = cdc_scan(&self->cfg, &st, view.buf, (size_t)view.len, 0, &out);
    if (rc == 0 && st.pos > 0)
        rc = vec_push(&out, (uint64_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (rc < 0) {
        PyMem_RawFree(out.v);
        return PyErr_NoMemory();
    }
    return vec_to_bytes(&out);
}

static PyObject *
Cutter_stream(CutterObject *self, PyObject *Py_UNUSED(ignored))
{
    StreamObject *s = PyObject_New(StreamObject, &StreamType);
    if (!s)
        return NULL;
    Py_INCREF(self);
    s->cutter = self;
    s->st.h = 0;
    s->st.pos = 0;
    s->busy = 0;
    return (PyObject *)s;
}

static PyMethodDef Cutter_methods[] = {
    {"cut_points", (PyCFunction)Cutter_cut_points, METH_O,
     "cut_points(data) -> bytes: native uint64 end offsets of every chunk of data as a whole stream."},
    {"stream", (PyCFunction)Cutter_stream, METH_NOARGS, "stream() -> Stream: incremental state for one stream."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CutterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.chunker._fastcdc.Cutter",
    .tp_basicsize = sizeof(CutterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Cutter(gear, min_size, max_size, normal_size, mask_s, mask_l): immutable chunking kernel.",
    .tp_new = Cutter_new,
    .tp_methods = Cutter_methods,
};

/* ---- Stream ---------------------------------------------------------- */

static void
Stream_dealloc(StreamObject *self)
{
    Py_XDECREF(self->cutter);
    PyObject_Free(self);
}

static int
stream_claim(StreamObject *self)
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "stream is being fed by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static PyObject *
Stream_feed(StreamObject *self, PyObject *data)
{
    Py_buffer view;
    u64vec out = {NULL, 0, 0};
    int rc;
    if (get_bytes_view(data, &view) < 0)
        return NULL;
    if (stream_claim(self) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    cdc_state st = self->st;
    Py_BEGIN_ALLOW_THREADS
    rc = cdc_scan(&self->cutter->cfg, &st, view.buf, (size_t)view.len, 1, &out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    self->busy = 0;
    if (rc < 0) {
        /* State unchanged: the caller may retry the same buffer. */
        PyMem_RawFree(out.v);
        return PyErr_NoMemory();
    }
    self->st = st;
    return vec_to_bytes(&out);
}

static PyObject *
Stream_finish(StreamObject *self, PyObject *Py_UNUSED(ignored))
{
    if (stream_claim(self) < 0)
        return NULL;
    uint64_t last = self->st.pos;
    self->st.pos = 0;
    self->st.h = 0;
    self->busy = 0;
    return PyBytes_FromStringAndSize((const char *)&last, last ? (Py_ssize_t)sizeof last : 0);
}

static PyObject *
Stream_get_pending(StreamObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->st.pos);
}

static PyMethodDef Stream_methods[] = {
    {"feed", (PyCFunction)Stream_feed, METH_O, "feed(data) -> bytes: native uint64 lengths of chunks completed."},
    {"finish", (PyCFunction)Stream_finish, METH_NOARGS,
     "finish() -> bytes: the last partial chunk's length, if any; the stream starts afresh."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Stream_getset[] = {
    {"pending", (getter)Stream_get_pending, NULL, "bytes of the current, unfinished chunk", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.chunker._fastcdc.Stream",
    .tp_basicsize = sizeof(StreamObject),
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Chunking state of one stream; made by Cutter.stream().",
    .tp_methods = Stream_methods,
    .tp_getset = Stream_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastcdc", "Gear-hash content-defined chunking kernel.", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastcdc(void)
{
    if (PyType_Ready(&CutterType) < 0 || PyType_Ready(&StreamType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CutterType);
    if (PyModule_AddObject(m, "Cutter", (PyObject *)&CutterType) < 0) {
        Py_DECREF(&CutterType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
