/* dist.c: see dist.h. MPI groups and collectives, NCCL bootstrap, the device choice. */
#define _POSIX_C_SOURCE 200809L
#include "dist.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "util.h"

#if defined(DELTAMLA_HAVE_CUDA) && defined(DELTAMLA_HAVE_NCCL)
#include "../kernels/cuda_nccl.h"
#define DIST_NCCL 1
#else
#define DIST_NCCL 0
#endif

static dist *current;

dist *dist_current(void) { return current; }

static MPI_Comm comm_of(const dist *d, int group) { return *(MPI_Comm *)d->mpi_comm[group]; }

/* MPI calls return their error (MPI_ERRORS_RETURN on our communicators); a failure ends
 * every rank with the call and the rank. */
static void mpi_check(const dist *d, int rc, const char *call)
{
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    die("%s failed on rank %d of %d: %s", call, d->rank, d->world, msg);
}

void dist_init(dist *d, const config *c)
{
    memset(d, 0, sizeof *d);
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->world);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (d->world % c->ep != 0)
        die("--ep %d does not divide the %d ranks of this run (the ranks form groups of ep that split the experts)",
            c->ep, d->world);
    d->ep = c->ep;
    d->ep_rank = d->rank % c->ep;
    d->edp = d->world / c->ep;
    d->edp_rank = d->rank / c->ep;
    d->size[DIST_WORLD] = d->world;
    d->pos[DIST_WORLD] = d->rank;
    d->size[DIST_EP] = d->ep;
    d->pos[DIST_EP] = d->ep_rank;
    d->size[DIST_EDP] = d->edp;
    d->pos[DIST_EDP] = d->edp_rank;

    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d->rank, MPI_INFO_NULL, &local);
    MPI_Comm_rank(local, &d->local_rank);
    MPI_Comm_size(local, &d->local_size);
    MPI_Comm_free(&local);

    for (int g = 0; g < DIST_GROUPS; g++) d->mpi_comm[g] = xmalloc(sizeof(MPI_Comm));
    MPI_Comm_dup(MPI_COMM_WORLD, (MPI_Comm *)d->mpi_comm[DIST_WORLD]);
    MPI_Comm_split(MPI_COMM_WORLD, d->rank / c->ep, d->ep_rank, (MPI_Comm *)d->mpi_comm[DIST_EP]);
    MPI_Comm_split(MPI_COMM_WORLD, d->ep_rank, d->edp_rank, (MPI_Comm *)d->mpi_comm[DIST_EDP]);
    for (int g = 0; g < DIST_GROUPS; g++) MPI_Comm_set_errhandler(comm_of(d, g), MPI_ERRORS_RETURN);

    /* the backend: with CUDA, the node-local rank picks among the visible GPUs */
    int want_cuda = strcmp(c->device, "cuda") == 0;
    d->device = -1;
#ifdef DELTAMLA_HAVE_CUDA
    int gpus = cuda_device_count();
    if (want_cuda || (strcmp(c->device, "auto") == 0 && gpus > 0)) {
        if (gpus == 0) die("--device cuda: no GPU is visible on rank %d", d->rank);
        if (d->local_size > gpus && d->rank == 0)
            fprintf(stderr, "deltamla: warning: %d ranks on a node with %d visible GPUs: GPUs are shared\n",
                    d->local_size, gpus);
        d->device = d->local_rank % gpus;
        d->be = backend_cuda(d->device);
    }
#else
    if (want_cuda) die("--device cuda: this build has no CUDA backend (nvcc was not found at build time)");
#endif
    if (!d->be) d->be = backend_cpu();

#if DIST_NCCL
    if (d->device >= 0 && d->world > 1) {
        size_t idb = cuda_nccl_id_bytes();
        char *id = xmalloc(idb);
        if (d->rank == 0) cuda_nccl_get_id(id);
        mpi_check(d, MPI_Bcast(id, (int)idb, MPI_BYTE, 0, comm_of(d, DIST_WORLD)), "MPI_Bcast (NCCL id)");
        d->nccl_comm[DIST_WORLD] = cuda_nccl_init(id, d->world, d->rank);
        d->nccl_comm[DIST_EP] = cuda_nccl_split(d->nccl_comm[DIST_WORLD], d->rank / c->ep, d->ep_rank);
        d->nccl_comm[DIST_EDP] = cuda_nccl_split(d->nccl_comm[DIST_WORLD], d->ep_rank, d->edp_rank);
        free(id);
        d->use_nccl = 1;
    }
#endif
    current = d;
}

void dist_free(dist *d)
{
#if DIST_NCCL
    for (int g = DIST_GROUPS - 1; g >= 0; g--) cuda_nccl_free(d->nccl_comm[g]);
#endif
    for (int g = 0; g < DIST_GROUPS; g++) {
        if (!d->mpi_comm[g]) continue;
        MPI_Comm_free((MPI_Comm *)d->mpi_comm[g]);
        free(d->mpi_comm[g]);
    }
    if (current == d) current = NULL;
    memset(d, 0, sizeof *d);
}

