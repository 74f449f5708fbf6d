/* Continuous-batching scheduler; see scheduler.h for the step it runs.
 *
 * Ownership: a request (struct sreq) belongs to the waiting queue (guarded by
 * s->lock) until admitted, then to the engine thread alone (the running
 * array). The only field other threads touch after submit is `stop`, an
 * atomic enum sreq_stop. Callbacks are never invoked with the lock held, so a callback
 * may call sched_cancel or sched_get_stats.
 */
#include "engine/scheduler.h"

#include <assert.h>
#include <pthread.h>
#include <stdatomic.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/bitstack.h"
#include "engine/governor.h"
#include "engine/kv.h"
#include "engine/model.h"

/* Why a request must stop at the engine's next look: the client went away
 * (or the server is stopping), or its forward pass failed. */
enum sreq_stop { SREQ_GOING = 0, SREQ_CANCELLED = 1, SREQ_FAILED = 2 };

struct sreq {
    uint64_t id;
    struct sreq *next;              /* waiting queue link */
    int32_t *prompt;
    int n_prompt;
    int n_replay;                   /* positions of gen.history to compute before decoding */
    int n_prefilled;                /* of those, computed so far */
    int prompt_reported;            /* prompt_logprobs: prompt tokens reported (not again after a preemption) */
    float *prompt_rows;             /* prompt_logprobs: a chunk's logits, [PROMPT_LOGPROB_CHUNK][n_vocab] */
    struct gen_params params;
    char **stops;                   /* owned copies behind params.stops */
    int32_t *stop_ids;              /* owned copy behind params.stop_ids */
    struct logit_bias *bias;        /* owned copy behind params.sampling.bias */
    struct sched_callbacks cb;
    void *ud;
    struct kv_cache kv;
    uint64_t kv_weights;            /* the weights (sched.weights_changes) its cache was begun with */
    struct gen_seq gen;
    float *logits;                  /* [n_vocab] */
    int32_t next_token;             /* sampled, to be fed at the next step */
    /* Speculative decoding: the step's pass (next_token, then the drafts),
     * where the logits of its rows go and the request's acceptance so far. */
    int32_t pass[DRAFT_MAX + 1];
    int n_drafted;                  /* drafts in this step's pass */
    int32_t unverified;             /* a draft's first token looked up but not verified, or -1 */
    float *pass_logits;             /* [1 + n_drafted][n_vocab] in the scheduler's verify_rows: this step's */
    struct draft_stats draft;
    atomic_int stop;                /* enum sreq_stop: set by any thread, read by the engine */
    struct sched_timing timing;
};

/* Prompt rows computed at once for a request that wants the prompt's
 * log-probabilities: 32 rows of logits (6 MB for a 49K vocabulary), held
 * while its prompt is computed; like the other logits buffers, outside the
 * KV budget. */
#define PROMPT_LOGPROB_CHUNK 32

/* A step's tokens for a model whose stack follows the budget. The stack
 * changes only between steps, so a step's length is how long a smaller
 * budget can wait to take effect; in-place sign products cost about the
 * same per token in a batch of 32 as of 256 (their work is per token), and
 * a 256-token prefill step of the default model's stack took ten seconds. */
#define ELASTIC_STEP_TOKENS 32

/* Swap durations kept for the daemon's histogram until it takes them. */
#define SWAP_RING 64

struct sched {
    struct model *m;                /* the engine thread changes only its BitStack prefix (fit_weights) */
    struct model_run *run;          /* the engine thread's */
    struct sched_config cfg;
    struct kv_account account;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    struct sreq *wait_head, *wait_tail;
    int n_waiting;
    struct sreq *cancelled_waiting; /* taken off the queue by sched_cancel, for the engine to finish */
    struct sreq **running;          /* engine thread's; read under lock by cancel */
    int n_running;
    uint64_t next_id;
    int stopping, drain;
    uint64_t steps, batch_tokens, preemptions;
    struct batch_seq *batch;        /* [max_running] */
    struct sreq **batch_req;
    /* The governor's part (engine/governor.h). memory_share, refit and the
     * numbers below are under lock; the engine thread alone fits the stack. */
    struct governor_model gm;       /* kv_held_bytes unused: read from the account */
    /* The configurations, best first: m, then its variants; the last is
     * the bottom (engine/governor.h). Each has its own run (config_run[0]
     * is run). */
    struct model *config_m[SCHED_MAX_VARIANTS + 1];
    struct model_run *config_run[SCHED_MAX_VARIANTS + 1];
    int n_configs;
    int config;                     /* the one computed with */
    int elastic;                    /* the bottom is a BitStack used in place: its prefix follows the share */
    uint64_t memory_share;          /* weights + KV this model may hold; 0: unlimited */
    int refit;                      /* the share changed since the stack was last fitted */
    size_t weight_bytes;            /* m->weight_bytes as last fitted */
    size_t stack_bytes;             /* m->stack->resident_bytes as last fitted */
    uint64_t stack_grows, stack_shrinks, stack_bytes_loaded, stack_bytes_freed;
    double swaps[SWAP_RING];
    int n_swaps;
    struct draft_costs costs;       /* engine thread's: step times by token count */
    /* The logits of every row a step verifies, shared by the requests that
     * draft in it: grown to the most rows a step has verified (at most its
     * tokens), so that memory follows the step, not the number of requests
     * speculating (a buffer of DRAFT_MAX + 1 rows each was 1.8 MB a request
     * on a 49K vocabulary). Like the run's scratch, outside the budget. */
    float *verify_rows;
    size_t verify_rows_cap;         /* rows */
    uint64_t drafts, draft_tokens, accepted_tokens, accepted_at[DRAFT_MAX];   /* under lock */
    struct sched_compress_stats compress[3];   /* under lock */
    /* The prompt cache (sched_config.prompt_cache_bytes): the engine
     * thread's list, most recently kept or used first; its bytes are the KV
     * account's kept_bytes (kv_cache_set_kept); the counts below it are
     * atomic for stats (admission changes them with the lock held, the rest
     * of the step without). */
    struct cached_prompt *cached;
    uint64_t weights_changes;       /* engine thread's: a cache computed across one is not kept */
    atomic_int n_cached;
    _Atomic uint64_t cache_hits, cache_tokens, cache_evictions;
};

/* A finished request's KV cache, kept with the tokens it holds. */
struct cached_prompt {
    struct cached_prompt *next;
    struct kv_cache kv;
    int32_t *tokens;                /* [kv.n_past] */
    struct compress_params compress;/* a compact cache: how it was compressed, and where (at) */
};

const char *sched_error_message(enum sched_error e) {
    switch (e) {
    case SCHED_OK: return "ok";
    case SCHED_QUEUE_FULL: return "the request queue is full; try again later";
    case SCHED_TOO_LONG: return "the prompt plus max_tokens exceed the model's context";
    case SCHED_NEVER_FITS: return "the prompt plus max_tokens need more KV cache memory than the model's whole "
                                  "budget holds, even alone";
    case SCHED_NOMEM: return "out of memory";
    case SCHED_STOPPED: return "the server is shutting down";
    }
    return "unknown error";
}

static void sreq_free(struct sreq *r) {
    if (!r) return;
    gen_seq_free(&r->gen);
    kv_cache_free(&r->kv);
    for (int i = 0; r->stops && i < r->params.n_stops; i++) free(r->stops[i]);
    free(r->stops);
    free(r->stop_ids);
    free(r->bias);
    free(r->prompt);
    free(r->logits);
    free(r->prompt_rows);
    free(r);
}

