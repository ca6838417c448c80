/* cpu_gdn.c: the gated delta rule (MODEL.md section 3) on the CPU.
 *
 * Per (batch row b, head h) a state S [D, D], indexed [key dim i][value dim j], starts
 * at 0 and is reset to 0 before every token that starts a document; then for each t
 *     S <- exp(g_t) S;  w_t = beta_t (v_t - S^T k_t);  S <- S + k_t w_t^T;
 *     o_t = S^T (scale q_t).
 * Two implementations of it live here. cpu_gdn_recurrent_* run that loop token by token
 * and its exact adjoint; they exist only as the reference the tests hold the chunked
 * form against. cpu_gdn_forward/backward run the chunked form that training uses and
 * that the CUDA kernels follow: the sequence is cut into chunks of GDN_CHUNK tokens, the
 * state is carried from chunk to chunk, and inside a chunk everything is small dense
 * algebra (a triangular solve and a few [C, C] and [C, D] products). The forward saves
 * the state at the start of every chunk so that the backward can rebuild each chunk
 * without rerunning the whole row.
 *
 * Layouts: q, k, v, o and their gradients [B, T, H, D] (element (b, t, h, j) at
 * ((b*T + t)*H + h)*D + j); g, beta [B, T, H]; doc_start NULL or [B, T];
 * state_save (backend.h): [B, H, ceil(T / GDN_CHUNK), D, D] chunk start states, then every
 * chunk's W [64, gdn_w_pitch(D)] in the same order. The CUDA backward reads that W where
 * the CPU's rebuilds it (gdn_chunk_prepare, the same bits as the forward's).
 *
 * Parallelism: one OpenMP iteration per (b, h) pair, which owns every output element of
 * that pair and sums in a fixed order, so results are bit-identical run after run.
 */
#include "cpu_ops.h"
#include "backend.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the chunked form, what it computes and what its backward is ----
 *
 * One chunk holds L <= C = GDN_CHUNK tokens, t = 0..L-1, and starts from S0, the state
 * after the previous chunk with a document reset at the chunk's first token already
 * applied (this S0 is what state_save holds). A document start at a position r > 0
 * of the chunk opens a new segment; seg(t) numbers the segments from 0. Within a
 * segment G_t is the running sum of g from the segment's first token, except that the
 * g of a token where a reset happens is left out (it multiplies a zero state, so it has
 * no effect and receives no gradient):
 *     G_t = 0 if t resets, else G_{t-1} + g_t  (G_{-1} = 0, i.e. G_0 = g_0 without reset).
 * Decay factors, all computed as exp of a difference so that they never overflow:
 *     E_ts = exp(G_t - G_s) if s <= t and seg(t) = seg(s), else 0     [C, C]
 *     e0_t = exp(G_t) if seg(t) = 0, else 0                           (S0 reaches t)
 *     eL_s = exp(G_{L-1} - G_s) if seg(s) = seg(L-1), else 0          (s reaches the end)
 *     e0L  = e0_{L-1}                                                  (S0 reaches the end)
 * With qs_t = scale q_t, KK_ts = k_t . k_s, QK_ts = qs_t . k_s, U_t = S0^T k_t and
 * P_t = S0^T qs_t, the state after token t of the chunk is
 *     S_t = e0_t S0 + sum_{s <= t} E_ts k_s w_s^T,
 * and the loop becomes
 *     R_t = v_t - e0_t U_t - sum_{s < t} E_ts KK_ts W_s,   W_t = beta_t R_t
 *           (forward substitution of the unit lower-triangular system (I + A) W = rhs,
 *            A_ts = beta_t E_ts KK_ts)
 *     o_t = e0_t P_t + sum_{s <= t} E_ts QK_ts W_s
 *     S_end = e0L S0 + sum_s eL_s k_s W_s^T.
 *
 * Backward of one chunk, given dO_t = dL/do_t and dS = dL/dS_end (carried in from the
 * chunk after; 0 after the last chunk), with all the above rebuilt from the saved S0:
 *  1. direct gradient of W from o and S_end:
 *         dW_s = sum_{t >= s} E_ts QK_ts dO_t + eL_s dS^T k_s
 *  2. through the triangular system, s = L-1 down to 0 (dW_t for t > s is final):
 *         dW_s -= sum_{t > s} beta_t E_ts KK_ts dW_t
 *  3. dR_t = beta_t dW_t;  dbeta_t += R_t . dW_t;  dv_t += dR_t
 *  4. pair terms, for s < t (the QK ones also for s = t):
 *         c1 = W_s . dR_t,  c2 = W_s . dO_t
 *         dE_ts  = -KK_ts c1 + QK_ts c2    -> dG_t += dE_ts E_ts, dG_s -= dE_ts E_ts
 *         dKK_ts = -E_ts c1                -> dk_t += dKK_ts k_s, dk_s += dKK_ts k_t
 *         dQK_ts =  E_ts c2                -> dqs_t += dQK_ts k_s, dk_s += dQK_ts qs_t
 *  5. start-state terms, t in segment 0:
 *         dG_t += e0_t (P_t . dO_t - U_t . dR_t)
 *         dqs_t += e0_t S0 dO_t;  dk_t -= e0_t S0 dR_t
 *         dS0 += e0_t (qs_t dO_t^T - k_t dR_t^T)
 *  6. end-state terms, s in the last segment, y = dS W_s:
 *         dk_s += eL_s y;  dG_{L-1} += eL_s (k_s . y);  dG_s -= eL_s (k_s . y)
 *  7. if seg(L-1) = 0: dS0 += e0L dS;  dG_{L-1} += e0L <S0, dS>
 *  8. dg_u += sum of dG_t over t >= u in u's segment, and nothing where u resets
 *  9. dq_t += scale dqs_t;  the dS carried to the previous chunk is dS0, or 0 when the
 *     chunk's first token resets (the previous state never reaches this chunk).
 * The diagonal E_tt = 1 is a constant, so step 4 gives it no dG.
 */

