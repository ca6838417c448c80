/* dispatch.cu: the row movements of expert-parallel MoE on the CUDA backend: the gather
 * that builds a send buffer grouped by destination rank, and the per-token combine of
 * the rows that come back and its adjoint, with exactly the contracts of
 * src/cpu/cpu_dispatch.c (the oracle).
 *
 * All three are memory-bound row copies with a little arithmetic, so they share one
 * launch shape: a block of DISPATCH_THREADS threads is ty rows of tx threads, tx the
 * smallest power of two from 32 to 256 that covers a row's units (float4 when width is a
 * multiple of 4 and the row pointers are 16-byte aligned, single floats otherwise). A
 * row is whole warps, so its reductions need no masks; a thread strides over its row's
 * units by tx. No atomics anywhere: the gather and the combine forward write each
 * output row from one row of threads (the combine sums its k terms in slot order j =
 * 0..k-1 in fp32, then adds the sum to y); the combine backward runs one row of threads
 * per assignment (i, j), which owns dvals row pos[i*k+j] (pos is injective) and produces
 * dgate[i*k+j] by a fixed reduction: each thread's units in order, a warp butterfly,
 * then the row's warps in order. tx depends on width alone and the float4 choice on
 * width and alignment, so the same call on the same buffers gives the same bits.
 */
#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define DISPATCH_THREADS 256
#define DISPATCH_WARPS (DISPATCH_THREADS / 32)
#define FULL_MASK 0xffffffffu

static __device__ __forceinline__ float warp_sum_f(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* dst row r = src row rows[r] */
static __global__ void __launch_bounds__(DISPATCH_THREADS)
rows_gather_kernel(float *dst, const float *src, const int32_t *rows, int n, int width, int vec)
{
    const size_t r = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (r >= (size_t)n) return;
    const size_t s = (size_t)__ldg(rows + r);
    if (vec) {
        const int w4 = width / 4;
        const float4 *in = (const float4 *)(src + s * width);
        float4 *out = (float4 *)(dst + r * width);
        for (int u = threadIdx.x; u < w4; u += blockDim.x) out[u] = __ldg(in + u);
    } else {
        const float *in = src + s * width;
        float *out = dst + r * width;
        for (int u = threadIdx.x; u < width; u += blockDim.x) out[u] = __ldg(in + u);
    }
}

/* y row i += sum_j g_ij vals row pos[i*k+j], the sum formed in slot order first */
static __global__ void __launch_bounds__(DISPATCH_THREADS)
combine_forward_kernel(float *y, const float *vals, const int32_t *pos, const float *gate, int N, int k,
                       int width, int vec)
{
    const size_t i = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (i >= (size_t)N) return;
    const int32_t *pi = pos + i * k;
    const float *gi = gate ? gate + i * k : NULL;
    if (vec) {
        const int w4 = width / 4;
        float4 *yi = (float4 *)(y + i * width);
        for (int u = threadIdx.x; u < w4; u += blockDim.x) {
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int j = 0; j < k; j++) {
                const float g = gi ? __ldg(gi + j) : 1.f;
                const float4 v = __ldg((const float4 *)(vals + (size_t)__ldg(pi + j) * width) + u);
                acc.x += g * v.x;
                acc.y += g * v.y;
                acc.z += g * v.z;
                acc.w += g * v.w;
            }
            float4 o = yi[u];
            o.x += acc.x;
            o.y += acc.y;
            o.z += acc.z;
            o.w += acc.w;
            yi[u] = o;
        }
    } else {
        float *yi = y + i * width;
        for (int u = threadIdx.x; u < width; u += blockDim.x) {
            float acc = 0.f;
            for (int j = 0; j < k; j++) {
                const float g = gi ? __ldg(gi + j) : 1.f;
                acc += g * __ldg(vals + (size_t)__ldg(pi + j) * width + u);
            }
            yi[u] += acc;
        }
    }
}

/* one row of threads per assignment a = i*k + j: dvals row pos[a] = g_a dy row i;
 * dgate[a] += dy row i . vals row pos[a] when dgate is set */
