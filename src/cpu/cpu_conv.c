/* cpu_conv.c: the short causal depthwise convolution of the Gated DeltaNet block
 * (kernel 4, with bias, no activation) on the CPU, x and y [B, T, C] channel-last.
 *
 * y[b,t,c] = bias[c] + sum_{s=0..3} w[c,s] x[b,t-3+s,c] over the taps that lie at or
 * after the window's first visible token: time 0, or with document masking the most
 * recent document start at or before t, so no history crosses a document boundary.
 * The input gradient is gathered per output row (each dx row reads the up to four dy
 * rows that used it), and the weight and bias gradients run over blocks of channels in
 * parallel and over (b, t) in order, so every element is one thread's fixed-order sum.
 */
#include "cpu_ops.h"

#define CONV_K 4
/* channels per task in the parameter gradients: a contiguous run of each row */
#define CONV_CBLOCK 64
/* Below this many elements a parallel region costs more than the loop itself. */
#define PAR_MIN 32768

/* The first time step that output t of batch row b may read: max(0, t-3), raised to
 * the latest document start in (t-3, t]. doc_start: NULL or int32 [B, T] (nonzero =
 * a document starts at that step). */
static int first_visible(const int32_t *doc_start, int b, int t, int T)
{
    int lo = t - (CONV_K - 1) > 0 ? t - (CONV_K - 1) : 0;
    if (doc_start)
        for (int u = t; u > lo; u--)
            if (doc_start[(size_t)b * T + u]) return u;
    return lo;
}

/* y [B,T,C] = bias + causal conv of x [B,T,C] with w [C,4] (oldest tap first), bias [C];
 * doc_start NULL or int32 [B,T]. Overwrites y. */
void cpu_conv_forward(real *y, const real *x, const real *w, const real *bias,
                      const int32_t *doc_start, int B, int T, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)B * T * C >= PAR_MIN)
    for (int bt = 0; bt < B * T; bt++) {
        int b = bt / T, t = bt % T;
        int lo = first_visible(doc_start, b, t, T);
        real *yr = y + (size_t)bt * C;
        for (int c = 0; c < C; c++) yr[c] = bias[c];
        for (int s = 0; s < CONV_K; s++) {
            int u = t - (CONV_K - 1) + s;
            if (u < lo) continue;
            const real *xr = x + ((size_t)b * T + u) * C;
            for (int c = 0; c < C; c++) yr[c] += w[(size_t)c * CONV_K + s] * xr[c];
        }
    }
}

/* dx [B,T,C], dw [C,4], dbias [C] += the gradients of the forward above for dy [B,T,C]. */
void cpu_conv_backward(real *dx, real *dw, real *dbias, const real *dy, const real *x,
                       const real *w, const int32_t *doc_start, int B, int T, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)B * T * C >= PAR_MIN)
    for (int bu = 0; bu < B * T; bu++) {
        int b = bu / T, u = bu % T;
        real *dxr = dx + (size_t)bu * C;
        /* x[u] feeds outputs t = u..u+3 through tap s = u - t + 3 */
        for (int t = u; t < T && t < u + CONV_K; t++) {
            if (u < first_visible(doc_start, b, t, T)) continue;
            int s = u - t + CONV_K - 1;
            const real *dyr = dy + ((size_t)b * T + t) * C;
            for (int c = 0; c < C; c++) dxr[c] += w[(size_t)c * CONV_K + s] * dyr[c];
        }
    }
    int nblocks = (C + CONV_CBLOCK - 1) / CONV_CBLOCK;
#pragma omp parallel for schedule(static) if ((size_t)B * T * C >= PAR_MIN)
    for (int cb = 0; cb < nblocks; cb++) {
        int c0 = cb * CONV_CBLOCK;
        int c1 = c0 + CONV_CBLOCK < C ? c0 + CONV_CBLOCK : C;
        for (int bt = 0; bt < B * T; bt++) {
            int b = bt / T, t = bt % T;
            int lo = first_visible(doc_start, b, t, T);
            const real *dyr = dy + (size_t)bt * C;
            for (int c = c0; c < c1; c++) dbias[c] += dyr[c];
            for (int s = 0; s < CONV_K; s++) {
                int u = t - (CONV_K - 1) + s;
                if (u < lo) continue;
                const real *xr = x + ((size_t)b * T + u) * C;
                for (int c = c0; c < c1; c++) dw[(size_t)c * CONV_K + s] += dyr[c] * xr[c];
            }
        }
    }
}
