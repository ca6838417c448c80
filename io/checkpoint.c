/* checkpoint.c: the checkpoint writer and readers declared in checkpoint.h: one HDF5
 * file per save, written collectively through the MPI-IO driver, and the file
 * lifecycle around it that lets a preempted run restart without losing work.
 *
 * Layout of OUTPUT_DIR/ckpt_<step, 8 digits>.h5 (format "deltamla-checkpoint", version 1):
 *
 *   /params/<name>         every parameter, fp32 master weights, under its parameter-table
 *                          name (dots kept: a '/' would make groups) with its full
 *                          logical shape, e.g. /params/transformer.h.2.attn.wkv_a.weight
 *   /optim/m/<name>        AdamW first moment, or the Muon momentum buffer, of every tensor
 *   /optim/v/<name>        AdamW second moment, only for the tensors AdamW updates (Muon
 *                          tensors have none, so none is stored)
 *   /router_bias/<layer>   [E] selection biases of the MoE FFN of model layer <layer>
 *
 *   every dataset: H5T_IEEE_F32LE, contiguous, attribute crc32 (H5T_STD_U32LE): the
 *   CRC-32 (zlib's crc32, IEEE polynomial) of the dataset's raw little-endian bytes in
 *   row-major order, so `zlib.crc32(ds[()].tobytes())` recomputes it.
 *   /optim attributes: type ("muon" or "adamw"), step (H5T_STD_I64LE, optimizer steps taken).
 *   root attributes: format, version (I32), step (= the trainer's iteration, I64),
 *   skipped (I64), data_epoch, data_row, data_rows (I64: position in and size of the
 *   training source), seed (U64: initialisation and data order are pure functions of
 *   it, so it is the whole RNG state), config (config_json text), tokenizer (its JSON,
 *   absent for raw bytes). Strings are fixed-length, NUL-padded.
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
 * CRCs and lengths), so no rank needs the whole tensor. Reading: ckpt_load is
 * collective and every rank reads everything, which works at any rank count;
 * ckpt_verify and ckpt_read_weights open the file on MPI_COMM_SELF, so a single rank
 * (a tool) may call them.
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
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <hdf5.h>
#include <mpi.h>

#include "util.h"

#define CKPT_FORMAT "deltamla-checkpoint"
#define CKPT_VERSION 1

/* io/loader.c: the lock that serialises every HDF5 call in the process. */

/* One-line reasons handed back through `why` (checkpoint.h: "a static reason"). */
static char why_buf[768];

/* ---- CRC-32 (IEEE 802.3, reflected, as zlib) ---- */

#define CRC_POLY 0xedb88320u

static uint32_t crc_table[8][256];
static uint32_t crc_x2n[32]; /* x^(2^n) mod p, for combining */
static int crc_ready;

/* a * b modulo the CRC polynomial (bit-reflected), as zlib's multmodp */
static uint32_t crc_multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ CRC_POLY : b >> 1;
    }
    return p;
}

/* Called at every public entry point, before any thread may checksum: fills the
 * lookup tables and crc32_combine's x^(2^n) mod p table. */
static void crc_init(void)
{
    if (crc_ready) return;
    uint32_t x = 1u << 30; /* x^1 */
    for (int n = 0; n < 32; n++) {
        crc_x2n[n] = x;
        x = crc_multmodp(x, x);
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? CRC_POLY ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (int n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            crc_table[k][n] = crc_table[0][crc_table[k - 1][n] & 0xff] ^ (crc_table[k - 1][n] >> 8);
    crc_ready = 1;
}

/* Slicing by 8: eight table lookups per 8 bytes instead of one per byte. */
static uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* little-endian hosts: the first byte is the low byte */
        w ^= c;
        c = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff] ^
            crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
            crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

/* CRC of A followed by B from crc(A), crc(B) and B's length in bytes (zlib's
 * crc32_combine): crc(AB) = crc(A) * x^(8 len2) mod p  xor  crc(B). */
static uint32_t crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    uint32_t p = 1u << 31; /* x^0 */
    unsigned k = 3;        /* 2^3 = 8 bits per byte */
    for (uint64_t n = len2; n; n >>= 1, k++)
        if (n & 1) p = crc_multmodp(crc_x2n[k & 31], p);
    return crc_multmodp(p, crc1) ^ crc2;
}

