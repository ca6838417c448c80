/* attention_common.cu: the host side that the attention forward (attention_forward.cu)
 * and backward (attention_backward.cu) share: the conversion of q, k, v, dout from fp32
 * [B, T, H, D] into bf16 [B, H, T, Dp] copies, the shape check, and raising a kernel's
 * shared-memory limit. Declared in attention_internal.cuh.
 */
#include "attention_internal.cuh"

/* ------------------------------------------------------------ layout passes ---- */

/* dst [B, H, T, dp] bf16 (zero in columns D..dp-1) from src [B, T, H, D] fp32; one
 * thread per 8 output columns. vec: src 16-byte aligned and D % 4 == 0. */
static __global__ void to_heads_bf16_kernel(bf16 *dst, const float *src, int T, int H, int D, int dp,
                                            size_t nchunks, int vec)
{
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nchunks) return;
    const int cpr = dp >> 3;
    const size_t row = i / cpr; /* (b, h, t) */
    const int c0 = (int)(i - row * cpr) * 8;
    const int t = (int)(row % T);
    const size_t bh = row / T, b = bh / H;
    const int h = (int)(bh % H);
    const float *s = src + ((b * T + t) * H + h) * D + c0;
    float x[8];
    if (vec && c0 + 8 <= D) {
        const float4 u = ((const float4 *)s)[0], w = ((const float4 *)s)[1];
        x[0] = u.x, x[1] = u.y, x[2] = u.z, x[3] = u.w, x[4] = w.x, x[5] = w.y, x[6] = w.z, x[7] = w.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) x[e] = c0 + e < D ? s[e] : 0.f;
    }
    uint4 o;
    o.x = pack_bf16(x[0], x[1]);
    o.y = pack_bf16(x[2], x[3]);
    o.z = pack_bf16(x[4], x[5]);
    o.w = pack_bf16(x[6], x[7]);
    *(uint4 *)(dst + row * dp + c0) = o;
}

void attn_to_heads_bf16(bf16 *dst, const float *src, int B, int T, int H, int D, int dp)
{
    const size_t nchunks = (size_t)B * H * T * (dp / 8);
    const int vec = D % 4 == 0 && ((uintptr_t)src & 15) == 0;
    to_heads_bf16_kernel<<<ceil_div_u(nchunks, CVT_THREADS), CVT_THREADS, 0, cuda_stream()>>>(dst, src, T, H, D,
                                                                                            dp, nchunks, vec);
    LAUNCH_CHECK();
}

/* dst = src (acc 0) or dst += src (acc 1), bf16 -> fp32, n elements */
static __global__ void from_bf16_kernel(float *__restrict__ dst, const bf16 *__restrict__ src, size_t n, int acc)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = __bfloat162float(src[i]);
        dst[i] = acc ? dst[i] + x : x;
    }
}

extern "C" void attn_from_bf16(float *dst, const bf16 *src, size_t n, int acc)
{
    if (!n) return;
    const size_t blocks = ceil_div_u(n, CVT_THREADS), cap = 8 * (size_t)cuda_num_sms();
    from_bf16_kernel<<<(unsigned)(blocks < cap ? blocks : cap), CVT_THREADS, 0, cuda_stream()>>>(dst, src, n, acc);
    LAUNCH_CHECK();
}

#ifndef DELTAMLA_HAVE_CUDNN
/* without cuDNN there is only our kernel to choose */
extern "C" void cuda_attention_use_cudnn(int on) { (void)on; }
extern "C" int cuda_attention_cudnn_calls(void) { return 0; }
#endif

void attn_check(const char *who, int B, int T, int H, int Dk, int Dv)
{
    if (B < 1 || T < 1 || H < 1 || Dk < 1 || Dv < 1)
        die("%s: bad shape B=%d T=%d H=%d Dk=%d Dv=%d", who, B, T, H, Dk, Dv);
    if (Dk > ATT_DK_MAX || Dv > ATT_DV_MAX)
        die("%s: head dims Dk=%d Dv=%d exceed what the CUDA attention kernels hold (Dk <= %d, Dv <= %d); "
            "use smaller --mla_qk_*_head_dim / --mla_v_head_dim or the CPU backend",
            who, Dk, Dv, ATT_DK_MAX, ATT_DV_MAX);
    if ((T + ATT_TILE - 1) / ATT_TILE > 65535) die("%s: T=%d too long (at most %d)", who, T, 65535 * ATT_TILE);
}

/* Raise a kernel's dynamic shared memory limit when `bytes` needs it (the default is 48 KB). */
void attn_smem_limit(const void *kernel, size_t bytes, size_t *set_so_far, const char *who)
{
    static int optin;
    if (!optin) {
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    }
    if (bytes > (size_t)optin)
        die("%s: needs %zu bytes of shared memory per block, the GPU allows %d", who, bytes, optin);
    if (bytes > *set_so_far) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
        *set_so_far = bytes;
    }
}
