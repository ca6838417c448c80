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
 */
#include <math.h>

#include "cuda_common.cuh"

extern "C" {
#include "cuda_ops.h"
}

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

/* One block per token i: qh, kh [N, H, dn+dr], vh [N, H, dv]; shared memory dr doubles. */
static __global__ void prep_fwd_kernel(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                       const float *kpe, int kpe_stride, const int32_t *pos, int T, int H,
                                       int dn, int dr, int dv, double theta)
{
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkv = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    const float *qi = q + (size_t)i * H * dk, *kvi = kv + (size_t)i * H * dkv;
    const float *kpi = kpe + (size_t)i * kpe_stride;
    float *qhi = qh + (size_t)i * H * dk, *khi = kh + (size_t)i * H * dk, *vhi = vh + (size_t)i * H * dv;
    for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
        const int h = e / dk, col = e - h * dk;
        if (col < dn) {
            qhi[e] = qi[e];
            khi[e] = kvi[h * dkv + col];
        } else {
            const int j = (col - dn) >> 1, odd = (col - dn) & 1;
            const double cs = rot[j], sn = rot[half + j];
            const double x0 = qi[h * dk + dn + 2 * j], x1 = qi[h * dk + dn + 2 * j + 1];
            const double k0 = kpi[2 * j], k1 = kpi[2 * j + 1];
            qhi[e] = (float)(odd ? x1 * cs + x0 * sn : x0 * cs - x1 * sn);
            khi[e] = (float)(odd ? k1 * cs + k0 * sn : k0 * cs - k1 * sn);
        }
    }
    for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
        const int h = e / dv, col = e - h * dv;
        vhi[e] = kvi[h * dkv + dn + col];
    }
}

/* One block per token i: the adjoint of prep_fwd_kernel, accumulating. dkpe sums the
 * heads in order 0..H-1 in double, one thread per pair. */
static __global__ void prep_bwd_kernel(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh,
                                       const float *dkh, const float *dvh, const int32_t *pos, int T, int H,
                                       int dn, int dr, int dv, double theta, int set)
{
    /* each output element is touched once: added to, or with set written (old unread) */
    extern __shared__ double rot[];
    const int i = blockIdx.x, half = dr / 2, dk = dn + dr, dkvw = dn + dv;
    rope_table(rot, pos, i, T, dr, theta);
    float *dqi = dq + (size_t)i * H * dk, *dkvi = dkv + (size_t)i * H * dkvw;
    float *dkpi = dkpe + (size_t)i * kpe_stride;
    const float *gq = dqh + (size_t)i * H * dk, *gk = dkh + (size_t)i * H * dk, *gv = dvh + (size_t)i * H * dv;
    for (int e = threadIdx.x; e < H * dk; e += blockDim.x) {
        const int h = e / dk, col = e - h * dk;
        if (col < dn) {
            dqi[e] = (set ? 0.0f : dqi[e]) + gq[e];
            dkvi[h * dkvw + col] = (set ? 0.0f : dkvi[h * dkvw + col]) + gk[e];
        } else {
            const int j = (col - dn) >> 1, odd = (col - dn) & 1;
            const double cs = rot[j], sn = rot[half + j];
            const double y0 = gq[h * dk + dn + 2 * j], y1 = gq[h * dk + dn + 2 * j + 1];
            dqi[e] = (set ? 0.0f : dqi[e]) + (float)(odd ? y1 * cs - y0 * sn : y0 * cs + y1 * sn);
        }
    }
    for (int e = threadIdx.x; e < H * dv; e += blockDim.x) {
        const int h = e / dv, col = e - h * dv;
        dkvi[h * dkvw + dn + col] = (set ? 0.0f : dkvi[h * dkvw + dn + col]) + gv[e];
    }
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s0 = 0, s1 = 0;
        for (int h = 0; h < H; h++) {
            s0 += gk[h * dk + dn + 2 * j];
            s1 += gk[h * dk + dn + 2 * j + 1];
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

extern "C" void cuda_mla_prep_forward(float *qh, float *kh, float *vh, const float *q, const float *kv,
                                      const float *kpe, int kpe_stride, const int32_t *pos,
                                      int B, int T, int H, int dn, int dr, int dv, float theta)
{
    prep_check("cuda_mla_prep_forward", B, T, H, dn, dr, dv);
    prep_fwd_kernel<<<B * T, PREP_THREADS, dr * sizeof(double), cuda_stream()>>>(
        qh, kh, vh, q, kv, kpe, kpe_stride, pos, T, H, dn, dr, dv, (double)theta);
    LAUNCH_CHECK();
}

static void mla_prep_backward(float *dq, float *dkv, float *dkpe, int kpe_stride, const float *dqh, const float *dkh,
                              const float *dvh, const int32_t *pos, int B, int T, int H, int dn, int dr, int dv,
                              float theta, int set)
{
    prep_check("cuda_mla_prep_backward", B, T, H, dn, dr, dv);
    prep_bwd_kernel<<<B * T, PREP_THREADS, dr * sizeof(double), cuda_stream()>>>(
        dq, dkv, dkpe, kpe_stride, dqh, dkh, dvh, pos, T, H, dn, dr, dv, (double)theta, set);
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

