/* train.c: the training step (see train.h) and the `deltamla train` loop: data, steps,
 * one log line per --log_interval, a metrics file, and a clear stop on non-finite
 * values. */
#define _POSIX_C_SOURCE 200809L
#include "train.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "data.h"
#include "util.h"

void trainer_init(trainer *tr, const config *c, const backend *be)
{
    memset(tr, 0, sizeof *tr);
    tr->cfg = *c;
    model_init(&tr->model, c, be, c->batch_size, c->block_size);
    optim_init(&tr->opt, &tr->model);
}

void trainer_free(trainer *tr)
{
    optim_free(&tr->opt);
    model_free(&tr->model);
}

void trainer_grads(trainer *tr, const int32_t *inputs, const int32_t *targets, step_stats *st)
{
    model *m = &tr->model;
    int ga = tr->cfg.gradient_accumulation_steps;
    size_t BT = (size_t)m->B * m->T;
    memset(st, 0, sizeof *st);
    st->it = tr->it;
    model_zero_grad(m);
    for (int micro = 0; micro < ga; micro++) {
        double z = 0;
        st->loss += model_forward(m, inputs + micro * BT, targets + micro * BT, &z) / ga;
        st->zloss += z / ga;
        model_backward(m, 1.0f / ga, 1.0f / ga);
    }
    st->grad_norm = optim_grad_norm(m);
    st->lr = optim_lr(&tr->cfg, tr->it);
    st->nonfinite = !isfinite(st->loss) || !isfinite(st->zloss) || !isfinite(st->grad_norm);
}

void trainer_apply(trainer *tr, step_stats *st)
{
    model *m = &tr->model;
    const int64_t *loads = model_take_loads(m);
    optim_clip(m, st->grad_norm);
    optim_step(&tr->opt, m, st->lr);
    int64_t tokens = (int64_t)tr->cfg.gradient_accumulation_steps * m->B * m->T;
    optim_router_bias_update(m, loads, tokens);
    tr->it++;
}

static void make_dirs(const char *path)
{
    char buf[CONFIG_PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create directory %s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("cannot create directory %s: %s", buf, strerror(errno));
}

const backend *train_backend(const config *c)
{
    int want_cuda = strcmp(c->device, "cuda") == 0;
#ifdef DELTAMLA_HAVE_CUDA
    if (want_cuda || (strcmp(c->device, "auto") == 0 && cuda_device_count() > 0)) return backend_cuda(0);
#else
    if (want_cuda) die("--device cuda: this build has no CUDA backend (nvcc was not found at build time)");
#endif
    return backend_cpu();
}

int train_main(const config *c)
{
    if (!c->data[0]) die("no training data: pass --data FILE (a text file, read as bytes)");
#ifdef _OPENMP
    if (c->threads > 0) omp_set_num_threads(c->threads);
#endif
    data_source *src = data_text_open(c->data, c->block_size, c->seed);
    if (src->max_token >= c->vocab_size)
        die("--data %s holds token %d but --vocab_size is %d", c->data, src->max_token, c->vocab_size);
    make_dirs(c->output_dir);
    char path[CONFIG_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    FILE *metrics = fopen(path, "w");
    if (!metrics) die("cannot write %s: %s", path, strerror(errno));
    snprintf(path, sizeof path, "%s/config.json", c->output_dir);
    FILE *cj = fopen(path, "w");
    if (!cj) die("cannot write %s: %s", path, strerror(errno));
    config_json(c, cj);
    fclose(cj);

    const backend *be = train_backend(c);
    trainer tr;
    trainer_init(&tr, c, be);
    int64_t total, active;
    params_count(&tr.model.table, &total, &active);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    if (strcmp(be->name, "cpu") == 0)
        printf("deltamla train: size %s, %d layers, d %d, %lld parameters (%lld active), device cpu (%d threads)\n",
               c->size, c->n_layer, c->n_embd, (long long)total, (long long)active, threads);
    else
        printf("deltamla train: size %s, %d layers, d %d, %lld parameters (%lld active), device %s\n", c->size,
               c->n_layer, c->n_embd, (long long)total, (long long)active, be->name);
    printf("data %s: %lld tokens, %lld rows of %d+1; batch %d x %d x %d accumulation; optimizer %s\n", c->data,
           (long long)src->num_tokens, (long long)src->num_rows, c->block_size, c->batch_size, c->block_size,
           c->gradient_accumulation_steps, c->optimizer_type);
    fflush(stdout);

    size_t n = (size_t)c->gradient_accumulation_steps * c->batch_size * c->block_size;
    int32_t *inputs = xmalloc(n * sizeof *inputs), *targets = xmalloc(n * sizeof *targets);
    double t_log = wall_time();
    int64_t tokens_since = 0;
    int status = 0;
    for (int it = 0; it < c->max_iters; it++) {
        for (int micro = 0; micro < c->gradient_accumulation_steps; micro++) {
            size_t off = (size_t)micro * c->batch_size * c->block_size;
            src->next_batch(src, inputs + off, targets + off, c->batch_size, c->block_size);
        }
        step_stats st;
        trainer_grads(&tr, inputs, targets, &st);
        tokens_since += (int64_t)n;
        if (st.nonfinite) {
            if (!c->skip_nonfinite) {
                fprintf(metrics, "{\"step\":%d,\"nonfinite\":true,\"loss\":\"%g\",\"grad_norm\":\"%g\"}\n", it,
                        st.loss, st.grad_norm);
                fclose(metrics);
                die("non-finite %s at step %d (loss %g, z-loss %g, grad norm %g); lower --learning_rate, "
                    "or pass --skip_nonfinite to skip such steps",
                    isfinite(st.loss) ? "gradient norm" : "loss", it, st.loss, st.zloss, st.grad_norm);
            }
            tr.skipped++;
            tr.it++;
            model_take_loads(&tr.model);
            fprintf(stderr, "deltamla: warning: step %d skipped: non-finite loss or gradient norm (%lld skipped so far)\n",
                    it, (long long)tr.skipped);
        } else {
            trainer_apply(&tr, &st);
        }
        int last = it == c->max_iters - 1;
        if (it % c->log_interval == 0 || last) {
            double now = wall_time(), tps = tokens_since / (now - t_log > 0 ? now - t_log : 1e-9);
            printf("step %6d/%d | loss %.4f | zloss %.5f | lr %.3e | grad norm %.4f | %.0f tok/s%s\n", it,
                   c->max_iters, st.loss, st.zloss, st.lr, st.grad_norm, tps, st.nonfinite ? " | skipped" : "");
            fflush(stdout);
            fprintf(metrics,
                    "{\"step\":%d,\"loss\":%.9g,\"zloss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens_per_s\":%.1f,"
                    "\"skipped_total\":%lld}\n",
                    it, st.loss, st.zloss, st.lr, st.grad_norm, tps, (long long)tr.skipped);
            fflush(metrics);
            t_log = now;
            tokens_since = 0;
        }
    }
    if (tr.skipped) printf("%lld non-finite steps were skipped\n", (long long)tr.skipped);
    fclose(metrics);
    free(inputs);
    free(targets);
    trainer_free(&tr);
    src->close(src);
    return status;
}
