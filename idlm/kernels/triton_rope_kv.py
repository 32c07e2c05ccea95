"""Rotary embedding of q and k and the paged KV write in one Triton kernel (CUDA inference).

Eagerly, or as compiled elementwise kernels inside the decode graphs, a layer spends four
launches here: rotate q, rotate k, copy k into the cache, copy v into the cache. A decode step of
a small model is a few rows, so each launch costs more than its arithmetic: on an H200 the 60
rotary and 62 `index_copy` launches of a SmolLM2 step took 0.26-0.35 ms of its GPU time
(benchmarks/RESULTS.md, "Overlap scheduling on the GPU"). One program per token row here rotates
its q heads into a new q and writes its rotated k and its v into the cache slot of the row (a
row whose slot is -1 writes nothing). The arithmetic is apply_rotary's, in float32: x * cos +
rotate_half(x) * sin, rounded once to the activations' dtype.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_write_kv(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_q, stride_k, stride_v, stride_cos, stride_q_out,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    half: tl.constexpr = HEAD_DIM // 2
    partner = (d + half) % HEAD_DIM  # rotate_half: [-x[half:], x[:half]]
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + row * stride_cos + d)[None, :]
    sin = tl.load(sin_ptr + row * stride_cos + d)[None, :]

    qh = tl.arange(0, BLOCK_QH)[:, None]
    q_ok = qh < NUM_Q_HEADS
    q_row = q_ptr + row * stride_q + qh * HEAD_DIM
    x = tl.load(q_row + d[None, :], mask=q_ok, other=0.0)
    x_rot = tl.load(q_row + partner[None, :], mask=q_ok, other=0.0).to(tl.float32) * sign[None, :]
    q_new = x.to(tl.float32) * cos + x_rot * sin
    tl.store(q_out_ptr + row * stride_q_out + qh * HEAD_DIM + d[None, :], q_new.to(x.dtype), mask=q_ok)

    slot = tl.load(slot_ptr + row).to(tl.int64)
    kh = tl.arange(0, BLOCK_KH)[:, None]
    kv_ok = (kh < NUM_KV_HEADS) & (slot >= 0)
    k_row = k_ptr + row * stride_k + kh * HEAD_DIM
    x = tl.load(k_row + d[None, :], mask=kv_ok, other=0.0)
    x_rot = tl.load(k_row + partner[None, :], mask=kv_ok, other=0.0).to(tl.float32) * sign[None, :]
    k_new = x.to(tl.float32) * cos + x_rot * sin
    cache_at = slot * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM + d[None, :]
    tl.store(k_cache_ptr + cache_at, k_new.to(x.dtype), mask=kv_ok)
    v = tl.load(v_ptr + row * stride_v + kh * HEAD_DIM + d[None, :], mask=kv_ok, other=0.0)
    tl.store(v_cache_ptr + cache_at, v, mask=kv_ok)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor) -> bool:
    """The kernel's layout: q, k, v [T, heads, D] with D a power of two and each head's D values
    contiguous (a row's heads may be a view into a wider row), and one cos/sin row per token."""
    head_dim = q.shape[-1]
    heads_ok = all(t.dim() == 3 and t.stride(-1) == 1 and t.stride(-2) == head_dim for t in (q, k, v))
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0 and heads_ok and cos.dim() == 2 and cos.stride(-1) == 1


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] (views into one qkv row are fine), cos and sin [T, D]
    float32, slots [T] (-1: write nothing), k_cache and v_cache [blocks, block_size, Hkv, D]
    contiguous. Writes the rotated k and v at their slots; returns the rotated q [T, Hq, D]."""
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty((tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens:
        _rope_write_kv[(tokens,)](
            q, k, v, cos, sin, slots, q_out, k_cache, v_cache,
            q.stride(0), k.stride(0), v.stride(0), cos.stride(0), q_out.stride(0),
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(num_kv_heads),
        )
    return q_out
