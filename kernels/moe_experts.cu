/* moe_experts.cu: the routed SwiGLU experts of the CUDA backend (MODEL.md section 5),
 * forward and backward, with exactly the contracts and saved layouts of
 * src/cpu/cpu_moe.c (the oracle). The router is in moe_route.cu.
 *
 * Experts. The N*k (token, slot) assignments are sorted by expert with a stable counting
 * sort: per chunk of 1024 assignments a histogram, an exclusive scan over chunks per
 * expert and over experts, then placement in (token, slot) order inside each chunk
 * (warp match + per-warp counts). The routed rows (x, dy) are then gathered once into
 * expert-sorted bf16 buffers and the expert weights converted to bf16 once per call (w1
 * with the forward's [g | u] column interleave), every row padded to a multiple of 8
 * elements with zeros, so that the GEMMs read only contiguous, aligned bf16. The expert
 * GEMMs are one grouped GEMM kernel that reads the per-expert offsets from device memory:
 * no host synchronisation, so the op can be captured in a CUDA graph. It runs bf16
 * tensor-core mma.sync (m16n8k16, fp32 accumulate) on 128x128x64 tiles fed by a 3-stage
 * cp.async ring and ldmatrix (.trans for operands stored r-contiguous). Two shapes: "rows"
 * (M = the tokens of one expert, the forward and the input-side backward) and "weight
 * gradient" (K = the tokens of one expert, one block per output tile of one expert, so
 * every dw element is one thread's sum in a fixed order). Epilogues do the rest: the
 * output tile is parked in shared memory and written row by row with wide coalesced
 * accesses. The first forward GEMM writes save = [g | u | silu(g) u] in (token, slot)
 * order and act (bf16, sorted order) for the second; the first backward GEMM (w2 dy)
 * applies the SwiGLU backward, writes dpre and gate act (bf16, sorted order: the operands
 * of the later GEMMs, which round them to bf16 anyway) and per-tile partial dot products
 * for dgate. Outputs per assignment go to (token, slot)-ordered buffers and are combined
 * per token in slot order, so every result is deterministic. Operands are rounded to
 * bf16, so results differ from the fp32 oracle by about 2e-3 to 5e-3 relative (norm of
 * the difference over norm of the result); the pre-activations in save are the fp32
 * accumulators.
 */
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define FULL_MASK 0xffffffffu

/* ---- sort ---- */
#define SORT_THREADS 256
#define SORT_WARPS (SORT_THREADS / 32)
#define SORT_CHUNK 1024
#define SORT_MAX_E 1024 /* shared memory of the placement kernel: 9 E ints */

/* ---- grouped GEMM ---- */
#define GM_BM 128
#define GM_BN 128
#define GM_BK 64     /* 64 and 3 stages measured ~1% faster than 32 and 4 */
#define GM_STAGES 3  /* 110.6 KB of shared memory: two blocks per SM */
#define GM_LDR (GM_BK + 8)       /* bf16 per shared row of a k-contiguous tile [128][BK] */
#define GM_LDK (GM_BM + 8)       /* bf16 per shared row of an r-contiguous tile [BK][128] */
#define GM_TILE (GM_BM * GM_LDR) /* bf16 per operand and stage (>= GM_BK * GM_LDK) */
#define GM_CHUNKS (GM_BM * GM_BK / 8 / GM_THREADS) /* 16-byte chunks per thread, operand and stage */
#define GM_SMEM (GM_STAGES * 2 * GM_TILE * (int)sizeof(__nv_bfloat16))
#define GM_LDC (GM_BN + 4)      /* floats per shared row of the parked output tile */
#define GM_THREADS 256 /* 8 warps: 2 along M x 4 along N, 64 x 32 outputs each */
/* the pads make ldmatrix rows (80 and 272 bytes apart) conflict-free */
static_assert(GM_BK * GM_LDK <= GM_TILE, "an r-contiguous tile fits a stage");
static_assert(GM_BM * GM_LDC * sizeof(float) <= GM_SMEM, "the parked output tile fits the operand ring");

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
        for (int b0 = 0; b0 < nchunks; b0 += 8) { /* 8 loads in flight, not one */
            int v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) v[u] = b0 + u < nchunks ? hist[(size_t)(b0 + u) * E + e] : 0;
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (b0 + u < nchunks) {
                    hist[(size_t)(b0 + u) * E + e] = run;
                    run += v[u];
                }
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
 * Every operand is a bf16 buffer prepared for this kernel (routed rows gathered into
 * expert-sorted order, weights converted once per call), with rows padded to a multiple
 * of 8 elements and zeros in the padding, so every 16-byte chunk is aligned and entirely
 * valid or entirely masked. Tiles travel by cp.async through a GM_STAGES-deep ring in
 * dynamic shared memory and reach the mma fragments by ldmatrix. An operand is either
 *   k-contiguous (kmajor 0): element (r, k) at src[(r0 + r) * ld + k], a [128][32] tile;
 *   r-contiguous (kmajor 1): element (r, k) at src[k * ld + r0 + r], a [32][128] tile,
 *                            read with ldmatrix .trans;
 * src is the expert's matrix (weights) or the expert's first sorted row (activations). */

