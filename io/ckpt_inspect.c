/* ckpt_inspect.c: `deltamla ckpt info` and `deltamla ckpt verify`, the subcommands that
 * look at a checkpoint without changing anything: verify checks the file and every
 * dataset's checksum (ckpt_verify); info prints the step, a config summary, the
 * tokenizer, parameter counts and every tensor with its shape and checksum status, and
 * for a damaged file lists what can still be read.
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

/* One line per part of the model: enough to recognise a run, not the whole config
 * (export writes that as config.json). */
static void print_config_summary(const config *c, FILE *f)
{
    int gdn = ckpt_n_gdn_layers(c);
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

int ckpt_cmd_verify(const ckpt_args *a)
{
    char *path = ckpt_resolve_checkpoint(a->input);
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
    int width = 0, bad = 0, n_moe = c.use_moe ? c.n_layer - ckpt_n_gdn_layers(&c) : 0;
    for (int i = 0; i < t.count; i++)
        if ((int)strlen(t.items[i].name) > width) width = (int)strlen(t.items[i].name);
    printf("\ntensors (%d):\n  %-*s %-18s %12s  %s\n", t.count + n_moe, width, "name", "shape", "elements",
           "checksum (weights, optimizer state)");
    for (int i = 0; i < t.count; i++) {
        const param_info *p = &t.items[i];
        char shape[64], why[3][200], dpath[3][160];
        ckpt_format_shape(shape, sizeof shape, p->ndim, p->shape);
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
        ckpt_format_shape(shape, sizeof shape, 1, &E);
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

int ckpt_cmd_info(const ckpt_args *a)
{
    char *path = ckpt_resolve_checkpoint(a->input);
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
    printf("parameters  %s total, %s active per token\n", ckpt_grouped(total, ta, sizeof ta),
           ckpt_grouped(active, tb, sizeof tb));
    int width = 0;
    for (int i = 0; i < w.table.count; i++)
        if ((int)strlen(w.table.items[i].name) > width) width = (int)strlen(w.table.items[i].name);
    printf("\ntensors (%d):\n  %-*s %-18s %12s  %s\n", w.table.count + w.n_moe, width, "name", "shape",
           "elements", "checksum");
    for (int i = 0; i < w.table.count; i++) {
        const param_info *p = &w.table.items[i];
        char shape[64];
        ckpt_format_shape(shape, sizeof shape, p->ndim, p->shape);
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
