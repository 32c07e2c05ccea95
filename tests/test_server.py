"""`idlm serve` as a real process on 127.0.0.1, driven by the official openai client and httpx:
streaming, concurrency, bad input, metrics, disconnects, the queue bound, the playground in
headless Chromium, and shutdown. One server process is shared by the module; the last test stops it."""

import asyncio
import base64
import json
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import WORDS, make_model
from server_helpers import MODEL, running_server

from idlm import SamplingParams

MAX_NUM_SEQS = 8
MAX_QUEUE = 32
CHROMIUM = "/usr/bin/chromium"


def make_isd_model(folder: Path) -> Path:
    """The tiny sdar model with embeddings pulled together, so MASK rows guess well enough that
    drafts are accepted often but not always: every token source shows up."""
    model = make_model(folder, "sdar")
    config = (folder / "config.json").read_text()  # save_pretrained would drop the sdar keys
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(emb[0:1] + 0.25 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(config)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_isd_model(tmp_path_factory.mktemp("isd"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(model_dir, log, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE)) as s:
        yield s


def prompts(n: int, seed: int, lo: int = 2, hi: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_openai_client_completions_stream_equals_whole(client):
    args = dict(model=MODEL, prompt="the cat sat on the", max_tokens=24, temperature=0.9, top_p=0.95, seed=5)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens == 5 and whole.usage.total_tokens == 5 + whole.usage.completion_tokens
    assert whole.usage.forwards >= 1 and whole.usage.tokens_per_forward >= 1.0
    assert whole.usage.tokens_per_forward == pytest.approx(whole.usage.completion_tokens / whole.usage.forwards)
    assert isinstance(whole.usage.accepted_drafts, int) and len(whole.usage.draft_acceptance) == 3
    other_seed = client.completions.create(**{**args, "seed": 6})
    assert other_seed.choices[0].text != whole.choices[0].text


def test_openai_client_chat_stream_equals_whole(client):
    args = dict(model=MODEL, messages=[{"role": "system", "content": "you are a cat"},
                                       {"role": "user", "content": "hello what is the sun"}],
                max_completion_tokens=20, temperature=0.7, seed=11)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_extra_fields_and_stop_strings(client, offline):
    prompt = "one two three"
    isd = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                    extra_body={"ignore_eos": True, "stride_policy": "fixed"})
    ar = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                   extra_body={"ignore_eos": True, "mode": "ar"})
    assert isd.choices[0].text == ar.choices[0].text == offline.generate(prompt, greedy(30))[0].text
    assert ar.usage.forwards == 30 and ar.usage.accepted_drafts == 0
    assert isd.usage.forwards < 30 and isd.usage.accepted_drafts > 0  # ISD: several tokens per forward
    stride2 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                        extra_body={"ignore_eos": True, "stride": 2, "proposal": "argmax_exact",
                                                    "stride_policy": "fixed", "branches": 0})
    assert stride2.choices[0].text == ar.choices[0].text and len(stride2.usage.draft_acceptance) == 1
    words = ar.choices[0].text.split()
    stop = words[len(words) // 2]
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                        stream=stream, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == ar.choices[0].text[:ar.choices[0].text.index(stop)]


def test_32_concurrent_streams_equal_offline_greedy(server, offline):
    texts = prompts(32, seed=1)
    expected = [o.text for o in offline.generate(texts, greedy(24))]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        parts, reasons = [], []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), reasons[-1]

    async def burst():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in texts))

    results = asyncio.run(burst())
    assert [text for text, _ in results] == expected
    assert all(reason == "length" for _, reason in results)


