/* BitStack's decomposition of one weight matrix into a stack of residual
 * blocks (Wang et al., "BitStack: Any-Size Compression of Large Language
 * Models in Variable Memory Environments").
 *
 * With the matrix W stored [rows][cols] (outputs by inputs) and a positive
 * scale s per input channel (activation-aware: the mean magnitude of the
 * channel over calibration tokens), the scaled matrix W' = W diag(s) is
 * peeled level by level. At each level the residual R (W' at first) is
 * approximated by
 *
 *     B = sign(R) .* (u v^T)        u: rows x r, v: cols x r
 *
 * where u v^T is the rank-r truncated SVD of |R| (a non-negative matrix
 * whose leading singular vectors carry its magnitude structure), with the
 * singular values split evenly between u and v; then R -= B. The signs cost
 * one bit a weight, the factors r (rows + cols) f16 values. Because the
 * factors are rounded to f16 before the residual is updated, each level
 * corrects the rounding of the ones before it: the stack holds exactly what
 * the runtime computes.
 *
 * A prefix of k blocks reconstructs W' ~ B_1 + ... + B_k, and the runtime
 * multiplies x / s by it (W x = W' (x / s)). Why the magnitude of the
 * residual and not the residual itself: sign(R) .* |R| = R exactly, and |R|
 * is far better approximated at low rank than R, whose signs look like
 * noise; the one bit a weight buys the noise back.
 *
 * SVD: LAPACK's sgesvdx computes only the r leading triplets; single
 * precision is enough for factors that end in f16.
 *
 * This file is the decomposition and the reference product; the packer's
 * ordering of blocks across matrices, the file's block directory and the
 * runtime kernels build on it.
 */
#include "tools/pack/pack.h"

#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int bitstack_rank_for(int rows, int cols) {
    /* r (rows + cols) * 16 bits = rows * cols / 8 bits. */
    const double r = (double)rows * (double)cols / (128.0 * ((double)rows + (double)cols));
    return r < 1 ? 1 : (int)lround(r);
}

size_t bitstack_block_bytes(int rows, int cols, int rank) {
    return ((size_t)rows * (size_t)cols + 7) / 8 + (size_t)rank * ((size_t)rows + (size_t)cols) * sizeof(uint16_t);
}

void bitstack_block_free(struct bitstack_block *b) {
    if (!b) return;
    free(b->signs);
    free(b->u);
    free(b->v);
    memset(b, 0, sizeof *b);
}

static int sign_negative(const struct bitstack_block *b, size_t at) { return (b->signs[at >> 3] >> (at & 7)) & 1; }

void bitstack_block_dense(const struct bitstack_block *b, float *w) {
    for (int o = 0; o < b->rows; o++)
        for (int i = 0; i < b->cols; i++) {
            float m = 0;
            for (int j = 0; j < b->rank; j++)
                m += ebb_f16_to_f32(b->u[(size_t)o * b->rank + j]) * ebb_f16_to_f32(b->v[(size_t)i * b->rank + j]);
            const size_t at = (size_t)o * b->cols + i;
            w[at] = sign_negative(b, at) ? -m : m;
        }
}

void bitstack_block_apply(const struct bitstack_block *b, const float *x, float *t, float *y) {
    /* y_o += sum_j u_oj sum_i s_oi (v_ij x_i): the inner sum is a masked
     * add of t_j = v_.j .* x over the row's signs, r of them a row. */
    for (int j = 0; j < b->rank; j++)
        for (int i = 0; i < b->cols; i++) t[(size_t)j * b->cols + i] = ebb_f16_to_f32(b->v[(size_t)i * b->rank + j]) * x[i];
    for (int o = 0; o < b->rows; o++) {
        float acc = 0;
        for (int j = 0; j < b->rank; j++) {
            const float *tj = t + (size_t)j * b->cols;
            float sum = 0;
            for (int i = 0; i < b->cols; i++) sum += sign_negative(b, (size_t)o * b->cols + i) ? -tj[i] : tj[i];
            acc += ebb_f16_to_f32(b->u[(size_t)o * b->rank + j]) * sum;
        }
        y[o] += acc;
    }
}

/* One level: B = sign(R) .* rank-r SVD of |R|, written to *b, and R -= B.
 * mag and the SVD outputs are the caller's scratch. */
