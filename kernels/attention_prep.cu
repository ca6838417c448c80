/* attention_prep.cu: the CUDA twin of MLA's per-head assembly in src/cpu/cpu_mla.c: the
 * queries, keys and values of every head with interleaved RoPE (mla_prep_*), forward and
 * backward.
 *
 * mla_prep is exact data movement plus a rotation computed in double, so it matches the
 * CPU to fp32 rounding (tolerance 1e-5).
 *
 * RoPE angles. The angle of pair j at position p is p * theta^(-2j/dr), up to 8191 rad
 * at T = 8192. In fp32 the angle alone carries an absolute error of half an ulp of 8192,
 * 5e-4 rad, and sinf/cosf turn that into a relative error of 5e-4 in the output, fifty
 * times the tolerance. So the angle, its cos and sin, and the rotation are computed in
 * double exactly as the CPU does (pow, sincos: both correctly rounded to about 1 ulp of
 * double), once per (token, pair) in shared memory and reused by every head; only the
 * final value is rounded to float. The double work is dr/2 sincos per token, negligible.
 *
 * The fused MLA attention (mla_attention_*, backend.h) runs prep and attention as one op.
 * Where cuDNN's attention runs both directions (no document mask), the forward's prep
 * writes the bf16 roundings of qh, kh, vh straight into the op's save, cuDNN reads them
 * there and leaves out's bf16 copy beside them, and the backward's prep reads cuDNN's
 * bf16 gradients as they are. The separate ops instead write fp32 that the attention then
 * rounds to bf16 copies, and read fp32 gradients converted from bf16: four to seven
 * extra passes over [N, H, 128..192] per direction, 0.75 ms per layer at moe-1b's shapes.
 * The values are the same: each bf16 here is the rounding of the fp32 value the separate
 * ops would store (float first, then bf16, the order cuda_to_bf16 sees them in), and a
 * bf16 read as float is exact. Elsewhere (document masks, DELTAMLA_ATTENTION=own, shapes
 * cuDNN refuses) the fused op is the two separate ops with fp32 in save.
 */
#include <math.h>

#include "attention_internal.cuh"

#define PREP_THREADS 128

/* ------------------------------------------------------------------ mla_prep ---- */

/* cos (rot[j]) and sin (rot[half + j]) of pair j's angle at token i's position, in double
 * as the CPU computes them. */
static __device__ void rope_table(double *rot, const int32_t *pos, int i, int T, int dr, double theta)
{
    const int half = dr / 2;
    const double p = pos ? (double)pos[i] : (double)(i % T);
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s, c;
        sincos(p * pow(theta, -2.0 * j / dr), &s, &c);
        rot[j] = c;
        rot[half + j] = s;
    }
    __syncthreads();
}

/* The RoPE rotation's a c - b s and a c + b s in double, rounded to float: each product
 * and the sum rounded on their own (no fused multiply-add), the CPU's arithmetic, so
 * that every kernel inlining them gives the same bits whatever the compiler would
 * contract */
static __device__ __forceinline__ float rot_minus(double a, double b, double c, double s)
{
    return (float)__dsub_rn(__dmul_rn(a, c), __dmul_rn(b, s));
}
static __device__ __forceinline__ float rot_plus(double a, double b, double c, double s)
{
    return (float)__dadd_rn(__dmul_rn(a, c), __dmul_rn(b, s));
}

/* Each row array of the prep kernels is fp32 (f) or, with bf set, bf16 (b), as in
 * elementwise.cu's SwiGLU kernels (there the non-NULL pointer says which). A bf16
 * element is the rounding of the fp32 value; read back, it is exact. Every kernel is two
 * thin entry points over one inlined body that pass bf as a constant, so the choice
 * folds away. */
