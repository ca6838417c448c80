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

typedef struct ckpt_args {
    const char *input;     /* the positional argument */
    const char *out;       /* --out */
    const char *config;    /* --config */
    const char *tokenizer; /* --tokenizer */
    int force;             /* --force */
    int n_model;           /* import: flags left for config_parse */
    char **model;
} ckpt_args;

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

static int cmd_info(const ckpt_args *a);
static int cmd_verify(const ckpt_args *a);
static int cmd_export(const ckpt_args *a);
static int cmd_import(const ckpt_args *a);

static const ckpt_command commands[] = {
    {"info", CMD_INFO, "PATH|DIR",
     "step, config summary, tokenizer, parameter counts and every tensor with its shape and checksum status",
     cmd_info},
    {"verify", CMD_VERIFY, "PATH|DIR", "check the file and every dataset's checksum: prints \"ok\" or the problem, exit 0/1",
     cmd_verify},
    {"export", CMD_EXPORT, "PATH|DIR",
     "write --out FOLDER: model.safetensors (reference names, F32), config.json, tokenizer.json, README.md",
     cmd_export},
    {"import", CMD_IMPORT, "FILE.safetensors",
     "check a safetensors file under the reference's names against the model the flags describe and write "
     "a step-0 checkpoint into --out DIR (fresh optimizer state)",
     cmd_import},
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

/* ---- shared helpers ---- */

/* A checkpoint file, or the one `latest` points to in an output directory; malloc'd. */
static char *resolve_checkpoint(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) die("cannot open %s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        char *p = xmalloc(strlen(path) + 1);
        strcpy(p, path);
        return p;
    }
    char *p = ckpt_latest(path);
    if (!p) die("%s holds no checkpoint (no `latest` pointer; is it a training output directory?)", path);
    return p;
}

static void format_shape(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && o < n; d++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
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

static char *read_text_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (len + 1 == cap) {
            cap *= 2;
            char *n = realloc(buf, cap);
            if (!n) die("out of host memory reading %s", path);
            buf = n;
        }
        size_t got = fread(buf + len, 1, cap - 1 - len, f);
        len += got;
        if (got == 0) break;
    }
    if (ferror(f)) die("cannot read %s: %s", path, strerror(errno));
    fclose(f);
    buf[len] = '\0';
    if (strlen(buf) != len) die("%s is not a text file (it holds a NUL byte)", path);
    return buf;
}

/* Write through a temporary name and rename, as st_write does, so a reader of the
 * folder never sees half a file. */
static void write_file(const char *path, const char *text)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) die("cannot write %s: %s", tmp, strerror(errno));
    size_t n = strlen(text);
    int ok = fwrite(text, 1, n, f) == n;
    if (fclose(f) != 0) ok = 0;
    if (!ok) die("writing %s failed: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0) die("cannot rename %s to %s: %s", tmp, path, strerror(errno));
}

/* The config as JSON text (config_json writes to a FILE); malloc'd. */
static char *config_json_text(const config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) die("out of host memory writing the config");
    config_json(c, f);
    fclose(f);
    return text;
}

static int n_gdn_layers(const config *c)
{
    int n = 0;
    for (int l = 0; l < c->n_layer; l++) n += config_is_gdn(c, l);
    return n;
}

/* One line per part of the model: enough to recognise a run, not the whole config
 * (export writes that as config.json). */
static void print_config_summary(const config *c, FILE *f)
{
    int gdn = n_gdn_layers(c);
    fprintf(f, "model       size %s: %d layers (%d GDN, %d MLA), d %d, %d heads, vocab %d, block %d\n", c->size,
            c->n_layer, gdn, c->n_layer - gdn, c->n_embd, c->n_head, c->vocab_size, c->block_size);
    char latent[32] = "off";
    if (c->deltanet_latent_dim) snprintf(latent, sizeof latent, "rank %d", c->deltanet_latent_dim);
    fprintf(f, "  GDN       head_dim %d, q/k projections %s, latent %s\n", c->head_dim,
            c->deltanet_share_qk ? "shared" : "separate", latent);
    fprintf(f, "  MLA       q LoRA rank %d, kv LoRA rank %d, head dims nope %d rope %d v %d\n", c->mla_q_lora_rank,
            c->mla_kv_lora_rank, c->mla_qk_nope_head_dim, c->mla_qk_rope_head_dim, c->mla_v_head_dim);
    if (c->use_moe)
        fprintf(f, "  FFN       %s: %d routed experts, top %d, hidden %d, width %d; %d shared (hidden %d)\n",
                c->use_latent_moe ? "LatentMoE" : "MoE", c->moe_E, c->moe_k, c->moe_hidden, c->moe_in,
                c->n_shared_experts, c->expert_dim);
    else
        fprintf(f, "  FFN       dense SwiGLU MLP (hidden %d)\n", 4 * c->n_embd);
    fprintf(f, "training    optimizer %s, lr %g -> %g, warmup %d, max_iters %d, batch %d x %d x %d accumulation\n",
            c->optimizer_type, (double)c->learning_rate, (double)c->min_lr, c->warmup_iters, c->max_iters,
            c->batch_size, c->block_size, c->gradient_accumulation_steps);
    fprintf(f, "data        %s\n", c->data[0] ? c->data : "(none recorded)");
}

