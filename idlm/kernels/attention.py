"""Attention backends in plain PyTorch: the CPU implementation and the oracle for GPU kernels."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from idlm.kernels.fixed_split import KV_CHUNK


class DenseAttention:
    """Attention over the tokens of the forward itself, q/k/v shaped [batch, length, heads, dim].

    `mask` is a boolean [batch, length, length] (True = may attend); None means causal.
    """

    def __init__(self, mask: torch.Tensor | None = None):
        self.mask = None if mask is None else mask[:, None]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, is_causal=self.mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2)


@dataclass
class PagedBatch:
    """Where a forward's tokens live in the paged KV cache.

    Tokens are flattened over sequences: sequence b owns rows query_start[b]:query_start[b+1],
    which sit at the last query_lens[b] slots of its context_lens[b] cached slots. A row attends
    to the slots at or before its own (causal), except inside a round's tree: the last
    tree_rows[b] rows of sequence b see, among those rows, only the ones set in their
    tree_bits (bit i: the tree's row i). Slot order is not position order there: RoPE
    positions come with the model's input, not from the slot.
    """

    slot_mapping: torch.Tensor  # [tokens] cache slot each new token's KV is written to
    query_start: list[int]  # [batch + 1]
    context_lens: torch.Tensor  # [batch] cached length after this forward's writes
    block_tables: torch.Tensor  # [batch, max_blocks], -1 padded
    max_context_len: int  # host copies of the maxima, so building the batch never syncs the device
    max_query_len: int
    all_written: bool = True  # no token has slot -1 (such rows write nothing)
    query_start_device: torch.Tensor | None = None  # int32 copy of query_start already on the device
    tree_bits: torch.Tensor | None = None  # [tokens] int64 visibility inside the tree; None: causal everywhere
    tree_rows: torch.Tensor | None = None  # [batch] int32 rows of the tree at the end of each sequence


def padded_block_tables(tables: list[list[int]], width: int, pad: int, rows: int = 0) -> list[int]:
    """The block tables as one flat [max(len(tables), rows), width] list: each cut or padded to
    `width` with `pad`, then rows of `pad` (padding sequences) up to `rows`."""
    flat = [block for table in tables for block in table[:width] + [pad] * (width - len(table))]
    return flat + [pad] * (max(0, rows - len(tables)) * width)


class PagedKVWriter:
    """Writes the new tokens' K/V into the paged cache at their slots (rows with slot -1 write
    nothing); the attention backends below read the cache after it."""

    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch):
        # kv_cache: [2, layers, blocks, block_size, kv_heads, head_dim]
        self.kv_cache = kv_cache
        self.batch = batch
        # index tensors built once per forward, so layers do no boolean indexing (no nonzero())
        written = batch.slot_mapping >= 0
        self.write_rows = None if batch.all_written else written.nonzero().squeeze(1)
        self.write_slots = batch.slot_mapping if batch.all_written else batch.slot_mapping[self.write_rows]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]
        heads, head_dim = k_cache.shape[-2:]
        self.write_flat(k_cache.view(-1, heads, head_dim), v_cache.view(-1, heads, head_dim), k, v)
        return k_cache, v_cache

    def write_flat(self, flat_k: torch.Tensor, flat_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """write() into one layer's cache viewed as [slots, kv heads, head dim]."""
        if self.write_rows is not None:
            k, v = k.index_select(0, self.write_rows), v.index_select(0, self.write_rows)
        # (a cache wider than the activations, the CPU's float32 one, takes them exactly)
        flat_k.index_copy_(0, self.write_slots, k if k.dtype == flat_k.dtype else k.to(flat_k.dtype))
        flat_v.index_copy_(0, self.write_slots, v if v.dtype == flat_v.dtype else v.to(flat_v.dtype))


