/* mlp.cu: the SwiGLU MLP as one op on the GPU (contract: mlp_forward / mlp_backward in
 * src/backend.h): gu = x W_gu^T, act = swiglu(gu), out = resid + act W_down^T, and its
 * backward.
 *
 * Why one op: the dense GEMMs (matmul.cu) multiply bf16 copies of fp32 operands. Run as
 * separate ops, the MLP writes act in fp32 and rounds it to bf16 twice (down projection,
 * dW_down), and writes dgu [N, 2h] in fp32 only to round it to bf16 for the two gate/up
 * gradients: at N = 16384, h = 4096 about 1.5 GB of traffic per MLP per step that carries
 * nothing the GEMMs use. Here the SwiGLU kernels write those operands in bf16 directly
 * (elementwise.cu, the rounding cuda_to_bf16 would give), and the GEMMs take them as they
 * are (matmul.cu's bf16x entry points):
 *   forward   gu (bf16, saved) = x W_gu^T            the GEMM writes bf16
 *             act (bf16, saved) = swiglu(gu)
 *             out = resid + act W_down^T             cuBLASLt, C = resid, D = out
 *   backward  dact (bf16, scratch) = dout W_down     dout, W_down rounded once
 *             dW_down += dout^T act                  the saved bf16 act as it is
 *             dgu (bf16, scratch) = swiglu'(dact, gu)
 *             dx (+)= dgu W_gu; dW_gu += dgu^T x     W_gu rounded once, x as the forward
 *                                                    rounded it (mlp_x_stash)
 * Every GEMM operand is the bf16 value the op-by-op sequence would have used, so the
 * results are that sequence's up to cuBLAS's choice of algorithm, except that the SwiGLU
 * and its gradient read gu rounded to bf16, as a bf16-autocast PyTorch MLP keeps it: the
 * fp32 gu was a 512 MB write and two 512 MB reads per MLP per step at N = 16384, h =
 * 4096; and that the SwiGLU gradient reads dact rounded to bf16 (as autocast does too),
 * which halves that GEMM's output and the gradient kernel's read of it (256 MB each at
 * those sizes). tests/gpu/test_gpu_dense.c holds both paths to the CPU oracle.
 *
 * Shapes whose down projection is not on the bf16 path (small or skinny: cuda_matmul_
 * bf16_path(N, h, d) false; the gate/up projection, twice as wide, is then on it too or
 * not at all worth the bother) run the separate ops on fp32 buffers, and gu and act hold
 * fp32. The choice depends on N, d and h alone, so a backward reads gu and act in the
 * format the forward of the same shape wrote; nothing but mlp_backward reads them.
 */
#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "cuda_ops.h"
}

/* backend.h's scratch layout (mlp_scratch_dgu_offset): dact [N, h] fp32 first, dgu from
 * the next multiple of 64 floats (256 bytes: aligned for the SwiGLU kernel's wide stores
 * and for cuBLAS) */

/* act and dgu in bf16 (1) or the separate fp32 ops (0) */
static int mlp_fused(int N, int d, int h) { return cuda_matmul_bf16_path(N, h, d); }

/* Where the fused forward keeps x's bf16 rounding for the backward's dW_gu: in gu's
 * storage (N*2h floats) past gu's bf16 values (N*2h of them, the first half), from a
 * multiple of 128 elements; NULL where it does not fit (d > 2h, about). The backward then
 * multiplies the copy the forward made instead of rounding x again (a pass over
 * 96 MiB per MLP at N = 16384, d = 1024). */
static __nv_bfloat16 *mlp_x_stash(const float *gu, int N, int d, int h)
{
    const size_t at = ((size_t)N * 2 * h + 127) & ~(size_t)127;
    if (at + (size_t)N * d > (size_t)N * 4 * h) return NULL;
    return (__nv_bfloat16 *)gu + at;
}

