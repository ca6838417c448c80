/* elementwise.cu: the CUDA twins of src/cpu/cpu_elementwise.c: vector add/scale/sum of
 * squares, the embedding lookup and its gradient, the Gated DeltaNet gates, the per-row
 * L2 normalisation and SwiGLU (both conventions; with bf16 outputs too, for the fused MLP
 * of mlp.cu, which hands SwiGLU's output and gradient to bf16 GEMMs without an fp32 pass).
 *
 * All of these are memory-bound, so each kernel makes one pass over its data. Flat ops
 * use grid-stride loops capped at one full wave of the GPU, move 16 bytes per thread
 * per step (float4) when every pointer is 16-byte aligned, and finish the n % 4 tail
 * (or everything, when a pointer is misaligned) with scalar loads in the same kernel.
 * Row-structured ops (embedding, SwiGLU) go wide only when the row length is a multiple
 * of 4 as well, so that every row starts aligned.
 *
 * Determinism without floating-point atomics:
 *   - sumsq: each block reduces a fixed slice in double through a fixed shuffle tree,
 *     then one block adds the block sums in a fixed order. The grid depends only on n
 *     and on whether x is 16-byte aligned.
 *   - embedding_backward: several tokens may hit the same vocabulary row, and the
 *     vocabulary size is not part of the contract, so a histogram over rows is not
 *     possible. Instead the token positions are sorted by token id with a stable radix
 *     sort (CUB: stable and integer-only, so its output is one fixed permutation no
 *     matter how its passes are scheduled); the first position of each run of equal
 *     ids then owns that vocabulary row and adds the dout rows of the run in token
 *     order, starting from the row's current value. That is exactly the CPU's order of
 *     additions, so the result is bit-identical to the oracle. A token seen R times is
 *     R coalesced row loads in series for one block: fine for text's token frequencies
 *     (a few percent for the commonest), slow only for a batch of one repeated token.
 *   - l2norm: one warp per row of D, reduced with a fixed butterfly.
 * Math follows the CPU formulas term by term (same association), in fp32 with the
 * accurate expf/log1pf (no fast-math), so only rounding of the reductions differs.
 */
#include <cub/device/device_radix_sort.cuh>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define EW_THREADS 256
/* warps per block (one row each) for l2norm */
#define L2_WARPS 8
#define SUMSQ_THREADS 256
/* float4 loads per thread (at least) before sumsq uses another block */
#define SUMSQ_PER_THREAD 8
#define SUMSQ_MAX_BLOCKS 1024
/* threads per block in the embedding kernels' channel dimension */
#define EMB_THREADS 256

/* Blocks for a grid-stride loop over `units` items: enough to cover them, at most one
 * full wave (2048 resident threads per SM), at least one. */
static unsigned ew_grid(size_t units)
{
    size_t blocks = (units + EW_THREADS - 1) / EW_THREADS;
    size_t cap = (size_t)cuda_num_sms() * (2048 / EW_THREADS);
    if (blocks > cap) blocks = cap;
    return blocks ? (unsigned)blocks : 1u;
}

