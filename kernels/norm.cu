/* norm.cu: the CUDA twins of src/cpu/cpu_norm.c: RMSNorm (eps 1e-6) and LayerNorm
 * (eps 1e-5, biased variance), forward with the per-row statistics saved, and backward.
 *
 * One warp per row (C up to a few thousand): the lanes stride the row with float4
 * loads when C % 4 == 0 and the pointers are 16-byte aligned (scalar otherwise), reduce
 * with a fixed butterfly, and re-read the row for the second pass; the re-read hits L1
 * or L2, so device memory sees each row once.
 *
 * The backward is one fused pass: a warp computes its row's dot products, then walks
 * the row again writing dx and accumulating the row's contribution to dw (and db) into
 * its own slice of shared memory, [warps][C] per accumulated parameter. Because each
 * warp owns its slice and handles its rows in a fixed order, no atomics are needed. At
 * the end the block adds its warps' slices in warp order into one row of partial sums in
 * cuda_scratch ([blocks][C]), and a second kernel adds those rows in block order into
 * dw/db. The grid depends only on N, C and the device, so results are bit-identical run
 * to run. The formulas keep the CPU's association term by term.
 */
#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define RMS_EPS 1e-6f
#define LN_EPS 1e-5f
/* warps (rows in flight) per block in the forward kernels */
#define NORM_FWD_WARPS 4
/* warps per block in the backward, lowered only when their shared slices do not fit */
#define NORM_BWD_WARPS 4
/* rows per warp (at least) before the backward uses another block: fewer blocks means
 * fewer partial rows to add up afterwards */
#define NORM_BWD_MIN_ROWS 4
/* the partial-sum reduction: columns per block, and threads per column splitting the rows */
#define COLSUM_X 32
#define COLSUM_Y 16

static int max_smem_optin(void)
{
    static int bytes;
    if (!bytes) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    }
    return bytes;
}

/* Rows of up to 32 * NORM_CACHE float4 (C <= 1024) are held in registers, NORM_CACHE
 * float4 a lane, all loaded at once: the RMSNorm kernels then read each row once instead
 * of twice, with every load of a row in flight together (the second read of a row had
 * come from L2, the shared memory of the backward's dw slices leaving little L1). Same
 * arithmetic in the same order as the loops over the row, so the same bits. */
#define NORM_CACHE 8

static __device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ---------------------------------------------------------------- forward */

/* C4 = C / 4 when the rows are float4-aligned, else 0 (all channels go through the
 * scalar loops, which start at 4 * C4). */
static __global__ void rmsnorm_forward_kernel(float *out, float *rstd, const float *x, const float *w, int N,
                                              int C, int C4)
{
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * NORM_FWD_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;
    const float *xi = x + (size_t)row * C;
    const float4 *xi4 = (const float4 *)xi;
    float ss = 0.f;
    if (4 * C4 == C && C4 <= 32 * NORM_CACHE) { /* the row in registers (NORM_CACHE) */
        float4 xv[NORM_CACHE];
#pragma unroll
        for (int u = 0; u < NORM_CACHE; u++)
            if (lane + 32 * u < C4) xv[u] = __ldg(xi4 + lane + 32 * u);
#pragma unroll
        for (int u = 0; u < NORM_CACHE; u++)
            if (lane + 32 * u < C4) {
                const float4 v = xv[u];
                ss += v.x * v.x;
                ss += v.y * v.y;
                ss += v.z * v.z;
                ss += v.w * v.w;
            }
        ss = warp_sum(ss);
        const float r = 1.f / sqrtf(ss / C + RMS_EPS);
        if (lane == 0) rstd[row] = r;
        float4 *oi4 = (float4 *)(out + (size_t)row * C);
#pragma unroll
        for (int u = 0; u < NORM_CACHE; u++) {
            const int c = lane + 32 * u;
            if (c < C4) {
                const float4 v = xv[u], g = __ldg((const float4 *)w + c);
                oi4[c] = make_float4(g.x * (v.x * r), g.y * (v.y * r), g.z * (v.z * r), g.w * (v.w * r));
            }
        }
        return;
    }
#pragma unroll 4
    for (int c = lane; c < C4; c += 32) {
        float4 v = __ldg(xi4 + c);
        ss += v.x * v.x;
        ss += v.y * v.y;
        ss += v.z * v.z;
        ss += v.w * v.w;
    }
    for (int c = 4 * C4 + lane; c < C; c += 32) ss += xi[c] * xi[c];
    ss = warp_sum(ss);
    float r = 1.f / sqrtf(ss / C + RMS_EPS);
    if (lane == 0) rstd[row] = r;
    float *oi = out + (size_t)row * C;
#pragma unroll 4
    for (int c = lane; c < C4; c += 32) {
        float4 v = __ldg(xi4 + c), g = __ldg((const float4 *)w + c);
        ((float4 *)oi)[c] = make_float4(g.x * (v.x * r), g.y * (v.y * r), g.z * (v.z * r), g.w * (v.w * r));
    }
    for (int c = 4 * C4 + lane; c < C; c += 32) oi[c] = w[c] * (xi[c] * r);
}

