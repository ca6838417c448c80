/* dist.h: the distributed runtime (DESIGN.md, "Distributed runtime").
 *
 * Every rank is one MPI process bound to one device. Ranks form three groups:
 *   DIST_WORLD  all ranks: data parallel for every tensor but the routed experts;
 *   DIST_EP     the --ep consecutive ranks that split one copy of the routed experts
 *               between them (tokens travel inside this group by all-to-all);
 *   DIST_EDP    the world / ep ranks that hold the same experts (expert gradients are
 *               reduced over them).
 * Rank r is member (r mod ep) of EP group r / ep and member r / ep of EDP group r mod ep.
 *
 * One collective API serves both backends: on the CPU backend the buffers are host
 * memory and MPI moves them; on the CUDA backend they are device memory and NCCL moves
 * them (communicators bootstrapped over MPI, on the backend's stream), or MPI through
 * host copies when the build has no NCCL. A failing collective ends every rank through
 * die() with the call and the rank; with one rank every call is a no-op.
 */
#ifndef DELTAMLA_DIST_H
#define DELTAMLA_DIST_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "config.h"

enum { DIST_WORLD, DIST_EP, DIST_EDP, DIST_GROUPS };

typedef struct dist {
    int rank, world;          /* in MPI_COMM_WORLD */
    int local_rank, local_size; /* among the ranks of this node */
    int ep, ep_rank;          /* size of and position in DIST_EP */
    int edp, edp_rank;        /* size of and position in DIST_EDP */
    int size[DIST_GROUPS], pos[DIST_GROUPS]; /* the same, indexed by group */
    const backend *be;
    int device;               /* CUDA device used, -1 on the CPU */
    int use_nccl;             /* collectives on device buffers through NCCL */
    void *mpi_comm[DIST_GROUPS];  /* MPI_Comm, stored opaquely */
    void *nccl_comm[DIST_GROUPS]; /* ncclComm_t or NULL */
    int timing;               /* synchronise around collectives and time them */
    double t_reduce, t_alltoall;  /* seconds in gradient reduction and expert all-to-all */
    int64_t alltoall_bytes;   /* bytes sent by expert all-to-all calls */
} dist;

/* Ranks, groups and the device from the run's config (--ep, --device): checks the
 * layout (ep divides the rank count) and dies with one line if it is impossible. Picks
 * the backend: with CUDA, the node-local rank chooses among the visible GPUs (so Slurm's
 * per-task CUDA_VISIBLE_DEVICES and a whole-node list both work). Collective. */
void dist_init(dist *d, const config *c);
void dist_free(dist *d);

/* Sum n floats over the group, in place. */
void dist_allreduce(dist *d, int group, float *buf, size_t n);
/* Sum n int32 values in backend memory over the group, in place (routing loads). */
void dist_allreduce_i32(dist *d, int group, int32_t *buf, size_t n);
/* Sum n doubles or int64 host values over the group, in place (always host memory). */
void dist_allreduce_host_f64(dist *d, int group, double *buf, int n);
void dist_allreduce_host_i64(dist *d, int group, int64_t *buf, int n);

/* Every member r's segment [offs[r], offs[r] + counts[r]) of buf (floats) is copied to
 * every other member's buf: an in-place all-gather of segments of any length. */
void dist_allgather_segments(dist *d, int group, float *buf, const size_t *offs, const size_t *counts);

/* All-to-all of rows of `width` floats within the group: send holds, for member r in
 * order, sendrows[r] rows for r; recv receives recvrows[r] rows from r, in member order. */
void dist_alltoallv(dist *d, int group, const float *send, const int64_t *sendrows, float *recv,
                    const int64_t *recvrows, int width);
/* The same for host int32 rows of width 1 (expert ids travelling with the rows). */
void dist_alltoallv_host_i32(dist *d, int group, const int32_t *send, const int64_t *sendrows, int32_t *recv,
                             const int64_t *recvrows);
/* Exchange one int64 per member: recv[r] = what member r sent to this rank (send[me]). */
void dist_alltoall_host_i64(dist *d, int group, const int64_t *send, int64_t *recv);

/* Asynchronous gradient reduction, overlapped with the backward pass on the GPU: the sum
 * over the group of buf[0, n) is started on a side stream once the work queued so far
 * (the backward that produced it) is done; dist_reduce_wait makes later work wait for
 * every started reduction. On the CPU the sum runs at once. */
void dist_reduce_start(dist *d, int group, float *buf, size_t n);
void dist_reduce_wait(dist *d);

/* Wait for every rank (host barrier). */
void dist_barrier(dist *d);

/* The calling process's dist (set by dist_init), or NULL before it. */
dist *dist_current(void);

#endif
