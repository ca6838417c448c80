/* test_gdn.c: the gated delta rule ops (src/cpu/cpu_gdn.c) in double precision.
 *
 * The token-by-token loop (cpu_gdn_recurrent_*) is the reference: its backward is held
 * against finite differences, and the chunked ops that training uses are held against
 * it on many shapes (T below, at, between and above multiples of the chunk, odd D,
 * several heads), on strongly negative gates, on unnormalised keys and on document
 * starts inside chunks and at their edges. Document masking is also checked the direct
 * way: a packed row must give what each of its documents gives run alone.
 */
#include "backend.h" /* GDN_CHUNK, the state_save layout: the ops under test are the cpu_ops.h ones */
#include "cpu_ops.h"
#include "gradcheck.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct gdn_case {
    int B, T, H, D;
    double scale;
    size_t nv; /* B*T*H*D */
    size_t ns; /* B*T*H */
    double *q, *k, *v, *g, *beta;
    int32_t *doc; /* NULL or [B, T] */
} gdn_case;

typedef struct gdn_grads {
    double *dq, *dk, *dv, *dg, *dbeta;
} gdn_grads;

static void *test_alloc(size_t bytes)
{
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "test_gdn: out of memory\n");
        exit(2);
    }
    return p;
}

static double *dalloc(size_t n) { return test_alloc(n * sizeof(double)); }

/* Random inputs in the ranges the model produces: q, v in [-1, 1]; k either L2
 * normalised per (b, t, h) or, when kamp > 0, left raw in [-kamp, kamp]; g in
 * [glo, ghi]; beta in [0.05, 0.95]. */
static void case_init(gdn_case *c, int B, int T, int H, int D, uint64_t seed, double glo,
                      double ghi, double kamp)
{
    memset(c, 0, sizeof *c);
    c->B = B;
    c->T = T;
    c->H = H;
    c->D = D;
    c->scale = 1.0 / sqrt((double)D);
    c->ns = (size_t)B * T * H;
    c->nv = c->ns * D;
    c->q = dalloc(c->nv);
    c->k = dalloc(c->nv);
    c->v = dalloc(c->nv);
    c->g = dalloc(c->ns);
    c->beta = dalloc(c->ns);
    uint64_t st = seed;
    gc_fill(c->q, c->nv, &st, -1, 1);
    gc_fill(c->v, c->nv, &st, -1, 1);
    if (kamp > 0) {
        gc_fill(c->k, c->nv, &st, -kamp, kamp);
    } else {
        gc_fill(c->k, c->nv, &st, -1, 1);
        for (size_t r = 0; r < c->ns; r++) {
            double ss = 0;
            for (int i = 0; i < D; i++) ss += c->k[r * D + i] * c->k[r * D + i];
            double inv = 1.0 / fmax(sqrt(ss), 1e-12);
            for (int i = 0; i < D; i++) c->k[r * D + i] *= inv;
        }
    }
    gc_fill(c->g, c->ns, &st, glo, ghi);
    gc_fill(c->beta, c->ns, &st, 0.05, 0.95);
}

static void case_free(gdn_case *c)
{
    free(c->q);
    free(c->k);
    free(c->v);
    free(c->g);
    free(c->beta);
    free(c->doc);
}

static void grads_init(gdn_grads *gr, const gdn_case *c, double fill)
{
    gr->dq = dalloc(c->nv);
    gr->dk = dalloc(c->nv);
    gr->dv = dalloc(c->nv);
    gr->dg = dalloc(c->ns);
    gr->dbeta = dalloc(c->ns);
    for (size_t i = 0; i < c->nv; i++) gr->dq[i] = gr->dk[i] = gr->dv[i] = fill;
    for (size_t i = 0; i < c->ns; i++) gr->dg[i] = gr->dbeta[i] = fill;
}

static void grads_free(gdn_grads *gr)
{
    free(gr->dq);
    free(gr->dk);
    free(gr->dv);
    free(gr->dg);
    free(gr->dbeta);
}

static size_t state_floats(const gdn_case *c) { return gdn_state_floats(c->B, c->T, c->H, c->D); }