/* Positions a request can fill: its prompt and every token it may generate. */
static int context_for(int n_prompt, const struct gen_params *p) {
    return n_prompt + (p->max_tokens > 0 ? p->max_tokens : 0);
}

/* The positions its cache holds: its context, or as far as compression's
 * lookahead reaches past the prompt (compress_context; a device's caches
 * are not compressed). */
static int cache_context(const struct sched *s, int n_prompt, const struct gen_params *p) {
    const int n = context_for(n_prompt, p);
    return s->m->placed ? n : compress_context(&p->compress, n_prompt, n, s->cfg.max_ctx);
}

/* Reports the end of a request and frees it. Called without the lock. */
static void finish_request(struct sreq *r, enum finish_reason why) {
    r->timing.finished = ebb_now_seconds();
    r->timing.grammar_s = r->gen.mask_s;
    if (r->gen.finish == FINISH_NONE && r->gen.history) gen_seq_finish(&r->gen, why);
    enum finish_reason f = r->gen.history ? r->gen.finish : why;
    /* Memory goes back before the request is reported done, so whoever
     * sees the completion also sees the KV cache returned to the account. */
    kv_cache_free(&r->kv);
    if (r->cb.on_done)
        r->cb.on_done(r->ud, f, r->n_prompt, r->gen.n_generated, &r->timing);
    sreq_free(r);
}

static struct sreq *sreq_create(const struct sched_request_desc *d, int n_vocab) {
    struct sreq *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->prompt = malloc((size_t)d->n_prompt * sizeof(int32_t));
    r->logits = malloc((size_t)n_vocab * sizeof(float));
    r->params = d->params;
    r->stops = d->params.n_stops ? calloc((size_t)d->params.n_stops, sizeof(char *)) : NULL;
    if (!r->prompt || !r->logits || (d->params.n_stops && !r->stops)) goto fail;
    for (int i = 0; i < d->params.n_stops; i++)
        if (!(r->stops[i] = strdup(d->params.stops[i]))) goto fail;
    r->params.stops = (const char *const *)r->stops;
    const struct gen_params *p = &d->params;
    if (p->n_stop_ids > 0) {
        if (!(r->stop_ids = malloc((size_t)p->n_stop_ids * sizeof(int32_t)))) goto fail;
        memcpy(r->stop_ids, p->stop_ids, (size_t)p->n_stop_ids * sizeof(int32_t));
    }
    r->params.stop_ids = r->stop_ids;
    if (p->sampling.n_bias > 0) {
        if (!(r->bias = malloc((size_t)p->sampling.n_bias * sizeof(*r->bias)))) goto fail;
        memcpy(r->bias, p->sampling.bias, (size_t)p->sampling.n_bias * sizeof(*r->bias));
    }
    r->params.sampling.bias = r->bias;
    memcpy(r->prompt, d->prompt, (size_t)d->n_prompt * sizeof(int32_t));
    r->n_prompt = d->n_prompt;
    r->n_replay = d->n_prompt;
    r->unverified = -1;
    r->cb = d->cb;
    r->ud = d->ud;
    r->timing.queued = ebb_now_seconds();
    return r;
fail:
    sreq_free(r);
    return NULL;
}

/* What recording a prompt's queries for compression costs: nothing for a
 * model on a device, whose caches are not compressed (compress_prepare). */
static size_t observation_bytes(const struct sched *s, const struct compress_params *p, int at) {
    return s->m->placed ? 0 : compress_observation_bytes(&s->m->cfg, p, at);
}

enum sched_error sched_submit(struct sched *s, const struct sched_request_desc *d, uint64_t *id) {
    if (d->n_prompt <= 0 || context_for(d->n_prompt, &d->params) > s->cfg.max_ctx) return SCHED_TOO_LONG;
    const int at = compress_point(&d->params.compress, d->n_prompt);
    size_t need = kv_account_bytes_for(&s->account, cache_context(s, d->n_prompt, &d->params)) +
                  observation_bytes(s, &d->params.compress, at);
    size_t budget = kv_account_usage(&s->account).budget_bytes;
    if (budget && need > budget) return SCHED_NEVER_FITS;
    struct sreq *r = sreq_create(d, s->m->cfg.n_vocab);
    if (!r) return SCHED_NOMEM;
    pthread_mutex_lock(&s->lock);
    enum sched_error e = SCHED_OK;
    if (s->stopping) e = SCHED_STOPPED;
    else if (s->n_waiting >= s->cfg.max_waiting) e = SCHED_QUEUE_FULL;
    if (e == SCHED_OK) {
        r->id = ++s->next_id;
        if (s->wait_tail) s->wait_tail->next = r;
        else s->wait_head = r;
        s->wait_tail = r;
        s->n_waiting++;
        *id = r->id;
        pthread_cond_signal(&s->wake);
    }
    pthread_mutex_unlock(&s->lock);
    if (e != SCHED_OK) sreq_free(r);
    return e;
}

int sched_cancel(struct sched *s, uint64_t id) {
    int found = -1;
    pthread_mutex_lock(&s->lock);
    /* A waiting request leaves the queue at once, so its slot is free for
     * the next submit (a refused burst must not hold slots until the engine's
     * next step); the engine finishes it. */
    for (struct sreq **link = &s->wait_head, *prev = NULL; *link && found; prev = *link, link = &(*link)->next) {
        struct sreq *r = *link;
        if (r->id != id) continue;
        atomic_store(&r->stop, SREQ_CANCELLED);
        *link = r->next;
        if (s->wait_tail == r) s->wait_tail = prev;
        s->n_waiting--;
        r->next = s->cancelled_waiting;
        s->cancelled_waiting = r;
        found = 0;
        break;
    }
    for (int i = 0; i < s->n_running && found; i++)
        if (s->running[i]->id == id) { atomic_store(&s->running[i]->stop, SREQ_CANCELLED); found = 0; }
    if (!found) pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return found;
}

void sched_get_stats(struct sched *s, struct sched_stats *st) {
    pthread_mutex_lock(&s->lock);
    st->running = s->n_running;
    st->waiting = s->n_waiting;
    st->steps = s->steps;
    st->batch_tokens = s->batch_tokens;
    st->preemptions = s->preemptions;
    st->weight_bytes = s->weight_bytes;
    st->stack_bytes = s->stack_bytes;
    st->on_stack = s->elastic && s->config == s->n_configs - 1;
    st->config = s->config;
    st->memory_share = s->memory_share;
    st->stack_grows = s->stack_grows;
    st->stack_shrinks = s->stack_shrinks;
    st->stack_bytes_loaded = s->stack_bytes_loaded;
    st->stack_bytes_freed = s->stack_bytes_freed;
    st->drafts = s->drafts;
    st->draft_tokens = s->draft_tokens;
    st->accepted_tokens = s->accepted_tokens;
    memcpy(st->accepted_at, s->accepted_at, sizeof st->accepted_at);
    memcpy(st->compress, s->compress, sizeof st->compress);
    st->prompt_cache_hits = s->cache_hits;
    st->prompt_cache_tokens = s->cache_tokens;
    st->prompt_cache_evictions = s->cache_evictions;
    st->prompt_cache_entries = s->n_cached;
    pthread_mutex_unlock(&s->lock);
    const struct kv_usage u = kv_account_usage(&s->account);
    st->prompt_cache_bytes = u.kept_bytes;   /* read with the reservation: one instant */
    st->kv_budget_bytes = u.budget_bytes;
    st->kv_reserved_bytes = u.reserved_bytes;
    st->kv_allocated_bytes = u.allocated_bytes;
}

