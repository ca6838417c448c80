/* generate.c: `deltamla generate`, sampling text from a checkpoint on the CPU.
 *
 * The checkpoint's weights, router biases and tokenizer are read on the host
 * (ckpt_read_weights); the prompt is encoded with that tokenizer (a checkpoint without
 * one is treated as bytes) and fed token by token to the incremental engine of
 * src/infer.h, which then samples up to --max_new_tokens tokens, each from the logits of
 * the previous step, with a counter-based RNG keyed by --seed so that a seed fixes the
 * text. The prompt and the sampled text go to stdout as they are produced; one summary
 * line goes to stderr. Generation stops early at the end-of-text token, or when the
 * sequence reaches the model's block_size: RoPE and the GDN recurrence would run on,
 * but positions past the training length are out of distribution, so we do not go there.
 *
 * One option table drives the parser and --help (STYLE.md).
 */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef DELTAMLA_HAVE_MPI
#include <mpi.h>
#endif

#include "../io/checkpoint.h"
#include "../io/tokenizer.h"
#include "commands.h"
#include "infer.h"
#include "rng.h"
#include "util.h"

typedef struct gen_options {
    const char *ckpt;   /* checkpoint file, or an output directory holding `latest` */
    const char *prompt;
    int max_new_tokens;
    float temperature;
    int top_k;
    uint64_t seed;
    int threads;
} gen_options;

typedef enum gen_type { GEN_STRING, GEN_INT, GEN_FLOAT, GEN_UINT64 } gen_type;

typedef struct gen_flag {
    const char *name;
    gen_type type;
    size_t offset;      /* into gen_options */
    const char *metavar;
    const char *help;
} gen_flag;

#define GEN_FLAG(field, type, metavar, help) {#field, type, offsetof(gen_options, field), metavar, help}

static const gen_flag gen_flags[] = {
    GEN_FLAG(ckpt, GEN_STRING, "PATH",
             "checkpoint file, or a training output directory (its `latest` file names the checkpoint)"),
    GEN_FLAG(prompt, GEN_STRING, "TEXT", "text to continue (encoded with the checkpoint's tokenizer)"),
    GEN_FLAG(max_new_tokens, GEN_INT, "N", "tokens to sample after the prompt"),
    GEN_FLAG(temperature, GEN_FLOAT, "T", "softmax temperature; 0 = greedy (always the most likely token)"),
    GEN_FLAG(top_k, GEN_INT, "K", "sample among the K most likely tokens; 0 = all"),
    GEN_FLAG(seed, GEN_UINT64, "S", "random seed: the same seed and flags give the same text"),
    GEN_FLAG(threads, GEN_INT, "N", "OpenMP threads, 0 = OpenMP's default"),
};

#define N_GEN_FLAGS (sizeof gen_flags / sizeof gen_flags[0])

/* nanoGPT's sample.py defaults, except the number of tokens */
static void gen_defaults(gen_options *o)
{
    memset(o, 0, sizeof *o);
    o->max_new_tokens = 256;
    o->temperature = 0.8f;
    o->top_k = 200;
    o->seed = 1337;
    o->threads = 0;
}

static void gen_help(FILE *f)
{
    gen_options d;
    gen_defaults(&d);
    fprintf(f, "usage: deltamla generate --ckpt PATH --prompt TEXT [flags]\n"
               "Samples a continuation of TEXT on the CPU; the prompt and the sample go to stdout,\n"
               "a summary line (tokens, tokens/s) to stderr.\n\nflags:\n");
    for (size_t i = 0; i < N_GEN_FLAGS; i++) {
        const gen_flag *g = &gen_flags[i];
        const void *v = (const char *)&d + g->offset;
        char def[64] = "";
        switch (g->type) {
        case GEN_STRING: break;
        case GEN_INT: snprintf(def, sizeof def, " (default %d)", *(const int *)v); break;
        case GEN_FLOAT: snprintf(def, sizeof def, " (default %g)", (double)*(const float *)v); break;
        case GEN_UINT64: snprintf(def, sizeof def, " (default %" PRIu64 ")", *(const uint64_t *)v); break;
        }
        char left[64];
        snprintf(left, sizeof left, "--%s %s", g->name, g->metavar);
        fprintf(f, "  %-22s %s%s\n", left, g->help, def);
    }
}

