/* The blob index's storage: blob id -> (pack number, offset, length, raw length, flags) in 49 bytes per
 * entry plus an open-addressing table of 4-byte entry numbers (store/blobindex.py says why this layout).
 *
 * Entries live in three flat columns in insertion order (ids, four uint32 fields, one flag byte), grown by
 * realloc (which moves the pages of large blocks rather than copying them).  The table holds entry number
 * + 1 (0 = empty), linear probing, load at most MAX_LOAD; a slot's home is the first 8 bytes of the id
 * (little-endian) mixed by a multiplicative hash, and every hit is confirmed on the full id.
 *
 * Table(capacity_hint, by_ref=False)
 *   by_ref: a row is the entry itself where it lies (a pointer to its kind byte; the id, offset, length and raw
 *       length follow it as an index object encodes them) and its pack number, 12 bytes where a copy took
 *       49: add_entries points at the entries of the bytes object given (kept alive: immutable, it is never
 *       moved nor resized; any other buffer is copied into one first), and rows added or replaced by value
 *       get a record of that layout in an arena of blocks that never move.
 *   t.entry_pos(id, buf) -> (by_ref) where in ``buf`` the row's entry lies, -1 when absent or elsewhere
 *   t.elsewhere(buf, pos, count) -> (by_ref) the positions (int64, native order) of those of ``count``
 *       index-object entries at ``pos`` that no row points at (other copies of their blobs, or absent)
 *   t.point(buf, pos, pack) -> (by_ref) the row of the id of the entry at ``pos`` of bytes ``buf`` points at
 *       that entry, in pack ``pack`` (another copy of the blob); False when absent
 *   len(t); t.version (changes with every change); t.slots (table size)
 *   t.find(id) -> bool; t.get(id) -> (pack, offset, length, raw, flags) or None
 *   t.add(id, pack, offset, length, raw, flags) -> bool (False: present, nothing changed)
 *   t.replace(id, pack, offset, length, raw, flags) -> bool (False: absent, nothing changed): where another
 *       copy of a blob lies, in the entry's place (the entries stay as they were: version is unchanged)
 *   t.add_many(ids, packs, offsets, lengths, raws, flags) -> number added; each column a C-contiguous
 *       buffer of integers (any width, signed or not) of one value per id, or of one value for all
 *   t.add_entries(buf, pos, count, pack[, replaced[, numbers]]) -> number added: index-object entries (see
 *       scan_entries); an entry stored whole takes the place of a delta of the same id (which a lost base
 *       may have left unreadable), whose row (id, four uint32 fields in native order, flag byte) is appended
 *       to the bytearray ``replaced`` when one is given (None: not); ``numbers``, a bytearray of one uint32
 *       (native order) per row, gets the entry's number in its pack at each row added or taken over (rows
 *       added otherwise get U32_MAX)
 *   t.row(id) -> the id's row number, or -1
 *   t.mark(ids, marks) -> the ids absent, packed: marks[row] = 1 at the row of each id present (``marks``: a
 *       writable buffer of a byte per row at least)
 *   t.contains_many(ids) -> bytes, 1 where present
 *   t.gather(ids, column, width) -> bytes: for each id, the ``width`` bytes of ``column`` at its row (row *
 *       width), one after the other; KeyError (the id) when one is absent, IndexError when the column is
 *       short of a row (a map of ids to values kept by row: store/blobindex.py's IdMap)
 *   t.kept_in(buf, pos, count, pack, numbers, sets[, marks]) -> (numbers, total, live, live_entries): of
 *       ``count`` index-object entries of pack number ``pack``, the numbers (uint32, native order) of those
 *       whose row here is that pack's and that entry's (``numbers``, as add_entries fills it; None in a by_ref
 *       table: the row is that very entry) and that are used:
 *       marked in ``marks`` (a byte per row, as ``mark`` sets them) or held by one of ``sets`` (a tuple of
 *       tables); the sum of all the entries' lengths, of those entries' lengths, and the bytes those entries
 *       take (prune's live blobs)
 *   t.copy() -> another table of the same rows in the same order (by_ref: pointing at the same entries)
 *   t.among(buf, pos, count) -> the numbers (uint32, native order) of those of ``count`` index-object entries
 *       whose id the table holds
 *   t.remove_packs(packs) -> number removed (packs: sorted, distinct uint32 buffer)
 *   t.rows(a, b) -> (ids, fields, flags) of entries a..b-1 as bytes
 *   t.memory_bytes()
 *   t.base_of(id) -> the base id of the id's row (a delta's), or None (stored whole, no base given, or absent)
 *   t.chain(id, limit) -> the bases below the id, nearest first, packed: base_of the id, then of that base, ...
 *       down to one that has none or is absent (included), at most ``limit``
 *   t.unreadable_deltas() -> the ids, packed, of the delta rows (flag KIND_DELTA) whose chain of bases does not
 *       reach a row of another kind: a base absent, a delta without a base, or a chain that loops
 *   t.copy(without=None) -> as copy(), the rows of the ids ``without`` (packed) left out
 *   t.delta_entries(buf, pos, count, marks, limit[, depths]) -> where (int64, native order) those delta entries of
 *       the ``count`` index-object entries at ``pos`` lie whose base is absent, whose base's row or own row is
 *       marked (a nonzero byte of ``marks``, a byte a row, or None: none), or whose own row's chain of bases is
 *       longer than ``limit`` (< 0: not asked): the deltas check names, found without an object per delta;
 *       ``depths`` (a byte a row, zeros at first, or None) keeps the chains' lengths found from call to call;
 *       rows past the end of either (added since) are unmarked, their lengths not kept
 *
 * Bases: a row with flag KIND_DELTA has the base id given with it (add, add_many, replace; add_entries: the
 * entry's).  A row pointing at an entry where it lies (by_ref) reads it from the entry; the others keep it
 * in ``base_ids`` (32 bytes a base), ``base_no`` (a uint32 a row, made when the first is needed) naming it:
 * 0 none (by_ref: the entry's), NO_BASE (by_ref: a record of the arena, no base), else its number + 1.  A
 * dict of bytes took some 230 bytes a delta; this takes 36, and nothing while no row has one.  add_entries
 * reports a row it replaces with its base: a presence byte and 32 bytes after the flag.
 * scan_entries(buf, pos, count[, pairs=True]) -> (end, pairs): where ``count`` entries starting at ``pos`` end
 *   (kind u8, id, offset, length, raw length as u32 little-endian; a delta's base id follows), checking each
 *   kind; ``pairs``: the id and base id of each delta among them, one after the other (empty: not asked).
 * home(id, slots) -> the slot an id's probe starts at.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ID_SIZE 32
#define FIELDS 4
#define ENTRY_SIZE (1 + ID_SIZE + 4 * 3)
#define ROW_SIZE (ID_SIZE + 4 * FIELDS + 1 + 1 + ID_SIZE) /* a row add_entries reports replaced, with its base */
#define KIND_DELTA 2
#define N_KINDS 3
#define MIX 0x9E3779B97F4A7C15ULL
#define MAX_LOAD 0.7    /* rebuild the table above this load... */
#define TARGET_LOAD 0.56 /* ...to this one (x1.25 slots), keeping table bytes per entry in [5.7, 7.2] */
#define MIN_SLOTS 16
#define U32_MAX 0xFFFFFFFFULL
#define MAX_ENTRIES (U32_MAX - 1) /* entry numbers are stored + 1 */
#define NO_BASE 0xFFFFFFFFu /* base_no of a by_ref row that is a record of its own and has no base */

typedef struct {
    PyObject_HEAD
    uint8_t *ids;
    uint32_t *fields;
    uint8_t *flags;
    /* by_ref: rows are entries where they lie (refs: each at its kind byte, the id following) and their pack
     * numbers; the entries lie in the bytes objects ``held`` keeps alive (immutable, never resized), or in
     * the arena's records (an entry of the same layout) for rows added or moved by value. */
    const uint8_t **refs;
    uint32_t *packs;
    PyObject *held;
    uint8_t **arena;
    Py_ssize_t arena_blocks, arena_used;
    int by_ref;
    uint32_t *base_no;  /* NULL until a row needs it: see the top of this file */
    uint8_t *base_ids;
    Py_ssize_t n_bases, bases_cap;
    uint32_t *table;
    Py_ssize_t n, cap, slots, max_fill;
    unsigned long long version;
} Table;

#define ARENA_RECORDS 4096 /* records per arena block; a block never moves */

static inline const uint8_t *id_at(const Table *t, Py_ssize_t e) {
    return t->by_ref ? t->refs[e] + 1 : t->ids + (size_t)e * ID_SIZE;
}

static inline uint32_t pack_at(const Table *t, Py_ssize_t e) {
    return t->by_ref ? t->packs[e] : t->fields[(size_t)e * FIELDS];
}

static inline uint8_t flag_at(const Table *t, Py_ssize_t e) {
    return t->by_ref ? t->refs[e][0] : t->flags[e];
}

static inline uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void fields_at(const Table *t, Py_ssize_t e, uint32_t f[FIELDS]) {
    if (!t->by_ref) {
        memcpy(f, t->fields + (size_t)e * FIELDS, FIELDS * sizeof(uint32_t));
        return;
    }
    const uint8_t *p = t->refs[e];
    f[0] = t->packs[e];
    f[1] = le32(p + 1 + ID_SIZE);
    f[2] = le32(p + 5 + ID_SIZE);
    f[3] = le32(p + 9 + ID_SIZE);
}

