"""The OpenAI-compatible API of `ebb serve`, end to end, against the real
binary and the default model.

What is checked, and against what:
  - the official `openai` client, plain and streamed, completions and chat:
    the text is identical to `ebb generate` (a separate process, no HTTP)
    for the same prompt, sampling settings and seed, greedy and sampled;
  - 16 simultaneous streams: each equals the same request run alone, and
    all differ from each other;
  - cancellation (client disconnect, DELETE /v1/requests/{id}): the KV
    cache goes back to empty (GET /admin/memory) and /metrics counts it;
  - bad input of every kind: the right status and an OpenAI error body that
    names the field, and the daemon keeps serving;
  - /metrics through prometheus-client's parser, counters checked against
    the usage the responses report;
  - admin routes: token checks, the memory budget (persistence across a
    restart, an environment override, a tight budget refusing big requests),
    registering and removing models;
  - /health and /ready, /tokenize and /detokenize against `ebb tokenize`;
  - KV cache precision: --kv-bits 8 and a --model-kv-bits override of 4 are
    reported by /admin/memory, shrink the KV reservation against a float32
    size worked out from the model's shape, and chat still answers;
  - kill -9 during catalog writes leaves an intact catalog; SIGTERM lets
    streams finish, or cuts them at the deadline, and exits 0.

One server per module (its own catalog) serves the tests that leave it as
they found it; tests that restart, kill or reconfigure a daemon start their
own. With EBB_BIN_ASAN set, a representative subset (chat, stream,
disconnect, bad input) runs against the sanitized binary too; its server
must exit 0 with no sanitizer report. The sanitized build is unoptimized,
so its requests are kept to a handful of tokens.

Every socket has a timeout and every wait is bounded. Decoding is slow on a
small CPU (tens of tokens per second), so max_tokens stays small.
"""
import json
import os
import pathlib
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import conftest
from conftest import clean_env

openai = pytest.importorskip("openai")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "apitests-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IO_TIMEOUT = 30.0
# The field GET/PUT /admin/memory use for the budget (docs/api.md).
BUDGET = "memory_budget_bytes"


# ---------------------------------------------------------------- the daemon

class Server(conftest.Server):
    """The API suite's daemon: a catalog of its own and the admin token."""

    def __init__(self, binary, catalog, *args, model_path=None, token=TOKEN, env=None, start_timeout=60):
        super().__init__(binary, *args, catalog=catalog, model_path=model_path, token=token, env=env,
                         start_timeout=start_timeout, io_timeout=IO_TIMEOUT)


@pytest.fixture(scope="module")
def tmpdir_module():
    with tempfile.TemporaryDirectory(prefix="ebb-api-") as d:
        yield pathlib.Path(d)


def start_model_server(binary, tmpdir, model_path, name, *args, ready_timeout=120, record_startup=False):
    srv = Server(binary, tmpdir / f"{name}.db", "--max-body-bytes", "262144", "--header-timeout-ms", "1500",
                 *args, model_path=model_path, start_timeout=ready_timeout)
    if record_startup:   # before anything else: the model cannot have loaded yet
        srv.first_health = requests.get(srv.url("/health"), timeout=IO_TIMEOUT)
        srv.first_ready = requests.get(srv.url("/ready"), timeout=IO_TIMEOUT)
        srv.loaded_before_ready_check = "model loaded" in srv.log()
    srv.wait_ready(ready_timeout)
    srv.model = requests.get(srv.url("/v1/models"), timeout=IO_TIMEOUT).json()["data"][0]["id"]
    return srv


@pytest.fixture(scope="module")
def srv(ebb_bin, model_path, tmpdir_module):
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "main", "--max-running", "16",
                           record_startup=True)
    yield s
    s.stop_clean()


@pytest.fixture(scope="module")
def asan_srv(model_path, tmpdir_module):
    binary = os.environ.get("EBB_BIN_ASAN")
    if not binary:
        pytest.skip("EBB_BIN_ASAN not set (make test sets it)")
    s = start_model_server(binary, tmpdir_module, model_path, "asan", ready_timeout=300)
    yield s
    s.stop_clean(timeout=60)


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=120)


# ---------------------------------------------------------------- helpers

def ebb_generate(ebb_bin, model_path, *args):
    """`ebb generate`'s text (it ends its output with one newline of its own)."""
    p = subprocess.run([ebb_bin, "generate", "-m", model_path, *args], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode("utf-8")
    assert out.endswith("\n"), out
    return out[:-1]


def assert_error(resp, status, param="<any>", type_=None, needle=None):
    """An OpenAI-shaped error body with the given status (and param when given)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    doc = resp.json()
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param != "<any>":
        assert err["param"] == param, err
    if type_:
        assert err["type"] == type_, err
    if needle:
        assert needle in err["message"], err
    return err


def metrics(srv):
    r = requests.get(srv.url("/metrics"), timeout=IO_TIMEOUT)
    assert r.status_code == 200
    samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, r.text


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name, **labels):
    """Sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == val for k, val in labels.items()))


