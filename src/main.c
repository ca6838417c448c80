/* main.c: the `deltamla` command: subcommand dispatch, MPI start-up and `info`. */
#include <stdio.h>
#include <string.h>

#ifdef DELTAMLA_HAVE_MPI
#include <mpi.h>
#endif

#include "commands.h"
#include "config.h"
#include "params.h"
#include "train.h"
#include "util.h"
#include "version.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: deltamla <command> [flags]\n"
            "commands:\n"
            "  train     train the model (deltamla train --help lists every flag)\n"
            "  prep      turn text files (or llm.c .bin / .npy token files) into token shards\n"
            "  ckpt      inspect, verify, export or import checkpoints (deltamla ckpt --help)\n"
            "  generate  sample text from a checkpoint\n"
            "  info      print the resolved config, every parameter tensor and the parameter counts\n"
            "  --version\n");
}

/* 296719668 -> "296,719,668" */
static const char *grouped(long long v, char *buf, size_t n)
{
    char raw[32];
    snprintf(raw, sizeof raw, "%lld", v < 0 ? -v : v);
    size_t len = strlen(raw), o = 0;
    if (v < 0 && o + 1 < n) buf[o++] = '-';
    for (size_t i = 0; i < len && o + 2 < n; i++) {
        if (i && (len - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = raw[i];
    }
    buf[o] = 0;
    return buf;
}

static int info_main(const config *c)
{
    config_print(c, stdout);
    param_table t;
    params_build(&t, c);
    printf("\nparameters (%d tensors):\n", t.count);
    for (int i = 0; i < t.count; i++) {
        const param_info *p = &t.items[i];
        char shape[64];
        if (p->ndim == 1) snprintf(shape, sizeof shape, "[%lld]", (long long)p->shape[0]);
        else if (p->ndim == 2) snprintf(shape, sizeof shape, "[%lld, %lld]", (long long)p->shape[0], (long long)p->shape[1]);
        else snprintf(shape, sizeof shape, "[%lld, %lld, %lld]", (long long)p->shape[0], (long long)p->shape[1], (long long)p->shape[2]);
        printf("  %-56s %-20s %12zu\n", p->name, shape, p->numel);
    }
    int64_t total, active;
    params_count(&t, &total, &active);
    char a[32], b[32];
    printf("\ntotal parameters:  %s\nactive parameters: %s (per token)\n", grouped(total, a, sizeof a),
           grouped(active, b, sizeof b));
    params_free(&t);
    return 0;
}

int main(int argc, char **argv)
{
#ifdef DELTAMLA_HAVE_MPI
    /* the data loader's prefetch thread reads through MPI-IO while training runs */
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
#endif
    int status = 0;
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        status = argc < 2 ? 2 : 0;
    } else if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "version") == 0) {
        printf("deltamla %s\n", DELTAMLA_VERSION);
    } else if (strcmp(argv[1], "prep") == 0) {
        status = prep_main(argc - 2, argv + 2);
    } else if (strcmp(argv[1], "ckpt") == 0) {
        status = ckpt_main(argc - 2, argv + 2);
    } else if (strcmp(argv[1], "generate") == 0) {
        status = generate_main(argc - 2, argv + 2);
    } else if (strcmp(argv[1], "train") == 0 || strcmp(argv[1], "info") == 0) {
        config c;
        config_parse(&c, argc - 2, argv + 2);
        if (argv[1][0] == 'i') {
            status = info_main(&c);
        } else {
            status = train_main(&c);
        }
    } else {
        die("unknown command '%s' (commands: train, prep, ckpt, generate, info; deltamla --help)", argv[1]);
    }
#ifdef DELTAMLA_HAVE_MPI
    MPI_Finalize();
#endif
    return status;
}
