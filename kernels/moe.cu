/* moe.cu: the mixture-of-experts ops of the CUDA backend (MODEL.md section 5): the sigmoid
 * router with bias-adjusted top-k and z-loss, and the routed SwiGLU experts, with exactly
 * the contracts and saved layouts of src/cpu/cpu_moe.c (the oracle).
 *
 * Router. One warp per token; lane l holds experts l, l+32, ... (E <= 512) in registers.
 * The k selections are k rounds of a warp arg-max over the unchosen experts, ordered by
 * score then lower index, so ties go to the lower expert as on the CPU. Scores, gates
 * and the log-sum-exp are computed in double like the oracle, so idx matches it exactly
 * unless two scores agree to ~1e-16. The z-loss is a per-block partial (fixed order) and
 * one final fixed-order sum; counts are an integer histogram (integer atomics commute).
 *
 * Experts. The N*k (token, slot) assignments are sorted by expert with a stable counting
 * sort: per chunk of 1024 assignments a histogram, an exclusive scan over chunks per
 * expert and over experts, then placement in (token, slot) order inside each chunk
 * (warp match + per-warp counts). The expert GEMMs are one grouped GEMM kernel that
 * reads the per-expert offsets from device memory: no host synchronisation, so the op
 * can be captured in a CUDA graph. It runs bf16 tensor-core mma.sync (m16n8k16, fp32
 * accumulate) on 128x128x32 tiles: operands are loaded as fp32 (gathered rows, optional
 * transposition), rounded to bf16 on the way into shared memory, double-buffered through
 * registers. Two shapes: "rows" (M = the tokens of one expert, the forward and the
 * input-side backward) and "weight gradient" (K = the tokens of one expert, one block per
 * output tile of one expert, so every dw element is one thread's sum in a fixed order).
 * Epilogues do the rest in place: the first forward GEMM interleaves [g | u] columns so
 * that a thread holds g and u of the same unit and writes save = [g | u | silu(g) u]
 * directly in (token, slot) order; the first backward GEMM (w2 dy) applies the SwiGLU
 * backward and emits per-tile partial dot products for dgate. Outputs per assignment go
 * to (token, slot)-ordered buffers and are combined per token in slot order, so every
 * result is deterministic. Operands are rounded to bf16, so results differ from the fp32
 * oracle by about 2e-3 to 5e-3 relative (norm of the difference over norm of the result);
 * the pre-activations in save are the fp32 accumulators.
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

/* ---- sort ---- */
#define SORT_THREADS 256
#define SORT_WARPS (SORT_THREADS / 32)
#define SORT_CHUNK 1024
#define SORT_MAX_E 1024 /* shared memory of the placement kernel: 9 E ints */

/* ---- grouped GEMM ---- */
#define GM_BM 128
#define GM_BN 128
#define GM_BK 32
#define GM_LDS (GM_BK + 8) /* bf16 per shared row; the pad makes fragment loads conflict-free */
#define GM_THREADS 256     /* 8 warps: 2 along M x 4 along N, 64 x 32 outputs each */

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

/* ---- stable counting sort of the assignments by expert ---- */

