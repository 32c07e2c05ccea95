import warnings
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import yaml

# The widest stride N any part decodes or trains: kernels, CUDA graphs and the KV lookahead are
# sized for its verify round of 2N - 1 tokens.
MAX_STRIDE = 16


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; ValueError with a clear message otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {what} {path} ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML ({e})") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path} must be a mapping of keys to values")
    return raw


@dataclass(slots=True)
class EngineConfig:
    """How the engine is built. None/auto fields are resolved when the engine starts."""

    model: str | None = None  # HF folder, .gguf file, Hugging Face hub id (from its cache), or None: the default
    dtype: str = "auto"  # bfloat16 on CUDA; CPU: float32, or bfloat16 with quantised weights on a bf16 CPU
    quantization: str = "auto"  # none | gguf | int8 | int4; auto: gguf for a quantised GGUF on the CPU
    device: str = "auto"  # cuda when available
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # prefill tokens per step; longer prompts are chunked
    kv_cache_tokens: int | None = None
    kv_block_size: int = 16  # tokens per page of the paged KV cache
    max_model_len: int | None = None  # None: the model's context, or what the KV pool holds if less
    chat_template: str | None = None  # a Jinja file or inline template instead of the tokenizer's
    generation_config: str = "auto"  # sampling defaults: auto (the model's generation_config.json), vllm, a path
    enable_prefix_caching: bool = True
    seed: int | None = None  # seeds the per-request seeds of requests that bring none
    progress: bool = True
    adapter: str | None = None  # gated-LoRA (R-ISD) adapter folder; None: the shipped one for the default model; "none"
    mode: str | None = None  # default decoding mode: risd with an adapter, isd for I-DLM checkpoints, else ar
    stride: int | None = None  # default N: an I-DLM checkpoint's training block + 1, else 4
    proposal: str = "sample"
    stride_policy: str = "adaptive"  # adaptive: the stride is a maximum, each step picks K and branches for speed
    branches: int | None = None  # most branch drafts per round (None: as many as fit; 0: none)
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying CUDA graphs
    # CUDA: launch each decode step of the same requests before reading the outcome of the
    # one before, so the host's work on that outcome overlaps the GPU's step (same tokens either way)
    overlap_scheduling: bool = True
    gpu_memory_utilization: float = 0.9  # CUDA: share of the GPU memory the engine may use in all
    # batch-invariant kernels: a request's tokens do not depend on what shares its batch, and greedy
    # isd/risd equal ar bit for bit (CUDA: kernels/batch_invariant.py; CPU: row-exact attention)
    deterministic: bool = False
    tensor_parallel_size: int = 1  # processes (GPUs) one model is split over; the engine starts the others
    block_size: InitVar[int | None] = None  # deprecated name of kv_block_size

    def __post_init__(self, block_size: int | None) -> None:
        if block_size is not None:
            warnings.warn("EngineConfig(block_size=...) is deprecated; use kv_block_size (tokens per KV cache page)",
                          FutureWarning, stacklevel=3)
            self.kv_block_size = block_size

    def validate(self) -> None:
        if not (isinstance(self.gpu_memory_utilization, int | float) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be true or false, got {self.deterministic!r}")
        if self.deterministic and isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size > 1:
            raise ValueError("deterministic mode does not run under tensor parallelism yet; use "
                             "--tensor-parallel-size 1 with --deterministic")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2 (prompt + output tokens), "
                             f"got {self.max_model_len!r}")
        if self.kv_cache_tokens is not None and (not isinstance(self.kv_cache_tokens, int)
                                                 or self.kv_cache_tokens < self.kv_block_size):
            raise ValueError(f"kv_cache_tokens must be an integer >= kv_block_size ({self.kv_block_size}), "
                             f"got {self.kv_cache_tokens!r}")


# The InitVar's default would otherwise read as an attribute: None instead of the page size.
del EngineConfig.block_size
