/* test_dense_ops.c: checks of the CPU dense and pointwise ops: matmul, embedding,
 * SwiGLU (both conventions), the GDN gates, the L2 normalisation and the vector
 * add/scale/sum of squares.
 *
 * Forwards are compared with direct transcriptions of their definitions; every
 * backward is compared with central finite differences of L = sum(out * R) for a fixed
 * random R, with the gradient buffers prefilled with GRAD_FILL and that value removed
 * afterwards, which fails any backward that overwrites instead of accumulating.
 * Sizes are deliberately not powers of two; the matmul sizes cover the register tiles
 * and their ragged edges, and (checked against direct sums only, finite differences
 * being too slow there) several parallel tasks and cache slices per product. The ops
 * that sum over a parallel loop are also checked to give the same bits with 1 and 3
 * threads.
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

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static double *fresh(size_t n, double lo, double hi)
{
    double *p = malloc((n ? n : 1) * sizeof *p);
    if (!p) {
        fprintf(stderr, "test_dense_ops: out of memory\n");
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

static int same_bits(const double *a, const double *b, size_t n)
{
    return memcmp(a, b, n * sizeof *a) == 0;
}

/* ---- matmul ---- */

struct mm_ctx {
    double *x, *w, *y, *r;
    int N, in, out;
};

static double mm_loss(void *p)
{
    struct mm_ctx *c = p;
    cpu_matmul_forward(c->y, c->x, c->w, c->N, c->in, c->out);
    return gc_dot(c->y, c->r, (size_t)c->N * c->out);
}

/* Forward against direct sums; backward against the direct sums of dy W and dy^T x
 * and, when fd is set, against finite differences; NULL gradients; thread count. */
static void test_matmul(int N, int in, int out, int fd)
{
    char what[128];
    size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
    struct mm_ctx c = {fresh(nx, -1, 1), fresh(nw, -1, 1), fresh(ny, 0, 1), fresh(ny, -1, 1),
                       N, in, out};

    double *ref = fresh(ny, 0, 1);
    for (int i = 0; i < N; i++)
        for (int o = 0; o < out; o++) {
            double s = 0;
            for (int k = 0; k < in; k++) s += c.x[(size_t)i * in + k] * c.w[(size_t)o * in + k];
            ref[(size_t)i * out + o] = s;
        }
    cpu_matmul_forward(c.y, c.x, c.w, N, in, out);
    snprintf(what, sizeof what, "matmul forward matches direct sums (N=%d in=%d out=%d)", N, in, out);
    gc_compare(what, c.y, ref, ny, EXACT_TOL);

    double *dx = filled(nx, GRAD_FILL), *dw = filled(nw, GRAD_FILL);
    cpu_matmul_backward(dx, dw, c.r, c.x, c.w, N, in, out);
    unfill(dx, nx);
    unfill(dw, nw);

    double *num = fresh(nx > nw ? nx : nw, 0, 1);
    for (int i = 0; i < N; i++)
        for (int k = 0; k < in; k++) {
            double s = 0;
            for (int o = 0; o < out; o++) s += c.r[(size_t)i * out + o] * c.w[(size_t)o * in + k];
            num[(size_t)i * in + k] = s;
        }
    snprintf(what, sizeof what, "matmul dx accumulates dy W (N=%d in=%d out=%d)", N, in, out);
    gc_compare(what, dx, num, nx, EXACT_TOL);
    for (int o = 0; o < out; o++)
        for (int k = 0; k < in; k++) {
            double s = 0;
            for (int i = 0; i < N; i++) s += c.r[(size_t)i * out + o] * c.x[(size_t)i * in + k];
            num[(size_t)o * in + k] = s;
        }
    snprintf(what, sizeof what, "matmul dw accumulates dy^T x (N=%d in=%d out=%d)", N, in, out);
    gc_compare(what, dw, num, nw, EXACT_TOL);
    if (fd) {
        gc_numeric(mm_loss, &c, c.x, nx, FD_STEP, num);
        snprintf(what, sizeof what, "matmul dx matches FD (N=%d in=%d out=%d)", N, in, out);
        gc_compare(what, dx, num, nx, FD_TOL);
        gc_numeric(mm_loss, &c, c.w, nw, FD_STEP, num);
        snprintf(what, sizeof what, "matmul dw matches FD (N=%d in=%d out=%d)", N, in, out);
        gc_compare(what, dw, num, nw, FD_TOL);
    }

    /* a NULL gradient is skipped and leaves the other unchanged */
    double *dx1 = filled(nx, GRAD_FILL), *dw1 = filled(nw, GRAD_FILL);
    cpu_matmul_backward(dx1, NULL, c.r, c.x, c.w, N, in, out);
    cpu_matmul_backward(NULL, dw1, c.r, c.x, c.w, N, in, out);
    unfill(dx1, nx);
    unfill(dw1, nw);
    snprintf(what, sizeof what, "matmul backward with dw or dx NULL (N=%d in=%d out=%d)", N, in, out);
    gc_report(what, same_bits(dx1, dx, nx) && same_bits(dw1, dw, nw), NULL);

    /* the same bits whatever the thread count */
    double *y1 = fresh(ny, 0, 1), *y3 = fresh(ny, 0, 1);
    double *dx3 = filled(nx, GRAD_FILL), *dw3 = filled(nw, GRAD_FILL);
    for (size_t i = 0; i < nx; i++) dx1[i] = GRAD_FILL;
    for (size_t i = 0; i < nw; i++) dw1[i] = GRAD_FILL;
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    cpu_matmul_forward(y1, c.x, c.w, N, in, out);
    cpu_matmul_backward(dx1, dw1, c.r, c.x, c.w, N, in, out);
    omp_set_num_threads(3);
    cpu_matmul_forward(y3, c.x, c.w, N, in, out);
    cpu_matmul_backward(dx3, dw3, c.r, c.x, c.w, N, in, out);
    omp_set_num_threads(threads);
    snprintf(what, sizeof what, "matmul bit-identical with 1 and 3 threads (N=%d in=%d out=%d)", N, in, out);
    gc_report(what, same_bits(y1, y3, ny) && same_bits(dx1, dx3, nx) && same_bits(dw1, dw3, nw), NULL);

    free(c.x); free(c.w); free(c.y); free(c.r); free(ref); free(dx); free(dw); free(num);
    free(dx1); free(dw1); free(y1); free(y3); free(dx3); free(dw3);
}

