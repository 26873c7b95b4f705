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
 *       size, mtime_ns, ctime_ns, rdev, blocks).  OSError when the directory cannot
 *       be opened or read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "_stat_ns.h"

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

/* Read, sort and lstat; 0, or an errno with nothing left allocated.  ``expect``: the lstat the walk saw of
 * the directory (NULL: none, a root).  Opened by its path, the directory must be that one: one swapped for a
 * symbolic link since (by whoever can write the tree), or reached through a directory above it swapped so,
 * would have the walk list, and the backup read, what lies outside the tree: ENOTDIR for a symbolic link in
 * its place (it changed type), ESTALE for another directory there (replaced, or reached through a link). */
static int read_dir(const char *path, const struct stat *expect, item **out, size_t *count) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC | (expect ? O_NOFOLLOW : 0));
    if (fd < 0)
        return expect && errno == ELOOP ? ENOTDIR : errno;
    struct stat now;
    if (expect && (fstat(fd, &now) != 0 || now.st_dev != expect->st_dev || now.st_ino != expect->st_ino)) {
        close(fd);
        return ESTALE;
    }
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
    long long mtime = ns_of(MTIME(*st));
    long long ctime = ns_of(CTIME(*st));
    return Py_BuildValue("(kKKKkkLLLKL)", (unsigned long)st->st_mode, (unsigned long long)st->st_ino,
                         (unsigned long long)st->st_dev, (unsigned long long)st->st_nlink,
                         (unsigned long)st->st_uid, (unsigned long)st->st_gid, (long long)st->st_size, mtime,
                         ctime, (unsigned long long)st->st_rdev, (long long)st->st_blocks);
}

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *arg, *encoded = NULL, *dev_ino = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &arg, &dev_ino))
        return NULL;
    struct stat expect;
    if (dev_ino != Py_None) {
        unsigned long long dev, ino;
        if (!PyArg_ParseTuple(dev_ino, "KK", &dev, &ino))
            return NULL;
        expect.st_dev = (dev_t)dev;
        expect.st_ino = (ino_t)ino;
    }
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    item *items = NULL;
    size_t n = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = read_dir(PyBytes_AS_STRING(encoded), dev_ino != Py_None ? &expect : NULL, &items, &n);
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
 * A directory's subtree in manifest order (depth first, names sorted), walked
 * by a thread of its own that never takes the GIL, into a compact queue
 * (about 210 bytes an entry with its path, against 470 for the Python
 * objects it becomes).  The backup's main thread takes queued entries (as
 * tuples, or matched in place against the parent snapshot's records) while
 * the thread lists and stats what comes next: an unchanged tree's backup is
 * the walk and that comparison, and one thread doing both in turn took
 * their sum.
 * The thread starts while the backup starts up (imports, key, index), walks
 * up to ``ahead`` entries until the first batch is taken, then keeps at most
 * ``steady`` entries queued.  Producer and consumer share one lock, held
 * for an entry's enqueueing or to swap the queue for the consumer's drained
 * one, never while Python objects are made.
 *
 *   Walker(rel: bytes, path: bytes, excludes=None, device=None, markers=None, max_size=None)
 *       the directory at path, recorded as rel, leaving out (with their
 *       subtrees) entries whose path below it, path under rel or name an
 *       exclude pattern matches; a
 *       pattern is bytes of literals and "*".  With ``device``, a directory on
 *       another device is recorded but not listed (one file system).
 *       ``markers``: (name, header) pairs of bytes; a directory holding a
 *       regular file of a marker's name whose first bytes are its header
 *       keeps only its marker files (the rest of its contents is left out).
 *       ``max_size``: regular files larger than this many bytes are left out.
 *   .start(ahead, steady) -> bool    start the walking thread (False: none could
 *       be made; batch() then walks itself).  Once, before the first batch.
 *   .batch(max_entries) -> list of (rel, path, stat | None, errno, list_errno)
 *       up to max_entries walked entries, waiting for the thread if it is
 *       behind; [] once the walk is done.  The first entry is the root itself,
 *       with stat None; errno is an entry's lstat error (stat is None then);
 *       list_errno is a directory's listing error (0 for other entries).
 *       RuntimeError once a walk stopped before its end is drained.
 *   .skip_unchanged(record, records, restat_after, op_entry, t_file, t_dir, t_symlink, taken, limit, ignore,
 *                   fine_from, fine_to, coarse_from, coarse_to)
 *       -> (files, dirs, symlinks, bytes, record)  take queued entries while they are
 *       what the parent snapshot's records say, unchanged (below; ``ignore``: fields not
 *       compared, IGNORE_INODE for inode and device, IGNORE_CTIME for the change time),
 *       and their times lie out of the racy window (``racy``)
 *   .age     seconds since the oldest entry of the last batch was stat'ed
 *   .stop()  end the thread at its next entry (a walk that will not be consumed)
 *   .queued  entries walked and not yet handed over
 *   Stat: the lstat fields a backup records (st_mode, st_ino, st_dev,
 *       st_nlink, st_uid, st_gid, st_size, st_mtime_ns, st_ctime_ns, st_rdev), and st_blocks (a sparse
 *       file's holes are told to the chunker, not read).
 */

typedef struct {
    unsigned long long mode, ino, dev, nlink, uid, gid, rdev;
    long long size, mtime_ns, ctime_ns, blocks;
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
    {"st_blocks", T_LONGLONG, offsetof(StatObject, f.blocks), READONLY, NULL},
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
    f->mtime_ns = ns_of(MTIME(*st));
    f->ctime_ns = ns_of(CTIME(*st));
    f->blocks = st->st_blocks;
}

static double monotonic_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* An entry walked and not yet handed over; its path below the root is arena[sub_off, sub_off + sub_len). */
typedef struct {
    fields_t f;
    double scanned;  /* when its lstat was made (monotonic seconds) */
    size_t sub_off, sub_len;
    ssize_t target_len;  /* a symlink's target, after its path in the arena; -1: none, or not read */
    int error, list_error, root;
    int dropped;  /* below a directory that was none any more when stat'ed again: not handed over */
} queued_t;

/* Entries in walk order: the walking side's queue, or the batch side's share of it (from head). */
typedef struct {
    queued_t *q;
    size_t head, len, cap;
    char *arena;
    size_t a_len, a_cap;
} queue_t;

static void queue_free(queue_t *q) {
    free(q->q);
    free(q->arena);
    memset(q, 0, sizeof(*q));
}

/* A directory on the walk's stack: its path on disk and below the root (each with a trailing "/", the
 * root's below-path empty), and its sorted, stat'ed entries, of which the next to walk is items[next]. */
typedef struct {
    char *path, *sub;
    size_t path_len, sub_len;
    item *items;
    size_t n, next;
    double scanned;  /* when its entries were listed and stat'ed */
} frame;

typedef struct {
    PyObject_HEAD
    frame *stack;  /* the walking side's alone */
    size_t depth, cap;
    char *rel, *path, *rel_dir, *path_dir;  /* the root's; rel_dir and path_dir end in "/" (rel_dir may be "") */
    size_t rel_len, path_len, rel_dir_len, path_dir_len;
    queue_t walked;  /* appended to by the walk; under mu once a thread walks */
    queue_t taken;   /* swapped out of walked by batch(), made into tuples: batch()'s alone */
    double age;
    char **globs;  /* exclude patterns: literal bytes and "*" (SourceWalk sends no others) */
    size_t *glob_lens, nglobs;
    char **marks, **headers;  /* markers: file names, and the bytes each must start with */
    size_t *mark_lens, *header_lens, nmarks;
    int one_device;  /* list directories of this device only */
    dev_t device;
    int size_capped;  /* leave out regular files larger than max_size */
    off_t max_size;
    char *scratch;  /* an entry's path below the walk's top, to match against the globs; a link's on disk */
    size_t scratch_cap;
    char *restat_path;  /* batch()'s: the path on disk of an entry stat'ed again */
    size_t restat_cap;
    char *cut;  /* batch()'s: "sub/" of a directory stat'ed again as a non-directory, whose subtree is left out */
    size_t cut_len, cut_cap;
    int started, busy;
    /* The walking thread, and what it shares with batch() under mu. */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t filled, drained;
    int sync_ready, threaded, walking, done, failed, handed, stop;
    size_t ahead, steady;
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

/* The scratch buffer, at least n bytes long; 0, or -1 when out of memory. */
static int scratch_of(WalkerObject *w, size_t n) {
    if (n > w->scratch_cap) {
        char *grown = realloc(w->scratch, 2 * n);
        if (grown == NULL)
            return -1;
        w->scratch = grown;
        w->scratch_cap = 2 * n;
    }
    return 0;
}

/* Is the entry ``name`` of the directory ``sub`` excluded (a glob matches its path below the walk's top,
 * its path as recorded, under rel, or its name)?  The top is a source: with several, a pattern names a
 * path below one as it does with one.  1 or 0, -1 when out of memory. */
static int excluded(WalkerObject *w, const char *sub, size_t sub_len, const char *name, size_t len) {
    size_t n = w->rel_dir_len + sub_len + len;
    if (scratch_of(w, n) < 0)
        return -1;
    memcpy(w->scratch, w->rel_dir, w->rel_dir_len);
    memcpy(w->scratch + w->rel_dir_len, sub, sub_len);
    memcpy(w->scratch + w->rel_dir_len + sub_len, name, len);
    for (size_t i = 0; i < w->nglobs; i++)
        if (star_match(w->globs[i], w->glob_lens[i], w->scratch + w->rel_dir_len, n - w->rel_dir_len)
            || (w->rel_dir_len && star_match(w->globs[i], w->glob_lens[i], w->scratch, n))
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

/* Does the regular file ``name`` of the directory at ``dir`` start with the ``len`` bytes of ``header``? */
static int starts_with(WalkerObject *w, const char *dir, size_t dir_len, const item *it, const char *header,
                       size_t len) {
    if (len == 0)
        return 1;
    if (scratch_of(w, dir_len + it->len + 1) < 0)
        return -1;
    memcpy(w->scratch, dir, dir_len);
    memcpy(w->scratch + dir_len, it->name, it->len + 1);
    int fd = open(w->scratch, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return 0;
    char *buf = malloc(len);
    if (buf == NULL) {
        close(fd);
        return -1;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    int same = got == len && memcmp(buf, header, len) == 0;
    free(buf);
    close(fd);
    return same;
}

/* A directory holding one of the markers keeps only its marker files; 0, or -1 when out of memory. */
static int keep_marked(WalkerObject *w, frame *f) {
    int marked = 0;
    char *keep = calloc(f->n ? f->n : 1, 1);
    if (keep == NULL)
        return -1;
    for (size_t i = 0; i < w->nmarks; i++) {
        item key;
        key.name = w->marks[i];
        key.len = w->mark_lens[i];
        item *it = bsearch(&key, f->items, f->n, sizeof(item), by_name);
        if (it == NULL || it->error || !S_ISREG(it->st.st_mode))
            continue;
        int ok = starts_with(w, f->path, f->path_len, it, w->headers[i], w->header_lens[i]);
        if (ok < 0) {
            free(keep);
            return -1;
        }
        if (ok)
            marked = keep[it - f->items] = 1;
    }
    if (marked) {
        size_t n = 0;
        for (size_t i = 0; i < f->n; i++) {
            if (keep[i])
                f->items[n++] = f->items[i];
            else
                free(f->items[i].name);
        }
        f->n = n;
    }
    free(keep);
    return 0;
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
static int push(WalkerObject *w, const char *sub, size_t sub_len, const struct stat *expect) {
    if (w->depth == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 16;
        frame *grown = realloc(w->stack, cap * sizeof(frame));
        if (grown == NULL)
            return -1;
        w->stack = grown;
        w->cap = cap;
    }
    frame f = {NULL, NULL, w->path_dir_len + sub_len, sub_len, NULL, 0, 0, monotonic_seconds()};
    f.path = concat(w->path_dir, w->path_dir_len, sub, sub_len, "", 0);
    f.sub = concat(sub, sub_len, "", 0, "", 0);
    if (f.path == NULL || f.sub == NULL) {
        free(f.path);
        free(f.sub);
        return -1;
    }
    int err = read_dir(f.path, expect, &f.items, &f.n);
    if (!err && w->nmarks && keep_marked(w, &f) < 0)
        err = ENOMEM;
    w->stack[w->depth++] = f;
    return err == ENOMEM ? -1 : err;
}

/* Append an entry whose path below the root is a + b (a symlink's target t of tlen bytes, -1: none) to q;
 * 0, or -1 when out of memory. */
static int append(queue_t *q, const struct stat *st, double scanned, const char *a, size_t la, const char *b,
                  size_t lb, const char *t, ssize_t tlen, int error, int list_error, int root) {
    size_t extra = la + lb + (tlen > 0 ? (size_t)tlen : 0);
    if (q->len == q->cap) {
        size_t cap = q->cap ? 2 * q->cap : 256;
        queued_t *grown = realloc(q->q, cap * sizeof(queued_t));
        if (grown == NULL)
            return -1;
        q->q = grown;
        q->cap = cap;
    }
    if (q->a_len + extra > q->a_cap) {
        size_t cap = q->a_cap ? 2 * q->a_cap : 16384;
        while (cap < q->a_len + extra)
            cap *= 2;
        char *grown = realloc(q->arena, cap);
        if (grown == NULL)
            return -1;
        q->arena = grown;
        q->a_cap = cap;
    }
    queued_t *e = &q->q[q->len++];
    memset(e, 0, sizeof(*e));
    if (st != NULL && !error)
        fields_of(st, &e->f);
    e->scanned = scanned;
    e->sub_off = q->a_len;
    e->sub_len = la + lb;
    memcpy(q->arena + q->a_len, a, la);
    memcpy(q->arena + q->a_len + la, b, lb);
    if (tlen > 0)
        memcpy(q->arena + q->a_len + la + lb, t, (size_t)tlen);
    q->a_len += extra;
    e->target_len = tlen;
    e->error = error;
    e->list_error = list_error;
    e->root = root;
    return 0;
}

/* Queue an entry for batch(), under the lock once a thread walks. */
static int enqueue(WalkerObject *w, const struct stat *st, double scanned, const char *a, size_t la,
                   const char *b, size_t lb, const char *t, ssize_t tlen, int error, int list_error, int root) {
    if (w->threaded)
        pthread_mutex_lock(&w->mu);
    int r = append(&w->walked, st, scanned, a, la, b, lb, t, tlen, error, list_error, root);
    if (w->threaded)
        pthread_mutex_unlock(&w->mu);
    return r;
}

/* The target of the symlink ``it`` of the directory ``f``, read as the walk reaches it, so that an
 * unchanged link is matched like a file (skip_unchanged): its length, -1 when it cannot be read (or
 * fills ``cap``: the backup reads it again), -2 when out of memory. */
static ssize_t link_target(WalkerObject *w, const frame *f, const item *it, char *out, size_t cap) {
    size_t n = f->path_len + it->len + 1;
    if (scratch_of(w, n) < 0)
        return -2;
    memcpy(w->scratch, f->path, f->path_len);
    memcpy(w->scratch + f->path_len, it->name, it->len);
    w->scratch[n - 1] = 0;
    ssize_t len = readlink(w->scratch, out, cap);
    return len < 0 || (size_t)len >= cap ? -1 : len;
}

/* Walk up to max more entries into the queue (fewer once stop() is called); 0, or -1 when out of memory.
 * Runs without the GIL. */
static int walk_some(WalkerObject *w, size_t max) {
    size_t k = 0;
    char target[4096];
    if (!w->started && max > 0) {
        w->started = 1;
        int list_error = push(w, "", 0, NULL);
        if (list_error < 0 || enqueue(w, NULL, w->stack[0].scanned, "", 0, "", 0, NULL, -1, 0, list_error, 1) < 0)
            return -1;
        k++;
    }
    while (k < max && w->depth > 0 && !__atomic_load_n(&w->stop, __ATOMIC_RELAXED)) {
        frame *f = &w->stack[w->depth - 1];
        if (f->next == f->n) {
            pop(w);
            continue;
        }
        item *it = &f->items[f->next++];
        const char *sub = f->sub;  /* the frame may move when a directory is pushed; its strings do not */
        size_t sub_len = f->sub_len;
        double scanned = f->scanned;
        if (w->nglobs) {
            int x = excluded(w, sub, sub_len, it->name, it->len);
            if (x < 0)
                return -1;
            if (x)
                continue;
        }
        if (w->size_capped && !it->error && S_ISREG(it->st.st_mode) && it->st.st_size > w->max_size)
            continue;
        ssize_t tlen = -1;
        if (!it->error && S_ISLNK(it->st.st_mode) && (tlen = link_target(w, f, it, target, sizeof(target))) == -2)
            return -1;
        int list_error = 0;
        if (!it->error && S_ISDIR(it->st.st_mode) && (!w->one_device || it->st.st_dev == w->device)) {
            char *child = concat(sub, sub_len, it->name, it->len, "/", 1);
            list_error = child ? push(w, child, sub_len + it->len + 1, &it->st) : -1;
            free(child);
            if (list_error < 0)
                return -1;
        }
        if (enqueue(w, &it->st, scanned, sub, sub_len, it->name, it->len, target, tlen, it->error, list_error, 0) < 0)
            return -1;
        k++;
    }
    return 0;
}

/* Entries the walking thread queues between two wake-ups of a waiting batch(). */
#define WALK_STEP 256

static void *walk_thread(void *arg) {
    WalkerObject *w = arg;
    int failed = 0;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        size_t limit;
        while (!w->stop && w->walked.len >= (limit = w->handed ? w->steady : w->ahead))
            pthread_cond_wait(&w->drained, &w->mu);
        size_t room = w->stop ? 0 : limit - w->walked.len;
        pthread_mutex_unlock(&w->mu);
        if (room == 0)
            break;
        failed = walk_some(w, room < WALK_STEP ? room : WALK_STEP) < 0;
        pthread_mutex_lock(&w->mu);
        pthread_cond_signal(&w->filled);
        pthread_mutex_unlock(&w->mu);
        if (failed || w->depth == 0)
            break;
    }
    pthread_mutex_lock(&w->mu);
    w->failed = failed;
    w->done = !failed && w->depth == 0;
    w->walking = 0;
    pthread_cond_broadcast(&w->filled);
    pthread_mutex_unlock(&w->mu);
    return NULL;
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
    const char *sub = w->taken.arena + e->sub_off;
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

static int initialised(WalkerObject *w) {
    if (w->path == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Walker is not initialised");
        return 0;
    }
    return 1;
}

static Py_ssize_t count_arg(PyObject *arg, const char *what) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0 && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "%s must not be negative", what);
    return n;
}

static PyObject *walker_start(WalkerObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (!initialised(w))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "start(ahead, steady)");
        return NULL;
    }
    Py_ssize_t ahead = count_arg(args[0], "ahead"), steady = count_arg(args[1], "steady");
    if (ahead < 0 || steady < 0)
        return NULL;
    if (w->threaded || w->started || w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a Walker's thread starts once, before the walk");
        return NULL;
    }
    w->ahead = ahead > 0 ? (size_t)ahead : 1;
    w->steady = steady > 0 ? (size_t)steady : 1;
    if (!w->sync_ready) {
        if (pthread_mutex_init(&w->mu, NULL))
            Py_RETURN_FALSE;
        if (pthread_cond_init(&w->filled, NULL)) {
            pthread_mutex_destroy(&w->mu);
            Py_RETURN_FALSE;
        }
        if (pthread_cond_init(&w->drained, NULL)) {
            pthread_cond_destroy(&w->filled);
            pthread_mutex_destroy(&w->mu);
            Py_RETURN_FALSE;
        }
        w->sync_ready = 1;
    }
    w->threaded = w->walking = 1;
    if (pthread_create(&w->thread, NULL, walk_thread, w)) {
        w->threaded = w->walking = 0;  /* batch() walks itself */
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* Move what the walk queued to the (drained) batch side, whose arrays the walk reuses. */
static void swap_queues(WalkerObject *w) {
    queue_t drained = w->taken;
    drained.head = drained.len = drained.a_len = 0;
    w->taken = w->walked;
    w->walked = drained;
}

/* Give the batch side, drained, what the walk has queued: waiting for the walking thread (or, with no
 * thread, walking) if ``wait``, and then without the GIL; the walking thread holds the lock only briefly
 * and never waits for the GIL, so a refill that does not wait may keep it.  0, -1 out of memory, -2 a
 * walk stopped before its end (each once nothing is left to hand over). */
static int refill(WalkerObject *w, size_t max, int wait) {
    int status = 0;
    if (w->taken.cap > 4 * max + 256 && w->taken.cap > 2 * w->steady)
        queue_free(&w->taken);  /* a walk ahead taken: give back its room */
    if (w->threaded) {
        pthread_mutex_lock(&w->mu);
        while (wait && w->walked.len == 0 && w->walking)
            pthread_cond_wait(&w->filled, &w->mu);
        swap_queues(w);
        w->handed = 1;
        if (w->taken.len == 0 && !w->walking)
            status = w->failed ? -1 : w->done ? 0 : -2;
        pthread_cond_signal(&w->drained);
        pthread_mutex_unlock(&w->mu);
    } else if (wait) {
        status = walk_some(w, max) < 0 ? -1 : 0;
        swap_queues(w);
        if (!status && w->taken.len == 0 && w->depth > 0)  /* stopped (it walks at least one entry else) */
            status = -2;
    }
    return status;
}

static int refill_error(int status) {
    if (status == -1)
        PyErr_NoMemory();
    else
        PyErr_SetString(PyExc_RuntimeError, "the walk was stopped before its end");
    return -1;
}

static int enter(WalkerObject *w) {
    if (!initialised(w))
        return -1;
    if (w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a Walker's batches are taken by one thread at a time");
        return -1;
    }
    w->busy = 1;
    return 0;
}

/* Keep room for n bytes at *buf (of *cap); 0, or -1 out of memory. */
static int reserve(char **buf, size_t *cap, size_t n) {
    if (n <= *cap)
        return 0;
    char *grown = realloc(*buf, n);
    if (grown == NULL)
        return -1;
    *buf = grown;
    *cap = n;
    return 0;
}

/* Stat again, with no GIL held, the taken entries [head, head + n) stat'ed more than restat_after seconds
 * ago (their walk ran ahead of the backup): their fields, or their errno, as they are now.  A directory
 * that is none any more leaves out what was walked below it (in this batch and the next ones).  The stat
 * is by path, which a directory above swapped for a symbolic link since leads out of the tree: fields of
 * another file than the one listed (another device or inode) are not taken, so that the reads and listings
 * checked against them still refuse what is not the entry walked.  0, or -1 out of memory. */
static int restat(WalkerObject *w, size_t n, double restat_after) {
    double now = monotonic_seconds();
    for (size_t i = 0; i < n; i++) {
        queued_t *e = &w->taken.q[w->taken.head + i];
        const char *sub = w->taken.arena + e->sub_off;
        if (w->cut_len) {
            if (!e->root && e->sub_len >= w->cut_len && !memcmp(sub, w->cut, w->cut_len)) {
                e->dropped = 1;
                continue;
            }
            w->cut_len = 0;  /* depth first: past the subtree, nothing more of it comes */
        }
        if (e->root || e->error || now - e->scanned <= restat_after)
            continue;
        if (reserve(&w->restat_path, &w->restat_cap, w->path_dir_len + e->sub_len + 1) < 0)
            return -1;
        memcpy(w->restat_path, w->path_dir, w->path_dir_len);
        memcpy(w->restat_path + w->path_dir_len, sub, e->sub_len);
        w->restat_path[w->path_dir_len + e->sub_len] = 0;
        int was_dir = S_ISDIR(e->f.mode);
        struct stat st;
        if (lstat(w->restat_path, &st) == 0) {
            if ((unsigned long long)st.st_ino == e->f.ino && (unsigned long long)st.st_dev == e->f.dev) {
                fields_of(&st, &e->f);
                e->scanned = now;
            }
        } else {
            e->error = errno ? errno : EIO;
        }
        if (was_dir && (e->error || !S_ISDIR(e->f.mode))) {
            if (reserve(&w->cut, &w->cut_cap, e->sub_len + 1) < 0)
                return -1;
            memcpy(w->cut, sub, e->sub_len);
            w->cut[e->sub_len] = '/';
            w->cut_len = e->sub_len + 1;
        }
    }
    return 0;
}

static PyObject *walker_batch(WalkerObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "batch(max_entries, restat_after=-1.0)");
        return NULL;
    }
    Py_ssize_t max = PyLong_AsSsize_t(args[0]);
    if (max <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "max_entries must be positive");
        return NULL;
    }
    double restat_after = nargs > 1 ? PyFloat_AsDouble(args[1]) : -1.0;
    if (restat_after == -1.0 && PyErr_Occurred())
        return NULL;
again:
    if (enter(w) < 0)
        return NULL;
    int status = 0;
    if (w->taken.head == w->taken.len && w->threaded)  /* what is queued, without letting go of the GIL */
        status = refill(w, (size_t)max, 0);
    if (w->taken.head == w->taken.len && !status) {  /* wait for the thread, or walk */
        Py_BEGIN_ALLOW_THREADS
        status = refill(w, (size_t)max, 1);
        Py_END_ALLOW_THREADS
    }
    size_t n = w->taken.len - w->taken.head;
    if (n > (size_t)max)
        n = (size_t)max;
    if (!status && restat_after >= 0 && n) {
        Py_BEGIN_ALLOW_THREADS
        status = restat(w, n, restat_after);
        Py_END_ALLOW_THREADS
    }
    w->busy = 0;
    if (status < 0 && refill_error(status) < 0)
        return NULL;
    size_t kept = 0;
    for (size_t i = 0; i < n; i++)
        kept += !w->taken.q[w->taken.head + i].dropped;
    PyObject *list = PyList_New((Py_ssize_t)kept);
    double oldest = 0;
    for (size_t i = 0, k = 0; list != NULL && i < n; i++) {
        const queued_t *e = &w->taken.q[w->taken.head + i];
        if (e->dropped)
            continue;
        if (k == 0 || e->scanned < oldest)
            oldest = e->scanned;
        PyObject *t = queued_tuple(w, e);
        if (t == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)k++, t);
    }
    if (list == NULL)
        return NULL;
    w->taken.head += n;
    w->age = kept ? monotonic_seconds() - oldest : 0;
    if (kept == 0 && n > 0) {  /* all of it below a directory gone: the next entries, not an end */
        Py_DECREF(list);
        goto again;
    }
    return list;
}

/* --- runs of unchanged entries ---
 *
 * Most entries of a repeated backup are files, directories and symlinks the
 * parent snapshot recorded with the same path and stat fields (and target).  Made into tuples and
 * compared in Python, each cost about 1.5 us; here, straight from the queue,
 * about a fifth of that, and no objects are made for them.
 */

static PyObject *s_type, *s_flags, *s_mode, *s_uid, *s_gid, *s_mtime_ns, *s_size, *s_ctime_ns, *s_ino, *s_dev,
    *s_rdev, *s_target, *s_digest, *s_chunks;

/* 1 when the int attribute ``name`` of ``obj`` is ``want`` (as a signed or unsigned 64-bit value). */
static int attr_is(PyObject *obj, PyObject *name, unsigned long long want, int is_signed) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL || !PyLong_Check(v)) {
        Py_XDECREF(v);
        PyErr_Clear();
        return 0;
    }
    int overflow = 0;
    int same;
    if (is_signed) {
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        same = !overflow && !(x == -1 && PyErr_Occurred()) && x == (long long)want;
    } else {
        unsigned long long x = PyLong_AsUnsignedLongLong(v);
        same = !(x == (unsigned long long)-1 && PyErr_Occurred()) && x == want;
    }
    PyErr_Clear();
    Py_DECREF(v);
    return same;
}

