/* cpu_elementwise.c: the small pointwise and per-row ops of the CPU backend: vector
 * add/scale/sum of squares, the embedding lookup, SwiGLU, the Gated DeltaNet gates and
 * the per-head L2 normalisation.
 *
 * Math runs in `real` through <tgmath.h>, so the float build uses the float functions
 * and the double build (gradient tests) the double ones. Where a gradient sums over
 * tokens (embedding) the loop runs over channels in parallel and over tokens in order,
 * which keeps the result independent of the thread count.
 */
#include "cpu_ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <tgmath.h>

/* Below this many elements a parallel region costs more than the loop itself. */
#define PAR_MIN 32768
/* sumsq adds partial sums of fixed blocks, so its result does not depend on threads */
#define SUMSQ_BLOCK 16384
/* channels per task in the embedding gradient: one contiguous run per token row */
#define EMB_CBLOCK 64

static real sigmoid(real x)
{
    /* exp of a non-positive argument only, so neither branch overflows */
    if (x >= 0) return 1 / (1 + exp(-x));
    real e = exp(x);
    return e / (1 + e);
}

/* y[i] += x[i] for i < n */
void cpu_add_inplace(real *y, const real *x, size_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* x[i] *= s for i < n */
void cpu_scale_inplace(real *x, real s, size_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

/* Sum of x[i]^2 in double: blocks of SUMSQ_BLOCK summed in parallel, then the block
 * sums added in block order. x is host memory here. */
double cpu_sumsq(const real *x, size_t n)
{
    size_t nblocks = (n + SUMSQ_BLOCK - 1) / SUMSQ_BLOCK;
    if (nblocks <= 1) {
        double s = 0;
        for (size_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
        return s;
    }
    double *part = malloc(nblocks * sizeof *part);
    if (!part) {
        fprintf(stderr, "deltamla: error: cpu_sumsq: out of memory (%zu blocks)\n", nblocks);
        abort();
    }
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < nblocks; b++) {
        size_t end = (b + 1) * SUMSQ_BLOCK < n ? (b + 1) * SUMSQ_BLOCK : n;
        double s = 0;
        for (size_t i = b * SUMSQ_BLOCK; i < end; i++) s += (double)x[i] * (double)x[i];
        part[b] = s;
    }
    double s = 0;
    for (size_t b = 0; b < nblocks; b++) s += part[b];
    free(part);
    return s;
}

/* out [N, C] = wte[tokens[i], :]; tokens int32 [N], each in [0, V) of wte [V, C]. */
void cpu_embedding_forward(real *out, const int32_t *tokens, const real *wte, int N, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *src = wte + (size_t)tokens[i] * C;
        real *dst = out + (size_t)i * C;
        for (int c = 0; c < C; c++) dst[c] = src[c];
    }
}

/* dwte [V, C] += dout[i, :] at row tokens[i]: parallel over blocks of channels, tokens
 * in order, since several tokens may hit the same row. */
void cpu_embedding_backward(real *dwte, const real *dout, const int32_t *tokens, int N, int C)
{
    int nblocks = (C + EMB_CBLOCK - 1) / EMB_CBLOCK;
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * EMB_CBLOCK;
        int c1 = c0 + EMB_CBLOCK < C ? c0 + EMB_CBLOCK : C;
        for (int i = 0; i < N; i++) {
            real *dst = dwte + (size_t)tokens[i] * C;
            const real *src = dout + (size_t)i * C;
            for (int c = c0; c < c1; c++) dst[c] += src[c];
        }
    }
}

/* in [N, 2h] = [first | second] per row; out [N, h]:
 * silu_first = 1: out = silu(first) * second; silu_first = 0: out = first * silu(second). */
void cpu_swiglu_forward(real *out, const real *in, int N, int h, int silu_first)
{
#pragma omp parallel for schedule(static) if ((size_t)N * h >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *a = in + (size_t)i * 2 * h;
        const real *b = a + h;
        real *o = out + (size_t)i * h;
        for (int j = 0; j < h; j++) {
            real act = silu_first ? a[j] : b[j];
            real lin = silu_first ? b[j] : a[j];
            o[j] = act * sigmoid(act) * lin;
        }
    }
}

