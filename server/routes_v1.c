/* The OpenAI-style API: completions, chat completions, models, tokenize,
 * detokenize, and cancelling a request.
 *
 * A completion request becomes one `struct completion` that lives from the
 * handler until the last of its choices has reported done. Each choice is
 * one scheduler request whose callbacks reach the loop through the bridge as
 * events addressed to that choice's slot. The HTTP side and the engine side
 * end independently:
 *   - the client may go away first (on_abort): every choice is cancelled, the
 *     HTTP request is completed at once (a no-op send that gives it back),
 *     and the completion waits for the engine's done events before freeing;
 *   - the engine may finish first: the response (or the stream's tail) is
 *     sent, and the completion frees itself.
 * So the completion is freed exactly when the HTTP request is completed AND
 * every choice is done, whichever comes last.
 *
 * Tokenizing prompts happens on the loop: it runs at millions of tokens per
 * second, and the body limit bounds it.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/tokenizer.h"
#include "server/daemon.h"
#include "server/log.h"
#include "server/openai.h"

struct choice_slot {
    struct bridge_target bt;      /* first: the bridge finds its queue here */
    struct completion *c;
    int index;
    uint64_t sched_id;
    bool submitted, done;
    int n_tokens;                 /* token events received */
    double last_token_t;
};

struct completion {
    struct completion *next;      /* the daemon's in-flight list */
    struct daemon *d;
    struct served_model *sm;      /* referenced */
    struct http_request *req;     /* NULL once completed */
    uint64_t request_id;
    struct oai_request r;
    struct oai_meta meta;
    char id[64];
    struct oai_choice *choices;
    struct choice_slot *slots;
    int n_choices, n_done;
    int prompt_tokens;            /* usage: once per prompt */
    bool streaming, failed;
    char error[256];
};

static struct completion *inflight;   /* loop thread; requests that can be cancelled by id */

static int served_max_ctx(const struct served_model *sm) {
    int train = sm->model.cfg.n_ctx_train;
    int cfg = sm->d->cfg.max_context;
    return cfg > 0 && cfg < train ? cfg : train;
}

static void respond_oai_error(struct http_request *req, const struct oai_error *e) {
    http_respond_error(req, e->status, e->type, e->message, e->param[0] ? e->param : NULL);
}

/* The model a request names, ready to serve, or an error already sent. */
static struct served_model *model_for(struct daemon *d, struct http_request *req, const char *name) {
    struct served_model *sm = served_find(d, name);
    char msg[1024];
    if (!sm) {
        if (*name) snprintf(msg, sizeof msg, "the model '%.256s' does not exist", name);
        else snprintf(msg, sizeof msg, "no model named in the request and no default model is configured");
        http_respond_error(req, 404, "invalid_request_error", msg, "model");
        return NULL;
    }
    if (sm->state != SERVED_READY) {
        if (sm->state == SERVED_LOADING) {
            http_add_header(req, "Retry-After", "2");
            snprintf(msg, sizeof msg, "the model '%s' is still loading", sm->name);
        } else {
            snprintf(msg, sizeof msg, "the model '%s' failed to load: %.300s", sm->name, sm->error);
        }
        http_respond_error(req, 503, "unavailable_error", msg, "model");
        return NULL;
    }
    return sm;
}

/* Token ids of one prompt: text is tokenized with special tokens parsed (a
 * prompt may carry <|im_start|> markup), with BOS when the model wants it. */
static int prompt_ids(struct served_model *sm, const struct oai_request *r, int p, int32_t **ids) {
    const struct oai_prompt *pr = &r->prompts[p];
    if (pr->tokens || !pr->text) {
        *ids = malloc(((size_t)pr->n_tokens + 1) * sizeof(int32_t));
        if (!*ids) return -1;
        if (pr->n_tokens) memcpy(*ids, pr->tokens, (size_t)pr->n_tokens * sizeof(int32_t));
        return pr->n_tokens;
    }
    return tokenizer_encode_with_bos(sm->model.tok, pr->text, pr->text_len, 1, r->add_special_tokens, ids);
}

