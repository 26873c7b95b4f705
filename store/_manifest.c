/* Manifest records decoded in C: the loop of store/manifest.py's decode_records.
 *
 * Every command that reads a snapshot decodes its manifest, one record per
 * path; in Python the struct unpacking and slicing cost more than building
 * the Record and Entry themselves (1.2 us a record in all, 0.7 here).  This
 * module does the parsing and calls the two classes it is given, so the
 * objects are exactly those the Python decoder builds.  The layout is
 * store/FORMAT.md's "Manifest"; the Python decoder stays the reference, and
 * the tests hold the two to the same results on random and damaged input.
 *
 *   decode(buf, record_cls, entry_cls, delete_op, max_type) -> (records, bytes consumed)
 *   ops run from 0 to delete_op (the last), entry types from 0 to max_type;
 *   raises ValueError("unknown manifest record op N") or ("unknown entry type N").
 *
 * It also holds the merge of two sorted record streams that resolves snapshot
 * chains (store/chain.py's _merge, which stays the reference): a chain of a
 * day of differentials that each list every file of a database passes each
 * record through several merges, at every backup, restore and listing.
 *
 *   Merge(lower, upper, lower_is_full, record_cls, entry_op, fresh_op, delete_op) -> iterator of records
 *
 * And the look-up of one path in a run of records, by their heads alone (locate, below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define HEAD_SIZE 5   /* op u8, path length u32 */
#define BODY_SIZE 67  /* type, flags, mode, uid, gid, mtime, size, ctime, ino, dev, rdev; target and digest lengths */

static uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t u64(const unsigned char *p) { return (uint64_t)u32(p) | (uint64_t)u32(p + 4) << 32; }

#define NFIELDS 16
#define F_XATTRS 4  /* record flag: extended attributes follow the chunk ids (store/manifest.py) */

/* How the two classes are built.  Calling them runs Python code per record (a dataclass's __init__,
 * a named tuple's __new__), a third of the decoding time.  Where Record is a plain subclass of tuple
 * and Entry's fields are all slots (as they are), the objects are allocated and filled here, as those
 * two functions would fill them; any other classes are called. */
typedef struct {
    PyObject *record_cls, *entry_cls;
    int direct;
    Py_ssize_t offsets[NFIELDS];
} builders;

static const char *const FIELD_NAMES[NFIELDS] = {
    "path", "type", "mode", "uid", "gid", "mtime_ns", "size", "ctime_ns", "ino", "dev", "rdev", "target",
    "digest", "chunks", "flags", "xattrs",
};

