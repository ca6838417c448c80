/* attention_internal.cuh: the design of the CUDA causal softmax attention with optional
 * document masking (attention_*, the twin of the attention of src/cpu/cpu_mla.c), and what
 * its forward (attention_forward.cu) and backward (attention_backward.cu) share: sizes, the
 * tensor-core building blocks (cp.async, ldmatrix, mma), the document-tile lists, and the
 * host helpers of attention_common.cu. MLA's per-head assembly with RoPE (mla_prep_*) is
 * in attention_prep.cu.
 *
 * Precision. Attention runs on the tensor cores: bf16 mma.sync m16n8k16 with fp32
 * accumulation, softmax statistics, lse and D in fp32. The inputs stay fp32 in memory (the
 * op table is float); each op first converts q, k, v (and dout) once into bf16 copies in
 * the backend scratch, laid out [B, H, T, Dp] with Dp = D rounded up to 16 and the pad
 * columns zero, so that tiles are contiguous 16-byte rows that cp.async can stream. The
 * tolerance against the CPU (double inside) is the bf16 one, 1e-2 relative norm-wise;
 * the expected error is 2e-3 to 5e-3 (bf16 rounding of q, k, v, P, dout and dS; measured
 * with a numpy model of these kernels at the test shapes).
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
#ifndef DELTAMLA_ATTENTION_INTERNAL_CUH
#define DELTAMLA_ATTENTION_INTERNAL_CUH

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
#define ATT_LOG2E 1.4426950408889634f
#define ATT_LN2 0.69314718055994531f

/* --------------------------------------------------- tensor-core building blocks ---- */

/* 16 bytes global -> shared, asynchronously; bytes = 0 fills the 16 bytes with zeros
 * (rows past T), reading nothing. */
static __device__ __forceinline__ void cp_async16(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(cuda_smem_u32(dst)),
                 "l"((unsigned long long)__cvta_generic_to_global(src)), "r"(bytes));
}

static __device__ __forceinline__ void cp_async4(void *dst, const void *src, int bytes)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(cuda_smem_u32(dst)),
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

/* ---- host side (attention_common.cu), shared by the two launchers ---- */

static inline int round16(int x) { return (x + 15) & ~15; }

/* die() with a message unless the shape is one the kernels hold (ATT_DK_MAX, ATT_DV_MAX). */
void attn_check(const char *who, int B, int T, int H, int Dk, int Dv);
/* Raise a kernel's dynamic shared memory limit when `bytes` needs it (the default is 48 KB);
 * *set_so_far: the limit set for that kernel so far (0 at first). */
void attn_smem_limit(const void *kernel, size_t bytes, size_t *set_so_far, const char *who);
/* dst [B, H, T, dp] bf16 (zero in columns D..dp-1) from src [B, T, H, D] fp32, on the
 * backend stream. */
void attn_to_heads_bf16(bf16 *dst, const float *src, int B, int T, int H, int D, int dp);

/* attention_cudnn.cpp (cuDNN builds): the op through cuDNN's fused attention, without
 * document masking; 1 when done, 0 when declined (cuDNN refused the shape, or
 * DELTAMLA_ATTENTION=own), and the caller runs its own kernel. The backward adds into
 * dq, dk, dv, or with set writes them (their old contents unread). */
extern "C" int attn_cudnn_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                                  int H, int Dk, int Dv, float scale);
extern "C" int attn_cudnn_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                   const float *lse, const float *q, const float *k, const float *v, int B, int T,
                                   int H, int Dk, int Dv, float scale, int set);
/* The same on operands already in bf16, in the op's [B, T, H, D] layout (the fused MLA
 * attention, attention_prep.cu): the forward writes ob in bf16, the backward dqb, dkb,
 * dvb; 0 when declined, as above. attn_cudnn_bf16_ok: whether both directions run for
 * this shape (the fused op picks its save format by it). */
extern "C" int attn_cudnn_bf16_ok(int B, int T, int H, int Dk, int Dv, float scale);
extern "C" int attn_cudnn_forward_bf16(bf16 *ob, float *lse, const bf16 *qb, const bf16 *kb, const bf16 *vb, int B,
                                       int T, int H, int Dk, int Dv, float scale);
extern "C" int attn_cudnn_backward_bf16(bf16 *dqb, bf16 *dkb, bf16 *dvb, const bf16 *dob, const bf16 *ob,
                                        const float *lse, const bf16 *qb, const bf16 *kb, const bf16 *vb, int B, int T,
                                        int H, int Dk, int Dv, float scale);
/* dst = src (acc 0) or dst += src (acc 1): bf16 -> fp32, n elements, on the backend stream */
extern "C" void attn_from_bf16(float *dst, const bf16 *src, size_t n, int acc);

#endif
