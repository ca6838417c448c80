/* test_mlp.c: the fused SwiGLU MLP of the op table (mlp_forward, mlp_backward,
 * mlp_backward_set; src/backend.h) on the CPU backend. The model (src/model_gdn.c,
 * src/model_mla.c) uses these in place of the op sequence it ran before, and its CPU
 * results must not move by a bit, so each must equal that sequence bit for bit:
 *   forward   matmul_forward (gu), swiglu_forward (act), matmul_forward_add (out), with
 *             resid apart from out (out, gu, act NaN-poisoned first: written, not read;
 *             resid left as it was) and resid = out (the shared experts' accumulate);
 *   backward  matmul_backward_set (dact), swiglu_backward_set (dgu), then matmul_backward
 *             (dx accumulates onto random values) or matmul_backward_set (dx NaN-poisoned
 *             first); dw_gu and dw_down accumulate onto random values in both.
 * The scratch is NaN-poisoned (its contents must not matter) and exactly
 * mlp_scratch_floats(N, h) long, followed by a guard that must survive. Both SwiGLU
 * conventions; shapes with ragged 4 x 4 tiles, the parallel matmul path, h = 1. The CUDA
 * twin is checked against these ops on the GPU (tests/gpu/test_gpu_dense.c).
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

#define GUARD 64

static float *copy_of(const float *src, size_t n)
{
    float *x = xmalloc(n * sizeof *x);
    memcpy(x, src, n * sizeof *x);
    return x;
}

static int same(const float *a, const float *b, size_t n) { return !memcmp(a, b, n * sizeof(float)); }

static void test_forward(const backend *be, int N, int d, int h, int sf, const float *x, const float *w_gu,
                         const float *w_down, const float *resid)
{
    const size_t nd = (size_t)N * d, ngu = (size_t)N * 2 * h, nact = (size_t)N * h;
    float *ref_gu = xmalloc(ngu * sizeof(float)), *ref_act = xmalloc(nact * sizeof(float));
    float *ref_out = xmalloc(nd * sizeof(float));
    be->matmul_forward(ref_gu, x, w_gu, N, d, 2 * h);
    be->swiglu_forward(ref_act, ref_gu, N, h, sf);
    be->matmul_forward_add(ref_out, ref_act, w_down, resid, N, h, d);

    float *gu = filled(ngu, NAN), *act = filled(nact, NAN), *out = filled(nd, NAN), *r = copy_of(resid, nd);
    be->mlp_forward(out, gu, act, x, w_gu, w_down, r, N, d, h, sf);
    check(same(out, ref_out, nd) && same(gu, ref_gu, ngu) && same(act, ref_act, nact),
          "mlp_forward N=%d d=%d h=%d silu_first=%d [resid != out]: out, gu, act over NaN = the op sequence, bitwise",
          N, d, h, sf);
    check(same(r, resid, nd), "mlp_forward N=%d d=%d h=%d silu_first=%d [resid != out]: resid unchanged", N, d, h, sf);

    memcpy(out, resid, nd * sizeof(float));
    be->mlp_forward(out, gu, act, x, w_gu, w_down, out, N, d, h, sf); /* out += MLP(x) */
    check(same(out, ref_out, nd), "mlp_forward N=%d d=%d h=%d silu_first=%d [resid = out]: = the op sequence, bitwise",
          N, d, h, sf);
    free(ref_gu), free(ref_act), free(ref_out), free(gu), free(act), free(out), free(r);
}

