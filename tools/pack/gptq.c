/* 4-bit weights, and a stack's 2-bit base: GPTQ (Frantar et al., 2022) and
 * round-to-nearest.
 *
 * GPTQ quantizes a weight matrix column by column (columns = inputs) and,
 * after rounding column i, moves the rounding error onto the columns not yet
 * quantized, weighted by how the inputs correlate (the inverse Hessian of the
 * layer's input, H = X^T X): the layer's output on the calibration data
 * changes as little as possible. With U the upper Cholesky factor of H^-1,
 * rounding column i with error e (per row) updates
 *     W[:, j] -= e / U[i][i] * U[i][j]    for j > i.
 * Each row is independent. The updates are applied immediately inside a
 * batch of 128 columns and lazily, as one matrix product (OpenBLAS sgemm),
 * to the columns after the batch: the same arithmetic with most of it at
 * BLAS speed.
 *
 * Choices (see the report in pack.c's summary for their effect):
 *   - columns strictly left to right, no act-order: groups of 64 along the
 *     input must stay contiguous (and they follow the activation permutation,
 *     which already puts the loud channels first);
 *   - a group's scale is fixed when GPTQ reaches the group's first column,
 *     from the group's values at that moment (errors of earlier columns
 *     included), as the largest magnitude that maps onto the 16 codes
 *     [-8, 7], shrunk by the clipping factor among a few that gives the
 *     least squared rounding error on those values;
 *   - damping: a fraction of the mean diagonal added to H (1% by default),
 *     raised tenfold if H is still not positive definite;
 *   - Cholesky and inversion in double (LAPACKE dpotrf/dpotri), the sweep in
 *     float as in the reference implementation.
 * Round-to-nearest is kernels/formats.c's ebb_quantize_w4g64_rtn (the
 * format's own rule, d = absmax / 7), the plain baseline GPTQ is measured
 * against.
 * The same sweep writes W2G64 (a BitStack base, tools/pack/bitstack.c): each
 * group's step and minimum from formats.c's range search on the group's
 * values when the sweep reaches it, codes 0..3 above the minimum.
 */
#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "tools/pack/pack.h"

#define G EBB_W4G64_GROUP
#define BATCH 128   /* lazy-update batch; a multiple of G so groups never straddle two */

/* The one place outside kernels/formats.c that writes the nibble layout:
 * GPTQ decides codes and scales itself, which no formats.c quantizer takes. */
void pack_w4g64_block(struct ebb_block_w4g64 *b, uint16_t d_f16, const int8_t *codes) {
    b->d = d_f16;
    for (int i = 0; i < G / 2; i++)
        b->qs[i] = (uint8_t)((codes[i] + 8) | ((codes[i + G / 2] + 8) << 4));
}

static int round_code(float v, float inv_d, int lo, int hi) {
    int q = (int)lrintf(v * inv_d);
    return q < lo ? lo : q > hi ? hi : q;
}

void pack_rtn_quantize(const float *w, int rows, int cols, struct ebb_block_w4g64 *out) {
    ebb_quantize_w4g64_rtn(w, out, (size_t)rows * cols);   /* rows are whole groups, back to back */
}

/* ---------------------------------------------------------------- Hessian */

int pack_gptq_prepare(const double *hess, int n, double damp, float *u, uint8_t *dead, char *err,
                      size_t errlen) {
    double *a = malloc((size_t)n * n * sizeof(double));
    if (!a) {
        snprintf(err, errlen, "out of memory (%dx%d Hessian)", n, n);
        return -1;
    }
    double mean = 0;
    int live = 0;
    for (int i = 0; i < n; i++) {
        double d = hess[(size_t)i * n + i];
        if (dead) dead[i] = d <= 0;
        if (d > 0) { mean += d; live++; }
    }
    mean = live ? mean / live : 1.0;
    int ok = 0;
    for (int attempt = 0; attempt < 4 && !ok; attempt++, damp *= 10) {
        memcpy(a, hess, (size_t)n * n * sizeof(double));
        for (int i = 0; i < n; i++) {
            double *d = &a[(size_t)i * n + i];
            if (*d <= 0) *d = 1.0;   /* a dead channel: its weights are zeroed */
            *d += damp * mean;
        }
        ok = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'U', n, a, n) == 0 &&
             LAPACKE_dpotri(LAPACK_ROW_MAJOR, 'U', n, a, n) == 0 &&
             LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'U', n, a, n) == 0;
    }
    if (!ok) {
        free(a);
        snprintf(err, errlen, "the %dx%d Hessian is not positive definite even with damping raised 1000-fold", n,
                 n);
        return -1;
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) u[(size_t)i * n + j] = j >= i ? (float)a[(size_t)i * n + j] : 0.0f;
    free(a);
    return 0;
}