static inline void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* A record of the arena (an entry: flag, id, offset, length, raw length), NULL with an exception set. */
static uint8_t *arena_record(Table *t, const uint8_t *id, const uint32_t f[FIELDS], uint8_t flag) {
    if (!t->arena_blocks || t->arena_used == ARENA_RECORDS) {
        uint8_t **blocks = realloc(t->arena, (size_t)(t->arena_blocks + 1) * sizeof(uint8_t *));
        if (!blocks) {
            PyErr_NoMemory();
            return NULL;
        }
        t->arena = blocks;
        if (!(blocks[t->arena_blocks] = malloc((size_t)ARENA_RECORDS * ENTRY_SIZE))) {
            PyErr_NoMemory();
            return NULL;
        }
        t->arena_blocks++;
        t->arena_used = 0;
    }
    uint8_t *r = t->arena[t->arena_blocks - 1] + (size_t)t->arena_used++ * ENTRY_SIZE;
    r[0] = flag;
    memcpy(r + 1, id, ID_SIZE);
    put_le32(r + 1 + ID_SIZE, f[1]);
    put_le32(r + 5 + ID_SIZE, f[2]);
    put_le32(r + 9 + ID_SIZE, f[3]);
    return r;
}

/* The base id of row ``e``, or NULL (see the top of this file). */
static inline const uint8_t *base_at(const Table *t, Py_ssize_t e) {
    uint32_t k = t->base_no ? t->base_no[e] : 0;
    if (!k) return t->by_ref && t->refs[e][0] == KIND_DELTA ? t->refs[e] + ENTRY_SIZE : NULL;
    return k == NO_BASE ? NULL : t->base_ids + (size_t)(k - 1) * ID_SIZE;
}

/* Whether a row keeps its base itself: it points at no held entry (``record``: a by_ref row of the arena). */
static inline int own_base(const Table *t, int record) {
    return !t->by_ref || record;
}

/* Room for what put_base(t, e, base, record) stores: the column of base numbers, and a slot for a base where
 * the row has none yet (``e`` -1: a new row).  -1 with an exception set; nothing changes but capacity. */
static int base_room(Table *t, Py_ssize_t e, const uint8_t *base, int record) {
    int own = own_base(t, record);
    if (!(own && base) && !(t->by_ref && record)) return 0; /* nothing to store beyond a 0 */
    if (!t->base_no && !(t->base_no = calloc((size_t)t->cap, sizeof(uint32_t)))) {
        PyErr_NoMemory();
        return -1;
    }
    uint32_t k = e >= 0 ? t->base_no[e] : 0;
    if (!base || (k && k != NO_BASE) || t->n_bases < t->bases_cap) return 0;
    if ((unsigned long long)t->n_bases >= NO_BASE - 1) {
        PyErr_SetString(PyExc_OverflowError, "too many delta bases in one blob index");
        return -1;
    }
    Py_ssize_t cap = t->bases_cap + t->bases_cap / 8;
    if (cap < 64) cap = 64;
    uint8_t *ids = realloc(t->base_ids, (size_t)cap * ID_SIZE);
    if (!ids) {
        PyErr_NoMemory();
        return -1;
    }
    t->base_ids = ids;
    t->bases_cap = cap;
    return 0;
}

/* Row ``e``'s base is ``base`` (NULL: none); ``record``: a by_ref row that is a record of the arena, else one
 * pointing at its entry (whose base it is).  base_room made room first: this cannot fail.  A base replaced
 * by none leaves its slot unused until the bases are compacted (remove_packs, copy). */
static void put_base(Table *t, Py_ssize_t e, const uint8_t *base, int record) {
    if (!t->base_no) return; /* no row has a number: and base_room found none needed */
    uint32_t k = t->base_no[e];
    if (base && own_base(t, record)) {
        if (!k || k == NO_BASE) k = (uint32_t)++t->n_bases;
        memcpy(t->base_ids + (size_t)(k - 1) * ID_SIZE, base, ID_SIZE);
        t->base_no[e] = k;
        return;
    }
    t->base_no[e] = t->by_ref && record ? NO_BASE : 0;
}

/* Whether row ``e`` of a by_ref table is a record of the arena (every one has a base number). */
static inline int is_record(const Table *t, Py_ssize_t e) {
    return t->by_ref && t->base_no && t->base_no[e];
}

/* The bases' slots renumbered in row order, those no row names let go of (rows removed, bases replaced). */
static void compact_bases(Table *t) {
    if (!t->base_no) return;
    Py_ssize_t live = 0;
    for (Py_ssize_t e = 0; e < t->n; e++) live += t->base_no[e] && t->base_no[e] != NO_BASE;
    if (live == t->n_bases && t->bases_cap <= live + live / 8 + 64) return;
    uint8_t *ids = live ? malloc((size_t)live * ID_SIZE) : NULL;
    if (live && !ids) return; /* kept as they are: all still valid */
    Py_ssize_t j = 0;
    for (Py_ssize_t e = 0; e < t->n; e++) {
        uint32_t k = t->base_no[e];
        if (!k || k == NO_BASE) continue;
        memcpy(ids + (size_t)j * ID_SIZE, t->base_ids + (size_t)(k - 1) * ID_SIZE, ID_SIZE);
        t->base_no[e] = (uint32_t)++j;
    }
    free(t->base_ids);
    t->base_ids = ids;
    t->n_bases = t->bases_cap = live;
}

static inline Py_ssize_t home_of(const uint8_t *id, Py_ssize_t slots) {
    uint64_t h = (le64(id) * MIX) >> 32;
    return (Py_ssize_t)((h * (uint64_t)slots) >> 32);
}

static Py_ssize_t slots_for(Py_ssize_t entries, double load) {
    Py_ssize_t s = (Py_ssize_t)((double)entries / load) + 1;
    return s < MIN_SLOTS ? MIN_SLOTS : s;
}

/* Entry number of ``id``, or -1 with the empty slot where it would go in *slot. */
static Py_ssize_t find(const Table *t, const uint8_t *id, Py_ssize_t *slot) {
    Py_ssize_t s = home_of(id, t->slots);
    for (;;) {
        uint32_t e = t->table[s];
        if (!e) {
            if (slot) *slot = s;
            return -1;
        }
        if (memcmp(id_at(t, (Py_ssize_t)e - 1), id, ID_SIZE) == 0) return (Py_ssize_t)e - 1;
        if (++s == t->slots) s = 0;
    }
}

/* Batches look ids up out of cache: the table slot of the id PREFETCH_SLOT ahead is fetched, and the entry
 * that slot names for the id PREFETCH_ROW ahead, so the misses of several lookups overlap (adds change the
 * table as they go; lookups alone go by groups of LOOKUP_GROUP). */
#define PREFETCH_SLOT 16
#define PREFETCH_ROW 8
#define LOOKUP_GROUP 64 /* contains_many: lookups whose misses overlap */

#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)(p))
#endif

static inline void prefetch(const Table *t, const uint8_t *ids, Py_ssize_t i, Py_ssize_t m) {
    if (i + PREFETCH_SLOT < m) PREFETCH(&t->table[home_of(ids + (size_t)(i + PREFETCH_SLOT) * ID_SIZE, t->slots)]);
    if (i + PREFETCH_ROW < m) {
        uint32_t e = t->table[home_of(ids + (size_t)(i + PREFETCH_ROW) * ID_SIZE, t->slots)];
        if (e) PREFETCH(id_at(t, (Py_ssize_t)e - 1));
    }
}

static void place(Table *t, Py_ssize_t e) {
    Py_ssize_t s = home_of(id_at(t, e), t->slots);
    while (t->table[s])
        if (++s == t->slots) s = 0;
    t->table[s] = (uint32_t)(e + 1);
}

/* A fresh table of ``slots`` slots holding every entry.  The old table is freed first, so two are never
 * alive at once; should the new one not fit, the old size is tried again.  Should that not fit either
 * (another thread took the room), the table is left lost, its entries kept: ``ready`` builds it again. */
