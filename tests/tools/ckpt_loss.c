/* ckpt_loss.c: the loss deltamla computes with a checkpoint's weights on a given batch,
 * for tests/test_ckpt_tool.sh, which compares it with the PyTorch reference's loss on
 * the weights `deltamla ckpt export` wrote (and on weights that `ckpt import` read).
 *
 * usage: ckpt_loss CHECKPOINT|OUTPUT_DIR BATCH_FILE
 *
 * BATCH_FILE is text: "B T", then B*T input tokens, then B*T targets (-100 = ignored),
 * separated by blanks or newlines. The weights and router biases are copied into a CPU
 * model planned for B x T, one forward runs, and the line
 *   loss <mean cross-entropy> zloss <sum of the MoE z-losses>
 * is printed with 9 significant digits.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef DELTAMLA_HAVE_MPI
#include <mpi.h>
#endif

#include "../../io/checkpoint.h"
#include "model.h"
#include "util.h"

static int32_t *read_batch(const char *path, int *B, int *T, int32_t **targets)
{
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    if (fscanf(f, "%d %d", B, T) != 2 || *B < 1 || *T < 1) die("%s: expected \"B T\" first", path);
    size_t n = (size_t)*B * (size_t)*T;
    int32_t *inputs = xmalloc(n * sizeof *inputs);
    *targets = xmalloc(n * sizeof **targets);
    for (size_t i = 0; i < 2 * n; i++) {
        int v;
        if (fscanf(f, "%d", &v) != 1) die("%s: expected %zu numbers after \"B T\", found %zu", path, 2 * n, i);
        if (i < n) inputs[i] = v;
        else (*targets)[i - n] = v;
    }
    fclose(f);
    return inputs;
}

int main(int argc, char **argv)
{
#ifdef DELTAMLA_HAVE_MPI
    MPI_Init(&argc, &argv); /* the checkpoint reader opens files through HDF5's MPI-IO driver */
#endif
    if (argc != 3) die("usage: ckpt_loss CHECKPOINT|OUTPUT_DIR BATCH_FILE");
    char *path = argv[1];
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        path = ckpt_latest(argv[1]);
        if (!path) die("%s holds no checkpoint", argv[1]);
    }
    int B, T;
    int32_t *targets, *inputs = read_batch(argv[2], &B, &T, &targets);

    ckpt_weights w;
    ckpt_read_weights(path, &w);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= w.cfg.vocab_size) die("input token %d outside the vocabulary", inputs[i]);
        if (targets[i] != -100 && (targets[i] < 0 || targets[i] >= w.cfg.vocab_size))
            die("target %d outside the vocabulary", targets[i]);
    }
    model m;
    model_init(&m, &w.cfg, backend_cpu(), B, T);
    fatal_check(m.table.total == w.table.total && m.n_moe == w.n_moe);
    m.be->from_host(m.params, w.params, w.table.total * sizeof(float));
    if (w.n_moe) m.be->from_host(m.router_bias, w.router_bias, (size_t)w.n_moe * w.cfg.moe_E * sizeof(float));
    double zloss = 0;
    double loss = model_forward(&m, inputs, targets, &zloss);
    printf("loss %.9g zloss %.9g\n", loss, zloss);
    model_free(&m);
    ckpt_weights_free(&w);
    free(inputs);
    free(targets);
#ifdef DELTAMLA_HAVE_MPI
    MPI_Finalize();
#endif
    return 0;
}