size_t sched_kv_bytes_for(const struct sched *s, int n_ctx) { return kv_account_bytes_for(&s->account, n_ctx); }

int sched_context_capacity(struct sched *s) { return kv_account_capacity(&s->account, s->cfg.max_ctx); }

void sched_set_kv_budget(struct sched *s, size_t bytes) {
    kv_account_set_budget(&s->account, bytes);
    pthread_mutex_lock(&s->lock);
    s->refit = 1;                    /* a smaller one lets kept prompts go (fit_weights) */
    pthread_cond_signal(&s->wake);   /* a larger budget may admit waiting work */
    pthread_mutex_unlock(&s->lock);
}

void sched_set_memory(struct sched *s, uint64_t share) {
    kv_account_set_budget(&s->account, governor_kv_budget(&s->gm, share));
    pthread_mutex_lock(&s->lock);
    s->memory_share = share;
    s->refit = 1;
    pthread_cond_signal(&s->wake);   /* an idle engine fits its stack now; more memory may admit work */
    pthread_mutex_unlock(&s->lock);
}

void sched_governor_model(struct sched *s, struct governor_model *gm) {
    *gm = s->gm;
    /* Kept prompts are not held: they give way to whatever needs the memory.
     * One reading of the account: an eviction under way is never half seen. */
    const struct kv_usage u = kv_account_usage(&s->account);
    gm->kv_held_bytes = u.reserved_bytes > u.kept_bytes ? u.reserved_bytes - u.kept_bytes : 0;
}

int sched_take_swap_times(struct sched *s, double *out, int cap) {
    pthread_mutex_lock(&s->lock);
    const int n = s->n_swaps < cap ? s->n_swaps : cap;
    memcpy(out, s->swaps, (size_t)n * sizeof *out);
    s->n_swaps = 0;
    pthread_mutex_unlock(&s->lock);
    return n;
}

/* In place, fitting only sets depths and advises the kernel: it cannot
 * fail (the dense path, which allocates, is never elastic). */
static void fit_in_place(struct model *m, size_t bytes) {
    char err[256];
    const int rc = bitstack_fit(m, bytes, err, sizeof err);
    assert(rc == 0);
    (void)rc;
}

/* The run a pass uses: the configuration's in use. */
static struct model_run *compute_run(const struct sched *s) { return s->config_run[s->config]; }

static int on_stack(const struct sched *s) { return s->elastic && s->config == s->n_configs - 1; }

/* The configuration that fits beside kv_held, and the bytes of its stack
 * prefix (0 unless it is the elastic bottom). */
static int fit_target(const struct sched *s, uint64_t share, size_t kv_held, size_t *want) {
    const int bottom = s->n_configs - 1, to = governor_rung(&s->gm, share, kv_held, s->config);
    *want = to == bottom && s->elastic
                ? bitstack_prefix_bytes(s->config_m[bottom]->stack, governor_stack_target(&s->gm, share, kv_held))
                : 0;
    return to;
}

static int cache_evict_oldest(struct sched *s);

/* Keeps the weights that fit beside the KV reserved now (engine thread,
 * between passes: no pass reads the matrices): the largest whole file
 * that fits (the model, then its packed variants), else the bottom
 * configuration with the longest prefix of its stack that fits. Called
 * after every change to the reservations and when the share changes, so
 * weights and KV stay within the share at every pass. A model left aside
 * gives its pages back; the one taken up reads them again from the page
 * cache as the next pass touches them. */
static void fit_weights(struct sched *s) {
    pthread_mutex_lock(&s->lock);
    const uint64_t share = s->memory_share;
    s->refit = 0;   /* for every model: the idle wait loops on it */
    pthread_mutex_unlock(&s->lock);
    /* A budget lowered under what is reserved takes kept prompts first. */
    for (struct kv_usage u = kv_account_usage(&s->account); u.budget_bytes && u.reserved_bytes > u.budget_bytes &&
                                                            cache_evict_oldest(s);
         u = kv_account_usage(&s->account)) {}
    if (s->n_configs < 2 && !s->elastic) return;
    struct kv_usage u = kv_account_usage(&s->account);
    size_t want;
    int to = fit_target(s, share, u.reserved_bytes, &want);
    /* Kept prompts are worth less than weights: they go while the weights
     * that would fit without them are better than those that fit now. */
    for (size_t want_without; s->cached; to = fit_target(s, share, u.reserved_bytes, &want)) {
        if (fit_target(s, share, u.reserved_bytes - u.kept_bytes, &want_without) == to && want_without == want) break;
        cache_evict_oldest(s);
        u = kv_account_usage(&s->account);
    }
    struct model *bm = s->config_m[s->n_configs - 1];
    if (to == s->config && (!s->elastic || want == bm->stack->resident_bytes)) return;
    /* Kept prompts were computed by the weights leaving now, and so were
     * the running requests' caches so far: another request's text would not
     * be what these weights give it. */
    while (cache_evict_oldest(s)) {}
    s->weights_changes++;
    const double t0 = ebb_now_seconds();
    const size_t was = s->weight_bytes;
    if (s->elastic) fit_in_place(bm, want);
    if (to != s->config) model_release_pages(s->config_m[s->config]);
    const size_t now = s->config_m[to]->weight_bytes;
    const double took = ebb_now_seconds() - t0;
    pthread_mutex_lock(&s->lock);
    s->config = to;
    s->weight_bytes = now;
    s->stack_bytes = want;
    if (now > was) { s->stack_grows++; s->stack_bytes_loaded += now - was; }
    else { s->stack_shrinks++; s->stack_bytes_freed += was - now; }
    if (s->n_swaps < SWAP_RING) s->swaps[s->n_swaps++] = took;
    pthread_mutex_unlock(&s->lock);
}

/* Moves cancelled requests out of the waiting queue into *out (lock held). */
static void take_cancelled_waiting(struct sched *s, struct sreq **out) {
    while (s->cancelled_waiting) {
        struct sreq *r = s->cancelled_waiting;
        s->cancelled_waiting = r->next;
        r->next = *out;
        *out = r;
    }
    struct sreq **link = &s->wait_head, *prev = NULL;
    while (*link) {
        struct sreq *r = *link;
        if (atomic_load(&r->stop) != SREQ_GOING) {
            *link = r->next;
            if (s->wait_tail == r) s->wait_tail = prev;
            s->n_waiting--;
            r->next = *out;
            *out = r;
        } else {
            prev = r;
            link = &r->next;
        }
    }
}

/* Positions a request reserves when admitted: what it must compute before
 * it decodes, and the position its first decoded token takes. Later
 * positions are reserved as it reaches them (reserve_for_decode). */
static int first_reservation(const struct sched *s, const struct sreq *r) {
    const int cap = cache_context(s, r->n_prompt, &r->params);
    int want = r->n_replay + 1;
    /* Compression's lookahead writes past its first point, then forgets
     * (compress_look_ahead): reserved from the start, so that a request
     * computed again under another load looks as far. */
    const int reach = s->m->placed ? 0 : compress_lookahead_reach(&r->params.compress, r->n_prompt);
    if (reach > want) want = reach;
    return want < cap ? want : cap;
}

/* Its longest pass when `left` positions are still to compute: a chunk of
 * them, or a verification pass of drafts. */
static int longest_pass(const struct sreq *r, int left) {
    return r->params.speculative && left < DRAFT_MAX + 1 ? DRAFT_MAX + 1 : left;
}

