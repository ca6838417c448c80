/* safetensors_read.c: the reading half of safetensors.h, for `deltamla ckpt import` and
 * the tests. A safetensors file is a u64 little-endian header length N, N bytes of JSON
 * {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then
 * the raw little-endian data, offsets counted from the end of the header.
 *
 * The file may come from anyone (PyTorch's safetensors package, numpy, a hand-written
 * script), so st_open trusts nothing: the header is parsed by a small strict JSON
 * reader and every entry is checked against the file's real size before a caller sees
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

/* ---- a strict JSON reader for the header ---- */

typedef struct json_cursor {
    const char *s;  /* NUL-terminated copy of the header */
    size_t pos, len;
    const char *path;
} json_cursor;

static void bad_header(const json_cursor *j, const char *what) __attribute__((noreturn));
static void bad_header(const json_cursor *j, const char *what)
{
    die("%s: malformed safetensors header: %s at byte %zu of %zu", j->path, what, j->pos, j->len);
}

static void skip_ws(json_cursor *j)
{
    while (j->pos < j->len && (j->s[j->pos] == ' ' || j->s[j->pos] == '\t' || j->s[j->pos] == '\n' ||
                               j->s[j->pos] == '\r'))
        j->pos++;
}

static int peek(json_cursor *j)
{
    skip_ws(j);
    return j->pos < j->len ? (unsigned char)j->s[j->pos] : -1;
}

static void expect(json_cursor *j, char c)
{
    if (peek(j) != (unsigned char)c) {
        char what[32];
        snprintf(what, sizeof what, "expected '%c'", c);
        bad_header(j, what);
    }
    j->pos++;
}

/* Between the members of an object or array: 1 if another member follows, 0 once the
 * closing bracket is consumed. A comma must be followed by a member (JSON has no
 * trailing commas), which the member's own parser then insists on. */
static int more_members(json_cursor *j, char close, int *first)
{
    if (*first) {
        *first = 0;
        if (peek(j) != (unsigned char)close) return 1;
        j->pos++;
        return 0;
    }
    if (peek(j) == ',') {
        j->pos++;
        return 1;
    }
    expect(j, close);
    return 0;
}

static int hex_digit(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static unsigned read_hex4(json_cursor *j)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = j->pos < j->len ? hex_digit((unsigned char)j->s[j->pos]) : -1;
        if (h < 0) bad_header(j, "bad \\u escape");
        v = v * 16 + (unsigned)h;
        j->pos++;
    }
    return v;
}

static size_t put_utf8(char *out, unsigned cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* A JSON string, unescaped to UTF-8; malloc'd. Python's json.dumps writes non-ASCII
 * names as \u escapes (surrogate pairs above U+FFFF), so those are decoded. */
static char *parse_string(json_cursor *j)
{
    expect(j, '"');
    /* the unescaped text is never longer than the escaped one */
    char *out = xmalloc(j->len - j->pos + 1);
    size_t o = 0;
    for (;;) {
        if (j->pos >= j->len) bad_header(j, "unterminated string");
        unsigned char c = (unsigned char)j->s[j->pos++];
        if (c == '"') break;
        if (c < 0x20) bad_header(j, "control character in a string");
        if (c != '\\') {
            out[o++] = (char)c;
            continue;
        }
        if (j->pos >= j->len) bad_header(j, "unterminated string");
        c = (unsigned char)j->s[j->pos++];
        switch (c) {
        case '"': out[o++] = '"'; break;
        case '\\': out[o++] = '\\'; break;
        case '/': out[o++] = '/'; break;
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'n': out[o++] = '\n'; break;
        case 'r': out[o++] = '\r'; break;
        case 't': out[o++] = '\t'; break;
        case 'u': {
            unsigned cp = read_hex4(j);
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (j->pos + 1 >= j->len || j->s[j->pos] != '\\' || j->s[j->pos + 1] != 'u')
                    bad_header(j, "unpaired surrogate in a string");
                j->pos += 2;
                unsigned lo = read_hex4(j);
                if (lo < 0xdc00 || lo >= 0xe000) bad_header(j, "unpaired surrogate in a string");
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp < 0xe000) {
                bad_header(j, "unpaired surrogate in a string");
            }
            if (cp == 0) bad_header(j, "NUL character in a string");
            o += put_utf8(out + o, cp);
            break;
        }
        default: bad_header(j, "bad escape in a string");
        }
    }
    out[o] = '\0';
    return out;
}

/* A non-negative integer without sign, fraction or exponent: the only numbers a
 * safetensors header holds (shapes and offsets). */
static uint64_t parse_u64(json_cursor *j)
{
    skip_ws(j);
    if (j->pos >= j->len || j->s[j->pos] < '0' || j->s[j->pos] > '9')
        bad_header(j, "expected a non-negative integer");
    uint64_t v = 0;
    while (j->pos < j->len && j->s[j->pos] >= '0' && j->s[j->pos] <= '9') {
        uint64_t digit = (uint64_t)(j->s[j->pos] - '0');
        if (v > (UINT64_MAX - digit) / 10) bad_header(j, "integer out of range");
        v = v * 10 + digit;
        j->pos++;
    }
    if (j->pos < j->len && (j->s[j->pos] == '.' || j->s[j->pos] == 'e' || j->s[j->pos] == 'E'))
        bad_header(j, "expected an integer, found a fraction or exponent");
    return v;
}

