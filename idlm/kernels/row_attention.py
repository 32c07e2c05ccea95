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


class RowExactPagedAttention(PagedKVWriter):
    def __init__(self, kv_cache: torch.Tensor, batch: PagedBatch):
        super().__init__(kv_cache, batch)
        block_size = kv_cache.shape[3]
        starts = batch.query_start
        context_lens = batch.context_lens.tolist()
        tables = batch.block_tables.tolist()
        tree_rows = [0] * len(context_lens) if batch.tree_rows is None else batch.tree_rows.tolist()
        tree_bits = None if batch.tree_bits is None else batch.tree_bits.tolist()
        # Every sequence's context blocks are gathered in one copy a layer, and each sequence's keys
        # cut from it: the same keys with the same strides as a gather of its own, so the same bits
        # (at batch 8, one gather an index a position took 2.7 of 22 ms a step, one a sequence 0.9).
        # per sequence: (its first position in the gathered blocks, its length, [(row, prefix
        # length or key index)])
        blocks, self.seqs = [], []
        for b, ctx in enumerate(context_lens):
            offset = len(blocks) * block_size
            blocks += tables[b][:-(-ctx // block_size)]
            num_rows = starts[b + 1] - starts[b]
            tree_start = ctx - tree_rows[b]
            rows = []
            for i in range(num_rows):
                row, pos = starts[b] + i, ctx - num_rows + i
                if pos < tree_start:
                    rows.append((row, pos + 1))
                    continue
                bits = tree_bits[row]
                seen = list(range(tree_start)) + [tree_start + j for j in range(tree_rows[b]) if bits >> j & 1]
                rows.append((row, torch.tensor(seen, device=kv_cache.device)))
            self.seqs.append((offset, ctx, rows))
        self.blocks = torch.tensor(blocks, device=kv_cache.device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.write(layer, k, v)  # [blocks, block_size, kv_heads, head_dim]
        kv_heads, head_dim = k_cache.shape[-2:]
        group = q.shape[1] // kv_heads
        scale = head_dim ** -0.5
        q32 = q.float().view(q.shape[0], kv_heads, group, head_dim)
        # a power-of-two scale (head_dim 4, 16, 64, 256) times q is exact, and so are the dot
        # products of the scaled q: scaling q once for all rows gives the scores' bits, one call
        # fewer a row
        scale_q = math.frexp(scale)[0] == 0.5
        if scale_q:
            q32 = q32 * scale
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        widen = k_cache.dtype != torch.float32  # (the CPU's row-exact cache is float32 already)
        all_k = k_cache.index_select(0, self.blocks).view(-1, kv_heads, head_dim)
        all_v = v_cache.index_select(0, self.blocks).view(-1, kv_heads, head_dim)
        if widen:
            all_k, all_v = all_k.float(), all_v.float()
        # [kv_heads, dim, positions] and [kv_heads, positions, dim] views: a row's keys are a slice
        # of each, with the strides a sequence's own gather had (the same bits), in two calls
        keys_t, values = all_k.permute(1, 2, 0), all_v.transpose(0, 1)
        out_rows = out.view(q.shape[0], kv_heads, group, head_dim)
        for offset, ctx, rows in self.seqs:
            for row, seen in rows:
                if isinstance(seen, int):
                    kt, vr = keys_t[:, :, offset:offset + seen], values[:, offset:offset + seen]
                else:  # a tree row: the keys it sees, gathered
                    kt = all_k[offset:offset + ctx].transpose(0, 1).index_select(1, seen).transpose(1, 2)
                    vr = values[:, offset:offset + ctx].index_select(1, seen)
                # [kv_heads, group, dim] against [kv_heads, keys, dim]: the same calls for a row
                # whatever else the forward holds
                scores = torch.bmm(q32[row], kt)
                if not scale_q:
                    scores = scores * scale
                torch.bmm(scores.softmax(-1), vr, out=out_rows[row])
        return out.to(q.dtype)
