/* test_optim.c: checks the optimizer updates of the CPU backend (src/cpu/cpu_optim.c),
 * built in double.
 *
 *   - AdamW: three steps (step 1, 2, 3, a new gradient each time) against a
 *     straightforward transcription of torch.optim.AdamW's update;
 *   - NS5: the orthogonalised matrix, read out of a Muon step with mu = 0, wd = 0,
 *     lr = 1 and p = 0 (so p = -sqrt(max(1, rows/cols)) NS5(g)), against a float64
 *     transcription of MODEL.md section 9, for a tall, a wide and a square matrix;
 *   - NS5: the singular values of its output (eigenvalues of the small Gram matrix by
 *     Jacobi rotations) lie in [0.5, 1.5] for well-conditioned inputs;
 *   - Muon: three steps (mu 0.95, wd 0.1) against the transcription, p and the momentum
 *     buffer, tall and wide; the work buffer of muon_work_floats(rows, cols) reals is
 *     enough (guard values past its end stay intact);
 *   - Muon batch: muon_update_batch on three matrices of one shape, three steps, gives
 *     bit for bit what three muon_update calls give, and stays within a work buffer of
 *     muon_batch_work_floats(3, rows, cols) reals.
 */
#include "cpu_ops.h"
#include "backend.h" /* muon_work_floats, defined in src/cpu/cpu_optim.c */
#include "gradcheck.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GUARD 9
#define GUARD_VALUE 12345.678

static double *dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof *p);
    if (!p) {
        fprintf(stderr, "test_optim: out of memory\n");
        exit(1);
    }
    return p;
}

/* ------------------------------------------------------------- AdamW ------------ */

static void test_adamw(uint64_t *st)
{
    enum { n = 37, steps = 3 };
    const double lr = 3e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
    double p[n], m[n] = {0}, v[n] = {0}, ep[n], em[n] = {0}, ev[n] = {0}, g[n];
    gc_fill(p, n, st, -1, 1);
    memcpy(ep, p, sizeof p);
    for (int t = 1; t <= steps; t++) {
        gc_fill(g, n, st, -2, 2);
        cpu_adamw_update(p, g, m, v, n, lr, b1, b2, eps, wd, t);
        for (int i = 0; i < n; i++) {
            ep[i] = ep[i] * (1 - lr * wd);
            em[i] = b1 * em[i] + (1 - b1) * g[i];
            ev[i] = b2 * ev[i] + (1 - b2) * g[i] * g[i];
            double bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);
            double denom = sqrt(ev[i]) / sqrt(bc2) + eps;
            ep[i] = ep[i] - (lr / bc1) * em[i] / denom;
        }
    }
    gc_compare("adamw 3 steps: p vs transcription", p, ep, n, 1e-14);
    gc_compare("adamw 3 steps: m vs transcription", m, em, n, 1e-14);
    gc_compare("adamw 3 steps: v vs transcription", v, ev, n, 1e-14);
}

/* ------------------------------------------------------- NS5 and Muon ----------- */

/* c [m, n] = a [m, k] b [k, n] */
static void matmul(double *c, const double *a, const double *b, int m, int k, int n)
{
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int l = 0; l < k; l++) s += a[i * k + l] * b[l * n + j];
            c[i * n + j] = s;
        }
}

/* dst [c, r] = src [r, c]^T */
static void transpose(double *dst, const double *src, int r, int c)
{
    for (int i = 0; i < r; i++)
        for (int j = 0; j < c; j++) dst[j * r + i] = src[i * c + j];
}

/* out [rows, cols] = NS5(g), line by line as MODEL.md section 9 writes it */
static void ns5_reference(double *out, const double *g, int rows, int cols)
{
    const double a = 3.4445, b = -4.7750, c = 2.0315;
    int tall = rows > cols, m = tall ? cols : rows, n = tall ? rows : cols;
    double *x = dalloc((size_t)m * n), *xt = dalloc((size_t)m * n), *A = dalloc((size_t)m * m);
    double *AA = dalloc((size_t)m * m), *Bm = dalloc((size_t)m * m), *BX = dalloc((size_t)m * n);
    if (tall)
        transpose(x, g, rows, cols);
    else
        memcpy(x, g, (size_t)m * n * sizeof *x);
    double norm = sqrt(gc_dot(x, x, (size_t)m * n));
    for (int e = 0; e < m * n; e++) x[e] /= fmax(norm, 1e-7);
    for (int it = 0; it < 5; it++) {
        transpose(xt, x, m, n);
        matmul(A, x, xt, m, n, m);
        matmul(AA, A, A, m, m, m);
        for (int e = 0; e < m * m; e++) Bm[e] = b * A[e] + c * AA[e];
        matmul(BX, Bm, x, m, m, n);
        for (int e = 0; e < m * n; e++) x[e] = a * x[e] + BX[e];
    }
    if (tall)
        transpose(out, x, m, n);
    else
        memcpy(out, x, (size_t)m * n * sizeof *out);
    free(x), free(xt), free(A), free(AA), free(Bm), free(BX);
}

