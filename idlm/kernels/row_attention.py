"""Paged attention on the CPU whose every row is computed alone, over exactly its visible keys.

PyTorch's CPU SDPA gives a query row different last bits depending on how many query rows
share the call and how far the keys are padded (blocking and tails of its GEMMs). Padding each
sequence to the batch's longest context and a round's rows to its longest, as `PagedAttention`
does, therefore makes a row's output depend on its batch mates and on the decoding mode. Here
each row is computed by calls of its own over its own visible keys, in position order: the same
calls for the same row whatever else the forward holds (a prompt row, an `ar` pending row, a
`risd` draft row, alone or in a batch). Quantised weights need this: their kernels round every
projection's output to bfloat16, which turns a difference in the last bit into a different token
within a few steps.

Those calls are two small batched matmuls over the row's KV heads and a softmax between them, in
float32: on a 2-core CPU 1.7-3x faster than one SDPA call a row (whose fixed cost is most of a
short row's time), and float32 scores whatever the cache's dtype.
"""

import math

import torch

from idlm.kernels.attention import PagedBatch, PagedKVWriter
from idlm.kernels.row_ops import row_ops


class RowExactPagedAttention(PagedKVWriter):
    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch):
        super().__init__(kv_cache, batch)
        _, num_layers, _, block_size, kv_heads, head_dim = kv_cache.shape
        device = kv_cache.device
        # each layer's cache as [slots, kv heads, head dim], viewed once a forward, not per layer
        self.kv_layers = kv_cache.view(2, num_layers, -1, kv_heads, head_dim)
        self.k_layers, self.v_layers = self.kv_layers[0].unbind(0), self.kv_layers[1].unbind(0)
        starts = batch.query_start
        context_lens = batch.context_lens.tolist()
        tables = batch.block_tables.tolist()
        tree_rows = [0] * len(context_lens) if batch.tree_rows is None else batch.tree_rows.tolist()
        tree_bits = None if batch.tree_bits is None else batch.tree_bits.tolist()
        # Every sequence's context blocks are gathered in one copy a layer, and each sequence's keys
        # cut from it: the same keys with the same strides as a gather of its own, so the same bits
        # (at batch 8, one gather an index a position took 2.7 of 22 ms a step, one a sequence 0.9).
        # rows: (row, first position of its sequence in the gathered blocks, its prefix length or
        # the indices of the keys it sees, its sequence's context length)
        blocks, self.rows = [], []
        for b, ctx in enumerate(context_lens):
            offset = len(blocks) * block_size
            blocks += tables[b][:-(-ctx // block_size)]
            num_rows = starts[b + 1] - starts[b]
            tree_start = ctx - tree_rows[b]
            for i in range(num_rows):
                row, pos = starts[b] + i, ctx - num_rows + i
                if pos < tree_start:
                    self.rows.append((row, offset, pos + 1, ctx))
                    continue
                bits = tree_bits[row]
                seen = list(range(tree_start)) + [tree_start + j for j in range(tree_rows[b]) if bits >> j & 1]
                self.rows.append((row, offset, torch.tensor(seen, device=device), ctx))
        self.slots = torch.tensor([b * block_size + i for b in blocks for i in range(block_size)], device=device)
        self.packed_tables = self._packed_tables() if row_ops() is not None and device.type == "cpu" else None
        # Every layer gathers into the same buffers, and q goes into one too, so each row's views of
        # them are made once a forward: a layer is then its writes, its gathers and three calls a row
        # (the views were half of a decode step's attention ops).
        self.q32: torch.Tensor | None = None  # made at the first layer, which gives q's heads
        self.views: list[tuple] | None = None
        # (the CPU's row-exact cache is float32 already; another one is widened after each gather)
        self.widen = kv_cache.dtype != torch.float32
        self.gathered: list[torch.Tensor] = []  # made at the first layer too (attend_packed needs none)

    def _packed_tables(self) -> tuple[torch.Tensor, ...]:
        """What csrc/row_ops.cpp's rope_attend reads of the rows (see there): the write slots, the
        gathered slots, and per row where its sequence's slots start, its prefix's length and its
        tree keys (indices into its sequence's slots)."""
        row_start, prefix, extra_off, extra_idx = [0] * len(self.rows), [0] * len(self.rows), [0], []
        for row, offset, seen, _ in self.rows:  # (in row order)
            row_start[row] = offset
            if isinstance(seen, int):
                prefix[row] = seen
            else:
                extra_idx += seen.tolist()
            extra_off.append(len(extra_idx))
        write_slots = self.batch.slot_mapping.long()
        return tuple(torch.tensor(t, dtype=torch.long) if isinstance(t, list) else t.contiguous()
                     for t in (write_slots, self.slots, row_start, prefix, extra_off, extra_idx))

    def attend_packed(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_heads: int) -> torch.Tensor | None:
        """A layer's rotary, cache writes and attention from its fused projection's output in one
        call (csrc/row_ops.cpp); None where that does not apply (no built kernels, or activations
        or a cache other than float32 rows), and the caller runs the ops one by one."""
        if self.packed_tables is None or self.widen or qkv.dtype != torch.float32 or qkv.dim() != 2:
            return None
        head_dim = self.k_layers[layer].shape[-1]
        return row_ops().rope_attend(qkv, cos, sin, self.k_layers[layer], self.v_layers[layer],
                                     *self.packed_tables, num_heads, head_dim ** -0.5)

    def _row_views(self, q32: torch.Tensor) -> list[tuple]:
        # [kv_heads, dim, positions] and [kv_heads, positions, dim] views: a row's keys are a slice
        # of each, with the strides a sequence's own gather had (the same bits)
        keys_t, values = self.all_k.permute(1, 2, 0), self.all_v.transpose(0, 1)
        views = []
        for row, offset, seen, ctx in self.rows:
            if isinstance(seen, int):
                views.append((row, q32[row], keys_t[:, :, offset:offset + seen], values[:, offset:offset + seen], None))
            else:  # a tree row: the keys it sees, gathered each layer from its sequence's
                views.append((row, q32[row], self.all_k[offset:offset + ctx].transpose(0, 1),
                              values[:, offset:offset + ctx], seen))
        return views

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_layer, v_layer = self.k_layers[layer], self.v_layers[layer]
        self.write_flat(k_layer, v_layer, k, v)
        if not self.gathered:
            self.gathered = [k_layer.new_empty((len(self.slots),) + k_layer.shape[1:]) for _ in range(2)]
            self.all_k, self.all_v = [g.float() for g in self.gathered] if self.widen else self.gathered
        torch.index_select(k_layer, 0, self.slots, out=self.gathered[0])
        torch.index_select(v_layer, 0, self.slots, out=self.gathered[1])
        if self.widen:
            self.all_k.copy_(self.gathered[0])
            self.all_v.copy_(self.gathered[1])
        kv_heads, head_dim = k_layer.shape[-2:]
        scale = head_dim ** -0.5
        if self.q32 is None:
            self.q32 = torch.empty(q.shape[0], kv_heads, q.shape[1] // kv_heads, head_dim, device=q.device)
            self.views = self._row_views(self.q32)
        # a power-of-two scale (head_dim 4, 16, 64, 256) times q is exact, and so are the dot
        # products of the scaled q: scaling q once for all rows gives the scores' bits, one call
        # fewer a row
        scale_q = math.frexp(scale)[0] == 0.5
        q_rows = q.view(self.q32.shape)
        if scale_q and q.dtype == torch.float32:
            torch.mul(q_rows, scale, out=self.q32)
        else:  # (a bfloat16 q is widened first, as its float32 product may need more bits)
            self.q32.copy_(q_rows)
            if scale_q:
                self.q32.mul_(scale)
        out = torch.empty(self.q32.shape, dtype=torch.float32, device=q.device)
        for row, q_row, kt, vr, seen in self.views:
            if seen is not None:
                kt, vr = kt.index_select(1, seen).transpose(1, 2), vr.index_select(1, seen)
            # [kv_heads, group, dim] against [kv_heads, keys, dim]: the same calls for a row
            # whatever else the forward holds
            scores = torch.bmm(q_row, kt)
            if not scale_q:
                scores = scores * scale
            torch.bmm(scores.softmax(-1), vr, out=out[row])
        out = out.view(q.shape)
        return out if q.dtype == torch.float32 else out.to(q.dtype)