/* ------------------------------------------------------- prompt cache */

static void cache_free(struct cached_prompt *c) {
    kv_cache_free(&c->kv);
    free(c->tokens);
    free(c);
}

/* Unlinks *link (engine thread); it stays kept in the account until
 * freed or taken (kv_cache_set_kept). */
static struct cached_prompt *cache_unlink(struct sched *s, struct cached_prompt **link) {
    struct cached_prompt *c = *link;
    *link = c->next;
    c->next = NULL;
    s->n_cached--;
    return c;
}

/* Puts c first: the most recently used. */
static void cache_insert(struct sched *s, struct cached_prompt *c) {
    kv_cache_set_kept(&c->kv, 1);
    c->next = s->cached;
    s->cached = c;
    s->n_cached++;
}

/* Frees the least recently used kept cache: 0 when none was kept. */
static int cache_evict_oldest(struct sched *s) {
    if (!s->cached) return 0;
    struct cached_prompt **link = &s->cached;
    while ((*link)->next) link = &(*link)->next;
    cache_free(cache_unlink(s, link));
    s->cache_evictions++;
    return 1;
}

/* Keeps a finished request's cache for the next request that starts with
 * its tokens, if it asked and the cache's size allows; the request's own
 * kv is left empty either way for finish_request. */
static void cache_keep(struct sched *s, struct sreq *r) {
    struct kv_cache *kv = &r->kv;
    if (!s->cfg.prompt_cache_bytes || !r->params.cache_prompt || r->params.embedding || !r->gen.history ||
        r->kv_weights != s->weights_changes ||
        kv->n_past <= 0 || kv->n_past > r->gen.n_history || kv->reserved_bytes > s->cfg.prompt_cache_bytes)
        return;
    struct cached_prompt *c = calloc(1, sizeof *c);
    if (c) c->tokens = malloc((size_t)kv->n_past * sizeof *c->tokens);
    if (!c || !c->tokens) {
        free(c);
        return;
    }
    kv_cache_forget_observation(kv);
    memcpy(c->tokens, r->gen.history, (size_t)kv->n_past * sizeof *c->tokens);
    if (kv->compact) {
        c->compress = r->params.compress;
        c->compress.at = compress_point(&r->params.compress, r->n_prompt);
    }
    c->kv = *kv;
    memset(kv, 0, sizeof *kv);
    cache_insert(s, c);
    while (kv_account_usage(&s->account).kept_bytes > s->cfg.prompt_cache_bytes && cache_evict_oldest(s)) {}
}

/* Whether two requests compress alike, wherever they compress. */
static int same_compression(const struct compress_params *a, const struct compress_params *b) {
    return a->mode == b->mode && a->select == b->select && a->budget == b->budget &&
           a->budget_tokens == b->budget_tokens && a->low_budget == b->low_budget && a->min_prompt == b->min_prompt &&
           a->low_key_bits == b->low_key_bits && a->seed == b->seed && a->lookahead == b->lookahead;
}

/* The most of a kept cache r may take. One token is always left to
 * compute (its logits start the generation). A compressed cache goes on
 * only for a request that compresses alike and has not been compressed
 * (a preempted turn computes its own points again): its next turn
 * (continue_compressed). A request that compresses its prompt computes at
 * least the first observation window's queries (the scoring needs them)
 * from a whole cache. */
static int cache_limit(const struct sreq *r, const struct cached_prompt *c, int n) {
    const struct compress_params *p = &r->params.compress;
    const int first = compress_next_point(p, r->n_prompt, 0), compressing = first && compress_wanted(p, first);
    int most = c->kv.n_past < n - 1 ? c->kv.n_past : n - 1;
    if (c->kv.compact) return compressing && !p->n_earlier && same_compression(p, &c->compress) ? most : 0;
    if (compressing && most > first - COMPRESS_WINDOW) most = first - COMPRESS_WINDOW;
    return most;
}

/* The least of a kept cache a request may take: past its floor
 * (kv_cache_truncate_floor) and, compressed, past where it was compressed:
 * the positions before that point were computed from the whole cache, and
 * a request that takes fewer would compute the rest from the compressed
 * one, which compressing there does not do (the same prompt sent again
 * recomputes its last token: it is compressed afresh instead). */
static int cache_least(const struct cached_prompt *c) {
    const int floor = kv_cache_truncate_floor(&c->kv);
    return c->kv.compact && c->compress.at > floor ? c->compress.at : floor;
}

/* A compressed conversation's next turn r, going on from its kept cache c,
 * which shares `reuse` tokens with it: compressed where c was, then again
 * at its own prompt's end over what it took and what it adds
 * (compress_apply: re-scored by the new turn's last tokens; what was
 * demoted stays demoted, what was kept may be demoted or dropped) -- when
 * that moves the store's boundary on by a page at least (else there is
 * little to gain for the scoring's cost) and the points have room; else
 * not again. Its window is the prompt's last COMPRESS_WINDOW tokens, which
 * it computes again if the cache holds some (a chat's next turn adds
 * fewer: the last answer is in the cache), as far as c can be cut back;
 * no fewer than COMPRESS_MIN_WINDOW. The points go with the request, so
 * that a preempted turn computes the same cache anew. Returns how much of
 * c to take. */
static int continue_compressed(struct sreq *r, const struct cached_prompt *c, int reuse) {
    struct compress_params *p = &r->params.compress;
    const int own = compress_point(p, r->n_prompt);
    int from = own - COMPRESS_WINDOW < reuse ? own - COMPRESS_WINDOW : reuse;
    if (from < cache_least(c)) from = cache_least(c);
    p->n_earlier = c->compress.n_earlier;
    memcpy(p->earlier, c->compress.earlier, sizeof p->earlier);
    const int boundary = (own / KV_PAGE_TOKENS - 1) * KV_PAGE_TOKENS;
    if (own - from >= COMPRESS_MIN_WINDOW && boundary > c->kv.compact_boundary && p->n_earlier < COMPRESS_MAX_POINTS &&
        compress_wanted(p, own)) {
        p->earlier[p->n_earlier++] = (struct compress_mark){c->compress.at, c->compress.window};
        p->window = own - from < COMPRESS_WINDOW ? own - from : COMPRESS_WINDOW;
        return from;
    }
    p->at = c->compress.at;
    p->window = c->compress.window;
    return reuse;
}

/* Whether a kept cache's start can be copied out (kv_cache_copy_prefix),
 * leaving the cache kept. */
static int cache_copyable(const struct cached_prompt *c) { return !c->kv.window && !c->kv.compact; }

/* The kept cache that spares r the most of the n tokens it must compute
 * first, unlinked (*reuse: the tokens it shares with them); NULL when none
 * shares a usable start. A sequence that cannot be copied from is given up
 * only to a request that goes on with at least half of it: another
 * conversation that shares its system prompt must not take a conversation's
 * cache away from its next turn. */
static struct cached_prompt *cache_take(struct sched *s, const struct sreq *r, const int32_t *tokens, int n,
                                        int *reuse) {
    struct cached_prompt **best = NULL;
    int best_n = 0;
    for (struct cached_prompt **link = &s->cached; *link; link = &(*link)->next) {
        const struct cached_prompt *c = *link;
        const int most = cache_limit(r, c, n);
        int common = 0;
        while (common < most && c->tokens[common] == tokens[common]) common++;
        if (common > best_n && common >= cache_least(c) &&
            (cache_copyable(c) || 2 * common >= c->kv.n_past)) {
            best = link;
            best_n = common;
        }
    }
    if (!best) return NULL;
    *reuse = best_n;
    return cache_unlink(s, best);
}

