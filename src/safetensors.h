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

#endif
