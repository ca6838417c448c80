/* gdn_grads.cuh: the GDN backward's grads phase (steps 3-8 of cpu_gdn.c), per (chunk,
 * b*h): included by gdn_backward.cu, whose grads kernel runs it after the three-kernel
 * form's state kernel, and by gdn_chain.cu, whose chained backward runs it in the same
 * kernel as the chain (blocks of either role). */
#ifndef DELTAMLA_GDN_GRADS_CUH
#define DELTAMLA_GDN_GRADS_CUH

#include "gdn_internal.cuh"

/* The pairs block of a chunk in Pbuf ([64, 64], from the prep kernel or the chain to the
 * grads phase): M = scale E o QK on and below the diagonal and E o KK, strictly lower,
 * transposed above it, so that the two triangles fill one block where they had taken two
 * (200 of the backward's 1.7 GB of DRAM traffic at B 8, T 2048, H 12, D 85; forward +
 * backward 1.545 -> 1.515 ms there on an H100, 1.457 -> 1.426 writing the gradients). */
/* E o KK at (t, u) into its place in the block, where u < t */
static __device__ __forceinline__ void gdn_pairs_put_kk(float *pb, int t, int u, float x)
{
    if (u < t) pb[u * GDN_C + t] = x;
}
/* M's rows (shared memory, pitch GDN_PP) into the block on and below the diagonal, 16
 * bytes a step where the step lies wholly there; by threads first .. first + n - 1 */
static __device__ __forceinline__ void gdn_pairs_put_m(float *pb, const float *Ms, int first, int n)
{
    for (int e = (int)threadIdx.x - first; e < GDN_C * GDN_C / 4; e += n) {
        const int t = e >> 4, c0 = 4 * (e & 15);
        const float4 m = *(const float4 *)(Ms + t * GDN_PP + c0);
        float *d = pb + t * GDN_C + c0;
        if (c0 + 3 <= t) {
            *(float4 *)d = m;
        } else if (c0 <= t) {
            d[0] = m.x;
            if (c0 + 1 <= t) d[1] = m.y;
            if (c0 + 2 <= t) d[2] = m.z;
        }
    }
}

/* *g = x where set, else *g += x, for a gradient element that this thread alone updates
 * in the op: the add as a reduction in L2 (atomicAdd with its result unused compiles to
 * red.global.add.f32, which no instruction waits for), where a read-add-write had waited
 * for its load. The one add per element leaves the result as determined as before: the
 * same round-to-nearest sum, but that the reduction flushes subnormal sums to zero. */
static __device__ __forceinline__ void gdn_grad_put(float *g, float x, int set)
{
    if (set)
        *g = x;
    else
        atomicAdd(g, x);
}

/* The grads kernel's dq and dk terms, a pass per ipw = 16 nt key columns ip (nt = 4 or 6,
 * a constant at each call: warp tiles of 16 x 8 nt; with 96 columns a pass, D = 85 takes
 * one pass where 64-column passes took two, each reading dO, X and W again). Per pass,
 * from the states: ZO = dO S0^T, Z = X S0^T, Y = W dS^T, so dQs = e0 ZO and
 * dK = eL Y - e0 beta Z, and the row sums qs . ZO, k . Z, k . Y, per warp tile over its
 * columns into dots [3][64][2] (each slot owned by one thread); then, starting from
 * those, the pairs' terms dQs += dQK K, dK += dKK K + dKK^T K + dQK^T Qs; then one
 * coalesced add to dq and dk (gdn_grad_put; with set, a write). The row
 * sums take qs and k from the K and Qs panels of the pairs' products. The region reg
 * holds 32-column panels of dO, X, W [64, GDN_VP] and ipw x 32 blocks of S0, dS, then
 * K and Qs [64, ipw + 8], then the tile's terms [64, ipw + 8] x 2 (rows of 8 mod 32
 * floats: the pairs' products read K and Qs down their columns, by scalar loads that a
 * pitch of 4 mod 8 had put in two-way bank conflicts; B 8, T 2048, H 12, D 85 on an H200:
 * 1.520 -> 1.512 ms forward + backward_set). Returns the thread's part of <S0, dS>. All
 * threads. */
