"""A real `idlm serve` under load: a short soak of mixed requests with disconnects (nothing lost,
KV back to idle, seeded answers identical), then SIGTERM while it is busy (every client gets a
complete answer or a well-formed error, and the process exits 0 without a traceback)."""

import asyncio
import random
import signal
import time

import httpx
import pytest
from helpers import WORDS, make_model
from server_helpers import MODEL, ROUTES, assert_openai_error, running_server, sse_events

SOAK_REQUESTS = 500
CONCURRENCY = 32
SHUTDOWN_TIMEOUT = 2.0
LONG_CONTEXT = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soak")
    # long requests must outlive the shutdown timeout on any machine (the tiny model decodes about a
    # thousand tokens a second on a fast CPU): a context of thousands
    make_model(folder, "sdar", max_position_embeddings=LONG_CONTEXT)
    with running_server(folder, tmp_path_factory.mktemp("serve") / "serve.log", "--max-num-seqs", "32",
                        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--kv-cache-tokens", str(32 * LONG_CONTEXT)) as s:
        yield s


def seeded_bodies(n: int, rng: random.Random) -> list[tuple[str, dict]]:
    """Sampled requests, each with a seed: the same answer whatever else runs beside them."""
    bodies = []
    for i in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 10)))
        body = {"max_tokens": rng.randint(4, 20), "temperature": rng.choice([0.7, 1.0]), "seed": 1000 + i,
                "top_p": rng.choice([0.9, 1.0]), "top_k": rng.choice([0, 20]), "mode": rng.choice(["ar", "isd"])}
        if i % 3:
            bodies.append(("completions", {**body, "prompt": prompt}))
        else:
            bodies.append(("chat", {**body, "messages": [{"role": "user", "content": prompt}]}))
    return bodies


def answer_text(route: str, r: httpx.Response | str, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of a whole response or of a stream's events."""
    key = "text" if route == "completions" else "message"
    if not stream:
        choice = r.json()["choices"][0]
        return (choice["text"] if key == "text" else choice["message"]["content"]), choice["finish_reason"]
    events = sse_events(r)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [e for e in events[:-1] if e.get("choices")]
    text = "".join(c["choices"][0]["text"] if key == "text" else c["choices"][0]["delta"].get("content") or ""
                   for c in chunks)
    return text, chunks[-1]["choices"][0]["finish_reason"]


async def call(http: httpx.AsyncClient, route: str, body: dict, stream: bool, leave: bool):
    """The answer, or "left" for a client that disconnects: a stream after its second event, a
    whole response when it is not there within 50 ms."""
    payload = {"model": MODEL, **body, "stream": stream}
    if not stream:
        try:
            r = await http.post(ROUTES[route], json=payload, timeout=0.05 if leave else 60)
        except httpx.TimeoutException:  # read, or on a busy machine even connect: either way it left
            if not leave:
                raise
            return "left"
        assert r.status_code == 200, r.text
        return answer_text(route, r, False)
    async with http.stream("POST", ROUTES[route], json=payload, timeout=60) as r:
        assert r.status_code == 200
        lines = []
        async for line in r.aiter_lines():
            lines.append(line)
            if leave and sum(x.startswith("data: ") for x in lines) == 2:
                return "left"
    return answer_text(route, "\n".join(lines), True)


def test_soak_of_mixed_requests_with_disconnects(server):
    rng = random.Random(21)
    seeded = seeded_bodies(40, rng)
    plan = []
    for i in range(SOAK_REQUESTS):
        if i % 5 == 4:  # greedy, beside the seeded pool
            route, body = rng.choice(seeded)
            body = {k: v for k, v in body.items() if k != "seed"}
            seed_index, body = None, {**body, "temperature": 0, "max_tokens": rng.randint(1, 16)}
        else:
            seed_index = (i - i // 5) % len(seeded)
            route, body = seeded[seed_index]
        plan.append((seed_index, route, body, rng.random() < 0.5, rng.random() < 0.1))
    before = {s: server.metric("idlm_requests_total", status=s) for s in ("ok", "aborted")}

    async def soak():
        gate = asyncio.Semaphore(CONCURRENCY)
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_connections=CONCURRENCY * 2)) as http:
            async def one(step):
                async with gate:
                    return await call(http, *step[1:])
            return await asyncio.gather(*(one(step) for step in plan))

    start = time.monotonic()
    results = asyncio.run(soak())
    took = time.monotonic() - start
    left = sum(r == "left" for r in results)
    assert 0 < left < SOAK_REQUESTS // 5

    answers: dict[int, set] = {}
    for (seed_index, _, body, *_), result in zip(plan, results):
        if result == "left":
            continue
        text, reason = result
        assert reason in ("length", "stop"), (body, result)
        if seed_index is not None:
            answers.setdefault(seed_index, set()).add(text)
    assert all(len(texts) == 1 for texts in answers.values()), [t for t in answers.values() if len(t) > 1]
    assert len(answers) == len(seeded)
    for seed_index in range(0, len(seeded), 8):  # the same answers alone, on an idle server
        route, body = seeded[seed_index]
        r = server.post(ROUTES[route], body)
        assert answers[seed_index] == {answer_text(route, r, False)[0]}

    deadline = time.monotonic() + 10
    while server.metric("idlm_running_requests") + server.metric("idlm_queue_depth") > 0:
        assert time.monotonic() < deadline, "requests still running after the soak"
        time.sleep(0.05)
    server.assert_healthy()
    ok = server.metric("idlm_requests_total", status="ok") - before["ok"]
    aborted = server.metric("idlm_requests_total", status="aborted") - before["aborted"]
    # every request ended once, and only the clients that left were aborted
    assert ok + aborted == SOAK_REQUESTS + len(range(0, len(seeded), 8)) + 1
    assert aborted <= left
    print(f"soak: {SOAK_REQUESTS} requests at concurrency {CONCURRENCY} in {took:.1f} s, {left} clients left")


