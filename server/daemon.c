/* The daemon's lifecycle: start-up, signals, drain and shutdown.
 *
 * Start-up (daemon_run): metrics, the catalog (registering the default
 * model on first start), the event loop and the bridge, the HTTP listener,
 * then every catalog model queued for loading and the saved memory budget
 * restored. Models load in the background, so /health answers at once and
 * /ready turns 200 when a model can serve.
 *
 * Shutdown is a drain in four steps, each waiting for the one before:
 *
 *   SIGTERM/SIGINT ──▶ HTTP stops accepting; running requests may finish until
 *                      shutdown_timeout_ms; then each is ended with the reason
 *                      (a stream: last chunks, an error event, [DONE]; else a
 *                      503) and the connections close SHUTDOWN_FLUSH_MS later
 *                      (a second signal moves the deadline to now)
 *   all connections closed (on_server_closed) ──▶ every model is unloaded:
 *                      completions still running are cancelled
 *   last completion freed, last prompt tokenized on the work pool and last
 *   model torn down (daemon_maybe_finish)
 *                 ──▶ the bridge and the signal handles close
 *   nothing left open ──▶ uv_run returns; the server and the loop are freed;
 *                      exit 0
 *
 * The engine threads are joined before the bridge closes, so no event can
 * be posted to a closed bridge, and the bridge delivers what it still holds
 * before closing, so every completion hears its last done event. Whoever
 * ends one of the conditions (completion.c freeing a completion,
 * served_models.c finishing a teardown) calls daemon_maybe_finish, which
 * reads them as plain fields of struct daemon.
 */
#include <signal.h>
#include <stdio.h>

#include <uv.h>

#include "server/completion.h"
#include "server/daemon.h"
#include "server/log.h"
#include "storage/catalog.h"

static void on_handle_closed(uv_handle_t *h) { (void)h; }

