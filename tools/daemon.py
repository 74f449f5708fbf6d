"""One `ebb serve` process on a free port, with its log captured: the harness the
integration suites (tests/conftest.py) and tools/agreement.py share.

The daemon picks its own port (--port 0) and logs it with msg="listening"; this reads the
log on a thread, so tests can also wait for any other line and check the whole log after a
clean stop (exit status 0, no sanitizer report, every loaded model unloaded).
"""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

import requests

ROOT = pathlib.Path(__file__).resolve().parent.parent


def clean_env(**extra):
    """The environment minus EBB_* settings the caller may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBB_")}
    env.update(extra)
    return env


class Server:
    """One `ebb serve` on a free port of `host`, with its log captured.

    catalog: the catalog file (default: a private, empty one, for servers that need no
    model); model_path: the default model ("" for none); token: the admin token, if any;
    env: more environment (EBB_* from the caller's environment is dropped first)."""

    def __init__(self, binary, *args, host="127.0.0.1", catalog=None, model_path=None, token=None, env=None,
                 start_timeout=60, io_timeout=30.0):
        self.host = host
        self.token = token
        self.io_timeout = io_timeout
        self.tmp = None
        if catalog is None:
            self.tmp = tempfile.TemporaryDirectory()
            catalog = os.path.join(self.tmp.name, "catalog.db")
        self.catalog = catalog
        extra = {"EBB_CATALOG": str(catalog)}
        if token:
            extra["EBB_ADMIN_TOKEN"] = token
        extra.update(env or {})
        self.proc = subprocess.Popen(
            [binary, "serve", "--host", host, "--port", "0", "--default-model-path", model_path or "", *args],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(**extra))
        self.lines = []
        self.port = None
        self.terminated = None
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        # On a first start the default model is registered (validated and
        # hashed) before the daemon logs "listening": slow in a sanitized build.
        if not self.listening.wait(start_timeout):
            self.proc.kill()
            raise AssertionError("server did not log 'listening':\n" + self.log())
        self.base = self.url("")

    def _read_log(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            m = re.search(r'msg="listening" .*\bport=(\d+)', line)
            if m:
                self.port = int(m.group(1))
                self.listening.set()

    def log(self):
        return "".join(self.lines)

    def url(self, path):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def connect(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(self.io_timeout)
        s.connect((self.host, self.port))
        return s

    def wait_log(self, needle, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return True
            time.sleep(0.02)
        return False

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited:\n" + self.log()
            if requests.get(self.url("/ready"), timeout=self.io_timeout).status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError("server never became ready:\n" + self.log())

    def wait_model(self, name, timeout=120):
        """Waits until the named model is being served (GET /admin/models; needs the admin
        token): /ready says only that some model is, and a catalog's other models may load
        first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = requests.get(self.url("/admin/models"), timeout=self.io_timeout,
                             headers={"Authorization": f"Bearer {self.token}"})
            r.raise_for_status()
            state = {m["name"]: m.get("state") for m in r.json()["data"]}.get(name)
            assert state in ("loading", "ready", "not_loaded"), f"model {name}: {state}\n" + self.log()
            if state == "ready":
                return
            time.sleep(0.05)
        raise AssertionError(f"model {name} never became ready:\n" + self.log())

    def terminate(self):
        """Sends SIGTERM once (a second one would mean "hurry": not what tests want)."""
        if not self.terminated:
            self.terminated = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout=30):
        """SIGTERM (once) and wait; returns (exit status, seconds since SIGTERM)."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"server did not exit within {timeout}s of SIGTERM:\n{self.log()}")
        self.reader.join(10)
        return self.proc.returncode, time.monotonic() - (self.terminated or time.monotonic())

    def stop_clean(self, timeout=30):
        rc, elapsed = self.stop(timeout)
        log = self.log()
        assert rc == 0, f"exit status {rc}:\n{log[-5000:]}"
        assert "Sanitizer" not in log and "runtime error" not in log, log[-20000:]
        # Every model that started loading was torn down before the exit:
        # its requests all reported back and its engine thread was joined.
        assert log.count('msg="loading model"') == log.count('msg="model unloaded"'), log[-5000:]
        assert 'msg="stopped"' in log, log[-5000:]
        return elapsed

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.reader.join(10)


def start_ready(binary, *args, ready_timeout=120, **kwargs):
    """A Server that is ready to serve; one that never gets ready is killed (its log is in
    the error), so that a failed fixture leaves no daemon behind."""
    s = Server(binary, *args, **kwargs)
    try:
        s.wait_ready(ready_timeout)
    except BaseException:
        s.kill()
        raise
    return s


def stream_events(resp):
    """The JSON documents of a server-sent event stream, until [DONE]."""
    for line in resp.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        yield json.loads(line[6:])
