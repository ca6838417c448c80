/* test_gpu_optim.c: the optimizers of the CUDA backend (kernels/optim.cu) against the CPU
 * oracle (src/cpu/cpu_optim.c): AdamW, Muon on one matrix, and Muon batches (including
 * batches whose matrices lie interleaved in one buffer), three steps each from the same
 * random parameters and gradients. AdamW is elementwise: p, m, v are held to fp32 and
 * the step p - p0 to 1e-3 (see test_adamw); Muon's
 * Newton-Schulz runs on tensor cores (TF32, or fp16 scaled by 2^12 for matrices of 2^20
 * elements and more), so its update p - p0 is held to 2e-2 and its momentum buffer, which
 * is elementwise, to 1e-6. Every op runs twice and must reproduce its bits, and the
 * Newton-Schulz CUDA graphs must reproduce the direct launches' bits; grad_scale must give
 * the bits of gradients scaled beforehand (test_grad_scale). (Split from
 * test_gpu_dense.c, the dense layers' test.)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

/* kernels/cuda_ops.h (a C++-built header's C part): the graph switch and counter */
unsigned long long cuda_muon_graph_launches(void);
void cuda_set_graphs(int on);

static size_t fbytes(size_t n) { return n * sizeof(float); }

/* ---- optimizers ---- */

/* Three AdamW steps from fresh moments on n elements, new gradients each step. */
static void test_adamw(gt_ctx *g, size_t n)
{
    char name[256];
    const float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    float *p0 = gt_rand(g, n, -1, 1);
    float *p = gt_host_copy(p0, n), *m = xcalloc(n, sizeof(float)), *v = xcalloc(n, sizeof(float));
    /* two GPU copies of the state, stepped alike, for the determinism check */
    float *gp[2], *gm[2], *gv[2];
    for (int c = 0; c < 2; c++) {
        gp[c] = gt_up(g, p0, n);
        gm[c] = g->gpu->alloc(fbytes(n));
        gv[c] = g->gpu->alloc(fbytes(n));
    }
    float *g_d = g->gpu->alloc(fbytes(n));
    for (int step = 1; step <= 3; step++) {
        float *grad = gt_rand(g, n, -1, 1);
        g->cpu->adamw_update(p, grad, m, v, n, lr, beta1, beta2, eps, wd, step);
        g->gpu->from_host(g_d, grad, fbytes(n));
        for (int c = 0; c < 2; c++) g->gpu->adamw_update(gp[c], g_d, gm[c], gv[c], n, lr, beta1, beta2, eps, wd, step);
        free(grad);
    }
    float *hp[2], *hm[2], *hv[2];
    for (int c = 0; c < 2; c++) {
        hp[c] = gt_down(g, gp[c], n);
        hm[c] = gt_down(g, gm[c], n);
        hv[c] = gt_down(g, gv[c], n);
    }
    snprintf(name, sizeof name, "adamw_update n=%zu, 3 steps: p", n);
    gt_compare(name, hp[0], p, n, GT_TOL_FP32);
    snprintf(name, sizeof name, "adamw_update n=%zu, 3 steps: m", n);
    gt_compare(name, hm[0], m, n, GT_TOL_FP32);
    snprintf(name, sizeof name, "adamw_update n=%zu, 3 steps: v", n);
    gt_compare(name, hv[0], v, n, GT_TOL_FP32);
    /* The change p - p0 (about lr per step) isolates the step from the much larger p;
     * one rounding of p (~6e-8) is ~6e-5 of it, so float arithmetic lands near 1e-4. */
    float *dg = gt_diff(hp[0], p0, n), *dc = gt_diff(p, p0, n);
    snprintf(name, sizeof name, "adamw_update n=%zu, 3 steps: p - p0", n);
    gt_compare(name, dg, dc, n, 1e-3);
    snprintf(name, sizeof name, "adamw_update n=%zu, 3 steps: p, m, v deterministic", n);
    gt_report(name,
              !memcmp(hp[0], hp[1], fbytes(n)) && !memcmp(hm[0], hm[1], fbytes(n)) &&
                  !memcmp(hv[0], hv[1], fbytes(n)),
              "bitwise");

    for (int c = 0; c < 2; c++) {
        g->gpu->free(gp[c]);
        g->gpu->free(gm[c]);
        g->gpu->free(gv[c]);
        free(hp[c]), free(hm[c]), free(hv[c]);
    }
    g->gpu->free(g_d);
    free(p0), free(p), free(m), free(v), free(dg), free(dc);
}