static int slot_offset(PyObject *cls, const char *name, Py_ssize_t *offset) {
    PyObject *d = PyObject_GetAttrString(cls, name);
    if (d == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX
             && !(((PyMemberDescrObject *)d)->d_member->flags & READONLY);
    if (ok)
        *offset = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return ok;
}

static void builders_for(builders *b, PyObject *record_cls, PyObject *entry_cls) {
    b->record_cls = record_cls;
    b->entry_cls = entry_cls;
    b->direct = 0;
    if (!PyType_Check(record_cls) || !PyType_Check(entry_cls))
        return;
    PyTypeObject *rt = (PyTypeObject *)record_cls, *et = (PyTypeObject *)entry_cls;
    if (!PyType_IsSubtype(rt, &PyTuple_Type) || rt->tp_basicsize != PyTuple_Type.tp_basicsize
        || rt->tp_itemsize != PyTuple_Type.tp_itemsize || rt->tp_dictoffset || rt->tp_weaklistoffset)
        return;
    PyObject *init = PyObject_GetAttrString(entry_cls, "__post_init__");  /* a dataclass hook: call then */
    if (init != NULL) {
        Py_DECREF(init);
        return;
    }
    PyErr_Clear();
    if (et->tp_dictoffset || et->tp_new != PyBaseObject_Type.tp_new)
        return;
    for (int i = 0; i < NFIELDS; i++)
        if (!slot_offset(entry_cls, FIELD_NAMES[i], &b->offsets[i]))
            return;
    b->direct = 1;
}

/* Record(op, path, entry) with the references to op, path and entry stolen; NULL on error. */
static PyObject *record(const builders *b, PyObject *op, PyObject *path, PyObject *entry) {
    PyObject *rec = NULL;
    if (op && path && entry) {
        if (b->direct) {
            PyTypeObject *rt = (PyTypeObject *)b->record_cls;
            rec = rt->tp_alloc(rt, 3);
            if (rec != NULL) {
                PyTuple_SET_ITEM(rec, 0, op);
                PyTuple_SET_ITEM(rec, 1, path);
                PyTuple_SET_ITEM(rec, 2, entry);
                return rec;
            }
        } else {
            PyObject *args[3] = {op, path, entry};
            rec = PyObject_Vectorcall(b->record_cls, args, 3, NULL);
        }
    }
    Py_XDECREF(op);
    Py_XDECREF(path);
    Py_XDECREF(entry);
    return rec;
}

/* Entry(path, type, mode, uid, gid, mtime, size, ctime, ino, dev, rdev, target, digest, chunks, flags,
 * xattrs); the wire-only F_XATTRS bit is not kept in flags. */
static PyObject *entry(const builders *bs, PyObject *path, const unsigned char *b, const unsigned char *target,
                       uint32_t tlen, const unsigned char *digest, unsigned dlen, const unsigned char *chunks,
                       Py_ssize_t clen, const unsigned char *xattrs, uint32_t xlen) {
    PyObject *args[NFIELDS] = {
        path,
        PyLong_FromUnsignedLong(b[0]),
        PyLong_FromUnsignedLong(u32(b + 2)),
        PyLong_FromUnsignedLong(u32(b + 6)),
        PyLong_FromUnsignedLong(u32(b + 10)),
        PyLong_FromLongLong((long long)u64(b + 14)),
        PyLong_FromUnsignedLongLong(u64(b + 22)),
        PyLong_FromLongLong((long long)u64(b + 30)),
        PyLong_FromUnsignedLongLong(u64(b + 38)),
        PyLong_FromUnsignedLongLong(u64(b + 46)),
        PyLong_FromUnsignedLongLong(u64(b + 54)),
        PyBytes_FromStringAndSize((const char *)target, tlen),
        PyBytes_FromStringAndSize((const char *)digest, dlen),
        PyBytes_FromStringAndSize((const char *)chunks, clen),
        PyLong_FromUnsignedLong(b[1] & ~F_XATTRS),
        PyBytes_FromStringAndSize((const char *)xattrs, xlen),
    };
    PyObject *e = NULL;
    int ok = 1;
    for (int i = 1; i < NFIELDS; i++)
        ok = ok && args[i] != NULL;
    if (ok && bs->direct) {
        PyTypeObject *et = (PyTypeObject *)bs->entry_cls;
        e = et->tp_alloc(et, 0);
        if (e != NULL) {
            Py_INCREF(path);
            for (int i = 0; i < NFIELDS; i++)  /* the references made above go to the slots */
                *(PyObject **)((char *)e + bs->offsets[i]) = args[i];
            return e;
        }
    } else if (ok) {
        e = PyObject_Vectorcall(bs->entry_cls, args, NFIELDS, NULL);
    }
    for (int i = 1; i < NFIELDS; i++)
        Py_XDECREF(args[i]);
    return e;
}

/* The head of the record at ``pos``: 1 with its op and path length where the head and path lie in ``buf``, 0 where
 * ``buf`` ends first, -1 (ValueError set) for an op after ``delete_op``. */
static int record_head(const unsigned char *buf, Py_ssize_t n, Py_ssize_t pos, long delete_op, unsigned *op,
                       uint32_t *plen) {
    if (n - pos < HEAD_SIZE)
        return 0;
    *op = buf[pos];
    *plen = u32(buf + pos + 1);
    if ((long)*op > delete_op) {
        PyErr_Format(PyExc_ValueError, "unknown manifest record op %u", *op);
        return -1;
    }
    return n - pos - HEAD_SIZE >= (Py_ssize_t)*plen;
}

/* The end of the record at ``pos`` of an entry op (its head and path read), or -1 where ``buf`` ends first. */
static Py_ssize_t entry_end(const unsigned char *buf, Py_ssize_t n, Py_ssize_t pos) {
    if (n - pos < BODY_SIZE)
        return -1;
    const unsigned char *body = buf + pos;
    uint64_t end = (uint64_t)pos + BODY_SIZE + u32(body + 62) + body[66];
    if (end + 4 > (uint64_t)n)
        return -1;
    end += 4 + (uint64_t)u32(buf + end) * 32;
    if (body[1] & F_XATTRS) {
        if (end + 4 > (uint64_t)n)
            return -1;
        end += 4 + (uint64_t)u32(buf + end);
    }
    return end > (uint64_t)n ? -1 : (Py_ssize_t)end;
}

static PyObject *decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "decode takes 5 arguments");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    builders bs;
    builders_for(&bs, args[1], args[2]);
    long delete_op = PyLong_AsLong(args[3]), max_type = PyLong_AsLong(args[4]);
    PyObject *out = PyErr_Occurred() ? NULL : PyList_New(0);
    const unsigned char *buf = view.buf;
    Py_ssize_t n = view.len, pos = 0, start = 0;
    while (out != NULL) {
        start = pos;
        unsigned op;
        uint32_t plen;
        int whole = record_head(buf, n, pos, delete_op, &op, &plen);
        if (whole <= 0) {
            if (whole < 0)
                Py_CLEAR(out);
            break;
        }
        const unsigned char *path_at = buf + pos + HEAD_SIZE;
        pos += HEAD_SIZE + (Py_ssize_t)plen;
        PyObject *rec;
        if ((long)op == delete_op) {
            PyObject *path = PyBytes_FromStringAndSize((const char *)path_at, plen);
            rec = record(&bs, PyLong_FromUnsignedLong(op), path, Py_NewRef(Py_None));
        } else {
            Py_ssize_t end = entry_end(buf, n, pos);
            if (end < 0)
                break;
            /* entry_end has checked every length below against the buffer */
            const unsigned char *body = buf + pos, *target = body + BODY_SIZE;
            uint32_t tlen = u32(body + 62);
            unsigned dlen = body[66];
            const unsigned char *digest = target + tlen, *chunks = digest + dlen + 4;
            Py_ssize_t clen = (Py_ssize_t)u32(digest + dlen) * 32;
            const unsigned char *xattrs = NULL;
            uint32_t xlen = 0;
            if (body[1] & F_XATTRS) {
                xlen = u32(chunks + clen);
                xattrs = chunks + clen + 4;
            }
            pos = end;
            if ((long)body[0] > max_type) {
                PyErr_Format(PyExc_ValueError, "unknown entry type %u", body[0]);
                Py_CLEAR(out);
                break;
            }
            PyObject *path = PyBytes_FromStringAndSize((const char *)path_at, plen);
            PyObject *e = path ? entry(&bs, path, body, target, tlen, digest, dlen, chunks, clen, xattrs, xlen)
                               : NULL;
            rec = record(&bs, PyLong_FromUnsignedLong(op), Py_XNewRef(path), e);
            Py_XDECREF(path);
        }
        if (rec == NULL || PyList_Append(out, rec) < 0) {
            Py_XDECREF(rec);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(rec);
    }
    PyBuffer_Release(&view);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", out, start);
}


