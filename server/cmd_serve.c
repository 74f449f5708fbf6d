/* `ebb serve`: the HTTP daemon.
 *
 * For now it serves the transport-level routes -- GET /health, GET /metrics --
 * and, when the environment has EBB_TEST_ROUTES=1, two debug routes that let
 * the integration tests drive the body-size, chunked, streaming and abort
 * paths before the engine exists:
 *   POST /debug/echo          answers the request body as it came
 *   GET  /debug/stream?n=K&ms=M[&late_ms=L]
 *                             K server-sent events M ms apart, then [DONE];
 *                             after a client abort, the request is completed
 *                             L ms later (as the engine will, at its next
 *                             step) instead of inside on_abort
 * The OpenAI routes and the engine's scheduler plug into the same route table
 * later.
 *
 * Everything runs on one libuv loop (this thread). Metrics are recorded in
 * the http layer's on_done hook, which sees every request exactly once --
 * answered by a route, refused by the transport (400/408/413/431), or
 * abandoned by its client -- so the counters cannot miss a path. The route
 * label is the matched route pattern, "unmatched" for 404s and "none" for
 * requests the transport refused before routing, which keeps the label set
 * bounded whatever paths clients send.
 *
 * SIGTERM/SIGINT: stop accepting, let in-flight responses finish up to
 * --shutdown-timeout, close the rest, exit 0. A second signal cuts the
 * deadline to zero. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "server/cli.h"
#include "server/http.h"
#include "server/log.h"
#include "server/metrics.h"

struct serve;
typedef void (*route_fn)(struct serve *s, struct http_request *req);

struct route {
    const char *method;
    const char *path;
    route_fn fn;
    bool test_only;
};

struct serve {
    uv_loop_t loop;
    struct http_server *http;
    uv_signal_t sigterm, sigint;
    bool test_routes;
    bool stopping;
    unsigned shutdown_ms;

    struct metrics *metrics;
    struct metric *m_requests;       /* ebb_http_requests_total{route,code} */
    struct metric *m_duration;       /* ebb_http_request_duration_seconds{route} */
    struct metric *m_aborted;        /* ebb_http_requests_aborted_total{route} */
    struct metric *m_conn_open;      /* ebb_http_connections_open */
    struct metric *m_conn_total;     /* ebb_http_connections_total */
    struct metric *m_conn_rejected;  /* ebb_http_connections_rejected_total */
    uint64_t seen_accepted, seen_rejected;
};

/* ---------------------------------------------------------------- routes */

static void route_health(struct serve *s, struct http_request *req) {
    (void)s;
    static const char body[] = "{\"status\":\"ok\"}";
    http_respond(req, 200, "application/json", body, sizeof body - 1);
}

/* Connection figures live in the http layer; copy them into the registry
 * just before rendering (counters advance by the difference). */
static void refresh_connection_metrics(struct serve *s) {
    struct http_stats st;
    http_server_stats(s->http, &st);
    metric_set(s->m_conn_open, NULL, (double)st.connections_open);
    metric_inc(s->m_conn_total, NULL, (double)(st.connections_accepted - s->seen_accepted));
    metric_inc(s->m_conn_rejected, NULL, (double)(st.connections_rejected - s->seen_rejected));
    s->seen_accepted = st.connections_accepted;
    s->seen_rejected = st.connections_rejected;
}

static void route_metrics(struct serve *s, struct http_request *req) {
    refresh_connection_metrics(s);
    size_t len = 0;
    char *text = metrics_render(s->metrics, &len);
    if (!text) {
        http_respond_error(req, 500, "server_error", "out of memory rendering metrics", NULL);
        return;
    }
    http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}

