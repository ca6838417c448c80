/* test_gpu_dispatch.c: the CUDA expert-parallel row ops (kernels/dispatch.cu) against
 * the CPU oracle (src/cpu/cpu_dispatch.c) on the same fresh random inputs.
 *
 * Cases: width in {1, 3, 64, 85, 256} x N in {0, 1, 1000} x k in {1, 8}, each with the
 * float buffers 16-byte aligned (the float4 paths where width % 4 == 0) and offset by one
 * float (the scalar paths). pos is the first N*k entries of a random permutation of
 * N*k + 3 rows, so three rows of the send buffer belong to no assignment; the gather
 * fills the first N*k of those rows from random tokens (repeats included).
 *   - rows_gather: bitwise equal to the CPU (a copy), the rows past n untouched;
 *   - moe_combine_forward (gated and gate NULL): what it adds to random y, within fp32
 *     tolerance;
 *   - moe_combine_backward (gated with dgate, gated without, gate NULL): dvals from
 *     random starting values (overwritten rows within tolerance, the three unnamed rows
 *     bitwise unchanged), the dgate increment within tolerance;
 *   - every GPU op runs twice and must reproduce its bits.
 * Then one large case (N = 8192, k = 8, width = 1024) reports the achieved bandwidth of
 * each op as a "# " note.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

#define EXTRA_ROWS 3

static gt_ctx G;

static size_t fbytes(size_t n) { return n * sizeof(float); }

/* device float buffers, optionally offset by `off` floats from an aligned allocation so
 * that the float4 paths cannot be taken */
static float *dev_alloc(size_t n, int off) { return (float *)G.gpu->alloc(fbytes(n + off)) + off; }

static float *dev_up(const float *host, size_t n, int off)
{
    float *d = dev_alloc(n, off);
    G.gpu->from_host(d, host, fbytes(n));
    return d;
}

static void dev_free(float *d, int off) { G.gpu->free(d - off); }

/* a random permutation of [0, m) */
static int32_t *shuffled(int m)
{
    int32_t *perm = xmalloc((size_t)(m ? m : 1) * sizeof *perm);
    for (int r = 0; r < m; r++) perm[r] = r;
    for (int r = m - 1; r > 0; r--) {
        int32_t *s = gt_rand_int(&G, 1, 0, r + 1);
        int32_t t = perm[r];
        perm[r] = perm[s[0]];
        perm[s[0]] = t;
        free(s);
    }
    return perm;
}

/* what a GPU op added to `before` against what the CPU op added */
static int compare_delta(const char *what, const float *gpu, const float *cpu, const float *before, size_t n)
{
    float *dg = xmalloc(fbytes(n ? n : 1)), *dc = xmalloc(fbytes(n ? n : 1));
    for (size_t i = 0; i < n; i++) {
        dg[i] = gpu[i] - before[i];
        dc[i] = cpu[i] - before[i];
    }
    int pass = gt_compare(what, dg, dc, n, GT_TOL_FP32);
    free(dg);
    free(dc);
    return pass;
}

static void test_gather(int N, int k, int width, int off, const char *ctx)
{
    const int nk = N * k, m = nk + EXTRA_ROWS;
    const size_t nx = (size_t)N * width, nd = (size_t)m * width;
    char what[256];
    float *x = gt_rand(&G, nx, -1, 1), *dst0 = gt_rand(&G, nd, -1, 1);
    int32_t *rows = gt_rand_int(&G, (size_t)nk, 0, N);
    float *dst_c = gt_host_copy(dst0, nd);
    G.cpu->rows_gather(dst_c, x, rows, nk, width);

    float *x_d = dev_up(x, nx, off), *dst_d = dev_alloc(nd, off);
    int32_t *rows_d = gt_up_int(&G, rows, (size_t)nk);
    float *res[2];
    for (int run = 0; run < 2; run++) {
        G.gpu->from_host(dst_d, dst0, fbytes(nd));
        G.gpu->rows_gather(dst_d, x_d, rows_d, nk, width);
        res[run] = gt_down(&G, dst_d, nd);
    }
    snprintf(what, sizeof what, "%s: rows_gather n=%d equals the CPU, rows past n untouched", ctx, nk);
    gt_same_bits(what, res[0], dst_c, fbytes(nd));
    snprintf(what, sizeof what, "%s: rows_gather deterministic", ctx);
    gt_same_bits(what, res[0], res[1], fbytes(nd));

    dev_free(x_d, off), dev_free(dst_d, off), G.gpu->free(rows_d);
    free(x), free(dst0), free(rows), free(dst_c), free(res[0]), free(res[1]);
}

