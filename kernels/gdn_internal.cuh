/* gdn_internal.cuh: the design of the CUDA twin of src/cpu/cpu_gdn.c, the gated delta
 * rule (MODEL.md section 3), and what its forward (gdn_forward.cu) and backward
 * (gdn_backward.cu) kernels share: sizes, the per-chunk scalars, tensor-core warp tiles,
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
 * sequence end are zero): forward Uk and the state kernel's copy of K, backward Xk and the
 * copy of K, in the state kernels' shared-memory layout (rows of gdn_kpitch(D) floats,
 * pad columns zero: gdn_refill); backward Xo/X ([64, D]), Hc and dS ([D, D]) with rows of
 * gdn_r4(D) floats; and the per-token decays (eL, e0; e0, e0 beta). W (Wv, then W) lives in state_save, after the
 * start states (backend.h): the forward writes it there and the backward reads it, where
 * its prep kernel used to solve for it again from S0 (2.84 -> 2.64 ms forward + backward
 * at the shape below).
 *
 * Every product runs on the tensor cores: mma.sync m16n8k8 with TF32 operands (10-bit
 * mantissa) and fp32 accumulation; scalars, decays and the forward substitution stay
 * fp32 (G in double). Measured on an H100 against the fp32 CPU op, through the solve and
 * the state recurrence, the outputs and gradients stay within 5.3e-4 (relative,
 * norm-wise) on every case of tests/gpu/test_gpu_gdn.c, which holds them to 2e-3: far
 * finer than the bf16 rounding of the GEMMs that produce q, k, v and consume o (1e-2).
 * Each product family can instead run in 3xTF32 (x = hi + lo, both TF32; hi*hi + hi*lo +
 * lo*hi, about 2^-22 relative per product, fp32-like) by building with its GDN_SPLIT_*
 * macro below set to 3; with all five at 3 every test case met the fp32 tolerance (1e-5),
 * and the op cost 5.66 ms forward + backward at B 8, T 2048, H 12, D 85 instead of
 * 4.69 (the same kernels in TF32), which is why TF32 is the default.
 * A warp computes a tile of 16 rows x 32 columns (gdn_mma and its two-product forms); the
 * per-chunk kernels' 8 warps cover a [64, 64] block as 4 x 2 tiles, the state kernels'
 * 4 warps a [64, 32] block or the 16-row tiles of a [D, 32] one. Operands are read from
 * shared memory by scalar loads in fragment order, with arbitrary strides, so the same
 * helper serves A, A^T, B and B^T. The contraction steps by 8: [64, D] arrays keep
 * D rounded up to a multiple of 8 with zero pad columns (D = 85 -> 88, pitch 92), S and
 * dS keep zero rows past D, and products with the triangular T, M, dKK, dQK contract
 * only over the rows or columns the warp tile's rows reach. Warp tiles that lie wholly
 * right of the diagonal of K K^T, Qs K^T or wholly past column D skip their products.
 * Row pitches of 4 mod 8 (GDN_PP = 68, gdn_kpitch) spread a fragment's loads over 32
 * banks; column-wise reads meet two-way conflicts. The per-chunk kernels bring their
 * [64, x] operands into shared memory by cp.async (gdn_load_async: every array of a phase
 * in flight at once, the first ones during the G scan; gdn_sync waits and joins), a warp
 * per row (several rows a warp for panels of 16-byte copies up to 64 columns wide). q too
 * arrives unscaled by cp.async, and the kernels apply the attention scale to the products
 * that take it (M, e0 Q S0, dQK): loaded scaled through registers, its loads had been
 * the longest stall of the grads kernel. No copy loop splits an element index
 * by a runtime row length (about 20 instructions a division): with those divisions gone
 * the op took 3.84 instead of 4.29 ms, with the cp.async loads 3.27 ms (sizes below).
 * The cumulative log decay G is a prefix sum in double per chunk (a warp scan) and every
 * decay factor is exp of a difference of G's within a segment, as on the CPU. Every output element is
 * computed by one thread in a fixed order and gradients are read-add-written by their one
 * owner; row and column sums over a warp tile are reduced by shuffles in a fixed order,
 * so two runs give the same bits.
 *
 * Cost at B = 8, T = 2048, H = 12, D = 85 (3072 chunks), measured on an H100 by
 * benchmarks/bench_mixers.c: forward 0.85 ms, backward 1.59 ms (1.49 ms writing the
 * gradients, as the model does); 0.88 and 1.75 ms before the ldmatrix fragments, the
 * copies of narrow panels on all lanes and q by cp.async (Nsight Compute, unlocked
 * clocks: grads kernel 0.95 -> 0.82 ms, 388M -> 326M instructions; out 0.29 -> 0.26 ms)
 * and the state kernels' bulk copies (state 0.30 + 0.34 -> 0.27 + 0.30 ms, prep 0.27 +
 * 0.43 -> 0.30 + 0.45 ms: they write the operands with the longer pitch; at B 2, T 8192
 * the op went 2.98 -> 2.78 ms).
 * Before W was saved by the forward the backward took
 * 1.94 ms (Nsight Compute, at its locked clocks: forward prep 0.32, state 0.33, out
 * 0.35 ms; backward prep 0.75, state 0.38, grads 1.10 ms, which read 1.15 GB from DRAM
 * where its inputs are about 0.55 GB: the dq, dk passes read dO, X and W again, and
 * between a block's reads other blocks evict them from L2). The tensor-core work itself (about 40 G multiply-adds) is a
 * small part of that: the kernels are bound by instruction issue and latency. Nsight
 * Compute's per-instruction counts (--page source --print-source sass) showed where
 * the instructions went: in the state kernels, half of them were the address arithmetic
 * of 4-byte cp.async copies (about 20 instructions a copy, computed per element), and
 * only 3% were mma. The copies now step each thread's pointers from row to row
 * (gdn_copy_rows) and move 16 bytes where rows are aligned: the scratch arrays have
 * rows of gdn_r4(D) floats and the prep kernels write an aligned copy of K for the state
 * kernels (rows of k itself start anywhere when D is odd), which also take their
 * operands pre-rounded (GDN_PRE_A). That took the op from 3.28 to 2.82 ms (from 4.82 to
 * 3.43 ms at B 2, T 8192). Earlier steps: 4.37 ms before the integer TF32 rounding, the
 * division-free copy loops, the warp scan of G and the cp.async loads; 5.66 ms with
 * 3xTF32 products; 8.41 ms for the fp32 FMA version these kernels replaced.
 * Per-chunk blocks (256 threads, 2 per SM at D = 85, about 24% occupancy) wait at
 * barriers while two warps run the column-wise forward substitution of T; doing T by 16 x
 * 16 diagonal blocks and then block rows on all eight warps (the same multiply-adds in
 * more, shorter chains) made the prep kernels slower (0.34 -> 0.40 ms forward), so the
 * two-warp form stays. The state kernels (288 blocks of 4 warps, 3 per SM, so one
 * partial wave) are a serial chain of 32 chunk steps, each a few dependent mma products
 * and a cp.async refill; loading each step's Wv, Xo and Hc tiles a chunk ahead into
 * registers was tried and made them 3-9% slower. Tried this session and dropped, at
 * B 8, T 2048: running the three kernels of a pass over four groups of (b, h) rows on
 * separate streams, so that the state kernel of one group overlaps the per-chunk kernels
 * of the others (2.84 -> 2.77 ms with two groups, 2.89 with four: the per-chunk kernels
 * already fill the SMs); the grads kernel's panels 16 columns wide, double-buffered by
 * cp.async in the same shared memory (backward 1.94 -> 2.20 ms: the exposed load latency
 * it hid cost less than the loop overhead it added); <S0, dS> unrolled and v . X on all
 * warps (no change); the grads kernel's read-once copies (S0, dS, V) with an L2
 * evict-first policy, so that dO, X and W, which it reads three times, stay in L2 (its
 * DRAM reads 1.15 -> 1.07 GB, its time within 1%); the grads kernel's panels 48 columns
 * wide instead of 32 (two panels for D = 85, fewer barriers and load waits, 110 KB of
 * shared memory: backward 1.75 -> 1.74 ms, within the noise).
 * Where the time goes now (Nsight Compute's warp samples at B 8, T 2048): the per-chunk
 * kernels wait at barriers (the two-warp solve of T in the prep kernels; the panel loops)
 * and for the loads each panel loop issues and then waits for, with only two blocks an SM
 * to cover those waits (registers and shared memory); mma instructions are 3-5% of what
 * they execute. Taking the state kernels' loads away altogether (a measurement, with
 * wrong results) left 75% of their time: their chain of dependent products per chunk
 * step, shared by three blocks an SM, is what bounds them. Reaching 1.5 ms would take
 * fusing prep and out (and prep and grads) so that K, Q and the pair matrices are loaded
 * and built once, dropping the Hc buffer (the state kernel can form Qs^T diag(e0) dO
 * itself), the grads kernel's panels double-buffered within two blocks per SM, operands
 * stored transposed where a product reads them column-wise (ldmatrix needs the
 * contraction index contiguous), more value columns per state block, and state_save with
 * aligned rows (its layout is part of the op's contract with the CPU backend; its rows
 * are copied 4 bytes at a time).
 */
