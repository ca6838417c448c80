/* bench_mixers.c: the two sequence mixers timed alone, each next to its floor: the
 * chunked Gated DeltaNet (gdn_forward / gdn_backward) and causal MLA attention
 * (attention_forward / attention_backward), at the shapes issue 7 compares against other
 * implementations: B 8, T 2048 and B 2, T 8192 with 12 heads (GDN head dim 85, attention
 * q/k 192 and v 128), and GDN at head dim 64 with 16 heads (flash-linear-attention's
 * published figure).
 *
 *   build/bench/bench_mixers [--device cuda|cpu] [--reps N]
 *
 * Each op runs once through the timing wrapper (timed_backend.c), which counts its FLOPs
 * and minimum bytes as bench_step does for the whole step, then `reps` times back to back
 * on the bare backend between two synchronisations; the time per call is the wall time
 * over reps. The floor is the larger of FLOPs over the GEMM rate and bytes over the copy
 * bandwidth, both measured at the start. With the CUDA build, attention runs twice: on
 * the default implementation (cuDNN's fused attention where the build has it) and on our
 * own kernels. The GDN backward is timed both ways: accumulating into the gradients, and
 * writing them (gdn_backward_set, what the model calls). Inputs are random in the model's ranges (GDN keys L2-normalised per head,
 * gates logsigmoid of N(0, 1), beta in (0, 1)).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"
#include "ceilings.h"
#include "timed_backend.h"
#include "train.h"
#include "util.h"

#ifdef DELTAMLA_HAVE_CUDA
/* kernels/attention_cudnn.cpp: 1 routes attention without documents to cuDNN (the
 * default where the build has it), 0 to our own kernels */
void cuda_attention_use_cudnn(int on);
/* kernels/gdn_forward.cu: the GDN state kernels' value columns a block and warps (0: by
 * the shape) */
int cuda_gdn_set_state_cols(int n);
int cuda_gdn_set_state_warps(int n);
/* the GDN's form (forward and backward): 0 by the shape, 1 chained, 2 three kernels */
int cuda_gdn_set_chain(int mode);
#endif

static double gemm_rate, copy_rate;
static int reps = 10;
static int state_cols, state_warps; /* --gdn_state_cols, --gdn_state_warps: 0 lets the op choose */
static int chain_mode;              /* --gdn_form chained|three: 0 lets the op choose */

/* n device floats: uniform in [lo, hi) from stream `name` */
static float *dev_random(const backend *be, const char *name, size_t n, double lo, double hi)
{
    float *h = xmalloc(n * sizeof *h);
    const uint64_t key = rng_key(1, name);
    for (size_t i = 0; i < n; i++) h[i] = (float)(lo + (hi - lo) * rng_uniform(key, i));
    float *d = be->alloc(n * sizeof *d);
    be->from_host(d, h, n * sizeof *d);
    free(h);
    return d;
}

/* one line: the op's time per call against its floor (fl FLOPs, by bytes per call) */
static void report(const char *what, double sec, double fl, double by)
{
    const double floor_s = fl / gemm_rate > by / copy_rate ? fl / gemm_rate : by / copy_rate;
    printf("%-58s %9.3f ms  floor %7.3f ms  ratio %5.1f  %7.1f TFLOP/s\n", what, 1e3 * sec, 1e3 * floor_s,
           sec / floor_s, fl / sec / 1e12);
    fflush(stdout);
}

/* the FLOPs and bytes the timing wrapper charged family f since the last reset */
static void charged(op_family f, double *fl, double *by)
{
    const family_stats *fs = timed_stats();
    *fl = fs[f].flops;
    *by = fs[f].bytes;
}