static void run_forward(const gdn_case *c, int chunked, double *o)
{
    if (chunked) {
        double *save = dalloc(state_floats(c));
        cpu_gdn_forward(o, save, c->q, c->k, c->v, c->g, c->beta, c->doc, c->B, c->T, c->H,
                        c->D, c->scale);
        free(save);
    } else {
        cpu_gdn_recurrent_forward(o, c->q, c->k, c->v, c->g, c->beta, c->doc, c->B, c->T, c->H,
                                  c->D, c->scale);
    }
}

/* accumulates into gr, as the ops do */
static void run_backward(const gdn_case *c, int chunked, const double *dout, gdn_grads *gr)
{
    if (chunked) {
        double *save = dalloc(state_floats(c));
        double *o = dalloc(c->nv);
        cpu_gdn_forward(o, save, c->q, c->k, c->v, c->g, c->beta, c->doc, c->B, c->T, c->H,
                        c->D, c->scale);
        cpu_gdn_backward(gr->dq, gr->dk, gr->dv, gr->dg, gr->dbeta, dout, c->q, c->k, c->v,
                         c->g, c->beta, save, c->doc, c->B, c->T, c->H, c->D, c->scale);
        free(o);
        free(save);
    } else {
        cpu_gdn_recurrent_backward(gr->dq, gr->dk, gr->dv, gr->dg, gr->dbeta, dout, c->q, c->k,
                                   c->v, c->g, c->beta, c->doc, c->B, c->T, c->H, c->D,
                                   c->scale);
    }
}

/* the criterion of gc_compare: max |a - ref| / max(1, max |ref|), NaN counting as +inf */
static double rel_err(const double *a, const double *ref, size_t n)
{
    double maxerr = 0, maxref = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(a[i] - ref[i]);
        if (!(e <= maxerr)) maxerr = isnan(e) ? INFINITY : e;
        if (fabs(ref[i]) > maxref) maxref = fabs(ref[i]);
    }
    return maxerr / (maxref > 1 ? maxref : 1);
}

/* one line comparing all five gradients */
static void compare_grads(const char *what, const gdn_case *c, const gdn_grads *a,
                          const gdn_grads *ref, double tol)
{
    double e[5] = {rel_err(a->dq, ref->dq, c->nv), rel_err(a->dk, ref->dk, c->nv),
                   rel_err(a->dv, ref->dv, c->nv), rel_err(a->dg, ref->dg, c->ns),
                   rel_err(a->dbeta, ref->dbeta, c->ns)};
    int pass = 1;
    for (int i = 0; i < 5; i++) pass &= e[i] <= tol;
    char detail[200];
    snprintf(detail, sizeof detail, "rel err dq %.2g dk %.2g dv %.2g dg %.2g dbeta %.2g (tol %.2g)",
             e[0], e[1], e[2], e[3], e[4], tol);
    gc_report(what, pass, detail);
}

/* Chunked forward and backward against the recurrent ones on one case. */
static void check_chunked_vs_recurrent(const char *label, const gdn_case *c, uint64_t seed)
{
    char what[200];
    double *o_rec = dalloc(c->nv), *o_chk = dalloc(c->nv), *dout = dalloc(c->nv);
    uint64_t st = seed;
    gc_fill(dout, c->nv, &st, -1, 1);
    run_forward(c, 0, o_rec);
    run_forward(c, 1, o_chk);
    snprintf(what, sizeof what, "chunked forward == recurrent, %s B=%d T=%d H=%d D=%d", label,
             c->B, c->T, c->H, c->D);
    gc_compare(what, o_chk, o_rec, c->nv, 1e-12);

    gdn_grads gr, gc;
    grads_init(&gr, c, 0);
    grads_init(&gc, c, 0);
    run_backward(c, 0, dout, &gr);
    run_backward(c, 1, dout, &gc);
    snprintf(what, sizeof what, "chunked backward == recurrent, %s B=%d T=%d H=%d D=%d", label,
             c->B, c->T, c->H, c->D);
    compare_grads(what, c, &gc, &gr, 1e-10);
    grads_free(&gr);
    grads_free(&gc);
    free(o_rec);
    free(o_chk);
    free(dout);
}

