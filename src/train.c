/* train.c: the training step (see train.h) and the `deltamla train` loop: data, steps,
 * one log line per --log_interval, a metrics file, a clear stop on non-finite values,
 * and checkpoints (io/checkpoint.h): resume at start, a save every
 * --checkpoint_interval steps, at the end, and on SIGUSR1/SIGTERM.
 *
 * Preemption: the signal handler only records the signal; the loop finishes the step
 * it is in, saves, prints one line and returns 0, so a batch system's requeue starts a
 * run that resumes from `latest` and continues with the losses the uninterrupted run
 * would have had. Resume never starts afresh by surprise: a damaged checkpoint is
 * reported and the previous good one used, and when none loads the run stops. */
#define _POSIX_C_SOURCE 200809L
#include "train.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef DELTAMLA_HAVE_MPI
#include <mpi.h>
#endif

#include "../io/checkpoint.h"
#include "data.h"
#include "dist.h"
#include "util.h"

void trainer_init(trainer *tr, const config *c, const backend *be)
{
    memset(tr, 0, sizeof *tr);
    tr->cfg = *c;
    model_init(&tr->model, c, be, c->batch_size, c->block_size);
    optim_init(&tr->opt, &tr->model);
}

void trainer_init_dist(trainer *tr, const config *c, dist *d)
{
    memset(tr, 0, sizeof *tr);
    tr->cfg = *c;
    tr->dist = d;
    model_init_dist(&tr->model, c, d->be, c->batch_size, c->block_size, d);
    optim_init(&tr->opt, &tr->model);
    const param_table *t = &tr->model.table;
    for (int region = 0; region < 2; region++) {
        tr->layer_lo[region] = xmalloc((size_t)(c->n_layer + 1) * sizeof(size_t));
        for (int l = 0; l < c->n_layer; l++) tr->layer_lo[region][l] = SIZE_MAX;
    }
    for (int i = 0; i < t->count; i++) {
        const param_info *p = &t->items[i];
        int region = p->kind == PARAM_EXPERTS;
        if (p->layer >= 0 && p->offset < tr->layer_lo[region][p->layer]) tr->layer_lo[region][p->layer] = p->offset;
    }
}

void trainer_free(trainer *tr)
{
    optim_free(&tr->opt);
    model_free(&tr->model);
    free(tr->layer_lo[0]);
    free(tr->layer_lo[1]);
}

/* The backward's hook (model.h: grads_ready): once the layers below a bucket's worth
 * of gradients are done, their sum over the ranks starts (on the GPU on a side stream,
 * overlapped with the rest of the backward). Layers run last to first and the flat
 * buffer holds them first to last, so the pending part of each region is always one
 * range [layer_lo, pending_hi). Dense gradients are summed over all ranks, expert
 * gradients over the ranks that hold the same experts. */
static void grads_ready(void *ctx, int layer)
{
    trainer *tr = ctx;
    model *m = &tr->model;
    size_t bucket = (size_t)tr->cfg.bucket_mb << 18; /* floats */
    size_t start[2] = {0, m->table.dense_total};
    int groups[2] = {DIST_WORLD, DIST_EDP};
    for (int region = 0; region < 2; region++) {
        size_t lo = layer >= 0 ? tr->layer_lo[region][layer] : start[region];
        if (lo == SIZE_MAX) continue;
        size_t hi = tr->pending_hi[region];
        if (hi > lo && (layer < 0 || hi - lo >= bucket)) {
            dist_reduce_start(tr->dist, groups[region], m->grads + lo, hi - lo);
            tr->pending_hi[region] = lo;
        }
    }
}