def memory(srv):
    r = requests.get(srv.url("/admin/memory"), headers=AUTH, timeout=IO_TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def put_budget(srv, value):
    return requests.put(srv.url("/admin/memory"), json={BUDGET: value}, headers=AUTH, timeout=IO_TIMEOUT)


def held(m):
    """KV that running requests hold: what is reserved less the prompt cache's."""
    return m["kv_reserved_bytes"] - m["prompt_cache_bytes"]


def wait_kv_empty(srv, timeout):
    """Waits until no request holds KV cache: what is left is the prompt cache's
    (finished requests' caches, kept for the next turn; test_prompt_cache.py)."""
    deadline = time.monotonic() + timeout
    while True:
        m = memory(srv)
        if held(m) == 0 and m["kv_allocated_bytes"] <= m["prompt_cache_bytes"]:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV cache not freed within {timeout}s: {m}")
        time.sleep(0.05)


def complete(srv, timeout=120, **body):
    r = requests.post(srv.url("/v1/completions"), json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def chat(srv, timeout=120, **body):
    r = requests.post(srv.url("/v1/chat/completions"), json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def request_id(srv):
    return int(requests.get(srv.url("/health"), timeout=IO_TIMEOUT).headers["X-Request-Id"])


class Stream:
    """A POST whose server-sent events are read one by one off a raw socket,
    so the test decides exactly when (and how) the connection goes away."""

    def __init__(self, srv, path, body):
        self.sock = srv.connect()
        data = json.dumps(body).encode()
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        self.f = self.sock.makefile("rb")
        status = self.f.readline()
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", status)
        assert m, status
        self.status = int(m.group(1))
        self.headers = {}
        while True:
            h = self.f.readline()
            assert h, "EOF in headers"
            if h == b"\r\n":
                break
            k, v = h.decode().split(":", 1)
            self.headers[k.strip().lower()] = v.strip()
        self.buf = b""
        self.ended = False   # the chunked body's last chunk was read

    def _more(self):
        line = self.f.readline()
        if not line:
            raise EOFError("connection closed inside the stream")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            self.f.readline()
            self.ended = True
            return False
        self.buf += self.f.read(size)
        assert self.f.read(2) == b"\r\n"
        return True

    def event(self):
        """The next event's data (str), or None once the body has ended."""
        while b"\n\n" not in self.buf:
            if self.ended or not self._more():
                assert self.buf == b"", self.buf
                return None
        block, self.buf = self.buf.split(b"\n\n", 1)
        assert block.startswith(b"data: "), block
        return block[6:].decode()

    def events(self):
        out = []
        while (e := self.event()) is not None:
            out.append(e)
        return out

    def close(self, hard=False):
        if hard:   # RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.f.close()
        self.sock.close()


def stream_text(events, index=0, chat=True):
    """The text of one choice from a list of event payloads (JSON strings)."""
    out = []
    for e in events:
        if e == "[DONE]":
            continue
        doc = json.loads(e)
        for ch in doc.get("choices", []):
            if ch["index"] == index:
                out.append((ch["delta"].get("content") or "") if chat else ch["text"])
    return "".join(out)


# ---------------------------------------------------------------- health, ready, models

def test_health_answers_before_the_model_is_ready(srv):
    assert srv.first_health.status_code == 200
    assert srv.first_health.json() == {"status": "ok"}
    if srv.loaded_before_ready_check:
        pytest.skip("the model loaded before /ready was asked")
    err = assert_error(srv.first_ready, 503, type_="unavailable_error")
    assert srv.first_ready.headers.get("Retry-After")
    assert "loaded" in err["message"]
    # And now it is ready.
    r = requests.get(srv.url("/ready"), timeout=IO_TIMEOUT)
    assert r.status_code == 200


def test_models_lists_the_default_model(srv, ebb_bin, model_path):
    doc = requests.get(srv.url("/v1/models"), timeout=IO_TIMEOUT).json()
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == [srv.model]
    m = doc["data"][0]
    assert m["object"] == "model" and m["owned_by"] == "ebb"
    assert abs(m["created"] - time.time()) < 3600
    # The catalog entry behind it is the model file we gave, described as
    # `ebb models list --json` describes it (docs/api.md).
    r = requests.get(srv.url("/admin/models"), headers=AUTH, timeout=IO_TIMEOUT)
    assert r.status_code == 200 and r.json()["object"] == "list"
    entry = r.json()["data"][0]
    assert entry["name"] == srv.model and entry["state"] == "ready"
    assert os.path.samefile(entry["path"], model_path)
    assert entry["bytes"] == os.path.getsize(model_path)
    p = subprocess.run([ebb_bin, "models", "list", "--json", "--catalog", str(srv.catalog)], capture_output=True,
                       timeout=60, env=clean_env())
    assert p.returncode == 0, p.stderr
    cli = json.loads(p.stdout)
    assert len(cli) == 1
    for key in ("name", "architecture", "path", "bytes", "params", "created_at", "variants"):
        assert entry.get(key) == cli[0][key], key


# ---------------------------------------------------------------- the openai client vs ebb generate

CHAT_MSG = "What is the capital of France?"


def test_chat_greedy_matches_generate(client, srv, ebb_bin, model_path):
    r = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": CHAT_MSG}],
                                       max_tokens=12, temperature=0, seed=3)
    want = ebb_generate(ebb_bin, model_path, "--chat", CHAT_MSG, "-n", "12", "--temp", "0")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == want
    assert want, "greedy output should not be empty"
    # usage: the prompt as /tokenize renders it; finish_reason consistent with the count.
    tok = requests.post(srv.url("/tokenize"), json={"messages": [{"role": "user", "content": CHAT_MSG}]},
                        timeout=IO_TIMEOUT).json()
    assert r.usage.prompt_tokens == tok["count"]
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")


def test_chat_sampled_n2_matches_generate_seed_by_seed(client, srv, ebb_bin, model_path):
    kw = dict(model=srv.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=10,
              temperature=0.8, seed=1234, n=2)
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    # Choice j samples with seed + j; ebb generate's other filters are turned off
    # to match the API's defaults (top_k 0, top_p 1, min_p 0).
    for j in range(2):
        want = ebb_generate(ebb_bin, model_path, "--chat", "Say hi", "-n", "10", "--temp", "0.8",
                            "--seed", str(1234 + j), "--top-k", "0", "--top-p", "1", "--min-p", "0")
        assert r.choices[j].message.content == want, j
    assert 2 <= r.usage.completion_tokens <= 20
    # Same seed, same output.
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_completion_greedy_and_seeded_match_generate(client, srv, ebb_bin, model_path):
    prompt = "Once upon a time"
    r = client.completions.create(model=srv.model, prompt=prompt, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ebb_generate(ebb_bin, model_path, "-p", prompt, "-n", "10", "--temp", "0")
    assert r.usage.completion_tokens == 10 or r.choices[0].finish_reason == "stop"
    # Sampled, with ebb generate's default filters sent as extensions.
    r = client.completions.create(model=srv.model, prompt=prompt, max_tokens=10, temperature=0.8, seed=42,
                                  top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05})
    want = ebb_generate(ebb_bin, model_path, "-p", prompt, "-n", "10", "--temp", "0.8", "--seed", "42")
    assert r.choices[0].text == want


def test_streamed_chat_equals_plain_and_reports_usage(client, srv):
    kw = dict(model=srv.model, messages=[{"role": "user", "content": CHAT_MSG}], max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is None for c in with_choices)
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert with_choices[-1].choices[0].finish_reason is not None
    # The usage chunk comes last, with no choices.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # The same counts; the draft counts ebb adds when it speculated depend on
    # the step times the engine measured, so they may differ between runs.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chunks[-1].usage, k) for k in counts] == [getattr(plain.usage, k) for k in counts]


def test_streamed_completion_n2_matches_generate(client, srv, ebb_bin, model_path):
    prompt = "The best thing about summer is"
    chunks = list(client.completions.create(model=srv.model, prompt=prompt, max_tokens=8, temperature=0.8,
                                            seed=77, n=2, top_p=0.95, extra_body={"top_k": 40, "min_p": 0.05},
                                            stream=True, stream_options={"include_usage": True}))
    texts, finishes = {0: "", 1: ""}, {}
    for c in chunks:
        for ch in c.choices:
            assert ch.index in texts
            assert ch.index not in finishes, "text after the finish_reason"
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert set(finishes) == {0, 1}
    for j in range(2):
        want = ebb_generate(ebb_bin, model_path, "-p", prompt, "-n", "8", "--temp", "0.8", "--seed", str(77 + j))
        assert texts[j] == want, j
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens <= 16
    assert usage.prompt_tokens == len(requests.post(srv.url("/tokenize"), json={"prompt": prompt},
                                                    timeout=IO_TIMEOUT).json()["tokens"])


def test_stop_strings(client, srv):
    prompt = "The capital of France is"
    full = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    # A whole word, and a piece cut across token boundaries.
    word = words[2]
    a = len(full) // 2
    piece = full[a:a + 5]
    cases = [(word, full[:full.index(word)])]
    if full.find(piece) == a:
        cases.append((piece, full[:a]))
    for stop, want in cases:
        for stops in (stop, ["never-appears-xyz", stop]):
            r = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0, stop=stops)
            assert r.choices[0].text == want, (stops, full)
            assert r.choices[0].finish_reason == "stop"
        # Streamed: no event shows any part of the stop string.
        events = [c.choices[0].text for c in client.completions.create(
            model=srv.model, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True) if c.choices]
        assert "".join(events) == want
    # A stop string that never appears changes nothing.
    r = client.completions.create(model=srv.model, prompt=prompt, max_tokens=12, temperature=0, stop=["@@@"])
    assert r.choices[0].text == full and r.choices[0].finish_reason == "length"


def test_seed_makes_sampling_reproducible(client, srv):
    def one(seed):
        return client.completions.create(model=srv.model, prompt="My favourite animal is the", max_tokens=8,
                                         temperature=1.0, seed=seed).choices[0].text
    first = one(7)
    assert one(7) == first
    assert len({first, one(8), one(9)}) >= 2, "three seeds gave the same sample"


def test_logprobs_match_ebb_logits(srv, ebb_bin, model_path, tmp_path):
    np = pytest.importorskip("numpy")
    prompt = "The capital of France is"
    doc = complete(srv, prompt=prompt, max_tokens=3, temperature=0, logprobs=0)   # 0: no alternatives
    ch = doc["choices"][0]
    lp = ch["logprobs"]
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["top_logprobs"] is None and len(lp["token_logprobs"]) == 3
    # The same tokens' log-probabilities from the model's logits, via ebb logits.
    tok = lambda text: requests.post(srv.url("/tokenize"), json={"prompt": text},  # noqa: E731
                                     timeout=IO_TIMEOUT).json()["tokens"]
    p_ids, ids = tok(prompt), tok(prompt + ch["text"])
    assert ids[:len(p_ids)] == p_ids and len(ids) == len(p_ids) + 3, (p_ids, ids)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids[:-1])))
    p = subprocess.run([ebb_bin, "logits", "-m", model_path, "--ids-file", str(tmp_path / "ids.txt"),
                        "-o", str(tmp_path / "logits.bin"), "--all"], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = np.fromfile(tmp_path / "logits.bin", dtype=np.float32).reshape(len(ids) - 1, -1).astype(np.float64)
    for k in range(3):
        row = rows[len(p_ids) - 1 + k]
        want = row[ids[len(p_ids) + k]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        assert int(row.argmax()) == ids[len(p_ids) + k]   # greedy picked the top token
        assert abs(lp["token_logprobs"][k] - want) < 2e-3, (k, lp["token_logprobs"][k], want)
    # Chat: each entry's bytes are the token's exact bytes.
    doc = chat(srv, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True)
    content = doc["choices"][0]["logprobs"]["content"]
    assert len(content) == doc["usage"]["completion_tokens"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == doc["choices"][0]["message"]["content"]
    assert all(c["logprob"] <= 0 and c["top_logprobs"] == [] for c in content)


def test_several_prompts_and_choices(srv):
    prompts = ["The sky is", "Water boils at"]
    doc = complete(srv, prompt=prompts, n=2, max_tokens=3, temperature=0)
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2, 3]
    alone = [complete(srv, prompt=p, max_tokens=3, temperature=0)["choices"][0]["text"] for p in prompts]
    # choice index = prompt_index * n + j; greedy: both choices of a prompt agree.
    assert [c["text"] for c in doc["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    n_prompt = sum(len(requests.post(srv.url("/tokenize"), json={"prompt": p}, timeout=IO_TIMEOUT).json()["tokens"])
                   for p in prompts)
    assert doc["usage"]["prompt_tokens"] == n_prompt   # each prompt counted once
    assert doc["usage"]["completion_tokens"] == 12


# ---------------------------------------------------------------- concurrency

def test_16_concurrent_streams_match_their_solo_runs(srv):
    n = 16
    prompts = [f"One sentence about the number {i * 7 + 3}." for i in range(n)]
    body = dict(model=srv.model, max_tokens=8, temperature=0)

    def messages(p):   # a short system message keeps the prompts (and the test) short
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]

    solo = [chat(srv, messages=messages(p), **body)["choices"][0]["message"]["content"] for p in prompts]

    results = [None] * n
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            cl = openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=180)
            barrier.wait(30)
            t0 = time.monotonic()
            first = None
            text, finish, role = "", None, None
            for c in cl.chat.completions.create(messages=messages(prompts[i]), stream=True, **body):
                if not c.choices:
                    continue
                d = c.choices[0].delta
                role = role or d.role
                if d.content and first is None:
                    first = time.monotonic()
                text += d.content or ""
                finish = c.choices[0].finish_reason or finish
            results[i] = dict(text=text, finish=finish, role=role, t0=t0, first=first, end=time.monotonic())
        except Exception as e:   # reported below with its index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert all(r is not None for r in results)
    for i, r in enumerate(results):
        assert r["role"] == "assistant"
        assert r["finish"] in ("stop", "length")
        assert r["text"] == solo[i], (i, r["text"], solo[i])
    assert len({r["text"] for r in results}) == n, "outputs of distinct prompts should differ"
    # They really ran together: every stream had produced text before any had ended.
    assert max(r["first"] for r in results) < min(r["end"] for r in results)
    wait_kv_empty(srv, 10)


# ---------------------------------------------------------------- cancellation

def disconnect_mid_stream(srv, body, path, timeout):
    before, _ = metrics(srv)
    for hard in (False, True):
        st = Stream(srv, path, body)
        assert st.status == 200 and st.headers["content-type"] == "text/event-stream"
        got_text = False
        while not got_text:
            e = st.event()
            assert e is not None and e != "[DONE]"
            ch = json.loads(e)["choices"][0]
            got_text = bool(ch["delta"].get("content") if "delta" in ch else ch["text"])
        # Running, so it holds KV cache pages.
        m = memory(srv)
        assert m["kv_allocated_bytes"] > 0 and held(m) > 0, m
        st.close(hard=hard)
        wait_kv_empty(srv, timeout)
    deadline = time.monotonic() + timeout
    while True:
        after, _ = metrics(srv)
        cancelled = (sample(after, "ebb_requests_finished_total", model=srv.model, reason="cancelled")
                     - sample(before, "ebb_requests_finished_total", model=srv.model, reason="cancelled"))
        if cancelled >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert cancelled == 2
    assert sample(after, "ebb_kv_cache_bytes", model=srv.model) <= sample(after, "ebb_prompt_cache_bytes", model=srv.model)
    assert sample(after, "ebb_requests_running", model=srv.model) == 0


def test_disconnect_mid_stream_frees_the_kv_cache(srv):
    disconnect_mid_stream(srv, dict(messages=[{"role": "user", "content": "Tell me a long story about dragons."}],
                                    max_tokens=1000, temperature=0, stream=True),
                          "/v1/chat/completions", timeout=15)
    # The daemon is unharmed.
    assert complete(srv, prompt="Hello", max_tokens=3, temperature=0)["choices"][0]["finish_reason"] == "length"


def cancel_by_id(srv, path, body, stream):
    """Starts a long request, finds its id among those issued since, and
    cancels it with DELETE /v1/requests/{id}. Returns (the id, the result)."""
    start = request_id(srv)
    result = {}

    def run():
        if stream:
            st = Stream(srv, path, body)
            result["events"] = st.events()
            st.close()
        else:
            result["resp"] = requests.post(srv.url(path), json=body, timeout=120)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while held(memory(srv)) == 0:   # running (kept caches are not)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    now = request_id(srv)
    prefix = "chatcmpl-" if "chat" in path else "cmpl-"
    cancelled = None
    for rid in range(start + 1, now):
        r = requests.delete(srv.url(f"/v1/requests/{prefix}{rid}"), headers=AUTH, timeout=IO_TIMEOUT)
        if r.status_code == 200:
            assert r.json()["id"] == f"{prefix}{rid}" and r.json()["cancelled"] is True
            cancelled = rid
            break
        assert_error(r, 404, param="id")
    t.join(60)
    assert cancelled is not None, "no running request found to cancel"
    return cancelled, result


def test_cancel_a_running_request_by_id(srv):
    body = dict(prompt="Once upon a time", max_tokens=1000, temperature=0)
    rid, result = cancel_by_id(srv, "/v1/completions", body, stream=False)
    r = result["resp"]
    assert r.status_code == 200 and int(r.headers["X-Request-Id"]) == rid
    doc = r.json()
    assert doc["id"] == f"cmpl-{rid}"
    assert doc["choices"][0]["finish_reason"] == "cancelled"
    assert doc["usage"]["completion_tokens"] < 1000
    wait_kv_empty(srv, 10)
    # Finished now: unknown. Bare numbers work as ids too.
    assert_error(requests.delete(srv.url(f"/v1/requests/{rid}"), headers=AUTH, timeout=IO_TIMEOUT), 404, param="id")
    assert_error(requests.delete(srv.url("/v1/requests/cmpl-987654321"), headers=AUTH, timeout=IO_TIMEOUT), 404)
    assert_error(requests.delete(srv.url("/v1/requests/not-an-id"), headers=AUTH, timeout=IO_TIMEOUT), 400,
                 param="id")
    assert_error(requests.delete(srv.url("/v1/requests/99999999999999999999999"), headers=AUTH,
                                 timeout=IO_TIMEOUT), 400, param="id")
    r = requests.delete(srv.url(f"/v1/requests/{rid}"), timeout=IO_TIMEOUT)
    assert_error(r, 401)


def test_cancel_a_stream_by_id(srv):
    body = dict(messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=1000,
                temperature=0, stream=True, stream_options={"include_usage": True})
    rid, result = cancel_by_id(srv, "/v1/chat/completions", body, stream=True)
    events = result["events"]
    assert events[-1] == "[DONE]"
    docs = [json.loads(e) for e in events[:-1]]
    finishes = [c["finish_reason"] for d in docs for c in d["choices"] if c["finish_reason"]]
    assert finishes == ["cancelled"]
    assert docs[-1]["choices"] == [] and docs[-1]["usage"]["completion_tokens"] < 1000
    wait_kv_empty(srv, 10)


# ---------------------------------------------------------------- bad input

LONG_PROMPT_IDS = list(range(100, 100 + 9000))   # longer than the context

BAD = [
    # (name, path, body: bytes or a JSON value, status, param, needle)
    ("malformed json", "/v1/completions", b'{"prompt": "a"', 400, None, "not valid JSON"),
    ("empty body", "/v1/completions", b"", 400, None, None),
    ("array body", "/v1/completions", [1], 400, None, "JSON object"),
    ("duplicate key", "/v1/completions", b'{"prompt": "a", "prompt": "b"}', 400, None, None),
    ("invalid utf-8", "/v1/completions", b'{"prompt": "caf\xe9 \xff\xfe"}', 400, None, "UTF-8"),
    ("invalid utf-8 in chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, None, "UTF-8"),
    ("nul character", "/v1/completions", b'{"prompt": "a\\u0000b"}', 400, None, "NUL"),
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("temperature wrong type", "/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", None),
    ("stream wrong type", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", None),
    ("max_tokens as string", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens", None),
    ("n fractional", "/v1/completions", {"prompt": "a", "n": 1.5}, 400, "n", None),
    ("content wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    ("missing role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role", None),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role", None),
    ("missing messages", "/v1/chat/completions", {"model": "x", "max_tokens": 3}, 400, "messages", "required"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("unknown model", "/v1/completions", {"prompt": "a", "model": "no-such-model"}, 404, "model", "no-such-model"),
    ("unknown model in chat", "/v1/chat/completions",
     {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", None),
    ("negative max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens", None),
    ("zero max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ("absurd max_tokens", "/v1/completions", {"prompt": "a", "max_tokens": 10 ** 12}, 400, "max_tokens", None),
    ("max_tokens beyond int64", "/v1/completions", b'{"prompt": "a", "max_tokens": 100000000000000000000000}',
     400, None, None),
    ("max_tokens beyond the context", "/v1/completions", {"prompt": "a", "max_tokens": 8192}, 400, "max_tokens",
     "context"),
    ("chat max_tokens beyond the context", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8190}, 400, "max_tokens", "context"),
    ("prompt longer than the context", "/v1/completions", {"prompt": LONG_PROMPT_IDS, "max_tokens": 4}, 400,
     "<any>", "context"),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 2, 10 ** 6]}, 400, "prompt[2]", None),
    ("negative token id", "/v1/completions", {"prompt": [1, -2]}, 400, "prompt[1]", None),
    ("n = 0", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n", None),
    ("n = 17", "/v1/completions", {"prompt": "a", "n": 17}, 400, "n", None),
    ("temperature 3", "/v1/completions", {"prompt": "a", "temperature": 3}, 400, "temperature", None),
    ("negative temperature", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, 400, "temperature", None),
    ("top_p 0", "/v1/completions", {"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ("empty stop string", "/v1/completions", {"prompt": "a", "stop": ""}, 400, "stop", None),
    ("empty stop string in a list", "/v1/completions", {"prompt": "a", "stop": ["x", ""]}, 400, "stop[1]", None),
    ("five stop strings", "/v1/completions", {"prompt": "a", "stop": list("abcde")}, 400, "stop", None),
    ("unknown field", "/v1/completions", {"prompt": "a", "temprature": 0}, 400, "temprature", "temprature"),
    ("unknown field in chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "foo": 1}, 400, "foo", None),
    ("prompt sent to chat", "/v1/chat/completions", {"prompt": "a"}, 400, "prompt", None),
    ("stream_options without stream", "/v1/completions",
     {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("logprobs 6", "/v1/completions", {"prompt": "a", "logprobs": 6}, 400, "logprobs", None),
    ("echo not a boolean", "/v1/completions", {"prompt": "a", "echo": "yes"}, 400, "echo", None),
    ("logit_bias outside the vocabulary", "/v1/completions", {"prompt": "a", "logit_bias": {"1000000": 1}}, 400,
     "logit_bias.1000000", None),
    ("image content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type", None),
    ("tokenize with both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, 400,
     "<any>", None),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [5, 10 ** 6]}, 400, "tokens[1]", None),
    ("detokenize wrong type", "/detokenize", {"tokens": "abc"}, 400, "tokens", None),
    ("tokenize unknown model", "/tokenize", {"model": "nope", "prompt": "a"}, 404, "model", None),
    ("more completions than the queue holds", "/v1/completions",
     {"prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 1}, 400, "prompt", "queues at most 64"),
]


def send_bad(srv, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(srv.url(path), data=data, headers={"Content-Type": "application/json"},
                         timeout=IO_TIMEOUT)


# The OpenAI error codes clients branch on; every other refusal's code is null.
BAD_CODES = {
    "unknown model": "model_not_found", "unknown model in chat": "model_not_found",
    "tokenize unknown model": "model_not_found",
    "max_tokens beyond the context": "context_length_exceeded",
    "chat max_tokens beyond the context": "context_length_exceeded",
    "prompt longer than the context": "context_length_exceeded",
}


@pytest.mark.parametrize("name,path,body,status,param,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(srv, name, path, body, status, param, needle):
    r = send_bad(srv, path, body)
    err = assert_error(r, status, param=param, needle=needle)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == BAD_CODES.get(name)
    if err["code"] == "context_length_exceeded":
        assert not re.search(r"-\d", err["message"]), err["message"]   # no negative counts


def test_a_prompt_that_fills_the_context_is_named_as_the_problem(srv):
    """Whatever max_tokens says (here none, as OpenAI clients send), a prompt as long as the
    context is the prompt's fault: the message says so, with the numbers, none negative."""
    for body in ({"prompt": LONG_PROMPT_IDS}, {"prompt": LONG_PROMPT_IDS, "max_tokens": 4}):
        err = assert_error(send_bad(srv, "/v1/completions", body), 400, param="prompt")
        assert "the prompt alone has" in err["message"] and str(len(LONG_PROMPT_IDS)) in err["message"]
        assert err["code"] == "context_length_exceeded"
        assert not re.search(r"-\d", err["message"]), err["message"]


def test_retrieve_a_model_by_id(client, srv):
    """GET /v1/models/{id} (the official client's models.retrieve); the id is one
    percent-decoded path segment."""
    m = client.models.retrieve(srv.model)
    assert m.id == srv.model and m.object == "model" and m.owned_by == "ebb"
    listed = {x.id: x.created for x in client.models.list().data}
    assert m.created == listed[srv.model]
    quoted = "".join(f"%{b:02X}" for b in srv.model.encode())
    r = requests.get(srv.url("/v1/models/" + quoted), timeout=IO_TIMEOUT)
    assert r.status_code == 200 and r.json()["id"] == srv.model
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"
    for bad in ("%zz", "a%00b", "%4"):   # sent as they are (requests would re-quote them)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(f"GET /v1/models/{bad} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), reply
        assert json.loads(body)["error"]["param"] == "model"


def test_body_over_the_limit_is_413(srv):
    body = json.dumps({"prompt": "x" * 300_000, "max_tokens": 1}).encode()   # limit: 256 KiB
    r = requests.post(srv.url("/v1/completions"), data=body, timeout=IO_TIMEOUT)
    assert_error(r, 413, needle="too large")
    r = requests.post(srv.url("/v1/chat/completions"), timeout=IO_TIMEOUT,
                      json={"messages": [{"role": "user", "content": "y" * 300_000}]})
    assert r.status_code == 413


def test_wrong_method_and_unknown_route(srv):
    r = requests.get(srv.url("/v1/completions"), timeout=IO_TIMEOUT)
    assert_error(r, 405)
    assert r.headers["Allow"] == "POST"
    assert_error(requests.post(srv.url("/v1/nothing"), json={}, timeout=IO_TIMEOUT), 404)


def test_slow_headers_and_garbage_then_still_serving(srv):
    # Headers trickled slower than header_timeout_ms (1.5 s here): 408.
    with srv.connect() as s, s.makefile("rb") as f:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        status = None
        for i in range(30):
            try:
                s.sendall(f"X-Slow-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.25)
            try:
                if s.recv(1, socket.MSG_PEEK):
                    break
            except socket.timeout:
                continue
        s.settimeout(IO_TIMEOUT)
        status = f.readline()
        assert status.startswith(b"HTTP/1.1 408"), status
        assert time.monotonic() - t0 < 5
    # Garbage bytes: 400, and the connection is closed.
    with srv.connect() as s, s.makefile("rb") as f:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 400")
        s.settimeout(IO_TIMEOUT)
        while f.read1(65536):
            pass
    doc = complete(srv, prompt="Hello", max_tokens=2, temperature=0)
    assert doc["usage"]["completion_tokens"] == 2


def test_still_serving_after_bad_input(srv, client):
    for name, path, body, *_ in BAD[:8]:
        send_bad(srv, path, body)
    r = client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert srv.proc.poll() is None


# ---------------------------------------------------------------- metrics

def resident_is_file_sized(weights, model_path):
    """Native weights: the file's tensor bytes (plus nothing inflated): within the file's size
    and more than 90% of it (the rest is metadata and the tokenizer)."""
    size = os.path.getsize(model_path)
    return 0.9 * size < weights <= size


def test_weights_f32_setting_serves_the_dequantized_path(ebb_bin, model_path, tmpdir_module):
    """`weights: f32` (here as its flag) keeps the dequantized path for comparison: the
    resident weights are float32 (four bytes per parameter, well over the file's size) and
    the greedy answer is `ebb generate --weights f32`'s."""
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "f32", "--weights", "f32")
    try:
        weights = memory(s)["weight_bytes"]
        assert weights > 4 * os.path.getsize(model_path), weights
        assert sample(metrics(s)[0], "ebb_resident_weight_bytes", model=s.model) == weights
        r = chat(s, model=s.model, messages=[{"role": "user", "content": CHAT_MSG}], max_tokens=12,
                 temperature=0)
        want = ebb_generate(ebb_bin, model_path, "--weights", "f32", "--chat", CHAT_MSG, "-n", "12", "--temp", "0")
        assert r["choices"][0]["message"]["content"] == want
    finally:
        s.stop_clean()


def test_metrics_parse_and_move(srv, model_path):
    before, text = metrics(srv)
    for fam in ("ebb_time_to_first_token_seconds", "ebb_inter_token_latency_seconds",
                "ebb_request_latency_seconds", "ebb_request_queue_seconds"):
        assert f"# TYPE {fam} histogram" in text
    for fam in ("ebb_prompt_tokens_total", "ebb_generation_tokens_total", "ebb_requests_finished_total"):
        assert f"# TYPE {fam} counter" in text
    assert all(k[0].startswith("ebb_") for k in before)
    assert resident_is_file_sized(sample(before, "ebb_resident_weight_bytes", model=srv.model), model_path)

    a = complete(srv, prompt="The sky is", max_tokens=5, temperature=0)
    st = Stream(srv, "/v1/chat/completions", dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
    events = st.events()
    st.close()
    b = json.loads(events[-2])["usage"]
    after, _ = metrics(srv)

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    m = srv.model
    assert delta("ebb_prompt_tokens_total", model=m) == a["usage"]["prompt_tokens"] + b["prompt_tokens"]
    gen = a["usage"]["completion_tokens"] + b["completion_tokens"]
    assert delta("ebb_generation_tokens_total", model=m) == gen
    assert delta("ebb_requests_finished_total", model=m) == 2
    assert delta("ebb_requests_finished_total", model=m, reason="length") == (
        (a["choices"][0]["finish_reason"] == "length") + (b["completion_tokens"] == 4))
    assert delta("ebb_time_to_first_token_seconds_count", model=m) == 2
    assert delta("ebb_request_latency_seconds_count", model=m) == 2
    assert delta("ebb_request_queue_seconds_count", model=m) == 2
    assert delta("ebb_inter_token_latency_seconds_count", model=m) == gen - 2
    assert delta("ebb_time_to_first_token_seconds_sum", model=m) > 0
    assert delta("ebb_http_requests_total", route="/v1/completions", code="200") == 1
    assert sample(after, "ebb_requests_running", model=m) == 0
    assert sample(after, "ebb_requests_waiting", model=m) == 0
    assert sample(after, "ebb_memory_budget_bytes") == memory(srv)[BUDGET]


# ---------------------------------------------------------------- admin

def admin_routes(model):
    return [("GET", "/admin/memory", None), ("PUT", "/admin/memory", {BUDGET: 0}),
            ("GET", "/admin/models", None), ("POST", "/admin/models", {"path": "/nonexistent.gguf"}),
            ("DELETE", f"/admin/models/{model}", None), ("DELETE", "/v1/requests/1", None)]


def test_admin_routes_refuse_without_the_token(srv):
    before = memory(srv)
    for method, path, body in admin_routes(srv.model):
        for headers, statuses in (({}, (401,)),
                                  ({"Authorization": "Bearer wrong"}, (401, 403)),
                                  ({"Authorization": f"Bearer {TOKEN}x"}, (401, 403)),
                                  ({"Authorization": f"Bearer {TOKEN[:-1]}"}, (401, 403)),
                                  ({"Authorization": f"Basic {TOKEN}"}, (401, 403)),
                                  ({"Authorization": TOKEN}, (401, 403))):
            r = requests.request(method, srv.url(path), json=body, headers=headers, timeout=IO_TIMEOUT)
            assert r.status_code in statuses, (method, path, headers, r.status_code, r.text)
            assert_error(r, r.status_code)
    # Nothing happened: the model is still there, the budget unchanged.
    assert [m["id"] for m in requests.get(srv.url("/v1/models"), timeout=IO_TIMEOUT).json()["data"]] == [srv.model]
    assert memory(srv)[BUDGET] == before[BUDGET]


def test_the_bearer_scheme_is_case_insensitive(srv):
    """RFC 9110 §11.1: auth schemes are case-insensitive; extra spaces before the token are
    allowed."""
    for header in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN}"):
        r = requests.get(srv.url("/admin/memory"), headers={"Authorization": header}, timeout=IO_TIMEOUT)
        assert r.status_code == 200, (header, r.text)
    r = requests.get(srv.url("/admin/memory"), headers={"Authorization": f"bearer {TOKEN}x"}, timeout=IO_TIMEOUT)
    assert r.status_code in (401, 403)


def test_admin_routes_disabled_without_a_configured_token(ebb_bin, tmpdir_module):
    s = Server(ebb_bin, tmpdir_module / "notoken.db", token=None)
    try:
        for method, path, body in admin_routes("anything"):
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {TOKEN}"}):
                r = requests.request(method, s.url(path), json=body, headers=headers, timeout=IO_TIMEOUT)
                assert_error(r, 403)
    finally:
        s.stop_clean()


def test_admin_bodies_are_strict(srv):
    """docs/api.md: a field the route does not know is refused with 400 naming it."""
    before = memory(srv)[BUDGET]
    r = requests.put(srv.url("/admin/memory"), json={"bogus": 1, BUDGET: before}, headers=AUTH, timeout=IO_TIMEOUT)
    assert_error(r, 400, param="bogus")
    r = requests.post(srv.url("/admin/models"), json={"nmae": "x", "path": "/nonexistent.gguf"}, headers=AUTH,
                      timeout=IO_TIMEOUT)
    assert_error(r, 400, param="nmae")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_daemon_sleeps_after_a_budget_change(srv):
    """An engine woken to apply a new budget goes back to waiting: an early governor left a
    plain model's engine spinning at a full core once a budget was set."""
    wait_kv_empty(srv, 30)   # requests an earlier test left behind have ended: the engine is idle
    before = memory(srv)[BUDGET]
    try:
        assert put_budget(srv, memory(srv)["weight_bytes"] + (256 << 20)).status_code == 200
        time.sleep(0.5)
        t0 = cpu_seconds(srv.proc.pid)
        time.sleep(2)
        assert cpu_seconds(srv.proc.pid) - t0 < 0.3
    finally:
        assert put_budget(srv, before).status_code == 200


def test_memory_budget_put_get_and_impossible_values(srv, model_path):
    state = memory(srv)
    weights = state["weight_bytes"]
    assert resident_is_file_sized(weights, model_path) and state[BUDGET] == 0
    try:
        value = weights + 512 * 2 ** 20
        r = put_budget(srv, value)
        assert r.status_code == 200, r.text
        assert r.json()[BUDGET] == value
        got = memory(srv)
        assert got[BUDGET] == value
        assert [m["kv_budget_bytes"] for m in got["models"]] == [value - weights]
        assert sample(metrics(srv)[0], "ebb_memory_budget_bytes") == value
        # Impossible or malformed budgets change nothing: too small is a conflict with
        # what the model needs (409), not a malformed value (400).
        for bad, status in ((weights // 2, 409), (weights, 409), (weights + 1, 409), (-1, 400), ("lots", 400),
                            (1.5, 400), (None, 400)):
            r = put_budget(srv, bad)
            assert_error(r, status, param=BUDGET)
            assert memory(srv)[BUDGET] == value, bad
        r = requests.put(srv.url("/admin/memory"), data=b"{oops", headers=AUTH, timeout=IO_TIMEOUT)
        assert_error(r, 400, param=None)
        assert sample(metrics(srv)[0], "ebb_memory_budget_bytes") == value
        # One byte over the weights cannot hold any request: refused, naming what would.
        err = put_budget(srv, weights + 1).json()["error"]["message"]
        least = int(re.search(r"give at least (\d+) bytes", err).group(1))
        assert "smallest request" in err and least > weights + 1, err
        assert put_budget(srv, least).status_code == 200
        r = complete(srv, prompt="Hi", max_tokens=1, temperature=0)   # and it does hold one
        assert r["usage"]["completion_tokens"] == 1
        assert_error(put_budget(srv, least - 1), 409, param=BUDGET)
    finally:
        assert put_budget(srv, 0).status_code == 200
    assert memory(srv)[BUDGET] == 0


def test_a_tight_budget_bounds_the_context_and_requests_without_max_tokens_fit(srv):
    """Under a budget that holds fewer positions than the model's context, the
    budget is the context a request may use: asking for more is a 400 that
    names it (never a 503 that OpenAI clients retry forever), and a request
    without max_tokens -- every OpenAI client's default -- gets the rest of
    it and is served."""
    weights = memory(srv)["weight_bytes"]
    try:
        assert put_budget(srv, weights + 16 * 2 ** 20).status_code == 200
        r = requests.post(srv.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 4000}, timeout=IO_TIMEOUT)
        err = assert_error(r, 400, param="max_tokens", needle="the memory budget holds")
        assert err["code"] == "context_length_exceeded" and not r.headers.get("Retry-After"), err
        holds = int(re.search(r"holds (\d+) tokens", err["message"]).group(1))
        assert 0 < holds < 16 * 2 ** 20 // F32_KV_BYTES_PER_POSITION + 1, err
        r = requests.post(srv.url("/v1/completions"), json={"prompt": "word " * (holds + 10)}, timeout=IO_TIMEOUT)
        assert_error(r, 400, param="prompt", needle="the prompt alone has")
        doc = chat(srv, messages=[{"role": "user", "content": "Say hello."}], temperature=0)
        assert doc["choices"][0]["finish_reason"] in ("stop", "length"), doc
        assert doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"] <= holds, doc
        doc = complete(srv, prompt="Hi", max_tokens=4, temperature=0)
        assert doc["usage"]["completion_tokens"] == 4
    finally:
        assert put_budget(srv, 0).status_code == 200
    wait_kv_empty(srv, 10)


def test_requests_past_the_budget_are_preempted_and_finish_as_if_alone(srv):
    """Three requests that together outgrow the budget all start (each
    reserves its prompt), grow a page at a time, and the newest is preempted
    when the budget runs out: its pages go back and it is recomputed later.
    Nobody fails, a stream only pauses, and every text equals the same
    request run alone without a budget."""
    prompts = ["Once upon a time, in a village by the sea,", "In the year 1850, the city of London",
               "Here is a long list of fruits and their colours:"]
    body = dict(max_tokens=250, temperature=0)
    docs = [complete(srv, prompt=p, **body) for p in prompts]
    # The premise: every request runs to max_tokens (5 pages). One that
    # stopped early could leave the other two inside the budget, and whether
    # anyone is preempted would then hang on arrival times.
    assert all(d["choices"][0]["finish_reason"] == "length" for d in docs), [d["usage"] for d in docs]
    alone = [d["choices"][0]["text"] for d in docs]
    weights = memory(srv)["weight_bytes"]
    page = 64 * F32_KV_BYTES_PER_POSITION
    before = sample(metrics(srv)[0], "ebb_preemptions_total", model=srv.model)
    out = {}
    try:
        # Each grows to 5 pages; the budget holds 7.
        assert put_budget(srv, weights + 7 * page).status_code == 200

        def run(i):
            out[i] = requests.post(srv.url("/v1/completions"), json=dict(prompt=prompts[i], **body), timeout=300)

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        streamed = Stream(srv, "/v1/completions", dict(prompt=prompts[2], stream=True, **body))
        assert streamed.status == 200
        events = streamed.events()
        streamed.close()
        for t in threads:
            t.join(300)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        assert stream_text(events, chat=False) == alone[2]
        for i in (0, 1):
            assert out[i].status_code == 200, out[i].text
            assert out[i].json()["choices"][0]["text"] == alone[i], i
        assert sample(metrics(srv)[0], "ebb_preemptions_total", model=srv.model) > before
    finally:
        assert put_budget(srv, 0).status_code == 200
    wait_kv_empty(srv, 15)


@pytest.mark.parametrize("stream", [False, True])
def test_a_budget_below_what_running_requests_hold_is_refused_and_they_go_on(srv, stream):
    """The least budget counts the KV the running requests hold (issue 12): asking for less
    is a 409 that names it, nothing changes, and the request runs to its end with the same
    text as alone; that least budget is then accepted."""
    weights = memory(srv)["weight_bytes"]
    page = 64 * F32_KV_BYTES_PER_POSITION
    body = dict(prompt="Once upon a time", max_tokens=300, temperature=0)
    alone = complete(srv, **body)["choices"][0]["text"]
    out, running, first = {}, None, []
    try:
        if stream:
            running = Stream(srv, "/v1/completions", dict(stream=True, **body))
            first.append(running.event())
            assert running.status == 200 and first[0]
        else:
            waiter = threading.Thread(target=lambda: out.setdefault("r", requests.post(
                srv.url("/v1/completions"), json=body, timeout=120)))
            waiter.start()
        deadline = time.monotonic() + 60
        while held(memory(srv)) < 4 * page:
            assert time.monotonic() < deadline, "the request never grew to 4 pages"
            time.sleep(0.05)
        r = put_budget(srv, weights + 2 * page)
        err = assert_error(r, 409, param=BUDGET, needle="running requests hold")
        assert err["code"] == "memory_budget_too_small", err
        least = int(re.search(r"give at least (\d+) bytes", err["message"]).group(1))
        assert least >= weights + 4 * page, err
        assert memory(srv)[BUDGET] == 0
        if stream:
            events = first + running.events()
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
            assert stream_text(events, chat=False) == alone
        else:
            waiter.join(60)
            assert out["r"].status_code == 200, out["r"].text
            assert out["r"].json()["choices"][0]["text"] == alone
    finally:
        if running:
            running.close()
        assert put_budget(srv, 0).status_code == 200
    wait_kv_empty(srv, 15)


def test_full_queue_is_429_and_a_waiting_request_can_be_cancelled(ebb_bin, model_path, tmpdir_module):
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "queue", "--max-running", "1", "--queue-length", "1")
    try:
        first = request_id(s)
        running = Stream(s, "/v1/completions", dict(prompt="Once upon a time", max_tokens=2000, stream=True))
        assert running.status == 200 and running.event()
        out = {}
        waiter = threading.Thread(target=lambda: out.setdefault("r", requests.post(
            s.url("/v1/completions"), json={"prompt": "Hello", "max_tokens": 50}, timeout=120)))
        waiter.start()
        deadline = time.monotonic() + 20
        while sample(metrics(s)[0], "ebb_requests_waiting", model=s.model) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = requests.post(s.url("/v1/completions"), json={"prompt": "Third", "max_tokens": 5}, timeout=IO_TIMEOUT)
        assert_error(r, 429)
        assert r.headers.get("Retry-After")
        # Cancel the waiting one: it ends at once, with nothing generated.
        now = request_id(s)
        hits = [rid for rid in reversed(range(first + 1, now))   # the waiting one (newer) first
                if requests.delete(s.url(f"/v1/requests/{rid}"), headers=AUTH, timeout=IO_TIMEOUT).status_code == 200]
        assert len(hits) == 2   # the running one and the waiting one
        waiter.join(30)
        doc = out["r"].json()
        assert doc["choices"][0]["finish_reason"] == "cancelled"
        assert doc["usage"]["completion_tokens"] == 0
        events = running.events()
        running.close()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "cancelled"
        wait_kv_empty(s, 10)
    finally:
        s.stop_clean()


def test_budget_survives_a_restart_and_env_overrides_it(ebb_bin, model_path, tmpdir_module):
    catalog = tmpdir_module / "budget.db"
    a = Server(ebb_bin, catalog, model_path=model_path)
    try:
        a.wait_ready()
        weights = memory(a)["weight_bytes"]
        value = weights + 123_456_789
        assert put_budget(a, value).status_code == 200
    finally:
        a.stop_clean()
    # Restarted on the same catalog: the saved budget is back at once (the
    # model may still be loading; stopping then must be clean too).
    b = Server(ebb_bin, catalog, model_path=model_path)
    try:
        assert memory(b)[BUDGET] == value
        assert sample(metrics(b)[0], "ebb_memory_budget_bytes") == value
        assert f"memory_budget={value}" in b.log()
    finally:
        b.stop_clean()
    # An explicit environment variable wins over the saved value, and a flag over both.
    c = Server(ebb_bin, catalog, model_path=model_path, env={"EBB_MEMORY_BUDGET_BYTES": str(weights + 999)})
    try:
        assert memory(c)[BUDGET] == weights + 999
    finally:
        c.stop_clean()
    d = Server(ebb_bin, catalog, "--memory-budget-bytes", str(weights + 777), model_path=model_path,
               env={"EBB_MEMORY_BUDGET_BYTES": str(weights + 999)})
    try:
        assert memory(d)[BUDGET] == weights + 777
    finally:
        d.stop_clean()


def test_register_use_and_remove_a_model(srv, model_path, tmpdir_module):
    copy = tmpdir_module / "copy.gguf"
    shutil.copyfile(model_path, copy)
    admin = srv.url("/admin/models")
    r = requests.post(admin, json={"path": str(copy), "name": "copy"}, headers=AUTH, timeout=120)
    assert r.status_code == 201, r.text
    entry = r.json()
    assert entry["name"] == "copy" and entry["path"] == str(copy) and entry["bytes"] == os.path.getsize(copy)
    try:
        # Once loaded it is listed and answers like the original.
        deadline = time.monotonic() + 60
        while True:
            states = {m["name"]: m["state"] for m in
                      requests.get(admin, headers=AUTH, timeout=IO_TIMEOUT).json()["data"]}
            if states.get("copy") == "ready":
                break
            assert states.get("copy") == "loading", states
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ids = [m["id"] for m in requests.get(srv.url("/v1/models"), timeout=IO_TIMEOUT).json()["data"]]
        assert sorted(ids) == sorted([srv.model, "copy"])
        a = complete(srv, model="copy", prompt="The capital of France is", max_tokens=6, temperature=0)
        b = complete(srv, prompt="The capital of France is", max_tokens=6, temperature=0)
        assert a["model"] == "copy" and a["choices"][0]["text"] == b["choices"][0]["text"]
        assert memory(srv)["weight_bytes"] == 2 * sample(metrics(srv)[0], "ebb_resident_weight_bytes",
                                                         model=srv.model)

        # Refusals: a taken name, bad files, bad names.
        r = requests.post(admin, json={"path": str(copy), "name": "copy"}, headers=AUTH, timeout=120)
        assert_error(r, 409, param="name")
        truncated = tmpdir_module / "truncated.gguf"
        truncated.write_bytes(copy.read_bytes()[: os.path.getsize(copy) // 3])
        r = requests.post(admin, json={"path": str(truncated), "name": "trunc"}, headers=AUTH, timeout=120)
        err = assert_error(r, 400, param="path")
        assert "truncated" in err["message"]
        junk = tmpdir_module / "junk.gguf"
        junk.write_bytes(b"GGUF" + os.urandom(4000))
        assert_error(requests.post(admin, json={"path": str(junk)}, headers=AUTH, timeout=120), 400, param="path")
        assert_error(requests.post(admin, json={"path": str(tmpdir_module / "absent.gguf")}, headers=AUTH,
                                   timeout=120), 400, param="path")
        assert_error(requests.post(admin, json={"path": str(copy), "name": "bad name/.."}, headers=AUTH,
                                   timeout=120), 400, param="name")
        assert_error(requests.post(admin, json={"name": "x"}, headers=AUTH, timeout=120), 400, param="path")
        names = [m["name"] for m in requests.get(admin, headers=AUTH, timeout=IO_TIMEOUT).json()["data"]]
        assert sorted(names) == sorted([srv.model, "copy"])
        # Under a budget the two split the KV cache evenly...
        both = memory(srv)["weight_bytes"]
        budget = both + 256 * 2 ** 20
        assert put_budget(srv, budget).status_code == 200
        assert [m["kv_budget_bytes"] for m in memory(srv)["models"]] == [(budget - both) // 2] * 2
        # A stream on the model is running when it is removed.
        running = Stream(srv, "/v1/completions", dict(model="copy", prompt="Once upon a time", max_tokens=20,
                                                      temperature=0, stream=True))
        assert running.status == 200 and running.event()
    finally:
        r = requests.delete(srv.url("/admin/models/copy"), headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    # ...and the one that remains takes the removed one's share.
    left = memory(srv)
    assert [m["kv_budget_bytes"] for m in left["models"]] == [budget - left["weight_bytes"]], left
    assert put_budget(srv, 0).status_code == 200
    # The running stream still ends properly (cancelled, or run to its end).
    events = running.events()
    running.close()
    assert events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert len(finishes) == 1 and finishes[0] in ("cancelled", "length", "stop")
    ids = [m["id"] for m in requests.get(srv.url("/v1/models"), timeout=IO_TIMEOUT).json()["data"]]
    assert ids == [srv.model]
    r = requests.post(srv.url("/v1/completions"), json={"model": "copy", "prompt": "a", "max_tokens": 1},
                      timeout=IO_TIMEOUT)
    assert_error(r, 404, param="model")
    assert_error(requests.delete(srv.url("/admin/models/copy"), headers=AUTH, timeout=IO_TIMEOUT), 404)
    deadline = time.monotonic() + 20   # the copy's weights are freed
    while memory(srv)["weight_bytes"] != sample(metrics(srv)[0], "ebb_resident_weight_bytes", model=srv.model):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_model_the_budget_cannot_take_is_refused_with_409_and_its_series_go(ebb_bin, model_path, tmpdir_module):
    """Registering a second model whose weights would leave the budget unable
    to hold a request for each model is refused with 409 and the numbers,
    and nothing changes (not served, not in the catalog). Under a budget that
    holds both, it loads (the answer waits for the load), the KV budget is
    split, and once removed its metric series are gone from /metrics."""
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "load409")
    copy = tmpdir_module / "copy409.gguf"
    shutil.copyfile(model_path, copy)
    admin = s.url("/admin/models")
    try:
        weights = memory(s)["weight_bytes"]
        assert put_budget(s, weights + 40 * 2 ** 20).status_code == 200
        r = requests.post(admin, json={"path": str(copy), "name": "second"}, headers=AUTH, timeout=120)
        err = assert_error(r, 409, needle="would exceed the memory budget")
        assert err["code"] == "memory_budget_exceeded" and str(weights) in err["message"], err
        names = [m["name"] for m in requests.get(admin, headers=AUTH, timeout=IO_TIMEOUT).json()["data"]]
        assert names == [s.model]
        assert [m["id"] for m in requests.get(s.url("/v1/models"), timeout=IO_TIMEOUT).json()["data"]] == [s.model]
        assert memory(s)["weight_bytes"] == weights
        assert "refused" in s.log() and "second" in s.log()

        budget = 2 * weights + 80 * 2 ** 20
        assert put_budget(s, budget).status_code == 200
        r = requests.post(admin, json={"path": str(copy), "name": "second"}, headers=AUTH, timeout=120)
        assert r.status_code == 201 and r.json()["state"] == "ready", r.text
        assert [m["kv_budget_bytes"] for m in memory(s)["models"]] == [(budget - 2 * weights) // 2] * 2
        complete(s, model="second", prompt="Hi", max_tokens=2, temperature=0)
        assert 'model="second"' in metrics(s)[1]
        assert requests.delete(s.url("/admin/models/second"), headers=AUTH, timeout=120).status_code == 200
        deadline = time.monotonic() + 20
        while 'model="second"' in metrics(s)[1]:
            assert time.monotonic() < deadline, "the removed model's metric series stayed"
            time.sleep(0.1)
        assert f'model="{s.model}"' in metrics(s)[1]
    finally:
        s.stop_clean()


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_goes_back_to_the_system_when_the_load_ends(ebb_bin, model_path, tmpdir_module):
    """Eight long requests at once take about 170 MB of KV cache (150 new
    tokens each: 300 doubled the test's time and proved no more); once
    they are done the daemon's resident size returns to what it was before
    them (the allocator used to keep the freed pages), but for the caches
    the prompt cache keeps for a next turn (their pages, counted apart)."""
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "rss", "--max-running", "8")
    try:
        complete(s, prompt="Hi", max_tokens=8, temperature=0)   # the weights are paged in
        time.sleep(0.5)
        base = rss_bytes(s.proc.pid)
        peak = base

        def run(i):
            requests.post(s.url("/v1/completions"), timeout=300, json={
                "prompt": "Once upon a time " * (40 + 10 * i), "max_tokens": 150, "temperature": 0.8, "seed": i})

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_bytes(s.proc.pid))
            time.sleep(0.1)
        kept = wait_kv_empty(s, 15)["kv_allocated_bytes"]
        time.sleep(1.0)
        after = rss_bytes(s.proc.pid)
        print(f"rss base {base >> 20} MiB, peak {peak >> 20} MiB, after {after >> 20} MiB, kept {kept >> 20} MiB")
        assert peak - base > 100 * 2 ** 20, (base, peak)
        assert after - kept - base < 0.15 * (peak - base) + 8 * 2 ** 20, (base, peak, after, kept)
    finally:
        s.stop_clean()


# ---------------------------------------------------------------- tokenize

TEXTS = ["Hello world", "  leading spaces and trailing  ", "ünïcödé — “quotes” 日本語 🎉🚀",
         "<|im_start|>user hi<|im_end|>", "numbers 1234567890 and tabs\tend", "a"]


def test_tokenize_matches_the_cli_and_round_trips(srv, ebb_bin, model_path):
    listing = "\n".join(TEXTS) + "\n"
    p = subprocess.run([ebb_bin, "tokenize", "-m", model_path, "--file", "-"], input=listing.encode(),
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    cli = [[int(x) for x in line.split()] for line in p.stdout.decode().splitlines()]
    assert len(cli) == len(TEXTS)
    for text, want in zip(TEXTS, cli):
        r = requests.post(srv.url("/tokenize"), json={"prompt": text, "return_token_strs": True}, timeout=IO_TIMEOUT)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["tokens"] == want, text
        assert doc["count"] == len(want) and doc["max_model_len"] > 0
        assert len(doc["token_strs"]) == len(want)
        if text.isascii():
            assert "".join(doc["token_strs"]) == text
        back = requests.post(srv.url("/detokenize"), json={"tokens": doc["tokens"]}, timeout=IO_TIMEOUT)
        assert back.status_code == 200 and back.json() == {"prompt": text}
    assert requests.post(srv.url("/detokenize"), json={"tokens": []}, timeout=IO_TIMEOUT).json() == {"prompt": ""}


# ---------------------------------------------------------------- crashes and shutdown

def test_kill9_during_catalog_writes_leaves_it_intact(ebb_bin, model_path, tmpdir_module):
    catalog = tmpdir_module / "kill.db"
    s = Server(ebb_bin, catalog)   # empty catalog, no default model
    stop = threading.Event()
    sent_budgets = []

    def budgets():
        i = 0
        while not stop.is_set():
            i += 1
            sent_budgets.append(i * 1000)
            try:
                put_budget(s, i * 1000)
            except requests.RequestException:
                return

    def models():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                requests.post(s.url("/admin/models"), json={"path": model_path, "name": f"k{i}"}, headers=AUTH,
                              timeout=IO_TIMEOUT)
                requests.delete(s.url(f"/admin/models/k{i}"), headers=AUTH, timeout=IO_TIMEOUT)
            except requests.RequestException:
                return

    threads = [threading.Thread(target=budgets), threading.Thread(target=models)]
    for t in threads:
        t.start()
    time.sleep(random.uniform(1.5, 2.5))
    s.kill()
    stop.set()
    for t in threads:
        t.join(IO_TIMEOUT)
    assert len(sent_budgets) > 5

    con = sqlite3.connect(str(catalog))
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        con.close()
    p = subprocess.run([ebb_bin, "models", "list", "--json", "--catalog", str(catalog)], capture_output=True,
                       timeout=60, env=clean_env())
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    rows = listed
    for row in rows:
        assert re.fullmatch(r"k\d+", row["name"]), row
        assert os.path.samefile(row["path"], model_path)
    # A daemon starts on it, and sees the same models and one of the budgets sent.
    s2 = Server(ebb_bin, catalog)
    try:
        assert requests.get(s2.url("/health"), timeout=IO_TIMEOUT).status_code == 200
        assert memory(s2)[BUDGET] in sent_budgets
        names = [m["name"] for m in requests.get(s2.url("/admin/models"), headers=AUTH,
                                                 timeout=IO_TIMEOUT).json()["data"]]
        assert sorted(names) == sorted(r["name"] for r in rows)
    finally:
        s2.stop_clean()


def test_sigterm_lets_streams_finish_and_ends_long_ones_with_the_reason(ebb_bin, model_path, tmpdir_module):
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "sigterm", "--shutdown-timeout-ms", "6000")
    try:
        short = [Stream(s, "/v1/completions", dict(prompt=f"Fact number {i}:", max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
                 for i in range(2)]
        long = Stream(s, "/v1/completions", dict(prompt="A very long tale:", max_tokens=4000, temperature=0,
                                                 stream=True))
        firsts = {}
        for i, st in enumerate(short + [long]):
            firsts[i] = st.event()
            assert firsts[i] and firsts[i] != "[DONE]"
        s.terminate()
        t0 = time.monotonic()
        # The short streams run to their end.
        for st, first in zip(short, (firsts[0], firsts[1])):
            events = [first] + st.events()
            assert events[-1] == "[DONE]", events[-3:]
            assert json.loads(events[-2])["usage"]["completion_tokens"] == 8
            st.close()
        # The long one is ended at the deadline, not cut: its last chunk says it
        # stopped, an error event says why, then [DONE] and the chunked body's end.
        rest = []
        while (e := long.event()) is not None:
            rest.append(e)
        long.close()
        assert rest[-1] == "[DONE]", rest[-3:]
        err = json.loads(rest[-2])["error"]
        assert "shutting down" in err["message"] and err["type"] == "unavailable_error", err
        last = json.loads(rest[-3])["choices"][0]
        assert last["finish_reason"] is not None, last
        assert s.proc.wait(30) == 0
        assert time.monotonic() - t0 < 6 + 10
    finally:
        s.stop_clean()
    assert 'msg="shutting down" signal=SIGTERM' in s.log()


# ---------------------------------------------------------------- KV cache precision

# The default model's name (server/config.c's default_model), under which the
# daemon registers --default-model-path in a fresh catalog.
DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1"
# Float32 KV bytes per position of the default model, from its shape alone:
# 30 layers, keys and values, 3 KV heads of 64 values, 4 bytes each.
F32_KV_BYTES_PER_POSITION = 30 * 2 * 3 * 64 * 4


def kv_reserved_while_prefilled(s, prompt):
    """The model's KV reservation (bytes) while a stream of `prompt` runs,
    and the prompt's length in tokens. A request reserves its prompt and one
    more position when admitted; the stream is then dropped and the cache
    must go back to empty. Greedy, so that the request cannot have sampled
    an end of text and released its pages before the reading (it did, once
    in a while, when sampled)."""
    n = requests.post(s.url("/tokenize"), json={"prompt": prompt}, timeout=IO_TIMEOUT).json()["count"]
    st = Stream(s, "/v1/completions", dict(prompt=prompt, max_tokens=2000, temperature=0, stream=True))
    try:
        assert st.status == 200
        first = json.loads(st.event())
        assert first["choices"][0]["finish_reason"] is None, first
        reserved = held(memory(s)["models"][0])
        assert reserved > 0
        return reserved, n
    finally:
        st.close()
        wait_kv_empty(s, 15)


def check_kv_precision(s, bits):
    """/admin/memory reports `bits` for the default model, the engine really
    reserves pages of that size, and chat still answers."""
    assert s.model == DEFAULT_MODEL
    models = memory(s)["models"]
    assert [(m["model"], m["kv_bits"]) for m in models] == [(DEFAULT_MODEL, bits)]
    assert f"model={DEFAULT_MODEL} " in s.log() and f"kv_bits={bits}" in s.log()
    # Two prompts past one prefill chunk, each longer than the window (a
    # 301-token prompt, five pages, held one window page fewer), hold the
    # same full-precision window and sinks; they differ by body pages alone.
    # Per float32 page (64 positions of the model's shape) KV8 and KV4 store
    # 8.5 and 4.5 bits a value: 0.27 and 0.14 of it, where half precision
    # is 0.5 -- so each bound below also tells 8 from 4.
    short, n_short = kv_reserved_while_prefilled(s, "The tide came in. " * 100)
    long, n_long = kv_reserved_while_prefilled(s, "The tide came in. " * 300)
    pages = (n_long + 1 + 63) // 64 - (n_short + 1 + 63) // 64
    assert n_short > 448 and pages >= 10, (n_short, n_long)
    per_page = (long - short) / pages / (64 * F32_KV_BYTES_PER_POSITION)
    assert {8: 0.2 < per_page < 0.35, 4: 0.1 < per_page < 0.2}[bits], (bits, per_page)
    doc = chat(s, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
               temperature=0)
    msg = doc["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip(), doc
    assert doc["usage"]["completion_tokens"] >= 1
    return per_page


def test_model_kv_bits_overrides_kv_bits_for_the_named_model(ebb_bin, model_path, tmpdir_module):
    # The per-model entry wins over the global --kv-bits 16; the other entry
    # names a model that is not in the catalog, which is allowed.
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "kvmodel", "--kv-bits", "16",
                           "--model-kv-bits", f"{DEFAULT_MODEL}=4,not-registered=8")
    try:
        check_kv_precision(s, 4)
    finally:
        s.stop_clean()


def test_global_kv_bits_8(ebb_bin, model_path, tmpdir_module):
    s = start_model_server(ebb_bin, tmpdir_module, model_path, "kv8", "--kv-bits", "8",
                           "--model-kv-bits", "some-other-model=4")
    try:
        check_kv_precision(s, 8)
    finally:
        s.stop_clean()


def test_bad_model_kv_bits_refused_at_start(ebb_bin, tmpdir_module):
    r = subprocess.run([ebb_bin, "serve", "--port", "0", "--catalog", str(tmpdir_module / "kvbad.db"),
                        "--model-kv-bits", f"{DEFAULT_MODEL}=5"],
                       cwd=ROOT, capture_output=True, timeout=30, env=clean_env())
    assert r.returncode != 0
    err = r.stderr.decode()
    assert f"--model-kv-bits: '{DEFAULT_MODEL}=5': bits must be one of 32, 16, 8, 4" in err, err


# ---------------------------------------------------------------- the sanitized binary

def test_asan_chat_and_stream(asan_srv):
    s = asan_srv
    doc = chat(s, timeout=300, messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
    assert doc["choices"][0]["message"]["role"] == "assistant" and doc["usage"]["completion_tokens"] >= 1
    st = Stream(s, "/v1/completions", dict(prompt="Hi", max_tokens=2, temperature=0, n=2, stream=True,
                                          stream_options={"include_usage": True}))
    events = st.events()
    st.close()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 4
    assert stream_text(events, 0, chat=False) == stream_text(events, 1, chat=False)   # greedy: both the same


def test_asan_disconnect_mid_stream(asan_srv):
    disconnect_mid_stream(asan_srv, dict(prompt="Hi", max_tokens=200, temperature=0, stream=True),
                          "/v1/completions", timeout=60)


def test_asan_cancel_by_id(asan_srv):
    rid, result = cancel_by_id(asan_srv, "/v1/completions", dict(prompt="Hi", max_tokens=300), stream=False)
    doc = result["resp"].json()
    assert doc["id"] == f"cmpl-{rid}" and doc["choices"][0]["finish_reason"] == "cancelled"
    wait_kv_empty(asan_srv, 60)


def test_asan_bad_inputs(asan_srv):
    picked = {"malformed json", "invalid utf-8", "nul character", "content wrong type", "missing messages",
              "unknown model", "absurd max_tokens", "max_tokens beyond the context", "n = 17",
              "temperature 3", "empty stop string", "unknown field", "token id outside the vocabulary",
              "image content", "detokenize outside the vocabulary"}
    for name, path, body, status, param, needle in BAD:
        if name in picked:
            assert_error(send_bad(asan_srv, path, body), status, param=param, needle=needle)
    r = requests.post(asan_srv.url("/v1/completions"), data=b"z" * 300_000, timeout=IO_TIMEOUT)
    assert r.status_code == 413
    with asan_srv.connect() as sock, sock.makefile("rb") as f:
        sock.sendall(b"\x00\x01garbage\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 400")
    assert complete(asan_srv, timeout=300, prompt="Hi", max_tokens=1)["usage"]["completion_tokens"] == 1
