"""On-policy training data: the base model answers prompts through our engine.

Prompts come from a text file (one prompt per line) or JSONL ({"prompt": ...} or
{"messages": [...]} without the final answer). Output is chat JSONL ({"messages": [..., the
model's answer]}) that `idlm train` reads.
"""

import dataclasses
import json
from pathlib import Path

from idlm.engine.llm import LLM
from idlm.engine.sampling_params import SamplingParams


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    conversations = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            conversations.append([{"role": "user", "content": line.strip()}])
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        if isinstance(raw, dict) and isinstance(raw.get("prompt"), str):
            conversations.append([{"role": "user", "content": raw["prompt"]}])
        elif isinstance(raw, dict) and isinstance(raw.get("messages"), list) and raw["messages"]:
            conversations.append(raw["messages"])
        else:
            raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
    if not conversations:
        raise ValueError(f"prompt file {path} holds no prompt")
    return conversations


def distill(llm: LLM, prompts: Path, out: Path, params: SamplingParams, samples_per_prompt: int = 1) -> int:
    """Writes one chat example per prompt and sample; returns how many were written (answers cut
    by max_tokens are kept: they are still the model's own text)."""
    conversations = read_prompts(prompts) * samples_per_prompt
    if params.seed is None:
        per_request = params
    else:  # one seed for the run, a different draw for every request
        per_request = [dataclasses.replace(params, seed=params.seed + i) for i in range(len(conversations))]
    outputs = llm.chat(conversations, per_request, use_tqdm=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("w", encoding="utf-8") as f:
        for conv, result in zip(conversations, outputs):
            if not result.text.strip():
                continue
            f.write(json.dumps({"messages": conv + [{"role": "assistant", "content": result.text}]}) + "\n")
            written += 1
    return written
