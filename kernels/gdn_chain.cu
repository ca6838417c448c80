/* gdn_chain.cu: the chained forms of the GDN forward and backward (cuda_gdn_forward and
 * cuda_gdn_backward run them where gdn_chain_use says so): the whole forward in one kernel
 * where gdn_forward.cu runs prep, state and out kernels, and the backward's prep and state
 * in one kernel, which for D > 64 also runs the grads phase (gdn_grads.cuh; for D <= 64
 * gdn_backward.cu's grads kernel follows it). The design and the shared helpers are in
 * gdn_internal.cuh.
 *
 * One block per (chunk, b*h), handed out in chunk order (last to first for the backward)
 * by a ticket, a counter in scratch: a block takes its ticket when it starts, so it only
 * ever waits on blocks that are already running (no deadlock, whatever the grid). The
 * block does its chunk's prep as the prep kernel does, keeping the state step's operands
 * in shared memory and registers, then waits for the flag of its (b, h) and chunk, set by
 * the block of the neighbouring chunk once the state (or state gradient) this chunk needs
 * is in the ring, and runs the chunk's state step for all D value columns on 8 warps,
 * hands the next state on through the ring and sets the next flag. Later chunks' blocks
 * do their prep meanwhile. The ring holds two [r8(D), gdn_chain_sp(D)] states per (b, h)
 * in the blocks' shared-memory layout, chunk c's in slot c % 2, each brought in by one bulk
 * copy; the slot a block writes is the one its predecessor read, which the predecessor did
 * before setting the flag this block waited for (every chunk but the first waits, even
 * one whose state is zero because a document starts there). The block also saves the
 * state it received (S0 to state_save, dS to the backward's scratch), off the chain.
 *
 * Against the three kernels, the prep's outputs for the state step (Uk and a copy of K;
 * Xk, Hc and a copy of K) never go through global memory, no state kernel reads them once
 * per column block, and a chunk's state step runs on 8 warps for all D columns; the
 * forward's output comes from K, S0 and W where they already lie in shared memory, after
 * the block has handed its state on. Measured on an H100 at B 8, T 2048, H 12, D 85 (BH
 * 96, 32 chunks; Nsight Compute): forward 0.520 ms where the prep, state and out kernels
 * took 0.255 + 0.224 + 0.235 (0.397 ms for a first chained form without the output, which
 * out followed), backward 0.485 ms where prep and state took 0.386 + 0.257; the op
 * (bench_mixers) 0.715 -> 0.522 ms forward, 1.217 -> 1.067 ms backward writing its
 * gradients, 1.93 -> 1.585 ms in all. With the flag waits taken out (a timing-only build)
 * the forward kernel without the output took 0.38 instead of 0.40 ms: the chain is not
 * what bounds it, the SMs' throughput of these blocks (two an SM) is. At B 8, T 2048,
 * H 16, D 64 the op took 1.54 -> 1.47 ms.
 * The chain is nchunk steps long per (b, h), one step in flight at a time, so the form
 * pays only where B H is large next to nchunk: at B 2, T 8192 (BH 24, 128 chunks) the
 * chained forward kernel took 1.33 ms, so there the op keeps the three kernels
 * (gdn_chain_use: chained where B H >= nchunk). A first form that handed the states on
 * through state_save itself (rows of D floats, read back by 4-byte loads, a row at a
 * time) took 0.44 instead of 0.40 ms.
 * Since then (bench_mixers on an H100, each change against the build before it in one
 * call): the forward's M built once per warp tile and read back from shared memory
 * (0.516 -> 0.494 ms), its K rounded during the solve and its Q loaded during the save of
 * S0 (0.504 -> 0.487 ms); the grads phase in the backward's kernel (backward_set 1.039 ->
 * 1.031 ms). Tried and dropped: the Uk and Xk tiles of the mirror row tile, so that
 * every warp does the same work in the products with T (no change); the backward's K
 * rounded during the solve (0.008 ms slower).
 *
 * Shared memory, both directions: header, three [64, x] regions and a region R of
 * max(two [64, GDN_PP] tiles, the state [r8(D), gdn_chain_sp(D)]): 110 KB forward, 113 KB
 * backward at D = 85, two blocks an SM; D <= GDN_CHAIN_MAXD. The regions that products
 * read mostly down their columns (scalar fragment loads: V, eL W and Q in the forward; q,
 * Qe, e0 beta X, dO and Xk in the backward) have rows of gdn_chain_sp(D) floats, 8 mod
 * 32, where those loads meet no bank conflicts; the others keep gdn_kpitch(D), 4 mod 8,
 * which suits ldmatrix (with all three at gdn_kpitch(D) the op took 1.597 instead of 1.569
 * ms forward + backward_set at B 8, T 2048, H 12, D 85). Kernels for D <= 64 (warp tiles
 * of 16 x 32) and D <= 96 (16 x 48, state update tiles of 16 x 24).
 */
