"""Named model shapes with random weights, for benchmarks: a folder holding only a config.json.

The config carries the real model's hyperparameters, a `mask_token_id` (so `isd` runs) and the
marker RANDOM_WEIGHTS_KEY, on which `load_model` initialises random weights on the target device
instead of reading any from disk."""

import json
import os
from pathlib import Path
from typing import Any

from idlm.models.cache import cache_root

RANDOM_WEIGHTS_KEY = "idlm_random_weights"

_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, head_dim=128,
              max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
              bos_token_id=151643, eos_token_id=151645, mask_token_id=151669)  # the I-DLM release's MASK id

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, mask_token_id=49151),
    # two layers: for tests and quick smoke runs on a CPU
    "tiny": dict(_QWEN3, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                 bos_token_id=0, eos_token_id=1, mask_token_id=255, tie_word_embeddings=False),
}


def shape_config(name: str) -> dict[str, Any]:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return dict(SHAPES[name], torch_dtype="bfloat16", **{RANDOM_WEIGHTS_KEY: True})


def shape_folder(name: str) -> Path:
    """$IDLM_CACHE/shapes/<name> (default ~/.cache/idlm), holding the shape's config.json."""
    text = json.dumps(shape_config(name), indent=2) + "\n"
    folder = cache_root() / "shapes" / name
    path = folder / "config.json"
    if not path.is_file() or path.read_text() != text:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".config.json.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return folder
