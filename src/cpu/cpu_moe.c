/* cpu_moe.c: the mixture-of-experts ops of the CPU backend (MODEL.md section 5): the
 * sigmoid router with bias-adjusted top-k selection and z-loss, and the routed SwiGLU
 * experts.
 *
 * Routing is dropless, so the experts op simply visits every (token, slot) pair. The
 * forward and the input-side gradients (dx, dgate) run one token per task. The weight
 * gradients sum over the tokens of each expert, so the backward builds per-expert lists
 * of (token, slot) pairs in token order and runs one expert per task; every gradient
 * element is then one thread's sum in a fixed order, whatever the thread count. The
 * expert-side pass recomputes the small per-pair vectors (w2 dy, the SwiGLU adjoint)
 * rather than storing N*k*2h of them.
 *
 * Dot products and the softmax-like sums run in double whatever `real` is.
 */
#include "cpu_ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GATE_EPS 1e-9

/* Scratch that ends the program on failure: the ops have no error channel. */
static void *moe_scratch(size_t bytes, const char *who)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "deltamla: error: %s: out of memory for %zu bytes\n", who, bytes);
        exit(1);
    }
    return p;
}

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

/* log(sum_e exp(z[e])) of one row of E logits */
static double row_logsumexp(const real *z, int E)
{
    double mx = -INFINITY;
    for (int e = 0; e < E; e++)
        if (z[e] > mx) mx = z[e];
    double s = 0;
    for (int e = 0; e < E; e++) s += exp(z[e] - mx);
    return mx + log(s);
}

/* idx [N,k] (descending aff+bias, ties to the lower expert), gate [N,k], counts [E]
 * (overwritten) and zloss_out[0] from router logits z [N,E] and the selection bias [E];
 * 1 <= k <= E. Scratch: N doubles for the per-token log-sum-exp, summed in token order. */
void cpu_moe_route_forward(int32_t *idx, real *gate, int32_t *counts, real *zloss_out,
                           const real *z, const real *bias, int N, int E, int k, real zcoef)
{
    double *lse = moe_scratch((size_t)N * sizeof *lse, "cpu_moe_route_forward");
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const real *zi = z + (size_t)i * E;
        int32_t *ii = idx + (size_t)i * k;
        /* k passes of arg-max over the unchosen experts; the strict '>' keeps the lower
         * index on ties, and pass j yields the j-th largest score */
        for (int j = 0; j < k; j++) {
            int best = -1;
            double best_score = 0;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int l = 0; l < j; l++) taken |= ii[l] == e;
                if (taken) continue;
                double score = sigmoid(zi[e]) + (double)bias[e];
                if (best < 0 || score > best_score) {
                    best = e;
                    best_score = score;
                }
            }
            ii[j] = best;
        }
        double sum = 0;
        for (int j = 0; j < k; j++) sum += sigmoid(zi[ii[j]]);
        for (int j = 0; j < k; j++) gate[(size_t)i * k + j] = (real)(sigmoid(zi[ii[j]]) / (sum + GATE_EPS));
        lse[i] = row_logsumexp(zi, E);
    }
    memset(counts, 0, (size_t)E * sizeof *counts);
    double zsum = 0;
    for (int i = 0; i < N; i++) {
        for (int j = 0; j < k; j++) counts[idx[(size_t)i * k + j]]++;
        zsum += lse[i] * lse[i];
    }
    zloss_out[0] = (real)((double)zcoef * zsum / N);
    free(lse);
}

/* dz [N,E] += the gradient of sum(gate * dgate) + dzloss * zloss with respect to z,
 * through the sigmoid and the gate normalisation (the bias only picked idx [N,k]).
 * With a = sigmoid(z), S = sum of the selected a:
 *   d/da_l = dgate_l / (S+eps) - (sum_j dgate_j a_j) / (S+eps)^2,  da/dz = a (1-a);
 *   d zloss / dz_ie = zcoef * 2 lse_i softmax(z_i)_e / N. */
void cpu_moe_route_backward(real *dz, const real *dgate, real dzloss, const real *z,
                            const int32_t *idx, int N, int E, int k, real zcoef)
{
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const real *zi = z + (size_t)i * E;
        const int32_t *ii = idx + (size_t)i * k;
        const real *gi = dgate + (size_t)i * k;
        real *dzi = dz + (size_t)i * E;
        const double lse = row_logsumexp(zi, E);
        const double zc = (double)dzloss * (double)zcoef * 2.0 * lse / N;
        for (int e = 0; e < E; e++) dzi[e] += (real)(zc * exp(zi[e] - lse));
        double sum = 0, wsum = 0;
        for (int j = 0; j < k; j++) {
            const double a = sigmoid(zi[ii[j]]);
            sum += a;
            wsum += (double)gi[j] * a;
        }
        const double inv = 1.0 / (sum + GATE_EPS);
        for (int j = 0; j < k; j++) {
            const double a = sigmoid(zi[ii[j]]);
            const double da = (double)gi[j] * inv - wsum * inv * inv;
            dzi[ii[j]] += (real)(da * a * (1.0 - a));
        }
    }
}