static int rebuild(Table *t, Py_ssize_t slots) {
    if ((unsigned long long)slots > U32_MAX) {
        PyErr_Format(PyExc_OverflowError, "a blob index holds at most %llu entries",
                     (unsigned long long)(U32_MAX * MAX_LOAD));
        return -1;
    }
    int failed = 0;
    free(t->table);
    t->table = calloc((size_t)slots, sizeof(uint32_t));
    if (!t->table && t->slots && t->slots != slots) { /* the size just freed held every entry: take it again */
        failed = 1;
        slots = t->slots;
        t->table = calloc((size_t)slots, sizeof(uint32_t));
    }
    if (!t->table) {
        t->slots = t->max_fill = 0;
        PyErr_NoMemory();
        return -1;
    }
    t->slots = slots;
    t->max_fill = (Py_ssize_t)((double)slots * MAX_LOAD);
    for (Py_ssize_t e = 0; e < t->n; e++) place(t, e);
    if (failed) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Whether the table may be used: one a rebuild lost for want of memory is built again first. */
static int ready(Table *t) {
    return t->table ? 0 : rebuild(t, slots_for(t->n + 1, TARGET_LOAD));
}

/* Columns for ``cap`` rows.  Should a block not grow, -1 with an exception set (those grown stay grown: valid);
 * should one not shrink, it stays larger: valid too. */
static int set_capacity(Table *t, Py_ssize_t cap) {
    int failed = 0;
    if (t->by_ref) {
        void *refs = realloc(t->refs, (size_t)cap * sizeof(*t->refs));
        if (refs) t->refs = refs;
        void *packs = refs ? realloc(t->packs, (size_t)cap * sizeof(uint32_t)) : NULL;
        if (packs) t->packs = packs;
        failed = !packs;
    } else {
        void *ids = realloc(t->ids, (size_t)cap * ID_SIZE);
        if (ids) t->ids = ids;
        void *fields = ids ? realloc(t->fields, (size_t)cap * FIELDS * sizeof(uint32_t)) : NULL;
        if (fields) t->fields = fields;
        void *flags = fields ? realloc(t->flags, (size_t)cap) : NULL;
        if (flags) t->flags = flags;
        failed = !flags;
    }
    if (!failed && t->base_no) {
        uint32_t *nos = realloc(t->base_no, (size_t)cap * sizeof(uint32_t));
        if (nos) {
            t->base_no = nos;
            if (cap > t->cap) memset(nos + t->cap, 0, (size_t)(cap - t->cap) * sizeof(uint32_t));
        }
        failed = !nos;
    }
    if (failed && cap > t->cap) {
        PyErr_NoMemory();
        return -1;
    }
    t->cap = cap; /* (a shrink: every block holds ``cap`` rows at least) */
    return 0;
}

static int reserve(Table *t, Py_ssize_t needed) {
    if ((unsigned long long)needed > MAX_ENTRIES) {
        PyErr_Format(PyExc_OverflowError, "a blob index holds at most %llu entries", MAX_ENTRIES);
        return -1;
    }
    if (needed <= t->cap) return 0;
    Py_ssize_t cap = t->cap + t->cap / 8;
    if (cap < needed) cap = needed;
    if (cap < 256) cap = 256;
    return set_capacity(t, cap);
}

/* Append an entry known to be absent; ``slot`` is its empty slot.  ``coming``: how many more may follow in this
 * call, so that one rebuild makes room for all of them.  ``ref`` (by_ref, else NULL): the entry where it lies,
 * in a held buffer; NULL: a record of the arena.  ``base``: its base (a delta's), or NULL; a row pointing at
 * its entry reads it there.  On failure nothing has changed. */
static int append(Table *t, const uint8_t *id, const uint32_t f[FIELDS], uint8_t flag, Py_ssize_t slot,
                  Py_ssize_t coming, const uint8_t *ref, const uint8_t *base) {
    int record = t->by_ref && !ref;
    if (reserve(t, t->n + 1) < 0 || base_room(t, -1, base, record) < 0) return -1;
    if (t->n + 1 > t->max_fill) {
        if (rebuild(t, slots_for(t->n + 1 + coming, TARGET_LOAD)) < 0) return -1;
        slot = -1;
    }
    Py_ssize_t e = t->n;
    if (t->by_ref) {
        const uint8_t *r = ref ? ref : arena_record(t, id, f, flag);
        if (!r) return -1;
        t->refs[e] = r;
        t->packs[e] = f[0];
    } else {
        memcpy(t->ids + (size_t)e * ID_SIZE, id, ID_SIZE);
        memcpy(t->fields + (size_t)e * FIELDS, f, FIELDS * sizeof(uint32_t));
        t->flags[e] = flag;
    }
    if (t->base_no) t->base_no[e] = 0; /* (a row removed may have left its number there) */
    put_base(t, e, base, record);
    t->n = e + 1;
    t->version++;
    if (slot >= 0)
        t->table[slot] = (uint32_t)(e + 1);
    else
        place(t, e);
    return 0;
}

static int get_id(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) return -1;
    if (view->len != ID_SIZE) {
        PyErr_Format(PyExc_ValueError, "blob id must be %d bytes, got %zd", ID_SIZE, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_ids(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *fmt = view->format ? view->format : "B";
    if (view->itemsize != 1 || (strcmp(fmt, "B") && strcmp(fmt, "b") && strcmp(fmt, "c"))) {
        PyErr_Format(PyExc_ValueError, "ids must be bytes, got items of format '%s'", fmt);
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len % ID_SIZE) {
        PyErr_Format(PyExc_ValueError, "packed ids must be a multiple of %d bytes, got %zd", ID_SIZE, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* One column of add_many: integers of any width. */
typedef struct {
    Py_buffer view;
    int is_signed;
    Py_ssize_t count;
} Column;

static int get_column(PyObject *obj, Column *c, const char *name) {
    if (PyObject_GetBuffer(obj, &c->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    const char *fmt = c->view.format ? c->view.format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    if (strlen(fmt) != 1 || !strchr("bBhHiIlLqQnN", *fmt)) {
        PyErr_Format(PyExc_TypeError, "%s must be integers, got items of format '%s'", name, c->view.format);
        PyBuffer_Release(&c->view);
        return -1;
    }
    c->is_signed = strchr("bhilqn", *fmt) != NULL;
    c->count = c->view.len / c->view.itemsize;
    return 0;
}

static int column_value(const Column *c, Py_ssize_t i, unsigned long long max, const char *name,
                        unsigned long long *out) {
    if (c->count == 1) i = 0;
    const char *p = (const char *)c->view.buf + i * c->view.itemsize;
    long long s = 0;
    unsigned long long u = 0;
    switch (c->view.itemsize) {
    case 1: if (c->is_signed) s = *(const int8_t *)p; else u = *(const uint8_t *)p; break;
    case 2: { if (c->is_signed) { int16_t v; memcpy(&v, p, 2); s = v; } else { uint16_t v; memcpy(&v, p, 2); u = v; } break; }
    case 4: { if (c->is_signed) { int32_t v; memcpy(&v, p, 4); s = v; } else { uint32_t v; memcpy(&v, p, 4); u = v; } break; }
    case 8: { if (c->is_signed) { int64_t v; memcpy(&v, p, 8); s = v; } else { uint64_t v; memcpy(&v, p, 8); u = v; } break; }
    default:
        PyErr_Format(PyExc_TypeError, "%s: unsupported integer width %zd", name, c->view.itemsize);
        return -1;
    }
    if (c->is_signed) {
        if (s < 0) goto range;
        u = (unsigned long long)s;
    }
    if (u > max) goto range;
    *out = u;
    return 0;
range:
    PyErr_Format(PyExc_ValueError, "%s out of range 0..%llu", name, max);
    return -1;
}

static void Table_dealloc(Table *t) {
    free(t->ids);
    free(t->fields);
    free(t->flags);
    free(t->refs);
    free(t->packs);
    for (Py_ssize_t b = 0; b < t->arena_blocks; b++) free(t->arena[b]);
    free(t->arena);
    Py_XDECREF(t->held);
    free(t->table);
    free(t->base_no);
    free(t->base_ids);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *Table_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Py_ssize_t hint = 0;
    int by_ref = 0;
    static char *kwlist[] = {"capacity_hint", "by_ref", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|np", kwlist, &hint, &by_ref)) return NULL;
    if (hint < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity_hint must not be negative");
        return NULL;
    }
    if ((unsigned long long)hint > MAX_ENTRIES) {
        PyErr_Format(PyExc_OverflowError, "a blob index holds at most %llu entries", MAX_ENTRIES);
        return NULL;
    }
    Table *t = (Table *)type->tp_alloc(type, 0);
    if (!t) return NULL;
    t->by_ref = by_ref;
    Py_ssize_t cap = hint < 16 ? 16 : hint;
    t->slots = slots_for(cap, 0.68);
    t->max_fill = (Py_ssize_t)((double)t->slots * MAX_LOAD);
    t->table = calloc((size_t)t->slots, sizeof(uint32_t));
    if (!t->table) {
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    if (set_capacity(t, cap) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static Py_ssize_t Table_len(Table *t) { return t->n; }

/* The row of the id ``arg``: -1 when absent, -2 with an exception set. */
static Py_ssize_t row_of(Table *t, PyObject *arg) {
    Py_buffer id;
    if (ready(t) < 0 || get_id(arg, &id) < 0) return -2;
    Py_ssize_t e = find(t, id.buf, NULL);
    PyBuffer_Release(&id);
    return e;
}

static PyObject *Table_find(Table *t, PyObject *arg) {
    Py_ssize_t e = row_of(t, arg);
    return e == -2 ? NULL : PyBool_FromLong(e >= 0);
}

static PyObject *Table_get(Table *t, PyObject *arg) {
    Py_buffer id;
    if (ready(t) < 0) return NULL;
    if (get_id(arg, &id) < 0) return NULL;
    Py_ssize_t e = find(t, id.buf, NULL);
    PyBuffer_Release(&id);
    if (e < 0) Py_RETURN_NONE;
    uint32_t f[FIELDS];
    fields_at(t, e, f);
    return Py_BuildValue("(kkkkB)", (unsigned long)f[0], (unsigned long)f[1], (unsigned long)f[2],
                         (unsigned long)f[3], flag_at(t, e));
}

/* An optional base id (None: none) in ``view``, its bytes (NULL: none) in *base; -1 with an exception set. */
static int get_base(PyObject *obj, Py_buffer *view, const uint8_t **base) {
    *base = NULL;
    if (!obj || obj == Py_None) return 0;
    if (get_id(obj, view) < 0) return -1;
    *base = view->buf;
    return 0;
}

/* The arguments of add and replace: an id (held in ``id``, to release), its fields, checked, and its base (held
 * in ``base_view`` where *base is set; kept for a delta only). */
static int parse_row(PyObject *args, Py_buffer *id, uint32_t f[FIELDS], uint8_t *flag, Py_buffer *base_view,
                     const uint8_t **base) {
    unsigned long long v[FIELDS];
    int fl;
    PyObject *id_obj, *base_obj = Py_None;
    *base = NULL;
    if (!PyArg_ParseTuple(args, "OKKKKi|O", &id_obj, &v[0], &v[1], &v[2], &v[3], &fl, &base_obj)) return -1;
    for (int i = 0; i < FIELDS; i++) {
        if (v[i] > U32_MAX) {
            PyErr_Format(PyExc_ValueError, "field out of range 0..%llu: %llu", U32_MAX, v[i]);
            return -1;
        }
        f[i] = (uint32_t)v[i];
    }
    if (fl < 0 || fl > 255) {
        PyErr_Format(PyExc_ValueError, "flags must be an integer 0..255, got %d", fl);
        return -1;
    }
    *flag = (uint8_t)fl;
    if (get_base(base_obj, base_view, base) < 0) return -1;
    if (get_id(id_obj, id) < 0) {
        if (*base) PyBuffer_Release(base_view);
        *base = NULL;
        return -1;
    }
    return 0;
}

static PyObject *Table_add(Table *t, PyObject *args) {
    Py_buffer id, bv;
    uint32_t f[FIELDS];
    uint8_t flag;
    const uint8_t *base;
    if (ready(t) < 0 || parse_row(args, &id, f, &flag, &bv, &base) < 0) return NULL;
    Py_ssize_t slot;
    int added = find(t, id.buf, &slot) < 0;
    int rc = added ? append(t, id.buf, f, flag, slot, 0, NULL, flag == KIND_DELTA ? base : NULL) : 0;
    PyBuffer_Release(&id);
    if (base) PyBuffer_Release(&bv);
    if (rc < 0) return NULL;
    return PyBool_FromLong(added);
}

static PyObject *Table_replace(Table *t, PyObject *args) {
    Py_buffer id, bv;
    uint32_t f[FIELDS];
    uint8_t flag;
    const uint8_t *given;
    if (ready(t) < 0 || parse_row(args, &id, f, &flag, &bv, &given) < 0) return NULL;
    Py_ssize_t e = find(t, id.buf, NULL);
    PyBuffer_Release(&id);
    const uint8_t *base = flag == KIND_DELTA ? given : NULL;
    PyObject *out = Py_False;
    if (e >= 0) {
        out = NULL;
        if (base_room(t, e, base, t->by_ref) < 0) goto done;
        if (t->by_ref) { /* a record of its own: the entry pointed at stays as it lies */
            const uint8_t *r = arena_record(t, id_at(t, e), f, flag);
            if (!r) goto done;
            t->refs[e] = r;
            t->packs[e] = f[0];
        } else {
            memcpy(t->fields + (size_t)e * FIELDS, f, sizeof(uint32_t) * FIELDS);
            t->flags[e] = flag; /* no new version: an iteration may go on over the same entries */
        }
        put_base(t, e, base, t->by_ref);
        out = Py_True;
    }
done:
    if (given) PyBuffer_Release(&bv);
    Py_XINCREF(out);
    return out;
}

static PyObject *Table_base_of(Table *t, PyObject *arg) {
    Py_buffer id;
    if (ready(t) < 0 || get_id(arg, &id) < 0) return NULL;
    Py_ssize_t e = find(t, id.buf, NULL);
    PyBuffer_Release(&id);
    const uint8_t *base = e < 0 ? NULL : base_at(t, e);
    if (!base) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)base, ID_SIZE);
}

/* chain(id, limit): the bases below the id's row, nearest first, packed: each row's base, down to a row of
 * another kind, a base absent (the last given), or ``limit`` bases. */
static PyObject *Table_chain(Table *t, PyObject *args) {
    PyObject *id_obj;
    Py_ssize_t limit;
    Py_buffer id;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "On", &id_obj, &limit)) return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return NULL;
    }
    if (get_id(id_obj, &id) < 0) return NULL;
    Py_ssize_t e = find(t, id.buf, NULL), k = 0;
    PyBuffer_Release(&id);
    PyObject *out = PyBytes_FromStringAndSize(NULL, limit * ID_SIZE);
    if (!out) return NULL;
    const uint8_t *base;
    while (e >= 0 && k < limit && (base = base_at(t, e))) {
        memcpy(PyBytes_AS_STRING(out) + k++ * ID_SIZE, base, ID_SIZE);
        e = find(t, base, NULL);
    }
    if (_PyBytes_Resize(&out, k * ID_SIZE) < 0) return NULL;
    return out;
}

static PyObject *Table_add_many(Table *t, PyObject *args) {
    static const char *names[] = {"pack_no", "offsets", "lengths", "raw_lengths", "flags"};
    PyObject *ids_obj, *objs[FIELDS + 1], *bases_obj = Py_None;
    if (!PyArg_ParseTuple(args, "OOOOOO|O", &ids_obj, &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &bases_obj))
        return NULL;
    Py_buffer ids, bases = {0};
    if (ready(t) < 0 || get_ids(ids_obj, &ids) < 0) return NULL;
    Py_ssize_t m = ids.len / ID_SIZE, added = 0;
    Column cols[FIELDS + 1];
    int got = 0, have_bases = 0;
    if (bases_obj != Py_None) {
        if (get_ids(bases_obj, &bases) < 0) goto fail;
        have_bases = 1;
        if (bases.len != ids.len) {
            PyErr_Format(PyExc_ValueError, "%zd bases for %zd ids", bases.len / ID_SIZE, m);
            goto fail;
        }
    }
    for (; got <= FIELDS; got++) {
        if (get_column(objs[got], &cols[got], names[got]) < 0) goto fail;
        if (cols[got].count != 1 && cols[got].count != m) {
            PyErr_Format(PyExc_ValueError, "%s has %zd values for %zd ids", names[got], cols[got].count, m);
            got++;
            goto fail;
        }
    }
    /* Every value checked before anything is added: a bad batch changes nothing. */
    for (int c = 0; c <= FIELDS; c++) {
        Py_ssize_t k = cols[c].count == 1 ? 1 : m;
        unsigned long long v;
        for (Py_ssize_t i = 0; i < k; i++)
            if (column_value(&cols[c], i, c == FIELDS ? 255 : U32_MAX, names[c], &v) < 0) goto fail;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        const uint8_t *id = (const uint8_t *)ids.buf + (size_t)i * ID_SIZE;
        Py_ssize_t slot;
        prefetch(t, ids.buf, i, m);
        if (find(t, id, &slot) >= 0) continue;
        unsigned long long v;
        uint32_t f[FIELDS];
        for (int c = 0; c < FIELDS; c++) {
            column_value(&cols[c], i, U32_MAX, names[c], &v);
            f[c] = (uint32_t)v;
        }
        column_value(&cols[FIELDS], i, 255, names[FIELDS], &v);
        const uint8_t *base = have_bases && v == KIND_DELTA ? (const uint8_t *)bases.buf + (size_t)i * ID_SIZE : NULL;
        if (append(t, id, f, (uint8_t)v, slot, m - i - 1, NULL, base) < 0) goto fail;
        added++;
    }
    for (int c = 0; c < got; c++) PyBuffer_Release(&cols[c].view);
    if (have_bases) PyBuffer_Release(&bases);
    PyBuffer_Release(&ids);
    return PyLong_FromSsize_t(added);
fail:
    for (int c = 0; c < got; c++) PyBuffer_Release(&cols[c].view);
    if (have_bases) PyBuffer_Release(&bases);
    PyBuffer_Release(&ids);
    return NULL;
}

/* Walk ``count`` index-object entries from ``pos``: their end, or -1 with an exception set. */
static Py_ssize_t walk_entries(const uint8_t *buf, Py_ssize_t len, Py_ssize_t pos, Py_ssize_t count,
                               Py_ssize_t *deltas) {
    if (pos < 0 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "negative position or count");
        return -1;
    }
    *deltas = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pos > len - ENTRY_SIZE) goto truncated;
        uint8_t kind = buf[pos];
        if (kind >= N_KINDS) {
            PyErr_Format(PyExc_ValueError, "unknown blob kind %d", kind);
            return -1;
        }
        pos += ENTRY_SIZE;
        if (kind == KIND_DELTA) {
            if (pos > len - ID_SIZE) goto truncated;
            pos += ID_SIZE;
            (*deltas)++;
        }
    }
    return pos;
truncated:
    PyErr_SetString(PyExc_ValueError, "truncated entry list");
    return -1;
}

/* ``numbers`` (add_entries, kept_in): a bytearray of one uint32 per row, resized to ``rows`` rows, the new
 * ones U32_MAX; NULL with an exception set when it is not a bytearray. */
static uint32_t *number_column(PyObject *numbers, Py_ssize_t rows) {
    if (!PyByteArray_Check(numbers)) {
        PyErr_SetString(PyExc_TypeError, "numbers must be a bytearray");
        return NULL;
    }
    Py_ssize_t had = PyByteArray_GET_SIZE(numbers) / (Py_ssize_t)sizeof(uint32_t);
    if (PyByteArray_Resize(numbers, rows * (Py_ssize_t)sizeof(uint32_t)) < 0) return NULL;
    uint32_t *col = (uint32_t *)PyByteArray_AS_STRING(numbers);
    for (Py_ssize_t e = had; e < rows; e++) col[e] = (uint32_t)U32_MAX;
    return col;
}

/* Keep ``obj`` (bytes) alive while rows point into it; -1 with an exception set. */
static int hold(Table *t, PyObject *obj) {
    if (!t->held && !(t->held = PyList_New(0))) return -1;
    Py_ssize_t k = PyList_GET_SIZE(t->held);
    if (k && PyList_GET_ITEM(t->held, k - 1) == obj) return 0;
    return PyList_Append(t->held, obj);
}

static PyObject *Table_add_entries(Table *t, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, count, deltas, added = 0;
    unsigned long long pack;
    PyObject *buf_obj, *replaced = Py_None, *numbers = Py_None, *kept = NULL;
    uint32_t *col = NULL;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "OnnK|OO", &buf_obj, &pos, &count, &pack, &replaced, &numbers))
        return NULL;
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_SIMPLE) < 0) return NULL;
    if (replaced != Py_None && !PyByteArray_Check(replaced)) {
        PyErr_SetString(PyExc_TypeError, "replaced must be a bytearray or None");
        goto fail;
    }
    if (replaced != Py_None && replaced == numbers) {
        PyErr_SetString(PyExc_ValueError, "replaced and numbers must be two bytearrays");
        goto fail;
    }
    if (pack > U32_MAX) {
        PyErr_Format(PyExc_ValueError, "pack_no out of range 0..%llu", U32_MAX);
        goto fail;
    }
    Py_ssize_t end = walk_entries(buf.buf, buf.len, pos, count, &deltas);
    if (end < 0) goto fail;
    const uint8_t *src = buf.buf;
    if (t->by_ref) { /* rows point at the entries: in bytes kept alive, else in a copy of them that is */
        if (PyBytes_CheckExact(buf_obj)) {
            kept = buf_obj;
            Py_INCREF(kept);
        } else {
            if (!(kept = PyBytes_FromStringAndSize((const char *)buf.buf + pos, end - pos))) goto fail;
            pos = 0;
        }
        if (hold(t, kept) < 0) goto fail;
        src = (const uint8_t *)PyBytes_AS_STRING(kept);
    }
    if (numbers != Py_None && !(col = number_column(numbers, t->n + count))) goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *p = src + pos;
        Py_ssize_t slot;
        pos += ENTRY_SIZE + (p[0] == KIND_DELTA ? ID_SIZE : 0);
        uint32_t f[FIELDS] = {(uint32_t)pack, le32(p + 1 + ID_SIZE), le32(p + 5 + ID_SIZE), le32(p + 9 + ID_SIZE)};
        Py_ssize_t e = find(t, p + 1, &slot);
        if (e >= 0) {
            if (flag_at(t, e) == KIND_DELTA && p[0] != KIND_DELTA) { /* a copy stored whole needs no base */
                if (replaced != Py_None) {
                    Py_ssize_t at = PyByteArray_GET_SIZE(replaced);
                    if (PyByteArray_Resize(replaced, at + ROW_SIZE) < 0) goto fail;
                    uint8_t *row = (uint8_t *)PyByteArray_AS_STRING(replaced) + at;
                    uint32_t old[FIELDS];
                    fields_at(t, e, old);
                    const uint8_t *base = base_at(t, e);
                    memcpy(row, p + 1, ID_SIZE);
                    memcpy(row + ID_SIZE, old, sizeof old);
                    row[ID_SIZE + sizeof old] = flag_at(t, e);
                    row[ID_SIZE + sizeof old + 1] = base != NULL;
                    if (base) memcpy(row + ID_SIZE + sizeof old + 2, base, ID_SIZE);
                    else memset(row + ID_SIZE + sizeof old + 2, 0, ID_SIZE);
                }
                if (t->by_ref) {
                    t->refs[e] = p;
                    t->packs[e] = (uint32_t)pack;
                } else {
                    memcpy(t->fields + (size_t)e * FIELDS, f, sizeof f);
                    t->flags[e] = p[0];
                }
                put_base(t, e, NULL, 0); /* stored whole: none (by_ref: the entry's, none) */
                if (col) col[e] = (uint32_t)i;
                t->version++;
            }
            continue;
        }
        if (append(t, p + 1, f, p[0], slot, count - i - 1, t->by_ref ? p : NULL,
                   p[0] == KIND_DELTA ? p + ENTRY_SIZE : NULL) < 0)
            goto fail;
        if (col) col[t->n - 1] = (uint32_t)i;
        added++;
    }
    if (col && PyByteArray_Resize(numbers, t->n * (Py_ssize_t)sizeof(uint32_t)) < 0) goto fail;
    Py_XDECREF(kept);
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(added);
fail:
    if (col) { /* the rows added so far keep their numbers */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyByteArray_Resize(numbers, t->n * (Py_ssize_t)sizeof(uint32_t));
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(kept);
    PyBuffer_Release(&buf);
    return NULL;
}

