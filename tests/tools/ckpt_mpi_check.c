/* ckpt_mpi_check.c: checks of the collective checkpoint writer and reader that need
 * several MPI ranks, run by tests/test_checkpoint.sh under mpirun -np 1, 2 and 4 (it is
 * a tool, not a test_* program, because it means something only under mpirun).
 *
 *   ckpt_mpi_check write DIR    every rank builds the tiny model on the CPU backend from
 *                               the same seed and trains two steps on the same tokens
 *                               (so the optimizer state and router biases are not
 *                               zero), for muon and for adamw; then checks the default
 *                               ownership map (every tensor's rows split into disjoint
 *                               slices that cover it), saves with that map to
 *                               DIR/<opt>/split and with rank 0 owning everything to
 *                               DIR/<opt>/single, checks the two files are byte for byte
 *                               the same and pass ckpt_verify, and loads the split file
 *                               on every rank into a zeroed trainer that must then equal
 *                               the original bit for bit (weights, both moments, router
 *                               biases, step counters, data position).
 *   ckpt_mpi_check same A B     one rank: do two checkpoint files hold the same state?
 *                               Every dataset bit for bit and the step, skipped, data
 *                               position and optimizer attributes (not the config,
 *                               which names output directories). Exit 0 if so.
 *   ckpt_mpi_check verify FILE  one rank: ckpt_verify; prints "good" or the reason and
 *                               exits 0 or 1.
 *
 * Output: "ok - ..." / "not ok - ..." lines from rank 0.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hdf5.h>
#include <mpi.h>

#include "../../io/checkpoint.h"
#include "util.h"

static int rank, nranks, failures;

static void check(int good, const char *fmt, const char *detail)
{
    int all = 0;
    MPI_Allreduce(&good, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (rank == 0) {
        printf("%s - %s (%d rank%s)%s%s\n", all ? "ok" : "not ok", fmt, nranks, nranks == 1 ? "" : "s",
               detail && !all ? ": " : "", detail && !all ? detail : "");
        fflush(stdout);
    }
    if (!all) failures++;
}

static void make_config(config *c, const char *optimizer)
{
    char *argv[] = {"--size", "tiny", "--batch_size", "2", "--block_size", "32", "--device", "cpu",
                    "--optimizer_type", (char *)optimizer, "--learning_rate", "2e-3", "--warmup_iters", "0"};
    config_parse(c, (int)(sizeof argv / sizeof argv[0]), argv);
}

static void train_two_steps(trainer *tr)
{
    size_t n = (size_t)tr->cfg.batch_size * tr->cfg.block_size;
    int32_t *in = xmalloc(n * sizeof *in), *tg = xmalloc(n * sizeof *tg);
    for (int step = 0; step < 2; step++) {
        for (size_t i = 0; i < n; i++) {
            in[i] = (int32_t)((i * 7 + 3 + step) % 251);
            tg[i] = (int32_t)((i * 7 + 10 + step) % 251);
        }
        step_stats st;
        trainer_grads(tr, in, tg, &st);
        trainer_apply(tr, &st);
    }
    free(in);
    free(tg);
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = xmalloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

/* 1 if the backend buffers a and b of n floats are bitwise equal (CPU backend: host). */
static int same_floats(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

/* The CPU backend under another name: checkpoint.c then treats its memory as device
 * memory and goes through to_host/from_host and its staging buffers, the path the CUDA
 * backend takes, which this test can then run without a GPU. */
static const backend *staged_backend(void)
{
    static backend b;
    b = *backend_cpu();
    b.name = "cpu-as-device";
    return &b;
}

static void write_checks(const char *dir, const char *optimizer, const backend *be)
{
    config c;
    make_config(&c, optimizer);
    trainer tr;
    trainer_init(&tr, &c, be);
    train_two_steps(&tr);
    tr.skipped = 3;
    data_source src;
    memset(&src, 0, sizeof src);
    src.kind = "check";
    src.epoch = 1;
    src.row = 42;
    src.num_rows = 100;
    src.nranks = 1;
    const char *tok = "{\"kind\":\"byte\",\"note\":\"a tokenizer attribute\"}";
    src.tokenizer_json = tok;

    /* the default map: disjoint slices covering every tensor, each rank writing some */
    const param_table *t = &tr.model.table;
    ckpt_slice *mine = xcalloc((size_t)t->count, sizeof *mine);
    ckpt_slice *all = xcalloc((size_t)t->count * nranks, sizeof *all);
    ckpt_owner_slices(t, rank, nranks, mine);
    MPI_Allgather(mine, 2 * t->count, MPI_INT64_T, all, 2 * t->count, MPI_INT64_T, MPI_COMM_WORLD);
    int tiles = 1, split = 1;
    char detail[256] = "";
    for (int i = 0; i < t->count; i++) {
        int64_t next = 0;
        for (int r = 0; r < nranks; r++) { /* the default map orders slices by rank */
            const ckpt_slice *s = &all[(size_t)r * t->count + i];
            if (s->start != next || s->count < 0) {
                tiles = 0;
                snprintf(detail, sizeof detail, "%s: rank %d's slice starts at %lld, expected %lld", t->items[i].name,
                         r, (long long)s->start, (long long)next);
            }
            if (t->items[i].shape[0] >= nranks && s->count == 0) split = 0;
            next = s->start + s->count;
        }
        if (next != t->items[i].shape[0]) {
            tiles = 0;
            snprintf(detail, sizeof detail, "%s: slices cover %lld of %lld rows", t->items[i].name, (long long)next,
                     (long long)t->items[i].shape[0]);
        }
    }
    char what[256];
    const char *via = strcmp(be->name, "cpu") == 0 ? "" : " via host staging";
    snprintf(what, sizeof what, "%s%s: ownership map tiles every tensor's rows with disjoint slices", optimizer, via);
    check(tiles, what, detail);
    snprintf(what, sizeof what, "%s%s: every rank owns part of every tensor with at least one row per rank", optimizer,
             via);
    check(split, what, NULL);

    char split_dir[512], single_dir[512], split_file[600], single_file[600];
    snprintf(split_dir, sizeof split_dir, "%s/%s/split", dir, optimizer);
    snprintf(single_dir, sizeof single_dir, "%s/%s/single", dir, optimizer);
    ckpt_save(split_dir, &tr, &src, tok, 0);
    for (int i = 0; i < t->count; i++) {
        mine[i].start = 0;
        mine[i].count = rank == 0 ? t->items[i].shape[0] : 0;
    }
    ckpt_save_owned(single_dir, &tr, &src, tok, 0, mine);
    snprintf(split_file, sizeof split_file, "%s/ckpt_00000002.h5", split_dir);
    snprintf(single_file, sizeof single_file, "%s/ckpt_00000002.h5", single_dir);

    int identical = 1, verified = 1;
    const char *why = "";
    if (rank == 0) {
        size_t na = 0, nb = 0;
        char *a = slurp(split_file, &na), *b = slurp(single_file, &nb);
        identical = a && b && na == nb && memcmp(a, b, na) == 0;
        free(a);
        free(b);
        verified = ckpt_verify(split_file, &why) == 0;
    }
    snprintf(what, sizeof what, "%s%s: the collective file equals the one rank 0 writes alone, byte for byte",
             optimizer, via);
    check(identical, what, NULL);
    snprintf(what, sizeof what, "%s%s: ckpt_verify accepts it (checksums combined from the slices)", optimizer, via);
    check(verified, what, why);

    /* every rank reads everything back into a zeroed trainer */
    trainer back;
    trainer_init(&back, &c, be);
    size_t total = t->total, nb = (size_t)back.model.n_moe * c.moe_E;
    back.model.be->zero(back.model.params, total * sizeof(float));
    back.model.be->zero(back.opt.m, total * sizeof(float));
    back.model.be->zero(back.opt.v, total * sizeof(float));
    back.model.be->zero(back.model.router_bias, nb * sizeof(float));
    data_source src2;
    memset(&src2, 0, sizeof src2);
    src2.num_rows = 100;
    src2.tokenizer_json = tok;
    int loaded = ckpt_load(split_file, &back, &src2, &why) == 0;
    snprintf(what, sizeof what, "%s%s: ckpt_load on every rank", optimizer, via);
    check(loaded, what, why);
    int equal = loaded && same_floats(back.model.params, tr.model.params, total) &&
                same_floats(back.opt.m, tr.opt.m, total) && same_floats(back.opt.v, tr.opt.v, total) &&
                same_floats(back.model.router_bias, tr.model.router_bias, nb) && back.it == tr.it &&
                back.skipped == tr.skipped && back.opt.step == tr.opt.step && src2.epoch == 1 && src2.row == 42;
    snprintf(what, sizeof what,
             "%s%s: the loaded state equals the saved one bit for bit (weights, m, v, router biases, steps, data "
             "position)",
             optimizer, via);
    check(equal, what, NULL);
    float bias_sum = 0;
    for (size_t i = 0; i < nb; i++) bias_sum += fabsf(back.model.router_bias[i]);
    snprintf(what, sizeof what, "%s%s: the state checked is not trivial (router biases moved, optimizer stepped)",
             optimizer, via);
    check(bias_sum > 0 && back.opt.step == 2, what, NULL);

    trainer_free(&back);
    trainer_free(&tr);
    free(mine);
    free(all);
}

/* ---- same A B ---- */

typedef struct walk_ctx {
    hid_t a, b;
    const char *group;
    int differ, count;
    char first[512];
} walk_ctx;

static herr_t compare_dataset(hid_t g, const char *name, const H5L_info_t *info, void *data)
{
    walk_ctx *w = data;
    char path[512];
    snprintf(path, sizeof path, "%s/%s", w->group, name);
    hid_t da = H5Dopen2(w->a, path, H5P_DEFAULT), db = H5Dopen2(w->b, path, H5P_DEFAULT);
    int same = da >= 0 && db >= 0;
    if (same) {
        hid_t sa = H5Dget_space(da), sb = H5Dget_space(db);
        hssize_t na = H5Sget_simple_extent_npoints(sa), nb = H5Sget_simple_extent_npoints(sb);
        H5Sclose(sa);
        H5Sclose(sb);
        same = na == nb;
        if (same) {
            float *x = xmalloc((size_t)na * sizeof(float) + 1), *y = xmalloc((size_t)nb * sizeof(float) + 1);
            same = H5Dread(da, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x) >= 0 &&
                   H5Dread(db, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, y) >= 0 &&
                   memcmp(x, y, (size_t)na * sizeof(float)) == 0;
            free(x);
            free(y);
        }
    }
    if (da >= 0) H5Dclose(da);
    if (db >= 0) H5Dclose(db);
    w->count++;
    if (!same && !w->differ) snprintf(w->first, sizeof w->first, "%s", path);
    w->differ |= !same;
    return 0;
}

static int64_t attr_i64(hid_t file, const char *obj, const char *name)
{
    int64_t v = -12345;
    hid_t a = H5Aopen_by_name(file, obj, name, H5P_DEFAULT, H5P_DEFAULT);
    if (a >= 0) {
        H5Aread(a, H5T_NATIVE_INT64, &v);
        H5Aclose(a);
    }
    return v;
}

static int same_main(const char *pa, const char *pb)
{
    hid_t a = H5Fopen(pa, H5F_ACC_RDONLY, H5P_DEFAULT), b = H5Fopen(pb, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (a < 0 || b < 0) {
        printf("cannot open %s\n", a < 0 ? pa : pb);
        return 1;
    }
    const char *groups[] = {"/params", "/optim/m", "/optim/v", "/router_bias"};
    walk_ctx w = {a, b, NULL, 0, 0, ""};
    int counts[2] = {0, 0};
    for (int pass = 0; pass < 2; pass++) /* both ways, so neither file holds extra datasets */
        for (int g = 0; g < 4; g++) {
            w.group = groups[g];
            w.a = pass ? b : a;
            w.b = pass ? a : b;
            int before = w.count;
            H5Literate_by_name(w.a, groups[g], H5_INDEX_NAME, H5_ITER_NATIVE, NULL, compare_dataset, &w, H5P_DEFAULT);
            counts[pass] += w.count - before;
        }
    const char *attrs[] = {"step", "skipped", "data_epoch", "data_row"};
    for (int k = 0; k < 4; k++)
        if (attr_i64(a, "/", attrs[k]) != attr_i64(b, "/", attrs[k]) && !w.differ) {
            w.differ = 1;
            snprintf(w.first, sizeof w.first, "attribute %s", attrs[k]);
        }
    if (attr_i64(a, "/optim", "step") != attr_i64(b, "/optim", "step") && !w.differ) {
        w.differ = 1;
        snprintf(w.first, sizeof w.first, "attribute /optim step");
    }
    H5Fclose(a);
    H5Fclose(b);
    if (w.differ) printf("differ: %s\n", w.first);
    else printf("same: %d datasets and the step, skipped, data position and optimizer step\n", counts[0]);
    return w.differ ? 1 : 0;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    int status = 0;
    if (argc == 3 && strcmp(argv[1], "write") == 0) {
        write_checks(argv[2], "adamw", backend_cpu());
        write_checks(argv[2], "muon", backend_cpu());
        /* the staging path, on the optimizer whose v is stored only for some tensors */
        char staged_dir[1024];
        snprintf(staged_dir, sizeof staged_dir, "%s/staged", argv[2]);
        write_checks(staged_dir, "muon", staged_backend());
        status = failures ? 1 : 0;
    } else if (argc == 4 && strcmp(argv[1], "same") == 0) {
        status = same_main(argv[2], argv[3]);
    } else if (argc == 3 && strcmp(argv[1], "verify") == 0) {
        const char *why = NULL;
        status = ckpt_verify(argv[2], &why) == 0 ? 0 : 1;
        printf("%s: %s\n", argv[2], status ? why : "good");
    } else {
        fprintf(stderr, "usage: ckpt_mpi_check write DIR | same A B | verify FILE\n");
        status = 2;
    }
    MPI_Finalize();
    return status;
}
