/* safetensors_read.c: the reading half of safetensors.h, for `deltamla ckpt import` and
 * the tests. A safetensors file is a u64 little-endian header length N, N bytes of JSON
 * {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
 * the raw little-endian data, offsets counted from the end of the header.
 *
 * The file may come from anyone (PyTorch's safetensors package, numpy, a hand-written
 * script), so st_open trusts nothing: the header is parsed by the strict JSON reader
 * of json.h and every entry is checked against the file's real size before a caller sees
 * it, which turns a truncated download or a foreign file into one line naming the
 * problem instead of a crash or silently wrong weights. Tensor data is read on demand,
 * so opening a multi-gigabyte file costs only its header.
 */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "json.h"
#include "util.h"

/* The reference implementation refuses headers above 100 MB; so do we, so that a
 * corrupt length field is reported instead of attempting a huge allocation. */
#define ST_MAX_HEADER (100u << 20)
#define ST_MAX_DIMS 8

struct st_file {
    char *path;
    FILE *fp;
    uint64_t data_start; /* 8 + header length */
    uint64_t data_size;  /* bytes after the header */
    st_info *items;
    int count, cap;
    char **meta;         /* key, value, key, value, ... */
    int n_meta;
};

/* ---- header errors ---- */

/* What a message about the header names: the file, and the header's length so that an
 * offset near the end reads as truncation. */
typedef struct header_ctx {
    const char *path;
    size_t len;
} header_ctx;

static void bad_header(const header_ctx *h, size_t at, const char *what) __attribute__((noreturn));
static void bad_header(const header_ctx *h, size_t at, const char *what)
{
    die("%s: malformed safetensors header: %s at byte %zu of %zu", h->path, what, at, h->len);
}

/* A non-negative integer without sign, fraction or exponent: the only numbers a
 * safetensors header holds (shapes and offsets). json_u64 reads the text exactly, so
 * offsets above 2^53 are not rounded. */
static uint64_t header_u64(const header_ctx *h, const json_value *v)
{
    uint64_t x = 0;
    json_int_status st = json_u64(v, &x);
    if (st == JSON_INT_OK) return x;
    if (st == JSON_INT_RANGE) bad_header(h, v->offset, "integer out of range");
    if (v->type == JSON_TYPE_NUMBER && v->text[0] != '-')
        bad_header(h, v->offset, "expected an integer, found a fraction or exponent");
    bad_header(h, v->offset, "expected a non-negative integer");
}

static char *copy_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *c = xmalloc(n);
    memcpy(c, s, n);
    return c;
}

/* ---- dtypes ---- */

typedef struct dtype_row {
    const char *name;
    int bytes;
} dtype_row;

/* Every fixed-width dtype of the format. Sub-byte ones (F4, F6) are left out: a
 * language model's weights never use them, and they would need packed reads. */
static const dtype_row dtypes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
    {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
    {"F32", 4},  {"F64", 8}, {"I64", 8}, {"U64", 8},
};

static int dtype_bytes(const char *name)
{
    for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
        if (strcmp(dtypes[i].name, name) == 0) return dtypes[i].bytes;
    return 0;
}

int st_is_float(const st_info *t)
{
    return strcmp(t->dtype, "F32") == 0 || strcmp(t->dtype, "BF16") == 0 || strcmp(t->dtype, "F16") == 0 ||
           strcmp(t->dtype, "F64") == 0;
}

/* ---- header entries ---- */

static void read_metadata(st_file *f, const header_ctx *h, const json_value *v)
{
    if (v->type != JSON_TYPE_OBJECT) bad_header(h, v->offset, "__metadata__ must be an object");
    for (size_t i = 0; i < v->count; i++) {
        const json_member *m = &v->members[i];
        if (m->value.type != JSON_TYPE_STRING) bad_header(h, m->value.offset, "__metadata__ values must be strings");
        f->meta = realloc(f->meta, (size_t)(f->n_meta + 1) * 2 * sizeof *f->meta);
        if (!f->meta) die("out of host memory reading %s", f->path);
        f->meta[2 * f->n_meta] = copy_string(m->key);
        f->meta[2 * f->n_meta + 1] = copy_string(m->value.text);
        f->n_meta++;
    }
}

/* One tensor entry, an object; keys other than dtype, shape and data_offsets are
 * allowed and ignored, as the reference implementation does. */