static void set_flag(const gen_flag *g, gen_options *o, const char *text)
{
    void *dst = (char *)o + g->offset;
    char *end;
    errno = 0;
    int blank = text[0] == '\0' || isspace((unsigned char)text[0]);
    switch (g->type) {
    case GEN_STRING:
        *(const char **)dst = text;
        return;
    case GEN_INT: {
        long v = strtol(text, &end, 10);
        if (blank || *end != '\0' || errno == ERANGE || v < INT_MIN || v > INT_MAX)
            die("--%s: '%s' is not an integer", g->name, text);
        *(int *)dst = (int)v;
        return;
    }
    case GEN_FLOAT: {
        float v = strtof(text, &end);
        if (blank || *end != '\0' || errno == ERANGE || !isfinite(v))
            die("--%s: '%s' is not a finite number", g->name, text);
        *(float *)dst = v;
        return;
    }
    case GEN_UINT64: {
        unsigned long long v = strtoull(text, &end, 10);
        if (blank || text[0] == '-' || text[0] == '+' || *end != '\0' || errno == ERANGE)
            die("--%s: '%s' is not a non-negative integer", g->name, text);
        *(uint64_t *)dst = (uint64_t)v;
        return;
    }
    }
}

/* Returns 1 when --help was asked for (printed already). */
static int gen_parse(gen_options *o, int argc, char **argv)
{
    gen_defaults(o);
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            gen_help(stdout);
            return 1;
        }
    }
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0')
            die("unexpected argument '%s' (deltamla generate --help lists the flags)", arg);
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const gen_flag *g = NULL;
        for (size_t k = 0; k < N_GEN_FLAGS; k++)
            if (strlen(gen_flags[k].name) == len && strncmp(gen_flags[k].name, name, len) == 0) g = &gen_flags[k];
        if (!g) die("unknown flag --%.*s (deltamla generate --help lists the flags)", (int)len, name);
        const char *value = eq ? eq + 1 : NULL;
        if (!value) {
            /* a prompt may itself start with "--", so only a missing word is missing */
            if (i + 1 >= argc || (g->type != GEN_STRING && strncmp(argv[i + 1], "--", 2) == 0))
                die("--%s needs a value (%s)", g->name, g->metavar);
            value = argv[++i];
        }
        set_flag(g, o, value);
    }
    if (!o->ckpt || !o->ckpt[0])
        die("generate needs --ckpt PATH (a checkpoint file or a training output directory)");
    if (!o->prompt) die("generate needs --prompt TEXT");
    if (!o->prompt[0]) die("--prompt is empty: give the text to continue");
    if (o->max_new_tokens < 0) die("--max_new_tokens %d must be 0 or more", o->max_new_tokens);
    if (o->temperature < 0) die("--temperature %g must be 0 (greedy) or more", (double)o->temperature);
    if (o->top_k < 0) die("--top_k %d must be 0 (all tokens) or more", o->top_k);
    if (o->threads < 0) die("--threads %d must be 0 (OpenMP's default) or more", o->threads);
    return 0;
}

/* The checkpoint file that PATH names: PATH itself, or for a training output directory
 * the file its `latest` pointer names (ckpt_latest reads the pointer). malloc'd. */
static char *resolve_ckpt(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) die("cannot open checkpoint %s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        char *p = ckpt_latest(path);
        if (!p) die("%s holds no checkpoint (no `latest` pointer; is it a training output directory?)", path);
        return p;
    }
    char *copy = xmalloc(strlen(path) + 1);
    memcpy(copy, path, strlen(path) + 1);
    return copy;
}

