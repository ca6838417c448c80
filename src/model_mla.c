/* model_mla.c: the MLA block (MODEL.md section 4) and its FFN (section 5: dense SwiGLU
 * MLP, standard MoE or LatentMoE) as a call list of backend ops, forward and backward.
 *
 *   x -> RMSNorm1 -> u
 *   q  = u Wq^T, or LayerNorm(u Wqa^T) Wqb^T                      [N, H(dn+dr)]
 *   c_kv = u Wkva[0:rkv]^T, k_pe = u Wkva[rkv:]^T                 (the two row blocks of wkv_a)
 *   kv = LayerNorm(c_kv) Wkvb^T                                   [N, H(dn+dv)]
 *   qh, kh, vh = per-head assembly with RoPE, then causal attention (mla_attention); wo
 *   x_mid = x + that ; out = x_mid + FFN(RMSNorm2(x_mid))
 *   MoE FFN: z = u2 Wr^T; route; shared experts on u2; routed experts on u2 (standard) or
 *   on down(u2) followed by up (LatentMoE).
 */
#include <math.h>
#include <string.h>

#include "model_internal.h"

#define PW(i) model_param(m, (i))
#define GW(i) model_grad(m, (i))

void mla_plan(model *m, int l, arena *a)
{
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    mla_index *mi = &L->mi;
    mla_acts *A = &L->ma;
    int N = m->B * m->T, d = c->n_embd, H = c->n_head, dn = c->mla_qk_nope_head_dim;
    int dr = c->mla_qk_rope_head_dim, dv = c->mla_v_head_dim, rq = c->mla_q_lora_rank;
    int rkv = config_kv_rank(c, l);
    char name[96];

    mi->rkv = rkv;
    mi->attn_norm = model_index(m, l, "attn_norm.weight", 1);
    mi->ffn_norm = model_index(m, l, "ffn_norm.weight", 1);
    mi->wq = model_index(m, l, "attn.wq.weight", rq == 0);
    mi->wq_a = model_index(m, l, "attn.wq_a.weight", rq != 0);
    mi->q_norm_w = model_index(m, l, "attn.q_norm.weight", rq != 0);
    mi->q_norm_b = model_index(m, l, "attn.q_norm.bias", rq != 0);
    mi->wq_b = model_index(m, l, "attn.wq_b.weight", rq != 0);
    mi->wkv_a = model_index(m, l, "attn.wkv_a.weight", 1);
    mi->kv_norm_w = model_index(m, l, "attn.kv_norm.weight", 1);
    mi->kv_norm_b = model_index(m, l, "attn.kv_norm.bias", 1);
    mi->wkv_b = model_index(m, l, "attn.wkv_b.weight", 1);
    mi->wo = model_index(m, l, "attn.wo.weight", 1);
    int moe = c->use_moe, lat = c->use_moe && c->use_latent_moe;
    mi->mlp_gate_up = model_index(m, l, "ffn.gate_up_proj.weight", !moe);
    mi->mlp_down = model_index(m, l, "ffn.down_proj.weight", !moe);
    mi->router = model_index(m, l, "ffn.router.gate.weight", moe);
    fatal_check(c->n_shared_experts <= 16);
    for (int j = 0; j < c->n_shared_experts && moe; j++) {
        snprintf(name, sizeof name, "ffn.shared_experts.%d.gate_up_proj.weight", j);
        mi->shared_gate_up[j] = model_index(m, l, name, 1);
        snprintf(name, sizeof name, "ffn.shared_experts.%d.down_proj.weight", j);
        mi->shared_down[j] = model_index(m, l, name, 1);
    }
    mi->experts_w1 = model_index(m, l, "ffn.experts.gate_up_weight", moe);
    mi->experts_w2 = model_index(m, l, "ffn.experts.down_weight", moe);
    mi->lat_down = lat ? model_index(m, l, "ffn.down_proj.weight", 1) : -1;
    mi->lat_up = model_index(m, l, "ffn.up_proj.weight", lat);
    mi->moe_slot = moe ? m->n_moe++ : -1;

    A->ln1 = ARENA_F(a, (size_t)N * d);
    A->rstd1 = ARENA_F(a, N);
    if (rq) {
        A->qa = ARENA_F(a, (size_t)N * rq);
        A->qa_n = ARENA_F(a, (size_t)N * rq);
        A->qa_mean = ARENA_F(a, N);
        A->qa_rstd = ARENA_F(a, N);
    }
    A->q = ARENA_F(a, (size_t)N * H * (dn + dr));
    A->ckv = ARENA_F(a, (size_t)N * rkv);
    A->kpe = ARENA_F(a, (size_t)N * dr);
    A->ckv_n = ARENA_F(a, (size_t)N * rkv);
    A->kv_mean = ARENA_F(a, N);
    A->kv_rstd = ARENA_F(a, N);
    A->kv = ARENA_F(a, (size_t)N * H * (dn + dv));
    A->asave = ARENA_F(a, mla_attention_save_floats(N, H, dn, dr, dv));
    A->att = ARENA_F(a, (size_t)N * H * dv);
    A->lse = ARENA_F(a, (size_t)N * H);
    A->xmid = ARENA_F(a, (size_t)N * d);
    A->ln2 = ARENA_F(a, (size_t)N * d);
    A->rstd2 = ARENA_F(a, N);
    if (!moe) {
        A->gu = ARENA_F(a, (size_t)N * 8 * d);
        A->act = ARENA_F(a, (size_t)N * 4 * d);
        return;
    }
    int E = c->moe_E, k = c->moe_k, h = c->moe_hidden, in = c->moe_in, ed = c->expert_dim;
    A->z = ARENA_F(a, (size_t)N * E);
    A->idx = ARENA_I(a, (size_t)N * k);
    A->gate = ARENA_F(a, (size_t)N * k);
    for (int j = 0; j < c->n_shared_experts; j++) {
        A->sh_gu[j] = ARENA_F(a, (size_t)N * 2 * ed);
        A->sh_act[j] = ARENA_F(a, (size_t)N * ed);
    }
    A->lat = lat ? ARENA_F(a, (size_t)N * in) : NULL;
    A->ey = ARENA_F(a, (size_t)N * in);
    A->esave = m->ep > 1 ? NULL : ARENA_F(a, (size_t)N * k * 3 * h); /* with --ep: per exchange (model_ep.c) */
}