extern "C" void cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int C)
{
    if (N <= 0 || C <= 0) return;
    int C4 = C % 4 == 0 && cuda_aligned16(out) && cuda_aligned16(x) && cuda_aligned16(w) ? C / 4 : 0;
    rmsnorm_forward_kernel<<<ceil_div_u((size_t)N, NORM_FWD_WARPS), 32 * NORM_FWD_WARPS, 0, cuda_stream()>>>(
        out, rstd, x, w, N, C, C4);
    LAUNCH_CHECK();
}

/* Mean, then the variance about it (two passes, as the CPU), then the output. */
static __global__ void layernorm_forward_kernel(float *out, float *mean, float *rstd, const float *x,
                                                const float *w, const float *b, int N, int C, int C4)
{
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * NORM_FWD_WARPS + (threadIdx.x >> 5);
    if (row >= N) return;
    const float *xi = x + (size_t)row * C;
    const float4 *xi4 = (const float4 *)xi;
    float s = 0.f;
#pragma unroll 4
    for (int c = lane; c < C4; c += 32) {
        float4 v = __ldg(xi4 + c);
        s += v.x;
        s += v.y;
        s += v.z;
        s += v.w;
    }
    for (int c = 4 * C4 + lane; c < C; c += 32) s += xi[c];
    float m = warp_sum(s) / C;
    float v2 = 0.f;
#pragma unroll 4
    for (int c = lane; c < C4; c += 32) {
        float4 v = __ldg(xi4 + c);
        v2 += (v.x - m) * (v.x - m);
        v2 += (v.y - m) * (v.y - m);
        v2 += (v.z - m) * (v.z - m);
        v2 += (v.w - m) * (v.w - m);
    }
    for (int c = 4 * C4 + lane; c < C; c += 32) v2 += (xi[c] - m) * (xi[c] - m);
    float r = 1.f / sqrtf(warp_sum(v2) / C + LN_EPS);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
    float *oi = out + (size_t)row * C;
#pragma unroll 4
    for (int c = lane; c < C4; c += 32) {
        float4 v = __ldg(xi4 + c), g = __ldg((const float4 *)w + c), h = __ldg((const float4 *)b + c);
        ((float4 *)oi)[c] = make_float4((v.x - m) * r * g.x + h.x, (v.y - m) * r * g.y + h.y,
                                        (v.z - m) * r * g.z + h.z, (v.w - m) * r * g.w + h.w);
    }
    for (int c = 4 * C4 + lane; c < C; c += 32) oi[c] = (xi[c] - m) * r * w[c] + b[c];
}

extern "C" void cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *x, const float *w,
                                       const float *b, int N, int C)
{
    if (N <= 0 || C <= 0) return;
    int C4 = C % 4 == 0 && cuda_aligned16(out) && cuda_aligned16(x) && cuda_aligned16(w) && cuda_aligned16(b) ? C / 4 : 0;
    layernorm_forward_kernel<<<ceil_div_u((size_t)N, NORM_FWD_WARPS), 32 * NORM_FWD_WARPS, 0, cuda_stream()>>>(
        out, mean, rstd, x, w, b, N, C, C4);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------- backward */

/* Zero this block's shared accumulators: n floats. */
static __device__ void smem_zero(float *acc, int n)
{
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
}

/* part[c] = sum over warps w (in order) of acc[w * C + c]. */
static __device__ void smem_to_partial(float *part, const float *acc, int nwarps, int C)
{
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = acc[c];
        for (int w = 1; w < nwarps; w++) s += acc[(size_t)w * C + c];
        part[c] = s;
    }
}

