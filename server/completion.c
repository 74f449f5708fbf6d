/* A completion's lifecycle; the contract and the ownership rule are in
 * completion.h.
 *
 * Each choice is one scheduler request; its callbacks reach the loop through
 * the bridge as events addressed to the choice's slot (struct choice_slot,
 * whose first member is the bridge target). The HTTP side is c->req while the
 * request is open, NULL once it has been completed.
 *
 * What each event does in each state (-- : cannot happen):
 *
 *   event                 NEW                 RUNNING                      DRAINING
 *   --------------------  ------------------  ---------------------------  -------------------
 *   submit: all in        start the stream,   --                           --
 *                         watch for abort;
 *                         -> RUNNING
 *   submit: one refused   answer the error,   --                           --
 *                         cancel those in,
 *                         the rest count as
 *                         done; -> DRAINING
 *   token                 --                  metrics, append, stream it   metrics only
 *   choice done (not      --                  metrics, stream its finish   metrics
 *     the last)
 *   last choice done      --                  send the response or the     metrics; free
 *                                             stream's tail; free
 *   client gone           --                  cancel the choices, give     --
 *                                             the request back;
 *                                             -> DRAINING
 *   cancel (operator,     --                  ask the engine to stop the   same (harmless)
 *     model unloaded)                         choices still running
 *
 * A completion is freed in one place, settle(), on reaching DRAINING with
 * every choice done; "last choice done" in RUNNING first completes the
 * request (-> DRAINING) and then settles. Every completion is on the
 * daemon's in-flight list (d->completions) from completion_new to its free,
 * which is how an operator's cancel finds it by id and how shutdown knows
 * when the last one is gone (daemon_maybe_finish).
 *
 * Seeds: a request without one gets a fresh xorshift value from the daemon's
 * seed state, seeded from the clock on first use.
 */
#include "server/completion.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/tokenizer.h"
#include "server/daemon.h"
#include "server/openai.h"

enum completion_state { COMPLETION_NEW, COMPLETION_RUNNING, COMPLETION_DRAINING };

struct choice_slot {
    struct bridge_target bt;      /* first: the bridge finds its queue here */
    struct completion *c;
    int index;
    uint64_t sched_id;
    bool submitted, done;
    int n_tokens;                 /* token events received */
    double last_token_t;
    int drafted, accepted;        /* speculative decoding, from the engine's done event */
    int cached;                   /* prompt tokens the prompt cache spared it, likewise */
    struct compress_report compress;  /* context compression, likewise */
    double prefill_s, decode_s;   /* admission to the first token, and to the last */
    double grammar_s;             /* constrained decoding's masking */
};

struct completion {
    struct completion *next;      /* the daemon's in-flight list */
    enum completion_state state;
    struct daemon *d;
    struct served_model *sm;      /* referenced */
    struct http_request *req;     /* NULL once completed (DRAINING) */
    uint64_t request_id;
    struct oai_request r;
    struct oai_meta meta;
    char id[64];
    struct oai_choice *choices;
    struct choice_slot *slots;
    int n_choices, n_done;
    int prompt_tokens;            /* usage: once per prompt */
    float *embeddings;            /* embeddings: one row of n_embd per choice, written by the engine */
    int n_embd;
    bool streaming;
    char error[256];
};

/* ------------------------------------------------------------ lifetime */

static void completion_free(struct completion *c) {
    struct daemon *d = c->d;
    for (struct completion **p = &d->completions; *p; p = &(*p)->next)
        if (*p == c) { *p = c->next; break; }
    for (int i = 0; i < c->n_choices; i++) oai_choice_free(&c->choices[i]);
    free(c->choices);
    free(c->slots);
    free(c->embeddings);
    oai_request_free(&c->r);
    served_unref(c->sm);
    free(c);
    daemon_maybe_finish(d);
}

/* The one place a completion is freed: the request is completed and every
 * choice has reported done. */
static void settle(struct completion *c) {
    if (c->state == COMPLETION_DRAINING && c->n_done == c->n_choices) completion_free(c);
}

/* The request has been completed (answered, or given back after the client
 * left): from now on nothing is sent. */
