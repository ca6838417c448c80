/* cpu_optim.c: the optimizer updates of the CPU backend (MODEL.md section 9): AdamW as
 * torch.optim.AdamW computes it, and Muon (nesterov momentum + Newton-Schulz
 * orthogonalisation) as torch.optim.Muon computes it, one tensor per call.
 *
 * AdamW is elementwise: its scalar corrections are computed once in double, the
 * per-element arithmetic in double, and the state stored back as `real`. Muon's
 * Newton-Schulz iteration runs in `real` (torch runs it in bf16; this is the exact
 * oracle a float64 transcription can be held to in the double build). Its matrix
 * products run one output row per task with a fixed summation order, so the update is
 * bit-identical whatever the thread count.
 */
#include "cpu_ops.h"
#include "../backend.h"

#include <math.h>

/* NS5 coefficients (a, b, c) and the norm floor of torch.optim.Muon */
#define NS_A ((real)3.4445)
#define NS_B ((real)-4.7750)
#define NS_C ((real)2.0315)
#define NS_STEPS 5
#define NS_EPS 1e-7

/* the gradient scale of backend.h's grad_scale: each g read as (real)(g * cpu_grad_scale) */
static real cpu_grad_scale_now = 1;
void cpu_grad_scale(real s) { cpu_grad_scale_now = s; }
static inline real scaled(real g) { return cpu_grad_scale_now == 1 ? g : (real)(g * cpu_grad_scale_now); }

/* p, g, m, v [n]: one torch.optim.AdamW step (decoupled weight decay first, then the
 * bias-corrected Adam step); step is 1-based. Updates p, m, v in place. */
void cpu_adamw_update(real *p, const real *g, real *m, real *v, size_t n, real lr, real beta1,
                      real beta2, real eps, real wd, int step)
{
    const double b1 = beta1, b2 = beta2;
    const double bc1 = 1.0 - pow(b1, step);
    const double bc2_sqrt = sqrt(1.0 - pow(b2, step));
    const double step_size = (double)lr / bc1;
    const double decay = 1.0 - (double)lr * (double)wd;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        const double gi = scaled(g[i]);
        m[i] = (real)(b1 * m[i] + (1.0 - b1) * gi);
        v[i] = (real)(b2 * v[i] + (1.0 - b2) * gi * gi);
        const double denom = sqrt((double)v[i]) / bc2_sqrt + (double)eps;
        const real decayed = (real)(decay * p[i]);
        p[i] = (real)(decayed - step_size * (double)m[i] / denom);
    }
}

/* Scratch for an [m, n] Newton-Schulz problem (m <= n): X and the next X (m*n each),
 * A = X X^T and Bm (m*m each). */
size_t muon_work_floats(int rows, int cols)
{
    const size_t m = (size_t)(rows < cols ? rows : cols), n = (size_t)(rows < cols ? cols : rows);
    return 2 * m * n + 2 * m * m;
}

/* The batch's matrices lie one after another in work, each piece rounded up to 64
 * floats (see backend.h); the CPU runs them one at a time in the first slot. */
static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

size_t muon_batch_work_floats(int count, int rows, int cols)
{
    const size_t m = (size_t)(rows < cols ? rows : cols), n = (size_t)(rows < cols ? cols : rows);
    return (size_t)count * (2 * round64(m * n) + 2 * round64(m * m));
}

/* Five Newton-Schulz steps on x [m, n] (m <= n), already normalised: each step
 * A = X X^T, Bm = b A + c A A, X <- a X + Bm X. xn [m, n], a [m, m], bm [m, m] are
 * scratch. Returns the buffer (x or xn) that holds the result. A is symmetric, so the
 * rows of A serve as its columns and every product below is a row-by-row dot or a
 * row accumulation. */
