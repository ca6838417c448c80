/* timed_backend.c: see timed_backend.h. The wrappers follow backend.h member by
 * member; each times its op and charges the op's cost (op_costs.c) to the op's family. */
#include "timed_backend.h"

#include "op_costs.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

static const backend *inner;
static backend timed;
static family_stats stats[FAM_COUNT];
static const char *family_names[FAM_COUNT] = {
    "gemm forward", "gemm backward", "norms", "elementwise", "short conv", "gdn forward", "gdn backward",
    "mla prep (rope)", "attention forward", "attention backward", "moe routing", "moe experts forward",
    "moe experts backward", "head+loss forward", "head+loss backward", "optimizer", "memset/copy"};

static op_family current;
#define MAX_GEMM_SHAPES 128
static gemm_shape_stats shapes[MAX_GEMM_SHAPES];
static int n_shapes;

/* add one call to its shape's row (calls of shapes beyond the table's size are
 * still in their family) */
static void gemm_shape(int kind, int dx, int dw, int N, int in, int out, double seconds, double flops, double bytes)
{
    int i = 0;
    while (i < n_shapes && !(shapes[i].kind == kind && shapes[i].dx == dx && shapes[i].dw == dw &&
                             shapes[i].N == N && shapes[i].in == in && shapes[i].out == out))
        i++;
    if (i == n_shapes) {
        if (n_shapes == MAX_GEMM_SHAPES) return;
        shapes[n_shapes++] = (gemm_shape_stats){kind, dx, dw, N, in, out, 0, 0, 0, 0};
    }
    shapes[i].seconds += seconds;
    shapes[i].flops += flops;
    shapes[i].bytes += bytes;
    shapes[i].calls++;
}

/* a family's totals before an op is charged, so that the op's own share can be taken */
typedef struct fam_mark {
    double seconds, flops, bytes;
} fam_mark;

static fam_mark mark(op_family f) { return (fam_mark){stats[f].seconds, stats[f].flops, stats[f].bytes}; }

/* charge what family f gained since m to one shape row */
static void shape_since(op_family f, fam_mark m, int kind, int dx, int dw, int N, int in, int out)
{
    gemm_shape(kind, dx, dw, N, in, out, stats[f].seconds - m.seconds, stats[f].flops - m.flops,
               stats[f].bytes - m.bytes);
}

static double begin(void)
{
    inner->sync();
    return wall_time();
}

static void end(op_family f, double t0)
{
    inner->sync();
    stats[f].seconds += wall_time() - t0;
    stats[f].calls++;
    current = f;
}

/* op_costs.h: the cost functions charge each op's FLOPs and bytes here, to the family
 * just timed */
void timed_charge(double flops, double bytes)
{
    stats[current].flops += flops;
    stats[current].bytes += bytes;
}

static void t_zero(void *p, size_t bytes)
{
    double t0 = begin();
    inner->zero(p, bytes);
    end(FAM_MEMORY, t0);
    cost_zero(p, bytes);
}

static void t_copy(void *dst, const void *src, size_t bytes)
{
    double t0 = begin();
    inner->copy(dst, src, bytes);
    end(FAM_MEMORY, t0);
    cost_copy(dst, src, bytes);
}

static void t_add_inplace(float *y, const float *x, size_t n)
{
    double t0 = begin();
    inner->add_inplace(y, x, n);
    end(FAM_ELEMENTWISE, t0);
    cost_add_inplace(y, x, n);
}

static void t_scale_inplace(float *x, float s, size_t n)
{
    double t0 = begin();
    inner->scale_inplace(x, s, n);
    end(FAM_ELEMENTWISE, t0);
    cost_scale_inplace(x, s, n);
}

static double t_sumsq(const float *x, size_t n)
{
    double t0 = begin();
    double r = inner->sumsq(x, n);
    end(FAM_OPTIMIZER, t0);
    cost_sumsq(x, n);
    return r;
}

static void t_embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int C)
{
    double t0 = begin();
    inner->embedding_forward(out, tokens, wte, N, C);
    end(FAM_ELEMENTWISE, t0);
    cost_embedding_forward(out, tokens, wte, N, C);
}

