/* tokenizer.c: the byte tokenizer, the byte-level BPE (encoding, decoding, its JSON form)
 * and the BPE trainer that `deltamla prep` runs over MPI ranks (see tokenizer.h).
 *
 * BPE text is first cut into chunks by a fixed pre-tokenizer ("deltamla-chunks-v1",
 * described at chunk_len below); merges never cross a chunk boundary. Training counts
 * the distinct chunks of the corpus, then repeatedly merges the most frequent adjacent
 * pair of tokens (ties: the smallest pair (a, b)), each merge adding token 256 + its
 * index. Encoding applies the merges to each chunk by rank, lowest first, which
 * reproduces the training segmentation exactly. The end-of-text token is the last id.
 *
 * Training is spread over the ranks: each rank holds the chunks of its own part of the
 * corpus, and the pair counts are combined across ranks (summed at rank 0 once, then
 * every merge's count changes are exchanged with MPI_Allgatherv), so every rank keeps
 * the same global counts and picks the same merge. The merges depend only on the
 * combined counts, so they are the same for any rank count.
 *
 * JSON forms (tokenizer_to_json writes exactly these, keys in this order):
 *   {"kind":"byte","vocab_size":257,"eot_token":256}
 *   {"kind":"bpe","vocab_size":V,"eot_token":V-1,"pretokenizer":"deltamla-chunks-v1",
 *    "merges":[[a,b],[a,b],...]}            merge i makes token 256+i from tokens a, b
 * Data imported already tokenized carries {"kind":"imported",...}: a tokenizer that
 * deltamla does not have, so tokenizer_from_json refuses it with one line.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer.h"

#include <inttypes.h>
#include <limits.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "util.h"

/* The trainer's entry points, used by src/prep.c. tokenizer.h does not declare them, so
 * src/prep.c and tests/test_tokenizer.c repeat these declarations word for word. */
typedef struct bpe_trainer bpe_trainer;
/* A trainer holding no text yet; bpe_trainer_finish frees it. */
bpe_trainer *bpe_trainer_new(void);
/* Count the chunks of one document's text; the trainer keeps no pointer to it. */
void bpe_trainer_add(bpe_trainer *b, const unsigned char *text, size_t len);
/* Collective over comm: train a BPE of at most vocab_size tokens (>= 257) on the text
 * every rank added, and free b. It stops early when no adjacent pair is left, so the
 * result may be smaller: check tokenizer_vocab_size. progress (may be NULL) is called
 * on every rank after each merge. Returns a new tokenizer (tokenizer_free). */
tokenizer *bpe_trainer_finish(bpe_trainer *b, int vocab_size, MPI_Comm comm, void (*progress)(int done, int total));

#define BPE_PRETOKENIZER "deltamla-chunks-v1"
/* Longer runs are cut: it bounds a chunk's encoding cost (quadratic in its length) and
 * keeps base64 blobs or long rules of dashes from filling the chunk table. */
#define CHUNK_MAX_BYTES 64
/* Encodings of this many distinct chunks are cached per tokenizer; past it, new chunks
 * are encoded without being remembered, so memory stays bounded on any corpus. */
#define ENCODE_CACHE_MAX_CHUNKS (1 << 20)

enum tokenizer_kind { TOKENIZER_KIND_BYTE, TOKENIZER_KIND_BPE };

/* ---- a hash map from 64-bit keys to 64-bit values (open addressing) ---- */

typedef struct u64_map {
    uint64_t *keys; /* key + 1; 0 marks an empty slot */
    int64_t *vals;
    size_t cap, count;
} u64_map;

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static void u64_map_init(u64_map *m, size_t expected)
{
    size_t cap = 64;
    while (cap < 2 * expected) cap *= 2;
    m->cap = cap;
    m->count = 0;
    m->keys = xcalloc(cap, sizeof *m->keys);
    m->vals = xcalloc(cap, sizeof *m->vals);
}

static void u64_map_free(u64_map *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

static size_t u64_map_slot(const u64_map *m, uint64_t key)
{
    size_t mask = m->cap - 1, i = (size_t)mix64(key) & mask;
    while (m->keys[i] && m->keys[i] != key + 1) i = (i + 1) & mask;
    return i;
}

/* The value of key, or NULL when absent. */
static int64_t *u64_map_find(const u64_map *m, uint64_t key)
{
    size_t i = u64_map_slot(m, key);
    return m->keys[i] ? &m->vals[i] : NULL;
}

/* The value of key, inserted as `init` when absent. The pointer is valid until the
 * next insertion. */
static int64_t *u64_map_get(u64_map *m, uint64_t key, int64_t init)
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

static uint64_t pair_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b; }

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

