/* Debug routes for the transport tests, present only with EBB_TEST_ROUTES=1
 * (the route table marks them test-only):
 *
 *   POST /debug/echo          answers the request body as it came
 *   GET  /debug/stream?n=K&ms=M[&late_ms=L]
 *                             K server-sent events M ms apart, then [DONE];
 *                             after a client abort, the request is completed
 *                             L ms later instead of inside on_abort
 *
 * They exercise what the real routes cannot do on demand: a stream of a
 * chosen length and pace, and an application that completes an aborted
 * request late -- the way the engine does, and which http.h's ownership rule
 * (3) says must be a harmless no-op that still gives the request back. They
 * use the transport only; no model is needed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/daemon.h"
#include "server/log.h"

void route_debug_echo(struct daemon *d, struct http_request *req) {
    (void)d;
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

void route_debug_stream(struct daemon *d, struct http_request *req) {
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
    uv_timer_init(&d->loop, &ds->timer);
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
