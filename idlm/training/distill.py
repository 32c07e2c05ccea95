"""On-policy training data: the base model answers prompts through our engine.

Prompts come from a text file (one prompt per line) or JSONL ({"prompt": ...} or
{"messages": [...]} without the final answer). Output is chat JSONL ({"messages": [..., the
model's answer]}) that `idlm train` reads.
"""

import json
from pathlib import Path

from idlm.engine.llm import LLM
from idlm.engine.sampling_params import SamplingParams
from idlm.eval.client import per_request
from idlm.eval.data import read_prompts


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """The prompt file as conversations (`idlm.eval.data.read_prompts` with chat); token-id
    prompts have no text to write back, so they are refused."""
    conversations = read_prompts(path, chat=True)
    if any(not (isinstance(c, list) and c and isinstance(c[0], dict)) for c in conversations):
        raise ValueError(f"{path}: distilled data is chat text; give prompts as text or messages, not prompt_ids")
    return conversations


def distill(llm: LLM, prompts: Path, out: Path, params: SamplingParams, samples_per_prompt: int = 1) -> int:
    """Writes one chat example per prompt and sample; returns how many were written (answers cut
    by max_tokens are kept: they are still the model's own text)."""
    conversations = read_conversations(prompts) * samples_per_prompt
    outputs = llm.chat(conversations, per_request(params, len(conversations)), use_tqdm=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("w", encoding="utf-8") as f:
        for conv, result in zip(conversations, outputs):
            if not result.text.strip():
                continue
            f.write(json.dumps({"messages": conv + [{"role": "assistant", "content": result.text}]}) + "\n")
            written += 1
    return written
