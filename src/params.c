/* params.c: building the parameter table from the config, initialising and counting it.
 * See params.h. The layer builders below are the single place that says which tensors
 * a GDN or MLA block owns; the model graph looks them up by name once at start-up. */
#include "params.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"
#include "util.h"

static int add(param_table *t, param_kind kind, param_init init, int layer, int ndim,
               int64_t s0, int64_t s1, int64_t s2, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));

static int add(param_table *t, param_kind kind, param_init init, int layer, int ndim,
               int64_t s0, int64_t s1, int64_t s2, const char *fmt, ...)
{
    if (t->count == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        param_info *n = realloc(t->items, (size_t)t->cap * sizeof *n);
        if (!n) die("out of host memory building the parameter table");
        t->items = n;
    }
    param_info *p = &t->items[t->count];
    memset(p, 0, sizeof *p);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    p->ndim = ndim;
    p->shape[0] = s0;
    p->shape[1] = s1;
    p->shape[2] = s2;
    p->numel = (size_t)s0 * (size_t)(ndim > 1 ? s1 : 1) * (size_t)(ndim > 2 ? s2 : 1);
    p->full_rows = s0;
    p->row0 = 0;
    p->kind = kind;
    p->init = init;
    p->layer = layer;
    p->active_num = 1;
    p->active_den = 1;
    return t->count++;
}

size_t params_align_up(size_t off) { return (off + PARAM_ALIGN - 1) / PARAM_ALIGN * PARAM_ALIGN; }

/* Offsets: the dense region in table order, then the expert stacks in table order, each
 * tensor starting at a multiple of PARAM_ALIGN floats (params.h says why). */
static void layout(param_table *t)
{
    size_t off = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < t->count; i++) {
            param_info *p = &t->items[i];
            if ((p->kind == PARAM_EXPERTS) != pass) continue;
            p->offset = off;
            off = params_align_up(off + p->numel);
        }
        if (pass == 0) t->dense_total = off;
    }
    t->total = off;
}

#define MAT(l, out, in, ...) add(t, PARAM_MATRIX, INIT_NORMAL_002, l, 2, out, in, 0, __VA_ARGS__)
#define NORM(l, n, ...) add(t, PARAM_NORM, INIT_ONES, l, 1, n, 0, 0, __VA_ARGS__)

static void build_mlp(param_table *t, const config *c, int l, const char *pre)
{
    int d = c->n_embd;
    MAT(l, 8 * d, d, "%s.gate_up_proj.weight", pre);
    MAT(l, d, 4 * d, "%s.down_proj.weight", pre);
}

static void build_gdn(param_table *t, const config *c, int l)
{
    int d = c->n_embd, P = c->gdn_proj_dim, H = c->n_head, r = c->deltanet_latent_dim;
    char pre[64];
    snprintf(pre, sizeof pre, "transformer.h.%d", l);
    NORM(l, d, "%s.norm1.weight", pre);
    NORM(l, d, "%s.norm2.weight", pre);
    const char *names[3] = {"q", "k", "v"};
    if (r == 0) {
        if (c->deltanet_share_qk) MAT(l, P, d, "%s.attn.qk_proj.weight", pre);
        for (int i = c->deltanet_share_qk ? 2 : 0; i < 3; i++)
            MAT(l, P, d, "%s.attn.%s_proj.weight", pre, names[i]);
        MAT(l, d, P, "%s.attn.o_proj.weight", pre);
    } else {
        if (c->deltanet_share_qk) {
            MAT(l, r, d, "%s.attn.qk_down.weight", pre);
            MAT(l, P, r, "%s.attn.qk_up.weight", pre);
        }
        for (int i = c->deltanet_share_qk ? 2 : 0; i < 3; i++) {
            MAT(l, r, d, "%s.attn.%s_down.weight", pre, names[i]);
            MAT(l, P, r, "%s.attn.%s_up.weight", pre, names[i]);
        }
        MAT(l, r, P, "%s.attn.o_down.weight", pre);
        MAT(l, d, r, "%s.attn.o_up.weight", pre);
    }
    MAT(l, H, d, "%s.attn.g_proj.weight", pre);
    MAT(l, H, d, "%s.attn.beta_proj.weight", pre);
    for (int i = 0; i < 3; i++) {
        add(t, PARAM_CONV, INIT_UNIFORM_HALF, l, 3, P, 1, 4, "%s.attn.%s_conv.conv.weight", pre, names[i]);
        add(t, PARAM_BIAS, INIT_UNIFORM_HALF, l, 1, P, 0, 0, "%s.attn.%s_conv.conv.bias", pre, names[i]);
    }
    char mlp[80];
    snprintf(mlp, sizeof mlp, "%s.mlp", pre);
    build_mlp(t, c, l, mlp);
}

