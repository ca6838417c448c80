/* checkpoint_common.c: what the checkpoint writer (checkpoint_write.c) and readers
 * (checkpoint_read.c) share, declared in checkpoint_internal.h: the CRC-32 every dataset
 * carries (slicing by 8, parallel over OpenMP threads, combinable across slices, and a
 * helper thread that checksums while HDF5 moves bytes), the HDF5 plumbing (the process-wide
 * lock, silenced error printing, the MPI-IO file access list), the list of datasets a
 * checkpoint of a given config holds, and the directory listing of ckpt_<step>.h5 files.
 * Also ckpt_crc32 and ckpt_name_step of checkpoint.h.
 */
#define _POSIX_C_SOURCE 200809L
#include "checkpoint_internal.h"

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* io/loader.c: the lock that serialises every HDF5 call in the process. */

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
 * lookup tables and ckpt_crc32_combine's x^(2^n) mod p table. */
void ckpt_crc_init(void)
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
 * ckpt_crc32_combine): crc(AB) = crc(A) * x^(8 len2) mod p  xor  crc(B). */
uint32_t ckpt_crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    uint32_t p = 1u << 31; /* x^0 */
    unsigned k = 3;        /* 2^3 = 8 bits per byte */
    for (uint64_t n = len2; n; n >>= 1, k++)
        if (n & 1) p = crc_multmodp(crc_x2n[k & 31], p);
    return crc_multmodp(p, crc1) ^ crc2;
}

/* CRC-32 of n bytes, in parallel over 4 MiB pieces combined in order. */
uint32_t ckpt_crc32_bytes(const void *data, size_t n)
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
    for (size_t i = 1; i < pieces; i++) crc = ckpt_crc32_combine(crc, part[i], i + 1 < pieces ? piece : n - i * piece);
    free(part);
    return crc;
}

/* The body of a crc_job's helper thread. */
static void *crc_job_main(void *arg)
{
    crc_job *j = arg;
    j->result = ckpt_crc32_bytes(j->data, j->n);
    return NULL;
}

/* Start checksumming n bytes at data (which must stay unchanged until ckpt_crc_job_finish);
 * computed inline when small (a thread would cost more) or when no thread starts. */
void ckpt_crc_job_start(crc_job *j, const void *data, size_t n)
{
    j->data = data;
    j->n = n;
    j->running = n >= ((size_t)1 << 20) && pthread_create(&j->thread, NULL, crc_job_main, j) == 0;
    if (!j->running) j->result = ckpt_crc32_bytes(data, n);
}

uint32_t ckpt_crc_job_finish(crc_job *j)
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
 * line of ours, with HDF5's most specific message (ckpt_h5_reason) inside it. */
void ckpt_h5_enter(void)
{
    data_hdf5_lock();
    H5Eget_auto2(H5E_DEFAULT, &saved_error_func, &saved_error_data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void ckpt_h5_leave(void)
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
const char *ckpt_h5_reason(void)
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
hid_t ckpt_make_fapl(MPI_Comm comm)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0 || H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL) < 0 ||
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST) < 0 ||
        H5Pset_all_coll_metadata_ops(fapl, 1) < 0 || H5Pset_coll_metadata_write(fapl, 1) < 0)
        die("cannot set up HDF5's MPI-IO driver: %s", ckpt_h5_reason());
    return fapl;
}

int ckpt_world_rank(void)
{
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int ckpt_world_size(void)
{
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

/* ---- what a checkpoint holds ---- */

static int uses_v(const param_info *p, int muon_mode) { return !(muon_mode && params_is_muon(p)); }

/* Every dataset of a checkpoint of config c and table t, in writing order: all
 * parameters, then (with_optim) every m and the v that AdamW uses, then the router
 * biases. MoE slots are the MLA layers in layer order when use_moe, as model_mla.c
 * numbers them. Returns a malloc'd array; *n_out its length. */
ckpt_item *ckpt_list_items(const param_table *t, const config *c, int muon_mode, int with_optim, int *n_out)
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
            it->dims[0] = (hsize_t)p->full_rows;
            it->row = p->shape[0] ? p->numel / (size_t)p->shape[0] : 0;
            it->numel = it->row * (size_t)p->full_rows;
            it->offset = p->offset;
            it->row0 = p->row0;
            it->local_rows = p->shape[0];
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
        it->row0 = 0;
        it->local_rows = c->moe_E;
        slot++;
    }
    *n_out = n;
    return items;
}


/* The item's tensor in the trainer's backend memory. */
float *ckpt_item_buffer(const ckpt_item *it, const model *m, const optimizer *o)
{
    switch (it->kind) {
    case ITEM_PARAM: return m->params + it->offset;
    case ITEM_M: return optim_state(o, o->m, it->offset);
    case ITEM_V: return optim_state(o, o->v, it->offset);
    case ITEM_BIAS: return m->router_bias + it->offset;
    }
    return NULL;
}

int ckpt_backend_is_host(const backend *be) { return strcmp(be->name, "cpu") == 0; }

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

static int entry_cmp(const void *a, const void *b)
{
    int64_t x = ((const ckpt_entry *)a)->step, y = ((const ckpt_entry *)b)->step;
    return x < y ? -1 : x > y;
}

/* The checkpoints in dir by ascending step; malloc'd (NULL when none or dir unreadable). */
ckpt_entry *ckpt_list_checkpoints(const char *dir, int *n_out)
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

uint32_t ckpt_crc32(const void *data, size_t n)
{
    ckpt_crc_init();
    return ckpt_crc32_bytes(data, n);
}

int64_t ckpt_name_step(const char *path)
{
    const char *base = strrchr(path, '/');
    return name_step(base ? base + 1 : path);
}