/* Device buffers without NCCL go through host copies. */
static int staged(const dist *d) { return d->device >= 0 && !d->use_nccl; }

void dist_allreduce(dist *d, int group, float *buf, size_t n)
{
    if (d->size[group] == 1 || n == 0) return;
#if DIST_NCCL
    if (d->use_nccl) {
        cuda_nccl_allreduce(d->nccl_comm[group], buf, n, 0);
        return;
    }
#endif
    float *h = buf;
    if (staged(d)) {
        h = xmalloc(n * sizeof(float));
        d->be->to_host(h, buf, n * sizeof(float));
    }
    /* MPI counts are int: large buffers go in pieces */
    for (size_t off = 0; off < n; off += (size_t)1 << 30) {
        size_t len = n - off < ((size_t)1 << 30) ? n - off : ((size_t)1 << 30);
        mpi_check(d, MPI_Allreduce(MPI_IN_PLACE, h + off, (int)len, MPI_FLOAT, MPI_SUM, comm_of(d, group)),
                  "MPI_Allreduce");
    }
    if (h != buf) {
        d->be->from_host(buf, h, n * sizeof(float));
        free(h);
    }
}

void dist_allreduce_i32(dist *d, int group, int32_t *buf, size_t n)
{
    if (d->size[group] == 1 || n == 0) return;
    if (n > 0x7fffffff) die("an int32 all-reduce of %zu values is beyond MPI's int counts", n);
#if DIST_NCCL
    if (d->use_nccl) {
        cuda_nccl_allreduce_i32(d->nccl_comm[group], buf, n);
        return;
    }
#endif
    int32_t *h = buf;
    if (staged(d)) {
        h = xmalloc(n * sizeof *h);
        d->be->to_host(h, buf, n * sizeof *h);
    }
    mpi_check(d, MPI_Allreduce(MPI_IN_PLACE, h, (int)n, MPI_INT32_T, MPI_SUM, comm_of(d, group)), "MPI_Allreduce");
    if (h != buf) {
        d->be->from_host(buf, h, n * sizeof *h);
        free(h);
    }
}

void dist_allreduce_host_f64(dist *d, int group, double *buf, int n)
{
    if (d->size[group] == 1 || n == 0) return;
    mpi_check(d, MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, comm_of(d, group)), "MPI_Allreduce");
}

void dist_allreduce_host_i64(dist *d, int group, int64_t *buf, int n)
{
    if (d->size[group] == 1 || n == 0) return;
    mpi_check(d, MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_INT64_T, MPI_SUM, comm_of(d, group)), "MPI_Allreduce");
}

static int *int_counts(const dist *d, const size_t *v, int n, size_t scale, const char *what)
{
    int *out = xmalloc((size_t)n * sizeof(int));
    for (int r = 0; r < n; r++) {
        size_t x = v[r] * scale;
        if (x > 0x7fffffff) die("%s of %zu floats is beyond MPI's int counts on rank %d", what, x, d->rank);
        out[r] = (int)x;
    }
    return out;
}

void dist_allgather_segments(dist *d, int group, float *buf, const size_t *offs, const size_t *counts)
{
    int n = d->size[group];
    if (n == 1) return;
#if DIST_NCCL
    if (d->use_nccl) {
        cuda_nccl_broadcast_segments(d->nccl_comm[group], buf, offs, counts, n);
        return;
    }
#endif
    size_t lo = (size_t)-1, hi = 0;
    for (int r = 0; r < n; r++) {
        if (!counts[r]) continue;
        if (offs[r] < lo) lo = offs[r];
        if (offs[r] + counts[r] > hi) hi = offs[r] + counts[r];
    }
    if (hi == 0) return;
    float *h = buf;
    if (staged(d)) {
        h = xmalloc(hi * sizeof(float));
        d->be->to_host(h + lo, buf + lo, (hi - lo) * sizeof(float));
    }
    int *cnt = int_counts(d, counts, n, 1, "an all-gather segment");
    int *dsp = int_counts(d, offs, n, 1, "an all-gather offset");
    mpi_check(d, MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, h, cnt, dsp, MPI_FLOAT, comm_of(d, group)),
              "MPI_Allgatherv");
    free(cnt);
    free(dsp);
    if (h != buf) {
        d->be->from_host(buf + lo, h + lo, (hi - lo) * sizeof(float));
        free(h);
    }
}