/* out [N, d] = resid + FFN(ln2), the FFN's terms summed in order and resid added last
 * (the CPU's bits are those of separate adds). So the residual rides on a GEMM
 * (matmul_forward_add, or the down projection inside mlp_forward) only where that GEMM
 * writes out last: the dense MLP's down projection, LatentMoE's up projection when no
 * shared expert follows; after routed experts or shared experts it is an add_inplace.
 * Shared experts accumulate into out through mlp_forward with resid = out. */
static void ffn_forward(model *m, int l, const float *resid, float *out)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    const mla_index *mi = &L->mi;
    const mla_acts *A = &L->ma;
    int N = m->B * m->T, d = c->n_embd;
    size_t Nd = (size_t)N * d;

    if (!c->use_moe) {
        be->mlp_forward(out, A->gu, A->act, A->ln2, PW(mi->mlp_gate_up), PW(mi->mlp_down), resid, N, d, 4 * d, 0);
        return;
    }
    int E = c->moe_E, k = c->moe_k, h = c->moe_hidden, in = c->moe_in, ed = c->expert_dim;
    int slot = mi->moe_slot;
    be->matmul_forward(A->z, A->ln2, PW(mi->router), N, d, E);
    be->moe_route_forward(A->idx, A->gate, m->counts + (size_t)slot * E, m->zloss + slot, A->z,
                          m->router_bias + (size_t)slot * E, N, E, k, c->router_z_loss_coef);
    const float *ex_in = c->use_latent_moe ? A->lat : A->ln2;
    float *ex_out = c->use_latent_moe ? A->ey : out;
    if (c->use_latent_moe) be->matmul_forward(A->lat, A->ln2, PW(mi->lat_down), N, d, in);
    if (m->ep > 1)
        ep_experts_forward(m, slot, ex_out, ex_in, A->idx, A->gate, PW(mi->experts_w1), PW(mi->experts_w2));
    else
        be->moe_experts_forward(ex_out, A->esave, ex_in, A->idx, A->gate, PW(mi->experts_w1), PW(mi->experts_w2), N, E,
                                k, in, h, in);
    int resid_added = 0;
    if (c->use_latent_moe && c->n_shared_experts == 0) {
        be->matmul_forward_add(out, A->ey, PW(mi->lat_up), resid, N, in, d);
        resid_added = 1;
    } else if (c->use_latent_moe) {
        be->matmul_forward(out, A->ey, PW(mi->lat_up), N, in, d);
    }
    for (int j = 0; j < c->n_shared_experts; j++) {
        be->mlp_forward(out, A->sh_gu[j], A->sh_act[j], A->ln2, PW(mi->shared_gate_up[j]), PW(mi->shared_down[j]),
                        out, N, d, ed, 1); /* out += */
    }
    if (!resid_added) be->add_inplace(out, resid, Nd);
}