#include "gdn_grads.cuh"

/* The forward's K rounded to its TF32 operand (gdn_state_op) for the state update while
 * two warps solve for T's diagonal blocks, where that leaves the products with K before
 * the update as they were (their operands rounded to TF32 alike: GDN_SPLIT_SOLVE 1); else
 * after them */
#define GDN_CHAIN_KPRE (GDN_STATE_PRE && GDN_SPLIT_SOLVE == 1)

static __device__ __forceinline__ unsigned gdn_ld_acquire(const unsigned *p)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

static __device__ __forceinline__ void gdn_st_release(unsigned *p, unsigned v)
{
    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

/* the block's ticket (from sync[0]), with the block's mbarrier initialised; all threads */
static __device__ __forceinline__ int gdn_chain_ticket(unsigned *sync, uint64_t *bar, int *ticket)
{
    if (threadIdx.x == 0) {
        *ticket = (int)atomicAdd(&sync[0], 1u);
        gdn_mbar_init(bar);
    }
    __syncthreads();
    return *ticket;
}

/* The state this chunk starts from into S [r8(D), sps]: where wait, thread 0 waits for
 * flag; then zero where zero, else one bulk copy of the ring slot (the proxy fence orders
 * it after the acquire and after this block's generic accesses of S's region). All
 * threads; ends with a barrier. */
static __device__ __forceinline__ void gdn_chain_receive(float *S, const float *slot, const unsigned *flag, int wait,
                                                         int zero, uint64_t *bar, int D8, int sps)
{
    const unsigned bytes = (unsigned)(sizeof(float) * D8 * sps);
    if (threadIdx.x == 0) {
        if (wait)
            while (!gdn_ld_acquire(flag)) __nanosleep(20);
        if (!zero) {
            asm volatile("fence.proxy.async;\n" ::: "memory");
            gdn_mbar_expect(bar, bytes);
            gdn_bulk_load(S, slot, bytes, bar);
        }
    }
    if (zero)
        for (int e = threadIdx.x; e < D8 * sps; e += (int)blockDim.x) S[e] = 0.0f;
    else
        gdn_mbar_wait(bar, 0);
    __syncthreads();
}

/* The state step's [D, D] result, tile `tile` of 16 x 8 nu (rt row tiles): acc (the
 * caller's base: 0 or Hc) + x S + A^T B, A [64, ap] (K) and B [64, bp] (eL W or -e0 beta
 * X) both pre-rounded, to the ring slot (rows D..r8(D)-1 zero). All threads of a warp. */
static __device__ __forceinline__ void gdn_chain_update(int nu, float acc[][4], int tile, int rt, float x,
                                                        const float *S, int sps, const float *A, int ap,
                                                        const float *B, int bp, int D, float *slot)
{
    const int mm = 16 * (tile % rt), nn = 8 * nu * (tile / rt), D8 = gdn_r8(D);
#pragma unroll
    for (int j = 0; j < nu; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int m = gdn_frow(mm, r), n = gdn_fcol(nn, j, r);
            acc[j][r] = m < D ? acc[j][r] + x * S[m * sps + n] : 0.0f;
        }
    gdn_mma_n(gdn_state_split(1), nu, acc, A, 1, ap, mm, D - 1, B, bp, 1, nn, D - 1, 0, GDN_C);
#pragma unroll
    for (int j = 0; j < nu; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int m = gdn_frow(mm, r), n = gdn_fcol(nn, j, r);
            if (m < D8) slot[m * sps + n] = m < D ? acc[j][r] : 0.0f;
        }
}

/* the release of the next chunk's flag, after every thread's ring stores */
static __device__ __forceinline__ void gdn_chain_release(unsigned *flag)
{
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) gdn_st_release(flag, 1u);
}

/* S [r8(D), sps] in shared memory, rows and columns below D, to g (row stride rs): a
 * warp per row. All threads; no barrier. */
static __device__ __forceinline__ void gdn_chain_save(float *g, size_t rs, const float *S, int sps, int D)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int r = threadIdx.x >> 5; r < D; r += nw)
        for (int col = lane; col < D; col += 32) g[(size_t)r * rs + col] = S[r * sps + col];
}

