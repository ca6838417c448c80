/* loader.c: the packed HDF5 token-shard loader, the data source of data.h behind
 * `--data` when it names a directory of shards or one shard file.
 *
 * A data set is a directory of shard files (*.h5, taken in sorted name order) or a single
 * shard; the shards' /tokens datasets, concatenated, are one token stream. Rows of T+1
 * tokens are cut from that stream exactly as the text source cuts rows of bytes
 * (data_rows, data_train_rows, data_permute, the same global-batch assignment and epoch
 * boundary), so the two sources yield identical batches from the same tokens. Every
 * shard is validated when the source opens: the format attribute, the version, the
 * vocabulary, end-of-text token and tokenizer (the same in every shard), the token type
 * and the lengths; a token outside the vocabulary is caught when its row is read. No
 * token is read at open: each rank reads only its own rows, one hyperslab per row and
 * shard (a row may straddle shards), and widens them to int32.
 *
 * HDF5 driver. Each rank opens every shard once, read-only, through the MPI-IO driver on
 * MPI_COMM_SELF, and reads with independent transfers. A communicator of one is the right
 * one here: every rank reads different rows at its own pace, so no read is collective,
 * and the file handles stay independent of how many ranks there are and of which
 * communicator is data-parallel (rank and nranks are just numbers to this loader, which
 * is also what lets a test play all ranks in one process).
 *
 * Threads. A background thread prefetches the next batch while the current one trains:
 * next_batch hands over the batch the thread read and asks for the one after. A batch is
 * a pure function of its key (epoch, row, B) after the epoch-boundary rule, and the key
 * is recomputed from s->epoch/s->row at every call, so a position changed from outside
 * (a checkpoint restore, an evaluation rewinding to (0, 0)) is noticed and the batch is
 * read afresh: the prefetched batch is always the one a synchronous read would give.
 * Debian's parallel HDF5 is built without thread safety, so HDF5 calls must never run in
 * two threads at once. Between open and close a source calls HDF5 only from its prefetch
 * thread, and every HDF5 call of every source (open, reads, close) holds one process-wide
 * mutex, since a training and a validation source each have a thread; other HDF5 users
 * in the process (the checkpoint writer) hold it too, through data_hdf5_lock(). The
 * loader never holds it across anything that waits for another rank (its files are on
 * MPI_COMM_SELF), so a rank's collective checkpoint write waits at most for one batch
 * read, never for a peer. The thread reads through MPI-IO, which a second thread may call
 * only when MPI was initialised with MPI_THREAD_MULTIPLE; at a lower level the loader
 * reads synchronously on the caller's thread instead (the same batches, no overlap).
 * A source must be closed before MPI_Finalize, which shuts HDF5 down.
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hdf5.h>
#include <mpi.h>

#include "data.h"
#include "util.h"

/* ---- the process-wide HDF5 lock ---- */

static pthread_mutex_t hdf5_mutex = PTHREAD_MUTEX_INITIALIZER;
/* HDF5's automatic error printing, switched off while the loader holds the lock (its
 * own one-line messages replace HDF5's error stack dumps) and restored after. */
static H5E_auto2_t saved_error_func;
static void *saved_error_data;

/* Take and release the lock that serialises every HDF5 call in the process. Blocking;
 * not recursive. Code outside the loader that calls HDF5 while a loader is open holds it
 * around those calls, since the loader's prefetch thread may be inside HDF5 meanwhile. */
void data_hdf5_lock(void) { pthread_mutex_lock(&hdf5_mutex); }
void data_hdf5_unlock(void) { pthread_mutex_unlock(&hdf5_mutex); }

