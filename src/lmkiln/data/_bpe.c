/* Native byte-level BPE encoder with Hugging Face `tokenizers`' exact semantics (lmkiln.data._bpe).
 *
 * Pipeline per text, all of it without the GIL:
 *   1. Pre-tokenization: GPT-2's pattern
 *        '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      run as a hand-written scanner over the str's code points (`piece_end`).
 *   2. Each piece's UTF-8 bytes start as one symbol per byte (the byte-level alphabet) and are
 *      merged exactly as `tokenizers` does (`bpe_merge`): always the adjacent pair with the lowest
 *      merge rank, the leftmost one on ties, through a min-heap of (rank, position).
 *   3. A per-encoder cache maps a piece's bytes to its ids; most pieces repeat.
 * A text with a character of unknown class (unassigned in the Unicode version the class table was
 * generated from, or a lone surrogate) is reported back as None: the caller encodes it with
 * `tokenizers`. An Encoder is not thread-safe (its cache and buffers); use one per thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_bpe_classes.h"
#include "_bpe_maps.h"

enum { CLS_OTHER = 0, CLS_LETTER = 1, CLS_NUMBER = 2, CLS_SPACE = 3, CLS_UNKNOWN = 4 };
#define MAX_CODEPOINT 0x110000
static uint8_t char_class[MAX_CODEPOINT]; /* filled from BPE_CLASS_RANGES when the module loads */

#define CACHE_MAX_PIECE 64             /* bytes; longer pieces are rare and merged every time */
#define CACHE_MAX_ENTRIES (1u << 16)   /* then the cache is emptied and refills */
#define CACHE_KEY_BYTES (1u << 20)     /* and at most this many key bytes (and as many ids) */
#define MAX_PIECE_BYTES 0x3FFFFFFF     /* positions fit in int32; a longer piece goes to tokenizers */

/* ---------------------------------------------------------------------------------------------
 * The encoder object */

typedef struct {
    uint64_t key; /* rank << 32 | position: the heap pops the lowest rank, then the leftmost */
    uint32_t new_id;
} HeapItem;

typedef struct {
    uint32_t id;
    int32_t prev, next; /* -1 = none */
    int32_t len;        /* bytes; 0 = merged into its left neighbour */
} Symbol;

typedef struct {
    PyObject_HEAD
    uint32_t byte_ids[256];
    PairSlot *pairs;
    uint64_t pairs_mask;
    int ignore_merges;
    Table vocab; /* whole-piece lookup, only with ignore_merges */
    Table cache;
    PyObject **id_objects; /* a PyLong per id, so building the result lists allocates nothing */
    uint32_t n_ids;
    int busy; /* set while a call runs without the GIL: a second thread gets an error, not a race */
    /* scratch, reused across calls */
    uint32_t *out;
    size_t out_len, out_cap;
    uint8_t *utf8;
    size_t utf8_cap;
    Symbol *symbols;
    HeapItem *heap;
    size_t work_cap; /* symbols: work_cap, heap: 3 * work_cap */
} Encoder;

static int grow(void **buffer, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return 0;
    size_t cap2 = *cap ? *cap : 256;
    while (cap2 < need) cap2 *= 2;
    if (cap2 > SIZE_MAX / item) return -1;
    void *p = realloc(*buffer, cap2 * item);
    if (!p) return -1;
    *buffer = p;
    *cap = cap2;
    return 0;
}

static inline int emit(Encoder *e, uint32_t id) {
    if (e->out_len == e->out_cap && grow((void **)&e->out, &e->out_cap, e->out_len + 1, sizeof(uint32_t)))
        return -1;
    e->out[e->out_len++] = id;
    return 0;
}

static void heap_push(HeapItem *heap, size_t *size, HeapItem item) {
    size_t i = (*size)++;
    while (i) {
        size_t parent = (i - 1) / 2;
        if (heap[parent].key <= item.key) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = item;
}

static HeapItem heap_pop(HeapItem *heap, size_t *size) {
    HeapItem top = heap[0], last = heap[--(*size)];
    size_t i = 0, n = *size;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && heap[child + 1].key < heap[child].key) child++;
        if (last.key <= heap[child].key) break;
        heap[i] = heap[child];
        i = child;
    }
    if (n) heap[i] = last;
    return top;
}

