/* bench_step.c: the end-to-end training-step benchmark.
 *
 * usage: build/bench/bench_step [--bench_steps N] [--bench_warmup W] [deltamla train flags]
 *
 * 1. Measures the two ceilings of the device: a large GEMM through the backend's matmul
 *    (FLOP/s) and a large device copy (bytes read + written per second).
 * 2. Times N real training steps (forward, backward, clipping, optimizer, router-bias
 *    update, and the host-side batch generation) after W warm-up steps: tokens/s,
 *    model-FLOP utilisation and peak memory.
 * 3. Runs two more steps through a timing wrapper (timed_backend.c) that synchronises
 *    around every op, and prints per op family: ms per step, the floor (max of FLOPs
 *    over the measured GEMM rate and bytes over the measured bandwidth) and the ratio.
 *
 * Model FLOPs per token (for MFU) = 6 x (active matrix parameters, the tied head counted
 * once as a matmul, the embedding lookup not) + the sequence mixers: for each MLA layer
 * 3 x 2 x (T/2) x H x (Dk + Dv) (causal QK^T and PV, forward + backward), for each GDN
 * layer 3 x (chunked-form FLOPs of timed_backend.c's gdn_flops) / tokens. Batches are
 * random tokens (the data path is not what this measures).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"
#include "ceilings.h"
#include "timed_backend.h"
#include "train.h"
#include "util.h"

#define H100_BF16_DENSE_PEAK 989e12 /* NVIDIA's datasheet figure, H100 SXM, dense bf16 */

static double flops_per_token(const model *m)
{
    const config *c = &m->cfg;
    double matrix = 0;
    for (int i = 0; i < m->table.count; i++) {
        const param_info *p = &m->table.items[i];
        if (p->kind == PARAM_MATRIX || p->kind == PARAM_EMBEDDING || p->kind == PARAM_EXPERTS)
            matrix += (double)p->numel * p->active_num / p->active_den;
    }
    double T = c->block_size, mixers = 0;
    double C = GDN_CHUNK, D = c->head_dim;
    for (int l = 0; l < c->n_layer; l++) {
        if (config_is_gdn(c, l))
            mixers += 3 * 2.0 * c->n_head * (4 * C * D + 6 * D * D); /* per token: chunk terms / C */
        else
            mixers += 3 * 2.0 * (T / 2) * c->n_head *
                      (c->mla_qk_nope_head_dim + c->mla_qk_rope_head_dim + c->mla_v_head_dim);
    }
    return 6 * matrix + mixers;
}

