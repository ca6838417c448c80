/* test_moe.c: checks the mixture-of-experts ops of the CPU backend (src/cpu/cpu_moe.c),
 * built in double.
 *
 *   - route forward (idx, gate, counts, z-loss) against a direct rank-based
 *     transcription, for (E, k) in {5, 8} x {1, 3}, with a bias large enough to change
 *     the selection (checked), and exact ties resolved to the lower expert index;
 *   - route backward against finite differences of sum(gate * R) + dzloss * zloss, with
 *     logits drawn so that no selection is within 1e-3 of a tie (top-k cannot flip under
 *     the perturbation), and that it accumulates;
 *   - experts forward (y and the save layout) against a direct transcription, with one
 *     expert that every token picks and one that no token picks;
 *   - experts backward dx, dgate, dw1, dw2 against finite differences, accumulation, the
 *     unused expert's weight gradients left exactly untouched, and bit-identical results
 *     with 1 and 3 threads.
 */
#include "cpu_ops.h"
#include "gradcheck.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FD_H 1e-6
#define FD_TOL 1e-6
#define PREFILL 0.625 /* gradient buffers start here to check that backward accumulates */

static void *xalloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_moe: out of memory\n");
        exit(1);
    }
    return p;
}

static double *dalloc(size_t n) { return xalloc(n * sizeof(double)); }

static void dfill(double *p, size_t n, double v)
{
    for (size_t i = 0; i < n; i++) p[i] = v;
}

static void dsub(double *p, size_t n, double v)
{
    for (size_t i = 0; i < n; i++) p[i] -= v;
}

static double sig(double x) { return 1.0 / (1.0 + exp(-x)); }

/* ------------------------------------------------------------- router ----------- */

/* Direct router: expert e lands in slot rank(e) = #experts with a larger score, or an
 * equal score and a lower index; it is selected when rank(e) < k. */
static void route_direct(int32_t *idx, double *gate, int32_t *counts, double *zloss,
                         const double *z, const double *bias, int N, int E, int k, double zcoef)
{
    memset(counts, 0, (size_t)E * sizeof *counts);
    double zs = 0;
    for (int i = 0; i < N; i++) {
        const double *zi = z + (size_t)i * E;
        for (int e = 0; e < E; e++) {
            double se = sig(zi[e]) + bias[e];
            int rank = 0;
            for (int f = 0; f < E; f++) {
                double sf = sig(zi[f]) + bias[f];
                rank += sf > se || (sf == se && f < e);
            }
            if (rank < k) {
                idx[i * k + rank] = e;
                counts[e]++;
            }
        }
        double s = 0;
        for (int j = 0; j < k; j++) s += sig(zi[idx[i * k + j]]);
        for (int j = 0; j < k; j++) gate[i * k + j] = sig(zi[idx[i * k + j]]) / (s + 1e-9);
        double se = 0;
        for (int e = 0; e < E; e++) se += exp(zi[e]);
        zs += log(se) * log(se);
    }
    *zloss = zcoef * zs / N;
}

static int ints_equal(const int32_t *a, const int32_t *b, size_t n)
{
    return memcmp(a, b, n * sizeof *a) == 0;
}

