/* matmul_narrow.cu: the forward of the dense Linear layer for very few outputs (out <=
 * NARROW_MAX_OUT), y = x W^T, on CUDA cores in fp32.
 *
 * The Gated DeltaNet's gate projections map d = 1024 to H = 12 outputs. On cuBLAS (TF32
 * on the fp32 operands, matmul.cu's skinny path) the forward took 76 us at N = 16384 for
 * 0.4 GFLOP that the CUDA cores do in a few microseconds: the time is the pass over x
 * (64 MiB). Here W lies in shared memory; each warp takes NARROW_ROWS rows, its lanes
 * striding over the row in float4s, every lane keeping out partial sums per row, which a
 * butterfly of shuffles adds up. x is read once, y written once (plus r read, for the
 * residual form): 57 us on an H100. The sums are fp32 FMAs in a fixed order: the same
 * bits every run, and closer to the fp32 CPU oracle than the TF32 GEMM. matmul.cu sends
 * a forward here when cuda_narrow_ok says its shape and alignment fit. (The model now
 * runs its gate projections through matmul_forward_multi with the other projections of
 * the same input, on that op's shared bf16 copy of x: both gates in one GEMM.)
 *
 * The backward stays on cuBLAS: a kernel of the same kind (each thread four columns of x
 * and dx, W's columns in registers, dW summed per chunk of rows, one pass over x and dx)
 * took 142 us against cuBLAS's 127 us at 170 registers a thread, too few warps to keep
 * enough loads in flight.
 */
#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define NARROW_MAX_OUT 16
#define NARROW_MAX_W 16384   /* floats of W the forward stages in shared memory (64 KiB) */
#define NARROW_ROWS 4        /* rows a warp of the forward takes at once */
#define NARROW_FWD_THREADS 256

/* 1 when y = x W^T with these operands can run here: out <= NARROW_MAX_OUT, rows of a
 * multiple of 4 floats, x and W 16-byte aligned, W small enough for shared memory */
extern "C" int cuda_narrow_ok(int in, int out, const float *x, const float *w)
{
    return out >= 1 && out <= NARROW_MAX_OUT && in >= 4 && in % 4 == 0 && (size_t)out * in <= NARROW_MAX_W &&
           cuda_aligned16(x) && cuda_aligned16(w);
}

static __device__ __forceinline__ float dot4(float4 a, float4 b, float acc)
{
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    return fmaf(a.w, b.w, acc);
}

/* y [N, out] = (r ? r : 0) + x [N, in] w [out, in]^T (see the top); r may be y */
static __global__ void narrow_forward_kernel(float *y, const float *x, const float *w, const float *r, int N, int in,
                                             int out)
{
    extern __shared__ float4 ws[]; /* W as [out][in / 4] */
    const int in4 = in / 4;
    for (int i = threadIdx.x; i < out * in4; i += blockDim.x) ws[i] = ((const float4 *)w)[i];
    __syncthreads();
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int first = (blockIdx.x * warps + (threadIdx.x >> 5)) * NARROW_ROWS;
    const int stride = gridDim.x * warps * NARROW_ROWS;
    for (int r0 = first; r0 < N; r0 += stride) {
        float acc[NARROW_ROWS][NARROW_MAX_OUT];
#pragma unroll
        for (int k = 0; k < NARROW_ROWS; k++)
#pragma unroll
            for (int o = 0; o < NARROW_MAX_OUT; o++) acc[k][o] = 0.0f;
        for (int c = lane; c < in4; c += 32) {
            float4 xv[NARROW_ROWS];
#pragma unroll
            for (int k = 0; k < NARROW_ROWS; k++)
                xv[k] = r0 + k < N ? ((const float4 *)(x + (size_t)(r0 + k) * in))[c] : make_float4(0, 0, 0, 0);
#pragma unroll
            for (int o = 0; o < NARROW_MAX_OUT; o++) {
                if (o >= out) break;
                const float4 wv = ws[o * in4 + c];
#pragma unroll
                for (int k = 0; k < NARROW_ROWS; k++) acc[k][o] = dot4(xv[k], wv, acc[k][o]);
            }
        }
#pragma unroll
        for (int k = 0; k < NARROW_ROWS; k++)
#pragma unroll
            for (int o = 0; o < NARROW_MAX_OUT; o++) {
                if (o >= out) break;
                float v = acc[k][o];
                for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                if (lane == o && r0 + k < N) {
                    const size_t at = (size_t)(r0 + k) * out + o;
                    y[at] = r ? r[at] + v : v;
                }
            }
    }
}

/* y [N, out] = (r ? r : 0) + x [N, in] w [out, in]^T; r may be y. cuda_narrow_ok must hold. */
extern "C" void cuda_narrow_forward(float *y, const float *x, const float *w, const float *r, int N, int in, int out)
{
    if (N <= 0) return;
    const int warps = NARROW_FWD_THREADS / 32, per_block = warps * NARROW_ROWS;
    int blocks = (N + per_block - 1) / per_block;
    if (blocks > 2 * cuda_num_sms()) blocks = 2 * cuda_num_sms();
    const size_t smem = (size_t)out * in * sizeof(float);
    static int smem_set = 0;
    if (!smem_set) { /* above the 48 KiB default */
        CUDA_CHECK(cudaFuncSetAttribute(narrow_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        NARROW_MAX_W * (int)sizeof(float)));
        smem_set = 1;
    }
    narrow_forward_kernel<<<blocks, NARROW_FWD_THREADS, smem, cuda_stream()>>>(y, x, w, r, N, in, out);
    LAUNCH_CHECK();
}