static void t_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int C)
{
    double t0 = begin();
    inner->embedding_backward(dwte, dout, tokens, N, C);
    end(FAM_ELEMENTWISE, t0);
    cost_embedding_backward(dwte, dout, tokens, N, C);
}

static void t_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
    double t0 = begin();
    inner->matmul_forward(y, x, w, N, in, out);
    const fam_mark m0 = mark(FAM_GEMM_FWD);
    end(FAM_GEMM_FWD, t0);
    cost_matmul_forward(y, x, w, N, in, out);
    shape_since(FAM_GEMM_FWD, m0, SHAPE_GEMM_FWD, 0, 0, N, in, out);
}

static void t_matmul_forward_add(float *y, const float *x, const float *w, const float *r, int N, int in, int out)
{
    double t0 = begin();
    inner->matmul_forward_add(y, x, w, r, N, in, out);
    const fam_mark m0 = mark(FAM_GEMM_FWD);
    end(FAM_GEMM_FWD, t0);
    cost_matmul_forward_add(y, x, w, r, N, in, out);
    shape_since(FAM_GEMM_FWD, m0, SHAPE_GEMM_FWD_ADD, 0, 0, N, in, out);
}

static void t_matmul_forward_multi(const matmul_part *p, int n, const float *x, int N, int in)
{
    double t0 = begin();
    inner->matmul_forward_multi(p, n, x, N, in);
    const fam_mark m0 = mark(FAM_GEMM_FWD);
    end(FAM_GEMM_FWD, t0);
    cost_matmul_forward_multi(p, n, N, in);
    shape_since(FAM_GEMM_FWD, m0, SHAPE_GEMM_FWD_MULTI, 0, n, N, in, multi_outs(p, n));
}

static void t_matmul_backward_multi(float *dx, int dx_set, const matmul_part *p, int n, const float *x, int N, int in)
{
    double t0 = begin();
    inner->matmul_backward_multi(dx, dx_set, p, n, x, N, in);
    const fam_mark m0 = mark(FAM_GEMM_BWD);
    end(FAM_GEMM_BWD, t0);
    cost_matmul_backward_multi(p, n, dx_set, N, in);
    shape_since(FAM_GEMM_BWD, m0, SHAPE_GEMM_BWD_MULTI, 1 + dx_set, n, N, in, multi_outs(p, n));
}

typedef void (*matmul_bwd_fn)(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out);

/* matmul_backward or its _set form (op), charged by cost, into its shape's row */
static void time_matmul_backward(matmul_bwd_fn op, matmul_bwd_fn cost, float *dx, float *dw, const float *dy,
                                 const float *x, const float *w, int N, int in, int out)
{
    double t0 = begin();
    op(dx, dw, dy, x, w, N, in, out);
    const fam_mark m0 = mark(FAM_GEMM_BWD);
    end(FAM_GEMM_BWD, t0);
    cost(dx, dw, dy, x, w, N, in, out);
    shape_since(FAM_GEMM_BWD, m0, SHAPE_GEMM_BWD, dx != NULL, dw != NULL, N, in, out);
}

static void t_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out)
{
    time_matmul_backward(inner->matmul_backward, cost_matmul_backward, dx, dw, dy, x, w, N, in, out);
}

static void t_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out)
{
    time_matmul_backward(inner->matmul_backward_set, cost_matmul_backward_set, dx, dw, dy, x, w, N, in, out);
}

static void t_mlp_forward(float *out, float *gu, float *act, const float *x, const float *w_gu, const float *w_down,
                          const float *resid, int N, int d, int h, int silu_first)
{
    double t0 = begin();
    inner->mlp_forward(out, gu, act, x, w_gu, w_down, resid, N, d, h, silu_first);
    const fam_mark m0 = mark(FAM_GEMM_FWD);
    end(FAM_GEMM_FWD, t0);
    cost_mlp_forward(N, d, h);
    shape_since(FAM_GEMM_FWD, m0, SHAPE_MLP_FWD, 0, 0, N, d, h);
}

typedef void (*mlp_bwd_fn)(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                           const float *gu, const float *act, const float *w_gu, const float *w_down, float *scratch,
                           int N, int d, int h, int silu_first);

