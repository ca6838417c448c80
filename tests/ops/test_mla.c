/* test_mla.c: checks the MLA ops of the CPU backend (src/cpu/cpu_mla.c), built in double.
 *
 *   - prep forward against a direct per-head transcription of the RoPE formula, with
 *     implicit positions (pos NULL) and explicit ones;
 *   - prep backward against finite differences, and that it accumulates;
 *   - attention forward (out and lse) against a direct per-row softmax, with and without
 *     document ids;
 *   - attention backward against finite differences, with and without document ids;
 *   - document masking (doc_id + restarted positions) equals running every document
 *     on its own as a separate sequence, forward and backward;
 *   - attention backward is bit-identical with 1 and 3 threads.
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
#define PREFILL 0.375 /* gradient buffers start here to check that backward accumulates */

static double *dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof *p);
    if (!p) {
        fprintf(stderr, "test_mla: out of memory\n");
        exit(1);
    }
    return p;
}

static double *drand_new(size_t n, uint64_t *st, double lo, double hi)
{
    double *p = dalloc(n);
    gc_fill(p, n, st, lo, hi);
    return p;
}

static void dfill(double *p, size_t n, double v)
{
    for (size_t i = 0; i < n; i++) p[i] = v;
}

static void dsub(double *p, size_t n, double v)
{
    for (size_t i = 0; i < n; i++) p[i] -= v;
}

/* ---------------------------------------------------------------- prep ---------- */

/* The geometry of one prep test: c = [c_kv (rkv) | k_pe (dr)] per token. */
typedef struct prep_case {
    int B, T, H, dn, dr, dv, rkv;
    double theta;
    const int32_t *pos;
    double *q, *kv, *c;       /* inputs */
    double *rq, *rk, *rv;     /* random cotangents */
    double *qh, *kh, *vh;     /* forward outputs (scratch) */
} prep_case;

static size_t prep_n(const prep_case *pc) { return (size_t)pc->B * pc->T; }
static int prep_stride(const prep_case *pc) { return pc->rkv + pc->dr; }

static void prep_run(prep_case *pc)
{
    cpu_mla_prep_forward(pc->qh, pc->kh, pc->vh, pc->q, pc->kv, pc->c + pc->rkv, prep_stride(pc),
                         pc->pos, pc->B, pc->T, pc->H, pc->dn, pc->dr, pc->dv, pc->theta);
}

static double prep_loss(void *ctx)
{
    prep_case *pc = ctx;
    prep_run(pc);
    size_t N = prep_n(pc), dk = (size_t)pc->dn + pc->dr;
    return gc_dot(pc->qh, pc->rq, N * pc->H * dk) + gc_dot(pc->kh, pc->rk, N * pc->H * dk) +
           gc_dot(pc->vh, pc->rv, N * pc->H * pc->dv);
}

static void prep_init(prep_case *pc, uint64_t *st)
{
    size_t N = prep_n(pc), dk = (size_t)pc->dn + pc->dr;
    pc->q = drand_new(N * pc->H * dk, st, -1, 1);
    pc->kv = drand_new(N * pc->H * (pc->dn + pc->dv), st, -1, 1);
    pc->c = drand_new(N * prep_stride(pc), st, -1, 1);
    pc->rq = drand_new(N * pc->H * dk, st, -1, 1);
    pc->rk = drand_new(N * pc->H * dk, st, -1, 1);
    pc->rv = drand_new(N * pc->H * pc->dv, st, -1, 1);
    pc->qh = dalloc(N * pc->H * dk);
    pc->kh = dalloc(N * pc->H * dk);
    pc->vh = dalloc(N * pc->H * pc->dv);
}

static void prep_free(prep_case *pc)
{
    free(pc->q), free(pc->kv), free(pc->c), free(pc->rq), free(pc->rk), free(pc->rv);
    free(pc->qh), free(pc->kh), free(pc->vh);
}

/* y = x rotated pairwise as MODEL.md section 2 states it, written independently of the
 * op: frequency 1 / theta^(2j/D). */
static void rope_direct(double *y, const double *x, int D, double p, double theta)
{
    for (int j = 0; j < D / 2; j++) {
        double a = p / pow(theta, (2.0 * j) / D);
        y[2 * j] = x[2 * j] * cos(a) - x[2 * j + 1] * sin(a);
        y[2 * j + 1] = x[2 * j + 1] * cos(a) + x[2 * j] * sin(a);
    }
}

