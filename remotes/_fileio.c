/* A byte range of a file in one call, the GIL released once.
 *
 *   read_range(path, start, length) -> bytes
 *       ``length`` bytes from ``start`` (to the end of the file when length
 *       is negative), fewer only at the end of the file.  OSError with the
 *       path when the file cannot be opened or read.
 *
 * The local remote serves differentials and restores thousands of ranged
 * reads.  As os.open, os.pread and os.close each released the GIL, a thread
 * asking for one range waited three times to get it back behind the threads
 * compressing and hashing: in a database differential those waits were a
 * fifth of the compressing workers' time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

/* Read ``length`` bytes at ``start`` from ``fd`` (opened from ``path`` when -1), then close it.
 * 0, or the errno of the call that failed; *got: bytes read into buf. */
static int pread_file(int fd, const char *path, char *buf, Py_ssize_t start, Py_ssize_t length, Py_ssize_t *got) {
    if (fd < 0 && (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return errno;
    int err = 0;
    *got = 0;
    while (*got < length) {
        ssize_t n = pread(fd, buf + *got, (size_t)(length - *got), (off_t)(start + *got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (n == 0)
            break;
        *got += n;
    }
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
        if (fd < 0)
            goto fail;
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
    if (err)
        goto fail;
    Py_DECREF(encoded);
    if (got < length && _PyBytes_Resize(&data, got) < 0)
        return NULL;
    return data;
fail:
    Py_XDECREF(data);
    Py_DECREF(encoded);
    errno = err;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, arg);
}

static PyMethodDef methods[] = {
    {"read_range", read_range, METH_VARARGS,
     "read_range(path, start, length) -> bytes: length bytes from start (to the end when negative)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fileio", "A byte range of a file, read with the GIL released once.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fileio(void) { return PyModule_Create(&module); }