/* mlp_backward or its _set form (op) into its shape's row (dx: 1 accumulated, 2 set) */
static void time_mlp_backward(mlp_bwd_fn op, int dx_set, float *dx, float *dw_gu, float *dw_down, const float *dout,
                              const float *x, const float *gu, const float *act, const float *w_gu,
                              const float *w_down, float *scratch, int N, int d, int h, int silu_first)
{
    double t0 = begin();
    op(dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, silu_first);
    const fam_mark m0 = mark(FAM_GEMM_BWD);
    end(FAM_GEMM_BWD, t0);
    cost_mlp_backward(N, d, h, dx_set);
    shape_since(FAM_GEMM_BWD, m0, SHAPE_MLP_BWD, 1 + dx_set, 1, N, d, h);
}

static void t_mlp_backward(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                           const float *gu, const float *act, const float *w_gu, const float *w_down, float *scratch,
                           int N, int d, int h, int silu_first)
{
    time_mlp_backward(inner->mlp_backward, 0, dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d, h,
                      silu_first);
}

static void t_mlp_backward_set(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                               const float *gu, const float *act, const float *w_gu, const float *w_down,
                               float *scratch, int N, int d, int h, int silu_first)
{
    time_mlp_backward(inner->mlp_backward_set, 1, dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d,
                      h, silu_first);
}

static void t_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C)
{
    double t0 = begin();
    inner->rmsnorm_forward(out, rstd, x, w, N, C);
    end(FAM_NORM, t0);
    cost_rmsnorm_forward(out, rstd, x, w, N, C);
}

static void t_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w, const float *rstd, int N, int C)
{
    double t0 = begin();
    inner->rmsnorm_backward(dx, dw, dout, x, w, rstd, N, C);
    end(FAM_NORM, t0);
    cost_rmsnorm_backward(dx, dw, dout, x, w, rstd, N, C);
}

static void t_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b, int N, int C)
{
    double t0 = begin();
    inner->layernorm_forward(out, mean, rstd, x, w, b, N, C);
    end(FAM_NORM, t0);
    cost_layernorm_forward(out, mean, rstd, x, w, b, N, C);
}

static void t_layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w, const float *mean, const float *rstd, int N, int C)
{
    double t0 = begin();
    inner->layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C);
    end(FAM_NORM, t0);
    cost_layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C);
}

static void t_swiglu_forward(float *out, const float *in, int N, int h, int silu_first)
{
    double t0 = begin();
    inner->swiglu_forward(out, in, N, h, silu_first);
    end(FAM_ELEMENTWISE, t0);
    cost_swiglu_forward(out, in, N, h, silu_first);
}

static void t_swiglu_backward(float *din, const float *dout, const float *in, int N, int h, int silu_first)
{
    double t0 = begin();
    inner->swiglu_backward(din, dout, in, N, h, silu_first);
    end(FAM_ELEMENTWISE, t0);
    cost_swiglu_backward(din, dout, in, N, h, silu_first);
}

static void t_swiglu_backward_set(float *din, const float *dout, const float *in, int N, int h, int silu_first)
{
    double t0 = begin();
    inner->swiglu_backward_set(din, dout, in, N, h, silu_first);
    end(FAM_ELEMENTWISE, t0);
    cost_swiglu_backward_set(din, dout, in, N, h, silu_first);
}

static void t_conv_forward(float *y, const float *x, const float *w, const float *bias, const int32_t *doc_start, int B, int T, int C)
{
    double t0 = begin();
    inner->conv_forward(y, x, w, bias, doc_start, B, T, C);
    end(FAM_CONV, t0);
    cost_conv_forward(y, x, w, bias, doc_start, B, T, C);
}

static void t_conv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w, const int32_t *doc_start, int B, int T, int C)
{
    double t0 = begin();
    inner->conv_backward(dx, dw, dbias, dy, x, w, doc_start, B, T, C);
    end(FAM_CONV, t0);
    cost_conv_backward(dx, dw, dbias, dy, x, w, doc_start, B, T, C);
}

static void t_conv_backward_set(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w, const int32_t *doc_start, int B, int T, int C)
{
    double t0 = begin();
    inner->conv_backward_set(dx, dw, dbias, dy, x, w, doc_start, B, T, C);
    end(FAM_CONV, t0);
    cost_conv_backward(dx, dw, dbias, dy, x, w, doc_start, B, T, C);
}