/* hist[b][e] = assignments to e in chunk b */
static __global__ void __launch_bounds__(SORT_THREADS)
sort_hist_kernel(int *hist, const int32_t *idx, int nk, int E)
{
    extern __shared__ int cnt[];
    for (int e = threadIdx.x; e < E; e += SORT_THREADS) cnt[e] = 0;
    __syncthreads();
    const int a0 = blockIdx.x * SORT_CHUNK;
    for (int q = threadIdx.x; q < SORT_CHUNK && a0 + q < nk; q += SORT_THREADS) atomicAdd(&cnt[idx[a0 + q]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += SORT_THREADS) hist[(size_t)blockIdx.x * E + e] = cnt[e];
}

/* One block: hist[b][e] becomes the exclusive prefix over chunks (the chunk's first rank
 * within expert e); cnt[e], off[e] (first sorted position of e, off[E] = total) and
 * toff[e] (first GEMM row tile of e, toff[E] = tiles) */
static __global__ void __launch_bounds__(SORT_THREADS)
sort_scan_kernel(int *hist, int *cnt, int *off, int *toff, int nchunks, int E)
{
    for (int e = threadIdx.x; e < E; e += SORT_THREADS) {
        int run = 0;
        for (int b = 0; b < nchunks; b++) {
            const int v = hist[(size_t)b * E + e];
            hist[(size_t)b * E + e] = run;
            run += v;
        }
        cnt[e] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int o = 0, t = 0;
        for (int e = 0; e < E; e++) {
            off[e] = o;
            toff[e] = t;
            o += cnt[e];
            t += (cnt[e] + GM_BM - 1) / GM_BM;
        }
        off[E] = o;
        toff[E] = t;
    }
}

/* perm_a[pos] = assignment (token * k + slot), perm_tok[pos] = token, for pos =
 * off[e] + (rank of the assignment among those to e in (token, slot) order) */
static __global__ void __launch_bounds__(SORT_THREADS)
sort_place_kernel(int *perm_a, int *perm_tok, const int *hist, const int *off, const int32_t *idx,
                  int nk, int k, int E)
{
    extern __shared__ int sm[];
    int *run = sm;      /* [E] next position of each expert */
    int *wcnt = sm + E; /* [SORT_WARPS][E] assignments per warp in this round */
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    for (int e = tid; e < E; e += SORT_THREADS) run[e] = off[e] + hist[(size_t)blockIdx.x * E + e];
    const int begin = blockIdx.x * SORT_CHUNK;
    const int end = min(nk, begin + SORT_CHUNK);
    for (int base = begin; base < end; base += SORT_THREADS) {
        for (int q = tid; q < SORT_WARPS * E; q += SORT_THREADS) wcnt[q] = 0;
        __syncthreads();
        const int a = base + tid;
        const int e = a < end ? idx[a] : -1;
        const unsigned same = __match_any_sync(FULL_MASK, e);
        const unsigned below = same & ((1u << lane) - 1u);
        if (e >= 0 && below == 0) wcnt[warp * E + e] = __popc(same);
        __syncthreads();
        if (e >= 0) {
            int pos = run[e] + __popc(below);
            for (int w = 0; w < warp; w++) pos += wcnt[w * E + e];
            perm_a[pos] = a;
            perm_tok[pos] = a / k;
        }
        __syncthreads();
        for (int q = tid; q < E; q += SORT_THREADS) {
            int s = 0;
            for (int w = 0; w < SORT_WARPS; w++) s += wcnt[w * E + q];
            run[q] += s;
        }
        __syncthreads();
    }
}

/* ---- grouped GEMM: C_e = A_e B_e for every expert e, bf16 mma.sync, fp32 accumulate ----
 *
 * A tile is [128][32] of A (rows m, columns k) or of B^T (rows n, columns k), stored in
 * shared memory k-contiguous as bf16 pairs, which is what the mma fragments read. Each
 * operand is described by where element (r, k) of its tile lives:
 *   kcontig 1: src[row(r) * ld + coloff + k]     (rows gathered, k contiguous)
 *   kcontig 0: src[row(k) * ld + coloff + col(r)] (rows gathered along k, r contiguous)
 * row(x) = list ? list[lbase + x] : lbase + x, where lbase is the expert's first sorted
 * position for gathered activations and 0 (or the tile's first row) for weights, and
 * col(r) = r0 + r, or with pair_h the [g | u] interleave: r -> unit r0 + (r/16)*8 + r%8,
 * in the u half (column + pair_h) when (r/8) is odd. */

enum { GM_ROWS = 0, GM_WGRAD = 1 };
enum { EPI_SWIGLU = 0, EPI_SCATTER = 1, EPI_SWIGLU_BWD = 2, EPI_ACCUM = 3 };

typedef struct gm_operand {
    const float *base;  /* expert 0's matrix, or the activation buffer */
    long long estride;  /* floats between experts' matrices (0 for activations) */
    const int *list;    /* gathered rows, or NULL */
    const float *scale; /* NULL, or a factor per source row applied on load (kcontig 0) */
    int ld, coloff, kcontig, pair_h;
    int vec;            /* 16-byte loads are in bounds and aligned */
} gm_operand;

typedef struct gm_args {
    gm_operand a, b;
    int shape, epi;
    int E, M, N, K;     /* GM_ROWS: N, K (M = the expert's count); GM_WGRAD: M, N (K = count) */
    const int *cnt, *off, *toff;
    float *c;           /* EPI_SCATTER: rows clist[pos]; EPI_ACCUM: expert e at c + e * cestride */
    int ldc;
    long long cestride;
    const int *clist;   /* sorted position -> assignment */
    int h;              /* expert hidden width (SwiGLU epilogues) */
    float *save_out;    /* EPI_SWIGLU */
    const float *save_in, *gate; /* EPI_SWIGLU_BWD */
    float *dpre, *part;
} gm_args;

static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi); /* .x (lo) in the low half */
    uint32_t u;
    memcpy(&u, &p, sizeof u);
    return u;
}

static __device__ __forceinline__ uint32_t lds32(const __nv_bfloat16 *p) { return *(const uint32_t *)p; }

