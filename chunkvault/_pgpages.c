/* PostgreSQL data page checksums, checked while ``backup --postgres`` reads a relation's file.
 *
 * A cluster made with data checksums (initdb -k) stores in each page header a 16-bit checksum of the page:
 * 32 interleaved FNV-1a-like lanes over the page as native 32-bit words (the header's checksum field read
 * as zero), two more rounds over zero words, the lanes folded with XOR, the block number XORed in, and the
 * result reduced to 1..65535.  The lanes' seeds are those PostgreSQL defines; a different seed or lane
 * count would give other checksums, so both are part of the on-disk format this checks.
 *
 *   checksum(page, block) -> int: the checksum PostgreSQL would store in ``page`` as block ``block``
 *   bad_pages(data, block_size, first_block, lsn_limit) -> list[int]: the indexes of the whole pages in
 *     ``data`` (block ``first_block`` onwards) whose stored checksum differs, leaving out new pages
 *     (pd_upper 0: never written through the buffer manager) and pages whose LSN is at or past
 *     ``lsn_limit`` (written during the backup: a torn read is possible, and WAL replay rewrites them).
 *
 * The GIL is released while a buffer is checked.  chunkvault/pgpages.py holds the reference in Python
 * that the tests compare this with.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LANES 32
#define ROW_BYTES (LANES * 4)
#define FNV_PRIME 16777619u
#define CHECKSUM_OFFSET 8   /* pd_checksum: after the 8-byte pd_lsn */
#define UPPER_OFFSET 14     /* pd_upper: after pd_checksum, pd_flags, pd_lower */

static const uint32_t SEEDS[LANES] = {
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
};

static inline uint32_t
mix(uint32_t lane, uint32_t word)
{
    uint32_t t = lane ^ word;
    return t * FNV_PRIME ^ (t >> 17);
}

static inline void
mix_row(uint32_t *lanes, const unsigned char *row)
{
    uint32_t words[LANES];
    memcpy(words, row, ROW_BYTES);
    for (int j = 0; j < LANES; j++)
        lanes[j] = mix(lanes[j], words[j]);
}

static uint16_t
page_checksum(const unsigned char *page, size_t size, uint32_t block)
{
    uint32_t lanes[LANES];
    unsigned char first[ROW_BYTES];
    uint32_t folded = 0;

    memcpy(lanes, SEEDS, sizeof lanes);
    memcpy(first, page, ROW_BYTES);
    first[CHECKSUM_OFFSET] = first[CHECKSUM_OFFSET + 1] = 0;
    mix_row(lanes, first);
    for (size_t off = ROW_BYTES; off < size; off += ROW_BYTES)
        mix_row(lanes, page + off);
    for (int round = 0; round < 2; round++)
        for (int j = 0; j < LANES; j++)
            lanes[j] = mix(lanes[j], 0);
    for (int j = 0; j < LANES; j++)
        folded ^= lanes[j];
    return (uint16_t)(((folded ^ block) % 65535u) + 1u);
}

static int
valid_block_size(Py_ssize_t size)
{
    return size >= ROW_BYTES && size % ROW_BYTES == 0;
}

static PyObject *
pg_checksum(PyObject *self, PyObject *args)
{
    Py_buffer page;
    unsigned long block;
    uint16_t sum;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*k", &page, &block))
        return NULL;
    if (!valid_block_size(page.len) || block > UINT32_MAX) {
        PyBuffer_Release(&page);
        PyErr_SetString(PyExc_ValueError, "a page is a multiple of 128 bytes, its block number 32 bits");
        return NULL;
    }
    sum = page_checksum(page.buf, (size_t)page.len, (uint32_t)block);
    PyBuffer_Release(&page);
    return PyLong_FromLong(sum);
}

static PyObject *
pg_bad_pages(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t block_size;
    unsigned long long first_block, lsn_limit;
    Py_ssize_t pages, bad = 0;
    Py_ssize_t *found;
    PyObject *out;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*nKK", &data, &block_size, &first_block, &lsn_limit))
        return NULL;
    if (!valid_block_size(block_size)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "the block size is a multiple of 128 bytes");
        return NULL;
    }
    pages = data.len / block_size;
    if (pages > 0 && first_block + (unsigned long long)pages - 1 > UINT32_MAX) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "block numbers are 32 bits");
        return NULL;
    }
    found = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(pages ? pages : 1));
    if (found == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < pages; k++) {
        const unsigned char *page = (const unsigned char *)data.buf + k * block_size;
        uint32_t hi, lo;
        uint16_t upper, stored;
        memcpy(&upper, page + UPPER_OFFSET, 2);
        if (upper == 0)
            continue;
        memcpy(&hi, page, 4);
        memcpy(&lo, page + 4, 4);
        if ((((uint64_t)hi << 32) | lo) >= lsn_limit)
            continue;
        memcpy(&stored, page + CHECKSUM_OFFSET, 2);
        if (stored != page_checksum(page, (size_t)block_size, (uint32_t)(first_block + (unsigned long long)k)))
            found[bad++] = k;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    out = PyList_New(bad);
    for (Py_ssize_t i = 0; out != NULL && i < bad; i++) {
        PyObject *n = PyLong_FromSsize_t(found[i]);
        if (n == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, n);
    }
    PyMem_Free(found);
    return out;
}

static PyMethodDef methods[] = {
    {"checksum", pg_checksum, METH_VARARGS, "checksum(page, block) -> the checksum PostgreSQL stores for it"},
    {"bad_pages", pg_bad_pages, METH_VARARGS,
     "bad_pages(data, block_size, first_block, lsn_limit) -> indexes of pages whose checksum differs"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pgpages", "PostgreSQL data page checksums.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pgpages(void)
{
    return PyModule_Create(&module);
}
