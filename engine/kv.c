/* KV cache pages and the memory account; see kv.h. */
#include "engine/kv.h"

#include <stdlib.h>
#include <string.h>

#include "engine/model.h"
#include "kernels/backend.h"

static size_t page_bytes(const struct model_config *cfg) {
    return 2 * (size_t)cfg->n_layer * KV_PAGE_TOKENS * (size_t)(cfg->n_head_kv * cfg->head_dim) * sizeof(float);
}

void kv_account_init(struct kv_account *a, const struct model_config *cfg, size_t budget_bytes) {
    memset(a, 0, sizeof *a);
    pthread_mutex_init(&a->lock, NULL);
    a->budget_bytes = budget_bytes;
    a->page_bytes = page_bytes(cfg);
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
    return (size_t)((n_ctx + KV_PAGE_TOKENS - 1) / KV_PAGE_TOKENS) * a->page_bytes;
}

static void account_add(struct kv_account *a, size_t *field, long long delta) {
    if (!a) return;
    pthread_mutex_lock(&a->lock);
    *field = (size_t)((long long)*field + delta);
    pthread_mutex_unlock(&a->lock);
}

int kv_cache_init(struct kv_cache *kv, const struct model_config *cfg, int n_ctx,
                  struct kv_account *account) {
    memset(kv, 0, sizeof *kv);
    if (n_ctx <= 0) return -1;
    int max_pages = (n_ctx + KV_PAGE_TOKENS - 1) / KV_PAGE_TOKENS;
    if (account) {
        size_t want = (size_t)max_pages * account->page_bytes;
        pthread_mutex_lock(&account->lock);
        int ok = !account->budget_bytes || account->reserved_bytes + want <= account->budget_bytes;
        if (ok) account->reserved_bytes += want;
        pthread_mutex_unlock(&account->lock);
        if (!ok) return -2;
        kv->reserved_bytes = want;
    }
    kv->account = account;
    kv->pages = calloc((size_t)max_pages, sizeof *kv->pages);
    if (!kv->pages) {
        kv_cache_free(kv);
        return -1;
    }
    kv->n_ctx = n_ctx;
    kv->n_layer = cfg->n_layer;
    kv->kv_dim = cfg->n_head_kv * cfg->head_dim;
    kv->head_dim = cfg->head_dim;
    return 0;
}

void kv_cache_free(struct kv_cache *kv) {
    if (!kv) return;
    for (int p = 0; p < kv->n_pages; p++) free(kv->pages[p]);
    if (kv->account) {
        size_t page = kv->account->page_bytes;
        account_add(kv->account, &kv->account->allocated_bytes, -(long long)(page * (size_t)kv->n_pages));
        account_add(kv->account, &kv->account->reserved_bytes, -(long long)kv->reserved_bytes);
    }
    free(kv->pages);
    memset(kv, 0, sizeof *kv);
}

void kv_cache_clear(struct kv_cache *kv) {
    kv->n_past = 0;
}

int kv_cache_ensure(struct kv_cache *kv, int n) {
    if (n > kv->n_ctx) return -1;
    int need = (n + KV_PAGE_TOKENS - 1) / KV_PAGE_TOKENS;
    size_t bytes = 2 * (size_t)kv->n_layer * KV_PAGE_TOKENS * (size_t)kv->kv_dim * sizeof(float);
    while (kv->n_pages < need) {
        float *page = malloc(bytes);
        if (!page) return -1;
        kv->pages[kv->n_pages++] = page;
        if (kv->account) account_add(kv->account, &kv->account->allocated_bytes, (long long)bytes);
    }
    return 0;
}

void kv_store(struct kv_cache *kv, const struct ebb_backend *be, int layer, int pos, const float *k,
              const float *v) {
    (void)be;
    memcpy(kv_k(kv, layer, pos), k, (size_t)kv->kv_dim * sizeof(float));
    memcpy(kv_v(kv, layer, pos), v, (size_t)kv->kv_dim * sizeof(float));
}

size_t kv_attend_scratch(const struct model_config *cfg, int n_ctx) {
    (void)cfg;
    return (size_t)n_ctx;
}

void kv_attend(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
               int n_pos, float scale, float *scratch, float *out) {
    const int hd = kv->head_dim;
    float *scores = scratch;
    for (int i = 0; i < n_pos; i++) scores[i] = be->dot_f32(q, kv_k(kv, layer, i) + kvh * hd, hd) * scale;
    be->softmax_f32(scores, n_pos);
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int i = 0; i < n_pos; i++) be->axpy_f32(out, scores[i], kv_v(kv, layer, i) + kvh * hd, hd);
}