static __device__ __forceinline__ void prep_put(float *f, bf16 *b, int bf, int e, float x)
{
    if (bf) b[e] = __float2bfloat16_rn(x);
    else f[e] = x;
}
static __device__ __forceinline__ float prep_get(const float *f, const bf16 *b, int bf, int e)
{
    return bf ? __bfloat162float(b[e]) : f[e];
}
/* two adjacent elements at an even offset (8 bytes in fp32, 4 in bf16, aligned) */
static __device__ __forceinline__ void prep_put2(float *f, bf16 *b, int bf, int e, float x, float y)
{
    if (bf) *(__nv_bfloat162 *)(b + e) = __floats2bfloat162_rn(x, y);
    else *(float2 *)(f + e) = make_float2(x, y);
}
static __device__ __forceinline__ float2 prep_get2(const float *f, const bf16 *b, int bf, int e)
{
    return bf ? __bfloat1622float2(*(const __nv_bfloat162 *)(b + e)) : *(const float2 *)(f + e);
}

/* One block per token i: qh, kh [N, H, dn+dr], vh [N, H, dv] in fp32 (qh, kh, vh) or,
 * with bf, bf16 (qb, kb, vb); shared memory dr doubles. */
static __device__ __forceinline__ void prep_fwd(float *qh, float *kh, float *vh, bf16 *qb, bf16 *kb, bf16 *vb, int bf,
                                                const float *q, const float *kv, const float *kpe, int kpe_stride,
                                                const int32_t *pos, int T, int H, int dn, int dr, int dv, double theta,
                                                int pairs)
{
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkv = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    const float *qi = q + (size_t)i * H * dk, *kvi = kv + (size_t)i * H * dkv;
    const float *kpi = kpe + (size_t)i * kpe_stride;
    /* this token's output rows, in the one format in use (bf is a constant: no NULL arithmetic) */
    const size_t ok = (size_t)i * H * dk, ov = (size_t)i * H * dv;
    float *qhi = bf ? NULL : qh + ok, *khi = bf ? NULL : kh + ok, *vhi = bf ? NULL : vh + ov;
    bf16 *qbi = bf ? qb + ok : NULL, *kbi = bf ? kb + ok : NULL, *vbi = bf ? vb + ov : NULL;
    if (pairs) { /* dn, dv even, rows aligned: two adjacent columns a thread, a RoPE pair at once */
        for (int e = 2 * threadIdx.x; e < H * dk; e += 2 * blockDim.x) {
            const int h = e / dk, col = e - h * dk;
            const float2 x = *(const float2 *)(qi + e);
            if (col < dn) {
                const float2 kk = *(const float2 *)(kvi + h * dkv + col);
                prep_put2(qhi, qbi, bf, e, x.x, x.y);
                prep_put2(khi, kbi, bf, e, kk.x, kk.y);
            } else {
                const int j = (col - dn) >> 1;
                const double cs = rot[j], sn = rot[half + j], x0 = x.x, x1 = x.y;
                const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
                prep_put2(qhi, qbi, bf, e, rot_minus(x0, x1, cs, sn), rot_plus(x1, x0, cs, sn));
                prep_put2(khi, kbi, bf, e, rot_minus(k0, k1, cs, sn), rot_plus(k1, k0, cs, sn));
            }
        }
        for (int e = 2 * threadIdx.x; e < H * dv; e += 2 * blockDim.x) {
            const int h = e / dv, col = e - h * dv;
            const float2 v = *(const float2 *)(kvi + h * dkv + dn + col);
            prep_put2(vhi, vbi, bf, e, v.x, v.y);
        }
        return;
    }
    for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
        const int h = e / dk, col = e - h * dk;
        if (col < dn) {
            prep_put(qhi, qbi, bf, e, qi[e]);
            prep_put(khi, kbi, bf, e, kvi[h * dkv + col]);
        } else {
            const int j = (col - dn) >> 1, odd = (col - dn) & 1;
            const double cs = rot[j], sn = rot[half + j];
            const double x0 = qi[h * dk + dn + 2 * j], x1 = qi[h * dk + dn + 2 * j + 1];
            const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
            prep_put(qhi, qbi, bf, e, odd ? rot_plus(x1, x0, cs, sn) : rot_minus(x0, x1, cs, sn));
            prep_put(khi, kbi, bf, e, odd ? rot_plus(k1, k0, cs, sn) : rot_minus(k0, k1, cs, sn));
        }
    }
    for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
        const int h = e / dv, col = e - h * dv;
        prep_put(vhi, vbi, bf, e, kvi[h * dkv + dn + col]);
    }
}

