/* A directory's entries, sorted, each with its lstat fields, read with the GIL released:
 * one directory per call (scan), or a whole subtree in batches (Walker, below).
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
 * starts up (imports, index, parent manifest).  A call per directory needed
 * the GIL thousands of times and got it only when the busy main thread let
 * go of it (every few milliseconds), so the walk ahead crawled.  Here the
 * walk ahead is one call that holds no GIL at all, and what it walked waits
 * in a compact queue (about 210 bytes an entry with its path, against 470
 * for the Python objects it becomes) until the backup takes it.
 *
 *   Walker(rel: bytes, path: bytes, excludes=None)  the directory at path, recorded
 *       as rel, leaving out (with their subtrees) entries whose path or name
 *       an exclude pattern matches; a pattern is bytes of literals and "*".
 *   .prefetch(max_entries) -> int    walk up to max_entries more into the queue,
 *       the GIL released throughout; ends early once stop() is called (from
 *       another thread); returns how many entries are queued.
 *   .batch(max_entries) -> list of (rel, path, stat | None, errno, list_errno)
 *       queued entries while there are any, else newly walked ones; [] once
 *       the walk is done.  The first entry is the root itself, with stat None;
 *       errno is an entry's lstat error (stat is None then); list_errno is a
 *       directory's listing error (0 for other entries).
 *   .stop(), .queued
 *   Stat: the lstat fields a backup records (st_mode, st_ino, st_dev,
 *       st_nlink, st_uid, st_gid, st_size, st_mtime_ns, st_ctime_ns, st_rdev).
 */

typedef struct {
    unsigned long long mode, ino, dev, nlink, uid, gid, rdev;
    long long size, mtime_ns, ctime_ns;
} fields_t;

typedef struct {
    PyObject_HEAD
    fields_t f;
} StatObject;

static PyMemberDef stat_members[] = {
    {"st_mode", T_ULONGLONG, offsetof(StatObject, f.mode), READONLY, NULL},
    {"st_ino", T_ULONGLONG, offsetof(StatObject, f.ino), READONLY, NULL},
    {"st_dev", T_ULONGLONG, offsetof(StatObject, f.dev), READONLY, NULL},
    {"st_nlink", T_ULONGLONG, offsetof(StatObject, f.nlink), READONLY, NULL},
    {"st_uid", T_ULONGLONG, offsetof(StatObject, f.uid), READONLY, NULL},
    {"st_gid", T_ULONGLONG, offsetof(StatObject, f.gid), READONLY, NULL},
    {"st_size", T_LONGLONG, offsetof(StatObject, f.size), READONLY, NULL},
    {"st_mtime_ns", T_LONGLONG, offsetof(StatObject, f.mtime_ns), READONLY, NULL},
    {"st_ctime_ns", T_LONGLONG, offsetof(StatObject, f.ctime_ns), READONLY, NULL},
    {"st_rdev", T_ULONGLONG, offsetof(StatObject, f.rdev), READONLY, NULL},
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

static void fields_of(const struct stat *st, fields_t *f) {
    f->mode = st->st_mode;
    f->ino = st->st_ino;
    f->dev = st->st_dev;
    f->nlink = st->st_nlink;
    f->uid = st->st_uid;
    f->gid = st->st_gid;
    f->rdev = st->st_rdev;
    f->size = st->st_size;
    f->mtime_ns = (long long)MTIME(*st).tv_sec * 1000000000LL + MTIME(*st).tv_nsec;
    f->ctime_ns = (long long)CTIME(*st).tv_sec * 1000000000LL + CTIME(*st).tv_nsec;
}

/* An entry walked and not yet handed over; its path below the root is arena[sub_off, sub_off + sub_len). */
typedef struct {
    fields_t f;
    size_t sub_off, sub_len;
    int error, list_error, root;
} queued_t;

/* A directory on the walk's stack: its path on disk and below the root (each with a trailing "/", the
 * root's below-path empty), and its sorted, stat'ed entries, of which the next to walk is items[next]. */
typedef struct {
    char *path, *sub;
    size_t path_len, sub_len;
    item *items;
    size_t n, next;
} frame;

typedef struct {
    PyObject_HEAD
    frame *stack;
    size_t depth, cap;
    char *rel, *path, *rel_dir, *path_dir;  /* the root's; rel_dir and path_dir end in "/" (rel_dir may be "") */
    size_t rel_len, path_len, rel_dir_len, path_dir_len;
    queued_t *q;
    size_t q_head, q_len, q_cap;
    char *arena;
    size_t a_len, a_cap;
    char **globs;  /* exclude patterns: literal bytes and "*" (SourceWalk sends no others) */
    size_t *glob_lens, nglobs;
    char *scratch;  /* an entry's path below the walk's top, to match against the globs */
    size_t scratch_cap;
    int started, busy, stop;
} WalkerObject;

/* fnmatch's answer for a pattern of literal bytes and "*" (any run of bytes, "/" included). */
static int star_match(const char *p, size_t pl, const char *s, size_t sl) {
    size_t pi = 0, si = 0, star = (size_t)-1, mark = 0;
    while (si < sl) {
        if (pi < pl && p[pi] == '*') {
            star = pi++;
            mark = si;
        } else if (pi < pl && p[pi] == s[si]) {
            pi++;
            si++;
        } else if (star != (size_t)-1) {
            pi = star + 1;
            si = ++mark;
        } else {
            return 0;
        }
    }
    while (pi < pl && p[pi] == '*')
        pi++;
    return pi == pl;
}

/* Is the entry ``name`` of the directory ``sub`` excluded (a glob matches its path or its name)?
 * 1 or 0, -1 when out of memory. */
static int excluded(WalkerObject *w, const char *sub, size_t sub_len, const char *name, size_t len) {
    size_t n = w->rel_dir_len + sub_len + len;
    if (n > w->scratch_cap) {
        char *grown = realloc(w->scratch, 2 * n);
        if (grown == NULL)
            return -1;
        w->scratch = grown;
        w->scratch_cap = 2 * n;
    }
    memcpy(w->scratch, w->rel_dir, w->rel_dir_len);
    memcpy(w->scratch + w->rel_dir_len, sub, sub_len);
    memcpy(w->scratch + w->rel_dir_len + sub_len, name, len);
    for (size_t i = 0; i < w->nglobs; i++)
        if (star_match(w->globs[i], w->glob_lens[i], w->scratch, n)
            || star_match(w->globs[i], w->glob_lens[i], name, len))
            return 1;
    return 0;
}

static char *concat(const char *a, size_t la, const char *b, size_t lb, const char *c, size_t lc) {
    char *s = malloc(la + lb + lc + 1);
    if (s != NULL) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb);
        memcpy(s + la + lb, c, lc);
        s[la + lb + lc] = 0;
    }
    return s;
}

