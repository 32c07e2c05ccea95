"""idlm's per-row CPU steps (kernels/row_ops.py, csrc/row_ops.cpp): each against PyTorch's ops,
and each row's bits independent of the rows that share the call."""

import pytest
import torch
import torch.nn.functional as F
from helpers import paged_batch

from idlm.kernels import row_ops
from idlm.kernels.row_attention import RowExactPagedAttention
from idlm.models.transformer import apply_rotary

pytestmark = pytest.mark.skipif(row_ops.row_ops() is None, reason="idlm's CPU kernels did not build here")


def rows_alone_equal(fn, x: torch.Tensor) -> bool:
    full = fn(x)
    return all(torch.equal(fn(x[i:i + 1])[0], full[i]) for i in range(len(x)))


@pytest.mark.parametrize("width", [576, 13])
def test_norms_and_silu_match_pytorch(width):
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 5, width, generator=gen), torch.randn(2, 5, width, generator=gen)
    weight = torch.randn(width, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(row_ops.rms_norm(x, weight, 1e-5), torch.rms_norm(x, (width,), weight, 1e-5))
        normed, total = row_ops.add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(total, residual + x)
        torch.testing.assert_close(normed, torch.rms_norm(residual + x, (width,), weight, 1e-5))
        gate_up = 6 * torch.randn(7, 2 * width, generator=gen)
        act, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(row_ops.silu_mul(gate_up), F.silu(act) * up, rtol=1e-6, atol=1e-6)
        # the tails of the exponential's range: silu(-100) ~ -0, silu(100) = 100
        edge = torch.tensor([[-100.0, 100.0, -88.0, 0.0, 100.0, 1.0, 1.0, 1.0]])
        torch.testing.assert_close(row_ops.silu_mul(edge), F.silu(edge[:, :4]) * edge[:, 4:])
        flat = x.view(-1, width)
        assert rows_alone_equal(lambda a: row_ops.rms_norm(a, weight, 1e-5), flat)
        assert rows_alone_equal(lambda a: row_ops.silu_mul(a), gate_up)


def test_row_ops_only_without_autograd():
    x = torch.randn(3, 8)
    assert not row_ops.applies(x)  # (tests run with grad on: training's forwards keep PyTorch's ops)
    with torch.no_grad():
        assert row_ops.applies(x) and not row_ops.applies(x.bfloat16())


@pytest.mark.parametrize("dim", [64, 12])
def test_rope_attend_matches_the_row_exact_ops(dim):
    """One call (rotary, cache writes, attention) against RowExactPagedAttention's PyTorch ops on
    the rotated q and k, for prefix rows, a draft tree's rows and rows that write nothing; the new
    cache equal bit for bit (rotary is the same three ops per element); each row's output the
    same bits alone, first in a round and in a batch."""
    gen = torch.Generator().manual_seed(1)
    block, heads, kv_heads = 8, 6, 2
    cache = torch.randn(2, 2, 30, block, kv_heads, dim, generator=gen)
    width = (heads + 2 * kv_heads) * dim

    def run(seqs, qkv, tree=None, unwritten=()):
        batch = paged_batch(seqs, block, tree)
        for row in unwritten:
            batch.slot_mapping[row] = -1
            batch.all_written = False
        positions = torch.cat([torch.arange(ctx - rows, ctx) for ctx, rows, _ in seqs])
        angles = positions[:, None].float() * torch.linspace(1.0, 1e-3, dim // 2)[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        with torch.no_grad():
            kv_ours, kv_ref = cache.clone(), cache.clone()
            ours = RowExactPagedAttention(kv_ours, batch).attend_packed(1, qkv, cos, sin, heads)
            q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
            q = apply_rotary(q.reshape(-1, heads, dim), cos, sin)
            k = apply_rotary(k.reshape(-1, kv_heads, dim), cos, sin)
            ref = RowExactPagedAttention(kv_ref, batch)(1, q, k, v.reshape(-1, kv_heads, dim))
        assert torch.equal(kv_ours, kv_ref)
        torch.testing.assert_close(ours, ref.reshape(len(qkv), -1), rtol=1e-5, atol=1e-5)
        return ours

    qkv = torch.randn(20, width, generator=gen)
    run([(37, 1, [3, 4, 5, 6, 7])], qkv[:1])
    # a 7-row round whose last 4 rows are a tree (row i sees tree rows set in its bits)
    tree = [(4, [0b0001, 0b0011, 0b0101, 0b1011])]
    run([(33, 7, [3, 4, 5, 6, 7])], qkv[:7], tree)
    run([(33, 7, [3, 4, 5, 6, 7]), (12, 3, [9, 10])], qkv[:10], tree + [(0, [])], unwritten=(8,))
    alone = run([(40, 1, [3, 4, 5, 6, 7])], qkv[:1])
    in_round = run([(46, 7, [3, 4, 5, 6, 7, 8])], qkv[:7])
    batched = run([(20, 2, [11, 12, 13]), (46, 7, [3, 4, 5, 6, 7, 8])], torch.cat([qkv[10:12], qkv[:7]]))
    assert torch.equal(alone[0], in_round[0]) and torch.equal(alone[0], batched[2])


def test_gated_lora_add_touches_gated_rows_only():
    """The gated LoRA's delta (kernels/row_ops.py): on gated rows out + (x A^T) B^T, the others out's
    own bits; each gated row the same bits alone."""
    gen = torch.Generator().manual_seed(3)
    x, out = torch.randn(5, 96, generator=gen), torch.randn(5, 300, generator=gen)
    lora_a, lora_b = torch.randn(24, 96, generator=gen), torch.randn(300, 24, generator=gen)
    gate = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        got = row_ops.gated_lora_add(out, x, lora_a, lora_b, gate)
        want = out + (x @ lora_a.t()) @ lora_b.t() * gate[:, None]
    assert torch.equal(got[gate == 0], out[gate == 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for i in (1, 3, 4):
        assert torch.equal(row_ops.gated_lora_add(out[i:i + 1], x[i:i + 1], lora_a, lora_b, gate[i:i + 1])[0], got[i])
