/* checkpoint_write.c: the checkpoint writer declared in checkpoint.h (ckpt_save,
 * ckpt_save_owned, ckpt_owner_slices): one HDF5 file per save, written collectively
 * through the MPI-IO driver, and the file lifecycle around it that lets a preempted run
 * restart without losing work. The file layout is described in checkpoint_internal.h.
 *
 * The file is created with object timestamps off and the 1.8 file-format bounds, so
 * its metadata (superblock, object headers, attributes) carries HDF5's own checksums
 * and the bytes written depend only on the state saved, not on when or by how many
 * ranks (tests compare files written by 1, 2 and 4 ranks byte for byte).
 *
 * Writing: every rank writes the rows of each tensor that the ownership map gives it
 * (ckpt_owner_slices splits rows evenly; a sharded runtime passes its own map), one
 * collective H5Dwrite per dataset; each rank checksums its own slice and the slices'
 * CRCs are combined in row order (CRC-32 of a concatenation follows from the parts'
 * CRCs and lengths), so no rank needs the whole tensor.
 *
 * Lifecycle of a save: write OUTPUT_DIR/.ckpt_<step>.h5.tmp, H5Fflush and close, fsync it
 * on every rank, rename it to ckpt_<step>.h5, fsync the directory, then write `latest`
 * (the file name, one line) through .latest.tmp + fsync + rename + directory fsync, and
 * only then delete checkpoints beyond the newest `keep` (never the one `latest` names)
 * and temporary files of interrupted saves. A crash at any point leaves `latest` on a
 * complete checkpoint. The environment variable DELTAMLA_TEST_SLOW_SAVE=<seconds> is a
 * test hook: rank 0 pauses that long between the fsync of the temporary file and the
 * rename, after printing one line, so that a test can kill -9 the run inside the window.
 *
 * Threads: Debian's parallel HDF5 is not thread-safe and the shard loader may read from
 * a prefetch thread, so every HDF5 call here holds the process-wide lock of io/loader.c.
 */
#define _POSIX_C_SOURCE 200809L
#include "checkpoint_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "dist.h"
#include "util.h"

/* ---- the ownership map ---- */

void ckpt_owner_slices(const param_table *t, int rank, int nranks, ckpt_slice *owned)
{
    fatal_check(nranks >= 1 && rank >= 0 && rank < nranks);
    for (int i = 0; i < t->count; i++) {
        int64_t rows = t->items[i].shape[0];
        int64_t a = rows * rank / nranks, b = rows * (rank + 1) / nranks;
        owned[i].start = a;
        owned[i].count = b - a;
    }
}

/* Check that the ranks' slices of every item tile its rows exactly; all[r * n + i] is
 * rank r's slice of item i. die() naming the first item that does not. */
static void check_tiling(const ckpt_item *items, int n, const ckpt_slice *all, int nranks)
{
    for (int i = 0; i < n; i++) {
        int64_t rows = (int64_t)items[i].dims[0], covered = 0;
        for (int r = 0; r < nranks; r++) {
            const ckpt_slice *s = &all[(size_t)r * n + i];
            if (s->count < 0 || s->start < 0 || s->start + s->count > rows)
                die("internal: rank %d's slice [%lld, +%lld) of %s lies outside its %lld rows", r,
                    (long long)s->start, (long long)s->count, items[i].path, (long long)rows);
            covered += s->count;
            for (int q = 0; q < r; q++) {
                const ckpt_slice *o = &all[(size_t)q * n + i];
                if (s->count && o->count && s->start < o->start + o->count && o->start < s->start + s->count)
                    die("internal: ranks %d and %d both own rows of %s", q, r, items[i].path);
            }
        }
        if (covered != rows)
            die("internal: the ownership map covers %lld of the %lld rows of %s", (long long)covered,
                (long long)rows, items[i].path);
    }
}

/* ---- writing ---- */

/* die() for a failed HDF5 call while writing `path`. */
#define H5W(call, path)                                                                                        \
    do {                                                                                                       \
        if ((call) < 0)                                                                                        \
            die("cannot write checkpoint %s: %s failed on rank %d (%s)", path, #call, ckpt_world_rank(), ckpt_h5_reason()); \
    } while (0)

static void attr_write(hid_t obj, const char *name, hid_t file_type, hid_t mem_type, const void *value,
                       const char *path)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0) die("cannot write checkpoint %s: attribute %s (%s)", path, name, ckpt_h5_reason());
    H5W(H5Awrite(a, mem_type, value), path);
    H5Aclose(a);
    H5Sclose(space);
}

static void attr_write_i64(hid_t obj, const char *name, int64_t v, const char *path)
{
    attr_write(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, path);
}

