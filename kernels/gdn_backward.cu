/* gdn_backward.cu: the backward of the chunked gated delta rule on the GPU
 * (cuda_gdn_backward), the CUDA twin of the backward of src/cpu/cpu_gdn.c. The design and
 * the helpers it shares with the forward (gdn_forward.cu) are in gdn_internal.cuh.
 *
 * Backward, three kernels:
 *   prep  (chunk, b*h):  from the saved S0: T, M, W (direct solve), Xo, Xk, Hc.
 *   state (32 value columns, b*h): walks the chunks last to first, saves the dS arriving
 *                        at each chunk's end, turns Xo into X in place and carries dS.
 *   grads (chunk, b*h):  steps 3-8: the pair matrices dKK = -E o beta (X W^T) and
 *                        dQK = E o (dO W^T) with the dG and dbeta terms of KK and QK;
 *                        then dq, dk from dKK, dQK and from dO S0^T, X S0^T, W dS^T
 *                        (the start- and end-state terms); dv = beta X; dbeta; dg by a
 *                        segmented suffix sum.
 */
#include "gdn_internal.cuh"

/* Per (chunk, b*h), from the saved S0: e0 to e0buf; Xk = T^T diag(eL) K; Hc =
 * Qs^T diag(e0) dO [D, D]; Xo = T^T M^T dO; W = T diag(beta) (V - diag(e0) K S0).
 * Shared: header, K and Qs [64, dp]; four [64, GDN_PP] tiles: R1 (A, then T^T's factor
 * diag(eL) T, then panels of dO or S0), T, M, P2 (M^T dO, then the right-hand side). */
