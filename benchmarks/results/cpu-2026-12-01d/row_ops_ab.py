"""The quantised default's CPU step three ways in one process, alternating (this VM's speed drifts
by +-30% over minutes, so separate processes cannot rank them): before this change ("ops":
PyTorch's ops for norms, rotary, attention and silu, 4-bit projections on PyTorch's int4 kernel),
with idlm's row ops ("row_ops"), and with row ops and every 4-bit projection on the group GEMM's
int8-activation path ("row_ops_i8"). 64 tokens of one chat, greedy, batch 1 and batch 8 (8 copies);
every output checked against the first variant's.

    HF_HUB_OFFLINE=1 python benchmarks/results/cpu-2026-12-01d/row_ops_ab.py ar risd
"""
import os
import statistics
import sys
import time

from idlm import LLM, SamplingParams
from idlm.kernels import row_ops
from idlm.models import loader

variants = os.environ.get("VARIANTS", "ops,row_ops,row_ops_i8").split(",")
llms, use_row_ops = {}, {}
real = loader.cpu_kernel
for name in variants:
    i8 = name.endswith("_i8")
    loader.cpu_kernel = (lambda fmt, dtype: "group") if i8 else real
    llms[name] = LLM(progress=False)
    use_row_ops[name] = name != "ops"
loader.cpu_kernel = real
first = next(iter(llms.values()))
ids = first.engine.chat_prompt([{"role": "user", "content": "Explain how a bicycle stays upright."}])
res = {k: {} for k in llms}
same = {k: True for k in llms}
for mode in sys.argv[1:]:
    p = SamplingParams(mode=mode, temperature=0, max_tokens=64, ignore_eos=True)
    for batch in (1, 8):
        want = {}
        for name, llm in llms.items():
            row_ops._enabled[:] = [use_row_ops[name]]
            want[name] = [o.token_ids for o in llm.generate([ids] * batch, p)]
        for _ in range(6):
            for name, llm in llms.items():
                row_ops._enabled[:] = [use_row_ops[name]]
                t = time.perf_counter()
                out = llm.generate([ids] * batch, p)
                res[name].setdefault(f"{mode} batch {batch}", []).append(64 * batch / (time.perf_counter() - t))
                same[name] &= [o.token_ids for o in out] == want[name]
        print(mode, batch, {n: want[n] == want[variants[0]] for n in want}, flush=True)
for name in res:
    print(name, {m: f"{statistics.median(v):.1f}" for m, v in res[name].items()}, "steady:", same[name])
