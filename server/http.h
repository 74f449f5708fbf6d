/* HTTP/1.1 server on libuv + llhttp.
 *
 * One loop thread owns every socket and every call below; nothing here is
 * thread-safe. Work done elsewhere (the engine thread) comes back to the loop
 * through uv_async_send, and the loop makes the http_* calls.
 *
 * Connections. Requests on one connection are handled strictly one at a
 * time: when a request is complete the parser pauses, the handler runs, and
 * the next pipelined request is parsed only after the response has ended.
 * Pipelined bytes wait in the connection's input buffer (bounded; reading
 * stops when it is full), so responses leave in request order and one
 * request's body can never be parsed into another. Keep-alive follows
 * HTTP/1.1 rules (Connection: close, HTTP/1.0 without keep-alive).
 * Transport problems are answered by this layer, in OpenAI's JSON error
 * shape, and the connection is then closed: 400 malformed bytes, 408 headers
 * too slow (slow-loris), body stalled, or the whole request not in by its
 * deadline (a body trickled forever), 413 body over the limit (as soon as
 * Content-Length or the chunks received exceed it), 431 headers too large,
 * 503 too many connections. Closing is "lingering": the write side is shut
 * down first and unread input drained briefly, so the client reads the error
 * instead of a reset.
 *
 * OWNERSHIP OF A REQUEST -- the rule to remember:
 *   1. The handler receives `req` together with one reference owned by the
 *      application; the connection holds its own.
 *   2. The application completes every request exactly once: http_respond(),
 *      http_respond_error(), or http_stream_start() ... http_stream_end().
 *      The completing call (http_respond*, http_stream_end) gives the
 *      application's reference back; after it, `req` must not be touched
 *      (unless the application took an extra reference with
 *      http_request_retain(), released with http_request_release()).
 *   3. If the client goes away first (EOF, reset, write error, forced
 *      shutdown), the on_abort callback registered on the request fires
 *      exactly once, on the loop thread. From then on http_respond*,
 *      http_stream_* and http_add_header send nothing and return
 *      HTTP_ERR_GONE, but the application must still make the completing
 *      call to give its reference back (it may do so inside on_abort).
 *   4. The request memory (strings, body, headers) is freed when both the
 *      connection and the application have let go, whichever is last.
 * Completion may happen inside the handler or any time later on the loop.
 *
 * EOF from the client while a response is pending counts as a disconnect
 * (an LLM client that half-closes is treated as gone, so the engine can stop
 * work nobody will read).
 *
 * Shutdown: http_server_shutdown() stops accepting, closes idle
 * connections, lets in-flight responses finish (their connections close
 * afterwards), and at the deadline closes what is left (aborting those
 * requests). Its callback runs once every connection is closed; then
 * http_server_free(). */
#ifndef EBB_SERVER_HTTP_H
#define EBB_SERVER_HTTP_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

struct http_server;

/* The request as the application sees it. All fields are read-only for the
 * application except `route` and `data`; strings are NUL-terminated and live
 * as long as the request. */
struct http_request {
    const char *method;      /* "GET", "POST", ... */
    const char *path;        /* request target before '?', as sent (not percent-decoded) */
    const char *query;       /* after '?', "" when none */
    const char *body;        /* the body with a NUL after it ("" when none) */
    size_t body_len;         /* excluding that NUL */
    uint64_t id;             /* unique within the server, from 1; also sent as X-Request-Id */
    int http_minor;          /* 1 for HTTP/1.1, 0 for HTTP/1.0 */
    uint64_t start_ns;       /* uv_hrtime() when the first byte of the request arrived */
    struct http_server *server;
    const char *route;       /* set by the application's router: the matched route's name, a
                                string that outlives the request, for logs and metrics; NULL
                                until routed (and for requests this layer refused) */
    void *data;              /* application slot; never touched by this layer */
};

/* Error codes returned by the calls below (negative). */
#define HTTP_ERR_GONE (-1)     /* the client disconnected; nothing was sent */
#define HTTP_ERR_STATE (-2)    /* call out of order (e.g. stream_write before stream_start) */
#define HTTP_ERR_INVALID (-3)  /* bad argument (a header with CR/LF, an unknown status...) */
#define HTTP_ERR_NOMEM (-4)

typedef void (*http_handler_cb)(struct http_request *req, void *arg);
typedef void (*http_abort_cb)(struct http_request *req, void *arg);

/* What happened to one request, for access logs and metrics. Reported once
 * per request the server saw: handed to the handler (`dispatched`) or
 * answered by this layer (400/408/413/431/503; `method`/`path` may be ""). */
struct http_done_info {
    const struct http_request *req;  /* valid only during the callback */
    int status;              /* status sent (or being sent); 0 when nothing was sent */
    bool dispatched;         /* the handler saw it */
    bool aborted;            /* the client went away before the response ended */
    double seconds;          /* from the first byte of the request to the end of the response */
    uint64_t bytes_out;      /* response bytes queued, headers included */
};
typedef void (*http_done_cb)(const struct http_done_info *info, void *arg);

