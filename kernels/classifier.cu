/* classifier.cu: the tied LM head and cross-entropy on the GPU, never holding the full
 * [N, V] logits.
 *
 * Rows are processed in chunks of n_c rows whose logits fit CHUNK_FLOATS (512 MiB of
 * fp32) in the backend scratch buffer: at V = 50304 that is 2668 rows, large enough for
 * the GEMMs to run at full tensor-core rate and small next to the activations. The GEMMs
 * are matmul.cu's bf16 ones (operands rounded to bf16, fp32 accumulation); wte is rounded
 * once per call into a buffer of this file and each chunk's h rows once (heads below
 * 2^27 multiply-adds in all go chunk by chunk through cuda_matmul_* instead). Per chunk:
 *   forward : logits = h_c wte^T, then one block per row finds lse and the loss;
 *   backward: the same GEMM recomputes the logits, one block per row turns them into
 *             dlogits = scale (softmax - onehot) (all zero for ignored rows), written
 *             rounded to bf16 straight into the operand of the GEMMs that add dlogits
 *             wte to dh and dlogits^T h_c to dwte.
 * Recomputing the logits costs one GEMM out of four and saves N*V floats of memory. A
 * training step knows its dloss_scale before the forward, so it takes both at once
 * (classifier_forward_backward): per chunk one logits GEMM, one kernel per row for the
 * loss and then dlogits, and the two gradient GEMMs; h and wte are rounded once.
 *
 * The row statistics use the online softmax: each thread keeps a running (max, sum of
 * exp(z - max)) over a fixed stride of the row, and the block combines the pairs with
 * a fixed shuffle/shared-memory tree, so one pass over the row suffices and the result
 * is the same bits every run. Chunks run in row order on one stream, so dwte receives
 * its chunk contributions in a fixed order too.
 *
 * Targets are int32 device memory; -100 means "ignore". A target outside [0, V) that
 * is not -100 cannot be reported without a host sync, so it turns that row's loss (and
 * in the backward its dlogits) into NaN: the run fails loudly instead of reading or
 * writing outside the logits row.
 */
#include <float.h>
#include <math.h>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

#define IGNORE_INDEX (-100)
/* logits per chunk: 128 Mi floats = 512 MiB of scratch. Each chunk's dwte GEMM reads
 * and writes all of dwte (V x C fp32, 412 MB at moe-1b), so fewer, larger chunks move
 * less: 7 chunks of 2668 rows per 16384 instead of 25 of 667 */
#define CHUNK_FLOATS ((size_t)1 << 27)
/* threads per row, in all three cross-entropy kernels (the fused op then gives the bits
 * of the forward and backward kernels run apart); a power of two, a multiple of 32, at
 * most 1024 (the block reductions take one warp's worth of warp partials) */
#define ROW_THREADS 1024

/* bf16 copies: wte [V, C], then one chunk's h [rows, C] and dlogits [rows, V] */
static void *bf_buf;
static size_t bf_bytes;

static __nv_bfloat16 *bf_reserve(size_t elems)
{
    return (__nv_bfloat16 *)cuda_grow(&bf_buf, &bf_bytes, elems * sizeof(__nv_bfloat16));
}

/* A head too small to gain from rounding wte once: each chunk goes through
 * cuda_matmul_forward/backward, which keep small products on cuBLAS's own choice. */
static int small_head(int N, int V, int C) { return cuda_matmul_small((size_t)N * V * C); }

/* rows per chunk: as many as fit CHUNK_FLOATS logits, at least 1, at most N */
extern "C" int cuda_classifier_chunk_rows(int N, int V)
{
    size_t rows = CHUNK_FLOATS / (size_t)V;
    if (rows < 1) rows = 1;
    return rows < (size_t)N ? (int)rows : N;
}

/* (m1, s1) <- the merge of two online-softmax states: the sum of exp(z - m) over both
 * halves, relative to the larger max. Maxima start at -FLT_MAX rather than -inf so
 * that merging two empty states gives exp(0) * 0 = 0, never inf - inf. */
static __device__ void lse_merge(float *m1, float *s1, float m2, float s2)
{
    float m = fmaxf(*m1, m2);
    *s1 = *s1 * expf(*m1 - m) + s2 * expf(m2 - m);
    *m1 = m;
}

/* The statistics of one block's row z (row i of the batch, target t): lse[i] = log sum_v
 * exp(z_v), loss[i] = lse - z[t] (0 for an ignored target, NaN for an out-of-range one),
 * written by thread 0; every thread gets lse back. All threads of the block call it.
 * keep: NULL, or shared memory for the row, which each thread fills with the values it
 * reads (for ce_row_backward, which then reads them there). */