static uint64_t hash_bytes(const unsigned char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a, then a final mix */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
    h = mix64(h ^ n);
    return h ? h : 1;
}

static void str_map_init(str_map *m)
{
    memset(m, 0, sizeof *m);
    m->cap = 1024;
    m->slots = xcalloc(m->cap, sizeof *m->slots);
}

static void str_map_free(str_map *m)
{
    free(m->slots);
    free(m->arena);
    memset(m, 0, sizeof *m);
}

static size_t str_map_slot(const str_map *m, uint64_t h, const unsigned char *s, size_t n)
{
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    while (m->slots[i].hash &&
           !(m->slots[i].hash == h && m->slots[i].len == n && memcmp(m->arena + m->slots[i].off, s, n) == 0))
        i = (i + 1) & mask;
    return i;
}

static str_entry *str_map_find(const str_map *m, const unsigned char *s, size_t n)
{
    size_t i = str_map_slot(m, hash_bytes(s, n), s, n);
    return m->slots[i].hash ? &m->slots[i] : NULL;
}

/* The entry of key s[0..n), inserted with value `init` when absent; valid until the
 * next insertion. */
static str_entry *str_map_get(str_map *m, const unsigned char *s, size_t n, int64_t init)
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

/* ---- the pre-tokenizer ---- */

enum byte_class { BC_SPACE, BC_WHITESPACE, BC_LETTER, BC_DIGIT, BC_OTHER };

