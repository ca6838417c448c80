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

/* a prep output element: fp32, or the bf16 rounding of that fp32 value */
static __device__ __forceinline__ void prep_put(float *p, float x) { *p = x; }
static __device__ __forceinline__ void prep_put(bf16 *p, float x) { *p = __float2bfloat16_rn(x); }
static __device__ __forceinline__ float prep_get(const float *p) { return *p; }
static __device__ __forceinline__ float prep_get(const bf16 *p) { return __bfloat162float(*p); }
/* two adjacent elements at an even offset (8 bytes in fp32, 4 in bf16, aligned) */
static __device__ __forceinline__ void prep_put2(float *p, float x, float y) { *(float2 *)p = make_float2(x, y); }
static __device__ __forceinline__ void prep_put2(bf16 *p, float x, float y)
{
    *(__nv_bfloat162 *)p = __floats2bfloat162_rn(x, y);
}
static __device__ __forceinline__ float2 prep_get2(const float *p) { return *(const float2 *)p; }
static __device__ __forceinline__ float2 prep_get2(const bf16 *p)
{
    return __bfloat1622float2(*(const __nv_bfloat162 *)p);
}

/* One block per token i: qh, kh [N, H, dn+dr], vh [N, H, dv] in fp32 or bf16 (OutT);
 * shared memory dr doubles. */
template <typename OutT>
static __global__ void prep_fwd_kernel(OutT *qh, OutT *kh, OutT *vh, const float *q, const float *kv,
                                       const float *kpe, int kpe_stride, const int32_t *pos, int T, int H,
                                       int dn, int dr, int dv, double theta, int pairs)
{
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkv = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    const float *qi = q + (size_t)i * H * dk, *kvi = kv + (size_t)i * H * dkv;
    const float *kpi = kpe + (size_t)i * kpe_stride;
    OutT *qhi = qh + (size_t)i * H * dk, *khi = kh + (size_t)i * H * dk, *vhi = vh + (size_t)i * H * dv;
    if (pairs) { /* dn, dv even, rows aligned: two adjacent columns a thread, a RoPE pair at once */
        for (int e = 2 * threadIdx.x; e < H * dk; e += 2 * blockDim.x) {
            const int h = e / dk, col = e - h * dk;
            const float2 x = prep_get2(qi + e);
            if (col < dn) {
                const float2 kk = prep_get2(kvi + h * dkv + col);
                prep_put2(qhi + e, x.x, x.y);
                prep_put2(khi + e, kk.x, kk.y);
            } else {
                const int j = (col - dn) >> 1;
                const double cs = rot[j], sn = rot[half + j], x0 = x.x, x1 = x.y;
                const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
                prep_put2(qhi + e, (float)(x0 * cs - x1 * sn), (float)(x1 * cs + x0 * sn));
                prep_put2(khi + e, (float)(k0 * cs - k1 * sn), (float)(k1 * cs + k0 * sn));
            }
        }
        for (int e = 2 * threadIdx.x; e < H * dv; e += 2 * blockDim.x) {
            const int h = e / dv, col = e - h * dv;
            const float2 v = prep_get2(kvi + h * dkv + dn + col);
            prep_put2(vhi + e, v.x, v.y);
        }
        return;
    }
    for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
        const int h = e / dk, col = e - h * dk;
        if (col < dn) {
            prep_put(qhi + e, qi[e]);
            prep_put(khi + e, kvi[h * dkv + col]);
        } else {
            const int j = (col - dn) >> 1, odd = (col - dn) & 1;
            const double cs = rot[j], sn = rot[half + j];
            const double x0 = qi[h * dk + dn + 2 * j], x1 = qi[h * dk + dn + 2 * j + 1];
            const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
            prep_put(qhi + e, (float)(odd ? x1 * cs + x0 * sn : x0 * cs - x1 * sn));
            prep_put(khi + e, (float)(odd ? k1 * cs + k0 * sn : k0 * cs - k1 * sn));
        }
    }
    for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
        const int h = e / dv, col = e - h * dv;
        prep_put(vhi + e, kvi[h * dkv + dn + col]);
    }
}