static int attr_empty_bytes(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    int empty = v != NULL && PyBytes_Check(v) && PyBytes_GET_SIZE(v) == 0;
    Py_XDECREF(v);
    PyErr_Clear();
    return empty;
}

/* 1 when the bytes attribute ``name`` of ``obj`` is the ``len`` bytes at ``want``. */
static int attr_bytes_are(PyObject *obj, PyObject *name, const char *want, size_t len) {
    PyObject *v = PyObject_GetAttr(obj, name);
    int same = v != NULL && PyBytes_Check(v) && (size_t)PyBytes_GET_SIZE(v) == len
               && memcmp(PyBytes_AS_STRING(v), want, len) == 0;
    Py_XDECREF(v);
    PyErr_Clear();
    return same;
}

/* Is the queued entry ``e`` what the parent's record ``rec`` (a Record: op, path, entry) says, unchanged?
 * Files with one link, directories that could be listed and symlinks whose target was read only;
 * UNCHANGED_FILE, UNCHANGED_DIR, UNCHANGED_LINK, or 0. */
enum { UNCHANGED_FILE = 1, UNCHANGED_DIR, UNCHANGED_LINK };
enum { IGNORE_INODE = 1, IGNORE_CTIME = 2 };  /* as store/backup.py's */

/* Whether a time lies where an entry's times cannot vouch for it: a change made in the same clock tick as
 * the one the parent's backup saw leaves them as they were.  ``window``: from and to for a time with
 * sub-second digits, then for one of whole seconds (a file system keeping no finer; see store/backup.py). */