/* Write the bytes of one token to stdout as soon as it is sampled. */
static void emit_token(const tokenizer *tok, int32_t id)
{
    char *bytes = NULL;
    size_t n = tokenizer_decode(tok, &id, 1, &bytes);
    fwrite(bytes, 1, n, stdout);
    fflush(stdout);
    free(bytes);
}

int generate_main(int argc, char **argv)
{
    gen_options o;
    if (gen_parse(&o, argc, argv)) return 0;
#ifdef DELTAMLA_HAVE_MPI
    int world = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (world > 1) die("generate runs on one rank; it was started on %d (run it without mpirun -np)", world);
#endif
#ifdef _OPENMP
    if (o.threads > 0) omp_set_num_threads(o.threads);
#endif

    char *path = resolve_ckpt(o.ckpt);
    ckpt_weights w;
    ckpt_read_weights(path, &w);
    const config *c = &w.cfg;
    tokenizer *tok = w.tokenizer_json ? tokenizer_from_json(w.tokenizer_json) : tokenizer_byte();
    /* a vocabulary padded past the tokenizer's (50304 for 50257) has rows that were never
     * a target; they cannot be decoded, so they are never sampled */
    int V = c->vocab_size, Vs = tokenizer_vocab_size(tok) < V ? tokenizer_vocab_size(tok) : V;
    int eot = tokenizer_eot(tok);

    int32_t *ids = NULL;
    int64_t n = tokenizer_encode(tok, (const unsigned char *)o.prompt, strlen(o.prompt), &ids);
    if (n <= 0) die("--prompt encodes to no tokens");
    if (n > c->block_size)
        die("--prompt is %" PRId64 " tokens long, more than the model's block_size %d", n, c->block_size);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V)
            die("prompt token %d is outside the model's vocabulary (vocab_size %d): the checkpoint's tokenizer "
                "does not fit its model", (int)ids[i], V);

    infer s;
    infer_init(&s, c, &w.table, w.params, w.router_bias);
    if (s.n_moe != w.n_moe)
        die("%s holds router biases for %d MoE layers, its config has %d", path, w.n_moe, s.n_moe);
    float *logits = xmalloc((size_t)V * sizeof *logits);

    fputs(o.prompt, stdout);
    fflush(stdout);
    double t0 = wall_time();
    for (int64_t i = 0; i < n; i++) infer_step(&s, ids[i], logits);
    double t1 = wall_time();

    uint64_t key = rng_key(o.seed, "generate");
    int generated = 0;
    char stop[160] = "max_new_tokens";
    while (generated < o.max_new_tokens) {
        if (n + generated >= c->block_size) {
            snprintf(stop, sizeof stop, "block_size %d total tokens (positions past the training length are out "
                     "of distribution)", c->block_size);
            break;
        }
        int32_t next = infer_sample(logits, Vs, o.temperature, o.top_k, key, (uint64_t)generated);
        if (next == eot) {
            snprintf(stop, sizeof stop, "the end-of-text token");
            break;
        }
        emit_token(tok, next);
        generated++;
        if (generated < o.max_new_tokens && n + generated < c->block_size) infer_step(&s, next, logits);
    }
    double t2 = wall_time();
    fputc('\n', stdout);
    fflush(stdout);

    /* one line, whatever happened; a block_size stop says why it is one */
    double dt = t2 - t1;
    fprintf(stderr,
            "deltamla generate: %" PRId64 " prompt tokens in %.3f s (%.1f tokens/s), %d new tokens in %.3f s "
            "(%.1f tokens/s), %d threads; stopped at %s\n",
            n, t1 - t0, (t1 - t0) > 0 ? n / (t1 - t0) : 0.0, generated, dt, dt > 0 ? generated / dt : 0.0,
#ifdef _OPENMP
            omp_get_max_threads(),
#else
            1,
#endif
            stop);

    free(logits);
    infer_free(&s);
    free(ids);
    tokenizer_free(tok);
    ckpt_weights_free(&w);
    free(path);
    return 0;
}