static __device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* source row and scale of k index kk of a kcontig-0 operand (-1: past the end) */
static __device__ __forceinline__ void gm_krow(const gm_operand op, int lbase, int kk, int K, int *row, float *sc)
{
    *row = -1;
    *sc = 1.f;
    if (kk < K) {
        const int r = op.list ? op.list[lbase + kk] : lbase + kk;
        *row = r;
        if (op.scale) *sc = op.scale[r];
    }
}

/* loads this thread's 16 elements of the tile at k0 into v (zeros out of bounds).
 * kcontig 1: 4 runs of 4 k along one row (srow: staged source rows, -1 invalid);
 * kcontig 0: 2 runs of 4 r at each of two adjacent k (kid/ksc: staged rows, scales). */
static __device__ __forceinline__ void gm_fetch(float v[16], const gm_operand op, const float *src,
                                                const int *srow, const int *kid, const float *ksc,
                                                int r0, int rlim, int k0, int K)
{
    const int tid = threadIdx.x;
    if (op.kcontig) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int q = tid + i * GM_THREADS;
            const int r = q >> 3, kk = k0 + (q & 7) * 4;
            const int row = srow[r];
            const float *p = src + (long long)(row < 0 ? 0 : row) * op.ld + op.coloff + kk;
            if (op.vec) {
                float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
                if (row >= 0 && kk < K) t = *(const float4 *)p;
                v[4 * i] = t.x;
                v[4 * i + 1] = t.y;
                v[4 * i + 2] = t.z;
                v[4 * i + 3] = t.w;
            } else {
#pragma unroll
                for (int u = 0; u < 4; u++) v[4 * i + u] = (row >= 0 && kk + u < K) ? p[u] : 0.f;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int q = tid + i * GM_THREADS;
            const int kp = q & 15, r = (q >> 4) * 4;
            int col, lim; /* first column of the run, and how many of its 4 are valid */
            if (op.pair_h) {
                const int m = r0 + (r >> 4) * 8 + (r & 7);
                col = m + (((r >> 3) & 1) ? op.pair_h : 0);
                lim = op.pair_h - m;
            } else {
                col = r0 + r;
                lim = rlim - r;
            }
#pragma unroll
            for (int s = 0; s < 2; s++) {
                const int row = kid[2 * kp + s];
                const float sc = ksc[2 * kp + s];
                const float *p = src + (long long)(row < 0 ? 0 : row) * op.ld + op.coloff + (lim > 0 ? col : 0);
                float *w = v + 8 * i + 4 * s;
                if (op.vec) {
                    float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
                    if (row >= 0 && lim > 0) t = *(const float4 *)p;
                    w[0] = t.x * sc;
                    w[1] = t.y * sc;
                    w[2] = t.z * sc;
                    w[3] = t.w * sc;
                } else {
#pragma unroll
                    for (int u = 0; u < 4; u++) w[u] = (row >= 0 && u < lim) ? p[u] * sc : 0.f;
                }
            }
        }
    }
}

/* writes the fetched elements into a shared tile as bf16, k-contiguous */
static __device__ __forceinline__ void gm_store(__nv_bfloat16 (*T)[GM_LDS], const float v[16], int kcontig)
{
    const int tid = threadIdx.x;
    if (kcontig) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int q = tid + i * GM_THREADS;
            uint2 w;
            w.x = pack_bf16(v[4 * i], v[4 * i + 1]);
            w.y = pack_bf16(v[4 * i + 2], v[4 * i + 3]);
            *(uint2 *)&T[q >> 3][(q & 7) * 4] = w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int q = tid + i * GM_THREADS;
            const int kp = q & 15, r = (q >> 4) * 4;
#pragma unroll
            for (int u = 0; u < 4; u++) *(uint32_t *)&T[r + u][2 * kp] = pack_bf16(v[8 * i + u], v[8 * i + 4 + u]);
        }
    }
}

/* acc += the warp's 64 x 32 block of A_tile B_tile over the 32 k of one stage.
 * m16n8k16 fragments (g = lane/4, q = lane%4): A regs (row g | g+8, k 2q..2q+1 | +8),
 * B regs (n g, k 2q..2q+1 | +8), C (row g | g+8, n 2q..2q+1). */
