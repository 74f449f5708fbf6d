/* BitStack weights at run time; see bitstack.h for the design. */
#include "engine/bitstack.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/model.h"
#include "engine/utf8.h"
#include "kernels/backend.h"
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

/* Whether a matrix shape can be stacked: whole bytes of signs per row (inputs
 * in multiples of 8) and an even number of them per block, so that the f16
 * factors after them are aligned. The packer's models always are (their
 * dimensions are multiples of 64); files from elsewhere are checked. */
static int shape_ok(int rows, int cols) { return rows > 0 && cols > 0 && cols % 8 == 0 && (size_t)rows * cols % 16 == 0; }

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
    free(s->matrices);
    free(s->blocks);
    free(s->order);
    free(s->cum_bytes);
    free(s->scale);
    free(s->depth);
    free(s->checkpoint_bytes);
    free(s->checkpoint_ppl);
    free(s);
}

/* The matrix a kind fills, with its shape (rows = outputs). */
struct matrix *bitstack_kind_matrix(struct layer_weights *w, enum bitstack_kind k) {
    return layer_matrix_at(w, (int)k);
}

void bitstack_kind_shape(const struct model_config *c, enum bitstack_kind k, int *rows, int *cols) {
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

/* The blocks of one matrix: its tensor of `levels` whole blocks, the rank
 * being what the block's bytes leave for the factors after the signs. */
static int load_matrix_blocks(struct model *m, struct bitstack *s, int layer, enum bitstack_kind k, char *err,
                              size_t errlen) {
    int rows, cols;
    bitstack_kind_shape(&m->cfg, k, &rows, &cols);
    if (!shape_ok(rows, cols))
        return load_error(err, errlen, m->file.path, "stack matrices need inputs in multiples of 8 and rows x inputs "
                          "in multiples of 16 (%s is %d x %d)", bitstack_kind_name(k), rows, cols);
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s.bs_signs", layer, bitstack_kind_name(k));
    if (gguf_find_tensor(&m->file, name))
        return load_error(err, errlen, m->file.path, "the stack was packed by an older ebb (signs and factors in "
                          "separate tensors); pack it again with ebb pack --format bitstack");
    snprintf(name, sizeof name, "blk.%d.%s.bs_blocks", layer, bitstack_kind_name(k));
    const struct gguf_tensor *t = gguf_find_tensor(&m->file, name);
    const size_t sign_bytes = (size_t)rows * cols / 8, per_rank = sizeof(uint16_t) * ((size_t)rows + cols);
    const uint64_t block = t ? t->ne[0] : 0;
    const uint64_t rank = block > sign_bytes ? (block - sign_bytes) / per_rank : 0;
    if (rank < 1 || rank > (uint64_t)(rows < cols ? rows : cols) || block != sign_bytes + rank * per_rank)
        return load_error(err, errlen, m->file.path, "stack tensor '%s' is %s", name,
                          t ? "not whole blocks of signs and factors of one rank" : "missing");
    if (!want_tensor(m, name, EBB_TYPE_I8, block, (uint64_t)s->levels, 1, err, errlen)) return -1;
    const int mi = layer * BITSTACK_KINDS + k;
    for (int l = 0; l < s->levels; l++) {
        const uint8_t *at = (const uint8_t *)t->data + (size_t)l * block;
        s->blocks[(size_t)mi * s->levels + l] = (struct bitstack_block){
            rows, cols, (int)rank, at, (const uint16_t *)(at + sign_bytes),
            (const uint16_t *)(at + sign_bytes + (size_t)rows * rank * sizeof(uint16_t))};
    }
    return 0;
}

/* The optional base: ebb.bitstack.base names its type ("W2G64", the one
 * there is) and every matrix has it, blk.N.M.bs_base [cols, rows]. */
static int load_base(struct model *m, struct bitstack *s, char *err, size_t errlen) {
    static const char key[] = "ebb.bitstack.base";
    if (!gguf_find(&m->file, key)) return 0;
    struct gguf_str type;
    if (gguf_get_str(&m->file, key, &type) || type.len != 5 || memcmp(type.ptr, "W2G64", 5))
        return load_error(err, errlen, m->file.path, "%s must be \"W2G64\" (the only base type)", key);
    for (int k = 0; k < BITSTACK_KINDS; k++) {   /* the model's shapes first: the rule, not a tensor, is wrong */
        int rows, cols;
        bitstack_kind_shape(&m->cfg, (enum bitstack_kind)k, &rows, &cols);
        if (cols % EBB_W2G64_GROUP)
            return load_error(err, errlen, m->file.path, "a W2G64 base needs inputs in multiples of %d (%s has %d)",
                              EBB_W2G64_GROUP, bitstack_kind_name((enum bitstack_kind)k), cols);
    }
    for (int mi = 0; mi < s->n_matrices; mi++) {
        const enum bitstack_kind k = (enum bitstack_kind)(mi % BITSTACK_KINDS);
        int rows, cols;
        bitstack_kind_shape(&m->cfg, k, &rows, &cols);
        char name[96];
        snprintf(name, sizeof name, "blk.%d.%s.bs_base", mi / BITSTACK_KINDS, bitstack_kind_name(k));
        const struct gguf_tensor *t = want_tensor(m, name, EBB_TYPE_W2G64, (uint64_t)cols, (uint64_t)rows, 1, err,
                                                  errlen);
        if (!t) return -1;
        s->matrices[mi].base = t->data;
        s->base_bytes += ebb_row_bytes(EBB_TYPE_W2G64, (uint64_t)cols) * (size_t)rows;
    }
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

/* The optional perplexity checkpoints: both keys or neither, of one length,
 * bytes increasing and within the stack, every perplexity finite and at
 * least 1 (exp of a mean of non-negative losses); and what they scored, a
 * UTF-8 line (files packed before it was recorded scored calibration
 * windows). */
static int load_checkpoints(struct model *m, struct bitstack *s, char *err, size_t errlen) {
    static const char kb[] = "ebb.bitstack.checkpoint_bytes", kp[] = "ebb.bitstack.checkpoint_ppl",
                      kt[] = "ebb.bitstack.checkpoint_text";
    const struct gguf_kv *b = gguf_find(&m->file, kb), *p = gguf_find(&m->file, kp), *t = gguf_find(&m->file, kt);
    if (!b && !p && !t) return 0;
    if (!b || b->type != GGUF_ARRAY || b->arr_type != GGUF_UINT64 || b->arr_n < 1 || b->arr_n > 4096)
        return load_error(err, errlen, m->file.path, "%s must be 1 to 4096 u64 byte counts", kb);
    if (!p || p->type != GGUF_ARRAY || p->arr_type != GGUF_FLOAT32 || p->arr_n != b->arr_n)
        return load_error(err, errlen, m->file.path, "%s must be %llu f32 perplexities, one per checkpoint", kp,
                          (unsigned long long)b->arr_n);
    const int n = (int)b->arr_n;
    s->checkpoint_bytes = malloc((size_t)n * sizeof *s->checkpoint_bytes);
    s->checkpoint_ppl = malloc((size_t)n * sizeof *s->checkpoint_ppl);
    if (!s->checkpoint_bytes || !s->checkpoint_ppl) return load_error(err, errlen, m->file.path, "out of memory");
    const uint64_t total = s->cum_bytes[(size_t)s->n_matrices * s->levels];
    for (int i = 0; i < n; i++) {
        memcpy(&s->checkpoint_bytes[i], b->value + (size_t)i * 8, 8);
        memcpy(&s->checkpoint_ppl[i], p->value + (size_t)i * 4, 4);
        const uint64_t at = s->checkpoint_bytes[i];
        if ((i > 0 && at <= s->checkpoint_bytes[i - 1]) || at > total)
            return load_error(err, errlen, m->file.path, "%s[%d] = %llu is not increasing within the stack's %llu",
                              kb, i, (unsigned long long)at, (unsigned long long)total);
        if (!isfinite(s->checkpoint_ppl[i]) || s->checkpoint_ppl[i] < 1)
            return load_error(err, errlen, m->file.path, "%s[%d] = %g is not a perplexity", kp, i,
                              (double)s->checkpoint_ppl[i]);
    }
    struct gguf_str text = {"calibration windows", 19};
    if (t && (gguf_get_str(&m->file, kt, &text) || text.len == 0 || text.len >= sizeof s->checkpoint_text ||
              !utf8_valid(text.ptr, (size_t)text.len) || memchr(text.ptr, 0, (size_t)text.len)))
        return load_error(err, errlen, m->file.path, "%s must be a line of UTF-8 text, 1 to %zu bytes", kt,
                          sizeof s->checkpoint_text - 1);
    memcpy(s->checkpoint_text, text.ptr, (size_t)text.len);
    s->checkpoint_text[text.len] = 0;
    s->n_checkpoints = n;
    return 0;
}

float bitstack_ppl_at(const struct bitstack *s, size_t stack_bytes) {
    const int n = s ? s->n_checkpoints : 0;
    if (n == 0 || stack_bytes < s->checkpoint_bytes[0]) return NAN;
    int i = 1;
    while (i < n && s->checkpoint_bytes[i] <= stack_bytes) i++;
    if (i == n) return s->checkpoint_ppl[n - 1];
    /* checkpoint i-1 <= stack_bytes < checkpoint i */
    const double x0 = (double)s->checkpoint_bytes[i - 1], x1 = (double)s->checkpoint_bytes[i];
    const double t = ((double)stack_bytes - x0) / (x1 - x0);
    return (float)((1 - t) * s->checkpoint_ppl[i - 1] + t * s->checkpoint_ppl[i]);
}

int bitstack_load(struct model *m, char *err, size_t errlen) {
    const struct model_config *c = &m->cfg;
    uint32_t levels = 0;
    if (gguf_get_u32(&m->file, "ebb.bitstack.levels", &levels) || levels < 1 || levels > BITSTACK_MAX_LEVELS)
        return load_error(err, errlen, m->file.path, "ebb.bitstack.levels must be 1 to %d", BITSTACK_MAX_LEVELS);
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
    s->matrices = calloc((size_t)s->n_matrices, sizeof *s->matrices);
    m->stack = s;
    if (!s->blocks || !s->order || !s->cum_bytes || !s->scale || !s->depth || !s->matrices)
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
    for (int mi = 0; mi < s->n_matrices; mi++)
        s->matrices[mi] = (struct bitstack_matrix){&s->blocks[(size_t)mi * s->levels], 0,
                                                   s->scale[(mi / BITSTACK_KINDS) * ACT_POINTS +
                                                            bitstack_kind_point((enum bitstack_kind)(mi % BITSTACK_KINDS))],
                                                   NULL};
    if (load_base(m, s, err, errlen) || load_order(m, s, err, errlen)) return -1;
    return load_checkpoints(m, s, err, errlen);
}

/* Page ranges of the mapping and what the kernel is told about them.
 *
 * Blocks a shrink gives up must stay out of memory until a grow takes them
 * back, but a fault maps more than the page it touched: fault-around maps
 * cached neighbours, and a large folio of the page cache is mapped whole
 * (measured on Linux 6.18 with the file cached: the first pass after a grow
 * mapped pages up to 384 KiB past the prefix back in, 22 MB of a 36 MB
 * stack). Neither crosses a VMA boundary, so the released pages are given
 * VMAs of their own: MADV_DONTDUMP changes their flags (the kernel splits the
 * mapping there; released blocks have no place in a core dump either), and
 * MADV_DODUMP when they rejoin the prefix lets the VMAs merge again.
 * MADV_RANDOM over the whole stack keeps a cold fault from reading ahead
 * into the next level. A failed madvise costs memory, never correctness, so
 * its result is not checked. */
static void page_span(const void *p, size_t n, int whole_pages_only, uintptr_t *lo, uintptr_t *hi) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    *lo = whole_pages_only ? ((uintptr_t)p + page - 1) & ~(page - 1) : (uintptr_t)p & ~(page - 1);
    *hi = whole_pages_only ? ((uintptr_t)p + n) & ~(page - 1) : (uintptr_t)p + n;
}

/* The pages lying wholly inside [p, p + n) go back to the kernel, in VMAs of
 * their own (a read-only file mapping: they are read again if used). */
static void release_range(const void *p, size_t n) {
    uintptr_t lo, hi;
    page_span(p, n, 1, &lo, &hi);
    if (hi <= lo) return;
    madvise((void *)lo, hi - lo, MADV_DONTDUMP);
    madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

/* [p, p + n) rejoins the prefix's VMAs, and the kernel starts reading it
 * from the file now, so the first pass using it does not wait on faults. */
static void prefetch_range(const void *p, size_t n) {
    uintptr_t lo, hi;
    page_span(p, n, 0, &lo, &hi);
    if (hi <= lo) return;
    madvise((void *)lo, hi - lo, MADV_DODUMP);
    madvise((void *)lo, hi - lo, MADV_WILLNEED);
}

static void random_range(const void *p, size_t n) {
    uintptr_t lo, hi;
    page_span(p, n, 0, &lo, &hi);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_RANDOM);
}

/* Levels [from, to) of a matrix: one run of its tensor. */
static void levels_advise(const struct bitstack_matrix *bm, int from, int to,
                          void (*advise)(const void *p, size_t n)) {
    if (to <= from) return;
    const struct bitstack_block *b = &bm->levels[from];
    advise(b->signs, (size_t)(to - from) * bitstack_block_bytes(b->rows, b->cols, b->rank));
}

/* A plain stack computes nothing useful below one level of every matrix (the
 * order is level-major); a stack on a base computes with the base alone. */
size_t bitstack_min_bytes(const struct bitstack *s) { return s->base_bytes ? 0 : s->cum_bytes[s->n_matrices]; }

size_t bitstack_least_weight_bytes(const struct model *m) {
    const struct bitstack *s = m->stack;
    return s ? s->outer_weight_bytes + s->base_bytes + bitstack_min_bytes(s) : m->weight_bytes;
}

size_t bitstack_full_bytes(const struct bitstack *s) { return s->cum_bytes[(size_t)s->n_matrices * s->levels]; }

size_t bitstack_prefix_blocks(const struct bitstack *s, size_t bytes) {
    size_t lo = 0, hi = (size_t)s->n_matrices * s->levels;   /* cum_bytes rises: bisect */
    while (lo < hi) {
        const size_t mid = lo + (hi - lo + 1) / 2;
        if (s->cum_bytes[mid] <= bytes) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

size_t bitstack_prefix_bytes(const struct bitstack *s, size_t bytes) { return s->cum_bytes[bitstack_prefix_blocks(s, bytes)]; }

/* w[rows][cols] += the W2G64 base, dequantized (the dense reference), a
 * chunk of a row at a time. */
#define BASE_CHUNK 1024   /* a multiple of the group */
static void add_base_dense(const void *base, int rows, int cols, float *w) {
    const struct ebb_type_info *ti = ebb_type_info(EBB_TYPE_W2G64);
    const size_t row_bytes = ebb_row_bytes(EBB_TYPE_W2G64, (uint64_t)cols);
    float row[BASE_CHUNK];
    for (int o = 0; o < rows; o++) {
        for (int i0 = 0; i0 < cols; i0 += BASE_CHUNK) {
            const int n = cols - i0 < BASE_CHUNK ? cols - i0 : BASE_CHUNK;
            ti->to_f32((const uint8_t *)base + (size_t)o * row_bytes + (size_t)i0 / EBB_W2G64_GROUP * EBB_W2G64_BLOCK_BYTES,
                       row, (size_t)n);
            for (int i = 0; i < n; i++) w[(size_t)o * cols + i0 + i] += row[i];
        }
    }
}

int bitstack_fit(struct model *m, size_t stack_bytes, char *err, size_t errlen) {
    struct bitstack *s = m->stack;
    const int dense = m->weights == MODEL_WEIGHTS_F32;
    const size_t k = bitstack_prefix_blocks(s, stack_bytes);
    memset(s->depth, 0, (size_t)s->n_matrices * sizeof *s->depth);
    for (size_t i = 0; i < k; i++) s->depth[s->order[i] / (uint32_t)s->levels]++;
    s->resident_bytes = s->cum_bytes[k];
    if (!s->outer_weight_bytes) s->outer_weight_bytes = m->weight_bytes;
    size_t dense_bytes = 0;
    for (int mi = 0; mi < s->n_matrices; mi++) {
        const int layer = mi / BITSTACK_KINDS;
        const enum bitstack_kind kind = (enum bitstack_kind)(mi % BITSTACK_KINDS);
        struct matrix *w = bitstack_kind_matrix(&m->layers[layer], kind);
        struct bitstack_matrix *bm = &s->matrices[mi];
        const struct bitstack_block *first = bm->levels;
        const int was = bm->depth;
        bm->depth = s->depth[mi];
        if (!dense) {
            /* In place: the matrix is its blocks. Levels leaving the prefix
             * leave memory; levels joining it are read ahead. The first fit
             * (was == 0: nothing touched yet) releases every level past the
             * prefix, whatever the mapping holds. */
            *w = (struct matrix){bm->base ? EBB_TYPE_W2G64 : EBB_TYPE_F32, bm->base, first->cols, first->rows, NULL,
                                 bm};
            if (!s->fitted) levels_advise(bm, 0, s->levels, random_range);
            /* A shrink releases everything past the prefix, not just the
             * levels it drops: the page holding the old boundary was kept
             * then (part of it was in use) and is wholly outside now. */
            if (!s->fitted || bm->depth < was) levels_advise(bm, bm->depth, s->levels, release_range);
            else levels_advise(bm, was, bm->depth, prefetch_range);
            continue;
        }
        const size_t elems = (size_t)first->rows * first->cols;
        if (!w->owned) {
            float *copy = malloc(elems * sizeof *copy);
            if (!copy) return load_error(err, errlen, m->file.path, "out of memory rebuilding the stack");
            *w = (struct matrix){EBB_TYPE_F32, copy, first->cols, first->rows, copy, NULL};
        }
        dense_bytes += elems * sizeof *w->owned;
        memset(w->owned, 0, elems * sizeof *w->owned);
        /* Levels in the order they were peeled: every prefix the order
         * keeps is a matrix's first depth levels. */
        for (int l = 0; l < bm->depth; l++) bitstack_block_add_dense(&first[l], w->owned);
        for (int o = 0; o < first->rows; o++)
            for (int i = 0; i < first->cols; i++) w->owned[(size_t)o * first->cols + i] /= bm->scale[i];
        if (bm->base) add_base_dense(bm->base, first->rows, first->cols, w->owned);
    }
    m->weight_bytes = s->outer_weight_bytes + (dense ? dense_bytes : s->base_bytes + s->resident_bytes);
    s->fitted = 1;
    return 0;
}

/* --------------------------------------------------------- the sign product */

/* Rows and tokens a worker takes at a time: a block of rows' signs (a few
 * KiB a level) and a block of tokens' codes (rank * cols bytes a token and
 * level) stay in cache while every level passes over them. */
#define ROW_BLOCK 16
#define TOK_BLOCK 8

struct bitstack_scratch {
    float *xs;         /* [n_tok][cols]: x / s */
    float *vf;         /* level by level: [rank][cols], v in f32, for this pass */
    float *uf;         /* level by level: [rows][rank], u in f32, for this pass */
    float *tmp;        /* [cols][rank]: a level's v before it is transposed */
    int8_t *t;         /* level by level: [n_tok][rank][cols] */
    float *ts;         /* level by level: [n_tok][rank] */
    int32_t *isum;     /* per piece: [ROW_BLOCK][TOK_BLOCK * rank] */
    size_t cap_xs, cap_vf, cap_uf, cap_tmp, cap_t, cap_ts, cap_isum;
};

void bitstack_scratch_free(struct bitstack_scratch *s) {
    if (!s) return;
    free(s->xs);
    free(s->vf);
    free(s->uf);
    free(s->tmp);
    free(s->t);
    free(s->ts);
    free(s->isum);
    free(s);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    void *q = realloc(*p, need * elem);
    if (!q) return -1;
    *p = q;
    *cap = need;
    return 0;
}

struct rows_job {
    const struct ebb_backend *be;
    const struct bitstack_matrix *bm;
    const struct bitstack_scratch *sc;
    const float *x;
    float *out;
    int n_tok;
    const size_t *t_at, *ts_at, *u_at;   /* [depth]: where each level's codes, scales and u start */
    size_t isum_per_piece;
    int rows_per_piece, tok_per_piece;
};

/* The codes of tokens [t0, t1) (bitstack.h: t_j = v_j .* (x / s), one
 * scale per rank). */
static void codes_piece(void *arg, int i, int n) {
    (void)n;
    const struct rows_job *j = arg;
    const struct bitstack_matrix *bm = j->bm;
    const int cols = bm->levels[0].cols;
    const int t0 = i * j->tok_per_piece, t1 = t0 + j->tok_per_piece < j->n_tok ? t0 + j->tok_per_piece : j->n_tok;
    for (int tok = t0; tok < t1; tok++) {
        const float *xt = j->x + (size_t)tok * cols;
        float *xs = j->sc->xs + (size_t)tok * cols;
        for (int c = 0; c < cols; c++) xs[c] = xt[c] / bm->scale[c];
        for (int l = 0; l < bm->depth; l++) {
            const int rank = bm->levels[l].rank;
            int8_t *t = j->sc->t + j->t_at[l] * j->n_tok + (size_t)tok * rank * cols;
            float *ts = j->sc->ts + j->ts_at[l] * j->n_tok + (size_t)tok * rank;
            for (int q = 0; q < rank; q++)
                j->be->bitstack_codes(xs, j->sc->vf + j->t_at[l] + (size_t)q * cols, cols, t + (size_t)q * cols, ts + q);
        }
    }
}

/* Rows [r0, r1) of every token, a block of rows and tokens at a time: the
 * backend's integer sums for every level, scaled into the outputs level
 * after level (backend.h's exact steps), so a token's outputs do not depend
 * on the tokens beside it or the path that summed (batch invariance). */
static void rows_piece(void *arg, int i, int n) {
    (void)n;
    const struct rows_job *j = arg;
    const struct bitstack_matrix *bm = j->bm;
    const int rows = bm->levels[0].rows, cols = bm->levels[0].cols;
    const int r0 = i * j->rows_per_piece;
    const int r1 = r0 + j->rows_per_piece < rows ? r0 + j->rows_per_piece : rows;
    int32_t *isum = j->sc->isum + (size_t)i * j->isum_per_piece;
    for (int t0 = 0; t0 < j->n_tok; t0 += TOK_BLOCK) {
        const int nt = j->n_tok - t0 < TOK_BLOCK ? j->n_tok - t0 : TOK_BLOCK;
        for (int ro = r0; ro < r1; ro += ROW_BLOCK) {
            const int nr = r1 - ro < ROW_BLOCK ? r1 - ro : ROW_BLOCK;
            for (int l = 0; l < bm->depth; l++) {
                const struct bitstack_block *b = &bm->levels[l];
                const int rank = b->rank, nv = nt * rank;
                const int8_t *t = j->sc->t + j->t_at[l] * j->n_tok + (size_t)t0 * rank * cols;
                const float *ts = j->sc->ts + j->ts_at[l] * j->n_tok + (size_t)t0 * rank;
                j->be->bitstack_isums(isum, b->signs + (size_t)ro * (cols / 8), nr, t, nv, cols);
                j->be->bitstack_scale_add(j->out + (size_t)t0 * rows + ro, (size_t)rows, isum, nr, nt, rank,
                                          j->sc->uf + j->u_at[l] + (size_t)ro * rank, ts);
            }
        }
    }
}

int bitstack_linear(const struct ebb_backend *be, struct ebb_pool *pool, struct bitstack_scratch **scratch,
                    const struct bitstack_matrix *bm, const float *x, int n_tok, float *out) {
    const struct bitstack_block *b0 = bm->levels;
    const int rows = b0->rows, cols = b0->cols;
    if (!bm->depth) return 0;
    if (!*scratch && !(*scratch = calloc(1, sizeof **scratch))) return -1;
    struct bitstack_scratch *sc = *scratch;
    /* Where each level's codes (per token), scales (per token) and u start. */
    size_t t_at[BITSTACK_MAX_LEVELS + 1] = {0}, ts_at[BITSTACK_MAX_LEVELS + 1] = {0};
    size_t u_at[BITSTACK_MAX_LEVELS + 1] = {0};
    int max_rank = 0;
    for (int l = 0; l < bm->depth; l++) {
        const int rank = bm->levels[l].rank;
        t_at[l + 1] = t_at[l] + (size_t)rank * cols;
        ts_at[l + 1] = ts_at[l] + (size_t)rank;
        u_at[l + 1] = u_at[l] + (size_t)rank * rows;
        if (rank > max_rank) max_rank = rank;
    }
    const size_t t_per_tok = t_at[bm->depth], ts_per_tok = ts_at[bm->depth];
    const int threads = pool ? ebb_pool_threads(pool) : 1;
    /* Pieces of whole 8-row groups, a few per worker for balance. */
    int per = (rows + 4 * threads - 1) / (4 * threads);
    per = (per + 7) & ~7;
    const int pieces = (rows + per - 1) / per;
    const size_t isum_per_piece = (size_t)ROW_BLOCK * TOK_BLOCK * max_rank;
    if (grow((void **)&sc->xs, &sc->cap_xs, (size_t)n_tok * cols, sizeof *sc->xs) ||
        grow((void **)&sc->vf, &sc->cap_vf, t_per_tok, sizeof *sc->vf) ||
        grow((void **)&sc->uf, &sc->cap_uf, u_at[bm->depth], sizeof *sc->uf) ||
        grow((void **)&sc->tmp, &sc->cap_tmp, (size_t)max_rank * cols, sizeof *sc->tmp) ||
        grow((void **)&sc->t, &sc->cap_t, t_per_tok * n_tok, 1) ||
        grow((void **)&sc->ts, &sc->cap_ts, ts_per_tok * n_tok, sizeof *sc->ts) ||
        grow((void **)&sc->isum, &sc->cap_isum, isum_per_piece * pieces, sizeof *sc->isum))
        return -1;
    for (int l = 0; l < bm->depth; l++) {   /* the factors in f32 once per pass, v by rank */
        const struct bitstack_block *b = &bm->levels[l];
        be->kv_rows_f16(sc->uf + u_at[l], b->u, 0, 1, rows * b->rank);
        be->kv_rows_f16(sc->tmp, b->v, 0, 1, cols * b->rank);
        for (int q = 0; q < b->rank; q++)
            for (int c = 0; c < cols; c++) sc->vf[t_at[l] + (size_t)q * cols + c] = sc->tmp[(size_t)c * b->rank + q];
    }
    const int tok_per_piece = (n_tok + 2 * threads - 1) / (2 * threads);
    const int tok_pieces = (n_tok + tok_per_piece - 1) / tok_per_piece;
    struct rows_job job = {be, bm, sc, x, out, n_tok, t_at, ts_at, u_at, isum_per_piece, per, tok_per_piece};
    if (pool && tok_pieces > 1) ebb_pool_run(pool, codes_piece, &job, tok_pieces);
    else for (int i = 0; i < tok_pieces; i++) codes_piece(&job, i, tok_pieces);
    if (pool && pieces > 1) ebb_pool_run(pool, rows_piece, &job, pieces);
    else for (int i = 0; i < pieces; i++) rows_piece(&job, i, pieces);
    return 0;
}