/* The Linear layers that read ln1, as parts of matmul_forward_multi and
 * matmul_backward_multi (the backward fills in each dy): the key/value down projection's
 * two row blocks of wkv_a (the latent ckv, then the rope key kpe), then the query's
 * projection wq, or its down projection wq_a with a query latent. Returns the count. */
static int mla_ln1_parts(model *m, int l, matmul_part *part)
{
    const config *c = &m->cfg;
    const mla_index *mi = &m->layers[l].mi;
    const mla_acts *A = &m->layers[l].ma;
    const int d = c->n_embd, dr = c->mla_qk_rope_head_dim, rq = c->mla_q_lora_rank, rkv = mi->rkv;
    const size_t kpe_at = (size_t)rkv * d;
    const int g = m->grads != NULL; /* no gradients (inference): the dw stay NULL */
    part[0] = (matmul_part){PW(mi->wkv_a), rkv, A->ckv, NULL, g ? GW(mi->wkv_a) : NULL};
    part[1] = (matmul_part){PW(mi->wkv_a) + kpe_at, dr, A->kpe, NULL, g ? GW(mi->wkv_a) + kpe_at : NULL};
    if (rq == 0)
        part[2] = (matmul_part){PW(mi->wq), c->n_head * (c->mla_qk_nope_head_dim + dr), A->q, NULL,
                                g ? GW(mi->wq) : NULL};
    else
        part[2] = (matmul_part){PW(mi->wq_a), rq, A->qa, NULL, g ? GW(mi->wq_a) : NULL};
    return 3;
}

void mla_forward(model *m, int l, const float *x, float *out)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    const mla_index *mi = &L->mi;
    const mla_acts *A = &L->ma;
    int B = m->B, T = m->T, N = B * T, d = c->n_embd, H = c->n_head, dn = c->mla_qk_nope_head_dim;
    int dr = c->mla_qk_rope_head_dim, dv = c->mla_v_head_dim, rq = c->mla_q_lora_rank, rkv = mi->rkv;
    int Dq = H * (dn + dr);

    be->rmsnorm_forward(A->ln1, A->rstd1, x, PW(mi->attn_norm), N, d);
    matmul_part part[MATMUL_PARTS_MAX];
    const int np = mla_ln1_parts(m, l, part);
    be->matmul_forward_multi(part, np, A->ln1, N, d);
    if (rq > 0) {
        be->layernorm_forward(A->qa_n, A->qa_mean, A->qa_rstd, A->qa, PW(mi->q_norm_w), PW(mi->q_norm_b), N, rq);
        be->matmul_forward(A->q, A->qa_n, PW(mi->wq_b), N, rq, Dq);
    }
    be->layernorm_forward(A->ckv_n, A->kv_mean, A->kv_rstd, A->ckv, PW(mi->kv_norm_w), PW(mi->kv_norm_b), N, rkv);
    be->matmul_forward(A->kv, A->ckv_n, PW(mi->wkv_b), N, rkv, H * (dn + dv));
    be->mla_attention_forward(A->att, A->lse, A->asave, A->q, A->kv, A->kpe, dr, m->pos, m->doc_id, B, T, H, dn, dr,
                              dv, c->rope_theta, 1.0f / sqrtf((float)(dn + dr)));
    be->matmul_forward_add(A->xmid, A->att, PW(mi->wo), x, N, H * dv, d); /* xmid = x + attention */

    be->rmsnorm_forward(A->ln2, A->rstd2, A->xmid, PW(mi->ffn_norm), N, d);
    ffn_forward(m, l, A->xmid, out);
}

