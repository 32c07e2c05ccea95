"""GPU check of the gated-LoRA kernels against GatedLoRA's PyTorch path, then their speed:
`gated_lora_add_` (two weights; deterministic mode) and `gated_lora_finish` (the widened weight
[W; A] of GatedLoRA.widen, the engine's path on a GPU), and `gated_silu_mul` (gate_up's consumer,
which adds the delta itself) against the finish kernel followed by silu_mul.

Random inputs over decode and small-prefill row counts, SmolLM2-135M and Qwen3-8B projection
shapes, float32 and bfloat16. Rows with gate 0 must come back bit for bit unchanged (they are
the base model's output); gated rows are compared with the PyTorch delta computed in float32.
Then the time per call of both paths at decode sizes.

    python benchmarks/check_triton_lora.py [--json out.json]
"""

import argparse
import json
import sys
from functools import partial

import torch
import torch.nn.functional as F

from idlm.kernels.triton_lora import gated_lora_add_, gated_lora_finish, gated_silu_mul
from idlm.models.lora import GatedLoRA
from idlm.models.transformer import FUSED, compile_elementwise, silu_mul

SHAPES = {  # name: (in_features, shard sizes of the fused projection, rank)
    "smollm2 qkv": (576, [576, 192, 192], 24),
    "smollm2 o": (576, [576], 24),
    "smollm2 gate_up": (576, [1536, 1536], 24),
    "smollm2 down": (1536, [576], 24),
    "qwen3-8b qkv": (4096, [4096, 1024, 1024], 16),
    "qwen3-8b down": (12288, [4096], 16),
}
ROWS = (1, 3, 4, 7, 16, 17, 64, 112, 300, 1024)


def make_lora(in_features: int, sizes: list[int], rank: int, dtype: torch.dtype, gen: torch.Generator) -> GatedLoRA:
    lora = GatedLoRA(in_features, sizes, rank, scaling=2.0)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * in_features ** -0.5)
    lora = lora.to("cuda", dtype)
    lora.fuse_for_inference()
    return lora


