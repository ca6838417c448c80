/* attention_backward.cu: the backward of causal softmax attention on the tensor cores
 * (cuda_attention_backward), the CUDA twin of the attention backward of src/cpu/cpu_mla.c.
 * The design and the helpers it shares with the forward (attention_forward.cu) are in
 * attention_internal.cuh.
 *
 * Backward (FlashAttention-2 order, no atomics): D_t = dout_t . out_t per row; then
 *   dkdv: one block of 8 warps per (b, h, 64 keys), looping over the query tiles from the
 *         diagonal on (Q, dO, lse, D double-buffered). Phase 1: the 8 warps (4 row blocks
 *         x 2 key halves) compute S and dP = dO V^T for the 64x64 tile, then
 *         P = exp(S - lse) and dS = P (dP - D), stored to shared memory as bf16. Phase 2:
 *         each warp owns 16 keys x half of the columns and accumulates dV += P^T dO and
 *         dK += dS^T Q in registers (P^T and dS^T read with ldmatrix.trans).
 *   dq:   one block of 8 warps per (b, h, 64 queries), looping over key tiles up to the
 *         diagonal: the same phase 1, then dQ += dS K.
 * Every gradient element is owned by one thread, accumulated in a fixed loop order and
 * added once to the caller's buffer, so two runs give bit-identical results. The scale of
 * dK and dQ is applied with explicit round-to-nearest multiply then add (no fused
 * multiply-add), so that accumulating onto zero and then onto that result gives exactly
 * twice the first result.
 */
#include "attention_internal.cuh"

/* Dvec [B, H, T] = dout . out per row (fp32, fixed butterfly); one warp per (b, t, h).
 * dout is rounded to bf16 first, as dP = dout v^T sees it: then D = sum_s P_s dP_s holds
 * for the same dout and dS = P (dP - D) has no cancellation error from the rounding
 * (it matters where a query sees few keys, e.g. at a document start). */
static __global__ void row_dot_kernel(float *Dvec, const float *dout, const float *out, int T, int H, int Dv,
                                      size_t nrows)
{
    const size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= nrows) return; /* whole warps leave together */
    const float *a = dout + w * Dv, *o = out + w * Dv;
    float s = 0.f;
    for (int c = lane; c < Dv; c += 32) s = fmaf(__bfloat162float(__float2bfloat16_rn(a[c])), o[c], s);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (lane == 0) {
        const int h = (int)(w % H);
        const size_t bt = w / H, b = bt / T;
        const int t = (int)(bt % T);
        Dvec[(b * H + h) * T + t] = s;
    }
}

/* acc += A B^T on one warp's 16 x 32 tile: rows rq.. of A and kc.. of B (both [row][k]
 * bf16 in shared memory, pitch ld), over the first nsteps of at most maxsteps k-steps of
 * 16 (a constant at every call, so the loop unrolls) */