static __device__ __forceinline__ float gdn_grads_dqdk(const int nt, float *reg, const float *dKK, const float *dQK,
                                                       float *dots, gdn_hdr s, float *dq, float *dk,
                                                       const float *dout, const float *q, const float *k,
                                                       const float *Xc, const float *Wc, const float *S0,
                                                       const float *dSc, size_t tok, size_t rs, int L, int D,
                                                       float scale, int set)
{
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp & 3, wn = warp >> 2, m0 = 16 * wm, n0 = 8 * nt * wn;
    const int lg = (tid & 31) >> 2, lq = tid & 3, Dp = gdn_r4(D), ipw = 16 * nt, kqp = ipw + 8;
    float sds = 0.0f;
    for (int ip = 0; ip < D; ip += ipw) {
        const int iw = gdn_imin(ipw, D - ip), act = n0 < iw;
        float a1[GDN_NTW][4], a2[GDN_NTW][4]; /* the tile's dQs and dK */
        {
            float zo[GDN_NTW][4], z[GDN_NTW][4], y[GDN_NTW][4];
#pragma unroll
            for (int j = 0; j < GDN_NTW; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) zo[j][r] = z[j][r] = y[j][r] = 0.0f;
            float *Op = reg, *Xp = Op + GDN_C * GDN_VP, *Wp = Xp + GDN_C * GDN_VP;
            float *Sp = Wp + GDN_C * GDN_VP, *dSp = Sp + ipw * GDN_VP;
            for (int jp = 0; jp < D; jp += GDN_KP) {
                const int jw = gdn_imin(GDN_KP, D - jp);
                gdn_load_async(Op, GDN_VP, GDN_C, GDN_KP, dout + tok, rs, L, jp, D);
                gdn_load_async(Xp, GDN_VP, GDN_C, GDN_KP, Xc, Dp, GDN_C, jp, D);
                gdn_load_async(Wp, GDN_VP, GDN_C, GDN_KP, Wc, Dp, GDN_C, jp, D);
                gdn_load_async(Sp, GDN_VP, ipw, GDN_KP, S0 + (size_t)ip * D, D, iw, jp, D);
                gdn_load_async(dSp, GDN_VP, ipw, GDN_KP, dSc + (size_t)ip * Dp, Dp, iw, jp, D);
                gdn_sync(); /* (issuing the first panel before the pairs' epilogue: 0.005 ms slower) */
                if (act) {
                    gdn_mma_2a_n(GDN_SPLIT_S0, nt, zo, z, Op, Xp, GDN_VP, 1, m0, GDN_C - 1, Sp, 1, GDN_VP, n0, ipw - 1,
                                 0, jw);
                    gdn_mma_n(GDN_SPLIT_S0, nt, y, Wp, GDN_VP, 1, m0, GDN_C - 1, dSp, 1, GDN_VP, n0, ipw - 1, 0, jw);
                }
                for (int e = tid; e < ipw * GDN_KP; e += GDN_NT) {
                    const int x = (e / GDN_KP) * GDN_VP + e % GDN_KP;
                    sds = fmaf(Sp[x], dSp[x], sds);
                }
                gdn_sync();
            }
            float *Kq = reg, *Qq = Kq + GDN_C * kqp; /* over the panels above (the barrier ordered them) */
            gdn_load_async(Kq, kqp, GDN_C, ipw, k + tok, rs, L, ip, D);
            gdn_load_async(Qq, kqp, GDN_C, ipw, q + tok, rs, L, ip, D); /* unscaled */
            gdn_sync();
            float pq[2] = {0, 0}, pk[2] = {0, 0}, py[2] = {0, 0};
#pragma unroll
            for (int j = 0; j < GDN_NTW; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    if (j >= nt) continue;
                    const int t = gdn_frow(m0, r), n = gdn_fcol(n0, j, r);
                    if (t < L && n < iw) {
                        const float qv = Qq[t * kqp + n], kv = Kq[t * kqp + n];
                        pq[r >> 1] = fmaf(qv, zo[j][r], pq[r >> 1]);
                        pk[r >> 1] = fmaf(kv, z[j][r], pk[r >> 1]);
                        py[r >> 1] = fmaf(kv, y[j][r], py[r >> 1]);
                    }
                    a1[j][r] = scale * s.e0[t] * zo[j][r];
                    a2[j][r] = s.eL[t] * y[j][r] - s.e0[t] * s.bt[t] * z[j][r];
                }
#pragma unroll
            for (int i = 0; i < 2; i++) {
                pq[i] = gdn_quad_sum(pq[i]);
                pk[i] = gdn_quad_sum(pk[i]);
                py[i] = gdn_quad_sum(py[i]);
            }
            if (lq == 0)
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int row = m0 + lg + 8 * i;
                    dots[row * 2 + wn] += scale * pq[i];
                    dots[2 * GDN_C + row * 2 + wn] += pk[i];
                    dots[4 * GDN_C + row * 2 + wn] += py[i];
                }
            if (act) {
                gdn_mma_2a_n(GDN_SPLIT_GRAD, nt, a1, a2, dQK, dKK, GDN_PP, 1, m0, GDN_C - 1, Kq, kqp, 1, n0, ipw - 1, 0,
                             m0 + 16);
                gdn_mma_n(GDN_SPLIT_GRAD, nt, a2, dKK, 1, GDN_PP, m0, GDN_C - 1, Kq, kqp, 1, n0, ipw - 1, m0, GDN_C);
                gdn_mma_n(GDN_SPLIT_GRAD, nt, a2, dQK, 1, GDN_PP, m0, GDN_C - 1, Qq, kqp, 1, n0, ipw - 1, m0, GDN_C);
            }
        }
        /* the tile's dq and dk terms parked over K and Qs, then added to (set: written
         * over) the pass's rows of dq and dk, a warp per row */
        float *Pq = reg, *Pk = Pq + GDN_C * kqp;
        gdn_sync();
        if (act)
#pragma unroll
            for (int j = 0; j < GDN_NTW; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    if (j >= nt) continue;
                    const int x = gdn_frow(m0, r) * kqp + gdn_fcol(n0, j, r);
                    Pq[x] = a1[j][r];
                    Pk[x] = a2[j][r];
                }
        gdn_sync();
        for (int t = warp; t < L; t += GDN_NT / 32)
#pragma unroll
            for (int u = 0; u < GDN_NTW / 2; u++) {
                const int n = (tid & 31) + 32 * u;
                if (u < nt / 2 && n < iw) {
                    const size_t x = tok + (size_t)t * rs + ip + n;
                    gdn_grad_put(dq + x, Pq[t * kqp + n], set);
                    gdn_grad_put(dk + x, Pk[t * kqp + n], set);
                }
            }
        gdn_sync(); /* the next pass's panels lie over Pq and Pk */
    }
    return sds;
}