/* malloc that ends the program on failure: these are scratch buffers of a few D x D
 * states, so failing means the machine is out of memory and nothing can continue. */
static void *gdn_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "cpu_gdn: out of memory allocating %zu bytes\n", bytes);
        abort();
    }
    return p;
}

static real gdn_exp(real x) { return (real)exp((double)x); }

/* state_save: one D x D state per (b, h, chunk), then the chunks' W rows; declared in
 * backend.h for every backend, which all use this layout so that it is defined in one
 * place. */
int gdn_w_pitch(int D) { return (D + 3) & ~3; }

size_t gdn_state_w_offset(int B, int T, int H, int D)
{
    size_t nchunk = ((size_t)T + GDN_CHUNK - 1) / GDN_CHUNK;
    return (size_t)B * (size_t)H * nchunk * (size_t)D * (size_t)D;
}

size_t gdn_state_floats(int B, int T, int H, int D)
{
    size_t nchunk = ((size_t)T + GDN_CHUNK - 1) / GDN_CHUNK;
    return gdn_state_w_offset(B, T, H, D) + (size_t)B * (size_t)H * nchunk * GDN_CHUNK * (size_t)gdn_w_pitch(D);
}

/* index of (b, t, h) in a [B, T, H] array; times D for a [B, T, H, D] array */
static size_t gdn_tok(int b, int t, int h, int T, int H)
{
    return ((size_t)b * T + t) * H + h;
}

/* ---------------------------------------------------------------------------------- */
/* the token-by-token reference                                                        */
/* ---------------------------------------------------------------------------------- */

/* o [B, T, H, D] overwritten from q, k, v [B, T, H, D], g, beta [B, T, H]; no saved
 * state. Scratch (one state per thread) is allocated and freed inside. */
void cpu_gdn_recurrent_forward(real *o, const real *q, const real *k, const real *v,
                               const real *g, const real *beta, const int32_t *doc_start,
                               int B, int T, int H, int D, real scale)
{
    const size_t DD = (size_t)D * D;
#pragma omp parallel
    {
        real *S = gdn_alloc(DD * sizeof(real));
        real *w = gdn_alloc((size_t)D * sizeof(real));
        real *qs = gdn_alloc((size_t)D * sizeof(real));
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H;
            memset(S, 0, DD * sizeof(real));
            for (int t = 0; t < T; t++) {
                const size_t n = gdn_tok(b, t, h, T, H);
                const real *kt = k + n * D, *vt = v + n * D, *qt = q + n * D;
                real *ot = o + n * D;
                if (doc_start && doc_start[(size_t)b * T + t]) memset(S, 0, DD * sizeof(real));
                const real decay = gdn_exp(g[n]);
                for (size_t e = 0; e < DD; e++) S[e] *= decay;
                for (int j = 0; j < D; j++) {
                    real u = 0;
                    for (int i = 0; i < D; i++) u += S[(size_t)i * D + j] * kt[i];
                    w[j] = beta[n] * (vt[j] - u);
                }
                for (int i = 0; i < D; i++)
                    for (int j = 0; j < D; j++) S[(size_t)i * D + j] += kt[i] * w[j];
                for (int i = 0; i < D; i++) qs[i] = scale * qt[i];
                for (int j = 0; j < D; j++) {
                    real acc = 0;
                    for (int i = 0; i < D; i++) acc += S[(size_t)i * D + j] * qs[i];
                    ot[j] = acc;
                }
            }
        }
        free(S);
        free(w);
        free(qs);
    }
}

