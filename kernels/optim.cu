/* optim.cu: the optimizer updates of the CUDA backend (MODEL.md section 9), AdamW as
 * torch.optim.AdamW computes it and Muon (nesterov momentum + Newton-Schulz) as
 * torch.optim.Muon computes it, one tensor per call, with no host synchronisation.
 *
 * AdamW is one fused elementwise kernel in float arithmetic; the step's scalars (bias
 * corrections, step size, decay factor) are computed once on the host in double, as
 * the CPU oracle computes them, and passed in as floats.
 *
 * Muon runs in five stages on the stream:
 *   1. momentum: buf <- mu buf + (1-mu) g and X = (1-mu) g + mu buf, rounded product by
 *      product exactly as the CPU does (no fused multiply-add), so buf matches the
 *      oracle bit for bit; each block also sums its X^2 in double into one partial;
 *   2. one block adds the partials in a fixed order and writes max(||X||_F, 1e-7) to
 *      device memory (a fixed grid and fixed trees: the same bits every run);
 *   3. X /= norm, reading the norm from device memory (no round trip to the host);
 *   4. five Newton-Schulz steps A = X X^T, Bm = b A + c A A, X <- a X + Bm X as cuBLAS
 *      GEMMs; beta carries b A and a X, so they are added in fp32 outside the tensor
 *      cores (read from A and X as cuBLASLt's C while Bm and the next X are written as
 *      its D, see below); large batches keep X, A and Bm in scaled fp16 (see below);
 *   5. p <- p (1 - lr wd) - lr sqrt(max(1, rows/cols)) O, in double like the oracle.
 *
 * No transposes are copied. X is kept in the parameter's own row-major [rows, cols]
 * layout, which cuBLAS (column-major, leading dimension cols) reads as the [cols, rows]
 * matrix Z. For a wide matrix (rows <= cols) the NS problem is X = N [m = rows,
 * n = cols] and Z = X^T, so A = Z^T Z and the next X is stored as a Z + Z Bm^T; for a
 * tall one the NS problem is X = N^T [m = cols, n = rows] and Z = X, so A = Z Z^T and
 * the next X is a Z + Bm Z. Either way the result lies in the parameter's layout and
 * step 5 is elementwise.
 *
 * Batches (muon_update_batch): count matrices of one shape go through the same five
 * stages together. Their p, g and buf pointers travel as a kernel argument (struct
 * muon_ptrs, no upload); X, next X, A and Bm of matrix i lie at fixed strides in work
 * (each rounded up to 64 floats, so every matrix is 256-byte aligned), so the elementwise
 * kernels take the matrix from blockIdx.y and each Newton-Schulz GEMM is one strided
 * batched GEMM: 29 launches per batch instead of 29 per matrix. The small matrices
 * (12x1024, 256x1024) were launch-bound and the 1024x1024 Gram products of the big ones
 * filled half the GPU; batched, both keep the tensor cores busy. Each matrix keeps its
 * own norm, computed with the grid and trees of the single-matrix path.
 *
 * Precision of the Newton-Schulz GEMMs: TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32,
 * 10-bit mantissa inputs, fp32 accumulation). A numpy model of the GEMMs with operands
 * rounded to bf16 puts the three-step parameter update 1.2-1.7% (relative) away from
 * fp32 NS5 on 1024x256, 256x1024 and 300x300 random gradients, which is what torch's
 * bf16 Muon also does, but sits at the edge of a 2e-2 check; with TF32 it is 0.15-0.3%.
 * The error does not come from the Gram matrix X X^T (fp32 there alone changes little)
 * but from A A and Bm X, whose rounding the iteration amplifies, so fp32 for the Gram
 * only would not help, and fp32 for all three GEMMs would cost 8-16x the time of TF32,
 * which runs at half the bf16 tensor-core rate. NS_COMPUTE switches it.
 *
 * Large batches (matrices of MUON_HALF_MIN_ELEMS elements or more: moe-1b's MLP, shared
 * expert and attention output matrices, with about 95% of the Newton-Schulz FLOPs) run
 * the iteration in fp16 instead: fp16 has TF32's 10-bit mantissa and runs at twice its
 * rate on the tensor cores. X, A and Bm are held as fp16 scaled by NS_HALF_SCALE = 2^12:
 * the normalisation writes the scaled fp16 X, every GEMM accumulates in fp32 and writes
 * its result scaled the same way (alpha carries the 2^-12 that a product of two scaled
 * operands needs; the beta terms b A and a X are read from the scaled fp16 buffers and
 * added in fp32), and the final update is unscaled as it is applied. The scale is exact
 * and keeps every value in fp16's normal range: X starts with Frobenius norm 1 and NS5
 * keeps its singular values below about 1.2, so |X_ij| <= 1.2, |A_ij| <= 1.44 and
 * |Bm_ij| <= 2.9 (the largest |b s + c s^2| for s = sigma^2 <= 1.44), at most 12,000
 * after scaling (fp16 ends at 65,504), while entries down to 2^-26 (below any that
 * matters next to a norm-1 matrix) keep all ten mantissa bits. Each operand so carries
 * the rounding TF32 would give it, and the GEMMs run at twice the rate. Keeping the
 * results in fp16 (rather than writing fp32 and rounding a copy for the next GEMM, as an
 * earlier version did) removes three rounding passes per step and halves the bytes the
 * GEMMs write and read as C; the cost is that a X is added from the rounded X.
 *
 * Stages 1-4 do not depend on lr or wd, and the optimizer repeats every batch each step
 * on the same buffers: from a batch's second call on they run as one CUDA graph
 * (muon_ns_graphed), one launch where there were about 25, 15 of them cuBLAS calls
 * whose host time exceeded the GPU time of a small batch. Stage 5 takes lr and wd as
 * kernel arguments and is launched on its own. A graph holds the batch's buffers and
 * the lane's scratch, so it is captured again when device memory has moved since
 * (cuda_memory_generation). The bits are those of the direct launches.
 *
 * The two GEMMs of each step with a beta term go through cuBLASLt in both precisions
 * (ns_gemm_into): its separate C (read) and D (written) take b A and a X from A and X
 * while writing Bm and the next X, so neither needs a copy of A or X first (with
 * cublasGemmEx, whose C is both read and written, each step began with two device
 * copies: twenty launches per small batch that did no arithmetic).
 */
