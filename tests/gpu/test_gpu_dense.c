/* test_gpu_dense.c: the dense ops of the CUDA backend against the CPU oracle: the
 * Linear layer (matmul forward, forward with a residual, backward; several layers on one
 * input), the fused SwiGLU MLP (forward, backward) and the chunked tied head +
 * cross-entropy (classifier forward/backward, and both in one op). The optimizers are in
 * test_gpu_optim.c.
 *
 * Every op runs on the GPU and on the CPU with the same random inputs. Forward outputs
 * are NaN-poisoned on the GPU first, so an element the kernel forgets to write fails.
 * Backward ops accumulate, so each gradient is checked three ways:
 *   - "from zero": a GPU run into zeroed buffers against the CPU's increment (its
 *     result minus the initial values), the op's own contribution;
 *   - "accumulated": a GPU run from random initial values whose rms equals that
 *     increment's, against the CPU run from the same values; an op that overwrote
 *     instead of adding (or added twice) is off by about 100% here;
 *   - "deterministic": a second GPU run from the same values gives the same bits.
 * Inputs are scaled so that every product has O(1) entries (weights ~ 1/sqrt(fan-in)),
 * as in training; the classifier's logits have unit standard deviation, so softmax is
 * neither flat nor one-hot and errors in the logits show in the gradients.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

/* kernels/classifier.cu (C linkage): rows per chunk of the head */
int cuda_classifier_chunk_rows(int N, int V);
/* kernels/matmul.cu (C linkage): 1 when the product N x in -> out runs on bf16 copies
 * (the fused MLP keeps act and dgu in bf16 exactly when its down projection does) */
int cuda_matmul_bf16_path(int N, int in, int out);
/* kernels/matmul.cu and elementwise.cu (C linkage): the bf16 rounding pass and the SwiGLU
 * kernels with bf16 outputs, whose __nv_bfloat16 buffers are declared here as the 16-bit
 * words they are (C has no bf16 type); the fp32 SwiGLU ops of the op table */
void cuda_to_bf16(uint16_t *dst, const float *src, size_t n);
void cuda_swiglu_forward_bf16(uint16_t *out, const float *in, int N, int h, int silu_first);
void cuda_swiglu_backward_set_bf16(uint16_t *din, const float *dout, const float *in, int N, int h, int silu_first);
void cuda_swiglu_forward_bf16in(uint16_t *out, const uint16_t *in, int N, int h, int silu_first);
void cuda_swiglu_backward_set_bf16in(uint16_t *din, const float *dout, const uint16_t *in, int N, int h, int silu_first);

static size_t fbytes(size_t n) { return n * sizeof(float); }

/* n bf16 values (16-bit words) as floats, exactly */
static float *bf16_to_floats(const uint16_t *b, size_t n)
{
    float *f = xmalloc(fbytes(n));
    for (size_t i = 0; i < n; i++) {
        const uint32_t u = (uint32_t)b[i] << 16;
        memcpy(&f[i], &u, sizeof u);
    }
    return f;
}

static double rms(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return n ? sqrt(s / n) : 0;
}

/* Initial values of a gradient buffer: uniform with the rms of `inc`, the op's own
 * increment, so that the initial values and the increment weigh alike in the result. */
static float *grad_init(gt_ctx *g, const float *inc, size_t n)
{
    double r = rms(inc, n);
    if (!(r > 0)) r = 1;
    float *x = gt_rand(g, n, -1, 1);
    for (size_t i = 0; i < n; i++) x[i] = (float)(x[i] * r * sqrt(3.0));
    return x;
}

/* The three checks of one accumulated gradient (see the top): inc_gpu from zero,
 * init the initial values, cpu the CPU result from init, gpu1/gpu2 two GPU results
 * from init. */
static void check_grad(const char *what, const float *inc_gpu, const float *init, const float *cpu,
                       const float *gpu1, const float *gpu2, size_t n, double tol)
{
    char name[256];
    float *inc_cpu = gt_diff(cpu, init, n);
    snprintf(name, sizeof name, "%s from zero", what);
    gt_compare(name, inc_gpu, inc_cpu, n, tol);
    snprintf(name, sizeof name, "%s accumulated", what);
    gt_compare(name, gpu1, cpu, n, tol);
    snprintf(name, sizeof name, "%s deterministic", what);
    gt_same_bits(name, gpu1, gpu2, fbytes(n));
    free(inc_cpu);
}

/* ---- matmul ---- */

static void test_matmul_forward(gt_ctx *g, int N, int in, int out)
{
    char name[256];
    const size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
    const float a = (float)sqrt(3.0 / in);
    float *x = gt_rand(g, nx, -1, 1), *w = gt_rand(g, nw, -a, a);
    float *y = xmalloc(fbytes(ny));
    g->cpu->matmul_forward(y, x, w, N, in, out);

    float *dx = gt_up(g, x, nx), *dw = gt_up(g, w, nw), *dy = g->gpu->alloc(fbytes(ny));
    float *res[2];
    for (int run = 0; run < 2; run++) {
        gt_poison(g, dy, ny);
        g->gpu->matmul_forward(dy, dx, dw, N, in, out);
        res[run] = gt_down(g, dy, ny);
    }
    snprintf(name, sizeof name, "matmul_forward N=%d in=%d out=%d: y", N, in, out);
    gt_compare(name, res[0], y, ny, GT_TOL_BF16);
    snprintf(name, sizeof name, "matmul_forward N=%d in=%d out=%d: y deterministic", N, in, out);
    gt_same_bits(name, res[0], res[1], fbytes(ny));

    g->gpu->free(dx);
    g->gpu->free(dw);
    g->gpu->free(dy);
    free(x), free(w), free(y), free(res[0]), free(res[1]);
}

/* matmul_forward_add, y = r + x W^T, against the CPU op (itself bitwise the CPU's
 * matmul_forward + add_inplace, tests/test_matmul_add.c) on the same inputs:
 *   - r apart from y, y NaN-poisoned (the op must not read y), r left as it was;
 *   - r = y, an accumulate into r.
 * Each is compared whole (y) and as y - r, the product alone, which the residual's
 * share of the norm would otherwise hide; and run twice for the same bits. y and r lie
 * `offset` floats into their buffers, so that offset 1 gives 4-byte alignment, which the
 * bf16 path's cuBLASLt plan (kernels/matmul.cu) must honour or fall back from. */
