/* infer.c: the incremental decoding engine of infer.h.
 *
 * One step runs the model of MODEL.md on a single new token with the CPU backend's ops
 * (src/cpu/) wherever a token-level op exists (norms, SwiGLU, gates, L2 norm, routing,
 * routed experts), so that inference and training share one definition of each piece.
 * The matrix-vector products are this file's own (linear(), vectorised partial sums:
 * decoding time is spent there). What the training graph does over a whole sequence,
 * and a single token cannot, lives here too:
 *   - the short convolutions read their last three inputs from a small history;
 *   - the gated delta rule advances each head's state by one token (the loop that
 *     MODEL.md section 3 gives as the reference, which the chunked training form equals
 *     up to rounding);
 *   - MLA attends over the latent cache with wkv_b absorbed (see infer.h), sums and the
 *     softmax in double, as the CPU attention op does.
 * Per-head loops run one head per OpenMP task with fixed-order sums inside, so the
 * logits do not depend on the thread count.
 */
#include "infer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_ops.h"
#include "rng.h"
#include "util.h"

/* Below this many multiply-adds a loop is cheaper than a parallel region. */
#define PAR_MIN_WORK 16384
#define PAR_MIN_MACS 65536

struct infer_layer {
    int is_gdn;
    /* ---- GDN block (NULL where the config has no such tensor) ---- */
    const float *norm1, *norm2;
    const float *proj[3], *down[3], *up[3]; /* q, k, v; shared QK: slot 0 is qk, slot 1 NULL */
    const float *o_proj, *o_down, *o_up, *g_proj, *beta_proj;
    const float *conv_w[3], *conv_b[3];
    const float *mlp_gate_up, *mlp_down;  /* also the dense FFN of an MLA block */
    float *state;                         /* [H, hk, hk], [key dim i][value dim j] */
    float *hist;                          /* [3 convs][3 steps, oldest first][P] */
    /* ---- MLA block ---- */
    int rkv, moe_slot;
    const float *attn_norm, *ffn_norm, *wq, *wq_a, *q_norm_w, *q_norm_b, *wq_b;
    const float *wkv_a, *kv_norm_w, *kv_norm_b, *wkv_b, *wo;
    const float *router, *experts_w1, *experts_w2, *lat_down, *lat_up;
    const float **shared_gate_up, **shared_down; /* [n_shared_experts] */
    float *ckv;                           /* [capacity, rkv] LayerNorm_kv(c_kv) per token */
    float *kpe;                           /* [capacity, dr] k_pe after RoPE */
};

struct infer_work {
    float *x, *xmid, *u, *tmp;            /* [d] residual stream, after the mixer, normed, branch */
    float *lat, *olat;                    /* [r] GDN latent projections */
    float *pre[3], *conv[3], *kn, *o, *wdelta; /* [P] */
    float *rnorm, *graw, *braw, *g, *beta;     /* [H] */
    float *gu, *act;                      /* [8d], [4d] dense MLP */
    float *qa, *qa_n;                     /* [rq] */
    float *q;                             /* [H (dn+dr)] */
    float *c;                             /* [max rkv + dr] = [c_kv | k_pe] */
    float *att;                           /* [H dv] */
    float *z, *gate, *mlat, *ey, *esave, *sh_gu, *sh_act, *sh_out; /* MoE */
    float *stat;                          /* [4] norm statistics and the unused z-loss */
    int32_t *idx, *counts;                /* [k], [E] */
    double *head;                         /* per head: [capacity] scores, [rkv] q_lat, [rkv] ctx */
    size_t head_stride;
    float *floats;                        /* the one allocation behind the float pointers */
};

/* ---- weights ---- */

/* The tensor `transformer.<suffix>` (layer < 0) or `transformer.h.<layer>.<suffix>`,
 * which must exist with numel values: the table comes with the weights (a checkpoint's
 * or params_build's), so a mismatch means weights of another model shape. */
