/* gdn_backward.cu: the backward of the chunked gated delta rule on the GPU
 * (cuda_gdn_backward), the CUDA twin of the backward of src/cpu/cpu_gdn.c. The design and
 * the helpers it shares with the forward (gdn_forward.cu) are in gdn_internal.cuh.
 *
 * Backward, three kernels:
 *   prep  (chunk, b*h):  T, M, Xo, Xk, Hc, and E o KK and M for the grads kernel.
 *   state (24-48 value columns, b*h): walks the chunks last to first, saves the dS arriving
 *                        at each chunk's end, turns Xo into X in place and carries dS.
 *   grads (chunk, b*h):  steps 3-8: the pair matrices dKK = -E o beta (X W^T) and
 *                        dQK = E o (dO W^T) with the dG and dbeta terms of E o KK and M;
 *                        then dq, dk from dKK, dQK and from dO S0^T, X S0^T, W dS^T
 *                        (the start- and end-state terms); dv = beta X; dbeta; dg by a
 *                        segmented suffix sum.
 * Where gdn_chain_use says so, one chained kernel (gdn_chain.cu) does the work of prep and
 * state (Pbuf, X, dS; no Xk, Hc or copy of K in scratch), and for D > 64 that of grads as
 * well; for D <= 64 grads follows it. The grads phase itself is in
 * gdn_grads.cuh, which both kernels run.
 */
#include "gdn_grads.cuh"

/* Per (chunk, b*h): e0 and e0 beta to e0buf [bh][chunk][128]; Xk = T^T diag(eL) K (in the
 * state kernel's layout, [64, dp], pad columns zero); Hc = Qs^T diag(e0) dO [D, D];
 * Xo = T^T M^T dO = N dO, N = T^T M^T (upper triangular, built once: one product per
 * panel of dO instead of two); E o KK (strictly lower) and M = scale E o QK (lower) to
 * Pbuf [bh][chunk][64][64], both triangles in one block (gdn_pairs_put_m), the grads
 * kernel's dG and dbeta terms (it had computed
 * both products again from K and q: with them read from here the grads kernel took 0.655
 * instead of 0.700 ms and this one 0.384 instead of 0.356, the backward 1.318 -> 1.304).
 * (W is the forward's, from state_save.)
 * Shared: header and three regions, 66 KB at D = 85 so that three blocks share an SM
 * (with a region each for K, q, A or T, and M the block took 101 KB and two did; the
 * registers are held to 80 for three):
 *   RK [64, dp]:    K (pad columns zero), then q again, scaled by scale e0 (Hc's operand)
 *   RQ [64, kpp]:   q (unscaled), then A and T over it (pitch GDN_PP), then panels of dO
 *   RM [64, GDN_PP]: M, then N
 * (kpp = gdn_kpitch_pp(D)). Warp w computes the warp tile (16 (w % 4), 32 (w / 4)) of
 * each [64, 64] result; T and M are lower triangular, so products with them, their
 * transposes or N contract only over the rows or columns that the tile reaches. */
