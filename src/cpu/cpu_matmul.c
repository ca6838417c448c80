/* cpu_matmul.c: the dense Linear layer on the CPU, y = x W^T, and its two gradients.
 *
 * Every output element is one thread's sum over the reduction index taken in increasing
 * order, starting from zero (forward) or from the gradient's old value (backward), so
 * results do not depend on the thread count. Speed comes from register tiles and cache
 * blocking, never from reordering a sum:
 *   - the forward computes 4 x 4 tiles of dot products of contiguous rows of x and W
 *     (each loaded value feeds four sums);
 *   - the backward products are written as tiles of output rows accumulating scaled
 *     rows of the right-hand operand, an axpy over contiguous memory that the compiler
 *     vectorises across output columns, which leaves each column's sum untouched.
 * Each parallel task owns a block of output rows by a block of output columns, so
 * tasks never share an output and need no barrier; within a task the operand that the
 * tiles stream through is cut into slices small enough to stay in cache while every
 * tile of the task uses them. The backward's slices cut the reduction index and run in
 * increasing order, each tile storing its running sums between slices, which performs
 * exactly the additions of the unsliced loop.
 *
 * The forward with a residual (cpu_matmul_forward_add) adds r to each finished sum as the
 * tile stores it: one rounding of s + r, the same as add_inplace's y += r on the stored
 * s (addition commutes exactly), so it equals the two-op form bit for bit. Each element
 * of r is read just before the same thread writes that element of y, so r may be y.
 */
#include "cpu_ops.h"

#include <stddef.h>

/* forward register tile: rows of x by rows of W */
#define FWD_TILE 4
/* rows of x per forward task */
#define FWD_GROUP_ROWS 32
/* reals of W per forward task (128 KiB in float): its rows are reused by every row tile */
#define FWD_SLICE_REALS 32768

/* backward register tile: rows of the output by contiguous output columns */
#define BWD_ROWS 4
#define BWD_COLS 16
/* output rows and columns per backward task */
#define BWD_GROUP_ROWS 32
#define BWD_GROUP_COLS 64
/* reduction steps per backward slice: a 256 x 64 slice of the right-hand operand */
#define BWD_SLICE 256
/* Below this many multiply-adds a parallel region costs more than the product. */
#define PAR_MIN_MACS 65536

static int min_int(int a, int b) { return a < b ? a : b; }

/* Dot products of a FWD_TILE x FWD_TILE tile: y[r, o] = sum_k x_r[k] w_o[k] for the
 * rows x0.. (stride ldx) and w0.. (stride ldw); 16 independent sums in registers. res:
 * NULL, or the residual tile (stride ldy, as y; may be y) added to the sums as they are
 * stored. */
static void fwd_tile(real *y, size_t ldy, const real *x, size_t ldx, const real *w, size_t ldw,
                     int K, const real *res)
{
    const real *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    const real *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    real s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
    real s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
    for (int k = 0; k < K; k++) {
        real a0 = x0[k], a1 = x1[k], a2 = x2[k], a3 = x3[k];
        real b0 = w0[k], b1 = w1[k], b2 = w2[k], b3 = w3[k];
        s00 += a0 * b0; s01 += a0 * b1; s02 += a0 * b2; s03 += a0 * b3;
        s10 += a1 * b0; s11 += a1 * b1; s12 += a1 * b2; s13 += a1 * b3;
        s20 += a2 * b0; s21 += a2 * b1; s22 += a2 * b2; s23 += a2 * b3;
        s30 += a3 * b0; s31 += a3 * b1; s32 += a3 * b2; s33 += a3 * b3;
    }
    if (res) { /* read before y is written: res may be y */
        const real *r0 = res, *r1 = res + ldy, *r2 = res + 2 * ldy, *r3 = res + 3 * ldy;
        s00 += r0[0]; s01 += r0[1]; s02 += r0[2]; s03 += r0[3];
        s10 += r1[0]; s11 += r1[1]; s12 += r1[2]; s13 += r1[3];
        s20 += r2[0]; s21 += r2[1]; s22 += r2[2]; s23 += r2[3];
        s30 += r3[0]; s31 += r3[1]; s32 += r3[2]; s33 += r3[3];
    }
    real *y0 = y, *y1 = y + ldy, *y2 = y + 2 * ldy, *y3 = y + 3 * ldy;
    y0[0] = s00; y0[1] = s01; y0[2] = s02; y0[3] = s03;
    y1[0] = s10; y1[1] = s11; y1[2] = s12; y1[3] = s13;
    y2[0] = s20; y2[1] = s21; y2[2] = s22; y2[3] = s23;
    y3[0] = s30; y3[1] = s31; y3[2] = s32; y3[3] = s33;
}

