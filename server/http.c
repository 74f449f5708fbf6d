/* HTTP/1.1 server: libuv for sockets and timers, llhttp for parsing.
 * The contract (threading, ownership, ordering) is at the top of http.h.
 *
 * Connection state machine (conn->phase):
 *
 *   IDLE ──first byte──▶ HEADERS ──headers done──▶ BODY ──message done──▶ HANDLING
 *    ▲                                                                      │
 *    └───────────── response completed, keep-alive ◀──────────────────────┘
 *   any phase ──error / close / timeout──▶ CLOSING (lingering) ──▶ closed
 *
 * One timer per connection serves every phase: IDLE waits for the next
 * request (the header timeout for a fresh connection, the idle timeout
 * between keep-alive requests; either way it closes quietly), HEADERS is the
 * slow-loris guard (not re-armed by trickling bytes: 408), BODY is an
 * inactivity timer re-armed by each read (408), HANDLING has none (the
 * application decides), CLOSING bounds the lingering drain. Over HEADERS and
 * BODY together runs the request deadline (request_timeout_ms from the
 * request's first byte, c->deadline): the timer is never armed past it, so a
 * client that trickles a byte now and then, which re-arms the body timer
 * forever, still gets its 408 when the deadline comes. The same timer,
 * armed with 0 ms, also defers parsing of pipelined input after an
 * asynchronous completion, so the next request's handler never runs inside
 * the application's http_respond() call.
 *
 * Parsing pauses (HPE_PAUSED from on_message_complete) at the end of each
 * request; while a request is being handled the socket is still read, so a
 * disconnect is noticed at once, but the bytes are only buffered (up to
 * PIPELINE_CAP; then reading stops until the response ends).
 *
 * Every response leaves as one uv_write of one heap block (head and body
 * together), or one block per stream chunk; blocks are freed by the write
 * callback. Closing after a response uses uv_shutdown, which waits for queued
 * writes, whereas an abort uses uv_close directly, which cancels them. */
#include "server/http.h"

#include <jansson.h>
#include <llhttp.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define REQ_MAGIC 0x72657131u
#define PIPELINE_CAP (64 * 1024)   /* unparsed input buffered while a request is handled */
#define READ_CHUNK (64 * 1024)
#define LINGER_MS 2000             /* how long a closing connection drains input */
#define MAX_LISTENERS 8

enum phase { PHASE_IDLE, PHASE_HEADERS, PHASE_BODY, PHASE_HANDLING, PHASE_CLOSING };
enum resp_state { RESP_NONE, RESP_STREAMING, RESP_DONE };

struct header_ref {
    uint32_t name_off, value_off;   /* into req->raw; value_off == UINT32_MAX: empty */
};

struct conn;

struct req {
    struct http_request pub;       /* first: the application's pointer is this struct's */
    uint32_t magic;
    int refs;
    struct conn *conn;             /* NULL once the connection let go */

    /* Request storage: the URL and every header name and value, each
     * NUL-terminated, in one buffer addressed by offsets while it grows. */
    char *raw;
    size_t raw_len, raw_cap;
    struct header_ref *hdrs;
    size_t n_hdrs, cap_hdrs;
    char *body;
    size_t body_len, body_cap;

    /* Response side. */
    char *extra;                   /* "Name: value\r\n" lines from http_add_header */
    size_t extra_len, extra_cap;
    enum resp_state resp;
    int status;
    bool head_only;                /* HEAD: headers, no body */
    bool chunked;                  /* streaming with chunked encoding (else close-delimited) */
    bool dispatched, aborted, completed, reported;
    uint64_t bytes_out;
    http_abort_cb abort_cb;
    void *abort_arg;
};

struct conn {
    uv_tcp_t tcp;                  /* tcp.data and timer.data point back here */
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    llhttp_t parser;
    struct http_server *srv;
    struct conn *prev, *next;      /* server's list */
    enum phase phase;
    struct req *cur;               /* request being parsed or handled */

    char *in;                      /* received bytes; [in_off, in_len) not parsed yet */
    size_t in_off, in_len, in_cap;

    /* Parser bookkeeping for the current request. */
    size_t header_bytes;           /* request line + headers, for max_header */
    size_t chunk_ext_bytes;        /* chunk extensions of the body, for MAX_CHUNK_EXTENSIONS */
    const char *parse_start;       /* the buffer llhttp_execute is reading */
    char last_solid;               /* the last byte before it that is not a space or tab */
    bool in_field, in_value, headers_done;
    int error_status;              /* set by a callback that refused the request */
    const char *error_message;

    uint64_t deadline;             /* loop time (ms) by which the request must be in */
    bool keep_alive;               /* decided at the end of the headers */
    bool reading, eof, closing, in_dispatch, resume_pending;
    bool linger;                   /* after shutdown, drain input before closing */
    int handles_open;              /* tcp + timer: freed when both closed */
};

struct http_server {
    uv_loop_t *loop;
    struct http_config cfg;
    uv_tcp_t *listeners[MAX_LISTENERS];
    int n_listeners, listeners_open;
    int port;
    struct conn *conns;
    uint64_t n_conns;
    uint64_t next_id;
    struct http_stats stats;

    bool shutting_down, shutdown_timer_live, done_called;
    uv_timer_t shutdown_timer;
    void (*shutdown_cb)(struct http_server *srv, void *arg);
    void *shutdown_arg;

    char date[40];                 /* "Date: ...\r\n", refreshed once a second */
    time_t date_sec;
};

static llhttp_settings_t parser_settings;
static bool parser_settings_ready;

static void conn_process(struct conn *c);
static void conn_finish(struct conn *c, bool linger);
static void on_conn_timer(uv_timer_t *t);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void conn_close_now(struct conn *c);
static void conn_abort(struct conn *c);
static void req_release(struct req *r);
static void check_shutdown_done(struct http_server *srv);

static struct req *req_of(struct http_request *pub) { return (struct req *)pub; }

/* ---------------------------------------------------------------- buffers */