void dist_alltoallv(dist *d, int group, const float *send, const int64_t *sendrows, float *recv,
                    const int64_t *recvrows, int width)
{
    int n = d->size[group];
    double t0 = 0;
    if (d->timing) {
        d->be->sync();
        t0 = wall_time();
    }
    size_t *so = xmalloc(4 * (size_t)n * sizeof(size_t)), *sc = so + n, *ro = so + 2 * n, *rc = so + 3 * n;
    size_t s_total = 0, r_total = 0;
    for (int r = 0; r < n; r++) {
        so[r] = s_total;
        sc[r] = (size_t)sendrows[r] * (size_t)width;
        s_total += sc[r];
        ro[r] = r_total;
        rc[r] = (size_t)recvrows[r] * (size_t)width;
        r_total += rc[r];
    }
    d->alltoall_bytes += (int64_t)((s_total - sc[d->pos[group]]) * sizeof(float));
#if DIST_NCCL
    if (d->use_nccl) {
        cuda_nccl_alltoallv(d->nccl_comm[group], send, so, sc, recv, ro, rc, n);
    } else
#endif
    {
        const float *hs = send;
        float *hr = recv;
        if (staged(d)) {
            float *t = xmalloc((s_total + 1) * sizeof(float));
            d->be->to_host(t, send, s_total * sizeof(float));
            hs = t;
            hr = xmalloc((r_total + 1) * sizeof(float));
        }
        int *isc = int_counts(d, sc, n, 1, "an all-to-all part"), *iso = int_counts(d, so, n, 1, "an all-to-all offset");
        int *irc = int_counts(d, rc, n, 1, "an all-to-all part"), *iro = int_counts(d, ro, n, 1, "an all-to-all offset");
        mpi_check(d, MPI_Alltoallv(hs, isc, iso, MPI_FLOAT, hr, irc, iro, MPI_FLOAT, comm_of(d, group)),
                  "MPI_Alltoallv");
        free(isc);
        free(iso);
        free(irc);
        free(iro);
        if (hs != send) {
            d->be->from_host(recv, hr, r_total * sizeof(float));
            free((void *)hs);
            free(hr);
        }
    }
    free(so);
    if (d->timing) {
        d->be->sync();
        d->t_alltoall += wall_time() - t0;
    }
}

void dist_alltoallv_host_i32(dist *d, int group, const int32_t *send, const int64_t *sendrows, int32_t *recv,
                             const int64_t *recvrows)
{
    int n = d->size[group];
    int *sc = xmalloc(4 * (size_t)n * sizeof(int)), *so = sc + n, *rc = sc + 2 * n, *ro = sc + 3 * n;
    int64_t s = 0, r = 0;
    for (int i = 0; i < n; i++) {
        sc[i] = (int)sendrows[i];
        so[i] = (int)s;
        s += sendrows[i];
        rc[i] = (int)recvrows[i];
        ro[i] = (int)r;
        r += recvrows[i];
    }
    if (s > 0x7fffffff || r > 0x7fffffff) die("an expert all-to-all of %lld rows is beyond MPI's int counts", (long long)s);
    mpi_check(d, MPI_Alltoallv(send, sc, so, MPI_INT32_T, recv, rc, ro, MPI_INT32_T, comm_of(d, group)),
              "MPI_Alltoallv");
    free(sc);
}

void dist_alltoall_host_i64(dist *d, int group, const int64_t *send, int64_t *recv)
{
    mpi_check(d, MPI_Alltoall(send, 1, MPI_INT64_T, recv, 1, MPI_INT64_T, comm_of(d, group)), "MPI_Alltoall");
}

void dist_reduce_start(dist *d, int group, float *buf, size_t n)
{
    if (d->size[group] == 1 || n == 0) return;
    double t0 = d->timing ? wall_time() : 0;
#if DIST_NCCL
    if (d->use_nccl) {
        cuda_nccl_side_begin();
        cuda_nccl_allreduce(d->nccl_comm[group], buf, n, 1);
        return;
    }
#endif
    dist_allreduce(d, group, buf, n);
    if (d->timing) d->t_reduce += wall_time() - t0;
}

void dist_reduce_wait(dist *d)
{
#if DIST_NCCL
    if (d->use_nccl) {
        double t0 = 0;
        if (d->timing) { /* the exposed part: what the reductions add after the backward */
            d->be->sync();
            t0 = wall_time();
        }
        cuda_nccl_side_join();
        if (d->timing) {
            cuda_nccl_sync(d->nccl_comm, DIST_GROUPS);
            d->t_reduce += wall_time() - t0;
        }
    }
#endif
    (void)d;
}

void dist_barrier(dist *d)
{
    if (d->world == 1) return;
#if DIST_NCCL
    if (d->use_nccl) cuda_nccl_sync(d->nccl_comm, DIST_GROUPS);
#endif
    mpi_check(d, MPI_Barrier(comm_of(d, DIST_WORLD)), "MPI_Barrier");
}