static inline void push_pair(const Encoder *e, HeapItem *heap, size_t *size, const Symbol *sym, int32_t pos) {
    const PairSlot *p = pair_get(e->pairs, e->pairs_mask, pair_key(sym[pos].id, sym[sym[pos].next].id));
    if (p) heap_push(heap, size, (HeapItem){(uint64_t)p->rank << 32 | (uint32_t)pos, p->new_id});
}

/* Merge one piece (n >= 2 bytes) like tokenizers' Word::merge_all and append its ids. Each merge
 * pushes at most two pairs, so the heap never holds more than 3n items: O(n log n) for any n. */
static int bpe_merge(Encoder *e, const uint8_t *bytes, size_t n) {
    if (n > e->work_cap) {
        size_t cap = e->work_cap ? e->work_cap : 64;
        while (cap < n) cap *= 2;
        Symbol *s = realloc(e->symbols, cap * sizeof(Symbol));
        if (!s) return -1;
        e->symbols = s;
        HeapItem *h = realloc(e->heap, 3 * cap * sizeof(HeapItem));
        if (!h) return -1;
        e->heap = h;
        e->work_cap = cap;
    }
    Symbol *sym = e->symbols;
    HeapItem *heap = e->heap;
    size_t size = 0;
    for (size_t i = 0; i < n; i++)
        sym[i] = (Symbol){e->byte_ids[bytes[i]], (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1, 1};
    for (size_t i = 0; i + 1 < n; i++) push_pair(e, heap, &size, sym, (int32_t)i);
    while (size) {
        HeapItem top = heap_pop(heap, &size);
        int32_t pos = (int32_t)(top.key & 0xFFFFFFFFu);
        if (sym[pos].len == 0 || sym[pos].next < 0) continue;
        int32_t right = sym[pos].next;
        /* a stale item: the pair at pos has changed since it was pushed */
        const PairSlot *p = pair_get(e->pairs, e->pairs_mask, pair_key(sym[pos].id, sym[right].id));
        if (!p || p->new_id != top.new_id) continue;
        sym[pos].id = top.new_id;
        sym[pos].len += sym[right].len;
        sym[pos].next = sym[right].next;
        sym[right].len = 0;
        if (sym[pos].next >= 0) sym[sym[pos].next].prev = pos;
        if (sym[pos].prev >= 0) push_pair(e, heap, &size, sym, sym[pos].prev);
        if (sym[pos].next >= 0) push_pair(e, heap, &size, sym, pos);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        if (emit(e, sym[i].id)) return -1;
    return 0;
}

/* Ids of one piece's UTF-8 bytes, appended to e->out. */
static int encode_piece(Encoder *e, const uint8_t *bytes, size_t n) {
    if (n == 1) return emit(e, e->byte_ids[bytes[0]]);
    uint64_t hash = 0;
    if (e->ignore_merges && n <= UINT32_MAX) {
        hash = hash_bytes(bytes, n);
        const Entry *s = table_get(&e->vocab, bytes, (uint32_t)n, hash);
        if (s) return emit(e, e->vocab.ids[s->ids_off]);
    }
    if (n > CACHE_MAX_PIECE) return bpe_merge(e, bytes, n);
    if (!e->ignore_merges) hash = hash_bytes(bytes, n);
    const Entry *s = table_get(&e->cache, bytes, (uint32_t)n, hash);
    if (s) {
        if (grow((void **)&e->out, &e->out_cap, e->out_len + s->ids_len, sizeof(uint32_t))) return -1;
        memcpy(e->out + e->out_len, e->cache.ids + s->ids_off, (size_t)s->ids_len * sizeof(uint32_t));
        e->out_len += s->ids_len;
        return 0;
    }
    size_t start = e->out_len;
    if (bpe_merge(e, bytes, n)) return -1;
    uint32_t count = (uint32_t)(e->out_len - start);
    int full = table_put(&e->cache, bytes, (uint32_t)n, hash, e->out + start, count);
    if (full == 1) {
        table_clear(&e->cache);
        full = table_put(&e->cache, bytes, (uint32_t)n, hash, e->out + start, count);
    }
    return full < 0 ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Pre-tokenization over a str's code points (Latin-1, UCS-2 or UCS-4 storage) */

typedef struct {
    const void *data;
    Py_ssize_t length;
    int kind;  /* PyUnicode_1BYTE_KIND, 2BYTE or 4BYTE */
    int ascii; /* then the data is its own UTF-8 */
} Text;

static inline uint32_t char_at(const Text *t, Py_ssize_t i) {
    switch (t->kind) {
    case PyUnicode_1BYTE_KIND: return ((const uint8_t *)t->data)[i];
    case PyUnicode_2BYTE_KIND: return ((const uint16_t *)t->data)[i];
    default: return ((const uint32_t *)t->data)[i];
    }
}

static inline int class_at(const Text *t, Py_ssize_t i) {
    uint32_t c = char_at(t, i);
    return c < MAX_CODEPOINT ? char_class[c] : CLS_UNKNOWN;
}

static inline Py_ssize_t run_end(const Text *t, Py_ssize_t i, int cls) {
    while (i < t->length && class_at(t, i) == cls) i++;
    return i;
}

/* Where the piece starting at i ends, by the pattern's first matching alternative:
 *   '(?:[sdmt]|ll|ve|re)    a contraction (lowercase, only where a piece starts)
 *   " ?\p{L}+" etc.         one optional U+0020, then a run of letters / numbers / other
 *   \s+(?!\S) | \s+         a run of k white-space characters: whole at the end of the text or
 *                           when k == 1; else its first k-1 characters, so that its last one
 *                           can lead the next piece (if it is U+0020 and a non-space follows,
 *                           " ?X+" takes it; otherwise it is a piece by itself). */
static Py_ssize_t piece_end(const Text *t, Py_ssize_t i, int cls) {
    Py_ssize_t n = t->length;
    uint32_t c = char_at(t, i);
    if (c == '\'' && i + 1 < n) {
        uint32_t c1 = char_at(t, i + 1);
        if (c1 == 's' || c1 == 'd' || c1 == 'm' || c1 == 't') return i + 2;
        if (i + 2 < n) {
            uint32_t c2 = char_at(t, i + 2);
            if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e')) return i + 3;
        }
    }
    if (c == ' ' && i + 1 < n) {
        int next = class_at(t, i + 1);
        if (next == CLS_LETTER || next == CLS_NUMBER || next == CLS_OTHER) return run_end(t, i + 2, next);
    }
    if (cls != CLS_SPACE) return run_end(t, i + 1, cls);
    Py_ssize_t end = run_end(t, i + 1, CLS_SPACE);
    return end == n || end - i == 1 ? end : end - 1;
}

/* UTF-8 of characters [a, b) into e->utf8 (or straight from an ASCII str's storage). */
static const uint8_t *piece_bytes(Encoder *e, const Text *t, Py_ssize_t a, Py_ssize_t b, size_t *n) {
    if (t->ascii) {
        *n = (size_t)(b - a);
        return (const uint8_t *)t->data + a;
    }
    if (grow((void **)&e->utf8, &e->utf8_cap, 4 * (size_t)(b - a), 1)) return NULL;
    uint8_t *o = e->utf8;
    for (Py_ssize_t i = a; i < b; i++) {
        uint32_t c = char_at(t, i);
        if (c < 0x80) {
            *o++ = (uint8_t)c;
        } else if (c < 0x800) {
            *o++ = (uint8_t)(0xC0 | c >> 6);
            *o++ = (uint8_t)(0x80 | (c & 0x3F));
        } else if (c < 0x10000) {
            *o++ = (uint8_t)(0xE0 | c >> 12);
            *o++ = (uint8_t)(0x80 | (c >> 6 & 0x3F));
            *o++ = (uint8_t)(0x80 | (c & 0x3F));
        } else {
            *o++ = (uint8_t)(0xF0 | c >> 18);
            *o++ = (uint8_t)(0x80 | (c >> 12 & 0x3F));
            *o++ = (uint8_t)(0x80 | (c >> 6 & 0x3F));
            *o++ = (uint8_t)(0x80 | (c & 0x3F));
        }
    }
    *n = (size_t)(o - e->utf8);
    return e->utf8;
}

enum { TEXT_OK = 0, TEXT_REFERENCE = 1, TEXT_NO_MEMORY = -1 };

/* Append the ids of one text to e->out; TEXT_REFERENCE when tokenizers must encode it. */
static int encode_text(Encoder *e, const Text *t) {
    for (Py_ssize_t i = 0; i < t->length;) {
        int cls = class_at(t, i);
        if (cls == CLS_UNKNOWN) return TEXT_REFERENCE;
        Py_ssize_t end = piece_end(t, i, cls);
        size_t n;
        const uint8_t *bytes = piece_bytes(e, t, i, end, &n);
        if (!bytes) return TEXT_NO_MEMORY;
        if (n > MAX_PIECE_BYTES) return TEXT_REFERENCE;
        if (encode_piece(e, bytes, n)) return TEXT_NO_MEMORY;
        i = end;
    }
    return TEXT_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Python interface */

static void Encoder_dealloc(Encoder *e) {
    if (e->id_objects) {
        for (uint32_t i = 0; i < e->n_ids; i++) Py_XDECREF(e->id_objects[i]);
        PyMem_Free(e->id_objects);
    }
    PyMem_Free(e->pairs);
    table_free(&e->vocab);
    table_free(&e->cache);
    free(e->out);
    free(e->utf8);
    free(e->symbols);
    free(e->heap);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int read_id(PyObject *obj, uint32_t *id, uint32_t *n_ids) {
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    if (v >= 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "token id out of range");
        return -1;
    }
    *id = (uint32_t)v;
    if (*id + 1 > *n_ids) *n_ids = *id + 1;
    return 0;
}

static int read_merges(Encoder *e, PyObject *merges, uint32_t *n_ids) {
    PyObject *seq = PySequence_Fast(merges, "merges must be a sequence of (left, right, rank, new) tuples");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    e->pairs_mask = pow2_at_least(2 * (uint64_t)n + 1) - 1;
    e->pairs = PyMem_Malloc((e->pairs_mask + 1) * sizeof(PairSlot));
    if (!e->pairs) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (uint64_t i = 0; i <= e->pairs_mask; i++) e->pairs[i].key = EMPTY_PAIR;
    for (Py_ssize_t k = 0; k < n; k++) {
        uint32_t left, right, rank, new_id, ignored = 0;
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_TypeError, "each merge must be a (left, right, rank, new) tuple");
            Py_DECREF(seq);
            return -1;
        }
        if (read_id(PyTuple_GET_ITEM(item, 0), &left, n_ids) || read_id(PyTuple_GET_ITEM(item, 1), &right, n_ids) ||
            read_id(PyTuple_GET_ITEM(item, 2), &rank, &ignored) || read_id(PyTuple_GET_ITEM(item, 3), &new_id, n_ids)) {
            Py_DECREF(seq);
            return -1;
        }
        uint64_t key = pair_key(left, right), i = mix64(key) & e->pairs_mask;
        while (e->pairs[i].key != EMPTY_PAIR && e->pairs[i].key != key) i = (i + 1) & e->pairs_mask;
        e->pairs[i] = (PairSlot){key, rank, new_id}; /* a repeated pair: the later one wins, as in tokenizers */
    }
    Py_DECREF(seq);
    return 0;
}

static int read_vocab(Encoder *e, PyObject *vocab, uint32_t *n_ids) {
    PyObject *seq = PySequence_Fast(vocab, "vocab must be a sequence of (bytes, id) tuples");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t key_bytes = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "each vocab entry must be a (bytes, id) tuple");
            Py_DECREF(seq);
            return -1;
        }
        key_bytes += (uint64_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
    }
    if (key_bytes > UINT32_MAX || (uint64_t)n > UINT32_MAX / 4 ||
        table_init(&e->vocab, (uint32_t)n, (uint32_t)key_bytes, (uint32_t)n)) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, k);
        const uint8_t *key = (const uint8_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        uint32_t len = (uint32_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0)), id;
        if (read_id(PyTuple_GET_ITEM(item, 1), &id, n_ids)) {
            Py_DECREF(seq);
            return -1;
        }
        uint64_t hash = hash_bytes(key, len);
        if (len && !table_get(&e->vocab, key, len, hash) && table_put(&e->vocab, key, len, hash, &id, 1) < 0) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"byte_ids", "merges", "vocab", NULL};
    PyObject *byte_ids, *merges, *vocab = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O", keywords, &byte_ids, &merges, &vocab)) return NULL;
    Encoder *e = (Encoder *)type->tp_alloc(type, 0); /* zero-filled */
    if (!e) return NULL;
    uint32_t n_ids = 0;
    PyObject *seq = PySequence_Fast(byte_ids, "byte_ids must be a sequence of 256 ids");
    if (!seq) goto fail;
    if (PySequence_Fast_GET_SIZE(seq) != 256) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must hold exactly 256 ids");
        Py_DECREF(seq);
        goto fail;
    }
    for (int b = 0; b < 256; b++) {
        if (read_id(PySequence_Fast_GET_ITEM(seq, b), &e->byte_ids[b], &n_ids)) {
            Py_DECREF(seq);
            goto fail;
        }
    }
    Py_DECREF(seq);
    if (read_merges(e, merges, &n_ids)) goto fail;
    e->ignore_merges = vocab != Py_None;
    if (e->ignore_merges && read_vocab(e, vocab, &n_ids)) goto fail;
    if (table_init(&e->cache, CACHE_MAX_ENTRIES, CACHE_KEY_BYTES, CACHE_KEY_BYTES)) {
        PyErr_NoMemory();
        goto fail;
    }
    e->id_objects = PyMem_Calloc(n_ids ? n_ids : 1, sizeof(PyObject *));
    if (!e->id_objects) {
        PyErr_NoMemory();
        goto fail;
    }
    e->n_ids = n_ids;
    for (uint32_t i = 0; i < n_ids; i++) {
        if (!(e->id_objects[i] = PyLong_FromUnsignedLong(i))) goto fail;
    }
    return (PyObject *)e;