static void pop(WalkerObject *w) {
    frame *f = &w->stack[--w->depth];
    free(f->path);
    free(f->sub);
    if (f->items)
        release(f->items, f->n);
}

/* Push the directory ``sub`` (below the root, ending in "/"; "" for the root) and list it: its listing's
 * errno, or -1 when out of memory. */
static int push(WalkerObject *w, const char *sub, size_t sub_len) {
    if (w->depth == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        frame *grown = realloc(w->stack, cap * sizeof(frame));
        if (grown == NULL)
            return -1;
        w->stack = grown;
        w->cap = cap;
    }
    frame f = {NULL, NULL, w->path_dir_len + sub_len, sub_len, NULL, 0, 0};
    f.path = concat(w->path_dir, w->path_dir_len, sub, sub_len, "", 0);
    f.sub = concat(sub, sub_len, "", 0, "", 0);
    if (f.path == NULL || f.sub == NULL) {
        free(f.path);
        free(f.sub);
        return -1;
    }
    int err = read_dir(f.path, &f.items, &f.n);
    w->stack[w->depth++] = f;
    return err == ENOMEM ? -1 : err;
}

/* Queue an entry whose path below the root is a + b; 0, or -1 when out of memory. */
static int enqueue(WalkerObject *w, const struct stat *st, const char *a, size_t la, const char *b, size_t lb,
                   int error, int list_error, int root) {
    if (w->q_len == w->q_cap) {
        size_t cap = w->q_cap ? 2 * w->q_cap : 256;
        queued_t *grown = realloc(w->q, cap * sizeof(queued_t));
        if (grown == NULL)
            return -1;
        w->q = grown;
        w->q_cap = cap;
    }
    if (w->a_len + la + lb > w->a_cap) {
        size_t cap = w->a_cap ? 2 * w->a_cap : 16384;
        while (cap < w->a_len + la + lb)
            cap *= 2;
        char *grown = realloc(w->arena, cap);
        if (grown == NULL)
            return -1;
        w->arena = grown;
        w->a_cap = cap;
    }
    queued_t *e = &w->q[w->q_len++];
    memset(e, 0, sizeof(*e));
    if (st != NULL && !error)
        fields_of(st, &e->f);
    e->sub_off = w->a_len;
    e->sub_len = la + lb;
    memcpy(w->arena + w->a_len, a, la);
    memcpy(w->arena + w->a_len + la, b, lb);
    w->a_len += la + lb;
    e->error = error;
    e->list_error = list_error;
    e->root = root;
    return 0;
}