static __global__ void __launch_bounds__(GDN_NT, 2)
gdn_bwd_prep_kernel(float *Wbuf, float *Xbuf, float *Xkbuf, float *Hcbuf, float *e0buf,
                    const float *dout, const float *q, const float *k, const float *v,
                    const float *g, const float *beta, const float *state_save,
                    const int32_t *doc_start, int T, int H, int D, int nchunk, float scale)
{
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, tid = threadIdx.x;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), dp = gdn_pitch(D);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D, tok = gdn_row(b, t0, h, T, H, D);
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    float *Ks = gdn_smem + GDN_HDR, *Qs = Ks + GDN_C * dp, *R1 = Qs + GDN_C * dp;
    float *Ts = R1 + GDN_C * GDN_PP, *Ms = Ts + GDN_C * GDN_PP, *P2 = Ms + GDN_C * GDN_PP;
    const int tm = tid >> 4, tn = tid & 15;
    const float *S0 = state_save + ci * D * D;
    float *Wc = Wbuf + ci * GDN_C * D, *Xc = Xbuf + ci * GDN_C * D, *Xkc = Xkbuf + ci * GDN_C * D;
    float *Hc = Hcbuf + ci * D * D;

    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);
    gdn_load(Ks, dp, GDN_C, D, k + tok, rs, L, 0, D, 1.0f);
    gdn_load(Qs, dp, GDN_C, D, q + tok, rs, L, 0, D, scale);
    if (tid < GDN_C) e0buf[ci * GDN_C + tid] = s.e0[tid];
    __syncthreads();

    /* A (into R1) and M from K K^T and Qs K^T */
    {
        float ak[4][4], aq[4][4];
        gdn_zero(ak);
        gdn_zero(aq);
        gdn_tile_2a(ak, aq, Ks, Qs, dp, 1, 4 * tm, GDN_C - 1, Ks, 1, dp, tn, 16, GDN_C - 1, 0, D);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int t = 4 * tm + i, u = tn + 16 * j;
                const float E = gdn_decay(s, t, u, L);
                R1[t * GDN_PP + u] = u < t ? s.bt[t] * E * ak[i][j] : 0.0f;
                Ms[t * GDN_PP + u] = E * aq[i][j];
            }
    }
    __syncthreads();
    /* T by columns; meanwhile Qs rows become e0 Qs (all Hc needs of them) */
    if (tid < GDN_C) {
        gdn_invert_column(Ts, R1);
    } else {
        for (int e = tid - GDN_C; e < GDN_C * D; e += GDN_NT - GDN_C) {
            const int r = e / D, col = e - r * D;
            Qs[r * dp + col] *= s.e0[r];
        }
    }
    __syncthreads();
    /* R1[u][t] = eL_u T[u][t] */
    for (int e = tid; e < GDN_C * GDN_C; e += GDN_NT) {
        const int r = e >> 6, col = e & 63;
        R1[r * GDN_PP + col] = s.eL[r] * Ts[r * GDN_PP + col];
    }
    __syncthreads();

    /* Xk = (diag(eL) T)^T K; T^T is upper triangular */
    for (int np = 0; np < D; np += 64) {
        float acc[4][4];
        gdn_zero(acc);
        gdn_tile(acc, R1, 1, GDN_PP, 4 * tm, GDN_C - 1, Ks + np, dp, 1, tn, 16, D - 1 - np, 4 * tm, GDN_C);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int n = np + tn + 16 * j;
                if (n < D) Xkc[(size_t)(4 * tm + i) * D + n] = acc[i][j];
            }
    }
    __syncthreads();

    /* per 64 value columns of dO: Hc, then Xo = T^T (M^T dO) */
    for (int jp = 0; jp < D; jp += 64) {
        const int jw = gdn_imin(64, D - jp);
        gdn_load(R1, GDN_PP, GDN_C, 64, dout + tok, rs, L, jp, D, 1.0f);
        __syncthreads();
        for (int ip = 0; ip < D; ip += 64) {
            float acc[4][4];
            gdn_zero(acc);
            gdn_tile(acc, Qs + ip, 1, dp, 4 * tm, D - 1 - ip, R1, GDN_PP, 1, tn, 16, 63, 0, GDN_C);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int m = ip + 4 * tm + i, n = tn + 16 * j;
                    if (m < D && n < jw) Hc[(size_t)m * D + jp + n] = acc[i][j];
                }
        }
        {
            float acc[4][4];
            gdn_zero(acc);
            gdn_tile(acc, Ms, 1, GDN_PP, 4 * tm, GDN_C - 1, R1, GDN_PP, 1, tn, 16, 63, 4 * tm, GDN_C);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) P2[(4 * tm + i) * GDN_PP + tn + 16 * j] = acc[i][j];
        }
        __syncthreads();
        {
            float acc[4][4];
            gdn_zero(acc);
            gdn_tile(acc, Ts, 1, GDN_PP, 4 * tm, GDN_C - 1, P2, GDN_PP, 1, tn, 16, 63, 4 * tm, GDN_C);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int n = tn + 16 * j;
                    if (n < jw) Xc[(size_t)(4 * tm + i) * D + jp + n] = acc[i][j];
                }
        }
        __syncthreads();
    }

    /* per 64 value columns: U = K S0 over 64-row panels of S0, the right-hand side
     * beta (V - e0 U) into P2, W = T P2 */
    for (int jp = 0; jp < D; jp += 64) {
        const int jw = gdn_imin(64, D - jp);
        float au[4][4];
        gdn_zero(au);
        for (int ip = 0; ip < D; ip += 64) {
            const int iw = gdn_imin(64, D - ip);
            gdn_load(R1, GDN_PP, 64, 64, S0 + (size_t)ip * D, D, iw, jp, D, 1.0f);
            __syncthreads();
            gdn_tile(au, Ks + ip, dp, 1, 4 * tm, GDN_C - 1, R1, GDN_PP, 1, tn, 16, 63, 0, iw);
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int t = 4 * tm + i, n = tn + 16 * j;
                const float vv = t < L && n < jw ? v[tok + (size_t)t * rs + jp + n] : 0.0f;
                P2[t * GDN_PP + n] = s.bt[t] * (vv - s.e0[t] * au[i][j]);
            }
        __syncthreads();
        float aw[4][4];
        gdn_zero(aw);
        gdn_tile(aw, Ts, GDN_PP, 1, 4 * tm, GDN_C - 1, P2, GDN_PP, 1, tn, 16, 63, 0, 4 * tm + 4);
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int n = tn + 16 * j;
                if (n < jw) Wc[(size_t)(4 * tm + i) * D + jp + n] = aw[i][j];
            }
        /* the next pass writes P2 only after the barriers of its S0 loop */
    }
}

