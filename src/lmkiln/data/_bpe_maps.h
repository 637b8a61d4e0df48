/* Hash maps of the native BPE encoder (included once, by _bpe.c): bytes → ids (the piece cache,
 * and the vocabulary when `ignore_merges` is set) and (left id, right id) → (rank, merged id). */
#ifndef LMKILN_BPE_MAPS_H
#define LMKILN_BPE_MAPS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------
 * bytes → ids tables (the piece cache, and the vocabulary when `ignore_merges` is set) */

static uint64_t pow2_at_least(uint64_t n) {
    uint64_t p = 16;
    while (p < n) p *= 2;
    return p;
}

/* Slots are 8 bytes (the hash's high half, entry index + 1; 0 = empty) and the table starts small
 * and doubles, so the slots a lookup touches stay in the CPU caches; entries, keys and ids are
 * dense arrays in insertion order. */
typedef struct {
    uint32_t key_off, key_len, ids_off, ids_len;
} Entry;

typedef struct {
    uint64_t *slots;
    uint32_t mask, max_slots;
    Entry *entries;
    uint32_t count, max_entries;
    uint8_t *keys;
    uint32_t keys_used, keys_cap;
    uint32_t *ids;
    uint32_t ids_used, ids_cap;
} Table;

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static inline uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL * (n + 1);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        for (size_t i = 0; i < n; i++) w |= (uint64_t)p[i] << (8 * i);
        h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    }
    return mix64(h);
}

static int table_init(Table *t, uint32_t max_entries, uint32_t key_bytes, uint32_t ids) {
    memset(t, 0, sizeof(*t));
    t->max_entries = max_entries ? max_entries : 1;
    t->max_slots = (uint32_t)pow2_at_least(2 * (uint64_t)t->max_entries);
    t->mask = 1023 < t->max_slots - 1 ? 1023 : t->max_slots - 1;
    t->slots = calloc((size_t)t->mask + 1, sizeof(uint64_t));
    t->entries = malloc((size_t)t->max_entries * sizeof(Entry));
    t->keys = malloc(key_bytes ? key_bytes : 1);
    t->ids = malloc((ids ? ids : 1) * sizeof(uint32_t));
    t->keys_cap = key_bytes;
    t->ids_cap = ids;
    return t->slots && t->entries && t->keys && t->ids ? 0 : -1;
}

static void table_free(Table *t) {
    free(t->slots);
    free(t->entries);
    free(t->keys);
    free(t->ids);
    memset(t, 0, sizeof(*t));
}

static void table_clear(Table *t) {
    memset(t->slots, 0, ((size_t)t->mask + 1) * sizeof(uint64_t));
    t->count = t->keys_used = t->ids_used = 0;
}

static inline int bytes_equal(const uint8_t *a, const uint8_t *b, size_t n) {
    for (; n >= 8; a += 8, b += 8, n -= 8) {
        uint64_t x, y;
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        if (x != y) return 0;
    }
    for (; n; a++, b++, n--)
        if (*a != *b) return 0;
    return 1;
}

static inline const Entry *table_get(const Table *t, const uint8_t *key, uint32_t len, uint64_t hash) {
    uint64_t tag = hash & 0xFFFFFFFF00000000ULL;
    for (uint32_t i = (uint32_t)hash & t->mask;; i = (i + 1) & t->mask) {
        uint64_t slot = t->slots[i];
        if (!slot) return NULL;
        if ((slot & 0xFFFFFFFF00000000ULL) == tag) {
            const Entry *entry = &t->entries[(uint32_t)slot - 1];
            if (entry->key_len == len && bytes_equal(t->keys + entry->key_off, key, len)) return entry;
        }
    }
}

static inline void slot_put(uint64_t *slots, uint32_t mask, uint64_t hash, uint32_t index) {
    uint32_t i = (uint32_t)hash & mask;
    while (slots[i]) i = (i + 1) & mask;
    slots[i] = (hash & 0xFFFFFFFF00000000ULL) | (index + 1);
}

/* Double the slots (rehashing every key) while they are more than half full. */
static int table_grow(Table *t) {
    uint32_t slots = t->mask + 1;
    if (2 * (uint64_t)(t->count + 1) <= slots || slots >= t->max_slots) return 0;
    uint64_t *bigger = calloc(2 * (size_t)slots, sizeof(uint64_t));
    if (!bigger) return -1;
    for (uint32_t k = 0; k < t->count; k++) {
        const Entry *entry = &t->entries[k];
        slot_put(bigger, 2 * slots - 1, hash_bytes(t->keys + entry->key_off, entry->key_len), k);
    }
    free(t->slots);
    t->slots = bigger;
    t->mask = 2 * slots - 1;
    return 0;
}

/* Insert a key that is not in the table; 0 = stored, 1 = full (nothing stored), -1 = no memory. */
static int table_put(Table *t, const uint8_t *key, uint32_t len, uint64_t hash, const uint32_t *ids,
                     uint32_t n_ids) {
    if (t->count >= t->max_entries || len > t->keys_cap - t->keys_used || n_ids > t->ids_cap - t->ids_used)
        return 1;
    if (table_grow(t)) return -1;
    slot_put(t->slots, t->mask, hash, t->count);
    t->entries[t->count++] = (Entry){t->keys_used, len, t->ids_used, n_ids};
    memcpy(t->keys + t->keys_used, key, len);
    memcpy(t->ids + t->ids_used, ids, (size_t)n_ids * sizeof(uint32_t));
    t->keys_used += len;
    t->ids_used += n_ids;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * (left id, right id) → (rank, merged id) */

typedef struct {
    uint64_t key; /* left << 32 | right; EMPTY_PAIR = empty slot */
    uint32_t rank, new_id;
} PairSlot;

#define EMPTY_PAIR UINT64_MAX

static inline uint64_t pair_key(uint32_t left, uint32_t right) { return (uint64_t)left << 32 | right; }

static inline const PairSlot *pair_get(const PairSlot *slots, uint64_t mask, uint64_t key) {
    uint64_t i = mix64(key) & mask;
    for (;;) {
        const PairSlot *s = &slots[i];
        if (s->key == key) return s;
        if (s->key == EMPTY_PAIR) return NULL;
        i = (i + 1) & mask;
    }
}

#endif
