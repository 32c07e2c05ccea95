"""Batch-1 greedy `ar` tok/s of the embedded default on 3 held-out chats, 64 tokens each, best of N runs
(`PYTHONPATH=<tree> HF_HUB_OFFLINE=1 python speed.py N`, alternating trees in separate processes)."""

import json
import sys
import time
from pathlib import Path

import idlm
from idlm import LLM, SamplingParams

llm = LLM(progress=False)
heldout = Path(idlm.__file__).parents[1] / "configs/smollm2/prompts/heldout.jsonl"
lines = heldout.read_text().splitlines()[10:13]
prompts = [llm.engine.chat_prompt([{"role": "user", "content": json.loads(line)["prompt"]}]) for line in lines]
params = SamplingParams(mode="ar", temperature=0, max_tokens=64, ignore_eos=True)
llm.generate([prompts[0]], params)
best = 0.0
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    start, tokens = time.perf_counter(), 0
    for prompt in prompts:
        tokens += len(llm.generate([prompt], params)[0].token_ids)
    best = max(best, tokens / (time.perf_counter() - start))
print(f"{idlm.__file__} best tok/s {best:.2f}")
