/* gdn_internal.cuh: the design of the CUDA twin of src/cpu/cpu_gdn.c, the gated delta
 * rule (MODEL.md section 3), and what its forward (gdn_forward.cu) and backward
 * (gdn_backward.cu) kernels share: sizes, the per-chunk scalars, register-tile products,
 * cp.async copies, the triangular solve, and the launchers' shape and shared-memory checks.
 * Chunked (GDN_CHUNK = 64 tokens), forward and backward, for any head dim D in 1..256.
 * Layouts as in backend.h: q, k, v, o [B, T, H, D]; g, beta [B, T, H]; doc_start NULL or
 * [B, T]; state_save [B, H, nchunk, D, D], the state entering each chunk after any reset
 * at its first token.
 *
 * The arithmetic is the CPU's chunked form (its comment block defines G, E, e0, eL, KK,
 * QK, A, U, P, R, W and derives the backward in steps 1-9), rearranged so that nearly
 * all of it runs in parallel over (b, h, chunk) and only a thin recurrence of D x D
 * states runs from chunk to chunk. With T = (I + A)^-1 the triangular system of a chunk
 * has a solution linear in the entering state S0, and so does the state leaving it:
 *     W = Wv - Uk S0,   Wv = T diag(beta) V,   Uk = T diag(beta e0) K,
 *     S_end = e0L S0 + K^T diag(eL) W.
 * The backward has the same shape. Step 2's solution X = (I + A)^-T dW (so dR = beta X)
 * is linear in the gradient dS arriving at the chunk's end, and so is the gradient it
 * passes to the previous chunk:
 *     X = Xo + Xk dS,   Xo = T^T M^T dO,   Xk = T^T diag(eL) K,   M = E o QK (lower),
 *     dS_prev = e0L dS + Hc - K^T diag(e0 beta) X,   Hc = Qs^T diag(e0) dO,
 * or 0 when the chunk's first token starts a document.
 *
 * Three kernels run the forward (gdn_forward.cu lists them) and three the backward
 * (gdn_backward.cu).
 * Per-chunk intermediates live in cuda_scratch with 64 rows per chunk (rows past the
 * sequence end are zero): forward Wv/W and Uk; backward W, Xo/X, Xk ([64, D] each), Hc and
 * dS ([D, D] each), and the per-token decays e0, eL.
 *
 * Every product is fp32 FMA from shared memory: a thread holds a 4 x 4 register tile,
 * rows 4*tm..4*tm+3 and columns tn + stride*j, so that 256 threads cover a [64, 64]
 * block and a warp's loads are broadcasts or consecutive words; wider results loop over
 * 64-wide panels, and contractions longer than what is staged loop over panels.
 * Shared arrays have an odd row pitch, so walking down a column hits 32 different banks.
 * The cumulative log decay G is summed in double per chunk (64 serial adds) and every
 * decay factor is exp of a difference of G's, as on the CPU. Every output element is
 * computed by one thread in a fixed order and gradients are read-add-written by their one
 * owner, so two runs give the same bits.
 *
 * Cost at B = 8, T = 2048, H = 12, D = 85 (3072 chunks), as written: about 3.4 M FMA per
 * chunk forward and 9.3 M backward, 39 GFMA in all. That counts what the tiling computes:
 * 85 columns take two 64-wide panels, the [64, 64] pair products are computed whole
 * although only their lower triangle is used, and the forward's output kernel recomputes
 * Qs K^T. A 4 x 4 tile makes 16 FMA per 8 shared loads, so these loops run at no more than
 * half the FP32 peak, about 15 TFMA/s on an H100: at least 2.6 ms for forward plus
 * backward, likely 3-4 ms. The two state kernels take ceil(D/32) * B * H blocks (288
 * here, all resident at once) and are bound by the same throughput, not by the 32 serial
 * steps. Reaching 1.5 ms needs the products on the tensor cores with fp32 accuracy
 * (3xTF32 mma) and panels that fit D = 85 more tightly.
 */