static __global__ void __launch_bounds__(GDN_NT, 3)
gdn_bwd_prep_kernel(float *Xbuf, float *Xkbuf, float *Kpbuf, float *Hcbuf, float *e0buf, float *Pbuf, const float *dout,
                    const float *q, const float *k, const float *g, const float *beta,
                    const int32_t *doc_start, int T, int H, int D, int nchunk, float scale)
{
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, tid = threadIdx.x;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D, tok = gdn_row(b, t0, h, T, H, D);
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    float *RK = gdn_smem + GDN_HDR, *RQ = RK + GDN_C * dp, *RM = RQ + GDN_C * gdn_kpitch_pp(D);
    float *Ks = RK, *Qe = RK, *Qs = RQ, *Ts = RQ, *Op = RQ, *Ms = RM, *Ns = RM;
    const int warp = tid >> 5, m0 = 16 * (warp & 3), n0 = 32 * (warp >> 2);
    float *Xc = Xbuf + ci * GDN_C * Dp, *Xkc = Xkbuf + ci * GDN_C * dp;
    float *Hc = Hcbuf + ci * D * Dp;

    gdn_load_async(Ks, dp, GDN_C, D8, k + tok, rs, L, 0, D); /* in flight during the scan */
    gdn_load_async(Qs, dp, GDN_C, D8, q + tok, rs, L, 0, D);  /* unscaled: scale is applied to M and e0 Qs */
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);
    if (tid < GDN_C) {
        e0buf[ci * 2 * GDN_C + tid] = s.e0[tid];
        e0buf[ci * 2 * GDN_C + GDN_C + tid] = s.e0[tid] * s.bt[tid];
    }
    gdn_sync();
    gdn_store_kpad(Kpbuf + ci * GDN_C * dp, Ks, dp, D);
    gdn_zero_pad(Xkc, dp, D);

    /* M from Qs K^T (to RM) and A from K K^T (over q in RQ, once every warp is done
     * reading q) */
    {
        float ak[4][4], aq[4][4];
        gdn_zero(ak);
        gdn_zero(aq);
        if (n0 < m0 + 16)
            gdn_mma_2a(GDN_SPLIT_PAIR, ak, aq, Ks, Qs, dp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
        float *pb = Pbuf + ci * GDN_C * GDN_C; /* E o KK for the grads kernel (M follows below) */
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r += 2) {
                const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r);
                const float E0 = gdn_decay(s, t, u, L), E1 = gdn_decay(s, t, u + 1, L);
                Ms[t * GDN_PP + u] = scale * E0 * aq[j][r];
                Ms[t * GDN_PP + u + 1] = scale * E1 * aq[j][r + 1];
                gdn_pairs_put_kk(pb, t, u, E0 * ak[j][r]);
                gdn_pairs_put_kk(pb, t, u + 1, E1 * ak[j][r + 1]);
                ak[j][r] = u < t ? s.bt[t] * E0 * ak[j][r] : 0.0f;
                ak[j][r + 1] = u + 1 < t ? s.bt[t] * E1 * ak[j][r + 1] : 0.0f;
            }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) Ts[gdn_frow(m0, r) * GDN_PP + gdn_fcol(n0, j, r)] = ak[j][r];
    }
    __syncthreads();
    /* T over A: its diagonal blocks (warps 0-1; meanwhile K's rows become eL K, Xk's
     * right-hand side; Kp has been stored), then its lower-left block (all warps) */
    if (tid < GDN_C) {
        gdn_invert_diag(Ts, Ts);
    } else {
        const int lane = tid & 31;
        for (int r = (tid - GDN_C) >> 5; r < GDN_C; r += (GDN_NT - GDN_C) / 32) {
            const float eL = s.eL[r];
            for (int col = lane; col < D; col += 32) Ks[r * dp + col] *= eL;
        }
        gdn_pairs_put_m(Pbuf + ci * GDN_C * GDN_C, Ms, GDN_C, GDN_NT - GDN_C); /* M for the grads kernel */
    }
    __syncthreads();
    gdn_invert_offdiag(Ts);
    __syncthreads();

    /* Xk = T^T (eL K); T^T is upper triangular */
    for (int np = 0; np < D; np += 64) {
        if (np + n0 >= D) continue;
        float acc[4][4];
        gdn_zero(acc);
        gdn_mma(GDN_SPLIT_SOLVE, acc, Ts, 1, GDN_PP, m0, GDN_C - 1, Ks + np, dp, 1, n0, D - 1 - np, m0, GDN_C);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int n = np + gdn_fcol(n0, j, r);
                if (n < dp) /* the pad columns too (gdn_zero_pad) */
                    Xkc[(size_t)gdn_frow(m0, r) * dp + n] = n < D ? gdn_state_op(acc[j][r]) : 0.0f;
            }
    }
    /* N = T^T M^T: N_mn = sum_k T_km M_nk over m <= k <= n */
    float an[4][4];
    gdn_zero(an);
    if (n0 + 32 > m0)
        gdn_mma(GDN_SPLIT_SOLVE, an, Ts, 1, GDN_PP, m0, GDN_C - 1, Ms, 1, GDN_PP, n0, GDN_C - 1, m0,
                gdn_imin(GDN_C, n0 + 32));
    __syncthreads(); /* K, T and M are done with */
    gdn_load_async(Qe, dp, GDN_C, D8, q + tok, rs, L, 0, D);
    gdn_load_async(Op, GDN_PP, GDN_C, 64, dout + tok, rs, L, 0, D); /* the first panel of dO */
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) Ns[gdn_frow(m0, r) * GDN_PP + gdn_fcol(n0, j, r)] = an[j][r];
    gdn_sync();
    for (int r = warp; r < GDN_C; r += GDN_NT / 32) { /* Qe = scale e0 q */
        const float e0 = scale * s.e0[r];
        for (int col = tid & 31; col < D; col += 32) Qe[r * dp + col] *= e0;
    }
    __syncthreads();

    /* per 64 value columns of dO: Hc = Qe^T dO and Xo = N dO */
    const int njp = (D + 63) / 64;
    for (int pi = 0; pi < njp; pi++) {
        const int jp = 64 * pi, jw = gdn_imin(64, D - jp), act = n0 < jw;
        if (pi > 0) {
            gdn_load_async(Op, GDN_PP, GDN_C, 64, dout + tok, rs, L, jp, D);
            gdn_sync();
        }
        for (int ip = 0; ip < D; ip += 64) {
            if (!act || ip + m0 >= D) continue;
            float acc[4][4];
            gdn_zero(acc);
            gdn_mma(GDN_SPLIT_S0, acc, Qe + ip, 1, dp, m0, D - 1 - ip, Op, GDN_PP, 1, n0, 63, 0, GDN_C);
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int m = ip + gdn_frow(m0, r), n = gdn_fcol(n0, j, r);
                    if (m < D && n < jw) Hc[(size_t)m * Dp + jp + n] = acc[j][r];
                }
        }
        if (act) {
            float acc[4][4];
            gdn_zero(acc);
            gdn_mma(GDN_SPLIT_SOLVE, acc, Ns, GDN_PP, 1, m0, GDN_C - 1, Op, GDN_PP, 1, n0, 63, m0, GDN_C);
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int n = gdn_fcol(n0, j, r);
                    if (n < jw) Xc[(size_t)gdn_frow(m0, r) * Dp + jp + n] = acc[j][r];
                }
        }
        if (pi + 1 < njp) __syncthreads(); /* the next panel lies over this one */
    }
}

