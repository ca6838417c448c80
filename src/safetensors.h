/* safetensors.h: writing tensors in the safetensors format (a u64 little-endian header
 * length, a JSON header naming each tensor's dtype, shape and byte range, then the raw
 * little-endian data), which PyTorch, numpy and the reference tests read directly. */
#ifndef DELTAMLA_SAFETENSORS_H
#define DELTAMLA_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

typedef enum st_dtype { ST_F32, ST_I32 } st_dtype;

typedef struct st_tensor {
    char name[128];
    st_dtype dtype;
    int ndim;
    int64_t shape[4];
    const void *data; /* host memory, borrowed until st_write returns */
} st_tensor;

typedef struct st_writer {
    st_tensor *items;
    int count, cap;
} st_writer;

/* Queue a tensor (data is not copied). */
void st_add(st_writer *w, const char *name, st_dtype dtype, int ndim, const int64_t *shape, const void *data);
void st_add_scalar_f32(st_writer *w, const char *name, const float *value);

/* Write all queued tensors to path (through a temporary file and rename, so a reader
 * never sees half a file); die() on I/O errors. Frees the queue. */
void st_write(st_writer *w, const char *path);

/* ---- reading (src/safetensors_read.c) ----
 * st_open checks the whole header before anything is read: a JSON object of tensors
 * (and an optional "__metadata__" object of strings), every dtype one the format
 * defines, every shape non-negative, every byte range inside the file, of exactly
 * shape x element-size bytes and overlapping no other. Data is read on demand, so a
 * file larger than memory can be inspected. */

typedef struct st_info {
    const char *name;     /* owned by the st_file */
    char dtype[8];        /* as in the header: "F32", "BF16", "F16", "F64", "I64", ... */
    int ndim;             /* 0 for a scalar */
    int64_t shape[8];
    int64_t numel;        /* product of the shape (1 for a scalar) */
    uint64_t begin, end;  /* byte range within the data section (after the header) */
} st_info;

typedef struct st_file st_file;

/* Open and validate path; die() with one line naming the file and the first problem
 * (unreadable, truncated, malformed header, bad dtype, shape or offsets). Free with
 * st_close. */
st_file *st_open(const char *path);
void st_close(st_file *f);

/* Tensors in header order (i < st_count); the pointer lives as long as the file. */
int st_count(const st_file *f);
const st_info *st_at(const st_file *f, int i);

/* The tensor called name, or NULL. */
const st_info *st_find(const st_file *f, const char *name);

/* A "__metadata__" value, or NULL when the file has no such key. */
const char *st_metadata(const st_file *f, const char *key);

/* 1 if st_read_f32 can read this dtype: F32, BF16, F16 and F64 (the last three are
 * converted, F64 rounded to the nearest float). */
int st_is_float(const st_info *t);

/* Read tensor t as float into out (t->numel floats, caller-owned). die() if its dtype
 * is not a float type or on a read error. */
void st_read_f32(st_file *f, const st_info *t, float *out);

#endif
