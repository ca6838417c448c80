/* prep_options.c: the flags of `deltamla prep`: one table drives parsing and --help
 * (the options struct is in prep_internal.h).
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prep_internal.h"
#include "util.h"

typedef enum prep_opt_type { PREP_OPT_STRING, PREP_OPT_LIST, PREP_OPT_INT, PREP_OPT_FLOAT, PREP_OPT_BOOL } prep_opt_type;

typedef struct prep_opt {
    const char *name;
    prep_opt_type type;
    const char *arg;     /* the value's name in --help; "" for on/off flags */
    size_t offset;
    const char *choices; /* space-separated, or NULL */
    const char *def;     /* parsed like a command-line value; NULL: unset (-1 / NULL) */
    const char *help;
} prep_opt;

#define PREP_OPT(field, type, arg, choices, def, help) {#field, type, arg, offsetof(prep_options, field), choices, def, help}

static const prep_opt prep_opts[] = {
    PREP_OPT(input, PREP_OPT_LIST, "PATH", NULL, NULL,
             "a text file, an llm.c .bin or .npy token file, or a folder of them (recursive, sorted by "
             "path, hidden names skipped); repeat for more"),
    PREP_OPT(output, PREP_OPT_STRING, "DIR", NULL, NULL, "directory for shard_NNNNN.h5 (created; must be absent or empty)"),
    PREP_OPT(tokenizer, PREP_OPT_STRING, "NAME", "byte bpe", "byte",
             "text tokenizer: byte (257 tokens) or bpe (byte-level BPE trained on the corpus)"),
    PREP_OPT(vocab_size, PREP_OPT_INT, "N", NULL, NULL,
             "bpe: tokens including end-of-text (required, >= 257); imports: the tokens' vocabulary "
             "(default 50257, GPT-2)"),
    PREP_OPT(doc_split, PREP_OPT_STRING, "MODE", "file blank_line", "file",
             "text documents: one per file, or runs of lines between blank lines"),
    PREP_OPT(shard_tokens, PREP_OPT_INT, "N", NULL, "100000000", "tokens per shard (the last shard holds the rest)"),
    PREP_OPT(import_format, PREP_OPT_STRING, "NAME", "auto text llmc npy", "auto",
             "input kind; auto: .bin is llm.c, .npy is numpy, anything else text"),
    PREP_OPT(eot_token, PREP_OPT_INT, "N", NULL, NULL,
             "imports: the end-of-text token that ends documents (default 50256, GPT-2)"),
    PREP_OPT(bpe_train_bytes, PREP_OPT_INT, "N", NULL, "1000000000",
             "bpe: train on at most this many bytes, the same share of every file"),
    PREP_OPT(progress_interval, PREP_OPT_FLOAT, "SECONDS", NULL, "2", "seconds between progress lines on stderr"),
    PREP_OPT(force, PREP_OPT_BOOL, "", NULL, "0", "replace the shards of an output directory that is not empty"),
    PREP_OPT(help, PREP_OPT_BOOL, "", NULL, "0", "print this help"),
};
_Static_assert(sizeof prep_opts / sizeof prep_opts[0] == N_PREP_OPTS, "N_PREP_OPTS (prep_internal.h) counts prep_opts");

void prep_usage(FILE *f)
{
    fprintf(f, "usage: deltamla prep --input PATH [--input PATH ...] --output DIR [flags]\n"
               "Turns UTF-8 text (or llm.c .bin / .npy token files) into token shards; run it under\n"
               "mpirun to spread the work over ranks (the shards are the same for any rank count).\n\n");
    for (int i = 0; i < N_PREP_OPTS; i++) {
        const prep_opt *o = &prep_opts[i];
        char flag[64];
        snprintf(flag, sizeof flag, "--%s %s", o->name, o->arg);
        fprintf(f, "  %-24s %s", flag, o->help);
        if (o->choices) fprintf(f, " {%s}", o->choices);
        if (o->def && o->type != PREP_OPT_BOOL) fprintf(f, " [default %s]", o->def);
        fputc('\n', f);
    }
}

/* Store one value; returns 0, or -1 after prep_fail(). */
static int prep_set(prep_options *p, const prep_opt *o, const char *v)
{
    void *dst = (char *)p + o->offset;
    char *end;
    switch (o->type) {
    case PREP_OPT_STRING:
        if (o->choices) {
            size_t n = strlen(v);
            const char *c = o->choices;
            int found = 0;
            while (*c && !found) {
                size_t w = strcspn(c, " ");
                found = w == n && n && strncmp(c, v, n) == 0;
                c += w + (c[w] == ' ');
            }
            if (!found) {
                prep_fail("--%s '%s' is not one of: %s", o->name, v, o->choices);
                return -1;
            }
        }
        *(char **)dst = (char *)v;
        return 0;
    case PREP_OPT_LIST: {
        char ***list = (char ***)dst;
        int *n = &p->n_input;
        *list = realloc(*list, (size_t)(*n + 1) * sizeof **list);
        if (!*list) die("out of host memory parsing flags");
        (*list)[(*n)++] = (char *)v;
        return 0;
    }
    case PREP_OPT_INT: {
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (!*v || *end || errno) {
            prep_fail("--%s: '%s' is not an integer", o->name, v);
            return -1;
        }
        *(int64_t *)dst = x;
        return 0;
    }
    case PREP_OPT_FLOAT: {
        double x = strtod(v, &end);
        if (!*v || *end || !isfinite(x)) {
            prep_fail("--%s: '%s' is not a number", o->name, v);
            return -1;
        }
        *(double *)dst = x;
        return 0;
    }
    case PREP_OPT_BOOL:
        if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0) *(int *)dst = 1;
        else if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0) *(int *)dst = 0;
        else {
            prep_fail("--%s: '%s' is not true, false, 1 or 0", o->name, v);
            return -1;
        }
        return 0;
    }
    return -1;
}

/* Parse argv into p; given[i] tells whether option i was on the command line. */
void prep_parse(prep_options *p, int given[N_PREP_OPTS], int argc, char **argv)
{
    memset(p, 0, sizeof *p);
    for (int i = 0; i < N_PREP_OPTS; i++) {
        given[i] = 0;
        const prep_opt *o = &prep_opts[i];
        if (o->def) prep_set(p, o, o->def);
        else if (o->type == PREP_OPT_INT) *(int64_t *)((char *)p + o->offset) = -1;
    }
    for (int a = 0; a < argc && !prep_err[0]; a++) {
        const char *arg = argv[a];
        if (strncmp(arg, "--", 2) != 0) {
            prep_fail("unexpected argument '%s' (flags start with --; deltamla prep --help lists them)", arg);
            break;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        int k = -1;
        for (int i = 0; i < N_PREP_OPTS && k < 0; i++)
            if (strlen(prep_opts[i].name) == len && strncmp(prep_opts[i].name, name, len) == 0) k = i;
        if (k < 0) {
            prep_fail("unknown flag --%.*s (deltamla prep --help lists the flags)", (int)len, name);
            break;
        }
        const prep_opt *o = &prep_opts[k];
        const char *v;
        if (eq) v = eq + 1;
        else if (o->type == PREP_OPT_BOOL) v = "1";
        else if (a + 1 < argc) v = argv[++a];
        else {
            prep_fail("--%s needs a value", o->name);
            break;
        }
        given[k] = 1;
        prep_set(p, o, v);
    }
}

int prep_opt_index(const char *name)
{
    for (int i = 0; i < N_PREP_OPTS; i++)
        if (strcmp(prep_opts[i].name, name) == 0) return i;
    return -1;
}
