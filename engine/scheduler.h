/* The scheduler: continuous batching on the engine thread.
 *
 * One engine thread owns a model, its KV account and every running sequence.
 * Each step it
 *   1. drops sequences that were cancelled (the flag is read here, once a step),
 *   2. admits waiting requests in arrival order while a batch slot is free and
 *      the KV account accepts their first reservation (the prompt and one
 *      more position), each starting from a finished request's kept cache
 *      when its prompt begins with that cache's tokens (the prompt cache,
 *      sched_config.prompt_cache_bytes), then grows each decoding sequence's reservation to
 *      its next position; when the budget is spent the newest running
 *      sequence is preempted: its pages go back, it returns to the head of
 *      the queue and is recomputed when memory frees (its client sees a
 *      pause, never an error),
 *   3. builds one batch: one decode token for every running sequence, then
 *      prompt chunks of sequences still prefilling, up to MODEL_MAX_BATCH,
 *   4. runs model_forward_batch, samples each sequence that reached the end of
 *      its prompt, and reports text and completion through callbacks.
 *
 * Callbacks run on the engine thread and must return quickly: the daemon's
 * callbacks copy the event into a queue and wake its libuv loop. After
 * on_done, the scheduler never touches the request's user data again.
 *
 * The waiting queue is bounded; submit refuses work beyond it so that the
 * caller can answer 429/503 at once instead of queueing without limit.
 */
#ifndef EBB_ENGINE_SCHEDULER_H
#define EBB_ENGINE_SCHEDULER_H
#include <stddef.h>
#include <stdint.h>

#include "engine/draft.h"
#include "engine/generate.h"

struct model;
struct sched;

#define SCHED_MAX_VARIANTS 7   /* packed files one model can stand in for it (sched_config) */

struct sched_config {
    int max_running;          /* sequences decoded together */
    int max_waiting;          /* queue bound */
    int max_ctx;              /* per-sequence context cap (<= model's) */
    size_t kv_budget_bytes;   /* KV cache budget; 0: unlimited */
    int kv_bits;              /* KV cache precision: 32 (or 0), 16, 8, 4 (engine/kv.h) */
    int threads;              /* kernel workers of the engine's run; <= 0: one per core */
    /* Files packed from this model (its shape), each smaller than the one
     * before, the last possibly a BitStack file: computed with instead of
     * the model when its own weights do not fit its memory share
     * (engine/governor.h's ladder). Owned by the caller, like the model;
     * all native. */
    struct model *variants[SCHED_MAX_VARIANTS];
    int n_variants;
    /* Speculating requests verify every draft they find (up to DRAFT_MAX),
     * whether or not the measured costs say it pays: for tests and for
     * measuring a draft source's acceptance. */
    int draft_always;
    /* The prompt cache: KV caches of finished requests (cache_prompt set)
     * kept, up to this many bytes of the KV account, for a later request
     * whose prompt starts with the same tokens -- the next turn of a
     * conversation sends the whole conversation again. It computes only
     * what follows, and its output is the same bit for bit (a position's
     * values depend on the tokens before it alone). At 32 and 16 bits any
     * common prefix is taken; at 8 and 4 bits the prompt must share the
     * kept tokens up to the start of their last page of 64 (only its f32
     * window is still held: kv_cache_truncate_floor), as a conversation's
     * next turn does.
     * Kept caches give way first: to admission, to a decoding sequence's
     * growth (before anyone is preempted), to a lowered budget and to the
     * weights the memory share would keep without them; when the weights
     * change (another rung of the ladder, another stack prefix) every kept
     * cache goes, and a cache computed across the change is not kept. 0: off. */
    size_t prompt_cache_bytes;
};

struct sched_timing {
    double queued, started, first_token, finished;   /* ebb_now_seconds() stamps */
    int drafted, accepted;          /* speculative decoding: tokens drafted, and kept */
    struct compress_report compress;/* context compression (applied 0: none) */
    int cached;                     /* prompt tokens taken from the prompt cache, not computed */
    double grammar_s;               /* constrained decoding: time spent masking the vocabulary */
    char error[192];                /* finished in error: why, when the engine knows (else empty) */
};

struct sched_callbacks {
    /* A generated token and the text it released (may be empty); the
     * token's fields are valid for the call only. */
    void (*on_token)(void *ud, const struct gen_token *tok, double t);
    /* The request is over; text still held was released by the last on_token. */
    void (*on_done)(void *ud, enum finish_reason finish, int n_prompt, int n_generated,
                    const struct sched_timing *timing);
};

