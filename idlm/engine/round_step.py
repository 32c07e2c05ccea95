"""A batch's decoding round on the device, in fixed shapes: B requests x Dmax drafts under test x
Kmax new drafts (decoding/rounds.py has the algorithm, decoding/layout.py where the rows sit).

`round_inputs` lays out every per-request value of the round as named host lists of fixed size
(requests past the batch, and drafts past a request's own D, are padding that nothing reads);
`run_round` turns the forward's hidden states (and its logits, where the step computed them)
into the round's outcome: named device tensors plus one packed float64 tensor holding every
value the host reads, so that a round costs one device-to-host copy. With fixed shapes and no
host sync inside, a round with no penalties, grammars or logprobs is replayed as one CUDA graph
(engine/round_graphs.py); with them, the same code runs eagerly with those extras hooked in.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from idlm.decoding.rounds import PROPOSALS, RoundBatch, Verdict, greedy_tokens, propose, verify, verify_greedy
from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.engine.next_step import SlotState, carry_table
from idlm.engine.sequence import Sequence
from idlm.models.transformer import CausalLM

PER_REQUEST_INTS = ("num_drafts", "num_new", "branches", "main_rows", "branch_rows", "proposal", "seeds",
                    "positions", "spec_verify", "top_k")
FLOATS = ("temperature", "top_p", "verify_alpha", "min_p")
PROPOSAL_INDEX = {name: i for i, name in enumerate(PROPOSALS)}


@dataclass(frozen=True, slots=True)
class RoundShape:
    """What fixes a round's tensor shapes and code path (the key of its CUDA graph)."""

    batch: int  # B, requests (a graph's bucket: requests past the real ones are padding)
    dmax: int  # drafts under test, the most of any request
    kmax: int  # new drafts, the most of any request
    all_greedy: bool
    needs_filter: bool  # some request has top-k or top-p
    use_min_p: bool

    def int_sizes(self) -> list[int]:
        b, d = self.batch, self.dmax
        return [b * (d + 1), b * d] + [b] * len(PER_REQUEST_INTS)


INTS = ("target_rows", "drafts") + PER_REQUEST_INTS


def round_shape(seqs: list[Sequence], batch: int, pad_drafts: bool = False) -> RoundShape:
    """pad_drafts: Dmax = Kmax (a request tests at most K drafts), so that a cold round and the
    verify rounds after it share one shape, and one CUDA graph."""
    layouts = [seq.layout for seq in seqs]
    params = [seq.params for seq in seqs]
    kmax = max(lay.num_new for lay in layouts)
    return RoundShape(batch, kmax if pad_drafts else max(lay.num_drafts for lay in layouts), kmax,
                      all(p.temperature == 0 for p in params), any(p.top_k > 0 or p.top_p < 1 for p in params),
                      any(p.min_p for p in params))


def round_inputs(seqs: list[Sequence], round_starts: list[int], shape: RoundShape) -> tuple[list[int], list[float]]:
    """Every integer, then every float, of the round's inputs in INTS / FLOATS order and
    shape.int_sizes(); round_starts[b]: the row of request b's pending token. Requests past the
    batch are greedy, draftless padding."""
    d_max, pad = shape.dmax, shape.batch - len(seqs)
    rows, drafts = [], []
    num_d, num_new, branches, main_rows, branch_rows, positions = [], [], [], [], [], []
    for seq, start in zip(seqs, round_starts):  # a step's host work is per request: kept to plain appends
        lay = seq.layout
        d = lay.num_drafts
        # rows past a request's own drafts repeat its pending row: a distribution nothing reads
        rows += range(start, start + 1 + d)
        rows += [start] * (d_max - d)
        drafts += seq.drafts[:d]
        drafts += [0] * (d_max - d)
        num_d.append(d)
        num_new.append(lay.num_new)
        branches.append(lay.num_branches)
        main_rows.append(start + lay.new_drafts_row)
        branch_rows.append(start + lay.new_drafts_row + lay.num_new)
        positions.append(len(seq.token_ids) - 1)
    (proposal, seeds, spec, top_k), floats = request_constants(seqs, shape.batch)
    zeros = [0] * pad
    ints = (rows + [0] * (pad * (d_max + 1)) + drafts + [0] * (pad * d_max) + num_d + zeros + num_new + zeros
            + branches + zeros + main_rows + zeros + branch_rows + zeros + proposal + seeds + positions + zeros
            + spec + top_k)
    return ints, floats


