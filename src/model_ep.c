/* model_ep.c: routed experts split over the ranks of an expert-parallel group (--ep).
 *
 * Rank g of a group of `ep` holds experts [g E/ep, (g+1) E/ep) of every MoE layer. The
 * router runs on each rank's own tokens as usual; then, per MoE layer:
 *
 *   forward   host: each assignment (token i, choice j) goes to the rank holding expert
 *             idx[i,j]; assignments are ordered by destination (stable), counts are
 *             exchanged, and the local expert ids travel with the rows (host MPI);
 *             rows_gather packs the input rows (d values, or the l = d / latent_ratio
 *             latent values with LatentMoE: that is all that travels), all-to-all,
 *             the local experts run on what arrived (gate 1, one expert per row),
 *             all-to-all back, and moe_combine_forward sums each token's returned
 *             rows with its gate weights.
 *   backward  moe_combine_backward gives the gate gradients and each row's gate-scaled
 *             output gradient; all-to-all; the local experts' backward accumulates the
 *             expert weight gradients and gives the rows' input gradients; all-to-all
 *             back, summed per token.
 *
 * The exchange order depends only on the routing, so it is deterministic, and with
 * gradient checkpointing the recomputed forward repeats it exactly. The routing counts
 * travel through the host (one copy of idx per layer and pass): the all-to-all needs its
 * sizes on the host anyway. Buffers for received rows grow when a step receives more
 * than any before (the worst case, every token to one rank, is ep times the average).
 */
#include <stdlib.h>
#include <string.h>

#include "dist.h"
#include "model_internal.h"

void ep_init(model *m)
{
    const config *c = &m->cfg;
    size_t Nk = (size_t)m->B * m->T * c->moe_k, in = (size_t)c->moe_in;
    m->ep_layers = xcalloc((size_t)m->n_moe, sizeof *m->ep_layers);
    for (int s = 0; s < m->n_moe; s++) {
        ep_layer *e = &m->ep_layers[s];
        e->send_rows = xcalloc(3 * (size_t)m->ep, sizeof(int64_t));
        e->recv_rows = e->send_rows + m->ep;
        e->cursor = e->recv_rows + m->ep;
        e->h_order = xmalloc(4 * Nk * sizeof(int32_t));
        e->h_pos = e->h_order + Nk;
        e->h_lid = e->h_pos + Nk;
        e->h_idx = e->h_lid + Nk;
        e->order = m->be->alloc(Nk * sizeof(int32_t));
        e->pos = m->be->alloc(Nk * sizeof(int32_t));
        e->xs = m->be->alloc(Nk * in * sizeof(float));
        e->yback = m->be->alloc(Nk * in * sizeof(float));
    }
}

void ep_free(model *m)
{
    const backend *be = m->be;
    for (int s = 0; s < m->n_moe; s++) {
        ep_layer *e = &m->ep_layers[s];
        free(e->send_rows);
        free(e->h_order);
        free(e->h_lid_recv);
        void *bufs[] = {e->order, e->pos, e->xs, e->yback, e->lid, e->xr, e->esave};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
            if (bufs[i]) be->free(bufs[i]);
    }
    free(m->ep_layers);
    m->ep_layers = NULL;
    if (m->ep_tmp) be->free(m->ep_tmp);
    if (m->ep_ones) be->free(m->ep_ones);
}

/* Room for M received rows in layer e and in the shared scratch. */
static void reserve(model *m, ep_layer *e, int64_t M)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    size_t in = (size_t)c->moe_in, h = (size_t)c->moe_hidden;
    if (M > e->cap || !e->xr) {
        int64_t cap = M > e->cap + e->cap / 4 ? M : e->cap + e->cap / 4 + 1;
        if (e->xr) {
            be->free(e->xr);
            be->free(e->esave);
            be->free(e->lid);
        }
        e->xr = be->alloc((size_t)cap * in * sizeof(float));
        e->esave = be->alloc((size_t)cap * 3 * h * sizeof(float));
        e->lid = be->alloc((size_t)cap * sizeof(int32_t));
        free(e->h_lid_recv);
        e->h_lid_recv = xmalloc((size_t)cap * sizeof(int32_t));
        e->cap = cap;
    }
    if ((size_t)M > m->ep_cap || !m->ep_tmp) {
        size_t cap = (size_t)e->cap > m->ep_cap ? (size_t)e->cap : m->ep_cap;
        if (m->ep_tmp) {
            be->free(m->ep_tmp);
            be->free(m->ep_ones);
        }
        m->ep_tmp = be->alloc((2 * in + 1) * cap * sizeof(float)); /* dyr, dxr, dgate_r */
        m->ep_ones = be->alloc(cap * sizeof(float));
        float *ones = xmalloc(cap * sizeof(float));
        for (size_t i = 0; i < cap; i++) ones[i] = 1.0f;
        be->from_host(m->ep_ones, ones, cap * sizeof(float));
        free(ones);
        m->ep_cap = cap;
    }
}

