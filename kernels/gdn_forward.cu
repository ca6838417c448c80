/* gdn_forward.cu: the forward of the chunked gated delta rule on the GPU
 * (cuda_gdn_forward), the CUDA twin of the forward of src/cpu/cpu_gdn.c. The design and
 * the helpers it shares with the backward (gdn_backward.cu) are in gdn_internal.cuh.
 *
 * Forward, three kernels:
 *   prep  (chunk, b*h):  G, E, e0, eL; A from K K^T; T = (I + A)^-1 by 32 x 32 blocks
 *                        (gdn_invert_diag, gdn_invert_offdiag); Wv and Uk.
 *   state (24, 32 or 48 value columns, b*h; gdn_state_nt): walks the chunks in order,
 *                        saves S0, turns Wv into W in place and updates S. Value columns
 *                        of S evolve independently, so each (b, h) gets ceil(D / cols)
 *                        blocks. The next chunk's [64, D] operands stream into shared
 *                        memory by bulk copies while the current chunk computes.
 *   out   (chunk, b*h):  o = diag(e0) Qs S0 + M W.
 * Where gdn_chain_use says so, one chained kernel (gdn_chain.cu) does the work of all
 * three.
 */
#include "gdn_internal.cuh"

/* Per (chunk, b*h): eL and e0 to scal [bh][chunk][128] (eL then e0); Wv = T diag(beta) V
 * to Wv [bh][chunk][64][gdn_r4(D)] (state_save's W rows) and Uk = T diag(beta e0) K to Uk
 * [bh][chunk][64][dp], the state kernel's layout (pad columns zero), as is its copy of K
 * in Kp. Shared: header, K and V [64, dp] (pad columns zero), A and then T over it [64,
 * GDN_PP]: 66 KB at D = 85, and with the registers held to 80 three blocks share an SM
 * (with a tile each for A and T, 84 KB and two an SM, the kernel took 0.298 instead of
 * 0.279 ms). */
static __global__ void __launch_bounds__(GDN_NT, 3)
gdn_fwd_prep_kernel(float *Wv, float *Uk, float *Kp, float *scal, const float *k, const float *v,
                    const float *g, const float *beta, const int32_t *doc_start, int T, int H, int D,
                    int nchunk)
{
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, tid = threadIdx.x;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D;
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    float *Ks = gdn_smem + GDN_HDR, *Vs = Ks + GDN_C * dp, *As = Vs + GDN_C * dp, *Ts = As;
    const int warp = tid >> 5, m0 = 16 * (warp & 3), n0 = 32 * (warp >> 2);

    gdn_load_async(Ks, dp, GDN_C, D8, k + gdn_row(b, t0, h, T, H, D), rs, L, 0, D); /* in flight during the scan */
    gdn_load_async(Vs, dp, GDN_C, D8, v + gdn_row(b, t0, h, T, H, D), rs, L, 0, D);
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);
    if (tid < GDN_C) {
        scal[ci * 2 * GDN_C + tid] = s.eL[tid];
        scal[ci * 2 * GDN_C + GDN_C + tid] = s.e0[tid];
    }
    gdn_sync();
    gdn_store_kpad(Kp + ci * GDN_C * dp, Ks, dp, D);

    /* A_ts = beta_t E_ts KK_ts below the diagonal (the warp tile right of the diagonal
     * block is all zero and skips the product) */
    {
        float acc[4][4];
        gdn_zero(acc);
        if (n0 < m0 + 16) gdn_mma(GDN_SPLIT_PAIR, acc, Ks, dp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r);
                As[t * GDN_PP + u] = u < t ? s.bt[t] * gdn_decay(s, t, u, L) * acc[j][r] : 0.0f;
            }
    }
    gdn_sync();

    /* T's diagonal blocks (warps 0-1) while the other warps scale the right-hand sides:
     * V rows by beta, K rows by beta e0 (K K^T is done with them); then T's lower-left
     * block (gdn_invert_offdiag) */
    if (tid < GDN_C) {
        gdn_invert_diag(Ts, As);
    } else {
        const int lane = tid & 31;
        for (int r = (tid - GDN_C) >> 5; r < GDN_C; r += (GDN_NT - GDN_C) / 32) {
            const float bv = s.bt[r], bk = s.bt[r] * s.e0[r];
            for (int col = lane; col < D; col += 32) {
                Vs[r * dp + col] *= bv;
                Ks[r * dp + col] *= bk;
            }
        }
    }
    __syncthreads();
    gdn_invert_offdiag(Ts);
    gdn_sync();

    /* Wv = T (beta V), Uk = T (beta e0 K); T is lower triangular, so the contraction
     * stops at the warp tile's last row */
    float *wv = Wv + ci * GDN_C * Dp, *uk = Uk + ci * GDN_C * dp;
    gdn_zero_pad(uk, dp, D);
    for (int np = 0; np < D; np += 64) {
        if (np + n0 >= D) continue;
        float aw[4][4], au[4][4];
        gdn_zero(aw);
        gdn_zero(au);
        gdn_mma_2b(GDN_SPLIT_SOLVE, aw, au, Ts, GDN_PP, 1, m0, GDN_C - 1, Vs + np, Ks + np, dp, 1, n0, D - 1 - np, 0,
                   m0 + 16);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = np + gdn_fcol(n0, j, r);
                if (n < D) {
                    wv[(size_t)t * Dp + n] = aw[j][r];
                    uk[(size_t)t * dp + n] = gdn_state_op(au[j][r]);
                } else {
                    if (n < Dp) wv[(size_t)t * Dp + n] = 0.0f; /* W's pad columns in state_save */
                    if (n < dp) uk[(size_t)t * dp + n] = 0.0f; /* Uk's (gdn_zero_pad) */
                }
            }
    }
}

