/* test_gpu_basic.c: the memory-bound ops of the CUDA backend against the CPU oracle:
 * vector add/scale/sum of squares, embedding forward/backward, RMSNorm, LayerNorm,
 * SwiGLU (both conventions), the Gated DeltaNet gates, the per-row L2 norm and the
 * short causal conv (with and without document starts).
 *
 * Every op runs on the GPU and on the CPU with the same random inputs; sizes include
 * odd ones (C = 13, C not a multiple of 4, a single row) and large ones, and some
 * cases offset every device buffer by one float so that the kernels' scalar
 * (unaligned) paths run too. Forward outputs are NaN-poisoned on the GPU first, so an
 * element the kernel forgets to write fails; each forward runs twice and the two
 * results must have the same bits. Backward ops accumulate, so each gradient is
 * checked three ways:
 *   - "from zero": a GPU run into zeroed buffers against the CPU's increment (its
 *     result minus the initial values), the op's own contribution;
 *   - "accumulated": a GPU run from random initial values whose rms equals that
 *     increment's, against the CPU run from the same values; an op that overwrote
 *     instead of adding (or added twice) is off by about 100% here;
 *   - "deterministic": a second GPU run from the same values gives the same bits.
 * Backward ops get the saved statistics (rstd, mean, rnorm) of the CPU forward on both
 * sides, so each backward is tested on its own.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

#define V_GPT 50304

static gt_ctx G;

static size_t fbytes(size_t n) { return n * sizeof(float); }

static double rms(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return n ? sqrt(s / n) : 0;
}

/* ---- device buffers, optionally offset by `off` floats from a 256-byte aligned
 * allocation so that float4 paths cannot be taken ---- */

static float *dev_alloc(size_t n, int off) { return (float *)G.gpu->alloc(fbytes(n + off)) + off; }

static float *dev_up(const float *host, size_t n, int off)
{
    float *d = dev_alloc(n, off);
    G.gpu->from_host(d, host, fbytes(n));
    return d;
}

static void dev_free(float *d, int off) { G.gpu->free(d - off); }

/* ---- forward outputs ---- */

typedef struct fwd_out {
    const char *name;
    size_t n;
    float *dev;    /* GPU output */
    float *cpu;    /* CPU output (host) */
    float *res[2]; /* two GPU runs (host) */
} fwd_out;

static void out_init(fwd_out *o, const char *name, size_t n, int off)
{
    o->name = name;
    o->n = n;
    o->dev = dev_alloc(n, off);
    o->cpu = xmalloc(fbytes(n));
    o->res[0] = o->res[1] = NULL;
}

static void out_poison(fwd_out *o) { gt_poison(&G, o->dev, o->n); }
static void out_take(fwd_out *o, int run) { o->res[run] = gt_down(&G, o->dev, o->n); }

static void out_check_free(fwd_out *o, const char *ctx, int off)
{
    char name[256];
    snprintf(name, sizeof name, "%s: %s", ctx, o->name);
    gt_compare(name, o->res[0], o->cpu, o->n, GT_TOL_FP32);
    snprintf(name, sizeof name, "%s: %s deterministic", ctx, o->name);
    gt_same_bits(name, o->res[0], o->res[1], fbytes(o->n));
    dev_free(o->dev, off);
    free(o->cpu), free(o->res[0]), free(o->res[1]);
}

/* ---- accumulated gradients (see the top) ---- */

typedef struct grad {
    const char *name;
    size_t n;
    float *dev;                     /* GPU gradient buffer */
    float *inc, *init, *cpu, *r[2]; /* host: GPU increment from zero, initial values, CPU result, two GPU runs */
} grad;

static void grad_init(grad *q, const char *name, size_t n, int off)
{
    memset(q, 0, sizeof *q);
    q->name = name;
    q->n = n;
    q->dev = dev_alloc(n, off); /* zero-filled */
}

