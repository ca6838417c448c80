/* test_gpu_step.c: whole training steps on the CUDA backend against the CPU backend.
 *
 * For three configs (every GDN/MLA option on with LatentMoE and two shared experts and a
 * GDN head_dim of 85; standard MoE; dense) one step from the same weights and batch on
 * both backends: the loss within 1e-2 relative, the z-loss within 2e-2, and every
 * parameter gradient with cosine similarity above 0.999 to the CPU's; the same with
 * gradient checkpointing and with --doc_mask. Then five steps
 * twice on the GPU from the same seed: the losses must be bit-identical; and again with
 * the optimizer's update on one lane instead of OPTIM_LANES: losses and parameters
 * bit-identical too (the lanes only reorder independent updates); and with --cuda_graph
 * (forward and backward replayed as CUDA graphs from the second step): bit-identical,
 * and the graphs really launched.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h"
#include "model_internal.h"
#include "rng.h"
#include "train.h"

/* kernels/backend_cuda.cu: graph_run's graph launches so far */
unsigned long long cuda_run_graph_launches(void);
#include "util.h"
#include "../test_flags.h"

static void batch(const config *c, int step, int32_t *in, int32_t *tg)
{
    uint64_t key = rng_key(c->seed, "gpu-step-batch");
    int n = c->batch_size * c->block_size;
    for (int i = 0; i < n; i++) {
        in[i] = (int32_t)(rng_bits(key, 2 * ((uint64_t)step * n + i)) % (uint64_t)c->vocab_size);
        tg[i] = (int32_t)(rng_bits(key, 2 * ((uint64_t)step * n + i) + 1) % (uint64_t)c->vocab_size);
        if (i % 11 == 5) tg[i] = -100;
    }
}

/* Tokens whose expert sets differ between the two models' last forward, over the MoE
 * layers whose routing is still held (with gradient checkpointing only the last
 * block's activations survive a forward). */
static int routing_flips(gt_ctx *g, const config *c, model *mc, model *mg)
{
    if (!c->use_moe) return 0;
    int N = mc->B * mc->T, k = c->moe_k, flips = 0;
    int32_t *ig = xmalloc((size_t)N * k * sizeof *ig);
    for (int l = 0; l < c->n_layer; l++) {
        if (mc->layers[l].is_gdn || (c->gradient_checkpointing && l != c->n_layer - 1)) continue;
        const int32_t *ic = mc->layers[l].ma.idx;
        g->gpu->to_host(ig, mg->layers[l].ma.idx, (size_t)N * k * sizeof *ig);
        for (int i = 0; i < N; i++) {
            int differs = 0;
            for (int a = 0; a < k; a++) {
                int found = 0;
                for (int b = 0; b < k; b++) found |= ic[i * k + a] == ig[i * k + b];
                differs |= !found;
            }
            flips += differs;
        }
    }
    free(ig);
    return flips;
}

static void compare_step(gt_ctx *g, const char *name, const char *flags)
{
    config c;
    parse_flags(&c, flags);
    trainer tc, tg;
    trainer_init(&tc, &c, g->cpu);
    trainer_init(&tg, &c, g->gpu);
    int n = c.batch_size * c.block_size;
    int32_t *in = xmalloc(n * sizeof *in), *tgt = xmalloc(n * sizeof *tgt);
    char what[256], detail[256];
    /* Routing is discrete: where bf16 GEMMs upstream move a token's router scores across
     * a near-tie, the CPU and the GPU send it to different experts, and the gradients of
     * those experts (and, through that token, of everything before them) legitimately
     * differ. The step is compared on the first of up to 6 batches on which both route
     * every token alike; the batches passed over are reported. */
    int attempt, flips = 0;
    for (attempt = 0; attempt < 6; attempt++) {
        batch(&c, attempt, in, tgt);
        if (c.doc_mask) { /* documents of assorted lengths, ending with the last token id */
            int32_t eot = c.vocab_size - 1;
            model_set_eot(&tc.model, eot);
            model_set_eot(&tg.model, eot);
            for (int i = 0; i < n; i++)
                if (i % 37 == 36 || i % 53 == 0 || i % 97 == 64) in[i] = eot;
        }
        tc.model.count_loads = tg.model.count_loads = 0;
        model_forward(&tc.model, in, tgt, NULL);
        model_forward(&tg.model, in, tgt, NULL);
        tc.model.count_loads = tg.model.count_loads = 1;
        flips = routing_flips(g, &c, &tc.model, &tg.model);
        if (flips == 0) break;
        printf("# %s: batch %d routes %d token(s) to other experts on the GPU (near-ties); next batch\n", name,
               attempt, flips);
    }
    snprintf(what, sizeof what, "%s: a batch on which CPU and GPU route alike", name);
    snprintf(detail, sizeof detail, "batch %d of up to 6", attempt);
    if (!gt_report(what, flips == 0, detail)) goto done;

    step_stats sc, sg;
    trainer_grads(&tc, in, tgt, &sc);
    trainer_grads(&tg, in, tgt, &sg);
    double rl = fabs(sg.loss - sc.loss) / fabs(sc.loss);
    snprintf(what, sizeof what, "%s: loss", name);
    snprintf(detail, sizeof detail, "gpu %.6f cpu %.6f rel %.2g (tol 1e-2)", sg.loss, sc.loss, rl);
    gt_report(what, rl <= 1e-2, detail);
    if (c.use_moe) {
        double rz = fabs(sg.zloss - sc.zloss) / fabs(sc.zloss);
        snprintf(what, sizeof what, "%s: z-loss", name);
        snprintf(detail, sizeof detail, "gpu %.6g cpu %.6g rel %.2g (tol 2e-2)", sg.zloss, sc.zloss, rz);
        gt_report(what, rz <= 2e-2, detail);
    }
    size_t P = tc.model.table.total;
    float *gh = gt_down(g, tg.model.grads, P);
    const float *ch = tc.model.grads;
    double worst = 1;
    const char *worst_name = "";
    for (int i = 0; i < tc.model.table.count; i++) {
        const param_info *p = &tc.model.table.items[i];
        double dot = 0, na = 0, nb = 0;
        for (size_t j = 0; j < p->numel; j++) {
            double a = gh[p->offset + j], b = ch[p->offset + j];
            dot += a * b;
            na += a * a;
            nb += b * b;
        }
        double cs = (na == 0 && nb == 0) ? 1 : dot / sqrt(na * nb);
        if (!(cs >= worst)) {
            worst = cs;
            worst_name = p->name;
        }
    }
    snprintf(what, sizeof what, "%s: every gradient's cosine similarity > 0.999", name);
    snprintf(detail, sizeof detail, "worst %.6f (%s), %d tensors", worst, worst_name, tc.model.table.count);
    gt_report(what, worst > 0.999, detail);
    free(gh);
done:
    free(in);
    free(tgt);
    trainer_free(&tc);
    trainer_free(&tg);
}