/* ---- (a), (b): chunked == recurrent over shapes and input regimes ---- */

static void test_shapes(void)
{
    static const int Ts[] = {64, 128, 100, 37, 130};
    static const int Ds[] = {5, 8};
    static const int Hs[] = {1, 3};
    /* With g in [-3, -0.01] the state a chunk inherits has mostly decayed away after a
     * few tokens, so slow gates are run too: they make every chunk depend on the state
     * carried across its start and let the state reach the chunk's end. */
    static const double glo[] = {-3, -0.1};
    static const char *glabel[] = {"g in [-3,-0.01]", "g in [-0.1,-0.01]"};
    uint64_t seed = 1001;
    for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++)
        for (size_t di = 0; di < 2; di++)
            for (size_t hi = 0; hi < 2; hi++)
                for (int gi = 0; gi < 2; gi++) {
                    gdn_case c;
                    case_init(&c, 2, Ts[ti], Hs[hi], Ds[di], seed++, glo[gi], -0.01, 0);
                    check_chunked_vs_recurrent(glabel[gi], &c, seed++);
                    case_free(&c);
                }
}

static void test_regimes(void)
{
    gdn_case c;
    /* exp(G_t) alone would reach e^-1280 and exp(-G_s) e^+1280 here */
    case_init(&c, 2, 130, 2, 7, 2001, -20, -5, 0);
    check_chunked_vs_recurrent("g in [-20,-5]", &c, 2002);
    case_free(&c);
    /* raw keys: the op must not assume unit norm */
    case_init(&c, 2, 100, 2, 7, 2003, -3, -0.01, 0.3);
    check_chunked_vs_recurrent("unnormalised k in [-0.3,0.3]", &c, 2004);
    case_free(&c);
    /* slow decay over many chunks: the carried state dominates */
    case_init(&c, 1, 300, 2, 5, 2005, -0.05, 0, 0);
    check_chunked_vs_recurrent("g in [-0.05,0]", &c, 2006);
    case_free(&c);
    /* the model's head sizes */
    case_init(&c, 1, 150, 2, 85, 2007, -3, -0.01, 0);
    check_chunked_vs_recurrent("g in [-3,-0.01]", &c, 2008);
    case_free(&c);
    case_init(&c, 1, 70, 1, 64, 2009, -3, -0.01, 0);
    check_chunked_vs_recurrent("g in [-3,-0.01]", &c, 2010);
    case_free(&c);
    /* degenerate sizes */
    case_init(&c, 2, 1, 2, 3, 2011, -3, -0.01, 0);
    check_chunked_vs_recurrent("single token", &c, 2012);
    case_free(&c);
    case_init(&c, 2, 90, 2, 1, 2013, -3, -0.01, 0.9);
    check_chunked_vs_recurrent("scalar state", &c, 2014);
    case_free(&c);
}

/* ---- (c): finite differences ---- */

typedef struct fd_ctx {
    const gdn_case *c;
    const double *R; /* dL/do */
    double *o;
    int chunked;
} fd_ctx;

static double fd_loss(void *p)
{
    fd_ctx *x = p;
    run_forward(x->c, x->chunked, x->o);
    return gc_dot(x->o, x->R, x->c->nv);
}

static void check_fd(const char *label, gdn_case *c, int chunked, uint64_t seed)
{
    double *R = dalloc(c->nv), *o = dalloc(c->nv);
    double *num = dalloc(c->nv);
    uint64_t st = seed;
    gc_fill(R, c->nv, &st, -1, 1);
    gdn_grads gr;
    grads_init(&gr, c, 0);
    run_backward(c, chunked, R, &gr);
    fd_ctx ctx = {c, R, o, chunked};
    struct {
        const char *name;
        double *x, *grad;
        size_t n;
    } in[5] = {{"dq", c->q, gr.dq, c->nv},
               {"dk", c->k, gr.dk, c->nv},
               {"dv", c->v, gr.dv, c->nv},
               {"dg", c->g, gr.dg, c->ns},
               {"dbeta", c->beta, gr.dbeta, c->ns}};
    for (int i = 0; i < 5; i++) {
        char what[200];
        gc_numeric(fd_loss, &ctx, in[i].x, in[i].n, 1e-6, num);
        snprintf(what, sizeof what, "%s backward vs finite differences, %s: %s",
                 chunked ? "chunked" : "recurrent", label, in[i].name);
        gc_compare(what, in[i].grad, num, in[i].n, 1e-6);
    }
    grads_free(&gr);
    free(R);
    free(o);
    free(num);
}

