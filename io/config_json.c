/* config_json.c: config_from_json, the inverse of config_json (config.c), for configs
 * stored in checkpoints and exported model folders.
 *
 * The option table that drives parsing is private to config.c, so this file does not
 * copy it: it turns the JSON object back into a command line ("--name=value" per key)
 * and hands that to config_parse, which applies the same preset, the same value parsing
 * and the same validation as for `deltamla train`. config_json also writes the derived
 * fields (moe_E, head_dim, ...), which the parser refuses; a key is passed to the parser
 * only when `--help` lists it as a flag (the help text is printed from the same table,
 * so it is the one public list of parseable names). Every other key must then equal
 * what config_finish recomputed from the flags (config_json of the result is read back
 * for that), so a file whose derived shapes disagree with its flags, or that holds a
 * field this build does not know, is refused by name instead of loading as a silently
 * different model.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "util.h"

/* One "key": value pair of a flat JSON object; value is the text a flag would take
 * (strings unescaped, numbers and true/false as written). */
typedef struct json_pair {
    char *key;
    char *value;
} json_pair;

typedef struct json_object {
    json_pair *pairs;
    int count, cap;
} json_object;

static void json_object_free(json_object *o)
{
    for (int i = 0; i < o->count; i++) {
        free(o->pairs[i].key);
        free(o->pairs[i].value);
    }
    free(o->pairs);
}

