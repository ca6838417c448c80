/* data.h: the data-source interface the training loop reads batches from.
 *
 * A source yields rows of T+1 consecutive tokens of its stream (inputs are the first T,
 * targets the last T), in a seeded order that is a permutation of all rows per epoch.
 * The text source (data_text.c) reads a file as bytes; the HDF5 token-shard loader
 * implements the same interface.
 */
#ifndef DELTAMLA_DATA_H
#define DELTAMLA_DATA_H

#include <stdint.h>

typedef struct data_source data_source;

struct data_source {
    const char *kind;          /* "text" ... */
    int64_t num_tokens;        /* tokens in the stream */
    int64_t num_rows;          /* rows of T+1 tokens per epoch */
    int32_t max_token;         /* largest token id in the stream */
    int64_t epoch, row;        /* position: the next row to read is number `row` of `epoch` */
    /* host int32 [B*T] each: the next B rows */
    void (*next_batch)(data_source *s, int32_t *inputs, int32_t *targets, int B, int T);
    void (*close)(data_source *s);
    void *impl;
};

/* A text file as a stream of bytes (tokens 0..255), cut into rows of T+1 bytes
 * (consecutive rows overlap by one byte). die() with one line if the file cannot be
 * read or holds fewer than T+1 bytes. */
data_source *data_text_open(const char *path, int T, uint64_t seed);

/* Row number `i` of epoch `epoch` in the shuffled order: a bijection of [0, n) keyed by
 * (seed, epoch), computed in O(1) memory (a Feistel network with cycle walking). */
int64_t data_permute(int64_t i, int64_t n, uint64_t seed, int64_t epoch);

#endif