/* The adjoint of the loop above, token by token in reverse. Per (b, h) it first runs
 * the loop forward storing the state that enters every token (after any reset), then
 * walks back with dS = dL/dS_t:
 *     dS += qs_t dO_t^T; dqs_t = S_t dO_t; dw = dS^T k_t; dk_t = dS w
 *     dbeta_t = dw . (v_t - u); du = -beta_t dw; dv_t = beta_t dw
 *     dSd = dS + k_t du^T; dk_t += Sd du; dg_t = <Sd, dSd>; dS = exp(g_t) dSd
 * where Sd = exp(g_t) S_{t-1} is the decayed state and u = Sd^T k_t; a reset at t
 * stops dS from reaching t-1. Accumulates into dq, dk, dv [B, T, H, D] and dg,
 * dbeta [B, T, H]. Allocates (T + 1) D^2 reals per thread, so it is meant for tests. */
void cpu_gdn_recurrent_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta,
                                const real *dout, const real *q, const real *k, const real *v,
                                const real *g, const real *beta, const int32_t *doc_start,
                                int B, int T, int H, int D, real scale)
{
    const size_t DD = (size_t)D * D;
#pragma omp parallel
    {
        real *states = gdn_alloc(((size_t)T + 1) * DD * sizeof(real));
        real *Sd = gdn_alloc(DD * sizeof(real));
        real *St = gdn_alloc(DD * sizeof(real));
        real *dS = gdn_alloc(DD * sizeof(real));
        real *vec = gdn_alloc(6 * (size_t)D * sizeof(real));
        real *w = vec, *r = vec + D, *qs = vec + 2 * D, *dw = vec + 3 * D, *du = vec + 4 * D;
        real *dkt = vec + 5 * D;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H;
            /* states[t] = state entering token t, reset applied; states[t+1] from it */
            memset(states, 0, DD * sizeof(real));
            for (int t = 0; t < T; t++) {
                const size_t n = gdn_tok(b, t, h, T, H);
                const real *kt = k + n * D, *vt = v + n * D;
                real *S = states + (size_t)t * DD, *Sn = S + DD;
                if (doc_start && doc_start[(size_t)b * T + t]) memset(S, 0, DD * sizeof(real));
                const real decay = gdn_exp(g[n]);
                for (size_t e = 0; e < DD; e++) Sn[e] = decay * S[e];
                for (int j = 0; j < D; j++) {
                    real u = 0;
                    for (int i = 0; i < D; i++) u += Sn[(size_t)i * D + j] * kt[i];
                    w[j] = beta[n] * (vt[j] - u);
                }
                for (int i = 0; i < D; i++)
                    for (int j = 0; j < D; j++) Sn[(size_t)i * D + j] += kt[i] * w[j];
            }
            memset(dS, 0, DD * sizeof(real));
            for (int t = T - 1; t >= 0; t--) {
                const size_t n = gdn_tok(b, t, h, T, H);
                const real *kt = k + n * D, *vt = v + n * D, *qt = q + n * D;
                const real *dot = dout + n * D;
                const real *S = states + (size_t)t * DD;
                const real decay = gdn_exp(g[n]);
                /* rebuild the token's intermediates from the state entering it */
                for (size_t e = 0; e < DD; e++) Sd[e] = decay * S[e];
                for (int j = 0; j < D; j++) {
                    real u = 0;
                    for (int i = 0; i < D; i++) u += Sd[(size_t)i * D + j] * kt[i];
                    r[j] = vt[j] - u;
                    w[j] = beta[n] * r[j];
                }
                for (size_t e = 0; e < DD; e++) St[e] = Sd[e];
                for (int i = 0; i < D; i++)
                    for (int j = 0; j < D; j++) St[(size_t)i * D + j] += kt[i] * w[j];
                for (int i = 0; i < D; i++) qs[i] = scale * qt[i];

                /* o_t = S_t^T qs_t */
                for (int i = 0; i < D; i++) {
                    real acc = 0;
                    for (int j = 0; j < D; j++) acc += St[(size_t)i * D + j] * dot[j];
                    dq[n * D + i] += scale * acc;
                    for (int j = 0; j < D; j++) dS[(size_t)i * D + j] += qs[i] * dot[j];
                }
                /* S_t = Sd + k_t w^T */
                for (int j = 0; j < D; j++) {
                    real acc = 0;
                    for (int i = 0; i < D; i++) acc += dS[(size_t)i * D + j] * kt[i];
                    dw[j] = acc;
                }
                for (int i = 0; i < D; i++) {
                    real acc = 0;
                    for (int j = 0; j < D; j++) acc += dS[(size_t)i * D + j] * w[j];
                    dkt[i] = acc;
                }
                /* w = beta (v - Sd^T k) */
                real db = 0;
                for (int j = 0; j < D; j++) {
                    db += dw[j] * r[j];
                    dv[n * D + j] += beta[n] * dw[j];
                    du[j] = -beta[n] * dw[j];
                }
                dbeta[n] += db;
                for (int i = 0; i < D; i++) {
                    real acc = 0;
                    for (int j = 0; j < D; j++) acc += Sd[(size_t)i * D + j] * du[j];
                    dk[n * D + i] += dkt[i] + acc;
                    for (int j = 0; j < D; j++) dS[(size_t)i * D + j] += kt[i] * du[j];
                }
                /* Sd = exp(g_t) S */
                real dgt = 0;
                for (size_t e = 0; e < DD; e++) dgt += Sd[e] * dS[e];
                dg[n] += dgt;
                if (doc_start && doc_start[(size_t)b * T + t])
                    memset(dS, 0, DD * sizeof(real));
                else
                    for (size_t e = 0; e < DD; e++) dS[e] *= decay;
            }
        }
        free(states);
        free(Sd);
        free(St);
        free(dS);
        free(vec);
    }
}

