/* prep.c: `deltamla prep`, text files (or llm.c .bin / .npy token files) in, token
 * shards out (io/shards.h), in parallel over MPI ranks.
 *
 * The run, on every rank:
 *   1. Rank 0 expands the inputs (folders recursively, each folder's files sorted by
 *      path), checks the output directory, and broadcasts the file list with sizes.
 *   2. The files are cut into contiguous ranges of about equal bytes, one per rank, in
 *      list order; each rank reads, checks and tokenizes only its own range.
 *   3. With --tokenizer bpe the ranks first count the chunks of their text (at most
 *      --bpe_train_bytes of the corpus, taken evenly from every file) and train one BPE
 *      together (io/tokenizer.c: pair counts are combined across ranks).
 *   4. The ranks' token counts give each rank its place in the global stream; the
 *      stream is cut into shards of exactly --shard_tokens tokens (the last one
 *      shorter), and every shard is written collectively, each rank writing the part of
 *      it that it holds.
 * The stream is the tokens of the files in list order, so it, and with it every shard
 * file's contents, is the same for any rank count. io/SHARDS.md has the user's view.
 *
 * Errors: a problem one rank finds (a file that is not UTF-8, a bad header) is kept
 * until the next agreement point, where all ranks learn the first one in list order;
 * it is printed once through die() and every rank exits with status 1, before any shard
 * is written.
 *
 * This file holds the run and the error agreement; the flags are in prep_options.c, the
 * file list in prep_inputs.c, text in prep_text.c, token-file imports in prep_import.c,
 * progress lines in prep_progress.c (prep_internal.h declares what they share).
 */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <inttypes.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../io/shards.h"
#include "../io/tokenizer.h"
#include "commands.h"
#include "prep_internal.h"
#include "util.h"

#define GPT2_VOCAB 50257
#define GPT2_EOT 50256
/* the most vocabulary a trained BPE may ask for: it bounds the merge tables */
#define BPE_MAX_VOCAB (1 << 22)
#define MAX_SHARDS 1000000

/* ---- errors agreed over the ranks ---- */

int prep_rank, prep_size;
char prep_err[1024]; /* this rank's first error, "" while none */

void prep_fail(const char *fmt, ...)
{
    if (prep_err[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prep_err, sizeof prep_err, fmt, ap);
    va_end(ap);
}

/* Collective: if any rank has an error, every rank ends with status 1 and the lowest
 * failing rank's message (the first problem in file-list order, as ranks hold the list
 * in order) is printed once, by rank 0, through die(). */
void prep_sync_errors(void)
{
    int mine = prep_err[0] ? prep_rank : prep_size, first;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first == prep_size) return;
    MPI_Bcast(prep_err, (int)sizeof prep_err, MPI_CHAR, first, MPI_COMM_WORLD);
    /* finalize first: die() then prints its line without aborting the job, so mpirun
     * adds no abort report to the one line */
    MPI_Finalize();
    if (prep_rank == 0) die("%s", prep_err);
    exit(1);
}

static const char *const input_format_names[] = {"text", "llm.c .bin", ".npy"};

/* ---- the output ---- */

/* Rank 0: create the output directory (and its parents) or, with --force, remove the
 * shards a previous run left there, so a smaller data set cannot inherit stale ones. */
static void prepare_output(const char *dir)
{
    char *path = xmalloc(strlen(dir) + 1);
    strcpy(path, dir);
    for (char *p = path + 1; *p && !prep_err[0]; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(path, 0777) != 0 && errno != EEXIST) prep_fail("cannot create output directory %s: %s", path, strerror(errno));
        *p = '/';
    }
    if (!prep_err[0] && mkdir(path, 0777) != 0 && errno != EEXIST)
        prep_fail("cannot create output directory %s: %s", path, strerror(errno));
    free(path);
    if (prep_err[0]) return;
    char **old;
    int n = shards_list(dir, &old);
    for (int i = 0; i < n; i++) {
        if (!prep_err[0] && unlink(old[i]) != 0) prep_fail("cannot remove old shard %s: %s", old[i], strerror(errno));
        free(old[i]);
    }
    free(old);
}

