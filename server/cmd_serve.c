/* `ebb serve`: the HTTP daemon.
 *
 * Start-up: configuration (defaults < file < EBB_* < flags), the catalog
 * (registering the default model on first start), the saved memory budget,
 * then the HTTP server. Models load in the background, so /health answers at
 * once and /ready turns 200 when a model can serve.
 *
 * Everything runs on one libuv loop (this thread); see daemon.h for the
 * other threads. Metrics of the transport are recorded in the http layer's
 * on_done hook, which sees every request exactly once -- answered by a route,
 * refused by the transport (400/408/413/431), or abandoned by its client --
 * so the counters cannot miss a path. The route label is the matched route
 * pattern, "unmatched" for 404s and "none" for requests the transport refused
 * before routing, which keeps the label set bounded whatever paths clients
 * send.
 *
 * With EBB_TEST_ROUTES=1 two debug routes exist for the transport tests:
 *   POST /debug/echo          answers the request body as it came
 *   GET  /debug/stream?n=K&ms=M[&late_ms=L]
 *                             K server-sent events M ms apart, then [DONE];
 *                             after a client abort, the request is completed
 *                             L ms later instead of inside on_abort
 *
 * SIGTERM/SIGINT: stop accepting, let running requests finish up to
 * shutdown_timeout_ms, cancel and close the rest, exit 0. A second signal
 * cuts the deadline to zero. */
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "server/cli.h"
#include "server/completion.h"
#include "server/daemon.h"
#include "server/log.h"
#include "storage/catalog.h"

typedef void (*route_fn)(struct daemon *d, struct http_request *req);

struct route {
    const char *method;
    const char *path;
    route_fn fn;
    bool prefix;       /* path is a prefix followed by one more segment */
    bool test_only;
};

void respond_json(struct http_request *req, int status, json_t *body) {
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!text) {
        http_respond_error(req, 500, "server_error", "out of memory building the response", NULL);
        return;
    }
    http_respond(req, status, "application/json", text, strlen(text));
    free(text);
}

/* ---------------------------------------------------------------- ops routes */

static void route_health(struct daemon *d, struct http_request *req) {
    (void)d;
    static const char body[] = "{\"status\":\"ok\"}";
    http_respond(req, 200, "application/json", body, sizeof body - 1);
}

static void route_ready(struct daemon *d, struct http_request *req) {
    if (served_any_ready(d) && !d->stopping) {
        static const char body[] = "{\"status\":\"ready\"}";
        http_respond(req, 200, "application/json", body, sizeof body - 1);
        return;
    }
    http_add_header(req, "Retry-After", "1");
    http_respond_error(req, 503, "unavailable_error",
                       d->stopping ? "the server is shutting down" : "no model is loaded yet", NULL);
}

/* Connection figures live in the http layer; copy them into the registry
 * just before rendering (counters advance by the difference). */
static void refresh_connection_metrics(struct daemon *d) {
    struct http_stats st;
    http_server_stats(d->http, &st);
    metric_set(d->m_conn_open, NULL, (double)st.connections_open);
    metric_inc(d->m_conn_total, NULL, (double)(st.connections_accepted - d->seen_accepted));
    metric_inc(d->m_conn_rejected, NULL, (double)(st.connections_rejected - d->seen_rejected));
    d->seen_accepted = st.connections_accepted;
    d->seen_rejected = st.connections_rejected;
}

static void route_metrics(struct daemon *d, struct http_request *req) {
    refresh_connection_metrics(d);
    served_refresh_metrics(d);
    size_t len = 0;
    char *text = metrics_render(d->metrics, &len);
    if (!text) {
        http_respond_error(req, 500, "server_error", "out of memory rendering metrics", NULL);
        return;
    }
    http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}

static void route_debug_echo(struct daemon *s, struct http_request *req) {
    (void)s;
    const char *type = http_header(req, "Content-Type");
    http_respond(req, 200, type && *type ? type : "application/octet-stream", req->body, req->body_len);
}

/* Strict integer from a query parameter: absent -> `def`; 0 on success,
 * -1 when present but not an integer in [lo, hi]. Keys and values are not
 * percent-decoded (these are test routes with numeric parameters). */
