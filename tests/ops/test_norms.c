/* test_norms.c: checks of the CPU RMSNorm and LayerNorm.
 *
 * Forwards and their saved statistics are compared with direct transcriptions of the
 * definitions (RMSNorm eps 1e-6; LayerNorm eps 1e-5 with the biased variance); every
 * gradient (input, weight, bias) is compared with central finite differences of
 * L = sum(out * R), with the gradient buffers prefilled with GRAD_FILL and that value
 * removed afterwards so that a backward which overwrites fails. The channel count spans
 * more than one channel block of the parameter gradients, and inputs carry an offset
 * so that the LayerNorm mean matters. At a size large enough to run in parallel, both
 * norms must give the same bits with 1 and 3 threads.
 */
#include "cpu_ops.h"
#include "gradcheck.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FD_STEP 1e-6
#define FD_TOL 1e-6
#define EXACT_TOL 1e-12
#define GRAD_FILL 0.375

static uint64_t rng = 0x243f6a8885a308d3ULL;

static double *fresh(size_t n, double lo, double hi)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "test_norms: out of memory\n");
        exit(2);
    }
    gc_fill(p, n, &rng, lo, hi);
    return p;
}

static double *filled(size_t n, double value)
{
    double *p = fresh(n, 0, 1);
    for (size_t i = 0; i < n; i++) p[i] = value;
    return p;
}

static void unfill(double *g, size_t n)
{
    for (size_t i = 0; i < n; i++) g[i] -= GRAD_FILL;
}

struct norm_ctx {
    double *x, *w, *b, *out, *mean, *rstd, *r;
    int N, C;
    int layer; /* 0: RMSNorm, 1: LayerNorm */
};

static double norm_loss(void *p)
{
    struct norm_ctx *c = p;
    if (c->layer)
        cpu_layernorm_forward(c->out, c->mean, c->rstd, c->x, c->w, c->b, c->N, c->C);
    else
        cpu_rmsnorm_forward(c->out, c->rstd, c->x, c->w, c->N, c->C);
    return gc_dot(c->out, c->r, (size_t)c->N * c->C);
}

static void test_norm(int layer, int N, int C)
{
    const char *name = layer ? "layernorm" : "rmsnorm";
    char what[128];
    size_t nx = (size_t)N * C;
    struct norm_ctx c = {fresh(nx, -1.5, 2.5), fresh(C, 0.5, 1.5), fresh(C, -0.5, 0.5),
                         fresh(nx, 0, 1), fresh(N, 0, 1), fresh(N, 0, 1), fresh(nx, -1, 1),
                         N, C, layer};

    /* forward against the definition */
    double *ref = fresh(nx, 0, 1), *ref_mean = fresh(N, 0, 1), *ref_rstd = fresh(N, 0, 1);
    for (int i = 0; i < N; i++) {
        const double *xi = c.x + (size_t)i * C;
        double m = 0, v = 0;
        if (layer) {
            for (int k = 0; k < C; k++) m += xi[k];
            m /= C;
            for (int k = 0; k < C; k++) v += (xi[k] - m) * (xi[k] - m);
            v /= C;
            ref_rstd[i] = 1 / sqrt(v + 1e-5);
        } else {
            for (int k = 0; k < C; k++) v += xi[k] * xi[k];
            ref_rstd[i] = 1 / sqrt(v / C + 1e-6);
        }
        ref_mean[i] = m;
        for (int k = 0; k < C; k++)
            ref[(size_t)i * C + k] = layer ? (xi[k] - m) * ref_rstd[i] * c.w[k] + c.b[k]
                                           : c.w[k] * xi[k] * ref_rstd[i];
    }
    norm_loss(&c);
    snprintf(what, sizeof what, "%s forward (N=%d C=%d)", name, N, C);
    gc_compare(what, c.out, ref, nx, EXACT_TOL);
    snprintf(what, sizeof what, "%s saved rstd (N=%d C=%d)", name, N, C);
    gc_compare(what, c.rstd, ref_rstd, N, EXACT_TOL);
    if (layer) {
        snprintf(what, sizeof what, "%s saved mean (N=%d C=%d)", name, N, C);
        gc_compare(what, c.mean, ref_mean, N, EXACT_TOL);
    }

    /* backward: every gradient accumulates onto GRAD_FILL */
    double *dx = filled(nx, GRAD_FILL), *dw = filled(C, GRAD_FILL), *db = filled(C, GRAD_FILL);
    if (layer)
        cpu_layernorm_backward(dx, dw, db, c.r, c.x, c.w, c.mean, c.rstd, N, C);
    else
        cpu_rmsnorm_backward(dx, dw, c.r, c.x, c.w, c.rstd, N, C);
    unfill(dx, nx);
    unfill(dw, C);
    unfill(db, C);

    double *num = fresh(nx, 0, 1);
    gc_numeric(norm_loss, &c, c.x, nx, FD_STEP, num);
    snprintf(what, sizeof what, "%s dx accumulates and matches FD (N=%d C=%d)", name, N, C);
    gc_compare(what, dx, num, nx, FD_TOL);
    gc_numeric(norm_loss, &c, c.w, C, FD_STEP, num);
    snprintf(what, sizeof what, "%s dw accumulates and matches FD (N=%d C=%d)", name, N, C);
    gc_compare(what, dw, num, C, FD_TOL);
    if (layer) {
        gc_numeric(norm_loss, &c, c.b, C, FD_STEP, num);
        snprintf(what, sizeof what, "%s db accumulates and matches FD (N=%d C=%d)", name, N, C);
        gc_compare(what, db, num, C, FD_TOL);
    }

    free(c.x); free(c.w); free(c.b); free(c.out); free(c.mean); free(c.rstd); free(c.r);
    free(ref); free(ref_mean); free(ref_rstd); free(dx); free(dw); free(db); free(num);
}