/* ---- forward ----
 * Per (chunk, b*h): T, Wv (kept in registers) and -Uk as gdn_fwd_prep_kernel; then, with
 * S0: W = Wv - Uk S0 to state_save's W rows, S_end = e0L S0 + K^T diag(eL) W to the ring
 * (none where the next chunk starts a document), S0 to state_save; then o = diag(scale
 * e0) Q S0 + M W as gdn_fwd_out_kernel. Regions: K (rounded to TF32 once its products
 * before the state update are done; the rounding leaves Q K^T's bits as they were), V
 * scaled by beta, then eL W, then Q; -Uk, then W; and R: T and T diag(beta e0), then S0,
 * then M. The output's M is built once per warp tile (on or below the diagonal) and read
 * back from R: each warp had built the 16 rows of M its tile needs in registers, so that
 * the two warps of a row tile both built them, and the bottom row tiles' warps, with two
 * tiles of M and the longest M W, set the pace (forward 0.516 -> 0.494 ms at B 8, T 2048,
 * H 12, D 85 on an H100).
 * sync: [0] the ticket counter, [1 + bh nchunk + c] the flag of chunk c's start state;
 * all zero at launch. */
static __device__ __forceinline__ void
gdn_fwd_chain(const int nt, float *o, float *state_save, float *Wbuf, unsigned *sync, float *ring, const float *q,
              const float *k, const float *v, const float *g, const float *beta, const int32_t *doc_start, int T,
              int H, int D, int nchunk, int BH, float scale)
{
    __shared__ int ticket;
    __shared__ uint64_t bar;
    const int tk = gdn_chain_ticket(sync, &bar, &ticket), tid = threadIdx.x;
    const int c = tk / BH, bh = tk - c * BH, b = bh / H, h = bh % H;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D);
    const int sps = gdn_chain_sp(D);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D, slot = (size_t)D8 * sps;
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    const int vp = sps; /* Vs's pitch, 8 mod 32: more of its reads are scalar ones down columns */
    float *Ks = gdn_smem + GDN_HDR, *Vs = Ks + GDN_C * dp, *Us = Vs + GDN_C * vp, *R = Us + GDN_C * dp;
    float *Ts = R, *Te = R + GDN_C * GDN_PP, *S = R, *Wt = Vs;
    const int warp = tid >> 5, lane = tid & 31, m0 = 16 * (warp & 3), n0 = 32 * (warp >> 2), w0 = 8 * nt * (warp >> 2);
    const int nu = nt == 6 ? 3 : 4; /* the S update's tiles: 16 x 8 nu */

    gdn_load_async(Ks, dp, GDN_C, D8, k + gdn_row(b, t0, h, T, H, D), rs, L, 0, D);
    gdn_load_async(Vs, vp, GDN_C, D8, v + gdn_row(b, t0, h, T, H, D), rs, L, 0, D);
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);
    gdn_sync();

    /* A_ts = beta_t E_ts KK_ts below the diagonal, then T = (I + A)^-1 while warps 2-7
     * scale the rows of V by beta (and round K: GDN_CHAIN_KPRE), then T diag(beta e0) */
    {
        float acc[4][4];
        gdn_zero(acc);
        if (n0 < m0 + 16) gdn_mma(GDN_SPLIT_PAIR, acc, Ks, dp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r);
                Ts[t * GDN_PP + u] = u < t ? s.bt[t] * gdn_decay(s, t, u, L) * acc[j][r] : 0.0f;
            }
    }
    __syncthreads();
    if (tid < GDN_C) {
        gdn_invert_diag(Ts, Ts);
    } else {
        for (int r = (tid - GDN_C) >> 5; r < GDN_C; r += (GDN_NT - GDN_C) / 32)
            for (int col = lane; col < D; col += 32) {
                Vs[r * vp + col] *= s.bt[r];
                if (GDN_CHAIN_KPRE) Ks[r * dp + col] = gdn_state_op(Ks[r * dp + col]);
            }
    }
    __syncthreads();
    gdn_invert_offdiag(Ts);
    __syncthreads();
    for (int e = tid; e < GDN_C * GDN_C; e += GDN_NT) {
        const int t = e >> 6, u = e & 63;
        Te[t * GDN_PP + u] = Ts[t * GDN_PP + u] * (s.bt[u] * s.e0[u]);
    }
    __syncthreads();

    /* Wv = T (beta V) (kept in aw) and -Uk = -T diag(beta e0) K (to Us, pad columns zero):
     * warp tiles of 16 x 8 nt, two column halves; T is lower triangular */
    float aw[GDN_NTW][4];
    gdn_state_zero(aw);
    {
        float au[GDN_NTW][4];
        gdn_state_zero(au);
        if (w0 < D) {
            gdn_mma_n(GDN_SPLIT_SOLVE, nt, aw, Ts, GDN_PP, 1, m0, GDN_C - 1, Vs, vp, 1, w0, D - 1, 0, m0 + 16);
            gdn_mma_n(GDN_SPLIT_SOLVE, nt, au, Te, GDN_PP, 1, m0, GDN_C - 1, Ks, dp, 1, w0, D - 1, 0, m0 + 16);
        }
#pragma unroll
        for (int j = 0; j < nt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = gdn_fcol(w0, j, r);
                if (n < dp) Us[t * dp + n] = n < D ? gdn_state_op(-au[j][r]) : 0.0f;
            }
    }
    __syncthreads(); /* Us is whole; V, T and Te are done with */
    if (GDN_STATE_PRE && !GDN_CHAIN_KPRE)
        for (int r = warp; r < GDN_C; r += GDN_NT / 32)
            for (int col = lane; col < D; col += 32) Ks[r * dp + col] = gdn_state_op(Ks[r * dp + col]);

    /* S0: zero at the row's first chunk and where the chunk starts a document */
    const int reset = c == 0 || (doc_start && doc_start[(size_t)b * T + t0]);
    gdn_chain_receive(S, ring + ((size_t)bh * 2 + (c & 1)) * slot, sync + 1 + ci, c > 0, reset, &bar, D8, sps);

    /* W = Wv - Uk S0 to state_save's W rows (pad columns zero) and eL W over V */
    if (w0 < D) gdn_mma_n(gdn_state_split(0), nt, aw, Us, dp, 1, m0, GDN_C - 1, S, sps, 1, w0, D - 1, 0, D);
    __syncthreads(); /* Us is read: W lies over it */
    {
        float *wg = Wbuf + ci * GDN_C * Dp;
#pragma unroll
        for (int j = 0; j < nt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = gdn_fcol(w0, j, r);
                if (n < D) {
                    wg[(size_t)t * Dp + n] = aw[j][r];
                    Us[t * dp + n] = aw[j][r];
                    Wt[t * vp + n] = gdn_state_op(s.eL[t] * aw[j][r]);
                } else if (n < Dp) {
                    wg[(size_t)t * Dp + n] = 0.0f;
                }
            }
    }
    __syncthreads();

    /* S_end = e0L S0 + K^T (eL W) to the ring for the next chunk */
    if (c + 1 < nchunk) {
        if (!(doc_start && doc_start[(size_t)b * T + t0 + GDN_C])) {
            const int rt = (D + 15) / 16, ct = (D + 8 * nu - 1) / (8 * nu);
            float *sn = ring + ((size_t)bh * 2 + ((c + 1) & 1)) * slot;
            for (int tile = warp; tile < rt * ct; tile += GDN_NT / 32) {
                float acc[GDN_NTW][4];
                gdn_state_zero(acc);
                gdn_chain_update(nu, acc, tile, rt, s.e0[L - 1], S, sps, Ks, dp, Wt, vp, D, sn);
            }
        }
        gdn_chain_release(sync + 2 + ci);
    }
    /* Q over eL W (read: the release's barrier, or the one after W), in flight during the save */
    float *Qs = Vs, *Ws = Us, *Ms = R;
    gdn_load_async(Qs, vp, GDN_C, D8, q + gdn_row(b, t0, h, T, H, D), rs, L, 0, D);
    gdn_chain_save(state_save + ci * D * D, D, S, sps, D);

    /* o = diag(scale e0) Q S0 + M W, M = scale E o QK (lower, with the diagonal): Q over
     * eL W, W (unscaled) over -Uk; the warp tiles of M on or below the diagonal (6 of 8)
     * into shared memory over S0, once the products with K and S0 are done */
    gdn_sync();
    {
        float mc[4][4], ao[GDN_NTW][4];
        gdn_zero(mc);
        gdn_state_zero(ao);
        if (n0 < m0 + 16) gdn_mma(GDN_SPLIT_PAIR, mc, Qs, vp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
        if (w0 < D) {
            gdn_mma_n(GDN_SPLIT_S0, nt, ao, Qs, vp, 1, m0, GDN_C - 1, S, sps, 1, w0, D - 1, 0, D);
#pragma unroll
            for (int j = 0; j < nt; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) ao[j][r] *= scale * s.e0[gdn_frow(m0, r)];
        }
        __syncthreads(); /* S0 is read: M lies over it */
        if (n0 < m0 + 16)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r);
                    Ms[t * GDN_PP + u] = mc[j][r] * (scale * gdn_decay(s, t, u, L));
                }
        __syncthreads();
        if (w0 < D) gdn_mma_n(GDN_SPLIT_SOLVE, nt, ao, Ms, GDN_PP, 1, m0, GDN_C - 1, Ws, dp, 1, w0, D - 1, 0, m0 + 16);
