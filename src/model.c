/* model.c: planning the model's memory, and the top of the graph: embedding, the
 * stack of blocks, the final norm and the fused head + cross-entropy. The blocks
 * themselves are in model_gdn.c and model_mla.c.
 *
 * Memory is planned once: one allocation each for parameters, gradients, router state,
 * saved activations and backward scratch. With --gradient_checkpointing all blocks
 * share one activation region and each block's forward is run again just before its
 * backward, so only the block inputs (the residual stream) are kept per layer.
 */
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"
#include "model_internal.h"
#include "util.h"

int model_index(const model *m, int l, const char *suffix, int required)
{
    char name[128];
    snprintf(name, sizeof name, "transformer.h.%d.%s", l, suffix);
    int i = params_find(&m->table, name);
    if (i < 0 && required) die("internal: parameter %s missing from the table", name);
    return required || i >= 0 ? i : -1;
}

/* Plan (a.base NULL) or place every block's saved activations; returns bytes needed. */
static size_t plan_layers(model *m, char *base, size_t cap, size_t *one_layer_max)
{
    size_t shared_max = 0, total = 0;
    m->n_moe = 0;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        arena a = {base, 0, cap};
        if (!m->cfg.gradient_checkpointing) { /* layers one after another */
            a.base = base ? base + total : NULL;
            a.cap = base ? cap - total : 0;
        }
        if (m->layers[l].is_gdn) gdn_plan(m, l, &a);
        else mla_plan(m, l, &a);
        size_t bytes = (a.used + 255) & ~(size_t)255;
        total += bytes;
        if (bytes > shared_max) shared_max = bytes;
    }
    *one_layer_max = shared_max;
    return m->cfg.gradient_checkpointing ? shared_max : total;
}

void model_init(model *m, const config *cfg, const backend *be, int B, int T)
{
    model_init_dist(m, cfg, be, B, T, NULL);
}

void model_init_dist(model *m, const config *cfg, const backend *be, int B, int T, struct dist *dist)
{
    memset(m, 0, sizeof *m);
    m->head_dloss = -1.0f;
    m->cfg = *cfg;
    m->be = be;
    m->B = B;
    m->T = T;
    m->dist = dist;
    m->ep = dist ? dist->ep : 1;
    const config *c = &m->cfg;
    int N = B * T, d = c->n_embd, L = c->n_layer;
    params_build(&m->table, c);
    if (m->ep > 1) params_shard_experts(&m->table, m->ep, dist->ep_rank);
    m->layers = xcalloc((size_t)L, sizeof *m->layers);
    for (int l = 0; l < L; l++) m->layers[l].is_gdn = config_is_gdn(c, l);

    size_t one_layer_max;
    size_t act_bytes = plan_layers(m, NULL, 0, &one_layer_max);
    m->act_base = be->alloc(act_bytes);
    plan_layers(m, m->act_base, act_bytes, &one_layer_max);

    /* backward scratch: a block's backward takes at most one gradient buffer per saved
     * activation (arena_take checks the bound on every use) */
    size_t scratch_bytes = 2 * one_layer_max + 4 * (size_t)N * d * sizeof(float) + 65536;
    m->scratch_base = be->alloc(scratch_bytes);
    m->scratch_cap = scratch_bytes;

    m->params = be->alloc(m->table.total * sizeof(float));
    m->grads = be->alloc(m->table.total * sizeof(float));
    float *host = xmalloc(m->table.total * sizeof(float));
    params_init(&m->table, host, c->seed);
    be->from_host(m->params, host, m->table.total * sizeof(float));
    free(host);

    size_t E = (size_t)(c->use_moe ? c->moe_E : 0);
    m->router_bias = be->alloc((m->n_moe * E + 1) * sizeof(float));
    m->counts = be->alloc((m->n_moe * E + 1) * sizeof(int32_t));
    m->zloss = be->alloc((size_t)(m->n_moe + 1) * sizeof(float));
    m->loads = be->alloc((m->n_moe * E + 1) * sizeof(int32_t));

    m->tokens = be->alloc((size_t)N * sizeof(int32_t));
    m->targets = be->alloc((size_t)N * sizeof(int32_t));
    m->resid = be->alloc((size_t)(L + 1) * N * d * sizeof(float));
    m->lnf = be->alloc((size_t)N * d * sizeof(float));
    m->lnf_rstd = be->alloc((size_t)N * sizeof(float));
    m->loss = be->alloc((size_t)N * sizeof(float));
    m->lse = be->alloc((size_t)N * sizeof(float));
    m->dx = be->alloc((size_t)N * d * sizeof(float));
    m->dlnf = be->alloc((size_t)N * d * sizeof(float));
    m->host_loss = xmalloc((size_t)N * sizeof(float));
    m->host_targets = xmalloc((size_t)N * sizeof(int32_t));
    m->ln_f = params_find(&m->table, "transformer.ln_f.weight");
    m->wte = params_find(&m->table, "transformer.wte.weight");
    m->eot_token = -1;
    m->count_loads = 1;
    if (m->ep > 1) ep_init(m);
    if (c->doc_mask) {
        m->doc_start = be->alloc((size_t)N * sizeof(int32_t));
        m->doc_id = be->alloc((size_t)N * sizeof(int32_t));
        m->pos = be->alloc((size_t)N * sizeof(int32_t));
        m->host_doc = xmalloc(3 * (size_t)N * sizeof(int32_t));
    }
}

