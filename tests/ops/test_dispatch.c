/* test_dispatch.c: checks the expert-parallel row ops of the CPU backend
 * (src/cpu/cpu_dispatch.c), built in double.
 *
 *   - rows_gather against a direct loop, with repeated source rows, rows of dst past n
 *     left exactly as they were, and n = 0;
 *   - moe_combine_forward against a direct transcription of the formula, and that it
 *     accumulates into y;
 *   - moe_combine_backward: dvals and dgate against central finite differences of
 *     L = sum(w * y), with pos a random injective map into more rows than N*k, so that
 *     the rows pos does not name must be left exactly as they were (dvals overwrites:
 *     the rows it writes must not keep their old values either), and dgate accumulates;
 *     gate NULL (g = 1, dgate NULL);
 *   - bit-identical results with 1 and 3 threads.
 * Shapes: N in {0, 1, 7}, k in {1, 3, 8}, width in {1, 5, 256}.
 */
#include "cpu_ops.h"
#include "gradcheck.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FD_H 1e-6
#define FD_TOL 1e-6
#define EXACT_TOL 1e-14
#define PREFILL 0.625 /* accumulated-into buffers start here */
#define EXTRA_ROWS 3  /* rows of the send buffer that no assignment uses */

static void *xalloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_dispatch: out of memory\n");
        exit(1);
    }
    return p;
}

static double *dalloc(size_t n) { return xalloc(n * sizeof(double)); }

static double *dcopy(const double *src, size_t n)
{
    double *p = dalloc(n);
    memcpy(p, src, n * sizeof *p);
    return p;
}

static int same_bits(const double *a, const double *b, size_t n) { return memcmp(a, b, n * sizeof *a) == 0; }

/* a random permutation of [0, m): its first N*k entries serve as pos, the rest name
 * the rows that no assignment uses */
static int32_t *shuffled(int m, uint64_t *st)
{
    int32_t *perm = xalloc((size_t)m * sizeof *perm);
    for (int r = 0; r < m; r++) perm[r] = r;
    for (int r = m - 1; r > 0; r--) {
        int s = (int)(gc_uniform(st) * (r + 1));
        int32_t t = perm[r];
        perm[r] = perm[s];
        perm[s] = t;
    }
    return perm;
}

/* ------------------------------------------------------------------ gather ------ */

static void test_gather(int n, int m, int width, uint64_t *st)
{
    const size_t nd = (size_t)(n + EXTRA_ROWS) * width, ns = (size_t)m * width;
    double *src = dalloc(ns), *dst = dalloc(nd);
    gc_fill(src, ns, st, -1, 1);
    gc_fill(dst, nd, st, -1, 1);
    int32_t *rows = xalloc((size_t)(n ? n : 1) * sizeof *rows);
    for (int r = 0; r < n; r++) rows[r] = (int32_t)(gc_uniform(st) * m);
    if (n >= 2) rows[n - 1] = rows[0]; /* a repeated source row */
    double *want = dcopy(dst, nd);
    for (int r = 0; r < n; r++)
        for (int c = 0; c < width; c++) want[(size_t)r * width + c] = src[(size_t)rows[r] * width + c];
    cpu_rows_gather(dst, src, rows, n, width);
    char what[160];
    snprintf(what, sizeof what, "rows_gather n=%d width=%d: equals the direct loop, rows past n untouched", n, width);
    gc_report(what, same_bits(dst, want, nd), NULL);
    free(src), free(dst), free(rows), free(want);
}

/* ----------------------------------------------------------------- combine ------ */

typedef struct combine_case {
    int N, k, width, m; /* m rows of vals, m = N*k + EXTRA_ROWS */
    int32_t *pos;
    double *vals, *gate, *w; /* gate NULL: g = 1; w: cotangent of y */
    double *y;
} combine_case;

static double combine_loss(void *ctx)
{
    combine_case *cc = ctx;
    const size_t ny = (size_t)cc->N * cc->width;
    memset(cc->y, 0, ny * sizeof *cc->y);
    cpu_moe_combine_forward(cc->y, cc->vals, cc->pos, cc->gate, cc->N, cc->k, cc->width);
    return gc_dot(cc->y, cc->w, ny);
}