static PyObject *Table_row(Table *t, PyObject *arg) {
    Py_ssize_t e = row_of(t, arg);
    return e == -2 ? NULL : PyLong_FromSsize_t(e);
}

static PyObject *Table_mark(Table *t, PyObject *args) {
    PyObject *ids_obj, *out = NULL;
    Py_buffer ids, marks;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "Ow*", &ids_obj, &marks)) return NULL;
    if (marks.len < t->n) {
        PyErr_SetString(PyExc_ValueError, "marks hold fewer bytes than the table rows");
        PyBuffer_Release(&marks);
        return NULL;
    }
    if (get_ids(ids_obj, &ids) < 0) {
        PyBuffer_Release(&marks);
        return NULL;
    }
    Py_ssize_t m = ids.len / ID_SIZE, absent = 0;
    const uint8_t *q = ids.buf;
    uint8_t *mk = marks.buf;
    for (Py_ssize_t i = 0; i < m; i++) {
        prefetch(t, q, i, m);
        Py_ssize_t e = find(t, q + (size_t)i * ID_SIZE, NULL);
        if (e >= 0) mk[e] = 1;
        else absent++;
    }
    out = PyBytes_FromStringAndSize(NULL, absent * ID_SIZE);
    if (out && absent) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < m; i++)
            if (find(t, q + (size_t)i * ID_SIZE, NULL) < 0) {
                memcpy(o, q + (size_t)i * ID_SIZE, ID_SIZE);
                o += ID_SIZE;
            }
    }
    PyBuffer_Release(&ids);
    PyBuffer_Release(&marks);
    return out;
}