/* A Muon test's checks on n floats after its steps: the GPU's update p - p0 (hp: its
 * parameters) against the CPU's (p) at 2e-2, its momentum buffers (hb) against the
 * CPU's (buf) at 1e-6; and, with hp2 and hb2 (a second GPU copy stepped alike), the
 * same bits twice. */
static void check_muon(const char *what, const float *hp, const float *hb, const float *hp2, const float *hb2,
                       const float *p, const float *p0, const float *buf, size_t n)
{
    char name[256];
    float *dgpu = gt_diff(hp, p0, n), *dcpu = gt_diff(p, p0, n);
    snprintf(name, sizeof name, "%s: p - p0", what);
    gt_compare(name, dgpu, dcpu, n, 2e-2);
    snprintf(name, sizeof name, "%s: momentum buffers", what);
    gt_compare(name, hb, buf, n, 1e-6);
    if (hp2) {
        snprintf(name, sizeof name, "%s: p, buf deterministic", what);
        gt_report(name, !memcmp(hp, hp2, fbytes(n)) && !memcmp(hb, hb2, fbytes(n)), "bitwise");
    }
    free(dgpu), free(dcpu);
}

/* The GPU side of a Muon test: `copies` copies (stepped alike, for the determinism and
 * lane checks) of the parameters p0 [all] and of zeroed momentum buffers, copy c at
 * gp[c] and gb[c]; a gradient buffer g_d [all] and work_floats of work. */
typedef struct muon_dev {
    float *gp[3], *gb[3], *g_d, *work_d;
    int copies;
} muon_dev;

static muon_dev muon_dev_alloc(gt_ctx *g, const float *p0, size_t all, size_t work_floats, int copies)
{
    muon_dev d = {.copies = copies};
    for (int c = 0; c < copies; c++) d.gp[c] = gt_up(g, p0, all), d.gb[c] = g->gpu->alloc(fbytes(all));
    d.g_d = g->gpu->alloc(fbytes(all));
    d.work_d = g->gpu->alloc(fbytes(work_floats));
    return d;
}

static void muon_dev_free(gt_ctx *g, muon_dev *d)
{
    for (int c = 0; c < d->copies; c++) g->gpu->free(d->gp[c]), g->gpu->free(d->gb[c]);
    g->gpu->free(d->g_d);
    g->gpu->free(d->work_d);
}

/* muon_update_batch's pointer arrays for count matrices of n floats each, matrix i at i n
 * of p, b and gr */
static void batch_ptrs(float **pp, float **bp, const float **gp, float *p, float *b, const float *gr, int count,
                       size_t n)
{
    for (int i = 0; i < count; i++) pp[i] = p + i * n, bp[i] = b + i * n, gp[i] = gr + i * n;
}

/* Three Muon steps on a [rows, cols] matrix from a zero momentum buffer. The GPU's
 * Newton-Schulz runs on tensor cores (TF32), the CPU's in fp32, so the update p - p0
 * is compared at 2e-2; the momentum buffer is elementwise and exact. The GPU work
 * buffer is NaN-poisoned before every step: the op must not read what it holds. */