#include <cublasLt.h>
#include <cuda_fp16.h>
#include <math.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "cuda_ops.h"
}

/* NS5 coefficients (a, b, c), the norm floor and step count of torch.optim.Muon */
#define NS_A 3.4445f
#define NS_B (-4.7750f)
#define NS_C 2.0315f
#define NS_EPS 1e-7
#define NS_STEPS 5
#define NS_COMPUTE CUBLAS_COMPUTE_32F_FAST_TF32
/* matrices of at least this many elements take the scaled fp16 operands (see the top) */
#define MUON_HALF_MIN_ELEMS ((size_t)1 << 20)
#define NS_HALF_SCALE 4096.0f                  /* 2^12 */
#define NS_HALF_RESCALE (1.0f / 4096.0f) /* alpha factor: a product of two scaled operands, stored scaled once */

/* the large batches' X (two, ping-pong), A and Bm in scaled fp16, one buffer per lane
 * (backend.h); each grows to the largest batch run on its lane and stays */
static void *half_buf[BACKEND_LANES];
static size_t half_bytes[BACKEND_LANES];

#define THREADS 256
/* the most blocks of an elementwise grid (grid-stride beyond) */
#define MAX_BLOCKS 4096
/* blocks of the norm's first stage: fixed, so the partials always split the same way */
#define NORM_BLOCKS 256

static unsigned grid_for(size_t n)
{
    unsigned b = ceil_div_u(n, THREADS);
    return b < 1 ? 1 : b > MAX_BLOCKS ? MAX_BLOCKS : b;
}