static int racy(long long ns, const long long *window) {
    const long long *w = ns % 1000000000LL ? window : window + 2;
    return w[0] <= ns && ns <= w[1];
}

static int unchanged(WalkerObject *w, const queued_t *e, PyObject *rec, long op_entry, long t_file, long t_dir,
                     long t_link, long ignore, const long long *window) {
    const fields_t *f = &e->f;
    int file = S_ISREG(f->mode) && f->nlink == 1, dir = S_ISDIR(f->mode);
    int link = S_ISLNK(f->mode) && e->target_len >= 0;
    if (e->root || e->error || e->list_error || !(file || dir || link))
        return 0;
    if (racy(f->mtime_ns, window) || (!(ignore & IGNORE_CTIME) && racy(f->ctime_ns, window)))
        return 0;
    if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != 3)
        return 0;
    PyObject *op = PyTuple_GET_ITEM(rec, 0), *path = PyTuple_GET_ITEM(rec, 1), *entry = PyTuple_GET_ITEM(rec, 2);
    if (!PyLong_Check(op) || PyLong_AsLong(op) != op_entry || !PyBytes_Check(path) || entry == Py_None) {
        PyErr_Clear();
        return 0;
    }
    const char *sub = w->taken.arena + e->sub_off;
    if ((size_t)PyBytes_GET_SIZE(path) != w->rel_dir_len + e->sub_len
        || memcmp(PyBytes_AS_STRING(path), w->rel_dir, w->rel_dir_len)
        || memcmp(PyBytes_AS_STRING(path) + w->rel_dir_len, sub, e->sub_len))
        return 0;
    if (!attr_is(entry, s_type, (unsigned long long)(file ? t_file : dir ? t_dir : t_link), 0)
        || !attr_is(entry, s_flags, 0, 0)
        || !attr_is(entry, s_mtime_ns, (unsigned long long)f->mtime_ns, 1)
        || (!(ignore & IGNORE_CTIME) && !attr_is(entry, s_ctime_ns, (unsigned long long)f->ctime_ns, 1))
        || (!(ignore & IGNORE_INODE) && (!attr_is(entry, s_ino, f->ino, 0) || !attr_is(entry, s_dev, f->dev, 0)))
        || !attr_is(entry, s_mode, f->mode & 07777, 0) || !attr_is(entry, s_uid, f->uid, 0)
        || !attr_is(entry, s_gid, f->gid, 0))
        return 0;
    if (file)
        return attr_is(entry, s_size, (unsigned long long)f->size, 1) ? UNCHANGED_FILE : 0;
    /* a directory's or a symlink's entry as the backup builds it: no device, digest or chunks; a
     * directory no size or target, a symlink its target and the target's length as its size */
    size_t tlen = link ? (size_t)e->target_len : 0;
    if (!attr_is(entry, s_size, tlen, 1) || !attr_is(entry, s_rdev, 0, 0)
        || !attr_bytes_are(entry, s_target, w->taken.arena + e->sub_off + e->sub_len, tlen)
        || !attr_empty_bytes(entry, s_digest) || !attr_empty_bytes(entry, s_chunks))
        return 0;
    return link ? UNCHANGED_LINK : UNCHANGED_DIR;
}