/* CRC-32 of n bytes, in parallel over 4 MiB pieces combined in order. */
static uint32_t crc32_bytes(const void *data, size_t n)
{
    const size_t piece = (size_t)4 << 20;
    size_t pieces = (n + piece - 1) / piece;
    const unsigned char *p = data;
    if (pieces <= 1) return crc32_update(0, p, n);
    uint32_t *part = xmalloc(pieces * sizeof *part);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < pieces; i++) {
        size_t len = i + 1 < pieces ? piece : n - i * piece;
        part[i] = crc32_update(0, p + i * piece, len);
    }
    uint32_t crc = part[0];
    for (size_t i = 1; i < pieces; i++) crc = crc32_combine(crc, part[i], i + 1 < pieces ? piece : n - i * piece);
    free(part);
    return crc;
}

/* A checksum computed on a helper thread while the caller moves the next bytes through
 * HDF5: one CRC pass costs about as much as the disk transfer of the same bytes, so
 * running the two side by side rather than one after the other nearly halves a save
 * or a load (benchmarks in tests/tools/bench_io.c). The helper may use OpenMP threads
 * of its own (crc32_bytes); it never calls HDF5. */
typedef struct crc_job {
    const void *data;
    size_t n;
    uint32_t result;
    pthread_t thread;
    int running;
} crc_job;

static void *crc_job_main(void *arg)
{
    crc_job *j = arg;
    j->result = crc32_bytes(j->data, j->n);
    return NULL;
}

/* Start checksumming n bytes at data (which must stay unchanged until crc_job_finish);
 * computed inline when small (a thread would cost more) or when no thread starts. */
static void crc_job_start(crc_job *j, const void *data, size_t n)
{
    j->data = data;
    j->n = n;
    j->running = n >= ((size_t)1 << 20) && pthread_create(&j->thread, NULL, crc_job_main, j) == 0;
    if (!j->running) j->result = crc32_bytes(data, n);
}

static uint32_t crc_job_finish(crc_job *j)
{
    if (j->running) pthread_join(j->thread, NULL);
    j->running = 0;
    return j->result;
}

/* ---- HDF5 plumbing ---- */

static H5E_auto2_t saved_error_func;
static void *saved_error_data;
/* Set once HDF5 has reported an error here (a damaged file). HDF5 1.10 keeps internal
 * references after a metadata checksum failure, and at MPI_Finalize, with its error
 * printing on, dumps an "infinite loop closing library" trace; a damaged checkpoint
 * is reported by our one warning line, so from then on the printing stays off (every
 * module of deltamla silences it around its HDF5 calls anyway). */
static int h5_saw_error;

/* Take the HDF5 lock and silence HDF5's error-stack printing: failures here end in one
 * line of ours, with HDF5's most specific message (h5_reason) inside it. */