/* ---------------------------------------------------------------------------------- */
/* the chunked form                                                                    */
/* ---------------------------------------------------------------------------------- */

/* Per-thread scratch for one chunk; names follow the derivation at the top. Row t of a
 * [C, D] array is at t*D, entry (t, s) of a [C, C] array at t*C + s. */
typedef struct gdn_chunk {
    int D;
    int L;         /* tokens in this chunk */
    int *reset;    /* [C] 1 where the token resets the state */
    int *seg;      /* [C] segment number */
    double *G;     /* [C] segment-local cumulative log decay; double because in float a
                    * sum near -1000 (strong gates earlier in the chunk) would leave
                    * differences G_t - G_s between later tokens only ~1e-4 accurate */
    real *e0;      /* [C] */
    real *eL;      /* [C] */
    real *E;       /* [C, C] */
    real *KK;      /* [C, C] */
    real *QK;      /* [C, C] */
    real *qs;      /* [C, D] scale * q */
    real *U;       /* [C, D] S0^T k_t */
    real *P;       /* [C, D] S0^T qs_t */
    real *R;       /* [C, D] */
    real *W;       /* [C, D] */
    /* backward only */
    real *dW;      /* [C, D], becomes dR in place after step 3 */
    real *dqs;     /* [C, D] */
    real *dk;      /* [C, D] */
    real *dG;      /* [C] */
    real *dS0;     /* [D, D] */
    real *y;       /* [D] */
} gdn_chunk;

