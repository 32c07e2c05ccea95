"""The fixed reduction splits of deterministic (batch-invariant) mode, in plain Python.

A kernel that splits a reduction (the K axis of a matmul, the key axis of attention) to fill the
GPU usually picks the split from the batch: fewer rows, more splits. Each split sums its part and
the parts are then added, so the rounding of a row's result depends on how many rows shared the
launch. In deterministic mode the splits are *chunks at fixed positions*: the K axis of a weight
is cut into chunks that depend only on the weight's shape, the key axis into chunks of KV_CHUNK
keys counted from position 0. Each chunk is reduced from zero, and the chunks are combined one
after the other in order. Whether a launch gives each chunk its own program (partials in memory,
then a second kernel combines them) or walks the chunks in one program is then only a question of
speed: both do the same arithmetic, so the kernels may still choose by batch size.

The Triton kernels (`batch_invariant.py`, `triton_attention.py`) call the plans below;
`chunked_attention` is the same attention in PyTorch, one row at a time, the reference the CPU
tests check against the oracle.
"""

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

KV_CHUNK = 256  # keys per attention chunk: chunk c holds key positions [c * KV_CHUNK, (c + 1) * KV_CHUNK)
MATMUL_BLOCK_N = 64  # output columns per matmul program
MATMUL_BLOCK_K = 64  # K per tl.dot step
MATMUL_TARGET_PROGRAMS = 256  # a weight is split along K until about this many programs cover it at M <= 64
MATMUL_MIN_CHUNK_BLOCKS = 4  # no K chunk shorter than this many BLOCK_K steps
MATMUL_SPLIT_MIN_ELEMENTS = 1 << 22  # smaller weights are read fast enough whole (and a split costs a launch)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache
def matmul_chunks(n: int, k: int) -> tuple[int, int]:
    """(chunk_k, num_chunks) of the K axis of an [n, k] weight: a function of its shape only."""
    k_blocks = cdiv(k, MATMUL_BLOCK_K)
    chunks = 1
    if n * k >= MATMUL_SPLIT_MIN_ELEMENTS:
        chunks = max(1, min(cdiv(MATMUL_TARGET_PROGRAMS, cdiv(n, MATMUL_BLOCK_N)), k_blocks // MATMUL_MIN_CHUNK_BLOCKS))
    chunk_blocks = cdiv(k_blocks, chunks)
    return chunk_blocks * MATMUL_BLOCK_K, cdiv(k_blocks, chunk_blocks)


def kv_chunk_plan(wanted_splits: int, max_context: int, chunk: int = KV_CHUNK) -> tuple[int, int, int]:
    """(programs per row tile along the keys, chunks each program takes, chunks in all) when a
    launch would like `wanted_splits` programs (1: one program walks every chunk)."""
    total = cdiv(max(max_context, 1), chunk)
    splits = max(1, min(wanted_splits, total))
    per_split = cdiv(total, splits)
    return cdiv(total, per_split), per_split, total


def combine(m_a: torch.Tensor, l_a: torch.Tensor, acc_a: torch.Tensor, m_b: torch.Tensor, l_b: torch.Tensor,
            acc_b: torch.Tensor):
    """Two partial softmaxes (running max m, sum l, weighted values acc) as one: the kernels' rule."""
    m = torch.maximum(m_a, m_b)
    m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)
    w_a, w_b = torch.exp(m_a - m_safe), torch.exp(m_b - m_safe)
    return m, l_a * w_a + l_b * w_b, acc_a * w_a[..., None] + acc_b * w_b[..., None]


def chunked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                      block_n: int = 64, chunk: int = KV_CHUNK) -> torch.Tensor:
    """One query row the way the deterministic kernel computes it: q [heads, dim]; keys, values
    [ctx, heads, dim] (the row's sequence, by position; GQA already expanded); visible [ctx] bool.
    Keys go in blocks of block_n inside chunks of KV_CHUNK (online softmax from zero per chunk),
    and the chunks are combined in order."""
    heads, dim = q.shape
    scale = dim ** -0.5
    q = q.float()
    pad = -keys.shape[0] % block_n  # the kernel's blocks are always block_n wide, the tail masked
    keys, values = F.pad(keys, (0, 0, 0, 0, 0, pad)), F.pad(values, (0, 0, 0, 0, 0, pad))
    visible = F.pad(visible, (0, pad), value=False)
    big_m = torch.full((heads,), -math.inf)
    big_l, big_acc = torch.zeros(heads), torch.zeros(heads, dim)
    for c0 in range(0, keys.shape[0], chunk):
        m, l_sum, acc = torch.full((heads,), -math.inf), torch.zeros(heads), torch.zeros(heads, dim)
        for s in range(c0, min(c0 + chunk, keys.shape[0]), block_n):
            k = keys[s:s + block_n].float().transpose(0, 1)  # [heads, n, dim]
            v = values[s:s + block_n].float().transpose(0, 1)
            scores = torch.einsum("hd,hnd->hn", q, k) * scale
            scores = scores.masked_fill(~visible[s:s + block_n][None], -math.inf)
            m_new = torch.maximum(m, scores.max(1).values)
            m_safe = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
            p = torch.exp(scores - m_safe[:, None])
            alpha = torch.exp(m - m_safe)
            l_sum = l_sum * alpha + p.sum(1)
            acc = acc * alpha[:, None] + torch.einsum("hn,hnd->hd", p, v)
            m = m_new
        big_m, big_l, big_acc = combine(big_m, big_l, big_acc, m, l_sum, acc)
    return big_acc / torch.where(big_l == 0, torch.ones_like(big_l), big_l)[:, None]
