/* prep.c: `deltamla prep`, text files (or llm.c .bin / .npy token files) in, token
 * shards out (io/shards.h), in parallel over MPI ranks.
 *
 * The run, on every rank:
 *   1. Rank 0 expands the inputs (folders recursively, each folder's files sorted by
 *      path), checks the output directory, and broadcasts the file list with sizes.
 *   2. The files are cut into contiguous ranges of about equal bytes, one per rank, in
 *      list order; each rank reads, checks and tokenizes only its own range.
 *   3. With --tokenizer bpe the ranks first count the chunks of their text (at most
 *      --bpe_train_bytes of the corpus, taken evenly from every file) and train one BPE
 *      together (io/tokenizer.c: pair counts are combined across ranks).
 *   4. The ranks' token counts give each rank its place in the global stream; the
 *      stream is cut into shards of exactly --shard_tokens tokens (the last one
 *      shorter), and every shard is written collectively, each rank writing the part of
 *      it that it holds.
 * The stream is the tokens of the files in list order, so it, and with it every shard
 * file's contents, is the same for any rank count. io/SHARDS.md has the user's view.
 *
 * Errors: a problem one rank finds (a file that is not UTF-8, a bad header) is kept
 * until the next agreement point, where all ranks learn the first one in list order;
 * it is printed once through die() and every rank exits with status 1, before any shard
 * is written.
 */
#define _XOPEN_SOURCE 700
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../io/shards.h"
#include "../io/tokenizer.h"
#include "commands.h"
#include "util.h"



#define LLMC_MAGIC 20240520
#define LLMC_HEADER_INTS 256
#define GPT2_VOCAB 50257
#define GPT2_EOT 50256
/* the most vocabulary a trained BPE may ask for: it bounds the merge tables */
#define BPE_MAX_VOCAB (1 << 22)
#define MAX_SHARDS 1000000
#define PROGRESS_TAG 7177

/* ---- errors agreed over the ranks ---- */

static int g_rank, g_size;
static char g_err[1024]; /* this rank's first error, "" while none */

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    if (g_err[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
}

/* Collective: if any rank has an error, every rank ends with status 1 and the lowest
 * failing rank's message (the first problem in file-list order, as ranks hold the list
 * in order) is printed once, by rank 0, through die(). */
static void sync_errors(void)
{
    int mine = g_err[0] ? g_rank : g_size, first;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first == g_size) return;
    MPI_Bcast(g_err, (int)sizeof g_err, MPI_CHAR, first, MPI_COMM_WORLD);
    /* finalize first: die() then prints its line without aborting the job, so mpirun
     * adds no abort report to the one line */
    MPI_Finalize();
    if (g_rank == 0) die("%s", g_err);
    exit(1);
}

/* ---- options: one table drives parsing and --help ---- */

typedef struct prep_options {
    char **input;
    int n_input;
    char *output;
    char *tokenizer;
    int64_t vocab_size;
    char *doc_split;
    int64_t shard_tokens;
    char *import_format;
    int64_t eot_token;
    int64_t bpe_train_bytes;
    double progress_interval;
    int force;
    int help;
} prep_options;

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
#define N_PREP_OPTS ((int)(sizeof prep_opts / sizeof prep_opts[0]))

static void prep_usage(FILE *f)
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

/* Store one value; returns 0, or -1 after fail(). */
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
                fail("--%s '%s' is not one of: %s", o->name, v, o->choices);
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
            fail("--%s: '%s' is not an integer", o->name, v);
            return -1;
        }
        *(int64_t *)dst = x;
        return 0;
    }
    case PREP_OPT_FLOAT: {
        double x = strtod(v, &end);
        if (!*v || *end || !isfinite(x)) {
            fail("--%s: '%s' is not a number", o->name, v);
            return -1;
        }
        *(double *)dst = x;
        return 0;
    }
    case PREP_OPT_BOOL:
        if (strcmp(v, "1") == 0 || strcmp(v, "true") == 0) *(int *)dst = 1;
        else if (strcmp(v, "0") == 0 || strcmp(v, "false") == 0) *(int *)dst = 0;
        else {
            fail("--%s: '%s' is not true, false, 1 or 0", o->name, v);
            return -1;
        }
        return 0;
    }
    return -1;
}