/* Per (8 snt value columns j0.., b*h; snt from gdn_state_nt), chunks in order: S [D, 8 snt]
 * of those columns starts at 0; per chunk: reset if the chunk's first token starts a document; save S;
 * W = Wv - Uk S (written over Wv); S = e0L S + K^T diag(eL) W.
 * Shared: S [r8(D), sp] (rows past D zero), eL W [64, sp], Uk and K of the chunk
 * [64, dp] (pad columns zero), eL and e0 [128], two mbarriers. Two refills per chunk, by
 * bulk copies (gdn_refill): U (Uk, eL, e0) for the next chunk as soon as the W product is
 * done with it, K as soon as the S update is. 4 or 8 warps (gdn_state_threads): warp w
 * computes row tile w % 4 of W (gdn_state_product; with 8, over half the contraction),
 * and row tiles w, w + warps, ... of S. */
static __device__ __forceinline__ void
gdn_fwd_state(const int snt, float *state_save, float *Wv, const float *Uk, const float *Kp, const float *scal,
              const int32_t *doc_start, int T, int H, int D, int nchunk)
{
    const int j0 = blockIdx.x * 8 * snt, bh = blockIdx.y, b = bh / H, tid = threadIdx.x;
    const int sp = gdn_state_sp(snt), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D), warp = tid >> 5;
    const int nv = gdn_imin(8 * snt, D - j0);
    float *S = gdn_smem, *Wt = S + D8 * sp, *Ub = Wt + GDN_C * sp, *Kb = Ub + GDN_C * dp;
    float *sc = Kb + GDN_C * dp;
    uint64_t *bar = (uint64_t *)(sc + 2 * GDN_C); /* U, K */
    const size_t DD = (size_t)D * D;
    const unsigned ubytes = gdn_refill_bytes(dp, 1), kbytes = gdn_refill_bytes(dp, 0);

    {
        const size_t ci = (size_t)bh * nchunk;
        gdn_state_start(S, D, sp, bar, Ub, Uk + ci * GDN_C * dp, Kb, Kp + ci * GDN_C * dp, dp, sc,
                        scal + ci * 2 * GDN_C);
    }

    for (int c = 0; c < nchunk; c++) {
        const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), more = c + 1 < nchunk;
        const size_t ci = (size_t)bh * nchunk + c;
        const int reset = doc_start && doc_start[(size_t)b * T + t0];
        float wv[GDN_NTW][4];
        gdn_state_base(wv, Wv + ci * GDN_C * Dp + j0, Dp, nv, snt);
        gdn_mbar_wait(&bar[0], c & 1); /* U(c) has landed; K(c) may be in flight */
        if (tid == 0 && more) gdn_mbar_expect(&bar[0], ubytes);
        __syncthreads();
        const float e0L = sc[GDN_C + L - 1];
        if (reset) {
            for (int e = tid; e < D * sp; e += (int)blockDim.x) S[e] = 0.0f;
            __syncthreads();
        }
        float *ss = state_save + ci * DD + j0;
        gdn_state_store(ss, D, S, sp, D, nv);

        /* W = Wv - Uk S (gdn_state_product; Wt holds the upper half's sums until warps 0-3
         * overwrite it with eL W) */
        {
            float w[GDN_NTW][4];
            gdn_state_product(w, wv, Wv + ci * GDN_C * Dp + j0, Dp, nv, Ub, dp, S, Wt, D, -1.0f, snt);
            if (warp < 4)
#pragma unroll
                for (int j = 0; j < snt; j++)
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        const int t = gdn_frow(16 * warp, r);
                        Wt[t * sp + gdn_fcol(0, j, r)] = gdn_state_op(sc[t] * w[j][r]);
                    }
        }
        __syncthreads();
        if (more) gdn_refill(Ub, Uk + (ci + 1) * GDN_C * dp, dp, sc, scal + (ci + 1) * 2 * GDN_C, &bar[0]);
        gdn_mbar_wait(&bar[1], c & 1); /* K(c) has landed */
        if (tid == 0 && more) gdn_mbar_expect(&bar[1], kbytes);
        __syncthreads();

        /* S = e0L S + K^T (eL W): row tiles of 16 of [D, 8 snt] */
        for (int m0 = 16 * warp; m0 < D; m0 += 16 * (int)(blockDim.x >> 5)) {
            float acc[GDN_NTW][4];
            gdn_state_zero(acc);
            gdn_mma_n(gdn_state_split(1), snt, acc, Kb, 1, dp, m0, D - 1, Wt, sp, 1, 0, 8 * snt - 1, 0, GDN_C);
#pragma unroll
            for (int j = 0; j < snt; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int m = gdn_frow(m0, r), n = gdn_fcol(0, j, r);
                    if (m < D) S[m * sp + n] = e0L * S[m * sp + n] + acc[j][r];
                }
        }
        __syncthreads();
        if (more) gdn_refill(Kb, Kp + (ci + 1) * GDN_C * dp, dp, sc, NULL, &bar[1]);
    }
}