static const float *weight(const infer *s, int layer, const char *suffix, size_t numel)
{
    char name[160];
    if (layer < 0) snprintf(name, sizeof name, "transformer.%s", suffix);
    else snprintf(name, sizeof name, "transformer.h.%d.%s", layer, suffix);
    int i = params_find(s->table, name);
    if (i < 0) die("inference: the weights have no tensor %s, which this config needs", name);
    if (s->table->items[i].numel != numel)
        die("inference: tensor %s has %zu values, this config needs %zu", name, s->table->items[i].numel,
            numel);
    return s->params + s->table->items[i].offset;
}

static void gdn_weights(infer *s, int l, infer_layer *L)
{
    const config *c = &s->cfg;
    size_t d = (size_t)c->n_embd, P = (size_t)c->gdn_proj_dim, H = (size_t)c->n_head;
    size_t r = (size_t)c->deltanet_latent_dim;
    int shared = c->deltanet_share_qk;
    static const char *const qkv[3] = {"q", "k", "v"};
    char suffix[96];
    L->norm1 = weight(s, l, "norm1.weight", d);
    L->norm2 = weight(s, l, "norm2.weight", d);
    for (int i = 0; i < 3; i++) {
        const char *nm = (shared && i == 0) ? "qk" : qkv[i];
        if (!(shared && i == 1)) {
            if (r == 0) {
                snprintf(suffix, sizeof suffix, "attn.%s_proj.weight", nm);
                L->proj[i] = weight(s, l, suffix, P * d);
            } else {
                snprintf(suffix, sizeof suffix, "attn.%s_down.weight", nm);
                L->down[i] = weight(s, l, suffix, r * d);
                snprintf(suffix, sizeof suffix, "attn.%s_up.weight", nm);
                L->up[i] = weight(s, l, suffix, P * r);
            }
        }
        snprintf(suffix, sizeof suffix, "attn.%s_conv.conv.weight", qkv[i]);
        L->conv_w[i] = weight(s, l, suffix, P * 4);
        snprintf(suffix, sizeof suffix, "attn.%s_conv.conv.bias", qkv[i]);
        L->conv_b[i] = weight(s, l, suffix, P);
    }
    if (r == 0) {
        L->o_proj = weight(s, l, "attn.o_proj.weight", d * P);
    } else {
        L->o_down = weight(s, l, "attn.o_down.weight", r * P);
        L->o_up = weight(s, l, "attn.o_up.weight", d * r);
    }
    L->g_proj = weight(s, l, "attn.g_proj.weight", H * d);
    L->beta_proj = weight(s, l, "attn.beta_proj.weight", H * d);
    L->mlp_gate_up = weight(s, l, "mlp.gate_up_proj.weight", 8 * d * d);
    L->mlp_down = weight(s, l, "mlp.down_proj.weight", 4 * d * d);
}

static void mla_weights(infer *s, int l, infer_layer *L)
{
    const config *c = &s->cfg;
    size_t d = (size_t)c->n_embd, H = (size_t)c->n_head, dn = (size_t)c->mla_qk_nope_head_dim;
    size_t dr = (size_t)c->mla_qk_rope_head_dim, dv = (size_t)c->mla_v_head_dim;
    size_t rq = (size_t)c->mla_q_lora_rank, rkv = (size_t)L->rkv, Dq = H * (dn + dr);
    char suffix[96];
    L->attn_norm = weight(s, l, "attn_norm.weight", d);
    L->ffn_norm = weight(s, l, "ffn_norm.weight", d);
    if (rq == 0) {
        L->wq = weight(s, l, "attn.wq.weight", Dq * d);
    } else {
        L->wq_a = weight(s, l, "attn.wq_a.weight", rq * d);
        L->q_norm_w = weight(s, l, "attn.q_norm.weight", rq);
        L->q_norm_b = weight(s, l, "attn.q_norm.bias", rq);
        L->wq_b = weight(s, l, "attn.wq_b.weight", Dq * rq);
    }
    L->wkv_a = weight(s, l, "attn.wkv_a.weight", (rkv + dr) * d);
    L->kv_norm_w = weight(s, l, "attn.kv_norm.weight", rkv);
    L->kv_norm_b = weight(s, l, "attn.kv_norm.bias", rkv);
    L->wkv_b = weight(s, l, "attn.wkv_b.weight", H * (dn + dv) * rkv);
    L->wo = weight(s, l, "attn.wo.weight", d * H * dv);
    if (!c->use_moe) {
        L->mlp_gate_up = weight(s, l, "ffn.gate_up_proj.weight", 8 * d * d);
        L->mlp_down = weight(s, l, "ffn.down_proj.weight", 4 * d * d);
        return;
    }
    size_t E = (size_t)c->moe_E, h = (size_t)c->moe_hidden, in = (size_t)c->moe_in;
    size_t ed = (size_t)c->expert_dim, lat = (size_t)c->moe_latent;
    L->router = weight(s, l, "ffn.router.gate.weight", E * d);
    L->shared_gate_up = xcalloc((size_t)c->n_shared_experts + 1, sizeof *L->shared_gate_up);
    L->shared_down = xcalloc((size_t)c->n_shared_experts + 1, sizeof *L->shared_down);
    for (int j = 0; j < c->n_shared_experts; j++) {
        snprintf(suffix, sizeof suffix, "ffn.shared_experts.%d.gate_up_proj.weight", j);
        L->shared_gate_up[j] = weight(s, l, suffix, 2 * ed * d);
        snprintf(suffix, sizeof suffix, "ffn.shared_experts.%d.down_proj.weight", j);
        L->shared_down[j] = weight(s, l, suffix, d * ed);
    }
    L->experts_w1 = weight(s, l, "ffn.experts.gate_up_weight", E * in * 2 * h);
    L->experts_w2 = weight(s, l, "ffn.experts.down_weight", E * h * in);
    if (c->use_latent_moe) {
        L->lat_down = weight(s, l, "ffn.down_proj.weight", lat * d);
        L->lat_up = weight(s, l, "ffn.up_proj.weight", d * lat);
    }
}

