/* cpu_ops.h: the CPU backend's ops, plain C + OpenMP.
 *
 * These are the oracle for every other backend, so they favour obvious correctness over
 * speed. Each function has exactly the contract of the op-table member of the same name
 * in src/backend.h (shapes, accumulate-into-gradients, saved buffers), with `real` in
 * place of float: the backend is built with real = float, and the gradient tests build
 * the same sources a second time with -DCPU_REAL_DOUBLE so that finite differences run
 * in double precision.
 *
 * Determinism: every output element is computed by one thread summing in a fixed order,
 * so results do not depend on scheduling (runs with the same thread count are
 * bit-identical).
 */
#ifndef DELTAMLA_CPU_OPS_H
#define DELTAMLA_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef CPU_REAL_DOUBLE
typedef double real;
#else
typedef float real;
#endif

/* elementwise */
void cpu_add_inplace(real *y, const real *x, size_t n);
void cpu_scale_inplace(real *x, real s, size_t n);
double cpu_sumsq(const real *x, size_t n);

/* embedding */
void cpu_embedding_forward(real *out, const int32_t *tokens, const real *wte, int N, int C);
void cpu_embedding_backward(real *dwte, const real *dout, const int32_t *tokens, int N, int C);

/* matmul */
void cpu_matmul_forward(real *y, const real *x, const real *w, int N, int in, int out);
void cpu_matmul_forward_add(real *y, const real *x, const real *w, const real *r, int N, int in, int out);
void cpu_matmul_backward(real *dx, real *dw, const real *dy, const real *x, const real *w,
                         int N, int in, int out);

/* norms */
void cpu_rmsnorm_forward(real *out, real *rstd, const real *x, const real *w, int N, int C);
void cpu_rmsnorm_backward(real *dx, real *dw, const real *dout, const real *x, const real *w,
                          const real *rstd, int N, int C);
void cpu_layernorm_forward(real *out, real *mean, real *rstd, const real *x, const real *w,
                           const real *b, int N, int C);
void cpu_layernorm_backward(real *dx, real *dw, real *db, const real *dout, const real *x,
                            const real *w, const real *mean, const real *rstd, int N, int C);

/* swiglu */
void cpu_swiglu_forward(real *out, const real *in, int N, int h, int silu_first);
void cpu_swiglu_backward(real *din, const real *dout, const real *in, int N, int h, int silu_first);

/* SwiGLU MLP: the matmul and swiglu ops above in the model's order (cpu_mlp.c) */
void cpu_mlp_forward(real *out, real *gu, real *act, const real *x, const real *w_gu, const real *w_down,
                     const real *resid, int N, int d, int h, int silu_first);
void cpu_mlp_backward(real *dx, real *dw_gu, real *dw_down, const real *dout, const real *x, const real *gu,
                      const real *act, const real *w_gu, const real *w_down, real *scratch, int N, int d, int h,
                      int silu_first);
void cpu_mlp_backward_set(real *dx, real *dw_gu, real *dw_down, const real *dout, const real *x, const real *gu,
                          const real *act, const real *w_gu, const real *w_down, real *scratch, int N, int d, int h,
                          int silu_first);

/* gated deltanet pieces */
void cpu_conv_forward(real *y, const real *x, const real *w, const real *bias,
                      const int32_t *doc_start, int B, int T, int C);
void cpu_conv_backward(real *dx, real *dw, real *dbias, const real *dy, const real *x,
                       const real *w, const int32_t *doc_start, int B, int T, int C);
void cpu_gates_forward(real *g, real *beta, const real *graw, const real *braw, size_t n);
void cpu_gates_backward(real *dgraw, real *dbraw, const real *dg, const real *dbeta,
                        const real *graw, const real *braw, size_t n);
void cpu_l2norm_forward(real *y, real *rnorm, const real *x, int n, int D);
void cpu_l2norm_backward(real *dx, const real *dy, const real *x, const real *rnorm, int n, int D);
void cpu_gdn_forward(real *o, real *state_save, const real *q, const real *k, const real *v,
                     const real *g, const real *beta, const int32_t *doc_start,
                     int B, int T, int H, int D, real scale);