static enum byte_class byte_class(unsigned char c)
{
    if (c == ' ') return BC_SPACE;
    if (c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r') return BC_WHITESPACE;
    /* bytes >= 0x80 are the parts of multi-byte UTF-8 characters: letters, so that words
     * in any script stay whole */
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return BC_LETTER;
    if (c >= '0' && c <= '9') return BC_DIGIT;
    return BC_OTHER;
}

static int is_ws(unsigned char c)
{
    enum byte_class k = byte_class(c);
    return k == BC_SPACE || k == BC_WHITESPACE;
}

/* The length of the first chunk of s[0..n) (n > 0), the "deltamla-chunks-v1" rules,
 * a simplified GPT-2 split: a run of letters (ASCII letters and every byte >= 0x80),
 * of digits, or of other non-space bytes is one chunk, taking with it the single space
 * (0x20) right before it; a run of whitespace is one chunk, less its last byte when that
 * byte is a space that begins the next word. No chunk is longer than CHUNK_MAX_BYTES. */
static size_t chunk_len(const unsigned char *s, size_t n)
{
    size_t i = 0;
    if (is_ws(s[0])) {
        size_t j = 1;
        while (j < n && is_ws(s[j])) j++;
        int space_starts_word = j < n && s[j - 1] == ' ';
        if (!(space_starts_word && j == 1)) {
            if (space_starts_word) j--;
            return j < CHUNK_MAX_BYTES ? j : CHUNK_MAX_BYTES;
        }
        i = 1; /* a lone space: the prefix of the word that follows */
    }
    enum byte_class k = byte_class(s[i]);
    size_t j = i + 1;
    while (j < n && j < CHUNK_MAX_BYTES && byte_class(s[j]) == k) j++;
    return j;
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

tokenizer *tokenizer_byte(void)
{
    tokenizer *t = xcalloc(1, sizeof *t);
    t->kind = TOKENIZER_KIND_BYTE;
    t->vocab_size = 257;
    t->eot = 256;
    return t;
}

/* A BPE tokenizer from its merges (merge i makes token 256 + i). The merges are
 * checked: each side must be a byte or an earlier merge. */
static tokenizer *tokenizer_bpe_from_merges(const int32_t *merges, int n_merges)
{
    tokenizer *t = xcalloc(1, sizeof *t);
    t->kind = TOKENIZER_KIND_BPE;
    t->n_merges = n_merges;
    t->vocab_size = 257 + n_merges;
    t->eot = 256 + n_merges;
    t->merges = xmalloc((size_t)(2 * n_merges + 1) * sizeof *t->merges);
    memcpy(t->merges, merges, (size_t)(2 * n_merges) * sizeof *t->merges);
    u64_map_init(&t->merge_rank, (size_t)n_merges);
    int n_tok = 256 + n_merges;
    t->piece_off = xmalloc((size_t)(n_tok + 2) * sizeof *t->piece_off);
    size_t total = 256;
    for (int i = 0; i < n_merges; i++) {
        int32_t a = merges[2 * i], b = merges[2 * i + 1];
        if (a < 0 || b < 0 || a >= 256 + i || b >= 256 + i)
            die("tokenizer JSON: merge %d is [%d, %d], but it may only join bytes and earlier merges (ids below %d)",
                i, a, b, 256 + i);
        int64_t *r = u64_map_get(&t->merge_rank, pair_key(a, b), -1);
        if (*r >= 0) die("tokenizer JSON: merges %" PRId64 " and %d are both [%d, %d]", *r, i, a, b);
        *r = i;
    }
    /* piece lengths first, then the bytes, so the arena is allocated once */
    size_t *len = xmalloc((size_t)n_tok * sizeof *len);
    for (int c = 0; c < 256; c++) len[c] = 1;
    for (int i = 0; i < n_merges; i++) {
        len[256 + i] = len[merges[2 * i]] + len[merges[2 * i + 1]];
        total += len[256 + i];
    }
    t->piece_bytes = xmalloc(total);
    size_t off = 0;
    for (int c = 0; c < n_tok; c++) {
        t->piece_off[c] = off;
        if (c < 256) {
            t->piece_bytes[off] = (unsigned char)c;
        } else {
            int32_t a = merges[2 * (c - 256)], b = merges[2 * (c - 256) + 1];
            memcpy(t->piece_bytes + off, t->piece_bytes + t->piece_off[a], len[a]);
            memcpy(t->piece_bytes + off + len[a], t->piece_bytes + t->piece_off[b], len[b]);
        }
        off += len[c];
    }
    t->piece_off[n_tok] = off;     /* end of the last piece */
    t->piece_off[n_tok + 1] = off; /* end-of-text: an empty piece */
    free(len);
    t->cache = xcalloc(1, sizeof *t->cache);
    str_map_init(&t->cache->chunks);
    return t;
}

void tokenizer_free(tokenizer *t)
{
    if (!t) return;
    free(t->merges);
    if (t->kind == TOKENIZER_KIND_BPE) u64_map_free(&t->merge_rank);
    free(t->piece_off);
    free(t->piece_bytes);
    if (t->cache) {
        str_map_free(&t->cache->chunks);
        free(t->cache->tokens);
        free(t->cache);
    }
    free(t);
}

int tokenizer_vocab_size(const tokenizer *t) { return t->vocab_size; }
int tokenizer_eot(const tokenizer *t) { return t->eot; }
const char *tokenizer_kind(const tokenizer *t) { return t->kind == TOKENIZER_KIND_BYTE ? "byte" : "bpe"; }

/* Apply the merges to one chunk's tokens in place, lowest merge index first; returns
 * the new length. */
static size_t bpe_merge_chunk(const tokenizer *t, int32_t *ids, size_t n)
{
    while (n > 1) {
        int64_t best = -1;
        for (size_t i = 0; i + 1 < n; i++) {
            int64_t *r = u64_map_find(&t->merge_rank, pair_key(ids[i], ids[i + 1]));
            if (r && (best < 0 || *r < best)) best = *r;
        }
        if (best < 0) break;
        int32_t a = t->merges[2 * best], b = t->merges[2 * best + 1], m = 256 + (int32_t)best;
        size_t o = 0;
        for (size_t i = 0; i < n; i++) {
            if (i + 1 < n && ids[i] == a && ids[i + 1] == b) {
                ids[o++] = m;
                i++;
            } else {
                ids[o++] = ids[i];
            }
        }
        n = o;
    }
    return n;
}

int64_t tokenizer_encode(const tokenizer *t, const unsigned char *text, size_t len, int32_t **out)
{
    int32_t *ids = xmalloc((len ? len : 1) * sizeof *ids);
    if (t->kind == TOKENIZER_KIND_BYTE) {
        for (size_t i = 0; i < len; i++) ids[i] = text[i];
        *out = ids;
        return (int64_t)len;
    }
    encode_cache *cache = t->cache;
    size_t n = 0;
    for (size_t pos = 0; pos < len;) {
        size_t cl = chunk_len(text + pos, len - pos);
        str_entry *e = str_map_find(&cache->chunks, text + pos, cl);
        if (e) {
            int32_t k = cache->tokens[e->val];
            memcpy(ids + n, cache->tokens + e->val + 1, (size_t)k * sizeof *ids);
            n += (size_t)k;
        } else {
            for (size_t i = 0; i < cl; i++) ids[n + i] = text[pos + i];
            size_t k = bpe_merge_chunk(t, ids + n, cl);
            if (cache->chunks.count < ENCODE_CACHE_MAX_CHUNKS) {
                if (cache->len + k + 1 > cache->cap) {
                    size_t cap = cache->cap ? 2 * cache->cap : 65536;
                    int32_t *p = realloc(cache->tokens, cap * sizeof *p);
                    if (!p) die("out of host memory growing the encoding cache to %zu tokens", cap);
                    cache->tokens = p;
                    cache->cap = cap;
                }
                str_map_get(&cache->chunks, text + pos, cl, (int64_t)cache->len);
                cache->tokens[cache->len] = (int32_t)k;
                memcpy(cache->tokens + cache->len + 1, ids + n, k * sizeof *ids);
                cache->len += k + 1;
            }
            n += k;
        }
        pos += cl;
    }
    *out = ids;
    return (int64_t)n;
}

size_t tokenizer_decode(const tokenizer *t, const int32_t *ids, int64_t n, char **out)
{
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size)
            die("token %" PRId32 " (at position %" PRId64 ") is outside the vocabulary of %d tokens", id, i,
                t->vocab_size);
        if (id == t->eot) continue;
        total += t->kind == TOKENIZER_KIND_BYTE ? 1 : t->piece_off[id + 1] - t->piece_off[id];
    }
    char *s = xmalloc(total + 1);
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id == t->eot) continue;
        if (t->kind == TOKENIZER_KIND_BYTE) {
            s[o++] = (char)id;
        } else {
            size_t l = t->piece_off[id + 1] - t->piece_off[id];
            memcpy(s + o, t->piece_bytes + t->piece_off[id], l);
            o += l;
        }
    }
    s[o] = 0;
    *out = s;
    return o;
}