/* ---------------------------------------------------------------- GPTQ */

/* Clipping factors tried for each group's scale. */
static const float clip_grid[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f};

/* The f16 scale for a group's current values: the least squared rounding
 * error among the clipping factors. */
static uint16_t choose_scale(const float *x) {
    float pos = 0, neg = 0;
    for (int i = 0; i < G; i++) {
        pos = fmaxf(pos, x[i]);
        neg = fmaxf(neg, -x[i]);
    }
    /* Codes run -8..7: the positive side has 7 steps, the negative side 8. */
    const float base = fmaxf(pos / 7.0f, neg / 8.0f);
    if (!(base > 0)) return 0;
    uint16_t best = 0;
    double best_err = INFINITY;
    for (size_t k = 0; k < sizeof clip_grid / sizeof clip_grid[0]; k++) {
        uint16_t d16 = ebb_f32_to_f16(base * clip_grid[k]);
        float d = ebb_f16_to_f32(d16);
        if (!(d > 0)) continue;
        float inv = 1.0f / d;
        double e = 0;
        for (int i = 0; i < G; i++) {
            float r = x[i] - (float)round_code(x[i], inv, -8, 7) * d;
            e += (double)r * r;
        }
        if (e < best_err) {
            best_err = e;
            best = d16;
        }
    }
    return best;
}

/* One group's grid as the sweep uses it: W4G64's symmetric codes -8..7 of
 * step d, or W2G64's codes 0..3 of step d above m (the f16 bits kept as the
 * block stores them). */
struct grid {
    uint16_t d16, m16;
    float d, m, inv;
};

/* The grid for a group's current values (x: its G values). */
static struct grid group_grid(enum ebb_type type, const float *x) {
    struct grid g = {0, 0, 0, 0, 0};
    if (type == EBB_TYPE_W2G64) {
        /* formats.c's range search, on the values as the sweep has left them */
        uint8_t blk[EBB_W2G64_BLOCK_BYTES];
        ebb_quantize_w2g64(x, blk, G);
        g.d16 = (uint16_t)(blk[0] | blk[1] << 8);
        g.m16 = (uint16_t)(blk[2] | blk[3] << 8);
        g.m = ebb_f16_to_f32(g.m16);
    } else {
        g.d16 = choose_scale(x);
    }
    g.d = ebb_f16_to_f32(g.d16);
    g.inv = g.d > 0 ? 1.0f / g.d : 0.0f;
    return g;
}

/* A value's code on the grid and the value the code stands for. */
static int grid_code(enum ebb_type type, const struct grid *g, float x, float *value) {
    if (type == EBB_TYPE_W2G64) {
        const int q = round_code(x - g->m, g->inv, 0, 3);
        *value = g->d * (float)q + g->m;
        return q;
    }
    const int q = round_code(x, g->inv, -8, 7);
    *value = (float)q * g->d;
    return q;
}

struct gptq_job {
    enum ebb_type type;  /* W4G64 or W2G64 */
    float *w;
    int cols, i1, i2;
    const float *u;
    float *err;          /* [rows][BATCH] scaled errors of the batch */
    int8_t *codes;       /* [rows][cols] */
    struct grid *grids;  /* [rows][cols/G] */
    int rows;
};

/* Quantizes columns [i1, i2) of a share of the rows, propagating each error
 * inside the batch at once. */
