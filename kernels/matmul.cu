/* matmul.cu: the dense Linear layer on the GPU, y = x W^T, and its two gradients,
 * as three cuBLAS GEMMs on bf16 tensor cores.
 *
 * Storage stays fp32. Each operand is first rounded to bf16 by one vectorised pass into
 * a buffer of this file, then cublasGemmEx multiplies bf16 x bf16 with fp32 accumulation
 * and fp32 output (CUBLAS_COMPUTE_32F). That is the rounding CUBLAS_COMPUTE_32F_FAST_16BF
 * does on fp32 operands, within about 1e-2 (relative, whole tensor) of the fp32 CPU
 * oracle, but cuBLAS then runs its bf16 kernels at full rate: for the model's shapes
 * (N = 16384 rows, widths 256 to 4096) the fp32-operand path ran at about 150 TFLOP/s.
 *
 * Forwards with at most 16 outputs run on CUDA cores in fp32, one pass over x
 * (matmul_narrow.cu, where cuda_narrow_ok allows). The projections that share one input
 * (the multi ops, at the end of this file) round it to bf16 once for all of them. Other
 * skinny products and those backwards (in or out at most MATMUL_SKINNY_WIDTH) run on the
 * fp32 operands in TF32 (see skinny_product). Small products (fewer than MATMUL_BF16_MIN_MACS multiply-adds, as
 * in the test configs) keep the first form: cublasGemmEx on the fp32 operands with CUBLAS_COMPUTE_32F_FAST_16BF,
 * where cuBLAS picks its own kernel (the rounding passes would cost more than they save).
 *
 * cuBLAS is column-major. A row-major [r, c] buffer read column-major is its transpose
 * [c, r] with leading dimension c, so every product below is written for the transposes
 * (y^T = W x^T and so on) and needs no copies:
 *   forward  y^T  [out, N]  = W [out, in] x^T [in, N]   : op(W^T buffer) = T, x^T = N
 *   dx       dx^T [in, N]  += W^T [in, out] dy^T [out, N]: both buffers as they lie
 *   dw       dw^T [in, out] += x^T [in, N] dy [N, out]   : x^T as it lies, dy^T buffer = T
 * The gradients use beta = 1, so cuBLAS adds into what the caller holds (the backward
 * contract accumulates). With beta = 0 the forward never reads y, so an uninitialised
 * (even NaN) output is fine. One handle on one stream with its default workspace gives
 * the same algorithm and the same bits run after run.
 *
 * The forward with a residual, y = r + x W^T (cuda_matmul_forward_add: a block's output
 * projection and MLP down projection, whose results the model adds to the residual
 * stream), adds r in the GEMM's epilogue: beta = 1 with r as C. An add_inplace afterwards
 * reads y back with r and writes y again (192 MiB at N = 16384, d = 1024, twice per
 * block) on top of the GEMM's traffic; reading r as C costs 64 MiB instead. cublasGemmEx
 * has C = D, so on the bf16-copy path the forward goes through cuBLASLt, which reads C and
 * writes D as separate buffers: r is read once, y written once, and y's old contents
 * (even NaN) never read; r = y is cuBLASLt's in-place form. Its descriptors and the
 * heuristic's algorithm are kept per shape and pointer alignment (fwd_plan) and every
 * call gets the same fixed workspace, so a shape runs the same algorithm, with the same
 * bits, every time. A shape cuBLASLt has no algorithm for (or one past the plan table),
 * and the small and skinny products that stay on cublasGemmEx's fp32 operands, copy r
 * into y (skipped when r = y) and accumulate with beta = 1: no saving over the add there
 * (the small ones are launch-bound, the skinny ones narrow), but the same contract.
 *
 * The fused SwiGLU MLP (mlp.cu) keeps its activation and SwiGLU gradient in bf16 between
 * GEMMs, so it enters the bf16 path past the rounding of those operands:
 * cuda_matmul_forward_bf16x (x in bf16, with or without a residual, through the same
 * plans) and cuda_matmul_backward_bf16x (dy and/or x in bf16), for the shapes that
 * cuda_matmul_bf16_path says take that path. The operands they get are the ones the
 * fp32 entry points would have rounded, so only cuBLAS's algorithm choice can differ.
 */
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "cuda_ops.h"
}

