/* gpu_test.h: the harness the GPU op tests share (tests/gpu/test_gpu_*.c).
 *
 * Each test runs an op on the CUDA backend and on the CPU backend (the oracle) with the
 * same fresh random inputs and compares: relative error ||gpu - cpu|| / ||cpu|| over the
 * whole output, NaN never passes. Outputs are poisoned (NaN) on the GPU before forward
 * ops so that an element the kernel forgets to write fails the check. Results print one
 * line each ("ok - ..." / "not ok - ..."), counted by tests/gpu/run_gpu_tests.sh.
 */
#ifndef DELTAMLA_GPU_TEST_H
#define DELTAMLA_GPU_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"

typedef struct gt_ctx {
    const backend *cpu, *gpu;
    uint64_t rng;
} gt_ctx;

/* Both backends; exits 0 with "skip: ..." when no GPU is visible. */
void gt_init(gt_ctx *g, uint64_t seed);

/* host buffers (malloc'd; free with free()) */
float *gt_rand(gt_ctx *g, size_t n, float lo, float hi);
int32_t *gt_rand_int(gt_ctx *g, size_t n, int32_t lo, int32_t hi_exclusive);
float *gt_host_copy(const float *src, size_t n);
float *gt_diff(const float *a, const float *b, size_t n); /* a - b */

/* device buffers (free with g->gpu->free) */
float *gt_up(gt_ctx *g, const float *host, size_t n);
int32_t *gt_up_int(gt_ctx *g, const int32_t *host, size_t n);
float *gt_down(gt_ctx *g, const float *dev, size_t n); /* malloc'd host copy */
void gt_poison(gt_ctx *g, float *dev, size_t n);       /* fill with NaN */

/* rel = ||gpu - cpu|| / max(||cpu||, 1e-30); passes when rel <= tol and no NaN/Inf.
 * Prints one line; returns 1 on pass. */
int gt_compare(const char *what, const float *gpu_host, const float *cpu_host, size_t n, double tol);
/* bitwise equality of two host buffers (determinism checks) */
int gt_same_bits(const char *what, const void *a, const void *b, size_t bytes);
int gt_report(const char *what, int pass, const char *detail);
int gt_failures(void);

/* Tolerances: ops whose arithmetic is fp32 end to end, and ops that go through bf16
 * tensor-core GEMMs (inputs rounded to bf16, fp32 accumulation). */
#define GT_TOL_FP32 1e-5
#define GT_TOL_BF16 1e-2

#endif
