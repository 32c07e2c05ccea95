"""Decoders for the SDAR-style block-diffusion baseline (`idlm train` with `objective: sdar`), for
measuring its alpha and TPF against ours (issue 7). Dense forwards over the whole sequence (the
prompts batched, right-padded), no KV cache: a measuring tool, not a serving path.

Such a model fills a block of N MASKs in one forward: the MASKs see the committed prefix causally
and each other in both directions, and the output at a MASK is a guess for the token at that same
position (no logit shift). Its clean stream is an ordinary causal LM (CE_clean trained it), the
verifier p.

- `parallel_decode`: the baseline's own decoding, all N tokens of a block from one forward (TPF N,
  not exact). Each token's q is kept; alpha = mean min(1, p/q) with p from one causal forward over
  prompt + output (docs/ARCHITECTURE.md, "Statistics"), as `idlm eval alpha` does for ISD.
- `exact_decode`: lossless decoding with its MASKs as the proposal, in rounds shaped like ISD's: one
  forward over committed + drafts + N MASKs verifies the drafts on the clean rows; when all are
  accepted, the MASK block's first guess is verified at once against the last clean row (both
  describe the same position), and its other N - 1 guesses are the next round's drafts. Rejection
  is the usual min(1, p/q) test with a residual draw, so the output has the clean stream's
  distribution, and at greedy it is its greedy output.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from idlm.decoding.rounds import accept_drafts, residual
from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.kernels.attention import DenseAttention
from idlm.models.transformer import CausalLM


@dataclass
class BlockDiffusionModel:
    model: CausalLM
    mask_id: int
    block: int  # N: tokens a block holds


def read_sdar_keys(folder: str | Path) -> tuple[int, int]:
    """(MASK id, block size) from a checkpoint that `idlm train` saved with objective sdar."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: pass the checkpoint folder `idlm train` wrote")
    raw = json.loads(path.read_text())
    if raw.get("idlm_objective") != "sdar":
        raise ValueError(f"{folder} is not an SDAR-style checkpoint (config.json has no idlm_objective: sdar); "
                         "train one with `idlm train` and `objective: sdar`")
    return int(raw["sdar_mask_token_id"]), int(raw["sdar_block_size"])


@dataclass
class Decoded:
    tokens: list[int]
    q: list[float]  # probability each token was proposed with
    forwards: int
    reached: list[int] = field(default_factory=list)  # per block position: guesses that were tested
    accepted: list[int] = field(default_factory=list)


class ProbabilityRule:
    """The distribution every row samples from (temperature, top-k, top-p; one-hot at greedy)."""

    def __init__(self, temperature: float, top_k: int, top_p: float, mask_id: int, device):
        self.row = (temperature, top_k, top_p, 0)
        self.mask_id, self.device = mask_id, device

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        st = SamplingTensors.build([self.row] * logits.shape[0], self.device)
        return token_probs(logits, st, self.mask_id if self.mask_id < logits.shape[-1] else None)


def _forward(bd: BlockDiffusionModel, seqs: list[list[int]], clean_lens: list[int],
             rows: list[range]) -> list[torch.Tensor]:
    """One dense forward over right-padded sequences, each = clean rows (causal) + a MASK block
    (sees the clean rows and the whole block); returns, per sequence, the logits of `rows`."""
    device = next(bd.model.parameters()).device
    length = max(map(len, seqs))
    x = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.eye(length, dtype=torch.bool).repeat(len(seqs), 1, 1)  # padding rows see themselves
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, (seq, clean) in enumerate(zip(seqs, clean_lens)):
        n = len(seq)
        x[b, :n] = torch.tensor(seq)
        mask[b, :n, :n] = causal[:n, :n]
        mask[b, clean:n, clean:n] = True
    positions = torch.arange(length).expand(len(seqs), length)
    hidden = bd.model(x.to(device), positions.to(device), DenseAttention(mask.to(device)))
    picked = torch.cat([hidden[b, r.start:r.stop] for b, r in enumerate(rows)])
    return list(bd.model.logits(picked).float().split([len(r) for r in rows]))


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1], True
    return tokens, False