/* The bf16 copies of one call's operands; grows to the largest call and stays. */
static void *bf_buf;
static size_t bf_bytes;

static __nv_bfloat16 *bf_reserve(size_t elems)
{
    return (__nv_bfloat16 *)cuda_grow(&bf_buf, &bf_bytes, elems * sizeof(__nv_bfloat16));
}

/* dst[i] = bf16(src[i]), round to nearest even; four at a time where aligned */
static __global__ void to_bf16_kernel(__nv_bfloat16 *__restrict__ dst, const float *__restrict__ src, size_t n,
                                      int vec)
{
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec) {
        size_t n4 = n / 4;
        for (size_t j = i; j < n4; j += stride) {
            float4 v = ((const float4 *)src)[j];
            __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
            uint2 packed;
            packed.x = *(uint32_t *)&a;
            packed.y = *(uint32_t *)&b;
            ((uint2 *)dst)[j] = packed;
        }
        for (size_t j = n4 * 4 + i; j < n; j += stride) dst[j] = __float2bfloat16_rn(src[j]);
    } else {
        for (size_t j = i; j < n; j += stride) dst[j] = __float2bfloat16_rn(src[j]);
    }
}

extern "C" void cuda_to_bf16(__nv_bfloat16 *dst, const float *src, size_t n)
{
    if (!n) return;
    int vec = cuda_aligned16(src) && ((uintptr_t)dst % 8 == 0);
    size_t work = vec ? (n + 3) / 4 : n;
    int blocks = (int)((work + 255) / 256);
    int cap = 8 * cuda_num_sms();
    if (blocks > cap) blocks = cap;
    to_bf16_kernel<<<blocks, 256, 0, cuda_stream()>>>(dst, src, n, vec);
    LAUNCH_CHECK();
}

extern "C" void cuda_gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const __nv_bfloat16 *a,
                      int lda, const __nv_bfloat16 *b, int ldb, float beta, float *c, int ldc)
{
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, m, n, k, &alpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb,
                              &beta, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* cuda_gemm_bf16 with C written in bf16 (the fp32 accumulators rounded to nearest even),
 * beta 0 */
static void gemm_bf16_to_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const __nv_bfloat16 *a,
                              int lda, const __nv_bfloat16 *b, int ldb, __nv_bfloat16 *c, int ldc)
{
    const float alpha = 1.0f, beta = 0.0f;
    CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, m, n, k, &alpha, a, CUDA_R_16BF, lda, b, CUDA_R_16BF, ldb, &beta,
                              c, CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#define MATMUL_BF16_MIN_MACS ((size_t)1 << 27)

/* products with a width (in or out) this narrow are skinny: see skinny_product */
#define MATMUL_SKINNY_WIDTH 128

/* C [m, n] = op(A) op(B) + beta C on fp32 column-major buffers; compute: cuBLAS's bf16
 * fast mode (CUBLAS_COMPUTE_32F_FAST_16BF) or TF32 (CUBLAS_COMPUTE_32F_FAST_TF32) */
static void gemm_f32(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *a, int lda,
                     const float *b, int ldb, float beta, float *c, int ldc, cublasComputeType_t compute)
{
    const float alpha = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, m, n, k, &alpha, a, CUDA_R_32F, lda, b, CUDA_R_32F, ldb, &beta,
                              c, CUDA_R_32F, ldc, compute, CUBLAS_GEMM_DEFAULT));
}

extern "C" int cuda_matmul_small(size_t macs) { return macs < MATMUL_BF16_MIN_MACS; }

static int small_product(int N, int in, int out) { return cuda_matmul_small((size_t)N * in * out); }

/* A skinny product (the GDN gate projections' 12 outputs, the 64 and 128 of the MLA's
 * rope key and router) does a few multiply-adds per element of x: rounding x to bf16
 * first costs a pass over x that the product itself never pays back (the 1024 -> 12 GEMMs
 * ran at 5 TFLOP/s that way). It runs on the fp32 buffers in TF32 instead: one read of
 * each operand, and TF32 rounds less than bf16. */
