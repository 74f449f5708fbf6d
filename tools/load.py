#!/usr/bin/env python3
"""A small, bounded load generator for OpenAI-compatible chat servers.

For each concurrency level (1, 4, 16 clients by default) it sends a fixed
number of streamed POST /v1/chat/completions requests, each client sending
its next request as soon as the previous one has ended, and reports

    requests/s, generated tokens/s, tokens per request,
    p50/p99 time to first token, p50/p99 inter-token latency

as a markdown table. It works against `ebb serve` and llama.cpp's
`llama-server` alike: both speak server-sent events with
`choices[0].delta.content` chunks and end with `data: [DONE]`.

Measurement:
  - time to first token (TTFT): from sending the request to the first chunk
    that carries content;
  - inter-token latency (ITL): gaps between consecutive content chunks of one
    response, pooled over all responses of a level;
  - generated tokens: `usage.completion_tokens` from the final chunk when the
    server sends it (stream_options.include_usage), else the number of
    content chunks;
  - rates divide by the wall time of the whole level.
Requests within a level use distinct prompts, so no server can answer from
a cache of an identical earlier request.

Safety: only loopback addresses are accepted (this is a benchmark for one
machine, not a tool to load someone else's server), and every input is
bounded (requests, clients, tokens, timeouts). It needs only the standard
library: threads and http.client, one connection per client.

Several --url (with --label) compare servers in one run: each level is run
against every server in turn before the next level starts, so that the
servers share whatever else the machine is doing at the time.

Example:
    tools/load.py --url http://127.0.0.1:8080 --label ebb \\
                  --url http://127.0.0.1:8081 --label llama-server \\
                  --model SmolLM2-135M-Instruct.Q4_1 \\
                  --requests 8,16,32 --max-tokens 64 --concurrency 1,4,16
"""
import argparse
import http.client
import ipaddress
import json
import socket
import sys
import threading
import time
import urllib.parse

MAX_REQUESTS = 10000
MAX_CLIENTS = 256
MAX_TOKENS = 4096

TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a garden", "trains", "a library",
          "mountains", "a storm", "bees", "a bakery", "the desert", "a violin", "rivers", "a city at night"]