#ifndef DELTAMLA_GDN_INTERNAL_CUH
#define DELTAMLA_GDN_INTERNAL_CUH

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "cuda_ops.h"
}

#define GDN_C 64        /* tokens per chunk (GDN_CHUNK; checked below) */
#define GDN_PP 68       /* row pitch of a [64, 64] tile in shared memory (4 mod 8) */
#define GDN_NT 256      /* threads of the per-chunk kernels: 8 warps, 4 x 2 warp tiles of [16, 32] */
#define GDN_ST 256      /* threads of the state kernels: at most 8 warps (gdn_state_threads) */
#define GDN_DV 32       /* value columns of S per state-kernel block */
#define GDN_SP 40       /* row pitch of the state kernels' 32-wide rows (8 mod 16) */
#define GDN_VP 36       /* row pitch of the grads kernel's 32-wide panels (4 mod 8) */
#define GDN_KP 32       /* contraction panel of the backward's grads kernel */
#define GDN_MAXD 256
/* per-token scalars at the start of every block's shared memory (in floats):
 * G [64] double, seg [64] int, reset [64] int, e0 [64], eL [64], beta [64] */
#define GDN_HDR (2 * GDN_C + 5 * GDN_C)

static_assert(GDN_CHUNK == GDN_C, "the GDN kernels are written for chunks of 64 tokens");

extern __shared__ __align__(16) float gdn_smem[];

/* D rounded up to a multiple of 8 (the mma's k step), and the row pitch of [64, D]
 * arrays in shared memory: columns D..gdn_r8(D)-1 are kept zero, and a pitch of 4 mod 8
 * spreads a fragment's rows g = 0..7 and columns q = 0..3 over 32 banks */
static __host__ __device__ __forceinline__ int gdn_r8(int n) { return (n + 7) & ~7; }
static __host__ __device__ __forceinline__ int gdn_kpitch(int n) { return gdn_r8(n) + 4; }
/* the row length of the [64, D] and [D, D] scratch arrays in global memory: D rounded up to
 * a multiple of 4, so that every row starts 16-byte aligned (gdn_load_async's 16-byte
 * copies); the pad columns are never read */