fail:
    Py_DECREF(e);
    return NULL;
}

static PyObject *ids_list(const Encoder *e, const uint32_t *ids, size_t n) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (size_t j = 0; j < n; j++) {
        PyObject *o = e->id_objects[ids[j]];
        Py_INCREF(o);
        PyList_SET_ITEM(list, (Py_ssize_t)j, o);
    }
    return list;
}

/* Encodes every text of `texts_arg` into e->out, without the GIL. On success returns the texts
 * as a tuple (the caller owns it) and sets *ends_out (PyMem; the caller frees it) to each text's
 * end offset in e->out, or -1 where tokenizers must encode the text. NULL with an exception set
 * on failure. */
static PyObject *encode_all(Encoder *e, PyObject *texts_arg, Py_ssize_t **ends_out) {
    /* A tuple of the texts keeps every str alive while the GIL is released. */
    PyObject *texts = PySequence_Tuple(texts_arg);
    if (!texts) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(texts);
    Text *items = PyMem_Malloc((count ? count : 1) * sizeof(Text));
    Py_ssize_t *ends = PyMem_Malloc((count ? count : 1) * sizeof(Py_ssize_t));
    if (!items || !ends) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *s = PyTuple_GET_ITEM(texts, k);
        if (!PyUnicode_Check(s)) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] is %.100s, not str", k, Py_TYPE(s)->tp_name);
            goto fail;
        }
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(s)) goto fail;
#endif
        items[k] = (Text){PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s), PyUnicode_KIND(s), PyUnicode_IS_ASCII(s)};
    }
    if (e->busy) {
        PyErr_SetString(PyExc_RuntimeError, "an Encoder was used by two threads at once; use one per thread");
        goto fail;
    }
    e->busy = 1;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    e->out_len = 0;
    for (Py_ssize_t k = 0; k < count && !failed; k++) {
        size_t start = e->out_len;
        int status = encode_text(e, &items[k]);
        if (status == TEXT_NO_MEMORY) failed = 1;
        if (status == TEXT_REFERENCE) e->out_len = start;
        ends[k] = status == TEXT_OK ? (Py_ssize_t)e->out_len : -1;
    }
    Py_END_ALLOW_THREADS
    e->busy = 0;
    if (failed) {
        PyErr_NoMemory();
        goto fail;
    }
    PyMem_Free(items);
    *ends_out = ends;
    return texts;
