/* test_tokenizer.c: checks of the tokenizers (io/tokenizer.c) and of one shard written
 * and read back through io/shards.c.
 *
 * Covers the byte tokenizer, BPE encoding by merge rank and the pre-tokenizer's chunk
 * boundaries, exact round trips of UTF-8 text, the JSON form (round trip and the
 * refusals, each in a fork()ed child that must exit 1 with exactly one line), BPE
 * training (the first merges of small texts, ties going to the smallest pair), and a
 * shard: written, reopened, its tokens decoded with the tokenizer stored in it.
 * Prints "ok - ..." or "not ok - ..." per check and exits non-zero if any failed.
 */
#define _POSIX_C_SOURCE 200809L
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../io/shards.h"
#include "../io/tokenizer.h"

#include "check.h"

/* Encode s and compare with want[0..n). */
static int encodes_to(const tokenizer *t, const char *s, const int32_t *want, int64_t n)
{
    int32_t *ids;
    int64_t k = tokenizer_encode(t, (const unsigned char *)s, strlen(s), &ids);
    int same = k == n && memcmp(ids, want, (size_t)n * sizeof *ids) == 0;
    if (!same) {
        printf("# encoded \"%s\" to", s);
        for (int64_t i = 0; i < k; i++) printf(" %d", ids[i]);
        printf("\n");
    }
    free(ids);
    return same;
}

static int round_trips(const tokenizer *t, const char *s)
{
    int32_t *ids;
    size_t len = strlen(s);
    int64_t k = tokenizer_encode(t, (const unsigned char *)s, len, &ids);
    char *back;
    size_t n = tokenizer_decode(t, ids, k, &back);
    int same = n == len && memcmp(back, s, len) == 0;
    free(ids);
    free(back);
    return same;
}

/* Run fn(arg) in a child; it must exit 1 with exactly one stderr line holding `want`. */
static void expect_death(const char *what, void (*fn)(const char *), const char *arg, const char *want)
{
    int fd[2];
    if (pipe(fd) != 0) return;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 2);
        close(fd[0]);
        fn(arg);
        _exit(0);
    }
    close(fd[1]);
    char buf[2048];
    size_t n = 0;
    ssize_t r;
    while ((r = read(fd[0], buf + n, sizeof buf - 1 - n)) > 0) n += (size_t)r;
    buf[n] = 0;
    close(fd[0]);
    int status;
    waitpid(pid, &status, 0);
    int lines = 0;
    for (size_t i = 0; i < n; i++) lines += buf[i] == '\n';
    check(WIFEXITED(status) && WEXITSTATUS(status) == 1 && lines == 1 && strstr(buf, want), "%s -> %.*s", what,
          n && buf[n - 1] == '\n' ? (int)n - 1 : (int)n, buf);
}

static void parse_json(const char *json) { tokenizer_free(tokenizer_from_json(json)); }

static void decode_out_of_vocab(const char *json)
{
    tokenizer *t = tokenizer_from_json(json);
    int32_t id = 9999;
    char *s;
    tokenizer_decode(t, &id, 1, &s);
}

static const char *bpe_json_3 =
    "{\"kind\":\"bpe\",\"vocab_size\":260,\"eot_token\":259,\"pretokenizer\":\"deltamla-chunks-v1\","
    "\"merges\":[[32,97],[97,32],[256,98]]}";

