"""ISD and R-ISD: exact against AR (greedy token for token, sampled in distribution)."""

import itertools

import pytest
import torch
from helpers import make_random_adapter, make_small_idlm, vocab_size

from idlm import LLM, SamplingParams
from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.kernels.attention import DenseAttention


def prompts_for(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 30) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab - 1, (int(k),), generator=gen).tolist()
            for k in torch.randint(lo, hi, (n,), generator=gen)]


@pytest.fixture(scope="module")
def idlm_dir(tmp_path_factory):
    return make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, idlm_dir):
    return make_random_adapter(idlm_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def llm(idlm_dir, adapter_dir):
    return LLM(str(idlm_dir), adapter=str(adapter_dir), progress=False, kv_cache_tokens=8192, max_num_seqs=512)


# ---------------------------------------------------------------- greedy: token for token


# how rounds are shaped: no branches (a cold round after every rejection), every branch that
# fits, and the adaptive policy (K and branches chosen per step from the measured step cost)
SHAPES = {"plain": dict(stride_policy="fixed", branches=0), "branches": dict(stride_policy="fixed"),
          "adaptive": dict(stride_policy="adaptive")}


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
def test_greedy_isd_and_risd_equal_ar(llm, stride):
    prompts = prompts_for(50, 12, seed=stride)
    greedy = dict(temperature=0, max_tokens=40, ignore_eos=True)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))]
    alone = prompts[:20] if stride == 4 else prompts[:10]  # batch size 1
    for mode in ("isd", "risd"):
        for shape, fields in SHAPES.items():
            params = SamplingParams(mode=mode, stride=stride, **fields, **greedy)
            batched = [o for i in range(0, 50, 7) for o in llm.generate(prompts[i:i + 7], params)]  # batch size 7
            assert [o.token_ids for o in batched] == ar
            if shape != "adaptive":
                assert sum(o.stats["drafts"]["accepted"][0] for o in batched) > 0  # drafts really were accepted
            if shape == "branches":
                assert sum(o.stats["branch_rounds"] for o in batched) > 0  # and branch drafts were tested
                assert [llm.generate([p], params)[0].token_ids for p in alone] == ar[:len(alone)]


def test_greedy_mixed_batch_and_preemption(idlm_dir, adapter_dir, llm):
    prompts = prompts_for(56, 12, seed=9, lo=10, hi=40)
    greedy = dict(temperature=0, max_tokens=48, ignore_eos=True)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))]
    mixed = [SamplingParams(mode=mode, stride=stride, **SHAPES[shape], **greedy)
             for mode, stride, shape in itertools.islice(itertools.cycle(
                 itertools.product(("ar", "isd", "risd"), (2, 3, 4, 8), SHAPES)), len(prompts))]
    assert [o.token_ids for o in llm.generate(prompts, mixed)] == ar
    tight = LLM(str(idlm_dir), adapter=str(adapter_dir), progress=False, kv_cache_tokens=320, kv_block_size=8,
                max_num_seqs=16)
    outs = tight.generate(prompts[:14], mixed[:14])
    assert sum(o.stats["preemptions"] for o in outs) > 0
    assert [o.token_ids for o in outs] == ar[:14]
    bm = tight.engine.block_manager
    assert bm.num_free == len(bm.blocks)


def test_risd_greedy_on_base_model_equals_base_ar(model_dirs, tmp_path):
    folder, _ = model_dirs["llama"]  # a plain AR model: no MASK token of its own
    adapter = make_random_adapter(folder, tmp_path / "a", mask_token_id=3)
    llm = LLM(str(folder), adapter=str(adapter), progress=False, kv_cache_tokens=4096)
    assert llm.engine.defaults["mode"] == "risd"
    prompts = prompts_for(8, vocab_size(), seed=2)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", temperature=0, max_tokens=30,
                                                                    ignore_eos=True))]
    risd = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert [o.token_ids for o in risd] == ar
    plain = LLM(str(folder), progress=False, kv_cache_tokens=4096)  # risd without adapter: base weights, lossless
    assert [o.token_ids for o in plain.generate(prompts, SamplingParams(mode="risd", temperature=0, max_tokens=30,
                                                                        ignore_eos=True))] == ar


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_logprobs_are_the_clean_streams(llm, temperature):
    """Each output token's logprob and top alternatives are a dense causal forward's log-softmax
    over prompt + output, whichever mode produced them (drafts, corrections and bonus alike)."""
    prompts = prompts_for(12, 12, seed=4)
    model = llm.engine.model
    for mode in ("ar", "isd", "risd"):
        params = SamplingParams(mode=mode, stride=4, stride_policy="fixed", temperature=temperature, seed=3,
                                max_tokens=24, ignore_eos=True, logprobs=5)
        outs = llm.generate(prompts, params)
        if mode != "ar":
            assert sum(sum(o.stats["drafts"]["accepted"]) for o in outs) > 20
        for prompt, out in zip(prompts, outs):
            ids = torch.tensor([prompt + out.token_ids])
            with torch.no_grad():
                dense = model.logits(model(ids, torch.arange(ids.shape[1])[None], DenseAttention()))[0]
            dense = dense[len(prompt) - 1:-1].double().log_softmax(-1)
            assert len(out.logprobs) == len(out.token_ids)
            got = torch.tensor([lp for lp, _ in out.logprobs], dtype=torch.float64)
            torch.testing.assert_close(got, dense.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1),
                                       atol=1e-4, rtol=0)
            top = dense.topk(5, dim=-1)
            torch.testing.assert_close(torch.tensor([[v for _, v in alt] for _, alt in out.logprobs],
                                                    dtype=torch.float64), top.values, atol=1e-4, rtol=0)
            assert [[t for t, _ in alt] for _, alt in out.logprobs] == top.indices.tolist()


