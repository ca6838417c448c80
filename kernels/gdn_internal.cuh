/* gdn_internal.cuh: the design of the CUDA twin of src/cpu/cpu_gdn.c, the gated delta
 * rule (MODEL.md section 3), and what its forward (gdn_forward.cu) and backward
 * (gdn_backward.cu) kernels share: sizes, the per-chunk scalars, the triangular solve and
 * the launchers' shape and shared-memory checks here; tensor-core warp tiles in
 * gdn_mma.cuh, copies into shared memory in gdn_copy.cuh, the state kernels' helpers in
 * gdn_state.cuh (all three included below).
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
 * (gdn_backward.cu); where B H is large next to the number of chunks (gdn_chain_use) and
 * D <= 96, the prep and state kernels of each direction give way to one chained kernel
 * (gdn_chain.cu), which hands the states from chunk to chunk through a small ring in
 * global memory under per-chunk flags.
 * Per-chunk intermediates live in cuda_scratch with 64 rows per chunk (rows past the
 * sequence end are zero): forward Uk and the state kernel's copy of K, backward Xk and the
 * copy of K, in the state kernels' shared-memory layout (rows of gdn_kpitch(D) floats,
 * pad columns zero: gdn_refill); backward Xo/X ([64, D]), Hc and dS ([D, D]) with rows of
 * gdn_r4(D) floats; the backward's E o KK and M (the two triangles of one [64, 64] block,
 * from its prep kernel to its grads kernel: gdn_pairs_put_m); and the per-token decays
 * (eL, e0; e0, e0 beta). W (Wv, then W) lives in state_save, after the start states
 * (backend.h): the forward writes it there and the
 * backward reads it, where its prep kernel used to solve for it again from S0 (2.84 ->
 * 2.64 ms forward + backward at the shape below).
 *
 * Every product runs on the tensor cores: mma.sync m16n8k8 with TF32 operands (10-bit
 * mantissa) and fp32 accumulation; scalars, decays and the forward substitution stay
 * fp32 (G in double). Measured on an H100 against the fp32 CPU op, through the solve and
 * the state recurrence, the outputs and gradients stay within 5.3e-4 (relative,
 * norm-wise) on every case of tests/gpu/test_gpu_gdn.c, which holds them to 2e-3: far
 * finer than the bf16 rounding of the GEMMs that produce q, k, v and consume o (1e-2).
 * Each product family can instead run in 3xTF32 (x = hi + lo, both TF32; hi*hi + hi*lo +
 * lo*hi, about 2^-22 relative per product, fp32-like) by building with its GDN_SPLIT_*
 * macro below set to 3; with all five at 3 every test case met the fp32 tolerance (1e-5;
 * largest error 4.0e-6), and the op cost 2.48 ms forward + backward at B 8, T 2048,
 * H 12, D 85 instead of 2.05 (the same kernels in TF32; 5.66 against 4.69 ms in an
 * earlier form of them), which is why TF32 is the default.
 * A warp computes a tile of 16 rows x 32 columns (gdn_mma and its two-product forms; the
 * grads kernel's dq, dk passes 16 x 48 where D > 64, gdn_mma_n); the per-chunk kernels'
 * 8 warps cover a [64, 64] block as 4 x 2 tiles, the state kernels' 4 warps a [64, 8 snt]
 * block or the 16-row tiles of a [D, 8 snt] one (24, 32 or 48 value columns, gdn_state_nt).
 * Operands are read from
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
 * benchmarks/bench_mixers.c: forward 0.46 ms, backward 1.06 ms (0.97 ms writing the
 * gradients, as the model does) with the chained kernels (gdn_chain.cu) built for D = 85
 * (GDN_FIXED_D; 0.49, 1.11 and 1.01-1.02 ms in the general ones); in the
 * three-kernel form forward 0.73 ms, backward 1.32 ms (1.23 ms); 0.81 and 1.40 ms before the state kernels' 48-column
 * blocks, the block solve of T and the pairs handed from the prep kernel to the grads
 * kernel (gdn_state_nt, gdn_invert_offdiag, Pbuf in gdn_backward.cu). Before that,
 * 0.85 and 1.59 ms: the forward prep, forward
 * out and backward prep kernels then took 84, 101 and 101 KB of shared memory and up to
 * 126 registers, so two blocks shared an SM (25% occupancy); laid out in 66, 75 and
 * 66 KB (regions reused as their contents die: T over A, W over K, q reloaded) and held
 * to 80 registers, three do, and Nsight Compute timed them 0.298 -> 0.279, 0.258 ->
 * 0.235 and 0.443 -> 0.387 ms; the grads kernel's dq, dk terms in one pass of 96 key
 * columns instead of two of 64 (dO, X and W read once, not twice) took the backward
 * 1.53 -> 1.40 ms. Earlier, 0.88 and 1.75 ms before the ldmatrix fragments, the
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
 * Per-chunk blocks (256 threads; 2 per SM for the grads kernel, 3 for the others at
 * D = 85) wait at barriers while two warps run the column-wise forward substitution of
 * T's two 32 x 32 diagonal blocks; its lower-left block then comes from two block
 * products on all eight warps (gdn_invert_diag, gdn_invert_offdiag). With the whole of T
 * by substitution on two warps (chains of 64 rows) the prep kernels took 0.280 and 0.386
 * ms instead of 0.254 and 0.356 (and 0.247 and 0.332 with no solve at all, a timing-only
 * build). An earlier try, T by 16 x 16 diagonal blocks and then block rows on all eight
 * warps, had made the forward prep slower (0.34 -> 0.40 ms). The state kernels (at D =
 * 85 and B 8, H 12: 192 blocks of 4 warps and 48 value columns, one or two an SM; 384
 * blocks of 24 columns had read each chunk's [64, D] operands twice as often and took
 * 0.255 and 0.293 ms instead of 0.228 and 0.255) are a serial chain of 32 chunk steps,
 * each a few dependent mma products and a cp.async refill; loading each step's Wv, Xo and Hc tiles a chunk ahead into
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
 * Where the time goes now (Nsight Compute at B 8, T 2048): every kernel is bound by
 * latency, none by a throughput: DRAM at 33-51% of its peak, the SMs at 21-48%, about 9
 * cycles between a warp's instructions. The per-chunk kernels wait at barriers (the
 * two-warp solve of T in the prep kernels; the panel loops) and for the loads each panel
 * loop issues and then waits for, with few warps an SM to cover those waits (three
 * blocks' worth, 37.5% occupancy, gained each 6-13%); mma instructions are 3-5% of what
 * they execute. The state kernels ran 0.73 waves (288 blocks of 32 value columns, 3 an
 * SM at most: 13.7% achieved occupancy), so the SMs that held three blocks set the pace;
 * with blocks of 24 columns (384, one wave of 3 an SM at D = 85) each SM carries at most
 * 72 columns instead of 96, and the op took 2.21 -> 2.18 ms. Taking their loads away
 * altogether (a measurement, with wrong results) left 75% of their time; yet shortening
 * their chain of dependent products did not help either: the S update of two row tiles
 * interleaved in one warp and the W product's k steps split over two accumulator sets
 * took the op 2.44 -> 2.42 ms at B 8, T 2048 and 2.75 -> 2.93 ms at B 2, T 8192
 * (dropped). That paragraph is about the three-kernel form; the chained kernels
 * (gdn_chain.cu) since fused prep, state and out, and the backward's prep and state, so
 * that K, Q, Uk, Xk and Hc are loaded or built once per chunk, and took the op to 1.64
 * ms (1.55 ms writing the gradients); with the grads phase in the chained backward's
 * kernel, the forward's M built once per warp tile, v . X on the grads phase's idle warps
 * and its dg scan on one warp, 1.60 ms (1.49-1.51 writing the gradients; on an H100 of the
 * same call the build before took 1.65 and 1.56); built for D = 85 (GDN_FIXED_D), with
 * the accumulating backward's adds as reductions (gdn_grad_put), 1.55 ms (1.45 writing
 * the gradients). Operands stored pre-rounded to TF32 for every product that reads them
 * (skipping the products' own rounding, the same bits) changed nothing measurable. With
 * the pairs (E o KK and M) packed into one [64, 64] block per chunk where they had taken
 * two (100 MB less written and read at this shape), 1.52 ms (1.43). What is left: the
 * two-blocks-an-SM occupancy of all three (registers and shared memory both); the 4-byte
 * copies of q, k, v and dO, whose rows start anywhere when D is odd (a copy shifted to
 * 16-byte boundaries would do, but the regions that ldmatrix reads need aligned rows); dv
 * = beta X and v . X from the chained backward, which holds X in registers (the grads
 * phase would then skip V); shared layouts that serve both ldmatrix and scalar loads
 * without bank conflicts (a swizzle); and state_save with aligned rows (its layout is part
 * of the op's contract with the CPU backend; its rows are copied 4 bytes at a time).
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
/* row pitch of a [64, gdn_kpitch(D)] region that later holds a [64, GDN_PP] tile (the
 * larger of the two) */
