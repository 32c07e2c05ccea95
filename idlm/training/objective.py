"""The introspective-consistency objective (docs/ARCHITECTURE.md, "Training").

A row holds one or more samples. The model runs on [x_t | x_0]: x_0 is the clean row, x_t the same
row with every response token replaced by MASK; both halves share position ids, which restart at
each sample. With B = N - 1 MASKs per block, block(i) = position(i) // B. Query q may attend to key
k (same sample, both real tokens) iff
  - both in x_t, same block, k <= q;
  - q in x_t, k in x_0, block(k) < block(q);
  - both in x_0, k <= q.
The output at position i predicts the token at i + 1 in both halves.

`objective: sdar` trains the SDAR-style block-diffusion baseline of issue 7 on the same layout,
changed in exactly the ways that define it: blocks of N tokens (not N - 1); inside a block x_t
tokens attend in both directions; a random fraction of each block's response tokens is MASKed
(ratio t ~ U(0, 1) per block, as masked diffusion trains); and a MASK's output predicts the token
at its own position (no logit shift). The clean half and CE_clean are unchanged, so the baseline
keeps a causal verifier and differs from ours only in how MASKs are trained.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_ROWS = 1024
OBJECTIVES = ("introspective", "sdar")
# What trains a MASK row (docs/TRAINING.md, "Draft losses"): ce, cross-entropy to the data's next
# token; kl, KL(p || q) to the clean stream's distribution p at the same position (the frozen base
# in lora mode, the model's own clean stream, detached, in full mode); tv, the total variation
# 1 - sum(min(p, q)), one minus the probability that a draft sampled from q is accepted; length,
# minus the expected number of a block's drafts accepted in a row, sum_k prod_{j<=k} a_j (a_j the
# acceptance at draft position j): what tokens per forward grows with, where tv counts every position alike.
DRAFT_LOSSES = ("ce", "kl", "tv", "length")
MASKED_LOGIT = -1e9  # the MASK id's logit in the soft losses: never sampled, never a target


@dataclass
class PackedBatch:
    """[rows, L] tensors for the clean half; the model input is twice as long."""

    input_ids: torch.Tensor  # x_0, long
    response: torch.Tensor  # bool: token is a response token
    sample_ids: torch.Tensor  # long: which sample of the row a token belongs to; -1 = padding
    positions: torch.Tensor  # long: position inside its sample

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.response, self.sample_ids, self.positions)))


@dataclass
class DoubledBatch:
    """The [x_t | x_0] model input, [rows, 2L]."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    sample_ids: torch.Tensor
    noisy: torch.Tensor  # bool: position is in the x_t half
    is_mask: torch.Tensor  # bool: position holds a MASK (x_t response tokens)


def double(batch: PackedBatch, mask_token_id: int, masked: torch.Tensor | None = None) -> DoubledBatch:
    """masked: which tokens x_t replaces by MASK; None = every response token (introspective)."""
    masked = batch.response if masked is None else masked
    x_t = torch.where(masked, torch.full_like(batch.input_ids, mask_token_id), batch.input_ids)
    half = torch.zeros_like(batch.response)
    return DoubledBatch(
        input_ids=torch.cat([x_t, batch.input_ids], dim=1),
        positions=torch.cat([batch.positions, batch.positions], dim=1),
        sample_ids=torch.cat([batch.sample_ids, batch.sample_ids], dim=1),
        noisy=torch.cat([~half, half], dim=1),
        is_mask=torch.cat([masked, half], dim=1),
    )


def block_diffusion_noise(batch: PackedBatch, block: int, generator: torch.Generator) -> torch.Tensor:
    """SDAR-style x_t: each (sample, block) draws a ratio t ~ U(0, 1) and MASKs each of its response
    tokens with probability t. Drawn on the CPU from `generator`, so a resumed run redraws the same."""
    rows, length = batch.input_ids.shape
    ratio = torch.rand(rows, length, generator=generator)
    # a block's ratio is the one drawn at its first token (positions restart with each sample)
    block_start = torch.arange(length) - batch.positions.cpu() % block
    t = ratio.gather(1, block_start)
    coin = torch.rand(rows, length, generator=generator)
    return (coin < t).to(batch.response.device) & batch.response


