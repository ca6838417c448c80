/* prep_import.c: the token-file inputs of `deltamla prep`: llm.c .bin files and numpy
 * .npy arrays of already tokenized data, each token checked against the vocabulary and
 * appended to the rank's stream.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prep_internal.h"
#include "util.h"

#define LLMC_MAGIC 20240520
#define LLMC_HEADER_INTS 256

/* Append tokens read from an import file, each checked against the vocabulary. */
static void push_imported(const input_file *f, const unsigned char *data, uint64_t count, int in_width,
                          int64_t vocab, token_buf *out)
{
    token_buf_reserve(out, count);
    for (uint64_t i = 0; i < count; i++) {
        uint32_t t;
        if (in_width == 2) {
            uint16_t v;
            memcpy(&v, data + 2 * i, 2);
            t = v;
        } else {
            memcpy(&t, data + 4 * i, 4);
        }
        if ((int64_t)t >= vocab) {
            prep_fail("%s: token %" PRIu32 " at position %" PRIu64 " is not below --vocab_size %" PRId64, f->path, t, i, vocab);
            return;
        }
        token_buf_push(out, t);
    }
}

/* An llm.c token file: int32 header[256] (magic 20240520, version 1, token count),
 * then that many uint16 tokens. Little-endian, as llm.c writes it. */
void prep_import_llmc(const input_file *f, int64_t vocab, token_buf *out)
{
    uint64_t n;
    unsigned char *s = prep_read_file(f->path, &n);
    if (!s) return;
    int32_t h[LLMC_HEADER_INTS];
    uint64_t hb = sizeof h;
    if (n < hb) {
        prep_fail("%s: %" PRIu64 " bytes is too short for an llm.c token file (its header alone is %" PRIu64 " bytes)",
             f->path, n, hb);
    } else {
        memcpy(h, s, sizeof h);
        if (h[0] != LLMC_MAGIC)
            prep_fail("%s: not an llm.c token file (magic %" PRId32 ", expected %d)", f->path, h[0], LLMC_MAGIC);
        else if (h[1] != 1)
            prep_fail("%s: llm.c token file version %" PRId32 " is not supported (version 1: uint16 tokens)", f->path, h[1]);
        else if (h[2] < 0 || n - hb != 2 * (uint64_t)h[2])
            prep_fail("%s: the llm.c header says %" PRId32 " tokens (%" PRIu64 " bytes) but %" PRIu64
                 " bytes follow the header",
                 f->path, h[2], 2 * (uint64_t)(h[2] < 0 ? 0 : h[2]), n - hb);
        else {
            uint64_t before = out->n;
            push_imported(f, s + hb, (uint64_t)h[2], 2, vocab, out);
            prep_progress_add(n, out->n - before);
        }
    }
    free(s);
}

/* The value text of key in a .npy header dict (quoted or not), into buf; 0 if absent. */
static int npy_field(const char *hdr, const char *key, char *buf, size_t size)
{
    char quoted[64];
    snprintf(quoted, sizeof quoted, "'%s'", key);
    const char *p = strstr(hdr, quoted);
    if (!p) return 0;
    p += strlen(quoted);
    while (*p == ' ' || *p == ':') p++;
    size_t n = 0;
    if (*p == '\'' || *p == '"') {
        char q = *p++;
        while (p[n] && p[n] != q) n++;
    } else if (*p == '(') {
        while (p[n] && p[n] != ')') n++;
        n++;
    } else {
        while (p[n] && p[n] != ',' && p[n] != '}') n++;
    }
    if (n >= size) n = size - 1;
    memcpy(buf, p, n);
    buf[n] = 0;
    return 1;
}

/* A numpy .npy file holding a 1-D array of '<u2' or '<u4'. */
void prep_import_npy(const input_file *f, int64_t vocab, token_buf *out)
{
    uint64_t n;
    unsigned char *s = prep_read_file(f->path, &n);
    if (!s) return;
    uint64_t hdr_len = 0, data_at = 0;
    if (n < 10 || memcmp(s, "\x93NUMPY", 6) != 0) {
        prep_fail("%s: not a .npy file (no \\x93NUMPY magic)", f->path);
    } else if (s[6] == 1) {
        hdr_len = (uint64_t)s[8] | (uint64_t)s[9] << 8;
        data_at = 10 + hdr_len;
    } else if ((s[6] == 2 || s[6] == 3) && n >= 12) {
        hdr_len = (uint64_t)s[8] | (uint64_t)s[9] << 8 | (uint64_t)s[10] << 16 | (uint64_t)s[11] << 24;
        data_at = 12 + hdr_len;
    } else {
        prep_fail("%s: .npy format version %d is not known", f->path, s[6]);
    }
    if (!prep_err[0] && data_at > n) prep_fail("%s: the .npy header runs past the end of the file", f->path);
    if (prep_err[0]) {
        free(s);
        return;
    }
    char *hdr = xmalloc((size_t)hdr_len + 1);
    memcpy(hdr, s + data_at - hdr_len, (size_t)hdr_len);
    hdr[hdr_len] = 0;
    char descr[32], shape[128];
    int width = 0;
    if (!npy_field(hdr, "descr", descr, sizeof descr) || !npy_field(hdr, "shape", shape, sizeof shape)) {
        prep_fail("%s: the .npy header has no descr or shape", f->path);
    } else if (strcmp(descr, "<u2") == 0 || strcmp(descr, "u2") == 0) {
        width = 2;
    } else if (strcmp(descr, "<u4") == 0 || strcmp(descr, "u4") == 0) {
        width = 4;
    } else {
        prep_fail("%s: .npy dtype '%s' is not uint16 or uint32 (need '<u2' or '<u4')", f->path, descr);
    }
    uint64_t count = 0;
    if (width) {
        /* shape "(N,)" is 1-D; "(N, M)" or "()" is not; fortran_order is moot for 1-D */
        char *end;
        unsigned long long v = strtoull(shape + 1, &end, 10);
        while (*end == ' ') end++;
        if (end == shape + 1 || *end != ',' || strspn(end + 1, " )") != strlen(end + 1)) {
            prep_fail("%s: .npy array shape %s is not 1-D", f->path, shape);
        } else {
            count = v;
            if (n - data_at != count * (uint64_t)width)
                prep_fail("%s: the .npy header says %" PRIu64 " values (%" PRIu64 " bytes) but %" PRIu64
                     " bytes of data follow it",
                     f->path, count, count * (uint64_t)width, n - data_at);
        }
    }
    if (!prep_err[0]) {
        uint64_t before = out->n;
        push_imported(f, s + data_at, count, width, vocab, out);
        prep_progress_add(n, out->n - before);
    }
    free(hdr);
    free(s);
}
