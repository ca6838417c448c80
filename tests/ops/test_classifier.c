/* test_classifier.c: checks of the CPU tied head + cross-entropy.
 *
 * The forward (loss and saved lse) is compared with a direct computation from the full
 * logits, with some targets set to the ignore index -100. The backward is compared
 * with central finite differences of L = dloss_scale * sum_i loss_i for dh and dwte,
 * with the gradient buffers prefilled with GRAD_FILL and that value removed afterwards
 * so that a backward which overwrites fails. A vocabulary large enough that the op
 * splits the rows into several blocks is checked against the direct dense gradients
 * instead (finite differences over it would be too slow), and both sizes are checked
 * to give the same bits with 1 and 3 threads.
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
#define IGNORE (-100)

static uint64_t rng = 0xa4093822299f31d0ULL;

static double *fresh(size_t n, double lo, double hi)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "test_classifier: out of memory\n");
        exit(2);
    }
    gc_fill(p, n, &rng, lo, hi);
    return p;
}

static void prefill(double *g, size_t n)
{
    for (size_t i = 0; i < n; i++) g[i] = GRAD_FILL;
}

static void unfill(double *g, size_t n)
{
    for (size_t i = 0; i < n; i++) g[i] -= GRAD_FILL;
}

/* targets in [0, V) with every row i where ignore_every divides i + 1 set to -100 */
static int32_t *make_targets(int N, int V, int ignore_every)
{
    int32_t *t = malloc((size_t)N * sizeof *t);
    if (!t) exit(2);
    for (int i = 0; i < N; i++)
        t[i] = (i + 1) % ignore_every == 0 ? IGNORE : (int32_t)(gc_uniform(&rng) * V);
    return t;
}

/* Direct dense reference: loss, lse [N], and when dh/dwte are non-NULL the gradients of
 * scale * sum(loss) written (not accumulated) into dh [N, C], dwte [V, C]. */
static void direct(double *loss, double *lse, double *dh, double *dwte, const double *h,
                   const double *wte, const int32_t *tg, double scale, int N, int V, int C)
{
    double *z = fresh(V, 0, 1);
    if (dh) memset(dh, 0, (size_t)N * C * sizeof *dh);
    if (dwte) memset(dwte, 0, (size_t)V * C * sizeof *dwte);
    for (int i = 0; i < N; i++) {
        const double *hi = h + (size_t)i * C;
        double mx = -INFINITY;
        for (int v = 0; v < V; v++) {
            double s = 0;
            for (int c = 0; c < C; c++) s += hi[c] * wte[(size_t)v * C + c];
            z[v] = s;
            if (s > mx) mx = s;
        }
        double se = 0;
        for (int v = 0; v < V; v++) se += exp(z[v] - mx);
        lse[i] = mx + log(se);
        loss[i] = tg[i] == IGNORE ? 0 : lse[i] - z[tg[i]];
        if (!dh || tg[i] == IGNORE) continue;
        for (int v = 0; v < V; v++) {
            double d = scale * (exp(z[v] - lse[i]) - (v == tg[i]));
            for (int c = 0; c < C; c++) {
                dh[(size_t)i * C + c] += d * wte[(size_t)v * C + c];
                dwte[(size_t)v * C + c] += d * hi[c];
            }
        }
    }
    free(z);
}

struct cls_ctx {
    double *h, *wte, *loss, *lse;
    const int32_t *tg;
    double scale;
    int N, V, C;
};

static double cls_loss(void *p)
{
    struct cls_ctx *c = p;
    cpu_classifier_forward(c->loss, c->lse, c->h, c->wte, c->tg, c->N, c->V, c->C);
    double s = 0;
    for (int i = 0; i < c->N; i++) s += c->loss[i];
    return c->scale * s;
}

/* forward against the dense reference, backward against finite differences */
static void test_small(void)
{
    enum { N = 7, V = 37, C = 13 };
    const double scale = 0.7;
    int32_t *tg = make_targets(N, V, 3);
    struct cls_ctx c = {fresh((size_t)N * C, -1, 1), fresh((size_t)V * C, -1, 1), fresh(N, 0, 1),
                        fresh(N, 0, 1), tg, scale, N, V, C};

    double *loss_ref = fresh(N, 0, 1), *lse_ref = fresh(N, 0, 1);
    direct(loss_ref, lse_ref, NULL, NULL, c.h, c.wte, tg, scale, N, V, C);
    cls_loss(&c);
    gc_compare("classifier forward loss matches full logits (N=7 V=37 C=13, 2 ignored)", c.loss,
               loss_ref, N, EXACT_TOL);
    gc_compare("classifier forward lse matches full logits", c.lse, lse_ref, N, EXACT_TOL);
    int zero = 1;
    for (int i = 0; i < N; i++)
        if (tg[i] == IGNORE) zero &= c.loss[i] == 0;
    gc_report("classifier loss is exactly 0 on ignored rows", zero, NULL);

    double *dh = fresh((size_t)N * C, 0, 1), *dwte = fresh((size_t)V * C, 0, 1);
    prefill(dh, (size_t)N * C);
    prefill(dwte, (size_t)V * C);
    cpu_classifier_backward(dh, dwte, c.h, c.wte, tg, c.lse, scale, N, V, C);
    unfill(dh, (size_t)N * C);
    unfill(dwte, (size_t)V * C);

    double *num = fresh((size_t)V * C, 0, 1);
    gc_numeric(cls_loss, &c, c.h, (size_t)N * C, FD_STEP, num);
    gc_compare("classifier dh accumulates and matches FD of scale * sum(loss)", dh, num,
               (size_t)N * C, FD_TOL);
    gc_numeric(cls_loss, &c, c.wte, (size_t)V * C, FD_STEP, num);
    gc_compare("classifier dwte accumulates and matches FD of scale * sum(loss)", dwte, num,
               (size_t)V * C, FD_TOL);

    free(c.h); free(c.wte); free(c.loss); free(c.lse); free(tg);
    free(loss_ref); free(lse_ref); free(dh); free(dwte); free(num);
}