def allowed(noisy_q, noisy_k, pos_q, pos_k, sample_q, sample_k, block: int, bidirectional: bool = False):
    """The three rules, elementwise over broadcast query/key metadata (used densely and by
    FlexAttention's mask_mod). block: positions per block, B = N - 1 (N for sdar); bidirectional:
    x_t tokens of a block see the whole block (sdar)."""
    same_sample = (sample_q == sample_k) & (sample_q >= 0)
    causal = pos_k <= pos_q
    block_q, block_k = pos_q // block, pos_k // block
    noisy_noisy = noisy_q & noisy_k & (block_q == block_k)
    if not bidirectional:
        noisy_noisy = noisy_noisy & causal
    noisy_clean = noisy_q & ~noisy_k & (block_k < block_q)
    clean_clean = ~noisy_q & ~noisy_k & causal
    return same_sample & (noisy_noisy | noisy_clean | clean_clean)


def dense_mask(db: DoubledBatch, block: int, bidirectional: bool = False) -> torch.Tensor:
    """Boolean [rows, 2L, 2L]. Padding rows may attend to themselves so no softmax row is empty."""
    q = lambda t: t[:, :, None]  # noqa: E731
    k = lambda t: t[:, None, :]  # noqa: E731
    mask = allowed(q(db.noisy), k(db.noisy), q(db.positions), k(db.positions), q(db.sample_ids), k(db.sample_ids),
                   block, bidirectional)
    padding = db.sample_ids < 0
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | (eye & padding[:, :, None])


def flex_block_mask(db: DoubledBatch, block: int, bidirectional: bool = False):
    """The same rules as a FlexAttention block mask (no dense [2L, 2L] tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    noisy, pos, sample = db.noisy, db.positions, db.sample_ids

    def mask_mod(b, h, q_idx, kv_idx):
        rule = allowed(noisy[b, q_idx], noisy[b, kv_idx], pos[b, q_idx], pos[b, kv_idx], sample[b, q_idx],
                       sample[b, kv_idx], block, bidirectional)
        return rule | ((q_idx == kv_idx) & (sample[b, q_idx] < 0))

    rows, length = db.input_ids.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=db.input_ids.device), mask_mod


@dataclass
class LossTargets:
    """Rows of the doubled batch that carry a loss, and the tokens they must predict."""

    noisy_rows: torch.Tensor  # flat indices into [rows * 2L]
    noisy_targets: torch.Tensor
    clean_rows: torch.Tensor
    clean_targets: torch.Tensor
    num_response: int  # response tokens in this batch (the step's share of the loss)
    num_noisy: int  # what CE_noisy is averaged over: response tokens, or MASKed tokens (sdar)
    # introspective objective only (None for sdar): for each noisy row, the clean row at the same
    # position (its distribution p is what the MASK row's q is verified against), and the MASK's
    # place in its block, 0 .. B-1 (draft position 1 .. B)
    teacher_rows: torch.Tensor | None = None
    block_pos: torch.Tensor | None = None


def loss_targets(batch: PackedBatch, sdar_masked: torch.Tensor | None = None, block: int | None = None) -> LossTargets:
    """Output i predicts token i + 1 of the same sample. CE_noisy: x_t MASK positions whose next
    token is a response token; CE_clean: x_0 positions whose next token is a response token.
    With sdar_masked (the sdar objective), CE_noisy is over those MASKs instead, each predicting
    the token at its own position. block (B, introspective only) fills block_pos."""
    rows, length = batch.input_ids.shape
    next_response = torch.zeros_like(batch.response)
    same = batch.sample_ids[:, 1:] == batch.sample_ids[:, :-1]
    next_response[:, :-1] = batch.response[:, 1:] & same & (batch.sample_ids[:, :-1] >= 0)
    next_token = torch.zeros_like(batch.input_ids)
    next_token[:, :-1] = batch.input_ids[:, 1:]
    row_base = torch.arange(rows, device=batch.input_ids.device)[:, None] * 2 * length
    col = torch.arange(length, device=batch.input_ids.device)[None]
    clean_sel = next_response
    num_response = int(batch.response.sum())
    if sdar_masked is None:
        noisy_sel = next_response & batch.response
        noisy_targets, num_noisy = next_token[noisy_sel], num_response
    else:
        noisy_sel = sdar_masked
        noisy_targets, num_noisy = batch.input_ids[noisy_sel], int(sdar_masked.sum())
    noisy_rows = (row_base + col)[noisy_sel]
    teacher_rows = block_pos = None
    if sdar_masked is None:
        teacher_rows = noisy_rows + length
        if block is not None:
            block_pos = batch.positions[noisy_sel] % block
    return LossTargets(
        noisy_rows=noisy_rows, noisy_targets=noisy_targets,
        clean_rows=(row_base + length + col)[clean_sel], clean_targets=next_token[clean_sel],
        num_response=num_response, num_noisy=num_noisy, teacher_rows=teacher_rows, block_pos=block_pos,
    )


def summed_ce(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropies, chunked and recomputed in backward, so full-vocabulary logits
    exist for at most LOSS_CHUNK_ROWS rows at a time."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
        h, t = hidden[start:start + LOSS_CHUNK_ROWS], targets[start:start + LOSS_CHUNK_ROWS]
        total = total + checkpoint(_chunk_ce, h, t, lm_head, use_reentrant=False)
    return total


def _chunk_ce(h: torch.Tensor, t: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(lm_head(h).float(), t, reduction="sum")


def draft_terms(logits_q: torch.Tensor, logits_p: torch.Tensor, kind: str, kl_weight: float = 0.0,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the draft loss of q = softmax(logits_q) against p = softmax(logits_p) (p is taken as
    given: detach it before), and the expected acceptance sum(min(p, q)) of a draft sampled from q
    (no gradient). kind: ce (needs targets), kl = KL(p || q), tv = 1 - sum(min(p, q)); kl_weight
    adds that multiple of KL to ce or tv."""
    logq = F.log_softmax(_upcast(logits_q), dim=-1)
    logp = F.log_softmax(_upcast(logits_p), dim=-1)
    p = logp.exp()
    overlap = torch.minimum(p, logq.exp()).sum(-1)
    kl = (p * (logp - logq)).sum(-1) if kind == "kl" or kl_weight else None
    if kind == "ce":
        if targets is None:
            raise ValueError("draft loss ce needs the target tokens")
        loss = -logq.gather(-1, targets[:, None]).squeeze(-1)
    elif kind == "kl":
        loss = kl
    elif kind in ("tv", "length"):  # (length: tv weighted per row by length_weights)
        loss = 1 - overlap
    else:
        raise ValueError(f"draft loss must be one of {', '.join(DRAFT_LOSSES)}, got {kind!r}")
    if kl_weight and kind != "kl":
        loss = loss + kl_weight * kl
    return loss, overlap.detach()


