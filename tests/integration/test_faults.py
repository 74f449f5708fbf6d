"""Faults from outside the process, with real processes and real files: a disk
that fills while `ebb pack` writes, a registered model file damaged on disk, a
catalog that another process keeps locked, and SIGKILL while the daemon saves
the memory budget.

Each test states the behaviour an operator can rely on: a clear error naming
the file and the cause, nothing half-written left behind (no partial file, no
catalog row), the daemon going on serving what is intact, and a catalog that
is always one of its committed states. The catalog is inspected with Python's
sqlite3 module, not through ebb.

The disk-full test mounts a small tmpfs (CI runs the tests as root); where
mounting is not permitted it falls back to RLIMIT_FSIZE, which fails the same
write path with EFBIG instead of ENOSPC.
"""
import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

import conftest
from conftest import clean_env

TOKEN = "faults-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IO = 30.0
BUDGET = "memory_budget_bytes"
# storage/catalog.h: CATALOG_BUSY_TIMEOUT_MS. A locked catalog must give up
# after about this long, not hang.
BUSY_S = 10.0


def run(*args, timeout=300, **kw):
    return subprocess.run(list(args), capture_output=True, timeout=timeout, env=clean_env(), **kw)


def no_sanitizer(text):
    assert "Sanitizer" not in text and "runtime error" not in text, text[-5000:]


def rows(catalog, sql):
    db = sqlite3.connect(str(catalog), timeout=30)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return db.execute(sql).fetchall()
    finally:
        db.close()


def start(ebb_bin, catalog, model_path=None, **kw):
    return conftest.Server(ebb_bin, catalog=str(catalog), model_path=model_path, token=TOKEN, io_timeout=IO, **kw)


def admin_models(srv):
    r = requests.get(srv.url("/admin/models"), headers=AUTH, timeout=IO)
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()["data"]}


def complete(srv, model):
    r = requests.post(srv.url("/v1/completions"), json={"model": model, "prompt": "The capital of France is",
                                                        "max_tokens": 2, "temperature": 0}, timeout=IO)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    return r


# ---------------------------------------------------------------- disk full while packing

@pytest.fixture
def small_disk(tmp_path):
    """(directory, expected cause, preexec_fn): a 16 MiB tmpfs, or a 16 MiB file
    size limit where mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode == 0:
        try:
            yield mnt, "No space left on device", None
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        return

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    print(f"mount failed ({r.stderr.decode().strip()}): using RLIMIT_FSIZE", file=sys.stderr)
    yield mnt, "File too large", limit


def test_disk_full_while_packing_leaves_no_file_and_no_row(ebb_bin, model_path, tmp_path, small_disk):
    mnt, cause, preexec = small_disk
    catalog = tmp_path / "catalog.db"
    assert run(ebb_bin, "models", "--catalog", str(catalog), "add", model_path, "--name", "base").returncode == 0
    out = mnt / "packed.gguf"
    # A previous good file at the output path must survive a failed repack.
    out.write_bytes(b"previous packed file")
    # source-exact W4A8 needs no calibration: the quickest pack of the model
    # (about 90 MB, far more than the 16 MiB the disk holds).
    p = subprocess.run([ebb_bin, "pack", "-m", model_path, "--format", "source", "--act-bits", "8", "-o", str(out),
                        "--catalog", str(catalog), "--no-eval", "-q"],
                       capture_output=True, timeout=600, env=clean_env(), preexec_fn=preexec)
    err = p.stderr.decode()
    no_sanitizer(err)
    assert p.returncode == 1, (p.returncode, err)
    # One line naming the file and the cause.
    assert str(out) in err and cause in err, err
    assert len(err.strip().splitlines()) == 1, err
    # Nothing half-written: only the previous file, untouched (no PATH.tmp).
    assert sorted(os.listdir(mnt)) == ["packed.gguf"]
    assert out.read_bytes() == b"previous packed file"
    # No catalog row for a file that was never written.
    assert rows(catalog, "SELECT kind, path FROM variants") == []
    listed = json.loads(run(ebb_bin, "models", "--catalog", str(catalog), "list", "--json").stdout)
    assert [m["variants"] for m in listed] == [[]]


# ---------------------------------------------------------------- a registered file damaged on disk

@pytest.fixture(scope="module")
def packed_file(ebb_bin, model_path, tmp_path_factory):
    """A packed variant of the default model, made once for the module."""
    out = tmp_path_factory.mktemp("packed") / "packed.gguf"
    p = run(ebb_bin, "pack", "-m", model_path, "--format", "source", "--act-bits", "8", "-o", str(out),
            "--no-register", "--no-eval", "-q", timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    return out


def tensor_data_offset(path):
    """Where the tensor data of a GGUF starts, by the gguf package's reader."""
    from gguf import GGUFReader

    return min(int(t.data_offset) for t in GGUFReader(str(path)).tensors)


