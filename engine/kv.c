/* KV cache pages, precisions, the recent window and the memory account; see
 * kv.h for the design.
 *
 * Layout. A body page holds, for each layer, the keys then the values of
 * KV_PAGE_TOKENS positions, one row per position: kv_dim values as f32 or
 * f16, or (8 and 4 bits) the row's codes followed by its f16 (d, m) pairs,
 * kv_dim / group of them. A head's part of a row is therefore one strided
 * run across the page, which is what the backend's KV row ops read: one call
 * scores (or sums) up to 64 positions of one head. At 8 and 4 bits a window
 * page has the same shape with f32 rows, and the sink copy is one short page
 * of KV_SINK_TOKENS f32 rows, allocated with the first page.
 *
 * Only the row ops touch quantized data, a page run at a time: the cache is
 * never expanded to f32 beyond the window and sinks it keeps on purpose.
 */
#include "engine/kv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model.h"
#include "kernels/backend.h"
#include "kernels/formats.h"

/* Window pages a pass appending b positions can need at once: the pages it
 * writes plus the one before its first (see kv_cache_ensure). */
#define WINDOW_PAGES_FOR(b) (2 + ((b) + KV_PAGE_TOKENS - 2) / KV_PAGE_TOKENS)
#define WINDOW_PAGES_MAX WINDOW_PAGES_FOR(MODEL_MAX_BATCH)
#define F16_MAX 65504.0f
#define KV_MAX_HEAD_DIM 1024  /* kv_attend's stack buffers (model.c allows no more) */

static int pages_for(int n) { return (n + KV_PAGE_TOKENS - 1) / KV_PAGE_TOKENS; }
static int is_quantized(int bits) { return bits == 8 || bits == 4; }

/* ------------------------------------------------------------- layouts */

const char *kv_bits_problem(const struct model_config *cfg, int bits) {
    if (bits != 32 && bits != 16 && bits != 8 && bits != 4) return "kv_bits must be 32, 16, 8 or 4";
    if (is_quantized(bits) && (cfg->head_dim % 8 || cfg->head_dim > KV_MAX_HEAD_DIM))
        return "kv_bits 8 and 4 need a head size that is a multiple of 8, at most 1024";
    return NULL;
}

int kv_layout_init(struct kv_layout *l, const struct model_config *cfg, int bits) {
    memset(l, 0, sizeof *l);
    if (kv_bits_problem(cfg, bits)) return -1;
    l->bits = bits;
    l->n_layer = cfg->n_layer;
    l->head_dim = cfg->head_dim;
    l->kv_dim = cfg->n_head_kv * cfg->head_dim;
    if (is_quantized(bits)) {
        l->group = 64;
        while (l->head_dim % l->group) l->group /= 2;
        l->rotate = l->head_dim % 64 == 0;
        l->code_bytes = (size_t)l->kv_dim * (size_t)bits / 8;
        l->row_bytes = l->code_bytes + (size_t)(l->kv_dim / l->group) * 2 * sizeof(uint16_t);
        l->window_page_bytes = 2 * (size_t)l->n_layer * KV_PAGE_TOKENS * (size_t)l->kv_dim * sizeof(float);
        l->sink_bytes = 2 * (size_t)l->n_layer * KV_SINK_TOKENS * (size_t)l->kv_dim * sizeof(float);
    } else {
        l->row_bytes = (size_t)l->kv_dim * (size_t)bits / 8;
    }
    l->page_bytes = 2 * (size_t)l->n_layer * KV_PAGE_TOKENS * l->row_bytes;
    return 0;
}

/* Most window pages a cache of n_ctx positions holds at once. */
static int window_pages_for(const struct kv_layout *l, int n_ctx) {
    if (!is_quantized(l->bits) || n_ctx <= 0) return 0;
    int batch = n_ctx < MODEL_MAX_BATCH ? n_ctx : MODEL_MAX_BATCH;
    int w = WINDOW_PAGES_FOR(batch), pages = pages_for(n_ctx);
    return w < pages ? w : pages;
}

size_t kv_layout_bytes_for(const struct kv_layout *l, int n_ctx) {
    if (n_ctx <= 0) return 0;
    return (size_t)pages_for(n_ctx) * l->page_bytes + (size_t)window_pages_for(l, n_ctx) * l->window_page_bytes +
           l->sink_bytes;
}

/* ------------------------------------------------------------- account */

int kv_account_init(struct kv_account *a, const struct model_config *cfg, int bits, size_t budget_bytes) {
    memset(a, 0, sizeof *a);
    if (kv_layout_init(&a->layout, cfg, bits)) return -1;
    pthread_mutex_init(&a->lock, NULL);
    a->budget_bytes = budget_bytes;
    return 0;
}