/* Grows *buf so that `need` more bytes fit; 0 or -1 when out of memory. */
static int buf_reserve(char **buf, size_t *cap, size_t len, size_t need) {
    if (len + need <= *cap) return 0;
    size_t ncap = *cap ? *cap : 256;
    while (ncap < len + need) ncap *= 2;
    char *p = realloc(*buf, ncap);
    if (!p) return -1;
    *buf = p;
    *cap = ncap;
    return 0;
}

static int buf_append(char **buf, size_t *len, size_t *cap, const void *data, size_t n) {
    if (buf_reserve(buf, cap, *len, n + 1)) return -1;
    memcpy(*buf + *len, data, n);
    *len += n;
    (*buf)[*len] = '\0';
    return 0;
}

/* ---------------------------------------------------------------- status */

const char *http_status_reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 499: return "Client Closed Request";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

/* ---------------------------------------------------------------- requests */

static struct req *req_new(struct conn *c) {
    struct req *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->magic = REQ_MAGIC;
    r->refs = 1;                               /* the connection's */
    r->conn = c;
    r->pub.server = c->srv;
    r->pub.id = ++c->srv->next_id;
    r->pub.start_ns = uv_hrtime();
    r->pub.method = "";
    r->pub.path = "";
    r->pub.query = "";
    r->pub.body = "";
    r->pub.http_minor = 1;
    return r;
}

static void req_free(struct req *r) {
    r->magic = 0;
    free(r->raw);
    free(r->hdrs);
    free(r->body);
    free(r->extra);
    free(r);
}

static void req_release(struct req *r) {
    if (--r->refs == 0) req_free(r);
}

void http_request_retain(struct http_request *req) { req_of(req)->refs++; }

void http_request_release(struct http_request *req) {
    if (req) req_release(req_of(req));
}

bool http_request_aborted(const struct http_request *req) { return ((const struct req *)req)->aborted; }

int http_request_on_abort(struct http_request *req, http_abort_cb cb, void *arg) {
    struct req *r = req_of(req);
    if (r->aborted) return HTTP_ERR_GONE;
    r->abort_cb = cb;
    r->abort_arg = arg;
    return 0;
}

static const char *raw_at(const struct req *r, uint32_t off) { return off == UINT32_MAX ? "" : r->raw + off; }

const char *http_header(const struct http_request *req, const char *name) {
    const struct req *r = (const struct req *)req;
    for (size_t i = 0; i < r->n_hdrs; i++)
        if (!strcasecmp(raw_at(r, r->hdrs[i].name_off), name)) return raw_at(r, r->hdrs[i].value_off);
    return NULL;
}

bool http_header_at(const struct http_request *req, size_t i, const char **name, const char **value) {
    const struct req *r = (const struct req *)req;
    if (i >= r->n_hdrs) return false;
    if (name) *name = raw_at(r, r->hdrs[i].name_off);
    if (value) *value = raw_at(r, r->hdrs[i].value_off);
    return true;
}

/* Reports the request to on_done, once. */
static void req_report(struct req *r) {
    if (r->reported) return;
    r->reported = true;
    struct http_server *srv = r->pub.server;
    if (!srv->cfg.on_done) return;
    struct http_done_info info = {
        .req = &r->pub,
        .status = r->status,
        .dispatched = r->dispatched,
        .aborted = r->aborted,
        .seconds = (double)(uv_hrtime() - r->pub.start_ns) / 1e9,
        .bytes_out = r->bytes_out,
    };
    srv->cfg.on_done(&info, srv->cfg.arg);
}

/* ---------------------------------------------------------------- writing */

struct wblock {
    uv_write_t w;
    struct conn *conn;
    size_t len;
    char data[];
};

static void on_write(uv_write_t *w, int status) {
    struct wblock *b = (struct wblock *)w;
    struct conn *c = b->conn;
    free(b);
    if (status < 0 && !c->closing) {
        /* The peer is gone (EPIPE, ECONNRESET): whatever is in flight is aborted. */
        conn_abort(c);
    }
}

/* Queues `n` bytes (copied) from up to three pieces. 0, or -1 when the
 * connection cannot take them (it is then being closed). */
static int conn_write3(struct conn *c, const void *a, size_t na, const void *b, size_t nb,
                       const void *d, size_t nd) {
    if (c->closing) return -1;
    struct wblock *blk = malloc(sizeof *blk + na + nb + nd);
    if (!blk) { conn_abort(c); return -1; }
    blk->conn = c;
    blk->len = na + nb + nd;
    if (na) memcpy(blk->data, a, na);
    if (nb) memcpy(blk->data + na, b, nb);
    if (nd) memcpy(blk->data + na + nb, d, nd);
    uv_buf_t buf = uv_buf_init(blk->data, (unsigned)blk->len);
    int rc = uv_write(&blk->w, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rc < 0) {
        free(blk);
        conn_abort(c);
        return -1;
    }
    if (c->cur) c->cur->bytes_out += blk->len;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > c->srv->cfg.max_write_queue) {
        /* A client that does not read its stream would make us buffer the
         * whole generation; treat it as gone. */
        conn_abort(c);
        return -1;
    }
    return 0;
}

static const char *date_header(struct http_server *srv) {
    time_t now = time(NULL);
    if (now != srv->date_sec) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(srv->date, sizeof srv->date, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        srv->date_sec = now;
    }
    return srv->date;
}

/* Formats the status line and headers into `out` (malloc'd). `length` is the
 * Content-Length, or -1 for a streamed body. */
