"""The rotary + KV-write kernel (kernels/triton_rope_kv.py) against apply_rotary and the paged
writer, in Triton's interpreter on the CPU (on the GPU every Triton-attention forward runs it)."""

import os

import pytest
import torch

from idlm.kernels.attention import PagedBatch, TritonPagedAttention
from idlm.models.transformer import apply_rotary

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels on the CPU need triton and TRITON_INTERPRET=1")


def qkv_rows(tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator):
    """q, k, v as views into one qkv row per token, as the attention layer splits them, and the
    rotary's cos/sin of arbitrary positions."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    positions = torch.randint(0, 4000, (tokens,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = (positions.float()[:, None] * inv_freq).repeat(1, 2)
    return (q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim),
            angles.cos(), angles.sin())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(6, 2, 16), (9, 3, 64), (4, 4, 32)])
def test_rope_write_kv_equals_rotary_then_write(dtype, heads, kv_heads, dim):
    pytest.importorskip("triton")
    from idlm.kernels.triton_rope_kv import rope_write_kv, supports

    gen = torch.Generator().manual_seed(heads * dim)
    tokens, blocks, page = 13, 8, 4
    q, k, v, cos, sin = qkv_rows(tokens, heads, kv_heads, dim, dtype, gen)
    assert supports(q, k, v, cos)
    slots = torch.randperm(blocks * page, generator=gen)[:tokens]
    slots[[2, 7]] = -1  # padding rows write nothing
    cache = torch.randn(2, blocks, page, kv_heads, dim, generator=gen).to(dtype)
    want = cache.clone()
    written = slots >= 0
    want[0].view(-1, kv_heads, dim)[slots[written]] = apply_rotary(k, cos, sin)[written]
    want[1].view(-1, kv_heads, dim)[slots[written]] = v[written]
    got = cache.clone()
    q_out = rope_write_kv(q, k, v, cos, sin, slots, got[0], got[1])
    # float32 arithmetic as apply_rotary's; a fused multiply-add may differ in the last float32 bit
    tol = dict(atol=0, rtol=0) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.bfloat16:  # at most one bf16 step where float32 rounding lands on a tie
        tol = dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(q_out, apply_rotary(q, cos, sin), **tol)
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(got[1], want[1])  # v is copied, not computed
    untouched = torch.ones(blocks * page, dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.equal(got[0].view(-1, kv_heads, dim)[untouched], cache[0].view(-1, kv_heads, dim)[untouched])


def test_the_fused_layer_rotates_and_writes_as_the_unfused_one(monkeypatch):
    """TritonPagedAttention.rotate_and_attend (one kernel for rotary and the write) hands the
    attention kernel the q and the cache that rotary, the paged write and then the attention
    kernel get. (The attention kernel itself is stubbed: it does not run in this interpreter.)"""
    pytest.importorskip("triton")
    seen = []
    monkeypatch.setattr(TritonPagedAttention, "_attend", lambda self, q, k_cache, v_cache: seen.append(q) or q)
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, page, blocks, tokens = 6, 2, 16, 4, 6, 9
    slots = torch.randperm(blocks * page, generator=gen)[:tokens]
    slots[4] = -1
    q, k, v, cos, sin = qkv_rows(tokens, heads, kv_heads, dim, torch.float32, gen)
    batch = PagedBatch(slot_mapping=slots, query_start=[0, tokens], context_lens=torch.tensor([tokens]),
                       block_tables=torch.arange(blocks, dtype=torch.int32)[None], max_context_len=tokens,
                       max_query_len=tokens, all_written=False, query_start_device=torch.tensor([0, tokens]))
    cache = torch.randn(2, 1, blocks, page, kv_heads, dim, generator=gen)
    fused_cache, plain_cache = cache.clone(), cache.clone()
    TritonPagedAttention(fused_cache, batch).rotate_and_attend(0, q, k, v, cos, sin)
    TritonPagedAttention(plain_cache, batch)(0, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_cache, plain_cache, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fused_cache, cache)