static __host__ __device__ __forceinline__ int gdn_r4(int n) { return (n + 3) & ~3; }

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
 * it; warp 0 does the work, two tokens a lane, and it ends with a barrier. G is the
 * prefix sum in double of the chunk's gates, leaving out the g of a token that starts a
 * document, as a warp scan (shuffles). It equals the CPU's G (summed from the segment's
 * start) in segment 0, and elsewhere differs from it by a constant per segment: every
 * decay but e0 (segment 0 only) is exp of a difference of G's within one segment, so the
 * decays match the CPU's to rounding. seg counts the document starts after the chunk's
 * first token (ballots). */
static __device__ void gdn_chunk_scalars(gdn_hdr s, const float *g, const float *beta,
                                         const int32_t *doc_start, int b, int h, int t0, int L,
                                         int T, int H)
{
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        double a[2];
        int reset[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int r = 2 * lane + k;
            const size_t n = ((size_t)b * T + t0 + r) * H + h;
            const int ok = r < L;
            reset[k] = ok && doc_start && doc_start[(size_t)b * T + t0 + r] ? 1 : 0;
            a[k] = ok && !reset[k] ? (double)g[n] : 0.0;
            s.bt[r] = ok ? beta[n] : 0.0f;
            s.reset[r] = reset[k];
        }
        double x = a[0] + a[1]; /* inclusive scan of the lanes' pair sums */
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, x, off);
            if (lane >= off) x += y;
        }
        double before = __shfl_up_sync(0xffffffffu, x, 1);
        if (lane == 0) before = 0.0;
        const double G[2] = {before + a[0], before + a[0] + a[1]};
        const unsigned b0 = __ballot_sync(0xffffffffu, reset[0] && lane > 0), b1 = __ballot_sync(0xffffffffu, reset[1]);
        const unsigned le = lane == 31 ? 0xffffffffu : (2u << lane) - 1u, lt = (1u << lane) - 1u;
        const int seg[2] = {__popc(b0 & le) + __popc(b1 & lt), __popc(b0 & le) + __popc(b1 & le)};
        /* G and seg of the chunk's last token */
        const int last = L - 1, odd = last & 1;
        const double GL = __shfl_sync(0xffffffffu, odd ? G[1] : G[0], last >> 1);
        const int segL = __shfl_sync(0xffffffffu, odd ? seg[1] : seg[0], last >> 1);
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int r = 2 * lane + k, ok = r < L;
            s.G[r] = ok ? G[k] : 0.0;
            s.seg[r] = ok ? seg[k] : -1;
            s.e0[r] = ok && seg[k] == 0 ? (float)exp(G[k]) : 0.0f;
            s.eL[r] = ok && seg[k] == segL ? (float)exp(GL - G[k]) : 0.0f;
        }
    }
    __syncthreads();
}

/* E_ts: exp(G_t - G_s) for s <= t in the same segment of the chunk's L tokens, else 0 */
static __device__ __forceinline__ float gdn_decay(gdn_hdr s, int t, int u, int L)
{
    return (u <= t && t < L && s.seg[t] == s.seg[u]) ? expf((float)(s.G[t] - s.G[u])) : 0.0f;
}

/* ---- warp-tile products on the tensor cores ----
 * Every product is a sum of warp tiles of 16 rows x 32 columns, computed by
 * mma.sync.m16n8k8 with TF32 operands and fp32 accumulation: four n8 tiles per k step
 * of 8. A thread's 16 results acc[j][r] lie at row m0 + g + 8 (r >> 1) and column
 * n0 + 8 j + 2 q + (r & 1), g = lane / 4, q = lane % 4 (gdn_frow, gdn_fcol).
 * split 3 is 3xTF32: each operand x = hi + lo with hi = tf32(x), lo = tf32(x - hi), and
 * the product is lo*hi + hi*lo + hi*hi, which loses only lo*lo and the rounding of lo
 * (about 2^-22 relative, fp32-like); split 1 is plain TF32 (2^-11), the default. */
#ifndef GDN_SPLIT_PAIR
#define GDN_SPLIT_PAIR 1  /* K K^T, Qs K^T, and the grads kernel's X W^T, dO W^T */
#endif
#ifndef GDN_SPLIT_SOLVE
#define GDN_SPLIT_SOLVE 1 /* products with T and M: Wv, Uk, Xk, Xo, W, M W, M^T dO */
#endif
#ifndef GDN_SPLIT_STATE
#define GDN_SPLIT_STATE 1 /* the state kernels' chunk-to-chunk recurrences */
#endif
#ifndef GDN_SPLIT_S0
#define GDN_SPLIT_S0 1    /* per-chunk products with S0 or dS: Qs S0, K S0, Hc, dO S0^T, ... */
#endif
#ifndef GDN_SPLIT_GRAD
#define GDN_SPLIT_GRAD 1  /* the grads kernel's dq, dk from dKK and dQK */
#endif

static __device__ __forceinline__ int gdn_frow(int m0, int r) { return m0 + (int)((threadIdx.x & 31) >> 2) + ((r >> 1) << 3); }
static __device__ __forceinline__ int gdn_fcol(int n0, int j, int r) { return n0 + 8 * j + 2 * (int)(threadIdx.x & 3) + (r & 1); }

/* x rounded to TF32, to nearest with ties away from zero: the bits of cvt.rna.tf32.f32
 * for every finite x, by two integer ops (add half an ulp of the 10-bit mantissa to the
 * magnitude, clear the 13 low bits). Conversions issue at a quarter of the integer rate
 * on sm_90, and every mma.sync here takes six operand conversions; the integer form took
 * the op from 4.37 to 4.29 ms forward + backward (B 8, T 2048, H 12, D 85, an H100). */
static __device__ __forceinline__ uint32_t gdn_to_tf32(float x)
{
    return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
}