/* y [N,out] = sum_j gate[i,j] expert_idx[i,j](x_i) for x [N,in], idx/gate [N,k],
 * w1 [E,in,2h], w2 [E,h,out]. save [N*k*3h]: per (i,j) the pre-activation [g | u] (2h)
 * then silu(g)*u (h), as stored (rounded to real), which is what the backward and the
 * w2 product both use. Scratch: 2h + 2*out doubles per thread. */
void cpu_moe_experts_forward(real *y, real *save, const real *x, const int32_t *idx,
                             const real *gate, const real *w1, const real *w2,
                             int N, int E, int k, int in, int h, int out)
{
    const int h2 = 2 * h;
#pragma omp parallel
    {
        double *pre = moe_scratch((size_t)(h2 + 2 * out) * sizeof *pre, "cpu_moe_experts_forward");
        double *o = pre + h2, *yacc = o + out;
#pragma omp for schedule(static)
        for (int i = 0; i < N; i++) {
            const real *xi = x + (size_t)i * in;
            for (int c = 0; c < out; c++) yacc[c] = 0;
            for (int j = 0; j < k; j++) {
                const int e = idx[(size_t)i * k + j];
                const real *W1 = w1 + (size_t)e * in * h2;
                const real *W2 = w2 + (size_t)e * h * out;
                real *sv = save + ((size_t)i * k + j) * 3 * h;
                for (int c = 0; c < h2; c++) pre[c] = 0;
                for (int r = 0; r < in; r++) {
                    const double xr = xi[r];
                    const real *row = W1 + (size_t)r * h2;
                    for (int c = 0; c < h2; c++) pre[c] += xr * row[c];
                }
                for (int c = 0; c < h2; c++) sv[c] = (real)pre[c];
                for (int m = 0; m < h; m++) {
                    const double g = sv[m];
                    sv[h2 + m] = (real)(g * sigmoid(g) * (double)sv[h + m]);
                }
                for (int c = 0; c < out; c++) o[c] = 0;
                for (int m = 0; m < h; m++) {
                    const double am = sv[h2 + m];
                    const real *row = W2 + (size_t)m * out;
                    for (int c = 0; c < out; c++) o[c] += am * row[c];
                }
                const double gj = gate[(size_t)i * k + j];
                for (int c = 0; c < out; c++) yacc[c] += gj * o[c];
            }
            real *yi = y + (size_t)i * out;
            for (int c = 0; c < out; c++) yi[c] = (real)yacc[c];
        }
        free(pre);
    }
}

/* For one (token, slot) with saved sv = [g | u | act], expert down weights W2 [h,out],
 * gate gj and the token's dy [out]: fills dpre [2h] with the gradient of gj*expert(x)
 * with respect to the pre-activation [g | u] and returns dy . expert(x) = act . (W2 dy)
 * (the slot's gate gradient). da0 [h] is scratch. */
static double expert_adjoint(double *dpre, double *da0, const real *sv, const real *W2,
                             const real *dy, double gj, int h, int out)
{
    double dgate = 0;
    for (int m = 0; m < h; m++) {
        const real *row = W2 + (size_t)m * out;
        double s = 0;
        for (int c = 0; c < out; c++) s += (double)row[c] * dy[c];
        da0[m] = s;
        dgate += (double)sv[2 * h + m] * s;
    }
    for (int m = 0; m < h; m++) {
        const double g = sv[m], u = sv[h + m], sg = sigmoid(g);
        const double da = gj * da0[m];
        dpre[m] = da * u * sg * (1.0 + g * (1.0 - sg));
        dpre[h + m] = da * g * sg;
    }
    return dgate;
}

/* Accumulates dx [N,in], dgate [N,k], dw1 [E,in,2h] and dw2 [E,h,out] for dy [N,out],
 * given the forward's inputs and save. Scratch: N*k + E + 1 ints for the per-expert
 * lists, and per thread in + 3h doubles (token pass) or in*2h + h*out + 3h doubles
 * (expert pass). Experts that receive no token leave dw1/dw2 untouched. */