static void describe_tokenizer(const char *json, char *buf, size_t n)
{
    if (!json) {
        snprintf(buf, n, "none stored");
        return;
    }
    tokenizer *t = tokenizer_from_json(json);
    snprintf(buf, n, "%s (vocab %d, end-of-text token %d)", tokenizer_kind(t), tokenizer_vocab_size(t),
             tokenizer_eot(t));
    tokenizer_free(t);
}

/* verify's reason, naming the file once whether or not checkpoint.c's text does */
static void format_reason(char *buf, size_t n, const char *path, const char *why)
{
    if (!why) why = "verification failed";
    if (strncmp(why, path, strlen(path)) == 0) snprintf(buf, n, "%s", why);
    else snprintf(buf, n, "%s: %s", path, why);
}

/* ---- verify ---- */

static int cmd_verify(const ckpt_args *a)
{
    char *path = resolve_checkpoint(a->input);
    const char *why = NULL;
    int bad = ckpt_verify(path, &why);
    if (bad) {
        char reason[1024];
        format_reason(reason, sizeof reason, path, why);
        printf("%s\n", reason);
    } else {
        printf("ok %s\n", path);
    }
    free(path);
    return bad ? 1 : 0;
}

/* ---- info's look at a damaged checkpoint ----
 * A checkpoint that fails verification cannot be read through ckpt_read_weights (it
 * stops at the first bad dataset), yet that is when a per-tensor report matters most:
 * which tensors are damaged, and is it the weights or only the optimizer state? So info
 * then reads the file itself, following the layout checkpoint.c documents (root
 * attributes step, config, tokenizer; datasets /params/<name>, /optim/m/<name>,
 * /optim/v/<name>, /router_bias/<layer>, each with a crc32 attribute, the CRC-32 of its
 * little-endian bytes). */

static uint32_t crc_table[256];

/* CRC-32 with the IEEE polynomial, as zlib's crc32 (the checksum checkpoints store) */
static uint32_t crc32_of(const void *data, size_t n)
{
    if (!crc_table[1])
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
            crc_table[i] = c;
        }
    const unsigned char *p = data;
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

/* A fixed- or variable-length string attribute, malloc'd; NULL when absent or unreadable. */
static char *attr_text(hid_t obj, const char *name)
{
    if (H5Aexists(obj, name) <= 0) return NULL;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return NULL;
    hid_t ftype = H5Aget_type(a), mtype = H5Tcopy(H5T_C_S1);
    char *out = NULL;
    if (ftype >= 0 && H5Tget_class(ftype) == H5T_STRING) {
        if (H5Tis_variable_str(ftype) > 0) {
            char *v = NULL;
            H5Tset_size(mtype, H5T_VARIABLE);
            if (H5Aread(a, mtype, &v) >= 0 && v) {
                out = xmalloc(strlen(v) + 1);
                strcpy(out, v);
                H5free_memory(v);
            }
        } else {
            size_t size = H5Tget_size(ftype);
            H5Tset_size(mtype, size + 1);
            H5Tset_strpad(mtype, H5T_STR_NULLTERM);
            out = xcalloc(size + 2, 1);
            if (H5Aread(a, mtype, out) < 0) {
                free(out);
                out = NULL;
            }
        }
    }
    H5Tclose(mtype);
    if (ftype >= 0) H5Tclose(ftype);
    H5Aclose(a);
    return out;
}