struct http_config {
    size_t max_body;              /* bytes; default 8 MiB */
    size_t max_header;            /* request line + headers, bytes; default 16 KiB */
    unsigned header_timeout_ms;   /* from the first byte to the end of the headers; default 10 s */
    unsigned idle_timeout_ms;     /* keep-alive idle, and body inactivity; default 30 s */
    unsigned request_timeout_ms;  /* from the first byte to the end of the body, however
                                     steadily it arrives; default 60 s */
    unsigned max_connections;     /* default 1024; more are answered 503 and closed */
    size_t max_write_queue;       /* bytes queued to a client that does not read; over it the
                                     client is treated as gone; default 16 MiB */
    http_handler_cb on_request;   /* required */
    http_done_cb on_done;         /* optional */
    void *arg;                    /* passed to the callbacks */
};

/* Counters kept by the server itself (the loop thread reads them). */
struct http_stats {
    uint64_t connections_accepted;
    uint64_t connections_rejected;   /* over max_connections */
    uint64_t connections_open;
    uint64_t requests;               /* handed to the handler */
    uint64_t requests_aborted;
    uint64_t transport_errors;       /* 400/408/413/431 answered by this layer */
};

/* Fills unset (zero) fields with the defaults above. */
void http_config_defaults(struct http_config *cfg);

/* Creates a server on `loop`; the config is copied (defaults applied).
 * NULL if out of memory or on_request is missing. */
struct http_server *http_server_new(uv_loop_t *loop, const struct http_config *cfg);

/* Listens on host:port (an IPv4 or IPv6 literal, or a name resolved once,
 * synchronously -- call it at start-up). Port 0 picks a free port; see
 * http_server_port(). May be called more than once for several addresses.
 * Returns 0 or a negative libuv error (uv_strerror() explains it). */
int http_server_listen(struct http_server *srv, const char *host, int port);

/* The port of the most recent successful listen (useful after port 0). */
int http_server_port(const struct http_server *srv);

void http_server_stats(const struct http_server *srv, struct http_stats *out);

/* Graceful shutdown; `done` (optional) runs once everything is closed.
 * Calling it again re-arms the deadline to `deadline_ms` from now (0: close
 * everything at the next loop iteration); the first `done` is kept. */
void http_server_shutdown(struct http_server *srv, unsigned deadline_ms,
                          void (*done)(struct http_server *srv, void *arg), void *arg);

/* Frees the server. Only after the shutdown callback ran (or before any
 * listen); returns -1 and does nothing otherwise. */
int http_server_free(struct http_server *srv);

/* ---- requests ---- */

/* Value of the first header named `name` (case-insensitive), or NULL. */
const char *http_header(const struct http_request *req, const char *name);
/* Header number i (0-based) in arrival order; false past the end. */
bool http_header_at(const struct http_request *req, size_t i, const char **name, const char **value);

/* Registers the abort callback (replacing an earlier one). Returns 0, or
 * HTTP_ERR_GONE when the client is already gone (the callback will not be
 * called: act on it now). */
int http_request_on_abort(struct http_request *req, http_abort_cb cb, void *arg);
bool http_request_aborted(const struct http_request *req);

void http_request_retain(struct http_request *req);
void http_request_release(struct http_request *req);

/* ---- responses (loop thread only) ---- */

/* Adds a response header before http_respond / http_stream_start. Name and
 * value are copied; CR, LF or NUL in them are refused (HTTP_ERR_INVALID).
 * Content-Length, Transfer-Encoding and Connection are managed here. */
int http_add_header(struct http_request *req, const char *name, const char *value);

/* A complete response with a Content-Length body. `content_type` may be NULL
 * when len is 0. Completes the request (see the ownership rule). Returns 0,
 * or a negative HTTP_ERR_* (the request is completed in every case: a status
 * outside 200..999 sends a 500 instead, a call after http_stream_start ends
 * the stream). */
int http_respond(struct http_request *req, int status, const char *content_type,
                 const void *body, size_t len);

/* {"error":{"message":...,"type":...,"param":...,"code":null}} with status.
 * `param` may be NULL (JSON null). Bytes of `message` that are not valid
 * UTF-8 become '?'. Completes the request. */
int http_respond_error(struct http_request *req, int status, const char *type,
                       const char *message, const char *param);
/* The same with an OpenAI error code ("model_not_found",
 * "context_length_exceeded", ...) that clients branch on; NULL: null. */
int http_respond_error_code(struct http_request *req, int status, const char *type, const char *code,
                            const char *message, const char *param);
/* The path after `prefix` as one segment, percent-decoded into out: 0, or
 * -1 when it holds a '/', a bad or NUL escape, or does not fit. */
int http_path_segment(const struct http_request *req, const char *prefix, char *out, size_t cap);

/* OpenAI-shaped error JSON text (malloc'd, caller frees), for routes that
 * must send an error inside a stream. `param` and `code` may be NULL. */
char *http_error_json(const char *type, const char *message, const char *param,
                      const char *code, size_t *len);

/* Streaming: the head goes out at once with Transfer-Encoding: chunked (or,
 * for an HTTP/1.0 client, without length and closing at the end). Each write
 * is one chunk, handed to the socket immediately (TCP_NODELAY is set).
 * stream_write returns HTTP_ERR_GONE once the client has gone, so a producer
 * can stop early. http_stream_end() completes the request. */
int http_stream_start(struct http_request *req, int status, const char *content_type);
int http_stream_write(struct http_request *req, const void *data, size_t len);
int http_stream_end(struct http_request *req);

/* Standard reason phrase for a status ("Unknown" when not known). */
const char *http_status_reason(int status);
#endif
