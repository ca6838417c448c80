/* version.h: the one place that defines deltamla's version. `deltamla --version` prints
 * it, and the Makefile reads it from this line to name the installed modulefiles. */
#ifndef DELTAMLA_VERSION_H
#define DELTAMLA_VERSION_H

#define DELTAMLA_VERSION "0.1.0"

#endif