static __global__ void prep_fwd_kernel(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                       const float *kpe, int kpe_stride, const int32_t *pos, int T, int H, int dn,
                                       int dr, int dv, double theta, int pairs)
{
    prep_fwd(qh, kh, vh, NULL, NULL, NULL, 0, q, kv, kpe, kpe_stride, pos, T, H, dn, dr, dv, theta, pairs);
}

static __global__ void prep_fwd_bf16_kernel(bf16 *qb, bf16 *kb, bf16 *vb, const float *q, const float *kv,
                                            const float *kpe, int kpe_stride, const int32_t *pos, int T, int H,
                                            int dn, int dr, int dv, double theta, int pairs)
{
    prep_fwd(NULL, NULL, NULL, qb, kb, vb, 1, q, kv, kpe, kpe_stride, pos, T, H, dn, dr, dv, theta, pairs);
}

/* One block per token i: the adjoint of prep_fwd, accumulating; the gradients in fp32
 * (gq, gk, gv) or, with bf, bf16 (gqb, gkb, gvb). dkpe sums the heads in order 0..H-1 in
 * double, one thread per pair. */
static __device__ __forceinline__ void prep_bwd(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *gq,
                                                const float *gk, const float *gv, const bf16 *gqb, const bf16 *gkb,
                                                const bf16 *gvb, int bf, const int32_t *pos, int T, int H, int dn,
                                                int dr, int dv, double theta, int set, int pairs)
{
    /* each output element is touched once: added to, or with set written (old unread) */
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkvw = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    float *dqi = dq + (size_t)i * H * dk, *dkvi = dkv + (size_t)i * H * dkvw;
    float *dkpi = dkpe + (size_t)i * kpe_stride;
    /* this token's gradient rows, in the one format in use (bf is a constant) */
    const size_t ok = (size_t)i * H * dk, ov = (size_t)i * H * dv;
    const float *gqi = bf ? NULL : gq + ok, *gki = bf ? NULL : gk + ok, *gvi = bf ? NULL : gv + ov;
    const bf16 *gqbi = bf ? gqb + ok : NULL, *gkbi = bf ? gkb + ok : NULL, *gvbi = bf ? gvb + ov : NULL;
    if (pairs) { /* as in prep_fwd: two adjacent columns a thread */
        for (int e = 2 * threadIdx.x; e < H * dk; e += 2 * blockDim.x) {
            const int h = e / dk, col = e - h * dk;
            const float2 y = prep_get2(gqi, gqbi, bf, e);
            const float2 z = set ? make_float2(0.0f, 0.0f) : *(const float2 *)(dqi + e);
            if (col < dn) {
                float *o = dkvi + h * dkvw + col;
                const float2 gkv = prep_get2(gki, gkbi, bf, e);
                const float2 w = set ? make_float2(0.0f, 0.0f) : *(const float2 *)o;
                *(float2 *)(dqi + e) = make_float2(z.x + y.x, z.y + y.y);
                *(float2 *)o = make_float2(w.x + gkv.x, w.y + gkv.y);
            } else {
                const int j = (col - dn) >> 1;
                const double cs = rot[j], sn = rot[half + j], y0 = y.x, y1 = y.y;
                *(float2 *)(dqi + e) =
                    make_float2(z.x + rot_plus(y0, y1, cs, sn), z.y + rot_minus(y1, y0, cs, sn));
            }
        }
        for (int e = 2 * threadIdx.x; e < H * dv; e += 2 * blockDim.x) {
            const int h = e / dv, col = e - h * dv;
            float *o = dkvi + h * dkvw + dn + col;
            const float2 g = prep_get2(gvi, gvbi, bf, e), w = set ? make_float2(0.0f, 0.0f) : *(const float2 *)o;
            *(float2 *)o = make_float2(w.x + g.x, w.y + g.y);
        }
    } else {
        for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
            const int h = e / dk, col = e - h * dk;
            if (col < dn) {
                dqi[e] = (set ? 0.0f : dqi[e]) + prep_get(gqi, gqbi, bf, e);
                dkvi[h * dkvw + col] = (set ? 0.0f : dkvi[h * dkvw + col]) + prep_get(gki, gkbi, bf, e);
            } else {
                const int j = (col - dn) >> 1, odd = (col - dn) & 1;
                const double cs = rot[j], sn = rot[half + j];
                const int r = h * dk + dn + 2 * j;
                const double y0 = prep_get(gqi, gqbi, bf, r), y1 = prep_get(gqi, gqbi, bf, r + 1);
                dqi[e] = (set ? 0.0f : dqi[e]) + (odd ? rot_minus(y1, y0, cs, sn) : rot_plus(y0, y1, cs, sn));
            }
        }
        for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
            const int h = e / dv, col = e - h * dv;
            dkvi[h * dkvw + dn + col] = (set ? 0.0f : dkvi[h * dkvw + dn + col]) + prep_get(gvi, gvbi, bf, e);
        }
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s0 = 0, s1 = 0;
        for (int h = 0; h < H; h++) {
            s0 += prep_get(gki, gkbi, bf, h * dk + dn + 2 * j);
            s1 += prep_get(gki, gkbi, bf, h * dk + dn + 2 * j + 1);
        }
        const double cs = rot[j], sn = rot[half + j];
        dkpi[2 * j] = (set ? 0.0f : dkpi[2 * j]) + rot_plus(s0, s1, cs, sn);
        dkpi[2 * j + 1] = (set ? 0.0f : dkpi[2 * j + 1]) + rot_minus(s1, s0, cs, sn);
    }
}