static void attr_write_str(hid_t obj, const char *name, const char *text, const char *path)
{
    size_t len = strlen(text);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5W(H5Tset_size(type, len ? len : 1), path);
    H5W(H5Tset_strpad(type, H5T_STR_NULLPAD), path);
    attr_write(obj, name, type, type, len ? text : "", path);
    H5Tclose(type);
}

static char *config_text(const config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) die("out of host memory writing a checkpoint");
    config_json(c, f);
    fclose(f);
    return text;
}

/* mkdir -p on rank 0; every rank returns once the directory exists. */
static void ensure_dir(const char *dir)
{
    if (ckpt_world_rank() == 0) {
        char buf[CONFIG_PATH_MAX + 64];
        snprintf(buf, sizeof buf, "%s", dir);
        for (char *p = buf + 1; *p; p++) {
            if (*p != '/') continue;
            *p = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create directory %s: %s", buf, strerror(errno));
            *p = '/';
        }
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create directory %s: %s", buf, strerror(errno));
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

/* fsync a file or directory by path; die() on failure. */
static void fsync_path(const char *path, int is_dir)
{
    int fd = open(path, is_dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
    if (fd < 0) die("cannot open %s to flush it to disk: %s", path, strerror(errno));
    /* EINVAL: a file system that cannot sync directories; the rename is then as
     * durable as that file system makes it */
    if (fsync(fd) != 0 && !(is_dir && errno == EINVAL)) die("cannot flush %s to disk: %s", path, strerror(errno));
    close(fd);
}

static void sleep_seconds(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)}, rem;
    while (nanosleep(&ts, &rem) != 0 && errno == EINTR) ts = rem;
}

/* Write the `latest` pointer: tmp file, fsync, rename, directory fsync. */
static void write_latest(const char *dir, const char *name)
{
    char tmp[CONFIG_PATH_MAX + 64], dst[CONFIG_PATH_MAX + 64];
    snprintf(tmp, sizeof tmp, "%s/.latest.tmp", dir);
    snprintf(dst, sizeof dst, "%s/latest", dir);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("cannot write %s: %s", tmp, strerror(errno));
    char line[128];
    int len = snprintf(line, sizeof line, "%s\n", name);
    if (write(fd, line, (size_t)len) != len || fsync(fd) != 0) die("cannot write %s: %s", tmp, strerror(errno));
    close(fd);
    if (rename(tmp, dst) != 0) die("cannot rename %s to %s: %s", tmp, dst, strerror(errno));
    fsync_path(dir, 1);
}

/* Delete checkpoints beyond the newest `keep` (0 = keep all) except `current` (what
 * latest names), and the temporary files of interrupted saves. Rank 0 only. */
static void prune(const char *dir, int keep, const char *current)
{
    int n;
    ckpt_entry *e = ckpt_list_checkpoints(dir, &n);
    char path[CONFIG_PATH_MAX + 128];
    for (int i = 0; keep > 0 && i < n - keep; i++) {
        if (strcmp(e[i].name, current) == 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e[i].name);
        if (unlink(path) != 0 && errno != ENOENT)
            fprintf(stderr, "deltamla: warning: cannot delete the old checkpoint %s: %s\n", path, strerror(errno));
    }
    free(e);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (strncmp(de->d_name, ".ckpt_", 6) != 0 || len < 8 || strcmp(de->d_name + len - 7, ".h5.tmp") != 0) continue;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        unlink(path); /* a leftover of a killed save: nothing points to it */
    }
    closedir(d);
}