static void h5_enter(void)
{
    data_hdf5_lock();
    H5Eget_auto2(H5E_DEFAULT, &saved_error_func, &saved_error_data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static void h5_leave(void)
{
    H5Eclear2(H5E_DEFAULT);
    if (!h5_saw_error) H5Eset_auto2(H5E_DEFAULT, saved_error_func, saved_error_data);
    data_hdf5_unlock();
}

static herr_t reason_walk(unsigned n, const H5E_error2_t *e, void *data)
{
    char *buf = data;
    if (n == 0 && e->desc && e->desc[0]) snprintf(buf, 240, "%s", e->desc);
    return 0;
}

/* The innermost (most specific) message of HDF5's error stack, then the stack cleared;
 * a static buffer, valid until the next call. */
static const char *h5_reason(void)
{
    static char buf[240];
    snprintf(buf, sizeof buf, "unknown HDF5 error");
    h5_saw_error = 1;
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, reason_walk, buf);
    H5Eclear2(H5E_DEFAULT);
    return buf;
}

/* MPI-IO file access on comm. The 1.8 lower bound gives checksummed metadata (the 1.0
 * format has none); collective metadata I/O keeps N ranks from each reading the same
 * object headers. */
static hid_t make_fapl(MPI_Comm comm)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0 || H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL) < 0 ||
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_all_coll_metadata_ops(fapl, 1) < 0 || H5Pset_coll_metadata_write(fapl, 1) < 0)
        die("cannot set up HDF5's MPI-IO driver: %s", h5_reason());
    return fapl;
}

