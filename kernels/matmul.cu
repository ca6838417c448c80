/* matmul.cu: the dense Linear layer on the GPU, y = x W^T, and its two gradients,
 * as three cuBLAS GEMMs on bf16 tensor cores.
 *
 * Storage stays fp32; cublasGemmEx with CUBLAS_COMPUTE_32F_FAST_16BF rounds the fp32
 * operands to bf16 inside the GEMM and accumulates in fp32, which lands within about
 * 1e-2 (relative, whole tensor) of the fp32 CPU oracle at tensor-core speed.
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
#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

/* C [m, n] = alpha op(A) op(B) + beta C, all column-major fp32 buffers, bf16 tensor cores */
static void gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                      const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, m, n, k, &alpha, a, CUDA_R_32F, lda, b, CUDA_R_32F,
                              ldb, &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_FAST_16BF,
                              CUBLAS_GEMM_DEFAULT));
}

/* y [N, out] = x [N, in] w [out, in]^T; overwrites y. Device pointers. */
extern "C" void cuda_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
    if (N <= 0 || out <= 0) return;
    if (in <= 0) { /* an empty sum: y is all zeros */
        CUDA_CHECK(cudaMemsetAsync(y, 0, (size_t)N * out * sizeof *y, cuda_stream()));
        return;
    }
    gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, w, in, x, in, 0.0f, y, out);
}

/* dx [N, in] += dy [N, out] w [out, in] (skipped when dx is NULL);
 * dw [out, in] += dy^T x (skipped when dw is NULL). Device pointers. */
extern "C" void cuda_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                     int N, int in, int out)
{
    if (N <= 0 || in <= 0 || out <= 0) return; /* every sum is empty: nothing to add */
    if (dx) gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, 1.0f, dx, in);
    if (dw) gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in);
}