static __device__ __forceinline__ size_t gtid(void) { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
static __device__ __forceinline__ size_t gstride(void) { return (size_t)gridDim.x * blockDim.x; }

/* Same branches as the CPU: exp of a non-positive argument only, so nothing overflows. */
static __device__ __forceinline__ float sigmoid_f(float x)
{
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}

static __device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ---------------------------------------------------------------- add, scale */

static __global__ void add_kernel(float *y, const float *x, size_t n, size_t n4)
{
    for (size_t i = gtid(); i < n4; i += gstride()) {
        float4 a = ((float4 *)y)[i];
        float4 b = __ldg((const float4 *)x + i);
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
        ((float4 *)y)[i] = a;
    }
    for (size_t i = 4 * n4 + gtid(); i < n; i += gstride()) y[i] += x[i];
}

extern "C" void cuda_add_inplace(float *y, const float *x, size_t n)
{
    if (n == 0) return;
    size_t n4 = cuda_aligned16(y) && cuda_aligned16(x) ? n / 4 : 0;
    add_kernel<<<ew_grid(n4 ? n4 : n), EW_THREADS, 0, cuda_stream()>>>(y, x, n, n4);
    LAUNCH_CHECK();
}

static __global__ void scale_kernel(float *x, float s, size_t n, size_t n4)
{
    for (size_t i = gtid(); i < n4; i += gstride()) {
        float4 a = ((float4 *)x)[i];
        a.x *= s;
        a.y *= s;
        a.z *= s;
        a.w *= s;
        ((float4 *)x)[i] = a;
    }
    for (size_t i = 4 * n4 + gtid(); i < n; i += gstride()) x[i] *= s;
}

extern "C" void cuda_scale_inplace(float *x, float s, size_t n)
{
    if (n == 0) return;
    size_t n4 = cuda_aligned16(x) ? n / 4 : 0;
    scale_kernel<<<ew_grid(n4 ? n4 : n), EW_THREADS, 0, cuda_stream()>>>(x, s, n, n4);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------- sumsq */

/* Sum of v over the block through a fixed tree: butterfly within each warp, then warp 0
 * adds the warp sums in warp order. Result valid in thread 0. */
static __device__ double block_sum_double(double v)
{
    __shared__ double warp_part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) warp_part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nwarps = (blockDim.x + 31) >> 5;
        v = lane < nwarps ? warp_part[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

/* part[block] = sum of x[i]^2 over this block's grid-stride slice, in double (the
 * float products are exact in double, only the additions round). */
static __global__ void sumsq_partial_kernel(double *part, const float *x, size_t n, size_t n4)
{
    double acc = 0.0;
    for (size_t i = gtid(); i < n4; i += gstride()) {
        float4 v = __ldg((const float4 *)x + i);
        acc += (double)v.x * v.x;
        acc += (double)v.y * v.y;
        acc += (double)v.z * v.z;
        acc += (double)v.w * v.w;
    }
    for (size_t i = 4 * n4 + gtid(); i < n; i += gstride()) acc += (double)x[i] * x[i];
    acc = block_sum_double(acc);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

static __global__ void sumsq_final_kernel(double *out, const double *part, int nparts)
{
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += part[i];
    acc = block_sum_double(acc);
    if (threadIdx.x == 0) *out = acc;
}

/* The one op that waits for the device: its contract returns a host double. */
extern "C" double cuda_sumsq(const float *x, size_t n)
{
    if (n == 0) return 0.0;
    size_t n4 = cuda_aligned16(x) ? n / 4 : 0;
    size_t units = n4 ? n4 : n;
    size_t nb = (units + (size_t)SUMSQ_THREADS * SUMSQ_PER_THREAD - 1) / ((size_t)SUMSQ_THREADS * SUMSQ_PER_THREAD);
    if (nb > SUMSQ_MAX_BLOCKS) nb = SUMSQ_MAX_BLOCKS;
    if (nb < 1) nb = 1;
    double *part = (double *)cuda_scratch((nb + 1) * sizeof(double));
    double *out = part + nb;
    sumsq_partial_kernel<<<(unsigned)nb, SUMSQ_THREADS, 0, cuda_stream()>>>(part, x, n, n4);
    LAUNCH_CHECK();
    sumsq_final_kernel<<<1, SUMSQ_THREADS, 0, cuda_stream()>>>(out, part, (int)nb);
    LAUNCH_CHECK();
    double h = 0.0;
    CUDA_CHECK(cudaMemcpyAsync(&h, out, sizeof h, cudaMemcpyDeviceToHost, cuda_stream()));
    CUDA_CHECK(cudaStreamSynchronize(cuda_stream()));
    return h;
}

/* ---------------------------------------------------------------- embedding */

/* out row i = wte row tokens[i]; `units` per row are float4 (vec) or floats. */
static __global__ void embedding_forward_kernel(float *out, const int32_t *tokens, const float *wte,
                                                int N, int C, int vec)
{
    if (vec) {
        int C4 = C / 4;
        size_t total = (size_t)N * C4;
        for (size_t u = gtid(); u < total; u += gstride()) {
            size_t i = u / C4, c4 = u % C4;
            int tok = __ldg(tokens + i);
            ((float4 *)out)[u] = __ldg((const float4 *)wte + (size_t)tok * C4 + c4);
        }
    } else {
        size_t total = (size_t)N * C;
        for (size_t u = gtid(); u < total; u += gstride()) {
            size_t i = u / C, c = u % C;
            int tok = __ldg(tokens + i);
            out[u] = __ldg(wte + (size_t)tok * C + c);
        }
    }
}

extern "C" void cuda_embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int C)
{
    if (N <= 0 || C <= 0) return;
    int vec = C % 4 == 0 && cuda_aligned16(out) && cuda_aligned16(wte);
    size_t units = (size_t)N * (vec ? C / 4 : C);
    embedding_forward_kernel<<<ew_grid(units), EW_THREADS, 0, cuda_stream()>>>(out, tokens, wte, N, C, vec);
    LAUNCH_CHECK();
}

static __global__ void iota_kernel(int32_t *v, int n)
{
    for (size_t i = gtid(); i < (size_t)n; i += gstride()) v[i] = (int32_t)i;
}

/* Block (k, column block): if sorted position k starts a run of equal token ids, add
 * the dout rows of the run (positions ascending, as the stable sort left them) into
 * that token's dwte row, one channel unit (float4 or float) per thread. Blocks in the
 * middle of a run exit at once. */
static __global__ void embedding_backward_kernel(float *dwte, const float *dout, const int32_t *keys,
                                                 const int32_t *pos, int N, int C, int vec)
{
    int k = blockIdx.x;
    int tok = keys[k];
    if (k > 0 && keys[k - 1] == tok) return;
    int end = k + 1;
    while (end < N && keys[end] == tok) end++;
    int units = vec ? C / 4 : C;
    int u = blockIdx.y * blockDim.x + threadIdx.x;
    if (u >= units) return;
    if (vec) {
        float4 *dst = (float4 *)dwte + (size_t)tok * units + u;
        float4 acc = *dst;
#pragma unroll 4
        for (int j = k; j < end; j++) {
            float4 d = __ldg((const float4 *)dout + (size_t)pos[j] * units + u);
            acc.x += d.x;
            acc.y += d.y;
            acc.z += d.z;
            acc.w += d.w;
        }
        *dst = acc;
    } else {
        float *dst = dwte + (size_t)tok * C + u;
        float acc = *dst;
#pragma unroll 4
        for (int j = k; j < end; j++) acc += __ldg(dout + (size_t)pos[j] * C + u);
        *dst = acc;
    }
}

static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

extern "C" void cuda_embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int C)
{
    if (N <= 0 || C <= 0) return;
    size_t ibytes = align256((size_t)N * sizeof(int32_t));
    size_t temp_bytes = 0;
    /* size query only: no work is queued */
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(NULL, temp_bytes, tokens, (int32_t *)NULL, (const int32_t *)NULL,
                                               (int32_t *)NULL, N, 0, 32, cuda_stream()));
    char *s = (char *)cuda_scratch(3 * ibytes + align256(temp_bytes));
    int32_t *keys = (int32_t *)s;
    int32_t *pos_in = (int32_t *)(s + ibytes);
    int32_t *pos = (int32_t *)(s + 2 * ibytes);
    void *temp = s + 3 * ibytes;

    iota_kernel<<<ew_grid((size_t)N), EW_THREADS, 0, cuda_stream()>>>(pos_in, N);
    LAUNCH_CHECK();
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens, keys, pos_in, pos, N, 0, 32,
                                               cuda_stream()));
    LAUNCH_CHECK();

    int vec = C % 4 == 0 && cuda_aligned16(dwte) && cuda_aligned16(dout);
    int units = vec ? C / 4 : C;
    int threads = units < EMB_THREADS ? (units + 31) / 32 * 32 : EMB_THREADS;
    dim3 grid((unsigned)N, ceil_div_u((size_t)units, (size_t)threads));
    embedding_backward_kernel<<<grid, threads, 0, cuda_stream()>>>(dwte, dout, keys, pos, N, C, vec);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------- gates */

