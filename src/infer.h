/* infer.h: incremental decoding on the CPU, one token at a time, in fp32 host memory.
 *
 * The training graph (model*.c) processes whole [B, T] blocks; generation needs the
 * next-token logits after every appended token without redoing the prefix. The engine
 * keeps exactly the state the model's two mixers carry from one token to the next:
 *
 *   GDN block: the gated delta rule's state, one hk x hk matrix per head (O(1) per
 *     token), and the last 3 inputs of each of its three short convolutions (q, k, v;
 *     kernel 4, so 3 inputs of history suffice).
 *   MLA block: a cache of the COMPRESSED latent per token, never full keys and values:
 *     LayerNorm_kv(c_kv) (the layer's rkv floats; the norm is per token, so storing its
 *     output costs the same as storing c_kv and spares renormalising the whole prefix
 *     each step) and k_pe with RoPE already applied at its position (dr floats).
 *     Attention runs in the latent space with wkv_b ABSORBED (DeepSeek-V2's inference
 *     form): per head, W_uk (the k_nope rows of wkv_b, [dn, rkv]) folds into the query,
 *     q_lat = W_uk^T q_nope, so score_s = q_lat . ckv_s + q_pe . kpe_s; the softmax-
 *     weighted sum of latents ctx = sum_s p_s ckv_s is lifted once by W_uv (the v rows,
 *     [dv, rkv]): o = W_uv ctx. A step costs O(H (dn + dv) rkv + H pos (rkv + dr))
 *     instead of recomputing k_nope and v for every cached token through wkv_b.
 *
 * The MoE FFN routes exactly as training does (top-k of sigmoid(z) + router bias, gates
 * normalised without the bias, through the CPU backend's routing op); biases are read,
 * never updated. The engine depends on the parameter table, not on checkpoints or
 * tokenizers, so tests build it straight from a model's initial weights.
 */
#ifndef DELTAMLA_INFER_H
#define DELTAMLA_INFER_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "params.h"

typedef struct infer_layer infer_layer; /* per-layer weights and recurrent state (infer.c) */
typedef struct infer_work infer_work;   /* the activations of one step (infer.c) */

typedef struct infer {
    config cfg;
    const param_table *table; /* borrowed */
    const float *params;      /* borrowed, host [table->total] */
    float *router_bias;       /* owned copy, [n_moe * moe_E] (NULL when n_moe is 0) */
    int n_moe;                /* MoE layers: rows of router_bias */
    int pos;                  /* tokens appended since the last reset = next position */
    int capacity;             /* most tokens a sequence may hold: cfg.block_size */
    size_t state_floats;      /* floats of per-sequence state: GDN states, conv history, MLA caches */
    infer_layer *layers;      /* [cfg.n_layer] */
    infer_work *work;         /* scratch of one step (owned) */
    int wte, ln_f;            /* table indices */
} infer;

/* Prepare an engine for config c (config_finish has run) whose weights are the host
 * buffer params laid out by table t (params_build of the same config). The engine
 * borrows c's copy, t and params: t and params must outlive it and stay unchanged.
 * router_bias: host [n_moe * moe_E] selection biases in MoE-layer order (as
 * model.router_bias and checkpoints hold them), copied; NULL means all zero. Allocates
 * the state for c->block_size tokens and starts at position 0. die() with one line if a
 * tensor the config needs is missing from t or has the wrong size, or on out of memory. */
void infer_init(infer *s, const config *c, const param_table *t, const float *params,
                const float *router_bias);

/* Forget the sequence: position 0, GDN states and convolution history zero. */
void infer_reset(infer *s);

/* Append token (0 <= token < vocab_size) at position s->pos and write the logits of the
 * next token, host [vocab_size], to logits_out. Returns 0, or -1 without touching the
 * state when the sequence already holds s->capacity tokens. die() on a token outside
 * the vocabulary. */
int infer_step(infer *s, int32_t token, float *logits_out);

/* Release everything infer_init allocated (not the borrowed table or weights). */
void infer_free(infer *s);

/* Sample a token from logits [V] (host). temperature 0: the arg-max (the lowest index
 * on ties); otherwise softmax(logits / temperature) restricted to the top_k largest
 * logits (top_k 0 or >= V: all V), drawn with rng_uniform(key, draw), so a seed and a
 * draw counter fix the choice. Ties in the top-k cut go to the lower index. Scratch is
 * allocated inside. die() on a negative or non-finite temperature, a negative top_k or
 * non-finite logits. */
int32_t infer_sample(const float *logits, int V, float temperature, int top_k, uint64_t key,
                     uint64_t draw);

#endif
