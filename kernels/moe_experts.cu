/* moe_experts.cu: the routed SwiGLU experts of the CUDA backend (MODEL.md section 5),
 * forward and backward, with exactly the contracts and saved layouts of
 * src/cpu/cpu_moe.c (the oracle). The router is in moe_route.cu.
 *
 * Experts. The N*k (token, slot) assignments are sorted by expert with a stable counting
 * sort: per chunk of 1024 assignments a histogram, an exclusive scan over chunks per
 * expert and over experts, then placement in (token, slot) order inside each chunk (warp
 * match + per-warp counts). The routed rows (x, dy) are then gathered once into expert-
 * sorted bf16 buffers and the expert weights converted to bf16 once per call (w1 with
 * the forward's [g | u] column interleave), every row padded to a multiple of 8 elements
 * with zeros, so that the GEMMs read only contiguous, aligned bf16. The expert GEMMs are
 * one grouped GEMM kernel (moe_gemm.cu) that reads the per-expert offsets from device
 * memory: no host synchronisation, so the op can be captured in a CUDA graph. It runs
 * bf16 tensor-core mma.sync (m16n8k16, fp32 accumulate) on 128x128x64 tiles fed by a
 * 3-stage cp.async ring and ldmatrix (.trans for operands stored r-contiguous). Two
 * shapes: "rows" (M = the tokens of one expert, the forward and the input-side backward)
 * and "weight gradient" (K = the tokens of one expert, one block per output tile of one
 * expert, so every dw element is one thread's sum in a fixed order). Epilogues do the
 * rest: the output tile is parked in shared memory and written row by row with wide
 * coalesced accesses. The first forward GEMM writes [g | u] of save in (token, slot)
 * order (the CPU's layout, [g | u | silu(g) u] per assignment, whose third part CUDA
 * leaves unwritten: the backward recomputes silu(g) u from g and u with the forward's
 * expression, and 200 MB a layer at moe-1b's shapes are neither written nor read) and
 * act (bf16, sorted order) for the second; the first backward GEMM (w2 dy) applies the
 * SwiGLU backward, writes dpre and gate act (bf16, sorted order: the operands of the
 * later GEMMs, which round them to bf16 anyway) and per-tile partial dot products for
 * dgate. Outputs per assignment go to (token, slot)-ordered
 * buffers and are combined per token in slot order, so every result is deterministic.
 * Operands are rounded to bf16, so results differ from the fp32 oracle by about 2e-3 to
 * 5e-3 relative (norm of the difference over norm of the result); the pre-activations in
 * save are the fp32 accumulators.
 */
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "cuda_common.cuh"
#include "moe_gemm.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define FULL_MASK 0xffffffffu

/* ---- sort ---- */
#define SORT_THREADS 256
#define SORT_WARPS (SORT_THREADS / 32)
#define SORT_CHUNK 1024
#define SORT_MAX_E 1024 /* shared memory of the placement kernel: 9 E ints */

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

    /* [g | u] = x w1[e] into save per assignment, act = silu(g) u in sorted order */
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
    moe_gemm_launch(&g1, nk);

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
    moe_gemm_launch(&g2, nk);

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
    moe_gemm_launch(&g3, nk);
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
    moe_gemm_launch(&g4, nk);
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
    moe_gemm_launch(&g5, nk);

    /* dw1[e] += x^T dpre over the expert's tokens */
    gm_args g6 = gm_args_init(GM_WGRAD, EPI_ACCUM, &s, E);
    g6.a = gm_op(xs, 0, 1, inP, 1, inP);
    g6.b = gm_op(dpre, 0, 1, h2P, 1, h2P);
    g6.M = in;
    g6.N = h2;
    g6.c = dw1;
    g6.ldc = h2;
    g6.cestride = (long long)in * h2;
    moe_gemm_launch(&g6, nk);
}
