/* test_infer.c: the incremental decoding engine (src/infer.c) against the training graph.
 *
 * For several model shapes (latent and shared-QK GDN projections, q LoRA, LatentMoE,
 * standard MoE, dense FFN, six layers with two MLA kv ranks, a prefix longer than one
 * GDN chunk) a model is built on the CPU backend from its seeded initial weights, with
 * norm weights and LayerNorm biases moved off 1 and 0, attention scores made O(1) and
 * nonzero router biases, so that a piece the engine skipped would show. model_forward
 * runs a random prefix; the logits of EVERY position, m->lnf times wte^T, must equal the
 * engine's logits after feeding the same tokens one at a time, to 1e-4 of the largest
 * logit (fp32 either way; the training graph runs the chunked GDN and full attention,
 * the engine the recurrent GDN step and attention over the latent cache with wkv_b
 * absorbed, so only summation order differs).
 * Also: a reset, or another thread count, reproduces the run bit for bit; the state is
 * as small as the design says; the cache refuses a token past block_size; sampling is
 * seeded, greedy is the arg-max, top-k stays in the top k and the frequencies follow the
 * tempered softmax. No checkpoint file is needed.
 * Prints "ok - ..." / "not ok - ..." per check; exits non-zero if any failed.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend.h"
#include "config.h"
#include "cpu/cpu_ops.h"
#include "infer.h"
#include "model.h"
#include "rng.h"
#include "util.h"

#include "check.h"
#include "test_flags.h"

static int ends_with(const char *s, const char *tail)
{
    size_t n = strlen(s), k = strlen(tail);
    return n >= k && strcmp(s + n - k, tail) == 0;
}

/* Move the weights away from where initialisation leaves them blind spots: norm weights
 * off 1 and LayerNorm biases off 0 (a forgotten multiply or add would go unnoticed), and
 * the MLA query and key weights up so that attention scores are O(1), not near zero
 * (uniform attention would hide errors in scores and positions), and the GDN decay
 * gate's weights up so that the state carries over many tokens, chunk boundaries too. */
static void perturb(model *m)
{
    uint64_t key = rng_key(99, "perturb");
    for (int i = 0; i < m->table.count; i++) {
        const param_info *p = &m->table.items[i];
        float *x = model_param(m, i);
        float gain = 1.0f;
        if (ends_with(p->name, "attn.wq.weight") || ends_with(p->name, "attn.wq_b.weight") ||
            ends_with(p->name, "attn.wkv_b.weight"))
            gain = 10.0f;
        else if (ends_with(p->name, "attn.wkv_a.weight"))
            gain = 5.0f;
        else if (ends_with(p->name, "attn.g_proj.weight"))
            gain = 10.0f; /* GDN decays spread over (0, 1): some heads remember long */
        for (size_t j = 0; j < p->numel; j++) {
            double n = rng_normal(key, p->offset + j);
            if (p->kind == PARAM_NORM) x[j] = (float)(1.0 + 0.2 * n);
            else if (p->kind == PARAM_BIAS && p->init == INIT_ZEROS) x[j] = (float)(0.2 * n);
            else x[j] *= gain;
        }
    }
}

static size_t expected_state_floats(const config *c)
{
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++) {
        if (config_is_gdn(c, l))
            n += (size_t)c->n_head * c->head_dim * c->head_dim + 9 * (size_t)c->gdn_proj_dim;
        else
            n += (size_t)c->block_size * (config_kv_rank(c, l) + c->mla_qk_rope_head_dim);
    }
    return n;
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* Feed prompt [np] after a reset, then sample n tokens into out (each fed back). */
static void sample_sequence(infer *s, const int32_t *prompt, int np, int n, float temperature, int top_k,
                            uint64_t seed, int32_t *out)
{
    int V = s->cfg.vocab_size;
    float *lg = xmalloc((size_t)V * sizeof *lg);
    uint64_t key = rng_key(seed, "generate");
    infer_reset(s);
    for (int i = 0; i < np; i++) infer_step(s, prompt[i], lg);
    for (int i = 0; i < n; i++) {
        out[i] = infer_sample(lg, V, temperature, top_k, key, (uint64_t)i);
        infer_step(s, out[i], lg);
    }
    free(lg);
}

