/* optim.c: see optim.h. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"
#include "util.h"

#define ADAMW_BETA1 0.9f
#define ADAMW_BETA2 0.95f
#define ADAMW_EPS 1e-8f
#define MUON_MOMENTUM 0.95f
#define MUON_LR_SCALE 200.0
/* the most Muon scratch one batch may take, in floats (1 GiB): the eight 8192x1024 or
 * fifteen 1024x4096 matrices of moe-1b in one batch, so that the 1024x1024 Gram products
 * fill the GPU (batches of three left it a third idle); MUON_BATCH_MAX of the small ones */
#define MUON_BATCH_WORK_CAP ((size_t)1 << 28)

/* Work of one tensor's update, for balancing ZeRO shards: AdamW is a pass over the
 * tensor; Muon's Newton-Schulz iterations cost about min(rows, cols) times more. */
static double update_cost(const optimizer *o, const param_info *p)
{
    if (o->muon_mode && params_is_muon(p)) {
        double r = (double)p->shape[0], c = (double)p->shape[1];
        return (double)p->numel * (1.0 + 0.25 * (r < c ? r : c));
    }
    return (double)p->numel;
}

/* Split region `region` (0 dense, 1 experts) of the table into n contiguous runs of whole
 * tensors of about equal update cost: member r gets [off[r], off[r] + cnt[r]). */
static void partition(const optimizer *o, const param_table *t, int region, int n, size_t *off, size_t *cnt)
{
    size_t lo = region ? t->dense_total : 0, hi = region ? t->total : t->dense_total;
    int count = 0;
    double total = 0;
    for (int i = 0; i < t->count; i++) {
        if ((t->items[i].kind == PARAM_EXPERTS) != region) continue;
        count++;
        total += update_cost(o, &t->items[i]);
    }
    /* tensors in offset order: the region's layout is table order */
    const param_info **in_order = xmalloc((size_t)(count + 1) * sizeof *in_order);
    int c = 0;
    for (int i = 0; i < t->count; i++)
        if ((t->items[i].kind == PARAM_EXPERTS) == region) in_order[c++] = &t->items[i];
    double acc = 0;
    int r = 0;
    size_t start = lo;
    for (int i = 0; i < count; i++) {
        acc += update_cost(o, in_order[i]);
        size_t end = in_order[i]->offset + in_order[i]->numel;
        /* member r's run ends once it has its share; a big tensor may leave the next
         * members empty runs */
        while (r < n - 1 && acc >= total * (r + 1) / n) {
            off[r] = start;
            cnt[r] = end - start;
            start = end;
            r++;
        }
    }
    for (; r < n; r++) {
        off[r] = start;
        cnt[r] = hi - start;
        start = hi;
    }
    free(in_order);
}

/* matrices of rows x cols per muon_update_batch call: as many as MUON_BATCH_WORK_CAP
 * allows, 1 to MUON_BATCH_MAX */
static int muon_batch_cap(int rows, int cols)
{
    size_t cap = MUON_BATCH_WORK_CAP / muon_batch_work_floats(1, rows, cols);
    return cap < 1 ? 1 : cap > MUON_BATCH_MAX ? MUON_BATCH_MAX : (int)cap;
}

/* Group the Muon matrices this rank holds by shape (in table order within a shape) and
 * split each group into as few batches as the cap allows, of near-equal size. */
static void plan_muon_batches(optimizer *o, const param_table *t)
{
    int n = 0;
    int *held = xmalloc((size_t)(t->count + 1) * sizeof *held);
    for (int i = 0; i < t->count; i++) {
        const param_info *p = &t->items[i];
        if (o->muon_mode && params_is_muon(p) && optim_state(o, o->m, p->offset)) held[n++] = i;
    }
    o->muon_items = xmalloc((size_t)(n + 1) * sizeof *o->muon_items);
    o->muon_batches = xmalloc((size_t)(n + 1) * sizeof *o->muon_batches);
    char *taken = xcalloc((size_t)n + 1, 1);
    int k = 0, nb = 0;
    for (int a = 0; a < n; a++) {
        if (taken[a]) continue;
        const int rows = (int)t->items[held[a]].shape[0], cols = (int)t->items[held[a]].shape[1];
        const int start = k;
        for (int b = a; b < n; b++) {
            const param_info *p = &t->items[held[b]];
            if (taken[b] || p->shape[0] != rows || p->shape[1] != cols) continue;
            taken[b] = 1;
            o->muon_items[k++] = held[b];
        }
        const int size = k - start, cap = muon_batch_cap(rows, cols), batches = (size + cap - 1) / cap;
        for (int j = 0, at = start; j < batches; j++) {
            const int count = size * (j + 1) / batches - size * j / batches;
            o->muon_batches[nb++] = (optim_muon_batch){.rows = rows, .cols = cols, .count = count, .first = at};
            at += count;
        }
    }
    o->n_muon_batches = nb;
    free(taken);
    free(held);
}

/* estimated microseconds of a Muon batch on an H100: launches and small-GEMM latency, the
 * Newton-Schulz FLOPs at 300 TFLOP/s and eight passes over the matrices at 2.5 TB/s */
