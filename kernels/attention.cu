/* attention.cu: the CUDA twins of src/cpu/cpu_mla.c: the per-head assembly of MLA's
 * queries, keys and values with interleaved RoPE (mla_prep_*), and causal softmax
 * attention with optional document masking (attention_*), forward and backward.
 *
 * Precision. Attention runs on the tensor cores: bf16 mma.sync m16n8k16 with fp32
 * accumulation, softmax statistics, lse and D in fp32. The inputs stay fp32 in memory (the
 * op table is float); each op first converts q, k, v (and dout) once into bf16 copies in
 * the backend scratch, laid out [B, H, T, Dp] with Dp = D rounded up to 16 and the pad
 * columns zero, so that tiles are contiguous 16-byte rows that cp.async can stream. The
 * tolerance against the CPU (double inside) is the bf16 one, 1e-2 relative norm-wise;
 * the expected error is 2e-3 to 5e-3 (bf16 rounding of q, k, v, P, dout and dS; measured
 * with a numpy model of these kernels at the test shapes).
 * mla_prep is exact data movement plus a rotation computed in double, so it matches the
 * CPU to fp32 rounding (tolerance 1e-5).
 *
 * RoPE angles. The angle of pair j at position p is p * theta^(-2j/dr), up to 8191 rad
 * at T = 8192. In fp32 the angle alone carries an absolute error of half an ulp of 8192,
 * 5e-4 rad, and sinf/cosf turn that into a relative error of 5e-4 in the output, fifty
 * times the tolerance. So the angle, its cos and sin, and the rotation are computed in
 * double exactly as the CPU does (pow, sincos: both correctly rounded to about 1 ulp of
 * double), once per (token, pair) in shared memory and reused by every head; only the
 * final value is rounded to float. The double work is dr/2 sincos per token, negligible.
 *
 * Forward (one block of 4 warps per (b, h, 64 query rows); heaviest query tiles first):
 * each warp owns 16 query rows, keeps its Q fragments in registers and loops over key
 * tiles of 64 up to the diagonal, K/V tiles double-buffered in shared memory by cp.async.
 * S = Q K^T (ldmatrix for both operands), online softmax in fp32 registers with exp2 of
 * log2e-scaled scores, P converted in registers straight into the A fragments of
 * O += P V (V through ldmatrix.trans). The causal mask is applied on the diagonal tile
 * only; tiles below it are fully visible.
 *
 * Backward (FlashAttention-2 order, no atomics): D_t = dout_t . out_t per row; then
 *   dkdv: one block of 8 warps per (b, h, 64 keys), looping over the query tiles from the
 *         diagonal on (Q, dO, lse, D double-buffered). Phase 1: the 8 warps (4 row blocks
 *         x 2 key halves) compute S and dP = dO V^T for the 64x64 tile, then
 *         P = exp(S - lse) and dS = P (dP - D), stored to shared memory as bf16. Phase 2:
 *         each warp owns 16 keys x half of the columns and accumulates dV += P^T dO and
 *         dK += dS^T Q in registers (P^T and dS^T read with ldmatrix.trans).
 *   dq:   one block of 8 warps per (b, h, 64 queries), looping over key tiles up to the
 *         diagonal: the same phase 1, then dQ += dS K.
 * Every gradient element is owned by one thread, accumulated in a fixed loop order and
 * added once to the caller's buffer, so two runs give bit-identical results. The scale of
 * dK and dQ is applied with explicit round-to-nearest multiply then add (no fused
 * multiply-add), so that accumulating onto zero and then onto that result gives exactly
 * twice the first result.
 *
 * Document masking: key s is visible to query t iff s <= t and doc_id[s] == doc_id[t].
 * Inside a tile the mask is applied per element. Whole tiles are skipped when the ranges
 * [min, max] of the document ids of the two tiles do not meet: never wrong for any ids,
 * and exact for packed documents (ids increasing along the row). A query that sees no
 * key (impossible here, since each query sees itself) would get out = 0 and lse = -inf.
 *
 * Limits: Dk <= 192 and Dv <= 128 (the model's 128 + 64 and 128; register tiles are
 * sized for that), checked with a message.
 */
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

typedef __nv_bfloat16 bf16;

#define ATT_TILE 64                     /* query rows per block tile and keys per key tile */
#define ATT_DK_MAX 192
#define ATT_DV_MAX 128
#define ATT_KSTEPS (ATT_DK_MAX / 16)    /* 16-wide column blocks of q/k */
#define ATT_VSTEPS (ATT_DV_MAX / 16)    /* 16-wide column blocks of v/out */
#define ATT_PP (ATT_TILE + 8)           /* pitch (bf16) of the shared 64x64 P and dS tiles */
#define FWD_THREADS 128                 /* 4 warps x 16 query rows */
#define BWD_THREADS 256                 /* 8 warps */
#define CVT_THREADS 256
#define PREP_THREADS 128
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.69314718055994531f

/* ------------------------------------------------------------------ mla_prep ---- */

/* cos (rot[j]) and sin (rot[half + j]) of pair j's angle at token i's position, in double
 * as the CPU computes them. */
static __device__ void rope_table(double *rot, const int32_t *pos, int i, int T, int dr, double theta)
{
    const int half = dr / 2;
    const double p = pos ? (double)pos[i] : (double)(i % T);
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s, c;
        sincos(p * pow(theta, -2.0 * j / dr), &s, &c);
        rot[j] = c;
        rot[half + j] = s;
    }
    __syncthreads();
}