static void test_muon(gt_ctx *g, int rows, int cols)
{
    char name[256];
    const float lr = 0.02f, mu = 0.95f, wd = 0.1f;
    const size_t n = (size_t)rows * cols, nwork = muon_work_floats(rows, cols);
    float *p0 = gt_rand(g, n, -0.1f, 0.1f);
    float *p = gt_host_copy(p0, n), *buf = xcalloc(n, sizeof(float)), *work = xmalloc(fbytes(nwork));
    muon_dev d = muon_dev_alloc(g, p0, n, nwork, 2);
    for (int step = 1; step <= 3; step++) {
        float *grad = gt_rand(g, n, -1, 1);
        g->cpu->muon_update(p, grad, buf, work, rows, cols, lr, mu, wd);
        g->gpu->from_host(d.g_d, grad, fbytes(n));
        for (int c = 0; c < 2; c++) {
            gt_poison(g, d.work_d, nwork);
            g->gpu->muon_update(d.gp[c], d.g_d, d.gb[c], d.work_d, rows, cols, lr, mu, wd);
        }
        free(grad);
    }
    float *hp[2], *hb[2];
    for (int c = 0; c < 2; c++) hp[c] = gt_down(g, d.gp[c], n), hb[c] = gt_down(g, d.gb[c], n);
    snprintf(name, sizeof name, "muon_update %dx%d, 3 steps", rows, cols);
    check_muon(name, hp[0], hb[0], hp[1], hb[1], p, p0, buf, n);

    for (int c = 0; c < 2; c++) free(hp[c]), free(hb[c]);
    muon_dev_free(g, &d);
    free(p0), free(p), free(buf), free(work);
}

/* Three Muon steps on `count` [rows, cols] matrices through muon_update_batch, against
 * the CPU's batch (count muon_update calls): the same checks as test_muon on all the
 * matrices at once, so a matrix updated with another's gradient, norm or momentum fails.
 * The work buffer is NaN-poisoned before every step. */
static void test_muon_batch(gt_ctx *g, int count, int rows, int cols)
{
    char name[256];
    const float lr = 0.02f, mu = 0.95f, wd = 0.1f;
    const size_t n = (size_t)rows * cols, all = (size_t)count * n;
    const size_t nwork = muon_batch_work_floats(count, rows, cols);
    float *p0 = gt_rand(g, all, -0.1f, 0.1f);
    float *p = gt_host_copy(p0, all), *buf = xcalloc(all, sizeof(float)), *work = xmalloc(fbytes(nwork));
    muon_dev d = muon_dev_alloc(g, p0, all, nwork, 2); /* matrix i at i n of each copy */
    float *hp_[MUON_BATCH_MAX], *hb_[MUON_BATCH_MAX], *dp[MUON_BATCH_MAX], *db[MUON_BATCH_MAX];
    const float *hg_[MUON_BATCH_MAX], *dg_[MUON_BATCH_MAX];
    for (int step = 1; step <= 3; step++) {
        float *grad = gt_rand(g, all, -1, 1);
        batch_ptrs(hp_, hb_, hg_, p, buf, grad, count, n);
        g->cpu->muon_update_batch(hp_, hg_, hb_, work, count, rows, cols, lr, mu, wd);
        g->gpu->from_host(d.g_d, grad, fbytes(all));
        for (int c = 0; c < 2; c++) {
            batch_ptrs(dp, db, dg_, d.gp[c], d.gb[c], d.g_d, count, n);
            gt_poison(g, d.work_d, nwork);
            g->gpu->muon_update_batch(dp, dg_, db, d.work_d, count, rows, cols, lr, mu, wd);
        }
        free(grad);
    }
    float *hp[2], *hb[2];
    for (int c = 0; c < 2; c++) hp[c] = gt_down(g, d.gp[c], all), hb[c] = gt_down(g, d.gb[c], all);
    snprintf(name, sizeof name, "muon_update_batch %d x %dx%d, 3 steps", count, rows, cols);
    check_muon(name, hp[0], hb[0], hp[1], hb[1], p, p0, buf, all);

    for (int c = 0; c < 2; c++) free(hp[c]), free(hb[c]);
    muon_dev_free(g, &d);
    free(p0), free(p), free(buf), free(work);
}