static void request_completed(struct completion *c) {
    c->req = NULL;
    c->state = COMPLETION_DRAINING;
}

void completion_cancel(struct completion *c) {
    for (int i = 0; i < c->n_choices; i++)
        if (c->slots[i].submitted && !c->slots[i].done && c->sm->sched) sched_cancel(c->sm->sched, c->slots[i].sched_id);
}

void completion_cancel_model(struct served_model *sm) {
    for (struct completion *c = sm->d->completions; c; c = c->next)
        if (c->sm == sm) completion_cancel(c);
}

struct completion *completion_find(struct daemon *d, uint64_t request_id) {
    for (struct completion *c = d->completions; c; c = c->next)
        if (c->request_id == request_id) return c;
    return NULL;
}

const char *completion_id(const struct completion *c) { return c->id; }

static void on_client_gone(struct http_request *req, void *arg) {
    struct completion *c = arg;
    completion_cancel(c);
    if (c->streaming) http_stream_end(req);
    else http_respond(req, 500, NULL, NULL, 0);   /* sends nothing: the client is gone */
    request_completed(c);
    settle(c);
}

/* ------------------------------------------------------------ responses */

/* Sends SSE text built by an oai_* builder, if the client is there, and
 * frees it. */
static void stream_send(struct completion *c, char *events, size_t len) {
    if (events && len && c->req) http_stream_write(c->req, events, len);
    free(events);
}

/* Every choice is done: send what is left and complete the HTTP request. */
static void finish_response(struct completion *c) {
    struct oai_usage usage = {.prompt_tokens = c->prompt_tokens};
    bool error = false, evicted = false;
    const int per_prompt = c->r.kind == OAI_CHAT ? c->n_choices : c->r.n;
    for (int i = 0, most = 0; i < c->n_choices; i++) {
        const struct choice_slot *s = &c->slots[i];
        if (s->cached > most) most = s->cached;
        if ((i + 1) % per_prompt == 0 || i + 1 == c->n_choices) {   /* a prompt's last choice */
            usage.cached_tokens += most;
            most = 0;
        }
        usage.completion_tokens += s->n_tokens;
        usage.draft_tokens += s->drafted;
        usage.accepted_draft_tokens += s->accepted;
        if (s->compress.applied) {
            usage.compressed++;
            usage.kept_tokens += s->compress.kept;
            usage.demoted_tokens += s->compress.demoted;
            usage.dropped_tokens += s->compress.dropped;
            usage.kv_bytes_full += (double)s->compress.bytes_before;
            usage.kv_bytes_compressed += (double)s->compress.bytes_after;
        }
        usage.grammar_ms += s->grammar_s * 1e3;
        if (s->prefill_s * 1e3 > usage.prompt_ms) usage.prompt_ms = s->prefill_s * 1e3;
        if (s->decode_s * 1e3 > usage.predicted_ms) usage.predicted_ms = s->decode_s * 1e3;
        error |= c->choices[i].finish == FINISH_ERROR || c->choices[i].finish == FINISH_EVICTED;
        evicted |= c->choices[i].finish == FINISH_EVICTED;
    }
    size_t len = 0;
    /* The budget shrank below what a choice needs: worth a retry (a new
     * request gets a context that fits), and not a bug. */
    const bool not_admitted = evicted && !*c->error;
    static const char not_admitted_msg[] = "the request no longer fits the memory budget, which shrank after it "
                                           "started; a new request gets a context that fits";
    if (c->streaming) {
        if (error) {
            struct oai_error e;
            if (not_admitted) oai_error_set(&e, 503, "unavailable_error", NULL, "%s", not_admitted_msg);
            else oai_error_set(&e, 500, "server_error", NULL, "%s", *c->error ? c->error : "generation failed");
            char *events = oai_stream_error(&e, &len);
            stream_send(c, events, len);
        } else if (c->meta.include_usage) {
            char *events = oai_stream_usage(&c->meta, &usage, &len);
            stream_send(c, events, len);
        }
        http_stream_write(c->req, OAI_SSE_DONE, strlen(OAI_SSE_DONE));
        http_stream_end(c->req);
    } else if (not_admitted) {
        http_add_header(c->req, "Retry-After", "1");
        http_respond_error(c->req, 503, "unavailable_error", not_admitted_msg, NULL);
    } else if (error) {
        http_respond_error(c->req, 500, "server_error", *c->error ? c->error : "generation failed", NULL);
    } else {
        char *body = c->embeddings ? oai_embedding_response(c->sm->name, c->embeddings, c->n_choices, c->n_embd,
                                                            c->r.base64, c->prompt_tokens, &len)
                                   : oai_response(&c->meta, c->choices, c->n_choices, &usage, &len);
        if (body) http_respond(c->req, 200, "application/json", body, len);
        else http_respond_error(c->req, 500, "server_error", "out of memory building the response", NULL);
        free(body);
    }
    request_completed(c);
}

