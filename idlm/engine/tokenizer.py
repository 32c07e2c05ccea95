import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it ships none (then only token-id prompts work)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot load the tokenizer in {folder} ({e}); check its tokenizer files") from e


def generation_eos_ids(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError:
        return set()
    return set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())


class IncrementalDetokenizer:
    """Text of a growing token list, released only when it is final: never half a UTF-8
    character, and never the first characters of what may still become a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, token_ids: list[int], final: bool) -> None:
        """Feed the whole output so far; finds stop strings."""
        if self.tokenizer is None or self.stopped:
            return
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            text = self.text
        self._find_stop(text)

    def release(self, final: bool) -> str:
        """Text that became final since the last release."""
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.holdback)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new

    def _find_stop(self, text: str) -> None:
        start = max(0, len(self.text) - self.holdback)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            self.stopped = True
        else:
            self.text = text
