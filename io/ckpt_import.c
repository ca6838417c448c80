/* ckpt_import.c: `deltamla ckpt import`: a safetensors file under the PyTorch reference's
 * names, checked tensor by tensor against the model the flags (or --config) describe,
 * written as a step-0 checkpoint with fresh optimizer state that
 * `deltamla train --output_dir DIR` resumes from.
 */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_tool_internal.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <hdf5.h>

#include "checkpoint.h"
#include "safetensors.h"
#include "tokenizer.h"
#include "util.h"

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
        ckpt_format_shape(have, sizeof have, t->ndim, t->shape);
        ckpt_format_shape(want, sizeof want, ndim, shape);
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

int ckpt_cmd_import(const ckpt_args *a)
{
    config c;
    if (a->config) {
        char *json = ckpt_read_text_file(a->config);
        config_from_json(json, &c);
        free(json);
    } else {
        config_parse(&c, a->n_model, a->model);
    }
    char *tok_json = a->tokenizer ? ckpt_read_text_file(a->tokenizer) : NULL;
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

    float *params = xcalloc(table.total, sizeof(float)); /* zeros between tensors */
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
            ckpt_format_shape(have, sizeof have, lm_head->ndim, lm_head->shape);
            ckpt_format_shape(want, sizeof want, p->ndim, p->shape);
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
    ckpt_make_dirs(a->out);
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
           table.count, ckpt_grouped(total, ta, sizeof ta), biases, tok_json ? ", tokenizer" : "", latest ? latest : a->out);
    free(latest);
    trainer_free(&tr);
    free(router_bias);
    free(params);
    free(bias);
    free(tok_json);
    params_free(&table);
    return 0;
}