static __global__ void prep_bwd_kernel(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *gq,
                                       const float *gk, const float *gv, const int32_t *pos, int T, int H, int dn,
                                       int dr, int dv, double theta, int set, int pairs)
{
    prep_bwd(dq, dkv, dkpe, kpe_stride, gq, gk, gv, NULL, NULL, NULL, 0, pos, T, H, dn, dr, dv, theta, set, pairs);
}

static __global__ void prep_bwd_bf16_kernel(float *dq, float *dkv, float *dkpe, int kpe_stride, const bf16 *gqb,
                                            const bf16 *gkb, const bf16 *gvb, const int32_t *pos, int T, int H,
                                            int dn, int dr, int dv, double theta, int set, int pairs)
{
    prep_bwd(dq, dkv, dkpe, kpe_stride, NULL, NULL, NULL, gqb, gkb, gvb, 1, pos, T, H, dn, dr, dv, theta, set, pairs);
}

static void prep_check(const char *who, int B, int T, int H, int dn, int dr, int dv)
{
    if (B < 1 || T < 1 || H < 1 || dn < 0 || dv < 1 || dr < 2 || dr % 2 != 0)
        die("%s: bad shape B=%d T=%d H=%d dn=%d dr=%d dv=%d (dr must be even and >= 2)", who, B, T, H, dn, dr, dv);
}

/* whether the kernels may take two adjacent columns at once: dn and dv even (so no pair
 * straddles the nope/rope or key/value boundary) and every row array aligned to two of
 * its elements: the fp32 arrays f, and the arrays t of elements of tsize bytes */
static int prep_pairs(int dn, int dv, const float *f0, const float *f1, const void *t0, const void *t1,
                      const void *t2, size_t tsize)
{
    const void *fp[2] = {f0, f1}, *tp[3] = {t0, t1, t2};
    int ok = dn % 2 == 0 && dv % 2 == 0;
    for (int i = 0; i < 2; i++) ok &= (uintptr_t)fp[i] % (2 * sizeof(float)) == 0;
    for (int i = 0; i < 3; i++) ok &= (uintptr_t)tp[i] % (2 * tsize) == 0;
    return ok;
}