fail:
    PyMem_Free(items);
    PyMem_Free(ends);
    Py_DECREF(texts);
    return NULL;
}

static PyObject *Encoder_encode_batch(Encoder *e, PyObject *texts_arg) {
    Py_ssize_t *ends = NULL;
    PyObject *texts = encode_all(e, texts_arg, &ends);
    if (!texts) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(texts);
    PyObject *result = PyList_New(count);
    size_t start = 0;
    for (Py_ssize_t k = 0; result && k < count; k++) {
        PyObject *ids = Py_None;
        if (ends[k] < 0) {
            Py_INCREF(Py_None);
        } else {
            ids = ids_list(e, e->out + start, (size_t)ends[k] - start);
            if (!ids) {
                Py_CLEAR(result);
                break;
            }
            start = (size_t)ends[k];
        }
        PyList_SET_ITEM(result, k, ids);
    }
    PyMem_Free(ends);
    Py_DECREF(texts);
    return result;
}

static PyObject *Encoder_encode_flat(Encoder *e, PyObject *texts_arg) {
    Py_ssize_t *ends = NULL;
    PyObject *texts = encode_all(e, texts_arg, &ends);
    if (!texts) return NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(texts);
    PyObject *ids = PyBytes_FromStringAndSize((const char *)e->out, (Py_ssize_t)(e->out_len * sizeof(uint32_t)));
    PyObject *offsets = PyBytes_FromStringAndSize((const char *)ends, count * (Py_ssize_t)sizeof(Py_ssize_t));
    PyMem_Free(ends);
    Py_DECREF(texts);
    PyObject *result = ids && offsets ? PyTuple_Pack(2, ids, offsets) : NULL;
    Py_XDECREF(ids);
    Py_XDECREF(offsets);
    return result;
}