static int skinny_product(int in, int out) { return in <= MATMUL_SKINNY_WIDTH || out <= MATMUL_SKINNY_WIDTH; }

extern "C" int cuda_matmul_bf16_path(int N, int in, int out)
{
    return N > 0 && in > 0 && out > 0 && !small_product(N, in, out) && !skinny_product(in, out);
}

/* One cuBLASLt plan of the forward with a residual (see the top): y^T [out, N] =
 * op(W^T buffer) x^T + r^T on bf16 W and x, fp32 r and y. Keyed by the shape and the
 * alignment of the four pointers, because the heuristic may only pick an algorithm whose
 * alignment needs the buffers meet (the weight's bf16 copy follows x's at a multiple of
 * 16 bytes, and a residual may start anywhere in its buffer). */
typedef struct fwd_plan {
    int N, in, out;
    unsigned align[4]; /* bytes, at most 256: W copy, x copy, r, y */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t lw, lx, ly;
    cublasLtMatmulAlgo_t algo;
    int found; /* 0: no algorithm; the caller copies r into y and uses cuda_gemm_bf16 */
} fwd_plan;
/* shapes are few (two or three fused projections per block type); past the table's end a
 * shape takes the copy + cuda_gemm_bf16 form, which is as deterministic */
#define FWD_PLANS 64
/* cuBLAS's recommended workspace for Hopper; fixed, so the heuristic's choice and the
 * bits do not depend on what else ran */
#define FWD_WORKSPACE ((size_t)32 << 20)
static cublasLtHandle_t fwd_lt;
static fwd_plan fwd_plans[FWD_PLANS];
static int n_fwd_plans;
static void *fwd_ws;
static size_t fwd_ws_bytes;

/* the largest power of two dividing p's address, at most 256 (cuBLASLt's default) */
static unsigned ptr_alignment(const void *p)
{
    unsigned a = 256;
    while (a > 1 && (uintptr_t)p % a) a /= 2;
    return a;
}

/* The plan for y [N, out] = r + x [N, in] w^T with these operand pointers, made on first
 * use; NULL when the table is full. Dies (CUBLAS_CHECK) if cuBLASLt fails outright. */
static const fwd_plan *fwd_plan_get(int N, int in, int out, const void *wb, const void *xb, const void *r, const void *y)
{
    const unsigned align[4] = {ptr_alignment(wb), ptr_alignment(xb), ptr_alignment(r), ptr_alignment(y)};
    for (int i = 0; i < n_fwd_plans; i++) {
        const fwd_plan *p = &fwd_plans[i];
        if (p->N == N && p->in == in && p->out == out && !memcmp(p->align, align, sizeof align)) return p;
    }
    if (n_fwd_plans == FWD_PLANS) return NULL;
    if (!fwd_lt) CUBLAS_CHECK(cublasLtCreate(&fwd_lt));
    fwd_plan p;
    memset(&p, 0, sizeof p);
    p.N = N, p.in = in, p.out = out;
    memcpy(p.align, align, sizeof align);
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    /* the buffers as stored, read column-major: W^T [in, out], x^T [in, N], r^T and y^T
     * [out, N] (one layout for C and D) */
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lw, CUDA_R_16BF, in, out, in));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lx, CUDA_R_16BF, in, N, in));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.ly, CUDA_R_32F, out, N, out));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = FWD_WORKSPACE;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) {
        const uint32_t a = align[i];
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &a, sizeof a));
    }
    cublasLtMatmulHeuristicResult_t res;
    int got = 0;
    /* a shape or alignment cuBLASLt has nothing for is reported through the status: the
     * fallback covers it, so it is not a CUBLAS_CHECK failure */
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(fwd_lt, p.op, p.lw, p.lx, p.ly, p.ly, pref, 1, &res,
                                                             &got);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    p.found = st == CUBLAS_STATUS_SUCCESS && got > 0;
    if (p.found) p.algo = res.algo;
    fwd_plans[n_fwd_plans] = p;
    return &fwd_plans[n_fwd_plans++];
}

