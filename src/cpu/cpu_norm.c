/* cpu_norm.c: RMSNorm (eps 1e-6) and LayerNorm (eps 1e-5, biased variance as
 * torch.nn.LayerNorm) on the CPU, with the per-row statistics saved for the backward.
 *
 * Rows are independent, so the forward and the input gradient run one row per task.
 * The weight and bias gradients sum over rows; they run over blocks of channels in
 * parallel and over rows in order, so every element is one thread's fixed-order sum.
 */
#include "cpu_ops.h"

#include <tgmath.h>

#define RMS_EPS ((real)1e-6)
#define LN_EPS ((real)1e-5)
/* channels per task in the parameter gradients: a contiguous run of each row */
#define NORM_CBLOCK 64
/* Below this many elements a parallel region costs more than the loop itself. */
#define PAR_MIN 32768

/* out [N, C] = w * x / sqrt(mean(x^2) + eps) per row of x [N, C]; w [C]; rstd [N] saved. */
void cpu_rmsnorm_forward(real *out, real *rstd, const real *x, const real *w, int N, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *xi = x + (size_t)i * C;
        real ss = 0;
        for (int c = 0; c < C; c++) ss += xi[c] * xi[c];
        real r = 1 / sqrt(ss / C + RMS_EPS);
        rstd[i] = r;
        real *oi = out + (size_t)i * C;
        for (int c = 0; c < C; c++) oi[c] = w[c] * (xi[c] * r);
    }
}

/* dx [N, C] += and dw [C] += the gradients of the forward above for dout [N, C];
 * rstd [N] from the forward. With r = rstd and g = dout * w:
 * dx = r g - r^3 x mean(g x). */
void cpu_rmsnorm_backward(real *dx, real *dw, const real *dout, const real *x, const real *w,
                          const real *rstd, int N, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *xi = x + (size_t)i * C;
        const real *di = dout + (size_t)i * C;
        real r = rstd[i];
        real gx = 0;
        for (int c = 0; c < C; c++) gx += di[c] * w[c] * xi[c];
        real k = r * r * r * gx / C;
        real *dxi = dx + (size_t)i * C;
        for (int c = 0; c < C; c++) dxi[c] += r * di[c] * w[c] - k * xi[c];
    }
    int nblocks = (C + NORM_CBLOCK - 1) / NORM_CBLOCK;
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * NORM_CBLOCK;
        int c1 = c0 + NORM_CBLOCK < C ? c0 + NORM_CBLOCK : C;
        for (int i = 0; i < N; i++) {
            const real *xi = x + (size_t)i * C;
            const real *di = dout + (size_t)i * C;
            for (int c = c0; c < c1; c++) dw[c] += di[c] * (xi[c] * rstd[i]);
        }
    }
}

/* out [N, C] = (x - mean) * rstd * w + b per row; w, b [C]; mean, rstd [N] saved
 * (variance biased, two passes over the row). */
void cpu_layernorm_forward(real *out, real *mean, real *rstd, const real *x, const real *w,
                           const real *b, int N, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *xi = x + (size_t)i * C;
        real s = 0;
        for (int c = 0; c < C; c++) s += xi[c];
        real m = s / C;
        real v = 0;
        for (int c = 0; c < C; c++) v += (xi[c] - m) * (xi[c] - m);
        real r = 1 / sqrt(v / C + LN_EPS);
        mean[i] = m;
        rstd[i] = r;
        real *oi = out + (size_t)i * C;
        for (int c = 0; c < C; c++) oi[c] = (xi[c] - m) * r * w[c] + b[c];
    }
}

/* dx [N, C], dw [C], db [C] += the gradients of the forward above for dout [N, C];
 * mean, rstd [N] from the forward. With xhat = (x - mean) rstd and g = dout * w:
 * dx = rstd (g - mean(g) - xhat mean(g xhat)). */
void cpu_layernorm_backward(real *dx, real *dw, real *db, const real *dout, const real *x,
                            const real *w, const real *mean, const real *rstd, int N, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int i = 0; i < N; i++) {
        const real *xi = x + (size_t)i * C;
        const real *di = dout + (size_t)i * C;
        real m = mean[i], r = rstd[i];
        real gsum = 0, gxsum = 0;
        for (int c = 0; c < C; c++) {
            real g = di[c] * w[c];
            gsum += g;
            gxsum += g * ((xi[c] - m) * r);
        }
        real gmean = gsum / C, gxmean = gxsum / C;
        real *dxi = dx + (size_t)i * C;
        for (int c = 0; c < C; c++) {
            real xhat = (xi[c] - m) * r;
            dxi[c] += r * (di[c] * w[c] - gmean - xhat * gxmean);
        }
    }
    int nblocks = (C + NORM_CBLOCK - 1) / NORM_CBLOCK;
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * NORM_CBLOCK;
        int c1 = c0 + NORM_CBLOCK < C ? c0 + NORM_CBLOCK : C;
        for (int i = 0; i < N; i++) {
            const real *xi = x + (size_t)i * C;
            const real *di = dout + (size_t)i * C;
            real m = mean[i], r = rstd[i];
            for (int c = c0; c < c1; c++) {
                dw[c] += di[c] * ((xi[c] - m) * r);
                db[c] += di[c];
            }
        }
    }
}