/* Per (chunk c, b*h bh): the local gradients (steps 3-8 of cpu_gdn.c) into dq, dk, dv, dg,
 * dbeta, from S0 (state_save), dS (dL/dS_end, from the state kernel or the chain), W and
 * X. v . X runs on warps 4 and 5, which have no tile of the pairs' lower products (on
 * warps 0 and 1, which have, the op took 0.007 ms longer at B 8, T 2048, H 12, D 85).
 * Shared: header; dKK and dQK [64, GDN_PP]; partial sums of the pairs' rows [2][64][2]
 * (one per column half) and columns [64][4] (one per row quarter); partial sums of the
 * state terms' rows [3][64][2]; per-row sums [6][64]; per-thread sums of <S0, dS> [256];
 * then one region reused by the phases (gdn_grads_region):
 *   pairs:  32-column panels of X, dO, W, V (4 x [64, GDN_VP]), with dQK first holding
 *           the block of M and E o KK^T from the prep kernel or the chain (Pbuf)
 *   dk/dq:  as gdn_grads_dqdk lays it out
 * Warp w computes the warp tile (16 (w % 4), 32 (w / 4)) of every [64, 64] result of the
 * pairs (gdn_grads_dqdk's tiles are 16 x 48 where D > 64); row and column sums of a tile
 * are reduced across its lanes by shuffles in a fixed order. */
