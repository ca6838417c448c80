/* test_docmask.c: --doc_mask against running each document alone.
 *
 * A packed row of several documents (each ending with the end-of-text token) is run
 * with document masking; every document is also run alone as its own row. Per-token
 * losses must agree, and so must the gradient of the summed cross-entropy: the packed
 * run's gradient equals the sum of the single-document gradients. Checked for a config
 * with every GDN and MLA option on (attention, GDN state, short convs, RoPE positions
 * all have to restart at each document), on the CPU backend.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "rng.h"
#include "util.h"
#include "test_flags.h"

static int failures;

static void report(const char *what, int pass, double err)
{
    printf("%s - %s (rel err %.3g)\n", pass ? "ok" : "not ok", what, err);
    if (!pass) failures++;
}

static void run_case(const char *name, const char *flags, const int *doc_len, int ndoc)
{
    config c;
    parse_flags(&c, flags);
    int T = 0;
    for (int d = 0; d < ndoc; d++) T += doc_len[d];
    c.block_size = T;
    c.batch_size = 1;
    int32_t eot = c.vocab_size - 1;
    int32_t *in = xmalloc((size_t)T * sizeof *in), *tg = xmalloc((size_t)T * sizeof *tg);
    uint64_t key = rng_key(7, name);
    for (int t = 0; t < T; t++) in[t] = (int32_t)(rng_bits(key, (uint64_t)t) % (uint64_t)(c.vocab_size - 1));
    int pos = 0;
    for (int d = 0; d < ndoc; d++) {
        pos += doc_len[d];
        in[pos - 1] = eot; /* each document ends with end-of-text */
    }
    for (int t = 0; t < T; t++) tg[t] = t + 1 < T ? in[t + 1] : (int32_t)(rng_bits(key, 999) % 100);

    model packed;
    model_init(&packed, &c, backend_cpu(), 1, T);
    model_set_eot(&packed, eot);
    model_zero_grad(&packed);
    model_forward(&packed, in, tg, NULL);
    model_backward(&packed, (float)packed.last_valid, 0.0f); /* gradient of the summed CE */
    float *loss_packed = xmalloc((size_t)T * sizeof(float));
    memcpy(loss_packed, packed.host_loss, (size_t)T * sizeof(float));

    size_t P = packed.table.total;
    double *gsum = xcalloc(P, sizeof *gsum);
    float *loss_alone = xmalloc((size_t)T * sizeof(float));
    pos = 0;
    for (int d = 0; d < ndoc; d++) {
        config cd = c;
        cd.block_size = doc_len[d];
        cd.doc_mask = 0;
        model one;
        model_init(&one, &cd, backend_cpu(), 1, doc_len[d]);
        model_zero_grad(&one);
        model_forward(&one, in + pos, tg + pos, NULL);
        model_backward(&one, (float)one.last_valid, 0.0f);
        memcpy(loss_alone + pos, one.host_loss, (size_t)doc_len[d] * sizeof(float));
        for (size_t i = 0; i < P; i++) gsum[i] += one.grads[i];
        model_free(&one);
        pos += doc_len[d];
    }
    double num = 0, den = 0;
    for (int t = 0; t < T; t++) {
        num += (loss_packed[t] - loss_alone[t]) * (double)(loss_packed[t] - loss_alone[t]);
        den += (double)loss_alone[t] * loss_alone[t];
    }
    char what[256];
    snprintf(what, sizeof what, "%s: per-token losses with --doc_mask equal each document run alone", name);
    report(what, sqrt(num / den) < 1e-5, sqrt(num / den));
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < packed.table.count; i++) {
        const param_info *p = &packed.table.items[i];
        double n2 = 0, d2 = 0;
        for (size_t j = 0; j < p->numel; j++) {
            double a = packed.grads[p->offset + j], b = gsum[p->offset + j];
            n2 += (a - b) * (a - b);
            d2 += b * b;
        }
        double r = d2 > 0 ? sqrt(n2 / d2) : sqrt(n2);
        if (r > worst) {
            worst = r;
            worst_name = p->name;
        }
    }
    snprintf(what, sizeof what, "%s: every gradient equals the sum over documents run alone (worst %s)", name, worst_name);
    report(what, worst < 1e-4, worst);
    free(gsum);
    free(loss_alone);
    free(loss_packed);
    free(in);
    free(tg);
    model_free(&packed);
}

int main(void)
{
    static const int docs[] = {41, 1, 30, 64, 27};
    run_case("all options on", "--size tiny --doc_mask --deltanet_latent_dim 16 --deltanet_share_qk --mla_q_lora_rank 24 "
             "--n_shared_experts 2 --n_layer 3",
             docs, 5);
    static const int docs2[] = {5, 70, 12};
    run_case("dense, direct projections", "--size tiny --doc_mask --no_use_moe", docs2, 3);
    return failures != 0;
}