static void t_gates_forward(float *g, float *beta, const float *graw, const float *braw, size_t n)
{
    double t0 = begin();
    inner->gates_forward(g, beta, graw, braw, n);
    end(FAM_ELEMENTWISE, t0);
    cost_gates_forward(g, beta, graw, braw, n);
}

static void t_gates_backward(float *dgraw, float *dbraw, const float *dg, const float *dbeta, const float *graw, const float *braw, size_t n)
{
    double t0 = begin();
    inner->gates_backward(dgraw, dbraw, dg, dbeta, graw, braw, n);
    end(FAM_ELEMENTWISE, t0);
    cost_gates_backward(dgraw, dbraw, dg, dbeta, graw, braw, n);
}

static void t_l2norm_forward(float *y, float *rnorm, const float *x, int n, int D)
{
    double t0 = begin();
    inner->l2norm_forward(y, rnorm, x, n, D);
    end(FAM_ELEMENTWISE, t0);
    cost_l2norm_forward(y, rnorm, x, n, D);
}

static void t_l2norm_backward(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D)
{
    double t0 = begin();
    inner->l2norm_backward(dx, dy, x, rnorm, n, D);
    end(FAM_ELEMENTWISE, t0);
    cost_l2norm_backward(dx, dy, x, rnorm, n, D);
}

static void t_gdn_forward(float *o, float *state_save, const float *q, const float *k, const float *v, const float *g, const float *beta, const int32_t *doc_start, int B, int T, int H, int D, float scale)
{
    double t0 = begin();
    inner->gdn_forward(o, state_save, q, k, v, g, beta, doc_start, B, T, H, D, scale);
    end(FAM_GDN_FWD, t0);
    cost_gdn_forward(o, state_save, q, k, v, g, beta, doc_start, B, T, H, D, scale);
}

static void t_gdn_backward(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout, const float *q, const float *k, const float *v, const float *g, const float *beta, const float *state_save, const int32_t *doc_start, int B, int T, int H, int D, float scale)
{
    double t0 = begin();
    inner->gdn_backward(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale);
    end(FAM_GDN_BWD, t0);
    cost_gdn_backward(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale);
}

static void t_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv, const float *kpe, int kpe_stride, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float theta)
{
    double t0 = begin();
    inner->mla_prep_forward(qh, kh, vh, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
    end(FAM_MLA_PREP, t0);
    cost_mla_prep_forward(qh, kh, vh, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
}

static void t_l2norm_backward_set(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D)
{
    double t0 = begin();
    inner->l2norm_backward_set(dx, dy, x, rnorm, n, D);
    end(FAM_ELEMENTWISE, t0);
    cost_l2norm_backward(dx, dy, x, rnorm, n, D);
}

static void t_mla_prep_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh, const float *dkh, const float *dvh, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float theta)
{
    double t0 = begin();
    inner->mla_prep_backward_set(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta);
    end(FAM_MLA_PREP, t0);
    cost_mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta);
}

static void t_mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh, const float *dkh, const float *dvh, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float theta)
{
    double t0 = begin();
    inner->mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta);
    end(FAM_MLA_PREP, t0);
    cost_mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta);
}

static void t_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v, const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    double t0 = begin();
    inner->attention_forward(out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
    end(FAM_ATTN_FWD, t0);
    cost_attention_forward(out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
}

static void t_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse, const float *q, const float *k, const float *v, const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    double t0 = begin();
    inner->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
    end(FAM_ATTN_BWD, t0);
    cost_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
}

static void t_gdn_backward_set(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout, const float *q, const float *k, const float *v, const float *g, const float *beta, const float *state_save, const int32_t *doc_start, int B, int T, int H, int D, float scale)
{
    double t0 = begin();
    inner->gdn_backward_set(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale);
    end(FAM_GDN_BWD, t0);
    cost_gdn_backward(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale);
}

