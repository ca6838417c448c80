/* bench_alltoall.c: the bandwidth of the all-to-all that expert parallelism uses
 * (dist_alltoallv: NCCL grouped send/recv on GPUs, MPI_Alltoallv on the CPU), on equal
 * splits of a buffer of a given size per rank, so that the exchange inside training
 * (deltamla train --comm_timing) can be put next to the collective alone.
 *
 *   mpirun -np 4 build/bench/bench_alltoall [--device cuda|cpu] [--mib 64] [--iters 20]
 *
 * Prints the time per call and the bytes each rank sends to the other ranks per second,
 * which is nccl-tests' "bus bandwidth" of all-to-all (buffer size / time x (n - 1) / n)
 * and the figure `--comm_timing` reports for the exchange inside training.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "config.h"
#include "dist.h"
#include "util.h"

int main(int argc, char **argv)
{
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    config c;
    config_defaults(&c);
    double mib = 64;
    int iters = 20, width = 256;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) snprintf(c.device, sizeof c.device, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = atof(argv[++i]);
        else if (!strcmp(argv[i], "--iters") && i + 1 < argc) iters = atoi(argv[++i]);
        else die("bench_alltoall: unknown argument %s (flags: --device cuda|cpu, --mib M, --iters N)", argv[i]);
    }
    c.ep = 1;
    dist d;
    dist_init(&d, &c);
    int n = d.world;
    int64_t rows_total = (int64_t)(mib * 1048576.0 / (width * sizeof(float)));
    int64_t per = rows_total / n;
    rows_total = per * n;
    int64_t *rows = xmalloc((size_t)n * sizeof *rows);
    for (int r = 0; r < n; r++) rows[r] = per;
    const backend *be = d.be;
    float *send = be->alloc((size_t)rows_total * width * sizeof(float));
    float *recv = be->alloc((size_t)rows_total * width * sizeof(float));
    /* the exchange over the world group: alltoallv within DIST_EP needs ep = world */
    int group = DIST_WORLD;
    for (int i = 0; i < 3; i++) dist_alltoallv(&d, group, send, rows, recv, rows, width);
    be->sync();
    dist_barrier(&d);
    double t0 = wall_time();
    for (int i = 0; i < iters; i++) dist_alltoallv(&d, group, send, rows, recv, rows, width);
    be->sync();
    dist_barrier(&d);
    double dt = (wall_time() - t0) / iters;
    double bytes_out = (double)per * (n - 1) * width * sizeof(float);
    if (d.rank == 0)
        printf("all-to-all on %d ranks (%s, %s): %.1f MiB per rank, %.3f ms per call, %.1f GB/s sent to other ranks "
               "per rank (nccl-tests' bus bandwidth)\n",
               n, be->name, d.use_nccl ? "NCCL" : "MPI", mib, 1e3 * dt, bytes_out / dt / 1e9);
    be->free(send);
    be->free(recv);
    free(rows);
    dist_free(&d);
    MPI_Finalize();
    return 0;
}