def request_constants(seqs: list[Sequence], batch: int) -> tuple[list[list[int]], list[float]]:
    """What a round takes from each request's parameters alone, padded to `batch` requests: the
    integers proposal, seeds, spec_verify and top_k (one list each), and every float in FLOATS
    order."""
    pad = batch - len(seqs)
    params = [seq.params for seq in seqs]
    zeros, ones = [0] * pad, [1.0] * pad
    ints = [[PROPOSAL_INDEX[p.proposal] for p in params] + zeros, [seq.seed for seq in seqs] + zeros,
            [int(p.spec_verify) for p in params] + [1] * pad, [p.top_k for p in params] + zeros]
    floats = ([p.temperature for p in params] + zeros + [p.top_p for p in params] + ones
              + [p.verify_alpha for p in params] + ones + [p.min_p for p in params] + zeros)
    return ints, floats


def built_round_inputs(state: SlotState, constants: torch.Tensor, tokens: int, shape: RoundShape) -> torch.Tensor:
    """round_inputs' integers for a decode step built on the device (next_step.build_step, T =
    tokens rows per request), before the host has read the round that left `state`: the values
    that depend on that round's outcome (rows, drafts under test, D, branches, the rows of the
    new drafts, positions) come from the state, the rest from `constants` [4, batch]
    (request_constants' integers). The same values, padding included, as round_inputs gives
    once the host knows the outcome. A state over the whole bucket marks its padding entries
    with state.valid (the graphed build, RoundGraph's `build`): they come out as zeros too."""
    n, b, d_max = state.pending.shape[0], shape.batch, shape.dmax
    device = state.pending.device
    start = torch.arange(n, device=device) * tokens
    num_new, cache_start = state.num_new, state.start
    if state.valid is not None:
        start, num_new, cache_start = (torch.where(state.valid, x, 0) for x in (start, num_new, cache_start))
    d = torch.minimum(state.num_drafts, num_new)
    j = torch.arange(d_max + 1, device=device)[None]
    rows = start[:, None] + torch.where(j <= d[:, None], j, 0)
    drafts = torch.where(j[:, :d_max] < d[:, None], state.drafts[:, :d_max], 0)
    main_rows = start + 1 + d
    if state.valid is not None:
        main_rows = torch.where(state.valid, main_rows, 0)
    per_request = torch.stack([d, num_new, torch.minimum(state.num_branches, d), main_rows, main_rows + num_new])
    extra = b - n  # padding requests: zeros, as round_inputs gives them
    return torch.cat([F.pad(rows, (0, 0, 0, extra)).flatten(), F.pad(drafts, (0, 0, 0, extra)).flatten(),
                      F.pad(per_request, (0, extra)).flatten(), constants[:2].flatten(),
                      F.pad(cache_start, (0, extra)), constants[2:].flatten()])


@dataclass
class RoundExtras:
    """The parts of a round that follow a request's own history on the host: penalties and
    grammar masks (adjust: the logits of target and draft rows), drafts proposed one position
    at a time (propose), and the logprobs of the committed tokens (top_n alternatives)."""

    adjust: Callable[[torch.Tensor], torch.Tensor] | None = None
    propose: Callable | None = None  # (logits [B, K, V], RoundBatch, Verdict, probs_of) -> (drafts, q)
    top_n: int | None = None