#ifndef DELTAMLA_GDN_INTERNAL_CUH
#define DELTAMLA_GDN_INTERNAL_CUH

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "cuda_ops.h"
}

#define GDN_C 64        /* tokens per chunk (GDN_CHUNK; checked below) */
#define GDN_PP 65       /* row pitch of a [64, 64] tile in shared memory */
#define GDN_NT 256      /* threads of the per-chunk kernels: 16 x 16 tiles of 4 x 4 */
#define GDN_ST 128      /* threads of the state kernels */
#define GDN_DV 32       /* value columns of S per state-kernel block */
#define GDN_VP 33       /* row pitch of 32-wide rows */
#define GDN_KP 32       /* contraction panel of the backward's grads kernel */
#define GDN_MAXD 256
/* per-token scalars at the start of every block's shared memory (in floats):
 * G [64] double, seg [64] int, reset [64] int, e0 [64], eL [64], beta [64] */
#define GDN_HDR (2 * GDN_C + 5 * GDN_C)

static_assert(GDN_CHUNK == GDN_C, "the GDN kernels are written for chunks of 64 tokens");

extern __shared__ __align__(16) float gdn_smem[];

/* odd row pitch for rows of n floats */
static __host__ __device__ __forceinline__ int gdn_pitch(int n) { return n | 1; }

static __device__ __forceinline__ int gdn_imin(int a, int b) { return a < b ? a : b; }

/* offset of token (b, t), head h in a [B, T, H, D] tensor */
static __device__ __forceinline__ size_t gdn_row(int b, int t, int h, int T, int H, int D)
{
    return (((size_t)b * T + t) * H + h) * D;
}

/* the chunk's per-token scalars in the shared header */
typedef struct gdn_hdr {
    double *G; /* cumulative log decay from the segment start (the CPU's G) */
    int *seg;  /* segment number; -1 past the sequence end */
    int *reset; /* 1 where the token starts a document */
    float *e0; /* exp(G_t) in segment 0, else 0 */
    float *eL; /* exp(G_{L-1} - G_t) in the last segment, else 0 */
    float *bt; /* beta; 0 past the sequence end */
} gdn_hdr;

static __device__ __forceinline__ gdn_hdr gdn_hdr_at(float *base)
{
    gdn_hdr s;
    s.G = (double *)base;
    s.seg = (int *)(s.G + GDN_C);
    s.reset = s.seg + GDN_C;
    s.e0 = (float *)(s.reset + GDN_C);
    s.eL = s.e0 + GDN_C;
    s.bt = s.eL + GDN_C;
    return s;
}

/* Fill the header for the chunk of L tokens from t0 of row b, head h. All threads call
 * it; it ends with a barrier. G is summed in double by one thread exactly as the CPU
 * does (the g of a resetting token is left out), so the decays match it to rounding. */
static __device__ void gdn_chunk_scalars(gdn_hdr s, const float *g, const float *beta,
                                         const int32_t *doc_start, int b, int h, int t0, int L,
                                         int T, int H)
{
    const int t = threadIdx.x;
    if (t < GDN_C) {
        const size_t n = ((size_t)b * T + t0 + t) * H + h;
        s.bt[t] = t < L ? beta[n] : 0.0f;
        s.e0[t] = t < L ? g[n] : 0.0f; /* g parked here until the scan has read it */
        s.reset[t] = t < L && doc_start && doc_start[(size_t)b * T + t0 + t] ? 1 : 0;
    }
    __syncthreads();
    if (t == 0) {
        double G = 0;
        int seg = 0;
        for (int r = 0; r < GDN_C; r++) {
            if (r < L) {
                if (s.reset[r]) {
                    G = 0;
                    if (r > 0) seg++;
                } else {
                    G += (double)s.e0[r];
                }
                s.G[r] = G;
                s.seg[r] = seg;
            } else {
                s.G[r] = 0;
                s.seg[r] = -1;
            }
        }
    }
    __syncthreads();
    if (t < GDN_C) {
        float a = 0.0f, z = 0.0f;
        if (t < L) {
            a = s.seg[t] == 0 ? (float)exp(s.G[t]) : 0.0f;
            z = s.seg[t] == s.seg[L - 1] ? (float)exp(s.G[L - 1] - s.G[t]) : 0.0f;
        }
        s.e0[t] = a;
        s.eL[t] = z;
    }
    __syncthreads();
}