static void bench_gdn(const backend *be, const backend *tb, int B, int T, int H, int D)
{
    const size_t nv = (size_t)B * T * H * D, ns = (size_t)B * T * H;
    float *q = dev_random(be, "q", nv, -1, 1), *v = dev_random(be, "v", nv, -1, 1);
    float *dout = dev_random(be, "dout", nv, -1, 1), *beta = dev_random(be, "beta", ns, 0.01, 0.99);
    float *hk = xmalloc(nv * sizeof *hk), *hg = xmalloc(ns * sizeof *hg);
    const uint64_t kk = rng_key(1, "k"), kg = rng_key(1, "g");
    for (size_t r = 0; r < ns; r++) { /* keys L2-normalised per head; g = logsigmoid(N(0, 1)) */
        double s = 0;
        for (int e = 0; e < D; e++) {
            hk[r * D + e] = (float)rng_normal(kk, r * D + e);
            s += (double)hk[r * D + e] * hk[r * D + e];
        }
        for (int e = 0; e < D; e++) hk[r * D + e] = (float)(hk[r * D + e] / sqrt(s));
        const double z = rng_normal(kg, r);
        hg[r] = (float)(-log1p(exp(-z)));
    }
    float *k = be->alloc(nv * sizeof *k), *g = be->alloc(ns * sizeof *g);
    be->from_host(k, hk, nv * sizeof *k);
    be->from_host(g, hg, ns * sizeof *g);
    free(hk);
    free(hg);
    float *o = be->alloc(nv * sizeof *o), *st = be->alloc(gdn_state_floats(B, T, H, D) * sizeof *st);
    float *dq = be->alloc(nv * sizeof *dq), *dk = be->alloc(nv * sizeof *dk), *dv = be->alloc(nv * sizeof *dv);
    float *dg = be->alloc(ns * sizeof *dg), *db = be->alloc(ns * sizeof *db);
    const float scale = 1.0f / sqrtf((float)D);
    double ff, fb, bf, bb;

    timed_reset();
    tb->gdn_forward(o, st, q, k, v, g, beta, NULL, B, T, H, D, scale);
    tb->gdn_backward(dq, dk, dv, dg, db, dout, q, k, v, g, beta, st, NULL, B, T, H, D, scale);
    charged(FAM_GDN_FWD, &ff, &bf);
    charged(FAM_GDN_BWD, &fb, &bb);
    be->sync();
    double t0 = wall_time();
    for (int r = 0; r < reps; r++) be->gdn_forward(o, st, q, k, v, g, beta, NULL, B, T, H, D, scale);
    be->sync();
    double t1 = wall_time();
    for (int r = 0; r < reps; r++)
        be->gdn_backward(dq, dk, dv, dg, db, dout, q, k, v, g, beta, st, NULL, B, T, H, D, scale);
    be->sync();
    double t2 = wall_time();
    for (int r = 0; r < reps; r++)
        be->gdn_backward_set(dq, dk, dv, dg, db, dout, q, k, v, g, beta, st, NULL, B, T, H, D, scale);
    be->sync();
    double t3 = wall_time();
    char what[96];
    snprintf(what, sizeof what, "gdn forward   B %d T %d H %d D %d", B, T, H, D);
    report(what, (t1 - t0) / reps, ff, bf);
    snprintf(what, sizeof what, "gdn backward  B %d T %d H %d D %d", B, T, H, D);
    report(what, (t2 - t1) / reps, fb, bb);
    snprintf(what, sizeof what, "gdn fwd + bwd B %d T %d H %d D %d", B, T, H, D);
    report(what, (t2 - t0) / reps, ff + fb, bf + bb);
    /* the model's call: gradients written, not accumulated (bytes charged as above) */
    snprintf(what, sizeof what, "gdn backward_set (the model's) B %d T %d", B, T);
    report(what, (t3 - t2) / reps, fb, bb);
    snprintf(what, sizeof what, "gdn fwd + bwd_set B %d T %d H %d D %d", B, T, H, D);
    report(what, (t1 - t0 + t3 - t2) / reps, ff + fb, bf + bb);
    float *bufs[] = {q, k, v, g, beta, dout, o, st, dq, dk, dv, dg, db};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->free(bufs[i]);
}