/* r starts with `reuse` positions computed. */
static void started_from_cache(struct sched *s, struct sreq *r, int reuse) {
    r->n_prefilled = reuse;
    if (!r->timing.started) r->timing.cached = reuse;
    s->cache_hits++;
    s->cache_tokens += (uint64_t)reuse;
}

/* A new cache for r, for passes of up to max_pass positions; kept caches
 * give way when the budget cannot take its reservation. */
static enum kv_status new_cache(struct sched *s, struct sreq *r, int max_pass) {
    enum kv_status rc;
    while ((rc = kv_cache_init_reserving(&r->kv, &s->m->cfg, cache_context(s, r->n_prompt, &r->params),
                                         first_reservation(s, r), max_pass, &s->account)) == KV_OVER_BUDGET &&
           cache_evict_oldest(s)) {}
    return rc;
}

/* Gives r its KV cache on admission: a kept one holding the start of what
 * it computes first when one fits -- a copy of that start when most of the
 * kept sequence lies beyond it and it can be copied, else the kept cache
 * itself -- or a new one. Kept caches give way when the budget cannot take
 * the reservation. */
static enum kv_status start_cache(struct sched *s, struct sreq *r) {
    const int n_ctx = cache_context(s, r->n_prompt, &r->params), first = first_reservation(s, r);
    int reuse = 0;
    r->kv_weights = s->weights_changes;
    struct cached_prompt *c = NULL;
    /* A request that reads every prompt row (its log-probabilities, an
     * embedding's mean) needs them all computed. */
    if (r->params.cache_prompt && !r->params.prompt_logprobs && !r->params.embedding)
        c = cache_take(s, r, r->gen.history ? r->gen.history : r->prompt, r->n_replay, &reuse);
    enum kv_status rc;
    if (c && cache_copyable(c) && reuse < c->kv.n_past - KV_PAGE_TOKENS) {
        /* c is out of the list: new_cache's evictions cannot take it. */
        if ((rc = new_cache(s, r, longest_pass(r, r->n_replay - reuse))) == KV_OK) {
            if (kv_cache_copy_prefix(&r->kv, &c->kv, reuse) == 0) started_from_cache(s, r, reuse);
            cache_insert(s, c);
            return KV_OK;
        }
        /* No room for both: r takes it. */
    }
    if (c) {
        kv_cache_set_kept(&c->kv, 0);   /* r's now (or freed) */
        /* Its compression points are r's even if r computes all anew. */
        if (c->kv.compact) reuse = continue_compressed(r, c, reuse);
        rc = kv_cache_truncate(&c->kv, reuse) ? KV_FAILED : KV_OK;   /* at or past its floor: cannot fail */
        assert(rc == KV_OK);
        while ((rc = kv_cache_resume(&c->kv, n_ctx, first, longest_pass(r, r->n_replay - reuse))) == KV_OVER_BUDGET &&
               cache_evict_oldest(s)) {}
        if (rc == KV_OK) {
            r->kv = c->kv;
            memset(&c->kv, 0, sizeof c->kv);
            cache_free(c);
            started_from_cache(s, r, reuse);
            return KV_OK;
        }
        cache_free(c);   /* what it holds is what a new cache would need */
    }
    return new_cache(s, r, longest_pass(r, r->n_replay));
}

/* Admits from the head of the queue while a slot is free and the budget
 * takes the first reservation (lock held). Requests that can no longer fit
 * at all (the budget shrank) go to *evicted, those that cannot start (out
 * of memory) to *failed. A request admitted again after preemption keeps
 * its generation state. */
static void admit(struct sched *s, struct sreq **evicted, struct sreq **failed) {
    while (s->wait_head && s->n_running < s->cfg.max_running) {
        struct sreq *r = s->wait_head;
        enum kv_status rc = start_cache(s, r);
        /* After start_cache, which may set the compression points: the first
         * still to come. Compression follows the prompt's prefill to each
         * point, on a first admission and again when a preempted request
         * computes its prompt anew; its recording of queries is reserved
         * with the cache. */
        const int at = compress_next_point(&r->params.compress, r->n_prompt, r->n_prefilled);
        if (rc == KV_OK && at) {
            while ((rc = compress_prepare(&r->kv, &s->m->cfg, &r->params.compress, at)) == KV_OVER_BUDGET &&
                   cache_evict_oldest(s)) {}
            if (rc != KV_OK) kv_cache_free(&r->kv);
        }
        if (rc == KV_OVER_BUDGET) {
            size_t need = kv_account_bytes_for_pass(&s->account, first_reservation(s, r), longest_pass(r, r->n_replay)) +
                          observation_bytes(s, &r->params.compress, at);
            const struct kv_usage u = kv_account_usage(&s->account);
            int never = u.budget_bytes && need > u.budget_bytes;
            int idle = u.reserved_bytes == 0;
            if (!never && !idle) break;   /* wait for running work to free memory */
        }
        s->wait_head = r->next;
        if (!s->wait_head) s->wait_tail = NULL;
        s->n_waiting--;
        r->next = NULL;
        if (rc == KV_OVER_BUDGET) {
            r->next = *evicted;
            *evicted = r;
            continue;
        }
        if (rc != KV_OK || (!r->gen.history && gen_seq_init(&r->gen, s->m, r->prompt, r->n_prompt, &r->params))) {
            r->next = *failed;
            *failed = r;
            continue;
        }
        if (!r->timing.started) r->timing.started = ebb_now_seconds();
        s->running[s->n_running++] = r;
    }
}

/* Removes running[i] (engine thread; lock taken for cancel's sake). */
static struct sreq *remove_running(struct sched *s, int i) {
    pthread_mutex_lock(&s->lock);
    struct sreq *r = s->running[i];
    memmove(&s->running[i], &s->running[i + 1], (size_t)(s->n_running - i - 1) * sizeof *s->running);
    s->n_running--;
    pthread_mutex_unlock(&s->lock);
    return r;
}

/* Gives running[i]'s pages back and puts it at the head of the queue, to be
 * admitted again first: its prompt and the tokens it has fed are computed
 * again then (bit for bit the same cache: a position's values do not depend
 * on how the batches were cut), and decoding goes on from the token it had
 * sampled. Its client only sees a pause. */
static void preempt(struct sched *s, int i) {
    struct sreq *r = remove_running(s, i);
    const int decoding = r->n_prefilled >= r->n_replay && r->gen.n_generated > 0;
    if (decoding) r->n_replay = r->kv.n_past;   /* every fed token; next_token is still to feed */
    r->n_prefilled = 0;
    kv_cache_free(&r->kv);
    pthread_mutex_lock(&s->lock);
    r->next = s->wait_head;
    s->wait_head = r;
    if (!s->wait_tail) s->wait_tail = r;
    s->n_waiting++;
    s->preemptions++;
    pthread_mutex_unlock(&s->lock);
}

/* Every decoding sequence reserves the position its next token takes. When
 * the budget cannot grow, the newest running sequence is preempted -- the
 * oldest always make progress -- until the growth fits or the sequence
 * that needed it was itself the newest. */
