"""Reading evaluation inputs: JSONL with `file:line: reason` errors, and prompt files."""

import gzip
import json
from pathlib import Path
from typing import Any

Conversation = list[dict[str, str]]
Prompt = str | list[int] | Conversation  # text, token ids, or a chat conversation


def read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e})") from e


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; each line must hold a JSON object."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    if not rows:
        raise ValueError(f"{path} holds no line")
    return rows


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and
            all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value))


def read_prompts(path: Path, chat: bool = False) -> list[Prompt]:
    """A text file (one prompt per line) or JSONL of {"prompt": str}, {"prompt_ids": [int]} or
    {"messages": [...]}, either gzipped (.gz). With chat, text prompts become a user message of the
    chat template."""
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        prompts: list[Prompt] = []
        for lineno, obj in read_jsonl(path):
            if isinstance(obj.get("prompt"), str):
                prompts.append(obj["prompt"])
            elif isinstance(obj.get("prompt_ids"), list) and obj["prompt_ids"] and all(
                    isinstance(t, int) for t in obj["prompt_ids"]):
                prompts.append(obj["prompt_ids"])
            elif _is_conversation(obj.get("messages")):
                prompts.append(obj["messages"])
            else:
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": str}}, {{"prompt_ids": [int, ...]}} or '
                                 f'{{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    else:
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path} holds no prompt")
    if chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return prompts


def read_conversations(path: Path) -> list[Conversation]:
    """read_prompts with chat, for uses that need text back (distilled data, chat comparisons):
    token-id prompts are refused."""
    conversations = read_prompts(path, chat=True)
    if any(not (isinstance(c, list) and c and isinstance(c[0], dict)) for c in conversations):
        raise ValueError(f"{path}: distilled data is chat text; give prompts as text or messages, not prompt_ids")
    return conversations