#pragma unroll
        for (int j = 0; j < nt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = gdn_fcol(w0, j, r);
                if (t < L && n < D) o[gdn_row(b, t0 + t, h, T, H, D) + n] = ao[j][r];
            }
    }
}

/* the chained forward for D <= 64 (nt 4) and D <= 96 (nt 6), and for the head dims of
 * GDN_FIXED_D with D a constant (dc) */
typedef void (*gdn_fwd_chain_fn)(float *, float *, float *, unsigned *, float *, const float *, const float *,
                                 const float *, const float *, const float *, const int32_t *, int, int, int, int, int,
                                 float);
#define GDN_FWD_CHAIN_KERNEL(name, nt, dc)                                                                         \
    static __global__ void __launch_bounds__(GDN_NT, 2)                                                            \
    name(float *o, float *state_save, float *Wbuf, unsigned *sync, float *ring, const float *q, const float *k,   \
         const float *v, const float *g, const float *beta, const int32_t *doc_start, int T, int H, int D,         \
         int nchunk, int BH, float scale)                                                                          \
    {                                                                                                              \
        gdn_fwd_chain(nt, o, state_save, Wbuf, sync, ring, q, k, v, g, beta, doc_start, T, H, dc ? dc : D, nchunk, \
                      BH, scale);                                                                                  \
    }