/* log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): no overflow, no log(0) */
static __device__ __forceinline__ float logsigmoid_f(float x)
{
    return (x < 0.f ? x : 0.f) - log1pf(expf(-fabsf(x)));
}

static __global__ void gates_forward_kernel(float *g, float *beta, const float *graw, const float *braw,
                                            size_t n, size_t n4)
{
    for (size_t i = gtid(); i < n4; i += gstride()) {
        float4 a = __ldg((const float4 *)graw + i), b = __ldg((const float4 *)braw + i);
        ((float4 *)g)[i] = make_float4(logsigmoid_f(a.x), logsigmoid_f(a.y), logsigmoid_f(a.z), logsigmoid_f(a.w));
        ((float4 *)beta)[i] = make_float4(sigmoid_f(b.x), sigmoid_f(b.y), sigmoid_f(b.z), sigmoid_f(b.w));
    }
    for (size_t i = 4 * n4 + gtid(); i < n; i += gstride()) {
        g[i] = logsigmoid_f(graw[i]);
        beta[i] = sigmoid_f(braw[i]);
    }
}

extern "C" void cuda_gates_forward(float *g, float *beta, const float *graw, const float *braw, size_t n)
{
    if (n == 0) return;
    size_t n4 = cuda_aligned16(g) && cuda_aligned16(beta) && cuda_aligned16(graw) && cuda_aligned16(braw) ? n / 4 : 0;
    gates_forward_kernel<<<ew_grid(n4 ? n4 : n), EW_THREADS, 0, cuda_stream()>>>(g, beta, graw, braw, n, n4);
    LAUNCH_CHECK();
}

