/* gdn_copy.cuh: how the GDN kernels bring their operands into shared memory: cp.async
 * copies of row panels for the per-chunk kernels, bulk copies on mbarriers for the state
 * kernels, and the prep kernels' stores of the state kernels' operands in their layout.
 * Included by gdn_internal.cuh (after the sizes and index helpers it uses); the design of
 * the GDN kernels is described there. */
#ifndef DELTAMLA_GDN_COPY_CUH
#define DELTAMLA_GDN_COPY_CUH

/* ---- cp.async ---- */
/* one cp.async of 4 bytes (dst, src 4-byte aligned) or 16 bytes (both 16-byte aligned,
 * through L2 only) to the shared address dst, reading the first `bytes` of src and
 * zero-filling the rest (bytes 0: nothing is read, src need only be a valid address) */
static __device__ __forceinline__ void gdn_cp4(unsigned dst, const float *src, int bytes)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
#endif
}

static __device__ __forceinline__ void gdn_cp16(unsigned dst, const float *src, int bytes)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
#endif
}

/* wait until every cp.async of this thread has landed */
static __device__ __forceinline__ void gdn_async_wait_all(void)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

/* The barrier of the per-chunk kernels: this thread's cp.async copies landed, then
 * __syncthreads, so every thread's copies are visible to the block (a no-op wait where
 * none are in flight). */
static __device__ __forceinline__ void gdn_sync(void)
{
    gdn_async_wait_all();
    __syncthreads();
}

/* The copies of gdn_load_async, `per` floats each (1 or 4; with 4, src, rs, dst and dp
 * 16-byte aligned). A row takes npc = cols / per copies. Where npc > 16, lane l takes
 * columns per * l, per * (l + 32), ... of rows w, w + nw, ... (w its warp, nw the warps
 * of the block); where npc <= 16 (16-byte copies of panels up to 64 columns wide) a warp
 * covers 32 / npc rows at once, lane l the copy l % npc of row l / npc of them, so that
 * all its lanes copy: 32-column panels had kept 24 of the 32 lanes idle and taken four
 * times the loop iterations, a quarter of all instructions of the grads kernel. The rows
 * below rv are copied with the pointers stepped from row to row and a fixed byte count
 * per lane (its valid columns), the rows from rv on are zero-filled (a copy of no bytes
 * from src). */
static __device__ __forceinline__ void gdn_copy_rows(int per, unsigned dst, int dp, int rows, int cols,
                                                     const float *src, size_t rs, int rv, int ce)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5, w = threadIdx.x >> 5, rl = gdn_imin(rows, rv);
    const int npc = (cols + per - 1) / per, rpw = npc <= 16 ? 32 / npc : 1;
    const int sub = rpw > 1 ? lane / npc : 0, pc = rpw > 1 ? lane - sub * npc : lane;
    if (sub >= rpw) return; /* lanes past the last whole row of a warp pass */
    const int r0 = w * rpw + sub;
    const size_t sstep = (size_t)(nw * rpw) * rs;
    const unsigned dstep = 4u * (unsigned)(nw * rpw * dp);
    for (int cb = per * pc; cb < cols; cb += 32 * per) {
        const int n = ce - cb < 0 ? 0 : ce - cb > per ? per : ce - cb; /* valid floats of a valid row */
        const float *sp = n ? src + (size_t)r0 * rs + cb : src;
        const size_t sst = n ? sstep : 0;
        unsigned d = dst + 4u * (unsigned)(r0 * dp + cb);
        int r = r0;
#pragma unroll 4
        for (; r < rl; r += nw * rpw, sp += sst, d += dstep) {
            if (per == 4) gdn_cp16(d, sp, 4 * n);
            else gdn_cp4(d, sp, 4 * n);
        }
#pragma unroll 4
        for (; r < rows; r += nw * rpw, d += dstep) {
            if (per == 4) gdn_cp16(d, src, 0);
            else gdn_cp4(d, src, 0);
        }
    }
}

/* dst[r*dp + c] = src[r*rs + c0 + c] for r < rows, c < cols (0 where r >= rv or c0 + c >=
 * cv) by cp.async: the copies are only issued, so the loads of several arrays are in
 * flight together; gdn_sync makes them visible. All threads of the block; no barrier. A
 * warp per row, its lanes along the row (narrow panels: several rows a warp,
 * gdn_copy_rows), with no integer division: an element index split by a runtime row
 * length costs about 20 instructions, and those splits were most of the instructions of
 * the per-chunk kernels. Where the
 * source rows and the destination are 16-byte aligned (src + c0, rs, dst, dp; cols a
 * multiple of 4: the scratch arrays, whose rows have gdn_r4(D) floats) each copy moves 4
 * floats, otherwise one. Each thread keeps its copy's pointers and steps them row to
 * row: computed afresh for every element (a 64-bit row offset, a column, a validity
 * select), a 4-byte copy took about 20 instructions, half of all the state kernels
 * executed. */