void ep_experts_forward(model *m, int slot, float *y, const float *x, const int32_t *idx, const float *gate,
                        const float *w1, const float *w2)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    dist *d = m->dist;
    ep_layer *e = &m->ep_layers[slot];
    int N = m->B * m->T, k = c->moe_k, in = c->moe_in, h = c->moe_hidden, ep = m->ep;
    int El = c->moe_E / ep;
    size_t Nk = (size_t)N * k;

    /* the exchange plan: assignments grouped by destination, in assignment order */
    be->to_host(e->h_idx, idx, Nk * sizeof(int32_t));
    int64_t *cursor = e->cursor;
    memset(e->send_rows, 0, (size_t)ep * sizeof(int64_t));
    cursor[0] = 0;
    for (size_t a = 0; a < Nk; a++) e->send_rows[e->h_idx[a] / El]++;
    for (int r = 1; r < ep; r++) cursor[r] = cursor[r - 1] + e->send_rows[r - 1];
    for (size_t a = 0; a < Nk; a++) {
        int32_t ex = e->h_idx[a];
        int64_t p = cursor[ex / El]++;
        e->h_pos[a] = (int32_t)p;
        e->h_order[p] = (int32_t)(a / (size_t)k);
        e->h_lid[p] = ex % El;
    }
    dist_alltoall_host_i64(d, DIST_EP, e->send_rows, e->recv_rows);
    int64_t M = 0;
    for (int r = 0; r < ep; r++) M += e->recv_rows[r];
    e->M = M;
    reserve(m, e, M);
    dist_alltoallv_host_i32(d, DIST_EP, e->h_lid, e->send_rows, e->h_lid_recv, e->recv_rows);
    be->from_host(e->order, e->h_order, Nk * sizeof(int32_t));
    be->from_host(e->pos, e->h_pos, Nk * sizeof(int32_t));
    if (M) be->from_host(e->lid, e->h_lid_recv, (size_t)M * sizeof(int32_t));

    float *yr = m->ep_tmp;
    be->rows_gather(e->xs, x, e->order, (int)Nk, in);
    dist_alltoallv(d, DIST_EP, e->xs, e->send_rows, e->xr, e->recv_rows, in);
    if (M) be->moe_experts_forward(yr, e->esave, e->xr, e->lid, m->ep_ones, w1, w2, (int)M, El, 1, in, h, in);
    dist_alltoallv(d, DIST_EP, yr, e->recv_rows, e->yback, e->send_rows, in);
    be->zero(y, (size_t)N * in * sizeof(float));
    be->moe_combine_forward(y, e->yback, e->pos, gate, N, k, in);
}

void ep_experts_backward(model *m, int slot, float *dx, float *dgate, float *dw1, float *dw2, const float *dy,
                         const float *gate, const float *w1, const float *w2)
{
    const backend *be = m->be;
    const config *c = &m->cfg;
    dist *d = m->dist;
    ep_layer *e = &m->ep_layers[slot];
    int N = m->B * m->T, k = c->moe_k, in = c->moe_in, h = c->moe_hidden;
    int El = c->moe_E / m->ep;
    int64_t M = e->M;
    float *dyr = m->ep_tmp, *dxr = m->ep_tmp + (size_t)m->ep_cap * in;

    /* xs carries the gate-scaled output gradients out and the input gradients back */
    be->moe_combine_backward(e->xs, dgate, dy, e->yback, e->pos, gate, N, k, in);
    dist_alltoallv(d, DIST_EP, e->xs, e->send_rows, dyr, e->recv_rows, in);
    if (M) {
        /* received rows have gate 1; their gate gradient is computed and dropped */
        float *dgate_r = dxr + (size_t)m->ep_cap * in;
        be->zero(dxr, (size_t)M * in * sizeof(float));
        be->zero(dgate_r, (size_t)M * sizeof(float));
        be->moe_experts_backward(dxr, dgate_r, dw1, dw2, dyr, e->esave, e->xr, e->lid, m->ep_ones, w1, w2, (int)M,
                                 El, 1, in, h, in);
    }
    dist_alltoallv(d, DIST_EP, dxr, e->recv_rows, e->xs, e->send_rows, in);
    be->moe_combine_forward(dx, e->xs, e->pos, NULL, N, k, in);
}
