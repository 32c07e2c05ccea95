import math
from dataclasses import dataclass, field

from idlm.config import MAX_STRIDE
from idlm.decoding.rounds import PROPOSALS

MODES = ("ar", "isd", "risd")
STRIDE_POLICIES = ("fixed", "adaptive")
INT64_MAX = 2**63 - 1  # seeds and top-k travel to the device as int64
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-6  # a positive temperature below this overflows float32 logits (use 0 for greedy)
MIN_TOP_P = 2.0**-126  # float32's smallest normal number: the sampler holds top_p in float32
MAX_LOGPROBS = 20  # most alternatives a token's logprobs list (OpenAI's and vLLM's default limit)
MAX_PENALTY = 2.0  # presence and frequency penalties, as OpenAI
MAX_REPETITION_PENALTY = 100.0
MAX_LOGIT_BIAS = 100.0


def is_int(value, lo: int, hi: int = INT64_MAX) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    # the processing applied to p and q alike, in this order: logit_bias, the penalties, temperature,
    # min_p, top-k, top-p (docs/ARCHITECTURE.md, "Logit processing")
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    min_p: float = 0.0  # drops tokens whose probability is below min_p times the likeliest one's
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits of these token ids
    logprobs: int | None = None  # the model's log-probability of each output token, and of its top `logprobs`
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    json_schema: str | None = None  # the output is JSON valid under this schema (its text), masked by a grammar

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = dict(self.logit_bias)
        self.validate()

    def validate(self) -> None:
        t = self.temperature
        if not is_real(t):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if t < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t!r}")
        if t > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_p < MIN_TOP_P:
            raise ValueError(f"top_p must be in (0, 1] and at least {MIN_TOP_P:.4g} (float32's smallest normal "
                             f"number), got {self.top_p!r}")
        if not is_int(self.top_k, 0):
            raise ValueError(f"top_k must be an integer from 0 (off) to 2**63 - 1, got {self.top_k!r}")
        if not is_int(self.max_tokens, 1):
            raise ValueError(f"max_tokens must be an integer >= 1 and below 2**63, got {self.max_tokens!r}")
        if self.seed is not None and not is_int(self.seed, 0):
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.stride is not None and not is_int(self.stride, 2, MAX_STRIDE):
            raise ValueError(f"stride must be an integer from 2 to {MAX_STRIDE}, got {self.stride!r}")
        if self.proposal is not None and self.proposal not in PROPOSALS:
            raise ValueError(f"unknown proposal {self.proposal!r}; choose one of {', '.join(PROPOSALS)}")
        if self.stride_policy is not None and self.stride_policy not in STRIDE_POLICIES:
            raise ValueError(f"unknown stride_policy {self.stride_policy!r}; "
                             f"choose one of {', '.join(STRIDE_POLICIES)}")
        if self.branches is not None and not is_int(self.branches, 0, MAX_STRIDE - 1):
            raise ValueError(f"branches must be an integer from 0 to {MAX_STRIDE - 1} (0 = none), "
                             f"got {self.branches!r}")
        if not is_real(self.verify_alpha) or self.verify_alpha <= 0:
            raise ValueError(f"verify_alpha must be > 0 (1 = exact) and finite, got {self.verify_alpha!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if not all(is_int(t, 0) for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of integers from 0 to 2**63 - 1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_real(value) or abs(value) > MAX_PENALTY:
                raise ValueError(f"{name} must be a number from -{MAX_PENALTY:g} to {MAX_PENALTY:g}, got {value!r}")
        r = self.repetition_penalty
        if not is_real(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), got {r!r}")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        for token, bias in self.logit_bias.items():
            if not is_int(token, 0) or not is_real(bias) or abs(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias maps token ids (integers >= 0) to numbers from -{MAX_LOGIT_BIAS:g} to "
                                 f"{MAX_LOGIT_BIAS:g}, got {token!r}: {bias!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be a JSON schema as text, got {type(self.json_schema).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not is_int(value, 0, MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer from 0 to {MAX_LOGPROBS} (the alternatives returned per "
                                 f"token), got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """The request's logits depend on the tokens before them (penalties) or carry a bias."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias))

    @property
    def lossy(self) -> bool:
        """True when the settings give up the AR distribution (only possible at temperature > 0)."""
        relaxed = self.proposal == "argmax" or self.verify_alpha != 1 or not self.spec_verify
        return self.mode in ("isd", "risd") and relaxed and not self.greedy
