/* conv.cu: the CUDA twin of src/cpu/cpu_conv.c: the short causal depthwise convolution
 * of the Gated DeltaNet block (kernel 4, with bias), x and y [B, T, C] channel-last,
 * w [C, 4] oldest tap first, optional document-start resets.
 *
 * A thread owns one channel unit (4 channels as a float4 when C % 4 == 0 and the
 * activations are 16-byte aligned, else 1 channel) of one batch row and walks a run of
 * consecutive time steps, keeping the last four input rows in registers: each element
 * of x is loaded once (plus a 3-step halo per run) and the loads of a warp cover 32
 * consecutive units of one time row, so they are coalesced. The run length is picked
 * from the sizes so that the grid still fills the GPU.
 *
 * Tap s of output t reads x[t-3+s]; it is used when t-3+s >= 0 and no document starts
 * in (t-3+s, t], which is the CPU's "first visible" rule restated per tap.
 *
 * The backward walks the same runs and does everything in one pass: dx[t] gathers the
 * (up to) four dy rows t..t+3 that read x[t] (a look-ahead window of dy), and the same
 * thread accumulates its run's contribution to dw[c, 0..3] and dbias[c] in registers.
 * Those per-run sums go to cuda_scratch as partials [runs][5][C], and a second kernel
 * adds the runs in order into dw and dbias: deterministic, no atomics. Sums keep the
 * CPU's order within each output (bias first, then taps oldest first; dx from the
 * earliest dy row on).
 */
#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define CONV_K 4
#define CONV_THREADS 128
/* bounds of the time-run length per thread (powers of two) */
#define CONV_MAX_RUN 256
#define CONV_MIN_RUN 16
/* the partial-sum reduction: columns per block, and threads per column splitting the runs */
#define REDUCE_X 32
#define REDUCE_Y 16

/* A channel unit: 4 channels (vec) or 1 channel in .x with .y .z .w zero, so one code
 * path serves both; the zero lanes cost arithmetic only, never memory. */
static __device__ __forceinline__ float4 ld_unit(const float *row, int c, int vec)
{
    if (vec) return __ldg((const float4 *)(row + c));
    return make_float4(__ldg(row + c), 0.f, 0.f, 0.f);
}

static __device__ __forceinline__ float4 ld_unit_rw(const float *row, int c, int vec)
{
    if (vec) return *(const float4 *)(row + c);
    return make_float4(row[c], 0.f, 0.f, 0.f);
}

static __device__ __forceinline__ void st_unit(float *row, int c, int vec, float4 v)
{
    if (vec)
        *(float4 *)(row + c) = v;
    else
        row[c] = v.x;
}

/* acc += a * b, per lane */
static __device__ __forceinline__ void fma4(float4 *acc, float4 a, float4 b)
{
    acc->x += a.x * b.x;
    acc->y += a.y * b.y;
    acc->z += a.z * b.z;
    acc->w += a.w * b.w;
}

static __device__ __forceinline__ void add4(float4 *acc, float4 a)
{
    acc->x += a.x;
    acc->y += a.y;
    acc->z += a.z;
    acc->w += a.w;
}

/* Tap s of the unit's channels: w[(c + j) * 4 + s] for j < width. w and bias are
 * parameters that may sit at any offset, so they are read as scalars (once per thread). */
static __device__ __forceinline__ float4 ld_tap(const float *w, int c, int s, int vec)
{
    if (vec)
        return make_float4(__ldg(w + (size_t)c * CONV_K + s), __ldg(w + (size_t)(c + 1) * CONV_K + s),
                           __ldg(w + (size_t)(c + 2) * CONV_K + s), __ldg(w + (size_t)(c + 3) * CONV_K + s));
    return make_float4(__ldg(w + (size_t)c * CONV_K + s), 0.f, 0.f, 0.f);
}

/* doc_start flag at time t of this batch row, 0 outside [0, T) or without masking */
static __device__ __forceinline__ int ds_at(const int32_t *ds, int t, int T)
{
    return ds && t >= 0 && t < T ? __ldg(ds + t) : 0;
}