void model_set_eot(model *m, int32_t eot) { m->eot_token = eot; }

/* Document starts, ids and positions of a micro-batch (host), uploaded for the ops. */
static void upload_documents(model *m, const int32_t *inputs)
{
    int B = m->B, T = m->T;
    size_t N = (size_t)B * T;
    int32_t *start = m->host_doc, *id = m->host_doc + N, *pos = m->host_doc + 2 * N;
    for (int b = 0; b < B; b++) {
        int32_t doc = 0, p = 0;
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * T + t;
            int s = t == 0 || inputs[i - 1] == m->eot_token;
            if (s && t > 0) {
                doc++;
                p = 0;
            }
            start[i] = s;
            id[i] = doc;
            pos[i] = p++;
        }
    }
    m->be->from_host(m->doc_start, start, N * sizeof(int32_t));
    m->be->from_host(m->doc_id, id, N * sizeof(int32_t));
    m->be->from_host(m->pos, pos, N * sizeof(int32_t));
}

void model_free(model *m)
{
    const backend *be = m->be;
    if (m->ep_layers) ep_free(m);
    void *bufs[] = {m->act_base, m->scratch_base, m->params, m->grads, m->router_bias, m->counts, m->loads,
                    m->zloss, m->tokens, m->targets, m->resid, m->lnf, m->lnf_rstd, m->loss, m->lse,
                    m->dx, m->dlnf, m->doc_start, m->doc_id, m->pos};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->free(bufs[i]);
    free(m->host_doc);
    free(m->host_loss);
    free(m->host_targets);
    free(m->layers);
    params_free(&m->table);
    memset(m, 0, sizeof *m);
}

static float *resid_at(const model *m, int l)
{
    return m->resid + (size_t)l * m->B * m->T * m->cfg.n_embd;
}

static void block_forward(model *m, int l)
{
    if (m->layers[l].is_gdn) gdn_forward(m, l, resid_at(m, l), resid_at(m, l + 1));
    else mla_forward(m, l, resid_at(m, l), resid_at(m, l + 1));
}

/* the head's dloss_scale for model_backward's scale: scale over the valid targets of
 * the global micro-batch (loss_norm) or of this one */
static float head_dloss(const model *m, float scale, int valid)
{
    double n_valid = m->loss_norm > 0 ? m->loss_norm : (double)valid;
    return n_valid > 0 ? scale / (float)n_valid : 0.0f;
}

/* The ops of a forward or a backward, through graph_run (backend.h) when --cuda_graph is
 * on: their key is the model, the phase and every host value they pass to an op (the
 * head's loss scale, the z-loss scale); what varies from call to call in device memory
 * (tokens, targets, documents) is uploaded before. Not with expert parallelism (its
 * exchange talks to the other ranks) nor, in the backward, with a grads_ready hook. */
typedef struct ops_key {
    const model *m;
    int phase;        /* 0 forward, 1 backward */
    int head_fused;   /* the forward ran the head's backward */
    float dloss, zscale;
} ops_key;

static void run_ops(model *m, int phase, float dloss, int head_fused, int direct, void (*fn)(void *ctx))
{
    if (!m->cfg.cuda_graph || m->ep > 1 || direct) {
        fn(m);
        return;
    }
    ops_key k;
    memset(&k, 0, sizeof k); /* padding too: the key is compared bytewise */
    k.m = m;
    k.phase = phase;
    k.head_fused = head_fused;
    k.dloss = dloss;
    k.zscale = phase ? m->zscale : 0.0f; /* the backward's z-loss scale (moe_route_backward) */
    m->be->graph_run(&k, sizeof k, fn, m);
}

static void forward_ops(void *ctx)
{
    model *m = ctx;
    const backend *be = m->be;
    const config *c = &m->cfg;
    int N = m->B * m->T, d = c->n_embd, V = c->vocab_size;
    be->embedding_forward(resid_at(m, 0), m->tokens, model_param(m, m->wte), N, d);
    for (int l = 0; l < c->n_layer; l++) block_forward(m, l);
    be->rmsnorm_forward(m->lnf, m->lnf_rstd, resid_at(m, c->n_layer), model_param(m, m->ln_f), N, d);
    if (m->head_dloss >= 0) { /* the head's backward now, with the dloss model_backward will use */
        be->zero(m->dlnf, (size_t)N * d * sizeof(float));
        be->classifier_forward_backward(m->loss, m->lse, m->dlnf, model_grad(m, m->wte), m->lnf,
                                        model_param(m, m->wte), m->targets, m->head_dloss, N, V, d);
    } else {
        be->classifier_forward(m->loss, m->lse, m->lnf, model_param(m, m->wte), m->targets, N, V, d);
    }
}

