/* rng.h: counter-based random numbers.
 *
 * Every random draw is a pure function of (key, index), where the key hashes a seed and
 * a name. Weights and data order therefore do not depend on the number of ranks, the
 * number of threads, or the order in which tensors are visited. */
#ifndef DELTAMLA_RNG_H
#define DELTAMLA_RNG_H

#include <stdint.h>

/* a 64-bit key from a seed and a string */
uint64_t rng_key(uint64_t seed, const char *name);
/* 64 random bits for element i of stream key */
uint64_t rng_bits(uint64_t key, uint64_t i);
/* uniform in [0, 1) with 53 random bits */
double rng_uniform(uint64_t key, uint64_t i);
/* standard normal (Box-Muller on two independent uniforms of element i) */
double rng_normal(uint64_t key, uint64_t i);

#endif