/* After the GPU run from zero: keep the increment, draw initial values with its rms
 * and start the CPU result from them. */
static void grad_after_zero(grad *q)
{
    q->inc = gt_down(&G, q->dev, q->n);
    double r = rms(q->inc, q->n);
    if (!(r > 0)) r = 1;
    q->init = gt_rand(&G, q->n, -1, 1);
    for (size_t i = 0; i < q->n; i++) q->init[i] = (float)(q->init[i] * r * sqrt(3.0));
    q->cpu = gt_host_copy(q->init, q->n);
}

static void grad_load_init(grad *q) { G.gpu->from_host(q->dev, q->init, fbytes(q->n)); }
static void grad_take(grad *q, int run) { q->r[run] = gt_down(&G, q->dev, q->n); }

static void grad_check_free(grad *q, const char *ctx, int off)
{
    char name[256];
    float *inc_cpu = xmalloc(fbytes(q->n));
    for (size_t i = 0; i < q->n; i++) inc_cpu[i] = q->cpu[i] - q->init[i];
    snprintf(name, sizeof name, "%s: %s from zero", ctx, q->name);
    gt_compare(name, q->inc, inc_cpu, q->n, GT_TOL_FP32);
    snprintf(name, sizeof name, "%s: %s accumulated", ctx, q->name);
    gt_compare(name, q->r[0], q->cpu, q->n, GT_TOL_FP32);
    snprintf(name, sizeof name, "%s: %s deterministic", ctx, q->name);
    gt_same_bits(name, q->r[0], q->r[1], fbytes(q->n));
    dev_free(q->dev, off);
    free(inc_cpu), free(q->inc), free(q->init), free(q->cpu), free(q->r[0]), free(q->r[1]);
}

static const char *off_tag(int off) { return off ? " unaligned" : ""; }

/* ---- add_inplace, scale_inplace: y is both input and output ---- */

static void test_add_scale(size_t n, int off)
{
    char ctx[128], name[256];
    float *y = gt_rand(&G, n, -1, 1), *x = gt_rand(&G, n, -1, 1);
    float *x_d = dev_up(x, n, off), *y_d = dev_alloc(n, off);
    const float s = -0.37f;
    for (int op = 0; op < 2; op++) {
        snprintf(ctx, sizeof ctx, "%s n=%zu%s", op ? "scale_inplace" : "add_inplace", n, off_tag(off));
        float *ref = gt_host_copy(y, n), *res[2];
        if (op)
            G.cpu->scale_inplace(ref, s, n);
        else
            G.cpu->add_inplace(ref, x, n);
        for (int run = 0; run < 2; run++) {
            G.gpu->from_host(y_d, y, fbytes(n));
            if (op)
                G.gpu->scale_inplace(y_d, s, n);
            else
                G.gpu->add_inplace(y_d, x_d, n);
            res[run] = gt_down(&G, y_d, n);
        }
        snprintf(name, sizeof name, "%s: y", ctx);
        gt_compare(name, res[0], ref, n, GT_TOL_FP32);
        snprintf(name, sizeof name, "%s: y deterministic", ctx);
        gt_same_bits(name, res[0], res[1], fbytes(n));
        free(ref), free(res[0]), free(res[1]);
    }
    dev_free(x_d, off), dev_free(y_d, off);
    free(x), free(y);
}

/* ---- sumsq: a host double; both sides sum in double, so the bound is far tighter
 * than fp32's ---- */

static void test_sumsq(size_t n, int off)
{
    char name[256], detail[160];
    float *x = gt_rand(&G, n, -2, 2);
    float *x_d = dev_up(x, n, off);
    double c = G.cpu->sumsq(x, n);
    double a = G.gpu->sumsq(x_d, n), b = G.gpu->sumsq(x_d, n);
    double rel = fabs(a - c) / (fabs(c) > 1e-300 ? fabs(c) : 1e-300);
    snprintf(name, sizeof name, "sumsq n=%zu%s", n, off_tag(off));
    snprintf(detail, sizeof detail, "gpu %.17g cpu %.17g rel err %.3g (tol 1e-10)", a, c, rel);
    gt_report(name, isfinite(a) && rel <= 1e-10, detail);
    snprintf(name, sizeof name, "sumsq n=%zu%s deterministic", n, off_tag(off));
    gt_same_bits(name, &a, &b, sizeof a);
    dev_free(x_d, off);
    free(x);
}