static __device__ __forceinline__ void gm_compute(float acc[4][4][4], __nv_bfloat16 (*A)[GM_LDS],
                                                  __nv_bfloat16 (*B)[GM_LDS], int wm, int wn, int gid, int tq)
{
#pragma unroll
    for (int ks = 0; ks < GM_BK; ks += 16) {
        uint32_t bf[4][2];
#pragma unroll
        for (int nf = 0; nf < 4; nf++) {
            const __nv_bfloat16 *p = &B[wn * 32 + nf * 8 + gid][ks + tq * 2];
            bf[nf][0] = lds32(p);
            bf[nf][1] = lds32(p + 8);
        }
#pragma unroll
        for (int mf = 0; mf < 4; mf++) {
            const __nv_bfloat16 *p = &A[wm * 64 + mf * 16 + gid][ks + tq * 2];
            uint32_t af[4];
            af[0] = lds32(p);
            af[1] = lds32(p + 8 * GM_LDS);
            af[2] = lds32(p + 8);
            af[3] = lds32(p + 8 * GM_LDS + 8);
#pragma unroll
            for (int nf = 0; nf < 4; nf++) mma_bf16(acc[mf][nf], af, bf[nf]);
        }
    }
}

/* GM_ROWS: blockIdx.x is a row tile in the concatenation of the experts' tiles (blocks
 * past toff[E] exit), blockIdx.y an output column tile. GM_WGRAD: blockIdx.y is the
 * expert, blockIdx.x its (M, N) output tile; experts without tokens exit. */
static __global__ void __launch_bounds__(GM_THREADS) grouped_gemm_kernel(const gm_args g)
{
    __shared__ __align__(16) __nv_bfloat16 As[2][GM_BM][GM_LDS];
    __shared__ __align__(16) __nv_bfloat16 Bs[2][GM_BN][GM_LDS];
    __shared__ int srowA[GM_BM], srowB[GM_BN];
    __shared__ int kidA[2][GM_BK], kidB[2][GM_BK];
    __shared__ float kscA[2][GM_BK], kscB[2][GM_BK];
    __shared__ float red[GM_BM][4];

    const int tid = threadIdx.x;
    int e, m0, n0, Mlim, Nlim, K, lbaseA, lbaseB, r0A, r0B;
    if (g.shape == GM_ROWS) {
        const int t = blockIdx.x;
        if (t >= g.toff[g.E]) return;
        int lo = 0, hi = g.E; /* last e with toff[e] <= t: a non-empty expert */
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (g.toff[mid] <= t)
                lo = mid;
            else
                hi = mid - 1;
        }
        e = lo;
        m0 = (t - g.toff[e]) * GM_BM;
        Mlim = g.cnt[e] - m0;
        n0 = blockIdx.y * GM_BN;
        Nlim = g.N - n0;
        K = g.K;
        lbaseA = g.off[e] + m0;
        lbaseB = g.b.kcontig ? n0 : 0;
        r0A = 0;
        r0B = g.b.pair_h ? blockIdx.y * (GM_BN / 2) : n0;
    } else {
        e = blockIdx.y;
        K = g.cnt[e];
        if (K == 0) return;
        const int tm = (g.M + GM_BM - 1) / GM_BM;
        m0 = (blockIdx.x % tm) * GM_BM;
        n0 = (blockIdx.x / tm) * GM_BN;
        Mlim = g.M - m0;
        Nlim = g.N - n0;
        lbaseA = lbaseB = g.off[e];
        r0A = m0;
        r0B = n0;
    }
    const float *srcA = g.a.base + (long long)e * g.a.estride;
    const float *srcB = g.b.base + (long long)e * g.b.estride;
    const int nk = (K + GM_BK - 1) / GM_BK;

    /* stage the source rows: fixed rows for kcontig operands, the first two k tiles'
     * rows for the others (later ones are staged one iteration ahead in the loop) */
    if (g.a.kcontig)
        for (int r = tid; r < GM_BM; r += GM_THREADS)
            srowA[r] = r < Mlim ? (g.a.list ? g.a.list[lbaseA + r] : lbaseA + r) : -1;
    if (g.b.kcontig)
        for (int r = tid; r < GM_BN; r += GM_THREADS)
            srowB[r] = r < Nlim ? (g.b.list ? g.b.list[lbaseB + r] : lbaseB + r) : -1;
    const int kt_lane = tid & (GM_BK - 1);
    const int kt_role = tid < GM_BK ? (g.a.kcontig ? 0 : 1) : tid < 2 * GM_BK ? (g.b.kcontig ? 0 : 2) : 0;
    if (kt_role == 1)
        for (int s = 0; s < 2; s++) gm_krow(g.a, lbaseA, s * GM_BK + kt_lane, K, &kidA[s][kt_lane], &kscA[s][kt_lane]);
    if (kt_role == 2)
        for (int s = 0; s < 2; s++) gm_krow(g.b, lbaseB, s * GM_BK + kt_lane, K, &kidB[s][kt_lane], &kscB[s][kt_lane]);
    __syncthreads();

    float va[16], vb[16];
    gm_fetch(va, g.a, srcA, srowA, kidA[0], kscA[0], r0A, Mlim, 0, K);
    gm_fetch(vb, g.b, srcB, srowB, kidB[0], kscB[0], r0B, Nlim, 0, K);
    gm_store(As[0], va, g.a.kcontig);
    gm_store(Bs[0], vb, g.b.kcontig);
    __syncthreads();

    const int warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tq = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    float acc[4][4][4];