BAD_REQUESTS = [
    # (id, route, body: dict or raw bytes, status, param)
    ("malformed-json", "completions", b'{"model": "tiny-idlm", "prompt": ', 400, None),
    ("not-an-object", "completions", b"[1, 2, 3]", 400, None),
    ("temperature-wrong-type", "completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("max-tokens-wrong-type", "chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, 400,
     "max_tokens"),
    ("messages-wrong-type", "chat", {"messages": "hello"}, 400, "messages"),
    ("message-role-unknown", "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("missing-prompt", "completions", {"max_tokens": 4}, 400, "prompt"),
    ("missing-messages", "chat", {"max_tokens": 4}, 400, "messages"),
    ("empty-messages", "chat", {"messages": []}, 400, "messages"),
    ("model-wrong-type", "completions", {"prompt": "hi", "model": 5}, 400, "model"),  # leaving it out is fine
    ("max-tokens-zero", "completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-beyond-context", "completions", {"prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens"),
    ("max-completion-tokens-beyond-context", "chat",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 600}, 400, "max_tokens"),
    ("temperature-negative", "completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top-p-zero", "completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", "chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("unknown-model", "completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("unknown-model-chat", "chat", {"messages": [{"role": "user", "content": "hi"}], "model": "x"}, 404, "model"),
    ("unknown-mode", "completions", {"prompt": "hi", "mode": "turbo"}, 400, "mode"),
    ("unknown-stride", "completions", {"prompt": "hi", "stride": 99}, 400, "stride"),
    ("unknown-proposal", "chat", {"messages": [{"role": "user", "content": "hi"}], "proposal": "magic"}, 400,
     "proposal"),
    ("prompt-longer-than-context", "completions", {"prompt": "the " * 600}, 400, "prompt"),
    ("chat-longer-than-context", "chat", {"messages": [{"role": "user", "content": "cat " * 600}]}, 400, "messages"),
    ("prompt-token-out-of-vocab", "completions", {"prompt": [5, 100_000]}, 400, "prompt"),
    ("empty-prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("several-prompts", "completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("n-above-limit", "chat", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ("logprobs-above-limit", "completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("unknown-field", "completions", {"prompt": "hi", "temprature": 0.5}, 400, "temprature"),
    ("bad-stream-request", "chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                    "temperature": -1}, 400, "temperature"),
    ("body-over-limit", "completions", {"prompt": "x" * (4 << 20)}, 413, None),
]


@pytest.mark.parametrize("route,body,status,param", [row[1:] for row in BAD_REQUESTS],
                         ids=[row[0] for row in BAD_REQUESTS])
def test_bad_request_gets_openai_error(server, route, body, status, param):
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[route]
    before = server.metric("idlm_requests_total", status=str(status))
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = server.raw(path, json.dumps({k: v for k, v in {"model": MODEL, **body}.items() if v is not None}).encode())
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    assert server.metric("idlm_requests_total", status=str(status)) == before + 1
    assert server.get("/health").json() == {"status": "ok"}
    ok = server.post("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_route_and_method_get_openai_errors(server):
    r = server.get("/v1/nothing")
    assert r.status_code == 404 and "no route GET /v1/nothing" in r.json()["error"]["message"]
    r = server.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_health_models_openapi_and_page(server):
    assert server.get("/health").json() == {"status": "ok"}
    card = server.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 512
    schema = server.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert "idlm_provenance" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "idlm playground" in page.text and "/v1/chat/completions" in page.text


def test_metrics_parse_and_count(server):
    before = server.metrics()
    out = server.post("/v1/completions", {"model": MODEL, "prompt": "the dog ran", "max_tokens": 20,
                                          "temperature": 0, "ignore_eos": True}).json()
    after = server.metrics()
    names = {name for name, _ in after}
    assert {"idlm_requests_total", "idlm_prompt_tokens_total", "idlm_generation_tokens_total",
            "idlm_tokens_per_forward", "idlm_request_tokens_per_forward_count", "idlm_drafts_reached_total",
            "idlm_drafts_accepted_total", "idlm_draft_acceptance", "idlm_queue_depth", "idlm_running_requests",
            "idlm_kv_blocks_used", "idlm_kv_blocks_free", "idlm_kv_blocks_total", "idlm_step_seconds_bucket",
            "idlm_step_seconds_count", "idlm_engine_forwards_total"} <= names

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("idlm_requests_total", status="ok") == 1
    assert delta("idlm_prompt_tokens_total") == out["usage"]["prompt_tokens"] == 3
    assert delta("idlm_generation_tokens_total") == 20
    assert delta("idlm_engine_forwards_total") == out["usage"]["forwards"]
    assert delta("idlm_step_seconds_count") == out["usage"]["forwards"]
    assert 1.0 <= after[("idlm_tokens_per_forward", ())] <= 4.0
    acceptance = [after[("idlm_draft_acceptance", (("position", str(j)),))] for j in (1, 2, 3)]
    assert all(0.0 <= a <= 1.0 for a in acceptance) and acceptance[0] > 0
    reached = after[("idlm_drafts_reached_total", (("position", "1"),))]
    accepted = after[("idlm_drafts_accepted_total", (("position", "1"),))]
    assert accepted / reached == pytest.approx(acceptance[0])
    assert after[("idlm_kv_blocks_used", ())] == 0
    assert after[("idlm_kv_blocks_free", ())] == after[("idlm_kv_blocks_total", ())] == 4096 // 16
    assert after[("idlm_running_requests", ())] == after[("idlm_queue_depth", ())] == 0


def test_disconnect_mid_stream_frees_kv(server):
    total = server.metric("idlm_kv_blocks_total")
    assert server.metric("idlm_kv_blocks_free") == total
    aborted = server.metric("idlm_requests_total", status="aborted")
    tokens_before = server.metric("idlm_generation_tokens_total")
    # ar: 500 forwards, far more than the few it takes to read 3 events and the metrics
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 500, "mode": "ar", "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held, so that leaving the loop does not close the stream yet
        events = 0
        for line in lines:
            events += line.startswith("data: ")
            if events == 3:
                break
        assert server.metric("idlm_running_requests") == 1
        assert server.metric("idlm_kv_blocks_used") > 0
    deadline = time.monotonic() + 5
    while server.metric("idlm_kv_blocks_free") != total:
        assert time.monotonic() < deadline, "KV blocks not freed 5 s after the client left"
        time.sleep(0.02)
    assert server.metric("idlm_requests_total", status="aborted") == aborted + 1
    assert server.metric("idlm_running_requests") == 0
    generated = server.metric("idlm_generation_tokens_total") - tokens_before
    assert generated < 500
    time.sleep(0.2)
    assert server.metric("idlm_generation_tokens_total") - tokens_before == generated  # nothing runs for it


def test_non_streaming_client_that_leaves_is_aborted(server):
    total = server.metric("idlm_kv_blocks_total")
    aborted = server.metric("idlm_requests_total", status="aborted")
    body = {"model": MODEL, "prompt": "the dog", "max_tokens": 500, "mode": "ar", "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.15))
    deadline = time.monotonic() + 5
    while server.metric("idlm_requests_total", status="aborted") != aborted + 1:
        assert time.monotonic() < deadline, "the request of a client that left was not aborted"
        time.sleep(0.02)
    assert server.metric("idlm_kv_blocks_free") == total


def test_queue_bound_answers_429_and_loses_nothing(server, offline):
    texts = prompts(64, seed=2)
    expected = [o.text for o in offline.generate(texts, greedy(96))]
    rejected_before = server.metric("idlm_requests_total", status="429")
    ok_before = server.metric("idlm_requests_total", status="ok")

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={
                "model": MODEL, "prompt": p, "max_tokens": 96, "temperature": 0, "ignore_eos": True})
                for p in texts))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}, statuses
    accepted = [i for i, s in enumerate(statuses) if s == 200]
    assert len(accepted) >= MAX_NUM_SEQS + MAX_QUEUE
    for i, r in enumerate(responses):
        if statuses[i] == 429:
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["text"] == expected[i]
    assert server.metric("idlm_requests_total", status="429") - rejected_before == statuses.count(429)
    assert server.metric("idlm_requests_total", status="ok") - ok_before == len(accepted)
    assert server.get("/health").status_code == 200


def test_engine_not_ready_answers_503(model_dir):
    """In process: before the engine loop starts, after a failed step, and after shutdown."""
    from idlm.config import EngineConfig
    from idlm.engine.llm_engine import LLMEngine
    from idlm.server.app import create_app
    from idlm.server.async_engine import AsyncEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), progress=False, kv_cache_tokens=1024))
    app = create_app(AsyncEngine(engine, max_queue=2), MODEL)
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 4}

    def broken_step():
        raise RuntimeError("device lost")

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://idlm") as http:
            async def not_ready(reason: str):
                for r in (await http.post("/v1/completions", json=body), await http.get("/health")):
                    assert r.status_code == 503
                    error = r.json()["error"]
                    assert error["code"] == "engine_not_ready" and error["type"] == "server_error"
                    assert reason in error["message"]

            await not_ready("not running yet")
            async with app.router.lifespan_context(app):
                assert (await http.post("/v1/completions", json=body)).status_code == 200
                engine.step = broken_step
                await not_ready("device lost")
            await not_ready("device lost")

    asyncio.run(scenario())