/* Several batches of different shapes issued back to back with no sync between them, as
 * optim_step does on one lane (one shared work buffer): each matrix must still get its
 * own update, 3 steps against the CPU, and twice on the GPU for the same bits. A third
 * GPU run spreads the batches over BACKEND_LANES lanes (batch b on lane b mod lanes, a
 * work buffer per lane, the scaled-fp16 1024x1024 batch off lane 0) and must give the
 * bits of the one-lane run. */
static void test_muon_overlapped(gt_ctx *g)
{
    enum { NB = 7 };
    static const int shape[NB][3] = {{5, 256, 1024}, {3, 1024, 256}, {2, 1024, 1024}, {7, 12, 1024},
                                     {2, 300, 300},  {1, 3072, 197}, {4, 576, 1024}};
    const float lr = 0.02f, mu = 0.95f, wd = 0.1f;
    size_t off[NB + 1] = {0}, nwork = 1;
    for (int b = 0; b < NB; b++) {
        off[b + 1] = off[b] + (size_t)shape[b][0] * shape[b][1] * shape[b][2];
        const size_t w = muon_batch_work_floats(shape[b][0], shape[b][1], shape[b][2]);
        if (w > nwork) nwork = w;
    }
    const size_t all = off[NB];
    float *p0 = gt_rand(g, all, -0.1f, 0.1f), *p = gt_host_copy(p0, all), *buf = xcalloc(all, sizeof(float));
    float *work = xmalloc(fbytes(nwork));
    muon_dev d = muon_dev_alloc(g, p0, all, nwork * BACKEND_LANES, 3); /* a work buffer per lane */
    float *hp_[MUON_BATCH_MAX], *hb_[MUON_BATCH_MAX], *dp[MUON_BATCH_MAX], *db[MUON_BATCH_MAX];
    const float *hg_[MUON_BATCH_MAX], *dg_[MUON_BATCH_MAX];
    for (int step = 1; step <= 3; step++) {
        float *grad = gt_rand(g, all, -1, 1);
        g->gpu->from_host(d.g_d, grad, fbytes(all));
        for (int b = 0; b < NB; b++) {
            const int count = shape[b][0], rows = shape[b][1], cols = shape[b][2];
            batch_ptrs(hp_, hb_, hg_, p + off[b], buf + off[b], grad + off[b], count, (size_t)rows * cols);
            g->cpu->muon_update_batch(hp_, hg_, hb_, work, count, rows, cols, lr, mu, wd);
        }
        for (int c = 0; c < 3; c++) {
            if (c == 2) g->gpu->lanes_fork(BACKEND_LANES);
            for (int b = 0; b < NB; b++) { /* no sync between the calls */
                const int count = shape[b][0], rows = shape[b][1], cols = shape[b][2];
                const int lane = c == 2 ? b % BACKEND_LANES : 0;
                batch_ptrs(dp, db, dg_, d.gp[c] + off[b], d.gb[c] + off[b], d.g_d + off[b], count,
                           (size_t)rows * cols);
                if (c == 2) g->gpu->lane(lane);
                g->gpu->muon_update_batch(dp, dg_, db, d.work_d + lane * nwork, count, rows, cols, lr, mu, wd);
            }
            if (c == 2) g->gpu->lanes_join();
        }
        free(grad);
    }
    float *hp[3], *hb[3];
    for (int c = 0; c < 3; c++) hp[c] = gt_down(g, d.gp[c], all), hb[c] = gt_down(g, d.gb[c], all);
    for (int b = 0; b < NB; b++) {
        char name[160];
        snprintf(name, sizeof name, "muon_update_batch overlapped, batch %d (%d x %dx%d), 3 steps", b, shape[b][0],
                 shape[b][1], shape[b][2]);
        check_muon(name, hp[0] + off[b], hb[0] + off[b], NULL, NULL, p + off[b], p0 + off[b], buf + off[b],
                   off[b + 1] - off[b]);
    }
    gt_report("muon_update_batch overlapped: p, buf deterministic",
              !memcmp(hp[0], hp[1], fbytes(all)) && !memcmp(hb[0], hb[1], fbytes(all)), "bitwise");
    gt_report("muon_update_batch on lanes: p, buf as on one lane",
              !memcmp(hp[0], hp[2], fbytes(all)) && !memcmp(hb[0], hb[2], fbytes(all)), "bitwise");
    for (int c = 0; c < 3; c++) free(hp[c]), free(hb[c]);
    muon_dev_free(g, &d);
    free(p0), free(p), free(buf), free(work);
}