/* Check one dataset as ckpt_verify does; returns 1 if good, else 0 with a short reason
 * in buf. Absent optional datasets (AdamW's v of a Muon tensor) are the caller's call. */
static int dataset_ok(hid_t file, const char *dpath, int ndim, const int64_t *shape, char *buf, size_t n)
{
    if (H5Lexists(file, dpath, H5P_DEFAULT) <= 0) {
        snprintf(buf, n, "%s missing", dpath);
        return 0;
    }
    hid_t ds = H5Dopen2(file, dpath, H5P_DEFAULT);
    if (ds < 0) {
        snprintf(buf, n, "%s unreadable", dpath);
        return 0;
    }
    hid_t space = H5Dget_space(ds);
    hsize_t dims[8] = {0};
    int nd = H5Sget_simple_extent_ndims(space);
    int same = nd == ndim && nd <= 8;
    if (same) H5Sget_simple_extent_dims(space, dims, NULL);
    size_t numel = 1;
    for (int d = 0; same && d < ndim; d++) {
        same = dims[d] == (hsize_t)shape[d];
        numel *= (size_t)shape[d];
    }
    H5Sclose(space);
    uint32_t stored = 0;
    int ok = 0;
    if (!same) {
        snprintf(buf, n, "%s has another shape", dpath);
    } else if (H5Aexists(ds, "crc32") <= 0) {
        snprintf(buf, n, "%s has no checksum", dpath);
    } else {
        hid_t at = H5Aopen(ds, "crc32", H5P_DEFAULT);
        float *data = xmalloc((numel ? numel : 1) * sizeof(float));
        if (at < 0 || H5Aread(at, H5T_NATIVE_UINT32, &stored) < 0 ||
            H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
            snprintf(buf, n, "%s unreadable", dpath);
        else if (crc32_of(data, numel * sizeof(float)) != stored)
            snprintf(buf, n, "%s fails its checksum", dpath);
        else
            ok = 1;
        if (at >= 0) H5Aclose(at);
        free(data);
    }
    H5Dclose(ds);
    return ok;
}

/* The listing of a checkpoint that failed verification: every tensor's status from
 * the file itself. Returns 0 when the file could not even be opened as a checkpoint
 * with a config (the caller then reports verify's reason alone). */
static int info_damaged(const char *path)
{
    H5E_auto2_t efunc;
    void *edata;
    H5Eget_auto2(H5E_DEFAULT, &efunc, &edata);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL); /* our one-word reasons replace HDF5's error stacks */
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    char *cfg_json = file >= 0 ? attr_text(file, "config") : NULL;
    if (!cfg_json) {
        if (file >= 0) H5Fclose(file);
        H5Eset_auto2(H5E_DEFAULT, efunc, edata);
        return 0;
    }
    config c;
    config_from_json(cfg_json, &c);
    free(cfg_json);
    int64_t step = -1;
    if (H5Aexists(file, "step") > 0) {
        hid_t at = H5Aopen(file, "step", H5P_DEFAULT);
        if (at < 0 || H5Aread(at, H5T_NATIVE_INT64, &step) < 0) step = -1;
        if (at >= 0) H5Aclose(at);
    }
    /* attributes live in the file's metadata, which HDF5 checksums itself: a tokenizer
     * that reads at all is intact */
    char *tok_json = attr_text(file, "tokenizer"), tok[160];
    describe_tokenizer(tok_json, tok, sizeof tok);
    printf("step        %lld\n", (long long)step);
    print_config_summary(&c, stdout);
    printf("tokenizer   %s\n", tok);
    free(tok_json);

    param_table t;
    params_build(&t, &c);
    int width = 0, bad = 0, n_moe = c.use_moe ? c.n_layer - n_gdn_layers(&c) : 0;
    for (int i = 0; i < t.count; i++)
        if ((int)strlen(t.items[i].name) > width) width = (int)strlen(t.items[i].name);
    printf("\ntensors (%d):\n  %-*s %-18s %12s  %s\n", t.count + n_moe, width, "name", "shape", "elements",
           "checksum (weights, optimizer state)");
    for (int i = 0; i < t.count; i++) {
        const param_info *p = &t.items[i];
        char shape[64], why[3][200], dpath[3][160];
        format_shape(shape, sizeof shape, p->ndim, p->shape);
        snprintf(dpath[0], sizeof dpath[0], "/params/%s", p->name);
        snprintf(dpath[1], sizeof dpath[1], "/optim/m/%s", p->name);
        snprintf(dpath[2], sizeof dpath[2], "/optim/v/%s", p->name);
        int good[3];
        for (int k = 0; k < 3; k++) {
            /* v exists only for the tensors AdamW updates */
            good[k] = (k == 2 && H5Lexists(file, dpath[2], H5P_DEFAULT) <= 0) ||
                      dataset_ok(file, dpath[k], p->ndim, p->shape, why[k], sizeof why[k]);
        }
        printf("  %-*s %-18s %12zu  ", width, p->name, shape, p->numel);
        if (good[0] && good[1] && good[2]) {
            printf("ok\n");
            continue;
        }
        bad++;
        printf("BAD:");
        for (int k = 0, first = 1; k < 3; k++)
            if (!good[k]) {
                printf("%s %s", first ? "" : ";", why[k]);
                first = 0;
            }
        printf("\n");
    }
    for (int l = 0; l < c.n_layer && c.use_moe; l++) {
        if (config_is_gdn(&c, l)) continue;
        char name[96], dpath[64], why[200], shape[32];
        int64_t E = c.moe_E;
        snprintf(name, sizeof name, "transformer.h.%d.ffn.router.expert_bias", l);
        snprintf(dpath, sizeof dpath, "/router_bias/%d", l);
        format_shape(shape, sizeof shape, 1, &E);
        int good = dataset_ok(file, dpath, 1, &E, why, sizeof why);
        bad += !good;
        printf("  %-*s %-18s %12lld  %s%s\n", width, name, shape, (long long)E, good ? "ok" : "BAD: ", good ? "" : why);
    }
    printf("%d of %d tensors damaged\n", bad, t.count + n_moe);
    params_free(&t);
    H5Fclose(file);
    H5Eclear2(H5E_DEFAULT);
    H5Eset_auto2(H5E_DEFAULT, efunc, edata);
    return 1;
}

