/* backend.h: the op table that the model graph is written against.
 *
 * The model graph (src/model*.c) decides which op runs when and on which buffers; a
 * backend decides how. The CPU backend (src/cpu/) is plain C + OpenMP in fp32 and is
 * the oracle for every other backend; the CUDA backend (kernels/) fills the same table.
 * Every pointer argument is a buffer of the backend's memory (host memory for the CPU
 * backend, device memory for CUDA) unless its comment says "host".
 *
 * Conventions shared by every op:
 *   - N = B*T tokens, row-major [N, C] activations (token-major, channel-minor).
 *   - A Linear weight is [out, in] and computes y = x W^T (MODEL.md).
 *   - Forward ops overwrite their outputs. Backward ops ACCUMULATE (+=) into every
 *     gradient they produce (input gradients and parameter gradients alike), so a
 *     tensor used twice (shared QK, residual branches, gradient accumulation) simply
 *     receives both contributions; callers zero what must start at zero. The "_set"
 *     forms (matmul_backward_set, gdn_backward_set, ...) instead write their input
 *     gradients, old contents unread, equal to the accumulating op on zeros; parameter
 *     gradients still accumulate. The model uses them where a buffer would otherwise
 *     be zeroed just to be added to once.
 *   - Ops are deterministic: the same inputs give bit-identical outputs run after run.
 *   - "save" buffers are written by the forward op and read by its backward.
 */
#ifndef DELTAMLA_BACKEND_H
#define DELTAMLA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

/* one Linear layer of matmul_forward_multi / matmul_backward_multi (see there) */
#define MATMUL_PARTS_MAX 6
typedef struct matmul_part {
    const float *w;  /* [out, in] */
    int out;
    float *y;        /* forward: [N, out] */
    const float *dy; /* backward: [N, out] */
    float *dw;       /* backward: [out, in], accumulated; NULL to skip */
} matmul_part;