/* r into y, the C that a beta = 1 GEMM then adds to; nothing when r is y */
static void residual_into(float *y, const float *r, size_t n)
{
    if (r != y) CUDA_CHECK(cudaMemcpyAsync(y, r, n * sizeof *y, cudaMemcpyDeviceToDevice, cuda_stream()));
}

/* The bf16 path's product: y [N, out] = xb [N, in] wb [out, in]^T (+ r [N, out] when r is
 * non-NULL: cuBLASLt with C = r where a plan has an algorithm, else r copied into y and
 * accumulated). xb, wb: the bf16 operands, already rounded. */
static void forward_bf16(float *y, const __nv_bfloat16 *xb, const __nv_bfloat16 *wb, const float *r, int N, int in,
                         int out)
{
    const fwd_plan *p = r ? fwd_plan_get(N, in, out, wb, xb, r, y) : NULL;
    if (p && p->found) {
        const float one = 1.0f;
        void *ws = cuda_grow(&fwd_ws, &fwd_ws_bytes, FWD_WORKSPACE);
        CUBLAS_CHECK(cublasLtMatmul(fwd_lt, p->op, &one, wb, p->lw, xb, p->lx, &one, r, p->ly, y, p->ly, &p->algo,
                                    ws, FWD_WORKSPACE, cuda_stream()));
        return;
    }
    if (r) residual_into(y, r, (size_t)N * out);
    cuda_gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, wb, in, xb, in, r ? 1.0f : 0.0f, y, out);
}

/* y [N, out] = x [N, in] w [out, in]^T, plus r [N, out] when r is non-NULL (r = y allowed,
 * otherwise no overlap); overwrites y. Device pointers. With r NULL this is the plain
 * forward (beta 0: y is never read). */
static void matmul_forward(float *y, const float *x, const float *w, const float *r, int N, int in, int out)
{
    if (N <= 0 || out <= 0) return;
    const size_t ny = (size_t)N * out;
    const float beta = r ? 1.0f : 0.0f;
    if (in <= 0) { /* an empty sum: y is r, or all zeros */
        if (r) residual_into(y, r, ny);
        else CUDA_CHECK(cudaMemsetAsync(y, 0, ny * sizeof *y, cuda_stream()));
        return;
    }
    if (cuda_narrow_ok(in, out, x, w)) {
        cuda_narrow_forward(y, x, w, r, N, in, out);
        return;
    }
    if (small_product(N, in, out) || skinny_product(in, out)) {
        const cublasComputeType_t compute =
            small_product(N, in, out) ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F_FAST_TF32;
        if (r) residual_into(y, r, ny);
        gemm_f32(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, w, in, x, in, beta, y, out, compute);
        return;
    }
    size_t nx = cuda_round8((size_t)N * in), nw = cuda_round8((size_t)out * in);
    __nv_bfloat16 *xb = bf_reserve(nx + nw), *wb = xb + nx;
    cuda_to_bf16(xb, x, (size_t)N * in);
    cuda_to_bf16(wb, w, (size_t)out * in);
    forward_bf16(y, xb, wb, r, N, in, out);
}

/* y [N, out] = x [N, in] w [out, in]^T; overwrites y. Device pointers. */
extern "C" void cuda_matmul_forward(float *y, const float *x, const float *w, int N, int in, int out)
{
    matmul_forward(y, x, w, NULL, N, in, out);
}

/* y [N, out] = r [N, out] + x [N, in] w [out, in]^T; overwrites y; r may be y (then an
 * accumulate), otherwise it must not overlap y. Device pointers. */
extern "C" void cuda_matmul_forward_add(float *y, const float *x, const float *w, const float *r, int N, int in,
                                        int out)
{
    matmul_forward(y, x, w, r, N, in, out);
}

/* matmul_forward(_add) on an x the caller already holds in bf16 (the fused MLP's saved
 * activation, kernels/mlp.cu): y [N, out] = r + xb [N, in] w [out, in]^T, or without r
 * when r is NULL; r may be y. Only for shapes on the bf16 path (cuda_matmul_bf16_path):
 * those are the ones whose operand matmul_forward would round, and the bits are those of
 * matmul_forward on the fp32 x that rounds to xb, up to cuBLAS's choice of algorithm
 * (the plan is keyed by the pointers' alignment). Device pointers. */