static const char *skip_space(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* Append the UTF-8 encoding of code point cp (below 0x10000: config strings are paths
 * and names, and config_json escapes only control characters). */
static size_t put_utf8(char *out, unsigned cp)
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
    out[0] = (char)(0xe0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    out[2] = (char)(0x80 | (cp & 0x3f));
    return 3;
}

/* Parse a JSON string starting at the opening quote; *out is malloc'd. Returns the
 * position after the closing quote, or NULL if malformed. */
static const char *parse_string(const char *p, char **out)
{
    if (*p != '"') return NULL;
    p++;
    size_t cap = strlen(p) + 1, n = 0;
    char *s = xmalloc(cap);
    while (*p && *p != '"') {
        if (*p != '\\') {
            s[n++] = *p++;
            continue;
        }
        p++;
        switch (*p) {
        case '"': s[n++] = '"'; break;
        case '\\': s[n++] = '\\'; break;
        case '/': s[n++] = '/'; break;
        case 'b': s[n++] = '\b'; break;
        case 'f': s[n++] = '\f'; break;
        case 'n': s[n++] = '\n'; break;
        case 'r': s[n++] = '\r'; break;
        case 't': s[n++] = '\t'; break;
        case 'u': {
            unsigned cp = 0;
            for (int k = 1; k <= 4; k++) {
                char h = p[k];
                unsigned d = h >= '0' && h <= '9' ? (unsigned)(h - '0')
                           : h >= 'a' && h <= 'f' ? (unsigned)(h - 'a' + 10)
                           : h >= 'A' && h <= 'F' ? (unsigned)(h - 'A' + 10) : 16u;
                if (d == 16) {
                    free(s);
                    return NULL;
                }
                cp = cp * 16 + d;
            }
            if (cp == 0) { /* a NUL would cut the value short: not a config string */
                free(s);
                return NULL;
            }
            n += put_utf8(s + n, cp); /* 6 input bytes, at most 3 output bytes */
            p += 4;
            break;
        }
        default: free(s); return NULL;
        }
        p++;
    }
    if (*p != '"') {
        free(s);
        return NULL;
    }
    s[n] = '\0';
    *out = s;
    return p + 1;
}

/* A number or a literal (true/false/null): the text up to the next delimiter. */
static const char *parse_bare(const char *p, char **out)
{
    const char *start = p;
    while (*p && *p != ',' && *p != '}' && *p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') p++;
    if (p == start) return NULL;
    size_t n = (size_t)(p - start);
    char *s = xmalloc(n + 1);
    memcpy(s, start, n);
    s[n] = '\0';
    *out = s;
    return p;
}

/* Parse a flat JSON object of strings, numbers and literals. Returns 0, or -1 with
 * *where set to the byte offset of the first problem. */
static int parse_object(const char *json, json_object *o, size_t *where)
{
    memset(o, 0, sizeof *o);
    const char *p = skip_space(json);
    if (*p != '{') goto bad;
    p = skip_space(p + 1);
    if (*p == '}') {
        p = skip_space(p + 1);
        if (*p) goto bad;
        return 0;
    }
    for (;;) {
        char *key = NULL, *value = NULL;
        const char *q = parse_string(p, &key);
        if (!q) goto bad;
        p = skip_space(q);
        if (*p != ':') {
            free(key);
            goto bad;
        }
        p = skip_space(p + 1);
        q = *p == '"' ? parse_string(p, &value) : parse_bare(p, &value);
        if (!q) {
            free(key);
            goto bad;
        }
        p = skip_space(q);
        if (o->count == o->cap) {
            o->cap = o->cap ? 2 * o->cap : 64;
            json_pair *np = realloc(o->pairs, (size_t)o->cap * sizeof *np);
            if (!np) die("out of host memory reading a config");
            o->pairs = np;
        }
        o->pairs[o->count].key = key;
        o->pairs[o->count].value = value;
        o->count++;
        if (*p == ',') {
            p = skip_space(p + 1);
            continue;
        }
        if (*p != '}') goto bad;
        p = skip_space(p + 1);
        if (*p) goto bad;
        return 0;
    }
bad:
    *where = (size_t)(p - json);
    json_object_free(o);
    return -1;
}

static const char *find_value(const json_object *o, const char *key)
{
    for (int i = 0; i < o->count; i++)
        if (strcmp(o->pairs[i].key, key) == 0) return o->pairs[i].value;
    return NULL;
}

/* Is "--key" a flag config_parse accepts? config_help prints one "  --name TYPE" line
 * per flag from the option table. */
static int is_flag(const char *help, const char *key)
{
    size_t n = strlen(key);
    for (const char *p = strstr(help, "\n  --"); p; p = strstr(p + 1, "\n  --"))
        if (strncmp(p + 5, key, n) == 0 && p[5 + n] == ' ') return 1;
    return 0;
}

void config_from_json(const char *json, config *c)
{
    json_object in;
    size_t where = 0;
    if (parse_object(json, &in, &where) != 0)
        die("config JSON is malformed near byte %zu (expected one flat object as config_json writes)", where);

    char *help = NULL;
    size_t help_len = 0;
    FILE *hf = open_memstream(&help, &help_len);
    if (!hf) die("out of host memory reading a config");
    config_help(hf);
    fclose(hf);

    /* argv for config_parse: --size first, so the preset is the stored one; every
     * stored flag then overrides it, as on the original command line */
    char **argv = xcalloc((size_t)in.count + 1, sizeof *argv);
    int argc = 0;
    for (int i = 0; i < in.count; i++) {
        const json_pair *kv = &in.pairs[i];
        if (!is_flag(help, kv->key)) continue;
        if (strcmp(kv->value, "null") == 0) die("config JSON: %s is null", kv->key);
        size_t n = strlen(kv->key) + strlen(kv->value) + 4;
        argv[argc] = xmalloc(n);
        snprintf(argv[argc], n, "--%s=%s", kv->key, kv->value);
        argc++;
    }
    config_parse(c, argc, argv);
    for (int i = 0; i < argc; i++) free(argv[i]);
    free(argv);

    /* The flags were read by config_parse itself; every other stored key is derived
     * and must equal what config_finish recomputed from them. */
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    if (!f) die("out of host memory reading a config");
    config_json(c, f);
    fclose(f);
    json_object out;
    if (parse_object(text, &out, &where) != 0) die("internal: config_json wrote JSON that does not parse back");
    free(text);
    for (int i = 0; i < in.count; i++) {
        const json_pair *kv = &in.pairs[i];
        const char *now = find_value(&out, kv->key);
        if (!now) die("config JSON has a field '%s' that this build of deltamla does not know", kv->key);
        if (is_flag(help, kv->key)) continue;
        char *end_a, *end_b;
        double a = strtod(kv->value, &end_a), b = strtod(now, &end_b);
        int numbers = !*end_a && !*end_b && end_a != kv->value && end_b != now;
        if (numbers ? a != b : strcmp(now, kv->value) != 0)
            die("config JSON: %s is %s, but the other fields give %s (the file was not written by config_json "
                "of a consistent config)",
                kv->key, kv->value, now);
    }
    free(help);
    json_object_free(&out);
    json_object_free(&in);
}