void daemon_maybe_finish(struct daemon *d) {
    if (!d->http_closed || d->finished || d->completions || d->teardowns || d->tokenizing || d->models) return;
    /* Every engine thread has been joined: no event can be posted any more,
     * so the bridge may close. */
    d->finished = true;
    bridge_close(&d->bridge);
    uv_close((uv_handle_t *)&d->sigterm, on_handle_closed);
    uv_close((uv_handle_t *)&d->sigint, on_handle_closed);
    memory_stop(d);
    if (d->deadline_live) {
        d->deadline_live = false;
        uv_close((uv_handle_t *)&d->deadline, on_handle_closed);
    }
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

/* The connections close this long after the shutdown deadline, so the
 * last events written at the deadline reach the clients. */
#define SHUTDOWN_FLUSH_MS 300

/* The deadline: responses still running are ended with the reason (a stream
 * gets its last chunks, an error event and [DONE], never a cut body). */
static void on_deadline(uv_timer_t *t) {
    struct daemon *d = t->data;
    log_warn("shutdown deadline: ending the responses still running", NULL);
    completion_shutdown_all(d);
}

static void on_signal(uv_signal_t *h, int signum) {
    struct daemon *d = h->data;
    unsigned deadline_ms = (unsigned)d->cfg.shutdown_timeout_ms;
    if (!d->stopping) {
        d->stopping = true;
        log_info("shutting down", "signal=%s deadline_ms=%d", signum == SIGTERM ? "SIGTERM" : "SIGINT",
                 d->cfg.shutdown_timeout_ms);
    } else {
        log_warn("second signal: ending every response now", NULL);
        deadline_ms = 0;
    }
    if (!d->deadline_live && uv_timer_init(&d->loop, &d->deadline) == 0) {
        d->deadline_live = true;
        d->deadline.data = d;
    }
    if (d->deadline_live) uv_timer_start(&d->deadline, on_deadline, deadline_ms, 0);
    http_server_shutdown(d->http, deadline_ms + SHUTDOWN_FLUSH_MS, on_server_closed, d);
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
    for (size_t i = 0; i < n; i++) served_load(d, list[i].name, list[i].source_path, list[i].created_at, NULL, NULL);
    catalog_model_list_free(list, n);
    if (n == 0) log_warn("the catalog has no models; add one with POST /admin/models or ebb models add", NULL);

    if (memory_start(d)) {
        fprintf(stderr, "ebb serve: cannot start the memory budget's timer\n");
        return -1;
    }
    return 0;
}

/* SIGTERM and SIGINT start the drain. 0, or a libuv error with every
 * handle that was opened closing (start_failed's uv_run finishes them). */
static int start_signals(struct daemon *d) {
    int rc = uv_signal_init(&d->loop, &d->sigterm);
    if (rc < 0) return rc;
    if ((rc = uv_signal_init(&d->loop, &d->sigint)) < 0) {
        uv_close((uv_handle_t *)&d->sigterm, on_handle_closed);
        return rc;
    }
    d->sigterm.data = d->sigint.data = d;
    if ((rc = uv_signal_start(&d->sigterm, on_signal, SIGTERM)) < 0 ||
        (rc = uv_signal_start(&d->sigint, on_signal, SIGINT)) < 0) {
        uv_close((uv_handle_t *)&d->sigterm, on_handle_closed);
        uv_close((uv_handle_t *)&d->sigint, on_handle_closed);
        return rc;
    }
    return 0;
}

static void cleanup(struct daemon *d) {
    auth_free(&d->api_keys);
    if (d->catalog) catalog_close(d->catalog);
    metrics_free(d->metrics);
}

/* Unwinds a start-up that got as far as the loop: closes what is open, runs
 * the loop until the closes (and the teardown of any model already queued
 * to load) are over, and frees. Returns the exit status, 1. */
static int start_failed(struct daemon *d) {
    if (d->http) http_server_shutdown(d->http, 0, NULL, NULL);
    while (d->models) served_unload(d->models);
    memory_stop(d);
    bridge_close(&d->bridge);
    uv_run(&d->loop, UV_RUN_DEFAULT);
    if (d->http) http_server_free(d->http);
    uv_loop_close(&d->loop);
    cleanup(d);
    return 1;
}

int daemon_run(struct daemon *d) {
    signal(SIGPIPE, SIG_IGN);   /* a vanished client must be an error code, not a signal */
    memory_allocator_setup();

    char path[4096], err[512];
    if (auth_load(&d->api_keys, &d->cfg, err, sizeof err) ||
        auth_check_listen(&d->cfg, d->api_keys.n, err, sizeof err)) {
        fprintf(stderr, "ebb serve: %s\n", err);
        log_error("refusing to start", "reason=\"%s\"", err);
        cleanup(d);
        return 1;
    }
    if (daemon_metrics_register(d)) {
        fprintf(stderr, "ebb serve: cannot set up metrics\n");
        cleanup(d);
        return 1;
    }
    if (config_catalog_path(&d->cfg, path, sizeof path, err, sizeof err) ||
        catalog_open(path, &d->catalog, err, sizeof err) != CATALOG_OK) {
        fprintf(stderr, "ebb serve: %s\n", err);
        cleanup(d);
        return 1;
    }
    if (uv_loop_init(&d->loop) || bridge_init(&d->bridge, &d->loop, completion_deliver, d)) {
        fprintf(stderr, "ebb serve: cannot create the event loop\n");
        cleanup(d);
        return 1;
    }
    struct http_config hc = {
        .max_body = (size_t)d->cfg.max_body_bytes,
        .max_header = (size_t)d->cfg.max_header_bytes,
        .header_timeout_ms = (unsigned)d->cfg.header_timeout_ms,
        .idle_timeout_ms = (unsigned)d->cfg.idle_timeout_ms,
        .request_timeout_ms = (unsigned)d->cfg.request_timeout_ms,
        .max_connections = (unsigned)d->cfg.max_connections,
        .on_request = routes_on_request,
        .on_done = routes_on_done,
        .arg = d,
    };
    d->http = http_server_new(&d->loop, &hc);
    int rc = d->http ? http_server_listen(d->http, d->cfg.host, d->cfg.port) : UV_ENOMEM;
    if (rc < 0) {
        fprintf(stderr, "ebb serve: cannot listen on %s port %d: %s\n", d->cfg.host, d->cfg.port, uv_strerror(rc));
        log_error("cannot listen", "host=%s port=%d error=\"%s\"", d->cfg.host, d->cfg.port, uv_strerror(rc));
        return start_failed(d);
    }
    if (start_models(d)) return start_failed(d);
    if ((rc = start_signals(d)) < 0) {
        /* A daemon that cannot hear SIGTERM could only be stopped with SIGKILL. */
        fprintf(stderr, "ebb serve: cannot handle SIGTERM and SIGINT: %s\n", uv_strerror(rc));
        log_error("cannot handle signals", "error=\"%s\"", uv_strerror(rc));
        return start_failed(d);
    }

    char qhost[128], budget[48];
    memory_policy_format(&d->memory, budget, sizeof budget);
    log_info("listening", "host=%s port=%d catalog=%s memory_budget=%s admin=%s api_keys=%d cors=%s test_routes=%d",
             log_quote(qhost, sizeof qhost, d->cfg.host), http_server_port(d->http), path, budget,
             *d->cfg.admin_token ? "enabled" : "disabled", d->api_keys.n, *d->cfg.cors_origins ? "on" : "off",
             d->test_routes);

    uv_run(&d->loop, UV_RUN_DEFAULT);

    rc = 0;
    if (http_server_free(d->http) != 0) { log_error("server still has open handles", NULL); rc = 1; }
    if (uv_loop_close(&d->loop) != 0) { log_error("event loop still has open handles", NULL); rc = 1; }
    cleanup(d);
    log_info("stopped", NULL);
    return rc;
}
