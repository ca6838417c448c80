/* test_gpu_attention.c: the MLA ops of the CUDA backend (kernels/attention_*.cu) against
 * the CPU backend (src/cpu/cpu_mla.c), plus a rough timing at the model's real shape.
 *
 *   - mla_prep forward and backward, (B,T,H,dn,dr,dv) = (2,37,3,16,8,16), (2,37,3,15,8,13)
 *     (odd: the kernels' one-column path) and (1,2048,12,128,64,128), positions implicit
 *     (pos NULL) and explicit (random in [0, 8192), where an fp32 angle would already
 *     miss the tolerance): fp32 tolerance 1e-5. The k_pe rows live strided inside a
 *     c = [c_kv | k_pe] buffer, and the c_kv columns of its gradient must stay untouched.
 *   - attention forward (out, lse) and backward (dq, dk, dv) with bf16 tensor cores:
 *     tolerance 1e-2. Shapes (1,37,2,24,16), (2,130,3,192,128), (1,1024,12,192,128),
 *     without documents, with packed documents (increasing ids, boundaries inside
 *     tiles, some of length 1) and with ids that repeat across separate runs; a
 *     "sharp" variant with larger q, k so that the running max moves between tiles.
 *     The backward of both backends gets identical inputs (the CPU's out and lse).
 *   - the fused MLA attention (mla_attention_*: prep and attention in one op) against
 *     the CPU at bf16 tolerance, and bitwise against the GPU's separate ops.
 * Forward outputs are poisoned with NaN first (an unwritten element fails). Gradient
 * buffers start at PREFILL on both sides and (result - PREFILL) is compared, which
 * checks that backward accumulates. Every GPU op runs twice from identical states and
 * must give identical bits. A failed comparison prints '#' lines locating the error (worst
 * element, error by 16-row block within a 64-row tile, by 8-column block, tail tile).
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "util.h"

/* kernels/backend_cuda.cu (C linkage): the stream every CUDA op runs on */
cudaStream_t cuda_stream(void);
/* kernels/attention_cudnn.cpp or attention_common.cu: cuDNN's fused attention (where the
 * build has it) or our kernels for the op without document masking */
void cuda_attention_use_cudnn(int on);
int cuda_attention_cudnn_calls(void);
static const char *impl = "";
static int nodoc_calls; /* GPU attention calls without documents so far */

#define PREFILL 0.375f
#define PREP_TOL GT_TOL_FP32
#define ATT_TOL GT_TOL_BF16
#define THETA 10000.0f

enum { DOCS_NONE, DOCS_PACKED, DOCS_REPEAT };
static const char *doc_name[] = {"", " docs=packed", " docs=repeating-ids"};

/* ------------------------------------------------------------ helpers ---------- */

static float *filled(size_t n, float v)
{
    float *x = xmalloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = v;
    return x;
}

static float *up_filled(gt_ctx *g, size_t n, float v)
{
    float *h = filled(n, v);
    float *d = gt_up(g, h, n);
    free(h);
    return d;
}

/* Where element i of a tensor sits: [B, T, H, D] (token-major) or [B, H, T] (lse). */
typedef struct layout {
    int B, T, H, D;
    int bht; /* 1: [B, H, T] with D = 1 */
} layout;

static void decode(const layout *L, size_t i, int *b, int *t, int *h, int *c)
{
    if (L->bht) {
        *c = 0;
        *t = (int)(i % L->T);
        *h = (int)(i / L->T % L->H);
        *b = (int)(i / ((size_t)L->T * L->H));
    } else {
        *c = (int)(i % L->D);
        *h = (int)(i / L->D % L->H);
        *t = (int)(i / ((size_t)L->D * L->H) % L->T);
        *b = (int)(i / ((size_t)L->D * L->H * L->T));
    }
}

