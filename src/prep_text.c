/* prep_text.c: the text inputs of `deltamla prep`: the UTF-8 check, the split into
 * documents (--doc_split file or blank_line), tokenizing them onto the rank's stream,
 * and counting their chunks for BPE training.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../io/tokenizer.h"
#include "prep_internal.h"
#include "util.h"

/* The offset of the first byte that does not begin a valid UTF-8 sequence (overlong
 * forms, surrogates and code points past U+10FFFF are invalid), or -1. */
static int64_t utf8_invalid_at(const unsigned char *s, uint64_t n)
{
    uint64_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int k;
        unsigned lo = 0x80, hi = 0xBF; /* the allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c == 0xE0) k = 2, lo = 0xA0;
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) k = 2;
        else if (c == 0xED) k = 2, hi = 0x9F;
        else if (c == 0xF0) k = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3) k = 3;
        else if (c == 0xF4) k = 3, hi = 0x8F;
        else return (int64_t)i;
        if (i + (uint64_t)k >= n) return (int64_t)i; /* truncated at the end of the file */
        if (s[i + 1] < lo || s[i + 1] > hi) return (int64_t)i;
        for (int j = 2; j <= k; j++)
            if ((s[i + (uint64_t)j] & 0xC0) != 0x80) return (int64_t)i;
        i += (uint64_t)k + 1;
    }
    return -1;
}

static int blank_line(const unsigned char *s, uint64_t a, uint64_t b)
{
    for (uint64_t i = a; i < b; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

/* The documents of a text file as [start, end) byte spans, malloc'd pairs; returns the
 * count. By file: the whole file (none when it is empty). By blank line: each maximal
 * run of non-blank lines, from its first byte through the newline of its last line. */
static int64_t doc_spans(const unsigned char *s, uint64_t n, int by_blank_line, uint64_t **spans)
{
    int64_t count = 0, cap = 16;
    uint64_t *sp = xmalloc((size_t)cap * 2 * sizeof *sp);
    if (!by_blank_line) {
        if (n) {
            sp[0] = 0;
            sp[1] = n;
            count = 1;
        }
        *spans = sp;
        return count;
    }
    int64_t open = -1; /* start of the document being read, or -1 */
    for (uint64_t a = 0; a < n;) {
        const unsigned char *nl = memchr(s + a, '\n', n - a);
        uint64_t b = nl ? (uint64_t)(nl - s) + 1 : n; /* line [a, b), newline included */
        if (blank_line(s, a, b)) {
            if (open >= 0) {
                sp[2 * count - 1] = a;
                open = -1;
            }
        } else if (open < 0) {
            if (count == cap) {
                sp = realloc(sp, (size_t)(cap *= 2) * 2 * sizeof *sp);
                if (!sp) die("out of host memory splitting documents");
            }
            open = (int64_t)a;
            sp[2 * count] = a;
            sp[2 * count + 1] = n;
            count++;
        }
        a = b;
    }
    *spans = sp;
    return count;
}

/* ---- tokenizing and counting ---- */

/* Tokenize one text file's documents onto the stream, each followed by end-of-text. */
/* The bytes of a text file (*n of them), or NULL after prep_fail when it cannot be read
 * or (check_utf8) is not valid UTF-8. */
static unsigned char *read_text(const char *path, uint64_t *n, int check_utf8)
{
    unsigned char *s = prep_read_file(path, n);
    if (!s) return NULL;
    int64_t bad = check_utf8 ? utf8_invalid_at(s, *n) : -1;
    if (bad >= 0) {
        prep_fail("%s is not valid UTF-8 at byte offset %" PRId64, path, bad);
        free(s);
        return NULL;
    }
    return s;
}

void prep_encode_text_file(const input_file *f, const tokenizer *tok, int by_blank_line, int check_utf8, token_buf *out)
{
    uint64_t n;
    unsigned char *s = read_text(f->path, &n, check_utf8);
    if (!s) return;
    uint64_t *spans;
    int64_t nd = doc_spans(s, n, by_blank_line, &spans);
    uint32_t eot = (uint32_t)tokenizer_eot(tok);
    uint64_t doc_bytes = 0;
    for (int64_t d = 0; d < nd; d++) {
        int32_t *ids;
        size_t len = (size_t)(spans[2 * d + 1] - spans[2 * d]);
        int64_t k = tokenizer_encode(tok, s + spans[2 * d], len, &ids);
        token_buf_reserve(out, (uint64_t)k + 1);
        for (int64_t i = 0; i < k; i++) token_buf_push(out, (uint32_t)ids[i]);
        token_buf_push(out, eot);
        free(ids);
        doc_bytes += len;
        prep_progress_add(len, (uint64_t)k + 1);
    }
    prep_progress_add(n - doc_bytes, 0); /* the blank lines between documents */
    free(spans);
    free(s);
}

/* Count the chunks of this file's training share: its first `share` bytes, documents
 * only (blank-line separators are not text). */
void prep_count_text_file(const input_file *f, bpe_trainer *trainer, uint64_t share, int by_blank_line)
{
    uint64_t n;
    unsigned char *s = read_text(f->path, &n, 1);
    if (!s) return;
    uint64_t *spans;
    int64_t nd = doc_spans(s, n, by_blank_line, &spans);
    for (int64_t d = 0; d < nd && spans[2 * d] < share; d++) {
        uint64_t end = spans[2 * d + 1] < share ? spans[2 * d + 1] : share;
        bpe_trainer_add(trainer, s + spans[2 * d], (size_t)(end - spans[2 * d]));
    }
    prep_progress_add(n, 0);
    free(spans);
    free(s);
}