/* din [N, 2h] += d out / d in applied to dout [N, h]; in as in the forward. */
void cpu_swiglu_backward(real *din, const real *dout, const real *in, int N, int h, int silu_first)
{
#pragma omp parallel for schedule(static) if ((size_t)N * h >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *a = in + (size_t)i * 2 * h;
        const real *b = a + h;
        real *da = din + (size_t)i * 2 * h;
        real *db = da + h;
        const real *d = dout + (size_t)i * h;
        for (int j = 0; j < h; j++) {
            real act = silu_first ? a[j] : b[j];
            real lin = silu_first ? b[j] : a[j];
            real s = sigmoid(act);
            /* silu'(x) = s + x s (1 - s) */
            real d_act = d[j] * lin * (s + act * s * (1 - s));
            real d_lin = d[j] * act * s;
            if (silu_first) {
                da[j] += d_act;
                db[j] += d_lin;
            } else {
                da[j] += d_lin;
                db[j] += d_act;
            }
        }
    }
}

/* g = logsigmoid(graw), beta = sigmoid(braw), all [n]. */
void cpu_gates_forward(real *g, real *beta, const real *graw, const real *braw, size_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        real x = graw[i];
        /* log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): no overflow, no log(0) */
        g[i] = (x < 0 ? x : 0) - log1p(exp(-fabs(x)));
        beta[i] = sigmoid(braw[i]);
    }
}

/* dgraw += dg * sigmoid(-graw); dbraw += dbeta * beta (1 - beta); all [n]. */
void cpu_gates_backward(real *dgraw, real *dbraw, const real *dg, const real *dbeta,
                        const real *graw, const real *braw, size_t n)
{
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        dgraw[i] += dg[i] * sigmoid(-graw[i]);
        real s = sigmoid(braw[i]);
        dbraw[i] += dbeta[i] * s * (1 - s);
    }
}

/* Per row of x [n, D]: y = x / max(||x||_2, 1e-12); rnorm [n] = 1 / max(||x||_2, 1e-12). */
void cpu_l2norm_forward(real *y, real *rnorm, const real *x, int n, int D)
{
#pragma omp parallel for schedule(static) if ((size_t)n * D >= PAR_MIN)
    for (int i = 0; i < n; i++) {
        const real *xi = x + (size_t)i * D;
        real ss = 0;
        for (int d = 0; d < D; d++) ss += xi[d] * xi[d];
        real nrm = sqrt(ss);
        real r = 1 / (nrm > (real)1e-12 ? nrm : (real)1e-12);
        rnorm[i] = r;
        real *yi = y + (size_t)i * D;
        for (int d = 0; d < D; d++) yi[d] = xi[d] * r;
    }
}

/* dx [n, D] += dy through y = x * rnorm. Where the norm was clamped to 1e-12 the scale
 * is a constant and only dy * rnorm flows back (as torch's clamp_min does below its
 * bound); otherwise dx += rnorm (dy - y (y . dy)). */
void cpu_l2norm_backward(real *dx, const real *dy, const real *x, const real *rnorm, int n, int D)
{
#pragma omp parallel for schedule(static) if ((size_t)n * D >= PAR_MIN)
    for (int i = 0; i < n; i++) {
        const real *xi = x + (size_t)i * D;
        const real *dyi = dy + (size_t)i * D;
        real *dxi = dx + (size_t)i * D;
        real r = rnorm[i];
        real ss = 0, xdy = 0;
        for (int d = 0; d < D; d++) {
            ss += xi[d] * xi[d];
            xdy += xi[d] * dyi[d];
        }
        /* same test as the forward's max(): clamped iff the norm is below the bound */
        real c = sqrt(ss) < (real)1e-12 ? 0 : r * r * xdy;
        for (int d = 0; d < D; d++) dxi[d] += r * (dyi[d] - c * xi[d]);
    }
}
