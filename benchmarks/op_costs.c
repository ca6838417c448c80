/* op_costs.c: the cost model of the timed backend (timed_backend.c): per op, the matrix
 * FLOPs and the minimum bytes (each input read once, each output written once, fp32)
 * that its floor is computed from, charged through timed_charge to the family that op
 * was timed in. Each cost function takes its op's arguments (backend.h). */
#include "op_costs.h"

void cost_zero(void *p, size_t bytes) { timed_charge(0, (double)bytes); }
void cost_copy(void *d, const void *s, size_t bytes) { timed_charge(0, 2.0 * bytes); }
void cost_add_inplace(float *y, const float *x, size_t n) { timed_charge(0, 3 * F4 * n); }
void cost_scale_inplace(float *x, float s, size_t n) { timed_charge(0, 2 * F4 * n); }
void cost_sumsq(const float *x, size_t n) { timed_charge(0, F4 * n); }
void cost_embedding_forward(float *o, const int32_t *t, const float *w, int N, int C) { timed_charge(0, 2 * F4 * N * C); }
void cost_embedding_backward(float *dw, const float *d, const int32_t *t, int N, int C) { timed_charge(0, 3 * F4 * N * C); }
void cost_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
    timed_charge(2.0 * N * in * out, F4 * ((double)N * in + (double)in * out + (double)N * out));
}
/* the forward's bytes plus one read of the residual r (C of the GEMM) */
void cost_matmul_forward_add(float *y, const float *x, const float *w, const float *r, int N, int in, int out)
{
    cost_matmul_forward(y, x, w, N, in, out);
    timed_charge(0, F4 * (double)N * out);
}
void cost_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out)
{
    double f = 0, b = F4 * (double)N * out;
    if (dx) { f += 2.0 * N * in * out; b += F4 * ((double)in * out + 2.0 * N * in); }
    if (dw) { f += 2.0 * N * in * out; b += F4 * ((double)N * in + 2.0 * in * out); }
    timed_charge(f, b);
}
void cost_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out)
{
    cost_matmul_backward(dx, dw, dy, x, w, N, in, out);
    if (dx) timed_charge(0, -F4 * (double)N * in); /* dx written, not read */
}
/* several Linear layers on one x: x read once, each weight and output once (the
 * backward: dy's and weights read, dx written or read and written, dw's read and
 * written, x read once for the dw's) */
int multi_outs(const matmul_part *p, int n)
{
    int S = 0;
    for (int i = 0; i < n; i++) S += p[i].out;
    return S;
}
void cost_matmul_forward_multi(const matmul_part *p, int n, int N, int in)
{
    const double S = multi_outs(p, n);
    timed_charge(2.0 * N * in * S, F4 * ((double)N * in + in * S + N * S));
}
void cost_matmul_backward_multi(const matmul_part *p, int n, int dx_set, int N, int in)
{
    double dws = 0;
    for (int i = 0; i < n; i++)
        if (p[i].dw) dws += p[i].out;
    const double S = multi_outs(p, n);
    timed_charge(2.0 * N * in * (S + dws), F4 * (N * S + in * S + (dx_set ? 1.0 : 2.0) * N * in +
                                           (dws > 0 ? (double)N * in + 2.0 * in * dws : 0.0)));
}
/* The fused SwiGLU MLP: its two GEMMs' FLOPs, and the bytes of its inputs and outputs
 * (x, both weights, resid; gu, act, out). The SwiGLU between the GEMMs (no FLOPs counted,
 * bytes only through gu and act) is charged to the GEMM family with them rather than
 * split off to elementwise: the op is timed as one, and the split would be a guess. */
static double mlp_gemm_flops(int N, int d, int h) { return 2.0 * N * d * 2.0 * h + 2.0 * N * (double)h * d; }
void cost_mlp_forward(int N, int d, int h)
{
    timed_charge(mlp_gemm_flops(N, d, h),
           F4 * (2.0 * N * d + 3.0 * h * (double)d + 3.0 * N * (double)h + (double)N * d));
}
/* backward: twice the forward's FLOPs (dx and dW of each GEMM); reads dout, x, gu, act
 * and both weights, adds into both weight gradients (read and written) and dx (written
 * only by the _set form) */