/* kept_in: the entries of one pack (index-object entries, as add_entries takes them) that are the copy this
 * table keeps of their blob (its row: that pack's, ``numbers`` at the row that entry's number in the pack) and
 * that are used (marked in ``marks``, or in one of ``sets``, tables); prune's live blobs of a pack, found
 * without an object per entry. */
static PyObject *Table_kept_in(Table *t, PyObject *args) {
    Py_buffer buf, nums = {0}, marks = {0};
    Py_ssize_t pos, count, deltas;
    unsigned long long pack;
    PyObject *sets, *nums_obj, *marks_obj = Py_None, *out = NULL;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "y*nnKOO!|O", &buf, &pos, &count, &pack, &nums_obj, &PyTuple_Type,
                                          &sets, &marks_obj))
        return NULL;
    int have_nums = nums_obj != Py_None;
    if (have_nums ? PyObject_GetBuffer(nums_obj, &nums, PyBUF_SIMPLE) < 0 : !t->by_ref) {
        have_nums = 0;
        if (nums_obj == Py_None)
            PyErr_SetString(PyExc_TypeError, "numbers are needed where rows hold copies of the entries");
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (marks_obj != Py_None && PyObject_GetBuffer(marks_obj, &marks, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&buf);
        if (have_nums) PyBuffer_Release(&nums);
        return NULL;
    }
    const uint32_t *num = nums.buf;
    const uint8_t *mk = marks.buf;
    Py_ssize_t n_nums = have_nums ? nums.len / (Py_ssize_t)sizeof(uint32_t) : 0, n_marks = marks.buf ? marks.len : 0;
    Py_ssize_t n_sets = PyTuple_GET_SIZE(sets);
    for (Py_ssize_t k = 0; k < n_sets; k++) {
        PyObject *u = PyTuple_GET_ITEM(sets, k);
        if (!PyObject_TypeCheck(u, Py_TYPE(t))) {
            PyErr_SetString(PyExc_TypeError, "sets must be a tuple of tables");
            goto done;
        }
        if (ready((Table *)u) < 0) goto done;
    }
    if (walk_entries(buf.buf, buf.len, pos, count, &deltas) < 0) goto done;
    PyObject *ordinals = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(uint32_t));
    if (!ordinals) goto done;
    uint32_t *o = (uint32_t *)PyBytes_AS_STRING(ordinals);
    Py_ssize_t live = 0;
    unsigned long long total = 0, live_bytes = 0, live_entry_bytes = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *p = (const uint8_t *)buf.buf + pos;
        Py_ssize_t size = ENTRY_SIZE + (p[0] == KIND_DELTA ? ID_SIZE : 0);
        uint32_t length = le32(p + 5 + ID_SIZE);
        pos += size;
        total += length;
        Py_ssize_t e = find(t, p + 1, NULL);
        if (e < 0) continue;
        if (!have_nums ? t->refs[e] != p  /* by_ref: the row is this very entry */
                                : e >= n_nums || pack_at(t, e) != pack || num[e] != (uint64_t)i)
            continue;
        int used = e < n_marks && mk[e];
        for (Py_ssize_t k = 0; k < n_sets && !used; k++)
            used = find((Table *)PyTuple_GET_ITEM(sets, k), p + 1, NULL) >= 0;
        if (!used) continue;
        o[live++] = (uint32_t)i;
        live_bytes += length;
        live_entry_bytes += (unsigned long long)size;
    }
    if (_PyBytes_Resize(&ordinals, live * (Py_ssize_t)sizeof(uint32_t)) < 0) goto done;
    out = Py_BuildValue("(NKKK)", ordinals, total, live_bytes, live_entry_bytes);
done:
    PyBuffer_Release(&buf);
    if (have_nums) PyBuffer_Release(&nums);
    if (marks.buf) PyBuffer_Release(&marks);
    return out;
}

/* entry_pos(id, buf): where in ``buf`` the entry the id's row points at lies, or -1 (absent, or elsewhere). */
static PyObject *Table_entry_pos(Table *t, PyObject *args) {
    PyObject *id_obj;
    Py_buffer id, buf;
    if (!t->by_ref) {
        PyErr_SetString(PyExc_TypeError, "rows hold copies of the entries, pointing into no buffer");
        return NULL;
    }
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "Oy*", &id_obj, &buf)) return NULL;
    if (get_id(id_obj, &id) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_ssize_t e = find(t, id.buf, NULL), at = -1;
    PyBuffer_Release(&id);
    if (e >= 0) {
        uintptr_t p = (uintptr_t)t->refs[e], b = (uintptr_t)buf.buf;
        if (p >= b && p - b < (uintptr_t)buf.len) at = (Py_ssize_t)(p - b);
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(at);
}

/* point(buf, pos, pack): the row of the id of the entry at ``pos`` of ``buf`` (bytes, kept alive) points at that
 * entry, in pack number ``pack``: another copy of the blob; False (no change) where the id is absent. */
static PyObject *Table_point(Table *t, PyObject *args) {
    PyObject *buf_obj;
    Py_ssize_t pos, deltas;
    unsigned long long pack;
    if (!t->by_ref) {
        PyErr_SetString(PyExc_TypeError, "rows hold copies of the entries: replace them");
        return NULL;
    }
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "O!nK", &PyBytes_Type, &buf_obj, &pos, &pack)) return NULL;
    if (!PyBytes_CheckExact(buf_obj)) {
        PyErr_SetString(PyExc_TypeError, "buf must be bytes");
        return NULL;
    }
    if (pack > U32_MAX) {
        PyErr_Format(PyExc_ValueError, "pack_no out of range 0..%llu", U32_MAX);
        return NULL;
    }
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(buf_obj);
    if (walk_entries(b, PyBytes_GET_SIZE(buf_obj), pos, 1, &deltas) < 0) return NULL;
    Py_ssize_t e = find(t, b + pos + 1, NULL);
    if (e < 0) Py_RETURN_FALSE;
    if (hold(t, buf_obj) < 0) return NULL;
    t->refs[e] = b + pos;
    t->packs[e] = (uint32_t)pack;
    put_base(t, e, NULL, 0); /* the entry's */
    Py_RETURN_TRUE;
}