/* work buffer of exactly muon_work_floats(rows, cols) reals followed by guard values */
static double *work_new(int rows, int cols)
{
    size_t nw = muon_work_floats(rows, cols);
    double *w = dalloc(nw + GUARD);
    for (int i = 0; i < GUARD; i++) w[nw + i] = GUARD_VALUE;
    return w;
}

static int work_guard_ok(const double *w, int rows, int cols)
{
    size_t nw = muon_work_floats(rows, cols);
    for (int i = 0; i < GUARD; i++)
        if (w[nw + i] != GUARD_VALUE) return 0;
    return 1;
}

/* eigenvalues of the symmetric s [n, n] (destroyed) by cyclic Jacobi rotations */
static void jacobi_eigenvalues(double *s, int n, double *eig)
{
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) off += s[p * n + q] * s[p * n + q];
        if (off < 1e-30) break;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = s[p * n + q];
                if (fabs(apq) < 1e-300) continue;
                double theta = (s[q * n + q] - s[p * n + p]) / (2 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
                double c = 1 / sqrt(t * t + 1), sn = t * c;
                for (int k = 0; k < n; k++) {
                    double kp = s[k * n + p], kq = s[k * n + q];
                    s[k * n + p] = c * kp - sn * kq;
                    s[k * n + q] = sn * kp + c * kq;
                }
                for (int k = 0; k < n; k++) {
                    double pk = s[p * n + k], qk = s[q * n + k];
                    s[p * n + k] = c * pk - sn * qk;
                    s[q * n + k] = sn * pk + c * qk;
                }
            }
    }
    for (int i = 0; i < n; i++) eig[i] = s[i * n + i];
}

static void test_ns5(const char *shape, int rows, int cols, uint64_t *st)
{
    size_t ne = (size_t)rows * cols;
    double *g = dalloc(ne), *p = dalloc(ne), *buf = dalloc(ne), *want = dalloc(ne), *got = dalloc(ne);
    double *work = work_new(rows, cols);
    gc_fill(g, ne, st, -1, 1);
    /* a diagonal lift keeps the input well-conditioned, so that five steps suffice */
    for (int i = 0; i < rows && i < cols; i++) g[i * cols + i] += 2.0;
    cpu_muon_update(p, g, buf, work, rows, cols, 1.0, 0.0, 0.0);
    double adj = sqrt(fmax(1.0, (double)rows / cols));
    for (size_t e = 0; e < ne; e++) got[e] = -p[e] / adj;
    ns5_reference(want, g, rows, cols);
    char what[160], detail[128];
    snprintf(what, sizeof what, "ns5 %s %dx%d vs float64 transcription", shape, rows, cols);
    gc_compare(what, got, want, ne, 1e-12);

    /* singular values: eigenvalues of the Gram matrix over the smaller side */
    int m = rows < cols ? rows : cols;
    double *gram = dalloc((size_t)m * m), *eig = dalloc(m);
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            double s = 0;
            if (rows >= cols)
                for (int r = 0; r < rows; r++) s += got[r * cols + i] * got[r * cols + j];
            else
                for (int c = 0; c < cols; c++) s += got[i * cols + c] * got[j * cols + c];
            gram[i * m + j] = s;
        }
    jacobi_eigenvalues(gram, m, eig);
    double smin = INFINITY, smax = 0;
    for (int i = 0; i < m; i++) {
        double sv = sqrt(fmax(eig[i], 0));
        smin = fmin(smin, sv), smax = fmax(smax, sv);
    }
    snprintf(what, sizeof what, "ns5 %s %dx%d: singular values in [0.5, 1.5]", shape, rows, cols);
    snprintf(detail, sizeof detail, "range [%.4f, %.4f]", smin, smax);
    gc_report(what, smin >= 0.5 && smax <= 1.5, detail);
    snprintf(what, sizeof what, "muon %s %dx%d: work buffer of muon_work_floats is enough", shape, rows, cols);
    gc_report(what, work_guard_ok(work, rows, cols), NULL);
    free(g), free(p), free(buf), free(want), free(got), free(work), free(gram), free(eig);
}

