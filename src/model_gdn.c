/* model_gdn.c: the Gated DeltaNet block (MODEL.md section 3) as a call list of backend
 * ops, forward and backward.
 *
 *   x -> RMSNorm1 -> u
 *   u -> q/k/v projections (direct or down/up latent; q and k may share one)
 *     -> three short convs -> k L2-normalised per head -> gated delta rule (q scaled)
 *     -> output projection (direct or down/up) ; gates g = logsigmoid(u Wg), beta = sigmoid(u Wb)
 *   x_mid = x + that ; out = x_mid + MLP(RMSNorm2(x_mid)), MLP = down(a * silu(b)).
 */
#include <math.h>
#include <string.h>

#include "model_internal.h"

#define PW(i) model_param(m, (i))
#define GW(i) model_grad(m, (i))

void gdn_plan(model *m, int l, arena *a)
{
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    gdn_index *gi = &L->gi;
    gdn_acts *A = &L->ga;
    int N = m->B * m->T, d = c->n_embd, P = c->gdn_proj_dim, H = c->n_head, r = c->deltanet_latent_dim;
    int shared = c->deltanet_share_qk;
    static const char *qkv[3] = {"q", "k", "v"};
    char name[64];

    gi->norm1 = model_index(m, l, "norm1.weight", 1);
    gi->norm2 = model_index(m, l, "norm2.weight", 1);
    for (int i = 0; i < 3; i++) {
        const char *nm = (shared && i == 0) ? "qk" : qkv[i];
        int present = !(shared && i == 1);
        gi->proj[i] = gi->down[i] = gi->up[i] = -1;
        if (present && r == 0) {
            snprintf(name, sizeof name, "attn.%s_proj.weight", nm);
            gi->proj[i] = model_index(m, l, name, 1);
        } else if (present) {
            snprintf(name, sizeof name, "attn.%s_down.weight", nm);
            gi->down[i] = model_index(m, l, name, 1);
            snprintf(name, sizeof name, "attn.%s_up.weight", nm);
            gi->up[i] = model_index(m, l, name, 1);
        }
        snprintf(name, sizeof name, "attn.%s_conv.conv.weight", qkv[i]);
        gi->conv_w[i] = model_index(m, l, name, 1);
        snprintf(name, sizeof name, "attn.%s_conv.conv.bias", qkv[i]);
        gi->conv_b[i] = model_index(m, l, name, 1);
    }
    gi->o_proj = model_index(m, l, "attn.o_proj.weight", r == 0);
    gi->o_down = model_index(m, l, "attn.o_down.weight", r != 0);
    gi->o_up = model_index(m, l, "attn.o_up.weight", r != 0);
    gi->g_proj = model_index(m, l, "attn.g_proj.weight", 1);
    gi->beta_proj = model_index(m, l, "attn.beta_proj.weight", 1);
    gi->mlp_gate_up = model_index(m, l, "mlp.gate_up_proj.weight", 1);
    gi->mlp_down = model_index(m, l, "mlp.down_proj.weight", 1);

    A->ln1 = ARENA_F(a, (size_t)N * d);
    A->rstd1 = ARENA_F(a, N);
    for (int i = 0; i < 3; i++) {
        int present = !(shared && i == 1);
        A->lat[i] = (present && r) ? ARENA_F(a, (size_t)N * r) : NULL;
        A->pre[i] = present ? ARENA_F(a, (size_t)N * P) : NULL;
        A->conv[i] = ARENA_F(a, (size_t)N * P);
    }
    if (shared) { /* k's projection is q's: the k conv reads the same buffer */
        A->lat[1] = A->lat[0];
        A->pre[1] = A->pre[0];
    }
    A->kn = ARENA_F(a, (size_t)N * P);
    A->rnorm = ARENA_F(a, (size_t)N * H);
    A->graw = ARENA_F(a, (size_t)N * H);
    A->braw = ARENA_F(a, (size_t)N * H);
    A->g = ARENA_F(a, (size_t)N * H);
    A->beta = ARENA_F(a, (size_t)N * H);
    A->state = ARENA_F(a, gdn_state_floats(m->B, m->T, H, c->head_dim));
    A->o = ARENA_F(a, (size_t)N * P);
    A->olat = r ? ARENA_F(a, (size_t)N * r) : NULL;
    A->xmid = ARENA_F(a, (size_t)N * d);
    A->ln2 = ARENA_F(a, (size_t)N * d);
    A->rstd2 = ARENA_F(a, N);
    A->gu = ARENA_F(a, (size_t)N * 8 * d);
    A->act = ARENA_F(a, (size_t)N * 4 * d);
}

