"""The stride policy's looks at drafts every 16 AR plans against looks backing off to 256 (RESULTS.md,
"Issue 16, 2026-12-01 05:10 UTC"): the embedded default on this CPU, one engine a variant, `ar` beside,
alternating, 4 held-out chats x 256 tokens at batch 1 a round. Run from the repo root with HF_HUB_OFFLINE=1."""

import json
import time
from pathlib import Path

import idlm.engine.stride_policy as stride_policy
from idlm import LLM, SamplingParams

lines = Path("configs/smollm2/prompts/heldout.jsonl").read_text().splitlines()[10:14]
chats = [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in lines]
variants = {"ar": None, "default, looks every 16": 16, "default, backoff to 256": 256}  # the cap on the interval
llms = {name: LLM(progress=False) for name in variants}
rates = {name: [] for name in variants}
tokens = {}
for r in range(3):
    for name, cap in variants.items():
        if cap is not None:
            stride_policy.EXPLORE_MAX = cap
        params = SamplingParams(temperature=0, max_tokens=256, **({"mode": "ar"} if cap is None else {}))
        start, n, out = time.perf_counter(), 0, []
        for chat in chats:
            output = llms[name].chat([chat], params)[0]
            n += len(output.token_ids)
            out.append(output.token_ids)
        rates[name].append(n / (time.perf_counter() - start))
        tokens[name] = out
    print(r, {k: round(v[-1], 1) for k, v in rates.items()}, flush=True)
print({k: [round(x, 1) for x in v] for k, v in rates.items()})
print("same tokens:", all(tokens[k] == tokens["ar"] for k in tokens))
for name in variants:
    print(name, dict(llms[name].engine.policy.chosen))