void trainer_grads(trainer *tr, const int32_t *inputs, const int32_t *targets, step_stats *st)
{
    model *m = &tr->model;
    dist *d = tr->dist;
    int ga = tr->cfg.gradient_accumulation_steps, world = d ? d->world : 1;
    size_t BT = (size_t)m->B * m->T;
    memset(st, 0, sizeof *st);
    st->it = tr->it;
    model_zero_grad(m);
    for (int micro = 0; micro < ga; micro++) {
        const int32_t *tg = targets + micro * BT;
        double n_valid = 0;
        if (world > 1) {
            /* the mean over the global micro-batch: every rank's CE sum over all valid
             * targets, so the gradients' sum over ranks is the single-process gradient;
             * their count is known before the forward, which runs the head's backward */
            for (size_t i = 0; i < BT; i++) n_valid += tg[i] != -100;
            dist_allreduce_host_f64(d, DIST_WORLD, &n_valid, 1);
            m->loss_norm = n_valid > 0 ? n_valid : 1.0;
        }
        double z = 0;
        m->head_scale = 1.0f / ga; /* the scale model_backward gets below */
        double loss = model_forward(m, inputs + micro * BT, tg, &z);
        m->head_scale = 0.0f;
        if (world > 1) {
            double v[2] = {m->last_loss_sum, z};
            dist_allreduce_host_f64(d, DIST_WORLD, v, 2);
            loss = n_valid > 0 ? v[0] / n_valid : 0.0;
            z = v[1] / world;
            if (micro == ga - 1) {
                m->grads_ready = grads_ready;
                m->grads_ready_ctx = tr;
                tr->pending_hi[0] = m->table.dense_total;
                tr->pending_hi[1] = m->table.total;
            }
        }
        st->loss += loss / ga;
        st->zloss += z / ga;
        model_backward(m, 1.0f / ga, 1.0f / ((float)ga * world));
        m->grads_ready = NULL;
    }
    if (world > 1) dist_reduce_wait(d);
    st->grad_norm = optim_grad_norm(m);
    st->lr = optim_lr(&tr->cfg, tr->it);
    st->nonfinite = !isfinite(st->loss) || !isfinite(st->zloss) || !isfinite(st->grad_norm);
}

void trainer_apply(trainer *tr, step_stats *st)
{
    model *m = &tr->model;
    int32_t *loads = model_loads(m);
    int world = tr->dist ? tr->dist->world : 1;
    if (world > 1) dist_allreduce_i32(tr->dist, DIST_WORLD, loads, (size_t)m->n_moe * (m->cfg.use_moe ? m->cfg.moe_E : 0));
    optim_clip(m, st->grad_norm);
    optim_step(&tr->opt, m, st->lr);
    int64_t tokens = (int64_t)tr->cfg.gradient_accumulation_steps * m->B * m->T * world;
    optim_router_bias_update(m, loads, tokens);
    model_reset_loads(m);
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

/* Mean validation loss over `iters` batches, always the same batches: the source is
 * rewound to its start, and routing loads are not counted towards the bias update. */
static double evaluate(trainer *tr, data_source *val, int iters, int32_t *inputs, int32_t *targets)
{
    model *m = &tr->model;
    val->epoch = 0;
    val->row = 0;
    m->count_loads = 0;
    double v[2] = {0, 0}; /* CE sum and valid targets over the batches (and ranks) */
    for (int i = 0; i < iters; i++) {
        val->next_batch(val, inputs, targets, m->B, m->T);
        model_forward(m, inputs, targets, NULL);
        v[0] += m->last_loss_sum;
        v[1] += m->last_valid;
    }
    m->count_loads = 1;
    if (tr->dist) dist_allreduce_host_f64(tr->dist, DIST_WORLD, v, 2);
    return v[1] > 0 ? v[0] / v[1] : 0.0;
}

/* ---- checkpoints: signals, saving, resuming ---- */

/* The signal that asked the run to stop (SIGUSR1 or SIGTERM), 0 while none did. The
 * handler only stores it: saving is not async-signal-safe, so the loop does it. */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) { stop_signal = sig; }

