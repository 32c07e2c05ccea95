from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count

import torch

from idlm.decoding.layout import RoundLayout, round_layout
from idlm.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class TokenSource:
    TARGET = 0  # drawn from the clean distribution: AR, prefill, bonus
    DRAFT = 1  # an accepted draft
    CORRECTION = 2  # drawn from the residual after a rejected draft


@dataclass(slots=True)
class DraftCounts:
    """Per draft position j = 1..K: rounds that fed a draft there, rounds whose scan reached it
    (all earlier drafts accepted), and rounds that accepted it."""

    proposed: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int, times: int = 1) -> None:
        """`times` rounds that fed num_drafts drafts and accepted num_accepted of them."""
        if len(self.proposed) < num_drafts:
            for counts in (self.proposed, self.reached, self.accepted):
                counts.extend([0] * (num_drafts - len(counts)))
        for j in range(num_drafts):
            self.proposed[j] += times
            if j <= num_accepted:
                self.reached[j] += times
                if j < num_accepted:
                    self.accepted[j] += times

    def acceptance(self) -> list[float]:
        """P(draft j accepted | the scan reached it)."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached)]

    def as_dict(self) -> dict[str, list]:
        return {"proposed": list(self.proposed), "reached": list(self.reached), "accepted": list(self.accepted),
                "acceptance": self.acceptance()}


@dataclass(slots=True)
class DraftRows:
    """Where a request's drafts came from: its row of the round that proposed them. hidden
    [B, K, H] (the rows whose logits give each draft's q) and q [B, K] are that round's, shared by
    every request of it, so that keeping them costs no tensor op per request."""

    hidden: torch.Tensor
    q: torch.Tensor
    row: int

    def first(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden rows [d, H] and q [d] of the first d drafts."""
        return self.hidden[self.row, :d], self.q[self.row, :d]


@dataclass(slots=True)
class SequenceStats:
    forwards: int = 0
    preemptions: int = 0
    cold_rounds: int = 0  # rounds with no draft to test that proposed drafts
    verify_rounds: int = 0  # rounds that tested drafts
    branch_rounds: int = 0  # verify rounds whose drafts came from a branch
    branch_drafts_accepted: int = 0
    drafts: DraftCounts = field(default_factory=DraftCounts)


class Sequence:
    """One request. token_ids holds prompt + committed output; the KV of token_ids[:num_computed]
    is in the cache; the last token is pending (returned to the user, its KV not yet computed)."""

    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.prompt_token_ids = list(token_ids)  # a copy for every output, made once
        self.num_prompt_tokens = len(token_ids)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.params = params
        self.seed = seed
        self.finish_reason: str | None = None
        self.stats = SequenceStats()
        self.token_sources: list[int] = []  # TokenSource of each output token
        self.token_q: list[float] = []  # probability each output token was proposed or drawn with
        # params.logprobs set: (log p, [(token, log p) of the likeliest]) of each output token
        self.token_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # of prompt tokens 1..
        self.constraint = None  # params.json_schema set: the grammar state at the committed tokens
        # ISD drafts for the positions after the pending token; they outlive preemption
        self.drafts: list[int] = []
        self.draft_rows: DraftRows | None = None  # q_j(d_j) at proposal time, and the rows that give it
        self.drafts_from_branch = False
        self.tokens_since_verify = 0  # output tokens since its last round that tested drafts (stride policy)
        # the next round's shape, set by the stride policy before each schedule
        self.num_new = 0  # K: drafts it proposes (0: an AR step)
        self.num_branches = 0
        self._layout_key: tuple[int, int, int] | None = None
        self._layout: RoundLayout | None = None

    @property
    def max_new_drafts(self) -> int:
        """The largest K the request allows: stride - 1, 0 for AR."""
        return 0 if self.params.mode == "ar" else self.params.stride - 1

    @property
    def layout(self) -> RoundLayout:
        """The next round: the leading drafts it can test (at most K), K MASKs, the branches."""
        key = (len(self.drafts), self.num_new, self.num_branches)
        if key != self._layout_key:  # asked for several times a step by every part of the engine
            num_drafts = min(key[0], self.num_new)
            self._layout = round_layout(num_drafts, self.num_new, min(self.num_branches, num_drafts))
            self._layout_key = key
        return self._layout

    @property
    def num_lookahead(self) -> int:
        """Rows fed after the pending one: drafts under test, MASKs, branches."""
        return self.layout.num_rows - 1

    @property
    def needs_prompt_rows(self) -> bool:
        """Prompt logprobs are asked for and not all computed: no prefix-cache hit may skip a row."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