static void shutdown_one(struct completion *c) {
    static const char why[] = "the server is shutting down: the completion was cut off before it finished";
    struct http_request *req = c->req;
    completion_cancel(c);
    if (c->streaming) {
        size_t len = 0;
        for (int i = 0; i < c->n_choices; i++) {
            if (c->slots[i].done) continue;
            c->choices[i].finish = FINISH_CANCELLED;
            char *chunk = oai_stream_chunk(&c->meta, &c->choices[i], &len);
            stream_send(c, chunk, len);
        }
        struct oai_error e;
        oai_error_set(&e, 503, "unavailable_error", NULL, "%s", why);
        char *event = oai_stream_error(&e, &len);
        stream_send(c, event, len);
        http_stream_write(req, OAI_SSE_DONE, strlen(OAI_SSE_DONE));
        http_stream_end(req);
    } else {
        http_add_header(req, "Retry-After", "1");
        http_respond_error(req, 503, "unavailable_error", why, NULL);
    }
    request_completed(c);
}

void completion_shutdown_all(struct daemon *d) {
    for (struct completion *c = d->completions, *next; c; c = next) {
        next = c->next;
        if (c->state == COMPLETION_RUNNING) shutdown_one(c);
    }
    /* settle() frees a completion once its choices report done: that comes
     * through the bridge, after the cancellations above. */
}

/* ------------------------------------------------------------ engine events */

/* A token's alternatives as the choice records them. */
static int alts_of(const struct served_model *sm, const struct bridge_event *ev, struct oai_alt *alts) {
    for (int i = 0; i < ev->n_top; i++) {
        alts[i].piece = tokenizer_piece(sm->model.tok, ev->top_id[i], &alts[i].len);
        if (!alts[i].piece) alts[i].piece = "", alts[i].len = 0;
        alts[i].logprob = ev->top_logprob[i];
    }
    return ev->n_top;
}

static void deliver_prompt_token(struct completion *c, struct oai_choice *ch, const struct bridge_event *ev) {
    if (c->state != COMPLETION_RUNNING) return;
    struct oai_alt alts[SAMPLER_MAX_TOP];
    const int n = alts_of(c->sm, ev, alts);
    size_t plen;
    const char *piece = tokenizer_piece(c->sm->model.tok, ev->id, &plen);
    if (oai_choice_add_token(ch, piece ? piece : "", piece ? plen : 0, ev->logprob, alts, n)) {
        snprintf(c->error, sizeof c->error, "the prompt's log-probabilities exceed the response size limit");
        ch->finish = FINISH_ERROR;
    }
}

static void deliver_token(struct choice_slot *slot, struct bridge_event *ev) {
    struct completion *c = slot->c;
    struct served_model *sm = c->sm;
    struct oai_choice *ch = &c->choices[slot->index];
    if (ev->prompt) {   /* echo with logprobs: the prompt's tokens, ahead of the generated ones */
        deliver_prompt_token(c, ch, ev);
        return;
    }
    slot->n_tokens++;
    metric_series_inc(sm->m_gen_tokens, 1);
    if (slot->last_token_t > 0) metric_series_observe(sm->m_itl, ev->t - slot->last_token_t);
    slot->last_token_t = ev->t;
    if (c->state != COMPLETION_RUNNING) return;   /* client gone: nothing to build */
    int rc = 0;
    if (ch->logprobs) {
        struct oai_alt alts[SAMPLER_MAX_TOP];
        const int n = alts_of(sm, ev, alts);
        size_t plen;
        const char *piece = tokenizer_piece(sm->model.tok, ev->id, &plen);
        rc |= oai_choice_add_token(ch, piece ? piece : "", piece ? plen : 0, ev->logprob, alts, n);
    }
    rc |= oai_choice_add_text(ch, ev->text, ev->len);
    if (rc) {
        /* The output cap: stop generating this choice; it ends as "length". */
        if (!slot->done) sched_cancel(sm->sched, slot->sched_id);
        ch->finish = FINISH_LENGTH;
        return;
    }
    if (c->streaming) {
        size_t len = 0;
        char *events = oai_stream_chunk(&c->meta, ch, &len);
        stream_send(c, events, len);
    }
}

