/* model.h: the model graph, written once against the backend op table.
 *
 * model_init plans every buffer up front from the config (parameters, gradients,
 * router biases, saved activations, backward scratch) in a few large allocations of the
 * chosen backend. model_forward runs one micro-batch and keeps what the backward needs;
 * model_backward runs the forward call list in reverse and accumulates into the
 * parameter gradients, so gradient accumulation is simply several forward/backward
 * pairs between two model_zero_grad calls.
 */
#ifndef DELTAMLA_MODEL_H
#define DELTAMLA_MODEL_H

#include <stdint.h>

#include "backend.h"
#include "config.h"
#include "params.h"

typedef struct model_layer model_layer; /* per-layer tensor indices and buffers (model_internal.h) */
typedef struct ep_layer ep_layer;       /* expert-parallel exchange state of one MoE layer (model_ep.c) */
struct dist;

typedef struct model {
    config cfg;
    const backend *be;
    param_table table;
    float *params;        /* [table.total] backend memory, fp32 master weights */
    float *grads;         /* [table.total] */
    int n_moe;            /* MoE layers */
    float *router_bias;   /* [n_moe * E] selection biases (buffers, not trained by gradients) */
    int32_t *counts;      /* [n_moe * E] routing loads of the last forward */
    int32_t *loads;       /* [n_moe * E] routing loads summed since model_reset_loads */
    float *zloss;         /* [n_moe] z-loss of each MoE layer in the last forward */
    int B, T;             /* micro-batch shape the buffers were planned for */
    model_layer *layers;  /* [n_layer] */
    /* top-level buffers */
    int32_t *tokens, *targets; /* [B*T] backend memory */
    float *resid;         /* [(n_layer+1) * N * d] block inputs, then the final stream */
    float *lnf, *lnf_rstd, *loss, *lse;
    float *dx;            /* [N, d] running gradient of the residual stream */
    float *dlnf;          /* [N, d] */
    void *act_base, *scratch_base;
    float *host_loss;     /* host [B*T] */
    int32_t *host_targets;
    int last_valid;       /* targets != -100 in the last forward */
    double last_loss_sum; /* their summed cross-entropy */
    float zscale;         /* weight of the z-losses in the running backward */
    size_t scratch_cap;
    int wte, ln_f;        /* table indices */
    int32_t eot_token;    /* documents end with this token (--doc_mask); -1: none */
    int32_t *doc_start, *doc_id, *pos; /* [B*T] backend memory, only with --doc_mask */
    int32_t *host_doc;    /* host [3 * B*T] staging for the three above */
    int count_loads;      /* forwards add their routing loads to loads (off for evaluation) */
    /* distributed runtime (NULL / 1 on one rank) */
    struct dist *dist;
    int ep;               /* ranks the routed experts are split over; this rank holds E / ep */
    ep_layer *ep_layers;  /* [n_moe] with ep > 1 */
    float *ep_tmp, *ep_ones; /* exchange scratch [(2 * moe_in + 1) * ep_cap] and ones [ep_cap] */
    size_t ep_cap;        /* rows the scratch holds */
    double loss_norm;     /* the backward divides the summed CE by this (0: by last_valid) */
    /* > 0: the next model_forward also runs the head's backward for model_backward's
     * scale = head_scale (classifier_forward_backward: its logits computed once), and
     * that model_backward, which must get the same scale, skips it; loss_norm must then
     * be set before the forward where it is used. 0: forward only. */
    float head_scale;
    float head_dloss;     /* the dloss_scale the last forward's head ran with, -1: none */
    float bwd_dloss;      /* the backward's head dloss_scale when it runs the head, -1: not */
    /* called after each layer's backward with its index, and with -1 after the
     * embedding's: from then on that layer's (resp. every) gradient is final */
    void (*grads_ready)(void *ctx, int layer);
    void *grads_ready_ctx;
} model;

/* Plan and allocate everything for micro-batches of B x T tokens on backend be, and
 * initialise the weights from cfg->seed (MODEL.md section 8). */
void model_init(model *m, const config *cfg, const backend *be, int B, int T);

/* model_init for one rank of a distributed run: with --ep > 1 the table holds only this
 * rank's experts (params_shard_experts) and the MoE layers exchange tokens with the
 * other ranks of its expert-parallel group. d NULL is model_init. */
void model_init_dist(model *m, const config *cfg, const backend *be, int B, int T, struct dist *d);
void model_free(model *m);

/* With --doc_mask, documents are the runs of tokens that end with eot (the token after
 * an eot starts a new document, as does every row start). Call once before training. */
void model_set_eot(model *m, int32_t eot);

/* One micro-batch: inputs and targets are host int32 [B*T]. Returns the mean
 * cross-entropy over targets != -100 (0 if there are none); *zloss receives the sum of
 * the MoE layers' z-losses. Keeps activations for model_backward. */
double model_forward(model *m, const int32_t *inputs, const int32_t *targets, double *zloss);

/* Backward of the last forward for the objective scale * (CE_sum / n_valid) + zscale *
 * sum zloss, accumulated into m->grads. Training uses scale = zscale = 1 / grad_accum.
 * n_valid is the forward's count of valid targets, or m->loss_norm when that is set (the
 * valid targets of the whole global micro-batch, in data-parallel training). */
void model_backward(model *m, float scale, float zscale);

void model_zero_grad(model *m);

/* The routing loads summed over the forwards since the last model_reset_loads, in
 * backend memory [n_moe * E] (the model's buffer: a caller may sum it over ranks in
 * place); they stay on the device, so no forward waits for them. */
int32_t *model_loads(model *m);
void model_reset_loads(model *m);

/* A parameter tensor's pointer in backend memory (params or grads buffer). */
static inline float *model_param(const model *m, int idx) { return m->params + m->table.items[idx].offset; }
static inline float *model_grad(const model *m, int idx) { return m->grads + m->table.items[idx].offset; }

#endif