/* d logsigmoid(x)/dx = sigmoid(-x); d sigmoid(x)/dx = s (1 - s) */
static __device__ __forceinline__ float dgate1(float dg, float x) { return dg * sigmoid_f(-x); }
static __device__ __forceinline__ float dbeta1(float db, float x)
{
    float s = sigmoid_f(x);
    return db * s * (1.f - s);
}

static __global__ void gates_backward_kernel(float *dgraw, float *dbraw, const float *dg, const float *dbeta,
                                             const float *graw, const float *braw, size_t n, size_t n4)
{
    for (size_t i = gtid(); i < n4; i += gstride()) {
        float4 d = __ldg((const float4 *)dg + i), x = __ldg((const float4 *)graw + i);
        float4 e = __ldg((const float4 *)dbeta + i), y = __ldg((const float4 *)braw + i);
        float4 a = ((float4 *)dgraw)[i], b = ((float4 *)dbraw)[i];
        a.x += dgate1(d.x, x.x);
        a.y += dgate1(d.y, x.y);
        a.z += dgate1(d.z, x.z);
        a.w += dgate1(d.w, x.w);
        b.x += dbeta1(e.x, y.x);
        b.y += dbeta1(e.y, y.y);
        b.z += dbeta1(e.z, y.z);
        b.w += dbeta1(e.w, y.w);
        ((float4 *)dgraw)[i] = a;
        ((float4 *)dbraw)[i] = b;
    }
    for (size_t i = 4 * n4 + gtid(); i < n; i += gstride()) {
        dgraw[i] += dgate1(dg[i], graw[i]);
        dbraw[i] += dbeta1(dbeta[i], braw[i]);
    }
}