/* The Linear layers that read ln1, as parts of matmul_forward_multi and
 * matmul_backward_multi (weights, their gradients and the forward's outputs; the backward
 * fills in each dy): the gate projections g and beta first, then per projection i = 0
 * (q, or the shared q/k), 1 (k, absent when shared), 2 (v) the projection itself, or
 * with a latent its down projection. Returns the count. */
static int gdn_ln1_parts(model *m, int l, matmul_part *part)
{
    const config *c = &m->cfg;
    const gdn_index *gi = &m->layers[l].gi;
    const gdn_acts *A = &m->layers[l].ga;
    const int r = c->deltanet_latent_dim, g = m->grads != NULL; /* no gradients (inference): dw NULL */
    int n = 0;
    part[n++] = (matmul_part){PW(gi->g_proj), c->n_head, A->graw, NULL, g ? GW(gi->g_proj) : NULL};
    part[n++] = (matmul_part){PW(gi->beta_proj), c->n_head, A->braw, NULL, g ? GW(gi->beta_proj) : NULL};
    for (int i = 0; i < 3; i++) {
        if (c->deltanet_share_qk && i == 1) continue;
        if (r == 0)
            part[n++] = (matmul_part){PW(gi->proj[i]), c->gdn_proj_dim, A->pre[i], NULL, g ? GW(gi->proj[i]) : NULL};
        else
            part[n++] = (matmul_part){PW(gi->down[i]), r, A->lat[i], NULL, g ? GW(gi->down[i]) : NULL};
    }
    return n;
}

void gdn_forward(model *m, int l, const float *x, float *out)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    const gdn_index *gi = &L->gi;
    const gdn_acts *A = &L->ga;
    int B = m->B, T = m->T, N = B * T, d = c->n_embd, P = c->gdn_proj_dim, H = c->n_head;
    int hk = c->head_dim, r = c->deltanet_latent_dim;

    be->rmsnorm_forward(A->ln1, A->rstd1, x, PW(gi->norm1), N, d);
    /* every projection of ln1 in one op: the q/k, v projections (or their latent down
     * projections) and the two gate projections */
    matmul_part part[MATMUL_PARTS_MAX];
    const int np = gdn_ln1_parts(m, l, part);
    be->matmul_forward_multi(part, np, A->ln1, N, d);
    for (int i = 0; i < 3; i++) {
        if (c->deltanet_share_qk && i == 1) continue;
        if (r > 0) be->matmul_forward(A->pre[i], A->lat[i], PW(gi->up[i]), N, r, P);
    }
    for (int i = 0; i < 3; i++)
        be->conv_forward(A->conv[i], A->pre[i], PW(gi->conv_w[i]), PW(gi->conv_b[i]), m->doc_start, B, T, P);
    be->l2norm_forward(A->kn, A->rnorm, A->conv[1], N * H, hk);
    be->gates_forward(A->g, A->beta, A->graw, A->braw, (size_t)N * H);
    be->gdn_forward(A->o, A->state, A->conv[0], A->kn, A->conv[2], A->g, A->beta, m->doc_start, B, T, H, hk,
                    1.0f / sqrtf((float)hk));
    /* xmid = x + the mixer's output: the residual is added by the last projection's GEMM
     * (matmul_forward_add), not by a pass of its own */
    if (r == 0) {
        be->matmul_forward_add(A->xmid, A->o, PW(gi->o_proj), x, N, P, d);
    } else {
        be->matmul_forward(A->olat, A->o, PW(gi->o_down), N, P, r);
        be->matmul_forward_add(A->xmid, A->olat, PW(gi->o_up), x, N, r, d);
    }

    be->rmsnorm_forward(A->ln2, A->rstd2, A->xmid, PW(gi->norm2), N, d);
    /* out = xmid + MLP; gu and act (in the backend's format) saved */
    be->mlp_forward(out, A->gu, A->act, A->ln2, PW(gi->mlp_gate_up), PW(gi->mlp_down), A->xmid, N, d, 4 * d, 0);
}