static void reserve_for_decode(struct sched *s) {
    for (int i = 0; i < s->n_running; i++) {
        struct sreq *r = s->running[i];
        if (r->n_prefilled < r->n_replay) continue;   /* its chunks are inside the first reservation */
        const int n = r->kv.n_past + 1 < r->kv.n_ctx ? r->kv.n_past + 1 : r->kv.n_ctx;
        while (kv_cache_reserve(&r->kv, n) == KV_OVER_BUDGET) {
            if (cache_evict_oldest(s)) continue;   /* kept prompts before anyone's pause */
            const int newest = s->n_running - 1;
            preempt(s, newest);
            if (newest == i) break;
        }
    }
}

/* Drafts for the decoding sequences that speculate (engine/draft.h): each
 * gets as many as its acceptance and the measured step times say pay, as
 * far as the step's tokens and its own reservation can grow without
 * preempting anyone (a draft is never worth another request's pause).
 * `decoding` sequences decode this step; at most max_tokens in all. */
static void plan_drafts(struct sched *s, int decoding, int max_tokens) {
    const size_t V = (size_t)s->m->cfg.n_vocab;
    int tokens = decoding;
    size_t rows = 0;
    for (int i = 0; i < s->n_running; i++) {
        struct sreq *r = s->running[i];
        r->n_drafted = 0;
        r->unverified = -1;
        r->pass_logits = NULL;
        if (!r->params.speculative || r->n_prefilled < r->n_replay || r->gen.finish != FINISH_NONE) continue;
        /* The context and max_tokens after this step's certain token. */
        int room = r->kv.n_ctx - r->kv.n_past - 1;
        if (r->params.max_tokens - r->gen.n_generated - 1 < room) room = r->params.max_tokens - r->gen.n_generated - 1;
        if (max_tokens - tokens < room) room = max_tokens - tokens;
        if (room > DRAFT_MAX) room = DRAFT_MAX;
        if (room <= 0) continue;
        /* The history ends with next_token: the draft is what follows it. */
        const int found = draft_ngram(r->gen.history, r->gen.n_history, room, r->pass + 1);
        int k = found && !s->cfg.draft_always ? draft_choose(&s->costs, &r->draft, tokens - 1, found, room) : found;
        if (k && kv_cache_reserve(&r->kv, r->kv.n_past + 1 + k) != KV_OK) k = 0;
        if (found && !k) r->unverified = r->pass[1];   /* found, not verified: see what comes */
        r->pass[0] = r->next_token;
        r->n_drafted = k;
        tokens += k;
        if (k) rows += (size_t)(1 + k);
    }
    if (rows > s->verify_rows_cap) {
        float *grown = realloc(s->verify_rows, rows * V * sizeof(float));
        if (grown) {
            s->verify_rows = grown;
            s->verify_rows_cap = rows;
        }
    }
    const int fits = rows <= s->verify_rows_cap;   /* out of memory: this step verifies nothing */
    size_t row = 0;
    for (int i = 0; i < s->n_running; i++) {
        struct sreq *r = s->running[i];
        if (!r->n_drafted) continue;
        if (!fits) {
            r->unverified = r->pass[1];
            r->n_drafted = 0;
            continue;
        }
        r->pass_logits = s->verify_rows + row * V;
        row += (size_t)(1 + r->n_drafted);
    }
}

/* Reports the prompt tokens not yet reported, up to `to` (exclusive), with
 * their log-probabilities: token p from the row of position p - 1, which
 * rows[p - 1 - first] holds (the chunk's rows start at position `first`;
 * earlier tokens went with the previous chunk); token 0 has none. */
static void report_prompt(struct sched *s, struct sreq *r, const float *rows, int first, int to) {
    const int V = s->m->cfg.n_vocab;
    double now = ebb_now_seconds();
    for (int p = r->prompt_reported; p < to; p++) {
        struct gen_token tok = {1, r->prompt[p], "", 0, NAN, 0, r->gen.top_id, r->gen.top_logprob};
        if (p > 0) {
            const float *row = rows + (size_t)(p - 1 - first) * V;
            tok.logprob = (float)log_softmax_at(row, V, r->prompt[p]);
            tok.n_top = log_softmax_top(row, V, r->params.top_logprobs, r->gen.top_id, r->gen.top_logprob);
        }
        if (r->cb.on_token) r->cb.on_token(r->ud, &tok, now);
    }
    if (to > r->prompt_reported) r->prompt_reported = to;
}

/* Samples r's next token from the logits of the position that left its
 * cache at n_filled positions, and reports it. */
static int32_t sample_next(struct sreq *r, float *logits, int n_filled) {
    int32_t id = gen_seq_step(&r->gen, logits);
    double now = ebb_now_seconds();
    if (id < 0) return id;   /* a grammar allowed nothing: finished, no token */
    if (!r->timing.first_token) r->timing.first_token = now;
    if (r->gen.finish == FINISH_NONE && n_filled >= r->kv.n_ctx) gen_seq_finish(&r->gen, FINISH_LENGTH);
    r->next_token = id;
    if (r->cb.on_token) {
        const struct gen_token tok = {0, id, r->gen.text, r->gen.text_len, r->gen.logprob,
                                      r->gen.n_top, r->gen.top_id, r->gen.top_logprob};
        r->cb.on_token(r->ud, &tok, now);
    }
    return id;
}

/* After a pass over next_token and k drafts: samples from each row in turn,
 * as decoding one token at a time would, and keeps going while the token
 * sampled is the one drafted next (so the text is exactly what it would be
 * without drafts, greedy or sampled: each token kept was drawn from the
 * model's own distribution at its position, with the same sampler state).
 * The cache keeps the positions whose rows were used; the rest, fed with
 * drafts the model did not choose, are rolled back. */
static void verify_drafts(struct sched *s, struct sreq *r) {
    const int k = r->n_drafted, start = r->kv.n_past - (k + 1);
    const size_t V = (size_t)s->m->cfg.n_vocab;
    int i = 0;
    for (;; i++) {
        const int32_t id = sample_next(r, r->pass_logits + (size_t)i * V, start + i + 1);
        if (r->gen.finish != FINISH_NONE || i == k || id != r->pass[i + 1]) break;
    }
    const int rc = kv_cache_truncate(&r->kv, start + i + 1);   /* inside the pass: cannot fail */
    assert(rc == 0);
    (void)rc;
    draft_stats_record(&r->draft, k, i);
    r->timing.drafted += k;
    r->timing.accepted += i;
    pthread_mutex_lock(&s->lock);
    s->drafts++;
    s->draft_tokens += (uint64_t)k;
    s->accepted_tokens += (uint64_t)i;
    for (int j = 0; j < i; j++) s->accepted_at[j]++;
    pthread_mutex_unlock(&s->lock);
}

/* An embedding request's prompt is in: its sum becomes the mean, scaled
 * to unit length (in double: 576 terms of mixed sign). */
static void finish_embedding(struct sched *s, struct sreq *r) {
    const int E = s->m->cfg.n_embd;
    float *v = r->params.embedding;
    double norm = 0;
    for (int e = 0; e < E; e++) norm += (double)v[e] * v[e];
    const double scale = norm > 0 ? 1.0 / sqrt(norm) : 0.0;   /* the mean's 1/n cancels in the scaling */
    for (int e = 0; e < E; e++) v[e] = (float)(v[e] * scale);
    r->timing.first_token = ebb_now_seconds();
    r->gen.finish = FINISH_STOP;
}

/* Finishes a running request that ended well or was cancelled (its cache
 * holds what its passes computed), keeping its cache for the prompt cache. */
static void finish_kept(struct sched *s, struct sreq *r, enum finish_reason why) {
    cache_keep(s, r);
    finish_request(r, why);
}

