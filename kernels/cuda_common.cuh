/* cuda_common.cuh: what every .cu file of kernels/ shares: the check macros, the backend's
 * stream and cuBLAS handle, and small device helpers.
 *
 * A failing CUDA or cuBLAS call prints the call, file, line and error, then exits the
 * process (MPI ranks: MPI_Abort through die()); nothing continues on a broken device.
 */
#ifndef DELTAMLA_CUDA_COMMON_CUH
#define DELTAMLA_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "util.h"
}

#define CUDA_CHECK(call)                                                                        \
    do {                                                                                        \
        cudaError_t err_ = (call);                                                              \
        if (err_ != cudaSuccess)                                                                \
            die("CUDA error %s in %s (%s:%d)", cudaGetErrorString(err_), #call, __FILE__, __LINE__); \
    } while (0)

#define CUBLAS_CHECK(call)                                                                      \
    do {                                                                                        \
        cublasStatus_t st_ = (call);                                                            \
        if (st_ != CUBLAS_STATUS_SUCCESS)                                                       \
            die("cuBLAS error %d in %s (%s:%d)", (int)st_, #call, __FILE__, __LINE__);          \
    } while (0)

/* after every kernel launch */
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

extern "C" cudaStream_t cuda_stream(void);     /* the stream of the current lane (backend.h) */
extern "C" cublasHandle_t cuda_cublas(void);   /* the current lane's, bound to cuda_stream() */
extern "C" int cuda_lane(void);                /* the current lane, 0 to BACKEND_LANES - 1 */
/* device scratch of at least `bytes`, valid until the next call (grows, never shrinks);
 * one per lane */
extern "C" void *cuda_scratch(size_t bytes);

/* A stream-ordered device buffer of at least `bytes` in *buf (capacity *cap, both 0 at
 * first): reallocated 25% larger when too small, kept otherwise. cuda_scratch is one. */
extern "C" void *cuda_grow(void **buf, size_t *cap, size_t bytes);
/* changes whenever device memory is freed or a cuda_grow buffer moves: a CUDA graph
 * captured under another generation may hold stale pointers */
extern "C" unsigned long long cuda_memory_generation(void);
/* whether ops may replay repeated work as CUDA graphs (DELTAMLA_CUDA_GRAPHS=0: never) */
extern "C" int cuda_graphs(void);

/* One repeated op sequence replayed as a CUDA graph (graph_run, the Newton-Schulz graphs of
 * optim.cu): cuda_graph_replay runs fn(ctx) directly at its first call (buffers grow, plans
 * are made), captures it into the slot at its second and launches it, and launches it
 * after; a graph captured under another cuda_memory_generation is captured anew. Returns
 * 1 when it launched the graph. A zeroed slot is empty; cuda_graph_slot_free empties one. */
typedef struct cuda_graph_slot {
    int seen; /* ran directly once */
    cudaGraphExec_t exec;
    unsigned long long generation;
} cuda_graph_slot;
extern "C" int cuda_graph_replay(cuda_graph_slot *g, cudaStream_t s, void (*fn)(void *ctx), void *ctx);
extern "C" void cuda_graph_slot_free(cuda_graph_slot *g);

/* The shared-memory address of p, for inline PTX. */
static __device__ __forceinline__ uint32_t cuda_smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* ldmatrix.x4: four 8x8 matrices of 16-bit elements from shared memory; lane l gives the
 * address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned). Plain: register i
 * holds (row lane/4, cols 2(lane%4), +1) of matrix i, which for 32-bit elements is
 * element lane%4 of row lane/4 of an 8x4 matrix; trans: (rows 2(lane%4), +1, col lane/4).
 * Used by the attention, MoE GEMM and GDN kernels. */
static __device__ __forceinline__ void cuda_ldsm4(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(cuda_smem_u32(p)));
}

static __device__ __forceinline__ void cuda_ldsm4_t(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(cuda_smem_u32(p)));
}

/* n rounded up to a multiple of 8 (bf16 operands packed one after another stay 16-byte aligned) */
static inline size_t cuda_round8(size_t n) { return (n + 7) & ~(size_t)7; }

/* matmul.cu's building blocks, for ops that reuse an operand over several GEMMs:
 * dst = bf16(src) (round to nearest even), and C [m, n] = op(A) op(B) + beta C with A, B
 * column-major bf16 and C fp32 (fp32 accumulation, the backend's stream and handle). */
