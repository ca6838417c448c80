/* checkpoint.h: checkpoints as DESIGN.md describes them: one HDF5 file per save, written
 * collectively through the MPI-IO driver, every tensor a dataset of its full logical
 * shape with each rank writing the slice it owns, plus step, data position, RNG state,
 * router biases, the config (JSON attribute), the tokenizer (JSON attribute) and a
 * checksum per dataset. A save goes to a temporary name, is flushed and renamed, and only
 * then does the `latest` pointer in the output directory move; the last K are kept.
 */
#ifndef DELTAMLA_CHECKPOINT_H
#define DELTAMLA_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "data.h"
#include "params.h"
#include "train.h"

/* The rows of dimension 0 of one tensor that one rank writes: [start, start + count).
 * A tensor's rows are contiguous in memory (row-major), so a slice is one hyperslab of
 * the dataset and one contiguous range of the rank's buffer. */
typedef struct ckpt_slice {
    int64_t start, count;
} ckpt_slice;

/* The default ownership map for this rank: owned[i] (caller's array of t->count) gets
 * rows [rank * rows / nranks, (rank + 1) * rows / nranks) of tensor i's dimension 0, so
 * one rank owns everything and N ranks split every tensor into N disjoint parts (a rank
 * may own no rows of a tensor with fewer rows than ranks). Pure; no MPI calls. */
void ckpt_owner_slices(const param_table *t, int rank, int nranks, ckpt_slice *owned);

/* ckpt_save with an explicit ownership map: owned[i] (t->count entries, this rank's) is
 * the part of parameter i, and of its optimizer state, that this rank writes. Over all
 * ranks the slices of each tensor must be disjoint and cover every row; die() naming the
 * tensor otherwise. Router biases are written by rank 0. Collective over MPI_COMM_WORLD. */
void ckpt_save_owned(const char *output_dir, const trainer *tr, const data_source *src, const char *tokenizer_json,
                     int keep, const ckpt_slice *owned);

/* Save the trainer's complete state as OUTPUT_DIR/ckpt_<step 8 digits>.h5 and point
 * OUTPUT_DIR/latest at it; keep the newest `keep` checkpoints (0 = all). Collective over
 * MPI_COMM_WORLD. die() on I/O errors, leaving `latest` on the previous checkpoint. */
void ckpt_save(const char *output_dir, const trainer *tr, const data_source *src, const char *tokenizer_json,
               int keep);

/* Restore a trainer (built from a config of the same model shape) and the data position
 * from a checkpoint file. Returns 0 on success; returns -1 with *why set (a static
 * one-line reason) when the file is unreadable, truncated or fails its checksums, so
 * the caller can fall back to an older checkpoint. A checkpoint of another model shape
 * is not a corruption: that ends the run through die() naming the mismatch. */
/* (Details of this implementation: collective over MPI_COMM_WORLD, every rank reads
 * everything. The reason names the dataset or the HDF5 problem but not the file, which
 * the caller names. After a -1 the trainer may hold part of the file's values: load
 * another checkpoint, which overwrites all of them, or stop. src may be NULL: the data
 * position is then not restored. Also refused through die(): a checkpoint of another
 * --optimizer_type once its optimizer has stepped, and one whose tokenizer differs from
 * src's. A different --seed or data size only warns.) */
int ckpt_load(const char *path, trainer *tr, data_source *src, const char **why);

/* Check a checkpoint file's structure and every dataset's checksum. Returns 0 when
 * good, else -1 with *why set to a one-line reason naming the first bad dataset. */
/* (Not collective: it opens the file on MPI_COMM_SELF, as ckpt_read_weights does.) */
int ckpt_verify(const char *path, const char **why);

/* The checkpoint `latest` in output_dir points to (a malloc'd path), or NULL if none. */
char *ckpt_latest(const char *output_dir);

/* The CRC-32 of n bytes (zlib's crc32: IEEE polynomial, reflected, initial and final
 * xor 0xffffffff), the checksum every checkpoint dataset carries as its crc32
 * attribute. Parallel over the OpenMP threads for large n. */
uint32_t ckpt_crc32(const void *data, size_t n);

/* The step in a checkpoint file name ckpt_<step>.h5 (the directory part is ignored), or
 * -1 when the name has another form. */
int64_t ckpt_name_step(const char *path);

/* The checkpoints in dir (files ckpt_<step>.h5) with a step below `below` (every one
 * when below < 0), newest first: a malloc'd array of *n malloc'd paths, each and the
 * array to be freed by the caller. An unreadable or missing dir gives none. */
char **ckpt_older(const char *dir, int64_t below, int *n);

/* Everything inference and export need, read on the host (any rank count). */
typedef struct ckpt_weights {
    config cfg;
    param_table table;
    float *params;         /* [table.total] host */
    int n_moe;
    float *router_bias;    /* [n_moe * moe_E] host */
    char *tokenizer_json;  /* malloc'd, or NULL when the checkpoint has none */
    int64_t step;
} ckpt_weights;

/* die() with one line on a missing, corrupt or foreign file. */
void ckpt_read_weights(const char *path, ckpt_weights *w);
void ckpt_weights_free(ckpt_weights *w);

/* Parse the JSON of config_json back into a config (config_finish is run). */
void config_from_json(const char *json, config *c);

#endif