static void route_debug_echo(struct serve *s, struct http_request *req) {
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

static void route_debug_stream(struct serve *s, struct http_request *req) {
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
    {"GET", "/health", route_health, false},
    {"GET", "/metrics", route_metrics, false},
    {"POST", "/debug/echo", route_debug_echo, true},
    {"GET", "/debug/stream", route_debug_stream, true},
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

/* The route label of a request, for metrics: set by on_request. */
static const char label_unmatched[] = "unmatched";

static void on_request(struct http_request *req, void *arg) {
    struct serve *s = arg;
    const char *method = !strcmp(req->method, "HEAD") ? "GET" : req->method;
    char allow[64] = "";
    for (size_t i = 0; i < N_ROUTES; i++) {
        const struct route *r = &routes[i];
        if ((r->test_only && !s->test_routes) || strcmp(r->path, req->path)) continue;
        if (!strcmp(r->method, method)) {
            req->data = (void *)r->path;
            r->fn(s, req);
            return;
        }
        if (strlen(allow) + strlen(r->method) + 3 < sizeof allow) {
            if (*allow) strcat(allow, ", ");
            strcat(allow, r->method);
        }
    }
    char msg[256];   /* room for every %.Ns below: no truncation warnings */
    char path_for_msg[96];
    snprintf(path_for_msg, sizeof path_for_msg, "%s", req->path);
    if (*allow) {
        req->data = (void *)label_unmatched;
        for (size_t i = 0; i < N_ROUTES; i++)
            if (!strcmp(routes[i].path, req->path)) { req->data = (void *)routes[i].path; break; }
        http_add_header(req, "Allow", allow);
        snprintf(msg, sizeof msg, "method %.24s not allowed on %.95s (allowed: %.63s)", req->method, path_for_msg,
                 allow);
        http_respond_error(req, 405, "invalid_request_error", msg, NULL);
        return;
    }
    req->data = (void *)label_unmatched;
    snprintf(msg, sizeof msg, "no route for %.24s %.95s", req->method, path_for_msg);
    http_respond_error(req, 404, "invalid_request_error", msg, NULL);
}

/* Every request ends here once: metrics and the access log. */
static void on_done(const struct http_done_info *info, void *arg) {
    struct serve *s = arg;
    const struct http_request *req = info->req;
    const char *route = req->data ? (const char *)req->data : "none";
    char code[16];
    snprintf(code, sizeof code, "%d", info->aborted && !info->status ? 499 : info->status);
    const char *labels[] = {route, code};
    metric_inc(s->m_requests, labels, 1);
    metric_observe(s->m_duration, labels, info->seconds);   /* the first label: route */
    if (info->aborted) {
        metric_inc(s->m_aborted, labels, 1);
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

static void on_server_closed(struct http_server *srv, void *arg) {
    struct serve *s = arg;
    (void)srv;
    log_info("all connections closed", NULL);
    uv_close((uv_handle_t *)&s->sigterm, on_handle_closed);
    uv_close((uv_handle_t *)&s->sigint, on_handle_closed);
}

static void on_signal(uv_signal_t *h, int signum) {
    struct serve *s = h->data;
    if (!s->stopping) {
        s->stopping = true;
        log_info("shutting down", "signal=%s deadline_ms=%u", signum == SIGTERM ? "SIGTERM" : "SIGINT",
                 s->shutdown_ms);
        http_server_shutdown(s->http, s->shutdown_ms, on_server_closed, s);
    } else {
        log_warn("second signal: closing every connection now", NULL);
        http_server_shutdown(s->http, 0, on_server_closed, s);
    }
}

static int register_metrics(struct serve *s) {
    static const char *const route_code[] = {"route", "code"};
    s->metrics = metrics_new();
    if (!s->metrics) return -1;
    s->m_requests = metrics_counter(s->metrics, "ebb_http_requests_total",
                                    "HTTP requests by route and status code.", 2, route_code);
    s->m_duration = metrics_histogram(s->metrics, "ebb_http_request_duration_seconds",
                                      "Time from the first request byte to the end of the response.", 1,
                                      route_code, metrics_latency_buckets, metrics_latency_buckets_n);
    s->m_aborted = metrics_counter(s->metrics, "ebb_http_requests_aborted_total",
                                   "Requests whose client disconnected before the response ended.", 1,
                                   route_code);
    s->m_conn_open = metrics_gauge(s->metrics, "ebb_http_connections_open", "Open client connections.", 0, NULL);
    s->m_conn_total = metrics_counter(s->metrics, "ebb_http_connections_total", "Accepted client connections.",
                                      0, NULL);
    s->m_conn_rejected = metrics_counter(s->metrics, "ebb_http_connections_rejected_total",
                                         "Connections refused because the connection limit was reached.", 0, NULL);
    return s->m_requests && s->m_duration && s->m_aborted && s->m_conn_open && s->m_conn_total &&
                   s->m_conn_rejected ? 0 : -1;
}

static void serve_usage(FILE *out) {
    fprintf(out,
        "usage: ebb serve [options]\n"
        "  --host H               address to listen on (default 127.0.0.1; IPv6 literals work)\n"
        "  --port P               TCP port (default 8080; 0 picks a free one, logged)\n"
        "  --max-body BYTES       largest request body (default 8388608)\n"
        "  --max-header BYTES     largest request line + headers (default 16384)\n"
        "  --header-timeout S     seconds to receive a request's headers (default 10)\n"
        "  --idle-timeout S       keep-alive idle and body inactivity seconds (default 30)\n"
        "  --max-connections N    open connections at most (default 1024)\n"
        "  --shutdown-timeout S   on SIGTERM, seconds to let responses finish (default 10)\n"
        "  --log-level L          debug, info, warn or error (default info)\n"
        "environment: EBB_TEST_ROUTES=1 enables POST /debug/echo and GET /debug/stream\n");
}

/* Seconds given on the command line, as milliseconds (at least 1). */
static int seconds_flag(const char *flag, const char *value, unsigned *ms) {
    float sec;
    if (cli_float("serve", flag, value, 0.001, 86400, &sec)) return -1;
    *ms = (unsigned)(sec * 1000.0f + 0.5f);
    if (*ms == 0) *ms = 1;
    return 0;
}

int cmd_serve(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 8080;
    struct http_config cfg = {0};
    unsigned shutdown_ms = 10000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { serve_usage(stdout); return 0; }
        bool takes_value = !strcmp(a, "--host") || !strcmp(a, "--port") || !strcmp(a, "--max-body") ||
                           !strcmp(a, "--max-header") || !strcmp(a, "--header-timeout") ||
                           !strcmp(a, "--idle-timeout") || !strcmp(a, "--max-connections") ||
                           !strcmp(a, "--shutdown-timeout") || !strcmp(a, "--log-level");
        if (!takes_value) {
            fprintf(stderr, "ebb serve: unknown option '%s'\n", a);
            serve_usage(stderr);
            return 2;
        }
        if (!(v = cli_value("serve", argc, argv, &i))) return 2;
        int iv;
        uint64_t u;
        if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) { if (cli_int("serve", a, v, 0, 65535, &port)) return 2; }
        else if (!strcmp(a, "--max-body")) {
            if (cli_u64("serve", a, v, &u)) return 2;
            if (u < 1 || u > (1ull << 32)) { fprintf(stderr, "ebb serve: --max-body expects 1..4294967296 bytes\n"); return 2; }
            cfg.max_body = (size_t)u;
        } else if (!strcmp(a, "--max-header")) {
            if (cli_int("serve", a, v, 256, 1 << 20, &iv)) return 2;
            cfg.max_header = (size_t)iv;
        } else if (!strcmp(a, "--header-timeout")) { if (seconds_flag(a, v, &cfg.header_timeout_ms)) return 2; }
        else if (!strcmp(a, "--idle-timeout")) { if (seconds_flag(a, v, &cfg.idle_timeout_ms)) return 2; }
        else if (!strcmp(a, "--shutdown-timeout")) {
            float sec;
            if (cli_float("serve", a, v, 0, 86400, &sec)) return 2;
            shutdown_ms = (unsigned)(sec * 1000.0f + 0.5f);
        } else if (!strcmp(a, "--max-connections")) {
            if (cli_int("serve", a, v, 1, 1000000, &iv)) return 2;
            cfg.max_connections = (unsigned)iv;
        } else if (!strcmp(a, "--log-level")) {
            enum log_level lvl;
            if (log_parse_level(v, &lvl)) {
                fprintf(stderr, "ebb serve: --log-level expects debug, info, warn or error, got '%s'\n", v);
                return 2;
            }
            log_set_level(lvl);
        }
    }

    static struct serve s;   /* static: signal and timer handles point into it */
    memset(&s, 0, sizeof s);
    const char *tr = getenv("EBB_TEST_ROUTES");
    s.test_routes = tr && !strcmp(tr, "1");
    s.shutdown_ms = shutdown_ms;
    signal(SIGPIPE, SIG_IGN);   /* a vanished client must be an error code, not a signal */

    if (register_metrics(&s)) {
        fprintf(stderr, "ebb serve: cannot set up metrics\n");
        metrics_free(s.metrics);
        return 1;
    }
    if (uv_loop_init(&s.loop)) {
        fprintf(stderr, "ebb serve: cannot create the event loop\n");
        metrics_free(s.metrics);
        return 1;
    }
    cfg.on_request = on_request;
    cfg.on_done = on_done;
    cfg.arg = &s;
    s.http = http_server_new(&s.loop, &cfg);
    int rc = s.http ? http_server_listen(s.http, host, port) : UV_ENOMEM;
    if (rc < 0) {
        fprintf(stderr, "ebb serve: cannot listen on %s port %d: %s\n", host, port, uv_strerror(rc));
        log_error("cannot listen", "host=%s port=%d error=\"%s\"", host, port, uv_strerror(rc));
        if (s.http) {
            http_server_shutdown(s.http, 0, NULL, NULL);
            uv_run(&s.loop, UV_RUN_DEFAULT);
            http_server_free(s.http);
        }
        uv_loop_close(&s.loop);
        metrics_free(s.metrics);
        return 1;
    }
    uv_signal_init(&s.loop, &s.sigterm);
    uv_signal_init(&s.loop, &s.sigint);
    s.sigterm.data = s.sigint.data = &s;
    uv_signal_start(&s.sigterm, on_signal, SIGTERM);
    uv_signal_start(&s.sigint, on_signal, SIGINT);

    struct http_config eff = cfg;
    http_config_defaults(&eff);
    char qhost[128];
    log_info("listening", "host=%s port=%d max_body=%zu header_timeout_ms=%u idle_timeout_ms=%u test_routes=%d",
             log_quote(qhost, sizeof qhost, host), http_server_port(s.http), eff.max_body,
             eff.header_timeout_ms, eff.idle_timeout_ms, s.test_routes);

    uv_run(&s.loop, UV_RUN_DEFAULT);

    rc = 0;
    if (http_server_free(s.http) != 0) { log_error("server still has open handles", NULL); rc = 1; }
    if (uv_loop_close(&s.loop) != 0) { log_error("event loop still has open handles", NULL); rc = 1; }
    metrics_free(s.metrics);
    log_info("stopped", NULL);
    return rc;
}