/* E_ts: exp(G_t - G_s) for s <= t in the same segment of the chunk's L tokens, else 0 */
static __device__ __forceinline__ float gdn_decay(gdn_hdr s, int t, int u, int L)
{
    return (u <= t && t < L && s.seg[t] == s.seg[u]) ? expf((float)(s.G[t] - s.G[u])) : 0.0f;
}

/* ---- register-tile products from shared memory ----
 * acc[i][j] += sum over k in [kb, ke) of A(m0 + i, k) * B(k, n0 + j*ns), where
 * A(m, k) = A[m*ars + k*aks] and B(k, n) = B[k*bks + n*bcs]. Rows past mlast and columns
 * past nlast read row mlast and column nlast instead (always valid memory); the caller
 * discards those results. */
static __device__ __forceinline__ void gdn_tile(float acc[4][4], const float *A, int ars, int aks,
                                                int m0, int mlast, const float *B, int bks, int bcs,
                                                int n0, int ns, int nlast, int kb, int ke)
{
    const float *ap[4], *bp[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        ap[i] = A + gdn_imin(m0 + i, mlast) * ars + kb * aks;
        bp[i] = B + gdn_imin(n0 + i * ns, nlast) * bcs + kb * bks;
    }
#pragma unroll 4
    for (int k = kb; k < ke; k++) {
        float a[4], c[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a[i] = *ap[i];
            c[i] = *bp[i];
            ap[i] += aks;
            bp[i] += bks;
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
    }
}

/* two products sharing the B operand: acc1 += A1 B, acc2 += A2 B (A1, A2 alike strided) */
static __device__ __forceinline__ void gdn_tile_2a(float acc1[4][4], float acc2[4][4],
                                                   const float *A1, const float *A2, int ars,
                                                   int aks, int m0, int mlast, const float *B,
                                                   int bks, int bcs, int n0, int ns, int nlast,
                                                   int kb, int ke)
{
    const float *ap[4], *aq[4], *bp[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int m = gdn_imin(m0 + i, mlast) * ars + kb * aks;
        ap[i] = A1 + m;
        aq[i] = A2 + m;
        bp[i] = B + gdn_imin(n0 + i * ns, nlast) * bcs + kb * bks;
    }
#pragma unroll 2
    for (int k = kb; k < ke; k++) {
        float a[4], e[4], c[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a[i] = *ap[i];
            e[i] = *aq[i];
            c[i] = *bp[i];
            ap[i] += aks;
            aq[i] += aks;
            bp[i] += bks;
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                acc1[i][j] = fmaf(a[i], c[j], acc1[i][j]);
                acc2[i][j] = fmaf(e[i], c[j], acc2[i][j]);
            }
    }
}

/* two products sharing the A operand: acc1 += A B1, acc2 += A B2 (B1, B2 alike strided) */
static __device__ __forceinline__ void gdn_tile_2b(float acc1[4][4], float acc2[4][4],
                                                   const float *A, int ars, int aks, int m0,
                                                   int mlast, const float *B1, const float *B2,
                                                   int bks, int bcs, int n0, int ns, int nlast,
                                                   int kb, int ke)
{
    const float *ap[4], *bp[4], *bq[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int n = gdn_imin(n0 + i * ns, nlast) * bcs + kb * bks;
        ap[i] = A + gdn_imin(m0 + i, mlast) * ars + kb * aks;
        bp[i] = B1 + n;
        bq[i] = B2 + n;
    }
#pragma unroll 2
    for (int k = kb; k < ke; k++) {
        float a[4], c[4], d[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a[i] = *ap[i];
            c[i] = *bp[i];
            d[i] = *bq[i];
            ap[i] += aks;
            bp[i] += bks;
            bq[i] += bks;
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                acc1[i][j] = fmaf(a[i], c[j], acc1[i][j]);
                acc2[i][j] = fmaf(a[i], d[j], acc2[i][j]);
            }
    }
}

static __device__ __forceinline__ void gdn_zero(float acc[4][4])
{
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
}

/* dst[r*dp + c] = mul * src[r*rs + c0 + c] for r < rows, c < cols; 0 where r >= rv or
 * c0 + c >= cv. All threads of the block; no barrier. */
static __device__ void gdn_load(float *dst, int dp, int rows, int cols, const float *src, size_t rs,
                                int rv, int c0, int cv, float mul)
{
    for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
        const int r = e / cols, c = e - r * cols;
        float x = 0.0f;
        if (r < rv && c0 + c < cv) x = mul * src[(size_t)r * rs + c0 + c];
        dst[r * dp + c] = x;
    }
}

