/* backend_cuda.cu: the CUDA backend's op table, device selection, memory, the stream,
 * the cuBLAS handle and a growing scratch buffer. The ops live in the other files of
 * kernels/ (one per op family, declared in cuda_ops.h); graph_run replays repeated op
 * sequences as CUDA graphs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
#include "cuda_ops.h"
}

/* The lanes (backend.h): a stream, a cuBLAS handle bound to it and a scratch buffer
 * each. Lane 0's stream is the backend's main stream; the others are made at their first
 * lanes_fork. */
static cudaStream_t stream; /* lane 0 */
static cudaStream_t lane_stream[BACKEND_LANES];
static cublasHandle_t lane_cublas[BACKEND_LANES];
static cudaEvent_t lane_event[BACKEND_LANES];
#define CUBLAS_LANE_WORKSPACE ((size_t)32 << 20)
static void *lane_cublas_ws[BACKEND_LANES];
static void *scratch[BACKEND_LANES];
static size_t scratch_bytes[BACKEND_LANES];
static int cur_lane, open_lanes = 1;

extern "C" cudaStream_t cuda_stream(void) { return lane_stream[cur_lane]; }
extern "C" cublasHandle_t cuda_cublas(void) { return lane_cublas[cur_lane]; }
extern "C" int cuda_lane(void) { return cur_lane; }

/* bumped whenever device memory is freed or moves (cuda_grow, gpu_free): a CUDA graph
 * captured before holds pointers that may no longer be valid */
static unsigned long long memory_generation = 1;
extern "C" unsigned long long cuda_memory_generation(void) { return memory_generation; }

/* CUDA graphs of repeated op sequences (optim.cu), on unless DELTAMLA_CUDA_GRAPHS=0 */
static int graphs_on = -1;
extern "C" int cuda_graphs(void)
{
    if (graphs_on < 0) {
        const char *e = getenv("DELTAMLA_CUDA_GRAPHS");
        graphs_on = !(e && e[0] == '0');
    }
    return graphs_on;
}
extern "C" void cuda_set_graphs(int on) { graphs_on = on != 0; }

extern "C" void cuda_graph_slot_free(cuda_graph_slot *g)
{
    if (g->exec) CUDA_CHECK(cudaGraphExecDestroy(g->exec));
    memset(g, 0, sizeof *g);
}

extern "C" int cuda_graph_replay(cuda_graph_slot *g, cudaStream_t s, void (*fn)(void *ctx), void *ctx)
{
    if (g->exec && g->generation != memory_generation) {
        CUDA_CHECK(cudaGraphExecDestroy(g->exec));
        g->exec = NULL;
    }
    if (!g->exec) {
        if (!g->seen) {
            g->seen = 1;
            fn(ctx);
            return 0;
        }
        cudaGraph_t graph;
        CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        fn(ctx);
        CUDA_CHECK(cudaStreamEndCapture(s, &graph));
        CUDA_CHECK(cudaGraphInstantiate(&g->exec, graph, 0));
        CUDA_CHECK(cudaGraphDestroy(graph));
        g->generation = memory_generation;
    }
    CUDA_CHECK(cudaGraphLaunch(g->exec, s));
    return 1;
}

/* graph_run (backend.h): a cuda_graph_replay slot per key. Keys are kept in a small
 * table, the oldest entry giving way when it is full. */
#define RUN_GRAPHS 16
#define RUN_KEY_MAX 128
typedef struct run_graph {
    unsigned char key[RUN_KEY_MAX];
    size_t key_bytes;
    cuda_graph_slot slot;
} run_graph;
static run_graph run_graphs[RUN_GRAPHS];
static int n_run_graphs, run_graph_next;
static unsigned long long run_graph_launches; /* for the tests */

extern "C" unsigned long long cuda_run_graph_launches(void) { return run_graph_launches; }

static run_graph *run_graph_entry(const void *key, size_t key_bytes)
{
    for (int i = 0; i < n_run_graphs; i++)
        if (run_graphs[i].key_bytes == key_bytes && !memcmp(run_graphs[i].key, key, key_bytes)) return &run_graphs[i];
    run_graph *e;
    if (n_run_graphs < RUN_GRAPHS) {
        e = &run_graphs[n_run_graphs++];
    } else {
        e = &run_graphs[run_graph_next];
        run_graph_next = (run_graph_next + 1) % RUN_GRAPHS;
        cuda_graph_slot_free(&e->slot);
    }
    memset(e, 0, sizeof *e);
    memcpy(e->key, key, key_bytes);
    e->key_bytes = key_bytes;
    return e;
}

static void gpu_graph_run(const void *key, size_t key_bytes, void (*fn)(void *ctx), void *ctx)
{
    if (!cuda_graphs() || key_bytes > RUN_KEY_MAX || cur_lane != 0) {
        fn(ctx);
        return;
    }
    run_graph_launches += cuda_graph_replay(&run_graph_entry(key, key_bytes)->slot, stream, fn, ctx);
}

