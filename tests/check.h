/* check.h: the one-line checks of the C test programs, "ok - ..." or "not ok - ..." on
 * stdout (tests/runner.sh counts them), and the number that failed. Included once by each
 * test program (its functions are static). */
#ifndef DELTAMLA_TEST_CHECK_H
#define DELTAMLA_TEST_CHECK_H

#include <stdarg.h>
#include <stdio.h>

static int failures;

static void check(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void check(int cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(cond ? "ok - " : "not ok - ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
    if (!cond) failures++;
}

#endif