static void gptq_batch_task(void *arg, int part, int n_parts) {
    const struct gptq_job *j = arg;
    const int r0 = (int)((long)j->rows * part / n_parts), r1 = (int)((long)j->rows * (part + 1) / n_parts);
    const int cols = j->cols;
    for (int r = r0; r < r1; r++) {
        float *row = j->w + (size_t)r * cols;
        float *e = j->err + (size_t)r * BATCH;
        struct grid *grid = j->grids + (size_t)r * (cols / G);
        for (int i = j->i1; i < j->i2; i++) {
            if (i % G == 0) grid[i / G] = group_grid(j->type, row + i);
            const float x = row[i];
            float value;
            j->codes[(size_t)r * cols + i] = (int8_t)grid_code(j->type, &grid[i / G], x, &value);
            const float ei = (x - value) / j->u[(size_t)i * cols + i];
            e[i - j->i1] = ei;
            const float *ui = j->u + (size_t)i * cols;
            for (int k = i + 1; k < j->i2; k++) row[k] -= ei * ui[k];
        }
    }
}

/* The sweep for either type; out: rows * cols / G blocks of it. */
static void gptq_sweep(enum ebb_type type, float *w, int rows, int cols, const float *u, const uint8_t *dead,
                       struct ebb_pool *pool, uint8_t *out) {
    float *err = malloc((size_t)rows * BATCH * sizeof(float));
    int8_t *codes = malloc((size_t)rows * cols);
    struct grid *grids = malloc((size_t)rows * (cols / G) * sizeof *grids);
    if (!err || !codes || !grids) {
        /* Out of memory for the sweep: fall back to round-to-nearest rather
         * than fail a long run at its end. */
        free(err);
        free(codes);
        free(grids);
        fprintf(stderr, "ebb pack: out of memory for GPTQ on a %dx%d matrix; using round-to-nearest\n", rows,
                cols);
        if (type == EBB_TYPE_W2G64) ebb_quantize_w2g64(w, out, (size_t)rows * cols);
        else pack_rtn_quantize(w, rows, cols, (struct ebb_block_w4g64 *)(void *)out);
        return;
    }
    if (dead)
        for (int i = 0; i < cols; i++)
            if (dead[i])
                for (int r = 0; r < rows; r++) w[(size_t)r * cols + i] = 0;
    for (int i1 = 0; i1 < cols; i1 += BATCH) {
        const int i2 = i1 + BATCH < cols ? i1 + BATCH : cols;
        struct gptq_job job = {type, w, cols, i1, i2, u, err, codes, grids, rows};
        if (pool) ebb_pool_run(pool, gptq_batch_task, &job, ebb_pool_threads(pool));
        else gptq_batch_task(&job, 0, 1);
        if (i2 < cols)   /* W[:, i2:] -= Err[:, 0:nb] U[i1:i2, i2:] */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols - i2, i2 - i1, -1.0f, err, BATCH,
                        u + (size_t)i1 * cols + i2, cols, 1.0f, w + i2, cols);
    }
    for (size_t k = 0; k < (size_t)rows * (cols / G); k++) {
        const int8_t *c = codes + k * G;
        if (type == EBB_TYPE_W2G64) {
            ebb_w2g64_block(out + k * EBB_W2G64_BLOCK_BYTES, grids[k].d16, grids[k].m16, c);
        } else {
            pack_w4g64_block((struct ebb_block_w4g64 *)(void *)(out + k * EBB_W4G64_BLOCK_BYTES), grids[k].d16, c);
        }
    }
    free(err);
    free(codes);
    free(grids);
}

void pack_gptq_quantize(float *w, int rows, int cols, const float *u, const uint8_t *dead,
                        struct ebb_pool *pool, struct ebb_block_w4g64 *out) {
    gptq_sweep(EBB_TYPE_W4G64, w, rows, cols, u, dead, pool, (uint8_t *)out);
}

void pack_gptq_quantize_w2g64(float *w, int rows, int cols, const float *u, const uint8_t *dead,
                              struct ebb_pool *pool, uint8_t *out) {
    gptq_sweep(EBB_TYPE_W2G64, w, rows, cols, u, dead, pool, out);
}
