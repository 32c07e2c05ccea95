"""One process of the old/new stride policy A/B (RESULTS.md, "The adaptive policy's own estimates"):
`ar` and the default on 4 held-out chats x 96 tokens at batch 1, two rounds on each engine, the tree on
PYTHONPATH; argv[1] labels the lines."""

import json
import sys
import time
from pathlib import Path

from idlm import LLM, SamplingParams

HELDOUT = Path(__file__).resolve().parents[3] / "configs" / "smollm2" / "prompts" / "heldout.jsonl"
prompts = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines()[:4]]
chats = [[{"role": "user", "content": p}] for p in prompts]
engines = {"ar": LLM(progress=False), "default": LLM(progress=False)}
reference = None
for round_ in range(2):
    for name, llm in engines.items():
        llm.engine.policy.chosen.clear()
        start, tokens, outputs = time.perf_counter(), 0, []
        mode = {"mode": "ar"} if name == "ar" else {}
        for chat in chats:
            out = llm.chat([chat], SamplingParams(temperature=0, max_tokens=96, **mode))[0]
            tokens += len(out.token_ids)
            outputs.append(out.token_ids)
        seconds = time.perf_counter() - start
        if name == "ar":
            reference = outputs
        same = "equal" if outputs == reference else "DIFF"
        print(sys.argv[1], round_, name, f"{tokens / seconds:.1f}", dict(llm.engine.policy.chosen), same, flush=True)