static void test_matmul_forward_add(gt_ctx *g, int N, int in, int out, int offset)
{
    char name[256];
    const size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
    const float a = (float)sqrt(3.0 / in);
    float *x = gt_rand(g, nx, -1, 1), *w = gt_rand(g, nw, -a, a), *r = gt_rand(g, ny, -1, 1);
    float *y = xmalloc(fbytes(ny));
    g->cpu->matmul_forward_add(y, x, w, r, N, in, out);
    float *y_minus_r = gt_diff(y, r, ny);

    float *dx = gt_up(g, x, nx), *dw = gt_up(g, w, nw);
    float *rbuf = g->gpu->alloc(fbytes(ny + offset)), *ybuf = g->gpu->alloc(fbytes(ny + offset));
    float *dr = rbuf + offset, *dy = ybuf + offset;
    g->gpu->from_host(dr, r, fbytes(ny));
    for (int same = 0; same < 2; same++) {
        const char *mode = same ? "r = y" : "r != y";
        float *res[2];
        for (int run = 0; run < 2; run++) {
            if (same) {
                g->gpu->from_host(dy, r, fbytes(ny));
                g->gpu->matmul_forward_add(dy, dx, dw, dy, N, in, out);
            } else {
                gt_poison(g, dy, ny);
                g->gpu->matmul_forward_add(dy, dx, dw, dr, N, in, out);
            }
            res[run] = gt_down(g, dy, ny);
        }
        snprintf(name, sizeof name, "matmul_forward_add N=%d in=%d out=%d offset %d [%s]: y", N, in, out, offset,
                 mode);
        gt_compare(name, res[0], y, ny, GT_TOL_BF16);
        float *prod = gt_diff(res[0], r, ny);
        snprintf(name, sizeof name, "matmul_forward_add N=%d in=%d out=%d offset %d [%s]: y - r", N, in, out, offset,
                 mode);
        gt_compare(name, prod, y_minus_r, ny, GT_TOL_BF16);
        snprintf(name, sizeof name, "matmul_forward_add N=%d in=%d out=%d offset %d [%s]: y deterministic", N, in,
                 out, offset, mode);
        gt_same_bits(name, res[0], res[1], fbytes(ny));
        if (!same) {
            float *r_after = gt_down(g, dr, ny);
            snprintf(name, sizeof name, "matmul_forward_add N=%d in=%d out=%d offset %d [r != y]: r unchanged", N, in,
                     out, offset);
            gt_same_bits(name, r_after, r, fbytes(ny));
            free(r_after);
        }
        free(prod), free(res[0]), free(res[1]);
    }

    g->gpu->free(dx);
    g->gpu->free(dw);
    g->gpu->free(rbuf);
    g->gpu->free(ybuf);
    free(x), free(w), free(r), free(y), free(y_minus_r);
}

/* want_dx / want_dw: which gradients to ask for (the other pointer is NULL) */
static void test_matmul_backward(gt_ctx *g, int N, int in, int out, int want_dx, int want_dw)
{
    char what[256];
    const char *mode = want_dx && want_dw ? "dx+dw" : want_dx ? "dx only" : "dw only";
    const size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
    const float a = (float)sqrt(3.0 / in);
    float *x = gt_rand(g, nx, -1, 1), *w = gt_rand(g, nw, -a, a), *dy = gt_rand(g, ny, -1, 1);
    float *x_d = gt_up(g, x, nx), *w_d = gt_up(g, w, nw), *dy_d = gt_up(g, dy, ny);
    float *dx_d = want_dx ? g->gpu->alloc(fbytes(nx)) : NULL; /* zero-filled */
    float *dw_d = want_dw ? g->gpu->alloc(fbytes(nw)) : NULL;

    /* the GPU increment from zero */
    g->gpu->matmul_backward(dx_d, dw_d, dy_d, x_d, w_d, N, in, out);
    float *inc_dx = want_dx ? gt_down(g, dx_d, nx) : NULL, *inc_dw = want_dw ? gt_down(g, dw_d, nw) : NULL;

    /* the CPU from initial values */
    float *init_dx = want_dx ? grad_init(g, inc_dx, nx) : NULL;
    float *init_dw = want_dw ? grad_init(g, inc_dw, nw) : NULL;
    float *cpu_dx = want_dx ? gt_host_copy(init_dx, nx) : NULL;
    float *cpu_dw = want_dw ? gt_host_copy(init_dw, nw) : NULL;
    g->cpu->matmul_backward(cpu_dx, cpu_dw, dy, x, w, N, in, out);

    /* the GPU twice from the same initial values */
    float *gdx[2] = {NULL, NULL}, *gdw[2] = {NULL, NULL};
    for (int run = 0; run < 2; run++) {
        if (want_dx) g->gpu->from_host(dx_d, init_dx, fbytes(nx));
        if (want_dw) g->gpu->from_host(dw_d, init_dw, fbytes(nw));
        g->gpu->matmul_backward(dx_d, dw_d, dy_d, x_d, w_d, N, in, out);
        if (want_dx) gdx[run] = gt_down(g, dx_d, nx);
        if (want_dw) gdw[run] = gt_down(g, dw_d, nw);
    }

    if (want_dx) {
        snprintf(what, sizeof what, "matmul_backward N=%d in=%d out=%d [%s]: dx", N, in, out, mode);
        check_grad(what, inc_dx, init_dx, cpu_dx, gdx[0], gdx[1], nx, GT_TOL_BF16);
    }
    if (want_dw) {
        snprintf(what, sizeof what, "matmul_backward N=%d in=%d out=%d [%s]: dw", N, in, out, mode);
        check_grad(what, inc_dw, init_dw, cpu_dw, gdw[0], gdw[1], nw, GT_TOL_BF16);
    }

    /* the _set form: dx written over whatever it held (NaN here), dw still added to */
    float *sdx = want_dx ? gt_host_copy(init_dx, nx) : NULL, *sdw = want_dw ? gt_host_copy(init_dw, nw) : NULL;
    g->cpu->matmul_backward_set(sdx, sdw, dy, x, w, N, in, out);
    float *sgx[2] = {NULL, NULL}, *sgw[2] = {NULL, NULL};
    for (int run = 0; run < 2; run++) {
        if (want_dx) gt_poison(g, dx_d, nx);
        if (want_dw) g->gpu->from_host(dw_d, init_dw, fbytes(nw));
        g->gpu->matmul_backward_set(dx_d, dw_d, dy_d, x_d, w_d, N, in, out);
        if (want_dx) sgx[run] = gt_down(g, dx_d, nx);
        if (want_dw) sgw[run] = gt_down(g, dw_d, nw);
    }
    if (want_dx) {
        snprintf(what, sizeof what, "matmul_backward_set N=%d in=%d out=%d [%s]: dx", N, in, out, mode);
        gt_compare(what, sgx[0], sdx, nx, GT_TOL_BF16);
        snprintf(what, sizeof what, "matmul_backward_set N=%d in=%d out=%d [%s]: dx deterministic", N, in, out, mode);
        gt_same_bits(what, sgx[0], sgx[1], fbytes(nx));
    }
    if (want_dw) {
        snprintf(what, sizeof what, "matmul_backward_set N=%d in=%d out=%d [%s]: dw", N, in, out, mode);
        check_grad(what, inc_dw, init_dw, sdw, sgw[0], sgw[1], nw, GT_TOL_BF16);
    }
    for (int run = 0; run < 2; run++) free(sgx[run]), free(sgw[run]);
    free(sdx), free(sdw);

    g->gpu->free(x_d);
    g->gpu->free(w_d);
    g->gpu->free(dy_d);
    g->gpu->free(dx_d);
    g->gpu->free(dw_d);
    free(x), free(w), free(dy), free(inc_dx), free(inc_dw), free(init_dx), free(init_dw);
    free(cpu_dx), free(cpu_dw), free(gdx[0]), free(gdx[1]), free(gdw[0]), free(gdw[1]);
}

