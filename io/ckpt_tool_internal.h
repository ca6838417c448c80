/* ckpt_tool_internal.h: what the files of `deltamla ckpt` share (defined in
 * ckpt_tool_common.c, the subcommands in ckpt_inspect.c, ckpt_export.c, ckpt_import.c);
 * not for use outside io/ckpt_*.c.
 */
#ifndef DELTAMLA_CKPT_TOOL_INTERNAL_H
#define DELTAMLA_CKPT_TOOL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"

typedef struct ckpt_args {
    const char *input;     /* the positional argument */
    const char *out;       /* --out */
    const char *config;    /* --config */
    const char *tokenizer; /* --tokenizer */
    int force;             /* --force */
    int n_model;           /* import: flags left for config_parse */
    char **model;
} ckpt_args;

/* The subcommands; each returns the process exit status. */
int ckpt_cmd_info(const ckpt_args *a);
int ckpt_cmd_verify(const ckpt_args *a);
int ckpt_cmd_export(const ckpt_args *a);
int ckpt_cmd_import(const ckpt_args *a);

/* A checkpoint file, or the one `latest` points to in an output directory; malloc'd. */
char *ckpt_resolve_checkpoint(const char *path);
void ckpt_format_shape(char *buf, size_t n, int ndim, const int64_t *shape);
/* 296719668 -> "296,719,668" */
const char *ckpt_grouped(long long v, char *buf, size_t n);
char *ckpt_read_text_file(const char *path);
/* Write through a temporary name and rename, as st_write does, so a reader of the
 * folder never sees half a file. */
void ckpt_write_file(const char *path, const char *text);
/* The config as JSON text (config_json writes to a FILE); malloc'd. */
char *ckpt_config_json_text(const config *c);
int ckpt_n_gdn_layers(const config *c);
/* mkdir -p */
void ckpt_make_dirs(const char *path);

#endif