def length_weights(accept: torch.Tensor, block_pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per MASK row j: d E / d a_j, where E = sum_k prod_{m<=k} a_m is the expected number of its
    block's drafts accepted in a row (a: each row's acceptance, block_pos: its draft position - 1,
    rows: its flat index, in order). E is linear in each a_j, so sum_j w_j (1 - a_j) with these w
    detached has the gradient of -E: w_j = prod_{m<j} a_m * (1 + a_{j+1} + a_{j+1} a_{j+2} + ...).
    A block is a run of consecutive rows whose draft positions rise (a response that starts inside a
    block begins its run there)."""
    a = accept.double()
    n = len(a)
    starts = torch.ones(n, dtype=torch.bool, device=a.device)
    if n > 1:
        starts[1:] = (block_pos[1:] <= block_pos[:-1]) | (rows[1:] != rows[:-1] + 1)
    segment = torch.cumsum(starts.long(), 0)
    index = torch.arange(n, device=a.device)
    offset = index - torch.cummax(torch.where(starts, index, 0), 0).values  # place in its run
    before = torch.ones_like(a)  # prod_{m<j} a_m
    after = torch.ones_like(a)  # 1 + a_{j+1} + a_{j+1} a_{j+2} + ...
    longest = int(offset.max()) + 1 if n else 0
    for t in range(1, longest):
        at = (offset == t).nonzero().squeeze(1)
        before[at] = before[at - 1] * a[at - 1]
    for t in range(longest - 2, -1, -1):
        at = (offset == t).nonzero().squeeze(1)
        at = at[(at + 1 < n)]
        at = at[segment[(at + 1).clamp(max=n - 1)] == segment[at]]
        after[at] = 1 + a[at + 1] * after[at + 1]
    return (before * after).to(accept.dtype)


def summed_draft_loss(hidden: torch.Tensor, teacher: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                      kind: str, kl_weight: float = 0.0, banned: int | None = None,
                      block_pos: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                      teacher_head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MASK rows' loss summed over rows, and each row's expected acceptance sum(min(p, q)).
    hidden: the MASK rows; teacher: the clean rows at the same positions, whose softmax is p (no
    gradient flows into them). Chunked and recomputed in backward like summed_ce. `banned` (the
    MASK id, when it is inside the head's vocabulary) is left out of both p and q for kl, tv and
    length: the engine never samples it (ce keeps today's plain softmax, so a ce run trains as
    before). length needs block_pos and rows (length_weights), and a first pass for the
    acceptances its weights are made of. teacher_head: the head that makes p from teacher (default
    lm_head; another model's, for a clean stream held to a frozen copy)."""
    teacher = teacher.detach()
    teacher_head = lm_head if teacher_head is None else teacher_head
    weights = None
    if kind == "length":
        if block_pos is None or rows is None:
            raise ValueError("draft loss length needs each MASK row's draft position and row index")
        with torch.no_grad():
            accept = torch.cat([_chunk_draft(hidden[i:i + LOSS_CHUNK_ROWS], teacher[i:i + LOSS_CHUNK_ROWS],
                                             targets[i:i + LOSS_CHUNK_ROWS], lm_head, teacher_head, "tv", 0.0,
                                             banned)[1]
                                for i in range(0, hidden.shape[0], LOSS_CHUNK_ROWS)] or [hidden.new_zeros(0)])
        weights = length_weights(accept.float(), block_pos, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    accept = []
    for start in range(0, hidden.shape[0], LOSS_CHUNK_ROWS):
        end = start + LOSS_CHUNK_ROWS
        loss, acc = checkpoint(_chunk_draft, hidden[start:end], teacher[start:end], targets[start:end], lm_head,
                               teacher_head, kind, kl_weight, banned, None if weights is None else weights[start:end],
                               use_reentrant=False)
        total = total + loss
        accept.append(acc)
    return total, (torch.cat(accept) if accept else hidden.new_zeros(0, dtype=torch.float32))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for bf16 / fp16 logits; float64 stays (gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _chunk_draft(h, teacher, t, lm_head, teacher_head, kind, kl_weight, banned, weights=None):
    logits_q = _upcast(lm_head(h))
    with torch.no_grad():
        logits_p = _upcast(teacher_head(teacher))
    if kind != "ce" and banned is not None and 0 <= banned < logits_q.shape[-1]:
        logits_q = logits_q.index_fill(-1, torch.tensor([banned], device=h.device), MASKED_LOGIT)
        logits_p = logits_p.index_fill(-1, torch.tensor([banned], device=h.device), MASKED_LOGIT)
    loss, acc = draft_terms(logits_q, logits_p, kind, kl_weight, t)
    return (loss if weights is None else loss * weights).sum(), acc


@dataclass
class Losses:
    loss: torch.Tensor  # what backward() is called on
    ce_noisy: float
    ce_clean: float
    weight: float


def combine(noisy_sum: torch.Tensor, clean_sum: torch.Tensor | None, num_response: int, num_clean: int,
            clean_weight: float | str, denominator: int, num_noisy: int | None = None) -> Losses:
    """L = CE_noisy + w * CE_clean. CE_noisy is summed over its positions and divided by the
    number of response tokens (or by num_noisy, the MASKed tokens, for sdar); CE_clean is a mean.
    With w = "auto", w = sg(CE_noisy) / sg(CE_clean).

    `denominator` is the response-token count of the whole optimizer step (all micro-batches, all
    ranks), so accumulation and data parallelism leave the gradient unchanged; the returned loss is
    this micro-batch's share of the step loss."""
    ce_noisy = noisy_sum / max(num_response if num_noisy is None else num_noisy, 1)
    scale = num_response / max(denominator, 1)
    if clean_sum is None or num_clean == 0:
        return Losses(ce_noisy * scale, float(ce_noisy.detach()), float("nan"), 0.0)
    ce_clean = clean_sum / num_clean
    weight = float(ce_noisy.detach() / ce_clean.detach().clamp(min=1e-8)) if clean_weight == "auto" else clean_weight
    share = (ce_noisy + weight * ce_clean) * scale
    return Losses(share, float(ce_noisy.detach()), float(ce_clean.detach()), weight)