static void h5_enter(void)
{
    data_hdf5_lock();
    H5Eget_auto2(H5E_DEFAULT, &saved_error_func, &saved_error_data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static void h5_leave(void)
{
    H5Eclear2(H5E_DEFAULT);
    H5Eset_auto2(H5E_DEFAULT, saved_error_func, saved_error_data);
    data_hdf5_unlock();
}

/* H5Ewalk2 callback: keep the most specific error's description (the first one walked
 * upward), which names the cause (a truncated file, a lock the file system refuses). */
static herr_t innermost_error(unsigned n, const H5E_error2_t *e, void *why)
{
    if (n == 0 && e->desc) snprintf(why, 256, "%s", e->desc);
    return 0;
}

/* ---- the source ---- */

typedef struct shard {
    char *path;
    hid_t file, tokens, space; /* open for the source's lifetime; space: /tokens' file dataspace */
    int64_t start, n;          /* the shard's first token in the stream, and its token count */
} shard;

/* What a batch is: after the epoch-boundary rule, (epoch, row) and B fix its content. */
typedef struct batch_key {
    int64_t epoch, row;
    int B;
} batch_key;

typedef struct shards_impl {
    shard *shards;
    int n_shards;
    hid_t mem_type; /* the tokens' native type: H5T_NATIVE_UINT16 or H5T_NATIVE_UINT32 */
    int width;      /* its size in bytes */
    hid_t dxpl;     /* independent MPI-IO transfers */
    int T;
    uint64_t seed;
    int64_t first_row, num_rows; /* the split's rows in the stream */
    int32_t vocab;
    int rank, nranks;
    void *scratch;  /* [T+1] tokens as stored, for one read */
    int32_t *rows;  /* [rows_B][T+1]: the batch read last */
    int rows_B;
    char error[768]; /* why the last read failed (written by the reader, read after its result) */

    int threaded;    /* a prefetch thread reads; else next_batch reads itself */
    pthread_t thread;
    /* the hand-over between next_batch and the thread; the fields below are guarded by mu */
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    int stop;
    int want_valid; /* a read of `want` is requested and not yet started */
    batch_key want;
    int busy;       /* the thread is reading (into rows) */
    int result_valid, result_failed;
    batch_key result; /* what rows holds when result_valid */
} shards_impl;

/* Read tokens [pos, pos+len) of the stream into out, widened to int32, checking every
 * token against the vocabulary. Caller holds the HDF5 lock. Returns 0, or -1 with
 * d->error set. */
static int read_span(shards_impl *d, int64_t pos, int64_t len, int32_t *out)
{
    /* the last shard that starts at or before pos; empty shards share a start, so step
     * past them */
    int lo = 0, hi = d->n_shards - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (d->shards[mid].start <= pos) lo = mid;
        else hi = mid - 1;
    }
    int i = lo;
    while (len > 0) {
        while (i < d->n_shards && pos >= d->shards[i].start + d->shards[i].n) i++;
        fatal_check(i < d->n_shards);
        shard *sh = &d->shards[i];
        hsize_t off = (hsize_t)(pos - sh->start);
        hsize_t cnt = (hsize_t)(sh->start + sh->n - pos);
        if ((int64_t)cnt > len) cnt = (hsize_t)len;
        hid_t mspace = H5Screate_simple(1, &cnt, NULL);
        herr_t rc = mspace < 0 ? -1 : H5Sselect_hyperslab(sh->space, H5S_SELECT_SET, &off, NULL, &cnt, NULL);
        if (rc >= 0) rc = H5Dread(sh->tokens, d->mem_type, mspace, sh->space, d->dxpl, d->scratch);
        if (mspace >= 0) H5Sclose(mspace);
        if (rc < 0) {
            char why[256] = "no reason given";
            H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_error, why);
            snprintf(d->error, sizeof d->error, "reading tokens %llu..%llu of shard %s failed (%s)",
                     (unsigned long long)off, (unsigned long long)(off + cnt - 1), sh->path, why);
            return -1;
        }
        for (hsize_t k = 0; k < cnt; k++) {
            uint32_t v = d->width == 2 ? ((const uint16_t *)d->scratch)[k] : ((const uint32_t *)d->scratch)[k];
            if (v >= (uint32_t)d->vocab) {
                snprintf(d->error, sizeof d->error, "shard %s holds token %u at position %llu, outside its vocab_size %d",
                         sh->path, v, (unsigned long long)(off + k), d->vocab);
                return -1;
            }
            out[k] = (int32_t)v;
        }
        out += cnt;
        pos += (int64_t)cnt;
        len -= (int64_t)cnt;
        i++;
    }
    return 0;
}

