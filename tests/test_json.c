/* test_json.c: checks of the JSON reader (src/json.h) that the config, safetensors and
 * tokenizer readers are built on.
 *
 * Covers well-formed documents of every value type, string escapes (\uXXXX and
 * surrogate pairs decoded to UTF-8), numbers kept exactly as written and read exactly
 * as integers (uint64 max, negatives, int64 bounds, fractions and exponents refused as
 * integers), nesting and the depth limit, duplicate keys kept in order, and malformed
 * input (truncated, trailing text, bad escapes, bad numbers, NUL bytes) refused with
 * the message and byte offset a caller would print.
 * Prints "ok - ..." or "not ok - ..." per check and exits non-zero if any failed.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

#include "check.h"

static json_value *parse(const char *text) { return json_parse(text, strlen(text), 0, NULL); }

/* text must be refused at byte offset `at` with a message containing want. */
static void refused(const char *what, const char *text, size_t len, int max_depth, size_t at, const char *want)
{
    json_error err = {0, ""};
    json_value *v = json_parse(text, len, max_depth, &err);
    check(!v && err.offset == at && strstr(err.message, want) != NULL,
          "refused: %s -> \"%s\" at byte %zu (want \"%s\" at %zu)", what, err.message, err.offset, want, at);
    json_free(v);
}

static void refused_str(const char *what, const char *text, size_t at, const char *want)
{
    refused(what, text, strlen(text), 0, at, want);
}

static void valid_documents(void)
{
    json_value *v = parse(" {\"a\": 1, \"b\": [true, false, null], \"c\": \"x\", \"d\": {}, \"e\": []}\n");
    check(v && v->type == JSON_TYPE_OBJECT && v->count == 5, "an object of five members parses");
    if (!v) return;
    check(v->offset == 1, "the root's offset skips leading space (got %zu)", v->offset);
    const json_value *b = json_get(v, "b");
    check(b && b->type == JSON_TYPE_ARRAY && b->count == 3, "json_get finds an array of three");
    check(json_at(b, 0)->type == JSON_TYPE_BOOL && json_at(b, 0)->boolean == 1 && json_at(b, 1)->boolean == 0 &&
              json_at(b, 2)->type == JSON_TYPE_NULL,
          "true, false and null read back");
    check(json_at(b, 3) == NULL && json_at(v, 0) == NULL, "json_at refuses an index past the end and a non-array");
    check(json_get(v, "zz") == NULL && json_get(b, "a") == NULL, "json_get gives NULL for a missing key or a non-object");
    const json_value *c = json_get(v, "c");
    check(c && c->type == JSON_TYPE_STRING && strcmp(c->text, "x") == 0 && c->len == 1 && c->offset == 41,
          "a string value with its offset (%zu)", c ? c->offset : 0);
    check(json_get(v, "d")->count == 0 && json_get(v, "e")->count == 0, "empty object and array");
    check(strcmp(v->members[3].key, "d") == 0 && v->members[3].key_offset == 46, "members keep document order and key offsets");
    json_free(v);

    const char *scalars[] = {"0", "\"\"", "true", "null", "  -2.5e3  "};
    for (size_t i = 0; i < sizeof scalars / sizeof scalars[0]; i++) {
        v = parse(scalars[i]);
        check(v != NULL, "a scalar document parses: [%s]", scalars[i]);
        json_free(v);
    }

    v = parse("{\"k\":1,\"k\":2}");
    check(v && v->count == 2 && strcmp(json_get(v, "k")->text, "1") == 0, "duplicate keys are kept; json_get gives the first");
    json_free(v);
}

static void escapes(void)
{
    json_value *v = parse("\"q\\\" b\\\\ s\\/ \\b\\f\\n\\r\\t\"");
    check(v && strcmp(v->text, "q\" b\\ s/ \b\f\n\r\t") == 0, "the two-character escapes");
    json_free(v);
    v = parse("\"\\u0041\\u00e9\\u20AC\"");
    check(v && strcmp(v->text, "A\xc3\xa9\xe2\x82\xac") == 0 && v->len == 6, "\\u escapes of 1, 2 and 3 UTF-8 bytes");
    json_free(v);
    v = parse("\"\\ud83d\\ude00!\"");
    check(v && strcmp(v->text, "\xf0\x9f\x98\x80!") == 0 && v->len == 5, "a surrogate pair becomes one 4-byte character");
    json_free(v);
    v = parse("\"caf\xc3\xa9\"");
    check(v && strcmp(v->text, "caf\xc3\xa9") == 0, "raw UTF-8 passes through");
    json_free(v);
    v = parse("{\"\\u006b\":1}");
    check(v && json_get(v, "k") != NULL, "escapes in keys are decoded");
    json_free(v);
}

