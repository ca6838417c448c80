/* gdn_mma.cuh: the GDN kernels' warp-tile products on the tensor cores (mma.sync
 * m16n8k8, TF32 or 3xTF32), their fragments read from shared memory by scalar loads or by
 * ldmatrix, and the rounding of operands to TF32.
 * Included by gdn_internal.cuh (after the sizes and index helpers it uses); the design of
 * the GDN kernels is described there. */
#ifndef DELTAMLA_GDN_MMA_CUH
#define DELTAMLA_GDN_MMA_CUH

/* ---- warp-tile products on the tensor cores ----
 * Every product is a sum of warp tiles of 16 rows x 32 columns (x 48 in the _n forms
 * with nt = 6), computed by mma.sync.m16n8k8 with TF32 operands and fp32 accumulation:
 * four (nt) n8 tiles per k step of 8. A thread's results acc[j][r] lie at row m0 + g + 8 (r >> 1) and column
 * n0 + 8 j + 2 q + (r & 1), g = lane / 4, q = lane % 4 (gdn_frow, gdn_fcol).
 * split 3 is 3xTF32: each operand x = hi + lo with hi = tf32(x), lo = tf32(x - hi), and
 * the product is lo*hi + hi*lo + hi*hi, which loses only lo*lo and the rounding of lo
 * (about 2^-22 relative, fp32-like); split 1 is plain TF32 (2^-11), the default. */
#ifndef GDN_SPLIT_PAIR
#define GDN_SPLIT_PAIR 1  /* K K^T, Qs K^T, and the grads kernel's X W^T, dO W^T */
#endif
#ifndef GDN_SPLIT_SOLVE
#define GDN_SPLIT_SOLVE 1 /* products with T and M: Wv, Uk, Xk, Xo, W, M W, M^T dO */
#endif
#ifndef GDN_SPLIT_STATE
#define GDN_SPLIT_STATE 1 /* the state kernels' chunk-to-chunk recurrences */
#endif
#ifndef GDN_SPLIT_S0
#define GDN_SPLIT_S0 1    /* per-chunk products with S0 or dS: Qs S0, K S0, Hc, dO S0^T, ... */
#endif
#ifndef GDN_SPLIT_GRAD
#define GDN_SPLIT_GRAD 1  /* the grads kernel's dq, dk from dKK and dQK */
#endif

static __device__ __forceinline__ int gdn_frow(int m0, int r)
{
    return m0 + (int)((threadIdx.x & 31) >> 2) + ((r >> 1) << 3);
}
static __device__ __forceinline__ int gdn_fcol(int n0, int j, int r)
{
    return n0 + 8 * j + 2 * (int)(threadIdx.x & 3) + (r & 1);
}

/* x rounded to TF32, to nearest with ties away from zero: the bits of cvt.rna.tf32.f32
 * for every finite x, by two integer ops (add half an ulp of the 10-bit mantissa to the
 * magnitude, clear the 13 low bits). Conversions issue at a quarter of the integer rate
 * on sm_90, and every mma.sync here takes six operand conversions; the integer form took
 * the op from 4.37 to 4.29 ms forward + backward (B 8, T 2048, H 12, D 85, an H100). */
static __device__ __forceinline__ uint32_t gdn_to_tf32(float x)
{
    return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
}

/* Operands stored already rounded to TF32 (plain TF32 only): a product's split may carry
 * GDN_PRE_A and/or GDN_PRE_B, and then that operand's fragments are taken as they lie,
 * without the two rounding instructions per element (the rounding is idempotent, so the
 * bits are the same). The state kernels' products take their operands so (see
 * gdn_state_split): their A operands (Uk, Xk and K, written by the prep kernels) and the
 * B operand of the state update (eL W or e0 beta X, written by the state kernel), all
 * stored through gdn_state_op, which rounds them when the state products run in plain
 * TF32 and leaves them whole for 3xTF32. */
#define GDN_PRE_A 16
#define GDN_PRE_B 32

/* the state kernels' split with its pre-rounded operands (GDN_PRE_A: Uk, Xk, K; with
 * pre_b also GDN_PRE_B) */
