/* gpu_test.c: see gpu_test.h. */
#include "gpu_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static int failures;

static double uniform(gt_ctx *g)
{
    uint64_t x = g->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    g->rng = x;
    return (double)((x * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

void gt_init(gt_ctx *g, uint64_t seed)
{
    g->rng = seed ? seed : 88172645463325252ULL;
    g->cpu = backend_cpu();
    if (cuda_device_count() == 0) {
        printf("skip: no CUDA GPU visible\n");
        exit(0);
    }
    g->gpu = backend_cuda(0);
}

float *gt_rand(gt_ctx *g, size_t n, float lo, float hi)
{
    float *x = xmalloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * uniform(g));
    return x;
}

int32_t *gt_rand_int(gt_ctx *g, size_t n, int32_t lo, int32_t hi)
{
    int32_t *x = xmalloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = lo + (int32_t)(uniform(g) * (hi - lo));
    return x;
}

float *gt_host_copy(const float *src, size_t n)
{
    float *x = xmalloc(n * sizeof *x);
    memcpy(x, src, n * sizeof *x);
    return x;
}

float *gt_diff(const float *a, const float *b, size_t n)
{
    float *d = xmalloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++) d[i] = a[i] - b[i];
    return d;
}

float *gt_up(gt_ctx *g, const float *host, size_t n)
{
    float *d = g->gpu->alloc(n * sizeof *d);
    g->gpu->from_host(d, host, n * sizeof *d);
    return d;
}

int32_t *gt_up_int(gt_ctx *g, const int32_t *host, size_t n)
{
    int32_t *d = g->gpu->alloc(n * sizeof *d);
    g->gpu->from_host(d, host, n * sizeof *d);
    return d;
}

float *gt_down(gt_ctx *g, const float *dev, size_t n)
{
    float *h = xmalloc(n * sizeof *h);
    g->gpu->to_host(h, dev, n * sizeof *h);
    return h;
}

void gt_poison(gt_ctx *g, float *dev, size_t n)
{
    float *h = xmalloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) h[i] = NAN;
    g->gpu->from_host(dev, h, n * sizeof *h);
    free(h);
}

int gt_report(const char *what, int pass, const char *detail)
{
    printf("%s - %s%s%s\n", pass ? "ok" : "not ok", what, detail ? ": " : "", detail ? detail : "");
    fflush(stdout);
    if (!pass) failures++;
    return pass;
}

int gt_compare(const char *what, const float *a, const float *b, size_t n, double tol)
{
    double num = 0, den = 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) bad++;
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    double rel = sqrt(num) / (sqrt(den) > 1e-30 ? sqrt(den) : 1e-30);
    char detail[160];
    snprintf(detail, sizeof detail, "rel err %.3g (tol %.1g, n=%zu%s)", rel, tol, n, bad ? ", NON-FINITE values" : "");
    return gt_report(what, !bad && rel <= tol, detail);
}

int gt_same_bits(const char *what, const void *a, const void *b, size_t bytes)
{
    return gt_report(what, memcmp(a, b, bytes) == 0, "bitwise");
}

int gt_failures(void) { return failures; }