/* ---- scratch ---- */

/* Hand out n floats at *used of base (sizing pass: base NULL, only *used grows). */
static float *take(float *base, size_t *used, size_t n)
{
    float *p = base ? base + *used : NULL;
    *used += (n + 15) & ~(size_t)15; /* 64-byte steps keep every vector aligned alike */
    return p;
}

static size_t plan_work(infer_work *w, float *base, const config *c, int rkv_max)
{
    size_t u = 0, d = (size_t)c->n_embd, P = (size_t)c->gdn_proj_dim, H = (size_t)c->n_head;
    size_t r = (size_t)c->deltanet_latent_dim, rq = (size_t)c->mla_q_lora_rank;
    size_t dn = (size_t)c->mla_qk_nope_head_dim, dr = (size_t)c->mla_qk_rope_head_dim;
    size_t dv = (size_t)c->mla_v_head_dim;
    w->x = take(base, &u, d);
    w->xmid = take(base, &u, d);
    w->u = take(base, &u, d);
    w->tmp = take(base, &u, d);
    w->lat = take(base, &u, r);
    w->olat = take(base, &u, r);
    for (int i = 0; i < 3; i++) {
        w->pre[i] = take(base, &u, P);
        w->conv[i] = take(base, &u, P);
    }
    w->kn = take(base, &u, P);
    w->o = take(base, &u, P);
    w->wdelta = take(base, &u, P);
    w->rnorm = take(base, &u, H);
    w->graw = take(base, &u, H);
    w->braw = take(base, &u, H);
    w->g = take(base, &u, H);
    w->beta = take(base, &u, H);
    w->gu = take(base, &u, 8 * d);
    w->act = take(base, &u, 4 * d);
    w->qa = take(base, &u, rq);
    w->qa_n = take(base, &u, rq);
    w->q = take(base, &u, H * (dn + dr));
    w->c = take(base, &u, (size_t)rkv_max + dr);
    w->att = take(base, &u, H * dv);
    w->stat = take(base, &u, 4);
    if (c->use_moe) {
        size_t E = (size_t)c->moe_E, k = (size_t)c->moe_k, h = (size_t)c->moe_hidden;
        size_t in = (size_t)c->moe_in, ed = (size_t)c->expert_dim;
        w->z = take(base, &u, E);
        w->gate = take(base, &u, k);
        w->mlat = take(base, &u, in);
        w->ey = take(base, &u, in);
        w->esave = take(base, &u, k * 3 * h);
        w->sh_gu = take(base, &u, 2 * ed);
        w->sh_act = take(base, &u, ed);
        w->sh_out = take(base, &u, d);
    }
    return u;
}

