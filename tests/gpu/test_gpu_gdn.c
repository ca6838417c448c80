/* test_gpu_gdn.c: the chunked gated delta rule of the CUDA backend (kernels/gdn_*.cu)
 * against the CPU oracle (src/cpu/cpu_gdn.c), forward and backward, then a rough timing
 * at the model's shape.
 *
 * Shapes cover D in {5, 64, 72, 85, 96, 128, 256} (64, 85 and 96 run kernels of their
 * own, with D a constant: GDN_FIXED_D; 5 and 72 the general ones), T below, at, between
 * and above multiples of the chunk (37, 64, 100, 130, 200, 2048), H in {1, 3, 12}, B in
 * {1, 2}, including the model's B=2 T=2048 H=12 D=85. Document starts come in patterns that put them inside
 * chunks, on chunk boundaries where the carried state is not zero, at t = 0 and at
 * random; gates are either uniform in [-3, -0.01] or logsigmoid of N(0, 1). Keys are L2
 * normalised per head, q and v uniform in [-1, 1], beta uniform in (0, 1), scale
 * 1/sqrt(D), as in the model.
 *
 * Forward: o and state_save NaN-poisoned on the GPU, run twice: both against the CPU
 * (relative norm-wise error <= 1e-5) and the two runs bitwise equal.
 * Backward (it accumulates), on the CPU's state_save so that it is tested on its own, each
 * of dq, dk, dv, dg, dbeta three ways:
 *   - "from zero": a GPU run into zeroed buffers against the CPU's increment;
 *   - "accumulated": a GPU run from random initial values whose rms equals that
 *     increment's, against the CPU run from the same values;
 *   - "deterministic": a second GPU run from the same values gives the same bits;
 * and once more from the same initial values on the GPU's own state_save (the way
 * training chains the two), against the CPU.
 * The kernels run their products on the tensor cores in TF32 (10-bit mantissa operands,
 * fp32 accumulation), the rest in fp32 (kernels/gdn_internal.cuh). Measured on an H100,
 * every case here stays within 5.3e-4 of the CPU, through the solve and the state
 * recurrence; the tolerance is TOL_TF32 = 2e-3, four times that and five times tighter
 * than the bf16 GEMMs' 1e-2, so a lost term or a wrong decay (errors of order one) still
 * fails. A build with every product in 3xTF32 (split-precision TF32, about 2^-22 per
 * product: -DGDN_SPLIT_*=3, reported by cuda_gdn_tf32_plain() == 0) is held to the fp32
 * tolerance, 1e-5, which it met on every case.
 *
 * Every case runs twelve times: in the three-kernel form, with the state kernels on 4 warps
 * and on 8 (which the op picks by the grid's size), each with the value columns a block
 * that the op picks by the shape (24 at every shape here), 32 and 48 (which it picks for
 * larger grids); then the same six in the chained form (kernels/gdn_chain.cu), which runs
 * the forward and backward chained where D <= 96 (the state kernels' settings then only
 * reach the other cases). The kernels'
 * speed is measured by benchmarks/bench_mixers.c, not here.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

/* kernels/gdn_forward.cu: 1 when some GDN product runs in plain TF32 (the default) */
int cuda_gdn_tf32_plain(void);
/* the state kernels' warps: 0 by the grid (the default), 4 or 8; returns the old one */
int cuda_gdn_set_state_warps(int n);
/* the state kernels' value columns a block: 0 by the shape (the default), 24, 32 or 48 */
int cuda_gdn_set_state_cols(int n);
/* the GDN's form: 0 by the shape, 1 chained where D allows, 2 three kernels */
int cuda_gdn_set_chain(int mode);
static int state_warps, state_cols, chain; /* what this pass of the cases forces */

#define TOL_TF32 2e-3
static double tol; /* TOL_TF32, or GT_TOL_FP32 for a 3xTF32 build */

typedef enum { DOCS_NONE, DOCS_MIXED, DOCS_EARLY, DOCS_RANDOM } doc_mode;
typedef enum { GATES_UNIFORM, GATES_LOGSIG } gate_mode;