/* Chat messages through the model's template, then tokenized. */
static int chat_ids(struct served_model *sm, const struct oai_request *r, int add_generation_prompt, int32_t **ids) {
    struct chat_msg *msgs = calloc((size_t)r->n_messages, sizeof *msgs);
    if (!msgs) return -1;
    for (int i = 0; i < r->n_messages; i++)
        msgs[i] = (struct chat_msg){oai_role_name(r->messages[i].role), r->messages[i].content};
    char *text = chat_render(sm->model.tok, msgs, r->n_messages, add_generation_prompt);
    free(msgs);
    if (!text) return -1;
    int n = tokenizer_encode(sm->model.tok, text, strlen(text), 1, ids);
    free(text);
    return n;
}

/* ------------------------------------------------------------ lifetime */

static void completion_free(struct completion *c) {
    for (struct completion **p = &inflight; *p; p = &(*p)->next)
        if (*p == c) { *p = c->next; break; }
    struct daemon *d = c->d;
    for (int i = 0; i < c->n_choices; i++) oai_choice_free(&c->choices[i]);
    free(c->choices);
    free(c->slots);
    oai_request_free(&c->r);
    served_unref(c->sm);
    free(c);
    daemon_maybe_finish(d);
}

static void maybe_free(struct completion *c) {
    if (!c->req && c->n_done == c->n_choices) completion_free(c);
}

static void cancel_choices(struct completion *c) {
    for (int i = 0; i < c->n_choices; i++)
        if (c->slots[i].submitted && !c->slots[i].done && c->sm->sched) sched_cancel(c->sm->sched, c->slots[i].sched_id);
}

static void on_client_gone(struct http_request *req, void *arg) {
    struct completion *c = arg;
    cancel_choices(c);
    if (c->streaming) http_stream_end(req);
    else http_respond(req, 500, NULL, NULL, 0);   /* sends nothing: the client is gone */
    c->req = NULL;
    maybe_free(c);
}

/* Sends SSE text built by an oai_* builder, if the client is there, and
 * frees it. */
static void stream_send(struct completion *c, char *events, size_t len) {
    if (events && len && c->req) http_stream_write(c->req, events, len);
    free(events);
}

/* Every choice is done: send what is left and complete the HTTP request. */
static void finish_response(struct completion *c) {
    if (!c->req) return;
    struct oai_usage usage = {c->prompt_tokens, 0};
    bool error = c->failed;
    for (int i = 0; i < c->n_choices; i++) {
        usage.completion_tokens += c->slots[i].n_tokens;
        error |= c->choices[i].finish == FINISH_ERROR;
    }
    size_t len = 0;
    if (c->streaming) {
        if (error) {
            struct oai_error e;
            oai_error_set(&e, 500, "server_error", NULL, "%s", *c->error ? c->error : "generation failed");
            char *events = oai_stream_error(&e, &len);
            stream_send(c, events, len);
        } else if (c->meta.include_usage) {
            char *events = oai_stream_usage(&c->meta, &usage, &len);
            stream_send(c, events, len);
        }
        http_stream_write(c->req, OAI_SSE_DONE, strlen(OAI_SSE_DONE));
        http_stream_end(c->req);
    } else if (error && usage.completion_tokens == 0 && !*c->error) {
        /* Failed before any token: the scheduler could not admit it (the
         * budget shrank below it, or memory ran out). Worth a retry. */
        http_add_header(c->req, "Retry-After", "1");
        http_respond_error(c->req, 503, "unavailable_error",
                           "the request could not be admitted: it no longer fits the memory budget", NULL);
    } else if (error) {
        http_respond_error(c->req, 500, "server_error", *c->error ? c->error : "generation failed", NULL);
    } else {
        char *body = oai_response(&c->meta, c->choices, c->n_choices, &usage, &len);
        if (body) http_respond(c->req, 200, "application/json", body, len);
        else http_respond_error(c->req, 500, "server_error", "out of memory building the response", NULL);
        free(body);
    }
    c->req = NULL;
}

/* ------------------------------------------------------------ engine events */