/* ---- embedding: `hot` > 0 sends every third token to one of a few ids (first, last,
 * a middle one), so rows are hit many times; tiny V repeats everything ---- */

static int32_t *make_tokens(int N, int V, int hot)
{
    int32_t *tok = gt_rand_int(&G, (size_t)N, 0, V);
    const int32_t hot_ids[3] = {0, V / 3, V - 1};
    if (hot)
        for (int i = 0; i < N; i += 3) tok[i] = hot_ids[(i / 3) % 3];
    return tok;
}

static void test_embedding(int N, int C, int V, int hot, int off)
{
    char ctx[128];
    snprintf(ctx, sizeof ctx, "embedding N=%d C=%d V=%d%s%s", N, C, V, hot ? " repeated" : "", off_tag(off));
    const size_t nw = (size_t)V * C, no = (size_t)N * C;
    int32_t *tok = make_tokens(N, V, hot);
    int32_t *tok_d = gt_up_int(&G, tok, (size_t)N);
    float *wte = gt_rand(&G, nw, -1, 1), *dout = gt_rand(&G, no, -1, 1);
    float *wte_d = dev_up(wte, nw, off), *dout_d = dev_up(dout, no, off);

    char fctx[160];
    snprintf(fctx, sizeof fctx, "%s forward", ctx);
    fwd_out o;
    out_init(&o, "out", no, off);
    G.cpu->embedding_forward(o.cpu, tok, wte, N, C);
    for (int run = 0; run < 2; run++) {
        out_poison(&o);
        G.gpu->embedding_forward(o.dev, tok_d, wte_d, N, C);
        out_take(&o, run);
    }
    out_check_free(&o, fctx, off);

    snprintf(fctx, sizeof fctx, "%s backward", ctx);
    grad q;
    grad_init(&q, "dwte", nw, off);
    G.gpu->embedding_backward(q.dev, dout_d, tok_d, N, C);
    grad_after_zero(&q);
    G.cpu->embedding_backward(q.cpu, dout, tok, N, C);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&q);
        G.gpu->embedding_backward(q.dev, dout_d, tok_d, N, C);
        grad_take(&q, run);
    }
    grad_check_free(&q, fctx, off);

    G.gpu->free(tok_d);
    dev_free(wte_d, off), dev_free(dout_d, off);
    free(tok), free(wte), free(dout);
}

/* ---- RMSNorm ---- */

