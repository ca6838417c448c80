/* moe_gemm.cuh: the grouped expert GEMM of moe_gemm.cu as moe_experts.cu drives it: tile
 * shape, operand and argument descriptions, and the launcher. */
#ifndef DELTAMLA_MOE_GEMM_CUH
#define DELTAMLA_MOE_GEMM_CUH

#include <cuda_bf16.h>

/* ---- grouped GEMM ---- */
#define GM_BM 128
#define GM_BN 128
#define GM_BK 64     /* 64 and 3 stages measured ~1% faster than 32 and 4 */
#define GM_STAGES 3  /* 110.6 KB of shared memory: two blocks per SM */
#define GM_LDR (GM_BK + 8)       /* bf16 per shared row of a k-contiguous tile [128][BK] */
#define GM_LDK (GM_BM + 8)       /* bf16 per shared row of an r-contiguous tile [BK][128] */
#define GM_TILE (GM_BM * GM_LDR) /* bf16 per operand and stage (>= GM_BK * GM_LDK) */
#define GM_CHUNKS (GM_BM * GM_BK / 8 / GM_THREADS) /* 16-byte chunks per thread, operand and stage */
#define GM_SMEM (GM_STAGES * 2 * GM_TILE * (int)sizeof(__nv_bfloat16))
#define GM_LDC (GM_BN + 4)      /* floats per shared row of the parked output tile */
#define GM_THREADS 256 /* 8 warps: 2 along M x 4 along N, 64 x 32 outputs each */
/* the pads make ldmatrix rows (80 and 272 bytes apart) conflict-free */
static_assert(GM_BK * GM_LDK <= GM_TILE, "an r-contiguous tile fits a stage");
static_assert(GM_BM * GM_LDC * sizeof(float) <= GM_SMEM, "the parked output tile fits the operand ring");

/* ---- grouped GEMM: C_e = A_e B_e for every expert e, bf16 mma.sync, fp32 accumulate ----
 *
 * Every operand is a bf16 buffer prepared for this kernel (routed rows gathered into
 * expert-sorted order, weights converted once per call), with rows padded to a multiple
 * of 8 elements and zeros in the padding, so every 16-byte chunk is aligned and entirely
 * valid or entirely masked. Tiles travel by cp.async through a GM_STAGES-deep ring in
 * dynamic shared memory and reach the mma fragments by ldmatrix. An operand is either
 *   k-contiguous (kmajor 0): element (r, k) at src[(r0 + r) * ld + k], a [128][32] tile;
 *   r-contiguous (kmajor 1): element (r, k) at src[k * ld + r0 + r], a [32][128] tile,
 *                            read with ldmatrix .trans;
 * src is the expert's matrix (weights) or the expert's first sorted row (activations). */

enum { GM_ROWS = 0, GM_WGRAD = 1 };
enum { EPI_SWIGLU = 0, EPI_SCATTER = 1, EPI_SWIGLU_BWD = 2, EPI_ACCUM = 3 };

typedef struct gm_operand {
    const __nv_bfloat16 *base; /* expert 0's matrix, or the sorted activation buffer */
    long long estride;         /* elements between experts' matrices */
    int act;                   /* 1: rows start at the expert's first sorted position */
    int ld;                    /* elements per source row, a multiple of 8 */
    int kmajor;                /* see above */
    int ext;                   /* extent of the contiguous dimension: a multiple of 8, zeros past
                                * the true size */
} gm_operand;

typedef struct gm_args {
    gm_operand a, b;
    int shape, epi;
    int E, M, N, K;     /* GM_ROWS: N, K (M = the expert's count); GM_WGRAD: M, N (K = count) */
    int ctiles;         /* GM_ROWS: column tiles */
    const int *cnt, *off, *toff;
    float *c;           /* EPI_SCATTER: rows clist[pos]; EPI_ACCUM: expert e at c + e * cestride */
    int ldc, cvec;      /* cvec: EPI_SCATTER rows take float4 stores */
    long long cestride;
    const int *clist;   /* sorted position -> assignment */
    int h;              /* expert hidden width (SwiGLU epilogues) */
    float *save_out;    /* EPI_SWIGLU */
    __nv_bfloat16 *act_out; /* EPI_SWIGLU: act [pos][ld_act]; EPI_SWIGLU_BWD: gate act */
    int ld_act;
    const float *save_in, *gate; /* EPI_SWIGLU_BWD */
    __nv_bfloat16 *dpre;         /* EPI_SWIGLU_BWD: [pos][ld_dpre] */
    int ld_dpre;
    float *part;
} gm_args;

/* One grouped GEMM over all experts on the backend stream; nk = routed assignments. */
void moe_gemm_launch(const gm_args *g, int nk);

#endif