static void deliver_token(struct choice_slot *slot, struct bridge_event *ev) {
    struct completion *c = slot->c;
    struct served_model *sm = c->sm;
    struct oai_choice *ch = &c->choices[slot->index];
    slot->n_tokens++;
    metric_series_inc(sm->m_gen_tokens, 1);
    if (slot->last_token_t > 0) metric_series_observe(sm->m_itl, ev->t - slot->last_token_t);
    slot->last_token_t = ev->t;
    if (!c->req) return;   /* client gone: nothing to build */
    int rc = 0;
    if (ch->logprobs) {
        size_t plen;
        const char *piece = tokenizer_piece(sm->model.tok, ev->id, &plen);
        rc |= oai_choice_add_token(ch, piece ? piece : "", piece ? plen : 0, ev->logprob);
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
    const char *labels[] = {sm->name, finish_reason_name(ch->finish)};
    metric_inc(c->d->m_finished, labels, 1);
    metric_series_inc(sm->m_prompt_tokens, ev->n_prompt);
    const struct sched_timing *t = &ev->timing;
    if (t->started > 0) metric_series_observe(sm->m_queue, t->started - t->queued);
    if (t->first_token > 0) metric_series_observe(sm->m_ttft, t->first_token - t->queued);
    if (ev->finish != FINISH_CANCELLED) metric_series_observe(sm->m_e2e, t->finished - t->queued);
    if (c->req && c->streaming && ch->finish != FINISH_ERROR) {
        size_t len = 0;
        char *events = oai_stream_chunk(&c->meta, ch, &len);
        stream_send(c, events, len);
    }
    if (c->n_done == c->n_choices) finish_response(c);
    maybe_free(c);
}

void routes_deliver(struct bridge_event *ev, void *arg) {
    (void)arg;
    struct choice_slot *slot = ev->target;
    if (ev->kind == BRIDGE_TOKEN) deliver_token(slot, ev);
    else deliver_done(slot, ev);
}

/* ------------------------------------------------------------ completions */

static uint64_t fresh_seed(void) {
    static uint64_t state;
    if (!state) state = (uint64_t)time(NULL) ^ ((uint64_t)uv_hrtime() << 17) ^ 0x9E3779B97F4A7C15ull;
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return state;
}

/* Submits every choice; on failure answers the error and cancels what went
 * in. Returns 0 when all choices are running. */
static int submit_choices(struct completion *c, int32_t **ids, const int *n_ids) {
    struct served_model *sm = c->sm;
    int max_ctx = served_max_ctx(sm);
    uint64_t seed = fresh_seed();
    int per_prompt = c->r.kind == OAI_CHAT ? c->n_choices : c->r.n;
    for (int i = 0; i < c->n_choices; i++) {
        int p = i / per_prompt;
        int n_prompt = n_ids[p];
        struct gen_params gp;
        oai_gen_params(&c->r, i, seed, max_ctx - n_prompt, &gp);
        if (n_prompt == 0 || gp.max_tokens < 1 || n_prompt + gp.max_tokens > max_ctx) {
            char msg[256];
            if (n_prompt == 0) snprintf(msg, sizeof msg, "the prompt is empty");
            else snprintf(msg, sizeof msg, "this model's maximum context length is %d tokens; the prompt has %d "
                          "tokens and max_tokens asks for %d more", max_ctx, n_prompt, gp.max_tokens);
            const char *param = n_prompt == 0 || n_prompt >= max_ctx ? (c->r.kind == OAI_CHAT ? "messages" : "prompt")
                                                                     : "max_tokens";
            http_respond_error(c->req, 400, "invalid_request_error", msg, param);
            return -1;
        }
        struct sched_request_desc desc = {ids[p], n_prompt, gp, {bridge_on_token, bridge_on_done}, &c->slots[i]};
        enum sched_error e = sched_submit(sm->sched, &desc, &c->slots[i].sched_id);
        if (e != SCHED_OK) {
            int status = e == SCHED_QUEUE_FULL ? 429 : e == SCHED_TOO_LONG ? 400 : 503;
            if (status != 400) http_add_header(c->req, "Retry-After", "1");
            http_respond_error(c->req, status, status == 400 ? "invalid_request_error" : "unavailable_error",
                               sched_error_message(e), status == 400 ? "max_tokens" : NULL);
            return -1;
        }
        c->slots[i].submitted = true;
    }
    return 0;
}

static struct completion *completion_new(struct daemon *d, struct http_request *req, struct served_model *sm,
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
        oai_choice_init(&c->choices[i], i, c->r.logprobs, 0);
        c->slots[i] = (struct choice_slot){{&d->bridge}, c, i, 0, false, false, 0, 0};
    }
    c->next = inflight;
    inflight = c;
    return c;
}