/* Per (32 value columns j0.., b*h), chunks last to first: dS [D, 32] starts at 0; per
 * chunk: save dS (the gradient at the chunk's end); X = Xo + Xk dS (written over Xo);
 * dS = e0L dS + Hc - K^T diag(e0 beta) X, or 0 if the chunk's first token starts a
 * document. Shared: dS [D, GDN_VP], e0 beta X [64, GDN_VP], Xk and K of the chunk
 * [64, dp], e0 and beta [128]. Groups as in the forward state kernel: X (Xk, e0, beta)
 * and K. */
static __global__ void __launch_bounds__(GDN_ST)
gdn_bwd_state_kernel(float *dSbuf, float *Xbuf, const float *Xkbuf, const float *Hcbuf,
                     const float *k, const float *beta, const float *e0buf,
                     const int32_t *doc_start, int T, int H, int D, int nchunk)
{
    const int j0 = blockIdx.x * GDN_DV, bh = blockIdx.y, b = bh / H, h = bh % H, tid = threadIdx.x;
    const int dp = gdn_pitch(D), nv = gdn_imin(GDN_DV, D - j0);
    float *dS = gdn_smem, *Xt = dS + D * GDN_VP, *Xkb = Xt + GDN_C * GDN_VP, *Kb = Xkb + GDN_C * dp;
    float *sc = Kb + GDN_C * dp;
    const size_t rs = (size_t)H * D, DD = (size_t)D * D;

    for (int e = tid; e < D * GDN_VP; e += GDN_ST) dS[e] = 0.0f;
    {
        const int cl = nchunk - 1, t0 = cl * GDN_C, L = T - t0;
        const size_t ci = (size_t)bh * nchunk + cl;
        gdn_async_rows(Xkb, dp, Xkbuf + ci * GDN_C * D, D, GDN_C, D);
        if (tid < GDN_C) {
            const size_t n = ((size_t)b * T + t0 + tid) * H + h;
            gdn_async_f32(sc + tid, e0buf + ci * GDN_C + tid, 1);
            gdn_async_f32(sc + GDN_C + tid, tid < L ? beta + n : beta, tid < L);
        }
        gdn_async_commit();
        gdn_async_rows(Kb, dp, k + gdn_row(b, t0, h, T, H, D), rs, L, D);
        gdn_async_commit();
    }

    for (int c = nchunk - 1; c >= 0; c--) {
        const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0);
        const size_t ci = (size_t)bh * nchunk + c;
        gdn_async_wait_all_but_newest(); /* X(c) has landed */
        __syncthreads();
        const float e0L = sc[L - 1];
        const int reset0 = doc_start && doc_start[(size_t)b * T + t0];
        float *ds = dSbuf + ci * DD + j0;
        for (int e = tid; e < D * nv; e += GDN_ST) {
            const int r = e / nv, col = e - r * nv;
            ds[(size_t)r * D + col] = dS[r * GDN_VP + col];
        }

        /* X = Xo + Xk dS */
        {
            const int tm = tid >> 3, tn = tid & 7;
            float *xc = Xbuf + ci * GDN_C * D + j0;
            float xo[4][4], acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int n = tn + 8 * j;
                    xo[i][j] = n < nv ? xc[(size_t)(4 * tm + i) * D + n] : 0.0f;
                }
            gdn_zero(acc);
            gdn_tile(acc, Xkb, dp, 1, 4 * tm, GDN_C - 1, dS, GDN_VP, 1, tn, 8, GDN_DV - 1, 0, D);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int t = 4 * tm + i, n = tn + 8 * j;
                    const float x = xo[i][j] + acc[i][j];
                    if (n < nv) xc[(size_t)t * D + n] = x;
                    Xt[t * GDN_VP + n] = sc[t] * sc[GDN_C + t] * x;
                }
        }
        __syncthreads();
        if (c > 0) {
            const size_t cp = ci - 1;
            const int tp = t0 - GDN_C;
            gdn_async_rows(Xkb, dp, Xkbuf + cp * GDN_C * D, D, GDN_C, D);
            if (tid < GDN_C) {
                gdn_async_f32(sc + tid, e0buf + cp * GDN_C + tid, 1);
                gdn_async_f32(sc + GDN_C + tid, beta + ((size_t)b * T + tp + tid) * H + h, 1);
            }
        }
        gdn_async_commit();
        gdn_async_wait_all_but_newest(); /* K(c) has landed */
        __syncthreads();

        /* dS = e0L dS + Hc - K^T (e0 beta X) */
        const float *hc = Hcbuf + ci * DD + j0;
        for (int tile = tid; tile < ((D + 3) >> 2) * 8; tile += GDN_ST) {
            const int tm = tile >> 3, tn = tile & 7;
            float hv[4][4], acc[4][4];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int m = 4 * tm + i, n = tn + 8 * j;
                    hv[i][j] = m < D && n < nv ? hc[(size_t)m * D + n] : 0.0f;
                }
            gdn_zero(acc);
            gdn_tile(acc, Kb, 1, dp, 4 * tm, D - 1, Xt, GDN_VP, 1, tn, 8, GDN_DV - 1, 0, GDN_C);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int m = 4 * tm + i, n = tn + 8 * j;
                    if (m < D)
                        dS[m * GDN_VP + n] = reset0 ? 0.0f : e0L * dS[m * GDN_VP + n] + hv[i][j] - acc[i][j];
                }
        }
        __syncthreads();
        if (c > 0) gdn_async_rows(Kb, dp, k + gdn_row(b, t0 - GDN_C, h, T, H, D), rs, GDN_C, D);
        gdn_async_commit();
    }
}