static void test_route_forward(int E, int k, uint64_t *st)
{
    enum { N = 9 };
    const double zcoef = 0.01;
    double *z = dalloc((size_t)N * E), *bias = dalloc(E), *zero = dalloc(E);
    gc_fill(z, (size_t)N * E, st, -3, 3);
    gc_fill(bias, E, st, -0.4, 0.4);
    int32_t *idx = xalloc((size_t)N * k * sizeof *idx), *eidx = xalloc((size_t)N * k * sizeof *eidx);
    int32_t *cnt = xalloc((size_t)E * sizeof *cnt), *ecnt = xalloc((size_t)E * sizeof *ecnt);
    int32_t *idx0 = xalloc((size_t)N * k * sizeof *idx0);
    double *gate = dalloc((size_t)N * k), *egate = dalloc((size_t)N * k), *g0 = dalloc((size_t)N * k);
    double zl = 0, ezl = 0, zl0 = 0;
    for (int e = 0; e < E; e++) cnt[e] = -7; /* counts must be overwritten */
    cpu_moe_route_forward(idx, gate, cnt, &zl, z, bias, N, E, k, zcoef);
    route_direct(eidx, egate, ecnt, &ezl, z, bias, N, E, k, zcoef);
    char what[160], detail[96];
    snprintf(what, sizeof what, "moe_route_forward E=%d k=%d: idx equals direct top-k", E, k);
    gc_report(what, ints_equal(idx, eidx, (size_t)N * k), NULL);
    snprintf(what, sizeof what, "moe_route_forward E=%d k=%d: gate", E, k);
    gc_compare(what, gate, egate, (size_t)N * k, 1e-13);
    snprintf(what, sizeof what, "moe_route_forward E=%d k=%d: counts", E, k);
    gc_report(what, ints_equal(cnt, ecnt, E), NULL);
    snprintf(what, sizeof what, "moe_route_forward E=%d k=%d: z-loss", E, k);
    gc_compare(what, &zl, &ezl, 1, 1e-13);
    /* the bias must matter in this case, or the idx check above proves less */
    cpu_moe_route_forward(idx0, g0, cnt, &zl0, z, zero, N, E, k, zcoef);
    int changed = 0;
    for (int i = 0; i < N * k; i++) changed += idx0[i] != idx[i];
    snprintf(what, sizeof what, "moe_route_forward E=%d k=%d: bias changes the selection", E, k);
    snprintf(detail, sizeof detail, "%d of %d slots differ", changed, N * k);
    gc_report(what, changed > 0, detail);
    free(z), free(bias), free(zero), free(idx), free(eidx), free(cnt), free(ecnt), free(idx0);
    free(gate), free(egate), free(g0);
}

static void test_route_ties(void)
{
    enum { N = 3, E = 8, k = 3 };
    const double z[N * E] = {
        0.5, 1, 0.2, 1, -1, 1, 0.3, 0, /* three-way tie at the top: 1, 3, 5 */
        2, 2, 2, 2, 2, 2, 2, 2,         /* all equal: 0, 1, 2 */
        0, -1, 3, 0.25, 3, -2, 0.25, 3, /* tie at the top (2, 4, 7) */
    };
    const double bias[E] = {0};
    const int32_t want[N * k] = {1, 3, 5, 0, 1, 2, 2, 4, 7};
    int32_t idx[N * k], cnt[E];
    double gate[N * k], zl;
    cpu_moe_route_forward(idx, gate, cnt, &zl, z, bias, N, E, k, 0.001);
    gc_report("moe_route_forward: exact ties go to the lower expert index", ints_equal(idx, want, N * k), NULL);
    /* one slot less: the tie at the boundary must still pick the lower indices */
    int32_t idx2[N * 2], want2[N * 2] = {1, 3, 0, 1, 2, 4};
    double gate2[N * 2];
    cpu_moe_route_forward(idx2, gate2, cnt, &zl, z, bias, N, E, 2, 0.001);
    gc_report("moe_route_forward: ties at the k boundary go to the lower index", ints_equal(idx2, want2, N * 2), NULL);
}

typedef struct route_case {
    int N, E, k;
    double zcoef, dzloss;
    double *z, *bias, *r; /* r: cotangent of gate */
    int32_t *idx, *counts;
    double *gate;
} route_case;

static double route_loss(void *ctx)
{
    route_case *rc = ctx;
    double zl;
    cpu_moe_route_forward(rc->idx, rc->gate, rc->counts, &zl, rc->z, rc->bias, rc->N, rc->E, rc->k, rc->zcoef);
    return gc_dot(rc->gate, rc->r, (size_t)rc->N * rc->k) + rc->dzloss * zl;
}