/* Per (8 snt value columns j0.., b*h; snt from gdn_state_nt), chunks last to first: dS
 * [D, 8 snt] starts at 0; per chunk: save dS (the gradient at the chunk's end); X = Xo + Xk dS (written over Xo);
 * dS = e0L dS + Hc - K^T diag(e0 beta) X, or 0 if the chunk's first token starts a
 * document. Shared: dS [r8(D), sp] (rows past D zero), e0 beta X [64, sp], Xk and
 * K of the chunk [64, dp] (pad columns zero), e0 and e0 beta [128], two mbarriers.
 * Refills as in the forward state kernel: X (Xk, e0, e0 beta) and K; warps as there. */
static __device__ __forceinline__ void
gdn_bwd_state(const int snt, float *dSbuf, float *Xbuf, const float *Xkbuf, const float *Hcbuf,
              const float *Kpbuf, const float *e0buf, const int32_t *doc_start, int T, int H, int D, int nchunk)
{
    const int j0 = blockIdx.x * 8 * snt, bh = blockIdx.y, b = bh / H, tid = threadIdx.x;
    const int sp = gdn_state_sp(snt), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D), warp = tid >> 5;
    const int nv = gdn_imin(8 * snt, D - j0);
    float *dS = gdn_smem, *Xt = dS + D8 * sp, *Xkb = Xt + GDN_C * sp, *Kb = Xkb + GDN_C * dp;
    float *sc = Kb + GDN_C * dp;
    const size_t DD = (size_t)D * Dp;

    uint64_t *bar = (uint64_t *)(sc + 2 * GDN_C); /* X, K */
    const unsigned xbytes = gdn_refill_bytes(dp, 1), kbytes = gdn_refill_bytes(dp, 0);

    {
        const size_t ci = (size_t)bh * nchunk + nchunk - 1;
        gdn_state_start(dS, D, sp, bar, Xkb, Xkbuf + ci * GDN_C * dp, Kb, Kpbuf + ci * GDN_C * dp, dp, sc,
                        e0buf + ci * 2 * GDN_C);
    }

    for (int c = nchunk - 1; c >= 0; c--) {
        const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0);
        const unsigned par = (unsigned)(nchunk - 1 - c) & 1u; /* phases completed before this chunk's */
        const size_t ci = (size_t)bh * nchunk + c;
        const int reset0 = doc_start && doc_start[(size_t)b * T + t0];
        float xo[GDN_NTW][4];
        gdn_state_base(xo, Xbuf + ci * GDN_C * Dp + j0, Dp, nv, snt);
        gdn_mbar_wait(&bar[0], par); /* X(c) has landed */
        if (tid == 0 && c > 0) gdn_mbar_expect(&bar[0], xbytes);
        __syncthreads();
        const float e0L = sc[L - 1];
        float *ds = dSbuf + ci * DD + j0;
        gdn_state_store(ds, Dp, dS, sp, D, nv);

        /* X = Xo + Xk dS (gdn_state_product; Xt then holds e0 beta X) */
        {
            float x[GDN_NTW][4];
            gdn_state_product(x, xo, Xbuf + ci * GDN_C * Dp + j0, Dp, nv, Xkb, dp, dS, Xt, D, 1.0f, snt);
            if (warp < 4)
#pragma unroll
                for (int j = 0; j < snt; j++)
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        const int t = gdn_frow(16 * warp, r);
                        Xt[t * sp + gdn_fcol(0, j, r)] = gdn_state_op(sc[GDN_C + t] * x[j][r]);
                    }
        }
        /* Hc of the warp's first row tile of dS, loaded before the barriers (for their
         * latency to overlap them); later row tiles load theirs in the loop below */
        const float *hc = Hcbuf + ci * DD + j0;
        float hv[GDN_NTW][4];
        gdn_state_tile(hv, hc, Dp, 16 * warp, D, nv, snt);
        __syncthreads();
        if (c > 0) gdn_refill(Xkb, Xkbuf + (ci - 1) * GDN_C * dp, dp, sc, e0buf + (ci - 1) * 2 * GDN_C, &bar[0]);
        gdn_mbar_wait(&bar[1], par); /* K(c) has landed */
        if (tid == 0 && c > 0) gdn_mbar_expect(&bar[1], kbytes);
        __syncthreads();

        /* dS = e0L dS + Hc - K^T (e0 beta X) */
        for (int m0 = 16 * warp; m0 < D; m0 += 16 * (int)(blockDim.x >> 5)) {
            float acc[GDN_NTW][4];
            if (m0 != 16 * warp) gdn_state_tile(hv, hc, Dp, m0, D, nv, snt);
            gdn_state_zero(acc);
            gdn_mma_n(gdn_state_split(1), snt, acc, Kb, 1, dp, m0, D - 1, Xt, sp, 1, 0, 8 * snt - 1, 0, GDN_C);
#pragma unroll
            for (int j = 0; j < snt; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int m = gdn_frow(m0, r), n = gdn_fcol(0, j, r);
                    if (m < D)
                        dS[m * sp + n] = reset0 ? 0.0f : e0L * dS[m * sp + n] + hv[j][r] - acc[j][r];
                }
        }
        __syncthreads();
        if (c > 0) gdn_refill(Kb, Kpbuf + (ci - 1) * GDN_C * dp, dp, sc, NULL, &bar[1]);
    }
}