/* ---- embedding ---- */

struct emb_ctx {
    double *wte, *out, *r;
    const int32_t *tok;
    int N, C;
};

static double emb_loss(void *p)
{
    struct emb_ctx *c = p;
    cpu_embedding_forward(c->out, c->tok, c->wte, c->N, c->C);
    return gc_dot(c->out, c->r, (size_t)c->N * c->C);
}

static void test_embedding(void)
{
    enum { N = 11, V = 5, C = 70 }; /* repeated tokens; C spans two channel blocks */
    int32_t tok[N];
    for (int i = 0; i < N; i++) tok[i] = (int32_t)(gc_uniform(&rng) * V);
    tok[3] = tok[7] = tok[9] = 2;
    struct emb_ctx c = {fresh((size_t)V * C, -1, 1), fresh((size_t)N * C, 0, 1),
                        fresh((size_t)N * C, -1, 1), tok, N, C};

    cpu_embedding_forward(c.out, tok, c.wte, N, C);
    int ok = 1;
    for (int i = 0; i < N; i++)
        ok &= memcmp(c.out + (size_t)i * C, c.wte + (size_t)tok[i] * C, C * sizeof(double)) == 0;
    gc_report("embedding forward copies rows", ok, NULL);

    double *dwte = filled((size_t)V * C, GRAD_FILL), *num = fresh((size_t)V * C, 0, 1);
    cpu_embedding_backward(dwte, c.r, tok, N, C);
    unfill(dwte, (size_t)V * C);
    gc_numeric(emb_loss, &c, c.wte, (size_t)V * C, FD_STEP, num);
    gc_compare("embedding backward accumulates repeated tokens and matches FD", dwte, num,
               (size_t)V * C, FD_TOL);
    free(c.wte); free(c.out); free(c.r); free(dwte); free(num);

    /* large enough to run in parallel: the same bits with 1 and 3 threads */
    enum { NB = 601 };
    int32_t tokb[NB];
    for (int i = 0; i < NB; i++) tokb[i] = (int32_t)(gc_uniform(&rng) * V);
    double *doutb = fresh((size_t)NB * C, -1, 1);
    double *g1 = filled((size_t)V * C, GRAD_FILL), *g3 = filled((size_t)V * C, GRAD_FILL);
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    cpu_embedding_backward(g1, doutb, tokb, NB, C);
    omp_set_num_threads(3);
    cpu_embedding_backward(g3, doutb, tokb, NB, C);
    omp_set_num_threads(threads);
    gc_report("embedding backward bit-identical with 1 and 3 threads (N=601 C=70)",
              same_bits(g1, g3, (size_t)V * C), NULL);
    free(doutb); free(g1); free(g3);
}

/* ---- swiglu ---- */

struct sw_ctx {
    double *in, *out, *r;
    int N, h, silu_first;
};

static double sw_loss(void *p)
{
    struct sw_ctx *c = p;
    cpu_swiglu_forward(c->out, c->in, c->N, c->h, c->silu_first);
    return gc_dot(c->out, c->r, (size_t)c->N * c->h);
}