/* One block per token i: qh, kh [N, H, dn+dr], vh [N, H, dv]; shared memory dr doubles. */
static __global__ void prep_fwd_kernel(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                       const float *kpe, int kpe_stride, const int32_t *pos, int T, int H,
                                       int dn, int dr, int dv, double theta)
{
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkv = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    const float *qi = q + (size_t)i * H * dk, *kvi = kv + (size_t)i * H * dkv;
    const float *kpi = kpe + (size_t)i * kpe_stride;
    float *qhi = qh + (size_t)i * H * dk, *khi = kh + (size_t)i * H * dk, *vhi = vh + (size_t)i * H * dv;
    for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
        const int h = e / dk, col = e - h * dk;
        if (col < dn) {
            qhi[e] = qi[e];
            khi[e] = kvi[h * dkv + col];
        } else {
            const int j = (col - dn) >> 1, odd = (col - dn) & 1;
            const double cs = rot[j], sn = rot[half + j];
            const double x0 = qi[h * dk + dn + 2 * j], x1 = qi[h * dk + dn + 2 * j + 1];
            const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
            qhi[e] = (float)(odd ? x1 * cs + x0 * sn : x0 * cs - x1 * sn);
            khi[e] = (float)(odd ? k1 * cs + k0 * sn : k0 * cs - k1 * sn);
        }
    }
    for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
        const int h = e / dv, col = e - h * dv;
        vhi[e] = kvi[h * dkv + dn + col];
    }
}

/* One block per token i: the adjoint of prep_fwd_kernel, accumulating. dkpe sums the
 * heads in order 0..H-1 in double, one thread per pair. */
static __global__ void prep_bwd_kernel(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                       const float *dkh, const float *dvh, const int32_t *pos, int T, int H,
                                       int dn, int dr, int dv, double theta)
{
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkvw = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    float *dqi = dq + (size_t)i * H * dk, *dkvi = dkv + (size_t)i * H * dkvw;
    float *dkpi = dkpe + (size_t)i * kpe_stride;
    const float *gq = dqh + (size_t)i * H * dk, *gk = dkh + (size_t)i * H * dk, *gv = dvh + (size_t)i * H * dv;
    for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
        const int h = e / dk, col = e - h * dk;
        if (col < dn) {
            dqi[e] += gq[e];
            dkvi[h * dkvw + col] += gk[e];
        } else {
            const int j = (col - dn) >> 1, odd = (col - dn) & 1;
            const double cs = rot[j], sn = rot[half + j];
            const double y0 = gq[h * dk + dn + 2 * j], y1 = gq[h * dk + dn + 2 * j + 1];
            dqi[e] += (float)(odd ? y1 * cs - y0 * sn : y0 * cs + y1 * sn);
        }
    }
    for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
        const int h = e / dv, col = e - h * dv;
        dkvi[h * dkvw + dn + col] += gv[e];
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s0 = 0, s1 = 0;
        for (int h = 0; h < H; h++) {
            s0 += gk[h * dk + dn + 2 * j];
            s1 += gk[h * dk + dn + 2 * j + 1];
        }
        const double cs = rot[j], sn = rot[half + j];
        dkpi[2 * j] += (float)(s0 * cs + s1 * sn);
        dkpi[2 * j + 1] += (float)(s1 * cs - s0 * sn);
    }
}

static void prep_check(const char *who, int B, int T, int H, int dn, int dr, int dv)
{
    if (B < 1 || T < 1 || H < 1 || dn < 0 || dv < 1 || dr < 2 || dr % 2 != 0)
        die("%s: bad shape B=%d T=%d H=%d dn=%d dr=%d dv=%d (dr must be even and >= 2)", who, B, T, H, dn, dr, dv);
}

extern "C" void cuda_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                      const float *kpe, int kpe_stride, const int32_t *pos,
                                      int B, int T, int H, int dn, int dr, int dv, float theta)
{
    prep_check("cuda_mla_prep_forward", B, T, H, dn, dr, dv);
    prep_fwd_kernel<<<B * T, PREP_THREADS, dr * sizeof(double), cuda_stream()>>>(
        qh, kh, vh, q, kv, kpe, kpe_stride, pos, T, H, dn, dr, dv, (double)theta);
    LAUNCH_CHECK();
}

extern "C" void cuda_mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                       const float *dkh, const float *dvh, const int32_t *pos,
                                       int B, int T, int H, int dn, int dr, int dv, float theta)
{
    prep_check("cuda_mla_prep_backward", B, T, H, dn, dr, dv);
    prep_bwd_kernel<<<B * T, PREP_THREADS, dr * sizeof(double), cuda_stream()>>>(
        dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, T, H, dn, dr, dv, (double)theta);
    LAUNCH_CHECK();
}

/* --------------------------------------------------- tensor-core building blocks ---- */

static __device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared, asynchronously; bytes = 0 fills the 16 bytes with zeros
 * (rows past T), reading nothing. */
static __device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)),
                 "l"((unsigned long long)__cvta_generic_to_global(src)), "r"(bytes));
}

static __device__ __forceinline__ void cp_async4(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)),
                 "l"((unsigned long long)__cvta_generic_to_global(src)), "r"(bytes));
}

