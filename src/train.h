/* train.h: the training step and the training command.
 *
 * A step is split in two so that tools (the reference dump, later the distributed
 * runtime) can look between them: trainer_grads runs gradient_accumulation_steps
 * forward/backward pairs and measures the gradient norm; trainer_apply clips, updates
 * the parameters with the schedule's lr and moves the router biases.
 */
#ifndef DELTAMLA_TRAIN_H
#define DELTAMLA_TRAIN_H

#include <stdint.h>

#include "config.h"
#include "model.h"
#include "optim.h"

typedef struct step_stats {
    int it;             /* iteration number (0-based) */
    double loss;        /* mean cross-entropy over the micro-batches */
    double zloss;       /* mean over micro-batches of the summed MoE z-losses */
    double grad_norm;   /* before clipping */
    double lr;          /* schedule lr (AdamW groups; Muon uses 200x) */
    int nonfinite;      /* loss or grad norm was NaN/Inf */
} step_stats;

typedef struct trainer {
    config cfg;
    model model;
    optimizer opt;
    int it;             /* next iteration */
    int64_t skipped;    /* non-finite steps skipped (--skip_nonfinite) */
    struct dist *dist;  /* NULL on one process */
    /* gradient buckets: the flat offset where each layer's tensors start, per region
     * (dense, experts; SIZE_MAX where a layer has none), and the end of the part not yet
     * handed to a reduction during the running backward */
    size_t *layer_lo[2];
    size_t pending_hi[2];
} trainer;

void trainer_init(trainer *tr, const config *c, const backend *be);
/* trainer_init for one rank of a distributed run (d's backend and rank groups): the
 * step reduces losses, gradients and router loads over the ranks so that every rank
 * logs, clips and updates with the same values. */
void trainer_init_dist(trainer *tr, const config *c, struct dist *d);
void trainer_free(trainer *tr);

/* inputs/targets: host int32 [gradient_accumulation_steps * B * T]. */
void trainer_grads(trainer *tr, const int32_t *inputs, const int32_t *targets, step_stats *st);

/* Clip, update and move router biases, then advance the iteration counter. */
void trainer_apply(trainer *tr, step_stats *st);

/* The backend --device asks for: auto = CUDA when built with it and a GPU is visible. */
const backend *train_backend(const config *c);

/* `deltamla train`: returns the process exit status. */
int train_main(const config *c);

#endif