static void test_swiglu(int silu_first)
{
    enum { N = 7, H = 13 };
    char what[96];
    size_t nin = (size_t)N * 2 * H, nout = (size_t)N * H;
    struct sw_ctx c = {fresh(nin, -4, 4), fresh(nout, 0, 1), fresh(nout, -1, 1), N, H, silu_first};

    double *ref = fresh(nout, 0, 1);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < H; j++) {
            double a = c.in[(size_t)i * 2 * H + j], b = c.in[(size_t)i * 2 * H + H + j];
            ref[(size_t)i * H + j] = silu_first ? a / (1 + exp(-a)) * b : a * (b / (1 + exp(-b)));
        }
    cpu_swiglu_forward(c.out, c.in, N, H, silu_first);
    snprintf(what, sizeof what, "swiglu forward, silu on the %s half", silu_first ? "first" : "second");
    gc_compare(what, c.out, ref, nout, EXACT_TOL);

    double *din = filled(nin, GRAD_FILL), *num = fresh(nin, 0, 1);
    cpu_swiglu_backward(din, c.r, c.in, N, H, silu_first);
    unfill(din, nin);
    gc_numeric(sw_loss, &c, c.in, nin, FD_STEP, num);
    snprintf(what, sizeof what, "swiglu backward accumulates and matches FD, silu on the %s half",
             silu_first ? "first" : "second");
    gc_compare(what, din, num, nin, FD_TOL);
    free(c.in); free(c.out); free(c.r); free(ref); free(din); free(num);
}

/* ---- gates ---- */

struct gate_ctx {
    double *graw, *braw, *g, *beta, *rg, *rb;
    size_t n;
};

static double gate_loss(void *p)
{
    struct gate_ctx *c = p;
    cpu_gates_forward(c->g, c->beta, c->graw, c->braw, c->n);
    return gc_dot(c->g, c->rg, c->n) + gc_dot(c->beta, c->rb, c->n);
}

static void test_gates(void)
{
    enum { n = 29 };
    struct gate_ctx c = {fresh(n, -6, 6), fresh(n, -6, 6), fresh(n, 0, 1), fresh(n, 0, 1),
                         fresh(n, -1, 1), fresh(n, -1, 1), n};

    double *rg = fresh(n, 0, 1), *rb = fresh(n, 0, 1);
    for (int i = 0; i < n; i++) {
        rg[i] = log(1 / (1 + exp(-c.graw[i])));
        rb[i] = 1 / (1 + exp(-c.braw[i]));
    }
    cpu_gates_forward(c.g, c.beta, c.graw, c.braw, n);
    gc_compare("gates forward g = logsigmoid(graw)", c.g, rg, n, EXACT_TOL);
    gc_compare("gates forward beta = sigmoid(braw)", c.beta, rb, n, EXACT_TOL);

    /* far tails: logsigmoid(-800) = -800 and logsigmoid(800) = 0, never inf or NaN */
    double graw_t[4] = {-800, 800, -40, 40}, braw_t[4] = {-800, 800, -40, 40};
    double g_t[4], b_t[4];
    cpu_gates_forward(g_t, b_t, graw_t, braw_t, 4);
    int ok = g_t[0] == -800 && g_t[1] == 0 && fabs(g_t[2] + 40) < 1e-15 && fabs(g_t[3]) < 1e-17 &&
             b_t[0] == 0 && b_t[1] == 1 && b_t[2] > 0 && b_t[3] == 1;
    char detail[160];
    snprintf(detail, sizeof detail, "g = %g %g %g %g, beta = %g %g %g %g", g_t[0], g_t[1], g_t[2],
             g_t[3], b_t[0], b_t[1], b_t[2], b_t[3]);
    gc_report("gates forward is finite and exact in the tails", ok, detail);

    double *dgraw = filled(n, GRAD_FILL), *dbraw = filled(n, GRAD_FILL), *num = fresh(n, 0, 1);
    cpu_gates_backward(dgraw, dbraw, c.rg, c.rb, c.graw, c.braw, n);
    unfill(dgraw, n);
    unfill(dbraw, n);
    gc_numeric(gate_loss, &c, c.graw, n, FD_STEP, num);
    gc_compare("gates dgraw accumulates and matches FD", dgraw, num, n, FD_TOL);
    gc_numeric(gate_loss, &c, c.braw, n, FD_STEP, num);
    gc_compare("gates dbraw accumulates and matches FD", dbraw, num, n, FD_TOL);
    free(c.graw); free(c.braw); free(c.g); free(c.beta); free(c.rg); free(c.rb);
    free(rg); free(rb); free(dgraw); free(dbraw); free(num);
}

/* ---- l2norm ---- */

struct l2_ctx {
    double *x, *y, *rnorm, *r;
    int n, D;
};

