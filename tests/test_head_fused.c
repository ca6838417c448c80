/* test_head_fused.c: the head's backward run inside the forward (model.head_scale, which
 * the trainer sets: classifier_forward_backward) against the separate backward, on the
 * CPU backend. Two micro-batches accumulate into the gradients, as with gradient
 * accumulation, each with some targets ignored: the losses and every gradient must be the
 * same bits both ways (the CPU's fused op is the two ops in turn, and the model adds the
 * head's gradients in the same order). Also the model's latent, shared-QK and query-latent
 * options, so that the multi-part projections run too.
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

int main(void)
{
    run_case("tiny", "--size tiny");
    run_case("tiny, latents and shared qk",
             "--size tiny --deltanet_latent_dim 16 --deltanet_share_qk --mla_q_lora_rank 24");
    printf("# %d failure(s)\n", failures);
    return failures != 0;
}