/* The same sum as one element of fwd_tile, for the ragged edges. */
static real dot(const real *a, const real *b, int K)
{
    real s = 0;
    for (int k = 0; k < K; k++) s += a[k] * b[k];
    return s;
}

/* y [N, out] = x [N, in] W [out, in]^T, plus r [N, out] when r is non-NULL (r may be y);
 * overwrites y. */
static void matmul_forward(real *y, const real *x, const real *w, const real *r, int N, int in, int out)
{
    int slice = in > 0 ? FWD_SLICE_REALS / in / FWD_TILE * FWD_TILE : out;
    if (slice < FWD_TILE) slice = FWD_TILE;
    int row_groups = (N + FWD_GROUP_ROWS - 1) / FWD_GROUP_ROWS;
    int slices = (out + slice - 1) / slice;
    /* slice-major: a thread's consecutive tasks share a slice of W */
#pragma omp parallel for schedule(static) if ((size_t)N * in * out >= PAR_MIN_MACS)
    for (int task = 0; task < slices * row_groups; task++) {
        int o_lo = task / row_groups * slice, o_hi = min_int(out, o_lo + slice);
        int r_lo = task % row_groups * FWD_GROUP_ROWS, r_hi = min_int(N, r_lo + FWD_GROUP_ROWS);
        for (int i0 = r_lo; i0 < r_hi; i0 += FWD_TILE) {
            int nr = min_int(FWD_TILE, r_hi - i0);
            const real *xt = x + (size_t)i0 * in;
            real *yt = y + (size_t)i0 * out;
            const real *rt = r ? r + (size_t)i0 * out : NULL;
            int o0 = o_lo;
            if (nr == FWD_TILE)
                for (; o0 + FWD_TILE <= o_hi; o0 += FWD_TILE)
                    fwd_tile(yt + o0, (size_t)out, xt, (size_t)in, w + (size_t)o0 * in, (size_t)in,
                             in, rt ? rt + o0 : NULL);
            for (int i = 0; i < nr; i++)
                for (int o = o0; o < o_hi; o++) {
                    size_t at = (size_t)i * out + o;
                    real s = dot(xt + (size_t)i * in, w + (size_t)o * in, in);
                    yt[at] = rt ? s + rt[at] : s;
                }
        }
    }
}

/* y [N, out] = x [N, in] W [out, in]^T; overwrites y. */
void cpu_matmul_forward(real *y, const real *x, const real *w, int N, int in, int out)
{
    matmul_forward(y, x, w, NULL, N, in, out);
}

/* y [N, out] = r [N, out] + x [N, in] W [out, in]^T; overwrites y; r may be y, otherwise
 * it must not overlap y. Bit for bit cpu_matmul_forward then cpu_add_inplace(y, r). */
void cpu_matmul_forward_add(real *y, const real *x, const real *w, const real *r, int N, int in, int out)
{
    matmul_forward(y, x, w, r, N, in, out);
}