static const char *doc_names[] = {"none", "mixed", "early", "random"};
static const char *gate_names[] = {"uniform", "logsigmoid"};

typedef struct gdn_case {
    int B, T, H, D;
    doc_mode docs;
    gate_mode gates;
} gdn_case;

/* One case's inputs, on the host and on the GPU. */
typedef struct gdn_in {
    int B, T, H, D;
    float scale;
    size_t nv, ns, nst; /* B*T*H*D, B*T*H, gdn_state_floats */
    float *q, *k, *v, *g, *beta, *dout;
    int32_t *doc; /* NULL without document starts */
    float *q_d, *k_d, *v_d, *g_d, *beta_d, *dout_d;
    int32_t *doc_d;
    char name[160];
} gdn_in;

static gt_ctx G;

static size_t fbytes(size_t n) { return n * sizeof(float); }

static double rms(const float *x, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return n ? sqrt(s / n) : 0;
}

/* Initial values of a gradient buffer: uniform with the rms of `inc`, the op's own
 * increment, so that the initial values and the increment weigh alike in the result. */
static float *grad_init(const float *inc, size_t n)
{
    double r = rms(inc, n);
    if (!(r > 0)) r = 1;
    float *x = gt_rand(&G, n, -1, 1);
    for (size_t i = 0; i < n; i++) x[i] = (float)(x[i] * r * sqrt(3.0));
    return x;
}

/* k rows of D L2-normalised, as the model's l2norm leaves them */
static void normalise_rows(float *k, size_t rows, int D)
{
    for (size_t r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < D; i++) ss += (double)k[r * D + i] * k[r * D + i];
        const double inv = 1.0 / fmax(sqrt(ss), 1e-12);
        for (int i = 0; i < D; i++) k[r * D + i] = (float)(k[r * D + i] * inv);
    }
}

/* Document starts of row b, pattern m:
 *   mixed:  on chunk boundaries (which one depends on b, so that some cut a non-zero
 *           carried state and some do not), inside chunks (17+5b, 100+b, 191, 1500-7b),
 *           and at t = 0 on even rows;
 *   early:  t = 0 and t = 40 (two documents in the first chunk, then one long one);
 *   random: each token with probability 1.5%. */
static int32_t *make_docs(doc_mode m, int B, int T)
{
    if (m == DOCS_NONE) return NULL;
    int32_t *d = xcalloc((size_t)B * T, sizeof *d);
    float *u = m == DOCS_RANDOM ? gt_rand(&G, (size_t)B * T, 0, 1) : NULL;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int s = 0;
            if (m == DOCS_MIXED)
                s = (t > 0 && t % 64 == 0 && (t / 64 + b) % 3 == 0) || t == 17 + 5 * b || t == 100 + b ||
                    t == 191 || t == 1500 - 7 * b || (t == 0 && b % 2 == 0);
            else if (m == DOCS_EARLY)
                s = t == 0 || t == 40;
            else
                s = u[(size_t)b * T + t] < 0.015f;
            d[(size_t)b * T + t] = s;
        }
    free(u);
    return d;
}