static PyObject *walker_skip_unchanged(WalkerObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "skip_unchanged(record, records, restat_after, op_entry, t_file, t_dir, "
                                         "t_symlink, taken, limit, ignore, fine_from, fine_to, coarse_from, "
                                         "coarse_to)");
        return NULL;
    }
    PyObject *rec = args[0], *records = args[1], *taken = args[7];
    double restat_after = PyFloat_AsDouble(args[2]);
    long op_entry = PyLong_AsLong(args[3]), t_file = PyLong_AsLong(args[4]), t_dir = PyLong_AsLong(args[5]);
    long t_link = PyLong_AsLong(args[6]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[8]);
    long ignore = PyLong_AsLong(args[9]);
    long long window[4];
    for (int i = 0; i < 4; i++)
        window[i] = PyLong_AsLongLong(args[10 + i]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyIter_Check(records) || (taken != Py_None && !PyList_Check(taken))) {
        PyErr_SetString(PyExc_TypeError, "records must be an iterator, taken a list or None");
        return NULL;
    }
    if (enter(w) < 0)
        return NULL;
    double now = monotonic_seconds();
    unsigned long long files = 0, dirs = 0, links = 0, bytes = 0;
    Py_INCREF(rec);
    PyObject *result = NULL;
    for (Py_ssize_t k = 0; k < limit && rec != Py_None;) {
        if (w->taken.head == w->taken.len) {  /* only what is walked already: batch() waits for more */
            (void)refill(w, 1024, 0);  /* batch() reports the walk's end */
            if (w->taken.head == w->taken.len)
                break;
        }
        const queued_t *e = &w->taken.q[w->taken.head];
        if (now - e->scanned > restat_after)
            break;
        if (w->cut_len && !e->root && e->sub_len >= w->cut_len
            && !memcmp(w->taken.arena + e->sub_off, w->cut, w->cut_len))
            break;  /* below a directory gone: batch() leaves it out */
        int kind = unchanged(w, e, rec, op_entry, t_file, t_dir, t_link, ignore, window);
        if (!kind)
            break;
        if (taken != Py_None && PyList_Append(taken, rec) < 0)
            goto done;
        w->taken.head++;
        k++;
        if (kind == UNCHANGED_FILE) {
            files++;
            bytes += (unsigned long long)e->f.size;
        } else if (kind == UNCHANGED_DIR) {
            dirs++;
        } else {
            links++;
        }
        PyObject *next = PyIter_Next(records);
        Py_DECREF(rec);
        if (next == NULL) {
            if (PyErr_Occurred()) {
                rec = NULL;
                goto done;
            }
            next = Py_NewRef(Py_None);
        }
        rec = next;
    }
    result = Py_BuildValue("(KKKKO)", files, dirs, links, bytes, rec);