static int cmd_info(const ckpt_args *a)
{
    char *path = resolve_checkpoint(a->input);
    const char *why = NULL;
    printf("checkpoint  %s\n", path);
    if (ckpt_verify(path, &why) != 0) {
        /* why is a static buffer of checkpoint.c: keep it across the listing */
        char reason[1024];
        format_reason(reason, sizeof reason, path, why);
        printf("checksums   FAILED: %s\n", reason);
        fflush(stdout);
        info_damaged(path);
        fflush(stdout);
        die("%s", reason);
    }
    ckpt_weights w;
    ckpt_read_weights(path, &w);
    const config *c = &w.cfg;
    printf("step        %lld\n", (long long)w.step);
    printf("checksums   ok (every dataset: weights, optimizer state, router biases)\n");
    print_config_summary(c, stdout);
    char tok[160];
    describe_tokenizer(w.tokenizer_json, tok, sizeof tok);
    printf("tokenizer   %s\n", tok);
    int64_t total, active;
    params_count(&w.table, &total, &active);
    char ta[32], tb[32];
    printf("parameters  %s total, %s active per token\n", grouped(total, ta, sizeof ta),
           grouped(active, tb, sizeof tb));
    int width = 0;
    for (int i = 0; i < w.table.count; i++)
        if ((int)strlen(w.table.items[i].name) > width) width = (int)strlen(w.table.items[i].name);
    printf("\ntensors (%d):\n  %-*s %-18s %12s  %s\n", w.table.count + w.n_moe, width, "name", "shape",
           "elements", "checksum");
    for (int i = 0; i < w.table.count; i++) {
        const param_info *p = &w.table.items[i];
        char shape[64];
        format_shape(shape, sizeof shape, p->ndim, p->shape);
        printf("  %-*s %-18s %12zu  ok\n", width, p->name, shape, p->numel);
    }
    /* the router selection biases, under the names export gives them, with their range */
    for (int l = 0, slot = 0; l < c->n_layer && c->use_moe; l++) {
        if (config_is_gdn(c, l)) continue;
        const float *b = w.router_bias + (size_t)slot * (size_t)c->moe_E;
        float lo = b[0], hi = b[0];
        for (int e = 1; e < c->moe_E; e++) {
            lo = fminf(lo, b[e]);
            hi = fmaxf(hi, b[e]);
        }
        char name[96], shape[32];
        snprintf(name, sizeof name, "transformer.h.%d.ffn.router.expert_bias", l);
        snprintf(shape, sizeof shape, "[%d]", c->moe_E);
        printf("  %-*s %-18s %12d  ok (values %g to %g)\n", width, name, shape, c->moe_E, (double)lo, (double)hi);
        slot++;
    }
    ckpt_weights_free(&w);
    free(path);
    return 0;
}

