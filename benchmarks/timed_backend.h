/* timed_backend.h: wraps a backend so that every op is timed (synchronising before and
 * after it) and charged to its op family, with the FLOPs of the matrix work counted
 * from the shapes. For profiling passes only: the synchronisation costs throughput. */
#ifndef DELTAMLA_TIMED_BACKEND_H
#define DELTAMLA_TIMED_BACKEND_H

#include "backend.h"

typedef enum op_family {
    FAM_GEMM_FWD, FAM_GEMM_BWD, FAM_NORM, FAM_ELEMENTWISE, FAM_CONV, FAM_GDN_FWD, FAM_GDN_BWD,
    FAM_MLA_PREP, FAM_ATTN_FWD, FAM_ATTN_BWD, FAM_MOE_ROUTE, FAM_MOE_EXPERTS_FWD, FAM_MOE_EXPERTS_BWD,
    FAM_HEAD_LOSS_FWD, FAM_HEAD_LOSS_BWD, FAM_OPTIMIZER, FAM_MEMORY, FAM_COUNT
} op_family;

typedef struct family_stats {
    const char *name;
    double seconds;
    double flops;   /* matrix FLOPs counted from shapes (0 where not counted) */
    double bytes;   /* minimum bytes moved: each input read once, each output written once */
    long calls;
} family_stats;

/* the dense GEMMs (matmul_forward, matmul_forward_add: the forward with a residual, its
 * own rows; matmul_backward; the multi ops, by their parts' summed outputs) by shape, the fused SwiGLU MLPs (mlp_forward, mlp_backward:
 * both GEMMs and the SwiGLU of one call) by shape, and the optimizer's calls: Muon batches
 * by count and shape, AdamW runs all in one row */
enum { SHAPE_GEMM_FWD, SHAPE_GEMM_BWD, SHAPE_MUON, SHAPE_ADAMW, SHAPE_GEMM_FWD_ADD, SHAPE_MLP_FWD, SHAPE_MLP_BWD,
       SHAPE_GEMM_FWD_MULTI, SHAPE_GEMM_BWD_MULTI };
typedef struct gemm_shape_stats {
    int kind, dx, dw; /* SHAPE_*; for the backward, which gradients it made (MLP, multi: dx 1 added, 2 set);
                       * multi: dw is the number of parts */
    int N, in, out;   /* Muon: N matrices of in x out; MLP: N rows, in = d, out = h; multi: out summed */
    double seconds, flops, bytes;
    long calls;
} gemm_shape_stats;

/* A backend that forwards to inner and records into the stats below. */
const backend *timed_backend(const backend *inner);
family_stats *timed_stats(void);
/* the GEMM shapes seen since the last reset, *count of them */
const gemm_shape_stats *timed_gemm_shapes(int *count);
void timed_reset(void);

#endif