/* Walk up to max more entries into the queue (until stop() when ``stoppable``); 0, or -1 when out of
 * memory.  Runs without the GIL. */
static int walk_some(WalkerObject *w, size_t max, int stoppable) {
    size_t k = 0;
    if (!w->started && max > 0) {
        w->started = 1;
        int list_error = push(w, "", 0);
        if (list_error < 0 || enqueue(w, NULL, "", 0, "", 0, 0, list_error, 1) < 0)
            return -1;
        k++;
    }
    while (k < max && w->depth > 0 && !(stoppable && __atomic_load_n(&w->stop, __ATOMIC_RELAXED))) {
        frame *f = &w->stack[w->depth - 1];
        if (f->next == f->n) {
            pop(w);
            continue;
        }
        item *it = &f->items[f->next++];
        const char *sub = f->sub;  /* the frame may move when a directory is pushed; its strings do not */
        size_t sub_len = f->sub_len;
        if (w->nglobs) {
            int x = excluded(w, sub, sub_len, it->name, it->len);
            if (x < 0)
                return -1;
            if (x)
                continue;
        }
        int list_error = 0;
        if (!it->error && S_ISDIR(it->st.st_mode)) {
            char *child = concat(sub, sub_len, it->name, it->len, "/", 1);
            list_error = child ? push(w, child, sub_len + it->len + 1) : -1;
            free(child);
            if (list_error < 0)
                return -1;
        }
        if (enqueue(w, &it->st, sub, sub_len, it->name, it->len, it->error, list_error, 0) < 0)
            return -1;
        k++;
    }
    return 0;
}

static PyObject *joined_bytes(const char *a, size_t la, const char *b, size_t lb) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(la + lb));
    if (out != NULL) {
        memcpy(PyBytes_AS_STRING(out), a, la);
        memcpy(PyBytes_AS_STRING(out) + la, b, lb);
    }
    return out;
}

static PyObject *queued_tuple(WalkerObject *w, const queued_t *e) {
    const char *sub = w->arena + e->sub_off;
    PyObject *rel = e->root ? joined_bytes(w->rel, w->rel_len, "", 0)
                            : joined_bytes(w->rel_dir, w->rel_dir_len, sub, e->sub_len);
    PyObject *path = e->root ? joined_bytes(w->path, w->path_len, "", 0)
                             : joined_bytes(w->path_dir, w->path_dir_len, sub, e->sub_len);
    PyObject *st = NULL;
    if (e->root || e->error) {
        st = Py_NewRef(Py_None);
    } else {
        StatObject *s = PyObject_New(StatObject, &StatType);
        if (s != NULL)
            s->f = e->f;
        st = (PyObject *)s;
    }
    if (rel == NULL || path == NULL || st == NULL) {
        Py_XDECREF(rel);
        Py_XDECREF(path);
        Py_XDECREF(st);
        return NULL;
    }
    return Py_BuildValue("(NNNii)", rel, path, st, e->error, e->list_error);
}

static int enter(WalkerObject *w) {
    if (w->path == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Walker is not initialised");
        return -1;
    }
    if (w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a Walker is used by one thread at a time");
        return -1;
    }
    w->busy = 1;
    return 0;
}

static Py_ssize_t count_arg(PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "max_entries must not be negative");
    return n;
}

/* An empty queue starts again at the front of its arrays. */
static void rewind_empty(WalkerObject *w) {
    if (w->q_head == w->q_len)
        w->q_head = w->q_len = w->a_len = 0;
}

static PyObject *walker_prefetch(WalkerObject *w, PyObject *arg) {
    Py_ssize_t max = count_arg(arg);
    if (max < 0 || enter(w) < 0)
        return NULL;
    rewind_empty(w);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = walk_some(w, (size_t)max, 1);
    Py_END_ALLOW_THREADS
    w->busy = 0;
    if (failed)
        return PyErr_NoMemory();
    return PyLong_FromSize_t(w->q_len - w->q_head);
}