/* This rank's B rows of the global batch `k` into d->rows (which holds at least k.B
 * rows), as text_next_batch picks them. Returns 0, or -1 with d->error set. */
static int read_batch(shards_impl *d, batch_key k)
{
    int rc = 0;
    h5_enter();
    for (int b = 0; b < k.B && rc == 0; b++) {
        int64_t g = (k.row + (int64_t)d->rank * k.B + b) % d->num_rows;
        int64_t r = d->first_row + data_permute(g, d->num_rows, d->seed, k.epoch);
        rc = read_span(d, r * d->T, (int64_t)d->T + 1, d->rows + (size_t)b * (d->T + 1));
    }
    h5_leave();
    return rc;
}

/* Size d->rows for B rows. Only while no read is in flight. */
static void reserve_rows(shards_impl *d, int B)
{
    if (B <= d->rows_B) return;
    free(d->rows);
    d->rows = xmalloc((size_t)B * (d->T + 1) * sizeof(int32_t));
    d->rows_B = B;
}

static void *prefetch_main(void *arg)
{
    shards_impl *d = arg;
    pthread_mutex_lock(&d->mu);
    for (;;) {
        while (!d->stop && !d->want_valid) pthread_cond_wait(&d->work_cv, &d->mu);
        if (d->stop) break;
        batch_key k = d->want;
        d->want_valid = 0;
        d->busy = 1;
        d->result_valid = 0;
        pthread_mutex_unlock(&d->mu);
        int rc = read_batch(d, k);
        pthread_mutex_lock(&d->mu);
        d->busy = 0;
        d->result_valid = 1;
        d->result_failed = rc != 0;
        d->result = k;
        pthread_cond_broadcast(&d->done_cv);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* Wait until d->rows holds batch k: the prefetched batch when it is k, else a fresh read
 * (after any read in flight has finished, since it writes the same buffer). Returns with
 * the thread idle, so the caller may read d->rows until it asks for the next batch. */
static void prefetch_take(shards_impl *d, batch_key k)
{
    pthread_mutex_lock(&d->mu);
    while (d->busy || d->want_valid) pthread_cond_wait(&d->done_cv, &d->mu);
    int hit = d->result_valid && d->result.epoch == k.epoch && d->result.row == k.row && d->result.B == k.B;
    if (!hit) {
        reserve_rows(d, k.B);
        d->want = k;
        d->want_valid = 1;
        pthread_cond_signal(&d->work_cv);
        while (d->busy || d->want_valid) pthread_cond_wait(&d->done_cv, &d->mu);
    }
    int failed = d->result_failed;
    pthread_mutex_unlock(&d->mu);
    if (failed) die("%s", d->error);
}

/* Ask the thread for batch k; returns at once. The thread is idle (prefetch_take). */
static void prefetch_start(shards_impl *d, batch_key k)
{
    pthread_mutex_lock(&d->mu);
    reserve_rows(d, k.B);
    d->want = k;
    d->want_valid = 1;
    pthread_cond_signal(&d->work_cv);
    pthread_mutex_unlock(&d->mu);
}

/* The batch a call with this B at the source's position reads: a global batch that would
 * cross the end of the epoch starts the next epoch instead (text_next_batch's rule). */
static batch_key key_at(const data_source *s, int B)
{
    batch_key k = {s->epoch, s->row, B};
    if (k.row + (int64_t)B * s->nranks > s->num_rows && k.row > 0) {
        k.epoch++;
        k.row = 0;
    }
    return k;
}

static void shards_next_batch(data_source *s, int32_t *inputs, int32_t *targets, int B, int T)
{
    shards_impl *d = s->impl;
    fatal_check(T == d->T && B >= 1);
    batch_key k = key_at(s, B);
    if (d->threaded) {
        prefetch_take(d, k);
    } else {
        reserve_rows(d, B);
        if (read_batch(d, k) != 0) die("%s", d->error);
    }
    for (int b = 0; b < B; b++) {
        const int32_t *row = d->rows + (size_t)b * (T + 1);
        memcpy(inputs + (size_t)b * T, row, (size_t)T * sizeof(int32_t));
        memcpy(targets + (size_t)b * T, row + 1, (size_t)T * sizeof(int32_t));
    }
    s->epoch = k.epoch;
    s->row = k.row + (int64_t)B * s->nranks;
    if (d->threaded) prefetch_start(d, key_at(s, B));
}

static void shards_close(data_source *s)
{
    shards_impl *d = s->impl;
    if (d->threaded) {
        pthread_mutex_lock(&d->mu);
        d->stop = 1;
        pthread_cond_signal(&d->work_cv);
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->thread, NULL);
        pthread_cond_destroy(&d->work_cv);
        pthread_cond_destroy(&d->done_cv);
        pthread_mutex_destroy(&d->mu);
    }
    h5_enter();
    for (int i = 0; i < d->n_shards; i++) {
        H5Sclose(d->shards[i].space);
        H5Dclose(d->shards[i].tokens);
        H5Fclose(d->shards[i].file);
        free(d->shards[i].path);
    }
    H5Pclose(d->dxpl);
    h5_leave();
    free(d->shards);
    free(d->scratch);
    free(d->rows);
    free(d);
    free((char *)s->tokenizer_json);
    free(s);
}

/* ---- opening and validation (the caller holds the HDF5 lock; errors die naming the file) ---- */

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The shard files of `path`, sorted by name: a directory's *.h5 files (hidden files
 * skipped: they are a writer's temporaries) or the file itself. */
static char **list_shards(const char *path, int *count)
{
    struct stat st;
    if (stat(path, &st) != 0) die("cannot open data set %s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        char **one = xmalloc(sizeof *one);
        one[0] = strdup(path);
        if (!one[0]) die("out of host memory");
        *count = 1;
        return one;
    }
    DIR *dir = opendir(path);
    if (!dir) die("cannot open data directory %s: %s", path, strerror(errno));
    int n = 0, cap = 16;
    char **names = xmalloc((size_t)cap * sizeof *names);
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.' || len < 4 || strcmp(e->d_name + len - 3, ".h5") != 0) continue;
        char *full = xmalloc(strlen(path) + len + 2);
        sprintf(full, "%s/%s", path, e->d_name);
        if (stat(full, &st) != 0 || !S_ISREG(st.st_mode)) {
            free(full);
            continue;
        }
        if (n == cap) {
            cap *= 2;
            char **nn = realloc(names, (size_t)cap * sizeof *names);
            if (!nn) die("out of host memory listing %s", path);
            names = nn;
        }
        names[n++] = full;
    }
    closedir(dir);
    if (n == 0) die("data directory %s holds no token shards (*.h5 files)", path);
    /* names share the directory prefix, so comparing full paths sorts by file name */
    qsort(names, (size_t)n, sizeof *names, compare_names);
    *count = n;
    return names;
}

