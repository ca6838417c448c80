/* cuda_ops.h: the CUDA backend's ops, one .cu file per op family in kernels/.
 *
 * Each function has exactly the contract of the op-table member of the same name in
 * src/backend.h (shapes, accumulate-into-gradients, saved-buffer layouts), and is tested
 * against the CPU op of the same name (src/cpu/) on the GPU machine (tests/gpu/).
 * Pointers are device memory; every launch goes to the backend's stream (cuda_stream())
 * and is checked. Ops are deterministic: no floating-point atomics, so two runs on the
 * same inputs give bit-identical outputs.
 */
#ifndef DELTAMLA_CUDA_OPS_H
#define DELTAMLA_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* elementwise */
void cuda_add_inplace(float *y, const float *x, size_t n);
void cuda_scale_inplace(float *x, float s, size_t n);
double cuda_sumsq(const float *x, size_t n);

/* embedding */
void cuda_embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int C);
void cuda_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int C);

/* matmul */
void cuda_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out);
void cuda_matmul_forward_add(float *y, const float *x, const float *w, const float *r, int N, int in, int out);
void cuda_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                          int N, int in, int out);
void cuda_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in,
                              int out);

/* several Linear layers on one input (struct matmul_part: backend.h) */
struct matmul_part;
void cuda_matmul_forward_multi(const struct matmul_part *p, int n, const float *x, int N, int in);
void cuda_matmul_backward_multi(float *dx, int dx_set, const struct matmul_part *p, int n, const float *x, int N,
                                int in);

/* norms */
void cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C);
void cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                           const float *rstd, int N, int C);
void cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                            const float *b, int N, int C);
void cuda_layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                             const float *w, const float *mean, const float *rstd, int N, int C);

/* swiglu */
void cuda_swiglu_forward(float *out, const float *in, int N, int h, int silu_first);
void cuda_swiglu_backward(float *din, const float *dout, const float *in, int N, int h, int silu_first);
void cuda_swiglu_backward_set(float *din, const float *dout, const float *in, int N, int h, int silu_first);

/* the fused SwiGLU MLP (mlp.cu) */
void cuda_mlp_forward(float *out, float *gu, float *act, const float *x, const float *w_gu, const float *w_down,
                      const float *resid, int N, int d, int h, int silu_first);
void cuda_mlp_backward(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x, const float *gu,
                       const float *act, const float *w_gu, const float *w_down, float *scratch, int N, int d, int h,
                       int silu_first);
void cuda_mlp_backward_set(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                           const float *gu, const float *act, const float *w_gu, const float *w_down, float *scratch,
                           int N, int d, int h, int silu_first);

/* gated deltanet pieces */
void cuda_conv_forward(float *y, const float *x, const float *w, const float *bias,
                       const int32_t *doc_start, int B, int T, int C);
void cuda_conv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                        const float *w, const int32_t *doc_start, int B, int T, int C);
void cuda_conv_backward_set(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                            const float *w, const int32_t *doc_start, int B, int T, int C);
void cuda_gates_forward(float *g, float *beta, const float *graw, const float *braw, size_t n);
void cuda_gates_backward(float *dgraw, float *dbraw, const float *dg, const float *dbeta,
                         const float *graw, const float *braw, size_t n);
void cuda_l2norm_forward(float *y, float *rnorm, const float *x, int n, int D);
void cuda_l2norm_backward(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D);
void cuda_l2norm_backward_set(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D);
/* 1 when some GDN product runs in plain TF32 (the default build), 0 when all run in 3xTF32 */
int cuda_gdn_tf32_plain(void);
/* the GDN state kernels' warps: 0 (by the grid, the default), 4 or 8; returns the old one */
int cuda_gdn_set_state_warps(int n);
/* the GDN state kernels' value columns a block: 0 by the shape (the default), 24, 32 or
 * 48; returns the old setting */
int cuda_gdn_set_state_cols(int n);
/* the GDN's form, forward and backward: 0 by the shape (the default), 1 chained (prep and
 * state in one kernel, kernels/gdn_chain.cu) wherever the head dim allows, 2 three
 * kernels; returns the old setting */
int cuda_gdn_set_chain(int mode);
void cuda_gdn_forward(float *o, float *state_save, const float *q, const float *k, const float *v,
                      const float *g, const float *beta, const int32_t *doc_start,
                      int B, int T, int H, int D, float scale);
void cuda_gdn_backward(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                       const float *q, const float *k, const float *v, const float *g,
                       const float *beta, const float *state_save, const int32_t *doc_start,
                       int B, int T, int H, int D, float scale);
void cuda_gdn_backward_set(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                           const float *q, const float *k, const float *v, const float *g,
                           const float *beta, const float *state_save, const int32_t *doc_start,
                           int B, int T, int H, int D, float scale);