static void test_combine(int N, int k, int width, int gated, uint64_t *st)
{
    combine_case cc = {.N = N, .k = k, .width = width, .m = N * k + EXTRA_ROWS};
    const size_t nk = (size_t)N * k, ny = (size_t)N * width, nv = (size_t)cc.m * width;
    cc.pos = shuffled(cc.m, st);
    cc.vals = dalloc(nv), cc.w = dalloc(ny), cc.y = dalloc(ny);
    cc.gate = gated ? dalloc(nk) : NULL;
    gc_fill(cc.vals, nv, st, -1, 1);
    gc_fill(cc.w, ny, st, -1, 1);
    if (gated) gc_fill(cc.gate, nk, st, 0.05, 1);
    char name[96], what[224];
    snprintf(name, sizeof name, "moe_combine N=%d k=%d width=%d %s", N, k, width, gated ? "gated" : "gate NULL");

    /* forward, accumulating into a prefilled y, against the formula */
    double *y = dalloc(ny), *want = dalloc(ny);
    for (size_t t = 0; t < ny; t++) y[t] = want[t] = PREFILL;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < k; j++) {
            const size_t a = (size_t)i * k + j;
            const double g = gated ? cc.gate[a] : 1.0;
            for (int c = 0; c < width; c++) want[(size_t)i * width + c] += g * cc.vals[(size_t)cc.pos[a] * width + c];
        }
    cpu_moe_combine_forward(y, cc.vals, cc.pos, cc.gate, N, k, width);
    snprintf(what, sizeof what, "%s: forward accumulates the formula into y", name);
    gc_compare(what, y, want, ny, EXACT_TOL);

    /* backward: dvals rows start at a sentinel (overwritten where pos points, kept
     * elsewhere), dgate prefilled (accumulated) */
    double *dvals = dalloc(nv), *dgate = gated ? dalloc(nk) : NULL, *num = dalloc(nv);
    for (size_t t = 0; t < nv; t++) dvals[t] = PREFILL;
    for (size_t a = 0; gated && a < nk; a++) dgate[a] = PREFILL;
    cpu_moe_combine_backward(dvals, dgate, cc.w, cc.vals, cc.pos, cc.gate, N, k, width);
    int kept = 1;
    for (int r = (int)nk; r < cc.m; r++)
        for (int c = 0; c < width; c++) kept &= dvals[(size_t)cc.pos[r] * width + c] == PREFILL;
    snprintf(what, sizeof what, "%s: backward leaves the %d rows pos does not name exactly as they were", name,
             EXTRA_ROWS);
    gc_report(what, kept, NULL);
    gc_numeric(combine_loss, &cc, cc.vals, nv, FD_H, num);
    for (int r = (int)nk; r < cc.m; r++) /* the untouched rows: compare them as zero gradient */
        for (int c = 0; c < width; c++) dvals[(size_t)cc.pos[r] * width + c] -= PREFILL;
    snprintf(what, sizeof what, "%s: backward dvals (overwritten) vs finite differences", name);
    gc_compare(what, dvals, num, nv, FD_TOL);
    if (gated) {
        for (size_t a = 0; a < nk; a++) dgate[a] -= PREFILL;
        gc_numeric(combine_loss, &cc, cc.gate, nk, FD_H, num);
        snprintf(what, sizeof what, "%s: backward dgate (accumulated) vs finite differences", name);
        gc_compare(what, dgate, num, nk, FD_TOL);
    }

    /* thread count must not change a bit */
    double *y1 = dalloc(ny), *y3 = dalloc(ny), *dv1 = dalloc(nv), *dv3 = dalloc(nv);
    double *dg1 = dalloc(nk), *dg3 = dalloc(nk);
    int keep = omp_get_max_threads();
    omp_set_num_threads(1);
    cpu_moe_combine_forward(y1, cc.vals, cc.pos, cc.gate, N, k, width);
    cpu_moe_combine_backward(dv1, gated ? dg1 : NULL, cc.w, cc.vals, cc.pos, cc.gate, N, k, width);
    omp_set_num_threads(3);
    cpu_moe_combine_forward(y3, cc.vals, cc.pos, cc.gate, N, k, width);
    cpu_moe_combine_backward(dv3, gated ? dg3 : NULL, cc.w, cc.vals, cc.pos, cc.gate, N, k, width);
    omp_set_num_threads(keep);
    snprintf(what, sizeof what, "%s: bit-identical with 1 and 3 threads", name);
    gc_report(what, same_bits(y1, y3, ny) && same_bits(dv1, dv3, nv) && same_bits(dg1, dg3, nk), NULL);

    free(cc.pos), free(cc.vals), free(cc.w), free(cc.y), free(cc.gate);
    free(y), free(want), free(dvals), free(dgate), free(num);
    free(y1), free(y3), free(dv1), free(dv3), free(dg1), free(dg3);
}

int main(void)
{
    uint64_t st = 0xd15a7c4ULL;
    const int widths[3] = {1, 5, 256};
    const int gather_n[3] = {0, 1, 9};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) test_gather(gather_n[b], 4, widths[a], &st);

    const int Ns[3] = {0, 1, 7}, ks[3] = {1, 3, 8};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 3; c++) {
                test_combine(Ns[a], ks[b], widths[c], 1, &st);
                test_combine(Ns[a], ks[b], widths[c], 0, &st);
            }
    return gc_failures() != 0;
}