static real *newton_schulz5(real *x, real *xn, real *a, real *bm, int m, int n)
{
    for (int it = 0; it < NS_STEPS; it++) {
#pragma omp parallel for schedule(static)
        for (int i = 0; i < m; i++) {
            const real *xi = x + (size_t)i * n;
            for (int j = 0; j < m; j++) {
                const real *xj = x + (size_t)j * n;
                real s = 0;
                for (int c = 0; c < n; c++) s += xi[c] * xj[c];
                a[(size_t)i * m + j] = s;
            }
        }
#pragma omp parallel for schedule(static)
        for (int i = 0; i < m; i++) {
            const real *ai = a + (size_t)i * m;
            for (int j = 0; j < m; j++) {
                const real *aj = a + (size_t)j * m;
                real s = 0;
                for (int l = 0; l < m; l++) s += ai[l] * aj[l];
                bm[(size_t)i * m + j] = NS_B * ai[j] + NS_C * s;
            }
        }
#pragma omp parallel for schedule(static)
        for (int i = 0; i < m; i++) {
            real *yi = xn + (size_t)i * n;
            const real *bi = bm + (size_t)i * m;
            for (int c = 0; c < n; c++) yi[c] = 0;
            for (int l = 0; l < m; l++) {
                const real w = bi[l];
                const real *xl = x + (size_t)l * n;
                for (int c = 0; c < n; c++) yi[c] += w * xl[c];
            }
            const real *xi = x + (size_t)i * n;
            for (int c = 0; c < n; c++) yi[c] = NS_A * xi[c] + yi[c];
        }
        real *t = x;
        x = xn;
        xn = t;
    }
    return x;
}

/* p, g, buf [rows, cols]: one torch.optim.Muon step with nesterov momentum (see
 * backend.h); updates p and buf in place. work holds muon_work_floats(rows, cols)
 * reals; the problem is transposed when rows > cols so that X X^T is the small Gram
 * matrix. */
void cpu_muon_update(real *p, const real *g, real *buf, real *work, int rows, int cols, real lr,
                     real mu, real wd)
{
    const int tall = rows > cols;
    const int m = tall ? cols : rows, n = tall ? rows : cols;
    real *x = work, *xn = work + (size_t)m * n;
    real *a = xn + (size_t)m * n, *bm = a + (size_t)m * m;
    const real one_mu = 1 - mu;

#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            const size_t e = (size_t)r * cols + c;
            const real ge = scaled(g[e]);
            buf[e] = mu * buf[e] + one_mu * ge;
            x[tall ? (size_t)c * rows + r : e] = one_mu * ge + mu * buf[e];
        }

    /* the Frobenius norm is one sum over all elements: serial keeps its order fixed */
    double ss = 0;
    for (size_t e = 0; e < (size_t)m * n; e++) ss += (double)x[e] * x[e];
    const real norm = (real)fmax(sqrt(ss), NS_EPS);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < m; i++)
        for (int c = 0; c < n; c++) x[(size_t)i * n + c] /= norm;

    const real *o = newton_schulz5(x, xn, a, bm, m, n);

    const double decay = 1.0 - (double)lr * (double)wd;
    const double step = (double)lr * sqrt(fmax(1.0, (double)rows / cols));
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            const size_t e = (size_t)r * cols + c;
            const real decayed = (real)(decay * p[e]);
            p[e] = (real)(decayed - step * (double)o[tall ? (size_t)c * rows + r : e]);
        }
}

/* count matrices of one shape: count muon_update calls, one after another, in the first
 * muon_work_floats(rows, cols) reals of work (muon_batch_work_floats is at least that),
 * so each matrix gets exactly the bits a muon_update call gives it. */
void cpu_muon_update_batch(real *const *p, const real *const *g, real *const *buf, real *work, int count,
                           int rows, int cols, real lr, real mu, real wd)
{
    for (int i = 0; i < count; i++) cpu_muon_update(p[i], g[i], buf[i], work, rows, cols, lr, mu, wd);
}
