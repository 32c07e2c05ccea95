"""The OpenAI fields evals and agents use, on a real `idlm serve` with the official openai client:
logprobs and top_logprobs, n, penalties, min_p and logit_bias, echo; vLLM's /tokenize,
/detokenize and /version; latency histograms in /metrics."""

from pathlib import Path

import pytest
from server_helpers import MODEL, assert_openai_error, running_server
from test_server import make_isd_model

from idlm import SamplingParams, __version__

CHAT = [{"role": "user", "content": "hello what is the sun"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_isd_model(tmp_path_factory.mktemp("isd"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("serve") / "serve.log", "--max-num-seqs", "8") as s:
        yield s


def test_completion_logprobs_and_echo(client, offline):
    prompt = "the cat sat on the"
    args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    expected = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))[0]
    lp = whole.choices[0].logprobs
    assert whole.choices[0].text == expected.text
    assert lp.tokens == [offline.tokenizer.decode([t]) for t in expected.token_ids]
    assert lp.token_logprobs == pytest.approx([v for v, _ in expected.logprobs], abs=1e-5)
    tokenizer = offline.tokenizer
    for token, chosen, top, (_, alternatives) in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                                      expected.logprobs):
        assert top[token] == pytest.approx(chosen)
        assert {tokenizer.decode([t]) for t, _ in alternatives} <= set(top) and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(alternatives[0][1], abs=1e-5) and chosen <= 0
    text = whole.choices[0].text  # where each token's piece (here: a space, then the word) starts
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(set(lp.text_offset))
    assert all(text[k:].lstrip().startswith(t) for k, t in zip(lp.text_offset, lp.tokens))
    chunks = [c for c in client.completions.create(**args, stream=True) if c.choices]
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(lp.token_logprobs, abs=1e-5)
    echoed = client.completions.create(**{**args, "echo": True})
    assert echoed.choices[0].text == prompt + whole.choices[0].text
    prompt_ids = offline.tokenizer.encode(prompt)
    with_prompt = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    elp = echoed.choices[0].logprobs
    assert elp.tokens == [offline.tokenizer.decode([t]) for t in prompt_ids] + lp.tokens
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert elp.token_logprobs[1:] == pytest.approx([v for v, _ in with_prompt.prompt_logprobs] + lp.token_logprobs,
                                                   abs=1e-5)
    assert elp.text_offset[len(prompt_ids)] == len(prompt)
    chunks = [c for c in client.completions.create(**args, echo=True, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == prompt + whole.choices[0].text
    assert [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == \
        pytest.approx(elp.token_logprobs, abs=1e-5)


def test_chat_logprobs_stream_equals_whole(client):
    args = dict(model=MODEL, messages=CHAT, max_completion_tokens=15, temperature=0.8, seed=2, logprobs=True,
                top_logprobs=2)
    whole = client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
               and entry.logprob <= entry.top_logprobs[0].logprob + 1e-6 and entry.bytes == list(entry.token.encode())
               for entry in content)
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = client.chat.completions.create(**{**args, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


def test_n_choices_are_seeded_distinct_and_reproducible(client):
    args = dict(model=MODEL, prompt="one two", max_tokens=10, temperature=1.0, seed=7, n=3,
                extra_body={"ignore_eos": True})
    first = client.completions.create(**args)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.text for c in client.completions.create(**args).choices] == texts
    assert first.usage.completion_tokens == 30
    assert client.completions.create(**{**args, "n": 1}).choices[0].text == texts[0]  # choice 0 keeps the seed
    streamed = ["", "", ""]
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=1.0,
                                          seed=3, n=3)
    assert len({c.message.content for c in chat.choices}) == 3


def test_penalties_min_p_and_logit_bias(client, offline):
    fields = dict(presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.3, min_p=0.05)
    prompt = "one two three"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                    presence_penalty=1.5, frequency_penalty=1.0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.3, "min_p": 0.05})
    expected = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, **fields))[0]
    plain = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert got.choices[0].text == expected.text != plain.text
    water = offline.tokenizer.convert_tokens_to_ids("water")
    biased = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.9, seed=1,
                                       logit_bias={str(water): 100}, extra_body={"ignore_eos": True})
    assert biased.choices[0].text.split() == ["water"] * 6


def test_tokenize_detokenize_version(server, offline):
    r = server.post("/tokenize", {"prompt": "the cat sat", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == offline.tokenizer.encode("the cat sat") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0 and body["token_strs"] == ["the", "cat", "sat"]
    chat = server.post("/tokenize", {"messages": CHAT}).json()
    assert chat["tokens"] == offline.engine.chat_prompt(CHAT)
    assert server.post("/detokenize", {"tokens": body["tokens"]}).json() == {"prompt": "the cat sat"}
    assert server.get("/version").json() == {"version": __version__, "deterministic": False}
    assert_openai_error(server.post("/tokenize", {"prompt": "a", "messages": CHAT}), 400, "prompt")
    assert_openai_error(server.post("/detokenize", {"tokens": [10**9]}), 400, "tokens")
    assert_openai_error(server.post("/tokenize", {"prompt": "a", "model": "other"}), 404, "model")


def test_latency_histograms(server):
    before = server.metric("idlm_request_latency_seconds_count")
    r = server.post("/v1/completions", {"prompt": "hello world", "max_tokens": 5, "temperature": 0,
                                        "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert server.metric("idlm_request_latency_seconds_count") == before + 1
    assert server.metric("idlm_time_to_first_token_seconds_count") >= before + 1
    assert server.metric("idlm_inter_token_latency_seconds_count") >= 4


@pytest.mark.parametrize("route, body, param", [
    ("chat", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "n": 17}, "n"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "logit_bias": {"cat": 1}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"100000": 1}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("chat", {"messages": CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ("chat", {"messages": CHAT, "min_p": 1.5}, "min_p"),
    ("chat", {"messages": CHAT, "frequency_penalty": 2.5}, "frequency_penalty"),
    # a word-level vocabulary has no "{": refused before it reaches the engine
    ("chat", {"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_fields_get_one_clear_400(server, route, body, param):
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[route]
    assert_openai_error(server.post(path, body), 400, param)
