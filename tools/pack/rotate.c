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
 * What is rotated:
 *   1. RMSNorm gains are folded first (W[o][i] *= g[i] on the next layers),
 *      because RMSNorm commutes with an orthogonal matrix only without its
 *      gain: ||x A|| = ||x||. The output head takes the final norm's gain,
 *      which unties it from the embedding (it becomes its own matrix).
 *   2. The residual stream by R: embedding rows; input side of q, k, v,
 *      gate, up and the head; output side of o and down.
 *   3. Per head, V's output and O's input by the same 64-block Hadamard:
 *      attention mixes value vectors linearly, so the rotation passes
 *      through it.
 *   4. down_proj's input by H, which the engine applies online to the SwiGLU
 *      output (model->hadamard_ffn_down). This one uses the backend's own
 *      hadamard64 so the offline and online halves are the same matrix by
 *      construction; everything else uses the local transform, for which any
 *      orthogonal matrix would do.
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

/* W[o][i] *= g[i], then g = 1. */
static void fold_gain(float *w, int rows, int cols, const float *g) {
    for (int o = 0; o < rows; o++)
        for (int i = 0; i < cols; i++) w[(size_t)o * cols + i] *= g[i];
}

static void set_ones(float *g, int n) {
    for (int i = 0; i < n; i++) g[i] = 1.0f;
}

int pack_fold_norms(struct model *m, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    const int E = c->n_embd, F = c->n_ff, V = c->n_vocab;
    const int QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    if (m->output == m->tok_embd) {
        float *head = malloc((size_t)V * E * sizeof(float));
        if (!head) {
            snprintf(err, errlen, "out of memory untying the output head");
            return -1;
        }
        memcpy(head, m->tok_embd, (size_t)V * E * sizeof(float));
        m->output = head;
        m->weight_bytes += (size_t)V * E * sizeof(float);
    }
    fold_gain(m->output, V, E, m->output_norm);
    set_ones(m->output_norm, E);
    for (int l = 0; l < c->n_layer; l++) {
        struct layer_weights *w = &m->layers[l];
        fold_gain(w->wq, QD, E, w->attn_norm);
        fold_gain(w->wk, KD, E, w->attn_norm);
        fold_gain(w->wv, KD, E, w->attn_norm);
        set_ones(w->attn_norm, E);
        fold_gain(w->w_gate, F, E, w->ffn_norm);
        fold_gain(w->w_up, F, E, w->ffn_norm);
        set_ones(w->ffn_norm, E);
    }
    return 0;
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

/* The residual permutation: every place the residual stream enters or
 * leaves a matrix. */
static int permute_residual(struct model *m, const int32_t *perm) {
    const struct model_config *c = &m->cfg;
    const int E = c->n_embd, F = c->n_ff, V = c->n_vocab;
    const int QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    int bad = permute_in(m->tok_embd, V, E, perm) || permute_in(m->output, V, E, perm);
    for (int l = 0; l < c->n_layer && !bad; l++) {
        struct layer_weights *w = &m->layers[l];
        bad = permute_in(w->wq, QD, E, perm) || permute_in(w->wk, KD, E, perm) || permute_in(w->wv, KD, E, perm) ||
              permute_in(w->w_gate, F, E, perm) || permute_in(w->w_up, F, E, perm) ||
              permute_out(w->wo, E, QD, perm) || permute_out(w->w_down, E, F, perm);
    }
    return bad ? -1 : 0;
}

int pack_rotate_model(struct model *m, const int32_t *perm_embd, int32_t *const *perm_ffn, char *err,
                      size_t errlen) {
    const struct model_config *c = &m->cfg;
    const int E = c->n_embd, F = c->n_ff, V = c->n_vocab;
    const int QD = c->n_head * c->head_dim, KD = c->n_head_kv * c->head_dim;
    if (!m->be->hadamard64) {
        snprintf(err, errlen, "the %s backend has no hadamard64 (needed online before down_proj)", m->be->name);
        return -1;
    }
    /* 1. Gains folded (the head untied). */
    if (pack_fold_norms(m, err, errlen)) return -1;

    /* 2. Permutations: the loud channels of the residual stream, and of
     * each SwiGLU output, moved into the leading blocks before rotating. */
    if (perm_embd && permute_residual(m, perm_embd)) goto oom;
    for (int l = 0; perm_ffn && l < c->n_layer; l++) {
        struct layer_weights *w = &m->layers[l];
        if (permute_out(w->w_gate, F, E, perm_ffn[l]) || permute_out(w->w_up, F, E, perm_ffn[l]) ||
            permute_in(w->w_down, E, F, perm_ffn[l]))
            goto oom;
    }

    /* 3. Residual stream. */
    pack_hadamard_rows(m->tok_embd, (size_t)V, E);
    pack_hadamard_rows(m->output, (size_t)V, E);
    for (int l = 0; l < c->n_layer; l++) {
        struct layer_weights *w = &m->layers[l];
        pack_hadamard_rows(w->wq, (size_t)QD, E);
        pack_hadamard_rows(w->wk, (size_t)KD, E);
        pack_hadamard_rows(w->wv, (size_t)KD, E);
        pack_hadamard_rows(w->w_gate, (size_t)F, E);
        pack_hadamard_rows(w->w_up, (size_t)F, E);
        pack_hadamard_cols(w->wo, E, QD);
        pack_hadamard_cols(w->w_down, E, F);

        /* 4. V/O per head (head_dim is a multiple of 64, so the 64-blocks
         * never straddle two heads). */
        pack_hadamard_cols(w->wv, KD, E);
        if (w->bv) pack_hadamard_rows(w->bv, 1, KD);
        pack_hadamard_rows(w->wo, (size_t)E, QD);

        /* 5. down_proj's input, with the engine's own transform. */
        for (int o = 0; o < E; o++) m->be->hadamard64(w->w_down + (size_t)o * F, F);
    }
    m->hadamard_ffn_down = 1;
    return 0;
oom:
    snprintf(err, errlen, "out of memory permuting the model");
    return -1;
}
