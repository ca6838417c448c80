/* cpu_classifier.c: the tied LM head and cross-entropy on the CPU, never holding the
 * full [N, V] logits.
 *
 * Rows are processed in blocks small enough that a block's logits fit a bounded
 * scratch buffer; each block's logits come from cpu_matmul_forward (h_i . wte[v, :]),
 * and in the backward the block's dlogits go through cpu_matmul_backward, which adds
 * to dh and dwte. Blocks run in row order and each product sums in row order within a
 * block, so dwte[v, c] is the sum over rows i = 0, 1, ... in order, whatever the block
 * size or the thread count.
 */
#include "cpu_ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <tgmath.h>

#define IGNORE_INDEX (-100)
/* Rows per block: as many as fit SCRATCH_REALS logits (16 MiB in float), but never
 * fewer than MIN_BLOCK_ROWS, which the matmuls need to keep every thread busy. */
#define SCRATCH_REALS ((size_t)1 << 22)
#define MIN_BLOCK_ROWS 32
/* Below this many logits per block a parallel region costs more than the loop. */
#define PAR_MIN 32768

static int block_rows(int N, int V)
{
    size_t rows = SCRATCH_REALS / (size_t)V;
    if (rows < MIN_BLOCK_ROWS) rows = MIN_BLOCK_ROWS;
    return rows < (size_t)N ? (int)rows : N;
}

static real *scratch_alloc(size_t n, const char *who)
{
    real *p = malloc(n * sizeof *p);
    if (!p) {
        fprintf(stderr, "deltamla: error: %s: out of memory (%zu reals)\n", who, n);
        abort();
    }
    return p;
}

/* Every target must be a class index or the ignore index; anything else would index
 * outside the logits row. */
static void check_targets(const int32_t *targets, int N, int V, const char *who)
{
    for (int i = 0; i < N; i++)
        if (targets[i] != IGNORE_INDEX && (targets[i] < 0 || targets[i] >= V)) {
            fprintf(stderr, "deltamla: error: %s: target[%d] = %d outside [0, %d) and not -100\n",
                    who, i, (int)targets[i], V);
            abort();
        }
}

/* loss [N] = lse - logit[target] (0 where target = -100), lse [N] saved, with
 * logits_i = h_i wte^T: h [N, C], wte [V, C], targets int32 [N] in [0, V) or -100.
 * Aborts with a message on a bad target or when scratch cannot be allocated. */
void cpu_classifier_forward(real *loss, real *lse, const real *h, const real *wte,
                            const int32_t *targets, int N, int V, int C)
{
    if (N <= 0) return;
    check_targets(targets, N, V, "cpu_classifier_forward");
    int rb = block_rows(N, V);
    real *logits = scratch_alloc((size_t)rb * V, "cpu_classifier_forward");
    for (int i0 = 0; i0 < N; i0 += rb) {
        int nr = N - i0 < rb ? N - i0 : rb;
        cpu_matmul_forward(logits, h + (size_t)i0 * C, wte, nr, C, V);
#pragma omp parallel for schedule(static) if ((size_t)nr * V >= PAR_MIN)
        for (int r = 0; r < nr; r++) {
            const real *z = logits + (size_t)r * V;
            real mx = z[0];
            for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
            real s = 0;
            for (int v = 0; v < V; v++) s += exp(z[v] - mx);
            real l = mx + log(s);
            int i = i0 + r;
            lse[i] = l;
            loss[i] = targets[i] == IGNORE_INDEX ? 0 : l - z[targets[i]];
        }
    }
    free(logits);
}

/* dh [N, C] += dlogits wte and dwte [V, C] += dlogits^T h, where dlogits_i =
 * dloss_scale (softmax(logits_i) - onehot(target_i)) for valid targets and 0 for
 * ignored rows; logits recomputed from h and wte, lse [N] from the forward. */
void cpu_classifier_backward(real *dh, real *dwte, const real *h, const real *wte,
                             const int32_t *targets, const real *lse, real dloss_scale,
                             int N, int V, int C)
{
    if (N <= 0) return;
    check_targets(targets, N, V, "cpu_classifier_backward");
    int rb = block_rows(N, V);
    real *dlogits = scratch_alloc((size_t)rb * V, "cpu_classifier_backward");
    for (int i0 = 0; i0 < N; i0 += rb) {
        int nr = N - i0 < rb ? N - i0 : rb;
        cpu_matmul_forward(dlogits, h + (size_t)i0 * C, wte, nr, C, V);
#pragma omp parallel for schedule(static) if ((size_t)nr * V >= PAR_MIN)
        for (int r = 0; r < nr; r++) {
            real *z = dlogits + (size_t)r * V;
            int i = i0 + r;
            if (targets[i] == IGNORE_INDEX) {
                for (int v = 0; v < V; v++) z[v] = 0;
                continue;
            }
            for (int v = 0; v < V; v++) z[v] = dloss_scale * exp(z[v] - lse[i]);
            z[targets[i]] -= dloss_scale;
        }
        cpu_matmul_backward(dh + (size_t)i0 * C, dwte, dlogits, h + (size_t)i0 * C, wte, nr, C, V);
    }
    free(dlogits);
}
