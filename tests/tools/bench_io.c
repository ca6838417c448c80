/* bench_io.c: checkpoint write and read bandwidth next to the disk's own, measured in
 * the same run on the same directory.
 *
 *   mpirun -np N build/tests/bench_io [--reps R] [--dir DIR] [model flags]
 *
 * Model flags are deltamla train's (default --size moe-1b, the acceptance model); the
 * trainer is built on the CPU backend of every rank with a one-token-row micro-batch
 * (the checkpoint holds no activations), and its optimizer moments are filled with the
 * weights so that every byte written is real data. Each repetition measures, as IOR
 * does (STYLE.md rule 7): a barrier, then bandwidth = bytes / (the last rank's end - the
 * first rank's start):
 *
 *   checkpoint write   ckpt_save: collective write of each rank's slices, checksums,
 *                      flush, fsync, rename, `latest`
 *   checkpoint read    ckpt_load: every rank reads the whole state and checks every
 *                      checksum (bytes counted once: the state restored)
 *   disk write         one file of the same size, each rank pwrite()s its contiguous
 *                      share in 8 MiB blocks, then fsync
 *   disk read          the same file read back with pread(), each rank its share
 *   checksum           ckpt_crc32 over the state in memory, each rank its share: the
 *                      CPU cost a save and a load add to the transfer (they overlap it
 *                      with the I/O on a helper thread)
 *
 * Before each read the file's pages are dropped from the page cache
 * (posix_fadvise DONTNEED after the fsync), so reads come from the disk, not memory.
 * Prints a table of min / mean / max GB/s (GB = 1e9 bytes) over the repetitions.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mpi.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "../../io/checkpoint.h"
#include "util.h"

enum { OP_CKPT_WRITE, OP_CKPT_READ, OP_DISK_WRITE, OP_DISK_READ, OP_CRC, N_OPS };
static const char *op_names[N_OPS] = {"checkpoint write (ckpt_save)", "checkpoint read (ckpt_load)",
                                      "disk write (pwrite + fsync)", "disk read (pread)",
                                      "checksum in memory (ckpt_crc32)"};

static int rank, nranks;

/* Seconds from the first rank's start to the last rank's end. */
static double span(double t0, double t1)
{
    double first, last;
    MPI_Allreduce(&t0, &first, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&t1, &last, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return last - first;
}

static void drop_cache(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    fsync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

/* This rank's share [*off, *off + *len) of n bytes, 4 KiB aligned. */
static void share(size_t n, size_t *off, size_t *len)
{
    size_t pages = (n + 4095) / 4096;
    size_t a = pages * rank / nranks * 4096, b = pages * (rank + 1) / nranks * 4096;
    if (a > n) a = n;
    if (b > n) b = n;
    *off = a;
    *len = b - a;
}

static double disk_write(const char *path, size_t n, const char *buf, size_t block)
{
    if (rank == 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) die("cannot create %s: %s", path, strerror(errno));
        close(fd);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    size_t off, len;
    share(n, &off, &len);
    double t0 = MPI_Wtime();
    int fd = open(path, O_WRONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    for (size_t done = 0; done < len;) {
        size_t k = len - done < block ? len - done : block;
        ssize_t w = pwrite(fd, buf, k, (off_t)(off + done));
        if (w <= 0) die("cannot write %s: %s", path, strerror(errno));
        done += (size_t)w;
    }
    if (fsync(fd) != 0) die("cannot flush %s: %s", path, strerror(errno));
    close(fd);
    double t1 = MPI_Wtime();
    return span(t0, t1);
}

static double disk_read(const char *path, size_t n, char *buf, size_t block)
{
    size_t off, len;
    share(n, &off, &len);
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = MPI_Wtime();
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("cannot open %s: %s", path, strerror(errno));
    for (size_t done = 0; done < len;) {
        size_t k = len - done < block ? len - done : block;
        ssize_t r = pread(fd, buf, k, (off_t)(off + done));
        if (r <= 0) die("cannot read %s: %s", path, strerror(errno));
        done += (size_t)r;
    }
    close(fd);
    double t1 = MPI_Wtime();
    return span(t0, t1);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    int reps = 3;
    char dir[CONFIG_PATH_MAX] = "";
    char **flags = xcalloc((size_t)argc + 8, sizeof *flags);
    int nflags = 0;
    flags[nflags++] = "--size";
    flags[nflags++] = "moe-1b";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) snprintf(dir, sizeof dir, "%s", argv[++i]);
        else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            if (rank == 0)
                printf("usage: mpirun -np N bench_io [--reps R] [--dir DIR] [deltamla train model flags]\n");
            MPI_Finalize();
            return 0;
        } else flags[nflags++] = argv[i];
    }
    if (reps < 1) die("--reps must be at least 1");
    if (!dir[0]) snprintf(dir, sizeof dir, "bench_io.out");
    /* no activations are needed: plan the smallest micro-batch */
    flags[nflags++] = "--batch_size";
    flags[nflags++] = "1";
    flags[nflags++] = "--block_size";
    flags[nflags++] = "8";
    flags[nflags++] = "--device";
    flags[nflags++] = "cpu";
    config c;
    config_parse(&c, nflags, flags);

    double t_init = MPI_Wtime();
    trainer tr;
    trainer_init(&tr, &c, backend_cpu());
    size_t total = tr.model.table.total, v_floats = 0;
    for (int i = 0; i < tr.model.table.count; i++) {
        const param_info *p = &tr.model.table.items[i];
        if (!(tr.opt.muon_mode && params_is_muon(p))) v_floats += p->numel;
    }
    memcpy(tr.opt.m, tr.model.params, total * sizeof(float));
    memcpy(tr.opt.v, tr.model.params, total * sizeof(float));
    size_t bias_floats = (size_t)tr.model.n_moe * (size_t)(c.use_moe ? c.moe_E : 0);
    size_t bytes = (2 * total + v_floats + bias_floats) * sizeof(float);
    data_source src;
    memset(&src, 0, sizeof src);
    src.kind = "bench";
    src.nranks = nranks;
    t_init = MPI_Wtime() - t_init;

    char ckpt[CONFIG_PATH_MAX + 64], raw[CONFIG_PATH_MAX + 64];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt_00000000.h5", dir);
    snprintf(raw, sizeof raw, "%s/disk_test.bin", dir);
    size_t block = (size_t)8 << 20;
    char *buf = xmalloc(block);
    memcpy(buf, tr.model.params, block < total * sizeof(float) ? block : total * sizeof(float));

    double bw[N_OPS][64];
    if (reps > 64) reps = 64;
    struct stat st;
    for (int r = 0; r < reps; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        ckpt_save(dir, &tr, &src, NULL, 1);
        double t1 = MPI_Wtime();
        bw[OP_CKPT_WRITE][r] = bytes / span(t0, t1) / 1e9;

        if (rank == 0) drop_cache(ckpt);
        MPI_Barrier(MPI_COMM_WORLD);
        const char *why = NULL;
        t0 = MPI_Wtime();
        if (ckpt_load(ckpt, &tr, &src, &why) != 0) die("bench_io: ckpt_load failed: %s", why);
        t1 = MPI_Wtime();
        bw[OP_CKPT_READ][r] = bytes / span(t0, t1) / 1e9;

        bw[OP_DISK_WRITE][r] = bytes / disk_write(raw, bytes, buf, block) / 1e9;
        if (rank == 0) drop_cache(raw);
        bw[OP_DISK_READ][r] = bytes / disk_read(raw, bytes, buf, block) / 1e9;
        MPI_Barrier(MPI_COMM_WORLD);
        if (rank == 0) unlink(raw);

        /* this rank's share of the state's bytes, taken from the weights (again from
         * their start when the share is larger): the speed is all that is measured */
        size_t off, len, wbytes = total * sizeof(float);
        share(bytes, &off, &len);
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        uint32_t sink = 0;
        for (size_t done = 0; done < len;) {
            size_t k = len - done < wbytes ? len - done : wbytes;
            sink ^= ckpt_crc32(tr.model.params, k);
            done += k;
        }
        t1 = MPI_Wtime();
        if (sink == 0x5eed) printf(" "); /* keeps the checksums from being optimised away */
        bw[OP_CRC][r] = bytes / span(t0, t1) / 1e9;
    }
    if (rank == 0) {
        double file_gb = stat(ckpt, &st) == 0 ? (double)st.st_size / 1e9 : 0;
        int threads = 1;
#ifdef _OPENMP
        threads = omp_get_max_threads();
#endif
        printf("bench_io: size %s, optimizer %s, %d rank%s x %d OpenMP thread%s, %d repetition%s, directory %s "
               "(trainer built in %.1f s)\n",
               c.size, c.optimizer_type, nranks, nranks == 1 ? "" : "s", threads, threads == 1 ? "" : "s", reps,
               reps == 1 ? "" : "s", dir, t_init);
        printf("state per checkpoint: %.3f GB (weights %.3f, m %.3f, v %.3f, router biases %.6f); file %.3f GB\n\n",
               bytes / 1e9, total * 4 / 1e9, total * 4 / 1e9, v_floats * 4 / 1e9, bias_floats * 4 / 1e9, file_gb);
        printf("%-32s %8s %10s %10s %10s\n", "operation", "GB", "min GB/s", "mean GB/s", "max GB/s");
        for (int op = 0; op < N_OPS; op++) {
            double lo = bw[op][0], hi = bw[op][0], sum = 0;
            for (int r = 0; r < reps; r++) {
                lo = bw[op][r] < lo ? bw[op][r] : lo;
                hi = bw[op][r] > hi ? bw[op][r] : hi;
                sum += bw[op][r];
            }
            printf("%-32s %8.3f %10.3f %10.3f %10.3f\n", op_names[op], bytes / 1e9, lo, sum / reps, hi);
        }
        unlink(ckpt);
        char latest[CONFIG_PATH_MAX + 64];
        snprintf(latest, sizeof latest, "%s/latest", dir);
        unlink(latest);
        rmdir(dir);
    }
    free(buf);
    free(flags);
    trainer_free(&tr);
    MPI_Finalize();
    return 0;
}