static char *build_head(struct req *r, struct conn *c, int status, const char *content_type,
                        long long length, size_t *out_len) {
    char *h = NULL;
    size_t len = 0, cap = 0;
    char line[512];
    int n = snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n%sX-Request-Id: %llu\r\n", status,
                     http_status_reason(status), date_header(c->srv), (unsigned long long)r->pub.id);
    bool ok = buf_append(&h, &len, &cap, line, (size_t)n) == 0;
    if (ok && content_type) {
        n = snprintf(line, sizeof line, "Content-Type: %s\r\n", content_type);
        ok = n < (int)sizeof line && buf_append(&h, &len, &cap, line, (size_t)n) == 0;
    }
    bool no_body_status = status == 204 || status == 304 || (status >= 100 && status < 200);
    if (ok && !no_body_status) {
        if (length >= 0) n = snprintf(line, sizeof line, "Content-Length: %lld\r\n", length);
        else if (r->chunked) n = snprintf(line, sizeof line, "Transfer-Encoding: chunked\r\n");
        else n = 0;
        ok = buf_append(&h, &len, &cap, line, (size_t)n) == 0;
    }
    if (ok && !c->keep_alive) ok = buf_append(&h, &len, &cap, "Connection: close\r\n", 19) == 0;
    else if (ok && r->pub.http_minor == 0) ok = buf_append(&h, &len, &cap, "Connection: keep-alive\r\n", 24) == 0;
    if (ok && r->extra_len) ok = buf_append(&h, &len, &cap, r->extra, r->extra_len) == 0;
    if (ok) ok = buf_append(&h, &len, &cap, "\r\n", 2) == 0;
    if (!ok) { free(h); return NULL; }
    *out_len = len;
    return h;
}

/* ---------------------------------------------------------------- responses */

static bool valid_token(const char *s) {
    if (!*s) return false;
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch <= 32 || ch >= 127 || strchr("()<>@,;:\\\"/[]?={}", ch)) return false;
    }
    return true;
}

int http_add_header(struct http_request *req, const char *name, const char *value) {
    struct req *r = req_of(req);
    if (r->aborted) return HTTP_ERR_GONE;
    if (r->resp != RESP_NONE) return HTTP_ERR_STATE;
    if (!name || !value || !valid_token(name) || strpbrk(value, "\r\n")) return HTTP_ERR_INVALID;
    if (!strcasecmp(name, "Content-Length") || !strcasecmp(name, "Transfer-Encoding") ||
        !strcasecmp(name, "Connection"))
        return HTTP_ERR_INVALID;
    if (buf_append(&r->extra, &r->extra_len, &r->extra_cap, name, strlen(name)) ||
        buf_append(&r->extra, &r->extra_len, &r->extra_cap, ": ", 2) ||
        buf_append(&r->extra, &r->extra_len, &r->extra_cap, value, strlen(value)) ||
        buf_append(&r->extra, &r->extra_len, &r->extra_cap, "\r\n", 2))
        return HTTP_ERR_NOMEM;
    return 0;
}

/* What a connection does after its current response ended. */
static void conn_after_response(struct conn *c) {
    if (!c->keep_alive || c->srv->shutting_down || c->eof) {
        conn_finish(c, false);
        return;
    }
    c->phase = PHASE_IDLE;
    if (!c->reading) {
        /* Reading stopped because pipelined input filled the buffer. */
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
        if (!c->reading) {   /* the next request could never arrive */
            conn_finish(c, false);
            return;
        }
    }
    if (c->in_off < c->in_len && !c->in_dispatch) {
        /* Parse the pipelined request from the loop, not from inside the
         * application's completing call. */
        c->resume_pending = true;
        uv_timer_start(&c->timer, on_conn_timer, 0, 0);
        return;
    }
    /* When in dispatch, conn_process's loop goes on; the next request's
     * first byte replaces this with the header timer. */
    uv_timer_start(&c->timer, on_conn_timer, c->srv->cfg.idle_timeout_ms, 0);
}

/* The application's completing call: report, detach from the connection,
 * give the application's reference back. */
static void req_complete(struct req *r) {
    if (r->completed) return;
    r->completed = true;
    r->resp = RESP_DONE;
    req_report(r);
    struct conn *c = r->conn;
    if (c) {
        c->cur = NULL;
        r->conn = NULL;
        req_release(r);                 /* the connection's reference */
        if (!c->closing) conn_after_response(c);
    }
    req_release(r);                     /* the application's reference */
}

int http_respond(struct http_request *req, int status, const char *content_type, const void *body, size_t len) {
    struct req *r = req_of(req);
    if (r->magic != REQ_MAGIC || r->completed) return HTTP_ERR_STATE;
    if (r->resp == RESP_STREAMING) {
        /* A programming error, but the client must not hang: end the stream. */
        http_stream_end(req);
        return HTTP_ERR_STATE;
    }
    int rc = 0;
    if (status < 200 || status > 999) {
        static const char msg[] = "{\"error\":{\"message\":\"invalid response status\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        status = 500;
        content_type = "application/json";
        body = msg;
        len = sizeof msg - 1;
        rc = HTTP_ERR_INVALID;
    }
    if (r->aborted || !r->conn) rc = HTTP_ERR_GONE;
    else {
        struct conn *c = r->conn;
        size_t head_len;
        r->status = status;
        r->resp = RESP_DONE;
        char *head = build_head(r, c, status, content_type, (long long)len, &head_len);
        if (!head) {
            rc = HTTP_ERR_NOMEM;   /* the connection is closed: nothing half-sent */
            conn_abort(c);
        } else {
            bool send_body = !r->head_only && status != 204 && status != 304;
            if (conn_write3(c, head, head_len, send_body ? body : NULL, send_body ? len : 0, NULL, 0))
                rc = HTTP_ERR_GONE;
            free(head);
        }
    }
    req_complete(r);
    return rc;
}

/* A JSON string for `s`; text that is not valid UTF-8 (a client's raw path
 * quoted in a message) has its non-ASCII bytes replaced by '?' rather than
 * losing the whole message. */
static json_t *json_string_lossy(const char *s) {
    json_t *j = json_string(s);
    if (j) return j;
    char *copy = strdup(s);
    if (!copy) return NULL;
    for (char *p = copy; *p; p++)
        if ((unsigned char)*p >= 0x80) *p = '?';
    j = json_string(copy);
    free(copy);
    return j;
}