void infer_init(infer *s, const config *c, const param_table *t, const float *params,
                const float *router_bias)
{
    memset(s, 0, sizeof *s);
    s->cfg = *c;
    s->table = t;
    s->params = params;
    s->capacity = c->block_size;
    c = &s->cfg;
    int L = c->n_layer, H = c->n_head, hk = c->head_dim, P = c->gdn_proj_dim;
    int dr = c->mla_qk_rope_head_dim, cap = s->capacity, rkv_max = 1;

    s->wte = params_find(t, "transformer.wte.weight");
    s->ln_f = params_find(t, "transformer.ln_f.weight");
    weight(s, -1, "wte.weight", (size_t)c->vocab_size * c->n_embd); /* dies with the name if absent */
    weight(s, -1, "ln_f.weight", (size_t)c->n_embd);

    s->layers = xcalloc((size_t)L, sizeof *s->layers);
    for (int l = 0; l < L; l++) {
        infer_layer *ly = &s->layers[l];
        ly->is_gdn = config_is_gdn(c, l);
        ly->moe_slot = -1;
        if (ly->is_gdn) {
            gdn_weights(s, l, ly);
            ly->state = xcalloc((size_t)H * hk * hk, sizeof(float));
            ly->hist = xcalloc((size_t)9 * P, sizeof(float));
            s->state_floats += (size_t)H * hk * hk + (size_t)9 * P;
        } else {
            ly->rkv = config_kv_rank(c, l);
            if (ly->rkv > rkv_max) rkv_max = ly->rkv;
            mla_weights(s, l, ly);
            if (c->use_moe) ly->moe_slot = s->n_moe++;
            ly->ckv = xcalloc((size_t)cap * ly->rkv, sizeof(float));
            ly->kpe = xcalloc((size_t)cap * dr, sizeof(float));
            s->state_floats += (size_t)cap * (ly->rkv + dr);
        }
    }
    if (s->n_moe) {
        size_t nb = (size_t)s->n_moe * c->moe_E;
        s->router_bias = xcalloc(nb, sizeof(float));
        if (router_bias) memcpy(s->router_bias, router_bias, nb * sizeof(float));
    }

    infer_work *w = xcalloc(1, sizeof *w);
    size_t nfloat = plan_work(w, NULL, c, rkv_max);
    w->floats = xcalloc(nfloat, sizeof(float));
    plan_work(w, w->floats, c, rkv_max);
    if (c->use_moe) {
        w->idx = xcalloc((size_t)c->moe_k, sizeof(int32_t));
        w->counts = xcalloc((size_t)c->moe_E, sizeof(int32_t));
    }
    w->head_stride = (size_t)cap + 2 * (size_t)rkv_max;
    w->head = xcalloc((size_t)H * w->head_stride, sizeof(double));
    s->work = w;
}

void infer_reset(infer *s)
{
    const config *c = &s->cfg;
    for (int l = 0; l < c->n_layer; l++) {
        infer_layer *ly = &s->layers[l];
        if (!ly->is_gdn) continue; /* cache rows at or past pos are never read */
        memset(ly->state, 0, (size_t)c->n_head * c->head_dim * c->head_dim * sizeof(float));
        memset(ly->hist, 0, (size_t)9 * c->gdn_proj_dim * sizeof(float));
    }
    s->pos = 0;
}

void infer_free(infer *s)
{
    if (s->layers) {
        for (int l = 0; l < s->cfg.n_layer; l++) {
            infer_layer *ly = &s->layers[l];
            free(ly->state);
            free(ly->hist);
            free(ly->ckv);
            free(ly->kpe);
            free(ly->shared_gate_up);
            free(ly->shared_down);
        }
    }
    if (s->work) {
        free(s->work->floats);
        free(s->work->idx);
        free(s->work->counts);
        free(s->work->head);
        free(s->work);
    }
    free(s->layers);
    free(s->router_bias);
    memset(s, 0, sizeof *s);
}

/* ---- one token through the blocks ---- */

