/* refdump.c: runs a few training steps on a seeded random batch and writes everything
 * the PyTorch reference test (tests/reference/test_reference.py) checks: the config,
 * the initial weights and router biases, and per step the batch, loss, z-loss, lr,
 * gradient norm, every gradient before clipping, every parameter and router bias after
 * the update. Format: tests/reference/README.md.
 *
 * usage: refdump --dump_dir DIR --steps S [deltamla train flags]
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "rng.h"
#include "safetensors.h"
#include "train.h"
#include "util.h"

static void add_params(st_writer *w, const model *m, const float *host, const char *prefix, char (*names)[160])
{
    for (int i = 0; i < m->table.count; i++) {
        const param_info *p = &m->table.items[i];
        snprintf(names[i], 160, "%s%s", prefix, p->name);
        st_add(w, names[i], ST_F32, p->ndim, p->shape, host + p->offset);
    }
}

static void add_biases(st_writer *w, const model *m, const float *bias, const char *prefix, char (*names)[160])
{
    int slot = 0;
    int64_t E = m->cfg.moe_E;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        if (config_is_gdn(&m->cfg, l) || !m->cfg.use_moe) continue;
        snprintf(names[slot], 160, "%stransformer.h.%d.ffn.router.expert_bias", prefix, l);
        st_add(w, names[slot], ST_F32, 1, &E, bias + (size_t)slot * E);
        slot++;
    }
}

int main(int argc, char **argv)
{
    const char *dir = NULL;
    int steps = 3;
    char **rest = xmalloc((size_t)argc * sizeof *rest);
    int nrest = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dump_dir") == 0 && i + 1 < argc) dir = argv[++i];
        else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = atoi(argv[++i]);
        else rest[nrest++] = argv[i];
    }
    if (!dir || steps < 1) die("usage: refdump --dump_dir DIR --steps S [train flags]");
    config c;
    config_parse(&c, nrest, rest);
    if (c.gradient_accumulation_steps != 1) die("refdump runs with --gradient_accumulation_steps 1");
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) die("cannot create %s: %s", dir, strerror(errno));

    trainer tr;
    trainer_init(&tr, &c, backend_cpu());
    model *m = &tr.model;
    size_t P = m->table.total, nb = (size_t)m->n_moe * (size_t)(c.use_moe ? c.moe_E : 0);
    float *host = xmalloc(P * sizeof(float)), *grads = xmalloc(P * sizeof(float));
    float *bias = xmalloc((nb + 1) * sizeof(float));
    char (*names)[160] = xmalloc((size_t)m->table.count * sizeof *names);
    char (*bnames)[160] = xmalloc((size_t)(m->n_moe + 1) * sizeof *bnames);
    char (*gnames)[160] = xmalloc((size_t)m->table.count * sizeof *gnames);
    char path[4096];

    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) die("cannot write %s", path);
    config_json(&c, f);
    fclose(f);

    st_writer w = {0};
    m->be->to_host(host, m->params, P * sizeof(float));
    m->be->to_host(bias, m->router_bias, nb * sizeof(float));
    add_params(&w, m, host, "", names);
    add_biases(&w, m, bias, "", bnames);
    snprintf(path, sizeof path, "%s/init.safetensors", dir);
    st_write(&w, path);

    int B = c.batch_size, T = c.block_size, V = c.vocab_size;
    int32_t *inputs = xmalloc((size_t)B * T * sizeof(int32_t)), *targets = xmalloc((size_t)B * T * sizeof(int32_t));
    uint64_t key = rng_key(c.seed, "refdump-batch");
    for (int s = 0; s < steps; s++) {
        for (int i = 0; i < B * T; i++) {
            inputs[i] = (int32_t)(rng_bits(key, 2 * ((uint64_t)s * B * T + i)) % (uint64_t)V);
            targets[i] = (int32_t)(rng_bits(key, 2 * ((uint64_t)s * B * T + i) + 1) % (uint64_t)V);
            if (i % 7 == 3) targets[i] = -100; /* the ignore index must be honoured */
        }
        step_stats st;
        trainer_grads(&tr, inputs, targets, &st);
        m->be->to_host(grads, m->grads, P * sizeof(float));
        trainer_apply(&tr, &st);
        m->be->to_host(host, m->params, P * sizeof(float));
        m->be->to_host(bias, m->router_bias, nb * sizeof(float));
        float loss = (float)st.loss, zloss = (float)st.zloss, lr = (float)st.lr, gn = (float)st.grad_norm;
        int64_t shape[2] = {B, T};
        st_add(&w, "inputs", ST_I32, 2, shape, inputs);
        st_add(&w, "targets", ST_I32, 2, shape, targets);
        st_add_scalar_f32(&w, "loss", &loss);
        st_add_scalar_f32(&w, "zloss", &zloss);
        st_add_scalar_f32(&w, "lr", &lr);
        st_add_scalar_f32(&w, "grad_norm", &gn);
        add_params(&w, m, grads, "grad.", gnames);
        add_params(&w, m, host, "param.", names);
        add_biases(&w, m, bias, "bias_after.", bnames);
        snprintf(path, sizeof path, "%s/step%d.safetensors", dir, s);
        st_write(&w, path);
        printf("step %d: loss %.6f zloss %.6g grad norm %.6f lr %.3g\n", s, st.loss, st.zloss, st.grad_norm, st.lr);
    }
    trainer_free(&tr);
    return 0;
}