char *http_error_json(const char *type, const char *message, const char *param, const char *code, size_t *len) {
    json_t *err = json_pack("{s:{s:o, s:o, s:o, s:o}}", "error",
                            "message", json_string_lossy(message ? message : ""),
                            "type", json_string_lossy(type ? type : "server_error"),
                            "param", param ? json_string_lossy(param) : json_null(),
                            "code", code ? json_string_lossy(code) : json_null());
    if (!err) return NULL;
    char *text = json_dumps(err, JSON_COMPACT);
    json_decref(err);
    if (text && len) *len = strlen(text);
    return text;
}

int http_respond_error(struct http_request *req, int status, const char *type, const char *message,
                       const char *param) {
    return http_respond_error_code(req, status, type, NULL, message, param);
}

static int hex_digit(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

int http_path_segment(const struct http_request *req, const char *prefix, char *out, size_t cap) {
    const size_t n = strlen(prefix);
    if (strncmp(req->path, prefix, n)) return -1;
    size_t k = 0;
    for (const char *p = req->path + n; *p; p++) {
        int c = (unsigned char)*p;
        if (c == '/') return -1;
        if (c == '%') {
            const int hi = hex_digit(p[1]), lo = hi < 0 ? -1 : hex_digit(p[2]);
            if (lo < 0 || (hi | lo) == 0) return -1;   /* a bad escape, or %00 */
            c = hi * 16 + lo;
            p += 2;
        }
        if (k + 1 >= cap) return -1;
        out[k++] = (char)c;
    }
    out[k] = 0;
    return 0;
}

int http_respond_error_code(struct http_request *req, int status, const char *type, const char *code,
                            const char *message, const char *param) {
    size_t len = 0;
    char *body = http_error_json(type, message, param, code, &len);
    if (!body) {
        static const char fallback[] = "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        return http_respond(req, status, "application/json", fallback, sizeof fallback - 1);
    }
    int rc = http_respond(req, status, "application/json", body, len);
    free(body);
    return rc;
}

int http_stream_start(struct http_request *req, int status, const char *content_type) {
    struct req *r = req_of(req);
    if (r->magic != REQ_MAGIC || r->completed) return HTTP_ERR_STATE;
    if (r->aborted || !r->conn) return HTTP_ERR_GONE;
    if (r->resp != RESP_NONE) return HTTP_ERR_STATE;
    if (status < 200 || status > 999) return HTTP_ERR_INVALID;
    struct conn *c = r->conn;
    r->status = status;
    r->resp = RESP_STREAMING;
    r->chunked = r->pub.http_minor >= 1;
    if (!r->chunked) c->keep_alive = false;   /* HTTP/1.0: the end of the body is the close */
    size_t head_len;
    char *head = build_head(r, c, status, content_type, -1, &head_len);
    if (!head) { conn_abort(c); return HTTP_ERR_NOMEM; }
    int rc = conn_write3(c, head, head_len, NULL, 0, NULL, 0);
    free(head);
    return rc ? HTTP_ERR_GONE : 0;
}

int http_stream_write(struct http_request *req, const void *data, size_t len) {
    struct req *r = req_of(req);
    if (r->magic != REQ_MAGIC || r->completed) return HTTP_ERR_STATE;
    if (r->aborted || !r->conn) return HTTP_ERR_GONE;
    if (r->resp != RESP_STREAMING) return HTTP_ERR_STATE;
    if (len == 0 || r->head_only) return 0;   /* a zero-length chunk would end the body */
    int rc;
    if (r->chunked) {
        char size_line[24];
        int n = snprintf(size_line, sizeof size_line, "%zx\r\n", len);
        rc = conn_write3(r->conn, size_line, (size_t)n, data, len, "\r\n", 2);
    } else {
        rc = conn_write3(r->conn, data, len, NULL, 0, NULL, 0);
    }
    return rc ? HTTP_ERR_GONE : 0;
}

int http_stream_end(struct http_request *req) {
    struct req *r = req_of(req);
    if (r->magic != REQ_MAGIC || r->completed) return HTTP_ERR_STATE;
    int rc = 0;
    if (r->aborted || !r->conn) rc = HTTP_ERR_GONE;
    else if (r->resp != RESP_STREAMING) rc = HTTP_ERR_STATE;
    else if (r->chunked && !r->head_only && conn_write3(r->conn, "0\r\n\r\n", 5, NULL, 0, NULL, 0))
        rc = HTTP_ERR_GONE;
    if (rc == HTTP_ERR_STATE && !r->aborted && r->conn) {
        /* Ending a stream that never started: answer something rather than hang. */
        return http_respond_error(req, 500, "server_error", "response ended before it started", NULL);
    }
    req_complete(r);
    return rc;
}

/* ---------------------------------------------------------------- connection end */

static void on_conn_handle_closed(uv_handle_t *h) {
    struct conn *c = h->data;
    if (--c->handles_open > 0) return;
    struct http_server *srv = c->srv;
    struct req *r = c->cur;
    if (r) {   /* a request never dispatched, or aborted and not yet completed */
        c->cur = NULL;
        r->conn = NULL;
        if (r->dispatched && r->aborted && !r->completed && r->abort_cb) {
            /* Fired here, from the loop, never from inside an http_* call the
             * application is making; the connection's reference keeps `r`
             * alive across the callback even if the callback completes it. */
            r->abort_cb(&r->pub, r->abort_arg);
        }
        req_release(r);
    }
    if (c->prev) c->prev->next = c->next;
    else srv->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    srv->n_conns--;
    srv->stats.connections_open = srv->n_conns;
    free(c->in);
    free(c);
    check_shutdown_done(srv);
}

/* Closes at once: queued writes are cancelled. */
static void conn_close_now(struct conn *c) {
    c->closing = true;
    c->phase = PHASE_CLOSING;
    if (!uv_is_closing((uv_handle_t *)&c->tcp)) uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    if (!uv_is_closing((uv_handle_t *)&c->timer)) uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
}

/* The client is gone, or we give up on it: the request in flight is marked
 * aborted now (so further http_* calls are no-ops) and its on_abort fires
 * when the connection has closed. */
static void conn_abort(struct conn *c) {
    struct req *r = c->cur;
    if (r && r->dispatched && !r->completed && !r->aborted) {
        r->aborted = true;
        c->srv->stats.requests_aborted++;
        req_report(r);
    }
    conn_close_now(c);
}

static void on_shutdown_done(uv_shutdown_t *s, int status) {
    struct conn *c = s->data;
    if (status < 0 || c->eof || !c->linger) {
        conn_close_now(c);
        return;
    }
    uv_timer_start(&c->timer, on_conn_timer, LINGER_MS, 0);
}

/* Ends a connection politely: queued writes are flushed, then the write side
 * is shut. With `linger` (after an error answered while the client may still
 * be sending), input is then drained until EOF or LINGER_MS, so the client
 * reads our answer instead of a reset. A client that does not read at all is
 * cut off after the idle timeout. */
static void conn_finish(struct conn *c, bool linger) {
    if (c->closing) return;
    c->closing = true;
    c->linger = linger;
    c->phase = PHASE_CLOSING;
    c->in_off = c->in_len = 0;
    c->shutdown_req.data = c;
    if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown_done) < 0) {
        conn_close_now(c);
        return;
    }
    uv_timer_start(&c->timer, on_conn_timer, c->srv->cfg.idle_timeout_ms, 0);
}

