"""Paged attention for several query tokens per sequence, in Triton (GPU).

One program handles one (sequence, KV head, query tile, KV split). Its tile packs the sequence's
query tokens with the query heads of that KV head's group (rows = tokens x group), so each K/V
tile read from the paged cache serves every head that shares it; a decode step's 1 to 64 rows
fit one or two query tiles, a prefill chunk is cut into many (each reads keys only up to its
last query). Query row i of a sequence sits at slot context_len - query_len + i and attends
to cached slots <= its own (causal among the new tokens, full over the past); inside a
round's tree (the last tree_rows slots of the sequence) only to the tree rows set in its
visibility bits. With few programs for the chip, the KV axis is split and a second
kernel merges the partial softmaxes. The PyTorch `PagedAttention` is the oracle.
"""

from functools import lru_cache

import torch
import triton
import triton.language as tl

NUM_SMS_FALLBACK = 132
MAX_TILE_ROWS = 128  # query rows (tokens x GQA group) per program


@triton.jit
def _paged_attention(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, query_start_ptr, context_lens_ptr, tree_bits_ptr, tree_rows_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ot, stride_oh,
    stride_bt,
    num_splits, num_heads,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TREE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2) % num_splits
    q_tile = tl.program_id(2) // num_splits
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    if q_tile * BLOCK_M >= q_len * GROUP:
        return

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = token < q_len
    q_pos = ctx - q_len + token
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    if TREE:
        tree_start = ctx - tl.load(tree_rows_ptr + seq)
        bits = tl.load(tree_bits_ptr + q_start + token, mask=row_ok, other=-1)

    per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    last_query = ctx - q_len + tl.minimum(q_len, ((q_tile + 1) * BLOCK_M - 1) // GROUP + 1)  # later keys are masked
    hi = tl.minimum(tl.minimum(ctx, last_query), lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(block_tables_ptr + seq * stride_bt + n // PAGE, mask=n_ok, other=0)
        offset = page.to(tl.int64) * stride_kb + (n % PAGE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptr + offset[None, :] + dims[:, None], mask=n_ok[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=PRECISION) * scale
        allowed = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if TREE:
            rel = n - tree_start
            seen = (bits[:, None] >> tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)[None, :]) & 1
            allowed = allowed & ((rel < 0)[None, :] | (seen == 1))
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offset[:, None] + dims[None, :], mask=n_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    t = q_start + token
    if num_splits == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (t * num_heads + head) * num_splits + split  # [tokens, heads, splits] partials
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits(
    out_ptr, part_acc_ptr, part_ml_ptr, stride_ot, stride_oh, num_heads, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    s_ok = s < num_splits
    base = (t * num_heads + h) * num_splits
    m = tl.load(part_ml_ptr + (base + s) * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + (base + s) * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * HEAD_DIM + dims[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@lru_cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else NUM_SMS_FALLBACK


def choose_splits(batch: int, kv_heads: int, max_context: int, block_n: int, device: torch.device) -> int:
    """Enough programs to fill the chip when the batch is small and the context long."""
    sms = multiprocessors(device)
    programs = batch * kv_heads
    if programs >= sms or max_context <= 4 * block_n:
        return 1
    return max(1, min(-(-2 * sms // programs), max_context // (4 * block_n), 64))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, max_context_len: int,
                    scale: float | None = None, num_splits: int | None = None, block_n: int | None = None,
                    num_warps: int = 8, num_stages: int = 3, tree_bits: torch.Tensor | None = None,
                    tree_rows: torch.Tensor | None = None) -> torch.Tensor:
    """q [tokens, heads, dim]; caches [blocks, page, kv_heads, dim]; block_tables [batch, max_blocks]
    (int32); query_start [batch + 1] and context_lens [batch] (int32, on the device); tree_bits
    [tokens] (int64) and tree_rows [batch] (int32) as in attention.PagedBatch, or None (causal)."""
    tokens, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    batch = context_lens.shape[0]
    block_m = min(MAX_TILE_ROWS, max(16, triton.next_power_of_2(max_query_len * group)))
    q_tiles = -(-max_query_len * group // block_m)
    block_n = block_n or 64
    splits = 1 if q_tiles > 2 else num_splits or choose_splits(batch, kv_heads, max_context_len, block_n, q.device)
    out = torch.empty_like(q)
    if splits > 1:
        part_acc = torch.empty(tokens * heads * splits, dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(tokens * heads * splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = torch.empty(1, dtype=torch.float32, device=q.device)  # unused
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _paged_attention[(batch, kv_heads, splits * q_tiles)](
        q, k_cache, v_cache, out, part_acc, part_ml,
        block_tables, query_start, context_lens,
        tree_bits if tree_bits is not None else query_start, tree_rows if tree_rows is not None else query_start,
        scale if scale is not None else dim ** -0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        splits, heads,
        GROUP=group, PAGE=page, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
        TREE=tree_bits is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits[(tokens, heads)](out, part_acc, part_ml, out.stride(0), out.stride(1), heads, splits,
                                       HEAD_DIM=dim, SPLITS=triton.next_power_of_2(splits))
    return out