#define GDN_STATE_PRE (GDN_SPLIT_STATE == 1)
static __host__ __device__ __forceinline__ int gdn_state_split(int pre_b)
{
    return GDN_SPLIT_STATE | (GDN_STATE_PRE ? GDN_PRE_A | (pre_b ? GDN_PRE_B : 0) : 0);
}

/* an operand of the state products as stored (see GDN_PRE_A) */
static __device__ __forceinline__ float gdn_state_op(float x)
{
    return GDN_STATE_PRE ? __uint_as_float(gdn_to_tf32(x)) : x;
}

/* hi (and lo when split is 3) of n floats; pre: x already TF32 (split 1 only) */
static __device__ __forceinline__ void gdn_split_n(int split, int pre, const float *x, uint32_t *hi, uint32_t *lo,
                                                   int n)
{
#pragma unroll
    for (int i = 0; i < n; i++) {
        hi[i] = pre ? __float_as_uint(x[i]) : gdn_to_tf32(x[i]);
        lo[i] = (split & 3) == 3 ? gdn_to_tf32(x[i] - __uint_as_float(hi[i])) : 0u;
    }
}

static __device__ __forceinline__ void gdn_mma_tf32(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* c += a b in the chosen precision, the small terms first */
static __device__ __forceinline__ void gdn_mma_x(int split, float c[4], const uint32_t ah[4], const uint32_t al[4],
                                                 const uint32_t bh[2], const uint32_t bl[2])
{
    if ((split & 3) == 3) {
        gdn_mma_tf32(c, al, bh);
        gdn_mma_tf32(c, ah, bl);
    }
    gdn_mma_tf32(c, ah, bh);
}

/* Where a warp reads its fragments: A(m, k) = A[m*ars + k*aks], B(k, n) = B[k*bks + n*bcs].
 * Rows past mlast and columns past nlast read row mlast and column nlast instead (valid
 * memory; the caller discards those results). The contraction runs over k = kb, kb + 8,
 * ... while k < ke, so it reads up to k = roundup8(ke) - 1: the caller guarantees that
 * this memory exists, holds finite values, and that A or B is zero there.
 * An operand whose contraction index is contiguous (aks == 1 for A, bks == 1 for B: rows
 * of A, and rows of B^T, in shared memory; every call site passes its strides as
 * constants, so the choice is made at compile time) is read by ldmatrix: one
 * ldmatrix.x4 brings the four 8 x 4 blocks of an A fragment, or the two blocks of each of
 * two B fragments, where scalar loads took 4 and 8 instructions. ldmatrix moves 8 x 8
 * blocks of 16-bit elements, so that lane l receives 16-bit elements 2 (l % 4) and
 * 2 (l % 4) + 1 of row l / 4 of a block: for 32-bit elements that is element l % 4 of row
 * l / 4 of an 8 x 4 block, which is where mma.m16n8k8.tf32 wants it. It needs each row of
 * 4 floats 16-byte aligned (row pitches and panel offsets multiples of 4 floats, as all
 * are here); the pitches of 4 mod 8 that spread the scalar loads over 32 banks do the same
 * for its 8 rows of 16 bytes. */
#define GDN_NTW 6 /* the most n-tiles of 8 columns a warp tile has (16 x 48) */

typedef struct gdn_mpos {
    int a0, a1, a4;      /* offsets of rows g and g + 8 at k = kb + q; 4 steps of k */
    int b[GDN_NTW], b4;  /* offsets of column n0 + 8 j + g at k = kb + q; 4 steps of k */
    int a8, b8;
    int lda, ldb;        /* A, B read by ldmatrix (aks == 1, bks == 1) */
    int la, lb[GDN_NTW / 2]; /* ldmatrix: offset of the row this lane addresses (A; B n-tiles 2h, 2h + 1) */
} gdn_mpos;

/* the fragment positions of a warp tile of nt n-tiles (4: 16 x 32, the usual; 6: 16 x 48;
 * nt is a constant at every call site, so that the unused entries vanish) */
static __device__ __forceinline__ gdn_mpos gdn_mpos_at(int ars, int aks, int m0, int mlast, int bks, int bcs,
                                                       int n0, int nlast, int kb, int nt)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, mi = lane >> 3, rr = lane & 7;
    gdn_mpos p;
    p.a0 = gdn_imin(m0 + g, mlast) * ars + (kb + q) * aks;
    p.a1 = gdn_imin(m0 + g + 8, mlast) * ars + (kb + q) * aks;
    p.a4 = 4 * aks;
    p.a8 = 8 * aks;
#pragma unroll
    for (int j = 0; j < GDN_NTW; j++)
        if (j < nt) p.b[j] = gdn_imin(n0 + 8 * j + g, nlast) * bcs + (kb + q) * bks;
    p.b4 = 4 * bks;
    p.b8 = 8 * bks;
    p.lda = aks == 1;
    p.ldb = bks == 1;
    /* A: blocks (rows 0-7, k 0-3), (rows 8-15, k 0-3), (rows 0-7, k 4-7), (rows 8-15, k 4-7);
     * B: blocks (n-tile 2h, k 0-3), (n-tile 2h, k 4-7), (n-tile 2h + 1, k 0-3), (2h + 1, k 4-7) */
    p.la = gdn_imin(m0 + rr + 8 * (mi & 1), mlast) * ars + kb + 4 * (mi >> 1);
#pragma unroll
    for (int h = 0; h < GDN_NTW / 2; h++)
        if (2 * h < nt) p.lb[h] = gdn_imin(n0 + 8 * (2 * h + (mi >> 1)) + rr, nlast) * bcs + kb + 4 * (mi & 1);
    return p;
}