static __device__ __forceinline__ void cp_async_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* wait until at most `1` (the newest) group is still in flight */
static __device__ __forceinline__ void cp_async_wait_but_newest(void)
{
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

static __device__ __forceinline__ void cp_async_wait_all(void)
{
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

/* Four 8x8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of
 * matrix l / 8. Plain: register i holds (row lane/4, cols 2(lane%4), +1) of matrix i;
 * trans: (rows 2(lane%4), +1, col lane/4). */
static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16 *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

static __device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const bf16 *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

/* c[16x8] += a[16x16] b[16x8], bf16 in, fp32 accumulate. Fragments (g = lane/4,
 * q = lane%4): a: {(g, 2q..), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)};
 * b: {(k 2q.., n g), (k 2q+8.., n g)}; c: {(g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)}. */
static __device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* two floats -> bf16x2, `lo` in the low half (the lower column of a fragment pair) */
static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* Rows row0.. row0+63 of a [T, dp] bf16 matrix into shared memory (pitch in elements),
 * zeros for rows past T. Joins the calling thread's current cp.async group. */
static __device__ void load_rows_async(bf16 *dst, int pitch, const bf16 *src, int dp, int row0, int T,
                                       int nthreads)
{
    const int cpr = dp >> 3; /* 16-byte chunks per row */
    for (int i = threadIdx.x; i < ATT_TILE * cpr; i += nthreads) {
        const int r = i / cpr, ch = i - r * cpr, t = row0 + r, ok = t < T;
        cp_async16(dst + r * pitch + ch * 8, src + (size_t)(ok ? t : 0) * dp + ch * 8, ok ? 16 : 0);
    }
}

/* 64 four-byte values src[row0 ..] into shared memory, zeros past T. */
static __device__ void load_vals_async(void *dst, const void *src, int row0, int T)
{
    if (threadIdx.x < ATT_TILE) {
        const int t = row0 + threadIdx.x, ok = t < T;
        cp_async4((char *)dst + 4 * threadIdx.x, (const char *)src + 4 * (size_t)(ok ? t : 0), ok ? 4 : 0);
    }
}

/* [min, max] of the document ids of the valid rows of a tile, in every lane of the warp. */
static __device__ void doc_range(const int32_t *doc, int T, int tile, int *lo, int *hi)
{
    const int lane = threadIdx.x & 31, a = tile * ATT_TILE + lane, b = a + 32;
    int mn = INT_MAX, mx = INT_MIN;
    if (a < T) mn = mx = doc[a];
    if (b < T) {
        mn = min(mn, doc[b]);
        mx = max(mx, doc[b]);
    }
    *lo = __reduce_min_sync(0xffffffffu, mn);
    *hi = __reduce_max_sync(0xffffffffu, mx);
}

/* The tiles in [first, last], ascending, whose document-id range meets that of tile
 * `own` (of the same batch row `doc`): written to list, count returned to every thread.
 * flag: last-first+1 ints of scratch; count: one int. Called by the whole block. */
static __device__ int doc_tile_list(int *list, int *flag, int *count, const int32_t *doc, int T, int own,
                                    int first, int last)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int olo, ohi;
    doc_range(doc, T, own, &olo, &ohi);
    for (int j = first + warp; j <= last; j += nwarps) {
        int lo, hi;
        doc_range(doc, T, j, &lo, &hi);
        if (lane == 0) flag[j - first] = hi >= olo && lo <= ohi;
    }
    __syncthreads();
    if (warp == 0) {
        int n = 0;
        for (int base = 0; base <= last - first; base += 32) {
            const int i = base + lane, f = i <= last - first && flag[i];
            const unsigned m = __ballot_sync(0xffffffffu, f);
            if (f) list[n + __popc(m & ((1u << lane) - 1u))] = first + i;
            n += __popc(m);
        }
        if (lane == 0) *count = n;
    }
    __syncthreads();
    return *count;
}

/* ------------------------------------------------------------ layout passes ---- */

/* dst [B, H, T, dp] bf16 (zero in columns D..dp-1) from src [B, T, H, D] fp32; one
 * thread per 8 output columns. vec: src 16-byte aligned and D % 4 == 0. */
static __global__ void to_heads_bf16_kernel(bf16 *dst, const float *src, int T, int H, int D, int dp,
                                            size_t nchunks, int vec)
{
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nchunks) return;
    const int cpr = dp >> 3;
    const size_t row = i / cpr; /* (b, h, t) */
    const int c0 = (int)(i - row * cpr) * 8;
    const int t = (int)(row % T);
    const size_t bh = row / T, b = bh / H;
    const int h = (int)(bh % H);
    const float *s = src + ((b * T + t) * H + h) * D + c0;
    float x[8];
    if (vec && c0 + 8 <= D) {
        const float4 u = ((const float4 *)s)[0], w = ((const float4 *)s)[1];
        x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = w.x, x[5] = w.y, x[6] = w.z, x[7] = w.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) x[e] = c0 + e < D ? s[e] : 0.f;
    }
    uint4 o;
    o.x = pack_bf16(x[0], x[1]);
    o.y = pack_bf16(x[2], x[3]);
    o.z = pack_bf16(x[4], x[5]);
    o.w = pack_bf16(x[6], x[7]);
    *(uint4 *)(dst + row * dp + c0) = o;
}

static void to_heads_bf16(bf16 *dst, const float *src, int B, int T, int H, int D, int dp)
{
    const size_t nchunks = (size_t)B * H * T * (dp / 8);
    const int vec = D % 4 == 0 && ((uintptr_t)src & 15) == 0;
    to_heads_bf16_kernel<<<ceil_div_u(nchunks, CVT_THREADS), CVT_THREADS, 0, cuda_stream()>>>(dst, src, T, H, D,
                                                                                            dp, nchunks, vec);
    LAUNCH_CHECK();
}

/* Dvec [B, H, T] = dout . out per row (fp32, fixed butterfly); one warp per (b, t, h).
 * dout is rounded to bf16 first, as dP = dout v^T sees it: then D = sum_s P_s dP_s holds
 * for the same dout and dS = P (dP - D) has no cancellation error from the rounding
 * (it matters where a query sees few keys, e.g. at a document start). */
static __global__ void row_dot_kernel(float *Dvec, const float *dout, const float *out, int T, int H, int Dv,
                                      size_t nrows)
{
    const size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= nrows) return; /* whole warps leave together */
    const float *a = dout + w * Dv, *o = out + w * Dv;
    float s = 0.f;
    for (int c = lane; c < Dv; c += 32) s = fmaf(__bfloat162float(__float2bfloat16_rn(a[c])), o[c], s);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (lane == 0) {
        const int h = (int)(w % H);
        const size_t bt = w / H, b = bt / T;
        const int t = (int)(bt % T);
        Dvec[(b * H + h) * T + t] = s;
    }
}

/* ------------------------------------------------------------------ forward ---- */

static size_t fwd_smem_bytes(int dkp, int dvp, int nt)
{
    return (size_t)3 * ATT_TILE * (dkp + 8) * sizeof(bf16) + (size_t)2 * ATT_TILE * (dvp + 8) * sizeof(bf16) +
           (size_t)(2 * ATT_TILE + 2 * nt + 1) * sizeof(int);
}

/* grid (B*H, nt), FWD_THREADS threads. q/k/v bf16 [B, H, T, dkp|dvp]; out [B, T, H, Dv]
 * and lse [B, H, T] fp32. sl2 = scale * log2(e). */
