/* ckpt_tool_common.c: helpers the `deltamla ckpt` subcommands share (ckpt_tool_internal.h):
 * finding the checkpoint a PATH|DIR argument names, formatting shapes and counts, and
 * reading and writing whole text files and folders.
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

/* A checkpoint file, or the one `latest` points to in an output directory; malloc'd. */
char *ckpt_resolve_checkpoint(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) die("cannot open %s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) {
        char *p = xmalloc(strlen(path) + 1);
        strcpy(p, path);
        return p;
    }
    char *p = ckpt_latest(path);
    if (!p) die("%s holds no checkpoint (no `latest` pointer; is it a training output directory?)", path);
    return p;
}

void ckpt_format_shape(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && o < n; d++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

/* 296719668 -> "296,719,668" */
const char *ckpt_grouped(long long v, char *buf, size_t n)
{
    char raw[32];
    snprintf(raw, sizeof raw, "%lld", v < 0 ? -v : v);
    size_t len = strlen(raw), o = 0;
    if (v < 0 && o + 1 < n) buf[o++] = '-';
    for (size_t i = 0; i < len && o + 2 < n; i++) {
        if (i && (len - i) % 3 == 0) buf[o++] = ',';
        buf[o++] = raw[i];
    }
    buf[o] = 0;
    return buf;
}

char *ckpt_read_text_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = xmalloc(cap);
    for (;;) {
        if (len + 1 == cap) {
            cap *= 2;
            char *n = realloc(buf, cap);
            if (!n) die("out of host memory reading %s", path);
            buf = n;
        }
        size_t got = fread(buf + len, 1, cap - 1 - len, f);
        len += got;
        if (got == 0) break;
    }
    if (ferror(f)) die("cannot read %s: %s", path, strerror(errno));
    fclose(f);
    buf[len] = '\0';
    if (strlen(buf) != len) die("%s is not a text file (it holds a NUL byte)", path);
    return buf;
}

/* Write through a temporary name and rename, as st_write does, so a reader of the
 * folder never sees half a file. */
void ckpt_write_file(const char *path, const char *text)
{
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) die("cannot write %s: %s", tmp, strerror(errno));
    size_t n = strlen(text);
    int ok = fwrite(text, 1, n, f) == n;
    if (fclose(f) != 0) ok = 0;
    if (!ok) die("writing %s failed: %s", tmp, strerror(errno));
    if (rename(tmp, path) != 0) die("cannot rename %s to %s: %s", tmp, path, strerror(errno));
}

/* The config as JSON text (config_json writes to a FILE); malloc'd. */
char *ckpt_config_json_text(const config *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) die("out of host memory writing the config");
    config_json(c, f);
    fclose(f);
    return text;
}

int ckpt_n_gdn_layers(const config *c)
{
    int n = 0;
    for (int l = 0; l < c->n_layer; l++) n += config_is_gdn(c, l);
    return n;
}

/* mkdir -p */
void ckpt_make_dirs(const char *path)
{
    char buf[4096];
    if (strlen(path) >= sizeof buf) die("path too long: %s", path);
    strcpy(buf, path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create %s: %s", buf, strerror(errno));
}