/* four channels of the RMSNorm backward: dx += r d g - k v, the dw slice += d (v r) */
static __device__ __forceinline__ void rms_bwd4(float4 *dx, float4 *acc, float4 d, float4 g, float4 v, float r, float k)
{
    float4 o = *dx, a = *acc;
    o.x += r * d.x * g.x - k * v.x;
    o.y += r * d.y * g.y - k * v.y;
    o.z += r * d.z * g.z - k * v.z;
    o.w += r * d.w * g.w - k * v.w;
    a.x += d.x * (v.x * r);
    a.y += d.y * (v.y * r);
    a.z += d.z * (v.z * r);
    a.w += d.w * (v.w * r);
    *dx = o;
    *acc = a;
}

/* dx += r dout w - r^3 x mean(dout w x); dw partials of dout (x r) into part [grid][C].
 * Dynamic shared: [warps][C] floats. */
static __global__ void rmsnorm_backward_kernel(float *dx, float *part, const float *dout, const float *x,
                                               const float *w, const float *rstd, int N, int C, int C4)
{
    extern __shared__ float4 smem4[];
    float *acc = (float *)smem4;
    int nwarps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    smem_zero(acc, nwarps * C);
    float *my = acc + (size_t)warp * C;
    float4 *my4 = (float4 *)my;
    if (4 * C4 == C && C4 <= 32 * NORM_CACHE) { /* rows (and w) in registers (NORM_CACHE) */
        const float4 *w4 = (const float4 *)w;
        float4 wv[NORM_CACHE];
#pragma unroll
        for (int u = 0; u < NORM_CACHE; u++)
            if (lane + 32 * u < C4) wv[u] = __ldg(w4 + lane + 32 * u);
        for (int row = blockIdx.x * nwarps + warp; row < N; row += gridDim.x * nwarps) {
            const float4 *xi4 = (const float4 *)(x + (size_t)row * C), *di4 = (const float4 *)(dout + (size_t)row * C);
            float4 dv[NORM_CACHE], xv[NORM_CACHE];
#pragma unroll
            for (int u = 0; u < NORM_CACHE; u++)
                if (lane + 32 * u < C4) {
                    dv[u] = __ldg(di4 + lane + 32 * u);
                    xv[u] = __ldg(xi4 + lane + 32 * u);
                }
            float gx = 0.f;
#pragma unroll
            for (int u = 0; u < NORM_CACHE; u++)
                if (lane + 32 * u < C4) {
                    const float4 d = dv[u], g = wv[u], v = xv[u];
                    gx += d.x * g.x * v.x;
                    gx += d.y * g.y * v.y;
                    gx += d.z * g.z * v.z;
                    gx += d.w * g.w * v.w;
                }
            gx = warp_sum(gx);
            const float r = rstd[row], k = r * r * r * gx / C;
            float4 *dxi4 = (float4 *)(dx + (size_t)row * C);
#pragma unroll
            for (int u = 0; u < NORM_CACHE; u++) {
                const int c = lane + 32 * u;
                if (c < C4) rms_bwd4(dxi4 + c, my4 + c, dv[u], wv[u], xv[u], r, k);
            }
        }
        __syncthreads();
        smem_to_partial(part + (size_t)blockIdx.x * C, acc, nwarps, C);
        return;
    }
    for (int row = blockIdx.x * nwarps + warp; row < N; row += gridDim.x * nwarps) {
        const float *xi = x + (size_t)row * C, *di = dout + (size_t)row * C;
        const float4 *xi4 = (const float4 *)xi, *di4 = (const float4 *)di, *w4 = (const float4 *)w;
        float gx = 0.f;
#pragma unroll 4
        for (int c = lane; c < C4; c += 32) {
            float4 d = __ldg(di4 + c), g = __ldg(w4 + c), v = __ldg(xi4 + c);
            gx += d.x * g.x * v.x;
            gx += d.y * g.y * v.y;
            gx += d.z * g.z * v.z;
            gx += d.w * g.w * v.w;
        }
        for (int c = 4 * C4 + lane; c < C; c += 32) gx += di[c] * w[c] * xi[c];
        gx = warp_sum(gx);
        float r = rstd[row];
        float k = r * r * r * gx / C;
        float *dxi = dx + (size_t)row * C;
        float4 *dxi4 = (float4 *)dxi;
#pragma unroll 4
        for (int c = lane; c < C4; c += 32) {
            rms_bwd4(dxi4 + c, my4 + c, __ldg(di4 + c), __ldg(w4 + c), __ldg(xi4 + c), r, k);
        }
        for (int c = 4 * C4 + lane; c < C; c += 32) {
            dxi[c] += r * di[c] * w[c] - k * xi[c];
            my[c] += di[c] * (xi[c] * r);
        }
    }
    __syncthreads();
    smem_to_partial(part + (size_t)blockIdx.x * C, acc, nwarps, C);
}

