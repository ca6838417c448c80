/* test_loader.c: checks of the HDF5 token-shard loader (io/loader.c) against the text
 * source and against rows computed here from the token stream.
 *
 * With no arguments (as tests/run_tests.sh runs it) the program writes its own shard
 * sets into a temporary directory and checks, in one process:
 *   - bytes as a uint16 shard set (four files, one of five tokens so that a row spans
 *     three shards) give exactly the text source's batches on the same bytes, for
 *     several epochs, both splits, one and three ranks (each rank played in turn), a
 *     global batch larger than the split, and through data_open (directory and file);
 *   - uint32 shards (vocab 70000) give the rows cut directly from the stream in the
 *     order of data_permute;
 *   - the prefetch thread: positions set from outside (a restore, an evaluation's rewind,
 *     right after a call while the next batch is being read) and a change of B give the
 *     batches of a fresh source at that position;
 *   - the loader's read rate, printed as "# loader: X M tokens/s".
 * MPI is initialised with MPI_THREAD_MULTIPLE, so the prefetch thread is on; with
 * --single it is initialised with MPI_Init and the loader reads synchronously.
 * Modes for tests/test_loader.sh (shards written by h5py, several ranks, bad input):
 *   --open PATH T VAL_FRACTION train|val       open, print the source's fields
 *   --dump PATH T B BATCHES VAL_FRACTION train|val
 *                                              print each row (T+1 tokens) read
 *   --ranks PATH T B BATCHES VAL_FRACTION train|val
 *                                              under mpirun: the ranks' rows of each
 *                                              global batch, gathered, equal one rank's
 *                                              batch of B*nranks rows
 * Prints "ok - ..." / "not ok - ..." lines and exits non-zero if any check failed.
 */
#define _POSIX_C_SOURCE 200809L
#include <hdf5.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "data.h"
#include "util.h"

#include "check.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t next_rand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static const char *byte_tokenizer = "{\"kind\":\"byte\",\"vocab_size\":257,\"eot\":256}";

/* Write tokens[0..n) as one shard in the documented format (fixed-length string
 * attributes, as a C writer makes them; h5py's variable-length ones are covered by
 * tests/test_loader.sh). chunk: /tokens' chunk length. */