def test_sigterm_under_load_ends_every_request_cleanly_and_exits_0(server):
    """Runs last. Long requests outlive the shutdown timeout and end with a 503 body or an error
    chunk and [DONE]; short ones finish; a request sent during the drain gets a 503 body."""
    long = {"prompt": "the cat sat", "max_tokens": LONG_CONTEXT - 64, "mode": "ar", "ignore_eos": True}
    short = {"prompt": "the dog ran", "max_tokens": 24, "mode": "ar", "ignore_eos": True, "temperature": 0}
    plan = [(route, body, stream) for route in ("completions", "chat") for stream in (False, True)
            for body in [long] * 5 + [short] * 2]
    chat = {"messages": [{"role": "user", "content": "the cat sat"}]}

    async def one(http: httpx.AsyncClient, route: str, body: dict, stream: bool):
        body = {"model": MODEL, **body, "stream": stream}
        if route == "chat":
            body = {**chat, **{k: v for k, v in body.items() if k != "prompt"}}
        if not stream:
            return await http.post(ROUTES[route], json=body)
        async with http.stream("POST", ROUTES[route], json=body) as r:
            assert r.status_code == 200
            return "\n".join([line async for line in r.aiter_lines()])

    async def load():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as http:
            answered = await asyncio.to_thread(server.metric, "idlm_requests_total", status="ok")
            tasks = [asyncio.ensure_future(one(http, *step)) for step in plan]
            # every request of the load running, or (a short one, on a busy machine) already answered
            def started() -> float:
                m = server.metrics()
                return m.get(("idlm_running_requests", ()), 0) + m.get(("idlm_requests_total", (("status", "ok"),)), 0)

            deadline = time.monotonic() + 60
            while await asyncio.to_thread(started) < len(plan) + answered:
                assert time.monotonic() < deadline, "the load's requests never all ran"
                await asyncio.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as late:
                during = await late.post(ROUTES["completions"], json={"model": MODEL, **short})
                health = await late.get("/health")
            return signalled, during, health, await asyncio.gather(*tasks)

    signalled, during, health, results = asyncio.run(load())
    assert "shutting down" in assert_openai_error(during, 503, code="engine_not_ready")["message"]
    assert_openai_error(health, 503, code="engine_not_ready")
    finished = cut = 0
    for (route, body, stream), result in zip(plan, results):
        if not stream and result.status_code == 503:
            assert "shutdown timeout" in assert_openai_error(result, 503, code="engine_not_ready")["message"]
            cut += 1
            continue
        if stream:
            events = sse_events(result)
            assert events[-1] == "[DONE]"
            if "error" in events[-2]:
                assert events[-2]["error"]["code"] == "engine_not_ready" and events[-2]["error"]["message"]
                cut += 1
                continue
        else:
            assert result.status_code == 200, result.text
        text, reason = answer_text(route, result, stream)
        assert reason == "length"
        finished += 1
        assert body is short, "a long request finished within the shutdown timeout: make it longer"
    assert finished == 8 and cut == len(plan) - 8
    assert server.proc.wait(30) == 0
    assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT + 5
    log = server.log.read_text()
    assert "idlm: server stopped" in log
    assert "Traceback" not in log and "CancelledError" not in log and "Internal Server Error" not in log
    assert "timeout graceful shutdown exceeded" not in log  # uvicorn had nothing left to cancel