/* ---- JSON ---- */

char *tokenizer_to_json(const tokenizer *t)
{
    if (t->kind == TOKENIZER_KIND_BYTE) {
        char *s = xmalloc(64);
        snprintf(s, 64, "{\"kind\":\"byte\",\"vocab_size\":%d,\"eot_token\":%d}", t->vocab_size, t->eot);
        return s;
    }
    size_t cap = 160 + (size_t)t->n_merges * 26;
    char *s = xmalloc(cap);
    size_t o = (size_t)snprintf(s, cap,
                                "{\"kind\":\"bpe\",\"vocab_size\":%d,\"eot_token\":%d,\"pretokenizer\":\"%s\","
                                "\"merges\":[",
                                t->vocab_size, t->eot, BPE_PRETOKENIZER);
    for (int i = 0; i < t->n_merges; i++)
        o += (size_t)snprintf(s + o, cap - o, "%s[%" PRId32 ",%" PRId32 "]", i ? "," : "", t->merges[2 * i],
                              t->merges[2 * i + 1]);
    snprintf(s + o, cap - o, "]}");
    return s;
}

static void json_fail(size_t offset, const char *what) __attribute__((noreturn));
static void json_fail(size_t offset, const char *what)
{
    die("tokenizer JSON: %s at offset %zu", what, offset);
}

static int64_t json_int(const json_value *v)
{
    int64_t x = 0;
    if (json_i64(v, &x) != JSON_INT_OK) json_fail(v->offset, "expected an integer");
    return x;
}

static const char *json_str(const json_value *v)
{
    if (v->type != JSON_TYPE_STRING) json_fail(v->offset, "expected '\"'");
    return v->text;
}