GDN_FWD_CHAIN_KERNEL(gdn_fwd_chain_kernel64, 4, 0)
GDN_FWD_CHAIN_KERNEL(gdn_fwd_chain_kernel96, 6, 0)
#define GDN_FWD_CHAIN_FIXED(d) GDN_FWD_CHAIN_KERNEL(gdn_fwd_chain_kernel_d##d, GDN_FIXED_NT(d), d)
GDN_FIXED_D(GDN_FWD_CHAIN_FIXED)

/* ---- backward ----
 * Per (chunk, b*h), chunks last to first: E o KK and M to Pbuf and T (as
 * gdn_bwd_prep_kernel); Hc = Qe^T dO, Qe = scale e0 q, in the state update's tiles (kept in
 * registers); N = T^T M^T; Xo = N dO (kept in registers) and Xk = T^T diag(eL) K; then,
 * with dS (the gradient at the chunk's end): X = Xo + Xk dS to Xbuf, dS_prev = e0L dS + Hc
 * - K^T diag(e0 beta) X to the ring (none where this chunk starts a document), dS to
 * dSbuf. Regions: K (rounded to TF32 after its last product before the state update), q
 * (then Qe, then -e0 beta X), dO (then Xk), and R: A and T (then diag(eL) T), M (then N),
 * then dS. sync as in the forward, the flags by the chunk whose end gradient they give. */
static __device__ __forceinline__ void
gdn_bwd_chain(const int nt, const int fused, int tk, uint64_t &bar, float *Xbuf, float *dSbuf, float *Pbuf,
              unsigned *sync, float *ring, const float *dout, const float *q, const float *k, const float *g,
              const float *beta, const int32_t *doc_start, int T, int H, int D, int nchunk, int BH, float scale)
{
    const int tid = threadIdx.x;
    const int c = nchunk - 1 - tk / BH, bh = tk % BH, b = bh / H, h = bh % H;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D);
    const int sps = gdn_chain_sp(D);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D, slot = (size_t)D8 * sps;
    const size_t tok = gdn_row(b, t0, h, T, H, D);
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    const int qp = sps; /* the pitch of Qs and Os, 8 mod 32: most of their reads are scalar ones down columns */
    float *Ks = gdn_smem + GDN_HDR, *Qs = Ks + GDN_C * dp, *Os = Qs + GDN_C * qp, *R = Os + GDN_C * qp;
    float *Ts = R, *Ms = R + GDN_C * GDN_PP, *Ns = Ms, *dS = R, *Qe = Qs, *Xt = Qs, *Xks = Os;
    const int warp = tid >> 5, lane = tid & 31, m0 = 16 * (warp & 3), n0 = 32 * (warp >> 2), w0 = 8 * nt * (warp >> 2);
    const int nu = nt == 6 ? 3 : 4, tpw = nt == 6 ? 3 : 1; /* the dS update's tiles: 16 x 8 nu, tpw a warp */
    const int rt = (D + 15) / 16, ntile = rt * ((D + 8 * nu - 1) / (8 * nu));

    gdn_load_async(Ks, dp, GDN_C, D8, k + tok, rs, L, 0, D);
    gdn_load_async(Qs, qp, GDN_C, D8, q + tok, rs, L, 0, D); /* unscaled: scale is applied to M and Qe */
    gdn_load_async(Os, qp, GDN_C, D8, dout + tok, rs, L, 0, D);
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);
    gdn_sync();

    /* M = scale E o QK (lower, with the diagonal) and A = beta E o KK below it; E o KK and
     * M to Pbuf for the grads kernel */
    {
        float ak[4][4], aq[4][4];
        gdn_zero(ak);
        gdn_zero(aq);
        if (n0 < m0 + 16) {
            gdn_mma(GDN_SPLIT_PAIR, ak, Ks, dp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
            gdn_mma(GDN_SPLIT_PAIR, aq, Qs, qp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
        }
        float *pb = Pbuf + ci * GDN_C * GDN_C;
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r += 2) {
                const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r);
                const float E0 = gdn_decay(s, t, u, L), E1 = gdn_decay(s, t, u + 1, L);
                const float k0 = u < t ? E0 * ak[j][r] : 0.0f, k1 = u + 1 < t ? E1 * ak[j][r + 1] : 0.0f;
                Ms[t * GDN_PP + u] = scale * E0 * aq[j][r];
                Ms[t * GDN_PP + u + 1] = scale * E1 * aq[j][r + 1];
                gdn_pairs_put_kk(pb, t, u, k0);
                gdn_pairs_put_kk(pb, t, u + 1, k1);
                Ts[t * GDN_PP + u] = s.bt[t] * k0;
                Ts[t * GDN_PP + u + 1] = s.bt[t] * k1;
            }
    }
    __syncthreads();
    /* T's diagonal blocks (warps 0-1) while warps 2-7 copy M to Pbuf and scale q to Qe;
     * then T's lower-left block */
    if (tid < GDN_C) {
        gdn_invert_diag(Ts, Ts);
    } else {
        gdn_pairs_put_m(Pbuf + ci * GDN_C * GDN_C, Ms, GDN_C, GDN_NT - GDN_C);
        for (int r = (tid - GDN_C) >> 5; r < GDN_C; r += (GDN_NT - GDN_C) / 32) {
            const float e0 = scale * s.e0[r];
            for (int col = lane; col < D; col += 32) Qe[r * qp + col] *= e0;
        }
    }
    __syncthreads();
    gdn_invert_offdiag(Ts);
    __syncthreads();

    /* Hc = Qe^T dO in the dS update's tiles (hc), and N = T^T M^T (N_mn = sum_k T_km M_nk
     * over m <= k <= n) over M; then T's rows scaled by eL */
    float hc[3][4][4];
