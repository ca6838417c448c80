/* data.h: the data-source interface the training loop reads batches from.
 *
 * A source yields rows of T+1 consecutive tokens of its stream (inputs are the first T,
 * targets the last T), in a seeded order that is a permutation of all rows per epoch.
 * Implementations: the text source (data_text.c, a file read as bytes) and the HDF5
 * token-shard loader (io/loader.c). A split keeps the last val_fraction of the rows
 * apart as validation rows, so training and validation never share a row.
 *
 * With several data-parallel ranks, each rank reads its own rows of every global batch:
 * global batch i consists of rows [i*B*nranks, (i+1)*B*nranks) of the epoch's order, and
 * rank r takes the B rows starting at i*B*nranks + r*B. The position (epoch, row) counts
 * global rows, so it is the same on every rank and is what a checkpoint stores.
 */
#ifndef DELTAMLA_DATA_H
#define DELTAMLA_DATA_H

#include <stdint.h>

enum data_split { DATA_TRAIN, DATA_VAL };

typedef struct data_source data_source;

struct data_source {
    const char *kind;          /* "text" or "shards" */
    int64_t num_tokens;        /* tokens in the whole stream (both splits) */
    int64_t num_rows;          /* rows of T+1 tokens in this split */
    int32_t max_token;         /* largest token id the source can yield (vocab - 1 for shards) */
    int32_t vocab_size;        /* the tokenizer's vocabulary (256 for raw bytes) */
    int32_t eot_token;         /* end-of-text token, -1 when the stream has none */
    const char *tokenizer_json;/* the tokenizer as stored in shards and checkpoints (owned), or NULL */
    int64_t epoch, row;        /* position: the next global row is number `row` of `epoch` */
    int rank, nranks;          /* this rank's share of each global batch */
    /* host int32 [B*T] each: this rank's B rows of the next global batch */
    void (*next_batch)(data_source *s, int32_t *inputs, int32_t *targets, int B, int T);
    void (*close)(data_source *s);
    void *impl;
};

/* Open `path`: a directory of token shards or one shard file (*.h5) through the HDF5
 * loader, anything else as a text file of bytes. split and val_fraction choose the rows
 * (val_fraction 0 and DATA_VAL is an error). die() with one line on bad input. */
data_source *data_open(const char *path, int T, uint64_t seed, double val_fraction, enum data_split split,
                       int rank, int nranks);

/* The text source (data_text.c) and the shard loader (io/loader.c) behind data_open. */
data_source *data_text_open(const char *path, int T, uint64_t seed, double val_fraction, enum data_split split,
                            int rank, int nranks);
data_source *data_shards_open(const char *path, int T, uint64_t seed, double val_fraction, enum data_split split,
                              int rank, int nranks);

/* The HDF5 library here is not thread-safe: every HDF5 call in the process (the loader's
 * prefetch threads, the checkpoint writer) holds this one lock (io/loader.c). */
void data_hdf5_lock(void);
void data_hdf5_unlock(void);

/* Row number `i` of epoch `epoch` in the shuffled order: a bijection of [0, n) keyed by
 * (seed, epoch), computed in O(1) memory (a Feistel network with cycle walking). */
int64_t data_permute(int64_t i, int64_t n, uint64_t seed, int64_t epoch);

/* Rows of T+1 tokens (overlapping by one token) in a stream of n tokens, and how many
 * of them the training split keeps: the validation split is the last
 * floor(rows * val_fraction) rows. */
int64_t data_rows(int64_t n_tokens, int T);
int64_t data_train_rows(int64_t rows, double val_fraction);

#endif