#pragma unroll
    for (int mf = 0; mf < 4; mf++)
#pragma unroll
        for (int nf = 0; nf < 4; nf++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mf][nf][c] = 0.f;

    for (int kt = 0; kt < nk; kt++) {
        const int st = kt & 1;
        const int more = kt + 1 < nk;
        int krow = -1;
        float kscale = 1.f;
        if (kt + 2 < nk && kt_role == 1) gm_krow(g.a, lbaseA, (kt + 2) * GM_BK + kt_lane, K, &krow, &kscale);
        if (kt + 2 < nk && kt_role == 2) gm_krow(g.b, lbaseB, (kt + 2) * GM_BK + kt_lane, K, &krow, &kscale);
        if (more) {
            gm_fetch(va, g.a, srcA, srowA, kidA[st ^ 1], kscA[st ^ 1], r0A, Mlim, (kt + 1) * GM_BK, K);
            gm_fetch(vb, g.b, srcB, srowB, kidB[st ^ 1], kscB[st ^ 1], r0B, Nlim, (kt + 1) * GM_BK, K);
        }
        gm_compute(acc, As[st], Bs[st], wm, wn, gid, tq);
        if (more) {
            gm_store(As[st ^ 1], va, g.a.kcontig);
            gm_store(Bs[st ^ 1], vb, g.b.kcontig);
        }
        /* tile kt+2 uses slot st, last read while fetching tile kt (before the previous
         * barrier) */
        if (kt + 2 < nk && kt_role == 1) {
            kidA[st][kt_lane] = krow;
            kscA[st][kt_lane] = kscale;
        }
        if (kt + 2 < nk && kt_role == 2) {
            kidB[st][kt_lane] = krow;
            kscB[st][kt_lane] = kscale;
        }
        __syncthreads();
    }

    /* epilogue: thread element (mf, nf, c) is tile row wm*64 + mf*16 + gid + 8*(c/2),
     * tile column wn*32 + nf*8 + 2*tq + c%2 */
    if (g.epi == EPI_SWIGLU) {
        /* column fragments (0,1) and (2,3) are g and u of the same 8 hidden units */
        const int h = g.h;
        const int mbase = blockIdx.y * (GM_BN / 2) + wn * 16;
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int rr = wm * 64 + mf * 16 + half * 8 + gid;
                if (rr >= Mlim) continue;
                float *sv = g.save_out + (long long)g.clist[g.off[e] + m0 + rr] * 3 * h;
#pragma unroll
                for (int q = 0; q < 2; q++)
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const int m = mbase + q * 8 + tq * 2 + c;
                        if (m >= h) continue;
                        const float gv = acc[mf][2 * q][half * 2 + c], uv = acc[mf][2 * q + 1][half * 2 + c];
                        sv[m] = gv;
                        sv[h + m] = uv;
                        sv[2 * h + m] = gv / (1.f + expf(-gv)) * uv;
                    }
            }
    } else if (g.epi == EPI_SCATTER) {
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int rr = wm * 64 + mf * 16 + half * 8 + gid;
                if (rr >= Mlim) continue;
                float *crow = g.c + (long long)g.clist[g.off[e] + m0 + rr] * g.ldc;
#pragma unroll
                for (int nf = 0; nf < 4; nf++)
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const int n = n0 + wn * 32 + nf * 8 + tq * 2 + c;
                        if (n < g.N) crow[n] = acc[mf][nf][half * 2 + c];
                    }
            }
    } else if (g.epi == EPI_SWIGLU_BWD) {
        /* acc = da0 = w2 dy for hidden units n; dpre = the SwiGLU adjoint scaled by the
         * gate; the row's partial act . da0 over this tile goes to part[pos][blockIdx.y] */
        const int h = g.h;
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int rr = wm * 64 + mf * 16 + half * 8 + gid;
                float dot = 0.f;
                if (rr < Mlim) {
                    const int p = g.off[e] + m0 + rr;
                    const int a = g.clist[p];
                    const float gt = g.gate[a];
                    const float *sv = g.save_in + (long long)a * 3 * h;
                    float *dp = g.dpre + (long long)p * 2 * h;
#pragma unroll
                    for (int nf = 0; nf < 4; nf++)
#pragma unroll
                        for (int c = 0; c < 2; c++) {
                            const int m = n0 + wn * 32 + nf * 8 + tq * 2 + c;
                            if (m >= h) continue;
                            const float d0 = acc[mf][nf][half * 2 + c];
                            const float gg = sv[m], uu = sv[h + m];
                            const float sg = 1.f / (1.f + expf(-gg));
                            const float da = gt * d0;
                            dp[m] = da * uu * sg * (1.f + gg * (1.f - sg));
                            dp[h + m] = da * gg * sg;
                            dot += sv[2 * h + m] * d0;
                        }
                }
                dot += __shfl_xor_sync(FULL_MASK, dot, 1);
                dot += __shfl_xor_sync(FULL_MASK, dot, 2);
                if (tq == 0) red[rr][wn] = dot;
            }
        __syncthreads();
        if (tid < GM_BM && tid < Mlim)
            g.part[(long long)(g.off[e] + m0 + tid) * gridDim.y + blockIdx.y] =
                red[tid][0] + red[tid][1] + red[tid][2] + red[tid][3];
    } else { /* EPI_ACCUM */
        float *cm = g.c + (long long)e * g.cestride;
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int rr = wm * 64 + mf * 16 + half * 8 + gid;
                if (rr >= Mlim) continue;
                float *crow = cm + (long long)(m0 + rr) * g.ldc;
#pragma unroll
                for (int nf = 0; nf < 4; nf++)
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const int n = n0 + wn * 32 + nf * 8 + tq * 2 + c;
                        if (n < g.N) crow[n] += acc[mf][nf][half * 2 + c];
                    }
            }
    }
}