/* Newton-Schulz as a CUDA graph (optim.cu, muon_ns_graphed): four steps of a batch with
 * graphs off and on, on two copies; with graphs the first call runs directly, the second
 * is captured and launched, the others launch the graph, so three launches must be
 * counted, and the bits must equal the direct launches'. The scaled-fp16 path too. */
static void test_muon_graph(gt_ctx *g, int count, int rows, int cols)
{
    char name[256];
    const float lr = 0.02f, mu = 0.95f, wd = 0.1f;
    const size_t n = (size_t)rows * cols, all = (size_t)count * n;
    const size_t nwork = muon_batch_work_floats(count, rows, cols);
    float *p0 = gt_rand(g, all, -0.1f, 0.1f);
    muon_dev d = muon_dev_alloc(g, p0, all, nwork, 2);
    float *dp[MUON_BATCH_MAX], *db[MUON_BATCH_MAX];
    const float *dg_[MUON_BATCH_MAX];
    unsigned long long launched = 0;
    for (int step = 1; step <= 4; step++) {
        float *grad = gt_rand(g, all, -1, 1);
        g->gpu->from_host(d.g_d, grad, fbytes(all));
        for (int c = 0; c < 2; c++) {
            batch_ptrs(dp, db, dg_, d.gp[c], d.gb[c], d.g_d, count, n);
            cuda_set_graphs(c);
            const unsigned long long before = cuda_muon_graph_launches();
            g->gpu->muon_update_batch(dp, dg_, db, d.work_d, count, rows, cols, lr, mu, wd);
            launched += cuda_muon_graph_launches() - before;
        }
        free(grad);
    }
    cuda_set_graphs(1);
    float *hp[2], *hb[2];
    for (int c = 0; c < 2; c++) hp[c] = gt_down(g, d.gp[c], all), hb[c] = gt_down(g, d.gb[c], all);
    snprintf(name, sizeof name, "muon_update_batch %d x %dx%d, 4 steps: Newton-Schulz graph launched 3 times", count,
             rows, cols);
    gt_report(name, launched == 3, "launches");
    snprintf(name, sizeof name, "muon_update_batch %d x %dx%d, 4 steps: p, buf with graphs as without", count, rows,
             cols);
    gt_report(name, !memcmp(hp[0], hp[1], fbytes(all)) && !memcmp(hb[0], hb[1], fbytes(all)), "bitwise");
    for (int c = 0; c < 2; c++) free(hp[c]), free(hb[c]);
    muon_dev_free(g, &d);
    free(p0);
}

/* grad_scale (the clipping's scale, applied as the update reads each gradient) against
 * scaling a copy of the gradients with scale_inplace first: bitwise, over four steps
 * with a new scale each (AdamW; a Muon batch, whose Newton-Schulz graph is captured on
 * the second step and replayed after, so the scale must be read at run time). */