static void deliver_done(struct choice_slot *slot, struct bridge_event *ev) {
    struct completion *c = slot->c;
    struct served_model *sm = c->sm;
    struct oai_choice *ch = &c->choices[slot->index];
    slot->done = true;
    c->n_done++;
    if (ch->finish == FINISH_NONE) ch->finish = ev->finish;
    if (slot->n_tokens != ev->n_generated && ch->finish != FINISH_CANCELLED) {
        /* A token event was lost (out of memory on the engine thread). */
        ch->finish = FINISH_ERROR;
        snprintf(c->error, sizeof c->error, "internal error: %d of %d tokens were delivered", slot->n_tokens,
                 ev->n_generated);
    }
    if (ch->finish == FINISH_ERROR && ev->timing.error[0] && !c->error[0])
        snprintf(c->error, sizeof c->error, "%s", ev->timing.error);
    const char *labels[] = {sm->name, finish_reason_name(ch->finish)};
    metric_inc(c->d->m_finished, labels, 1);
    metric_series_inc(sm->m_prompt_tokens, ev->n_prompt);
    const struct sched_timing *t = &ev->timing;
    slot->drafted = t->drafted;
    slot->cached = t->cached;
    slot->accepted = t->accepted;
    slot->compress = t->compress;
    slot->grammar_s = t->grammar_s;
    if (t->started > 0 && t->first_token >= t->started) {
        slot->prefill_s = t->first_token - t->started;
        slot->decode_s = t->finished - t->first_token;
    }
    if (t->started > 0) metric_series_observe(sm->m_queue, t->started - t->queued);
    if (t->first_token > 0) metric_series_observe(sm->m_ttft, t->first_token - t->queued);
    if (t->compress.applied && t->compress.mode != COMPRESS_OFF)
        metric_series_observe(sm->m_cmp_seconds[t->compress.mode], t->compress.ms / 1e3);
    if (ev->finish != FINISH_CANCELLED) metric_series_observe(sm->m_e2e, t->finished - t->queued);
    if (c->state == COMPLETION_RUNNING && c->streaming && ch->finish != FINISH_ERROR && ch->finish != FINISH_EVICTED) {
        size_t len = 0;
        char *events = oai_stream_chunk(&c->meta, ch, &len);
        stream_send(c, events, len);
    }
    if (c->state == COMPLETION_RUNNING && c->n_done == c->n_choices) finish_response(c);
    settle(c);
}

void completion_deliver(struct bridge_event *ev, void *arg) {
    (void)arg;
    struct choice_slot *slot = ev->target;
    if (ev->kind == BRIDGE_TOKEN) deliver_token(slot, ev);
    else deliver_done(slot, ev);
}

/* ------------------------------------------------------------ starting */