static void test_rmsnorm(int N, int C, int off)
{
    char ctx[128];
    const size_t n = (size_t)N * C;
    float *x = gt_rand(&G, n, -2, 2), *w = gt_rand(&G, (size_t)C, 0.5f, 1.5f), *dout = gt_rand(&G, n, -1, 1);
    float *x_d = dev_up(x, n, off), *w_d = dev_up(w, (size_t)C, off), *dout_d = dev_up(dout, n, off);

    snprintf(ctx, sizeof ctx, "rmsnorm_forward N=%d C=%d%s", N, C, off_tag(off));
    fwd_out o, r;
    out_init(&o, "out", n, off);
    out_init(&r, "rstd", (size_t)N, off);
    G.cpu->rmsnorm_forward(o.cpu, r.cpu, x, w, N, C);
    for (int run = 0; run < 2; run++) {
        out_poison(&o), out_poison(&r);
        G.gpu->rmsnorm_forward(o.dev, r.dev, x_d, w_d, N, C);
        out_take(&o, run), out_take(&r, run);
    }
    float *rstd = gt_host_copy(r.cpu, (size_t)N);
    out_check_free(&o, ctx, off);
    out_check_free(&r, ctx, off);

    snprintf(ctx, sizeof ctx, "rmsnorm_backward N=%d C=%d%s", N, C, off_tag(off));
    float *rstd_d = dev_up(rstd, (size_t)N, off);
    grad dx, dw;
    grad_init(&dx, "dx", n, off);
    grad_init(&dw, "dw", (size_t)C, off);
    G.gpu->rmsnorm_backward(dx.dev, dw.dev, dout_d, x_d, w_d, rstd_d, N, C);
    grad_after_zero(&dx), grad_after_zero(&dw);
    G.cpu->rmsnorm_backward(dx.cpu, dw.cpu, dout, x, w, rstd, N, C);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&dx), grad_load_init(&dw);
        G.gpu->rmsnorm_backward(dx.dev, dw.dev, dout_d, x_d, w_d, rstd_d, N, C);
        grad_take(&dx, run), grad_take(&dw, run);
    }
    grad_check_free(&dx, ctx, off);
    grad_check_free(&dw, ctx, off);

    dev_free(x_d, off), dev_free(w_d, off), dev_free(dout_d, off), dev_free(rstd_d, off);
    free(x), free(w), free(dout), free(rstd);
}

/* ---- LayerNorm: x off-centre so that the mean matters ---- */

static void test_layernorm(int N, int C, int off)
{
    char ctx[128];
    const size_t n = (size_t)N * C;
    float *x = gt_rand(&G, n, 1, 3), *w = gt_rand(&G, (size_t)C, 0.5f, 1.5f), *b = gt_rand(&G, (size_t)C, -0.5f, 0.5f);
    float *dout = gt_rand(&G, n, -1, 1);
    float *x_d = dev_up(x, n, off), *w_d = dev_up(w, (size_t)C, off), *b_d = dev_up(b, (size_t)C, off);
    float *dout_d = dev_up(dout, n, off);

    snprintf(ctx, sizeof ctx, "layernorm_forward N=%d C=%d%s", N, C, off_tag(off));
    fwd_out o, m, r;
    out_init(&o, "out", n, off);
    out_init(&m, "mean", (size_t)N, off);
    out_init(&r, "rstd", (size_t)N, off);
    G.cpu->layernorm_forward(o.cpu, m.cpu, r.cpu, x, w, b, N, C);
    for (int run = 0; run < 2; run++) {
        out_poison(&o), out_poison(&m), out_poison(&r);
        G.gpu->layernorm_forward(o.dev, m.dev, r.dev, x_d, w_d, b_d, N, C);
        out_take(&o, run), out_take(&m, run), out_take(&r, run);
    }
    float *mean = gt_host_copy(m.cpu, (size_t)N), *rstd = gt_host_copy(r.cpu, (size_t)N);
    out_check_free(&o, ctx, off);
    out_check_free(&m, ctx, off);
    out_check_free(&r, ctx, off);

    snprintf(ctx, sizeof ctx, "layernorm_backward N=%d C=%d%s", N, C, off_tag(off));
    float *mean_d = dev_up(mean, (size_t)N, off), *rstd_d = dev_up(rstd, (size_t)N, off);
    grad dx, dw, db;
    grad_init(&dx, "dx", n, off);
    grad_init(&dw, "dw", (size_t)C, off);
    grad_init(&db, "db", (size_t)C, off);
    G.gpu->layernorm_backward(dx.dev, dw.dev, db.dev, dout_d, x_d, w_d, mean_d, rstd_d, N, C);
    grad_after_zero(&dx), grad_after_zero(&dw), grad_after_zero(&db);
    G.cpu->layernorm_backward(dx.cpu, dw.cpu, db.cpu, dout, x, w, mean, rstd, N, C);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&dx), grad_load_init(&dw), grad_load_init(&db);
        G.gpu->layernorm_backward(dx.dev, dw.dev, db.dev, dout_d, x_d, w_d, mean_d, rstd_d, N, C);
        grad_take(&dx, run), grad_take(&dw, run), grad_take(&db, run);
    }
    grad_check_free(&dx, ctx, off);
    grad_check_free(&dw, ctx, off);
    grad_check_free(&db, ctx, off);

    dev_free(x_d, off), dev_free(w_d, off), dev_free(b_d, off), dev_free(dout_d, off);
    dev_free(mean_d, off), dev_free(rstd_d, off);
    free(x), free(w), free(b), free(dout), free(mean), free(rstd);
}

