"""Benchmark requests: synthetic (random token ids) or read from a JSONL file."""

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass(slots=True)
class FileRequest:
    prompt: str | list[int]
    max_tokens: int | None


def synthetic_requests(n: int, prompt_len: int, output_len: int, vocab: int, seed: int,
                       exclude: set[int]) -> list[Request]:
    """n prompts of prompt_len random ids in [0, vocab) outside `exclude`; request i depends only
    on (seed, i), so a longer list starts with the shorter one."""
    rng = random.Random(seed)
    allowed = [t for t in range(vocab) if t not in exclude]
    return [Request([rng.choice(allowed) for _ in range(prompt_len)], output_len) for _ in range(n)]


def read_workload(path: Path) -> list[FileRequest]:
    """JSONL lines of {"prompt": str or [ids], "max_tokens": int} or {"prompt_ids": [ids], ...};
    max_tokens may be left out."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read workload file {path} ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"workload file {path} is not UTF-8 text ({e})") from e
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg}); a workload line is "
                             f'{{"prompt": "...", "max_tokens": 128}}') from e
        if not isinstance(row, dict):
            raise ValueError(f'{where} must be a JSON object like {{"prompt": "...", "max_tokens": 128}}')
        prompt = row.get("prompt_ids", row.get("prompt"))
        is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) or is_ids) or not prompt:
            raise ValueError(f'{where} needs a non-empty "prompt" (text or a list of token ids) or "prompt_ids"')
        max_tokens = row.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f'{where}: "max_tokens" must be a positive integer, got {max_tokens!r}')
        items.append(FileRequest(prompt, max_tokens))
    if not items:
        raise ValueError(f"workload file {path} holds no requests")
    return items


def tokenize_workload(items: list[FileRequest], tokenizer, vocab: int, output_len: int) -> list[Request]:
    """Token ids for every line (text through the model's tokenizer); output_len where a line
    gives no max_tokens."""
    out = []
    for item in items:
        if isinstance(item.prompt, str):
            if tokenizer is None:
                raise ValueError("the model has no tokenizer: give the workload's prompts as token ids "
                                 '("prompt_ids": [1, 2, 3])')
            ids = tokenizer.encode(item.prompt, add_special_tokens=True)
        else:
            ids = item.prompt
            if not all(0 <= t < vocab for t in ids):
                raise ValueError(f"workload token ids must be in [0, {vocab})")
        out.append(Request(ids, item.max_tokens or output_len))
    return out


def cycle(requests: list[Request], n: int) -> list[Request]:
    """The first n requests, starting over from the first when the list is shorter."""
    return [requests[i % len(requests)] for i in range(n)]