/* ---- several Linear layers on one input ----
 * matmul_forward_multi and matmul_backward_multi (outs[i] outputs per part; no_dw: the
 * part whose dw is NULL, or -1) against the CPU's, which is the single ops part by part.
 * Each y, dx and dw is checked as the single ops are: y NaN-poisoned first; dx and the
 * dw's from zero, accumulated from random values, and twice for the same bits; the dx_set
 * form with dx NaN-poisoned. Shapes where some part is on the bf16 path take the shared
 * bf16 copy of x (the narrow parts' stacked GEMM and its split, the backward's packed dy
 * and single dx GEMM); the others run part by part on the GPU too. */
static void test_matmul_multi(gt_ctx *g, int N, int in, const int *outs, int n, int no_dw)
{
    char what[256], shape[96];
    int len = snprintf(shape, sizeof shape, "N=%d in=%d out=", N, in);
    for (int i = 0; i < n; i++) len += snprintf(shape + len, sizeof shape - len, "%s%d", i ? "," : "", outs[i]);
    if (no_dw >= 0) snprintf(shape + len, sizeof shape - len, " (part %d no dw)", no_dw);
    const size_t nx = (size_t)N * in;
    const float a = (float)sqrt(3.0 / in);
    float *x = gt_rand(g, nx, -1, 1), *x_d = gt_up(g, x, nx);
    float *w[MATMUL_PARTS_MAX], *dy[MATMUL_PARTS_MAX], *y[MATMUL_PARTS_MAX];
    float *w_d[MATMUL_PARTS_MAX], *dy_d[MATMUL_PARTS_MAX], *y_d[MATMUL_PARTS_MAX], *dw_d[MATMUL_PARTS_MAX];
    matmul_part cp[MATMUL_PARTS_MAX], gp[MATMUL_PARTS_MAX];
    for (int i = 0; i < n; i++) {
        const size_t nw = (size_t)outs[i] * in, ny = (size_t)N * outs[i];
        w[i] = gt_rand(g, nw, -a, a), dy[i] = gt_rand(g, ny, -1, 1), y[i] = xmalloc(fbytes(ny));
        w_d[i] = gt_up(g, w[i], nw), dy_d[i] = gt_up(g, dy[i], ny), y_d[i] = g->gpu->alloc(fbytes(ny));
        dw_d[i] = i == no_dw ? NULL : g->gpu->alloc(fbytes(nw));
        cp[i] = (matmul_part){w[i], outs[i], y[i], dy[i], NULL};
        gp[i] = (matmul_part){w_d[i], outs[i], y_d[i], dy_d[i], dw_d[i]};
    }

    /* forward */
    g->cpu->matmul_forward_multi(cp, n, x, N, in);
    float *gy[2][MATMUL_PARTS_MAX];
    for (int run = 0; run < 2; run++) {
        for (int i = 0; i < n; i++) gt_poison(g, y_d[i], (size_t)N * outs[i]);
        g->gpu->matmul_forward_multi(gp, n, x_d, N, in);
        for (int i = 0; i < n; i++) gy[run][i] = gt_down(g, y_d[i], (size_t)N * outs[i]);
    }
    for (int i = 0; i < n; i++) {
        snprintf(what, sizeof what, "matmul_forward_multi %s: y of part %d", shape, i);
        gt_compare(what, gy[0][i], y[i], (size_t)N * outs[i], GT_TOL_BF16);
        snprintf(what, sizeof what, "matmul_forward_multi %s: y of part %d deterministic", shape, i);
        gt_same_bits(what, gy[0][i], gy[1][i], fbytes((size_t)N * outs[i]));
        free(gy[0][i]), free(gy[1][i]);
    }

    /* backward, accumulating: the GPU's increment from zero, then the CPU and the GPU
     * (twice) from the same initial values */
    float *dx_d = g->gpu->alloc(fbytes(nx));
    g->gpu->matmul_backward_multi(dx_d, 0, gp, n, x_d, N, in);
    float *inc_dx = gt_down(g, dx_d, nx), *init_dx = grad_init(g, inc_dx, nx), *cpu_dx = gt_host_copy(init_dx, nx);
    float *inc_dw[MATMUL_PARTS_MAX], *init_dw[MATMUL_PARTS_MAX], *cpu_dw[MATMUL_PARTS_MAX];
    for (int i = 0; i < n; i++) {
        const size_t nw = (size_t)outs[i] * in;
        inc_dw[i] = init_dw[i] = cpu_dw[i] = NULL;
        if (!dw_d[i]) continue;
        inc_dw[i] = gt_down(g, dw_d[i], nw);
        init_dw[i] = grad_init(g, inc_dw[i], nw);
        cpu_dw[i] = gt_host_copy(init_dw[i], nw);
        cp[i].dw = cpu_dw[i];
    }
    g->cpu->matmul_backward_multi(cpu_dx, 0, cp, n, x, N, in);
    float *gdx[2], *gdw[2][MATMUL_PARTS_MAX];
    for (int run = 0; run < 2; run++) {
        g->gpu->from_host(dx_d, init_dx, fbytes(nx));
        for (int i = 0; i < n; i++)
            if (dw_d[i]) g->gpu->from_host(dw_d[i], init_dw[i], fbytes((size_t)outs[i] * in));
        g->gpu->matmul_backward_multi(dx_d, 0, gp, n, x_d, N, in);
        gdx[run] = gt_down(g, dx_d, nx);
        for (int i = 0; i < n; i++) gdw[run][i] = dw_d[i] ? gt_down(g, dw_d[i], (size_t)outs[i] * in) : NULL;
    }
    snprintf(what, sizeof what, "matmul_backward_multi %s: dx", shape);
    check_grad(what, inc_dx, init_dx, cpu_dx, gdx[0], gdx[1], nx, GT_TOL_BF16);
    for (int i = 0; i < n; i++) {
        if (!dw_d[i]) continue;
        snprintf(what, sizeof what, "matmul_backward_multi %s: dw of part %d", shape, i);
        check_grad(what, inc_dw[i], init_dw[i], cpu_dw[i], gdw[0][i], gdw[1][i], (size_t)outs[i] * in, GT_TOL_BF16);
    }

    /* dx_set: dx written over NaN; the dw's still accumulate (checked against the CPU
     * from the same initial values) */
    float *sdx = gt_host_copy(init_dx, nx);
    for (int i = 0; i < n; i++)
        if (dw_d[i]) memcpy(cpu_dw[i], init_dw[i], fbytes((size_t)outs[i] * in));
    g->cpu->matmul_backward_multi(sdx, 1, cp, n, x, N, in);
    float *sgx[2];
    for (int run = 0; run < 2; run++) {
        gt_poison(g, dx_d, nx);
        for (int i = 0; i < n; i++)
            if (dw_d[i]) g->gpu->from_host(dw_d[i], init_dw[i], fbytes((size_t)outs[i] * in));
        g->gpu->matmul_backward_multi(dx_d, 1, gp, n, x_d, N, in);
        sgx[run] = gt_down(g, dx_d, nx);
        if (run == 0)
            for (int i = 0; i < n; i++) {
                if (!dw_d[i]) continue;
                float *got = gt_down(g, dw_d[i], (size_t)outs[i] * in);
                snprintf(what, sizeof what, "matmul_backward_multi %s [dx_set]: dw of part %d", shape, i);
                gt_compare(what, got, cpu_dw[i], (size_t)outs[i] * in, GT_TOL_BF16);
                free(got);
            }
    }
    snprintf(what, sizeof what, "matmul_backward_multi %s [dx_set]: dx", shape);
    gt_compare(what, sgx[0], sdx, nx, GT_TOL_BF16);
    snprintf(what, sizeof what, "matmul_backward_multi %s [dx_set]: dx deterministic", shape);
    gt_same_bits(what, sgx[0], sgx[1], fbytes(nx));

    free(sdx), free(sgx[0]), free(sgx[1]);
    free(inc_dx), free(init_dx), free(cpu_dx), free(gdx[0]), free(gdx[1]);
    g->gpu->free(dx_d);
    g->gpu->free(x_d);
    free(x);
    for (int i = 0; i < n; i++) {
        free(w[i]), free(dy[i]), free(y[i]), free(inc_dw[i]), free(init_dw[i]), free(cpu_dw[i]);
        free(gdw[0][i]), free(gdw[1][i]);
        g->gpu->free(w_d[i]);
        g->gpu->free(dy_d[i]);
        g->gpu->free(y_d[i]);
        g->gpu->free(dw_d[i]);
    }
}

