/* One directory's entries, sorted, each with its lstat fields, read with the GIL released.
 *
 * A backup of an unchanged tree is its walk: a listdir per directory and an
 * lstat per entry, each a Python call that takes and releases the GIL and
 * builds an os.stat_result.  Here a whole directory costs one call.
 *
 *   scan(path: bytes) -> list of (name: bytes, error: int, fields: tuple | None)
 *       names sorted as Python sorts bytes; error is the errno of the entry's
 *       lstat (0 when it worked); fields are (mode, ino, dev, nlink, uid, gid,
 *       size, mtime_ns, ctime_ns, rdev).  OSError when the directory cannot
 *       be opened or read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef __APPLE__
#define MTIME(st) ((st).st_mtimespec)
#define CTIME(st) ((st).st_ctimespec)
#else
#define MTIME(st) ((st).st_mtim)
#define CTIME(st) ((st).st_ctim)
#endif

typedef struct {
    char *name;
    size_t len;
    int error;
    struct stat st;
} item;

static int by_name(const void *a, const void *b) {
    const item *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->name, y->name, n);
    if (c)
        return c;
    return (x->len > y->len) - (x->len < y->len);
}

static void release(item *items, size_t n) {
    for (size_t i = 0; i < n; i++)
        free(items[i].name);
    free(items);
}

/* Read, sort and lstat; 0, or an errno with nothing left allocated. */
static int read_dir(const char *path, item **out, size_t *count) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    DIR *d = fdopendir(fd);
    if (d == NULL) {
        int e = errno;
        close(fd);
        return e;
    }
    size_t n = 0, cap = 64;
    item *items = malloc(cap * sizeof(item));
    int err = items ? 0 : ENOMEM;
    struct dirent *de;
    while (!err) {
        errno = 0;
        de = readdir(d);
        if (de == NULL) {
            err = errno;
            break;
        }
        const char *nm = de->d_name;
        if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0)))
            continue;
        if (n == cap) {
            item *grown = realloc(items, 2 * cap * sizeof(item));
            if (grown == NULL) {
                err = ENOMEM;
                break;
            }
            items = grown;
            cap *= 2;
        }
        items[n].len = strlen(nm);
        items[n].name = malloc(items[n].len + 1);
        if (items[n].name == NULL) {
            err = ENOMEM;
            break;
        }
        memcpy(items[n].name, nm, items[n].len + 1);
        n++;
    }
    if (!err) {
        qsort(items, n, sizeof(item), by_name);
        for (size_t i = 0; i < n; i++)
            items[i].error = fstatat(fd, items[i].name, &items[i].st, AT_SYMLINK_NOFOLLOW) ? errno : 0;
    }
    closedir(d);
    if (err) {
        if (items)
            release(items, n);
        return err;
    }
    *out = items;
    *count = n;
    return 0;
}

static PyObject *fields(const struct stat *st) {
    long long mtime = (long long)MTIME(*st).tv_sec * 1000000000LL + MTIME(*st).tv_nsec;
    long long ctime = (long long)CTIME(*st).tv_sec * 1000000000LL + CTIME(*st).tv_nsec;
    return Py_BuildValue("(kKKKkkLLLK)", (unsigned long)st->st_mode, (unsigned long long)st->st_ino,
                         (unsigned long long)st->st_dev, (unsigned long long)st->st_nlink,
                         (unsigned long)st->st_uid, (unsigned long)st->st_gid, (long long)st->st_size, mtime,
                         ctime, (unsigned long long)st->st_rdev);
}

static PyObject *scan(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *encoded = NULL;
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    item *items = NULL;
    size_t n = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = read_dir(PyBytes_AS_STRING(encoded), &items, &n);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
        Py_DECREF(encoded);
        return NULL;
    }
    Py_DECREF(encoded);
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out != NULL && i < n; i++) {
        PyObject *st = items[i].error ? Py_NewRef(Py_None) : fields(&items[i].st);
        PyObject *entry = st ? Py_BuildValue("(y#iN)", items[i].name, (Py_ssize_t)items[i].len, items[i].error, st)
                             : NULL;
        if (entry == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, entry);
    }
    release(items, n);
    return out;
}

