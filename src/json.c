/* json.c: the JSON reader declared in json.h, a recursive-descent parser that builds the
 * whole tree at once.
 *
 * Every document deltamla reads is small (a config, a tokenizer, a safetensors header
 * of at most 100 MB) and is wanted whole, so a tree is simpler for the callers than a
 * streaming interface, and it lets each caller check content in whatever order suits
 * its messages. The parser stops at the first problem and reports it with its byte
 * offset; the partly built tree is freed there, so callers see either a complete tree
 * or none. The text is addressed by length, never by a terminating NUL, so a NUL byte
 * inside a document is an error at its offset rather than a silent end.
 */
#define _POSIX_C_SOURCE 200809L
#include "json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

typedef struct json_parser {
    const char *s;
    size_t len, pos;
    int max_depth;
    json_error *err;
} json_parser;

/* Record the first problem; returns -1 so that callers can `return fail(...)`. */
static int fail(json_parser *p, size_t offset, const char *what)
{
    if (p->err) {
        p->err->offset = offset;
        snprintf(p->err->message, sizeof p->err->message, "%s", what);
    }
    return -1;
}

static void *grow(void *ptr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return ptr;
    size_t n = *cap ? *cap : 8;
    while (n < need) n *= 2;
    void *q = realloc(ptr, n * elem);
    if (!q) die("out of host memory parsing JSON (%zu bytes)", n * elem);
    *cap = n;
    return q;
}