static void numbers(void)
{
    json_value *v = parse("[18446744073709551615, 18446744073709551616, -1, 0, -0, 1.5, 1e3, 2E-2, "
                          "-9223372036854775808, 9223372036854775807, 9223372036854775808, -9223372036854775809]");
    check(v && v->count == 12, "an array of twelve numbers");
    if (!v) return;
    uint64_t u = 0;
    int64_t i = 0;
    check(json_u64(json_at(v, 0), &u) == JSON_INT_OK && u == UINT64_MAX, "uint64 max reads exactly");
    check(strcmp(json_at(v, 0)->text, "18446744073709551615") == 0, "a number keeps its text");
    check(json_u64(json_at(v, 1), &u) == JSON_INT_RANGE, "uint64 max + 1 is out of range");
    check(json_u64(json_at(v, 2), &u) == JSON_INT_NOT_INTEGER, "json_u64 refuses a negative");
    check(json_i64(json_at(v, 2), &i) == JSON_INT_OK && i == -1, "json_i64 reads -1");
    check(json_u64(json_at(v, 3), &u) == JSON_INT_OK && u == 0, "zero");
    check(json_i64(json_at(v, 4), &i) == JSON_INT_OK && i == 0, "minus zero is 0 as int64");
    check(json_at(v, 5)->number == 1.5 && json_i64(json_at(v, 5), &i) == JSON_INT_NOT_INTEGER,
          "1.5 is 1.5 as a double and not an integer");
    check(json_at(v, 6)->number == 1000.0 && json_u64(json_at(v, 6), &u) == JSON_INT_NOT_INTEGER,
          "1e3 is 1000 as a double, but an exponent is not an exact integer");
    check(json_at(v, 7)->number == 0.02, "2E-2 as a double");
    check(json_i64(json_at(v, 8), &i) == JSON_INT_OK && i == INT64_MIN, "int64 min reads exactly");
    check(json_i64(json_at(v, 9), &i) == JSON_INT_OK && i == INT64_MAX, "int64 max reads exactly");
    check(json_i64(json_at(v, 10), &i) == JSON_INT_RANGE && json_i64(json_at(v, 11), &i) == JSON_INT_RANGE,
          "one past either int64 bound is out of range");
    check(json_i64(json_get(v, "x"), &i) == JSON_INT_NOT_INTEGER, "a missing value is not an integer");
    json_free(v);
    v = parse("\"5\"");
    check(v && json_u64(v, &u) == JSON_INT_NOT_INTEGER, "a string holding digits is not a number");
    json_free(v);
}

static void nesting(void)
{
    json_value *v = parse("{\"a\":[{\"b\":[[1,2],[3]]}]}");
    const json_value *b = v ? json_get(json_at(json_get(v, "a"), 0), "b") : NULL;
    check(b && b->count == 2 && strcmp(json_at(json_at(b, 1), 0)->text, "3") == 0, "nested lookups reach a leaf");
    json_free(v);

    char deep[200];
    memset(deep, '[', 64);
    memset(deep + 64, ']', 64);
    deep[128] = '\0';
    v = parse(deep);
    check(v != NULL, "64 nested arrays are within the default depth");
    json_free(v);
    memset(deep, '[', 65);
    memset(deep + 65, ']', 65);
    deep[130] = '\0';
    refused_str("65 nested arrays", deep, 64, "nesting too deep");
    refused("depth 3 under a limit of 2", "{\"a\":{\"b\":[]}}", 14, 2, 10, "nesting too deep");
}

static void malformed(void)
{
    refused_str("an empty text", "", 0, "expected a value");
    refused_str("only spaces", "   ", 3, "expected a value");
    refused_str("truncated after a comma", "{\"kind\":\"bpe\",", 14, "expected '\"'");
    refused_str("truncated inside a string", "{\"kind\":\"bp", 11, "unterminated string");
    refused_str("truncated inside an array", "[1, 2", 5, "expected ']'");
    refused_str("a trailing comma in an object", "{\"a\":1,}", 7, "expected '\"'");
    refused_str("a trailing comma in an array", "[1,]", 3, "unexpected character");
    refused_str("a missing colon", "{\"a\" 1}", 5, "expected ':'");
    refused_str("trailing garbage", "{} x", 3, "text after the end of the document");
    refused_str("two documents", "1 2", 2, "text after the end of the document");
    refused_str("a bad escape", "\"a\\qb\"", 2, "bad escape in a string");
    refused_str("a short \\u escape", "\"\\u12g4\"", 5, "bad \\u escape");
    refused_str("a lone high surrogate", "\"x\\ud800y\"", 2, "unpaired surrogate");
    refused_str("a lone low surrogate", "\"\\udc00\"", 1, "unpaired surrogate");
    refused_str("a high surrogate before a non-low one", "\"\\ud800\\u0041\"", 1, "unpaired surrogate");
    refused_str("an escaped NUL", "\"a\\u0000\"", 2, "\\u0000");
    refused_str("a raw control character", "\"a\tb\"", 2, "control character");
    refused_str("a leading zero", "[012]", 2, "leading zero");
    refused_str("a bare minus", "-", 1, "expected a digit");
    refused_str("a fraction without digits", "1.e5", 2, "expected a digit after '.'");
    refused_str("an exponent without digits", "[1e+]", 4, "expected a digit in the exponent");
    refused_str("a plus sign", "+1", 0, "unexpected character");
    refused_str("a misspelt literal", "[tru]", 1, "unexpected character");
    refused_str("a single-quoted string", "{'a':1}", 1, "expected '\"'");
    refused("a NUL byte after the document", "{}\0", 3, 0, 2, "NUL byte");
    refused("a NUL byte inside a string", "\"a\0b\"", 5, 0, 2, "NUL byte in a string");
}

int main(void)
{
    valid_documents();
    escapes();
    numbers();
    nesting();
    malformed();
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