int main(int argc, char **argv)
{
    /* refusals first: die() in a child before MPI is initialised exits plainly */
    expect_death("malformed JSON", parse_json, "{\"kind\":\"bpe\",", "tokenizer JSON");
    expect_death("unknown kind", parse_json, "{\"kind\":\"wordpiece\"}", "unknown kind 'wordpiece'");
    expect_death("merge referring to a later token", parse_json,
                 "{\"kind\":\"bpe\",\"pretokenizer\":\"deltamla-chunks-v1\",\"merges\":[[32,300]]}", "merge 0");
    expect_death("vocab_size disagreeing with the merges", parse_json,
                 "{\"kind\":\"bpe\",\"vocab_size\":999,\"eot_token\":998,\"pretokenizer\":\"deltamla-chunks-v1\","
                 "\"merges\":[[32,97]]}",
                 "1 merges give vocab_size 258");
    expect_death("imported tokens have no tokenizer", parse_json,
                 "{\"kind\":\"imported\",\"format\":\"llmc\",\"vocab_size\":50257,\"eot_token\":50256}", "imported");
    expect_death("decoding a token outside the vocabulary", decode_out_of_vocab, bpe_json_3, "outside the vocabulary");

    MPI_Init(&argc, &argv);

    tokenizer *byte = tokenizer_byte();
    check(tokenizer_vocab_size(byte) == 257 && tokenizer_eot(byte) == 256 && strcmp(tokenizer_kind(byte), "byte") == 0,
          "byte tokenizer: vocab 257, eot 256");
    int32_t want_byte[] = {0x43, 0xC3, 0xA9};
    check(encodes_to(byte, "C\xC3\xA9", want_byte, 3), "byte tokenizer: tokens are the UTF-8 bytes");
    char *json = tokenizer_to_json(byte);
    check(strcmp(json, "{\"kind\":\"byte\",\"vocab_size\":257,\"eot_token\":256}") == 0, "byte JSON: %s", json);
    free(json);
    int32_t with_eot[] = {104, 105, 256, 33};
    char *text;
    size_t n = tokenizer_decode(byte, with_eot, 4, &text);
    check(n == 3 && strcmp(text, "hi!") == 0, "end-of-text decodes to nothing");
    free(text);

    tokenizer *bpe = tokenizer_from_json(bpe_json_3);
    check(tokenizer_vocab_size(bpe) == 260 && tokenizer_eot(bpe) == 259 && strcmp(tokenizer_kind(bpe), "bpe") == 0,
          "bpe from JSON: vocab 260, eot 259");
    int32_t w1[] = {120, 32, 256};
    check(encodes_to(bpe, "x  a", w1, 3), "chunks: a space before a word joins it, the other spaces stay apart");
    int32_t w2[] = {10, 256};
    check(encodes_to(bpe, "\n a", w2, 2), "chunks: the last space of a whitespace run joins the next word");
    int32_t w3[] = {97, 32, 98};
    check(encodes_to(bpe, "a b", w3, 3), "merges never cross a chunk boundary ('a ' is not merged)");
    int32_t w4[] = {258};
    check(encodes_to(bpe, " ab", w4, 1), "merges apply by rank: ' a' then ' a'+'b'");
    json = tokenizer_to_json(bpe);
    check(strcmp(json, bpe_json_3) == 0, "bpe JSON round trip is exact");
    free(json);
    const char *samples[] = {"", "plain ASCII, with punctuation!?", "Caf\xC3\xA9 na\xC3\xAFve \xE2\x80\x94 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E",
                             "emoji \xF0\x9F\x99\x82 and tabs\t\tand\r\nnewlines\n\n\n", "  leading and trailing  "};
    int all = 1;
    for (size_t i = 0; i < sizeof samples / sizeof *samples; i++) all &= round_trips(bpe, samples[i]);
    check(all, "bpe round trip of ASCII, multi-byte UTF-8 and whitespace");

    /* training: "abab" has (a,b) twice, (b,a) once; then the word is [ab ab] */
    bpe_trainer *tr = bpe_trainer_new();
    bpe_trainer_add(tr, (const unsigned char *)"abab", 4);
    tokenizer *t1 = bpe_trainer_finish(tr, 300, MPI_COMM_WORLD, NULL);
    json = tokenizer_to_json(t1);
    check(tokenizer_vocab_size(t1) == 259 && strstr(json, "\"merges\":[[97,98],[256,256]]"),
          "training: most frequent pair first, stops when nothing is left to merge: %s", json);
    free(json);
    tokenizer_free(t1);
    /* "ab cd": (a,b), (' ',c), (c,d) once each: the tie goes to the smallest pair */
    tr = bpe_trainer_new();
    bpe_trainer_add(tr, (const unsigned char *)"ab cd", 5);
    t1 = bpe_trainer_finish(tr, 258, MPI_COMM_WORLD, NULL);
    json = tokenizer_to_json(t1);
    check(strstr(json, "\"merges\":[[32,99]]") != NULL, "training: ties go to the smallest pair: %s", json);
    free(json);
    tokenizer_free(t1);
    /* a trained tokenizer round-trips its own corpus and text it never saw */
    const char *corpus = "the cat sat on the mat; the cat ate the rat. Caf\xC3\xA9 caf\xC3\xA9 caf\xC3\xA9!";
    tr = bpe_trainer_new();
    bpe_trainer_add(tr, (const unsigned char *)corpus, strlen(corpus));
    t1 = bpe_trainer_finish(tr, 280, MPI_COMM_WORLD, NULL);
    int32_t *ids;
    int64_t k = tokenizer_encode(t1, (const unsigned char *)corpus, strlen(corpus), &ids);
    check(k < (int64_t)strlen(corpus) / 2 && round_trips(t1, corpus) && round_trips(t1, samples[3]),
          "trained BPE: %lld tokens for %zu bytes, exact round trips", (long long)k, strlen(corpus));

    /* one shard written and read back, decoded with the tokenizer stored in it */
    char dir[] = "/tmp/test_tokenizer_XXXXXX";
    if (mkdtemp(dir)) {
        char path[64];
        snprintf(path, sizeof path, "%s/shard_00000.h5", dir);
        int64_t total = k + 1;
        uint16_t *stored = malloc((size_t)total * sizeof *stored);
        for (int64_t i = 0; i < k; i++) stored[i] = (uint16_t)ids[i];
        stored[k] = (uint16_t)tokenizer_eot(t1);
        char *tj = tokenizer_to_json(t1);
        uint64_t doc0 = 0;
        shard_meta meta = {tokenizer_vocab_size(t1), tokenizer_eot(t1), (uint64_t)total, 1, tj, 0, 1, 0};
        shard_part part = {0, (uint64_t)total, stored, 0, 1, &doc0};
        shard_write(path, MPI_COMM_SELF, &meta, &part);
        shard_reader r;
        shard_open(&r, path, MPI_COMM_SELF);
        int32_t *back = malloc((size_t)total * sizeof *back);
        shard_read_tokens(&r, 0, (uint64_t)total, back);
        uint64_t *docs = shard_read_doc_offsets(&r);
        tokenizer *again = tokenizer_from_json(r.meta.tokenizer_json);
        char *dec;
        size_t dn = tokenizer_decode(again, back, total, &dec);
        check(r.token_bytes == 2 && r.meta.num_tokens == (uint64_t)total && r.meta.num_docs == 1 && docs[0] == 0 &&
                  back[total - 1] == tokenizer_eot(t1) && dn == strlen(corpus) && memcmp(dec, corpus, dn) == 0,
              "shard round trip: uint16 tokens, doc_offsets, tokenizer attribute decodes the text");
        char **list;
        int ns = shards_list(dir, &list);
        check(ns == 1 && strcmp(list[0], path) == 0, "shards_list finds the shard");
        for (int i = 0; i < ns; i++) free(list[i]);
        free(list);
        shard_close(&r);
        free(dec);
        free(docs);
        free(back);
        free(stored);
        free(tj);
        tokenizer_free(again);
        unlink(path);
        rmdir(dir);
    } else {
        check(0, "cannot create a temporary folder");
    }
    free(ids);
    tokenizer_free(t1);
    tokenizer_free(bpe);
    tokenizer_free(byte);
    MPI_Finalize();
    return failures ? 1 : 0;
}
