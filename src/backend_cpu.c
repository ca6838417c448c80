/* backend_cpu.c: the CPU backend's op table. The ops themselves live in src/cpu/ (one
 * file per op family, built with real = float here); this file adds host memory
 * management and fills the table. */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_ops.h"
#include "util.h"

_Static_assert(sizeof(real) == sizeof(float), "the CPU backend is built with real = float");

/* each allocation carries its size in a 64-byte header, for the peak-memory figure */
static size_t held, peak;

static void *cpu_alloc(size_t bytes)
{
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, rounded + 64) != 0)
        die("out of host memory allocating %zu bytes for the CPU backend", bytes);
    memset(p, 0, rounded + 64);
    *(size_t *)p = rounded;
    held += rounded;
    if (held > peak) peak = held;
    return (char *)p + 64;
}

static void cpu_free(void *p)
{
    if (!p) return;
    char *base = (char *)p - 64;
    held -= *(size_t *)base;
    free(base);
}

static size_t cpu_mem_peak(void) { return peak; }
static void *cpu_host_alloc(size_t bytes) { return xmalloc(bytes); }
static void cpu_host_free(void *p) { free(p); }
static void cpu_zero(void *p, size_t bytes) { memset(p, 0, bytes); }
static void cpu_copy(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }
static void cpu_sync(void) {}

/* one queue: lanes only check that they are used as backend.h says */
static int cpu_open_lanes = 1;
static void cpu_lanes_fork(int n)
{
    fatal_check(n >= 1 && n <= BACKEND_LANES && cpu_open_lanes == 1);
    cpu_open_lanes = n;
}
static void cpu_lane(int i) { fatal_check(i >= 0 && i < cpu_open_lanes); }
static void cpu_lanes_join(void) { cpu_open_lanes = 1; }

/* the _set forms: the accumulating op on a zeroed output */
static void cpu_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w, int N,
                                    int in, int out)
{
    if (dx) memset(dx, 0, (size_t)N * in * sizeof *dx);
    cpu_matmul_backward(dx, dw, dy, x, w, N, in, out);
}

/* the multi forms: the single ops part by part, in order */
static void cpu_matmul_forward_multi(const matmul_part *p, int n, const float *x, int N, int in)
{
    fatal_check(n >= 1 && n <= MATMUL_PARTS_MAX);
    for (int i = 0; i < n; i++) cpu_matmul_forward(p[i].y, x, p[i].w, N, in, p[i].out);
}

static void cpu_matmul_backward_multi(float *dx, int dx_set, const matmul_part *p, int n, const float *x, int N,
                                      int in)
{
    fatal_check(n >= 1 && n <= MATMUL_PARTS_MAX);
    for (int i = 0; i < n; i++) {
        if (i == 0 && dx_set) cpu_matmul_backward_set(dx, p[i].dw, p[i].dy, x, p[i].w, N, in, p[i].out);
        else cpu_matmul_backward(dx, p[i].dw, p[i].dy, x, p[i].w, N, in, p[i].out);
    }
}

static void cpu_classifier_forward_backward(float *loss, float *lse, float *dh, float *dwte, const float *h,
                                            const float *wte, const int32_t *targets, float dloss_scale, int N, int V,
                                            int C)
{
    cpu_classifier_forward(loss, lse, h, wte, targets, N, V, C);
    cpu_classifier_backward(dh, dwte, h, wte, targets, lse, dloss_scale, N, V, C);
}

static void cpu_swiglu_backward_set(float *din, const float *dout, const float *in, int N, int h, int silu_first)
{
    memset(din, 0, (size_t)N * 2 * h * sizeof *din);
    cpu_swiglu_backward(din, dout, in, N, h, silu_first);
}

static void cpu_conv_backward_set(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w,
                                  const int32_t *doc_start, int B, int T, int C)
{
    memset(dx, 0, (size_t)B * T * C * sizeof *dx);
    cpu_conv_backward(dx, dw, dbias, dy, x, w, doc_start, B, T, C);
}

static void cpu_l2norm_backward_set(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D)
{
    memset(dx, 0, (size_t)n * D * sizeof *dx);
    cpu_l2norm_backward(dx, dy, x, rnorm, n, D);
}

static void cpu_mla_prep_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                      const float *dkh, const float *dvh, const int32_t *pos, int B, int T, int H,
                                      int dn, int dr, int dv, float theta)
{
    const size_t rows = (size_t)B * T;
    memset(dq, 0, rows * H * (dn + dr) * sizeof *dq);
    memset(dkv, 0, rows * H * (dn + dv) * sizeof *dkv);
    for (size_t i = 0; i < rows; i++) memset(dkpe + i * kpe_stride, 0, (size_t)dr * sizeof *dkpe);
    cpu_mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta);
}

static void cpu_gdn_backward_set(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                                 const float *q, const float *k, const float *v, const float *g, const float *beta,
                                 const float *state_save, const int32_t *doc_start, int B, int T, int H, int D,
                                 float scale)
{
    const size_t nv = (size_t)B * T * H * D, ns = (size_t)B * T * H;
    memset(dq, 0, nv * sizeof *dq);
    memset(dk, 0, nv * sizeof *dk);
    memset(dv, 0, nv * sizeof *dv);
    memset(dg, 0, ns * sizeof *dg);
    memset(dbeta, 0, ns * sizeof *dbeta);
    cpu_gdn_backward(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale);
}

static void cpu_attention_backward_set(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                       const float *lse, const float *q, const float *k, const float *v,
                                       const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    memset(dq, 0, (size_t)B * T * H * Dk * sizeof *dq);
    memset(dk, 0, (size_t)B * T * H * Dk * sizeof *dk);
    memset(dv, 0, (size_t)B * T * H * Dv * sizeof *dv);
    cpu_attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale);
}