def flip_byte(path, offset, keep_mtime):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    if keep_mtime:   # bit rot: the same size and modification time
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["bit-rot", "edited", "truncated"])
def test_damaged_registered_file_is_refused_and_the_rest_serves(ebb_bin, model_path, packed_file, tmp_path, damage):
    victim = tmp_path / "packed.gguf"
    victim.write_bytes(packed_file.read_bytes())
    catalog = tmp_path / "catalog.db"
    for path, name in ((model_path, "base"), (victim, "packed")):
        p = run(ebb_bin, "models", "--catalog", str(catalog), "add", str(path), "--name", name)
        assert p.returncode == 0, p.stderr.decode()
    size = victim.stat().st_size
    data = tensor_data_offset(victim)
    if damage == "truncated":
        os.truncate(victim, size - 4096)
    else:   # one bit in the middle of the tensor data: the GGUF stays well-formed
        flip_byte(victim, data + (size - data) // 2, keep_mtime=damage == "bit-rot")

    s = start(ebb_bin, catalog)
    try:
        s.wait_ready()
        deadline = time.monotonic() + 60
        while (state := admin_models(s)["packed"]["state"]) == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        models = admin_models(s)
        assert models["packed"]["state"] == "failed", models["packed"]
        why = models["packed"]["error"]
        assert str(victim) in why, why
        if damage == "bit-rot":
            assert "sha256" in why, why
        elif damage == "edited":
            assert "modified" in why or "sha256" in why, why
        assert models["base"]["state"] == "ready"
        # The log says it too, and the daemon goes on serving the intact model.
        assert s.wait_log('msg="model failed to load" model=packed')
        complete(s, "base")
        r = requests.post(s.url("/v1/completions"), json={"model": "packed", "prompt": "x", "max_tokens": 1},
                          timeout=IO)
        assert r.status_code in (404, 503), r.text
    finally:
        s.stop_clean()


def test_intact_registered_file_loads(ebb_bin, packed_file, tmp_path):
    """The check above refuses damage, not files: the intact copy serves."""
    catalog = tmp_path / "catalog.db"
    assert run(ebb_bin, "models", "--catalog", str(catalog), "add", str(packed_file), "--name", "packed").returncode == 0
    s = start(ebb_bin, catalog)
    try:
        s.wait_ready()
        complete(s, "packed")
    finally:
        s.stop_clean()


# ---------------------------------------------------------------- a catalog locked by another process

HOLDER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
if sys.argv[2] == "database":
    # The whole database: readers are shut out too.
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT INTO settings (key, value, updated_at) VALUES ('held', 'yes', 0) "
           "ON CONFLICT(key) DO UPDATE SET value = 'again'")
print("locked", flush=True)
sys.stdin.read()   # until the test closes stdin
db.execute("ROLLBACK")
"""


class Holder:
    """Another process holding the catalog's lock until released."""

    def __init__(self, catalog, what):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(catalog), what], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout.readline() == b"locked\n"

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture
def registered(ebb_bin, model_path, tmp_path):
    catalog = tmp_path / "catalog.db"
    assert run(ebb_bin, "models", "--catalog", str(catalog), "add", model_path, "--name", "base").returncode == 0
    return catalog


def timed(*args):
    t0 = time.monotonic()
    p = run(*args, timeout=120)
    return p, time.monotonic() - t0


def test_locked_catalog_cli_fails_clearly_after_the_busy_timeout(ebb_bin, model_path, registered):
    h = Holder(registered, "writes")
    try:
        # Readers are not blocked by a writer (WAL).
        p, took = timed(ebb_bin, "models", "--catalog", str(registered), "list")
        assert p.returncode == 0 and b"base" in p.stdout and took < BUSY_S / 2, (p, took)
        p, took = timed(ebb_bin, "models", "--catalog", str(registered), "add", model_path, "--name", "second")
    finally:
        h.release()
    err = p.stderr.decode()
    no_sanitizer(err)
    assert p.returncode == 1, err
    assert BUSY_S * 0.9 < took < BUSY_S * 3, took
    assert str(registered) in err and "locked" in err and "another process" in err, err
    # Nothing was added, and with the lock gone the same command works.
    assert [r[0] for r in rows(registered, "SELECT name FROM models")] == ["base"]
    p = run(ebb_bin, "models", "--catalog", str(registered), "add", model_path, "--name", "second")
    assert p.returncode == 0, p.stderr.decode()


