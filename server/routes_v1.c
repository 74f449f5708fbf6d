/* The OpenAI-style API: completions, chat completions, embeddings, models,
 * tokenize, detokenize, and cancelling a request.
 *
 * The handlers are thin: openai.c parses and validates the body, the model
 * is looked up, prompts are tokenized, and a completion request is handed to
 * the completion module (completion.h), which owns it from then on -- its
 * choices, its streaming and its one free.
 *
 * Tokenizing a prompt is work proportional to its bytes (10-20 MB/s of
 * ordinary text, 3-8 MB/s at worst: the tokenizer bounds the cost per
 * pre-tokenized piece, TOKENIZER_MAX_PIECE), so an 8 MiB prompt would hold
 * the loop for a second or more. It leaves the loop once the prompts' text exceeds
 * INLINE_TOKENIZE_BYTES: a job (struct prompt_job) goes to libuv's work
 * pool, and the request continues on the loop in its after-work callback.
 * Shorter prompts are tokenized inline (a few milliseconds at most, less
 * than the hop to the pool costs in latency). Either way one job carries
 * the request through, so both paths end in the same code:
 *
 *   route ──parse, model ready──▶ job_start ──short──▶ job_run ─┐
 *                                   │                           ▼
 *                                   └──long: work pool──▶ job_after ──▶ job_finish ──▶ job_free
 *
 * OWNERSHIP of a job -- the rule to remember:
 *   1. The job owns the parsed request, one reference on the served model
 *      (so the model's tokenizer outlives the work even if the model is
 *      removed meanwhile) and, while it is queued, the HTTP request.
 *   2. The work callback reads only the job's parsed request and the
 *      model's read-only tokenizer, and writes only the job's results.
 *   3. A client that leaves while the work is queued or running gives the
 *      HTTP request back at once (on_abort: job->req becomes NULL and the
 *      work is cancelled if it has not started); the job itself is freed
 *      only in the after-work callback, the one place that knows the work
 *      is over. d->tokenizing counts queued jobs, so the daemon's shutdown
 *      waits for them (daemon_maybe_finish).
 *   4. A model removed while its job was queued answers 404, as a request
 *      arriving after the removal would.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "server/completion.h"
#include "server/daemon.h"
#include "server/log.h"
#include "server/openai.h"

static void respond_oai_error(struct http_request *req, const struct oai_error *e) {
    http_respond_error(req, e->status, e->type, e->message, e->param[0] ? e->param : NULL);
}

typedef int (*parse_fn)(const char *body, size_t len, struct oai_request *out, struct oai_error *err);

/* The body through one of openai.c's parsers: 0, or -1 with the 400 sent. */
static int parse_body(struct http_request *req, parse_fn parse, struct oai_request *r) {
    struct oai_error err;
    if (!parse(req->body, req->body_len, r, &err)) return 0;
    respond_oai_error(req, &err);
    return -1;
}

/* Sends JSON built by an oai_*_response builder (NULL: it ran out of
 * memory) and frees it. */
static void respond_built(struct http_request *req, char *body, size_t len) {
    if (body) http_respond(req, 200, "application/json", body, len);
    else http_respond_error(req, 500, "server_error", "out of memory", NULL);
    free(body);
}