void completion_gen_params(const struct oai_request *r, int choice, uint64_t seed_if_unset, int max_tokens_if_unset,
                           int speculative_if_unset, struct gen_params *out) {
    memset(out, 0, sizeof *out);
    sampler_params_default(&out->sampling);   /* fields the API has no say in (repeat window) */
    out->sampling.temperature = r->temperature;
    out->sampling.top_p = r->top_p;
    out->sampling.top_k = r->top_k < 0 ? 0 : r->top_k;
    out->sampling.min_p = r->min_p;
    out->sampling.repeat_penalty = r->repetition_penalty;
    out->sampling.presence_penalty = r->presence_penalty;
    out->sampling.frequency_penalty = r->frequency_penalty;
    out->sampling.bias = r->logit_bias;
    out->sampling.n_bias = r->n_logit_bias;
    out->sampling.seed = (r->has_seed ? (uint64_t)r->seed : seed_if_unset) + (uint64_t)choice;
    out->max_tokens = r->max_tokens > 0 ? r->max_tokens : max_tokens_if_unset;
    out->stops = (const char *const *)r->stops;
    out->n_stops = r->n_stops;
    out->logprobs = r->logprobs;
    out->top_logprobs = r->logprobs ? r->top_logprobs : 0;
    out->prompt_logprobs = r->echo && r->logprobs && r->kind == OAI_COMPLETION;
    out->ignore_eos = r->ignore_eos;
    out->min_tokens = r->min_tokens;
    out->stop_ids = r->stop_ids;
    out->n_stop_ids = r->n_stop_ids;
    out->speculative = r->speculative >= 0 ? r->speculative : speculative_if_unset;
    out->cache_prompt = r->cache_prompt;
}

void completion_compress_params(const struct oai_request *r, const struct ebb_config *cfg,
                                struct compress_params *out) {
    *out = compress_defaults();
    out->mode = (enum compress_mode)(r->compress_mode >= 0 ? r->compress_mode : cfg->context_compression);
    out->budget = r->compress_budget >= 0 ? r->compress_budget : (float)cfg->compression_budget_percent / 100.0f;
    if (r->compress_tokens > 0) out->budget_tokens = r->compress_tokens;
    if (r->compress_low >= 0) out->low_budget = r->compress_low;
    out->min_prompt = r->compress_min_prompt >= 0 ? r->compress_min_prompt : cfg->compression_min_prompt;
    out->select = (enum compress_select)(r->compress_select >= 0 ? r->compress_select : cfg->compression_select);
    if (r->compress_key_bits > 0) out->low_key_bits = r->compress_key_bits;
    out->lookahead = r->compress_lookahead >= 0 ? r->compress_lookahead : cfg->compression_lookahead;
}

static uint64_t fresh_seed(struct daemon *d) {
    uint64_t *state = &d->seed_state;
    if (!*state) *state = (uint64_t)time(NULL) ^ ((uint64_t)uv_hrtime() << 17) ^ 0x9E3779B97F4A7C15ull;
    *state ^= *state << 13; *state ^= *state >> 7; *state ^= *state << 17;
    return *state;
}

struct completion *completion_new(struct daemon *d, struct http_request *req, struct served_model *sm,
                                  struct oai_request *r) {
    struct completion *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->n_choices = oai_n_choices(r);
    c->choices = calloc((size_t)c->n_choices, sizeof *c->choices);
    c->slots = calloc((size_t)c->n_choices, sizeof *c->slots);
    if (!c->choices || !c->slots) {
        free(c->choices); free(c->slots); free(c);
        return NULL;
    }
    if (r->kind == OAI_EMBEDDING) {
        c->n_embd = sm->model.cfg.n_embd;
        if (!(c->embeddings = calloc((size_t)c->n_choices * (size_t)c->n_embd, sizeof(float)))) {
            free(c->choices); free(c->slots); free(c);
            return NULL;
        }
    }
    c->state = COMPLETION_NEW;
    c->d = d;
    c->sm = sm;
    served_ref(sm);
    c->req = req;
    c->request_id = req->id;
    c->r = *r;   /* takes ownership */
    memset(r, 0, sizeof *r);
    c->streaming = c->r.stream;
    oai_format_id(c->id, sizeof c->id, c->r.kind, req->id);
    c->meta = (struct oai_meta){c->r.kind, c->id, sm->name, (int64_t)time(NULL), c->r.include_usage};
    for (int i = 0; i < c->n_choices; i++) {
        oai_choice_init(&c->choices[i], i, c->r.logprobs, c->r.top_logprobs, 0);
        if (c->r.kind == OAI_CHAT && c->r.n_tools && c->r.tool_choice != TOOL_CHOICE_NONE)
            oai_choice_expect_tools(&c->choices[i]);
        c->slots[i] = (struct choice_slot){.bt = {.bridge = &d->bridge}, .c = c, .index = i};
    }
    c->next = d->completions;
    d->completions = c;
    return c;
}

