/* optim.h: optimisation as the seed trains (MODEL.md section 9): the parameter split
 * between Muon and AdamW, the warmup-stable-decay schedule, global-norm clipping and the
 * router-bias update. The per-tensor update math is the backend's (adamw_update,
 * muon_update); this file decides which tensor gets which update with which lr.
 */
#ifndef DELTAMLA_OPTIM_H
#define DELTAMLA_OPTIM_H

#include <stdint.h>

#include "model.h"

typedef struct optimizer {
    const backend *be;
    int muon_mode;  /* --optimizer_type muon */
    float *m;       /* [table.total]: AdamW first moment, or Muon momentum buffer */
    float *v;       /* [table.total]: AdamW second moment (unused for Muon tensors) */
    float *work;    /* Muon scratch for the largest matrix */
    int step;       /* optimizer steps taken so far */
} optimizer;

void optim_init(optimizer *o, const model *m);
void optim_free(optimizer *o);

/* The schedule's lr for iteration it (0-based): linear warmup from 0, constant until
 * 0.8 max_iters, then cosine down to min_lr at max_iters. */
double optim_lr(const config *c, int it);

/* Global L2 norm of all gradients, in double. */
double optim_grad_norm(const model *m);

/* Scale every gradient by min(1, grad_clip / (norm + 1e-6)) (torch's clip_grad_norm_);
 * no-op when grad_clip is 0. */
void optim_clip(model *m, double norm);

/* One update of every parameter with schedule lr `lr` (AdamW groups use lr, Muon 200 lr). */
void optim_step(optimizer *o, model *m, double lr);

/* b_e -= gamma * sign(load_e - tokens * k / E) for every MoE layer (MODEL.md section 5);
 * loads: host [n_moe * E] summed over the step. */
void optim_router_bias_update(model *m, const int64_t *loads, int64_t tokens);

#endif
