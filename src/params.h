/* params.h: the table of every trained tensor of the model, in one flat fp32 buffer.
 *
 * The table is built from the config alone (params_build), in a fixed order: the
 * embedding, then each layer's tensors, then the final norm. Names and shapes are the
 * PyTorch reference's (../shared/spec/SEED_NAMES.md), so that dumps, checkpoints and
 * imports need no renaming. Gradients and optimizer state use the same layout: the
 * tensor at table index i lives at items[i].offset in every such buffer.
 *
 * The flat buffer has two regions: [0, dense_total) holds every tensor except the routed
 * expert stacks, in table order; [dense_total, total) holds the expert stacks, in table
 * order. The distributed runtime reduces the two over different rank groups and, with
 * expert parallelism, a rank's table holds only its rows (experts) of each stack
 * (params_shard_experts): shape[0] is then the local row count, full_rows the tensor's
 * logical first dimension and row0 the first logical row held.
 *
 * Every tensor starts at a multiple of PARAM_ALIGN floats (256 bytes), the gaps between
 * tensors (and after the last of a region) hold zeros, in the weights, the gradients and
 * the optimizer state alike, and stay zero: no op writes them, AdamW leaves zeros zero,
 * and they add nothing to a norm or a reduction. The alignment is for the GPU: cuBLAS
 * runs a weight gradient GEMM (dw += dy^T x, with dw as its C) through its fast Hopper
 * kernels only when dw is 16-byte aligned; with the tensors packed end to end, half of
 * moe-1b's MLP weight gradients were not, and their GEMMs ran at 290 TFLOP/s instead of
 * 780 (one H100, 2026-11-27).
 */
#ifndef DELTAMLA_PARAMS_H
#define DELTAMLA_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef enum param_kind {
    PARAM_MATRIX,    /* 2-D Linear weight [out, in]: Muon in muon mode */
    PARAM_EMBEDDING, /* wte [V, d], tied with the head */
    PARAM_NORM,      /* RMSNorm / LayerNorm weight */
    PARAM_BIAS,      /* LayerNorm bias, short-conv bias */
    PARAM_CONV,      /* short-conv taps [P, 1, 4] */
    PARAM_EXPERTS    /* routed expert stack [E, in, out] */
} param_kind;

typedef enum param_init {
    INIT_NORMAL_002, /* N(0, 0.02) */
    INIT_ONES,
    INIT_ZEROS,
    INIT_UNIFORM_HALF /* U(-1/2, 1/2) */
} param_init;

typedef struct param_info {
    char name[96];
    int ndim;
    int64_t shape[3];
    size_t numel;
    size_t offset;      /* in floats, into the flat buffer */
    int64_t full_rows;  /* logical first dimension (= shape[0] unless sharded) */
    int64_t row0;       /* first logical row of dimension 0 held here (0 unless sharded) */
    param_kind kind;
    param_init init;
    int layer;          /* -1 for wte and ln_f */
    int active_num;     /* active share of this tensor = active_num / active_den */
    int active_den;     /* (routed stacks: k / E; everything else 1 / 1) */
} param_info;

typedef struct param_table {
    param_info *items;
    int count;
    int cap;
    size_t total;       /* floats in the flat buffer */
    size_t dense_total; /* floats before the expert-stack region */
} param_table;

/* the alignment of every tensor's offset, in floats */
#define PARAM_ALIGN 64
/* off rounded up to a multiple of PARAM_ALIGN */
size_t params_align_up(size_t off);

/* Build the table for config c (config_finish must have run). Free with params_free. */
void params_build(param_table *t, const config *c);
void params_free(param_table *t);

/* Keep only rows [ep_rank * E / ep, (ep_rank + 1) * E / ep) of every routed expert stack
 * (ep must divide E) and lay the buffer out again; every other tensor stays whole. */
void params_shard_experts(param_table *t, int ep, int ep_rank);

/* Index of the tensor called name, or -1. */
int params_find(const param_table *t, const char *name);

/* Fill host buffer w (t->total floats) with MODEL.md section 8's initialisation. Each
 * tensor draws from its own stream keyed by (seed, name), so the weights do not depend
 * on rank count or table order. */
void params_init(const param_table *t, float *w, uint64_t seed);

/* Total parameters and active parameters per token (of the whole model, also when the
 * table holds a shard of the experts). */
void params_count(const param_table *t, int64_t *total, int64_t *active);

/* 1 if Muon updates this tensor in muon mode (MODEL.md section 9). */
int params_is_muon(const param_info *p);

/* AdamW weight decay applies to this tensor in adamw mode (section 9). */
int params_adamw_decays(const param_info *p);

#endif
