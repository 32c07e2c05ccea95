import gc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from idlm.config import MAX_STRIDE
from idlm.decoding.layout import rows_of
from idlm.decoding.penalties import Penalties
from idlm.decoding.rounds import RoundBatch, propose
from idlm.engine.decode_graphs import DecodeGraphs
from idlm.engine.host_tensor import PinnedRing, host_tensor
from idlm.engine.kv_pool import MAX_DECODE_TOKENS, MAX_LOOKAHEAD, plan_kv_pool
from idlm.engine.next_step import LayoutTable
from idlm.engine.round_graphs import RoundGraphs
from idlm.engine.round_step import (
    RoundExtras,
    RoundResult,
    request_constants,
    round_inputs,
    round_shape,
    run_round,
)
from idlm.engine.sequence import DraftRows, Sequence
from idlm.engine.structured import allowed
from idlm.kernels.attention import (
    FixedSplitPagedAttention,
    PagedAttention,
    PagedBatch,
    TritonPagedAttention,
    padded_block_tables,
)
from idlm.kernels.cpu_memory import zeros
from idlm.kernels.row_attention import RowExactPagedAttention
from idlm.models.cpu_stack import CpuDecoderStack
from idlm.models.transformer import CausalLM

if TYPE_CHECKING:
    from idlm.config import EngineConfig
    from idlm.engine.tensor_parallel import TensorParallel
    from idlm.models.config import ModelConfig


@dataclass(slots=True)
class RoundOutcome:
    """What one round decided for one sequence, on the host, plus the new drafts' device state."""

    num_drafts: int  # drafts that were under test
    accepted: int
    final_token: int
    final_p: float
    drafts_q: list[float]  # q_j(d_j) of the drafts under test
    new_drafts: list[int]
    new_draft_rows: DraftRows | None
    from_branch: bool  # the new drafts came from the branch of the rejected draft
    # per committed token (accepted drafts, then the final one): its log-probability under the
    # model's raw distribution and the (token, log-probability) pairs of the likeliest tokens there
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass(slots=True)
class FeedRows:
    """The rows one sequence feeds this step: a chunk of its committed tokens and, on its final
    chunk, the rest of its round (decoding/layout.py). Row i takes cache slot num_computed + i."""

    ids: list[int]
    positions: list[int]  # RoPE positions (a branch row's is not its slot)
    slots: list[int]
    gate: list[bool]  # the gated LoRA is on (MASK rows of a risd round)
    tree_bits: list[int]  # per row, its visible rows of the round (-1: the chunk's rows before it)
    round_rows: int  # rows of the round at the end (0: not the final chunk)
    branched: bool  # the round has branches, so its visibility is a tree, not causal