static __global__ void __launch_bounds__(FWD_THREADS, 2)
    attn_fwd_kernel(float *out, float *lse, const bf16 *qb, const bf16 *kb, const bf16 *vb,
                    const int32_t *doc_id, int T, int H, int Dv, int dkp, int dvp, int nt, float sl2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int pk = dkp + 8, pv = dvp + 8;
    bf16 *sQ = (bf16 *)smem;                /* [64][pk] */
    bf16 *sK = sQ + ATT_TILE * pk;          /* [2][64][pk] */
    bf16 *sV = sK + 2 * ATT_TILE * pk;      /* [2][64][pv] */
    int *skd = (int *)(sV + 2 * ATT_TILE * pv); /* [2][64] key document ids */
    int *slist = skd + 2 * ATT_TILE, *sflag = slist + nt, *scount = sflag + nt;

    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int qt = nt - 1 - (int)blockIdx.y, t0 = qt * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int nkq = dkp >> 4, nvp = dvp >> 4;
    const size_t hrow = (size_t)bh * T;
    const bf16 *qh = qb + hrow * dkp, *kh = kb + hrow * dkp, *vh = vb + hrow * dvp;
    const int32_t *doc = doc_id ? doc_id + (size_t)b * T : NULL;

    const int nvis = doc ? doc_tile_list(slist, sflag, scount, doc, T, qt, 0, qt) : qt + 1;

    load_rows_async(sQ, pk, qh, dkp, t0, T, FWD_THREADS);
    {
        const int j = doc ? slist[0] : 0;
        load_rows_async(sK, pk, kh, dkp, j * ATT_TILE, T, FWD_THREADS);
        load_rows_async(sV, pv, vh, dvp, j * ATT_TILE, T, FWD_THREADS);
        if (doc) load_vals_async(skd, doc, j * ATT_TILE, T);
    }
    cp_async_commit();

    /* this thread's two query rows: local ra and ra + 8 */
    const int ra = warp * 16 + g, ta = t0 + ra, tb = ta + 8;
    int da = 0, db = 0;
    if (doc) {
        da = doc[min(ta, T - 1)];
        db = doc[min(tb, T - 1)];
    }

    uint32_t qf[ATT_KSTEPS][4];
    float o[2 * ATT_VSTEPS][4];
#pragma unroll
    for (int d = 0; d < 2 * ATT_VSTEPS; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;

    for (int it = 0; it < nvis; it++) {
        const int j = doc ? slist[it] : it, buf = it & 1;
        if (it + 1 < nvis) {
            const int jn = doc ? slist[it + 1] : it + 1, nb = buf ^ 1;
            load_rows_async(sK + nb * ATT_TILE * pk, pk, kh, dkp, jn * ATT_TILE, T, FWD_THREADS);
            load_rows_async(sV + nb * ATT_TILE * pv, pv, vh, dvp, jn * ATT_TILE, T, FWD_THREADS);
            if (doc) load_vals_async(skd + nb * ATT_TILE, doc, jn * ATT_TILE, T);
            cp_async_commit();
            cp_async_wait_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < ATT_KSTEPS; kk++)
                if (kk < nkq) ldsm_x4(qf[kk], sQ + (warp * 16 + (lane & 15)) * pk + kk * 16 + ((lane >> 4) << 3));
        }
        const bf16 *cK = sK + buf * ATT_TILE * pk, *cV = sV + buf * ATT_TILE * pv;
        const int *ckd = skd + buf * ATT_TILE;

        /* S = Q K^T for 16 rows x 64 keys: n-tile n covers keys 8n..8n+7 */
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < ATT_KSTEPS; kk++) {
            if (kk < nkq) {
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    uint32_t bk[4];
                    ldsm_x4(bk, cK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * pk + kk * 16 +
                                    (((lane >> 3) & 1) << 3));
                    mma_bf16(s[2 * np], qf[kk], bk[0], bk[1]);
                    mma_bf16(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                }
            }
        }

        /* mask, scale to log2 units, running max */
        const int s0 = j * ATT_TILE, diag = j == qt;
        float mxa = ma, mxb = mb;
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = n * 8 + 2 * c + (e & 1);
                int vis = !diag || s0 + col <= (e < 2 ? ta : tb);
                if (doc) vis = vis && ckd[col] == (e < 2 ? da : db);
                const float x = vis ? s[n][e] * sl2 : -INFINITY;
                s[n][e] = x;
                if (e < 2) mxa = fmaxf(mxa, x);
                else mxb = fmaxf(mxb, x);
            }
        }
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
        /* shift 0 while a row has seen no visible key: exp2(-inf - 0) = 0, never NaN */
        const float sha = mxa == -INFINITY ? 0.f : mxa, shb = mxb == -INFINITY ? 0.f : mxb;
        const float aa = exp2f(ma - sha), ab = exp2f(mb - shb);
        ma = mxa;
        mb = mxb;
        float suma = 0.f, sumb = 0.f;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            s[n][0] = exp2f(s[n][0] - sha);
            s[n][1] = exp2f(s[n][1] - sha);
            s[n][2] = exp2f(s[n][2] - shb);
            s[n][3] = exp2f(s[n][3] - shb);
            suma += s[n][0] + s[n][1];
            sumb += s[n][2] + s[n][3];
        }
        la = la * aa + suma; /* partial over this thread's columns; the quad sums at the end */
        lb = lb * ab + sumb;
#pragma unroll
        for (int d = 0; d < 2 * ATT_VSTEPS; d++) {
            o[d][0] *= aa;
            o[d][1] *= aa;
            o[d][2] *= ab;
            o[d][3] *= ab;
        }

        /* O += P V: the accumulators of key n-tiles 2kk, 2kk+1 are the A fragment of k-step kk */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t pa[4];
            pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < ATT_VSTEPS; dp++) {
                if (dp < nvp) {
                    uint32_t bv[4];
                    ldsm_x4_t(bv, cV + (kk * 16 + (lane & 15)) * pv + dp * 16 + ((lane >> 4) << 3));
                    mma_bf16(o[2 * dp], pa, bv[0], bv[1]);
                    mma_bf16(o[2 * dp + 1], pa, bv[2], bv[3]);
                }
            }
        }
        __syncthreads(); /* buffer `buf` is refilled by the next iteration's prefetch */
    }

    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
    if (ta < T) {
        float *orow = out + (((size_t)b * T + ta) * H + h) * Dv;
#pragma unroll
        for (int d = 0; d < 2 * ATT_VSTEPS; d++) {
            const int col = d * 8 + 2 * c;
            if (col < Dv) orow[col] = o[d][0] * ia;
            if (col + 1 < Dv) orow[col + 1] = o[d][1] * ia;
        }
        if (c == 0) lse[hrow + ta] = la > 0.f ? (ma + log2f(la)) * ATT_LN2 : -INFINITY;
    }
    if (tb < T) {
        float *orow = out + (((size_t)b * T + tb) * H + h) * Dv;
#pragma unroll
        for (int d = 0; d < 2 * ATT_VSTEPS; d++) {
            const int col = d * 8 + 2 * c;
            if (col < Dv) orow[col] = o[d][2] * ib;
            if (col + 1 < Dv) orow[col + 1] = o[d][3] * ib;
        }
        if (c == 0) lse[hrow + tb] = lb > 0.f ? (mb + log2f(lb)) * ATT_LN2 : -INFINITY;
    }
}