/* ---- per-token combines (slot order) ---- */

/* y[i] = sum_j gate[i,j] o[i*k+j] */
static __global__ void combine_forward_kernel(float *y, const float *o, const float *gate, int N, int k, int out)
{
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)N * out) return;
    const size_t i = t / out, c = t % out;
    float s = 0.f;
    for (int j = 0; j < k; j++) s += gate[i * k + j] * o[(i * k + j) * out + c];
    y[t] = s;
}

/* dx[i] += sum_j dxa[i*k+j] */
static __global__ void combine_dx_kernel(float *dx, const float *dxa, int N, int k, int in)
{
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)N * in) return;
    const size_t i = t / in, r = t % in;
    float s = 0.f;
    for (int j = 0; j < k; j++) s += dxa[(i * k + j) * in + r];
    dx[t] += s;
}

/* dgate[assignment of pos] += sum over the column tiles of part[pos] */
static __global__ void dgate_finish_kernel(float *dgate, const float *part, const int *perm_a, int nk, int nparts)
{
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= nk) return;
    float s = 0.f;
    for (int y = 0; y < nparts; y++) s += part[(size_t)p * nparts + y];
    dgate[perm_a[p]] += s;
}

/* ---- host side ---- */

typedef struct moe_sort {
    int *hist, *cnt, *off, *toff, *perm_a, *perm_tok;
    int nchunks;
} moe_sort;

static size_t align256(size_t b) { return (b + 255) & ~(size_t)255; }

static size_t moe_sort_bytes(int nk, int E)
{
    const size_t nchunks = ((size_t)nk + SORT_CHUNK - 1) / SORT_CHUNK;
    return align256(nchunks * E * sizeof(int)) + align256((size_t)E * sizeof(int)) +
           2 * align256((size_t)(E + 1) * sizeof(int)) + 2 * align256((size_t)nk * sizeof(int));
}

/* carves the sort's buffers from *cur (advancing it) */
static void moe_sort_carve(moe_sort *s, char **cur, int nk, int E)
{
    s->nchunks = (nk + SORT_CHUNK - 1) / SORT_CHUNK;
    s->hist = (int *)*cur;
    *cur += align256((size_t)s->nchunks * E * sizeof(int));
    s->cnt = (int *)*cur;
    *cur += align256((size_t)E * sizeof(int));
    s->off = (int *)*cur;
    *cur += align256((size_t)(E + 1) * sizeof(int));
    s->toff = (int *)*cur;
    *cur += align256((size_t)(E + 1) * sizeof(int));
    s->perm_a = (int *)*cur;
    *cur += align256((size_t)nk * sizeof(int));
    s->perm_tok = (int *)*cur;
    *cur += align256((size_t)nk * sizeof(int));
}

static void moe_sort_run(const moe_sort *s, const int32_t *idx, int nk, int k, int E)
{
    cudaStream_t st = cuda_stream();
    sort_hist_kernel<<<s->nchunks, SORT_THREADS, E * sizeof(int), st>>>(s->hist, idx, nk, E);
    LAUNCH_CHECK();
    sort_scan_kernel<<<1, SORT_THREADS, 0, st>>>(s->hist, s->cnt, s->off, s->toff, s->nchunks, E);
    LAUNCH_CHECK();
    sort_place_kernel<<<s->nchunks, SORT_THREADS, (SORT_WARPS + 1) * E * sizeof(int), st>>>(
        s->perm_a, s->perm_tok, s->hist, s->off, idx, nk, k, E);
    LAUNCH_CHECK();
}