void ckpt_save_owned(const char *output_dir, const trainer *tr, const data_source *src, const char *tokenizer_json,
                     int keep, const ckpt_slice *owned)
{
    ckpt_crc_init();
    int rank = ckpt_world_rank(), nranks = ckpt_world_size();
    const model *m = &tr->model;
    const backend *be = m->be;
    int n;
    ckpt_item *items = ckpt_list_items(&m->table, &tr->cfg, tr->opt.muon_mode, 1, &n);

    /* every rank's slice of every item, checked to tile each tensor before any write */
    ckpt_slice *mine = xcalloc((size_t)n, sizeof *mine), *all = xcalloc((size_t)n * nranks, sizeof *all);
    for (int i = 0; i < n; i++) {
        if (items[i].kind == ITEM_BIAS) {
            mine[i].start = 0;
            mine[i].count = rank == 0 ? (int64_t)items[i].dims[0] : 0;
        } else {
            mine[i] = owned[items[i].param];
        }
    }
    MPI_Allgather(mine, n * 2, MPI_INT64_T, all, n * 2, MPI_INT64_T, MPI_COMM_WORLD);
    check_tiling(items, n, all, nranks);

    int64_t step = tr->it;
    char name[64], final_path[CONFIG_PATH_MAX + 64], tmp[CONFIG_PATH_MAX + 64];
    snprintf(name, sizeof name, "ckpt_%08lld.h5", (long long)step);
    snprintf(final_path, sizeof final_path, "%s/%s", output_dir, name);
    snprintf(tmp, sizeof tmp, "%s/.ckpt_%08lld.h5.tmp", output_dir, (long long)step);
    ensure_dir(output_dir);

    ckpt_h5_enter();
    hid_t fapl = ckpt_make_fapl(MPI_COMM_WORLD);
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), gcpl = H5Pcreate(H5P_GROUP_CREATE), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5W(H5Pset_obj_track_times(fcpl, 0), tmp);
    H5W(H5Pset_obj_track_times(gcpl, 0), tmp);
    H5W(H5Pset_obj_track_times(dcpl, 0), tmp);
    H5W(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY), tmp);
    H5W(H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER), tmp);
    H5W(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE), tmp);
    hid_t file = H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, fapl);
    if (file < 0) die("cannot create checkpoint %s: %s", tmp, ckpt_h5_reason());
    const char *groups[] = {"/params", "/optim", "/optim/m", "/optim/v", "/router_bias"};
    hid_t group_ids[5];
    for (int g = 0; g < 5; g++) {
        group_ids[g] = H5Gcreate2(file, groups[g], H5P_DEFAULT, gcpl, H5P_DEFAULT);
        if (group_ids[g] < 0) die("cannot write checkpoint %s: group %s (%s)", tmp, groups[g], ckpt_h5_reason());
    }

    /* host staging for backends whose memory is not host memory */
    size_t stage_floats = 1;
    for (int i = 0; i < n; i++)
        if ((size_t)mine[i].count * items[i].row > stage_floats) stage_floats = (size_t)mine[i].count * items[i].row;
    float *stage = ckpt_backend_is_host(be) ? NULL : xmalloc(stage_floats * sizeof(float));
    uint32_t *crc = xcalloc((size_t)n, sizeof *crc);
    hid_t *ds = xmalloc((size_t)n * sizeof *ds);
    float dummy = 0;
    for (int i = 0; i < n; i++) {
        const ckpt_item *it = &items[i];
        hid_t fspace = H5Screate_simple(it->ndim, it->dims, NULL);
        ds[i] = H5Dcreate2(file, it->path, H5T_IEEE_F32LE, fspace, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        if (ds[i] < 0) die("cannot write checkpoint %s: dataset %s (%s)", tmp, it->path, ckpt_h5_reason());
        ckpt_slice s = mine[i];
        hsize_t mcount = (hsize_t)s.count * it->row;
        hid_t mspace = H5Screate_simple(1, mcount ? &mcount : (hsize_t[]){1}, NULL);
        const float *data = &dummy;
        if (s.count > 0) {
            hsize_t start[3] = {(hsize_t)s.start, 0, 0}, count[3] = {(hsize_t)s.count, it->dims[1], it->dims[2]};
            H5W(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL), tmp);
            /* a rank writes only rows it holds (its experts, its optimizer shard) */
            const float *buf = ckpt_item_buffer(it, m, &tr->opt);
            if (!buf || s.start < it->row0 || s.start + s.count > it->row0 + it->local_rows)
                die("internal: rank %d is to write rows [%lld, +%lld) of %s but holds %s", rank, (long long)s.start,
                    (long long)s.count, it->path, buf ? "other rows" : "none of it");
            const float *src_rows = buf + (size_t)(s.start - it->row0) * it->row;
            if (stage) {
                be->to_host(stage, src_rows, mcount * sizeof(float));
                data = stage;
            } else {
                data = src_rows;
            }
        } else {
            H5W(H5Sselect_none(fspace), tmp);
            H5W(H5Sselect_none(mspace), tmp);
        }
        crc_job job = {0};
        ckpt_crc_job_start(&job, data, s.count > 0 ? mcount * sizeof(float) : 0);
        H5W(H5Dwrite(ds[i], H5T_NATIVE_FLOAT, mspace, fspace, dxpl, data), tmp);
        crc[i] = ckpt_crc_job_finish(&job);
        H5Sclose(mspace);
        H5Sclose(fspace);
    }
    free(stage);

    /* each dataset's CRC from its slices' CRCs, combined in row order */
    uint32_t *all_crc = xmalloc((size_t)n * nranks * sizeof *all_crc);
    MPI_Allgather(crc, n, MPI_UINT32_T, all_crc, n, MPI_UINT32_T, MPI_COMM_WORLD);
    for (int i = 0; i < n; i++) {
        uint32_t whole = 0;
        int64_t row = 0;
        while (row < (int64_t)items[i].dims[0]) { /* the slice that starts at `row` */
            int r = 0;
            while (all[(size_t)r * n + i].count == 0 || all[(size_t)r * n + i].start != row) r++;
            const ckpt_slice *s = &all[(size_t)r * n + i];
            whole = ckpt_crc32_combine(whole, all_crc[(size_t)r * n + i], (uint64_t)s->count * items[i].row * sizeof(float));
            row += s->count;
        }
        attr_write(ds[i], "crc32", H5T_STD_U32LE, H5T_NATIVE_UINT32, &whole, tmp);
        H5Dclose(ds[i]);
    }
    free(all_crc);
    free(ds);
    free(crc);

    attr_write_str(group_ids[1], "type", tr->opt.muon_mode ? "muon" : "adamw", tmp);
    attr_write_i64(group_ids[1], "step", tr->opt.step, tmp);
    hid_t root = H5Gopen2(file, "/", H5P_DEFAULT);
    char *cfg_json = config_text(&tr->cfg);
    int32_t version = CKPT_VERSION;
    uint64_t seed = tr->cfg.seed;
    attr_write_str(root, "format", CKPT_FORMAT, tmp);
    attr_write(root, "version", H5T_STD_I32LE, H5T_NATIVE_INT32, &version, tmp);
    attr_write_i64(root, "step", step, tmp);
    attr_write_i64(root, "skipped", tr->skipped, tmp);
    attr_write_i64(root, "data_epoch", src ? src->epoch : 0, tmp);
    attr_write_i64(root, "data_row", src ? src->row : 0, tmp);
    attr_write_i64(root, "data_rows", src ? src->num_rows : 0, tmp);
    attr_write(root, "seed", H5T_STD_U64LE, H5T_NATIVE_UINT64, &seed, tmp);
    attr_write_str(root, "config", cfg_json, tmp);
    if (tokenizer_json) attr_write_str(root, "tokenizer", tokenizer_json, tmp);
    free(cfg_json);
    H5Gclose(root);
    for (int g = 0; g < 5; g++) H5Gclose(group_ids[g]);
    H5W(H5Fflush(file, H5F_SCOPE_GLOBAL), tmp);
    H5W(H5Fclose(file), tmp);
    H5Pclose(fapl);
    H5Pclose(fcpl);
    H5Pclose(gcpl);
    H5Pclose(dcpl);
    H5Pclose(dxpl);
    ckpt_h5_leave();

    /* Each rank flushes what its node cached, then rank 0 alone moves names. */
    fsync_path(tmp, 0);
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        const char *slow = getenv("DELTAMLA_TEST_SLOW_SAVE");
        if (slow && atof(slow) > 0) {
            fprintf(stderr, "deltamla: test hook DELTAMLA_TEST_SLOW_SAVE: pausing %g s before renaming %s\n",
                    atof(slow), tmp);
            fflush(stderr);
            sleep_seconds(atof(slow));
        }
        if (rename(tmp, final_path) != 0) die("cannot rename %s to %s: %s", tmp, final_path, strerror(errno));
        fsync_path(output_dir, 1);
        write_latest(output_dir, name);
        prune(output_dir, keep, name);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    free(mine);
    free(all);
    free(items);
}

