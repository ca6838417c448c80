/* test_matmul_add.c: matmul_forward_add of the op table (src/backend.h) on the CPU
 * backend. The model (src/model_gdn.c, src/model_mla.c) uses it in place of
 * matmul_forward followed by add_inplace(y, r), and its CPU results must not move by a
 * bit, so the op must equal that pair bit for bit:
 *   - r apart from y, y NaN-poisoned first (the op must not read y), r left as it was;
 *   - r = y (the accumulate form the shared experts use): y += x W^T.
 * Shapes cover 4 x 4 register tiles with ragged edges, the parallel path (at least 65536
 * multiply-adds), one output column, and an empty sum (in = 0: y = r). The CUDA twin is
 * checked against this op on the GPU (tests/gpu/test_gpu_dense.c).
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

static void test_shape(const backend *be, int N, int in, int out)
{
    const size_t nx = (size_t)N * in, nw = (size_t)out * in, ny = (size_t)N * out;
    const uint64_t key = rng_key(11, "matmul_add") + (uint64_t)N * 1000003 + (uint64_t)in * 1009 + out;
    float *x = random_buf(key, nx), *w = random_buf(key + 1, nw), *r = random_buf(key + 2, ny);
    float *r0 = xmalloc(ny * sizeof(float)), *ref = xmalloc(ny * sizeof(float)), *y = xmalloc(ny * sizeof(float));
    memcpy(r0, r, ny * sizeof(float));

    /* the pair the op replaces */
    be->matmul_forward(ref, x, w, N, in, out);
    be->add_inplace(ref, r, ny);

    for (size_t i = 0; i < ny; i++) y[i] = NAN;
    be->matmul_forward_add(y, x, w, r, N, in, out);
    check(!memcmp(y, ref, ny * sizeof(float)),
          "matmul_forward_add N=%d in=%d out=%d [r != y]: over NaN = matmul_forward + add_inplace, bitwise", N, in,
          out);
    check(!memcmp(r, r0, ny * sizeof(float)), "matmul_forward_add N=%d in=%d out=%d [r != y]: r unchanged", N, in,
          out);

    be->matmul_forward_add(r, x, w, r, N, in, out); /* r = y: an accumulate into r */
    check(!memcmp(r, ref, ny * sizeof(float)),
          "matmul_forward_add N=%d in=%d out=%d [r = y]: = matmul_forward + add_inplace, bitwise", N, in, out);

    free(x), free(w), free(r), free(r0), free(ref), free(y);
}

int main(void)
{
    const backend *be = backend_cpu();
    static const int shapes[][3] = {{7, 13, 5}, {64, 48, 96}, {33, 100, 1}, {130, 257, 67}, {5, 0, 3}, {1, 9, 4}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        test_shape(be, shapes[i][0], shapes[i][1], shapes[i][2]);
    printf("# %d failure(s)\n", failures);
    return failures != 0;
}