/* Parse argv into p; given[i] tells whether option i was on the command line. */
static void prep_parse(prep_options *p, int given[N_PREP_OPTS], int argc, char **argv)
{
    memset(p, 0, sizeof *p);
    for (int i = 0; i < N_PREP_OPTS; i++) {
        given[i] = 0;
        const prep_opt *o = &prep_opts[i];
        if (o->def) prep_set(p, o, o->def);
        else if (o->type == PREP_OPT_INT) *(int64_t *)((char *)p + o->offset) = -1;
    }
    for (int a = 0; a < argc && !g_err[0]; a++) {
        const char *arg = argv[a];
        if (strncmp(arg, "--", 2) != 0) {
            fail("unexpected argument '%s' (flags start with --; deltamla prep --help lists them)", arg);
            break;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        int k = -1;
        for (int i = 0; i < N_PREP_OPTS && k < 0; i++)
            if (strlen(prep_opts[i].name) == len && strncmp(prep_opts[i].name, name, len) == 0) k = i;
        if (k < 0) {
            fail("unknown flag --%.*s (deltamla prep --help lists the flags)", (int)len, name);
            break;
        }
        const prep_opt *o = &prep_opts[k];
        const char *v;
        if (eq) v = eq + 1;
        else if (o->type == PREP_OPT_BOOL) v = "1";
        else if (a + 1 < argc) v = argv[++a];
        else {
            fail("--%s needs a value", o->name);
            break;
        }
        given[k] = 1;
        prep_set(p, o, v);
    }
}

static int opt_index(const char *name)
{
    for (int i = 0; i < N_PREP_OPTS; i++)
        if (strcmp(prep_opts[i].name, name) == 0) return i;
    return -1;
}

/* ---- the input file list ---- */

typedef enum input_format { INPUT_TEXT, INPUT_LLMC, INPUT_NPY } input_format;
static const char *const input_format_names[] = {"text", "llm.c .bin", ".npy"};

typedef struct input_file {
    char *path;
    uint64_t size;
    int format; /* input_format */
} input_file;

typedef struct file_list {
    input_file *f;
    int64_t n, cap;
} file_list;

static void list_add(file_list *l, const char *path, uint64_t size)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->f = realloc(l->f, (size_t)l->cap * sizeof *l->f);
        if (!l->f) die("out of host memory listing the inputs");
    }
    size_t n = strlen(path) + 1;
    l->f[l->n].path = memcpy(xmalloc(n), path, n);
    l->f[l->n].size = size;
    l->f[l->n].format = INPUT_TEXT;
    l->n++;
}

static int cmp_path(const void *a, const void *b)
{
    return strcmp(((const input_file *)a)->path, ((const input_file *)b)->path);
}

/* Every regular file under dir (hidden names skipped, the output directory left out),
 * unsorted; fail() on a directory that cannot be read. */