@torch.inference_mode()
def parallel_decode(bd: BlockDiffusionModel, prompts: list[list[int]], max_tokens: int, probs: ProbabilityRule,
                    eos_ids: set[int], generator: torch.Generator) -> list[Decoded]:
    """The baseline's own decoding, the prompts batched: a block of N tokens per forward."""
    n = bd.block
    outs = [Decoded([], [], 0) for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        clean = [prompts[i] + outs[i].tokens for i in active]
        logits = _forward(bd, [c + [bd.mask_id] * n for c in clean], [len(c) for c in clean],
                          [range(len(c), len(c) + n) for c in clean])
        still = []
        for i, block_logits in zip(active, logits):
            out, dist = outs[i], probs(block_logits)
            out.forwards += 1
            block = [_draw(row, generator) for row in dist]
            q = [float(dist[j, t]) for j, t in enumerate(block)]
            block, stop = _cut_at_eos(block[:max_tokens - len(out.tokens)], eos_ids)
            out.tokens += block
            out.q += q[:len(block)]
            if not stop and len(out.tokens) < max_tokens:
                still.append(i)
        active = still
    return outs


def _verify(out: Decoded, new: list[int], position: int, guess: int, q: torch.Tensor, p: torch.Tensor,
            generator: torch.Generator) -> bool:
    """The min(1, p/q) test of a guess drawn from q at this block position: appends the emitted
    token (the guess, or a draw from the residual) to `new` and its proposal probability to out.q."""
    out.reached[position] += 1
    if accept_drafts(p[guess], q[guess], torch.rand((), generator=generator)):
        out.accepted[position] += 1
        new.append(guess)
        out.q.append(float(q[guess]))
        return True
    new.append(_draw(residual(p, q), generator))
    out.q.append(float(p[new[-1]]))
    return False


@torch.inference_mode()
def exact_decode(bd: BlockDiffusionModel, prompts: list[list[int]], max_tokens: int, probs: ProbabilityRule,
                 eos_ids: set[int], generator: torch.Generator) -> list[Decoded]:
    """Lossless decoding with the MASK guesses as proposals, the prompts batched (one forward a
    round for all of them)."""
    n = bd.block
    outs = [Decoded([], [], 0, reached=[0] * n, accepted=[0] * n) for _ in prompts]
    drafts: list[list[tuple[int, torch.Tensor]]] = [[] for _ in prompts]  # (token, its proposal), positions 1..
    active = list(range(len(prompts)))
    while active:
        committed = [prompts[i] + outs[i].tokens for i in active]
        clean = [c + [t for t, _ in drafts[i]] for i, c in zip(active, committed)]
        # per sequence: the clean stream's p for each draft, then for the next position; then the block
        logits = _forward(bd, [c + [bd.mask_id] * n for c in clean], [len(c) for c in clean],
                          [range(len(m) - 1, len(c) + n) for m, c in zip(committed, clean)])
        still = []
        for i, rows in zip(active, logits):
            out, k = outs[i], len(drafts[i])
            out.forwards += 1
            p, mask_q = probs(rows[:k + 1]), probs(rows[k + 1:])
            new: list[int] = []
            next_drafts: list[tuple[int, torch.Tensor]] = []
            if all(_verify(out, new, j + 1, token, q, p[j], generator) for j, (token, q) in enumerate(drafts[i])):
                # every draft stands: the block's first guess is for the position the last clean
                # row predicts, so it is tested now; the others become the next round's drafts
                block = [_draw(row, generator) for row in mask_q]
                if _verify(out, new, 0, block[0], mask_q[0], p[-1], generator):
                    next_drafts = list(zip(block[1:], mask_q[1:]))
            drafts[i] = next_drafts
            kept, stop = _cut_at_eos(new[:max_tokens - len(out.tokens)], eos_ids)
            out.tokens += kept
            out.q = out.q[:len(out.tokens)]
            if not stop and len(out.tokens) < max_tokens:
                still.append(i)
        active = still
    return outs


@torch.inference_mode()
def clean_probs(bd: BlockDiffusionModel, prompt: list[int], tokens: list[int], probs: ProbabilityRule) -> torch.Tensor:
    """p_k(x_k) of each output token under the clean causal stream (one forward)."""
    ids = prompt + tokens
    (logits,) = _forward(bd, [ids], [len(ids)], [range(len(prompt) - 1, len(ids) - 1)])
    return probs(logits).gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1).double().cpu()