static void skip_value(json_cursor *j, int depth);

static void skip_literal(json_cursor *j, const char *word)
{
    size_t n = strlen(word);
    if (j->len - j->pos < n || strncmp(j->s + j->pos, word, n) != 0) bad_header(j, "unexpected character");
    j->pos += n;
}

/* Entries may carry keys this reader does not use; their values are skipped, with a
 * depth limit so that a hostile header cannot exhaust the stack. */
static void skip_value(json_cursor *j, int depth)
{
    if (depth > 64) bad_header(j, "nesting too deep");
    int c = peek(j);
    if (c == '"') {
        free(parse_string(j));
    } else if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->pos++;
        if (peek(j) == close) {
            j->pos++;
            return;
        }
        for (;;) {
            if (close == '}') {
                free(parse_string(j));
                expect(j, ':');
            }
            skip_value(j, depth + 1);
            if (peek(j) == ',') {
                j->pos++;
                continue;
            }
            expect(j, close);
            return;
        }
    } else if (c == 't') {
        skip_literal(j, "true");
    } else if (c == 'f') {
        skip_literal(j, "false");
    } else if (c == 'n') {
        skip_literal(j, "null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        j->pos++;
        while (j->pos < j->len && strchr("0123456789.eE+-", j->s[j->pos])) j->pos++;
    } else {
        bad_header(j, "unexpected character");
    }
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

static void parse_metadata(st_file *f, json_cursor *j)
{
    expect(j, '{');
    if (peek(j) == '}') {
        j->pos++;
        return;
    }
    for (;;) {
        char *key = parse_string(j);
        expect(j, ':');
        if (peek(j) != '"') bad_header(j, "__metadata__ values must be strings");
        char *value = parse_string(j);
        f->meta = realloc(f->meta, (size_t)(f->n_meta + 1) * 2 * sizeof *f->meta);
        if (!f->meta) die("out of host memory reading %s", f->path);
        f->meta[2 * f->n_meta] = key;
        f->meta[2 * f->n_meta + 1] = value;
        f->n_meta++;
        if (peek(j) == ',') {
            j->pos++;
            continue;
        }
        expect(j, '}');
        return;
    }
}

static void parse_entry(st_file *f, json_cursor *j, char *name)
{
    if (f->count == f->cap) {
        f->cap = f->cap ? 2 * f->cap : 64;
        st_info *n = realloc(f->items, (size_t)f->cap * sizeof *n);
        if (!n) die("out of host memory reading %s", f->path);
        f->items = n;
    }
    st_info *t = &f->items[f->count];
    memset(t, 0, sizeof *t);
    t->name = name;
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    expect(j, '{');
    int first = 1;
    while (more_members(j, '}', &first)) {
        char *key = parse_string(j);
        expect(j, ':');
        if (strcmp(key, "dtype") == 0) {
            char *dt = parse_string(j);
            if (!dtype_bytes(dt)) die("%s: tensor %s has dtype '%s', which safetensors does not define", f->path, name, dt);
            snprintf(t->dtype, sizeof t->dtype, "%s", dt);
            free(dt);
            have_dtype = 1;
        } else if (strcmp(key, "shape") == 0) {
            expect(j, '[');
            t->ndim = 0;
            int first_dim = 1;
            while (more_members(j, ']', &first_dim)) {
                if (t->ndim == ST_MAX_DIMS) die("%s: tensor %s has more than %d dimensions", f->path, name, ST_MAX_DIMS);
                uint64_t v = parse_u64(j);
                if (v > (uint64_t)INT64_MAX) bad_header(j, "dimension out of range");
                t->shape[t->ndim++] = (int64_t)v;
            }
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            expect(j, '[');
            t->begin = parse_u64(j);
            expect(j, ',');
            t->end = parse_u64(j);
            expect(j, ']');
            have_offsets = 1;
        } else {
            skip_value(j, 1);
        }
        free(key);
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
    f->path = xmalloc(strlen(path) + 1);
    strcpy(f->path, path);
    f->fp = fp;
    f->data_start = 8 + n;
    f->data_size = (uint64_t)size - 8 - n;

    char *hdr = xmalloc((size_t)n + 1);
    if (fread(hdr, 1, (size_t)n, fp) != (size_t)n) die("cannot read the header of %s: %s", path, strerror(errno));
    hdr[n] = '\0';
    json_cursor j = {hdr, 0, (size_t)n, path};
    if (memchr(hdr, '\0', (size_t)n)) {
        j.pos = (size_t)((char *)memchr(hdr, '\0', (size_t)n) - hdr);
        bad_header(&j, "NUL byte");
    }
    expect(&j, '{');
    int have_meta = 0, first = 1;
    while (more_members(&j, '}', &first)) {
        char *name = parse_string(&j);
        expect(&j, ':');
        if (strcmp(name, "__metadata__") == 0) {
            if (have_meta) bad_header(&j, "__metadata__ appears twice");
            have_meta = 1;
            parse_metadata(f, &j);
            free(name);
        } else {
            if (peek(&j) != '{') bad_header(&j, "a tensor entry must be an object");
            parse_entry(f, &j, name); /* takes name */
        }
    }
    skip_ws(&j); /* writers pad the header with spaces to align the data */
    if (j.pos != j.len) bad_header(&j, "text after the header object");
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