static __host__ __device__ __forceinline__ int gdn_grads_region(int D)
{
    const int ipw = D > 64 ? 96 : 64, pairs = 4 * GDN_C * GDN_VP, panels = (3 * GDN_C + 2 * ipw) * GDN_VP;
    const int kq = 2 * GDN_C * (ipw + 8), m = panels > kq ? panels : kq;
    return m > pairs ? m : pairs;
}
/* dg of the chunk's tokens (token r's at dgc[r H]) from dG, the gradient of each token's
 * cumulative log decay but for the end-state terms, on one warp: the end-state terms of the
 * last token (<S0, dS> from the threads' parts in sdsp, and eL . kY), then suffix sums
 * within documents. Lane l holds tokens 2l and 2l + 1; what it passes down to the tokens
 * below is O_l = a_l + p_l O_(l+1) (a_l its own part, p_l whether the sum from above goes
 * through it: neither of its tokens starts a document), a linear recurrence scanned over
 * the lanes in five shuffle steps. Every sum runs in a fixed order; a document's first
 * token has no gate gradient (its g is not used). Thread 0 alone had summed the 256 parts
 * and walked the 64 tokens. */
static __device__ __forceinline__ void gdn_grads_dg(gdn_hdr s, const float *dG, const float *kY, const float *sdsp,
                                                    float *dgc, int H, int L, int set)
{
    const int lane = threadIdx.x & 31, r0 = 2 * lane, r1 = r0 + 1;
    float sd = 0.0f, tl = 0.0f;
#pragma unroll
    for (int i = 0; i < GDN_NT / 32; i++) sd += sdsp[lane * (GDN_NT / 32) + i];
    if (r0 < L) tl = s.eL[r0] * kY[r0];
    if (r1 < L) tl = fmaf(s.eL[r1], kY[r1], tl);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        sd += __shfl_down_sync(0xffffffffu, sd, o);
        tl += __shfl_down_sync(0xffffffffu, tl, o);
    }
    const float end = __shfl_sync(0xffffffffu, tl + s.e0[L - 1] * sd, 0);
    float x0 = r0 < L ? dG[r0] : 0.0f, x1 = r1 < L ? dG[r1] : 0.0f;
    if (r0 == L - 1) x0 += end;
    if (r1 == L - 1) x1 += end;
    const int f0 = s.reset[r0], f1 = s.reset[r1];
    float a = f0 ? 0.0f : x0 + (f1 ? 0.0f : x1);
    int p = !f0 && !f1;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float ao = __shfl_down_sync(0xffffffffu, a, o);
        const int po = __shfl_down_sync(0xffffffffu, p, o);
        if (lane + o < 32) {
            if (p) a += ao;
            p = p && po;
        }
    }
    float in = __shfl_down_sync(0xffffffffu, a, 1); /* O_(l+1) */
    if (lane == 31) in = 0.0f;
    const float o1 = x1 + in, o0 = x0 + (f1 ? 0.0f : o1);
    if (r0 < L && (set || !f0)) gdn_grad_put(dgc + (size_t)r0 * H, f0 ? 0.0f : o0, set);
    if (r1 < L && (set || !f1)) gdn_grad_put(dgc + (size_t)r1 * H, f1 ? 0.0f : o1, set);
}

