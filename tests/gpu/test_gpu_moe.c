/* test_gpu_moe.c: the CUDA mixture-of-experts ops (kernels/moe_*.cu) against the CPU
 * oracle (src/cpu/cpu_moe.c) on the same random inputs.
 *
 * Router, at (N,E,k) = (7,8,2) with exact ties, (16384,128,12) and (1000,32,3) with a
 * bias that changes selections: idx and counts must equal the CPU's exactly, gates and
 * the z-loss within fp32 tolerance (both compute in double); the backward is checked on
 * what it adds to a non-zero dz, once with the gate gradient and once with only the
 * z-loss gradient (dgate = 0, a large dzloss) so that neither part hides the other.
 * Experts, at (N,E,k,in,h,out) = (7,5,2,13,6,11) (odd sizes: the unvectorised paths),
 * (2048,128,12,256,256,256) (LatentMoE) and (512,32,3,1024,1024,1024) (standard MoE):
 * idx is built directly with distinct experts per token, one expert picked by every
 * token at a random slot and one picked by none. Forward: y and the pre-activations
 * [g | u] of save (the part CUDA writes) within the bf16 tolerance (the expert GEMMs run on bf16
 * tensor cores). Backward: the increments of dx, dgate, dw1, dw2 over random non-zero
 * starting values, with the CPU's save as input to both; the unused expert's dw1/dw2
 * must stay bit-identical. Every GPU op runs twice and must reproduce its bits.
 * A failure prints where the largest difference is, with both values.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

#define ZCOEF 1e-3f

static int32_t *down_int(gt_ctx *g, const int32_t *dev, size_t n)
{
    int32_t *h = xmalloc(n * sizeof *h);
    g->gpu->to_host(h, dev, n * sizeof *h);
    return h;
}

static void fill_int(gt_ctx *g, int32_t *dev, size_t n, int32_t v)
{
    int32_t *h = xmalloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = v;
    g->gpu->from_host(dev, h, n * sizeof *h);
    free(h);
}

static double sigm(double x) { return 1.0 / (1.0 + exp(-x)); }

/* gt_compare, and on failure the element with the largest difference as [row][col] */
static int compare_at(const char *what, const float *gpu, const float *cpu, size_t n, int row_len, double tol)
{
    int pass = gt_compare(what, gpu, cpu, n, tol);
    if (!pass && n > 0) {
        size_t worst = 0, nonfinite = 0;
        double wd = -1;
        for (size_t i = 0; i < n; i++) {
            if (!isfinite(gpu[i])) {
                if (!nonfinite++) worst = i, wd = INFINITY;
                continue;
            }
            double d = fabs((double)gpu[i] - (double)cpu[i]);
            if (wd < INFINITY && d > wd) wd = d, worst = i;
        }
        printf("    %s: %s at [%zu][%zu]: gpu %.9g cpu %.9g (%zu non-finite)\n", what,
               nonfinite ? "first non-finite" : "largest difference", worst / (size_t)row_len,
               worst % (size_t)row_len, gpu[worst], cpu[worst], nonfinite);
    }
    return pass;
}

/* compares what a backward op added to `before`: (gpu - before) vs (cpu - before) */
static int compare_delta(const char *what, const float *gpu, const float *cpu, const float *before, size_t n,
                         int row_len, double tol)
{
    float *dg = xmalloc(n * sizeof *dg), *dc = xmalloc(n * sizeof *dc);
    for (size_t i = 0; i < n; i++) {
        dg[i] = gpu[i] - before[i];
        dc[i] = cpu[i] - before[i];
    }
    int pass = compare_at(what, dg, dc, n, row_len, tol);
    free(dg);
    free(dc);
    return pass;
}

/* exact equality of int arrays; on failure the first differing [row][col] */
static int compare_ints(const char *what, const int32_t *gpu, const int32_t *cpu, size_t n, int row_len,
                        size_t *first_bad)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (gpu[i] != cpu[i] && !bad++) first = i;
    char detail[200];
    if (!bad)
        snprintf(detail, sizeof detail, "all %zu equal", n);
    else
        snprintf(detail, sizeof detail, "%zu of %zu differ; first at [%zu][%zu]: gpu %d cpu %d", bad, n,
                 first / (size_t)row_len, first % (size_t)row_len, gpu[first], cpu[first]);
    if (first_bad) *first_bad = bad ? first : (size_t)-1;
    return gt_report(what, bad == 0, detail);
}