static PyMethodDef Encoder_methods[] = {
    {"encode_batch", (PyCFunction)Encoder_encode_batch, METH_O,
     "encode_batch(texts) -> list: each text's ids, or None where tokenizers must encode it "
     "(a character of unknown class or a lone surrogate). Runs without the GIL."},
    {"encode_flat", (PyCFunction)Encoder_encode_flat, METH_O,
     "encode_flat(texts) -> (ids, ends): every text's ids one after another (bytes of native uint32) "
     "and each text's end offset in them (bytes of native ssize_t), -1 where tokenizers must "
     "encode the text (it then has no ids in `ids`). Runs without the GIL."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lmkiln.data._bpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(byte_ids, merges, vocab=None): byte-level BPE with tokenizers' semantics.\n\n"
              "byte_ids: the id of each byte's single-byte token (256). merges: (left, right, rank, "
              "new) id tuples. vocab: (bytes, id) of every token when the model has ignore_merges "
              "(a piece that is a token is emitted whole), else None. Not thread-safe.",
    .tp_methods = Encoder_methods,
    .tp_new = Encoder_new,
};

static PyObject *char_classes(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyBytes_FromStringAndSize((const char *)char_class, MAX_CODEPOINT);
}

static PyObject *pretokenize(PyObject *module, PyObject *text) {
    (void)module;
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "text must be str, not %.100s", Py_TYPE(text)->tp_name);
        return NULL;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(text)) return NULL;
