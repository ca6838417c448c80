/* gradcheck.h: the small harness the op tests share.
 *
 * The op tests link the CPU ops built with real = double (see src/cpu/cpu_ops.h) and
 * check each backward against central finite differences of a scalar loss
 * L = sum(forward(x) * R) with R a fixed random tensor, so dL/dout = R. Results print
 * one line per check ("ok - ..." / "not ok - ..."); tests/run_tests.sh counts them.
 */
#ifndef DELTAMLA_GRADCHECK_H
#define DELTAMLA_GRADCHECK_H

#include <stddef.h>
#include <stdint.h>

/* deterministic uniform fill in [lo, hi) from *state (xorshift64*; state must be != 0) */
void gc_fill(double *x, size_t n, uint64_t *state, double lo, double hi);
double gc_uniform(uint64_t *state);

/* sum(a[i] * b[i]) */
double gc_dot(const double *a, const double *b, size_t n);

/* num[i] = (f(x + h e_i) - f(x - h e_i)) / (2h), perturbing x in place and restoring it.
 * f reads x through ctx. */
void gc_numeric(double (*f)(void *ctx), void *ctx, double *x, size_t n, double h, double *num);

/* Passes when max_i |a_i - b_i| <= tol * max(1, max_i |b_i|). Prints one result line
 * with the max error and returns 1 on pass, 0 on fail. */
int gc_compare(const char *what, const double *analytic, const double *numeric, size_t n, double tol);

/* record a check's result by hand (prints the ok/not ok line); returns pass */
int gc_report(const char *what, int pass, const char *detail);

/* the number of failed checks so far; a test's main returns gc_failures() != 0 */
int gc_failures(void);

#endif
