/* KV cache pages, precisions, the recent window and the memory account; see
 * kv.h for the design.
 *
 * Layout. A body page holds, for each layer, the keys then the values of
 * KV_PAGE_TOKENS positions, one row per position: kv_dim values as f32 or
 * f16, or (8 and 4 bits) the row's codes followed by its f16 (d, m) pairs,
 * kv_dim / group of them. A head's part of a row is therefore one strided
 * run across the page, which is what the backend's kv_rows_* ops read: one
 * call converts up to 64 positions of one head to f32. At 8 and 4 bits a
 * window page has the same shape with f32 rows, and the sink copy is one
 * short page of KV_SINK_TOKENS f32 rows, allocated with the first page.
 *
 * Attention reads quantized data only through those conversions, one page
 * of one head at a time into the caller's scratch: the cache is never
 * expanded to f32 beyond the window and sinks it keeps on purpose.
 */
#include "engine/kv.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/formats.h"

/* Window pages a pass appending b positions can need at once: the pages it
 * writes plus the one before its first (see kv_cache_ensure). */
#define WINDOW_PAGES_FOR(b) (2 + ((b) + KV_PAGE_TOKENS - 2) / KV_PAGE_TOKENS)
#define WINDOW_PAGES_MAX WINDOW_PAGES_FOR(MODEL_MAX_BATCH)
#define KV_MAX_HEAD_DIM 1024  /* kv_attend's stack buffers (model.c allows no more) */

static int pages_for(int n) { return (n + KV_PAGE_TOKENS - 1) / KV_PAGE_TOKENS; }
static int is_quantized(int bits) { return bits == 8 || bits == 4; }

/* ------------------------------------------------------------- layouts */

/* Values per quantization group for a head: the largest of 64, 32, 16, 8
 * that divides it. */
static int group_for(int head_dim) {
    int g = EBB_KVQ_GROUP_MAX;
    while (head_dim % g) g /= 2;
    return g;
}

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
        l->group = group_for(l->head_dim);
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

/* Most window pages a cache of n_ctx positions holds at once when no pass
 * appends more than max_pass positions. */
static int window_pages_for(const struct kv_layout *l, int n_ctx, int max_pass) {
    if (!is_quantized(l->bits) || n_ctx <= 0) return 0;
    if (max_pass > n_ctx) max_pass = n_ctx;
    if (max_pass > MODEL_MAX_BATCH) max_pass = MODEL_MAX_BATCH;
    if (max_pass < 1) max_pass = 1;
    int w = WINDOW_PAGES_FOR(max_pass), pages = pages_for(n_ctx);
    return w < pages ? w : pages;
}

/* What a cache holding n positions can have allocated: its body pages, as
 * many window pages as it can hold at once (never more than it has body
 * pages), and the sinks. */
static size_t bytes_held_at_most(const struct kv_layout *l, int n, int window_max) {
    if (n <= 0) return 0;
    const int pages = pages_for(n), windows = window_max < pages ? window_max : pages;
    return (size_t)pages * l->page_bytes + (size_t)windows * l->window_page_bytes + l->sink_bytes;
}