extern "C" void cuda_matmul_forward_bf16x(float *y, const __nv_bfloat16 *xb, const float *w, const float *r, int N,
                                          int in, int out)
{
    fatal_check(cuda_matmul_bf16_path(N, in, out));
    __nv_bfloat16 *wb = bf_reserve(cuda_round8((size_t)out * in));
    cuda_to_bf16(wb, w, (size_t)out * in);
    forward_bf16(y, xb, wb, r, N, in, out);
}

/* y = xb w^T in bf16 from x in bf16 (xb) or fp32 (x, rounded here; xb NULL) */
static void forward_bf16y(__nv_bfloat16 *y, const float *x, const __nv_bfloat16 *xb, const float *w, int N, int in,
                          int out)
{
    fatal_check(cuda_matmul_bf16_path(N, in, out));
    size_t nx = xb ? 0 : cuda_round8((size_t)N * in), nw = cuda_round8((size_t)out * in);
    __nv_bfloat16 *buf = bf_reserve(nx + nw), *wb = buf + nx;
    if (!xb) {
        cuda_to_bf16(buf, x, (size_t)N * in);
        xb = buf;
    }
    cuda_to_bf16(wb, w, (size_t)out * in);
    gemm_bf16_to_bf16(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, wb, in, xb, in, y, out);
}

extern "C" void cuda_matmul_forward_bf16y(__nv_bfloat16 *y, const float *x, const float *w, int N, int in, int out)
{
    forward_bf16y(y, x, NULL, w, N, in, out);
}

/* as cuda_matmul_forward_bf16y, with x given in bf16 */
extern "C" void cuda_matmul_forward_bf16xy(__nv_bfloat16 *y, const __nv_bfloat16 *xb, const float *w, int N, int in,
                                           int out)
{
    forward_bf16y(y, NULL, xb, w, N, in, out);
}

/* The bf16 path of the backward: dx [N, in] = dx_beta dx + dy w (skipped when dx is
 * NULL; written in bf16 to dxb instead when dxb is non-NULL, beta 0), dw [out, in] +=
 * dy^T x (skipped when dw is NULL). dy and x each come either as fp32 (dy, x: rounded
 * here into bf_buf) or already rounded (dyb, xb non-NULL: used as they are, the fp32
 * pointer ignored). Copies are packed dy, w, x as they always were. */
static void backward_bf16(float *dx, __nv_bfloat16 *dxb, float *dw, const float *dy, const __nv_bfloat16 *dyb,
                          const float *x, const __nv_bfloat16 *xb, const float *w, int N, int in, int out,
                          float dx_beta)
{
    size_t ny = dyb ? 0 : cuda_round8((size_t)N * out), nx = dw && !xb ? cuda_round8((size_t)N * in) : 0;
    size_t nw = dx || dxb ? cuda_round8((size_t)out * in) : 0;
    __nv_bfloat16 *buf = bf_reserve(ny + nx + nw), *rest = buf + ny;
    if (!dyb) {
        cuda_to_bf16(buf, dy, (size_t)N * out);
        dyb = buf;
    }
    if (dx || dxb) {
        cuda_to_bf16(rest, w, (size_t)out * in);
        if (dxb) gemm_bf16_to_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, rest, in, dyb, out, dxb, in);
        else cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, rest, in, dyb, out, dx_beta, dx, in);
        rest += nw;
    }
    if (dw) {
        if (!xb) {
            cuda_to_bf16(rest, x, (size_t)N * in);
            xb = rest;
        }
        cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, xb, in, dyb, out, 1.0f, dw, in);
    }
}

/* matmul_backward (dx_beta 1) or matmul_backward_set (dx_beta 0) with dy and/or x given
 * in bf16 (see backward_bf16; the fused MLP's saved activation and SwiGLU gradient).
 * Only for shapes on the bf16 path (cuda_matmul_bf16_path); the bits are those of the
 * fp32 op on the values that round to the bf16 operands. Device pointers. */