/* ---------------------------------------------------------------- transport errors */

/* Answers a problem found before the application saw the request, then
 * closes the connection (lingering). */
static void transport_error(struct conn *c, int status, const char *message) {
    if (c->closing) return;
    struct http_server *srv = c->srv;
    struct req *r = c->cur;
    struct req tmp;
    if (!r) {
        memset(&tmp, 0, sizeof tmp);
        tmp.pub.method = tmp.pub.path = tmp.pub.query = tmp.pub.body = "";
        tmp.pub.server = srv;
        tmp.pub.id = ++srv->next_id;
        tmp.pub.start_ns = uv_hrtime();
        tmp.pub.http_minor = 1;
        r = &tmp;
    }
    c->keep_alive = false;
    r->status = status;
    if (status != 503) srv->stats.transport_errors++;
    size_t body_len = 0;
    const char *type = status >= 500 ? "server_error" : "invalid_request_error";
    char *body = http_error_json(type, message, NULL, NULL, &body_len);
    size_t head_len = 0;
    char *head = body ? build_head(r, c, status, "application/json", (long long)body_len, &head_len) : NULL;
    if (head) {
        r->resp = RESP_DONE;
        conn_write3(c, head, head_len, body, body_len, NULL, 0);
        if (r == &tmp) {
            /* conn_write3 counted the bytes on c->cur, which is not tmp */
            tmp.bytes_out = head_len + body_len;
        }
    }
    free(head);
    free(body);
    req_report(r);
    conn_finish(c, true);
}

/* ---------------------------------------------------------------- timers */

/* Arms the connection's timer for a phase of receiving a request: `ms`, or
 * less when the request deadline comes first. */
static void arm_receive_timer(struct conn *c, unsigned ms) {
    const uint64_t now = uv_now(c->srv->loop);
    const uint64_t left = c->deadline > now ? c->deadline - now : 0;
    uv_timer_start(&c->timer, on_conn_timer, ms < left ? ms : left, 0);
}

static void on_conn_timer(uv_timer_t *t) {
    struct conn *c = t->data;
    if (c->resume_pending) {
        c->resume_pending = false;
        uv_timer_start(&c->timer, on_conn_timer, c->srv->cfg.idle_timeout_ms, 0);
        conn_process(c);   /* a request's first byte re-arms the timer for headers */
        return;
    }
    const bool past_deadline = uv_now(c->srv->loop) >= c->deadline;
    char msg[160];
    switch (c->phase) {
    case PHASE_IDLE:
        conn_finish(c, false);   /* nothing was asked: close quietly */
        break;
    case PHASE_HEADERS:
    case PHASE_BODY:
        if (past_deadline) {
            snprintf(msg, sizeof msg, "the request was not received in full within %g s of its first byte "
                     "(request_timeout_ms): its %s arrived too slowly", c->srv->cfg.request_timeout_ms / 1000.0,
                     c->phase == PHASE_HEADERS ? "headers" : "body");
            transport_error(c, 408, msg);
        } else {
            transport_error(c, 408, c->phase == PHASE_HEADERS ? "request headers not received in time"
                                                              : "request body stalled");
        }
        break;
    case PHASE_CLOSING:
        conn_close_now(c);
        break;
    case PHASE_HANDLING:
        break;
    }
}

/* ---------------------------------------------------------------- parser callbacks */

static struct conn *conn_of(llhttp_t *p) { return p->data; }

static int refuse(struct conn *c, int status, const char *message) {
    c->error_status = status;
    c->error_message = message;
    return HPE_USER;
}

static int on_message_begin(llhttp_t *p) {
    struct conn *c = conn_of(p);
    c->cur = req_new(c);
    if (!c->cur) return refuse(c, 503, "out of memory");
    c->phase = PHASE_HEADERS;
    c->header_bytes = c->chunk_ext_bytes = 0;
    c->in_field = c->in_value = c->headers_done = false;
    c->deadline = uv_now(c->srv->loop) + c->srv->cfg.request_timeout_ms;
    arm_receive_timer(c, c->srv->cfg.header_timeout_ms);
    return 0;
}

static int header_bytes_ok(struct conn *c, size_t n) {
    c->header_bytes += n;
    return c->header_bytes <= c->srv->cfg.max_header;
}

static int raw_append(struct req *r, const char *at, size_t n) {
    if (buf_reserve(&r->raw, &r->raw_cap, r->raw_len, n + 1)) return -1;
    memcpy(r->raw + r->raw_len, at, n);
    r->raw_len += n;
    return 0;
}

static int raw_terminate(struct req *r) {
    if (buf_reserve(&r->raw, &r->raw_cap, r->raw_len, 1)) return -1;
    r->raw[r->raw_len++] = '\0';
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
    struct conn *c = conn_of(p);
    if (!header_bytes_ok(c, n)) return refuse(c, 414, "request target too long");
    return raw_append(c->cur, at, n) ? refuse(c, 503, "out of memory") : 0;
}