enum { GM_ROWS = 0, GM_WGRAD = 1 };
enum { EPI_SWIGLU = 0, EPI_SCATTER = 1, EPI_SWIGLU_BWD = 2, EPI_ACCUM = 3 };

typedef struct gm_operand {
    const __nv_bfloat16 *base; /* expert 0's matrix, or the sorted activation buffer */
    long long estride;         /* elements between experts' matrices */
    int act;                   /* 1: rows start at the expert's first sorted position */
    int ld;                    /* elements per source row, a multiple of 8 */
    int kmajor;                /* see above */
    int ext;                   /* extent of the contiguous dimension: a multiple of 8, zeros past
                                * the true size */
} gm_operand;

typedef struct gm_args {
    gm_operand a, b;
    int shape, epi;
    int E, M, N, K;     /* GM_ROWS: N, K (M = the expert's count); GM_WGRAD: M, N (K = count) */
    int ctiles;         /* GM_ROWS: column tiles */
    const int *cnt, *off, *toff;
    float *c;           /* EPI_SCATTER: rows clist[pos]; EPI_ACCUM: expert e at c + e * cestride */
    int ldc, cvec;      /* cvec: EPI_SCATTER rows take float4 stores */
    long long cestride;
    const int *clist;   /* sorted position -> assignment */
    int h;              /* expert hidden width (SwiGLU epilogues) */
    float *save_out;    /* EPI_SWIGLU */
    __nv_bfloat16 *act_out; /* EPI_SWIGLU: act [pos][ld_act]; EPI_SWIGLU_BWD: gate act */
    int ld_act;
    const float *save_in, *gate; /* EPI_SWIGLU_BWD */
    __nv_bfloat16 *dpre;         /* EPI_SWIGLU_BWD: [pos][ld_dpre] */
    int ld_dpre;
    float *part;
} gm_args;

static __device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* four 8x8 bf16 matrices; lanes 8i..8i+7 address the rows of matrix i */
static __device__ __forceinline__ void ldsm4(uint32_t r[4], const __nv_bfloat16 *p, int trans)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s));
}

/* 16 bytes global -> shared, or 16 zero bytes when !ok (nothing is read then) */
static __device__ __forceinline__ void cp_async16(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int ok)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
}