static void gdn_chunk_init(gdn_chunk *c, int D)
{
    const size_t C = GDN_CHUNK, CD = C * (size_t)D;
    c->D = D;
    c->L = 0;
    c->reset = gdn_alloc(C * sizeof(int));
    c->seg = gdn_alloc(C * sizeof(int));
    c->G = gdn_alloc(C * sizeof(double));
    c->e0 = gdn_alloc(C * sizeof(real));
    c->eL = gdn_alloc(C * sizeof(real));
    c->E = gdn_alloc(C * C * sizeof(real));
    c->KK = gdn_alloc(C * C * sizeof(real));
    c->QK = gdn_alloc(C * C * sizeof(real));
    c->qs = gdn_alloc(CD * sizeof(real));
    c->U = gdn_alloc(CD * sizeof(real));
    c->P = gdn_alloc(CD * sizeof(real));
    c->R = gdn_alloc(CD * sizeof(real));
    c->W = gdn_alloc(CD * sizeof(real));
    c->dW = gdn_alloc(CD * sizeof(real));
    c->dqs = gdn_alloc(CD * sizeof(real));
    c->dk = gdn_alloc(CD * sizeof(real));
    c->dG = gdn_alloc(C * sizeof(real));
    c->dS0 = gdn_alloc((size_t)D * D * sizeof(real));
    c->y = gdn_alloc((size_t)D * sizeof(real));
}

static void gdn_chunk_free(gdn_chunk *c)
{
    free(c->reset);
    free(c->seg);
    free(c->G);
    free(c->e0);
    free(c->eL);
    free(c->E);
    free(c->KK);
    free(c->QK);
    free(c->qs);
    free(c->U);
    free(c->P);
    free(c->R);
    free(c->W);
    free(c->dW);
    free(c->dqs);
    free(c->dk);
    free(c->dG);
    free(c->dS0);
    free(c->y);
}

/* Build every in-chunk quantity of the forward (G, E, e0, eL, KK, QK, qs, U, P, R, W)
 * for the chunk of row b, head h starting at token t0 with L tokens, from its start
 * state S0 [D, D]. Forward and backward both call this, so the backward sees exactly
 * the W the forward used. */
static void gdn_chunk_prepare(gdn_chunk *c, const real *S0, const real *q, const real *k,
                              const real *v, const real *g, const real *beta,
                              const int32_t *doc_start, int b, int t0, int L, int h,
                              int T, int H, real scale)
{
    const int C = GDN_CHUNK, D = c->D;
    c->L = L;
    for (int t = 0; t < L; t++) {
        const size_t n = gdn_tok(b, t0 + t, h, T, H);
        c->reset[t] = doc_start && doc_start[(size_t)b * T + t0 + t];
        c->seg[t] = t == 0 ? 0 : c->seg[t - 1] + c->reset[t];
        c->G[t] = c->reset[t] ? 0 : (t == 0 ? 0 : c->G[t - 1]) + (double)g[n];
        for (int i = 0; i < D; i++) c->qs[(size_t)t * D + i] = scale * q[n * D + i];
    }
    for (int t = 0; t < L; t++) {
        c->e0[t] = c->seg[t] == 0 ? (real)exp(c->G[t]) : 0;
        c->eL[t] = c->seg[t] == c->seg[L - 1] ? (real)exp(c->G[L - 1] - c->G[t]) : 0;
    }
    for (int t = 0; t < L; t++) {
        const real *kt = k + gdn_tok(b, t0 + t, h, T, H) * D;
        const real *qt = c->qs + (size_t)t * D;
        for (int s = 0; s <= t; s++) {
            const real *ks = k + gdn_tok(b, t0 + s, h, T, H) * D;
            real kk = 0, qk = 0;
            for (int i = 0; i < D; i++) {
                kk += kt[i] * ks[i];
                qk += qt[i] * ks[i];
            }
            c->KK[t * C + s] = kk;
            c->QK[t * C + s] = qk;
            c->E[t * C + s] = c->seg[t] == c->seg[s] ? (real)exp(c->G[t] - c->G[s]) : 0;
        }
    }
    /* U_t = S0^T k_t, P_t = S0^T qs_t */
    for (int t = 0; t < L; t++) {
        const real *kt = k + gdn_tok(b, t0 + t, h, T, H) * D;
        const real *qt = c->qs + (size_t)t * D;
        real *Ut = c->U + (size_t)t * D, *Pt = c->P + (size_t)t * D;
        for (int j = 0; j < D; j++) {
            real u = 0, p = 0;
            for (int i = 0; i < D; i++) {
                u += S0[(size_t)i * D + j] * kt[i];
                p += S0[(size_t)i * D + j] * qt[i];
            }
            Ut[j] = u;
            Pt[j] = p;
        }
    }
    /* forward substitution: R_t = v_t - e0_t U_t - sum_{s<t} E_ts KK_ts W_s */
    for (int t = 0; t < L; t++) {
        const size_t n = gdn_tok(b, t0 + t, h, T, H);
        real *Rt = c->R + (size_t)t * D, *Wt = c->W + (size_t)t * D;
        const real *Ut = c->U + (size_t)t * D;
        for (int j = 0; j < D; j++) Rt[j] = v[n * D + j] - c->e0[t] * Ut[j];
        for (int s = 0; s < t; s++) {
            const real a = c->E[t * C + s] * c->KK[t * C + s];
            const real *Ws = c->W + (size_t)s * D;
            for (int j = 0; j < D; j++) Rt[j] -= a * Ws[j];
        }
        for (int j = 0; j < D; j++) Wt[j] = beta[n] * Rt[j];
    }
}