static int on_url_complete(llhttp_t *p) {
    struct conn *c = conn_of(p);
    return raw_terminate(c->cur) ? refuse(c, 503, "out of memory") : 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
    struct conn *c = conn_of(p);
    if (!header_bytes_ok(c, n + 4)) return refuse(c, 431, "request headers too large");
    if (c->headers_done) return 0;   /* trailers: counted, not kept */
    struct req *r = c->cur;
    if (!c->in_field) {
        if (r->n_hdrs == r->cap_hdrs) {
            size_t cap = r->cap_hdrs ? r->cap_hdrs * 2 : 16;
            struct header_ref *h = realloc(r->hdrs, cap * sizeof *h);
            if (!h) return refuse(c, 503, "out of memory");
            r->hdrs = h;
            r->cap_hdrs = cap;
        }
        r->hdrs[r->n_hdrs].name_off = (uint32_t)r->raw_len;
        r->hdrs[r->n_hdrs].value_off = UINT32_MAX;
        r->n_hdrs++;
        c->in_field = true;
    }
    return raw_append(r, at, n) ? refuse(c, 503, "out of memory") : 0;
}

static int on_header_field_complete(llhttp_t *p) {
    struct conn *c = conn_of(p);
    if (c->headers_done) return 0;
    c->in_field = false;
    return raw_terminate(c->cur) ? refuse(c, 503, "out of memory") : 0;
}

/* Whether a header value span starts a line: only blanks between it and the
 * previous newline. That is obs-fold, a value continued on the next line;
 * llhttp unfolds it, and a proxy that does not reads another Content-Length
 * (smuggling), so it is refused (RFC 9112 §5.2 allows either). */
static bool value_starts_a_line(const struct conn *c, const char *at) {
    const char *p = at;
    while (p > c->parse_start && (p[-1] == ' ' || p[-1] == '\t')) p--;
    return (p > c->parse_start ? p[-1] : c->last_solid) == '\n';
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
    struct conn *c = conn_of(p);
    if (!c->headers_done && value_starts_a_line(c, at))
        return refuse(c, 400, "malformed request: a header value continued on the next line (obs-fold) "
                              "is not accepted");
    if (!header_bytes_ok(c, n)) return refuse(c, 431, "request headers too large");
    if (c->headers_done) return 0;
    struct req *r = c->cur;
    if (!c->in_value) {
        r->hdrs[r->n_hdrs - 1].value_off = (uint32_t)r->raw_len;
        c->in_value = true;
    }
    return raw_append(r, at, n) ? refuse(c, 503, "out of memory") : 0;
}

static int on_header_value_complete(llhttp_t *p) {
    struct conn *c = conn_of(p);
    if (c->headers_done) return 0;
    if (c->in_value) {
        c->in_value = false;
        return raw_terminate(c->cur) ? refuse(c, 503, "out of memory") : 0;
    }
    return 0;
}

/* Chunk extensions are parsed and ignored; their bytes are bounded (as
 * Node.js does) so a client cannot keep one request busy with them. */
#define MAX_CHUNK_EXTENSIONS (16 * 1024)

static int on_chunk_extension(llhttp_t *p, const char *at, size_t n) {
    (void)at;
    struct conn *c = conn_of(p);
    c->chunk_ext_bytes += n;
    return c->chunk_ext_bytes > MAX_CHUNK_EXTENSIONS
               ? refuse(c, 400, "malformed request: chunk extensions over 16 KiB")
               : 0;
}

/* The origin-form path of a request target: absolute-form
 * ("http://host/path", which a server must accept, RFC 9112 §3.2.2) loses
 * its scheme and authority. */
static char *origin_path(char *url) {
    const char *colon = strstr(url, "://");
    if (url[0] == '/' || !colon || (strncasecmp(url, "http://", 7) && strncasecmp(url, "https://", 8))) return url;
    char *slash = strchr(colon + 3, '/');
    if (slash) return slash;
    /* "http://host" or "http://host?q": the path is "/"; keep the query */
    char *q = strchr(colon + 3, '?');
    if (!q) return (char *)"/";
    q[-1] = '/';   /* the last authority byte becomes the path: "...host/?q" -> "/?q" */
    return q - 1;
}

static int on_headers_complete(llhttp_t *p) {
    struct conn *c = conn_of(p);
    struct req *r = c->cur;
    struct http_server *srv = c->srv;
    c->headers_done = true;
    if (r->raw_len == 0 && raw_terminate(r)) return refuse(c, 503, "out of memory");
    /* The buffer no longer grows (trailers are not kept): pointers are stable. */
    char *url = origin_path(r->raw);
    char *q = strchr(url, '?');
    if (q) { *q = '\0'; r->pub.query = q + 1; }
    r->pub.path = url;
    /* HTTP/1.1 names its host exactly once (RFC 9112 §3.2). */
    int hosts = 0;
    for (size_t i = 0; i < r->n_hdrs; i++) hosts += !strcasecmp(r->raw + r->hdrs[i].name_off, "Host");
    if (llhttp_get_http_major(p) == 1 && llhttp_get_http_minor(p) >= 1 && hosts != 1)
        return refuse(c, 400, hosts ? "malformed request: more than one Host header"
                                    : "malformed request: an HTTP/1.1 request needs a Host header");
    r->pub.method = llhttp_method_name((llhttp_method_t)llhttp_get_method(p));
    r->pub.http_minor = llhttp_get_http_major(p) == 1 ? llhttp_get_http_minor(p) : 0;
    r->head_only = !strcmp(r->pub.method, "HEAD");
    c->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade && !srv->shutting_down;

    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > srv->cfg.max_body)
        return refuse(c, 413, "request body too large");
    bool has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
    const char *expect = http_header(&r->pub, "Expect");
    if (has_body && expect && !strcasecmp(expect, "100-continue") && r->pub.http_minor >= 1)
        conn_write3(c, "HTTP/1.1 100 Continue\r\n\r\n", 25, NULL, 0, NULL, 0);

    c->phase = PHASE_BODY;
    arm_receive_timer(c, srv->cfg.idle_timeout_ms);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
    struct conn *c = conn_of(p);
    struct req *r = c->cur;
    if (r->body_len + n > c->srv->cfg.max_body) return refuse(c, 413, "request body too large");
    if (buf_append(&r->body, &r->body_len, &r->body_cap, at, n)) return refuse(c, 503, "out of memory");
    return 0;
}