/* ---- SwiGLU ---- */

static void test_swiglu(int N, int h, int silu_first, int off)
{
    char ctx[128];
    const size_t ni = (size_t)N * 2 * h, no = (size_t)N * h;
    float *in = gt_rand(&G, ni, -4, 4), *dout = gt_rand(&G, no, -1, 1);
    float *in_d = dev_up(in, ni, off), *dout_d = dev_up(dout, no, off);

    snprintf(ctx, sizeof ctx, "swiglu_forward N=%d h=%d silu_first=%d%s", N, h, silu_first, off_tag(off));
    fwd_out o;
    out_init(&o, "out", no, off);
    G.cpu->swiglu_forward(o.cpu, in, N, h, silu_first);
    for (int run = 0; run < 2; run++) {
        out_poison(&o);
        G.gpu->swiglu_forward(o.dev, in_d, N, h, silu_first);
        out_take(&o, run);
    }
    out_check_free(&o, ctx, off);

    snprintf(ctx, sizeof ctx, "swiglu_backward N=%d h=%d silu_first=%d%s", N, h, silu_first, off_tag(off));
    grad din;
    grad_init(&din, "din", ni, off);
    G.gpu->swiglu_backward(din.dev, dout_d, in_d, N, h, silu_first);
    grad_after_zero(&din);
    G.cpu->swiglu_backward(din.cpu, dout, in, N, h, silu_first);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&din);
        G.gpu->swiglu_backward(din.dev, dout_d, in_d, N, h, silu_first);
        grad_take(&din, run);
    }
    grad_check_free(&din, ctx, off);

    /* the _set form writes din over whatever it held (NaN here) */
    snprintf(ctx, sizeof ctx, "swiglu_backward_set N=%d h=%d silu_first=%d%s", N, h, silu_first, off_tag(off));
    fwd_out ds;
    out_init(&ds, "din", ni, off);
    G.cpu->swiglu_backward_set(ds.cpu, dout, in, N, h, silu_first);
    for (int run = 0; run < 2; run++) {
        out_poison(&ds);
        G.gpu->swiglu_backward_set(ds.dev, dout_d, in_d, N, h, silu_first);
        out_take(&ds, run);
    }
    out_check_free(&ds, ctx, off);

    dev_free(in_d, off), dev_free(dout_d, off);
    free(in), free(dout);
}

/* ---- gates: raw values out to +-20 so that both branches and the saturated ends of
 * sigmoid/logsigmoid run ---- */