/* prep's forward into fp32 (qh, kh, vh) or bf16 (qb, kb, vb: the others NULL) */
static void mla_prep_forward(float *qh, float *kh, float *vh, bf16 *qb, bf16 *kb, bf16 *vb, const float *q,
                             const float *kv, const float *kpe, int kpe_stride, const int32_t *pos, int B, int T,
                             int H, int dn, int dr, int dv, float theta)
{
    prep_check("cuda_mla_prep_forward", B, T, H, dn, dr, dv);
    const size_t smem = dr * sizeof(double);
    if (qb) {
        const int pairs = prep_pairs(dn, dv, q, kv, qb, kb, vb, sizeof(bf16));
        prep_fwd_bf16_kernel<<<B * T, PREP_THREADS, smem, cuda_stream()>>>(qb, kb, vb, q, kv, kpe, kpe_stride, pos,
                                                                          T, H, dn, dr, dv, (double)theta, pairs);
    } else {
        const int pairs = prep_pairs(dn, dv, q, kv, qh, kh, vh, sizeof(float));
        prep_fwd_kernel<<<B * T, PREP_THREADS, smem, cuda_stream()>>>(qh, kh, vh, q, kv, kpe, kpe_stride, pos, T, H,
                                                                     dn, dr, dv, (double)theta, pairs);
    }
    LAUNCH_CHECK();
}

extern "C" void cuda_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                      const float *kpe, int kpe_stride, const int32_t *pos,
                                      int B, int T, int H, int dn, int dr, int dv, float theta)
{
    mla_prep_forward(qh, kh, vh, NULL, NULL, NULL, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
}

/* prep's backward from fp32 gradients (gq, gk, gv) or bf16 ones (gqb, gkb, gvb: the
 * others NULL) */
static void mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *gq, const float *gk,
                              const float *gv, const bf16 *gqb, const bf16 *gkb, const bf16 *gvb,
                              const int32_t *pos, int B, int T, int H, int dn, int dr, int dv, float theta, int set)
{
    prep_check("cuda_mla_prep_backward", B, T, H, dn, dr, dv);
    const size_t smem = dr * sizeof(double);
    if (gqb) {
        const int pairs = prep_pairs(dn, dv, dq, dkv, gqb, gkb, gvb, sizeof(bf16));
        prep_bwd_bf16_kernel<<<B * T, PREP_THREADS, smem, cuda_stream()>>>(
            dq, dkv, dkpe, kpe_stride, gqb, gkb, gvb, pos, T, H, dn, dr, dv, (double)theta, set, pairs);
    } else {
        const int pairs = prep_pairs(dn, dv, dq, dkv, gq, gk, gv, sizeof(float));
        prep_bwd_kernel<<<B * T, PREP_THREADS, smem, cuda_stream()>>>(dq, dkv, dkpe, kpe_stride, gq, gk, gv, pos, T,
                                                                     H, dn, dr, dv, (double)theta, set, pairs);
    }
    LAUNCH_CHECK();
}

extern "C" void cuda_mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                       const float *dkh, const float *dvh, const int32_t *pos,
                                       int B, int T, int H, int dn, int dr, int dv, float theta)
{
    mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, NULL, NULL, NULL, pos, B, T, H, dn, dr, dv, theta,
                      0);
}

/* as cuda_mla_prep_backward, but dq, dkv and dkpe's dr columns are written, not added to */
extern "C" void cuda_mla_prep_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                           const float *dkh, const float *dvh, const int32_t *pos,
                                           int B, int T, int H, int dn, int dr, int dv, float theta)
{
    mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, NULL, NULL, NULL, pos, B, T, H, dn, dr, dv, theta,
                      1);
}

/* ------------------------------------------------------ fused MLA attention ---- */