/* y = x W^T for one token: x [in], W [out, in], y [out]. A step reads every active
 * weight once for a few multiply-adds each, so this matrix-vector product is where
 * decoding spends its time. cpu_matmul_forward keeps one running sum per output (the
 * order the training oracle fixes), a chain of dependent adds that no compiler may
 * vectorise; here each output row keeps MATVEC_LANES interleaved partial sums, which
 * vectorise, and adds them in a fixed tree. The result depends on neither the thread
 * count nor the schedule, and differs from the training graph's only by rounding. */
#define MATVEC_LANES 16
static void linear(float *y, const float *x, const float *wgt, int in, int out)
{
#pragma omp parallel for schedule(static) if ((size_t)in * out >= PAR_MIN_MACS)
    for (int o = 0; o < out; o++) {
        const float *w = wgt + (size_t)o * in;
        float acc[MATVEC_LANES] = {0};
        int k = 0;
        for (; k + MATVEC_LANES <= in; k += MATVEC_LANES)
            for (int l = 0; l < MATVEC_LANES; l++) acc[l] += w[k + l] * x[k + l];
        float tail = 0;
        for (; k < in; k++) tail += w[k] * x[k];
        for (int width = MATVEC_LANES / 2; width > 0; width /= 2)
            for (int l = 0; l < width; l++) acc[l] += acc[l + width];
        y[o] = acc[0] + tail;
    }
}

/* One step of the short conv over C channels: y = bias + sum_s w[s] x_{t-3+s} with the
 * three previous inputs in hist [3][C] (oldest first, zero before the sequence start),
 * in the tap order of cpu_conv_forward; then x enters the history. */
static void conv_step(float *y, const float *x, float *hist, const float *wgt, const float *bias, int C)
{
    const float *h0 = hist, *h1 = hist + C, *h2 = hist + 2 * (size_t)C;
    for (int ch = 0; ch < C; ch++) {
        const float *wc = wgt + (size_t)ch * 4;
        float acc = bias[ch];
        acc += wc[0] * h0[ch];
        acc += wc[1] * h1[ch];
        acc += wc[2] * h2[ch];
        acc += wc[3] * x[ch];
        y[ch] = acc;
    }
    memmove(hist, hist + C, 2 * (size_t)C * sizeof(float));
    memcpy(hist + 2 * (size_t)C, x, (size_t)C * sizeof(float));
}

/* The gated delta rule for one token, every head: state [H, D, D] advances in place and
 * o [H, D] = S^T (scale q). wd [H, D] is scratch. */
static void delta_rule_step(float *state, float *o, const float *q, const float *k, const float *v,
                            const float *g, const float *beta, float *wd, int H, int D, float scale)
{
    const size_t DD = (size_t)D * D;
#pragma omp parallel for schedule(static) if ((size_t)H * DD >= PAR_MIN_WORK)
    for (int h = 0; h < H; h++) {
        float *S = state + h * DD, *w = wd + (size_t)h * D, *oh = o + (size_t)h * D;
        const float *qh = q + (size_t)h * D, *kh = k + (size_t)h * D, *vh = v + (size_t)h * D;
        const float decay = (float)exp((double)g[h]);
        for (size_t e = 0; e < DD; e++) S[e] *= decay;
        for (int j = 0; j < D; j++) {
            float u = 0;
            for (int i = 0; i < D; i++) u += S[(size_t)i * D + j] * kh[i];
            w[j] = beta[h] * (vh[j] - u);
        }
        for (int i = 0; i < D; i++)
            for (int j = 0; j < D; j++) S[(size_t)i * D + j] += kh[i] * w[j];
        for (int j = 0; j < D; j++) {
            float acc = 0;
            for (int i = 0; i < D; i++) acc += S[(size_t)i * D + j] * (scale * qh[i]);
            oh[j] = acc;
        }
    }
}

/* w->tmp = MLP(w->u), the dense SwiGLU of MODEL.md section 2 (silu on the second half) */
static void dense_mlp(infer_work *w, const float *gate_up, const float *down, int d)
{
    linear(w->gu, w->u, gate_up, d, 8 * d);
    cpu_swiglu_forward(w->act, w->gu, 1, 4 * d, 0);
    linear(w->tmp, w->act, down, 4 * d, d);
}