static void test_finite_differences(void)
{
    gdn_case c;
    /* gates slow enough that the first chunk's state reaches every token of the second */
    case_init(&c, 1, 70, 2, 4, 3001, -0.5, -0.01, 0);
    check_fd("B=1 T=70 H=2 D=4", &c, 0, 3002);
    check_fd("B=1 T=70 H=2 D=4", &c, 1, 3003);
    c.doc = test_alloc((size_t)c.B * c.T * sizeof(int32_t));
    c.doc[0] = c.doc[3] = c.doc[64] = c.doc[65] = c.doc[69] = 1;
    check_fd("B=1 T=70 H=2 D=4 doc starts 0,3,64,65,69", &c, 0, 3004);
    check_fd("B=1 T=70 H=2 D=4 doc starts 0,3,64,65,69", &c, 1, 3005);
    case_free(&c);
}

/* ---- (d): document starts ---- */

/* Each document of c run alone as its own B=1 sequence (chunked), outputs and
 * gradients scattered back into full-size arrays. */
static void run_docs_alone(const gdn_case *c, const double *dout, double *o, gdn_grads *gr)
{
    const int H = c->H, D = c->D;
    for (int b = 0; b < c->B; b++) {
        int a = 0;
        while (a < c->T) {
            int e = a + 1;
            while (e < c->T && !c->doc[(size_t)b * c->T + e]) e++;
            gdn_case s;
            memset(&s, 0, sizeof s);
            s.B = 1;
            s.T = e - a;
            s.H = H;
            s.D = D;
            s.scale = c->scale;
            s.ns = (size_t)s.T * H;
            s.nv = s.ns * D;
            const size_t off_s = ((size_t)b * c->T + a) * H, off_v = off_s * D;
            s.q = c->q + off_v;
            s.k = c->k + off_v;
            s.v = c->v + off_v;
            s.g = c->g + off_s;
            s.beta = c->beta + off_s;
            run_forward(&s, 1, o + off_v);
            gdn_grads sg = {gr->dq + off_v, gr->dk + off_v, gr->dv + off_v, gr->dg + off_s,
                            gr->dbeta + off_s};
            run_backward(&s, 1, dout + off_v, &sg);
            a = e;
        }
    }
}

static void test_doc_starts(void)
{
    gdn_case c;
    case_init(&c, 2, 200, 2, 5, 4001, -3, -0.01, 0);
    c.doc = test_alloc((size_t)c.B * c.T * sizeof(int32_t));
    /* row 0: inside chunks, right before/at/after chunk edges, one-token documents,
     * the last token; row 1 has no flag at t = 0 (the state starts at 0 anyway) */
    static const int row0[] = {0, 5, 63, 64, 65, 66, 128, 150, 199};
    static const int row1[] = {100, 191, 192};
    for (size_t i = 0; i < sizeof row0 / sizeof row0[0]; i++) c.doc[row0[i]] = 1;
    for (size_t i = 0; i < sizeof row1 / sizeof row1[0]; i++) c.doc[c.T + row1[i]] = 1;
    check_chunked_vs_recurrent("doc starts", &c, 4002);

    double *o_doc = dalloc(c.nv), *o_alone = dalloc(c.nv), *dout = dalloc(c.nv);
    uint64_t st = 4003;
    gc_fill(dout, c.nv, &st, -1, 1);
    run_forward(&c, 1, o_doc);
    gdn_grads g_doc, g_alone;
    grads_init(&g_doc, &c, 0);
    grads_init(&g_alone, &c, 0);
    run_backward(&c, 1, dout, &g_doc);
    run_docs_alone(&c, dout, o_alone, &g_alone);
    gc_compare("doc-masked forward == each document run alone", o_doc, o_alone, c.nv, 1e-12);
    compare_grads("doc-masked backward == each document run alone", &c, &g_doc, &g_alone, 1e-10);
    grads_free(&g_doc);
    grads_free(&g_alone);
    free(o_doc);
    free(o_alone);
    free(dout);

    /* every token its own document, then random starts with slow decay */
    for (size_t i = 0; i < (size_t)c.B * c.T; i++) c.doc[i] = 1;
    check_chunked_vs_recurrent("doc start on every token", &c, 4004);
    st = 4005;
    for (size_t i = 0; i < (size_t)c.B * c.T; i++) c.doc[i] = gc_uniform(&st) < 0.05;
    for (size_t i = 0; i < c.ns; i++) c.g[i] = -0.05 * gc_uniform(&st);
    check_chunked_vs_recurrent("random doc starts, g in [-0.05,0]", &c, 4006);
    case_free(&c);
}