double model_forward(model *m, const int32_t *inputs, const int32_t *targets, double *zloss)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    int N = m->B * m->T, V = c->vocab_size;
    for (int i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V)
            die("token %d at position %d is outside the vocabulary (vocab_size %d)", inputs[i], i, V);
        if (targets[i] != -100 && (targets[i] < 0 || targets[i] >= V))
            die("target %d at position %d is outside the vocabulary (vocab_size %d)", targets[i], i, V);
    }
    be->from_host(m->tokens, inputs, (size_t)N * sizeof(int32_t));
    be->from_host(m->targets, targets, (size_t)N * sizeof(int32_t));
    memcpy(m->host_targets, targets, (size_t)N * sizeof(int32_t));
    if (c->doc_mask) upload_documents(m, inputs);

    int valid = 0;
    for (int i = 0; i < N; i++) valid += targets[i] != -100;
    m->head_dloss = m->head_scale > 0 ? head_dloss(m, m->head_scale, valid) : -1.0f;
    run_ops(m, 0, m->head_dloss, m->head_dloss >= 0, 0, forward_ops);

    be->to_host(m->host_loss, m->loss, (size_t)N * sizeof(float));
    double sum = 0;
    for (int i = 0; i < N; i++)
        if (targets[i] != -100) sum += m->host_loss[i];
    m->last_valid = valid;
    m->last_loss_sum = sum;

    double z = 0;
    if (m->n_moe) {
        size_t E = (size_t)c->moe_E;
        float zl[m->n_moe];
        be->to_host(zl, m->zloss, (size_t)m->n_moe * sizeof(float));
        for (int i = 0; i < m->n_moe; i++) z += zl[i];
        if (m->count_loads) be->add_i32(m->loads, m->counts, m->n_moe * E);
    }
    if (zloss) *zloss = z;
    return valid ? sum / valid : 0.0;
}

/* the backward's ops; m->bwd_dloss: the head's loss scale when the forward did not run the
 * head's backward, else negative */
static void backward_ops(void *ctx)
{
    model *m = ctx;
    const backend *be = m->be;
    const config *c = &m->cfg;
    int N = m->B * m->T, d = c->n_embd, V = c->vocab_size;
    size_t Nd = (size_t)N * d;
    if (m->bwd_dloss >= 0) {
        be->zero(m->dlnf, Nd * sizeof(float));
        be->classifier_backward(m->dlnf, model_grad(m, m->wte), m->lnf, model_param(m, m->wte), m->targets,
                                m->lse, m->bwd_dloss, N, V, d);
    }
    be->zero(m->dx, Nd * sizeof(float));
    be->rmsnorm_backward(m->dx, model_grad(m, m->ln_f), m->dlnf, resid_at(m, c->n_layer),
                         model_param(m, m->ln_f), m->lnf_rstd, N, d);
    arena s = {m->scratch_base, 0, m->scratch_cap};
    for (int l = c->n_layer - 1; l >= 0; l--) {
        if (c->gradient_checkpointing) block_forward(m, l); /* refill the shared activations */
        if (m->layers[l].is_gdn) gdn_backward(m, l, resid_at(m, l), m->dx, &s);
        else mla_backward(m, l, resid_at(m, l), m->dx, &s);
        if (m->grads_ready) m->grads_ready(m->grads_ready_ctx, l);
    }
    be->embedding_backward(model_grad(m, m->wte), m->dx, m->tokens, N, d);
    if (m->grads_ready) m->grads_ready(m->grads_ready_ctx, -1);
}

void model_backward(model *m, float scale, float zscale)
{
    m->zscale = zscale;
    const float dloss = head_dloss(m, scale, m->last_valid);
    const int fused = m->head_dloss >= 0;
    if (fused && dloss != m->head_dloss) /* the forward ran the head's backward (head_scale) */
        die("model_backward: scale %g differs from the head_scale %g the forward ran the head's backward with",
            (double)scale, (double)m->head_scale);
    m->head_dloss = -1.0f;
    m->bwd_dloss = fused ? -1.0f : dloss;
    run_ops(m, 1, m->bwd_dloss, fused, m->grads_ready != NULL, backward_ops);
}

void model_zero_grad(model *m) { m->be->zero(m->grads, m->table.total * sizeof(float)); }

int32_t *model_loads(model *m) { return m->loads; }

void model_reset_loads(model *m)
{
    size_t n = (size_t)m->n_moe * (size_t)(m->cfg.use_moe ? m->cfg.moe_E : 0);
    m->be->zero(m->loads, n * sizeof(int32_t));
}
