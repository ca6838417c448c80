/* test_bufs.h: host buffers for the C test programs of the op table (tests/test_*.c):
 * deterministic random values and constant fills, malloc'd (free with free()). Included
 * once by each test program (its functions are static). */
#ifndef DELTAMLA_TEST_BUFS_H
#define DELTAMLA_TEST_BUFS_H

#include <stddef.h>
#include <stdint.h>

#include "rng.h"
#include "util.h"

/* n uniform values in [-1, 1) from key */
static inline float *random_buf(uint64_t key, size_t n)
{
    float *x = xmalloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(2.0 * rng_uniform(key, i) - 1.0);
    return x;
}

/* n copies of v */
static inline float *filled(size_t n, float v)
{
    float *x = xmalloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = v;
    return x;
}

#endif