extern "C" void cuda_to_bf16(__nv_bfloat16 *dst, const float *src, size_t n);
/* 1 when a product of `macs` multiply-adds stays on cuBLAS's fp32-operand call (too small
 * for the rounding passes to pay; matmul.cu's comment) */
extern "C" int cuda_matmul_small(size_t macs);
extern "C" void cuda_gemm_bf16(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const __nv_bfloat16 *a,
                               int lda, const __nv_bfloat16 *b, int ldb, float beta, float *c, int ldc);
/* 1 when a product of N rows, in -> out runs on bf16 copies of its operands (neither small
 * nor skinny, matmul.cu's comment); the bf16x entry points below take only such shapes */
extern "C" int cuda_matmul_bf16_path(int N, int in, int out);
/* y [N, out] = r + xb [N, in] w [out, in]^T with x given in bf16 (r NULL: no residual; r may
 * be y); w is rounded here. Dies (fatal_check) off the bf16 path. */
extern "C" void cuda_matmul_forward_bf16x(float *y, const __nv_bfloat16 *xb, const float *w, const float *r, int N,
                                          int in, int out);
/* dx [N, in] = dx_beta dx + dy w (dx NULL: skipped); dw [out, in] += dy^T x (dw NULL:
 * skipped); dy given as dyb in bf16 or, when dyb is NULL, as fp32 dy rounded here, and x
 * likewise (xb or x). Dies (fatal_check) off the bf16 path. */
extern "C" void cuda_matmul_backward_bf16x(float *dx, float *dw, const float *dy, const __nv_bfloat16 *dyb,
                                           const float *x, const __nv_bfloat16 *xb, const float *w, int N, int in,
                                           int out, float dx_beta);
/* dxb [N, in] = dy w written in bf16 (the GEMM's fp32 result rounded to nearest even);
 * dw [out, in] += dy^T xb (dw NULL: skipped); dy fp32, rounded here; xb in bf16. Dies
 * (fatal_check) off the bf16 path. */
extern "C" void cuda_matmul_backward_bf16dx(__nv_bfloat16 *dxb, float *dw, const float *dy, const __nv_bfloat16 *xb,
                                            const float *w, int N, int in, int out);
/* elementwise.cu's SwiGLU with bf16 outputs, each value rounded as cuda_to_bf16 would
 * round the fp32 op's: out [N, h] = swiglu(in [N, 2h]); din [N, 2h] = its gradient for
 * dout [N, h] (written, as cuda_swiglu_backward_set) */
extern "C" void cuda_swiglu_forward_bf16(__nv_bfloat16 *out, const float *in, int N, int h, int silu_first);
extern "C" void cuda_swiglu_backward_set_bf16(__nv_bfloat16 *din, const float *dout, const float *in, int N, int h,
                                              int silu_first);
/* the same two with the input [N, 2h] in bf16 (the fused MLP's saved gu) */
extern "C" void cuda_swiglu_forward_bf16in(__nv_bfloat16 *out, const __nv_bfloat16 *in, int N, int h, int silu_first);
extern "C" void cuda_swiglu_backward_set_bf16in(__nv_bfloat16 *din, const float *dout, const __nv_bfloat16 *in, int N,
                                                int h, int silu_first);
/* and with dout [N, h] in bf16 too (the fused MLP's dact) */
extern "C" void cuda_swiglu_backward_set_bf16dy(__nv_bfloat16 *din, const __nv_bfloat16 *dout,
                                                const __nv_bfloat16 *in, int N, int h, int silu_first);
/* y [N, out] = x [N, in] w [out, in]^T written in bf16 (the GEMM's fp32 result rounded to
 * nearest even); x and w rounded here. Dies (fatal_check) off the bf16 path. */
extern "C" void cuda_matmul_forward_bf16y(__nv_bfloat16 *y, const float *x, const float *w, int N, int in, int out);
/* the same with x given in bf16 */
extern "C" void cuda_matmul_forward_bf16xy(__nv_bfloat16 *y, const __nv_bfloat16 *xb, const float *w, int N, int in,
                                           int out);

static inline unsigned ceil_div_u(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

/* streaming multiprocessors of the current device (read once), for sizing grids */
static inline int cuda_num_sms(void)
{
    static int sms;
    if (!sms) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    }
    return sms;
}

/* 16-byte alignment, the condition for float4 loads and stores */
static inline int cuda_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

#endif