void cost_mlp_backward(int N, int d, int h, int dx_set)
{
    timed_charge(2.0 * mlp_gemm_flops(N, d, h),
           F4 * (2.0 * N * d + 3.0 * N * (double)h + 3.0 * h * (double)d + 6.0 * h * (double)d +
                 (dx_set ? 1.0 : 2.0) * N * d));
}
void cost_rmsnorm_forward(float *o, float *r, const float *x, const float *w, int N, int C) { timed_charge(0, F4 * (2.0 * N * C + N)); }
void cost_rmsnorm_backward(float *dx, float *dw, const float *d, const float *x, const float *w, const float *r, int N, int C) { timed_charge(0, F4 * 4.0 * N * C); }
void cost_layernorm_forward(float *o, float *m, float *r, const float *x, const float *w, const float *b, int N, int C) { timed_charge(0, F4 * (2.0 * N * C + 2 * N)); }
void cost_layernorm_backward(float *dx, float *dw, float *db, const float *d, const float *x, const float *w, const float *m, const float *r, int N, int C) { timed_charge(0, F4 * 4.0 * N * C); }
void cost_swiglu_forward(float *o, const float *in, int N, int h, int s) { timed_charge(0, F4 * 3.0 * N * h); }
void cost_swiglu_backward(float *di, const float *d, const float *in, int N, int h, int s) { timed_charge(0, F4 * 6.0 * N * h); }
void cost_swiglu_backward_set(float *di, const float *d, const float *in, int N, int h, int s) { timed_charge(0, F4 * 5.0 * N * h); }
void cost_conv_forward(float *y, const float *x, const float *w, const float *b, const int32_t *ds, int B, int T, int C) { timed_charge(0, F4 * 2.0 * B * T * C); }
void cost_conv_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w, const int32_t *ds, int B, int T, int C) { timed_charge(0, F4 * 4.0 * B * T * C); }
void cost_gates_forward(float *g, float *b, const float *gr, const float *br, size_t n) { timed_charge(0, F4 * 4.0 * n); }
void cost_gates_backward(float *dg, float *db, const float *g, const float *b, const float *gr, const float *br, size_t n) { timed_charge(0, F4 * 6.0 * n); }
void cost_l2norm_forward(float *y, float *r, const float *x, int n, int D) { timed_charge(0, F4 * 2.0 * n * D); }
void cost_l2norm_backward(float *dx, const float *dy, const float *x, const float *r, int n, int D) { timed_charge(0, F4 * 4.0 * n * D); }
/* chunked GDN per (b, h, chunk of C): K K^T, Q K^T (C^2 D each), the triangular solve
 * (C^2 D / 2 for each of the two right-hand sides), S0 terms K S0, Q S0 and the state update
 * (C D^2 each): about 4 C^2 D + 6 C D^2 multiply-adds per chunk; backward about twice that. */