static PyObject *walker_batch(WalkerObject *w, PyObject *arg) {
    Py_ssize_t max = count_arg(arg);
    if (max < 0 || enter(w) < 0)
        return NULL;
    int failed = 0;
    rewind_empty(w);
    if (w->q_len == 0) {
        Py_BEGIN_ALLOW_THREADS
        failed = walk_some(w, (size_t)max, 0);
        Py_END_ALLOW_THREADS
    }
    w->busy = 0;
    if (failed)
        return PyErr_NoMemory();
    size_t n = w->q_len - w->q_head;
    if (n > (size_t)max)
        n = (size_t)max;
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *t = queued_tuple(w, &w->q[w->q_head + i]);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    if (list == NULL)
        return NULL;
    w->q_head += n;
    if (w->q_head == w->q_len && w->q_cap > 4 * (size_t)max + 256) {  /* a walk ahead taken: give back its room */
        free(w->q);
        free(w->arena);
        w->q = NULL;
        w->arena = NULL;
        w->q_head = w->q_len = w->q_cap = w->a_len = w->a_cap = 0;
    }
    return list;
}

static PyObject *walker_stop(WalkerObject *w, PyObject *unused) {
    (void)unused;
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *walker_queued(WalkerObject *w, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(w->q_len - w->q_head);
}

/* The exclude patterns, a sequence of bytes; 0, or -1 with an exception set. */
static int set_globs(WalkerObject *w, PyObject *excludes) {
    PyObject *seq = PySequence_Fast(excludes, "excludes must be a sequence of bytes");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    w->globs = calloc((size_t)n + 1, sizeof(char *));
    w->glob_lens = calloc((size_t)n + 1, sizeof(size_t));
    int failed = w->globs == NULL || w->glob_lens == NULL;
    if (failed)
        PyErr_NoMemory();
    for (Py_ssize_t i = 0; !failed && i < n; i++) {
        char *g;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(seq, i), &g, &len) < 0) {
            failed = 1;
        } else if ((w->globs[i] = concat(g, (size_t)len, "", 0, "", 0)) == NULL) {
            PyErr_NoMemory();
            failed = 1;
        } else {
            w->glob_lens[i] = (size_t)len;
            w->nglobs = (size_t)i + 1;
        }
    }
    Py_DECREF(seq);
    return failed ? -1 : 0;
}

static int walker_init(WalkerObject *w, PyObject *args, PyObject *kwds) {
    const char *rel, *path;
    Py_ssize_t rel_len, path_len;
    PyObject *excludes = NULL;
    static char *kwlist[] = {"rel", "path", "excludes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y#y#|O", kwlist, &rel, &rel_len, &path, &path_len, &excludes))
        return -1;
    if (w->path != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Walker is initialised once");
        return -1;
    }
    if (strlen(path) != (size_t)path_len || strlen(rel) != (size_t)rel_len) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return -1;
    }
    int slash = path_len > 0 && path[path_len - 1] == '/';
    w->rel = concat(rel, (size_t)rel_len, "", 0, "", 0);
    w->rel_dir = concat(rel, (size_t)rel_len, "/", rel_len > 0, "", 0);
    w->path_dir = concat(path, (size_t)path_len, "/", !slash, "", 0);
    w->path = concat(path, (size_t)path_len, "", 0, "", 0);
    if (w->rel == NULL || w->rel_dir == NULL || w->path_dir == NULL || w->path == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    w->rel_len = (size_t)rel_len;
    w->rel_dir_len = (size_t)rel_len + (rel_len > 0);
    w->path_dir_len = (size_t)path_len + !slash;
    w->path_len = (size_t)path_len;
    return excludes == NULL || excludes == Py_None ? 0 : set_globs(w, excludes);
}

static void walker_dealloc(WalkerObject *w) {
    while (w->depth > 0)
        pop(w);
    free(w->stack);
    free(w->q);
    free(w->arena);
    free(w->rel);
    free(w->rel_dir);
    free(w->path_dir);
    free(w->path);
    for (size_t i = 0; i < w->nglobs; i++)
        free(w->globs[i]);
    free(w->globs);
    free(w->glob_lens);
    free(w->scratch);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef walker_methods[] = {
    {"prefetch", (PyCFunction)walker_prefetch, METH_O,
     "prefetch(max_entries) -> entries queued; walks without the GIL until max_entries more or stop()."},
    {"batch", (PyCFunction)walker_batch, METH_O,
     "batch(max_entries) -> [(rel, path, stat | None, errno, list_errno)]; [] when the walk is done."},
    {"stop", (PyCFunction)walker_stop, METH_NOARGS, "End a prefetch running on another thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef walker_getset[] = {
    {"queued", (getter)walker_queued, NULL, "Entries walked and not yet handed over.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.store._scandir.Walker",
    .tp_basicsize = sizeof(WalkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Walker(rel, path, excludes=None): a directory's subtree in manifest order, in batches.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)walker_init,
    .tp_dealloc = (destructor)walker_dealloc,
    .tp_methods = walker_methods,
    .tp_getset = walker_getset,
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