#define GDN_B3_PART (8 * GDN_C)
#define GDN_B3_RED (6 * GDN_C)
#define GDN_B3_DOTS (6 * GDN_C)
static __device__ __forceinline__ void
gdn_bwd_grads(const int nt, int c, int bh, float *dq, float *dk, float *dv, float *dg, float *dbeta,
              const float *dout, const float *q, const float *k, const float *v, const float *g, const float *beta,
              const float *state_save, const float *dSbuf, const float *Wbuf, const float *Xbuf, const float *Pbuf,
              const int32_t *doc_start, int T, int H, int D, int nchunk, float scale, int set)
{
    const int b = bh / H, h = bh % H, tid = threadIdx.x;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D, tok = gdn_row(b, t0, h, T, H, D);
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    float *dKK = gdn_smem + GDN_HDR, *dQK = dKK + GDN_C * GDN_PP, *part = dQK + GDN_C * GDN_PP;
    float *dots = part + GDN_B3_PART, *red = dots + GDN_B3_DOTS, *sdsp = red + GDN_B3_RED;
    float *reg = sdsp + GDN_NT;
    float *rE = red, *cE = red + GDN_C, *rB = red + 2 * GDN_C, *vX = red + 3 * GDN_C;
    float *kY = red + 4 * GDN_C, *dG = red + 5 * GDN_C;
    const int warp = tid >> 5, wm = warp & 3, wn = warp >> 2, m0 = 16 * wm, n0 = 32 * wn;
    const int lg = (tid & 31) >> 2, lq = tid & 3;
    const int upper = n0 >= m0 + 16; /* the warp tile lies right of the diagonal */
    const int Dp = gdn_r4(D);
    const float *S0 = state_save + ci * D * D, *dSc = dSbuf + ci * D * Dp;
    const float *Wc = Wbuf + ci * GDN_C * Dp, *Xc = Xbuf + ci * GDN_C * Dp;

    for (int e = tid; e < GDN_B3_DOTS; e += GDN_NT) dots[e] = 0.0f;
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);

    /* ---- pairs: the block of E o KK and M = scale E o QK (gdn_pairs_put_m) from the prep
     * kernel or the chain (Pbuf) into dQK, in flight with the first panels below ---- */
    gdn_load_async(dQK, GDN_PP, GDN_C, GDN_C, Pbuf + ci * GDN_C * GDN_C, GDN_C, GDN_C, 0, GDN_C);
    /* ---- C1 = X W^T and C2 = dO W^T; dv += beta X and v . X on the way.
     * Then dKK_ts = -E beta_t C1 (s < t), dQK_ts = E C2 (s <= t); the dG term
     * E (QK C2 - KK beta_t C1) and the dbeta term E KK C1 (s < t) are summed by rows and
     * columns, first over the thread's fragment, then over the lanes of the warp tile,
     * then over the warp tiles of each row/column */
    float vx = 0.0f;
    const int vr = tid - 2 * GDN_C; /* v . X of row vr on warps 4 and 5, whose tiles lie right of the diagonal */
    {
        float c1[4][4], c2[4][4];
        gdn_zero(c1);
        gdn_zero(c2);
        float *Xp = reg, *Op = Xp + GDN_C * GDN_VP, *Wp = Op + GDN_C * GDN_VP, *Vp = Wp + GDN_C * GDN_VP;
        for (int p = 0; p < D; p += GDN_KP) {
            const int pw = gdn_imin(GDN_KP, D - p);
            gdn_load_async(Op, GDN_VP, GDN_C, GDN_KP, dout + tok, rs, L, p, D);
            gdn_load_async(Vp, GDN_VP, GDN_C, GDN_KP, v + tok, rs, L, p, D);
            gdn_load_async(Xp, GDN_VP, GDN_C, GDN_KP, Xc, Dp, GDN_C, p, D);
            gdn_load_async(Wp, GDN_VP, GDN_C, GDN_KP, Wc, Dp, GDN_C, p, D);
            gdn_sync();
            if (!upper)
                gdn_mma_2a(GDN_SPLIT_PAIR, c1, c2, Xp, Op, GDN_VP, 1, m0, GDN_C - 1, Wp, 1, GDN_VP, n0, GDN_C - 1, 0,
                           pw);
            if ((unsigned)vr < GDN_C)
                for (int col = 0; col < pw; col++) vx = fmaf(Vp[vr * GDN_VP + col], Xp[vr * GDN_VP + col], vx);
            static_assert(GDN_C * GDN_KP == 8 * GDN_NT, "the dv update covers a panel in 8 passes");
            /* dv += beta X (dv = beta X with set): the [64, GDN_KP] panel as 8 passes of 8
             * rows, a lane per column */
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int e = tid + u * GDN_NT, r = e / GDN_KP, col = e % GDN_KP;
                if (r < L && col < pw)
                    gdn_grad_put(dv + tok + (size_t)r * rs + p + col, s.bt[r] * Xp[r * GDN_VP + col], set);
            }
            gdn_sync();
        }
        float re[2] = {0, 0}, rb[2] = {0, 0}, ce[4][2] = {{0, 0}, {0, 0}, {0, 0}, {0, 0}};
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r), x = t * GDN_PP + u;
                const float m = dQK[x], ekk = u < t ? dQK[u * GDN_PP + t] : 0.0f; /* scale E QK, E KK */
                const float E = gdn_decay(s, t, u, L), bc = s.bt[t] * c1[j][r];
                float dkk = 0.0f, dee = 0.0f, dbp = 0.0f;
                if (u < t) {
                    dkk = -E * bc;
                    dee = m * c2[j][r] - ekk * bc;
                    dbp = ekk * c1[j][r];
                }
                dKK[x] = dkk;
                if (u <= t) /* above the diagonal lies E o KK that other threads read (zeroed below) */
                    dQK[x] = scale * E * c2[j][r]; /* scaled: the dk/dq products take q, k unscaled */
                re[r >> 1] += dee;
                rb[r >> 1] += dbp;
                ce[j][r & 1] += dee;
            }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            re[i] = gdn_quad_sum(re[i]);
            rb[i] = gdn_quad_sum(rb[i]);
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int x = 0; x < 2; x++)
#pragma unroll
                for (int sh = 4; sh <= 16; sh <<= 1) ce[j][x] += __shfl_xor_sync(0xffffffffu, ce[j][x], sh);
        if (lq == 0)
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int row = m0 + lg + 8 * i;
                part[row * 2 + wn] = re[i];
                part[2 * GDN_C + row * 2 + wn] = rb[i];
            }
        if (lg == 0)
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int x = 0; x < 2; x++) part[4 * GDN_C + gdn_fcol(n0, j, x) * 4 + wm] = ce[j][x];
    }
    gdn_sync();
    /* dQK above the diagonal, where the products below read it (within the diagonal
     * 16 x 16 blocks), to zero */
    for (int e = tid; e < 4 * 16 * 16; e += GDN_NT) {
        const int d0 = 16 * (e >> 8), i = (e >> 4) & 15, j = e & 15;
        if (j > i) dQK[(d0 + i) * GDN_PP + d0 + j] = 0.0f;
    }
    if (tid < GDN_C) {
        rE[tid] = part[tid * 2] + part[tid * 2 + 1];
        rB[tid] = part[2 * GDN_C + tid * 2] + part[2 * GDN_C + tid * 2 + 1];
        const float *pc = part + 4 * GDN_C + tid * 4;
        cE[tid] = (pc[0] + pc[1]) + (pc[2] + pc[3]);
    }
    if ((unsigned)vr < GDN_C) vX[vr] = vx;

    /* ---- dq, dk: passes over 64 key columns (D <= 64) or 96 (gdn_grads_dqdk) ---- */
    const float sds = gdn_grads_dqdk(nt, reg, dKK, dQK, dots, s, dq, dk, dout, q, k, Xc, Wc, S0, dSc, tok, rs, L, D,
                                     scale, set);

    /* ---- per-token scalars: dbeta, dG, then dg by segmented suffix sums ---- */
    sdsp[tid] = sds;
    gdn_sync();
    if (tid < GDN_C) {
        const int r = tid;
        const float qz = dots[r * 2] + dots[r * 2 + 1];
        const float kz = dots[2 * GDN_C + r * 2] + dots[2 * GDN_C + r * 2 + 1];
        const float ky = dots[4 * GDN_C + r * 2] + dots[4 * GDN_C + r * 2 + 1];
        kY[r] = ky;
        dG[r] = rE[r] - cE[r] + s.e0[r] * (qz - s.bt[r] * kz) - s.eL[r] * ky;
        if (r < L) {
            gdn_grad_put(dbeta + ((size_t)b * T + t0 + r) * H + h, vX[r] - s.e0[r] * kz - rB[r], set);
        }
    }
    gdn_sync();
    if (warp == 0) gdn_grads_dg(s, dG, kY, sdsp, dg + ((size_t)b * T + t0) * H + h, H, L, set);
}


/* its dynamic shared memory, in bytes */
static inline size_t gdn_smem_bwd_grads(int D)
{
    return sizeof(float) *
           (GDN_HDR + 2 * GDN_C * GDN_PP + GDN_B3_PART + GDN_B3_DOTS + GDN_B3_RED + GDN_NT + gdn_grads_region(D));
}

#endif
