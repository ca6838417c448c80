/* shards.c: writing and reading token shards (the format is documented in shards.h).
 *
 * Every access goes through HDF5's MPI-IO driver. The writer is collective: all ranks
 * create the file, write the same attributes, and each writes its own hyperslab of
 * /tokens and /doc_offsets in one collective transfer, so a shard's bytes do not depend
 * on how its tokens were spread over the ranks. The reader opens a shard on any
 * communicator and reads ranges independently.
 *
 * HDF5's own error stack printing is switched off here: a failing call ends in die()
 * with one line naming the file and what was being done.
 */
#define _POSIX_C_SOURCE 200809L
#include "shards.h"

#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

_Static_assert(sizeof(hid_t) == sizeof(int64_t), "shard_reader keeps HDF5 ids as int64_t");

int shard_token_bytes(int64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

void shard_file_name(char *buf, size_t size, int64_t index, int64_t num_shards)
{
    int width = 5;
    for (int64_t n = 100000; n < num_shards && width < 18; n *= 10) width++;
    snprintf(buf, size, "shard_%0*" PRId64 ".h5", width, index);
}

static void quiet_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

#define H5_TRY(call, path, what)                                                   \
    do {                                                                           \
        if ((call) < 0) die("%s: HDF5 error while %s", (path), (what));           \
    } while (0)

static void write_scalar_attr(hid_t loc, const char *path, const char *name, hid_t file_type, hid_t mem_type,
                              const void *value)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0) die("%s: cannot create attribute %s", path, name);
    H5_TRY(H5Awrite(a, mem_type, value), path, "writing an attribute");
    H5Aclose(a);
    H5Sclose(space);
}

static hid_t vlen_utf8(void)
{
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, H5T_VARIABLE);
    H5Tset_cset(t, H5T_CSET_UTF8);
    return t;
}

static void write_string_attr(hid_t loc, const char *path, const char *name, const char *value)
{
    hid_t t = vlen_utf8();
    write_scalar_attr(loc, path, name, t, t, &value);
    H5Tclose(t);
}

/* One collective write of the rank's [start, start + count) of a 1-D dataset. */
static void write_part(hid_t dset, const char *path, hid_t mem_type, uint64_t start, uint64_t count,
                       const void *data)
{
    hid_t fspace = H5Dget_space(dset);
    hsize_t one = 1, st = start, cnt = count;
    hid_t mspace = H5Screate_simple(1, count ? &cnt : &one, NULL);
    static const uint64_t nothing = 0;
    if (count) {
        H5_TRY(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, &st, NULL, &cnt, NULL), path, "selecting a range");
    } else { /* a rank with no part still joins the collective transfer */
        H5Sselect_none(fspace);
        H5Sselect_none(mspace);
        data = &nothing;
    }
    hid_t dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE);
    if (H5Dwrite(dset, mem_type, mspace, fspace, dxpl, data) < 0)
        die("%s: cannot write the shard's data (disk full or no permission?)", path);
    H5Pclose(dxpl);
    H5Sclose(mspace);
    H5Sclose(fspace);
}