static int query_int(const char *query, const char *key, long def, long lo, long hi, long *out) {
    size_t klen = strlen(key);
    *out = def;
    for (const char *p = query; p && *p;) {
        const char *amp = strchr(p, '&');
        size_t len = amp ? (size_t)(amp - p) : strlen(p);
        if (len > klen && !strncmp(p, key, klen) && p[klen] == '=') {
            char buf[24];
            size_t vlen = len - klen - 1;
            if (vlen == 0 || vlen >= sizeof buf) return -1;
            memcpy(buf, p + klen + 1, vlen);
            buf[vlen] = '\0';
            char *end;
            long v = strtol(buf, &end, 10);
            if (*end || v < lo || v > hi) return -1;
            *out = v;
            return 0;
        }
        p = amp ? amp + 1 : NULL;
    }
    return 0;
}

/* One /debug/stream in progress. It owns a timer; it ends either after its
 * last event or when the client goes away (on_abort), and is freed when the
 * timer has closed. */
struct debug_stream {
    uv_timer_t timer;
    struct http_request *req;
    long i, n, interval_ms, late_ms;
};

static void debug_stream_freed(uv_handle_t *h) { free(h->data); }

static void debug_stream_close(struct debug_stream *ds) {
    uv_timer_stop(&ds->timer);
    uv_close((uv_handle_t *)&ds->timer, debug_stream_freed);
}

/* Completes an aborted stream some time after the abort, the way the engine
 * will: the connection may be long gone by now, and the calls must be
 * harmless no-ops that still give the request back. */
static void debug_stream_complete_late(uv_timer_t *t) {
    struct debug_stream *ds = t->data;
    int w = http_stream_write(ds->req, "data: late\n\n", 12);
    int e = http_stream_end(ds->req);
    if (w != HTTP_ERR_GONE || e != HTTP_ERR_GONE)
        log_error("late completion of an aborted stream was not a no-op", "write=%d end=%d", w, e);
    debug_stream_close(ds);
}

static void debug_stream_aborted(struct http_request *req, void *arg) {
    struct debug_stream *ds = arg;
    log_info("stream aborted by client", "request_id=%llu sent=%ld of=%ld late_ms=%ld",
             (unsigned long long)req->id, ds->i, ds->n, ds->late_ms);
    if (ds->late_ms > 0) {
        uv_timer_start(&ds->timer, debug_stream_complete_late, (uint64_t)ds->late_ms, 0);
        return;
    }
    http_stream_end(req);   /* sends nothing; gives our reference back */
    debug_stream_close(ds);
}

static void debug_stream_tick(uv_timer_t *t) {
    struct debug_stream *ds = t->data;
    if (http_request_aborted(ds->req)) {
        uv_timer_stop(t);   /* on_abort will come and clean up */
        return;
    }
    char event[96];
    if (ds->i < ds->n) {
        int len = snprintf(event, sizeof event, "data: {\"index\":%ld,\"n\":%ld}\n\n", ds->i, ds->n);
        ds->i++;
        if (http_stream_write(ds->req, event, (size_t)len) != 0) uv_timer_stop(t);
        return;
    }
    static const char done[] = "data: [DONE]\n\n";
    http_stream_write(ds->req, done, sizeof done - 1);
    if (http_request_aborted(ds->req)) {
        uv_timer_stop(t);
        return;
    }
    http_stream_end(ds->req);
    debug_stream_close(ds);
}

static void route_debug_stream(struct daemon *s, struct http_request *req) {
    long n, ms, late_ms;
    if (query_int(req->query, "late_ms", 0, 0, 60000, &late_ms)) {
        http_respond_error(req, 400, "invalid_request_error", "late_ms must be an integer in [0, 60000]", "late_ms");
        return;
    }
    if (query_int(req->query, "n", 5, 0, 100000, &n)) {
        http_respond_error(req, 400, "invalid_request_error", "n must be an integer in [0, 100000]", "n");
        return;
    }
    if (query_int(req->query, "ms", 10, 0, 60000, &ms)) {
        http_respond_error(req, 400, "invalid_request_error", "ms must be an integer in [0, 60000]", "ms");
        return;
    }
    struct debug_stream *ds = calloc(1, sizeof *ds);
    if (!ds) {
        http_respond_error(req, 500, "server_error", "out of memory", NULL);
        return;
    }
    ds->req = req;
    ds->n = n;
    ds->interval_ms = ms;
    ds->late_ms = late_ms;
    uv_timer_init(&s->loop, &ds->timer);
    ds->timer.data = ds;
    http_add_header(req, "Cache-Control", "no-cache");
    if (http_stream_start(req, 200, "text/event-stream") != 0 ||
        http_request_on_abort(req, debug_stream_aborted, ds) != 0) {
        http_stream_end(req);
        uv_close((uv_handle_t *)&ds->timer, debug_stream_freed);
        return;
    }
    uv_timer_start(&ds->timer, debug_stream_tick, (uint64_t)ms, (uint64_t)(ms ? ms : 1));
}