/* Operands stored already rounded to TF32 (plain TF32 only): a product's split may carry
 * GDN_PRE_A and/or GDN_PRE_B, and then that operand's fragments are taken as they lie,
 * without the two rounding instructions per element (the rounding is idempotent, so the
 * bits are the same). The state kernels' products take their operands so (see
 * gdn_state_split): their A operands (Uk, Xk and K, written by the prep kernels) and the
 * B operand of the state update (eL W or e0 beta X, written by the state kernel), all
 * stored through gdn_state_op, which rounds them when the state products run in plain
 * TF32 and leaves them whole for 3xTF32. */
#define GDN_PRE_A 16
#define GDN_PRE_B 32

/* the state kernels' split with its pre-rounded operands (GDN_PRE_A: Uk, Xk, K; with
 * pre_b also GDN_PRE_B) */
#define GDN_STATE_PRE (GDN_SPLIT_STATE == 1)
static __host__ __device__ __forceinline__ int gdn_state_split(int pre_b)
{
    return GDN_SPLIT_STATE | (GDN_STATE_PRE ? GDN_PRE_A | (pre_b ? GDN_PRE_B : 0) : 0);
}

/* an operand of the state products as stored (see GDN_PRE_A) */
static __device__ __forceinline__ float gdn_state_op(float x)
{
    return GDN_STATE_PRE ? __uint_as_float(gdn_to_tf32(x)) : x;
}

/* hi (and lo when split is 3) of n floats; pre: x already TF32 (split 1 only) */
static __device__ __forceinline__ void gdn_split_n(int split, int pre, const float *x, uint32_t *hi, uint32_t *lo,
                                                   int n)
{
#pragma unroll
    for (int i = 0; i < n; i++) {
        hi[i] = pre ? __float_as_uint(x[i]) : gdn_to_tf32(x[i]);
        lo[i] = (split & 3) == 3 ? gdn_to_tf32(x[i] - __uint_as_float(hi[i])) : 0u;
    }
}

static __device__ __forceinline__ void gdn_mma_tf32(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* c += a b in the chosen precision, the small terms first */
static __device__ __forceinline__ void gdn_mma_x(int split, float c[4], const uint32_t ah[4], const uint32_t al[4],
                                                 const uint32_t bh[2], const uint32_t bl[2])
{
    if ((split & 3) == 3) {
        gdn_mma_tf32(c, al, bh);
        gdn_mma_tf32(c, ah, bl);
    }
    gdn_mma_tf32(c, ah, bh);
}

/* Where a warp reads its fragments: A(m, k) = A[m*ars + k*aks], B(k, n) = B[k*bks + n*bcs].
 * Rows past mlast and columns past nlast read row mlast and column nlast instead (valid
 * memory; the caller discards those results). The contraction runs over k = kb, kb + 8,
 * ... while k < ke, so it reads up to k = roundup8(ke) - 1: the caller guarantees that
 * this memory exists, holds finite values, and that A or B is zero there.
 * An operand whose contraction index is contiguous (aks == 1 for A, bks == 1 for B: rows
 * of A, and rows of B^T, in shared memory; every call site passes its strides as
 * constants, so the choice is made at compile time) is read by ldmatrix: one
 * ldmatrix.x4 brings the four 8 x 4 blocks of an A fragment, or the two blocks of each of
 * two B fragments, where scalar loads took 4 and 8 instructions. ldmatrix moves 8 x 8
 * blocks of 16-bit elements, so that lane l receives 16-bit elements 2 (l % 4) and
 * 2 (l % 4) + 1 of row l / 4 of a block: for 32-bit elements that is element l % 4 of row
 * l / 4 of an 8 x 4 block, which is where mma.m16n8k8.tf32 wants it. It needs each row of
 * 4 floats 16-byte aligned (row pitches and panel offsets multiples of 4 floats, as all
 * are here); the pitches of 4 mod 8 that spread the scalar loads over 32 banks do the same
 * for its 8 rows of 16 bytes. */
typedef struct gdn_mpos {
    int a0, a1, a4;   /* offsets of rows g and g + 8 at k = kb + q; 4 steps of k */
    int b[4], b4;     /* offsets of column n0 + 8 j + g at k = kb + q; 4 steps of k */
    int a8, b8;
    int lda, ldb;     /* A, B read by ldmatrix (aks == 1, bks == 1) */
    int la, lb[2];    /* ldmatrix: offset of the row this lane addresses (A; B n-tiles 0-1, 2-3) */
} gdn_mpos;

static __device__ __forceinline__ gdn_mpos gdn_mpos_at(int ars, int aks, int m0, int mlast, int bks, int bcs,
                                                       int n0, int nlast, int kb)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, mi = lane >> 3, rr = lane & 7;
    gdn_mpos p;
    p.a0 = gdn_imin(m0 + g, mlast) * ars + (kb + q) * aks;
    p.a1 = gdn_imin(m0 + g + 8, mlast) * ars + (kb + q) * aks;
    p.a4 = 4 * aks;
    p.a8 = 8 * aks;
#pragma unroll
    for (int j = 0; j < 4; j++) p.b[j] = gdn_imin(n0 + 8 * j + g, nlast) * bcs + (kb + q) * bks;
    p.b4 = 4 * bks;
    p.b8 = 8 * bks;
    p.lda = aks == 1;
    p.ldb = bks == 1;
    /* A: blocks (rows 0-7, k 0-3), (rows 8-15, k 0-3), (rows 0-7, k 4-7), (rows 8-15, k 4-7);
     * B: blocks (n-tile 2h, k 0-3), (n-tile 2h, k 4-7), (n-tile 2h + 1, k 0-3), (2h + 1, k 4-7) */
    p.la = gdn_imin(m0 + rr + 8 * (mi & 1), mlast) * ars + kb + 4 * (mi >> 1);
#pragma unroll
    for (int h = 0; h < 2; h++) p.lb[h] = gdn_imin(n0 + 8 * (2 * h + (mi >> 1)) + rr, nlast) * bcs + kb + 4 * (mi & 1);
    return p;
}