/* o_t of the prepared chunk, and S <- S_end in place (S holds S0 on entry). */
static void gdn_chunk_output(gdn_chunk *c, real *S, real *o, const real *k, int b, int t0,
                             int h, int T, int H)
{
    const int C = GDN_CHUNK, D = c->D, L = c->L;
    for (int t = 0; t < L; t++) {
        real *ot = o + gdn_tok(b, t0 + t, h, T, H) * D;
        const real *Pt = c->P + (size_t)t * D;
        for (int j = 0; j < D; j++) ot[j] = c->e0[t] * Pt[j];
        for (int s = 0; s <= t; s++) {
            const real a = c->E[t * C + s] * c->QK[t * C + s];
            const real *Ws = c->W + (size_t)s * D;
            for (int j = 0; j < D; j++) ot[j] += a * Ws[j];
        }
    }
    const real e0L = c->e0[L - 1];
    for (size_t e = 0; e < (size_t)D * D; e++) S[e] *= e0L;
    for (int s = 0; s < L; s++) {
        if (c->eL[s] == 0) continue;
        const real *ks = k + gdn_tok(b, t0 + s, h, T, H) * D;
        const real *Ws = c->W + (size_t)s * D;
        for (int i = 0; i < D; i++) {
            const real a = c->eL[s] * ks[i];
            for (int j = 0; j < D; j++) S[(size_t)i * D + j] += a * Ws[j];
        }
    }
}

/* o [B, T, H, D] overwritten; state_save (gdn_state_floats(B, T, H, D) reals, caller
 * owned) overwritten with the state entering every chunk, reset at the chunk's first
 * token already applied, and every chunk's W. Per-thread scratch is allocated and freed
 * inside. */
void cpu_gdn_forward(real *o, real *state_save, const real *q, const real *k, const real *v,
                     const real *g, const real *beta, const int32_t *doc_start,
                     int B, int T, int H, int D, real scale)
{
    const size_t DD = (size_t)D * D, Dw = (size_t)gdn_w_pitch(D);
    const int nchunk = (T + GDN_CHUNK - 1) / GDN_CHUNK;
    real *wsave = state_save + gdn_state_w_offset(B, T, H, D);
#pragma omp parallel
    {
        gdn_chunk c;
        gdn_chunk_init(&c, D);
        real *S = gdn_alloc(DD * sizeof(real));
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H;
            memset(S, 0, DD * sizeof(real));
            for (int ci = 0; ci < nchunk; ci++) {
                const int t0 = ci * GDN_CHUNK;
                const int L = T - t0 < GDN_CHUNK ? T - t0 : GDN_CHUNK;
                if (doc_start && doc_start[(size_t)b * T + t0]) memset(S, 0, DD * sizeof(real));
                memcpy(state_save + ((size_t)bh * nchunk + ci) * DD, S, DD * sizeof(real));
                gdn_chunk_prepare(&c, S, q, k, v, g, beta, doc_start, b, t0, L, h, T, H, scale);
                real *w = wsave + ((size_t)bh * nchunk + ci) * GDN_CHUNK * Dw;
                memset(w, 0, GDN_CHUNK * Dw * sizeof(real));
                for (int t = 0; t < L; t++) memcpy(w + t * Dw, c.W + (size_t)t * D, (size_t)D * sizeof(real));
                gdn_chunk_output(&c, S, o, k, b, t0, h, T, H);
            }
        }
        free(S);
        gdn_chunk_free(&c);
    }
}

/* Steps 1-9 of the derivation at the top for one prepared chunk with start state S0.
 * dS holds dL/dS_end on entry and dL/dS_prev_end (the gradient carried to the previous
 * chunk) on return. */