/* The sum of v over the block (THREADS threads) in a fixed tree; valid in thread 0. */
static __device__ double block_sum(double v)
{
    __shared__ double sh[THREADS / 32];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = 0;
    if (warp == 0) {
        v = lane < THREADS / 32 ? sh[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    }
    return v;
}

/* grad_scale (backend.h): the scale in device memory, where the update kernels read it
 * (a Newton-Schulz graph replays its momentum launch with the pointer, not the value);
 * set by a one-thread kernel on the calling lane, so the lanes forked after see it */
static float *grad_scale_buf;
static float grad_scale_now = 1.0f;

static __global__ void set_scalar_kernel(float *dst, float v) { *dst = v; }

static const float *grad_scale_dev(void)
{
    if (!grad_scale_buf) {
        CUDA_CHECK(cudaMalloc(&grad_scale_buf, sizeof(float)));
        set_scalar_kernel<<<1, 1, 0, cuda_stream()>>>(grad_scale_buf, grad_scale_now);
        LAUNCH_CHECK();
    }
    return grad_scale_buf;
}

extern "C" void cuda_grad_scale(float s)
{
    grad_scale_dev();
    if (s == grad_scale_now) return;
    grad_scale_now = s;
    set_scalar_kernel<<<1, 1, 0, cuda_stream()>>>(grad_scale_buf, s);
    LAUNCH_CHECK();
}

/* one torch.optim.AdamW step per element: decoupled decay, then the bias-corrected
 * Adam step (step_size = lr / bc1, denom = sqrt(v) / sqrt(bc2) + eps) */
static __device__ __forceinline__ void adamw1(float *p, float g, float *m, float *v, float beta1, float beta2,
                                              float one_b1, float one_b2, float eps, float step_size, float bc2_sqrt,
                                              float decay)
{
    const float mi = beta1 * *m + one_b1 * g;
    const float vi = beta2 * *v + one_b2 * g * g;
    *m = mi;
    *v = vi;
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    *p = decay * *p - step_size * mi / denom;
}

/* vec: all four arrays 16-byte aligned, so that elements go four at a time (float4 loads
 * and stores: the scalar loop ran at about half the copy bandwidth); the same arithmetic
 * per element either way */
static __global__ void adamw_kernel(float *p, const float *g, float *m, float *v, size_t n, float beta1,
                                    float beta2, float one_b1, float one_b2, float eps, float step_size,
                                    float bc2_sqrt, float decay, const float *gscale, int vec)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x, i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const float gs = *gscale;
    size_t done = 0;
    if (vec) {
        const size_t n4 = n / 4;
        for (size_t i = i0; i < n4; i += stride) {
            float4 pi = ((const float4 *)p)[i], mi = ((const float4 *)m)[i], vi = ((const float4 *)v)[i];
            const float4 gi = __ldg((const float4 *)g + i);
            adamw1(&pi.x, __fmul_rn(gi.x, gs), &mi.x, &vi.x, beta1, beta2, one_b1, one_b2, eps, step_size, bc2_sqrt,
                   decay);
            adamw1(&pi.y, __fmul_rn(gi.y, gs), &mi.y, &vi.y, beta1, beta2, one_b1, one_b2, eps, step_size, bc2_sqrt,
                   decay);
            adamw1(&pi.z, __fmul_rn(gi.z, gs), &mi.z, &vi.z, beta1, beta2, one_b1, one_b2, eps, step_size, bc2_sqrt,
                   decay);
            adamw1(&pi.w, __fmul_rn(gi.w, gs), &mi.w, &vi.w, beta1, beta2, one_b1, one_b2, eps, step_size, bc2_sqrt,
                   decay);
            ((float4 *)p)[i] = pi;
            ((float4 *)m)[i] = mi;
            ((float4 *)v)[i] = vi;
        }
        done = 4 * n4;
    }
    for (size_t i = done + i0; i < n; i += stride)
        adamw1(p + i, __fmul_rn(g[i], gs), m + i, v + i, beta1, beta2, one_b1, one_b2, eps, step_size, bc2_sqrt,
               decay);
}

/* the matrices of one Muon batch (blockIdx.y picks one) */
typedef struct muon_ptrs {
    float *p[MUON_BATCH_MAX];
    const float *g[MUON_BATCH_MAX];
    float *buf[MUON_BATCH_MAX];
} muon_ptrs;

/* matrix y = blockIdx.y of the batch: buf <- mu buf + (1-mu) g; x = (1-mu) g + mu buf;
 * partial[y * gridDim.x + block] = sum of x^2 over the block's elements. Explicit _rn
 * operations keep the oracle's separate roundings. x of matrix y at x0 + y * sx. */
