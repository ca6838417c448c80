/* test_backend_set.c: the "_set" ops of the op table (src/backend.h) on the CPU backend:
 * matmul_backward_set, swiglu_backward_set, attention_backward_set, gdn_backward_set,
 * conv_backward_set, l2norm_backward_set and mla_prep_backward_set write the input
 * gradients instead of adding to them, so whatever the buffers held before (NaN here)
 * must not matter, and the result must be the accumulating op's on zeroed buffers, bit
 * for bit; the weight gradients of matmul_backward_set and conv_backward_set still
 * accumulate. The model (src/model_gdn.c, src/model_mla.c) uses them where it used to
 * zero a buffer first. Also the multi forms of the Linear layer (several parts on one
 * input), against the single ops, and the fused MLA attention against the op sequence it
 * stands for. The CUDA twins are checked against the CPU on the GPU (tests/gpu/test_gpu_dense.c,
 * test_gpu_basic.c, test_gpu_attention.c, test_gpu_gdn.c).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "rng.h"
#include "util.h"

#include "check.h"
#include "test_bufs.h"

static void test_matmul(const backend *be, int N, int in, int out, int want_dx, int want_dw)
{
    const size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
    const uint64_t key = rng_key(7, "matmul_set") + (uint64_t)N * 1000003 + (uint64_t)in * 1009 + out;
    float *x = random_buf(key, nx), *w = random_buf(key + 1, nw), *dy = random_buf(key + 2, ny);
    float *dw0 = random_buf(key + 3, nw); /* the weight gradient held before: added to by both */
    float *ref_dx = want_dx ? filled(nx, 0.0f) : NULL, *ref_dw = want_dw ? xmalloc(nw * sizeof(float)) : NULL;
    float *set_dx = want_dx ? filled(nx, NAN) : NULL, *set_dw = want_dw ? xmalloc(nw * sizeof(float)) : NULL;
    if (want_dw) memcpy(ref_dw, dw0, nw * sizeof(float)), memcpy(set_dw, dw0, nw * sizeof(float));
    be->matmul_backward(ref_dx, ref_dw, dy, x, w, N, in, out);
    be->matmul_backward_set(set_dx, set_dw, dy, x, w, N, in, out);
    const char *mode = want_dx && want_dw ? "dx+dw" : want_dx ? "dx" : "dw";
    if (want_dx)
        check(!memcmp(ref_dx, set_dx, nx * sizeof(float)),
              "matmul_backward_set N=%d in=%d out=%d [%s]: dx over NaN = matmul_backward on zeros, bitwise", N, in,
              out, mode);
    if (want_dw)
        check(!memcmp(ref_dw, set_dw, nw * sizeof(float)),
              "matmul_backward_set N=%d in=%d out=%d [%s]: dw still accumulates, bitwise", N, in, out, mode);
    free(x), free(w), free(dy), free(dw0), free(ref_dx), free(ref_dw), free(set_dx), free(set_dw);
}

/* matmul_forward_multi / matmul_backward_multi (the model's form for the projections of
 * one normed input) on the CPU: the single ops part by part, bit for bit: each y that of
 * matmul_forward; dx over NaN with dx_set (or added to) that of matmul_backward_set for
 * the first part and matmul_backward for the rest, in order; each dw added to, NULL
 * skipped */