static void test_gates(size_t n, int off)
{
    char ctx[128];
    float *graw = gt_rand(&G, n, -20, 20), *braw = gt_rand(&G, n, -20, 20);
    float *dg = gt_rand(&G, n, -1, 1), *dbeta = gt_rand(&G, n, -1, 1);
    float *graw_d = dev_up(graw, n, off), *braw_d = dev_up(braw, n, off);
    float *dg_d = dev_up(dg, n, off), *dbeta_d = dev_up(dbeta, n, off);

    snprintf(ctx, sizeof ctx, "gates_forward n=%zu%s", n, off_tag(off));
    fwd_out g, beta;
    out_init(&g, "g", n, off);
    out_init(&beta, "beta", n, off);
    G.cpu->gates_forward(g.cpu, beta.cpu, graw, braw, n);
    for (int run = 0; run < 2; run++) {
        out_poison(&g), out_poison(&beta);
        G.gpu->gates_forward(g.dev, beta.dev, graw_d, braw_d, n);
        out_take(&g, run), out_take(&beta, run);
    }
    out_check_free(&g, ctx, off);
    out_check_free(&beta, ctx, off);

    snprintf(ctx, sizeof ctx, "gates_backward n=%zu%s", n, off_tag(off));
    grad dgraw, dbraw;
    grad_init(&dgraw, "dgraw", n, off);
    grad_init(&dbraw, "dbraw", n, off);
    G.gpu->gates_backward(dgraw.dev, dbraw.dev, dg_d, dbeta_d, graw_d, braw_d, n);
    grad_after_zero(&dgraw), grad_after_zero(&dbraw);
    G.cpu->gates_backward(dgraw.cpu, dbraw.cpu, dg, dbeta, graw, braw, n);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&dgraw), grad_load_init(&dbraw);
        G.gpu->gates_backward(dgraw.dev, dbraw.dev, dg_d, dbeta_d, graw_d, braw_d, n);
        grad_take(&dgraw, run), grad_take(&dbraw, run);
    }
    grad_check_free(&dgraw, ctx, off);
    grad_check_free(&dbraw, ctx, off);

    dev_free(graw_d, off), dev_free(braw_d, off), dev_free(dg_d, off), dev_free(dbeta_d, off);
    free(graw), free(braw), free(dg), free(dbeta);
}

/* ---- l2norm: zero_row >= 0 zeroes that row of x, so the clamped branch runs (its
 * rnorm is 1e12 and its dx is 1e12 dy, which dominates the norm: a separate case) ---- */

static void test_l2norm(int n, int D, int zero_row, int off)
{
    char ctx[128];
    const size_t nx = (size_t)n * D;
    float *x = gt_rand(&G, nx, -1, 1), *dy = gt_rand(&G, nx, -1, 1);
    if (zero_row >= 0) memset(x + (size_t)zero_row * D, 0, fbytes((size_t)D));
    float *x_d = dev_up(x, nx, off), *dy_d = dev_up(dy, nx, off);

    snprintf(ctx, sizeof ctx, "l2norm_forward n=%d D=%d%s%s", n, D, zero_row >= 0 ? " zero row" : "", off_tag(off));
    fwd_out y, r;
    out_init(&y, "y", nx, off);
    out_init(&r, "rnorm", (size_t)n, off);
    G.cpu->l2norm_forward(y.cpu, r.cpu, x, n, D);
    for (int run = 0; run < 2; run++) {
        out_poison(&y), out_poison(&r);
        G.gpu->l2norm_forward(y.dev, r.dev, x_d, n, D);
        out_take(&y, run), out_take(&r, run);
    }
    float *rnorm = gt_host_copy(r.cpu, (size_t)n);
    out_check_free(&y, ctx, off);
    out_check_free(&r, ctx, off);

    snprintf(ctx, sizeof ctx, "l2norm_backward n=%d D=%d%s%s", n, D, zero_row >= 0 ? " zero row" : "",
             off_tag(off));
    float *rnorm_d = dev_up(rnorm, (size_t)n, off);
    grad dx;
    grad_init(&dx, "dx", nx, off);
    G.gpu->l2norm_backward(dx.dev, dy_d, x_d, rnorm_d, n, D);
    grad_after_zero(&dx);
    G.cpu->l2norm_backward(dx.cpu, dy, x, rnorm, n, D);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&dx);
        G.gpu->l2norm_backward(dx.dev, dy_d, x_d, rnorm_d, n, D);
        grad_take(&dx, run);
    }
    grad_check_free(&dx, ctx, off);

    /* the _set form writes dx: over NaN it must give the CPU's result on zeros */
    snprintf(ctx, sizeof ctx, "l2norm_backward_set n=%d D=%d%s%s", n, D, zero_row >= 0 ? " zero row" : "",
             off_tag(off));
    fwd_out dxs;
    out_init(&dxs, "dx over NaN", nx, off);
    G.cpu->l2norm_backward_set(dxs.cpu, dy, x, rnorm, n, D);
    for (int run = 0; run < 2; run++) {
        out_poison(&dxs);
        G.gpu->l2norm_backward_set(dxs.dev, dy_d, x_d, rnorm_d, n, D);
        out_take(&dxs, run);
    }
    out_check_free(&dxs, ctx, off);

    dev_free(x_d, off), dev_free(dy_d, off), dev_free(rnorm_d, off);
    free(x), free(dy), free(rnorm);
}