static __global__ void __launch_bounds__(DISPATCH_THREADS)
combine_backward_kernel(float *dvals, float *dgate, const float *dy, const float *vals, const int32_t *pos,
                        const float *gate, size_t nk, int k, int width, int vec)
{
    __shared__ float wsum[DISPATCH_WARPS];
    const size_t a = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
    const int active = a < nk; /* no early return: the rows of a block meet at a barrier */
    float part = 0.f;
    if (active) {
        const size_t i = a / k, p = (size_t)__ldg(pos + a);
        const float g = gate ? __ldg(gate + a) : 1.f;
        if (vec) {
            const int w4 = width / 4;
            const float4 *d4 = (const float4 *)(dy + i * width);
            const float4 *v4 = (const float4 *)(vals + p * width);
            float4 *o4 = (float4 *)(dvals + p * width);
            for (int u = threadIdx.x; u < w4; u += blockDim.x) {
                const float4 d = __ldg(d4 + u);
                if (dgate) {
                    const float4 v = __ldg(v4 + u);
                    part += d.x * v.x;
                    part += d.y * v.y;
                    part += d.z * v.z;
                    part += d.w * v.w;
                }
                o4[u] = make_float4(g * d.x, g * d.y, g * d.z, g * d.w);
            }
        } else {
            const float *d1 = dy + i * width, *v1 = vals + p * width;
            float *o1 = dvals + p * width;
            for (int u = threadIdx.x; u < width; u += blockDim.x) {
                const float d = __ldg(d1 + u);
                if (dgate) part += d * __ldg(v1 + u);
                o1[u] = g * d;
            }
        }
    }
    if (!dgate) return; /* the same for every thread of the grid */
    part = warp_sum_f(part);
    const int lane = threadIdx.x & 31, row_warps = blockDim.x >> 5;
    if (row_warps == 1) {
        if (active && lane == 0) dgate[a] += part;
        return;
    }
    if (lane == 0) wsum[threadIdx.y * row_warps + (threadIdx.x >> 5)] = part;
    __syncthreads();
    if (active && threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < row_warps; w++) s += wsum[threadIdx.y * row_warps + w];
        dgate[a] += s;
    }
}

/* block shape (tx, ty) for rows of `units` units; grid of ceil(rows / ty) blocks */
static void row_launch_shape(size_t rows, int units, dim3 *grid, dim3 *block)
{
    int tx = 32;
    while (tx < units && tx < DISPATCH_THREADS) tx *= 2;
    const int ty = DISPATCH_THREADS / tx;
    const size_t nblk = (rows + (size_t)ty - 1) / (size_t)ty;
    if (nblk > 0x7fffffffu) die("dispatch: %zu rows are too many for one launch", rows);
    *block = dim3((unsigned)tx, (unsigned)ty);
    *grid = dim3((unsigned)nblk);
}

extern "C" void cuda_rows_gather(float *dst, const float *src, const int32_t *rows, int n, int width)
{
    if (n < 0 || width < 0) die("cuda_rows_gather: bad shape n=%d width=%d", n, width);
    if (n == 0 || width == 0) return;
    const int vec = width % 4 == 0 && cuda_aligned16(dst) && cuda_aligned16(src);
    dim3 grid, block;
    row_launch_shape((size_t)n, vec ? width / 4 : width, &grid, &block);
    rows_gather_kernel<<<grid, block, 0, cuda_stream()>>>(dst, src, rows, n, width, vec);
    LAUNCH_CHECK();
}

extern "C" void cuda_moe_combine_forward(float *y, const float *vals, const int32_t *pos, const float *gate,
                                         int N, int k, int width)
{
    if (N < 0 || k < 0 || width < 0) die("cuda_moe_combine_forward: bad shape N=%d k=%d width=%d", N, k, width);
    if (N == 0 || k == 0 || width == 0) return;
    const int vec = width % 4 == 0 && cuda_aligned16(y) && cuda_aligned16(vals);
    dim3 grid, block;
    row_launch_shape((size_t)N, vec ? width / 4 : width, &grid, &block);
    combine_forward_kernel<<<grid, block, 0, cuda_stream()>>>(y, vals, pos, gate, N, k, width, vec);
    LAUNCH_CHECK();
}

extern "C" void cuda_moe_combine_backward(float *dvals, float *dgate, const float *dy, const float *vals,
                                          const int32_t *pos, const float *gate, int N, int k, int width)
{
    if (N < 0 || k < 0 || width < 0) die("cuda_moe_combine_backward: bad shape N=%d k=%d width=%d", N, k, width);
    if (N == 0 || k == 0 || width == 0) return;
    const int vec = width % 4 == 0 && cuda_aligned16(dvals) && cuda_aligned16(dy) && (!dgate || cuda_aligned16(vals));
    const size_t nk = (size_t)N * k;
    dim3 grid, block;
    row_launch_shape(nk, vec ? width / 4 : width, &grid, &block);
    combine_backward_kernel<<<grid, block, 0, cuda_stream()>>>(dvals, dgate, dy, vals, pos, gate, nk, k, width,
                                                               vec);
    LAUNCH_CHECK();
}