extern "C" void cuda_gates_backward(float *dgraw, float *dbraw, const float *dg, const float *dbeta,
                                    const float *graw, const float *braw, size_t n)
{
    if (n == 0) return;
    int al = cuda_aligned16(dgraw) && cuda_aligned16(dbraw) && cuda_aligned16(dg) && cuda_aligned16(dbeta) && cuda_aligned16(graw) &&
             cuda_aligned16(braw);
    size_t n4 = al ? n / 4 : 0;
    gates_backward_kernel<<<ew_grid(n4 ? n4 : n), EW_THREADS, 0, cuda_stream()>>>(dgraw, dbraw, dg, dbeta, graw,
                                                                                   braw, n, n4);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------- l2norm */

/* One warp per row of D: the lanes stride the row (coalesced 128-byte loads), reduce
 * with a butterfly, then re-read the row (an L1 hit) to write it out scaled. */
static __global__ void l2norm_forward_kernel(float *y, float *rnorm, const float *x, int n, int D)
{
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * L2_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const float *xi = x + (size_t)row * D;
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) ss += xi[d] * xi[d];
    ss = warp_sum(ss);
    float nrm = sqrtf(ss);
    float r = 1.f / (nrm > 1e-12f ? nrm : 1e-12f);
    if (lane == 0) rnorm[row] = r;
    float *yi = y + (size_t)row * D;
    for (int d = lane; d < D; d += 32) yi[d] = xi[d] * r;
}

extern "C" void cuda_l2norm_forward(float *y, float *rnorm, const float *x, int n, int D)
{
    if (n <= 0 || D <= 0) return;
    l2norm_forward_kernel<<<ceil_div_u((size_t)n, L2_WARPS), 32 * L2_WARPS, 0, cuda_stream()>>>(y, rnorm, x, n, D);
    LAUNCH_CHECK();
}

/* dx += r (dy - c x) with c = r^2 (x . dy), or c = 0 where the forward clamped the norm
 * (then the scale was a constant), tested exactly as the CPU does; with set, dx = 0 + the
 * same (its old contents unread). */
static __global__ void l2norm_backward_kernel(float *dx, const float *dy, const float *x, const float *rnorm,
                                              int n, int D, int set)
{
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * L2_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const float *xi = x + (size_t)row * D;
    const float *dyi = dy + (size_t)row * D;
    float ss = 0.f, xdy = 0.f;
    for (int d = lane; d < D; d += 32) {
        float xv = xi[d];
        ss += xv * xv;
        xdy += xv * dyi[d];
    }
    ss = warp_sum(ss);
    xdy = warp_sum(xdy);
    float r = rnorm[row];
    float c = sqrtf(ss) < 1e-12f ? 0.f : r * r * xdy;
    float *dxi = dx + (size_t)row * D;
    for (int d = lane; d < D; d += 32) dxi[d] = (set ? 0.f : dxi[d]) + r * (dyi[d] - c * xi[d]);
}

static void l2norm_backward(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D, int set)
{
    if (n <= 0 || D <= 0) return;
    l2norm_backward_kernel<<<ceil_div_u((size_t)n, L2_WARPS), 32 * L2_WARPS, 0, cuda_stream()>>>(dx, dy, x, rnorm,
                                                                                                n, D, set);
    LAUNCH_CHECK();
}

extern "C" void cuda_l2norm_backward(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D)
{
    l2norm_backward(dx, dy, x, rnorm, n, D, 0);
}

/* as cuda_l2norm_backward, but dx is written (old contents unread) */
extern "C" void cuda_l2norm_backward_set(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D)
{
    l2norm_backward(dx, dy, x, rnorm, n, D, 1);
}

/* ---------------------------------------------------------------- swiglu */

/* act = the silu'd half, lin = the other: out = silu(act) * lin */
static __device__ __forceinline__ float swiglu1(float a, float b, int silu_first)
{
    float act = silu_first ? a : b, lin = silu_first ? b : a;
    return act * sigmoid_f(act) * lin;
}

