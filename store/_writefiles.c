/* A restore's writes: a run of small files, the GIL released once for the whole run, and a chunk's
 * data written with its blocks of zeros left holes.
 *
 *   write_small_files(files, owners) -> list of (error, owner_error)
 *       files: a list of (dirfd, name: bytes, data: buffer, mode, uid, gid,
 *       mtime_ns).  Each file is made new in the directory open at dirfd
 *       (EEXIST if anything is at its name: a restore into an empty target
 *       writes into nothing it did not make, a hard link or FIFO put there
 *       meanwhile included), written (each 4096-byte block of zeros left a hole), its owner
 *       set when ``owners``, its mode and its mtime (atime too), and closed.
 *       error: 0, or the errno that stopped the file, which is then removed,
 *       never left half-written under its name.  owner_error: the errno of a
 *       failed chown that did not stop the file (it stops it only on a
 *       read-only file system, where nothing else would be set either); the
 *       file then gets its mode without the set-user-ID and set-group-ID bits.
 *       The run stops after a file that found no space (ENOSPC, EDQUOT): the
 *       list is then shorter than ``files``, the rest not attempted.
 *
 * Written one Python call at a time, each small file cost six calls (open,
 * write, fchown, fchmod, futimens, close) that each gave up the GIL and
 * waited to get it back behind the thread decoding chunks; tens of thousands
 * of small files made those waits a large part of a restore.
 *
 *   write_sparse(fd, data, offset, zeros_from) -> bytes left as holes
 *       Write the buffer ``data`` at file offset ``offset``, leaving every
 *       block of zeros a hole: the file is cut in 4096-byte blocks aligned on
 *       file offsets (those at the buffer's two ends may be partial), and each
 *       stretch of blocks that are not all zeros is written with one pwrite.
 *       A block of zeros at or past ``zeros_from`` (where the file already
 *       reads as zeros: 0 for a file this restore made, the old length for
 *       one written in place) is skipped; a whole one before it is punched
 *       (fallocate PUNCH_HOLE, consecutive ones at once), or written where the
 *       file system cannot punch; a partial one before it is written.  The
 *       file's length is the caller's to set (a hole at the end of a file is
 *       made by its ftruncate).  The GIL is released for the scan and the
 *       writes; each block's test stops at its first byte that is not zero, so
 *       ordinary data costs a compare of a few bytes per block.  OSError with
 *       the errno of a failed write.
 */
#define _GNU_SOURCE  /* fallocate */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#ifdef __linux__
#include <linux/falloc.h>
#endif
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 4096  /* the granularity of holes: a block of zeros this size, aligned on file offsets */
#ifdef FALLOC_FL_PUNCH_HOLE
#define PUNCH (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)
#define punch_hole(fd, at, n) fallocate((fd), PUNCH, (at), (n))
#else
#define punch_hole(fd, at, n) (errno = EOPNOTSUPP, -1)
#endif

static const char zero_block[BLOCK];

typedef struct {
    int dirfd;       /* the directory the file is made in */
    PyObject *name;  /* bytes: its name there */
    Py_buffer data;
    int have_data;
    mode_t mode;
    uid_t uid;
    gid_t gid;
    long long mtime_ns;
    int err, owner_err;
} small_write;

static int pwrite_fully(int fd, const char *p, Py_ssize_t n, long long at) {
    while (n > 0) {
        ssize_t w = pwrite(fd, p, (size_t)n, (off_t)at);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)  /* no progress: never loop on it */
            return EIO;
        p += w;
        n -= w;
        at += w;
    }
    return 0;
}

enum { WRITE, SKIP, PUNCHED };

/* What to do with the stretch of n bytes at p (file offset at) of one kind; 0 or an errno. */
static int flush(int fd, int kind, const char *p, Py_ssize_t n, long long at, int *can_punch, long long *holes) {
    if (n == 0)
        return 0;
    if (kind == SKIP) {
        *holes += n;
        return 0;
    }
    if (kind == PUNCHED) {
        if (*can_punch && punch_hole(fd, (off_t)at, (off_t)n) == 0) {
            *holes += n;
            return 0;
        }
        *can_punch = 0;  /* not here: the zeros are written, and no more punches tried */
    }
    return pwrite_fully(fd, p, n, at);
}

/* Write n bytes at file offset off, blocks of zeros left holes: see write_sparse.  0 or an errno. */
static int sparse_write(int fd, const char *p, Py_ssize_t n, long long off, long long zeros_from, long long *holes) {
    int kind = WRITE, can_punch = 1, err;
    Py_ssize_t start = 0, i = 0;
    while (i < n) {
        long long at = off + i;
        Py_ssize_t len = BLOCK - (Py_ssize_t)(at % BLOCK);
        if (len > n - i)
            len = n - i;
        int k = WRITE;
        if (p[i] == 0 && memcmp(p + i, zero_block, (size_t)len) == 0) {
            if (at >= zeros_from)
                k = SKIP;
            else if (len == BLOCK && can_punch)
                k = PUNCHED;
        }
        if (k != kind) {
            if ((err = flush(fd, kind, p + start, i - start, off + start, &can_punch, holes)) != 0)
                return err;
            kind = k;
            start = i;
        }
        i += len;
    }
    return flush(fd, kind, p + start, n - start, off + start, &can_punch, holes);
}