static __device__ __forceinline__ void gdn_mpos_step(gdn_mpos *p)
{
    p->a0 += p->a8;
    p->a1 += p->a8;
#pragma unroll
    for (int j = 0; j < 4; j++) p->b[j] += p->b8;
    p->la += 8;
    p->lb[0] += 8;
    p->lb[1] += 8;
}

/* four 8 x 4 blocks of floats by one ldmatrix.x4: lane l addresses row l % 8 of block l / 8 */
static __device__ __forceinline__ void gdn_ldsm4(float x[4], const float *row)
{
#ifdef __CUDA_ARCH__
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    uint32_t r[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#pragma unroll
    for (int i = 0; i < 4; i++) x[i] = __uint_as_float(r[i]);
#else
    for (int i = 0; i < 4; i++) x[i] = row[i];
#endif
}

static __device__ __forceinline__ void gdn_afrag(int split, const float *A, const gdn_mpos *p, uint32_t ah[4], uint32_t al[4])
{
    float x[4];
    if (p->lda) {
        gdn_ldsm4(x, A + p->la);
    } else {
        x[0] = A[p->a0];
        x[1] = A[p->a1];
        x[2] = A[p->a0 + p->a4];
        x[3] = A[p->a1 + p->a4];
    }
    gdn_split_n(split, (split & GDN_PRE_A) != 0, x, ah, al, 4);
}

/* the B fragments of the warp tile's four n-tiles */
static __device__ __forceinline__ void gdn_bfrags(int split, const float *B, const gdn_mpos *p, uint32_t bh[4][2],
                                                  uint32_t bl[4][2])
{
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
        float x[4];
        if (p->ldb) {
            gdn_ldsm4(x, B + p->lb[j >> 1]);
        } else {
            x[0] = B[p->b[j]];
            x[1] = B[p->b[j] + p->b4];
            x[2] = B[p->b[j + 1]];
            x[3] = B[p->b[j + 1] + p->b4];
        }
        gdn_split_n(split, (split & GDN_PRE_B) != 0, x, bh[j], bl[j], 2);
        gdn_split_n(split, (split & GDN_PRE_B) != 0, x + 2, bh[j + 1], bl[j + 1], 2);
    }
}

/* acc += A B over the warp tile (m0, n0), k in [kb, ke) */
static __device__ __forceinline__ void gdn_mma(int split, float acc[4][4], const float *A, int ars, int aks, int m0,
                                               int mlast, const float *B, int bks, int bcs, int n0, int nlast,
                                               int kb, int ke)
{
    gdn_mpos p = gdn_mpos_at(ars, aks, m0, mlast, bks, bcs, n0, nlast, kb);
#pragma unroll 2
    for (int k = kb; k < ke; k += 8) {
        uint32_t ah[4], al[4], bh[4][2], bl[4][2];
        gdn_afrag(split, A, &p, ah, al);
        gdn_bfrags(split, B, &p, bh, bl);
#pragma unroll
        for (int j = 0; j < 4; j++) gdn_mma_x(split, acc[j], ah, al, bh[j], bl[j]);
        gdn_mpos_step(&p);
    }
}

/* two products sharing B: acc1 += A1 B, acc2 += A2 B (A1, A2 alike strided) */
static __device__ __forceinline__ void gdn_mma_2a(int split, float acc1[4][4], float acc2[4][4], const float *A1,
                                                  const float *A2, int ars, int aks, int m0, int mlast,
                                                  const float *B, int bks, int bcs, int n0, int nlast, int kb, int ke)
{
    gdn_mpos p = gdn_mpos_at(ars, aks, m0, mlast, bks, bcs, n0, nlast, kb);
#pragma unroll 1
    for (int k = kb; k < ke; k += 8) {
        uint32_t ah[4], al[4], eh[4], el[4], bh[4][2], bl[4][2];
        gdn_afrag(split, A1, &p, ah, al);
        gdn_afrag(split, A2, &p, eh, el);
        gdn_bfrags(split, B, &p, bh, bl);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            gdn_mma_x(split, acc1[j], ah, al, bh[j], bl[j]);
            gdn_mma_x(split, acc2[j], eh, el, bh[j], bl[j]);
        }
        gdn_mpos_step(&p);
    }
}

/* two products sharing A: acc1 += A B1, acc2 += A B2 (B1, B2 alike strided) */
static __device__ __forceinline__ void gdn_mma_2b(int split, float acc1[4][4], float acc2[4][4], const float *A,
                                                  int ars, int aks, int m0, int mlast, const float *B1,
                                                  const float *B2, int bks, int bcs, int n0, int nlast, int kb, int ke)
{
    gdn_mpos p = gdn_mpos_at(ars, aks, m0, mlast, bks, bcs, n0, nlast, kb);
#pragma unroll 1
    for (int k = kb; k < ke; k += 8) {
        uint32_t ah[4], al[4], bh[4][2], bl[4][2], ch[4][2], cl[4][2];
        gdn_afrag(split, A, &p, ah, al);
        gdn_bfrags(split, B1, &p, bh, bl);
        gdn_bfrags(split, B2, &p, ch, cl);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            gdn_mma_x(split, acc1[j], ah, al, bh[j], bl[j]);
            gdn_mma_x(split, acc2[j], ah, al, ch[j], cl[j]);
        }
        gdn_mpos_step(&p);
    }
}

static __device__ __forceinline__ void gdn_zero(float acc[4][4])
{
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
}