/* among(buf, pos, count): the numbers (uint32, native order) of the ``count`` index-object entries at ``pos``
 * whose id the table holds: where a pack holds copies of some blobs, found without an object per entry. */
static PyObject *Table_among(Table *t, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, count, deltas, k = 0;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "y*nn", &buf, &pos, &count)) return NULL;
    PyObject *out = NULL;
    if (walk_entries(buf.buf, buf.len, pos, count, &deltas) >= 0 &&
        (out = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(uint32_t)))) {
        uint32_t *o = (uint32_t *)PyBytes_AS_STRING(out);
        const uint8_t *b = buf.buf;
        for (Py_ssize_t i = 0; i < count; i++) {
            if (find(t, b + pos + 1, NULL) >= 0) o[k++] = (uint32_t)i;
            pos += ENTRY_SIZE + (b[pos] == KIND_DELTA ? ID_SIZE : 0);
        }
        if (_PyBytes_Resize(&out, k * (Py_ssize_t)sizeof(uint32_t)) < 0) out = NULL;
    }
    PyBuffer_Release(&buf);
    return out;
}

/* elsewhere(buf, pos, count): where (int64, native order) those of the ``count`` index-object entries at ``pos`` lie
 * whose row is not that very entry (by_ref): the other copies of blobs a pack holds, few among many. */
static PyObject *Table_elsewhere(Table *t, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, count, deltas, k = 0;
    if (!t->by_ref) {
        PyErr_SetString(PyExc_TypeError, "rows hold copies of the entries, pointing into no buffer");
        return NULL;
    }
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "y*nn", &buf, &pos, &count)) return NULL;
    PyObject *out = NULL;
    if (walk_entries(buf.buf, buf.len, pos, count, &deltas) >= 0 &&
        (out = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(int64_t)))) {
        int64_t *o = (int64_t *)PyBytes_AS_STRING(out);
        const uint8_t *b = buf.buf;
        for (Py_ssize_t i = 0; i < count; i++) {
            Py_ssize_t e = find(t, b + pos + 1, NULL);
            if (e < 0 || t->refs[e] != b + pos) o[k++] = (int64_t)pos;
            pos += ENTRY_SIZE + (b[pos] == KIND_DELTA ? ID_SIZE : 0);
        }
        if (_PyBytes_Resize(&out, k * (Py_ssize_t)sizeof(int64_t)) < 0) out = NULL;
    }
    PyBuffer_Release(&buf);
    return out;
}

/* Row ``e``'s chain of bases counted as chain() counts them, up to ``cap`` (longer ones: ``cap``).  ``memo``: a byte
 * a row of its first ``n_memo`` rows, each row's count + 1 once known (0: not yet), so that the deltas of a chain
 * walk it once; ``path``: room for ``cap`` rows.  A walk that reaches ``cap`` (a chain too long, or a loop) knows
 * only its first row's count. */
static Py_ssize_t chain_length(const Table *t, Py_ssize_t e, Py_ssize_t cap, uint8_t *memo, Py_ssize_t n_memo,
                               Py_ssize_t *path) {
    Py_ssize_t len = 0, d = 0;
    const uint8_t *base;
    for (;;) {
        if (e < 0) break; /* a base absent: counted by the row naming it */
        if (e < n_memo && memo[e]) {
            d = memo[e] - 1;
            break;
        }
        if (!(base = base_at(t, e))) {
            if (e < n_memo) memo[e] = 1;
            break;
        }
        if (len == cap) {
            if (path[0] < n_memo) memo[path[0]] = (uint8_t)(cap + 1);
            return cap;
        }
        path[len++] = e;
        e = find(t, base, NULL);
    }
    while (len--) {
        if (d < cap) d++;
        if (path[len] < n_memo) memo[path[len]] = (uint8_t)(d + 1);
    }
    return d;
}

/* A writable buffer, or None (*have 0, view->len 0); -1 with an exception set. */
static int row_bytes(PyObject *obj, Py_buffer *view, int *have) {
    *have = 0;
    view->len = 0;
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0) return -1;
    *have = 1;
    return 0;
}

/* delta_entries(buf, pos, count, marks, limit, depths): where (int64, native order) those delta entries of the
 * ``count`` index-object entries at ``pos`` lie whose base is absent, whose base's row or own row is marked (a
 * nonzero byte of ``marks``, a byte a row; None: none is), or whose own row's chain of bases is longer than
 * ``limit`` (< 0: not asked; ``depths``, a byte a row or None, keeps what the chains walked found, from one call
 * to the next: zeros at first): the few deltas check looks at, found without an object per entry.  Rows past
 * the end of ``marks`` (added since it was made: a writer's, in another thread) are not marked; past the end of
 * ``depths``, their counts are not kept. */
static PyObject *Table_delta_entries(Table *t, PyObject *args) {
    Py_buffer buf, marks = {0}, depths = {0};
    Py_ssize_t pos, count, limit, deltas, k = 0, *path = NULL;
    PyObject *marks_obj, *depths_obj = Py_None, *out = NULL;
    int have_marks = 0, have_depths = 0;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "y*nnOn|O", &buf, &pos, &count, &marks_obj, &limit, &depths_obj))
        return NULL;
    if (row_bytes(marks_obj, &marks, &have_marks) < 0 || row_bytes(depths_obj, &depths, &have_depths) < 0) goto done;
    if (limit >= 0xFE && have_depths) { /* a count + 1 above ``limit`` would not fit in a byte */
        PyErr_SetString(PyExc_ValueError, "depths are kept for a limit below 254");
        goto done;
    }
    if (walk_entries(buf.buf, buf.len, pos, count, &deltas) < 0) goto done;
    if (limit >= 0 && !(path = malloc((size_t)(limit + 1) * sizeof(Py_ssize_t)))) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(out = PyBytes_FromStringAndSize(NULL, deltas * (Py_ssize_t)sizeof(int64_t)))) goto done;
    int64_t *o = (int64_t *)PyBytes_AS_STRING(out);
    const uint8_t *b = buf.buf, *mk = marks.buf;
    Py_ssize_t n_mk = marks.len, at[LOOKUP_GROUP], home[2 * LOOKUP_GROUP];
    for (Py_ssize_t i = 0; i < count;) {
        Py_ssize_t m = 0; /* a group of deltas: their ids' and bases' slots, then the rows they name, fetched together */
        for (; i < count && m < LOOKUP_GROUP; i++) {
            if (b[pos] == KIND_DELTA) {
                at[m] = pos;
                home[2 * m] = home_of(b + pos + 1, t->slots);
                home[2 * m + 1] = home_of(b + pos + ENTRY_SIZE, t->slots);
                PREFETCH(&t->table[home[2 * m]]);
                PREFETCH(&t->table[home[2 * m + 1]]);
                m++;
                pos += ID_SIZE;
            }
            pos += ENTRY_SIZE;
        }
        for (Py_ssize_t j = 0; j < 2 * m; j++) {
            uint32_t e = t->table[home[j]];
            if (e) PREFETCH(id_at(t, (Py_ssize_t)e - 1));
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            const uint8_t *p = b + at[j];
            Py_ssize_t e = find(t, p + 1, NULL), base = find(t, p + ENTRY_SIZE, NULL);
            if (base < 0 || (base < n_mk && mk[base]) || (e >= 0 && e < n_mk && mk[e]) ||
                (limit >= 0 && e >= 0 && chain_length(t, e, limit + 1, depths.buf, depths.len, path) > limit))
                o[k++] = (int64_t)at[j];
        }
    }
    if (_PyBytes_Resize(&out, k * (Py_ssize_t)sizeof(int64_t)) < 0) out = NULL;
done:
    free(path);
    PyBuffer_Release(&buf);
    if (have_marks) PyBuffer_Release(&marks);
    if (have_depths) PyBuffer_Release(&depths);
    return out;
}

/* copy(without=None): another table of the same rows in the same order, by_ref or not as this one, the rows of
 * the ids ``without`` (packed) left out: a by_ref row points at the same entry (the buffers held by both), a
 * record of the arena gets one of its own; the bases come along, those no row names left behind. */