#pragma unroll
    for (int i = 0; i < tpw; i++) {
        const int tile = warp + i * (GDN_NT / 32);
        gdn_zero(hc[i]);
        if (tile < ntile)
            gdn_mma_n(GDN_SPLIT_S0, nu, hc[i], Qe, 1, qp, 16 * (tile % rt), D - 1, Os, qp, 1, 8 * nu * (tile / rt),
                      D - 1, 0, GDN_C);
    }
    {
        float an[4][4];
        gdn_zero(an);
        if (n0 + 32 > m0)
            gdn_mma(GDN_SPLIT_SOLVE, an, Ts, 1, GDN_PP, m0, GDN_C - 1, Ms, 1, GDN_PP, n0, GDN_C - 1, m0,
                    gdn_imin(GDN_C, n0 + 32));
        __syncthreads(); /* M and T are read */
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) Ns[gdn_frow(m0, r) * GDN_PP + gdn_fcol(n0, j, r)] = an[j][r];
        for (int e = tid; e < GDN_C * GDN_C; e += GDN_NT) Ts[(e >> 6) * GDN_PP + (e & 63)] *= s.eL[e >> 6];
    }
    __syncthreads();

    /* Xo = N dO (kept in xo; N is upper triangular) and Xk = (diag(eL) T)^T K over dO */
    float xo[GDN_NTW][4];
    gdn_state_zero(xo);
    {
        float xk[GDN_NTW][4];
        gdn_state_zero(xk);
        if (w0 < D) {
            gdn_mma_n(GDN_SPLIT_SOLVE, nt, xo, Ns, GDN_PP, 1, m0, GDN_C - 1, Os, qp, 1, w0, D - 1, m0, GDN_C);
            gdn_mma_n(GDN_SPLIT_SOLVE, nt, xk, Ts, 1, GDN_PP, m0, GDN_C - 1, Ks, dp, 1, w0, D - 1, m0, GDN_C);
        }
        __syncthreads(); /* dO and K are read */
#pragma unroll
        for (int j = 0; j < nt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = gdn_fcol(w0, j, r);
                if (n < qp) Xks[t * qp + n] = n < D ? gdn_state_op(xk[j][r]) : 0.0f;
            }
    }
    if (GDN_STATE_PRE) /* here, not with the solve as in the forward: 0.008 ms slower there */
        for (int r = warp; r < GDN_C; r += GDN_NT / 32)
            for (int col = lane; col < D; col += 32) Ks[r * dp + col] = gdn_state_op(Ks[r * dp + col]);

    /* dS: zero at the last chunk and where the next chunk starts a document */
    const int zero = c == nchunk - 1 || (doc_start && doc_start[(size_t)b * T + t0 + GDN_C]);
    gdn_chain_receive(dS, ring + ((size_t)bh * 2 + (c & 1)) * slot, sync + 1 + ci, c < nchunk - 1, zero, &bar, D8,
                      sps);

    /* X = Xo + Xk dS to Xbuf, -e0 beta X over Qe */
    if (w0 < D) gdn_mma_n(gdn_state_split(0), nt, xo, Xks, qp, 1, m0, GDN_C - 1, dS, sps, 1, w0, D - 1, 0, D);
    {
        float *xg = Xbuf + ci * GDN_C * Dp;
#pragma unroll
        for (int j = 0; j < nt; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = gdn_fcol(w0, j, r);
                if (n < D) {
                    xg[(size_t)t * Dp + n] = xo[j][r];
                    Xt[t * qp + n] = gdn_state_op(-(s.e0[t] * s.bt[t]) * xo[j][r]);
                }
            }
    }
    __syncthreads();

    /* dS_prev = e0L dS + Hc - K^T (e0 beta X) to the ring for the previous chunk */
    if (c > 0) {
        if (!(doc_start && doc_start[(size_t)b * T + t0])) {
            float *sn = ring + ((size_t)bh * 2 + ((c - 1) & 1)) * slot;
#pragma unroll
            for (int i = 0; i < tpw; i++) {
                const int tile = warp + i * (GDN_NT / 32);
                if (tile < ntile) gdn_chain_update(nu, hc[i], tile, rt, s.e0[L - 1], dS, sps, Ks, dp, Xt, qp, D, sn);
            }
        }
        gdn_chain_release(sync + ci);
    }
    gdn_chain_save(dSbuf + ci * D * Dp, Dp, dS, sps, D);
    if (fused) gdn_chain_release(sync + 2 + (size_t)BH * nchunk + ci); /* X, dS and Pbuf are in place */
}