/* accumulates d(ffn input) into dln given dy = d(ffn output) */
static void ffn_backward(model *m, int l, const float *dy, float *dln, arena *s)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    const mla_index *mi = &L->mi;
    const mla_acts *A = &L->ma;
    int N = m->B * m->T, d = c->n_embd;

    if (!c->use_moe) {
        float *mlp_scratch = ARENA_F(s, mlp_scratch_floats(N, 4 * d)); /* dact, dgu */
        be->mlp_backward(dln, GW(mi->mlp_gate_up), GW(mi->mlp_down), dy, A->ln2, A->gu, A->act, PW(mi->mlp_gate_up),
                         PW(mi->mlp_down), mlp_scratch, N, d, 4 * d, 0);
        return;
    }
    int E = c->moe_E, k = c->moe_k, h = c->moe_hidden, in = c->moe_in, ed = c->expert_dim;
    /* one dact/dgu scratch for every shared expert: each backward is done with it before
     * the next starts (the ops run in order on one stream) */
    float *sh_scratch = c->n_shared_experts ? ARENA_F(s, mlp_scratch_floats(N, ed)) : NULL;
    for (int j = 0; j < c->n_shared_experts; j++)
        be->mlp_backward(dln, GW(mi->shared_gate_up[j]), GW(mi->shared_down[j]), dy, A->ln2, A->sh_gu[j],
                         A->sh_act[j], PW(mi->shared_gate_up[j]), PW(mi->shared_down[j]), sh_scratch, N, d, ed, 1);
    float *dgate = ARENA_F(s, (size_t)N * k);
    be->zero(dgate, (size_t)N * k * sizeof(float));
    const float *ex_in = A->ln2, *dex_out = dy;
    float *dex_in = dln;
    if (c->use_latent_moe) {
        float *dey = ARENA_F(s, (size_t)N * in), *dlat = ARENA_F(s, (size_t)N * in);
        be->matmul_backward_set(dey, GW(mi->lat_up), dy, A->ey, PW(mi->lat_up), N, in, d);
        be->zero(dlat, (size_t)N * in * sizeof(float));
        ex_in = A->lat;
        dex_out = dey;
        dex_in = dlat;
    }
    if (m->ep > 1)
        ep_experts_backward(m, mi->moe_slot, dex_in, dgate, GW(mi->experts_w1), GW(mi->experts_w2), dex_out, A->gate,
                            PW(mi->experts_w1), PW(mi->experts_w2));
    else
        be->moe_experts_backward(dex_in, dgate, GW(mi->experts_w1), GW(mi->experts_w2), dex_out, A->esave, ex_in,
                                 A->idx, A->gate, PW(mi->experts_w1), PW(mi->experts_w2), N, E, k, in, h, in);
    if (c->use_latent_moe) be->matmul_backward(dln, GW(mi->lat_down), dex_in, A->ln2, PW(mi->lat_down), N, d, in);
    float *dz = ARENA_F(s, (size_t)N * E);
    be->zero(dz, (size_t)N * E * sizeof(float));
    be->moe_route_backward(dz, dgate, m->zscale, A->z, A->idx, N, E, k, c->router_z_loss_coef);
    be->matmul_backward(dln, GW(mi->router), dz, A->ln2, PW(mi->router), N, d, E);
}