static __device__ __forceinline__ void warp_abt(float acc[4][4], const bf16 *sA, const bf16 *sB, int ld, int maxsteps,
                                                int nsteps, int rq, int kc, int lane)
{
#pragma unroll
    for (int kk = 0; kk < maxsteps; kk++) {
        if (kk < nsteps) {
            uint32_t a[4];
            cuda_ldsm4(a, sA + (rq + (lane & 15)) * ld + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
            for (int np = 0; np < 2; np++) {
                uint32_t b[4];
                cuda_ldsm4(b, sB + (kc + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * ld + kk * 16 +
                               (((lane >> 3) & 1) << 3));
                mma_bf16(acc[2 * np], a, b[0], b[1]);
                mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
            }
        }
    }
}

/* row[col] += scale * acc (rounded product, then sum: no fma), for the columns this lane
 * holds in row half `half` of its accumulator fragments acc[2 p + nn] (p < nmine of at
 * most np column pairs of 16 from pair p0, below D; np a constant at every call); with
 * set the old values are taken as 0 (not read) */
static __device__ __forceinline__ void add_scaled_row(float *row, const float (*acc)[4], int np, int half, int nmine,
                                                      int p0, int D, float scale, int set, int c)
{
#pragma unroll
    for (int p = 0; p < np; p++) {
        if (p < nmine) {
#pragma unroll
            for (int nn = 0; nn < 2; nn++) {
                const int col = (p0 + p) * 16 + nn * 8 + 2 * c;
                if (col < D) row[col] = __fadd_rn(set ? 0.0f : row[col], __fmul_rn(scale, acc[2 * p + nn][2 * half]));
                if (col + 1 < D)
                    row[col + 1] =
                        __fadd_rn(set ? 0.0f : row[col + 1], __fmul_rn(scale, acc[2 * p + nn][2 * half + 1]));
            }
        }
    }
}

/* Phase 1 of both backward kernels, all 8 warps: for one 64-query x 64-key tile,
 * P = exp(scale q.k - lse) (0 where masked or the query row is past T) and
 * dS = P (dO.v - D), written as bf16 to sP (skipped when NULL) and sdS, [query][key]
 * with pitch ATT_PP. Warp w computes query rows 16 (w % 4).. and keys 32 (w / 4)..
 * slse, sD, sqd: per local query row; skd: per local key; sqd/skd NULL without docs. */
static __device__ __forceinline__ void bwd_probs(bf16 *sP, bf16 *sdS, const bf16 *sQ, const bf16 *sK, int pk,
                                                 int nkq, const bf16 *sdO, const bf16 *sV, int pv, int nvp,
                                                 const float *slse, const float *sD, const int *sqd,
                                                 const int *skd, int t0, int s0, int T, float sl2)
{
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int rq = (warp & 3) * 16, kc = (warp >> 2) * 32;
    float s[4][4], dp[4][4];
#pragma unroll
    for (int n = 0; n < 4; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
    warp_abt(s, sQ, sK, pk, ATT_KSTEPS, nkq, rq, kc, lane);   /* S = Q K^T */
    warp_abt(dp, sdO, sV, pv, ATT_VSTEPS, nvp, rq, kc, lane); /* dP = dO V^T */
    const int ra = rq + g, rb = ra + 8;
    const float lsa = slse[ra] * ATT_LOG2E, lsb = slse[rb] * ATT_LOG2E, Da = sD[ra], Db = sD[rb];
#pragma unroll
    for (int n = 0; n < 4; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = e < 2 ? ra : rb, t = t0 + r, col = kc + n * 8 + 2 * c + (e & 1);
            int vis = s0 + col <= t && t < T;
            if (skd) vis = vis && sqd[r] == skd[col];
            const float p = vis ? exp2f(s[n][e] * sl2 - (e < 2 ? lsa : lsb)) : 0.f;
            s[n][e] = p;
            dp[n][e] = p * (dp[n][e] - (e < 2 ? Da : Db));
        }
        const int col = kc + n * 8 + 2 * c;
        if (sP) {
            *(uint32_t *)(sP + ra * ATT_PP + col) = pack_bf16(s[n][0], s[n][1]);
            *(uint32_t *)(sP + rb * ATT_PP + col) = pack_bf16(s[n][2], s[n][3]);
        }
        *(uint32_t *)(sdS + ra * ATT_PP + col) = pack_bf16(dp[n][0], dp[n][1]);
        *(uint32_t *)(sdS + rb * ATT_PP + col) = pack_bf16(dp[n][2], dp[n][3]);
    }
}

/* Which 16-wide column blocks of a dp-wide gradient warp half `hf` (0, 1) owns. */
static __device__ __forceinline__ void column_half(int dp, int hf, int *first, int *count)
{
    const int nblk = dp >> 4, h0 = (nblk + 1) >> 1;
    *first = hf ? h0 : 0;
    *count = hf ? nblk - h0 : h0;
}

static size_t dkdv_smem_bytes(int dkp, int dvp, int nt)
{
    return (size_t)3 * ATT_TILE * (dkp + 8) * sizeof(bf16) + (size_t)3 * ATT_TILE * (dvp + 8) * sizeof(bf16) +
           (size_t)2 * ATT_TILE * ATT_PP * sizeof(bf16) + (size_t)(7 * ATT_TILE + 2 * nt + 1) * sizeof(int);
}

/* grid (B*H, nt), BWD_THREADS threads: dk, dv [B, T, H, Dk|Dv] += the gradients of key
 * tile blockIdx.y, summed over the query tiles from the diagonal on, in order. */
static __global__ void __launch_bounds__(BWD_THREADS, 1)
    attn_bwd_dkdv_kernel(float *dk, float *dv, const bf16 *qb, const bf16 *kb, const bf16 *vb, const bf16 *dob,
                         const float *lse, const float *Dvec, const int32_t *doc_id, int T, int H, int Dk,
                         int Dv, int dkp, int dvp, int nt, float scale, float sl2, int set)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int pk = dkp + 8, pv = dvp + 8;
    bf16 *sK = (bf16 *)smem;                   /* [64][pk] */
    bf16 *sQ = sK + ATT_TILE * pk;             /* [2][64][pk] */
    bf16 *sV = sQ + 2 * ATT_TILE * pk;         /* [64][pv] */
    bf16 *sdO = sV + ATT_TILE * pv;            /* [2][64][pv] */
    bf16 *sP = sdO + 2 * ATT_TILE * pv;        /* [64][ATT_PP] */
    bf16 *sdS = sP + ATT_TILE * ATT_PP;        /* [64][ATT_PP] */
    float *slse = (float *)(sdS + ATT_TILE * ATT_PP); /* [2][64] */
    float *sD = slse + 2 * ATT_TILE;           /* [2][64] */
    int *sqd = (int *)(sD + 2 * ATT_TILE);     /* [2][64] */
    int *skd = sqd + 2 * ATT_TILE;             /* [64] */
    int *slist = skd + ATT_TILE, *sflag = slist + nt, *scount = sflag + nt;

    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int kt = blockIdx.y, s0 = kt * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const size_t hrow = (size_t)bh * T;
    const bf16 *qh = qb + hrow * dkp, *kh = kb + hrow * dkp, *vh = vb + hrow * dvp, *doh = dob + hrow * dvp;
    const float *lh = lse + hrow, *Dh = Dvec + hrow;
    const int32_t *doc = doc_id ? doc_id + (size_t)b * T : NULL;

    const int nvis = doc ? doc_tile_list(slist, sflag, scount, doc, T, kt, kt, nt - 1) : nt - kt;

    load_rows_async(sK, pk, kh, dkp, s0, T, BWD_THREADS);
    load_rows_async(sV, pv, vh, dvp, s0, T, BWD_THREADS);
    if (doc) load_vals_async(skd, doc, s0, T);
    {
        const int i = doc ? slist[0] : kt;
        load_rows_async(sQ, pk, qh, dkp, i * ATT_TILE, T, BWD_THREADS);
        load_rows_async(sdO, pv, doh, dvp, i * ATT_TILE, T, BWD_THREADS);
        load_vals_async(slse, lh, i * ATT_TILE, T);
        load_vals_async(sD, Dh, i * ATT_TILE, T);
        if (doc) load_vals_async(sqd, doc, i * ATT_TILE, T);
    }
    cp_async_commit();

    /* phase 2 ownership: keys rk..rk+15, one half of the dK and dV columns */
    const int rk = (warp & 3) * 16, hf = warp >> 2;
    int kp0, nkmine, vp0, nvmine;
    column_half(dkp, hf, &kp0, &nkmine);
    column_half(dvp, hf, &vp0, &nvmine);
    float dka[ATT_KSTEPS][4], dva[ATT_VSTEPS][4];
#pragma unroll
    for (int n = 0; n < ATT_KSTEPS; n++) dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.f;
#pragma unroll
    for (int n = 0; n < ATT_VSTEPS; n++) dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.f;

    for (int it = 0; it < nvis; it++) {
        const int i = doc ? slist[it] : kt + it, buf = it & 1;
        if (it + 1 < nvis) {
            const int in = doc ? slist[it + 1] : kt + it + 1, nb = buf ^ 1;
            load_rows_async(sQ + nb * ATT_TILE * pk, pk, qh, dkp, in * ATT_TILE, T, BWD_THREADS);
            load_rows_async(sdO + nb * ATT_TILE * pv, pv, doh, dvp, in * ATT_TILE, T, BWD_THREADS);
            load_vals_async(slse + nb * ATT_TILE, lh, in * ATT_TILE, T);
            load_vals_async(sD + nb * ATT_TILE, Dh, in * ATT_TILE, T);
            if (doc) load_vals_async(sqd + nb * ATT_TILE, doc, in * ATT_TILE, T);
            cp_async_commit();
            cp_async_wait_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const bf16 *cQ = sQ + buf * ATT_TILE * pk, *cdO = sdO + buf * ATT_TILE * pv;
        bwd_probs(sP, sdS, cQ, sK, pk, dkp >> 4, cdO, sV, pv, dvp >> 4, slse + buf * ATT_TILE,
                  sD + buf * ATT_TILE, doc ? sqd + buf * ATT_TILE : NULL, doc ? skd : NULL, i * ATT_TILE, s0, T,
                  sl2);
        __syncthreads();
        /* dV += P^T dO, dK += dS^T Q over the 64 queries, 16 at a time */
#pragma unroll
        for (int kq = 0; kq < 4; kq++) {
            uint32_t ap[4], ad[4];
            const int off = (kq * 16 + (lane & 7) + ((lane >> 4) << 3)) * ATT_PP + rk + (((lane >> 3) & 1) << 3);
            cuda_ldsm4_t(ap, sP + off);
            cuda_ldsm4_t(ad, sdS + off);
#pragma unroll
            for (int p = 0; p < ATT_VSTEPS / 2; p++) {
                if (p < nvmine) {
                    uint32_t bv[4];
                    cuda_ldsm4_t(bv, cdO + (kq * 16 + (lane & 15)) * pv + (vp0 + p) * 16 + ((lane >> 4) << 3));
                    mma_bf16(dva[2 * p], ap, bv[0], bv[1]);
                    mma_bf16(dva[2 * p + 1], ap, bv[2], bv[3]);
                }
            }
#pragma unroll
            for (int p = 0; p < ATT_KSTEPS / 2; p++) {
                if (p < nkmine) {
                    uint32_t bq[4];
                    cuda_ldsm4_t(bq, cQ + (kq * 16 + (lane & 15)) * pk + (kp0 + p) * 16 + ((lane >> 4) << 3));
                    mma_bf16(dka[2 * p], ad, bq[0], bq[1]);
                    mma_bf16(dka[2 * p + 1], ad, bq[2], bq[3]);
                }
            }
        }
        __syncthreads(); /* sP, sdS and buffer `buf` are rewritten next */
    }

    /* dK += scale * acc (rounded product, then sum: no fma), dV += acc; with set the old
     * values are taken as 0 (not read), as if the buffers had been zeroed first */
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int s = s0 + rk + g + 8 * half;
        if (s >= T) continue;
        float *dkr = dk + (((size_t)b * T + s) * H + h) * Dk;
        float *dvr = dv + (((size_t)b * T + s) * H + h) * Dv;
        add_scaled_row(dkr, dka, ATT_KSTEPS / 2, half, nkmine, kp0, Dk, scale, set, c);
#pragma unroll
        for (int p = 0; p < ATT_VSTEPS / 2; p++) {
            if (p < nvmine) {
#pragma unroll
                for (int nn = 0; nn < 2; nn++) {
                    const int col = (vp0 + p) * 16 + nn * 8 + 2 * c;
                    if (col < Dv) dvr[col] = (set ? 0.0f : dvr[col]) + dva[2 * p + nn][2 * half];
                    if (col + 1 < Dv) dvr[col + 1] = (set ? 0.0f : dvr[col + 1]) + dva[2 * p + nn][2 * half + 1];
                }
            }
        }
    }
}

static size_t dq_smem_bytes(int dkp, int dvp, int nt)
{
    return (size_t)3 * ATT_TILE * (dkp + 8) * sizeof(bf16) + (size_t)3 * ATT_TILE * (dvp + 8) * sizeof(bf16) +
           (size_t)ATT_TILE * ATT_PP * sizeof(bf16) + (size_t)(5 * ATT_TILE + 2 * nt + 1) * sizeof(int);
}

/* grid (B*H, nt), BWD_THREADS threads: dq [B, T, H, Dk] += the gradient of query tile
 * nt-1-blockIdx.y, summed over its key tiles in order. */
static __global__ void __launch_bounds__(BWD_THREADS, 1)
    attn_bwd_dq_kernel(float *dq, const bf16 *qb, const bf16 *kb, const bf16 *vb, const bf16 *dob,
                       const float *lse, const float *Dvec, const int32_t *doc_id, int T, int H, int Dk, int dkp,
                       int dvp, int nt, float scale, float sl2, int set)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int pk = dkp + 8, pv = dvp + 8;
    bf16 *sQ = (bf16 *)smem;                   /* [64][pk] */
    bf16 *sK = sQ + ATT_TILE * pk;             /* [2][64][pk] */
    bf16 *sdO = sK + 2 * ATT_TILE * pk;        /* [64][pv] */
    bf16 *sV = sdO + ATT_TILE * pv;            /* [2][64][pv] */
    bf16 *sdS = sV + 2 * ATT_TILE * pv;        /* [64][ATT_PP] */
    float *slse = (float *)(sdS + ATT_TILE * ATT_PP); /* [64] */
    float *sD = slse + ATT_TILE;               /* [64] */
    int *sqd = (int *)(sD + ATT_TILE);         /* [64] */
    int *skd = sqd + ATT_TILE;                 /* [2][64] */
    int *slist = skd + 2 * ATT_TILE, *sflag = slist + nt, *scount = sflag + nt;

    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int qt = nt - 1 - (int)blockIdx.y, t0 = qt * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const size_t hrow = (size_t)bh * T;
    const bf16 *qh = qb + hrow * dkp, *kh = kb + hrow * dkp, *vh = vb + hrow * dvp, *doh = dob + hrow * dvp;
    const int32_t *doc = doc_id ? doc_id + (size_t)b * T : NULL;

    const int nvis = doc ? doc_tile_list(slist, sflag, scount, doc, T, qt, 0, qt) : qt + 1;

    load_rows_async(sQ, pk, qh, dkp, t0, T, BWD_THREADS);
    load_rows_async(sdO, pv, doh, dvp, t0, T, BWD_THREADS);
    load_vals_async(slse, lse + hrow, t0, T);
    load_vals_async(sD, Dvec + hrow, t0, T);
    if (doc) load_vals_async(sqd, doc, t0, T);
    {
        const int j = doc ? slist[0] : 0;
        load_rows_async(sK, pk, kh, dkp, j * ATT_TILE, T, BWD_THREADS);
        load_rows_async(sV, pv, vh, dvp, j * ATT_TILE, T, BWD_THREADS);
        if (doc) load_vals_async(skd, doc, j * ATT_TILE, T);
    }
    cp_async_commit();

    /* phase 2 ownership: query rows rq..rq+15, one half of the dQ columns */
    const int rq = (warp & 3) * 16, hf = warp >> 2;
    int kp0, nkmine;
    column_half(dkp, hf, &kp0, &nkmine);
    float dqa[ATT_KSTEPS][4];
#pragma unroll
    for (int n = 0; n < ATT_KSTEPS; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;

    for (int it = 0; it < nvis; it++) {
        const int j = doc ? slist[it] : it, buf = it & 1;
        if (it + 1 < nvis) {
            const int jn = doc ? slist[it + 1] : it + 1, nb = buf ^ 1;
            load_rows_async(sK + nb * ATT_TILE * pk, pk, kh, dkp, jn * ATT_TILE, T, BWD_THREADS);
            load_rows_async(sV + nb * ATT_TILE * pv, pv, vh, dvp, jn * ATT_TILE, T, BWD_THREADS);
            if (doc) load_vals_async(skd + nb * ATT_TILE, doc, jn * ATT_TILE, T);
            cp_async_commit();
            cp_async_wait_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        const bf16 *cK = sK + buf * ATT_TILE * pk, *cV = sV + buf * ATT_TILE * pv;
        bwd_probs(NULL, sdS, sQ, cK, pk, dkp >> 4, sdO, cV, pv, dvp >> 4, slse, sD, doc ? sqd : NULL,
                  doc ? skd + buf * ATT_TILE : NULL, t0, j * ATT_TILE, T, sl2);
        __syncthreads();
        /* dQ += dS K over the 64 keys, 16 at a time */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];
            cuda_ldsm4(a, sdS + (rq + (lane & 15)) * ATT_PP + kk * 16 + ((lane >> 4) << 3));
#pragma unroll
            for (int p = 0; p < ATT_KSTEPS / 2; p++) {
                if (p < nkmine) {
                    uint32_t bk[4];
                    cuda_ldsm4_t(bk, cK + (kk * 16 + (lane & 15)) * pk + (kp0 + p) * 16 + ((lane >> 4) << 3));
                    mma_bf16(dqa[2 * p], a, bk[0], bk[1]);
                    mma_bf16(dqa[2 * p + 1], a, bk[2], bk[3]);
                }
            }
        }
        __syncthreads(); /* sdS and buffer `buf` are rewritten next */
    }

#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int t = t0 + rq + g + 8 * half;
        if (t >= T) continue;
        float *dqr = dq + (((size_t)b * T + t) * H + h) * Dk;
        add_scaled_row(dqr, dqa, ATT_KSTEPS / 2, half, nkmine, kp0, Dk, scale, set, c);
    }
}

