/* cpu_mlp.c: the SwiGLU MLP (gate/up projection, SwiGLU, down projection) as one op on the
 * CPU, forward and backward (contract: mlp_forward / mlp_backward in src/backend.h).
 *
 * The CPU gains nothing from fusing: the op exists so that the CUDA backend can keep its
 * saved activation and the SwiGLU gradient in bf16 between its GEMMs (kernels/mlp.cu).
 * Here it is the oracle, so it runs the other CPU ops in exactly the order the model ran
 * them before the op existed, and its bits are theirs (tests/test_mlp.c):
 *   forward   gu = x w_gu^T; act = swiglu(gu); out = resid + act w_down^T
 *   backward  dact = dout w_down (written), dw_down += dout^T act;
 *             dgu = swiglu_backward(dact, gu) (written);
 *             dx (+)= dgu w_gu, dw_gu += dgu^T x.
 * act is kept in fp32, the format the CPU backend's mlp_backward reads.
 */
#include "cpu_ops.h"
#include "../backend.h"

#include <string.h>

/* dact at the start of scratch, dgu from the next multiple of 64 floats (256 bytes, so
 * that a backend storing dgu in bf16 finds it aligned for wide loads and for cuBLAS);
 * declared in backend.h, the one definition of the layout kernels/mlp.cu uses too */
size_t mlp_scratch_dgu_offset(int N, int h) { return ((size_t)N * h + 63) & ~(size_t)63; }

/* declared in backend.h for every backend: the CPU's fp32 dact and dgu [N, 2h] is the
 * larger of the layouts (CUDA stores dgu in bf16 in the same place) */
size_t mlp_scratch_floats(int N, int h)
{
    if (N <= 0 || h <= 0) return 64;
    return mlp_scratch_dgu_offset(N, h) + (size_t)N * 2 * h;
}

void cpu_mlp_forward(real *out, real *gu, real *act, const real *x, const real *w_gu, const real *w_down,
                     const real *resid, int N, int d, int h, int silu_first)
{
    cpu_matmul_forward(gu, x, w_gu, N, d, 2 * h);
    cpu_swiglu_forward(act, gu, N, h, silu_first);
    cpu_matmul_forward_add(out, act, w_down, resid, N, h, d);
}

/* dx_set 1: dx is written (zeroed, then accumulated into: the bits of matmul_backward_set) */
static void mlp_backward(real *dx, real *dw_gu, real *dw_down, const real *dout, const real *x, const real *gu,
                         const real *act, const real *w_gu, const real *w_down, real *scratch, int N, int d, int h,
                         int silu_first, int dx_set)
{
    if (N <= 0 || d <= 0) return;
    real *dact = scratch, *dgu = scratch + mlp_scratch_dgu_offset(N, h);
    if (dx_set) memset(dx, 0, (size_t)N * d * sizeof *dx);
    if (h <= 0) return; /* every sum is empty: dx is zero or unchanged, no weight has entries */
    memset(dact, 0, (size_t)N * h * sizeof *dact);
    cpu_matmul_backward(dact, dw_down, dout, act, w_down, N, h, d);
    memset(dgu, 0, (size_t)N * 2 * h * sizeof *dgu);
    cpu_swiglu_backward(dgu, dact, gu, N, h, silu_first);
    cpu_matmul_backward(dx, dw_gu, dgu, x, w_gu, N, d, 2 * h);
}

void cpu_mlp_backward(real *dx, real *dw_gu, real *dw_down, const real *dout, const real *x, const real *gu,
                      const real *act, const real *w_gu, const real *w_down, real *scratch, int N, int d, int h,
                      int silu_first)
{
    mlp_backward(dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, silu_first, 0);
}

void cpu_mlp_backward_set(real *dx, real *dw_gu, real *dw_down, const real *dout, const real *x, const real *gu,
                          const real *act, const real *w_gu, const real *w_down, real *scratch, int N, int d, int h,
                          int silu_first)
{
    mlp_backward(dx, dw_gu, dw_down, dout, x, gu, act, w_gu, w_down, scratch, N, d, h, silu_first, 1);
}