/* Adds to *da, *db the gradient of swiglu1(a, b) for upstream d; silu'(x) = s + x s (1 - s). */
static __device__ __forceinline__ void swiglu_grad1(float *da, float *db, float d, float a, float b,
                                                    int silu_first)
{
    float act = silu_first ? a : b, lin = silu_first ? b : a;
    float s = sigmoid_f(act);
    float d_act = d * lin * (s + act * s * (1.f - s));
    float d_lin = d * act * s;
    if (silu_first) {
        *da += d_act;
        *db += d_lin;
    } else {
        *da += d_lin;
        *db += d_act;
    }
}

/* Four bf16 values from four floats, rounded to nearest even (cuda_to_bf16's rounding),
 * as one 8-byte store */
static __device__ __forceinline__ void store_bf16x4(__nv_bfloat16 *dst, float4 v)
{
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 packed;
    packed.x = *(uint32_t *)&a;
    packed.y = *(uint32_t *)&b;
    *(uint2 *)dst = packed;
}

/* Four bf16 values as floats, one 8-byte load */
static __device__ __forceinline__ float4 load_bf16x4(const __nv_bfloat16 *src)
{
    const uint2 packed = __ldg((const uint2 *)src);
    const __nv_bfloat162 a = *(const __nv_bfloat162 *)&packed.x, b = *(const __nv_bfloat162 *)&packed.y;
    const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
    return make_float4(fa.x, fa.y, fb.x, fb.y);
}

/* The SwiGLU kernels' input [N, 2h]: fp32 in, or bf16 inb where that is non-NULL (the
 * fused MLP's saved gu). Element e (vec: the four from 4 e) of the row starting at r. */
static __device__ __forceinline__ float4 in_load4(const float *in, const __nv_bfloat16 *inb, size_t r, size_t e)
{
    return inb ? load_bf16x4(inb + r + 4 * e) : __ldg((const float4 *)(in + r) + e);
}
static __device__ __forceinline__ float in_load1(const float *in, const __nv_bfloat16 *inb, size_t at)
{
    return inb ? __bfloat162float(inb[at]) : in[at];
}

/* The four-wide SwiGLU kernels go over rows i by blocks and four columns 4 j.. by threads
 * (no index division); the gate half a and the up half b of row i of the input [N, 2h] */
static __device__ __forceinline__ void swiglu_in4(const float *in, const __nv_bfloat16 *inb, int i, int h, int j,
                                                  float4 *a, float4 *b)
{
    *a = in_load4(in, inb, (size_t)i * 2 * h, j);
    *b = in_load4(in, inb, (size_t)i * 2 * h, h / 4 + j);
}

/* blocks of the SwiGLU kernels: rows for the four-wide form (at most ew_grid's cap) */
static unsigned swiglu_grid(int N, size_t units, int vec)
{
    const unsigned g = ew_grid(units);
    return vec && (unsigned)N < g ? (unsigned)N : g;
}

/* out [N, h] in fp32, or in bf16 when outb is non-NULL (then out is unused): the
 * rounding cuda_to_bf16 would give the fp32 value, without the fp32 pass in between.
 * The input from in (fp32) or inb (bf16, when non-NULL). */
static __global__ void swiglu_forward_kernel(float *out, __nv_bfloat16 *outb, const float *in,
                                             const __nv_bfloat16 *inb, int N, int h, int silu_first, int vec)
{
    if (vec) { /* see swiglu_in4 */
        const int h4 = h / 4;
        for (int i = blockIdx.x; i < N; i += gridDim.x)
            for (int j = threadIdx.x; j < h4; j += blockDim.x) {
                const size_t u = (size_t)i * h4 + j;
                float4 a, b;
                swiglu_in4(in, inb, i, h, j, &a, &b);
                const float4 r = make_float4(swiglu1(a.x, b.x, silu_first), swiglu1(a.y, b.y, silu_first),
                                             swiglu1(a.z, b.z, silu_first), swiglu1(a.w, b.w, silu_first));
                if (outb) store_bf16x4(outb + 4 * u, r);
                else ((float4 *)out)[u] = r;
            }
    } else {
        size_t total = (size_t)N * h;
        for (size_t u = gtid(); u < total; u += gstride()) {
            size_t i = u / h, j = u % h;
            float r = swiglu1(in_load1(in, inb, i * 2 * h + j), in_load1(in, inb, i * 2 * h + h + j), silu_first);
            if (outb) outb[u] = __float2bfloat16_rn(r);
            else out[u] = r;
        }
    }
}

