/* checkpoint_internal.h: what the checkpoint writer (checkpoint_write.c) and readers
 * (checkpoint_read.c) share, defined in checkpoint_common.c; not for use outside io/checkpoint_*.c.
 *
 * Layout of OUTPUT_DIR/ckpt_<step, 8 digits>.h5 (format "deltamla-checkpoint", version 1):
 *
 *   /params/<name>         every parameter, fp32 master weights, under its parameter-table
 *                          name (dots kept: a '/' would make groups) with its full
 *                          logical shape, e.g. /params/transformer.h.2.attn.wkv_a.weight
 *   /optim/m/<name>        AdamW first moment, or the Muon momentum buffer, of every tensor
 *   /optim/v/<name>        AdamW second moment, only for the tensors AdamW updates (Muon
 *                          tensors have none, so none is stored)
 *   /router_bias/<layer>   [E] selection biases of the MoE FFN of model layer <layer>
 *
 *   The file does not depend on the run's layout: with --ep a rank holds only its rows of
 *   each expert stack and with --zero 1 only its tensors' optimizer state, and each
 *   writes those rows into the datasets of full logical shape (checkpoint_write.c's
 *   ownership map); a reader keeps the rows it holds in its own layout.
 *
 *   every dataset: H5T_IEEE_F32LE, contiguous, attribute crc32 (H5T_STD_U32LE): the
 *   CRC-32 (zlib's crc32, IEEE polynomial) of the dataset's raw little-endian bytes in
 *   row-major order, so `zlib.crc32(ds[()].tobytes())` recomputes it.
 *   /optim attributes: type ("muon" or "adamw"), step (H5T_STD_I64LE, optimizer steps taken).
 *   root attributes: format, version (I32), step (= the trainer's iteration, I64),
 *   skipped (I64), data_epoch, data_row, data_rows (I64: position in and size of the
 *   training source), seed (U64: initialisation and data order are pure functions of
 *   it, so it is the whole RNG state), config (config_json text), tokenizer (its JSON,
 *   absent for raw bytes). Strings are fixed-length, NUL-padded.
 *
 * Threads: Debian's parallel HDF5 is not thread-safe and the shard loader may read from
 * a prefetch thread, so every HDF5 call here holds the process-wide lock of io/loader.c.
 */
#ifndef DELTAMLA_CHECKPOINT_INTERNAL_H
#define DELTAMLA_CHECKPOINT_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <hdf5.h>
#include <mpi.h>

#include "checkpoint.h"

#define CKPT_FORMAT "deltamla-checkpoint"
#define CKPT_VERSION 1

/* ---- CRC-32 (IEEE 802.3, reflected, as zlib) ---- */

/* Called at every public entry point, before any thread may checksum: fills the
 * lookup tables and ckpt_crc32_combine's x^(2^n) mod p table. */
void ckpt_crc_init(void);

/* CRC of A followed by B from crc(A), crc(B) and B's length in bytes (zlib's
 * crc32_combine): crc(AB) = crc(A) * x^(8 len2) mod p  xor  crc(B). */
uint32_t ckpt_crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);

/* CRC-32 of n bytes, in parallel over 4 MiB pieces combined in order. */
uint32_t ckpt_crc32_bytes(const void *data, size_t n);

/* A checksum computed on a helper thread while the caller moves the next bytes through
 * HDF5: one CRC pass costs about as much as the disk transfer of the same bytes, so
 * running the two side by side rather than one after the other nearly halves a save
 * or a load (benchmarks in tests/tools/bench_io.c). The helper may use OpenMP threads
 * of its own (ckpt_crc32_bytes); it never calls HDF5. */
typedef struct crc_job {
    const void *data;
    size_t n;
    uint32_t result;
    pthread_t thread;
    int running;
} crc_job;

/* Start checksumming n bytes at data (which must stay unchanged until ckpt_crc_job_finish);
 * computed inline when small (a thread would cost more) or when no thread starts. */
void ckpt_crc_job_start(crc_job *j, const void *data, size_t n);
uint32_t ckpt_crc_job_finish(crc_job *j);

/* ---- HDF5 plumbing ---- */

/* Take the HDF5 lock and silence HDF5's error-stack printing: failures here end in one
 * line of ours, with HDF5's most specific message (ckpt_h5_reason) inside it. */
void ckpt_h5_enter(void);
void ckpt_h5_leave(void);

/* The innermost (most specific) message of HDF5's error stack, then the stack cleared;
 * a static buffer, valid until the next call. */
const char *ckpt_h5_reason(void);

/* MPI-IO file access on comm. The 1.8 lower bound gives checksummed metadata (the 1.0
 * format has none); collective metadata I/O keeps N ranks from each reading the same
 * object headers. */
hid_t ckpt_make_fapl(MPI_Comm comm);

int ckpt_world_rank(void);
int ckpt_world_size(void);

/* ---- what a checkpoint holds ---- */

typedef enum item_kind { ITEM_PARAM, ITEM_M, ITEM_V, ITEM_BIAS } item_kind;

typedef struct ckpt_item {
    char path[160];   /* dataset path in the file */
    item_kind kind;
    int param;        /* parameter-table index; for ITEM_BIAS the MoE slot */
    int ndim;
    hsize_t dims[3];
    size_t numel;     /* of the whole dataset */
    size_t row;       /* floats per row of dimension 0 */
    size_t offset;    /* floats into its buffer (params, m, v or router_bias) */
    int64_t row0;     /* the buffer holds rows [row0, row0 + local_rows) of dimension 0 */
    int64_t local_rows; /* (all rows, except for expert stacks split over ranks) */
} ckpt_item;

/* Every dataset of a checkpoint of config c and table t, in writing order: all
 * parameters, then (with_optim) every m and the v that AdamW uses, then the router
 * biases. MoE slots are the MLA layers in layer order when use_moe, as model_mla.c
 * numbers them. Returns a malloc'd array; *n_out its length. */
ckpt_item *ckpt_list_items(const param_table *t, const config *c, int muon_mode, int with_optim, int *n_out);

/* The item's rows in the trainer's backend memory (row0 first), or NULL where this rank
 * holds none of it (optimizer state another rank keeps under --zero 1). */
float *ckpt_item_buffer(const ckpt_item *it, const model *m, const optimizer *o);

int ckpt_backend_is_host(const backend *be);

/* ---- the checkpoints of a directory ---- */

typedef struct ckpt_entry {
    int64_t step;
    char name[64];
} ckpt_entry;

/* The checkpoints in dir by ascending step; malloc'd (NULL when none or dir unreadable). */
ckpt_entry *ckpt_list_checkpoints(const char *dir, int *n_out);

#endif