static void test_matmul_multi(const backend *be, int N, int in, const int *outs, int n, int dx_set)
{
    const size_t nx = (size_t)N * in;
    const uint64_t key = rng_key(7, "matmul_multi") + (uint64_t)N * 1009 + (uint64_t)in * 7 + dx_set;
    float *x = random_buf(key, nx), *dx0 = random_buf(key + 1, nx);
    float *ref_dx = xmalloc(nx * sizeof(float)), *got_dx = dx_set ? filled(nx, NAN) : xmalloc(nx * sizeof(float));
    memcpy(ref_dx, dx0, nx * sizeof(float));
    if (!dx_set) memcpy(got_dx, dx0, nx * sizeof(float));
    matmul_part p[MATMUL_PARTS_MAX];
    float *w[MATMUL_PARTS_MAX], *dy[MATMUL_PARTS_MAX], *ref_y[MATMUL_PARTS_MAX], *ref_dw[MATMUL_PARTS_MAX];
    for (int i = 0; i < n; i++) {
        const size_t nw = (size_t)outs[i] * in, ny = (size_t)N * outs[i];
        w[i] = random_buf(key + 10 + i, nw), dy[i] = random_buf(key + 20 + i, ny);
        ref_y[i] = xmalloc(ny * sizeof(float));
        ref_dw[i] = i == 1 ? NULL : random_buf(key + 30 + i, nw); /* part 1 without dw */
        p[i] = (matmul_part){w[i], outs[i], filled(ny, NAN), dy[i], NULL};
        if (ref_dw[i]) p[i].dw = xmalloc(nw * sizeof(float)), memcpy(p[i].dw, ref_dw[i], nw * sizeof(float));
    }
    be->matmul_forward_multi(p, n, x, N, in);
    for (int i = 0; i < n; i++) {
        be->matmul_forward(ref_y[i], x, w[i], N, in, outs[i]);
        check(!memcmp(ref_y[i], p[i].y, (size_t)N * outs[i] * sizeof(float)),
              "matmul_forward_multi N=%d in=%d, %d parts: y of part %d = matmul_forward, bitwise", N, in, n, i);
    }
    be->matmul_backward_multi(got_dx, dx_set, p, n, x, N, in);
    for (int i = 0; i < n; i++) {
        if (i == 0 && dx_set) be->matmul_backward_set(ref_dx, ref_dw[i], dy[i], x, w[i], N, in, outs[i]);
        else be->matmul_backward(ref_dx, ref_dw[i], dy[i], x, w[i], N, in, outs[i]);
    }
    check(!memcmp(ref_dx, got_dx, nx * sizeof(float)),
          "matmul_backward_multi N=%d in=%d, %d parts, dx_set %d: dx = the single ops in order, bitwise", N, in, n,
          dx_set);
    for (int i = 0; i < n; i++) {
        if (!ref_dw[i]) continue;
        check(!memcmp(ref_dw[i], p[i].dw, (size_t)outs[i] * in * sizeof(float)),
              "matmul_backward_multi N=%d in=%d, %d parts, dx_set %d: dw of part %d added to, bitwise", N, in, n,
              dx_set, i);
    }
    for (int i = 0; i < n; i++) free(w[i]), free(dy[i]), free(ref_y[i]), free(ref_dw[i]), free(p[i].y), free(p[i].dw);
    free(x), free(dx0), free(ref_dx), free(got_dx);
}

static void test_swiglu(const backend *be, int N, int h, int silu_first)
{
    const size_t ni = (size_t)N * 2 * h, no = (size_t)N * h;
    const uint64_t key = rng_key(7, "swiglu_set") + (uint64_t)N * 131 + (uint64_t)h * 7 + silu_first;
    float *in = random_buf(key, ni), *dout = random_buf(key + 1, no);
    float *ref = filled(ni, 0.0f), *set = filled(ni, NAN);
    be->swiglu_backward(ref, dout, in, N, h, silu_first);
    be->swiglu_backward_set(set, dout, in, N, h, silu_first);
    check(!memcmp(ref, set, ni * sizeof(float)),
          "swiglu_backward_set N=%d h=%d silu_first=%d: din over NaN = swiglu_backward on zeros, bitwise", N, h,
          silu_first);
    free(in), free(dout), free(ref), free(set);
}