@dataclass(slots=True)
class Carry:
    """What a graphed step's round left for the next step of the same requests, on the device:
    row i of each tensor is request seq_ids[i]'s."""

    seq_ids: tuple[int, ...]  # the requests, in batch order
    table: torch.Tensor  # round_step.RoundResult.carry
    new_hidden: torch.Tensor | None = None  # [rows, K, H] the rows that give the new drafts' q
    new_q: torch.Tensor | None = None  # [rows, K] q of the new drafts

    @classmethod
    def of(cls, seqs: list[Sequence], result: RoundResult) -> "Carry":
        return cls(tuple(seq.seq_id for seq in seqs), result.carry, result.new_hidden, result.new_q)

    def then(self, other: "Carry") -> "Carry":
        """This carry's requests followed by other's: the requests of a decode step and those a
        prefill step launched after it brought in, for the decode step after both."""
        n, m = len(self.seq_ids), len(other.seq_ids)
        width = max(self.table.shape[1], other.table.shape[1])
        table = torch.cat([F.pad(self.table[:n], (0, width - self.table.shape[1])),
                           F.pad(other.table[:m], (0, width - other.table.shape[1]))])
        if self.new_hidden is None and other.new_hidden is None:
            return Carry(self.seq_ids + other.seq_ids, table)
        like = self.new_hidden if self.new_hidden is not None else other.new_hidden
        like_q = self.new_q if self.new_q is not None else other.new_q
        k = max(t.shape[1] for t in (self.new_hidden, other.new_hidden) if t is not None)

        def rows(t: torch.Tensor | None, q: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            if t is None:  # a round that drew no drafts: rows nothing reads
                return like.new_zeros(count, k, like.shape[2]), like_q.new_ones(count, k)
            return F.pad(t[:count], (0, 0, 0, k - t.shape[1])), F.pad(q[:count], (0, k - q.shape[1]), value=1.0)

        (h1, q1), (h2, q2) = rows(self.new_hidden, self.new_q, n), rows(other.new_hidden, other.new_q, m)
        return Carry(self.seq_ids + other.seq_ids, table, torch.cat([h1, h2]), torch.cat([q1, q2]))

    def rows_of(self, seqs: list[Sequence]) -> list[int] | None:
        """The row of each of seqs: requests of this carry in its order, those that left since
        left out; None where seqs are not that."""
        ids = tuple(seq.seq_id for seq in seqs)
        if ids == self.seq_ids:  # the same requests (asked two or three times a step)
            return list(range(len(ids)))
        row = {seq_id: i for i, seq_id in enumerate(self.seq_ids)}
        rows = [row.get(seq_id) for seq_id in ids]
        return None if None in rows or rows != sorted(rows) else rows


@dataclass(slots=True)
class PendingRound:
    """A launched step's rounds, whose outcome the host has not read yet (the one device-to-host
    copy is under way: RoundResult.start_read)."""

    seqs: list[Sequence]  # the requests with a round, in round order
    index: list[int]  # their batch indices in the step
    result: RoundResult
    dmax: int
    kmax: int
    top_n: int | None  # logprobs alternatives the round computed


PROMPT_LOGPROB_ROWS = 256  # prompt rows scored at once


def feed_rows(seq: Sequence, n: int, mask_id: int | None, block_size: int) -> FeedRows:
    """Rows of token_ids[num_computed:num_computed + n], plus the round if that is the last chunk."""
    start = seq.num_computed
    ids = seq.token_ids[start:start + n]
    positions = list(range(start, start + n))
    gate = [False] * n
    bits = [-1] * n
    round_rows, branched = 0, False
    if start + n == len(seq):
        layout = seq.layout
        branched = layout.num_branches > 0
        round_rows = layout.num_rows
        d = layout.num_drafts
        ids += seq.drafts[:d] + [mask_id] * (round_rows - 1 - d)
        pending = positions.pop()
        positions += [pending + offset for offset in layout.offsets]
        gate = gate[:-1] + [seq.params.mode == "risd" and m for m in layout.is_mask]
        bits = bits[:-1] + list(layout.visible)
    slots = [seq.block_table[c // block_size] * block_size + c % block_size for c in range(start, start + len(ids))]
    return FeedRows(ids, positions, slots, gate, bits, round_rows, branched)


class ModelRunner:
    """Turns a scheduled batch into tensors, runs the model over the paged KV cache, and runs the
    decoding round. One device-to-host copy per step: the round's decisions."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, mask_ids: dict[str, int | None],
                 banned_token: int | None = None, deterministic: bool = False,
                 tp: "TensorParallel | None" = None, kv_dtype: torch.dtype | None = None):
        cfg = model.cfg
        self.model = model
        # tensor parallel (engine/tensor_parallel.py): model is rank 0's LeaderModel, and the
        # workers build the same KV pool and decode graphs and run every step with it
        self.tp = tp
        if tp is not None:
            tp.send("runner", num_blocks, block_size)
        self.device = next(model.parameters()).device
        self.pinned_ring = PinnedRing(slots=16)
        self.block_size = block_size
        self.mask_ids = mask_ids
        self.banned_token = banned_token
        self.use_triton = TritonPagedAttention.supports(self.device, cfg.head_dim)
        self.with_lora = any("_lora" in name for name, _ in model.named_modules())
        param = next(model.parameters())
        self.dtype = param.dtype  # the activations' (the KV cache may be wider: kv_dtype)
        # one block past the pool: the scratch block that padded rows of decode graphs write to
        self.num_blocks = self.scratch_block = num_blocks
        self.max_model_len: int | None = None  # set by start(), from the pool
        self.kv_cache = zeros((2, cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim),
                              kv_dtype or param.dtype, self.device)
        self.decode_graphs: DecodeGraphs | None = None
        self.round_graphs: RoundGraphs | None = None
        self.cpu_attention = PagedAttention  # RowExactPagedAttention for quantised models and deterministic mode
        self.gpu_attention = FixedSplitPagedAttention if deterministic else TritonPagedAttention
        # a decode step of the same requests as the step before builds its rows on the device from
        # that step's rounds (engine/next_step.py); IDLM_DEVICE_STEPS=0 builds every step on the
        # host (for comparisons)
        self.device_steps = os.environ.get("IDLM_DEVICE_STEPS", "1") != "0"
        self.carry: Carry | None = None
        self.layouts: LayoutTable | None = None

    @classmethod
    def start(cls, model: CausalLM, config: "EngineConfig", model_config: "ModelConfig", name: str,
              mask_ids: dict[str, int | None], banned_token: int | None, row_exact: bool,
              tp: "TensorParallel | None") -> "ModelRunner":
        """The runner and its KV pool, in nano-vllm's order: warm up and size the pool
        (engine/kv_pool.py), allocate it, then capture the decode graphs (CUDA) into what is left.
        row_exact: CPU attention computes each row alone (quantised weights, deterministic mode)."""
        device = next(model.parameters()).device
        # the CPU's row-exact attention reads K/V in float32: a float32 cache holds the same values
        # (bfloat16 widens exactly) converted once when written, not every step for every row's
        # context (at batch 8 on a 2-core CPU those conversions were ~5% of an `ar` step)
        kv_dtype = torch.float32 if row_exact and device.type == "cpu" and tp is None else None
        pool = plan_kv_pool(model, model_config, config, device, name, kv_dtype)
        runner = cls(model, pool.num_blocks, config.kv_block_size, mask_ids, banned_token=banned_token,
                     deterministic=config.deterministic, tp=tp, kv_dtype=kv_dtype)
        runner.max_model_len = pool.max_model_len
        if row_exact:
            runner.cpu_attention = RowExactPagedAttention
            if device.type == "cpu" and tp is None and not config.deterministic:
                model.cpu_stack = CpuDecoderStack.build(model)
        if runner.device.type == "cuda":
            runner.use_padded_decode(config.max_num_seqs, pool.max_model_len + MAX_LOOKAHEAD,
                                     cuda_graphs=not config.enforce_eager and runner.use_triton)
        return runner

    def use_padded_decode(self, max_batch: int, max_positions: int, cuda_graphs: bool) -> None:
        """Decode steps from now on run in the padded [bucket, T] layout, replayed as CUDA graphs
        if cuda_graphs (else eagerly: the CPU check of the layout)."""
        model = self.model
        if self.tp is not None:
            self.tp.send("padded_decode", max_batch, max_positions, cuda_graphs)
            model = self.model.local  # the graphs' forwards are mirrored whole, as packed steps
        self.decode_graphs = DecodeGraphs(model, self.kv_cache, self.scratch_block, max_batch, MAX_DECODE_TOKENS,
                                          max_positions, self.use_triton, cuda_graphs, self.with_lora,
                                          triton_attention=self.gpu_attention)
        if self.tp is not None:
            self.decode_graphs.mirror = self.tp.mirror_step
        self.decode_graphs.capture_prefill()
        self.layouts = self.decode_graphs.layouts = LayoutTable.build(MAX_STRIDE - 1, self.device)
        # under tensor parallelism a round's head calls are collectives the workers join one by
        # one (LeaderModel.logits), which a graph replayed on rank 0 alone cannot hold
        self.round_graphs = RoundGraphs(self.model, self.banned_token, capture=cuda_graphs and self.tp is None)

    def drop_graphs(self) -> None:
        """Frees the captured graphs (at close: NCCL cannot end a communicator a live graph holds)."""
        self.decode_graphs = self.round_graphs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, seqs: list[Sequence], feeds: list[FeedRows]):
        starts = [0]
        for f in feeds:
            starts.append(starts[-1] + len(f.ids))
        width = max(len(seq.block_table) for seq in seqs)
        tables = padded_block_tables([seq.block_table for seq in seqs], width, -1)
        context_lens = [s.num_computed + len(f.ids) for s, f in zip(seqs, feeds)]
        tree = any(f.branched for f in feeds)
        rows = [[x for f in feeds for x in getattr(f, name)] for name in ("ids", "positions", "slots", "gate")]
        extra = [[x for f in feeds for x in f.tree_bits], [f.round_rows for f in feeds]] if tree else []
        ids_t, positions_t, slots_t, gate_t, context_t, tables_t, *tree_t = self._to_device(
            rows + [context_lens, tables] + extra, torch.long)
        batch = PagedBatch(
            slot_mapping=slots_t,
            query_start=starts,
            context_lens=context_t,
            block_tables=tables_t.view(len(seqs), width).int(),
            max_context_len=max(context_lens),
            max_query_len=max(len(f.ids) for f in feeds),
            tree_bits=tree_t[0] if tree else None,
            tree_rows=tree_t[1] if tree else None,
        )
        lora_gate = gate_t.float() if any(rows[3]) else None
        return ids_t, positions_t, batch, lora_gate

    def run(self, seqs: list[Sequence], num_new: list[int]) -> dict[int, RoundOutcome]:
        """Feeds token_ids[num_computed:num_computed + n] of each sequence (plus, on its final
        chunk, the rest of its round); returns the round outcome of each final-chunk sequence, by
        batch index."""
        return self.collect(self.launch(seqs, num_new))

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], num_new: list[int]) -> PendingRound | None:
        """run() up to the point where the host waits for the GPU: the step and its rounds are
        launched, their outcome on its way (collect() reads it). None: no sequence had a round."""
        graphs = self.decode_graphs
        prompt_rows = [i for i, seq in enumerate(seqs) if seq.needs_prompt_rows]
        prefill = any(n > 1 for n in num_new)  # else a decode step: every feed is a whole round
        carry, self.carry = self.carry, None
        if (carry is not None and graphs is not None and not prompt_rows and not prefill and self.tp is None
                and self.device_steps and carry.rows_of(seqs) is not None):
            pending = self._run_built(seqs, self._carried(carry, seqs, drafts=False))
            if pending is not None:
                return pending
        feeds = [feed_rows(seq, n, self.mask_ids.get(seq.params.mode), self.block_size)
                 for seq, n in zip(seqs, num_new)]
        finals = [i for i, f in enumerate(feeds) if f.round_rows]
        if graphs is not None and not prompt_rows:
            tokens = graphs.rows_for(len(seqs), max(len(f.ids) for f in feeds), max(s.num_computed for s in seqs),
                                     prefill)
            if tokens is not None:
                hidden, logits = graphs.run(feeds, [s.num_computed for s in seqs], [s.block_table for s in seqs],
                                            tokens)
                round_starts = [i * tokens + len(feeds[i].ids) - feeds[i].round_rows for i in finals]
                if not finals:
                    return None
                pending = self._launch_round([seqs[i] for i in finals], round_starts, finals, hidden, logits,
                                             graphed=True)
                if prefill and carry is not None and self.carry is not None \
                        and not set(carry.seq_ids) & set(self.carry.seq_ids):
                    # the running requests' carry lives on, the prompts' rows after it: the decode
                    # step of all of them can be built on the device (and launched ahead)
                    self.carry = carry.then(self.carry)
                return pending
        input_ids, positions, batch, lora_gate = self.prepare(seqs, feeds)
        backend = self.gpu_attention if self.use_triton else self.cpu_attention
        hidden = self.model(input_ids, positions, backend(self.kv_cache, batch), lora_gate)
        for i in prompt_rows:
            self._prompt_logprobs(seqs[i], num_new[i], hidden[batch.query_start[i]:batch.query_start[i] + num_new[i]])
        if not finals:
            return None
        round_starts = [batch.query_start[i + 1] - feeds[i].round_rows for i in finals]
        return self._launch_round([seqs[i] for i in finals], round_starts, finals, hidden)

    def graphs_captured(self) -> int:
        """Decode graphs captured and rounds made other than by a replay (captures, and first
        sightings that run eagerly) so far: a step that made one also paid for it."""
        return ((len(self.decode_graphs.graphs) if self.decode_graphs is not None else 0)
                + (self.round_graphs.made if self.round_graphs is not None else 0))

    def can_launch_next(self, seqs: list[Sequence]) -> bool:
        """launch_next can build a decode step of seqs, requests of the carry in its order (those
        that finished meanwhile left out): in the padded layout, from the carry, with no
        host-driven round parts; the block tables aside."""
        carry = self.carry
        return (carry is not None and self.decode_graphs is not None and self.tp is None and self.device_steps
                and carry.rows_of(seqs) is not None
                and not any(self._has_extras(seq) or seq.needs_prompt_rows for seq in seqs))

    def _carried(self, carry: Carry, seqs: list[Sequence], drafts: bool = True) -> Carry:
        """carry restricted to seqs (Carry.rows_of them must not be None): requests before the
        last of them that left, left out; drafts=False: the table alone."""
        rows = carry.rows_of(seqs)
        if rows == list(range(len(seqs))):
            return carry
        (rows_t,) = self._to_device([rows], torch.long)
        take = drafts and carry.new_hidden is not None
        return Carry(tuple(seq.seq_id for seq in seqs), carry.table[rows_t],
                     carry.new_hidden[rows_t] if take else None, carry.new_q[rows_t] if take else None)

    @torch.inference_mode()
    def launch_next(self, seqs: list[Sequence]) -> PendingRound | None:
        """The decode step of seqs after the step that left the carry (and after a prefill step
        launched since, whose requests it brought in), with the plans (K, branch cap) they ran
        with, launched before the host has read that step's outcome (overlap scheduling): its
        rows and its round's inputs are built on the device from the carry, its drafts under test
        are the carry's new drafts, and the host sends only what does not depend on the outcome.
        The block tables must already cover every slot the step can reach. None where it cannot
        be built so: the host then runs it after reading."""
        carry, graphs = self.carry, self.decode_graphs
        if not self.can_launch_next(seqs):
            return None
        # the outcome bounds them: the pending token moves on by at most D + 1, and a round feeds
        # at most the rows of D = K
        starts = [len(seq) + seq.layout.num_drafts for seq in seqs]
        plans = [(seq.num_new, min(seq.num_branches, seq.num_new)) for seq in seqs]
        tokens = graphs.rows_for(len(seqs), max(rows_of(k, k, b) for k, b in plans), max(starts), False)
        if tokens is None:
            return None
        self.carry = None
        modes = [seq.params.mode for seq in seqs]
        lora = self.with_lora and any(mode == "risd" and k for mode, (k, _) in zip(modes, plans))
        tree = any(b for _, b in plans)
        carry = self._carried(carry, seqs)  # requests that finished leave their rows
        n, bucket = len(seqs), graphs.bucket_for(len(seqs))
        shape = round_shape(seqs, bucket, pad_drafts=True)
        constants, floats = request_constants(seqs, bucket)
        drafted = bool(shape.dmax) and carry.new_hidden is not None
        # the round's integers go with the step's plan and block tables, in one copy to the device
        extra = [[x for values in constants for x in values]] + ([list(range(n * shape.dmax))] if drafted else [])
        hidden, logits, extra_t = self._step_from_carry(seqs, carry, starts, tokens, lora, tree, extra)
        stored, stored_q, slots_t = [], [], None
        if drafted:
            stored = [carry.new_hidden[:n, :shape.dmax].flatten(0, 1)]
            stored_q = [carry.new_q[:n, :shape.dmax].flatten()]
            slots_t = extra_t[1]
        # the round's integers are made inside its graph from the state the step was built from
        build = graphs.round_inputs_builder(bucket, tokens, shape)
        graph = self.round_graphs.get(hidden, logits, shape, build, build_key=tokens)
        result = graph.replay(hidden, logits, extra_t[0], floats, self._pinned, stored, stored_q, slots_t)
        self.carry = Carry.of(seqs, result)
        return PendingRound(seqs, list(range(len(seqs))), result.start_read(), shape.dmax, shape.kmax, None)

    def _run_built(self, seqs: list[Sequence], carry: Carry) -> PendingRound | None:
        """A decode step of the requests of the step before, its rows built on the device from
        that step's rounds (next_step.build_step); the host sends only what it decides: each
        request's next K, branch cap and mode, and the block tables. None: the step does not fit
        the padded layout."""
        graphs = self.decode_graphs
        layouts = [seq.layout for seq in seqs]
        starts = [seq.num_computed for seq in seqs]
        tokens = graphs.rows_for(len(seqs), max(lay.num_rows for lay in layouts), max(starts), False)
        if tokens is None:
            return None
        lora = self.with_lora and any(seq.params.mode == "risd" and lay.num_new for seq, lay in zip(seqs, layouts))
        tree = any(lay.num_branches for lay in layouts)
        hidden, logits, _ = self._step_from_carry(seqs, carry, starts, tokens, lora, tree)
        return self._launch_round(seqs, [i * tokens for i in range(len(seqs))], list(range(len(seqs))), hidden,
                                  logits, graphed=True)

    def _step_from_carry(self, seqs: list[Sequence], carry: Carry, starts: list[int], tokens: int, lora: bool,
                         tree: bool, extra: list[list[int]] = ()
                         ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """A device-built step replayed with its build inside the graph (DecodeGraphs.step_from_carry):
        hidden, logits and `extra` (integer lists sent in the same copy as the plan) on the device."""
        plan_t, tables_t, extra_t = self._send_plan(seqs, starts, tokens, extra)
        hidden, logits = self.decode_graphs.step_from_carry(carry.table[:len(seqs)], plan_t, tables_t, tokens, lora,
                                                            tree, max(starts) + tokens)
        return hidden, logits, extra_t

    def _send_plan(self, seqs: list[Sequence], starts: list[int], tokens: int, extra: list[list[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """A device-built step's plan (K, branch cap, MASK id, gated, valid, a row each over the
        bucket, padding entries last: [5, bucket]), its block tables ([bucket, width], covering T
        rows from each start) and `extra`, on the device in one copy."""
        n, bucket = len(seqs), self.decode_graphs.bucket_for(len(seqs))
        width = max(-(-(start + tokens) // self.block_size) for start in starts)
        modes = [seq.params.mode for seq in seqs]
        rows = [[seq.num_new for seq in seqs], [seq.num_branches for seq in seqs],
                [self.mask_ids.get(mode) or 0 for mode in modes], [mode == "risd" for mode in modes]]
        pad = [0] * (bucket - n)
        rows = [row + pad for row in rows] + [[1] * n + pad]
        tables = padded_block_tables([seq.block_table for seq in seqs], width, self.scratch_block, bucket)
        plan_t, tables_t, *extra_t = self._to_device([[x for row in rows for x in row], tables, *extra], torch.long)
        return plan_t.view(len(rows), -1), tables_t.view(bucket, width), extra_t

    def _launch_round(self, seqs: list[Sequence], round_starts: list[int], index: list[int], hidden: torch.Tensor,
                      all_logits: torch.Tensor | None = None, graphed: bool = False) -> PendingRound:
        """The round of each sequence whose pending row is hidden[round_starts[b]]: verify its
        drafts, then draw new ones from the rows that follow the final token (round_step.py).
        graphed: a step in the padded layout (decode_graphs.py), whose round may be replayed as
        a graph too (round_graphs.py)."""
        extras = self._extras(seqs)
        graphs = self.round_graphs if graphed and extras is None else None
        batch = len(seqs) if graphs is None else self.decode_graphs.bucket_for(len(seqs))
        shape = round_shape(seqs, batch, pad_drafts=graphs is not None)
        ints, floats = round_inputs(seqs, round_starts, shape)
        num_d = [seq.layout.num_drafts for seq in seqs]
        shared = self._shared_draft_rows(seqs, num_d, shape.dmax)
        if shared is not None:  # every drafted request's rows are its row of one round: no gather
            n, dmax = len(seqs), shape.dmax
            stored, stored_q = [shared.hidden[:n, :dmax].flatten(0, 1)], [shared.q[:n, :dmax].flatten()]
            slots = list(range(n * dmax))
        else:
            firsts = [seq.draft_rows.first(d) for seq, d in zip(seqs, num_d) if d]
            stored, stored_q = [h for h, _ in firsts], [q for _, q in firsts]
            slots = [b * shape.dmax + j for b, d in enumerate(num_d) for j in range(d)]
        if graphs is not None:
            slots_t = self._to_device([slots], torch.long)[0] if stored else None
            graph = graphs.get(hidden, all_logits, shape)
            result = graph.replay(hidden, all_logits, self._pinned(ints, torch.long), floats, self._pinned, stored,
                                  stored_q, slots_t)
        else:
            ints_t, slots_t = self._to_device([ints, slots], torch.long)
            (floats_t,) = self._to_device([floats], torch.float32)
            stored_hidden = hidden.new_zeros(batch * shape.dmax, hidden.shape[-1])
            draft_q = torch.ones(batch * shape.dmax, device=hidden.device)
            if stored:
                stored_hidden.index_copy_(0, slots_t, torch.cat(stored))
                draft_q.index_copy_(0, slots_t, torch.cat(stored_q).float())
            result = run_round(self.model, hidden, all_logits, ints_t, floats_t, stored_hidden, draft_q, shape,
                               self.banned_token, extras, with_carry=graphed)
        if result.carry is not None:
            self.carry = Carry.of(seqs, result)
        return PendingRound(seqs, index, result.start_read(), shape.dmax, shape.kmax,
                            extras.top_n if extras is not None else None)

    def collect(self, pending: PendingRound | None) -> dict[int, RoundOutcome]:
        """The outcome of a launched step's rounds, by batch index (waits for the GPU). A round's
        drafts under test are the request's drafts now: a step launched ahead (launch_next) is
        collected after the host applied the outcome of the step before it."""
        if pending is None:
            return {}
        h = pending.result.read()
        dmax, kmax, top_n = pending.dmax, pending.kmax, pending.top_n
        outcomes = {}
        for b, seq in enumerate(pending.seqs):
            lay = seq.layout
            d, k = lay.num_drafts, lay.num_new
            keep = bool(kmax) and h["has_new"][b] > 0
            accepted = int(h["accepted"][b])
            outcomes[pending.index[b]] = RoundOutcome(
                num_drafts=d, accepted=accepted, final_token=int(h["final"][b]), final_p=h["final_p"][b],
                drafts_q=h["draft_q"][b * dmax:b * dmax + d],
                new_drafts=[int(x) for x in h["new_drafts"][b * kmax:b * kmax + k]] if keep else [],
                new_draft_rows=DraftRows(pending.result.new_hidden, pending.result.new_q, b) if keep else None,
                from_branch=keep and h["branched"][b] > 0,
                logprobs=None if seq.params.logprobs is None else self._token_logprobs(
                    h, b, accepted + 1, dmax + 1, top_n, seq.params.logprobs),
            )
        return outcomes

    @staticmethod
    def _shared_draft_rows(seqs: list[Sequence], num_d: list[int], dmax: int) -> DraftRows | None:
        """The round whose rows every request with drafts takes from its own batch index (a batch
        of the same requests as the round before), or None. Its first dmax rows per request then
        stand where the drafts under test go; rows past a request's own drafts are padding that
        nothing reads."""
        shared = None
        for b, (seq, d) in enumerate(zip(seqs, num_d)):
            if not d:
                continue
            rows = seq.draft_rows
            if rows.row != b or rows.q.shape[1] < dmax or (shared is not None and rows.q is not shared.q):
                return None
            shared = rows
        # a request that joined since (past the round's batch) has no row there
        return shared if shared is not None and shared.q.shape[0] >= len(seqs) else None

    @staticmethod
    def _has_extras(seq: Sequence) -> bool:
        """The request's round has host-driven parts (_extras)."""
        p = seq.params
        return p.logprobs is not None or p.penalised or seq.constraint is not None

    def _extras(self, seqs: list[Sequence]) -> RoundExtras | None:
        """The host-driven parts of this batch's round (round_step.RoundExtras), or None."""
        params = [seq.params for seq in seqs]
        top_n = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        pen = self._penalties(seqs) if any(p.penalised for p in params) else None
        constrained = [b for b, seq in enumerate(seqs) if seq.constraint is not None]
        if top_n is None and pen is None and not constrained:
            return None
        top_n = None if top_n is None else min(top_n, self.model.cfg.vocab_size)
        if pen is None and not constrained:
            return RoundExtras(top_n=top_n)
        num_d = [seq.layout.num_drafts for seq in seqs]
        dmax = max(num_d)
        # the drafts each row follows, (b, j): seqs[b].drafts[:j]; target rows first, then draft
        # rows (rows past a request's own drafts are padding: any history does)
        history = ([(b, min(j, d)) for b, d in enumerate(num_d) for j in range(dmax + 1)]
                   + [(b, min(j, d)) for b, d in enumerate(num_d) for j in range(dmax)])

        def adjust(logits: torch.Tensor) -> torch.Tensor:
            if pen is not None:
                logits = self._penalise(logits, seqs, pen, history, dmax)
            if constrained:
                logits = self._mask_grammar(logits, seqs, constrained, history, num_d)
            return logits

        def propose_in_order(logits, rb, verdict, probs_of):
            return self._propose_in_order(logits, pen, [(b, seqs[b].constraint) for b in constrained], seqs, rb,
                                          verdict, probs_of)

        return RoundExtras(adjust=adjust, propose=propose_in_order, top_n=top_n)

    def _penalise(self, logits: torch.Tensor, seqs: list[Sequence], pen: tuple[list[int], Penalties],
                  history: list[tuple[int, int]], dmax: int) -> torch.Tensor:
        """The penalties and bias of every row of a penalised request, each after its own history."""
        penalised, state = pen
        owner = {b: i for i, b in enumerate(penalised)}
        picked = [(r, b, j) for r, (b, j) in enumerate(history) if b in owner]
        vocab = logits.shape[-1]
        extra = [x for _, b, j in picked for x in seqs[b].drafts[:j] + [vocab] * (dmax - j)]
        at, owners, extra = self._to_device([[r for r, _, _ in picked], [owner[b] for _, b, _ in picked], extra],
                                            torch.long)
        logits[at] = state.apply(logits[at], owners, extra.view(len(picked), dmax))
        return logits

    def _mask_grammar(self, logits: torch.Tensor, seqs: list[Sequence], constrained: list[int],
                      history: list[tuple[int, int]], num_d: list[int]) -> torch.Tensor:
        """The grammar's mask of every row of a constrained request, after its own history."""
        masks = {b: seqs[b].constraint.bitmask(seqs[b].drafts[:num_d[b]]) for b in constrained}  # [1 + D, words]
        picked = [(r, b, j) for r, (b, j) in enumerate(history) if b in masks]
        at = torch.tensor([r for r, _, _ in picked], dtype=torch.long).to(self.device)
        bitmask = torch.cat([masks[b][j:j + 1] for _, b, j in picked]).to(self.device)
        ok = allowed(bitmask, logits.shape[-1], seqs[constrained[0]].constraint.stop_ids)
        logits[at] = logits[at].masked_fill(~ok, float("-inf"))
        return logits

    def _penalties(self, seqs: list[Sequence]) -> tuple[list[int], Penalties]:
        """The batch indices of the penalised requests, and their state at the pending token."""
        picked = [b for b, seq in enumerate(seqs) if seq.params.penalised]
        ps = [seqs[b].params for b in picked]
        return picked, Penalties.build(
            [seqs[b].output_token_ids for b in picked], [seqs[b].prompt_token_ids for b in picked],
            [(p.presence_penalty, p.frequency_penalty, p.repetition_penalty) for p in ps],
            [p.logit_bias for p in ps], self.model.cfg.vocab_size, self.device)

    @staticmethod
    def _propose_in_order(logits: torch.Tensor, pen: tuple[list[int], Penalties] | None, constrained: list,
                          seqs: list[Sequence], rb: RoundBatch, verdict, probs_of) -> tuple[torch.Tensor, torch.Tensor]:
        """propose() one position at a time, so that each penalised or constrained row follows the
        drafts drawn before it: logits [B, K, V]; the same draws as propose() for the other rows.
        A constrained request's grammar state is advanced on the host (one device-to-host copy
        per position, for such batches only) and rolled back at the end."""
        batch, kmax, vocab = logits.shape
        device = logits.device
        every = torch.arange(batch, device=device)
        if pen is not None:
            penalised, state = pen
            rows = torch.tensor(penalised, dtype=torch.long, device=device)
            drafts = rb.drafts[rows]
            taken = torch.arange(drafts.shape[1], device=device)[None] < verdict.accepted[rows, None]
            state.advance(torch.cat([torch.where(taken, drafts, vocab), verdict.final_token[rows, None]], 1))
            owners = torch.arange(len(penalised), device=device)
            none = torch.full((len(penalised), 1), vocab, dtype=torch.long, device=device)
        tried = []
        if constrained:
            grammar_rows = torch.tensor([b for b, _ in constrained], dtype=torch.long, device=device)
            outcome = torch.stack([verdict.accepted, verdict.final_token], 1)[grammar_rows].tolist()
            tried = [c.try_tokens(seqs[b].drafts[:acc] + [final]) for (b, c), (acc, final) in zip(constrained, outcome)]
        new_drafts, new_q = [], []
        try:
            for j in range(kmax):
                row = logits[:, j].float()
                if pen is not None:
                    row[rows] = state.apply(row[rows], owners, none)
                if constrained:
                    bitmask = torch.cat([c.bitmask([]) for _, c in constrained]).to(device)
                    ok = allowed(bitmask, vocab, constrained[0][1].stop_ids)
                    row[grammar_rows] = row[grammar_rows].masked_fill(~ok, float("-inf"))
                d, q = propose(probs_of(row, every)[:, None], rb.seeds, verdict.final_pos + j, rb.proposal,
                               rb.all_greedy)
                if pen is not None:
                    state.advance(d[rows])
                if constrained:
                    for i, ((_, c), token) in enumerate(zip(constrained, d[grammar_rows].flatten().tolist())):
                        tried[i] += c.try_tokens([token])
                new_drafts.append(d)
                new_q.append(q)
        finally:
            for (_, c), taken in zip(constrained, tried):
                c.rollback(taken)
        return torch.cat(new_drafts, 1), torch.cat(new_q, 1)

    def _prompt_logprobs(self, seq: Sequence, n: int, hidden: torch.Tensor) -> None:
        """The prompt tokens' logprobs that this chunk's rows (positions num_computed ..) predict;
        a chunk recomputed after preemption only fills what is missing."""
        assert seq.num_computed <= len(seq.prompt_logprobs), "a prompt row was skipped"
        start, end = len(seq.prompt_logprobs), min(seq.num_computed + n, seq.num_prompt_tokens - 1)
        if start >= end:
            return
        for a in range(start, end, PROMPT_LOGPROB_ROWS):  # a long prompt's [rows, vocab] would not fit at once
            b = min(a + PROMPT_LOGPROB_ROWS, end)
            lp = self.model.logits(hidden[a - seq.num_computed:b - seq.num_computed]).float().log_softmax(-1)
            targets = torch.tensor(seq.token_ids[a + 1:b + 1], device=lp.device)
            top = lp.topk(min(seq.params.prompt_logprobs, lp.shape[1]), dim=-1)
            chosen, values, ids = (x.tolist() for x in (lp.gather(1, targets[:, None]).squeeze(1), top.values,
                                                        top.indices))
            seq.prompt_logprobs += [(c, list(zip(i, v))) for c, v, i in zip(chosen, values, ids)]

    @staticmethod
    def _token_logprobs(h: dict[str, list[float]], b: int, n: int, rows: int, top_n: int | None,
                        wanted: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """The first n committed tokens' entries of request b, with its `wanted` alternatives."""
        out = []
        for j in range(b * rows, b * rows + n):
            top = [(int(h["top_id"][j * top_n + i]), h["top_logprob"][j * top_n + i])
                   for i in range(min(wanted, top_n))]
            out.append((h["logprob"][j], top))
        return out

    def _pinned(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """values as a host tensor that can be copied to the device asynchronously: copy it
        before the next call (a pinned buffer is reused once its copy is done)."""
        if self.device.type != "cuda":
            return host_tensor(values, dtype)
        return self.pinned_ring.take(values, dtype)

    def _to_device(self, lists: list, dtype: torch.dtype) -> list[torch.Tensor]:
        """The lists as device tensors, through one (pinned, asynchronous) host-to-device copy."""
        host = self._pinned([x for values in lists for x in values], dtype)
        return list(host.to(self.device, non_blocking=True).split([len(values) for values in lists]))
