/* Reads of local files in one call each, the GIL released once.
 *
 *   read_range(path, start, length) -> bytes
 *       ``length`` bytes from ``start`` (to the end of the file when length
 *       is negative), fewer only at the end of the file.  OSError with the
 *       path when the file cannot be opened or read.  The local remote's get.
 *
 *   read_whole(path, limit) -> (data, size, mtime_ns, ctime_ns)
 *       a small file's first ``limit`` bytes (all of it, when it is shorter)
 *       and its fstat fields after reading, opened without following a
 *       symlink and (where allowed) without touching its atime.  A backup's
 *       read of a file of at most one chunk.
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
#include <sys/stat.h>
#include <unistd.h>

#ifdef __APPLE__
#define MTIME(st) ((st).st_mtimespec)
#define CTIME(st) ((st).st_ctimespec)
#else
#define MTIME(st) ((st).st_mtim)
#define CTIME(st) ((st).st_ctim)
#endif

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

static int read_file(const char *path, char *buf, Py_ssize_t limit, Py_ssize_t *got, struct stat *st) {
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | NOATIME);
    if (fd < 0 && errno == EPERM && NOATIME)  /* O_NOATIME only for files we own (or as root) */
        fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int err = read_fully(fd, buf, limit, -1, got);
    if (!err && fstat(fd, st) != 0)
        err = errno;
    close(fd);
    return err;
}

static PyObject *read_whole(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *arg, *encoded = NULL;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "On", &arg, &limit))
        return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "negative limit");
        return NULL;
    }
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    PyObject *data = PyBytes_FromStringAndSize(NULL, limit);
    if (data == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    Py_ssize_t got = 0;
    struct stat st;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = read_file(PyBytes_AS_STRING(encoded), PyBytes_AS_STRING(data), limit, &got, &st);
    Py_END_ALLOW_THREADS
    Py_DECREF(encoded);
    if ((data = result(data, got, err, arg)) == NULL)
        return NULL;
    long long mtime = (long long)MTIME(st).tv_sec * 1000000000LL + MTIME(st).tv_nsec;
    long long ctime = (long long)CTIME(st).tv_sec * 1000000000LL + CTIME(st).tv_nsec;
    return Py_BuildValue("(NLLL)", data, (long long)st.st_size, mtime, ctime);
}

static PyMethodDef methods[] = {
    {"read_range", read_range, METH_VARARGS,
     "read_range(path, start, length) -> bytes: length bytes from start (to the end when negative)."},
    {"read_whole", read_whole, METH_VARARGS,
     "read_whole(path, limit) -> (first limit bytes, size, mtime_ns, ctime_ns after reading)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fileio", "Reads of local files, the GIL released once per call.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fileio(void) { return PyModule_Create(&module); }