/* --- the whole tree: Walker ---------------------------------------------------------
 *
 * A directory's subtree in manifest order (depth first, names sorted), many
 * directories per call.  SourceWalk walks ahead on a thread while the backup
 * starts up (imports, index, parent manifest); a call per directory needed
 * the GIL thousands of times and got it only when the busy main thread let
 * go of it (every few milliseconds), so the walk ahead crawled.  A Walker
 * call lists and stats up to max_entries entries with the GIL released and
 * takes the GIL once to hand them over.
 *
 *   Walker(rel: bytes, path: bytes)  the directory at path, recorded as rel
 *   .batch(max_entries) -> list of (rel, path, stat | None, errno, list_errno)
 *       the first item is the root itself, with stat None; errno is the
 *       entry's lstat error (stat is None then); list_errno is a directory's
 *       listing error (0 for other entries); [] once the walk is done.
 *   Stat: the lstat fields a backup records (st_mode, st_ino, st_dev,
 *       st_nlink, st_uid, st_gid, st_size, st_mtime_ns, st_ctime_ns, st_rdev).
 */

typedef struct {
    PyObject_HEAD
    unsigned long long mode, ino, dev, nlink, uid, gid, rdev;
    long long size, mtime_ns, ctime_ns;
} StatObject;

static PyMemberDef stat_members[] = {
    {"st_mode", T_ULONGLONG, offsetof(StatObject, mode), READONLY, NULL},
    {"st_ino", T_ULONGLONG, offsetof(StatObject, ino), READONLY, NULL},
    {"st_dev", T_ULONGLONG, offsetof(StatObject, dev), READONLY, NULL},
    {"st_nlink", T_ULONGLONG, offsetof(StatObject, nlink), READONLY, NULL},
    {"st_uid", T_ULONGLONG, offsetof(StatObject, uid), READONLY, NULL},
    {"st_gid", T_ULONGLONG, offsetof(StatObject, gid), READONLY, NULL},
    {"st_size", T_LONGLONG, offsetof(StatObject, size), READONLY, NULL},
    {"st_mtime_ns", T_LONGLONG, offsetof(StatObject, mtime_ns), READONLY, NULL},
    {"st_ctime_ns", T_LONGLONG, offsetof(StatObject, ctime_ns), READONLY, NULL},
    {"st_rdev", T_ULONGLONG, offsetof(StatObject, rdev), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StatType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.store._scandir.Stat",
    .tp_basicsize = sizeof(StatObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The lstat fields a backup records.",
    .tp_members = stat_members,
};

static PyObject *new_stat(const struct stat *st) {
    StatObject *s = PyObject_New(StatObject, &StatType);
    if (s == NULL)
        return NULL;
    s->mode = st->st_mode;
    s->ino = st->st_ino;
    s->dev = st->st_dev;
    s->nlink = st->st_nlink;
    s->uid = st->st_uid;
    s->gid = st->st_gid;
    s->rdev = st->st_rdev;
    s->size = st->st_size;
    s->mtime_ns = (long long)MTIME(*st).tv_sec * 1000000000LL + MTIME(*st).tv_nsec;
    s->ctime_ns = (long long)CTIME(*st).tv_sec * 1000000000LL + CTIME(*st).tv_nsec;
    return (PyObject *)s;
}

/* A string of bytes that knows its length. */
typedef struct {
    char *s;
    size_t len;
} str;

/* One directory on the walk's stack: its paths (with a trailing "/", or empty for a rel at the top)
 * and its sorted, stat'ed entries, of which the next to emit is items[next]. */
typedef struct {
    str rel, path;
    item *items;
    size_t n, next;
} frame;

/* One entry emitted by a batch, before it becomes a Python tuple. */
typedef struct {
    str rel, path;
    int error, list_error, root;
    struct stat st;
} emitted;

typedef struct {
    PyObject_HEAD
    frame *stack;
    size_t depth, cap;
    str root_rel, root_path;
    int started, busy;
} WalkerObject;

static char *joined(const str *a, const char *b, size_t blen, const char *sep, size_t *len) {
    size_t seplen = strlen(sep);
    char *s = malloc(a->len + blen + seplen + 1);
    if (s == NULL)
        return NULL;
    memcpy(s, a->s, a->len);
    memcpy(s + a->len, b, blen);
    memcpy(s + a->len + blen, sep, seplen + 1);
    *len = a->len + blen + seplen;
    return s;
}

static void pop(WalkerObject *w) {
    frame *f = &w->stack[--w->depth];
    free(f->rel.s);
    free(f->path.s);
    if (f->items)
        release(f->items, f->n);
}

/* Push the directory whose paths are rel_dir/path_dir (both with their separator); its listing's errno,
 * -1 when out of memory.  The strings are the frame's from now on. */
static int push(WalkerObject *w, str rel_dir, str path_dir) {
    if (w->depth == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        frame *grown = realloc(w->stack, cap * sizeof(frame));
        if (grown == NULL) {
            free(rel_dir.s);
            free(path_dir.s);
            return -1;
        }
        w->stack = grown;
        w->cap = cap;
    }
    frame *f = &w->stack[w->depth++];
    f->rel = rel_dir;
    f->path = path_dir;
    f->items = NULL;
    f->n = f->next = 0;
    int err = read_dir(path_dir.s, &f->items, &f->n);
    return err == ENOMEM ? -1 : err;
}

/* Fill out[0..max) with the next entries; how many, or -1 when out of memory. Runs without the GIL. */
static Py_ssize_t walk_some(WalkerObject *w, emitted *out, size_t max) {
    size_t k = 0;
    if (!w->started && max > 0) {
        w->started = 1;
        emitted *e = &out[k++];
        memset(e, 0, sizeof(*e));
        e->root = 1;
        e->rel.s = malloc(w->root_rel.len + 1);
        e->path.s = malloc(w->root_path.len + 1);
        str rel_dir = {NULL, 0}, path_dir = {NULL, 0};
        if (e->rel.s && e->path.s) {
            memcpy(e->rel.s, w->root_rel.s, w->root_rel.len + 1);
            memcpy(e->path.s, w->root_path.s, w->root_path.len + 1);
            e->rel.len = w->root_rel.len;
            e->path.len = w->root_path.len;
            rel_dir.s = w->root_rel.len ? joined(&w->root_rel, "", 0, "/", &rel_dir.len) : calloc(1, 1);
            int slash = w->root_path.len && w->root_path.s[w->root_path.len - 1] == '/';
            path_dir.s = joined(&w->root_path, "", 0, slash ? "" : "/", &path_dir.len);
        }
        if (rel_dir.s == NULL || path_dir.s == NULL) {
            free(rel_dir.s);
            free(path_dir.s);
            return -1;
        }
        e->list_error = push(w, rel_dir, path_dir);
        if (e->list_error < 0)
            return -1;
    }
    while (k < max && w->depth > 0) {
        frame *f = &w->stack[w->depth - 1];
        if (f->next == f->n) {
            pop(w);
            continue;
        }
        item *it = &f->items[f->next++];
        emitted *e = &out[k++];
        memset(e, 0, sizeof(*e));
        e->rel.s = joined(&f->rel, it->name, it->len, "", &e->rel.len);
        e->path.s = joined(&f->path, it->name, it->len, "", &e->path.len);
        if (e->rel.s == NULL || e->path.s == NULL)
            return -1;
        e->error = it->error;
        e->st = it->st;
        if (!it->error && S_ISDIR(it->st.st_mode)) {
            str rel_dir, path_dir;
            rel_dir.s = joined(&e->rel, "", 0, "/", &rel_dir.len);
            path_dir.s = joined(&e->path, "", 0, "/", &path_dir.len);
            if (rel_dir.s == NULL || path_dir.s == NULL) {
                free(rel_dir.s);
                free(path_dir.s);
                return -1;
            }
            e->list_error = push(w, rel_dir, path_dir);
            if (e->list_error < 0)
                return -1;
        }
    }
    return (Py_ssize_t)k;
}

static PyObject *emitted_tuple(const emitted *e) {
    PyObject *st = (e->root || e->error) ? Py_NewRef(Py_None) : new_stat(&e->st);
    if (st == NULL)
        return NULL;
    return Py_BuildValue("(y#y#Nii)", e->rel.s, (Py_ssize_t)e->rel.len, e->path.s, (Py_ssize_t)e->path.len, st,
                         e->error, e->list_error);
}

static PyObject *walker_batch(WalkerObject *w, PyObject *arg) {
    Py_ssize_t max = PyLong_AsSsize_t(arg);
    if (max < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "max_entries must not be negative");
        return NULL;
    }
    if (w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a Walker is used by one thread at a time");
        return NULL;
    }
    emitted *out = max ? calloc((size_t)max, sizeof(emitted)) : NULL;
    if (max && out == NULL)
        return PyErr_NoMemory();
    w->busy = 1;
    Py_ssize_t k;
    Py_BEGIN_ALLOW_THREADS
    k = walk_some(w, out, (size_t)max);
    Py_END_ALLOW_THREADS
    w->busy = 0;
    PyObject *list = NULL;
    if (k < 0) {
        PyErr_NoMemory();
        k = max;  /* free whatever was filled */
    } else {
        list = PyList_New(k);
        for (Py_ssize_t i = 0; list != NULL && i < k; i++) {
            PyObject *t = emitted_tuple(&out[i]);
            if (t == NULL)
                Py_CLEAR(list);
            else
                PyList_SET_ITEM(list, i, t);
        }
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        free(out[i].rel.s);
        free(out[i].path.s);
    }
    free(out);
    return list;
}

static int walker_init(WalkerObject *w, PyObject *args, PyObject *kwds) {
    const char *rel, *path;
    Py_ssize_t rel_len, path_len;
    static char *kwlist[] = {"rel", "path", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y#y#", kwlist, &rel, &rel_len, &path, &path_len))
        return -1;
    if (w->root_rel.s != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Walker is initialised once");
        return -1;
    }
    if (strlen(path) != (size_t)path_len || strlen(rel) != (size_t)rel_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return -1;
    }
    w->root_rel.s = malloc((size_t)rel_len + 1);
    w->root_path.s = malloc((size_t)path_len + 1);
    if (w->root_rel.s == NULL || w->root_path.s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(w->root_rel.s, rel, (size_t)rel_len + 1);
    memcpy(w->root_path.s, path, (size_t)path_len + 1);
    w->root_rel.len = (size_t)rel_len;
    w->root_path.len = (size_t)path_len;
    return 0;
}

static void walker_dealloc(WalkerObject *w) {
    while (w->depth > 0)
        pop(w);
    free(w->stack);
    free(w->root_rel.s);
    free(w->root_path.s);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef walker_methods[] = {
    {"batch", (PyCFunction)walker_batch, METH_O,
     "batch(max_entries) -> [(rel, path, stat | None, errno, list_errno)]; [] when the walk is done."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.store._scandir.Walker",
    .tp_basicsize = sizeof(WalkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Walker(rel, path): a directory's subtree in manifest order, in batches.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)walker_init,
    .tp_dealloc = (destructor)walker_dealloc,
    .tp_methods = walker_methods,
};

static PyMethodDef methods[] = {
    {"scan", scan, METH_O, "scan(path) -> sorted [(name, errno, lstat fields or None)] of a directory."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scandir", "A directory's sorted entries with their lstat fields.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scandir(void) {
    if (PyType_Ready(&StatType) < 0 || PyType_Ready(&WalkerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Stat", (PyObject *)&StatType) < 0
        || PyModule_AddObjectRef(m, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