/* Forward and backward with the given thread count, gradients from GRAD_FILL. */
static void run(int threads, double *loss, double *lse, double *dh, double *dwte, const double *h,
                const double *wte, const int32_t *tg, double scale, int N, int V, int C)
{
    int keep = omp_get_max_threads();
    omp_set_num_threads(threads);
    cpu_classifier_forward(loss, lse, h, wte, tg, N, V, C);
    prefill(dh, (size_t)N * C);
    prefill(dwte, (size_t)V * C);
    cpu_classifier_backward(dh, dwte, h, wte, tg, lse, scale, N, V, C);
    omp_set_num_threads(keep);
}

/* Against the dense reference at a size that spans several row blocks; bit-identical
 * with 1 and 3 threads. */
static void test_blocks(int N, int V, int C)
{
    const double scale = 1.0 / N;
    char what[160];
    int32_t *tg = make_targets(N, V, 5);
    double *h = fresh((size_t)N * C, -1, 1), *wte = fresh((size_t)V * C, -1, 1);
    double *loss1 = fresh(N, 0, 1), *lse1 = fresh(N, 0, 1), *dh1 = fresh((size_t)N * C, 0, 1),
           *dwte1 = fresh((size_t)V * C, 0, 1);
    double *loss3 = fresh(N, 0, 1), *lse3 = fresh(N, 0, 1), *dh3 = fresh((size_t)N * C, 0, 1),
           *dwte3 = fresh((size_t)V * C, 0, 1);
    double *loss_ref = fresh(N, 0, 1), *lse_ref = fresh(N, 0, 1), *dh_ref = fresh((size_t)N * C, 0, 1),
           *dwte_ref = fresh((size_t)V * C, 0, 1);

    run(1, loss1, lse1, dh1, dwte1, h, wte, tg, scale, N, V, C);
    run(3, loss3, lse3, dh3, dwte3, h, wte, tg, scale, N, V, C);
    direct(loss_ref, lse_ref, dh_ref, dwte_ref, h, wte, tg, scale, N, V, C);
    unfill(dh1, (size_t)N * C);
    unfill(dwte1, (size_t)V * C);
    unfill(dh3, (size_t)N * C);
    unfill(dwte3, (size_t)V * C);

    snprintf(what, sizeof what, "classifier loss matches full logits (N=%d V=%d C=%d)", N, V, C);
    gc_compare(what, loss1, loss_ref, N, EXACT_TOL);
    snprintf(what, sizeof what, "classifier lse matches full logits (N=%d V=%d C=%d)", N, V, C);
    gc_compare(what, lse1, lse_ref, N, EXACT_TOL);
    snprintf(what, sizeof what, "classifier dh accumulates and matches dense gradient (N=%d V=%d C=%d)",
             N, V, C);
    gc_compare(what, dh1, dh_ref, (size_t)N * C, EXACT_TOL);
    snprintf(what, sizeof what, "classifier dwte accumulates and matches dense gradient (N=%d V=%d C=%d)",
             N, V, C);
    gc_compare(what, dwte1, dwte_ref, (size_t)V * C, EXACT_TOL);
    int same = memcmp(loss1, loss3, N * sizeof(double)) == 0 &&
               memcmp(lse1, lse3, N * sizeof(double)) == 0 &&
               memcmp(dh1, dh3, (size_t)N * C * sizeof(double)) == 0 &&
               memcmp(dwte1, dwte3, (size_t)V * C * sizeof(double)) == 0;
    snprintf(what, sizeof what, "classifier bit-identical with 1 and 3 threads (N=%d V=%d C=%d)", N, V, C);
    gc_report(what, same, NULL);

    free(tg); free(h); free(wte);
    free(loss1); free(lse1); free(dh1); free(dwte1);
    free(loss3); free(lse3); free(dh3); free(dwte3);
    free(loss_ref); free(lse_ref); free(dh_ref); free(dwte_ref);
}

int main(void)
{
    test_small();
    test_blocks(23, 37, 13);
    /* 2^22 / 104729 = 40 rows per block, so 93 rows run as blocks of 40, 40 and 13 */
    test_blocks(93, 104729, 3);
    return gc_failures() != 0;
}
