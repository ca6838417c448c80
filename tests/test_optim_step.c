/* test_optim_step.c: optim_step (src/optim.c) on the CPU backend against one backend call
 * per tensor, the plain loop over the table that it replaces.
 *
 * optim_step hands the Muon matrices to muon_update_batch in batches of one shape and
 * the AdamW tensors to adamw_update in runs of tensors adjacent in the buffer. On the CPU
 * both are exact regroupings (the batch is a loop over muon_update, AdamW is
 * elementwise), so after three steps with new gradients the parameters and both state
 * buffers must equal the per-tensor loop's bit for bit, in muon and in adamw mode. The
 * batch plan itself is checked too: every held Muon matrix in exactly one batch, each
 * batch of one shape and at most MUON_BATCH_MAX matrices, and so is the lane plan
 * (check_lanes), on one lane and on OPTIM_LANES, and so is the buffer's layout
 * (check_layout). And the clipping's grad_scale against scaling the gradients first
 * (check_grad_scale).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "optim.h"
#include "rng.h"
#include "util.h"

#include "check.h"
#include "test_flags.h"

/* need floats of Muon scratch from at for unit x (0 for AdamW) */
static size_t unit_work(const optimizer *o, const optim_unit *x)
{
    if (!x->muon) return 0;
    const optim_muon_batch *mb = &o->muon_batches[x->batch];
    return muon_batch_work_floats(mb->count, mb->rows, mb->cols);
}

/* the lane plan: every unit on an open lane, the big Muon batches on lane 0, units of
 * different lanes on disjoint scratch, and each held tensor in exactly one unit */
static void check_lanes(const char *name, const optimizer *o, const model *m, int lanes)
{
    const param_table *t = &m->table;
    int ok = o->lanes == lanes;
    for (int u = 0; u < o->n_units; u++) {
        const optim_unit *x = &o->units[u];
        ok &= x->lane >= 0 && x->lane < lanes;
        ok &= unit_work(o, x) <= OPTIM_LANE0_WORK || x->lane == 0;
        for (int v = 0; v < o->n_units; v++) {
            const optim_unit *y = &o->units[v];
            if (x->lane == y->lane || !unit_work(o, x) || !unit_work(o, y)) continue;
            ok &= x->work_at + unit_work(o, x) <= y->work_at || y->work_at + unit_work(o, y) <= x->work_at;
        }
    }
    int *covered = xcalloc((size_t)t->count, sizeof *covered);
    for (int u = 0; u < o->n_units; u++) {
        const optim_unit *x = &o->units[u];
        if (x->muon) {
            const optim_muon_batch *mb = &o->muon_batches[x->batch];
            for (int j = 0; j < mb->count; j++) covered[o->muon_items[mb->first + j]]++;
        } else {
            for (int i = 0; i < t->count; i++)
                if (t->items[i].offset >= x->lo && t->items[i].offset + t->items[i].numel <= x->hi &&
                    !(o->muon_mode && params_is_muon(&t->items[i])))
                    covered[i]++;
        }
    }
    for (int i = 0; i < t->count; i++) ok &= covered[i] == 1;
    check(ok, "%s: %d units on %d lanes: big Muon batches on lane 0, disjoint scratch, each tensor once", name,
          o->n_units, lanes);
    free(covered);
}

/* the flat buffer's layout (params.h): every tensor at a multiple of PARAM_ALIGN floats,
 * none overlapping the next, and zeros in the gaps of the initialised weights */
static void check_layout(const char *name, const model *m)
{
    const param_table *t = &m->table;
    char *in_tensor = xcalloc(t->total, 1);
    int ok = 1;
    for (int i = 0; i < t->count; i++) {
        const param_info *p = &t->items[i];
        ok &= p->offset % PARAM_ALIGN == 0 && p->offset + p->numel <= t->total;
        for (size_t e = p->offset; e < p->offset + p->numel && e < t->total; e++) ok &= !in_tensor[e]++;
    }
    for (size_t e = 0; e < t->total; e++) ok &= in_tensor[e] || m->params[e] == 0.0f;
    check(ok, "%s: %d tensors %d-float aligned, disjoint, zeros between them", name, t->count, PARAM_ALIGN);
    free(in_tensor);
}