/* An operand; vec is set when every 16-byte load the kernel would make is aligned and
 * entirely in or out of bounds (rdim: the extent along r for kcontig 0). */
static gm_operand gm_op(const float *base, long long estride, const int *list, const float *scale, int ld,
                        int coloff, int kcontig, int pair_h, int rdim, int K)
{
    gm_operand op;
    op.base = base;
    op.estride = estride;
    op.list = list;
    op.scale = scale;
    op.ld = ld;
    op.coloff = coloff;
    op.kcontig = kcontig;
    op.pair_h = pair_h;
    const int ext = kcontig ? K : (pair_h ? pair_h : rdim);
    op.vec = ((uintptr_t)base % 16 == 0) && estride % 4 == 0 && ld % 4 == 0 && coloff % 4 == 0 && ext % 4 == 0;
    return op;
}

static gm_args gm_args_init(int shape, int epi, const moe_sort *s, int E)
{
    gm_args g;
    memset(&g, 0, sizeof g);
    g.shape = shape;
    g.epi = epi;
    g.E = E;
    g.cnt = s->cnt;
    g.off = s->off;
    g.toff = s->toff;
    return g;
}

/* GM_ROWS: grid (upper bound on row tiles, column tiles); GM_WGRAD: (output tiles, E) */
static void gm_launch(const gm_args *g, int nk, int col_tiles)
{
    dim3 grid;
    if (g->shape == GM_ROWS)
        grid = dim3((unsigned)((nk + GM_BM - 1) / GM_BM + g->E), (unsigned)col_tiles);
    else
        grid = dim3(ceil_div_u(g->M, GM_BM) * ceil_div_u(g->N, GM_BN), (unsigned)g->E);
    grouped_gemm_kernel<<<grid, GM_THREADS, 0, cuda_stream()>>>(*g);
    LAUNCH_CHECK();
}