/* '#' lines that locate the disagreement of a failed comparison */
static void explain(const float *a, const float *b, size_t n, const layout *L)
{
    size_t worst = 0, first_bad = (size_t)-1;
    double wd = -1;
    double num_row[4] = {0}, den_row[4] = {0}, num_col[32] = {0}, den_col[32] = {0};
    double num_tail = 0, den_tail = 0;
    const int full = L->T / 64 * 64; /* rows t >= full are in a partial last tile */
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) && first_bad == (size_t)-1) first_bad = i;
        double d = (double)a[i] - b[i];
        if (!isfinite(d)) continue;
        if (fabs(d) > wd) wd = fabs(d), worst = i;
        int bb, t, h, c;
        decode(L, i, &bb, &t, &h, &c);
        num_row[(t % 64) / 16] += d * d, den_row[(t % 64) / 16] += (double)b[i] * b[i];
        num_col[(c / 8) % 32] += d * d, den_col[(c / 8) % 32] += (double)b[i] * b[i];
        if (t >= full) num_tail += d * d, den_tail += (double)b[i] * b[i];
    }
    int bb, t, h, c;
    if (first_bad != (size_t)-1) {
        decode(L, first_bad, &bb, &t, &h, &c);
        printf("# first non-finite at b=%d t=%d h=%d c=%d: gpu %g cpu %g\n", bb, t, h, c, a[first_bad], b[first_bad]);
    }
    decode(L, worst, &bb, &t, &h, &c);
    printf("# worst at b=%d t=%d h=%d c=%d: gpu %.7g cpu %.7g (|diff| %.3g)\n", bb, t, h, c, a[worst], b[worst], wd);
    printf("# rel err by row t%%64 in 16-row blocks:");
    for (int r = 0; r < 4; r++) printf(" %.3g", den_row[r] > 0 ? sqrt(num_row[r] / den_row[r]) : 0.0);
    printf("\n");
    if (L->D > 1) {
        printf("# rel err by 8-column block:");
        for (int k = 0; k < (L->D + 7) / 8 && k < 32; k++)
            printf(" %.3g", den_col[k] > 0 ? sqrt(num_col[k] / den_col[k]) : 0.0);
        printf("\n");
    }
    if (full < L->T)
        printf("# rel err in the partial last tile (t >= %d): %.3g\n", full,
               den_tail > 0 ? sqrt(num_tail / den_tail) : 0.0);
}

static int compare(const char *what, const float *gpu, const float *cpu, size_t n, double tol, const layout *L)
{
    int ok = gt_compare(what, gpu, cpu, n, tol);
    if (!ok) explain(gpu, cpu, n, L);
    return ok;
}

/* compares gpu - pre with cpu - pre (both gradients accumulated onto `pre`) */
static int compare_delta(const char *what, const float *gpu, const float *cpu, size_t n, double tol, const layout *L)
{
    float *a = xmalloc(n * sizeof *a), *b = xmalloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) {
        a[i] = (float)((double)gpu[i] - PREFILL);
        b[i] = (float)((double)cpu[i] - PREFILL);
    }
    int ok = compare(what, a, b, n, tol, L);
    free(a), free(b);
    return ok;
}

static void same_bits(const char *what, const float *a, const float *b, size_t n)
{
    if (!gt_same_bits(what, a, b, n * sizeof *a)) {
        size_t i = 0, count = 0;
        while (i < n && memcmp(a + i, b + i, sizeof *a) == 0) i++;
        for (size_t j = 0; j < n; j++) count += memcmp(a + j, b + j, sizeof *a) != 0;
        printf("# %zu of %zu elements differ, first at %zu: %.9g vs %.9g\n", count, n, i, a[i], b[i]);
    }
}

/* Document ids for B rows of T tokens: runs of random length in [1, maxlen]; ids
 * increase along a row (packed) or cycle through 0, 1, 2 (an id reappears later). */
static int32_t *make_docs(gt_ctx *g, int B, int T, int maxlen, int mode)
{
    int32_t *doc = xmalloc((size_t)B * T * sizeof *doc);
    int32_t *len = gt_rand_int(g, (size_t)B * T, 1, maxlen + 1);
    size_t k = 0;
    for (int b = 0; b < B; b++) {
        int run = 0;
        for (int t = 0; t < T; run++) {
            int l = len[k++];
            if (run == 1) l = 1; /* always one single-token document */
            for (int e = 0; e < l && t < T; e++, t++)
                doc[(size_t)b * T + t] = mode == DOCS_REPEAT ? run % 3 : 1000 * b + run;
        }
    }
    free(len);
    return doc;
}

/* --------------------------------------------------------------- prep ---------- */