static void in_make(gdn_in *in, const gdn_case *c)
{
    memset(in, 0, sizeof *in);
    in->B = c->B, in->T = c->T, in->H = c->H, in->D = c->D;
    in->scale = 1.0f / sqrtf((float)c->D);
    in->ns = (size_t)c->B * c->T * c->H;
    in->nv = in->ns * c->D;
    in->nst = gdn_state_floats(c->B, c->T, c->H, c->D);
    snprintf(in->name, sizeof in->name,
             "gdn B=%d T=%d H=%d D=%d docs=%s gates=%s state-warps=%d state-cols=%d form=%s", c->B, c->T, c->H,
             c->D, doc_names[c->docs], gate_names[c->gates], state_warps, state_cols,
             chain == 1 ? "chained" : "three-kernels");

    in->q = gt_rand(&G, in->nv, -1, 1);
    in->k = gt_rand(&G, in->nv, -1, 1);
    normalise_rows(in->k, in->ns, c->D);
    in->v = gt_rand(&G, in->nv, -1, 1);
    in->beta = gt_rand(&G, in->ns, 0, 1);
    if (c->gates == GATES_UNIFORM) {
        in->g = gt_rand(&G, in->ns, -3.0f, -0.01f);
    } else {
        /* logsigmoid(z), z ~ N(0, 1) by Box-Muller */
        float *u1 = gt_rand(&G, in->ns, 1e-7f, 1), *u2 = gt_rand(&G, in->ns, 0, 1);
        in->g = xmalloc(fbytes(in->ns));
        for (size_t i = 0; i < in->ns; i++) {
            const double z = sqrt(-2.0 * log((double)u1[i])) * cos(6.283185307179586 * u2[i]);
            in->g[i] = (float)(-log1p(exp(-z)));
        }
        free(u1);
        free(u2);
    }
    in->dout = gt_rand(&G, in->nv, -1, 1);
    in->doc = make_docs(c->docs, c->B, c->T);

    in->q_d = gt_up(&G, in->q, in->nv);
    in->k_d = gt_up(&G, in->k, in->nv);
    in->v_d = gt_up(&G, in->v, in->nv);
    in->g_d = gt_up(&G, in->g, in->ns);
    in->beta_d = gt_up(&G, in->beta, in->ns);
    in->dout_d = gt_up(&G, in->dout, in->nv);
    in->doc_d = in->doc ? gt_up_int(&G, in->doc, (size_t)c->B * c->T) : NULL;
}

static void in_free(gdn_in *in)
{
    G.gpu->free(in->q_d);
    G.gpu->free(in->k_d);
    G.gpu->free(in->v_d);
    G.gpu->free(in->g_d);
    G.gpu->free(in->beta_d);
    G.gpu->free(in->dout_d);
    if (in->doc_d) G.gpu->free(in->doc_d);
    free(in->q), free(in->k), free(in->v), free(in->g), free(in->beta), free(in->dout), free(in->doc);
}

/* Forward on both backends; returns the CPU's state_save (host, malloc'd) and leaves the
 * GPU's in *ss_gpu (device). */
static float *test_forward(const gdn_in *in, float **ss_gpu)
{
    char what[256];
    float *o = xmalloc(fbytes(in->nv)), *ss = xmalloc(fbytes(in->nst));
    G.cpu->gdn_forward(o, ss, in->q, in->k, in->v, in->g, in->beta, in->doc, in->B, in->T, in->H, in->D,
                       in->scale);

    float *o_d = G.gpu->alloc(fbytes(in->nv)), *ss_d = G.gpu->alloc(fbytes(in->nst));
    float *o_g[2], *ss_g[2];
    for (int run = 0; run < 2; run++) {
        gt_poison(&G, o_d, in->nv);
        gt_poison(&G, ss_d, in->nst);
        G.gpu->gdn_forward(o_d, ss_d, in->q_d, in->k_d, in->v_d, in->g_d, in->beta_d, in->doc_d, in->B, in->T,
                           in->H, in->D, in->scale);
        o_g[run] = gt_down(&G, o_d, in->nv);
        ss_g[run] = gt_down(&G, ss_d, in->nst);
    }
    snprintf(what, sizeof what, "%s: forward o", in->name);
    gt_compare(what, o_g[0], o, in->nv, tol);
    snprintf(what, sizeof what, "%s: forward state_save", in->name);
    gt_compare(what, ss_g[0], ss, in->nst, tol);
    snprintf(what, sizeof what, "%s: forward o deterministic", in->name);
    gt_same_bits(what, o_g[0], o_g[1], fbytes(in->nv));
    snprintf(what, sizeof what, "%s: forward state_save deterministic", in->name);
    gt_same_bits(what, ss_g[0], ss_g[1], fbytes(in->nst));

    G.gpu->free(o_d);
    free(o), free(o_g[0]), free(o_g[1]), free(ss_g[0]), free(ss_g[1]);
    *ss_gpu = ss_d;
    return ss;
}