/* The rows this rank writes in a distributed run: a tensor whose optimizer state one rank
 * keeps (--zero 1) is written whole by that rank; otherwise every holder has it, and the
 * ranks that hold it split its rows evenly: all ranks for the dense tensors, the ranks of
 * one expert shard for the rows of that shard (its expert data-parallel group). */
static void dist_owner_slices(const trainer *tr, ckpt_slice *owned)
{
    const dist *d = tr->dist;
    const param_table *t = &tr->model.table;
    for (int i = 0; i < t->count; i++) {
        const param_info *p = &t->items[i];
        int experts = p->kind == PARAM_EXPERTS;
        if (tr->opt.zero) {
            int mine = optim_state(&tr->opt, tr->opt.m, p->offset) != NULL;
            owned[i].start = p->row0;
            owned[i].count = mine ? p->shape[0] : 0;
        } else {
            int n = experts ? d->edp : d->world, r = experts ? d->edp_rank : d->rank;
            int64_t rows = p->shape[0];
            owned[i].start = p->row0 + rows * r / n;
            owned[i].count = rows * (r + 1) / n - rows * r / n;
        }
    }
}

void ckpt_save(const char *output_dir, const trainer *tr, const data_source *src, const char *tokenizer_json, int keep)
{
    ckpt_slice *owned = xcalloc((size_t)tr->model.table.count + 1, sizeof *owned);
    if (tr->dist) dist_owner_slices(tr, owned);
    else ckpt_owner_slices(&tr->model.table, ckpt_world_rank(), ckpt_world_size(), owned);
    ckpt_save_owned(output_dir, tr, src, tokenizer_json, keep, owned);
    free(owned);
}
