/* A completion: one /v1/completions or /v1/chat/completions request and the
 * N engine choices that answer it, from the handler to the last done event.
 *
 * Two owners with their own clocks share it: the HTTP request (the client
 * may go away at any time) and the choices (each a scheduler request whose
 * events arrive through the bridge until its done event, however it was
 * cancelled). This module is the one place that knows both, so the routes
 * only parse, tokenize and hand over. States (completion.c holds the table
 * of what each event does in each):
 *
 *   NEW ──every choice submitted──▶ RUNNING ──last choice done: response sent──▶ freed
 *    │                                 │                                           ▲
 *    │ a choice refused: error sent    │ client gone: choices cancelled,           │
 *    ▼                                 ▼ request given back                        │
 *   DRAINING (request completed, choices still to report done) ──last done────────┘
 *
 * OWNERSHIP -- the rule to remember:
 *   1. completion_new() takes the parsed request and one reference on the
 *      served model; the completion joins the daemon's in-flight list.
 *   2. completion_submit() always answers or adopts the HTTP request: after
 *      it the route must not touch `req` or the completion (it may already
 *      be freed).
 *   3. Only this module frees a completion, exactly when the HTTP request has
 *      been completed AND every choice has reported done, whichever comes
 *      last. So a late engine event can never reach freed memory, and the
 *      bridge target (a choice's slot) outlives every event addressed to it.
 *   4. completion_cancel() only asks the engine to stop; the completion ends
 *      through the done events like any other (the response says
 *      "cancelled"), so it may be called any number of times.
 *
 * Loop thread only.
 */
#ifndef EBB_SERVER_COMPLETION_H
#define EBB_SERVER_COMPLETION_H
#include <stdint.h>

struct bridge_event;
struct completion;
struct daemon;
struct gen_params;
struct http_request;
struct oai_request;
struct served_model;

/* A completion for `req` on the ready model `sm`, taking *r over (it is
 * left empty). NULL when out of memory (nothing taken, nothing answered). */
struct completion *completion_new(struct daemon *d, struct http_request *req, struct served_model *sm,
                                  struct oai_request *r);

/* Submits every choice: ids[p] (n_ids[p] tokens) is prompt p, one per
 * prompt of a completions request, one for chat; they are copied. Starts the
 * stream for a streaming request. On a refusal (empty prompt, context
 * exceeded, queue full...) answers the error and cancels what went in. */
void completion_submit(struct completion *c, int32_t *const *ids, const int *n_ids);

/* The bridge's deliver function: a token or a done event for a choice. */
void completion_deliver(struct bridge_event *ev, void *arg);

/* Asks the engine to stop every choice still running (see rule 4). */
void completion_cancel(struct completion *c);
/* completion_cancel() on every completion served by `sm` (being unloaded). */
void completion_cancel_model(struct served_model *sm);
/* The shutdown deadline: every response still running is ended with the
 * reason (a stream: each unfinished choice's last chunk, an error event and
 * [DONE]; otherwise a 503) and its work cancelled. */
void completion_shutdown_all(struct daemon *d);

/* The in-flight completion answering HTTP request `request_id`, or NULL;
 * its response id ("cmpl-42", "chatcmpl-42"). */
struct completion *completion_find(struct daemon *d, uint64_t request_id);
const char *completion_id(const struct completion *c);

/* The engine's settings for choice `choice` (0-based) of a parsed request:
 * the seed is the request's (or seed_if_unset) plus the choice index, so n
 * choices differ and a given seed always gives the same n outputs;
 * max_tokens_if_unset replaces -1 (what the context has left), and
 * speculative_if_unset a request's silence on drafts (config `speculative`).
 * Stop strings are borrowed from r: keep r alive while *out is in use. */
/* The request's context compression over the server's configured one
 * (config context_compression, compression_budget_percent,
 * compression_min_prompt). */
struct ebb_config;
struct compress_params;
void completion_compress_params(const struct oai_request *r, const struct ebb_config *cfg,
                                struct compress_params *out);
void completion_gen_params(const struct oai_request *r, int choice, uint64_t seed_if_unset, int max_tokens_if_unset,
                           int speculative_if_unset, struct gen_params *out);
#endif