static void test_muon_steps(const char *shape, int rows, int cols, uint64_t *st)
{
    const double lr = 0.02, mu = 0.95, wd = 0.1;
    size_t ne = (size_t)rows * cols;
    double *p = dalloc(ne), *buf = dalloc(ne), *g = dalloc(ne), *work = work_new(rows, cols);
    double *ep = dalloc(ne), *ebuf = dalloc(ne), *nest = dalloc(ne), *o = dalloc(ne);
    gc_fill(p, ne, st, -0.5, 0.5);
    memcpy(ep, p, ne * sizeof *p);
    for (int step = 0; step < 3; step++) {
        gc_fill(g, ne, st, -1, 1);
        cpu_muon_update(p, g, buf, work, rows, cols, lr, mu, wd);
        for (size_t e = 0; e < ne; e++) {
            ebuf[e] = mu * ebuf[e] + (1 - mu) * g[e];
            nest[e] = (1 - mu) * g[e] + mu * ebuf[e];
        }
        ns5_reference(o, nest, rows, cols);
        for (size_t e = 0; e < ne; e++) {
            ep[e] = ep[e] * (1 - lr * wd);
            ep[e] = ep[e] - lr * sqrt(fmax(1.0, (double)rows / cols)) * o[e];
        }
    }
    char what[160];
    snprintf(what, sizeof what, "muon 3 steps %s %dx%d: p vs transcription", shape, rows, cols);
    gc_compare(what, p, ep, ne, 1e-12);
    snprintf(what, sizeof what, "muon 3 steps %s %dx%d: momentum buffer vs transcription", shape, rows, cols);
    gc_compare(what, buf, ebuf, ne, 1e-14);
    snprintf(what, sizeof what, "muon 3 steps %s %dx%d: work buffer of muon_work_floats is enough", shape, rows, cols);
    gc_report(what, work_guard_ok(work, rows, cols), NULL);
    free(p), free(buf), free(g), free(work), free(ep), free(ebuf), free(nest), free(o);
}

static void test_muon_batch(const char *shape, int rows, int cols, uint64_t *st)
{
    enum { count = 3 };
    const double lr = 0.02, mu = 0.95, wd = 0.1;
    size_t ne = (size_t)rows * cols, nw = muon_batch_work_floats(count, rows, cols);
    double *p[count], *buf[count], *g[count], *ep[count], *ebuf[count];
    double *work = dalloc(nw + GUARD), *ework = work_new(rows, cols);
    for (int i = 0; i < GUARD; i++) work[nw + i] = GUARD_VALUE;
    for (int i = 0; i < count; i++) {
        p[i] = dalloc(ne), buf[i] = dalloc(ne), g[i] = dalloc(ne), ep[i] = dalloc(ne), ebuf[i] = dalloc(ne);
        gc_fill(p[i], ne, st, -0.5, 0.5);
        memcpy(ep[i], p[i], ne * sizeof *p[i]);
    }
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < count; i++) gc_fill(g[i], ne, st, -1, 1);
        cpu_muon_update_batch(p, (const double *const *)g, buf, work, count, rows, cols, lr, mu, wd);
        for (int i = 0; i < count; i++) cpu_muon_update(ep[i], g[i], ebuf[i], ework, rows, cols, lr, mu, wd);
    }
    int same = 1;
    for (int i = 0; i < count; i++)
        same &= !memcmp(p[i], ep[i], ne * sizeof *p[i]) && !memcmp(buf[i], ebuf[i], ne * sizeof *buf[i]);
    int guard = 1;
    for (int i = 0; i < GUARD; i++) guard &= work[nw + i] == GUARD_VALUE;
    char what[160];
    snprintf(what, sizeof what, "muon batch of %d %s %dx%d, 3 steps: p, buf bitwise as muon_update", count, shape,
             rows, cols);
    gc_report(what, same, NULL);
    snprintf(what, sizeof what, "muon batch %s %dx%d: work buffer of muon_batch_work_floats is enough", shape, rows,
             cols);
    gc_report(what, guard, NULL);
    for (int i = 0; i < count; i++) free(p[i]), free(buf[i]), free(g[i]), free(ep[i]), free(ebuf[i]);
    free(work), free(ework);
}

int main(void)
{
    uint64_t st = 0xad0a3b5eULL;
    test_adamw(&st);
    test_ns5("tall", 13, 7, &st);
    test_ns5("wide", 6, 11, &st);
    test_ns5("square", 9, 9, &st);
    test_muon_steps("tall", 11, 6, &st);
    test_muon_steps("wide", 5, 9, &st);
    test_muon_batch("tall", 11, 6, &st);
    test_muon_batch("wide", 5, 9, &st);
    return gc_failures() != 0;
}