static PyObject *Table_copy(Table *t, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"without", NULL};
    PyObject *without_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &without_obj) || ready(t) < 0) return NULL;
    uint8_t *skip = NULL;
    Py_ssize_t kept = t->n;
    if (without_obj != Py_None) {
        Py_buffer without;
        if (get_ids(without_obj, &without) < 0) return NULL;
        Py_ssize_t m = without.len / ID_SIZE;
        if (m && !(skip = calloc((size_t)(t->n ? t->n : 1), 1))) {
            PyBuffer_Release(&without);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t i = 0; i < m; i++) {
            Py_ssize_t e = find(t, (const uint8_t *)without.buf + (size_t)i * ID_SIZE, NULL);
            if (e >= 0 && !skip[e]) {
                skip[e] = 1;
                kept--;
            }
        }
        PyBuffer_Release(&without);
    }
    Table *c = (Table *)Py_TYPE(t)->tp_alloc(Py_TYPE(t), 0);
    if (!c) {
        free(skip);
        return NULL;
    }
    c->by_ref = t->by_ref;
    if (set_capacity(c, kept > 16 ? kept : 16) < 0) goto fail;
    Py_ssize_t n_bases = 0;
    if (t->base_no) {
        for (Py_ssize_t e = 0; e < t->n; e++)
            n_bases += (!skip || !skip[e]) && t->base_no[e] && t->base_no[e] != NO_BASE;
        if (!(c->base_no = calloc((size_t)c->cap, sizeof(uint32_t)))) goto nomem;
        if (n_bases && !(c->base_ids = malloc((size_t)n_bases * ID_SIZE))) goto nomem;
        c->bases_cap = n_bases;
    }
    if (t->by_ref && t->held && !(c->held = PyList_GetSlice(t->held, 0, PyList_GET_SIZE(t->held)))) goto fail;
    if (!t->by_ref && !skip) { /* every row, as it is */
        memcpy(c->ids, t->ids, (size_t)t->n * ID_SIZE);
        memcpy(c->fields, t->fields, (size_t)t->n * FIELDS * sizeof(uint32_t));
        memcpy(c->flags, t->flags, (size_t)t->n);
    }
    Py_ssize_t w = 0;
    for (Py_ssize_t e = 0; e < t->n; e++) {
        if (skip && skip[e]) continue;
        if (t->by_ref) {
            const uint8_t *r = t->refs[e];
            if (is_record(t, e)) {
                uint32_t f[FIELDS];
                fields_at(t, e, f);
                if (!(r = arena_record(c, id_at(t, e), f, flag_at(t, e)))) goto fail;
            }
            c->refs[w] = r;
            c->packs[w] = t->packs[e];
        } else if (skip) {
            memcpy(c->ids + (size_t)w * ID_SIZE, t->ids + (size_t)e * ID_SIZE, ID_SIZE);
            memcpy(c->fields + (size_t)w * FIELDS, t->fields + (size_t)e * FIELDS, FIELDS * sizeof(uint32_t));
            c->flags[w] = t->flags[e];
        }
        if (t->base_no) {
            uint32_t k = t->base_no[e];
            if (k && k != NO_BASE) {
                memcpy(c->base_ids + (size_t)c->n_bases * ID_SIZE, t->base_ids + (size_t)(k - 1) * ID_SIZE, ID_SIZE);
                k = (uint32_t)++c->n_bases;
            }
            c->base_no[w] = k;
        }
        w++;
    }
    free(skip);
    skip = NULL;
    c->n = w;
    if (rebuild(c, slots_for(c->n, TARGET_LOAD)) < 0) goto fail;
    return (PyObject *)c;
nomem:
    PyErr_NoMemory();
fail:
    free(skip);
    Py_DECREF(c);
    return NULL;
}

/* unreadable_deltas(): the ids (packed, in row order) of the delta rows whose chain of bases does not reach a
 * row of another kind (see the top of this file); each row walked once, a byte a row marking the verdicts. */
static PyObject *Table_unreadable_deltas(Table *t, PyObject *Py_UNUSED(ignored)) {
    enum { UNKNOWN, READABLE, UNREADABLE, WALKING };
    if (ready(t) < 0) return NULL;
    uint8_t *mark = calloc((size_t)(t->n ? t->n : 1), 1);
    Py_ssize_t path_cap = 64, bad = 0;
    Py_ssize_t *path = malloc((size_t)path_cap * sizeof(Py_ssize_t));
    if (!mark || !path) {
        free(mark);
        free(path);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t start = 0; start < t->n; start++) {
        /* The table slot of a base looked up soon, then the row that slot names: their misses overlap. */
        const uint8_t *ahead;
        if (start + PREFETCH_SLOT < t->n && flag_at(t, start + PREFETCH_SLOT) == KIND_DELTA &&
            (ahead = base_at(t, start + PREFETCH_SLOT)))
            PREFETCH(&t->table[home_of(ahead, t->slots)]);
        if (start + PREFETCH_ROW < t->n && flag_at(t, start + PREFETCH_ROW) == KIND_DELTA &&
            (ahead = base_at(t, start + PREFETCH_ROW))) {
            uint32_t e = t->table[home_of(ahead, t->slots)];
            if (e) PREFETCH(id_at(t, (Py_ssize_t)e - 1));
        }
        if (mark[start] || flag_at(t, start) != KIND_DELTA) continue;
        Py_ssize_t len = 0, cur = start;
        uint8_t verdict = UNREADABLE;
        for (;;) {
            if (mark[cur] == READABLE || mark[cur] == UNREADABLE) {
                verdict = mark[cur];
                break;
            }
            if (mark[cur] == WALKING) break; /* a loop */
            if (flag_at(t, cur) != KIND_DELTA) {
                verdict = READABLE;
                break;
            }
            if (len == path_cap) {
                Py_ssize_t *more = realloc(path, (size_t)(path_cap *= 2) * sizeof(Py_ssize_t));
                if (!more) {
                    free(mark);
                    free(path);
                    return PyErr_NoMemory();
                }
                path = more;
            }
            path[len++] = cur;
            mark[cur] = WALKING;
            const uint8_t *base = base_at(t, cur);
            if (!base || (cur = find(t, base, NULL)) < 0) break;
        }
        for (Py_ssize_t i = 0; i < len; i++) mark[path[i]] = verdict;
        if (verdict == UNREADABLE) bad += len;
    }
    free(path);
    PyObject *out = PyBytes_FromStringAndSize(NULL, bad * ID_SIZE);
    if (out) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t e = 0; e < t->n; e++)
            if (mark[e] == UNREADABLE) {
                memcpy(o, id_at(t, e), ID_SIZE);
                o += ID_SIZE;
            }
    }
    free(mark);
    return out;
}

static PyObject *Table_contains_many(Table *t, PyObject *arg) {
    Py_buffer ids;
    if (ready(t) < 0 || get_ids(arg, &ids) < 0) return NULL;
    Py_ssize_t m = ids.len / ID_SIZE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, m);
    if (out) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *q = ids.buf;
        Py_ssize_t home[LOOKUP_GROUP];
        for (Py_ssize_t a = 0; a < m; a += LOOKUP_GROUP) {
            Py_ssize_t k = m - a < LOOKUP_GROUP ? m - a : LOOKUP_GROUP;
            for (Py_ssize_t i = 0; i < k; i++) { /* a group's slots, then the entries they name, fetched together */
                home[i] = home_of(q + (size_t)(a + i) * ID_SIZE, t->slots);
                PREFETCH(&t->table[home[i]]);
            }
            for (Py_ssize_t i = 0; i < k; i++) {
                uint32_t e = t->table[home[i]];
                if (e) PREFETCH(id_at(t, (Py_ssize_t)e - 1));
            }
            for (Py_ssize_t i = 0; i < k; i++)
                o[a + i] = find(t, q + (size_t)(a + i) * ID_SIZE, NULL) >= 0;
        }
    }
    PyBuffer_Release(&ids);
    return out;
}

static PyObject *Table_gather(Table *t, PyObject *args) {
    PyObject *ids_obj, *out = NULL;
    Py_buffer ids, col;
    Py_ssize_t width;
    if (ready(t) < 0 || !PyArg_ParseTuple(args, "Oy*n", &ids_obj, &col, &width)) return NULL;
    if (width < 1) {
        PyErr_SetString(PyExc_ValueError, "width must be positive");
        PyBuffer_Release(&col);
        return NULL;
    }
    if (get_ids(ids_obj, &ids) < 0) {
        PyBuffer_Release(&col);
        return NULL;
    }
    Py_ssize_t m = ids.len / ID_SIZE;
    const uint8_t *q = ids.buf;
    out = PyBytes_FromStringAndSize(NULL, m * width);
    for (Py_ssize_t i = 0; out && i < m; i++) {
        prefetch(t, q, i, m);
        Py_ssize_t e = find(t, q + (size_t)i * ID_SIZE, NULL);
        if (e < 0 || (e + 1) * width > col.len) {
            PyObject *key = PyBytes_FromStringAndSize((const char *)q + (size_t)i * ID_SIZE, ID_SIZE);
            if (key && e < 0) PyErr_SetObject(PyExc_KeyError, key);
            else if (key) PyErr_SetString(PyExc_IndexError, "the column is short of a row");
            Py_XDECREF(key);
            Py_CLEAR(out);
            break;
        }
        memcpy(PyBytes_AS_STRING(out) + i * width, (const uint8_t *)col.buf + e * width, (size_t)width);
    }
    PyBuffer_Release(&ids);
    PyBuffer_Release(&col);
    return out;
}