/* xhat = (x - mean) rstd, g = dout w: dx += rstd (g - mean(g) - xhat mean(g xhat));
 * dw partials of dout xhat into part [grid][C], db partials of dout into
 * part + grid * C. Dynamic shared: [2][warps][C] floats (dw slices, then db slices). */
static __global__ void layernorm_backward_kernel(float *dx, float *part, const float *dout, const float *x,
                                                 const float *w, const float *mean, const float *rstd, int N,
                                                 int C, int C4)
{
    extern __shared__ float4 smem4[];
    float *acc = (float *)smem4;
    int nwarps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    smem_zero(acc, 2 * nwarps * C);
    float *mw = acc + (size_t)warp * C, *mb = acc + (size_t)(nwarps + warp) * C;
    float4 *mw4 = (float4 *)mw, *mb4 = (float4 *)mb;
    for (int row = blockIdx.x * nwarps + warp; row < N; row += gridDim.x * nwarps) {
        const float *xi = x + (size_t)row * C, *di = dout + (size_t)row * C;
        const float4 *xi4 = (const float4 *)xi, *di4 = (const float4 *)di, *w4 = (const float4 *)w;
        float m = mean[row], r = rstd[row];
        float gsum = 0.f, gxsum = 0.f;
#pragma unroll 4
        for (int c = lane; c < C4; c += 32) {
            float4 d = __ldg(di4 + c), g = __ldg(w4 + c), v = __ldg(xi4 + c);
            float g0 = d.x * g.x, g1 = d.y * g.y, g2 = d.z * g.z, g3 = d.w * g.w;
            gsum += g0;
            gxsum += g0 * ((v.x - m) * r);
            gsum += g1;
            gxsum += g1 * ((v.y - m) * r);
            gsum += g2;
            gxsum += g2 * ((v.z - m) * r);
            gsum += g3;
            gxsum += g3 * ((v.w - m) * r);
        }
        for (int c = 4 * C4 + lane; c < C; c += 32) {
            float g = di[c] * w[c];
            gsum += g;
            gxsum += g * ((xi[c] - m) * r);
        }
        float gmean = warp_sum(gsum) / C, gxmean = warp_sum(gxsum) / C;
        float *dxi = dx + (size_t)row * C;
        float4 *dxi4 = (float4 *)dxi;
#pragma unroll 4
        for (int c = lane; c < C4; c += 32) {
            float4 d = __ldg(di4 + c), g = __ldg(w4 + c), v = __ldg(xi4 + c);
            float4 o = dxi4[c], a = mw4[c], e = mb4[c];
            float h0 = (v.x - m) * r, h1 = (v.y - m) * r, h2 = (v.z - m) * r, h3 = (v.w - m) * r;
            o.x += r * (d.x * g.x - gmean - h0 * gxmean);
            o.y += r * (d.y * g.y - gmean - h1 * gxmean);
            o.z += r * (d.z * g.z - gmean - h2 * gxmean);
            o.w += r * (d.w * g.w - gmean - h3 * gxmean);
            a.x += d.x * h0;
            a.y += d.y * h1;
            a.z += d.z * h2;
            a.w += d.w * h3;
            e.x += d.x;
            e.y += d.y;
            e.z += d.z;
            e.w += d.w;
            dxi4[c] = o;
            mw4[c] = a;
            mb4[c] = e;
        }
        for (int c = 4 * C4 + lane; c < C; c += 32) {
            float h = (xi[c] - m) * r;
            dxi[c] += r * (di[c] * w[c] - gmean - h * gxmean);
            mw[c] += di[c] * h;
            mb[c] += di[c];
        }
    }
    __syncthreads();
    smem_to_partial(part + (size_t)blockIdx.x * C, acc, nwarps, C);
    smem_to_partial(part + ((size_t)gridDim.x + blockIdx.x) * C, acc + (size_t)nwarps * C, nwarps, C);
}