/* ---- export ---- */

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (!d) die("cannot read %s: %s", path, strerror(errno));
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) empty = 0;
    closedir(d);
    return empty;
}

/* mkdir -p */
static void make_dirs(const char *path)
{
    char buf[4096];
    if (strlen(path) >= sizeof buf) die("path too long: %s", path);
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create %s: %s", buf, strerror(errno));
}

/* Refuse an unusable export folder before any work; it is created only once the
 * checkpoint has been read, so a refused export leaves nothing behind. */
static void check_folder(const char *out, int force)
{
    struct stat st;
    if (stat(out, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) die("--out %s exists and is not a directory", out);
        if (!force && !dir_is_empty(out))
            die("--out %s exists and is not empty (pass --force to write into it)", out);
    } else if (errno != ENOENT) {
        die("cannot use --out %s: %s", out, strerror(errno));
    }
}

static char *model_card(const ckpt_weights *w, const char *source, int with_tokenizer)
{
    const config *c = &w->cfg;
    int64_t total, active;
    params_count(&w->table, &total, &active);
    char ta[32], tb[32];
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) die("out of host memory writing the model card");
    int gdn = n_gdn_layers(c);
    /* the front matter is what the Hugging Face hub reads to classify a model */
    fprintf(f, "---\nlibrary_name: deltamla\ntags:\n- deltamla\n- gated-deltanet\n- multi-head-latent-attention\n%s---\n\n",
            c->use_moe ? "- mixture-of-experts\n" : "");
    fprintf(f,
            "# deltamla %s model, step %lld\n\n"
            "A hybrid Gated DeltaNet / Multi-head Latent Attention language model trained with\n"
            "deltamla and exported by `deltamla ckpt export` from `%s`.\n\n"
            "%d layers (%d Gated DeltaNet, %d MLA), width %d, %d heads, vocabulary %d, context %d;\n"
            "%s parameters in total, %s active per token.\n\n",
            c->size, (long long)w->step, source, c->n_layer, gdn, c->n_layer - gdn, c->n_embd, c->n_head,
            c->vocab_size, c->block_size, grouped(total, ta, sizeof ta), grouped(active, tb, sizeof tb));
    fprintf(f,
            "## Files\n\n"
            "| file | what it holds |\n|---|---|\n"
            "| `model.safetensors` | every parameter in float32 under the PyTorch reference's names and "
            "layouts (Linear weights [out, in], routed expert stacks [E, in, out], short convolutions "
            "[P, 1, 4])%s |\n"
            "| `config.json` | deltamla's configuration of the run (every flag of `deltamla train`, and the "
            "derived shapes) |\n",
            w->n_moe ? ", and each MoE layer's router selection bias as "
                       "`transformer.h.{i}.ffn.router.expert_bias` [E]"
                     : "");
    if (with_tokenizer)
        fprintf(f, "| `tokenizer.json` | deltamla's tokenizer (its own JSON format, not the Hugging Face "
                   "`tokenizers` one) |\n");
    fprintf(f,
            "\n`lm_head.weight` is not in the file: the output head is tied to the embedding, so it\n"
            "is `transformer.wte.weight`. Load with `strict=False` (or tie the head after loading);\n"
            "the routers' monitoring buffers `load_history` and `update_count` are not stored either.\n\n"
            "```python\n"
            "from safetensors.torch import load_file\n"
            "state = load_file(\"model.safetensors\")\n"
            "state[\"lm_head.weight\"] = state[\"transformer.wte.weight\"]\n"
            "model.load_state_dict(state, strict=False)\n"
            "```\n\n"
            "To continue training with deltamla: `deltamla ckpt import model.safetensors --config config.json "
            "--out DIR%s`, then `deltamla train --output_dir DIR ...`.\n",
            with_tokenizer ? " --tokenizer tokenizer.json" : "");
    fclose(f);
    return text;
}

