"""OpenAI request and response bodies, with idlm's extra fields, and the OpenAI error body."""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from idlm.config import MAX_STRIDE
from idlm.decoding.rounds import PROPOSALS
from idlm.engine.sampling_params import (
    INT64_MAX,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MODES,
    STRIDE_POLICIES,
    SamplingParams,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# each stop string and stop token id is checked after every token on the engine thread
MAX_STOP = 16
MAX_STOP_TOKEN_IDS = 256
MAX_N = 16  # choices per request; each is a request of its own in the engine
MAX_LOGIT_BIAS_ENTRIES = 1024

Count = Annotated[int, Field(ge=1, le=INT64_MAX)]
Int64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def omitted_if_none(value: Any) -> bool:
    return value is None


class StrictModel(BaseModel):
    # strict: "0.5" is not a temperature; forbid: a misspelt field is an error, as in the OpenAI API;
    # NaN and Infinity (which Python's JSON parser accepts) are no numbers of any field
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = "schema"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """text (free), json_object (any JSON object) or json_schema (JSON valid under the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(StrictModel):
    """Fields both routes share; the last group is idlm's own."""

    model: str | None = Field(default=None, description="may be left out: the server serves one model")
    max_tokens: Count | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE, description="0 = greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: Int64 | None = Field(default=None, description="0 = off")
    seed: Int64 | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = Field(
        default=None, description="token id (as a string) -> bias added to its logit")
    repetition_penalty: float | None = Field(default=None, gt=0, le=MAX_REPETITION_PENALTY, description="1 = off")
    min_p: float | None = Field(default=None, ge=0, le=1, description="0 = off")
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Int64], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    mode: Literal[MODES] | None = Field(default=None, description="default: the server's")
    stride: int | None = Field(default=None, ge=2, le=MAX_STRIDE,
                               description="N: a round proposes N-1 drafts (a maximum under the adaptive policy)")
    proposal: Literal[PROPOSALS] | None = None
    stride_policy: Literal[STRIDE_POLICIES] | None = Field(
        default=None, description="fixed, or adaptive (N is a maximum, chosen per step for throughput); "
                                  "default: the server's")
    branches: int | None = Field(default=None, ge=0, le=MAX_STRIDE - 1,
                                 description="most branch drafts a round adds (0 = none; default: as many as fit)")
    idlm_provenance: bool = Field(default=False, description="stream chunks carry how each token was produced")

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first OpenAI option set to something idlm does not do."""
        if self.response_format is not None and (self.response_format.type == "json_schema") != (
                self.response_format.json_schema is not None):
            return "response_format", "response_format: json_schema (the object) goes with type json_schema, and only"
        return None

    def json_schema(self) -> str | None:
        """The schema the output must satisfy, as text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        return json.dumps(fmt.json_schema.schema_ if fmt.json_schema is not None else {"type": "object"})

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per output token (None: no logprobs)."""
        return None

    def token_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) > INT64_MAX:
                raise APIError(400, f"logit_bias keys are token ids written as strings (\"50256\"), got {key!r}",
                               param="logit_bias")
            bias[int(key)] = value
        return bias

    def sampling_params(self, max_tokens: int | None, defaults: dict[str, Any]) -> SamplingParams:
        """The request's fields over `defaults` (the model's generation config); raises ValueError
        with SamplingParams' message for out-of-range values."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                      stop=self.stop, stop_token_ids=self.stop_token_ids, mode=self.mode, stride=self.stride,
                      proposal=self.proposal, stride_policy=self.stride_policy, branches=self.branches,
                      presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                      repetition_penalty=self.repetition_penalty, min_p=self.min_p, logprobs=self.num_logprobs)
        fields = {k: v for k, v in defaults.items() if k != "max_tokens"} | {
            k: v for k, v in fields.items() if v is not None}
        fields["logit_bias"] = self.token_bias()
        fields["json_schema"] = self.json_schema()
        # a placeholder when None: the engine loop sets it to the room left in the context
        return SamplingParams(**fields, max_tokens=1 if max_tokens is None else max_tokens,
                              ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[Int64] | list[str] | list[list[Int64]]
    echo: bool | None = Field(default=None, description="the prompt's text comes before the completion's")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = Field(
        default=None, description="log-probability of each token and of its likeliest alternatives (this many)")
    best_of: Count | None = None
    suffix: str | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def sampling_params(self, max_tokens: int | None, defaults: dict[str, Any]) -> SamplingParams:
        params = super().sampling_params(max_tokens, defaults)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        if self.suffix:
            return "suffix", "suffix is not supported; leave it out"
        return super().unsupported()

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if prompt and isinstance(prompt, list) and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; idlm takes one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        return prompt


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content or ""
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forwards: int = Field(description="forwards this request took part in")
    tokens_per_forward: float
    accepted_drafts: int
    draft_acceptance: list[float] = Field(description="P(draft j accepted | reached), j = 1..K")


class Provenance(BaseModel):
    """How the tokens of a chunk were produced: 0 target or bonus, 1 accepted draft, 2 correction."""

    sources: list[int]
    tokens: list[str] | None = Field(description="each token decoded alone (None without a tokenizer)")
    token_ids: list[int]
    forwards: int
    tokens_per_forward: float


class CompletionLogprobs(BaseModel):
    """The legacy completions shape; the first echoed prompt token has no logprob (None)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    idlm: Provenance | None = Field(default=None, exclude_if=omitted_if_none)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    idlm: Provenance | None = Field(default=None, exclude_if=omitted_if_none)


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=omitted_if_none)
    content: str | None = Field(default=None, exclude_if=omitted_if_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    idlm: Provenance | None = Field(default=None, exclude_if=omitted_if_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "idlm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(StrictModel):
    """vLLM's /tokenize: a prompt, or a chat rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(default=None, description="default: true for a prompt, false for "
                                                                      "a chat (the template has them)")
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[Int64]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
    deterministic: bool  # batch-invariant kernels (--deterministic): a request's tokens do not depend on its batch


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo
