/* tokenizer_json.c: the JSON form of a tokenizer, the string stored in every token shard
 * and checkpoint (see tokenizer.h).
 *
 * JSON forms (tokenizer_to_json writes exactly these, keys in this order):
 *   {"kind":"byte","vocab_size":257,"eot_token":256}
 *   {"kind":"bpe","vocab_size":V,"eot_token":V-1,"pretokenizer":"deltamla-chunks-v1",
 *    "merges":[[a,b],[a,b],...]}            merge i makes token 256+i from tokens a, b
 * Data imported already tokenized carries {"kind":"imported",...}: a tokenizer that
 * deltamla does not have, so tokenizer_from_json refuses it with one line.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "tokenizer_internal.h"
#include "util.h"

char *tokenizer_to_json(const tokenizer *t)
{
    if (t->kind == TOKENIZER_KIND_BYTE) {
        char *s = xmalloc(64);
        snprintf(s, 64, "{\"kind\":\"byte\",\"vocab_size\":%d,\"eot_token\":%d}", t->vocab_size, t->eot);
        return s;
    }
    size_t cap = 160 + (size_t)t->n_merges * 26;
    char *s = xmalloc(cap);
    size_t o = (size_t)snprintf(s, cap,
                                "{\"kind\":\"bpe\",\"vocab_size\":%d,\"eot_token\":%d,\"pretokenizer\":\"%s\","
                                "\"merges\":[",
                                t->vocab_size, t->eot, BPE_PRETOKENIZER);
    for (int i = 0; i < t->n_merges; i++)
        o += (size_t)snprintf(s + o, cap - o, "%s[%" PRId32 ",%" PRId32 "]", i ? "," : "", t->merges[2 * i],
                              t->merges[2 * i + 1]);
    snprintf(s + o, cap - o, "]}");
    return s;
}

static void json_fail(size_t offset, const char *what) __attribute__((noreturn));
static void json_fail(size_t offset, const char *what)
{
    die("tokenizer JSON: %s at offset %zu", what, offset);
}

static int64_t json_int(const json_value *v)
{
    int64_t x = 0;
    if (json_i64(v, &x) != JSON_INT_OK) json_fail(v->offset, "expected an integer");
    return x;
}

static const char *json_str(const json_value *v)
{
    if (v->type != JSON_TYPE_STRING) json_fail(v->offset, "expected '\"'");
    return v->text;
}

tokenizer *tokenizer_from_json(const char *json)
{
    if (!json) die("tokenizer JSON: missing");
    json_error err;
    json_value *root = json_parse(json, strlen(json), 0, &err);
    if (!root) json_fail(err.offset, err.message);
    if (root->type != JSON_TYPE_OBJECT) json_fail(root->offset, "expected '{'");
    const char *kind = NULL, *pretok = NULL;
    int64_t vocab = -1, eot = -1;
    int32_t *merges = NULL;
    int64_t n_merges = -1;
    /* a key given twice keeps its last value; keys this version does not know are
     * ignored, so a newer writer's additions still load */
    for (size_t i = 0; i < root->count; i++) {
        const char *key = root->members[i].key;
        const json_value *v = &root->members[i].value;
        if (strcmp(key, "kind") == 0) {
            kind = json_str(v);
        } else if (strcmp(key, "pretokenizer") == 0) {
            pretok = json_str(v);
        } else if (strcmp(key, "vocab_size") == 0) {
            vocab = json_int(v);
        } else if (strcmp(key, "eot_token") == 0) {
            eot = json_int(v);
        } else if (strcmp(key, "merges") == 0) {
            if (v->type != JSON_TYPE_ARRAY) json_fail(v->offset, "expected '['");
            free(merges);
            merges = xmalloc((v->count ? v->count : 1) * 2 * sizeof *merges);
            n_merges = (int64_t)v->count;
            for (size_t m = 0; m < v->count; m++) {
                const json_value *pair = &v->items[m];
                if (pair->type != JSON_TYPE_ARRAY || pair->count != 2)
                    json_fail(pair->offset, "a merge must be a pair [a, b]");
                int64_t a = json_int(&pair->items[0]), b = json_int(&pair->items[1]);
                if (a < 0 || b < 0 || a > INT32_MAX || b > INT32_MAX) json_fail(pair->offset, "merge id out of range");
                merges[2 * m] = (int32_t)a;
                merges[2 * m + 1] = (int32_t)b;
            }
        }
    }
    if (!kind) die("tokenizer JSON: no \"kind\"");

    tokenizer *t = NULL;
    if (strcmp(kind, "byte") == 0) {
        if ((vocab != -1 && vocab != 257) || (eot != -1 && eot != 256))
            die("tokenizer JSON: a byte tokenizer has vocab_size 257 and eot_token 256 (got %" PRId64 " and %" PRId64 ")",
                vocab, eot);
        t = tokenizer_byte();
    } else if (strcmp(kind, "bpe") == 0) {
        if (n_merges < 0) die("tokenizer JSON: a bpe tokenizer needs \"merges\"");
        if (!pretok || strcmp(pretok, BPE_PRETOKENIZER) != 0)
            die("tokenizer JSON: pretokenizer '%s' is not known (this version splits text by '%s')",
                pretok ? pretok : "(none)", BPE_PRETOKENIZER);
        if (n_merges > INT_MAX - 257) die("tokenizer JSON: %" PRId64 " merges are too many", n_merges);
        if ((vocab != -1 && vocab != 257 + n_merges) || (eot != -1 && eot != 256 + n_merges))
            die("tokenizer JSON: %" PRId64 " merges give vocab_size %" PRId64 " and eot_token %" PRId64
                ", but it says %" PRId64 " and %" PRId64,
                n_merges, 257 + n_merges, 256 + n_merges, vocab, eot);
        t = tokenizer_bpe_from_merges(merges, (int)n_merges);
    } else if (strcmp(kind, "imported") == 0) {
        die("the data was imported already tokenized (tokenizer kind 'imported'); deltamla has no encoder or "
            "decoder for its tokens");
    } else {
        die("tokenizer JSON: unknown kind '%s' (known: byte, bpe)", kind);
    }
    json_free(root);
    free(merges);
    return t;
}