static int world_rank(void)
{
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

static int world_size(void)
{
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

/* ---- what a checkpoint holds ---- */

typedef enum item_kind { ITEM_PARAM, ITEM_M, ITEM_V, ITEM_BIAS } item_kind;

typedef struct ckpt_item {
    char path[160];   /* dataset path in the file */
    item_kind kind;
    int param;        /* parameter-table index; for ITEM_BIAS the MoE slot */
    int ndim;
    hsize_t dims[3];
    size_t numel;
    size_t row;       /* floats per row of dimension 0 */
    size_t offset;    /* floats into its buffer (params, m, v or router_bias) */
} ckpt_item;

static int uses_v(const param_info *p, int muon_mode) { return !(muon_mode && params_is_muon(p)); }

/* Every dataset of a checkpoint of config c and table t, in writing order: all
 * parameters, then (with_optim) every m and the v that AdamW uses, then the router
 * biases. MoE slots are the MLA layers in layer order when use_moe, as model_mla.c
 * numbers them. Returns a malloc'd array; *n_out its length. */
static ckpt_item *list_items(const param_table *t, const config *c, int muon_mode, int with_optim, int *n_out)
{
    int cap = 3 * t->count + c->n_layer + 1, n = 0;
    ckpt_item *items = xcalloc((size_t)cap, sizeof *items);
    for (int pass = 0; pass < (with_optim ? 3 : 1); pass++) {
        item_kind kind = pass == 0 ? ITEM_PARAM : pass == 1 ? ITEM_M : ITEM_V;
        const char *group = pass == 0 ? "/params" : pass == 1 ? "/optim/m" : "/optim/v";
        for (int i = 0; i < t->count; i++) {
            const param_info *p = &t->items[i];
            if (kind == ITEM_V && !uses_v(p, muon_mode)) continue;
            ckpt_item *it = &items[n++];
            snprintf(it->path, sizeof it->path, "%s/%s", group, p->name);
            it->kind = kind;
            it->param = i;
            it->ndim = p->ndim;
            for (int d = 0; d < p->ndim; d++) it->dims[d] = (hsize_t)p->shape[d];
            it->numel = p->numel;
            it->row = p->shape[0] ? p->numel / (size_t)p->shape[0] : 0;
            it->offset = p->offset;
        }
    }
    int slot = 0;
    for (int l = 0; l < c->n_layer && c->use_moe; l++) {
        if (config_is_gdn(c, l)) continue;
        ckpt_item *it = &items[n++];
        snprintf(it->path, sizeof it->path, "/router_bias/%d", l);
        it->kind = ITEM_BIAS;
        it->param = slot;
        it->ndim = 1;
        it->dims[0] = (hsize_t)c->moe_E;
        it->numel = (size_t)c->moe_E;
        it->row = 1;
        it->offset = (size_t)slot * (size_t)c->moe_E;
        slot++;
    }
    *n_out = n;
    return items;
}

static int count_moe(const config *c)
{
    int n = 0;
    for (int l = 0; l < c->n_layer && c->use_moe; l++) n += !config_is_gdn(c, l);
    return n;
}

/* The item's tensor in the trainer's backend memory. */
static float *item_buffer(const ckpt_item *it, const model *m, const optimizer *o)
{
    switch (it->kind) {
    case ITEM_PARAM: return m->params + it->offset;
    case ITEM_M: return o->m + it->offset;
    case ITEM_V: return o->v + it->offset;
    case ITEM_BIAS: return m->router_bias + it->offset;
    }
    return NULL;
}

static int backend_is_host(const backend *be) { return strcmp(be->name, "cpu") == 0; }

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
            die("cannot write checkpoint %s: %s failed on rank %d (%s)", path, #call, world_rank(), h5_reason()); \
    } while (0)

static void attr_write(hid_t obj, const char *name, hid_t file_type, hid_t mem_type, const void *value,
                       const char *path)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(obj, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0) die("cannot write checkpoint %s: attribute %s (%s)", path, name, h5_reason());
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
    if (world_rank() == 0) {
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

/* A checkpoint file name's step, or -1 if name is not ckpt_<digits>.h5. */
static int64_t name_step(const char *name)
{
    if (strncmp(name, "ckpt_", 5) != 0) return -1;
    const char *p = name + 5;
    int64_t step = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 18) step = step * 10 + (*p++ - '0'), digits++;
    if (digits < 8 || strcmp(p, ".h5") != 0) return -1;
    return step;
}

typedef struct ckpt_entry {
    int64_t step;
    char name[64];
} ckpt_entry;

static int entry_cmp(const void *a, const void *b)
{
    int64_t x = ((const ckpt_entry *)a)->step, y = ((const ckpt_entry *)b)->step;
    return x < y ? -1 : x > y;
}

/* The checkpoints in dir by ascending step; malloc'd (NULL when none or dir unreadable). */
static ckpt_entry *list_checkpoints(const char *dir, int *n_out)
{
    *n_out = 0;
    DIR *d = opendir(dir);
    if (!d) return NULL;
    int n = 0, cap = 0;
    ckpt_entry *e = NULL;
    struct dirent *de;
    while ((de = readdir(d))) {
        int64_t step = name_step(de->d_name);
        if (step < 0 || strlen(de->d_name) >= sizeof e->name) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            ckpt_entry *ne = realloc(e, (size_t)cap * sizeof *ne);
            if (!ne) die("out of host memory listing %s", dir);
            e = ne;
        }
        e[n].step = step;
        snprintf(e[n].name, sizeof e[n].name, "%s", de->d_name);
        n++;
    }
    closedir(d);
    if (n) qsort(e, (size_t)n, sizeof *e, entry_cmp);
    *n_out = n;
    return e;
}

/* Delete checkpoints beyond the newest `keep` (0 = keep all) except `current` (what
 * latest names), and the temporary files of interrupted saves. Rank 0 only. */
static void prune(const char *dir, int keep, const char *current)
{
    int n;
    ckpt_entry *e = list_checkpoints(dir, &n);
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
    crc_init();
    int rank = world_rank(), nranks = world_size();
    const model *m = &tr->model;
    const backend *be = m->be;
    int n;
    ckpt_item *items = list_items(&m->table, &tr->cfg, tr->opt.muon_mode, 1, &n);

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

    h5_enter();
    hid_t fapl = make_fapl(MPI_COMM_WORLD);
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), gcpl = H5Pcreate(H5P_GROUP_CREATE), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5W(H5Pset_obj_track_times(fcpl, 0), tmp);
    H5W(H5Pset_obj_track_times(gcpl, 0), tmp);
    H5W(H5Pset_obj_track_times(dcpl, 0), tmp);
    H5W(H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY), tmp);
    H5W(H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER), tmp);
    H5W(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE), tmp);
    hid_t file = H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, fapl);
    if (file < 0) die("cannot create checkpoint %s: %s", tmp, h5_reason());
    const char *groups[] = {"/params", "/optim", "/optim/m", "/optim/v", "/router_bias"};
    hid_t group_ids[5];
    for (int g = 0; g < 5; g++) {
        group_ids[g] = H5Gcreate2(file, groups[g], H5P_DEFAULT, gcpl, H5P_DEFAULT);
        if (group_ids[g] < 0) die("cannot write checkpoint %s: group %s (%s)", tmp, groups[g], h5_reason());
    }

    /* host staging for backends whose memory is not host memory */
    size_t stage_floats = 1;
    for (int i = 0; i < n; i++)
        if ((size_t)mine[i].count * items[i].row > stage_floats) stage_floats = (size_t)mine[i].count * items[i].row;
    float *stage = backend_is_host(be) ? NULL : xmalloc(stage_floats * sizeof(float));
    uint32_t *crc = xcalloc((size_t)n, sizeof *crc);
    hid_t *ds = xmalloc((size_t)n * sizeof *ds);
    float dummy = 0;
    for (int i = 0; i < n; i++) {
        const ckpt_item *it = &items[i];
        hid_t fspace = H5Screate_simple(it->ndim, it->dims, NULL);
        ds[i] = H5Dcreate2(file, it->path, H5T_IEEE_F32LE, fspace, H5P_DEFAULT, dcpl, H5P_DEFAULT);
        if (ds[i] < 0) die("cannot write checkpoint %s: dataset %s (%s)", tmp, it->path, h5_reason());
        ckpt_slice s = mine[i];
        hsize_t mcount = (hsize_t)s.count * it->row;
        hid_t mspace = H5Screate_simple(1, mcount ? &mcount : (hsize_t[]){1}, NULL);
        const float *data = &dummy;
        if (s.count > 0) {
            hsize_t start[3] = {(hsize_t)s.start, 0, 0}, count[3] = {(hsize_t)s.count, it->dims[1], it->dims[2]};
            H5W(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start, NULL, count, NULL), tmp);
            const float *src_rows = item_buffer(it, m, &tr->opt) + (size_t)s.start * it->row;
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
        crc_job_start(&job, data, s.count > 0 ? mcount * sizeof(float) : 0);
        H5W(H5Dwrite(ds[i], H5T_NATIVE_FLOAT, mspace, fspace, dxpl, data), tmp);
        crc[i] = crc_job_finish(&job);
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
            whole = crc32_combine(whole, all_crc[(size_t)r * n + i], (uint64_t)s->count * items[i].row * sizeof(float));
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
    h5_leave();

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

void ckpt_save(const char *output_dir, const trainer *tr, const data_source *src, const char *tokenizer_json, int keep)
{
    ckpt_slice *owned = xcalloc((size_t)tr->model.table.count + 1, sizeof *owned);
    ckpt_owner_slices(&tr->model.table, world_rank(), world_size(), owned);
    ckpt_save_owned(output_dir, tr, src, tokenizer_json, keep, owned);
    free(owned);
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
    hid_t fapl = make_fapl(comm);
    *file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (*file < 0) fail(why, "not readable as HDF5 (%s)", h5_reason()); /* before any other call clears the stack */
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
        return fail(why, "group /optim is missing (%s)", h5_reason());
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
    if (exists < 0) return fail(why, "dataset %s cannot be looked up (%s)", it->path, h5_reason());
    if (exists == 0) return fail(why, "dataset %s is missing", it->path);
    hid_t ds = H5Dopen2(file, it->path, H5P_DEFAULT);
    if (ds < 0) return fail(why, "dataset %s cannot be opened (%s)", it->path, h5_reason());
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
    if (rc < 0) fail(why, "dataset %s cannot be read (%s)", it->path, h5_reason());
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
    return check_crc(it, crc32_bytes(dst, it->numel * sizeof(float)), stored, why);
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
    crc_init();
    int rank = world_rank();
    model *m = &tr->model;
    optimizer *o = &tr->opt;
    const backend *be = m->be;
    ckpt_header h;
    memset(&h, 0, sizeof h);
    hid_t file = -1, dxpl = -1;
    int rc = 0, n = 0, switching = 0;
    ckpt_item *items = NULL;
    float *stage = NULL;

    h5_enter();
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
    items = list_items(&m->table, &h.cfg, strcmp(h.optim_type, "muon") == 0, !switching, &n);
    size_t stage_floats = 1;
    for (int i = 0; i < n; i++)
        if (items[i].numel > stage_floats) stage_floats = items[i].numel;
    /* two staging buffers: one being checksummed while the next dataset is read */
    if (!backend_is_host(be)) stage = xmalloc(2 * stage_floats * sizeof(float));
    dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE);
    crc_job job = {0};
    const ckpt_item *job_item = NULL;
    uint32_t job_stored = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const ckpt_item *it = &items[i];
        /* the CPU backend's tensors are host memory: read straight into place */
        float *dst = item_buffer(it, m, o);
        float *host = stage ? stage + (size_t)(i & 1) * stage_floats : dst;
        int ndim;
        hsize_t dims[3];
        uint32_t stored = 0;
        int r = read_item_data(file, dxpl, it, host, &stored, &ndim, dims, why);
        if (job_item) { /* the previous dataset's checksum, computed meanwhile */
            if (check_crc(job_item, crc_job_finish(&job), job_stored, why) != 0) rc = -1;
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
        if (stage) be->from_host(dst, host, it->numel * sizeof(float));
        crc_job_start(&job, host, it->numel * sizeof(float));
        job_item = it;
        job_stored = stored;
    }
    if (job_item && check_crc(job_item, crc_job_finish(&job), job_stored, why) != 0) rc = -1;

done:
    if (dxpl >= 0) H5Pclose(dxpl);
    if (file >= 0) H5Fclose(file);
    h5_leave();
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
        be->zero(o->m, m->table.total * sizeof(float));
        be->zero(o->v, m->table.total * sizeof(float));
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
    ckpt_item *items = list_items(&t, &h->cfg, strcmp(h->optim_type, "muon") == 0, 1, &n);
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
    crc_init();
    ckpt_header h;
    memset(&h, 0, sizeof h);
    hid_t file = -1;
    int rc;
    h5_enter();
    rc = open_file(path, MPI_COMM_SELF, &file, why);
    if (rc == 0) rc = read_header(file, &h, why);
    if (rc == 0) rc = verify_open(file, &h, why);
    if (file >= 0) H5Fclose(file);
    h5_leave();
    header_free(&h);
    return rc;
}