/* ---------------------------------------------------------------------- router */

static void test_route(gt_ctx *g, int N, int E, int k, int ties, int use_bias)
{
    const size_t nz = (size_t)N * E, nk = (size_t)N * k;
    char name[160], what[256];
    snprintf(name, sizeof name, "moe_route N=%d E=%d k=%d%s%s", N, E, k, ties ? " ties" : "",
             use_bias ? " bias" : "");

    float *z = gt_rand(g, nz, -4.f, 4.f);
    float *bias = use_bias ? gt_rand(g, E, -0.5f, 0.5f) : xcalloc(E, sizeof *bias);
    float *zero_bias = xcalloc(E, sizeof *zero_bias);
    if (ties) {
        /* token 0: all logits equal; token 1: the two largest equal (experts 5 and 2);
         * later tokens: logits drawn from 3 values, so every selection breaks ties */
        for (int e = 0; e < E; e++) z[e] = 0.25f;
        z[1 * E + 5] = z[1 * E + 2] = 6.f;
        for (int i = 2; i < N; i++)
            for (int e = 0; e < E; e++) z[(size_t)i * E + e] = (float)((i + e * 7) % 3) - 1.f;
    }

    /* CPU oracle */
    int32_t *idx_c = xmalloc(nk * sizeof *idx_c), *cnt_c = xmalloc(E * sizeof *cnt_c);
    float *gate_c = xmalloc(nk * sizeof *gate_c), zl_c = 0;
    g->cpu->moe_route_forward(idx_c, gate_c, cnt_c, &zl_c, z, bias, N, E, k, ZCOEF);

    if (use_bias) {
        /* the bias must matter for this case to test anything */
        int32_t *idx0 = xmalloc(nk * sizeof *idx0), *cnt0 = xmalloc(E * sizeof *cnt0);
        float *gate0 = xmalloc(nk * sizeof *gate0), zl0;
        g->cpu->moe_route_forward(idx0, gate0, cnt0, &zl0, z, zero_bias, N, E, k, ZCOEF);
        int changed = 0;
        for (int i = 0; i < N; i++)
            if (memcmp(idx0 + (size_t)i * k, idx_c + (size_t)i * k, (size_t)k * sizeof *idx0)) changed++;
        snprintf(what, sizeof what, "%s: the bias changes the selection of %d tokens", name, changed);
        gt_report(what, changed > 0, NULL);
        free(idx0);
        free(cnt0);
        free(gate0);
    }

    /* GPU, twice */
    float *d_z = gt_up(g, z, nz), *d_bias = gt_up(g, bias, E);
    int32_t *d_idx = g->gpu->alloc(nk * sizeof *d_idx), *d_cnt = g->gpu->alloc(E * sizeof *d_cnt);
    float *d_gate = g->gpu->alloc(nk * sizeof *d_gate), *d_zl = g->gpu->alloc(sizeof *d_zl);
    int32_t *idx_g[2], *cnt_g[2];
    float *gate_g[2], *zl_g[2];
    for (int run = 0; run < 2; run++) {
        fill_int(g, d_idx, nk, -7);
        fill_int(g, d_cnt, E, 12345); /* counts must be overwritten */
        gt_poison(g, d_gate, nk);
        gt_poison(g, d_zl, 1);
        g->gpu->moe_route_forward(d_idx, d_gate, d_cnt, d_zl, d_z, d_bias, N, E, k, ZCOEF);
        g->gpu->sync();
        idx_g[run] = down_int(g, d_idx, nk);
        cnt_g[run] = down_int(g, d_cnt, E);
        gate_g[run] = gt_down(g, d_gate, nk);
        zl_g[run] = gt_down(g, d_zl, 1);
    }

    size_t first_bad;
    snprintf(what, sizeof what, "%s: idx", name);
    if (!compare_ints(what, idx_g[0], idx_c, nk, k, &first_bad)) {
        const size_t i = first_bad / (size_t)k;
        printf("    token %zu: cpu idx/score:", i);
        for (int j = 0; j < k; j++) {
            int e = idx_c[i * k + j];
            printf(" %d/%.17g", e, sigm(z[i * E + e]) + (double)bias[e]);
        }
        printf("\n    token %zu: gpu idx/score:", i);
        for (int j = 0; j < k; j++) {
            int e = idx_g[0][i * k + j];
            if (e >= 0 && e < E)
                printf(" %d/%.17g", e, sigm(z[i * E + e]) + (double)bias[e]);
            else
                printf(" %d/(out of range)", e);
        }
        printf("\n");
    }
    snprintf(what, sizeof what, "%s: counts", name);
    compare_ints(what, cnt_g[0], cnt_c, E, E, NULL);
    snprintf(what, sizeof what, "%s: gate", name);
    compare_at(what, gate_g[0], gate_c, nk, k, GT_TOL_FP32);
    snprintf(what, sizeof what, "%s: zloss (gpu %.9g cpu %.9g)", name, zl_g[0][0], zl_c);
    gt_compare(what, zl_g[0], &zl_c, 1, GT_TOL_FP32);
    snprintf(what, sizeof what, "%s: forward deterministic (idx)", name);
    gt_same_bits(what, idx_g[0], idx_g[1], nk * sizeof(int32_t));
    snprintf(what, sizeof what, "%s: forward deterministic (counts)", name);
    gt_same_bits(what, cnt_g[0], cnt_g[1], E * sizeof(int32_t));
    snprintf(what, sizeof what, "%s: forward deterministic (gate)", name);
    gt_same_bits(what, gate_g[0], gate_g[1], nk * sizeof(float));
    snprintf(what, sizeof what, "%s: forward deterministic (zloss)", name);
    gt_same_bits(what, zl_g[0], zl_g[1], sizeof(float));

    /* backward on the CPU's idx: (a) gate gradient + a small z-loss gradient, (b) the
     * z-loss gradient alone, scaled to be visible */
    int32_t *d_idx_c = gt_up_int(g, idx_c, nk);
    for (int mode = 0; mode < 2; mode++) {
        float *dgt = mode == 0 ? gt_rand(g, nk, -1.f, 1.f) : xcalloc(nk, sizeof(float));
        const float dzloss = mode == 0 ? 1.f : (float)N / ZCOEF;
        float *dz0 = gt_rand(g, nz, -1.f, 1.f);
        float *dz_c = gt_host_copy(dz0, nz);
        g->cpu->moe_route_backward(dz_c, dgt, dzloss, z, idx_c, N, E, k, ZCOEF);
        float *d_dgate = gt_up(g, dgt, nk);
        float *d_dz = g->gpu->alloc(nz * sizeof *d_dz);
        float *dz_g[2];
        for (int run = 0; run < 2; run++) {
            g->gpu->from_host(d_dz, dz0, nz * sizeof *d_dz);
            g->gpu->moe_route_backward(d_dz, d_dgate, dzloss, d_z, d_idx_c, N, E, k, ZCOEF);
            g->gpu->sync();
            dz_g[run] = gt_down(g, d_dz, nz);
        }
        const char *part = mode == 0 ? "gate + zloss grad" : "zloss grad only";
        snprintf(what, sizeof what, "%s: backward dz increment (%s)", name, part);
        compare_delta(what, dz_g[0], dz_c, dz0, nz, E, GT_TOL_FP32);
        snprintf(what, sizeof what, "%s: backward deterministic (%s)", name, part);
        gt_same_bits(what, dz_g[0], dz_g[1], nz * sizeof(float));
        for (int run = 0; run < 2; run++) free(dz_g[run]);
        g->gpu->free(d_dgate);
        g->gpu->free(d_dz);
        free(dgt);
        free(dz0);
        free(dz_c);
    }

    for (int run = 0; run < 2; run++) {
        free(idx_g[run]);
        free(cnt_g[run]);
        free(gate_g[run]);
        free(zl_g[run]);
    }
    g->gpu->free(d_z);
    g->gpu->free(d_bias);
    g->gpu->free(d_idx);
    g->gpu->free(d_cnt);
    g->gpu->free(d_gate);
    g->gpu->free(d_zl);
    g->gpu->free(d_idx_c);
    free(z);
    free(bias);
    free(zero_bias);
    free(idx_c);
    free(cnt_c);
    free(gate_c);
}

