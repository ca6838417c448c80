/* attention_forward.cu: the forward of causal softmax attention on the tensor cores
 * (cuda_attention_forward), the CUDA twin of the attention forward of src/cpu/cpu_mla.c.
 * The design and the helpers it shares with the backward (attention_backward.cu) are in
 * attention_internal.cuh.
 *
 * Forward (one block of 4 warps per (b, h, 64 query rows); heaviest query tiles first):
 * each warp owns 16 query rows, keeps its Q fragments in registers and loops over key
 * tiles of 64 up to the diagonal, K/V tiles double-buffered in shared memory by cp.async.
 * S = Q K^T (ldmatrix for both operands), online softmax in fp32 registers with exp2 of
 * log2e-scaled scores, P converted in registers straight into the A fragments of
 * O += P V (V through ldmatrix.trans). The causal mask is applied on the diagonal tile
 * only; tiles below it are fully visible.
 */
#include "attention_internal.cuh"

static size_t fwd_smem_bytes(int dkp, int dvp, int nt)
{
    return (size_t)3 * ATT_TILE * (dkp + 8) * sizeof(bf16) + (size_t)2 * ATT_TILE * (dvp + 8) * sizeof(bf16) +
           (size_t)(2 * ATT_TILE + 2 * nt + 1) * sizeof(int);
}

/* grid (B*H, nt), FWD_THREADS threads. q/k/v bf16 [B, H, T, dkp|dvp]; out [B, T, H, Dv]
 * and lse [B, H, T] fp32. sl2 = scale * log2(e). */
static __global__ void __launch_bounds__(FWD_THREADS, 2)
    attn_fwd_kernel(float *out, float *lse, const bf16 *qb, const bf16 *kb, const bf16 *vb,
                    const int32_t *doc_id, int T, int H, int Dv, int dkp, int dvp, int nt, float sl2)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int pk = dkp + 8, pv = dvp + 8;
    bf16 *sQ = (bf16 *)smem;                /* [64][pk] */
    bf16 *sK = sQ + ATT_TILE * pk;          /* [2][64][pk] */
    bf16 *sV = sK + 2 * ATT_TILE * pk;      /* [2][64][pv] */
    int *skd = (int *)(sV + 2 * ATT_TILE * pv); /* [2][64] key document ids */
    int *slist = skd + 2 * ATT_TILE, *sflag = slist + nt, *scount = sflag + nt;

    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int qt = nt - 1 - (int)blockIdx.y, t0 = qt * ATT_TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int nkq = dkp >> 4, nvp = dvp >> 4;
    const size_t hrow = (size_t)bh * T;
    const bf16 *qh = qb + hrow * dkp, *kh = kb + hrow * dkp, *vh = vb + hrow * dvp;
    const int32_t *doc = doc_id ? doc_id + (size_t)b * T : NULL;

    const int nvis = doc ? doc_tile_list(slist, sflag, scount, doc, T, qt, 0, qt) : qt + 1;

    load_rows_async(sQ, pk, qh, dkp, t0, T, FWD_THREADS);
    {
        const int j = doc ? slist[0] : 0;
        load_rows_async(sK, pk, kh, dkp, j * ATT_TILE, T, FWD_THREADS);
        load_rows_async(sV, pv, vh, dvp, j * ATT_TILE, T, FWD_THREADS);
        if (doc) load_vals_async(skd, doc, j * ATT_TILE, T);
    }
    cp_async_commit();

    /* this thread's two query rows: local ra and ra + 8 */
    const int ra = warp * 16 + g, ta = t0 + ra, tb = ta + 8;
    int da = 0, db = 0;
    if (doc) {
        da = doc[min(ta, T - 1)];
        db = doc[min(tb, T - 1)];
    }

    uint32_t qf[ATT_KSTEPS][4];
    float o[2 * ATT_VSTEPS][4];
#pragma unroll
    for (int d = 0; d < 2 * ATT_VSTEPS; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;

    for (int it = 0; it < nvis; it++) {
        const int j = doc ? slist[it] : it, buf = it & 1;
        if (it + 1 < nvis) {
            const int jn = doc ? slist[it + 1] : it + 1, nb = buf ^ 1;
            load_rows_async(sK + nb * ATT_TILE * pk, pk, kh, dkp, jn * ATT_TILE, T, FWD_THREADS);
            load_rows_async(sV + nb * ATT_TILE * pv, pv, vh, dvp, jn * ATT_TILE, T, FWD_THREADS);
            if (doc) load_vals_async(skd + nb * ATT_TILE, doc, jn * ATT_TILE, T);
            cp_async_commit();
            cp_async_wait_but_newest();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < ATT_KSTEPS; kk++)
                if (kk < nkq) cuda_ldsm4(qf[kk], sQ + (warp * 16 + (lane & 15)) * pk + kk * 16 + ((lane >> 4) << 3));
        }
        const bf16 *cK = sK + buf * ATT_TILE * pk, *cV = sV + buf * ATT_TILE * pv;
        const int *ckd = skd + buf * ATT_TILE;

        /* S = Q K^T for 16 rows x 64 keys: n-tile n covers keys 8n..8n+7 */
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < ATT_KSTEPS; kk++) {
            if (kk < nkq) {
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    uint32_t bk[4];
                    cuda_ldsm4(bk, cK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * pk + kk * 16 +
                                    (((lane >> 3) & 1) << 3));
                    mma_bf16(s[2 * np], qf[kk], bk[0], bk[1]);
                    mma_bf16(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                }
            }
        }

        /* mask, scale to log2 units, running max */
        const int s0 = j * ATT_TILE, diag = j == qt;
        float mxa = ma, mxb = mb;
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int col = n * 8 + 2 * c + (e & 1);
                int vis = !diag || s0 + col <= (e < 2 ? ta : tb);
                if (doc) vis = vis && ckd[col] == (e < 2 ? da : db);
                const float x = vis ? s[n][e] * sl2 : -INFINITY;
                s[n][e] = x;
                if (e < 2) mxa = fmaxf(mxa, x);
                else mxb = fmaxf(mxb, x);
            }
        }
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
        /* shift 0 while a row has seen no visible key: exp2(-inf - 0) = 0, never NaN */
        const float sha = mxa == -INFINITY ? 0.f : mxa, shb = mxb == -INFINITY ? 0.f : mxb;
        const float aa = exp2f(ma - sha), ab = exp2f(mb - shb);
        ma = mxa;
        mb = mxb;
        float suma = 0.f, sumb = 0.f;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            s[n][0] = exp2f(s[n][0] - sha);
            s[n][1] = exp2f(s[n][1] - sha);
            s[n][2] = exp2f(s[n][2] - shb);
            s[n][3] = exp2f(s[n][3] - shb);
            suma += s[n][0] + s[n][1];
            sumb += s[n][2] + s[n][3];
        }
        la = la * aa + suma; /* partial over this thread's columns; the quad sums at the end */
        lb = lb * ab + sumb;