#define NGRAD 5
static const char *grad_names[NGRAD] = {"dq", "dk", "dv", "dg", "dbeta"};

/* one backward on the GPU into the device buffers d[] */
static void gpu_backward(const gdn_in *in, float *const d[NGRAD], const float *ss_d)
{
    G.gpu->gdn_backward(d[0], d[1], d[2], d[3], d[4], in->dout_d, in->q_d, in->k_d, in->v_d, in->g_d, in->beta_d,
                        ss_d, in->doc_d, in->B, in->T, in->H, in->D, in->scale);
}

static void test_backward(const gdn_in *in, const float *ss_cpu, const float *ss_gpu_d)
{
    char what[256];
    const size_t n[NGRAD] = {in->nv, in->nv, in->nv, in->ns, in->ns};
    float *d[NGRAD], *inc_gpu[NGRAD], *init[NGRAD], *cpu[NGRAD], *gpu1[NGRAD], *gpu2[NGRAD], *own[NGRAD];
    float *ss_d = gt_up(&G, ss_cpu, in->nst);

    /* the GPU increment from zero (alloc zero-fills) */
    for (int x = 0; x < NGRAD; x++) d[x] = G.gpu->alloc(fbytes(n[x]));
    gpu_backward(in, d, ss_d);
    for (int x = 0; x < NGRAD; x++) inc_gpu[x] = gt_down(&G, d[x], n[x]);

    /* the CPU from initial values */
    for (int x = 0; x < NGRAD; x++) {
        init[x] = grad_init(inc_gpu[x], n[x]);
        cpu[x] = gt_host_copy(init[x], n[x]);
    }
    G.cpu->gdn_backward(cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], in->dout, in->q, in->k, in->v, in->g, in->beta,
                        ss_cpu, in->doc, in->B, in->T, in->H, in->D, in->scale);

    /* gdn_backward_set over NaN: writes every gradient, the same bits as the increment
     * from zero above */
    float *setv[NGRAD];
    for (int x = 0; x < NGRAD; x++) gt_poison(&G, d[x], n[x]);
    G.gpu->gdn_backward_set(d[0], d[1], d[2], d[3], d[4], in->dout_d, in->q_d, in->k_d, in->v_d, in->g_d,
                            in->beta_d, ss_d, in->doc_d, in->B, in->T, in->H, in->D, in->scale);
    for (int x = 0; x < NGRAD; x++) setv[x] = gt_down(&G, d[x], n[x]);

    /* two GPU runs from the initial values, then one on the GPU's own saved states */
    for (int run = 0; run < 3; run++) {
        for (int x = 0; x < NGRAD; x++) G.gpu->from_host(d[x], init[x], fbytes(n[x]));
        gpu_backward(in, d, run < 2 ? ss_d : ss_gpu_d);
        for (int x = 0; x < NGRAD; x++) {
            float *h = gt_down(&G, d[x], n[x]);
            if (run == 0) gpu1[x] = h;
            else if (run == 1) gpu2[x] = h;
            else own[x] = h;
        }
    }

    for (int x = 0; x < NGRAD; x++) {
        float *inc_cpu = gt_diff(cpu[x], init[x], n[x]);
        snprintf(what, sizeof what, "%s: backward %s from zero", in->name, grad_names[x]);
        gt_compare(what, inc_gpu[x], inc_cpu, n[x], tol);
        snprintf(what, sizeof what, "%s: backward %s accumulated", in->name, grad_names[x]);
        gt_compare(what, gpu1[x], cpu[x], n[x], tol);
        snprintf(what, sizeof what, "%s: backward %s deterministic", in->name, grad_names[x]);
        gt_same_bits(what, gpu1[x], gpu2[x], fbytes(n[x]));
        snprintf(what, sizeof what, "%s: backward %s on the GPU's state_save", in->name, grad_names[x]);
        gt_compare(what, own[x], cpu[x], n[x], tol);
        snprintf(what, sizeof what, "%s: backward_set %s over NaN = the increment from zero, bitwise", in->name,
                 grad_names[x]);
        gt_same_bits(what, setv[x], inc_gpu[x], fbytes(n[x]));
        free(inc_cpu), free(setv[x]);
    }

    for (int x = 0; x < NGRAD; x++) {
        G.gpu->free(d[x]);
        free(inc_gpu[x]), free(init[x]), free(cpu[x]), free(gpu1[x]), free(gpu2[x]), free(own[x]);
    }
    G.gpu->free(ss_d);
}