/* A root attribute as a malloc'd string, or NULL when the attribute is absent. Fixed-
 * length and variable-length strings are both accepted (h5py writes the latter). */
static char *read_string_attr(hid_t file, const char *file_path, const char *name)
{
    if (H5Aexists(file, name) <= 0) return NULL;
    hid_t a = H5Aopen(file, name, H5P_DEFAULT);
    hid_t type = a < 0 ? -1 : H5Aget_type(a);
    hid_t space = a < 0 ? -1 : H5Aget_space(a);
    if (type < 0 || space < 0) die("shard %s: cannot read attribute %s", file_path, name);
    if (H5Tget_class(type) != H5T_STRING || H5Sget_simple_extent_npoints(space) != 1)
        die("shard %s: attribute %s is not a string", file_path, name);
    char *out = NULL;
    herr_t rc;
    if (H5Tis_variable_str(type) > 0) {
        hid_t mem = H5Tcopy(H5T_C_S1);
        H5Tset_size(mem, H5T_VARIABLE);
        H5Tset_cset(mem, H5Tget_cset(type));
        char *v = NULL;
        rc = H5Aread(a, mem, &v);
        if (rc >= 0) {
            out = strdup(v ? v : "");
            H5free_memory(v);
        }
        H5Tclose(mem);
    } else {
        size_t size = H5Tget_size(type);
        out = xcalloc(size + 1, 1);
        rc = H5Aread(a, type, out);
        if (H5Tget_strpad(type) == H5T_STR_SPACEPAD)
            for (size_t i = size; i > 0 && out[i - 1] == ' '; i--) out[i - 1] = '\0';
    }
    if (rc < 0) die("shard %s: cannot read attribute %s", file_path, name);
    if (!out) die("out of host memory");
    H5Sclose(space);
    H5Tclose(type);
    H5Aclose(a);
    return out;
}

