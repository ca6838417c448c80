/* moe_gemm.cu: the grouped GEMM of the routed experts (moe_experts.cu): for every expert e
 * C_e = A_e B_e on bf16 mma.sync with fp32 accumulation, operands by cp.async and
 * ldmatrix, the SwiGLU, scatter and accumulate epilogues. Shapes and arguments are
 * described in moe_gemm.cuh. */
#include <cuda_bf16.h>
#include <string.h>

#include "cuda_common.cuh"
#include "moe_gemm.cuh"

#define FULL_MASK 0xffffffffu

static __device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* four 8x8 bf16 matrices; lanes 8i..8i+7 address the rows of matrix i */
static __device__ __forceinline__ void ldsm4(uint32_t r[4], const __nv_bfloat16 *p, int trans)
{
    if (trans) cuda_ldsm4_t(r, p);
    else cuda_ldsm4(r, p);
}

/* 16 bytes global -> shared, or 16 zero bytes when !ok (nothing is read then) */
static __device__ __forceinline__ void cp_async16(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int ok)
{
    const unsigned s = cuda_smem_u32(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
}

static __device__ __forceinline__ void cp_async_commit(void) { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/* the tile of k0 for columns/rows from r0 (rlim valid rows, k-contiguous only; K valid k,
 * r-contiguous only) into T, in chunks of 8 bf16 */
static __device__ __forceinline__ void gm_load(__nv_bfloat16 *T, const gm_operand op, const __nv_bfloat16 *src,
                                               int r0, int rlim, int k0, int K)
{
#pragma unroll
    for (int i = 0; i < GM_CHUNKS; i++) {
        const int q = threadIdx.x + i * GM_THREADS;
        if (!op.kmajor) {
            const int r = q / (GM_BK / 8), c = (q % (GM_BK / 8)) * 8;
            const int ok = r < rlim && k0 + c < op.ext;
            cp_async16(T + r * GM_LDR + c, ok ? src + (long long)(r0 + r) * op.ld + k0 + c : src, ok);
        } else {
            const int kk = q / (GM_BM / 8), c = (q % (GM_BM / 8)) * 8;
            const int ok = k0 + kk < K && r0 + c < op.ext;
            cp_async16(T + kk * GM_LDK + c, ok ? src + (long long)(k0 + kk) * op.ld + r0 + c : src, ok);
        }
    }
}

/* GM_ROWS: block b is column tile b % ctiles of row tile b / ctiles in the concatenation
 * of the experts' row tiles (so the column tiles of a row tile run together and share its
 * A rows in L2; tiles past toff[E] exit). GM_WGRAD: blockIdx.y is the expert, blockIdx.x
 * its (M, N) output tile; experts without tokens exit. */
static __global__ void __launch_bounds__(GM_THREADS, 2) grouped_gemm_kernel(const gm_args g)
{
    extern __shared__ __align__(16) __nv_bfloat16 gm_smem[]; /* [GM_STAGES][A tile, B tile] */

    const int tid = threadIdx.x;
    int e, m0, n0, Mlim, Nlim, K, ctile = 0;
    if (g.shape == GM_ROWS) {
        ctile = blockIdx.x % g.ctiles;
        const int t = blockIdx.x / g.ctiles;
        if (t >= g.toff[g.E]) return;
        int lo = 0, hi = g.E; /* last e with toff[e] <= t: a non-empty expert */
        while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (g.toff[mid] <= t)
                lo = mid;
            else
                hi = mid - 1;
        }
        e = lo;
        m0 = (t - g.toff[e]) * GM_BM;
        Mlim = g.cnt[e] - m0;
        n0 = ctile * GM_BN;
        Nlim = g.N - n0;
        K = g.K;
    } else {
        e = blockIdx.y;
        K = g.cnt[e];
        if (K == 0) return;
        const int tm = (g.M + GM_BM - 1) / GM_BM;
        m0 = (blockIdx.x % tm) * GM_BM;
        n0 = (blockIdx.x / tm) * GM_BN;
        Mlim = g.M - m0;
        Nlim = g.N - n0;
    }
    const int base = g.off[e];
    const __nv_bfloat16 *srcA = g.a.base + (g.a.act ? (long long)base * g.a.ld : (long long)e * g.a.estride);
    const __nv_bfloat16 *srcB = g.b.base + (g.b.act ? (long long)base * g.b.ld : (long long)e * g.b.estride);
    const int rA = m0, rB = n0; /* first row (k-contiguous) or column (r-contiguous) */
    const int nk = (K + GM_BK - 1) / GM_BK;

#define GM_A(s) (gm_smem + (s) * 2 * GM_TILE)
#define GM_B(s) (gm_smem + (s) * 2 * GM_TILE + GM_TILE)
#pragma unroll
    for (int s = 0; s < GM_STAGES - 1; s++) {
        if (s < nk) {
            gm_load(GM_A(s), g.a, srcA, rA, Mlim, s * GM_BK, K);
            gm_load(GM_B(s), g.b, srcB, rB, Nlim, s * GM_BK, K);
        }
        cp_async_commit();
    }

    const int warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tq = lane & 3;
    const int wm = warp >> 2, wn = warp & 3;
    /* per-lane ldmatrix offsets (see the fragment layouts of m16n8k16: A (row g | g+8,
     * k 2q..2q+1 | +8), B (n g, k 2q..2q+1 | +8), C (row g | g+8, n 2q..2q+1)) */
    int offA, stepA_m, stepA_k, offB, stepB_n, stepB_k;
    if (!g.a.kmajor) {
        offA = (wm * 64 + (lane & 15)) * GM_LDR + (lane >> 4) * 8;
        stepA_m = 16 * GM_LDR;
        stepA_k = 16;
    } else {
        offA = ((lane & 7) + (lane >> 4) * 8) * GM_LDK + wm * 64 + ((lane >> 3) & 1) * 8;
        stepA_m = 16;
        stepA_k = 16 * GM_LDK;
    }
    if (!g.b.kmajor) {
        offB = (wn * 32 + (lane & 7) + (lane >> 4) * 8) * GM_LDR + ((lane >> 3) & 1) * 8;
        stepB_n = 16 * GM_LDR;
        stepB_k = 16;
    } else {
        offB = ((lane & 7) + ((lane >> 3) & 1) * 8) * GM_LDK + wn * 32 + (lane >> 4) * 8;
        stepB_n = 16;
        stepB_k = 16 * GM_LDK;
    }

    float acc[4][4][4];
#pragma unroll
    for (int mf = 0; mf < 4; mf++)
#pragma unroll
        for (int nf = 0; nf < 4; nf++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[mf][nf][c] = 0.f;

    for (int kt = 0; kt < nk; kt++) {
        /* tile kt has landed (at most GM_STAGES - 2 younger groups pending), and every warp
         * is done with tile kt - 1, whose slot the prefetch below overwrites */
        asm volatile("cp.async.wait_group %0;\n" ::"n"(GM_STAGES - 2) : "memory");
        __syncthreads();
        const int pf = kt + GM_STAGES - 1;
        if (pf < nk) {
            const int s = pf % GM_STAGES;
            gm_load(GM_A(s), g.a, srcA, rA, Mlim, pf * GM_BK, K);
            gm_load(GM_B(s), g.b, srcB, rB, Nlim, pf * GM_BK, K);
        }
        cp_async_commit();
        const __nv_bfloat16 *As = GM_A(kt % GM_STAGES) + offA;
        const __nv_bfloat16 *Bs = GM_B(kt % GM_STAGES) + offB;
#pragma unroll
        for (int ks = 0; ks < GM_BK / 16; ks++) {
            uint32_t bf[4][2];
#pragma unroll
            for (int p = 0; p < 2; p++) {
                uint32_t r[4];
                ldsm4(r, Bs + ks * stepB_k + p * stepB_n, g.b.kmajor);
                bf[2 * p][0] = r[0];
                bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2];
                bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mf = 0; mf < 4; mf++) {
                uint32_t af[4];
                ldsm4(af, As + ks * stepA_k + mf * stepA_m, g.a.kmajor);
#pragma unroll
                for (int nf = 0; nf < 4; nf++) mma_bf16(acc[mf][nf], af, bf[nf]);
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#undef GM_A
#undef GM_B

    /* thread element (mf, nf, c) is tile row wm*64 + mf*16 + gid + 8*(c/2), tile column
     * wn*32 + nf*8 + 2*tq + c%2. Row-wise epilogues first park the tile in shared memory
     * (over the drained operand ring) so that each warp then reads and writes whole rows
     * with wide coalesced accesses; a warp owns rows warp, warp + 8, ... */
    if (g.epi != EPI_ACCUM) {
        float *C = (float *)gm_smem; /* [GM_BM][GM_LDC] */
        __syncthreads();
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int nf = 0; nf < 4; nf++)
#pragma unroll
                for (int half = 0; half < 2; half++)
                    *(float2 *)&C[(wm * 64 + mf * 16 + half * 8 + gid) * GM_LDC + wn * 32 + nf * 8 + 2 * tq] =
                        make_float2(acc[mf][nf][2 * half], acc[mf][nf][2 * half + 1]);
        __syncthreads();
        const int rows = Mlim < GM_BM ? Mlim : GM_BM;
        if (g.epi == EPI_SWIGLU) {
            /* tile column j holds unit ctile*64 + (j/16)*8 + j%8, of u when (j/8) is odd;
             * lane l takes units t = 2l, 2l+1 of the tile's 64 */
            const int h = g.h, t = 2 * lane;
            const int unit = ctile * (GM_BN / 2) + t;
            const int jg = (t >> 3) * 16 + (t & 7);
            for (int rr = warp; rr < rows; rr += GM_THREADS / 32) {
                const int p = base + m0 + rr;
                const float2 gv = *(const float2 *)&C[rr * GM_LDC + jg];
                const float2 uv = *(const float2 *)&C[rr * GM_LDC + jg + 8];
                const float a0 = gv.x / (1.f + expf(-gv.x)) * uv.x, a1 = gv.y / (1.f + expf(-gv.y)) * uv.y;
                float *sv = g.save_out + (long long)g.clist[p] * 3 * h;
                __nv_bfloat16 *av = g.act_out + (long long)p * g.ld_act;
                if ((h & 1) == 0 && unit + 1 < h) {
                    *(float2 *)(sv + unit) = gv;
                    *(float2 *)(sv + h + unit) = uv;
                    *(__nv_bfloat162 *)(av + unit) = __floats2bfloat162_rn(a0, a1);
                } else {
                    if (unit < h) {
                        sv[unit] = gv.x;
                        sv[h + unit] = uv.x;
                        av[unit] = __float2bfloat16_rn(a0);
                    }
                    if (unit + 1 < h) {
                        sv[unit + 1] = gv.y;
                        sv[h + unit + 1] = uv.y;
                        av[unit + 1] = __float2bfloat16_rn(a1);
                    }
                }
            }
        } else if (g.epi == EPI_SCATTER) {
            const int j = 4 * lane, n = n0 + j;
            for (int rr = warp; rr < rows; rr += GM_THREADS / 32) {
                const float4 v = *(const float4 *)&C[rr * GM_LDC + j];
                float *crow = g.c + (long long)g.clist[base + m0 + rr] * g.ldc;
                if (g.cvec && n + 3 < g.N) {
                    *(float4 *)(crow + n) = v;
                } else {
                    if (n < g.N) crow[n] = v.x;
                    if (n + 1 < g.N) crow[n + 1] = v.y;
                    if (n + 2 < g.N) crow[n + 2] = v.z;
                    if (n + 3 < g.N) crow[n + 3] = v.w;
                }
            }
        } else { /* EPI_SWIGLU_BWD */
            /* C = da0 = w2 dy for hidden units n0 + j; dpre = the SwiGLU adjoint scaled by
             * the gate, act_out = gate act (the A operand of dw2); the row's act . da0 over
             * this tile (lane partials of 4, then a fixed butterfly) goes to
             * part[pos][ctile] */
            const int h = g.h, j = 4 * lane, m = n0 + j;
            for (int rr = warp; rr < rows; rr += GM_THREADS / 32) {
                const int p = base + m0 + rr;
                const int a = g.clist[p];
                const float gt = g.gate[a];
                const float *sv = g.save_in + (long long)a * 3 * h;
                __nv_bfloat16 *dp = g.dpre + (long long)p * g.ld_dpre;
                __nv_bfloat16 *av = g.act_out + (long long)p * g.ld_act;
                const float4 d4 = *(const float4 *)&C[rr * GM_LDC + j];
                const float d0[4] = {d4.x, d4.y, d4.z, d4.w};
                float gg[4], uu[4], aa[4], dg[4], du[4];
                const int nv = h - m < 4 ? h - m : 4; /* valid of the 4 (<= 0: none) */
                if ((h & 3) == 0 && nv == 4) {
                    const float4 g4 = *(const float4 *)(sv + m), u4 = *(const float4 *)(sv + h + m);
                    gg[0] = g4.x, gg[1] = g4.y, gg[2] = g4.z, gg[3] = g4.w;
                    uu[0] = u4.x, uu[1] = u4.y, uu[2] = u4.z, uu[3] = u4.w;
                } else {
#pragma unroll
                    for (int u = 0; u < 4; u++) {
                        gg[u] = u < nv ? sv[m + u] : 0.f;
                        uu[u] = u < nv ? sv[h + m + u] : 0.f;
                    }
                }
                float dot = 0.f;
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    /* the activation as EPI_SWIGLU computes it (0 in the padding, where
                     * g = u = 0) */
                    aa[u] = gg[u] / (1.f + expf(-gg[u])) * uu[u];
                    const float sg = 1.f / (1.f + expf(-gg[u]));
                    const float da = gt * d0[u];
                    dg[u] = da * uu[u] * sg * (1.f + gg[u] * (1.f - sg));
                    du[u] = da * gg[u] * sg;
                    dot += aa[u] * d0[u];
                }
                if ((h & 3) == 0 && nv == 4) {
                    uint2 w;
                    __nv_bfloat162 b;
                    b = __floats2bfloat162_rn(dg[0], dg[1]);
                    memcpy(&w.x, &b, 4);
                    b = __floats2bfloat162_rn(dg[2], dg[3]);
                    memcpy(&w.y, &b, 4);
                    *(uint2 *)(dp + m) = w;
                    b = __floats2bfloat162_rn(du[0], du[1]);
                    memcpy(&w.x, &b, 4);
                    b = __floats2bfloat162_rn(du[2], du[3]);
                    memcpy(&w.y, &b, 4);
                    *(uint2 *)(dp + h + m) = w;
                    b = __floats2bfloat162_rn(aa[0] * gt, aa[1] * gt);
                    memcpy(&w.x, &b, 4);
                    b = __floats2bfloat162_rn(aa[2] * gt, aa[3] * gt);
                    memcpy(&w.y, &b, 4);
                    *(uint2 *)(av + m) = w;
                } else {
#pragma unroll
                    for (int u = 0; u < 4; u++)
                        if (u < nv) {
                            dp[m + u] = __float2bfloat16_rn(dg[u]);
                            dp[h + m + u] = __float2bfloat16_rn(du[u]);
                            av[m + u] = __float2bfloat16_rn(aa[u] * gt);
                        }
                }
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL_MASK, dot, o);
                if (lane == 0) g.part[(long long)p * g.ctiles + ctile] = dot;
            }
        }
    } else { /* EPI_ACCUM */
        float *cm = g.c + (long long)e * g.cestride;
#pragma unroll
        for (int mf = 0; mf < 4; mf++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int rr = wm * 64 + mf * 16 + half * 8 + gid;
                if (rr >= Mlim) continue;
                float *crow = cm + (long long)(m0 + rr) * g.ldc;
#pragma unroll
                for (int nf = 0; nf < 4; nf++)
#pragma unroll
                    for (int c = 0; c < 2; c++) {
                        const int n = n0 + wn * 32 + nf * 8 + tq * 2 + c;
                        if (n < g.N) crow[n] += acc[mf][nf][half * 2 + c];
                    }
            }
    }
}

/* GM_ROWS: 1-D grid of (upper bound on row tiles) x ctiles; GM_WGRAD: (output tiles, E) */
void moe_gemm_launch(const gm_args *g, int nk)
{
    static int attr_set;
    if (!attr_set) {
        CUDA_CHECK(cudaFuncSetAttribute(grouped_gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, GM_SMEM));
        attr_set = 1;
    }
    dim3 grid;
    if (g->shape == GM_ROWS)
        grid = dim3((unsigned)(((size_t)(nk + GM_BM - 1) / GM_BM + g->E) * g->ctiles));
    else
        grid = dim3(ceil_div_u(g->M, GM_BM) * ceil_div_u(g->N, GM_BN), (unsigned)g->E);
    grouped_gemm_kernel<<<grid, GM_THREADS, GM_SMEM, cuda_stream()>>>(*g);
    LAUNCH_CHECK();
}