static void moe_check_shapes(const char *who, int N, int E, int k, int in, int h, int out)
{
    if (N < 1 || E < 1 || k < 1 || k > E || in < 1 || h < 1 || out < 1)
        die("%s: bad shape N=%d E=%d k=%d in=%d h=%d out=%d", who, N, E, k, in, h, out);
    if (E > SORT_MAX_E) die("%s: E=%d experts, at most %d supported", who, E, SORT_MAX_E);
    if ((long long)N * k > INT_MAX / 2)
        die("%s: N*k = %lld assignments, at most %d supported", who, (long long)N * k, INT_MAX / 2);
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

/* Scratch: the sort, and o [N*k, out] (expert outputs in (token, slot) order). */
extern "C" void cuda_moe_experts_forward(float *y, float *save, const float *x, const int32_t *idx,
                                         const float *gate, const float *w1, const float *w2,
                                         int N, int E, int k, int in, int h, int out)
{
    moe_check_shapes("cuda_moe_experts_forward", N, E, k, in, h, out);
    const int nk = N * k, h2 = 2 * h, h3 = 3 * h;
    char *cur = (char *)cuda_scratch(moe_sort_bytes(nk, E) + align256((size_t)nk * out * sizeof(float)));
    moe_sort s;
    moe_sort_carve(&s, &cur, nk, E);
    float *obuf = (float *)cur;
    moe_sort_run(&s, idx, nk, k, E);

    /* [g | u] = x w1[e], then save = [g | u | silu(g) u] per assignment */
    gm_args g1 = gm_args_init(GM_ROWS, EPI_SWIGLU, &s, E);
    g1.a = gm_op(x, 0, s.perm_tok, NULL, in, 0, 1, 0, 0, in);
    g1.b = gm_op(w1, (long long)in * h2, NULL, NULL, h2, 0, 0, h, h2, in);
    g1.N = h2;
    g1.K = in;
    g1.clist = s.perm_a;
    g1.h = h;
    g1.save_out = save;
    gm_launch(&g1, nk, (int)ceil_div_u(h, GM_BN / 2));

    /* o = act w2[e] */
    gm_args g2 = gm_args_init(GM_ROWS, EPI_SCATTER, &s, E);
    g2.a = gm_op(save, 0, s.perm_a, NULL, h3, h2, 1, 0, 0, h);
    g2.b = gm_op(w2, (long long)h * out, NULL, NULL, out, 0, 0, 0, out, h);
    g2.N = out;
    g2.K = h;
    g2.c = obuf;
    g2.ldc = out;
    g2.clist = s.perm_a;
    gm_launch(&g2, nk, (int)ceil_div_u(out, GM_BN));

    const size_t ny = (size_t)N * out;
    combine_forward_kernel<<<ceil_div_u(ny, 256), 256, 0, cuda_stream()>>>(y, obuf, gate, N, k, out);
    LAUNCH_CHECK();
}

/* Scratch: the sort, dpre [N*k, 2h] (sorted order), the dgate partials [N*k, h/128] and
 * dxa [N*k, in] ((token, slot) order). */
extern "C" void cuda_moe_experts_backward(float *dx, float *dgate, float *dw1, float *dw2, const float *dy,
                                          const float *save, const float *x, const int32_t *idx,
                                          const float *gate, const float *w1, const float *w2,
                                          int N, int E, int k, int in, int h, int out)
{
    moe_check_shapes("cuda_moe_experts_backward", N, E, k, in, h, out);
    const int nk = N * k, h2 = 2 * h, h3 = 3 * h;
    const int nparts = (int)ceil_div_u(h, GM_BN);
    const size_t dpre_b = align256((size_t)nk * h2 * sizeof(float));
    const size_t part_b = align256((size_t)nk * nparts * sizeof(float));
    const size_t dxa_b = align256((size_t)nk * in * sizeof(float));
    char *cur = (char *)cuda_scratch(moe_sort_bytes(nk, E) + dpre_b + part_b + dxa_b);
    moe_sort s;
    moe_sort_carve(&s, &cur, nk, E);
    float *dpre = (float *)cur;
    float *part = (float *)(cur + dpre_b);
    float *dxa = (float *)(cur + dpre_b + part_b);
    moe_sort_run(&s, idx, nk, k, E);
    cudaStream_t st = cuda_stream();

    /* da0 = dy w2[e]^T -> dpre (SwiGLU backward, times the gate), dgate partials */
    gm_args g3 = gm_args_init(GM_ROWS, EPI_SWIGLU_BWD, &s, E);
    g3.a = gm_op(dy, 0, s.perm_tok, NULL, out, 0, 1, 0, 0, out);
    g3.b = gm_op(w2, (long long)h * out, NULL, NULL, out, 0, 1, 0, 0, out);
    g3.N = h;
    g3.K = out;
    g3.clist = s.perm_a;
    g3.h = h;
    g3.save_in = save;
    g3.gate = gate;
    g3.dpre = dpre;
    g3.part = part;
    gm_launch(&g3, nk, nparts);
    dgate_finish_kernel<<<ceil_div_u(nk, 256), 256, 0, st>>>(dgate, part, s.perm_a, nk, nparts);
    LAUNCH_CHECK();

    /* dxa = dpre w1[e]^T, then dx += per-token sums */
    gm_args g4 = gm_args_init(GM_ROWS, EPI_SCATTER, &s, E);
    g4.a = gm_op(dpre, 0, NULL, NULL, h2, 0, 1, 0, 0, h2);
    g4.b = gm_op(w1, (long long)in * h2, NULL, NULL, h2, 0, 1, 0, 0, h2);
    g4.N = in;
    g4.K = h2;
    g4.c = dxa;
    g4.ldc = in;
    g4.clist = s.perm_a;
    gm_launch(&g4, nk, (int)ceil_div_u(in, GM_BN));
    const size_t nx = (size_t)N * in;
    combine_dx_kernel<<<ceil_div_u(nx, 256), 256, 0, st>>>(dx, dxa, N, k, in);
    LAUNCH_CHECK();

    /* dw2[e] += (gate act)^T dy over the expert's tokens */
    gm_args g5 = gm_args_init(GM_WGRAD, EPI_ACCUM, &s, E);
    g5.a = gm_op(save, 0, s.perm_a, gate, h3, h2, 0, 0, h, 0);
    g5.b = gm_op(dy, 0, s.perm_tok, NULL, out, 0, 0, 0, out, 0);
    g5.M = h;
    g5.N = out;
    g5.c = dw2;
    g5.ldc = out;
    g5.cestride = (long long)h * out;
    gm_launch(&g5, nk, 0);

    /* dw1[e] += x^T dpre over the expert's tokens */
    gm_args g6 = gm_args_init(GM_WGRAD, EPI_ACCUM, &s, E);
    g6.a = gm_op(x, 0, s.perm_tok, NULL, in, 0, 0, 0, in, 0);
    g6.b = gm_op(dpre, 0, NULL, NULL, h2, 0, 0, 0, h2, 0);
    g6.M = in;
    g6.N = h2;
    g6.c = dw1;
    g6.ldc = h2;
    g6.cestride = (long long)in * h2;
    gm_launch(&g6, nk, 0);
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