/* ---- fused SwiGLU MLP ---- */

/* One input of test_swiglu_bf16: the SwiGLU forward and backward with bf16 outputs, from
 * the fp32 input in_d, or from the bf16 input inb_d when that is non-NULL (then in_d holds
 * its values exactly), against the fp32 ops on in_d followed by cuda_to_bf16, bitwise. */
static void swiglu_bf16_case(gt_ctx *g, int N, int h, int sf, const float *in_d, const uint16_t *inb_d,
                             const float *dout_d)
{
    char name[256];
    const char *input = inb_d ? "bf16 input" : "fp32 input";
    const size_t nin = (size_t)N * 2 * h, nout = (size_t)N * h;
    float *f32_d = g->gpu->alloc(fbytes(nin));
    uint16_t *ref_d = g->gpu->alloc(nin * sizeof(uint16_t)), *got_d = g->gpu->alloc(nin * sizeof(uint16_t));
    uint16_t *ref = xmalloc(nin * sizeof(uint16_t)), *got = xmalloc(nin * sizeof(uint16_t));
    for (int bwd = 0; bwd < 2; bwd++) {
        const size_t n = bwd ? nin : nout;
        gt_poison(g, f32_d, nin);
        if (bwd) g->gpu->swiglu_backward_set(f32_d, dout_d, in_d, N, h, sf);
        else g->gpu->swiglu_forward(f32_d, in_d, N, h, sf);
        cuda_to_bf16(ref_d, f32_d, n);
        g->gpu->zero(got_d, nin * sizeof(uint16_t));
        if (bwd && inb_d) cuda_swiglu_backward_set_bf16in(got_d, dout_d, inb_d, N, h, sf);
        else if (bwd) cuda_swiglu_backward_set_bf16(got_d, dout_d, in_d, N, h, sf);
        else if (inb_d) cuda_swiglu_forward_bf16in(got_d, inb_d, N, h, sf);
        else cuda_swiglu_forward_bf16(got_d, in_d, N, h, sf);
        g->gpu->to_host(ref, ref_d, n * sizeof(uint16_t));
        g->gpu->to_host(got, got_d, n * sizeof(uint16_t));
        snprintf(name, sizeof name, "%s N=%d h=%d silu_first=%d, %s: bf16 output = cuda_to_bf16 of the fp32 op",
                 bwd ? "swiglu_backward_set" : "swiglu_forward", N, h, sf, input);
        gt_same_bits(name, got, ref, n * sizeof(uint16_t));
    }
    g->gpu->free(f32_d), g->gpu->free(ref_d), g->gpu->free(got_d);
    free(ref), free(got);
}