static void read_entry(st_file *f, const header_ctx *h, const char *key, const json_value *v)
{
    if (f->count == f->cap) {
        f->cap = f->cap ? 2 * f->cap : 64;
        st_info *n = realloc(f->items, (size_t)f->cap * sizeof *n);
        if (!n) die("out of host memory reading %s", f->path);
        f->items = n;
    }
    st_info *t = &f->items[f->count];
    memset(t, 0, sizeof *t);
    const char *name = key;
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    for (size_t i = 0; i < v->count; i++) {
        const json_member *m = &v->members[i];
        const json_value *x = &m->value;
        if (strcmp(m->key, "dtype") == 0) {
            if (x->type != JSON_TYPE_STRING) bad_header(h, x->offset, "expected '\"'");
            if (!dtype_bytes(x->text))
                die("%s: tensor %s has dtype '%s', which safetensors does not define", f->path, name, x->text);
            snprintf(t->dtype, sizeof t->dtype, "%s", x->text);
            have_dtype = 1;
        } else if (strcmp(m->key, "shape") == 0) {
            if (x->type != JSON_TYPE_ARRAY) bad_header(h, x->offset, "expected '['");
            if (x->count > ST_MAX_DIMS) die("%s: tensor %s has more than %d dimensions", f->path, name, ST_MAX_DIMS);
            t->ndim = (int)x->count;
            for (size_t d = 0; d < x->count; d++) {
                uint64_t s = header_u64(h, &x->items[d]);
                if (s > (uint64_t)INT64_MAX) bad_header(h, x->items[d].offset, "dimension out of range");
                t->shape[d] = (int64_t)s;
            }
            have_shape = 1;
        } else if (strcmp(m->key, "data_offsets") == 0) {
            if (x->type != JSON_TYPE_ARRAY || x->count != 2)
                bad_header(h, x->offset, "data_offsets must be an array of two integers");
            t->begin = header_u64(h, &x->items[0]);
            t->end = header_u64(h, &x->items[1]);
            have_offsets = 1;
        }
    }
    if (!have_dtype || !have_shape || !have_offsets)
        die("%s: tensor %s lacks %s in the header", f->path, name,
            !have_dtype ? "\"dtype\"" : !have_shape ? "\"shape\"" : "\"data_offsets\"");

    /* numel, refusing a product that overflows: no file holds that many elements */
    uint64_t numel = 1;
    int zero = 0, overflow = 0;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t s = (uint64_t)t->shape[d];
        if (s == 0) zero = 1;
        else if (numel > UINT64_MAX / s) overflow = 1;
        else numel *= s;
    }
    if (zero) numel = 0;
    else if (overflow) die("%s: tensor %s has a shape too large for any file", f->path, name);
    uint64_t bytes = (uint64_t)dtype_bytes(t->dtype);
    if (t->begin > t->end || t->end > f->data_size)
        die("%s: tensor %s has data_offsets [%llu, %llu] outside the %llu data bytes of the file (truncated?)",
            f->path, name, (unsigned long long)t->begin, (unsigned long long)t->end,
            (unsigned long long)f->data_size);
    if (numel > f->data_size || numel * bytes != t->end - t->begin)
        die("%s: tensor %s has %llu data bytes, but its shape holds %llu %s elements of %llu bytes", f->path,
            name, (unsigned long long)(t->end - t->begin), (unsigned long long)numel, t->dtype,
            (unsigned long long)bytes);
    t->numel = (int64_t)numel;
    for (int i = 0; i < f->count; i++)
        if (strcmp(f->items[i].name, name) == 0) die("%s: tensor %s appears twice in the header", f->path, name);
    t->name = copy_string(name);
    f->count++;
}

