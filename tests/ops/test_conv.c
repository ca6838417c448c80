/* test_conv.c: checks of the CPU short causal depthwise convolution (kernel 4, bias),
 * without and with document starts.
 *
 * The forward is compared with the definition; with doc_start it must equal running
 * the op on each document segment on its own (nothing leaks across a boundary). Every
 * gradient (dx, dw, dbias) is compared with central finite differences of
 * L = sum(y * R), with the gradient buffers prefilled with GRAD_FILL and that value
 * removed afterwards so that a backward which overwrites fails. The document starts
 * include one at t = 0, adjacent starts, and a start in the last step.
 */
#include "cpu_ops.h"
#include "gradcheck.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FD_STEP 1e-6
#define FD_TOL 1e-6
#define EXACT_TOL 1e-12
#define GRAD_FILL 0.375

static uint64_t rng = 0x13198a2e03707344ULL;

static double *fresh(size_t n, double lo, double hi)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "test_conv: out of memory\n");
        exit(2);
    }
    gc_fill(p, n, &rng, lo, hi);
    return p;
}

static void unfill(double *g, size_t n)
{
    for (size_t i = 0; i < n; i++) g[i] -= GRAD_FILL;
}

static void prefill(double *g, size_t n)
{
    for (size_t i = 0; i < n; i++) g[i] = GRAD_FILL;
}

struct conv_ctx {
    double *x, *w, *bias, *y, *r;
    const int32_t *doc;
    int B, T, C;
};

static double conv_loss(void *p)
{
    struct conv_ctx *c = p;
    cpu_conv_forward(c->y, c->x, c->w, c->bias, c->doc, c->B, c->T, c->C);
    return gc_dot(c->y, c->r, (size_t)c->B * c->T * c->C);
}

/* y from the definition without document starts */
static void conv_direct(double *y, const double *x, const double *w, const double *bias,
                        int B, int T, int C)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                double s = bias[c];
                for (int k = 0; k < 4; k++) {
                    int u = t - 3 + k;
                    if (u >= 0) s += w[c * 4 + k] * x[((size_t)b * T + u) * C + c];
                }
                y[((size_t)b * T + t) * C + c] = s;
            }
}

/* y of every document segment run as its own sequence (B = 1, no doc_start) */
static void conv_by_segments(double *y, const double *x, const double *w, const double *bias,
                             const int32_t *doc, int B, int T, int C)
{
    for (int b = 0; b < B; b++) {
        int s0 = 0;
        for (int t = 1; t <= T; t++) {
            if (t < T && !doc[b * T + t]) continue;
            size_t off = ((size_t)b * T + s0) * C;
            cpu_conv_forward(y + off, x + off, w, bias, NULL, 1, t - s0, C);
            s0 = t;
        }
    }
}