/* --------------------------------------------------------------------- experts */

/* idx [N,k] with distinct experts per token: `hot` in every token at a random slot,
 * `cold` in none, the other slots uniform over the remaining experts. Needs k < E. */
static int32_t *make_idx(gt_ctx *g, int N, int E, int k, int hot, int cold)
{
    int32_t *idx = xmalloc((size_t)N * k * sizeof *idx);
    for (int i = 0; i < N; i++) {
        int32_t *ii = idx + (size_t)i * k;
        int32_t *slot = gt_rand_int(g, 1, 0, k);
        for (int j = 0; j < k; j++) ii[j] = -1;
        ii[slot[0]] = hot;
        free(slot);
        for (int j = 0; j < k; j++) {
            if (ii[j] >= 0) continue;
            for (;;) {
                int32_t *c = gt_rand_int(g, 1, 0, E);
                int e = c[0], dup = e == hot || e == cold;
                free(c);
                for (int l = 0; l < k && !dup; l++) dup = ii[l] == e;
                if (!dup) {
                    ii[j] = e;
                    break;
                }
            }
        }
    }
    return idx;
}

/* the [g | u] (2h) part of each row of save [N*k, 3h] */
static void save_pre(const float *save, size_t rows, int h, float *pre)
{
    for (size_t r = 0; r < rows; r++) memcpy(pre + r * 2 * h, save + r * 3 * h, (size_t)2 * h * sizeof *pre);
}