def test_serve_cli_errors(server, model_dir, capsys):
    from idlm.cli import build_parser, main

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "--max-queue" in capsys.readouterr().out
    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", str(model_dir), "--port", port, "--kv-cache-tokens", "1024"]) == 1
    assert f"idlm: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--stride", "40"]) == 1
    assert "stride must be an integer from 2 to 16" in capsys.readouterr().err


class Chromium:
    """Headless Debian Chromium driven over the DevTools protocol (a context manager)."""

    def __init__(self, profile: Path):
        self.profile = profile
        self.next_id = 0

    def __enter__(self) -> "Chromium":
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             "--window-size=1100,760", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = self.profile / "DevToolsActivePort"  # chromium writes the port it took
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
                assert self.proc.poll() is None, "chromium exited at start"
                assert time.monotonic() < deadline, "chromium did not open its DevTools port"
                time.sleep(0.05)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            self.ws = connect(page["webSocketDebuggerUrl"], max_size=None).__enter__()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.ws.__exit__(*exc)
        self._stop()

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not self.eval(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)


def test_playground_in_headless_chromium(server, client, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: `bash scripts/setup.sh --test` installs Debian chromium when run as "
                    f"root; without apt access the playground cannot be checked in a browser")
    message = "hello what is the moon"
    deadline = time.monotonic() + 30  # earlier tests' streams must be gone, or the page could meet a 429
    while server.metric("idlm_running_requests") + server.metric("idlm_queue_depth") > 0:
        assert time.monotonic() < deadline, "the server did not go idle"
        time.sleep(0.05)
    expected = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": message}],
                                              max_tokens=24, temperature=0)
    with Chromium(tmp_path / "profile") as browser:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for(f"document.body?.dataset.model === {json.dumps(MODEL)}")  # body is null until parsed
        browser.eval(f"""document.getElementById('max-tokens').value = '24';
                         document.getElementById('input').value = {json.dumps(message)};
                         document.getElementById('send').click();""")
        browser.wait_for("document.body?.dataset.state === 'done'")
        page = browser.eval("""(() => {
            const spans = [...document.querySelectorAll('.msg.assistant .tok')];
            return {text: spans.map(s => s.textContent).join(''),
                    sources: spans.map(s => s.className),
                    colours: [...new Set(spans.map(s => getComputedStyle(s).backgroundColor))],
                    errors: document.querySelectorAll('.msg.error').length,
                    stats: document.getElementById('stats').textContent};
        })()""")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "playground.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    assert page["errors"] == 0, page
    assert page["text"] == expected.choices[0].message.content, page  # the coloured tokens spell the answer
    assert page["sources"] and set(page["sources"]) <= {"tok src-0", "tok src-1", "tok src-2"}
    assert len(page["colours"]) == len(set(page["sources"])) and "rgba(0, 0, 0, 0)" not in page["colours"]
    tokens = expected.usage.completion_tokens
    assert re.match(rf"TPF \d+\.\d\d · forwards \d+ · tokens {tokens} ", page["stats"]), page["stats"]