static void test_prep_forward(const char *name, prep_case *pc)
{
    size_t N = prep_n(pc);
    int H = pc->H, dn = pc->dn, dr = pc->dr, dv = pc->dv, dk = dn + dr;
    double *eq = dalloc(N * H * dk), *ek = dalloc(N * H * dk), *ev = dalloc(N * H * dv);
    for (size_t i = 0; i < N; i++) {
        double p = pc->pos ? pc->pos[i] : (double)(i % pc->T);
        for (int h = 0; h < H; h++) {
            const double *qsrc = pc->q + (i * H + h) * dk;
            const double *kvsrc = pc->kv + (i * H + h) * (dn + dv);
            double *qd = eq + (i * H + h) * dk, *kd = ek + (i * H + h) * dk;
            memcpy(qd, qsrc, dn * sizeof *qd);
            rope_direct(qd + dn, qsrc + dn, dr, p, pc->theta);
            memcpy(kd, kvsrc, dn * sizeof *kd);
            rope_direct(kd + dn, pc->c + i * prep_stride(pc) + pc->rkv, dr, p, pc->theta);
            memcpy(ev + (i * H + h) * dv, kvsrc + dn, dv * sizeof *ev);
        }
    }
    prep_run(pc);
    char what[160];
    snprintf(what, sizeof what, "mla_prep_forward %s: qh", name);
    gc_compare(what, pc->qh, eq, N * H * dk, 1e-12);
    snprintf(what, sizeof what, "mla_prep_forward %s: kh", name);
    gc_compare(what, pc->kh, ek, N * H * dk, 1e-12);
    snprintf(what, sizeof what, "mla_prep_forward %s: vh", name);
    gc_compare(what, pc->vh, ev, N * H * dv, 1e-12);
    free(eq), free(ek), free(ev);
}

static void test_prep_backward(const char *name, prep_case *pc)
{
    size_t N = prep_n(pc);
    int H = pc->H, dn = pc->dn, dr = pc->dr, dv = pc->dv, dk = dn + dr;
    size_t nq = N * H * dk, nkv = N * H * (dn + dv), nc = N * prep_stride(pc);
    double *dq = dalloc(nq), *dkv = dalloc(nkv), *dc = dalloc(nc);
    dfill(dq, nq, PREFILL), dfill(dkv, nkv, PREFILL), dfill(dc, nc, PREFILL);
    cpu_mla_prep_backward(dq, dkv, dc + pc->rkv, prep_stride(pc), pc->rq, pc->rk, pc->rv,
                          pc->pos, pc->B, pc->T, H, dn, dr, dv, pc->theta);
    dsub(dq, nq, PREFILL), dsub(dkv, nkv, PREFILL), dsub(dc, nc, PREFILL);
    double *num = dalloc(nc > nq ? (nc > nkv ? nc : nkv) : (nq > nkv ? nq : nkv));
    char what[160];
    gc_numeric(prep_loss, pc, pc->q, nq, FD_H, num);
    snprintf(what, sizeof what, "mla_prep_backward %s: dq vs finite differences", name);
    gc_compare(what, dq, num, nq, FD_TOL);
    gc_numeric(prep_loss, pc, pc->kv, nkv, FD_H, num);
    snprintf(what, sizeof what, "mla_prep_backward %s: dkv vs finite differences", name);
    gc_compare(what, dkv, num, nkv, FD_TOL);
    /* over the whole c buffer: the c_kv columns must stay untouched (numeric 0) */
    gc_numeric(prep_loss, pc, pc->c, nc, FD_H, num);
    snprintf(what, sizeof what, "mla_prep_backward %s: dkpe (strided in c) vs finite differences", name);
    gc_compare(what, dc, num, nc, FD_TOL);
    free(dq), free(dkv), free(dc), free(num);
}

/* ----------------------------------------------------------- attention ---------- */

typedef struct attn_case {
    int B, T, H, Dk, Dv;
    double scale;
    const int32_t *doc;
    double *q, *k, *v, *r; /* inputs and the cotangent of out */
    double *out, *lse;     /* forward outputs (scratch) */
} attn_case;