static void test_experts(gt_ctx *g, int N, int E, int k, int in, int h, int out)
{
    const size_t nk = (size_t)N * k, nx = (size_t)N * in, ny = (size_t)N * out;
    const size_t nw1 = (size_t)E * in * 2 * h, nw2 = (size_t)E * h * out, ns = nk * 3 * h;
    const int hot = E / 2, cold = (hot + 1) % E; /* distinct for E >= 2; make_idx needs k < E */
    char name[160], what[256];
    snprintf(name, sizeof name, "moe_experts N=%d E=%d k=%d in=%d h=%d out=%d", N, E, k, in, h, out);

    int32_t *idx = make_idx(g, N, E, k, hot, cold);
    float *x = gt_rand(g, nx, -1.f, 1.f);
    float *gate = gt_rand(g, nk, 0.05f, 1.f);
    const float a1 = 1.f / sqrtf((float)in), a2 = 1.f / sqrtf((float)h);
    float *w1 = gt_rand(g, nw1, -a1, a1), *w2 = gt_rand(g, nw2, -a2, a2);

    /* forward */
    float *y_c = xmalloc(ny * sizeof *y_c), *save_c = xmalloc(ns * sizeof *save_c);
    g->cpu->moe_experts_forward(y_c, save_c, x, idx, gate, w1, w2, N, E, k, in, h, out);

    int32_t *d_idx = gt_up_int(g, idx, nk);
    float *d_x = gt_up(g, x, nx), *d_gate = gt_up(g, gate, nk), *d_w1 = gt_up(g, w1, nw1), *d_w2 = gt_up(g, w2, nw2);
    float *d_y = g->gpu->alloc(ny * sizeof(float)), *d_save = g->gpu->alloc(ns * sizeof(float));
    float *y_g[2], *save_g[2];
    for (int run = 0; run < 2; run++) {
        gt_poison(g, d_y, ny);
        gt_poison(g, d_save, ns);
        g->gpu->moe_experts_forward(d_y, d_save, d_x, d_idx, d_gate, d_w1, d_w2, N, E, k, in, h, out);
        g->gpu->sync();
        y_g[run] = gt_down(g, d_y, ny);
        save_g[run] = gt_down(g, d_save, ns);
    }
    snprintf(what, sizeof what, "%s: forward y", name);
    compare_at(what, y_g[0], y_c, ny, out, GT_TOL_BF16);
    {
        /* CUDA's save holds [g | u] of each row (backend.h): that part is compared */
        float *pg[2], *pc = xmalloc(nk * 2 * h * sizeof *pc);
        for (int run = 0; run < 2; run++) {
            pg[run] = xmalloc(nk * 2 * h * sizeof *pg[run]);
            save_pre(save_g[run], nk, h, pg[run]);
        }
        save_pre(save_c, nk, h, pc);
        snprintf(what, sizeof what, "%s: forward save [g|u] (row = token*k + slot)", name);
        compare_at(what, pg[0], pc, nk * 2 * h, 2 * h, GT_TOL_BF16);
        snprintf(what, sizeof what, "%s: forward deterministic (save [g|u])", name);
        gt_same_bits(what, pg[0], pg[1], nk * 2 * h * sizeof(float));
        free(pg[0]);
        free(pg[1]);
        free(pc);
    }
    snprintf(what, sizeof what, "%s: forward deterministic (y)", name);
    gt_same_bits(what, y_g[0], y_g[1], ny * sizeof(float));

    /* backward, from the CPU's save, accumulating into random starting values */
    float *dyv = gt_rand(g, ny, -1.f, 1.f);
    float *dx0 = gt_rand(g, nx, -1.f, 1.f), *dgate0 = gt_rand(g, nk, -1.f, 1.f);
    float *dw10 = gt_rand(g, nw1, -1.f, 1.f), *dw20 = gt_rand(g, nw2, -1.f, 1.f);
    float *dx_c = gt_host_copy(dx0, nx), *dgate_c = gt_host_copy(dgate0, nk);
    float *dw1_c = gt_host_copy(dw10, nw1), *dw2_c = gt_host_copy(dw20, nw2);
    g->cpu->moe_experts_backward(dx_c, dgate_c, dw1_c, dw2_c, dyv, save_c, x, idx, gate, w1, w2, N, E, k, in, h,
                                 out);

    float *d_dy = gt_up(g, dyv, ny), *d_save_c = gt_up(g, save_c, ns);
    float *d_dx = g->gpu->alloc(nx * sizeof(float)), *d_dgate = g->gpu->alloc(nk * sizeof(float));
    float *d_dw1 = g->gpu->alloc(nw1 * sizeof(float)), *d_dw2 = g->gpu->alloc(nw2 * sizeof(float));
    float *dx_g[2], *dgate_g[2], *dw1_g[2], *dw2_g[2];
    for (int run = 0; run < 2; run++) {
        g->gpu->from_host(d_dx, dx0, nx * sizeof(float));
        g->gpu->from_host(d_dgate, dgate0, nk * sizeof(float));
        g->gpu->from_host(d_dw1, dw10, nw1 * sizeof(float));
        g->gpu->from_host(d_dw2, dw20, nw2 * sizeof(float));
        g->gpu->moe_experts_backward(d_dx, d_dgate, d_dw1, d_dw2, d_dy, d_save_c, d_x, d_idx, d_gate, d_w1, d_w2, N,
                                     E, k, in, h, out);
        g->gpu->sync();
        dx_g[run] = gt_down(g, d_dx, nx);
        dgate_g[run] = gt_down(g, d_dgate, nk);
        dw1_g[run] = gt_down(g, d_dw1, nw1);
        dw2_g[run] = gt_down(g, d_dw2, nw2);
    }
    snprintf(what, sizeof what, "%s: backward dx increment", name);
    compare_delta(what, dx_g[0], dx_c, dx0, nx, in, GT_TOL_BF16);
    snprintf(what, sizeof what, "%s: backward dgate increment", name);
    compare_delta(what, dgate_g[0], dgate_c, dgate0, nk, k, GT_TOL_BF16);
    snprintf(what, sizeof what, "%s: backward dw1 increment (row = expert*in + input)", name);
    compare_delta(what, dw1_g[0], dw1_c, dw10, nw1, 2 * h, GT_TOL_BF16);
    snprintf(what, sizeof what, "%s: backward dw2 increment (row = expert*h + unit)", name);
    compare_delta(what, dw2_g[0], dw2_c, dw20, nw2, out, GT_TOL_BF16);
    {
        /* the overloaded expert alone (all N tokens: the longest GEMM reduction) */
        const size_t o1 = (size_t)hot * in * 2 * h, o2 = (size_t)hot * h * out;
        snprintf(what, sizeof what, "%s: backward dw1 increment of the expert every token uses (%d)", name, hot);
        compare_delta(what, dw1_g[0] + o1, dw1_c + o1, dw10 + o1, (size_t)in * 2 * h, 2 * h, GT_TOL_BF16);
        snprintf(what, sizeof what, "%s: backward dw2 increment of the expert every token uses (%d)", name, hot);
        compare_delta(what, dw2_g[0] + o2, dw2_c + o2, dw20 + o2, (size_t)h * out, out, GT_TOL_BF16);
    }
    {
        const size_t o1 = (size_t)cold * in * 2 * h, o2 = (size_t)cold * h * out;
        int same = !memcmp(dw1_g[0] + o1, dw10 + o1, (size_t)in * 2 * h * sizeof(float)) &&
                   !memcmp(dw2_g[0] + o2, dw20 + o2, (size_t)h * out * sizeof(float));
        snprintf(what, sizeof what, "%s: backward leaves dw1/dw2 of the unused expert (%d) untouched", name, cold);
        gt_report(what, same, "bitwise");
    }
    snprintf(what, sizeof what, "%s: backward deterministic (dx)", name);
    gt_same_bits(what, dx_g[0], dx_g[1], nx * sizeof(float));
    snprintf(what, sizeof what, "%s: backward deterministic (dgate)", name);
    gt_same_bits(what, dgate_g[0], dgate_g[1], nk * sizeof(float));
    snprintf(what, sizeof what, "%s: backward deterministic (dw1)", name);
    gt_same_bits(what, dw1_g[0], dw1_g[1], nw1 * sizeof(float));
    snprintf(what, sizeof what, "%s: backward deterministic (dw2)", name);
    gt_same_bits(what, dw2_g[0], dw2_g[1], nw2 * sizeof(float));

    for (int run = 0; run < 2; run++) {
        free(y_g[run]);
        free(save_g[run]);
        free(dx_g[run]);
        free(dgate_g[run]);
        free(dw1_g[run]);
        free(dw2_g[run]);
    }
    g->gpu->free(d_idx);
    g->gpu->free(d_x);
    g->gpu->free(d_gate);
    g->gpu->free(d_w1);
    g->gpu->free(d_w2);
    g->gpu->free(d_y);
    g->gpu->free(d_save);
    g->gpu->free(d_dy);
    g->gpu->free(d_save_c);
    g->gpu->free(d_dx);
    g->gpu->free(d_dgate);
    g->gpu->free(d_dw1);
    g->gpu->free(d_dw2);
    free(idx);
    free(x);
    free(gate);
    free(w1);
    free(w2);
    free(y_c);
    free(save_c);
    free(dyv);
    free(dx0);
    free(dgate0);
    free(dw10);
    free(dw20);
    free(dx_c);
    free(dgate_c);
    free(dw1_c);
    free(dw2_c);
}