void kv_account_destroy(struct kv_account *a) {
    pthread_mutex_destroy(&a->lock);
}

void kv_account_set_budget(struct kv_account *a, size_t budget_bytes) {
    pthread_mutex_lock(&a->lock);
    a->budget_bytes = budget_bytes;
    pthread_mutex_unlock(&a->lock);
}

size_t kv_account_bytes_for(const struct kv_account *a, int n_ctx) {
    return kv_layout_bytes_for(&a->layout, n_ctx);
}

static void account_add(struct kv_account *a, size_t *field, long long delta) {
    if (!a) return;
    pthread_mutex_lock(&a->lock);
    *field = (size_t)((long long)*field + delta);
    pthread_mutex_unlock(&a->lock);
}

static void charge(struct kv_cache *kv, long long bytes) {
    if (kv->account) account_add(kv->account, &kv->account->allocated_bytes, bytes);
}

/* ---------------------------------------------------------- cache pages */

int kv_cache_init(struct kv_cache *kv, const struct model_config *cfg, int n_ctx, struct kv_account *account) {
    memset(kv, 0, sizeof *kv);
    if (n_ctx <= 0 || kv_layout_init(&kv->layout, cfg, account ? account->layout.bits : 32)) return -1;
    if (account) {
        size_t want = kv_layout_bytes_for(&kv->layout, n_ctx);
        pthread_mutex_lock(&account->lock);
        int ok = !account->budget_bytes || account->reserved_bytes + want <= account->budget_bytes;
        if (ok) account->reserved_bytes += want;
        pthread_mutex_unlock(&account->lock);
        if (!ok) return -2;
        kv->reserved_bytes = want;
    }
    kv->account = account;
    kv->n_ctx = n_ctx;
    kv->window_lo = 0;
    kv->window_hi = -1;
    kv->window_max = window_pages_for(&kv->layout, n_ctx);
    const size_t max_pages = (size_t)pages_for(n_ctx);
    kv->pages = calloc(max_pages, sizeof *kv->pages);
    if (kv->window_max) kv->window = calloc(max_pages, sizeof *kv->window);
    if (!kv->pages || (kv->window_max && !kv->window)) {
        kv_cache_free(kv);
        return -1;
    }
    return 0;
}

void kv_cache_free(struct kv_cache *kv) {
    if (!kv) return;
    const struct kv_layout *l = &kv->layout;
    for (int p = 0; p < kv->n_pages; p++) free(kv->pages[p]);
    long long held = (long long)(l->page_bytes * (size_t)kv->n_pages);
    if (kv->sink) held += (long long)l->sink_bytes;
    free(kv->sink);
    for (int p = kv->window_lo; kv->window && p <= kv->window_hi; p++)
        if (kv->window[p]) {
            free(kv->window[p]);
            held += (long long)l->window_page_bytes;
        }
    if (kv->account) {
        account_add(kv->account, &kv->account->allocated_bytes, -held);
        account_add(kv->account, &kv->account->reserved_bytes, -(long long)kv->reserved_bytes);
    }
    free(kv->pages);
    free(kv->window);
    memset(kv, 0, sizeof *kv);
}

void kv_cache_clear(struct kv_cache *kv) {
    kv->n_past = 0;
}

/* Holds exactly the window pages that queries at positions from .. n-1 can
 * read: from the page before from's page through n-1's. Pages no longer
 * needed are reused for new ones before anything is allocated or freed, so
 * decoding recycles one page every 64 tokens and allocates nothing. */
static int window_ensure(struct kv_cache *kv, int from, int n) {
    const struct kv_layout *l = &kv->layout;
    int lo = from / KV_PAGE_TOKENS - 1, hi = (n - 1) / KV_PAGE_TOKENS;
    if (lo < 0) lo = 0;
    if (hi - lo + 1 > kv->window_max) return -1;   /* a pass longer than the reservation allows */
    float *spare[WINDOW_PAGES_MAX];
    int n_spare = 0;
    for (int p = kv->window_lo; p <= kv->window_hi; p++) {
        if (!kv->window[p] || (p >= lo && p <= hi)) continue;
        if (n_spare < WINDOW_PAGES_MAX) {
            spare[n_spare++] = kv->window[p];
        } else {
            free(kv->window[p]);
            charge(kv, -(long long)l->window_page_bytes);
        }
        kv->window[p] = NULL;
    }
    int rc = 0;
    for (int p = lo; p <= hi && rc == 0; p++) {
        if (kv->window[p]) continue;
        if (n_spare) {
            kv->window[p] = spare[--n_spare];
        } else if ((kv->window[p] = malloc(l->window_page_bytes))) {
            charge(kv, (long long)l->window_page_bytes);
        } else {
            rc = -1;
        }
    }
    while (n_spare) {
        free(spare[--n_spare]);
        charge(kv, -(long long)l->window_page_bytes);
    }
    kv->window_lo = lo;
    kv->window_hi = hi;
    return rc;
}