static void gdn_chunk_backward(gdn_chunk *c, const real *S0, real *dS, real *dq, real *dk,
                               real *dv, real *dg, real *dbeta, const real *dout,
                               const real *k, const real *beta, int b, int t0, int h, int T,
                               int H, real scale)
{
    const int C = GDN_CHUNK, D = c->D, L = c->L;
    const size_t DD = (size_t)D * D;
    real *dW = c->dW, *dqs = c->dqs, *dkl = c->dk, *dG = c->dG, *dS0 = c->dS0, *y = c->y;
#define TOKV(arr, t) ((arr) + gdn_tok(b, t0 + (t), h, T, H) * D)
#define TOKS(arr, t) ((arr)[gdn_tok(b, t0 + (t), h, T, H)])
    memset(dqs, 0, (size_t)L * D * sizeof(real));
    memset(dkl, 0, (size_t)L * D * sizeof(real));
    memset(dG, 0, (size_t)L * sizeof(real));
    memset(dS0, 0, DD * sizeof(real));

    /* 1. direct dW from the outputs and the end state */
    for (int s = 0; s < L; s++) {
        real *dWs = dW + (size_t)s * D;
        const real *ks = TOKV(k, s);
        for (int j = 0; j < D; j++) {
            real acc = 0;
            for (int i = 0; i < D; i++) acc += dS[(size_t)i * D + j] * ks[i];
            dWs[j] = c->eL[s] * acc;
        }
        for (int t = s; t < L; t++) {
            const real a = c->E[t * C + s] * c->QK[t * C + s];
            const real *dot = TOKV(dout, t);
            for (int j = 0; j < D; j++) dWs[j] += a * dot[j];
        }
    }
    /* 2. through the triangular system, last row first */
    for (int s = L - 1; s >= 0; s--) {
        real *dWs = dW + (size_t)s * D;
        for (int t = s + 1; t < L; t++) {
            const real a = TOKS(beta, t) * c->E[t * C + s] * c->KK[t * C + s];
            const real *dWt = dW + (size_t)t * D;
            for (int j = 0; j < D; j++) dWs[j] -= a * dWt[j];
        }
    }
    /* 3. dbeta, then dW becomes dR in place; dv */
    for (int t = 0; t < L; t++) {
        real *dRt = dW + (size_t)t * D;
        const real *Rt = c->R + (size_t)t * D;
        const real bt = TOKS(beta, t);
        real db = 0;
        real *dvt = TOKV(dv, t);
        for (int j = 0; j < D; j++) {
            db += Rt[j] * dRt[j];
            dRt[j] *= bt;
            dvt[j] += dRt[j];
        }
        TOKS(dbeta, t) += db;
    }
    const real *dR = dW;
    /* 4. pair terms */
    for (int t = 0; t < L; t++) {
        const real *kt = TOKV(k, t), *qt = c->qs + (size_t)t * D;
        const real *dRt = dR + (size_t)t * D, *dot = TOKV(dout, t);
        for (int s = 0; s <= t; s++) {
            const real *Ws = c->W + (size_t)s * D, *ks = TOKV(k, s);
            const real Ets = c->E[t * C + s];
            real c1 = 0, c2 = 0;
            for (int j = 0; j < D; j++) {
                c1 += Ws[j] * dRt[j];
                c2 += Ws[j] * dot[j];
            }
            if (s < t) {
                const real x = (-c->KK[t * C + s] * c1 + c->QK[t * C + s] * c2) * Ets;
                dG[t] += x;
                dG[s] -= x;
                const real dkk = -Ets * c1;
                for (int i = 0; i < D; i++) {
                    dkl[(size_t)t * D + i] += dkk * ks[i];
                    dkl[(size_t)s * D + i] += dkk * kt[i];
                }
            }
            const real dqk = Ets * c2;
            for (int i = 0; i < D; i++) {
                dqs[(size_t)t * D + i] += dqk * ks[i];
                dkl[(size_t)s * D + i] += dqk * qt[i];
            }
        }
    }
    /* 5. start-state terms */
    for (int t = 0; t < L; t++) {
        const real e0 = c->e0[t];
        if (e0 == 0) continue;
        const real *kt = TOKV(k, t), *qt = c->qs + (size_t)t * D;
        const real *dRt = dR + (size_t)t * D, *dot = TOKV(dout, t);
        const real *Pt = c->P + (size_t)t * D, *Ut = c->U + (size_t)t * D;
        real de0 = 0;
        for (int j = 0; j < D; j++) de0 += Pt[j] * dot[j] - Ut[j] * dRt[j];
        dG[t] += e0 * de0;
        for (int i = 0; i < D; i++) {
            real aq = 0, ak = 0;
            for (int j = 0; j < D; j++) {
                aq += S0[(size_t)i * D + j] * dot[j];
                ak += S0[(size_t)i * D + j] * dRt[j];
            }
            dqs[(size_t)t * D + i] += e0 * aq;
            dkl[(size_t)t * D + i] -= e0 * ak;
            const real eq = e0 * qt[i], ek = e0 * kt[i];
            for (int j = 0; j < D; j++) dS0[(size_t)i * D + j] += eq * dot[j] - ek * dRt[j];
        }
    }
    /* 6. end-state terms */
    for (int s = 0; s < L; s++) {
        const real eL = c->eL[s];
        if (eL == 0) continue;
        const real *ks = TOKV(k, s), *Ws = c->W + (size_t)s * D;
        real kdotY = 0;
        for (int i = 0; i < D; i++) {
            real acc = 0;
            for (int j = 0; j < D; j++) acc += dS[(size_t)i * D + j] * Ws[j];
            y[i] = acc;
            kdotY += ks[i] * acc;
        }
        for (int i = 0; i < D; i++) dkl[(size_t)s * D + i] += eL * y[i];
        dG[L - 1] += eL * kdotY;
        dG[s] -= eL * kdotY;
    }
    /* 7. the start state reaching the end */
    if (c->seg[L - 1] == 0) {
        const real e0L = c->e0[L - 1];
        real inner = 0;
        for (size_t e = 0; e < DD; e++) {
            inner += S0[e] * dS[e];
            dS0[e] += e0L * dS[e];
        }
        dG[L - 1] += e0L * inner;
    }
    /* 8. dg from dG, segment by segment */
    real acc = 0;
    for (int t = L - 1; t >= 0; t--) {
        acc += dG[t];
        if (c->reset[t]) {
            acc = 0;
            continue;
        }
        TOKS(dg, t) += acc;
    }
    /* 9. dq, dk and the carried state gradient */
    for (int t = 0; t < L; t++) {
        real *dqt = TOKV(dq, t), *dkt = TOKV(dk, t);
        for (int i = 0; i < D; i++) {
            dqt[i] += scale * dqs[(size_t)t * D + i];
            dkt[i] += dkl[(size_t)t * D + i];
        }
    }
    if (c->reset[0])
        memset(dS, 0, DD * sizeof(real));
    else
        memcpy(dS, dS0, DD * sizeof(real));
#undef TOKV
#undef TOKS
}