static __global__ void muon_momentum_kernel(muon_ptrs ptr, float *x0, size_t sx, double *partial, size_t n,
                                            float mu, float one_mu, const float *gscale)
{
    const int y = blockIdx.y;
    float *buf = ptr.buf[y], *x = x0 + y * sx;
    const float *g = ptr.g[y];
    const float gs = *gscale; /* read at run time: a captured graph (below) replays this launch */
    double ss = 0;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const float ge = __fmul_rn(g[e], gs);
        const float b = __fadd_rn(__fmul_rn(mu, buf[e]), __fmul_rn(one_mu, ge));
        const float xe = __fadd_rn(__fmul_rn(one_mu, ge), __fmul_rn(mu, b));
        buf[e] = b;
        x[e] = xe;
        ss += (double)xe * xe;
    }
    ss = block_sum(ss);
    if (threadIdx.x == 0) partial[(size_t)y * gridDim.x + blockIdx.x] = ss;
}

/* one block per matrix y: norm[y] = max(sqrt(sum of its nparts partials), NS_EPS) */
static __global__ void muon_norm_kernel(float *norm, const double *partial, int nparts)
{
    const double *part = partial + (size_t)blockIdx.x * nparts;
    double s = 0;
    for (int i = threadIdx.x; i < nparts; i += THREADS) s += part[i];
    s = block_sum(s);
    if (threadIdx.x == 0) norm[blockIdx.x] = (float)fmax(sqrt(s), NS_EPS);
}

/* x of matrix blockIdx.y /= its norm, in place; or, with h0, written to h0 + y * sx as
 * fp16 scaled by NS_HALF_SCALE (rounded to nearest) and x left as it was */
static __global__ void muon_scale_kernel(float *x0, __half *h0, size_t sx, const float *norm, size_t n)
{
    const int y = blockIdx.y;
    float *x = x0 + y * sx;
    __half *h = h0 ? h0 + y * sx : NULL;
    const float d = norm[y];
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const float v = x[e] / d;
        if (h) h[e] = __float2half_rn(v * NS_HALF_SCALE);
        else x[e] = v;
    }
}

/* p <- (float)(decay p) - step o for matrix blockIdx.y (o at o0 + y * so: fp32, or with
 * half set fp16 scaled by NS_HALF_SCALE), in double as the oracle computes it */
static __global__ void muon_apply_kernel(muon_ptrs ptr, const void *o0, int half, size_t so, size_t n, double decay,
                                         double step)
{
    const int y = blockIdx.y;
    float *p = ptr.p[y];
    const float *o = half ? NULL : (const float *)o0 + y * so;
    const __half *oh = half ? (const __half *)o0 + y * so : NULL;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const double oe = half ? (double)__half2float(oh[e]) * (1.0 / NS_HALF_SCALE) : (double)o[e];
        const float decayed = (float)(decay * (double)p[e]);
        p[e] = (float)((double)decayed - step * oe);
    }
}

/* C_i [mm, nn] = alpha op(A_i) op(B_i) + beta C_i for i < count, column-major, A, B, C at
 * strides sa, sb, sc: all fp32 with NS_COMPUTE (half 0), or all fp16 scaled by
 * NS_HALF_SCALE with fp32 accumulation (half 1; alpha is given unscaled and rescaled
 * here, so C comes out scaled as its operands are). One matrix is a plain GEMM (the path
 * muon_update always took), more a strided batched GEMM. */
static void ns_gemm(int half, int count, cublasOperation_t ta, cublasOperation_t tb, int mm, int nn, int kk,
                    float alpha, const void *a, int lda, size_t sa, const void *b, int ldb, size_t sb, float beta,
                    void *c, int ldc, size_t sc)
{
    const cudaDataType_t t = half ? CUDA_R_16F : CUDA_R_32F;
    const cublasComputeType_t compute = half ? CUBLAS_COMPUTE_32F : NS_COMPUTE;
    if (half) alpha *= NS_HALF_RESCALE;
    if (count == 1)
        CUBLAS_CHECK(cublasGemmEx(cuda_cublas(), ta, tb, mm, nn, kk, &alpha, a, t, lda, b, t, ldb, &beta, c, t, ldc,
                                  compute, CUBLAS_GEMM_DEFAULT));
    else
        CUBLAS_CHECK(cublasGemmStridedBatchedEx(cuda_cublas(), ta, tb, mm, nn, kk, &alpha, a, t, lda, (long long)sa,
                                                b, t, ldb, (long long)sb, &beta, c, t, ldc, (long long)sc, count,
                                                compute, CUBLAS_GEMM_DEFAULT));
}