static __device__ __forceinline__ void cp_async_commit(void) { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/* the tile of k0 for columns/rows from r0 (rlim valid rows, k-contiguous only; K valid k,
 * r-contiguous only) into T, in chunks of 8 bf16 */
static __device__ __forceinline__ void gm_load(__nv_bfloat16 *T, const gm_operand op, const __nv_bfloat16 *src,
                                               int r0, int rlim, int k0, int K)
{
#pragma unroll
    for (int i = 0; i < GM_CHUNKS; i++) {
        const int q = threadIdx.x + i * GM_THREADS;
        if (!op.kmajor) {
            const int r = q / (GM_BK / 8), c = (q % (GM_BK / 8)) * 8;
            const int ok = r < rlim && k0 + c < op.ext;
            cp_async16(T + r * GM_LDR + c, ok ? src + (long long)(r0 + r) * op.ld + k0 + c : src, ok);
        } else {
            const int kk = q / (GM_BM / 8), c = (q % (GM_BM / 8)) * 8;
            const int ok = k0 + kk < K && r0 + c < op.ext;
            cp_async16(T + kk * GM_LDK + c, ok ? src + (long long)(k0 + kk) * op.ld + r0 + c : src, ok);
        }
    }
}

/* GM_ROWS: block b is column tile b % ctiles of row tile b / ctiles in the concatenation
 * of the experts' row tiles (so the column tiles of a row tile run together and share its
 * A rows in L2; tiles past toff[E] exit). GM_WGRAD: blockIdx.y is the expert, blockIdx.x
 * its (M, N) output tile; experts without tokens exit. */
static __global__ void __launch_bounds__(GM_THREADS, 2) grouped_gemm_kernel(const gm_args g)
{
    extern __shared__ __align__(16) __nv_bfloat16 gm_smem[]; /* [GM_STAGES][A tile, B tile] */

    const int tid = threadIdx.x;
    int e, m0, n0, Mlim, Nlim, K, ctile = 0;
    if (g.shape == GM_ROWS) {
        ctile = blockIdx.x % g.ctiles;
        const int t = blockIdx.x / g.ctiles;
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
        n0 = ctile * GM_BN;
        Nlim = g.N - n0;
        K = g.K;
    } else {
        e = blockIdx.y;
        K = g.cnt[e];
        if (K == 0) return;
        const int tm = (g.M + GM_BM - 1) / GM_BM;
        m0 = (blockIdx.x % tm) * GM_BM;
        n0 = (blockIdx.x / tm) * GM_BN;
        Mlim = g.M - m0;
        Nlim = g.N - n0;
    }
    const int base = g.off[e];
    const __nv_bfloat16 *srcA = g.a.base + (g.a.act ? (long long)base * g.a.ld : (long long)e * g.a.estride);
    const __nv_bfloat16 *srcB = g.b.base + (g.b.act ? (long long)base * g.b.ld : (long long)e * g.b.estride);
    const int rA = m0, rB = n0; /* first row (k-contiguous) or column (r-contiguous) */
    const int nk = (K + GM_BK - 1) / GM_BK;

#define GM_A(s) (gm_smem + (s) * 2 * GM_TILE)
#define GM_B(s) (gm_smem + (s) * 2 * GM_TILE + GM_TILE)
#pragma unroll
    for (int s = 0; s < GM_STAGES - 1; s++) {
        if (s < nk) {
            gm_load(GM_A(s), g.a, srcA, rA, Mlim, s * GM_BK, K);
            gm_load(GM_B(s), g.b, srcB, rB, Nlim, s * GM_BK, K);
        }
        cp_async_commit();
    }

    const int warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tq = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    /* per-lane ldmatrix offsets (see the fragment layouts of m16n8k16: A (row g | g+8,
     * k 2q..2q+1 | +8), B (n g, k 2q..2q+1 | +8), C (row g | g+8, n 2q..2q+1)) */
    int offA, stepA_m, stepA_k, offB, stepB_n, stepB_k;
    if (!g.a.kmajor) {
        offA = (wm * 64 + (lane & 15)) * GM_LDR + (lane >> 4) * 8;
        stepA_m = 16 * GM_LDR;
        stepA_k = 16;
    } else {
        offA = ((lane & 7) + (lane >> 4) * 8) * GM_LDK + wm * 64 + ((lane >> 3) & 1) * 8;
        stepA_m = 16;
        stepA_k = 16 * GM_LDK;
    }
    if (!g.b.kmajor) {
        offB = (wn * 32 + (lane & 7) + (lane >> 4) * 8) * GM_LDR + ((lane >> 3) & 1) * 8;
        stepB_n = 16 * GM_LDR;
        stepB_k = 16;
    } else {
        offB = ((lane & 7) + ((lane >> 3) & 1) * 8) * GM_LDK + wn * 32 + (lane >> 4) * 8;
        stepB_n = 16;
        stepB_k = 16 * GM_LDK;
    }

    float acc[4][4][4];
#pragma unroll
    for (int mf = 0; mf < 4; mf++)
#pragma unroll
        for (int nf = 0; nf < 4; nf++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mf][nf][c] = 0.f;

    for (int kt = 0; kt < nk; kt++) {
        /* tile kt has landed (at most GM_STAGES - 2 younger groups pending), and every warp
         * is done with tile kt - 1, whose slot the prefetch below overwrites */
        asm volatile("cp.async.wait_group %0;\n" ::"n"(GM_STAGES - 2) : "memory");
        __syncthreads();
        const int pf = kt + GM_STAGES - 1;
        if (pf < nk) {
            const int s = pf % GM_STAGES;
            gm_load(GM_A(s), g.a, srcA, rA, Mlim, pf * GM_BK, K);
            gm_load(GM_B(s), g.b, srcB, rB, Nlim, pf * GM_BK, K);
        }
        cp_async_commit();
        const __nv_bfloat16 *As = GM_A(kt % GM_STAGES) + offA;
        const __nv_bfloat16 *Bs = GM_B(kt % GM_STAGES) + offB;
#pragma unroll
        for (int ks = 0; ks < GM_BK / 16; ks++) {
            uint32_t bf[4][2];
#pragma unroll
            for (int p = 0; p < 2; p++) {
                uint32_t r[4];
                ldsm4(r, Bs + ks * stepB_k + p * stepB_n, g.b.kmajor);
                bf[2 * p][0] = r[0];
                bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2];
                bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mf = 0; mf < 4; mf++) {
                uint32_t af[4];
                ldsm4(af, As + ks * stepA_k + mf * stepA_m, g.a.kmajor);
#pragma unroll
                for (int nf = 0; nf < 4; nf++) mma_bf16(acc[mf][nf], af, bf[nf]);
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#undef GM_A
#undef GM_B

    /* thread element (mf, nf, c) is tile row wm*64 + mf*16 + gid + 8*(c/2), tile column
     * wn*32 + nf*8 + 2*tq + c%2. Row-wise epilogues first park the tile in shared memory
     * (over the drained operand ring) so that each warp then reads and writes whole rows
     * with wide coalesced accesses; a warp owns rows warp, warp + 8, ... */
    if (g.epi != EPI_ACCUM) {
        float *C = (float *)gm_smem; /* [GM_BM][GM_LDC] */
        __syncthreads();
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int nf = 0; nf < 4; nf++)
#pragma unroll
                for (int half = 0; half < 2; half++)
                    *(float2 *)&C[(wm * 64 + mf * 16 + half * 8 + gid) * GM_LDC + wn * 32 + nf * 8 + 2 * tq] =
                        make_float2(acc[mf][nf][2 * half], acc[mf][nf][2 * half + 1]);
        __syncthreads();
        const int rows = Mlim < GM_BM ? Mlim : GM_BM;
        if (g.epi == EPI_SWIGLU) {
            /* tile column j holds unit ctile*64 + (j/16)*8 + j%8, of u when (j/8) is odd;
             * lane l takes units t = 2l, 2l+1 of the tile's 64 */
            const int h = g.h, t = 2 * lane;
            const int unit = ctile * (GM_BN / 2) + t;
            const int jg = (t >> 3) * 16 + (t & 7);
            for (int rr = warp; rr < rows; rr += GM_THREADS / 32) {
                const int p = base + m0 + rr;
                const float2 gv = *(const float2 *)&C[rr * GM_LDC + jg];
                const float2 uv = *(const float2 *)&C[rr * GM_LDC + jg + 8];
                const float a0 = gv.x / (1.f + expf(-gv.x)) * uv.x, a1 = gv.y / (1.f + expf(-gv.y)) * uv.y;
                float *sv = g.save_out + (long long)g.clist[p] * 3 * h;
                __nv_bfloat16 *av = g.act_out + (long long)p * g.ld_act;
                if ((h & 1) == 0 && unit + 1 < h) {
                    *(float2 *)(sv + unit) = gv;
                    *(float2 *)(sv + h + unit) = uv;
                    *(float2 *)(sv + 2 * h + unit) = make_float2(a0, a1);
                    *(__nv_bfloat162 *)(av + unit) = __floats2bfloat162_rn(a0, a1);
                } else {
                    if (unit < h) {
                        sv[unit] = gv.x;
                        sv[h + unit] = uv.x;
                        sv[2 * h + unit] = a0;
                        av[unit] = __float2bfloat16_rn(a0);
                    }
                    if (unit + 1 < h) {
                        sv[unit + 1] = gv.y;
                        sv[h + unit + 1] = uv.y;
                        sv[2 * h + unit + 1] = a1;
                        av[unit + 1] = __float2bfloat16_rn(a1);
                    }
                }
            }
        } else if (g.epi == EPI_SCATTER) {
            const int j = 4 * lane, n = n0 + j;
            for (int rr = warp; rr < rows; rr += GM_THREADS / 32) {
                const float4 v = *(const float4 *)&C[rr * GM_LDC + j];
                float *crow = g.c + (long long)g.clist[base + m0 + rr] * g.ldc;
                if (g.cvec && n + 3 < g.N) {
                    *(float4 *)(crow + n) = v;
                } else {
                    if (n < g.N) crow[n] = v.x;
                    if (n + 1 < g.N) crow[n + 1] = v.y;
                    if (n + 2 < g.N) crow[n + 2] = v.z;
                    if (n + 3 < g.N) crow[n + 3] = v.w;
                }
            }
        } else { /* EPI_SWIGLU_BWD */
            /* C = da0 = w2 dy for hidden units n0 + j; dpre = the SwiGLU adjoint scaled by
             * the gate, act_out = gate act (the A operand of dw2); the row's act . da0 over
             * this tile (lane partials of 4, then a fixed butterfly) goes to
             * part[pos][ctile] */
            const int h = g.h, j = 4 * lane, m = n0 + j;
            for (int rr = warp; rr < rows; rr += GM_THREADS / 32) {
                const int p = base + m0 + rr;
                const int a = g.clist[p];
                const float gt = g.gate[a];
                const float *sv = g.save_in + (long long)a * 3 * h;
                __nv_bfloat16 *dp = g.dpre + (long long)p * g.ld_dpre;
                __nv_bfloat16 *av = g.act_out + (long long)p * g.ld_act;
                const float4 d4 = *(const float4 *)&C[rr * GM_LDC + j];
                const float d0[4] = {d4.x, d4.y, d4.z, d4.w};
                float gg[4], uu[4], aa[4], dg[4], du[4];
                const int nv = h - m < 4 ? h - m : 4; /* valid of the 4 (<= 0: none) */
                if ((h & 3) == 0 && nv == 4) {
                    const float4 g4 = *(const float4 *)(sv + m), u4 = *(const float4 *)(sv + h + m),
                                 a4 = *(const float4 *)(sv + 2 * h + m);
                    gg[0] = g4.x, gg[1] = g4.y, gg[2] = g4.z, gg[3] = g4.w;
                    uu[0] = u4.x, uu[1] = u4.y, uu[2] = u4.z, uu[3] = u4.w;
                    aa[0] = a4.x, aa[1] = a4.y, aa[2] = a4.z, aa[3] = a4.w;
                } else {
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        gg[u] = u < nv ? sv[m + u] : 0.f;
                        uu[u] = u < nv ? sv[h + m + u] : 0.f;
                        aa[u] = u < nv ? sv[2 * h + m + u] : 0.f;
                    }
                }
                float dot = 0.f;
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const float sg = 1.f / (1.f + expf(-gg[u]));
                    const float da = gt * d0[u];
                    dg[u] = da * uu[u] * sg * (1.f + gg[u] * (1.f - sg));
                    du[u] = da * gg[u] * sg;
                    dot += aa[u] * d0[u];
                }
                if ((h & 3) == 0 && nv == 4) {
                    uint2 w;
                    __nv_bfloat162 b;
                    b = __floats2bfloat162_rn(dg[0], dg[1]);
                    memcpy(&w.x, &b, 4);
                    b = __floats2bfloat162_rn(dg[2], dg[3]);
                    memcpy(&w.y, &b, 4);
                    *(uint2 *)(dp + m) = w;
                    b = __floats2bfloat162_rn(du[0], du[1]);
                    memcpy(&w.x, &b, 4);
                    b = __floats2bfloat162_rn(du[2], du[3]);
                    memcpy(&w.y, &b, 4);
                    *(uint2 *)(dp + h + m) = w;
                    b = __floats2bfloat162_rn(aa[0] * gt, aa[1] * gt);
                    memcpy(&w.x, &b, 4);
                    b = __floats2bfloat162_rn(aa[2] * gt, aa[3] * gt);
                    memcpy(&w.y, &b, 4);
                    *(uint2 *)(av + m) = w;
                } else {
#pragma unroll
                    for (int u = 0; u < 4; u++)
                        if (u < nv) {
                            dp[m + u] = __float2bfloat16_rn(dg[u]);
                            dp[h + m + u] = __float2bfloat16_rn(du[u]);
                            av[m + u] = __float2bfloat16_rn(aa[u] * gt);
                        }
                }
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL_MASK, dot, o);
                if (lane == 0) g.part[(long long)p * g.ctiles + ctile] = dot;
            }
        }
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

/* ---- operand preparation: bf16, rows padded to ldd (a multiple of 8) with zeros ---- */

/* dst[p][c] = bf16(src[rows ? rows[p] : p][c]) for c < ncols, 0 for ncols <= c < ldd;
 * one thread per 8 output columns (vec: src rows 16-byte aligned, ncols % 8 == 0) */
static __global__ void gather_bf16_kernel(__nv_bfloat16 *dst, int ldd, const float *src, int lds, const int *rows,
                                          size_t nrows, int ncols, int vec)
{
    const int cpr = ldd / 8;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nrows * cpr) return;
    const size_t p = t / cpr;
    const int c0 = (int)(t % cpr) * 8;
    const float *s = src + (rows ? (size_t)rows[p] : p) * lds + c0;
    float v[8];
    if (vec) {
        const float4 x0 = *(const float4 *)s, x1 = *(const float4 *)(s + 4);
        v[0] = x0.x, v[1] = x0.y, v[2] = x0.z, v[3] = x0.w;
        v[4] = x1.x, v[5] = x1.y, v[6] = x1.z, v[7] = x1.w;
    } else {
#pragma unroll
        for (int u = 0; u < 8; u++) v[u] = c0 + u < ncols ? s[u] : 0.f;
    }
    uint4 w;
    __nv_bfloat162 b;
    b = __floats2bfloat162_rn(v[0], v[1]);
    memcpy(&w.x, &b, 4);
    b = __floats2bfloat162_rn(v[2], v[3]);
    memcpy(&w.y, &b, 4);
    b = __floats2bfloat162_rn(v[4], v[5]);
    memcpy(&w.z, &b, 4);
    b = __floats2bfloat162_rn(v[6], v[7]);
    memcpy(&w.w, &b, 4);
    *(uint4 *)(dst + p * ldd + c0) = w;
}

