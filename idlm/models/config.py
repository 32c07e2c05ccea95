import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idlm.models.shapes import RANDOM_WEIGHTS_KEY

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "sdar")


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    mask_token_id: int | None
    draft_block: int | None  # N - 1: drafts per round the I-DLM was trained for (config.json `block_size`)
    random_weights: bool = False  # a benchmark shape: no weights on disk (idlm.models.shapes)
    # the SDAR-style baseline (idlm_objective: sdar) keeps its MASK id here: never sampled, not ISD's
    sdar_mask_token_id: int | None = None

    @property
    def block_diffusion(self) -> bool:
        return self.sdar_mask_token_id is not None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown architecture model_type={model_type!r}; idlm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        rope = raw.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        qwen3_like = model_type in ("qwen3", "sdar")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            o_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=qwen3_like,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            mask_token_id=raw.get("mask_token_id"),
            draft_block=raw.get("block_size"),
            random_weights=bool(raw.get(RANDOM_WEIGHTS_KEY, False)),
            sdar_mask_token_id=raw.get("sdar_mask_token_id") if raw.get("idlm_objective") == "sdar" else None,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ValueError(f"{folder} has no config.json; pass a Hugging Face model folder or a .gguf file")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e
        return cls.from_dict(raw)

    def rope_inv_freq(self) -> list[float]:
        dim = self.head_dim
        inv_freq = [1.0 / self.rope_theta ** (i / dim) for i in range(0, dim, 2)]
        scaling = self.rope_scaling
        if not scaling:
            return inv_freq
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "linear":
            return [f / scaling["factor"] for f in inv_freq]
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, scaling)
        raise ValueError(f"rope scaling {kind!r} is not supported; supported: linear, llama3")


def _llama3_inv_freq(inv_freq: list[float], s: dict[str, Any]) -> list[float]:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return out