static void determinism(gt_ctx *g, const char *flags)
{
    config c;
    parse_flags(&c, flags);
    double losses[4][5];
    int n = c.batch_size * c.block_size;
    int32_t *in = xmalloc(n * sizeof *in), *tgt = xmalloc(n * sizeof *tgt);
    float *params[4];
    size_t total = 0;
    unsigned long long graphs = 0;
    /* runs 0 and 1 with the optimizer's default lanes, run 2 with its update on one lane,
     * run 3 with --cuda_graph */
    for (int run = 0; run < 4; run++) {
        config rc = c;
        rc.cuda_graph = run == 3;
        trainer t;
        trainer_init(&t, &rc, g->gpu);
        if (run == 3) graphs = cuda_run_graph_launches();
        if (run == 2) {
            optim_free(&t.opt);
            optim_init_lanes(&t.opt, &t.model, 1);
        }
        for (int s = 0; s < 5; s++) {
            batch(&c, s, in, tgt);
            step_stats st;
            trainer_grads(&t, in, tgt, &st);
            trainer_apply(&t, &st);
            losses[run][s] = st.loss;
        }
        total = t.model.table.total;
        params[run] = gt_down(g, t.model.params, total);
        if (run == 3) graphs = cuda_run_graph_launches() - graphs;
        trainer_free(&t);
    }
    gt_same_bits("same seed twice on the GPU: 5 bit-identical losses", losses[0], losses[1], sizeof losses[0]);
    gt_same_bits("optimizer on 4 lanes and on 1: 5 bit-identical losses", losses[0], losses[2], sizeof losses[0]);
    gt_same_bits("optimizer on 4 lanes and on 1: bit-identical parameters after 5 steps", params[0], params[2],
                 total * sizeof(float));
    /* five steps: forward and backward run directly, then are captured, then replayed */
    char detail[64];
    snprintf(detail, sizeof detail, "%llu graph launches", graphs);
    gt_report("--cuda_graph: forward and backward replayed as graphs from the second step", graphs == 8, detail);
    gt_same_bits("--cuda_graph: 5 bit-identical losses", losses[0], losses[3], sizeof losses[0]);
    gt_same_bits("--cuda_graph: bit-identical parameters after 5 steps", params[0], params[3], total * sizeof(float));
    for (int run = 0; run < 4; run++) free(params[run]);
    free(in);
    free(tgt);
}

int main(void)
{
    gt_ctx g;
    gt_init(&g, 20261127);
    const char *all_on = "--size tiny --n_layer 3 --n_embd 170 --n_head 2 --block_size 130 --batch_size 2 "
                         "--deltanet_latent_dim 32 --deltanet_share_qk --mla_q_lora_rank 48 --n_shared_experts 2 "
                         "--mla_qk_nope_head_dim 32 --mla_qk_rope_head_dim 16 --mla_v_head_dim 24 --vocab_size 300 "
                         "--expert_dim 96";
    compare_step(&g, "all options on (LatentMoE, head_dim 85)", all_on);
    compare_step(&g, "standard MoE", "--size tiny --n_layer 3 --n_embd 64 --n_head 4 --block_size 70 --batch_size 3 "
                                     "--no_use_latent_moe --n_experts 6 --n_activated 2");
    compare_step(&g, "dense", "--size tiny --n_layer 3 --n_embd 64 --n_head 4 --block_size 64 --batch_size 2 --no_use_moe");
    compare_step(&g, "gradient checkpointing", "--size tiny --gradient_checkpointing");
    char docs[1024];
    snprintf(docs, sizeof docs, "%s --doc_mask", all_on);
    compare_step(&g, "document masking (all options on)", docs);
    determinism(&g, all_on);
    return gt_failures() != 0;
}