static void gdn_step(infer *s, infer_layer *L)
{
    const config *c = &s->cfg;
    infer_work *w = s->work;
    int d = c->n_embd, P = c->gdn_proj_dim, H = c->n_head, hk = c->head_dim, r = c->deltanet_latent_dim;

    cpu_rmsnorm_forward(w->u, w->stat, w->x, L->norm1, 1, d);
    const float *in[3];
    for (int i = 0; i < 3; i++) {
        if (c->deltanet_share_qk && i == 1) { /* q and k convolve the one shared projection */
            in[1] = in[0];
            continue;
        }
        if (r == 0) {
            linear(w->pre[i], w->u, L->proj[i], d, P);
        } else {
            linear(w->lat, w->u, L->down[i], d, r);
            linear(w->pre[i], w->lat, L->up[i], r, P);
        }
        in[i] = w->pre[i];
    }
    for (int i = 0; i < 3; i++) conv_step(w->conv[i], in[i], L->hist + (size_t)i * 3 * P, L->conv_w[i], L->conv_b[i], P);
    cpu_l2norm_forward(w->kn, w->rnorm, w->conv[1], H, hk);
    linear(w->graw, w->u, L->g_proj, d, H);
    linear(w->braw, w->u, L->beta_proj, d, H);
    cpu_gates_forward(w->g, w->beta, w->graw, w->braw, (size_t)H);
    delta_rule_step(L->state, w->o, w->conv[0], w->kn, w->conv[2], w->g, w->beta, w->wdelta, H, hk,
                    1.0f / sqrtf((float)hk));
    if (r == 0) {
        linear(w->tmp, w->o, L->o_proj, P, d);
    } else {
        linear(w->olat, w->o, L->o_down, P, r);
        linear(w->tmp, w->olat, L->o_up, r, d);
    }
    for (int i = 0; i < d; i++) w->xmid[i] = w->tmp[i] + w->x[i];

    cpu_rmsnorm_forward(w->u, w->stat, w->xmid, L->norm2, 1, d);
    dense_mlp(w, L->mlp_gate_up, L->mlp_down, d);
    for (int i = 0; i < d; i++) w->x[i] = w->tmp[i] + w->xmid[i];
}

/* Interleaved RoPE of MODEL.md section 2 at position pos, in double as cpu_mla_prep_forward
 * computes it; y may equal x. */
static void rope(float *y, const float *x, int pos, int dr, double theta)
{
    for (int j = 0; j < dr / 2; j++) {
        const double ang = (double)pos * pow(theta, -2.0 * j / dr);
        const double cs = cos(ang), sn = sin(ang), x0 = x[2 * j], x1 = x[2 * j + 1];
        y[2 * j] = (float)(x0 * cs - x1 * sn);
        y[2 * j + 1] = (float)(x1 * cs + x0 * sn);
    }
}

/* Attention of the new token (its queries in w->q, RoPE applied, its latent already in
 * the cache at row pos) over cache rows 0..pos, wkv_b absorbed: w->att [H dv]. */