static void t_attention_backward_set(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse, const float *q, const float *k, const float *v, const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    double t0 = begin();
    inner->attention_backward_set(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
    end(FAM_ATTN_BWD, t0);
    cost_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
}

/* the fused MLA attention: timed with the attention, charged prep's bytes and the
 * attention's cost (the fp32 bytes of the separate ops: a loose floor for the fused op) */
static void t_mla_attention_forward(float *out, float *lse, float *save, const float *q, const float *kv, const float *kpe, int kpe_stride, const int32_t *pos, const int32_t *doc_id, int B, int T, int H, int dn, int dr, int dv, float theta, float scale)
{
    double t0 = begin();
    inner->mla_attention_forward(out, lse, save, q, kv, kpe, kpe_stride, pos, doc_id, B, T, H, dn, dr, dv, theta, scale);
    end(FAM_ATTN_FWD, t0);
    cost_mla_prep_forward(save, save, save, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
    cost_attention_forward(out, lse, save, save, save, doc_id, B, T, H, dn + dr, dv, scale);
}

static void t_mla_attention_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dout, const float *out, const float *lse, const float *save, float *scratch, const int32_t *pos, const int32_t *doc_id, int B, int T, int H, int dn, int dr, int dv, float theta, float scale)
{
    double t0 = begin();
    inner->mla_attention_backward_set(dq, dkv, dkpe, kpe_stride, dout, out, lse, save, scratch, pos, doc_id, B, T, H, dn, dr, dv, theta, scale);
    end(FAM_ATTN_BWD, t0);
    cost_mla_prep_backward(dq, dkv, dkpe, kpe_stride, scratch, scratch, scratch, pos, B, T, H, dn, dr, dv, theta);
    cost_attention_backward(scratch, scratch, scratch, dout, out, lse, save, save, save, doc_id, B, T, H, dn + dr, dv, scale);
}

static void t_moe_route_forward(int32_t *idx, float *gate, int32_t *counts, float *zloss_out, const float *z, const float *bias, int N, int E, int k, float zcoef)
{
    double t0 = begin();
    inner->moe_route_forward(idx, gate, counts, zloss_out, z, bias, N, E, k, zcoef);
    end(FAM_MOE_ROUTE, t0);
    cost_moe_route_forward(idx, gate, counts, zloss_out, z, bias, N, E, k, zcoef);
}

static void t_add_i32(int32_t *y, const int32_t *x, size_t n)
{
    double t0 = begin();
    inner->add_i32(y, x, n);
    end(FAM_MOE_ROUTE, t0);
    timed_charge(0, 12.0 * n);
}

static void t_router_bias_update(float *bias, const int32_t *loads, int rows, int E, int64_t tokens, int k, float rate)
{
    double t0 = begin();
    inner->router_bias_update(bias, loads, rows, E, tokens, k, rate);
    end(FAM_MOE_ROUTE, t0);
    timed_charge(0, 12.0 * rows * E);
}

static void t_rows_gather(float *dst, const float *src, const int32_t *rows, int n, int width)
{
    double t0 = begin();
    inner->rows_gather(dst, src, rows, n, width);
    end(FAM_MOE_EXPERTS_FWD, t0);
    timed_charge(0, F4 * 2.0 * n * width + 4.0 * n);
}

static void t_moe_combine_forward(float *y, const float *vals, const int32_t *pos, const float *gate, int N, int k, int width)
{
    double t0 = begin();
    inner->moe_combine_forward(y, vals, pos, gate, N, k, width);
    end(FAM_MOE_EXPERTS_FWD, t0);
    timed_charge(0, F4 * ((double)N * k * width + 2.0 * N * width + 2.0 * N * k));
}

static void t_moe_combine_backward(float *dvals, float *dgate, const float *dy, const float *vals, const int32_t *pos, const float *gate, int N, int k, int width)
{
    double t0 = begin();
    inner->moe_combine_backward(dvals, dgate, dy, vals, pos, gate, N, k, width);
    end(FAM_MOE_EXPERTS_BWD, t0);
    timed_charge(0, F4 * ((dgate ? 2.0 : 1.0) * N * k * width + N * width + 3.0 * N * k));
}

static void t_moe_route_backward(float *dz, const float *dgate, float dzloss, const float *z, const int32_t *idx, int N, int E, int k, float zcoef)
{
    double t0 = begin();
    inner->moe_route_backward(dz, dgate, dzloss, z, idx, N, E, k, zcoef);
    end(FAM_MOE_ROUTE, t0);
    cost_moe_route_backward(dz, dgate, dzloss, z, idx, N, E, k, zcoef);
}

static void t_moe_experts_forward(float *y, float *save, const float *x, const int32_t *idx, const float *gate, const float *w1, const float *w2, int N, int E, int k, int in, int h, int out)
{
    double t0 = begin();
    inner->moe_experts_forward(y, save, x, idx, gate, w1, w2, N, E, k, in, h, out);
    end(FAM_MOE_EXPERTS_FWD, t0);
    cost_moe_experts_forward(y, save, x, idx, gate, w1, w2, N, E, k, in, h, out);
}

static void t_moe_experts_backward(float *dx, float *dgate, float *dw1, float *dw2, const float *dy, const float *save, const float *x, const int32_t *idx, const float *gate, const float *w1, const float *w2, int N, int E, int k, int in, int h, int out)
{
    double t0 = begin();
    inner->moe_experts_backward(dx, dgate, dw1, dw2, dy, save, x, idx, gate, w1, w2, N, E, k, in, h, out);
    end(FAM_MOE_EXPERTS_BWD, t0);
    cost_moe_experts_backward(dx, dgate, dw1, dw2, dy, save, x, idx, gate, w1, w2, N, E, k, in, h, out);
}

static void t_classifier_forward(float *loss, float *lse, const float *h, const float *wte, const int32_t *targets, int N, int V, int C)
{
    double t0 = begin();
    inner->classifier_forward(loss, lse, h, wte, targets, N, V, C);
    end(FAM_HEAD_LOSS_FWD, t0);
    cost_classifier_forward(loss, lse, h, wte, targets, N, V, C);
}

static void t_classifier_backward(float *dh, float *dwte, const float *h, const float *wte, const int32_t *targets, const float *lse, float dloss_scale, int N, int V, int C)
{
    double t0 = begin();
    inner->classifier_backward(dh, dwte, h, wte, targets, lse, dloss_scale, N, V, C);
    end(FAM_HEAD_LOSS_BWD, t0);
    cost_classifier_backward(dh, dwte, h, wte, targets, lse, dloss_scale, N, V, C);
}

/* charged to the backward's family: the forward's share is one GEMM and a pass that the
 * unfused pair also pays, and the step's head time stays in one row */
static void t_classifier_forward_backward(float *loss, float *lse, float *dh, float *dwte, const float *h,
                                          const float *wte, const int32_t *targets, float dloss_scale, int N, int V,
                                          int C)
{
    double t0 = begin();
    inner->classifier_forward_backward(loss, lse, dh, dwte, h, wte, targets, dloss_scale, N, V, C);
    end(FAM_HEAD_LOSS_BWD, t0);
    timed_charge(6.0 * N * V * C, F4 * (3.0 * N * C + 3.0 * V * C + 3.0 * N));
}

static void t_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1, float beta2, float eps, float wd, int step)
{
    double t0 = begin();
    inner->adamw_update(p, g, m, v, n, lr, beta1, beta2, eps, wd, step);
    const fam_mark m0 = mark(FAM_OPTIMIZER);
    end(FAM_OPTIMIZER, t0);
    cost_adamw_update(p, g, m, v, n, lr, beta1, beta2, eps, wd, step);
    shape_since(FAM_OPTIMIZER, m0, SHAPE_ADAMW, 0, 0, 1, 1, 1);
}

