"""One decoding round for a batch of requests, as batched tensor code (docs/ARCHITECTURE.md, "Decoding").

Every request fed [pending, d_1..d_D, MASK x K] (plus branches, decoding/layout.py) at
positions P..P+D+K, with D = 0 for a cold round (and for prefill, and for AR, where K = 0
too). Output row i predicts position P+i+1, so:
- p_j = dist(row j-1) is the target for draft j (j = 1..D) and p_{D+1} for the token after them;
- `verify`: drafts are scanned left to right, d_j accepted with probability min(1, p_j(d_j) /
  q_j(d_j)); at the first rejection a correction is drawn from normalise(max(0, p_j - q_j)); if
  all D are accepted a bonus is drawn from p_{D+1}; both are the same formula with q = 0 for
  the bonus;
- `propose`: new drafts are drawn from the rows that stand after the final token: the main
  chain's MASKs after a bonus, branch B_j's rows after a correction at j.
AR is the degenerate case D = K = 0. Randomness is keyed by (seed, position, stream), so the
result of a request never depends on its batch mates.
"""

from dataclasses import dataclass

import torch

from idlm.decoding.noise import Stream, uniform
from idlm.decoding.sampling import draw

PROPOSALS = ("sample", "argmax", "argmax_exact")
SAMPLE, ARGMAX, ARGMAX_EXACT = range(3)


@dataclass
class RoundBatch:
    """Padded per-request inputs of a round's verification; B requests, V vocabulary entries."""

    target_probs: torch.Tensor  # [B, Dmax+1, V] p_1..p_{D+1}
    draft_probs: torch.Tensor  # [B, Dmax, V] q_1..q_D the drafts were proposed from (argmax_exact: ignored)
    drafts: torch.Tensor  # [B, Dmax] long
    draft_q: torch.Tensor  # [B, Dmax] q_j(d_j) at proposal time
    num_drafts: torch.Tensor  # [B] long, D
    proposal: torch.Tensor  # [B] long, index into PROPOSALS
    seeds: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B] long, P = position of the pending token
    verify_alpha: torch.Tensor  # [B] float; 1 is exact, other values are a lossy relaxation
    spec_verify: torch.Tensor  # [B] bool; False accepts a draft only if it is the argmax of p (lossy)
    all_greedy: bool = False  # every distribution is one-hot, so draws are argmaxes


@dataclass
class Verdict:
    accepted: torch.Tensor  # [B] leading drafts accepted
    final_token: torch.Tensor  # [B] correction or bonus, the new pending token
    final_p: torch.Tensor  # [B] probability of the final token under p (for introspection stats)
    final_pos: torch.Tensor  # [B] its position