/* w1 [E][in][2h] -> dst [E][in][ldd], columns in the forward GEMM's [g | u] interleave:
 * column n of column tile n / 128, r = n % 128, is unit (n / 128) * 64 + (r / 16) * 8 + r % 8,
 * of u when (r / 8) is odd; units past h are zeros */
static __global__ void w1_interleave_kernel(__nv_bfloat16 *dst, int ldd, const float *w1, size_t rows, int h)
{
    const int cpr = ldd / 8; /* 8 columns of a chunk are 8 consecutive units of one half */
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * cpr) return;
    const size_t row = t / cpr;
    const int n = (int)(t % cpr) * 8, r = n % GM_BN;
    const int unit = (n / GM_BN) * (GM_BN / 2) + (r >> 4) * 8;
    const float *src = w1 + row * 2 * h + unit + (((r >> 3) & 1) ? h : 0);
    uint32_t w[4];
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const __nv_bfloat162 b = __floats2bfloat162_rn(unit + 2 * u < h ? src[2 * u] : 0.f,
                                                       unit + 2 * u + 1 < h ? src[2 * u + 1] : 0.f);
        memcpy(&w[u], &b, 4);
    }
    *(uint4 *)(dst + row * ldd + n) = make_uint4(w[0], w[1], w[2], w[3]);
}