static void test_prep(gt_ctx *g, int B, int T, int H, int dn, int dr, int dv, int explicit_pos)
{
    const int N = B * T, dk = dn + dr, rkv = 7, stride = rkv + dr;
    const size_t nq = (size_t)N * H * dk, nkv = (size_t)N * H * (dn + dv), nv = (size_t)N * H * dv;
    const size_t nc = (size_t)N * stride;
    char name[160], what[256];
    snprintf(name, sizeof name, "B=%d T=%d H=%d dn=%d dr=%d dv=%d pos=%s", B, T, H, dn, dr, dv,
             explicit_pos ? "random<8192" : "NULL");
    const layout Lq = {B, T, H, dk, 0}, Lkv = {B, T, H, dn + dv, 0}, Lv = {B, T, H, dv, 0};
    const layout Lc = {B, T, 1, stride, 0};

    float *q = gt_rand(g, nq, -1, 1), *kv = gt_rand(g, nkv, -1, 1), *c = gt_rand(g, nc, -1, 1);
    int32_t *pos = explicit_pos ? gt_rand_int(g, N, 0, 8192) : NULL;
    float *qh = xmalloc(nq * sizeof *qh), *kh = xmalloc(nq * sizeof *kh), *vh = xmalloc(nv * sizeof *vh);
    g->cpu->mla_prep_forward(qh, kh, vh, q, kv, c + rkv, stride, pos, B, T, H, dn, dr, dv, THETA);

    float *d_q = gt_up(g, q, nq), *d_kv = gt_up(g, kv, nkv), *d_c = gt_up(g, c, nc);
    int32_t *d_pos = pos ? gt_up_int(g, pos, N) : NULL;
    float *d_qh = g->gpu->alloc(nq * sizeof(float)), *d_kh = g->gpu->alloc(nq * sizeof(float));
    float *d_vh = g->gpu->alloc(nv * sizeof(float));
    float *run[2][3];
    for (int r = 0; r < 2; r++) {
        gt_poison(g, d_qh, nq), gt_poison(g, d_kh, nq), gt_poison(g, d_vh, nv);
        g->gpu->mla_prep_forward(d_qh, d_kh, d_vh, d_q, d_kv, d_c + rkv, stride, d_pos, B, T, H, dn, dr, dv, THETA);
        run[r][0] = gt_down(g, d_qh, nq), run[r][1] = gt_down(g, d_kh, nq), run[r][2] = gt_down(g, d_vh, nv);
    }
    snprintf(what, sizeof what, "mla_prep_forward %s: qh", name);
    compare(what, run[0][0], qh, nq, PREP_TOL, &Lq);
    snprintf(what, sizeof what, "mla_prep_forward %s: kh", name);
    compare(what, run[0][1], kh, nq, PREP_TOL, &Lq);
    snprintf(what, sizeof what, "mla_prep_forward %s: vh", name);
    compare(what, run[0][2], vh, nv, PREP_TOL, &Lv);
    snprintf(what, sizeof what, "mla_prep_forward %s: deterministic", name);
    same_bits(what, run[0][0], run[1][0], nq);
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < 3; i++) free(run[r][i]);

    /* backward: cotangents, gradients prefilled on both sides */
    float *gq = gt_rand(g, nq, -1, 1), *gk = gt_rand(g, nq, -1, 1), *gv = gt_rand(g, nv, -1, 1);
    float *dq = filled(nq, PREFILL), *dkv = filled(nkv, PREFILL), *dc = filled(nc, PREFILL);
    g->cpu->mla_prep_backward(dq, dkv, dc + rkv, stride, gq, gk, gv, pos, B, T, H, dn, dr, dv, THETA);
    float *d_gq = gt_up(g, gq, nq), *d_gk = gt_up(g, gk, nq), *d_gv = gt_up(g, gv, nv);
    float *brun[2][3];
    for (int r = 0; r < 2; r++) {
        float *d_dq = up_filled(g, nq, PREFILL), *d_dkv = up_filled(g, nkv, PREFILL), *d_dc = up_filled(g, nc, PREFILL);
        g->gpu->mla_prep_backward(d_dq, d_dkv, d_dc + rkv, stride, d_gq, d_gk, d_gv, d_pos, B, T, H, dn, dr, dv,
                                  THETA);
        brun[r][0] = gt_down(g, d_dq, nq), brun[r][1] = gt_down(g, d_dkv, nkv), brun[r][2] = gt_down(g, d_dc, nc);
        g->gpu->free(d_dq), g->gpu->free(d_dkv), g->gpu->free(d_dc);
    }
    snprintf(what, sizeof what, "mla_prep_backward %s: dq", name);
    compare_delta(what, brun[0][0], dq, nq, PREP_TOL, &Lq);
    snprintf(what, sizeof what, "mla_prep_backward %s: dkv", name);
    compare_delta(what, brun[0][1], dkv, nkv, PREP_TOL, &Lkv);
    snprintf(what, sizeof what, "mla_prep_backward %s: dkpe strided in c (c_kv columns untouched)", name);
    compare_delta(what, brun[0][2], dc, nc, PREP_TOL, &Lc);
    snprintf(what, sizeof what, "mla_prep_backward %s: deterministic", name);
    same_bits(what, brun[0][0], brun[1][0], nq);
    snprintf(what, sizeof what, "mla_prep_backward %s: deterministic dkpe", name);
    same_bits(what, brun[0][2], brun[1][2], nc);
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < 3; i++) free(brun[r][i]);

    /* the _set form writes dq, dkv and dkpe's columns: over NaN it must give the CPU's
     * increments, and leave c's c_kv columns as they were (PREFILL) */
    {
        float *sq_d = g->gpu->alloc(nq * sizeof(float)), *skv_d = g->gpu->alloc(nkv * sizeof(float));
        float *c0 = filled(nc, PREFILL);
        for (int i = 0; i < B * T; i++)
            for (int j = 0; j < dr; j++) c0[(size_t)i * stride + rkv + j] = NAN;
        float *sc_d = gt_up(g, c0, nc);
        gt_poison(g, sq_d, nq), gt_poison(g, skv_d, nkv);
        g->gpu->mla_prep_backward_set(sq_d, skv_d, sc_d + rkv, stride, d_gq, d_gk, d_gv, d_pos, B, T, H, dn, dr, dv,
                                      THETA);
        float *sq = gt_down(g, sq_d, nq), *skv = gt_down(g, skv_d, nkv), *sc = gt_down(g, sc_d, nc);
        float *iq = filled(nq, 0.0f), *ikv = filled(nkv, 0.0f);
        for (size_t i = 0; i < nq; i++) iq[i] = dq[i] - PREFILL;
        for (size_t i = 0; i < nkv; i++) ikv[i] = dkv[i] - PREFILL;
        snprintf(what, sizeof what, "mla_prep_backward_set %s: dq over NaN", name);
        compare(what, sq, iq, nq, PREP_TOL, &Lq);
        snprintf(what, sizeof what, "mla_prep_backward_set %s: dkv over NaN", name);
        compare(what, skv, ikv, nkv, PREP_TOL, &Lkv);
        /* as an increment over PREFILL, like the accumulating op's: the dkpe columns carry
         * it, the c_kv columns none */
        for (int i = 0; i < B * T; i++)
            for (int j = 0; j < dr; j++) sc[(size_t)i * stride + rkv + j] += PREFILL;
        snprintf(what, sizeof what, "mla_prep_backward_set %s: dkpe written in c, c_kv columns untouched", name);
        compare_delta(what, sc, dc, nc, PREP_TOL, &Lc);
        free(sq), free(skv), free(sc), free(iq), free(ikv), free(c0);
        g->gpu->free(sq_d), g->gpu->free(skv_d), g->gpu->free(sc_d);
    }

    g->gpu->free(d_q), g->gpu->free(d_kv), g->gpu->free(d_c), g->gpu->free(d_pos);
    g->gpu->free(d_qh), g->gpu->free(d_kh), g->gpu->free(d_vh);
    g->gpu->free(d_gq), g->gpu->free(d_gk), g->gpu->free(d_gv);
    free(q), free(kv), free(c), free(pos), free(qh), free(kh), free(vh);
    free(gq), free(gk), free(gv), free(dq), free(dkv), free(dc);
}

