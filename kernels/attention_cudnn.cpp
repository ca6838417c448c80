/* attention_cudnn.cpp: the causal attention of the op table (attention_forward/backward
 * without document masking) through cuDNN's fused flash attention, built with the
 * cuDNN frontend's SDPA graphs. attention_forward.cu and attention_backward.cu call it first and run their own kernels when it declines.
 *
 * Why: at the model's shapes (B 8, T 2048, H 12, Dk 192, Dv 128) cuDNN's kernels take
 * about 0.28 + 1.0 ms against our mma.sync kernels' 1.22 + 5.30 ms
 * (benchmarks/RESULTS.md). Our kernels stay for document masking (cuDNN's SDPA has no
 * block-diagonal mask within a row), for shapes cuDNN refuses, and under
 * DELTAMLA_ATTENTION=own (or cuda_attention_use_cudnn(0), which the GPU tests use to
 * check both).
 *
 * Layout and precision. The op's q, k [B, T, H, Dk], v, out, dout [B, T, H, Dv] are fp32;
 * each is rounded once to a bf16 copy in the same layout, which cuDNN reads as
 * [B, H, T, D] through strides (no transpose pass). The fused MLA attention
 * (attention_prep.cu) has its operands in bf16 already and calls the bf16 forms
 * (attn_cudnn_forward_bf16, attn_cudnn_backward_bf16), which the fp32 ones wrap. lse [B, H, T] is cuDNN's Stats
 * tensor as it is: fp32, natural log of the sum of exponentials of the scaled scores,
 * the op's own convention, so a forward of either implementation feeds a backward of
 * either. out is written from cuDNN's bf16 O; dq, dk, dv (accumulated into, as the op
 * requires) from its bf16 dQ, dK, dV. Both are bf16-exact roundings of fp32
 * accumulations, within the op's bf16 tolerance (1e-2) against the CPU.
 *
 * The backward asks for cuDNN's deterministic algorithm (no atomics in dQ), so two runs
 * give identical bits, as the trainer promises; where this cuDNN cannot build it, our
 * backward kernel runs instead (it takes cuDNN's lse unchanged).
 *
 * Graphs are built once per shape (and scale) and kept: building takes tens of
 * milliseconds. A shape cuDNN refuses is remembered as refused, with one note on stderr.
 * Built only where the frontend is found (the Makefile's HAVE_CUDNN, which also defines
 * DELTAMLA_HAVE_CUDNN for the callers). Host code only (compiled by the C++ compiler: the frontend's headers take nvcc minutes);
 * the bf16 conversions are kernels of matmul.cu and attention_common.cu.
 */
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <memory>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "cuda_ops.h"
#include "util.h"
}

typedef __nv_bfloat16 bf16;

/* kernels/backend_cuda.cu, matmul.cu and attention_common.cu */
extern "C" cudaStream_t cuda_stream(void);
extern "C" void *cuda_grow(void **buf, size_t *cap, size_t bytes);
extern "C" void cuda_to_bf16(bf16 *dst, const float *src, size_t n);
extern "C" void attn_from_bf16(float *dst, const bf16 *src, size_t n, int acc);

namespace fe = cudnn_frontend;

enum : int64_t { UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_DO, UID_DQ, UID_DK, UID_DV };

struct sdpa_plan {
    int backward, B, T, H, Dk, Dv;
    float scale;
    std::shared_ptr<fe::graph::Graph> graph; /* null: cuDNN refused this shape */
    int64_t workspace;
};

static cudnnHandle_t handle;
static std::vector<sdpa_plan> plans;
static int use_cudnn = -1; /* -1: not decided yet (DELTAMLA_ATTENTION read on first use) */
static void *buf;          /* cuDNN's workspace */
static size_t buf_bytes;

static int calls; /* op calls cuDNN served (for the tests) */

extern "C" void cuda_attention_use_cudnn(int on) { use_cudnn = on ? 1 : 0; }
extern "C" int cuda_attention_cudnn_calls(void) { return calls; }

static int cudnn_wanted(void)
{
    if (use_cudnn < 0) {
        const char *e = getenv("DELTAMLA_ATTENTION");
        if (e && strcmp(e, "own") && strcmp(e, "cudnn"))
            die("DELTAMLA_ATTENTION=%s: expected 'cudnn' (the default where cuDNN is built in) or 'own'", e);
        use_cudnn = !(e && !strcmp(e, "own"));
    }
    return use_cudnn;
}

/* [B, T, H, D] token-major memory seen as cuDNN's [B, H, T, D] */
static std::shared_ptr<fe::graph::Tensor_attributes> bthd(fe::graph::Graph &g, const char *name, int64_t uid,
                                                          int B, int T, int H, int D)
{
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({B, H, T, D})
                        .set_stride({(int64_t)T * H * D, D, (int64_t)H * D, 1}));
}