/* Submits every choice; on a refusal answers the error and returns -1
 * (choices already in keep running until cancelled). */
static int submit_choices(struct completion *c, int32_t *const *ids, const int *n_ids) {
    struct served_model *sm = c->sm;
    /* The context a request may use: the model's, or less when the memory
     * budget holds fewer positions for one request alone. Without
     * max_tokens a request gets what is left of that, so it always fits. */
    const int model_ctx = served_max_context(sm);
    const int budget_ctx = sched_context_capacity(sm->sched);
    const int max_ctx = budget_ctx < model_ctx ? budget_ctx : model_ctx;
    const char *limit = budget_ctx < model_ctx ? "the memory budget holds" : "this model's maximum context length is";
    /* Every choice waits in the queue first: more than it holds would be
     * refused with 429 however long the client waited. */
    const int queue = c->d->cfg.queue_length;
    if (queue > 0 && c->n_choices > queue) {
        char msg[256];
        snprintf(msg, sizeof msg, "this request asks for %d completions (prompts times n) and the server queues at "
                 "most %d at a time (queue_length): ask for fewer per request", c->n_choices, queue);
        http_respond_error(c->req, 400, "invalid_request_error", msg, c->r.n_prompts > 1 ? "prompt" : "n");
        return -1;
    }
    uint64_t seed = fresh_seed(c->d);
    int per_prompt = c->r.kind == OAI_CHAT ? c->n_choices : c->r.n;
    for (int i = 0; i < c->n_choices; i++) {
        int p = i / per_prompt;
        int n_prompt = n_ids[p];
        struct gen_params gp;
        completion_gen_params(&c->r, i, seed, max_ctx - n_prompt, c->d->cfg.speculative, &gp);
        completion_compress_params(&c->r, &c->d->cfg, &gp.compress);
        gp.grammar = c->r.grammar;
        gp.grammar_vocab = c->r.grammar ? served_grammar_vocab(sm) : NULL;
        if (c->r.grammar && !gp.grammar_vocab) {
            http_respond_error(c->req, 503, "server_error", "out of memory preparing the grammar's vocabulary", NULL);
            return -1;
        }
        if (c->embeddings) {   /* the prompt only: no token, no drafts, no compression */
            gp.max_tokens = 0;
            gp.speculative = 0;
            gp.compress.mode = COMPRESS_OFF;
            gp.embedding = c->embeddings + (size_t)i * (size_t)c->n_embd;
        }
        if (n_prompt == 0 || (gp.max_tokens < 1 && !c->embeddings) || n_prompt + gp.max_tokens > max_ctx) {
            /* Never a negative count: a prompt that fills the context is
             * too long whatever max_tokens says. */
            char msg[256];
            const int prompt_too_long = n_prompt >= max_ctx;
            if (n_prompt == 0) snprintf(msg, sizeof msg, "the prompt is empty");
            else if (prompt_too_long)
                snprintf(msg, sizeof msg, "%s %d tokens of context for one request and the prompt alone has %d, "
                         "leaving no room for a completion; shorten the prompt", limit, max_ctx, n_prompt);
            else snprintf(msg, sizeof msg, "%s %d tokens of context for one request; the prompt has %d tokens, "
                          "leaving %d for the completion, and max_tokens asks for %d", limit, max_ctx, n_prompt,
                          max_ctx - n_prompt, gp.max_tokens);
            if (c->embeddings && prompt_too_long)
                snprintf(msg, sizeof msg, "%s %d tokens of context for one request and input %d has %d", limit,
                         max_ctx, p, n_prompt);
            const char *param = n_prompt == 0 || prompt_too_long
                                    ? (c->r.kind == OAI_CHAT ? "messages" : oai_prompt_field(c->r.kind))
                                    : "max_tokens";
            http_respond_error_code(c->req, 400, "invalid_request_error",
                                    n_prompt == 0 ? NULL : "context_length_exceeded", msg, param);
            return -1;
        }
        struct sched_request_desc desc = {ids[p], n_prompt, gp, {bridge_on_token, bridge_on_done}, &c->slots[i]};
        enum sched_error e = sched_submit(sm->sched, &desc, &c->slots[i].sched_id);
        if (e != SCHED_OK) {
            /* Never 503 for what no retry can fix (OpenAI clients retry
             * 503s): a request larger than the context or the whole budget. */
            const int invalid = e == SCHED_TOO_LONG || e == SCHED_NEVER_FITS;
            int status = e == SCHED_QUEUE_FULL ? 429 : invalid ? 400 : 503;
            if (status != 400) http_add_header(c->req, "Retry-After", "1");
            http_respond_error_code(c->req, status, invalid ? "invalid_request_error" : "unavailable_error",
                                    invalid ? "context_length_exceeded"
                                    : e == SCHED_QUEUE_FULL ? "rate_limit_exceeded" : NULL, sched_error_message(e),
                                    invalid ? "max_tokens" : NULL);
            return -1;
        }
        c->slots[i].submitted = true;
    }
    return 0;
}

