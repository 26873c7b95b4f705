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

#define NFIELDS 15

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
    "digest", "chunks", "flags",
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

/* Entry(path, type, mode, uid, gid, mtime, size, ctime, ino, dev, rdev, target, digest, chunks, flags). */
static PyObject *entry(const builders *bs, PyObject *path, const unsigned char *b, const unsigned char *target,
                       uint32_t tlen, const unsigned char *digest, unsigned dlen, const unsigned char *chunks,
                       Py_ssize_t clen) {
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
        PyLong_FromUnsignedLong(b[1]),
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
        if (n - pos < HEAD_SIZE)
            break;
        unsigned op = buf[pos];
        uint32_t plen = u32(buf + pos + 1);
        if ((long)op > delete_op) {
            PyErr_Format(PyExc_ValueError, "unknown manifest record op %u", op);
            Py_CLEAR(out);
            break;
        }
        pos += HEAD_SIZE;
        if (n - pos < (Py_ssize_t)plen)
            break;
        const unsigned char *path_at = buf + pos;
        pos += plen;
        PyObject *rec;
        if ((long)op == delete_op) {
            PyObject *path = PyBytes_FromStringAndSize((const char *)path_at, plen);
            rec = record(&bs, PyLong_FromUnsignedLong(op), path, Py_NewRef(Py_None));
        } else {
            if (n - pos < BODY_SIZE)
                break;
            const unsigned char *body = buf + pos;
            uint32_t tlen = u32(body + 62);
            unsigned dlen = body[66];
            pos += BODY_SIZE;
            if (n - pos < (Py_ssize_t)tlen + (Py_ssize_t)dlen + 4)
                break;
            const unsigned char *target = buf + pos, *digest = target + tlen;
            pos += (Py_ssize_t)tlen + dlen;
            uint32_t count = u32(buf + pos);
            pos += 4;
            if ((uint64_t)(n - pos) < (uint64_t)count * 32)
                break;
            const unsigned char *chunks = buf + pos;
            pos += (Py_ssize_t)count * 32;
            if ((long)body[0] > max_type) {
                PyErr_Format(PyExc_ValueError, "unknown entry type %u", body[0]);
                Py_CLEAR(out);
                break;
            }
            PyObject *path = PyBytes_FromStringAndSize((const char *)path_at, plen);
            PyObject *e = path ? entry(&bs, path, body, target, tlen, digest, dlen, chunks,
                                       (Py_ssize_t)count * 32) : NULL;
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

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(buf, record_cls, entry_cls, delete_op, max_type) -> (records, bytes consumed)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_manifest", "Manifest records decoded in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__manifest(void) { return PyModule_Create(&module); }