static int peel_level(float *r_res, int rows, int cols, int rank, float *mag, float *s, float *u, float *vt,
                      lapack_int *iwork, struct bitstack_block *b, char *err, size_t errlen) {
    const size_t n = (size_t)rows * cols;
    for (size_t k = 0; k < n; k++) mag[k] = fabsf(r_res[k]);
    lapack_int found = 0;
    const lapack_int info = LAPACKE_sgesvdx(LAPACK_ROW_MAJOR, 'V', 'V', 'I', rows, cols, mag, cols, 0, 0, 1, rank,
                                            &found, s, u, rank, vt, cols, iwork);
    if (info != 0 || found < rank) {
        snprintf(err, errlen, "the SVD of a %dx%d residual failed (LAPACK info %d, %d of %d triplets)", rows, cols,
                 (int)info, (int)found, rank);
        return -1;
    }
    b->rows = rows;
    b->cols = cols;
    b->rank = rank;
    b->signs = calloc((n + 7) / 8, 1);
    b->u = malloc((size_t)rows * rank * sizeof *b->u);
    b->v = malloc((size_t)cols * rank * sizeof *b->v);
    if (!b->signs || !b->u || !b->v) {
        bitstack_block_free(b);
        snprintf(err, errlen, "out of memory for a %dx%d block", rows, cols);
        return -1;
    }
    for (int j = 0; j < rank; j++) {
        const float root = sqrtf(s[j] > 0 ? s[j] : 0);
        for (int o = 0; o < rows; o++) b->u[(size_t)o * rank + j] = ebb_f32_to_f16(u[(size_t)o * rank + j] * root);
        for (int i = 0; i < cols; i++) b->v[(size_t)i * rank + j] = ebb_f32_to_f16(vt[(size_t)j * cols + i] * root);
    }
    for (size_t k = 0; k < n; k++)
        if (r_res[k] < 0) b->signs[k >> 3] |= (uint8_t)(1u << (k & 7));
    /* The residual loses exactly what the runtime will add back. */
    bitstack_block_dense(b, mag);
    for (size_t k = 0; k < n; k++) r_res[k] -= mag[k];
    return 0;
}

int bitstack_decompose(const float *w, int rows, int cols, const float *scale, int levels, int rank,
                       struct bitstack_block *blocks, double *residual, char *err, size_t errlen) {
    if (rows <= 0 || cols <= 0 || levels <= 0 || rank <= 0 || rank > rows || rank > cols) {
        snprintf(err, errlen, "bad decomposition shape: %dx%d, %d levels of rank %d", rows, cols, levels, rank);
        return -1;
    }
    const size_t n = (size_t)rows * cols;
    float *res = malloc(n * sizeof *res), *mag = malloc(n * sizeof *mag);
    float *s = malloc((size_t)(rows < cols ? rows : cols) * sizeof *s);
    float *u = malloc((size_t)rows * rank * sizeof *u), *vt = malloc((size_t)rank * cols * sizeof *vt);
    lapack_int *iwork = malloc(12 * (size_t)(rows < cols ? rows : cols) * sizeof *iwork);
    int rc = -1;
    memset(blocks, 0, (size_t)levels * sizeof *blocks);
    if (!res || !mag || !s || !u || !vt || !iwork) {
        snprintf(err, errlen, "out of memory decomposing a %dx%d matrix", rows, cols);
        goto done;
    }
    for (int o = 0; o < rows; o++)
        for (int i = 0; i < cols; i++) res[(size_t)o * cols + i] = w[(size_t)o * cols + i] * (scale ? scale[i] : 1.0f);
    for (int l = 0; l < levels; l++) {
        if (peel_level(res, rows, cols, rank, mag, s, u, vt, iwork, &blocks[l], err, errlen)) {
            for (int k = 0; k < l; k++) bitstack_block_free(&blocks[k]);
            goto done;
        }
        if (residual) {
            double sq = 0;
            for (size_t k = 0; k < n; k++) sq += (double)res[k] * res[k];
            residual[l] = sqrt(sq);
        }
    }
    rc = 0;
done:
    free(res); free(mag); free(s); free(u); free(vt); free(iwork);
    return rc;
}
