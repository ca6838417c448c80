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
#include "json.h"
#include "util.h"

/* The text a flag would take for a scalar value: strings unescaped, numbers exactly as
 * written, true/false/null spelled out. */
static const char *scalar_text(const json_value *v)
{
    switch (v->type) {
    case JSON_TYPE_STRING:
    case JSON_TYPE_NUMBER: return v->text;
    case JSON_TYPE_BOOL: return v->boolean ? "true" : "false";
    default: return "null";
    }
}

/* Parse text as one flat object of strings, numbers and literals (what config_json
 * writes). Returns the tree, or NULL with *where set to the byte offset of the first
 * problem: a syntax error, or a value that is an array or object. */
static json_value *parse_flat_object(const char *text, size_t *where)
{
    json_error err;
    json_value *v = json_parse(text, strlen(text), 0, &err);
    if (!v) {
        *where = err.offset;
        return NULL;
    }
    size_t bad = v->offset;
    int ok = v->type == JSON_TYPE_OBJECT;
    for (size_t i = 0; ok && i < v->count; i++) {
        json_type t = v->members[i].value.type;
        if (t == JSON_TYPE_ARRAY || t == JSON_TYPE_OBJECT) {
            ok = 0;
            bad = v->members[i].value.offset;
        }
    }
    if (ok) return v;
    *where = bad;
    json_free(v);
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
    size_t where = 0;
    json_value *in = parse_flat_object(json, &where);
    if (!in) die("config JSON is malformed near byte %zu (expected one flat object as config_json writes)", where);

    char *help = NULL;
    size_t help_len = 0;
    FILE *hf = open_memstream(&help, &help_len);
    if (!hf) die("out of host memory reading a config");
    config_help(hf);
    fclose(hf);

    /* argv for config_parse: --size first, so the preset is the stored one; every
     * stored flag then overrides it, as on the original command line */
    char **argv = xcalloc(in->count + 1, sizeof *argv);
    int argc = 0;
    for (size_t i = 0; i < in->count; i++) {
        const json_member *kv = &in->members[i];
        if (!is_flag(help, kv->key)) continue;
        const char *value = scalar_text(&kv->value);
        if (strcmp(value, "null") == 0) die("config JSON: %s is null", kv->key);
        size_t n = strlen(kv->key) + strlen(value) + 4;
        argv[argc] = xmalloc(n);
        snprintf(argv[argc], n, "--%s=%s", kv->key, value);
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
    json_value *out = parse_flat_object(text, &where);
    if (!out) die("internal: config_json wrote JSON that does not parse back");
    free(text);
    for (size_t i = 0; i < in->count; i++) {
        const json_member *kv = &in->members[i];
        const json_value *now_v = json_get(out, kv->key);
        if (!now_v) die("config JSON has a field '%s' that this build of deltamla does not know", kv->key);
        if (is_flag(help, kv->key)) continue;
        const char *was = scalar_text(&kv->value), *now = scalar_text(now_v);
        /* anything that reads as a number compares by value, so 1e-3 written as 0.001
         * is the same field */
        char *end_a, *end_b;
        double a = strtod(was, &end_a), b = strtod(now, &end_b);
        int numbers = !*end_a && !*end_b && end_a != was && end_b != now;
        if (numbers ? a != b : strcmp(now, was) != 0)
            die("config JSON: %s is %s, but the other fields give %s (the file was not written by config_json "
                "of a consistent config)",
                kv->key, was, now);
    }
    free(help);
    json_free(out);
    json_free(in);
}