static int in_sorted(const uint32_t *a, Py_ssize_t k, uint32_t v) {
    Py_ssize_t lo = 0, hi = k;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (a[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo < k && a[lo] == v;
}

static PyObject *Table_remove_packs(Table *t, PyObject *arg) {
    Py_buffer packs;
    if (PyObject_GetBuffer(arg, &packs, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (packs.itemsize != 4 || !packs.format || strchr("IL", packs.format[strlen(packs.format) - 1]) == NULL) {
        PyBuffer_Release(&packs);
        PyErr_SetString(PyExc_TypeError, "packs must be a buffer of uint32");
        return NULL;
    }
    const uint32_t *p = packs.buf;
    Py_ssize_t k = packs.len / 4, w = 0;
    for (Py_ssize_t i = 1; i < k; i++)
        if (p[i] <= p[i - 1]) {
            PyBuffer_Release(&packs);
            PyErr_SetString(PyExc_ValueError, "packs must be sorted and distinct");
            return NULL;
        }
    for (Py_ssize_t e = 0; k && e < t->n; e++) {
        if (in_sorted(p, k, pack_at(t, e))) continue;
        if (w != e && t->by_ref) {
            t->refs[w] = t->refs[e];
            t->packs[w] = t->packs[e];
        } else if (w != e) {
            memcpy(t->ids + (size_t)w * ID_SIZE, t->ids + (size_t)e * ID_SIZE, ID_SIZE);
            memcpy(t->fields + (size_t)w * FIELDS, t->fields + (size_t)e * FIELDS, FIELDS * sizeof(uint32_t));
            t->flags[w] = t->flags[e];
        }
        if (w != e && t->base_no) t->base_no[w] = t->base_no[e];
        w++;
    }
    PyBuffer_Release(&packs);
    if (!k) w = t->n;
    Py_ssize_t removed = t->n - w;
    if (removed) {
        t->n = w;
        t->version++;
        compact_bases(t);
        if (t->cap > w + w / 8 + 256) set_capacity(t, w + w / 16 > 16 ? w + w / 16 : 16);
        if (rebuild(t, slots_for(w, TARGET_LOAD)) < 0) return NULL;
    }
    return PyLong_FromSsize_t(removed);
}

static PyObject *Table_rows(Table *t, PyObject *args) {
    Py_ssize_t a, b;
    if (!PyArg_ParseTuple(args, "nn", &a, &b)) return NULL;
    if (a < 0 || b > t->n || a > b) {
        PyErr_SetString(PyExc_IndexError, "rows out of range");
        return NULL;
    }
    if (t->by_ref) { /* gathered from where the entries lie */
        PyObject *ids = PyBytes_FromStringAndSize(NULL, (b - a) * ID_SIZE);
        PyObject *fields = PyBytes_FromStringAndSize(NULL, (b - a) * FIELDS * (Py_ssize_t)sizeof(uint32_t));
        PyObject *flags = PyBytes_FromStringAndSize(NULL, b - a);
        if (!ids || !fields || !flags) {
            Py_XDECREF(ids);
            Py_XDECREF(fields);
            Py_XDECREF(flags);
            return NULL;
        }
        for (Py_ssize_t e = a; e < b; e++) {
            memcpy(PyBytes_AS_STRING(ids) + (e - a) * ID_SIZE, id_at(t, e), ID_SIZE);
            fields_at(t, e, (uint32_t *)PyBytes_AS_STRING(fields) + (e - a) * FIELDS);
            PyBytes_AS_STRING(flags)[e - a] = (char)flag_at(t, e);
        }
        return Py_BuildValue("(NNN)", ids, fields, flags);
    }
    return Py_BuildValue("(y#y#y#)", (const char *)(t->ids + (size_t)a * ID_SIZE), (b - a) * ID_SIZE,
                         (const char *)(t->fields + (size_t)a * FIELDS), (b - a) * FIELDS * (Py_ssize_t)sizeof(uint32_t),
                         (const char *)(t->flags + a), b - a);
}

static size_t bases_bytes(const Table *t) {
    return (t->base_no ? (size_t)t->cap * sizeof(uint32_t) : 0) + (size_t)t->bases_cap * ID_SIZE;
}

static PyObject *Table_memory_bytes(Table *t, PyObject *Py_UNUSED(ignored)) {
    if (t->by_ref) /* the held buffers are their owners' */
        return PyLong_FromSize_t((size_t)t->cap * (sizeof(*t->refs) + sizeof(uint32_t)) +
                                 (size_t)t->arena_blocks * ARENA_RECORDS * ENTRY_SIZE +
                                 (size_t)t->slots * sizeof(uint32_t) + bases_bytes(t));
    return PyLong_FromSize_t((size_t)t->cap * (ID_SIZE + FIELDS * sizeof(uint32_t) + 1) +
                             (size_t)t->slots * sizeof(uint32_t) + bases_bytes(t));
}

static PyObject *Table_get_version(Table *t, void *Py_UNUSED(c)) { return PyLong_FromUnsignedLongLong(t->version); }
static PyObject *Table_get_slots(Table *t, void *Py_UNUSED(c)) { return PyLong_FromSsize_t(t->slots); }
static PyObject *Table_get_by_ref(Table *t, void *Py_UNUSED(c)) { return PyBool_FromLong(t->by_ref); }

static PyObject *py_scan_entries(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, count, deltas;
    int want_pairs = 1;
    if (!PyArg_ParseTuple(args, "y*nn|p", &buf, &pos, &count, &want_pairs)) return NULL;
    PyObject *pairs = NULL, *out = NULL;
    Py_ssize_t end = walk_entries(buf.buf, buf.len, pos, count, &deltas);
    if (end >= 0 && !want_pairs) deltas = 0; /* checked alone */
    if (end >= 0) pairs = PyBytes_FromStringAndSize(NULL, deltas * 2 * ID_SIZE);
    if (pairs) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(pairs);
        const uint8_t *b = buf.buf;
        for (Py_ssize_t i = 0; i < count && deltas; i++) {
            if (b[pos] == KIND_DELTA) {
                memcpy(o, b + pos + 1, ID_SIZE);
                memcpy(o + ID_SIZE, b + pos + ENTRY_SIZE, ID_SIZE);
                o += 2 * ID_SIZE;
                pos += ID_SIZE;
            }
            pos += ENTRY_SIZE;
        }
        out = Py_BuildValue("(nN)", end, pairs);
    }
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *py_home(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer id;
    Py_ssize_t slots;
    PyObject *id_obj;
    if (!PyArg_ParseTuple(args, "On", &id_obj, &slots)) return NULL;
    if (slots < 1 || (unsigned long long)slots > U32_MAX) {
        PyErr_SetString(PyExc_ValueError, "slots out of range");
        return NULL;
    }
    if (get_id(id_obj, &id) < 0) return NULL;
    Py_ssize_t h = home_of(id.buf, slots);
    PyBuffer_Release(&id);
    return PyLong_FromSsize_t(h);
}

static PyMethodDef Table_methods[] = {
    {"find", (PyCFunction)Table_find, METH_O, "find(id) -> bool"},
    {"get", (PyCFunction)Table_get, METH_O, "get(id) -> (pack, offset, length, raw, flags) or None"},
    {"add", (PyCFunction)Table_add, METH_VARARGS, "add(id, pack, offset, length, raw, flags) -> bool"},
    {"replace", (PyCFunction)Table_replace, METH_VARARGS, "replace(id, pack, offset, length, raw, flags) -> bool"},
    {"add_many", (PyCFunction)Table_add_many, METH_VARARGS,
     "add_many(ids, packs, offsets, lengths, raws, flags) -> number added"},
    {"add_entries", (PyCFunction)Table_add_entries, METH_VARARGS,
     "add_entries(buf, pos, count, pack[, replaced[, numbers]]) -> number added"},
    {"row", (PyCFunction)Table_row, METH_O, "row(id) -> row number or -1"},
    {"mark", (PyCFunction)Table_mark, METH_VARARGS, "mark(ids, marks) -> the ids absent, packed"},
    {"contains_many", (PyCFunction)Table_contains_many, METH_O, "contains_many(ids) -> bytes"},
    {"gather", (PyCFunction)Table_gather, METH_VARARGS, "gather(ids, column, width) -> each id's value, packed"},
    {"kept_in", (PyCFunction)Table_kept_in, METH_VARARGS,
     "kept_in(buf, pos, count, pack, numbers, sets[, marks]) -> (entry numbers, total, live bytes, live entry bytes)"},
    {"copy", (PyCFunction)(void (*)(void))Table_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(without=None) -> another table of the same rows, those of the ids ``without`` left out"},
    {"base_of", (PyCFunction)Table_base_of, METH_O, "base_of(id) -> the base id of a delta row, or None"},
    {"chain", (PyCFunction)Table_chain, METH_VARARGS, "chain(id, limit) -> the bases below the id, packed"},
    {"unreadable_deltas", (PyCFunction)Table_unreadable_deltas, METH_NOARGS,
     "unreadable_deltas() -> the ids of the delta rows whose chain of bases reaches no other row, packed"},
    {"among", (PyCFunction)Table_among, METH_VARARGS, "among(buf, pos, count) -> numbers of the entries held"},
    {"elsewhere", (PyCFunction)Table_elsewhere, METH_VARARGS,
     "elsewhere(buf, pos, count) -> positions of the entries no row points at"},
    {"delta_entries", (PyCFunction)Table_delta_entries, METH_VARARGS,
     "delta_entries(buf, pos, count, marks, limit[, depths]) -> where the deltas to look at lie"},
    {"entry_pos", (PyCFunction)Table_entry_pos, METH_VARARGS, "entry_pos(id, buf) -> position in buf, or -1"},
    {"point", (PyCFunction)Table_point, METH_VARARGS, "point(buf, pos, pack) -> bool"},
    {"remove_packs", (PyCFunction)Table_remove_packs, METH_O, "remove_packs(sorted uint32 packs) -> removed"},
    {"rows", (PyCFunction)Table_rows, METH_VARARGS, "rows(a, b) -> (ids, fields, flags)"},
    {"memory_bytes", (PyCFunction)Table_memory_bytes, METH_NOARGS, "bytes held, capacity included"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Table_getset[] = {
    {"version", (getter)Table_get_version, NULL, "changes with every change", NULL},
    {"slots", (getter)Table_get_slots, NULL, "table size", NULL},
    {"by_ref", (getter)Table_get_by_ref, NULL, "whether rows point at entries where they lie", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Table_as_sequence = {.sq_length = (lenfunc)Table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "chunkvault.store._blobtable.Table",
    .tp_basicsize = sizeof(Table),
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_as_sequence = &Table_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The blob index's columns and hash table.",
    .tp_methods = Table_methods,
    .tp_getset = Table_getset,
    .tp_new = Table_new,
};

static PyMethodDef methods[] = {
    {"scan_entries", py_scan_entries, METH_VARARGS, "scan_entries(buf, pos, count[, pairs]) -> (end, id + base of each delta)"},
    {"home", py_home, METH_VARARGS, "home(id, slots) -> first slot probed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blobtable", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__blobtable(void) {
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