/* ---- conv: doc = 1 marks about one step in eight as a document start (and t = 0,
 * which must change nothing), including starts 1, 2 and 3 steps apart ---- */

static void test_conv(int B, int T, int C, int doc, int off)
{
    char ctx[128];
    const size_t n = (size_t)B * T * C, nw = (size_t)C * 4;
    float *x = gt_rand(&G, n, -1, 1), *w = gt_rand(&G, nw, -0.5f, 0.5f), *bias = gt_rand(&G, (size_t)C, -0.5f, 0.5f);
    float *dy = gt_rand(&G, n, -1, 1);
    int32_t *ds = NULL, *ds_d = NULL;
    if (doc) {
        ds = gt_rand_int(&G, (size_t)B * T, 0, 8);
        for (int i = 0; i < B * T; i++) ds[i] = ds[i] == 0;
        for (int b = 0; b < B; b++) ds[(size_t)b * T] = 1;
        if (T > 12) ds[5] = ds[6] = ds[8] = ds[11] = 1;
        ds_d = gt_up_int(&G, ds, (size_t)B * T);
    }
    float *x_d = dev_up(x, n, off), *w_d = dev_up(w, nw, off), *bias_d = dev_up(bias, (size_t)C, off);
    float *dy_d = dev_up(dy, n, off);

    snprintf(ctx, sizeof ctx, "conv_forward B=%d T=%d C=%d%s%s", B, T, C, doc ? " doc_start" : "", off_tag(off));
    fwd_out y;
    out_init(&y, "y", n, off);
    G.cpu->conv_forward(y.cpu, x, w, bias, ds, B, T, C);
    for (int run = 0; run < 2; run++) {
        out_poison(&y);
        G.gpu->conv_forward(y.dev, x_d, w_d, bias_d, ds_d, B, T, C);
        out_take(&y, run);
    }
    out_check_free(&y, ctx, off);

    snprintf(ctx, sizeof ctx, "conv_backward B=%d T=%d C=%d%s%s", B, T, C, doc ? " doc_start" : "", off_tag(off));
    grad dx, dw, db;
    grad_init(&dx, "dx", n, off);
    grad_init(&dw, "dw", nw, off);
    grad_init(&db, "dbias", (size_t)C, off);
    G.gpu->conv_backward(dx.dev, dw.dev, db.dev, dy_d, x_d, w_d, ds_d, B, T, C);
    grad_after_zero(&dx), grad_after_zero(&dw), grad_after_zero(&db);
    G.cpu->conv_backward(dx.cpu, dw.cpu, db.cpu, dy, x, w, ds, B, T, C);
    for (int run = 0; run < 2; run++) {
        grad_load_init(&dx), grad_load_init(&dw), grad_load_init(&db);
        G.gpu->conv_backward(dx.dev, dw.dev, db.dev, dy_d, x_d, w_d, ds_d, B, T, C);
        grad_take(&dx, run), grad_take(&dw, run), grad_take(&db, run);
    }
    grad_check_free(&dx, ctx, off);
    grad_check_free(&dw, ctx, off);
    grad_check_free(&db, ctx, off);

    /* the _set form writes dx (dw, dbias into zeroed scratch here): over NaN it must give
     * the CPU's dx on zeros */
    snprintf(ctx, sizeof ctx, "conv_backward_set B=%d T=%d C=%d%s%s", B, T, C, doc ? " doc_start" : "",
             off_tag(off));
    fwd_out dxs;
    out_init(&dxs, "dx over NaN", n, off);
    float *dwz = xcalloc(nw + (size_t)C, sizeof(float));
    G.cpu->conv_backward_set(dxs.cpu, dwz, dwz + nw, dy, x, w, ds, B, T, C);
    float *dwz_d = dev_alloc(nw + (size_t)C, off);
    for (int run = 0; run < 2; run++) {
        out_poison(&dxs);
        G.gpu->conv_backward_set(dxs.dev, dwz_d, dwz_d + nw, dy_d, x_d, w_d, ds_d, B, T, C);
        out_take(&dxs, run);
    }
    out_check_free(&dxs, ctx, off);
    dev_free(dwz_d, off), free(dwz);

    dev_free(x_d, off), dev_free(w_d, off), dev_free(bias_d, off), dev_free(dy_d, off);
    if (ds_d) G.gpu->free(ds_d);
    free(x), free(w), free(bias), free(dy), free(ds);
}

