/* test_head_fused.c: the head's backward run inside the forward (model.head_scale, which
 * the trainer sets: classifier_forward_backward) against the separate backward, on the
 * CPU backend. Two micro-batches accumulate into the gradients, as with gradient
 * accumulation, each with some targets ignored: the losses and every gradient must be the
 * same bits both ways (the CPU's fused op is the two ops in turn, and the model adds the
 * head's gradients in the same order). Also the model's latent, shared-QK and query-latent
 * options, so that the multi-part projections run too. And the model's graph_run keys
 * under --cuda_graph (graph_keys).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "rng.h"
#include "util.h"
#include "test_flags.h"

static int failures;

static void report(const char *what, int pass)
{
    printf("%s - %s\n", pass ? "ok" : "not ok", what);
    if (!pass) failures++;
}

/* two micro-batches of B x T tokens into m's gradients; losses[2] out */
static void run(model *m, int fused, const int32_t *in, const int32_t *tg, double *losses)
{
    const size_t BT = (size_t)m->B * m->T;
    model_zero_grad(m);
    for (int micro = 0; micro < 2; micro++) {
        m->head_scale = fused ? 0.5f : 0.0f;
        losses[micro] = model_forward(m, in + micro * BT, tg + micro * BT, NULL);
        m->head_scale = 0.0f;
        model_backward(m, 0.5f, 0.5f);
    }
}

static void run_case(const char *name, const char *flags)
{
    config c;
    parse_flags(&c, flags);
    const int B = 2, T = 24;
    c.batch_size = B;
    c.block_size = T;
    const size_t n = 2 * (size_t)B * T;
    int32_t *in = xmalloc(n * sizeof *in), *tg = xmalloc(n * sizeof *tg);
    const uint64_t key = rng_key(11, name);
    for (size_t i = 0; i < n; i++) {
        in[i] = (int32_t)(rng_bits(key, i) % (uint64_t)c.vocab_size);
        tg[i] = rng_bits(key + 1, i) % 5 == 0 ? -100 : (int32_t)(rng_bits(key + 2, i) % (uint64_t)c.vocab_size);
    }
    model a, b;
    model_init(&a, &c, backend_cpu(), B, T);
    model_init(&b, &c, backend_cpu(), B, T);
    double la[2], lb[2];
    run(&a, 0, in, tg, la);
    run(&b, 1, in, tg, lb);
    char what[256];
    snprintf(what, sizeof what, "%s: losses with the head's backward in the forward, bitwise", name);
    report(what, la[0] == lb[0] && la[1] == lb[1]);
    snprintf(what, sizeof what, "%s: every gradient with the head's backward in the forward, bitwise", name);
    report(what, !memcmp(a.grads, b.grads, a.table.total * sizeof(float)));
    model_free(&a);
    model_free(&b);
    free(in), free(tg);
}

/* --cuda_graph on the CPU: a backend that records each graph_run key and calls fn. The
 * forward and the backward of every micro-batch go through it; micro-batches with the
 * same host scalars give the same key, and a different loss scale (another count of
 * valid targets) a different forward key; the results are those without the flag,
 * bitwise. */
#define KEYS_MAX 16
static unsigned char keys[KEYS_MAX][128];
static size_t key_len[KEYS_MAX];
static int n_keys;

static void recording_graph_run(const void *key, size_t key_bytes, void (*fn)(void *ctx), void *ctx)
{
    if (n_keys < KEYS_MAX && key_bytes <= sizeof keys[0]) {
        memcpy(keys[n_keys], key, key_bytes);
        key_len[n_keys++] = key_bytes;
    }
    fn(ctx);
}

static int same_key(int a, int b) { return key_len[a] == key_len[b] && !memcmp(keys[a], keys[b], key_len[a]); }

static void graph_keys(void)
{
    config c;
    parse_flags(&c, "--size tiny");
    const int B = 2, T = 24;
    const size_t n = (size_t)B * T;
    int32_t *in = xmalloc(3 * n * sizeof *in), *tg = xmalloc(3 * n * sizeof *tg);
    for (size_t i = 0; i < 3 * n; i++) {
        in[i] = (int32_t)(rng_bits(5, i) % (uint64_t)c.vocab_size);
        tg[i] = (int32_t)(rng_bits(6, i) % (uint64_t)c.vocab_size);
    }
    tg[2 * n + 3] = -100; /* the third micro-batch: one valid target fewer */
    backend rec = *backend_cpu();
    rec.graph_run = recording_graph_run;
    model a, b;
    c.cuda_graph = 0;
    model_init(&a, &c, backend_cpu(), B, T);
    c.cuda_graph = 1;
    model_init(&b, &c, &rec, B, T);
    double la[3], lb[3];
    model *ms[2] = {&a, &b};
    double *ls[2] = {la, lb};
    for (int k = 0; k < 2; k++) {
        model_zero_grad(ms[k]);
        for (int micro = 0; micro < 3; micro++) {
            ms[k]->head_scale = 1.0f / 3;
            ls[k][micro] = model_forward(ms[k], in + micro * n, tg + micro * n, NULL);
            ms[k]->head_scale = 0.0f;
            model_backward(ms[k], 1.0f / 3, 1.0f / 3);
        }
    }
    report("--cuda_graph on the CPU: forward and backward of 3 micro-batches through graph_run", n_keys == 6);
    report("--cuda_graph: the same key for micro-batches with the same scalars, forward and backward",
           n_keys == 6 && same_key(0, 2) && same_key(1, 3) && !same_key(0, 1));
    report("--cuda_graph: another forward key where the loss scale differs (fewer valid targets); the same "
           "backward key (the forward ran the head's backward, the backward takes no loss scale)",
           n_keys == 6 && !same_key(0, 4) && same_key(1, 5));
    report("--cuda_graph: losses and gradients bitwise as without it",
           !memcmp(la, lb, sizeof la) && !memcmp(a.grads, b.grads, a.table.total * sizeof(float)));
    model_free(&a);
    model_free(&b);
    free(in), free(tg);
}

int main(void)
{
    run_case("tiny", "--size tiny");
    run_case("tiny, latents and shared qk",
             "--size tiny --deltanet_latent_dim 16 --deltanet_share_qk --mla_q_lora_rank 24");
    graph_keys();
    printf("# %d failure(s)\n", failures);
    return failures != 0;
}
