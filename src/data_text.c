/* data_text.c: the byte-level text data source (see data.h). The whole file is read
 * into memory: it is meant for small corpora and demos; large corpora go through
 * `deltamla prep` into token shards. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "util.h"

typedef struct text_impl {
    unsigned char *bytes;
    int64_t n;
    int T;
    uint64_t seed;
    int64_t first_row; /* the split's first row in the stream */
} text_impl;

static void text_next_batch(data_source *s, int32_t *inputs, int32_t *targets, int B, int T)
{
    text_impl *t = s->impl;
    fatal_check(T == t->T);
    int64_t global = (int64_t)B * s->nranks;
    for (int b = 0; b < B; b++) {
        /* this rank's rows of the global batch; a batch that would cross the end of the
         * epoch starts the next epoch instead, so every rank sees the same boundary */
        if (s->row + global > s->num_rows && s->row > 0) {
            s->epoch++;
            s->row = 0;
        }
        int64_t g = (s->row + (int64_t)s->rank * B + b) % s->num_rows;
        int64_t r = t->first_row + data_permute(g, s->num_rows, t->seed, s->epoch);
        const unsigned char *p = t->bytes + r * T;
        for (int i = 0; i < T; i++) {
            inputs[(size_t)b * T + i] = p[i];
            targets[(size_t)b * T + i] = p[i + 1];
        }
    }
    s->row += global;
}

static void text_close(data_source *s)
{
    text_impl *t = s->impl;
    free(t->bytes);
    free(t);
    free(s);
}

data_source *data_text_open(const char *path, int T, uint64_t seed, double val_fraction, enum data_split split,
                            int rank, int nranks)
{
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open data file %s: %s", path, strerror(errno));
    size_t cap = 1 << 20, n = 0;
    unsigned char *buf = xmalloc(cap);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            unsigned char *nb = realloc(buf, cap);
            if (!nb) die("out of host memory reading %s", path);
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) die("error reading data file %s", path);
    if ((int64_t)n < (int64_t)T + 1)
        die("data file %s holds %zu bytes, fewer than one row of --block_size %d + 1", path, n, T);
    int64_t rows = data_rows((int64_t)n, T), train = data_train_rows(rows, val_fraction);
    if (train < 1) die("data file %s: --val_fraction %g leaves no training rows", path, val_fraction);
    if (split == DATA_VAL && rows - train < 1)
        die("data file %s has %lld rows of %d+1 bytes: too few to hold out --val_fraction %g", path, (long long)rows, T,
            val_fraction);
    text_impl *t = xcalloc(1, sizeof *t);
    t->bytes = buf;
    t->n = (int64_t)n;
    t->T = T;
    t->seed = seed;
    t->first_row = split == DATA_TRAIN ? 0 : train;
    data_source *s = xcalloc(1, sizeof *s);
    s->kind = "text";
    s->num_tokens = (int64_t)n;
    s->num_rows = split == DATA_TRAIN ? train : rows - train;
    s->vocab_size = 256;
    s->eot_token = -1;
    s->tokenizer_json = NULL; /* raw bytes: no tokenizer, no end-of-text token */
    s->rank = rank;
    s->nranks = nranks;
    s->max_token = 0;
    for (size_t i = 0; i < n; i++)
        if (buf[i] > s->max_token) s->max_token = buf[i];
    s->next_batch = text_next_batch;
    s->close = text_close;
    s->impl = t;
    return s;
}
