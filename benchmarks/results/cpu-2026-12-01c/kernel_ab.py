"""The quantised default three ways in one process, alternating (this VM's speed drifts by +-30%
over minutes, so separate processes cannot rank kernels): idlm's group GEMM for every projection
and the head ("group"), for the Q8_0 head alone ("head_only"), and PyTorch's int4 kernel with the
float head ("int4pack"). 64 tokens of one chat, greedy, batch 1 and batch 8 (8 copies).

    HF_HUB_OFFLINE=1 python benchmarks/results/cpu-2026-12-01c/kernel_ab.py ar risd
"""
import statistics
import sys
import time

from idlm import LLM, SamplingParams
from idlm.kernels import group_gemm
from idlm.models import loader

llms = {"group": LLM(progress=False)}
real = loader.cpu_kernel
loader.cpu_kernel = lambda fmt, dtype: real(fmt, dtype) if fmt == "Q8_0" else "int4pack"
llms["head_only"] = LLM(progress=False)
loader.cpu_kernel = real
group_gemm._module[:] = [None]
llms["int4pack"] = LLM(progress=False)
ids = llms["group"].engine.chat_prompt([{"role": "user", "content": "Explain how a bicycle stays upright."}])
res = {k: {} for k in llms}
for mode in sys.argv[1:]:
    p = SamplingParams(mode=mode, temperature=0, max_tokens=64, ignore_eos=True)
    for batch in (1, 8):
        for llm in llms.values():
            llm.generate([ids] * batch, p)
        for _ in range(6):
            for name, llm in llms.items():
                t = time.perf_counter()
                llm.generate([ids] * batch, p)
                res[name].setdefault(f"{mode} batch {batch}", []).append(64 * batch / (time.perf_counter() - t))
for name in res:
    print(name, {m: f"{statistics.median(v):.1f}" for m, v in res[name].items()})
