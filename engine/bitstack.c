/* BitStack weights at run time; see bitstack.h for the design. */
#include "engine/bitstack.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model.h"
#include "kernels/formats.h"
#include "storage/error.h"

#define load_error(err, errlen, path, fmt, ...) errf(err, errlen, "%s: " fmt, path, ##__VA_ARGS__)

const char *bitstack_kind_name(enum bitstack_kind k) {
    static const char *const names[BITSTACK_KINDS] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down"};
    return k < BITSTACK_KINDS ? names[k] : "?";
}

int bitstack_kind_point(enum bitstack_kind k) {
    switch (k) {
    case BS_Q: case BS_K: case BS_V: return ACT_ATTN_IN;
    case BS_O: return ACT_ATTN_OUT;
    case BS_GATE: case BS_UP: return ACT_FFN_IN;
    default: return ACT_FFN_DOWN_IN;
    }
}

size_t bitstack_block_bytes(int rows, int cols, int rank) {
    return ((size_t)rows * (size_t)cols + 7) / 8 + (size_t)rank * ((size_t)rows + (size_t)cols) * sizeof(uint16_t);
}

static int negative(const struct bitstack_block *b, size_t at) { return (b->signs[at >> 3] >> (at & 7)) & 1; }

void bitstack_block_add_dense(const struct bitstack_block *b, float *w) {
    for (int o = 0; o < b->rows; o++)
        for (int i = 0; i < b->cols; i++) {
            float m = 0;
            for (int j = 0; j < b->rank; j++)
                m += ebb_f16_to_f32(b->u[(size_t)o * b->rank + j]) * ebb_f16_to_f32(b->v[(size_t)i * b->rank + j]);
            const size_t at = (size_t)o * b->cols + i;
            w[at] += negative(b, at) ? -m : m;
        }
}

void bitstack_block_apply(const struct bitstack_block *b, const float *x, float *t, float *y) {
    for (int j = 0; j < b->rank; j++)
        for (int i = 0; i < b->cols; i++)
            t[(size_t)j * b->cols + i] = ebb_f16_to_f32(b->v[(size_t)i * b->rank + j]) * x[i];
    for (int o = 0; o < b->rows; o++) {
        float acc = 0;
        for (int j = 0; j < b->rank; j++) {
            const float *tj = t + (size_t)j * b->cols;
            float sum = 0;
            for (int i = 0; i < b->cols; i++) sum += negative(b, (size_t)o * b->cols + i) ? -tj[i] : tj[i];
            acc += ebb_f16_to_f32(b->u[(size_t)o * b->rank + j]) * sum;
        }
        y[o] += acc;
    }
}

void bitstack_free(struct bitstack *s) {
    if (!s) return;
    free(s->blocks);
    free(s->order);
    free(s->cum_bytes);
    free(s->scale);
    free(s->depth);
    free(s);
}

/* The matrix a kind fills, with its shape (rows = outputs). */
static struct matrix *kind_matrix(struct layer_weights *w, enum bitstack_kind k) {
    struct matrix *const all[BITSTACK_KINDS] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w_gate, &w->w_up, &w->w_down};
    return all[k];
}

static void kind_shape(const struct model_config *c, enum bitstack_kind k, int *rows, int *cols) {
    const int q = c->n_head * c->head_dim, kv = c->n_head_kv * c->head_dim;
    const int r[BITSTACK_KINDS] = {q, kv, kv, c->n_embd, c->n_ff, c->n_ff, c->n_embd};
    *rows = r[k];
    *cols = act_point_width(c, (enum act_point)bitstack_kind_point(k));
}

static const struct gguf_tensor *want_tensor(struct model *m, const char *name, uint32_t type, uint64_t ne0,
                                             uint64_t ne1, uint64_t ne2, char *err, size_t errlen) {
    const struct gguf_tensor *t = gguf_find_tensor(&m->file, name);
    if (!t || t->type != type || t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != ne2 || t->ne[3] != 1) {
        const struct ebb_type_info *ti = ebb_type_info(type);
        load_error(err, errlen, m->file.path, "stack tensor '%s' is %s; expected %s [%llu, %llu, %llu]", name,
                   t ? "of another type or shape" : "missing", ti ? ti->name : "?", (unsigned long long)ne0,
                   (unsigned long long)ne1, (unsigned long long)ne2);
        return NULL;
    }
    return t;
}

