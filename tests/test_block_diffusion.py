"""The SDAR-style baseline's decoders: lossless decoding is exact, alpha's p is the causal stream's."""

import itertools
import math

import pytest
import torch
from helpers import make_small_idlm

from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.eval.block_diffusion import (
    BlockDiffusionModel,
    ProbabilityRule,
    clean_probs,
    exact_decode,
    parallel_decode,
    read_sdar_keys,
)
from idlm.kernels.attention import DenseAttention
from idlm.models.loader import load_model

VOCAB, MASK = 12, 11
PROMPT = [2, 3, 4, 5]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_small_idlm(tmp_path_factory.mktemp("bd"), spread=0.25, vocab=VOCAB)
    return load_model(folder, torch.float32, "cpu", progress=False)


def rule(temperature=0.0, top_k=0, top_p=1.0):
    return ProbabilityRule(temperature, top_k, top_p, MASK, torch.device("cpu"))


def greedy_ar(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model.logits(model(torch.tensor([ids]), torch.arange(len(ids))[None], DenseAttention()))[0, -1]
            logits[MASK] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("block", [2, 3, 4])
def test_greedy_exact_decode_is_the_causal_streams_greedy(model, block):
    bd = BlockDiffusionModel(model, MASK, block)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, MASK, (k,), generator=gen).tolist() for k in (1, 3, 7, 12, 5, 9)]
    outs = exact_decode(bd, prompts, 20, rule(), set(), gen)  # batched: right-padded, different lengths
    assert [o.tokens for o in outs] == [greedy_ar(model, p, 20) for p in prompts]
    assert [o.tokens for o in outs[:2]] == [exact_decode(bd, [p], 20, rule(), set(), gen)[0].tokens
                                           for p in prompts[:2]]
    assert all(o.forwards <= 20 for o in outs)
    reached, accepted = sum(sum(o.reached) for o in outs), sum(sum(o.accepted) for o in outs)
    assert 0 < accepted < reached  # both the accept and the reject path ran


def exact_first_three(model, temperature) -> torch.Tensor:
    seqs = torch.tensor([PROMPT + list(c) for c in itertools.product(range(VOCAB), repeat=3)])
    with torch.no_grad():
        logits = model.logits(model(seqs, torch.arange(seqs.shape[1]).expand_as(seqs), DenseAttention()))
    st = SamplingTensors.build([(temperature, 0, 1.0, 0)] * len(seqs), torch.device("cpu"))
    total = torch.ones(len(seqs), dtype=torch.float64)
    for i in range(3):
        probs = token_probs(logits[:, len(PROMPT) - 1 + i], st, MASK).double()
        total *= probs.gather(1, seqs[:, len(PROMPT) + i, None]).squeeze(1)
    return total


def total_variation(model, decode, samples: int, temperature: float) -> tuple[float, float]:
    exact = exact_first_three(model, temperature)
    bd = BlockDiffusionModel(model, MASK, 3)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(VOCAB ** 3, dtype=torch.float64)
    for out in decode(bd, [PROMPT] * samples, 3, rule(temperature), set(), gen):
        t = out.tokens
        counts[(t[0] * VOCAB + t[1]) * VOCAB + t[2]] += 1
    tv = 0.5 * float((counts / samples - exact).abs().sum())
    # E[TV] <= 1/2 sum sqrt(p / n); McDiarmid: P(TV > E + eps) <= exp(-2 n eps^2) = 1e-4
    return tv, 0.5 * float((exact / samples).sqrt().sum()) + math.sqrt(math.log(1e4) / (2 * samples))


# 8,000 samples: a bound of ~0.095, which parallel decoding exceeds ~5 times (TV ~0.56)
def test_sampled_exact_decode_has_the_causal_distribution(model):
    tv, bound = total_variation(model, exact_decode, 8000, 0.8)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


def test_parallel_decode_fails_the_same_test(model):
    tv, bound = total_variation(model, parallel_decode, 8000, 0.8)
    assert tv > 2 * bound


def test_clean_probs_are_the_causal_next_token_probabilities(model):
    bd = BlockDiffusionModel(model, MASK, 4)
    (out,) = parallel_decode(bd, [PROMPT], 9, rule(1.0), set(), torch.Generator().manual_seed(3))
    assert len(out.tokens) == 9 and out.forwards == 3 and len(out.q) == 9
    p = clean_probs(bd, PROMPT, out.tokens, rule(1.0))
    ids = PROMPT + out.tokens
    with torch.no_grad():
        for k, token in enumerate(out.tokens):
            prefix = torch.tensor([ids[:len(PROMPT) + k]])
            logits = model.logits(model(prefix, torch.arange(prefix.shape[1])[None], DenseAttention()))[0, -1:]
            expected = token_probs(logits, SamplingTensors.build([(1.0, 0, 1.0, 0)], torch.device("cpu")), MASK)
            assert p[k].item() == pytest.approx(expected[0, token].item(), rel=1e-4)


def test_decoding_stops_at_eos(model):
    bd = BlockDiffusionModel(model, MASK, 3)
    (free,) = exact_decode(bd, [PROMPT], 30, rule(), set(), torch.Generator())
    eos = free.tokens[4]
    (cut, longer) = exact_decode(bd, [PROMPT, PROMPT + [6, 7]], 30, rule(), {eos}, torch.Generator())
    assert cut.tokens == free.tokens[:free.tokens.index(eos) + 1]
    assert eos not in longer.tokens[:-1]  # one sequence stopping leaves the other running
    (native,) = parallel_decode(bd, [PROMPT], 30, rule(), {eos}, torch.Generator())
    assert eos not in native.tokens[:-1] and (native.tokens[-1] == eos or len(native.tokens) == 30)


def test_only_sdar_checkpoints_are_read(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        read_sdar_keys(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="objective: sdar"):
        read_sdar_keys(tmp_path)
