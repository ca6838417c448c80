/* tokenizer.c: the byte tokenizer and the byte-level BPE (see tokenizer.h): building the
 * BPE from its merges, the pre-tokenizer, encoding and decoding. The JSON form is in
 * tokenizer_json.c, the BPE trainer in tokenizer_train.c; tokenizer_internal.h holds what
 * they share (struct tokenizer, the hash maps).
 *
 * BPE text is first cut into chunks by a fixed pre-tokenizer ("deltamla-chunks-v1",
 * described at tokenizer_chunk_len below); merges never cross a chunk boundary.
 * Training (tokenizer_train.c) counts the distinct chunks of the corpus, then repeatedly
 * merges the most frequent adjacent pair of tokens (ties: the smallest pair (a, b)), each
 * merge adding token 256 + its index. Encoding applies the merges to each chunk by rank,
 * lowest first, which reproduces the training segmentation exactly. The end-of-text token
 * is the last id.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"
#include "util.h"

/* Encodings of this many distinct chunks are cached per tokenizer; past it, new chunks
 * are encoded without being remembered, so memory stays bounded on any corpus. */
#define ENCODE_CACHE_MAX_CHUNKS (1 << 20)

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
size_t tokenizer_chunk_len(const unsigned char *s, size_t n)
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
tokenizer *tokenizer_bpe_from_merges(const int32_t *merges, int n_merges)
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
        size_t cl = tokenizer_chunk_len(text + pos, len - pos);
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
