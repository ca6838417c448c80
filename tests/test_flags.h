/* test_flags.h: config_parse on a space-separated flag string ("--size tiny --ep 2"), for
 * the C test programs that build a model from flags. Included once by each (static). */
#ifndef DELTAMLA_TEST_FLAGS_H
#define DELTAMLA_TEST_FLAGS_H

#include <stdio.h>
#include <string.h>

#include "config.h"

static void parse_flags(config *c, const char *flags)
{
    char buf[1024], *argv[64];
    int argc = 0;
    snprintf(buf, sizeof buf, "%s", flags);
    for (char *tok = strtok(buf, " "); tok && argc < 64; tok = strtok(NULL, " ")) argv[argc++] = tok;
    config_parse(c, argc, argv);
}

#endif