/* Shared by /v1/completions and /v1/chat/completions once parsed. */
static void run_completion(struct daemon *d, struct http_request *req, struct oai_request *r) {
    struct served_model *sm = model_for(d, req, r->model);
    struct oai_error err;
    if (!sm) { oai_request_free(r); return; }
    if (oai_check_token_ids(r, sm->model.cfg.n_vocab, &err)) {
        respond_oai_error(req, &err);
        oai_request_free(r);
        return;
    }
    int n_prompts = r->kind == OAI_CHAT ? 1 : r->n_prompts;
    int32_t **ids = calloc((size_t)n_prompts, sizeof *ids);
    int *n_ids = calloc((size_t)n_prompts, sizeof *n_ids);
    int ok = ids && n_ids;
    for (int p = 0; ok && p < n_prompts; p++) {
        n_ids[p] = r->kind == OAI_CHAT ? chat_ids(sm, r, 1, &ids[p]) : prompt_ids(sm, r, p, &ids[p]);
        ok = n_ids[p] >= 0;
    }
    struct completion *c = ok ? completion_new(d, req, sm, r) : NULL;
    if (!c) {
        http_respond_error(req, 500, "server_error", "out of memory preparing the prompt", NULL);
    } else {
        for (int p = 0; p < n_prompts; p++) c->prompt_tokens += n_ids[p];
        if (submit_choices(c, ids, n_ids)) {
            c->failed = true;
            c->req = NULL;   /* answered by submit_choices */
            cancel_choices(c);
            /* Choices never submitted count as done. */
            for (int i = 0; i < c->n_choices; i++)
                if (!c->slots[i].submitted) { c->slots[i].done = true; c->n_done++; }
            maybe_free(c);
        } else {
            if (c->streaming) {
                http_add_header(req, "Cache-Control", "no-cache");
                http_add_header(req, "X-Accel-Buffering", "no");
                http_stream_start(req, 200, "text/event-stream");
                if (c->r.kind == OAI_CHAT)   /* the role delta goes out at once */
                    for (int i = 0; i < c->n_choices; i++) {
                        size_t len = 0;
                        char *events = oai_stream_chunk(&c->meta, &c->choices[i], &len);
                        stream_send(c, events, len);
                    }
            }
            if (http_request_on_abort(req, on_client_gone, c) == HTTP_ERR_GONE) on_client_gone(req, c);
        }
    }
    for (int p = 0; ids && p < n_prompts; p++) free(ids[p]);
    free(ids);
    free(n_ids);
    oai_request_free(r);
}

void route_completions(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    struct oai_error err;
    if (openai_parse_completion(req->body, req->body_len, &r, &err)) {
        respond_oai_error(req, &err);
        return;
    }
    run_completion(d, req, &r);
}

void route_chat_completions(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    struct oai_error err;
    if (openai_parse_chat(req->body, req->body_len, &r, &err)) {
        respond_oai_error(req, &err);
        return;
    }
    run_completion(d, req, &r);
}

/* ------------------------------------------------------------ the rest */

void route_models(struct daemon *d, struct http_request *req) {
    int n = 0;
    for (struct served_model *sm = d->models; sm; sm = sm->next) n++;   /* an upper bound */
    const char **names = calloc((size_t)n + 1, sizeof *names);
    int64_t *created = calloc((size_t)n + 1, sizeof *created);
    char *body = NULL;
    size_t len = 0;
    if (names && created) {
        int i = 0;
        for (struct served_model *sm = d->models; sm; sm = sm->next) {
            if (sm->state != SERVED_READY) continue;   /* listed once it can answer */
            names[i] = sm->name;
            created[i++] = sm->created;
        }
        body = oai_models_response(names, created, i, &len);
    }
    if (body) http_respond(req, 200, "application/json", body, len);
    else http_respond_error(req, 500, "server_error", "out of memory", NULL);
    free(body);
    free(names);
    free(created);
}

