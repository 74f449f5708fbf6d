/* The daemon's shared state and the pieces of `ebb serve`.
 *
 *   cmd_serve.c       the command line: configuration, then daemon_run
 *   daemon.c          lifecycle: start-up, signals, the shutdown drain
 *   routes.c          the route table, dispatch, the access log and request
 *                     metrics, /health and /ready
 *   daemon_metrics.c  every metric family the daemon exports (one table), /metrics
 *   served_models.c   models being served: loading off the loop, lookup, unloading,
 *                     the memory budget and how it is split
 *   routes_v1.c       the OpenAI-style API (completions, chat, models, tokenize,
 *                     detokenize, request cancellation): thin handlers
 *   completion.c      a completion's lifecycle: its HTTP request and its N engine
 *                     choices, and the one place it is freed
 *   routes_admin.c    token-protected administration (memory budget, catalog models)
 *   routes_debug.c    transport test routes (EBB_TEST_ROUTES=1)
 *   bridge.c          engine threads -> loop thread events
 *
 * Threads: the libuv loop owns sockets, the route handlers and every field
 * here except where a comment says otherwise. Each served model has its own
 * engine thread (its scheduler). Model loading and unloading run on libuv's
 * work pool (uv_queue_work), never on the loop, and so does tokenizing a
 * long prompt (routes_v1.c).
 */
#ifndef EBB_SERVER_DAEMON_H
#define EBB_SERVER_DAEMON_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "engine/model.h"
#include "server/admin_body.h"
#include "server/auth.h"
#include "engine/scheduler.h"
#include "server/bridge.h"
#include "server/config.h"
#include "server/http.h"
#include "server/metrics.h"

struct catalog;

enum served_state { SERVED_LOADING, SERVED_READY, SERVED_FAILED, SERVED_UNLOADING };

struct served_model {
    struct served_model *next;
    char name[129];
    char path[4096];
    enum served_state state;
    char error[1024];             /* why loading failed */
    struct model model;           /* valid when READY */
    /* Files packed from the model that stand in for it when its own
     * weights do not fit its memory share (engine/governor.h's ladder):
     * whole packed files, largest first, then perhaps a BitStack. */
    struct served_variant {
        struct model *model;
        char kind[32];            /* the catalog's: "w4a4", "source-w4a8", "bitstack", ... */
        double perplexity;        /* the catalog's measurement, NaN when it has none */
    } variants[SCHED_MAX_VARIANTS];
    int n_variants;
    struct sched *sched;          /* valid when READY */
    int refs;                     /* the list's own + one per request in flight */
    bool over_budget;             /* FAILED because its weights do not fit the memory budget */
    void (*on_loaded)(struct served_model *sm, void *arg);   /* once it is READY or FAILED */
    void *on_loaded_arg;
    uv_work_t work;
    struct daemon *d;
    int64_t created;              /* unix seconds, for /v1/models */
    struct grammar_vocab *grammar_vocab;   /* built at the first structured-output request */
    /* metric series, labelled by this model */
    struct metric_series *m_running, *m_waiting, *m_kv_bytes, *m_kv_use, *m_weights;
    struct metric_series *m_prompt_tokens, *m_gen_tokens;
    struct metric_series *m_ttft, *m_itl, *m_e2e, *m_queue, *m_preemptions;
    struct metric_series *m_stack_blocks, *m_bpw, *m_grows, *m_shrinks, *m_bytes_loaded, *m_bytes_freed, *m_swap;
    struct metric_series *m_drafts, *m_draft_tokens, *m_accepted, *m_accepted_at[DRAFT_MAX], *m_accepted_mean;
    /* context compression by mode (enum compress_mode: demote and drop) and tier (kept, demoted, dropped) */
    struct metric_series *m_cmp_requests[3], *m_cmp_tokens[3][3], *m_cmp_saved[3], *m_cmp_seconds[3];
    struct metric_series *m_pc_hits, *m_pc_tokens, *m_pc_evictions, *m_pc_entries, *m_pc_bytes;   /* prompt cache */
};