done:
    Py_XDECREF(rec);
    w->busy = 0;
    return result;
}

static PyObject *walker_stop(WalkerObject *w, PyObject *unused) {
    (void)unused;
    if (w->sync_ready)  /* the walking thread holds the lock only briefly, and never waits for the GIL */
        pthread_mutex_lock(&w->mu);
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
    if (w->sync_ready) {
        pthread_cond_broadcast(&w->drained);
        pthread_mutex_unlock(&w->mu);
    }
    Py_RETURN_NONE;
}

static PyObject *walker_queued(WalkerObject *w, void *closure) {
    (void)closure;
    size_t n = w->taken.len - w->taken.head;
    if (w->sync_ready)
        pthread_mutex_lock(&w->mu);
    n += w->walked.len;
    if (w->sync_ready)
        pthread_mutex_unlock(&w->mu);
    return PyLong_FromSize_t(n);
}

static PyObject *walker_age(WalkerObject *w, void *closure) {
    (void)closure;
    return PyFloat_FromDouble(w->age);
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

/* The markers, a sequence of (name, header) pairs of bytes; 0, or -1 with an exception set. */
static int set_markers(WalkerObject *w, PyObject *markers) {
    PyObject *seq = PySequence_Fast(markers, "markers must be a sequence of (name, header) pairs");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    w->marks = calloc((size_t)n + 1, sizeof(char *));
    w->headers = calloc((size_t)n + 1, sizeof(char *));
    w->mark_lens = calloc((size_t)n + 1, sizeof(size_t));
    w->header_lens = calloc((size_t)n + 1, sizeof(size_t));
    int failed = w->marks == NULL || w->headers == NULL || w->mark_lens == NULL || w->header_lens == NULL;
    if (failed)
        PyErr_NoMemory();
    for (Py_ssize_t i = 0; !failed && i < n; i++) {
        char *name, *header;
        Py_ssize_t name_len, header_len;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y#y#", &name, &name_len, &header, &header_len)) {
            failed = 1;
        } else if ((w->marks[i] = concat(name, (size_t)name_len, "", 0, "", 0)) == NULL
                   || (w->headers[i] = concat(header, (size_t)header_len, "", 0, "", 0)) == NULL) {
            free(w->marks[i]);
            w->marks[i] = NULL;
            PyErr_NoMemory();
            failed = 1;
        } else {
            w->mark_lens[i] = (size_t)name_len;
            w->header_lens[i] = (size_t)header_len;
            w->nmarks = (size_t)i + 1;
        }
    }
    Py_DECREF(seq);
    return failed ? -1 : 0;
}