static double attn_loss(void *ctx)
{
    attn_case *ac = ctx;
    cpu_attention_forward(ac->out, ac->lse, ac->q, ac->k, ac->v, ac->doc, ac->B, ac->T, ac->H,
                          ac->Dk, ac->Dv, ac->scale);
    return gc_dot(ac->out, ac->r, (size_t)ac->B * ac->T * ac->H * ac->Dv);
}

static void attn_init(attn_case *ac, uint64_t *st)
{
    size_t N = (size_t)ac->B * ac->T;
    ac->q = drand_new(N * ac->H * ac->Dk, st, -1.5, 1.5);
    ac->k = drand_new(N * ac->H * ac->Dk, st, -1.5, 1.5);
    ac->v = drand_new(N * ac->H * ac->Dv, st, -1, 1);
    ac->r = drand_new(N * ac->H * ac->Dv, st, -1, 1);
    ac->out = dalloc(N * ac->H * ac->Dv);
    ac->lse = dalloc((size_t)ac->B * ac->H * ac->T);
}

static void attn_free(attn_case *ac)
{
    free(ac->q), free(ac->k), free(ac->v), free(ac->r), free(ac->out), free(ac->lse);
}

static void test_attn_forward(const char *name, attn_case *ac)
{
    int B = ac->B, T = ac->T, H = ac->H, Dk = ac->Dk, Dv = ac->Dv;
    size_t nout = (size_t)B * T * H * Dv;
    double *eo = dalloc(nout), *el = dalloc((size_t)B * H * T), *sc = dalloc(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                /* visible keys: s <= t in the same document */
                double mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    sc[s] = NAN;
                    if (ac->doc && ac->doc[b * T + s] != ac->doc[b * T + t]) continue;
                    double d = 0;
                    for (int c = 0; c < Dk; c++)
                        d += ac->q[((size_t)(b * T + t) * H + h) * Dk + c] *
                             ac->k[((size_t)(b * T + s) * H + h) * Dk + c];
                    sc[s] = ac->scale * d;
                    mx = fmax(mx, sc[s]);
                }
                double z = 0;
                for (int s = 0; s <= t; s++)
                    if (!isnan(sc[s])) z += exp(sc[s] - mx);
                el[((size_t)b * H + h) * T + t] = mx + log(z);
                for (int c = 0; c < Dv; c++) {
                    double o = 0;
                    for (int s = 0; s <= t; s++)
                        if (!isnan(sc[s]))
                            o += exp(sc[s] - mx) / z * ac->v[((size_t)(b * T + s) * H + h) * Dv + c];
                    eo[((size_t)(b * T + t) * H + h) * Dv + c] = o;
                }
            }
    attn_loss(ac);
    char what[160];
    snprintf(what, sizeof what, "attention_forward %s: out vs direct softmax", name);
    gc_compare(what, ac->out, eo, nout, 1e-12);
    snprintf(what, sizeof what, "attention_forward %s: lse vs direct softmax", name);
    gc_compare(what, ac->lse, el, (size_t)B * H * T, 1e-12);
    free(eo), free(el), free(sc);
}

static void attn_backward(attn_case *ac, double *dq, double *dk, double *dv)
{
    attn_loss(ac);
    cpu_attention_backward(dq, dk, dv, ac->r, ac->out, ac->lse, ac->q, ac->k, ac->v, ac->doc,
                           ac->B, ac->T, ac->H, ac->Dk, ac->Dv, ac->scale);
}

static void test_attn_backward(const char *name, attn_case *ac)
{
    size_t nk = (size_t)ac->B * ac->T * ac->H * ac->Dk, nv = (size_t)ac->B * ac->T * ac->H * ac->Dv;
    double *dq = dalloc(nk), *dk = dalloc(nk), *dv = dalloc(nv), *num = dalloc(nk > nv ? nk : nv);
    dfill(dq, nk, PREFILL), dfill(dk, nk, PREFILL), dfill(dv, nv, PREFILL);
    attn_backward(ac, dq, dk, dv);
    dsub(dq, nk, PREFILL), dsub(dk, nk, PREFILL), dsub(dv, nv, PREFILL);
    char what[160];
    gc_numeric(attn_loss, ac, ac->q, nk, FD_H, num);
    snprintf(what, sizeof what, "attention_backward %s: dq vs finite differences", name);
    gc_compare(what, dq, num, nk, FD_TOL);
    gc_numeric(attn_loss, ac, ac->k, nk, FD_H, num);
    snprintf(what, sizeof what, "attention_backward %s: dk vs finite differences", name);
    gc_compare(what, dk, num, nk, FD_TOL);
    gc_numeric(attn_loss, ac, ac->v, nv, FD_H, num);
    snprintf(what, sizeof what, "attention_backward %s: dv vs finite differences", name);
    gc_compare(what, dv, num, nv, FD_TOL);
    free(dq), free(dk), free(dv), free(num);
}

