/* prep_inputs.c: the input file list of `deltamla prep`: rank 0 expands the --input
 * paths (folders recursively, each folder's files sorted by path), classifies each file
 * (text, llm.c .bin, .npy), checks the output directory and broadcasts the list; and the
 * reading of one input file whole.
 */
#define _XOPEN_SOURCE 700
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "prep_internal.h"
#include "util.h"

static void list_add(file_list *l, const char *path, uint64_t size)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->f = realloc(l->f, (size_t)l->cap * sizeof *l->f);
        if (!l->f) die("out of host memory listing the inputs");
    }
    size_t n = strlen(path) + 1;
    l->f[l->n].path = memcpy(xmalloc(n), path, n);
    l->f[l->n].size = size;
    l->f[l->n].format = INPUT_TEXT;
    l->n++;
}

static int cmp_path(const void *a, const void *b)
{
    return strcmp(((const input_file *)a)->path, ((const input_file *)b)->path);
}

/* Every regular file under dir (hidden names skipped, the output directory left out),
 * unsorted; prep_fail() on a directory that cannot be read. */
static void walk_dir(file_list *l, const char *dir, const char *output_real)
{
    DIR *d = opendir(dir);
    if (!d) {
        prep_fail("cannot read input folder %s: %s", dir, strerror(errno));
        return;
    }
    struct dirent *e;
    while (!prep_err[0] && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        size_t n = strlen(dir) + strlen(e->d_name) + 2;
        char *path = xmalloc(n);
        snprintf(path, n, "%s%s%s", dir, dir[strlen(dir) - 1] == '/' ? "" : "/", e->d_name);
        struct stat st;
        if (stat(path, &st) != 0) {
            prep_fail("cannot open input %s: %s", path, strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            char *real = realpath(path, NULL);
            if (!(real && output_real && strcmp(real, output_real) == 0)) walk_dir(l, path, output_real);
            free(real);
        } else if (S_ISREG(st.st_mode)) {
            list_add(l, path, (uint64_t)st.st_size);
        }
        free(path);
    }
    closedir(d);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Rank 0: the inputs, expanded and classified, and the state of the output directory. */
void prep_list_inputs(const prep_options *p, file_list *l)
{
    char *output_real = realpath(p->output, NULL);
    struct stat st;
    if (stat(p->output, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) {
            prep_fail("--output %s exists and is not a directory", p->output);
        } else if (!p->force) {
            DIR *d = opendir(p->output);
            if (!d) {
                prep_fail("cannot read output directory %s: %s", p->output, strerror(errno));
            } else {
                struct dirent *e;
                int empty = 1;
                while (empty && (e = readdir(d))) empty = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
                closedir(d);
                if (!empty) prep_fail("output directory %s exists and is not empty (pass --force to replace its shards)", p->output);
            }
        }
    }
    for (int i = 0; i < p->n_input && !prep_err[0]; i++) {
        const char *in = p->input[i];
        if (stat(in, &st) != 0) {
            prep_fail("cannot open input %s: %s", in, strerror(errno));
        } else if (S_ISDIR(st.st_mode)) {
            int64_t first = l->n;
            walk_dir(l, in, output_real);
            qsort(l->f + first, (size_t)(l->n - first), sizeof *l->f, cmp_path);
        } else if (S_ISREG(st.st_mode)) {
            list_add(l, in, (uint64_t)st.st_size);
        } else {
            prep_fail("input %s is not a regular file or a folder", in);
        }
    }
    free(output_real);
    for (int64_t i = 0; i < l->n; i++) {
        input_file *f = &l->f[i];
        if (strcmp(p->import_format, "llmc") == 0 || (strcmp(p->import_format, "auto") == 0 && ends_with(f->path, ".bin")))
            f->format = INPUT_LLMC;
        else if (strcmp(p->import_format, "npy") == 0 || (strcmp(p->import_format, "auto") == 0 && ends_with(f->path, ".npy")))
            f->format = INPUT_NPY;
    }
}

/* Rank 0's list to every rank. */
void prep_bcast_list(file_list *l)
{
    int64_t n = l->n, chars = 0;
    if (prep_rank == 0)
        for (int64_t i = 0; i < n; i++) chars += (int64_t)strlen(l->f[i].path) + 1;
    int64_t hdr[2] = {n, chars};
    MPI_Bcast(hdr, 2, MPI_INT64_T, 0, MPI_COMM_WORLD);
    n = hdr[0];
    chars = hdr[1];
    if (chars > INT_MAX || n > INT_MAX / 2) die("the input list is too long (%" PRId64 " files)", n);
    uint64_t *meta = xmalloc((size_t)(2 * n + 1) * sizeof *meta);
    char *names = xmalloc((size_t)chars + 1);
    if (prep_rank == 0) {
        char *o = names;
        for (int64_t i = 0; i < n; i++) {
            meta[2 * i] = l->f[i].size;
            meta[2 * i + 1] = (uint64_t)l->f[i].format;
            size_t k = strlen(l->f[i].path) + 1;
            memcpy(o, l->f[i].path, k);
            o += k;
        }
    }
    MPI_Bcast(meta, (int)(2 * n), MPI_UINT64_T, 0, MPI_COMM_WORLD);
    MPI_Bcast(names, (int)chars, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (prep_rank != 0) {
        const char *s = names;
        for (int64_t i = 0; i < n; i++) {
            list_add(l, s, meta[2 * i]);
            l->f[i].format = (int)meta[2 * i + 1];
            s += strlen(s) + 1;
        }
    }
    free(meta);
    free(names);
}

/* ---- reading an input ---- */

/* The whole file, malloc'd; NULL after prep_fail() when it cannot be read. */
unsigned char *prep_read_file(const char *path, uint64_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        prep_fail("cannot read %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        prep_fail("cannot read %s: %s", path, strerror(errno));
        fclose(f);
        return NULL;
    }
    uint64_t n = (uint64_t)st.st_size;
    unsigned char *buf = xmalloc((size_t)n + 1);
    if (n && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        prep_fail("cannot read %s: %s", path, ferror(f) ? strerror(errno) : "the file shrank while being read");
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}
