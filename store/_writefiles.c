/* A restore's writes of a run of small files, the GIL released once for the whole run.
 *
 *   write_small_files(files, owners) -> list of (error, owner_error)
 *       files: a list of (dirfd, name: bytes, data: buffer, mode, uid, gid,
 *       mtime_ns).  Each file is made new in the directory open at dirfd
 *       (EEXIST if anything is at its name: a restore into an empty target
 *       writes into nothing it did not make, a hard link or FIFO put there
 *       meanwhile included), written (at least 4096 zero bytes as a hole), its owner
 *       set when ``owners``, its mode and its mtime (atime too), and closed.
 *       error: 0, or the errno that stopped the file, which is then removed,
 *       never left half-written under its name.  owner_error: the errno of a
 *       failed chown that did not stop the file (it stops it only on a
 *       read-only file system, where nothing else would be set either).
 *       The run stops after a file that found no space (ENOSPC, EDQUOT): the
 *       list is then shorter than ``files``, the rest not attempted.
 *
 * Written one Python call at a time, each small file cost six calls (open,
 * write, fchown, fchmod, futimens, close) that each gave up the GIL and
 * waited to get it back behind the thread decoding chunks; tens of thousands
 * of small files made those waits a large part of a restore.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define HOLE_MIN 4096

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

static int all_zeros(const char *p, Py_ssize_t n) {
    return n > 0 && p[0] == 0 && memcmp(p, p + 1, (size_t)(n - 1)) == 0;
}

static int write_fully(int fd, const char *p, Py_ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)  /* no progress: never loop on it */
            return EIO;
        p += w;
        n -= w;
    }
    return 0;
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
    int err = 0;
    if (n >= HOLE_MIN && all_zeros(p, n))
        err = ftruncate(fd, (off_t)n) ? errno : 0;
    else
        err = write_fully(fd, p, n);
    if (!err && owners && fchown(fd, w->uid, w->gid) != 0) {
        if (errno == EROFS)
            err = errno;
        else
            w->owner_err = errno;
    }
    if (!err && fchmod(fd, w->mode & 07777) != 0)
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

static PyMethodDef methods[] = {
    {"write_small_files", write_small_files, METH_VARARGS,
     "write_small_files(files, owners) -> per file written (error, owner_error); see the module's comment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_writefiles", "A restore's writes of small files, the GIL released once per run.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__writefiles(void) { return PyModule_Create(&module); }