static __host__ __device__ __forceinline__ int gdn_kpitch_pp(int n)
{
    return gdn_kpitch(n) > GDN_PP ? gdn_kpitch(n) : GDN_PP;
}
/* the row length of the [64, D] and [D, D] scratch arrays in global memory: D rounded up to
 * a multiple of 4, so that every row starts 16-byte aligned (gdn_load_async's 16-byte
 * copies); the pad columns are never read */
static __host__ __device__ __forceinline__ int gdn_r4(int n) { return (n + 3) & ~3; }

static __device__ __forceinline__ int gdn_imin(int a, int b) { return a < b ? a : b; }

/* x summed over the four lanes of its quad (the threads of one fragment row: lanes 4 g ..
 * 4 g + 3), by two shuffles in a fixed order */
static __device__ __forceinline__ float gdn_quad_sum(float x)
{
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

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

/* the helpers of each job, in files of their own */
#include "gdn_mma.cuh"
#include "gdn_copy.cuh"
#include "gdn_state.cuh"

/* T = (I + A)^-1 for A [64, GDN_PP] strictly lower triangular (16-byte aligned rows), in
 * two steps over its 32 x 32 blocks [T00 0; T10 T11]:
 *   gdn_invert_diag (threads 0-63): T00 = (I + A00)^-1 and T11 = (I + A11)^-1 by forward
 *     substitution, a thread per column of its block: T_tc = [t == c] - sum_{s<t} A_ts
 *     T_sc. Ts may be As (each diagonal block of T written over that of A).
 *   gdn_invert_offdiag (all threads, after a barrier): T10 = -T11 A10 T00, as P = A10 T00
 *     (parked in the zero upper-right block, rows 0-31 x columns 32-63, which no product
 *     with T reads: they stop at the tile's last row or start at its first) and then
 *     -T11 P over A10; the caller's barrier ends it.
 * The substitution chains are 32 rows long instead of 64 (a quarter of the multiply-adds
 * of one thread per column of the whole T, whose two warps the other six had waited for)
 * and the two block products run on all eight warps. In fp32, in a fixed order. */
static __device__ __forceinline__ float4 gdn_lds4(const float *p)
{
    float4 v;
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(cuda_smem_u32(p)));
    return v;
}