/* ---- (e): backward accumulates, and reruns are bit-identical ---- */

static void test_accumulate(void)
{
    gdn_case c;
    case_init(&c, 2, 100, 3, 5, 5001, -3, -0.01, 0);
    c.doc = test_alloc((size_t)c.B * c.T * sizeof(int32_t));
    c.doc[70] = 1;
    double *dout = dalloc(c.nv);
    uint64_t st = 5002;
    gc_fill(dout, c.nv, &st, -1, 1);
    for (int chunked = 0; chunked < 2; chunked++) {
        gdn_grads g0, g1;
        grads_init(&g0, &c, 0);
        grads_init(&g1, &c, 0.5);
        run_backward(&c, chunked, dout, &g0);
        run_backward(&c, chunked, dout, &g1);
        for (size_t i = 0; i < c.nv; i++) {
            g1.dq[i] -= 0.5;
            g1.dk[i] -= 0.5;
            g1.dv[i] -= 0.5;
        }
        for (size_t i = 0; i < c.ns; i++) {
            g1.dg[i] -= 0.5;
            g1.dbeta[i] -= 0.5;
        }
        compare_grads(chunked ? "chunked backward accumulates into prefilled gradients"
                              : "recurrent backward accumulates into prefilled gradients",
                      &c, &g1, &g0, 1e-12);
        grads_free(&g0);
        grads_free(&g1);
    }

    /* determinism: the same call twice gives the same bits */
    double *o1 = dalloc(c.nv), *o2 = dalloc(c.nv);
    double *s1 = dalloc(state_floats(&c)), *s2 = dalloc(state_floats(&c));
    gdn_grads a, b;
    grads_init(&a, &c, 0);
    grads_init(&b, &c, 0);
    cpu_gdn_forward(o1, s1, c.q, c.k, c.v, c.g, c.beta, c.doc, c.B, c.T, c.H, c.D, c.scale);
    cpu_gdn_forward(o2, s2, c.q, c.k, c.v, c.g, c.beta, c.doc, c.B, c.T, c.H, c.D, c.scale);
    cpu_gdn_backward(a.dq, a.dk, a.dv, a.dg, a.dbeta, dout, c.q, c.k, c.v, c.g, c.beta, s1,
                     c.doc, c.B, c.T, c.H, c.D, c.scale);
    cpu_gdn_backward(b.dq, b.dk, b.dv, b.dg, b.dbeta, dout, c.q, c.k, c.v, c.g, c.beta, s2,
                     c.doc, c.B, c.T, c.H, c.D, c.scale);
    int same = !memcmp(o1, o2, c.nv * sizeof(double)) &&
               !memcmp(s1, s2, state_floats(&c) * sizeof(double)) &&
               !memcmp(a.dq, b.dq, c.nv * sizeof(double)) &&
               !memcmp(a.dk, b.dk, c.nv * sizeof(double)) &&
               !memcmp(a.dv, b.dv, c.nv * sizeof(double)) &&
               !memcmp(a.dg, b.dg, c.ns * sizeof(double)) &&
               !memcmp(a.dbeta, b.dbeta, c.ns * sizeof(double));
    gc_report("chunked forward and backward are bit-identical on rerun", same, NULL);
    grads_free(&a);
    grads_free(&b);
    free(o1);
    free(o2);
    free(s1);
    free(s2);
    free(dout);
    case_free(&c);
}