static void test_attn_threads(attn_case *ac)
{
    size_t nk = (size_t)ac->B * ac->T * ac->H * ac->Dk, nv = (size_t)ac->B * ac->T * ac->H * ac->Dv;
    double *g1 = dalloc(2 * nk + nv), *g3 = dalloc(2 * nk + nv);
    int keep = omp_get_max_threads();
    omp_set_num_threads(1);
    attn_backward(ac, g1, g1 + nk, g1 + 2 * nk);
    omp_set_num_threads(3);
    attn_backward(ac, g3, g3 + nk, g3 + 2 * nk);
    omp_set_num_threads(keep);
    gc_report("attention_backward: bit-identical with 1 and 3 threads",
              memcmp(g1, g3, (2 * nk + nv) * sizeof *g1) == 0, NULL);
    free(g1), free(g3);
}

/* ------------------------------------------------------ document masking -------- */

/* Packed rows with document ids and restarted positions must give exactly what each
 * document gives as a sequence of its own (positions from 0, no mask). */
static void test_doc_masking(uint64_t *st)
{
    enum { B = 2, T = 9, H = 2, dn = 3, dr = 4, dv = 3, rkv = 2 };
    const int32_t doc[B * T] = {7, 7, 7, 7, 8, 8, 9, 9, 9, 4, 4, 4, 4, 4, 4, 4, 4, 4};
    int32_t pos[B * T];
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            pos[b * T + t] = (t > 0 && doc[b * T + t] == doc[b * T + t - 1]) ? pos[b * T + t - 1] + 1 : 0;
    const int dk = dn + dr, cs = rkv + dr, N = B * T;
    const double theta = 37.0, scale = 1.0 / sqrt((double)dk);
    double *q = drand_new((size_t)N * H * dk, st, -1, 1), *kv = drand_new((size_t)N * H * (dn + dv), st, -1, 1);
    double *c = drand_new((size_t)N * cs, st, -1, 1), *dout = drand_new((size_t)N * H * dv, st, -1, 1);
    double *qh = dalloc((size_t)N * H * dk), *kh = dalloc((size_t)N * H * dk), *vh = dalloc((size_t)N * H * dv);
    double *out = dalloc((size_t)N * H * dv), *lse = dalloc((size_t)B * H * T);
    double *dq = dalloc((size_t)N * H * dk), *dk_ = dalloc((size_t)N * H * dk), *dv_ = dalloc((size_t)N * H * dv);
    cpu_mla_prep_forward(qh, kh, vh, q, kv, c + rkv, cs, pos, B, T, H, dn, dr, dv, theta);
    cpu_attention_forward(out, lse, qh, kh, vh, doc, B, T, H, dk, dv, scale);
    cpu_attention_backward(dq, dk_, dv_, dout, out, lse, qh, kh, vh, doc, B, T, H, dk, dv, scale);

    /* the same tensors, reassembled document by document (ref_* in packed layout) */
    double *ref_out = dalloc((size_t)N * H * dv), *ref_lse = dalloc((size_t)B * H * T);
    double *ref_dq = dalloc((size_t)N * H * dk), *ref_dk = dalloc((size_t)N * H * dk), *ref_dv = dalloc((size_t)N * H * dv);
    for (int b = 0; b < B; b++) {
        int t0 = 0;
        while (t0 < T) {
            int L = 1;
            while (t0 + L < T && doc[b * T + t0 + L] == doc[b * T + t0]) L++;
            size_t first = (size_t)b * T + t0;
            double *sq = dalloc((size_t)L * H * dk), *skv = dalloc((size_t)L * H * (dn + dv)), *sc = dalloc((size_t)L * cs);
            double *sdo = dalloc((size_t)L * H * dv);
            memcpy(sq, q + first * H * dk, (size_t)L * H * dk * sizeof *sq);
            memcpy(skv, kv + first * H * (dn + dv), (size_t)L * H * (dn + dv) * sizeof *skv);
            memcpy(sc, c + first * cs, (size_t)L * cs * sizeof *sc);
            memcpy(sdo, dout + first * H * dv, (size_t)L * H * dv * sizeof *sdo);
            double *sqh = dalloc((size_t)L * H * dk), *skh = dalloc((size_t)L * H * dk), *svh = dalloc((size_t)L * H * dv);
            double *so = dalloc((size_t)L * H * dv), *sl = dalloc((size_t)H * L);
            double *sdq = dalloc((size_t)L * H * dk), *sdk = dalloc((size_t)L * H * dk), *sdv = dalloc((size_t)L * H * dv);
            cpu_mla_prep_forward(sqh, skh, svh, sq, skv, sc + rkv, cs, NULL, 1, L, H, dn, dr, dv, theta);
            cpu_attention_forward(so, sl, sqh, skh, svh, NULL, 1, L, H, dk, dv, scale);
            cpu_attention_backward(sdq, sdk, sdv, sdo, so, sl, sqh, skh, svh, NULL, 1, L, H, dk, dv, scale);
            memcpy(ref_out + first * H * dv, so, (size_t)L * H * dv * sizeof *so);
            memcpy(ref_dq + first * H * dk, sdq, (size_t)L * H * dk * sizeof *sdq);
            memcpy(ref_dk + first * H * dk, sdk, (size_t)L * H * dk * sizeof *sdk);
            memcpy(ref_dv + first * H * dv, sdv, (size_t)L * H * dv * sizeof *sdv);
            for (int h = 0; h < H; h++)
                for (int t = 0; t < L; t++) ref_lse[((size_t)b * H + h) * T + t0 + t] = sl[(size_t)h * L + t];
            free(sq), free(skv), free(sc), free(sdo), free(sqh), free(skh), free(svh);
            free(so), free(sl), free(sdq), free(sdk), free(sdv);
            t0 += L;
        }
    }
    gc_compare("doc masking: attention out equals separate documents", out, ref_out, (size_t)N * H * dv, 1e-13);
    gc_compare("doc masking: lse equals separate documents", lse, ref_lse, (size_t)B * H * T, 1e-13);
    gc_compare("doc masking: dq equals separate documents", dq, ref_dq, (size_t)N * H * dk, 1e-13);
    gc_compare("doc masking: dk equals separate documents", dk_, ref_dk, (size_t)N * H * dk, 1e-13);
    gc_compare("doc masking: dv equals separate documents", dv_, ref_dv, (size_t)N * H * dv, 1e-13);
    free(q), free(kv), free(c), free(dout), free(qh), free(kh), free(vh), free(out), free(lse);
    free(dq), free(dk_), free(dv_), free(ref_out), free(ref_lse), free(ref_dq), free(ref_dk), free(ref_dv);
}

