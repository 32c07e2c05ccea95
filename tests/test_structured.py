"""Structured output: JSON-schema masks (xgrammar) on p and q alike keep ISD exact, and a tiny
random model writes schema-valid JSON only because of them."""

import json

import openai
import pytest
import torch
from helpers import CHAT_TEMPLATE, make_random_adapter, make_small_idlm
from server_helpers import MODEL, assert_openai_error, running_server
from test_isd import N_SAMPLES, pooled_chi_square
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from idlm import LLM, SamplingParams
from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.engine.structured import allowed
from idlm.kernels.attention import DenseAttention

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        # (xgrammar's maxLength strings admit raw control characters, which JSON forbids: a pattern instead)
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"}, "maxItems": 2},
    },
    "required": ["name", "age", "ok", "color", "tags"],
    "additionalProperties": False,
}
BYTES = 256  # a byte-level tokenizer: one token per byte, then EOS and MASK


def byte_level_model(folder):
    """make_small_idlm with a byte-level tokenizer (EOS 256, MASK 257), so that JSON is writable."""
    make_small_idlm(folder, vocab=BYTES + 2, seed=1)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config.update(eos_token_id=BYTES, bos_token_id=BYTES)
        (folder / name).write_text(json.dumps(config))
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<|endoftext|>": BYTES, "<|mask|>": BYTES + 1})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|mask|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return byte_level_model(tmp_path_factory.mktemp("bytes"))