/* One block per token i: the adjoint of prep_fwd_kernel, accumulating; the gradients
 * dqh, dkh, dvh in fp32 or bf16 (InT). dkpe sums the heads in order 0..H-1 in double,
 * one thread per pair. */
template <typename InT>
static __global__ void prep_bwd_kernel(float *dq, float *dkv, float *dkpe, int kpe_stride, const InT *dqh,
                                       const InT *dkh, const InT *dvh, const int32_t *pos, int T, int H,
                                       int dn, int dr, int dv, double theta, int set, int pairs)
{
    /* each output element is touched once: added to, or with set written (old unread) */
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkvw = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    float *dqi = dq + (size_t)i * H * dk, *dkvi = dkv + (size_t)i * H * dkvw;
    float *dkpi = dkpe + (size_t)i * kpe_stride;
    const InT *gq = dqh + (size_t)i * H * dk, *gk = dkh + (size_t)i * H * dk, *gv = dvh + (size_t)i * H * dv;
    if (pairs) { /* as in prep_fwd_kernel: two adjacent columns a thread */
        for (int e = 2 * threadIdx.x; e < H * dk; e += 2 * blockDim.x) {
            const int h = e / dk, col = e - h * dk;
            const float2 y = prep_get2(gq + e), z = set ? make_float2(0.0f, 0.0f) : *(const float2 *)(dqi + e);
            if (col < dn) {
                float *o = dkvi + h * dkvw + col;
                const float2 gkv = prep_get2(gk + e), w = set ? make_float2(0.0f, 0.0f) : *(const float2 *)o;
                *(float2 *)(dqi + e) = make_float2(z.x + y.x, z.y + y.y);
                *(float2 *)o = make_float2(w.x + gkv.x, w.y + gkv.y);
            } else {
                const int j = (col - dn) >> 1;
                const double cs = rot[j], sn = rot[half + j], y0 = y.x, y1 = y.y;
                *(float2 *)(dqi + e) =
                    make_float2(z.x + (float)(y0 * cs + y1 * sn), z.y + (float)(y1 * cs - y0 * sn));
            }
        }
        for (int e = 2 * threadIdx.x; e < H * dv; e += 2 * blockDim.x) {
            const int h = e / dv, col = e - h * dv;
            float *o = dkvi + h * dkvw + dn + col;
            const float2 g = prep_get2(gv + e), w = set ? make_float2(0.0f, 0.0f) : *(const float2 *)o;
            *(float2 *)o = make_float2(w.x + g.x, w.y + g.y);
        }
    } else {
        for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
            const int h = e / dk, col = e - h * dk;
            if (col < dn) {
                dqi[e] = (set ? 0.0f : dqi[e]) + prep_get(gq + e);
                dkvi[h * dkvw + col] = (set ? 0.0f : dkvi[h * dkvw + col]) + prep_get(gk + e);
            } else {
                const int j = (col - dn) >> 1, odd = (col - dn) & 1;
                const double cs = rot[j], sn = rot[half + j];
                const double y0 = prep_get(gq + h * dk + dn + 2 * j), y1 = prep_get(gq + h * dk + dn + 2 * j + 1);
                dqi[e] = (set ? 0.0f : dqi[e]) + (float)(odd ? y1 * cs - y0 * sn : y0 * cs + y1 * sn);
            }
        }
        for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
            const int h = e / dv, col = e - h * dv;
            dkvi[h * dkvw + dn + col] = (set ? 0.0f : dkvi[h * dkvw + dn + col]) + prep_get(gv + e);
        }
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s0 = 0, s1 = 0;
        for (int h = 0; h < H; h++) {
            s0 += prep_get(gk + h * dk + dn + 2 * j);
            s1 += prep_get(gk + h * dk + dn + 2 * j + 1);
        }
        const double cs = rot[j], sn = rot[half + j];
        dkpi[2 * j] = (set ? 0.0f : dkpi[2 * j]) + (float)(s0 * cs + s1 * sn);
        dkpi[2 * j + 1] = (set ? 0.0f : dkpi[2 * j + 1]) + (float)(s1 * cs - s0 * sn);
    }
}