size_t kv_layout_bytes_for(const struct kv_layout *l, int n_ctx) {
    return bytes_held_at_most(l, n_ctx, window_pages_for(l, n_ctx, n_ctx));
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

struct kv_usage kv_account_usage(struct kv_account *a) {
    pthread_mutex_lock(&a->lock);
    struct kv_usage u = {a->budget_bytes, a->reserved_bytes, a->allocated_bytes, a->kept_bytes};
    pthread_mutex_unlock(&a->lock);
    return u;
}

size_t kv_account_bytes_for(const struct kv_account *a, int n_ctx) {
    return kv_layout_bytes_for(&a->layout, n_ctx);
}

size_t kv_account_bytes_for_pass(const struct kv_account *a, int n, int max_pass) {
    return bytes_held_at_most(&a->layout, n, window_pages_for(&a->layout, n, max_pass));
}

int kv_account_capacity(struct kv_account *a, int n_max) {
    const size_t budget = kv_account_usage(a).budget_bytes;
    if (!budget || kv_account_bytes_for(a, n_max) <= budget) return n_max;
    int lo = 0, hi = n_max;   /* bytes_for(lo) fits, bytes_for(hi) does not */
    while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        if (kv_account_bytes_for(a, mid) <= budget) lo = mid;
        else hi = mid;
    }
    return lo;
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

/* Adds `more` to what the account has reserved if its budget takes it. */
static int account_reserve(struct kv_account *a, size_t more) {
    pthread_mutex_lock(&a->lock);
    const int ok = !a->budget_bytes || a->reserved_bytes + more <= a->budget_bytes;
    if (ok) a->reserved_bytes += more;
    pthread_mutex_unlock(&a->lock);
    return ok;
}

/* ---------------------------------------------------------- cache pages */

/* Grows the reservation to cover positions [0, n): the bytes a cache of n
 * positions can hold at most (kv_layout_bytes_for is nondecreasing in n). */
enum kv_status kv_cache_reserve(struct kv_cache *kv, int n) {
    if (n > kv->n_ctx) return KV_FAILED;
    if (n <= kv->n_reserved) return KV_OK;
    if (kv->account) {
        /* A compact cache holds its store instead of the pages it replaced. */
        const size_t want = bytes_held_at_most(&kv->layout, n, kv->window_max) - kv->compact_saved;
        const size_t more = want > kv->reserved_bytes ? want - kv->reserved_bytes : 0;
        if (!account_reserve(kv->account, more)) return KV_OVER_BUDGET;
        kv->reserved_bytes += more;
    }
    kv->n_reserved = n;
    return KV_OK;
}

enum kv_status kv_cache_init_reserving(struct kv_cache *kv, const struct model_config *cfg, int n_ctx, int n_reserve,
                                       int max_pass, struct kv_account *account) {
    memset(kv, 0, sizeof *kv);
    if (n_ctx <= 0 || n_reserve < 0 || n_reserve > n_ctx || max_pass < 1 ||
        kv_layout_init(&kv->layout, cfg, account ? account->layout.bits : 32))
        return KV_FAILED;
    kv->account = account;
    kv->be = account && account->be ? account->be : ebb_backend_cpu();
    kv->n_ctx = n_ctx;
    kv->window_max = window_pages_for(&kv->layout, n_ctx, max_pass);
    enum kv_status rc = kv_cache_reserve(kv, n_reserve);
    if (rc != KV_OK) {
        memset(kv, 0, sizeof *kv);
        return rc;
    }
    kv->window_lo = 0;
    kv->window_hi = -1;
    const size_t max_pages = (size_t)pages_for(n_ctx);
    kv->pages = calloc(max_pages, sizeof *kv->pages);
    if (kv->window_max) kv->window = calloc(max_pages, sizeof *kv->window);
    /* A backend with a fused attention reads the page tables in its memory. */
    if (kv->be->attend && (kv->table = ebb_alloc(kv->be, 2 * max_pages * sizeof *kv->table)))
        ebb_zero(kv->be, kv->table, 2 * max_pages * sizeof *kv->table);
    kv->table_stale = 1;
    if (!kv->pages || (kv->window_max && !kv->window) || (kv->be->attend && !kv->table)) {
        kv_cache_free(kv);
        return KV_FAILED;
    }
    return KV_OK;
}

enum kv_status kv_cache_init(struct kv_cache *kv, const struct model_config *cfg, int n_ctx,
                             struct kv_account *account) {
    return kv_cache_init_reserving(kv, cfg, n_ctx, n_ctx, n_ctx, account);
}

static void compact_free(struct kv_cache *kv);

void kv_cache_free(struct kv_cache *kv) {
    if (!kv) return;
    const struct kv_layout *l = &kv->layout;
    compact_free(kv);
    kv_cache_forget_observation(kv);
    long long held = 0;
    for (int p = 0; p < kv->n_pages; p++)
        if (kv->pages[p]) {
            ebb_release(kv->be, kv->pages[p]);
            held += (long long)l->page_bytes;
        }
    if (kv->sink) {
        ebb_release(kv->be, kv->sink);
        held += (long long)l->sink_bytes;
    }
    for (int p = kv->window_lo; kv->window && p <= kv->window_hi; p++)
        if (kv->window[p]) {
            ebb_release(kv->be, kv->window[p]);
            held += (long long)l->window_page_bytes;
        }
    if (kv->account) {   /* one change, so that reserved less kept is never seen half done */
        struct kv_account *a = kv->account;
        pthread_mutex_lock(&a->lock);
        a->allocated_bytes = (size_t)((long long)a->allocated_bytes - held);
        a->reserved_bytes -= kv->reserved_bytes;
        if (kv->kept) a->kept_bytes -= kv->reserved_bytes;
        pthread_mutex_unlock(&a->lock);
    }
    free(kv->pages);
    free(kv->window);
    if (kv->table) ebb_release(kv->be, (void *)kv->table);
    memset(kv, 0, sizeof *kv);
}

void kv_cache_set_kept(struct kv_cache *kv, int kept) {
    kept = kept != 0;
    if (kv->kept == kept) return;
    kv->kept = kept;
    if (!kv->account) return;
    pthread_mutex_lock(&kv->account->lock);
    if (kept) kv->account->kept_bytes += kv->reserved_bytes;
    else kv->account->kept_bytes -= kv->reserved_bytes;
    pthread_mutex_unlock(&kv->account->lock);
}

/* A compact cache forgets its store too: the pages it replaced come back
 * with the next kv_cache_ensure, inside the reservation, which grows again
 * by what the store saved once positions need them. */
void kv_cache_clear(struct kv_cache *kv) {
    compact_free(kv);
    kv_cache_forget_observation(kv);
    kv->n_past = 0;
}

int kv_cache_truncate_floor(const struct kv_cache *kv) {
    int floor = 0;
    /* Queries from position n on read window pages from n's page before:
     * n's page must be past the first window page held. */
    if (kv->window && kv->window_lo > 0) floor = (kv->window_lo + 1) * KV_PAGE_TOKENS;
    if (kv->compact && floor < kv->compact_boundary + KV_PAGE_TOKENS) floor = kv->compact_boundary + KV_PAGE_TOKENS;
    return floor < kv->n_past ? floor : kv->n_past;
}

int kv_cache_truncate(struct kv_cache *kv, int n) {
    if (n < kv_cache_truncate_floor(kv) || n > kv->n_past) return -1;
    kv->n_past = n;
    return 0;
}

int kv_cache_max_pass(const struct kv_cache *kv) {
    return kv->window ? (kv->window_max - 2) * KV_PAGE_TOKENS + 1 : kv->n_ctx;
}

void kv_cache_hold_window(struct kv_cache *kv, int pos) { kv->window_hold = pos >= 0 ? pos + 1 : 0; }

/* Page arrays of another length: the first `keep` entries copied, the rest
 * NULL. */
static void **page_array(void *const *from, int keep, int n) {
    void **a = calloc((size_t)n, sizeof *a);
    if (a && from && keep) memcpy(a, from, (size_t)keep * sizeof *a);
    return a;
}

enum kv_status kv_cache_resume(struct kv_cache *kv, int n_ctx, int n_reserve, int max_pass) {
    const struct kv_layout *l = &kv->layout;
    if (kv->obs || n_ctx <= 0 || n_ctx < kv->n_past || n_reserve < kv->n_past || n_reserve > n_ctx || max_pass < 1)
        return KV_FAILED;
    /* Never fewer window pages than are held now. */
    int window_max = window_pages_for(l, n_ctx, max_pass);
    if (window_max < kv->window_max) window_max = kv->window_max;
    const size_t want = kv->account ? bytes_held_at_most(l, n_reserve, window_max) - kv->compact_saved : 0;
    if (want > kv->reserved_bytes && !account_reserve(kv->account, want - kv->reserved_bytes)) return KV_OVER_BUDGET;
    const int was = pages_for(kv->n_ctx), now = pages_for(n_ctx), keep = was < now ? was : now;
    uint8_t **pages = (uint8_t **)page_array((void *const *)kv->pages, keep, now);
    float **window = kv->window ? (float **)page_array((void *const *)kv->window, keep, now) : NULL;
    void **table = NULL;
    if (kv->table && (table = ebb_alloc(kv->be, 2 * (size_t)now * sizeof *table)))
        ebb_zero(kv->be, table, 2 * (size_t)now * sizeof *table);
    if (!pages || (kv->window && !window) || (kv->table && !table)) {
        if (want > kv->reserved_bytes)
            account_add(kv->account, &kv->account->reserved_bytes, -(long long)(want - kv->reserved_bytes));
        free(pages);
        free(window);
        if (table) ebb_release(kv->be, table);
        return KV_FAILED;
    }
    /* Body pages kept for reuse beyond the new length go back (none holds a
     * position: n_past <= n_ctx); window pages never lie past n_past's. */
    for (int p = now; p < kv->n_pages; p++)
        if (kv->pages[p]) {
            ebb_release(kv->be, kv->pages[p]);
            charge(kv, -(long long)l->page_bytes);
        }
    if (kv->n_pages > now) kv->n_pages = now;
    if (kv->account && want < kv->reserved_bytes)
        account_add(kv->account, &kv->account->reserved_bytes, -(long long)(kv->reserved_bytes - want));
    if (kv->account) kv->reserved_bytes = want;
    free(kv->pages);
    free(kv->window);
    if (kv->table) ebb_release(kv->be, (void *)kv->table);
    kv->pages = pages;
    kv->window = window;
    kv->table = table;
    kv->table_stale = 1;
    kv->n_ctx = n_ctx;
    kv->n_reserved = n_reserve;
    kv->window_max = window_max;
    return KV_OK;
}

int kv_cache_copy_prefix(struct kv_cache *kv, const struct kv_cache *src, int n) {
    const struct kv_layout *l = &kv->layout;
    if (kv->n_past || kv->compact || src->compact || kv->window || src->window || kv->be != src->be ||
        l->bits != src->layout.bits || n <= 0 || n > src->n_past || kv_cache_ensure(kv, n))
        return -1;
    for (int p = 0; p < pages_for(n); p++) ebb_copy(kv->be, kv->pages[p], src->pages[p], l->page_bytes);
    kv->n_past = n;
    return 0;
}

/* Holds exactly the window pages that queries at positions from .. n-1 can
 * read: from the page before from's page through n-1's. Pages no longer
 * needed are reused for new ones before anything is allocated or freed, so
 * decoding recycles one page every 64 tokens and allocates nothing. */
static int window_ensure(struct kv_cache *kv, int from, int n) {
    const struct kv_layout *l = &kv->layout;
    int lo = from / KV_PAGE_TOKENS - 1, hi = (n - 1) / KV_PAGE_TOKENS;
    if (kv->window_hold > 0 && (kv->window_hold - 1) / KV_PAGE_TOKENS - 1 < lo)
        lo = (kv->window_hold - 1) / KV_PAGE_TOKENS - 1;
    if (lo < 0) lo = 0;
    if (hi - lo + 1 > kv->window_max) return -1;   /* a pass longer than the reservation allows */
    float *spare[WINDOW_PAGES_MAX];
    int n_spare = 0;
    for (int p = kv->window_lo; p <= kv->window_hi; p++) {
        if (!kv->window[p] || (p >= lo && p <= hi)) continue;
        if (n_spare < WINDOW_PAGES_MAX) {
            spare[n_spare++] = kv->window[p];
        } else {
            ebb_release(kv->be, kv->window[p]);
            charge(kv, -(long long)l->window_page_bytes);
        }
        kv->window[p] = NULL;
        kv->table_stale = 1;
    }
    int rc = 0;
    for (int p = lo; p <= hi && rc == 0; p++) {
        if (kv->window[p]) continue;
        kv->table_stale = 1;
        if (n_spare) {
            kv->window[p] = spare[--n_spare];
        } else if ((kv->window[p] = ebb_alloc(kv->be, l->window_page_bytes))) {
            charge(kv, (long long)l->window_page_bytes);
        } else {
            rc = -1;
        }
    }
    while (n_spare) {
        ebb_release(kv->be, spare[--n_spare]);
        charge(kv, -(long long)l->window_page_bytes);
    }
    kv->window_lo = lo;
    kv->window_hi = hi;
    return rc;
}

void kv_cache_limit_pass(struct kv_cache *kv, int max_pass) {
    const int w = window_pages_for(&kv->layout, kv->n_ctx, max_pass);
    if (!kv->window || w >= kv->window_max) return;
    /* Keep only what the next query reads: the pages of n_past - 1 and
     * n_past's page before (all held: the last pass wrote or read them). */
    if (kv->n_past > 0) window_ensure(kv, kv->n_past, kv->n_past);
    kv->window_max = w;
    if (kv->account && kv->n_reserved > 0) {
        const size_t want = bytes_held_at_most(&kv->layout, kv->n_reserved, w) - kv->compact_saved;
        if (want < kv->reserved_bytes) {
            account_add(kv->account, &kv->account->reserved_bytes, -(long long)(kv->reserved_bytes - want));
            kv->reserved_bytes = want;
        }
    }
}

/* The page tables a fused attention reads (kv_attend_block), in the
 * backend's memory: body page pointers, then window page pointers, sent
 * again after a pass's pages changed. */
static int table_send(struct kv_cache *kv) {
    if (!kv->table || !kv->table_stale) return 0;
    const size_t n = (size_t)pages_for(kv->n_ctx);
    if (ebb_upload(kv->be, kv->table, kv->pages, n * sizeof *kv->pages) ||
        (kv->window && ebb_upload(kv->be, kv->table + n, kv->window, n * sizeof *kv->window)))
        return -1;
    kv->table_stale = 0;
    return 0;
}

int kv_cache_ensure(struct kv_cache *kv, int n) {
    if (n > kv->n_ctx || kv_cache_reserve(kv, n) != KV_OK) return -1;
    const struct kv_layout *l = &kv->layout;
    /* Pages before a compact store's boundary stay away; after a clear
     * they come back. */
    const int need = pages_for(n);
    for (int p = kv->compact ? kv->compact_boundary / KV_PAGE_TOKENS : 0; p < need; p++) {
        if (kv->pages[p]) continue;
        if (!(kv->pages[p] = ebb_alloc(kv->be, l->page_bytes))) return -1;
        charge(kv, (long long)l->page_bytes);
        if (kv->n_pages <= p) kv->n_pages = p + 1;
        kv->table_stale = 1;
    }
    if (!kv->window || n <= kv->n_past) return table_send(kv);
    if (!kv->sink) {
        if (!(kv->sink = ebb_alloc(kv->be, l->sink_bytes))) return -1;
        charge(kv, (long long)l->sink_bytes);
    }
    return window_ensure(kv, kv->n_past, n) || table_send(kv) ? -1 : 0;
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

/* ------------------------------------------------------------- storage */

/* The rotation of keys, values and queries (H64 on each block of 64). */
static void rotate64(const struct ebb_backend *be, float *x, int n) {
    be->hadamard64(x, n);
}

static uint16_t *row_dm(const struct kv_layout *l, uint8_t *row) {
    return (uint16_t *)(void *)(row + l->code_bytes);
}

/* Every store goes through the backend (kv_store_row and its memory's
 * copies), so the cache may live in a device's memory. */
void kv_store(struct kv_cache *kv, const struct ebb_backend *be, int layer, int pos, const float *k,
              const float *v) {
    const struct kv_layout *l = &kv->layout;
    assert(layer >= 0 && layer < l->n_layer && pos >= 0 && pos / KV_PAGE_TOKENS < kv->n_pages);   /* ensured */
    const size_t n = (size_t)l->kv_dim;
    uint8_t *krow = body_row(kv, layer, 0, pos), *vrow = body_row(kv, layer, 1, pos);
    if (is_quantized(l->bits)) {
        ebb_copy(be, window_row(kv, layer, 0, pos), k, n * sizeof(float));
        ebb_copy(be, window_row(kv, layer, 1, pos), v, n * sizeof(float));
        if (pos < KV_SINK_TOKENS) {
            ebb_copy(be, sink_row(kv, layer, 0, pos), k, n * sizeof(float));
            ebb_copy(be, sink_row(kv, layer, 1, pos), v, n * sizeof(float));
        }
    }
    be->kv_store_row(krow, k, l->kv_dim, l->bits, l->group, l->rotate);
    be->kv_store_row(vrow, v, l->kv_dim, l->bits, l->group, l->rotate);
}

/* ---------------------------------------------------- the compact store */

/* Positions [0, boundary) of a compressed cache (kv.h). Kept rows are one
 * head's part of a body row, copied as they were (codes then (d, m) pairs
 * at 8 and 4 bits); a chunk of the 2-bit tier holds KV_PAGE_TOKENS key code
 * rows, the keys' per-channel pairs, then KV_PAGE_TOKENS value rows (codes
 * then pairs), whether or not the last chunk is full. */
struct kv_compact {
    int n_keep, n_low, n_head_kv, head_dim;
    int low_group;          /* values per group of a 2-bit value row */
    int low_rotate;         /* the 2-bit tier is stored rotated by H64 */
    size_t keep_row;        /* one head's keys (or values) at one position, at the cache's precision */
    int low_key_bits;       /* 2: per-channel packs; 4: KV4 rows per position */
    size_t low_codes;       /* codes of one head's row at 2 bits */
    size_t low_k_row;       /* a 4-bit key row (low_key_bits 4): codes then pairs */
    size_t low_k_bytes;     /* a chunk's keys: code rows and per-channel pairs, or KV4 rows */
    size_t low_v_row;       /* a 2-bit value row: codes then pairs */
    size_t low_chunk;
    uint8_t *keep;          /* [n_layer][n_head_kv][2][n_keep] rows */
    uint8_t *low;           /* [n_layer][n_head_kv][low chunks] */
    size_t bytes;
};

static size_t keep_row_bytes(const struct kv_layout *l) {
    const size_t hd = (size_t)l->head_dim;
    if (!is_quantized(l->bits)) return hd * (size_t)l->bits / 8;
    return hd * (size_t)l->bits / 8 + (hd / (size_t)l->group) * 2 * sizeof(uint16_t);
}

static void compact_shape(struct kv_compact *c, const struct kv_layout *l, int n_keep, int n_low, int low_key_bits) {
    const size_t hd = (size_t)l->head_dim;
    c->n_keep = n_keep;
    c->n_low = n_low;
    c->n_head_kv = l->kv_dim / l->head_dim;
    c->head_dim = l->head_dim;
    c->low_group = group_for(l->head_dim);
    c->low_rotate = l->head_dim % 64 == 0;
    c->keep_row = keep_row_bytes(l);
    c->low_codes = hd * KV_LOW_BITS / 8;
    c->low_v_row = c->low_codes + (hd / (size_t)c->low_group) * 2 * sizeof(uint16_t);
    c->low_key_bits = low_key_bits;
    c->low_k_row = hd / 2 + (hd / (size_t)c->low_group) * 2 * sizeof(uint16_t);
    if (low_key_bits == KV_LOW_BITS) c->low_k_bytes = KV_PAGE_TOKENS * c->low_codes + hd * 2 * sizeof(uint16_t);
    else c->low_k_bytes = KV_PAGE_TOKENS * c->low_k_row;
    c->low_chunk = c->low_k_bytes + KV_PAGE_TOKENS * c->low_v_row;
    const size_t heads = (size_t)l->n_layer * (size_t)c->n_head_kv;
    c->bytes = heads * (2 * (size_t)n_keep * c->keep_row + (size_t)pages_for(n_low) * c->low_chunk);
}

size_t kv_compact_bytes(const struct kv_layout *l, int n_keep, int n_low, int low_key_bits) {
    struct kv_compact c;
    compact_shape(&c, l, n_keep, n_low, low_key_bits);
    return c.bytes;
}

static uint8_t *keep_rows(const struct kv_compact *c, int layer, int kind, int kvh) {
    return c->keep + ((((size_t)layer * c->n_head_kv + (size_t)kvh) * 2 + (size_t)kind) * (size_t)c->n_keep) * c->keep_row;
}

static uint8_t *low_chunk(const struct kv_compact *c, int layer, int kvh, int chunk) {
    return c->low + (((size_t)layer * c->n_head_kv + (size_t)kvh) * (size_t)pages_for(c->n_low) + (size_t)chunk) *
                        c->low_chunk;
}

/* Where a chunk's key pairs and value rows start. */
static uint16_t *low_key_dm(const struct kv_compact *c, uint8_t *chunk) {
    return (uint16_t *)(void *)(chunk + KV_PAGE_TOKENS * c->low_codes);
}

static uint8_t *low_values(const struct kv_compact *c, uint8_t *chunk) {
    return chunk + c->low_k_bytes;
}

/* Head kvh's part of a body row, copied into a kept row. */
static void copy_head_row(const struct kv_cache *kv, int layer, int kind, int kvh, int pos, uint8_t *dst) {
    const struct kv_layout *l = &kv->layout;
    uint8_t *row = body_row(kv, layer, kind, pos);
    const size_t hd = (size_t)l->head_dim;
    if (!is_quantized(l->bits)) {
        const size_t n = hd * (size_t)l->bits / 8;
        memcpy(dst, row + (size_t)kvh * n, n);
        return;
    }
    const size_t codes = hd * (size_t)l->bits / 8, pairs = hd / (size_t)l->group;
    memcpy(dst, row + (size_t)kvh * codes, codes);
    memcpy(dst + codes, row_dm(l, row) + (size_t)kvh * pairs * 2, pairs * 2 * sizeof(uint16_t));
}

/* A kept row (copy_head_row's layout) as f32, in the 2-bit tier's basis. */
static void kept_row_f32(const struct kv_layout *l, const struct ebb_backend *be, const struct kv_compact *c,
                         const uint8_t *row, float *out) {
    const int hd = l->head_dim;
    if (l->bits == 32) {
        memcpy(out, row, (size_t)hd * sizeof(float));
    } else if (l->bits == 16) {
        const uint16_t *h = (const uint16_t *)(const void *)row;
        for (int i = 0; i < hd; i++) out[i] = ebb_f16_to_f32(h[i]);
    } else {
        ebb_kvq_dequantize_row(l->bits, row, (const uint16_t *)(const void *)(row + (size_t)hd * l->bits / 8), hd,
                               l->group, out);
    }
    if (c->low_rotate && !l->rotate) rotate64(be, out, hd);
}

/* The rows of one (layer, KV head) of the 2-bit tier as a compaction
 * writes them, a chunk at a time: rows demoted now come as f32 (their
 * bytes quantized when the chunk is written), rows already demoted as
 * their bytes (copied, so a row demoted once is never quantized again;
 * keys per channel are the exception: a chunk's channels share one scale,
 * so those keys are read back to f32 and quantized with their new chunk). */
struct low_writer {
    const struct kv_compact *c;
    const struct ebb_backend *be;
    int hd, n, chunk, layer, kvh;
    float *k, *v;                             /* [KV_PAGE_TOKENS][hd] f32 rows */
    const uint8_t *k_row[KV_PAGE_TOKENS];     /* a demoted row's bytes, or NULL */
    const uint8_t *v_row[KV_PAGE_TOKENS];
};

static void low_flush(struct low_writer *w) {
    const struct kv_compact *c = w->c;
    const int hd = w->hd, n = w->n;
    if (!n) return;
    uint8_t *chunk = low_chunk(c, w->layer, w->kvh, w->chunk++);
    if (c->low_key_bits == KV_LOW_BITS) {
        ebb_kvq_quantize_channels(KV_LOW_BITS, w->k, n, hd, c->low_group, chunk, c->low_codes, low_key_dm(c, chunk));
    } else {
        uint8_t *krow = chunk;
        for (int r = 0; r < n; r++, krow += c->low_k_row) {
            if (w->k_row[r]) memcpy(krow, w->k_row[r], c->low_k_row);
            else ebb_kvq_quantize_row(4, w->k + (size_t)r * hd, hd, c->low_group, krow,
                                      (uint16_t *)(void *)(krow + hd / 2));
        }
    }
    uint8_t *vrow = low_values(c, chunk);
    for (int r = 0; r < n; r++, vrow += c->low_v_row) {
        if (w->v_row[r]) memcpy(vrow, w->v_row[r], c->low_v_row);
        else ebb_kvq_quantize_row(KV_LOW_BITS, w->v + (size_t)r * hd, hd, c->low_group, vrow,
                                  (uint16_t *)(void *)(vrow + c->low_codes));
    }
    w->n = 0;
}

/* The next row's slot: its f32 key and value to fill (or, for a row
 * already demoted, its key to fill when keys are per channel). */
static int low_next(struct low_writer *w) {
    if (w->n == KV_PAGE_TOKENS) low_flush(w);
    w->k_row[w->n] = w->v_row[w->n] = NULL;
    return w->n++;
}

/* Row i of an old store's 2-bit tier, demoted already. */
static void low_push_demoted(struct low_writer *w, const struct kv_compact *old, int i, float *chunk_view,
                             int *view_chunk) {
    const int r = low_next(w), hd = w->hd;
    uint8_t *at = low_chunk(old, w->layer, w->kvh, i / KV_PAGE_TOKENS);
    if (old->low_key_bits == KV_LOW_BITS) {
        if (*view_chunk != i / KV_PAGE_TOKENS) {   /* the chunk's keys, once */
            const int rows = old->n_low - (i / KV_PAGE_TOKENS) * KV_PAGE_TOKENS;
            w->be->kv_rows_qc(chunk_view, at, old->low_codes, low_key_dm(old, at),
                              rows < KV_PAGE_TOKENS ? rows : KV_PAGE_TOKENS, hd, KV_LOW_BITS, old->low_group);
            *view_chunk = i / KV_PAGE_TOKENS;
        }
        memcpy(w->k + (size_t)r * hd, chunk_view + (size_t)(i % KV_PAGE_TOKENS) * hd, (size_t)hd * sizeof(float));
    } else {
        w->k_row[r] = at + (size_t)(i % KV_PAGE_TOKENS) * old->low_k_row;
    }
    w->v_row[r] = low_values(old, at) + (size_t)(i % KV_PAGE_TOKENS) * old->low_v_row;
}

static void store_free(struct kv_compact *c) {
    if (!c) return;
    free(c->keep);
    free(c->low);
    free(c);
}

static void compact_free(struct kv_cache *kv) {
    struct kv_compact *c = kv->compact;
    if (!c) return;
    charge(kv, -(long long)c->bytes);
    store_free(c);
    kv->compact = NULL;
    kv->compact_boundary = 0;
    kv->compact_saved = 0;
    kv->n_reserved = 0;   /* the next kv_cache_reserve counts the pages again */
}

int kv_cache_compact_limit(const struct kv_cache *kv) { return kv_cache_compact_limit_at(kv, kv->n_past); }

int kv_cache_compact_limit_at(const struct kv_cache *kv, int n) {
    const int pages = (n < kv->n_past ? n : kv->n_past) / KV_PAGE_TOKENS - 1;
    return pages > 0 ? pages * KV_PAGE_TOKENS : 0;
}

int kv_cache_compact_rows(const struct kv_cache *kv, int boundary) {
    const struct kv_compact *c = kv->compact;
    return (c ? c->n_keep + c->n_low : 0) + boundary - kv->compact_boundary;
}

/* The tiers' counts, the same for every (layer, head), or -1: the sinks
 * kept, and the rows from `low_from` to `low_to` (a store's demoted rows)
 * not kept. */
static int tier_counts(const struct kv_layout *l, int rows, const uint8_t *tiers, int low_from, int low_to,
                       int *n_keep, int *n_low) {
    const int heads = l->n_layer * (l->kv_dim / l->head_dim);
    for (int h = 0; h < heads; h++) {
        const uint8_t *t = tiers + (size_t)h * rows;
        int keep = 0, low = 0;
        for (int r = 0; r < rows; r++) {
            if (t[r] > KV_TIER_KEEP || (r < KV_SINK_TOKENS && t[r] != KV_TIER_KEEP) ||
                (r >= low_from && r < low_to && t[r] == KV_TIER_KEEP))
                return -1;
            keep += t[r] == KV_TIER_KEEP;
            low += t[r] == KV_TIER_LOW;
        }
        if (h == 0) {
            *n_keep = keep;
            *n_low = low;
        } else if (keep != *n_keep || low != *n_low) {
            return -1;
        }
    }
    return 0;
}

/* Fills the new store c of one (layer, KV head) from the rows tiers t
 * says stay: the old store's (kept rows, then demoted ones) and the
 * positions [from, boundary) in pages. kbuf holds a kept row; view a chunk
 * of f32 keys. */
static void compact_head(const struct kv_cache *kv, const struct ebb_backend *be, struct kv_compact *c,
                         const struct kv_compact *old, int layer, int kvh, int from, int boundary, const uint8_t *t,
                         struct low_writer *w, uint8_t *kbuf, float *view) {
    const struct kv_layout *l = &kv->layout;
    const int hd = l->head_dim, old_keep = old ? old->n_keep : 0, old_low = old ? old->n_low : 0;
    const int rows = old_keep + old_low + boundary - from;
    uint8_t *kept_k = keep_rows(c, layer, 0, kvh), *kept_v = keep_rows(c, layer, 1, kvh);
    int view_chunk = -1;
    w->layer = layer;
    w->kvh = kvh;
    w->chunk = 0;
    w->n = 0;
    for (int r = 0; r < rows; r++) {
        if (t[r] == KV_TIER_DROP) continue;
        if (r >= old_keep && r < old_keep + old_low) {   /* demoted already: stays so */
            low_push_demoted(w, old, r - old_keep, view, &view_chunk);
            continue;
        }
        /* A kept row of the old store, or a position's row in its page. */
        const uint8_t *src_k = r < old_keep ? keep_rows(old, layer, 0, kvh) + (size_t)r * c->keep_row : NULL;
        const uint8_t *src_v = r < old_keep ? keep_rows(old, layer, 1, kvh) + (size_t)r * c->keep_row : NULL;
        const int pos = from + r - old_keep - old_low;
        if (t[r] == KV_TIER_KEEP) {
            if (src_k) {
                memcpy(kept_k, src_k, c->keep_row);
                memcpy(kept_v, src_v, c->keep_row);
            } else {
                copy_head_row(kv, layer, 0, kvh, pos, kept_k);
                copy_head_row(kv, layer, 1, kvh, pos, kept_v);
            }
            kept_k += c->keep_row;
            kept_v += c->keep_row;
            continue;
        }
        const int slot = low_next(w);
        if (!src_k) {
            copy_head_row(kv, layer, 0, kvh, pos, kbuf);
            kept_row_f32(l, be, c, kbuf, w->k + (size_t)slot * hd);
            copy_head_row(kv, layer, 1, kvh, pos, kbuf);
            kept_row_f32(l, be, c, kbuf, w->v + (size_t)slot * hd);
        } else {
            kept_row_f32(l, be, c, src_k, w->k + (size_t)slot * hd);
            kept_row_f32(l, be, c, src_v, w->v + (size_t)slot * hd);
        }
    }
    low_flush(w);
}

int kv_cache_compact(struct kv_cache *kv, const struct ebb_backend *be, int boundary, const uint8_t *tiers,
                     int low_key_bits) {
    const struct kv_layout *l = &kv->layout;
    struct kv_compact *old = kv->compact;
    const int from = kv->compact_boundary, rows = kv_cache_compact_rows(kv, boundary);
    const int old_keep = old ? old->n_keep : 0, old_low = old ? old->n_low : 0;
    int n_keep = 0, n_low = 0;
    if (kv->be->memory || boundary < from || (!old && boundary <= 0) || boundary % KV_PAGE_TOKENS ||
        boundary > kv_cache_compact_limit(kv) || (low_key_bits != KV_LOW_BITS && low_key_bits != 4) ||
        (old && old->low_key_bits != low_key_bits) ||
        tier_counts(l, rows, tiers, old_keep, old_keep + old_low, &n_keep, &n_low))
        return -1;
    struct kv_compact *c = calloc(1, sizeof *c);
    if (!c) return -1;
    compact_shape(c, l, n_keep, n_low, low_key_bits);
    /* The store replaces every page before the boundary; what it saves of
     * them leaves the reservation (a store that saves less than the one
     * it replaces -- a new chunk of the 2-bit tier begun for a few rows --
     * reserves the difference first, or nothing changes). */
    const size_t whole = (size_t)(boundary / KV_PAGE_TOKENS) * l->page_bytes;
    const size_t saved = whole > c->bytes ? whole - c->bytes : 0;
    const size_t more = saved < kv->compact_saved ? kv->compact_saved - saved : 0;
    const int hd = l->head_dim;
    const size_t heads = (size_t)l->n_layer * (size_t)c->n_head_kv;
    struct low_writer w = {.c = c, .be = be, .hd = hd};
    c->keep = malloc(heads * 2 * (size_t)n_keep * c->keep_row + 1);
    c->low = malloc(heads * (size_t)pages_for(n_low) * c->low_chunk + 1);
    w.k = malloc(3 * KV_PAGE_TOKENS * (size_t)hd * sizeof(float));
    uint8_t *kbuf = malloc(c->keep_row);
    if (!c->keep || !c->low || !w.k || !kbuf || (more && kv->account && !account_reserve(kv->account, more))) {
        store_free(c);
        free(w.k);
        free(kbuf);
        return -1;
    }
    w.v = w.k + KV_PAGE_TOKENS * hd;
    for (int layer = 0; layer < l->n_layer; layer++)
        for (int kvh = 0; kvh < c->n_head_kv; kvh++)
            compact_head(kv, be, c, old, layer, kvh, from, boundary,
                         tiers + ((size_t)layer * c->n_head_kv + (size_t)kvh) * rows, &w, kbuf,
                         w.v + KV_PAGE_TOKENS * hd);
    free(w.k);
    free(kbuf);
    /* The pages go, and the old store; the new one is charged in their place. */
    for (int p = from / KV_PAGE_TOKENS; p < boundary / KV_PAGE_TOKENS; p++) {
        ebb_release(kv->be, kv->pages[p]);
        kv->pages[p] = NULL;
    }
    const size_t freed = (size_t)(boundary - from) / KV_PAGE_TOKENS * l->page_bytes + (old ? old->bytes : 0);
    charge(kv, (long long)c->bytes - (long long)freed);
    store_free(old);
    if (kv->account) {
        if (more) {
            kv->reserved_bytes += more;
        } else {
            const size_t less = saved - kv->compact_saved;
            const size_t give = less < kv->reserved_bytes ? less : kv->reserved_bytes;
            kv->reserved_bytes -= give;
            account_add(kv->account, &kv->account->reserved_bytes, -(long long)give);
        }
    }
    kv->compact = c;
    kv->compact_boundary = boundary;
    kv->compact_saved = saved;
    kv_cache_forget_observation(kv);
    return 0;
}

size_t kv_cache_body_bytes(const struct kv_cache *kv) {
    size_t pages = 0;
    for (int p = 0; p < kv->n_pages && p * KV_PAGE_TOKENS < kv->n_past; p++) pages += kv->pages[p] != NULL;
    return pages * kv->layout.page_bytes + (kv->compact ? kv->compact->bytes : 0);
}

struct kv_compact_info kv_cache_compact_info(const struct kv_cache *kv) {
    const struct kv_compact *c = kv->compact;
    if (!c) return (struct kv_compact_info){0, 0, 0, 0};
    return (struct kv_compact_info){kv->compact_boundary, c->n_keep, c->n_low, c->bytes};
}

/* ------------------------------------------------------- observation */

size_t kv_observation_bytes(int n_layer, int n, int q_dim, size_t n_scores) {
    return ((size_t)n_layer * (size_t)n * (size_t)q_dim + n_scores) * sizeof(float);
}

enum kv_status kv_cache_observe(struct kv_cache *kv, int from, int n, int q_dim, size_t n_scores) {
    kv_cache_forget_observation(kv);
    if (kv->be->memory || from < 0 || n <= 0 || q_dim <= 0) return KV_FAILED;
    const size_t bytes = kv_observation_bytes(kv->layout.n_layer, n, q_dim, n_scores);
    if (kv->account && !account_reserve(kv->account, bytes)) return KV_OVER_BUDGET;
    struct kv_observation *o = calloc(1, sizeof *o);
    if (o) o->q = calloc(1, bytes);
    if (!o || !o->q) {
        free(o);
        if (kv->account) account_add(kv->account, &kv->account->reserved_bytes, -(long long)bytes);
        return KV_FAILED;
    }
    charge(kv, (long long)bytes);
    o->from = from;
    o->n = n;
    o->q_dim = q_dim;
    o->bytes = bytes;
    o->scores = n_scores ? o->q + (size_t)kv->layout.n_layer * n * q_dim : NULL;   /* one allocation */
    o->n_scores = n_scores;
    kv->obs = o;
    return KV_OK;
}

void kv_observe_query(struct kv_cache *kv, int layer, int pos, const float *q) {
    struct kv_observation *o = kv->obs;
    if (!o || pos < o->from || pos >= o->from + o->n) return;
    memcpy(o->q + ((size_t)layer * o->n + (size_t)(pos - o->from)) * o->q_dim, q, (size_t)o->q_dim * sizeof(float));
}

void kv_cache_forget_observation(struct kv_cache *kv) {
    if (!kv->obs) return;
    if (kv->account) {
        charge(kv, -(long long)kv->obs->bytes);
        account_add(kv->account, &kv->account->reserved_bytes, -(long long)kv->obs->bytes);
    }
    free(kv->obs->q);
    free(kv->obs);
    kv->obs = NULL;
}

/* ------------------------------------------------------------ attention */

int kv_block_queries(const struct model_config *cfg) {
    const int group = cfg->n_head / cfg->n_head_kv;
    return group > KV_BLOCK_QUERIES ? group : KV_BLOCK_QUERIES;
}

int kv_block_tokens(const struct model_config *cfg) {
    const int t = KV_BLOCK_QUERIES / (cfg->n_head / cfg->n_head_kv);
    return t > 0 ? t : 1;
}

/* Per query: its scaled copy, the copy rotated, the two sums of values; then
 * a key and a value page view; then the scores, n_ctx per query. */
size_t kv_attend_scratch(const struct model_config *cfg, int n_ctx) {
    const size_t hd = (size_t)cfg->head_dim, nq = (size_t)kv_block_queries(cfg);
    return nq * (4 * hd + (size_t)n_ctx) + 2 * KV_PAGE_TOKENS * hd;
}

/* Whether a query at position pos reads page `page` from the body (as
 * opposed to f32 rows in place: the window at 8 and 4 bits, the body
 * itself at 32). f16 rows are always converted; at 8 and 4 bits the page
 * before the query's own page and that page are read from the window. */
static int reads_body(const struct kv_layout *l, int page, int pos) {
    if (l->bits == 32) return 0;
    if (l->bits == 16) return 1;
    return page < pos / KV_PAGE_TOKENS - 1;
}

/* f32 rows of a page read in place: the start of its first row for KV head
 * kvh, and the distance between rows in floats. */
static const float *page_in_place(const struct kv_cache *kv, int layer, int kind, int kvh, int page, size_t *stride) {
    const struct kv_layout *l = &kv->layout;
    const int pos = page * KV_PAGE_TOKENS;
    if (l->bits == 32) {
        *stride = l->row_bytes / sizeof(float);
        return (const float *)(const void *)body_row(kv, layer, kind, pos) + (size_t)kvh * l->head_dim;
    }
    *stride = (size_t)l->kv_dim;
    return window_row(kv, layer, kind, pos) + (size_t)kvh * l->head_dim;
}

/* The first n_rows body rows of a page for KV head kvh, converted to f32
 * in view[n_rows][head_dim] (rotated when the layout rotates); at 8 and 4
 * bits page 0 starts with the f32 sink positions, rotated to match. */
static const float *page_view(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kind, int kvh,
                              int page, int n_rows, float *view) {
    const struct kv_layout *l = &kv->layout;
    const int hd = l->head_dim;
    uint8_t *row = body_row(kv, layer, kind, page * KV_PAGE_TOKENS);
    if (l->bits == 16) {
        be->kv_rows_f16(view, (const uint16_t *)(const void *)row + (size_t)kvh * hd, l->row_bytes, n_rows, hd);
        return view;
    }
    const uint8_t *codes = row + (size_t)kvh * hd * l->bits / 8;
    const uint16_t *dm = row_dm(l, row) + (size_t)kvh * (hd / l->group) * 2;
    be->kv_rows_q(view, codes, dm, l->row_bytes, n_rows, hd, l->bits, l->group);
    for (int i = 0; page == 0 && i < KV_SINK_TOKENS && i < n_rows; i++) {
        ebb_copy(be, view + (size_t)i * hd, sink_row(kv, layer, kind, i) + (size_t)kvh * hd, (size_t)hd * sizeof(float));
        if (l->rotate) rotate64(be, view + (size_t)i * hd, hd);
    }
    return view;
}

static int window_held(const struct kv_cache *kv, int page) {
    return page >= kv->window_lo && page <= kv->window_hi && kv->window[page];
}

/* Queries of a block are in position order (query j at pos0 + j / n_head),
 * so on every page those that read it from the body come last: the index
 * of the first, or nq if none does. */
static int first_body_query(const struct kv_layout *l, int page, int pos0, int n_head, int nq) {
    int j = 0;
    while (j < nq && !reads_body(l, page, pos0 + j / n_head)) j++;
    return j;
}

/* A compact store's rows as attention reads them, a segment of up to
 * KV_PAGE_TOKENS at a time: the kept rows' segments, then the 2-bit tier's
 * chunks. Every query of a block reads every segment whole. */
struct segment {
    const float *rows;
    size_t stride;      /* floats between rows */
    int n, slot;        /* rows, and the first one's score slot */
    int rotated;        /* in the H64 basis */
};

static int segment_count(const struct kv_compact *c) {
    return c ? pages_for(c->n_keep) + pages_for(c->n_low) : 0;
}

static struct segment compact_segment(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kind,
                                      int kvh, int seg, float *view) {
    const struct kv_layout *l = &kv->layout;
    const struct kv_compact *c = kv->compact;
    const int hd = l->head_dim, keep_segs = pages_for(c->n_keep);
    struct segment s = {view, (size_t)hd, 0, 0, 0};
    if (seg >= keep_segs) {
        const int chunk = seg - keep_segs;
        uint8_t *at = low_chunk(c, layer, kvh, chunk);
        s.slot = c->n_keep + chunk * KV_PAGE_TOKENS;
        s.n = c->n_low - chunk * KV_PAGE_TOKENS < KV_PAGE_TOKENS ? c->n_low - chunk * KV_PAGE_TOKENS : KV_PAGE_TOKENS;
        s.rotated = c->low_rotate;
        if (kind == 0) {
            if (c->low_key_bits == KV_LOW_BITS)
                be->kv_rows_qc(view, at, c->low_codes, low_key_dm(c, at), s.n, hd, KV_LOW_BITS, c->low_group);
            else
                be->kv_rows_q(view, at, (const uint16_t *)(const void *)(at + hd / 2), c->low_k_row, s.n, hd, 4,
                              c->low_group);
        } else {
            const uint8_t *v = low_values(c, at);
            be->kv_rows_q(view, v, (const uint16_t *)(const void *)(v + c->low_codes), c->low_v_row, s.n, hd,
                          KV_LOW_BITS, c->low_group);
        }
        return s;
    }
    const uint8_t *rows = keep_rows(c, layer, kind, kvh) + (size_t)seg * KV_PAGE_TOKENS * c->keep_row;
    s.slot = seg * KV_PAGE_TOKENS;
    s.n = c->n_keep - s.slot < KV_PAGE_TOKENS ? c->n_keep - s.slot : KV_PAGE_TOKENS;
    s.rotated = l->rotate;
    if (l->bits == 32) {
        s.rows = (const float *)(const void *)rows;
        s.stride = c->keep_row / sizeof(float);
    } else if (l->bits == 16) {
        be->kv_rows_f16(view, (const uint16_t *)(const void *)rows, c->keep_row, s.n, hd);
    } else {
        const size_t codes = (size_t)hd * l->bits / 8;
        be->kv_rows_q(view, rows, (const uint16_t *)(const void *)(rows + codes), c->keep_row, s.n, hd, l->bits,
                      l->group);
        /* The sinks, kept first, are read from their f32 copies. */
        for (int i = 0; seg == 0 && i < KV_SINK_TOKENS && i < s.n; i++) {
            ebb_copy(be, view + (size_t)i * hd, sink_row(kv, layer, kind, i) + (size_t)kvh * hd,
                     (size_t)hd * sizeof(float));
            if (l->rotate) rotate64(be, view + (size_t)i * hd, hd);
        }
    }
    return s;
}

/* A block's scratch: per query its scaled copy, the copy rotated, the two
 * sums of values; a key and a value view; then the scores. */
struct block {
    int hd, nq, last, n_head, pos0;
    int first_page;     /* the first page read (a compact store replaces those before) */
    int off;            /* position p >= the boundary has score slot p - off */
    size_t S;           /* score slots per query */
    float *qs, *qr, *acc, *accr, *kview, *vview, *s;
};

/* Whether the page from position r0 holds a position `only` reads. */
static int page_read(const struct kv_reading *only, int r0) {
    const int r1 = r0 + KV_PAGE_TOKENS;
    return r0 < KV_SINK_TOKENS || (r0 < only->to && r1 > only->from) || r1 > only->tail;
}

/* Positions of the page from r0 that a query at `last` sees. */
static int page_rows_upto(int r0, int last) {
    return last + 1 - r0 < KV_PAGE_TOKENS ? last + 1 - r0 : KV_PAGE_TOKENS;
}

/* One query's scores, s[position], of which those on the pages `only`
 * reads (up to the query's own position, last) are softmaxed among
 * themselves in place: gathered to the row's start (never ahead of where
 * they are), softmaxed, put back from the last page down (each goes no
 * lower than where it was gathered, over nothing still to move). */
static void softmax_read_pages(const struct ebb_backend *be, float *s, int last, const struct kv_reading *only) {
    int n = 0;
    for (int r0 = 0; r0 <= last; r0 += KV_PAGE_TOKENS)
        if (page_read(only, r0)) {
            const int rows = page_rows_upto(r0, last);
            memmove(s + n, s + r0, (size_t)rows * sizeof(float));
            n += rows;
        }
    be->softmax_f32(s, n);
    for (int r0 = last / KV_PAGE_TOKENS * KV_PAGE_TOKENS; r0 >= 0; r0 -= KV_PAGE_TOKENS)
        if (page_read(only, r0)) {
            const int rows = page_rows_upto(r0, last);
            n -= rows;
            memmove(s + r0, s + n, (size_t)rows * sizeof(float));
        }
}

/* The scores of a block's queries, softmaxed (with `only`, the pages it
 * reads scored and nothing softmaxed: the caller does that over them,
 * softmax_read_pages): the part of attention that kv_attend_weights
 * shares. */
static void block_scores(struct block *b, const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh,
                         const float *q, size_t stride, int n_tok, int n_head, int pos0, float scale,
                         const struct kv_reading *only, float *scratch) {
    const struct kv_layout *l = &kv->layout;
    const struct kv_compact *c = kv->compact;
    const int hd = l->head_dim, nq = n_tok * n_head, last = pos0 + n_tok - 1;
    assert(n_tok >= 1 && n_head >= 1 && pos0 >= kv->compact_boundary && last / KV_PAGE_TOKENS < kv->n_pages);
    b->hd = hd;
    b->nq = nq;
    b->last = last;
    b->n_head = n_head;
    b->pos0 = pos0;
    b->first_page = kv->compact_boundary / KV_PAGE_TOKENS;
    b->off = c ? kv->compact_boundary - (c->n_keep + c->n_low) : 0;
    b->S = (size_t)(last + 1 - b->off);
    b->qs = scratch;
    b->qr = b->qs + (size_t)nq * hd;
    b->acc = b->qr + (size_t)nq * hd;
    b->accr = b->acc + (size_t)nq * hd;
    b->kview = b->accr + (size_t)nq * hd;
    b->vview = b->kview + (size_t)KV_PAGE_TOKENS * hd;
    b->s = b->vview + (size_t)KV_PAGE_TOKENS * hd;
    const int rotate = l->rotate || (c && c->low_rotate);
#define POS(j) (pos0 + (j) / n_head)

    for (int j = 0; j < nq; j++) {
        const float *src = q + (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
        be->scale_f32(b->qs + (size_t)j * hd, src, scale, hd);
        if (rotate) {
            ebb_copy(be, b->qr + (size_t)j * hd, b->qs + (size_t)j * hd, (size_t)hd * sizeof(float));
            rotate64(be, b->qr + (size_t)j * hd, hd);
        }
    }
    const size_t S = b->S;
    for (int g = 0; g < segment_count(c); g++) {
        const struct segment sg = compact_segment(kv, be, layer, 0, kvh, g, b->kview);
        be->attn_scores(b->s + sg.slot, S, sg.rotated ? b->qr : b->qs, (size_t)hd, nq, sg.rows, sg.stride, sg.n, hd);
    }
    /* Scores, a page at a time: queries [0, split) read the page in place,
     * [split, nq) from its converted body. */
    const int last_page = last / KV_PAGE_TOKENS;
    for (int page = b->first_page; page <= last_page; page++) {
        const int r0 = page * KV_PAGE_TOKENS, rows = page_rows_upto(r0, last);
        if (only && !page_read(only, r0)) continue;   /* not read, not written */
        int split = first_body_query(l, page, pos0, n_head, nq);
        /* Scoring reads earlier queries than the last pass: a window page
         * already given back is read from the body (attention never lacks
         * one). */
        if (split > 0 && kv->window && !window_held(kv, page)) split = 0;
        float *s = b->s + (r0 - b->off);
        if (split > 0) {
            size_t ks;
            const float *k = page_in_place(kv, layer, 0, kvh, page, &ks);
            be->attn_scores(s, S, b->qs, (size_t)hd, split, k, ks, rows, hd);
        }
        if (split < nq) {
            const float *k = page_view(kv, be, layer, 0, kvh, page, rows, b->kview);
            be->attn_scores(s + (size_t)split * S, S, (l->rotate ? b->qr : b->qs) + (size_t)split * hd, (size_t)hd,
                            nq - split, k, (size_t)hd, rows, hd);
        }
    }
    if (!only)   /* kv_attend_weights softmaxes what `only` read */
        for (int j = 0; j < nq; j++) be->softmax_f32(b->s + (size_t)j * S, POS(j) + 1 - b->off);
#undef POS
}

void kv_attend_block(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
                     float *out, size_t stride, int n_tok, int n_head, int pos0, float scale, float *scratch) {
    const struct kv_layout *l = &kv->layout;
    const struct kv_reading *only = kv->reading;
    assert(!only || !kv->compact);
    if (be->attend && kv->table && !kv->compact && !only) {   /* the same arithmetic in one call (backend.h) */
        const int n = pages_for(kv->n_ctx);
        const struct ebb_kv_pages view = {
            .bits = l->bits, .group = l->group, .rotate = l->rotate, .kv_dim = l->kv_dim, .head_dim = l->head_dim,
            .n_pages = n, .row_bytes = l->row_bytes, .code_bytes = l->code_bytes,
            .body = (const uint8_t *const *)kv->table,
            .window = kv->window ? (const float *const *)(kv->table + n) : NULL, .sink = kv->sink};
        be->attend(&view, layer, kvh, q, out, stride, n_tok, n_head, pos0, scale, scratch);
        return;
    }
    const struct kv_compact *c = kv->compact;
    struct block b;
    block_scores(&b, kv, be, layer, kvh, q, stride, n_tok, n_head, pos0, scale, only, scratch);
    const int hd = b.hd, nq = b.nq, last = b.last;
    const size_t S = b.S;
#define POS(j) (pos0 + (j) / n_head)
    if (only)
        for (int j = 0; j < nq; j++) softmax_read_pages(be, b.s + (size_t)j * S, POS(j), only);
    ebb_zero(be, b.acc, (size_t)nq * hd * sizeof(float));
    ebb_zero(be, b.accr, (size_t)nq * hd * sizeof(float));
    int compact_rotated = 0;
    for (int g = 0; g < segment_count(c); g++) {
        const struct segment sg = compact_segment(kv, be, layer, 1, kvh, g, b.vview);
        compact_rotated |= sg.rotated;
        for (int j = 0; j < nq; j++)
            be->attn_values((sg.rotated ? b.accr : b.acc) + (size_t)j * hd, b.s + (size_t)j * S + sg.slot, sg.rows,
                            sg.stride, sg.n, hd);
    }
    const int last_page = last / KV_PAGE_TOKENS;
    for (int page = b.first_page; page <= last_page; page++) {
        const int r0 = page * KV_PAGE_TOKENS, rows = page_rows_upto(r0, last);
        if (only && !page_read(only, r0)) continue;   /* weighed nothing */
        const int split = first_body_query(l, page, pos0, n_head, nq);
        size_t vs = 0;
        const float *direct = split > 0 ? page_in_place(kv, layer, 1, kvh, page, &vs) : NULL;
        const float *view = split < nq ? page_view(kv, be, layer, 1, kvh, page, rows, b.vview) : NULL;
        for (int j = 0; j < nq; j++) {
            const int n = POS(j) + 1 - r0 < rows ? POS(j) + 1 - r0 : rows;
            if (n <= 0) continue;
            const float *p = b.s + (size_t)j * S + (r0 - b.off);
            if (j < split) be->attn_values(b.acc + (size_t)j * hd, p, direct, vs, n, hd);
            else be->attn_values((l->rotate ? b.accr : b.acc) + (size_t)j * hd, p, view, (size_t)hd, n, hd);
        }
    }
    /* Values read rotated were summed in the rotated basis: rotate the sum
     * back once (H64 is its own inverse) and add the rest (a + ar: the
     * same float as ar + a). */
    for (int j = 0; j < nq; j++) {
        float *o = out + (size_t)(j / n_head) * stride + (size_t)(j % n_head) * hd;
        ebb_copy(be, o, b.acc + (size_t)j * hd, (size_t)hd * sizeof(float));
        if (compact_rotated || (l->rotate && reads_body(l, b.first_page, POS(j)))) {
            float *ar = b.accr + (size_t)j * hd;
            rotate64(be, ar, hd);
            be->add_f32(o, ar, hd);
        }
    }
#undef POS
}

void kv_attend_weights(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
                       size_t stride, int n_tok, int n_head, int pos0, float scale, const struct kv_reading *only,
                       float *scratch, float *w, size_t w_stride) {
    assert(!kv->be->memory);   /* compression's: host caches only */
    assert(!only || !kv->compact);
    struct block b;
    block_scores(&b, kv, be, layer, kvh, q, stride, n_tok, n_head, pos0, scale, only, scratch);
    if (!only) {
        for (int j = 0; j < b.nq; j++)
            memcpy(w + (size_t)j * w_stride, b.s + (size_t)j * b.S,
                   (size_t)(pos0 + j / n_head + 1 - b.off) * sizeof(float));
        return;
    }
    for (int j = 0; j < b.nq; j++) {
        const int last = pos0 + j / n_head;
        float *s = b.s + (size_t)j * b.S, *row = w + (size_t)j * w_stride;
        softmax_read_pages(be, s, last, only);
        for (int r0 = 0; r0 <= last; r0 += KV_PAGE_TOKENS)
            if (page_read(only, r0)) {
                const int rows = page_rows_upto(r0, last);
                memcpy(row + r0, s + r0, (size_t)rows * sizeof(float));
            }
    }
}

void kv_attend(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
               int n_pos, float scale, float *scratch, float *out) {
    kv_attend_block(kv, be, layer, kvh, q, out, 0, 1, 1, n_pos - 1, scale, scratch);
}