extern "C" void cuda_matmul_backward_bf16x(float *dx, float *dw, const float *dy, const __nv_bfloat16 *dyb,
                                           const float *x, const __nv_bfloat16 *xb, const float *w, int N, int in,
                                           int out, float dx_beta)
{
    fatal_check(cuda_matmul_bf16_path(N, in, out));
    if (!dx && !dw) return;
    backward_bf16(dx, NULL, dw, dy, dyb, x, xb, w, N, in, out, dx_beta);
}

/* cuda_matmul_backward_bf16x's product with dx written in bf16 (the fused MLP's dact,
 * which the SwiGLU gradient reads): dx_beta 0, dy in fp32, x in bf16. */
extern "C" void cuda_matmul_backward_bf16dx(__nv_bfloat16 *dxb, float *dw, const float *dy, const __nv_bfloat16 *xb,
                                            const float *w, int N, int in, int out)
{
    fatal_check(cuda_matmul_bf16_path(N, in, out));
    backward_bf16(NULL, dxb, dw, dy, NULL, NULL, xb, w, N, in, out, 0.0f);
}

/* dx [N, in] = dx_beta dx + dy [N, out] w [out, in] (skipped when dx is NULL);
 * dw [out, in] += dy^T x (skipped when dw is NULL). Device pointers. */
static void matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w, int N, int in,
                            int out, float dx_beta)
{
    if (dx && dx_beta == 0.0f && N > 0 && in > 0 && out <= 0) /* dx = an empty sum */
        CUDA_CHECK(cudaMemsetAsync(dx, 0, (size_t)N * in * sizeof *dx, cuda_stream()));
    if (N <= 0 || in <= 0 || out <= 0) return; /* every sum is empty: nothing to add */
    if (!dx && !dw) return;
    if (small_product(N, in, out)) {
        const cublasComputeType_t bf = CUBLAS_COMPUTE_32F_FAST_16BF;
        if (dx) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, dx_beta, dx, in, bf);
        if (dw) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in, bf);
        return;
    }
    if (skinny_product(in, out)) {
        const cublasComputeType_t tf32 = CUBLAS_COMPUTE_32F_FAST_TF32;
        if (dx) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, w, in, dy, out, dx_beta, dx, in, tf32);
        if (dw) gemm_f32(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, 1.0f, dw, in, tf32);
        return;
    }
    backward_bf16(dx, NULL, dw, dy, NULL, x, NULL, w, N, in, out, dx_beta);
}

/* dx [N, in] += dy [N, out] w [out, in] (skipped when dx is NULL);
 * dw [out, in] += dy^T x (skipped when dw is NULL). Device pointers. */
extern "C" void cuda_matmul_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                     int N, int in, int out)
{
    matmul_backward(dx, dw, dy, x, w, N, in, out, 1.0f);
}

/* as cuda_matmul_backward, but dx = dy w (beta 0: dx is not read, its old contents,
 * even NaN, do not matter) */
extern "C" void cuda_matmul_backward_set(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                         int N, int in, int out)
{
    matmul_backward(dx, dw, dy, x, w, N, in, out, 0.0f);
}

/* ---- several Linear layers on one input (matmul_forward_multi, matmul_backward_multi) ----
 * Where some part is on the bf16 path (so x would be rounded anyway), x is rounded to bf16
 * once for all parts, and every part multiplies that copy (a skinny or narrow part then
 * runs in bf16 like the rest, not on the fp32 x). The forward runs each part with at
 * least MATMUL_SKINNY_WIDTH outputs as its own GEMM, writing its y, and the narrower parts
 * together as one GEMM over their weights stacked into [S, in], whose [N, S] result is
 * split into their y's (one pass over x for both GDN gates). The backward
 * stacks every part: dy's side by side as bf16 [N, S] (one packing pass), the weights as
 * bf16 [S, in]; then dx = dy_all w_all is one GEMM with S-long sums (one pass over dx
 * instead of one per part), and dw_all = dy_all^T x one GEMM into scratch, added to
 * each part's dw. Otherwise (only small or skinny parts, as in the tests' small
 * configs) each part runs matmul_forward / matmul_backward on its own. */

/* up to MATMUL_PARTS_MAX column blocks of an [N, S] matrix: block i is columns
 * at[i]..at[i+1]-1, stored as its own [N, at[i+1] - at[i]] buffer ptr[i] */
