"""Decode steps in a fixed, padded layout, replayed as CUDA graphs.

In a decode step every sequence feeds one round (decoding/layout.py): its pending token and, for
isd/risd, its drafts, MASKs and branches: 1 row for ar, N for a cold round, 2N-1 for a verify
round, K more per branch. The step is laid out as a [bucket, T] grid: T = the most rows any
sequence feeds, bucket = the batch size rounded up to a captured size. Short rows are padded at
the end and extra sequences fill the bucket. Padding writes its KV to a scratch block outside the
pool and reads only scratch or slots after every real query of its row, so (attention being
causal, or a sub-causal tree) no real row sees it. One graph per (bucket, T, LoRA on or off, tree
or causal) runs the whole model and the head; the decoding round after it is a graph of its own
(round_graphs.py).

A prefill step of a few short prompts takes the same layout, T padded up to one of PREFILL_ROWS
(a prompt chunk is a causal run of rows like a round): run eagerly it cost ~20 ms on an H200 for
SmolLM2, a dozen decode steps, and every running request waits for it.

All per-step integers travel in one pinned host buffer and one host-to-device copy.

A decode step of the requests of the step before is built inside its graph (`step_from_carry`):
the round's carry table and the host's plan go into static buffers, and the graph runs
next_step.build_step before the model, so the host launches three copies, a fill and one replay
instead of build_step's few dozen small ops (on an H200 that took SmolLM2's `ar` step at C = 1 from
2.5 to 1.5 ms).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from idlm.config import MAX_STRIDE
from idlm.engine.host_tensor import host_tensor
from idlm.engine.next_step import LayoutTable, SlotState, StepInputs, build_step
from idlm.engine.round_step import RoundShape, built_round_inputs
from idlm.kernels.attention import PagedAttention, PagedBatch, TritonPagedAttention, padded_block_tables
from idlm.models.transformer import CausalLM, fused_elementwise

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
PREFILL_ROWS = (64, 128, 256)  # a prefill step's rows per prompt, padded up to one of these
PREFILL_BATCH = 4  # prefill steps of more prompts run eagerly (their padded grid and logits grow fast)


@dataclass(slots=True)
class PackedStep:
    """One padded step: its integers in one list (ids, positions, slots, gate, context lengths, tree
    bits and rows when a tree, block tables) and the shape of its graph."""

    packed: list[int]
    bucket: int
    tokens: int
    width: int
    lora: bool
    tree: bool
    max_context: int


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, scratch_block: int, max_batch: int, max_tokens: int,
                 max_positions: int, use_triton: bool, use_graphs: bool, with_lora: bool,
                 triton_attention: type = TritonPagedAttention):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.shape[3]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * self.block_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_tokens = max_tokens
        self.max_positions = max_positions  # the context bound the kernels' launch shapes are fixed for
        self.backend = triton_attention if use_triton else PagedAttention
        # a step built from a carry, and its round's integers: a Triton kernel each
        # (kernels/triton_build_step.py) where Triton runs, else next_step.build_step's and
        # round_step.built_round_inputs' torch ops (the CPU's check of this layout)
        self.build_kernel = use_triton
        self.is_mask8: torch.Tensor | None = None  # layouts.is_mask as int8, for the kernel
        self.use_graphs = use_graphs
        self.with_lora = with_lora
        device = kv_cache.device
        self.device = device
        width = -(-max_positions // self.block_size)
        rows = max(max_batch * max_tokens, min(max_batch, PREFILL_BATCH) * PREFILL_ROWS[-1])
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.full((rows,), self.scratch_slot, dtype=torch.long, device=device)
        self.gate = torch.zeros(rows, dtype=torch.float32, device=device)
        self.tree_bits = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.tree_rows = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.tables = torch.full((max_batch, width), scratch_block, dtype=torch.int32, device=device)
        # step_from_carry: the last round's carry table (next_step.carry_table, up to MAX_STRIDE - 1
        # drafts) and the plan [K, branch cap, MASK id, gated, valid] per request of the bucket
        self.carry = torch.zeros(max_batch, 3 + MAX_STRIDE - 1, dtype=torch.long, device=device)
        self.plan = torch.zeros(5, max_batch, dtype=torch.long, device=device)
        self.layouts: LayoutTable | None = None  # set by the runner
        self.query_starts: dict[int, torch.Tensor] = {}
        self.staging = torch.empty(5 * rows + max_batch * (width + 2), dtype=torch.long,
                                   pin_memory=device.type == "cuda")
        # the copy out of staging of the last host-built step: a step launched while another is in
        # flight (overlap scheduling) must not refill staging before that copy has read it
        self.staging_read: torch.cuda.Event | None = None
        self.graphs: dict[tuple[int, int, bool, bool, bool],
                          tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.logits_out: torch.Tensor | None = None  # the one logits buffer of every decode graph (_logits_out)
        self.mirror: Callable[[PackedStep], None] | None = None  # tensor parallel: the other ranks run each step too

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def rows_for(self, batch: int, rows: int, max_start: int, prefill: bool) -> int | None:
        """T for a step of `batch` sequences feeding at most `rows` rows each from cache slot
        max_start at most, or None where the step does not fit the layout."""
        if prefill:
            tokens = next((t for t in PREFILL_ROWS if t >= rows), None) if batch <= PREFILL_BATCH else None
        else:
            tokens = rows if rows <= self.max_tokens else None
        if tokens is None or self.bucket_for(batch) is None or max_start + tokens > self.max_positions:
            return None
        return tokens

    def run(self, feeds: list, starts: list[int], block_tables: list[list[int]],
            tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs the padded step over each sequence's FeedRows (runner.feed_rows: a round, or a
        prompt chunk and on its last chunk the round, starting at cache slot starts[b]), T =
        tokens rows each (rows_for); returns (hidden [bucket*T, H], logits [bucket*T, V] or None
        past the widest round). Row b*T + i is row i of sequence b."""
        bucket = self.bucket_for(len(feeds))
        bs, scratch = self.block_size, self.scratch_block
        ids, positions, slots, gate_bits, tree_bits, context_lens, tree_rows = [], [], [], [], [], [], []
        width = 1
        for f, start in zip(feeds, starts):
            pad = tokens - len(f.ids)
            ids += f.ids + [0] * pad
            positions += f.positions + list(range(start + len(f.ids), start + tokens))
            slots += f.slots + [self.scratch_slot] * pad
            gate_bits += f.gate + [False] * pad
            tree_bits += f.tree_bits + [-1] * pad
            context_lens.append(start + tokens)
            tree_rows.append(tokens - len(f.ids) + f.round_rows)  # the round and the padding after it
            width = max(width, -(-(start + tokens) // bs))
        extra = bucket - len(feeds)
        ids += [0] * (extra * tokens)
        positions += list(range(tokens)) * extra
        slots += [self.scratch_slot] * (extra * tokens)
        gate_bits += [False] * (extra * tokens)
        tree_bits += [-1] * (extra * tokens)
        context_lens += [tokens] * extra
        tree_rows += [tokens] * extra
        tables = padded_block_tables(block_tables, width, scratch, bucket)

        # a step with no MASK row of a risd round (e.g. only ar requests) skips the LoRA: its
        # delta would be an exact zero on every row; one without branches is plain causal
        lora = self.with_lora and any(gate_bits)
        tree = any(f.branched for f in feeds)
        packed = ids + positions + slots + gate_bits + context_lens + (tree_bits + tree_rows if tree else []) + tables
        step = PackedStep(packed, bucket, tokens, width, lora, tree, max(context_lens))
        if self.mirror is not None:
            self.mirror(step)
        return self.step(step)

    def step(self, s: PackedStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copies a packed step into the graph's buffers and replays it (every rank of a tensor-parallel
        group runs this with the same step)."""
        rows = s.bucket * s.tokens
        host = self.staging[:len(s.packed)]
        if self.staging_read is not None:
            self.staging_read.synchronize()
        host.copy_(host_tensor(s.packed, torch.long))
        dev = host.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self.staging_read = torch.cuda.Event()
            self.staging_read.record()
        o = 0
        buffers = [(self.ids, rows), (self.positions, rows), (self.slots, rows), (self.gate, rows),
                   (self.context_lens, s.bucket)]
        if s.tree:
            buffers += [(self.tree_bits, rows), (self.tree_rows, s.bucket)]
        for buf, n in buffers:
            buf[:n].copy_(dev[o:o + n])
            o += n
        self.tables[:s.bucket, :s.width].copy_(dev[o:o + s.bucket * s.width].view(s.bucket, s.width))
        return self._replay(s.bucket, s.tokens, s.lora, s.tree, s.max_context)

    def _load(self, inputs: StepInputs, bucket: int, tree: bool) -> None:
        """Built rows into the buffers the forward reads (tree bits only where read)."""
        pairs = [(self.ids, inputs.ids), (self.positions, inputs.positions), (self.slots, inputs.slots),
                 (self.gate, inputs.gate), (self.context_lens, inputs.context_lens)]
        if tree:
            pairs += [(self.tree_bits, inputs.tree_bits), (self.tree_rows, inputs.tree_rows)]
        for buf, value in pairs:
            buf[:len(value)].copy_(value)

    def step_from_carry(self, carry: torch.Tensor, plan: torch.Tensor, tables: torch.Tensor, tokens: int, lora: bool,
                        tree: bool, max_context: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replays a decode step that builds its own rows (next_step.build_step) from carry, the
        last round's carry table of the step's requests in batch order ([n, 3 + K]), and plan
        ([5, bucket]: K, branch cap, MASK id, gated, valid; entries past n are padding with valid
        0); tables: [bucket, width] on the device."""
        bucket, width = tables.shape
        self.carry[:carry.shape[0], :carry.shape[1]].copy_(carry)
        self.plan[:, :bucket].copy_(plan)
        self.tables[:bucket, :width].copy_(tables)
        # build_step reads a block past `width` for a row whose slot the host's tables do not
        # cover (the step cost's dummy requests, whose carry runs ahead of their host state): the
        # scratch block, as the host-built step's clamp to `width` gives, not a stale block
        self.tables[:bucket, width:].fill_(self.scratch_block)
        return self._replay(bucket, tokens, lora, tree, max_context, from_carry=True)

    def round_inputs_builder(self, bucket: int, tokens: int,
                             shape: RoundShape) -> Callable[[torch.Tensor], torch.Tensor]:
        """The round integers of the step step_from_carry last built (bucket, T = tokens), from the
        carry and plan buffers and the request constants ([4 * bucket]): run inside the round's
        graph (round_graphs.RoundGraph's `build`) rather than as a dozen small ops from the host."""

        def build(constants: torch.Tensor) -> torch.Tensor:
            if self.build_kernel:
                from idlm.kernels.triton_build_step import round_inputs_into

                out = torch.empty(sum(shape.int_sizes()), dtype=torch.long, device=self.device)
                made = self._kernel(round_inputs_into, self.carry[:bucket], self.plan[:, :bucket], constants, tokens,
                                    shape.dmax, out)
                if made is not False:
                    return made
            return built_round_inputs(self._state(bucket), constants.view(4, bucket), tokens, shape)

        return build

    def _state(self, bucket: int) -> SlotState:
        """The slots' state the carry and plan buffers describe, over the whole bucket (the torch build's input)."""
        k, branches, mask_id, gated, valid = self.plan[:, :bucket]
        return SlotState.from_carry(self.carry[:bucket], k, branches, mask_id, gated.bool(), valid.bool())

    def _kernel(self, fn: Callable, *args):
        """fn(*args), or False where it fails to compile or launch (its first run is eager, before
        any capture): the build then runs as torch ops from now on, with a warning, rather than
        every decode step failing."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (a Triton compile error has no common type)
            import warnings

            warnings.warn(f"the Triton build kernels failed ({type(e).__name__}: {e}); decode steps are built "
                          f"with torch ops instead", RuntimeWarning, stacklevel=2)
            self.build_kernel = False
            return False

    def _build_from_carry(self, bucket: int, tokens: int, tree: bool) -> None:
        """The step's rows from the carry and plan buffers, into the buffers the forward reads."""
        if self.build_kernel:
            from idlm.kernels.triton_build_step import build_step_into

            if self.is_mask8 is None:
                self.is_mask8 = self.layouts.is_mask.to(torch.int8)
            out = dict(ids=self.ids, positions=self.positions, slots=self.slots, gate=self.gate,
                       tree_bits=self.tree_bits, context_lens=self.context_lens, tree_rows=self.tree_rows)
            if self._kernel(build_step_into, self.carry[:bucket], self.plan[:, :bucket], self.layouts,
                            self.tables[:bucket], tokens, self.block_size, self.scratch_slot, self.is_mask8,
                            out) is not False:
                return
        self._load(build_step(self._state(bucket), self.layouts, self.tables[:bucket], tokens, bucket, self.block_size,
                              self.scratch_slot), bucket, tree)

    def _replay(self, bucket: int, tokens: int, lora: bool, tree: bool, max_context: int,
                from_carry: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.use_graphs:
            return self._forward(bucket, tokens, lora, tree, max_context, from_carry)
        key = (bucket, tokens, lora, tree, from_carry)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bucket, tokens, lora, tree, from_carry)
        graph, hidden, logits = self.graphs[key]
        graph.replay()
        return hidden, logits

    def capture_prefill(self) -> None:
        """Captures every prefill graph now, so that no request waits while one is captured."""
        if not self.use_graphs:
            return
        for bucket in {self.bucket_for(b) for b in range(1, PREFILL_BATCH + 1)} - {None}:
            for tokens in PREFILL_ROWS:
                for lora in {False, self.with_lora}:
                    if (bucket, tokens, lora, False, False) not in self.graphs:
                        self.graphs[bucket, tokens, lora, False, False] = self._capture(bucket, tokens, lora, False)

    def _forward(self, bucket: int, tokens: int, lora: bool, tree: bool, max_context: int,
                 from_carry: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if from_carry:
            self._build_from_carry(bucket, tokens, tree)
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
        # a prefill step wider than any round needs the logits of a few rows only: the runner takes
        # them from the hidden states, and the graph does not keep [bucket*T, V] logits alive
        if tokens > self.max_tokens:
            return hidden, None
        return hidden, self.model.logits(hidden, out=self._logits_out(rows) if self.use_graphs else None)

    def _logits_out(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the one logits buffer every decode graph writes: a graph's
        outputs live as long as it does, and a graph of each (bucket, T) the step costs measure
        once held 14 GB of logits at 64 requests (the engine ran out of memory). The pool's
        sizing reserved this buffer (kv_pool: the logits of every row of a full decode batch)."""
        if self.logits_out is None:
            head = self.model.lm_head.weight
            self.logits_out = torch.empty(max(self.buckets) * self.max_tokens, head.shape[0], dtype=head.dtype,
                                          device=self.device)
        return self.logits_out[:rows]

    def _capture(self, bucket: int, tokens: int, lora: bool, tree: bool, from_carry: bool = False):
        torch.cuda.synchronize(self.device)
        with fused_elementwise():
            # compiles this shape's kernels outside the capture (the buffers hold this step's
            # inputs, so the run writes the KV the replay writes again)
            self._forward(bucket, tokens, lora, tree, self.max_positions, from_carry)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # tensor parallel: NCCL's watchdog thread queries events while a graph is captured,
            # which the default ("global") mode forbids to every thread
            mode = "thread_local" if torch.distributed.is_initialized() else "global"
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode):
                hidden, logits = self._forward(bucket, tokens, lora, tree, self.max_positions, from_carry)
        return graph, hidden, logits