void cpu_gdn_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta, const real *dout,
                      const real *q, const real *k, const real *v, const real *g,
                      const real *beta, const real *state_save, const int32_t *doc_start,
                      int B, int T, int H, int D, real scale);
/* The token-by-token loop of MODEL.md section 3 and its exact adjoint: the reference
 * that the chunked form above is tested against (tests only; the backward stores the
 * state entering every token, (T+1)*D*D reals per thread, allocated inside). */
void cpu_gdn_recurrent_forward(real *o, const real *q, const real *k, const real *v,
                               const real *g, const real *beta, const int32_t *doc_start,
                               int B, int T, int H, int D, real scale);
void cpu_gdn_recurrent_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta,
                                const real *dout, const real *q, const real *k, const real *v,
                                const real *g, const real *beta, const int32_t *doc_start,
                                int B, int T, int H, int D, real scale);

/* mla pieces */
void cpu_mla_prep_forward(real *qh, real *kh, real *vh, const real *q, const real *kv,
                          const real *kpe, int kpe_stride, const int32_t *pos,
                          int B, int T, int H, int dn, int dr, int dv, real theta);
void cpu_mla_prep_backward(real *dq, real *dkv, real *dkpe, int kpe_stride, const real *dqh,
                           const real *dkh, const real *dvh, const int32_t *pos,
                           int B, int T, int H, int dn, int dr, int dv, real theta);
void cpu_attention_forward(real *out, real *lse, const real *q, const real *k, const real *v,
                           const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, real scale);
void cpu_attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *out,
                            const real *lse, const real *q, const real *k, const real *v,
                            const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, real scale);

/* moe */
void cpu_moe_route_forward(int32_t *idx, real *gate, int32_t *counts, real *zloss_out,
                           const real *z, const real *bias, int N, int E, int k, real zcoef);
void cpu_add_i32(int32_t *y, const int32_t *x, size_t n);
void cpu_router_bias_update(real *bias, const int32_t *loads, int rows, int E, int64_t tokens, int k, real rate);
void cpu_moe_route_backward(real *dz, const real *dgate, real dzloss, const real *z,
                            const int32_t *idx, int N, int E, int k, real zcoef);
void cpu_moe_experts_forward(real *y, real *save, const real *x, const int32_t *idx,
                             const real *gate, const real *w1, const real *w2,
                             int N, int E, int k, int in, int h, int out);
void cpu_moe_experts_backward(real *dx, real *dgate, real *dw1, real *dw2, const real *dy,
                              const real *save, const real *x, const int32_t *idx,
                              const real *gate, const real *w1, const real *w2,
                              int N, int E, int k, int in, int h, int out);

/* expert-parallel dispatch and combine */
void cpu_rows_gather(real *dst, const real *src, const int32_t *rows, int n, int width);
void cpu_moe_combine_forward(real *y, const real *vals, const int32_t *pos, const real *gate,
                             int N, int k, int width);
void cpu_moe_combine_backward(real *dvals, real *dgate, const real *dy, const real *vals,
                              const int32_t *pos, const real *gate, int N, int k, int width);

/* classifier */
void cpu_classifier_forward(real *loss, real *lse, const real *h, const real *wte,
                            const int32_t *targets, int N, int V, int C);
void cpu_classifier_backward(real *dh, real *dwte, const real *h, const real *wte,
                             const int32_t *targets, const real *lse, real dloss_scale,
                             int N, int V, int C);

/* optimizers; cpu_grad_scale: backend.h's grad_scale */
void cpu_grad_scale(real s);
void cpu_adamw_update(real *p, const real *g, real *m, real *v, size_t n, real lr, real beta1,
                      real beta2, real eps, real wd, int step);
void cpu_muon_update(real *p, const real *g, real *buf, real *work, int rows, int cols, real lr,
                     real mu, real wd);
void cpu_muon_update_batch(real *const *p, const real *const *g, real *const *buf, real *work, int count,
                           int rows, int cols, real lr, real mu, real wd);

#endif