/* Create, fill and finish one file; on an error the file is removed. */
static void write_one(small_write *w, int owners) {
    const char *name = PyBytes_AS_STRING(w->name);
    int fd = openat(w->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
    if (fd < 0) {
        w->err = errno;
        return;
    }
    const char *p = w->data.buf;
    Py_ssize_t n = w->data.len;
    long long holes = 0;
    int err = sparse_write(fd, p, n, 0, 0, &holes);
    if (!err && holes && ftruncate(fd, (off_t)n) != 0)  /* a hole at the end */
        err = errno;
    if (!err && owners && fchown(fd, w->uid, w->gid) != 0) {
        if (errno == EROFS)
            err = errno;
        else
            w->owner_err = errno;
    }
    /* set-id bits only for the owner they were recorded with: never for whoever the file is left to */
    if (!err && fchmod(fd, w->mode & (w->owner_err ? 01777 : 07777)) != 0)
        err = errno;
    if (!err) {
        struct timespec times[2];
        long long s = w->mtime_ns / 1000000000LL, ns = w->mtime_ns % 1000000000LL;
        if (ns < 0) {
            s -= 1;
            ns += 1000000000LL;
        }
        times[0].tv_sec = times[1].tv_sec = (time_t)s;
        times[0].tv_nsec = times[1].tv_nsec = (long)ns;
        if (futimens(fd, times) != 0)
            err = errno;
    }
    if (close(fd) != 0 && !err && errno != EINTR)
        err = errno;
    if (err) {
        unlinkat(w->dirfd, name, 0);
        w->err = err;
    }
}

static void release_writes(small_write *writes, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(writes[i].name);
        if (writes[i].have_data)
            PyBuffer_Release(&writes[i].data);
    }
    PyMem_Free(writes);
}

static int parse_file(PyObject *item, small_write *w) {
    PyObject *name, *data;
    unsigned int mode;
    long long uid, gid;
    if (!PyTuple_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "each file is a tuple (dirfd, name, data, mode, uid, gid, mtime_ns)");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "iO!OILLL", &w->dirfd, &PyBytes_Type, &name, &data, &mode, &uid, &gid,
                          &w->mtime_ns))
        return -1;
    if (PyObject_GetBuffer(data, &w->data, PyBUF_SIMPLE) < 0)
        return -1;
    w->have_data = 1;
    if (strlen(PyBytes_AS_STRING(name)) != (size_t)PyBytes_GET_SIZE(name) || PyBytes_GET_SIZE(name) == 0) {
        PyErr_SetString(PyExc_ValueError, "a file name is not empty and holds no NUL");
        return -1;
    }
    w->name = Py_NewRef(name);
    w->mode = (mode_t)mode;
    w->uid = (uid_t)uid;
    w->gid = (gid_t)gid;
    return 0;
}

static PyObject *write_small_files(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *files, *out = NULL;
    int owners;
    if (!PyArg_ParseTuple(args, "O!p", &PyList_Type, &files, &owners))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(files), done = 0;
    small_write *writes = PyMem_Calloc(n ? n : 1, sizeof(small_write));
    if (writes == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_file(PyList_GET_ITEM(files, i), &writes[i]) < 0) {
            release_writes(writes, n);
            return NULL;
        }
    Py_BEGIN_ALLOW_THREADS
    while (done < n) {
        small_write *w = &writes[done++];
        write_one(w, owners);
        if (w->err == ENOSPC || w->err == EDQUOT)
            break;
    }
    Py_END_ALLOW_THREADS
    if ((out = PyList_New(done)) != NULL)
        for (Py_ssize_t i = 0; i < done; i++) {
            PyObject *item = Py_BuildValue("(ii)", writes[i].err, writes[i].owner_err);
            if (item == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, item);
        }
    release_writes(writes, n);
    return out;
}

static PyObject *write_sparse(PyObject *self, PyObject *args) {
    (void)self;
    int fd, err;
    Py_buffer data;
    long long offset, zeros_from, holes = 0;
    if (!PyArg_ParseTuple(args, "iy*LL", &fd, &data, &offset, &zeros_from))
        return NULL;
    if (offset < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    err = sparse_write(fd, data.buf, data.len, offset, zeros_from, &holes);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLongLong(holes);
}

static PyMethodDef methods[] = {
    {"write_small_files", write_small_files, METH_VARARGS,
     "write_small_files(files, owners) -> per file written (error, owner_error); see the module's comment."},
    {"write_sparse", write_sparse, METH_VARARGS,
     "write_sparse(fd, data, offset, zeros_from) -> bytes left as holes; see the module's comment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_writefiles", "A restore's writes: runs of small files, and data with its blocks of zeros left holes.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__writefiles(void) { return PyModule_Create(&module); }
