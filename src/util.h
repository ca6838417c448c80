/* util.h: fatal errors, checked allocation and small helpers shared by every module.
 *
 * Errors that the user can fix (bad flags, missing files, impossible shapes) end the
 * program through die(): one line "deltamla: error: ..." on stderr and exit status 1,
 * on every MPI rank. Internal invariants use fatal_check(), which names file and line.
 */
#ifndef DELTAMLA_UTIL_H
#define DELTAMLA_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Print "deltamla: error: <message>" and exit(1) (MPI_Abort when MPI is running). */
void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* malloc/calloc that die with the size on failure; free with free(). */
void *xmalloc(size_t bytes);
void *xcalloc(size_t count, size_t size);

#define fatal_check(cond)                                                                   \
    do {                                                                                    \
        if (!(cond)) die("internal check failed: %s (%s:%d)", #cond, __FILE__, __LINE__); \
    } while (0)

/* Seconds from a monotonic clock. */
double wall_time(void);

#endif
