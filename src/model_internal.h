/* model_internal.h: what the graph files (model.c, model_gdn.c, model_mla.c) share:
 * each layer's parameter indices, its saved activations, and the bump allocator that
 * plans them. Not for use outside the model. */
#ifndef DELTAMLA_MODEL_INTERNAL_H
#define DELTAMLA_MODEL_INTERNAL_H

#include <stddef.h>

#include "model.h"
#include "util.h"

/* Bump allocator over one backend allocation. In the planning pass base is NULL and
 * only `used` grows; the second pass hands out real pointers at the same offsets. */
typedef struct arena {
    char *base;
    size_t used;
    size_t cap; /* bytes behind base (0 while planning) */
} arena;

static inline void *arena_take(arena *a, size_t bytes)
{
    size_t off = (a->used + 255) & ~(size_t)255; /* 256-byte alignment for every buffer */
    a->used = off + bytes;
    fatal_check(!a->base || a->used <= a->cap);
    return a->base ? a->base + off : NULL;
}
#define ARENA_F(a, n) ((float *)arena_take((a), (size_t)(n) * sizeof(float)))
#define ARENA_I(a, n) ((int32_t *)arena_take((a), (size_t)(n) * sizeof(int32_t)))

/* parameter indices of a GDN block (-1 where the config has no such tensor) */
typedef struct gdn_index {
    int norm1, norm2;
    int proj[3], down[3], up[3]; /* q, k, v; with shared QK, slot 0 is qk and slot 1 is -1 */
    int o_proj, o_down, o_up, g_proj, beta_proj;
    int conv_w[3], conv_b[3];
    int mlp_gate_up, mlp_down;
} gdn_index;

/* parameter indices of an MLA block */
typedef struct mla_index {
    int attn_norm, ffn_norm;
    int wq, wq_a, q_norm_w, q_norm_b, wq_b, wkv_a, kv_norm_w, kv_norm_b, wkv_b, wo;
    int mlp_gate_up, mlp_down;                /* dense FFN */
    int router, shared_gate_up[16], shared_down[16], experts_w1, experts_w2, lat_down, lat_up;
    int moe_slot;                             /* index among the MoE layers, -1 if dense */
    int rkv;
} mla_index;

/* saved activations of a GDN block, all [N, .] */
typedef struct gdn_acts {
    float *ln1, *rstd1, *lat[3], *pre[3], *conv[3], *kn, *rnorm, *graw, *braw, *g, *beta;
    float *state, *o, *olat, *xmid, *ln2, *rstd2, *gu, *act;
} gdn_acts;

/* saved activations of an MLA block */
typedef struct mla_acts {
    float *ln1, *rstd1, *qa, *qa_n, *qa_mean, *qa_rstd, *q, *ckv, *kpe, *ckv_n, *kv_mean, *kv_rstd;
    float *kv, *asave, *att, *lse, *xmid, *ln2, *rstd2; /* asave: mla_attention_forward's save */
    float *gu, *act;                          /* dense FFN */
    float *z, *gate, *sh_gu[16], *sh_act[16], *lat, *ey, *esave;
    int32_t *idx;
} mla_acts;

struct model_layer {
    int is_gdn;
    gdn_index gi;
    mla_index mi;
    gdn_acts ga;
    mla_acts ma;
};

void gdn_plan(model *m, int l, arena *acts);
void gdn_forward(model *m, int l, const float *x, float *out);
void gdn_backward(model *m, int l, const float *x, float *dx, arena *scratch);

void mla_plan(model *m, int l, arena *acts);
void mla_forward(model *m, int l, const float *x, float *out);
void mla_backward(model *m, int l, const float *x, float *dx, arena *scratch);

/* Expert-parallel routed experts (model_ep.c): the same contract as the backend's
 * moe_experts_forward/backward for MoE slot `slot`, with this rank's experts and tokens
 * exchanged over the expert-parallel group. y is overwritten; dx and dgate accumulate. */
struct ep_layer {
    int64_t *send_rows, *recv_rows; /* host [ep]: rows to / from each group member */
    int64_t *cursor;                /* host [ep]: the exchange plan's next free slot per member */
    int64_t M, cap;                 /* rows received; rows the buffers below hold */
    int32_t *h_order, *h_pos, *h_lid; /* host [N*k] send order (token), slot of each assignment, local expert */
    int32_t *h_lid_recv;            /* host [cap] local expert of each received row */
    int32_t *order, *pos, *lid;     /* backend copies: [N*k], [N*k], [cap] */
    int32_t *h_idx;                 /* host [N*k] routing of the last forward */
    float *xs;                      /* [N*k, in] rows in send order (also the backward's exchanges) */
    float *yback;                   /* [N*k, in] expert outputs returned, in send order */
    float *xr, *esave;              /* [cap, in] rows received; [cap, 3h] what the experts' backward needs */
};
void ep_init(model *m);
void ep_free(model *m);
void ep_experts_forward(model *m, int slot, float *y, const float *x, const int32_t *idx, const float *gate,
                        const float *w1, const float *w2);
void ep_experts_backward(model *m, int slot, float *dx, float *dgate, float *dw1, float *dw2, const float *dy,
                         const float *gate, const float *w1, const float *w2);

/* index of a named tensor of layer l, or -1 when absent; die() if required and absent */
int model_index(const model *m, int l, const char *suffix, int required);

#endif