static void test_combine(int N, int k, int width, int off, const char *ctx)
{
    const int nk = N * k, m = nk + EXTRA_ROWS;
    const size_t ny = (size_t)N * width, nv = (size_t)m * width;
    char what[256];
    int32_t *pos = shuffled(m);
    float *vals = gt_rand(&G, nv, -1, 1), *gate = gt_rand(&G, (size_t)nk, 0.05f, 1);
    float *y0 = gt_rand(&G, ny, -1, 1), *dy = gt_rand(&G, ny, -1, 1);
    float *dvals0 = gt_rand(&G, nv, -1, 1), *dgate0 = gt_rand(&G, (size_t)nk, -1, 1);

    int32_t *pos_d = gt_up_int(&G, pos, (size_t)nk);
    float *vals_d = dev_up(vals, nv, off), *gate_d = dev_up(gate, (size_t)nk, off), *dy_d = dev_up(dy, ny, off);
    float *y_d = dev_alloc(ny, off), *dvals_d = dev_alloc(nv, off), *dgate_d = dev_alloc((size_t)nk, off);

    /* forward, gated and with gate NULL */
    for (int gated = 1; gated >= 0; gated--) {
        const char *tag = gated ? "gated" : "gate NULL";
        float *y_c = gt_host_copy(y0, ny), *res[2];
        G.cpu->moe_combine_forward(y_c, vals, pos, gated ? gate : NULL, N, k, width);
        for (int run = 0; run < 2; run++) {
            G.gpu->from_host(y_d, y0, fbytes(ny));
            G.gpu->moe_combine_forward(y_d, vals_d, pos_d, gated ? gate_d : NULL, N, k, width);
            res[run] = gt_down(&G, y_d, ny);
        }
        snprintf(what, sizeof what, "%s: moe_combine_forward %s: y increment", ctx, tag);
        compare_delta(what, res[0], y_c, y0, ny);
        snprintf(what, sizeof what, "%s: moe_combine_forward %s: deterministic", ctx, tag);
        gt_same_bits(what, res[0], res[1], fbytes(ny));
        free(y_c), free(res[0]), free(res[1]);
    }

    /* backward: mode 0 gated with dgate, 1 gated without dgate, 2 gate NULL */
    for (int mode = 0; mode < 3; mode++) {
        const char *tag = mode == 0 ? "gated" : mode == 1 ? "gated, dgate NULL" : "gate NULL";
        const float *g_h = mode < 2 ? gate : NULL, *g_d = mode < 2 ? gate_d : NULL;
        const int with_dgate = mode == 0;
        float *dvals_c = gt_host_copy(dvals0, nv), *dgate_c = gt_host_copy(dgate0, (size_t)nk);
        G.cpu->moe_combine_backward(dvals_c, with_dgate ? dgate_c : NULL, dy, vals, pos, g_h, N, k, width);
        float *dv[2], *dg[2];
        for (int run = 0; run < 2; run++) {
            G.gpu->from_host(dvals_d, dvals0, fbytes(nv));
            G.gpu->from_host(dgate_d, dgate0, fbytes((size_t)nk));
            G.gpu->moe_combine_backward(dvals_d, with_dgate ? dgate_d : NULL, dy_d, vals_d, pos_d, g_d, N, k, width);
            dv[run] = gt_down(&G, dvals_d, nv);
            dg[run] = gt_down(&G, dgate_d, (size_t)nk);
        }
        snprintf(what, sizeof what, "%s: moe_combine_backward %s: dvals", ctx, tag);
        gt_compare(what, dv[0], dvals_c, nv, GT_TOL_FP32);
        int kept = 1;
        for (int r = nk; r < m; r++)
            kept &= !memcmp(dv[0] + (size_t)pos[r] * width, dvals0 + (size_t)pos[r] * width, fbytes(width));
        snprintf(what, sizeof what, "%s: moe_combine_backward %s: the %d rows pos does not name are untouched", ctx,
                 tag, EXTRA_ROWS);
        gt_report(what, kept, "bitwise");
        if (with_dgate) {
            snprintf(what, sizeof what, "%s: moe_combine_backward %s: dgate increment", ctx, tag);
            compare_delta(what, dg[0], dgate_c, dgate0, (size_t)nk);
        } else {
            snprintf(what, sizeof what, "%s: moe_combine_backward %s: dgate buffer not touched", ctx, tag);
            gt_same_bits(what, dg[0], dgate0, fbytes((size_t)nk));
        }
        snprintf(what, sizeof what, "%s: moe_combine_backward %s: deterministic (dvals)", ctx, tag);
        gt_same_bits(what, dv[0], dv[1], fbytes(nv));
        snprintf(what, sizeof what, "%s: moe_combine_backward %s: deterministic (dgate)", ctx, tag);
        gt_same_bits(what, dg[0], dg[1], fbytes((size_t)nk));
        free(dvals_c), free(dgate_c);
        for (int run = 0; run < 2; run++) free(dv[run]), free(dg[run]);
    }

    G.gpu->free(pos_d);
    dev_free(vals_d, off), dev_free(gate_d, off), dev_free(dy_d, off);
    dev_free(y_d, off), dev_free(dvals_d, off), dev_free(dgate_d, off);
    free(pos), free(vals), free(gate), free(y0), free(dy), free(dvals0), free(dgate0);
}

