/* Reads of local files in one call each, the GIL released once.
 *
 *   read_range(path, start, length) -> bytes
 *       ``length`` bytes from ``start`` (to the end of the file when length
 *       is negative), fewer only at the end of the file.  OSError with the
 *       path when the file cannot be opened or read.  The local remote's get.
 *
 *   read_small_files(paths, limits, probe_xattrs) -> list
 *       per path, its first ``limit`` bytes (all of it, when it is shorter)
 *       and its fstat fields after reading, opened without following a
 *       symlink and (where allowed) without touching its atime:
 *       (data, size, mtime_ns, ctime_ns, xattrs), ``xattrs`` 0 when the file
 *       has no extended attributes (or its file system none), 1 when it has
 *       some, -1 when not asked or the probe failed; or the OSError (with the
 *       path) that opening or reading it raised.  A backup's read of a run
 *       of files of at most one chunk each, the GIL released once for all.
 *
 * A thread that gives up the GIL for a short system call waits to get it
 * back behind the threads compressing and hashing.  With os.open, os.pread
 * (or os.read), os.fstat and os.close each giving it up, those waits were a
 * fifth of the compressing workers' time in a database differential (ranged
 * reads of delta bases) and most of the readers' time in a backup of tens of
 * thousands of small files.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/xattr.h>
#endif

#include "../store/_stat_ns.h"

#ifdef O_NOATIME
#define NOATIME O_NOATIME
#else
#define NOATIME 0
#endif

/* Up to ``length`` bytes into buf, from ``offset`` (pread) or, when negative, the current position (read);
 * fewer only at the end of the file.  0, or the errno of the call that failed; *got: bytes read. */