/* ---- cp.async ---- */
/* one cp.async of 4 bytes (dst, src 4-byte aligned) or 16 bytes (both 16-byte aligned,
 * through L2 only) to the shared address dst, reading the first `bytes` of src and
 * zero-filling the rest (bytes 0: nothing is read, src need only be a valid address) */
static __device__ __forceinline__ void gdn_cp4(unsigned dst, const float *src, int bytes)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
#endif
}

static __device__ __forceinline__ void gdn_cp16(unsigned dst, const float *src, int bytes)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
#endif
}

/* wait until every cp.async of this thread has landed */
static __device__ __forceinline__ void gdn_async_wait_all(void)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

/* The barrier of the per-chunk kernels: this thread's cp.async copies landed, then
 * __syncthreads, so every thread's copies are visible to the block (a no-op wait where
 * none are in flight). */
static __device__ __forceinline__ void gdn_sync(void)
{
    gdn_async_wait_all();
    __syncthreads();
}

/* The copies of gdn_load_async, `per` floats each (1 or 4; with 4, src, rs, dst and dp
 * 16-byte aligned). A row takes npc = cols / per copies. Where npc > 16, lane l takes
 * columns per * l, per * (l + 32), ... of rows w, w + nw, ... (w its warp, nw the warps
 * of the block); where npc <= 16 (16-byte copies of panels up to 64 columns wide) a warp
 * covers 32 / npc rows at once, lane l the copy l % npc of row l / npc of them, so that
 * all its lanes copy: 32-column panels had kept 24 of the 32 lanes idle and taken four
 * times the loop iterations, a quarter of all instructions of the grads kernel. The rows
 * below rv are copied with the pointers stepped from row to row and a fixed byte count
 * per lane (its valid columns), the rows from rv on are zero-filled (a copy of no bytes
 * from src). */
static __device__ __forceinline__ void gdn_copy_rows(int per, unsigned dst, int dp, int rows, int cols,
                                                     const float *src, size_t rs, int rv, int ce)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5, w = threadIdx.x >> 5, rl = gdn_imin(rows, rv);
    const int npc = (cols + per - 1) / per, rpw = npc <= 16 ? 32 / npc : 1;
    const int sub = rpw > 1 ? lane / npc : 0, pc = rpw > 1 ? lane - sub * npc : lane;
    if (sub >= rpw) return; /* lanes past the last whole row of a warp pass */
    const int r0 = w * rpw + sub;
    const size_t sstep = (size_t)(nw * rpw) * rs;
    const unsigned dstep = 4u * (unsigned)(nw * rpw * dp);
    for (int cb = per * pc; cb < cols; cb += 32 * per) {
        const int n = ce - cb < 0 ? 0 : ce - cb > per ? per : ce - cb; /* valid floats of a valid row */
        const float *sp = n ? src + (size_t)r0 * rs + cb : src;
        const size_t sst = n ? sstep : 0;
        unsigned d = dst + 4u * (unsigned)(r0 * dp + cb);
        int r = r0;
#pragma unroll 4
        for (; r < rl; r += nw * rpw, sp += sst, d += dstep) {
            if (per == 4) gdn_cp16(d, sp, 4 * n);
            else gdn_cp4(d, sp, 4 * n);
        }
#pragma unroll 4
        for (; r < rows; r += nw * rpw, d += dstep) {
            if (per == 4) gdn_cp16(d, src, 0);
            else gdn_cp4(d, src, 0);
        }
    }
}

/* dst[r*dp + c] = src[r*rs + c0 + c] for r < rows, c < cols (0 where r >= rv or c0 + c >=
 * cv) by cp.async: the copies are only issued, so the loads of several arrays are in
 * flight together; gdn_sync makes them visible. All threads of the block; no barrier. A
 * warp per row, its lanes along the row (narrow panels: several rows a warp,
 * gdn_copy_rows), with no integer division: an element index split by a runtime row
 * length costs about 20 instructions, and those splits were most of the instructions of
 * the per-chunk kernels. Where the
 * source rows and the destination are 16-byte aligned (src + c0, rs, dst, dp; cols a
 * multiple of 4: the scratch arrays, whose rows have gdn_r4(D) floats) each copy moves 4
 * floats, otherwise one. Each thread keeps its copy's pointers and steps them row to
 * row: computed afresh for every element (a 64-bit row offset, a column, a validity
 * select), a 4-byte copy took about 20 instructions, half of all the state kernels
 * executed. */
static __device__ __forceinline__ void gdn_load_async(float *dst, int dp, int rows, int cols, const float *src,
                                                      size_t rs, int rv, int c0, int cv)
{
    const int ce = gdn_imin(cols, cv - c0);
    const float *s0 = src + c0;
    const unsigned d0 = (unsigned)__cvta_generic_to_shared(dst);
    if ((((size_t)s0 | rs | (size_t)dp | (size_t)cols) & 3) == 0 && ((size_t)s0 & 15) == 0 && (d0 & 15) == 0)
        gdn_copy_rows(4, d0, dp, rows, cols, s0, rs, rv, ce);
    else
        gdn_copy_rows(1, d0, dp, rows, cols, s0, rs, rv, ce);
}

/* ---- bulk copies (the Hopper copy engine) and mbarriers: the state kernels' loads ----
 * The prep kernels write the state kernels' per-chunk operands (Uk or Xk, and K) as
 * [64, dp] arrays with the state kernels' own shared-memory row pitch dp = gdn_kpitch(D)
 * and zero pad columns, so that each chunk's array is one contiguous 16-byte aligned
 * block; a state kernel brings it, and the chunk's 128 per-token scalars, into shared
 * memory by one cp.async.bulk each, issued by one thread and completing on an mbarrier
 * that counts the bytes. The cp.async loops these replace had issued a 16-byte copy per
 * lane and row, and with their address stepping they were a fifth of the forward state
 * kernel's instructions (62M against 72M in all now); a bulk copy per row (64 a refill)
 * cut as many instructions but made the latency-bound case (B 2, T 8192: one block an SM)
 * 8% slower. One thread arms the barrier with the byte count of a refill before a
 * __syncthreads that precedes every copy of that refill, so that no copy can complete on
 * a phase that is not armed yet; every thread then waits for the phase's parity. */