int main(void)
{
    gt_init(&G, 20240917);

    static const int nc[][2] = {{7, 13}, {1, 4}, {1000, 1024}, {4096, 256}, {300, 2048}};
    const int nnc = (int)(sizeof nc / sizeof nc[0]);

    test_add_scale(7, 0);
    test_add_scale((size_t)1000 * 1024 + 3, 0);
    test_add_scale((size_t)4096 * 256, 0);
    test_add_scale((size_t)1000 * 1024, 1);

    test_sumsq(1, 0);
    test_sumsq(7, 0);
    test_sumsq((size_t)1000 * 1024, 0);
    test_sumsq((size_t)4096 * 256 + 5, 1);
    test_sumsq((size_t)48 * 1000 * 1000 + 1, 0);

    test_embedding(7, 13, 11, 0, 0);
    test_embedding(1000, 1024, V_GPT, 1, 0);
    test_embedding(4096, 256, V_GPT, 1, 0);
    test_embedding(4096, 256, V_GPT, 0, 0);
    test_embedding(2048, 64, 3, 0, 0);
    test_embedding(1000, 1024, V_GPT, 1, 1);

    for (int i = 0; i < nnc; i++) {
        test_rmsnorm(nc[i][0], nc[i][1], 0);
        test_layernorm(nc[i][0], nc[i][1], 0);
    }
    test_rmsnorm(1000, 1024, 1);
    test_layernorm(1000, 1024, 1);
    test_rmsnorm(513, 85, 0);
    test_layernorm(513, 85, 0);

    for (int sf = 0; sf < 2; sf++) {
        test_swiglu(7, 13, sf, 0);
        test_swiglu(1000, 1024, sf, 0);
        test_swiglu(4096, 256, sf, 0);
        test_swiglu(1000, 1024, sf, 1);
    }

    test_gates(7, 0);
    test_gates((size_t)1000 * 1024 + 1, 0);
    test_gates((size_t)4096 * 256, 0);
    test_gates((size_t)4096 * 256, 1);

    test_l2norm(7, 85, -1, 0);
    test_l2norm(1000, 85, -1, 0);
    test_l2norm(4096 * 4, 64, -1, 0);
    test_l2norm(300, 256, -1, 0);
    test_l2norm(1000, 64, -1, 1);
    test_l2norm(5, 64, 2, 0);

    for (int doc = 0; doc < 2; doc++) {
        test_conv(2, 300, 85 * 12, doc, 0);
        test_conv(3, 17, 13, doc, 0);
        test_conv(1, 2, 4, doc, 0);
        test_conv(8, 1024, 256, doc, 0);
    }
    test_conv(2, 300, 85 * 12, 1, 1);

    printf("%d failure(s)\n", gt_failures());
    return gt_failures() != 0;
}