/* Owned copy of a request's inputs. */
struct sched_request_desc {
    const int32_t *prompt;
    int n_prompt;
    struct gen_params params;  /* stop strings are copied */
    struct sched_callbacks cb;
    void *ud;
};

enum sched_error {
    SCHED_OK = 0,
    SCHED_QUEUE_FULL = -1,     /* try again later (429) */
    SCHED_TOO_LONG = -2,       /* prompt + max_tokens exceed the context (400) */
    SCHED_NEVER_FITS = -3,     /* prompt + max_tokens need more KV than the whole budget (400) */
    SCHED_NOMEM = -4,
    SCHED_STOPPED = -5         /* shutting down (503) */
};
const char *sched_error_message(enum sched_error e);

struct sched_stats {
    int running, waiting;
    size_t kv_budget_bytes, kv_reserved_bytes, kv_allocated_bytes;
    uint64_t steps, batch_tokens;
    uint64_t preemptions;      /* running sequences sent back to the queue for memory */
    size_t weight_bytes;       /* resident weights: fixed ones and the stack prefix */
    size_t stack_bytes;        /* the BitStack prefix resident (0: no stack, or computing with a whole file) */
    int on_stack;              /* computing with a stack (the model's own, or its variant's) */
    int config;                /* computing with: 0 the model, i its variants[i - 1] */
    uint64_t memory_share;     /* sched_set_memory's share (0: none) */
    uint64_t stack_grows, stack_shrinks;            /* prefix changes, by direction */
    uint64_t stack_bytes_loaded, stack_bytes_freed; /* bytes they added and released */
    /* Speculative decoding (engine/draft.h), n-gram drafts: verification
     * passes with drafts, tokens drafted, kept, and kept at each position. */
    uint64_t drafts, draft_tokens, accepted_tokens, accepted_at[DRAFT_MAX];
    /* Context compression (engine/compress.h), by mode (index enum
     * compress_mode; OFF unused): requests compressed, positions kept,
     * demoted and dropped (per layer and KV head: a position counts once)
     * and KV bytes saved; each request's stage time is in its timing. */
    struct sched_compress_stats {
        uint64_t requests, kept, demoted, dropped, bytes_saved;
    } compress[3];
    /* The prompt cache (sched_config.prompt_cache_bytes): requests that
     * started from a kept cache and the prompt tokens it spared them; caches
     * kept now and their bytes (reserved in the KV account); caches let go
     * for memory or for the cache's own size. */
    uint64_t prompt_cache_hits, prompt_cache_tokens, prompt_cache_evictions;
    int prompt_cache_entries;
    size_t prompt_cache_bytes;
};

/* Starts the engine thread with its own run of the model (engine/model.h).
 * The model stays owned by the caller and must outlive the scheduler; the
 * engine thread changes nothing in it but the resident prefix of a BitStack
 * used in place (sched_set_memory). */
struct sched *sched_create(struct model *m, const struct sched_config *cfg);
/* Stops admitting; with drain, waits for running and waiting requests to
 * finish, else cancels them; then joins the thread and frees. */
void sched_destroy(struct sched *s, int drain);

/* Queues a request (any thread). On success *id identifies it for cancel. */
enum sched_error sched_submit(struct sched *s, const struct sched_request_desc *d, uint64_t *id);
/* Cancels by id (any thread); 0 if found, -1 if unknown or already done. */
int sched_cancel(struct sched *s, uint64_t id);
void sched_get_stats(struct sched *s, struct sched_stats *st);
void sched_set_kv_budget(struct sched *s, size_t bytes);
/* The memory governor's share for this model (engine/governor.h): weights
 * and KV together, 0 for no limit. Sets the KV budget the share leaves and,
 * for a BitStack used in place, makes the engine keep the longest prefix of
 * the stack that fits beside the KV its requests reserve: applied before
 * the next pass, or at once when idle, and again whenever reservations
 * change. Any thread. */
struct governor_model;
void sched_set_memory(struct sched *s, uint64_t share);
/* What the governor needs of this model, with the KV reserved now. */
void sched_governor_model(struct sched *s, struct governor_model *gm);
/* The durations (seconds) of the stack changes since the last call, at
 * most cap of them (older ones beyond the engine's ring are dropped). */
int sched_take_swap_times(struct sched *s, double *out, int cap);
/* KV cache bytes a request of n_ctx positions reserves (any thread: the
 * layout never changes). */
size_t sched_kv_bytes_for(const struct sched *s, int n_ctx);
/* The longest context one request can use now: the scheduler's max_ctx, or
 * less when the KV budget holds fewer positions for a request alone. */
int sched_context_capacity(struct sched *s);
#endif
