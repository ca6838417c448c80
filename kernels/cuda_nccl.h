/* cuda_nccl.h: the NCCL collectives of kernels/nccl.cu, for src/dist.c. Buffers are
 * device memory; work goes to the backend's stream (cuda_stream()) or, for `side`
 * reductions, to a side stream ordered after the compute stream by
 * cuda_nccl_side_begin and joined back by cuda_nccl_side_join. Counts are floats. */
#ifndef DELTAMLA_CUDA_NCCL_H
#define DELTAMLA_CUDA_NCCL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

size_t cuda_nccl_id_bytes(void);
void cuda_nccl_get_id(void *id);
void *cuda_nccl_init(const void *id, int nranks, int rank);
void *cuda_nccl_split(void *parent, int color, int key);
void cuda_nccl_free(void *comm);
void cuda_nccl_allreduce(void *comm, float *buf, size_t n, int side);
void cuda_nccl_allreduce_i32(void *comm, int32_t *buf, size_t n);
void cuda_nccl_broadcast_segments(void *comm, float *buf, const size_t *offs, const size_t *counts, int nranks);
void cuda_nccl_alltoallv(void *comm, const float *send, const size_t *soff, const size_t *scount, float *recv,
                         const size_t *roff, const size_t *rcount, int nranks);
void cuda_nccl_side_begin(void);
void cuda_nccl_side_join(void);
void cuda_nccl_sync(void *const *comms, int n);

#ifdef __cplusplus
}
#endif

#endif