/* One batched forward pass and the sampling after it. */
static void compress_prompt(struct sched *s, struct sreq *r);

/* Where the request's prompt is compressed next (its recording's point:
 * the window's end, before any lookahead or reconstruction), 0 when it is
 * not. */
static int compression_point(const struct sreq *r) {
    const struct kv_observation *o = r->kv.obs;
    return o ? o->from + o->n - o->past : 0;
}

static void step(struct sched *s) {
    /* Cancelled running sequences stop here, before spending compute. */
    for (int i = 0; i < s->n_running;) {
        const enum sreq_stop stop = atomic_load(&s->running[i]->stop);
        if (stop == SREQ_CANCELLED) finish_kept(s, remove_running(s, i), FINISH_CANCELLED);
        else if (stop != SREQ_GOING) finish_request(remove_running(s, i), FINISH_CANCELLED);
        else i++;
    }
    reserve_for_decode(s);
    const int max_tokens = on_stack(s) ? ELASTIC_STEP_TOKENS : MODEL_MAX_BATCH;
    int decoding = 0;
    for (int i = 0; i < s->n_running; i++) decoding += s->running[i]->n_prefilled >= s->running[i]->n_replay;
    plan_drafts(s, decoding, max_tokens);
    fit_weights(s);
    int n = 0, tokens = 0;
    for (int i = 0; i < s->n_running; i++) {        /* decode tokens first: latency */
        struct sreq *r = s->running[i];
        if (r->n_prefilled < r->n_replay) continue;
        if (r->n_drafted) s->batch[n] = (struct batch_seq){&r->kv, r->pass, 1 + r->n_drafted, r->pass_logits, 1, NULL};
        else s->batch[n] = (struct batch_seq){&r->kv, &r->next_token, 1, r->logits, 0, NULL};
        s->batch_req[n++] = r;
        tokens += 1 + r->n_drafted;
    }
    for (int i = 0; i < s->n_running && tokens < max_tokens; i++) {   /* then prompt chunks */
        struct sreq *r = s->running[i];
        int left = r->n_replay - r->n_prefilled;
        if (left <= 0) continue;
        int chunk = left < max_tokens - tokens ? left : max_tokens - tokens;
        /* A prompt to compress stops where compression comes
         * (compression_point). */
        const int at = compression_point(r);
        if (at && r->n_prefilled < at && r->n_prefilled + chunk > at) chunk = at - r->n_prefilled;
        /* Prompt log-probabilities need every row: a chunk at a time. */
        const int want_rows = r->params.prompt_logprobs && r->prompt_reported < r->n_prompt;
        if (want_rows && chunk > PROMPT_LOGPROB_CHUNK) chunk = PROMPT_LOGPROB_CHUNK;
        if (want_rows && !r->prompt_rows &&   /* held only while the prompt is computed */
            !(r->prompt_rows = malloc((size_t)PROMPT_LOGPROB_CHUNK * s->m->cfg.n_vocab * sizeof(float)))) {
            atomic_store(&r->stop, SREQ_FAILED);
            continue;
        }
        /* A recomputed sequence already sampled the token that follows. */
        int sample = chunk == left && r->gen.n_generated == 0 && !r->params.embedding;
        /* An embedding sums from the first chunk (again after a preemption). */
        if (r->params.embedding && r->n_prefilled == 0)
            memset(r->params.embedding, 0, (size_t)s->m->cfg.n_embd * sizeof(float));
        /* A lookahead starts from the point's logits. */
        const int look = at && r->kv.obs->ahead > 0 && r->n_prefilled + chunk == at;
        s->batch[n] = (struct batch_seq){&r->kv, r->gen.history + r->n_prefilled, chunk,
                                         sample || look ? r->logits : NULL, 0, r->params.embedding};
        if (want_rows) {
            s->batch[n].logits = r->prompt_rows;
            s->batch[n].all_logits = 1;
        }
        s->batch_req[n++] = r;
        tokens += chunk;
    }
    if (n == 0) return;
    const double t0 = ebb_now_seconds();
    int rc = model_forward_batch(compute_run(s), s->batch, n);
    if (rc == 0) draft_costs_record(&s->costs, tokens, ebb_now_seconds() - t0);
    pthread_mutex_lock(&s->lock);
    s->steps++;
    s->batch_tokens += (uint64_t)tokens;
    pthread_mutex_unlock(&s->lock);
    for (int b = 0; b < n; b++) {
        struct sreq *r = s->batch_req[b];
        if (rc) {
            snprintf(r->timing.error, sizeof r->timing.error, "the forward pass failed: %s",
                     model_run_failure(compute_run(s)));
            atomic_store(&r->stop, SREQ_FAILED);
            continue;
        }
        if (r->n_prefilled < r->n_replay) {
            if (s->batch[b].all_logits) {   /* prompt rows: report, and keep the last for sampling */
                const int first = r->n_prefilled, n_tok = s->batch[b].n_tok, V = s->m->cfg.n_vocab;
                const int to = first + n_tok < r->n_prompt ? first + n_tok + 1 : r->n_prompt;
                report_prompt(s, r, r->prompt_rows, first, to);
                memcpy(r->logits, r->prompt_rows + (size_t)(n_tok - 1) * V, (size_t)V * sizeof(float));
                s->batch[b].all_logits = 0;   /* sampled from r->logits below, not a verification */
                if (r->prompt_reported >= r->n_prompt) {
                    free(r->prompt_rows);
                    r->prompt_rows = NULL;
                }
            }
            r->n_prefilled += s->batch[b].n_tok;
            if (r->n_prefilled == compression_point(r)) compress_prompt(s, r);
            /* Decoding passes are short: the prompt chunks' window pages go. */
            if (r->n_prefilled == r->n_replay) kv_cache_limit_pass(&r->kv, r->params.speculative ? DRAFT_MAX + 1 : 1);
            if (r->n_prefilled < r->n_replay || r->gen.n_generated > 0) continue;
        }
        if (r->gen.finish != FINISH_NONE) continue;
        if (r->params.embedding) {
            finish_embedding(s, r);
            continue;
        }
        if (s->batch[b].all_logits) {
            verify_drafts(s, r);
        } else {
            const int32_t id = sample_next(r, r->logits, r->kv.n_past);
            if (r->unverified >= 0) draft_stats_record(&r->draft, 1, id == r->unverified);
        }
    }
    for (int i = 0; i < s->n_running;) {
        struct sreq *r = s->running[i];
        if (atomic_load(&r->stop) == SREQ_FAILED) finish_request(remove_running(s, i), FINISH_ERROR);
        else if (r->gen.finish != FINISH_NONE) finish_kept(s, remove_running(s, i), r->gen.finish);
        else i++;
    }
}

/* Compresses a request's cache at a compression point of its prompt
 * (engine thread), then records the next point's window if there is one.
 * Out of memory (or no room in the budget for the next recording) leaves
 * the cache as it is: the request goes on without that compression. */