/* ----------------------------------------------------------------- backward ---- */

/* Phase 1 of both backward kernels, all 8 warps: for one 64-query x 64-key tile,
 * P = exp(scale q.k - lse) (0 where masked or the query row is past T) and
 * dS = P (dO.v - D), written as bf16 to sP (skipped when NULL) and sdS, [query][key]
 * with pitch ATT_PP. Warp w computes query rows 16 (w % 4).. and keys 32 (w / 4)..
 * slse, sD, sqd: per local query row; skd: per local key; sqd/skd NULL without docs. */
static __device__ __forceinline__ void bwd_probs(bf16 *sP, bf16 *sdS, const bf16 *sQ, const bf16 *sK, int pk,
                                                 int nkq, const bf16 *sdO, const bf16 *sV, int pv, int nvp,
                                                 const float *slse, const float *sD, const int *sqd,
                                                 const int *skd, int t0, int s0, int T, float sl2)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int rq = (warp & 3) * 16, kc = (warp >> 2) * 32;
    float s[4][4], dp[4][4];
#pragma unroll
    for (int n = 0; n < 4; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < ATT_KSTEPS; kk++) {
        if (kk < nkq) {
            uint32_t a[4];
            ldsm_x4(a, sQ + (rq + (lane & 15)) * pk + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
            for (int np = 0; np < 2; np++) {
                uint32_t bk[4];
                ldsm_x4(bk, sK + (kc + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * pk + kk * 16 +
                                (((lane >> 3) & 1) << 3));
                mma_bf16(s[2 * np], a, bk[0], bk[1]);
                mma_bf16(s[2 * np + 1], a, bk[2], bk[3]);
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < ATT_VSTEPS; kk++) {
        if (kk < nvp) {
            uint32_t a[4];
            ldsm_x4(a, sdO + (rq + (lane & 15)) * pv + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
            for (int np = 0; np < 2; np++) {
                uint32_t bv[4];
                ldsm_x4(bv, sV + (kc + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * pv + kk * 16 +
                                (((lane >> 3) & 1) << 3));
                mma_bf16(dp[2 * np], a, bv[0], bv[1]);
                mma_bf16(dp[2 * np + 1], a, bv[2], bv[3]);
            }
        }
    }
    const int ra = rq + g, rb = ra + 8;
    const float lsa = slse[ra] * ATT_LOG2E, lsb = slse[rb] * ATT_LOG2E, Da = sD[ra], Db = sD[rb];
#pragma unroll
    for (int n = 0; n < 4; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = e < 2 ? ra : rb, t = t0 + r, col = kc + n * 8 + 2 * c + (e & 1);
            int vis = s0 + col <= t && t < T;
            if (skd) vis = vis && sqd[r] == skd[col];
            const float p = vis ? exp2f(s[n][e] * sl2 - (e < 2 ? lsa : lsb)) : 0.f;
            s[n][e] = p;
            dp[n][e] = p * (dp[n][e] - (e < 2 ? Da : Db));
        }
        const int col = kc + n * 8 + 2 * c;
        if (sP) {
            *(uint32_t *)(sP + ra * ATT_PP + col) = pack_bf16(s[n][0], s[n][1]);
            *(uint32_t *)(sP + rb * ATT_PP + col) = pack_bf16(s[n][2], s[n][3]);
        }
        *(uint32_t *)(sdS + ra * ATT_PP + col) = pack_bf16(dp[n][0], dp[n][1]);
        *(uint32_t *)(sdS + rb * ATT_PP + col) = pack_bf16(dp[n][2], dp[n][3]);
    }
}

/* Which 16-wide column blocks of a dp-wide gradient warp half `hf` (0, 1) owns. */
static __device__ __forceinline__ void column_half(int dp, int hf, int *first, int *count)
{
    const int nblk = dp >> 4, h0 = (nblk + 1) >> 1;
    *first = hf ? h0 : 0;
    *count = hf ? nblk - h0 : h0;
}

static size_t dkdv_smem_bytes(int dkp, int dvp, int nt)
{
    return (size_t)3 * ATT_TILE * (dkp + 8) * sizeof(bf16) + (size_t)3 * ATT_TILE * (dvp + 8) * sizeof(bf16) +
           (size_t)2 * ATT_TILE * ATT_PP * sizeof(bf16) + (size_t)(7 * ATT_TILE + 2 * nt + 1) * sizeof(int);
}

/* grid (B*H, nt), BWD_THREADS threads: dk, dv [B, T, H, Dk|Dv] += the gradients of key
 * tile blockIdx.y, summed over the query tiles from the diagonal on, in order. */
static __global__ void __launch_bounds__(BWD_THREADS, 1)
    attn_bwd_dkdv_kernel(float *dk, float *dv, const bf16 *qb, const bf16 *kb, const bf16 *vb, const bf16 *dob,
                         const float *lse, const float *Dvec, const int32_t *doc_id, int T, int H, int Dk,
                         int Dv, int dkp, int dvp, int nt, float scale, float sl2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int pk = dkp + 8, pv = dvp + 8;
    bf16 *sK = (bf16 *)smem;                   /* [64][pk] */
    bf16 *sQ = sK + ATT_TILE * pk;             /* [2][64][pk] */
    bf16 *sV = sQ + 2 * ATT_TILE * pk;         /* [64][pv] */
    bf16 *sdO = sV + ATT_TILE * pv;            /* [2][64][pv] */
    bf16 *sP = sdO + 2 * ATT_TILE * pv;        /* [64][ATT_PP] */
    bf16 *sdS = sP + ATT_TILE * ATT_PP;        /* [64][ATT_PP] */
    float *slse = (float *)(sdS + ATT_TILE * ATT_PP); /* [2][64] */
    float *sD = slse + 2 * ATT_TILE;           /* [2][64] */
    int *sqd = (int *)(sD + 2 * ATT_TILE);     /* [2][64] */
    int *skd = sqd + 2 * ATT_TILE;             /* [64] */
    int *slist = skd + ATT_TILE, *sflag = slist + nt, *scount = sflag + nt;

    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int kt = blockIdx.y, s0 = kt * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const size_t hrow = (size_t)bh * T;
    const bf16 *qh = qb + hrow * dkp, *kh = kb + hrow * dkp, *vh = vb + hrow * dvp, *doh = dob + hrow * dvp;
    const float *lh = lse + hrow, *Dh = Dvec + hrow;
    const int32_t *doc = doc_id ? doc_id + (size_t)b * T : NULL;

    const int nvis = doc ? doc_tile_list(slist, sflag, scount, doc, T, kt, kt, nt - 1) : nt - kt;

    load_rows_async(sK, pk, kh, dkp, s0, T, BWD_THREADS);
    load_rows_async(sV, pv, vh, dvp, s0, T, BWD_THREADS);
    if (doc) load_vals_async(skd, doc, s0, T);
    {
        const int i = doc ? slist[0] : kt;
        load_rows_async(sQ, pk, qh, dkp, i * ATT_TILE, T, BWD_THREADS);
        load_rows_async(sdO, pv, doh, dvp, i * ATT_TILE, T, BWD_THREADS);
        load_vals_async(slse, lh, i * ATT_TILE, T);
        load_vals_async(sD, Dh, i * ATT_TILE, T);
        if (doc) load_vals_async(sqd, doc, i * ATT_TILE, T);
    }
    cp_async_commit();

    /* phase 2 ownership: keys rk..rk+15, one half of the dK and dV columns */
    const int rk = (warp & 3) * 16, hf = warp >> 2;
    int kp0, nkmine, vp0, nvmine;
    column_half(dkp, hf, &kp0, &nkmine);
    column_half(dvp, hf, &vp0, &nvmine);
    float dka[ATT_KSTEPS][4], dva[ATT_VSTEPS][4];
#pragma unroll
    for (int n = 0; n < ATT_KSTEPS; n++) dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.f;
#pragma unroll
    for (int n = 0; n < ATT_VSTEPS; n++) dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.f;

    for (int it = 0; it < nvis; it++) {
        const int i = doc ? slist[it] : kt + it, buf = it & 1;
        if (it + 1 < nvis) {
            const int in = doc ? slist[it + 1] : kt + it + 1, nb = buf ^ 1;
            load_rows_async(sQ + nb * ATT_TILE * pk, pk, qh, dkp, in * ATT_TILE, T, BWD_THREADS);
            load_rows_async(sdO + nb * ATT_TILE * pv, pv, doh, dvp, in * ATT_TILE, T, BWD_THREADS);
            load_vals_async(slse + nb * ATT_TILE, lh, in * ATT_TILE, T);
            load_vals_async(sD + nb * ATT_TILE, Dh, in * ATT_TILE, T);
            if (doc) load_vals_async(sqd + nb * ATT_TILE, doc, in * ATT_TILE, T);
            cp_async_commit();
            cp_async_wait_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const bf16 *cQ = sQ + buf * ATT_TILE * pk, *cdO = sdO + buf * ATT_TILE * pv;
        bwd_probs(sP, sdS, cQ, sK, pk, dkp >> 4, cdO, sV, pv, dvp >> 4, slse + buf * ATT_TILE,
                  sD + buf * ATT_TILE, doc ? sqd + buf * ATT_TILE : NULL, doc ? skd : NULL, i * ATT_TILE, s0, T,
                  sl2);
        __syncthreads();
        /* dV += P^T dO, dK += dS^T Q over the 64 queries, 16 at a time */
#pragma unroll
        for (int kq = 0; kq < 4; kq++) {
            uint32_t ap[4], ad[4];
            const int off = (kq * 16 + (lane & 7) + ((lane >> 4) << 3)) * ATT_PP + rk + (((lane >> 3) & 1) << 3);
            ldsm_x4_t(ap, sP + off);
            ldsm_x4_t(ad, sdS + off);
#pragma unroll
            for (int p = 0; p < ATT_VSTEPS / 2; p++) {
                if (p < nvmine) {
                    uint32_t bv[4];
                    ldsm_x4_t(bv, cdO + (kq * 16 + (lane & 15)) * pv + (vp0 + p) * 16 + ((lane >> 4) << 3));
                    mma_bf16(dva[2 * p], ap, bv[0], bv[1]);
                    mma_bf16(dva[2 * p + 1], ap, bv[2], bv[3]);
                }
            }
#pragma unroll
            for (int p = 0; p < ATT_KSTEPS / 2; p++) {
                if (p < nkmine) {
                    uint32_t bq[4];
                    ldsm_x4_t(bq, cQ + (kq * 16 + (lane & 15)) * pk + (kp0 + p) * 16 + ((lane >> 4) << 3));
                    mma_bf16(dka[2 * p], ad, bq[0], bq[1]);
                    mma_bf16(dka[2 * p + 1], ad, bq[2], bq[3]);
                }
            }
        }
        __syncthreads(); /* sP, sdS and buffer `buf` are rewritten next */
    }

    /* dK += scale * acc (rounded product, then sum: no fma), dV += acc */
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int s = s0 + rk + g + 8 * half;
        if (s >= T) continue;
        float *dkr = dk + (((size_t)b * T + s) * H + h) * Dk;
        float *dvr = dv + (((size_t)b * T + s) * H + h) * Dv;
#pragma unroll
        for (int p = 0; p < ATT_KSTEPS / 2; p++) {
            if (p < nkmine) {
#pragma unroll
                for (int nn = 0; nn < 2; nn++) {
                    const int col = (kp0 + p) * 16 + nn * 8 + 2 * c;
                    if (col < Dk) dkr[col] = __fadd_rn(dkr[col], __fmul_rn(scale, dka[2 * p + nn][2 * half]));
                    if (col + 1 < Dk)
                        dkr[col + 1] = __fadd_rn(dkr[col + 1], __fmul_rn(scale, dka[2 * p + nn][2 * half + 1]));
                }
            }
        }
#pragma unroll
        for (int p = 0; p < ATT_VSTEPS / 2; p++) {
            if (p < nvmine) {
#pragma unroll
                for (int nn = 0; nn < 2; nn++) {
                    const int col = (vp0 + p) * 16 + nn * 8 + 2 * c;
                    if (col < Dv) dvr[col] += dva[2 * p + nn][2 * half];
                    if (col + 1 < Dv) dvr[col + 1] += dva[2 * p + nn][2 * half + 1];
                }
            }
        }
    }
}

static size_t dq_smem_bytes(int dkp, int dvp, int nt)
{
    return (size_t)3 * ATT_TILE * (dkp + 8) * sizeof(bf16) + (size_t)3 * ATT_TILE * (dvp + 8) * sizeof(bf16) +
           (size_t)ATT_TILE * ATT_PP * sizeof(bf16) + (size_t)(5 * ATT_TILE + 2 * nt + 1) * sizeof(int);
}

/* grid (B*H, nt), BWD_THREADS threads: dq [B, T, H, Dk] += the gradient of query tile
 * nt-1-blockIdx.y, summed over its key tiles in order. */
static __global__ void __launch_bounds__(BWD_THREADS, 1)
    attn_bwd_dq_kernel(float *dq, const bf16 *qb, const bf16 *kb, const bf16 *vb, const bf16 *dob,
                       const float *lse, const float *Dvec, const int32_t *doc_id, int T, int H, int Dk, int dkp,
                       int dvp, int nt, float scale, float sl2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int pk = dkp + 8, pv = dvp + 8;
    bf16 *sQ = (bf16 *)smem;                   /* [64][pk] */
    bf16 *sK = sQ + ATT_TILE * pk;             /* [2][64][pk] */
    bf16 *sdO = sK + 2 * ATT_TILE * pk;        /* [64][pv] */
    bf16 *sV = sdO + ATT_TILE * pv;            /* [2][64][pv] */
    bf16 *sdS = sV + 2 * ATT_TILE * pv;        /* [64][ATT_PP] */
    float *slse = (float *)(sdS + ATT_TILE * ATT_PP); /* [64] */
    float *sD = slse + ATT_TILE;               /* [64] */
    int *sqd = (int *)(sD + ATT_TILE);         /* [64] */
    int *skd = sqd + ATT_TILE;                 /* [2][64] */
    int *slist = skd + 2 * ATT_TILE, *sflag = slist + nt, *scount = sflag + nt;

    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int qt = nt - 1 - (int)blockIdx.y, t0 = qt * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const size_t hrow = (size_t)bh * T;
    const bf16 *qh = qb + hrow * dkp, *kh = kb + hrow * dkp, *vh = vb + hrow * dvp, *doh = dob + hrow * dvp;
    const int32_t *doc = doc_id ? doc_id + (size_t)b * T : NULL;

    const int nvis = doc ? doc_tile_list(slist, sflag, scount, doc, T, qt, 0, qt) : qt + 1;

    load_rows_async(sQ, pk, qh, dkp, t0, T, BWD_THREADS);
    load_rows_async(sdO, pv, doh, dvp, t0, T, BWD_THREADS);
    load_vals_async(slse, lse + hrow, t0, T);
    load_vals_async(sD, Dvec + hrow, t0, T);
    if (doc) load_vals_async(sqd, doc, t0, T);
    {
        const int j = doc ? slist[0] : 0;
        load_rows_async(sK, pk, kh, dkp, j * ATT_TILE, T, BWD_THREADS);
        load_rows_async(sV, pv, vh, dvp, j * ATT_TILE, T, BWD_THREADS);
        if (doc) load_vals_async(skd, doc, j * ATT_TILE, T);
    }
    cp_async_commit();

    /* phase 2 ownership: query rows rq..rq+15, one half of the dQ columns */
    const int rq = (warp & 3) * 16, hf = warp >> 2;
    int kp0, nkmine;
    column_half(dkp, hf, &kp0, &nkmine);
    float dqa[ATT_KSTEPS][4];
#pragma unroll
    for (int n = 0; n < ATT_KSTEPS; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;

    for (int it = 0; it < nvis; it++) {
        const int j = doc ? slist[it] : it, buf = it & 1;
        if (it + 1 < nvis) {
            const int jn = doc ? slist[it + 1] : it + 1, nb = buf ^ 1;
            load_rows_async(sK + nb * ATT_TILE * pk, pk, kh, dkp, jn * ATT_TILE, T, BWD_THREADS);
            load_rows_async(sV + nb * ATT_TILE * pv, pv, vh, dvp, jn * ATT_TILE, T, BWD_THREADS);
            if (doc) load_vals_async(skd + nb * ATT_TILE, doc, jn * ATT_TILE, T);
            cp_async_commit();
            cp_async_wait_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const bf16 *cK = sK + buf * ATT_TILE * pk, *cV = sV + buf * ATT_TILE * pv;
        bwd_probs(NULL, sdS, sQ, cK, pk, dkp >> 4, sdO, cV, pv, dvp >> 4, slse, sD, doc ? sqd : NULL,
                  doc ? skd + buf * ATT_TILE : NULL, t0, j * ATT_TILE, T, sl2);
        __syncthreads();
        /* dQ += dS K over the 64 keys, 16 at a time */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];
            ldsm_x4(a, sdS + (rq + (lane & 15)) * ATT_PP + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
            for (int p = 0; p < ATT_KSTEPS / 2; p++) {
                if (p < nkmine) {
                    uint32_t bk[4];
                    ldsm_x4_t(bk, cK + (kk * 16 + (lane & 15)) * pk + (kp0 + p) * 16 + ((lane >> 4) << 3));
                    mma_bf16(dqa[2 * p], a, bk[0], bk[1]);
                    mma_bf16(dqa[2 * p + 1], a, bk[2], bk[3]);
                }
            }
        }
        __syncthreads(); /* sdS and buffer `buf` are rewritten next */
    }

#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = t0 + rq + g + 8 * half;
        if (t >= T) continue;
        float *dqr = dq + (((size_t)b * T + t) * H + h) * Dk;
#pragma unroll
        for (int p = 0; p < ATT_KSTEPS / 2; p++) {
            if (p < nkmine) {
#pragma unroll
                for (int nn = 0; nn < 2; nn++) {
                    const int col = (kp0 + p) * 16 + nn * 8 + 2 * c;
                    if (col < Dk) dqr[col] = __fadd_rn(dqr[col], __fmul_rn(scale, dqa[2 * p + nn][2 * half]));
                    if (col + 1 < Dk)
                        dqr[col + 1] = __fadd_rn(dqr[col + 1], __fmul_rn(scale, dqa[2 * p + nn][2 * half + 1]));
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ launchers ---- */

static int round16(int x) { return (x + 15) & ~15; }

static void attn_check(const char *who, int B, int T, int H, int Dk, int Dv)
{
    if (B < 1 || T < 1 || H < 1 || Dk < 1 || Dv < 1)
        die("%s: bad shape B=%d T=%d H=%d Dk=%d Dv=%d", who, B, T, H, Dk, Dv);
    if (Dk > ATT_DK_MAX || Dv > ATT_DV_MAX)
        die("%s: head dims Dk=%d Dv=%d exceed what the CUDA attention kernels hold (Dk <= %d, Dv <= %d); "
            "use smaller --mla_qk_*_head_dim / --mla_v_head_dim or the CPU backend",
            who, Dk, Dv, ATT_DK_MAX, ATT_DV_MAX);
    if ((T + ATT_TILE - 1) / ATT_TILE > 65535) die("%s: T=%d too long (at most %d)", who, T, 65535 * ATT_TILE);
}

/* Raise a kernel's dynamic shared memory limit when `bytes` needs it (the default is 48 KB). */
static void smem_limit(const void *kernel, size_t bytes, size_t *set_so_far, const char *who)
{
    static int optin;
    if (!optin) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    }
    if (bytes > (size_t)optin)
        die("%s: needs %zu bytes of shared memory per block, the GPU allows %d", who, bytes, optin);
    if (bytes > *set_so_far) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
        *set_so_far = bytes;
    }
}

extern "C" void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                                       const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    static size_t fwd_set;
    attn_check("cuda_attention_forward", B, T, H, Dk, Dv);
    const int dkp = round16(Dk), dvp = round16(Dv), nt = (T + ATT_TILE - 1) / ATT_TILE;
    const size_t nrow = (size_t)B * H * T;
    /* scratch: q, k, v in bf16, [B, H, T, dkp | dvp] */
    bf16 *qb = (bf16 *)cuda_scratch(nrow * (2 * (size_t)dkp + dvp) * sizeof(bf16));
    bf16 *kb = qb + nrow * dkp, *vb = kb + nrow * dkp;
    to_heads_bf16(qb, q, B, T, H, Dk, dkp);
    to_heads_bf16(kb, k, B, T, H, Dk, dkp);
    to_heads_bf16(vb, v, B, T, H, Dv, dvp);
    const size_t smem = fwd_smem_bytes(dkp, dvp, nt);
    smem_limit((const void *)attn_fwd_kernel, smem, &fwd_set, "cuda_attention_forward");
    attn_fwd_kernel<<<dim3(B * H, nt), FWD_THREADS, smem, cuda_stream()>>>(out, lse, qb, kb, vb, doc_id, T, H, Dv,
                                                                          dkp, dvp, nt, scale * ATT_LOG2E);
    LAUNCH_CHECK();
}

extern "C" void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                        const float *lse, const float *q, const float *k, const float *v,
                                        const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    static size_t dkdv_set, dq_set;
    attn_check("cuda_attention_backward", B, T, H, Dk, Dv);
    const int dkp = round16(Dk), dvp = round16(Dv), nt = (T + ATT_TILE - 1) / ATT_TILE;
    const size_t nrow = (size_t)B * H * T;
    /* scratch: q, k, v, dout in bf16 [B, H, T, dkp | dvp], then D [B, H, T] fp32 */
    bf16 *qb = (bf16 *)cuda_scratch(nrow * (2 * (size_t)dkp + 2 * (size_t)dvp) * sizeof(bf16) +
                                    nrow * sizeof(float));
    bf16 *kb = qb + nrow * dkp, *vb = kb + nrow * dkp, *dob = vb + nrow * dvp;
    float *Dvec = (float *)(dob + nrow * dvp);
    to_heads_bf16(qb, q, B, T, H, Dk, dkp);
    to_heads_bf16(kb, k, B, T, H, Dk, dkp);
    to_heads_bf16(vb, v, B, T, H, Dv, dvp);
    to_heads_bf16(dob, dout, B, T, H, Dv, dvp);
    row_dot_kernel<<<ceil_div_u(nrow * 32, 256), 256, 0, cuda_stream()>>>(Dvec, dout, out, T, H, Dv, nrow);
    LAUNCH_CHECK();

    const float sl2 = scale * ATT_LOG2E;
    const size_t smem_kv = dkdv_smem_bytes(dkp, dvp, nt);
    smem_limit((const void *)attn_bwd_dkdv_kernel, smem_kv, &dkdv_set, "cuda_attention_backward");
    attn_bwd_dkdv_kernel<<<dim3(B * H, nt), BWD_THREADS, smem_kv, cuda_stream()>>>(
        dk, dv, qb, kb, vb, dob, lse, Dvec, doc_id, T, H, Dk, Dv, dkp, dvp, nt, scale, sl2);
    LAUNCH_CHECK();
    const size_t smem_q = dq_smem_bytes(dkp, dvp, nt);
    smem_limit((const void *)attn_bwd_dq_kernel, smem_q, &dq_set, "cuda_attention_backward");
    attn_bwd_dq_kernel<<<dim3(B * H, nt), BWD_THREADS, smem_q, cuda_stream()>>>(
        dq, qb, kb, vb, dob, lse, Dvec, doc_id, T, H, Dk, dkp, dvp, nt, scale, sl2);
    LAUNCH_CHECK();
}