/* out [N, d] = resid [N, d] + swiglu(x [N, d] w_gu [2h, d]^T) w_down [d, h]^T; gu [N, 2h]
 * and act (N*h floats of storage) saved for the backward; resid may be out. Device
 * pointers. */
extern "C" void cuda_mlp_forward(float *out, float *gu, float *act, const float *x, const float *w_gu,
                                 const float *w_down, const float *resid, int N, int d, int h, int silu_first)
{
    if (!mlp_fused(N, d, h)) {
        cuda_matmul_forward(gu, x, w_gu, N, d, 2 * h);
        cuda_swiglu_forward(act, gu, N, h, silu_first);
        cuda_matmul_forward_add(out, act, w_down, resid, N, h, d);
        return;
    }
    /* gu [N, 2h] and act [N, h] in bf16, each in the first half of its storage */
    __nv_bfloat16 *gu_b = (__nv_bfloat16 *)gu, *act_b = (__nv_bfloat16 *)act, *x_b = mlp_x_stash(gu, N, d, h);
    if (x_b) {
        cuda_to_bf16(x_b, x, (size_t)N * d);
        cuda_matmul_forward_bf16xy(gu_b, x_b, w_gu, N, d, 2 * h);
    } else {
        cuda_matmul_forward_bf16y(gu_b, x, w_gu, N, d, 2 * h);
    }
    cuda_swiglu_forward_bf16in(act_b, gu_b, N, h, silu_first);
    cuda_matmul_forward_bf16x(out, act_b, w_down, resid, N, h, d);
}

/* dx_beta 1: dx accumulates; 0: dx is written */
static void mlp_backward(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x, const float *gu,
                         const float *act, const float *w_gu, const float *w_down, float *scratch, int N, int d,
                         int h, int silu_first, float dx_beta)
{
    float *dact = scratch;
    if (!mlp_fused(N, d, h)) {
        float *dgu = scratch + mlp_scratch_dgu_offset(N, h);
        cuda_matmul_backward_set(dact, dw_down, dout, act, w_down, N, h, d);
        cuda_swiglu_backward_set(dgu, dact, gu, N, h, silu_first);
        if (dx_beta == 0.0f) cuda_matmul_backward_set(dx, dw_gu, dgu, x, w_gu, N, d, 2 * h);
        else cuda_matmul_backward(dx, dw_gu, dgu, x, w_gu, N, d, 2 * h);
        return;
    }
    __nv_bfloat16 *dgu_b = (__nv_bfloat16 *)(scratch + mlp_scratch_dgu_offset(N, h)), *dact_b = (__nv_bfloat16 *)dact;
    cuda_matmul_backward_bf16dx(dact_b, dw_down, dout, (const __nv_bfloat16 *)act, w_down, N, h, d);
    cuda_swiglu_backward_set_bf16dy(dgu_b, dact_b, (const __nv_bfloat16 *)gu, N, h, silu_first);
    cuda_matmul_backward_bf16x(dx, dw_gu, NULL, dgu_b, x, mlp_x_stash(gu, N, d, h), w_gu, N, d, 2 * h, dx_beta);
}

/* dx [N, d] += dgu w_gu; dw_gu [2h, d] += dgu^T x; dw_down [d, h] += dout^T act, dgu the
 * SwiGLU gradient of dact = dout w_down; scratch: mlp_scratch_floats(N, h) floats (its
 * contents do not matter). Device pointers. */
extern "C" void cuda_mlp_backward(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                                  const float *gu, const float *act, const float *w_gu, const float *w_down,
                                  float *scratch, int N, int d, int h, int silu_first)
{
    mlp_backward(dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, silu_first, 1.0f);
}

/* as cuda_mlp_backward, but dx = dgu w_gu (dx not read) */
extern "C" void cuda_mlp_backward_set(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                                      const float *gu, const float *act, const float *w_gu, const float *w_down,
                                      float *scratch, int N, int d, int h, int silu_first)
{
    mlp_backward(dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, silu_first, 0.0f);
}