/* the backward state kernel with 24, 32 and 48 value columns a block (gdn_state_nt; as in
 * the forward, the 48-column blocks run two an SM) */
typedef void (*gdn_bwd_state_fn)(float *, float *, const float *, const float *, const float *, const float *,
                                 const int32_t *, int, int, int, int);
#define GDN_BWD_STATE_KERNEL(name, snt, minb)                                                                      \
    static __global__ void __launch_bounds__(GDN_ST, minb)                                                         \
    name(float *dSbuf, float *Xbuf, const float *Xkbuf, const float *Hcbuf, const float *Kpbuf, const float *e0buf, \
         const int32_t *doc_start, int T, int H, int D, int nchunk)                                                \
    {                                                                                                              \
        gdn_bwd_state(snt, dSbuf, Xbuf, Xkbuf, Hcbuf, Kpbuf, e0buf, doc_start, T, H, D, nchunk);                   \
    }
GDN_BWD_STATE_KERNEL(gdn_bwd_state_kernel24, 3, 3)
GDN_BWD_STATE_KERNEL(gdn_bwd_state_kernel32, 4, 3)
GDN_BWD_STATE_KERNEL(gdn_bwd_state_kernel48, 6, 2)

/* the grads kernel for D <= 64 (dq, dk passes of 64 key columns) and for D > 64 (96):
 * two kernels, so that each gets the registers its own tiles need (in one kernel the
 * wide tiles' pressure made D = 64 2% slower); and for the head dims of GDN_FIXED_D with D
 * a constant (dc) */