/* An integer root attribute; die when absent or not an integer. */
static int64_t read_int_attr(hid_t file, const char *file_path, const char *name)
{
    if (H5Aexists(file, name) <= 0) die("shard %s has no %s attribute", file_path, name);
    hid_t a = H5Aopen(file, name, H5P_DEFAULT);
    hid_t type = a < 0 ? -1 : H5Aget_type(a);
    hid_t space = a < 0 ? -1 : H5Aget_space(a);
    if (type < 0 || space < 0) die("shard %s: cannot read attribute %s", file_path, name);
    if (H5Tget_class(type) != H5T_INTEGER || H5Sget_simple_extent_npoints(space) != 1)
        die("shard %s: attribute %s is not an integer", file_path, name);
    int64_t v = 0;
    if (H5Aread(a, H5T_NATIVE_INT64, &v) < 0) die("shard %s: cannot read attribute %s", file_path, name);
    H5Sclose(space);
    H5Tclose(type);
    H5Aclose(a);
    return v;
}

/* Open a 1-D unsigned-integer dataset and return it with its length and element size;
 * die when it is absent or of another shape or type. */
static hid_t open_1d(hid_t file, const char *file_path, const char *name, int64_t *len, size_t *width)
{
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0) die("shard %s has no /%s dataset", file_path, name);
    hid_t ds = H5Dopen2(file, name, H5P_DEFAULT);
    if (ds < 0) die("shard %s: /%s is not a dataset", file_path, name);
    hid_t space = H5Dget_space(ds), type = H5Dget_type(ds);
    if (space < 0 || type < 0) die("shard %s: cannot read /%s", file_path, name);
    hsize_t dims[1];
    if (H5Sget_simple_extent_ndims(space) != 1 || H5Sget_simple_extent_dims(space, dims, NULL) != 1)
        die("shard %s: /%s is not 1-D", file_path, name);
    if (H5Tget_class(type) != H5T_INTEGER || H5Tget_sign(type) != H5T_SGN_NONE)
        die("shard %s: /%s does not hold unsigned integers", file_path, name);
    *len = (int64_t)dims[0];
    *width = H5Tget_size(type);
    H5Tclose(type);
    H5Sclose(space);
    return ds;
}

typedef struct shard_meta {
    int64_t vocab, eot, num_tokens;
    char *tokenizer;
    size_t width;
} shard_meta;