/* p[r][c] = 0 for c0 <= c < ld: the padding of buffers that epilogues fill */
static __global__ void zero_pad_kernel(__nv_bfloat16 *p, int ld, int c0, size_t rows)
{
    const int w = ld - c0;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * w) return;
    p[(t / w) * ld + c0 + (int)(t % w)] = __float2bfloat16_rn(0.f);
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

static int pad8(int n) { return (n + 7) & ~7; }

/* dst [nrows][ldd] = bf16 of the rows of src (rows: a row list or NULL), zero-padded */
static void gather_bf16(__nv_bfloat16 *dst, int ldd, const float *src, int lds, const int *rows, size_t nrows,
                        int ncols)
{
    const int vec = ncols % 8 == 0 && ldd == ncols && lds % 4 == 0 && cuda_aligned16(src);
    const size_t n = nrows * (size_t)(ldd / 8);
    gather_bf16_kernel<<<ceil_div_u(n, 256), 256, 0, cuda_stream()>>>(dst, ldd, src, lds, rows, nrows, ncols, vec);
    LAUNCH_CHECK();
}

static void zero_pad(__nv_bfloat16 *p, int ld, int c0, size_t rows)
{
    if (c0 >= ld) return;
    zero_pad_kernel<<<ceil_div_u(rows * (size_t)(ld - c0), 256), 256, 0, cuda_stream()>>>(p, ld, c0, rows);
    LAUNCH_CHECK();
}