/* One cuBLASLt plan of ns_gemm_into: descriptors and the heuristic's algorithm, kept per
 * shape (the optimizer repeats the same few every step). */
typedef struct lt_plan {
    int half; /* 1: scaled fp16 A, B, C, D (CUBLAS_COMPUTE_32F); 0: fp32 in NS_COMPUTE (TF32) */
    int ta, tb, mm, nn, kk, lda, ldb, ldc, count;
    size_t sa, sb, sc;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
    int found; /* 0: no algorithm; the caller copies C into D and uses ns_gemm */
} lt_plan;
#define LT_PLANS 128
#define LT_WORKSPACE ((size_t)32 << 20)
static cublasLtHandle_t lt_handle;
static lt_plan lt_plans[LT_PLANS];
static int n_lt_plans;
static void *lt_ws[BACKEND_LANES]; /* one cuBLASLt workspace per lane */
static size_t lt_ws_bytes[BACKEND_LANES];

static cublasLtMatrixLayout_t lt_layout(cudaDataType_t type, int rows, int cols, int ld, int count, size_t stride)
{
    cublasLtMatrixLayout_t l;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld));
    const int32_t batch = count;
    const int64_t off = (int64_t)stride;
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &off, sizeof off));
    return l;
}

static const lt_plan *lt_get(int half, cublasOperation_t ta, cublasOperation_t tb, int mm, int nn, int kk, int lda,
                             size_t sa, int ldb, size_t sb, int ldc, size_t sc, int count)
{
    for (int i = 0; i < n_lt_plans; i++) {
        const lt_plan *p = &lt_plans[i];
        if (p->half == half && p->ta == ta && p->tb == tb && p->mm == mm && p->nn == nn && p->kk == kk && p->lda == lda &&
            p->ldb == ldb && p->ldc == ldc && p->count == count && p->sa == sa && p->sb == sb && p->sc == sc)
            return p;
    }
    if (!lt_handle) CUBLAS_CHECK(cublasLtCreate(&lt_handle));
    lt_plan p = {half, ta, tb, mm, nn, kk, lda, ldb, ldc, count, sa, sb, sc};
    const cudaDataType_t ab = half ? CUDA_R_16F : CUDA_R_32F;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, half ? CUBLAS_COMPUTE_32F : NS_COMPUTE, CUDA_R_32F));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    /* A and B as stored: op(A) [mm, kk], op(B) [kk, nn] */
    p.la = ta == CUBLAS_OP_N ? lt_layout(ab, mm, kk, lda, count, sa) : lt_layout(ab, kk, mm, lda, count, sa);
    p.lb = tb == CUBLAS_OP_N ? lt_layout(ab, kk, nn, ldb, count, sb) : lt_layout(ab, nn, kk, ldb, count, sb);
    p.lc = lt_layout(ab, mm, nn, ldc, count, sc);
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws = LT_WORKSPACE;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t res;
    int got = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(lt_handle, p.op, p.la, p.lb, p.lc, p.lc, pref, 1, &res, &got);
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    p.found = st == CUBLAS_STATUS_SUCCESS && got > 0;
    if (p.found) p.algo = res.algo;
    if (n_lt_plans == LT_PLANS) die("muon: more than %d Newton-Schulz GEMM shapes", LT_PLANS);
    lt_plans[n_lt_plans] = p;
    return &lt_plans[n_lt_plans++];
}

/* D_i = alpha op(A_i) op(B_i) + beta C_i with C and D of one layout (ldc, sc) in
 * different buffers: cuBLASLt reads C and writes D, so the next X and Bm need no copy of
 * X and A first. All four fp32 in TF32 (half 0), or all scaled fp16 (half 1, alpha
 * unscaled here). Without a cuBLASLt algorithm for the shape it copies C into D and runs
 * ns_gemm. */
