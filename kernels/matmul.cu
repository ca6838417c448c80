/* matmul.cu: the dense Linear layer on the GPU, y = x W^T, and its two gradients,
 * as three cuBLAS GEMMs on bf16 tensor cores.
 *
 * Storage stays fp32. Each operand is first rounded to bf16 by one vectorised pass into
 * a buffer of this file, then cublasGemmEx multiplies bf16 x bf16 with fp32 accumulation
 * and fp32 output (CUBLAS_COMPUTE_32F). That is the rounding CUBLAS_COMPUTE_32F_FAST_16BF
 * does on fp32 operands, within about 1e-2 (relative, whole tensor) of the fp32 CPU
 * oracle, but cuBLAS then runs its bf16 kernels at full rate: for the model's shapes
 * (N = 16384 rows, widths 256 to 4096) the fp32-operand path ran at about 150 TFLOP/s.
 *
 * Skinny products (in or out at most MATMUL_SKINNY_WIDTH) run on the fp32 operands in TF32
 * (see skinny_product). Small products (fewer than MATMUL_BF16_MIN_MACS multiply-adds, as
 * in the test configs) keep the first form: cublasGemmEx on the fp32 operands with CUBLAS_COMPUTE_32F_FAST_16BF,
 * where cuBLAS picks its own kernel (the rounding passes would cost more than they save).
 *
 * cuBLAS is column-major. A row-major [r, c] buffer read column-major is its transpose
 * [c, r] with leading dimension c, so every product below is written for the transposes
 * (y^T = W x^T and so on) and needs no copies:
 *   forward  y^T  [out, N]  = W [out, in] x^T [in, N]   : op(W^T buffer) = T, x^T = N
 *   dx       dx^T [in, N]  += W^T [in, out] dy^T [out, N]: both buffers as they lie
 *   dw       dw^T [in, out] += x^T [in, N] dy [N, out]   : x^T as it lies, dy^T buffer = T
 * The gradients use beta = 1, so cuBLAS adds into what the caller holds (the backward
 * contract accumulates). With beta = 0 the forward never reads y, so an uninitialised
 * (even NaN) output is fine. One handle on one stream with its default workspace gives
 * the same algorithm and the same bits run after run.
 */
#include <cuda_bf16.h>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

/* The bf16 copies of one call's operands; grows to the largest call and stays. */
static void *bf_buf;
static size_t bf_bytes;

static __nv_bfloat16 *bf_reserve(size_t elems)
{
    return (__nv_bfloat16 *)cuda_grow(&bf_buf, &bf_bytes, elems * sizeof(__nv_bfloat16));
}

/* dst[i] = bf16(src[i]), round to nearest even; four at a time where aligned */
static __global__ void to_bf16_kernel(__nv_bfloat16 *__restrict__ dst, const float *__restrict__ src, size_t n,
                                      int vec)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        size_t n4 = n / 4;
        for (size_t j = i; j < n4; j += stride) {
            float4 v = ((const float4 *)src)[j];
            __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
            uint2 packed;
            packed.x = *(uint32_t *)&a;
            packed.y = *(uint32_t *)&b;
            ((uint2 *)dst)[j] = packed;
        }
        for (size_t j = n4 * 4 + i; j < n; j += stride) dst[j] = __float2bfloat16_rn(src[j]);
    } else {
        for (size_t j = i; j < n; j += stride) dst[j] = __float2bfloat16_rn(src[j]);
    }
}

extern "C" void cuda_to_bf16(__nv_bfloat16 *dst, const float *src, size_t n)
{
    if (!n) return;
    int vec = cuda_aligned16(src) && ((uintptr_t)dst % 8 == 0);
    size_t work = vec ? (n + 3) / 4 : n;
    int blocks = (int)((work + 255) / 256);
    int cap = 8 * cuda_num_sms();
    if (blocks > cap) blocks = cap;
    to_bf16_kernel<<<blocks, 256, 0, cuda_stream()>>>(dst, src, n, vec);
    LAUNCH_CHECK();
}

extern "C" void cuda_gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const __nv_bfloat16 *a,
                      int lda, const __nv_bfloat16 *b, int ldb, float beta, float *c, int ldc)
{
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, m, n, k, &alpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb,
                              &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#define MATMUL_BF16_MIN_MACS ((size_t)1 << 27)

/* products with a width (in or out) this narrow are skinny: see skinny_product */
#define MATMUL_SKINNY_WIDTH 128

/* C [m, n] = op(A) op(B) + beta C on fp32 column-major buffers; compute: cuBLAS's bf16
 * fast mode (CUBLAS_COMPUTE_32F_FAST_16BF) or TF32 (CUBLAS_COMPUTE_32F_FAST_TF32) */
static void gemm_f32(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *a, int lda,
                     const float *b, int ldb, float beta, float *c, int ldc, cublasComputeType_t compute)
{
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, m, n, k, &alpha, a, CUDA_R_32F, lda, b, CUDA_R_32F, ldb, &beta,
                              c, CUDA_R_32F, ldc, compute, CUBLAS_GEMM_DEFAULT));
}