/* dst[c] += sum over g of part[g * C + c], in a fixed order: thread (x, y) of a block
 * of COLSUM_X columns adds rows y, y + COLSUM_Y, ... in order, then row y = 0 adds the
 * COLSUM_Y results in y order. Splitting the rows over y keeps few loads in series per
 * thread, so the reduction is not latency-bound when G is in the hundreds. */
static __global__ void colsum_kernel(float *dst, const float *part, int G, int C)
{
    __shared__ float s[COLSUM_Y][COLSUM_X];
    int c = blockIdx.x * COLSUM_X + threadIdx.x;
    float acc = 0.f;
    if (c < C) {
#pragma unroll 4
        for (int g = threadIdx.y; g < G; g += COLSUM_Y) acc += part[(size_t)g * C + c];
    }
    s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = s[0][threadIdx.x];
        for (int y = 1; y < COLSUM_Y; y++) t += s[y][threadIdx.x];
        dst[c] += t;
    }
}

static void colsum(float *dst, const float *part, int G, int C)
{
    colsum_kernel<<<ceil_div_u((size_t)C, COLSUM_X), dim3(COLSUM_X, COLSUM_Y), 0, cuda_stream()>>>(dst, part, G, C);
    LAUNCH_CHECK();
}

/* Launch shape of a fused backward whose block keeps `nacc` shared [warps][C] slices:
 * warps per block (fewer when the slices would not fit), dynamic shared bytes, and a
 * grid of at most one resident wave with at least NORM_BWD_MIN_ROWS rows per warp. */
typedef struct bwd_shape {
    int warps, grid;
    size_t smem;
} bwd_shape;

static bwd_shape bwd_plan(const void *kernel, int N, int C, int nacc, const char *op)
{
    bwd_shape s;
    s.warps = NORM_BWD_WARPS;
    while (s.warps > 1 && (size_t)nacc * s.warps * C * sizeof(float) > (size_t)max_smem_optin()) s.warps /= 2;
    s.smem = (size_t)nacc * s.warps * C * sizeof(float);
    if (s.smem > (size_t)max_smem_optin())
        die("%s: C = %d needs %zu bytes of shared memory per block, more than the device's %d", op, C, s.smem,
            max_smem_optin());
    if (s.smem > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s.smem));
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 32 * s.warps, s.smem));
    if (per_sm < 1) per_sm = 1;
    size_t want = ((size_t)N + (size_t)s.warps * NORM_BWD_MIN_ROWS - 1) / ((size_t)s.warps * NORM_BWD_MIN_ROWS);
    size_t cap = (size_t)per_sm * cuda_num_sms();
    s.grid = (int)(want < cap ? want : cap);
    if (s.grid < 1) s.grid = 1;
    return s;
}

extern "C" void cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                                      const float *rstd, int N, int C)
{
    if (N <= 0 || C <= 0) return;
    int C4 = C % 4 == 0 && cuda_aligned16(dx) && cuda_aligned16(dout) && cuda_aligned16(x) && cuda_aligned16(w) ? C / 4 : 0;
    bwd_shape s = bwd_plan((const void *)rmsnorm_backward_kernel, N, C, 1, "rmsnorm_backward");
    float *part = (float *)cuda_scratch((size_t)s.grid * C * sizeof(float));
    rmsnorm_backward_kernel<<<s.grid, 32 * s.warps, s.smem, cuda_stream()>>>(dx, part, dout, x, w, rstd, N, C, C4);
    LAUNCH_CHECK();
    colsum(dw, part, s.grid, C);
}

extern "C" void cuda_layernorm_backward(float *dx, float *dw, float *db, const float *dout, const float *x,
                                        const float *w, const float *mean, const float *rstd, int N, int C)
{
    if (N <= 0 || C <= 0) return;
    int C4 = C % 4 == 0 && cuda_aligned16(dx) && cuda_aligned16(dout) && cuda_aligned16(x) && cuda_aligned16(w) ? C / 4 : 0;
    bwd_shape s = bwd_plan((const void *)layernorm_backward_kernel, N, C, 2, "layernorm_backward");
    float *part = (float *)cuda_scratch(2 * (size_t)s.grid * C * sizeof(float));
    layernorm_backward_kernel<<<s.grid, 32 * s.warps, s.smem, cuda_stream()>>>(dx, part, dout, x, w, mean, rstd, N,
                                                                                C, C4);
    LAUNCH_CHECK();
    colsum(dw, part, s.grid, C);
    colsum(db, part + (size_t)s.grid * C, s.grid, C);
}