static double muon_cost(const optim_muon_batch *b)
{
    const double m = b->rows < b->cols ? b->rows : b->cols, n = b->rows < b->cols ? b->cols : b->rows;
    const double flops = b->count * 5.0 * (4.0 * m * m * n + 2.0 * m * m * m);
    return 150.0 + flops / 3e8 + b->count * m * n * 32.0 / 2.5e6;
}

/* estimated microseconds of an AdamW run of n floats: 28 bytes a float at 2.5 TB/s */
static double adamw_cost(size_t n) { return 5.0 + (double)n * 28.0 / 2.5e6; }

static void add_unit(optimizer *o, optim_unit u) { o->units[o->n_units++] = u; }

/* longest first; ties: Muon batches in batch order, then AdamW runs in buffer order */
static int unit_order(const void *pa, const void *pb)
{
    const optim_unit *a = pa, *b = pb;
    if (a->cost != b->cost) return a->cost > b->cost ? -1 : 1;
    if (a->muon != b->muon) return a->muon ? -1 : 1;
    if (a->muon) return a->batch < b->batch ? -1 : a->batch > b->batch;
    return a->lo < b->lo ? -1 : a->lo > b->lo;
}

/* The units of the update and their lanes (optim_init_lanes), and each lane's share of
 * the Muon scratch; returns the scratch floats in all. AdamW runs are runs of held
 * tensors adjacent in one region (0 dense, 1 experts: the table interleaves them) with
 * one weight decay, a run ending at a gap (a Muon matrix, another rank's tensor); the
 * alignment gaps between tensors (params.h) run with them, zeros that stay zero. */
static size_t plan_units(optimizer *o, const model *m, int lanes)
{
    const param_table *t = &m->table;
    const config *c = &m->cfg;
    /* at most one run per tensor, plus the batches */
    o->units = xmalloc((size_t)(o->n_muon_batches + t->count + 1) * sizeof *o->units);
    for (int b = 0; b < o->n_muon_batches; b++)
        add_unit(o, (optim_unit){.muon = 1, .batch = b, .cost = muon_cost(&o->muon_batches[b])});
    for (int region = 0; region < 2; region++) {
        size_t lo = 0, hi = 0;
        float run_wd = 0;
        for (int i = 0; i <= t->count; i++) {
            const param_info *p = i < t->count ? &t->items[i] : NULL;
            if (p && ((p->kind == PARAM_EXPERTS) != region || (o->muon_mode && params_is_muon(p)))) continue;
            if (p && !optim_state(o, o->m, p->offset)) continue; /* another rank's shard */
            float wd = p && (o->muon_mode || params_adamw_decays(p)) ? c->weight_decay : 0.0f;
            if (p && hi > lo && p->offset == params_align_up(hi) && wd == run_wd) { /* across the zero gap */
                hi = p->offset + p->numel;
                continue;
            }
            if (hi > lo)
                add_unit(o, (optim_unit){.lo = lo, .hi = hi, .wd = run_wd, .cost = adamw_cost(hi - lo)});
            if (p) lo = p->offset, hi = p->offset + p->numel, run_wd = wd;
        }
    }
    qsort(o->units, (size_t)o->n_units, sizeof *o->units, unit_order);
    double load[BACKEND_LANES] = {0};
    size_t lane_work[BACKEND_LANES] = {0};
    for (int u = 0; u < o->n_units; u++) {
        optim_unit *x = &o->units[u];
        size_t w = 0;
        if (x->muon) {
            const optim_muon_batch *mb = &o->muon_batches[x->batch];
            w = muon_batch_work_floats(mb->count, mb->rows, mb->cols);
        }
        int lane = 0;
        if (w <= OPTIM_LANE0_WORK)
            for (int l = 1; l < lanes; l++)
                if (load[l] < load[lane]) lane = l;
        x->lane = lane;
        load[lane] += x->cost;
        if (w > lane_work[lane]) lane_work[lane] = w;
    }
    size_t at[BACKEND_LANES], total = 0;
    for (int l = 0; l < lanes; l++) at[l] = total, total += lane_work[l];
    for (int u = 0; u < o->n_units; u++) o->units[u].work_at = at[o->units[u].lane];
    return total;
}

void optim_init(optimizer *o, const model *m) { optim_init_lanes(o, m, OPTIM_LANES); }

