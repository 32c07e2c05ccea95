"""sha256 of the embedded default's outputs on 4 held-out chats (48 tokens): greedy `ar` and fixed `risd`
alone and in a batch of 4, `risd` N = 2 without branches, adaptive `risd`, seeded `risd` at T = 0.8. Run on
two trees: equal hashes mean the same tokens (`PYTHONPATH=<tree> HF_HUB_OFFLINE=1 python token_hashes.py`)."""

import hashlib
import json
from pathlib import Path

import idlm
from idlm import LLM, SamplingParams

llm = LLM(progress=False)
heldout = Path(idlm.__file__).parents[1] / "configs/smollm2/prompts/heldout.jsonl"
prompts = [llm.engine.chat_prompt([{"role": "user", "content": json.loads(line)["prompt"]}])
           for line in heldout.read_text().splitlines()[:4]]
cases = {
    "ar": SamplingParams(mode="ar", temperature=0, max_tokens=48),
    "risd_fixed": SamplingParams(mode="risd", temperature=0, max_tokens=48, stride=4, stride_policy="fixed"),
    "risd_n2_no_branches": SamplingParams(mode="risd", temperature=0, max_tokens=48, stride=2, stride_policy="fixed",
                                          branches=0),
    "risd": SamplingParams(mode="risd", temperature=0, max_tokens=48),
    "risd_seeded": SamplingParams(mode="risd", temperature=0.8, seed=7, max_tokens=48, stride=4, stride_policy="fixed"),
}
every = hashlib.sha256()
for name, params in cases.items():
    alone = [llm.generate([prompt], params)[0].token_ids for prompt in prompts]
    line = f"{name} alone {hashlib.sha256(json.dumps(alone).encode()).hexdigest()[:16]}"
    if name in ("ar", "risd_fixed"):
        batched = [out.token_ids for out in llm.generate(prompts, params)]
        line += f", batch of 4 {'equal' if batched == alone else 'DIFFERENT'}"
    every.update(line.encode())
    print(line, flush=True)
print("all", every.hexdigest()[:16])