/* the forward state kernel with 24, 32 and 48 value columns a block (gdn_state_nt); the
 * 48-column blocks take more registers and are few enough to run two an SM */
typedef void (*gdn_fwd_state_fn)(float *, float *, const float *, const float *, const float *, const int32_t *, int,
                                 int, int, int);
#define GDN_FWD_STATE_KERNEL(name, snt, minb)                                                                      \
    static __global__ void __launch_bounds__(GDN_ST, minb)                                                         \
    name(float *state_save, float *Wv, const float *Uk, const float *Kp, const float *scal,                        \
         const int32_t *doc_start, int T, int H, int D, int nchunk)                                                \
    {                                                                                                              \
        gdn_fwd_state(snt, state_save, Wv, Uk, Kp, scal, doc_start, T, H, D, nchunk);                              \
    }
GDN_FWD_STATE_KERNEL(gdn_fwd_state_kernel24, 3, 3)
GDN_FWD_STATE_KERNEL(gdn_fwd_state_kernel32, 4, 3)
GDN_FWD_STATE_KERNEL(gdn_fwd_state_kernel48, 6, 2)

/* Per (chunk, b*h): o = diag(e0) Qs S0 + M W, M = E o QK (lower triangle with diagonal).
 * Shared: header, Qs [64, dp] (pad columns zero), K [64, dp] until M is built and then a
 * [64, 64] panel of W (pitch GDN_PP) in its place (rows of gdn_kpitch_pp(D)), M [64,
 * GDN_PP] and a [32, 64] panel of S0: 75 KB at D = 85, so that three blocks share an SM
 * (the registers are held to 80 for it). With 64-row panels of S0 and a tile of its own
 * for W (101 KB, two blocks an SM) the kernel took 0.258 instead of 0.235 ms. */