def accept_drafts(p_of_draft: torch.Tensor, q_of_draft: torch.Tensor, u: torch.Tensor,
                  alpha: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The speculative-sampling test, elementwise: u < p(d) / (alpha q(d)), written without a
    division so q = 0 cannot produce nan. alpha = 1 is exact; other values are the reference's
    lossy relaxation."""
    return u * alpha * q_of_draft < p_of_draft


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)) up to its normaliser (draws take unnormalised rows); p where that
    is empty (q >= p everywhere, as when p == q)."""
    rest = (p - q).clamp(min=0)
    return torch.where(rest.sum(-1, keepdim=True) > 0, rest, p)


def verify(rb: RoundBatch) -> Verdict:
    batch, dmax = rb.drafts.shape
    accepted = _scan(rb)
    rows = torch.arange(batch, device=rb.drafts.device)
    p_final = rb.target_probs[rows, accepted]
    rejected = accepted < rb.num_drafts
    if dmax:
        at = accepted.clamp(max=dmax - 1)
        q_rejected = rb.draft_probs[rows, at]
        one_hot = torch.zeros_like(q_rejected).scatter_(1, rb.drafts[rows, at][:, None], 1.0)
        q_rejected = torch.where((rb.proposal == ARGMAX_EXACT)[:, None], one_hot, q_rejected)
        use_q = (rejected & rb.spec_verify)[:, None]
        rest = torch.where(use_q, residual(p_final, q_rejected), p_final)
    else:
        rest = p_final
    final_pos = rb.positions + accepted + 1
    final_token = _draw(rest, rb.seeds, final_pos, Stream.TARGET, rb.all_greedy)
    final_p = p_final.gather(1, final_token[:, None]).squeeze(1)
    return Verdict(accepted, final_token, final_p, final_pos)


def verify_greedy(target: torch.Tensor, drafts: torch.Tensor, draft_q: torch.Tensor, num_drafts: torch.Tensor,
                  positions: torch.Tensor, seeds: torch.Tensor, verify_alpha: torch.Tensor,
                  spec_verify: torch.Tensor) -> Verdict:
    """verify() of a batch whose every distribution is one-hot, from the argmax tokens of its
    target rows (target [B, D + 1]) instead of [B, D + 1, V] probabilities: the same verdict,
    without the vocabulary-wide one-hot rows, the drafts' own distributions (a rejected draft's
    residual against a one-hot p is p) or a second argmax. p of a draft is 1 at the target's
    argmax and 0 elsewhere, so the ratio test, where asked for, keeps its uniforms and alpha."""
    batch, dmax = drafts.shape
    accepted = torch.zeros(batch, dtype=torch.long, device=drafts.device)
    if dmax:
        j = torch.arange(dmax, device=drafts.device)
        matches = drafts == target[:, :dmax]
        draft_pos = positions[:, None] + 1 + j[None]
        u = uniform(seeds[:, None].expand(batch, dmax).reshape(-1), draft_pos.reshape(-1), Stream.ACCEPT)
        ratio_test = accept_drafts(matches.float(), draft_q, u.view(batch, dmax).float(), verify_alpha[:, None])
        ok = torch.where(spec_verify[:, None], ratio_test, matches) & (j[None] < num_drafts[:, None])
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
    final_token = target.gather(1, accepted[:, None]).squeeze(1)
    return Verdict(accepted, final_token, torch.ones(batch, device=drafts.device), positions + accepted + 1)


def greedy_tokens(logits: torch.Tensor, banned_token: int | None = None) -> torch.Tensor:
    """The argmax of each row, as token_probs' one-hot rows put it (a banned token never);
    logits may be overwritten at the banned column."""
    if not logits.is_cuda:
        # the CPU's bfloat16 argmax is not vectorised: 640 us for 8 x 49k logits against 125 us
        # converted to float32 first (a CUDA argmax reads bfloat16 at full speed)
        logits = logits.float()
    if banned_token is not None:
        logits[:, banned_token] = float("-inf")
    return logits.argmax(dim=-1)


def propose(probs: torch.Tensor, seeds: torch.Tensor, final_pos: torch.Tensor, proposal: torch.Tensor,
            all_greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """New drafts [B, K] for positions final_pos + 1.., drawn from probs [B, K, V], with the
    probability each was proposed with (1 for argmax_exact, whose proposal is one-hot)."""
    batch, kmax, vocab = probs.shape
    greedy = probs.argmax(-1)
    if all_greedy:  # one-hot rows: a draw is the argmax
        drafts = greedy
    else:
        k = torch.arange(kmax, device=probs.device)
        positions = (final_pos[:, None] + 1 + k[None]).reshape(-1)
        sampled = _draw(probs.reshape(batch * kmax, vocab), seeds[:, None].expand(batch, kmax).reshape(-1),
                        positions, Stream.DRAFT).view(batch, kmax)
        drafts = torch.where((proposal == SAMPLE)[:, None], sampled, greedy)
    q = probs.gather(2, drafts[..., None]).squeeze(2)
    return drafts, torch.where((proposal == ARGMAX_EXACT)[:, None], torch.ones_like(q), q)


def _draw(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, stream: int,
          one_hot: bool = False) -> torch.Tensor:
    """draw() with the uniforms of (seed, position, stream); one-hot rows need none."""
    if one_hot:
        return probs.argmax(dim=-1)
    return draw(probs, uniform(seeds, positions, stream))


def _scan(rb: RoundBatch) -> torch.Tensor:
    """Number of leading drafts accepted per request."""
    batch, dmax = rb.drafts.shape
    if dmax == 0:
        return torch.zeros(batch, dtype=torch.long, device=rb.drafts.device)
    j = torch.arange(dmax, device=rb.drafts.device)
    p = rb.target_probs[:, :dmax]
    p_of_draft = p.gather(2, rb.drafts[..., None]).squeeze(2)
    draft_pos = rb.positions[:, None] + 1 + j[None]
    u = uniform(rb.seeds[:, None].expand(batch, dmax).reshape(-1), draft_pos.reshape(-1), Stream.ACCEPT)
    u = u.view(batch, dmax).to(p.dtype)
    ratio_test = accept_drafts(p_of_draft, rb.draft_q, u, rb.verify_alpha[:, None])
    argmax_test = rb.drafts == p.argmax(-1)
    ok = torch.where(rb.spec_verify[:, None], ratio_test, argmax_test) & (j[None] < rb.num_drafts[:, None])
    return ok.long().cumprod(dim=1).sum(dim=1)
