/* cpu_dispatch.c: the row movements of expert-parallel MoE on the CPU backend: the
 * gather that builds a send buffer grouped by destination rank, and the per-token
 * combine of the rows that come back (and its adjoint).
 *
 * Every loop runs one output row per task: the gather and the combine forward one
 * destination row, the combine backward one token (its k assignments own k distinct
 * dvals rows, because pos is injective). Each output element is therefore written by one
 * thread, and sums run in a fixed order: the combine sums its k terms in slot order, the
 * gate gradient its width products in column order, both in double whatever `real` is.
 */
#include "cpu_ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Scratch that ends the program on failure: the ops have no error channel. */
static void *dispatch_scratch(size_t bytes, const char *who)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "deltamla: error: %s: out of memory for %zu bytes\n", who, bytes);
        exit(1);
    }
    return p;
}

/* dst [n, width] = src rows rows[0..n) */
void cpu_rows_gather(real *dst, const real *src, const int32_t *rows, int n, int width)
{
    if (n <= 0 || width <= 0) return;
    const size_t row_bytes = (size_t)width * sizeof(real);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) memcpy(dst + (size_t)r * width, src + (size_t)rows[r] * width, row_bytes);
}

/* y [N, width] += sum_j g_ij vals[pos[i*k+j]]. Scratch: width doubles per thread, the
 * row's sum, which is added to y once all k terms are in. */
void cpu_moe_combine_forward(real *y, const real *vals, const int32_t *pos, const real *gate,
                             int N, int k, int width)
{
    if (N <= 0 || k <= 0 || width <= 0) return;
#pragma omp parallel
    {
        double *acc = dispatch_scratch((size_t)width * sizeof *acc, "cpu_moe_combine_forward");
#pragma omp for schedule(static)
        for (int i = 0; i < N; i++) {
            for (int c = 0; c < width; c++) acc[c] = 0;
            for (int j = 0; j < k; j++) {
                const size_t a = (size_t)i * k + j;
                const real *v = vals + (size_t)pos[a] * width;
                const double g = gate ? (double)gate[a] : 1.0;
                for (int c = 0; c < width; c++) acc[c] += g * v[c];
            }
            real *yi = y + (size_t)i * width;
            for (int c = 0; c < width; c++) yi[c] += (real)acc[c];
        }
        free(acc);
    }
}

/* dvals[pos[i*k+j]] = g_ij dy[i] (overwrite); dgate[i*k+j] += dy[i] . vals[pos[i*k+j]]
 * when dgate is set. */
void cpu_moe_combine_backward(real *dvals, real *dgate, const real *dy, const real *vals,
                              const int32_t *pos, const real *gate, int N, int k, int width)
{
    if (N <= 0 || k <= 0 || width <= 0) return;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const real *dyi = dy + (size_t)i * width;
        for (int j = 0; j < k; j++) {
            const size_t a = (size_t)i * k + j;
            const size_t p = (size_t)pos[a];
            if (dgate) {
                const real *v = vals + p * width;
                double s = 0;
                for (int c = 0; c < width; c++) s += (double)dyi[c] * v[c];
                dgate[a] += (real)s;
            }
            real *dv = dvals + p * width;
            if (gate) {
                const real g = gate[a];
                for (int c = 0; c < width; c++) dv[c] = g * dyi[c];
            } else {
                memcpy(dv, dyi, (size_t)width * sizeof *dv);
            }
        }
    }
}