/* forward and backward of one norm with the given thread count, gradients from
 * GRAD_FILL; out, dx [N, C], dw, db [C] */
static void run_norm(struct norm_ctx *c, int threads, double *out, double *dx, double *dw, double *db)
{
    size_t nx = (size_t)c->N * c->C;
    int keep = omp_get_max_threads();
    omp_set_num_threads(threads);
    norm_loss(c);
    memcpy(out, c->out, nx * sizeof *out);
    for (size_t i = 0; i < nx; i++) dx[i] = GRAD_FILL;
    for (int k = 0; k < c->C; k++) dw[k] = db[k] = GRAD_FILL;
    if (c->layer)
        cpu_layernorm_backward(dx, dw, db, c->r, c->x, c->w, c->mean, c->rstd, c->N, c->C);
    else
        cpu_rmsnorm_backward(dx, dw, c->r, c->x, c->w, c->rstd, c->N, c->C);
    omp_set_num_threads(keep);
}

/* The same bits with 1 and 3 threads, at a size large enough to run in parallel. */
static void test_threads(int layer, int N, int C)
{
    size_t nx = (size_t)N * C;
    struct norm_ctx c = {fresh(nx, -1.5, 2.5), fresh(C, 0.5, 1.5), fresh(C, -0.5, 0.5),
                         fresh(nx, 0, 1), fresh(N, 0, 1), fresh(N, 0, 1), fresh(nx, -1, 1),
                         N, C, layer};
    double *out1 = fresh(nx, 0, 1), *dx1 = fresh(nx, 0, 1), *dw1 = fresh(C, 0, 1), *db1 = fresh(C, 0, 1);
    double *out3 = fresh(nx, 0, 1), *dx3 = fresh(nx, 0, 1), *dw3 = fresh(C, 0, 1), *db3 = fresh(C, 0, 1);
    run_norm(&c, 1, out1, dx1, dw1, db1);
    run_norm(&c, 3, out3, dx3, dw3, db3);
    int same = memcmp(out1, out3, nx * sizeof *out1) == 0 && memcmp(dx1, dx3, nx * sizeof *dx1) == 0 &&
               memcmp(dw1, dw3, C * sizeof *dw1) == 0 && memcmp(db1, db3, C * sizeof *db1) == 0;
    char what[128];
    snprintf(what, sizeof what, "%s bit-identical with 1 and 3 threads (N=%d C=%d)",
             layer ? "layernorm" : "rmsnorm", N, C);
    gc_report(what, same, NULL);
    free(c.x); free(c.w); free(c.b); free(c.out); free(c.mean); free(c.rstd); free(c.r);
    free(out1); free(dx1); free(dw1); free(db1); free(out3); free(dx3); free(dw3); free(db3);
}

int main(void)
{
    test_norm(0, 7, 13);
    test_norm(0, 5, 70);
    test_norm(1, 7, 13);
    test_norm(1, 5, 70);
    test_threads(0, 61, 601);
    test_threads(1, 61, 601);
    return gc_failures() != 0;
}
