/* shards.h: the token shard format of DESIGN.md, its collective writer and a reader.
 *
 * A data set is a directory; its shards are the files named shard_NNNNN.h5 (the number
 * zero-padded to the same width in one data set, at least 5 digits, so that name order
 * is number order). Other files in the directory are not part of the data set. The
 * data set's token stream is the concatenation of the shards' /tokens in name order.
 *
 * One shard is an HDF5 file (written through the MPI-IO driver) holding:
 *
 *   /tokens       1-D, H5T_STD_U16LE when vocab_size <= 65536, else H5T_STD_U32LE;
 *                 chunked, chunks of min(num_tokens, 1048576) tokens, no filters.
 *   /doc_offsets  1-D H5T_STD_U64LE, contiguous: the offsets in this shard's /tokens at
 *                 which a document starts, ascending (num_docs entries, possibly 0).
 *
 *   root attributes (scalars):
 *     format         variable-length UTF-8 string "deltamla-tokens"
 *     version        H5T_STD_I32LE, 1
 *     vocab_size     H5T_STD_I64LE; every token is < vocab_size
 *     eot_token      H5T_STD_I64LE; the end-of-text token
 *     num_tokens     H5T_STD_U64LE = length of /tokens
 *     num_docs       H5T_STD_U64LE = length of /doc_offsets
 *     tokenizer      variable-length UTF-8 string: the tokenizer's JSON (tokenizer.h),
 *                    the same in every shard of a data set
 *     shard_index    H5T_STD_I64LE, this shard's number (0-based)
 *     num_shards     H5T_STD_I64LE, shards in the data set
 *     stream_offset  H5T_STD_U64LE, the position of this shard's first token in the
 *                    data set's stream (the sum of num_tokens of the shards before it)
 *
 * Documents. The end-of-text token ENDS a document: in the stream a document starts at
 * position 0 and right after every end-of-text token that is not the stream's last
 * token. Text prepared by `deltamla prep` is document tokens then end-of-text for
 * every document, so the stream ends with end-of-text; a stream imported from llm.c or
 * .npy files is kept as it was, documents cut by the same rule. A shard lists the
 * documents that start in it; when /doc_offsets is empty or its first entry is not 0,
 * the shard's first tokens finish a document begun in an earlier shard (prep cuts the
 * stream into shards of a fixed token count, see io/SHARDS.md).
 *
 * Readers must check format and version, and may rely on every shard of a data set
 * having the same vocab_size, eot_token and tokenizer.
 */
#ifndef DELTAMLA_SHARDS_H
#define DELTAMLA_SHARDS_H

#include <mpi.h>
#include <stdint.h>

#define SHARD_FORMAT "deltamla-tokens"
#define SHARD_VERSION 1
/* chunk length of /tokens */
#define SHARD_CHUNK_TOKENS ((uint64_t)1 << 20)

/* The attributes of one shard. */
typedef struct shard_meta {
    int64_t vocab_size, eot_token;
    uint64_t num_tokens, num_docs;
    const char *tokenizer_json;
    int64_t shard_index, num_shards;
    uint64_t stream_offset;
} shard_meta;

/* The calling rank's part of one shard in a collective write: tokens
 * [token_start, token_start + token_count) of the shard's /tokens and entries
 * [doc_start, doc_start + doc_count) of its /doc_offsets. Parts of different ranks must
 * not overlap; a rank with nothing to write passes counts of 0. `tokens` holds uint16_t
 * values when meta->vocab_size <= 65536, else uint32_t. */
typedef struct shard_part {
    uint64_t token_start, token_count;
    const void *tokens;
    uint64_t doc_start, doc_count;
    const uint64_t *doc_offsets; /* offsets within this shard */
} shard_part;

/* Bytes per stored token for a vocabulary: 2 (uint16) up to 65536 tokens, else 4. */
int shard_token_bytes(int64_t vocab_size);

/* The file name of shard `index` of a data set of `num_shards` shards, e.g.
 * "shard_00007.h5"; written to buf (at least 32 bytes). */
void shard_file_name(char *buf, size_t size, int64_t index, int64_t num_shards);

/* Collective over comm (every rank calls it with the same path and meta): create the
 * shard file at path, replacing any file of that name, and write each rank's part.
 * The caller keeps ownership of everything passed. die() with one line naming the file
 * on an I/O error. */
void shard_write(const char *path, MPI_Comm comm, const shard_meta *meta, const shard_part *part);

/* An open shard for reading. */
typedef struct shard_reader {
    int64_t hid_file, hid_tokens; /* HDF5 ids */
    int token_bytes;              /* 2 or 4 */
    int version;
    shard_meta meta;              /* meta.tokenizer_json is owned by the reader; shard_index and
                                   * num_shards are -1, stream_offset 0, when the file lacks them */
} shard_reader;

/* Collective over comm (MPI_COMM_SELF to read alone): open a shard and check it: format,
 * version, the attributes and the dataset lengths agreeing, the token type. die() with
 * one line naming the file if it is missing, not HDF5, or not a shard of this format. */
void shard_open(shard_reader *r, const char *path, MPI_Comm comm);

/* Read tokens [start, start + count) into out (independent I/O, no collective).
 * die() if the range is outside the shard. */
void shard_read_tokens(shard_reader *r, uint64_t start, uint64_t count, int32_t *out);

/* The whole /doc_offsets, malloc'd (meta.num_docs entries; the caller frees it). */
uint64_t *shard_read_doc_offsets(shard_reader *r);

void shard_close(shard_reader *r);

/* The shard files of a data set directory in stream order: *paths is a malloc'd array
 * of malloc'd "dir/shard_NNNNN.h5" strings (free each, then the array); returns their
 * count, 0 when there are none. die() if dir cannot be read. */
int shards_list(const char *dir, char ***paths);

#endif