static __device__ __forceinline__ void gdn_mpos_step(gdn_mpos *p, int nt)
{
    p->a0 += p->a8;
    p->a1 += p->a8;
#pragma unroll
    for (int j = 0; j < GDN_NTW; j++)
        if (j < nt) p->b[j] += p->b8;
    p->la += 8;
#pragma unroll
    for (int h = 0; h < GDN_NTW / 2; h++)
        if (2 * h < nt) p->lb[h] += 8;
}

/* four 8 x 4 blocks of floats by one ldmatrix.x4 (cuda_ldsm4): lane l addresses row
 * l % 8 of block l / 8 */
static __device__ __forceinline__ void gdn_ldsm4(float x[4], const float *row)
{
    uint32_t r[4];
    cuda_ldsm4(r, row);
#pragma unroll
    for (int i = 0; i < 4; i++) x[i] = __uint_as_float(r[i]);
}

static __device__ __forceinline__ void gdn_afrag(int split, const float *A, const gdn_mpos *p, uint32_t ah[4],
                                                 uint32_t al[4])
{
    float x[4];
    if (p->lda) {
        gdn_ldsm4(x, A + p->la);
    } else {
        x[0] = A[p->a0];
        x[1] = A[p->a1];
        x[2] = A[p->a0 + p->a4];
        x[3] = A[p->a1 + p->a4];
    }
    gdn_split_n(split, (split & GDN_PRE_A) != 0, x, ah, al, 4);
}

/* the B fragments of the warp tile's nt n-tiles */
static __device__ __forceinline__ void gdn_bfrags(int split, const float *B, const gdn_mpos *p, uint32_t bh[][2],
                                                  uint32_t bl[][2], int nt)
{
#pragma unroll
    for (int j = 0; j < GDN_NTW; j += 2) {
        if (j >= nt) break;
        float x[4];
        if (p->ldb) {
            gdn_ldsm4(x, B + p->lb[j >> 1]);
        } else {
            x[0] = B[p->b[j]];
            x[1] = B[p->b[j] + p->b4];
            x[2] = B[p->b[j + 1]];
            x[3] = B[p->b[j + 1] + p->b4];
        }
        gdn_split_n(split, (split & GDN_PRE_B) != 0, x, bh[j], bl[j], 2);
        gdn_split_n(split, (split & GDN_PRE_B) != 0, x + 2, bh[j + 1], bl[j + 1], 2);
    }
}

