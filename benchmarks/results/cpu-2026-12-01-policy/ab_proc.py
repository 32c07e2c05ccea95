import json, sys, time
from idlm import LLM, SamplingParams
prompts = [json.loads(l)["prompt"] for l in open("/work/main/configs/smollm2/prompts/heldout.jsonl")][:4]
chats = [[{"role": "user", "content": p}] for p in prompts]
engines = {"ar": LLM(progress=False), "default": LLM(progress=False)}
ref = None
for rnd in range(2):
    for name, llm in engines.items():
        llm.engine.policy.chosen.clear()
        t = time.perf_counter(); toks = 0; outs = []
        for c in chats:
            o = llm.chat([c], SamplingParams(temperature=0, max_tokens=96, **({"mode": "ar"} if name == "ar" else {})))[0]
            toks += len(o.token_ids); outs.append(o.token_ids)
        dt = time.perf_counter() - t
        if name == "ar": ref = outs
        print(sys.argv[1], rnd, name, f"{toks / dt:.1f}", dict(llm.engine.policy.chosen), "equal" if outs == ref else "DIFF", flush=True)