struct daemon {
    uv_loop_t loop;
    struct http_server *http;
    uv_signal_t sigterm, sigint;
    uv_timer_t deadline;          /* shutdown: when unfinished responses are ended */
    bool deadline_live;
    struct ebb_config cfg;
    struct api_keys api_keys;     /* auth.h: read at start */
    struct catalog *catalog;
    struct bridge bridge;
    bool test_routes;
    bool stopping;

    struct served_model *models;  /* list, loop thread */
    struct completion *completions;  /* in flight (completion.c) */
    uint64_t seed_state;          /* xorshift state for requests without a seed */
    int teardowns;                /* models being torn down on the work pool */
    int tokenizing;               /* prompts being tokenized on the work pool (routes_v1.c) */
    bool http_closed, finished;
    uint64_t memory_budget;       /* bytes; 0 = none: the budget applied now */
    struct memory_policy memory;  /* how it is set (memory.c) */
    uv_timer_t memory_timer;      /* "auto"'s readings */
    bool memory_timer_live, memory_clamped;
    uint64_t memory_free_bytes;   /* auto: the last reading */
    const char *memory_free_source;

    /* Metric families, filled by daemon_metrics.c's table: keep
     * DAEMON_N_METRICS equal to the number of struct metric * below. */
    struct metrics *metrics;
    struct metric *m_requests, *m_duration, *m_aborted;
    struct metric *m_conn_open, *m_conn_total, *m_conn_rejected;
    uint64_t seen_accepted, seen_rejected;
    struct metric *m_running, *m_waiting, *m_finished, *m_prompt_tokens, *m_gen_tokens;
    struct metric *m_ttft, *m_itl, *m_e2e, *m_queue;
    struct metric *m_kv_bytes, *m_kv_use, *m_weights, *m_budget, *m_preemptions;
    struct metric *m_minimum, *m_resident, *m_device, *m_stack_blocks, *m_bpw, *m_weight_changes, *m_bytes_loaded,
        *m_bytes_freed, *m_swap;
    struct metric *m_drafts, *m_draft_tokens, *m_accepted, *m_accepted_at, *m_accepted_mean;
    struct metric *m_cmp_requests, *m_cmp_tokens, *m_cmp_saved, *m_cmp_seconds;
    struct metric *m_pc_hits, *m_pc_tokens, *m_pc_evictions, *m_pc_entries, *m_pc_bytes;
};
#define DAEMON_N_METRICS 43

/* ---- daemon.c ---- */
/* Runs the daemon with d->cfg loaded (d zeroed otherwise, and static: libuv
 * handles point into it) until a signal's drain is over. The exit status. */
int daemon_run(struct daemon *d);
/* Shutdown's last step, once the HTTP server has closed, no completion is in
 * flight and every model's teardown is over: closes the bridge and the
 * signal handles so the loop can end. Safe to call at any time. */
void daemon_maybe_finish(struct daemon *d);

/* ---- memory.c ---- */
/* Restores the saved budget policy (unless the configuration sets one for
 * this run) and starts the auto timer. 0, or -1. */
int memory_start(struct daemon *d);
void memory_stop(struct daemon *d);
/* Applies a policy now: a fixed budget, or auto's first reading. 0, or -1
 * with why in err (the budget below the served models' minimum, or the
 * free memory unreadable); nothing changes then. */
int memory_apply(struct daemon *d, const struct memory_policy *p, char *err, size_t errlen);
/* The catalog setting's text for a policy, and back (0, or -1). */
int memory_policy_parse(const char *text, struct memory_policy *p);
/* The process's resident set (/proc/self/statm; 0 when unreadable). */
uint64_t memory_process_rss(void);
/* Has the allocator give large blocks back to the system when they are
 * freed; called once, before any thread starts. */
void memory_allocator_setup(void);
void memory_policy_format(const struct memory_policy *p, char *buf, size_t cap);

/* ---- daemon_metrics.c ---- */
/* Creates d->metrics and every family in it: 0, or -1. */
int daemon_metrics_register(struct daemon *d);

/* ---- routes.c ---- */
/* The http layer's on_request and on_done hooks (arg: the daemon). */
void routes_on_request(struct http_request *req, void *arg);
void routes_on_done(const struct http_done_info *info, void *arg);

