/* gdn_state.cuh: what the two GDN state kernels (the chunk-to-chunk recurrences of
 * gdn_forward.cu and gdn_backward.cu) share: their start, their 4- and 8-warp forms of
 * the [64, 8 snt] product, their fragment loads and stores, their launch shape and shared
 * memory.
 * Included by gdn_internal.cuh (after the sizes and index helpers it uses); the design of
 * the GDN kernels is described there. */
#ifndef DELTAMLA_GDN_STATE_CUH
#define DELTAMLA_GDN_STATE_CUH

/* The row pitch of a state kernel's tiles of 8 snt value columns: 8 mod 16 floats (40 for
 * 24 and 32 columns, 56 for 48), so that a fragment's loads spread over the banks */
static __host__ __device__ __forceinline__ int gdn_state_sp(int snt) { return 8 * snt + 8 + 8 * (snt & 1); }

/* The start of a state kernel: its [r8(D), sp] tile S zeroed, its two mbarriers
 * initialised and armed for the first chunk, whose refills it issues: the A operand (Uk
 * or Xk) at A with the scalars at sv on bar[0], K at K on bar[1]. All threads. */
static __device__ __forceinline__ void gdn_state_start(float *S, int D, int sp, uint64_t *bar, float *Ab,
                                                       const float *A, float *Kb, const float *K, int dp, float *sc,
                                                       const float *sv)
{
    for (int e = threadIdx.x; e < gdn_r8(D) * sp; e += (int)blockDim.x) S[e] = 0.0f;
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

/* a state kernel's fragment of a row tile, 8 snt columns (snt <= GDN_NTW), zeroed */
static __device__ __forceinline__ void gdn_state_zero(float acc[GDN_NTW][4])
{
#pragma unroll
    for (int j = 0; j < GDN_NTW; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[j][r] = 0.0f;
}

/* The state kernels run with 4 or 8 warps. With 4, warp w computes row tile w of their
 * [64, 8 snt] product (W = Wv - Uk S, X = Xo + Xk dS) over the whole contraction. With 8,
 * warp w takes row tile w % 4 over half of it, k < gdn_state_kmid(D) for warps 0-3, the
 * rest for warps 4-7, which park their partial sums in the block's [64, sp] tile for
 * warps 0-3 to add (gdn_state_half); the other product's row tiles spread over 8 warps.
 * Eight warps shorten each chunk step's chain of dependent products, which is what
 * bounds a block that has an SM to itself: at B 2, T 8192, H 12, D 85 (72 blocks) the op
 * took 3.05 instead of 3.25 ms forward + backward. Where blocks share SMs they are bound
 * by the SMs' throughput instead, and the extra sums cost: at B 8, T 2048 (288 blocks)
 * 2.68 against 2.64 ms, and with the 192 blocks of 48 columns 2.06 against 2.03 ms. So 8
 * warps run where the blocks fit on the SMs one each (gdn_state_threads). Blocks of 96
 * columns (two units of 4 warps sharing the chunk's operands, 96 blocks at that shape,
 * one an SM) were tried too: 2.11 ms, as with 48. */
static __host__ __device__ __forceinline__ int gdn_state_kmid(int D) { return 8 * ((gdn_r8(D) / 8 + 1) / 2); }

/* acc (the thread's fragment of row tile m0) += the other half's partial sums from tile
 * P (pitch gdn_state_sp(snt)): warps 4-7 store theirs, barrier, warps 0-3 add them. All
 * threads. */
static __device__ __forceinline__ void gdn_state_half(float acc[GDN_NTW][4], float *P, int m0, int snt)
{
    const int sp = gdn_state_sp(snt);
    if (blockDim.x <= 128) return; /* 4 warps: no halves */
    const int upper = threadIdx.x >= 128;
    if (upper)
#pragma unroll
        for (int j = 0; j < snt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) P[gdn_frow(m0, r) * sp + gdn_fcol(0, j, r)] = acc[j][r];
    __syncthreads();
    if (!upper)
#pragma unroll
        for (int j = 0; j < snt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[j][r] += P[gdn_frow(m0, r) * sp + gdn_fcol(0, j, r)];
}

/* the contraction range [kb, ke) of the calling warp in a state kernel's [64, 8 snt] product
 * over k < D (the whole of it with 4 warps) */
static __device__ __forceinline__ void gdn_state_krange(int D, int *kb, int *ke)
{
    const int kmid = gdn_imin(gdn_state_kmid(D), D), upper = blockDim.x > 128 && threadIdx.x >= 128;
    *kb = upper ? kmid : 0;
    *ke = upper || blockDim.x <= 128 ? D : kmid;
}

/* The calling thread's fragment of row tile m0 of a [rows, nv] block in global memory
 * (row stride rs, 8 snt columns from g), 0 outside it. */
static __device__ __forceinline__ void gdn_state_tile(float v[GDN_NTW][4], const float *g, int rs, int m0, int rows,
                                                      int nv, int snt)
{
#pragma unroll
    for (int j = 0; j < snt; j++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int m = gdn_frow(m0, i), n = gdn_fcol(0, j, i);
            v[j][i] = m < rows && n < nv ? g[(size_t)m * rs + n] : 0.0f;
        }
}

/* The base of the state kernels' [64, 8 snt] product (Wv, Xo): the thread's fragment of
 * row tile w of the [64, Dp] rows at g for warps 0-3 (gdn_state_tile), 0 for warps 4-7.
 * The state kernels issue these loads at the top of a chunk step, before they wait for
 * the chunk's shared operands, so that their latency overlaps the wait: loaded right
 * before the product, they were the longest stall of the forward state kernel (9% of its
 * warp samples at the subtraction that waited for them). */
static __device__ __forceinline__ void gdn_state_base(float base[GDN_NTW][4], const float *g, int Dp, int nv, int snt)
{
    const int warp = threadIdx.x >> 5;
    if (warp < 4) gdn_state_tile(base, g, Dp, 16 * warp, GDN_C, nv, snt);
    else gdn_state_zero(base);
}

/* The state kernels' [64, 8 snt] product for the block's value columns: R = Base + sgn A S,
 * A [64, dp] in shared memory (Uk, Xk), S [r8(D), gdn_state_sp(snt)] (the state or its
 * gradient),
 * Base the thread's fragment of the [64, Dp] rows at g in global memory (Wv, Xo; from
 * gdn_state_base), which R overwrites in its nv valid columns. Warps 0-3 return their row
 * tile of R in r; P is the tile that gdn_state_half uses. All threads. */
static __device__ __forceinline__ void gdn_state_product(float r[GDN_NTW][4], const float base[GDN_NTW][4], float *g,
                                                         int Dp, int nv, const float *A, int dp, const float *S,
                                                         float *P, int D, float sgn, int snt)
{
    const int warp = threadIdx.x >> 5, m0 = 16 * (warp & 3), lower = warp < 4;
    int kb, ke;
    gdn_state_krange(D, &kb, &ke);
    float acc[GDN_NTW][4];
    gdn_state_zero(acc);
    gdn_mma_n(gdn_state_split(0), snt, acc, A, dp, 1, m0, GDN_C - 1, S, gdn_state_sp(snt), 1, 0, 8 * snt - 1, kb, ke);
    gdn_state_half(acc, P, m0, snt);
    if (lower)
#pragma unroll
        for (int j = 0; j < snt; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int n = gdn_fcol(0, j, i);
                r[j][i] = base[j][i] + sgn * acc[j][i];
                if (n < nv) g[(size_t)gdn_frow(m0, i) * Dp + n] = r[j][i];
            }
}

/* Rows 0..D-1 of a state kernel's [r8(D), sp] tile S, its nv (<= 64) valid columns, to g
 * (row stride rs): warp w stores rows w, w + warps, ..., lane l columns l and l + 32, with
 * its pointers stepped from row to row (a 64-bit offset computed afresh for every row had
 * made this loop an eighth of the forward state kernel's instructions). All threads; no
 * barrier. */
static __device__ __forceinline__ void gdn_state_store(float *g, size_t rs, const float *S, int sp, int D, int nv)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5, w = threadIdx.x >> 5;
    if (lane >= nv) return;
    const int two = lane + 32 < nv;
    float *gp = g + (size_t)w * rs + lane;
    const float *spp = S + w * sp + lane;
    const size_t gstep = (size_t)nw * rs;
#pragma unroll 4
    for (int r = w; r < D; r += nw, gp += gstep, spp += nw * sp) {
        *gp = *spp;
        if (two) gp[32] = spp[32];
    }
}

/* The state kernels' value columns a block, 8 snt with snt 3, 4 or 6 (gdn_forward.cu), for
 * BH (b, h) rows of head dim D. A block reads its chunk's whole [64, D] operands (Uk and
 * K, Xk and K), so wider blocks read fewer bytes: the fewest blocks that still give every
 * SM one (then the fewest padded columns), or where no width does, the most blocks. At
 * B 8, T 2048, H 12, D 85 (BH 96) that is 48 columns: 192 blocks instead of 384 of 24. */
int gdn_state_nt(int D, int BH);

/* threads of the state kernels for `blocks` blocks: 8 warps where every block can have an
 * SM to itself, else 4 (see gdn_state_half); cuda_gdn_set_state_warps forces either */
int gdn_state_threads(int blocks);

/* the state kernels' shared memory: S [r8(D), sp], the product tile [64, sp] (sp =
 * gdn_state_sp(snt)), the two operand arrays [64, dp], 128 per-token scalars and two
 * mbarriers (4 floats) */
static inline size_t gdn_smem_state(int D, int snt)
{
    const size_t sp = gdn_state_sp(snt);
    return sizeof(float) * ((size_t)gdn_r8(D) * sp + GDN_C * sp + 2 * GDN_C * gdn_kpitch(D) + 2 * GDN_C + 4);
}

#endif