static int by_begin(const void *a, const void *b)
{
    const st_info *x = *(const st_info *const *)a, *y = *(const st_info *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Two tensors sharing bytes would let a write to one show up in the other; the format
 * forbids it, and a file that does it is corrupt or crafted. */
static void check_overlaps(const st_file *f)
{
    if (f->count < 2) return;
    const st_info **order = xmalloc((size_t)f->count * sizeof *order);
    for (int i = 0; i < f->count; i++) order[i] = &f->items[i];
    qsort(order, (size_t)f->count, sizeof *order, by_begin);
    const st_info *prev = NULL;
    for (int i = 0; i < f->count; i++) {
        const st_info *t = order[i];
        if (t->begin == t->end) continue;
        if (prev && t->begin < prev->end)
            die("%s: tensors %s and %s overlap in the data section", f->path, prev->name, t->name);
        prev = t;
    }
    free(order);
}

st_file *st_open(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) die("cannot open %s: %s", path, strerror(errno));
    if (fseeko(fp, 0, SEEK_END) != 0) die("cannot read %s: %s", path, strerror(errno));
    off_t size = ftello(fp);
    rewind(fp);
    unsigned char le[8];
    if (size < 8 || fread(le, 1, 8, fp) != 8)
        die("%s is not a safetensors file (%lld bytes, shorter than the 8-byte header length)", path,
            (long long)size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | le[i];
    if (n > (uint64_t)size - 8)
        die("%s is not a safetensors file or is truncated: its header length %llu exceeds the file's %lld bytes",
            path, (unsigned long long)n, (long long)size);
    if (n > ST_MAX_HEADER)
        die("%s: safetensors header of %llu bytes is larger than the format's limit of %u", path,
            (unsigned long long)n, ST_MAX_HEADER);

    st_file *f = xcalloc(1, sizeof *f);
    f->path = copy_string(path);
    f->fp = fp;
    f->data_start = 8 + n;
    f->data_size = (uint64_t)size - 8 - n;

    char *hdr = xmalloc((size_t)n + 1);
    if (fread(hdr, 1, (size_t)n, fp) != (size_t)n) die("cannot read the header of %s: %s", path, strerror(errno));
    hdr[n] = '\0';
    header_ctx h = {path, (size_t)n};
    /* the parser reports a NUL byte at its offset, and allows the spaces that writers
     * pad the header with to align the data */
    json_error err;
    json_value *root = json_parse(hdr, (size_t)n, 0, &err);
    if (!root) bad_header(&h, err.offset, err.message);
    if (root->type != JSON_TYPE_OBJECT) bad_header(&h, root->offset, "expected '{'");
    int have_meta = 0;
    for (size_t i = 0; i < root->count; i++) {
        const json_member *m = &root->members[i];
        if (strcmp(m->key, "__metadata__") == 0) {
            if (have_meta) bad_header(&h, m->key_offset, "__metadata__ appears twice");
            have_meta = 1;
            read_metadata(f, &h, &m->value);
        } else {
            if (m->value.type != JSON_TYPE_OBJECT) bad_header(&h, m->value.offset, "a tensor entry must be an object");
            read_entry(f, &h, m->key, &m->value);
        }
    }
    json_free(root);
    free(hdr);
    check_overlaps(f);
    return f;
}

void st_close(st_file *f)
{
    if (!f) return;
    fclose(f->fp);
    for (int i = 0; i < f->count; i++) free((char *)f->items[i].name);
    for (int i = 0; i < 2 * f->n_meta; i++) free(f->meta[i]);
    free(f->meta);
    free(f->items);
    free(f->path);
    free(f);
}

int st_count(const st_file *f) { return f->count; }

const st_info *st_at(const st_file *f, int i)
{
    fatal_check(i >= 0 && i < f->count);
    return &f->items[i];
}

const st_info *st_find(const st_file *f, const char *name)
{
    for (int i = 0; i < f->count; i++)
        if (strcmp(f->items[i].name, name) == 0) return &f->items[i];
    return NULL;
}

const char *st_metadata(const st_file *f, const char *key)
{
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[2 * i], key) == 0) return f->meta[2 * i + 1];
    return NULL;
}

/* ---- conversion to float ---- */

static float from_bits(uint32_t bits)
{
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: man x 2^-24 is exact in float */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return from_bits(sign | 0x7f800000u | (man << 13));
    return from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

/* Bytes are assembled explicitly rather than copied, so the result is right on a host
 * of either byte order (the format is little-endian). */
static void convert(const st_info *t, const unsigned char *src, float *dst, size_t n)
{
    if (strcmp(t->dtype, "F32") == 0) {
        for (size_t i = 0; i < n; i++, src += 4)
            dst[i] = from_bits((uint32_t)src[0] | (uint32_t)src[1] << 8 | (uint32_t)src[2] << 16 |
                               (uint32_t)src[3] << 24);
    } else if (strcmp(t->dtype, "BF16") == 0) {
        for (size_t i = 0; i < n; i++, src += 2) dst[i] = from_bits(((uint32_t)src[0] | (uint32_t)src[1] << 8) << 16);
    } else if (strcmp(t->dtype, "F16") == 0) {
        for (size_t i = 0; i < n; i++, src += 2) dst[i] = half_to_float((uint16_t)(src[0] | src[1] << 8));
    } else {
        for (size_t i = 0; i < n; i++, src += 8) {
            uint64_t bits = 0;
            for (int b = 7; b >= 0; b--) bits = (bits << 8) | src[b];
            double v;
            memcpy(&v, &bits, sizeof v);
            dst[i] = (float)v;
        }
    }
}

void st_read_f32(st_file *f, const st_info *t, float *out)
{
    if (!st_is_float(t))
        die("%s: tensor %s has dtype %s; a floating-point tensor (F32, BF16, F16 or F64) is needed", f->path,
            t->name, t->dtype);
    size_t esize = (size_t)dtype_bytes(t->dtype);
    if (fseeko(f->fp, (off_t)(f->data_start + t->begin), SEEK_SET) != 0)
        die("cannot read tensor %s of %s: %s", t->name, f->path, strerror(errno));
    /* in pieces, so a conversion needs only a small staging buffer */
    size_t chunk = (size_t)1 << 20, done = 0, total = (size_t)t->numel;
    unsigned char *buf = xmalloc(chunk * esize);
    while (done < total) {
        size_t n = total - done < chunk ? total - done : chunk;
        if (fread(buf, esize, n, f->fp) != n)
            die("cannot read tensor %s of %s: %s", t->name, f->path,
                ferror(f->fp) ? strerror(errno) : "the file ended early");
        convert(t, buf, out + done, n);
        done += n;
    }
    free(buf);
}
