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

Deterministic mode (`kv_chunk`): the split above follows the batch (how many programs the chip
has room for) and the sequence's length, so a row's rounding changes with both. There, the keys
are cut into chunks of kv_chunk counted from position 0, each chunk's softmax starts from zero,
and the chunks are combined in position order, either within the program or by _merge_chunks
over stored partials, the same arithmetic (fixed_split.py); every tile has the same number of
rows. A key block a row cannot see adds exact zeros, so a row's bits depend only on its own
query and the keys it sees: not on its batch, its tile mates or the prefill chunk it is in.
"""

from functools import lru_cache

import torch
import triton
import triton.language as tl

from idlm.kernels.fixed_split import kv_chunk_plan

NUM_SMS_FALLBACK = 132
MAX_TILE_ROWS = 128  # query rows (tokens x GQA group) per program
INVARIANT_TILE_ROWS = 64  # deterministic mode: every tile this many rows, whatever the query length


@triton.jit
def _attend(q, q_pos, k_ptr, v_ptr, block_tables_ptr, seq, kv_head, lo, hi, scale, dims, bits, tree_start,
            m_i, l_i, acc, stride_kb, stride_ks, stride_kh, stride_bt,
            PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TREE: tl.constexpr):
    """Online softmax of the tile's rows over keys [lo, hi), in blocks of BLOCK_N from lo."""
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
    return m_i, l_i, acc