static void install_stop_handlers(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART; /* a signal during a write must not fail the write */
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* The stop signal if any rank received one: every rank must leave the loop after the
 * same step, because the save is collective. */
static int stop_requested(void)
{
    int sig = stop_signal;
#ifdef DELTAMLA_HAVE_MPI
    int inited = 0;
    MPI_Initialized(&inited);
    if (inited) MPI_Allreduce(MPI_IN_PLACE, &sig, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
#endif
    return sig;
}

static void save(trainer *tr, const data_source *src, const config *c)
{
    double t0 = wall_time();
    ckpt_save(c->output_dir, tr, src, src->tokenizer_json, c->keep_checkpoints);
    char path[CONFIG_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/ckpt_%08d.h5", c->output_dir, tr->it);
    struct stat st;
    double mb = stat(path, &st) == 0 ? (double)st.st_size / 1e6 : 0;
    if (!tr->dist || tr->dist->rank == 0)
        printf("checkpoint %s: step %d, %.1f MB in %.2f s\n", path, tr->it, mb, wall_time() - t0);
    fflush(stdout);
}

static void json_string_out(const char *s, FILE *f)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

/* The directory part of path ("." when it has none); malloc'd. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) : 1;
    char *d = xmalloc(n + 1);
    if (!slash) strcpy(d, ".");
    else if (n == 0) strcpy(d, "/");
    else {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

/* Resume as --resume says: "" = the checkpoint `latest` names in OUTPUT_DIR (else the
 * newest ckpt_*.h5 there, else a fresh start: the first run of a job), "none" = fresh,
 * anything else = that file. A checkpoint that fails to load is reported on one
 * warning line and the next older one in its directory is tried; when none loads the
 * run stops, because training from scratch over a run's output would lose its work.
 * Returns the path resumed from (malloc'd) or NULL for a fresh start. */
static char *resume(trainer *tr, data_source *src, const config *c)
{
    if (strcmp(c->resume, "none") == 0) return NULL;
    char *first, *dir;
    if (c->resume[0]) {
        struct stat st;
        if (stat(c->resume, &st) != 0) die("--resume %s: %s", c->resume, strerror(errno));
        if (S_ISDIR(st.st_mode))
            die("--resume %s is a directory; pass a checkpoint file (or --output_dir DIR to resume from its latest)",
                c->resume);
        first = xmalloc(strlen(c->resume) + 1);
        strcpy(first, c->resume);
        dir = dir_of(first);
    } else {
        first = ckpt_latest(c->output_dir);
        dir = xmalloc(strlen(c->output_dir) + 1);
        strcpy(dir, c->output_dir);
        if (!first) {
            int n;
            char **found = ckpt_older(c->output_dir, -1, &n);
            if (n) { /* a save renamed its file, then died before `latest` was written */
                first = found[0];
                found[0] = NULL;
            }
            for (int i = 0; i < n; i++) free(found[i]);
            free(found);
            if (!first) {
                free(dir);
                return NULL;
            }
        }
    }
    const char *why = NULL;
    if (ckpt_load(first, tr, src, &why) == 0) {
        free(dir);
        return first;
    }
    int rank = 0;
#ifdef DELTAMLA_HAVE_MPI
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
#endif
    char first_why[768];
    snprintf(first_why, sizeof first_why, "%s", why);
    if (rank == 0)
        fprintf(stderr, "deltamla: warning: cannot resume from %s: %s; trying the previous checkpoint\n", first, why);
    int n;
    char **older = ckpt_older(dir, ckpt_name_step(first), &n);
    char *chosen = NULL;
    for (int i = 0; i < n; i++) {
        if (!chosen && strcmp(older[i], first) != 0) {
            if (ckpt_load(older[i], tr, src, &why) == 0) {
                chosen = older[i];
                older[i] = NULL;
                if (rank == 0) fprintf(stderr, "deltamla: warning: resuming from the older checkpoint %s\n", chosen);
            } else if (rank == 0) {
                fprintf(stderr, "deltamla: warning: cannot resume from %s either: %s\n", older[i], why);
            }
        }
        free(older[i]);
    }
    free(older);
    if (!chosen)
        die("no checkpoint to resume from: %s is unusable (%s) and no older one in %s loads; pass --resume none to "
            "start afresh (the run's output would then be overwritten)",
            first, first_why, dir);
    free(first);
    free(dir);
    return chosen;
}

int train_main(const config *c)
{
    if (!c->data[0]) die("no training data: pass --data FILE (a text file, read as bytes)");
#ifdef _OPENMP
    if (c->threads > 0) omp_set_num_threads(c->threads);
#endif
    /* from the start, so a signal during start-up also ends in a clean stop */
    install_stop_handlers();
    /* ranks, groups and each rank's device; the layout is checked before any data is read */
    dist d;
    dist_init(&d, c);
    int lead = d.rank == 0; /* rank 0 logs and writes the metrics */
    data_source *src = data_open(c->data, c->block_size, c->seed, c->val_data[0] ? 0.0 : c->val_fraction, DATA_TRAIN,
                                 d.rank, d.world);
    if (src->max_token >= c->vocab_size)
        die("--data %s holds token %d but --vocab_size is %d", c->data, src->max_token, c->vocab_size);
    if (c->doc_mask && src->eot_token < 0)
        die("--doc_mask needs data with an end-of-text token (token shards from deltamla prep); %s has none", c->data);
    data_source *val = NULL;
    if (c->val_data[0]) val = data_open(c->val_data, c->block_size, c->seed, 0.0, DATA_TRAIN, d.rank, d.world);
    else if (c->val_fraction > 0)
        val = data_open(c->data, c->block_size, c->seed, c->val_fraction, DATA_VAL, d.rank, d.world);
    if (c->eval_interval > 0 && !val)
        die("--eval_interval %d needs validation data: pass --val_data PATH or --val_fraction F", c->eval_interval);
    if (val && val->max_token >= c->vocab_size)
        die("--val_data %s holds token %d but --vocab_size is %d", c->val_data, val->max_token, c->vocab_size);
    make_dirs(c->output_dir);

    const backend *be = d.be;
    trainer tr;
    trainer_init_dist(&tr, c, &d);
    model_set_eot(&tr.model, src->eot_token);
    char *resumed = resume(&tr, src, c);

    char path[CONFIG_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/metrics.jsonl", c->output_dir);
    /* a resumed run continues the record of the run it resumes */
    FILE *metrics = lead ? fopen(path, resumed ? "a" : "w") : NULL;
    if (lead && !metrics) die("cannot write %s: %s", path, strerror(errno));
    if (metrics && resumed) {
        fprintf(metrics, "{\"step\":%d,\"resumed_from\":", tr.it);
        json_string_out(resumed, metrics);
        fputs("}\n", metrics);
        fflush(metrics);
    }
    snprintf(path, sizeof path, "%s/config.json", c->output_dir);
    if (lead) {
        FILE *cj = fopen(path, "w");
        if (!cj) die("cannot write %s: %s", path, strerror(errno));
        config_json(c, cj);
        fclose(cj);
    }

    int64_t total, active;
    params_count(&tr.model.table, &total, &active);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    if (lead) {
        if (strcmp(be->name, "cpu") == 0)
            printf("deltamla train: size %s, %d layers, d %d, %lld parameters (%lld active), device cpu (%d threads)\n",
                   c->size, c->n_layer, c->n_embd, (long long)total, (long long)active, threads);
        else
            printf("deltamla train: size %s, %d layers, d %d, %lld parameters (%lld active), device %s\n", c->size,
                   c->n_layer, c->n_embd, (long long)total, (long long)active, be->name);
        if (d.world > 1)
            printf("ranks %d (%d per node): data parallel %d, expert parallel %d (%d of %d routed experts per rank), "
                   "zero %d, collectives over %s\n",
                   d.world, d.local_size, d.world, d.ep, c->use_moe ? c->moe_E / d.ep : 0, c->use_moe ? c->moe_E : 0,
                   c->zero, d.use_nccl ? "NCCL" : "MPI");
        printf("data %s: %lld tokens, %lld rows of %d+1; batch %d x %d x %d accumulation x %d ranks; optimizer %s\n",
               c->data, (long long)src->num_tokens, (long long)src->num_rows, c->block_size, c->batch_size,
               c->block_size, c->gradient_accumulation_steps, d.world, c->optimizer_type);
        if (resumed)
            printf("resumed from %s: step %d, data epoch %lld row %lld\n", resumed, tr.it, (long long)src->epoch,
                   (long long)src->row);
        if (resumed && tr.it >= c->max_iters)
            printf("the checkpoint is at step %d and --max_iters is %d: nothing left to train\n", tr.it, c->max_iters);
    }
    fflush(stdout);

    size_t n = (size_t)c->gradient_accumulation_steps * c->batch_size * c->block_size;
    /* the batch the loader hands over lives in the backend's fastest host memory
     * (page-locked on a GPU), so its upload is one DMA transfer */
    int32_t *inputs = be->host_alloc(n * sizeof *inputs), *targets = be->host_alloc(n * sizeof *targets);
    double t_log = wall_time();
    int64_t tokens_since = 0;
    int it_log = tr.it;
    d.timing = c->comm_timing;
    int last_saved = resumed ? tr.it : -1; /* the step whose state is on disk already */
    int stop = stop_requested();
    while (!stop && tr.it < c->max_iters) {
        int it = tr.it;
        for (int micro = 0; micro < c->gradient_accumulation_steps; micro++) {
            size_t off = (size_t)micro * c->batch_size * c->block_size;
            src->next_batch(src, inputs + off, targets + off, c->batch_size, c->block_size);
        }
        step_stats st;
        trainer_grads(&tr, inputs, targets, &st);
        tokens_since += (int64_t)n * d.world;
        if (st.nonfinite) {
            if (!c->skip_nonfinite) {
                if (metrics) {
                    fprintf(metrics, "{\"step\":%d,\"nonfinite\":true,\"loss\":\"%g\",\"grad_norm\":\"%g\"}\n", it,
                            st.loss, st.grad_norm);
                    fclose(metrics);
                }
                die("non-finite %s at step %d (loss %g, z-loss %g, grad norm %g); lower --learning_rate, "
                    "or pass --skip_nonfinite to skip such steps",
                    isfinite(st.loss) ? "gradient norm" : "loss", it, st.loss, st.zloss, st.grad_norm);
            }
            tr.skipped++;
            tr.it++;
            model_reset_loads(&tr.model);
            if (lead)
                fprintf(stderr, "deltamla: warning: step %d skipped: non-finite loss or gradient norm (%lld skipped so far)\n",
                    it, (long long)tr.skipped);
        } else {
            trainer_apply(&tr, &st);
        }
        int last = it == c->max_iters - 1;
        if (val && c->eval_interval > 0 && ((it + 1) % c->eval_interval == 0 || last)) {
            double vl = evaluate(&tr, val, c->eval_iters, inputs, targets);
            if (lead) {
                printf("step %6d/%d | val loss %.4f (%d batches)\n", it, c->max_iters, vl, c->eval_iters);
                fprintf(metrics, "{\"step\":%d,\"val_loss\":%.9g}\n", it, vl);
                fflush(stdout);
            }
        }
        if (it % c->log_interval == 0 || last) {
            double now = wall_time(), dt = now - t_log > 0 ? now - t_log : 1e-9, tps = tokens_since / dt;
            int steps = it - it_log + 1;
            char comm[160] = "";
            if (d.timing) /* --comm_timing: the step split into compute and communication */
                snprintf(comm, sizeof comm, " | step %.1f ms: reduce %.1f, all-to-all %.1f (%.2f GB/s)",
                         1e3 * dt / steps, 1e3 * d.t_reduce / steps, 1e3 * d.t_alltoall / steps,
                         d.t_alltoall > 0 ? d.alltoall_bytes / d.t_alltoall / 1e9 : 0.0);
            if (lead) {
                printf("step %6d/%d | loss %.4f | zloss %.5f | lr %.3e | grad norm %.4f | %.0f tok/s | mem %.2f GiB%s%s\n",
                       it, c->max_iters, st.loss, st.zloss, st.lr, st.grad_norm, tps, be->mem_peak() / 1073741824.0,
                       st.nonfinite ? " | skipped" : "", comm);
                fflush(stdout);
                fprintf(metrics,
                        "{\"step\":%d,\"loss\":%.9g,\"zloss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,\"tokens_per_s\":%.1f,"
                        "\"skipped_total\":%lld,\"peak_mem_gib\":%.3f",
                        it, st.loss, st.zloss, st.lr, st.grad_norm, tps, (long long)tr.skipped,
                        be->mem_peak() / 1073741824.0);
                if (d.timing)
                    fprintf(metrics, ",\"step_ms\":%.3f,\"reduce_ms\":%.3f,\"alltoall_ms\":%.3f,\"alltoall_gbps\":%.3f",
                            1e3 * dt / steps, 1e3 * d.t_reduce / steps, 1e3 * d.t_alltoall / steps,
                            d.t_alltoall > 0 ? d.alltoall_bytes / d.t_alltoall / 1e9 : 0.0);
                fputs("}\n", metrics);
                fflush(metrics);
            }
            d.t_reduce = d.t_alltoall = 0;
            d.alltoall_bytes = 0;
            it_log = it + 1;
            t_log = now;
            tokens_since = 0;
        }
        stop = stop_requested();
        /* the end of the run saves below; a periodic save at the same step would be a twin */
        if (!stop && c->checkpoint_interval > 0 && tr.it % c->checkpoint_interval == 0 && tr.it < c->max_iters) {
            save(&tr, src, c);
            last_saved = tr.it;
        }
    }
    if (tr.it != last_saved) {
        save(&tr, src, c);
        last_saved = tr.it;
    }
    if (stop && lead) {
        printf("deltamla: stopped by %s after %d of %d steps, state saved in ckpt_%08d.h5; the same command resumes\n",
               stop == SIGTERM ? "SIGTERM" : "SIGUSR1", tr.it, c->max_iters, tr.it);
        fflush(stdout);
    }
    if (tr.skipped && lead) printf("%lld non-finite steps were skipped\n", (long long)tr.skipped);
    if (metrics) fclose(metrics);
    be->host_free(inputs);
    be->host_free(targets);
    free(resumed);
    trainer_free(&tr);
    src->close(src);
    if (val) val->close(val);
    dist_free(&d);
    return 0;
}