static int on_message_complete(llhttp_t *p) {
    struct conn *c = conn_of(p);
    struct req *r = c->cur;
    if (r->body) r->pub.body = r->body;
    r->pub.body_len = r->body_len;
    c->phase = PHASE_HANDLING;
    uv_timer_stop(&c->timer);
    return HPE_PAUSED;   /* the next request waits until this one is answered */
}

static void parser_settings_init(void) {
    if (parser_settings_ready) return;
    llhttp_settings_init(&parser_settings);
    parser_settings.on_message_begin = on_message_begin;
    parser_settings.on_url = on_url;
    parser_settings.on_url_complete = on_url_complete;
    parser_settings.on_header_field = on_header_field;
    parser_settings.on_header_field_complete = on_header_field_complete;
    parser_settings.on_header_value = on_header_value;
    parser_settings.on_chunk_extension_name = on_chunk_extension;
    parser_settings.on_chunk_extension_value = on_chunk_extension;
    parser_settings.on_header_value_complete = on_header_value_complete;
    parser_settings.on_headers_complete = on_headers_complete;
    parser_settings.on_body = on_body;
    parser_settings.on_message_complete = on_message_complete;
    parser_settings_ready = true;
}

/* ---------------------------------------------------------------- reading and parsing */

static void dispatch(struct conn *c) {
    struct req *r = c->cur;
    struct http_server *srv = c->srv;
    r->dispatched = true;
    r->refs++;                          /* the application's reference */
    srv->stats.requests++;
    c->in_dispatch = true;
    srv->cfg.on_request(&r->pub, srv->cfg.arg);
    c->in_dispatch = false;
}

static void conn_compact_input(struct conn *c) {
    if (c->in_off == c->in_len) {
        c->in_off = c->in_len = 0;
    } else if (c->in_off > 0) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
}

/* Parses buffered input until it runs out, a request is being handled, or
 * the connection closes. */
static void conn_process(struct conn *c) {
    while (!c->closing && c->phase != PHASE_HANDLING && c->in_off < c->in_len) {
        const char *start = c->in + c->in_off;
        c->parse_start = start;
        llhttp_errno_t e = llhttp_execute(&c->parser, start, c->in_len - c->in_off);
        /* what the next buffer's first span looks back to (value_starts_a_line) */
        const char *end = e == HPE_OK ? c->in + c->in_len : llhttp_get_error_pos(&c->parser);
        for (const char *b = end; b > start; b--)
            if (b[-1] != ' ' && b[-1] != '\t') { c->last_solid = b[-1]; break; }
        if (e == HPE_OK) {
            c->in_off = c->in_len;
            break;
        }
        if (e == HPE_PAUSED) {
            c->in_off = (size_t)(llhttp_get_error_pos(&c->parser) - c->in);
            llhttp_resume(&c->parser);
            dispatch(c);
            continue;
        }
        if (e == HPE_PAUSED_UPGRADE) {
            /* Upgrades are not supported; the request was answered and the
             * connection closes (keep_alive is false for upgrades). */
            c->in_off = c->in_len;
            if (!c->closing) conn_finish(c, false);
            break;
        }
        if (c->error_status) {
            transport_error(c, c->error_status, c->error_message);
        } else {
            char msg[160];
            snprintf(msg, sizeof msg, "malformed HTTP request: %s", llhttp_get_error_reason(&c->parser));
            transport_error(c, 400, msg);
        }
        break;
    }
    if (!c->closing) conn_compact_input(c);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    struct conn *c = h->data;
    (void)suggested;
    if (buf_reserve(&c->in, &c->in_cap, c->in_len, READ_CHUNK)) {
        *buf = uv_buf_init(NULL, 0);   /* libuv reports UV_ENOBUFS */
        return;
    }
    *buf = uv_buf_init(c->in + c->in_len, (unsigned)(c->in_cap - c->in_len));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    struct conn *c = s->data;
    (void)buf;
    if (nread == 0) return;
    if (nread < 0) {
        c->eof = true;
        uv_read_stop(s);
        c->reading = false;
        if (c->closing) {
            /* Lingering: the client has read our answer and closed. */
            if (!uv_is_closing((uv_handle_t *)&c->tcp)) conn_close_now(c);
        } else if (c->phase == PHASE_HANDLING) {
            conn_abort(c);              /* client gone while we were answering */
        } else if (c->phase == PHASE_IDLE && nread == UV_EOF) {
            conn_finish(c, false);      /* let queued responses flush */
        } else {
            conn_close_now(c);          /* mid-request EOF or a socket error */
        }
        return;
    }
    if (c->closing) {                   /* draining: discard */
        c->in_off = c->in_len = 0;
        return;
    }
    c->in_len += (size_t)nread;
    if (c->phase == PHASE_HANDLING) {
        if (c->in_len - c->in_off > PIPELINE_CAP) {
            uv_read_stop(s);
            c->reading = false;
        }
        return;
    }
    if (c->phase == PHASE_BODY) arm_receive_timer(c, c->srv->cfg.idle_timeout_ms);
    conn_process(c);
}

/* ---------------------------------------------------------------- accepting */

static void reject_connection(struct conn *c) {
    c->srv->stats.connections_rejected++;
    c->keep_alive = false;
    c->phase = PHASE_IDLE;
    transport_error(c, 503, "too many connections");
}