/* Open and check one shard; on return sh->file and sh->tokens are open and sh->n set. */
static void open_shard(shard *sh, hid_t fapl, shard_meta *m)
{
    const char *p = sh->path;
    if (access(p, R_OK) != 0) die("cannot read shard %s: %s", p, strerror(errno));
    sh->file = H5Fopen(p, H5F_ACC_RDONLY, fapl);
    if (sh->file < 0) {
        /* HDF5 says only that the open failed; its signature tells a damaged file from a
         * file of another kind (an HDF5 file with a user block has it further on, but
         * such a file opens) */
        static const unsigned char sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
        unsigned char head[8] = {0};
        FILE *f = fopen(p, "rb");
        size_t got = f ? fread(head, 1, sizeof head, f) : 0;
        if (f) fclose(f);
        if (got == sizeof head && memcmp(head, sig, sizeof sig) == 0) {
            char why[256] = "";
            H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_error, why);
            die("shard %s is an HDF5 file that HDF5 cannot open (%s)", p, why[0] ? why : "no reason given");
        }
        die("shard %s is not an HDF5 file", p);
    }
    char *format = read_string_attr(sh->file, p, "format");
    if (!format) die("shard %s has no format attribute: not a deltamla token shard", p);
    if (strcmp(format, "deltamla-tokens") != 0)
        die("shard %s has format \"%s\", not \"deltamla-tokens\"", p, format);
    free(format);
    int64_t version = read_int_attr(sh->file, p, "version");
    if (version != 1) die("shard %s has format version %lld; this deltamla reads version 1", p, (long long)version);
    m->vocab = read_int_attr(sh->file, p, "vocab_size");
    m->eot = read_int_attr(sh->file, p, "eot_token");
    m->num_tokens = read_int_attr(sh->file, p, "num_tokens");
    int64_t num_docs = read_int_attr(sh->file, p, "num_docs");
    if (m->vocab < 1 || m->vocab > INT32_MAX) die("shard %s: vocab_size %lld is out of range", p, (long long)m->vocab);
    if (m->eot < -1 || m->eot >= m->vocab)
        die("shard %s: eot_token %lld is outside its vocab_size %lld", p, (long long)m->eot, (long long)m->vocab);
    if (m->num_tokens < 0 || num_docs < 0) die("shard %s: negative num_tokens or num_docs", p);
    m->tokenizer = read_string_attr(sh->file, p, "tokenizer");
    if (!m->tokenizer) die("shard %s has no tokenizer attribute", p);

    int64_t len, docs;
    size_t w;
    sh->tokens = open_1d(sh->file, p, "tokens", &len, &m->width);
    if (m->width != 2 && m->width != 4)
        die("shard %s: /tokens holds %zu-byte integers, not uint16 or uint32", p, m->width);
    if (m->width != (m->vocab <= 65536 ? 2u : 4u))
        die("shard %s: /tokens is uint%zu but vocab_size %lld calls for uint%d", p, 8 * m->width, (long long)m->vocab,
            m->vocab <= 65536 ? 16 : 32);
    if (len != m->num_tokens)
        die("shard %s: /tokens holds %lld tokens but num_tokens says %lld", p, (long long)len, (long long)m->num_tokens);
    hid_t docs_ds = open_1d(sh->file, p, "doc_offsets", &docs, &w);
    H5Dclose(docs_ds);
    if (docs != num_docs)
        die("shard %s: /doc_offsets holds %lld entries but num_docs says %lld", p, (long long)docs, (long long)num_docs);
    sh->space = H5Dget_space(sh->tokens);
    if (sh->space < 0) die("shard %s: cannot read /tokens", p);
    sh->n = len;
}