/* The chained backward for D <= 64 (nt 4) and D <= 96 (nt 6, with the grads phase of
 * gdn_grads.cuh in the same kernel). Tickets 0 .. BH nchunk - 1 run the chain; in the
 * kernel with grads (D > 64) the next BH nchunk run the grads phase of the chunks
 * in the same order, each after the done flag of its chunk (sync[2 + BH nchunk + ci],
 * set by the chunk's chain block once X, dS and Pbuf are written). A grads block waits
 * only on chain blocks, which took their tickets before it, and only the last chunks'
 * chain blocks are still running when the first grads blocks start: so the grads blocks
 * fill the SMs while the chain's last steps run, where the grads kernel had waited for
 * the chain kernel to end (B 8, T 2048, H 12, D 85, one H100: backward 1.130 -> 1.113 ms,
 * backward_set 1.039 -> 1.031; at H 16, D 64 the grads kernel after the chain was faster,
 * 0.942 against 0.954 ms on an H200, hence D > 64 only). Handing out the grads tickets
 * between the chain's, each level of grads a few chunks behind the chain (2, 4 or 8), so
 * that they find their chunk's X, dS and Pbuf still in L2, took the backward to 1.43-1.50
 * ms: the chain's blocks then start later and its steps wait on each other. */
#define GDN_BWD_CHAIN_KERNEL(name, nt, fused, dc)                                                                  \
    static __global__ void __launch_bounds__(GDN_NT, 2)                                                            \
    name(gdn_bwd_args a)                                                                                           \
    {                                                                                                              \
        __shared__ int ticket;                                                                                     \
        __shared__ uint64_t bar;                                                                                   \
        const int tk = gdn_chain_ticket(a.sync, &bar, &ticket), n = a.BH * a.nchunk;                               \
        if (!fused || tk < n) {                                                                                    \
            gdn_bwd_chain(nt, fused, tk, bar, a.Xbuf, a.dSbuf, a.Pbuf, a.sync, a.ring, a.dout, a.q, a.k, a.g,      \
                          a.beta, a.doc_start, a.T, a.H, dc ? dc : a.D, a.nchunk, a.BH, a.scale);                  \
            return;                                                                                                \
        }                                                                                                          \
        const int c = a.nchunk - 1 - (tk - n) / a.BH, bh = (tk - n) % a.BH;                                        \
        if (threadIdx.x == 0)                                                                                      \
            while (!gdn_ld_acquire(a.sync + 2 + n + (size_t)bh * a.nchunk + c)) __nanosleep(32);                   \
        __syncthreads();                                                                                           \
        gdn_bwd_grads(nt, c, bh, a.dq, a.dk, a.dv, a.dg, a.dbeta, a.dout, a.q, a.k, a.v, a.g, a.beta,              \
                      a.state_save, a.dSbuf, a.Wbuf, a.Xbuf, a.Pbuf, a.doc_start, a.T, a.H, dc ? dc : a.D, a.nchunk, \
                      a.scale, a.set);                                                                             \
    }
GDN_BWD_CHAIN_KERNEL(gdn_bwd_chain_kernel64, 4, 0, 0)
GDN_BWD_CHAIN_KERNEL(gdn_bwd_chain_kernel96, 6, 1, 0)
#define GDN_BWD_CHAIN_FIXED(d) GDN_BWD_CHAIN_KERNEL(gdn_bwd_chain_kernel_d##d, GDN_FIXED_NT(d), ((d) > 64), d)
GDN_FIXED_D(GDN_BWD_CHAIN_FIXED)