static __device__ float ce_row_forward(float *loss, float *lse, const float *z, int t, int i, int V, float *keep)
{
    __shared__ float sh_m[ROW_THREADS / 32], sh_s[ROW_THREADS / 32], sh_lse;
    float m = -FLT_MAX, s = 0.0f;
#pragma unroll 4
    for (int v = threadIdx.x; v < V; v += ROW_THREADS) {
        const float zv = z[v];
        if (keep) keep[v] = zv;
        if (zv > m) {
            s = s * expf(m - zv) + 1.0f;
            m = zv;
        } else {
            s += expf(zv - m);
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
        lse_merge(&m, &s, m2, s2);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sh_m[warp] = m;
        sh_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < ROW_THREADS / 32 ? sh_m[lane] : -FLT_MAX;
        s = lane < ROW_THREADS / 32 ? sh_s[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
            lse_merge(&m, &s, m2, s2);
        }
        if (lane == 0) {
            const float l = m + logf(s);
            lse[i] = l;
            sh_lse = l;
            if (t == IGNORE_INDEX) loss[i] = 0.0f;
            else if (t < 0 || t >= V) loss[i] = __int_as_float(0x7fc00000); /* NaN */
            else loss[i] = l - z[t];
        }
    }
    __syncthreads();
    return sh_lse;
}

/* One block per row r of the chunk: its lse and loss (ce_row_forward) */
static __global__ void ce_forward_kernel(float *loss, float *lse, const float *logits,
                                         const int32_t *targets, int row0, int V)
{
    const int r = blockIdx.x, i = row0 + r;
    ce_row_forward(loss, lse, logits + (size_t)r * V, targets[i], i, V, NULL);
}

/* dlogits element v of row r: fp32 in place over the logits, or rounded to bf16 (to
 * nearest even, as cuda_to_bf16 rounds) into its own row when out_bf is given */
static __device__ __forceinline__ void ce_put(float *z, __nv_bfloat16 *zb, int v, float d)
{
    if (zb) zb[v] = __float2bfloat16_rn(d);
    else z[v] = d;
}

/* One block per row r of the chunk: dlogits = scale * exp(z - lse) - scale * [v ==
 * target], or zeros for an ignored target. The two roundings (product, then the onehot
 * subtraction) are those of the CPU oracle. Without out_bf the logits row becomes dlogits
 * in place (fp32, for the small-head path's fp32 GEMMs); with it, dlogits go straight to
 * the bf16 copy the GEMMs read, so the fp32 dlogits are never written and read back (two
 * passes over 512 MiB per chunk, about 2.5 ms a step at moe-1b). */
/* dlogits of row z (target t, lse l) into z itself or its bf16 row zb (see ce_put), read
 * from src: z, or the copy of it that ce_row_forward kept (each thread reads what it
 * wrote there) */
static __device__ void ce_row_backward(const float *src, float *z, __nv_bfloat16 *zb, int t, float l, float scale,
                                       int V)
{
    if (t == IGNORE_INDEX) {
        for (int v = threadIdx.x; v < V; v += ROW_THREADS) ce_put(z, zb, v, 0.0f);
        return;
    }
    if (t < 0 || t >= V) {
        for (int v = threadIdx.x; v < V; v += ROW_THREADS) ce_put(z, zb, v, __int_as_float(0x7fc00000)); /* NaN */
        return;
    }
    for (int v = threadIdx.x; v < V; v += ROW_THREADS) {
        const float d = __fmul_rn(scale, expf(src[v] - l));
        ce_put(z, zb, v, v == t ? __fsub_rn(d, scale) : d);
    }
}

static __global__ void ce_backward_kernel(float *logits, __nv_bfloat16 *out_bf, const int32_t *targets,
                                          const float *lse, float scale, int row0, int V)
{
    const int r = blockIdx.x, i = row0 + r;
    float *z = logits + (size_t)r * V;
    ce_row_backward(z, z, out_bf ? out_bf + (size_t)r * V : NULL, targets[i], lse[i], scale, V);
}

/* the forward and backward kernels in one (classifier_forward_backward): a block reads
 * its row a second time right after the first, instead of a later kernel reading every
 * row again; the same bits as the two. With keep (dynamic shared memory of V floats,
 * where it fits: ce_keep_bytes) the second read is of the block's own copy: a row of the
 * 50304-word vocabulary is 196 KiB, and with a row read twice from DRAM (the rows in
 * flight far exceed L2) this kernel took 0.51 ms a chunk of 2668 rows. */
static __global__ void __launch_bounds__(ROW_THREADS)
ce_forward_backward_kernel(float *loss, float *lse, float *logits, __nv_bfloat16 *out_bf, const int32_t *targets,
                           float scale, int row0, int V, int keep)
{
    extern __shared__ float ce_row[];
    const int r = blockIdx.x, i = row0 + r, t = targets[i];
    float *z = logits + (size_t)r * V;
    const float l = ce_row_forward(loss, lse, z, t, i, V, keep ? ce_row : NULL);
    ce_row_backward(keep ? ce_row : z, z, out_bf ? out_bf + (size_t)r * V : NULL, t, l, scale, V);
}

/* dynamic shared memory of ce_forward_backward_kernel for a row of V logits, 0 where it
 * does not fit (the kernel then reads the row twice from global memory) */
static size_t ce_keep_bytes(int V)
{
    static int limit = -1;
    if (limit < 0) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        limit -= 1024; /* the reductions' static shared memory */
        if (limit > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute((const void *)ce_forward_backward_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
    }
    const size_t bytes = (size_t)V * sizeof(float);
    return bytes <= (size_t)limit ? bytes : 0;
}

/* The head over chunks of rows. fwd: loss [N], lse [N] = cross-entropy of logits_i =
 * h_i wte^T against targets [N] (int32, -100 ignored). bwd: dh [N, C] += dlogits wte,
 * dwte [V, C] += dlogits^T h with dlogits_i = dloss_scale (softmax(h_i wte^T) -
 * onehot(target_i)), zero rows for ignored targets, from lse (the forward's, or this
 * call's when fwd is set too: then each chunk's logits are computed once). Device
 * pointers; uses the backend scratch. */
static void head_run(int fwd, int bwd, float *loss, float *lse, float *dh, float *dwte, const float *h,
                     const float *wte, const int32_t *targets, float dloss_scale, int N, int V, int C)
{
    if (N <= 0 || V <= 0) return;
    const int rows = cuda_classifier_chunk_rows(N, V);
    const size_t keep = fwd && bwd ? ce_keep_bytes(V) : 0;
    float *logits = (float *)cuda_scratch((size_t)rows * V * sizeof(float));
    cudaStream_t st = cuda_stream();
    if (small_head(N, V, C)) {
        for (int i0 = 0; i0 < N; i0 += rows) {
            const int nr = N - i0 < rows ? N - i0 : rows;
            const float *hc = h + (size_t)i0 * C;
            cuda_matmul_forward(logits, hc, wte, nr, C, V);
            if (fwd && bwd)
                ce_forward_backward_kernel<<<nr, ROW_THREADS, keep, st>>>(loss, lse, logits, NULL, targets,
                                                                          dloss_scale, i0, V, keep > 0);
            else if (fwd)
                ce_forward_kernel<<<nr, ROW_THREADS, 0, st>>>(loss, lse, logits, targets, i0, V);
            else
                ce_backward_kernel<<<nr, ROW_THREADS, 0, st>>>(logits, NULL, targets, lse, dloss_scale, i0, V);
            LAUNCH_CHECK();
            if (bwd) cuda_matmul_backward(dh + (size_t)i0 * C, dwte, logits, hc, wte, nr, C, V);
        }
        return;
    }
    size_t nw = cuda_round8((size_t)V * C), nh = cuda_round8((size_t)rows * C);
    __nv_bfloat16 *wb = bf_reserve(nw + nh + (bwd ? cuda_round8((size_t)rows * V) : 0)), *hb = wb + nw, *db = hb + nh;
    cuda_to_bf16(wb, wte, (size_t)V * C);
    for (int i0 = 0; i0 < N; i0 += rows) {
        const int nr = N - i0 < rows ? N - i0 : rows;
        cuda_to_bf16(hb, h + (size_t)i0 * C, (size_t)nr * C);
        cuda_gemm_bf16(CUBLAS_OP_T, CUBLAS_OP_N, V, nr, C, wb, C, hb, C, 0.0f, logits, V);
        if (fwd && bwd)
            ce_forward_backward_kernel<<<nr, ROW_THREADS, keep, st>>>(loss, lse, logits, db, targets, dloss_scale, i0,
                                                                      V, keep > 0);
        else if (fwd)
            ce_forward_kernel<<<nr, ROW_THREADS, 0, st>>>(loss, lse, logits, targets, i0, V);
        else
            ce_backward_kernel<<<nr, ROW_THREADS, 0, st>>>(logits, db, targets, lse, dloss_scale, i0, V);
        LAUNCH_CHECK();
        if (!bwd) continue;
        /* dh_c [nr, C] += dlogits wte; dwte [V, C] += dlogits^T h_c (matmul.cu's transposes) */
        cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_N, C, nr, V, wb, C, db, V, 1.0f, dh + (size_t)i0 * C, C);
        cuda_gemm_bf16(CUBLAS_OP_N, CUBLAS_OP_T, C, V, nr, hb, C, db, V, 1.0f, dwte, C);
    }
}

extern "C" void cuda_classifier_forward(float *loss, float *lse, const float *h, const float *wte,
                                        const int32_t *targets, int N, int V, int C)
{
    head_run(1, 0, loss, lse, NULL, NULL, h, wte, targets, 0.0f, N, V, C);
}

extern "C" void cuda_classifier_backward(float *dh, float *dwte, const float *h, const float *wte,
                                         const int32_t *targets, const float *lse, float dloss_scale,
                                         int N, int V, int C)
{
    head_run(0, 1, NULL, (float *)lse, dh, dwte, h, wte, targets, dloss_scale, N, V, C);
}

extern "C" void cuda_classifier_forward_backward(float *loss, float *lse, float *dh, float *dwte, const float *h,
                                                 const float *wte, const int32_t *targets, float dloss_scale, int N,
                                                 int V, int C)
{
    head_run(1, 1, loss, lse, dh, dwte, h, wte, targets, dloss_scale, N, V, C);
}
