/* Fuzz target: the HTTP layer (server/http.c with llhttp) as the daemon runs
 * it, through a real loopback connection -- no seam inside http.c, so what
 * is fuzzed is exactly the parser setup, callbacks, pipelining, keep-alive,
 * streaming and closing paths the daemon uses.
 *
 * One server listens on 127.0.0.1 for the whole run. Each input is one
 * client connection:
 *   byte 0  mode: bits 0-1 pick how the handler answers the first request
 *           (each later request on the connection takes the next way):
 *           0 at once with the body echoed, 1 streamed in chunks, 2 later
 *           from a timer (an asynchronous completion, so pipelined input
 *           waits), 3 an error whose message quotes the raw path;
 *           bit 2: the client ends with a reset instead of a half-close
 *   byte 1  split: 0 sends the rest in one write, n > 0 in writes of n
 *           bytes (at most 64 writes), the loop running between them, so
 *           the server parses it across as many reads
 *   rest    the bytes the client sends.
 * Checked: the server ends the connection; every request handed to the
 * handler is reported to on_done exactly once, as dispatched; the handler
 * sees NUL-terminated fields and a body of body_len bytes; what the client
 * receives starts with a status line. Leaks are LeakSanitizer's. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "server/http.h"
#include "tests/fuzz/fuzz.h"

#define MAX_WRITES 64
#define MAX_PENDING 256

static uv_loop_t loop;
static struct http_server *srv;
static int port;

/* Per input. */
static unsigned mode;
static unsigned n_handled;            /* requests the handler saw on this connection */
static uint64_t n_dispatched, n_done_dispatched;
static struct http_request *pending[MAX_PENDING];
static int n_pending;
static uv_timer_t later;              /* answers the pending requests */
static char received[64];             /* the first bytes the client read */
static size_t n_received;

static void check_request(const struct http_request *req) {
    FUZZ_ASSERT(req->method && req->path && req->query && req->body);
    FUZZ_ASSERT(req->body[req->body_len] == '\0');
    FUZZ_ASSERT(req->http_minor == 0 || req->http_minor == 1);
    FUZZ_ASSERT(*req->method);
    const char *name, *value;
    size_t i = 0;
    while (http_header_at(req, i, &name, &value)) {
        FUZZ_ASSERT(name && value);
        FUZZ_ASSERT(http_header(req, name) != NULL);   /* found again by name, any case */
        i++;
    }
    FUZZ_ASSERT(!http_header_at(req, i, NULL, NULL));
}

static void drop_pending(struct http_request *req) {
    for (int i = 0; i < n_pending; i++)
        if (pending[i] == req) { pending[i] = pending[--n_pending]; return; }
}

static void on_abort(struct http_request *req, void *arg) {
    (void)arg;
    drop_pending(req);
    /* The completing call is still owed (http.h rule 3): it sends nothing. */
    FUZZ_ASSERT(http_respond(req, 200, "text/plain", "x", 1) == HTTP_ERR_GONE);
}

static void answer_pending(uv_timer_t *t) {
    (void)t;
    while (n_pending > 0) {
        struct http_request *req = pending[--n_pending];
        http_respond(req, 200, "application/octet-stream", req->body, req->body_len);
    }
}

static void on_request(struct http_request *req, void *arg) {
    (void)arg;
    check_request(req);
    n_dispatched++;
    unsigned how = (mode + n_handled++) & 3;
    if (how == 2 && n_pending == MAX_PENDING) how = 0;
    switch (how) {
    case 0:
        http_add_header(req, "X-Echo", req->path);   /* refused (HTTP_ERR_INVALID) or sent */
        http_respond(req, 200, "application/octet-stream", req->body, req->body_len);
        break;
    case 1: {
        if (http_stream_start(req, 200, "text/event-stream") == 0) {
            for (size_t off = 0; off < req->body_len; off += 7) {
                size_t n = req->body_len - off < 7 ? req->body_len - off : 7;
                if (http_stream_write(req, req->body + off, n)) break;
            }
        }
        http_stream_end(req);
        break;
    }
    case 2:
        if (http_request_on_abort(req, on_abort, NULL) == HTTP_ERR_GONE) {
            http_respond(req, 200, NULL, NULL, 0);
            break;
        }
        pending[n_pending++] = req;
        uv_timer_start(&later, answer_pending, 0, 0);
        break;
    default: {
        char segment[64];
        if (http_path_segment(req, "/v1/models/", segment, sizeof segment) == 0) FUZZ_ASSERT(!strchr(req->path + 11, '/'));
        http_respond_error_code(req, 404, "invalid_request_error", "model_not_found", req->path, req->query);
        break;
    }
    }
}