/* grid: (channel-unit blocks, runs of `run` steps, B) */
static __global__ void conv_forward_kernel(float *y, const float *x, const float *w, const float *bias,
                                           const int32_t *doc_start, int T, int C, int run, int vec)
{
    int units = vec ? C / 4 : C;
    int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= units) return;
    int c = vec ? 4 * u : u;
    int b = blockIdx.z;
    int t0 = blockIdx.y * run, t1 = t0 + run < T ? t0 + run : T;
    const float *xb = x + (size_t)b * T * C;
    float *yb = y + (size_t)b * T * C;
    const int32_t *ds = doc_start ? doc_start + (size_t)b * T : NULL;

    float4 w0 = ld_tap(w, c, 0, vec), w1 = ld_tap(w, c, 1, vec), w2 = ld_tap(w, c, 2, vec),
           w3 = ld_tap(w, c, 3, vec);
    float4 bs = vec ? make_float4(__ldg(bias + c), __ldg(bias + c + 1), __ldg(bias + c + 2), __ldg(bias + c + 3))
                    : make_float4(__ldg(bias + c), 0.f, 0.f, 0.f);
    float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    /* x[t-3], x[t-2], x[t-1] and doc_start[t-2], doc_start[t-1] entering step t0 */
    float4 xm3 = t0 >= 3 ? ld_unit(xb + (size_t)(t0 - 3) * C, c, vec) : zero;
    float4 xm2 = t0 >= 2 ? ld_unit(xb + (size_t)(t0 - 2) * C, c, vec) : zero;
    float4 xm1 = t0 >= 1 ? ld_unit(xb + (size_t)(t0 - 1) * C, c, vec) : zero;
    int dm2 = ds_at(ds, t0 - 2, T), dm1 = ds_at(ds, t0 - 1, T);
    for (int t = t0; t < t1; t++) {
        float4 xt = ld_unit(xb + (size_t)t * C, c, vec);
        int d0 = ds_at(ds, t, T);
        int v2 = t >= 1 && !d0, v1 = t >= 2 && v2 && !dm1, v0 = t >= 3 && v1 && !dm2;
        float4 acc = bs;
        if (v0) fma4(&acc, w0, xm3);
        if (v1) fma4(&acc, w1, xm2);
        if (v2) fma4(&acc, w2, xm1);
        fma4(&acc, w3, xt);
        st_unit(yb + (size_t)t * C, c, vec, acc);
        xm3 = xm2;
        xm2 = xm1;
        xm1 = xt;
        dm2 = dm1;
        dm1 = d0;
    }
}

/* Same grid as the forward. part: [B * runs][5][C]: the run's sums of dy x[t-3+s] for
 * taps s = 0..3, then of dy (bias). */
