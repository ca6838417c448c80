/* op_costs.h: the timed backend's cost model (op_costs.c), one function per op of
 * backend.h with that op's arguments, charging its FLOPs and minimum bytes through
 * timed_charge (timed_backend.c). */
#ifndef DELTAMLA_OP_COSTS_H
#define DELTAMLA_OP_COSTS_H

#include "backend.h"

#define F4 4.0 /* bytes per float */

/* add flops and bytes to the family of the op timed last */
void timed_charge(double flops, double bytes);
void cost_zero(void *p, size_t bytes);
void cost_copy(void *d, const void *s, size_t bytes);
void cost_add_inplace(float *y, const float *x, size_t n);
void cost_scale_inplace(float *x, float s, size_t n);
void cost_sumsq(const float *x, size_t n);
void cost_embedding_forward(float *o, const int32_t *t, const float *w, int N, int C);
void cost_embedding_backward(float *dw, const float *d, const int32_t *t, int N, int C);
void cost_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out);
void cost_matmul_forward_add(float *y, const float *x, const float *w, const float *r, int N, int in, int out);
void cost_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out);
void cost_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in, int out);
/* the summed outputs of the parts of a multi op */
int multi_outs(const matmul_part *p, int n);
void cost_matmul_forward_multi(const matmul_part *p, int n, int N, int in);
void cost_matmul_backward_multi(const matmul_part *p, int n, int dx_set, int N, int in);
void cost_mlp_forward(int N, int d, int h);
void cost_mlp_backward(int N, int d, int h, int dx_set);
void cost_rmsnorm_forward(float *o, float *r, const float *x, const float *w, int N, int C);
void cost_rmsnorm_backward(float *dx, float *dw, const float *d, const float *x, const float *w, const float *r, int N, int C);
void cost_layernorm_forward(float *o, float *m, float *r, const float *x, const float *w, const float *b, int N, int C);
void cost_layernorm_backward(float *dx, float *dw, float *db, const float *d, const float *x, const float *w, const float *m, const float *r, int N, int C);
void cost_swiglu_forward(float *o, const float *in, int N, int h, int s);
void cost_swiglu_backward(float *di, const float *d, const float *in, int N, int h, int s);
void cost_swiglu_backward_set(float *di, const float *d, const float *in, int N, int h, int s);
void cost_conv_forward(float *y, const float *x, const float *w, const float *b, const int32_t *ds, int B, int T, int C);
void cost_conv_backward(float *dx, float *dw, float *db, const float *dy, const float *x, const float *w, const int32_t *ds, int B, int T, int C);
void cost_gates_forward(float *g, float *b, const float *gr, const float *br, size_t n);
void cost_gates_backward(float *dg, float *db, const float *g, const float *b, const float *gr, const float *br, size_t n);
void cost_l2norm_forward(float *y, float *r, const float *x, int n, int D);
void cost_l2norm_backward(float *dx, const float *dy, const float *x, const float *r, int n, int D);
void cost_gdn_forward(float *o, float *s, const float *q, const float *k, const float *v, const float *g, const float *b, const int32_t *ds, int B, int T, int H, int D, float sc);
void cost_gdn_backward(float *dq, float *dk, float *dv, float *dg, float *db, const float *d, const float *q, const float *k, const float *v, const float *g, const float *b, const float *s, const int32_t *ds, int B, int T, int H, int D, float sc);
void cost_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv, const float *kpe, int ks, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float th);
void cost_mla_prep_backward(float *dq, float *dkv, float *dkpe, int ks, const float *dqh, const float *dkh, const float *dvh, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float th);
void cost_attention_forward(float *o, float *l, const float *q, const float *k, const float *v, const int32_t *di, int B, int T, int H, int Dk, int Dv, float sc);
void cost_attention_backward(float *dq, float *dk, float *dv, const float *d, const float *o, const float *l, const float *q, const float *k, const float *v, const int32_t *di, int B, int T, int H, int Dk, int Dv, float sc);
void cost_moe_route_forward(int32_t *i, float *g, int32_t *c, float *z, const float *zz, const float *b, int N, int E, int k, float zc);
void cost_moe_route_backward(float *dz, const float *dg, float dzl, const float *z, const int32_t *i, int N, int E, int k, float zc);
void cost_moe_experts_forward(float *y, float *s, const float *x, const int32_t *i, const float *g, const float *w1, const float *w2, int N, int E, int k, int in, int h, int out);
void cost_moe_experts_backward(float *dx, float *dg, float *dw1, float *dw2, const float *dy, const float *s, const float *x, const int32_t *i, const float *g, const float *w1, const float *w2, int N, int E, int k, int in, int h, int out);
void cost_classifier_forward(float *l, float *lse, const float *h, const float *w, const int32_t *t, int N, int V, int C);
void cost_classifier_backward(float *dh, float *dw, const float *h, const float *w, const int32_t *t, const float *lse, float s, int N, int V, int C);
void cost_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2, float eps, float wd, int step);
void cost_muon_update(float *p, const float *g, float *b, float *w, int rows, int cols, float lr, float mu, float wd);
void cost_muon_update_batch(float *const *p, const float *const *g, float *const *b, float *w, int count, int rows, int cols, float lr, float mu, float wd);

#endif