/* carves n bf16 from *cur */
static __nv_bfloat16 *carve_bf16(char **cur, size_t n)
{
    __nv_bfloat16 *p = (__nv_bfloat16 *)*cur;
    *cur += align256(n * sizeof(__nv_bfloat16));
    return p;
}

static gm_operand gm_op(const __nv_bfloat16 *base, long long estride, int act, int ld, int kmajor, int ext)
{
    gm_operand op;
    op.base = base;
    op.estride = estride;
    op.act = act;
    op.ld = ld;
    op.kmajor = kmajor;
    op.ext = ext;
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

/* GM_ROWS: 1-D grid of (upper bound on row tiles) x ctiles; GM_WGRAD: (output tiles, E) */
static void gm_launch(const gm_args *g, int nk)
{
    static int attr_set;
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, GM_SMEM));
        attr_set = 1;
    }
    dim3 grid;
    if (g->shape == GM_ROWS)
        grid = dim3((unsigned)(((size_t)(nk + GM_BM - 1) / GM_BM + g->E) * g->ctiles));
    else
        grid = dim3(ceil_div_u(g->M, GM_BM) * ceil_div_u(g->N, GM_BN), (unsigned)g->E);
    grouped_gemm_kernel<<<grid, GM_THREADS, GM_SMEM, cuda_stream()>>>(*g);
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

/* Scratch: the sort; x gathered in sorted order xs [nk][inP] (bf16, as are the next three);
 * w1 with interleaved columns [E][in][np1]; w2 [E][h][outP]; act in sorted order [nk][hP];
 * o [nk][out] fp32 in (token, slot) order. */
