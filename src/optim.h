/* optim.h: optimisation as the seed trains (MODEL.md section 9): the parameter split
 * between Muon and AdamW, the warmup-stable-decay schedule, global-norm clipping and the
 * router-bias update. The per-tensor update math is the backend's (adamw_update,
 * muon_update); this file decides which tensor gets which update with which lr.
 */
#ifndef DELTAMLA_OPTIM_H
#define DELTAMLA_OPTIM_H

#include <stdint.h>

#include "model.h"

/* A batch of held Muon matrices of one shape, updated by one muon_update_batch call:
 * table indices muon_items[first .. first + count). */
typedef struct optim_muon_batch {
    int rows, cols, count, first;
} optim_muon_batch;

/* One piece of an update, run on one lane of the backend (backend.h): Muon batch
 * muon_batches[batch] with its scratch at work + work_at, or AdamW over [lo, hi) of the
 * flat buffer with weight decay wd. */
typedef struct optim_unit {
    int lane;
    int muon; /* 1: a Muon batch; 0: an AdamW run */
    int batch;
    size_t lo, hi;
    float wd;
    size_t work_at;
    double cost; /* estimated microseconds on an H100, for the lane plan */
} optim_unit;

/* lanes optim_init plans the update over */
#define OPTIM_LANES BACKEND_LANES
/* Muon batches with more scratch than this (floats, 64 MiB) all run on lane 0, so that
 * only one lane holds scratch of that size */
#define OPTIM_LANE0_WORK ((size_t)1 << 24)

typedef struct optimizer {
    const backend *be;
    struct dist *dist; /* NULL on one process */
    int muon_mode;  /* --optimizer_type muon */
    int zero;       /* --zero 1 on more than one rank: this rank keeps its shard of the state */
    float *m;       /* state of the tensors held here (optim_state maps a tensor to it): */
    float *v;       /*   m = AdamW first moment or Muon momentum, v = AdamW second moment */
    float *work;    /* Muon scratch: each lane's largest batch, the lanes one after another */
    int step;       /* optimizer steps taken so far */
    /* held[0] = [lo, hi) of the dense region and held[1] of the expert region whose
     * state this rank keeps and whose tensors it updates (everything without ZeRO) */
    size_t held[2][2];
    /* with ZeRO: every member's held range, [offset, count), per region and member
     * (region 0 over all ranks, region 1 over the ranks holding the same experts) */
    size_t *seg_off[2], *seg_cnt[2];
    /* the held Muon matrices grouped by shape, in batches of bounded scratch (optim_init) */
    int n_muon_batches;
    optim_muon_batch *muon_batches;
    int *muon_items;
    /* the update in units (every Muon batch and AdamW run), in the order they are issued
     * (longest first), spread over `lanes` lanes */
    int lanes, n_units;
    optim_unit *units;
} optimizer;

/* optim_init_lanes with OPTIM_LANES */
void optim_init(optimizer *o, const model *m);
/* The optimizer state for model m and the plan of its update over `lanes` lanes (1 to
 * BACKEND_LANES): the large Muon batches (work above OPTIM_LANE0_WORK floats) on lane 0,
 * every other unit on the lane with the least estimated work so far, longest first.
 * The results do not depend on the plan. */
void optim_init_lanes(optimizer *o, const model *m, int lanes);
void optim_free(optimizer *o);

/* Where the state of the tensor at flat offset `offset` lives in state buffer base (o->m
 * or o->v), or NULL when another rank keeps it. */
float *optim_state(const optimizer *o, float *base, size_t offset);
/* floats in each of o->m and o->v */
size_t optim_state_floats(const optimizer *o);

/* The schedule's lr for iteration it (0-based): linear warmup from 0, constant until
 * 0.8 max_iters, then cosine down to min_lr at max_iters. */
double optim_lr(const config *c, int it);

/* Global L2 norm of all gradients, in double (with expert parallelism: of every rank's
 * experts, so all ranks get the norm of the whole model's gradient). */
double optim_grad_norm(const model *m);

/* Clip the gradients by min(1, grad_clip / (norm + 1e-6)) (torch's clip_grad_norm_; 1
 * when grad_clip is 0) for the next optim_step: the backend's grad_scale, which the
 * optimizer ops apply as they read each gradient (the buffer keeps the unclipped ones). */
void optim_clip(model *m, double norm);

/* One update of every parameter with schedule lr `lr` (AdamW groups use lr, Muon 200 lr).
 * With ZeRO each rank updates the tensors it holds (whole matrices, so the Newton-Schulz
 * work is split, not repeated) and the updated parameters are all-gathered. The held
 * Muon matrices go to the backend in batches of one shape (muon_update_batch), the
 * AdamW tensors in runs adjacent in the buffer with one weight decay (one adamw_update
 * over the run: elementwise, so the same values as one call per tensor). The units run
 * on the backend's lanes as optim_init_lanes planned them: on the GPU the small Muon
 * batches, chains of short kernels, and the AdamW runs go beside each other and beside
 * the large batches (moe-1b's update phase 13.0 -> 11.7-12.0 ms on an H100). */
void optim_step(optimizer *o, model *m, double lr);

/* b_e -= gamma * sign(load_e - tokens * k / E) for every MoE layer (MODEL.md section 5),
 * on the backend; loads: backend memory [n_moe * E] summed over the step (model_loads). */
void optim_router_bias_update(model *m, const int32_t *loads, int64_t tokens);

#endif
