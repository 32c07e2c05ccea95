"""The quantised default's CPU step several ways in one process, alternating (this VM's speed drifts
by +-30% over minutes, so separate processes cannot rank them): "ops": PyTorch's ops for norms,
rotary, attention and silu, 4-bit projections on PyTorch's int4 kernel (the Q8_0 head on the group
GEMM); "row_ops": idlm's row ops, 4-bit projections still on PyTorch's kernel; "row_ops_i8" (the
default since 364c033): row ops and every projection on the group GEMM (4-bit on int8 activations);
"stack" (the default since the decoder stack commit): the same with the layers in one C++ call.
64 tokens of one chat, greedy, batch 1 and batch 8 (8 copies); whether each variant's outputs stay
the same across its repeats ("steady"), and equal the first variant's (row ops round differently,
so they need not).

    HF_HUB_OFFLINE=1 python benchmarks/results/cpu-2026-12-01d/row_ops_ab.py ar risd
"""
import os
import statistics
import sys
import time

from idlm import LLM, SamplingParams
from idlm.kernels import row_ops
from idlm.models import loader

variants = os.environ.get("VARIANTS", "ops,row_ops,row_ops_i8,stack").split(",")
llms, use_row_ops = {}, {}
real = loader.cpu_kernel
for name in variants:
    group = name.endswith("_i8") or name == "stack"
    loader.cpu_kernel = real if group else (lambda fmt, dtype: real(fmt, dtype) if fmt == "Q8_0" else "int4pack")
    llms[name] = LLM(progress=False)
    use_row_ops[name] = name != "ops"
    if name != "stack":
        llms[name].engine.model.cpu_stack = None
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
