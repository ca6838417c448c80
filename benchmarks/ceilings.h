/* ceilings.h: the two ceilings of a device that the benchmarks' floors are computed
 * from, measured through a bare backend (not the timing wrapper of timed_backend.h). */
#ifndef DELTAMLA_CEILINGS_H
#define DELTAMLA_CEILINGS_H

#include "backend.h"

/* The ceilings of the device, measured through the bare backend be (not the wrapper):
 * FLOP/s of an 8192^3 matmul_forward, and bytes read + written per second by a 1 GiB
 * device copy; ten runs each after one warm-up. */
double bench_gemm_rate(const backend *be);
double bench_copy_rate(const backend *be);

#endif
