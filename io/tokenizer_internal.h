/* tokenizer_internal.h: what the parts of the tokenizer share; not for use outside
 * io/tokenizer*.c.
 *
 *   tokenizer.c        the byte tokenizer; the BPE built from its merges, its pre-tokenizer,
 *                      encoding and decoding
 *   tokenizer_json.c   the JSON form of both (tokenizer_to_json, tokenizer_from_json)
 *   tokenizer_train.c  the BPE trainer that `deltamla prep` runs over MPI ranks
 *
 * The two hash maps are defined here, static inline: the encoder's and the trainer's
 * inner loops look up a pair or a chunk at every step, and inline they cost no call.
 */
#ifndef DELTAMLA_TOKENIZER_INTERNAL_H
#define DELTAMLA_TOKENIZER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"
#include "util.h"

#define BPE_PRETOKENIZER "deltamla-chunks-v1"
/* Longer runs are cut: it bounds a chunk's encoding cost (quadratic in its length) and
 * keeps base64 blobs or long rules of dashes from filling the chunk table. */
#define CHUNK_MAX_BYTES 64

enum tokenizer_kind { TOKENIZER_KIND_BYTE, TOKENIZER_KIND_BPE };

/* ---- a hash map from 64-bit keys to 64-bit values (open addressing) ---- */

typedef struct u64_map {
    uint64_t *keys; /* key + 1; 0 marks an empty slot */
    int64_t *vals;
    size_t cap, count;
} u64_map;

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static inline void u64_map_init(u64_map *m, size_t expected)
{
    size_t cap = 64;
    while (cap < 2 * expected) cap *= 2;
    m->cap = cap;
    m->count = 0;
    m->keys = xcalloc(cap, sizeof *m->keys);
    m->vals = xcalloc(cap, sizeof *m->vals);
}

static inline void u64_map_free(u64_map *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static inline size_t u64_map_slot(const u64_map *m, uint64_t key)
{
    size_t mask = m->cap - 1, i = (size_t)mix64(key) & mask;
    while (m->keys[i] && m->keys[i] != key + 1) i = (i + 1) & mask;
    return i;
}

/* The value of key, or NULL when absent. */
static inline int64_t *u64_map_find(const u64_map *m, uint64_t key)
{
    size_t i = u64_map_slot(m, key);
    return m->keys[i] ? &m->vals[i] : NULL;
}

/* The value of key, inserted as `init` when absent. The pointer is valid until the
 * next insertion. */
static inline int64_t *u64_map_get(u64_map *m, uint64_t key, int64_t init)
{
    if (2 * (m->count + 1) > m->cap) {
        u64_map old = *m;
        u64_map_init(m, old.cap);
        for (size_t i = 0; i < old.cap; i++)
            if (old.keys[i]) *u64_map_get(m, old.keys[i] - 1, 0) = old.vals[i];
        u64_map_free(&old);
    }
    size_t i = u64_map_slot(m, key);
    if (!m->keys[i]) {
        m->keys[i] = key + 1;
        m->vals[i] = init;
        m->count++;
    }
    return &m->vals[i];
}

static inline uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

/* ---- a hash map from byte strings to 64-bit values; keys live in one arena ---- */

typedef struct str_entry {
    uint64_t hash; /* 0 marks an empty slot */
    size_t off;    /* key bytes at arena + off */
    uint32_t len;
    int64_t val;
} str_entry;

typedef struct str_map {
    str_entry *slots;
    size_t cap, count;
    unsigned char *arena;
    size_t arena_len, arena_cap;
} str_map;

static inline uint64_t hash_bytes(const unsigned char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a, then a final mix */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
    h = mix64(h ^ n);
    return h ? h : 1;
}

static inline void str_map_init(str_map *m)
{
    memset(m, 0, sizeof *m);
    m->cap = 1024;
    m->slots = xcalloc(m->cap, sizeof *m->slots);
}

static inline void str_map_free(str_map *m)
{
    free(m->slots);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

static inline size_t str_map_slot(const str_map *m, uint64_t h, const unsigned char *s, size_t n)
{
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    while (m->slots[i].hash &&
           !(m->slots[i].hash == h && m->slots[i].len == n && memcmp(m->arena + m->slots[i].off, s, n) == 0))
        i = (i + 1) & mask;
    return i;
}

static inline str_entry *str_map_find(const str_map *m, const unsigned char *s, size_t n)
{
    size_t i = str_map_slot(m, hash_bytes(s, n), s, n);
    return m->slots[i].hash ? &m->slots[i] : NULL;
}

/* The entry of key s[0..n), inserted with value `init` when absent; valid until the
 * next insertion. */
static inline str_entry *str_map_get(str_map *m, const unsigned char *s, size_t n, int64_t init)
{
    if (2 * (m->count + 1) > m->cap) {
        str_entry *old = m->slots;
        size_t old_cap = m->cap;
        m->cap *= 2;
        m->slots = xcalloc(m->cap, sizeof *m->slots);
        for (size_t i = 0; i < old_cap; i++) {
            if (!old[i].hash) continue;
            size_t mask = m->cap - 1, j = (size_t)old[i].hash & mask;
            while (m->slots[j].hash) j = (j + 1) & mask;
            m->slots[j] = old[i];
        }
        free(old);
    }
    uint64_t h = hash_bytes(s, n);
    size_t i = str_map_slot(m, h, s, n);
    if (!m->slots[i].hash) {
        if (m->arena_len + n > m->arena_cap) {
            size_t cap = m->arena_cap ? m->arena_cap : 4096;
            while (cap < m->arena_len + n) cap *= 2;
            unsigned char *a = realloc(m->arena, cap);
            if (!a) die("out of host memory growing the chunk table to %zu bytes", cap);
            m->arena = a;
            m->arena_cap = cap;
        }
        memcpy(m->arena + m->arena_len, s, n);
        m->slots[i] = (str_entry){h, m->arena_len, (uint32_t)n, init};
        m->arena_len += n;
        m->count++;
    }
    return &m->slots[i];
}

/* ---- the tokenizer ---- */

typedef struct encode_cache {
    str_map chunks;   /* chunk bytes -> offset of its tokens in `tokens` */
    int32_t *tokens;  /* each entry: its token count, then the tokens */
    size_t len, cap;
} encode_cache;

struct tokenizer {
    enum tokenizer_kind kind;
    int vocab_size, eot;
    int n_merges;
    int32_t *merges;     /* [n_merges][2] */
    u64_map merge_rank;  /* pair (a, b) -> merge index */
    size_t *piece_off;   /* decode: token t is piece_bytes[piece_off[t] .. piece_off[t+1]) */
    unsigned char *piece_bytes;
    encode_cache *cache; /* bpe only; written by tokenizer_encode */
};

/* A BPE tokenizer from its merges (merge i makes token 256 + i); die() unless each side
 * of a merge is a byte or an earlier merge. Returns a new tokenizer (tokenizer_free). */
tokenizer *tokenizer_bpe_from_merges(const int32_t *merges, int n_merges);

/* The length of the first chunk of s[0..n) (n > 0) by the "deltamla-chunks-v1" rules
 * (tokenizer.c); merges never cross a chunk boundary. */
size_t tokenizer_chunk_len(const unsigned char *s, size_t n);

#endif