static void run_case(const gdn_case *c)
{
    gdn_in in;
    in_make(&in, c);
    printf("# %s\n", in.name);
    fflush(stdout);
    float *ss_gpu_d = NULL;
    float *ss_cpu = test_forward(&in, &ss_gpu_d);
    test_backward(&in, ss_cpu, ss_gpu_d);
    G.gpu->free(ss_gpu_d);
    free(ss_cpu);
    in_free(&in);
}

int main(void)
{
    gt_init(&G, 0x6d6c6167646eULL);
    tol = cuda_gdn_tf32_plain() ? TOL_TF32 : GT_TOL_FP32;
    printf("# GDN products in %s: tolerance %g\n", tol == TOL_TF32 ? "TF32" : "3xTF32", tol);
    static const gdn_case cases[] = {
        {1, 64, 1, 85, DOCS_NONE, GATES_UNIFORM},     /* one full chunk */
        {2, 2048, 12, 85, DOCS_MIXED, GATES_LOGSIG},  /* the model's head dim and heads */
        {1, 2048, 3, 85, DOCS_NONE, GATES_UNIFORM},   /* a long unbroken state */
        {2, 100, 3, 64, DOCS_MIXED, GATES_LOGSIG},    /* ragged last chunk */
        {2, 37, 3, 5, DOCS_MIXED, GATES_UNIFORM},     /* shorter than a chunk, tiny D */
        {1, 130, 3, 128, DOCS_NONE, GATES_LOGSIG},    /* two chunks and two tokens */
        {2, 130, 12, 128, DOCS_MIXED, GATES_UNIFORM}, /* start on the boundary at 128 */
        {2, 200, 1, 256, DOCS_MIXED, GATES_LOGSIG},   /* largest D, documents */
        {1, 200, 1, 256, DOCS_NONE, GATES_UNIFORM},   /* largest D, carried state */
        {1, 37, 12, 256, DOCS_EARLY, GATES_LOGSIG},   /* largest D, one short chunk */
        {2, 64, 12, 85, DOCS_EARLY, GATES_UNIFORM},   /* two documents in one chunk */
        {1, 2048, 1, 64, DOCS_RANDOM, GATES_LOGSIG},  /* random starts along a long row */
        {2, 130, 3, 96, DOCS_MIXED, GATES_LOGSIG},    /* the base preset's head dim */
        {1, 200, 3, 72, DOCS_RANDOM, GATES_UNIFORM},  /* a head dim of the general chained kernels */
    };
    /* every case with each form of the state kernels (kernels/gdn_state.cuh): 4 warps,
     * each over a whole contraction, and 8, which split it in halves; blocks of the
     * columns the op picks, of 32 and of 48 */
    static const int cols[] = {0, 32, 48};
    for (chain = 2; chain >= 1; chain--)
        for (state_warps = 4; state_warps <= 8; state_warps += 4)
            for (int ci = 0; ci < 3; ci++) {
                state_cols = cols[ci];
                cuda_gdn_set_chain(chain);
                cuda_gdn_set_state_warps(state_warps);
                cuda_gdn_set_state_cols(state_cols);
                for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i]);
            }
    cuda_gdn_set_chain(0);
    cuda_gdn_set_state_warps(0);
    cuda_gdn_set_state_cols(0);
    printf("# %d failures\n", gt_failures());
    return gt_failures() != 0;
}
