/* moe_route.cu: the router of the mixture-of-experts ops of the CUDA backend (MODEL.md
 * section 5): sigmoid scores with bias-adjusted top-k, gates and z-loss, forward and
 * backward, with exactly the contracts of src/cpu/cpu_moe.c (the oracle); and the
 * routing-load sum and the router-bias update, on the device. The routed experts are in
 * moe_experts.cu.
 *
 * Router. One warp per token; lane l holds experts l, l+32, ... (E <= 512) in registers.
 * The k selections are k rounds of a warp arg-max over the unchosen experts, ordered by
 * score then lower index, so ties go to the lower expert as on the CPU. Scores, gates
 * and the log-sum-exp are computed in double like the oracle, so idx matches it exactly
 * unless two scores agree to ~1e-16. The z-loss is a per-block partial (fixed order) and
 * one final fixed-order sum; counts are an integer histogram (integer atomics commute).
 */
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define GATE_EPS 1e-9
#define FULL_MASK 0xffffffffu

/* ---- router ---- */
#define ROUTE_WARPS 8
#define ROUTE_SLOTS 16 /* experts per lane */
#define ROUTE_MAX_E (32 * ROUTE_SLOTS)
#define REDUCE_THREADS 256
#define COUNT_THREADS 256

static __device__ __forceinline__ double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