void ckpt_read_weights(const char *path, ckpt_weights *w)
{
    crc_init();
    memset(w, 0, sizeof *w);
    ckpt_header h;
    const char *why = NULL;
    hid_t file = -1;
    h5_enter();
    if (open_file(path, MPI_COMM_SELF, &file, &why) != 0 || read_header(file, &h, &why) != 0)
        die("cannot read checkpoint %s: %s", path, why);
    w->cfg = h.cfg;
    params_build(&w->table, &w->cfg);
    w->params = xmalloc(w->table.total * sizeof(float));
    w->n_moe = count_moe(&w->cfg);
    w->router_bias = xcalloc((size_t)w->n_moe * (size_t)(w->cfg.use_moe ? w->cfg.moe_E : 0) + 1, sizeof(float));
    int n;
    ckpt_item *items = list_items(&w->table, &w->cfg, 0, 0, &n);
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
    h5_leave();
    w->tokenizer_json = h.tokenizer;
    h.tokenizer = NULL;
    w->step = h.step;
    header_free(&h);
}

uint32_t ckpt_crc32(const void *data, size_t n)
{
    crc_init();
    return crc32_bytes(data, n);
}

int64_t ckpt_name_step(const char *path)
{
    const char *base = strrchr(path, '/');
    return name_step(base ? base + 1 : path);
}

char **ckpt_older(const char *dir, int64_t below, int *n_out)
{
    int n;
    ckpt_entry *e = list_checkpoints(dir, &n);
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