def test_prompt_logprobs_through_chunks_and_prefix_cache(idlm_dir):
    """Each prompt token after the first gets a dense forward's log-softmax, with the prompt split
    into chunks and a cached prefix that must not skip its rows."""
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096, kv_block_size=8, max_num_batched_tokens=16,
              enable_prefix_caching=True)
    prompts = prompts_for(6, 12, seed=6, lo=20, hi=60)
    params = SamplingParams(mode="isd", temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))  # caches the first prompt's blocks
    model = llm.engine.model
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            dense = model.logits(model(ids, torch.arange(len(prompt))[None], DenseAttention()))[0]
        dense = dense[:-1].double().log_softmax(-1)
        assert len(out.prompt_logprobs) == len(prompt) - 1
        torch.testing.assert_close(torch.tensor([lp for lp, _ in out.prompt_logprobs], dtype=torch.float64),
                                   dense.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1), atol=1e-4, rtol=0)
        assert [[t for t, _ in alt] for _, alt in out.prompt_logprobs] == dense.topk(3, dim=-1).indices.tolist()


def test_greedy_with_penalties_and_logit_bias_equals_ar(llm):
    prompts = prompts_for(16, 12, seed=5)
    greedy = dict(temperature=0, max_tokens=30, ignore_eos=True, min_p=0.1, **PENALTIES)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))]
    plain = SamplingParams(mode="ar", temperature=0, max_tokens=30, ignore_eos=True)
    assert ar != [o.token_ids for o in llm.generate(prompts, plain)]
    for mode, stride, shape in (("isd", 4, "branches"), ("risd", 3, "plain"), ("isd", 8, "adaptive")):
        outs = llm.generate(prompts, SamplingParams(mode=mode, stride=stride, **SHAPES[shape], **greedy))
        assert [o.token_ids for o in outs] == ar
        if shape != "adaptive":  # (the adaptive policy may choose K = 0 on a loaded machine)
            assert sum(sum(o.stats["drafts"]["accepted"]) for o in outs) > 0


# ---------------------------------------------------------------- sampled: in distribution

N_SAMPLES = 20000
PROMPT = [2, 3, 4, 5]


def reference_penalties(logits: torch.Tensor, outputs: torch.Tensor, presence_penalty=0.0, frequency_penalty=0.0,
                        repetition_penalty=1.0, logit_bias=None) -> torch.Tensor:
    """vLLM's logit_bias and penalties, written out: logits [S, V] of rows that follow PROMPT and
    outputs [S, i]."""
    logits = logits.double().clone()
    for token, bias in (logit_bias or {}).items():
        logits[:, token] += bias
    counts = torch.zeros_like(logits)
    for c in range(outputs.shape[1]):
        counts[torch.arange(len(logits)), outputs[:, c]] += 1
    seen = counts > 0
    seen[:, PROMPT] = True
    r = repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0).double()


def exact_first_three(llm, temperature, top_k, top_p, min_p=0.0, **penalties) -> torch.Tensor:
    """P(x1 x2 x3 | PROMPT) under AR sampling with the request's transform, indexed by the
    base-V number x1 x2 x3."""
    model, vocab = llm.engine.model, llm.engine.model_config.vocab_size
    seqs = torch.tensor([PROMPT + list(c) for c in itertools.product(range(vocab), repeat=3)])
    with torch.no_grad():
        logits = model.logits(model(seqs, torch.arange(seqs.shape[1]).expand_as(seqs), DenseAttention()))
    st = SamplingTensors.build([(temperature, top_k, top_p, 0)] * len(seqs), torch.device("cpu"),
                               min_p=[min_p] * len(seqs))
    total = torch.ones(len(seqs), dtype=torch.float64)
    for i in range(3):
        row = logits[:, len(PROMPT) - 1 + i]
        if penalties:
            row = reference_penalties(row, seqs[:, len(PROMPT):len(PROMPT) + i], **penalties).float()
        probs = token_probs(row, st, llm.engine.mask_ids["isd"]).double()
        total *= probs.gather(1, seqs[:, len(PROMPT) + i, None]).squeeze(1)
    return total