tokenizer *tokenizer_from_json(const char *json)
{
    if (!json) die("tokenizer JSON: missing");
    json_error err;
    json_value *root = json_parse(json, strlen(json), 0, &err);
    if (!root) json_fail(err.offset, err.message);
    if (root->type != JSON_TYPE_OBJECT) json_fail(root->offset, "expected '{'");
    const char *kind = NULL, *pretok = NULL;
    int64_t vocab = -1, eot = -1;
    int32_t *merges = NULL;
    int64_t n_merges = -1;
    /* a key given twice keeps its last value; keys this version does not know are
     * ignored, so a newer writer's additions still load */
    for (size_t i = 0; i < root->count; i++) {
        const char *key = root->members[i].key;
        const json_value *v = &root->members[i].value;
        if (strcmp(key, "kind") == 0) {
            kind = json_str(v);
        } else if (strcmp(key, "pretokenizer") == 0) {
            pretok = json_str(v);
        } else if (strcmp(key, "vocab_size") == 0) {
            vocab = json_int(v);
        } else if (strcmp(key, "eot_token") == 0) {
            eot = json_int(v);
        } else if (strcmp(key, "merges") == 0) {
            if (v->type != JSON_TYPE_ARRAY) json_fail(v->offset, "expected '['");
            free(merges);
            merges = xmalloc((v->count ? v->count : 1) * 2 * sizeof *merges);
            n_merges = (int64_t)v->count;
            for (size_t m = 0; m < v->count; m++) {
                const json_value *pair = &v->items[m];
                if (pair->type != JSON_TYPE_ARRAY || pair->count != 2)
                    json_fail(pair->offset, "a merge must be a pair [a, b]");
                int64_t a = json_int(&pair->items[0]), b = json_int(&pair->items[1]);
                if (a < 0 || b < 0 || a > INT32_MAX || b > INT32_MAX) json_fail(pair->offset, "merge id out of range");
                merges[2 * m] = (int32_t)a;
                merges[2 * m + 1] = (int32_t)b;
            }
        }
    }
    if (!kind) die("tokenizer JSON: no \"kind\"");

    tokenizer *t = NULL;
    if (strcmp(kind, "byte") == 0) {
        if ((vocab != -1 && vocab != 257) || (eot != -1 && eot != 256))
            die("tokenizer JSON: a byte tokenizer has vocab_size 257 and eot_token 256 (got %" PRId64 " and %" PRId64 ")",
                vocab, eot);
        t = tokenizer_byte();
    } else if (strcmp(kind, "bpe") == 0) {
        if (n_merges < 0) die("tokenizer JSON: a bpe tokenizer needs \"merges\"");
        if (!pretok || strcmp(pretok, BPE_PRETOKENIZER) != 0)
            die("tokenizer JSON: pretokenizer '%s' is not known (this version splits text by '%s')",
                pretok ? pretok : "(none)", BPE_PRETOKENIZER);
        if (n_merges > INT_MAX - 257) die("tokenizer JSON: %" PRId64 " merges are too many", n_merges);
        if ((vocab != -1 && vocab != 257 + n_merges) || (eot != -1 && eot != 256 + n_merges))
            die("tokenizer JSON: %" PRId64 " merges give vocab_size %" PRId64 " and eot_token %" PRId64
                ", but it says %" PRId64 " and %" PRId64,
                n_merges, 257 + n_merges, 256 + n_merges, vocab, eot);
        t = tokenizer_bpe_from_merges(merges, (int)n_merges);
    } else if (strcmp(kind, "imported") == 0) {
        die("the data was imported already tokenized (tokenizer kind 'imported'); deltamla has no encoder or "
            "decoder for its tokens");
    } else {
        die("tokenizer JSON: unknown kind '%s' (known: byte, bpe)", kind);
    }
    json_free(root);
    free(merges);
    return t;
}

/* ---- BPE training ---- */

struct bpe_trainer {
    str_map chunks; /* chunk bytes -> occurrences in this rank's text */
    int64_t bytes;
};

bpe_trainer *bpe_trainer_new(void)
{
    bpe_trainer *b = xcalloc(1, sizeof *b);
    str_map_init(&b->chunks);
    return b;
}

void bpe_trainer_add(bpe_trainer *b, const unsigned char *text, size_t len)
{
    for (size_t pos = 0; pos < len;) {
        size_t cl = chunk_len(text + pos, len - pos);
        str_map_get(&b->chunks, text + pos, cl, 0)->val++;
        pos += cl;
    }
    b->bytes += (int64_t)len;
}

typedef struct heap_item {
    int64_t count;
    uint64_t pair;
} heap_item;

typedef struct pair_heap {
    heap_item *items;
    size_t n, cap;
} pair_heap;

/* The merge order: most frequent first, then the smallest pair (a, then b). */
static int heap_before(heap_item x, heap_item y)
{
    return x.count > y.count || (x.count == y.count && x.pair < y.pair);
}