/* One model shape: T tokens through model_forward and through the engine. */
static void run_case(const char *name, const char *flags, int T, int sampling_checks)
{
    config c;
    parse_flags(&c, flags);
    const backend *be = backend_cpu();
    model m;
    model_init(&m, &c, be, 1, T);
    perturb(&m);
    int d = c.n_embd, V = c.vocab_size;
    size_t nbias = (size_t)m.n_moe * (c.use_moe ? c.moe_E : 0);
    uint64_t bkey = rng_key(7, "router bias");
    /* about the spread of sigmoid(z) at these weights, so the bias moves some choices */
    for (size_t i = 0; i < nbias; i++) m.router_bias[i] = (float)(0.03 * rng_normal(bkey, i));

    float *host = xmalloc(m.table.total * sizeof *host);
    be->to_host(host, m.params, m.table.total * sizeof *host);
    float *host_bias = xmalloc((nbias + 1) * sizeof *host_bias);
    be->to_host(host_bias, m.router_bias, nbias * sizeof *host_bias);

    int32_t *tokens = xmalloc((size_t)T * sizeof *tokens), *targets = xmalloc((size_t)T * sizeof *targets);
    uint64_t tkey = rng_key(3, name);
    for (int t = 0; t < T; t++) {
        tokens[t] = (int32_t)(rng_bits(tkey, (uint64_t)t) % (uint64_t)V);
        targets[t] = -100;
    }
    targets[T - 1] = tokens[0];
    double zl;
    model_forward(&m, tokens, targets, &zl);
    float *ref = xmalloc((size_t)T * V * sizeof *ref);
    cpu_matmul_forward(ref, m.lnf, model_param(&m, m.wte), T, d, V);

    infer s;
    infer_init(&s, &c, &m.table, host, host_bias);
    float *got = xmalloc((size_t)T * V * sizeof *got);
    double maxdiff = 0, maxref = 0;
    int worst = 0, steps_ok = 1;
    for (int t = 0; t < T; t++) {
        steps_ok &= infer_step(&s, tokens[t], got + (size_t)t * V) == 0;
        for (int v = 0; v < V; v++) {
            double r = ref[(size_t)t * V + v], diff = fabs(got[(size_t)t * V + v] - r);
            if (fabs(r) > maxref) maxref = fabs(r);
            if (diff > maxdiff) {
                maxdiff = diff;
                worst = t;
            }
        }
    }
    double rel = maxdiff / (maxref > 0 ? maxref : 1);
    check(steps_ok && rel < 1e-4 && maxref > 0,
          "%s: engine logits = full forward at all %d positions (max |diff| %.2e at t=%d, max |logit| %.3f, "
          "relative %.2e)",
          name, T, maxdiff, worst, maxref, rel);

    /* argmax agreement is the practical consequence: the greedy text is the same */
    int same_argmax = 1;
    for (int t = 0; t < T; t++)
        same_argmax &= argmax(got + (size_t)t * V, V) == argmax(ref + (size_t)t * V, V);
    check(same_argmax, "%s: greedy choice equal to the full forward's at every position", name);

    check(s.state_floats == expected_state_floats(&c),
          "%s: sequence state is %zu floats: GDN H*hk^2 + 9P per layer, MLA block_size*(rkv+dr) per layer "
          "(latent cache, no full keys/values)",
          name, s.state_floats);

    /* reset: the same tokens give the same logits bit for bit */
    infer_reset(&s);
    int n_again = T < 6 ? T : 6, same = 1;
    float *lg = xmalloc((size_t)V * sizeof *lg);
    for (int t = 0; t < n_again; t++) {
        infer_step(&s, tokens[t], lg);
        same &= memcmp(lg, got + (size_t)t * V, (size_t)V * sizeof *lg) == 0;
    }
    check(same && s.pos == n_again, "%s: after infer_reset the first %d steps repeat bit for bit", name, n_again);

    /* the router biases take part: without them some routing, hence some logit, changes */
    if (nbias) {
        infer s0;
        infer_init(&s0, &c, &m.table, host, NULL);
        int differs = 0;
        for (int t = 0; t < T; t++) {
            infer_step(&s0, tokens[t], lg);
            for (int v = 0; v < V; v++) differs |= lg[v] != got[(size_t)t * V + v];
        }
        infer_free(&s0);
        check(differs, "%s: router biases change the engine's routing (zero biases give other logits)", name);
    }

    /* capacity: block_size tokens fit, the next is refused without a state change */
    while (s.pos < c.block_size) infer_step(&s, tokens[s.pos % T], lg);
    int refused = infer_step(&s, tokens[0], lg) == -1;
    check(refused && s.pos == c.block_size, "%s: a token past block_size %d is refused (returns -1)", name,
          c.block_size);

#ifdef _OPENMP
    if (sampling_checks) { /* every sum has one thread and a fixed order */
        int threads = omp_get_max_threads(), same_threads = 1;
        for (int nt = 1; nt <= 3; nt += 2) {
            omp_set_num_threads(nt);
            infer_reset(&s);
            for (int t = 0; t < T; t++) {
                infer_step(&s, tokens[t], lg);
                same_threads &= memcmp(lg, got + (size_t)t * V, (size_t)V * sizeof *lg) == 0;
            }
        }
        omp_set_num_threads(threads);
        check(same_threads, "%s: 1, 3 and %d threads give bit-identical logits", name, threads);
    }
#endif

    if (sampling_checks) {
        int greedy_ok = 1, top1_ok = 1;
        uint64_t key = rng_key(5, "greedy");
        for (int t = 0; t < T; t++) {
            const float *row = got + (size_t)t * V;
            greedy_ok &= infer_sample(row, V, 0.0f, 0, key, (uint64_t)t) == argmax(row, V);
            top1_ok &= infer_sample(row, V, 1.0f, 1, key, (uint64_t)t) == argmax(row, V);
        }
        check(greedy_ok, "%s: temperature 0 samples the arg-max at every position", name);
        check(top1_ok, "%s: top_k 1 samples the arg-max at every position", name);

        int32_t a[24], b[24], other[24];
        sample_sequence(&s, tokens, 4, 24, 1.0f, 0, 42, a);
        sample_sequence(&s, tokens, 4, 24, 1.0f, 0, 42, b);
        sample_sequence(&s, tokens, 4, 24, 1.0f, 0, 43, other);
        check(memcmp(a, b, sizeof a) == 0, "%s: the same seed samples the same 24 tokens", name);
        check(memcmp(a, other, sizeof a) != 0, "%s: another seed samples other tokens", name);
        int32_t g1[12], g2[12];
        sample_sequence(&s, tokens, 4, 12, 0.0f, 0, 1, g1);
        sample_sequence(&s, tokens, 4, 12, 0.0f, 0, 2, g2);
        check(memcmp(g1, g2, sizeof g1) == 0, "%s: greedy decoding does not depend on the seed", name);

        int in_top = 1;
        const float *row = got + (size_t)(T - 1) * V;
        float *sorted = xmalloc((size_t)V * sizeof *sorted);
        memcpy(sorted, row, (size_t)V * sizeof *sorted);
        for (int j = 0; j < 3; j++) { /* the 3rd largest logit by partial selection */
            int b3 = j;
            for (int v = j + 1; v < V; v++)
                if (sorted[v] > sorted[b3]) b3 = v;
            float tmp = sorted[j];
            sorted[j] = sorted[b3];
            sorted[b3] = tmp;
        }
        for (int i = 0; i < 500; i++) in_top &= row[infer_sample(row, V, 1.5f, 3, key, (uint64_t)i)] >= sorted[2];
        check(in_top, "%s: top_k 3 draws only among the 3 largest logits (500 draws)", name);
        free(sorted);
    }

    free(lg);
    infer_free(&s);
    free(got);
    free(ref);
    free(tokens);
    free(targets);
    free(host);
    free(host_bias);
    model_free(&m);
}