static int walker_init(WalkerObject *w, PyObject *args, PyObject *kwds) {
    const char *rel, *path;
    Py_ssize_t rel_len, path_len;
    PyObject *excludes = NULL, *device = NULL, *markers = NULL, *max_size = NULL;
    static char *kwlist[] = {"rel", "path", "excludes", "device", "markers", "max_size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y#y#|OOOO", kwlist, &rel, &rel_len, &path, &path_len, &excludes,
                                     &device, &markers, &max_size))
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
    if (device != NULL && device != Py_None) {
        unsigned long long dev = PyLong_AsUnsignedLongLong(device);
        if (dev == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        w->one_device = 1;
        w->device = (dev_t)dev;
    }
    if (max_size != NULL && max_size != Py_None) {
        long long cap = PyLong_AsLongLong(max_size);
        if (cap == -1 && PyErr_Occurred())
            return -1;
        if (cap < 0) {
            PyErr_SetString(PyExc_ValueError, "max_size must not be negative");
            return -1;
        }
        w->size_capped = 1;
        w->max_size = (off_t)cap;
    }
    if (markers != NULL && markers != Py_None && set_markers(w, markers) < 0)
        return -1;
    return excludes == NULL || excludes == Py_None ? 0 : set_globs(w, excludes);
}