/* --- merging two sorted record streams (store/chain.py's _merge) ----------------------------------- */

/* Paths compare as their sort keys do (store/manifest.py's sort_key: every "/" read as a zero byte). */
static inline unsigned char key_byte(unsigned char c) { return c == '/' ? 0 : c; }

static int raw_key_compare(const unsigned char *p, Py_ssize_t n, const unsigned char *q, Py_ssize_t m) {
    Py_ssize_t k = n < m ? n : m;
    for (Py_ssize_t i = 0; i < k; i++) {
        unsigned char x = key_byte(p[i]), y = key_byte(q[i]);
        if (x != y)
            return x < y ? -1 : 1;
    }
    return n < m ? -1 : n > m;
}

static int key_compare(PyObject *a, PyObject *b) {
    return raw_key_compare((const unsigned char *)PyBytes_AS_STRING(a), PyBytes_GET_SIZE(a),
                           (const unsigned char *)PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
}

/* locate(buf, path, delete_op) -> (status, start, end): the records of ``buf`` passed over by their heads
 * alone, none decoded, until the one of ``path`` (status 0, its bytes start..end), one sorting after it
 * (1: it is not there; start where that one begins) or the end of ``buf`` (2: start where the record it
 * ends inside begins, or its length).  A look-up of one path decoded every record of a blob before it. */
static PyObject *locate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "locate takes 3 arguments");
        return NULL;
    }
    Py_buffer view, want;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &want, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    long delete_op = PyLong_AsLong(args[2]);
    int status = 2;
    Py_ssize_t n = view.len, pos = 0, start = 0, end = 0;
    const unsigned char *buf = view.buf;
    while (!PyErr_Occurred()) {
        start = pos;
        unsigned op;
        uint32_t plen;
        if (record_head(buf, n, pos, delete_op, &op, &plen) <= 0)
            break;
        int order = raw_key_compare(buf + pos + HEAD_SIZE, plen, want.buf, want.len);
        if (order > 0) {
            status = 1;
            end = start;
            break;
        }
        pos += HEAD_SIZE + (Py_ssize_t)plen;
        if ((long)op != delete_op && (pos = entry_end(buf, n, pos)) < 0)
            break;
        if (order == 0) {
            status = 0;
            end = pos;
            break;
        }
    }
    if (status == 2)
        end = start;
    PyBuffer_Release(&view);
    PyBuffer_Release(&want);
    if (PyErr_Occurred())
        return NULL;
    return Py_BuildValue("(inn)", status, start, end);
}