data_source *data_shards_open(const char *path, int T, uint64_t seed, double val_fraction, enum data_split split,
                              int rank, int nranks)
{
    fatal_check(T >= 1 && nranks >= 1 && rank >= 0 && rank < nranks);
    int mpi_up = 0;
    MPI_Initialized(&mpi_up);
    if (!mpi_up) die("internal: token shards are read through MPI-IO, and MPI is not initialised");
    int thread_level = MPI_THREAD_SINGLE;
    MPI_Query_thread(&thread_level);

    int n_files;
    char **files = list_shards(path, &n_files);
    shards_impl *d = xcalloc(1, sizeof *d);
    d->shards = xcalloc((size_t)n_files, sizeof *d->shards);
    d->n_shards = n_files;
    shard_meta first = {0};
    int64_t total = 0;

    h5_enter();
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    if (fapl < 0 || H5Pset_fapl_mpio(fapl, MPI_COMM_SELF, MPI_INFO_NULL) < 0)
        die("internal: cannot set up HDF5's MPI-IO driver");
    for (int i = 0; i < n_files; i++) {
        shard *sh = &d->shards[i];
        sh->path = files[i];
        shard_meta m;
        open_shard(sh, fapl, &m);
        if (i == 0) {
            first = m;
        } else {
            const char *p0 = d->shards[0].path;
            if (m.vocab != first.vocab)
                die("shard %s has vocab_size %lld but %s has %lld", sh->path, (long long)m.vocab, p0,
                    (long long)first.vocab);
            if (m.eot != first.eot)
                die("shard %s has eot_token %lld but %s has %lld", sh->path, (long long)m.eot, p0, (long long)first.eot);
            if (strcmp(m.tokenizer, first.tokenizer) != 0)
                die("shard %s has a different tokenizer than %s", sh->path, p0);
            free(m.tokenizer);
        }
        sh->start = total;
        total += sh->n;
    }
    H5Pclose(fapl);
    d->dxpl = H5Pcreate(H5P_DATASET_XFER);
    if (d->dxpl < 0 || H5Pset_dxpl_mpio(d->dxpl, H5FD_MPIO_INDEPENDENT) < 0)
        die("internal: cannot set up HDF5's MPI-IO transfers");
    h5_leave();
    free(files);

    if (total < (int64_t)T + 1)
        die("data set %s holds %lld tokens, fewer than one row of --block_size %d + 1", path, (long long)total, T);
    int64_t rows = data_rows(total, T), train = data_train_rows(rows, val_fraction);
    if (train < 1) die("data set %s: --val_fraction %g leaves no training rows", path, val_fraction);
    if (split == DATA_VAL && rows - train < 1)
        die("data set %s has %lld rows of %d+1 tokens: too few to hold out --val_fraction %g", path, (long long)rows, T,
            val_fraction);

    d->mem_type = first.width == 2 ? H5T_NATIVE_UINT16 : H5T_NATIVE_UINT32;
    d->width = (int)first.width;
    d->T = T;
    d->seed = seed;
    d->first_row = split == DATA_TRAIN ? 0 : train;
    d->num_rows = split == DATA_TRAIN ? train : rows - train;
    d->vocab = (int32_t)first.vocab;
    d->rank = rank;
    d->nranks = nranks;
    d->scratch = xmalloc(((size_t)T + 1) * first.width);

    data_source *s = xcalloc(1, sizeof *s);
    s->kind = "shards";
    s->num_tokens = total;
    s->num_rows = d->num_rows;
    s->max_token = d->vocab - 1;
    s->vocab_size = d->vocab;
    s->eot_token = (int32_t)first.eot;
    s->tokenizer_json = first.tokenizer;
    s->rank = rank;
    s->nranks = nranks;
    s->next_batch = shards_next_batch;
    s->close = shards_close;
    s->impl = d;

    d->threaded = thread_level == MPI_THREAD_MULTIPLE;
    if (d->threaded) {
        pthread_mutex_init(&d->mu, NULL);
        pthread_cond_init(&d->work_cv, NULL);
        pthread_cond_init(&d->done_cv, NULL);
        int rc = pthread_create(&d->thread, NULL, prefetch_main, d);
        if (rc != 0) die("cannot start the data loader's prefetch thread: %s", strerror(rc));
    }
    return s;
}