static void walker_dealloc(WalkerObject *w) {
    if (w->threaded) {  /* the thread takes no GIL: joining it holding the GIL cannot deadlock */
        pthread_mutex_lock(&w->mu);
        __atomic_store_n(&w->stop, 1, __ATOMIC_RELAXED);
        pthread_cond_broadcast(&w->drained);
        pthread_mutex_unlock(&w->mu);
        pthread_join(w->thread, NULL);
    }
    if (w->sync_ready) {
        pthread_cond_destroy(&w->drained);
        pthread_cond_destroy(&w->filled);
        pthread_mutex_destroy(&w->mu);
    }
    while (w->depth > 0)
        pop(w);
    free(w->stack);
    queue_free(&w->walked);
    queue_free(&w->taken);
    free(w->restat_path);
    free(w->cut);
    free(w->rel);
    free(w->rel_dir);
    free(w->path_dir);
    free(w->path);
    for (size_t i = 0; i < w->nglobs; i++)
        free(w->globs[i]);
    free(w->globs);
    free(w->glob_lens);
    for (size_t i = 0; i < w->nmarks; i++) {
        free(w->marks[i]);
        free(w->headers[i]);
    }
    free(w->marks);
    free(w->headers);
    free(w->mark_lens);
    free(w->header_lens);
    free(w->scratch);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyMethodDef walker_methods[] = {
    {"start", (PyCFunction)(void (*)(void))walker_start, METH_FASTCALL,
     "start(ahead, steady) -> bool: walk on a thread, up to ahead entries queued before the first batch, "
     "steady after."},
    {"batch", (PyCFunction)(void (*)(void))walker_batch, METH_FASTCALL,
     "batch(max_entries, restat_after=-1.0) -> [(rel, path, stat | None, errno, list_errno)]; [] when the "
     "walk is done.  Entries stat'ed more than restat_after seconds ago (if not negative) are stat'ed again, "
     "and what lies below a directory that is none any more then is left out."},
    {"skip_unchanged", (PyCFunction)(void (*)(void))walker_skip_unchanged, METH_FASTCALL,
     "skip_unchanged(record, records, restat_after, op_entry, t_file, t_dir, t_symlink, taken, limit, ignore, "
     "fine_from, fine_to, coarse_from, coarse_to) -> (files, dirs, symlinks, bytes, record): take the queued "
     "entries the parent's records (record, then those of the iterator records) give as unchanged, and whose "
     "times lie out of the racy window, up to limit; taken (a list or None) gets their records."},
    {"stop", (PyCFunction)walker_stop, METH_NOARGS, "End the walking thread at its next entry."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef walker_getset[] = {
    {"queued", (getter)walker_queued, NULL, "Entries walked and not yet handed over.", NULL},
    {"age", (getter)walker_age, NULL, "Seconds since the oldest entry of the last batch was stat'ed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.store._scandir.Walker",
    .tp_basicsize = sizeof(WalkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Walker(rel, path, excludes=None, device=None, markers=None, max_size=None): a directory's subtree in manifest "
              "order, in batches.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)walker_init,
    .tp_dealloc = (destructor)walker_dealloc,
    .tp_methods = walker_methods,
    .tp_getset = walker_getset,
};

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(path, (dev, ino)=None) -> sorted [(name, errno, lstat fields or None)] of a directory; with (dev, ino), "
     "ENOTDIR when a symbolic link is at path, ESTALE when another directory is (or one reached through a link)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scandir", "A directory's sorted entries with their lstat fields.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scandir(void) {
    if (PyType_Ready(&StatType) < 0 || PyType_Ready(&WalkerType) < 0)
        return NULL;
    struct { PyObject **slot; const char *name; } names[] = {
        {&s_type, "type"}, {&s_flags, "flags"}, {&s_mode, "mode"}, {&s_uid, "uid"}, {&s_gid, "gid"},
        {&s_mtime_ns, "mtime_ns"}, {&s_size, "size"}, {&s_ctime_ns, "ctime_ns"}, {&s_ino, "ino"},
        {&s_dev, "dev"}, {&s_rdev, "rdev"}, {&s_target, "target"}, {&s_digest, "digest"}, {&s_chunks, "chunks"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
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