/* The SwiGLU kernels' bf16 outputs (the fused MLP's act and dgu) against the fp32 ops
 * followed by cuda_to_bf16: the same bits, which is what makes the fused MLP's GEMM
 * operands those of the op-by-op sequence; also from a bf16 input (gu), against the fp32
 * ops on its exact values. h a multiple of 4 takes the wide path, an odd h the scalar
 * one. */
static void test_swiglu_bf16(gt_ctx *g, int N, int h, int sf)
{
    const size_t nin = (size_t)N * 2 * h, nout = (size_t)N * h;
    float *in = gt_rand(g, nin, -4, 4), *dout = gt_rand(g, nout, -1, 1);
    float *in_d = gt_up(g, in, nin), *dout_d = gt_up(g, dout, nout);
    swiglu_bf16_case(g, N, h, sf, in_d, NULL, dout_d);

    uint16_t *inb_d = g->gpu->alloc(nin * sizeof(uint16_t)), *inb = xmalloc(nin * sizeof(uint16_t));
    cuda_to_bf16(inb_d, in_d, nin);
    g->gpu->to_host(inb, inb_d, nin * sizeof(uint16_t));
    float *inr = bf16_to_floats(inb, nin), *inr_d = gt_up(g, inr, nin);
    swiglu_bf16_case(g, N, h, sf, inr_d, inb_d, dout_d);

    g->gpu->free(in_d), g->gpu->free(dout_d), g->gpu->free(inb_d), g->gpu->free(inr_d);
    free(in), free(dout), free(inb), free(inr);
}

/* mlp_forward and mlp_backward(_set) against the CPU ops (themselves bitwise the CPU's
 * op sequence, tests/test_mlp.c) on the same inputs. The GPU keeps gu and act in its own
 * format (bf16 on the fused path; gu is compared by its values), so each backend's
 * backward reads its own forward's act and gu. Forward: out, gu and out - resid (the MLP
 * alone) with resid apart from out (out, gu, act NaN-poisoned) and resid = out, each
 * twice for the same bits (act's storage too). Backward: each gradient from zero, accumulated and deterministic (check_grad),
 * with the scratch NaN-poisoned before every run; the _set form with dx NaN-poisoned. */