static const struct route routes[] = {
    {"GET", "/health", route_health, false, false},
    {"GET", "/ready", route_ready, false, false},
    {"GET", "/metrics", route_metrics, false, false},
    {"POST", "/v1/completions", route_completions, false, false},
    {"POST", "/v1/chat/completions", route_chat_completions, false, false},
    {"GET", "/v1/models", route_models, false, false},
    {"POST", "/tokenize", route_tokenize, false, false},
    {"POST", "/detokenize", route_detokenize, false, false},
    {"DELETE", "/v1/requests/", route_cancel_request, true, false},
    {"GET", "/admin/memory", route_admin_memory_get, false, false},
    {"PUT", "/admin/memory", route_admin_memory_put, false, false},
    {"GET", "/admin/models", route_admin_models_get, false, false},
    {"POST", "/admin/models", route_admin_models_post, false, false},
    {"DELETE", "/admin/models/", route_admin_models_delete, true, false},
    {"POST", "/debug/echo", route_debug_echo, false, true},
    {"GET", "/debug/stream", route_debug_stream, false, true},
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

/* The route label of a request, for metrics: set by on_request. */
static const char label_unmatched[] = "unmatched";

static bool path_matches(const struct route *r, const char *path) {
    if (!r->prefix) return !strcmp(r->path, path);
    size_t n = strlen(r->path);
    return !strncmp(r->path, path, n) && path[n] && !strchr(path + n, '/');
}

static void on_request(struct http_request *req, void *arg) {
    struct daemon *d = arg;
    const char *method = !strcmp(req->method, "HEAD") ? "GET" : req->method;
    char allow[64] = "";
    const struct route *known_path = NULL;
    for (size_t i = 0; i < N_ROUTES; i++) {
        const struct route *r = &routes[i];
        if ((r->test_only && !d->test_routes) || !path_matches(r, req->path)) continue;
        if (!strcmp(r->method, method)) {
            req->route = r->path;
            r->fn(d, req);
            return;
        }
        known_path = r;
        if (strlen(allow) + strlen(r->method) + 3 < sizeof allow) {
            if (*allow) strcat(allow, ", ");
            strcat(allow, r->method);
        }
    }
    char msg[256];
    char path_for_msg[96];
    snprintf(path_for_msg, sizeof path_for_msg, "%s", req->path);
    if (known_path) {
        req->route = known_path->path;
        http_add_header(req, "Allow", allow);
        snprintf(msg, sizeof msg, "method %.24s not allowed on %.95s (allowed: %.63s)", req->method, path_for_msg,
                 allow);
        http_respond_error(req, 405, "invalid_request_error", msg, NULL);
        return;
    }
    req->route = label_unmatched;
    snprintf(msg, sizeof msg, "no route for %.24s %.95s", req->method, path_for_msg);
    http_respond_error(req, 404, "invalid_request_error", msg, NULL);
}

/* Every request ends here once: metrics and the access log. */
static void on_done(const struct http_done_info *info, void *arg) {
    struct daemon *d = arg;
    const struct http_request *req = info->req;
    const char *route = req->route ? req->route : "none";
    char code[16];
    snprintf(code, sizeof code, "%d", info->aborted && !info->status ? 499 : info->status);
    const char *labels[] = {route, code};
    metric_inc(d->m_requests, labels, 1);
    metric_observe(d->m_duration, labels, info->seconds);   /* the first label: route */
    if (info->aborted) {
        metric_inc(d->m_aborted, labels, 1);
        log_info("request aborted by client", "request_id=%llu route=%s status=%d seconds=%.3f",
                 (unsigned long long)req->id, route, info->status, info->seconds);
    }
    if (log_get_level() <= LOG_LVL_DEBUG) {
        char qpath[160];
        log_debug("request", "request_id=%llu method=%s path=%s status=%d seconds=%.6f bytes=%llu",
                  (unsigned long long)req->id, *req->method ? req->method : "-",
                  log_quote(qpath, sizeof qpath, req->path), info->status, info->seconds,
                  (unsigned long long)info->bytes_out);
    }
    if (!info->dispatched && info->status >= 400)
        log_info("request refused", "request_id=%llu status=%d", (unsigned long long)req->id, info->status);
}

/* ---------------------------------------------------------------- lifecycle */

static void on_handle_closed(uv_handle_t *h) { (void)h; }

void daemon_maybe_finish(struct daemon *d) {
    if (!d->http_closed || d->finished || d->completions || d->teardowns || d->models) return;
    /* Every engine thread has been joined: no event can be posted any more,
     * so the bridge may close. */
    d->finished = true;
    bridge_close(&d->bridge);
    uv_close((uv_handle_t *)&d->sigterm, on_handle_closed);
    uv_close((uv_handle_t *)&d->sigint, on_handle_closed);
}

static void on_server_closed(struct http_server *srv, void *arg) {
    struct daemon *d = arg;
    (void)srv;
    log_info("all connections closed", NULL);
    /* Models go after their requests: unloading cancels what is left; the
     * cancelled requests' last events still arrive through the bridge, then
     * each model is torn down on the work pool, and only then does the
     * bridge close and the loop end (daemon_maybe_finish). */
    d->http_closed = true;
    while (d->models) served_unload(d->models);
    daemon_maybe_finish(d);
}

static void on_signal(uv_signal_t *h, int signum) {
    struct daemon *d = h->data;
    if (!d->stopping) {
        d->stopping = true;
        log_info("shutting down", "signal=%s deadline_ms=%d", signum == SIGTERM ? "SIGTERM" : "SIGINT",
                 d->cfg.shutdown_timeout_ms);
        http_server_shutdown(d->http, (unsigned)d->cfg.shutdown_timeout_ms, on_server_closed, d);
    } else {
        log_warn("second signal: closing every connection now", NULL);
        http_server_shutdown(d->http, 0, on_server_closed, d);
    }
}

static int register_metrics(struct daemon *d) {
    static const char *const route_code[] = {"route", "code"};
    static const char *const model[] = {"model"};
    static const char *const model_reason[] = {"model", "reason"};
    static const double itl_buckets[] = {0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2};
    struct metrics *m = d->metrics = metrics_new();
    if (!m) return -1;
    d->m_requests = metrics_counter(m, "ebb_http_requests_total", "HTTP requests by route and status code.", 2,
                                    route_code);
    d->m_duration = metrics_histogram(m, "ebb_http_request_duration_seconds",
                                      "Time from the first request byte to the end of the response.", 1, route_code,
                                      metrics_latency_buckets, metrics_latency_buckets_n);
    d->m_aborted = metrics_counter(m, "ebb_http_requests_aborted_total",
                                   "Requests whose client disconnected before the response ended.", 1, route_code);
    d->m_conn_open = metrics_gauge(m, "ebb_http_connections_open", "Open client connections.", 0, NULL);
    d->m_conn_total = metrics_counter(m, "ebb_http_connections_total", "Accepted client connections.", 0, NULL);
    d->m_conn_rejected = metrics_counter(m, "ebb_http_connections_rejected_total",
                                         "Connections refused because the connection limit was reached.", 0, NULL);
    d->m_running = metrics_gauge(m, "ebb_requests_running", "Sequences being generated.", 1, model);
    d->m_waiting = metrics_gauge(m, "ebb_requests_waiting", "Sequences queued for a batch slot or memory.", 1, model);
    d->m_finished = metrics_counter(m, "ebb_requests_finished_total",
                                    "Finished sequences by finish reason (stop, length, cancelled, error).", 2,
                                    model_reason);
    d->m_prompt_tokens = metrics_counter(m, "ebb_prompt_tokens_total", "Prompt tokens processed.", 1, model);
    d->m_gen_tokens = metrics_counter(m, "ebb_generation_tokens_total", "Tokens generated.", 1, model);
    d->m_ttft = metrics_histogram(m, "ebb_time_to_first_token_seconds",
                                  "From arrival to the first generated token.", 1, model, metrics_latency_buckets,
                                  metrics_latency_buckets_n);
    d->m_itl = metrics_histogram(m, "ebb_inter_token_latency_seconds", "Time between consecutive tokens.", 1,
                                 model, itl_buckets, (int)(sizeof itl_buckets / sizeof itl_buckets[0]));
    d->m_e2e = metrics_histogram(m, "ebb_request_latency_seconds", "From arrival to the last token.", 1, model,
                                 metrics_latency_buckets, metrics_latency_buckets_n);
    d->m_queue = metrics_histogram(m, "ebb_request_queue_seconds", "From arrival to admission into a batch.", 1,
                                   model, metrics_latency_buckets, metrics_latency_buckets_n);
    d->m_kv_bytes = metrics_gauge(m, "ebb_kv_cache_bytes", "KV cache bytes allocated.", 1, model);
    d->m_kv_use = metrics_gauge(m, "ebb_kv_cache_usage_ratio", "KV cache reserved over its budget (0 without one).",
                                1, model);
    d->m_weights = metrics_gauge(m, "ebb_resident_weight_bytes", "Model weight bytes resident in memory.", 1, model);
    d->m_budget = metrics_gauge(m, "ebb_memory_budget_bytes", "Memory budget (0: none).", 0, NULL);
    return d->m_requests && d->m_duration && d->m_aborted && d->m_conn_open && d->m_conn_total &&
                   d->m_conn_rejected && d->m_running && d->m_waiting && d->m_finished && d->m_prompt_tokens &&
                   d->m_gen_tokens && d->m_ttft && d->m_itl && d->m_e2e && d->m_queue && d->m_kv_bytes &&
                   d->m_kv_use && d->m_weights && d->m_budget
               ? 0
               : -1;
}

static void serve_usage(FILE *out) {
    fprintf(out, "usage: ebb serve [--config FILE] [options]\n"
                 "Runs the HTTP daemon. Every setting comes from, in increasing priority: its default,\n"
                 "the JSON config file (--config, else $EBB_CONFIG), EBB_<SETTING> variables, and flags:\n");
    config_flags_help(out);
    fprintf(out, "environment: EBB_TEST_ROUTES=1 enables POST /debug/echo and GET /debug/stream\n"
                 "see docs/operations.md\n");
}

/* Catalog start-up: register the default model on an empty catalog, queue
 * every catalog model for loading, and restore the saved memory budget
 * unless the operator set one explicitly for this run. */
static int start_models(struct daemon *d) {
    char err[512];
    struct catalog_model *list = NULL;
    size_t n = 0;
    if (catalog_model_list(d->catalog, &list, &n, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb serve: %s\n", err);
        return -1;
    }
    if (n == 0 && *d->cfg.default_model_path) {
        const char *name = *d->cfg.default_model ? d->cfg.default_model : NULL;
        if (catalog_model_add(d->catalog, d->cfg.default_model_path, name, NULL, err, sizeof err) != CATALOG_OK) {
            fprintf(stderr, "ebb serve: cannot register the default model: %s\n", err);
            return -1;
        }
        log_info("registered the default model", "path=%s", d->cfg.default_model_path);
        catalog_model_list_free(list, n);
        if (catalog_model_list(d->catalog, &list, &n, err, sizeof err) != CATALOG_OK) {
            fprintf(stderr, "ebb serve: %s\n", err);
            return -1;
        }
    }
    for (size_t i = 0; i < n; i++) served_load(d, list[i].name, list[i].source_path, list[i].created_at);
    catalog_model_list_free(list, n);
    if (n == 0) log_warn("the catalog has no models; add one with POST /admin/models or ebb models add", NULL);

    uint64_t budget = d->cfg.memory_budget_bytes, saved;
    int explicit_budget = config_source_of(&d->cfg, "memory_budget_bytes") >= CONFIG_FROM_ENV;
    if (!explicit_budget &&
        catalog_setting_get_u64(d->catalog, "memory_budget_bytes", &saved, err, sizeof err) == CATALOG_OK)
        budget = saved;
    d->memory_budget = budget;
    metric_set(d->m_budget, NULL, (double)budget);
    return 0;
}

static int parse_flags(struct daemon *d, int argc, char **argv) {
    const char *config_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) { serve_usage(stdout); return 1; }
        if (!strcmp(argv[i], "--config")) {
            if (!(config_path = cli_value("serve", argc, argv, &i))) return 2;
        }
    }
    char err[512];
    if (config_load(&d->cfg, config_path, err, sizeof err)) {
        fprintf(stderr, "ebb serve: %s\n", err);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config")) { i++; continue; }
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        int rc = config_apply_flag(&d->cfg, argv[i], value, err, sizeof err);
        if (rc) {
            fprintf(stderr, "ebb serve: %s\n", err);
            if (rc == 1) serve_usage(stderr);
            return 2;
        }
        i++;
    }
    enum log_level lvl;
    if (!log_parse_level(config_log_level_name(d->cfg.log_level), &lvl)) log_set_level(lvl);
    return 0;
}

