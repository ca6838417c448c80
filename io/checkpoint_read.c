/* checkpoint_read.c: the checkpoint readers declared in checkpoint.h: ckpt_load
 * restores a trainer and the data position, checking every dataset's checksum and that
 * the file describes the same model; ckpt_verify checks a file without loading it;
 * ckpt_read_weights reads the weights for inference and export; ckpt_latest and
 * ckpt_older find the checkpoints of an output directory for a resume and its fallbacks.
 * The file layout is described in checkpoint_internal.h.
 *
 * ckpt_load is collective and every rank reads and checks every dataset whole, then
 * keeps the rows it holds (its experts under --ep, its optimizer-state shard under
 * --zero 1), so a checkpoint of any layout loads into any other; ckpt_verify and ckpt_read_weights open the file on MPI_COMM_SELF, so a single
 * rank (a tool) may call them. Checksums run on a helper thread while HDF5 reads the next
 * dataset. Every HDF5 call holds the process-wide lock of io/loader.c.
 */
#define _POSIX_C_SOURCE 200809L
#include "checkpoint_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "util.h"

/* One-line reasons handed back through `why` (checkpoint.h: "a static reason"). */
static char why_buf[768];

static int count_moe(const config *c)
{
    int n = 0;
    for (int l = 0; l < c->n_layer && c->use_moe; l++) n += !config_is_gdn(c, l);
    return n;
}

/* ---- reading ---- */

/* Set *why (why_buf) and return -1. */
static int fail(const char **why, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(const char **why, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why_buf, sizeof why_buf, fmt, ap);
    va_end(ap);
    if (why) *why = why_buf;
    return -1;
}

/* A scalar integer attribute; -1 when absent or unreadable. */
static int attr_read_int(hid_t obj, const char *name, hid_t mem_type, void *out)
{
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    int rc = H5Aread(a, mem_type, out) < 0 ? -1 : 0;
    H5Aclose(a);
    return rc;
}

/* A string attribute (fixed or variable length) as a malloc'd string in *out.
 * Returns 0, 1 when absent, -1 when unreadable. */
static int attr_read_str(hid_t obj, const char *name, char **out)
{
    *out = NULL;
    htri_t exists = H5Aexists(obj, name);
    if (exists == 0) return 1;
    if (exists < 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    hid_t ftype = H5Aget_type(a);
    int rc = -1;
    if (ftype >= 0 && H5Tget_class(ftype) == H5T_STRING) {
        if (H5Tis_variable_str(ftype) > 0) {
            hid_t mtype = H5Tcopy(H5T_C_S1);
            H5Tset_size(mtype, H5T_VARIABLE);
            char *v = NULL;
            if (H5Aread(a, mtype, &v) >= 0 && v) {
                *out = xmalloc(strlen(v) + 1);
                strcpy(*out, v);
                H5free_memory(v);
                rc = 0;
            }
            H5Tclose(mtype);
        } else {
            size_t size = H5Tget_size(ftype);
            hid_t mtype = H5Tcopy(H5T_C_S1);
            H5Tset_size(mtype, size + 1);
            H5Tset_strpad(mtype, H5T_STR_NULLTERM);
            char *v = xcalloc(size + 2, 1);
            if (H5Aread(a, mtype, v) >= 0) {
                *out = v;
                rc = 0;
            } else {
                free(v);
            }
            H5Tclose(mtype);
        }
    }
    if (ftype >= 0) H5Tclose(ftype);
    H5Aclose(a);
    return rc;
}

/* The root attributes every reader needs, and the config they describe. */
typedef struct ckpt_header {
    config cfg;
    char *tokenizer;   /* malloc'd or NULL */
    char *optim_type;  /* malloc'd, "muon"/"adamw" */
    int64_t step, skipped, data_epoch, data_row, data_rows, optim_step;
    uint64_t seed;
} ckpt_header;

static void header_free(ckpt_header *h)
{
    free(h->tokenizer);
    free(h->optim_type);
}

/* Open path read-only on comm; -1 with *why on failure (unreadable, truncated,
 * metadata checksum). */
static int open_file(const char *path, MPI_Comm comm, hid_t *file, const char **why)
{
    struct stat st;
    if (stat(path, &st) != 0) return fail(why, "%s", strerror(errno));
    hid_t fapl = ckpt_make_fapl(comm);
    *file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (*file < 0) fail(why, "not readable as HDF5 (%s)", ckpt_h5_reason()); /* before any other call clears the stack */
    H5Pclose(fapl);
    return *file < 0 ? -1 : 0;
}

static int read_header(hid_t file, ckpt_header *h, const char **why)
{
    memset(h, 0, sizeof *h);
    char *format = NULL, *cfg = NULL;
    int32_t version = 0;
    int rc = attr_read_str(file, "format", &format);
    if (rc != 0 || strcmp(format, CKPT_FORMAT) != 0) {
        free(format);
        return fail(why, "not a deltamla checkpoint (%s)",
                    rc == 1 ? "no format attribute"
                    : rc < 0 ? "its format attribute is unreadable"
                             : "another format attribute");
    }
    free(format);
    if (attr_read_int(file, "version", H5T_NATIVE_INT32, &version) != 0)
        return fail(why, "the version attribute is missing or unreadable");
    if (version != CKPT_VERSION)
        return fail(why, "checkpoint format version %d; this build reads version %d", version,
                    CKPT_VERSION);
    struct {
        const char *name;
        int64_t *dst;
    } ints[] = {{"step", &h->step},           {"skipped", &h->skipped},     {"data_epoch", &h->data_epoch},
                {"data_row", &h->data_row}, {"data_rows", &h->data_rows}};
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++)
        if (attr_read_int(file, ints[k].name, H5T_NATIVE_INT64, ints[k].dst) != 0)
            return fail(why, "attribute %s is missing or unreadable", ints[k].name);
    if (attr_read_int(file, "seed", H5T_NATIVE_UINT64, &h->seed) != 0)
        return fail(why, "attribute seed is missing or unreadable");
    if (attr_read_str(file, "config", &cfg) != 0) return fail(why, "attribute config is missing or unreadable");
    if (attr_read_str(file, "tokenizer", &h->tokenizer) < 0)
        return fail(why, "attribute tokenizer is unreadable");
    hid_t optim = H5Gopen2(file, "/optim", H5P_DEFAULT);
    if (optim < 0) {
        free(cfg);
        return fail(why, "group /optim is missing (%s)", ckpt_h5_reason());
    }
    int ok = attr_read_str(optim, "type", &h->optim_type) == 0 &&
             attr_read_int(optim, "step", H5T_NATIVE_INT64, &h->optim_step) == 0;
    H5Gclose(optim);
    if (!ok || (strcmp(h->optim_type, "muon") != 0 && strcmp(h->optim_type, "adamw") != 0)) {
        free(cfg);
        return fail(why, "/optim's type or step attribute is missing or unreadable");
    }
    config_from_json(cfg, &h->cfg);
    free(cfg);
    return 0;
}