static void on_done(const struct http_done_info *info, void *arg) {
    (void)arg;
    FUZZ_ASSERT(info->req);
    FUZZ_ASSERT(info->status == 0 || (info->status >= 100 && info->status <= 999));
    if (info->dispatched) n_done_dispatched++;
    else FUZZ_ASSERT(info->status >= 400);   /* refused by the layer itself */
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    uv_timer_init(&loop, &later);
    struct http_config cfg = {
        .max_body = 16 << 10,          /* small limits, so inputs of fuzzing size reach them */
        .max_header = 4 << 10,
        .header_timeout_ms = 2000,
        .idle_timeout_ms = 2000,
        .on_request = on_request,
        .on_done = on_done,
    };
    srv = http_server_new(&loop, &cfg);
    if (!srv || http_server_listen(srv, "127.0.0.1", 0)) {
        fprintf(stderr, "fuzz_http: cannot listen on 127.0.0.1\n");
        exit(1);
    }
    port = http_server_port(srv);
    return 0;
}

static void drain_client(int fd) {
    char buf[4096];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
        size_t keep = sizeof received - n_received < (size_t)n ? sizeof received - n_received : (size_t)n;
        memcpy(received + n_received, buf, keep);
        n_received += keep;
    }
}

static void spin(int fd, int times) {
    for (int i = 0; i < times; i++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        drain_client(fd);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    mode = data[0];
    size_t split = data[1];
    data += 2;
    size -= 2;
    if (split == 0) split = size;
    if (split < size / MAX_WRITES + 1) split = size / MAX_WRITES + 1;
    n_handled = 0;
    n_dispatched = n_done_dispatched = 0;
    n_received = 0;

    struct http_stats before, now;
    http_server_stats(srv, &before);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    FUZZ_ASSERT(fd >= 0);
    struct linger lg = {1, 0};   /* close with a reset: no TIME_WAIT piling up over millions of runs */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* A signal (libFuzzer's timers) may interrupt connect; it then goes on
     * by itself, and poll says when it is done. */
    const int interrupted = connect(fd, (struct sockaddr *)&sa, sizeof sa) ? errno : 0;
    if (interrupted && interrupted != EINTR) {
        fprintf(stderr, "fuzz_http: connect: %s\n", strerror(interrupted));
        abort();
    }
    if (interrupted) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int err = 0;
        socklen_t len = sizeof err;
        while (poll(&pfd, 1, -1) < 0 && errno == EINTR) {}
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) || err) {
            fprintf(stderr, "fuzz_http: connect: %s\n", strerror(err ? err : errno));
            abort();
        }
    }
    do {
        uv_run(&loop, UV_RUN_ONCE);
        http_server_stats(srv, &now);
    } while (now.connections_accepted == before.connections_accepted);

    for (size_t off = 0, stuck = 0; off < size && stuck < 1000;) {
        size_t n = size - off < split ? size - off : split;
        ssize_t w = send(fd, data + off, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) break;   /* the server closed */
        if (w > 0) off += (size_t)w, stuck = 0;
        else stuck++;   /* the server stopped reading (pipelined input over its cap) */
        spin(fd, 3);
    }
    if (mode & 4) {
        close(fd);
        fd = -1;
    } else {
        shutdown(fd, SHUT_WR);
    }
    /* Until the server has closed the connection (it may have already). */
    for (http_server_stats(srv, &now); now.connections_open > 0; http_server_stats(srv, &now)) {
        uv_run(&loop, UV_RUN_ONCE);
        if (fd >= 0) drain_client(fd);
    }
    if (fd >= 0) {
        drain_client(fd);
        close(fd);
    }
    uv_timer_stop(&later);
    uv_run(&loop, UV_RUN_NOWAIT);   /* closes whatever the connection left */

    FUZZ_ASSERT(n_pending == 0);
    FUZZ_ASSERT(n_done_dispatched == n_dispatched);
    http_server_stats(srv, &now);
    FUZZ_ASSERT(now.requests - before.requests == n_dispatched);
    if (n_received >= 9) FUZZ_ASSERT(!memcmp(received, "HTTP/1.1 ", 9));
    return 0;
}