class PagedAttention(PagedKVWriter):
    """Each query attends to every cached position of its own sequence at or before its own
    position (causal over the whole context), by gathering the context and running SDPA."""

    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch):
        super().__init__(kv_cache, batch)
        block_size = kv_cache.shape[3]
        device = kv_cache.device
        starts = batch.query_start
        query_lens = torch.tensor([b - a for a, b in zip(starts, starts[1:])], device=device)
        max_ctx, max_q = batch.max_context_len, batch.max_query_len
        key_pos = torch.arange(max_ctx, device=device)
        tables = batch.block_tables.clamp(min=0).long()
        block_index = (key_pos // block_size).clamp(max=tables.shape[1] - 1).expand(len(query_lens), -1)
        block_of_key = tables.gather(1, block_index)
        self.key_slots_flat = (block_of_key * block_size + key_pos % block_size).flatten()  # [batch * max_ctx]
        row = torch.arange(max_q, device=device)
        query_valid = row[None] < query_lens[:, None]  # [batch, max_q]
        query_pos = batch.context_lens[:, None] - query_lens[:, None] + row[None]
        query_pos = torch.where(query_valid, query_pos, torch.zeros_like(query_pos))
        mask = key_pos[None, None] <= query_pos[..., None]  # [batch, max_q, max_ctx]
        if batch.tree_bits is not None:
            bits = torch.full((len(query_lens) * max_q,), -1, dtype=torch.long, device=device)
            bits[query_valid.flatten().nonzero().squeeze(1)] = batch.tree_bits
            tree_start = (batch.context_lens - batch.tree_rows)[:, None, None]
            rel = key_pos[None, None] - tree_start
            visible = (bits.view(len(query_lens), max_q, 1) >> rel.clamp(0, 63)) & 1
            mask &= (rel < 0) | (visible == 1)
        self.mask = mask[:, None]  # [batch, 1, max_q, max_ctx]
        self.batch_size, self.max_q = len(query_lens), max_q
        uniform = all(b - a == max_q for a, b in zip(starts, starts[1:]))
        self.query_rows = None if uniform else query_valid.flatten().nonzero().squeeze(1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.write(layer, k, v)
        heads, head_dim = k_cache.shape[-2:]
        gathered = (self.batch_size, -1, heads, head_dim)
        keys = k_cache.view(-1, heads, head_dim).index_select(0, self.key_slots_flat).view(gathered).transpose(1, 2)
        values = v_cache.view(-1, heads, head_dim).index_select(0, self.key_slots_flat).view(gathered).transpose(1, 2)
        if self.query_rows is None:
            padded_q = q.view(self.batch_size, self.max_q, *q.shape[1:])
        else:
            padded_q = q.new_zeros(self.batch_size * self.max_q, *q.shape[1:]).index_copy_(0, self.query_rows, q)
            padded_q = padded_q.view(self.batch_size, self.max_q, *q.shape[1:])
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2), keys, values, attn_mask=self.mask, enable_gqa=q.shape[1] != heads
        ).transpose(1, 2)
        out = out.reshape(self.batch_size * self.max_q, *out.shape[2:])
        return out if self.query_rows is None else out.index_select(0, self.query_rows)


class TritonPagedAttention(PagedKVWriter):
    """The same attention with the Triton kernel of `triton_attention.py` (CUDA only)."""

    kv_chunk = 0  # > 0: deterministic mode's fixed KV chunks (FixedSplitPagedAttention)

    @staticmethod
    def supports(device: torch.device, head_dim: int) -> bool:
        """The kernel's tiles need a power-of-two head dim of at least 16 (tl.dot's minimum)."""
        return device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0

    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch):
        super().__init__(kv_cache, batch)
        from idlm.kernels.triton_attention import paged_attention

        self.kernel = paged_attention
        self.query_start = batch.query_start_device
        if self.query_start is None:
            self.query_start = torch.tensor(batch.query_start, dtype=torch.int32, device=kv_cache.device)
        self.context_lens = batch.context_lens.to(torch.int32)
        self.tree_rows = None if batch.tree_rows is None else batch.tree_rows.to(torch.int32)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.write(layer, k, v)
        return self._attend(q, k_cache, v_cache)

    def rotate_and_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> torch.Tensor | None:
        """q and k not yet rotated: the rotary and the KV write in one kernel (triton_rope_kv.py;
        four launches a layer otherwise, a fifth of a small model's decode step), then the
        attention; None where the tensors' layout does not suit that kernel."""
        from idlm.kernels import triton_rope_kv

        if not triton_rope_kv.supports(q, k, v, cos):
            return None
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]
        q = triton_rope_kv.rope_write_kv(q, k, v, cos, sin, self.batch.slot_mapping, k_cache, v_cache)
        return self._attend(q, k_cache, v_cache)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        b = self.batch
        return self.kernel(q, k_cache, v_cache, b.block_tables, self.query_start, self.context_lens,
                           b.max_query_len, b.max_context_len, tree_bits=b.tree_bits, tree_rows=self.tree_rows,
                           kv_chunk=self.kv_chunk)


class FixedSplitPagedAttention(TritonPagedAttention):
    """Deterministic mode: every row computed with fixed tiles and KV chunks (kernels/fixed_split.py),
    so its bits do not depend on the batch, its round or its prefill chunk."""

    kv_chunk = KV_CHUNK


class FlexAttention:
    """FlexAttention over the forward's own tokens with a block mask (training on GPU)."""

    _compiled = None

    def __init__(self, block_mask):
        self.block_mask = block_mask

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if FlexAttention._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            FlexAttention._compiled = torch.compile(flex_attention, dynamic=False)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = FlexAttention._compiled(q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)
