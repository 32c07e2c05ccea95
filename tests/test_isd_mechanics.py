"""ISD mechanics: KV rollback, the gated LoRA's clean rows, accounting, configs, bad input."""

import os
import shutil

import pytest
import torch
from helpers import make_random_adapter, make_small_idlm

from idlm import LLM, SamplingParams
from idlm.cli import main
from idlm.engine.decoding_config import load_decoding_config
from idlm.engine.sequence import TokenSource
from idlm.kernels.attention import DenseAttention
from idlm.models.loader import load_model
from idlm.models.lora import load_adapter


@pytest.fixture(scope="module")
def idlm_dir(tmp_path_factory):
    return make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.4, vocab=12)


class RecordingAttention(DenseAttention):
    def __init__(self):
        super().__init__()
        self.kv = {}

    def __call__(self, layer, q, k, v):
        self.kv[layer] = (k, v)
        return super().__call__(layer, q, k, v)


def test_rolled_back_kv_equals_fresh_prefill(idlm_dir):
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=2048, kv_block_size=4)
    engine = llm.engine
    engine.add_request([2, 3, 4], SamplingParams(mode="isd", stride=4, temperature=1.0, seed=3, max_tokens=60,
                                                 ignore_eos=True))
    seq = next(iter(engine.seqs.values()))
    for _ in range(12):
        engine.step()
    assert seq.stats.drafts.reached[0] > seq.stats.drafts.accepted[0] > 0  # rejections and acceptances
    n = seq.num_computed
    slots = torch.tensor([seq.block_table[p // 4] * 4 + p % 4 for p in range(n)])
    recorder = RecordingAttention()
    ids = torch.tensor([seq.token_ids[:n]])
    with torch.no_grad():
        engine.model(ids, torch.arange(n)[None], recorder)
    cache = engine.runner.kv_cache
    for layer, (k, v) in recorder.kv.items():
        cached_k = cache[0, layer].flatten(0, 1)[slots]
        cached_v = cache[1, layer].flatten(0, 1)[slots]
        torch.testing.assert_close(cached_k, k[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached_v, v[0], rtol=1e-5, atol=1e-5)


def clean_then_mask_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, LoRA gate and positions of five clean rows then three MASK rows (id 11): a round feeds
    clean rows first and MASK rows last, so no clean row attends to a MASK row."""
    ids = torch.tensor([[2, 3, 4, 5, 6, 11, 11, 11]])
    return ids, (ids == 11).float(), torch.arange(8)[None]


def test_gated_lora_leaves_clean_rows_bit_identical(idlm_dir, tmp_path):
    adapter = make_random_adapter(idlm_dir, tmp_path / "adapter")
    base = load_model(idlm_dir, torch.float32, "cpu", progress=False)
    lora = load_model(idlm_dir, torch.float32, "cpu", progress=False)
    load_adapter(lora, adapter)
    ids, gate, pos = clean_then_mask_rows()
    with torch.no_grad():
        plain = base(ids, pos, DenseAttention())
        gated = lora(ids, pos, DenseAttention(), lora_gate=gate)
        ungated = lora(ids, pos, DenseAttention())
    assert torch.equal(gated[0, :5], plain[0, :5])
    assert torch.equal(ungated, plain)
    assert not torch.allclose(gated[0, 5:], plain[0, 5:])


@pytest.mark.parametrize("rig, stride", [("always", 4), ("never", 4), ("always", 3)])
def test_accounting_on_rigged_models(tmp_path, rig, stride):
    folder = make_small_idlm(tmp_path / rig, spread=1.0, vocab=12, rig=rig)
    llm = LLM(str(folder), progress=False, kv_cache_tokens=2048)
    max_tokens = 25
    out = llm.generate([[2, 3, 4]], SamplingParams(mode="isd", stride=stride, temperature=0, max_tokens=max_tokens,
                                                   ignore_eos=True, stride_policy="fixed", branches=0))[0]
    k = stride - 1
    st, drafts = out.stats, out.stats["drafts"]
    assert st["tokens"] == max_tokens
    if rig == "always":
        # prefill commits 1 token and proposes K drafts; every verify round commits K + 1
        verify_rounds = -(-(max_tokens - 1) // (k + 1))
        assert st["forwards"] == 1 + verify_rounds and st["cold_rounds"] == 1
        assert drafts["proposed"] == [verify_rounds] * k and drafts["accepted"] == [verify_rounds] * k
        assert drafts["acceptance"] == [1.0] * k
        assert out.token_sources == ([TokenSource.TARGET] + ([TokenSource.DRAFT] * k + [TokenSource.TARGET])
                                     * verify_rounds)[:max_tokens]
    else:
        # every verify round rejects draft 1, commits one correction; the next round is cold
        assert st["forwards"] == max_tokens and st["tokens_per_forward"] == 1.0
        assert drafts["accepted"] == [0] * k and drafts["reached"] == [st["verify_rounds"]] + [0] * (k - 1)
        assert st["verify_rounds"] + st["cold_rounds"] == max_tokens
        assert set(out.token_sources[1:]) <= {TokenSource.CORRECTION, TokenSource.TARGET}
    assert llm.engine.stats.drafts.proposed == drafts["proposed"]


REFERENCE_YAML = """\
block_size: 7
gen_block_size: 4
temperature: 1.0
top_k: 50
top_p: 0.95
use_spec_verify: true
"""


def test_reference_yaml_loads_and_runs(idlm_dir, tmp_path, capsys):
    path = tmp_path / "decoding.yaml"
    path.write_text(REFERENCE_YAML)
    fields = load_decoding_config(path)
    assert fields == {"stride": 4, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "spec_verify": True}
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=2048)
    out = llm.generate([[2, 3, 4]], SamplingParams(mode="isd", seed=1, max_tokens=16, **fields))[0]
    assert out.stats["tokens"] == 16 or out.finish_reason == "stop"
    code = main(["generate", "x", "--model", str(idlm_dir), "--decoding-config", str(path), "--max-tokens", "8",
                 "--prompt-ids", "2,3,4", "--stats", "--stride-policy", "fixed", "--ignore-eos"])  # drafts every round
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tokens/forward" in captured.err and "acceptance by position" in captured.err
    lossy = tmp_path / "lossy.yaml"
    lossy.write_text(REFERENCE_YAML + "verify_alpha: 0.5\nconditional_lora: true\n")
    fields = load_decoding_config(lossy)
    assert fields["mode"] == "risd" and SamplingParams(**fields).lossy


@pytest.mark.parametrize("text, fragment", [
    ("gen_block_size: 4\nbeam_width: 3\n", "unknown key 'beam_width'"),
    ("gen_block_size: 4\nblock_size: 5\n", "does not match gen_block_size"),
    ("gen_block_size: 17\n", "stride must be an integer from 2 to 16"),
    ("- 1\n- 2\n", "must be a mapping"),
])
def test_bad_decoding_config(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment):
        load_decoding_config(path)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"stride": 1}, "stride must be an integer from 2 to 16"),
    ({"stride": 17}, "stride must be an integer from 2 to 16"),
    ({"mode": "fast"}, "unknown mode 'fast'"),
    ({"proposal": "beam"}, "unknown proposal 'beam'"),
    ({"verify_alpha": 0}, "verify_alpha must be > 0"),
])
def test_bad_decoding_params(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_isd_without_mask_token_is_a_clear_error(model_dirs, capsys):
    folder, _ = model_dirs["llama"]
    llm = LLM(str(folder), progress=False, kv_cache_tokens=1024)
    with pytest.raises(ValueError, match="mode isd needs an I-DLM checkpoint with a MASK token"):
        llm.generate([[5, 6]], SamplingParams(mode="isd"))
    code = main(["generate", "the cat", "--model", str(folder), "--mode", "isd"])
    assert code == 1 and "needs an I-DLM checkpoint" in capsys.readouterr().err


def test_adapter_for_another_base_is_a_clear_error(model_dirs, idlm_dir, tmp_path):
    adapter = make_random_adapter(idlm_dir, tmp_path / "small_adapter")
    folder, _ = model_dirs["llama"]
    with pytest.raises(ValueError, match="trained for a different base model"):
        LLM(str(folder), adapter=str(adapter), progress=False, kv_cache_tokens=1024)
    stripped = tmp_path / "stripped"
    shutil.copytree(adapter, stripped)
    cfg = (stripped / "adapter_config.json").read_text().replace('"base_shape"', '"unused"')
    (stripped / "adapter_config.json").write_text(cfg)
    with pytest.raises(ValueError, match="has shape .* needs"):
        LLM(str(folder), adapter=str(stripped), progress=False, kv_cache_tokens=1024)
    with pytest.raises(ValueError, match="not a folder"):
        LLM(str(folder), adapter=str(tmp_path / "nope"), progress=False, kv_cache_tokens=1024)


def test_introspective_acceptance_rate(tmp_path):
    from idlm.eval.introspection import introspective_acceptance

    good = LLM(str(make_small_idlm(tmp_path / "good", spread=0.1)), progress=False, kv_cache_tokens=4096)
    poor = LLM(str(make_small_idlm(tmp_path / "poor", spread=0.4)), progress=False, kv_cache_tokens=4096)
    prompts = [[2, 3, 4, 5], [6, 7], [8, 9, 10, 2, 3]] * 4
    sampled = SamplingParams(mode="isd", stride=4, temperature=1.0, max_tokens=24, ignore_eos=True, seed=0)
    ar = introspective_acceptance(good, prompts, SamplingParams(mode="ar", temperature=1.0, max_tokens=24,
                                                                ignore_eos=True, seed=0))
    assert ar.alpha == pytest.approx(1.0, abs=1e-5) and ar.draft_tokens == 0
    hi, lo = introspective_acceptance(good, prompts, sampled), introspective_acceptance(poor, prompts, sampled)
    assert hi.draft_tokens > 50 and lo.draft_tokens > 0
    assert 0 < lo.alpha_draft < hi.alpha_draft <= 1 and lo.alpha < hi.alpha
    assert hi.tokens_per_forward > lo.tokens_per_forward


def test_greedy_rounds_draw_only_acceptance_uniforms(idlm_dir, monkeypatch):
    """An argmax ignores the target and draft uniforms, so greedy rounds must not compute them
    (on a GPU each draw is a kernel launch in every round); sampled rounds still draw all three."""
    import idlm.decoding.rounds as rounds
    from idlm.decoding.noise import Stream

    streams = []
    original = rounds.uniform
    monkeypatch.setattr(rounds, "uniform", lambda s, p, stream: streams.append(stream) or original(s, p, stream))
    llm = LLM(str(idlm_dir), progress=False)
    llm.generate([[5, 6, 7]], SamplingParams(mode="isd", stride=3, temperature=0, max_tokens=12, ignore_eos=True,
                                             stride_policy="fixed"))
    assert set(streams) <= {Stream.ACCEPT}
    streams.clear()
    llm.generate([[5, 6, 7]], SamplingParams(mode="isd", stride=3, temperature=1, seed=1, max_tokens=12,
                                             ignore_eos=True))
    assert {Stream.TARGET, Stream.DRAFT} <= set(streams)


def test_widened_lora_equals_the_two_weight_path(idlm_dir, tmp_path):
    """GPU engines stack A under the base weight (GatedLoRA.widen): the same projection as the
    two-weight path, clean rows still the base model's; ungated forwards use the base rows alone."""
    from idlm.models.lora import fuse_for_inference, widen_for_inference

    adapter = make_random_adapter(idlm_dir, tmp_path / "adapter")
    base = load_model(idlm_dir, torch.float32, "cpu", progress=False)
    two = load_model(idlm_dir, torch.float32, "cpu", progress=False)
    wide = load_model(idlm_dir, torch.float32, "cpu", progress=False)
    for model in (two, wide):
        load_adapter(model, adapter)
        fuse_for_inference(model)
    widen_for_inference(wide)
    loras = [m for m in wide.modules() if getattr(m, "wide_weight", None) is not None]
    assert len(loras) == 4 * len(wide.model.layers)
    layer = wide.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.data_ptr() == layer.self_attn.qkv_lora.wide_weight.data_ptr()
    ids, gate, pos = clean_then_mask_rows()
    with torch.no_grad():
        plain = base(ids, pos, DenseAttention())
        by_two = two(ids, pos, DenseAttention(), lora_gate=gate)
        by_wide = wide(ids, pos, DenseAttention(), lora_gate=gate)
        ungated = wide(ids, pos, DenseAttention())
    assert torch.equal(ungated, plain)
    torch.testing.assert_close(by_wide[0, :5], plain[0, :5], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_wide, by_two, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(by_wide[0, 5:], plain[0, 5:])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on the CPU need triton and "
                    "TRITON_INTERPRET=1 (the GPU check is benchmarks/check_triton_lora.py)")
def test_widened_lora_kernel_in_the_interpreter():
    """gated_lora_finish against GatedLoRA's PyTorch delta: ungated rows are the base columns bit for
    bit, gated rows within float32 rounding, at decode row counts and SmolLM2's projection shapes."""
    pytest.importorskip("triton")
    import torch.nn.functional as F

    from idlm.kernels.triton_lora import gated_lora_finish
    from idlm.models.lora import GatedLoRA

    gen = torch.Generator().manual_seed(0)
    for k, sizes, rank in [(576, [576, 192, 192], 24), (576, [1536, 1536], 24), (1536, [576], 24), (64, [64], 4)]:
        lora = GatedLoRA(k, sizes, rank, 2.0)
        with torch.no_grad():
            for p in lora.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * k ** -0.5)
        lora.fuse_for_inference()
        for rows in (1, 7, 17):
            x, base = torch.randn(rows, k, generator=gen), torch.randn(rows, sum(sizes), generator=gen)
            gate = torch.tensor([i % 3 != 0 for i in range(rows)], dtype=torch.float32)
            got = gated_lora_finish(torch.cat([base, F.linear(x, lora.lora_A)], 1), lora.fused_B, gate)
            assert got.is_contiguous() and torch.equal(got[gate == 0], base[gate == 0])
            if gate.any():
                torch.testing.assert_close(got[gate != 0], (base + lora(x, gate))[gate != 0], rtol=1e-5, atol=1e-5)


def test_engine_draft_counters_are_the_sum_of_the_requests(tmp_path):
    """The engine tallies a step's rounds by kind before adding them to its counters and the
    stride policy's; the totals are the sums of every request's own counts, per mode too."""
    folder = make_small_idlm(tmp_path / "m", spread=0.3, vocab=12)
    llm = LLM(str(folder), progress=False, kv_cache_tokens=4096)
    prompts = [[2 + i % 9, 3, 4 + i % 5] for i in range(12)]
    params = [SamplingParams(mode="isd" if i % 4 else "ar", stride=2 + i % 5, temperature=0.0 if i % 2 else 1.0,
                             seed=i, max_tokens=20 + i, ignore_eos=True, stride_policy="fixed") for i in range(12)]
    outs = llm.generate(prompts, params)

    def summed(counts: list[list[int]]) -> list[int]:
        return [sum(c[j] for c in counts if j < len(c)) for j in range(max(map(len, counts)))]

    for key in ("proposed", "reached", "accepted"):
        want = summed([o.stats["drafts"][key] for o in outs])
        assert sum(want) > 0 and getattr(llm.engine.stats.drafts, key) == want
        assert getattr(llm.engine.policy.engine_counts["isd"], key) == want  # (the ar requests draft nothing)