static __global__ void conv_backward_kernel(int set, float *dx, float *part, const float *dy, const float *x,
                                            const float *w, const int32_t *doc_start, int T, int C, int run,
                                            int vec)
{
    int units = vec ? C / 4 : C;
    int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= units) return;
    int c = vec ? 4 * u : u;
    int b = blockIdx.z;
    int t0 = blockIdx.y * run, t1 = t0 + run < T ? t0 + run : T;
    const float *xb = x + (size_t)b * T * C, *dyb = dy + (size_t)b * T * C;
    float *dxb = dx + (size_t)b * T * C;
    const int32_t *ds = doc_start ? doc_start + (size_t)b * T : NULL;

    float4 w0 = ld_tap(w, c, 0, vec), w1 = ld_tap(w, c, 1, vec), w2 = ld_tap(w, c, 2, vec),
           w3 = ld_tap(w, c, 3, vec);
    float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    /* look-behind of x for the weight gradient of output t */
    float4 xm3 = t0 >= 3 ? ld_unit(xb + (size_t)(t0 - 3) * C, c, vec) : zero;
    float4 xm2 = t0 >= 2 ? ld_unit(xb + (size_t)(t0 - 2) * C, c, vec) : zero;
    float4 xm1 = t0 >= 1 ? ld_unit(xb + (size_t)(t0 - 1) * C, c, vec) : zero;
    /* look-ahead of dy for the input gradient at t: dy[t], dy[t+1], dy[t+2] (dy[t+3]
     * is loaded in the step) */
    float4 dy0 = ld_unit(dyb + (size_t)t0 * C, c, vec);
    float4 dy1 = t0 + 1 < T ? ld_unit(dyb + (size_t)(t0 + 1) * C, c, vec) : zero;
    float4 dy2 = t0 + 2 < T ? ld_unit(dyb + (size_t)(t0 + 2) * C, c, vec) : zero;
    /* doc_start flags t-2 .. t+2 entering step t0 (t+3 loaded in the step) */
    int dm2 = ds_at(ds, t0 - 2, T), dm1 = ds_at(ds, t0 - 1, T), d0 = ds_at(ds, t0, T);
    int dp1 = ds_at(ds, t0 + 1, T), dp2 = ds_at(ds, t0 + 2, T);
    float4 gw0 = zero, gw1 = zero, gw2 = zero, gw3 = zero, gb = zero;
    for (int t = t0; t < t1; t++) {
        float4 xt = ld_unit(xb + (size_t)t * C, c, vec);
        float4 dy3 = t + 3 < T ? ld_unit(dyb + (size_t)(t + 3) * C, c, vec) : zero;
        int dp3 = ds_at(ds, t + 3, T);

        /* x[t] feeds outputs t + k through tap 3 - k, while no document starts in
         * (t, t + k] */
        int f1 = t + 1 < T && !dp1, f2 = t + 2 < T && f1 && !dp2, f3 = t + 3 < T && f2 && !dp3;
        float4 g = set ? zero : ld_unit_rw(dxb + (size_t)t * C, c, vec); /* set: dx written, not read */
        fma4(&g, w3, dy0);
        if (f1) fma4(&g, w2, dy1);
        if (f2) fma4(&g, w1, dy2);
        if (f3) fma4(&g, w0, dy3);
        st_unit(dxb + (size_t)t * C, c, vec, g);

        /* output t: its taps, as in the forward */
        int v2 = t >= 1 && !d0, v1 = t >= 2 && v2 && !dm1, v0 = t >= 3 && v1 && !dm2;
        add4(&gb, dy0);
        if (v0) fma4(&gw0, dy0, xm3);
        if (v1) fma4(&gw1, dy0, xm2);
        if (v2) fma4(&gw2, dy0, xm1);
        fma4(&gw3, dy0, xt);

        xm3 = xm2;
        xm2 = xm1;
        xm1 = xt;
        dy0 = dy1;
        dy1 = dy2;
        dy2 = dy3;
        dm2 = dm1;
        dm1 = d0;
        d0 = dp1;
        dp1 = dp2;
        dp2 = dp3;
    }
    float *pb = part + ((size_t)b * gridDim.y + blockIdx.y) * 5 * C;
    st_unit(pb, c, vec, gw0);
    st_unit(pb + C, c, vec, gw1);
    st_unit(pb + 2 * (size_t)C, c, vec, gw2);
    st_unit(pb + 3 * (size_t)C, c, vec, gw3);
    st_unit(pb + 4 * (size_t)C, c, vec, gb);
}

/* Column j < 5C of the partials (tap s = j / C of channel c = j % C, s = 4 the bias):
 * thread (x, y) of a block of REDUCE_X columns adds runs y, y + REDUCE_Y, ... in order,
 * then row y = 0 adds the REDUCE_Y results in y order and adds the total into dw[c, s]
 * or dbias[c]. Splitting the runs over y keeps few loads in series per thread. */