static void t_muon_update(float *p, const float *g, float *buf, float *work, int rows, int cols, float lr, float mu, float wd)
{
    double t0 = begin();
    inner->muon_update(p, g, buf, work, rows, cols, lr, mu, wd);
    end(FAM_OPTIMIZER, t0);
    cost_muon_update(p, g, buf, work, rows, cols, lr, mu, wd);
}

static void t_muon_update_batch(float *const *p, const float *const *g, float *const *buf, float *work, int count, int rows, int cols, float lr, float mu, float wd)
{
    double t0 = begin();
    inner->muon_update_batch(p, g, buf, work, count, rows, cols, lr, mu, wd);
    const fam_mark m0 = mark(FAM_OPTIMIZER);
    end(FAM_OPTIMIZER, t0);
    cost_muon_update_batch(p, g, buf, work, count, rows, cols, lr, mu, wd);
    shape_since(FAM_OPTIMIZER, m0, SHAPE_MUON, 0, 0, count, rows, cols);
}

/* every op on the main lane: timing an op by synchronising the main stream needs it
 * there (the unprofiled passes keep the lanes) */
static void t_lanes_fork(int n) {}
static void t_lane(int i) {}
static void t_lanes_join(void) {}
/* every op runs (and is timed) one by one: no replay */
static void t_graph_run(const void *key, size_t key_bytes, void (*fn)(void *ctx), void *ctx) { fn(ctx); }