static const char *human_bytes(double b, char *buf, size_t size)
{
    const char *unit[] = {"B", "KB", "MB", "GB", "TB"};
    int u = 0;
    while (b >= 1000 && u < 4) b /= 1000, u++;
    snprintf(buf, size, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
    return buf;
}

int prep_main(int argc, char **argv)
{
    MPI_Comm_rank(MPI_COMM_WORLD, &prep_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &prep_size);
    double t_start = wall_time();
    prep_options o;
    int given[N_PREP_OPTS];
    prep_parse(&o, given, argc, argv);
    prep_sync_errors();
    if (o.help) {
        if (prep_rank == 0) prep_usage(stdout);
        return 0;
    }

    /* flags alone: every rank reaches the same verdict */
    if (!o.n_input) prep_fail("no --input given (deltamla prep --help lists the flags)");
    else if (!o.output) prep_fail("no --output directory given");
    else if (o.shard_tokens < 1) prep_fail("--shard_tokens must be at least 1 (got %" PRId64 ")", o.shard_tokens);
    else if (o.bpe_train_bytes < 1) prep_fail("--bpe_train_bytes must be at least 1 (got %" PRId64 ")", o.bpe_train_bytes);
    else if (o.progress_interval < 0) prep_fail("--progress_interval must not be negative");
    prep_sync_errors();

    file_list files = {0};
    if (prep_rank == 0) prep_list_inputs(&o, &files);
    prep_sync_errors();
    prep_bcast_list(&files);

    /* what the list implies */
    int64_t n_files = files.n;
    uint64_t total_bytes = 0;
    int64_t first_text = -1, first_tokens = -1;
    for (int64_t i = 0; i < n_files; i++) {
        total_bytes += files.f[i].size;
        if (files.f[i].format == INPUT_TEXT && first_text < 0) first_text = i;
        if (files.f[i].format != INPUT_TEXT && first_tokens < 0) first_tokens = i;
    }
    int importing = first_tokens >= 0;
    int bpe = strcmp(o.tokenizer, "bpe") == 0;
    int by_blank_line = strcmp(o.doc_split, "blank_line") == 0;
    int64_t vocab = 257, eot = 256;
    if (n_files == 0) {
        prep_fail("empty corpus: no files in %s%s", o.input[0], o.n_input > 1 ? " and the other inputs" : "");
    } else if (first_text >= 0 && importing) {
        prep_fail("cannot mix text (%s) and token files (%s) in one data set; prepare them separately", files.f[first_text].path,
             files.f[first_tokens].path);
    } else if (total_bytes == 0) {
        prep_fail("empty corpus: the %" PRId64 " input file%s hold%s no data", n_files, n_files > 1 ? "s" : "",
             n_files > 1 ? "" : "s");
    } else if (importing) {
        const input_file *f = &files.f[first_tokens];
        vocab = given[prep_opt_index("vocab_size")] ? o.vocab_size : GPT2_VOCAB;
        eot = given[prep_opt_index("eot_token")] ? o.eot_token : GPT2_EOT;
        if (given[prep_opt_index("tokenizer")])
            prep_fail("--tokenizer applies to text; %s is already tokenized (%s)", f->path, input_format_names[f->format]);
        else if (given[prep_opt_index("doc_split")])
            prep_fail("--doc_split applies to text; imported tokens are cut into documents at --eot_token");
        else if (vocab < 1 || vocab > INT32_MAX) /* token ids are int32 once loaded */
            prep_fail("--vocab_size %" PRId64 " is outside 1 .. 2147483647", vocab);
        else if (eot < 0 || eot >= vocab)
            prep_fail("--eot_token %" PRId64 " is not a token of --vocab_size %" PRId64 "%s", eot, vocab,
                 given[prep_opt_index("eot_token")] ? "" : " (50256 is the default: pass --eot_token)");
    } else {
        if (given[prep_opt_index("eot_token")]) {
            prep_fail("--eot_token applies to imported tokens; text gets the tokenizer's end-of-text token");
        } else if (!bpe) {
            if (given[prep_opt_index("vocab_size")] && o.vocab_size != 257)
                prep_fail("--vocab_size %" PRId64 ": the byte tokenizer has exactly 257 tokens (256 bytes and end-of-text)",
                     o.vocab_size);
        } else if (!given[prep_opt_index("vocab_size")]) {
            prep_fail("--tokenizer bpe needs --vocab_size N (at least 257: 256 bytes, the merges, end-of-text)");
        } else if (o.vocab_size < 257) {
            prep_fail("vocab too small: --vocab_size %" PRId64 " for bpe must be at least 257 (256 bytes and end-of-text)",
                 o.vocab_size);
        } else if (o.vocab_size > BPE_MAX_VOCAB) {
            prep_fail("--vocab_size %" PRId64 " is larger than a trained BPE may be (%d)", o.vocab_size, BPE_MAX_VOCAB);
        } else {
            vocab = o.vocab_size;
        }
    }
    prep_sync_errors();

    /* contiguous ranges of files by size, one per rank, in list order */
    int64_t my_first = n_files, my_end = n_files;
    {
        uint64_t prefix = 0;
        for (int64_t i = 0; i < n_files; i++) {
            int owner = (int)((double)prefix / (double)total_bytes * prep_size);
            if (owner >= prep_size) owner = prep_size - 1;
            if (owner == prep_rank && my_first == n_files) my_first = i;
            if (owner > prep_rank) {
                my_end = i;
                break;
            }
            prefix += files.f[i].size;
        }
        if (my_first > my_end) my_first = my_end;
    }

    tokenizer *tok = NULL;
    if (!importing && bpe) {
        prep_progress_begin("counting", o.progress_interval, total_bytes);
        bpe_trainer *trainer = bpe_trainer_new();
        for (int64_t i = my_first; i < my_end && !prep_err[0]; i++) {
            uint64_t size = files.f[i].size, share = size;
            if (total_bytes > (uint64_t)o.bpe_train_bytes)
                share = (uint64_t)((long double)size * (long double)o.bpe_train_bytes / (long double)total_bytes);
            prep_count_text_file(&files.f[i], trainer, share, by_blank_line);
        }
        prep_progress_end();
        prep_sync_errors();
        prep_progress_begin("training", o.progress_interval, 0);
        tok = bpe_trainer_finish(trainer, (int)vocab, MPI_COMM_WORLD, prep_bpe_progress);
        if (tokenizer_vocab_size(tok) < vocab && prep_rank == 0)
            fprintf(stderr, "prep: note: the corpus allows only %d merges, so the vocabulary has %d tokens, not %" PRId64 "\n",
                    tokenizer_vocab_size(tok) - 257, tokenizer_vocab_size(tok), vocab);
        vocab = tokenizer_vocab_size(tok);
        eot = tokenizer_eot(tok);
    } else if (!importing) {
        tok = tokenizer_byte();
    }

    /* this rank's part of the stream */
    token_buf stream = {NULL, 0, 0, shard_token_bytes(vocab)};
    prep_progress_begin("encoding", o.progress_interval, total_bytes);
    for (int64_t i = my_first; i < my_end && !prep_err[0]; i++) {
        const input_file *f = &files.f[i];
        if (f->format == INPUT_TEXT) prep_encode_text_file(f, tok, by_blank_line, !bpe, &stream);
        else if (f->format == INPUT_LLMC) prep_import_llmc(f, vocab, &stream);
        else prep_import_npy(f, vocab, &stream);
    }
    prep_progress_end();
    prep_sync_errors();

    /* the rank's place in the global stream */
    uint64_t mine[2] = {stream.n, stream.n && token_buf_at(&stream, stream.n - 1) == (uint32_t)eot};
    uint64_t *all = xmalloc((size_t)prep_size * 2 * sizeof *all);
    MPI_Allgather(mine, 2, MPI_UINT64_T, all, 2, MPI_UINT64_T, MPI_COMM_WORLD);
    uint64_t offset = 0, total = 0;
    int prev_eot = 1; /* the stream's start counts as following an end-of-text */
    for (int r = 0; r < prep_size; r++) {
        if (r < prep_rank) {
            offset += all[2 * r];
            if (all[2 * r]) prev_eot = (int)all[2 * r + 1];
        }
        total += all[2 * r];
    }
    free(all);
    if (total == 0) prep_fail("empty corpus: the inputs hold no %s", importing ? "tokens" : "text (only blank lines)");
    uint64_t S = (uint64_t)o.shard_tokens;
    uint64_t n_shards = total ? (total + S - 1) / S : 0;
    if (n_shards > MAX_SHARDS)
        prep_fail("--shard_tokens %" PRIu64 " cuts %" PRIu64 " tokens into %" PRIu64 " shards, more than %d; use larger shards",
             S, total, n_shards, MAX_SHARDS);
    prep_sync_errors();

    /* document starts: position 0 and every position after an end-of-text */
    uint64_t n_starts = 0, cap_starts = 1024;
    uint64_t *starts = xmalloc(cap_starts * sizeof *starts); /* global positions, ascending */
    for (uint64_t i = 0; i < stream.n; i++) {
        int is_start = i == 0 ? prev_eot : token_buf_at(&stream, i - 1) == (uint32_t)eot;
        if (!is_start) continue;
        if (n_starts == cap_starts) {
            starts = realloc(starts, (size_t)(cap_starts *= 2) * sizeof *starts);
            if (!starts) die("out of host memory listing documents");
        }
        starts[n_starts++] = offset + i;
    }
    uint64_t *docs_here = xcalloc((size_t)n_shards, sizeof(uint64_t));
    uint64_t *docs_before = xcalloc((size_t)n_shards, sizeof(uint64_t));
    uint64_t *docs_total = xcalloc((size_t)n_shards, sizeof(uint64_t));
    for (uint64_t d = 0; d < n_starts; d++) docs_here[starts[d] / S]++;
    MPI_Exscan(docs_here, docs_before, (int)n_shards, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (prep_rank == 0) memset(docs_before, 0, (size_t)n_shards * sizeof *docs_before);
    MPI_Allreduce(docs_here, docs_total, (int)n_shards, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    uint64_t total_docs = 0;
    for (uint64_t k = 0; k < n_shards; k++) total_docs += docs_total[k];

    if (prep_rank == 0) prepare_output(o.output);
    prep_sync_errors();

    char *json = NULL;
    if (tok) {
        json = tokenizer_to_json(tok);
    } else {
        size_t cap = 160;
        json = xmalloc(cap);
        int llmc = 0, npy = 0;
        for (int64_t i = 0; i < n_files; i++) {
            llmc |= files.f[i].format == INPUT_LLMC;
            npy |= files.f[i].format == INPUT_NPY;
        }
        snprintf(json, cap, "{\"kind\":\"imported\",\"format\":\"%s\",\"vocab_size\":%" PRId64 ",\"eot_token\":%" PRId64 "}",
                 llmc && npy ? "llmc+npy" : llmc ? "llmc" : "npy", vocab, eot);
    }
    size_t path_cap = strlen(o.output) + 64;
    char *path = xmalloc(path_cap);
    uint64_t *local_docs = xmalloc((size_t)(n_starts + 1) * sizeof *local_docs);
    uint64_t d_next = 0;
    double t_write = wall_time(), last_line = t_write;
    for (uint64_t k = 0; k < n_shards; k++) {
        uint64_t lo = k * S, hi = lo + S < total ? lo + S : total;
        uint64_t a = offset > lo ? offset : lo, b = offset + stream.n < hi ? offset + stream.n : hi;
        shard_part part = {0};
        if (a < b) {
            part.token_start = a - lo;
            part.token_count = b - a;
            part.tokens = stream.data + (a - offset) * (uint64_t)stream.width;
        }
        part.doc_start = docs_before[k];
        part.doc_count = docs_here[k];
        for (uint64_t d = 0; d < docs_here[k]; d++) local_docs[d] = starts[d_next + d] - lo;
        part.doc_offsets = local_docs;
        d_next += docs_here[k];
        shard_meta meta = {vocab, eot, hi - lo, docs_total[k], json, (int64_t)k, (int64_t)n_shards, lo};
        char name[48];
        shard_file_name(name, sizeof name, (int64_t)k, (int64_t)n_shards);
        snprintf(path, path_cap, "%s/%s", o.output, name);
        shard_write(path, MPI_COMM_WORLD, &meta, &part);
        double now = wall_time();
        if (prep_rank == 0 && now - last_line >= o.progress_interval && now - t_write >= o.progress_interval) {
            fprintf(stderr, "prep: wrote shard %" PRIu64 " of %" PRIu64 "\n", k + 1, n_shards);
            last_line = now;
        }
    }

    if (prep_rank == 0) {
        char hb[32];
        printf("prep: %" PRId64 " file%s (%s) -> %" PRIu64 " tokens, %" PRIu64 " documents, %" PRIu64
               " shard%s in %s (%s, vocab %" PRId64 ", eot %" PRId64 ") in %.1f s on %d rank%s\n",
               n_files, n_files == 1 ? "" : "s", human_bytes((double)total_bytes, hb, sizeof hb), total, total_docs,
               n_shards, n_shards == 1 ? "" : "s", o.output, tok ? tokenizer_kind(tok) : "imported", vocab, eot,
               wall_time() - t_start, prep_size, prep_size == 1 ? "" : "s");
        fflush(stdout);
    }
    free(path);
    free(local_docs);
    free(json);
    free(starts);
    free(docs_here);
    free(docs_before);
    free(docs_total);
    free(stream.data);
    prep_progress_free();
    tokenizer_free(tok);
    for (int64_t i = 0; i < files.n; i++) free(files.f[i].path);
    free(files.f);
    free(o.input);
    return 0;
}