typedef struct backend {
    const char *name; /* "cpu" or "cuda" */

    /* ---- memory ---- */
    void *(*alloc)(size_t bytes);                 /* zero-filled; aborts with a message on failure */
    void (*free)(void *p);
    void (*zero)(void *p, size_t bytes);
    void (*to_host)(void *host_dst, const void *src, size_t bytes);
    void (*from_host)(void *dst, const void *host_src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes);
    void (*sync)(void);                           /* wait for all queued work */
    /* Lanes: queues of work that run side by side, for ops on disjoint memory (CUDA
     * streams; the CPU runs every op at its call, in order). lanes_fork(n), 1 <= n <=
     * BACKEND_LANES, opens lanes 1..n-1, each starting after all work queued so far;
     * lane(i) sends the ops called next to lane i (0, the main lane, is where the
     * backend starts and stays otherwise); lanes_join() makes the main lane wait for
     * every lane and selects it again. Only the optimizer ops (adamw_update,
     * muon_update, muon_update_batch) may run on lanes other than 0: each lane has its
     * own scratch for them. Results do not depend on the lanes an op ran on. */
    void (*lanes_fork)(int n);
    void (*lane)(int i);
    void (*lanes_join)(void);
    size_t (*mem_peak)(void);                     /* most bytes held through alloc at once */
    /* Run fn(ctx), a sequence of this backend's ops on lane 0. A backend may record the
     * ops of one call and, for a later call with the same key (key_bytes bytes, compared
     * bitwise), replay the record instead of calling fn: so the key must fix every op,
     * pointer, shape and host scalar that fn issues, and fn must neither read device
     * results on the host, nor allocate, nor free. CUDA runs a key's first call directly,
     * captures its second as a CUDA graph (launched at once) and launches that graph for
     * later calls (capturing anew after device memory moved); the CPU calls fn. */
    void (*graph_run)(const void *key, size_t key_bytes, void (*fn)(void *ctx), void *ctx);
    /* host memory that from_host/to_host move fastest (page-locked on CUDA, plain on the
     * CPU); dies on failure */
    void *(*host_alloc)(size_t bytes);
    void (*host_free)(void *p);

    /* ---- elementwise ---- */
    /* y[i] += x[i] for i < n */
    void (*add_inplace)(float *y, const float *x, size_t n);
    /* x[i] *= s */
    void (*scale_inplace)(float *x, float s, size_t n);
    /* host: returns sum of x[i]^2 computed in double */
    double (*sumsq)(const float *x, size_t n);

    /* ---- embedding (tied with the head) ---- */
    /* out[N,C] = wte[tokens[i], :] ; tokens is int32 in backend memory */
    void (*embedding_forward)(float *out, const int32_t *tokens, const float *wte, int N, int C);
    /* dwte[tokens[i], :] += dout[i, :] */
    void (*embedding_backward)(float *dwte, const float *dout, const int32_t *tokens, int N, int C);

    /* ---- dense matmul ---- */
    /* y[N,out] = x[N,in] W[out,in]^T */
    void (*matmul_forward)(float *y, const float *x, const float *w, int N, int in, int out);
    /* y[N,out] = r[N,out] + x[N,in] W[out,in]^T: matmul_forward with a residual added by
     * the GEMM itself (the CUDA backend reads r as the GEMM's C), so the sum costs no extra
     * pass over [N,out]. Overwrites y. r may be y itself (then y += x W^T); otherwise r
     * must not overlap y. On the CPU the bits equal matmul_forward(y) followed by
     * add_inplace(y, r). */
    void (*matmul_forward_add)(float *y, const float *x, const float *w, const float *r, int N, int in, int out);
    /* dx[N,in] += dy W (skipped if dx NULL); dw[out,in] += dy^T x (skipped if dw NULL) */
    void (*matmul_backward)(float *dx, float *dw, const float *dy, const float *x, const float *w,
                            int N, int in, int out);
    /* matmul_backward, except that dx is written (dx = dy W), not added to, so the caller
     * need not zero it first (a pass over dx saved, and the GEMM does not read it); dw
     * still accumulates */
    void (*matmul_backward_set)(float *dx, float *dw, const float *dy, const float *x, const float *w,
                                int N, int in, int out);

    /* ---- several Linear layers on one input ----
     * The projections that read one normed activation x [N, in] (the Gated DeltaNet's
     * latent and gate projections, the MLA's query and key/value down projections), as
     * one op, so that a backend can share its work on x between them: CUDA rounds x to
     * bf16 once instead of once per GEMM, runs the narrow parts (the gates) together as
     * one GEMM, and sums the backward's dx in one GEMM over all the parts' outputs.
     * Part i: w [out, in]; forward: y [N, out] = x w^T (overwritten); backward: dy
     * [N, out] the gradient of y, dw [out, in] += dy^T x (skipped when dw is NULL).
     * 1 <= n <= MATMUL_PARTS_MAX. On the CPU the bits equal matmul_forward part by part,
     * and for the backward matmul_backward part by part in order (matmul_backward_set for
     * the first when dx_set). */
    void (*matmul_forward_multi)(const struct matmul_part *p, int n, const float *x, int N, int in);
    /* dx [N, in] = (dx_set ? 0 : dx) + sum_i dy_i w_i (dx's old contents, even NaN, are
     * not read when dx_set); dw_i += dy_i^T x */
    void (*matmul_backward_multi)(float *dx, int dx_set, const struct matmul_part *p, int n, const float *x, int N,
                                  int in);

    /* ---- norms ---- */
    /* RMSNorm, eps 1e-6: out = w * x / sqrt(mean(x^2) + eps); rstd[N] saved */
    void (*rmsnorm_forward)(float *out, float *rstd, const float *x, const float *w, int N, int C);
    void (*rmsnorm_backward)(float *dx, float *dw, const float *dout, const float *x, const float *w,
                             const float *rstd, int N, int C);
    /* LayerNorm, eps 1e-5: out = (x - mean) * rstd * w + b; mean[N], rstd[N] saved */
    void (*layernorm_forward)(float *out, float *mean, float *rstd, const float *x, const float *w,
                              const float *b, int N, int C);
    void (*layernorm_backward)(float *dx, float *dw, float *db, const float *dout, const float *x,
                               const float *w, const float *mean, const float *rstd, int N, int C);

    /* ---- SwiGLU ---- */
    /* in[N,2h] = [first | second]; silu_first = 1: out = silu(first) * second (experts),
     * silu_first = 0: out = first * silu(second) (dense MLP). out[N,h] */
    void (*swiglu_forward)(float *out, const float *in, int N, int h, int silu_first);
    void (*swiglu_backward)(float *din, const float *dout, const float *in, int N, int h, int silu_first);
    /* swiglu_backward, except that din is written, not added to */
    void (*swiglu_backward_set)(float *din, const float *dout, const float *in, int N, int h, int silu_first);

    /* ---- SwiGLU MLP, fused: the two projections around SwiGLU as one op ----
     * x [N, d]; w_gu [2h, d] (the gate/up projection: gu = x w_gu^T); w_down [d, h].
     * Forward: gu [N, 2h] = x w_gu^T; out [N, d] = resid + swiglu(gu) w_down^T
     * (overwritten; resid [N, d] required, and may be out itself, then out accumulates;
     * otherwise it must not overlap out). gu: N*2h and act: N*h floats of storage for
     * the saved pre-activation and activation, in the backend's own format, which only
     * mlp_backward reads: the CPU keeps gu and swiglu(gu) in fp32; CUDA keeps their bf16
     * roundings (act is the operand its GEMMs use) in the first half of each storage
     * wherever the down projection runs on bf16 copies, fp32 elsewhere, and there also
     * x's bf16 rounding in the second half of gu's storage where it fits (so its backward
     * multiplies x as the forward saw it: x must not change in between); the choice
     * depends on N, d, h alone, so a backward always reads what the forward of the same
     * shape wrote.
     * Backward (dout [N, d], the gradient of out): dact = dout w_down,
     * dgu = swiglu_backward(dact, gu); dw_down [d, h] += dout^T act; dw_gu [2h, d] +=
     * dgu^T x; dx [N, d] += dgu w_gu. scratch: mlp_scratch_floats(N, h) floats, whose
     * contents on entry do not matter (dact and dgu live there). Every pointer is
     * required. On the CPU the bits equal the op sequence the model used before: forward
     * matmul_forward, swiglu_forward, matmul_forward_add; backward matmul_backward_set
     * (dact), swiglu_backward_set (dgu), matmul_backward (dx). */
    void (*mlp_forward)(float *out, float *gu, float *act, const float *x, const float *w_gu, const float *w_down,
                        const float *resid, int N, int d, int h, int silu_first);
    void (*mlp_backward)(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                         const float *gu, const float *act, const float *w_gu, const float *w_down, float *scratch,
                         int N, int d, int h, int silu_first);
    /* mlp_backward, except that dx is written (dx = dgu w_gu), not added to, as
     * matmul_backward_set: dx's old contents (even NaN) are not read */
    void (*mlp_backward_set)(float *dx, float *dw_gu, float *dw_down, const float *dout, const float *x,
                             const float *gu, const float *act, const float *w_gu, const float *w_down,
                             float *scratch, int N, int d, int h, int silu_first);

    /* ---- Gated DeltaNet pieces ---- */
    /* Short causal depthwise conv, kernel 4, with bias: x,y [B,T,C], w [C,4] oldest tap
     * first, bias [C]: y[b,t,c] = bias[c] + sum_s w[c,s] * x[b,t-3+s,c] (zero before t=0).
     * doc_start: NULL, or int32 [B,T] with 1 where a document starts (history reset). */
    void (*conv_forward)(float *y, const float *x, const float *w, const float *bias,
                         const int32_t *doc_start, int B, int T, int C);
    void (*conv_backward)(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                          const float *w, const int32_t *doc_start, int B, int T, int C);
    /* conv_backward with dx written, not added to (dw, dbias still added to) */
    void (*conv_backward_set)(float *dx, float *dw, float *dbias, const float *dy, const float *x,
                              const float *w, const int32_t *doc_start, int B, int T, int C);
    /* g = logsigmoid(graw), beta = sigmoid(braw), all [n] */
    void (*gates_forward)(float *g, float *beta, const float *graw, const float *braw, size_t n);
    void (*gates_backward)(float *dgraw, float *dbraw, const float *dg, const float *dbeta,
                           const float *graw, const float *braw, size_t n);
    /* per row of length D (n rows): y = x / max(||x||_2, 1e-12); rnorm[n] = 1/max(..) saved */
    void (*l2norm_forward)(float *y, float *rnorm, const float *x, int n, int D);
    void (*l2norm_backward)(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D);
    /* l2norm_backward with dx written, not added to */
    void (*l2norm_backward_set)(float *dx, const float *dy, const float *x, const float *rnorm, int n, int D);
    /* The gated delta rule (MODEL.md section 3), chunked, per (b, h):
     * q,k,v,o [B,T,H,D]; g,beta [B,T,H]; q is multiplied by `scale` inside.
     * S <- exp(g_t) S; w = beta_t (v_t - S^T k_t); S <- S + k_t w^T; o_t = S^T (scale q_t).
     * state_save: gdn_state_floats(B,T,H,D) floats, written by the forward for the
     * backward: first [B, H, ceil(T/64), D, D], the state entering each chunk (after any
     * reset at the chunk's first token); then, from gdn_state_w_offset, the chunk's W
     * (the per-token w above) [B, H, ceil(T/64), 64, gdn_w_pitch(D)], zero in the rows past
     * the sequence end and in the pad columns D.. of each row.
     * doc_start: NULL or int32 [B,T], 1 where the state resets to 0 (before token t). */
    void (*gdn_forward)(float *o, float *state_save, const float *q, const float *k, const float *v,
                        const float *g, const float *beta, const int32_t *doc_start,
                        int B, int T, int H, int D, float scale);
    void (*gdn_backward)(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                         const float *q, const float *k, const float *v, const float *g,
                         const float *beta, const float *state_save, const int32_t *doc_start,
                         int B, int T, int H, int D, float scale);
    /* gdn_backward, except that dq, dk, dv, dg, dbeta are written, not added to (their old
     * contents, even NaN, are not read): the caller skips zeroing them first */
    void (*gdn_backward_set)(float *dq, float *dk, float *dv, float *dg, float *dbeta, const float *dout,
                             const float *q, const float *k, const float *v, const float *g,
                             const float *beta, const float *state_save, const int32_t *doc_start,
                             int B, int T, int H, int D, float scale);

    /* ---- MLA pieces ---- */
    /* Assemble per-head attention inputs from the projections (MODEL.md section 4):
     *   q  [N, H*(dn+dr)]  per head [q_nope | q_pe]
     *   kv [N, H*(dn+dv)]  per head [k_nope | v]
     *   kpe [N, dr] with row stride kpe_stride (it lives inside c = [c_kv | k_pe])
     * outputs qh, kh [N, H, dn+dr] (RoPE applied to the pe parts, k_pe broadcast to all
     * heads) and vh [N, H, dv]. pos: NULL (position = t within its row of T tokens) or
     * int32 [N] positions. Interleaved RoPE, theta given. */
    void (*mla_prep_forward)(float *qh, float *kh, float *vh, const float *q, const float *kv,
                             const float *kpe, int kpe_stride, const int32_t *pos,
                             int B, int T, int H, int dn, int dr, int dv, float theta);
    void (*mla_prep_backward)(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                              const float *dkh, const float *dvh, const int32_t *pos,
                              int B, int T, int H, int dn, int dr, int dv, float theta);
    /* mla_prep_backward with dq, dkv and dkpe's dr columns per row written, not added to
     * (the rest of each kpe_stride row untouched) */
    void (*mla_prep_backward_set)(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                  const float *dkh, const float *dvh, const int32_t *pos,
                                  int B, int T, int H, int dn, int dr, int dv, float theta);
    /* Causal softmax attention per (b, h): q,k [B,T,H,Dk], v [B,T,H,Dv], out [B,T,H,Dv],
     * lse [B,H,T] saved (log-sum-exp of the scaled scores of each query row).
     * doc_id: NULL or int32 [B,T]: query t sees key s only if s <= t and doc_id equal. */
    void (*attention_forward)(float *out, float *lse, const float *q, const float *k, const float *v,
                              const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale);
    void (*attention_backward)(float *dq, float *dk, float *dv, const float *dout, const float *out,
                               const float *lse, const float *q, const float *k, const float *v,
                               const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale);
    /* attention_backward, except that dq, dk, dv are written, not added to (their old
     * contents, even NaN, are not read): the caller skips zeroing them first */
    void (*attention_backward_set)(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                   const float *lse, const float *q, const float *k, const float *v,
                                   const int32_t *doc_id, int B, int T, int H, int Dk, int Dv, float scale);

    /* ---- MLA attention, fused: mla_prep and causal attention as one op ----
     * Forward: qh, kh, vh = mla_prep_forward(q, kv, kpe, pos, theta); out, lse =
     * attention_forward(qh, kh, vh, doc_id, scale), all as in those ops (Dk = dn + dr,
     * Dv = dv). qh, kh and vh go to save (mla_attention_save_floats floats), in the
     * backend's own format, which only mla_attention_backward_set reads: the CPU keeps
     * them in fp32; CUDA keeps their bf16 roundings and out's, the operands of its
     * attention kernels, where cuDNN's attention runs (no doc_id), fp32 copies elsewhere.
     * The choice depends on the shape, doc_id and the attention kernel setting, so a
     * backward reads what the forward of the same call pattern wrote.
     * Backward: dqh, dkh, dvh = attention_backward_set(dout, out, lse, qh, kh, vh);
     * dq, dkv, dkpe = mla_prep_backward_set(dqh, dkh, dvh): written, not added to (dkpe:
     * its dr columns of each kpe_stride row, the rest untouched). scratch:
     * mla_attention_save_floats floats, contents on entry unread. On the CPU the bits
     * equal those op sequences; on CUDA too, since its attention rounds its operands to
     * bf16 either way. */
    void (*mla_attention_forward)(float *out, float *lse, float *save, const float *q, const float *kv,
                                  const float *kpe, int kpe_stride, const int32_t *pos, const int32_t *doc_id,
                                  int B, int T, int H, int dn, int dr, int dv, float theta, float scale);
    void (*mla_attention_backward_set)(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dout,
                                       const float *out, const float *lse, const float *save, float *scratch,
                                       const int32_t *pos, const int32_t *doc_id, int B, int T, int H, int dn,
                                       int dr, int dv, float theta, float scale);

    /* ---- mixture of experts (MODEL.md section 5) ---- */
    /* Router: z [N,E] logits. aff = sigmoid(z); select top-k of aff + bias (ties: lower
     * expert index first); gate = aff_sel / (sum aff_sel + 1e-9).
     * Outputs: idx int32 [N,k] (in descending order of aff+bias), gate [N,k],
     * counts int32 [E] (tokens routed to each expert, overwritten),
     * zloss_out: one float in backend memory = zcoef * mean_i(logsumexp(z_i)^2). */
    void (*moe_route_forward)(int32_t *idx, float *gate, int32_t *counts, float *zloss_out,
                              const float *z, const float *bias, int N, int E, int k, float zcoef);
    /* dz[N,E] += d(gates)/dz^T dgate + d(zloss)/dz * dzloss (dzloss a host scalar) */
    void (*moe_route_backward)(float *dz, const float *dgate, float dzloss, const float *z,
                               const int32_t *idx, int N, int E, int k, float zcoef);
    /* y[i] += x[i] for n int32 values (routing loads summed over a step's forwards) */
    void (*add_i32)(int32_t *y, const int32_t *x, size_t n);
    /* The load-balancing update of the selection biases (MODEL.md section 5) of `rows`
     * MoE layers of E experts, after a step that routed `tokens` tokens k times each:
     * bias[r, e] -= rate * sign(loads[r, e] * E - tokens * k), compared exactly in
     * 64-bit integers (no rounding of the expected load). */
    void (*router_bias_update)(float *bias, const int32_t *loads, int rows, int E, int64_t tokens, int k, float rate);
    /* Routed SwiGLU experts, stacks as stored by the reference: w1 [E, in, 2h] (x @ w1,
     * columns [g | u]), w2 [E, h, out]. y[N,out] = sum_j gate[i,j] * expert_idx[i,j](x_i),
     * expert(x) = (silu(x w1_g) * (x w1_u)) w2. save: N*k*3h floats, per assignment (row
     * i*k + j) [g | u | silu(g) u] on the CPU; CUDA writes only [g | u] and recomputes the
     * rest from them in the backward, which alone reads save. */
    void (*moe_experts_forward)(float *y, float *save, const float *x, const int32_t *idx,
                                const float *gate, const float *w1, const float *w2,
                                int N, int E, int k, int in, int h, int out);
    /* accumulates dx [N,in], dgate [N,k], dw1, dw2 */
    void (*moe_experts_backward)(float *dx, float *dgate, float *dw1, float *dw2, const float *dy,
                                 const float *save, const float *x, const int32_t *idx,
                                 const float *gate, const float *w1, const float *w2,
                                 int N, int E, int k, int in, int h, int out);

    /* ---- expert-parallel dispatch and combine ----
     * Tokens travel to the ranks that hold their experts in a send buffer grouped by
     * destination; pos int32 [N*k] maps assignment (i, j) (token i's j-th expert) to
     * its row of that buffer, and must be injective (no two assignments share a row).
     * width is the row length in floats (any value >= 1); N = 0 is a no-op.
     * Output rows must not overlap input rows. */
    /* dst[r, :] = src[rows[r], :] for r < n (overwrite); rows int32 [n], may repeat */
    void (*rows_gather)(float *dst, const float *src, const int32_t *rows, int n, int width);
    /* y[i, :] += sum_{j<k} g_ij vals[pos[i*k+j], :], the terms summed in the order
     * j = 0..k-1 and then added to y (ACCUMULATES, unlike other forward ops: zero y
     * first for the plain sum). g_ij = gate[i*k+j] (gate [N*k]), or 1 when gate is NULL.
     * y [N, width]; vals [rows, width] with rows > every pos. */
    void (*moe_combine_forward)(float *y, const float *vals, const int32_t *pos, const float *gate,
                                int N, int k, int width);
    /* The adjoint of moe_combine_forward. dvals[pos[i*k+j], :] = g_ij dy[i, :]: OVERWRITES
     * (unlike other backward ops: each row of dvals has one source), rows of dvals that
     * pos does not name are left as they were. dgate [N*k]: dgate[i*k+j] += dot(dy[i, :],
     * vals[pos[i*k+j], :]) unless dgate is NULL (it must be when gate is NULL, g = 1);
     * vals is read only for dgate. */
    void (*moe_combine_backward)(float *dvals, float *dgate, const float *dy, const float *vals,
                                 const int32_t *pos, const float *gate, int N, int k, int width);

    /* ---- tied head + cross-entropy, never storing [N,V] logits ---- */
    /* logits_i = h_i wte^T; loss[i] = lse_i - logits_i[target_i], or 0 where target = -100.
     * lse[N] saved. Returns nothing; loss [N] in backend memory. */
    void (*classifier_forward)(float *loss, float *lse, const float *h, const float *wte,
                               const int32_t *targets, int N, int V, int C);
    /* dlogits_i = dloss_scale * (softmax_i - onehot(target_i)) for valid targets, 0 else;
     * dh += dlogits wte, dwte += dlogits^T h */
    void (*classifier_backward)(float *dh, float *dwte, const float *h, const float *wte,
                                const int32_t *targets, const float *lse, float dloss_scale,
                                int N, int V, int C);
    /* classifier_forward, then classifier_backward with its lse, in one op, for a
     * training step that knows dloss_scale before the forward: loss and lse written, dh
     * and dwte added to. On the CPU the bits equal the two ops in turn; CUDA computes each
     * chunk of logits once instead of twice. */
    void (*classifier_forward_backward)(float *loss, float *lse, float *dh, float *dwte, const float *h,
                                        const float *wte, const int32_t *targets, float dloss_scale, int N, int V,
                                        int C);

    /* ---- optimizers (MODEL.md section 9) ---- */
    /* From this call on, adamw_update, muon_update and muon_update_batch read each
     * gradient element g as s g (the product rounded to fp32, as scale_inplace rounds it:
     * the same bits as scaling the gradients first). 1 at the start. The clipping of a
     * step sets it, on lane 0 before the update's lanes_fork, so that the gradients are
     * not rewritten; the gradient buffers themselves are left as they are. */
    void (*grad_scale)(float s);
    /* torch.optim.AdamW for one tensor; step is 1-based */
    void (*adamw_update)(float *p, const float *g, float *m, float *v, size_t n, float lr,
                         float beta1, float beta2, float eps, float wd, int step);
    /* torch.optim.Muon for one [rows, cols] matrix, nesterov, NS5 with (a,b,c) of MODEL.md,
     * eps 1e-7: buf <- mu buf + (1-mu) g; upd = NS5((1-mu) g + mu buf);
     * p *= 1 - lr wd; p -= lr sqrt(max(1, rows/cols)) upd.
     * work: muon_work_floats(rows, cols) floats of scratch. */
    void (*muon_update)(float *p, const float *g, float *buf, float *work, int rows, int cols,
                        float lr, float mu, float wd);
    /* muon_update for `count` (1 to MUON_BATCH_MAX) matrices of one shape [rows, cols] in
     * one call: the same math as `count` calls of muon_update, each matrix on its own
     * (its own norm). p, g, buf: host arrays of `count` backend pointers to distinct,
     * non-overlapping matrices. work: muon_batch_work_floats(count, rows, cols) floats of
     * scratch. The CUDA backend runs the Newton-Schulz GEMMs of the batch as batched
     * GEMMs, so its bits may differ from muon_update's (not from run to run). */
    void (*muon_update_batch)(float *const *p, const float *const *g, float *const *buf, float *work,
                              int count, int rows, int cols, float lr, float mu, float wd);
} backend;