typedef struct col_blocks {
    float *ptr[MATMUL_PARTS_MAX];
    int at[MATMUL_PARTS_MAX + 1];
    int n;
} col_blocks;

static __device__ __forceinline__ int col_block_of(const col_blocks &b, int c)
{
    int i = 0;
    while (i + 1 < b.n && c >= b.at[i + 1]) i++;
    return i;
}

/* The three kernels below take a row per warp (grid-stride) and its columns by lane: no
 * element index is split by a row length. */
static __device__ __forceinline__ int warp_row(void)
{
    return (int)(blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32);
}
static __device__ __forceinline__ int warp_rows(void) { return (int)(gridDim.x * (blockDim.x / 32)); }
static __device__ __forceinline__ int lane_id(void) { return (int)(threadIdx.x % 32); }

/* b's buffers from the [N, S] matrix src (S = b.at[b.n]) */
static __global__ void split_cols_kernel(col_blocks b, const float *__restrict__ src, int N)
{
    const int S = b.at[b.n];
    for (int r = warp_row(); r < N; r += warp_rows())
        for (int c = lane_id(); c < S; c += 32) {
            const int i = col_block_of(b, c), w = b.at[i + 1] - b.at[i];
            b.ptr[i][(size_t)r * w + c - b.at[i]] = src[(size_t)r * S + c];
        }
}

/* the [N, S] bf16 matrix dst from b's fp32 buffers */
static __global__ void pack_cols_bf16_kernel(__nv_bfloat16 *__restrict__ dst, col_blocks b, int N)
{
    const int S = b.at[b.n];
    for (int r = warp_row(); r < N; r += warp_rows())
        for (int c = lane_id(); c < S; c += 32) {
            const int i = col_block_of(b, c), w = b.at[i + 1] - b.at[i];
            dst[(size_t)r * S + c] = __float2bfloat16_rn(b.ptr[i][(size_t)r * w + c - b.at[i]]);
        }
}

/* b's buffers (row blocks of an [S, in] matrix here: rows at[i].., [rows, in] each, NULL
 * to skip) += src [S, in] */
static __global__ void add_rows_kernel(col_blocks b, const float *__restrict__ src, int in)
{
    for (int r = warp_row(); r < b.at[b.n]; r += warp_rows()) {
        const int i = col_block_of(b, r);
        if (!b.ptr[i]) continue;
        float *dst = b.ptr[i] + (size_t)(r - b.at[i]) * in;
        for (int c = lane_id(); c < in; c += 32) dst[c] += src[(size_t)r * in + c];
    }
}

/* blocks of 256 threads (8 rows at a time) for `rows` rows of the kernels above */
static int grid_for(int rows)
{
    const int blocks = (rows + 7) / 8, cap = 8 * cuda_num_sms();
    return blocks < 1 ? 1 : blocks > cap ? cap : blocks;
}

/* 1 when the parts share one bf16 copy of x (see above) */
static int multi_shared(const matmul_part *p, int n, int N, int in)
{
    for (int i = 0; i < n; i++)
        if (cuda_matmul_bf16_path(N, in, p[i].out)) return 1;
    return 0;
}