static void test_mlp(gt_ctx *g, int N, int d, int h, int sf)
{
    char name[256], what[256];
    const size_t nd = (size_t)N * d, ngu = (size_t)N * 2 * h, nact = (size_t)N * h;
    const size_t nwgu = (size_t)2 * h * d, nwd = (size_t)d * h, ns = mlp_scratch_floats(N, h);
    const float a_gu = (float)sqrt(3.0 / d), a_down = (float)sqrt(3.0 / h);
    float *x = gt_rand(g, nd, -1, 1), *w_gu = gt_rand(g, nwgu, -a_gu, a_gu);
    float *w_down = gt_rand(g, nwd, -a_down, a_down), *resid = gt_rand(g, nd, -1, 1), *dout = gt_rand(g, nd, -1, 1);
    const int fused = cuda_matmul_bf16_path(N, h, d);
    printf("# mlp N=%d d=%d h=%d silu_first=%d: %s\n", N, d, h, sf,
           fused ? "fused (bf16 gu, act and dgu)" : "separate fp32 ops");
    fflush(stdout);

    /* the CPU */
    float *out = xmalloc(fbytes(nd)), *gu = xmalloc(fbytes(ngu)), *act = xmalloc(fbytes(nact));
    float *scratch = xmalloc(fbytes(ns));
    g->cpu->mlp_forward(out, gu, act, x, w_gu, w_down, resid, N, d, h, sf);
    float *mlp_only = gt_diff(out, resid, nd);

    /* the GPU forward */
    float *x_d = gt_up(g, x, nd), *wgu_d = gt_up(g, w_gu, nwgu), *wd_d = gt_up(g, w_down, nwd);
    float *r_d = gt_up(g, resid, nd), *dout_d = gt_up(g, dout, nd);
    float *out_d = g->gpu->alloc(fbytes(nd)), *gu_d = g->gpu->alloc(fbytes(ngu)), *act_d = g->gpu->alloc(fbytes(nact));
    float *s_d = g->gpu->alloc(fbytes(ns));
    for (int same = 0; same < 2; same++) {
        const char *mode = same ? "resid = out" : "resid != out";
        float *rout[2], *rgu[2], *ract[2];
        for (int run = 0; run < 2; run++) {
            gt_poison(g, gu_d, ngu);
            gt_poison(g, act_d, nact);
            if (same) {
                g->gpu->from_host(out_d, resid, fbytes(nd));
                g->gpu->mlp_forward(out_d, gu_d, act_d, x_d, wgu_d, wd_d, out_d, N, d, h, sf);
            } else {
                gt_poison(g, out_d, nd);
                g->gpu->mlp_forward(out_d, gu_d, act_d, x_d, wgu_d, wd_d, r_d, N, d, h, sf);
            }
            rout[run] = gt_down(g, out_d, nd);
            rgu[run] = gt_down(g, gu_d, ngu);
            ract[run] = gt_down(g, act_d, nact);
        }
        snprintf(name, sizeof name, "mlp_forward N=%d d=%d h=%d silu_first=%d [%s]: out", N, d, h, sf, mode);
        gt_compare(name, rout[0], out, nd, GT_TOL_BF16);
        float *prod = gt_diff(rout[0], resid, nd);
        snprintf(name, sizeof name, "mlp_forward N=%d d=%d h=%d silu_first=%d [%s]: out - resid", N, d, h, sf, mode);
        gt_compare(name, prod, mlp_only, nd, GT_TOL_BF16);
        snprintf(name, sizeof name, "mlp_forward N=%d d=%d h=%d silu_first=%d [%s]: gu", N, d, h, sf, mode);
        if (fused) { /* gu's bf16 rounding in the first half of its storage */
            float *gu_f = bf16_to_floats((const uint16_t *)rgu[0], ngu);
            gt_compare(name, gu_f, gu, ngu, GT_TOL_BF16);
            free(gu_f);
        } else {
            gt_compare(name, rgu[0], gu, ngu, GT_TOL_BF16);
        }
        snprintf(name, sizeof name, "mlp_forward N=%d d=%d h=%d silu_first=%d [%s]: out, gu, act deterministic", N,
                 d, h, sf, mode);
        gt_report(name,
                  !memcmp(rout[0], rout[1], fbytes(nd)) && !memcmp(rgu[0], rgu[1], fbytes(ngu)) &&
                      !memcmp(ract[0], ract[1], fbytes(nact)),
                  "bitwise");
        if (!same) {
            float *r_after = gt_down(g, r_d, nd);
            snprintf(name, sizeof name, "mlp_forward N=%d d=%d h=%d silu_first=%d [resid != out]: resid unchanged", N,
                     d, h, sf);
            gt_same_bits(name, r_after, resid, fbytes(nd));
            free(r_after);
        }
        free(prod);
        for (int run = 0; run < 2; run++) free(rout[run]), free(rgu[run]), free(ract[run]);
    }
    /* gu_d, act_d now hold the GPU forward's saved activations */

    /* the GPU backward's increments from zero */
    float *dx_d = g->gpu->alloc(fbytes(nd)), *dwgu_d = g->gpu->alloc(fbytes(nwgu)), *dwd_d = g->gpu->alloc(fbytes(nwd));
    gt_poison(g, s_d, ns);
    g->gpu->mlp_backward(dx_d, dwgu_d, dwd_d, dout_d, x_d, gu_d, act_d, wgu_d, wd_d, s_d, N, d, h, sf);
    float *inc_dx = gt_down(g, dx_d, nd), *inc_dwgu = gt_down(g, dwgu_d, nwgu), *inc_dwd = gt_down(g, dwd_d, nwd);
    float *init_dx = grad_init(g, inc_dx, nd), *init_dwgu = grad_init(g, inc_dwgu, nwgu);
    float *init_dwd = grad_init(g, inc_dwd, nwd);

    for (int set = 0; set < 2; set++) {
        const char *form = set ? "mlp_backward_set" : "mlp_backward";
        /* the CPU from the initial values (dx: written by the _set form) */
        float *cdx = set ? xmalloc(fbytes(nd)) : gt_host_copy(init_dx, nd);
        float *cdwgu = gt_host_copy(init_dwgu, nwgu), *cdwd = gt_host_copy(init_dwd, nwd);
        for (size_t i = 0; i < ns; i++) scratch[i] = NAN;
        if (set) {
            for (size_t i = 0; i < nd; i++) cdx[i] = NAN;
            g->cpu->mlp_backward_set(cdx, cdwgu, cdwd, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, sf);
        } else {
            g->cpu->mlp_backward(cdx, cdwgu, cdwd, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, sf);
        }
        /* the GPU twice from the same initial values */
        float *gdx[2], *gdwgu[2], *gdwd[2];
        for (int run = 0; run < 2; run++) {
            if (set) gt_poison(g, dx_d, nd);
            else g->gpu->from_host(dx_d, init_dx, fbytes(nd));
            g->gpu->from_host(dwgu_d, init_dwgu, fbytes(nwgu));
            g->gpu->from_host(dwd_d, init_dwd, fbytes(nwd));
            gt_poison(g, s_d, ns);
            if (set) g->gpu->mlp_backward_set(dx_d, dwgu_d, dwd_d, dout_d, x_d, gu_d, act_d, wgu_d, wd_d, s_d, N, d, h, sf);
            else g->gpu->mlp_backward(dx_d, dwgu_d, dwd_d, dout_d, x_d, gu_d, act_d, wgu_d, wd_d, s_d, N, d, h, sf);
            gdx[run] = gt_down(g, dx_d, nd);
            gdwgu[run] = gt_down(g, dwgu_d, nwgu);
            gdwd[run] = gt_down(g, dwd_d, nwd);
        }
        if (set) {
            snprintf(what, sizeof what, "%s N=%d d=%d h=%d silu_first=%d: dx", form, N, d, h, sf);
            gt_compare(what, gdx[0], cdx, nd, GT_TOL_BF16);
            snprintf(what, sizeof what, "%s N=%d d=%d h=%d silu_first=%d: dx deterministic", form, N, d, h, sf);
            gt_same_bits(what, gdx[0], gdx[1], fbytes(nd));
        } else {
            snprintf(what, sizeof what, "%s N=%d d=%d h=%d silu_first=%d: dx", form, N, d, h, sf);
            check_grad(what, inc_dx, init_dx, cdx, gdx[0], gdx[1], nd, GT_TOL_BF16);
        }
        snprintf(what, sizeof what, "%s N=%d d=%d h=%d silu_first=%d: dw_gu", form, N, d, h, sf);
        check_grad(what, inc_dwgu, init_dwgu, cdwgu, gdwgu[0], gdwgu[1], nwgu, GT_TOL_BF16);
        snprintf(what, sizeof what, "%s N=%d d=%d h=%d silu_first=%d: dw_down", form, N, d, h, sf);
        check_grad(what, inc_dwd, init_dwd, cdwd, gdwd[0], gdwd[1], nwd, GT_TOL_BF16);
        for (int run = 0; run < 2; run++) free(gdx[run]), free(gdwgu[run]), free(gdwd[run]);
        free(cdx), free(cdwgu), free(cdwd);
    }

    float *dev[] = {x_d, wgu_d, wd_d, r_d, dout_d, out_d, gu_d, act_d, s_d, dx_d, dwgu_d, dwd_d};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) g->gpu->free(dev[i]);
    free(x), free(w_gu), free(w_down), free(resid), free(dout), free(out), free(gu), free(act), free(scratch);
    free(mlp_only), free(inc_dx), free(inc_dwgu), free(inc_dwd), free(init_dx), free(init_dwgu), free(init_dwd);
}

/* ---- classifier ---- */