static int read_fully(int fd, char *buf, Py_ssize_t length, Py_ssize_t offset, Py_ssize_t *got) {
    *got = 0;
    while (*got < length) {
        size_t want = (size_t)(length - *got);
        ssize_t n = offset < 0 ? read(fd, buf + *got, want) : pread(fd, buf + *got, want, (off_t)(offset + *got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            break;
        *got += n;
    }
    return 0;
}

/* Read ``length`` bytes at ``start`` from ``fd`` (opened from ``path`` when -1), then close it.
 * 0, or the errno of the call that failed; *got: bytes read into buf. */
static int pread_file(int fd, const char *path, char *buf, Py_ssize_t start, Py_ssize_t length, Py_ssize_t *got) {
    if (fd < 0 && (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return errno;
    int err = read_fully(fd, buf, length, start, got);
    close(fd);
    return err;
}

/* Open ``path`` and find its size: the descriptor, or -1 with *err set. */
static int open_sized(const char *path, Py_ssize_t *size, int *err) {
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    if (fstat(fd, &st) != 0)
        *err = errno;
    else if (S_ISDIR(st.st_mode))
        *err = EISDIR;
    if (*err) {
        close(fd);
        return -1;
    }
    *size = (Py_ssize_t)st.st_size;
    return fd;
}

/* ``data`` cut to the ``got`` bytes read, or, when ``err`` is set, NULL with OSError naming ``path``;
 * takes ``data`` over (NULL: nothing was allocated). */
static PyObject *result(PyObject *data, Py_ssize_t got, int err, PyObject *path) {
    if (err) {
        Py_XDECREF(data);
        errno = err;
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    }
    if (got < PyBytes_GET_SIZE(data) && _PyBytes_Resize(&data, got) < 0)
        return NULL;
    return data;
}

static PyObject *read_range(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *arg, *encoded = NULL, *data = NULL;
    Py_ssize_t start, length, got = 0;
    int fd = -1, err = 0;
    if (!PyArg_ParseTuple(args, "Onn", &arg, &start, &length))
        return NULL;
    if (start < 0) {
        PyErr_SetString(PyExc_ValueError, "negative start");
        return NULL;
    }
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    const char *path = PyBytes_AS_STRING(encoded);
    if (length < 0) {  /* to the end: the size first, from the descriptor then read */
        Py_ssize_t size = 0;
        Py_BEGIN_ALLOW_THREADS
        fd = open_sized(path, &size, &err);
        Py_END_ALLOW_THREADS
        if (fd < 0) {
            Py_DECREF(encoded);
            return result(NULL, 0, err, arg);
        }
        length = size > start ? size - start : 0;
    }
    data = PyBytes_FromStringAndSize(NULL, length);
    if (data == NULL) {
        if (fd >= 0)
            close(fd);
        Py_DECREF(encoded);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    err = pread_file(fd, path, PyBytes_AS_STRING(data), start, length, &got);
    Py_END_ALLOW_THREADS
    Py_DECREF(encoded);
    return result(data, got, err, arg);
}

/* Whether an open file has extended attributes: 1, 0 (none, or none supported there), -1 (unknown). */
static int xattr_state(int fd) {
#ifdef __linux__
    ssize_t n = flistxattr(fd, NULL, 0);
    if (n >= 0)
        return n > 0;
    return errno == ENOTSUP || errno == EOPNOTSUPP ? 0 : -1;
#else
    (void)fd;
    return -1;
#endif
}

static int read_file(const char *path, char *buf, Py_ssize_t limit, Py_ssize_t *got, struct stat *st,
                     int probe, int *xattrs) {
    /* O_NONBLOCK: a FIFO put in the file's place since the walk would wait for a writer for ever; anything
     * but a regular file is refused as source.py's open_source_file does (ENXIO, EISDIR) */
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | NOATIME);
    if (fd < 0 && errno == EPERM && NOATIME)  /* O_NOATIME only for files we own (or as root) */
        fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int err = 0;
    if (fstat(fd, st) != 0)
        err = errno;
    else if (!S_ISREG(st->st_mode))
        err = S_ISDIR(st->st_mode) ? EISDIR : ENXIO;
    if (!err)
        err = read_fully(fd, buf, limit, -1, got);
    if (!err && fstat(fd, st) != 0)
        err = errno;
    *xattrs = !err && probe ? xattr_state(fd) : -1;
    close(fd);
    return err;
}

typedef struct {
    PyObject *path;     /* as given, for an OSError's filename */
    PyObject *encoded;  /* the path as bytes */
    PyObject *data;     /* its buffer, ``limit`` bytes until cut to what was read */
    Py_ssize_t limit, got;
    int err, xattrs;
    struct stat st;
} small_read;

static void release_reads(small_read *reads, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(reads[i].path);
        Py_XDECREF(reads[i].encoded);
        Py_XDECREF(reads[i].data);
    }
    PyMem_Free(reads);
}

/* One file's result: its tuple, or the OSError its read raised (NULL on a Python error). */
static PyObject *read_result(small_read *r) {
    if (r->err)
        return PyObject_CallFunction(PyExc_OSError, "isO", r->err, strerror(r->err), r->path);
    if (r->got < PyBytes_GET_SIZE(r->data) && _PyBytes_Resize(&r->data, r->got) < 0)
        return NULL;
    long long mtime = ns_of(MTIME(r->st));
    long long ctime = ns_of(CTIME(r->st));
    PyObject *out = Py_BuildValue("(OLLLiKK)", r->data, (long long)r->st.st_size, mtime, ctime, r->xattrs,
                                  (unsigned long long)r->st.st_dev, (unsigned long long)r->st.st_ino);
    Py_CLEAR(r->data);
    return out;
}

static PyObject *read_small_files(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *paths, *limits, *out = NULL;
    int probe;
    if (!PyArg_ParseTuple(args, "O!O!p", &PyList_Type, &paths, &PyList_Type, &limits, &probe))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(paths);
    if (PyList_GET_SIZE(limits) != n) {
        PyErr_SetString(PyExc_ValueError, "paths and limits differ in length");
        return NULL;
    }
    small_read *reads = PyMem_Calloc(n ? n : 1, sizeof(small_read));
    if (reads == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        small_read *r = &reads[i];
        r->limit = PyLong_AsSsize_t(PyList_GET_ITEM(limits, i));
        if (r->limit == -1 && PyErr_Occurred())
            goto done;
        if (r->limit < 0) {
            PyErr_SetString(PyExc_ValueError, "negative limit");
            goto done;
        }
        r->path = Py_NewRef(PyList_GET_ITEM(paths, i));
        if (!PyUnicode_FSConverter(r->path, &r->encoded))
            goto done;
        if ((r->data = PyBytes_FromStringAndSize(NULL, r->limit)) == NULL)
            goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        small_read *r = &reads[i];
        r->err = read_file(PyBytes_AS_STRING(r->encoded), PyBytes_AS_STRING(r->data), r->limit, &r->got, &r->st,
                           probe, &r->xattrs);
    }
    Py_END_ALLOW_THREADS
    if ((out = PyList_New(n)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = read_result(&reads[i]);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }
done:
    release_reads(reads, n);
    return out;
}

static PyMethodDef methods[] = {
    {"read_range", read_range, METH_VARARGS,
     "read_range(path, start, length) -> bytes: length bytes from start (to the end when negative)."},
    {"read_small_files", read_small_files, METH_VARARGS,
     "read_small_files(paths, limits, probe_xattrs) -> per path (first limit bytes, size, mtime_ns, ctime_ns, "
     "xattrs, dev, ino) or its OSError."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fileio", "Reads of local files, the GIL released once per call.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fileio(void) { return PyModule_Create(&module); }