static void heap_push(pair_heap *h, int64_t count, uint64_t pair)
{
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 1024;
        h->items = realloc(h->items, h->cap * sizeof *h->items);
        if (!h->items) die("out of host memory growing the BPE pair heap to %zu entries", h->cap);
    }
    size_t i = h->n++;
    heap_item it = {count, pair};
    while (i > 0 && heap_before(it, h->items[(i - 1) / 2])) {
        h->items[i] = h->items[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->items[i] = it;
}

static heap_item heap_pop(pair_heap *h)
{
    heap_item top = h->items[0], last = h->items[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && heap_before(h->items[c + 1], h->items[c])) c++;
        if (!heap_before(h->items[c], last)) break;
        h->items[i] = h->items[c];
        i = c;
    }
    if (h->n) h->items[i] = last;
    return top;
}

/* Word ids that hold (or once held) a pair; duplicates and stale entries are allowed
 * and skipped when the pair is merged. */
typedef struct word_list {
    int32_t *w;
    int32_t n, cap;
} word_list;

typedef struct bpe_state {
    int32_t *ids;      /* every word's tokens, word w at ids[start[w] .. start[w] + len[w]) */
    size_t *start;
    int32_t *len;
    int64_t *count;    /* occurrences of each word in this rank's text */
    int32_t *stamp;    /* the last merge that rewrote each word + 1 */
    int32_t n_words;
    u64_map where;     /* pair -> index in lists */
    word_list *lists;
    size_t n_lists, cap_lists;
    u64_map delta;     /* pair -> this merge's change to this rank's count of it */
    uint64_t *touched; /* the pairs in delta, in insertion order */
    size_t n_touched, cap_touched;
    u64_map global;    /* pair -> count over all ranks (the same on every rank) */
    pair_heap heap;
} bpe_state;

static void where_add(bpe_state *s, uint64_t pair, int32_t w)
{
    int64_t *li = u64_map_get(&s->where, pair, -1);
    if (*li < 0) {
        if (s->n_lists == s->cap_lists) {
            s->cap_lists = s->cap_lists ? 2 * s->cap_lists : 1024;
            s->lists = realloc(s->lists, s->cap_lists * sizeof *s->lists);
            if (!s->lists) die("out of host memory growing the BPE pair index");
        }
        *li = (int64_t)s->n_lists;
        s->lists[s->n_lists++] = (word_list){NULL, 0, 0};
    }
    word_list *l = &s->lists[*li];
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 4;
        l->w = realloc(l->w, (size_t)l->cap * sizeof *l->w);
        if (!l->w) die("out of host memory growing the BPE pair index");
    }
    l->w[l->n++] = w;
}

static void delta_add(bpe_state *s, uint64_t pair, int64_t change)
{
    size_t before = s->delta.count;
    *u64_map_get(&s->delta, pair, 0) += change;
    if (s->delta.count == before) return;
    if (s->n_touched == s->cap_touched) {
        s->cap_touched = s->cap_touched ? 2 * s->cap_touched : 4096;
        s->touched = realloc(s->touched, s->cap_touched * sizeof *s->touched);
        if (!s->touched) die("out of host memory growing the BPE count changes");
    }
    s->touched[s->n_touched++] = pair;
}

/* This rank's nonzero changes as malloc'd (pair, change) entries, *n int64 words; the
 * change map is left empty. Only the touched slots are cleared: a merge touches few
 * pairs, and clearing the whole table every merge would cost more than the merge. */
static int64_t *take_deltas(bpe_state *s, size_t *n)
{
    int64_t *e = xmalloc((2 * s->n_touched + 1) * sizeof *e);
    size_t *slot = xmalloc((s->n_touched + 1) * sizeof *slot), o = 0;
    for (size_t k = 0; k < s->n_touched; k++) {
        size_t i = u64_map_slot(&s->delta, s->touched[k]);
        slot[k] = i;
        if (s->delta.vals[i] == 0) continue;
        e[o++] = (int64_t)s->touched[k];
        e[o++] = s->delta.vals[i];
    }
    for (size_t k = 0; k < s->n_touched; k++) s->delta.keys[slot[k]] = 0;
    s->delta.count = 0;
    s->n_touched = 0;
    free(slot);
    *n = o;
    return e;
}

