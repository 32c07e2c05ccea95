"""A real `idlm serve` process for the hostile-input, fuzzing and soak tests, optionally with a
fault injected into its engine, and the checks they share."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "tiny-idlm"
ERROR_KEYS = {"message", "type", "param", "code"}
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, body: dict, timeout: float = 60) -> httpx.Response:
        return self.raw(path, json.dumps({"model": MODEL, **body}).encode(), timeout)

    def raw(self, path: str, content: bytes, timeout: float = 60) -> httpx.Response:
        return httpx.post(self.url + path, content=content, headers={"Content-Type": "application/json"},
                          timeout=timeout)

    def metric(self, name: str, **labels) -> float:
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return 0.0

    def assert_healthy(self) -> None:
        """/health answers ok, an ordinary request is answered, and every KV block is free again."""
        assert self.get("/health").json() == {"status": "ok"}
        ok = self.post("/v1/completions", {"prompt": "hello world", "max_tokens": 3, "temperature": 0}, timeout=20)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
        deadline = time.monotonic() + 5
        while self.metric("idlm_kv_blocks_free") != self.metric("idlm_kv_blocks_total"):
            assert time.monotonic() < deadline, "KV blocks still held by a finished request"
            time.sleep(0.02)


def serve_command(model_dir: Path, *extra: str, fault: str | None = None) -> list[str]:
    """`idlm serve` on a free loopback port; `fault` is Python run first in the server process."""
    args = ["serve", str(model_dir), "--port", "0", "--device", "cpu", "--kv-cache-tokens", "4096",
            "--served-model-name", MODEL, *extra]
    if fault is None:
        return [sys.executable, "-m", "idlm", *args]
    run = f"import runpy, sys\nsys.argv = {['idlm', *args]!r}\nrunpy.run_module('idlm', run_name='__main__')\n"
    return [sys.executable, "-c", fault + "\n" + run]


@contextlib.contextmanager
def running_server(model_dir: Path, log: Path, *extra: str, fault: str | None = None):
    """Yields a Server once it printed `idlm: ready`; stops it (SIGTERM, then SIGKILL) afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(model_dir, *extra, fault=fault), stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 90
        while "idlm: ready" not in log.read_text():
            assert proc.poll() is None, f"idlm serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"idlm serve not ready after 90 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield Server(re.search(r"at (http://127\.0\.0\.1:\d+) ", log.read_text()).group(1), proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and len(error["message"]) > 10, error
    assert error["type"] == ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                             else "invalid_request_error"), error
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_events(text: str) -> list[dict | str]:
    """The data of each server-sent event: parsed JSON, or the final "[DONE]"."""
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]
