"""A property-based fuzzer (hypothesis) against a real `idlm serve`: generated requests for every
route, mostly well-formed with hostile values spliced in (NaN, huge integers, lone surrogates,
wrong types, junk keys, bytes that are not UTF-8, truncated JSON). Every answer must be a 2xx, or
a 4xx with the OpenAI error body; never a 5xx. Afterwards the server still answers normally.

The examples are derandomised, so CI sends the same requests every run; a local hunt for new
failures can run with a larger max_examples and derandomize=False."""

import json
import time

import httpx
import pytest
from helpers import WORDS, make_model, vocab_size
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import ERROR_KEYS, MODEL, running_server, sse_events

EXAMPLES = 600
SENT = {"requests": 0, "served": 0, "first": 0.0, "last": 0.0}
MAX_GENERATED = 8  # valid max_tokens above this are lowered to it, so that generation stays quick


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    make_model(folder, "sdar")
    with running_server(folder, tmp_path_factory.mktemp("serve") / "serve.log", "--shutdown-timeout", "2") as s:
        with httpx.Client(base_url=s.url, timeout=30) as http:
            s.http = http
            yield s


surrogates = st.characters(categories=["Cs"])
hostile_text = st.one_of(st.text(max_size=12), st.lists(st.one_of(st.characters(), surrogates), max_size=6).map(
    "".join))
numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.sampled_from(
    [0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 1e308, -1e308, 1e-300, 5e-324, 1e-7]))
junk = st.recursive(st.one_of(st.none(), st.booleans(), numbers, hostile_text),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner,
                                                                                         max_size=3)),
                    max_leaves=8)
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
token_ids = st.lists(st.integers(0, vocab_size() - 1), min_size=1, max_size=8)

# well-formed values of every field: a body made of them only must be served (200)
VALID = {
    "max_tokens": st.integers(1, MAX_GENERATED),
    "temperature": st.one_of(st.just(0), st.floats(1e-6, 2)),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 80),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.one_of(words, st.lists(words, max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, vocab_size() - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "mode": st.sampled_from(["ar", "isd", "risd"]),
    "stride": st.integers(2, 16),
    "proposal": st.sampled_from(["sample", "argmax", "argmax_exact"]),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "idlm_provenance": st.booleans(),
    "n": st.integers(1, 2),
    "user": words,
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "min_p": st.floats(0, 1),
    "logit_bias": st.dictionaries(st.integers(0, vocab_size() - 1).map(str), st.floats(-100, 100), max_size=2),
}
COMPLETION = {"prompt": st.one_of(words, token_ids, st.lists(words, min_size=1, max_size=1),
                                  st.lists(token_ids, min_size=1, max_size=1)),
              "echo": st.booleans(), "logprobs": st.integers(0, 5), "best_of": st.just(1), "suffix": st.just("")}
part = st.fixed_dictionaries({"type": st.just("text"), "text": words})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]),
     "content": st.one_of(words, st.lists(part, min_size=1, max_size=2))},
    optional={"name": words})
CHAT = {"messages": st.lists(message, min_size=1, max_size=3), "max_completion_tokens": st.integers(1, MAX_GENERATED),
        "logprobs": st.booleans(), "top_logprobs": st.just(0)}


NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stride", "presence_penalty", "n",
           "repetition_penalty", "min_p", "logprobs"]
extreme = st.one_of(st.floats(), st.sampled_from([2**63 - 1, 2**63, 2**64, -2**63 - 1, 1e308, 1e-300, 5e-324, 1e-7]))


def post(path: str, route_fields: dict[str, st.SearchStrategy], required: str) -> st.SearchStrategy:
    """(method, path, well-formed body, mutations): each mutation sets a field to a hostile value or
    a numeric one to an extreme, drops a field, adds a junk key, slips a lone surrogate into a
    string or a key, or spoils the encoding."""
    optional = {**VALID, **{k: v for k, v in route_fields.items() if k != required}}
    names = sorted(optional) + [required, "model"]
    valid = st.fixed_dictionaries({"model": st.just(MODEL), required: route_fields[required]}, optional=optional)
    mutation = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(names), st.one_of(junk, numbers, hostile_text)),
        st.tuples(st.just("set"), st.sampled_from(NUMERIC), extreme),
        st.tuples(st.just("drop"), st.sampled_from(names), st.none()),
        st.tuples(st.just("extra"), hostile_text, junk),
        st.tuples(st.sampled_from(["surrogate", "surrogate-in-text"]), st.integers(0, 50), surrogates),
        st.tuples(st.just("encode"), st.sampled_from(["raw", "truncated", "stray-byte"]), st.floats(0, 1)),
    )
    return st.tuples(st.just("POST"), st.just(path), valid, st.lists(mutation, max_size=3))