extern "C" void cuda_matmul_forward_multi(const matmul_part *p, int n, const float *x, int N, int in)
{
    fatal_check(n >= 1 && n <= MATMUL_PARTS_MAX);
    if (!multi_shared(p, n, N, in)) {
        for (int i = 0; i < n; i++) matmul_forward(p[i].y, x, p[i].w, NULL, N, in, p[i].out);
        return;
    }
    /* the narrow parts' stacked weights and their column blocks */
    col_blocks nb;
    nb.n = 0;
    nb.at[0] = 0;
    size_t nw = 0;
    for (int i = 0; i < n; i++) {
        if (p[i].out <= 0) continue;
        if (p[i].out < MATMUL_SKINNY_WIDTH) {
            nb.ptr[nb.n] = p[i].y;
            nb.at[nb.n + 1] = nb.at[nb.n] + p[i].out;
            nb.n++;
        } else {
            nw += cuda_round8((size_t)p[i].out * in);
        }
    }
    const int S = nb.at[nb.n];
    const size_t nx = cuda_round8((size_t)N * in), ns = cuda_round8((size_t)S * in);
    __nv_bfloat16 *xb = bf_reserve(nx + nw + ns), *wb = xb + nx, *sb = wb + nw;
    cuda_to_bf16(xb, x, (size_t)N * in);
    for (int i = 0; i < n; i++) {
        if (p[i].out < MATMUL_SKINNY_WIDTH) continue;
        cuda_to_bf16(wb, p[i].w, (size_t)p[i].out * in);
        forward_bf16(p[i].y, xb, wb, NULL, N, in, p[i].out);
        wb += cuda_round8((size_t)p[i].out * in);
    }
    if (nb.n == 0) return;
    for (int i = 0, k = 0; i < n; i++)
        if (p[i].out > 0 && p[i].out < MATMUL_SKINNY_WIDTH)
            cuda_to_bf16(sb + (size_t)nb.at[k++] * in, p[i].w, (size_t)p[i].out * in);
    if (nb.n == 1) { /* one narrow part: its own y is the GEMM's output */
        cuda_gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, S, N, in, sb, in, xb, in, 0.0f, nb.ptr[0], S);
        return;
    }
    float *ys = (float *)cuda_scratch((size_t)N * S * sizeof(float));
    cuda_gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, S, N, in, sb, in, xb, in, 0.0f, ys, S);
    split_cols_kernel<<<grid_for(N), 256, 0, cuda_stream()>>>(nb, ys, N);
    LAUNCH_CHECK();
}

extern "C" void cuda_matmul_backward_multi(float *dx, int dx_set, const matmul_part *p, int n, const float *x, int N,
                                           int in)
{
    fatal_check(n >= 1 && n <= MATMUL_PARTS_MAX && dx);
    if (!multi_shared(p, n, N, in)) {
        for (int i = 0; i < n; i++)
            matmul_backward(dx, p[i].dw, p[i].dy, x, p[i].w, N, in, p[i].out, i == 0 && dx_set ? 0.0f : 1.0f);
        return;
    }
    /* every part with outputs, stacked: dy's by columns, weights and dw's by rows */
    col_blocks dyb, dwb;
    dyb.n = dwb.n = 0;
    dyb.at[0] = dwb.at[0] = 0;
    int any_dw = 0;
    for (int i = 0; i < n; i++) {
        if (p[i].out <= 0) continue;
        dyb.ptr[dyb.n] = (float *)p[i].dy;
        dwb.ptr[dwb.n] = p[i].dw;
        any_dw |= p[i].dw != NULL;
        dyb.at[dyb.n + 1] = dwb.at[dwb.n + 1] = dyb.at[dyb.n] + p[i].out;
        dyb.n++, dwb.n++;
    }
    const int S = dyb.at[dyb.n];
    const size_t nx = cuda_round8((size_t)N * in), ny = cuda_round8((size_t)N * S);
    __nv_bfloat16 *xb = bf_reserve(nx + ny + (size_t)S * in), *yb = xb + nx, *wb = yb + ny;
    pack_cols_bf16_kernel<<<grid_for(N), 256, 0, cuda_stream()>>>(yb, dyb, N);
    LAUNCH_CHECK();
    for (int i = 0, k = 0; i < n; i++)
        if (p[i].out > 0) cuda_to_bf16(wb + (size_t)dyb.at[k++] * in, p[i].w, (size_t)p[i].out * in);
    /* dx^T [in, N] = w_all^T [in, S] dy_all^T [S, N] */
    cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, in, N, S, wb, in, yb, S, dx_set ? 0.0f : 1.0f, dx, in);
    if (!any_dw) return;
    /* dw_all^T [in, S] = x^T [in, N] dy_all [N, S] */
    cuda_to_bf16(xb, x, (size_t)N * in);
    float *dws = (float *)cuda_scratch((size_t)S * in * sizeof(float));
    cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, in, S, N, xb, in, yb, S, 0.0f, dws, in);
    add_rows_kernel<<<grid_for(S), 256, 0, cuda_stream()>>>(dwb, dws, in);
    LAUNCH_CHECK();
}