/* nothing to replay: every call runs the ops */
static void cpu_graph_run(const void *key, size_t key_bytes, void (*fn)(void *ctx), void *ctx)
{
    (void)key, (void)key_bytes;
    fn(ctx);
}

size_t mla_attention_save_floats(int N, int H, int dn, int dr, int dv)
{
    return (size_t)N * H * (2 * (size_t)(dn + dr) + (size_t)dv) + 256;
}

/* the fused MLA attention (backend.h): save and scratch hold qh, kh, vh (and their
 * gradients) in fp32, one after the other */
static void cpu_mla_attention_forward(float *out, float *lse, float *save, const float *q, const float *kv,
                                      const float *kpe, int kpe_stride, const int32_t *pos, const int32_t *doc_id,
                                      int B, int T, int H, int dn, int dr, int dv, float theta, float scale)
{
    const size_t nk = (size_t)B * T * H * (dn + dr);
    float *qh = save, *kh = save + nk, *vh = save + 2 * nk;
    cpu_mla_prep_forward(qh, kh, vh, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
    cpu_attention_forward(out, lse, qh, kh, vh, doc_id, B, T, H, dn + dr, dv, scale);
}

static void cpu_mla_attention_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dout,
                                           const float *out, const float *lse, const float *save, float *scratch,
                                           const int32_t *pos, const int32_t *doc_id, int B, int T, int H, int dn,
                                           int dr, int dv, float theta, float scale)
{
    const size_t nk = (size_t)B * T * H * (dn + dr);
    const float *qh = save, *kh = save + nk, *vh = save + 2 * nk;
    float *dqh = scratch, *dkh = scratch + nk, *dvh = scratch + 2 * nk;
    cpu_attention_backward_set(dqh, dkh, dvh, dout, out, lse, qh, kh, vh, doc_id, B, T, H, dn + dr, dv, scale);
    cpu_mla_prep_backward_set(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta);
}

static const backend cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .zero = cpu_zero,
    .to_host = cpu_copy,
    .from_host = cpu_copy,
    .copy = cpu_copy,
    .sync = cpu_sync,
    .lanes_fork = cpu_lanes_fork,
    .lane = cpu_lane,
    .lanes_join = cpu_lanes_join,
    .mem_peak = cpu_mem_peak,
    .graph_run = cpu_graph_run,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .add_inplace = cpu_add_inplace,
    .scale_inplace = cpu_scale_inplace,
    .sumsq = cpu_sumsq,
    .embedding_forward = cpu_embedding_forward,
    .embedding_backward = cpu_embedding_backward,
    .matmul_forward = cpu_matmul_forward,
    .matmul_forward_add = cpu_matmul_forward_add,
    .matmul_backward = cpu_matmul_backward,
    .matmul_backward_set = cpu_matmul_backward_set,
    .matmul_forward_multi = cpu_matmul_forward_multi,
    .matmul_backward_multi = cpu_matmul_backward_multi,
    .rmsnorm_forward = cpu_rmsnorm_forward,
    .rmsnorm_backward = cpu_rmsnorm_backward,
    .layernorm_forward = cpu_layernorm_forward,
    .layernorm_backward = cpu_layernorm_backward,
    .swiglu_forward = cpu_swiglu_forward,
    .swiglu_backward = cpu_swiglu_backward,
    .swiglu_backward_set = cpu_swiglu_backward_set,
    .mlp_forward = cpu_mlp_forward,
    .mlp_backward = cpu_mlp_backward,
    .mlp_backward_set = cpu_mlp_backward_set,
    .conv_forward = cpu_conv_forward,
    .conv_backward = cpu_conv_backward,
    .conv_backward_set = cpu_conv_backward_set,
    .gates_forward = cpu_gates_forward,
    .gates_backward = cpu_gates_backward,
    .l2norm_forward = cpu_l2norm_forward,
    .l2norm_backward = cpu_l2norm_backward,
    .l2norm_backward_set = cpu_l2norm_backward_set,
    .gdn_forward = cpu_gdn_forward,
    .gdn_backward = cpu_gdn_backward,
    .gdn_backward_set = cpu_gdn_backward_set,
    .mla_prep_forward = cpu_mla_prep_forward,
    .mla_prep_backward = cpu_mla_prep_backward,
    .mla_prep_backward_set = cpu_mla_prep_backward_set,
    .attention_forward = cpu_attention_forward,
    .attention_backward = cpu_attention_backward,
    .attention_backward_set = cpu_attention_backward_set,
    .mla_attention_forward = cpu_mla_attention_forward,
    .mla_attention_backward_set = cpu_mla_attention_backward_set,
    .moe_route_forward = cpu_moe_route_forward,
    .moe_route_backward = cpu_moe_route_backward,
    .add_i32 = cpu_add_i32,
    .router_bias_update = cpu_router_bias_update,
    .moe_experts_forward = cpu_moe_experts_forward,
    .moe_experts_backward = cpu_moe_experts_backward,
    .rows_gather = cpu_rows_gather,
    .moe_combine_forward = cpu_moe_combine_forward,
    .moe_combine_backward = cpu_moe_combine_backward,
    .classifier_forward = cpu_classifier_forward,
    .classifier_backward = cpu_classifier_backward,
    .classifier_forward_backward = cpu_classifier_forward_backward,
    .grad_scale = cpu_grad_scale,
    .adamw_update = cpu_adamw_update,
    .muon_update = cpu_muon_update,
    .muon_update_batch = cpu_muon_update_batch,
};

const backend *backend_cpu(void) { return &cpu_backend; }