static __device__ __forceinline__ void gdn_load_async(float *dst, int dp, int rows, int cols, const float *src,
                                                      size_t rs, int rv, int c0, int cv)
{
    const int ce = gdn_imin(cols, cv - c0);
    const float *s0 = src + c0;
    const unsigned d0 = cuda_smem_u32(dst);
    if ((((size_t)s0 | rs | (size_t)dp | (size_t)cols) & 3) == 0 && ((size_t)s0 & 15) == 0 && (d0 & 15) == 0)
        gdn_copy_rows(4, d0, dp, rows, cols, s0, rs, rv, ce);
    else
        gdn_copy_rows(1, d0, dp, rows, cols, s0, rs, rv, ce);
}

/* ---- bulk copies (the Hopper copy engine) and mbarriers: the state kernels' loads ----
 * The prep kernels write the state kernels' per-chunk operands (Uk or Xk, and K) as
 * [64, dp] arrays with the state kernels' own shared-memory row pitch dp = gdn_kpitch(D)
 * and zero pad columns, so that each chunk's array is one contiguous 16-byte aligned
 * block; a state kernel brings it, and the chunk's 128 per-token scalars, into shared
 * memory by one cp.async.bulk each, issued by one thread and completing on an mbarrier
 * that counts the bytes. The cp.async loops these replace had issued a 16-byte copy per
 * lane and row, and with their address stepping they were a fifth of the forward state
 * kernel's instructions (62M against 72M in all now); a bulk copy per row (64 a refill)
 * cut as many instructions but made the latency-bound case (B 2, T 8192: one block an SM)
 * 8% slower. One thread arms the barrier with the byte count of a refill before a
 * __syncthreads that precedes every copy of that refill, so that no copy can complete on
 * a phase that is not armed yet; every thread then waits for the phase's parity. */
static __device__ __forceinline__ void gdn_mbar_init(uint64_t *bar)
{
#ifdef __CUDA_ARCH__
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(cuda_smem_u32(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

/* one arrival (the barrier's only one) that also expects `bytes` from bulk copies */
static __device__ __forceinline__ void gdn_mbar_expect(uint64_t *bar, unsigned bytes)
{
#ifdef __CUDA_ARCH__
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(cuda_smem_u32(bar)), "r"(bytes)
                 : "memory");
#endif
}

/* wait until the phase of the given parity has completed */
static __device__ __forceinline__ void gdn_mbar_wait(uint64_t *bar, unsigned parity)
{
#ifdef __CUDA_ARCH__
    asm volatile("{\n"
                 ".reg .pred done;\n"
                 "GDN_MBAR_WAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra GDN_MBAR_WAIT_%=;\n"
                 "}\n" ::"r"(cuda_smem_u32(bar)),
                 "r"(parity)
                 : "memory");
#endif
}

/* bytes (a multiple of 16; dst, src 16-byte aligned) from global src to shared dst,
 * completing on bar */
static __device__ __forceinline__ void gdn_bulk_load(float *dst, const float *src, unsigned bytes, uint64_t *bar)
{
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     cuda_smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(cuda_smem_u32(bar))
                 : "memory");
#endif
}

/* One refill of a state kernel: the chunk's [64, dp] array at src to dst, and (sv not
 * NULL) its 128 per-token scalars at sv to sc, each by one bulk copy; gdn_refill_bytes(dp,
 * sv != NULL) is its byte count for gdn_mbar_expect. */
static __host__ __device__ __forceinline__ unsigned gdn_refill_bytes(int dp, int scalars)
{
    return (unsigned)(sizeof(float) * (GDN_C * dp + (scalars ? 2 * GDN_C : 0)));
}

static __device__ __forceinline__ void gdn_refill(float *dst, const float *src, int dp, float *sc, const float *sv,
                                                  uint64_t *bar)
{
    if (threadIdx.x == 0) gdn_bulk_load(dst, src, (unsigned)(sizeof(float) * GDN_C * dp), bar);
    if (threadIdx.x == 32 && sv) gdn_bulk_load(sc, sv, (unsigned)(sizeof(float) * 2 * GDN_C), bar);
}

/* K of the chunk (Ks [64, dp] in shared memory, rows past the sequence end and columns
 * D..r8(D)-1 zero) to Kp [64, dp] in scratch, through gdn_state_op: the state kernels'
 * copy of K, in their shared-memory layout (see gdn_refill; rows of k itself do not even
 * start 16-byte aligned when D is odd), pad columns zero, values already their TF32
 * operands. All threads; no barrier. */
static __device__ __forceinline__ void gdn_store_kpad(float *Kp, const float *Ks, int dp, int D)
{
    const int lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int r = threadIdx.x >> 5; r < GDN_C; r += nw)
        for (int c = lane; c < dp; c += 32) Kp[(size_t)r * dp + c] = c < D ? gdn_state_op(Ks[r * dp + c]) : 0.0f;
}

/* The pad columns D..dp-1 of a state-kernel operand in scratch (the [64, dp] rows at g):
 * the prep kernels' epilogues write those that lie in the warp tile of column D - 1 (up
 * to the next multiple of 32); this zeroes the rest, if any (D a multiple of 32, or the
 * pitch reaching past that tile), threads 0..63 a row each; no barrier. */
static __device__ __forceinline__ void gdn_zero_pad(float *g, int dp, int D)
{
    if (threadIdx.x < GDN_C)
        for (int c = (D + 31) & ~31; c < dp; c++) g[(size_t)threadIdx.x * dp + c] = 0.0f;
}

#endif
