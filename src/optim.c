/* optim.c: see optim.h. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>

#include "util.h"

#define ADAMW_BETA1 0.9f
#define ADAMW_BETA2 0.95f
#define ADAMW_EPS 1e-8f
#define MUON_MOMENTUM 0.95f
#define MUON_LR_SCALE 200.0

void optim_init(optimizer *o, const model *m)
{
    o->be = m->be;
    o->muon_mode = m->cfg.optimizer_type[0] == 'm';
    o->m = m->be->alloc(m->table.total * sizeof(float));
    o->v = m->be->alloc(m->table.total * sizeof(float));
    size_t work = 1;
    for (int i = 0; i < m->table.count; i++) {
        const param_info *p = &m->table.items[i];
        if (o->muon_mode && params_is_muon(p)) {
            size_t w = muon_work_floats((int)p->shape[0], (int)p->shape[1]);
            if (w > work) work = w;
        }
    }
    o->work = m->be->alloc(work * sizeof(float));
    o->step = 0;
}

void optim_free(optimizer *o)
{
    o->be->free(o->m);
    o->be->free(o->v);
    o->be->free(o->work);
}

double optim_lr(const config *c, int it)
{
    double lr = c->learning_rate, min_lr = c->min_lr;
    if (it < c->warmup_iters) return lr * it / c->warmup_iters;
    double decay_start = 0.8 * c->max_iters;
    if (it < decay_start) return lr;
    if (it >= c->max_iters) return min_lr;
    double ratio = (it - decay_start) / (c->max_iters - decay_start);
    return min_lr + 0.5 * (1.0 + cos(3.14159265358979323846 * ratio)) * (lr - min_lr);
}

double optim_grad_norm(const model *m)
{
    /* the gradients are one contiguous buffer: one reduction, one host round trip */
    return sqrt(m->be->sumsq(m->grads, m->table.total));
}

void optim_clip(model *m, double norm)
{
    if (m->cfg.grad_clip <= 0) return;
    double coef = m->cfg.grad_clip / (norm + 1e-6);
    if (coef >= 1.0) return; /* torch multiplies by the clamped 1.0: the same values */
    m->be->scale_inplace(m->grads, (float)coef, m->table.total);
}

void optim_step(optimizer *o, model *m, double lr)
{
    const config *c = &m->cfg;
    o->step++;
    for (int i = 0; i < m->table.count; i++) {
        const param_info *p = &m->table.items[i];
        float *w = model_param(m, i), *g = model_grad(m, i);
        float *mm = o->m + p->offset, *vv = o->v + p->offset;
        if (o->muon_mode && params_is_muon(p)) {
            o->be->muon_update(w, g, mm, o->work, (int)p->shape[0], (int)p->shape[1],
                               (float)(MUON_LR_SCALE * lr), MUON_MOMENTUM, c->weight_decay);
        } else {
            float wd = (o->muon_mode || params_adamw_decays(p)) ? c->weight_decay : 0.0f;
            o->be->adamw_update(w, g, mm, vv, p->numel, (float)lr, ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS,
                                wd, o->step);
        }
    }
}

void optim_router_bias_update(model *m, const int64_t *loads, int64_t tokens)
{
    const config *c = &m->cfg;
    if (!m->n_moe) return;
    size_t E = (size_t)c->moe_E, n = (size_t)m->n_moe * E;
    float *b = xmalloc(n * sizeof(float));
    m->be->to_host(b, m->router_bias, n * sizeof(float));
    /* compare load * E with tokens * k exactly in integers: no rounding of "expected" */
    for (size_t i = 0; i < n; i++) {
        int64_t lhs = loads[i] * (int64_t)E, rhs = tokens * (int64_t)c->moe_k;
        float sign = lhs > rhs ? 1.0f : (lhs < rhs ? -1.0f : 0.0f);
        b[i] -= c->router_bias_update_rate * sign;
    }
    m->be->from_host(m->router_bias, b, n * sizeof(float));
    free(b);
}