def loopback_target(url):
    """(host, port, path prefix) of a loopback http:// URL, or an error."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"--url must be an http:// URL, got {url!r}")
    port = u.port or 80
    try:
        infos = socket.getaddrinfo(u.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {u.hostname}: {e}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback:
            raise ValueError(f"{u.hostname} is not a loopback address; this tool only loads local servers")
    prefix = u.path.rstrip("/")
    if prefix.endswith("/v1"):
        prefix = prefix[:-3]
    return u.hostname, port, prefix


def percentile(values, p):
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Result:
    def __init__(self):
        self.ok = False
        self.error = None
        self.ttft = None
        self.gaps = []
        self.tokens = 0


def one_request(conn, path, body, timeout):
    """Sends one streamed request on conn and reads it to its end."""
    res = Result()
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    resp = conn.getresponse()
    if resp.status != 200:
        res.error = f"HTTP {resp.status}: {resp.read(300).decode('utf-8', 'replace')}"
        return res
    last = None
    chunks = 0
    usage_tokens = None
    done = False
    buf = b""
    deadline = t0 + timeout
    while not done:
        piece = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not piece:
            break
        now = time.perf_counter()
        if now > deadline:
            res.error = "timed out"
            return res
        buf += piece
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                doc = json.loads(payload)
                if "error" in doc:
                    res.error = f"stream error: {doc['error']}"
                    return res
                if doc.get("usage"):
                    usage_tokens = doc["usage"].get("completion_tokens")
                for ch in doc.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        chunks += 1
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.gaps.append(now - last)
                        last = now
    resp.read()   # drain the chunked terminator so the connection can be reused
    if not done:
        res.error = "stream ended without [DONE]"
        return res
    res.tokens = usage_tokens if usage_tokens is not None else chunks
    res.ok = res.ttft is not None
    if not res.ok:
        res.error = "no content in the response"
    return res


def run_level(target, model, clients, n_requests, max_tokens, temperature, timeout, level_seed):
    host, port, prefix = target
    path = prefix + "/v1/chat/completions"
    results = []
    lock = threading.Lock()
    next_index = [0]

    def take():
        with lock:
            i = next_index[0]
            if i >= n_requests:
                return None
            next_index[0] += 1
            return i

    def client():
        while (i := take()) is not None:
            topic = TOPICS[i % len(TOPICS)]
            body = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                    "seed": level_seed + i, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user",
                                  "content": f"Request {level_seed + i}: write a long story about {topic}."}]}
            # A fresh connection per request: servers differ in how long they
            # keep an idle one, and a loopback connect costs microseconds.
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                r = one_request(conn, path, body, timeout)
            except (OSError, http.client.HTTPException, ValueError) as e:
                r = Result()
                r.error = f"{type(e).__name__}: {e}"
            finally:
                conn.close()
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok]
    gaps = [g for r in ok for g in r.gaps]
    return {
        "clients": clients, "requests": n_requests, "ok": len(ok), "errors": errors, "wall": wall,
        "rps": len(ok) / wall if wall > 0 else 0.0, "tps": tokens / wall if wall > 0 else 0.0,
        "tok_per_req": tokens / len(ok) if ok else 0.0,
        "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
        "itl50": percentile(gaps, 50), "itl99": percentile(gaps, 99),
    }


def ms(x):
    return "-" if x is None else f"{x * 1000:.0f}"


def table(rows):
    out = [f"| server | clients | requests (ok) | req/s | gen tok/s | tok/req | TTFT p50 ms | TTFT p99 ms "
           f"| ITL p50 ms | ITL p99 ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['clients']} | {r['requests']} ({r['ok']}) | {r['rps']:.2f} | {r['tps']:.1f} "
                   f"| {r['tok_per_req']:.1f} | {ms(r['ttft50'])} | {ms(r['ttft99'])} | {ms(r['itl50'])} "
                   f"| {ms(r['itl99'])} |")
    return "\n".join(out)


def int_list(text, name, lo, hi):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"load.py: {name} must be integers separated by commas, got {text!r}")
    if not values or any(v < lo or v > hi for v in values):
        raise SystemExit(f"load.py: {name} values must be between {lo} and {hi}, got {text!r}")
    return values


def main(argv=None):
    ap = argparse.ArgumentParser(description="Bounded loopback load test for OpenAI-compatible chat servers.")
    ap.add_argument("--url", required=True, action="append",
                    help="server base URL on loopback, e.g. http://127.0.0.1:8080; repeat it to compare servers "
                         "(their levels are interleaved so that they share the machine's conditions)")
    ap.add_argument("--model", required=True, action="append",
                    help="model name to send: one for every --url, or one per --url")
    ap.add_argument("--label", action="append", help="server name for the table, one per --url (default: the URL)")
    ap.add_argument("--requests", default="8,16,32",
                    help="requests per level: one number for all levels, or one per level (default 8,16,32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--concurrency", default="1,4,16", help="client counts, one level each (default 1,4,16)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent to each server before measuring (default 1)")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = ap.parse_args(argv)

    levels = int_list(args.concurrency, "--concurrency", 1, MAX_CLIENTS)
    counts = int_list(args.requests, "--requests", 1, MAX_REQUESTS)
    if len(counts) == 1:
        counts = counts * len(levels)
    if len(counts) != len(levels):
        raise SystemExit("load.py: give one --requests value, or one per --concurrency level")
    if not 1 <= args.max_tokens <= MAX_TOKENS:
        raise SystemExit(f"load.py: --max-tokens must be between 1 and {MAX_TOKENS}")
    if not 0 < args.timeout <= 3600 or not 0 <= args.warmup <= 16:
        raise SystemExit("load.py: --timeout must be in (0, 3600] and --warmup in [0, 16]")
    if len(args.url) > 8:
        raise SystemExit("load.py: at most 8 servers")
    models = args.model * len(args.url) if len(args.model) == 1 else args.model
    labels = args.label or list(args.url)
    if len(models) != len(args.url) or len(labels) != len(args.url):
        raise SystemExit("load.py: give --model (and --label) once, or once per --url")
    targets = []
    for url in args.url:
        try:
            targets.append(loopback_target(url))
        except ValueError as e:
            raise SystemExit(f"load.py: {e}")

    for target, model, label in zip(targets, models, labels):
        if args.warmup:
            w = run_level(target, model, 1, args.warmup, min(args.max_tokens, 8), args.temperature, args.timeout,
                          900000)
            if w["errors"]:
                raise SystemExit(f"load.py: warm-up request to {label} failed: {w['errors'][0]}")
    rows = []
    for i, (clients, n) in enumerate(zip(levels, counts)):
        for target, model, label in zip(targets, models, labels):
            r = run_level(target, model, clients, n, args.max_tokens, args.temperature, args.timeout,
                          (i + 1) * 10000)
            r["label"] = label
            rows.append(r)
            print(f"[{label}] {clients} clients: {r['ok']}/{n} ok in {r['wall']:.1f} s, {r['rps']:.2f} req/s, "
                  f"{r['tps']:.1f} tok/s, TTFT p50 {ms(r['ttft50'])} ms, ITL p50 {ms(r['itl50'])} ms",
                  file=sys.stderr, flush=True)
            for e in r["errors"][:3]:
                print(f"  error: {e}", file=sys.stderr)
    print(table(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0 if all(not r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
