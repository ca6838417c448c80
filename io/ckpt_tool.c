/* ckpt_tool.c: `deltamla ckpt info|verify|export|import`, the bridge between deltamla's
 * HDF5 checkpoints (checkpoint.h) and the PyTorch reference's world of safetensors.
 *
 * info and verify inspect a checkpoint; export turns one into a folder a Hugging Face
 * user can upload as it is (model.safetensors under the reference's names and layouts,
 * config.json, tokenizer.json, a README.md model card); import goes the other way: it
 * takes a safetensors file under the reference's names, checks it against the model
 * the flags describe, tensor by tensor, and writes a step-0 checkpoint that
 * `deltamla train --output_dir DIR` resumes from. Our parameter table already uses the
 * reference's names and shapes (params.h), so neither direction renames or transposes
 * anything: the work here is checking, and saying precisely what does not fit.
 *
 * This file holds the dispatch; the subcommands live in ckpt_inspect.c (info, verify),
 * ckpt_export.c and ckpt_import.c, their shared helpers in ckpt_tool_common.c.
 *
 * The subcommands and their flags are two tables below; parsing and --help both walk
 * them (STYLE.md rule 6). import hands every flag it does not own to config_parse, so
 * the model is described exactly as for `deltamla train`.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef DELTAMLA_HAVE_MPI
#include <mpi.h>
#endif

#include <hdf5.h>

#include "checkpoint.h"
#include "ckpt_tool_internal.h"
#include "commands.h"
#include "safetensors.h"
#include "tokenizer.h"
#include "util.h"

/* ---- the command and flag tables ---- */

enum {
    CMD_INFO = 1 << 0,
    CMD_VERIFY = 1 << 1,
    CMD_EXPORT = 1 << 2,
    CMD_IMPORT = 1 << 3,
};

typedef struct ckpt_flag {
    const char *name;     /* without "--" */
    const char *metavar;  /* NULL: an on/off flag without a value */
    unsigned commands;    /* CMD_* bits of the subcommands that take it */
    size_t offset;        /* offsetof(ckpt_args, field) */
    const char *help;
} ckpt_flag;

static const ckpt_flag flags[] = {
    {"out", "DIR", CMD_EXPORT | CMD_IMPORT, offsetof(ckpt_args, out),
     "export: the folder to write; import: the output directory for the checkpoint (required)"},
    {"force", NULL, CMD_EXPORT | CMD_IMPORT, offsetof(ckpt_args, force),
     "export: write into a non-empty folder; import: write into a directory that already holds checkpoints"},
    {"config", "FILE", CMD_IMPORT, offsetof(ckpt_args, config),
     "the model as config JSON (an exported config.json) instead of model flags"},
    {"tokenizer", "FILE", CMD_IMPORT, offsetof(ckpt_args, tokenizer),
     "a tokenizer JSON (an exported tokenizer.json) to store in the checkpoint"},
};

#define N_FLAGS (sizeof flags / sizeof flags[0])

typedef struct ckpt_command {
    const char *name;
    unsigned bit;
    const char *positional;
    const char *help;
    int (*run)(const ckpt_args *a);
} ckpt_command;

static const ckpt_command commands[] = {
    {"info", CMD_INFO, "PATH|DIR",
     "step, config summary, tokenizer, parameter counts and every tensor with its shape and checksum status",
     ckpt_cmd_info},
    {"verify", CMD_VERIFY, "PATH|DIR", "check the file and every dataset's checksum: prints \"ok\" or the problem, exit 0/1",
     ckpt_cmd_verify},
    {"export", CMD_EXPORT, "PATH|DIR",
     "write --out FOLDER: model.safetensors (reference names, F32), config.json, tokenizer.json, README.md",
     ckpt_cmd_export},
    {"import", CMD_IMPORT, "FILE.safetensors",
     "check a safetensors file under the reference's names against the model the flags describe and write "
     "a step-0 checkpoint into --out DIR (fresh optimizer state)",
     ckpt_cmd_import},
};

#define N_COMMANDS (sizeof commands / sizeof commands[0])