/* Frequencies of a two-token distribution: p(1) = 3^(1/T) / (1 + 3^(1/T)). */
static void check_distribution(void)
{
    const float logits[2] = {0.0f, (float)log(3.0)};
    const float temps[2] = {1.0f, 2.0f};
    uint64_t key = rng_key(11, "distribution");
    for (int k = 0; k < 2; k++) {
        const int n = 20000;
        int ones = 0;
        for (int i = 0; i < n; i++) ones += infer_sample(logits, 2, temps[k], 0, key, (uint64_t)(k * n + i));
        double want = pow(3.0, 1.0 / temps[k]) / (1.0 + pow(3.0, 1.0 / temps[k]));
        double got = (double)ones / n;
        check(fabs(got - want) < 0.015, "sampling at temperature %g: p(token 1) %.4f, softmax says %.4f",
              (double)temps[k], got, want);
    }
}

int main(void)
{
    const char *base = "--size tiny --n_layer 3 --n_embd 48 --n_head 5 --block_size 40";
    char flags[512];

    run_case("tiny LatentMoE", base, 37, 1);
    snprintf(flags, sizeof flags, "%s --deltanet_latent_dim 16 --deltanet_share_qk --mla_q_lora_rank 24 "
             "--n_shared_experts 2", base);
    run_case("latent+shared-QK GDN, q LoRA, 2 shared experts", flags, 40, 0);
    snprintf(flags, sizeof flags, "%s --no_use_latent_moe --n_experts 6 --n_activated 2", base);
    run_case("standard MoE (E 6, k 2)", flags, 33, 0);
    snprintf(flags, sizeof flags, "%s --no_use_moe", base);
    run_case("dense FFN", flags, 29, 0);
    run_case("6 layers (MLA kv ranks 35 and 64), 90 tokens across GDN chunks",
             "--size tiny --n_layer 6 --n_embd 48 --n_head 5 --block_size 96 --deltanet_latent_dim 12", 90, 0);
    check_distribution();

    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures ? 1 : 0;
}