static void walk_dir(file_list *l, const char *dir, const char *output_real)
{
    DIR *d = opendir(dir);
    if (!d) {
        fail("cannot read input folder %s: %s", dir, strerror(errno));
        return;
    }
    struct dirent *e;
    while (!g_err[0] && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        size_t n = strlen(dir) + strlen(e->d_name) + 2;
        char *path = xmalloc(n);
        snprintf(path, n, "%s%s%s", dir, dir[strlen(dir) - 1] == '/' ? "" : "/", e->d_name);
        struct stat st;
        if (stat(path, &st) != 0) {
            fail("cannot open input %s: %s", path, strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            char *real = realpath(path, NULL);
            if (!(real && output_real && strcmp(real, output_real) == 0)) walk_dir(l, path, output_real);
            free(real);
        } else if (S_ISREG(st.st_mode)) {
            list_add(l, path, (uint64_t)st.st_size);
        }
        free(path);
    }
    closedir(d);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Rank 0: the inputs, expanded and classified, and the state of the output directory. */
static void list_inputs(const prep_options *p, file_list *l)
{
    char *output_real = realpath(p->output, NULL);
    struct stat st;
    if (stat(p->output, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) {
            fail("--output %s exists and is not a directory", p->output);
        } else if (!p->force) {
            DIR *d = opendir(p->output);
            if (!d) {
                fail("cannot read output directory %s: %s", p->output, strerror(errno));
            } else {
                struct dirent *e;
                int empty = 1;
                while (empty && (e = readdir(d))) empty = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
                closedir(d);
                if (!empty) fail("output directory %s exists and is not empty (pass --force to replace its shards)", p->output);
            }
        }
    }
    for (int i = 0; i < p->n_input && !g_err[0]; i++) {
        const char *in = p->input[i];
        if (stat(in, &st) != 0) {
            fail("cannot open input %s: %s", in, strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            int64_t first = l->n;
            walk_dir(l, in, output_real);
            qsort(l->f + first, (size_t)(l->n - first), sizeof *l->f, cmp_path);
        } else if (S_ISREG(st.st_mode)) {
            list_add(l, in, (uint64_t)st.st_size);
        } else {
            fail("input %s is not a regular file or a folder", in);
        }
    }
    free(output_real);
    for (int64_t i = 0; i < l->n; i++) {
        input_file *f = &l->f[i];
        if (strcmp(p->import_format, "llmc") == 0 || (strcmp(p->import_format, "auto") == 0 && ends_with(f->path, ".bin")))
            f->format = INPUT_LLMC;
        else if (strcmp(p->import_format, "npy") == 0 || (strcmp(p->import_format, "auto") == 0 && ends_with(f->path, ".npy")))
            f->format = INPUT_NPY;
    }
}

/* Rank 0's list to every rank. */
static void bcast_list(file_list *l)
{
    int64_t n = l->n, chars = 0;
    if (g_rank == 0)
        for (int64_t i = 0; i < n; i++) chars += (int64_t)strlen(l->f[i].path) + 1;
    int64_t hdr[2] = {n, chars};
    MPI_Bcast(hdr, 2, MPI_INT64_T, 0, MPI_COMM_WORLD);
    n = hdr[0];
    chars = hdr[1];
    if (chars > INT_MAX || n > INT_MAX / 2) die("the input list is too long (%" PRId64 " files)", n);
    uint64_t *meta = xmalloc((size_t)(2 * n + 1) * sizeof *meta);
    char *names = xmalloc((size_t)chars + 1);
    if (g_rank == 0) {
        char *o = names;
        for (int64_t i = 0; i < n; i++) {
            meta[2 * i] = l->f[i].size;
            meta[2 * i + 1] = (uint64_t)l->f[i].format;
            size_t k = strlen(l->f[i].path) + 1;
            memcpy(o, l->f[i].path, k);
            o += k;
        }
    }
    MPI_Bcast(meta, (int)(2 * n), MPI_UINT64_T, 0, MPI_COMM_WORLD);
    MPI_Bcast(names, (int)chars, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (g_rank != 0) {
        const char *s = names;
        for (int64_t i = 0; i < n; i++) {
            list_add(l, s, meta[2 * i]);
            l->f[i].format = (int)meta[2 * i + 1];
            s += strlen(s) + 1;
        }
    }
    free(meta);
    free(names);
}

/* ---- progress lines (rank 0 prints; the other ranks report to it) ---- */

typedef struct progress {
    const char *what;
    double interval, t0, last_print, last_send, last_poll;
    uint64_t total_bytes;
    uint64_t bytes, tokens; /* this rank's */
    uint64_t *peer;         /* rank 0: [g_size][2], the latest report of each rank */
    int peers_done;         /* rank 0: ranks whose final report arrived */
} progress;

static progress g_progress;

static void progress_begin(const char *what, double interval, uint64_t total_bytes)
{
    progress *p = &g_progress;
    free(p->peer);
    memset(p, 0, sizeof *p);
    p->what = what;
    p->interval = interval;
    p->total_bytes = total_bytes;
    p->t0 = p->last_print = p->last_send = p->last_poll = wall_time();
    if (g_rank == 0) p->peer = xcalloc((size_t)g_size * 2, sizeof *p->peer);
}

/* Rank 0: take the reports that have arrived (blocking: wait for one). */
static void progress_recv(int blocking)
{
    progress *p = &g_progress;
    for (;;) {
        int flag = 1;
        MPI_Status st;
        if (!blocking) MPI_Iprobe(MPI_ANY_SOURCE, PROGRESS_TAG, MPI_COMM_WORLD, &flag, &st);
        if (!flag) return;
        uint64_t msg[3];
        MPI_Recv(msg, 3, MPI_UINT64_T, MPI_ANY_SOURCE, PROGRESS_TAG, MPI_COMM_WORLD, &st);
        p->peer[2 * st.MPI_SOURCE] = msg[0];
        p->peer[2 * st.MPI_SOURCE + 1] = msg[1];
        if (msg[2]) p->peers_done++;
        if (blocking) return;
    }
}

static void progress_print(double now)
{
    progress *p = &g_progress;
    p->peer[0] = p->bytes;
    p->peer[1] = p->tokens;
    uint64_t bytes = 0, tokens = 0;
    for (int r = 0; r < g_size; r++) {
        bytes += p->peer[2 * r];
        tokens += p->peer[2 * r + 1];
    }
    double dt = now - p->t0 > 1e-9 ? now - p->t0 : 1e-9;
    fprintf(stderr, "prep: %s %.1f MB of %.1f MB, %.1f MB/s", p->what, bytes / 1e6, p->total_bytes / 1e6,
            bytes / 1e6 / dt);
    if (tokens) fprintf(stderr, ", %.2f M tokens/s", tokens / 1e6 / dt);
    fputc('\n', stderr);
    p->last_print = now;
}

/* Count work done by this rank; rank 0 prints a line every --progress_interval s. */
static void progress_add(uint64_t bytes, uint64_t tokens)
{
    progress *p = &g_progress;
    p->bytes += bytes;
    p->tokens += tokens;
    double now = wall_time();
    double beat = p->interval < 1.0 ? p->interval : 1.0;
    if (g_rank != 0) {
        if (now - p->last_send >= beat) {
            uint64_t msg[3] = {p->bytes, p->tokens, 0};
            MPI_Send(msg, 3, MPI_UINT64_T, 0, PROGRESS_TAG, MPI_COMM_WORLD);
            p->last_send = now;
        }
        return;
    }
    if (now - p->last_poll >= beat / 4) {
        progress_recv(0);
        p->last_poll = now;
    }
    if (now - p->last_print >= p->interval) progress_print(now);
}

/* Every rank calls it when its part is done; rank 0 keeps printing until all are. */
static void progress_end(void)
{
    progress *p = &g_progress;
    if (g_rank != 0) {
        uint64_t msg[3] = {p->bytes, p->tokens, 1};
        MPI_Send(msg, 3, MPI_UINT64_T, 0, PROGRESS_TAG, MPI_COMM_WORLD);
        return;
    }
    while (p->peers_done < g_size - 1) {
        progress_recv(1);
        double now = wall_time();
        if (now - p->last_print >= p->interval) progress_print(now);
    }
}

static void bpe_progress(int done, int total)
{
    progress *p = &g_progress;
    double now = wall_time();
    if (g_rank != 0 || (now - p->last_print < p->interval && done != total)) return;
    if (now - p->t0 < p->interval) return;
    double dt = now - p->t0;
    fprintf(stderr, "prep: bpe merge %d of %d, %.0f merges/s\n", done, total, done / dt);
    p->last_print = now;
}

/* ---- reading and checking inputs ---- */

/* The whole file, malloc'd; NULL after fail() when it cannot be read. */
static unsigned char *read_file(const char *path, uint64_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fail("cannot read %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        fail("cannot read %s: %s", path, strerror(errno));
        fclose(f);
        return NULL;
    }
    uint64_t n = (uint64_t)st.st_size;
    unsigned char *buf = xmalloc((size_t)n + 1);
    if (n && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        fail("cannot read %s: %s", path, ferror(f) ? strerror(errno) : "the file shrank while being read");
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

/* The offset of the first byte that does not begin a valid UTF-8 sequence (overlong
 * forms, surrogates and code points past U+10FFFF are invalid), or -1. */
static int64_t utf8_invalid_at(const unsigned char *s, uint64_t n)
{
    uint64_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int k;
        unsigned lo = 0x80, hi = 0xBF; /* the allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c == 0xE0) k = 2, lo = 0xA0;
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) k = 2;
        else if (c == 0xED) k = 2, hi = 0x9F;
        else if (c == 0xF0) k = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3) k = 3;
        else if (c == 0xF4) k = 3, hi = 0x8F;
        else return (int64_t)i;
        if (i + (uint64_t)k >= n) return (int64_t)i; /* truncated at the end of the file */
        if (s[i + 1] < lo || s[i + 1] > hi) return (int64_t)i;
        for (int j = 2; j <= k; j++)
            if ((s[i + (uint64_t)j] & 0xC0) != 0x80) return (int64_t)i;
        i += (uint64_t)k + 1;
    }
    return -1;
}

static int blank_line(const unsigned char *s, uint64_t a, uint64_t b)
{
    for (uint64_t i = a; i < b; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

/* The documents of a text file as [start, end) byte spans, malloc'd pairs; returns the
 * count. By file: the whole file (none when it is empty). By blank line: each maximal
 * run of non-blank lines, from its first byte through the newline of its last line. */
static int64_t doc_spans(const unsigned char *s, uint64_t n, int by_blank_line, uint64_t **spans)
{
    int64_t count = 0, cap = 16;
    uint64_t *sp = xmalloc((size_t)cap * 2 * sizeof *sp);
    if (!by_blank_line) {
        if (n) {
            sp[0] = 0;
            sp[1] = n;
            count = 1;
        }
        *spans = sp;
        return count;
    }
    int64_t open = -1; /* start of the document being read, or -1 */
    for (uint64_t a = 0; a < n;) {
        const unsigned char *nl = memchr(s + a, '\n', n - a);
        uint64_t b = nl ? (uint64_t)(nl - s) + 1 : n; /* line [a, b), newline included */
        if (blank_line(s, a, b)) {
            if (open >= 0) {
                sp[2 * count - 1] = a;
                open = -1;
            }
        } else if (open < 0) {
            if (count == cap) {
                sp = realloc(sp, (size_t)(cap *= 2) * 2 * sizeof *sp);
                if (!sp) die("out of host memory splitting documents");
            }
            open = (int64_t)a;
            sp[2 * count] = a;
            sp[2 * count + 1] = n;
            count++;
        }
        a = b;
    }
    *spans = sp;
    return count;
}

/* ---- the rank's token stream ---- */

typedef struct token_buf {
    unsigned char *data;
    uint64_t n, cap;
    int width; /* bytes per token: 2 or 4 */
} token_buf;

static void token_buf_reserve(token_buf *b, uint64_t more)
{
    if (b->n + more <= b->cap) return;
    uint64_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->n + more) cap *= 2;
    unsigned char *d = realloc(b->data, (size_t)(cap * (uint64_t)b->width));
    if (!d) die("out of host memory holding %" PRIu64 " tokens", cap);
    b->data = d;
    b->cap = cap;
}

static void token_buf_push(token_buf *b, uint32_t t)
{
    if (b->width == 2) ((uint16_t *)b->data)[b->n++] = (uint16_t)t;
    else ((uint32_t *)b->data)[b->n++] = t;
}

static uint32_t token_buf_at(const token_buf *b, uint64_t i)
{
    return b->width == 2 ? ((const uint16_t *)b->data)[i] : ((const uint32_t *)b->data)[i];
}

/* Tokenize one text file's documents onto the stream, each followed by end-of-text. */
static void encode_text_file(const input_file *f, const tokenizer *tok, int by_blank_line, int check_utf8, token_buf *out)
{
    uint64_t n;
    unsigned char *s = read_file(f->path, &n);
    if (!s) return;
    int64_t bad = check_utf8 ? utf8_invalid_at(s, n) : -1;
    if (bad >= 0) {
        fail("%s is not valid UTF-8 at byte offset %" PRId64, f->path, bad);
        free(s);
        return;
    }
    uint64_t *spans;
    int64_t nd = doc_spans(s, n, by_blank_line, &spans);
    uint32_t eot = (uint32_t)tokenizer_eot(tok);
    uint64_t doc_bytes = 0;
    for (int64_t d = 0; d < nd; d++) {
        int32_t *ids;
        size_t len = (size_t)(spans[2 * d + 1] - spans[2 * d]);
        int64_t k = tokenizer_encode(tok, s + spans[2 * d], len, &ids);
        token_buf_reserve(out, (uint64_t)k + 1);
        for (int64_t i = 0; i < k; i++) token_buf_push(out, (uint32_t)ids[i]);
        token_buf_push(out, eot);
        free(ids);
        doc_bytes += len;
        progress_add(len, (uint64_t)k + 1);
    }
    progress_add(n - doc_bytes, 0); /* the blank lines between documents */
    free(spans);
    free(s);
}

/* Count the chunks of this file's training share: its first `share` bytes, documents
 * only (blank-line separators are not text). */
static void count_text_file(const input_file *f, bpe_trainer *trainer, uint64_t share, int by_blank_line)
{
    uint64_t n;
    unsigned char *s = read_file(f->path, &n);
    if (!s) return;
    int64_t bad = utf8_invalid_at(s, n);
    if (bad >= 0) {
        fail("%s is not valid UTF-8 at byte offset %" PRId64, f->path, bad);
        free(s);
        return;
    }
    uint64_t *spans;
    int64_t nd = doc_spans(s, n, by_blank_line, &spans);
    for (int64_t d = 0; d < nd && spans[2 * d] < share; d++) {
        uint64_t end = spans[2 * d + 1] < share ? spans[2 * d + 1] : share;
        bpe_trainer_add(trainer, s + spans[2 * d], (size_t)(end - spans[2 * d]));
    }
    progress_add(n, 0);
    free(spans);
    free(s);
}

/* Append tokens read from an import file, each checked against the vocabulary. */
static void push_imported(const input_file *f, const unsigned char *data, uint64_t count, int in_width,
                          int64_t vocab, token_buf *out)
{
    token_buf_reserve(out, count);
    for (uint64_t i = 0; i < count; i++) {
        uint32_t t;
        if (in_width == 2) {
            uint16_t v;
            memcpy(&v, data + 2 * i, 2);
            t = v;
        } else {
            memcpy(&t, data + 4 * i, 4);
        }
        if ((int64_t)t >= vocab) {
            fail("%s: token %" PRIu32 " at position %" PRIu64 " is not below --vocab_size %" PRId64, f->path, t, i, vocab);
            return;
        }
        token_buf_push(out, t);
    }
}

/* An llm.c token file: int32 header[256] (magic 20240520, version 1, token count),
 * then that many uint16 tokens. Little-endian, as llm.c writes it. */
static void import_llmc(const input_file *f, int64_t vocab, token_buf *out)
{
    uint64_t n;
    unsigned char *s = read_file(f->path, &n);
    if (!s) return;
    int32_t h[LLMC_HEADER_INTS];
    uint64_t hb = sizeof h;
    if (n < hb) {
        fail("%s: %" PRIu64 " bytes is too short for an llm.c token file (its header alone is %" PRIu64 " bytes)",
             f->path, n, hb);
    } else {
        memcpy(h, s, sizeof h);
        if (h[0] != LLMC_MAGIC)
            fail("%s: not an llm.c token file (magic %" PRId32 ", expected %d)", f->path, h[0], LLMC_MAGIC);
        else if (h[1] != 1)
            fail("%s: llm.c token file version %" PRId32 " is not supported (version 1: uint16 tokens)", f->path, h[1]);
        else if (h[2] < 0 || n - hb != 2 * (uint64_t)h[2])
            fail("%s: the llm.c header says %" PRId32 " tokens (%" PRIu64 " bytes) but %" PRIu64
                 " bytes follow the header",
                 f->path, h[2], 2 * (uint64_t)(h[2] < 0 ? 0 : h[2]), n - hb);
        else {
            uint64_t before = out->n;
            push_imported(f, s + hb, (uint64_t)h[2], 2, vocab, out);
            progress_add(n, out->n - before);
        }
    }
    free(s);
}

/* The value text of key in a .npy header dict (quoted or not), into buf; 0 if absent. */
static int npy_field(const char *hdr, const char *key, char *buf, size_t size)
{
    char quoted[64];
    snprintf(quoted, sizeof quoted, "'%s'", key);
    const char *p = strstr(hdr, quoted);
    if (!p) return 0;
    p += strlen(quoted);
    while (*p == ' ' || *p == ':') p++;
    size_t n = 0;
    if (*p == '\'' || *p == '"') {
        char q = *p++;
        while (p[n] && p[n] != q) n++;
    } else if (*p == '(') {
        while (p[n] && p[n] != ')') n++;
        n++;
    } else {
        while (p[n] && p[n] != ',' && p[n] != '}') n++;
    }
    if (n >= size) n = size - 1;
    memcpy(buf, p, n);
    buf[n] = 0;
    return 1;
}

/* A numpy .npy file holding a 1-D array of '<u2' or '<u4'. */
static void import_npy(const input_file *f, int64_t vocab, token_buf *out)
{
    uint64_t n;
    unsigned char *s = read_file(f->path, &n);
    if (!s) return;
    uint64_t hdr_len = 0, data_at = 0;
    if (n < 10 || memcmp(s, "\x93NUMPY", 6) != 0) {
        fail("%s: not a .npy file (no \\x93NUMPY magic)", f->path);
    } else if (s[6] == 1) {
        hdr_len = (uint64_t)s[8] | (uint64_t)s[9] << 8;
        data_at = 10 + hdr_len;
    } else if ((s[6] == 2 || s[6] == 3) && n >= 12) {
        hdr_len = (uint64_t)s[8] | (uint64_t)s[9] << 8 | (uint64_t)s[10] << 16 | (uint64_t)s[11] << 24;
        data_at = 12 + hdr_len;
    } else {
        fail("%s: .npy format version %d is not known", f->path, s[6]);
    }
    if (!g_err[0] && data_at > n) fail("%s: the .npy header runs past the end of the file", f->path);
    if (g_err[0]) {
        free(s);
        return;
    }
    char *hdr = xmalloc((size_t)hdr_len + 1);
    memcpy(hdr, s + data_at - hdr_len, (size_t)hdr_len);
    hdr[hdr_len] = 0;
    char descr[32], shape[128];
    int width = 0;
    if (!npy_field(hdr, "descr", descr, sizeof descr) || !npy_field(hdr, "shape", shape, sizeof shape)) {
        fail("%s: the .npy header has no descr or shape", f->path);
    } else if (strcmp(descr, "<u2") == 0 || strcmp(descr, "u2") == 0) {
        width = 2;
    } else if (strcmp(descr, "<u4") == 0 || strcmp(descr, "u4") == 0) {
        width = 4;
    } else {
        fail("%s: .npy dtype '%s' is not uint16 or uint32 (need '<u2' or '<u4')", f->path, descr);
    }
    uint64_t count = 0;
    if (width) {
        /* shape "(N,)" is 1-D; "(N, M)" or "()" is not; fortran_order is moot for 1-D */
        char *end;
        unsigned long long v = strtoull(shape + 1, &end, 10);
        while (*end == ' ') end++;
        if (end == shape + 1 || *end != ',' || strspn(end + 1, " )") != strlen(end + 1)) {
            fail("%s: .npy array shape %s is not 1-D", f->path, shape);
        } else {
            count = v;
            if (n - data_at != count * (uint64_t)width)
                fail("%s: the .npy header says %" PRIu64 " values (%" PRIu64 " bytes) but %" PRIu64
                     " bytes of data follow it",
                     f->path, count, count * (uint64_t)width, n - data_at);
        }
    }
    if (!g_err[0]) {
        uint64_t before = out->n;
        push_imported(f, s + data_at, count, width, vocab, out);
        progress_add(n, out->n - before);
    }
    free(hdr);
    free(s);
}

/* ---- the output ---- */

/* Rank 0: create the output directory (and its parents) or, with --force, remove the
 * shards a previous run left there, so a smaller data set cannot inherit stale ones. */
static void prepare_output(const char *dir)
{
    char *path = xmalloc(strlen(dir) + 1);
    strcpy(path, dir);
    for (char *p = path + 1; *p && !g_err[0]; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(path, 0777) != 0 && errno != EEXIST) fail("cannot create output directory %s: %s", path, strerror(errno));
        *p = '/';
    }
    if (!g_err[0] && mkdir(path, 0777) != 0 && errno != EEXIST)
        fail("cannot create output directory %s: %s", path, strerror(errno));
    free(path);
    if (g_err[0]) return;
    char **old;
    int n = shards_list(dir, &old);
    for (int i = 0; i < n; i++) {
        if (!g_err[0] && unlink(old[i]) != 0) fail("cannot remove old shard %s: %s", old[i], strerror(errno));
        free(old[i]);
    }
    free(old);
}

static const char *human_bytes(double b, char *buf, size_t size)
{
    const char *unit[] = {"B", "KB", "MB", "GB", "TB"};
    int u = 0;
    while (b >= 1000 && u < 4) b /= 1000, u++;
    snprintf(buf, size, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
    return buf;
}

int prep_main(int argc, char **argv)
{
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    double t_start = wall_time();
    prep_options o;
    int given[N_PREP_OPTS];
    prep_parse(&o, given, argc, argv);
    sync_errors();
    if (o.help) {
        if (g_rank == 0) prep_usage(stdout);
        return 0;
    }

    /* flags alone: every rank reaches the same verdict */
    if (!o.n_input) fail("no --input given (deltamla prep --help lists the flags)");
    else if (!o.output) fail("no --output directory given");
    else if (o.shard_tokens < 1) fail("--shard_tokens must be at least 1 (got %" PRId64 ")", o.shard_tokens);
    else if (o.bpe_train_bytes < 1) fail("--bpe_train_bytes must be at least 1 (got %" PRId64 ")", o.bpe_train_bytes);
    else if (o.progress_interval < 0) fail("--progress_interval must not be negative");
    sync_errors();

    file_list files = {0};
    if (g_rank == 0) list_inputs(&o, &files);
    sync_errors();
    bcast_list(&files);

    /* what the list implies */
    int64_t n_files = files.n;
    uint64_t total_bytes = 0;
    int64_t first_text = -1, first_tokens = -1;
    for (int64_t i = 0; i < n_files; i++) {
        total_bytes += files.f[i].size;
        if (files.f[i].format == INPUT_TEXT && first_text < 0) first_text = i;
        if (files.f[i].format != INPUT_TEXT && first_tokens < 0) first_tokens = i;
    }
    int importing = first_tokens >= 0;
    int bpe = strcmp(o.tokenizer, "bpe") == 0;
    int by_blank_line = strcmp(o.doc_split, "blank_line") == 0;
    int64_t vocab = 257, eot = 256;
    if (n_files == 0) {
        fail("empty corpus: no files in %s%s", o.input[0], o.n_input > 1 ? " and the other inputs" : "");
    } else if (first_text >= 0 && importing) {
        fail("cannot mix text (%s) and token files (%s) in one data set; prepare them separately", files.f[first_text].path,
             files.f[first_tokens].path);
    } else if (total_bytes == 0) {
        fail("empty corpus: the %" PRId64 " input file%s hold%s no data", n_files, n_files > 1 ? "s" : "",
             n_files > 1 ? "" : "s");
    } else if (importing) {
        const input_file *f = &files.f[first_tokens];
        vocab = given[opt_index("vocab_size")] ? o.vocab_size : GPT2_VOCAB;
        eot = given[opt_index("eot_token")] ? o.eot_token : GPT2_EOT;
        if (given[opt_index("tokenizer")])
            fail("--tokenizer applies to text; %s is already tokenized (%s)", f->path, input_format_names[f->format]);
        else if (given[opt_index("doc_split")])
            fail("--doc_split applies to text; imported tokens are cut into documents at --eot_token");
        else if (vocab < 1 || vocab > INT32_MAX) /* token ids are int32 once loaded */
            fail("--vocab_size %" PRId64 " is outside 1 .. 2147483647", vocab);
        else if (eot < 0 || eot >= vocab)
            fail("--eot_token %" PRId64 " is not a token of --vocab_size %" PRId64 "%s", eot, vocab,
                 given[opt_index("eot_token")] ? "" : " (50256 is the default: pass --eot_token)");
    } else {
        if (given[opt_index("eot_token")]) {
            fail("--eot_token applies to imported tokens; text gets the tokenizer's end-of-text token");
        } else if (!bpe) {
            if (given[opt_index("vocab_size")] && o.vocab_size != 257)
                fail("--vocab_size %" PRId64 ": the byte tokenizer has exactly 257 tokens (256 bytes and end-of-text)",
                     o.vocab_size);
        } else if (!given[opt_index("vocab_size")]) {
            fail("--tokenizer bpe needs --vocab_size N (at least 257: 256 bytes, the merges, end-of-text)");
        } else if (o.vocab_size < 257) {
            fail("vocab too small: --vocab_size %" PRId64 " for bpe must be at least 257 (256 bytes and end-of-text)",
                 o.vocab_size);
        } else if (o.vocab_size > BPE_MAX_VOCAB) {
            fail("--vocab_size %" PRId64 " is larger than a trained BPE may be (%d)", o.vocab_size, BPE_MAX_VOCAB);
        } else {
            vocab = o.vocab_size;
        }
    }
    sync_errors();

    /* contiguous ranges of files by size, one per rank, in list order */
    int64_t my_first = n_files, my_end = n_files;
    {
        uint64_t prefix = 0;
        for (int64_t i = 0; i < n_files; i++) {
            int owner = (int)((double)prefix / (double)total_bytes * g_size);
            if (owner >= g_size) owner = g_size - 1;
            if (owner == g_rank && my_first == n_files) my_first = i;
            if (owner > g_rank) {
                my_end = i;
                break;
            }
            prefix += files.f[i].size;
        }
        if (my_first > my_end) my_first = my_end;
    }

    tokenizer *tok = NULL;
    if (!importing && bpe) {
        progress_begin("counting", o.progress_interval, total_bytes);
        bpe_trainer *trainer = bpe_trainer_new();
        for (int64_t i = my_first; i < my_end && !g_err[0]; i++) {
            uint64_t size = files.f[i].size, share = size;
            if (total_bytes > (uint64_t)o.bpe_train_bytes)
                share = (uint64_t)((long double)size * (long double)o.bpe_train_bytes / (long double)total_bytes);
            count_text_file(&files.f[i], trainer, share, by_blank_line);
        }
        progress_end();
        sync_errors();
        progress_begin("training", o.progress_interval, 0);
        tok = bpe_trainer_finish(trainer, (int)vocab, MPI_COMM_WORLD, bpe_progress);
        if (tokenizer_vocab_size(tok) < vocab && g_rank == 0)
            fprintf(stderr, "prep: note: the corpus allows only %d merges, so the vocabulary has %d tokens, not %" PRId64 "\n",
                    tokenizer_vocab_size(tok) - 257, tokenizer_vocab_size(tok), vocab);
        vocab = tokenizer_vocab_size(tok);
        eot = tokenizer_eot(tok);
    } else if (!importing) {
        tok = tokenizer_byte();
    }

    /* this rank's part of the stream */
    token_buf stream = {NULL, 0, 0, shard_token_bytes(vocab)};
    progress_begin("encoding", o.progress_interval, total_bytes);
    for (int64_t i = my_first; i < my_end && !g_err[0]; i++) {
        const input_file *f = &files.f[i];
        if (f->format == INPUT_TEXT) encode_text_file(f, tok, by_blank_line, !bpe, &stream);
        else if (f->format == INPUT_LLMC) import_llmc(f, vocab, &stream);
        else import_npy(f, vocab, &stream);
    }
    progress_end();
    sync_errors();

    /* the rank's place in the global stream */
    uint64_t mine[2] = {stream.n, stream.n && token_buf_at(&stream, stream.n - 1) == (uint32_t)eot};
    uint64_t *all = xmalloc((size_t)g_size * 2 * sizeof *all);
    MPI_Allgather(mine, 2, MPI_UINT64_T, all, 2, MPI_UINT64_T, MPI_COMM_WORLD);
    uint64_t offset = 0, total = 0;
    int prev_eot = 1; /* the stream's start counts as following an end-of-text */
    for (int r = 0; r < g_size; r++) {
        if (r < g_rank) {
            offset += all[2 * r];
            if (all[2 * r]) prev_eot = (int)all[2 * r + 1];
        }
        total += all[2 * r];
    }
    free(all);
    if (total == 0) fail("empty corpus: the inputs hold no %s", importing ? "tokens" : "text (only blank lines)");
    uint64_t S = (uint64_t)o.shard_tokens;
    uint64_t n_shards = total ? (total + S - 1) / S : 0;
    if (n_shards > MAX_SHARDS)
        fail("--shard_tokens %" PRIu64 " cuts %" PRIu64 " tokens into %" PRIu64 " shards, more than %d; use larger shards",
             S, total, n_shards, MAX_SHARDS);
    sync_errors();

    /* document starts: position 0 and every position after an end-of-text */
    uint64_t n_starts = 0, cap_starts = 1024;
    uint64_t *starts = xmalloc(cap_starts * sizeof *starts); /* global positions, ascending */
    for (uint64_t i = 0; i < stream.n; i++) {
        int is_start = i == 0 ? prev_eot : token_buf_at(&stream, i - 1) == (uint32_t)eot;
        if (!is_start) continue;
        if (n_starts == cap_starts) {
            starts = realloc(starts, (size_t)(cap_starts *= 2) * sizeof *starts);
            if (!starts) die("out of host memory listing documents");
        }
        starts[n_starts++] = offset + i;
    }
    uint64_t *docs_here = xcalloc((size_t)n_shards, sizeof(uint64_t));
    uint64_t *docs_before = xcalloc((size_t)n_shards, sizeof(uint64_t));
    uint64_t *docs_total = xcalloc((size_t)n_shards, sizeof(uint64_t));
    for (uint64_t d = 0; d < n_starts; d++) docs_here[starts[d] / S]++;
    MPI_Exscan(docs_here, docs_before, (int)n_shards, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (g_rank == 0) memset(docs_before, 0, (size_t)n_shards * sizeof *docs_before);
    MPI_Allreduce(docs_here, docs_total, (int)n_shards, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    uint64_t total_docs = 0;
    for (uint64_t k = 0; k < n_shards; k++) total_docs += docs_total[k];

    if (g_rank == 0) prepare_output(o.output);
    sync_errors();

    char *json = NULL;
    if (tok) {
        json = tokenizer_to_json(tok);
    } else {
        size_t cap = 160;
        json = xmalloc(cap);
        int llmc = 0, npy = 0;
        for (int64_t i = 0; i < n_files; i++) {
            llmc |= files.f[i].format == INPUT_LLMC;
            npy |= files.f[i].format == INPUT_NPY;
        }
        snprintf(json, cap, "{\"kind\":\"imported\",\"format\":\"%s\",\"vocab_size\":%" PRId64 ",\"eot_token\":%" PRId64 "}",
                 llmc && npy ? "llmc+npy" : llmc ? "llmc" : "npy", vocab, eot);
    }
    size_t path_cap = strlen(o.output) + 64;
    char *path = xmalloc(path_cap);
    uint64_t *local_docs = xmalloc((size_t)(n_starts + 1) * sizeof *local_docs);
    uint64_t d_next = 0;
    double t_write = wall_time(), last_line = t_write;
    for (uint64_t k = 0; k < n_shards; k++) {
        uint64_t lo = k * S, hi = lo + S < total ? lo + S : total;
        uint64_t a = offset > lo ? offset : lo, b = offset + stream.n < hi ? offset + stream.n : hi;
        shard_part part = {0};
        if (a < b) {
            part.token_start = a - lo;
            part.token_count = b - a;
            part.tokens = stream.data + (a - offset) * (uint64_t)stream.width;
        }
        part.doc_start = docs_before[k];
        part.doc_count = docs_here[k];
        for (uint64_t d = 0; d < docs_here[k]; d++) local_docs[d] = starts[d_next + d] - lo;
        part.doc_offsets = local_docs;
        d_next += docs_here[k];
        shard_meta meta = {vocab, eot, hi - lo, docs_total[k], json, (int64_t)k, (int64_t)n_shards, lo};
        char name[48];
        shard_file_name(name, sizeof name, (int64_t)k, (int64_t)n_shards);
        snprintf(path, path_cap, "%s/%s", o.output, name);
        shard_write(path, MPI_COMM_WORLD, &meta, &part);
        double now = wall_time();
        if (g_rank == 0 && now - last_line >= o.progress_interval && now - t_write >= o.progress_interval) {
            fprintf(stderr, "prep: wrote shard %" PRIu64 " of %" PRIu64 "\n", k + 1, n_shards);
            last_line = now;
        }
    }

    if (g_rank == 0) {
        char hb[32];
        printf("prep: %" PRId64 " file%s (%s) -> %" PRIu64 " tokens, %" PRIu64 " documents, %" PRIu64
               " shard%s in %s (%s, vocab %" PRId64 ", eot %" PRId64 ") in %.1f s on %d rank%s\n",
               n_files, n_files == 1 ? "" : "s", human_bytes((double)total_bytes, hb, sizeof hb), total, total_docs,
               n_shards, n_shards == 1 ? "" : "s", o.output, tok ? tokenizer_kind(tok) : "imported", vocab, eot,
               wall_time() - t_start, g_size, g_size == 1 ? "" : "s");
        fflush(stdout);
    }
    free(path);
    free(local_docs);
    free(json);
    free(starts);
    free(docs_here);
    free(docs_before);
    free(docs_total);
    free(stream.data);
    free(g_progress.peer);
    g_progress.peer = NULL;
    tokenizer_free(tok);
    for (int64_t i = 0; i < files.n; i++) free(files.f[i].path);
    free(files.f);
    free(o.input);
    return 0;
}