static void run_case(const char *name, const char *flags, int lanes)
{
    config c;
    parse_flags(&c, flags);
    const backend *be = backend_cpu();
    model m;
    model_init(&m, &c, be, 1, 8);
    const param_table *t = &m.table;
    const size_t total = t->total;
    check_layout(name, &m);
    optimizer o;
    optim_init_lanes(&o, &m, lanes);
    check_lanes(name, &o, &m, lanes);

    /* the plan: each Muon matrix once, batches of one shape within MUON_BATCH_MAX */
    int *seen = xcalloc((size_t)t->count, sizeof *seen), plan_ok = 1, n_muon = 0;
    for (int b = 0; b < o.n_muon_batches; b++) {
        const optim_muon_batch *mb = &o.muon_batches[b];
        plan_ok &= mb->count >= 1 && mb->count <= MUON_BATCH_MAX;
        for (int j = 0; j < mb->count; j++) {
            const param_info *p = &t->items[o.muon_items[mb->first + j]];
            plan_ok &= p->shape[0] == mb->rows && p->shape[1] == mb->cols;
            seen[o.muon_items[mb->first + j]]++;
        }
    }
    for (int i = 0; i < t->count; i++) {
        int want = o.muon_mode && params_is_muon(&t->items[i]);
        n_muon += want;
        plan_ok &= seen[i] == want;
    }
    check(plan_ok, "%s: %d Muon matrices in %d batches of one shape, each once", name, n_muon, o.n_muon_batches);

    /* the reference: a copy of the weights and its own state, one call per tensor */
    float *ref_p = xmalloc(total * sizeof(float)), *ref_m = xcalloc(total, sizeof(float));
    float *ref_v = xcalloc(total, sizeof(float)), *ref_work = NULL;
    size_t work = 1;
    for (int i = 0; i < t->count; i++)
        if (params_is_muon(&t->items[i])) {
            size_t w = muon_work_floats((int)t->items[i].shape[0], (int)t->items[i].shape[1]);
            if (w > work) work = w;
        }
    ref_work = xmalloc(work * sizeof(float));
    memcpy(ref_p, m.params, total * sizeof(float));
    const double lr = 3e-3;
    for (int step = 1; step <= 3; step++) {
        /* gradients in the tensors; the alignment gaps between them hold zeros (params.h),
         * and the comparisons below include the gaps: they must stay zero */
        for (int i = 0; i < t->count; i++)
            for (size_t e = t->items[i].offset; e < t->items[i].offset + t->items[i].numel; e++)
                m.grads[e] = (float)(rng_uniform(100 + step, e) - 0.5);
        optim_step(&o, &m, lr);
        for (int i = 0; i < t->count; i++) {
            const param_info *p = &t->items[i];
            float *w = ref_p + p->offset, *g = m.grads + p->offset;
            if (o.muon_mode && params_is_muon(p)) {
                be->muon_update(w, g, ref_m + p->offset, ref_work, (int)p->shape[0], (int)p->shape[1],
                                (float)(200.0 * lr), 0.95f, c.weight_decay);
            } else {
                float wd = (o.muon_mode || params_adamw_decays(p)) ? c.weight_decay : 0.0f;
                be->adamw_update(w, g, ref_m + p->offset, ref_v + p->offset, p->numel, (float)lr, 0.9f, 0.95f,
                                 1e-8f, wd, step);
            }
        }
    }
    check(optim_state_floats(&o) == total, "%s: one process holds the state of all %zu floats", name, total);
    check(!memcmp(m.params, ref_p, total * sizeof(float)), "%s: 3 steps: parameters bitwise as per-tensor calls",
          name);
    check(!memcmp(o.m, ref_m, total * sizeof(float)) && !memcmp(o.v, ref_v, total * sizeof(float)),
          "%s: 3 steps: optimizer state bitwise as per-tensor calls", name);

    free(seen), free(ref_p), free(ref_m), free(ref_v), free(ref_work);
    optim_free(&o);
    model_free(&m);
}

/* grad_scale (backend.h; optim_clip sets it) against scaling the gradients first with
 * scale_inplace: two steps of optim_step, new gradients and a new scale each, the same
 * parameters and optimizer state bit for bit */
static void check_grad_scale(const char *name, const char *flags)
{
    config c;
    parse_flags(&c, flags);
    const backend *be = backend_cpu();
    model a, b;
    model_init(&a, &c, be, 1, 8);
    model_init(&b, &c, be, 1, 8);
    optimizer oa, ob;
    optim_init(&oa, &a);
    optim_init(&ob, &b);
    const param_table *t = &a.table;
    static const float scales[2] = {0.375f, 0.8f};
    for (int step = 1; step <= 2; step++) {
        for (int i = 0; i < t->count; i++)
            for (size_t e = t->items[i].offset; e < t->items[i].offset + t->items[i].numel; e++)
                a.grads[e] = b.grads[e] = (float)(rng_uniform(300 + step, e) - 0.5);
        be->grad_scale(scales[step - 1]);
        optim_step(&oa, &a, 3e-3);
        be->grad_scale(1.0f);
        be->scale_inplace(b.grads, scales[step - 1], t->total);
        optim_step(&ob, &b, 3e-3);
    }
    const size_t st = optim_state_floats(&oa) * sizeof(float);
    check(!memcmp(a.params, b.params, t->total * sizeof(float)) && !memcmp(oa.m, ob.m, st) &&
              !memcmp(oa.v, ob.v, st),
          "%s: grad_scale over 2 steps: parameters and state bitwise as on gradients scaled first", name);
    optim_free(&oa), optim_free(&ob);
    model_free(&a), model_free(&b);
}

int main(void)
{
    const char *base = "--size tiny --n_layer 3 --n_embd 48 --n_head 5 --block_size 8";
    char flags[512];
    for (int lanes = 1; lanes <= OPTIM_LANES; lanes += OPTIM_LANES - 1) {
        run_case("muon, tiny LatentMoE", base, lanes);
        snprintf(flags, sizeof flags, "%s --optimizer_type adamw", base);
        run_case("adamw, tiny LatentMoE", flags, lanes);
        snprintf(flags, sizeof flags, "%s --no_use_latent_moe --n_experts 6 --n_activated 2 --n_shared_experts 2",
                 base);
        run_case("muon, standard MoE with 2 shared experts", flags, lanes);
    }
    check_grad_scale("muon", base);
    snprintf(flags, sizeof flags, "%s --optimizer_type adamw", base);
    check_grad_scale("adamw", flags);
    return failures != 0;
}
