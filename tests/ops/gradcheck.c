/* gradcheck.c: see gradcheck.h. */
#include "gradcheck.h"

#include <math.h>
#include <stdio.h>

static int failures;

double gc_uniform(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return (double)((x * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

void gc_fill(double *x, size_t n, uint64_t *state, double lo, double hi)
{
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * gc_uniform(state);
}

double gc_dot(const double *a, const double *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void gc_numeric(double (*f)(void *ctx), void *ctx, double *x, size_t n, double h, double *num)
{
    for (size_t i = 0; i < n; i++) {
        double keep = x[i];
        x[i] = keep + h;
        double fp = f(ctx);
        x[i] = keep - h;
        double fm = f(ctx);
        x[i] = keep;
        num[i] = (fp - fm) / (2 * h);
    }
}

int gc_report(const char *what, int pass, const char *detail)
{
    printf("%s - %s%s%s\n", pass ? "ok" : "not ok", what, detail ? ": " : "", detail ? detail : "");
    if (!pass) failures++;
    return pass;
}

int gc_compare(const char *what, const double *analytic, const double *numeric, size_t n, double tol)
{
    double maxerr = 0, maxref = 0;
    int nan_seen = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(analytic[i] - numeric[i]);
        if (isnan(e)) nan_seen = 1; /* a NaN anywhere fails the check */
        else if (e > maxerr) maxerr = e;
        if (fabs(numeric[i]) > maxref) maxref = fabs(numeric[i]);
    }
    double bound = tol * (maxref > 1 ? maxref : 1);
    int pass = !nan_seen && maxerr <= bound;
    char detail[128];
    snprintf(detail, sizeof detail, "max err %.3g (bound %.3g, n=%zu)", maxerr, bound, n);
    return gc_report(what, pass, detail);
}

int gc_failures(void) { return failures; }
