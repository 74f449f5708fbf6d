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
 * Stack order: level by level always (no matrix gets its k+1-th block before
 * every matrix has its k-th); within a level by importance (the error each
 * block takes away, weighted by the activation scales), or for the order
 * ablation a seeded shuffle or plain matrix order (pack_bitstack_order).
 *
 * Checkpoints: once the file is written, the packer loads it back as the
 * runtime would (in place) and measures perplexity on a few calibration
 * windows at prefix sizes from one level to all (pack_bitstack_checkpoints);
 * pack.c then writes the file again with them (the writer still holds
 * everything), so the runtime can quote quality at any budget.
 *
 * On a base (--base-bits 2): each matrix is first quantized to W2G64 by
 * kernels/formats.c's range-searching rounding with every weight's error
 * weighted by its input's s^2 (activation-aware, as the stack's own scaling:
 * on the default model it took base + 1 level from perplexity 169 to 90),
 * or by GPTQ with its input's calibration Hessian (gptq.c, --weight-quant
 * gptq, measured worse under the stack), written as its own tensor,
 * and the stack peels (W - Q) diag(s) instead of W diag(s); the base is
 * always resident and the order, checkpoints and budgets count the stack
 * above it. Rounding the unscaled W keeps the base an ordinary W2G64 matrix
 * the runtime multiplies with its own product.
 *
 * SVD: LAPACK's sgesvdx computes only the r leading triplets; single
 * precision is enough for factors that end in f16.
 *
 * The block and its products at run time are engine/bitstack.h's.
 */
#include "tools/pack/pack.h"

#include "engine/bitstack.h"
#include "engine/generate.h"
#include "engine/perplexity.h"
#include "storage/gguf_write.h"

#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int bitstack_rank_for(int rows, int cols, double rank_bits) {
    /* r (rows + cols) * 16 bits = rows * cols * rank_bits. */
    const double r = rank_bits * (double)rows * (double)cols / (16.0 * ((double)rows + (double)cols));
    return r < 1 ? 1 : (int)lround(r);
}

void bitstack_level_free(struct bitstack_level *l) {
    if (!l) return;
    free(l->mem);
    memset(l, 0, sizeof *l);
}

/* One level: B = sign(R) .* rank-r SVD of |R|, written to *b, and R -= B.
 * mag and the SVD outputs are the caller's scratch. */
static int peel_level(float *r_res, int rows, int cols, int rank, float *mag, float *s, float *u, float *vt,
                      lapack_int *iwork, struct bitstack_level *level, char *err, size_t errlen) {
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
    /* One allocation: the signs, then u and v (2-byte aligned: the sign
     * bytes are padded to an even count). */
    const size_t sign_bytes = ((n + 7) / 8 + 1) & ~(size_t)1;
    level->mem = calloc(1, sign_bytes + (size_t)rank * ((size_t)rows + cols) * sizeof(uint16_t));
    if (!level->mem) {
        snprintf(err, errlen, "out of memory for a %dx%d block", rows, cols);
        return -1;
    }
    uint8_t *signs = level->mem;
    uint16_t *fu = (uint16_t *)(signs + sign_bytes), *fv = fu + (size_t)rows * rank;
    for (int j = 0; j < rank; j++) {
        const float root = sqrtf(s[j] > 0 ? s[j] : 0);
        for (int o = 0; o < rows; o++) fu[(size_t)o * rank + j] = ebb_f32_to_f16(u[(size_t)o * rank + j] * root);
        for (int i = 0; i < cols; i++) fv[(size_t)i * rank + j] = ebb_f32_to_f16(vt[(size_t)j * cols + i] * root);
    }
    for (size_t k = 0; k < n; k++)
        if (r_res[k] < 0) signs[k >> 3] |= (uint8_t)(1u << (k & 7));
    level->b = (struct bitstack_block){rows, cols, rank, signs, fu, fv};
    /* The residual loses exactly what the runtime will add back. */
    memset(mag, 0, n * sizeof *mag);
    bitstack_block_add_dense(&level->b, mag);
    for (size_t k = 0; k < n; k++) r_res[k] -= mag[k];
    return 0;
}

