/* ceilings.c: see ceilings.h. */
#include "ceilings.h"

#include <stdlib.h>

#include "rng.h"
#include "util.h"

double bench_gemm_rate(const backend *be)
{
    int n = 8192;
    float *a = be->alloc((size_t)n * n * sizeof(float)), *b = be->alloc((size_t)n * n * sizeof(float));
    float *c = be->alloc((size_t)n * n * sizeof(float));
    float *h = xmalloc((size_t)n * n * sizeof(float));
    for (size_t i = 0; i < (size_t)n * n; i++) h[i] = (float)(rng_uniform(7, i) - 0.5);
    be->from_host(a, h, (size_t)n * n * sizeof(float));
    be->from_host(b, h, (size_t)n * n * sizeof(float));
    free(h);
    be->matmul_forward(c, a, b, n, n, n);
    be->sync();
    int reps = 10;
    double t0 = wall_time();
    for (int i = 0; i < reps; i++) be->matmul_forward(c, a, b, n, n, n);
    be->sync();
    double dt = (wall_time() - t0) / reps;
    be->free(a);
    be->free(b);
    be->free(c);
    return 2.0 * n * (double)n * n / dt;
}

double bench_copy_rate(const backend *be)
{
    size_t bytes = (size_t)1 << 30;
    void *a = be->alloc(bytes), *b = be->alloc(bytes);
    be->copy(b, a, bytes);
    be->sync();
    int reps = 10;
    double t0 = wall_time();
    for (int i = 0; i < reps; i++) be->copy(b, a, bytes);
    be->sync();
    double dt = (wall_time() - t0) / reps;
    be->free(a);
    be->free(b);
    return 2.0 * bytes / dt;
}
