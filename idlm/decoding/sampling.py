"""Per-request token distributions and draws from them, batched, on the model's device.

Greedy rows become one-hot distributions, so the same draw (and, later, the same speculative
acceptance rule) covers greedy and sampled requests without a separate path."""

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [rows] float32, 0 = greedy
    top_k: torch.Tensor  # [rows] int64, 0 = off
    top_p: torch.Tensor  # [rows] float32
    seeds: torch.Tensor  # [rows] int64
    needs_filter: bool
    all_greedy: bool
    min_p: torch.Tensor | None = None  # [rows] float32, 0 = off; None: off for every row

    @classmethod
    def build(cls, rows: list[tuple[float, int, float, int]], device: torch.device,
              min_p: list[float] | None = None) -> "SamplingTensors":
        """rows: (temperature, top_k, top_p, seed) per output row."""
        temps, ks, ps, seeds = zip(*rows, strict=True)
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32, device=device),
            top_k=torch.tensor(ks, dtype=torch.long, device=device),
            top_p=torch.tensor(ps, dtype=torch.float32, device=device),
            seeds=torch.tensor(seeds, dtype=torch.long, device=device),
            needs_filter=any(k > 0 or p < 1 for _, k, p, _ in rows),
            all_greedy=all(t == 0 for t, _, _, _ in rows),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device) if min_p and any(min_p) else None,
        )


def token_probs(logits: torch.Tensor, st: SamplingTensors, banned_token: int | None = None) -> torch.Tensor:
    """The distribution each row samples from: temperature, then min-p, then top-k, then top-p;
    greedy rows are one-hot at the argmax. float32 [rows, vocab]."""
    logits = logits.float()
    if banned_token is not None:
        logits[:, banned_token] = float("-inf")
    one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if st.all_greedy:
        return one_hot
    greedy = st.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, st.temperature)[:, None]
    if st.min_p is not None:  # p(x) < min_p * max p  <=>  logit(x) < max logit + log(min_p)
        floor = scaled.max(dim=-1, keepdim=True).values + st.min_p.log()[:, None]
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
    if st.needs_filter:
        scaled = _top_k_top_p(scaled, st.top_k, st.top_p)
    return torch.where(greedy[:, None], one_hot, scaled.softmax(dim=-1))


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (rank >= k) | (mass_before >= top_p[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def draw(probs: torch.Tensor, u: torch.Tensor, one_hot: bool = False) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from (unnormalised) probs, given uniforms u [rows].
    one_hot: every row is known to be one-hot (all greedy), so the draw is its argmax."""
    if one_hot:
        return probs.argmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    threshold = u[:, None] * cdf[:, -1:]
    return (cdf < threshold).sum(dim=-1).clamp(max=probs.shape[-1] - 1)