static void test_conv(int B, int T, int C, const int32_t *doc)
{
    char what[128];
    const char *tag = doc ? "with doc_start" : "no doc_start";
    size_t nx = (size_t)B * T * C;
    struct conv_ctx c = {fresh(nx, -1, 1), fresh((size_t)C * 4, -0.5, 0.5), fresh(C, -0.5, 0.5),
                         fresh(nx, 0, 1), fresh(nx, -1, 1), doc, B, T, C};

    double *ref = fresh(nx, 0, 1);
    if (doc)
        conv_by_segments(ref, c.x, c.w, c.bias, doc, B, T, C);
    else
        conv_direct(ref, c.x, c.w, c.bias, B, T, C);
    conv_loss(&c);
    snprintf(what, sizeof what, "conv forward %s (B=%d T=%d C=%d) %s", tag, B, T, C,
             doc ? "equals each document run alone" : "matches the definition");
    gc_compare(what, c.y, ref, nx, EXACT_TOL);

    double *dx = fresh(nx, 0, 1), *dw = fresh((size_t)C * 4, 0, 1), *db = fresh(C, 0, 1);
    prefill(dx, nx);
    prefill(dw, (size_t)C * 4);
    prefill(db, C);
    cpu_conv_backward(dx, dw, db, c.r, c.x, c.w, doc, B, T, C);
    unfill(dx, nx);
    unfill(dw, (size_t)C * 4);
    unfill(db, C);

    double *num = fresh(nx, 0, 1);
    gc_numeric(conv_loss, &c, c.x, nx, FD_STEP, num);
    snprintf(what, sizeof what, "conv dx %s accumulates and matches FD (B=%d T=%d C=%d)", tag, B, T, C);
    gc_compare(what, dx, num, nx, FD_TOL);
    gc_numeric(conv_loss, &c, c.w, (size_t)C * 4, FD_STEP, num);
    snprintf(what, sizeof what, "conv dw %s accumulates and matches FD (B=%d T=%d C=%d)", tag, B, T, C);
    gc_compare(what, dw, num, (size_t)C * 4, FD_TOL);
    gc_numeric(conv_loss, &c, c.bias, C, FD_STEP, num);
    snprintf(what, sizeof what, "conv dbias %s accumulates and matches FD (B=%d T=%d C=%d)", tag, B, T, C);
    gc_compare(what, db, num, C, FD_TOL);

    free(c.x); free(c.w); free(c.bias); free(c.y); free(c.r); free(ref);
    free(dx); free(dw); free(db); free(num);
}

/* The same bits with 1 and 3 threads, at a size large enough to run in parallel. */
static void test_threads(void)
{
    enum { B = 3, T = 67, C = 200 };
    size_t nx = (size_t)B * T * C;
    int32_t doc[B * T];
    for (int i = 0; i < B * T; i++) doc[i] = gc_uniform(&rng) < 0.1;
    double *x = fresh(nx, -1, 1), *w = fresh((size_t)C * 4, -0.5, 0.5), *bias = fresh(C, -0.5, 0.5);
    double *dy = fresh(nx, -1, 1);
    double *y[2], *dx[2], *dw[2], *db[2];
    int threads = omp_get_max_threads();
    for (int run = 0; run < 2; run++) {
        y[run] = fresh(nx, 0, 1);
        dx[run] = fresh(nx, 0, 1);
        dw[run] = fresh((size_t)C * 4, 0, 1);
        db[run] = fresh(C, 0, 1);
        prefill(dx[run], nx);
        prefill(dw[run], (size_t)C * 4);
        prefill(db[run], C);
        omp_set_num_threads(run ? 3 : 1);
        cpu_conv_forward(y[run], x, w, bias, doc, B, T, C);
        cpu_conv_backward(dx[run], dw[run], db[run], dy, x, w, doc, B, T, C);
    }
    omp_set_num_threads(threads);
    int same = memcmp(y[0], y[1], nx * sizeof(double)) == 0 &&
               memcmp(dx[0], dx[1], nx * sizeof(double)) == 0 &&
               memcmp(dw[0], dw[1], (size_t)C * 4 * sizeof(double)) == 0 &&
               memcmp(db[0], db[1], C * sizeof(double)) == 0;
    gc_report("conv bit-identical with 1 and 3 threads (B=3 T=67 C=200, doc_start)", same, NULL);
    free(x); free(w); free(bias); free(dy);
    for (int run = 0; run < 2; run++) {
        free(y[run]); free(dx[run]); free(dw[run]); free(db[run]);
    }
}

int main(void)
{
    enum { B = 2, T = 11, C = 13 };
    test_conv(B, T, C, NULL);
    /* row 0: starts at 0, 4, 5 (adjacent) and 10 (last step); row 1: one start at 2 */
    int32_t doc[B * T] = {1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1,
                          0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0};
    test_conv(B, T, C, doc);
    /* a channel count spanning two blocks of the parameter gradients */
    int32_t doc3[3 * 7] = {0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    test_conv(3, 7, 70, doc3);
    test_threads();
    return gc_failures() != 0;
}