/* Accumulates dq, dk, dv [B, T, H, D] and dg, dbeta [B, T, H] from dout [B, T, H, D],
 * the forward's inputs and the state_save its cpu_gdn_forward call wrote; chunks are
 * walked last to first, each rebuilt from its saved start state. */
void cpu_gdn_backward(real *dq, real *dk, real *dv, real *dg, real *dbeta, const real *dout,
                      const real *q, const real *k, const real *v, const real *g,
                      const real *beta, const real *state_save, const int32_t *doc_start,
                      int B, int T, int H, int D, real scale)
{
    const size_t DD = (size_t)D * D;
    const int nchunk = (T + GDN_CHUNK - 1) / GDN_CHUNK;
#pragma omp parallel
    {
        gdn_chunk c;
        gdn_chunk_init(&c, D);
        real *dS = gdn_alloc(DD * sizeof(real));
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            const int b = bh / H, h = bh % H;
            memset(dS, 0, DD * sizeof(real));
            for (int ci = nchunk - 1; ci >= 0; ci--) {
                const int t0 = ci * GDN_CHUNK;
                const int L = T - t0 < GDN_CHUNK ? T - t0 : GDN_CHUNK;
                const real *S0 = state_save + ((size_t)bh * nchunk + ci) * DD;
                gdn_chunk_prepare(&c, S0, q, k, v, g, beta, doc_start, b, t0, L, h, T, H, scale);
                gdn_chunk_backward(&c, S0, dS, dq, dk, dv, dg, dbeta, dout, k, beta, b, t0, h,
                                   T, H, scale);
            }
        }
        free(dS);
        gdn_chunk_free(&c);
    }
}
