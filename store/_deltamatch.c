/* Matches for a delta whose data lies against its dictionary byte for byte.
 *
 * A block delta (store/blob.py) compresses a chunk's changed 1 KiB blocks
 * with the base's counterparts of those blocks as a raw-content prefix; a
 * whole-base delta of a chunk changed in place has the whole base as prefix.
 * Either way most of the new bytes equal the prefix's bytes exactly ``prefix
 * length`` back (a database page updated in place), and most of the rest are
 * a row copied from a little further on in the same page of the base (an
 * updated row written to free space).  zstd's own finder indexes the whole
 * prefix into tables sized for its compression level before it looks at the
 * first new byte; for these inputs that was half of a delta's encoding time.
 *
 * This finder tries the same offset first, then the last two offsets used,
 * then one hash table (L2-sized) holding every PREFIX_STEP-th position of the
 * prefix up to LOOKAHEAD bytes past the current position and the new
 * positions already looked up.  A match is taken unless the next byte starts
 * one that saves more (zstd's lazy step), then extended backwards over the
 * literals before it.  zstd's ZSTD_compressSequences entropy-codes the
 * sequences into an ordinary frame: the format and the decoder are unchanged.
 *
 *   find(prefix, data, out) -> number of sequences written to ``out``
 *   (a writable buffer of ZSTD_Sequence records: offset, literal length,
 *   match length, rep as four native uint32; it must hold
 *   max_sequences(len(data)) of them).  The bytes after the last match are
 *   literals the caller passes along (zstd's "no block delimiters" mode).
 *
 * Every match lies inside the prefix followed by the data: an offset never
 * reaches before the prefix's start, and a match taken from the prefix ends
 * at the prefix's end.  The tests rebuild the data from the sequences.
 *
 * Also here: the block map and the gathers a block delta is made of
 * (changed_blocks, equal_words, gather_blocks; below), what applying one
 * takes besides its frame (block_map, scatter_blocks), and buffers left
 * uninitialized for frames to be decompressed into (uninitialized).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Chosen on changed 1 MiB chunks of PostgreSQL and SQLite copies against their parents (bench/RESULTS.md,
 * "Deltas of pages changed in place find their own matches"): denser indexing of the prefix cost time and,
 * without the lazy step, bytes too (more short matches, each costing more than the literals it replaced). */
#define HASH_LOG 15          /* 128 KiB of table: stays in L2 */
#define PREFIX_STEP 8        /* prefix positions indexed */
#define MIN_MATCH 8          /* a match found through the hash table */
#define OFFSET_MIN_MATCH 4   /* a match at the same offset or the last offset used (zstd's minimum) */
#define GOOD_MATCH 64        /* long enough: do not look for a longer one */
#define LOOKAHEAD 16384      /* prefix bytes indexed past the current position: a page or two */
#define SEQ_WORDS 4

typedef struct {
    const uint8_t *pre;
    size_t plen;
    const uint8_t *dat;
    size_t dlen;
    uint32_t table[1 << HASH_LOG];
} finder;

static inline uint64_t read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t hash6(const uint8_t *p) {
    return (uint32_t)(((read64(p) << 16) * 0xCF1BBCDCB7A56463ULL) >> (64 - HASH_LOG));
}

/* Common length of a and b, at most limit bytes. */
static size_t common(const uint8_t *a, const uint8_t *b, size_t limit) {
    size_t n = 0;
    while (n + 8 <= limit) {
        uint64_t x = read64(a + n) ^ read64(b + n);
        if (x)
            return n + (size_t)(__builtin_ctzll(x) >> 3);
        n += 8;
    }
    while (n < limit && a[n] == b[n])
        n++;
    return n;
}

/* Length of the match for data[i:] at window position src (prefix, then data); a match from the prefix stops
 * at the prefix's end. */
static size_t match_at(const finder *f, size_t src, size_t i) {
    size_t room = f->dlen - i;
    if (src < f->plen) {
        size_t left = f->plen - src;
        return common(f->pre + src, f->dat + i, room < left ? room : left);
    }
    return common(f->dat + (src - f->plen), f->dat + i, room);
}

static inline uint8_t window_byte(const finder *f, size_t pos) {
    return pos < f->plen ? f->pre[pos] : f->dat[pos - f->plen];
}

static inline unsigned highbit(size_t v) { return 63u - (unsigned)__builtin_clzll((unsigned long long)v | 1); }

/* What a match saves, roughly in quarter bytes: its length against the bits of an offset zstd has not seen
 * lately (the same offset and the last two are repeat codes, nearly free). */
