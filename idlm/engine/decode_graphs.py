"""Decode steps in a fixed, padded layout, replayed as CUDA graphs.

In a decode step every sequence feeds one round (decoding/layout.py): its pending token and, for
isd/risd, its drafts, MASKs and branches: 1 row for ar, N for a cold round, 2N-1 for a verify
round, K more per branch. The step is laid out as a [bucket, T] grid: T = the most rows any
sequence feeds, bucket = the batch size rounded up to a captured size. Short rows are padded at
the end and extra sequences fill the bucket. Padding writes its KV to a scratch block outside the
pool and reads only scratch or slots after every real query of its row, so (attention being
causal, or a sub-causal tree) no real row sees it. One graph per (bucket, T, LoRA on or off, tree
or causal) runs the whole model and the head; the decoding round stays eager on the same stream.

All per-step integers travel in one pinned host buffer and one host-to-device copy.
"""

import torch

from idlm.kernels.attention import PagedAttention, PagedBatch, TritonPagedAttention, padded_block_tables
from idlm.models.transformer import CausalLM, fused_elementwise

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, scratch_block: int, max_batch: int, max_tokens: int,
                 max_positions: int, use_triton: bool, use_graphs: bool, with_lora: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[3]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * self.block_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_tokens = max_tokens
        self.max_positions = max_positions  # the context bound the kernels' launch shapes are fixed for
        self.backend = TritonPagedAttention if use_triton else PagedAttention
        self.use_graphs = use_graphs
        self.with_lora = with_lora
        device = kv_cache.device
        self.device = device
        width = -(-max_positions // self.block_size)
        rows = max_batch * max_tokens
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), self.scratch_slot, dtype=torch.long, device=device)
        self.gate = torch.zeros(rows, dtype=torch.float32, device=device)
        self.tree_bits = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.tree_rows = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.tables = torch.full((max_batch, width), scratch_block, dtype=torch.int32, device=device)
        self.query_starts: dict[int, torch.Tensor] = {}
        self.staging = torch.empty(5 * rows + max_batch * (width + 1), dtype=torch.long,
                                   pin_memory=device.type == "cuda")
        self.graphs: dict[tuple[int, int, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def fits(self, batch: int, tokens: int, max_context: int) -> bool:
        return self.bucket_for(batch) is not None and tokens <= self.max_tokens and max_context <= self.max_positions

    def run(self, feeds: list, starts: list[int],
            block_tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Runs the padded step over each sequence's FeedRows (runner.feed_rows: one whole round
        each, starting at cache slot starts[b]); returns (hidden [bucket*T, H], logits
        [bucket*T, V], T). Row b*T + i is row i of sequence b."""
        tokens = max(len(f.ids) for f in feeds)
        bucket = self.bucket_for(len(feeds))
        rows = bucket * tokens
        bs, scratch = self.block_size, self.scratch_block
        ids, positions, slots, gate_bits, tree_bits, context_lens = [], [], [], [], [], []
        width = 1
        for f, start in zip(feeds, starts):
            pad = tokens - len(f.ids)
            ids += f.ids + [0] * pad
            positions += f.positions + list(range(start + len(f.ids), start + tokens))
            slots += f.slots + [self.scratch_slot] * pad
            gate_bits += f.gate + [False] * pad
            tree_bits += f.tree_bits + [-1] * pad
            context_lens.append(start + tokens)
            width = max(width, -(-(start + tokens) // bs))
        extra = bucket - len(feeds)
        ids += [0] * (extra * tokens)
        positions += list(range(tokens)) * extra
        slots += [self.scratch_slot] * (extra * tokens)
        gate_bits += [False] * (extra * tokens)
        tree_bits += [-1] * (extra * tokens)
        context_lens += [tokens] * extra
        tables = padded_block_tables(block_tables, width, scratch, bucket)

        # a step with no MASK row of a risd round (e.g. only ar requests) skips the LoRA: its
        # delta would be an exact zero on every row; one without branches is plain causal
        lora = self.with_lora and any(gate_bits)
        tree = any(f.branched for f in feeds)
        packed = ids + positions + slots + gate_bits + context_lens + (tree_bits if tree else []) + tables
        host = self.staging[:len(packed)]
        host.copy_(torch.tensor(packed, dtype=torch.long))
        dev = host.to(self.device, non_blocking=True)
        o = 0
        buffers = [(self.ids, rows), (self.positions, rows), (self.slots, rows), (self.gate, rows),
                   (self.context_lens, bucket)] + ([(self.tree_bits, rows)] if tree else [])
        for buf, n in buffers:
            buf[:n].copy_(dev[o:o + n])
            o += n
        self.tables[:bucket, :width].copy_(dev[o:o + bucket * width].view(bucket, width))
        if tree:
            self.tree_rows[:bucket].fill_(tokens)

        key = (bucket, tokens, lora, tree)
        if not self.use_graphs:
            hidden, logits = self._forward(bucket, tokens, lora, tree, max(context_lens))
            return hidden, logits, tokens
        if key not in self.graphs:
            self.graphs[key] = self._capture(bucket, tokens, lora, tree)
        graph, hidden, logits = self.graphs[key]
        graph.replay()
        return hidden, logits, tokens

    def _forward(self, bucket: int, tokens: int, lora: bool, tree: bool,
                 max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = bucket * tokens
        if tokens not in self.query_starts:
            self.query_starts[tokens] = torch.arange(0, (max(self.buckets) + 1) * tokens, tokens, dtype=torch.int32,
                                                     device=self.device)
        batch = PagedBatch(
            slot_mapping=self.slots[:rows],
            query_start=list(range(0, rows + 1, tokens)),
            context_lens=self.context_lens[:bucket],
            block_tables=self.tables[:bucket],
            max_context_len=max_context,
            max_query_len=tokens,
            query_start_device=self.query_starts[tokens][:bucket + 1],
            tree_bits=self.tree_bits[:rows] if tree else None,
            tree_rows=self.tree_rows[:bucket] if tree else None,
        )
        gate = self.gate[:rows] if lora else None
        hidden = self.model(self.ids[:rows], self.positions[:rows], self.backend(self.kv_cache, batch), gate)
        return hidden, self.model.logits(hidden)

    def _capture(self, bucket: int, tokens: int, lora: bool, tree: bool):
        torch.cuda.synchronize(self.device)
        with fused_elementwise():
            # compiles this shape's kernels outside the capture
            self._forward(bucket, tokens, lora, tree, self.max_positions)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden, logits = self._forward(bucket, tokens, lora, tree, self.max_positions)
        return graph, hidden, logits
