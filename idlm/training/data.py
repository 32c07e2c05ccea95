"""Training examples from JSONL, and rows (optionally packed) for the objective.

Each line is one of
  {"messages": [{"role": ..., "content": ...}, ...]}   chat template; assistant turns are response
  {"prompt": "...", "completion": "..."}                 the completion is response
  {"text": "..."}                                         all response
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from idlm.training.objective import PackedBatch


@dataclass
class Example:
    input_ids: list[int]
    response: list[bool]


@dataclass
class DataReport:
    examples: int = 0
    tokens: int = 0
    response_tokens: int = 0
    truncated: int = 0
    tokens_cut: int = 0
    dropped: int = 0  # examples with no response token left after truncation

    def summary(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.response_tokens} response); "
                f"{self.truncated} truncated to max_len ({self.tokens_cut} tokens cut), "
                f"{self.dropped} dropped with no response left")


def _tokenize_line(raw: dict, tokenizer) -> Example:
    if "messages" in raw:
        return _chat_example(raw["messages"], tokenizer)
    if "prompt" in raw or "completion" in raw:
        prompt, completion = raw.get("prompt"), raw.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        p = tokenizer.encode(prompt, add_special_tokens=True)
        c = tokenizer.encode(completion, add_special_tokens=False)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return Example(p + c + eos, [False] * len(p) + [True] * (len(c) + len(eos)))
    if "text" in raw:
        if not isinstance(raw["text"], str):
            raise ValueError("'text' must be a string")
        ids = tokenizer.encode(raw["text"], add_special_tokens=True)
        return Example(ids, [True] * len(ids))
    raise ValueError("expected a 'messages', 'prompt'/'completion' or 'text' field")


def _chat_example(messages, tokenizer) -> Example:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError("'messages' must be a non-empty list of {'role': str, 'content': str}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a chat example needs at least one assistant message (the response)")
    ids: list[int] = []
    response: list[bool] = []
    done = ""  # the conversation rendered so far
    for i, message in enumerate(messages):
        is_reply = message["role"] == "assistant"
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=is_reply) \
            if i or is_reply else ""
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError("the chat template does not render conversations incrementally; use prompt/completion")
        for text, flag in ((prefix[len(done):], False), (full[len(prefix):], is_reply)):
            piece = tokenizer.encode(text, add_special_tokens=False) if text else []
            ids += piece
            response += [flag] * len(piece)
        done = full
    return Example(ids, response)


def load_examples(paths: list[str | Path], tokenizer, max_len: int) -> tuple[list[Example], DataReport]:
    """Reads and tokenises every file first, so a malformed line fails before training starts."""
    report = DataReport()
    examples = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"training data {path} does not exist")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                    if not isinstance(raw, dict):
                        raise ValueError("each line must be a JSON object")
                    ex = _tokenize_line(raw, tokenizer)
                except (json.JSONDecodeError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from e
                if len(ex.input_ids) > max_len:
                    report.truncated += 1
                    report.tokens_cut += len(ex.input_ids) - max_len
                    ex = Example(ex.input_ids[:max_len], ex.response[:max_len])
                if not any(ex.response):
                    report.dropped += 1
                    continue
                examples.append(ex)
                report.tokens += len(ex.input_ids)
                report.response_tokens += sum(ex.response)
    report.examples = len(examples)
    if not examples:
        raise ValueError(f"the training data ({', '.join(map(str, paths))}) holds no usable example")
    return examples, report


def make_rows(examples: list[Example], max_len: int, packing: bool) -> list[list[Example]]:
    """Groups examples into rows of at most max_len tokens (one example per row without packing)."""
    if not packing:
        return [[ex] for ex in examples]
    rows, current, used = [], [], 0
    for ex in examples:
        if current and used + len(ex.input_ids) > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        rows.append(current)
    return rows


def collate(rows: list[list[Example]], pad_id: int) -> PackedBatch:
    length = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    response = torch.zeros(len(rows), length, dtype=torch.bool)
    sample = torch.full((len(rows), length), -1, dtype=torch.long)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[r, start:start + n] = torch.tensor(ex.input_ids)
            response[r, start:start + n] = torch.tensor(ex.response)
            sample[r, start:start + n] = s
            positions[r, start:start + n] = torch.arange(n)
            start += n
    return PackedBatch(ids, response, sample, positions)


class RowOrder:
    """Epoch-wise shuffled order of rows, a pure function of (seed, epoch): resuming needs only
    the count of rows already consumed."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for i in range(start, start + count):
            epoch, offset = divmod(i, self.num_rows)
            perm = list(range(self.num_rows))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            out.append(perm[offset])
        return out