# Holds the chat stream after its first chunk with tokens until the page aborts it, so that Stop
# lands mid-answer whatever the model's speed, and records the request bodies.
SLOW_STREAM = """
window.sent = [];
const realFetch = window.fetch;
window.fetch = async (url, options = {}) => {
  const response = await realFetch(url, options);
  if (!String(url).includes("/chat/completions")) return response;
  window.sent.push(JSON.parse(options.body));
  const reader = response.body.getReader();
  let tokensSent = false;
  const held = new ReadableStream({async pull(c) {
    if (tokensSent) {
      await new Promise((_, fail) => options.signal.addEventListener("abort",
        () => fail(new DOMException("stopped", "AbortError"))));
    }
    const {done, value} = await reader.read();
    if (done) { c.close(); return; }
    tokensSent = new TextDecoder().decode(value).includes('"sources"');
    c.enqueue(value);
  }});
  window.held = true;
  return new Response(held, {status: response.status, headers: response.headers});
};
"""


def test_playground_stop_keeps_the_answer_system_prompt_and_new_chat(server, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing")
    with Chromium(tmp_path / "profile") as browser:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for(f"document.body?.dataset.model === {json.dumps(MODEL)}")
        browser.eval(SLOW_STREAM)
        browser.eval("""document.getElementById('system').value = 'you are a cat';
                        document.getElementById('input').value = 'hello world';
                        document.getElementById('send').click();""")
        browser.wait_for("window.held && document.querySelectorAll('.msg.assistant .tok').length > 0")
        browser.eval("document.getElementById('stop').click()")
        browser.wait_for("document.body?.dataset.state === 'done'")
        page = browser.eval("""(() => ({
            sent: window.sent[0], history: history.map(m => m.role),
            answer: history.length > 1 ? history[1].content : null,
            shown: document.querySelector('.msg.assistant')?.textContent,
            stopped: document.querySelectorAll('.msg.assistant.stopped').length,
            errors: document.querySelectorAll('.msg.error').length}))()""")
        assert page["sent"]["messages"] == [{"role": "system", "content": "you are a cat"},
                                            {"role": "user", "content": "hello world"}], page
        assert "temperature" not in page["sent"]  # left to the model's generation config
        assert page["history"] == ["user", "assistant"] and page["answer"], page
        assert page["shown"] and page["stopped"] == 1 and page["errors"] == 0, page
        browser.eval("document.getElementById('new-chat').click()")
        assert browser.eval("history.length + document.querySelectorAll('#messages .msg').length") == 0


# a request must outlive the shutdown timeout on any machine: the tiny model decodes about a
# thousand tokens a second on a fast CPU, so it gets a context of thousands
LONG_CONTEXT = 4096


@pytest.fixture()
def long_context_server(tmp_path):
    make_model(tmp_path / "model", "sdar", max_position_embeddings=LONG_CONTEXT)
    with running_server(tmp_path / "model", tmp_path / "serve.log", "--max-num-seqs", "2",
                        "--kv-cache-tokens", str(2 * LONG_CONTEXT)) as s:
        yield s


def test_sigterm_stops_the_server_cleanly(long_context_server):
    """The running stream ends with an error chunk and [DONE] after --shutdown-timeout and the
    process exits 0."""
    server = long_context_server
    first_chunk = threading.Event()
    lines = []

    def stream():
        body = {"model": MODEL, "prompt": "one two", "max_tokens": LONG_CONTEXT - 16, "ignore_eos": True,
                "stream": True, "mode": "ar"}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                first_chunk.set()
                if line:
                    lines.append(line)
        first_chunk.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_chunk.wait(30)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    reader.join(10)
    assert not reader.is_alive()
    assert time.monotonic() - start < 10
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == "engine_not_ready" and "shutdown timeout" in error["message"]
    log = server.log.read_text()
    assert "idlm: server stopped" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        server.get("/health")