/* GB/s of one op from the best of `reps` timed runs (after a warm-up), bytes being its
 * minimum traffic: every input read once, every output written once */
static void note_bandwidth(const char *what, int op, int N, int k, int width, double bytes)
{
    const int nk = N * k, reps = 5;
    const size_t ny = (size_t)N * width, nv = (size_t)nk * width;
    int32_t *pos = shuffled(nk), *rows = gt_rand_int(&G, (size_t)nk, 0, N);
    float *hv = gt_rand(&G, nv, -1, 1), *hg = gt_rand(&G, (size_t)nk, 0.05f, 1);
    int32_t *pos_d = gt_up_int(&G, pos, (size_t)nk), *rows_d = gt_up_int(&G, rows, (size_t)nk);
    float *vals = dev_up(hv, nv, 0), *gate = dev_up(hg, (size_t)nk, 0), *dvals = dev_alloc(nv, 0);
    float *y = dev_alloc(ny, 0), *dgate = dev_alloc((size_t)nk, 0);
    double best = INFINITY;
    for (int rep = 0; rep <= reps; rep++) {
        G.gpu->sync();
        double t0 = wall_time();
        if (op == 0) G.gpu->rows_gather(dvals, y, rows_d, nk, width);
        if (op == 1) G.gpu->moe_combine_forward(y, vals, pos_d, gate, N, k, width);
        if (op == 2) G.gpu->moe_combine_backward(dvals, dgate, y, vals, pos_d, gate, N, k, width);
        G.gpu->sync();
        double t = wall_time() - t0;
        if (rep > 0 && t < best) best = t;
    }
    printf("# %s N=%d k=%d width=%d: %.3f ms, %.0f GB/s (minimum traffic %.0f MB)\n", what, N, k, width, best * 1e3,
           bytes / best / 1e9, bytes / 1e6);
    G.gpu->free(pos_d), G.gpu->free(rows_d);
    dev_free(vals, 0), dev_free(gate, 0), dev_free(dvals, 0), dev_free(y, 0), dev_free(dgate, 0);
    free(pos), free(rows), free(hv), free(hg);
}

int main(void)
{
    gt_init(&G, 0xd15a7c4ULL);
    const int widths[5] = {1, 3, 64, 85, 256}, Ns[3] = {0, 1, 1000}, ks[2] = {1, 8};
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 2; c++)
                for (int off = 0; off < 2; off++) {
                    char ctx[96];
                    snprintf(ctx, sizeof ctx, "N=%d k=%d width=%d%s", Ns[b], ks[c], widths[a], off ? " unaligned" : "");
                    test_gather(Ns[b], ks[c], widths[a], off, ctx);
                    test_combine(Ns[b], ks[c], widths[a], off, ctx);
                }

    const int N = 8192, k = 8, width = 1024;
    const double row = 4.0 * width, nk = (double)N * k;
    note_bandwidth("rows_gather", 0, N, k, width, 2 * nk * row);
    note_bandwidth("moe_combine_forward", 1, N, k, width, nk * row + 2.0 * N * row);
    note_bandwidth("moe_combine_backward", 2, N, k, width, 2 * nk * row + N * row);

    printf("%s: %d failure(s)\n", gt_failures() ? "FAIL" : "PASS", gt_failures());
    return gt_failures() != 0;
}