#ifdef DELTAMLA_HAVE_CUDNN
/* The bf16 layout of the fused op's save (and of its backward's scratch): four arrays
 * of B*T*H rows, widths dk, dk, dv, dv (save: qh, kh, vh, out; scratch: dqh, dkh, dvh,
 * dout), each from a 256-byte boundary. mla_attention_save_floats leaves room for it. */
static void bf16_parts(bf16 **part, void *base, size_t rows, int dk, int dv)
{
    const size_t n[4] = {rows * dk, rows * dk, rows * dv, rows * dv};
    char *at = (char *)base;
    for (int i = 0; i < 4; i++) {
        part[i] = (bf16 *)at;
        at += (n[i] * sizeof(bf16) + 255) & ~(size_t)255;
    }
}

/* the bf16 form runs: no document mask and cuDNN takes both directions of this shape */
static int fused_bf16(const int32_t *doc_id, int B, int T, int H, int dk, int dv, float scale)
{
    return !doc_id && attn_cudnn_bf16_ok(B, T, H, dk, dv, scale);
}
#endif

extern "C" void cuda_mla_attention_forward(float *out, float *lse, float *save, const float *q, const float *kv,
                                           const float *kpe, int kpe_stride, const int32_t *pos,
                                           const int32_t *doc_id, int B, int T, int H, int dn, int dr, int dv,
                                           float theta, float scale)
{
    const int dk = dn + dr;
    const size_t rows = (size_t)B * T * H;
#ifdef DELTAMLA_HAVE_CUDNN
    if (fused_bf16(doc_id, B, T, H, dk, dv, scale)) {
        bf16 *p[4];
        bf16_parts(p, save, rows, dk, dv);
        mla_prep_forward(NULL, NULL, NULL, p[0], p[1], p[2], q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
        fatal_check(attn_cudnn_forward_bf16(p[3], lse, p[0], p[1], p[2], B, T, H, dk, dv, scale));
        attn_from_bf16(out, p[3], rows * dv, 0);
        return;
    }
#endif
    float *qh = save, *kh = save + rows * dk, *vh = save + 2 * rows * dk;
    cuda_mla_prep_forward(qh, kh, vh, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
    cuda_attention_forward(out, lse, qh, kh, vh, doc_id, B, T, H, dk, dv, scale);
}

extern "C" void cuda_mla_attention_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dout,
                                                const float *out, const float *lse, const float *save,
                                                float *scratch, const int32_t *pos, const int32_t *doc_id, int B,
                                                int T, int H, int dn, int dr, int dv, float theta, float scale)
{
    const int dk = dn + dr;
    const size_t rows = (size_t)B * T * H;
#ifdef DELTAMLA_HAVE_CUDNN
    if (fused_bf16(doc_id, B, T, H, dk, dv, scale)) {
        bf16 *p[4], *g[4];
        bf16_parts(p, (void *)save, rows, dk, dv);
        bf16_parts(g, scratch, rows, dk, dv);
        cuda_to_bf16(g[3], dout, rows * dv);
        fatal_check(attn_cudnn_backward_bf16(g[0], g[1], g[2], g[3], p[3], lse, p[0], p[1], p[2], B, T, H, dk, dv,
                                             scale));
        mla_prep_backward(dq, dkv, dkpe, kpe_stride, NULL, NULL, NULL, g[0], g[1], g[2], pos, B, T, H, dn, dr, dv,
                          theta, 1);
        return;
    }
#endif
    const float *qh = save, *kh = save + rows * dk, *vh = save + 2 * rows * dk;
    float *dqh = scratch, *dkh = scratch + rows * dk, *dvh = scratch + 2 * rows * dk;
    cuda_attention_backward_set(dqh, dkh, dvh, dout, out, lse, qh, kh, vh, doc_id, B, T, H, dk, dv, scale);
    mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, NULL, NULL, NULL, pos, B, T, H, dn, dr, dv, theta, 1);
}