static void ns_gemm_into(int half, int count, cublasOperation_t ta, cublasOperation_t tb, int mm, int nn, int kk,
                         float alpha, const void *a, int lda, size_t sa, const void *b, int ldb, size_t sb,
                         float beta, const void *c, void *d, int ldc, size_t sc, cudaStream_t s)
{
    const lt_plan *p = lt_get(half, ta, tb, mm, nn, kk, lda, sa, ldb, sb, ldc, sc, count);
    if (!p->found) {
        const size_t bytes = (size_t)count * sc * (half ? sizeof(__half) : sizeof(float));
        CUDA_CHECK(cudaMemcpyAsync(d, c, bytes, cudaMemcpyDeviceToDevice, s));
        ns_gemm(half, count, ta, tb, mm, nn, kk, alpha, a, lda, sa, b, ldb, sb, beta, d, ldc, sc);
        return;
    }
    if (half) alpha *= NS_HALF_RESCALE;
    void *ws = cuda_grow(&lt_ws[cuda_lane()], &lt_ws_bytes[cuda_lane()], LT_WORKSPACE);
    CUBLAS_CHECK(cublasLtMatmul(lt_handle, p->op, &alpha, a, p->la, b, p->lb, &beta, c, p->lc, d, p->lc, &p->algo, ws,
                                LT_WORKSPACE, s));
}

/* p, g, m, v [n] device: one torch.optim.AdamW step (step is 1-based); updates p, m, v. */
extern "C" void cuda_adamw_update(float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                                  float beta2, float eps, float wd, int step)
{
    fatal_check(step >= 1);
    if (n == 0) return;
    const double b1 = beta1, b2 = beta2;
    const double bc1 = 1.0 - pow(b1, step);
    const double bc2_sqrt = sqrt(1.0 - pow(b2, step));
    const double step_size = (double)lr / bc1;
    const double decay = 1.0 - (double)lr * (double)wd;
    const int vec = cuda_aligned16(p) && cuda_aligned16(g) && cuda_aligned16(m) && cuda_aligned16(v);
    adamw_kernel<<<grid_for(vec ? (n + 3) / 4 : n), THREADS, 0, cuda_stream()>>>(
        p, g, m, v, n, beta1, beta2, (float)(1.0 - b1), (float)(1.0 - b2), eps, (float)step_size, (float)bc2_sqrt,
        (float)decay, grad_scale_dev(), vec);
    LAUNCH_CHECK();
}

/* The NS_STEPS Newton-Schulz steps on count matrices: X (leading dimension m if tall,
 * else n) at x, the next X at xn, A and Bm at a and bm (strides sx and sa elements), all
 * fp32 (half 0) or all scaled fp16 (half 1). Returns where the last X lies (x or xn). */
static const void *ns_iterations(int half, int count, int tall, int m, int n, void *x, void *xn, void *a, void *bm,
                                 size_t sx, size_t sa, cudaStream_t s)
{
    for (int it = 0; it < NS_STEPS; it++) {
        if (tall) ns_gemm(half, count, CUBLAS_OP_N, CUBLAS_OP_T, m, m, n, 1.0f, x, m, sx, x, m, sx, 0.0f, a, m, sa);
        else ns_gemm(half, count, CUBLAS_OP_T, CUBLAS_OP_N, m, m, n, 1.0f, x, n, sx, x, n, sx, 0.0f, a, m, sa);
        ns_gemm_into(half, count, CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, NS_C, a, m, sa, a, m, sa, NS_B, a, bm, m, sa, s);
        if (tall)
            ns_gemm_into(half, count, CUBLAS_OP_N, CUBLAS_OP_N, m, n, m, 1.0f, bm, m, sa, x, m, sx, NS_A, x, xn, m, sx,
                         s);
        else
            ns_gemm_into(half, count, CUBLAS_OP_N, CUBLAS_OP_T, n, m, m, 1.0f, x, n, sx, bm, m, sa, NS_A, x, xn, n, sx,
                         s);
        void *t = x;
        x = xn;
        xn = t;
    }
    return x;
}

/* Stages 1-4 of the Muon step of count matrices of one shape [rows, cols] (see the top):
 * momentum, norm and Newton-Schulz, none of which depends on lr or wd. work holds, for
 * matrix i, X at i sx, next X at count sx + i sx, A at 2 count sx + i sa and Bm at
 * 2 count sx + count sa + i sa (sx >= m n, sa >= m m floats). Returns where the
 * orthogonalised update lies: fp32 in work, or (*half set) scaled fp16 in the lane's
 * half_buf. */