static void latent_attention(infer *s, infer_layer *L)
{
    const config *c = &s->cfg;
    infer_work *w = s->work;
    const int H = c->n_head, dn = c->mla_qk_nope_head_dim, dr = c->mla_qk_rope_head_dim;
    const int dv = c->mla_v_head_dim, rkv = L->rkv, n = s->pos + 1;
    const double scale = 1.0 / sqrt((double)(dn + dr));
    const size_t work = (size_t)H * ((size_t)(dn + dv) * rkv + (size_t)n * (rkv + dr));
#pragma omp parallel for schedule(static) if (work >= PAR_MIN_WORK)
    for (int h = 0; h < H; h++) {
        double *score = w->head + (size_t)h * w->head_stride;
        double *qlat = score + s->capacity, *ctx = qlat + rkv;
        const float *qn = w->q + (size_t)h * (dn + dr), *qpe = qn + dn;
        const float *wk = L->wkv_b + (size_t)h * (dn + dv) * rkv; /* W_uk [dn, rkv] */
        const float *wv = wk + (size_t)dn * rkv;                  /* W_uv [dv, rkv] */
        /* q_lat = W_uk^T q_nope: q_nope . k_nope_s = q_lat . ckv_s for every cached s */
        for (int a = 0; a < rkv; a++) qlat[a] = 0;
        for (int j = 0; j < dn; j++) {
            const double qj = qn[j];
            const float *row = wk + (size_t)j * rkv;
            for (int a = 0; a < rkv; a++) qlat[a] += qj * row[a];
        }
        double mx = -INFINITY;
        for (int t = 0; t < n; t++) {
            const float *ck = L->ckv + (size_t)t * rkv, *kp = L->kpe + (size_t)t * dr;
            double dot = 0;
            for (int a = 0; a < rkv; a++) dot += qlat[a] * ck[a];
            for (int i = 0; i < dr; i++) dot += (double)qpe[i] * kp[i];
            score[t] = scale * dot;
            if (score[t] > mx) mx = score[t];
        }
        double sum = 0;
        for (int a = 0; a < rkv; a++) ctx[a] = 0;
        for (int t = 0; t < n; t++) {
            const double e = exp(score[t] - mx);
            const float *ck = L->ckv + (size_t)t * rkv;
            sum += e;
            for (int a = 0; a < rkv; a++) ctx[a] += e * ck[a];
        }
        /* o = W_uv (sum_s p_s ckv_s): the values are never materialised per token */
        float *out = w->att + (size_t)h * dv;
        for (int j = 0; j < dv; j++) {
            const float *row = wv + (size_t)j * rkv;
            double acc = 0;
            for (int a = 0; a < rkv; a++) acc += row[a] * ctx[a];
            out[j] = (float)(acc / sum);
        }
    }
}

/* w->tmp = MoE(w->u) (MODEL.md section 5): routed experts (on down(u) for LatentMoE,
 * lifted by up) then each shared expert added in order, as the training graph sums. */
static void moe_ffn(infer *s, infer_layer *L)
{
    const config *c = &s->cfg;
    infer_work *w = s->work;
    int d = c->n_embd, E = c->moe_E, k = c->moe_k, h = c->moe_hidden, in = c->moe_in, ed = c->expert_dim;
    linear(w->z, w->u, L->router, d, E);
    cpu_moe_route_forward(w->idx, w->gate, w->counts, w->stat + 2, w->z,
                          s->router_bias + (size_t)L->moe_slot * E, 1, E, k, 0.0f);
    if (c->use_latent_moe) {
        linear(w->mlat, w->u, L->lat_down, d, in);
        cpu_moe_experts_forward(w->ey, w->esave, w->mlat, w->idx, w->gate, L->experts_w1, L->experts_w2, 1, E,
                                k, in, h, in);
        linear(w->tmp, w->ey, L->lat_up, in, d);
    } else {
        cpu_moe_experts_forward(w->tmp, w->esave, w->u, w->idx, w->gate, L->experts_w1, L->experts_w2, 1, E,
                                k, in, h, in);
    }
    for (int j = 0; j < c->n_shared_experts; j++) {
        linear(w->sh_gu, w->u, L->shared_gate_up[j], d, 2 * ed);
        cpu_swiglu_forward(w->sh_act, w->sh_gu, 1, ed, 1);
        linear(w->sh_out, w->sh_act, L->shared_down[j], ed, d);
        for (int i = 0; i < d; i++) w->tmp[i] += w->sh_out[i];
    }
}