static void set_bthd(const std::shared_ptr<fe::graph::Tensor_attributes> &t, const char *name, int64_t uid, int B,
                     int T, int H, int D)
{
    t->set_output(true)
        .set_name(name)
        .set_uid(uid)
        .set_dim({B, H, T, D})
        .set_stride({(int64_t)T * H * D, D, (int64_t)H * D, 1})
        .set_data_type(fe::DataType_t::BFLOAT16);
}

static std::shared_ptr<fe::graph::Tensor_attributes> stats_tensor(fe::graph::Graph &g, int B, int T, int H)
{
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name("stats")
                        .set_uid(UID_STATS)
                        .set_dim({B, H, T, 1})
                        .set_stride({(int64_t)H * T, T, 1, 1})
                        .set_data_type(fe::DataType_t::FLOAT));
}

/* Build (or find) the graph of one direction and shape; NULL where cuDNN refuses it. */
static const sdpa_plan *get_plan(int backward, int B, int T, int H, int Dk, int Dv, float scale)
{
    for (const sdpa_plan &p : plans)
        if (p.backward == backward && p.B == B && p.T == T && p.H == H && p.Dk == Dk && p.Dv == Dv &&
            p.scale == scale)
            return p.graph ? &p : NULL;

    if (!handle) {
        if (cudnnCreate(&handle) != CUDNN_STATUS_SUCCESS) die("cudnnCreate failed (is libcudnn usable here?)");
    }
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto q = bthd(*g, "q", UID_Q, B, T, H, Dk), k = bthd(*g, "k", UID_K, B, T, H, Dk);
    auto v = bthd(*g, "v", UID_V, B, T, H, Dv);
    if (!backward) {
        auto opt = fe::graph::SDPA_attributes().set_name("attention").set_generate_stats(true).set_attn_scale(scale);
        opt.set_causal_mask(true);
        auto [o, stats] = g->sdpa(q, k, v, opt);
        set_bthd(o, "o", UID_O, B, T, H, Dv);
        stats->set_output(true).set_uid(UID_STATS).set_data_type(fe::DataType_t::FLOAT);
    } else {
        auto o = bthd(*g, "o", UID_O, B, T, H, Dv), d_o = bthd(*g, "do", UID_DO, B, T, H, Dv);
        auto stats = stats_tensor(*g, B, T, H);
        auto opt = fe::graph::SDPA_backward_attributes().set_name("attention_backward").set_attn_scale(scale);
        opt.set_causal_mask(true);
        opt.set_deterministic_algorithm(true);
        auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, d_o, stats, opt);
        set_bthd(dq, "dq", UID_DQ, B, T, H, Dk);
        set_bthd(dk, "dk", UID_DK, B, T, H, Dk);
        set_bthd(dv, "dv", UID_DV, B, T, H, Dv);
    }

    sdpa_plan p = {backward, B, T, H, Dk, Dv, scale, nullptr, 0};
    fe::error_t st = g->validate();
    if (st.is_good()) st = g->build_operation_graph(handle);
    if (st.is_good()) st = g->create_execution_plans({fe::HeurMode_t::A});
    if (st.is_good()) st = g->check_support(handle);
    if (st.is_good()) st = g->build_plans(handle);
    if (st.is_good()) st = g->get_workspace_size(p.workspace);
    if (st.is_good()) {
        p.graph = g;
    } else {
        fprintf(stderr,
                "note: cuDNN attention %s unavailable for B=%d T=%d H=%d Dk=%d Dv=%d (%s); using deltamla's own "
                "kernel\n",
                backward ? "backward" : "forward", B, T, H, Dk, Dv, st.get_message().c_str());
    }
    plans.push_back(p);
    return p.graph ? &plans.back() : NULL;
}

static void run_plan(const sdpa_plan *p, std::unordered_map<int64_t, void *> &pack, void *workspace, const char *who)
{
    if (cudnnSetStream(handle, cuda_stream()) != CUDNN_STATUS_SUCCESS) die("%s: cudnnSetStream failed", who);
    fe::error_t st = p->graph->execute(handle, pack, workspace);
    if (!st.is_good()) die("%s: cuDNN attention failed: %s", who, st.get_message().c_str());
}

static size_t up256(size_t bytes) { return (bytes + 255) & ~(size_t)255; }

/* cuDNN's graph for one direction, or NULL where it is not to run (DELTAMLA_ATTENTION=own,
 * or a shape it refused) */
static const sdpa_plan *wanted_plan(int backward, int B, int T, int H, int Dk, int Dv, float scale)
{
    return cudnn_wanted() ? get_plan(backward, B, T, H, Dk, Dv, scale) : NULL;
}

/* whether attn_cudnn_forward_bf16 and attn_cudnn_backward_bf16 both run this shape */
extern "C" int attn_cudnn_bf16_ok(int B, int T, int H, int Dk, int Dv, float scale)
{
    return wanted_plan(0, B, T, H, Dk, Dv, scale) && wanted_plan(1, B, T, H, Dk, Dv, scale);
}