static void bench_attention(const backend *be, const backend *tb, int B, int T, int H, int Dk, int Dv,
                            const char *impl)
{
    const size_t nq = (size_t)B * T * H * Dk, nv = (size_t)B * T * H * Dv, nl = (size_t)B * T * H;
    float *q = dev_random(be, "aq", nq, -1.5, 1.5), *k = dev_random(be, "ak", nq, -1.5, 1.5);
    float *v = dev_random(be, "av", nv, -1, 1), *dout = dev_random(be, "adout", nv, -1, 1);
    float *out = be->alloc(nv * sizeof *out), *lse = be->alloc(nl * sizeof *lse);
    float *dq = be->alloc(nq * sizeof *dq), *dk = be->alloc(nq * sizeof *dk), *dv = be->alloc(nv * sizeof *dv);
    const float scale = 1.0f / sqrtf((float)Dk);
    double ff, fb, bf, bb;

    timed_reset();
    tb->attention_forward(out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    tb->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    charged(FAM_ATTN_FWD, &ff, &bf);
    charged(FAM_ATTN_BWD, &fb, &bb);
    be->sync();
    double t0 = wall_time();
    for (int r = 0; r < reps; r++) be->attention_forward(out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    be->sync();
    double t1 = wall_time();
    for (int r = 0; r < reps; r++)
        be->attention_backward(dq, dk, dv, dout, out, lse, q, k, v, NULL, B, T, H, Dk, Dv, scale);
    be->sync();
    double t2 = wall_time();
    char what[96];
    snprintf(what, sizeof what, "attention forward  B %d T %d H %d %s", B, T, H, impl);
    report(what, (t1 - t0) / reps, ff, bf);
    snprintf(what, sizeof what, "attention backward B %d T %d H %d %s", B, T, H, impl);
    report(what, (t2 - t1) / reps, fb, bb);
    float *bufs[] = {q, k, v, dout, out, lse, dq, dk, dv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->free(bufs[i]);
}

int main(int argc, char **argv)
{
    config c;
    config_defaults(&c);
    snprintf(c.device, sizeof c.device, "cuda");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) snprintf(c.device, sizeof c.device, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gdn_state_cols") && i + 1 < argc) state_cols = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gdn_state_warps") && i + 1 < argc) state_warps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gdn_form") && i + 1 < argc) {
            const char *f = argv[++i];
            if (!strcmp(f, "chained")) chain_mode = 1;
            else if (!strcmp(f, "three")) chain_mode = 2;
            else die("bench_mixers: --gdn_form %s (chained or three)", f);
        } else
            die("bench_mixers: unknown argument %s (flags: --device cuda|cpu, --reps N, --gdn_state_cols N, "
                "--gdn_state_warps N, --gdn_form chained|three)", argv[i]);
    }
    if (reps < 1) die("bench_mixers: --reps must be at least 1");
    const backend *be = train_backend(&c);
    const backend *tb = timed_backend(be);
    if (state_cols || state_warps || chain_mode) {
#ifdef DELTAMLA_HAVE_CUDA
        if (strcmp(be->name, "cuda"))
            die("bench_mixers: --gdn_state_cols, --gdn_state_warps and --gdn_form need --device cuda");
        cuda_gdn_set_state_cols(state_cols);
        cuda_gdn_set_state_warps(state_warps);
        cuda_gdn_set_chain(chain_mode);
#else
        die("bench_mixers: --gdn_state_cols, --gdn_state_warps and --gdn_form need a CUDA build");
#endif
    }
    gemm_rate = bench_gemm_rate(be);
    copy_rate = bench_copy_rate(be);
    printf("# bench_mixers: device %s, %d calls each; measured ceilings: GEMM %.1f TFLOP/s, copy %.1f GB/s\n",
           be->name, reps, gemm_rate / 1e12, copy_rate / 1e9);
    printf("# time per call (wall time of back-to-back calls between syncs); floor = max(FLOPs / GEMM rate, "
           "bytes / copy rate)\n");
    fflush(stdout);

    bench_gdn(be, tb, 8, 2048, 12, 85);
    bench_gdn(be, tb, 2, 8192, 12, 85);
    bench_gdn(be, tb, 8, 2048, 16, 64);
#ifdef DELTAMLA_HAVE_CUDA
    if (!strcmp(be->name, "cuda")) {
        for (int own = 0; own < 2; own++) {
            cuda_attention_use_cudnn(!own);
            const char *impl = own ? "[own kernels]" : "[default]";
            bench_attention(be, tb, 8, 2048, 12, 192, 128, impl);
            bench_attention(be, tb, 2, 8192, 12, 192, 128, impl);
        }
        cuda_attention_use_cudnn(1);
        return 0;
    }
#endif
    bench_attention(be, tb, 8, 2048, 12, 192, 128, "");
    bench_attention(be, tb, 2, 8192, 12, 192, 128, "");
    return 0;
}
