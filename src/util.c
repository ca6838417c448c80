/* util.c: see util.h. */
#define _POSIX_C_SOURCE 200809L
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef DELTAMLA_HAVE_MPI
#include <mpi.h>
#endif

void die(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
#ifdef DELTAMLA_HAVE_MPI
    {
        /* An error every rank meets (a bad flag, a missing file) should print once: ranks
         * other than 0 wait a moment, and rank 0's MPI_Abort usually ends them first. An
         * error of one rank alone still prints, a moment later. */
        int inited = 0, finalized = 0, rank = 0, size = 1;
        MPI_Initialized(&inited);
        MPI_Finalized(&finalized);
        if (inited && !finalized) {
            MPI_Comm_rank(MPI_COMM_WORLD, &rank);
            MPI_Comm_size(MPI_COMM_WORLD, &size);
        }
        if (size > 1 && rank != 0) {
            struct timespec ts = {0, 500000000};
            nanosleep(&ts, NULL);
        }
        if (size > 1 && rank != 0) fprintf(stderr, "deltamla: error (rank %d): ", rank);
        else fputs("deltamla: error: ", stderr);
    }
#else
    fputs("deltamla: error: ", stderr);
#endif
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
#ifdef DELTAMLA_HAVE_MPI
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    int size = 1;
    if (inited && !finalized) MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (inited && !finalized && size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    if (inited && !finalized) MPI_Finalize();
#endif
    exit(1);
}

void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) die("out of host memory allocating %zu bytes", bytes);
    return p;
}

void *xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) die("out of host memory allocating %zu x %zu bytes", count, size);
    return p;
}

double wall_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
