/* prep_internal.h: what the parts of `deltamla prep` share (prep.c describes the run);
 * not for use outside src/prep*.c.
 *
 *   prep.c           prep_main: the flags checked, the files shared out over the ranks, the
 *                    BPE trained, the stream placed and cut into shards; errors agreed
 *                    over the ranks
 *   prep_options.c   the option table: parsing and --help
 *   prep_inputs.c    the input file list (expanded on rank 0, broadcast) and reading a file
 *   prep_progress.c  progress lines on stderr (rank 0 prints, the others report to it)
 *   prep_text.c      text files: the UTF-8 check, documents, tokenizing, BPE chunk counts
 *   prep_import.c    llm.c .bin and numpy .npy token files
 */
#ifndef DELTAMLA_PREP_INTERNAL_H
#define DELTAMLA_PREP_INTERNAL_H

#include <inttypes.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../io/tokenizer.h"
#include "util.h"

/* ---- errors agreed over the ranks (prep.c) ---- */

extern int prep_rank, prep_size;
extern char prep_err[1024]; /* this rank's first error, "" while none */

/* Keep the message as this rank's error, unless it has one already. */
void prep_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Collective: if any rank has an error, every rank exits with status 1 after the first
 * one in file-list order is printed once. */
void prep_sync_errors(void);

/* ---- options (prep_options.c) ---- */

typedef struct prep_options {
    char **input;
    int n_input;
    char *output;
    char *tokenizer;
    int64_t vocab_size;
    char *doc_split;
    int64_t shard_tokens;
    char *import_format;
    int64_t eot_token;
    int64_t bpe_train_bytes;
    double progress_interval;
    int force;
    int help;
} prep_options;

/* the entries of the option table (prep_options.c checks the count at compile time) */
enum { N_PREP_OPTS = 12 };

void prep_usage(FILE *f);
/* Parse argv into p; given[i] tells whether option i was on the command line. */
void prep_parse(prep_options *p, int given[N_PREP_OPTS], int argc, char **argv);
/* The index of option `name` in the table, or -1. */
int prep_opt_index(const char *name);

/* ---- the input file list (prep_inputs.c) ---- */

typedef enum input_format { INPUT_TEXT, INPUT_LLMC, INPUT_NPY } input_format;

typedef struct input_file {
    char *path;
    uint64_t size;
    int format; /* input_format */
} input_file;

typedef struct file_list {
    input_file *f;
    int64_t n, cap;
} file_list;

/* Rank 0: the inputs, expanded and classified, and the state of the output directory. */
void prep_list_inputs(const prep_options *p, file_list *l);
/* Rank 0's list to every rank. */
void prep_bcast_list(file_list *l);
/* The whole file, malloc'd; NULL after prep_fail() when it cannot be read. */
unsigned char *prep_read_file(const char *path, uint64_t *len);

/* ---- progress lines (prep_progress.c) ---- */

/* Start a phase: `what` names it in the lines; total_bytes is the corpus size (0: none). */
void prep_progress_begin(const char *what, double interval, uint64_t total_bytes);
/* Count work done by this rank; rank 0 prints a line every --progress_interval s. */
void prep_progress_add(uint64_t bytes, uint64_t tokens);
/* Every rank calls it when its part is done; rank 0 keeps printing until all are. */
void prep_progress_end(void);
/* The BPE trainer's progress callback (bpe_trainer_finish). */
void prep_bpe_progress(int done, int total);
/* Free what the last phase holds. */
void prep_progress_free(void);

/* ---- the rank's token stream (static inline: push and at run once per token) ---- */

typedef struct token_buf {
    unsigned char *data;
    uint64_t n, cap;
    int width; /* bytes per token: 2 or 4 */
} token_buf;

static inline void token_buf_reserve(token_buf *b, uint64_t more)
{
    if (b->n + more <= b->cap) return;
    uint64_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->n + more) cap *= 2;
    unsigned char *d = realloc(b->data, (size_t)(cap * (uint64_t)b->width));
    if (!d) die("out of host memory holding %" PRIu64 " tokens", cap);
    b->data = d;
    b->cap = cap;
}

static inline void token_buf_push(token_buf *b, uint32_t t)
{
    if (b->width == 2) ((uint16_t *)b->data)[b->n++] = (uint16_t)t;
    else ((uint32_t *)b->data)[b->n++] = t;
}

static inline uint32_t token_buf_at(const token_buf *b, uint64_t i)
{
    return b->width == 2 ? ((const uint16_t *)b->data)[i] : ((const uint32_t *)b->data)[i];
}

/* ---- text (prep_text.c) and token-file imports (prep_import.c) ---- */

/* Tokenize one text file's documents onto the stream, each followed by end-of-text. */
void prep_encode_text_file(const input_file *f, const tokenizer *tok, int by_blank_line, int check_utf8, token_buf *out);
/* Count the chunks of this file's training share (its first `share` bytes) for the BPE. */
void prep_count_text_file(const input_file *f, bpe_trainer *trainer, uint64_t share, int by_blank_line);
/* Append the tokens of an llm.c .bin / a numpy .npy file, each checked against vocab;
 * prep_fail() on a bad header or token. */
void prep_import_llmc(const input_file *f, int64_t vocab, token_buf *out);
void prep_import_npy(const input_file *f, int64_t vocab, token_buf *out);

#endif