@pytest.fixture(scope="module")
def adapter(folder, tmp_path_factory):
    return make_random_adapter(folder, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def llm(folder, adapter):
    return LLM(str(folder), adapter=str(adapter), progress=False, kv_cache_tokens=8192, max_num_seqs=512)


def valid(value) -> bool:
    """SCHEMA, checked by hand."""
    return (isinstance(value, dict) and set(value) == set(SCHEMA["required"])
            and isinstance(value["name"], str) and 1 <= len(value["name"]) <= 6 and value["name"].isalpha()
            and type(value["age"]) is int and 0 <= value["age"] <= 120 and type(value["ok"]) is bool
            and value["color"] in ("red", "green", "blue") and isinstance(value["tags"], list)
            and len(value["tags"]) <= 2 and all(isinstance(t, str) and 1 <= len(t) <= 3 for t in value["tags"]))


def prompts(n: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    return ["".join(chr(int(c)) for c in torch.randint(97, 123, (int(k),), generator=gen))
            for k in torch.randint(3, 12, (n,), generator=gen)]


@pytest.mark.parametrize("mode", ["ar", "risd"])
def test_json_schema_output_parses_and_validates(llm, mode):
    schema = json.dumps(SCHEMA)
    params = [SamplingParams(mode=mode, stride=4, temperature=1.0, seed=i, max_tokens=200, json_schema=schema)
              for i in range(20)]
    outs = llm.generate(prompts(20), params)
    assert all(o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    values = [json.loads(o.text) for o in outs]
    assert all(valid(v) for v in values), values
    assert len({json.dumps(v) for v in values}) > 10  # sampled, not one fixed answer
    if mode == "risd":
        assert sum(sum(o.stats["drafts"]["accepted"]) for o in outs) > 20
    free = llm.generate(prompts(20), [SamplingParams(mode=mode, temperature=1.0, seed=i, max_tokens=60)
                                      for i in range(20)])
    assert not any(o.text.startswith("{") for o in free)  # without the mask: no JSON


def test_greedy_isd_and_risd_equal_ar_under_the_grammar(llm):
    schema = json.dumps(SCHEMA)
    greedy = dict(temperature=0, max_tokens=60, json_schema=schema)
    texts = prompts(8)
    ar = [o.token_ids for o in llm.generate(texts, SamplingParams(mode="ar", **greedy))]
    for mode, policy in (("isd", "fixed"), ("risd", "fixed"), ("risd", "adaptive")):
        outs = llm.generate(texts, SamplingParams(mode=mode, stride=4, stride_policy=policy, **greedy))
        assert [o.token_ids for o in outs] == ar


def test_invalid_schema_is_refused(llm):
    with pytest.raises(ValueError, match="response_format"):
        llm.generate("abc", SamplingParams(json_schema='{"type": "object", "properties": 5}'))
    with pytest.raises(ValueError, match="response_format"):
        llm.generate("abc", SamplingParams(json_schema="{not json"))


def test_response_format_over_the_api(folder, adapter, tmp_path):
    with running_server(folder, tmp_path / "serve.log", "--adapter", str(adapter)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
        for mode in ("ar", "risd"):
            for seed in range(3):
                chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_completion_tokens=200, temperature=1.0, seed=seed,
                                                      response_format=fmt, extra_body={"mode": mode})
                assert chat.choices[0].finish_reason == "stop"
                assert valid(json.loads(chat.choices[0].message.content))
        text = client.completions.create(model=MODEL, prompt="abc", max_tokens=200, temperature=1.0, seed=1,
                                         extra_body={"response_format": {"type": "json_object"}})
        assert isinstance(json.loads(text.choices[0].text), dict)
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}
        assert_openai_error(server.post("/v1/completions", {"prompt": "abc", "response_format": bad}), 400,
                            "response_format")
        assert_openai_error(server.post("/v1/completions", {"prompt": "abc",
                                                            "response_format": {"type": "json_schema"}}), 400,
                            "response_format")


def exact_under_grammar(llm, schema: str, prompt: list[int], depth: int, temperature: float) -> dict:
    """P(x_1..x_depth | prompt) of AR sampling under the grammar, for every sequence it allows."""
    engine, model = llm.engine, llm.engine.model
    constraint = engine.grammars.constraint(schema)
    law = {(): 1.0}
    for _ in range(depth):
        prefixes = list(law)
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            logits = model.logits(model(ids, torch.arange(ids.shape[1]).expand_as(ids), DenseAttention()))[:, -1]
        ok = allowed(torch.cat([constraint.bitmask(list(p))[-1:] for p in prefixes]), logits.shape[1],
                     constraint.stop_ids)
        st = SamplingTensors.build([(temperature, 0, 1.0, 0)] * len(prefixes), torch.device("cpu"))
        probs = token_probs(logits.masked_fill(~ok, float("-inf")), st, engine.mask_ids["isd"]).double()
        law = {p + (t,): law[p] * probs[k, t].item() for k, p in enumerate(prefixes)
               for t in probs[k].nonzero().flatten().tolist()}
    return law


def test_grammar_masks_keep_the_ar_distribution(llm):
    """The joint law of the first four tokens under a grammar, risd with branches against AR. The
    allowed letters depend on the ones before them, so a draft masked with another history than
    its verifier's would show."""
    schema = json.dumps({"enum": ["ab", "ba", "bb", "cc", "cab", "acd", "cba"]})
    prompt = llm.engine.tokenize("xyz")
    exact = exact_under_grammar(llm, schema, prompt, 4, 1.0)
    cells = {seq: i for i, seq in enumerate(exact)}
    expected = torch.tensor(list(exact.values()), dtype=torch.float64)
    params = [SamplingParams(mode="risd", stride=3, stride_policy="fixed", temperature=1.0, seed=i, max_tokens=4,
                             json_schema=schema) for i in range(N_SAMPLES)]
    outs = llm.generate([prompt] * N_SAMPLES, params)
    counts = torch.bincount(torch.tensor([cells[tuple(o.token_ids)] for o in outs]), minlength=len(cells)).double()
    tv = 0.5 * float((counts / N_SAMPLES - expected).abs().sum())
    bound = 0.5 * float((expected / N_SAMPLES).sqrt().sum()) + 0.015  # as tests/test_isd.py's
    _, _, p_value = pooled_chi_square(counts, expected * N_SAMPLES)
    assert sum(sum(o.stats["drafts"]["accepted"]) for o in outs) > N_SAMPLES // 2
    assert tv < bound and p_value > 1e-3, (tv, bound, p_value)