/* The model a request names, ready to serve, or an error already sent. */
static struct served_model *model_for(struct daemon *d, struct http_request *req, const char *name) {
    struct served_model *sm = served_find(d, name);
    char msg[1024];
    if (!sm) {
        if (*name) snprintf(msg, sizeof msg, "the model '%.256s' does not exist", name);
        else snprintf(msg, sizeof msg, "no model named in the request and no default model is configured");
        http_respond_error_code(req, 404, "invalid_request_error", "model_not_found", msg, "model");
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

/* Chat messages through the model's template, then tokenized. With tools,
 * their description (server/tools.h) joins the system message, or becomes
 * one ahead of the conversation. */
static int chat_ids(struct served_model *sm, const struct oai_request *r, int add_generation_prompt, int32_t **ids) {
    struct chat_msg *msgs = calloc((size_t)r->n_messages + 1, sizeof *msgs);
    char *block = r->n_tools ? tools_system_block(r->tools, r->n_tools) : NULL, *system = NULL;
    int n = 0;
    if (!msgs || (r->n_tools && !block)) goto fail;
    const bool has_system = r->n_messages > 0 && r->messages[0].role == OAI_ROLE_SYSTEM;
    if (block) {
        const char *before = has_system ? r->messages[0].content : "";
        const size_t len = strlen(before) + strlen(block) + 3;
        if (!(system = malloc(len))) goto fail;
        snprintf(system, len, "%s%s%s", before, *before ? "\n\n" : "", block);
        msgs[n++] = (struct chat_msg){"system", system};
    }
    for (int i = block && has_system ? 1 : 0; i < r->n_messages; i++)
        msgs[n++] = (struct chat_msg){oai_role_name(r->messages[i].role), r->messages[i].content};
    char *text = chat_render(sm->model.tok, msgs, n, add_generation_prompt);
    free(msgs);
    free(block);
    free(system);
    if (!text) return -1;
    int n_ids = tokenizer_encode(sm->model.tok, text, strlen(text), 1, ids);
    free(text);
    return n_ids;
fail:
    free(msgs);
    free(block);
    free(system);
    return -1;
}

/* ------------------------------------------------------------ prompt jobs */

/* Prompt text up to this many bytes is tokenized on the loop. */
#define INLINE_TOKENIZE_BYTES (8 * 1024)

enum job_kind { JOB_COMPLETION, JOB_TOKENIZE };

struct prompt_job {
    uv_work_t work;               /* work.data: the job */
    enum job_kind kind;
    struct daemon *d;
    struct http_request *req;     /* NULL once completed or given back */
    struct served_model *sm;      /* referenced */
    struct oai_request r;         /* owned */
    bool queued;                  /* on the work pool: counted in d->tokenizing */
    /* results, written by job_run */
    int ok;                       /* 0: out of memory or invalid text */
    int n_prompts;
    int32_t **ids;
    int *n_ids;
    int max_model_len;            /* JOB_TOKENIZE: read on the loop before the work */
    char *body;                   /* JOB_TOKENIZE: the response */
    size_t body_len;
};

static size_t prompt_text_bytes(const struct oai_request *r) {
    size_t n = 0;
    for (int i = 0; i < r->n_prompts; i++) n += r->prompts[i].text ? r->prompts[i].text_len : 0;
    for (int i = 0; i < r->n_messages; i++) n += r->messages[i].content_len;
    return n;
}

/* The job's prompts to ids (and, for /tokenize, the response). Runs on the
 * loop or on a work-pool thread: touches only the job and the tokenizer. */
static void job_run(struct prompt_job *j) {
    struct served_model *sm = j->sm;
    const struct oai_request *r = &j->r;
    if (j->kind == JOB_TOKENIZE) {
        int32_t *ids = NULL;
        int n = r->n_messages ? chat_ids(sm, r, r->add_generation_prompt, &ids) : prompt_ids(sm, r, 0, &ids);
        const char **pieces = NULL;
        size_t *plens = NULL;
        if (n >= 0 && r->return_token_strs) {
            pieces = calloc((size_t)n + 1, sizeof *pieces);
            plens = calloc((size_t)n + 1, sizeof *plens);
            for (int i = 0; pieces && plens && i < n; i++) pieces[i] = tokenizer_piece(sm->model.tok, ids[i], &plens[i]);
        }
        if (n >= 0 && (!r->return_token_strs || (pieces && plens)))
            j->body = oai_tokenize_response(ids, n, j->max_model_len, pieces, plens, &j->body_len);
        j->ok = j->body != NULL;
        free(pieces);
        free(plens);
        free(ids);
        return;
    }
    j->n_prompts = r->kind == OAI_CHAT ? 1 : r->n_prompts;
    j->ids = calloc((size_t)j->n_prompts, sizeof *j->ids);
    j->n_ids = calloc((size_t)j->n_prompts, sizeof *j->n_ids);
    j->ok = j->ids && j->n_ids;
    for (int p = 0; j->ok && p < j->n_prompts; p++) {
        j->n_ids[p] = r->kind == OAI_CHAT ? chat_ids(sm, r, 1, &j->ids[p]) : prompt_ids(sm, r, p, &j->ids[p]);
        j->ok = j->n_ids[p] >= 0;
    }
}

static void job_free(struct prompt_job *j) {
    struct daemon *d = j->d;
    for (int p = 0; j->ids && p < j->n_prompts; p++) free(j->ids[p]);
    free(j->ids);
    free(j->n_ids);
    free(j->body);
    oai_request_free(&j->r);
    served_unref(j->sm);
    const bool queued = j->queued;
    free(j);
    if (queued) {
        d->tokenizing--;
        daemon_maybe_finish(d);
    }
}

/* Back on the loop with the results: answer or hand over, then free. */
static void job_finish(struct prompt_job *j) {
    struct http_request *req = j->req;
    if (!req) { job_free(j); return; }   /* the client left */
    http_request_on_abort(req, NULL, NULL);
    j->req = NULL;
    struct served_model *sm = j->sm;
    if (sm->state != SERVED_READY) {
        char msg[512];
        snprintf(msg, sizeof msg, "the model '%s' was removed while the prompt was being tokenized", sm->name);
        http_respond_error_code(req, 404, "invalid_request_error", "model_not_found", msg, "model");
    } else if (j->kind == JOB_TOKENIZE) {
        respond_built(req, j->body, j->body_len);
        j->body = NULL;   /* respond_built freed it */
    } else {
        struct completion *c = j->ok ? completion_new(j->d, req, sm, &j->r) : NULL;
        if (c) completion_submit(c, j->ids, j->n_ids);   /* answers, now or later */
        else http_respond_error(req, 500, "server_error", "out of memory preparing the prompt", NULL);
    }
    job_free(j);
}

static void job_work(uv_work_t *w) { job_run(w->data); }

static void job_after(uv_work_t *w, int status) {
    struct prompt_job *j = w->data;
    if (status == UV_ECANCELED) j->ok = 0;   /* only on_abort cancels: req is NULL */
    job_finish(j);
}

/* The client left while the job was queued: give the request back now (it
 * sends nothing); the job ends in job_after. */
static void job_on_abort(struct http_request *req, void *arg) {
    struct prompt_job *j = arg;
    j->req = NULL;
    http_respond(req, 499, NULL, NULL, 0);
    uv_cancel((uv_req_t *)&j->work);   /* harmless when the work already runs */
}

/* Takes *r over (left empty) and answers req, now or from the work pool. */
static void job_start(struct daemon *d, struct http_request *req, struct served_model *sm, struct oai_request *r,
                      enum job_kind kind) {
    struct prompt_job *j = calloc(1, sizeof *j);
    if (!j) {
        http_respond_error(req, 500, "server_error", "out of memory preparing the prompt", NULL);
        oai_request_free(r);
        return;
    }
    j->kind = kind;
    j->d = d;
    j->req = req;
    j->sm = sm;
    served_ref(sm);
    j->r = *r;
    memset(r, 0, sizeof *r);
    j->max_model_len = served_max_context(sm);
    j->work.data = j;
    if (prompt_text_bytes(&j->r) > INLINE_TOKENIZE_BYTES) {
        if (http_request_on_abort(req, job_on_abort, j) == HTTP_ERR_GONE) {
            j->req = NULL;
            http_respond(req, 499, NULL, NULL, 0);   /* gives it back; sends nothing */
            job_free(j);
            return;
        }
        if (uv_queue_work(&d->loop, &j->work, job_work, job_after) == 0) {
            j->queued = true;
            d->tokenizing++;
            return;
        }
    }
    job_run(j);   /* short, or the pool refused the work */
    job_finish(j);
}

/* Shared by /v1/completions, /v1/chat/completions and /v1/embeddings once
 * parsed. */
static void run_completion(struct daemon *d, struct http_request *req, struct oai_request *r) {
    struct served_model *sm = model_for(d, req, r->model);
    struct oai_error err;
    if (!sm) { oai_request_free(r); return; }
    if (r->kind == OAI_EMBEDDING && r->dimensions && r->dimensions != sm->model.cfg.n_embd) {
        char msg[256];
        snprintf(msg, sizeof msg, "'dimensions' must be this model's width, %d, got %d: its embeddings are not "
                 "trained to be shortened", sm->model.cfg.n_embd, r->dimensions);
        http_respond_error(req, 400, "invalid_request_error", msg, "dimensions");
        oai_request_free(r);
        return;
    }
    if (oai_check_token_ids(r, sm->model.cfg.n_vocab, &err)) {
        respond_oai_error(req, &err);
        oai_request_free(r);
        return;
    }
    job_start(d, req, sm, r, JOB_COMPLETION);
}

void route_completions(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    if (parse_body(req, openai_parse_completion, &r)) return;
    run_completion(d, req, &r);
}

void route_chat_completions(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    if (parse_body(req, openai_parse_chat, &r)) return;
    run_completion(d, req, &r);
}

/* Each input's embedding: the mean of its tokens' final hidden states,
 * normalized, computed by the scheduler like a prompt with nothing to
 * generate (it shares batches with completions). */
void route_embeddings(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    if (parse_body(req, openai_parse_embedding, &r)) return;
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
    respond_built(req, body, len);
    free(names);
    free(created);
}

/* GET /v1/models/{id}: the model as the list shows it (client.models.retrieve). */
void route_model(struct daemon *d, struct http_request *req) {
    char name[256];
    if (http_path_segment(req, "/v1/models/", name, sizeof name)) {
        http_respond_error(req, 400, "invalid_request_error",
                           "the model id in the path is not one path segment of at most 255 bytes "
                           "(percent-escapes must be valid and not %00)", "model");
        return;
    }
    struct served_model *sm = served_find(d, name);
    if (!sm || sm->state != SERVED_READY) {
        char msg[512];
        snprintf(msg, sizeof msg, "the model '%.256s' does not exist", name);
        http_respond_error_code(req, 404, "invalid_request_error", "model_not_found", msg, "model");
        return;
    }
    size_t len = 0;
    char *body = oai_model_response(sm->name, sm->created, &len);
    respond_built(req, body, len);
}

void route_tokenize(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    if (parse_body(req, openai_parse_tokenize, &r)) return;
    struct served_model *sm = model_for(d, req, r.model);
    if (!sm) { oai_request_free(&r); return; }
    job_start(d, req, sm, &r, JOB_TOKENIZE);
}

void route_detokenize(struct daemon *d, struct http_request *req) {
    struct oai_request r;
    struct oai_error err;
    if (parse_body(req, openai_parse_detokenize, &r)) return;
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
    respond_built(req, body, len);
    free(text);
    oai_request_free(&r);
}

void route_cancel_request(struct daemon *d, struct http_request *req) {
    if (!admin_authorized(d, req)) return;
    const char *id_text = req->path + strlen("/v1/requests/");
    uint64_t id;
    if (oai_parse_id(id_text, &id)) {
        http_respond_error(req, 400, "invalid_request_error",
                           "a request id looks like cmpl-42, chatcmpl-42 or 42", "id");
        return;
    }
    struct completion *c = completion_find(d, id);
    if (c) {
        completion_cancel(c);
        respond_json(req, 200,
                     json_pack("{s:s, s:s, s:b}", "id", completion_id(c), "object", "request", "cancelled", 1));
        log_info("request cancelled by an operator", "request_id=%llu", (unsigned long long)id);
        return;
    }
    char msg[128];
    snprintf(msg, sizeof msg, "no request %llu is running", (unsigned long long)id);
    http_respond_error(req, 404, "not_found_error", msg, "id");
}
