/* QuaRot's rotations, applied offline to an f32 model (see pack.h).
 *
 * Why: a 4-bit grid fits values of similar size. Transformer activations
 * have a few channels tens of times louder than the rest; multiplying by an
 * orthogonal matrix spreads each loud channel over many, and because the
 * matrix is orthogonal it can be folded into the weights without changing
 * what the model computes.
 *
 * The algebra, with activations as row vectors and weights stored [out][in]
 * (y = x W^T), for any orthogonal A applied as x -> x A:
 *   - input side:  (x A) W'^T = x W^T  needs W' = W A: each ROW of W times A;
 *   - output side: (x W'^T) = (x W^T) A needs W' = A^T W: each COLUMN c of W
 *                  becomes A^T c, i.e. the column, read as a row vector,
 *                  times A.
 * So one routine (a row vector times A) serves both sides; only what is a
 * "row" changes.
 *
 * Where the rotations go. Every matrix's input is rotated, each by the
 * block-diagonal Hadamard H (64x64 blocks):
 *   1. q, k, v, gate and up read the RMSNorm output. QuaRot rotates the
 *      residual stream itself, which needs the norm gains folded into these
 *      weights (RMSNorm commutes with a rotation only without its gain).
 *      On SmolLM2-135M that is ruinous: the gains span 0 to 0.3 within a
 *      layer and are near zero exactly on the few massive residual channels,
 *      so after folding the 4-bit error no longer shrinks where the gain
 *      did, and the massive channels multiply it (round-to-nearest W4A16:
 *      perplexity 92.5 against 37.5 in f32). So here the residual stream,
 *      the norms and the (tied) embedding stay as they are, and the engine
 *      rotates the norm's output online (model->hadamard_norm_out, one H per
 *      token and norm, negligible next to the products): the activation
 *      that is quantized is (x/rms * g) H, its gain applied before any
 *      rounding, and the weights are W H (each row times H).
 *   2. Each SwiGLU output may first be permuted (outliers.c says why): the
 *      gate/up output rows and down_proj's input columns (SwiGLU is
 *      elementwise, so it commutes).
 *   3. down_proj's input by H, which the engine applies online to the
 *      SwiGLU output (model->hadamard_ffn_down).
 *   4. Per head, V's output and O's input by the same H: attention mixes
 *      value vectors linearly, so the rotation passes through it, offline.
 * The online halves (1, 3) use the backend's own hadamard64 on the weights
 * too, so the offline and online matrices are the same by construction; the
 * offline-only pair (4) uses the local transform, for which any orthogonal
 * matrix would do.
 * The block size is 64 everywhere: widths like 576 and 1536 are not powers of
 * two, and 64 is also the quantization group, so a loud channel is spread
 * exactly over one group.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "tools/pack/pack.h"

#define HB 64   /* Hadamard block */

int pack_check_shapes(const struct model_config *c, char *err, size_t errlen) {
    if (c->n_embd % HB || c->n_ff % HB || c->head_dim % HB) {
        snprintf(err, errlen, "n_embd %d, n_ff %d and head_dim %d must all be multiples of %d "
                 "(rotation blocks and quantization groups of 64)", c->n_embd, c->n_ff, c->head_dim, HB);
        return -1;
    }
    return 0;
}

/* x[0..63] times the Sylvester Hadamard matrix scaled by 1/8, in place,
 * with double butterflies. */
static void fwht64(float *x) {
    double v[HB];
    for (int i = 0; i < HB; i++) v[i] = x[i];
    for (int h = 1; h < HB; h *= 2)
        for (int i = 0; i < HB; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                double a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
    for (int i = 0; i < HB; i++) x[i] = (float)(v[i] * 0.125);
}

void pack_hadamard_rows(float *x, size_t rows, int n) {
    for (size_t r = 0; r < rows; r++)
        for (int b = 0; b < n; b += HB) fwht64(x + r * (size_t)n + b);
}

/* The column transform as butterflies between whole rows: row-contiguous,
 * so it streams through the matrix instead of striding down columns. */
void pack_hadamard_cols(float *w, int rows, int cols) {
    for (int blk = 0; blk < rows; blk += HB) {
        float *base = w + (size_t)blk * cols;
        for (int h = 1; h < HB; h *= 2)
            for (int i = 0; i < HB; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    float *a = base + (size_t)j * cols, *b = base + (size_t)(j + h) * cols;
                    for (int c = 0; c < cols; c++) {
                        float x = a[c], y = b[c];
                        a[c] = x + y;
                        b[c] = x - y;
                    }
                }
        for (size_t i = 0; i < (size_t)HB * cols; i++) base[i] *= 0.125f;
    }
}

/* Input side of a permutation: W[o][i] <- W[o][perm[i]] for every row. */
static int permute_in(float *w, int rows, int cols, const int32_t *perm) {
    float *tmp = malloc((size_t)cols * sizeof(float));
    if (!tmp) return -1;
    for (int o = 0; o < rows; o++) {
        float *row = w + (size_t)o * cols;
        for (int i = 0; i < cols; i++) tmp[i] = row[perm[i]];
        memcpy(row, tmp, (size_t)cols * sizeof(float));
    }
    free(tmp);
    return 0;
}

/* Output side: row i <- row perm[i]. */
static int permute_out(float *w, int rows, int cols, const int32_t *perm) {
    float *tmp = malloc((size_t)rows * cols * sizeof(float));
    if (!tmp) return -1;
    for (int i = 0; i < rows; i++) memcpy(tmp + (size_t)i * cols, w + (size_t)perm[i] * cols, (size_t)cols * sizeof(float));
    memcpy(w, tmp, (size_t)rows * cols * sizeof(float));
    free(tmp);
    return 0;
}

/* W H on the input side of every row, with the engine's own transform. */
static void rotate_inputs(const struct ebb_backend *be, float *w, int rows, int cols) {
    for (int o = 0; o < rows; o++) be->hadamard64(w + (size_t)o * cols, cols);
}

int pack_rotate_model(struct model *m, int32_t *const *perm_ffn, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    const int E = c->n_embd, F = c->n_ff;
    const int QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    const struct ebb_backend *be = m->be;
    if (!be->hadamard64) {
        snprintf(err, errlen, "the %s backend has no hadamard64 (needed online)", be->name);
        return -1;
    }
    for (int l = 0; perm_ffn && l < c->n_layer; l++) {
        struct layer_weights *w = &m->layers[l];
        if (permute_out(w->w_gate.owned, F, E, perm_ffn[l]) || permute_out(w->w_up.owned, F, E, perm_ffn[l]) ||
            permute_in(w->w_down.owned, E, F, perm_ffn[l])) {
            snprintf(err, errlen, "out of memory permuting the model");
            return -1;
        }
    }
    for (int l = 0; l < c->n_layer; l++) {
        struct layer_weights *w = &m->layers[l];
        rotate_inputs(be, w->wq.owned, QD, E);
        rotate_inputs(be, w->wk.owned, KD, E);
        rotate_inputs(be, w->wv.owned, KD, E);
        rotate_inputs(be, w->w_gate.owned, F, E);
        rotate_inputs(be, w->w_up.owned, F, E);
        rotate_inputs(be, w->w_down.owned, E, F);
        /* head_dim is a multiple of 64, so the blocks never straddle heads. */
        pack_hadamard_cols(w->wv.owned, KD, E);
        if (w->bv) pack_hadamard_rows(w->bv, 1, KD);
        pack_hadamard_rows(w->wo.owned, (size_t)E, QD);
    }
    m->hadamard_norm_out = 1;
    m->hadamard_ffn_down = 1;
    return 0;
}