static int cmd_export(const ckpt_args *a)
{
    char *path = resolve_checkpoint(a->input);
    /* read_weights checks the checksum of every dataset it reads (the weights and
     * router biases) and dies naming a damaged one; the optimizer state, which export
     * leaves behind, is not read at all */
    check_folder(a->out, a->force);
    ckpt_weights w;
    ckpt_read_weights(path, &w);
    make_dirs(a->out);

    const config *c = &w.cfg;
    st_writer sw = {0};
    char (*bias_names)[96] = xmalloc((size_t)(w.n_moe + 1) * sizeof *bias_names);
    int64_t E = c->moe_E;
    int slot = 0;
    /* Each router's selection bias goes right after its gate, where a PyTorch
     * state_dict has it; slots are the MoE layers in layer order, as in the trainer. */
    for (int i = 0; i < w.table.count; i++) {
        const param_info *p = &w.table.items[i];
        st_add(&sw, p->name, ST_F32, p->ndim, p->shape, w.params + p->offset);
        const char *gate = strstr(p->name, ".ffn.router.gate.weight");
        if (gate && gate[strlen(".ffn.router.gate.weight")] == '\0') {
            fatal_check(slot < w.n_moe);
            snprintf(bias_names[slot], sizeof bias_names[slot], "%.*s.ffn.router.expert_bias", (int)(gate - p->name),
                     p->name);
            st_add(&sw, bias_names[slot], ST_F32, 1, &E, w.router_bias + (size_t)slot * (size_t)E);
            slot++;
        }
    }
    fatal_check(slot == w.n_moe);
    char file[4096];
    snprintf(file, sizeof file, "%s/model.safetensors", a->out);
    st_write(&sw, file);

    char *json = config_json_text(c);
    snprintf(file, sizeof file, "%s/config.json", a->out);
    write_file(file, json);
    free(json);

    snprintf(file, sizeof file, "%s/tokenizer.json", a->out);
    if (w.tokenizer_json) {
        write_file(file, w.tokenizer_json);
    } else if (remove(file) != 0 && errno != ENOENT) {
        /* a stale tokenizer from an earlier --force export would describe another run */
        die("cannot remove the stale %s: %s", file, strerror(errno));
    }

    /* the card names the checkpoint file, not the local directories above it */
    const char *base = strrchr(path, '/');
    char *card = model_card(&w, base ? base + 1 : path, w.tokenizer_json != NULL);
    snprintf(file, sizeof file, "%s/README.md", a->out);
    write_file(file, card);
    free(card);

    printf("exported %s (step %lld) to %s: model.safetensors (%d tensors), config.json%s, README.md\n", path,
           (long long)w.step, a->out, w.table.count + w.n_moe, w.tokenizer_json ? ", tokenizer.json" : "");
    free(bias_names);
    ckpt_weights_free(&w);
    free(path);
    return 0;
}

/* ---- import ---- */

/* Names a safetensors file may hold besides our parameters, and what to do with them. */
typedef enum extra_kind { EXTRA_UNKNOWN, EXTRA_LM_HEAD, EXTRA_BIAS, EXTRA_MONITOR } extra_kind;

/* "transformer.h.{l}." with l written as PyTorch writes it (digits, no sign, no leading
 * zero): returns l and points *rest after the dot, or returns -1. */
static int layer_of(const char *name, const char **rest)
{
    const char *pre = "transformer.h.";
    size_t n = strlen(pre);
    if (strncmp(name, pre, n) != 0) return -1;
    const char *p = name + n;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9')) return -1;
    long l = 0;
    while (*p >= '0' && *p <= '9') {
        l = l * 10 + (*p++ - '0');
        if (l > 1000000) return -1;
    }
    if (*p != '.') return -1;
    *rest = p + 1;
    return (int)l;
}

/* The MoE slot of layer l (its row in router_bias), or -1 if l has no router. */
static int moe_slot(const config *c, int l)
{
    if (!c->use_moe || l < 0 || l >= c->n_layer || config_is_gdn(c, l)) return -1;
    int slot = 0;
    for (int i = 0; i < l; i++) slot += !config_is_gdn(c, i);
    return slot;
}

static extra_kind classify_extra(const config *c, const char *name, int *slot)
{
    if (strcmp(name, "lm_head.weight") == 0) return EXTRA_LM_HEAD;
    const char *rest;
    int l = layer_of(name, &rest);
    if (l < 0 || (*slot = moe_slot(c, l)) < 0) return EXTRA_UNKNOWN;
    if (strcmp(rest, "ffn.router.expert_bias") == 0) return EXTRA_BIAS;
    if (strcmp(rest, "ffn.router.load_history") == 0 || strcmp(rest, "ffn.router.update_count") == 0)
        return EXTRA_MONITOR;
    return EXTRA_UNKNOWN;
}