def with_surrogate(body: dict, pick: int, char: str, text_only: bool) -> dict:
    """A copy of the body with `char` appended to one of its strings or keys; with text_only, to
    the text the tokenizer gets (the prompt, a message's content)."""
    body = json.loads(json.dumps(body))
    spots, stack = [], [(body, "")]
    while stack:
        container, field = stack.pop()
        for key, item in list(container.items() if isinstance(container, dict) else enumerate(container)):
            name = key if isinstance(key, str) else field
            if isinstance(key, str) and not text_only:
                spots.append((container, key, True))
            if isinstance(item, str) and (not text_only or name in ("prompt", "content", "text")):
                spots.append((container, key, False))
            elif isinstance(item, dict | list):
                stack.append((item, name))
    if not spots:
        return body
    container, key, is_key = spots[pick % len(spots)]
    if is_key:
        container[key + char] = container.pop(key)
    else:
        container[key] += char
    return body


def mutate(body: dict, mutations: list[tuple]) -> tuple[dict, str, float]:
    """The body with its mutations applied, and how to encode it."""
    body, how, cut = dict(body), "json", 0.0
    for kind, name, value in mutations:
        if kind in ("set", "extra"):
            body[name] = value
        elif kind == "drop":
            body.pop(name, None)
        elif kind.startswith("surrogate"):
            body = with_surrogate(body, name, value, text_only=kind == "surrogate-in-text")
        else:
            how, cut = name, value
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and MAX_GENERATED < value <= 1024:
            body[key] = MAX_GENERATED
    if "messages" in body and not any(isinstance(body.get(k), int) for k in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = 4  # chat's default is the rest of the context
    return body, how, cut


def encode(payload, how: str, cut: float) -> bytes:
    """The body as a client might send it: Python's JSON (NaN, \\udXXX escapes), raw UTF-8 with
    surrogates passed through, truncated, or with a stray byte."""
    if how == "raw":
        return json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
    data = json.dumps(payload).encode()
    if how == "truncated":
        return data[:int(len(data) * cut)]
    if how == "stray-byte":
        at = int(len(data) * cut)
        return data[:at] + b"\xff" + data[at:]
    return data


OTHERS = [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/"),
          ("GET", "/v1/completions"), ("POST", "/health"), ("DELETE", "/v1/models"), ("GET", "/v1/nothing"),
          ("POST", "/v1/embeddings"), ("GET", "/version"), ("POST", "/tokenize"), ("POST", "/detokenize")]
requests = st.one_of(
    post("/v1/completions", COMPLETION, "prompt"),
    post("/v1/chat/completions", CHAT, "messages"),
    st.tuples(st.sampled_from(OTHERS).map(lambda r: r[0]), st.sampled_from(OTHERS).map(lambda r: r[1]), junk,
              st.none()),  # other routes: no body expected, so no mutation to speak of
)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(request=requests)
def test_fuzzed_requests_get_2xx_or_an_openai_4xx(server, request):
    method, path, payload, mutations = request
    payload, how, cut = mutate(payload, mutations) if mutations is not None else (payload, "json", 0.0)
    SENT["first"] = SENT["first"] or time.monotonic()
    r = server.http.request(method, path, content=encode(payload, how, cut),
                            headers={"Content-Type": "application/json"})
    SENT["requests"] += 1
    SENT["last"] = time.monotonic()
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if mutations == []:
        assert r.status_code == 200, r.text[:500]  # a well-formed request is served
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"]
        return
    SENT["served"] += method == "POST"
    if method == "POST" and r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), r.text[-500:]
    elif method == "POST":
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_server_is_healthy_after_the_fuzzer(server):
    """Runs after the fuzzer: enough requests, in time, and the server still serves."""
    took = SENT["last"] - SENT["first"]
    print(f"fuzzer: {SENT['requests']} requests in {took:.1f} s, {SENT['served']} generations served")
    assert SENT["requests"] >= 500 and SENT["served"] >= 100
    assert took < 120
    server.assert_healthy()
    assert "Traceback" not in server.log.read_text()