extern "C" void *cuda_grow(void **buf, size_t *cap, size_t bytes)
{
    if (bytes > *cap) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        CUDA_CHECK(cudaStreamIsCapturing(cuda_stream(), &cs));
        /* a capture repeats a sequence that ran before with the same sizes */
        if (cs != cudaStreamCaptureStatusNone) die("internal error: a device buffer grew during a CUDA graph capture");
        memory_generation++;
        if (*buf) CUDA_CHECK(cudaFreeAsync(*buf, cuda_stream()));
        size_t grow = bytes + bytes / 4;
        CUDA_CHECK(cudaMallocAsync(buf, grow, cuda_stream()));
        *cap = grow;
    }
    return *buf;
}

extern "C" void *cuda_scratch(size_t bytes)
{
    return cuda_grow(&scratch[cur_lane], &scratch_bytes[cur_lane], bytes);
}

static void lane_create(int i)
{
    /* lanes 1.. at the highest priority: their work is mostly chains of small kernels,
     * which should get SMs as a large GEMM on lane 0 frees them (measured on moe-1b's
     * update phase: within the noise, 11.8-12.0 -> 11.7 ms) */
    if (i > 0) {
        int least = 0, greatest = 0;
        CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
        CUDA_CHECK(cudaStreamCreateWithPriority(&lane_stream[i], cudaStreamNonBlocking, greatest));
    }
    CUBLAS_CHECK(cublasCreate(&lane_cublas[i]));
    CUBLAS_CHECK(cublasSetStream(lane_cublas[i], lane_stream[i]));
    /* an own workspace (after cublasSetStream, which resets it): what cuBLAS uses in a
     * CUDA graph capture is then this buffer, not memory the capture would allocate */
    CUDA_CHECK(cudaMalloc(&lane_cublas_ws[i], CUBLAS_LANE_WORKSPACE));
    CUBLAS_CHECK(cublasSetWorkspace(lane_cublas[i], lane_cublas_ws[i], CUBLAS_LANE_WORKSPACE));
    CUDA_CHECK(cudaEventCreateWithFlags(&lane_event[i], cudaEventDisableTiming));
}

static void gpu_lanes_fork(int n)
{
    fatal_check(n >= 1 && n <= BACKEND_LANES && open_lanes == 1 && cur_lane == 0);
    CUDA_CHECK(cudaEventRecord(lane_event[0], stream));
    for (int i = 1; i < n; i++) {
        if (!lane_stream[i]) lane_create(i);
        CUDA_CHECK(cudaStreamWaitEvent(lane_stream[i], lane_event[0], 0));
    }
    open_lanes = n;
}

static void gpu_lane(int i)
{
    fatal_check(i >= 0 && i < open_lanes);
    cur_lane = i;
}

static void gpu_lanes_join(void)
{
    for (int i = 1; i < open_lanes; i++) {
        CUDA_CHECK(cudaEventRecord(lane_event[i], lane_stream[i]));
        CUDA_CHECK(cudaStreamWaitEvent(stream, lane_event[i], 0));
    }
    open_lanes = 1;
    cur_lane = 0;
}

/* peak of what the device holds (cudaMemGetInfo: our allocations, the scratch buffer,
 * cuBLAS workspaces and the context), sampled at every allocation and sync */
static size_t peak_used;

static void sample_memory(void)
{
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess && total_b - free_b > peak_used) peak_used = total_b - free_b;
}

static size_t gpu_mem_peak(void)
{
    sample_memory();
    return peak_used;
}

static void *gpu_alloc(size_t bytes)
{
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        die("out of GPU memory allocating %.2f GiB (%.2f GiB free of %.2f GiB); lower --batch_size or use "
            "--gradient_checkpointing", bytes / 1073741824.0, free_b / 1073741824.0, total_b / 1073741824.0);
    }
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
    sample_memory();
    return p;
}

static void gpu_free(void *p)
{
    if (p) {
        CUDA_CHECK(cudaStreamSynchronize(stream));
        CUDA_CHECK(cudaFree(p));
        memory_generation++;
    }
}

static void gpu_zero(void *p, size_t bytes) { CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream)); }

static void gpu_to_host(void *dst, const void *src, size_t bytes)
{
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
}

static void gpu_from_host(void *dst, const void *src, size_t bytes)
{
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream)); /* the host buffer may be reused at once */
}

static void gpu_copy(void *dst, const void *src, size_t bytes)
{
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
}

/* page-locked, so uploads of batches are DMA transfers without a staging copy */
static void *gpu_host_alloc(size_t bytes)
{
    void *p = NULL;
    if (cudaMallocHost(&p, bytes ? bytes : 64) != cudaSuccess)
        die("cannot allocate %zu bytes of page-locked host memory", bytes);
    return p;
}