/* one of out (fp32) and outb (bf16) non-NULL; one of in (fp32) and inb (bf16) */
static void swiglu_forward(float *out, __nv_bfloat16 *outb, const float *in, const __nv_bfloat16 *inb, int N, int h,
                           int silu_first)
{
    if (N <= 0 || h <= 0) return;
    /* the bf16 rows go wide with 8-byte stores and loads */
    int out_ok = outb ? (uintptr_t)outb % 8 == 0 : cuda_aligned16(out);
    int in_ok = inb ? (uintptr_t)inb % 8 == 0 : cuda_aligned16(in);
    int vec = h % 4 == 0 && out_ok && in_ok;
    size_t units = (size_t)N * (vec ? h / 4 : h);
    swiglu_forward_kernel<<<swiglu_grid(N, units, vec), EW_THREADS, 0, cuda_stream()>>>(out, outb, in, inb, N, h,
                                                                                      silu_first, vec);
    LAUNCH_CHECK();
}

extern "C" void cuda_swiglu_forward(float *out, const float *in, int N, int h, int silu_first)
{
    swiglu_forward(out, NULL, in, NULL, N, h, silu_first);
}

extern "C" void cuda_swiglu_forward_bf16(__nv_bfloat16 *out, const float *in, int N, int h, int silu_first)
{
    swiglu_forward(NULL, out, in, NULL, N, h, silu_first);
}

extern "C" void cuda_swiglu_forward_bf16in(__nv_bfloat16 *out, const __nv_bfloat16 *in, int N, int h, int silu_first)
{
    swiglu_forward(NULL, out, NULL, in, N, h, silu_first);
}

/* acc 1: din += the gradient; acc 0: din = it (din not read); dinb non-NULL (with acc 0):
 * the gradient written in bf16 there instead (din unused), rounded as cuda_to_bf16 would
 * round the fp32 value. dout fp32, or bf16 where doutb is non-NULL (then dout is unused). */
static __global__ void swiglu_backward_kernel(float *din, __nv_bfloat16 *dinb, const float *dout,
                                              const __nv_bfloat16 *doutb, const float *in,
                                              const __nv_bfloat16 *inb, int N, int h, int silu_first, int vec, int acc)
{
    if (vec) { /* see swiglu_in4 */
        const int h4 = h / 4;
        for (int i = blockIdx.x; i < N; i += gridDim.x)
            for (int j = threadIdx.x; j < h4; j += blockDim.x) {
                const size_t u = (size_t)i * h4 + j;
                float4 a, b;
                swiglu_in4(in, inb, i, h, j, &a, &b);
                const float4 d = in_load4(dout, doutb, 0, u);
                float4 da = make_float4(0.f, 0.f, 0.f, 0.f), db = da;
                float4 *drow = dinb ? NULL : (float4 *)din + (size_t)i * 2 * h4;
                if (acc) da = drow[j], db = drow[h4 + j];
                swiglu_grad1(&da.x, &db.x, d.x, a.x, b.x, silu_first);
                swiglu_grad1(&da.y, &db.y, d.y, a.y, b.y, silu_first);
                swiglu_grad1(&da.z, &db.z, d.z, a.z, b.z, silu_first);
                swiglu_grad1(&da.w, &db.w, d.w, a.w, b.w, silu_first);
                if (dinb) {
                    __nv_bfloat16 *brow = dinb + (size_t)i * 2 * h;
                    store_bf16x4(brow + 4 * j, da);
                    store_bf16x4(brow + h + 4 * j, db);
                } else {
                    drow[j] = da;
                    drow[h4 + j] = db;
                }
            }
    } else {
        size_t total = (size_t)N * h;
        for (size_t u = gtid(); u < total; u += gstride()) {
            size_t i = u / h, j = u % h;
            float *drow = dinb ? NULL : din + i * 2 * h;
            float da = acc ? drow[j] : 0.f, db = acc ? drow[h + j] : 0.f;
            swiglu_grad1(&da, &db, in_load1(dout, doutb, u), in_load1(in, inb, i * 2 * h + j),
                         in_load1(in, inb, i * 2 * h + h + j), silu_first);
            if (dinb) {
                dinb[i * 2 * h + j] = __float2bfloat16_rn(da);
                dinb[i * 2 * h + h + j] = __float2bfloat16_rn(db);
            } else {
                drow[j] = da;
                drow[h + j] = db;
            }
        }
    }
}