static __global__ void __launch_bounds__(GDN_NT, 3)
gdn_fwd_out_kernel(float *o, const float *q, const float *k, const float *g, const float *beta,
                   const int32_t *doc_start, const float *state_save, const float *Wbuf, int T,
                   int H, int D, int nchunk, float scale)
{
    const int c = blockIdx.x, bh = blockIdx.y, b = bh / H, h = bh % H, tid = threadIdx.x;
    const int t0 = c * GDN_C, L = gdn_imin(GDN_C, T - t0), dp = gdn_kpitch(D), D8 = gdn_r8(D), Dp = gdn_r4(D);
    const size_t ci = (size_t)bh * nchunk + c, rs = (size_t)H * D;
    const gdn_hdr s = gdn_hdr_at(gdn_smem);
    float *Qs = gdn_smem + GDN_HDR, *Ks = Qs + GDN_C * dp, *Ms = Ks + GDN_C * gdn_kpitch_pp(D);
    float *Sp = Ms + GDN_C * GDN_PP, *Wp = Ks;
    const int warp = tid >> 5, m0 = 16 * (warp & 3), n0 = 32 * (warp >> 2);
    const float *S0 = state_save + ci * D * D, *Wc = Wbuf + ci * GDN_C * Dp;

    /* K and Q (unscaled: scale is applied to M and to the e0 Q S0 term) in flight during the scan */
    gdn_load_async(Ks, dp, GDN_C, D8, k + gdn_row(b, t0, h, T, H, D), rs, L, 0, D);
    gdn_load_async(Qs, dp, GDN_C, D8, q + gdn_row(b, t0, h, T, H, D), rs, L, 0, D);
    gdn_chunk_scalars(s, g, beta, doc_start, b, h, t0, L, T, H);
    gdn_sync();
    {
        float acc[4][4];
        gdn_zero(acc);
        if (n0 < m0 + 16) gdn_mma(GDN_SPLIT_PAIR, acc, Qs, dp, 1, m0, GDN_C - 1, Ks, 1, dp, n0, GDN_C - 1, 0, D);
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), u = gdn_fcol(n0, j, r);
                Ms[t * GDN_PP + u] = scale * gdn_decay(s, t, u, L) * acc[j][r];
            }
    }
    __syncthreads(); /* K is done with: the W panels lie over it */
    for (int np = 0; np < D; np += 64) {
        const int act = np + n0 < D; /* the warp's columns reach into D */
        float am[4][4], aq[4][4];
        gdn_zero(am);
        gdn_zero(aq);
        gdn_load_async(Wp, GDN_PP, GDN_C, 64, Wc, Dp, GDN_C, np, D);
        for (int ip = 0; ip < D; ip += 32) {
            const int iw = gdn_imin(32, D - ip);
            gdn_load_async(Sp, GDN_PP, 32, 64, S0 + (size_t)ip * D, D, iw, np, D);
            gdn_sync();
            if (act) {
                if (ip == 0)
                    gdn_mma(GDN_SPLIT_SOLVE, am, Ms, GDN_PP, 1, m0, GDN_C - 1, Wp, GDN_PP, 1, n0, 63, 0, m0 + 16);
                gdn_mma(GDN_SPLIT_S0, aq, Qs + ip, dp, 1, m0, GDN_C - 1, Sp, GDN_PP, 1, n0, 63, 0, iw);
            }
            gdn_sync();
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int t = gdn_frow(m0, r), n = np + gdn_fcol(n0, j, r);
                if (t < L && n < D) o[gdn_row(b, t0 + t, h, T, H, D) + n] = scale * s.e0[t] * aq[j][r] + am[j][r];
            }
    }
}

/* =================================================================================== */
/* launcher                                                                            */
/* =================================================================================== */

/* 1 when some product family runs in plain TF32 (the default), 0 when every one runs in
 * 3xTF32 (a build with all GDN_SPLIT_* at 3): the GPU test picks its tolerance by it */
extern "C" int cuda_gdn_tf32_plain(void)
{
    return GDN_SPLIT_PAIR == 1 || GDN_SPLIT_SOLVE == 1 || GDN_SPLIT_STATE == 1 || GDN_SPLIT_S0 == 1 ||
           GDN_SPLIT_GRAD == 1;
}

/* the state kernels' warps: 0 chooses by the number of blocks (gdn_state_threads), 4 or 8
 * forces that many (for the tests and benchmarks); returns the previous setting */
static int gdn_state_warps;
extern "C" int cuda_gdn_set_state_warps(int n)
{
    if (n != 0 && n != 4 && n != 8) die("gdn: state kernels with %d warps (0 for the default, 4 or 8)", n);
    const int old = gdn_state_warps;
    gdn_state_warps = n;
    return old;
}

/* the state kernels' value columns a block: 0 chooses by the shape (gdn_state_nt), 24, 32
 * or 48 forces that many (for the tests and benchmarks); returns the previous setting */
static int gdn_state_cols;
extern "C" int cuda_gdn_set_state_cols(int n)
{
    if (n != 0 && n != 24 && n != 32 && n != 48) die("gdn: state kernels with %d columns (0, 24, 32 or 48)", n);
    const int old = gdn_state_cols;
    gdn_state_cols = n;
    return old;
}