/* score gap between the k-th and (k+1)-th largest aff+bias of a row (infinite if k = E) */
static double selection_gap(const double *zi, const double *bias, int E, int k)
{
    double gap = INFINITY;
    for (int e = 0; e < E; e++)
        for (int f = 0; f < E; f++) {
            double se = sig(zi[e]) + bias[e], sf = sig(zi[f]) + bias[f];
            int re = 0, rf = 0;
            for (int g = 0; g < E; g++) {
                double sg = sig(zi[g]) + bias[g];
                re += sg > se || (sg == se && g < e);
                rf += sg > sf || (sg == sf && g < f);
            }
            if (re == k - 1 && rf == k) gap = se - sf;
        }
    return gap;
}

static void test_route_backward(int E, int k, uint64_t *st)
{
    route_case rc = {.N = 6, .E = E, .k = k, .zcoef = 0.02, .dzloss = 1.7};
    size_t nz = (size_t)rc.N * E, ng = (size_t)rc.N * k;
    rc.z = dalloc(nz), rc.bias = dalloc(E), rc.r = dalloc(ng), rc.gate = dalloc(ng);
    rc.idx = xalloc(ng * sizeof *rc.idx), rc.counts = xalloc((size_t)E * sizeof *rc.counts);
    gc_fill(rc.bias, E, st, -0.3, 0.3);
    gc_fill(rc.r, ng, st, -1, 1);
    double min_gap = INFINITY;
    for (int i = 0; i < rc.N; i++) {
        double gap;
        do {
            gc_fill(rc.z + (size_t)i * E, E, st, -3, 3);
            gap = selection_gap(rc.z + (size_t)i * E, rc.bias, E, k);
        } while (gap < 1e-3);
        if (gap < min_gap) min_gap = gap;
    }
    double *dz = dalloc(nz), *num = dalloc(nz);
    route_loss(&rc);
    dfill(dz, nz, PREFILL);
    cpu_moe_route_backward(dz, rc.r, rc.dzloss, rc.z, rc.idx, rc.N, E, k, rc.zcoef);
    dsub(dz, nz, PREFILL);
    gc_numeric(route_loss, &rc, rc.z, nz, FD_H, num);
    char what[160];
    snprintf(what, sizeof what, "moe_route_backward E=%d k=%d: dz vs finite differences (min gap %.2g)", E, k, min_gap);
    gc_compare(what, dz, num, nz, FD_TOL);
    free(rc.z), free(rc.bias), free(rc.r), free(rc.gate), free(rc.idx), free(rc.counts), free(dz), free(num);
}

/* ------------------------------------------------------------ experts ----------- */

typedef struct experts_case {
    int N, E, k, in, h, out;
    int32_t *idx;
    double *x, *gate, *w1, *w2, *r; /* r: cotangent of y */
    double *y, *save;
} experts_case;

static double experts_loss(void *ctx)
{
    experts_case *ec = ctx;
    cpu_moe_experts_forward(ec->y, ec->save, ec->x, ec->idx, ec->gate, ec->w1, ec->w2, ec->N, ec->E,
                            ec->k, ec->in, ec->h, ec->out);
    return gc_dot(ec->y, ec->r, (size_t)ec->N * ec->out);
}

static void experts_backward(experts_case *ec, double *dx, double *dgate, double *dw1, double *dw2)
{
    experts_loss(ec);
    cpu_moe_experts_backward(dx, dgate, dw1, dw2, ec->r, ec->save, ec->x, ec->idx, ec->gate, ec->w1,
                             ec->w2, ec->N, ec->E, ec->k, ec->in, ec->h, ec->out);
}