/* The blocks of one matrix: its three tensors, `levels` blocks each. */
static int load_matrix_blocks(struct model *m, struct bitstack *s, int layer, enum bitstack_kind k, char *err,
                              size_t errlen) {
    int rows, cols;
    kind_shape(&m->cfg, k, &rows, &cols);
    if (cols % 8) return load_error(err, errlen, m->file.path, "stack matrices need inputs in multiples of 8");
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s.bs_u", layer, bitstack_kind_name(k));
    const struct gguf_tensor *u = gguf_find_tensor(&m->file, name);
    const uint64_t rank = u ? u->ne[0] : 0;
    if (rank < 1 || rank > (uint64_t)(rows < cols ? rows : cols))
        return load_error(err, errlen, m->file.path, "stack tensor '%s' is missing or has a bad rank", name);
    if (!want_tensor(m, name, EBB_TYPE_F16, rank, (uint64_t)rows, (uint64_t)s->levels, err, errlen)) return -1;
    snprintf(name, sizeof name, "blk.%d.%s.bs_v", layer, bitstack_kind_name(k));
    const struct gguf_tensor *v = want_tensor(m, name, EBB_TYPE_F16, rank, (uint64_t)cols, (uint64_t)s->levels, err,
                                              errlen);
    snprintf(name, sizeof name, "blk.%d.%s.bs_signs", layer, bitstack_kind_name(k));
    const struct gguf_tensor *sg = v ? want_tensor(m, name, EBB_TYPE_I8, (uint64_t)cols / 8, (uint64_t)rows,
                                                   (uint64_t)s->levels, err, errlen)
                                     : NULL;
    if (!sg) return -1;
    const int mi = layer * BITSTACK_KINDS + k;
    for (int l = 0; l < s->levels; l++)
        s->blocks[(size_t)mi * s->levels + l] = (struct bitstack_block){
            rows, cols, (int)rank, (const uint8_t *)sg->data + (size_t)l * rows * (cols / 8),
            (const uint16_t *)u->data + (size_t)l * rows * rank, (const uint16_t *)v->data + (size_t)l * cols * rank};
    return 0;
}

/* ebb.bitstack.order: every block once, and level by level. */
static int load_order(struct model *m, struct bitstack *s, char *err, size_t errlen) {
    const struct gguf_kv *kv = gguf_find(&m->file, "ebb.bitstack.order");
    const size_t n = (size_t)s->n_matrices * s->levels;
    if (!kv || kv->type != GGUF_ARRAY || kv->arr_type != GGUF_UINT32 || kv->arr_n != n)
        return load_error(err, errlen, m->file.path, "ebb.bitstack.order must be %zu u32 block numbers", n);
    uint8_t *seen = calloc(n, 1);
    if (!seen) return load_error(err, errlen, m->file.path, "out of memory");
    int bad = 0;
    for (size_t i = 0; i < n && !bad; i++) {
        uint32_t b;
        memcpy(&b, kv->value + i * 4, 4);
        /* Level-major: the k-th block of the order is at level k / n_matrices. */
        bad = b >= n || seen[b] || (int)(b % (uint32_t)s->levels) != (int)(i / (size_t)s->n_matrices);
        if (!bad) { seen[b] = 1; s->order[i] = b; }
    }
    free(seen);
    if (bad) return load_error(err, errlen, m->file.path, "ebb.bitstack.order is not every block once, level by level");
    s->cum_bytes[0] = 0;
    for (size_t i = 0; i < n; i++) {
        const struct bitstack_block *b = &s->blocks[s->order[i]];
        s->cum_bytes[i + 1] = s->cum_bytes[i] + bitstack_block_bytes(b->rows, b->cols, b->rank);
    }
    return 0;
}

