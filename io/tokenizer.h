/* tokenizer.h: the tokenizers of deltamla prep and generate.
 *
 * Two kinds: "byte" (tokens 0..255 are the bytes, 256 is the end-of-text token, vocab
 * 257) and "bpe", a byte-level BPE trained by `deltamla prep` on the corpus: its base
 * tokens are the 256 bytes, then one token per merge in merge order, then end-of-text.
 * A tokenizer serialises to one JSON string, which is stored in every token shard (the
 * `tokenizer` attribute) and in every checkpoint, so a checkpoint can decode its own
 * samples.
 */
#ifndef DELTAMLA_TOKENIZER_H
#define DELTAMLA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include <mpi.h>

typedef struct tokenizer tokenizer;

tokenizer *tokenizer_byte(void);
/* Parse the JSON written by tokenizer_to_json; die() with one line if it is malformed. */
tokenizer *tokenizer_from_json(const char *json);
/* malloc'd JSON string */
char *tokenizer_to_json(const tokenizer *t);
void tokenizer_free(tokenizer *t);

int tokenizer_vocab_size(const tokenizer *t);
int tokenizer_eot(const tokenizer *t);
const char *tokenizer_kind(const tokenizer *t); /* "byte" or "bpe" */

/* Encode len bytes of text (no end-of-text token added); *out is malloc'd; returns the
 * number of tokens. */
int64_t tokenizer_encode(const tokenizer *t, const unsigned char *text, size_t len, int32_t **out);
/* Decode n tokens to bytes (the end-of-text token decodes to nothing); *out is malloc'd
 * and NUL-terminated; returns the byte count. die() on a token outside the vocabulary. */
size_t tokenizer_decode(const tokenizer *t, const int32_t *ids, int64_t n, char **out);

/* Training a BPE (deltamla prep): every rank adds its documents, then one collective
 * call trains on all of them. */
typedef struct bpe_trainer bpe_trainer;
/* A trainer holding no text yet; bpe_trainer_finish frees it. */
bpe_trainer *bpe_trainer_new(void);
/* Count the chunks of one document's text; the trainer keeps no pointer to it. */
void bpe_trainer_add(bpe_trainer *b, const unsigned char *text, size_t len);
/* Collective over comm: train a BPE of at most vocab_size tokens (>= 257) on the text
 * every rank added, and free b. It stops early when no adjacent pair is left, so the
 * result may be smaller: check tokenizer_vocab_size. progress (may be NULL) is called
 * on every rank after each merge. Returns a new tokenizer (tokenizer_free). */
tokenizer *bpe_trainer_finish(bpe_trainer *b, int vocab_size, MPI_Comm comm, void (*progress)(int done, int total));

#endif