/* ---------------------------------------------------------- attention ---------- */

static void test_attention(gt_ctx *g, int B, int T, int H, int Dk, int Dv, int docs, float qamp)
{
    const size_t N = (size_t)B * T, nq = N * H * Dk, nv = N * H * Dv, nl = N * H;
    const float scale = 1.0f / sqrtf((float)Dk);
    char name[160], what[256];
    snprintf(name, sizeof name, "B=%d T=%d H=%d Dk=%d Dv=%d%s%s%s", B, T, H, Dk, Dv, doc_name[docs],
             qamp > 1.5f ? " sharp" : "", impl);
    const layout Lk = {B, T, H, Dk, 0}, Lv = {B, T, H, Dv, 0}, Ll = {B, T, H, 1, 1};

    float *q = gt_rand(g, nq, -qamp, qamp), *k = gt_rand(g, nq, -qamp, qamp);
    float *v = gt_rand(g, nv, -1, 1), *dout = gt_rand(g, nv, -1, 1);
    int32_t *doc = docs ? make_docs(g, B, T, T < 200 ? 40 : 300, docs) : NULL;

    float *out = xmalloc(nv * sizeof *out), *lse = xmalloc(nl * sizeof *lse);
    g->cpu->attention_forward(out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);

    float *d_q = gt_up(g, q, nq), *d_k = gt_up(g, k, nq), *d_v = gt_up(g, v, nv), *d_dout = gt_up(g, dout, nv);
    int32_t *d_doc = doc ? gt_up_int(g, doc, N) : NULL;
    float *d_out = g->gpu->alloc(nv * sizeof(float)), *d_lse = g->gpu->alloc(nl * sizeof(float));
    float *fo[2], *fl[2];
    for (int r = 0; r < 2; r++) {
        gt_poison(g, d_out, nv), gt_poison(g, d_lse, nl);
        g->gpu->attention_forward(d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, H, Dk, Dv, scale);
        nodoc_calls += !docs;
        fo[r] = gt_down(g, d_out, nv), fl[r] = gt_down(g, d_lse, nl);
    }
    snprintf(what, sizeof what, "attention_forward %s: out", name);
    compare(what, fo[0], out, nv, ATT_TOL, &Lv);
    snprintf(what, sizeof what, "attention_forward %s: lse", name);
    compare(what, fl[0], lse, nl, ATT_TOL, &Ll);
    snprintf(what, sizeof what, "attention_forward %s: deterministic out", name);
    same_bits(what, fo[0], fo[1], nv);
    snprintf(what, sizeof what, "attention_forward %s: deterministic lse", name);
    same_bits(what, fl[0], fl[1], nl);
    for (int r = 0; r < 2; r++) free(fo[r]), free(fl[r]);

    /* backward from identical inputs: the CPU's out and lse */
    g->gpu->from_host(d_out, out, nv * sizeof(float));
    g->gpu->from_host(d_lse, lse, nl * sizeof(float));
    float *dq = filled(nq, PREFILL), *dk = filled(nq, PREFILL), *dv = filled(nv, PREFILL);
    g->cpu->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    float *br[2][3];
    for (int r = 0; r < 2; r++) {
        float *d_dq = up_filled(g, nq, PREFILL), *d_dk = up_filled(g, nq, PREFILL), *d_dv = up_filled(g, nv, PREFILL);
        g->gpu->attention_backward(d_dq, d_dk, d_dv, d_dout, d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, H, Dk, Dv,
                                   scale);
        nodoc_calls += !docs;
        br[r][0] = gt_down(g, d_dq, nq), br[r][1] = gt_down(g, d_dk, nq), br[r][2] = gt_down(g, d_dv, nv);
        g->gpu->free(d_dq), g->gpu->free(d_dk), g->gpu->free(d_dv);
    }
    snprintf(what, sizeof what, "attention_backward %s: dq", name);
    compare_delta(what, br[0][0], dq, nq, ATT_TOL, &Lk);
    snprintf(what, sizeof what, "attention_backward %s: dk", name);
    compare_delta(what, br[0][1], dk, nq, ATT_TOL, &Lk);
    snprintf(what, sizeof what, "attention_backward %s: dv", name);
    compare_delta(what, br[0][2], dv, nv, ATT_TOL, &Lv);
    snprintf(what, sizeof what, "attention_backward %s: deterministic dq", name);
    same_bits(what, br[0][0], br[1][0], nq);
    snprintf(what, sizeof what, "attention_backward %s: deterministic dk", name);
    same_bits(what, br[0][1], br[1][1], nq);
    snprintf(what, sizeof what, "attention_backward %s: deterministic dv", name);
    same_bits(what, br[0][2], br[1][2], nv);
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < 3; i++) free(br[r][i]);

    /* attention_backward_set writes the gradients: over NaN it must give the CPU's
     * increment (what the accumulating op adds to PREFILL) */
    {
        float *d_dq = g->gpu->alloc(nq * sizeof(float)), *d_dk = g->gpu->alloc(nq * sizeof(float));
        float *d_dv = g->gpu->alloc(nv * sizeof(float));
        gt_poison(g, d_dq, nq), gt_poison(g, d_dk, nq), gt_poison(g, d_dv, nv);
        g->gpu->attention_backward_set(d_dq, d_dk, d_dv, d_dout, d_out, d_lse, d_q, d_k, d_v, d_doc, B, T, H, Dk,
                                       Dv, scale);
        nodoc_calls += !docs;
        float *sq = gt_down(g, d_dq, nq), *sk = gt_down(g, d_dk, nq), *sv = gt_down(g, d_dv, nv);
        for (size_t i = 0; i < nq; i++) dq[i] -= PREFILL, dk[i] -= PREFILL;
        for (size_t i = 0; i < nv; i++) dv[i] -= PREFILL;
        snprintf(what, sizeof what, "attention_backward_set %s: dq over NaN", name);
        compare(what, sq, dq, nq, ATT_TOL, &Lk);
        snprintf(what, sizeof what, "attention_backward_set %s: dk over NaN", name);
        compare(what, sk, dk, nq, ATT_TOL, &Lk);
        snprintf(what, sizeof what, "attention_backward_set %s: dv over NaN", name);
        compare(what, sv, dv, nv, ATT_TOL, &Lv);
        free(sq), free(sk), free(sv);
        g->gpu->free(d_dq), g->gpu->free(d_dk), g->gpu->free(d_dv);
    }

    g->gpu->free(d_q), g->gpu->free(d_k), g->gpu->free(d_v), g->gpu->free(d_dout), g->gpu->free(d_doc);
    g->gpu->free(d_out), g->gpu->free(d_lse);
    free(q), free(k), free(v), free(dout), free(doc), free(out), free(lse), free(dq), free(dk), free(dv);
}