static void on_connection(uv_stream_t *listener, int status) {
    struct http_server *srv = listener->data;
    if (status < 0 || srv->shutting_down) return;
    struct conn *c = calloc(1, sizeof *c);
    if (!c) return;   /* the connection stays in the backlog; retried on the next callback */
    c->srv = srv;
    c->tcp.data = c;
    c->timer.data = c;
    if (uv_tcp_init(srv->loop, &c->tcp) < 0) { free(c); return; }
    uv_timer_init(srv->loop, &c->timer);
    c->handles_open = 2;
    c->next = srv->conns;
    if (srv->conns) srv->conns->prev = c;
    srv->conns = c;
    srv->n_conns++;
    srv->stats.connections_open = srv->n_conns;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) < 0) {
        conn_close_now(c);
        return;
    }
    srv->stats.connections_accepted++;
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
    c->parser.data = c;
    c->keep_alive = true;
    c->phase = PHASE_IDLE;
    if (srv->n_conns > srv->cfg.max_connections) {
        /* Reading lets the 503 go out after the request arrives; a socket
         * that cannot be read is closed without one. */
        c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
        if (!c->reading) { conn_close_now(c); return; }
        reject_connection(c);
        return;
    }
    c->reading = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0;
    if (!c->reading) { conn_close_now(c); return; }
    uv_timer_start(&c->timer, on_conn_timer, srv->cfg.header_timeout_ms, 0);
}

/* ---------------------------------------------------------------- server */

void http_config_defaults(struct http_config *cfg) {
    if (!cfg->max_body) cfg->max_body = 8u << 20;
    if (!cfg->max_header) cfg->max_header = 16u << 10;
    if (!cfg->header_timeout_ms) cfg->header_timeout_ms = 10000;
    if (!cfg->idle_timeout_ms) cfg->idle_timeout_ms = 30000;
    if (!cfg->request_timeout_ms) cfg->request_timeout_ms = 60000;
    if (!cfg->max_connections) cfg->max_connections = 1024;
    if (!cfg->max_write_queue) cfg->max_write_queue = 16u << 20;
}

struct http_server *http_server_new(uv_loop_t *loop, const struct http_config *cfg) {
    if (!loop || !cfg || !cfg->on_request) return NULL;
    struct http_server *srv = calloc(1, sizeof *srv);
    if (!srv) return NULL;
    srv->loop = loop;
    srv->cfg = *cfg;
    http_config_defaults(&srv->cfg);
    srv->date_sec = -1;
    parser_settings_init();
    return srv;
}

static void on_listener_closed(uv_handle_t *h) {
    struct http_server *srv = h->data;
    free(h);
    srv->listeners_open--;
    check_shutdown_done(srv);
}

int http_server_listen(struct http_server *srv, const char *host, int port) {
    if (srv->shutting_down || srv->n_listeners == MAX_LISTENERS) return UV_EINVAL;
    if (port < 0 || port > 65535) return UV_EINVAL;
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char port_text[8];
    snprintf(port_text, sizeof port_text, "%d", port);
    int gai = getaddrinfo(host && *host ? host : NULL, port_text, &hints, &res);
    if (gai != 0) return UV_EAI_NONAME;

    uv_tcp_t *tcp = calloc(1, sizeof *tcp);
    int rc = tcp ? uv_tcp_init(srv->loop, tcp) : UV_ENOMEM;
    if (rc < 0) { free(tcp); freeaddrinfo(res); return rc; }
    tcp->data = srv;
    srv->listeners[srv->n_listeners++] = tcp;
    srv->listeners_open++;
    rc = uv_tcp_bind(tcp, res->ai_addr, 0);
    freeaddrinfo(res);
    if (rc == 0) rc = uv_listen((uv_stream_t *)tcp, 511, on_connection);
    if (rc == 0) {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        if (uv_tcp_getsockname(tcp, (struct sockaddr *)&ss, &len) == 0)
            srv->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                       : ((struct sockaddr_in *)&ss)->sin_port);
        return 0;
    }
    srv->listeners[--srv->n_listeners] = NULL;
    uv_close((uv_handle_t *)tcp, on_listener_closed);
    return rc;
}

int http_server_port(const struct http_server *srv) { return srv->port; }

void http_server_stats(const struct http_server *srv, struct http_stats *out) { *out = srv->stats; }

static void on_shutdown_timer_closed(uv_handle_t *h) {
    struct http_server *srv = h->data;
    srv->shutdown_timer_live = false;
    if (srv->shutdown_cb) srv->shutdown_cb(srv, srv->shutdown_arg);
}

static void check_shutdown_done(struct http_server *srv) {
    if (!srv->shutting_down || srv->done_called || srv->n_conns || srv->listeners_open) return;
    srv->done_called = true;
    uv_timer_stop(&srv->shutdown_timer);
    uv_close((uv_handle_t *)&srv->shutdown_timer, on_shutdown_timer_closed);
}

static void on_shutdown_deadline(uv_timer_t *t) {
    struct http_server *srv = t->data;
    for (struct conn *c = srv->conns, *next; c; c = next) {
        next = c->next;
        conn_abort(c);
    }
}

void http_server_shutdown(struct http_server *srv, unsigned deadline_ms,
                          void (*done)(struct http_server *srv, void *arg), void *arg) {
    if (srv->done_called) return;
    if (!srv->shutting_down) {
        srv->shutting_down = true;
        srv->shutdown_cb = done;
        srv->shutdown_arg = arg;
        uv_timer_init(srv->loop, &srv->shutdown_timer);
        srv->shutdown_timer.data = srv;
        srv->shutdown_timer_live = true;
        for (int i = 0; i < srv->n_listeners; i++) {
            uv_close((uv_handle_t *)srv->listeners[i], on_listener_closed);
            srv->listeners[i] = NULL;
        }
        srv->n_listeners = 0;
        for (struct conn *c = srv->conns, *next; c; c = next) {
            next = c->next;
            if (c->phase == PHASE_HANDLING) c->keep_alive = false;   /* close after this response */
            else conn_finish(c, false);   /* idle or half-received: nothing promised yet */
        }
    }
    uv_timer_start(&srv->shutdown_timer, on_shutdown_deadline, deadline_ms, 0);
    check_shutdown_done(srv);
}

int http_server_free(struct http_server *srv) {
    if (!srv) return 0;
    if (srv->listeners_open || srv->n_conns || srv->shutdown_timer_live) return -1;
    free(srv);
    return 0;
}