static __device__ __forceinline__ float warp_max_f(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

static __device__ __forceinline__ double warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* log-sum-exp of one warp's row: lane holds zv[t] = z[lane + 32 t] for those < E; the
 * exponentials are summed in double as on the CPU */
static __device__ __forceinline__ double warp_row_lse(const float zv[ROUTE_SLOTS], int E, int lane)
{
    float mx = -INFINITY;
#pragma unroll
    for (int t = 0; t < ROUTE_SLOTS; t++)
        if (lane + 32 * t < E) mx = fmaxf(mx, zv[t]);
    mx = warp_max_f(mx);
    double s = 0;
#pragma unroll
    for (int t = 0; t < ROUTE_SLOTS; t++)
        if (lane + 32 * t < E) s += exp((double)zv[t] - (double)mx);
    s = warp_sum_d(s);
    return (double)mx + log(s);
}

/* idx [N,k], gate [N,k], zpart[block] = sum of lse^2 over the block's tokens */
static __global__ void __launch_bounds__(ROUTE_WARPS * 32)
route_forward_kernel(int32_t *idx, float *gate, double *zpart, const float *z, const float *bias,
                     int N, int E, int k)
{
    __shared__ double wsq[ROUTE_WARPS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ROUTE_WARPS + warp;
    double lsq = 0;
    if (i < N) {
        const float *zi = z + (size_t)i * E;
        int32_t *ii = idx + (size_t)i * k;
        float zv[ROUTE_SLOTS];
        double sc[ROUTE_SLOTS];
#pragma unroll
        for (int t = 0; t < ROUTE_SLOTS; t++) {
            const int e = lane + 32 * t;
            zv[t] = 0.f;
            sc[t] = 0.0;
            if (e < E) {
                zv[t] = zi[e];
                sc[t] = sigmoid_d((double)zv[t]) + (double)bias[e];
            }
        }
        const double lse = warp_row_lse(zv, E, lane);
        lsq = lse * lse;

        unsigned taken = 0; /* bit t: expert lane + 32 t already chosen */
        double asum = 0;    /* selected affinities, summed in selection order */
        for (int j = 0; j < k; j++) {
            double bs = 0;
            int be = -1;
#pragma unroll
            for (int t = 0; t < ROUTE_SLOTS; t++) {
                const int e = lane + 32 * t;
                if (e < E && !((taken >> t) & 1u) && (be < 0 || sc[t] > bs)) {
                    bs = sc[t];
                    be = e;
                }
            }
            /* butterfly arg-max: a total order (score, then lower index), so every lane
             * ends with the same winner */
            for (int o = 16; o > 0; o >>= 1) {
                const double os = __shfl_xor_sync(FULL_MASK, bs, o);
                const int oe = __shfl_xor_sync(FULL_MASK, be, o);
                if (oe >= 0 && (be < 0 || os > bs || (os == bs && oe < be))) {
                    bs = os;
                    be = oe;
                }
            }
            if ((be & 31) == lane) taken |= 1u << (be >> 5);
            if (lane == 0) ii[j] = be;
            asum += sigmoid_d((double)zi[be]);
        }
        __syncwarp();
        for (int j = lane; j < k; j += 32)
            gate[(size_t)i * k + j] = (float)(sigmoid_d((double)zi[ii[j]]) / (asum + GATE_EPS));
    }
    if (lane == 0) wsq[warp] = lsq;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0;
        for (int w = 0; w < ROUTE_WARPS; w++) s += wsq[w];
        zpart[blockIdx.x] = s;
    }
}

/* zloss_out[0] = zcoef * (sum of the partials) / N, summed in a fixed order */
static __global__ void __launch_bounds__(REDUCE_THREADS)
zloss_final_kernel(float *zloss_out, const double *zpart, int nparts, int N, float zcoef)
{
    __shared__ double s[REDUCE_THREADS];
    double v = 0;
    for (int b = threadIdx.x; b < nparts; b += REDUCE_THREADS) v += zpart[b];
    s[threadIdx.x] = v;
    __syncthreads();
    for (int w = REDUCE_THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) zloss_out[0] = (float)((double)zcoef * s[0] / N);
}

/* counts[e] += assignments to e (counts zeroed before); integer sums are order-free */
static __global__ void __launch_bounds__(COUNT_THREADS)
route_count_kernel(int32_t *counts, const int32_t *idx, size_t nk, int E)
{
    extern __shared__ int hist[];
    for (int e = threadIdx.x; e < E; e += COUNT_THREADS) hist[e] = 0;
    __syncthreads();
    for (size_t a = (size_t)blockIdx.x * COUNT_THREADS + threadIdx.x; a < nk; a += (size_t)gridDim.x * COUNT_THREADS)
        atomicAdd(&hist[idx[a]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += COUNT_THREADS)
        if (hist[e]) atomicAdd(&counts[e], hist[e]);
}

/* dz += the z-loss gradient, then the gate gradient of each selected expert in slot
 * order: the same two float additions per element as the CPU */
static __global__ void __launch_bounds__(ROUTE_WARPS * 32)
route_backward_kernel(float *dz, const float *dgate, float dzloss, const float *z, const int32_t *idx,
                      int N, int E, int k, float zcoef)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ROUTE_WARPS + warp;
    if (i >= N) return;
    const float *zi = z + (size_t)i * E;
    float *dzi = dz + (size_t)i * E;
    const int32_t *ii = idx + (size_t)i * k;
    const float *gi = dgate + (size_t)i * k;
    float zv[ROUTE_SLOTS], v[ROUTE_SLOTS];
#pragma unroll
    for (int t = 0; t < ROUTE_SLOTS; t++) {
        const int e = lane + 32 * t;
        zv[t] = e < E ? zi[e] : 0.f;
    }
    const double lse = warp_row_lse(zv, E, lane);
    const double zc = (double)dzloss * (double)zcoef * 2.0 * lse / N;
#pragma unroll
    for (int t = 0; t < ROUTE_SLOTS; t++) {
        const int e = lane + 32 * t;
        v[t] = 0.f;
        if (e < E) v[t] = dzi[e] + (float)(zc * exp((double)zv[t] - lse));
    }
    double sum = 0, wsum = 0;
    for (int j = 0; j < k; j++) {
        const double a = sigmoid_d((double)zi[ii[j]]);
        sum += a;
        wsum += (double)gi[j] * a;
    }
    const double inv = 1.0 / (sum + GATE_EPS);
    for (int j = 0; j < k; j++) {
        const int e = ii[j];
        const int mine = (e & 31) == lane, slot = e >> 5;
        float add = 0.f;
        if (mine) {
            const double a = sigmoid_d((double)zi[e]);
            const double da = (double)gi[j] * inv - wsum * inv * inv;
            add = (float)(da * a * (1.0 - a));
        }
#pragma unroll
        for (int t = 0; t < ROUTE_SLOTS; t++)
            if (mine && t == slot) v[t] += add;
    }
#pragma unroll
    for (int t = 0; t < ROUTE_SLOTS; t++) {
        const int e = lane + 32 * t;
        if (e < E) dzi[e] = v[t];
    }
}

extern "C" void cuda_moe_route_forward(int32_t *idx, float *gate, int32_t *counts, float *zloss_out,
                                       const float *z, const float *bias, int N, int E, int k, float zcoef)
{
    if (N < 1 || E < 1 || k < 1 || k > E)
        die("cuda_moe_route_forward: bad shape N=%d E=%d k=%d", N, E, k);
    if (E > ROUTE_MAX_E) die("cuda_moe_route_forward: E=%d experts, at most %d supported", E, ROUTE_MAX_E);
    cudaStream_t st = cuda_stream();
    const int nblk = (N + ROUTE_WARPS - 1) / ROUTE_WARPS;
    double *zpart = (double *)cuda_scratch((size_t)nblk * sizeof(double));
    route_forward_kernel<<<nblk, ROUTE_WARPS * 32, 0, st>>>(idx, gate, zpart, z, bias, N, E, k);
    LAUNCH_CHECK();
    zloss_final_kernel<<<1, REDUCE_THREADS, 0, st>>>(zloss_out, zpart, nblk, N, zcoef);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemsetAsync(counts, 0, (size_t)E * sizeof(int32_t), st));
    const size_t nk = (size_t)N * k;
    unsigned cblk = ceil_div_u(nk, COUNT_THREADS);
    if (cblk > 1024) cblk = 1024;
    route_count_kernel<<<cblk, COUNT_THREADS, E * sizeof(int), st>>>(counts, idx, nk, E);
    LAUNCH_CHECK();
}