static void compress_prompt(struct sched *s, struct sreq *r) {
    struct compress_report rep;
    double ahead_ms, rebuild_ms;
    const int ok = compress_reconstruct(compute_run(s), &r->kv, r->prompt, &rebuild_ms) == 0 &&
                   compress_look_ahead(compute_run(s), &r->kv, r->logits, &ahead_ms) == 0 &&
                   compress_apply(&r->kv, &s->m->cfg, s->m->be, model_run_pool(compute_run(s)), &r->params.compress,
                                  &rep) == 0 && rep.applied;
    if (ok) rep.ms += ahead_ms + rebuild_ms;
    kv_cache_forget_observation(&r->kv);
    const int next = compress_next_point(&r->params.compress, r->n_prompt, r->n_prefilled);
    if (next && compress_prepare(&r->kv, &s->m->cfg, &r->params.compress, next) != KV_OK)
        kv_cache_forget_observation(&r->kv);
    if (!ok) return;
    r->timing.compress = rep;
    pthread_mutex_lock(&s->lock);
    struct sched_compress_stats *c = &s->compress[r->params.compress.mode];
    c->requests++;
    c->kept += (uint64_t)rep.kept;
    c->demoted += (uint64_t)rep.demoted;
    c->dropped += (uint64_t)rep.dropped;
    c->bytes_saved += rep.bytes_before > rep.bytes_after ? rep.bytes_before - rep.bytes_after : 0;
    pthread_mutex_unlock(&s->lock);
}

static void finish_list(struct sched *s, struct sreq *list, enum finish_reason why) {
    while (list) {
        struct sreq *next = list->next;
        finish_request(list, why);
        list = next;
    }
}

/* Hands freed memory back to the system when the engine goes idle. KV pages
 * are large blocks freed by the hundred at the end of a busy period, and
 * glibc keeps them if its mmap threshold has risen (after the first large
 * free, later pages come from arenas it trims only at the top): the daemon
 * fixes the threshold (server/memory.c), and this returns what the arenas
 * still hold, so RSS does not stay at its busiest after the load is gone,
 * in the daemon or in any other user of the scheduler. */
static void return_freed_memory(void) {
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

static void *engine_main(void *arg) {
    struct sched *s = arg;
    int busy = 0;   /* work ran since memory was last returned */
    pthread_mutex_lock(&s->lock);
    for (;;) {
        if (busy && !s->stopping && s->n_running == 0 && s->n_waiting == 0 && !s->cancelled_waiting) {
            pthread_mutex_unlock(&s->lock);
            fit_weights(s);   /* the memory of the requests that ended goes back to the weights */
            return_freed_memory();
            busy = 0;
            pthread_mutex_lock(&s->lock);
        }
        while (!s->stopping && s->n_running == 0 && !s->cancelled_waiting && !s->refit &&
               (s->n_waiting == 0 || s->cfg.max_running == 0))
            pthread_cond_wait(&s->wake, &s->lock);
        struct sreq *cancelled = NULL, *evicted = NULL, *failed = NULL;
        if (s->stopping && !s->drain) {
            for (struct sreq *r = s->wait_head; r; r = r->next) atomic_store(&r->stop, SREQ_CANCELLED);
            for (int i = 0; i < s->n_running; i++) atomic_store(&s->running[i]->stop, SREQ_CANCELLED);
        }
        take_cancelled_waiting(s, &cancelled);
        admit(s, &evicted, &failed);
        int done = s->stopping && s->n_running == 0 && s->n_waiting == 0;
        int idle = s->n_running == 0;
        pthread_mutex_unlock(&s->lock);
        finish_list(s, cancelled, FINISH_CANCELLED);
        finish_list(s, evicted, FINISH_EVICTED);
        finish_list(s, failed, FINISH_ERROR);
        if (done) return NULL;
        fit_weights(s);   /* a new share, or the memory of requests that ended */
        if (!idle) {
            step(s);
            busy = 1;
        }
        pthread_mutex_lock(&s->lock);
    }
}

struct sched *sched_create(struct model *m, const struct sched_config *cfg) {
    struct sched *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    if (kv_account_init(&s->account, &m->cfg, cfg->kv_bits ? cfg->kv_bits : 32, cfg->kv_budget_bytes)) {
        free(s);
        return NULL;
    }
    s->account.be = m->be;   /* the caches live where the model computes */
    s->m = m;
    s->cfg = *cfg;
    s->weight_bytes = m->weight_bytes;
    s->stack_bytes = m->stack ? m->stack->resident_bytes : 0;
    s->gm.kv_min_bytes = kv_account_bytes_for(&s->account, 2);   /* one prompt token and one generated */
    /* The configurations: m and its variants, all native (a dense copy
     * cannot give its memory back); the bottom one's stack, used in place,
     * follows the share. */
    s->config_m[s->n_configs++] = m;
    for (int i = 0; i < cfg->n_variants && i < SCHED_MAX_VARIANTS && m->weights != MODEL_WEIGHTS_F32; i++)
        if (cfg->variants[i]->weights != MODEL_WEIGHTS_F32 && !m->stack) s->config_m[s->n_configs++] = cfg->variants[i];
    struct model *bm = s->config_m[s->n_configs - 1];
    s->elastic = bm->stack && bm->weights != MODEL_WEIGHTS_F32;
    s->gm.fixed_bytes = bm->weight_bytes;
    if (s->elastic) {
        s->gm.stack_min_bytes = bitstack_min_bytes(bm->stack);
        s->gm.stack_full_bytes = bitstack_full_bytes(bm->stack);
        s->gm.fixed_bytes = bm->weight_bytes - bm->stack->resident_bytes;
    }
    s->gm.n_rungs = s->n_configs - 1;
    for (int i = 0; i < s->gm.n_rungs; i++) s->gm.rung_bytes[i] = s->config_m[i]->weight_bytes;
    if (s->n_configs > 1 && s->elastic) {
        /* Until a budget says otherwise the model computes with its own
         * weights; the variant's stack holds nothing. */
        fit_in_place(bm, 0);
        s->stack_bytes = 0;
    }
    if (s->cfg.max_running <= 0) s->cfg.max_running = 1;
    if (s->cfg.max_running > MODEL_MAX_BATCH) s->cfg.max_running = MODEL_MAX_BATCH;
    if (s->cfg.max_ctx <= 0 || s->cfg.max_ctx > m->cfg.n_ctx_train) s->cfg.max_ctx = m->cfg.n_ctx_train;
    s->running = calloc((size_t)s->cfg.max_running, sizeof *s->running);
    s->batch = calloc((size_t)s->cfg.max_running, sizeof *s->batch);
    s->batch_req = calloc((size_t)s->cfg.max_running, sizeof *s->batch_req);
    int runs_ok = 1;
    for (int i = 0; i < s->n_configs; i++) runs_ok &= (s->config_run[i] = model_run_new(s->config_m[i], cfg->threads)) != NULL;
    s->run = s->config_run[0];
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    if (!s->running || !s->batch || !s->batch_req || !runs_ok || pthread_create(&s->thread, NULL, engine_main, s)) {
        pthread_cond_destroy(&s->wake);
        pthread_mutex_destroy(&s->lock);
        kv_account_destroy(&s->account);
        for (int i = 0; i < s->n_configs; i++) model_run_free(s->config_run[i]);
        free(s->running); free(s->batch); free(s->batch_req);
        free(s);
        return NULL;
    }
    return s;
}

void sched_destroy(struct sched *s, int drain) {
    if (!s) return;
    pthread_mutex_lock(&s->lock);
    s->stopping = 1;
    s->drain = drain;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    while (s->cached) cache_free(cache_unlink(s, &s->cached));
    pthread_cond_destroy(&s->wake);
    pthread_mutex_destroy(&s->lock);
    kv_account_destroy(&s->account);
    for (int i = 0; i < s->n_configs; i++) model_run_free(s->config_run[i]);
    free(s->running);
    free(s->batch);
    free(s->batch_req);
    free(s->verify_rows);
    free(s);
}