int bitstack_load(struct model *m, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    uint32_t levels = 0;
    if (gguf_get_u32(&m->file, "ebb.bitstack.levels", &levels) || levels < 1 || levels > 64)
        return load_error(err, errlen, m->file.path, "ebb.bitstack.levels must be 1 to 64");
    struct bitstack *s = calloc(1, sizeof *s);
    if (!s) return load_error(err, errlen, m->file.path, "out of memory");
    s->levels = (int)levels;
    s->n_matrices = c->n_layer * BITSTACK_KINDS;
    const size_t n = (size_t)s->n_matrices * levels;
    s->blocks = calloc(n, sizeof *s->blocks);
    s->order = malloc(n * sizeof *s->order);
    s->cum_bytes = malloc((n + 1) * sizeof *s->cum_bytes);
    s->scale = calloc((size_t)c->n_layer * ACT_POINTS, sizeof *s->scale);
    s->depth = calloc((size_t)s->n_matrices, sizeof *s->depth);
    m->stack = s;
    if (!s->blocks || !s->order || !s->cum_bytes || !s->scale || !s->depth)
        return load_error(err, errlen, m->file.path, "out of memory");
    for (int l = 0; l < c->n_layer; l++) {
        for (int k = 0; k < BITSTACK_KINDS; k++)
            if (load_matrix_blocks(m, s, l, (enum bitstack_kind)k, err, errlen)) return -1;
        for (int p = 0; p < ACT_POINTS; p++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s.bs_scale", l, act_point_name((enum act_point)p));
            const int width = act_point_width(c, (enum act_point)p);
            const struct gguf_tensor *t = want_tensor(m, name, EBB_TYPE_F32, (uint64_t)width, 1, 1, err, errlen);
            if (!t) return -1;
            const float *sc = t->data;
            for (int i = 0; i < width; i++)
                if (!(sc[i] > 0) || sc[i] > 1e30f)
                    return load_error(err, errlen, m->file.path, "'%s'[%d] = %g is not a positive scale", name, i,
                                      (double)sc[i]);
            s->scale[l * ACT_POINTS + p] = sc;
        }
    }
    return load_order(m, s, err, errlen);
}

int bitstack_fit(struct model *m, size_t stack_bytes, char *err, size_t errlen) {
    struct bitstack *s = m->stack;
    const size_t n = (size_t)s->n_matrices * s->levels;
    size_t k = 0;
    while (k < n && s->cum_bytes[k + 1] <= stack_bytes) k++;
    memset(s->depth, 0, (size_t)s->n_matrices * sizeof *s->depth);
    for (size_t i = 0; i < k; i++) s->depth[s->order[i] / (uint32_t)s->levels]++;
    s->resident_bytes = s->cum_bytes[k];
    for (int mi = 0; mi < s->n_matrices; mi++) {
        const int layer = mi / BITSTACK_KINDS;
        const enum bitstack_kind kind = (enum bitstack_kind)(mi % BITSTACK_KINDS);
        struct matrix *w = kind_matrix(&m->layers[layer], kind);
        const struct bitstack_block *first = &s->blocks[(size_t)mi * s->levels];
        const size_t elems = (size_t)first->rows * first->cols;
        if (!w->owned) {
            float *dense = malloc(elems * sizeof *dense);
            if (!dense) return load_error(err, errlen, m->file.path, "out of memory rebuilding the stack");
            *w = (struct matrix){EBB_TYPE_F32, dense, first->cols, first->rows, dense};
            m->weight_bytes += elems * sizeof *dense;
        }
        memset(w->owned, 0, elems * sizeof *w->owned);
        /* Levels in the order they were peeled: every prefix the order
         * keeps is a matrix's first depth levels. */
        for (int l = 0; l < s->depth[mi]; l++) bitstack_block_add_dense(&first[l], w->owned);
        const float *sc = s->scale[layer * ACT_POINTS + bitstack_kind_point(kind)];
        for (int o = 0; o < first->rows; o++)
            for (int i = 0; i < first->cols; i++) w->owned[(size_t)o * first->cols + i] /= sc[i];
    }
    return 0;
}