/* chain.py's _under: the path is ``cut`` or lies below it. */
static int key_under(PyObject *path, PyObject *cut) {
    Py_ssize_t n = PyBytes_GET_SIZE(path), m = PyBytes_GET_SIZE(cut);
    if (n < m)
        return 0;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(path), *q = (const unsigned char *)PyBytes_AS_STRING(cut);
    for (Py_ssize_t i = 0; i < m; i++)
        if (key_byte(p[i]) != key_byte(q[i]))
            return 0;
    return n == m || key_byte(p[m]) == 0;
}

typedef struct {
    PyObject_HEAD
    PyObject *lo_it, *up_it;  /* NULL once exhausted */
    PyObject *lo, *up;        /* the current record of each, NULL at its end */
    PyObject *cut;            /* the path of an upper DELETE/FRESH whose lower subtree is dropped, or NULL */
    PyObject *record_cls;
    long entry_op, fresh_op, delete_op;
    int lower_is_full, direct, started;
    int advance_lo, advance_up;  /* taken at the next call, as the generator advances after it yields */
} Merge;

static int merge_traverse(Merge *m, visitproc visit, void *arg) {
    Py_VISIT(m->lo_it);
    Py_VISIT(m->up_it);
    Py_VISIT(m->lo);
    Py_VISIT(m->up);
    Py_VISIT(m->cut);
    Py_VISIT(m->record_cls);
    return 0;
}

static int merge_clear(Merge *m) {
    Py_CLEAR(m->lo_it);
    Py_CLEAR(m->up_it);
    Py_CLEAR(m->lo);
    Py_CLEAR(m->up);
    Py_CLEAR(m->cut);
    Py_CLEAR(m->record_cls);
    return 0;
}

static void merge_dealloc(Merge *m) {
    PyObject_GC_UnTrack(m);
    merge_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

/* The next record of ``*it`` into ``*cur`` (NULL at the end); -1 on error.  A record is a tuple
 * (op, path, entry) with a bytes path. */
static int step(PyObject **it, PyObject **cur) {
    Py_CLEAR(*cur);
    if (*it == NULL)
        return 0;
    PyObject *rec = PyIter_Next(*it);
    if (rec == NULL) {
        Py_CLEAR(*it);
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(rec, 1))
        || !PyLong_Check(PyTuple_GET_ITEM(rec, 0))) {
        Py_DECREF(rec);
        PyErr_SetString(PyExc_TypeError, "Merge takes records (op, path, entry) with bytes paths");
        return -1;
    }
    *cur = rec;
    return 0;
}

static long op_of(PyObject *rec) { return PyLong_AsLong(PyTuple_GET_ITEM(rec, 0)); }

static PyObject *path_of(PyObject *rec) { return PyTuple_GET_ITEM(rec, 1); }

/* Record(op, rec's path, rec's entry), a new reference. */
static PyObject *retyped(Merge *m, PyObject *rec, long op) {
    PyObject *code = PyLong_FromLong(op);
    if (code == NULL)
        return NULL;
    PyObject *path = PyTuple_GET_ITEM(rec, 1), *e = PyTuple_GET_ITEM(rec, 2);
    if (m->direct) {
        PyTypeObject *rt = (PyTypeObject *)m->record_cls;
        PyObject *out = rt->tp_alloc(rt, 3);
        if (out == NULL) {
            Py_DECREF(code);
            return NULL;
        }
        PyTuple_SET_ITEM(out, 0, code);
        PyTuple_SET_ITEM(out, 1, Py_NewRef(path));
        PyTuple_SET_ITEM(out, 2, Py_NewRef(e));
        return out;
    }
    PyObject *args[3] = {code, path, e};
    PyObject *out = PyObject_Vectorcall(m->record_cls, args, 3, NULL);
    Py_DECREF(code);
    return out;
}