/* The forward on bf16 operands in the op's [B, T, H, D] layout: ob = attention(qb, kb,
 * vb) in bf16, lse in fp32. 0 where cuDNN does not run it (nothing written). */
extern "C" int attn_cudnn_forward_bf16(bf16 *ob, float *lse, const bf16 *qb, const bf16 *kb, const bf16 *vb, int B,
                                       int T, int H, int Dk, int Dv, float scale)
{
    const sdpa_plan *p = wanted_plan(0, B, T, H, Dk, Dv, scale);
    if (!p) return 0;
    void *workspace = cuda_grow(&buf, &buf_bytes, (size_t)p->workspace);
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, (void *)qb}, {UID_K, (void *)kb}, {UID_V, (void *)vb}, {UID_O, ob}, {UID_STATS, lse}};
    run_plan(p, pack, workspace, "cuda_attention_forward");
    calls++;
    return 1;
}

/* The backward on bf16 operands: dqb, dkb, dvb written in bf16. 0 where cuDNN does not
 * run it (nothing written). */
extern "C" int attn_cudnn_backward_bf16(bf16 *dqb, bf16 *dkb, bf16 *dvb, const bf16 *dob, const bf16 *ob,
                                        const float *lse, const bf16 *qb, const bf16 *kb, const bf16 *vb, int B, int T,
                                        int H, int Dk, int Dv, float scale)
{
    const sdpa_plan *p = wanted_plan(1, B, T, H, Dk, Dv, scale);
    if (!p) return 0;
    void *workspace = cuda_grow(&buf, &buf_bytes, (size_t)p->workspace);
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, (void *)qb},  {UID_K, (void *)kb},   {UID_V, (void *)vb}, {UID_O, (void *)ob},
        {UID_DO, (void *)dob}, {UID_STATS, (void *)lse}, {UID_DQ, dqb},      {UID_DK, dkb}, {UID_DV, dvb}};
    run_plan(p, pack, workspace, "cuda_attention_backward");
    calls++;
    return 1;
}

/* The fp32 op: each operand rounded to a bf16 copy (in copies, kept apart from cuDNN's
 * workspace), then the bf16 form. */
static void *copies;
static size_t copies_bytes;

extern "C" int attn_cudnn_forward(float *out, float *lse, const float *q, const float *k, const float *v, int B, int T,
                                  int H, int Dk, int Dv, float scale)
{
    if (!wanted_plan(0, B, T, H, Dk, Dv, scale)) return 0;
    const size_t nk = (size_t)B * T * H * Dk, nv = (size_t)B * T * H * Dv;
    const size_t sk = up256(nk * sizeof(bf16)), sv = up256(nv * sizeof(bf16));
    char *base = (char *)cuda_grow(&copies, &copies_bytes, 2 * sk + 2 * sv);
    bf16 *qb = (bf16 *)base, *kb = (bf16 *)(base + sk), *vb = (bf16 *)(base + 2 * sk);
    bf16 *ob = (bf16 *)(base + 2 * sk + sv);
    cuda_to_bf16(qb, q, nk);
    cuda_to_bf16(kb, k, nk);
    cuda_to_bf16(vb, v, nv);
    attn_cudnn_forward_bf16(ob, lse, qb, kb, vb, B, T, H, Dk, Dv, scale);
    attn_from_bf16(out, ob, nv, 0);
    return 1;
}

extern "C" int attn_cudnn_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                                   const float *lse, const float *q, const float *k, const float *v, int B, int T,
                                   int H, int Dk, int Dv, float scale, int set)
{
    if (!wanted_plan(1, B, T, H, Dk, Dv, scale)) return 0;
    const size_t nk = (size_t)B * T * H * Dk, nv = (size_t)B * T * H * Dv;
    const size_t sk = up256(nk * sizeof(bf16)), sv = up256(nv * sizeof(bf16));
    char *base = (char *)cuda_grow(&copies, &copies_bytes, 4 * sk + 5 * sv);
    bf16 *qb = (bf16 *)base, *kb = (bf16 *)(base + sk), *dqb = (bf16 *)(base + 2 * sk);
    bf16 *dkb = (bf16 *)(base + 3 * sk), *vb = (bf16 *)(base + 4 * sk), *ob = (bf16 *)(base + 4 * sk + sv);
    bf16 *dob = (bf16 *)(base + 4 * sk + 2 * sv), *dvb = (bf16 *)(base + 4 * sk + 3 * sv);
    cuda_to_bf16(qb, q, nk);
    cuda_to_bf16(kb, k, nk);
    cuda_to_bf16(vb, v, nv);
    cuda_to_bf16(ob, out, nv);
    cuda_to_bf16(dob, dout, nv);
    attn_cudnn_backward_bf16(dqb, dkb, dvb, dob, ob, lse, qb, kb, vb, B, T, H, Dk, Dv, scale);
    attn_from_bf16(dq, dqb, nk, !set);
    attn_from_bf16(dk, dkb, nk, !set);
    attn_from_bf16(dv, dvb, nv, !set);
    return 1;
}