def test_catalog_locked_whole_refuses_start_clearly(ebb_bin, registered):
    h = Holder(registered, "database")
    try:
        p, took = timed(ebb_bin, "models", "--catalog", str(registered), "list")
        assert p.returncode == 1 and took < BUSY_S * 3, (p, took)
        assert "locked" in p.stderr.decode() and str(registered) in p.stderr.decode(), p.stderr
        t0 = time.monotonic()
        d = subprocess.Popen([ebb_bin, "serve", "--port", "0", "--default-model-path", ""], stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, env=clean_env(EBB_CATALOG=str(registered)))
        try:
            _, err = d.communicate(timeout=BUSY_S * 3)
        except subprocess.TimeoutExpired:
            d.kill()
            raise AssertionError("ebb serve hung on a locked catalog")
        took = time.monotonic() - t0
    finally:
        h.release()
    err = err.decode()
    no_sanitizer(err)
    assert d.returncode == 1 and took < BUSY_S * 3, (d.returncode, took, err)
    assert "ebb serve:" in err and str(registered) in err and "locked" in err, err


def test_locked_catalog_fails_admin_writes_and_the_daemon_keeps_serving(ebb_bin, registered):
    s = start(ebb_bin, registered)
    h = None
    try:
        s.wait_ready()
        r = requests.put(s.url("/admin/memory"), json={BUDGET: 3 << 30}, headers=AUTH, timeout=IO)
        assert r.status_code == 200, r.text
        h = Holder(registered, "writes")
        put = {}

        def put_budget():
            t0 = time.monotonic()
            put["r"] = requests.put(s.url("/admin/memory"), json={BUDGET: 4 << 30}, headers=AUTH, timeout=IO * 2)
            put["took"] = time.monotonic() - t0

        t = threading.Thread(target=put_budget)
        t.start()
        time.sleep(0.5)   # the write is now waiting for the lock
        # Meanwhile everything else answers at once: reads of the catalog, the
        # budget, health, and completions.
        worst = 0.0
        while t.is_alive():
            t0 = time.monotonic()
            assert "base" in admin_models(s)
            assert requests.get(s.url("/health"), timeout=IO).status_code == 200
            worst = max(worst, time.monotonic() - t0)
            complete(s, "base")
            time.sleep(0.2)
        t.join()
        assert worst < 2.0, f"a request waited {worst:.1f} s behind the locked catalog"
        r = put["r"]
        assert r.status_code == 500, r.text
        assert BUSY_S * 0.9 < put["took"] < BUSY_S * 3, put["took"]
        msg = r.json()["error"]["message"]
        assert "locked" in msg and "another process" in msg, msg
        # A refused change is not applied: the budget is the one saved.
        r = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO)
        assert r.json()[BUDGET] == 3 << 30, r.json()
        h.release()
        r = requests.put(s.url("/admin/memory"), json={BUDGET: 5 << 30}, headers=AUTH, timeout=IO)
        assert r.status_code == 200, r.text
    finally:
        if h:
            h.release()
        s.stop_clean()
    assert rows(registered, "SELECT value FROM settings WHERE key = 'memory_budget_bytes'") == [(str(5 << 30),)]


# ---------------------------------------------------------------- SIGKILL while saving the budget