static void cleanup(struct daemon *d) {
    if (d->catalog) catalog_close(d->catalog);
    metrics_free(d->metrics);
}

int cmd_serve(int argc, char **argv) {
    static struct daemon d;   /* static: signal and async handles point into it */
    memset(&d, 0, sizeof d);
    int rc = parse_flags(&d, argc, argv);
    if (rc) return rc == 1 ? 0 : rc;
    const char *tr = getenv("EBB_TEST_ROUTES");
    d.test_routes = tr && !strcmp(tr, "1");
    signal(SIGPIPE, SIG_IGN);   /* a vanished client must be an error code, not a signal */

    char path[4096], err[512];
    if (register_metrics(&d)) {
        fprintf(stderr, "ebb serve: cannot set up metrics\n");
        cleanup(&d);
        return 1;
    }
    if (config_catalog_path(&d.cfg, path, sizeof path, err, sizeof err) ||
        catalog_open(path, &d.catalog, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb serve: %s\n", err);
        cleanup(&d);
        return 1;
    }
    if (uv_loop_init(&d.loop) || bridge_init(&d.bridge, &d.loop, completion_deliver, &d)) {
        fprintf(stderr, "ebb serve: cannot create the event loop\n");
        cleanup(&d);
        return 1;
    }
    struct http_config hc = {
        .max_body = (size_t)d.cfg.max_body_bytes,
        .max_header = (size_t)d.cfg.max_header_bytes,
        .header_timeout_ms = (unsigned)d.cfg.header_timeout_ms,
        .idle_timeout_ms = (unsigned)d.cfg.idle_timeout_ms,
        .max_connections = (unsigned)d.cfg.max_connections,
        .on_request = on_request,
        .on_done = on_done,
        .arg = &d,
    };
    d.http = http_server_new(&d.loop, &hc);
    rc = d.http ? http_server_listen(d.http, d.cfg.host, d.cfg.port) : UV_ENOMEM;
    if (rc < 0) {
        fprintf(stderr, "ebb serve: cannot listen on %s port %d: %s\n", d.cfg.host, d.cfg.port, uv_strerror(rc));
        log_error("cannot listen", "host=%s port=%d error=\"%s\"", d.cfg.host, d.cfg.port, uv_strerror(rc));
        if (d.http) http_server_shutdown(d.http, 0, NULL, NULL);
        bridge_close(&d.bridge);
        uv_run(&d.loop, UV_RUN_DEFAULT);
        if (d.http) http_server_free(d.http);
        uv_loop_close(&d.loop);
        cleanup(&d);
        return 1;
    }
    if (start_models(&d)) {
        http_server_shutdown(d.http, 0, NULL, NULL);
        while (d.models) served_unload(d.models);
        bridge_close(&d.bridge);
        uv_run(&d.loop, UV_RUN_DEFAULT);
        http_server_free(d.http);
        uv_loop_close(&d.loop);
        cleanup(&d);
        return 1;
    }
    uv_signal_init(&d.loop, &d.sigterm);
    uv_signal_init(&d.loop, &d.sigint);
    d.sigterm.data = d.sigint.data = &d;
    uv_signal_start(&d.sigterm, on_signal, SIGTERM);
    uv_signal_start(&d.sigint, on_signal, SIGINT);

    char qhost[128];
    log_info("listening", "host=%s port=%d catalog=%s memory_budget=%llu admin=%s test_routes=%d",
             log_quote(qhost, sizeof qhost, d.cfg.host), http_server_port(d.http), path,
             (unsigned long long)d.memory_budget, *d.cfg.admin_token ? "enabled" : "disabled", d.test_routes);

    uv_run(&d.loop, UV_RUN_DEFAULT);

    rc = 0;
    if (http_server_free(d.http) != 0) { log_error("server still has open handles", NULL); rc = 1; }
    if (uv_loop_close(&d.loop) != 0) { log_error("event loop still has open handles", NULL); rc = 1; }
    cleanup(&d);
    log_info("stopped", NULL);
    return rc;
}