int kv_cache_ensure(struct kv_cache *kv, int n) {
    if (n > kv->n_ctx) return -1;
    const struct kv_layout *l = &kv->layout;
    int need = pages_for(n);
    while (kv->n_pages < need) {
        uint8_t *page = malloc(l->page_bytes);
        if (!page) return -1;
        kv->pages[kv->n_pages++] = page;
        charge(kv, (long long)l->page_bytes);
    }
    if (!kv->window || n <= kv->n_past) return 0;
    if (!kv->sink) {
        if (!(kv->sink = malloc(l->sink_bytes))) return -1;
        charge(kv, (long long)l->sink_bytes);
    }
    return window_ensure(kv, kv->n_past, n);
}

/* Row of a layer, kind (0 keys, 1 values) and position in the body. */
static uint8_t *body_row(const struct kv_cache *kv, int layer, int kind, int pos) {
    size_t row = ((size_t)layer * 2 + (size_t)kind) * KV_PAGE_TOKENS + (size_t)(pos % KV_PAGE_TOKENS);
    return kv->pages[pos / KV_PAGE_TOKENS] + row * kv->layout.row_bytes;
}

static float *window_row(const struct kv_cache *kv, int layer, int kind, int pos) {
    size_t row = ((size_t)layer * 2 + (size_t)kind) * KV_PAGE_TOKENS + (size_t)(pos % KV_PAGE_TOKENS);
    return kv->window[pos / KV_PAGE_TOKENS] + row * (size_t)kv->layout.kv_dim;
}

static float *sink_row(const struct kv_cache *kv, int layer, int kind, int pos) {
    size_t row = ((size_t)layer * 2 + (size_t)kind) * KV_SINK_TOKENS + (size_t)pos;
    return kv->sink + row * (size_t)kv->layout.kv_dim;
}

/* ------------------------------------------------------- quantization */

static float clamp_f16_range(float v) {
    return v > F16_MAX ? F16_MAX : v < -F16_MAX ? -F16_MAX : v;
}

/* The largest half <= x and the smallest half >= x (|x| <= 65504). */
static uint16_t f16_down(float x) {
    uint16_t h = ebb_f32_to_f16(x);
    if (ebb_f16_to_f32(h) <= x) return h;
    if ((h & 0x7fff) == 0) return 0x8001;            /* +-0 -> smallest negative */
    return (h & 0x8000) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}

static uint16_t f16_up(float x) {
    uint16_t h = ebb_f32_to_f16(x);
    if (ebb_f16_to_f32(h) >= x) return h;
    if ((h & 0x7fff) == 0) return 0x0001;
    return (h & 0x8000) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}

/* One group: m is the minimum rounded down to a half and d the step rounded
 * up, so [m, m + qmax * d] covers every value and rounding to the nearest
 * code is off by at most d/2, whatever f16 did to d and m. */
static void quantize_group(int bits, const float *x, int group, uint8_t *codes, uint16_t *dm) {
    const int qmax = (1 << bits) - 1;
    float lo = F16_MAX, hi = -F16_MAX;
    for (int i = 0; i < group; i++) {              /* fminf/fmaxf skip NaN */
        lo = fminf(lo, clamp_f16_range(x[i]));
        hi = fmaxf(hi, clamp_f16_range(x[i]));
    }
    if (lo > hi) lo = hi = 0;                        /* all NaN */
    const uint16_t mh = f16_down(lo);
    const float m = ebb_f16_to_f32(mh);
    const uint16_t dh = f16_up((hi - m) / (float)qmax);
    const float d = ebb_f16_to_f32(dh);
    const float inv = d > 0 ? 1.0f / d : 0.0f;
    dm[0] = dh;
    dm[1] = mh;
    const int half = group / 2;
    if (bits == 4) memset(codes, 0, (size_t)half);
    for (int i = 0; i < group; i++) {
        float t = (clamp_f16_range(x[i]) - m) * inv + 0.5f;
        int c = t >= 1.0f ? (t >= (float)qmax ? qmax : (int)t) : 0;   /* NaN -> 0 */
        if (bits == 8) codes[i] = (uint8_t)c;
        else if (i < half) codes[i] |= (uint8_t)c;
        else codes[i - half] |= (uint8_t)(c << 4);
    }
}