static double l2_loss(void *p)
{
    struct l2_ctx *c = p;
    cpu_l2norm_forward(c->y, c->rnorm, c->x, c->n, c->D);
    return gc_dot(c->y, c->r, (size_t)c->n * c->D);
}

static void test_l2norm(void)
{
    enum { n = 7, D = 13 };
    size_t nx = (size_t)n * D;
    struct l2_ctx c = {fresh(nx, -1, 1), fresh(nx, 0, 1), fresh(n, 0, 1), fresh(nx, -1, 1), n, D};

    cpu_l2norm_forward(c.y, c.rnorm, c.x, n, D);
    double *ref = fresh(nx, 0, 1), *rref = fresh(n, 0, 1);
    for (int i = 0; i < n; i++) {
        double s = 0;
        for (int d = 0; d < D; d++) s += c.x[(size_t)i * D + d] * c.x[(size_t)i * D + d];
        rref[i] = 1 / sqrt(s);
        for (int d = 0; d < D; d++) ref[(size_t)i * D + d] = c.x[(size_t)i * D + d] / sqrt(s);
    }
    gc_compare("l2norm forward y", c.y, ref, nx, EXACT_TOL);
    gc_compare("l2norm forward rnorm", c.rnorm, rref, n, EXACT_TOL);

    double *dx = filled(nx, GRAD_FILL), *num = fresh(nx, 0, 1);
    cpu_l2norm_backward(dx, c.r, c.x, c.rnorm, n, D);
    unfill(dx, nx);
    gc_numeric(l2_loss, &c, c.x, nx, FD_STEP, num);
    gc_compare("l2norm backward accumulates and matches FD", dx, num, nx, FD_TOL);

    /* a zero row: the norm is clamped to 1e-12, y = 0, and the gradient is dy * 1e12 */
    double z[D], yz[D], rz, dz[D], dyz[D];
    for (int d = 0; d < D; d++) {
        z[d] = 0;
        dz[d] = GRAD_FILL;
        dyz[d] = c.r[d];
    }
    cpu_l2norm_forward(yz, &rz, z, 1, D);
    cpu_l2norm_backward(dz, dyz, z, &rz, 1, D);
    int ok = rz == 1e12;
    for (int d = 0; d < D; d++) ok &= yz[d] == 0 && fabs(dz[d] - GRAD_FILL - dyz[d] * 1e12) <= 1e-3;
    gc_report("l2norm of a zero row is clamped (y = 0, rnorm = 1e12, dx = 1e12 dy)", ok, NULL);
    free(c.x); free(c.y); free(c.rnorm); free(c.r); free(ref); free(rref); free(dx); free(num);
}

/* ---- add / scale / sumsq ---- */

static void test_vector_ops(void)
{
    enum { n = 101 };
    double *x = fresh(n, -1, 1), *y = fresh(n, -1, 1), *y0 = fresh(n, 0, 1);
    memcpy(y0, y, sizeof(double) * n);
    cpu_add_inplace(y, x, n);
    int ok = 1;
    for (int i = 0; i < n; i++) ok &= y[i] == y0[i] + x[i];
    gc_report("add_inplace", ok, NULL);

    memcpy(y0, y, sizeof(double) * n);
    cpu_scale_inplace(y, -0.3, n);
    ok = 1;
    for (int i = 0; i < n; i++) ok &= y[i] == y0[i] * -0.3;
    gc_report("scale_inplace", ok, NULL);

    /* large enough to run in parallel over many blocks */
    size_t big = 100003;
    double *v = fresh(big, -2, 2);
    double direct = 0;
    for (size_t i = 0; i < big; i++) direct += v[i] * v[i];
    double s = cpu_sumsq(v, big), small = cpu_sumsq(x, n), small_ref = gc_dot(x, x, n);
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    double s1 = cpu_sumsq(v, big);
    omp_set_num_threads(3);
    double s3 = cpu_sumsq(v, big);
    omp_set_num_threads(threads);
    char detail[128];
    snprintf(detail, sizeof detail, "%.17g vs %.17g, small %.17g vs %.17g", s, direct, small, small_ref);
    gc_report("sumsq matches the direct sum", fabs(s - direct) <= 1e-12 * direct &&
                                              fabs(small - small_ref) <= 1e-14 * small_ref, detail);
    gc_report("sumsq bit-identical with 1 and 3 threads", s1 == s3 && s1 == s, NULL);
    free(x); free(y); free(y0); free(v);
}

int main(void)
{
    test_matmul(9, 37, 21, 1);
    test_matmul(7, 13, 5, 1);
    test_matmul(1, 3, 2, 1);
    /* several tasks, W slices and reduction slices in every product */
    test_matmul(261, 270, 301, 0);
    test_embedding();
    test_swiglu(1);
    test_swiglu(0);
    test_gates();
    test_l2norm();
    test_vector_ops();
    return gc_failures() != 0;
}
