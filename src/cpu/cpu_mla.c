/* cpu_mla.c: the Multi-head Latent Attention pieces of the CPU backend (MODEL.md
 * section 4): assembling per-head query/key/value rows with interleaved RoPE, and causal
 * softmax attention with optional document masking.
 *
 * These are the oracle the CUDA kernels are tested against, so attention is the plain
 * O(T^2) form per (batch, head): the scores of one query row, their log-sum-exp, the
 * weighted sum of values. Scalar sums and the softmax run in double whatever `real` is,
 * which keeps the float build close to exact at no cost that matters here.
 *
 * Determinism: prep runs one token per task; attention runs one (batch, head) pair per
 * task with sequential loops inside, so every output element is one thread's sum in a
 * fixed order and results do not depend on the thread count.
 */
#include "cpu_ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Scratch that ends the program on failure: the ops have no error channel, and running
 * on with a NULL buffer would only crash later with less information. */
static double *mla_scratch(size_t n, const char *who)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "deltamla: error: %s: out of memory for %zu doubles\n", who, n);
        exit(1);
    }
    return p;
}

/* RoPE position of token i of a [B, T] batch: its index within its row unless the
 * caller passes explicit positions (document masking restarts them per document). */
static double rope_position(const int32_t *pos, int i, int T)
{
    return pos ? (double)pos[i] : (double)(i % T);
}

/* The angle of pair j of a length-dr vector at position p. Computed in double so that
 * long positions keep their phase in the float build too. */
static double rope_angle(double p, int j, int dr, double theta)
{
    return p * pow(theta, -2.0 * j / dr);
}

/* qh, kh [N, H, dn+dr], vh [N, H, dv] from q [N, H*(dn+dr)], kv [N, H*(dn+dv)] and the
 * shared kpe rows (row i at kpe + i*kpe_stride, dr long); dr even. Overwrites all three
 * outputs; pos NULL or int32 [N]. */
void cpu_mla_prep_forward(real *qh, real *kh, real *vh, const real *q, const real *kv,
                          const real *kpe, int kpe_stride, const int32_t *pos,
                          int B, int T, int H, int dn, int dr, int dv, real theta)
{
    const int N = B * T, dk = dn + dr, dkv = dn + dv;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const double p = rope_position(pos, i, T);
        const real *qi = q + (size_t)i * H * dk;
        const real *kvi = kv + (size_t)i * H * dkv;
        const real *kpi = kpe + (size_t)i * kpe_stride;
        real *qhi = qh + (size_t)i * H * dk;
        real *khi = kh + (size_t)i * H * dk;
        real *vhi = vh + (size_t)i * H * dv;
        for (int h = 0; h < H; h++) {
            for (int c = 0; c < dn; c++) {
                qhi[h * dk + c] = qi[h * dk + c];
                khi[h * dk + c] = kvi[h * dkv + c];
            }
            for (int c = 0; c < dv; c++) vhi[h * dv + c] = kvi[h * dkv + dn + c];
        }
        for (int j = 0; j < dr / 2; j++) {
            const double ang = rope_angle(p, j, dr, (double)theta);
            const double cs = cos(ang), sn = sin(ang);
            const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
            const real rk0 = (real)(k0 * cs - k1 * sn), rk1 = (real)(k1 * cs + k0 * sn);
            for (int h = 0; h < H; h++) {
                const real *xq = qi + h * dk + dn + 2 * j;
                const double x0 = xq[0], x1 = xq[1];
                real *yq = qhi + h * dk + dn + 2 * j;
                yq[0] = (real)(x0 * cs - x1 * sn);
                yq[1] = (real)(x1 * cs + x0 * sn);
                khi[h * dk + dn + 2 * j] = rk0;
                khi[h * dk + dn + 2 * j + 1] = rk1;
            }
        }
    }
}

