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

static PyMethodDef methods[] = {
    {"scan", scan, METH_O, "scan(path) -> sorted [(name, errno, lstat fields or None)] of a directory."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scandir", "A directory's sorted entries with their lstat fields.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scandir(void) { return PyModule_Create(&module); }
