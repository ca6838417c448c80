/* rng.c: see rng.h. splitmix64 finalisers over (key, index). */
#include "rng.h"

#include <math.h>

static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t rng_key(uint64_t seed, const char *name)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a over the name */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) h = (h ^ *p) * 1099511628211ULL;
    return mix(mix(seed) ^ h);
}

uint64_t rng_bits(uint64_t key, uint64_t i) { return mix(key ^ mix(i)); }

double rng_uniform(uint64_t key, uint64_t i) { return (double)(rng_bits(key, i) >> 11) * 0x1.0p-53; }

double rng_normal(uint64_t key, uint64_t i)
{
    double u1 = (double)((rng_bits(key, 2 * i) >> 11) + 1) * 0x1.0p-53; /* (0, 1] */
    double u2 = rng_uniform(key, 2 * i + 1);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