/* Per (chunk, b*h): the local gradients (steps 3-8 of cpu_gdn.c) into dq, dk, dv, dg,
 * dbeta, from S0 (state_save), dS (dL/dS_end, from the state kernel), W and X.
 * Shared: header; dKK and dQK [64, GDN_PP]; partial sums [3][64][16] of the pairs and
 * [3][64][16] of the state terms; per-row sums
 * [8][64]; per-thread sums of <S0, dS> [256]; then one region reused by the phases:
 *   pairs:  32-column panels of K and Qs, then of X, dO, W, V (4 x [64, GDN_VP])
 *   dk/dq:  64-column panels of K and Qs                   (2 x [64, GDN_PP])
 *           32-column panels of dO, X, W and 64 x 32 blocks of S0, dS (5 x [64, GDN_VP]) */
#define GDN_B3_REGION (5 * GDN_C * GDN_VP)
static __global__ void __launch_bounds__(GDN_NT, 2)
gdn_bwd_grads_kernel(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                     const float *q, const float *k, const float *v, const float *g,
                     const float *beta, const float *state_save, const float *dSbuf,
                     const float *Wbuf, const float *Xbuf, const int32_t *doc_start, int T, int H,
                     int D, int nchunk, float scale)
{
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, tid = threadIdx.x;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D, tok = gdn_row(b, t0, h, T, H, D);
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    float *dKK = gdn_smem + GDN_HDR, *dQK = dKK + GDN_C * GDN_PP, *part = dQK + GDN_C * GDN_PP;
    float *dots = part + 3 * GDN_C * 16, *red = dots + 3 * GDN_C * 16, *sdsp = red + 8 * GDN_C;
    float *reg = sdsp + GDN_NT;
    float *rE = red, *cE = red + GDN_C, *rB = red + 2 * GDN_C, *vX = red + 3 * GDN_C;
    float *kY = red + 4 * GDN_C, *dG = red + 5 * GDN_C, *sdsum = red + 6 * GDN_C;
    const int tm = tid >> 4, tn = tid & 15;
    const float *S0 = state_save + ci * D * D, *dSc = dSbuf + ci * D * D;
    const float *Wc = Wbuf + ci * GDN_C * D, *Xc = Xbuf + ci * GDN_C * D;

    for (int e = tid; e < 3 * GDN_C * 16; e += GDN_NT) dots[e] = 0.0f;
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);

    /* ---- pairs, first pass: KK and QK over 32-column panels of K and Qs, parked in
     * dKK and dQK (each element is read back by the thread that wrote it) ---- */
    {
        float kk[4][4], qk[4][4];
        gdn_zero(kk);
        gdn_zero(qk);
        float *Kp = reg, *Qp = Kp + GDN_C * GDN_VP;
        for (int p = 0; p < D; p += GDN_KP) {
            const int pw = gdn_imin(GDN_KP, D - p);
            gdn_load(Kp, GDN_VP, GDN_C, GDN_KP, k + tok, rs, L, p, D, 1.0f);
            gdn_load(Qp, GDN_VP, GDN_C, GDN_KP, q + tok, rs, L, p, D, scale);
            __syncthreads();
            gdn_tile_2a(kk, qk, Kp, Qp, GDN_VP, 1, 4 * tm, GDN_C - 1, Kp, 1, GDN_VP, tn, 16, GDN_C - 1, 0, pw);
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int x = (4 * tm + i) * GDN_PP + tn + 16 * j;
                dKK[x] = kk[i][j];
                dQK[x] = qk[i][j];
            }
    }
    /* ---- second pass: C1 = X W^T and C2 = dO W^T; dv += beta X and v . X on the way.
     * Then dKK_ts = -E beta_t C1 (s < t), dQK_ts = E C2 (s <= t); the dG term
     * E (QK C2 - KK beta_t C1) and the dbeta term E KK C1 (s < t) are summed by rows and
     * columns, first over the thread's tile, then over the 16 tiles of each row/column */
    float vx = 0.0f;
    {
        float c1[4][4], c2[4][4];
        gdn_zero(c1);
        gdn_zero(c2);
        float *Xp = reg, *Op = Xp + GDN_C * GDN_VP, *Wp = Op + GDN_C * GDN_VP, *Vp = Wp + GDN_C * GDN_VP;
        for (int p = 0; p < D; p += GDN_KP) {
            const int pw = gdn_imin(GDN_KP, D - p);
            gdn_load(Op, GDN_VP, GDN_C, GDN_KP, dout + tok, rs, L, p, D, 1.0f);
            gdn_load(Vp, GDN_VP, GDN_C, GDN_KP, v + tok, rs, L, p, D, 1.0f);
            gdn_load(Xp, GDN_VP, GDN_C, GDN_KP, Xc, D, GDN_C, p, D, 1.0f);
            gdn_load(Wp, GDN_VP, GDN_C, GDN_KP, Wc, D, GDN_C, p, D, 1.0f);
            __syncthreads();
            gdn_tile_2a(c1, c2, Xp, Op, GDN_VP, 1, 4 * tm, GDN_C - 1, Wp, 1, GDN_VP, tn, 16, GDN_C - 1, 0, pw);
            if (tid < GDN_C)
                for (int col = 0; col < pw; col++) vx = fmaf(Vp[tid * GDN_VP + col], Xp[tid * GDN_VP + col], vx);
            for (int e = tid; e < L * pw; e += GDN_NT) {
                const int r = e / pw, col = e - r * pw;
                dv[tok + (size_t)r * rs + p + col] += s.bt[r] * Xp[r * GDN_VP + col];
            }
            __syncthreads();
        }
        float re[4] = {0, 0, 0, 0}, rb[4] = {0, 0, 0, 0}, ce[4] = {0, 0, 0, 0};
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int t = 4 * tm + i, u = tn + 16 * j, x = t * GDN_PP + u;
                const float kk = dKK[x], qk = dQK[x];
                const float E = gdn_decay(s, t, u, L), bc = s.bt[t] * c1[i][j];
                float dkk = 0.0f, dee = 0.0f, dbp = 0.0f;
                if (u < t) {
                    dkk = -E * bc;
                    dee = (qk * c2[i][j] - kk * bc) * E;
                    dbp = E * kk * c1[i][j];
                }
                dKK[x] = dkk;
                dQK[x] = E * c2[i][j];
                re[i] += dee;
                rb[i] += dbp;
                ce[j] += dee;
            }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            part[(4 * tm + i) * 16 + tn] = re[i];
            part[GDN_C * 16 + (4 * tm + i) * 16 + tn] = rb[i];
            part[2 * GDN_C * 16 + (tn + 16 * i) * 16 + tm] = ce[i];
        }
    }
    __syncthreads();
    if (tid < GDN_C) {
        float a = 0.0f, bb = 0.0f, cc = 0.0f;
        for (int x = 0; x < 16; x++) {
            a += part[tid * 16 + x];
            bb += part[GDN_C * 16 + tid * 16 + x];
            cc += part[2 * GDN_C * 16 + tid * 16 + x];
        }
        rE[tid] = a;
        rB[tid] = bb;
        cE[tid] = cc;
        vX[tid] = vx;
    }

    /* ---- dq, dk per 64 key columns ip ----
     * from the pairs: dQs = dQK K, dK = dKK K + dKK^T K + dQK^T Qs;
     * from the states: ZO = dO S0^T, Z = X S0^T, Y = W dS^T with dQs += e0 ZO and
     * dK += eL Y - e0 beta Z; and the row sums qs . ZO, k . Z, k . Y, per thread over its
     * columns into dots [3][64][16] (each slot owned by one thread) */
    float sds = 0.0f;
    for (int ip = 0; ip < D; ip += 64) {
        const int iw = gdn_imin(64, D - ip);
        {
            float *Kq = reg, *Qq = Kq + GDN_C * GDN_PP;
            gdn_load(Kq, GDN_PP, GDN_C, 64, k + tok, rs, L, ip, D, 1.0f);
            gdn_load(Qq, GDN_PP, GDN_C, 64, q + tok, rs, L, ip, D, scale);
            __syncthreads();
            float a1[4][4], a2[4][4];
            gdn_zero(a1);
            gdn_zero(a2);
            gdn_tile_2a(a1, a2, dQK, dKK, GDN_PP, 1, 4 * tm, GDN_C - 1, Kq, GDN_PP, 1, tn, 16, 63, 0, 4 * tm + 4);
            gdn_tile(a2, dKK, 1, GDN_PP, 4 * tm, GDN_C - 1, Kq, GDN_PP, 1, tn, 16, 63, 4 * tm, GDN_C);
            gdn_tile(a2, dQK, 1, GDN_PP, 4 * tm, GDN_C - 1, Qq, GDN_PP, 1, tn, 16, 63, 4 * tm, GDN_C);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int t = 4 * tm + i, n = tn + 16 * j;
                    if (t < L && n < iw) {
                        const size_t x = tok + (size_t)t * rs + ip + n;
                        dq[x] += scale * a1[i][j];
                        dk[x] += a2[i][j];
                    }
                }
            __syncthreads();
        }
        float zo[4][4], z[4][4], y[4][4];
        gdn_zero(zo);
        gdn_zero(z);
        gdn_zero(y);
        {
            float *Op = reg, *Xp = Op + GDN_C * GDN_VP, *Wp = Xp + GDN_C * GDN_VP;
            float *Sp = Wp + GDN_C * GDN_VP, *dSp = Sp + GDN_C * GDN_VP;
            for (int jp = 0; jp < D; jp += GDN_KP) {
                const int jw = gdn_imin(GDN_KP, D - jp);
                gdn_load(Op, GDN_VP, GDN_C, GDN_KP, dout + tok, rs, L, jp, D, 1.0f);
                gdn_load(Xp, GDN_VP, GDN_C, GDN_KP, Xc, D, GDN_C, jp, D, 1.0f);
                gdn_load(Wp, GDN_VP, GDN_C, GDN_KP, Wc, D, GDN_C, jp, D, 1.0f);
                gdn_load(Sp, GDN_VP, 64, GDN_KP, S0 + (size_t)ip * D, D, iw, jp, D, 1.0f);
                gdn_load(dSp, GDN_VP, 64, GDN_KP, dSc + (size_t)ip * D, D, iw, jp, D, 1.0f);
                __syncthreads();
                gdn_tile_2a(zo, z, Op, Xp, GDN_VP, 1, 4 * tm, GDN_C - 1, Sp, 1, GDN_VP, tn, 16, 63, 0, jw);
                gdn_tile(y, Wp, GDN_VP, 1, 4 * tm, GDN_C - 1, dSp, 1, GDN_VP, tn, 16, 63, 0, jw);
                for (int e = tid; e < 64 * GDN_KP; e += GDN_NT) {
                    const int x = (e / GDN_KP) * GDN_VP + e % GDN_KP;
                    sds = fmaf(Sp[x], dSp[x], sds);
                }
                __syncthreads();
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int t = 4 * tm + i;
            float pq = 0.0f, pk = 0.0f, py = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int n = tn + 16 * j;
                if (t < L && n < iw) {
                    const size_t x = tok + (size_t)t * rs + ip + n;
                    const float qv = scale * q[x], kv = k[x];
                    dq[x] += scale * (s.e0[t] * zo[i][j]);
                    dk[x] += s.eL[t] * y[i][j] - s.e0[t] * s.bt[t] * z[i][j];
                    pq = fmaf(qv, zo[i][j], pq);
                    pk = fmaf(kv, z[i][j], pk);
                    py = fmaf(kv, y[i][j], py);
                }
            }
            dots[t * 16 + tn] += pq;
            dots[GDN_C * 16 + t * 16 + tn] += pk;
            dots[2 * GDN_C * 16 + t * 16 + tn] += py;
        }
    }

    /* ---- per-token scalars: dbeta, dG, then dg by segmented suffix sums ---- */
    sdsp[tid] = sds;
    __syncthreads();
    if (tid < GDN_C) {
        const int r = tid;
        float qz = 0.0f, kz = 0.0f, ky = 0.0f;
        for (int x = 0; x < 16; x++) {
            qz += dots[r * 16 + x];
            kz += dots[GDN_C * 16 + r * 16 + x];
            ky += dots[2 * GDN_C * 16 + r * 16 + x];
        }
        kY[r] = ky;
        dG[r] = rE[r] - cE[r] + s.e0[r] * (qz - s.bt[r] * kz) - s.eL[r] * ky;
        if (r < L) dbeta[((size_t)b * T + t0 + r) * H + h] += vX[r] - s.e0[r] * kz - rB[r];
    } else if (tid == GDN_C) {
        float a = 0.0f;
        for (int x = 0; x < GDN_NT; x++) a += sdsp[x];
        sdsum[0] = a;
    }
    __syncthreads();
    if (tid == 0) {
        /* the end-state terms of the last token, then suffix sums within segments */
        float tail = 0.0f;
        for (int r = 0; r < L; r++) tail = fmaf(s.eL[r], kY[r], tail);
        dG[L - 1] += tail + s.e0[L - 1] * sdsum[0];
        float acc = 0.0f;
        for (int r = L - 1; r >= 0; r--) {
            acc += dG[r];
            dG[r] = acc;
            if (s.reset[r]) acc = 0.0f;
        }
    }
    __syncthreads();
    if (tid < L && !s.reset[tid]) dg[((size_t)b * T + t0 + tid) * H + h] += dG[tid];
}