/* ------------------------------------------------------------- timing ---------- */

static float *up_random(gt_ctx *g, size_t n, float lo, float hi)
{
    float *h = gt_rand(g, n, lo, hi);
    float *d = gt_up(g, h, n);
    free(h);
    return d;
}

static int all_finite(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* GPU only: mean milliseconds of forward and backward over `reps` runs after a warm-up,
 * with cudaEvents on the backend's stream; also that the outputs are finite and that a
 * second backward gives the same bits. docs: 0 or packed documents of up to 1024 tokens. */
static void time_attention(gt_ctx *g, int B, int T, int H, int Dk, int Dv, int docs, int reps)
{
    const size_t N = (size_t)B * T, nq = N * H * Dk, nv = N * H * Dv, nl = N * H;
    const float scale = 1.0f / sqrtf((float)Dk);
    float *q = up_random(g, nq, -1.5f, 1.5f), *k = up_random(g, nq, -1.5f, 1.5f);
    float *v = up_random(g, nv, -1, 1), *dout = up_random(g, nv, -1, 1);
    int32_t *doc_h = docs ? make_docs(g, B, T, 1024, DOCS_PACKED) : NULL;
    int32_t *doc = doc_h ? gt_up_int(g, doc_h, N) : NULL;
    float *out = g->gpu->alloc(nv * sizeof(float)), *lse = g->gpu->alloc(nl * sizeof(float));
    float *dq = g->gpu->alloc(nq * sizeof(float)), *dk = g->gpu->alloc(nq * sizeof(float));
    float *dv = g->gpu->alloc(nv * sizeof(float));

    g->gpu->attention_forward(out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    g->gpu->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    nodoc_calls += docs ? 0 : 2 + 2 * reps + 2; /* these, the timed ones and the two below */

    cudaEvent_t e0, e1, e2;
    cudaEventCreate(&e0), cudaEventCreate(&e1), cudaEventCreate(&e2);
    g->gpu->sync();
    cudaEventRecord(e0, cuda_stream());
    for (int r = 0; r < reps; r++) g->gpu->attention_forward(out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    g->gpu->sync();
    cudaEventRecord(e1, cuda_stream());
    for (int r = 0; r < reps; r++)
        g->gpu->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    g->gpu->sync();
    cudaEventRecord(e2, cuda_stream());
    cudaEventSynchronize(e2);
    float ms_f = 0, ms_b = 0;
    cudaEventElapsedTime(&ms_f, e0, e1);
    cudaEventElapsedTime(&ms_b, e1, e2);
    ms_f /= reps, ms_b /= reps;
    cudaEventDestroy(e0), cudaEventDestroy(e1), cudaEventDestroy(e2);
    /* causal pairs; forward S and PV, backward S, dP, dV, dK, dQ once each (the kernels
     * recompute S and dP a second time for dQ, not counted) */
    const double pairs = (double)B * H * T * (T + 1) / 2;
    const double ff = 2 * pairs * (Dk + Dv), fb = 2 * pairs * (3.0 * Dk + 2.0 * Dv);
    printf("# attention timing%s B=%d T=%d H=%d Dk=%d Dv=%d%s: forward %.3f ms (%.0f TFLOP/s), backward %.3f ms "
           "(%.0f TFLOP/s)%s\n",
           impl, B, T, H, Dk, Dv, docs ? " docs<=1024 tokens" : "", ms_f, ff / ms_f * 1e-9, ms_b, fb / ms_b * 1e-9,
           docs ? " [TFLOP/s as if unmasked]" : "");

    char what[200];
    snprintf(what, sizeof what, "attention B=%d T=%d H=%d%s%s at full size: outputs finite", B, T, H,
             docs ? " docs" : "", impl);
    float *o = gt_down(g, out, nv), *l = gt_down(g, lse, nl);
    g->gpu->zero(dq, nq * sizeof(float));
    g->gpu->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    float *g1 = gt_down(g, dq, nq);
    gt_report(what, all_finite(o, nv) && all_finite(l, nl) && all_finite(g1, nq), NULL);
    g->gpu->zero(dq, nq * sizeof(float));
    g->gpu->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc, B, T, H, Dk, Dv, scale);
    float *g2 = gt_down(g, dq, nq);
    snprintf(what, sizeof what, "attention_backward B=%d T=%d H=%d%s%s at full size: deterministic dq", B, T, H,
             docs ? " docs" : "", impl);
    same_bits(what, g1, g2, nq);
    free(o), free(l), free(g1), free(g2), free(doc_h);
    g->gpu->free(q), g->gpu->free(k), g->gpu->free(v), g->gpu->free(dout), g->gpu->free(doc);
    g->gpu->free(out), g->gpu->free(lse), g->gpu->free(dq), g->gpu->free(dk), g->gpu->free(dv);
}

/* ------------------------------------------------- fused MLA attention ---------- */

/* mla_attention_forward / backward_set against the CPU (bf16 tolerance) and against the
 * GPU's own separate ops (mla_prep, then attention; attention_backward_set, then
 * mla_prep_backward_set) on the same inputs, which it must match bit for bit: the
 * fused op only leaves out the fp32 round trips between them. k_pe strided in c as in
 * test_prep; gradients written over NaN, c's c_kv columns untouched. */
static void test_mla_attention(gt_ctx *g, int B, int T, int H, int dn, int dr, int dv, int docs)
{
    const int N = B * T, dk = dn + dr, rkv = 5, stride = rkv + dr;
    const size_t nq = (size_t)N * H * dk, nkv = (size_t)N * H * (dn + dv), nv = (size_t)N * H * dv;
    const size_t nc = (size_t)N * stride, nl = (size_t)N * H, ns = mla_attention_save_floats(N, H, dn, dr, dv);
    const float scale = 1.0f / sqrtf((float)dk);
    char name[160], what[256];
    snprintf(name, sizeof name, "B=%d T=%d H=%d dn=%d dr=%d dv=%d%s%s", B, T, H, dn, dr, dv, doc_name[docs], impl);
    const layout Lq = {B, T, H, dk, 0}, Lkv = {B, T, H, dn + dv, 0}, Lv = {B, T, H, dv, 0};
    const layout Ll = {B, T, H, 1, 1}, Lc = {B, T, 1, stride, 0};
    float *q = gt_rand(g, nq, -1.5f, 1.5f), *kv = gt_rand(g, nkv, -1.5f, 1.5f), *c = gt_rand(g, nc, -1.5f, 1.5f);
    float *dout = gt_rand(g, nv, -1, 1);
    int32_t *doc_h = docs ? make_docs(g, B, T, 40, docs) : NULL, *doc_d = doc_h ? gt_up_int(g, doc_h, N) : NULL;

    /* the CPU: forward, then the backward of its own forward */
    float *out = xmalloc(nv * sizeof *out), *lse = xmalloc(nl * sizeof *lse), *save = xmalloc(ns * sizeof *save);
    float *scr = xmalloc(ns * sizeof *scr), *dq = filled(nq, NAN), *dkv = filled(nkv, NAN), *dc = filled(nc, PREFILL);
    g->cpu->mla_attention_forward(out, lse, save, q, kv, c + rkv, stride, NULL, doc_h, B, T, H, dn, dr, dv, THETA, scale);
    g->cpu->mla_attention_backward_set(dq, dkv, dc + rkv, stride, dout, out, lse, save, scr, NULL, doc_h, B, T, H, dn,
                                       dr, dv, THETA, scale);

    /* the GPU: fused (f) and separate (s), each gradient over NaN (c: its dkpe columns) */
    float *d_q = gt_up(g, q, nq), *d_kv = gt_up(g, kv, nkv), *d_c = gt_up(g, c, nc), *d_dout = gt_up(g, dout, nv);
    float *d_save = g->gpu->alloc(ns * sizeof(float)), *d_scr = g->gpu->alloc(ns * sizeof(float));
    float *d_qh = d_scr, *d_kh = d_scr + nq, *d_vh = d_scr + 2 * nq; /* the separate ops' buffers */
    float *d_g = g->gpu->alloc(ns * sizeof(float));
    float *res[2][5]; /* out, lse, dq, dkv, c */
    for (int fused = 1; fused >= 0; fused--) {
        float *d_out = up_filled(g, nv, NAN), *d_lse = up_filled(g, nl, NAN), *d_dq = up_filled(g, nq, NAN);
        float *d_dkv = up_filled(g, nkv, NAN), *d_dc = up_filled(g, nc, PREFILL);
        float *c0 = filled(nc, PREFILL);
        for (int i = 0; i < N; i++)
            for (int j = 0; j < dr; j++) c0[(size_t)i * stride + rkv + j] = NAN;
        g->gpu->from_host(d_dc, c0, nc * sizeof(float));
        if (fused) {
            g->gpu->mla_attention_forward(d_out, d_lse, d_save, d_q, d_kv, d_c + rkv, stride, NULL, doc_d, B, T, H, dn,
                                          dr, dv, THETA, scale);
            gt_poison(g, d_scr, ns);
            g->gpu->mla_attention_backward_set(d_dq, d_dkv, d_dc + rkv, stride, d_dout, d_out, d_lse, d_save, d_scr,
                                               NULL, doc_d, B, T, H, dn, dr, dv, THETA, scale);
        } else {
            g->gpu->mla_prep_forward(d_qh, d_kh, d_vh, d_q, d_kv, d_c + rkv, stride, NULL, B, T, H, dn, dr, dv, THETA);
            g->gpu->attention_forward(d_out, d_lse, d_qh, d_kh, d_vh, doc_d, B, T, H, dk, dv, scale);
            g->gpu->attention_backward_set(d_g, d_g + nq, d_g + 2 * nq, d_dout, d_out, d_lse, d_qh, d_kh, d_vh, doc_d,
                                           B, T, H, dk, dv, scale);
            g->gpu->mla_prep_backward_set(d_dq, d_dkv, d_dc + rkv, stride, d_g, d_g + nq, d_g + 2 * nq, NULL, B, T, H,
                                          dn, dr, dv, THETA);
        }
        nodoc_calls += docs ? 0 : 2;
        res[fused][0] = gt_down(g, d_out, nv), res[fused][1] = gt_down(g, d_lse, nl);
        res[fused][2] = gt_down(g, d_dq, nq), res[fused][3] = gt_down(g, d_dkv, nkv), res[fused][4] = gt_down(g, d_dc, nc);
        g->gpu->free(d_out), g->gpu->free(d_lse), g->gpu->free(d_dq), g->gpu->free(d_dkv), g->gpu->free(d_dc);
        free(c0);
    }
    static const char *part[] = {"out", "lse", "dq over NaN", "dkv over NaN",
                                 "dkpe written in c, c_kv columns untouched"};
    const float *cpu_res[] = {out, lse, dq, dkv, dc};
    const layout *lay[] = {&Lv, &Ll, &Lq, &Lkv, &Lc};
    const size_t len[] = {nv, nl, nq, nkv, nc};
    for (int i = 0; i < 5; i++) {
        snprintf(what, sizeof what, "mla_attention_%s %s: %s", i < 2 ? "forward" : "backward_set", name, part[i]);
        compare(what, res[1][i], cpu_res[i], len[i], ATT_TOL, lay[i]);
        snprintf(what, sizeof what, "mla_attention %s: %s bitwise as the separate GPU ops'", name, part[i]);
        same_bits(what, res[1][i], res[0][i], len[i]);
        free(res[0][i]), free(res[1][i]);
    }
    g->gpu->free(d_q), g->gpu->free(d_kv), g->gpu->free(d_c), g->gpu->free(d_dout), g->gpu->free(doc_d);
    g->gpu->free(d_save), g->gpu->free(d_scr), g->gpu->free(d_g);
    free(q), free(kv), free(c), free(dout), free(doc_h), free(out), free(lse), free(save), free(scr);
    free(dq), free(dkv), free(dc);
}

int main(void)
{
    gt_ctx g;
    gt_init(&g, 20240611);

    test_prep(&g, 2, 37, 3, 16, 8, 16, 0);
    test_prep(&g, 2, 37, 3, 16, 8, 16, 1);
    test_prep(&g, 2, 37, 3, 15, 8, 13, 1); /* odd dn, dv: one column a thread */
    test_prep(&g, 1, 2048, 12, 128, 64, 128, 0);
    test_prep(&g, 1, 2048, 12, 128, 64, 128, 1);

    /* the op without documents goes to cuDNN where the build has it: both implementations */
    int before = cuda_attention_cudnn_calls(), calls_before = 0;
    for (int own = 0; own < 2; own++) {
        cuda_attention_use_cudnn(!own);
        impl = own ? " [own kernels]" : " [default: cuDNN where built]";
        test_attention(&g, 1, 37, 2, 24, 16, DOCS_NONE, 1.5f);
        test_attention(&g, 1, 37, 2, 24, 16, DOCS_PACKED, 1.5f);
        test_attention(&g, 2, 130, 3, 192, 128, DOCS_NONE, 1.5f);
        test_attention(&g, 2, 130, 3, 192, 128, DOCS_NONE, 2.0f);
        test_attention(&g, 2, 130, 3, 192, 128, DOCS_PACKED, 1.5f);
        test_attention(&g, 2, 130, 3, 192, 128, DOCS_REPEAT, 1.5f);
        test_attention(&g, 2, 200, 2, 48, 24, DOCS_PACKED, 1.5f); /* the GPU step test's head dims */
        test_attention(&g, 1, 1024, 12, 192, 128, DOCS_NONE, 1.5f);
        test_attention(&g, 1, 1024, 12, 192, 128, DOCS_PACKED, 1.5f);

        test_mla_attention(&g, 1, 37, 2, 16, 8, 16, DOCS_NONE);
        test_mla_attention(&g, 2, 130, 3, 128, 64, 128, DOCS_NONE);
        test_mla_attention(&g, 2, 130, 3, 128, 64, 128, DOCS_PACKED);

        time_attention(&g, 8, 2048, 12, 192, 128, 0, 5);
        time_attention(&g, 8, 2048, 12, 192, 128, 1, 5);
        time_attention(&g, 2, 8192, 12, 192, 128, 0, 3);
#ifdef DELTAMLA_HAVE_CUDNN
        /* the default must really have gone to cuDNN (a refused shape falls back quietly
         * but for one note), and our kernels must really have been the ones checked */
        const int served = cuda_attention_cudnn_calls() - before, asked = nodoc_calls - calls_before;
        before += served, calls_before = nodoc_calls;
        char detail[96];
        snprintf(detail, sizeof detail, "%d of %d calls without documents went to cuDNN", served, asked);
        gt_report(own ? "attention: deltamla's own kernels ran every call when asked to"
                      : "attention: cuDNN ran the calls without documents at every tested shape",
                  own ? served == 0 : served == asked && asked > 0, detail);
#else
        (void)before, (void)calls_before;
        printf("# note: this build has no cuDNN frontend: our kernels ran every call\n");
#endif
    }
    cuda_attention_use_cudnn(1);

    printf("# %d failure(s)\n", gt_failures());
    return gt_failures() != 0;
}