/* The adjoint of cpu_mla_prep_forward: dq [N, H*(dn+dr)], dkv [N, H*(dn+dv)] and dkpe
 * (row i at dkpe + i*kpe_stride, dr long) accumulate the gradients of dqh, dkh
 * [N, H, dn+dr] and dvh [N, H, dv]. RoPE is a rotation, so its adjoint rotates back by
 * the same angle; dkpe receives the sum over heads since one k_pe feeds every head. */
void cpu_mla_prep_backward(real *dq, real *dkv, real *dkpe, int kpe_stride, const real *dqh,
                           const real *dkh, const real *dvh, const int32_t *pos,
                           int B, int T, int H, int dn, int dr, int dv, real theta)
{
    const int N = B * T, dk = dn + dr, dkv_w = dn + dv;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const double p = rope_position(pos, i, T);
        real *dqi = dq + (size_t)i * H * dk;
        real *dkvi = dkv + (size_t)i * H * dkv_w;
        real *dkpi = dkpe + (size_t)i * kpe_stride;
        const real *gq = dqh + (size_t)i * H * dk;
        const real *gk = dkh + (size_t)i * H * dk;
        const real *gv = dvh + (size_t)i * H * dv;
        for (int h = 0; h < H; h++) {
            for (int c = 0; c < dn; c++) {
                dqi[h * dk + c] += gq[h * dk + c];
                dkvi[h * dkv_w + c] += gk[h * dk + c];
            }
            for (int c = 0; c < dv; c++) dkvi[h * dkv_w + dn + c] += gv[h * dv + c];
        }
        for (int j = 0; j < dr / 2; j++) {
            const double ang = rope_angle(p, j, dr, (double)theta);
            const double cs = cos(ang), sn = sin(ang);
            double s0 = 0, s1 = 0;
            for (int h = 0; h < H; h++) {
                const double y0 = gq[h * dk + dn + 2 * j], y1 = gq[h * dk + dn + 2 * j + 1];
                dqi[h * dk + dn + 2 * j] += (real)(y0 * cs + y1 * sn);
                dqi[h * dk + dn + 2 * j + 1] += (real)(y1 * cs - y0 * sn);
                s0 += gk[h * dk + dn + 2 * j];
                s1 += gk[h * dk + dn + 2 * j + 1];
            }
            dkpi[2 * j] += (real)(s0 * cs + s1 * sn);
            dkpi[2 * j + 1] += (real)(s1 * cs - s0 * sn);
        }
    }
}

/* Whether query t may see key s of batch row b (s <= t is the caller's loop bound). */
static int same_doc(const int32_t *doc_id, int b, int T, int t, int s)
{
    return !doc_id || doc_id[(size_t)b * T + s] == doc_id[(size_t)b * T + t];
}

static double dot_rr(const real *a, const real *b, int n)
{
    double s = 0;
    for (int c = 0; c < n; c++) s += (double)a[c] * b[c];
    return s;
}

/* out [B,T,H,Dv] = softmax_s(scale q_t . k_s) v_s over the visible keys, q,k [B,T,H,Dk],
 * v [B,T,H,Dv]; lse [B,H,T] gets each row's log-sum-exp of the scaled scores. The
 * diagonal is always visible, so no row is empty. Scratch: T + Dv doubles per thread. */
void cpu_attention_forward(real *out, real *lse, const real *q, const real *k, const real *v,
                           const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, real scale)
{
    const size_t ts = (size_t)H * Dk, tv = (size_t)H * Dv; /* token strides */
#pragma omp parallel
    {
        double *score = mla_scratch((size_t)T, "cpu_attention_forward");
        double *acc = mla_scratch((size_t)Dv, "cpu_attention_forward");
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H;
            const real *qb = q + (size_t)b * T * ts + (size_t)h * Dk;
            const real *kb = k + (size_t)b * T * ts + (size_t)h * Dk;
            const real *vb = v + (size_t)b * T * tv + (size_t)h * Dv;
            real *ob = out + (size_t)b * T * tv + (size_t)h * Dv;
            real *lb = lse + (size_t)bh * T;
            for (int t = 0; t < T; t++) {
                const real *qt = qb + t * ts;
                double mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    if (!same_doc(doc_id, b, T, t, s)) continue;
                    score[s] = (double)scale * dot_rr(qt, kb + s * ts, Dk);
                    if (score[s] > mx) mx = score[s];
                }
                double sum = 0;
                for (int c = 0; c < Dv; c++) acc[c] = 0;
                for (int s = 0; s <= t; s++) {
                    if (!same_doc(doc_id, b, T, t, s)) continue;
                    const double e = exp(score[s] - mx);
                    const real *vs = vb + s * tv;
                    sum += e;
                    for (int c = 0; c < Dv; c++) acc[c] += e * vs[c];
                }
                lb[t] = (real)(mx + log(sum));
                for (int c = 0; c < Dv; c++) ob[t * tv + c] = (real)(acc[c] / sum);
            }
        }
        free(score);
        free(acc);
    }
}

