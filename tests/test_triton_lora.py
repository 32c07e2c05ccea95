"""The gated LoRA's fused consumer (kernels/triton_lora.py: gated_silu_mul) against GatedLoRA's
PyTorch path followed by the plain silu_mul, in Triton's
interpreter on the CPU, in float32: the interpreter's bfloat16 dot is wrong (gated_lora_finish's
too), so bfloat16 is checked on the GPU (benchmarks/check_triton_lora.py)."""

import os

import pytest
import torch
import torch.nn.functional as F

from idlm.models.lora import GatedLoRA
from idlm.models.transformer import silu_mul

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels on the CPU need triton and TRITON_INTERPRET=1")


def widened(in_features: int, sizes: list[int], rank: int, dtype: torch.dtype, gen: torch.Generator):
    lora = GatedLoRA(in_features, sizes, rank, scaling=2.0)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * in_features ** -0.5)
    lora = lora.to(dtype)
    lora.fuse_for_inference()
    linear = torch.nn.Linear(in_features, sum(sizes), bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * in_features ** -0.5)
    lora.widen(linear)
    return lora, linear


def finished(lora: GatedLoRA, linear, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The projection as gated_lora_finish rounds it: bf16(base + delta) on gated rows, base on the others."""
    wide = F.linear(x, lora.wide_weight)
    n = lora.fused_B.shape[0]
    base, low = wide[..., :n], wide[..., n:]
    delta = F.linear(low.float() * gate[..., None].float(), lora.fused_B.float())
    return torch.where(gate[..., None] != 0, (base.float() + delta).to(base.dtype), base), wide


def gates(rows: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    gate = (torch.rand(rows, generator=gen) < 0.5).to(dtype)
    gate[0], gate[-1] = 0, 1
    return gate


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_gated_silu_mul_is_finish_then_silu_mul(rows):
    from idlm.kernels.triton_lora import gated_silu_mul

    dtype, gen = torch.float32, torch.Generator().manual_seed(rows)
    lora, linear = widened(48, [80, 80], 12, dtype, gen)
    x = torch.randn(rows, 48, generator=gen).to(dtype)
    gate = gates(rows, gen, dtype)
    projection, wide = finished(lora, linear, x, gate)
    want = silu_mul(projection.float())
    got = gated_silu_mul(wide, lora.fused_B, gate)
    assert got.shape == (rows, 80) and got.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.float(), want, **tol)
    # without the delta the gated rows would be off by far more than the tolerance
    assert (silu_mul(wide[:, :160].float())[gate != 0] - want[gate != 0]).abs().max() > 10 * tol["atol"]


def tiny_lora_model(ungated_too: bool = True):
    """A 2-layer Llama with a random gated LoRA, fused and widened as a GPU engine's (float32)."""
    from idlm.models.config import ModelConfig
    from idlm.models.lora import AdapterConfig, attach_lora, fuse_for_inference, widen_for_inference
    from idlm.models.transformer import CausalLM

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=80, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=12, rms_norm_eps=1e-6, rope_theta=10000.0,
                      rope_scaling=None, max_position_embeddings=128, tie_word_embeddings=False, qkv_bias=False,
                      o_bias=False, mlp_bias=False, qk_norm=False, bos_token_id=None, eos_token_ids=(0,),
                      mask_token_id=None, draft_block=None)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    attach_lora(model, AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if "_lora." in name else 0.2) + (1.0 if "norm" in name else 0.0))
    fuse_for_inference(model)
    widen_for_inference(model, ungated_too)
    return model


def test_a_model_whose_gate_up_delta_is_added_by_silu_mul_is_the_same_model(monkeypatch):
    """The wiring: with GatedLoRA.leaves_delta_to_consumer() true (as on a GPU), gate_up's delta is
    added by gated_silu_mul; the forward's hidden states are the forward's where every projection
    finishes its own delta (float32, the interpreter)."""
    import idlm.kernels.triton_lora as kernels
    from idlm.kernels.attention import DenseAttention

    model = tiny_lora_model()
    cfg = model.cfg
    ids = torch.randint(0, 64, (1, 9))
    positions = torch.arange(9)[None]
    gate = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        want = model(ids, positions, DenseAttention(), gate)
        plain = model(ids, positions, DenseAttention(), None)
        fused = []
        real = kernels.gated_silu_mul
        monkeypatch.setattr(GatedLoRA, "leaves_delta_to_consumer", lambda self, x: self.wide_weight is not None)
        monkeypatch.setattr(kernels, "gated_silu_mul", lambda *args: fused.append(1) or real(*args))
        got = model(ids, positions, DenseAttention(), gate)
    assert len(fused) == cfg.num_layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - plain).abs().max() > 1e-2  # the deltas matter


@pytest.mark.parametrize("ungated_too", [True, False])
def test_a_step_without_gated_rows_runs_the_gated_steps_kernels(monkeypatch, ungated_too):
    """A step without gated rows (gate None, as an `ar` step) has the bits of a gated step's clean
    rows (a gate of zeros): the same [W; A] GEMMs, the base columns kept, and the same silu_mul
    kernel. With ungated_too=False (IDLM_WIDE_UNGATED=0) it runs the base weight and the plain
    silu_mul instead, so the spies see neither."""
    import idlm.kernels.triton_lora as kernels
    from idlm.kernels.attention import DenseAttention

    model = tiny_lora_model(ungated_too)
    monkeypatch.setattr(GatedLoRA, "leaves_delta_to_consumer", lambda self, x: self.wide_weight is not None)
    wide = {id(m.wide_weight) for m in model.modules() if isinstance(m, GatedLoRA)}
    consumer, wide_gemms = [], []
    real_silu, real_linear = kernels.gated_silu_mul, F.linear
    monkeypatch.setattr(kernels, "gated_silu_mul", lambda *args: consumer.append(args[2]) or real_silu(*args))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: wide_gemms.append(id(w) in wide) or real_linear(x, w, b))
    ids = torch.randint(0, 64, (1, 9))
    positions = torch.arange(9)[None]
    with torch.no_grad():
        zeros = model(ids, positions, DenseAttention(), torch.zeros(1, 9))
        assert sum(wide_gemms) == len(wide) == 4 * model.cfg.num_layers
        wide_gemms.clear()
        consumer.clear()
        none = model(ids, positions, DenseAttention(), None)
    if ungated_too:
        assert consumer == [None] * model.cfg.num_layers
        assert sum(wide_gemms) == len(wide)  # every projection's GEMM as wide as in the gated step
        assert torch.equal(none, zeros)
    else:
        assert consumer == [] and sum(wide_gemms) == 0