extern "C" int cuda_matmul_small(size_t macs) { return macs < MATMUL_BF16_MIN_MACS; }

static int small_product(int N, int in, int out) { return cuda_matmul_small((size_t)N * in * out); }

/* A skinny product (the GDN gate projections' 12 outputs, the 64 and 128 of the MLA's
 * rope key and router) does a few multiply-adds per element of x: rounding x to bf16
 * first costs a pass over x that the product itself never pays back (the 1024 -> 12 GEMMs
 * ran at 5 TFLOP/s that way). It runs on the fp32 buffers in TF32 instead: one read of
 * each operand, and TF32 rounds less than bf16. */
static int skinny_product(int in, int out) { return in <= MATMUL_SKINNY_WIDTH || out <= MATMUL_SKINNY_WIDTH; }

/* y [N, out] = x [N, in] w [out, in]^T; overwrites y. Device pointers. */
extern "C" void cuda_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
    if (N <= 0 || out <= 0) return;
    if (in <= 0) { /* an empty sum: y is all zeros */
        CUDA_CHECK(cudaMemsetAsync(y, 0, (size_t)N * out * sizeof *y, cuda_stream()));
        return;
    }
    if (small_product(N, in, out)) {
        gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, w, in, x, in, 0.0f, y, out, CUBLAS_COMPUTE_32F_FAST_16BF);
        return;
    }
    if (skinny_product(in, out)) {
        gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, w, in, x, in, 0.0f, y, out, CUBLAS_COMPUTE_32F_FAST_TF32);
        return;
    }
    size_t nx = cuda_round8((size_t)N * in), nw = cuda_round8((size_t)out * in);
    __nv_bfloat16 *xb = bf_reserve(nx + nw), *wb = xb + nx;
    cuda_to_bf16(xb, x, (size_t)N * in);
    cuda_to_bf16(wb, w, (size_t)out * in);
    cuda_gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, wb, in, xb, in, 0.0f, y, out);
}

/* dx [N, in] = dx_beta dx + dy [N, out] w [out, in] (skipped when dx is NULL);
 * dw [out, in] += dy^T x (skipped when dw is NULL). Device pointers. */
static void matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in,
                            int out, float dx_beta)
{
    if (dx && dx_beta == 0.0f && N > 0 && in > 0 && out <= 0) /* dx = an empty sum */
        CUDA_CHECK(cudaMemsetAsync(dx, 0, (size_t)N * in * sizeof *dx, cuda_stream()));
    if (N <= 0 || in <= 0 || out <= 0) return; /* every sum is empty: nothing to add */
    if (!dx && !dw) return;
    if (small_product(N, in, out)) {
        const cublasComputeType_t bf = CUBLAS_COMPUTE_32F_FAST_16BF;
        if (dx) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, dx_beta, dx, in, bf);
        if (dw) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in, bf);
        return;
    }
    if (skinny_product(in, out)) {
        const cublasComputeType_t tf32 = CUBLAS_COMPUTE_32F_FAST_TF32;
        if (dx) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, dx_beta, dx, in, tf32);
        if (dw) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in, tf32);
        return;
    }
    size_t ny = cuda_round8((size_t)N * out), nx = cuda_round8((size_t)N * in), nw = cuda_round8((size_t)out * in);
    __nv_bfloat16 *dyb = bf_reserve(ny + (dw ? nx : 0) + (dx ? nw : 0)), *rest = dyb + ny;
    cuda_to_bf16(dyb, dy, (size_t)N * out);
    if (dx) {
        cuda_to_bf16(rest, w, (size_t)out * in);
        cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, rest, in, dyb, out, dx_beta, dx, in);
        rest += nw;
    }
    if (dw) {
        cuda_to_bf16(rest, x, (size_t)N * in);
        cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, rest, in, dyb, out, 1.0f, dw, in);
    }
}

/* dx [N, in] += dy [N, out] w [out, in] (skipped when dx is NULL);
 * dw [out, in] += dy^T x (skipped when dw is NULL). Device pointers. */
extern "C" void cuda_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                     int N, int in, int out)
{
    matmul_backward(dx, dw, dy, x, w, N, in, out, 1.0f);
}

/* as cuda_matmul_backward, but dx = dy w (beta 0: dx is not read, its old contents,
 * even NaN, do not matter) */
extern "C" void cuda_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                         int N, int in, int out)
{
    matmul_backward(dx, dw, dy, x, w, N, in, out, 0.0f);
}