static void prep_check(const char *who, int B, int T, int H, int dn, int dr, int dv)
{
    if (B < 1 || T < 1 || H < 1 || dn < 0 || dv < 1 || dr < 2 || dr % 2 != 0)
        die("%s: bad shape B=%d T=%d H=%d dn=%d dr=%d dv=%d (dr must be even and >= 2)", who, B, T, H, dn, dr, dv);
}

/* whether the kernels may take two adjacent columns at once: dn and dv even (so no pair
 * straddles the nope/rope or key/value boundary) and every row array's pointer aligned
 * to two of its elements (the fp32 arrays f, the fp32 or bf16 arrays t; NULL skipped) */
template <typename T>
static int prep_pairs(int dn, int dv, const float *f0, const float *f1, const T *t0, const T *t1, const T *t2)
{
    const void *fp[2] = {f0, f1};
    const void *tp[3] = {t0, t1, t2};
    int ok = dn % 2 == 0 && dv % 2 == 0;
    for (int i = 0; i < 2; i++) ok &= (uintptr_t)fp[i] % (2 * sizeof(float)) == 0;
    for (int i = 0; i < 3; i++) ok &= (uintptr_t)tp[i] % (2 * sizeof(T)) == 0;
    return ok;
}

template <typename OutT>
static void mla_prep_forward(OutT *qh, OutT *kh, OutT *vh, const float *q, const float *kv, const float *kpe,
                             int kpe_stride, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv,
                             float theta)
{
    prep_check("cuda_mla_prep_forward", B, T, H, dn, dr, dv);
    const int pairs = prep_pairs(dn, dv, q, kv, qh, kh, vh);
    prep_fwd_kernel<OutT><<<B * T, PREP_THREADS, dr * sizeof(double), cuda_stream()>>>(
        qh, kh, vh, q, kv, kpe, kpe_stride, pos, T, H, dn, dr, dv, (double)theta, pairs);
    LAUNCH_CHECK();
}

extern "C" void cuda_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                      const float *kpe, int kpe_stride, const int32_t *pos,
                                      int B, int T, int H, int dn, int dr, int dv, float theta)
{
    mla_prep_forward<float>(qh, kh, vh, q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
}

template <typename InT>
static void mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const InT *dqh, const InT *dkh,
                              const InT *dvh, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv,
                              float theta, int set)
{
    prep_check("cuda_mla_prep_backward", B, T, H, dn, dr, dv);
    const int pairs = prep_pairs(dn, dv, dq, dkv, dqh, dkh, dvh);
    prep_bwd_kernel<InT><<<B * T, PREP_THREADS, dr * sizeof(double), cuda_stream()>>>(
        dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, T, H, dn, dr, dv, (double)theta, set, pairs);
    LAUNCH_CHECK();
}

extern "C" void cuda_mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                       const float *dkh, const float *dvh, const int32_t *pos,
                                       int B, int T, int H, int dn, int dr, int dv, float theta)
{
    mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta, 0);
}

/* as cuda_mla_prep_backward, but dq, dkv and dkpe's dr columns are written, not added to */
extern "C" void cuda_mla_prep_backward_set(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                           const float *dkh, const float *dvh, const int32_t *pos,
                                           int B, int T, int H, int dn, int dr, int dv, float theta)
{
    mla_prep_backward(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta, 1);
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
        mla_prep_forward<bf16>(p[0], p[1], p[2], q, kv, kpe, kpe_stride, pos, B, T, H, dn, dr, dv, theta);
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
        mla_prep_backward<bf16>(dq, dkv, dkpe, kpe_stride, g[0], g[1], g[2], pos, B, T, H, dn, dr, dv, theta, 1);
        return;
    }
#endif
    const float *qh = save, *kh = save + rows * dk, *vh = save + 2 * rows * dk;
    float *dqh = scratch, *dkh = scratch + rows * dk, *dvh = scratch + 2 * rows * dk;
    cuda_attention_backward_set(dqh, dkh, dvh, dout, out, lse, qh, kh, vh, doc_id, B, T, H, dk, dv, scale);
    mla_prep_backward<float>(dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, B, T, H, dn, dr, dv, theta, 1);
}