int main(int argc, char **argv)
{
    int steps = 10, warmup = 3;
    char **rest = xmalloc((size_t)argc * sizeof *rest);
    int nrest = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--bench_steps") == 0 && i + 1 < argc) steps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--bench_warmup") == 0 && i + 1 < argc) warmup = atoi(argv[++i]);
        else rest[nrest++] = argv[i];
    }
    config c;
    config_parse(&c, nrest, rest);
    const backend *be = train_backend(&c);
    printf("# bench_step: device %s, size %s, B %d, T %d, optimizer %s, checkpointing %d\n", be->name, c.size,
           c.batch_size, c.block_size, c.optimizer_type, c.gradient_checkpointing);
    double gemm = bench_gemm_rate(be), bw = bench_copy_rate(be);
    printf("# measured ceilings: GEMM %.1f TFLOP/s (8192^3 through matmul_forward), copy %.1f GB/s\n", gemm / 1e12,
           bw / 1e9);
    fflush(stdout);

    trainer tr;
    trainer_init(&tr, &c, be);
    size_t n = (size_t)c.gradient_accumulation_steps * c.batch_size * c.block_size;
    int32_t *in = xmalloc(n * sizeof *in), *tg = xmalloc(n * sizeof *tg);
    uint64_t key = rng_key(c.seed, "bench");
    step_stats st;
    double t0 = 0;
    for (int s = 0; s < warmup + steps; s++) {
        if (s == warmup) {
            be->sync();
            t0 = wall_time();
        }
        for (size_t i = 0; i < n; i++) {
            in[i] = (int32_t)(rng_bits(key, 2 * (s * n + i)) % (uint64_t)c.vocab_size);
            tg[i] = (int32_t)(rng_bits(key, 2 * (s * n + i) + 1) % (uint64_t)c.vocab_size);
        }
        trainer_grads(&tr, in, tg, &st);
        trainer_apply(&tr, &st);
    }
    be->sync();
    double dt = (wall_time() - t0) / steps;
    double tps = n / dt, fpt = flops_per_token(&tr.model);
    int64_t total, active;
    params_count(&tr.model.table, &total, &active);
    printf("step %.2f ms | %.0f tokens/s | loss %.4f | model FLOPs/token %.3g | MFU %.1f%% of 989 TFLOP/s "
           "(%.1f%% of the measured GEMM rate) | peak memory %.2f GiB | %lld params (%lld active)\n",
           dt * 1e3, tps, st.loss, fpt, 100 * tps * fpt / H100_BF16_DENSE_PEAK, 100 * tps * fpt / gemm,
           be->mem_peak() / 1073741824.0, (long long)total, (long long)active);
    printf("floor of the step at the measured GEMM rate: %.2f ms (%.0f tokens/s)\n", 1e3 * n * fpt / gemm,
           gemm / fpt);
    fflush(stdout);

    /* the update phase alone (clipping, optimizer, router bias) in wall time, synchronised
     * before and after but not between its ops: next to its profiled sum below, the
     * difference is what the per-op synchronisation adds, and next to the GPU's own work
     * it bounds what launching the phase as one graph could save */
    double upd = 0, queued = 0;
    for (int s = 0; s < 2; s++) {
        trainer_grads(&tr, in, tg, &st);
        be->sync();
        double u0 = wall_time();
        trainer_apply(&tr, &st);
        queued += wall_time() - u0;
        be->sync();
        upd += wall_time() - u0;
    }
    printf("update phase (clip + optimizer + router bias), unprofiled: %.2f ms a step (the host queues it in %.2f ms)\n",
           1e3 * upd / 2, 1e3 * queued / 2);
    fflush(stdout);

    /* profiled pass */
    const backend *tb = timed_backend(be);
    tr.model.be = tb;
    tr.opt.be = tb;
    int prof = 2;
    for (int s = 0; s < prof; s++) {
        trainer_grads(&tr, in, tg, &st);
        trainer_apply(&tr, &st);
    }
    family_stats *fs = timed_stats();
    double sum = 0, sum_floor = 0;
    printf("\n%-22s %10s %10s %8s %12s %12s\n", "op family", "ms/step", "floor ms", "ratio", "GFLOP/step", "GB/step");
    for (int f = 0; f < FAM_COUNT; f++) {
        if (!fs[f].calls) continue;
        double ms = 1e3 * fs[f].seconds / prof, fl = fs[f].flops / prof, by = fs[f].bytes / prof;
        double floor_ms = 1e3 * (fl / gemm > by / bw ? fl / gemm : by / bw);
        sum += ms;
        sum_floor += floor_ms;
        printf("%-22s %10.3f %10.3f %8.1f %12.1f %12.2f\n", fs[f].name, ms, floor_ms, floor_ms > 0 ? ms / floor_ms : 0,
               fl / 1e9, by / 1e9);
    }
    printf("%-22s %10.3f %10.3f %8.1f   (profiled: synchronised after every op)\n", "total", sum, sum_floor,
           sum / sum_floor);

    /* the dense GEMMs by shape, slowest first (y [N, out] = x [N, in] W^T, "fwd+r" with a
     * residual added; the backward makes dx, dW or both; "mlp": a fused SwiGLU MLP,
     * N rows of x [N, d], hidden width h, both GEMMs together), and the optimizer's Muon batches and
     * AdamW runs */
    int ns = 0;
    const gemm_shape_stats *gs = timed_gemm_shapes(&ns);
    int *order = xmalloc((size_t)(ns ? ns : 1) * sizeof *order);
    for (int i = 0; i < ns; i++) order[i] = i;
    for (int i = 1; i < ns; i++)
        for (int j = i; j > 0 && gs[order[j]].seconds > gs[order[j - 1]].seconds; j--) {
            const int t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    printf("\n%-44s %7s %10s %10s %8s %10s\n", "GEMM shape / optimizer call", "calls", "ms/step", "floor ms",
           "ratio", "TFLOP/s");
    for (int r = 0; r < ns; r++) {
        const gemm_shape_stats *g = &gs[order[r]];
        char what[64];
        if (g->kind == SHAPE_MUON)
            snprintf(what, sizeof what, "muon %d x [%d, %d]", g->N, g->in, g->out);
        else if (g->kind == SHAPE_ADAMW)
            snprintf(what, sizeof what, "adamw (all runs)");
        else if (g->kind == SHAPE_GEMM_FWD_MULTI || g->kind == SHAPE_GEMM_BWD_MULTI)
            snprintf(what, sizeof what, "%s %d x %d -> %d (%d parts)",
                     g->kind == SHAPE_GEMM_FWD_MULTI ? "fwd multi" : g->dx == 2 ? "bwd multi set" : "bwd multi", g->N,
                     g->in, g->out, g->dw);
        else if (g->kind == SHAPE_MLP_FWD || g->kind == SHAPE_MLP_BWD)
            snprintf(what, sizeof what, "mlp %s %d x %d, h %d",
                     g->kind == SHAPE_MLP_FWD ? "fwd" : g->dx == 2 ? "bwd set" : "bwd", g->N, g->in, g->out);
        else
            snprintf(what, sizeof what, "%s %d x %d -> %d",
                     g->kind == SHAPE_GEMM_FWD       ? "fwd"
                     : g->kind == SHAPE_GEMM_FWD_ADD ? "fwd+r"
                     : g->dx && g->dw                ? "bwd dx+dw"
                     : g->dx                         ? "bwd dx"
                                                     : "bwd dw",
                     g->N, g->in, g->out);
        const double ms = 1e3 * g->seconds / prof, fl = g->flops / prof, by = g->bytes / prof;
        const double floor_ms = 1e3 * (fl / gemm > by / bw ? fl / gemm : by / bw);
        printf("%-44s %7ld %10.3f %10.3f %8.1f %10.1f\n", what, g->calls / prof, ms, floor_ms,
               floor_ms > 0 ? ms / floor_ms : 0, ms > 0 ? fl / (ms * 1e-3) / 1e12 : 0);
    }
    free(order);
    trainer_free(&tr);
    return 0;
}