def pooled_chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    """Chi-square statistic, degrees of freedom and p-value, pooling the rarest cells until every
    bin expects at least 5 samples."""
    obs, exp, o_acc, e_acc = [], [], 0.0, 0.0
    for i in torch.argsort(expected).tolist():
        o_acc, e_acc = o_acc + counts[i].item(), e_acc + expected[i].item()
        if e_acc >= 5:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    obs[-1] += o_acc
    exp[-1] += e_acc
    o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    dof = len(obs) - 1
    return stat, dof, float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def sampled_fit(llm, mode, stride, temperature, top_k=0, top_p=1.0, proposal="sample", shape="plain",
                **processing):
    exact = exact_first_three(llm, temperature, top_k, top_p, **processing)
    params = [SamplingParams(mode=mode, stride=stride, proposal=proposal, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=i, max_tokens=3, ignore_eos=True, **SHAPES[shape], **processing)
              for i in range(N_SAMPLES)]
    outs = llm.generate([PROMPT] * N_SAMPLES, params)
    vocab = llm.engine.model_config.vocab_size
    index = torch.tensor([(o.token_ids[0] * vocab + o.token_ids[1]) * vocab + o.token_ids[2] for o in outs])
    counts = torch.bincount(index, minlength=vocab ** 3).double()
    tv = 0.5 * float((counts / N_SAMPLES - exact).abs().sum())
    # E[TV] <= 1/2 sum_i sqrt(p_i / n); TV moves by at most 1/n per sample, so by McDiarmid it
    # exceeds its mean by 0.015 with probability <= exp(-2 n 0.015^2) = 1e-4 at n = 20000.
    bound = 0.5 * float((exact / N_SAMPLES).sqrt().sum()) + 0.015
    accepted = sum(o.stats["drafts"]["accepted"][0] for o in outs if o.stats["drafts"]["accepted"])
    branch_accepted = sum(o.stats["branch_drafts_accepted"] for o in outs)
    return tv, bound, pooled_chi_square(counts, exact * N_SAMPLES), (accepted, branch_accepted)


@pytest.mark.parametrize("mode, stride, temperature, top_k, top_p, shape", [
    ("isd", 4, 1.0, 0, 1.0, "plain"),
    ("isd", 2, 0.7, 6, 0.9, "plain"),
    ("risd", 3, 1.0, 0, 1.0, "plain"),
    ("risd", 2, 0.7, 6, 0.9, "plain"),
    ("isd", 2, 1.0, 0, 1.0, "branches"),
    ("isd", 3, 0.7, 6, 0.9, "branches"),
    ("risd", 2, 1.0, 0, 1.0, "branches"),
    ("risd", 2, 0.7, 6, 0.9, "branches"),
])
def test_sampled_output_has_the_ar_distribution(llm, mode, stride, temperature, top_k, top_p, shape):
    tv, bound, (stat, dof, p_value), (accepted, branch_accepted) = sampled_fit(llm, mode, stride, temperature, top_k,
                                                                                top_p, shape=shape)
    assert accepted > N_SAMPLES // 10  # the verify path really ran
    if shape == "branches":  # and, in the third token, drafts proposed by a branch
        assert branch_accepted > N_SAMPLES // 20
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    assert p_value > 1e-3, f"chi-square {stat:.1f} on {dof} dof, p = {p_value:.2g}"


# each penalty moves the distribution of the second and third tokens, the bias that of the first
PENALTIES = dict(presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.6, logit_bias={3: 1.0, 7: -1.5})


@pytest.mark.parametrize("mode, stride, temperature, top_k, top_p, min_p, shape", [
    ("isd", 3, 1.0, 0, 1.0, 0.05, "branches"),
    ("risd", 2, 0.7, 6, 0.9, 0.0, "plain"),
])
def test_penalties_and_logit_bias_keep_the_ar_distribution(llm, mode, stride, temperature, top_k, top_p, min_p,
                                                           shape):
    """p and q of every position are processed with the tokens it follows, drafts included."""
    processing = dict(PENALTIES, min_p=min_p)
    assert (exact_first_three(llm, temperature, top_k, top_p, **processing)
            - exact_first_three(llm, temperature, top_k, top_p)).abs().sum() > 0.2  # the test can tell them apart
    tv, bound, (stat, dof, p_value), (accepted, branch_accepted) = sampled_fit(
        llm, mode, stride, temperature, top_k, top_p, shape=shape, **processing)
    assert accepted > N_SAMPLES // 10
    if shape == "branches":
        assert branch_accepted > N_SAMPLES // 20
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    assert p_value > 1e-3, f"chi-square {stat:.1f} on {dof} dof, p = {p_value:.2g}"


def test_argmax_proposal_fails_the_same_test(llm):
    tv, bound, (stat, dof, p_value), _ = sampled_fit(llm, "isd", 4, 1.0, proposal="argmax")
    assert tv > 3 * bound and p_value < 1e-9


def test_argmax_exact_proposal_keeps_the_distribution(llm):
    tv, bound, (_, _, p_value), _ = sampled_fit(llm, "isd", 3, 1.0, proposal="argmax_exact")
    assert tv < bound and p_value > 1e-3