/* Layers the file holds: 1 + the largest i of a transformer.h.{i} tensor. */
static int file_layers(const st_file *f)
{
    int n = 0;
    for (int i = 0; i < st_count(f); i++) {
        const char *rest;
        int l = layer_of(st_at(f, i)->name, &rest);
        if (l + 1 > n) n = l + 1;
    }
    return n;
}

static void check_shape(const char *file, const st_info *t, int ndim, const int64_t *shape)
{
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++) same = t->shape[d] == shape[d];
    if (!same) {
        char have[96], want[96];
        format_shape(have, sizeof have, t->ndim, t->shape);
        format_shape(want, sizeof want, ndim, shape);
        die("%s: %s has shape %s, this model needs %s", file, t->name, have, want);
    }
    if (!st_is_float(t))
        die("%s: %s has dtype %s; import reads F32, BF16, F16 or F64", file, t->name, t->dtype);
}

/* Has `dir` a checkpoint already? Importing over a run would move its `latest`. */
static void check_import_dir(const char *dir, int force)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (errno != ENOENT) die("cannot use --out %s: %s", dir, strerror(errno));
        return;
    }
    if (!S_ISDIR(st.st_mode)) die("--out %s exists and is not a directory", dir);
    char *latest = ckpt_latest(dir);
    if (latest && !force)
        die("--out %s already holds checkpoints (latest: %s); importing would make `deltamla train` resume from "
            "the import instead (pass --force if that is what you want)",
            dir, latest);
    free(latest);
}

