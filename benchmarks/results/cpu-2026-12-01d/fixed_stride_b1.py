"""The embedded default at batch 1 on this CPU: `ar`, `risd` adaptive and `risd` at a fixed stride N = 2, 3, 4
(no branches), three chats x 128 tokens each, medians of three passes in one process; TPF per run.

    HF_HUB_OFFLINE=1 python benchmarks/results/cpu-2026-12-01d/fixed_stride_b1.py
"""
import statistics
import time

from idlm import LLM, SamplingParams

llm = LLM(progress=False)
chats = ["Explain how a bicycle stays upright.", "Write a short story about a robot learning to paint.",
         "What are the benefits of regular exercise?"]
ids = [llm.engine.chat_prompt([{"role": "user", "content": p}]) for p in chats]
runs = {"ar": SamplingParams(mode="ar", temperature=0, max_tokens=128),
        "risd adaptive": SamplingParams(mode="risd", temperature=0, max_tokens=128)}
for n in (2, 3, 4):
    runs[f"risd N={n}"] = SamplingParams(mode="risd", stride=n, stride_policy="fixed", branches=0, temperature=0,
                                         max_tokens=128)
res = {k: [] for k in runs}
tpf = {}
for p in runs.values():  # (warm-up)
    llm.generate(ids[:1], p)
for _ in range(3):
    for name, p in runs.items():
        tok = fw = 0
        t = time.perf_counter()
        for i in ids:
            o = llm.generate([i], p)[0]
            tok += len(o.token_ids)
            fw += o.stats["forwards"]
        res[name].append(tok / (time.perf_counter() - t))
        tpf[name] = tok / fw
for name in runs:
    print(f"{name:14s} {statistics.median(res[name]):6.1f} tok/s  TPF {tpf[name]:.2f}")