int main(void)
{
    uint64_t st = 0x5eed3a11ULL;

    prep_case pc = {.B = 2, .T = 5, .H = 3, .dn = 4, .dr = 6, .dv = 5, .rkv = 3, .theta = 10000.0};
    prep_init(&pc, &st);
    test_prep_forward("(pos NULL)", &pc);
    test_prep_backward("(pos NULL)", &pc);
    const int32_t pos[10] = {0, 17, 3, 41, 2, 9, 0, 1, 250, 33};
    pc.pos = pos;
    pc.theta = 50.0;
    test_prep_forward("(explicit pos)", &pc);
    test_prep_backward("(explicit pos)", &pc);
    prep_free(&pc);

    const int32_t doc[2 * 7] = {0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4};
    attn_case ac = {.B = 2, .T = 7, .H = 3, .Dk = 5, .Dv = 3};
    ac.scale = 1.0 / sqrt(5.0);
    attn_init(&ac, &st);
    test_attn_forward("(causal)", &ac);
    test_attn_backward("(causal)", &ac);
    ac.doc = doc;
    test_attn_forward("(doc_id)", &ac);
    test_attn_backward("(doc_id)", &ac);
    test_attn_threads(&ac);
    attn_free(&ac);

    test_doc_masking(&st);
    return gc_failures() != 0;
}
