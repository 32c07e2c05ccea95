"""On-policy training data: the base model's own answers to prompts, written as the chat JSONL
({"messages": [..., the model's answer]}) that `idlm train` reads. `idlm distill`
(idlm/cli/distill.py) reads the prompts and answers them with the engine."""

import json
from collections.abc import Callable
from pathlib import Path

Conversation = list[dict[str, str]]


def distill(conversations: list[Conversation], answer: Callable[[list[Conversation]], list[str]], out: Path,
            samples_per_prompt: int = 1) -> int:
    """Writes one chat example per conversation and sample, `answer` giving the replies; returns
    how many were written (empty replies are dropped; replies cut by max_tokens are kept: they are
    still the model's own text)."""
    conversations = conversations * samples_per_prompt
    replies = answer(conversations)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("w", encoding="utf-8") as f:
        for conv, reply in zip(conversations, replies):
            if not reply.strip():
                continue
            f.write(json.dumps({"messages": conv + [{"role": "assistant", "content": reply}]}) + "\n")
            written += 1
    return written