static void ckpt_help(FILE *f)
{
    fputs("usage: deltamla ckpt <command> PATH [flags]\n"
          "PATH|DIR is a checkpoint file or an output directory (its `latest` checkpoint is used).\n\ncommands:\n",
          f);
    for (size_t i = 0; i < N_COMMANDS; i++)
        fprintf(f, "  %-6s %-17s %s\n", commands[i].name, commands[i].positional, commands[i].help);
    fputs("\nflags:\n", f);
    for (size_t i = 0; i < N_FLAGS; i++) {
        char flag[48], users[64] = "";
        snprintf(flag, sizeof flag, "--%s%s%s", flags[i].name, flags[i].metavar ? " " : "",
                 flags[i].metavar ? flags[i].metavar : "");
        for (size_t c = 0; c < N_COMMANDS; c++)
            if (flags[i].commands & commands[c].bit) {
                size_t len = strlen(users);
                snprintf(users + len, sizeof users - len, "%s%s", len ? "," : "", commands[c].name);
            }
        fprintf(f, "  %-16s [%s] %s\n", flag, users, flags[i].help);
    }
    fputs("\nimport also takes the model flags of `deltamla train` (--size, --n_layer, --n_embd, ...;\n"
          "deltamla train --help lists them): the checkpoint gets exactly that config.\n",
          f);
}

static const ckpt_flag *find_flag(const char *name)
{
    for (size_t i = 0; i < N_FLAGS; i++)
        if (strcmp(flags[i].name, name) == 0) return &flags[i];
    return NULL;
}

/* Split argv (after the command name) into our flags, the positional argument and, for
 * import, the rest: model flags with their values, handed to config_parse whole and in
 * order, since only config_parse knows which of them take a value. For that reason
 * import's file must come first; the other commands take it anywhere. */
static void parse_args(const ckpt_command *cmd, int argc, char **argv, ckpt_args *a)
{
    memset(a, 0, sizeof *a);
    a->model = xmalloc((size_t)(argc + 1) * sizeof *a->model);
    int i = 0;
    if (cmd->bit == CMD_IMPORT) {
        if (argc < 1 || strncmp(argv[0], "--", 2) == 0)
            die("ckpt import: the safetensors file comes first (deltamla ckpt import FILE.safetensors --out DIR "
                "[model flags])");
        a->input = argv[i++];
    }
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (cmd->bit == CMD_IMPORT) {
                a->model[a->n_model++] = argv[i];
                continue;
            }
            if (a->input) die("ckpt %s: unexpected argument '%s' (it takes one %s)", cmd->name, arg, cmd->positional);
            a->input = arg;
            continue;
        }
        char name[64];
        const char *eq = strchr(arg + 2, '=');
        size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
        snprintf(name, sizeof name, "%.*s", (int)(len < sizeof name ? len : sizeof name - 1), arg + 2);
        const ckpt_flag *fl = find_flag(name);
        if (!fl || !(fl->commands & cmd->bit)) {
            if (cmd->bit == CMD_IMPORT && !fl) {
                a->model[a->n_model++] = argv[i];
                continue;
            }
            die("ckpt %s: unknown flag --%s (deltamla ckpt --help lists the flags)", cmd->name, name);
        }
        void *dst = (char *)a + fl->offset;
        if (!fl->metavar) {
            if (eq) die("ckpt %s: --%s takes no value", cmd->name, fl->name);
            *(int *)dst = 1;
        } else if (eq) {
            *(const char **)dst = eq + 1;
        } else {
            if (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)
                die("ckpt %s: --%s needs a value (%s)", cmd->name, fl->name, fl->metavar);
            *(const char **)dst = argv[++i];
        }
    }
    if (!a->input) die("ckpt %s: which checkpoint? (usage: deltamla ckpt %s %s)", cmd->name, cmd->name, cmd->positional);
    if ((cmd->bit & (CMD_EXPORT | CMD_IMPORT)) && !a->out)
        die("ckpt %s: --out is required (deltamla ckpt --help)", cmd->name);
    if (a->config && a->n_model)
        die("ckpt import: --config and model flags (%s) cannot be combined: the config file describes the whole model",
            a->model[0]);
}

/* ---- entry ---- */

int ckpt_main(int argc, char **argv)
{
    if (argc < 1 || strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0 || strcmp(argv[0], "help") == 0) {
        ckpt_help(argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            ckpt_help(stdout);
            return 0;
        }
#ifdef DELTAMLA_HAVE_MPI
    int world = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    if (world > 1) die("deltamla ckpt runs on one rank; it was started on %d (run it without mpirun -np)", world);
#endif
    for (size_t i = 0; i < N_COMMANDS; i++) {
        if (strcmp(argv[0], commands[i].name) != 0) continue;
        ckpt_args a;
        parse_args(&commands[i], argc - 1, argv + 1, &a);
        int status = commands[i].run(&a);
        free(a.model);
        return status;
    }
    die("unknown ckpt command '%s' (commands: info, verify, export, import; deltamla ckpt --help)", argv[0]);
}