static void test_experts(uint64_t *st)
{
    experts_case ec = {.N = 6, .E = 5, .k = 3, .in = 7, .h = 4, .out = 5};
    const int N = ec.N, E = ec.E, k = ec.k, in = ec.in, h = ec.h, out = ec.out;
    size_t nx = (size_t)N * in, ng = (size_t)N * k, n1 = (size_t)E * in * 2 * h, n2 = (size_t)E * h * out;
    ec.idx = xalloc(ng * sizeof *ec.idx);
    /* expert 0 in every token (overloaded), 1..3 rotating, expert 4 never used */
    for (int i = 0; i < N; i++) {
        ec.idx[i * k] = 0;
        ec.idx[i * k + 1] = 1 + i % 3;
        ec.idx[i * k + 2] = 1 + (i + 1) % 3;
    }
    ec.x = dalloc(nx), ec.gate = dalloc(ng), ec.w1 = dalloc(n1), ec.w2 = dalloc(n2);
    ec.r = dalloc((size_t)N * out), ec.y = dalloc((size_t)N * out), ec.save = dalloc(ng * 3 * h);
    gc_fill(ec.x, nx, st, -1, 1);
    gc_fill(ec.gate, ng, st, 0.1, 1);
    gc_fill(ec.w1, n1, st, -0.6, 0.6);
    gc_fill(ec.w2, n2, st, -0.6, 0.6);
    gc_fill(ec.r, (size_t)N * out, st, -1, 1);

    /* forward against a direct transcription of the formula */
    double *ey = dalloc((size_t)N * out), *esave = dalloc(ng * 3 * h);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < k; j++) {
            int e = ec.idx[i * k + j];
            double *sv = esave + ((size_t)i * k + j) * 3 * h;
            for (int c = 0; c < 2 * h; c++) {
                double s = 0;
                for (int r = 0; r < in; r++) s += ec.x[i * in + r] * ec.w1[((size_t)e * in + r) * 2 * h + c];
                sv[c] = s;
            }
            for (int m = 0; m < h; m++) sv[2 * h + m] = sv[m] * sig(sv[m]) * sv[h + m];
            for (int c = 0; c < out; c++) {
                double s = 0;
                for (int m = 0; m < h; m++) s += sv[2 * h + m] * ec.w2[((size_t)e * h + m) * out + c];
                ey[i * out + c] += ec.gate[i * k + j] * s;
            }
        }
    experts_loss(&ec);
    gc_compare("moe_experts_forward: y vs direct", ec.y, ey, (size_t)N * out, 1e-13);
    gc_compare("moe_experts_forward: save = [g | u | silu(g) u] per (token, slot)", ec.save, esave, ng * 3 * h, 1e-13);

    /* backward against finite differences */
    double *dx = dalloc(nx), *dgate = dalloc(ng), *dw1 = dalloc(n1), *dw2 = dalloc(n2), *num = dalloc(n1);
    dfill(dx, nx, PREFILL), dfill(dgate, ng, PREFILL), dfill(dw1, n1, PREFILL), dfill(dw2, n2, PREFILL);
    experts_backward(&ec, dx, dgate, dw1, dw2);
    int untouched = 1;
    for (size_t c = (size_t)4 * in * 2 * h; c < n1; c++) untouched &= dw1[c] == PREFILL;
    for (size_t c = (size_t)4 * h * out; c < n2; c++) untouched &= dw2[c] == PREFILL;
    gc_report("moe_experts_backward: unused expert's dw1, dw2 left exactly as they were", untouched, NULL);
    dsub(dx, nx, PREFILL), dsub(dgate, ng, PREFILL), dsub(dw1, n1, PREFILL), dsub(dw2, n2, PREFILL);
    gc_numeric(experts_loss, &ec, ec.x, nx, FD_H, num);
    gc_compare("moe_experts_backward: dx vs finite differences", dx, num, nx, FD_TOL);
    gc_numeric(experts_loss, &ec, ec.gate, ng, FD_H, num);
    gc_compare("moe_experts_backward: dgate vs finite differences", dgate, num, ng, FD_TOL);
    gc_numeric(experts_loss, &ec, ec.w1, n1, FD_H, num);
    gc_compare("moe_experts_backward: dw1 vs finite differences", dw1, num, n1, FD_TOL);
    gc_numeric(experts_loss, &ec, ec.w2, n2, FD_H, num);
    gc_compare("moe_experts_backward: dw2 vs finite differences", dw2, num, n2, FD_TOL);

    /* thread count must not change a bit */
    size_t nall = nx + ng + n1 + n2;
    double *g1 = dalloc(nall), *g3 = dalloc(nall);
    int keep = omp_get_max_threads();
    omp_set_num_threads(1);
    experts_backward(&ec, g1, g1 + nx, g1 + nx + ng, g1 + nx + ng + n1);
    omp_set_num_threads(3);
    experts_backward(&ec, g3, g3 + nx, g3 + nx + ng, g3 + nx + ng + n1);
    omp_set_num_threads(keep);
    gc_report("moe_experts_backward: bit-identical with 1 and 3 threads", memcmp(g1, g3, nall * sizeof *g1) == 0, NULL);

    free(ec.idx), free(ec.x), free(ec.gate), free(ec.w1), free(ec.w2), free(ec.r), free(ec.y), free(ec.save);
    free(ey), free(esave), free(dx), free(dgate), free(dw1), free(dw2), free(num), free(g1), free(g3);
}