typedef void (*gdn_bwd_grads_fn)(float *, float *, float *, float *, float *, const float *, const float *,
                                 const float *, const float *, const float *, const float *, const float *,
                                 const float *, const float *, const float *, const float *, const int32_t *, int, int,
                                 int, int, float, int);
#define GDN_BWD_GRADS_KERNEL(name, nt, dc)                                                                         \
    static __global__ void __launch_bounds__(GDN_NT, 2)                                                            \
    name(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout, const float *q, const float *k, \
         const float *v, const float *g, const float *beta, const float *state_save, const float *dSbuf,           \
         const float *Wbuf, const float *Xbuf, const float *Pbuf, const int32_t *doc_start, int T, int H, int D,    \
         int nchunk, float scale, int set)                                                                         \
    {                                                                                                              \
        gdn_bwd_grads(nt, blockIdx.x, blockIdx.y, dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save,      \
                      dSbuf, Wbuf, Xbuf, Pbuf, doc_start, T, H, dc ? dc : D, nchunk, scale, set);                  \
    }
GDN_BWD_GRADS_KERNEL(gdn_bwd_grads_kernel, 4, 0)
GDN_BWD_GRADS_KERNEL(gdn_bwd_grads_wide_kernel, 6, 0)
#define GDN_BWD_GRADS_FIXED(d) GDN_BWD_GRADS_KERNEL(gdn_bwd_grads_kernel_d##d, GDN_FIXED_NT(d), d)
GDN_FIXED_D(GDN_BWD_GRADS_FIXED)

/* the grads kernel for head dim D: its own where GDN_FIXED_D lists D, else the general one */
static gdn_bwd_grads_fn gdn_bwd_grads_pick(int D)
{
#define GDN_PICK(d)                                                                                                \
    if (D == (d)) return gdn_bwd_grads_kernel_d##d;
    GDN_FIXED_D(GDN_PICK)
#undef GDN_PICK
    return D > 64 ? gdn_bwd_grads_wide_kernel : gdn_bwd_grads_kernel;
}

/* =================================================================================== */
/* launcher                                                                            */
/* =================================================================================== */

/* dynamic shared memory of each kernel, in bytes (the state kernel's: gdn_internal.cuh) */
static size_t gdn_smem_bwd_prep(int D)
{
    return sizeof(float) * (GDN_HDR + GDN_C * gdn_kpitch(D) + GDN_C * gdn_kpitch_pp(D) + GDN_C * GDN_PP);
}

/* the grads kernel, after the state kernel or the chained backward */
static void gdn_grads_run(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout, const float *q,
                          const float *k, const float *v, const float *g, const float *beta, const float *state_save,
                          const float *dSbuf, const float *Wbuf, const float *Xbuf, const float *Pbuf,
                          const int32_t *doc_start, int T, int H, int D, int nchunk, int BH, float scale, int set)
{
    const size_t sm = gdn_smem_bwd_grads(D);
    const gdn_bwd_grads_fn grads = gdn_bwd_grads_pick(D);
    gdn_allow_smem((const void *)grads, sm);
    grads<<<dim3(nchunk, BH), GDN_NT, sm, cuda_stream()>>>(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save,
                                                            dSbuf, Wbuf, Xbuf, Pbuf, doc_start, T, H, D, nchunk, scale,
                                                            set);
    LAUNCH_CHECK();
}

/* Backward: accumulates into dq, dk, dv, dg, dbeta, or (set) writes them. W comes from
 * state_save. Scratch: a [64, gdn_r4(D)] array, 2 [64, gdn_kpitch(D)] arrays (the state
 * kernel's operands in its layout, gdn_refill), 2 [D, gdn_r4(D)] arrays, a [128] vector
 * (e0, e0 beta) and the pairs' [64, 64] block per (b, h, chunk). */