static void test_backward(const backend *be, int N, int d, int h, int sf, int dx_set, uint64_t key, const float *x,
                          const float *w_gu, const float *w_down)
{
    const size_t nd = (size_t)N * d, ngu = (size_t)N * 2 * h, nact = (size_t)N * h, nwgu = (size_t)2 * h * d;
    const size_t nwd = (size_t)d * h, ns = mlp_scratch_floats(N, h);
    /* the saved activations of a forward */
    float *gu = xmalloc(ngu * sizeof(float)), *act = xmalloc(nact * sizeof(float)), *out = xmalloc(nd * sizeof(float));
    float *zero = filled(nd, 0.0f);
    be->mlp_forward(out, gu, act, x, w_gu, w_down, zero, N, d, h, sf);
    float *dout = random_buf(key, nd), *dx0 = random_buf(key + 1, nd);
    float *dwgu0 = random_buf(key + 2, nwgu), *dwd0 = random_buf(key + 3, nwd);

    /* the op sequence the model ran */
    float *dact = filled(nact, NAN), *dgu = filled(ngu, NAN);
    float *ref_dx = dx_set ? filled(nd, NAN) : copy_of(dx0, nd), *ref_dwgu = copy_of(dwgu0, nwgu);
    float *ref_dwd = copy_of(dwd0, nwd);
    be->matmul_backward_set(dact, ref_dwd, dout, act, w_down, N, h, d);
    be->swiglu_backward_set(dgu, dact, gu, N, h, sf);
    if (dx_set) be->matmul_backward_set(ref_dx, ref_dwgu, dgu, x, w_gu, N, d, 2 * h);
    else be->matmul_backward(ref_dx, ref_dwgu, dgu, x, w_gu, N, d, 2 * h);

    float *dx = dx_set ? filled(nd, NAN) : copy_of(dx0, nd), *dwgu = copy_of(dwgu0, nwgu), *dwd = copy_of(dwd0, nwd);
    float *scratch = filled(ns + GUARD, NAN);
    for (int i = 0; i < GUARD; i++) scratch[ns + i] = 12345.0f;
    if (dx_set) be->mlp_backward_set(dx, dwgu, dwd, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, sf);
    else be->mlp_backward(dx, dwgu, dwd, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, sf);
    const char *form = dx_set ? "mlp_backward_set" : "mlp_backward";
    const char *dxs = dx_set ? "dx over NaN" : "dx accumulated";
    check(same(dx, ref_dx, nd), "%s N=%d d=%d h=%d silu_first=%d: %s = the op sequence, bitwise", form, N, d, h, sf,
          dxs);
    check(same(dwgu, ref_dwgu, nwgu) && same(dwd, ref_dwd, nwd),
          "%s N=%d d=%d h=%d silu_first=%d: dw_gu, dw_down accumulated = the op sequence, bitwise", form, N, d, h, sf);
    int guard_ok = 1;
    for (int i = 0; i < GUARD; i++) guard_ok &= scratch[ns + i] == 12345.0f;
    check(guard_ok, "%s N=%d d=%d h=%d silu_first=%d: stays within mlp_scratch_floats(N, h)", form, N, d, h, sf);

    free(gu), free(act), free(out), free(zero), free(dout), free(dx0), free(dwgu0), free(dwd0), free(dact);
    free(dgu), free(ref_dx), free(ref_dwgu), free(ref_dwd), free(dx), free(dwgu), free(dwd), free(scratch);
}

static void test_shape(const backend *be, int N, int d, int h)
{
    const uint64_t key = rng_key(13, "mlp") + (uint64_t)N * 1000003 + (uint64_t)d * 1009 + (uint64_t)h;
    /* weights ~ 1/sqrt(fan-in) as in training, so SwiGLU sees O(1) inputs */
    float *x = random_buf(key, (size_t)N * d), *w_gu = random_buf(key + 1, (size_t)2 * h * d);
    float *w_down = random_buf(key + 2, (size_t)d * h), *resid = random_buf(key + 3, (size_t)N * d);
    for (size_t i = 0; i < (size_t)2 * h * d; i++) w_gu[i] *= (float)sqrt(3.0 / d);
    for (size_t i = 0; i < (size_t)d * h; i++) w_down[i] *= (float)sqrt(3.0 / h);
    for (int sf = 0; sf < 2; sf++) {
        test_forward(be, N, d, h, sf, x, w_gu, w_down, resid);
        for (int dx_set = 0; dx_set < 2; dx_set++)
            test_backward(be, N, d, h, sf, dx_set, key + 10 + 4 * (uint64_t)(2 * sf + dx_set), x, w_gu, w_down);
    }
    free(x), free(w_gu), free(w_down), free(resid);
}

int main(void)
{
    const backend *be = backend_cpu();
    static const int shapes[][3] = {{7, 13, 5}, {64, 48, 96}, {130, 257, 67}, {33, 100, 1}, {1, 9, 4}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) test_shape(be, shapes[i][0], shapes[i][1], shapes[i][2]);
    printf("# %d failure(s)\n", failures);
    return failures != 0;
}