extern "C" void cuda_moe_experts_forward(float *y, float *save, const float *x, const int32_t *idx,
                                         const float *gate, const float *w1, const float *w2,
                                         int N, int E, int k, int in, int h, int out)
{
    moe_check_shapes("cuda_moe_experts_forward", N, E, k, in, h, out);
    const int nk = N * k, inP = pad8(in), hP = pad8(h), outP = pad8(out);
    const int ct1 = (int)ceil_div_u(h, GM_BN / 2), np1 = ct1 * GM_BN;
    const size_t b16 = sizeof(__nv_bfloat16);
    char *cur = (char *)cuda_scratch(moe_sort_bytes(nk, E) + align256((size_t)nk * out * sizeof(float)) +
                                     align256((size_t)nk * inP * b16) + align256((size_t)nk * hP * b16) +
                                     align256((size_t)E * in * np1 * b16) + align256((size_t)E * h * outP * b16));
    moe_sort s;
    moe_sort_carve(&s, &cur, nk, E);
    float *obuf = (float *)cur;
    cur += align256((size_t)nk * out * sizeof(float));
    __nv_bfloat16 *xs = carve_bf16(&cur, (size_t)nk * inP);
    __nv_bfloat16 *actb = carve_bf16(&cur, (size_t)nk * hP);
    __nv_bfloat16 *w1i = carve_bf16(&cur, (size_t)E * in * np1);
    __nv_bfloat16 *w2b = carve_bf16(&cur, (size_t)E * h * outP);
    cudaStream_t st = cuda_stream();
    moe_sort_run(&s, idx, nk, k, E);
    gather_bf16(xs, inP, x, in, s.perm_tok, (size_t)nk, in);
    w1_interleave_kernel<<<ceil_div_u((size_t)E * in * (np1 / 8), 256), 256, 0, st>>>(w1i, np1, w1, (size_t)E * in, h);
    LAUNCH_CHECK();
    gather_bf16(w2b, outP, w2, out, NULL, (size_t)E * h, out);
    zero_pad(actb, hP, h, (size_t)nk);

    /* [g | u] = x w1[e], then save = [g | u | silu(g) u] per assignment, act in sorted order */
    gm_args g1 = gm_args_init(GM_ROWS, EPI_SWIGLU, &s, E);
    g1.a = gm_op(xs, 0, 1, inP, 0, inP);
    g1.b = gm_op(w1i, (long long)in * np1, 0, np1, 1, np1);
    g1.N = np1;
    g1.K = in;
    g1.ctiles = ct1;
    g1.clist = s.perm_a;
    g1.h = h;
    g1.save_out = save;
    g1.act_out = actb;
    g1.ld_act = hP;
    gm_launch(&g1, nk);

    /* o = act w2[e] */
    gm_args g2 = gm_args_init(GM_ROWS, EPI_SCATTER, &s, E);
    g2.a = gm_op(actb, 0, 1, hP, 0, hP);
    g2.b = gm_op(w2b, (long long)h * outP, 0, outP, 1, outP);
    g2.N = out;
    g2.K = h;
    g2.ctiles = (int)ceil_div_u(out, GM_BN);
    g2.c = obuf;
    g2.ldc = out;
    g2.cvec = out % 4 == 0;
    g2.clist = s.perm_a;
    gm_launch(&g2, nk);

    const size_t ny = (size_t)N * out;
    combine_forward_kernel<<<ceil_div_u(ny, 256), 256, 0, st>>>(y, obuf, gate, N, k, out);
    LAUNCH_CHECK();
}

/* Scratch: the sort; in sorted order (bf16) dpre [nk][h2P], dy [nk][outP], x [nk][inP] and
 * gate act [nk][hP]; w2 [E][h][outP] and w1 [E][in][h2P] in bf16; the dgate partials
 * [nk][h/128] and dxa [nk][in] ((token, slot) order) in fp32. */