static void gdn_backward(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout, const float *q,
                         const float *k, const float *v, const float *g, const float *beta, const float *state_save,
                         const int32_t *doc_start, int B, int T, int H, int D, float scale, int set)
{
    gdn_check_shape("gdn_backward", B, T, H, D);
    const int nchunk = (T + GDN_C - 1) / GDN_C, BH = B * H;
    const size_t Dp = gdn_r4(D), rows = (size_t)BH * nchunk * GDN_C, states = (size_t)BH * nchunk * D * Dp;
    fatal_check(gdn_w_pitch(D) == (int)Dp);
    const float *Wbuf = state_save + gdn_state_w_offset(B, T, H, D);
    if (gdn_chain_use(D, BH, nchunk)) {
        const size_t own = rows * Dp + states + rows * GDN_C;
        float *Xbuf = (float *)cuda_scratch((own + gdn_chain_scratch_floats(D, BH, nchunk)) * sizeof(float));
        float *dSbuf = Xbuf + rows * Dp, *Pbuf = dSbuf + states, *chain = Pbuf + rows * GDN_C;
        const gdn_bwd_args a = {.dq = dq, .dk = dk, .dv = dv, .dg = dg, .dbeta = dbeta, .dout = dout, .q = q,
                                .k = k, .v = v, .g = g, .beta = beta, .state_save = state_save, .Wbuf = Wbuf,
                                .Xbuf = Xbuf, .dSbuf = dSbuf, .Pbuf = Pbuf, .doc_start = doc_start, .T = T, .H = H,
                                .D = D, .nchunk = nchunk, .BH = BH, .set = set, .scale = scale};
        if (!gdn_bwd_chain_run(a, chain))
            gdn_grads_run(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, dSbuf, Wbuf, Xbuf, Pbuf, doc_start,
                          T, H, D, nchunk, BH, scale, set);
        return;
    }
    const size_t dp = gdn_kpitch(D);
    float *Xbuf = (float *)cuda_scratch((rows * Dp + 2 * rows * dp + 2 * states + 2 * rows + rows * GDN_C) *
                                        sizeof(float));
    float *Xkbuf = Xbuf + rows * Dp, *Kpbuf = Xkbuf + rows * dp, *Hcbuf = Kpbuf + rows * dp;
    float *dSbuf = Hcbuf + states, *e0buf = dSbuf + states, *Pbuf = e0buf + 2 * rows;
    cudaStream_t st = cuda_stream();
    const int snt = gdn_state_nt(D, BH), nsb = (D + 8 * snt - 1) / (8 * snt);
    const gdn_bwd_state_fn state = snt == 3 ? gdn_bwd_state_kernel24 : snt == 4 ? gdn_bwd_state_kernel32
                                                                                 : gdn_bwd_state_kernel48;
    const size_t sm1 = gdn_smem_bwd_prep(D), sm2 = gdn_smem_state(D, snt);
    gdn_allow_smem((const void *)gdn_bwd_prep_kernel, sm1);
    gdn_allow_smem((const void *)state, sm2);

    gdn_bwd_prep_kernel<<<dim3(nchunk, BH), GDN_NT, sm1, st>>>(Xbuf, Xkbuf, Kpbuf, Hcbuf, e0buf, Pbuf, dout, q, k,
                                                               g, beta, doc_start, T, H, D, nchunk, scale);
    LAUNCH_CHECK();
    state<<<dim3(nsb, BH), gdn_state_threads(nsb * BH), sm2, st>>>(dSbuf, Xbuf, Xkbuf, Hcbuf, Kpbuf, e0buf, doc_start,
                                                                   T, H, D, nchunk);
    LAUNCH_CHECK();
    gdn_grads_run(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, dSbuf, Wbuf, Xbuf, Pbuf, doc_start, T, H,
                  D, nchunk, BH, scale, set);
}

extern "C" void cuda_gdn_backward(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                                  const float *q, const float *k, const float *v, const float *g, const float *beta,
                                  const float *state_save, const int32_t *doc_start, int B, int T, int H, int D,
                                  float scale)
{
    gdn_backward(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale, 0);
}

/* as cuda_gdn_backward, but dq, dk, dv, dg, dbeta are written (old contents unread) */
extern "C" void cuda_gdn_backward_set(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                                      const float *q, const float *k, const float *v, const float *g,
                                      const float *beta, const float *state_save, const int32_t *doc_start, int B,
                                      int T, int H, int D, float scale)
{
    gdn_backward(dq, dk, dv, dg, dbeta, dout, q, k, v, g, beta, state_save, doc_start, B, T, H, D, scale, 1);
}