static int cmd_import(const ckpt_args *a)
{
    config c;
    if (a->config) {
        char *json = read_text_file(a->config);
        config_from_json(json, &c);
        free(json);
    } else {
        config_parse(&c, a->n_model, a->model);
    }
    char *tok_json = a->tokenizer ? read_text_file(a->tokenizer) : NULL;
    if (tok_json) {
        tokenizer *t = tokenizer_from_json(tok_json);
        if (tokenizer_vocab_size(t) > c.vocab_size)
            die("--tokenizer %s has %d tokens, more than the model's vocab_size %d", a->tokenizer,
                tokenizer_vocab_size(t), c.vocab_size);
        tokenizer_free(t);
    }

    check_import_dir(a->out, a->force);
    st_file *f = st_open(a->input);
    param_table table;
    params_build(&table, &c);

    /* A different layer count changes the MLA kv ranks of every layer (MODEL.md
     * section 4), so the first tensor found wrong would be a confusing wkv_a shape:
     * name the cause instead. */
    int n_file = file_layers(f);
    if (n_file > 0 && n_file != c.n_layer)
        die("%s: the file holds %d layers (transformer.h.0 to transformer.h.%d), this model has %d (check --n_layer)",
            a->input, n_file, n_file - 1, c.n_layer);

    /* every parameter present with its exact shape, in table order: the first problem
     * named is the one nearest the embedding, which is where a wrong flag shows first */
    for (int i = 0; i < table.count; i++) {
        const param_info *p = &table.items[i];
        const st_info *t = st_find(f, p->name);
        if (!t) die("%s: missing tensor %s", a->input, p->name);
        check_shape(a->input, t, p->ndim, p->shape);
    }

    /* everything else in the file must be one of the known extras */
    int wte = params_find(&table, "transformer.wte.weight");
    const st_info *lm_head = NULL;
    const st_info **bias = xcalloc((size_t)c.n_layer + 1, sizeof *bias);
    int n_moe = 0;
    for (int l = 0; l < c.n_layer; l++) n_moe += moe_slot(&c, l) >= 0;
    for (int i = 0; i < st_count(f); i++) {
        const st_info *t = st_at(f, i);
        if (params_find(&table, t->name) >= 0) continue;
        int slot = -1;
        switch (classify_extra(&c, t->name, &slot)) {
        case EXTRA_LM_HEAD: lm_head = t; break;
        case EXTRA_BIAS: {
            int64_t E = c.moe_E;
            check_shape(a->input, t, 1, &E);
            bias[slot] = t;
            break;
        }
        case EXTRA_MONITOR: break;
        case EXTRA_UNKNOWN:
            die("%s: unexpected tensor %s: the file holds a different model than the one described (check the "
                "flags against the run that wrote it)",
                a->input, t->name);
        }
    }

    float *params = xmalloc(table.total * sizeof(float));
    for (int i = 0; i < table.count; i++) {
        const param_info *p = &table.items[i];
        st_read_f32(f, st_find(f, p->name), params + p->offset);
    }
    size_t E = (size_t)(c.use_moe ? c.moe_E : 0);
    float *router_bias = xcalloc((size_t)n_moe * E + 1, sizeof(float));
    int n_bias = 0;
    for (int s = 0; s < n_moe; s++)
        if (bias[s]) {
            st_read_f32(f, bias[s], router_bias + (size_t)s * E);
            n_bias++;
        }

    if (lm_head) {
        /* the head is tied: a differing lm_head means the file was trained untied, and
         * deltamla will use the embedding for both */
        const param_info *p = &table.items[wte];
        int same_shape = lm_head->ndim == 2 && lm_head->shape[0] == p->shape[0] && lm_head->shape[1] == p->shape[1];
        if (!same_shape) {
            char have[96], want[96];
            format_shape(have, sizeof have, lm_head->ndim, lm_head->shape);
            format_shape(want, sizeof want, p->ndim, p->shape);
            fprintf(stderr, "deltamla: warning: lm_head.weight has shape %s, not the embedding's %s; ignored "
                            "(the head is tied to transformer.wte.weight)\n", have, want);
        } else if (!st_is_float(lm_head)) {
            fprintf(stderr, "deltamla: warning: lm_head.weight has dtype %s; ignored (the head is tied to "
                            "transformer.wte.weight)\n", lm_head->dtype);
        } else {
            float *head = xmalloc(p->numel * sizeof(float));
            st_read_f32(f, lm_head, head);
            const float *emb = params + p->offset;
            double max_diff = 0;
            size_t n_diff = 0;
            for (size_t k = 0; k < p->numel; k++) {
                double d = fabs((double)head[k] - (double)emb[k]);
                if (head[k] != emb[k]) n_diff++;
                if (d > max_diff || d != d) max_diff = d;
            }
            if (n_diff)
                fprintf(stderr, "deltamla: warning: lm_head.weight differs from transformer.wte.weight in %zu of %zu "
                                "values (max |diff| %g); deltamla ties the head to the embedding and uses "
                                "transformer.wte.weight\n", n_diff, p->numel, max_diff);
            free(head);
        }
    }
    st_close(f);

    /* The trainer plans activations for a micro-batch; a checkpoint holds none, so plan
     * for the smallest one rather than B x T of a large preset, which could need more
     * memory than the weights. The saved config is the user's, unchanged. */
    config plan = c;
    plan.batch_size = 1;
    plan.block_size = c.block_size < 64 ? c.block_size : 64;
    trainer tr;
    trainer_init(&tr, &plan, backend_cpu());
    fatal_check(tr.model.n_moe == n_moe);
    tr.cfg = c;
    tr.model.cfg = c;
    const backend *be = tr.model.be;
    be->from_host(tr.model.params, params, table.total * sizeof(float));
    if (n_moe) be->from_host(tr.model.router_bias, router_bias, (size_t)n_moe * E * sizeof(float));

    /* no data source: the checkpoint's data position is the start, which is where a
     * run resuming from it begins reading whatever --data it is given */
    make_dirs(a->out);
    ckpt_save(a->out, &tr, NULL, tok_json, c.keep_checkpoints);
    char *latest = ckpt_latest(a->out);
    int64_t total, active;
    params_count(&table, &total, &active);
    char ta[32];
    const char *biases = !n_moe              ? ""
                         : n_bias == n_moe ? ", router biases"
                         : n_bias          ? ", some router biases (the rest 0)"
                                           : ", router biases 0 (not in the file)";
    printf("imported %s: %d tensors (%s parameters)%s%s; wrote %s (step 0, fresh optimizer state)\n", a->input,
           table.count, grouped(total, ta, sizeof ta), biases, tok_json ? ", tokenizer" : "", latest ? latest : a->out);
    free(latest);
    trainer_free(&tr);
    free(router_bias);
    free(params);
    free(bias);
    free(tok_json);
    params_free(&table);
    return 0;
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