/* =================================================================================== */
/* launcher                                                                            */
/* =================================================================================== */

/* dynamic shared memory of each kernel, in bytes (the state kernel's: gdn_internal.cuh) */
static size_t gdn_smem_bwd_prep(int D) { return sizeof(float) * (GDN_HDR + 2 * GDN_C * gdn_pitch(D) + 4 * GDN_C * GDN_PP); }
static size_t gdn_smem_bwd_grads(void)
{
    return sizeof(float) * (GDN_HDR + 2 * GDN_C * GDN_PP + 6 * GDN_C * 16 + 8 * GDN_C + GDN_NT + GDN_B3_REGION);
}

/* Backward: accumulates into dq, dk, dv, dg, dbeta. Scratch: 3 [64, D] arrays, 2 [D, D]
 * arrays and a [64] vector per (b, h, chunk). */
extern "C" void cuda_gdn_backward(float *dq, float *dk, float *dv, float *dg, float *dbeta,
                                  const float *dout, const float *q, const float *k, const float *v,
                                  const float *g, const float *beta, const float *state_save,
                                  const int32_t *doc_start, int B, int T, int H, int D, float scale)
{
    gdn_check_shape("gdn_backward", B, T, H, D);
    const int nchunk = (T + GDN_C - 1) / GDN_C, BH = B * H;
    const size_t rows = (size_t)BH * nchunk * GDN_C, states = (size_t)BH * nchunk * D * D;
    float *Wbuf = (float *)cuda_scratch((3 * rows * D + 2 * states + rows) * sizeof(float));
    float *Xbuf = Wbuf + rows * D, *Xkbuf = Xbuf + rows * D, *Hcbuf = Xkbuf + rows * D;
    float *dSbuf = Hcbuf + states, *e0buf = dSbuf + states;
    cudaStream_t st = cuda_stream();
    const size_t sm1 = gdn_smem_bwd_prep(D), sm2 = gdn_smem_state(D), sm3 = gdn_smem_bwd_grads();
    gdn_allow_smem((const void *)gdn_bwd_prep_kernel, sm1);
    gdn_allow_smem((const void *)gdn_bwd_state_kernel, sm2);
    gdn_allow_smem((const void *)gdn_bwd_grads_kernel, sm3);

    gdn_bwd_prep_kernel<<<dim3(nchunk, BH), GDN_NT, sm1, st>>>(Wbuf, Xbuf, Xkbuf, Hcbuf, e0buf, dout, q,
                                                               k, v, g, beta, state_save, doc_start,
                                                               T, H, D, nchunk, scale);
    LAUNCH_CHECK();
    gdn_bwd_state_kernel<<<dim3((D + GDN_DV - 1) / GDN_DV, BH), GDN_ST, sm2, st>>>(
        dSbuf, Xbuf, Xkbuf, Hcbuf, k, beta, e0buf, doc_start, T, H, D, nchunk);
    LAUNCH_CHECK();
    gdn_bwd_grads_kernel<<<dim3(nchunk, BH), GDN_NT, sm3, st>>>(dq, dk, dv, dg, dbeta, dout, q, k, v, g,
                                                                beta, state_save, dSbuf, Wbuf, Xbuf,
                                                                doc_start, T, H, D, nchunk, scale);
    LAUNCH_CHECK();
}