/* attention_backward_set over NaN = attention_backward on zeroed dq, dk, dv, bitwise */
static void test_attention(const backend *be, int B, int T, int H, int Dk, int Dv)
{
    const size_t nq = (size_t)B * T * H * Dk, nv = (size_t)B * T * H * Dv, nl = (size_t)B * T * H;
    const uint64_t key = rng_key(7, "attention_set") + (uint64_t)T * 131 + Dk;
    float *q = random_buf(key, nq), *k = random_buf(key + 1, nq), *v = random_buf(key + 2, nv);
    float *dout = random_buf(key + 3, nv), *out = xmalloc(nv * sizeof *out), *lse = xmalloc(nl * sizeof *lse);
    const float scale = 1.0f / sqrtf((float)Dk);
    be->attention_forward(out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    float *ref[3] = {filled(nq, 0.0f), filled(nq, 0.0f), filled(nv, 0.0f)};
    float *set[3] = {filled(nq, NAN), filled(nq, NAN), filled(nv, NAN)};
    be->attention_backward(ref[0], ref[1], ref[2], dout, out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    be->attention_backward_set(set[0], set[1], set[2], dout, out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    static const char *names[3] = {"dq", "dk", "dv"};
    const size_t n[3] = {nq, nq, nv};
    for (int i = 0; i < 3; i++) {
        check(!memcmp(ref[i], set[i], n[i] * sizeof(float)),
              "attention_backward_set B=%d T=%d H=%d Dk=%d Dv=%d: %s over NaN = attention_backward on zeros, bitwise",
              B, T, H, Dk, Dv, names[i]);
        free(ref[i]), free(set[i]);
    }
    free(q), free(k), free(v), free(dout), free(out), free(lse);
}

/* gdn_backward_set over NaN = gdn_backward on zeroed gradients, bitwise (documents on) */
static void test_gdn(const backend *be, int B, int T, int H, int D)
{
    const size_t nv = (size_t)B * T * H * D, ns = (size_t)B * T * H;
    const uint64_t key = rng_key(7, "gdn_set") + (uint64_t)T * 131 + D;
    float *q = random_buf(key, nv), *k = random_buf(key + 1, nv), *v = random_buf(key + 2, nv);
    float *dout = random_buf(key + 3, nv), *g = random_buf(key + 4, ns), *beta = random_buf(key + 5, ns);
    for (size_t i = 0; i < ns; i++) {
        g[i] = -0.5f - 0.5f * fabsf(g[i]); /* log decays in (-1, -0.5] */
        beta[i] = 0.5f + 0.4f * beta[i];   /* in (0.1, 0.9) */
    }
    int32_t *doc = xmalloc((size_t)B * T * sizeof *doc);
    for (int i = 0; i < B * T; i++) doc[i] = i % T == 0 || i % 23 == 5;
    float *o = xmalloc(nv * sizeof *o), *st = xmalloc(gdn_state_floats(B, T, H, D) * sizeof *st);
    const float scale = 1.0f / sqrtf((float)D);
    be->gdn_forward(o, st, q, k, v, g, beta, doc, B, T, H, D, scale);
    const size_t n[5] = {nv, nv, nv, ns, ns};
    float *ref[5], *set[5];
    for (int i = 0; i < 5; i++) ref[i] = filled(n[i], 0.0f), set[i] = filled(n[i], NAN);
    be->gdn_backward(ref[0], ref[1], ref[2], ref[3], ref[4], dout, q, k, v, g, beta, st, doc, B, T, H, D, scale);
    be->gdn_backward_set(set[0], set[1], set[2], set[3], set[4], dout, q, k, v, g, beta, st, doc, B, T, H, D, scale);
    static const char *names[5] = {"dq", "dk", "dv", "dg", "dbeta"};
    for (int i = 0; i < 5; i++) {
        check(!memcmp(ref[i], set[i], n[i] * sizeof(float)),
              "gdn_backward_set B=%d T=%d H=%d D=%d: %s over NaN = gdn_backward on zeros, bitwise", B, T, H, D,
              names[i]);
        free(ref[i]), free(set[i]);
    }
    free(q), free(k), free(v), free(dout), free(g), free(beta), free(doc), free(o), free(st);
}

/* conv_backward_set, l2norm_backward_set, mla_prep_backward_set over NaN = the
 * accumulating ops on zeros, bitwise (conv's dw and dbias still added to; the rest of
 * each kpe_stride row of dkpe untouched) */
static void test_small_ops(const backend *be)
{
    const int B = 2, T = 37, C = 12, H = 3, dn = 8, dr = 4, dv = 6, stride = dr + 5;
    const size_t nx = (size_t)B * T * C;
    const uint64_t key = rng_key(7, "small_set");
    float *x = random_buf(key, nx), *dy = random_buf(key + 1, nx), *w = random_buf(key + 2, (size_t)C * 4);
    int32_t ds[B * T];
    for (int i = 0; i < B * T; i++) ds[i] = i % T == 0 || i % 11 == 3;
    float *ref = filled(nx, 0.0f), *set = filled(nx, NAN);
    float *dw0 = random_buf(key + 3, (size_t)C * 5), *dw1 = xmalloc((size_t)C * 5 * sizeof(float));
    memcpy(dw1, dw0, (size_t)C * 5 * sizeof(float));
    be->conv_backward(ref, dw0, dw0 + 4 * C, dy, x, w, ds, B, T, C);
    be->conv_backward_set(set, dw1, dw1 + 4 * C, dy, x, w, ds, B, T, C);
    check(!memcmp(ref, set, nx * sizeof(float)) && !memcmp(dw0, dw1, (size_t)C * 5 * sizeof(float)),
          "conv_backward_set: dx over NaN = conv_backward on zeros, dw and dbias added to alike, bitwise");

    const int n = B * T, D = C;
    float *rn = xmalloc((size_t)n * sizeof(float)), *y = xmalloc(nx * sizeof(float));
    be->l2norm_forward(y, rn, x, n, D);
    memset(ref, 0, nx * sizeof(float));
    for (size_t i = 0; i < nx; i++) set[i] = NAN;
    be->l2norm_backward(ref, dy, x, rn, n, D);
    be->l2norm_backward_set(set, dy, x, rn, n, D);
    check(!memcmp(ref, set, nx * sizeof(float)), "l2norm_backward_set: dx over NaN = l2norm_backward on zeros, bitwise");

    const size_t rows = (size_t)B * T, nq = rows * H * (dn + dr), nkv = rows * H * (dn + dv), nc = rows * stride;
    float *gq = random_buf(key + 4, nq), *gk = random_buf(key + 5, nq), *gv = random_buf(key + 6, rows * H * dv);
    int32_t *pos = xmalloc(rows * sizeof *pos);
    for (size_t i = 0; i < rows; i++) pos[i] = (int32_t)(i % T);
    float *rq = filled(nq, 0.0f), *rkv = filled(nkv, 0.0f), *rc = random_buf(key + 7, nc);
    float *sq = filled(nq, NAN), *skv = filled(nkv, NAN), *sc = xmalloc(nc * sizeof(float));
    memcpy(sc, rc, nc * sizeof(float));
    for (size_t i = 0; i < rows; i++)
        for (int j = 0; j < dr; j++) rc[i * stride + j] = 0.0f, sc[i * stride + j] = NAN;
    be->mla_prep_backward(rq, rkv, rc, stride, gq, gk, gv, pos, B, T, H, dn, dr, dv, 10000.0f);
    be->mla_prep_backward_set(sq, skv, sc, stride, gq, gk, gv, pos, B, T, H, dn, dr, dv, 10000.0f);
    check(!memcmp(rq, sq, nq * sizeof(float)) && !memcmp(rkv, skv, nkv * sizeof(float)) &&
              !memcmp(rc, sc, nc * sizeof(float)),
          "mla_prep_backward_set: dq, dkv, dkpe over NaN = mla_prep_backward on zeros, the rest of each row untouched, "
          "bitwise");
    free(x), free(dy), free(w), free(ref), free(set), free(dw0), free(dw1), free(rn), free(y);
    free(gq), free(gk), free(gv), free(pos), free(rq), free(rkv), free(rc), free(sq), free(skv), free(sc);
}

/* mla_attention_forward / backward_set: the op sequences they stand for (backend.h),
 * bitwise, with and without documents; the backward's gradients over NaN */
static void test_mla_attention(const backend *be, int docs)
{
    const int B = 2, T = 23, H = 3, dn = 8, dr = 4, dv = 6, dk = dn + dr, stride = dr + 3, N = B * T; /* k_pe at column 3 */
    const size_t nq = (size_t)N * H * dk, nkv = (size_t)N * H * (dn + dv), nv = (size_t)N * H * dv;
    const size_t nc = (size_t)N * stride, ns = mla_attention_save_floats(N, H, dn, dr, dv);
    const uint64_t key = rng_key(7, "mla_attention") + (uint64_t)docs;
    float *q = random_buf(key, nq), *kv = random_buf(key + 1, nkv), *c = random_buf(key + 2, nc);
    float *dout = random_buf(key + 3, nv);
    int32_t doc[B * T];
    for (int i = 0; i < N; i++) doc[i] = (i % T) / 7;
    const int32_t *d = docs ? doc : NULL;
    const float scale = 0.3f, theta = 10000.0f;
    /* the sequence */
    float *qh = xmalloc(nq * sizeof(float)), *kh = xmalloc(nq * sizeof(float)), *vh = xmalloc(nv * sizeof(float));
    float *out = xmalloc(nv * sizeof(float)), *lse = xmalloc((size_t)N * H * sizeof(float));
    float *gq = xmalloc(nq * sizeof(float)), *gk = xmalloc(nq * sizeof(float)), *gv = xmalloc(nv * sizeof(float));
    float *dq = filled(nq, NAN), *dkv = filled(nkv, NAN), *dc = random_buf(key + 4, nc);
    be->mla_prep_forward(qh, kh, vh, q, kv, c + 3, stride, NULL, B, T, H, dn, dr, dv, theta);
    be->attention_forward(out, lse, qh, kh, vh, d, B, T, H, dk, dv, scale);
    be->attention_backward_set(gq, gk, gv, dout, out, lse, qh, kh, vh, d, B, T, H, dk, dv, scale);
    be->mla_prep_backward_set(dq, dkv, dc + 3, stride, gq, gk, gv, NULL, B, T, H, dn, dr, dv, theta);
    /* the fused op */
    float *fout = xmalloc(nv * sizeof(float)), *flse = xmalloc((size_t)N * H * sizeof(float));
    float *save = xmalloc(ns * sizeof(float)), *scratch = filled(ns, NAN);
    float *fdq = filled(nq, NAN), *fdkv = filled(nkv, NAN), *fdc = random_buf(key + 4, nc);
    be->mla_attention_forward(fout, flse, save, q, kv, c + 3, stride, NULL, d, B, T, H, dn, dr, dv, theta, scale);
    be->mla_attention_backward_set(fdq, fdkv, fdc + 3, stride, dout, fout, flse, save, scratch, NULL, d, B, T, H, dn,
                                   dr, dv, theta, scale);
    check(!memcmp(out, fout, nv * sizeof(float)) && !memcmp(lse, flse, (size_t)N * H * sizeof(float)),
          "mla_attention_forward%s: out and lse bitwise as mla_prep_forward + attention_forward", docs ? " docs" : "");
    check(!memcmp(dq, fdq, nq * sizeof(float)) && !memcmp(dkv, fdkv, nkv * sizeof(float)) &&
              !memcmp(dc, fdc, nc * sizeof(float)),
          "mla_attention_backward_set%s: dq, dkv, dkpe over NaN bitwise as attention_backward_set + "
          "mla_prep_backward_set, the rest of each row untouched", docs ? " docs" : "");
    free(q), free(kv), free(c), free(dout), free(qh), free(kh), free(vh), free(out), free(lse), free(gq), free(gk);
    free(gv), free(dq), free(dkv), free(dc), free(fout), free(flse), free(save), free(scratch), free(fdq), free(fdkv);
    free(fdc);
}

int main(void)
{
    const backend *be = backend_cpu();
    static const int mm[][3] = {{7, 13, 5}, {64, 48, 96}, {33, 100, 1}};
    for (size_t i = 0; i < sizeof mm / sizeof mm[0]; i++) {
        test_matmul(be, mm[i][0], mm[i][1], mm[i][2], 1, 0);
        test_matmul(be, mm[i][0], mm[i][1], mm[i][2], 0, 1);
        test_matmul(be, mm[i][0], mm[i][1], mm[i][2], 1, 1);
    }
    static const int outs[] = {3, 12, 1, 40, 7, 5};
    for (int dx_set = 0; dx_set < 2; dx_set++) {
        test_matmul_multi(be, 37, 24, outs, 4, dx_set);
        test_matmul_multi(be, 9, 5, outs, 6, dx_set);
    }
    for (int sf = 0; sf < 2; sf++) {
        test_swiglu(be, 5, 7, sf);
        test_swiglu(be, 40, 64, sf);
    }
    test_gdn(be, 2, 70, 2, 9);
    test_small_ops(be);
    test_attention(be, 2, 19, 3, 24, 16);
    test_attention(be, 1, 70, 2, 40, 8);
    test_mla_attention(be, 0);
    test_mla_attention(be, 1);
    printf("# %d failure(s)\n", failures);
    return failures != 0;
}