void shard_write(const char *path, MPI_Comm comm, const shard_meta *meta, const shard_part *part)
{
    quiet_hdf5();
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (f < 0) die("cannot create shard %s (does the directory exist and is it writable?)", path);

    int wide = shard_token_bytes(meta->vocab_size) == 4;
    hid_t file_type = wide ? H5T_STD_U32LE : H5T_STD_U16LE;
    hid_t mem_type = wide ? H5T_NATIVE_UINT32 : H5T_NATIVE_UINT16;
    hsize_t n = meta->num_tokens, chunk = meta->num_tokens < SHARD_CHUNK_TOKENS ? meta->num_tokens : SHARD_CHUNK_TOKENS;
    fatal_check(n > 0);
    hid_t space = H5Screate_simple(1, &n, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, &chunk);
    /* nothing reads unwritten tokens: skip HDF5's fill pass over the whole dataset */
    H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
    /* no modification times: the same tokens give the same file, byte for byte */
    H5Pset_obj_track_times(dcpl, 0);
    hid_t tokens = H5Dcreate2(f, "tokens", file_type, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (tokens < 0) die("%s: cannot create /tokens", path);
    H5Pclose(dcpl);
    H5Sclose(space);
    write_part(tokens, path, mem_type, part->token_start, part->token_count, part->tokens);
    H5Dclose(tokens);

    hsize_t nd = meta->num_docs;
    space = H5Screate_simple(1, &nd, NULL);
    dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_obj_track_times(dcpl, 0);
    hid_t docs = H5Dcreate2(f, "doc_offsets", H5T_STD_U64LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (docs < 0) die("%s: cannot create /doc_offsets", path);
    H5Pclose(dcpl);
    H5Sclose(space);
    /* an empty dataset has no storage to write to: HDF5 fails even an empty transfer */
    if (meta->num_docs) write_part(docs, path, H5T_NATIVE_UINT64, part->doc_start, part->doc_count, part->doc_offsets);
    H5Dclose(docs);

    int version = SHARD_VERSION;
    write_string_attr(f, path, "format", SHARD_FORMAT);
    write_scalar_attr(f, path, "version", H5T_STD_I32LE, H5T_NATIVE_INT32, &version);
    write_scalar_attr(f, path, "vocab_size", H5T_STD_I64LE, H5T_NATIVE_INT64, &meta->vocab_size);
    write_scalar_attr(f, path, "eot_token", H5T_STD_I64LE, H5T_NATIVE_INT64, &meta->eot_token);
    write_scalar_attr(f, path, "num_tokens", H5T_STD_U64LE, H5T_NATIVE_UINT64, &meta->num_tokens);
    write_scalar_attr(f, path, "num_docs", H5T_STD_U64LE, H5T_NATIVE_UINT64, &meta->num_docs);
    write_string_attr(f, path, "tokenizer", meta->tokenizer_json);
    write_scalar_attr(f, path, "shard_index", H5T_STD_I64LE, H5T_NATIVE_INT64, &meta->shard_index);
    write_scalar_attr(f, path, "num_shards", H5T_STD_I64LE, H5T_NATIVE_INT64, &meta->num_shards);
    write_scalar_attr(f, path, "stream_offset", H5T_STD_U64LE, H5T_NATIVE_UINT64, &meta->stream_offset);
    if (H5Fclose(f) < 0) die("%s: cannot finish writing the shard (disk full?)", path);
}

/* ---- reading ---- */

static int read_attr(hid_t f, const char *name, hid_t mem_type, void *value)
{
    if (H5Aexists(f, name) <= 0) return -1;
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    if (a < 0) return -1;
    hid_t space = H5Aget_space(a);
    int ok = H5Sget_simple_extent_type(space) == H5S_SCALAR && H5Aread(a, mem_type, value) >= 0;
    H5Sclose(space);
    H5Aclose(a);
    return ok ? 0 : -1;
}

/* A string attribute, fixed or variable length, as a malloc'd string; NULL if absent. */
static char *read_string_attr(hid_t f, const char *name)
{
    if (H5Aexists(f, name) <= 0) return NULL;
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    if (a < 0) return NULL;
    hid_t ft = H5Aget_type(a);
    char *out = NULL;
    if (H5Tget_class(ft) == H5T_STRING) {
        if (H5Tis_variable_str(ft) > 0) {
            hid_t mt = vlen_utf8();
            char *v = NULL;
            if (H5Aread(a, mt, &v) >= 0 && v) {
                out = xmalloc(strlen(v) + 1);
                strcpy(out, v);
                H5free_memory(v);
            }
            H5Tclose(mt);
        } else {
            size_t n = H5Tget_size(ft);
            hid_t mt = H5Tcopy(H5T_C_S1);
            H5Tset_size(mt, n + 1);
            out = xcalloc(n + 2, 1);
            if (H5Aread(a, mt, out) < 0) {
                free(out);
                out = NULL;
            }
            H5Tclose(mt);
        }
    }
    H5Tclose(ft);
    H5Aclose(a);
    return out;
}

static uint64_t dataset_length(hid_t d, const char *path, const char *name)
{
    hid_t space = H5Dget_space(d);
    hsize_t n = 0;
    if (H5Sget_simple_extent_ndims(space) != 1) die("%s: /%s is not 1-D, so this is not a deltamla token shard", path, name);
    H5Sget_simple_extent_dims(space, &n, NULL);
    H5Sclose(space);
    return n;
}

void shard_open(shard_reader *r, const char *path, MPI_Comm comm)
{
    quiet_hdf5();
    memset(r, 0, sizeof *r);
    FILE *probe = fopen(path, "rb");
    if (!probe) die("cannot open shard %s: %s", path, strerror(errno));
    fclose(probe);
    if (H5Fis_hdf5(path) <= 0) die("%s is not an HDF5 file, so not a deltamla token shard", path);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    H5Pclose(fapl);
    if (f < 0) die("cannot open shard %s (corrupt or truncated HDF5 file)", path);
    r->hid_file = f;

    char *format = read_string_attr(f, "format");
    if (!format || strcmp(format, SHARD_FORMAT) != 0)
        die("%s is not a deltamla token shard (attribute format is '%s', expected '%s')", path,
            format ? format : "(missing)", SHARD_FORMAT);
    free(format);
    if (read_attr(f, "version", H5T_NATIVE_INT, &r->version) < 0) die("%s: the shard has no version attribute", path);
    if (r->version != SHARD_VERSION)
        die("%s: shard format version %d, this deltamla reads version %d", path, r->version, SHARD_VERSION);
    shard_meta *m = &r->meta;
    if (read_attr(f, "vocab_size", H5T_NATIVE_INT64, &m->vocab_size) < 0 ||
        read_attr(f, "eot_token", H5T_NATIVE_INT64, &m->eot_token) < 0 ||
        read_attr(f, "num_tokens", H5T_NATIVE_UINT64, &m->num_tokens) < 0 ||
        read_attr(f, "num_docs", H5T_NATIVE_UINT64, &m->num_docs) < 0)
        die("%s: the shard lacks one of the attributes vocab_size, eot_token, num_tokens, num_docs", path);
    if (m->vocab_size < 1 || m->eot_token < 0 || m->eot_token >= m->vocab_size)
        die("%s: eot_token %" PRId64 " is not inside vocab_size %" PRId64, path, m->eot_token, m->vocab_size);
    m->tokenizer_json = read_string_attr(f, "tokenizer");
    if (!m->tokenizer_json) die("%s: the shard has no tokenizer attribute", path);
    /* optional: written by deltamla prep, absent from shards of other writers */
    m->shard_index = m->num_shards = -1;
    read_attr(f, "shard_index", H5T_NATIVE_INT64, &m->shard_index);
    read_attr(f, "num_shards", H5T_NATIVE_INT64, &m->num_shards);
    read_attr(f, "stream_offset", H5T_NATIVE_UINT64, &m->stream_offset);

    if (H5Lexists(f, "tokens", H5P_DEFAULT) <= 0 || H5Lexists(f, "doc_offsets", H5P_DEFAULT) <= 0)
        die("%s: the shard lacks /tokens or /doc_offsets", path);
    hid_t d = H5Dopen2(f, "tokens", H5P_DEFAULT);
    if (d < 0) die("%s: cannot open /tokens", path);
    r->hid_tokens = d;
    hid_t t = H5Dget_type(d);
    if (H5Tget_class(t) != H5T_INTEGER || H5Tget_sign(t) != H5T_SGN_NONE || (H5Tget_size(t) != 2 && H5Tget_size(t) != 4))
        die("%s: /tokens is not uint16 or uint32", path);
    r->token_bytes = (int)H5Tget_size(t);
    H5Tclose(t);
    if (r->token_bytes != shard_token_bytes(m->vocab_size))
        die("%s: /tokens stores %d-byte tokens, but vocab_size %" PRId64 " calls for %d", path, r->token_bytes,
            m->vocab_size, shard_token_bytes(m->vocab_size));
    uint64_t n = dataset_length(d, path, "tokens");
    if (n != m->num_tokens)
        die("%s: /tokens holds %" PRIu64 " tokens but num_tokens says %" PRIu64 " (truncated?)", path, n, m->num_tokens);
    hid_t dd = H5Dopen2(f, "doc_offsets", H5P_DEFAULT);
    if (dd < 0) die("%s: cannot open /doc_offsets", path);
    uint64_t nd = dataset_length(dd, path, "doc_offsets");
    H5Dclose(dd);
    if (nd != m->num_docs)
        die("%s: /doc_offsets holds %" PRIu64 " entries but num_docs says %" PRIu64, path, nd, m->num_docs);
}

void shard_read_tokens(shard_reader *r, uint64_t start, uint64_t count, int32_t *out)
{
    if (start > r->meta.num_tokens || count > r->meta.num_tokens - start)
        die("shard read of tokens [%" PRIu64 ", %" PRIu64 ") is past its end (%" PRIu64 " tokens)", start,
            start + count, r->meta.num_tokens);
    if (!count) return;
    hid_t fspace = H5Dget_space((hid_t)r->hid_tokens);
    hsize_t st = start, cnt = count;
    H5Sselect_hyperslab(fspace, H5S_SELECT_SET, &st, NULL, &cnt, NULL);
    hid_t mspace = H5Screate_simple(1, &cnt, NULL);
    /* HDF5 converts uint16/uint32 to int32 on the way (vocabularies stay below 2^31) */
    if (H5Dread((hid_t)r->hid_tokens, H5T_NATIVE_INT32, mspace, fspace, H5P_DEFAULT, out) < 0)
        die("cannot read tokens [%" PRIu64 ", %" PRIu64 ") of a shard (file damaged?)", start, start + count);
    H5Sclose(mspace);
    H5Sclose(fspace);
}

uint64_t *shard_read_doc_offsets(shard_reader *r)
{
    uint64_t *out = xmalloc((r->meta.num_docs + 1) * sizeof *out);
    if (!r->meta.num_docs) return out;
    hid_t d = H5Dopen2((hid_t)r->hid_file, "doc_offsets", H5P_DEFAULT);
    if (d < 0 || H5Dread(d, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0)
        die("cannot read /doc_offsets of a shard (file damaged?)");
    H5Dclose(d);
    return out;
}

void shard_close(shard_reader *r)
{
    if (r->hid_tokens > 0) H5Dclose((hid_t)r->hid_tokens);
    if (r->hid_file > 0) H5Fclose((hid_t)r->hid_file);
    free((char *)r->meta.tokenizer_json);
    memset(r, 0, sizeof *r);
}

/* ---- data set directories ---- */

/* The shard number of a name "shard_<digits>.h5", or -1. */
static int64_t shard_number(const char *name)
{
    if (strncmp(name, "shard_", 6) != 0) return -1;
    const char *p = name + 6;
    int64_t v = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 18; p++, digits++) v = v * 10 + (*p - '0');
    return digits && strcmp(p, ".h5") == 0 ? v : -1;
}

static int cmp_shard_path(const void *x, const void *y)
{
    const char *a = strrchr(*(char *const *)x, '/'), *b = strrchr(*(char *const *)y, '/');
    int64_t na = shard_number(a + 1), nb = shard_number(b + 1);
    if (na != nb) return na < nb ? -1 : 1;
    return strcmp(a, b);
}

int shards_list(const char *dir, char ***paths)
{
    DIR *d = opendir(dir);
    if (!d) die("cannot read data set directory %s: %s", dir, strerror(errno));
    int n = 0, cap = 16;
    char **out = xmalloc((size_t)cap * sizeof *out);
    struct dirent *e;
    while ((e = readdir(d))) {
        if (shard_number(e->d_name) < 0) continue;
        if (n == cap) {
            out = realloc(out, (size_t)(cap *= 2) * sizeof *out);
            if (!out) die("out of host memory listing %s", dir);
        }
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        out[n] = xmalloc(len);
        snprintf(out[n], len, "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    qsort(out, (size_t)n, sizeof *out, cmp_shard_path);
    *paths = out;
    return n;
}