def test_sigkill_during_budget_writes_keeps_old_or_new(ebb_bin, tmp_path):
    """Twenty daemons killed with SIGKILL at random moments around a PUT
    /admin/memory: after each, the saved budget is the last acknowledged value
    or the one in flight, and the catalog is intact."""
    catalog = tmp_path / "catalog.db"
    rng = random.Random(11)
    acked, inflight = 0, None
    outcomes = {"old": 0, "new": 0}
    for i in range(20):
        s = start(ebb_bin, catalog)   # no model: starts in milliseconds
        try:
            got = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO).json()[BUDGET]
            assert got in (acked, inflight), (i, got, acked, inflight)
            if inflight is not None:
                outcomes["new" if got == inflight else "old"] += 1
            acked, inflight = got, (i + 1) * 1_000_000_007
            res = {}

            def put():
                try:
                    res["r"] = requests.put(s.url("/admin/memory"), json={BUDGET: inflight}, headers=AUTH,
                                            timeout=IO)
                except requests.RequestException as e:
                    res["e"] = e

            t = threading.Thread(target=put)
            t.start()
            time.sleep(rng.uniform(0, 0.008))
            os.kill(s.proc.pid, signal.SIGKILL)
            t.join(IO)
            s.kill()
            if "r" in res and res["r"].status_code == 200:
                acked = inflight   # acknowledged: it must survive
        finally:
            s.kill()
        stored = rows(catalog, "SELECT value FROM settings WHERE key = 'memory_budget_bytes'")
        assert stored in ([], [(str(acked),)], [(str(inflight),)]), (i, stored, acked, inflight)
    s = start(ebb_bin, catalog)
    try:
        got = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO).json()[BUDGET]
        assert got in (acked, inflight)
    finally:
        s.stop_clean()
    print(f"kills: the budget was the old value after {outcomes['old']}, the new after {outcomes['new']}",
          file=sys.stderr)


# ---------------------------------------------------------------- a device that is not there

def cuda_device_count(ebb_bin):
    p = run(ebb_bin, "devices", "--json")
    return len(json.loads(p.stdout)["cuda"]["devices"]) if p.returncode == 0 else 0


def test_model_on_a_missing_gpu_is_refused_with_the_reason(ebb_bin, model_path, tmp_path):
    """`--device cuda:N` where there is no such GPU (no driver, a CPU-only
    build, an index past the last device): the model fails to load with the
    device's own reason, and the daemon stays up and says so."""
    index = cuda_device_count(ebb_bin)   # one past the last: never a device
    catalog = tmp_path / "catalog.db"
    s = conftest.Server(ebb_bin, "--device", f"cuda:{index}", catalog=str(catalog), model_path=str(model_path),
                        token=TOKEN, io_timeout=IO, start_timeout=120)
    try:
        deadline = time.monotonic() + 60
        name = "SmolLM2-135M-Instruct.Q4_1"
        while (state := admin_models(s)[name]["state"]) == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        m = admin_models(s)[name]
        assert m["state"] == "failed", m
        assert m["error"].startswith(f"device cuda:{index}: "), m["error"]
        assert "CUDA" in m["error"] or "device" in m["error"].split(": ", 1)[1], m["error"]
        assert s.wait_log(f'msg="model failed to load" model={name}')
        assert requests.get(s.url("/health"), timeout=IO).status_code == 200
        r = requests.post(s.url("/v1/completions"), json={"model": name, "prompt": "x", "max_tokens": 1}, timeout=IO)
        assert r.status_code in (404, 503), r.text
        # /admin/memory names the device and why it has nothing there
        mem = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO).json()
        assert mem["device"]["device"] == f"cuda:{index}", mem
        assert mem["device"]["weight_bytes"] == 0 and mem["device"]["unavailable"], mem
    finally:
        s.stop_clean()


def test_malformed_device_is_refused_at_start(ebb_bin):
    p = run(ebb_bin, "serve", "--device", "gpu0")
    assert p.returncode == 2, p.stderr.decode()
    assert "'gpu0' is not a valid value: a device is cpu, cuda or cuda:N" in p.stderr.decode()


def test_auto_budget_on_a_missing_gpu_says_why(ebb_bin, tmp_path):
    """With models on a GPU the automatic budget follows the GPU's free memory;
    where it cannot be read the change is refused with the reason and nothing moves."""
    index = cuda_device_count(ebb_bin)
    s = conftest.Server(ebb_bin, "--device", f"cuda:{index}", catalog=str(tmp_path / "catalog.db"), token=TOKEN,
                        io_timeout=IO)
    try:
        before = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO).json()
        r = requests.put(s.url("/admin/memory"), headers=AUTH, json={"budget": "auto", "reserve_bytes": 0}, timeout=IO)
        assert r.status_code >= 400, r.text
        assert f"cannot read cuda:{index}'s free memory" in r.text, r.text
        after = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO).json()
        assert after["mode"] == before["mode"] and after["memory_budget_bytes"] == before["memory_budget_bytes"]
    finally:
        s.stop_clean()
