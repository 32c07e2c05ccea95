"""A real `idlm serve` process for the hostile-input, fuzzing and soak tests, optionally with a
fault injected into its engine, and the checks they share."""

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from helpers import serve_process
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

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.get("/metrics").text) for s in family.samples}

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

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


@contextlib.contextmanager
def running_server(model_dir: Path, log: Path, *extra: str, fault: str | None = None):
    """Yields a Server once it printed `idlm: ready`; stops it afterwards. `fault` is Python run
    first in the server process."""
    launcher = None
    if fault is not None:
        run = "import runpy, sys\nsys.argv = ['idlm', *sys.argv[1:]]\nrunpy.run_module('idlm', run_name='__main__')\n"
        launcher = [sys.executable, "-c", fault + "\n" + run]
    with serve_process(model_dir, log, "--served-model-name", MODEL, *extra, launcher=launcher) as (proc, url):
        yield Server(url, proc, log)


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