def check(dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    results = []
    for name, (k, sizes, rank) in SHAPES.items():
        lora = make_lora(k, sizes, rank, dtype, gen)
        ref_lora = make_lora(k, sizes, rank, torch.float32, gen)
        ref_lora.load_state_dict({n: p.float() for n, p in lora.state_dict().items()})
        ref_lora.fuse_for_inference()
        for rows in ROWS:
            x = torch.randn(rows, k, generator=gen).to("cuda", dtype)
            base = torch.randn(rows, sum(sizes), generator=gen).to("cuda", dtype)
            gate = (torch.rand(rows, generator=gen) < 0.5).to("cuda", dtype)
            if rows > 1:
                gate[0], gate[1] = 0, 1
            got = gated_lora_add_(base.clone(), x, lora.lora_A, lora.fused_B, gate)
            ref = base.float() + ref_lora(x.float(), gate.float())
            off, on = gate == 0, gate != 0
            untouched = bool(torch.equal(got[off], base[off]))
            err = ((got[on].float() - ref[on]).norm() / ref[on].norm().clamp(min=1e-30)).item() if on.any() else 0.0
            ok = untouched and err < (1e-5 if dtype == torch.float32 else 1e-2)
            results.append(dict(kernel="add", shape=name, rows=rows, dtype=str(dtype), gate0_rows_unchanged=untouched,
                                rel_err=err, ok=ok))
            if not ok:
                print("FAIL", results[-1])
            # the widened path: base columns and x A^T side by side in one [rows, out + R] output
            wide = torch.cat([base, F.linear(x, lora.lora_A)], dim=1)
            got = gated_lora_finish(wide, lora.fused_B, gate)
            untouched = bool(torch.equal(got[off], base[off]))
            err = ((got[on].float() - ref[on]).norm() / ref[on].norm().clamp(min=1e-30)).item() if on.any() else 0.0
            ok = untouched and err < (1e-5 if dtype == torch.float32 else 1e-2) and got.is_contiguous()
            results.append(dict(kernel="finish", shape=name, rows=rows, dtype=str(dtype),
                                gate0_rows_unchanged=untouched, rel_err=err, ok=ok))
            if not ok:
                print("FAIL", results[-1])
            results += check_consumer(name, sizes, dtype, wide, lora, gate)
    return results


def check_consumer(name: str, sizes: list[int], dtype: torch.dtype, wide: torch.Tensor, lora: GatedLoRA,
                   gate: torch.Tensor) -> list[dict]:
    """gated_silu_mul (a projection of two equal shards: gate_up) against the finish kernel then
    the plain silu_mul, in float32; without a gate (a step with no gated rows) bit for bit the
    gated call's ungated rows."""
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        return []
    ref = silu_mul(gated_lora_finish(wide, lora.fused_B, gate).float())
    got = gated_silu_mul(wide, lora.fused_B, gate)
    err = ((got.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    clean = gate == 0
    ungated_equal = bool(torch.equal(gated_silu_mul(wide, lora.fused_B, None)[clean], got[clean]))
    ok = err < (1e-5 if dtype == torch.float32 else 1e-2) and ungated_equal
    result = dict(kernel="silu_mul", shape=name, rows=wide.shape[0], dtype=str(dtype), rel_err=err,
                  ungated_equal=ungated_equal, ok=ok)
    if not ok:
        print("FAIL", result)
    return [result]


def speed(gen: torch.Generator) -> list[dict]:
    out = []
    for name, (k, sizes, rank) in SHAPES.items():
        lora = make_lora(k, sizes, rank, torch.bfloat16, gen)
        weight = (torch.randn(sum(sizes), k, generator=gen) * k ** -0.5).to("cuda", torch.bfloat16)
        wide_weight = torch.cat([weight, lora.lora_A])
        for rows in (7, 112, 448):
            x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
            base = torch.randn(rows, sum(sizes), generator=gen).to("cuda", torch.bfloat16)
            gate = torch.ones(rows, device="cuda", dtype=torch.bfloat16)
            t = {  # the kernels alone, then each whole projection (the base GEMM included)
                "triton": time_in_graph(partial(gated_lora_add_, base, x, lora.lora_A, lora.fused_B, gate)),
                "torch": time_in_graph(partial(torch_path, base, x, lora, gate)),
                "gemm": time_in_graph(partial(F.linear, x, weight)),
                "two_weight": time_in_graph(partial(two_weight_projection, x, weight, lora, gate)),
                "widened": time_in_graph(partial(widened_projection, x, wide_weight, lora, gate)),
            }
            wide = F.linear(x, wide_weight)
            if len(sizes) == 2:  # gate_up: finish then silu_mul, against the fused consumer
                t["finish+consumer"] = time_in_graph(partial(finish_then_silu_mul, wide, lora.fused_B, gate))
                t["consumer"] = time_in_graph(partial(gated_silu_mul, wide, lora.fused_B, gate))
            out.append(dict(shape=name, rows=rows, triton_us=t["triton"], torch_us=t["torch"], base_gemm_us=t["gemm"],
                            two_weight_projection_us=t["two_weight"], widened_projection_us=t["widened"],
                            finish_then_consumer_us=t.get("finish+consumer"), fused_consumer_us=t.get("consumer")))
            print(f"{name:16s} rows {rows:4d}: add kernel {t['triton']:6.1f} us, torch delta {t['torch']:6.1f} us | "
                  f"projection: base GEMM {t['gemm']:6.1f}, + add kernel {t['two_weight']:6.1f}, "
                  f"widened {t['widened']:6.1f} us" + (f" | finish + compiled consumer {t['finish+consumer']:6.1f}, "
                                                       f"fused consumer {t['consumer']:6.1f} us"
                                                       if "consumer" in t else ""))
    return out


def finish_then_silu_mul(wide: torch.Tensor, fused_b: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """What the engine's graphs ran before gated_silu_mul: the finish kernel, then the compiled silu_mul."""
    return FUSED["silu_mul"](gated_lora_finish(wide, fused_b, gate))


def two_weight_projection(x: torch.Tensor, weight: torch.Tensor, lora: GatedLoRA, gate: torch.Tensor):
    return gated_lora_add_(F.linear(x, weight), x, lora.lora_A, lora.fused_B, gate)


def widened_projection(x: torch.Tensor, wide_weight: torch.Tensor, lora: GatedLoRA, gate: torch.Tensor):
    return gated_lora_finish(F.linear(x, wide_weight), lora.fused_B, gate)


def torch_path(base: torch.Tensor, x: torch.Tensor, lora: GatedLoRA, gate: torch.Tensor) -> torch.Tensor:
    """What GatedLoRA.add_to does without the kernel: the fused PyTorch delta, then the add."""
    return base + lora(x, gate)


def time_in_graph(fn, calls: int = 50, replays: int = 20) -> float:
    """Microseconds per call of fn, captured `calls` times in a CUDA graph and replayed (decode
    steps are replayed graphs: this measures launches and work, not Python)."""
    for _ in range(20):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    checks = check(torch.float32, gen) + check(torch.bfloat16, gen)
    failed = [c for c in checks if not c["ok"]]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed; worst rel err "
          f"{max(c['rel_err'] for c in checks):.2e}")
    compile_elementwise()
    timings = speed(gen)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), checks=checks, speed=timings), f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