/* =================================================================================== */
/* launchers                                                                           */
/* =================================================================================== */

static int gdn_chain_mode;
extern "C" int cuda_gdn_set_chain(int mode)
{
    if (mode < 0 || mode > 2) die("gdn: form %d (0 by the shape, 1 chained, 2 three kernels)", mode);
    const int old = gdn_chain_mode;
    gdn_chain_mode = mode;
    return old;
}

int gdn_chain_use(int D, int BH, int nchunk)
{
    if (D > GDN_CHAIN_MAXD || gdn_chain_mode == 2) return 0;
    return gdn_chain_mode == 1 || BH >= nchunk;
}

size_t gdn_chain_scratch_floats(int D, int BH, int nchunk)
{
    return (size_t)BH * 2 * gdn_r8(D) * gdn_chain_sp(D) + 2 + 2 * (size_t)BH * nchunk;
}

/* the kernels' shared memory: header, [64, dp] regions, wide [64, gdn_chain_sp(D)] ones
 * (one in the forward, two in the backward) and R */
static size_t gdn_smem_chain(int D, int wide)
{
    const int tiles = 2 * GDN_C * GDN_PP, st = gdn_r8(D) * gdn_chain_sp(D);
    return sizeof(float) * (GDN_HDR + GDN_C * ((3 - wide) * gdn_kpitch(D) + wide * gdn_chain_sp(D)) +
                            (tiles > st ? tiles : st));
}

/* the ring and the counters in chain (gdn_chain_scratch_floats), the counters zeroed */
static unsigned *gdn_chain_sync(float *chain, int D, int BH, int nchunk)
{
    const size_t nring = (size_t)BH * 2 * gdn_r8(D) * gdn_chain_sp(D), nsync = 2 + 2 * (size_t)BH * nchunk;
    unsigned *sync = (unsigned *)(chain + nring);
    CUDA_CHECK(cudaMemsetAsync(sync, 0, nsync * sizeof(unsigned), cuda_stream()));
    return sync;
}

/* the kernel for head dim D: its own where GDN_FIXED_D lists D, else the general one */
static gdn_fwd_chain_fn gdn_fwd_chain_pick(int D)
{
#define GDN_PICK(d)                                                                                                \
    if (D == (d)) return gdn_fwd_chain_kernel_d##d;
    GDN_FIXED_D(GDN_PICK)
#undef GDN_PICK
    return D <= 64 ? gdn_fwd_chain_kernel64 : gdn_fwd_chain_kernel96;
}

static void (*gdn_bwd_chain_pick(int D))(gdn_bwd_args)
{
#define GDN_PICK(d)                                                                                                \
    if (D == (d)) return gdn_bwd_chain_kernel_d##d;
    GDN_FIXED_D(GDN_PICK)
#undef GDN_PICK
    return D <= 64 ? gdn_bwd_chain_kernel64 : gdn_bwd_chain_kernel96;
}

void gdn_fwd_chain_run(float *o, float *state_save, float *Wv, float *chain, const float *q, const float *k,
                       const float *v, const float *g, const float *beta, const int32_t *doc_start, int T, int H,
                       int D, int nchunk, int BH, float scale)
{
    unsigned *sync = gdn_chain_sync(chain, D, BH, nchunk);
    const gdn_fwd_chain_fn kern = gdn_fwd_chain_pick(D);
    const size_t sm = gdn_smem_chain(D, 1);
    gdn_allow_smem((const void *)kern, sm);
    kern<<<(unsigned)(BH * nchunk), GDN_NT, sm, cuda_stream()>>>(o, state_save, Wv, sync, chain, q, k, v, g, beta,
                                                                 doc_start, T, H, D, nchunk, BH, scale);
    LAUNCH_CHECK();
}

int gdn_bwd_chain_run(gdn_bwd_args a, float *chain)
{
    a.sync = gdn_chain_sync(chain, a.D, a.BH, a.nchunk);
    a.ring = chain;
    const int fused = a.D > 64; /* the D <= 96 kernels carry the grads phase */
    void (*kern)(gdn_bwd_args) = gdn_bwd_chain_pick(a.D);
    const size_t sc = gdn_smem_chain(a.D, 2), sg = fused ? gdn_smem_bwd_grads(a.D) : 0, sm = sc > sg ? sc : sg;
    gdn_allow_smem((const void *)kern, sm);
    kern<<<(unsigned)((1 + fused) * a.BH * a.nchunk), GDN_NT, sm, cuda_stream()>>>(a);
    LAUNCH_CHECK();
    return fused;
}