void optim_init_lanes(optimizer *o, const model *m, int lanes)
{
    fatal_check(lanes >= 1 && lanes <= BACKEND_LANES);
    memset(o, 0, sizeof *o);
    o->lanes = lanes;
    o->be = m->be;
    o->dist = m->dist;
    o->muon_mode = m->cfg.optimizer_type[0] == 'm';
    const param_table *t = &m->table;
    o->held[0][0] = 0;
    o->held[0][1] = t->dense_total;
    o->held[1][0] = t->dense_total;
    o->held[1][1] = t->total;
    const dist *d = m->dist;
    if (d && m->cfg.zero && d->world > 1) {
        o->zero = 1;
        int groups[2] = {DIST_WORLD, DIST_EDP};
        for (int region = 0; region < 2; region++) {
            int n = d->size[groups[region]], me = d->pos[groups[region]];
            o->seg_off[region] = xcalloc((size_t)n, sizeof(size_t));
            o->seg_cnt[region] = xcalloc((size_t)n, sizeof(size_t));
            partition(o, t, region, n, o->seg_off[region], o->seg_cnt[region]);
            o->held[region][0] = o->seg_off[region][me];
            o->held[region][1] = o->seg_off[region][me] + o->seg_cnt[region][me];
        }
    }
    size_t n = optim_state_floats(o);
    o->m = m->be->alloc((n + 1) * sizeof(float));
    o->v = m->be->alloc((n + 1) * sizeof(float));
    plan_muon_batches(o, t);
    size_t work = plan_units(o, m, lanes);
    o->work = m->be->alloc((work + 1) * sizeof(float));
    o->step = 0;
}

void optim_free(optimizer *o)
{
    o->be->free(o->m);
    o->be->free(o->v);
    o->be->free(o->work);
    for (int r = 0; r < 2; r++) {
        free(o->seg_off[r]);
        free(o->seg_cnt[r]);
    }
    free(o->muon_batches);
    free(o->muon_items);
    free(o->units);
}

size_t optim_state_floats(const optimizer *o)
{
    return (o->held[0][1] - o->held[0][0]) + (o->held[1][1] - o->held[1][0]);
}

float *optim_state(const optimizer *o, float *base, size_t offset)
{
    if (offset >= o->held[0][0] && offset < o->held[0][1]) return base + (offset - o->held[0][0]);
    if (offset >= o->held[1][0] && offset < o->held[1][1])
        return base + (o->held[0][1] - o->held[0][0]) + (offset - o->held[1][0]);
    return NULL;
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
    if (!m->dist || m->ep == 1) return sqrt(m->be->sumsq(m->grads, m->table.total));
    /* every rank has the reduced dense gradients; the experts are split over the group */
    const param_table *t = &m->table;
    double ex = m->be->sumsq(m->grads + t->dense_total, t->total - t->dense_total);
    dist_allreduce_host_f64(m->dist, DIST_EP, &ex, 1);
    return sqrt(m->be->sumsq(m->grads, t->dense_total) + ex);
}

void optim_clip(model *m, double norm)
{
    double coef = m->cfg.grad_clip > 0 ? m->cfg.grad_clip / (norm + 1e-6) : 1.0;
    if (coef >= 1.0) coef = 1.0; /* torch multiplies by the clamped 1.0: the same values */
    /* the update reads each gradient times coef (backend.h: grad_scale), the bits of
     * scaling the gradients first without the pass over them */
    m->be->grad_scale((float)coef);
}

/* one unit of the update on the backend's current lane */
static void optim_unit_run(optimizer *o, model *m, const optim_unit *x, double lr)
{
    const backend *be = o->be;
    if (!x->muon) {
        be->adamw_update(m->params + x->lo, m->grads + x->lo, optim_state(o, o->m, x->lo), optim_state(o, o->v, x->lo),
                         x->hi - x->lo, (float)lr, ADAMW_BETA1, ADAMW_BETA2, ADAMW_EPS, x->wd, o->step);
        return;
    }
    const optim_muon_batch *mb = &o->muon_batches[x->batch];
    float *w[MUON_BATCH_MAX], *buf[MUON_BATCH_MAX];
    const float *g[MUON_BATCH_MAX];
    for (int j = 0; j < mb->count; j++) {
        const int i = o->muon_items[mb->first + j];
        w[j] = model_param(m, i);
        g[j] = model_grad(m, i);
        buf[j] = optim_state(o, o->m, m->table.items[i].offset);
    }
    be->muon_update_batch(w, g, buf, o->work + x->work_at, mb->count, mb->rows, mb->cols, (float)(MUON_LR_SCALE * lr),
                          MUON_MOMENTUM, m->cfg.weight_decay);
}

void optim_step(optimizer *o, model *m, double lr)
{
    const backend *be = o->be;
    o->step++;
    if (o->lanes > 1) be->lanes_fork(o->lanes);
    for (int u = 0; u < o->n_units; u++) {
        if (o->lanes > 1) be->lane(o->units[u].lane);
        optim_unit_run(o, m, &o->units[u], lr);
    }
    if (o->lanes > 1) be->lanes_join();
    if (o->zero) {
        dist_allgather_segments(o->dist, DIST_WORLD, m->params, o->seg_off[0], o->seg_cnt[0]);
        dist_allgather_segments(o->dist, DIST_EDP, m->params, o->seg_off[1], o->seg_cnt[1]);
    }
}

void optim_router_bias_update(model *m, const int32_t *loads, int64_t tokens)
{
    const config *c = &m->cfg;
    if (!m->n_moe) return;
    m->be->router_bias_update(m->router_bias, loads, m->n_moe, c->moe_E, tokens, c->moe_k,
                              c->router_bias_update_rate);
}