static void test_grad_scale(gt_ctx *g, int count, int rows, int cols)
{
    static const float scales[4] = {0.5f, 0.3f, 0.8f, 0.7f};
    const size_t n = (size_t)rows * cols, all = (size_t)count * n;
    const size_t nwork = muon_batch_work_floats(count, rows, cols);
    float *p0 = gt_rand(g, all, -0.1f, 0.1f);
    muon_dev d = muon_dev_alloc(g, p0, all, nwork, 2);
    float *g2 = g->gpu->alloc(fbytes(all)), *am[2], *av[2], *ap[2];
    for (int c = 0; c < 2; c++) {
        ap[c] = gt_up(g, p0, all);
        am[c] = g->gpu->alloc(fbytes(all)), av[c] = g->gpu->alloc(fbytes(all));
    }
    float *dp[MUON_BATCH_MAX], *db[MUON_BATCH_MAX];
    const float *dg_[MUON_BATCH_MAX];
    for (int step = 1; step <= 4; step++) {
        float *grad = gt_rand(g, all, -1, 1);
        g->gpu->from_host(d.g_d, grad, fbytes(all));
        g->gpu->copy(g2, d.g_d, fbytes(all));
        g->gpu->scale_inplace(g2, scales[step - 1], all);
        for (int c = 0; c < 2; c++) { /* c 0: grad_scale on d.g_d; c 1: the scaled copy g2 */
            g->gpu->grad_scale(c ? 1.0f : scales[step - 1]);
            const float *gr = c ? g2 : d.g_d;
            g->gpu->adamw_update(ap[c], gr, am[c], av[c], all, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
            batch_ptrs(dp, db, dg_, d.gp[c], d.gb[c], gr, count, n);
            g->gpu->muon_update_batch(dp, dg_, db, d.work_d, count, rows, cols, 0.02f, 0.95f, 0.1f);
        }
        g->gpu->grad_scale(1.0f);
        free(grad);
    }
    float *h[2][5];
    for (int c = 0; c < 2; c++) {
        h[c][0] = gt_down(g, ap[c], all), h[c][1] = gt_down(g, am[c], all), h[c][2] = gt_down(g, av[c], all);
        h[c][3] = gt_down(g, d.gp[c], all), h[c][4] = gt_down(g, d.gb[c], all);
    }
    int same = 1;
    for (int i = 0; i < 5; i++) same &= !memcmp(h[0][i], h[1][i], fbytes(all));
    char name[200];
    snprintf(name, sizeof name, "grad_scale: AdamW (p, m, v) and Muon %d x %dx%d (p, buf) over 4 steps as on "
             "gradients scaled first", count, rows, cols);
    gt_report(name, same, "bitwise");
    for (int c = 0; c < 2; c++) {
        for (int i = 0; i < 5; i++) free(h[c][i]);
        g->gpu->free(ap[c]), g->gpu->free(am[c]), g->gpu->free(av[c]);
    }
    g->gpu->free(g2);
    muon_dev_free(g, &d);
    free(p0);
}

int main(void)
{
    gt_ctx g;
    gt_init(&g, 20250611);

    test_adamw(&g, 1000003);

    test_muon(&g, 1024, 256); /* tall: NS on the transpose */
    test_muon(&g, 256, 1024); /* wide */
    test_muon(&g, 300, 300);  /* square, not a multiple of any tile */
    test_muon(&g, 1024, 1536); /* wide, large: Newton-Schulz on scaled fp16 operands */

    test_muon_batch(&g, 5, 256, 1024); /* wide */
    test_muon_batch(&g, 3, 1024, 256); /* tall */
    test_muon_batch(&g, 2, 1024, 1024); /* large: scaled fp16 operands */
    test_muon_batch(&g, 2, 2048, 1024); /* large and tall */
    test_muon_overlapped(&g);
    test_muon_batch(&g, 4, 12, 1024);  /* the gate projections: tiny, launch-bound alone */
    test_muon_batch(&g, 3, 301, 300);  /* tall, strides padded to 64 floats */
    test_muon_batch(&g, 1, 300, 300);  /* a batch of one */
    test_muon_graph(&g, 5, 256, 1024); /* TF32 */
    test_muon_graph(&g, 2, 1024, 1024); /* scaled fp16 */
    test_grad_scale(&g, 3, 256, 1024);

    printf("# test_gpu_optim: %d failure(s)\n", gt_failures());
    return gt_failures() != 0;
}