static void write_shard(const char *path, const uint32_t *tokens, int64_t n, int64_t vocab, int64_t eot,
                        const char *tokenizer, hsize_t chunk)
{
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    fatal_check(f >= 0);
    int wide = vocab > 65536;
    hsize_t dims = (hsize_t)n, maxdims = H5S_UNLIMITED;
    hid_t space = H5Screate_simple(1, &dims, &maxdims);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, &chunk);
    hid_t ds = H5Dcreate2(f, "tokens", wide ? H5T_STD_U32LE : H5T_STD_U16LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    fatal_check(ds >= 0);
    if (n > 0) {
        if (wide) {
            H5Dwrite(ds, H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, tokens);
        } else {
            uint16_t *t16 = xmalloc((size_t)n * sizeof *t16);
            for (int64_t i = 0; i < n; i++) t16[i] = (uint16_t)tokens[i];
            H5Dwrite(ds, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, t16);
            free(t16);
        }
    }
    H5Dclose(ds);
    H5Sclose(space);
    H5Pclose(dcpl);
    /* documents: one every 100 tokens (the loader checks only the shape) */
    hsize_t ndocs = (hsize_t)((n + 99) / 100);
    uint64_t *docs = xmalloc((ndocs ? ndocs : 1) * sizeof *docs);
    for (hsize_t i = 0; i < ndocs; i++) docs[i] = i * 100;
    space = H5Screate_simple(1, &ndocs, NULL);
    ds = H5Dcreate2(f, "doc_offsets", H5T_STD_U64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    if (ndocs) H5Dwrite(ds, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, docs);
    H5Dclose(ds);
    H5Sclose(space);
    free(docs);

    hid_t scalar = H5Screate(H5S_SCALAR);
    const char *strs[2][2] = {{"format", "deltamla-tokens"}, {"tokenizer", tokenizer}};
    for (int i = 0; i < 2; i++) {
        hid_t st = H5Tcopy(H5T_C_S1);
        H5Tset_size(st, strlen(strs[i][1]));
        H5Tset_strpad(st, H5T_STR_NULLPAD);
        hid_t a = H5Acreate2(f, strs[i][0], st, scalar, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, st, strs[i][1]);
        H5Aclose(a);
        H5Tclose(st);
    }
    int64_t ints[5] = {1, vocab, eot, n, (int64_t)ndocs};
    const char *names[5] = {"version", "vocab_size", "eot_token", "num_tokens", "num_docs"};
    for (int i = 0; i < 5; i++) {
        hid_t a = H5Acreate2(f, names[i], H5T_STD_I64LE, scalar, H5P_DEFAULT, H5P_DEFAULT);
        H5Awrite(a, H5T_NATIVE_INT64, &ints[i]);
        H5Aclose(a);
    }
    H5Sclose(scalar);
    H5Fclose(f);
}

/* Write the stream as shards split at `cuts` (n_cuts ascending interior positions). */
static void write_shard_set(const char *dir, const uint32_t *tokens, int64_t n, const int64_t *cuts, int n_cuts,
                            int64_t vocab, int64_t eot, const char *tokenizer, hsize_t chunk)
{
    int64_t from = 0;
    for (int i = 0; i <= n_cuts; i++) {
        int64_t to = i < n_cuts ? cuts[i] : n;
        char path[512];
        snprintf(path, sizeof path, "%s/shard_%03d.h5", dir, i);
        write_shard(path, tokens + from, to - from, vocab, eot, tokenizer, chunk);
        from = to;
    }
}

typedef struct batch {
    int32_t *in, *tg;
    int B, T;
} batch;

static batch batch_new(int B, int T)
{
    batch b = {xmalloc((size_t)B * T * sizeof(int32_t)), xmalloc((size_t)B * T * sizeof(int32_t)), B, T};
    return b;
}

static void batch_free(batch *b)
{
    free(b->in);
    free(b->tg);
}

static int batch_equal(const batch *a, const batch *b)
{
    size_t n = (size_t)a->B * a->T * sizeof(int32_t);
    return a->B == b->B && memcmp(a->in, b->in, n) == 0 && memcmp(a->tg, b->tg, n) == 0;
}

/* Read `calls` batches of B rows from both sources and compare batches and positions;
 * returns the first call that differed, or -1. */
static int compare_sources(data_source *a, data_source *b, int B, int T, int calls)
{
    batch x = batch_new(B, T), y = batch_new(B, T);
    int bad = -1;
    for (int i = 0; i < calls && bad < 0; i++) {
        a->next_batch(a, x.in, x.tg, B, T);
        b->next_batch(b, y.in, y.tg, B, T);
        if (!batch_equal(&x, &y) || a->epoch != b->epoch || a->row != b->row) bad = i;
    }
    batch_free(&x);
    batch_free(&y);
    return bad;
}

/* ---- shards against the text source ---- */

static void test_against_text(const char *tmp)
{
    const int T = 16;
    const int64_t n = 5003;
    uint32_t *tokens = xmalloc((size_t)n * sizeof *tokens);
    unsigned char *bytes = xmalloc((size_t)n);
    for (int64_t i = 0; i < n; i++) bytes[i] = (unsigned char)(tokens[i] = next_rand() & 255);
    char text[512], dir[512], one[512];
    snprintf(text, sizeof text, "%s/stream.txt", tmp);
    snprintf(dir, sizeof dir, "%s/bytes", tmp);
    snprintf(one, sizeof one, "%s/bytes_one.h5", tmp);
    FILE *f = fopen(text, "wb");
    fwrite(bytes, 1, (size_t)n, f);
    fclose(f);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    fatal_check(system(cmd) == 0);
    /* 1000 and 1005 fall inside row 62 (tokens 992..1008): it spans three shards; 2600
     * falls inside row 162 */
    const int64_t cuts[] = {1000, 1005, 2600};
    write_shard_set(dir, tokens, n, cuts, 3, 257, 256, byte_tokenizer, 64);
    write_shard(one, tokens, n, 257, 256, byte_tokenizer, 1000);

    data_source *s = data_shards_open(dir, T, 7, 0.1, DATA_TRAIN, 0, 1);
    data_source *t = data_text_open(text, T, 7, 0.1, DATA_TRAIN, 0, 1);
    check(strcmp(s->kind, "shards") == 0 && s->num_tokens == n && s->num_rows == t->num_rows &&
              s->vocab_size == 257 && s->eot_token == 256 && s->max_token == 256 && s->tokenizer_json &&
              strcmp(s->tokenizer_json, byte_tokenizer) == 0 && s->rank == 0 && s->nranks == 1,
          "shard set fields: kind %s, %lld tokens, %lld train rows (text: %lld), vocab %d, eot %d, max %d", s->kind,
          (long long)s->num_tokens, (long long)s->num_rows, (long long)t->num_rows, s->vocab_size, s->eot_token,
          s->max_token);
    s->close(s);
    t->close(t);

    struct {
        double val;
        enum data_split split;
        int B, nranks, calls;
    } cases[] = {
        {0.0, DATA_TRAIN, 3, 1, 450},   /* 312 rows: about 4 epochs */
        {0.1, DATA_TRAIN, 4, 1, 300},
        {0.1, DATA_VAL, 2, 1, 80},      /* 31 rows */
        {0.1, DATA_TRAIN, 3, 3, 150},
        {0.1, DATA_VAL, 4, 3, 40},
        {0.1, DATA_VAL, 16, 3, 12},     /* global batch 48 > 31 rows: rows wrap */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int bad = -1, r;
        for (r = 0; r < cases[c].nranks && bad < 0; r++) {
            s = data_shards_open(dir, T, 99, cases[c].val, cases[c].split, r, cases[c].nranks);
            t = data_text_open(text, T, 99, cases[c].val, cases[c].split, r, cases[c].nranks);
            bad = compare_sources(s, t, cases[c].B, T, cases[c].calls);
            if (bad < 0 && s->epoch < 2) bad = 1000000; /* the case must cross epochs */
            s->close(s);
            t->close(t);
        }
        check(bad < 0, "4 shards (rows spanning 2 and 3 shards) = text source: %s split, val_fraction %g, B %d, "
                       "%d rank(s), %d calls%s",
              cases[c].split == DATA_TRAIN ? "train" : "val", cases[c].val, cases[c].B, cases[c].nranks, cases[c].calls,
              bad < 0 ? "" : " (differs)");
    }
    /* data_open routes a directory and a .h5 file to the loader */
    s = data_open(dir, T, 5, 0.0, DATA_TRAIN, 0, 1);
    t = data_text_open(text, T, 5, 0.0, DATA_TRAIN, 0, 1);
    check(strcmp(s->kind, "shards") == 0 && compare_sources(s, t, 5, T, 200) < 0,
          "data_open(directory) reads the shards, same batches as the text");
    s->close(s);
    t->close(t);
    s = data_open(one, T, 5, 0.2, DATA_VAL, 1, 2);
    t = data_text_open(text, T, 5, 0.2, DATA_VAL, 1, 2);
    check(strcmp(s->kind, "shards") == 0 && compare_sources(s, t, 4, T, 60) < 0,
          "data_open(file.h5) reads one shard, same batches as the text (val split, rank 1 of 2)");
    s->close(s);
    t->close(t);

    /* the prefetch thread against positions changed from outside */
    const int B = 3, calls = 12;
    s = data_shards_open(dir, T, 11, 0.1, DATA_TRAIN, 0, 1);
    batch first[12], x = batch_new(B, T), y = batch_new(B, T);
    for (int i = 0; i < calls; i++) {
        first[i] = batch_new(B, T);
        s->next_batch(s, first[i].in, first[i].tg, B, T);
    }
    int same = 1;
    for (int pass = 0; pass < 3; pass++) { /* an evaluation rewinds before each pass */
        s->epoch = 0;
        s->row = 0;
        for (int i = 0; i < calls; i++) {
            s->next_batch(s, x.in, x.tg, B, T);
            same = same && batch_equal(&x, &first[i]);
        }
    }
    check(same, "prefetch: rewinding to (0, 0) before each of 3 passes repeats the first %d batches", calls);
    /* restores to assorted positions, each right after a call (the next batch is being
     * prefetched), against a fresh source opened at that position */
    const int64_t pos[][2] = {{2, 18}, {0, 3}, {5, 0}, {1, 279}, {1, 276}, {0, 0}, {3, 1}};
    same = 1;
    for (size_t p = 0; p < sizeof pos / sizeof pos[0]; p++) {
        s->next_batch(s, x.in, x.tg, B, T);
        s->epoch = pos[p][0];
        s->row = pos[p][1];
        data_source *fresh = data_shards_open(dir, T, 11, 0.1, DATA_TRAIN, 0, 1);
        data_source *tx = data_text_open(text, T, 11, 0.1, DATA_TRAIN, 0, 1);
        fresh->epoch = tx->epoch = pos[p][0];
        fresh->row = tx->row = pos[p][1];
        batch z = batch_new(B, T);
        for (int i = 0; i < 4; i++) {
            s->next_batch(s, x.in, x.tg, B, T);
            fresh->next_batch(fresh, y.in, y.tg, B, T);
            tx->next_batch(tx, z.in, z.tg, B, T);
            same = same && batch_equal(&x, &y) && batch_equal(&x, &z) && s->epoch == tx->epoch && s->row == tx->row;
        }
        batch_free(&z);
        fresh->close(fresh);
        tx->close(tx);
    }
    check(same, "prefetch: restored positions (some past the epoch's end) give a fresh source's batches");
    /* B changes between calls: the prefetched batch (for the old B) is not used */
    t = data_text_open(text, T, 11, 0.1, DATA_TRAIN, 0, 1);
    t->epoch = s->epoch;
    t->row = s->row;
    same = 1;
    const int Bs[] = {3, 5, 5, 1, 8, 3};
    for (int i = 0; i < 6; i++) {
        batch a = batch_new(Bs[i], T), b = batch_new(Bs[i], T);
        s->next_batch(s, a.in, a.tg, Bs[i], T);
        t->next_batch(t, b.in, b.tg, Bs[i], T);
        same = same && batch_equal(&a, &b) && s->row == t->row;
        batch_free(&a);
        batch_free(&b);
    }
    check(same, "prefetch: B changing between calls (3, 5, 5, 1, 8, 3) gives the text source's batches");
    t->close(t);
    /* closing with a prefetch in flight: ends cleanly (reaching the next line is the check) */
    s->next_batch(s, x.in, x.tg, B, T);
    s->close(s);
    check(1, "close with a prefetch in flight returns");
    for (int i = 0; i < calls; i++) batch_free(&first[i]);
    batch_free(&x);
    batch_free(&y);
    free(tokens);
    free(bytes);
}

/* ---- uint32 shards against rows computed here ---- */

static void test_uint32(const char *tmp)
{
    const int T = 32, B = 4;
    const int64_t n = 9001, vocab = 70000;
    uint32_t *tokens = xmalloc((size_t)n * sizeof *tokens);
    int64_t wide = 0;
    for (int64_t i = 0; i < n; i++) {
        tokens[i] = next_rand() % (uint32_t)vocab;
        wide += tokens[i] > 65535;
    }
    char dir[512], cmd[600];
    snprintf(dir, sizeof dir, "%s/wide", tmp);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    fatal_check(system(cmd) == 0);
    const int64_t cuts[] = {4000, 4001};
    write_shard_set(dir, tokens, n, cuts, 2, vocab, vocab - 1, "{\"kind\":\"bpe\"}", 512);
    data_source *s = data_shards_open(dir, T, 3, 0.05, DATA_TRAIN, 0, 1);
    int64_t rows = data_rows(n, T), train = data_train_rows(rows, 0.05);
    check(s->num_rows == train && s->vocab_size == vocab && s->max_token == vocab - 1 && s->eot_token == vocab - 1,
          "uint32 shards: %lld train rows, vocab %d, eot %d", (long long)s->num_rows, s->vocab_size, s->eot_token);
    batch x = batch_new(B, T);
    int same = 1;
    int64_t epoch = 0, row = 0, seen_wide = 0;
    for (int call = 0; call < 2 * (int)(train / B) + 3; call++) {
        s->next_batch(s, x.in, x.tg, B, T);
        if (row + B > train && row > 0) {
            epoch++;
            row = 0;
        }
        for (int b = 0; b < B; b++) {
            int64_t r = data_permute((row + b) % train, train, 3, epoch);
            for (int i = 0; i < T; i++) {
                same = same && x.in[b * T + i] == (int32_t)tokens[r * T + i] &&
                       x.tg[b * T + i] == (int32_t)tokens[r * T + i + 1];
                seen_wide += x.in[b * T + i] > 65535;
            }
        }
        row += B;
    }
    check(same && seen_wide > 0 && wide > 0,
          "uint32 shards (vocab %lld): rows equal the stream's rows in data_permute order over 2 epochs "
          "(%lld tokens above 65535 read)",
          (long long)vocab, (long long)seen_wide);
    batch_free(&x);
    s->close(s);
    free(tokens);
}

/* ---- read rate ---- */

static void bench(const char *tmp)
{
    const int T = 1024, B = 16;
    const int64_t n = (int64_t)8 << 20;
    uint32_t *tokens = xmalloc((size_t)n * sizeof *tokens);
    for (int64_t i = 0; i < n; i++) tokens[i] = next_rand() % 50257;
    char dir[512], cmd[600];
    snprintf(dir, sizeof dir, "%s/bench", tmp);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    fatal_check(system(cmd) == 0);
    const int64_t cuts[] = {n / 4, n / 2, 3 * n / 4};
    write_shard_set(dir, tokens, n, cuts, 3, 50257, 50256, "{\"kind\":\"bpe\"}", 65536);
    free(tokens);
    data_source *s = data_shards_open(dir, T, 1, 0.0, DATA_TRAIN, 0, 1);
    batch x = batch_new(B, T);
    s->next_batch(s, x.in, x.tg, B, T); /* warm: first batch, page cache */
    int calls = 0;
    double t0 = wall_time(), t1 = t0;
    while (t1 - t0 < 1.0) {
        s->next_batch(s, x.in, x.tg, B, T);
        calls++;
        t1 = wall_time();
    }
    double per_batch = (t1 - t0) / calls;
    int provided;
    MPI_Query_thread(&provided);
    const char *how = provided == MPI_THREAD_MULTIPLE ? "prefetch thread" : "synchronous";
    printf("# loader: %.1f M tokens/s (B %d, T %d, uint16, 4 shards of %lld tokens, chunks of 65536, "
           "random rows, %s, page cache warm)\n",
           (double)calls * B * T / (t1 - t0) / 1e6, B, T, (long long)(n / 4), how);
    /* as in training on a GPU: each batch is followed by compute that the host thread
     * waits for (here a sleep of twice the read time); what next_batch still costs is the
     * read time the prefetch left exposed */
    double compute = 2 * per_batch, waited = 0;
    const int steps = 200;
    for (int i = 0; i < steps; i++) {
        double a = wall_time();
        s->next_batch(s, x.in, x.tg, B, T);
        double b = wall_time();
        waited += b - a;
        struct timespec ts = {0, (long)(compute * 1e9)};
        nanosleep(&ts, NULL);
    }
    printf("# loader: behind %.0f us of compute per batch, next_batch takes %.0f us (a read alone: %.0f us; %s)\n",
           compute * 1e6, waited / steps * 1e6, per_batch * 1e6, how);
    batch_free(&x);
    s->close(s);
}

/* ---- modes for tests/test_loader.sh ---- */

static enum data_split parse_split(const char *s) { return strcmp(s, "val") == 0 ? DATA_VAL : DATA_TRAIN; }

static int mode_open(char **argv)
{
    data_source *s = data_shards_open(argv[2], atoi(argv[3]), 1337, atof(argv[4]), parse_split(argv[5]), 0, 1);
    printf("kind=%s num_tokens=%lld num_rows=%lld vocab_size=%d eot_token=%d max_token=%d\n", s->kind,
           (long long)s->num_tokens, (long long)s->num_rows, s->vocab_size, s->eot_token, s->max_token);
    printf("tokenizer=%s\n", s->tokenizer_json ? s->tokenizer_json : "");
    s->close(s);
    return 0;
}

static int mode_dump(char **argv)
{
    int T = atoi(argv[3]), B = atoi(argv[4]), calls = atoi(argv[5]);
    data_source *s = data_shards_open(argv[2], T, 1337, atof(argv[6]), parse_split(argv[7]), 0, 1);
    batch x = batch_new(B, T);
    for (int c = 0; c < calls; c++) {
        s->next_batch(s, x.in, x.tg, B, T);
        for (int b = 0; b < B; b++) {
            printf("%lld", (long long)s->epoch);
            for (int i = 0; i < T; i++) printf(" %d", x.in[b * T + i]);
            printf(" %d\n", x.tg[b * T + T - 1]);
        }
    }
    batch_free(&x);
    s->close(s);
    return 0;
}

static int mode_ranks(char **argv)
{
    int rank, nranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    int T = atoi(argv[3]), B = atoi(argv[4]), calls = atoi(argv[5]);
    double val = atof(argv[6]);
    enum data_split split = parse_split(argv[7]);
    data_source *s = data_shards_open(argv[2], T, 2024, val, split, rank, nranks);
    data_source *one = rank == 0 ? data_shards_open(argv[2], T, 2024, val, split, 0, 1) : NULL;
    batch mine = batch_new(B, T), all = batch_new(B * nranks, T), ref = batch_new(B * nranks, T);
    int same = 1;
    int64_t epochs = 0;
    for (int c = 0; c < calls; c++) {
        s->next_batch(s, mine.in, mine.tg, B, T);
        MPI_Gather(mine.in, B * T, MPI_INT32_T, all.in, B * T, MPI_INT32_T, 0, MPI_COMM_WORLD);
        MPI_Gather(mine.tg, B * T, MPI_INT32_T, all.tg, B * T, MPI_INT32_T, 0, MPI_COMM_WORLD);
        int64_t pos[2] = {s->epoch, s->row}, pos0[2] = {0, 0};
        MPI_Reduce(pos, pos0, 2, MPI_INT64_T, MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            one->next_batch(one, ref.in, ref.tg, B * nranks, T);
            same = same && batch_equal(&all, &ref) && pos0[0] == s->epoch && pos0[1] == s->row &&
                   one->epoch == s->epoch && one->row == s->row;
            epochs = s->epoch;
        }
    }
    if (rank == 0)
        check(same && epochs >= 1,
              "%d ranks x B %d: each global batch's rows (gathered in rank order) equal one rank's batch of %d rows, "
              "positions agree (%d calls, %lld epochs crossed, %s split)",
              nranks, B, B * nranks, calls, (long long)epochs, split == DATA_TRAIN ? "train" : "val");
    batch_free(&mine);
    batch_free(&all);
    batch_free(&ref);
    s->close(s);
    if (one) one->close(one);
    return 0;
}

int main(int argc, char **argv)
{
    int single = argc > 1 && strcmp(argv[1], "--single") == 0;
    if (single) {
        MPI_Init(&argc, &argv);
    } else {
        int provided;
        MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    }
    int rc = 0;
    if (argc > 5 && strcmp(argv[1], "--open") == 0) {
        rc = mode_open(argv);
    } else if (argc > 7 && strcmp(argv[1], "--dump") == 0) {
        rc = mode_dump(argv);
    } else if (argc > 7 && strcmp(argv[1], "--ranks") == 0) {
        rc = mode_ranks(argv);
        int any;
        MPI_Allreduce(&failures, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        rc = any != 0;
    } else {
        int provided;
        MPI_Query_thread(&provided);
        printf("# MPI thread level %s: the loader %s\n", provided == MPI_THREAD_MULTIPLE ? "MULTIPLE" : "below MULTIPLE",
               provided == MPI_THREAD_MULTIPLE ? "prefetches on a thread" : "reads synchronously");
        char tmp[] = "/tmp/test_loader_XXXXXX";
        if (!mkdtemp(tmp)) die("cannot make a temporary directory");
        test_against_text(tmp);
        test_uint32(tmp);
        bench(tmp);
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
        rc = failures != 0;
    }
    MPI_Finalize();
    return rc;
}