/* state_save against the token loop run here: each chunk's start state, and its W rows
 * (the loop's w_t), with zeros in the rows past the sequence end and in the pad columns;
 * a ragged last chunk, D = 5 (rows padded to 8), document starts inside a chunk and on a
 * chunk boundary. */
static void test_saved_state(void)
{
    gdn_case c;
    case_init(&c, 2, 150, 2, 5, 6001, -0.3, -0.01, 0);
    c.doc = test_alloc((size_t)c.B * c.T * sizeof(int32_t));
    c.doc[40] = 1;
    c.doc[c.T + 64] = 1;
    double *o = dalloc(c.nv), *save = dalloc(state_floats(&c));
    cpu_gdn_forward(o, save, c.q, c.k, c.v, c.g, c.beta, c.doc, c.B, c.T, c.H, c.D, c.scale);
    const int D = c.D, Dw = gdn_w_pitch(D), nchunk = (c.T + GDN_CHUNK - 1) / GDN_CHUNK;
    const double *wsave = save + gdn_state_w_offset(c.B, c.T, c.H, D);
    double *S = dalloc((size_t)D * D), *w = dalloc((size_t)D);
    double err_s = 0, err_w = 0, scale_s = 0, scale_w = 0;
    int pads_zero = 1;
    for (int b = 0; b < c.B; b++)
        for (int h = 0; h < c.H; h++) {
            const size_t bh = (size_t)b * c.H + h;
            memset(S, 0, (size_t)D * D * sizeof(double));
            for (int t = 0; t < c.T; t++) {
                const size_t n = ((size_t)b * c.T + t) * c.H + h;
                if (c.doc[(size_t)b * c.T + t]) memset(S, 0, (size_t)D * D * sizeof(double));
                const int ci = t / GDN_CHUNK, r = t % GDN_CHUNK;
                if (r == 0)
                    for (int e = 0; e < D * D; e++) {
                        err_s = fmax(err_s, fabs(save[(bh * nchunk + ci) * D * D + e] - S[e]));
                        scale_s = fmax(scale_s, fabs(S[e]));
                    }
                const double a = exp(c.g[n]);
                for (int e = 0; e < D * D; e++) S[e] *= a;
                for (int j = 0; j < D; j++) {
                    double sk = 0;
                    for (int i = 0; i < D; i++) sk += S[i * D + j] * c.k[n * D + i];
                    w[j] = c.beta[n] * (c.v[n * D + j] - sk);
                }
                for (int i = 0; i < D; i++)
                    for (int j = 0; j < D; j++) S[i * D + j] += c.k[n * D + i] * w[j];
                const double *row = wsave + ((bh * nchunk + ci) * GDN_CHUNK + r) * Dw;
                for (int j = 0; j < D; j++) {
                    err_w = fmax(err_w, fabs(row[j] - w[j]));
                    scale_w = fmax(scale_w, fabs(w[j]));
                }
                for (int j = D; j < Dw; j++) pads_zero &= row[j] == 0;
            }
            for (int r = c.T - (nchunk - 1) * GDN_CHUNK; r < GDN_CHUNK; r++)
                for (int j = 0; j < Dw; j++) pads_zero &= wsave[((bh * nchunk + nchunk - 1) * GDN_CHUNK + r) * Dw + j] == 0;
        }
    char detail[160];
    snprintf(detail, sizeof detail, "max |error| %.2e (states, scale %.2f), %.2e (W, scale %.2f)", err_s, scale_s,
             err_w, scale_w);
    gc_report("state_save holds each chunk's start state and W as the token loop has them", err_s <= 1e-12 * fmax(1, scale_s) && err_w <= 1e-12 * fmax(1, scale_w) && scale_s > 0.1, detail);
    gc_report("state_save's W rows are zero past the sequence end and in the pad columns", pads_zero, NULL);
    free(S);
    free(w);
    free(o);
    free(save);
    case_free(&c);
}

int main(void)
{
    test_shapes();
    test_regimes();
    test_finite_differences();
    test_doc_starts();
    test_accumulate();
    test_saved_state();
    return gc_failures() != 0;
}