const backend *timed_backend(const backend *in)
{
    inner = in;
    timed = *in;
    timed.zero = t_zero;
    timed.lanes_fork = t_lanes_fork;
    timed.lane = t_lane;
    timed.lanes_join = t_lanes_join;
    timed.graph_run = t_graph_run;
    timed.copy = t_copy;
    timed.add_inplace = t_add_inplace;
    timed.scale_inplace = t_scale_inplace;
    timed.sumsq = t_sumsq;
    timed.embedding_forward = t_embedding_forward;
    timed.embedding_backward = t_embedding_backward;
    timed.matmul_forward = t_matmul_forward;
    timed.matmul_forward_add = t_matmul_forward_add;
    timed.matmul_backward = t_matmul_backward;
    timed.matmul_backward_set = t_matmul_backward_set;
    timed.matmul_forward_multi = t_matmul_forward_multi;
    timed.matmul_backward_multi = t_matmul_backward_multi;
    timed.rmsnorm_forward = t_rmsnorm_forward;
    timed.rmsnorm_backward = t_rmsnorm_backward;
    timed.layernorm_forward = t_layernorm_forward;
    timed.layernorm_backward = t_layernorm_backward;
    timed.swiglu_forward = t_swiglu_forward;
    timed.swiglu_backward = t_swiglu_backward;
    timed.swiglu_backward_set = t_swiglu_backward_set;
    timed.mlp_forward = t_mlp_forward;
    timed.mlp_backward = t_mlp_backward;
    timed.mlp_backward_set = t_mlp_backward_set;
    timed.conv_forward = t_conv_forward;
    timed.conv_backward = t_conv_backward;
    timed.conv_backward_set = t_conv_backward_set;
    timed.gates_forward = t_gates_forward;
    timed.gates_backward = t_gates_backward;
    timed.l2norm_forward = t_l2norm_forward;
    timed.l2norm_backward = t_l2norm_backward;
    timed.l2norm_backward_set = t_l2norm_backward_set;
    timed.gdn_forward = t_gdn_forward;
    timed.gdn_backward = t_gdn_backward;
    timed.gdn_backward_set = t_gdn_backward_set;
    timed.mla_prep_forward = t_mla_prep_forward;
    timed.mla_prep_backward = t_mla_prep_backward;
    timed.mla_prep_backward_set = t_mla_prep_backward_set;
    timed.attention_forward = t_attention_forward;
    timed.attention_backward = t_attention_backward;
    timed.attention_backward_set = t_attention_backward_set;
    timed.mla_attention_forward = t_mla_attention_forward;
    timed.mla_attention_backward_set = t_mla_attention_backward_set;
    timed.moe_route_forward = t_moe_route_forward;
    timed.moe_route_backward = t_moe_route_backward;
    timed.add_i32 = t_add_i32;
    timed.router_bias_update = t_router_bias_update;
    timed.rows_gather = t_rows_gather;
    timed.moe_combine_forward = t_moe_combine_forward;
    timed.moe_combine_backward = t_moe_combine_backward;
    timed.moe_experts_forward = t_moe_experts_forward;
    timed.moe_experts_backward = t_moe_experts_backward;
    timed.classifier_forward = t_classifier_forward;
    timed.classifier_backward = t_classifier_backward;
    timed.classifier_forward_backward = t_classifier_forward_backward;
    timed.adamw_update = t_adamw_update;
    timed.muon_update = t_muon_update;
    timed.muon_update_batch = t_muon_update_batch;
    timed_reset();
    return &timed;
}

family_stats *timed_stats(void) { return stats; }

const gemm_shape_stats *timed_gemm_shapes(int *count)
{
    *count = n_shapes;
    return shapes;
}

void timed_reset(void)
{
    memset(stats, 0, sizeof stats);
    n_shapes = 0;
    for (int f = 0; f < FAM_COUNT; f++) stats[f].name = family_names[f];
}