int bitstack_decompose(const float *w, int rows, int cols, const float *scale, int levels, int rank,
                       struct bitstack_level *blocks, double *residual, char *err, size_t errlen) {
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
            for (int k = 0; k < l; k++) bitstack_level_free(&blocks[k]);
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

/* ------------------------------------------------------------ the whole model */

/* Mean |x| per channel of an activation point, floored so that no scale is
 * zero (a dead channel's column then keeps its weights unscaled). */
static int point_scale(const struct pack_calib *cal, int layer, int point, float *s, int n) {
    const struct pack_act_stats *st = &cal->pt[layer * ACT_POINTS + point];
    if (st->n != n || cal->n_tokens <= 0) return -1;
    double top = 0;
    for (int i = 0; i < n; i++) top = st->abssum[i] > top ? st->abssum[i] : top;
    for (int i = 0; i < n; i++) {
        const double mean = (st->abssum[i] > 1e-6 * top ? st->abssum[i] : (top > 0 ? 1e-6 * top : 1.0)) /
                            (double)cal->n_tokens;
        s[i] = (float)mean;
    }
    return 0;
}

/* One matrix's levels as one tensor, a level after another, each block
 * whole: its signs [rows][cols/8], then u [rows][rank], then v [cols][rank]
 * (engine/bitstack.h says why a block is kept in one piece). */
static int add_matrix_blocks(struct gguf_writer *gw, int layer, enum bitstack_kind k,
                             const struct bitstack_level *lv, int levels) {
    const struct bitstack_block *b0 = &lv[0].b;
    const size_t sign_bytes = (size_t)b0->rows * b0->cols / 8;
    const size_t u_bytes = (size_t)b0->rows * b0->rank * sizeof *b0->u;
    const size_t v_bytes = (size_t)b0->cols * b0->rank * sizeof *b0->v;
    const size_t block = bitstack_block_bytes(b0->rows, b0->cols, b0->rank);
    uint8_t *data = malloc(block * levels);
    if (!data) return -1;
    for (int l = 0; l < levels; l++) {
        uint8_t *at = data + (size_t)l * block;
        memcpy(at, lv[l].b.signs, sign_bytes);
        memcpy(at + sign_bytes, lv[l].b.u, u_bytes);
        memcpy(at + sign_bytes + u_bytes, lv[l].b.v, v_bytes);
    }
    char name[96];
    const uint64_t ne[2] = {(uint64_t)block, (uint64_t)levels};
    snprintf(name, sizeof name, "blk.%d.%s.bs_blocks", layer, bitstack_kind_name(k));
    const int rc = gguf_writer_add_tensor(gw, name, EBB_TYPE_I8, 2, ne, data, block * levels);
    free(data);
    return rc;
}

/* A matrix's W2G64 base as its tensor blk.N.M.bs_base [cols, rows], and
 * what it leaves, W - Q, in residual_of: GPTQ when u (its input's prepared
 * Hessian, pack_gptq_prepare) is given, else round to nearest weighted by
 * the input scales s (scale[cols]). base: scratch for its blocks. */
static int add_matrix_base(struct gguf_writer *gw, int layer, enum bitstack_kind k, const float *w, int rows,
                           int cols, const float *u, const uint8_t *dead, struct ebb_pool *pool, uint8_t *base,
                           float *residual_of, const float *scale) {
    const size_t n = (size_t)rows * cols, bytes = n / EBB_W2G64_GROUP * EBB_W2G64_BLOCK_BYTES;
    if (u) {   /* the sweep updates the weights it is given: a copy */
        memcpy(residual_of, w, n * sizeof *w);
        pack_gptq_quantize_w2g64(residual_of, rows, cols, u, dead, pool, base);
    } else {
        /* Each weight's error counts as much as its input is loud: s_i^2, the
         * squared mean magnitude of input i (what the error costs the output
         * on average). Rows are whole groups, so one row's weights serve
         * every row. */
        float *wt = malloc((size_t)cols * sizeof *wt);
        if (!wt) return -1;
        for (int c = 0; c < cols; c++) wt[c] = scale[c] * scale[c];
        const size_t row_bytes = (size_t)cols / EBB_W2G64_GROUP * EBB_W2G64_BLOCK_BYTES;
        for (int r = 0; r < rows; r++)
            ebb_quantize_w2g64_weighted(w + (size_t)r * cols, wt, base + (size_t)r * row_bytes, (size_t)cols);
        free(wt);
    }
    ebb_type_info(EBB_TYPE_W2G64)->to_f32(base, residual_of, n);
    for (size_t i = 0; i < n; i++) residual_of[i] = w[i] - residual_of[i];
    char name[96];
    const uint64_t ne[2] = {(uint64_t)cols, (uint64_t)rows};
    snprintf(name, sizeof name, "blk.%d.%s.bs_base", layer, bitstack_kind_name(k));
    return gguf_writer_add_tensor(gw, name, EBB_TYPE_W2G64, 2, ne, base, bytes);
}

/* Importance order: level by level; within a level the blocks that take the
 * most activation-weighted error away first (ties: lower block first). */
struct ranked { uint32_t block; int level; double gain; };
static int by_level_then_gain(const void *a, const void *b) {
    const struct ranked *x = a, *y = b;
    if (x->level != y->level) return x->level - y->level;
    if (x->gain != y->gain) return x->gain > y->gain ? -1 : 1;
    return x->block < y->block ? -1 : x->block > y->block;
}

int pack_bitstack_order(enum pack_bitstack_order kind, int n_matrices, int levels, const double *gain, uint64_t seed,
                        uint32_t *order) {
    const size_t n = (size_t)n_matrices * levels;
    if (kind == PACK_ORDER_IMPORTANCE) {
        struct ranked *r = malloc(n * sizeof *r);
        if (!r) return -1;
        for (size_t b = 0; b < n; b++) r[b] = (struct ranked){(uint32_t)b, (int)(b % (size_t)levels), gain[b]};
        qsort(r, n, sizeof *r, by_level_then_gain);
        for (size_t i = 0; i < n; i++) order[i] = r[i].block;
        free(r);
        return 0;
    }
    /* Uniform: matrix index order within each level; random: each level's
     * list shuffled (Fisher-Yates from the end), one generator for all
     * levels, so tools/bitstack_reorder.py can draw the same. */
    uint64_t state = seed;
    for (int l = 0; l < levels; l++) {
        uint32_t *lv = order + (size_t)l * n_matrices;
        for (int mi = 0; mi < n_matrices; mi++) lv[mi] = (uint32_t)((size_t)mi * levels + l);
        if (kind != PACK_ORDER_RANDOM) continue;
        for (int i = n_matrices - 1; i > 0; i--) {
            const int j = (int)(pack_splitmix64(&state) % (uint64_t)(i + 1));
            const uint32_t t = lv[i];
            lv[i] = lv[j];
            lv[j] = t;
        }
    }
    return 0;
}

static void progress_matrices(int done, int total, double elapsed) {
    char bar[31];
    const int fill = (int)((long)done * 30 / total);
    for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
    bar[30] = 0;
    fprintf(stderr, "\rdecomposing [%s] %d/%d matrices  %.0f s", bar, done, total, elapsed);
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

int pack_write_bitstack(struct gguf_writer *gw, const struct model *m, const struct pack_calib *cal,
                        struct ebb_pool *pool, const struct pack_options *o, struct pack_result *r, char *err,
                        size_t errlen) {
    const struct model_config *c = &m->cfg;
    const int levels = o->bitstack_levels, n_matrices = c->n_layer * BITSTACK_KINDS;
    const size_t n_blocks = (size_t)n_matrices * levels;
    int widest = c->n_ff > c->n_embd ? c->n_ff : c->n_embd;
    const size_t biggest = (size_t)widest * (size_t)widest;   /* no matrix has more weights */
    const int on_base = o->bitstack_base_bits == 2;
    float *residual_of = on_base ? malloc(biggest * sizeof *residual_of) : NULL;
    uint8_t *base = on_base ? malloc(biggest / EBB_W2G64_GROUP * EBB_W2G64_BLOCK_BYTES) : NULL;
    /* GPTQ for the base: each activation point's U (shared by the matrices
     * reading it) and dead channels, made when its first matrix comes. */
    const int gptq = on_base && o->weight_quant == PACK_GPTQ;
    float *u = gptq ? malloc((size_t)widest * widest * sizeof *u) : NULL;
    uint8_t *dead = gptq ? malloc((size_t)widest) : NULL;
    int u_point = -1;
    double *gain = calloc(n_blocks, sizeof *gain);
    uint32_t *order = malloc(n_blocks * sizeof *order);
    struct bitstack_level *lv = calloc((size_t)levels, sizeof *lv);
    double *residual = malloc((size_t)levels * sizeof *residual);
    float *scale = malloc((size_t)widest * sizeof *scale);
    size_t stack_bytes = 0, stack_elems = 0;
    int rc = -1;
    if (!gain || !order || !lv || !residual || !scale || (on_base && (!residual_of || !base)) ||
        (gptq && (!u || !dead))) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if (pack_add_outer(gw, m, 1, err, errlen)) goto out;
    const double t0 = ebb_now_seconds();
    for (int l = 0; l < c->n_layer; l++) {
        const struct layer_weights *w = &m->layers[l];
        char name[96];
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        int bad = pack_add_f32(gw, name, w->attn_norm, c->n_embd);
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        bad |= pack_add_f32(gw, name, w->ffn_norm, c->n_embd);
        for (int p = 0; p < ACT_POINTS && !bad; p++) {
            const int width = act_point_width(c, (enum act_point)p);
            if (point_scale(cal, l, p, scale, width)) {
                snprintf(err, errlen, "no calibration statistics for layer %d", l);
                goto out;
            }
            snprintf(name, sizeof name, "blk.%d.%s.bs_scale", l, act_point_name((enum act_point)p));
            bad |= pack_add_f32(gw, name, scale, width);
        }
        if (bad || w->bq) {
            snprintf(err, errlen, w->bq ? "models with attention biases are not supported by the bitstack format yet"
                                        : "out of memory writing layer %d", l);
            goto out;
        }
        for (int k = 0; k < BITSTACK_KINDS; k++) {
            const int point = bitstack_kind_point((enum bitstack_kind)k);
            int rows, cols;
            bitstack_kind_shape(c, (enum bitstack_kind)k, &rows, &cols);
            point_scale(cal, l, point, scale, cols);
            const int rank = bitstack_rank_for(rows, cols, o->bitstack_rank_bits);
            const float *wm = bitstack_kind_matrix(&m->layers[l], (enum bitstack_kind)k)->owned;
            if (!wm) {
                snprintf(err, errlen, "layer %d %s is not an f32 matrix", l, bitstack_kind_name((enum bitstack_kind)k));
                goto out;
            }
            if (on_base) {   /* inputs are whole groups: pack_check_shapes wants multiples of 64 */
                const struct pack_act_stats *st = gptq ? &cal->pt[l * ACT_POINTS + point] : NULL;
                if (st && !st->hess) {
                    snprintf(err, errlen, "no calibration Hessian for layer %d (GPTQ base)", l);
                    goto out;
                }
                if (st && u_point != l * ACT_POINTS + point) {
                    if (pack_gptq_prepare(st->hess, cols, o->damp, u, dead, err, errlen)) goto out;
                    u_point = l * ACT_POINTS + point;
                }
                if (add_matrix_base(gw, l, (enum bitstack_kind)k, wm, rows, cols, st ? u : NULL, dead, pool, base,
                                    residual_of, scale)) {
                    snprintf(err, errlen, "out of memory writing layer %d", l);
                    goto out;
                }
                stack_bytes += ebb_row_bytes(EBB_TYPE_W2G64, (uint64_t)cols) * (size_t)rows;
                wm = residual_of;   /* the stack peels what the base leaves */
            }
            double start = 0;
            for (int ro = 0; ro < rows; ro++)
                for (int i = 0; i < cols; i++) {
                    const double x = (double)wm[(size_t)ro * cols + i] * scale[i];
                    start += x * x;
                }
            if (bitstack_decompose(wm, rows, cols, scale, levels, rank, lv, residual, err, errlen)) goto out;
            const int mi = l * BITSTACK_KINDS + k;
            double before = start;
            for (int lev = 0; lev < levels; lev++) {
                const double after = residual[lev] * residual[lev];
                gain[(size_t)mi * levels + lev] = before - after;
                before = after;
            }
            stack_bytes += (size_t)levels * bitstack_block_bytes(rows, cols, rank);
            stack_elems += (size_t)rows * cols;
            const int wrote = add_matrix_blocks(gw, l, (enum bitstack_kind)k, lv, levels);
            for (int lev = 0; lev < levels; lev++) bitstack_level_free(&lv[lev]);
            if (wrote) {
                snprintf(err, errlen, "out of memory writing layer %d", l);
                goto out;
            }
            if (o->progress) progress_matrices(mi + 1, n_matrices, ebb_now_seconds() - t0);
        }
    }
    if (pack_bitstack_order(o->bitstack_order, n_matrices, levels, gain, o->seed, order)) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    gguf_writer_set_str(gw, "ebb.format", "bitstack");
    if (on_base) {
        gguf_writer_set_str(gw, "ebb.bitstack.base", "W2G64");
        gguf_writer_set_str(gw, "ebb.weight_quant", gptq ? "gptq" : "rtn");   /* how the base was rounded */
    }
    gguf_writer_set_u32(gw, "ebb.bitstack.levels", (uint32_t)levels);
    gguf_writer_set_arr_u32(gw, "ebb.bitstack.order", order, n_blocks);
    r->linear_bpw = stack_elems ? 8.0 * (double)stack_bytes / (double)stack_elems : 0;
    rc = 0;
out:
    free(residual_of);
    free(base);
    free(u);
    free(dead);
    free(gain);
    free(order);
    free(lv);
    free(residual);
    free(scale);
    return rc;
}

/* ------------------------------------------------------------- checkpoints */

/* The prefix sizes to measure: n targets evenly spaced in bytes from one
 * full level (the order's first n_matrices blocks) to the whole stack, each
 * taken down to the longest prefix that fits (what bitstack_fit keeps);
 * targets that land on the same prefix are measured once. Returns how many. */
static int checkpoint_targets(const struct bitstack *s, int n, uint64_t *bytes) {
    const size_t blocks = (size_t)s->n_matrices * s->levels;
    const double lo = (double)s->cum_bytes[s->n_matrices], hi = (double)s->cum_bytes[blocks];
    int k = 0;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        const double want = n > 1 ? lo + (hi - lo) * i / (n - 1) : hi;
        while (at < blocks && (double)s->cum_bytes[at + 1] <= want + 0.5) at++;
        if (k == 0 || s->cum_bytes[at] > bytes[k - 1]) bytes[k++] = s->cum_bytes[at];
    }
    return k;
}

int pack_bitstack_checkpoints(const char *path, const int32_t *windows, int n_windows, int len, int32_t bos,
                              int n_checkpoints, int n_threads, int progress, uint64_t **bytes_out, float **ppl_out,
                              int *n_out, char *err, size_t errlen) {
    struct model m;
    *bytes_out = NULL;
    *ppl_out = NULL;
    *n_out = 0;
    if (model_load(&m, path, MODEL_WEIGHTS_NATIVE, err, errlen)) return -1;
    struct model_run *run = model_run_new(&m, n_threads);
    uint64_t *bytes = malloc((size_t)n_checkpoints * sizeof *bytes);
    float *ppl = malloc((size_t)n_checkpoints * sizeof *ppl);
    int rc = -1;
    if (!run || !bytes || !ppl || !m.stack) {
        snprintf(err, errlen, m.stack ? "out of memory or threads" : "%s holds no stack", path);
        goto out;
    }
    const int n = checkpoint_targets(m.stack, n_checkpoints, bytes);
    const double t0 = ebb_now_seconds();
    for (int i = 0; i < n; i++) {
        struct ppl_result r = {0};
        /* Increasing prefixes: each fit only adds blocks. */
        if (bitstack_fit(&m, (size_t)bytes[i], err, errlen) ||
            perplexity_windows(run, windows, n_windows, len, 0, bos, 32, NULL, NULL, NULL, NULL, &r, err, errlen))
            goto out;
        ppl[i] = (float)r.ppl;
        if (progress) {
            fprintf(stderr, "\rcheckpoints  [%d/%d] %.1f MB: perplexity %.3f  %.0f s", i + 1, n, bytes[i] / 1e6,
                    r.ppl, ebb_now_seconds() - t0);
            if (i + 1 == n) fputc('\n', stderr);
        }
    }
    *bytes_out = bytes;
    *ppl_out = ppl;
    *n_out = n;
    bytes = NULL;
    ppl = NULL;
    rc = 0;
out:
    free(bytes);
    free(ppl);
    model_run_free(run);
    model_free(&m);
    return rc;
}