/* ---- served_models.c ---- */
/* Starts loading a model (from the catalog entry's path) in the background;
 * it appears in lookups at once, in state LOADING. A model whose weights
 * would leave the memory budget unable to hold one request for every model
 * is refused: FAILED with over_budget set and the numbers in error. on_loaded
 * (may be NULL) is called on the loop once the state is READY or FAILED. */
int served_load(struct daemon *d, const char *name, const char *path, int64_t created,
                void (*on_loaded)(struct served_model *sm, void *arg), void *on_loaded_arg);
/* Finds a model by name (NULL: the default model, else the only one). */
struct served_model *served_find(struct daemon *d, const char *name);
void served_ref(struct served_model *sm);
void served_unref(struct served_model *sm);
/* Removes a model from service: new requests get 404, running ones are
 * cancelled, memory is freed off the loop once the last request has ended. */
void served_unload(struct served_model *sm);
/* True once every model has left LOADING (for /ready: at least one READY). */
bool served_any_ready(struct daemon *d);
/* Applies a memory budget (bytes, 0 = none): checks it (served_budget_check)
 * and gives every model its share (engine/governor.h). 0, or -1 with the
 * check's message. */
int served_set_budget(struct daemon *d, uint64_t bytes, char *err, size_t errlen);
/* 0 when a budget of `bytes` (0: none) serves every loaded model without
 * ending a request; -1 with the parts of the least budget that would, and
 * that number ("give at least N bytes"), in err. */
int served_budget_check(struct daemon *d, uint64_t bytes, char *err, size_t errlen);
uint64_t served_memory_minimum(struct daemon *d);
/* Resident weights of the loaded models, as their engines last fitted them. */
size_t served_weight_bytes(struct daemon *d);
/* The context a request may use: the model's training context, capped by
 * the max_context setting. */
int served_max_context(const struct served_model *sm);
/* The model's vocabulary as grammars see it (engine/grammar.h), built on
 * first use (tens of milliseconds on the loop, once) and kept until the
 * model is unloaded; NULL when out of memory. */
const struct grammar_vocab *served_grammar_vocab(struct served_model *sm);
/* The model's parameters: in its layer matrices, and in all (the embedding
 * and an untied head too), for bits per weight. */
void served_param_counts(const struct served_model *sm, uint64_t *layer, uint64_t *all);
/* The stack whose prefix follows the model's share: the served file's own,
 * or its BitStack variant's; NULL without one. */
const struct bitstack *served_stack(const struct served_model *sm);
/* Refreshes the per-model gauges before /metrics renders. */
void served_refresh_metrics(struct daemon *d);

/* ---- route handlers: routes_v1.c, routes_admin.c, daemon_metrics.c, routes_debug.c ---- */
void route_completions(struct daemon *d, struct http_request *req);
void route_chat_completions(struct daemon *d, struct http_request *req);
void route_embeddings(struct daemon *d, struct http_request *req);
void route_models(struct daemon *d, struct http_request *req);
void route_model(struct daemon *d, struct http_request *req);
void route_tokenize(struct daemon *d, struct http_request *req);
void route_detokenize(struct daemon *d, struct http_request *req);
void route_cancel_request(struct daemon *d, struct http_request *req);
void route_admin_memory_get(struct daemon *d, struct http_request *req);
void route_admin_memory_put(struct daemon *d, struct http_request *req);
void route_admin_models_get(struct daemon *d, struct http_request *req);
void route_admin_models_post(struct daemon *d, struct http_request *req);
void route_admin_models_delete(struct daemon *d, struct http_request *req);
/* 1 if the request carries the admin bearer token; otherwise it has been
 * answered (401, or 403 when admin routes are disabled). */
int admin_authorized(struct daemon *d, struct http_request *req);
void route_metrics(struct daemon *d, struct http_request *req);
void route_debug_echo(struct daemon *d, struct http_request *req);
void route_debug_stream(struct daemon *d, struct http_request *req);

/* Sends a JSON value built with jansson (steals the reference). */
struct json_t;
void respond_json(struct http_request *req, int status, struct json_t *body);
#endif