static void skip_ws(json_parser *p)
{
    while (p->pos < p->len &&
           (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' || p->s[p->pos] == '\n' || p->s[p->pos] == '\r'))
        p->pos++;
}

/* The next non-space byte, or -1 at the end of the text. */
static int peek(json_parser *p)
{
    skip_ws(p);
    return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1;
}

static int expect(json_parser *p, char c)
{
    if (peek(p) != (unsigned char)c) {
        char what[32];
        snprintf(what, sizeof what, "expected '%c'", c);
        return fail(p, p->pos, what);
    }
    p->pos++;
    return 0;
}

static int hex_digit(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Four hex digits after "\u"; -1 (error recorded) if they are not there. */
static long read_hex4(json_parser *p)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int h = p->pos < p->len ? hex_digit((unsigned char)p->s[p->pos]) : -1;
        if (h < 0) return fail(p, p->pos, "bad \\u escape");
        v = v * 16 + h;
        p->pos++;
    }
    return v;
}

static size_t put_utf8(char *out, unsigned long cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* A string starting at the opening quote (after whitespace), unescaped to UTF-8 into a
 * malloc'd *out of *out_len bytes. Raw bytes above 0x7f are copied as they are: the
 * documents are written by deltamla or Python's json, both of which emit valid UTF-8. */
static int parse_string(json_parser *p, char **out, size_t *out_len)
{
    if (expect(p, '"') != 0) return -1;
    size_t cap = 0, n = 0;
    char *s = NULL;
    for (;;) {
        if (p->pos >= p->len) {
            free(s);
            return fail(p, p->pos, "unterminated string");
        }
        s = grow(s, &cap, n + 5, 1); /* the longest step appends 4 bytes, then the NUL */
        unsigned char c = (unsigned char)p->s[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) {
            free(s);
            return fail(p, p->pos, c ? "control character in a string" : "NUL byte in a string");
        }
        if (c != '\\') {
            s[n++] = (char)c;
            p->pos++;
            continue;
        }
        size_t esc = p->pos++;
        if (p->pos >= p->len) {
            free(s);
            return fail(p, p->pos, "unterminated string");
        }
        c = (unsigned char)p->s[p->pos++];
        switch (c) {
        case '"': s[n++] = '"'; break;
        case '\\': s[n++] = '\\'; break;
        case '/': s[n++] = '/'; break;
        case 'b': s[n++] = '\b'; break;
        case 'f': s[n++] = '\f'; break;
        case 'n': s[n++] = '\n'; break;
        case 'r': s[n++] = '\r'; break;
        case 't': s[n++] = '\t'; break;
        case 'u': {
            long cp = read_hex4(p);
            if (cp < 0) {
                free(s);
                return -1;
            }
            /* characters above U+FFFF come as a UTF-16 surrogate pair (Python's json.dumps
             * writes them so); a lone half has no UTF-8 form */
            if (cp >= 0xd800 && cp < 0xdc00) {
                if (p->pos + 1 >= p->len || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    free(s);
                    return fail(p, esc, "unpaired surrogate in a string");
                }
                p->pos += 2;
                long lo = read_hex4(p);
                if (lo < 0) {
                    free(s);
                    return -1;
                }
                if (lo < 0xdc00 || lo >= 0xe000) {
                    free(s);
                    return fail(p, esc, "unpaired surrogate in a string");
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp < 0xe000) {
                free(s);
                return fail(p, esc, "unpaired surrogate in a string");
            }
            /* a NUL would cut the C string short and make the value mean something else */
            if (cp == 0) {
                free(s);
                return fail(p, esc, "\\u0000 in a string");
            }
            n += put_utf8(s + n, (unsigned long)cp);
            break;
        }
        default:
            free(s);
            return fail(p, esc, "bad escape in a string");
        }
    }
    if (!s) s = xmalloc(1);
    s[n] = '\0';
    *out = s;
    *out_len = n;
    return 0;
}

static int is_digit(json_parser *p) { return p->pos < p->len && p->s[p->pos] >= '0' && p->s[p->pos] <= '9'; }

/* -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, kept as written. */
static int parse_number(json_parser *p, json_value *v)
{
    size_t start = p->pos;
    if (p->s[p->pos] == '-') p->pos++;
    if (!is_digit(p)) return fail(p, p->pos, "expected a digit");
    if (p->s[p->pos] == '0') {
        p->pos++;
        if (is_digit(p)) return fail(p, p->pos, "leading zero in a number");
    } else {
        while (is_digit(p)) p->pos++;
    }
    if (p->pos < p->len && p->s[p->pos] == '.') {
        p->pos++;
        if (!is_digit(p)) return fail(p, p->pos, "expected a digit after '.'");
        while (is_digit(p)) p->pos++;
    }
    if (p->pos < p->len && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        p->pos++;
        if (p->pos < p->len && (p->s[p->pos] == '+' || p->s[p->pos] == '-')) p->pos++;
        if (!is_digit(p)) return fail(p, p->pos, "expected a digit in the exponent");
        while (is_digit(p)) p->pos++;
    }
    v->type = JSON_TYPE_NUMBER;
    v->len = p->pos - start;
    v->text = xmalloc(v->len + 1);
    memcpy(v->text, p->s + start, v->len);
    v->text[v->len] = '\0';
    /* the grammar above is a subset of strtod's, so the whole text is consumed; a
     * magnitude beyond double gives +-inf, while the text stays exact */
    v->number = strtod(v->text, NULL);
    return 0;
}

static int parse_literal(json_parser *p, const char *word)
{
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) return fail(p, p->pos, "unexpected character");
    p->pos += n;
    return 0;
}

static void free_value(json_value *v);

static int parse_value(json_parser *p, json_value *v, int depth)
{
    memset(v, 0, sizeof *v);
    int c = peek(p);
    v->offset = p->pos;
    if (c < 0) return fail(p, p->pos, "expected a value, found the end of the text");
    if (c == '{' || c == '[') {
        if (depth >= p->max_depth) return fail(p, p->pos, "nesting too deep");
        p->pos++;
        size_t cap = 0;
        char close = c == '{' ? '}' : ']';
        v->type = c == '{' ? JSON_TYPE_OBJECT : JSON_TYPE_ARRAY;
        if (peek(p) == close) {
            p->pos++;
            return 0;
        }
        for (;;) {
            if (v->type == JSON_TYPE_OBJECT) {
                v->members = grow(v->members, &cap, v->count + 1, sizeof *v->members);
                json_member *m = &v->members[v->count];
                memset(m, 0, sizeof *m);
                peek(p);
                m->key_offset = p->pos;
                if (parse_string(p, &m->key, &(size_t){0}) != 0) goto bad;
                if (expect(p, ':') != 0 || parse_value(p, &m->value, depth + 1) != 0) {
                    free(m->key);
                    free_value(&m->value);
                    goto bad;
                }
            } else {
                v->items = grow(v->items, &cap, v->count + 1, sizeof *v->items);
                if (parse_value(p, &v->items[v->count], depth + 1) != 0) {
                    free_value(&v->items[v->count]);
                    goto bad;
                }
            }
            v->count++;
            if (peek(p) == ',') {
                p->pos++;
                continue;
            }
            if (expect(p, close) != 0) goto bad;
            return 0;
        }
    bad:
        free_value(v);
        return -1;
    }
    if (c == '"') {
        v->type = JSON_TYPE_STRING;
        return parse_string(p, &v->text, &v->len);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p, v);
    if (c == 't' || c == 'f') {
        v->type = JSON_TYPE_BOOL;
        v->boolean = c == 't';
        return parse_literal(p, c == 't' ? "true" : "false");
    }
    if (c == 'n') {
        v->type = JSON_TYPE_NULL;
        return parse_literal(p, "null");
    }
    return fail(p, p->pos, c ? "unexpected character" : "NUL byte");
}

/* Free what v owns (not v itself), leaving it an empty null. */
static void free_value(json_value *v)
{
    if (v->type == JSON_TYPE_ARRAY)
        for (size_t i = 0; i < v->count; i++) free_value(&v->items[i]);
    if (v->type == JSON_TYPE_OBJECT)
        for (size_t i = 0; i < v->count; i++) {
            free(v->members[i].key);
            free_value(&v->members[i].value);
        }
    free(v->items);
    free(v->members);
    free(v->text);
    memset(v, 0, sizeof *v);
}

json_value *json_parse(const char *text, size_t len, int max_depth, json_error *err)
{
    json_parser p = {text, len, 0, max_depth > 0 ? max_depth : JSON_DEFAULT_DEPTH, err};
    json_value *v = xmalloc(sizeof *v);
    if (parse_value(&p, v, 0) != 0) {
        free(v);
        return NULL;
    }
    skip_ws(&p);
    if (p.pos != len) {
        fail(&p, p.pos, p.s[p.pos] ? "text after the end of the document" : "NUL byte");
        json_free(v);
        return NULL;
    }
    return v;
}

void json_free(json_value *v)
{
    if (!v) return;
    free_value(v);
    free(v);
}

const json_value *json_get(const json_value *v, const char *key)
{
    if (!v || v->type != JSON_TYPE_OBJECT) return NULL;
    for (size_t i = 0; i < v->count; i++)
        if (strcmp(v->members[i].key, key) == 0) return &v->members[i].value;
    return NULL;
}

const json_value *json_at(const json_value *v, size_t i)
{
    if (!v || v->type != JSON_TYPE_ARRAY || i >= v->count) return NULL;
    return &v->items[i];
}

/* The magnitude of an integer's digits, or JSON_INT_NOT_INTEGER / JSON_INT_RANGE. */
static json_int_status digits_u64(const char *d, uint64_t *out)
{
    if (!*d) return JSON_INT_NOT_INTEGER;
    uint64_t m = 0;
    int over = 0;
    for (; *d; d++) {
        if (*d < '0' || *d > '9') return JSON_INT_NOT_INTEGER; /* '.', 'e' or 'E' */
        uint64_t digit = (uint64_t)(*d - '0');
        if (m > (UINT64_MAX - digit) / 10) over = 1;
        else m = m * 10 + digit;
    }
    if (over) return JSON_INT_RANGE;
    *out = m;
    return JSON_INT_OK;
}

json_int_status json_u64(const json_value *v, uint64_t *out)
{
    if (!v || v->type != JSON_TYPE_NUMBER || v->text[0] == '-') return JSON_INT_NOT_INTEGER;
    return digits_u64(v->text, out);
}

json_int_status json_i64(const json_value *v, int64_t *out)
{
    if (!v || v->type != JSON_TYPE_NUMBER) return JSON_INT_NOT_INTEGER;
    int neg = v->text[0] == '-';
    uint64_t m;
    json_int_status st = digits_u64(v->text + neg, &m);
    if (st != JSON_INT_OK) return st;
    if (neg ? m > (uint64_t)INT64_MAX + 1 : m > (uint64_t)INT64_MAX) return JSON_INT_RANGE;
    /* -(INT64_MAX + 1) is formed without overflowing a signed intermediate */
    *out = neg ? (m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m) : (int64_t)m;
    return JSON_INT_OK;
}

const char *json_type_name(json_type t)
{
    switch (t) {
    case JSON_TYPE_NULL: return "null";
    case JSON_TYPE_BOOL: return "boolean";
    case JSON_TYPE_NUMBER: return "number";
    case JSON_TYPE_STRING: return "string";
    case JSON_TYPE_ARRAY: return "array";
    case JSON_TYPE_OBJECT: return "object";
    }
    return "unknown";
}