/* Read one dataset whole into host dst (it->numel floats) after checking its shape;
 * *stored receives its crc32 attribute. Returns 0; -1 with *why (missing, unreadable);
 * or -2 when its shape differs from it->dims, with the stored shape in *ndim/dims. */
static int read_item_data(hid_t file, hid_t dxpl, const ckpt_item *it, float *dst, uint32_t *stored, int *ndim,
                          hsize_t dims[3], const char **why)
{
    htri_t exists = H5Lexists(file, it->path, H5P_DEFAULT);
    if (exists < 0) return fail(why, "dataset %s cannot be looked up (%s)", it->path, ckpt_h5_reason());
    if (exists == 0) return fail(why, "dataset %s is missing", it->path);
    hid_t ds = H5Dopen2(file, it->path, H5P_DEFAULT);
    if (ds < 0) return fail(why, "dataset %s cannot be opened (%s)", it->path, ckpt_h5_reason());
    hid_t space = H5Dget_space(ds);
    *ndim = H5Sget_simple_extent_ndims(space);
    dims[0] = dims[1] = dims[2] = 0;
    int shape_ok = *ndim == it->ndim;
    if (*ndim >= 1 && *ndim <= 3) {
        H5Sget_simple_extent_dims(space, dims, NULL);
        for (int d = 0; d < *ndim && shape_ok; d++) shape_ok = dims[d] == it->dims[d];
    }
    H5Sclose(space);
    if (!shape_ok) {
        H5Dclose(ds);
        return -2;
    }
    if (attr_read_int(ds, "crc32", H5T_NATIVE_UINT32, stored) != 0) {
        H5Dclose(ds);
        return fail(why, "dataset %s has no readable crc32 checksum", it->path);
    }
    herr_t rc = H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, dxpl, dst);
    if (rc < 0) fail(why, "dataset %s cannot be read (%s)", it->path, ckpt_h5_reason());
    H5Dclose(ds);
    return rc < 0 ? -1 : 0;
}

static int check_crc(const ckpt_item *it, uint32_t got, uint32_t stored, const char **why)
{
    if (got == stored) return 0;
    return fail(why, "dataset %s fails its checksum (crc32 %08x, stored %08x): the file is corrupt", it->path, got,
                stored);
}