/* One register tile of axpy_gemm: c[i0 + r, j0 + j] += sum_{k0 <= k < k1} a[i0 + r, k]
 * b[k, j0 + j] for r < nr <= BWD_ROWS, j < nc <= BWD_COLS, adding k in increasing order. */
static void axpy_tile(real *c, size_t ldc, const real *a, size_t a_rs, size_t a_cs,
                      const real *b, size_t ldb, int i0, int nr, int j0, int nc, int k0, int k1)
{
    real acc[BWD_ROWS][BWD_COLS];
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nc; j++) acc[r][j] = c[(size_t)(i0 + r) * ldc + j0 + j];
    if (nr == BWD_ROWS && nc == BWD_COLS) {
        /* fixed trip counts let the compiler keep the tile in vector registers */
        for (int k = k0; k < k1; k++) {
            const real *bk = b + (size_t)k * ldb + j0;
            for (int r = 0; r < BWD_ROWS; r++) {
                real av = a[(size_t)(i0 + r) * a_rs + (size_t)k * a_cs];
                for (int j = 0; j < BWD_COLS; j++) acc[r][j] += av * bk[j];
            }
        }
    } else {
        for (int k = k0; k < k1; k++) {
            const real *bk = b + (size_t)k * ldb + j0;
            for (int r = 0; r < nr; r++) {
                real av = a[(size_t)(i0 + r) * a_rs + (size_t)k * a_cs];
                for (int j = 0; j < nc; j++) acc[r][j] += av * bk[j];
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int j = 0; j < nc; j++) c[(size_t)(i0 + r) * ldc + j0 + j] = acc[r][j];
}

/* c[M, ncol] += A[M, K] B[K, ncol] with B and c row-major (row strides ldb, ldc) and A
 * read as a[i * a_rs + k * a_cs], so that A may be a transposed view. Each c[i, j]
 * starts from its old value and adds a[i, k] b[k, j] for k = 0, 1, ... in order. */
static void axpy_gemm(real *c, size_t ldc, const real *a, size_t a_rs, size_t a_cs,
                      const real *b, size_t ldb, int M, int K, int ncol)
{
    int row_groups = (M + BWD_GROUP_ROWS - 1) / BWD_GROUP_ROWS;
    int col_groups = (ncol + BWD_GROUP_COLS - 1) / BWD_GROUP_COLS;
#pragma omp parallel for schedule(static) if ((size_t)M * K * ncol >= PAR_MIN_MACS)
    for (int task = 0; task < row_groups * col_groups; task++) {
        int r_lo = task / col_groups * BWD_GROUP_ROWS, r_hi = min_int(M, r_lo + BWD_GROUP_ROWS);
        int c_lo = task % col_groups * BWD_GROUP_COLS, c_hi = min_int(ncol, c_lo + BWD_GROUP_COLS);
        for (int k0 = 0; k0 < K; k0 += BWD_SLICE) {
            int k1 = min_int(K, k0 + BWD_SLICE);
            for (int i0 = r_lo; i0 < r_hi; i0 += BWD_ROWS)
                for (int j0 = c_lo; j0 < c_hi; j0 += BWD_COLS)
                    axpy_tile(c, ldc, a, a_rs, a_cs, b, ldb, i0, min_int(BWD_ROWS, r_hi - i0), j0,
                              min_int(BWD_COLS, c_hi - j0), k0, k1);
        }
    }
}

/* dx [N, in] += dy [N, out] W [out, in] (skipped when dx is NULL);
 * dw [out, in] += dy^T x, summed over tokens i in order (skipped when dw is NULL). */
void cpu_matmul_backward(real *dx, real *dw, const real *dy, const real *x, const real *w,
                         int N, int in, int out)
{
    if (dx) axpy_gemm(dx, (size_t)in, dy, (size_t)out, 1, w, (size_t)in, N, out, in);
    if (dw) axpy_gemm(dw, (size_t)in, dy, 1, (size_t)out, x, (size_t)in, out, N, in);
}
