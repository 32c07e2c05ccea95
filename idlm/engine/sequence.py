from dataclasses import dataclass
from enum import Enum, auto
from itertools import count

from idlm.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True)
class SequenceStats:
    forwards: int = 0
    preemptions: int = 0


class Sequence:
    """One request. token_ids holds prompt + committed output; the KV of token_ids[:num_computed]
    is in the cache; the last token is pending (returned to the user, its KV not yet computed)."""

    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed = 0
        self.num_cached = 0
        self.block_table: list[int] = []
        self.params = params
        self.seed = seed
        self.finish_reason: str | None = None
        self.stats = SequenceStats()

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

    @property
    def in_prefill(self) -> bool:
        """More than the pending token is still uncomputed (new, or preempted and recomputing)."""
        return len(self.token_ids) - self.num_computed > 1

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