static const void *muon_ns(const muon_ptrs *ptr, int count, float *work, size_t sx, size_t sa, int rows, int cols,
                           float mu, int *half_out)
{
    const int tall = rows > cols;
    const int m = tall ? cols : rows, n = tall ? rows : cols;
    const size_t total = (size_t)m * n;
    float *x = work, *xn = work + (size_t)count * sx;
    float *a = xn + (size_t)count * sx, *bm = a + (size_t)count * sa;
    cudaStream_t s = cuda_stream();

    unsigned nparts = ceil_div_u(total, THREADS);
    if (nparts > NORM_BLOCKS) nparts = NORM_BLOCKS;
    double *partial = (double *)cuda_scratch(((size_t)count * nparts + count) * sizeof(double));
    float *norm = (float *)(partial + (size_t)count * nparts);

    muon_momentum_kernel<<<dim3(nparts, count), THREADS, 0, s>>>(*ptr, x, sx, partial, total, mu, 1.0f - mu,
                                                                 grad_scale_dev());
    LAUNCH_CHECK();
    muon_norm_kernel<<<count, THREADS, 0, s>>>(norm, partial, (int)nparts);
    LAUNCH_CHECK();
    /* the buffers' leading dimension is cols in both orientations (see the top) */
    const int half = total >= MUON_HALF_MIN_ELEMS;
    *half_out = half;
    if (!half) {
        muon_scale_kernel<<<dim3(grid_for(total), count), THREADS, 0, s>>>(x, NULL, sx, norm, total);
        LAUNCH_CHECK();
        /* TF32 on the fp32 buffers, C and D apart (no copies of A and X) */
        return ns_iterations(0, count, tall, m, n, x, xn, a, bm, sx, sa, s);
    }
    /* X, A and Bm live as fp16 scaled by NS_HALF_SCALE from the normalisation on; each
     * GEMM writes its result in that form (fp32 accumulation, one rounding) */
    const int lane = cuda_lane();
    const size_t hbytes = (size_t)count * 2 * (sx + sa) * sizeof(__half);
    __half *xh = (__half *)cuda_grow(&half_buf[lane], &half_bytes[lane], hbytes);
    __half *xnh = xh + (size_t)count * sx, *ah = xnh + (size_t)count * sx, *bh = ah + (size_t)count * sa;
    muon_scale_kernel<<<dim3(grid_for(total), count), THREADS, 0, s>>>(x, xh, sx, norm, total);
    LAUNCH_CHECK();
    return ns_iterations(1, count, tall, m, n, xh, xnh, ah, bh, sx, sa, s);
}

/* Stages 1-4 as a CUDA graph per call site (see the top): the optimizer repeats each
 * batch every step with the same buffers, and the ~25 launches of a small batch, 15 of
 * them cuBLAS calls, cost the host more time than the GPU needs to run them. An entry is
 * the batch's pointers, shape and lane, with its cuda_graph_replay slot and muon_ns's
 * result (the same pointer and precision every call). */
typedef struct ns_graph {
    muon_ptrs ptr;
    float *work;
    size_t sx, sa;
    int count, rows, cols, lane;
    float mu;
    cuda_graph_slot slot;
    const void *out; /* muon_ns's result and its precision */
    int half;
} ns_graph;
#define NS_GRAPHS 256
static ns_graph ns_graphs[NS_GRAPHS];
static int n_ns_graphs, ns_graph_next_evict;
static unsigned long long ns_graph_launches; /* for the tests: graphs launched so far */

extern "C" unsigned long long cuda_muon_graph_launches(void) { return ns_graph_launches; }

static ns_graph *ns_graph_entry(const muon_ptrs *ptr, int count, float *work, size_t sx, size_t sa, int rows,
                                int cols, float mu)
{
    const int lane = cuda_lane();
    for (int i = 0; i < n_ns_graphs; i++) {
        ns_graph *e = &ns_graphs[i];
        if (e->count == count && e->work == work && e->sx == sx && e->sa == sa && e->rows == rows &&
            e->cols == cols && e->lane == lane && e->mu == mu && !memcmp(e->ptr.p, ptr->p, count * sizeof(void *)) &&
            !memcmp(e->ptr.g, ptr->g, count * sizeof(void *)) && !memcmp(e->ptr.buf, ptr->buf, count * sizeof(void *)))
            return e;
    }
    ns_graph *e;
    if (n_ns_graphs < NS_GRAPHS) {
        e = &ns_graphs[n_ns_graphs++];
    } else { /* full: reuse the entries in turn */
        e = &ns_graphs[ns_graph_next_evict];
        ns_graph_next_evict = (ns_graph_next_evict + 1) % NS_GRAPHS;
        cuda_graph_slot_free(&e->slot);
    }
    memset(e, 0, sizeof *e);
    e->ptr = *ptr;
    e->work = work;
    e->sx = sx, e->sa = sa;
    e->count = count, e->rows = rows, e->cols = cols, e->lane = lane;
    e->mu = mu;
    return e;
}