static __device__ __forceinline__ unsigned gdn_smem_addr(const void *p)
{
    return (unsigned)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void gdn_mbar_init(uint64_t *bar)
{
#ifdef __CUDA_ARCH__
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(gdn_smem_addr(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

/* one arrival (the barrier's only one) that also expects `bytes` from bulk copies */
static __device__ __forceinline__ void gdn_mbar_expect(uint64_t *bar, unsigned bytes)
{
#ifdef __CUDA_ARCH__
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(gdn_smem_addr(bar)), "r"(bytes)
                 : "memory");
#endif
}

/* wait until the phase of the given parity has completed */
static __device__ __forceinline__ void gdn_mbar_wait(uint64_t *bar, unsigned parity)
{
#ifdef __CUDA_ARCH__
    asm volatile("{\n"
                 ".reg .pred done;\n"
                 "GDN_MBAR_WAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra GDN_MBAR_WAIT_%=;\n"
                 "}\n" ::"r"(gdn_smem_addr(bar)),
                 "r"(parity)
                 : "memory");
#endif
}

/* bytes (a multiple of 16; dst, src 16-byte aligned) from global src to shared dst,
 * completing on bar */
static __device__ __forceinline__ void gdn_bulk_load(float *dst, const float *src, unsigned bytes, uint64_t *bar)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     gdn_smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(gdn_smem_addr(bar))
                 : "memory");
#endif
}

/* One refill of a state kernel: the chunk's [64, dp] array at src to dst, and (sv not
 * NULL) its 128 per-token scalars at sv to sc, each by one bulk copy; gdn_refill_bytes(dp,
 * sv != NULL) is its byte count for gdn_mbar_expect. */
static __host__ __device__ __forceinline__ unsigned gdn_refill_bytes(int dp, int scalars)
{
    return (unsigned)(sizeof(float) * (GDN_C * dp + (scalars ? 2 * GDN_C : 0)));
}

static __device__ __forceinline__ void gdn_refill(float *dst, const float *src, int dp, float *sc, const float *sv,
                                                  uint64_t *bar)
{
    if (threadIdx.x == 0) gdn_bulk_load(dst, src, (unsigned)(sizeof(float) * GDN_C * dp), bar);
    if (threadIdx.x == 32 && sv) gdn_bulk_load(sc, sv, (unsigned)(sizeof(float) * 2 * GDN_C), bar);
}

/* The start of a state kernel: its [r8(D), GDN_SP] tile S zeroed, its two mbarriers
 * initialised and armed for the first chunk, whose refills it issues: the A operand (Uk
 * or Xk) at A with the scalars at sv on bar[0], K at K on bar[1]. All threads. */
static __device__ __forceinline__ void gdn_state_start(float *S, int D, uint64_t *bar, float *Ab, const float *A,
                                                       float *Kb, const float *K, int dp, float *sc, const float *sv)
{
    for (int e = threadIdx.x; e < gdn_r8(D) * GDN_SP; e += (int)blockDim.x) S[e] = 0.0f;
    if (threadIdx.x == 0) {
        gdn_mbar_init(&bar[0]);
        gdn_mbar_init(&bar[1]);
        gdn_mbar_expect(&bar[0], gdn_refill_bytes(dp, 1));
        gdn_mbar_expect(&bar[1], gdn_refill_bytes(dp, 0));
    }
    __syncthreads();
    gdn_refill(Ab, A, dp, sc, sv, &bar[0]);
    gdn_refill(Kb, K, dp, sc, NULL, &bar[1]);
}

/* K of the chunk (Ks [64, dp] in shared memory, rows past the sequence end and columns
 * D..r8(D)-1 zero) to Kp [64, dp] in scratch, through gdn_state_op: the state kernels'
 * copy of K, in their shared-memory layout (see gdn_refill; rows of k itself do not even
 * start 16-byte aligned when D is odd), pad columns zero, values already their TF32
 * operands. All threads; no barrier. */
static __device__ __forceinline__ void gdn_store_kpad(float *Kp, const float *Ks, int dp, int D)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int r = threadIdx.x >> 5; r < GDN_C; r += nw)
        for (int c = lane; c < dp; c += 32) Kp[(size_t)r * dp + c] = c < D ? gdn_state_op(Ks[r * dp + c]) : 0.0f;
}

/* The pad columns D..dp-1 of a state-kernel operand in scratch (the [64, dp] rows at g):
 * the prep kernels' epilogues write those that lie in the warp tile of column D - 1 (up
 * to the next multiple of 32); this zeroes the rest, if any (D a multiple of 32, or the
 * pitch reaching past that tile), threads 0..63 a row each; no barrier. */