extern "C" void cuda_moe_experts_backward(float *dx, float *dgate, float *dw1, float *dw2, const float *dy,
                                          const float *save, const float *x, const int32_t *idx,
                                          const float *gate, const float *w1, const float *w2,
                                          int N, int E, int k, int in, int h, int out)
{
    moe_check_shapes("cuda_moe_experts_backward", N, E, k, in, h, out);
    const int nk = N * k, h2 = 2 * h;
    const int inP = pad8(in), hP = pad8(h), outP = pad8(out), h2P = pad8(h2);
    const int nparts = (int)ceil_div_u(h, GM_BN);
    const size_t b16 = sizeof(__nv_bfloat16);
    char *cur = (char *)cuda_scratch(
        moe_sort_bytes(nk, E) + align256((size_t)nk * h2P * b16) + align256((size_t)nk * nparts * sizeof(float)) +
        align256((size_t)nk * in * sizeof(float)) + align256((size_t)nk * inP * b16) +
        align256((size_t)nk * outP * b16) + align256((size_t)nk * hP * b16) + align256((size_t)E * h * outP * b16) +
        align256((size_t)E * in * h2P * b16));
    moe_sort s;
    moe_sort_carve(&s, &cur, nk, E);
    __nv_bfloat16 *dpre = carve_bf16(&cur, (size_t)nk * h2P);
    float *part = (float *)cur;
    cur += align256((size_t)nk * nparts * sizeof(float));
    float *dxa = (float *)cur;
    cur += align256((size_t)nk * in * sizeof(float));
    __nv_bfloat16 *xs = carve_bf16(&cur, (size_t)nk * inP);
    __nv_bfloat16 *dys = carve_bf16(&cur, (size_t)nk * outP);
    __nv_bfloat16 *gact = carve_bf16(&cur, (size_t)nk * hP);
    __nv_bfloat16 *w2b = carve_bf16(&cur, (size_t)E * h * outP);
    __nv_bfloat16 *w1b = carve_bf16(&cur, (size_t)E * in * h2P);
    cudaStream_t st = cuda_stream();
    moe_sort_run(&s, idx, nk, k, E);
    gather_bf16(dys, outP, dy, out, s.perm_tok, (size_t)nk, out);
    gather_bf16(xs, inP, x, in, s.perm_tok, (size_t)nk, in);
    gather_bf16(w2b, outP, w2, out, NULL, (size_t)E * h, out);
    gather_bf16(w1b, h2P, w1, h2, NULL, (size_t)E * in, h2);
    zero_pad(dpre, h2P, h2, (size_t)nk);
    zero_pad(gact, hP, h, (size_t)nk);

    /* da0 = dy w2[e]^T -> dpre (SwiGLU backward, times the gate), gate act, dgate partials */
    gm_args g3 = gm_args_init(GM_ROWS, EPI_SWIGLU_BWD, &s, E);
    g3.a = gm_op(dys, 0, 1, outP, 0, outP);
    g3.b = gm_op(w2b, (long long)h * outP, 0, outP, 0, outP);
    g3.N = h;
    g3.K = out;
    g3.ctiles = nparts;
    g3.clist = s.perm_a;
    g3.h = h;
    g3.save_in = save;
    g3.gate = gate;
    g3.dpre = dpre;
    g3.ld_dpre = h2P;
    g3.act_out = gact;
    g3.ld_act = hP;
    g3.part = part;
    gm_launch(&g3, nk);
    dgate_finish_kernel<<<ceil_div_u(nk, 256), 256, 0, st>>>(dgate, part, s.perm_a, nk, nparts);
    LAUNCH_CHECK();

    /* dxa = dpre w1[e]^T, then dx += per-token sums */
    gm_args g4 = gm_args_init(GM_ROWS, EPI_SCATTER, &s, E);
    g4.a = gm_op(dpre, 0, 1, h2P, 0, h2P);
    g4.b = gm_op(w1b, (long long)in * h2P, 0, h2P, 0, h2P);
    g4.N = in;
    g4.K = h2;
    g4.ctiles = (int)ceil_div_u(in, GM_BN);
    g4.c = dxa;
    g4.ldc = in;
    g4.cvec = in % 4 == 0;
    g4.clist = s.perm_a;
    gm_launch(&g4, nk);
    const size_t nx = (size_t)N * in;
    combine_dx_kernel<<<ceil_div_u(nx, 256), 256, 0, st>>>(dx, dxa, N, k, in);
    LAUNCH_CHECK();

    /* dw2[e] += (gate act)^T dy over the expert's tokens */
    gm_args g5 = gm_args_init(GM_WGRAD, EPI_ACCUM, &s, E);
    g5.a = gm_op(gact, 0, 1, hP, 1, hP);
    g5.b = gm_op(dys, 0, 1, outP, 1, outP);
    g5.M = h;
    g5.N = out;
    g5.c = dw2;
    g5.ldc = out;
    g5.cestride = (long long)h * out;
    gm_launch(&g5, nk);

    /* dw1[e] += x^T dpre over the expert's tokens */
    gm_args g6 = gm_args_init(GM_WGRAD, EPI_ACCUM, &s, E);
    g6.a = gm_op(xs, 0, 1, inP, 1, inP);
    g6.b = gm_op(dpre, 0, 1, h2P, 1, h2P);
    g6.M = in;
    g6.N = h2;
    g6.c = dw1;
    g6.ldc = h2;
    g6.cestride = (long long)in * h2;
    gm_launch(&g6, nk);
}