#endif
    Text t = {PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text), PyUnicode_KIND(text), PyUnicode_IS_ASCII(text)};
    PyObject *pieces = PyList_New(0);
    for (Py_ssize_t i = 0; pieces && i < t.length;) {
        int cls = class_at(&t, i);
        if (cls == CLS_UNKNOWN) {
            Py_DECREF(pieces);
            Py_RETURN_NONE;
        }
        Py_ssize_t end = piece_end(&t, i, cls);
        PyObject *piece = PyUnicode_Substring(text, i, end);
        if (!piece || PyList_Append(pieces, piece)) Py_CLEAR(pieces);
        Py_XDECREF(piece);
        i = end;
    }
    return pieces;
}

static PyMethodDef module_methods[] = {
    {"pretokenize", pretokenize, METH_O,
     "pretokenize(text) -> list[str] | None: the pieces GPT-2's pattern splits text into, or None "
     "when text has a character of unknown class (for tests)."},
    {"char_classes", char_classes, METH_NOARGS,
     "char_classes() -> bytes: the class of every code point (0 other, 1 letter, 2 number, 3 space, "
     "4 unknown)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "lmkiln.data._bpe", "Native byte-level BPE encoder (see _bpe.c).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bpe(void) {
    memset(char_class, CLS_UNKNOWN, sizeof(char_class));
    for (int r = 0; r < BPE_CLASS_RANGES_COUNT; r++) {
        uint32_t first = BPE_CLASS_RANGES[r][0], last = BPE_CLASS_RANGES[r][1];
        memset(char_class + first, (int)BPE_CLASS_RANGES[r][2], last - first + 1);
    }
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddStringConstant(m, "UNICODE_VERSION", BPE_CLASSES_UNICODE_VERSION) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