void mla_backward(model *m, int l, const float *x, float *dx, arena *s)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    const mla_index *mi = &L->mi;
    const mla_acts *A = &L->ma;
    int B = m->B, T = m->T, N = B * T, d = c->n_embd, H = c->n_head, dn = c->mla_qk_nope_head_dim;
    int dr = c->mla_qk_rope_head_dim, dv = c->mla_v_head_dim, rq = c->mla_q_lora_rank, rkv = mi->rkv;
    int Dq = H * (dn + dr);
    size_t Nd = (size_t)N * d;

    s->used = 0;
    float *dln = ARENA_F(s, Nd);
    be->zero(dln, Nd * sizeof(float));
    ffn_backward(m, l, dx, dln, s);
    be->rmsnorm_backward(dx, GW(mi->ffn_norm), dln, A->xmid, PW(mi->ffn_norm), A->rstd2, N, d);

    s->used = 0;
    dln = ARENA_F(s, Nd);
    float *datt = ARENA_F(s, (size_t)N * H * dv);
    float *att_scratch = ARENA_F(s, mla_attention_save_floats(N, H, dn, dr, dv));
    float *dq = ARENA_F(s, (size_t)N * Dq), *dkv = ARENA_F(s, (size_t)N * H * (dn + dv));
    float *dkpe = ARENA_F(s, (size_t)N * dr), *dckv_n = ARENA_F(s, (size_t)N * rkv), *dckv = ARENA_F(s, (size_t)N * rkv);
    be->matmul_backward_set(datt, GW(mi->wo), dx, A->att, PW(mi->wo), N, H * dv, d);
    be->mla_attention_backward_set(dq, dkv, dkpe, dr, datt, A->att, A->lse, A->asave, att_scratch, m->pos, m->doc_id,
                                   B, T, H, dn, dr, dv, c->rope_theta, 1.0f / sqrtf((float)(dn + dr)));
    be->matmul_backward_set(dckv_n, GW(mi->wkv_b), dkv, A->ckv_n, PW(mi->wkv_b), N, rkv, H * (dn + dv));
    be->zero(dckv, (size_t)N * rkv * sizeof(float));
    be->layernorm_backward(dckv, GW(mi->kv_norm_w), GW(mi->kv_norm_b), dckv_n, A->ckv, PW(mi->kv_norm_w),
                           A->kv_mean, A->kv_rstd, N, rkv);
    /* dln from ln1's projections in one op, in the order of mla_ln1_parts */
    matmul_part part[MATMUL_PARTS_MAX];
    const int np = mla_ln1_parts(m, l, part);
    part[0].dy = dckv;
    part[1].dy = dkpe;
    if (rq == 0) {
        part[2].dy = dq;
    } else {
        float *dqa_n = ARENA_F(s, (size_t)N * rq), *dqa = ARENA_F(s, (size_t)N * rq);
        be->matmul_backward_set(dqa_n, GW(mi->wq_b), dq, A->qa_n, PW(mi->wq_b), N, rq, Dq);
        be->zero(dqa, (size_t)N * rq * sizeof(float));
        be->layernorm_backward(dqa, GW(mi->q_norm_w), GW(mi->q_norm_b), dqa_n, A->qa, PW(mi->q_norm_w),
                               A->qa_mean, A->qa_rstd, N, rq);
        part[2].dy = dqa;
    }
    be->matmul_backward_multi(dln, 1, part, np, A->ln1, N, d);
    be->rmsnorm_backward(dx, GW(mi->attn_norm), dln, x, PW(mi->attn_norm), A->rstd1, N, d);
}