/* floats of state_save for gdn_forward: per (b, h, chunk) its D x D start state and its
 * 64 rows of W (layout at gdn_forward) */
size_t gdn_state_floats(int B, int T, int H, int D);
/* where the W rows start in state_save, in floats, and their row length: D rounded up to
 * a multiple of 4, so that every row starts 16-byte aligned (for the CUDA kernels' copies) */
size_t gdn_state_w_offset(int B, int T, int H, int D);
int gdn_w_pitch(int D);
/* scratch floats mlp_backward needs for N rows of hidden width h: dact [N, h] in fp32,
 * then, from the next multiple of 64 floats (256 bytes), dgu [N, 2h] in fp32 (the CPU)
 * or bf16 (CUDA's bf16 path) */
size_t mlp_scratch_floats(int N, int h);
/* where dgu starts in that scratch, in floats from its start (both backends' layout) */
size_t mlp_scratch_dgu_offset(int N, int h);
/* floats of save (and of scratch) for mla_attention_forward/backward_set: qh, kh
 * [N, H, dn + dr] and vh [N, H, dv] in fp32, N = B*T, and 256 more (room for a backend
 * to align its own layout) */
size_t mla_attention_save_floats(int N, int H, int dn, int dr, int dv);
/* scratch floats muon_update needs for a rows x cols matrix */
size_t muon_work_floats(int rows, int cols);
/* the most matrices one muon_update_batch call takes */
#define MUON_BATCH_MAX 128
/* scratch floats muon_update_batch needs for count matrices of rows x cols: count times
 * muon_work_floats with each piece rounded up to 64 floats (256-byte aligned matrices
 * for the batched GEMMs) */
size_t muon_batch_work_floats(int count, int rows, int cols);

#define GDN_CHUNK 64
/* the most lanes lanes_fork opens */
#define BACKEND_LANES 4

/* The CPU backend (always present). */
const backend *backend_cpu(void);

#ifdef DELTAMLA_HAVE_CUDA
/* The CUDA backend on GPU `device` (of those visible); dies with one line if there is
 * none. Built only when nvcc is found. */
const backend *backend_cuda(int device);
/* number of visible CUDA GPUs (0 without a driver) */
int cuda_device_count(void);
#endif

#endif
