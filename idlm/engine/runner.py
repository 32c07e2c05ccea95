from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from idlm.decoding.penalties import Penalties
from idlm.decoding.rounds import PROPOSALS, RoundBatch, propose, verify
from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.engine.decode_graphs import DecodeGraphs
from idlm.engine.sequence import Sequence
from idlm.engine.structured import allowed
from idlm.kernels.attention import PagedAttention, PagedBatch, TritonPagedAttention, padded_block_tables
from idlm.kernels.cpu_memory import zeros
from idlm.models.transformer import CausalLM

if TYPE_CHECKING:
    from idlm.engine.tensor_parallel import TensorParallel


@dataclass(slots=True)
class RoundOutcome:
    """What one round decided for one sequence, on the host, plus the new drafts' device state."""

    num_drafts: int  # drafts that were under test
    accepted: int
    final_token: int
    final_p: float
    drafts_q: list[float]  # q_j(d_j) of the drafts under test
    new_drafts: list[int]
    new_draft_q: torch.Tensor | None
    new_draft_hidden: torch.Tensor | None
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


MAX_DECODE_TOKENS = 64  # decoding.layout.MAX_ROUND_ROWS: the widest decode step per request
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
                 banned_token: int | None = None, tp: "TensorParallel | None" = None):
        cfg = model.cfg
        self.model = model
        # tensor parallel (engine/tensor_parallel.py): model is rank 0's LeaderModel, and the
        # workers build the same KV pool and decode graphs and run every step with it
        self.tp = tp
        if tp is not None:
            tp.send("runner", num_blocks, block_size)
        self.device = next(model.parameters()).device
        self.block_size = block_size
        self.mask_ids = mask_ids
        self.banned_token = banned_token
        self.use_triton = TritonPagedAttention.supports(self.device, cfg.head_dim)
        self.with_lora = any("_lora" in name for name, _ in model.named_modules())
        param = next(model.parameters())
        # one block past the pool: the scratch block that padded rows of decode graphs write to
        self.scratch_block = num_blocks
        self.kv_cache = zeros((2, cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim),
                              param.dtype, self.device)
        self.decode_graphs: DecodeGraphs | None = None
        self.cpu_attention = PagedAttention  # the engine sets RowExactPagedAttention for quantised models

    def use_padded_decode(self, max_batch: int, max_positions: int, cuda_graphs: bool) -> None:
        """Decode steps from now on run in the padded [bucket, T] layout, replayed as CUDA graphs
        if cuda_graphs (else eagerly: the CPU check of the layout)."""
        model = self.model
        if self.tp is not None:
            self.tp.send("padded_decode", max_batch, max_positions, cuda_graphs)
            model = self.model.local  # the graphs' forwards are mirrored whole, as packed steps
        self.decode_graphs = DecodeGraphs(model, self.kv_cache, self.scratch_block, max_batch, MAX_DECODE_TOKENS,
                                          max_positions, self.use_triton, cuda_graphs, self.with_lora)
        if self.tp is not None:
            self.decode_graphs.mirror = self.tp.mirror_step
        self.decode_graphs.capture_prefill()

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

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int]) -> dict[int, RoundOutcome]:
        """Feeds token_ids[num_computed:num_computed + n] of each sequence (plus, on its final
        chunk, the rest of its round); returns the round outcome of each final-chunk sequence, by
        batch index."""
        feeds = [feed_rows(seq, n, self.mask_ids.get(seq.params.mode), self.block_size)
                 for seq, n in zip(seqs, num_new)]
        finals = [i for i, f in enumerate(feeds) if f.round_rows]
        graphs = self.decode_graphs
        prompt_rows = [i for i, seq in enumerate(seqs) if seq.needs_prompt_rows]
        if graphs is not None and not prompt_rows:
            prefill = any(n > 1 for n in num_new)  # else a decode step: every feed is a whole round
            tokens = graphs.rows_for(len(seqs), max(len(f.ids) for f in feeds), max(s.num_computed for s in seqs),
                                     prefill)
            if tokens is not None:
                hidden, logits = graphs.run(feeds, [s.num_computed for s in seqs], [s.block_table for s in seqs],
                                            tokens)
                round_starts = [i * tokens + len(feeds[i].ids) - feeds[i].round_rows for i in finals]
                return self._decide([seqs[i] for i in finals], round_starts, finals, hidden, logits) if finals else {}
        input_ids, positions, batch, lora_gate = self.prepare(seqs, feeds)
        backend = TritonPagedAttention if self.use_triton else self.cpu_attention
        hidden = self.model(input_ids, positions, backend(self.kv_cache, batch), lora_gate)
        for i in prompt_rows:
            self._prompt_logprobs(seqs[i], num_new[i], hidden[batch.query_start[i]:batch.query_start[i] + num_new[i]])
        if not finals:
            return {}
        round_starts = [batch.query_start[i + 1] - feeds[i].round_rows for i in finals]
        return self._decide([seqs[i] for i in finals], round_starts, finals, hidden)

    def _decide(self, seqs: list[Sequence], round_starts: list[int], index: list[int], hidden: torch.Tensor,
                all_logits: torch.Tensor | None = None) -> dict[int, RoundOutcome]:
        """The round of each sequence whose pending row is hidden[round_starts[b]]: verify its
        drafts, then draw new ones from the rows that follow the final token. Every host value
        goes to the device in one copy per dtype, and the decisions come back in one copy."""
        layouts = [seq.layout for seq in seqs]
        num_d = [lay.num_drafts for lay in layouts]
        num_k = [lay.num_new for lay in layouts]
        dmax, kmax = max(num_d), max(num_k)
        pad = sum(1 + d for d in num_d) + sum(num_d)  # the zero row appended after all distributions
        rows, stored, target_idx, draft_idx, draft_slots = [], [], [], [], []
        offset, stored_offset = 0, sum(1 + d for d in num_d)
        for b, (seq, start, d) in enumerate(zip(seqs, round_starts, num_d)):
            rows.extend(range(start, start + 1 + d))
            target_idx.extend([offset + j for j in range(d + 1)] + [pad] * (dmax - d))
            draft_idx.extend([stored_offset + j for j in range(d)] + [pad] * (dmax - d))
            if d:
                stored.append(seq.draft_hidden[:d])
                draft_slots.extend(range(b * dmax, b * dmax + d))
            offset += 1 + d
            stored_offset += d
        row_seq = [b for b, d in enumerate(num_d) for _ in range(1 + d)] + [b for b, d in enumerate(num_d)
                                                                            for _ in range(d)]
        params = [s.params for s in seqs]
        temps, top_ks, top_ps, seeds = zip(*[(p.temperature, p.top_k, p.top_p, s.seed) for p, s in zip(params, seqs)])
        # where each request's new drafts come from: main-chain MASKs after a bonus, branch rows
        # B_1.. (one every K rows) after a correction at a branched position
        main_rows = [start + lay.new_drafts_row for start, lay in zip(round_starts, layouts)]
        branch_rows = [start + lay.new_drafts_row + lay.num_new for start, lay in zip(round_starts, layouts)]
        ints = dict(rows=rows, target=target_idx, draft=draft_idx, draft_slots=draft_slots, row_seq=row_seq,
                    drafts=[t for s, d in zip(seqs, num_d) for t in s.drafts[:d] + [0] * (dmax - d)],
                    num_d=num_d, num_k=num_k, branches=[lay.num_branches for lay in layouts],
                    main_rows=main_rows, branch_rows=branch_rows,
                    proposal=[PROPOSALS.index(p.proposal) for p in params], seeds=seeds,
                    positions=[len(s) - 1 for s in seqs], spec=[int(p.spec_verify) for p in params], top_k=top_ks)
        t = dict(zip(ints, self._to_device(list(ints.values()), torch.long)))
        min_ps = [float(p.min_p) for p in params]
        temps_t, top_p_t, alpha_t, min_p_t = self._to_device(
            [temps, top_ps, [float(p.verify_alpha) for p in params], min_ps], torch.float32)
        use_min_p = any(min_ps)
        batch, vocab = len(seqs), self.model.cfg.vocab_size
        all_greedy = all(x == 0 for x in temps)
        needs_filter = any(k > 0 or p < 1 for k, p in zip(top_ks, top_ps))

        def probs_of(logits: torch.Tensor, seq_of_row: torch.Tensor) -> torch.Tensor:
            st = SamplingTensors(temps_t[seq_of_row], t["top_k"][seq_of_row], top_p_t[seq_of_row],
                                 t["seeds"][seq_of_row], needs_filter=needs_filter, all_greedy=all_greedy,
                                 min_p=min_p_t[seq_of_row] if use_min_p else None)
            return token_probs(logits, st, self.banned_token)

        logits = self._logits(hidden, all_logits, t["rows"])
        if stored:
            logits = torch.cat([logits, self.model.logits(torch.cat(stored))])
        num_target = sum(1 + d for d in num_d)
        top_n = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        raw_logprobs = None if top_n is None else logits[:num_target].float().log_softmax(-1)
        # the drafts each row follows, (b, j): seqs[b].drafts[:j]; target rows first, then stored ones
        history = ([(b, j) for b, d in enumerate(num_d) for j in range(1 + d)]
                   + [(b, j) for b, d in enumerate(num_d) for j in range(d)])
        pen = self._penalties(seqs) if any(p.penalised for p in params) else None
        if pen is not None:
            logits = self._penalise(logits.float(), seqs, pen, history, dmax)
        constrained = [b for b, seq in enumerate(seqs) if seq.constraint is not None]
        if constrained:
            logits = self._mask_grammar(logits.float(), seqs, constrained, history, num_d)
        probs = probs_of(logits, t["row_seq"])
        probs = torch.cat([probs, probs.new_zeros(1, vocab)])
        draft_q = torch.ones(batch * dmax, device=probs.device)
        if stored:
            draft_q[t["draft_slots"]] = torch.cat([s.draft_q[:d] for s, d in zip(seqs, num_d) if d]).float()
        rb = RoundBatch(
            target_probs=probs[t["target"]].view(batch, dmax + 1, vocab),
            draft_probs=probs[t["draft"]].view(batch, dmax, vocab),
            drafts=t["drafts"].view(batch, dmax),
            draft_q=draft_q.view(batch, dmax),
            num_drafts=t["num_d"],
            proposal=t["proposal"],
            seeds=t["seeds"],
            positions=t["positions"],
            verify_alpha=alpha_t,
            spec_verify=t["spec"].bool(),
            all_greedy=all_greedy,
        )
        verdict = verify(rb)
        host = dict(accepted=verdict.accepted, final=verdict.final_token, final_p=verdict.final_p,
                    draft_q=rb.draft_q.flatten())
        if raw_logprobs is not None:  # of the committed tokens: drafts up to the accepted ones, then the final
            lp = torch.cat([raw_logprobs, raw_logprobs.new_zeros(1, vocab)])[t["target"]].view(batch, dmax + 1, vocab)
            committed = torch.cat([rb.drafts, verdict.final_token[:, None]], 1)
            committed.scatter_(1, verdict.accepted[:, None], verdict.final_token[:, None])
            host["logprob"] = lp.gather(2, committed[..., None]).flatten()
            top_n = min(top_n, vocab)
            if top_n:
                top = lp.topk(top_n, dim=-1)
                host["top_logprob"], host["top_id"] = top.values.flatten(), top.indices.flatten()
        new_hidden = None
        if kmax:
            accepted = verdict.accepted
            bonus = accepted == rb.num_drafts
            branched = accepted < t["branches"]
            first = torch.where(bonus, t["main_rows"], t["branch_rows"] + accepted * t["num_k"])
            has_new = (bonus | branched) & (t["num_k"] > 0)
            k = torch.arange(kmax, device=first.device)
            new_rows = (first[:, None] + k[None]).clamp(max=hidden.shape[0] - 1).flatten()
            new_hidden = hidden[new_rows]
            new_logits = self._logits(hidden, all_logits, new_rows, new_hidden)
            if pen is None and not constrained:
                new_probs = probs_of(new_logits, torch.arange(batch, device=first.device).repeat_interleave(kmax))
                new_drafts, new_q = propose(new_probs.view(batch, kmax, vocab), rb.seeds, verdict.final_pos,
                                            rb.proposal, all_greedy)
            else:
                new_drafts, new_q = self._propose_in_order(new_logits.view(batch, kmax, vocab), pen,
                                                           [(b, seqs[b].constraint) for b in constrained], seqs, rb,
                                                           verdict, probs_of)
            new_hidden = new_hidden.view(batch, kmax, -1)
            host.update(has_new=has_new, branched=branched, new_drafts=new_drafts.flatten())
        values = torch.cat([x.double() for x in host.values()]).tolist()
        ends = list(accumulate(x.numel() for x in host.values()))
        h = {name: values[a:b] for name, a, b in zip(host, [0] + ends, ends)}
        accepted_h, final_h, final_p_h, draft_q_h = h["accepted"], h["final"], h["final_p"], h["draft_q"]
        has_new_h, branched_h, new_drafts_h = (h["has_new"], h["branched"], h["new_drafts"]) if kmax else (
            [0.0] * batch, [0.0] * batch, [])
        outcomes = {}
        for b, (d, k) in enumerate(zip(num_d, num_k)):
            keep = has_new_h[b] > 0
            accepted_b = int(accepted_h[b])
            outcomes[index[b]] = RoundOutcome(
                num_drafts=d, accepted=accepted_b, final_token=int(final_h[b]), final_p=final_p_h[b],
                drafts_q=draft_q_h[b * dmax:b * dmax + d],
                new_drafts=[int(x) for x in new_drafts_h[b * kmax:b * kmax + k]] if keep else [],
                new_draft_q=new_q[b, :k] if keep else None,
                new_draft_hidden=new_hidden[b, :k] if keep else None,
                from_branch=keep and branched_h[b] > 0,
                logprobs=None if params[b].logprobs is None else self._token_logprobs(
                    h, b, accepted_b + 1, dmax + 1, top_n, params[b].logprobs),
            )
        return outcomes

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

    def _logits(self, hidden: torch.Tensor, all_logits: torch.Tensor | None, rows: torch.Tensor,
                picked: torch.Tensor | None = None) -> torch.Tensor:
        if all_logits is not None:  # the graph computed the logits of every row
            return all_logits[rows]
        return self.model.logits(hidden[rows] if picked is None else picked)

    def _to_device(self, lists: list, dtype: torch.dtype) -> list[torch.Tensor]:
        """The lists as device tensors, through one (pinned, asynchronous) host-to-device copy."""
        host = torch.tensor([x for values in lists for x in values], dtype=dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return list(host.to(self.device, non_blocking=True).split([len(values) for values in lists]))