/* Accumulates dq, dk [B,T,H,Dk] and dv [B,T,H,Dv] for the forward above, given dout
 * [B,T,H,Dv] and the forward's out and lse. With P_ts = exp(scale q_t.k_s - lse_t) and
 * D_t = dout_t . out_t: dS_ts = P_ts (dout_t . v_s - D_t), dq_t = scale sum_s dS_ts k_s,
 * dk_s = scale sum_t dS_ts q_t, dv_s = sum_t P_ts dout_t. Each (b, h) is one task whose
 * key gradients collect in per-thread scratch (T*(Dk+Dv) + Dk doubles) in query order
 * and are added to dk, dv once at the end. */
void cpu_attention_backward(real *dq, real *dk, real *dv, const real *dout, const real *out,
                            const real *lse, const real *q, const real *k, const real *v,
                            const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, real scale)
{
    const size_t ts = (size_t)H * Dk, tv = (size_t)H * Dv;
#pragma omp parallel
    {
        double *dqa = mla_scratch((size_t)Dk, "cpu_attention_backward");
        double *dka = mla_scratch((size_t)T * Dk, "cpu_attention_backward");
        double *dva = mla_scratch((size_t)T * Dv, "cpu_attention_backward");
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H;
            const size_t qoff = (size_t)b * T * ts + (size_t)h * Dk;
            const size_t voff = (size_t)b * T * tv + (size_t)h * Dv;
            const real *lb = lse + (size_t)bh * T;
            for (size_t c = 0; c < (size_t)T * Dk; c++) dka[c] = 0;
            for (size_t c = 0; c < (size_t)T * Dv; c++) dva[c] = 0;
            for (int t = 0; t < T; t++) {
                const real *qt = q + qoff + t * ts;
                const real *dot = dout + voff + t * tv;
                const double dt = dot_rr(dot, out + voff + t * tv, Dv);
                for (int c = 0; c < Dk; c++) dqa[c] = 0;
                for (int s = 0; s <= t; s++) {
                    if (!same_doc(doc_id, b, T, t, s)) continue;
                    const real *ks = k + qoff + s * ts;
                    const double pr = exp((double)scale * dot_rr(qt, ks, Dk) - (double)lb[t]);
                    const double ds = pr * (dot_rr(dot, v + voff + s * tv, Dv) - dt);
                    for (int c = 0; c < Dk; c++) {
                        dqa[c] += ds * ks[c];
                        dka[(size_t)s * Dk + c] += ds * qt[c];
                    }
                    for (int c = 0; c < Dv; c++) dva[(size_t)s * Dv + c] += pr * dot[c];
                }
                real *dqt = dq + qoff + t * ts;
                for (int c = 0; c < Dk; c++) dqt[c] += (real)((double)scale * dqa[c]);
            }
            for (int s = 0; s < T; s++) {
                real *dks = dk + qoff + s * ts;
                real *dvs = dv + voff + s * tv;
                for (int c = 0; c < Dk; c++) dks[c] += (real)((double)scale * dka[(size_t)s * Dk + c]);
                for (int c = 0; c < Dv; c++) dvs[c] += (real)dva[(size_t)s * Dv + c];
            }
        }
        free(dqa);
        free(dka);
        free(dva);
    }
}