static void gpu_host_free(void *p)
{
    if (p) CUDA_CHECK(cudaFreeHost(p));
}

static void gpu_sync(void)
{
    CUDA_CHECK(cudaStreamSynchronize(stream));
    sample_memory();
}

static backend cuda_backend;

extern "C" int cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
}

extern "C" const backend *backend_cuda(int device)
{
    if (cuda_backend.name) return &cuda_backend;
    int n = cuda_device_count();
    if (n == 0) die("--device cuda: no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)");
    if (device < 0 || device >= n) die("--device cuda: GPU %d requested but %d are visible", device, n);
    CUDA_CHECK(cudaSetDevice(device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    lane_stream[0] = stream;
    lane_create(0);
    backend b = {};
    b.name = "cuda";
    b.alloc = gpu_alloc;
    b.free = gpu_free;
    b.zero = gpu_zero;
    b.to_host = gpu_to_host;
    b.from_host = gpu_from_host;
    b.copy = gpu_copy;
    b.sync = gpu_sync;
    b.lanes_fork = gpu_lanes_fork;
    b.lane = gpu_lane;
    b.lanes_join = gpu_lanes_join;
    b.mem_peak = gpu_mem_peak;
    b.graph_run = gpu_graph_run;
    b.host_alloc = gpu_host_alloc;
    b.host_free = gpu_host_free;
    b.add_inplace = cuda_add_inplace;
    b.scale_inplace = cuda_scale_inplace;
    b.sumsq = cuda_sumsq;
    b.embedding_forward = cuda_embedding_forward;
    b.embedding_backward = cuda_embedding_backward;
    b.matmul_forward = cuda_matmul_forward;
    b.matmul_forward_add = cuda_matmul_forward_add;
    b.matmul_backward = cuda_matmul_backward;
    b.matmul_backward_set = cuda_matmul_backward_set;
    b.matmul_forward_multi = cuda_matmul_forward_multi;
    b.matmul_backward_multi = cuda_matmul_backward_multi;
    b.rmsnorm_forward = cuda_rmsnorm_forward;
    b.rmsnorm_backward = cuda_rmsnorm_backward;
    b.layernorm_forward = cuda_layernorm_forward;
    b.layernorm_backward = cuda_layernorm_backward;
    b.swiglu_forward = cuda_swiglu_forward;
    b.swiglu_backward = cuda_swiglu_backward;
    b.swiglu_backward_set = cuda_swiglu_backward_set;
    b.mlp_forward = cuda_mlp_forward;
    b.mlp_backward = cuda_mlp_backward;
    b.mlp_backward_set = cuda_mlp_backward_set;
    b.conv_forward = cuda_conv_forward;
    b.conv_backward = cuda_conv_backward;
    b.conv_backward_set = cuda_conv_backward_set;
    b.gates_forward = cuda_gates_forward;
    b.gates_backward = cuda_gates_backward;
    b.l2norm_forward = cuda_l2norm_forward;
    b.l2norm_backward = cuda_l2norm_backward;
    b.l2norm_backward_set = cuda_l2norm_backward_set;
    b.gdn_forward = cuda_gdn_forward;
    b.gdn_backward = cuda_gdn_backward;
    b.gdn_backward_set = cuda_gdn_backward_set;
    b.mla_prep_forward = cuda_mla_prep_forward;
    b.mla_prep_backward = cuda_mla_prep_backward;
    b.mla_prep_backward_set = cuda_mla_prep_backward_set;
    b.attention_forward = cuda_attention_forward;
    b.attention_backward = cuda_attention_backward;
    b.attention_backward_set = cuda_attention_backward_set;
    b.mla_attention_forward = cuda_mla_attention_forward;
    b.mla_attention_backward_set = cuda_mla_attention_backward_set;
    b.moe_route_forward = cuda_moe_route_forward;
    b.moe_route_backward = cuda_moe_route_backward;
    b.add_i32 = cuda_add_i32;
    b.router_bias_update = cuda_router_bias_update;
    b.moe_experts_forward = cuda_moe_experts_forward;
    b.moe_experts_backward = cuda_moe_experts_backward;
    b.rows_gather = cuda_rows_gather;
    b.moe_combine_forward = cuda_moe_combine_forward;
    b.moe_combine_backward = cuda_moe_combine_backward;
    b.classifier_forward = cuda_classifier_forward;
    b.classifier_backward = cuda_classifier_backward;
    b.classifier_forward_backward = cuda_classifier_forward_backward;
    b.grad_scale = cuda_grad_scale;
    b.adamw_update = cuda_adamw_update;
    b.muon_update = cuda_muon_update;
    b.muon_update_batch = cuda_muon_update_batch;
    cuda_backend = b;
    return &cuda_backend;
}
