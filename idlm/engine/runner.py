from dataclasses import dataclass

import torch

from idlm.config import MAX_STRIDE
from idlm.decoding.rounds import PROPOSALS, RoundBatch, run_round
from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.engine.decode_graphs import DecodeGraphs
from idlm.engine.sequence import Sequence
from idlm.kernels.attention import PagedAttention, PagedBatch, TritonPagedAttention
from idlm.models.transformer import CausalLM


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


MAX_DECODE_TOKENS = 2 * MAX_STRIDE - 1  # a verify round feeds 2N - 1 tokens


class ModelRunner:
    """Turns a scheduled batch into tensors, runs the model over the paged KV cache, and runs the
    decoding round. One device-to-host copy per step: the round's decisions."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, mask_ids: dict[str, int | None],
                 banned_token: int | None = None):
        cfg = model.cfg
        self.model = model
        self.device = model.lm_head.weight.device
        self.block_size = block_size
        self.mask_ids = mask_ids
        self.banned_token = banned_token
        self.use_triton = TritonPagedAttention.supports(self.device, cfg.head_dim)
        self.with_lora = any("_lora" in name for name, _ in model.named_modules())
        param = next(model.parameters())
        # one block past the pool: the scratch block that padded rows of decode graphs write to
        self.scratch_block = num_blocks
        self.kv_cache = torch.zeros(2, cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=param.dtype, device=self.device)
        self.decode_graphs: DecodeGraphs | None = None

    def use_padded_decode(self, max_batch: int, max_positions: int, cuda_graphs: bool) -> None:
        """Decode steps from now on run in the padded [bucket, T] layout, replayed as CUDA graphs
        if cuda_graphs (else eagerly: the CPU check of the layout)."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, self.scratch_block, max_batch, MAX_DECODE_TOKENS,
                                          max_positions, self.use_triton, cuda_graphs, self.with_lora)

    def feed(self, seq: Sequence, n: int) -> tuple[list[int], bool]:
        """Tokens seq feeds this step, and whether this is its final chunk (a decoding round)."""
        start = seq.num_computed
        tokens = seq.token_ids[start:start + n]
        final = start + n == len(seq)
        if final and seq.num_new_drafts:
            tokens = tokens + seq.drafts + [self.mask_ids[seq.params.mode]] * seq.num_new_drafts
        return tokens, final

    @staticmethod
    def lora_gate(seq: Sequence, num_tokens: int) -> list[bool]:
        """Per fed token: is the gated LoRA on (the MASK rows of a risd round)?"""
        first_mask = len(seq) - seq.num_computed + len(seq.drafts)  # the K MASKs come last in a final chunk
        lora_on = seq.params.mode == "risd" and num_tokens > first_mask
        return [lora_on and i >= first_mask for i in range(num_tokens)]

    def prepare(self, seqs: list[Sequence], feeds: list[list[int]]):
        ids, positions, slots, gate, starts = [], [], [], [], [0]
        bs = self.block_size
        for seq, tokens in zip(seqs, feeds):
            start = seq.num_computed
            ids.extend(tokens)
            pos = range(start, start + len(tokens))
            positions.extend(pos)
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + len(tokens))
            gate.extend(self.lora_gate(seq, len(tokens)))
        width = max(len(seq.block_table) for seq in seqs)
        tables = [t for seq in seqs for t in seq.block_table + [-1] * (width - len(seq.block_table))]
        context_lens = [s.num_computed + len(f) for s, f in zip(seqs, feeds)]
        ids_t, positions_t, slots_t, context_t, tables_t, gate_t = self._to_device(
            [ids, positions, slots, context_lens, tables, gate], torch.long)
        batch = PagedBatch(
            slot_mapping=slots_t,
            query_start=starts,
            context_lens=context_t,
            block_tables=tables_t.view(len(seqs), width).int(),
            max_context_len=max(context_lens),
            max_query_len=max(len(f) for f in feeds),
        )
        lora_gate = gate_t.float() if any(gate) else None
        return ids_t, positions_t, batch, lora_gate

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int]) -> dict[int, RoundOutcome]:
        """Feeds token_ids[num_computed:num_computed + n] of each sequence (plus, on its final
        chunk, its drafts and MASKs); returns the round outcome of each final-chunk sequence, by
        batch index."""
        fed = [self.feed(seq, n) for seq, n in zip(seqs, num_new)]
        feeds = [tokens for tokens, _ in fed]
        graphs = self.decode_graphs
        if graphs is not None and all(n == 1 for n in num_new):  # a decode step: every feed is final
            starts = [seq.num_computed for seq in seqs]
            tokens = max(len(f) for f in feeds)
            if graphs.fits(len(seqs), tokens, max(starts) + tokens):
                hidden, logits, tokens = graphs.run(feeds, starts, [s.block_table for s in seqs],
                                                    [self.lora_gate(s, len(f)) for s, f in zip(seqs, feeds)])
                ends = [b * tokens + len(f) for b, f in enumerate(feeds)]
                return self._decide(seqs, ends, list(range(len(seqs))), hidden, logits)
        input_ids, positions, batch, lora_gate = self.prepare(seqs, feeds)
        backend = TritonPagedAttention if self.use_triton else PagedAttention
        hidden = self.model(input_ids, positions, backend(self.kv_cache, batch), lora_gate)
        finals = [i for i, (_, final) in enumerate(fed) if final]
        if not finals:
            return {}
        return self._decide([seqs[i] for i in finals], [batch.query_start[i + 1] for i in finals], finals, hidden)

    def _decide(self, seqs: list[Sequence], ends: list[int], index: list[int], hidden: torch.Tensor,
                all_logits: torch.Tensor | None = None):
        num_d = [len(s.drafts) for s in seqs]
        num_k = [s.num_new_drafts for s in seqs]
        dmax, kmax = max(num_d), max(num_k)
        # Rows whose logits we need: from each pending row to the end of its feed, then the stored
        # hidden rows of the drafts under test (their proposal distributions). Everything the
        # round needs from the host is gathered here and sent in one copy per dtype, so nothing
        # below waits for the forward until the single device-to-host copy at the end.
        rows, row_params, stored, stored_params, draft_slots = [], [], [], [], []
        target_idx, new_idx, draft_idx, new_rows = [], [], [], []
        num_rows = sum(1 + d + k for d, k in zip(num_d, num_k))
        pad = num_rows + sum(num_d)  # the zero row appended after all distributions
        offset, stored_offset = 0, num_rows
        for b, (seq, end, d, k) in enumerate(zip(seqs, ends, num_d, num_k)):
            p = seq.params
            sampling = (p.temperature, p.top_k, p.top_p, seq.seed)
            rows.extend(range(end - 1 - d - k, end))
            row_params.extend([sampling] * (1 + d + k))
            if d:
                stored.append(seq.draft_hidden)
                stored_params.extend([sampling] * d)
                draft_slots.extend(range(b * dmax, b * dmax + d))
            target_idx.extend([offset + j for j in range(d + 1)] + [pad] * (dmax - d))
            new_idx.extend([offset + d + 1 + j for j in range(k)] + [pad] * (kmax - k))
            new_rows.extend([offset + d + 1 + j for j in range(k)] + [0] * (kmax - k))
            draft_idx.extend([stored_offset + j for j in range(d)] + [pad] * (dmax - d))
            offset += 1 + d + k
            stored_offset += d
        row_params += stored_params
        temps, top_ks, top_ps, row_seeds = zip(*row_params)
        ints = [rows, target_idx, new_idx, new_rows, draft_idx, draft_slots,
                [t for s, d in zip(seqs, num_d) for t in s.drafts + [0] * (dmax - d)], num_d, num_k,
                [PROPOSALS.index(s.params.proposal) for s in seqs], [s.seed for s in seqs],
                [len(s) - 1 for s in seqs], [int(s.params.spec_verify) for s in seqs], top_ks, row_seeds]
        floats = [temps, top_ps, [float(s.params.verify_alpha) for s in seqs]]
        (rows_t, target_t, new_t, new_rows_t, draft_t, draft_slots_t, drafts_t, num_d_t, num_k_t, proposal_t, seeds_t,
         positions_t, spec_t, top_k_t, row_seeds_t) = self._to_device(ints, torch.long)
        temps_t, top_p_t, alpha_t = self._to_device(floats, torch.float32)

        batch, vocab = len(seqs), self.model.lm_head.weight.shape[0]
        picked = hidden[rows_t]
        if all_logits is None:
            logits = self.model.logits(torch.cat([picked] + stored) if stored else picked)
        else:  # the graph computed the logits of every row
            logits = all_logits[rows_t]
            if stored:
                logits = torch.cat([logits, self.model.logits(torch.cat(stored))])
        st = SamplingTensors(temps_t, top_k_t, top_p_t, row_seeds_t,
                             needs_filter=any(k > 0 or p < 1 for k, p in zip(top_ks, top_ps)),
                             all_greedy=all(t == 0 for t in temps))
        probs = token_probs(logits, st, self.banned_token)
        probs = torch.cat([probs, probs.new_zeros(1, probs.shape[1])])
        draft_q = torch.ones(batch * dmax, device=probs.device)
        if stored:
            draft_q[draft_slots_t] = torch.cat([s.draft_q for s in seqs if s.drafts]).float()
        rb = RoundBatch(
            target_probs=probs[target_t].view(batch, dmax + 1, vocab),
            draft_probs=probs[draft_t].view(batch, dmax, vocab),
            drafts=drafts_t.view(batch, dmax),
            draft_q=draft_q.view(batch, dmax),
            num_drafts=num_d_t,
            new_draft_probs=probs[new_t].view(batch, kmax, vocab),
            num_new=num_k_t,
            proposal=proposal_t,
            seeds=seeds_t,
            positions=positions_t,
            verify_alpha=alpha_t,
            spec_verify=spec_t.bool(),
            all_greedy=st.all_greedy,
        )
        result = run_round(rb)
        new_hidden = picked[new_rows_t].view(batch, kmax, hidden.shape[-1])
        packed = torch.cat([result.accepted[:, None].double(), result.final_token[:, None].double(),
                            result.final_p[:, None].double(), rb.draft_q.double(),
                            result.new_drafts.double()], dim=1).tolist()
        outcomes = {}
        for b, (d, k, row) in enumerate(zip(num_d, num_k, packed)):
            accepted = int(row[0])
            keep = accepted == d and k > 0
            outcomes[index[b]] = RoundOutcome(
                num_drafts=d, accepted=accepted, final_token=int(row[1]), final_p=row[2], drafts_q=row[3:3 + d],
                new_drafts=[int(t) for t in row[3 + dmax:3 + dmax + k]] if keep else [],
                new_draft_q=result.new_draft_q[b, :k] if keep else None,
                new_draft_hidden=new_hidden[b, :k] if keep else None,
            )
        return outcomes

    def _to_device(self, lists: list, dtype: torch.dtype) -> list[torch.Tensor]:
        """The lists as device tensors, through one (pinned, asynchronous) host-to-device copy."""
        host = torch.tensor([x for values in lists for x in values], dtype=dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return list(host.to(self.device, non_blocking=True).split([len(values) for values in lists]))