void route_tokenize(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    struct oai_error err;
    if (openai_parse_tokenize(req->body, req->body_len, &r, &err)) {
        respond_oai_error(req, &err);
        return;
    }
    struct served_model *sm = model_for(d, req, r.model);
    if (!sm) { oai_request_free(&r); return; }
    int32_t *ids = NULL;
    int n = r.n_messages ? chat_ids(sm, &r, r.add_generation_prompt, &ids) : prompt_ids(sm, &r, 0, &ids);
    const char **pieces = NULL;
    size_t *plens = NULL;
    if (n >= 0 && r.return_token_strs) {
        pieces = calloc((size_t)n + 1, sizeof *pieces);
        plens = calloc((size_t)n + 1, sizeof *plens);
        for (int i = 0; pieces && plens && i < n; i++) pieces[i] = tokenizer_piece(sm->model.tok, ids[i], &plens[i]);
    }
    size_t len = 0;
    char *body = n >= 0 && (!r.return_token_strs || (pieces && plens))
                     ? oai_tokenize_response(ids, n, served_max_ctx(sm), pieces, plens, &len) : NULL;
    if (body) http_respond(req, 200, "application/json", body, len);
    else http_respond_error(req, 500, "server_error", "out of memory", NULL);
    free(body);
    free(pieces);
    free(plens);
    free(ids);
    oai_request_free(&r);
}

void route_detokenize(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    struct oai_error err;
    if (openai_parse_detokenize(req->body, req->body_len, &r, &err)) {
        respond_oai_error(req, &err);
        return;
    }
    struct served_model *sm = model_for(d, req, r.model);
    if (!sm) { oai_request_free(&r); return; }
    if (oai_check_token_ids(&r, sm->model.cfg.n_vocab, &err)) {
        respond_oai_error(req, &err);
        oai_request_free(&r);
        return;
    }
    const struct oai_prompt *p = r.n_prompts ? &r.prompts[0] : NULL;
    int n = p ? p->n_tokens : 0;
    size_t step = tokenizer_detok_buffer(sm->model.tok);
    size_t cap = step * ((size_t)n + 1), used = 0;
    char *text = malloc(cap);
    char *body = NULL;
    size_t len = 0;
    if (text) {
        struct detok dt;
        detok_init(&dt, sm->model.tok);
        for (int i = 0; i < n; i++) used += detok_push(&dt, p->tokens[i], text + used, cap - used);
        used += detok_flush(&dt, text + used, cap - used);
        body = oai_detokenize_response(text, used, &len);
    }
    if (body) http_respond(req, 200, "application/json", body, len);
    else http_respond_error(req, 500, "server_error", "out of memory", NULL);
    free(body);
    free(text);
    oai_request_free(&r);
}

void routes_cancel_model(struct served_model *sm) {
    for (struct completion *c = inflight; c; c = c->next)
        if (c->sm == sm) cancel_choices(c);
}

bool routes_idle(void) { return inflight == NULL; }

void route_cancel_request(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    const char *id_text = req->path + strlen("/v1/requests/");
    uint64_t id;
    if (oai_parse_id(id_text, &id)) {
        http_respond_error(req, 400, "invalid_request_error",
                           "a request id looks like cmpl-42, chatcmpl-42 or 42", "id");
        return;
    }
    for (struct completion *c = inflight; c; c = c->next) {
        if (c->request_id != id) continue;
        cancel_choices(c);
        respond_json(req, 200, json_pack("{s:s, s:s, s:b}", "id", c->id, "object", "request", "cancelled", 1));
        log_info("request cancelled by an operator", "request_id=%llu", (unsigned long long)id);
        return;
    }
    char msg[128];
    snprintf(msg, sizeof msg, "no request %llu is running", (unsigned long long)id);
    http_respond_error(req, 404, "not_found_error", msg, "id");
}
