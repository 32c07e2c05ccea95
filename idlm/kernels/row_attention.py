"""Paged attention on the CPU whose every row is computed alone, over exactly its visible keys.

PyTorch's CPU SDPA gives a query row different last bits depending on how many query rows
share the call and how far the keys are padded (blocking and tails of its GEMMs). Padding each
sequence to the batch's longest context and a round's rows to its longest, as `PagedAttention`
does, therefore makes a row's output depend on its batch mates and on the decoding mode. Here
each row is one SDPA call of one query over its own visible keys, in position order: the same
call for the same row whatever else the forward holds (a prompt row, an `ar` pending row, a
`risd` draft row, alone or in a batch). Quantised weights need this: their kernels round every
projection's output to bfloat16, which turns a difference in the last bit into a different token
within a few steps.
"""

import torch
import torch.nn.functional as F

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
        self.seqs = []  # per sequence: (cache slots of its context, [(row, prefix length or key index)])
        for b, ctx in enumerate(context_lens):
            table = tables[b]
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)],
                                 device=kv_cache.device)
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
            self.seqs.append((slots, rows))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.write(layer, k, v)
        heads, head_dim = k_cache.shape[-2:]
        flat_k, flat_v = k_cache.view(-1, heads, head_dim), v_cache.view(-1, heads, head_dim)
        out = torch.empty_like(q)
        for slots, rows in self.seqs:
            seq_k, seq_v = flat_k.index_select(0, slots), flat_v.index_select(0, slots)  # [ctx, kv_heads, dim]
            for row, seen in rows:
                if isinstance(seen, int):
                    kr, vr = seq_k[:seen], seq_v[:seen]
                else:
                    kr, vr = seq_k.index_select(0, seen), seq_v.index_select(0, seen)
                # [1, heads, 1, dim] against [1, kv_heads, keys, dim], the same strides for every row
                out[row] = F.scaled_dot_product_attention(q[row][None, :, None], kr.transpose(0, 1)[None],
                                                          vr.transpose(0, 1)[None],
                                                          enable_gqa=q.shape[1] != heads)[0, :, 0]
        return out