/* acc += A B over the warp tile (m0, n0) of nt n-tiles, k in [kb, ke) */
static __device__ __forceinline__ void gdn_mma_n(int split, int nt, float acc[][4], const float *A, int ars, int aks,
                                                 int m0, int mlast, const float *B, int bks, int bcs, int n0,
                                                 int nlast, int kb, int ke)
{
    gdn_mpos p = gdn_mpos_at(ars, aks, m0, mlast, bks, bcs, n0, nlast, kb, nt);
#pragma unroll 2
    for (int k = kb; k < ke; k += 8) {
        uint32_t ah[4], al[4], bh[GDN_NTW][2], bl[GDN_NTW][2];
        gdn_afrag(split, A, &p, ah, al);
        gdn_bfrags(split, B, &p, bh, bl, nt);
#pragma unroll
        for (int j = 0; j < GDN_NTW; j++)
            if (j < nt) gdn_mma_x(split, acc[j], ah, al, bh[j], bl[j]);
        gdn_mpos_step(&p, nt);
    }
}

/* acc += A B over the warp tile (m0, n0) of 16 x 32, k in [kb, ke) */
static __device__ __forceinline__ void gdn_mma(int split, float acc[4][4], const float *A, int ars, int aks, int m0,
                                               int mlast, const float *B, int bks, int bcs, int n0, int nlast,
                                               int kb, int ke)
{
    gdn_mma_n(split, 4, acc, A, ars, aks, m0, mlast, B, bks, bcs, n0, nlast, kb, ke);
}

/* two products sharing B: acc1 += A1 B, acc2 += A2 B (A1, A2 alike strided), nt n-tiles */
static __device__ __forceinline__ void gdn_mma_2a_n(int split, int nt, float acc1[][4], float acc2[][4],
                                                    const float *A1, const float *A2, int ars, int aks, int m0,
                                                    int mlast, const float *B, int bks, int bcs, int n0, int nlast,
                                                    int kb, int ke)
{
    gdn_mpos p = gdn_mpos_at(ars, aks, m0, mlast, bks, bcs, n0, nlast, kb, nt);
#pragma unroll 1
    for (int k = kb; k < ke; k += 8) {
        uint32_t ah[4], al[4], eh[4], el[4], bh[GDN_NTW][2], bl[GDN_NTW][2];
        gdn_afrag(split, A1, &p, ah, al);
        gdn_afrag(split, A2, &p, eh, el);
        gdn_bfrags(split, B, &p, bh, bl, nt);
#pragma unroll
        for (int j = 0; j < GDN_NTW; j++)
            if (j < nt) {
                gdn_mma_x(split, acc1[j], ah, al, bh[j], bl[j]);
                gdn_mma_x(split, acc2[j], eh, el, bh[j], bl[j]);
            }
        gdn_mpos_step(&p, nt);
    }
}

static __device__ __forceinline__ void gdn_mma_2a(int split, float acc1[4][4], float acc2[4][4], const float *A1,
                                                  const float *A2, int ars, int aks, int m0, int mlast,
                                                  const float *B, int bks, int bcs, int n0, int nlast, int kb, int ke)
{
    gdn_mma_2a_n(split, 4, acc1, acc2, A1, A2, ars, aks, m0, mlast, B, bks, bcs, n0, nlast, kb, ke);
}

/* two products sharing A: acc1 += A B1, acc2 += A B2 (B1, B2 alike strided) */
static __device__ __forceinline__ void gdn_mma_2b(int split, float acc1[4][4], float acc2[4][4], const float *A,
                                                  int ars, int aks, int m0, int mlast, const float *B1,
                                                  const float *B2, int bks, int bcs, int n0, int nlast, int kb, int ke)
{
    gdn_mpos p = gdn_mpos_at(ars, aks, m0, mlast, bks, bcs, n0, nlast, kb, 4);
#pragma unroll 1
    for (int k = kb; k < ke; k += 8) {
        uint32_t ah[4], al[4], bh[4][2], bl[4][2], ch[4][2], cl[4][2];
        gdn_afrag(split, A, &p, ah, al);
        gdn_bfrags(split, B1, &p, bh, bl, 4);
        gdn_bfrags(split, B2, &p, ch, cl, 4);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            gdn_mma_x(split, acc1[j], ah, al, bh[j], bl[j]);
            gdn_mma_x(split, acc2[j], ah, al, ch[j], cl[j]);
        }
        gdn_mpos_step(&p, 4);
    }
}

static __device__ __forceinline__ void gdn_zero(float acc[4][4])
{
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
}

#endif
