/* nccl.cu: NCCL collectives on the CUDA backend's stream, for the distributed runtime
 * (src/dist.c). Communicators are bootstrapped by dist.c over MPI (the unique id is
 * broadcast from rank 0) and split into the rank groups with ncclCommSplit.
 *
 * Gradient reductions may run on a side stream: cuda_nccl_side_begin makes the side
 * stream wait for everything queued on the compute stream so far (the backward that
 * produced the gradients), and cuda_nccl_side_join makes the compute stream wait for
 * the side stream. Every NCCL failure ends the process through die() with the call, the
 * rank and NCCL's reason; an asynchronous error (a peer that died) is polled for while
 * waiting, so a broken job ends instead of hanging.
 */
#include <cuda_runtime.h>
#include <nccl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cuda_common.cuh"
#include "cuda_nccl.h"

extern "C" {
#include "util.h"
}

static cudaStream_t side_stream;
static cudaEvent_t ev_compute, ev_side;
static int side_pending;

static void nccl_check(ncclResult_t r, const char *call, ncclComm_t comm)
{
    if (r == ncclSuccess || r == ncclInProgress) return;
    int rank = -1;
    if (comm) ncclCommUserRank(comm, &rank);
    const char *last = ncclGetLastError(comm);
    die("%s failed on rank %d: %s%s%s", call, rank, ncclGetErrorString(r), last && *last ? ": " : "",
        last ? last : "");
}

extern "C" size_t cuda_nccl_id_bytes(void) { return sizeof(ncclUniqueId); }

extern "C" void cuda_nccl_get_id(void *id)
{
    ncclUniqueId u;
    nccl_check(ncclGetUniqueId(&u), "ncclGetUniqueId", NULL);
    memcpy(id, &u, sizeof u);
}

extern "C" void *cuda_nccl_init(const void *id, int nranks, int rank)
{
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclComm_t comm;
    nccl_check(ncclCommInitRank(&comm, nranks, u, rank), "ncclCommInitRank", NULL);
    if (!side_stream) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream, cudaStreamNonBlocking));
        CUDA_CHECK(cudaEventCreateWithFlags(&ev_compute, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&ev_side, cudaEventDisableTiming));
    }
    return comm;
}

extern "C" void *cuda_nccl_split(void *parent, int color, int key)
{
    ncclComm_t out = NULL;
    nccl_check(ncclCommSplit((ncclComm_t)parent, color, key, &out, NULL), "ncclCommSplit", (ncclComm_t)parent);
    return out;
}

extern "C" void cuda_nccl_free(void *comm)
{
    if (comm) ncclCommDestroy((ncclComm_t)comm);
}

static cudaStream_t pick(int side) { return side ? side_stream : cuda_stream(); }

extern "C" void cuda_nccl_allreduce(void *comm, float *buf, size_t n, int side)
{
    if (!n) return;
    nccl_check(ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, (ncclComm_t)comm, pick(side)), "ncclAllReduce",
               (ncclComm_t)comm);
}

extern "C" void cuda_nccl_allreduce_i32(void *comm, int32_t *buf, size_t n)
{
    if (!n) return;
    nccl_check(ncclAllReduce(buf, buf, n, ncclInt32, ncclSum, (ncclComm_t)comm, cuda_stream()), "ncclAllReduce",
               (ncclComm_t)comm);
}

extern "C" void cuda_nccl_broadcast_segments(void *comm, float *buf, const size_t *offs, const size_t *counts, int nranks)
{
    ncclComm_t c = (ncclComm_t)comm;
    nccl_check(ncclGroupStart(), "ncclGroupStart", c);
    for (int r = 0; r < nranks; r++)
        if (counts[r])
            nccl_check(ncclBroadcast(buf + offs[r], buf + offs[r], counts[r], ncclFloat32, r, c, cuda_stream()),
                       "ncclBroadcast", c);
    nccl_check(ncclGroupEnd(), "ncclGroupEnd", c);
}

extern "C" void cuda_nccl_alltoallv(void *comm, const float *send, const size_t *soff, const size_t *scount, float *recv,
                                    const size_t *roff, const size_t *rcount, int nranks)
{
    ncclComm_t c = (ncclComm_t)comm;
    nccl_check(ncclGroupStart(), "ncclGroupStart", c);
    for (int r = 0; r < nranks; r++) {
        if (scount[r]) nccl_check(ncclSend(send + soff[r], scount[r], ncclFloat32, r, c, cuda_stream()), "ncclSend", c);
        if (rcount[r]) nccl_check(ncclRecv(recv + roff[r], rcount[r], ncclFloat32, r, c, cuda_stream()), "ncclRecv", c);
    }
    nccl_check(ncclGroupEnd(), "ncclGroupEnd", c);
}

extern "C" void cuda_nccl_side_begin(void)
{
    CUDA_CHECK(cudaEventRecord(ev_compute, cuda_stream()));
    CUDA_CHECK(cudaStreamWaitEvent(side_stream, ev_compute, 0));
    side_pending = 1;
}

extern "C" void cuda_nccl_side_join(void)
{
    if (!side_pending) return;
    CUDA_CHECK(cudaEventRecord(ev_side, side_stream));
    CUDA_CHECK(cudaStreamWaitEvent(cuda_stream(), ev_side, 0));
    side_pending = 0;
}

/* Wait for the compute stream while polling each communicator for an asynchronous
 * error (a peer that died mid-collective leaves the others spinning otherwise). */
extern "C" void cuda_nccl_sync(void *const *comms, int n)
{
    cudaEvent_t ev;
    CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventRecord(ev, cuda_stream()));
    for (;;) {
        cudaError_t q = cudaEventQuery(ev);
        if (q == cudaSuccess) break;
        if (q != cudaErrorNotReady) CUDA_CHECK(q);
        for (int i = 0; i < n; i++) {
            if (!comms[i]) continue;
            ncclResult_t async = ncclSuccess;
            ncclCommGetAsyncError((ncclComm_t)comms[i], &async);
            if (async != ncclSuccess && async != ncclInProgress) {
                ncclCommAbort((ncclComm_t)comms[i]);
                nccl_check(async, "an NCCL collective (asynchronous error)", NULL);
            }
        }
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    CUDA_CHECK(cudaEventDestroy(ev));
}