void kv_quantize_row(int bits, const float *x, int n, int group, uint8_t *codes, uint16_t *dm) {
    for (int g = 0; g < n / group; g++)
        quantize_group(bits, x + g * group, group, codes + (size_t)g * group * bits / 8, dm + 2 * g);
}

void kv_dequantize_row(int bits, const uint8_t *codes, const uint16_t *dm, int n, int group, float *out) {
    const int half = group / 2;
    for (int g = 0; g < n / group; g++) {
        const uint8_t *c = codes + (size_t)g * group * bits / 8;
        const float d = ebb_f16_to_f32(dm[2 * g]), m = ebb_f16_to_f32(dm[2 * g + 1]);
        for (int i = 0; i < group; i++) {
            int q = bits == 8 ? c[i] : i < half ? c[i] & 15 : c[i - half] >> 4;
            out[g * group + i] = m + d * (float)q;
        }
    }
}

/* The rotation of keys, values and queries (H64 on each block of 64). */
static void rotate64(const struct ebb_backend *be, float *x, int n) {
    be->hadamard64(x, n);
}

static uint16_t *row_dm(const struct kv_layout *l, uint8_t *row) {
    return (uint16_t *)(void *)(row + l->code_bytes);
}

/* Keys or values into a quantized row, rotated a group at a time when the
 * layout rotates (rotation implies groups of 64). */
static void store_quantized(const struct kv_layout *l, const struct ebb_backend *be, uint8_t *row, const float *x) {
    if (!l->rotate) {
        kv_quantize_row(l->bits, x, l->kv_dim, l->group, row, row_dm(l, row));
        return;
    }
    float block[64];
    for (int g = 0; g < l->kv_dim / 64; g++) {
        memcpy(block, x + 64 * g, sizeof block);
        rotate64(be, block, 64);
        quantize_group(l->bits, block, 64, row + (size_t)g * 8 * l->bits, row_dm(l, row) + 2 * g);
    }
}

void kv_store(struct kv_cache *kv, const struct ebb_backend *be, int layer, int pos, const float *k,
              const float *v) {
    const struct kv_layout *l = &kv->layout;
    const size_t n = (size_t)l->kv_dim;
    uint8_t *krow = body_row(kv, layer, 0, pos), *vrow = body_row(kv, layer, 1, pos);
    switch (l->bits) {
    case 32:
        memcpy(krow, k, n * sizeof(float));
        memcpy(vrow, v, n * sizeof(float));
        break;
    case 16: {
        uint16_t *kh = (uint16_t *)(void *)krow, *vh = (uint16_t *)(void *)vrow;
        for (size_t i = 0; i < n; i++) {
            kh[i] = ebb_f32_to_f16(clamp_f16_range(k[i]));
            vh[i] = ebb_f32_to_f16(clamp_f16_range(v[i]));
        }
        break;
    }
    default:
        memcpy(window_row(kv, layer, 0, pos), k, n * sizeof(float));
        memcpy(window_row(kv, layer, 1, pos), v, n * sizeof(float));
        if (pos < KV_SINK_TOKENS) {
            memcpy(sink_row(kv, layer, 0, pos), k, n * sizeof(float));
            memcpy(sink_row(kv, layer, 1, pos), v, n * sizeof(float));
        }
        store_quantized(l, be, krow, k);
        store_quantized(l, be, vrow, v);
        break;
    }
}

/* ------------------------------------------------------------ attention */

/* The scratch holds the scores; the rotated query and the rotated sum of
 * values (head_dim floats) live on the stack. */
size_t kv_attend_scratch(const struct model_config *cfg, int n_ctx) {
    (void)cfg;
    return (size_t)n_ctx;
}

/* The three places a position's full-precision row can be read from. */
enum full_store { FROM_BODY32, FROM_SINK, FROM_WINDOW };

static const float *full_row(const struct kv_cache *kv, enum full_store from, int layer, int kind, int pos) {
    if (from == FROM_SINK) return sink_row(kv, layer, kind, pos);
    if (from == FROM_WINDOW) return window_row(kv, layer, kind, pos);
    return (const float *)(const void *)body_row(kv, layer, kind, pos);
}

/* Positions [i0, i1) at full precision, one at a time. */
static void scores_full(float *scores, const struct kv_cache *kv, const struct ebb_backend *be, enum full_store from,
                        int layer, int kvh, const float *q, int i0, int i1, float scale) {
    const int hd = kv->layout.head_dim;
    for (int i = i0; i < i1; i++) scores[i] = be->dot_f32(q, full_row(kv, from, layer, 0, i) + kvh * hd, hd) * scale;
}

