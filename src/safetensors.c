/* safetensors.c: see safetensors.h. */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

void st_add(st_writer *w, const char *name, st_dtype dtype, int ndim, const int64_t *shape, const void *data)
{
    if (w->count == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        st_tensor *n = realloc(w->items, (size_t)w->cap * sizeof *n);
        if (!n) die("out of host memory queueing tensors");
        w->items = n;
    }
    st_tensor *t = &w->items[w->count++];
    memset(t, 0, sizeof *t);
    fatal_check(strlen(name) < sizeof t->name && ndim >= 0 && ndim <= 4);
    strcpy(t->name, name);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->data = data;
}

void st_add_scalar_f32(st_writer *w, const char *name, const float *value)
{
    int64_t one = 1;
    st_add(w, name, ST_F32, 1, &one, value);
}

static size_t tensor_bytes(const st_tensor *t)
{
    size_t n = 4;
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

void st_write(st_writer *w, const char *path)
{
    /* header JSON */
    size_t cap = 256 + (size_t)w->count * 256, len = 0, off = 0;
    char *hdr = xmalloc(cap);
    len += (size_t)snprintf(hdr + len, cap - len, "{");
    for (int i = 0; i < w->count; i++) {
        const st_tensor *t = &w->items[i];
        size_t nb = tensor_bytes(t);
        len += (size_t)snprintf(hdr + len, cap - len, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "",
                                t->name, t->dtype == ST_F32 ? "F32" : "I32");
        for (int d = 0; d < t->ndim; d++)
            len += (size_t)snprintf(hdr + len, cap - len, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        len += (size_t)snprintf(hdr + len, cap - len, "],\"data_offsets\":[%zu,%zu]}", off, off + nb);
        off += nb;
        fatal_check(len < cap);
    }
    len += (size_t)snprintf(hdr + len, cap - len, "}");
    while (len % 8) hdr[len++] = ' '; /* the format allows trailing spaces; keeps data aligned */

    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) die("cannot write %s: %s", tmp, strerror(errno));
    uint64_t n = len;
    unsigned char le[8];
    for (int i = 0; i < 8; i++) le[i] = (unsigned char)(n >> (8 * i));
    int ok = fwrite(le, 1, 8, f) == 8 && fwrite(hdr, 1, len, f) == len;
    for (int i = 0; i < w->count && ok; i++)
        ok = fwrite(w->items[i].data, 1, tensor_bytes(&w->items[i]), f) == tensor_bytes(&w->items[i]);
    if (fclose(f) != 0) ok = 0;
    if (!ok) die("writing %s failed: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0) die("cannot rename %s to %s: %s", tmp, path, strerror(errno));
    free(hdr);
    free(w->items);
    memset(w, 0, sizeof *w);
}