/* ignore_pct: the percentage of targets set to -100 */
static void test_classifier(gt_ctx *g, int N, int V, int C, int ignore_pct)
{
    char name[256], what[256];
    const size_t nh = (size_t)N * C, nw = (size_t)V * C;
    const float s = (float)(3.0 / sqrt((double)C)); /* logits of unit variance */
    float *h = gt_rand(g, nh, -1, 1), *wte = gt_rand(g, nw, -s, s);
    int32_t *targets = gt_rand_int(g, (size_t)N, 0, V), *pct = gt_rand_int(g, (size_t)N, 0, 100);
    int valid = 0;
    for (int i = 0; i < N; i++) {
        if (pct[i] < ignore_pct) targets[i] = -100;
        else valid++;
    }
    /* The chunking of kernels/classifier.cu, so the log shows whether a case ran in
     * several chunks with a ragged last one. */
    const long rows = cuda_classifier_chunk_rows(N, V);
    printf("# classifier N=%d V=%d C=%d: %d of %d targets ignored; %ld chunk(s) of %ld rows, last %ld\n", N, V, C,
           N - valid, N, (N + rows - 1) / rows, rows, N - (N - 1) / rows * rows);
    fflush(stdout);

    float *h_d = gt_up(g, h, nh), *wte_d = gt_up(g, wte, nw);
    int32_t *t_d = gt_up_int(g, targets, (size_t)N);

    /* forward */
    float *loss = xmalloc(fbytes(N)), *lse = xmalloc(fbytes(N));
    g->cpu->classifier_forward(loss, lse, h, wte, targets, N, V, C);
    float *loss_d = g->gpu->alloc(fbytes(N)), *lse_d = g->gpu->alloc(fbytes(N));
    float *gloss[2], *glse[2];
    for (int run = 0; run < 2; run++) {
        gt_poison(g, loss_d, N);
        gt_poison(g, lse_d, N);
        g->gpu->classifier_forward(loss_d, lse_d, h_d, wte_d, t_d, N, V, C);
        gloss[run] = gt_down(g, loss_d, N);
        glse[run] = gt_down(g, lse_d, N);
    }
    snprintf(name, sizeof name, "classifier_forward N=%d V=%d C=%d: loss", N, V, C);
    gt_compare(name, gloss[0], loss, N, GT_TOL_BF16);
    snprintf(name, sizeof name, "classifier_forward N=%d V=%d C=%d: lse", N, V, C);
    gt_compare(name, glse[0], lse, N, GT_TOL_BF16);
    int nonzero = 0;
    for (int i = 0; i < N; i++)
        if (targets[i] == -100 && gloss[0][i] != 0.0f) nonzero++;
    char detail[128];
    snprintf(detail, sizeof detail, "%d of %d ignored rows have nonzero loss", nonzero, N - valid);
    snprintf(name, sizeof name, "classifier_forward N=%d V=%d C=%d: loss 0 at target -100", N, V, C);
    gt_report(name, nonzero == 0, detail);
    snprintf(name, sizeof name, "classifier_forward N=%d V=%d C=%d: loss, lse deterministic", N, V, C);
    gt_report(name, !memcmp(gloss[0], gloss[1], fbytes(N)) && !memcmp(glse[0], glse[1], fbytes(N)),
              "bitwise");

    /* backward, from the CPU's lse on both sides (identical inputs), scale 1 / valid as
     * for a mean loss */
    const float scale = valid ? 1.0f / valid : 1.0f;
    float *lse_in = gt_up(g, lse, N);
    float *dh_d = g->gpu->alloc(fbytes(nh)), *dwte_d = g->gpu->alloc(fbytes(nw)); /* zero-filled */
    g->gpu->classifier_backward(dh_d, dwte_d, h_d, wte_d, t_d, lse_in, scale, N, V, C);
    float *inc_dh = gt_down(g, dh_d, nh), *inc_dwte = gt_down(g, dwte_d, nw);
    float *init_dh = grad_init(g, inc_dh, nh), *init_dwte = grad_init(g, inc_dwte, nw);
    float *cpu_dh = gt_host_copy(init_dh, nh), *cpu_dwte = gt_host_copy(init_dwte, nw);
    g->cpu->classifier_backward(cpu_dh, cpu_dwte, h, wte, targets, lse, scale, N, V, C);
    float *gdh[2], *gdwte[2];
    for (int run = 0; run < 2; run++) {
        g->gpu->from_host(dh_d, init_dh, fbytes(nh));
        g->gpu->from_host(dwte_d, init_dwte, fbytes(nw));
        g->gpu->classifier_backward(dh_d, dwte_d, h_d, wte_d, t_d, lse_in, scale, N, V, C);
        gdh[run] = gt_down(g, dh_d, nh);
        gdwte[run] = gt_down(g, dwte_d, nw);
    }
    snprintf(what, sizeof what, "classifier_backward N=%d V=%d C=%d: dh", N, V, C);
    check_grad(what, inc_dh, init_dh, cpu_dh, gdh[0], gdh[1], nh, GT_TOL_BF16);
    snprintf(what, sizeof what, "classifier_backward N=%d V=%d C=%d: dwte", N, V, C);
    check_grad(what, inc_dwte, init_dwte, cpu_dwte, gdwte[0], gdwte[1], nw, GT_TOL_BF16);

    /* the fused op (a training step's head): the GPU's two ops in turn, bit for bit, and
     * the CPU's, from the same initial gradients */
    float *fused[4], *pair[4];
    for (int f = 0; f < 2; f++) {
        gt_poison(g, loss_d, N);
        gt_poison(g, lse_d, N);
        g->gpu->from_host(dh_d, init_dh, fbytes(nh));
        g->gpu->from_host(dwte_d, init_dwte, fbytes(nw));
        if (f == 0) {
            g->gpu->classifier_forward_backward(loss_d, lse_d, dh_d, dwte_d, h_d, wte_d, t_d, scale, N, V, C);
        } else {
            g->gpu->classifier_forward(loss_d, lse_d, h_d, wte_d, t_d, N, V, C);
            g->gpu->classifier_backward(dh_d, dwte_d, h_d, wte_d, t_d, lse_d, scale, N, V, C);
        }
        float **out = f == 0 ? fused : pair;
        out[0] = gt_down(g, loss_d, N), out[1] = gt_down(g, lse_d, N);
        out[2] = gt_down(g, dh_d, nh), out[3] = gt_down(g, dwte_d, nw);
    }
    static const char *fnames[4] = {"loss", "lse", "dh", "dwte"};
    const size_t fn[4] = {(size_t)N, (size_t)N, nh, nw};
    memcpy(cpu_dh, init_dh, fbytes(nh));
    memcpy(cpu_dwte, init_dwte, fbytes(nw));
    float *closs = xmalloc(fbytes(N)), *clse = xmalloc(fbytes(N));
    g->cpu->classifier_forward_backward(closs, clse, cpu_dh, cpu_dwte, h, wte, targets, scale, N, V, C);
    const float *cpu_out[4] = {closs, clse, cpu_dh, cpu_dwte};
    for (int i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "classifier_forward_backward N=%d V=%d C=%d: %s = forward then backward, bitwise",
                 N, V, C, fnames[i]);
        gt_same_bits(name, fused[i], pair[i], fbytes(fn[i]));
        snprintf(name, sizeof name, "classifier_forward_backward N=%d V=%d C=%d: %s against the CPU", N, V, C,
                 fnames[i]);
        gt_compare(name, fused[i], cpu_out[i], fn[i], GT_TOL_BF16);
        free(fused[i]), free(pair[i]);
    }
    free(closs), free(clse);

    g->gpu->free(h_d);
    g->gpu->free(wte_d);
    g->gpu->free(t_d);
    g->gpu->free(loss_d);
    g->gpu->free(lse_d);
    g->gpu->free(lse_in);
    g->gpu->free(dh_d);
    g->gpu->free(dwte_d);
    free(h), free(wte), free(targets), free(pct), free(loss), free(lse);
    for (int run = 0; run < 2; run++) free(gloss[run]), free(glse[run]), free(gdh[run]), free(gdwte[run]);
    free(inc_dh), free(inc_dwte), free(init_dh), free(init_dwte), free(cpu_dh), free(cpu_dwte);
}