/* dx: on entry the gradient w.r.t. the block output, on exit w.r.t. its input x. */
void gdn_backward(model *m, int l, const float *x, float *dx, arena *s)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    model_layer *L = &m->layers[l];
    const gdn_index *gi = &L->gi;
    const gdn_acts *A = &L->ga;
    int B = m->B, T = m->T, N = B * T, d = c->n_embd, P = c->gdn_proj_dim, H = c->n_head;
    int hk = c->head_dim, r = c->deltanet_latent_dim, shared = c->deltanet_share_qk;
    size_t Nd = (size_t)N * d, NP = (size_t)N * P, NH = (size_t)N * H;

    s->used = 0;
    /* ---- MLP branch: out = xmid + down(a * silu(b)) ---- */
    float *mlp_scratch = ARENA_F(s, mlp_scratch_floats(N, 4 * d)); /* dact, dgu */
    float *dln = ARENA_F(s, Nd);
    be->mlp_backward_set(dln, GW(gi->mlp_gate_up), GW(gi->mlp_down), dx, A->ln2, A->gu, A->act, PW(gi->mlp_gate_up),
                         PW(gi->mlp_down), mlp_scratch, N, d, 4 * d, 0);
    be->rmsnorm_backward(dx, GW(gi->norm2), dln, A->xmid, PW(gi->norm2), A->rstd2, N, d);

    /* ---- mixer branch: a fresh scratch layout (dln is taken again, first) ---- */
    s->used = 0;
    dln = ARENA_F(s, Nd);
    float *do_ = ARENA_F(s, NP);
    if (r == 0) {
        be->matmul_backward_set(do_, GW(gi->o_proj), dx, A->o, PW(gi->o_proj), N, P, d);
    } else {
        float *dolat = ARENA_F(s, (size_t)N * r);
        be->matmul_backward_set(dolat, GW(gi->o_up), dx, A->olat, PW(gi->o_up), N, r, d);
        be->matmul_backward_set(do_, GW(gi->o_down), dolat, A->o, PW(gi->o_down), N, P, r);
    }
    float *dconv[3], *dpre[3], *dkn = ARENA_F(s, NP);
    for (int i = 0; i < 3; i++) dconv[i] = ARENA_F(s, NP);
    float *dg = ARENA_F(s, NH), *dbeta = ARENA_F(s, NH), *dgraw = ARENA_F(s, NH), *dbraw = ARENA_F(s, NH);
    /* dq, dk, dv, dg, dbeta written by the op, not zeroed first */
    be->gdn_backward_set(dconv[0], dkn, dconv[2], dg, dbeta, do_, A->conv[0], A->kn, A->conv[2], A->g, A->beta,
                         A->state, m->doc_start, B, T, H, hk, 1.0f / sqrtf((float)hk));
    be->l2norm_backward_set(dconv[1], dkn, A->conv[1], A->rnorm, N * H, hk);
    be->zero(dgraw, NH * sizeof(float));
    be->zero(dbraw, NH * sizeof(float));
    be->gates_backward(dgraw, dbraw, dg, dbeta, A->graw, A->braw, NH);

    for (int i = 0; i < 3; i++) {
        if (shared && i == 1) { /* both convs feed the one shared projection: the second adds */
            dpre[1] = dpre[0];
            be->conv_backward(dpre[i], GW(gi->conv_w[i]), GW(gi->conv_b[i]), dconv[i], A->pre[i],
                              PW(gi->conv_w[i]), m->doc_start, B, T, P);
        } else {
            dpre[i] = ARENA_F(s, NP);
            be->conv_backward_set(dpre[i], GW(gi->conv_w[i]), GW(gi->conv_b[i]), dconv[i], A->pre[i],
                                  PW(gi->conv_w[i]), m->doc_start, B, T, P);
        }
    }
    /* the gradients of ln1's projections (the latents' through their up projections),
     * then dln from all of them in one op, in the order of gdn_ln1_parts */
    matmul_part part[MATMUL_PARTS_MAX];
    const int np = gdn_ln1_parts(m, l, part);
    int at = 0;
    part[at++].dy = dgraw;
    part[at++].dy = dbraw;
    for (int i = 0; i < 3; i++) {
        if (shared && i == 1) continue;
        if (r == 0) {
            part[at++].dy = dpre[i];
        } else {
            float *dlat = ARENA_F(s, (size_t)N * r);
            be->matmul_backward_set(dlat, GW(gi->up[i]), dpre[i], A->lat[i], PW(gi->up[i]), N, r, P);
            part[at++].dy = dlat;
        }
    }
    fatal_check(at == np);
    be->matmul_backward_multi(dln, 1, part, np, A->ln1, N, d);
    be->rmsnorm_backward(dx, GW(gi->norm1), dln, x, PW(gi->norm1), A->rstd1, N, d);
}
