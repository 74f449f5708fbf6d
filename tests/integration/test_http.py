"""The HTTP transport of `ebb serve`, against the real binary on loopback.

Each server is started with EBB_TEST_ROUTES=1 (POST /debug/echo and
GET /debug/stream) and --port 0; the port is read from its "listening" log
line. Most checks use raw sockets so that the bytes on the wire -- pipelined
requests, chunked bodies, garbage, trickled headers -- are exactly what the
test says. Every socket has a timeout and every wait is bounded.

Each server is stopped with SIGTERM at the end of its test and must exit 0
promptly, with no sanitizer report on stderr; with EBB_BIN_ASAN set the whole
module runs a second time against the sanitized binary.
"""
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import conftest

IO_TIMEOUT = 10.0


class Server(conftest.Server):
    """Transport tests need no model: a private, empty catalog and no default model to
    register keep each server small and fast; EBB_TEST_ROUTES adds the echo and slow
    routes they drive."""

    def __init__(self, binary, *args, host="127.0.0.1"):
        super().__init__(binary, *args, host=host, env={"EBB_TEST_ROUTES": "1"}, start_timeout=20,
                         io_timeout=IO_TIMEOUT)


@pytest.fixture
def start(binary):
    """start(*args) -> Server; every server is stopped cleanly at the end."""
    servers = []

    def _start(*args, host="127.0.0.1"):
        srv = Server(binary, *args, host=host)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop_clean()


@pytest.fixture
def server(start):
    return start("--max-body-bytes", "4096", "--header-timeout-ms", "2000", "--idle-timeout-ms", "2000")


# ---------------------------------------------------------------- raw HTTP helpers

class Response:
    def __init__(self, status, reason, headers, body):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body

    def json(self):
        return json.loads(self.body)


def read_response(f, head_only=False):
    """Reads one response from a socket file; None on a clean EOF before it."""
    line = f.readline()
    if not line:
        return None
    m = re.match(rb"HTTP/1\.1 (\d{3}) (.*)\r\n$", line)
    assert m, f"bad status line {line!r}"
    headers = {}
    while True:
        h = f.readline()
        assert h, "EOF inside headers"
        if h == b"\r\n":
            break
        k, v = h.split(b":", 1)
        headers[k.strip().lower().decode()] = v.strip().decode()
    status = int(m.group(1))
    if head_only or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                assert f.readline() == b"\r\n"
                break
            body += f.read(size)
            assert f.read(2) == b"\r\n"
    else:
        body = f.read()
    return Response(status, m.group(2).decode(), headers, body)