@triton.jit
def _combine(m_a, l_a, acc_a, m_b, l_b, acc_b):
    """Two partial softmaxes as one (fixed_split.combine is the same rule in PyTorch)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(m_a - m_safe)
    w_b = tl.exp(m_b - m_safe)
    return m, l_a * w_a + l_b * w_b, acc_a * w_a[:, None] + acc_b * w_b[:, None]


@triton.jit
def _tile_rows(query_start_ptr, context_lens_ptr, seq, kv_head, q_tile, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The rows (token x head of the group) of a query tile, and the keys the tile reads up to."""
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    last_query = ctx - q_len + tl.minimum(q_len, ((q_tile + 1) * BLOCK_M - 1) // GROUP + 1)  # later keys are masked
    return q_start, q_len, ctx, token, head, token < q_len, ctx - q_len + token, tl.minimum(ctx, last_query)


@triton.jit
def _paged_attention(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    block_tables_ptr, query_start_ptr, context_lens_ptr, tree_bits_ptr, tree_rows_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_ot, stride_oh,
    stride_bt,
    num_splits, num_heads, chunks_per_split, total_chunks,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TREE: tl.constexpr,
    CHUNK: tl.constexpr, CHUNK_PARTIALS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2) % num_splits
    q_tile = tl.program_id(2) // num_splits
    q_start, q_len, ctx, token, head, row_ok, q_pos, keys_end = _tile_rows(
        query_start_ptr, context_lens_ptr, seq, kv_head, q_tile, GROUP, BLOCK_M)
    if q_tile * BLOCK_M >= q_len * GROUP:
        return

    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    tree_start = ctx * 0
    bits = token.to(tl.int64) * 0
    if TREE:
        tree_start = ctx - tl.load(tree_rows_ptr + seq)
        bits = tl.load(tree_bits_ptr + q_start + token, mask=row_ok, other=-1)
    t = q_start + token

    if CHUNK == 0:  # the KV axis cut into num_splits equal parts of this sequence's context
        per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        m_i, l_i, acc = _attend(
            q, q_pos, k_ptr, v_ptr, block_tables_ptr, seq, kv_head, lo, tl.minimum(keys_end, lo + per_split), scale,
            dims, bits, tree_start, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), stride_kb, stride_ks, stride_kh, stride_bt,
            PAGE, BLOCK_N, PRECISION, TREE)
        if num_splits == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = (t * num_heads + head) * num_splits + split  # [tokens, heads, splits] partials
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:  # deterministic: chunks of CHUNK keys from position 0, each from zero, combined in order
        big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        big_l = tl.zeros([BLOCK_M], tl.float32)
        big_acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        first = split * chunks_per_split
        last = tl.minimum(first + chunks_per_split, tl.cdiv(keys_end, CHUNK))
        for c in range(first, last):
            m_c, l_c, acc_c = _attend(
                q, q_pos, k_ptr, v_ptr, block_tables_ptr, seq, kv_head, c * CHUNK,
                tl.minimum(keys_end, (c + 1) * CHUNK), scale, dims, bits, tree_start,
                tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
                tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), stride_kb, stride_ks, stride_kh, stride_bt,
                PAGE, BLOCK_N, PRECISION, TREE)
            if CHUNK_PARTIALS:  # chunk c of each row, for _merge_chunks
                part = ((t * num_heads + head) * total_chunks + c).to(tl.int64)
                tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc_c, mask=row_ok[:, None])
                tl.store(part_ml_ptr + part * 2, m_c, mask=row_ok)
                tl.store(part_ml_ptr + part * 2 + 1, l_c, mask=row_ok)
            else:
                big_m, big_l, big_acc = _combine(big_m, big_l, big_acc, m_c, l_c, acc_c)
        if CHUNK_PARTIALS:
            pass  # _merge_chunks combines them
        else:
            out = big_acc / tl.where(big_l == 0.0, 1.0, big_l)[:, None]
            tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_chunks(
    out_ptr, part_acc_ptr, part_ml_ptr, query_start_ptr, context_lens_ptr, stride_ot, stride_oh,
    num_heads, total_chunks,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    """The chunks of each row of a query tile, combined in order as _paged_attention does in one program."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_tile = tl.program_id(2)
    q_start, q_len, ctx, token, head, row_ok, q_pos, keys_end = _tile_rows(
        query_start_ptr, context_lens_ptr, seq, kv_head, q_tile, GROUP, BLOCK_M)
    if q_tile * BLOCK_M >= q_len * GROUP:
        return
    dims = tl.arange(0, HEAD_DIM)
    t = q_start + token
    big_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    big_l = tl.zeros([BLOCK_M], tl.float32)
    big_acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for c in range(0, tl.cdiv(keys_end, CHUNK)):
        part = ((t * num_heads + head) * total_chunks + c).to(tl.int64)
        m_c = tl.load(part_ml_ptr + part * 2, mask=row_ok, other=float("-inf"))
        l_c = tl.load(part_ml_ptr + part * 2 + 1, mask=row_ok, other=0.0)
        acc_c = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=row_ok[:, None], other=0.0)
        big_m, big_l, big_acc = _combine(big_m, big_l, big_acc, m_c, l_c, acc_c)
    out = big_acc / tl.where(big_l == 0.0, 1.0, big_l)[:, None]
    tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


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
                    tree_rows: torch.Tensor | None = None, kv_chunk: int = 0) -> torch.Tensor:
    """q [tokens, heads, dim]; caches [blocks, page, kv_heads, dim]; block_tables [batch, max_blocks]
    (int32); query_start [batch + 1] and context_lens [batch] (int32, on the device); tree_bits
    [tokens] (int64) and tree_rows [batch] (int32) as in attention.PagedBatch, or None (causal).
    kv_chunk > 0 (deterministic mode; a multiple of block_n): fixed row tiles and the keys in
    chunks of kv_chunk from position 0, so a row's bits depend only on its own query and keys."""
    tokens, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    batch = context_lens.shape[0]
    block_n = block_n or 64
    if kv_chunk:
        assert kv_chunk % block_n == 0, "a KV chunk is whole key blocks"
        block_m = INVARIANT_TILE_ROWS
    else:
        block_m = min(MAX_TILE_ROWS, max(16, triton.next_power_of_2(max_query_len * group)))
    q_tiles = -(-max_query_len * group // block_m)
    splits = 1 if q_tiles > 2 else num_splits or choose_splits(batch, kv_heads, max_context_len, block_n, q.device)
    chunks_per_split = total_chunks = 0
    if kv_chunk:
        splits, chunks_per_split, total_chunks = kv_chunk_plan(splits, max_context_len, kv_chunk)
    out = torch.empty_like(q)
    if splits > 1:
        parts = tokens * heads * (total_chunks or splits)
        part_acc = torch.empty(parts, dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(parts, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = torch.empty(1, dtype=torch.float32, device=q.device)  # unused
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    # deterministic: no multiply-add contraction, so that a chunk merge is the same arithmetic in
    # either kernel whatever the compiler would fuse there
    fusion = {"enable_fp_fusion": False} if kv_chunk else {}
    _paged_attention[(batch, kv_heads, splits * q_tiles)](
        q, k_cache, v_cache, out, part_acc, part_ml,
        block_tables, query_start, context_lens,
        tree_bits if tree_bits is not None else query_start, tree_rows if tree_rows is not None else query_start,
        scale if scale is not None else dim ** -0.5,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        splits, heads, chunks_per_split, total_chunks,
        GROUP=group, PAGE=page, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision,
        TREE=tree_bits is not None, CHUNK=kv_chunk, CHUNK_PARTIALS=bool(kv_chunk) and splits > 1,
        num_warps=num_warps, num_stages=num_stages, **fusion,
    )
    if splits > 1 and kv_chunk:
        _merge_chunks[(batch, kv_heads, q_tiles)](out, part_acc, part_ml, query_start, context_lens, out.stride(0),
                                                  out.stride(1), heads, total_chunks, GROUP=group, HEAD_DIM=dim,
                                                  BLOCK_M=block_m, CHUNK=kv_chunk, num_warps=num_warps, **fusion)
    elif splits > 1:
        _merge_splits[(tokens, heads)](out, part_acc, part_ml, out.stride(0), out.stride(1), heads, splits,
                                       HEAD_DIM=dim, SPLITS=triton.next_power_of_2(splits))
    return out