/* stages 1-4 of an entry's batch, its result kept in the entry (cuda_graph_replay's fn) */
static void ns_graph_stages(void *ctx)
{
    ns_graph *e = (ns_graph *)ctx;
    e->out = muon_ns(&e->ptr, e->count, e->work, e->sx, e->sa, e->rows, e->cols, e->mu, &e->half);
}

static const void *muon_ns_graphed(const muon_ptrs *ptr, int count, float *work, size_t sx, size_t sa, int rows,
                                   int cols, float mu, int *half)
{
    if (!cuda_graphs()) return muon_ns(ptr, count, work, sx, sa, rows, cols, mu, half);
    ns_graph *e = ns_graph_entry(ptr, count, work, sx, sa, rows, cols, mu);
    ns_graph_launches += cuda_graph_replay(&e->slot, cuda_stream(), ns_graph_stages, e);
    *half = e->half;
    return e->out;
}

/* The whole Muon step of a batch: stages 1-4 (as a graph where repeated), then stage 5. */
static void muon_run(const muon_ptrs *ptr, int count, float *work, size_t sx, size_t sa, int rows, int cols,
                     float lr, float mu, float wd)
{
    int half = 0;
    const void *o = muon_ns_graphed(ptr, count, work, sx, sa, rows, cols, mu, &half);
    const size_t total = (size_t)rows * cols;
    const double decay = 1.0 - (double)lr * (double)wd;
    const double step = (double)lr * sqrt(fmax(1.0, (double)rows / cols));
    muon_apply_kernel<<<dim3(grid_for(total), count), THREADS, 0, cuda_stream()>>>(*ptr, o, half, sx, total, decay,
                                                                                   step);
    LAUNCH_CHECK();
}

/* p, g, buf [rows, cols] device: one torch.optim.Muon step (nesterov, NS5); updates p
 * and buf. work: muon_work_floats(rows, cols) device floats, laid out X, next X (m*n
 * each), A, Bm (m*m each) with m = min(rows, cols); its contents on entry are ignored.
 * Also uses the backend scratch (a few KiB) for the norm's partial sums. */
extern "C" void cuda_muon_update(float *p, const float *g, float *buf, float *work, int rows, int cols, float lr,
                                 float mu, float wd)
{
    if (rows <= 0 || cols <= 0) return;
    muon_ptrs ptr = {};
    ptr.p[0] = p;
    ptr.g[0] = g;
    ptr.buf[0] = buf;
    const size_t m = (size_t)(rows < cols ? rows : cols), n = (size_t)(rows < cols ? cols : rows);
    muon_run(&ptr, 1, work, m * n, m * m, rows, cols, lr, mu, wd);
}

/* p, g, buf: host arrays of count device pointers to [rows, cols] matrices; one Muon step
 * of each, batched. work: muon_batch_work_floats(count, rows, cols) device floats, the
 * layout of muon_run with strides rounded up to 64 floats; its contents on entry are
 * ignored. Uses the backend scratch (count x 2 KiB at most) for the norms. */
extern "C" void cuda_muon_update_batch(float *const *p, const float *const *g, float *const *buf, float *work,
                                       int count, int rows, int cols, float lr, float mu, float wd)
{
    fatal_check(count >= 0 && count <= MUON_BATCH_MAX);
    if (count == 0 || rows <= 0 || cols <= 0) return;
    muon_ptrs ptr = {};
    for (int i = 0; i < count; i++) {
        ptr.p[i] = p[i];
        ptr.g[i] = g[i];
        ptr.buf[i] = buf[i];
    }
    const size_t m = (size_t)(rows < cols ? rows : cols), n = (size_t)(rows < cols ? cols : rows);
    const size_t sx = (m * n + 63) & ~(size_t)63, sa = (m * m + 63) & ~(size_t)63;
    muon_run(&ptr, count, work, sx, sa, rows, cols, lr, mu, wd);
}