static void values_full(float *out, const struct kv_cache *kv, const struct ebb_backend *be, enum full_store from,
                        int layer, int kvh, const float *p, int i0, int i1) {
    const int hd = kv->layout.head_dim;
    for (int i = i0; i < i1; i++) be->axpy_f32(out, p[i], full_row(kv, from, layer, 1, i) + kvh * hd, hd);
}

/* Positions [i0, i1) of the f16 or quantized body, one run per page and
 * call: scores (kind 0, x = the query, into out[i]) or the weighted sum of
 * values (kind 1, x = the probabilities, accumulated into out[0, hd)). */
static void body_runs(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kind, int kvh,
                      const float *x, int i0, int i1, float *out) {
    const struct kv_layout *l = &kv->layout;
    const int hd = l->head_dim;
    for (int i = i0; i < i1;) {
        const int page_end = (i / KV_PAGE_TOKENS + 1) * KV_PAGE_TOKENS;
        const int rows = (i1 < page_end ? i1 : page_end) - i;
        uint8_t *row = body_row(kv, layer, kind, i);
        if (l->bits == 16) {
            const uint16_t *h = (const uint16_t *)(void *)row + (size_t)kvh * hd;
            if (kind == 0) be->kv_dot_f16(out + i, x, h, l->row_bytes, rows, hd);
            else be->kv_axpy_f16(out, x + i, h, l->row_bytes, rows, hd);
        } else {
            const uint8_t *codes = row + (size_t)kvh * hd * l->bits / 8;
            const uint16_t *dm = row_dm(l, row) + (size_t)kvh * (hd / l->group) * 2;
            if (kind == 0)
                (l->bits == 8 ? be->kv_dot_q8 : be->kv_dot_q4)(out + i, x, codes, dm, l->row_bytes, rows, hd, l->group);
            else
                (l->bits == 8 ? be->kv_axpy_q8 : be->kv_axpy_q4)(out, x + i, codes, dm, l->row_bytes, rows, hd, l->group);
        }
        i += rows;
    }
}

/* Where a query at position n_pos - 1 reads each earlier position: [0,
 * sink) from the sink store, [sink, body) from the body, [body, n_pos) at
 * full precision from the window (8 and 4 bits) or the body (32 bits). */
static void split_positions(const struct kv_layout *l, int n_pos, int *sink, int *body) {
    *sink = 0;
    *body = l->bits == 32 ? 0 : n_pos;
    if (!is_quantized(l->bits)) return;
    *body = ((n_pos - 1) / KV_PAGE_TOKENS - 1) * KV_PAGE_TOKENS;
    if (*body < 0) *body = 0;
    *sink = *body < KV_SINK_TOKENS ? *body : KV_SINK_TOKENS;
}

void kv_attend(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
               int n_pos, float scale, float *scratch, float *out) {
    const struct kv_layout *l = &kv->layout;
    const int hd = l->head_dim;
    float qr[KV_MAX_HEAD_DIM], *scores = scratch;
    int sink, body;
    split_positions(l, n_pos, &sink, &body);
    const enum full_store recent = l->bits == 32 ? FROM_BODY32 : FROM_WINDOW;

    scores_full(scores, kv, be, FROM_SINK, layer, kvh, q, 0, sink, scale);
    if (body > sink) {
        const float *qb = q;
        if (l->rotate) {
            memcpy(qr, q, (size_t)hd * sizeof(float));
            rotate64(be, qr, hd);
            qb = qr;
        }
        body_runs(kv, be, layer, 0, kvh, qb, sink, body, scores);
        for (int i = sink; i < body; i++) scores[i] *= scale;
    }
    scores_full(scores, kv, be, recent, layer, kvh, q, body, n_pos, scale);
    be->softmax_f32(scores, n_pos);

    memset(out, 0, (size_t)hd * sizeof(float));
    values_full(out, kv, be, FROM_SINK, layer, kvh, scores, 0, sink);
    if (body > sink && l->rotate) {
        /* The body's values are rotated: sum them in the rotated basis,
         * then rotate the sum back once (H64 is its own inverse). */
        memset(qr, 0, (size_t)hd * sizeof(float));
        body_runs(kv, be, layer, 1, kvh, scores, sink, body, qr);
        rotate64(be, qr, hd);
        be->add_f32(out, qr, hd);
    } else if (body > sink) {
        body_runs(kv, be, layer, 1, kvh, scores, sink, body, out);
    }
    values_full(out, kv, be, recent, layer, kvh, scores, body, n_pos);
}