static int cmp_entry(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* Sort (pair, value) entries by pair and sum equal pairs; returns the new count of
 * int64 words. */
static size_t combine_entries(int64_t *e, size_t n)
{
    qsort(e, n / 2, 2 * sizeof *e, cmp_entry);
    size_t o = 0;
    for (size_t i = 0; i < n; i += 2) {
        if (o && e[o - 2] == e[i]) {
            e[o - 1] += e[i + 1];
        } else {
            e[o++] = e[i];
            e[o++] = e[i + 1];
        }
    }
    return o;
}

/* Combine the (pair, value) entries of every rank (n int64 words, each pair once).
 * With root >= 0 they are summed there and the sums sent back to every rank (once, for
 * the initial counts, which can be large); with root < 0 every rank receives every
 * rank's entries (the small changes of one merge). Returns the malloc'd entries every
 * rank received, *n_out int64 words. */
static int64_t *exchange_counts(int64_t *mine, size_t n, int root, MPI_Comm comm, int64_t *n_out)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    if (n > INT_MAX) die("the BPE pair table of one rank is too large to exchange (%zu entries)", n / 2);
    int my_n = (int)n;
    int *counts = xmalloc((size_t)size * sizeof *counts), *displs = xmalloc((size_t)size * sizeof *displs);
    if (root < 0) MPI_Allgather(&my_n, 1, MPI_INT, counts, 1, MPI_INT, comm);
    else MPI_Gather(&my_n, 1, MPI_INT, counts, 1, MPI_INT, root, comm);
    int64_t total = 0;
    if (root < 0 || rank == root) {
        for (int r = 0; r < size; r++) {
            displs[r] = (int)total;
            total += counts[r];
            if (total > INT_MAX) die("the combined BPE pair table is too large to exchange");
        }
    }
    int64_t *all = xmalloc((size_t)(total + 1) * sizeof *all);
    if (root < 0) {
        MPI_Allgatherv(mine, my_n, MPI_INT64_T, all, counts, displs, MPI_INT64_T, comm);
    } else {
        MPI_Gatherv(mine, my_n, MPI_INT64_T, all, counts, displs, MPI_INT64_T, root, comm);
        int64_t n_sum = rank == root ? (int64_t)combine_entries(all, (size_t)total) : 0;
        MPI_Bcast(&n_sum, 1, MPI_INT64_T, root, comm);
        if (rank != root) {
            free(all);
            all = xmalloc((size_t)(n_sum + 1) * sizeof *all);
        }
        MPI_Bcast(all, (int)n_sum, MPI_INT64_T, root, comm);
        total = n_sum;
    }
    free(counts);
    free(displs);
    *n_out = total;
    return all;
}

static void apply_counts(bpe_state *s, const int64_t *e, int64_t n)
{
    for (int64_t i = 0; i < n; i += 2) {
        int64_t *c = u64_map_get(&s->global, (uint64_t)e[i], 0);
        *c += e[i + 1];
        if (*c > 0) heap_push(&s->heap, *c, (uint64_t)e[i]);
    }
}

/* Rewrite this rank's words holding (a, b) with token m, recording the pair count
 * changes in s->delta. */
static void merge_local(bpe_state *s, int32_t a, int32_t b, int32_t m, int32_t merge_index)
{
    int64_t *li = u64_map_find(&s->where, pair_key(a, b));
    if (!li) return;
    size_t list = (size_t)*li;
    for (int32_t k = 0; k < s->lists[list].n; k++) {
        int32_t w = s->lists[list].w[k];
        if (s->stamp[w] == merge_index + 1) continue;
        s->stamp[w] = merge_index + 1;
        int32_t *ids = s->ids + s->start[w];
        int32_t n = s->len[w];
        int found = 0;
        for (int32_t i = 0; i + 1 < n && !found; i++) found = ids[i] == a && ids[i + 1] == b;
        if (!found) continue;
        /* Only pairs touching a merge site change: the old pairs touching a merged
         * position go, the new pairs holding m (a new id) come; every other pair of
         * the old word is still a pair of the new one. */
        int64_t c = s->count[w];
        unsigned char merged[CHUNK_MAX_BYTES];
        fatal_check(n <= CHUNK_MAX_BYTES);
        memset(merged, 0, (size_t)n);
        for (int32_t i = 0; i + 1 < n; i++)
            if (ids[i] == a && ids[i + 1] == b) {
                merged[i] = merged[i + 1] = 1;
                i++;
            }
        for (int32_t i = 0; i + 1 < n; i++)
            if (merged[i] || merged[i + 1]) delta_add(s, pair_key(ids[i], ids[i + 1]), -c);
        int32_t o = 0;
        for (int32_t i = 0; i < n; i++) {
            if (i + 1 < n && ids[i] == a && ids[i + 1] == b) {
                ids[o++] = m;
                i++;
            } else {
                ids[o++] = ids[i];
            }
        }
        s->len[w] = o;
        for (int32_t i = 0; i + 1 < o; i++) {
            if (ids[i] != m && ids[i + 1] != m) continue;
            uint64_t p = pair_key(ids[i], ids[i + 1]);
            delta_add(s, p, c);
            where_add(s, p, w); /* may move s->lists */
        }
    }
    /* (a, b) cannot occur again: every new neighbour pair involves m */
    free(s->lists[list].w);
    s->lists[list] = (word_list){NULL, 0, 0};
}