void cpu_moe_experts_backward(real *dx, real *dgate, real *dw1, real *dw2, const real *dy,
                              const real *save, const real *x, const int32_t *idx,
                              const real *gate, const real *w1, const real *w2,
                              int N, int E, int k, int in, int h, int out)
{
    const int h2 = 2 * h;
    const size_t nk = (size_t)N * k;

    /* token pass: dx and dgate, one token per task */
#pragma omp parallel
    {
        double *dxa = moe_scratch((size_t)(in + 3 * h) * sizeof *dxa, "cpu_moe_experts_backward");
        double *dpre = dxa + in, *da0 = dpre + h2;
#pragma omp for schedule(static)
        for (int i = 0; i < N; i++) {
            const real *dyi = dy + (size_t)i * out;
            for (int r = 0; r < in; r++) dxa[r] = 0;
            for (int j = 0; j < k; j++) {
                const size_t p = (size_t)i * k + j;
                const int e = idx[p];
                const real *W1 = w1 + (size_t)e * in * h2;
                dgate[p] += (real)expert_adjoint(dpre, da0, save + p * 3 * h,
                                                 w2 + (size_t)e * h * out, dyi, gate[p], h, out);
                for (int r = 0; r < in; r++) {
                    const real *row = W1 + (size_t)r * h2;
                    double s = 0;
                    for (int c = 0; c < h2; c++) s += (double)row[c] * dpre[c];
                    dxa[r] += s;
                }
            }
            real *dxi = dx + (size_t)i * in;
            for (int r = 0; r < in; r++) dxi[r] += (real)dxa[r];
        }
        free(dxa);
    }

    /* per-expert lists of (token, slot) pairs in token order: a stable counting sort */
    int *start = moe_scratch((size_t)(E + 1) * sizeof *start, "cpu_moe_experts_backward");
    int *pairs = moe_scratch(nk * sizeof *pairs, "cpu_moe_experts_backward");
    memset(start, 0, (size_t)(E + 1) * sizeof *start);
    for (size_t p = 0; p < nk; p++) start[idx[p] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    {
        int *fill = moe_scratch((size_t)E * sizeof *fill, "cpu_moe_experts_backward");
        memcpy(fill, start, (size_t)E * sizeof *fill);
        for (size_t p = 0; p < nk; p++) pairs[fill[idx[p]]++] = (int)p;
        free(fill);
    }

    /* expert pass: dw1, dw2, one expert per task */
#pragma omp parallel
    {
        const size_t n1 = (size_t)in * h2, n2 = (size_t)h * out;
        double *a1 = moe_scratch((n1 + n2 + 3 * (size_t)h) * sizeof *a1, "cpu_moe_experts_backward");
        double *a2 = a1 + n1, *dpre = a2 + n2, *da0 = dpre + h2;
#pragma omp for schedule(dynamic, 1)
        for (int e = 0; e < E; e++) {
            if (start[e] == start[e + 1]) continue;
            const real *W2 = w2 + (size_t)e * h * out;
            for (size_t c = 0; c < n1 + n2; c++) a1[c] = 0;
            for (int q = start[e]; q < start[e + 1]; q++) {
                const size_t p = (size_t)pairs[q];
                const size_t i = p / (size_t)k;
                const real *sv = save + p * 3 * h;
                const real *dyi = dy + i * out;
                const real *xi = x + i * in;
                const double gj = gate[p];
                expert_adjoint(dpre, da0, sv, W2, dyi, gj, h, out);
                for (int r = 0; r < in; r++) {
                    const double xr = xi[r];
                    double *row = a1 + (size_t)r * h2;
                    for (int c = 0; c < h2; c++) row[c] += xr * dpre[c];
                }
                for (int m = 0; m < h; m++) {
                    const double am = gj * (double)sv[h2 + m];
                    double *row = a2 + (size_t)m * out;
                    for (int c = 0; c < out; c++) row[c] += am * dyi[c];
                }
            }
            real *g1 = dw1 + (size_t)e * n1, *g2 = dw2 + (size_t)e * n2;
            for (size_t c = 0; c < n1; c++) g1[c] += (real)a1[c];
            for (size_t c = 0; c < n2; c++) g2[c] += (real)a2[c];
        }
        free(a1);
    }
    free(start);
    free(pairs);
}

void cpu_add_i32(int32_t *y, const int32_t *x, size_t n)
{
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

void cpu_router_bias_update(real *bias, const int32_t *loads, int rows, int E, int64_t tokens, int k, real rate)
{
    const int64_t expected = tokens * (int64_t)k;
    for (size_t i = 0; i < (size_t)rows * E; i++) {
        const int64_t lhs = (int64_t)loads[i] * E;
        const real sign = lhs > expected ? (real)1 : (lhs < expected ? (real)-1 : (real)0);
        bias[i] -= rate * sign;
    }
}