static __device__ __forceinline__ void gdn_invert_diag(float *Ts, const float *As)
{
    const int c = threadIdx.x & 31, o = threadIdx.x & 32; /* column c of the block at (o, o) */
    float x[32];
    /* fully unrolled so that the column stays in registers; four partial sums per row
     * (p[u % 4]) shorten the dependency chain, and a row of A is read four elements a load */
#pragma unroll
    for (int t = 0; t < 32; t++) {
        float p[4] = {t == c ? 1.0f : 0.0f, 0.0f, 0.0f, 0.0f};
        const float *a = As + (o + t) * GDN_PP + o;
#pragma unroll
        for (int u = 0; u < t; u += 4) {
            const float4 a4 = gdn_lds4(a + u);
            p[0] = fmaf(-a4.x, x[u], p[0]);
            if (u + 1 < t) p[1] = fmaf(-a4.y, x[u + 1], p[1]);
            if (u + 2 < t) p[2] = fmaf(-a4.z, x[u + 2], p[2]);
            if (u + 3 < t) p[3] = fmaf(-a4.w, x[u + 3], p[3]);
        }
        x[t] = (p[0] + p[1]) + (p[2] + p[3]);
    }
    /* the 64 calling threads have all read A (Ts may lie over As) */
    asm volatile("bar.sync 1, 64;\n" ::: "memory");
#pragma unroll
    for (int t = 0; t < 32; t++) Ts[(o + t) * GDN_PP + o + c] = x[t];
}

/* acc[r] += sum_k R[r][k] C[k], k < 32: rows R of pitch GDN_PP read four at a time (the
 * same address on every lane), C a column (pitch GDN_PP) */