int gdn_state_nt(int D, int BH)
{
    if (gdn_state_cols) return gdn_state_cols / 8;
    /* rank each width: blocks that fill the SMs first (the fewest of them), else the most
     * blocks; ties go to the fewest padded columns */
    static const int widths[3] = {3, 4, 6};
    const long nsm = cuda_num_sms();
    int best = 0;
    long brank = 0, bpad = 0;
    for (int i = 0; i < 3; i++) {
        const int w = 8 * widths[i], nsb = (D + w - 1) / w;
        const long blocks = (long)nsb * BH, pad = (long)nsb * w - D;
        const long rank = blocks >= nsm ? blocks : (1L << 40) - blocks;
        if (!best || rank < brank || (rank == brank && pad < bpad)) {
            best = widths[i];
            brank = rank;
            bpad = pad;
        }
    }
    return best;
}

int gdn_state_threads(int blocks)
{
    if (gdn_state_warps) return 32 * gdn_state_warps;
    return blocks <= cuda_num_sms() ? GDN_ST : GDN_ST / 2;
}

/* dynamic shared memory of each kernel, in bytes (the state kernel's: gdn_internal.cuh) */
static size_t gdn_smem_fwd_prep(int D)
{
    return sizeof(float) * (GDN_HDR + 2 * GDN_C * gdn_kpitch(D) + GDN_C * GDN_PP);
}
static size_t gdn_smem_fwd_out(int D)
{
    return sizeof(float) * (GDN_HDR + GDN_C * (gdn_kpitch(D) + gdn_kpitch_pp(D) + GDN_PP) + 32 * GDN_PP);
}

/* Forward: o overwritten, state_save overwritten (its W rows are the prep kernel's Wv,
 * turned into W in place by the state kernel). Scratch: 2 [64, gdn_kpitch(D)] arrays (the
 * state kernel's operands in its layout, gdn_refill) and a [128] vector (eL, e0) per (b,
 * h, chunk). */
extern "C" void cuda_gdn_forward(float *o, float *state_save, const float *q, const float *k,
                                 const float *v, const float *g, const float *beta,
                                 const int32_t *doc_start, int B, int T, int H, int D, float scale)
{
    gdn_check_shape("gdn_forward", B, T, H, D);
    const int nchunk = (T + GDN_C - 1) / GDN_C, BH = B * H;
    const size_t rows = (size_t)BH * nchunk * GDN_C, Dp = gdn_r4(D);
    fatal_check(gdn_w_pitch(D) == (int)Dp);
    float *Wv = state_save + gdn_state_w_offset(B, T, H, D);
    if (gdn_chain_use(D, BH, nchunk)) {
        float *chain = (float *)cuda_scratch(gdn_chain_scratch_floats(D, BH, nchunk) * sizeof(float));
        gdn_fwd_chain_run(o, state_save, Wv, chain, q, k, v, g, beta, doc_start, T, H, D, nchunk, BH, scale);
        return;
    }
    cudaStream_t st = cuda_stream();
    const size_t dp = gdn_kpitch(D);
    float *Uk = (float *)cuda_scratch((2 * rows * dp + 2 * rows) * sizeof(float));
    float *Kp = Uk + rows * dp, *scal = Kp + rows * dp;
    const int snt = gdn_state_nt(D, BH), nsb = (D + 8 * snt - 1) / (8 * snt);
    const gdn_fwd_state_fn state = snt == 3 ? gdn_fwd_state_kernel24 : snt == 4 ? gdn_fwd_state_kernel32
                                                                                 : gdn_fwd_state_kernel48;
    const size_t sm1 = gdn_smem_fwd_prep(D), sm2 = gdn_smem_state(D, snt), sm3 = gdn_smem_fwd_out(D);
    gdn_allow_smem((const void *)gdn_fwd_prep_kernel, sm1);
    gdn_allow_smem((const void *)state, sm2);
    gdn_allow_smem((const void *)gdn_fwd_out_kernel, sm3);

    gdn_fwd_prep_kernel<<<dim3(nchunk, BH), GDN_NT, sm1, st>>>(Wv, Uk, Kp, scal, k, v, g, beta,
                                                               doc_start, T, H, D, nchunk);
    LAUNCH_CHECK();
    state<<<dim3(nsb, BH), gdn_state_threads(nsb * BH), sm2, st>>>(state_save, Wv, Uk, Kp, scal, doc_start, T, H, D,
                                                                   nchunk);
    LAUNCH_CHECK();
    gdn_fwd_out_kernel<<<dim3(nchunk, BH), GDN_NT, sm3, st>>>(o, q, k, g, beta, doc_start, state_save,
                                                              Wv, T, H, D, nchunk, scale);
    LAUNCH_CHECK();
}
