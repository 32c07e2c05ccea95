"""Where a decode step of the embedded default goes on the CPU: wall time per step split into the
int4 GEMMs, the float GEMMs (the head, or every projection on float weights), attention, the other
ATen ops, idlm's group GEMM and decoder stack (no ATen ops: timed around their calls; the LoRA
GEMMs a stack makes in `risd` rounds are ATen ops inside its time, so they count twice), and the
host time outside ATen ops (Python bookkeeping, sampling glue, detokenising), for the dequantised
float32 path and the quantised one, `ar` and `risd`, batch 1, greedy.

    HF_HUB_OFFLINE=1 python benchmarks/cpu_step_profile.py --tokens 64 --json out.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from idlm import LLM, SamplingParams

PROMPT = "Explain how a bicycle stays upright."
GROUPS = {"int4 GEMMs": ("aten::_weight_int4pack_mm_for_cpu",), "float GEMMs": ("aten::mm", "aten::addmm"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_attention_math")}


def step_profile(llm: LLM, mode: str, tokens: int) -> dict:
    ids = llm.engine.chat_prompt([{"role": "user", "content": PROMPT}])
    params = SamplingParams(mode=mode, temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([ids], params)
    # idlm's kernels are no ATen ops: the group GEMM's calls (the head, and the projections where the
    # Python layers run) and the decoder stack's (every layer in one call) are timed here and taken
    # out of the host time
    group_s, stack_s = [0.0], [0.0]
    grouped_modules = [m for m in llm.engine.model.modules() if getattr(m, "kernel", None) == "group"]
    for module in grouped_modules:
        module.gemm = timed(module.gemm, group_s)
    stack = llm.engine.model.cpu_stack
    if stack is not None:
        stack.stack = TimedStack(stack.stack, stack_s)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        out = llm.generate([ids], params)[0]
        wall = time.perf_counter() - t
    for module in grouped_modules:
        module.gemm = module.gemm.inner
    if stack is not None:
        stack.stack = stack.stack.inner
    steps = out.stats["forwards"]
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    row = {"steps": steps, "tokens": len(out.token_ids), "tok_s": len(out.token_ids) / wall,
           "step_ms": 1e3 * wall / steps}
    grouped = 0.0
    for name, keys in GROUPS.items():
        ms = sum(e.self_cpu_time_total for e in events if e.key in keys) / 1e3 / steps
        row[name] = ms
        grouped += ms
    aten = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    row["other ATen ops"] = aten - grouped
    row["group GEMMs (idlm's kernel)"] = 1e3 * group_s[0] / steps
    row["decoder stack (idlm's C++ layers)"] = 1e3 * stack_s[0] / steps
    row["host outside ATen"] = (row["step_ms"] - aten - row["group GEMMs (idlm's kernel)"]
                                - row["decoder stack (idlm's C++ layers)"])
    row["ATen calls per step"] = sum(e.count for e in events) / steps
    return row


def timed(fn, total: list[float]):
    def call(*args):
        t = time.perf_counter()
        out = fn(*args)
        total[0] += time.perf_counter() - t
        return out
    call.inner = fn
    return call


class TimedStack:
    def __init__(self, inner, total: list[float]):
        self.inner, self.total = inner, total

    def forward(self, *args):
        t = time.perf_counter()
        out = self.inner.forward(*args)
        self.total[0] += time.perf_counter() - t
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
              "load_before": open("/proc/loadavg").read().split()[:3], "rows": {}}
    for quantization in ("none", "gguf"):
        llm = LLM(progress=False, quantization=quantization)
        for mode in ("ar", "risd"):
            report["rows"][f"{quantization} {mode}"] = step_profile(llm, mode, args.tokens)
        del llm
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