/* ------------------------------------------------------------------ launcher ---- */

/* the backward into dq, dk, dv: added (set 0) or written (set 1, old contents unread) */
static void attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *lse,
                               const float *q, const float *k, const float *v, const int32_t *doc_id, int B, int T,
                               int H, int Dk, int Dv, float scale, int set)
{
    static size_t dkdv_set, dq_set;
    attn_check("cuda_attention_backward", B, T, H, Dk, Dv);
#ifdef DELTAMLA_HAVE_CUDNN
    if (!doc_id && attn_cudnn_backward(dq, dk, dv, dout, out, lse, q, k, v, B, T, H, Dk, Dv, scale, set)) return;
#endif
    const int dkp = round16(Dk), dvp = round16(Dv), nt = (T + ATT_TILE - 1) / ATT_TILE;
    const size_t nrow = (size_t)B * H * T;
    /* scratch: q, k, v, dout in bf16 [B, H, T, dkp | dvp], then D [B, H, T] fp32 */
    bf16 *qb = (bf16 *)cuda_scratch(nrow * (2 * (size_t)dkp + 2 * (size_t)dvp) * sizeof(bf16) +
                                    nrow * sizeof(float));
    bf16 *kb = qb + nrow * dkp, *vb = kb + nrow * dkp, *dob = vb + nrow * dvp;
    float *Dvec = (float *)(dob + nrow * dvp);
    attn_to_heads_bf16(qb, q, B, T, H, Dk, dkp);
    attn_to_heads_bf16(kb, k, B, T, H, Dk, dkp);
    attn_to_heads_bf16(vb, v, B, T, H, Dv, dvp);
    attn_to_heads_bf16(dob, dout, B, T, H, Dv, dvp);
    row_dot_kernel<<<ceil_div_u(nrow * 32, 256), 256, 0, cuda_stream()>>>(Dvec, dout, out, T, H, Dv, nrow);
    LAUNCH_CHECK();

    const float sl2 = scale * ATT_LOG2E;
    const size_t smem_kv = dkdv_smem_bytes(dkp, dvp, nt);
    attn_smem_limit((const void *)attn_bwd_dkdv_kernel, smem_kv, &dkdv_set, "cuda_attention_backward");
    attn_bwd_dkdv_kernel<<<dim3(B * H, nt), BWD_THREADS, smem_kv, cuda_stream()>>>(
        dk, dv, qb, kb, vb, dob, lse, Dvec, doc_id, T, H, Dk, Dv, dkp, dvp, nt, scale, sl2, set);
    LAUNCH_CHECK();
    const size_t smem_q = dq_smem_bytes(dkp, dvp, nt);
    attn_smem_limit((const void *)attn_bwd_dq_kernel, smem_q, &dq_set, "cuda_attention_backward");
    attn_bwd_dq_kernel<<<dim3(B * H, nt), BWD_THREADS, smem_q, cuda_stream()>>>(
        dq, qb, kb, vb, dob, lse, Dvec, doc_id, T, H, Dk, dkp, dvp, nt, scale, sl2, set);
    LAUNCH_CHECK();
}

extern "C" void cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                        const float *lse, const float *q, const float *k, const float *v,
                                        const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale, 0);
}

/* as cuda_attention_backward, but dq, dk, dv are written, not added to */
extern "C" void cuda_attention_backward_set(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                            const float *lse, const float *q, const float *k, const float *v,
                                            const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    attention_backward(dq, dk, dv, dout, out, lse, q, k, v, doc_id, B, T, H, Dk, Dv, scale, 1);
}
