/* Gear-hash content-defined chunking (FastCDC-style) for chunkvault.
 *
 * One call scans a whole buffer and returns every cut point it can decide,
 * with the GIL released; Python does no per-byte or per-chunk work beyond
 * wrapping the result.  The algorithm is specified in chunker/FORMAT.md.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Offset of the first cut in data[0:n] for a chunk starting at 0, or 0 when
 * none is decided yet (non-final buffer shorter than max without a cut). */
static size_t
find_cut(const uint8_t *data, size_t n, const uint64_t *gear, size_t min, size_t normal,
         size_t max, uint64_t mask_s, uint64_t mask_l, int final)
{
    if (n <= min)
        return final ? n : 0;
    size_t limit = n < max ? n : max;
    size_t mid = normal < limit ? normal : limit;
    uint64_t h = 0;
    size_t i = min;
    for (; i < mid; i++) {
        h = (h << 1) + gear[data[i]];
        if (!(h & mask_s))
            return i + 1;
    }
    for (; i < limit; i++) {
        h = (h << 1) + gear[data[i]];
        if (!(h & mask_l))
            return i + 1;
    }
    if (limit == max || final)
        return limit;
    return 0;
}

static PyObject *
cut_points(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer gear_buf, data;
    Py_ssize_t min, normal, max;
    unsigned long long mask_s, mask_l;
    int final;
    if (!PyArg_ParseTuple(args, "y*y*nnnKKp", &gear_buf, &data, &min, &normal, &max, &mask_s, &mask_l, &final))
        return NULL;
    PyObject *result = NULL;
    if (gear_buf.len != 256 * 8) {
        PyErr_SetString(PyExc_ValueError, "gear table must be 2048 bytes");
        goto done;
    }
    if (min < 1 || normal < min || max <= min || max < normal) {
        PyErr_SetString(PyExc_ValueError, "invalid chunk size parameters");
        goto done;
    }
    uint64_t gear[256];
    memcpy(gear, gear_buf.buf, sizeof gear);
    const uint8_t *p = (const uint8_t *)data.buf;
    size_t n = (size_t)data.len;
    size_t cap = n / (size_t)min + 2;
    uint64_t *cuts = PyMem_RawMalloc(cap * sizeof(uint64_t));
    if (!cuts) {
        PyErr_NoMemory();
        goto done;
    }
    size_t count = 0, pos = 0;
    Py_BEGIN_ALLOW_THREADS
    while (pos < n) {
        size_t c = find_cut(p + pos, n - pos, gear, (size_t)min, (size_t)normal, (size_t)max,
                            (uint64_t)mask_s, (uint64_t)mask_l, final);
        if (c == 0)
            break;
        pos += c;
        cuts[count++] = pos;
    }
    Py_END_ALLOW_THREADS
    result = PyBytes_FromStringAndSize((const char *)cuts, (Py_ssize_t)(count * sizeof(uint64_t)));
    PyMem_RawFree(cuts);
done:
    PyBuffer_Release(&gear_buf);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"cut_points", cut_points, METH_VARARGS,
     "cut_points(gear, data, min, normal, max, mask_s, mask_l, final) -> bytes of native uint64 end offsets"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcdc", "Gear-hash chunking kernel.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC
PyInit__fastcdc(void)
{
    return PyModule_Create(&module);
}