extern "C" void cuda_moe_route_backward(float *dz, const float *dgate, float dzloss, const float *z,
                                        const int32_t *idx, int N, int E, int k, float zcoef)
{
    if (N < 1 || E < 1 || k < 1 || k > E)
        die("cuda_moe_route_backward: bad shape N=%d E=%d k=%d", N, E, k);
    if (E > ROUTE_MAX_E) die("cuda_moe_route_backward: E=%d experts, at most %d supported", E, ROUTE_MAX_E);
    const int nblk = (N + ROUTE_WARPS - 1) / ROUTE_WARPS;
    route_backward_kernel<<<nblk, ROUTE_WARPS * 32, 0, cuda_stream()>>>(dz, dgate, dzloss, z, idx, N, E, k, zcoef);
    LAUNCH_CHECK();
}

/* ---- routing loads and the router-bias update (on the device: no host round trip) ---- */

static __global__ void add_i32_kernel(int32_t *y, const int32_t *x, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

extern "C" void cuda_add_i32(int32_t *y, const int32_t *x, size_t n)
{
    if (!n) return;
    int blocks = (int)((n + 255) / 256);
    if (blocks > 1024) blocks = 1024;
    add_i32_kernel<<<blocks, 256, 0, cuda_stream()>>>(y, x, n);
    LAUNCH_CHECK();
}

static __global__ void bias_update_kernel(float *bias, const int32_t *loads, size_t n, int E, long long expected,
                                          float rate)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const long long lhs = (long long)loads[i] * E;
        const float sign = lhs > expected ? 1.0f : (lhs < expected ? -1.0f : 0.0f);
        bias[i] -= rate * sign;
    }
}

extern "C" void cuda_router_bias_update(float *bias, const int32_t *loads, int rows, int E, int64_t tokens, int k,
                                        float rate)
{
    size_t n = (size_t)rows * E;
    if (!n) return;
    int blocks = (int)((n + 255) / 256);
    if (blocks > 1024) blocks = 1024;
    bias_update_kernel<<<blocks, 256, 0, cuda_stream()>>>(bias, loads, n, E, (long long)tokens * k, rate);
    LAUNCH_CHECK();
}