/* Streaming: the head goes out at once, and for chat the role delta too. */
static void start_stream(struct completion *c) {
    http_add_header(c->req, "Cache-Control", "no-cache");
    http_add_header(c->req, "X-Accel-Buffering", "no");
    http_stream_start(c->req, 200, "text/event-stream");
    if (c->r.kind != OAI_CHAT) return;
    for (int i = 0; i < c->n_choices; i++) {
        size_t len = 0;
        char *events = oai_stream_chunk(&c->meta, &c->choices[i], &len);
        stream_send(c, events, len);
    }
}

/* echo: each choice's text starts with its prompt, as the client sent it
 * (token prompts spelt out by the detokenizer). 0, or -1 when out of memory. */
static int echo_prompts(struct completion *c, int32_t *const *ids, const int *n_ids) {
    const struct ebb_tokenizer *tok = c->sm->model.tok;
    const size_t step = tokenizer_detok_buffer(tok);
    char *buf = malloc(step);
    if (!buf) return -1;
    int rc = 0;
    for (int i = 0; i < c->n_choices && !rc; i++) {
        const struct oai_prompt *pr = &c->r.prompts[i / c->r.n];
        struct oai_choice *ch = &c->choices[i];
        if (pr->text) {
            rc = oai_choice_add_text(ch, pr->text, pr->text_len);
            continue;
        }
        struct detok dt;
        detok_init(&dt, tok);
        const int p = i / c->r.n;
        for (int j = 0; j < n_ids[p] && !rc; j++) {
            const size_t n = detok_push(&dt, ids[p][j], buf, step);
            rc = oai_choice_add_text(ch, buf, n);
        }
        if (!rc) rc = oai_choice_add_text(ch, buf, detok_flush(&dt, buf, step));
    }
    free(buf);
    return rc;
}

void completion_submit(struct completion *c, int32_t *const *ids, const int *n_ids) {
    int n_prompts = c->r.kind == OAI_CHAT ? 1 : c->r.n_prompts;
    for (int p = 0; p < n_prompts; p++) c->prompt_tokens += n_ids[p];
    if (c->r.echo && c->r.kind == OAI_COMPLETION && echo_prompts(c, ids, n_ids)) {
        http_respond_error(c->req, 503, "server_error", "could not echo the prompt: out of memory, or the prompt is beyond the response size limit", NULL);
        request_completed(c);
        for (int i = 0; i < c->n_choices; i++) { c->slots[i].done = true; c->n_done++; }
        settle(c);
        return;
    }
    if (submit_choices(c, ids, n_ids)) {
        request_completed(c);   /* answered by submit_choices */
        completion_cancel(c);
        /* Choices never submitted count as done. */
        for (int i = 0; i < c->n_choices; i++)
            if (!c->slots[i].submitted) { c->slots[i].done = true; c->n_done++; }
        settle(c);
        return;
    }
    c->state = COMPLETION_RUNNING;
    struct http_request *req = c->req;
    if (c->streaming) start_stream(c);
    if (http_request_on_abort(req, on_client_gone, c) == HTTP_ERR_GONE) on_client_gone(req, c);
}