def assert_closed(sock, within=IO_TIMEOUT):
    """The server closes the connection: recv sees EOF (or a reset) in time."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
    except ConnectionResetError:
        return


def get(path, host="x"):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def post(path, body, content_type="text/plain"):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def assert_openai_error(resp, status, type_="invalid_request_error"):
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_
    return err


def metrics(srv):
    r = requests.get(srv.url("/metrics"), timeout=IO_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, r.text


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------- tests

def test_health(server):
    r = requests.get(server.url("/health"), timeout=IO_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"status": "ok"}
    assert int(r.headers["X-Request-Id"]) >= 1


def test_keep_alive_serves_several_requests_on_one_socket(server):
    with server.connect() as s, s.makefile("rb") as f:
        ids = []
        for _ in range(5):
            s.sendall(get("/health"))
            r = read_response(f)
            assert r.status == 200 and r.json() == {"status": "ok"}
            assert "close" not in r.headers.get("connection", "")
            ids.append(int(r.headers["x-request-id"]))
        assert ids == sorted(set(ids)), "request ids must be unique and increasing"
    # And with a regular client: its three requests take one connection (the
    # server's own count moves by that one plus the second scrape's).
    before, _ = metrics(server)
    with requests.Session() as sess:
        for _ in range(3):
            assert sess.get(server.url("/health"), timeout=IO_TIMEOUT).status_code == 200
    after, _ = metrics(server)
    assert sample(after, "ebb_http_connections_total") - sample(before, "ebb_http_connections_total") == 2


def test_pipelined_requests_answered_in_order(server):
    # The echo body looks like a request: it must be treated as body bytes,
    # never as a request of its own.
    tricky = b"GET /health HTTP/1.1\r\nHost: y\r\n\r\n"
    wire = get("/health") + post("/debug/echo", tricky) + get("/nope") + post("/debug/echo", b"second")
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(wire)
        r1, r2, r3, r4 = (read_response(f) for _ in range(4))
        assert r1.status == 200 and r1.json() == {"status": "ok"}
        assert r2.status == 200 and r2.body == tricky
        assert_openai_error(r3, 404)
        assert r4.status == 200 and r4.body == b"second"
        ids = [int(r.headers["x-request-id"]) for r in (r1, r2, r3, r4)]
        assert ids == sorted(ids) and len(set(ids)) == 4
        # Nothing more: exactly four responses for four requests.
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1)


def test_pipelined_bytes_split_across_writes(server):
    wire = post("/debug/echo", b"abc") + get("/health") + post("/debug/echo", b"xyz" * 100)
    with server.connect() as s, s.makefile("rb") as f:
        for i in range(0, len(wire), 7):   # 7-byte writes cut through every boundary
            s.sendall(wire[i:i + 7])
            time.sleep(0.001)
        assert read_response(f).body == b"abc"
        assert read_response(f).status == 200
        assert read_response(f).body == b"xyz" * 100


def test_chunked_request_body_is_echoed(server):
    chunks = [b"hello ", b"chunked ", b"world" * 50, b"!"]
    wire = b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i, c in enumerate(chunks):
        ext = b";ext=1" if i == 1 else b""
        wire += f"{len(c):x}".encode() + ext + b"\r\n" + c + b"\r\n"
    wire += b"0\r\nX-Trailer: t\r\n\r\n"
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(wire)
        r = read_response(f)
        assert r.status == 200
        assert r.body == b"".join(chunks)
        s.sendall(get("/health"))   # the connection is still in step
        assert read_response(f).status == 200
    # A regular client sending a generator uses chunked encoding too.
    r = requests.post(server.url("/debug/echo"), data=(c for c in chunks), timeout=IO_TIMEOUT)
    assert r.status_code == 200 and r.content == b"".join(chunks)


def test_expect_100_continue(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = read_response(f)
        assert interim.status == 100
        s.sendall(b"12345")
        r = read_response(f)
        assert r.status == 200 and r.body == b"12345"


def test_body_at_the_limit_is_accepted(server):
    body = os.urandom(4096)
    r = requests.post(server.url("/debug/echo"), data=body, timeout=IO_TIMEOUT,
                      headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.content == body


def test_body_over_the_limit_by_content_length_is_refused_at_once(server):
    with server.connect() as s, s.makefile("rb") as f:
        # Only the headers are sent: the 413 must come without waiting for the body.
        s.sendall(b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4097\r\n\r\n")
        r = read_response(f)
        err = assert_openai_error(r, 413)
        assert "too large" in err["message"]
        assert r.headers.get("connection") == "close"
        assert_closed(s)
    r = requests.get(server.url("/health"), timeout=IO_TIMEOUT)
    assert r.status_code == 200


def test_body_over_the_limit_by_chunks_is_refused(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):
            s.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n")   # 4096 bytes: still fine
        s.sendall(b"1\r\nb\r\n")                              # 4097: over
        r = read_response(f)
        assert_openai_error(r, 413)
        assert_closed(s)
    # A large body sent in full by a client that does not wait still gets the 413.
    r = requests.post(server.url("/debug/echo"), data=b"z" * 200_000, timeout=IO_TIMEOUT)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(server.url("/health"), timeout=IO_TIMEOUT).status_code == 200


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)),   # a TLS hello
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",                                                      # no target, no version
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n",
    b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
])
def test_malformed_requests_get_400_and_close(server, garbage):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(garbage)
        r = read_response(f)
        err = assert_openai_error(r, 400)
        assert "malformed" in err["message"]
        assert_closed(s)
    assert requests.get(server.url("/health"), timeout=IO_TIMEOUT).status_code == 200


def test_garbage_after_a_good_request_answers_the_good_one_first(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(get("/health") + b"\x16\x03\x01 nonsense\r\n\r\n")
        assert read_response(f).status == 200
        assert_openai_error(read_response(f), 400)
        assert_closed(s)


def test_headers_too_large_get_431(start):
    srv = start("--max-header-bytes", "1024")
    with srv.connect() as s, s.makefile("rb") as f:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        assert_openai_error(read_response(f), 431)
        assert_closed(s)
    # Headers just under the limit still pass.
    r = requests.get(srv.url("/health"), headers={"X-Big": "a" * 700}, timeout=IO_TIMEOUT)
    assert r.status_code == 200


def test_slow_loris_headers_are_cut_off(server):
    # --header-timeout 2: a client trickling header bytes every 0.25 s is
    # answered 408 and disconnected about 2 s after its first byte.
    with server.connect() as s, s.makefile("rb") as f:
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        got = None
        for i in range(40):
            try:
                s.sendall(f"X-Slow-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.25)
            try:
                got = s.recv(1, socket.MSG_PEEK)
            except socket.timeout:
                continue
            break
        elapsed = time.monotonic() - t0
        assert got, "server never answered the slow client"
        s.settimeout(IO_TIMEOUT)
        r = read_response(f)
        assert_openai_error(r, 408)
        assert 1.5 <= elapsed <= 4.0, elapsed
        assert_closed(s, within=5)
    assert requests.get(server.url("/health"), timeout=IO_TIMEOUT).status_code == 200


def trickle(sock, pieces, every):
    """Sends pieces one by one, `every` seconds apart, until the server answers (or
    closes); returns the seconds from the first piece to that answer, or None if it
    never came."""
    t0 = time.monotonic()
    for piece in pieces:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            break
        sock.settimeout(every)
        try:
            if sock.recv(1, socket.MSG_PEEK) is not None:
                break
        except socket.timeout:
            continue
    else:
        return None
    return time.monotonic() - t0


def test_trickled_body_hits_the_request_deadline(start):
    # One body byte every 0.3 s keeps the 2 s inactivity timer from ever firing;
    # the 3 s request deadline (from the first byte) still ends it with a 408.
    srv = start("--request-timeout-ms", "3000", "--idle-timeout-ms", "2000", "--header-timeout-ms", "2000")
    with srv.connect() as s, s.makefile("rb") as f:
        head = b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
        done = {}

        def probe():   # another client is served all the while
            done["health"] = [requests.get(srv.url("/health"), timeout=IO_TIMEOUT).status_code for _ in range(5)]

        other = threading.Thread(target=probe)
        other.start()
        elapsed = trickle(s, [head] + [b"x"] * 40, 0.3)   # 12 s of trickle if nothing stops it
        other.join(IO_TIMEOUT)
        assert elapsed is not None, "the trickled body was never cut off"
        s.settimeout(IO_TIMEOUT)
        err = assert_openai_error(read_response(f), 408)
        assert "request_timeout_ms" in err["message"] and "body" in err["message"], err
        assert 2.5 <= elapsed <= 4.5, elapsed
        assert_closed(s, within=5)
    assert done["health"] == [200] * 5
    # The deadline is per request, not per connection: a keep-alive connection
    # older than it still gets its next request in.
    with srv.connect() as s, s.makefile("rb") as f:
        s.sendall(post("/debug/echo", b"first"))
        assert read_response(f).body == b"first"
        time.sleep(1.5)
        s.sendall(post("/debug/echo", b"second")[:40])
        time.sleep(1.0)
        s.sendall(post("/debug/echo", b"second")[40:])
        time.sleep(1.0)   # 3.5 s since the connection opened, 2 s into this request
        s.sendall(post("/debug/echo", b"third"))
        assert read_response(f).body == b"second"
        assert read_response(f).body == b"third"


def test_trickled_headers_hit_the_request_deadline(start):
    # A header timeout longer than the request deadline: the deadline cuts first.
    srv = start("--request-timeout-ms", "2000", "--header-timeout-ms", "10000", "--idle-timeout-ms", "10000")
    with srv.connect() as s, s.makefile("rb") as f:
        lines = [b"GET /health HTTP/1.1\r\n"] + [f"X-Slow-{i}: y\r\n".encode() for i in range(60)]
        elapsed = trickle(s, lines, 0.25)
        assert elapsed is not None, "the trickled headers were never cut off"
        s.settimeout(IO_TIMEOUT)
        err = assert_openai_error(read_response(f), 408)
        assert "request_timeout_ms" in err["message"] and "headers" in err["message"], err
        assert 1.5 <= elapsed <= 3.5, elapsed
        assert_closed(s, within=5)
    assert requests.get(srv.url("/health"), timeout=IO_TIMEOUT).status_code == 200


def test_silent_connection_is_closed_without_a_response(server):
    with server.connect() as s:
        t0 = time.monotonic()
        s.settimeout(6)
        assert s.recv(100) == b""   # closed quietly, nothing sent
        assert 1.5 <= time.monotonic() - t0 <= 4.5


def test_idle_keep_alive_connection_is_closed(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(get("/health"))
        assert read_response(f).status == 200
        t0 = time.monotonic()
        assert read_response(f) is None     # EOF after the idle timeout
        assert 1.5 <= time.monotonic() - t0 <= 4.5


def test_unknown_route_is_404_in_openai_shape(server):
    r = requests.get(server.url("/v1/nothing-here?x=1"), timeout=IO_TIMEOUT)
    assert r.status_code == 404
    doc = r.json()
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["param"] is None and doc["error"]["code"] is None
    assert "/v1/nothing-here" in doc["error"]["message"]


def test_absolute_form_targets_are_served(server):
    """RFC 9112 §3.2.2: a server must accept a request target in absolute form (what a client
    talking through a proxy sends)."""
    with server.connect() as s, s.makefile("rb") as f:
        for target in (b"http://127.0.0.1/health", b"HTTP://x:1/health?probe=1", b"https://x/health"):
            s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            r = read_response(f)
            assert r.status == 200 and r.json() == {"status": "ok"}, (target, r.body)
        s.sendall(b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n")   # no path: "/", no route
        assert read_response(f).status == 404


@pytest.mark.parametrize("request_bytes,needle", [
    (b"GET /health HTTP/1.1\r\n\r\n", "needs a Host header"),
    (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
    (b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nX-Pad: a\r\n b\r\nContent-Length: 2\r\n\r\nhi", "obs-fold"),
    (b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n 2\r\n\r\nhi", None),
])
def test_host_and_folded_headers_are_refused(server, request_bytes, needle):
    """HTTP/1.1 without exactly one Host is a 400 (RFC 9112 §3.2); so is a header value
    folded onto a second line: unfolding it is how a folded Content-Length smuggles a
    request past a proxy."""
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(request_bytes)
        err = assert_openai_error(read_response(f), 400)
        assert "malformed" in err["message"]
        if needle:
            assert needle in err["message"], err
        assert_closed(s)
    # HTTP/1.0 needs no Host.
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert read_response(f).status == 200


def test_a_fold_split_across_reads_is_still_refused(server):
    """The continuation line arrives in a later read than the line it continues."""
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n")
        time.sleep(0.2)
        s.sendall(b"  2\r\n\r\nhi")
        err = assert_openai_error(read_response(f), 400)
        assert "obs-fold" in err["message"]


def test_chunk_extensions_are_bounded(server):
    """Extensions are ignored but not read forever: past 16 KiB the request is a 400 and
    the connection closes, while the client is still sending."""
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2;name=" + b"v" * 20000 + b"\r\nhi\r\n0\r\n\r\n")
        err = assert_openai_error(read_response(f), 400)
        assert "chunk extensions" in err["message"]
    with server.connect() as s, s.makefile("rb") as f:   # small extensions are fine
        s.sendall(b"POST /debug/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2;name=value\r\nhi\r\n0\r\n\r\n")
        r = read_response(f)
        assert r.status == 200 and r.body == b"hi"


def test_error_message_with_invalid_utf8_path_stays_json(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"GET /caf\xe9\xff HTTP/1.1\r\nHost: x\r\n\r\n")
        err = assert_openai_error(read_response(f), 404)
        assert "/caf??" in err["message"]


def test_wrong_method_is_405_with_allow(server):
    r = requests.delete(server.url("/health"), timeout=IO_TIMEOUT)
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(server.url("/debug/echo"), timeout=IO_TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


def test_head_has_headers_but_no_body(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n" + get("/health"))
        r = read_response(f, head_only=True)
        assert r.status == 200 and r.headers["content-length"] == "15"
        r = read_response(f)   # the next response starts right after the head
        assert r.json() == {"status": "ok"}


def test_http10_closes_after_the_response(server):
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        r = read_response(f)
        assert r.status == 200 and r.json() == {"status": "ok"}
        assert_closed(s)
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2)
        assert read_response(f).headers.get("connection") == "keep-alive"
        assert read_response(f).status == 200


def test_ipv6_loopback(start):
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    srv = start(host="::1")
    with srv.connect() as s, s.makefile("rb") as f:
        s.sendall(get("/health"))
        assert read_response(f).json() == {"status": "ok"}
    assert requests.get(srv.url("/health"), timeout=IO_TIMEOUT).json() == {"status": "ok"}


def parse_sse(body):
    events = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events


def test_sse_stream_parses_and_ends_with_done(server):
    r = requests.get(server.url("/debug/stream?n=7&ms=5"), stream=True, timeout=IO_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.headers["Cache-Control"] == "no-cache"
    events = parse_sse(r.raw.read())
    assert events[-1] == "[DONE]"
    assert [json.loads(e) for e in events[:-1]] == [{"index": i, "n": 7} for i in range(7)]


def test_sse_events_arrive_as_they_are_produced(server):
    # 4 events 300 ms apart: the first must arrive long before the last is
    # produced, i.e. chunks are flushed, not buffered until the end.
    with server.connect() as s, s.makefile("rb") as f:
        t0 = time.monotonic()
        s.sendall(get("/debug/stream?n=4&ms=300"))
        line = f.readline()
        assert line.startswith(b"HTTP/1.1 200")
        while f.readline() != b"\r\n":
            pass
        size = int(f.readline(), 16)
        first = f.read(size)
        t_first = time.monotonic() - t0
        assert first == b'data: {"index":0,"n":4}\n\n'
        assert t_first < 0.9, t_first


def test_stream_bad_parameter_is_400_naming_it(server):
    r = requests.get(server.url("/debug/stream?n=abc"), timeout=IO_TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_client_disconnect_mid_stream_is_an_abort(server):
    before, _ = metrics(server)
    # A close (FIN), a reset (RST), and a close where the application
    # completes the aborted request 50 ms later, after the connection is gone
    # (as the engine will at its next step).
    for hard, late in ((False, 0), (True, 0), (False, 50)):
        s = server.connect()
        f = s.makefile("rb")
        s.sendall(get(f"/debug/stream?n=100000&ms=5&late_ms={late}"))
        assert f.readline().startswith(b"HTTP/1.1 200")
        while f.readline() != b"\r\n":
            pass
        assert f.readline()   # the first chunk's size: the stream is running
        if hard:              # a reset rather than a FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        f.close()
        s.close()
    assert server.wait_log("stream aborted by client")
    deadline = time.monotonic() + 5
    while True:
        after, _ = metrics(server)
        delta = (sample(after, "ebb_http_requests_aborted_total", route="/debug/stream")
                 - sample(before, "ebb_http_requests_aborted_total", route="/debug/stream"))
        if delta == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert delta == 3
    assert server.wait_log("late_ms=50")
    time.sleep(0.2)   # the late completion has run
    assert "not a no-op" not in server.log()
    # The server is unharmed: a new stream and a plain request both work.
    r = requests.get(server.url("/debug/stream?n=2&ms=1"), timeout=IO_TIMEOUT)
    assert parse_sse(r.content)[-1] == "[DONE]"
    assert requests.get(server.url("/health"), timeout=IO_TIMEOUT).status_code == 200


def test_disconnect_with_pipelined_requests_pending(server):
    s = server.connect()
    s.sendall(get("/debug/stream?n=100000&ms=5") + get("/health") * 3)
    time.sleep(0.1)
    s.close()
    assert requests.get(server.url("/health"), timeout=IO_TIMEOUT).status_code == 200


def test_many_concurrent_streams(server):
    results = [None] * 16

    def one(i):
        r = requests.get(server.url(f"/debug/stream?n={5 + i}&ms=2"), timeout=IO_TIMEOUT)
        results[i] = parse_sse(r.content)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT)
    for i, events in enumerate(results):
        assert events is not None and events[-1] == "[DONE]"
        assert len(events) == 5 + i + 1


def test_metrics_parse_and_counters_move(server):
    before, text = metrics(server)
    assert "# TYPE ebb_http_requests_total counter" in text
    assert "# TYPE ebb_http_request_duration_seconds histogram" in text
    for _ in range(3):
        requests.get(server.url("/health"), timeout=IO_TIMEOUT)
    requests.get(server.url("/missing"), timeout=IO_TIMEOUT)
    requests.post(server.url("/health"), timeout=IO_TIMEOUT)
    with server.connect() as s, s.makefile("rb") as f:
        s.sendall(b"BROKEN\r\n\r\n")
        read_response(f)
    after, _ = metrics(server)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("ebb_http_requests_total", route="/health", code="200") == 3
    assert delta("ebb_http_requests_total", route="unmatched", code="404") == 1
    assert delta("ebb_http_requests_total", route="/health", code="405") == 1
    assert delta("ebb_http_requests_total", route="none", code="400") == 1
    # The scrape before counts once it has been answered.
    assert delta("ebb_http_requests_total", route="/metrics", code="200") == 1
    # The histogram is by route only: the three 200s and the 405.
    assert delta("ebb_http_request_duration_seconds_count", route="/health") == 4
    assert delta("ebb_http_request_duration_seconds_bucket", route="/health", le="+Inf") == 4
    assert delta("ebb_http_request_duration_seconds_sum", route="/health") > 0
    # Buckets are cumulative.
    les = sorted(((float(dict(k[1])["le"]), v) for k, v in after.items()
                  if k[0] == "ebb_http_request_duration_seconds_bucket" and dict(k[1])["route"] == "/health"))
    assert [v for _, v in les] == sorted(v for _, v in les)
    assert sample(after, "ebb_http_connections_total") >= 5
    assert sample(after, "ebb_http_connections_open") >= 1   # the scrape's own


def test_connection_limit(start):
    srv = start("--max-connections", "2")
    a, b = srv.connect(), srv.connect()
    try:
        with a.makefile("rb") as fa:
            a.sendall(get("/health"))
            assert read_response(fa).status == 200
        time.sleep(0.1)   # let the server register both
        with srv.connect() as c, c.makefile("rb") as fc:
            r = read_response(fc)
            assert_openai_error(r, 503, "server_error")
            assert_closed(c)
    finally:
        a.close()
        b.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # slots free again once those two close
        try:
            if requests.get(srv.url("/health"), timeout=IO_TIMEOUT).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("server did not accept again after connections closed")
    samples, _ = metrics(srv)
    assert sample(samples, "ebb_http_connections_rejected_total") >= 1


def test_sigterm_exits_zero_promptly(start):
    srv = start()
    assert requests.get(srv.url("/health"), timeout=IO_TIMEOUT).status_code == 200
    idle = srv.connect()   # an idle keep-alive connection must not hold shutdown up
    elapsed = srv.stop_clean()
    idle.close()
    assert elapsed < 2.0, elapsed
    assert 'msg="shutting down" signal=SIGTERM' in srv.log()


def test_sigterm_lets_a_running_stream_finish(start):
    srv = start("--shutdown-timeout-ms", "10000")
    with srv.connect() as s, s.makefile("rb") as f:
        s.sendall(get("/debug/stream?n=10&ms=100"))   # about 1 s of events
        assert f.readline().startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        srv.terminate()
        assert srv.wait_log("shutting down")
        # New connections are refused while the stream finishes.
        with pytest.raises(OSError):
            srv.connect().close()
        rest = b""
        while True:
            chunk = f.read1(65536)
            if not chunk:
                break
            rest += chunk
        assert b"data: [DONE]" in rest and rest.endswith(b"0\r\n\r\n")
        assert rest.count(b"data: {") == 10
    srv.stop_clean()
    assert time.monotonic() - t0 < 5


def test_sigterm_deadline_cuts_long_streams(start):
    srv = start("--shutdown-timeout-ms", "500")
    s = srv.connect()
    s.sendall(get("/debug/stream?n=100000&ms=10"))
    s.recv(100)
    t0 = time.monotonic()
    elapsed = srv.stop_clean()
    assert time.monotonic() - t0 < 3 and elapsed < 3
    assert_closed(s)
    s.close()
    assert "request aborted by client" in srv.log()


def test_bad_flags_are_clear_errors(binary):
    for args, needle in ([["--port", "70000"], "--port: 70000 is out of range"],
                         [["--max-body-bytes", "-1"], "--max-body-bytes: -1 is out of range"],
                         [["--header-timeout-ms", "0"], "--header-timeout-ms: 0 is out of range"],
                         [["--log-level", "loud"], "'loud' is not a valid value: expected one of \"error\""],
                         [["--bogus"], "unknown option"]):
        p = subprocess.run([binary, "serve", *args], capture_output=True, timeout=20)
        assert p.returncode == 2, (args, p.stderr)
        assert needle.encode() in p.stderr, (args, p.stderr)
    p = subprocess.run([binary, "serve", "--help"], capture_output=True, timeout=20)
    assert p.returncode == 0 and b"usage: ebb serve" in p.stdout


def test_port_in_use_is_a_clear_error(binary, start):
    srv = start()
    p = subprocess.run([binary, "serve", "--port", str(srv.port), "--default-model-path", ""],
                       capture_output=True, timeout=20, env=dict(os.environ, EBB_CATALOG=os.path.join(srv.tmp.name, "c2.db")))
    assert p.returncode == 1
    assert b"cannot listen" in p.stderr and b"address already in use" in p.stderr