static __device__ __forceinline__ void gdn_zero_pad(float *g, int dp, int D)
{
    if (threadIdx.x < GDN_C)
        for (int c = (D + 31) & ~31; c < dp; c++) g[(size_t)threadIdx.x * dp + c] = 0.0f;
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

/* The state kernels run with 4 or 8 warps. With 4, warp w computes row tile w of their
 * [64, 32] product (W = Wv - Uk S, X = Xo + Xk dS) over the whole contraction. With 8,
 * warp w takes row tile w % 4 over half of it, k < gdn_state_kmid(D) for warps 0-3, the
 * rest for warps 4-7, which park their partial sums in the block's [64, GDN_SP] tile for
 * warps 0-3 to add (gdn_state_half); the other product's row tiles spread over 8 warps.
 * Eight warps shorten each chunk step's chain of dependent products, which is what
 * bounds a block that has an SM to itself: at B 2, T 8192, H 12, D 85 (72 blocks) the op
 * took 3.05 instead of 3.25 ms forward + backward. Where blocks share SMs they are bound
 * by the SMs' throughput instead, and the extra sums cost: at B 8, T 2048 (288 blocks)
 * 2.68 against 2.64 ms. So 8 warps run where the blocks fit on the SMs one each
 * (gdn_state_threads). */
static __host__ __device__ __forceinline__ int gdn_state_kmid(int D) { return 8 * ((gdn_r8(D) / 8 + 1) / 2); }

/* acc (the thread's fragment of row tile m0) += the other half's partial sums from tile
 * P (pitch GDN_SP): warps 4-7 store theirs, barrier, warps 0-3 add them. All threads. */
static __device__ __forceinline__ void gdn_state_half(float acc[4][4], float *P, int m0)
{
    if (blockDim.x <= 128) return; /* 4 warps: no halves */
    const int upper = threadIdx.x >= 128;
    if (upper)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) P[gdn_frow(m0, r) * GDN_SP + gdn_fcol(0, j, r)] = acc[j][r];
    __syncthreads();
    if (!upper)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[j][r] += P[gdn_frow(m0, r) * GDN_SP + gdn_fcol(0, j, r)];
}

/* the contraction range [kb, ke) of the calling warp in a state kernel's [64, 32] product
 * over k < D (the whole of it with 4 warps) */
static __device__ __forceinline__ void gdn_state_krange(int D, int *kb, int *ke)
{
    const int kmid = gdn_imin(gdn_state_kmid(D), D), upper = blockDim.x > 128 && threadIdx.x >= 128;
    *kb = upper ? kmid : 0;
    *ke = upper || blockDim.x <= 128 ? D : kmid;
}

/* The base of the state kernels' [64, 32] product (Wv, Xo): the rows of the calling
 * thread's fragment (row tile w of warps 0-3) in the nv valid columns of the [64, Dp] rows
 * at g, 0 elsewhere. The state kernels issue these loads at the top of a chunk step,
 * before they wait for the chunk's shared operands, so that their latency overlaps the
 * wait: loaded right before the product, they were the longest stall of the forward state
 * kernel (9% of its warp samples at the subtraction that waited for them). */
static __device__ __forceinline__ void gdn_state_base(float base[4][4], const float *g, int Dp, int nv)
{
    const int warp = threadIdx.x >> 5, m0 = 16 * (warp & 3), lower = warp < 4;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int n = gdn_fcol(0, j, i);
            base[j][i] = lower && n < nv ? g[(size_t)gdn_frow(m0, i) * Dp + n] : 0.0f;
        }
}

/* The state kernels' [64, 32] product for the block's value columns: R = Base + sgn A S,
 * A [64, dp] in shared memory (Uk, Xk), S [r8(D), GDN_SP] (the state or its gradient),
 * Base the thread's fragment of the [64, Dp] rows at g in global memory (Wv, Xo; from
 * gdn_state_base), which R overwrites in its nv valid columns. Warps 0-3 return their row
 * tile of R in r; P is the tile that gdn_state_half uses. All threads. */
static __device__ __forceinline__ void gdn_state_product(float r[4][4], const float base[4][4], float *g, int Dp,
                                                         int nv, const float *A, int dp, const float *S, float *P,
                                                         int D, float sgn)
{
    const int warp = threadIdx.x >> 5, m0 = 16 * (warp & 3), lower = warp < 4;
    int kb, ke;
    gdn_state_krange(D, &kb, &ke);
    float acc[4][4];
    gdn_zero(acc);
    gdn_mma(gdn_state_split(0), acc, A, dp, 1, m0, GDN_C - 1, S, GDN_SP, 1, 0, GDN_DV - 1, kb, ke);
    gdn_state_half(acc, P, m0);
    if (lower)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int n = gdn_fcol(0, j, i);
                r[j][i] = base[j][i] + sgn * acc[j][i];
                if (n < nv) g[(size_t)gdn_frow(m0, i) * Dp + n] = r[j][i];
            }
}

/* Rows 0..D-1 of a state kernel's [r8(D), GDN_SP] tile S, its nv valid columns, to g (row
 * stride rs): warp w stores rows w, w + warps, ..., lane l column l, with its pointers
 * stepped from row to row (a 64-bit offset computed afresh for every row had made this
 * loop an eighth of the forward state kernel's instructions). All threads; no barrier. */
static __device__ __forceinline__ void gdn_state_store(float *g, size_t rs, const float *S, int D, int nv)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5, w = threadIdx.x >> 5;
    if (lane >= nv) return;
    float *gp = g + (size_t)w * rs + lane;
    const float *sp = S + w * GDN_SP + lane;
    const size_t gstep = (size_t)nw * rs;
#pragma unroll 4
    for (int r = w; r < D; r += nw, gp += gstep, sp += nw * GDN_SP) *gp = *sp;
}

/* ---- host side, shared by the two launchers ---- */

/* threads of the state kernels for `blocks` blocks: 8 warps where every block can have an
 * SM to itself, else 4 (see gdn_state_half); cuda_gdn_set_state_warps forces either */
int gdn_state_threads(int blocks);

/* the state kernels' shared memory: S [r8(D), GDN_SP], the product tile [64, GDN_SP], the
 * two operand arrays [64, dp], 128 per-token scalars and two mbarriers (4 floats) */
static inline size_t gdn_smem_state(int D)
{
    return sizeof(float) * ((size_t)gdn_r8(D) * GDN_SP + GDN_C * GDN_SP + 2 * GDN_C * gdn_kpitch(D) + 2 * GDN_C + 4);
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