/* The router-bias update against its definition: a load above tokens k / E lowers the
 * bias by rate, one below raises it, an exact one (compared in integers) leaves it; and
 * add_i32 sums loads. */
static void test_bias_update(void)
{
    const int rows = 2, E = 6, k = 2;
    const int64_t tokens = 9; /* expected load 9 * 2 / 6 = 3 exactly */
    int32_t loads[12] = {3, 4, 2, 0, 18, 3, 1, 3, 5, 3, 3, 0};
    real bias[12], want[12];
    for (int i = 0; i < rows * E; i++) {
        bias[i] = (real)(0.25 * i - 1.0);
        real sign = loads[i] > 3 ? 1 : (loads[i] < 3 ? -1 : 0);
        want[i] = bias[i] - (real)0.001 * sign;
    }
    cpu_router_bias_update(bias, loads, rows, E, tokens, k, (real)0.001);
    int ok = 1;
    for (int i = 0; i < rows * E; i++) ok &= bias[i] == want[i];
    gc_report("router_bias_update: over-loaded experts go down by rate, under-loaded up, exact loads stay", ok, "");
    /* 7 tokens, k 3, E 6: expected 3.5 is not an integer; 3 is below and 4 above */
    int32_t l2[6] = {3, 4, 3, 4, 0, 7};
    real b2[6] = {0, 0, 0, 0, 0, 0};
    cpu_router_bias_update(b2, l2, 1, 6, 7, 3, (real)0.5);
    gc_report("router_bias_update: a fractional expected load (3.5) is compared exactly",
              b2[0] == 0.5 && b2[1] == -0.5 && b2[2] == 0.5 && b2[3] == -0.5 && b2[4] == 0.5 && b2[5] == -0.5, "");
    int32_t y[5] = {1, 2, 3, 4, 5}, x[5] = {10, 0, -3, 7, 100};
    cpu_add_i32(y, x, 5);
    gc_report("add_i32 adds element by element", y[0] == 11 && y[1] == 2 && y[2] == 0 && y[3] == 11 && y[4] == 105, "");
}

int main(void)
{
    uint64_t st = 0x0e0e5eedULL;
    const int Es[2] = {5, 8}, ks[2] = {1, 3};
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) test_route_forward(Es[a], ks[b], &st);
    test_route_ties();
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) test_route_backward(Es[a], ks[b], &st);
    test_experts(&st);
    test_bias_update();
    return gc_failures() != 0;
}