tokenizer *bpe_trainer_finish(bpe_trainer *b, int vocab_size, MPI_Comm comm, void (*progress)(int done, int total))
{
    fatal_check(vocab_size >= 257);
    int target = vocab_size - 257;
    bpe_state s;
    memset(&s, 0, sizeof s);

    /* the distinct chunks of this rank become its words */
    size_t total_len = 0;
    for (size_t i = 0; i < b->chunks.cap; i++)
        if (b->chunks.slots[i].hash) total_len += b->chunks.slots[i].len;
    if (b->chunks.count > INT32_MAX) die("too many distinct chunks on one rank for BPE training (%zu)", b->chunks.count);
    s.n_words = (int32_t)b->chunks.count;
    s.ids = xmalloc((total_len + 1) * sizeof *s.ids);
    s.start = xmalloc(((size_t)s.n_words + 1) * sizeof *s.start);
    s.len = xmalloc(((size_t)s.n_words + 1) * sizeof *s.len);
    s.count = xmalloc(((size_t)s.n_words + 1) * sizeof *s.count);
    s.stamp = xcalloc((size_t)s.n_words + 1, sizeof *s.stamp);
    u64_map_init(&s.where, 4096);
    u64_map_init(&s.delta, 4096);
    u64_map_init(&s.global, 4096);
    size_t off = 0;
    int32_t w = 0;
    for (size_t i = 0; i < b->chunks.cap; i++) {
        const str_entry *e = &b->chunks.slots[i];
        if (!e->hash) continue;
        s.start[w] = off;
        s.len[w] = (int32_t)e->len;
        s.count[w] = e->val;
        for (uint32_t k = 0; k < e->len; k++) s.ids[off + k] = b->chunks.arena[e->off + k];
        for (uint32_t k = 0; k + 1 < e->len; k++) {
            uint64_t p = pair_key(s.ids[off + k], s.ids[off + k + 1]);
            delta_add(&s, p, e->val);
            where_add(&s, p, w);
        }
        off += e->len;
        w++;
    }
    str_map_free(&b->chunks);
    free(b);

    int64_t n;
    size_t n_mine;
    int64_t *mine = take_deltas(&s, &n_mine);
    int64_t *all = exchange_counts(mine, n_mine, 0, comm, &n);
    free(mine);
    apply_counts(&s, all, n);
    free(all);

    int32_t *merges = xmalloc((size_t)(2 * target + 1) * sizeof *merges);
    int done = 0;
    while (done < target) {
        heap_item best = {0, 0};
        int have = 0;
        while (s.heap.n) {
            best = heap_pop(&s.heap);
            int64_t *c = u64_map_find(&s.global, best.pair);
            if (c && *c == best.count && best.count > 0) { have = 1; break; }
        }
        if (!have) break; /* every chunk is a single token: nothing left to merge */
        int32_t a = (int32_t)(best.pair >> 32), bb = (int32_t)(best.pair & 0xffffffffu);
        int32_t m = 256 + done;
        merges[2 * done] = a;
        merges[2 * done + 1] = bb;
        merge_local(&s, a, bb, m, done);
        mine = take_deltas(&s, &n_mine);
        int64_t *changes = exchange_counts(mine, n_mine, -1, comm, &n);
        free(mine);
        apply_counts(&s, changes, n);
        free(changes);
        done++;
        if (progress) progress(done, target);
    }

    for (size_t i = 0; i < s.n_lists; i++) free(s.lists[i].w);
    free(s.lists);
    u64_map_free(&s.where);
    u64_map_free(&s.delta);
    free(s.touched);
    u64_map_free(&s.global);
    free(s.heap.items);
    free(s.ids);
    free(s.start);
    free(s.len);
    free(s.count);
    free(s.stamp);
    tokenizer *t = tokenizer_bpe_from_merges(merges, done);
    free(merges);
    return t;
}