static inline long gain(size_t len, size_t off, size_t plen, const size_t rep[2]) {
    unsigned cost = (off == plen || off == rep[0] || off == rep[1]) ? 1 : highbit(off) + 1;
    return (long)(4 * len) - (long)cost;
}

/* The best match for data[i:], i + 8 <= its length: at the same offset, at the last two offsets used, then
 * through the hash table (which then records i).  Its length, or 0 when none is worth a sequence; *off its
 * offset. */
static size_t best_match(finder *f, size_t i, const size_t rep[2], size_t *off) {
    const size_t plen = f->plen, here = plen + i;
    size_t best = 0;
    if (i < plen) {
        best = match_at(f, i, i);
        *off = plen;
    }
    for (int r = 0; r < 2 && best < GOOD_MATCH; r++) {
        if (rep[r] != plen && rep[r] <= here) {
            size_t len = match_at(f, here - rep[r], i);
            if (len > best) {
                best = len;
                *off = rep[r];
            }
        }
    }
    if (best < OFFSET_MIN_MATCH)
        best = 0;
    const uint32_t h = hash6(f->dat + i);
    if (best < GOOD_MATCH) {
        uint32_t cand = f->table[h];
        if (cand != UINT32_MAX && cand < here) {
            size_t len = match_at(f, cand, i);
            if (len >= MIN_MATCH && len > best) {
                best = len;
                *off = here - cand;
            }
        }
    }
    f->table[h] = (uint32_t)here;
    return best;
}

static size_t find(finder *f, uint32_t *out) {
    const size_t plen = f->plen, n = f->dlen;
    size_t i = 0, anchor = 0, indexed = 0, nseq = 0, rep[2] = {plen, plen};
    memset(f->table, 0xFF, sizeof f->table);
    while (i + 8 <= n) {
        size_t until = i + LOOKAHEAD < plen ? i + LOOKAHEAD : plen;
        for (; indexed + 8 <= until; indexed += PREFIX_STEP)
            f->table[hash6(f->pre + indexed)] = (uint32_t)indexed;
        size_t off = 0, best = best_match(f, i, rep, &off);
        if (!best) {
            i += 1 + ((i - anchor) >> 7);
            continue;
        }
        /* Lazy: a match one byte on that saves more (a repeat offset, say, where this one is new) wins. */
        while (best < GOOD_MATCH && i + 9 <= n) {
            size_t off2 = 0, len2 = best_match(f, i + 1, rep, &off2);
            if (!len2 || gain(len2, off2, plen, rep) <= gain(best, off, plen, rep))
                break;
            i++;
            best = len2;
            off = off2;
        }
        size_t src = plen + i - off;
        while (i > anchor && src > 0 && window_byte(f, src - 1) == f->dat[i - 1] &&
               (src - 1 >= plen || src < plen)) {
            i--;
            src--;
            best++;
        }
        uint32_t *s = out + nseq++ * SEQ_WORDS;
        s[0] = (uint32_t)off;
        s[1] = (uint32_t)(i - anchor);
        s[2] = (uint32_t)best;
        s[3] = 0;
        if (off != rep[0]) {
            rep[1] = rep[0];
            rep[0] = off;
        }
        i += best;
        anchor = i;
    }
    return nseq;
}

static size_t max_sequences(size_t n) { return n / OFFSET_MIN_MATCH + 1; }

static PyObject *py_find(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer pre, dat, out;
    if (!PyArg_ParseTuple(args, "y*y*w*", &pre, &dat, &out))
        return NULL;
    PyObject *result = NULL;
    finder *f = NULL;
    if (pre.len >= UINT32_MAX / 2 || dat.len >= UINT32_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "prefix or data too large");
        goto done;
    }
    if ((size_t)out.len < max_sequences((size_t)dat.len) * SEQ_WORDS * sizeof(uint32_t)) {
        PyErr_SetString(PyExc_ValueError, "sequence buffer too small");
        goto done;
    }
    f = PyMem_RawMalloc(sizeof *f);
    if (!f) {
        PyErr_NoMemory();
        goto done;
    }
    f->pre = pre.buf;
    f->plen = (size_t)pre.len;
    f->dat = dat.buf;
    f->dlen = (size_t)dat.len;
    size_t nseq;
    Py_BEGIN_ALLOW_THREADS
    nseq = find(f, out.buf);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSize_t(nseq);
done:
    PyMem_RawFree(f);
    PyBuffer_Release(&pre);
    PyBuffer_Release(&dat);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_max_sequences(PyObject *self, PyObject *arg) {
    (void)self;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0)
        return PyErr_Occurred() ? NULL : PyLong_FromSize_t(1);
    return PyLong_FromSize_t(max_sequences((size_t)n));
}

