import json, time
from pathlib import Path
from idlm import LLM, SamplingParams
import idlm.engine.stride_policy as SP
prompts=[json.loads(l)["prompt"] for l in Path("configs/smollm2/prompts/heldout.jsonl").read_text().splitlines()[10:14]]
chats=[[{"role":"user","content":p}] for p in prompts]
variants = {"ar": None, "default, looks every 16": 16, "default, backoff to 256": 256}
llms = {name: LLM(progress=False) for name in variants}
res = {name: [] for name in variants}
toks = {}
for r in range(3):
    for name, cap in variants.items():
        if cap is not None:
            SP.EXPLORE_MAX = cap
        mode = "ar" if cap is None else None
        p = SamplingParams(temperature=0, max_tokens=256, **({"mode": "ar"} if mode else {}))
        t = time.perf_counter(); n = 0; out = []
        for c in chats:
            o = llms[name].chat([c], p)[0]; n += len(o.token_ids); out.append(o.token_ids)
        res[name].append(n / (time.perf_counter() - t)); toks[name] = out
        chosen = llms[name].engine.policy.chosen
    print(r, {k: round(v[-1], 1) for k, v in res.items()}, flush=True)
print({k: [round(x, 1) for x in v] for k, v in res.items()})
print("same tokens:", all(toks[k] == toks["ar"] for k in toks))
for name in variants: print(name, dict(llms[name].engine.policy.chosen))