@dataclass
class RoundResult:
    packed: torch.Tensor  # float64, every host value, in `names` order
    names: list[tuple[str, int]]  # (name, size) of each packed value
    new_q: torch.Tensor | None  # [B, K] q of the new drafts
    new_hidden: torch.Tensor | None  # [B, K, H] the rows whose logits give the new drafts' q
    carry: torch.Tensor | None = None  # [B, 3 + max(K, 1)] next_step.carry_table
    host: torch.Tensor | None = None  # packed, on its way to the host (start_read)
    ready: torch.cuda.Event | None = None

    def start_read(self) -> "RoundResult":
        """Starts the one device-to-host copy now, so that the next step may be launched (and
        overwrite a graph's static outputs) before read() waits for this one."""
        if self.packed.is_cuda:
            self.host = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
            self.host.copy_(self.packed, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = self.packed.clone()
        return self

    def read(self) -> dict[str, list[float]]:
        """The host values by name, in one device-to-host copy."""
        if self.host is None:
            self.start_read()
        if self.ready is not None:
            self.ready.synchronize()
        values = self.host.tolist()
        out, at = {}, 0
        for name, size in self.names:
            out[name] = values[at:at + size]
            at += size
        return out


def run_round(model: CausalLM, hidden: torch.Tensor, all_logits: torch.Tensor | None, ints: torch.Tensor,
              floats: torch.Tensor, stored_hidden: torch.Tensor | None, draft_q: torch.Tensor, shape: RoundShape,
              banned_token: int | None, extras: RoundExtras | None = None, with_carry: bool = True) -> RoundResult:
    """The round of every request: ints/floats as round_inputs() laid them out, on the device;
    stored_hidden [B*D, H] and draft_q [B*D]: the rows and q of the drafts under test.
    with_carry: also what each request's next round feeds (RoundResult.carry), for a next step
    built on the device."""
    b, d, k = shape.batch, shape.dmax, shape.kmax
    t = dict(zip(INTS, ints.split(shape.int_sizes())))
    f = dict(zip(FLOATS, floats.split(b)))
    vocab = model.cfg.vocab_size
    device = hidden.device
    requests = torch.arange(b, device=device)

    def probs_of(logits: torch.Tensor, request_of_row: torch.Tensor) -> torch.Tensor:
        st = SamplingTensors(f["temperature"][request_of_row], t["top_k"][request_of_row],
                             f["top_p"][request_of_row], t["seeds"][request_of_row], needs_filter=shape.needs_filter,
                             all_greedy=shape.all_greedy,
                             min_p=f["min_p"][request_of_row] if shape.use_min_p else None)
        return token_probs(logits, st, banned_token)

    rows = t["target_rows"]
    # every distribution one-hot and nothing from the host: the verdict and new drafts from argmax
    # tokens (rounds.verify_greedy: no one-hot rows, residuals or second argmax; the same values,
    # tests/test_greedy_round.py), and the drafts' own distributions are never needed
    greedy = shape.all_greedy and extras is None
    own = d and not greedy  # the drafts' own distributions, from the rows that proposed them a round ago
    candidates = candidate_logits = None
    if all_logits is None and model.head_rows_independent():
        # one head call for every row the round may read (the head's weight streamed once, not
        # three times): the targets, the drafts' stored rows, and the rows each outcome would
        # take its new drafts from. A row's logits are the same bits in any call.
        parts = [hidden[rows]] + ([stored_hidden] if own else [])
        if k:
            candidates = new_draft_candidates(t, k, int(t["branches"].max()), hidden.shape[0])
            parts.append(hidden[candidates.flatten()])
        logits = model.logits(torch.cat(parts))
        read = b * (d + 1) + (b * d if own else 0)
        logits, candidate_logits = logits[:read], logits[read:]
    else:
        logits = all_logits[rows] if all_logits is not None else model.logits(hidden[rows])
        if own:
            logits = torch.cat([logits, model.logits(stored_hidden)])
    raw_logprobs = rb = None
    if greedy:
        verdict = verify_greedy(greedy_tokens(logits, banned_token).view(b, d + 1), t["drafts"].view(b, d),
                                draft_q.view(b, d), t["num_drafts"], t["positions"], t["seeds"], f["verify_alpha"],
                                t["spec_verify"].bool())
    else:
        if extras is not None and extras.top_n is not None:
            raw_logprobs = logits[:b * (d + 1)].float().log_softmax(-1).view(b, d + 1, vocab)
        if extras is not None and extras.adjust is not None:
            logits = extras.adjust(logits.float())
        request_of_row = torch.cat([requests.repeat_interleave(d + 1), requests.repeat_interleave(d)])
        probs = probs_of(logits, request_of_row)
        rb = RoundBatch(
            target_probs=probs[:b * (d + 1)].view(b, d + 1, vocab),
            draft_probs=probs[b * (d + 1):].view(b, d, vocab),
            drafts=t["drafts"].view(b, d),
            draft_q=draft_q.view(b, d),
            num_drafts=t["num_drafts"],
            proposal=t["proposal"],
            seeds=t["seeds"],
            positions=t["positions"],
            verify_alpha=f["verify_alpha"],
            spec_verify=t["spec_verify"].bool(),
            all_greedy=shape.all_greedy,
        )
        verdict = verify(rb)
    host = dict(accepted=verdict.accepted, final=verdict.final_token, final_p=verdict.final_p, draft_q=draft_q)
    if raw_logprobs is not None:
        host.update(_committed_logprobs(raw_logprobs, rb.drafts, verdict, extras.top_n))
    new_q = new_hidden = None
    if k:
        accepted = verdict.accepted
        bonus = accepted == t["num_drafts"]
        branched = accepted < t["branches"]
        first = torch.where(bonus, t["main_rows"], t["branch_rows"] + accepted * t["num_new"])
        offsets = torch.arange(k, device=device)
        new_rows = (first[:, None] + offsets[None]).clamp(max=hidden.shape[0] - 1).flatten()
        new_hidden = hidden[new_rows]
        if candidates is not None:
            new_logits = candidate_logits[picked_candidates(candidates, bonus, accepted).flatten()]
        else:
            new_logits = all_logits[new_rows] if all_logits is not None else model.logits(new_hidden)
        if greedy:
            new_drafts = greedy_tokens(new_logits, banned_token).view(b, k)
            new_q = torch.ones(b, k, device=device)  # a one-hot proposal's probability of its draw
        elif extras is not None and extras.propose is not None:
            new_drafts, new_q = extras.propose(new_logits.view(b, k, vocab), rb, verdict, probs_of)
        else:
            new_probs = probs_of(new_logits, requests.repeat_interleave(k))
            new_drafts, new_q = propose(new_probs.view(b, k, vocab), rb.seeds, verdict.final_pos, rb.proposal,
                                        shape.all_greedy)
        new_hidden = new_hidden.view(b, k, -1)
        has_new = (bonus | branched) & (t["num_new"] > 0)
        host.update(has_new=has_new, branched=branched, new_drafts=new_drafts)
    carry = None
    if with_carry:
        if k:
            kept, num_kept = torch.where(has_new[:, None], new_drafts, 0), torch.where(has_new, t["num_new"], 0)
        else:
            kept = torch.zeros(b, 1, dtype=torch.long, device=device)
            num_kept = torch.zeros(b, dtype=torch.long, device=device)
        carry = carry_table(verdict.final_token, t["positions"], verdict.accepted, kept, num_kept)
    packed = torch.cat([x.double().flatten() for x in host.values()])
    return RoundResult(packed, [(name, x.numel()) for name, x in host.items()], new_q, new_hidden, carry)


def new_draft_candidates(t: dict[str, torch.Tensor], k: int, max_branches: int, num_rows: int) -> torch.Tensor:
    """[B, 1 + max_branches, K]: the rows each request's new drafts may come from, the main chain's
    MASK rows first, then each branch's (rows clamped into the forward, as the round's own)."""
    offsets = torch.arange(k, device=t["main_rows"].device)
    main = t["main_rows"][:, None, None] + offsets
    branch = torch.arange(max_branches, device=offsets.device)
    branch_starts = t["branch_rows"][:, None] + branch * t["num_new"][:, None]
    branches = branch_starts[:, :, None] + offsets
    return torch.cat([main, branches], dim=1).clamp(max=num_rows - 1)


def picked_candidates(candidates: torch.Tensor, bonus: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """[B, K] indices into candidates.flatten() (new_draft_candidates) of the rows each request's
    new drafts come from: the main chain's after a bonus, branch j's after a rejection at j <
    branches. A request rejected past its branches proposes nothing this round: the rows it reads
    do not matter."""
    b, choices, k = candidates.shape
    num_branches = choices - 1
    choice = (torch.where(bonus, 0, 1 + accepted.clamp(max=num_branches - 1)) if num_branches
              else torch.zeros_like(accepted))
    requests = torch.arange(b, device=candidates.device)
    return (requests * choices + choice)[:, None] * k + torch.arange(k, device=candidates.device)[None]


def _committed_logprobs(raw_logprobs: torch.Tensor, drafts: torch.Tensor, verdict: Verdict,
                        top_n: int) -> dict[str, torch.Tensor]:
    """Of the committed tokens (drafts up to the accepted ones, then the final one): their
    log-probability and the top_n likeliest tokens, [B, D + 1] each (the host reads the first
    accepted + 1)."""
    committed = torch.cat([drafts, verdict.final_token[:, None]], 1)
    committed.scatter_(1, verdict.accepted[:, None], verdict.final_token[:, None])
    out = {"logprob": raw_logprobs.gather(2, committed[..., None])}
    top_n = min(top_n, raw_logprobs.shape[-1])
    if top_n:
        top = raw_logprobs.topk(top_n, dim=-1)
        out.update(top_logprob=top.values, top_id=top.indices)
    return out