/* read_item_data, then the checksum. */
static int read_item(hid_t file, hid_t dxpl, const ckpt_item *it, float *dst, int *ndim, hsize_t dims[3],
                     const char **why)
{
    uint32_t stored = 0;
    int r = read_item_data(file, dxpl, it, dst, &stored, ndim, dims, why);
    if (r != 0) return r;
    return check_crc(it, ckpt_crc32_bytes(dst, it->numel * sizeof(float)), stored, why);
}

static void format_dims(char *buf, size_t n, int ndim, const hsize_t *dims)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && d < 3 && o < n; d++)
        o += (size_t)snprintf(buf + o, n - o, "%s%llu", d ? ", " : "", (unsigned long long)dims[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* Fields that decide the model's tensors and what they compute: a checkpoint whose
 * values differ is another model. Derived fields come after the flags they follow from,
 * so the first mismatch named is the flag a user would change. */
#define MODEL_FIELD(f) {#f, offsetof(config, f), 0}
#define MODEL_FLOAT(f) {#f, offsetof(config, f), 1}
static const struct {
    const char *name;
    size_t offset;
    int is_float;
} model_fields[] = {
    MODEL_FIELD(n_layer),          MODEL_FIELD(n_embd),
    MODEL_FIELD(n_head),           MODEL_FIELD(vocab_size),
    MODEL_FIELD(swa_layers_per_cycle), MODEL_FIELD(mla_layers_per_cycle),
    MODEL_FIELD(deltanet_latent_dim), MODEL_FIELD(deltanet_share_qk),
    MODEL_FIELD(mla_q_lora_rank),  MODEL_FIELD(mla_kv_lora_rank),
    MODEL_FIELD(mla_qk_nope_head_dim), MODEL_FIELD(mla_qk_rope_head_dim),
    MODEL_FIELD(mla_v_head_dim),   MODEL_FLOAT(rope_theta),
    MODEL_FIELD(use_moe),          MODEL_FIELD(use_latent_moe),
    MODEL_FIELD(n_shared_experts), MODEL_FIELD(expert_dim),
    MODEL_FIELD(moe_E),            MODEL_FIELD(moe_k),
    MODEL_FIELD(moe_latent),       MODEL_FIELD(moe_hidden),
    MODEL_FIELD(moe_in),
};

/* die() naming the first model field in which the checkpoint differs from this run. */
static void check_model(const char *path, const config *ck, const config *run)
{
    for (size_t k = 0; k < sizeof model_fields / sizeof model_fields[0]; k++) {
        const char *a = (const char *)ck + model_fields[k].offset, *b = (const char *)run + model_fields[k].offset;
        if (model_fields[k].is_float) {
            float x, y;
            memcpy(&x, a, sizeof x);
            memcpy(&y, b, sizeof y);
            if (x != y)
                die("checkpoint %s has %s %g but this run has %g", path, model_fields[k].name, (double)x, (double)y);
        } else {
            int x, y;
            memcpy(&x, a, sizeof x);
            memcpy(&y, b, sizeof y);
            if (x != y) die("checkpoint %s has %s %d but this run has %d", path, model_fields[k].name, x, y);
        }
    }
}

int ckpt_load(const char *path, trainer *tr, data_source *src, const char **why)
{
    ckpt_crc_init();
    int rank = ckpt_world_rank();
    model *m = &tr->model;
    optimizer *o = &tr->opt;
    const backend *be = m->be;
    ckpt_header h;
    memset(&h, 0, sizeof h);
    hid_t file = -1, dxpl = -1;
    int rc = 0, n = 0, switching = 0;
    ckpt_item *items = NULL;
    float *stage = NULL;

    ckpt_h5_enter();
    if (open_file(path, MPI_COMM_WORLD, &file, why) != 0) {
        rc = -1;
        goto done;
    }
    if (read_header(file, &h, why) != 0) {
        rc = -1;
        goto done;
    }
    check_model(path, &h.cfg, &tr->cfg);
    switching = strcmp(h.optim_type, o->muon_mode ? "muon" : "adamw") != 0;
    if (switching && h.optim_step > 0)
        die("checkpoint %s was trained with --optimizer_type %s but this run has %s (its optimizer state does not "
            "carry over; resume with --optimizer_type %s)",
            path, h.optim_type, tr->cfg.optimizer_type, h.optim_type);
    if (h.tokenizer && src && src->tokenizer_json && strcmp(h.tokenizer, src->tokenizer_json) != 0)
        die("checkpoint %s was trained with another tokenizer than this run's data uses (its token ids would mean "
            "other text)",
            path);

    /* Optimizer state written under the other optimizer is all zeros (its step is 0:
     * an import), and the layouts differ, so only the weights and biases are read. */
    items = ckpt_list_items(&m->table, &h.cfg, strcmp(h.optim_type, "muon") == 0, !switching, &n);
    size_t stage_floats = 1;
    int need_stage = !ckpt_backend_is_host(be);
    for (int i = 0; i < n; i++) {
        if (items[i].numel > stage_floats) stage_floats = items[i].numel;
        /* a shard of the experts or of the optimizer state: the whole dataset is read and
         * checked, and this rank's rows are copied out */
        if (items[i].local_rows != (int64_t)items[i].dims[0] || !ckpt_item_buffer(&items[i], m, o)) need_stage = 1;
    }
    /* two staging buffers: one being checksummed while the next dataset is read */
    if (need_stage) stage = xmalloc(2 * stage_floats * sizeof(float));
    dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE);
    crc_job job = {0};
    const ckpt_item *job_item = NULL;
    uint32_t job_stored = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const ckpt_item *it = &items[i];
        /* the CPU backend's tensors are host memory: read straight into place */
        float *dst = ckpt_item_buffer(it, m, o);
        int in_place = dst && ckpt_backend_is_host(be) && it->local_rows == (int64_t)it->dims[0];
        float *host = in_place ? dst : stage + (size_t)(i & 1) * stage_floats;
        int ndim;
        hsize_t dims[3];
        uint32_t stored = 0;
        int r = read_item_data(file, dxpl, it, host, &stored, &ndim, dims, why);
        if (job_item) { /* the previous dataset's checksum, computed meanwhile */
            if (check_crc(job_item, ckpt_crc_job_finish(&job), job_stored, why) != 0) rc = -1;
            job_item = NULL;
        }
        if (r == -2) {
            char have[64], want[64];
            format_dims(have, sizeof have, ndim, dims);
            format_dims(want, sizeof want, it->ndim, it->dims);
            die("checkpoint %s has %s with shape %s but this run has %s", path, it->path, have, want);
        }
        if (rc != 0) break;
        if (r != 0) {
            rc = -1;
            break;
        }
        if (dst && !in_place)
            be->from_host(dst, host + (size_t)it->row0 * it->row, (size_t)it->local_rows * it->row * sizeof(float));
        ckpt_crc_job_start(&job, host, it->numel * sizeof(float));
        job_item = it;
        job_stored = stored;
    }
    if (job_item && check_crc(job_item, ckpt_crc_job_finish(&job), job_stored, why) != 0) rc = -1;

done:
    if (dxpl >= 0) H5Pclose(dxpl);
    if (file >= 0) H5Fclose(file);
    ckpt_h5_leave();
    free(stage);
    free(items);
    /* every rank read the same bytes; agree anyway, so no rank resumes alone */
    int ok = rc == 0, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_ok) {
        if (rc == 0) fail(why, "it could not be read on another rank");
        header_free(&h);
        return -1;
    }
    if (switching) {
        be->zero(o->m, optim_state_floats(o) * sizeof(float));
        be->zero(o->v, optim_state_floats(o) * sizeof(float));
    }
    /* v of Muon tensors is never stored or used; keep it zero as a fresh run has it */
    tr->it = (int)h.step;
    tr->skipped = h.skipped;
    o->step = (int)h.optim_step;
    if (src) {
        if (rank == 0 && h.data_rows > 0 && h.data_rows != src->num_rows)
            fprintf(stderr,
                    "deltamla: warning: checkpoint %s was trained on data of %lld rows, this run's has %lld: the data "
                    "position (epoch %lld, row %lld) is kept, but the batches differ from the original run's\n",
                    path, (long long)h.data_rows, (long long)src->num_rows, (long long)h.data_epoch,
                    (long long)h.data_row);
        src->epoch = h.data_epoch;
        src->row = h.data_row;
    }
    if (rank == 0 && h.seed != tr->cfg.seed)
        fprintf(stderr,
                "deltamla: warning: checkpoint %s was written by a run with --seed %llu, this run has --seed %llu: the "
                "data order from here on follows %llu (pass --seed %llu to continue the original order)\n",
                path, (unsigned long long)h.seed, (unsigned long long)tr->cfg.seed,
                (unsigned long long)tr->cfg.seed, (unsigned long long)h.seed);
    header_free(&h);
    return 0;
}