/* Block maps and gathers for block deltas (store/blob.py's _changed, _equal_share and _gather): numpy
 * compared every word and built a boolean per word, then copied the selected blocks twice; these compare
 * block by block (stopping at a block's first difference) and copy once.  The numpy versions stay as the
 * reference the tests hold these to. */

/* End of block i of a length-byte plaintext cut into blocks of bs bytes (the last one may be shorter). */
static inline Py_ssize_t block_end(Py_ssize_t i, Py_ssize_t bs, Py_ssize_t length) {
    return (i + 1) * bs < length ? (i + 1) * bs : length;
}

/* changed_blocks(data, base, block_size) -> bytes, one per block of data: 1 where the block must be stored
 * (it differs from base over its range, or reaches past base's end), else 0. */
static PyObject *py_changed_blocks(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dat, base;
    Py_ssize_t bs;
    if (!PyArg_ParseTuple(args, "y*y*n", &dat, &base, &bs))
        return NULL;
    PyObject *out = NULL;
    if (bs <= 0) {
        PyErr_SetString(PyExc_ValueError, "block size must be positive");
        goto done;
    }
    const Py_ssize_t n = dat.len, nb = (n + bs - 1) / bs;
    out = PyBytes_FromStringAndSize(NULL, nb);
    if (!out)
        goto done;
    unsigned char *flags = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *d = dat.buf, *b = base.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nb; i++) {
        Py_ssize_t start = i * bs, end = block_end(i, bs, n);
        flags[i] = end > base.len || memcmp(d + start, b + start, (size_t)(end - start)) != 0;
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&dat);
    PyBuffer_Release(&base);
    return out;
}

/* equal_words(data, base, length) -> how many of the 8-byte words of data[:length] equal base's at the same
 * offset (length a multiple of 8, inside both). */
static PyObject *py_equal_words(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer dat, base;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "y*y*n", &dat, &base, &length))
        return NULL;
    PyObject *out = NULL;
    if (length < 0 || length % 8 || length > dat.len || length > base.len) {
        PyErr_SetString(PyExc_ValueError, "length must be a multiple of 8 inside both buffers");
        goto done;
    }
    const unsigned char *d = dat.buf, *b = base.buf;
    size_t equal = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < length; i += 8)
        equal += read64(d + i) == read64(b + i);
    Py_END_ALLOW_THREADS
    out = PyLong_FromSize_t(equal);
done:
    PyBuffer_Release(&dat);
    PyBuffer_Release(&base);
    return out;
}

/* gather_blocks(buf, length, flags, block_size) -> bytes: the blocks of buf[:length] whose flag (one byte per
 * block, as changed_blocks gives) is not 0, concatenated in order; each must lie inside buf. */
static PyObject *py_gather_blocks(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf, flags;
    Py_ssize_t length, bs;
    if (!PyArg_ParseTuple(args, "y*ny*n", &buf, &length, &flags, &bs))
        return NULL;
    PyObject *out = NULL;
    const unsigned char *f = flags.buf;
    Py_ssize_t total = 0;
    if (bs <= 0 || length < 0 || flags.len < (length + bs - 1) / bs) {
        PyErr_SetString(PyExc_ValueError, "bad block size, length or flags");
        goto done;
    }
    for (Py_ssize_t i = 0; i < flags.len; i++) {
        if (!f[i])
            continue;
        Py_ssize_t start = i * bs, end = block_end(i, bs, length);
        if (start >= length || end > buf.len) {
            PyErr_SetString(PyExc_ValueError, "a selected block lies outside the buffer");
            goto done;
        }
        total += end - start;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (!out)
        goto done;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *src = buf.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < flags.len; i++) {
        if (!f[i])
            continue;
        Py_ssize_t start = i * bs, end = block_end(i, bs, length);
        memcpy(o, src + start, (size_t)(end - start));
        o += end - start;
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&flags);
    return out;
}

/* block_map(payload, base_length, block_size) -> (length, frame_start, stored, taken, stored_bytes): a block
 * delta's header read and checked (store/FORMAT.md, "Delta payload", method 1).  stored and taken hold one
 * byte per block: the blocks the frame holds, and those of them that lie inside the base (whose counterparts
 * make the frame's dictionary); stored_bytes is the frame's content size.  ValueError when malformed. */