static PyObject *merge_next(Merge *m) {
    if (!m->started) {
        m->started = 1;
        if (step(&m->lo_it, &m->lo) < 0 || step(&m->up_it, &m->up) < 0)
            return NULL;
    }
    if (m->advance_lo) {
        m->advance_lo = 0;
        if (step(&m->lo_it, &m->lo) < 0)
            return NULL;
    }
    if (m->advance_up) {
        m->advance_up = 0;
        if (step(&m->up_it, &m->up) < 0)
            return NULL;
    }
    while (m->lo != NULL || m->up != NULL) {
        if (m->up == NULL || (m->lo != NULL && key_compare(path_of(m->lo), path_of(m->up)) < 0)) {
            if (m->cut != NULL && key_under(path_of(m->lo), m->cut)) {
                if (step(&m->lo_it, &m->lo) < 0)
                    return NULL;
                continue;
            }
            Py_CLEAR(m->cut);
            m->advance_lo = 1;
            return Py_NewRef(m->lo);
        }
        PyObject *rec = m->up, *path = path_of(rec);
        int same = m->lo != NULL && key_compare(path_of(m->lo), path) == 0;
        long op = op_of(rec);
        if (op == -1 && PyErr_Occurred())
            return NULL;
        if (m->cut != NULL && !key_under(path, m->cut))
            Py_CLEAR(m->cut);
        if (m->cut == NULL && (op == m->delete_op || op == m->fresh_op))
            m->cut = Py_NewRef(path);
        PyObject *out = NULL;
        if (m->lower_is_full) {
            if (op == m->entry_op)
                out = Py_NewRef(rec);
            else if (op != m->delete_op && (out = retyped(m, rec, m->entry_op)) == NULL)
                return NULL;
        } else if (op == m->entry_op && same) {
            long lo_op = op_of(m->lo);
            if (lo_op == -1 && PyErr_Occurred())
                return NULL;
            out = lo_op == m->delete_op || lo_op == m->fresh_op ? retyped(m, rec, m->fresh_op) : Py_NewRef(rec);
            if (out == NULL)
                return NULL;
        } else {
            out = Py_NewRef(rec);
        }
        if (out != NULL) {
            m->advance_lo = same;
            m->advance_up = 1;
            return out;
        }
        if ((same && step(&m->lo_it, &m->lo) < 0) || step(&m->up_it, &m->up) < 0)
            return NULL;
    }
    return NULL;
}

static PyObject *merge_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *lower, *upper, *record_cls;
    int lower_is_full;
    long entry_op, fresh_op, delete_op;
    static char *names[] = {"lower", "upper", "lower_is_full", "record_cls", "entry_op", "fresh_op", "delete_op",
                            NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOpOlll", names, &lower, &upper, &lower_is_full, &record_cls,
                                     &entry_op, &fresh_op, &delete_op))
        return NULL;
    PyObject *lo_it = PyObject_GetIter(lower);
    if (lo_it == NULL)
        return NULL;
    PyObject *up_it = PyObject_GetIter(upper);
    if (up_it == NULL) {
        Py_DECREF(lo_it);
        return NULL;
    }
    Merge *m = (Merge *)type->tp_alloc(type, 0);
    if (m == NULL) {
        Py_DECREF(lo_it);
        Py_DECREF(up_it);
        return NULL;
    }
    m->lo_it = lo_it;
    m->up_it = up_it;
    m->record_cls = Py_NewRef(record_cls);
    m->entry_op = entry_op;
    m->fresh_op = fresh_op;
    m->delete_op = delete_op;
    m->lower_is_full = lower_is_full;
    PyTypeObject *rt = PyType_Check(record_cls) ? (PyTypeObject *)record_cls : NULL;
    m->direct = rt != NULL && PyType_IsSubtype(rt, &PyTuple_Type) && rt->tp_basicsize == PyTuple_Type.tp_basicsize
                && rt->tp_itemsize == PyTuple_Type.tp_itemsize && !rt->tp_dictoffset && !rt->tp_weaklistoffset
                && rt->tp_new == PyTuple_Type.tp_new;
    return (PyObject *)m;
}

static PyTypeObject MergeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.store._manifest.Merge",
    .tp_basicsize = sizeof(Merge),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Merge(lower, upper, lower_is_full, record_cls, entry_op, fresh_op, delete_op): store/chain.py's _merge",
    .tp_new = merge_new,
    .tp_dealloc = (destructor)merge_dealloc,
    .tp_traverse = (traverseproc)merge_traverse,
    .tp_clear = (inquiry)merge_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)merge_next,
};

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(buf, record_cls, entry_cls, delete_op, max_type) -> (records, bytes consumed)"},
    {"locate", (PyCFunction)(void (*)(void))locate, METH_FASTCALL,
     "locate(buf, path, delete_op) -> (0 found, 1 not there or 2 buf ends first; start, end)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_manifest", "Manifest records decoded in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__manifest(void) {
    if (PyType_Ready(&MergeType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL && PyModule_AddObjectRef(mod, "Merge", (PyObject *)&MergeType) < 0)
        Py_CLEAR(mod);
    return mod;
}