/* Read and check every dataset of an open file on one rank. */
static int verify_open(hid_t file, const ckpt_header *h, const char **why)
{
    param_table t;
    params_build(&t, &h->cfg);
    int n;
    ckpt_item *items = ckpt_list_items(&t, &h->cfg, strcmp(h->optim_type, "muon") == 0, 1, &n);
    size_t most = 1;
    for (int i = 0; i < n; i++)
        if (items[i].numel > most) most = items[i].numel;
    float *buf = xmalloc(most * sizeof(float));
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        int ndim;
        hsize_t dims[3];
        int r = read_item(file, H5P_DEFAULT, &items[i], buf, &ndim, dims, why);
        if (r == -2) {
            char have[64], want[64];
            format_dims(have, sizeof have, ndim, dims);
            format_dims(want, sizeof want, items[i].ndim, items[i].dims);
            rc = fail(why, "dataset %s has shape %s, its config says %s", items[i].path, have, want);
        } else if (r != 0) {
            rc = -1;
        }
    }
    free(buf);
    free(items);
    params_free(&t);
    return rc;
}

int ckpt_verify(const char *path, const char **why)
{
    ckpt_crc_init();
    ckpt_header h;
    memset(&h, 0, sizeof h);
    hid_t file = -1;
    int rc;
    ckpt_h5_enter();
    rc = open_file(path, MPI_COMM_SELF, &file, why);
    if (rc == 0) rc = read_header(file, &h, why);
    if (rc == 0) rc = verify_open(file, &h, why);
    if (file >= 0) H5Fclose(file);
    ckpt_h5_leave();
    header_free(&h);
    return rc;
}