int main(void)
{
    gt_ctx g;
    gt_init(&g, 20250611);

    /* small (fp32 operands, bf16 fast mode), bf16 copies, skinny (TF32 on fp32 operands),
     * and forwards of at most 16 outputs on the CUDA-core kernel of matmul_narrow.cu (the
     * model's 16384 x 1024 -> 12, a ragged N, a width not a multiple of 128, a tiny one);
     * the narrow shapes that kernel refuses fall back to TF32 (a width not a multiple of
     * 4; 16 x 1536 weights, past its shared memory) */
    static const int mm[][3] = {{7, 13, 5},         {4096, 1024, 3072}, {1000, 85, 257}, {16384, 1024, 256},
                                {16385, 1024, 12},  {12000, 100, 2048}, {40000, 1023, 5}, {9000, 1536, 16},
                                {16384, 1024, 12}, {3001, 300, 7},     {50, 8, 16}};
    for (size_t i = 0; i < sizeof mm / sizeof mm[0]; i++) {
        const int N = mm[i][0], in = mm[i][1], out = mm[i][2];
        test_matmul_forward(&g, N, in, out);
        test_matmul_forward_add(&g, N, in, out, 0);
        test_matmul_backward(&g, N, in, out, 1, 0);
        test_matmul_backward(&g, N, in, out, 0, 1);
        test_matmul_backward(&g, N, in, out, 1, 1);
    }
    /* the forward with a residual on the bf16 path at the model's shapes (N = 16384, d =
     * 1024: attention / GDN output projection and MLP down projection), and with y and r
     * only 4-byte aligned, in a shape whose bf16 weight copy is only 64-byte aligned */
    test_matmul_forward_add(&g, 16384, 1024, 1024, 0);
    test_matmul_forward_add(&g, 16384, 4096, 1024, 0);
    test_matmul_forward_add(&g, 2053, 1030, 1001, 1);
    test_matmul_forward_add(&g, 2053, 1024, 12, 1); /* narrow, y and r 4-byte aligned */

    /* several Linear layers on one input: the model's Gated DeltaNet (gates g, beta and
     * two latent down projections; the gates stacked into one GEMM and split) and MLA
     * (key/value latent, rope key alone as the narrow GEMM, query latent) at N = 16384;
     * ragged shapes with a part on the bf16 path, six parts with a width of 1 and a part
     * without dw; all parts small or skinny (part by part on the GPU too) */
    static const int gdn_outs[] = {12, 12, 256, 256}, mla_outs[] = {512, 64, 256}, rag_outs[] = {7, 300, 5, 129};
    static const int six_outs[] = {12, 12, 200, 1, 129, 64}, small_outs[] = {5, 3}, skinny_outs[] = {12, 64};
    test_matmul_multi(&g, 16384, 1024, gdn_outs, 4, -1);
    test_matmul_multi(&g, 16384, 1024, mla_outs, 3, -1);
    test_matmul_multi(&g, 3001, 1030, rag_outs, 4, -1);
    test_matmul_multi(&g, 2053, 1024, six_outs, 6, 1);
    test_matmul_multi(&g, 7, 13, small_outs, 2, -1);
    test_matmul_multi(&g, 4096, 1024, skinny_outs, 2, 0);

    /* the fused MLP: on the bf16 path (the model's proportions, and a ragged one whose odd
     * h takes the SwiGLU kernels' scalar path and odd bf16 leading dimensions), on the
     * separate fp32 ops (small; skinny h), in both SwiGLU conventions */
    for (int sf = 0; sf < 2; sf++) {
        test_swiglu_bf16(&g, 64, 2048, sf);
        test_swiglu_bf16(&g, 37, 1001, sf);
    }
    static const int mlp[][3] = {{4096, 1024, 2048}, {2053, 1030, 1001}, {7, 13, 5}, {300, 96, 200}, {4096, 1024, 64}};
    for (size_t i = 0; i < sizeof mlp / sizeof mlp[0]; i++)
        for (int sf = 0; sf < 2; sf++) test_mlp(&g, mlp[i][0], mlp[i][1], mlp[i][2], sf);

    test_classifier(&g, 7, 37, 13, 0);
    test_classifier(&g, 2700, 50304, 1024, 5);  /* 2 chunks, the last of 32 rows */
    test_classifier(&g, 5337, 50304, 64, 10);   /* 3 chunks, the last of 1 row */
    test_classifier(&g, 100, 256, 64, 15);

    printf("# test_gpu_dense: %d failure(s)\n", gt_failures());
    return gt_failures() != 0;
}
