/* The route table and what every request passes through on its way in
 * (routes_on_request: dispatch) and out (routes_on_done: metrics and the
 * access log), plus the operator probes /health and /ready.
 *
 * Routing is one table of (method, path, handler); a path ending in '/' with
 * `prefix` set matches one more segment (/v1/requests/{id}). A known path
 * with another method is answered 405 with Allow, anything else 404. HEAD is
 * routed as GET (http.c drops the body). Before any of that, every request
 * gets its CORS headers and a CORS preflight is answered (server/auth.h);
 * routes marked `api` then require an API key when keys are configured (the
 * admin routes check their own token in their handlers).
 *
 * Metrics of the transport are recorded in the http layer's on_done hook,
 * which sees every request exactly once -- answered by a route, refused by
 * the transport (400/408/413/431), or abandoned by its client -- so the
 * counters cannot miss a path. The route label (req->route) is the matched
 * route pattern, "unmatched" for 404s and "none" for requests the transport
 * refused before routing, which keeps the label set bounded whatever paths
 * clients send.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/daemon.h"
#include "server/log.h"

typedef void (*route_fn)(struct daemon *d, struct http_request *req);

struct route {
    const char *method;
    const char *path;
    route_fn fn;
    bool prefix;       /* path is a prefix followed by one more segment */
    bool test_only;
    bool api;          /* needs an API key when keys are configured */
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

/* ---------------------------------------------------------------- probes */

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

/* ---------------------------------------------------------------- dispatch */

static const struct route routes[] = {
    {"GET", "/health", route_health, false, false, false},
    {"GET", "/ready", route_ready, false, false, false},
    {"GET", "/metrics", route_metrics, false, false, false},
    {"POST", "/v1/completions", route_completions, false, false, true},
    {"POST", "/v1/chat/completions", route_chat_completions, false, false, true},
    {"POST", "/v1/embeddings", route_embeddings, false, false, true},
    {"GET", "/v1/models", route_models, false, false, true},
    {"GET", "/v1/models/", route_model, true, false, true},
    {"POST", "/tokenize", route_tokenize, false, false, true},
    {"POST", "/detokenize", route_detokenize, false, false, true},
    {"DELETE", "/v1/requests/", route_cancel_request, true, false, false},
    {"GET", "/admin/memory", route_admin_memory_get, false, false, false},
    {"PUT", "/admin/memory", route_admin_memory_put, false, false, false},
    {"GET", "/admin/models", route_admin_models_get, false, false, false},
    {"POST", "/admin/models", route_admin_models_post, false, false, false},
    {"DELETE", "/admin/models/", route_admin_models_delete, true, false, false},
    {"POST", "/debug/echo", route_debug_echo, false, true, false},
    {"GET", "/debug/stream", route_debug_stream, false, true, false},
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

/* The route label of a request no route matches (req->route). */
static const char label_unmatched[] = "unmatched";

static bool path_matches(const struct route *r, const char *path) {
    if (!r->prefix) return !strcmp(r->path, path);
    size_t n = strlen(r->path);
    return !strncmp(r->path, path, n) && path[n] && !strchr(path + n, '/');
}

void routes_on_request(struct http_request *req, void *arg) {
    struct daemon *d = arg;
    if (cors_preflight(d, req)) {
        req->route = "preflight";
        return;
    }
    cors_add_headers(d, req);
    const char *method = !strcmp(req->method, "HEAD") ? "GET" : req->method;
    char allow[64] = "";
    const struct route *known_path = NULL;
    for (size_t i = 0; i < N_ROUTES; i++) {
        const struct route *r = &routes[i];
        if ((r->test_only && !d->test_routes) || !path_matches(r, req->path)) continue;
        if (!strcmp(r->method, method)) {
            req->route = r->path;
            if (!r->api || auth_api_key_ok(d, req)) r->fn(d, req);
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
void routes_on_done(const struct http_done_info *info, void *arg) {
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