/* mla pieces */
void cuda_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv,
                           const float *kpe, int kpe_stride, const int32_t *pos,
                           int B, int T, int H, int dn, int dr, int dv, float theta);
void cuda_mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                            const float *dkh, const float *dvh, const int32_t *pos,
                            int B, int T, int H, int dn, int dr, int dv, float theta);
void cuda_mla_prep_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                const float *dkh, const float *dvh, const int32_t *pos,
                                int B, int T, int H, int dn, int dr, int dv, float theta);
void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                            const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale);
void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                             const float *lse, const float *q, const float *k, const float *v,
                             const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale);
void cuda_attention_backward_set(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                 const float *lse, const float *q, const float *k, const float *v,
                                 const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale);
void cuda_mla_attention_forward(float *out, float *lse, float *save, const float *q, const float *kv, const float *kpe,
                                int kpe_stride, const int32_t *pos, const int32_t *doc_id, int B, int T, int H, int dn,
                                int dr, int dv, float theta, float scale);
void cuda_mla_attention_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dout,
                                    const float *out, const float *lse, const float *save, float *scratch,
                                    const int32_t *pos, const int32_t *doc_id, int B, int T, int H, int dn, int dr,
                                    int dv, float theta, float scale);
/* 1: attention without document masking through cuDNN's fused kernels where the build has
 * them (the default unless DELTAMLA_ATTENTION=own); 0: deltamla's own kernels always */
void cuda_attention_use_cudnn(int on);
/* how many attention op calls cuDNN has served so far (0 in a build without it) */
int cuda_attention_cudnn_calls(void);

/* moe */
void cuda_moe_route_forward(int32_t *idx, float *gate, int32_t *counts, float *zloss_out,
                            const float *z, const float *bias, int N, int E, int k, float zcoef);
void cuda_add_i32(int32_t *y, const int32_t *x, size_t n);
void cuda_router_bias_update(float *bias, const int32_t *loads, int rows, int E, int64_t tokens, int k, float rate);
void cuda_moe_route_backward(float *dz, const float *dgate, float dzloss, const float *z,
                             const int32_t *idx, int N, int E, int k, float zcoef);
void cuda_moe_experts_forward(float *y, float *save, const float *x, const int32_t *idx,
                              const float *gate, const float *w1, const float *w2,
                              int N, int E, int k, int in, int h, int out);
void cuda_moe_experts_backward(float *dx, float *dgate, float *dw1, float *dw2, const float *dy,
                               const float *save, const float *x, const int32_t *idx,
                               const float *gate, const float *w1, const float *w2,
                               int N, int E, int k, int in, int h, int out);

/* expert-parallel dispatch and combine */
void cuda_rows_gather(float *dst, const float *src, const int32_t *rows, int n, int width);
void cuda_moe_combine_forward(float *y, const float *vals, const int32_t *pos, const float *gate,
                              int N, int k, int width);
void cuda_moe_combine_backward(float *dvals, float *dgate, const float *dy, const float *vals,
                               const int32_t *pos, const float *gate, int N, int k, int width);

/* classifier */
/* rows of one chunk of the head (logits of at most 128 Mi floats at a time), for the tests */
int cuda_classifier_chunk_rows(int N, int V);
void cuda_classifier_forward(float *loss, float *lse, const float *h, const float *wte,
                             const int32_t *targets, int N, int V, int C);
void cuda_classifier_backward(float *dh, float *dwte, const float *h, const float *wte,
                              const int32_t *targets, const float *lse, float dloss_scale,
                              int N, int V, int C);
void cuda_classifier_forward_backward(float *loss, float *lse, float *dh, float *dwte, const float *h, const float *wte,
                                      const int32_t *targets, float dloss_scale, int N, int V, int C);

/* y = r + x W^T for out <= 16 on CUDA cores (matmul_narrow.cu; matmul.cu dispatches) */
int cuda_narrow_ok(int in, int out, const float *x, const float *w);
void cuda_narrow_forward(float *y, const float *x, const float *w, const float *r, int N, int in, int out);

/* optimizers */
void cuda_grad_scale(float s);
void cuda_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                       float beta2, float eps, float wd, int step);
void cuda_muon_update(float *p, const float *g, float *buf, float *work, int rows, int cols, float lr,
                      float mu, float wd);
void cuda_muon_update_batch(float *const *p, const float *const *g, float *const *buf, float *work,
                            int count, int rows, int cols, float lr, float mu, float wd);
/* Newton-Schulz graphs launched so far (optim.cu), for the tests */
unsigned long long cuda_muon_graph_launches(void);
/* CUDA graphs on (1, the default unless DELTAMLA_CUDA_GRAPHS=0) or off (0): for the tests */
void cuda_set_graphs(int on);

#ifdef __cplusplus
}
#endif

#endif