static PyObject *py_block_map(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer pay;
    Py_ssize_t base_len, bs;
    if (!PyArg_ParseTuple(args, "y*nn", &pay, &base_len, &bs))
        return NULL;
    PyObject *out = NULL, *stored = NULL, *taken = NULL;
    const unsigned char *p = pay.buf;
    if (bs <= 0 || base_len < 0) {
        PyErr_SetString(PyExc_ValueError, "bad block size or base length");
        goto done;
    }
    if (pay.len < 5) {
        PyErr_SetString(PyExc_ValueError, "truncated block delta");
        goto done;
    }
    const Py_ssize_t n = (Py_ssize_t)((uint32_t)p[1] | (uint32_t)p[2] << 8 | (uint32_t)p[3] << 16 | (uint32_t)p[4] << 24);
    const Py_ssize_t nb = (n + bs - 1) / bs, pos = 5 + (nb + 7) / 8;
    if (pay.len < pos) {
        PyErr_SetString(PyExc_ValueError, "truncated block map");
        goto done;
    }
    const unsigned char *bits = p + 5;
    if (nb % 8 && bits[nb / 8] & (0xFF >> (nb % 8))) {
        PyErr_SetString(PyExc_ValueError, "block map has bits past its last block");
        goto done;
    }
    stored = PyBytes_FromStringAndSize(NULL, nb);
    taken = PyBytes_FromStringAndSize(NULL, nb);
    if (!stored || !taken)
        goto done;
    unsigned char *s = (unsigned char *)PyBytes_AS_STRING(stored), *t = (unsigned char *)PyBytes_AS_STRING(taken);
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < nb; i++) {
        const Py_ssize_t start = i * bs, end = block_end(i, bs, n);
        const int bit = bits[i / 8] >> (7 - i % 8) & 1, inside = end <= base_len;
        if (!bit && !inside) {
            PyErr_SetString(PyExc_ValueError, "a block taken from the base lies outside it");
            goto done;
        }
        s[i] = (unsigned char)bit;
        t[i] = (unsigned char)(bit && inside);
        size += bit ? end - start : 0;
    }
    out = Py_BuildValue("nnOOn", n, pos, stored, taken, size);
done:
    Py_XDECREF(stored);
    Py_XDECREF(taken);
    PyBuffer_Release(&pay);
    return out;
}

/* scatter_blocks(buf, new, stored, length, block_size): the blocks of new, in order, written over the blocks of
 * buf whose stored flag is set (a last block cut short by length is zero past it); buf holds whole blocks. */
static PyObject *py_scatter_blocks(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf, src, flags;
    Py_ssize_t length, bs;
    if (!PyArg_ParseTuple(args, "w*y*y*nn", &buf, &src, &flags, &length, &bs))
        return NULL;
    PyObject *out = NULL;
    const unsigned char *f = flags.buf;
    Py_ssize_t need = 0;
    if (bs <= 0 || length < 0 || flags.len != (length + bs - 1) / bs || buf.len < flags.len * bs) {
        PyErr_SetString(PyExc_ValueError, "bad block size, length, flags or buffer");
        goto done;
    }
    for (Py_ssize_t i = 0; i < flags.len; i++)
        if (f[i])
            need += block_end(i, bs, length) - i * bs;
    if (src.len != need) {
        PyErr_SetString(PyExc_ValueError, "the new blocks do not fill the stored blocks");
        goto done;
    }
    unsigned char *o = buf.buf;
    const unsigned char *from = src.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < flags.len; i++) {
        if (!f[i])
            continue;
        const Py_ssize_t start = i * bs, end = block_end(i, bs, length);
        memcpy(o + start, from, (size_t)(end - start));
        memset(o + end, 0, (size_t)(start + bs - end));
        from += end - start;
    }
    Py_END_ALLOW_THREADS
    out = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&src);
    PyBuffer_Release(&flags);
    return out;
}

/* A bytearray whose bytes are left as malloc gives them: only the pages later written become resident, and
 * nothing is cleared that is about to be overwritten. */
static PyObject *py_uninitialized(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

static PyMethodDef methods[] = {
    {"uninitialized", py_uninitialized, METH_O, "uninitialized(size) -> bytearray, contents undefined"},
    {"find", py_find, METH_VARARGS, "find(prefix, data, out) -> number of sequences written"},
    {"max_sequences", py_max_sequences, METH_O, "max_sequences(data length) -> records ``out`` must hold"},
    {"changed_blocks", py_changed_blocks, METH_VARARGS, "changed_blocks(data, base, block_size) -> bytes"},
    {"equal_words", py_equal_words, METH_VARARGS, "equal_words(data, base, length) -> int"},
    {"gather_blocks", py_gather_blocks, METH_VARARGS, "gather_blocks(buf, length, flags, block_size) -> bytes"},
    {"block_map", py_block_map, METH_VARARGS,
     "block_map(payload, base_length, block_size) -> (length, frame_start, stored, taken, stored_bytes)"},
    {"scatter_blocks", py_scatter_blocks, METH_VARARGS, "scatter_blocks(buf, new, stored, length, block_size)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_deltamatch", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__deltamatch(void) { return PyModule_Create(&module); }