static void swiglu_backward(float *din, __nv_bfloat16 *dinb, const float *dout, const __nv_bfloat16 *doutb,
                            const float *in, const __nv_bfloat16 *inb, int N, int h, int silu_first, int acc)
{
    if (N <= 0 || h <= 0) return;
    int din_ok = dinb ? (uintptr_t)dinb % 8 == 0 : cuda_aligned16(din);
    int in_ok = inb ? (uintptr_t)inb % 8 == 0 : cuda_aligned16(in);
    int dout_ok = doutb ? (uintptr_t)doutb % 8 == 0 : cuda_aligned16(dout);
    int vec = h % 4 == 0 && din_ok && dout_ok && in_ok;
    size_t units = (size_t)N * (vec ? h / 4 : h);
    swiglu_backward_kernel<<<swiglu_grid(N, units, vec), EW_THREADS, 0, cuda_stream()>>>(
        din, dinb, dout, doutb, in, inb, N, h, silu_first, vec, acc);
    LAUNCH_CHECK();
}

extern "C" void cuda_swiglu_backward(float *din, const float *dout, const float *in, int N, int h, int silu_first)
{
    swiglu_backward(din, NULL, dout, NULL, in, NULL, N, h, silu_first, 1);
}

/* as cuda_swiglu_backward, but din is written, not added to */
extern "C" void cuda_swiglu_backward_set(float *din, const float *dout, const float *in, int N, int h,
                                         int silu_first)
{
    swiglu_backward(din, NULL, dout, NULL, in, NULL, N, h, silu_first, 0);
}

/* as cuda_swiglu_backward_set, with din [N, 2h] written in bf16 */
extern "C" void cuda_swiglu_backward_set_bf16(__nv_bfloat16 *din, const float *dout, const float *in, int N, int h,
                                              int silu_first)
{
    swiglu_backward(NULL, din, dout, NULL, in, NULL, N, h, silu_first, 0);
}

/* as cuda_swiglu_backward_set_bf16, with the input in bf16 */
extern "C" void cuda_swiglu_backward_set_bf16in(__nv_bfloat16 *din, const float *dout, const __nv_bfloat16 *in, int N,
                                                int h, int silu_first)
{
    swiglu_backward(NULL, din, dout, NULL, NULL, in, N, h, silu_first, 0);
}

/* as cuda_swiglu_backward_set_bf16in, with dout in bf16 too (the fused MLP's dact) */
extern "C" void cuda_swiglu_backward_set_bf16dy(__nv_bfloat16 *din, const __nv_bfloat16 *dout,
                                                const __nv_bfloat16 *in, int N, int h, int silu_first)
{
    swiglu_backward(NULL, din, NULL, dout, NULL, in, N, h, silu_first, 0);
}
