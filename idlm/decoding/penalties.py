"""Logit processing that depends on the tokens a position follows: `logit_bias` and the presence,
frequency and repetition penalties, batched for the requests that ask for them.

ISD stays exact when p and q of every position are processed with that position's own history:
the committed tokens, plus the drafts before it in the round (docs/ARCHITECTURE.md, "Logit
processing"). A row's history is the request's history at the pending token plus `extra` tokens."""

from dataclasses import dataclass

import torch


@dataclass
class Penalties:
    """For P penalised requests: output token counts and prompt tokens up to the pending token, and
    their settings; V vocabulary entries."""

    counts: torch.Tensor  # [P, V] float32: occurrences in the output (the pending token included)
    in_prompt: torch.Tensor  # [P, V] bool
    presence: torch.Tensor  # [P, 1] float32
    frequency: torch.Tensor  # [P, 1] float32
    repetition: torch.Tensor  # [P, 1] float32
    bias: torch.Tensor  # [P, V] float32

    @classmethod
    def build(cls, outputs: list[list[int]], prompts: list[list[int]], settings: list[tuple[float, float, float]],
              biases: list[dict[int, float]], vocab: int, device: torch.device) -> "Penalties":
        """outputs, prompts: token ids per request; settings: (presence, frequency, repetition)."""
        p = len(outputs)
        counts = torch.zeros(p, vocab, dtype=torch.float32, device=device)
        owner = torch.tensor([i for i, ids in enumerate(outputs) for _ in ids], dtype=torch.long, device=device)
        ids = torch.tensor([t for ids in outputs for t in ids], dtype=torch.long, device=device)
        counts.index_put_((owner, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
        in_prompt = torch.zeros(p, vocab, dtype=torch.bool, device=device)
        owner = torch.tensor([i for i, ids in enumerate(prompts) for _ in ids], dtype=torch.long, device=device)
        in_prompt[owner, torch.tensor([t for ids in prompts for t in ids], dtype=torch.long, device=device)] = True
        bias = torch.zeros(p, vocab, dtype=torch.float32, device=device)
        owner = torch.tensor([i for i, b in enumerate(biases) for _ in b], dtype=torch.long, device=device)
        bias[owner, torch.tensor([t for b in biases for t in b], dtype=torch.long, device=device)] = torch.tensor(
            [v for b in biases for v in b.values()], dtype=torch.float32, device=device)
        settings_t = torch.tensor(settings, dtype=torch.float32, device=device).view(p, 3, 1)
        presence, frequency, repetition = settings_t.unbind(1)
        return cls(counts, in_prompt, presence, frequency, repetition, bias)

    def apply(self, logits: torch.Tensor, owner: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """logits [R, V] of rows of request owner[r] whose history continues with extra[r] (token
        ids, padded with V); float32."""
        counts = self.counts[owner] + _one_hot_counts(extra, self.counts.shape[1])
        return penalise(logits, counts, self.in_prompt[owner], self.presence[owner], self.frequency[owner],
                        self.repetition[owner], self.bias[owner])

    def advance(self, tokens: torch.Tensor) -> None:
        """Appends tokens [P, E] (padded with V) to each request's output."""
        self.counts += _one_hot_counts(tokens, self.counts.shape[1])


def penalise(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, presence: torch.Tensor,
             frequency: torch.Tensor, repetition: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """logit_bias, then the repetition penalty (prompt and output tokens), then the frequency and
    presence penalties (output tokens), as vLLM orders them."""
    logits = logits.float() + bias
    seen = counts > 0
    factor = torch.where(seen | in_prompt, repetition, 1.0)
    logits = torch.where(logits > 0, logits / factor, logits * factor)
    return logits - frequency * counts - presence * seen.float()


def _one_hot_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.float32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab]