static __device__ __forceinline__ void gdn_rows_col32(float acc[4], const float *R, const float *C)
{
#pragma unroll
    for (int k = 0; k < 32; k += 4) {
        float cv[4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) cv[kk] = C[(k + kk) * GDN_PP];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const float4 a = gdn_lds4(R + r * GDN_PP + k);
            acc[r] = fmaf(a.x, cv[0], acc[r]);
            acc[r] = fmaf(a.y, cv[1], acc[r]);
            acc[r] = fmaf(a.z, cv[2], acc[r]);
            acc[r] = fmaf(a.w, cv[3], acc[r]);
        }
    }
}

static __device__ __forceinline__ void gdn_invert_offdiag(float *Ts)
{
    const int j = threadIdx.x & 31, i0 = 4 * (threadIdx.x >> 5); /* rows i0..i0+3, column j */
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    gdn_rows_col32(acc, Ts + (32 + i0) * GDN_PP, Ts + j); /* P = A10 T00 */
#pragma unroll
    for (int r = 0; r < 4; r++) Ts[(i0 + r) * GDN_PP + 32 + j] = acc[r];
    __syncthreads();
    float t10[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    gdn_rows_col32(t10, Ts + (32 + i0) * GDN_PP + 32, Ts + 32 + j); /* T11 P */
#pragma unroll
    for (int r = 0; r < 4; r++) Ts[(32 + i0 + r) * GDN_PP + j] = -t10[r];
}

/* The head dims that have kernels of their own, with D a compile-time constant: those of
 * the model's presets (config.c: 64 for small and moe-2b, 85 for moe-1b, 96 for base)
 * that the chained kernels and the grads kernels take. With D known, every pitch, bound,
 * trip count and clamp that derives from it folds into the instructions, where the
 * general kernels compute them at run time: the chained forms took 0.485 -> 0.458 ms
 * forward and 1.015 -> 0.988 ms backward_set at B 8, T 2048, H 12, D 85 on an H100. Any
 * other D runs the general kernels, with the same arithmetic. The list, as X(D) for each
 * head dim: the files build their instances (named ..._d<D>) from it and pick among them
 * by it. */
#define GDN_FIXED_D(X) X(64) X(85) X(96)
/* the warp tiles' n-tiles of the kernels for head dim d: 4 (16 x 32) to 64, else 6 */
#define GDN_FIXED_NT(d) ((d) <= 64 ? 4 : 6)

/* ---- the chained forms (gdn_chain.cu) ---- */
#define GDN_CHAIN_MAXD 96 /* the widest head they take (their warp tiles: 2 x 48 columns) */

/* the row pitch of their state in shared memory and in the ring: at least r8(D) columns,
 * 8 mod 32 (its reads run down columns: rows q = 0..3 apart and columns g = 0..7 fall in
 * 32 banks) */
static __host__ __device__ __forceinline__ int gdn_chain_sp(int D) { return ((gdn_r8(D) + 31) & ~31) + 8; }

/* whether the op runs chained at this shape (cuda_gdn_set_chain can force either form) */
int gdn_chain_use(int D, int BH, int nchunk);
/* the floats of scratch they take (the ring and the counters), after the op's own */
size_t gdn_chain_scratch_floats(int D, int BH, int nchunk);
/* the whole forward: o, and state_save (its start states, and W in its W rows at Wv) */
void gdn_fwd_chain_run(float *o, float *state_save, float *Wv, float *chain, const float *q, const float *k,
                       const float *v, const float *g, const float *beta, const int32_t *doc_start, int T, int H,
                       int D, int nchunk, int BH, float scale);
/* the whole backward's arguments: gradients (written where set, else accumulated), inputs,
 * W (state_save's W rows), the scratch arrays X, dS and Pbuf, and the ring and counters
 * (set by gdn_bwd_chain_run) */
typedef struct {
    float *dq, *dk, *dv, *dg, *dbeta;
    const float *dout, *q, *k, *v, *g, *beta, *state_save, *Wbuf;
    float *Xbuf, *dSbuf, *Pbuf, *ring;
    unsigned *sync;
    const int32_t *doc_start;
    int T, H, D, nchunk, BH, set;
    float scale;
} gdn_bwd_args;
/* the backward's chain, in place of its prep and state kernels, and for D > 64 the grads
 * phase in the same kernel (at B 8, T 2048, H 16, D 64 on an H200 the grads kernel after
 * it was 0.012 ms faster); returns whether it ran the grads phase (else gdn_grads_run
 * follows). chain is the scratch of gdn_chain_scratch_floats. */
int gdn_bwd_chain_run(gdn_bwd_args a, float *chain);

/* ---- host side, shared by the two launchers ---- */

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