#pragma unroll
        for (int d = 0; d < 2 * ATT_VSTEPS; d++) {
            o[d][0] *= aa;
            o[d][1] *= aa;
            o[d][2] *= ab;
            o[d][3] *= ab;
        }

        /* O += P V: the accumulators of key n-tiles 2kk, 2kk+1 are the A fragment of k-step kk */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t pa[4];
            pa[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < ATT_VSTEPS; dp++) {
                if (dp < nvp) {
                    uint32_t bv[4];
                    cuda_ldsm4_t(bv, cV + (kk * 16 + (lane & 15)) * pv + dp * 16 + ((lane >> 4) << 3));
                    mma_bf16(o[2 * dp], pa, bv[0], bv[1]);
                    mma_bf16(o[2 * dp + 1], pa, bv[2], bv[3]);
                }
            }
        }
        __syncthreads(); /* buffer `buf` is refilled by the next iteration's prefetch */
    }

    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float ia = la > 0.f ? 1.f / la : 0.f, ib = lb > 0.f ? 1.f / lb : 0.f;
    if (ta < T) {
        float *orow = out + (((size_t)b * T + ta) * H + h) * Dv;
#pragma unroll
        for (int d = 0; d < 2 * ATT_VSTEPS; d++) {
            const int col = d * 8 + 2 * c;
            if (col < Dv) orow[col] = o[d][0] * ia;
            if (col + 1 < Dv) orow[col + 1] = o[d][1] * ia;
        }
        if (c == 0) lse[hrow + ta] = la > 0.f ? (ma + log2f(la)) * ATT_LN2 : -INFINITY;
    }
    if (tb < T) {
        float *orow = out + (((size_t)b * T + tb) * H + h) * Dv;
#pragma unroll
        for (int d = 0; d < 2 * ATT_VSTEPS; d++) {
            const int col = d * 8 + 2 * c;
            if (col < Dv) orow[col] = o[d][2] * ib;
            if (col + 1 < Dv) orow[col + 1] = o[d][3] * ib;
        }
        if (c == 0) lse[hrow + tb] = lb > 0.f ? (mb + log2f(lb)) * ATT_LN2 : -INFINITY;
    }
}

/* ------------------------------------------------------------------ launcher ---- */

extern "C" void cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                                       const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale)
{
    static size_t fwd_set;
    attn_check("cuda_attention_forward", B, T, H, Dk, Dv);
#ifdef DELTAMLA_HAVE_CUDNN
    if (!doc_id && attn_cudnn_forward(out, lse, q, k, v, B, T, H, Dk, Dv, scale)) return;
#endif
    const int dkp = round16(Dk), dvp = round16(Dv), nt = (T + ATT_TILE - 1) / ATT_TILE;
    const size_t nrow = (size_t)B * H * T;
    /* scratch: q, k, v in bf16, [B, H, T, dkp | dvp] */
    bf16 *qb = (bf16 *)cuda_scratch(nrow * (2 * (size_t)dkp + dvp) * sizeof(bf16));
    bf16 *kb = qb + nrow * dkp, *vb = kb + nrow * dkp;
    attn_to_heads_bf16(qb, q, B, T, H, Dk, dkp);
    attn_to_heads_bf16(kb, k, B, T, H, Dk, dkp);
    attn_to_heads_bf16(vb, v, B, T, H, Dv, dvp);
    const size_t smem = fwd_smem_bytes(dkp, dvp, nt);
    attn_smem_limit((const void *)attn_fwd_kernel, smem, &fwd_set, "cuda_attention_forward");
    attn_fwd_kernel<<<dim3(B * H, nt), FWD_THREADS, smem, cuda_stream()>>>(out, lse, qb, kb, vb, doc_id, T, H, Dv,
                                                                          dkp, dvp, nt, scale * ATT_LOG2E);
    LAUNCH_CHECK();
}