static double gdn_flops(int B, int T, int H, int D)
{
    double C = GDN_CHUNK, chunks = (T + GDN_CHUNK - 1) / GDN_CHUNK;
    return 2.0 * B * H * chunks * (4 * C * C * D + 6 * C * (double)D * D);
}
void cost_gdn_forward(float *o, float *s, const float *q, const float *k, const float *v, const float *g, const float *b, const int32_t *ds, int B, int T, int H, int D, float sc)
{
    timed_charge(gdn_flops(B, T, H, D), F4 * ((double)B * T * H * (4.0 * D + 2) + gdn_state_floats(B, T, H, D)));
}
void cost_gdn_backward(float *dq, float *dk, float *dv, float *dg, float *db, const float *d, const float *q, const float *k, const float *v, const float *g, const float *b, const float *s, const int32_t *ds, int B, int T, int H, int D, float sc)
{
    timed_charge(2 * gdn_flops(B, T, H, D), F4 * ((double)B * T * H * (8.0 * D + 4) + gdn_state_floats(B, T, H, D)));
}
void cost_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv, const float *kpe, int ks, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float th)
{
    double N = (double)B * T;
    timed_charge(0, F4 * N * (2.0 * H * (dn + dr) + H * (dn + dv) + dr + H * (dn + dr) + H * dv));
}
void cost_mla_prep_backward(float *dq, float *dkv, float *dkpe, int ks, const float *dqh, const float *dkh, const float *dvh, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float th)
{
    double N = (double)B * T;
    timed_charge(0, F4 * N * (2.0 * H * (dn + dr) + H * (dn + dv) + dr + H * (dn + dr) + H * dv));
}
/* causal: half of the T x T score matrix; forward QK^T and PV */
static double attn_flops(int B, int T, int H, int Dk, int Dv) { return 2.0 * B * H * ((double)T * T / 2) * (Dk + Dv); }
void cost_attention_forward(float *o, float *l, const float *q, const float *k, const float *v, const int32_t *di, int B, int T, int H, int Dk, int Dv, float sc)
{
    timed_charge(attn_flops(B, T, H, Dk, Dv), F4 * (double)B * T * H * (2.0 * Dk + 2.0 * Dv + 1));
}
/* backward: recompute QK^T, then dV, dP, dQ, dK: 2.5 x the forward */
void cost_attention_backward(float *dq, float *dk, float *dv, const float *d, const float *o, const float *l, const float *q, const float *k, const float *v, const int32_t *di, int B, int T, int H, int Dk, int Dv, float sc)
{
    timed_charge(2.5 * attn_flops(B, T, H, Dk, Dv), F4 * (double)B * T * H * (4.0 * Dk + 4.0 * Dv + 1));
}
void cost_moe_route_forward(int32_t *i, float *g, int32_t *c, float *z, const float *zz, const float *b, int N, int E, int k, float zc) { timed_charge(0, F4 * ((double)N * E + 2.0 * N * k)); }
void cost_moe_route_backward(float *dz, const float *dg, float dzl, const float *z, const int32_t *i, int N, int E, int k, float zc) { timed_charge(0, F4 * (3.0 * N * E + 2.0 * N * k)); }
void cost_moe_experts_forward(float *y, float *s, const float *x, const int32_t *i, const float *g, const float *w1, const float *w2, int N, int E, int k, int in, int h, int out)
{
    timed_charge(2.0 * N * k * ((double)in * 2 * h + (double)h * out),
           F4 * ((double)N * in + (double)E * (in * 2.0 * h + (double)h * out) + (double)N * out + 3.0 * N * k * h));
}
void cost_moe_experts_backward(float *dx, float *dg, float *dw1, float *dw2, const float *dy, const float *s, const float *x, const int32_t *i, const float *g, const float *w1, const float *w2, int N, int E, int k, int in, int h, int out)
{
    timed_charge(4.0 * N * k * ((double)in * 2 * h + (double)h * out),
           F4 * (2.0 * N * in + 3.0 * E * (in * 2.0 * h + (double)h * out) + (double)N * out + 3.0 * N * k * h));
}
void cost_classifier_forward(float *l, float *lse, const float *h, const float *w, const int32_t *t, int N, int V, int C)
{
    timed_charge(2.0 * N * V * C, F4 * ((double)N * C + (double)V * C + 2.0 * N));
}
/* backward recomputes the logits, then dh and dwte */
void cost_classifier_backward(float *dh, float *dw, const float *h, const float *w, const int32_t *t, const float *lse, float s, int N, int V, int C)
{
    timed_charge(6.0 * N * V * C, F4 * (3.0 * N * C + 3.0 * V * C + N));
}
void cost_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2, float eps, float wd, int step) { timed_charge(0, F4 * 7.0 * n); }
/* NS5 on the m x n orientation (m <= n): per iteration X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n) */
void cost_muon_update(float *p, const float *g, float *b, float *w, int rows, int cols, float lr, float mu, float wd)
{
    double m = rows < cols ? rows : cols, n = rows < cols ? cols : rows;
    timed_charge(5 * (4 * m * m * n + 2 * m * m * m), F4 * 6.0 * m * n);
}

void cost_muon_update_batch(float *const *p, const float *const *g, float *const *b, float *w, int count, int rows, int cols, float lr, float mu, float wd)
{
    for (int i = 0; i < count; i++) cost_muon_update(p[i], g[i], b[i], w, rows, cols, lr, mu, wd);
}