static __global__ void conv_reduce_kernel(float *dw, float *dbias, const float *part, int nparts, int C)
{
    __shared__ float sh[REDUCE_Y][REDUCE_X];
    int j = blockIdx.x * REDUCE_X + threadIdx.x;
    float acc = 0.f;
    if (j < 5 * C) {
#pragma unroll 4
        for (int p = threadIdx.y; p < nparts; p += REDUCE_Y) acc += part[(size_t)p * 5 * C + j];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < 5 * C) {
        float s = sh[0][threadIdx.x];
        for (int y = 1; y < REDUCE_Y; y++) s += sh[y][threadIdx.x];
        int tap = j / C, c = j % C;
        if (tap < CONV_K)
            dw[(size_t)c * CONV_K + tap] += s;
        else
            dbias[c] += s;
    }
}

/* Launch shape shared by forward and backward: the longest run (fewest partials and
 * halo re-reads) that still gives about half a wave of threads, and a grid whose y
 * dimension stays within the hardware limit. */
typedef struct conv_shape {
    int vec, units, run, nruns;
    dim3 grid, block;
} conv_shape;

static conv_shape conv_plan(int B, int T, int C, int vec)
{
    conv_shape s;
    s.vec = vec;
    s.units = vec ? C / 4 : C;
    size_t target = (size_t)cuda_num_sms() * 1024;
    s.run = CONV_MAX_RUN;
    while (s.run > CONV_MIN_RUN && (size_t)s.units * B * ((T + s.run - 1) / s.run) < target) s.run /= 2;
    while ((T + s.run - 1) / s.run > 65535) s.run *= 2;
    s.nruns = (T + s.run - 1) / s.run;
    if (B > 65535) die("conv: batch size %d exceeds the grid limit 65535", B);
    int threads = s.units < CONV_THREADS ? (s.units + 31) / 32 * 32 : CONV_THREADS;
    s.block = dim3(threads);
    s.grid = dim3(ceil_div_u((size_t)s.units, (size_t)threads), (unsigned)s.nruns, (unsigned)B);
    return s;
}

extern "C" void cuda_conv_forward(float *y, const float *x, const float *w, const float *bias,
                                  const int32_t *doc_start, int B, int T, int C)
{
    if (B <= 0 || T <= 0 || C <= 0) return;
    conv_shape s = conv_plan(B, T, C, C % 4 == 0 && cuda_aligned16(y) && cuda_aligned16(x));
    conv_forward_kernel<<<s.grid, s.block, 0, cuda_stream()>>>(y, x, w, bias, doc_start, T, C, s.run, s.vec);
    LAUNCH_CHECK();
}

/* dx added to (set 0) or written (set 1, old contents unread); dw, dbias added to */
static void conv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x, const float *w,
                          const int32_t *doc_start, int B, int T, int C, int set)
{
    if (B <= 0 || T <= 0 || C <= 0) return;
    conv_shape s = conv_plan(B, T, C, C % 4 == 0 && cuda_aligned16(dx) && cuda_aligned16(dy) && cuda_aligned16(x));
    int nparts = B * s.nruns;
    float *part = (float *)cuda_scratch((size_t)nparts * 5 * C * sizeof(float));
    conv_backward_kernel<<<s.grid, s.block, 0, cuda_stream()>>>(set, dx, part, dy, x, w, doc_start, T, C, s.run,
                                                                s.vec);
    LAUNCH_CHECK();
    conv_reduce_kernel<<<ceil_div_u((size_t)5 * C, REDUCE_X), dim3(REDUCE_X, REDUCE_Y), 0, cuda_stream()>>>(
        dw, dbias, part, nparts, C);
    LAUNCH_CHECK();
}

extern "C" void cuda_conv_backward(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                                   const float *w, const int32_t *doc_start, int B, int T, int C)
{
    conv_backward(dx, dw, dbias, dy, x, w, doc_start, B, T, C, 0);
}

/* as cuda_conv_backward, but dx is written, not added to */
extern "C" void cuda_conv_backward_set(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                                       const float *w, const int32_t *doc_start, int B, int T, int C)
{
    conv_backward(dx, dw, dbias, dy, x, w, doc_start, B, T, C, 1);
}
