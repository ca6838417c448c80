/* json.h: the one JSON reader of deltamla, for the documents it reads back: configs
 * stored in checkpoints (io/config_json.c), safetensors headers (src/safetensors_read.c)
 * and tokenizers (io/tokenizer.c).
 *
 * json_parse reads a whole document (RFC 8259, strictly: no comments, no trailing
 * commas, no leading zeros) into a tree of values. Every value records the byte offset
 * where it starts, so a caller that finds a well-formed document with the wrong content
 * can still point at the place, and a malformed document yields one message and the
 * byte offset of the first problem. Numbers keep the text they were written with,
 * because a double cannot hold every uint64 (safetensors offsets) and a config must
 * compare its numbers exactly as written; json_u64 and json_i64 read that text exactly.
 * Object members keep their order and their duplicates, since callers give duplicates
 * their own meaning (a tensor named twice is an error; a tokenizer key repeated keeps
 * its last value).
 */
#ifndef DELTAMLA_JSON_H
#define DELTAMLA_JSON_H

#include <stddef.h>
#include <stdint.h>

/* Nesting (arrays and objects inside each other) allowed when json_parse is given 0:
 * far beyond any document deltamla reads, and far below what exhausts the stack. */
#define JSON_DEFAULT_DEPTH 64

typedef enum json_type {
    JSON_TYPE_NULL,
    JSON_TYPE_BOOL,
    JSON_TYPE_NUMBER,
    JSON_TYPE_STRING,
    JSON_TYPE_ARRAY,
    JSON_TYPE_OBJECT,
} json_type;

typedef struct json_member json_member;

typedef struct json_value {
    json_type type;
    size_t offset;          /* byte offset of the value's first character in the document */
    int boolean;            /* JSON_TYPE_BOOL: 0 or 1 */
    double number;          /* JSON_TYPE_NUMBER: the text rounded to the nearest double */
    char *text;             /* JSON_TYPE_STRING: unescaped UTF-8, NUL-terminated (a string
                             * holding \u0000 is refused, so strlen(text) == len);
                             * JSON_TYPE_NUMBER: the number exactly as written; else NULL */
    size_t len;             /* bytes in text */
    struct json_value *items; /* JSON_TYPE_ARRAY: count elements */
    json_member *members;   /* JSON_TYPE_OBJECT: count members, in document order */
    size_t count;
} json_value;

struct json_member {
    char *key;          /* unescaped, NUL-terminated */
    size_t key_offset;  /* byte offset of the key's opening quote */
    json_value value;
};

/* Why json_parse failed: message is a short phrase such as "expected ':'" or
 * "unterminated string"; offset is the byte where the problem was found (for a
 * truncated document, the length of the text). */
typedef struct json_error {
    size_t offset;
    char message[64];
} json_error;

/* Parse the len bytes at text as one JSON document (whitespace around it allowed, any
 * other trailing text refused). max_depth bounds the nesting of arrays and objects (0:
 * JSON_DEFAULT_DEPTH; a top-level object or array is depth 1). Returns a tree that the
 * caller owns and frees with json_free, or NULL with *err filled in when the text is
 * malformed; err may be NULL. Dies (util.h) only when host memory runs out. */
json_value *json_parse(const char *text, size_t len, int max_depth, json_error *err);

/* Free a tree from json_parse (NULL is allowed). */
void json_free(json_value *v);

/* The value of the first member called key, or NULL when v is not an object or has no
 * such member. Borrowed: lives as long as the tree. */
const json_value *json_get(const json_value *v, const char *key);

/* Element i of an array, or NULL when v is not an array or i is out of range. */
const json_value *json_at(const json_value *v, size_t i);

/* Exact integer readers. They return JSON_INT_OK and set *out when v is a number written
 * without fraction or exponent that fits the type; JSON_INT_NOT_INTEGER when v is not a
 * number or has a fraction, an exponent, or (json_u64) a minus sign; JSON_INT_RANGE when
 * it is an integer outside the type. *out is untouched on failure. */
typedef enum json_int_status {
    JSON_INT_OK = 0,
    JSON_INT_NOT_INTEGER,
    JSON_INT_RANGE,
} json_int_status;

json_int_status json_u64(const json_value *v, uint64_t *out);
json_int_status json_i64(const json_value *v, int64_t *out);

/* "null", "boolean", "number", "string", "array" or "object", for messages. */
const char *json_type_name(json_type t);

#endif
