from dataclasses import dataclass, field

from idlm.config import MAX_STRIDE
from idlm.decoding.rounds import PROPOSALS

MODES = ("ar", "isd", "risd")
STRIDE_POLICIES = ("fixed", "adaptive")


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy; top_k 0 and top_p 1 disable them.

    A request with a seed draws the same tokens whatever shares its batch: every random draw is a
    pure function of (seed, position in the sequence, purpose)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    mode: str | None = None
    stride: int | None = None
    proposal: str | None = None
    stride_policy: str | None = None  # fixed: every round proposes stride - 1; adaptive: stride is a maximum
    branches: int | None = None  # most branch drafts a round may add (None: as many as fit)
    verify_alpha: float = 1.0
    spec_verify: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.stride is not None and (not isinstance(self.stride, int) or not 2 <= self.stride <= MAX_STRIDE):
            raise ValueError(f"stride must be an integer from 2 to {MAX_STRIDE}, got {self.stride!r}")
        if self.proposal is not None and self.proposal not in PROPOSALS:
            raise ValueError(f"unknown proposal {self.proposal!r}; choose one of {', '.join(PROPOSALS)}")
        if self.stride_policy is not None and self.stride_policy not in STRIDE_POLICIES:
            raise ValueError(f"unknown stride_policy {self.stride_policy!r}; "
                             f"choose one of {', '.join(STRIDE_POLICIES)}")
        if self.branches is not None and (not isinstance(self.branches, int) or isinstance(self.branches, bool)
                                          or not 0 <= self.branches < MAX_STRIDE):
            raise ValueError(f"branches must be an integer from 0 to {MAX_STRIDE - 1} (0 = none), "
                             f"got {self.branches!r}")
        if not isinstance(self.verify_alpha, int | float) or self.verify_alpha <= 0:
            raise ValueError(f"verify_alpha must be > 0 (1 = exact), got {self.verify_alpha!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def lossy(self) -> bool:
        """True when the settings give up the AR distribution (only possible at temperature > 0)."""
        relaxed = self.proposal == "argmax" or self.verify_alpha != 1 or not self.spec_verify
        return self.mode in ("isd", "risd") and relaxed and not self.greedy