static void mla_step(infer *s, infer_layer *L)
{
    const config *c = &s->cfg;
    infer_work *w = s->work;
    int d = c->n_embd, H = c->n_head, dn = c->mla_qk_nope_head_dim, dr = c->mla_qk_rope_head_dim;
    int dv = c->mla_v_head_dim, rq = c->mla_q_lora_rank, rkv = L->rkv, Dq = H * (dn + dr), pos = s->pos;
    double theta = (double)c->rope_theta;

    cpu_rmsnorm_forward(w->u, w->stat, w->x, L->attn_norm, 1, d);
    if (rq == 0) {
        linear(w->q, w->u, L->wq, d, Dq);
    } else {
        linear(w->qa, w->u, L->wq_a, d, rq);
        cpu_layernorm_forward(w->qa_n, w->stat, w->stat + 1, w->qa, L->q_norm_w, L->q_norm_b, 1, rq);
        linear(w->q, w->qa_n, L->wq_b, rq, Dq);
    }
    for (int h = 0; h < H; h++) {
        float *qpe = w->q + (size_t)h * (dn + dr) + dn;
        rope(qpe, qpe, pos, dr, theta);
    }
    /* the token's cache row: LayerNorm_kv(c_kv) and the rotated k_pe */
    linear(w->c, w->u, L->wkv_a, d, rkv + dr);
    cpu_layernorm_forward(L->ckv + (size_t)pos * rkv, w->stat, w->stat + 1, w->c, L->kv_norm_w, L->kv_norm_b, 1,
                          rkv);
    rope(L->kpe + (size_t)pos * dr, w->c + rkv, pos, dr, theta);
    latent_attention(s, L);
    linear(w->tmp, w->att, L->wo, H * dv, d);
    for (int i = 0; i < d; i++) w->xmid[i] = w->tmp[i] + w->x[i];

    cpu_rmsnorm_forward(w->u, w->stat, w->xmid, L->ffn_norm, 1, d);
    if (c->use_moe) moe_ffn(s, L);
    else dense_mlp(w, L->mlp_gate_up, L->mlp_down, d);
    for (int i = 0; i < d; i++) w->x[i] = w->tmp[i] + w->xmid[i];
}

int infer_step(infer *s, int32_t token, float *logits_out)
{
    const config *c = &s->cfg;
    infer_work *w = s->work;
    int d = c->n_embd, V = c->vocab_size;
    if (s->pos >= s->capacity) return -1;
    if (token < 0 || token >= V) die("token %d is outside the vocabulary (vocab_size %d)", (int)token, V);
    const float *wte = s->params + s->table->items[s->wte].offset;
    memcpy(w->x, wte + (size_t)token * d, (size_t)d * sizeof(float));
    for (int l = 0; l < c->n_layer; l++) {
        if (s->layers[l].is_gdn) gdn_step(s, &s->layers[l]);
        else mla_step(s, &s->layers[l]);
    }
    cpu_rmsnorm_forward(w->u, w->stat, w->x, s->params + s->table->items[s->ln_f].offset, 1, d);
    linear(logits_out, w->u, wte, d, V); /* the tied head */
    s->pos++;
    return 0;
}

/* ---- sampling ---- */

typedef struct ranked {
    float logit;
    int32_t id;
} ranked;

/* larger logit first, the lower id on ties */
static int by_logit_desc(const void *pa, const void *pb)
{
    const ranked *a = pa, *b = pb;
    if (a->logit != b->logit) return a->logit > b->logit ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

int32_t infer_sample(const float *logits, int V, float temperature, int top_k, uint64_t key, uint64_t draw)
{
    if (V < 1) die("sampling from an empty vocabulary");
    if (!isfinite(temperature) || temperature < 0)
        die("temperature %g must be a finite number, 0 or more (0 = greedy)", (double)temperature);
    if (top_k < 0) die("top_k %d must be 0 (all tokens) or more", top_k);
    int32_t best = 0;
    for (int i = 0; i < V; i++) {
        if (!isfinite(logits[i])) die("the model produced a non-finite logit (token %d): the weights are broken", i);
        if (logits[i] > logits[best]) best = i;
    }
    if (temperature == 0) return best;

    int n = (top_k == 0 || top_k >= V) ? V : top_k;
    ranked *cand = xmalloc((size_t)V * sizeof *cand);
    for (int i = 0; i < V; i++) cand[i] = (ranked){logits[i], i};
    if (n < V) qsort(cand, (size_t)V, sizeof *cand, by_logit_desc);
    /* exp((l - max) / T) never overflows, and the max term is 1 so the total is >= 1 */
    const double mx = logits[best];
    double total = 0;
    for (int i = 0; i < n; i++) total += exp(((double)cand[i].logit - mx) / temperature);
    const double target = rng_uniform(key, draw) * total;
    int32_t pick = cand[n - 1].id; /* where rounding leaves the target past the last sum */
    double cum = 0;
    for (int i = 0; i < n; i++) {
        cum += exp(((double)cand[i].logit - mx) / temperature);
        if (target < cum) {
            pick = cand[i].id;
            break;
        }
    }
    free(cand);
    return pick;
}
