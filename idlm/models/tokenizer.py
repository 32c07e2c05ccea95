"""The tokenizer of a model folder, for serving and training alike."""

import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase, TokenizersBackend


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it ships none (then only token-id prompts work)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if _names_tokenizers_backend(folder):
            # what AutoTokenizer would pick too, without first loading the model's config class,
            # whose imports (torch.distributed.tensor, sympy) cost ~1.5 s of every CPU start
            return TokenizersBackend.from_pretrained(folder)
        from transformers import AutoTokenizer  # (its import alone is ~0.6 s of a CPU start)

        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load the tokenizer in {folder} ({e}); check its tokenizer files") from e


def _names_tokenizers_backend(folder: Path) -> bool:
    """The folder's tokenizer_config.json names TokenizersBackend (as the GGUF conversion writes it)
    and maps no custom class."""
    path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False  # (AutoTokenizer reports it)
    return config.get("tokenizer_class") == "TokenizersBackend" and "auto_map" not in config


def generation_eos_ids(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError:
        return set()
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
