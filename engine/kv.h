/* KV cache: per-sequence keys and values in fixed-size pages, charged to a
 * shared memory account.
 *
 * A sequence's cache is a list of pages, each holding KV_PAGE_TOKENS positions
 * of every layer's keys and values. Pages are allocated as the sequence grows,
 * never moved, and returned when the sequence ends, so memory follows the
 * tokens actually held rather than the longest context allowed.
 *
 * Admission control works by reservation: a sequence reserves, up front, the
 * pages its prompt plus max_tokens can need; the account refuses a
 * reservation that would exceed its budget, and the scheduler keeps that
 * request waiting instead of failing a running one later. Growth inside a
 * reservation therefore never fails for lack of budget (only for lack of
 * system memory).
 */
#ifndef EBB_ENGINE_KV_H
#define EBB_ENGINE_KV_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define KV_PAGE_TOKENS 64

struct model_config;
struct ebb_backend;

/* Shared by every sequence of a model; thread-safe (the HTTP side reads it
 * for metrics and admin while the engine charges it). */
struct kv_account {
    pthread_mutex_t lock;
    size_t budget_bytes;      /* 0: unlimited */
    size_t reserved_bytes;    /* promised to admitted sequences */
    size_t allocated_bytes;   /* pages actually held */
    size_t page_bytes;
};

void kv_account_init(struct kv_account *a, const struct model_config *cfg, size_t budget_bytes);
void kv_account_destroy(struct kv_account *a);
void kv_account_set_budget(struct kv_account *a, size_t budget_bytes);
/* Bytes a sequence of n_ctx positions reserves (whole pages). */
size_t kv_account_bytes_for(const struct kv_account *a, int n_ctx);

struct kv_cache {
    int n_ctx;                /* positions reserved */
    int n_past;               /* positions filled */
    int n_pages;              /* pages allocated */
    int n_layer, kv_dim, head_dim;
    float **pages;            /* [ceil(n_ctx / KV_PAGE_TOKENS)] */
    struct kv_account *account; /* may be NULL: unaccounted (CLI tools) */
    size_t reserved_bytes;
};

/* Reserves room for n_ctx positions. Returns 0, -1 when out of memory, or
 * -2 when the account's budget cannot take the reservation now. */
int kv_cache_init(struct kv_cache *kv, const struct model_config *cfg, int n_ctx,
                  struct kv_account *account);
void kv_cache_free(struct kv_cache *kv);
/* Drops every position (keeps pages for reuse). */
void kv_cache_clear(struct kv_cache *kv);
/* Makes sure positions [0, n) have pages; -1 if n > n_ctx or out of memory. */
int kv_cache_ensure(struct kv_cache *kv, int n);

/* Writes one token's keys and values (kv_dim floats each) for a layer at
 * position pos (its page must exist: kv_cache_ensure). */
void kv_store(struct kv_cache *kv, const struct ebb_backend *be, int layer, int pos, const float *k,
              const float *v);

/* Attention of one query head q[head_dim] over positions [0, n_pos) of KV
 * head kvh in a layer: softmax(q.k * scale) weighted sum of v into
 * out[head_dim]. scratch holds kv_attend_scratch() floats, private to the
 * caller's thread. Positions are visited in order, so the result does not
 * depend on the rest of the batch. */
void kv_attend(const struct kv_cache *kv, const struct ebb_backend *be, int layer, int kvh, const float *q,
               int n_pos, float scale, float *scratch, float *out);
size_t kv_attend_scratch(const struct model_config *cfg, int n_ctx);

/* Row pointers for a layer and position of the f32 store (pages must exist). */
static inline float *kv_k(const struct kv_cache *kv, int layer, int pos) {
    return kv->pages[pos / KV_PAGE_TOKENS] +
           ((size_t)layer * KV_PAGE_TOKENS + (size_t)(pos % KV_PAGE_TOKENS)) * (size_t)kv->kv_dim;
}
static inline float *kv_v(const struct kv_cache *kv, int layer, int pos) {
    return kv_k(kv, layer, pos) + (size_t)kv->n_layer * KV_PAGE_TOKENS * (size_t)kv->kv_dim;
}
#endif