/* Routing loads summed on the device and the router-bias update, GPU vs CPU: exact. */
static void test_bias_update(gt_ctx *g, int rows, int E, int k, int64_t tokens)
{
    size_t n = (size_t)rows * E;
    int32_t *l1 = gt_rand_int(g, n, 0, (int32_t)(2 * tokens * k / E + 2));
    int32_t *l2 = gt_rand_int(g, n, 0, (int32_t)(2 * tokens * k / E + 2));
    float *b = gt_rand(g, n, -1, 1);
    int32_t *d_l = gt_up_int(g, l1, n), *d_l2 = gt_up_int(g, l2, n);
    float *d_b = gt_up(g, b, n);
    g->gpu->add_i32(d_l, d_l2, n);
    g->cpu->add_i32(l1, l2, n);
    g->gpu->router_bias_update(d_b, d_l, rows, E, tokens, k, 0.001f);
    g->cpu->router_bias_update(b, l1, rows, E, tokens, k, 0.001f);
    int32_t *gl = malloc(n * sizeof *gl);
    g->gpu->to_host(gl, d_l, n * sizeof *gl);
    float *gb = gt_down(g, d_b, n);
    char what[128];
    snprintf(what, sizeof what, "add_i32 of routing loads, %d x %d", rows, E);
    gt_same_bits(what, gl, l1, n * sizeof *gl);
    snprintf(what, sizeof what, "router_bias_update %d x %d, %lld tokens, k %d", rows, E, (long long)tokens, k);
    gt_same_bits(what, gb, b, n * sizeof *gb);
    free(l1);
    free(l2);
    free(b);
    free(gl);
    free(gb);
    g->gpu->free(d_l);
    g->gpu->free(d_l2);
    g->gpu->free(d_b);
}

int main(void)
{
    gt_ctx g;
    gt_init(&g, 0x6d6f65ULL);

    test_route(&g, 7, 8, 2, 1, 0);
    test_route(&g, 16384, 128, 12, 0, 1);
    test_route(&g, 1000, 32, 3, 0, 1);

    test_experts(&g, 7, 5, 2, 13, 6, 11);
    test_experts(&g, 2048, 128, 12, 256, 256, 256);
    test_experts(&g, 512, 32, 3, 1024, 1024, 1024);

    test_bias_update(&g, 4, 128, 12, 16384);
    test_bias_update(&g, 3, 8, 2, 9);

    printf("%s: %d failure(s)\n", gt_failures() ? "FAIL" : "PASS", gt_failures());
    return gt_failures() != 0;
}