void ckpt_read_weights(const char *path, ckpt_weights *w)
{
    ckpt_crc_init();
    memset(w, 0, sizeof *w);
    ckpt_header h;
    const char *why = NULL;
    hid_t file = -1;
    ckpt_h5_enter();
    if (open_file(path, MPI_COMM_SELF, &file, &why) != 0 || read_header(file, &h, &why) != 0)
        die("cannot read checkpoint %s: %s", path, why);
    w->cfg = h.cfg;
    params_build(&w->table, &w->cfg);
    w->params = xcalloc(w->table.total, sizeof(float)); /* zeros between tensors */
    w->n_moe = count_moe(&w->cfg);
    w->router_bias = xcalloc((size_t)w->n_moe * (size_t)(w->cfg.use_moe ? w->cfg.moe_E : 0) + 1, sizeof(float));
    int n;
    ckpt_item *items = ckpt_list_items(&w->table, &w->cfg, 0, 0, &n);
    for (int i = 0; i < n; i++) {
        float *dst = (items[i].kind == ITEM_BIAS ? w->router_bias : w->params) + items[i].offset;
        int ndim;
        hsize_t dims[3];
        int r = read_item(file, H5P_DEFAULT, &items[i], dst, &ndim, dims, &why);
        if (r == -2) die("%s: dataset %s does not have the shape its config gives", path, items[i].path);
        if (r != 0) die("cannot read checkpoint %s: %s", path, why);
    }
    free(items);
    H5Fclose(file);
    ckpt_h5_leave();
    w->tokenizer_json = h.tokenizer;
    h.tokenizer = NULL;
    w->step = h.step;
    header_free(&h);
}

char **ckpt_older(const char *dir, int64_t below, int *n_out)
{
    int n;
    ckpt_entry *e = ckpt_list_checkpoints(dir, &n);
    char **paths = xcalloc((size_t)n + 1, sizeof *paths);
    int k = 0;
    for (int i = n - 1; i >= 0; i--) {
        if (below >= 0 && e[i].step >= below) continue;
        size_t len = strlen(dir) + strlen(e[i].name) + 2;
        paths[k] = xmalloc(len);
        snprintf(paths[k], len, "%s/%s", dir, e[i].name);
        k++;
    }
    free(e);
    *n_out = k;
    return paths;
}

void ckpt_weights_free(ckpt_weights *w)
{
    params_free(&w->table);
    free(w->params);
    free(w->router_bias);
    free(w->tokenizer_json);
    memset(w, 0, sizeof *w);
}

char *ckpt_latest(const char *output_dir)
{
    char path[CONFIG_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/latest", output_dir);
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char name[256] = "";
    if (!fgets(name, sizeof name, f)) name[0] = '\0';
    fclose(f);
    size_t len = strlen(name);
    while (len && (name[len - 1] == '\n' || name[len - 1] == '\r' || name[len - 1] == ' ')) name[--len] = '\0';
    /* an empty or damaged pointer still names a path, which then fails to load and
     * sends the caller to its fallback rather than to a fresh start */
    size_t n = strlen(output_dir) + len + 2;
    char *out = xmalloc(n);
    snprintf(out, n, "%s/%s", output_dir, name);
    return out;
}