static void build_mla(param_table *t, const config *c, int l)
{
    int d = c->n_embd, H = c->n_head, dn = c->mla_qk_nope_head_dim, dr = c->mla_qk_rope_head_dim;
    int dv = c->mla_v_head_dim, rq = c->mla_q_lora_rank, rkv = config_kv_rank(c, l);
    char pre[64];
    snprintf(pre, sizeof pre, "transformer.h.%d", l);
    NORM(l, d, "%s.attn_norm.weight", pre);
    NORM(l, d, "%s.ffn_norm.weight", pre);
    if (rq == 0) {
        MAT(l, H * (dn + dr), d, "%s.attn.wq.weight", pre);
    } else {
        MAT(l, rq, d, "%s.attn.wq_a.weight", pre);
        NORM(l, rq, "%s.attn.q_norm.weight", pre);
        add(t, PARAM_BIAS, INIT_ZEROS, l, 1, rq, 0, 0, "%s.attn.q_norm.bias", pre);
        MAT(l, H * (dn + dr), rq, "%s.attn.wq_b.weight", pre);
    }
    MAT(l, rkv + dr, d, "%s.attn.wkv_a.weight", pre);
    NORM(l, rkv, "%s.attn.kv_norm.weight", pre);
    add(t, PARAM_BIAS, INIT_ZEROS, l, 1, rkv, 0, 0, "%s.attn.kv_norm.bias", pre);
    MAT(l, H * (dn + dv), rkv, "%s.attn.wkv_b.weight", pre);
    MAT(l, d, H * dv, "%s.attn.wo.weight", pre);
    if (!c->use_moe) {
        char ffn[80];
        snprintf(ffn, sizeof ffn, "%s.ffn", pre);
        build_mlp(t, c, l, ffn);
        return;
    }
    int E = c->moe_E, h = c->moe_hidden, in = c->moe_in;
    MAT(l, E, d, "%s.ffn.router.gate.weight", pre);
    for (int j = 0; j < c->n_shared_experts; j++) {
        MAT(l, 2 * c->expert_dim, d, "%s.ffn.shared_experts.%d.gate_up_proj.weight", pre, j);
        MAT(l, d, c->expert_dim, "%s.ffn.shared_experts.%d.down_proj.weight", pre, j);
    }
    int i1 = add(t, PARAM_EXPERTS, INIT_NORMAL_002, l, 3, E, in, 2 * h, "%s.ffn.experts.gate_up_weight", pre);
    int i2 = add(t, PARAM_EXPERTS, INIT_NORMAL_002, l, 3, E, h, in, "%s.ffn.experts.down_weight", pre);
    for (int i = i1; i <= i2; i++) {
        t->items[i].active_num = c->moe_k;
        t->items[i].active_den = E;
    }
    if (c->use_latent_moe) {
        MAT(l, c->moe_latent, d, "%s.ffn.down_proj.weight", pre);
        MAT(l, d, c->moe_latent, "%s.ffn.up_proj.weight", pre);
    }
}

void params_build(param_table *t, const config *c)
{
    memset(t, 0, sizeof *t);
    add(t, PARAM_EMBEDDING, INIT_NORMAL_002, -1, 2, c->vocab_size, c->n_embd, 0, "transformer.wte.weight");
    for (int l = 0; l < c->n_layer; l++) {
        if (config_is_gdn(c, l)) build_gdn(t, c, l);
        else build_mla(t, c, l);
    }
    NORM(-1, c->n_embd, "transformer.ln_f.weight");
    layout(t);
}

void params_shard_experts(param_table *t, int ep, int ep_rank)
{
    for (int i = 0; i < t->count; i++) {
        param_info *p = &t->items[i];
        if (p->kind != PARAM_EXPERTS) continue;
        fatal_check(p->full_rows % ep == 0 && p->shape[0] == p->full_rows);
        size_t row = p->numel / (size_t)p->shape[0];
        p->shape[0] = p->full_rows / ep;
        p->row0 = (int64_t)ep_rank * p->shape[0];
        p->numel = row * (size_t)p->shape[0];
    }
    layout(t);
}

void params_free(param_table *t)
{
    free(t->items);
    memset(t, 0, sizeof *t);
}

int params_find(const param_table *t, const char *name)
{
    for (int i = 0; i < t->count; i++)
        if (strcmp(t->items[i].name, name) == 0) return i;
    return -1;
}

void params_init(const param_table *t, float *w, uint64_t seed)
{
    memset(w, 0, t->total * sizeof *w); /* the gaps between tensors */
    for (int i = 0; i < t->count; i++) {
        const param_info *p = &t->items[i];
        float *x = w + p->offset;
        uint64_t key = rng_key(seed, p->name);
        /* a shard draws the numbers its rows have in the whole tensor */
        size_t first = (size_t)p->row0 * (p->numel / (size_t)p->shape[0]);
        switch (p->init) {
        case INIT_NORMAL_002:
            for (size_t j = 0; j < p->numel; j++) x[j] = (float)(0.02 * rng_normal(key, first + j));
            break;
        case INIT_ONES:
            for (size_t j = 0; j < p->numel; j++) x[j] = 1.0f;
            break;
        case INIT_ZEROS:
            memset(x, 0, p->numel * sizeof *x);
            break;
        case INIT_UNIFORM_HALF:
            for (size_t j = 0; j < p->numel; j++) x[j] = (float)(rng_uniform(key, first + j) - 0.5);
            break;
        }
    }
}

void params_count(const param_table *t, int64_t *total, int64_t *active)
{
    int64_t tot = 0, act = 0;
    for (int i = 0; i < t->count; i++) {
        const param_info *p = &t->items[i];
        int64_t numel = (int64_t)(p->numel / (size_t)p->shape[0]) * p->full_rows;
        tot += numel;
        act += numel / p->active_den * p->active_num;
    }
    *total = tot;
    *active = act;
}

int params_is_muon(const param_info *p) { return p->kind == PARAM_MATRIX; }

int params_adamw_decays(const param_info *p)
{
    return p->kind == PARAM_MATRIX || p->kind == PARAM_CONV || p->kind == PARAM_EXPERTS;
}