/* ---- cp.async (4-byte copies, zero-fill when !valid; src must be a valid address) ---- */
static __device__ __forceinline__ void gdn_async_f32(float *dst, const float *src, int valid)
{
#ifdef __CUDA_ARCH__
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
#else
    *dst = valid ? *src : 0.0f;
#endif
}

static __device__ __forceinline__ void gdn_async_commit(void)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/* wait until at most the newest committed group of this thread is still in flight */
static __device__ __forceinline__ void gdn_async_wait_all_but_newest(void)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

/* 64 rows of `cols` floats into dst (pitch dp) from src (row stride rs); rows >= rv
 * zero-filled. Issued by all threads, not committed. */
static __device__ void gdn_async_rows(float *dst, int dp, const float *src, size_t rs, int rv, int cols)
{
    for (int e = threadIdx.x; e < GDN_C * cols; e += blockDim.x) {
        const int r = e / cols, c = e - r * cols;
        const int ok = r < rv;
        gdn_async_f32(dst + r * dp + c, ok ? src + (size_t)r * rs + c : src, ok);
    }
}

/* Column c (the calling thread, c < 64) of T = (I + A)^-1 by forward substitution:
 * T_tc = [t == c] - sum_{s<t} A_ts T_sc, with A [64, GDN_PP] strictly lower triangular.
 * Fully unrolled so that the column stays in registers; four partial sums per row
 * shorten the dependency chain. */
static __device__ __forceinline__ void gdn_invert_column(float *Ts, const float *As)
{
    const int c = threadIdx.x;
    float x[GDN_C];
#pragma unroll
    for (int t = 0; t < GDN_C; t++) {
        float p[4] = {t == c ? 1.0f : 0.0f, 0.0f, 0.0f, 0.0f};
        const float *a = As + t * GDN_PP;
#pragma unroll
        for (int u = 0; u < t; u++) p[u & 3] = fmaf(-a[u], x[u], p[u & 3]);
        x[t] = (p[0] + p[1]) + (p[2] + p[3]);
    }
#pragma unroll
    for (int t = 0; t < GDN_C; t++) Ts[t * GDN_PP + c] = x[t];
}

/* ---- host side, shared by the two launchers ---- */

static inline size_t gdn_smem_state(int D)
{
    return sizeof(float) * ((size_t)D * GDN_VP + GDN_C * GDN_VP + 2 * GDN_C * gdn_pitch(D) + 2 * GDN_C);
}

/* Allow `bytes` of dynamic shared memory for `kernel` (needed above 48 KB). */
static inline void gdn_allow_smem(const void *kernel, size_t bytes)
{
    if (bytes > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

static inline void gdn_check_shape(const char *op, int B, int T, int H, int D)
{
    if (D < 1 || D > GDN_MAXD) die("%s: head dim %d outside 1..%d", op, D, GDN_MAXD);
    if (B < 1 || T < 1 || H < 1 || (long)B * H > 65535)
        die("%s: unsupported shape B=%d T=%d H=%d (need B, T, H >= 1 and B*H <= 65535)", op, B, T, H);
}

#endif
