"""GPU probe: what the gated LoRA's finish kernel costs at SmolLM2's decode shapes, and variants
of it, each replayed as a CUDA graph of one step's 120 projections (30 layers x qkv, o, gate_up,
down), so launch gaps count as they do in the engine.

  current   triton_lora.gated_lora_finish (block-diagonal fused B, BLOCK_R = next pow2 of the
            projection's whole rank: 128 for qkv's 3 x 24)
  shards    each column block reads only its own shard's R columns of x A^T and of B (B stacked
            [out, R], not block-diagonal): BLOCK_R = 32
  blocks    the current kernel with other tile sizes
  inplace   the shard kernel writing the delta into the wide output's gated rows only (what a
            consumer reading a strided view would need)
  copy      the floor: the base columns copied out contiguous, no LoRA
and the widened GEMMs alone, for scale. Also the correctness of each variant against the current
kernel (bf16, max abs difference; ungated rows must be equal bit for bit).

  python benchmarks/probe_lora_finish.py [--json out.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from check_triton_lora import time_in_graph  # (benchmarks/ is the script's folder)

from idlm.kernels.triton_lora import _gated_lora_finish, gated_lora_finish

LAYERS = 30
PROJECTIONS = {"qkv": (576, [576, 192, 192]), "o": (576, [576]), "gate_up": (576, [1536, 1536]), "down": (1536, [576])}
RANK = 24


@triton.jit
def _finish_shards(wide_ptr, b_ptr, gate_ptr, out_ptr, roff_ptr, rows, out_features, rank,
                   stride_wm, stride_bn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IN_PLACE: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rm < rows
    col_ok = rn < out_features
    gate = tl.load(gate_ptr + rm, mask=row_ok, other=0.0).to(tl.float32)
    roff = tl.load(roff_ptr + tl.program_id(1))
    low = tl.load(wide_ptr + rm[:, None] * stride_wm + out_features + roff + rr[None, :],
                  mask=row_ok[:, None] & (rr[None, :] < rank), other=0.0)
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=col_ok[:, None] & (rr[None, :] < rank), other=0.0)
    low = (low.to(tl.float32) * gate[:, None]).to(b.dtype)
    delta = tl.dot(low, tl.trans(b))
    gated = (gate != 0)[:, None]
    if IN_PLACE:
        both = (row_ok & (gate != 0))[:, None] & col_ok[None, :]
        base = tl.load(wide_ptr + rm[:, None] * stride_wm + rn[None, :], mask=both, other=0.0)
        tl.store(wide_ptr + rm[:, None] * stride_wm + rn[None, :], (base.to(tl.float32) + delta).to(base.dtype),
                 mask=both)
    else:
        both = row_ok[:, None] & col_ok[None, :]
        base = tl.load(wide_ptr + rm[:, None] * stride_wm + rn[None, :], mask=both, other=0.0)
        result = tl.where(gated, (base.to(tl.float32) + delta).to(base.dtype), base)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], result, mask=both)


def finish_shards(wide, stacked_b, roff, gate, block_m, block_n, in_place=False, warps=4):
    rows = wide.shape[0]
    out_features = stacked_b.shape[0]
    out = wide if in_place else torch.empty(rows, out_features, dtype=wide.dtype, device=wide.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _finish_shards[grid](wide, stacked_b, gate, out, roff, rows, out_features, RANK,
                         wide.stride(0), stacked_b.stride(0), out.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=32, IN_PLACE=in_place, num_warps=warps)
    return wide[:, :out_features] if in_place else out


def finish_blocks(wide, fused_b, gate, block_m, block_n, warps):
    rows = wide.shape[0]
    out_features, rank = fused_b.shape
    out = torch.empty(rows, out_features, dtype=wide.dtype, device=wide.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _gated_lora_finish[grid](wide, fused_b, gate, out, rows, out_features, rank,
                             wide.stride(0), fused_b.stride(0), out.stride(0),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)),
                             PRECISION="tf32", num_warps=warps)
    return out


def probe(rows: int, per_request: int) -> dict:
    """Times every variant over one step's projections of `rows` rows, per_request rows a request
    (the back half of each request's rows gated, as a round's MASK rows are)."""
    dt, dev = torch.bfloat16, "cuda"
    gate = torch.zeros(rows, device=dev, dtype=dt)
    for r in range(rows):
        gate[r] = float(r % per_request > per_request // 2)  # the back half of each request's rows
    layers = []
    for name, (k, sizes) in PROJECTIONS.items():
        out_f, r_all = sum(sizes), RANK * len(sizes)
        x = torch.randn(rows, k, device=dev, dtype=dt)
        wide_w = torch.randn(out_f + r_all, k, device=dev, dtype=dt) * k ** -0.5
        bs = [torch.randn(s, RANK, device=dev, dtype=dt) * 0.1 for s in sizes]
        fused_b = torch.block_diag(*bs)
        stacked_b = torch.cat(bs)
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        layers.append((name, x, wide_w, fused_b, stacked_b, starts, sizes))
    wides = [F.linear(x, w) for _, x, w, *_ in layers]

    def roffs(block_n, starts, sizes):
        return torch.tensor([RANK * next(i for i in range(len(sizes)) if starts[i] <= n0 < starts[i + 1])
                             for n0 in range(0, starts[-1], block_n)], device=dev, dtype=torch.int32)

    variants = {"gemm only": lambda: [F.linear(x, w) for _, x, w, *_ in layers],
                "copy": lambda: [w[:, :fb.shape[0]].contiguous() for w, (_, _, _, fb, *_) in zip(wides, layers)],
                "current": lambda: [gated_lora_finish(w, fb, gate) for w, (_, _, _, fb, *_) in zip(wides, layers)]}
    for bm in (16, 32, 64, 128):
        for bn in (64, 128, 256):
            for warps in (4, 8):
                variants[f"blocks m{bm} n{bn} w{warps}"] = (
                    lambda bm=bm, bn=bn, warps=warps: [finish_blocks(w, fb, gate, bm, bn, warps)
                                                       for w, (_, _, _, fb, *_) in zip(wides, layers)])
    for bm in (16, 32, 64, 128):
        for bn in (64, 128):  # 192 is the smallest shard: blocks must not straddle two
            ro = [roffs(bn, st, sz) if all(s % bn == 0 for s in sz) else None for (*_, st, sz) in layers]
            if any(r is None for r in ro):
                continue
            for warps in (4, 8):
                variants[f"shards m{bm} n{bn} w{warps}"] = (
                    lambda bm=bm, bn=bn, warps=warps, ro=ro: [
                        finish_shards(w, sb, r, gate, bm, bn, warps=warps)
                        for w, (_, _, _, _, sb, *_), r in zip(wides, layers, ro)])
                variants[f"inplace m{bm} n{bn} w{warps}"] = (
                    lambda bm=bm, bn=bn, warps=warps, ro=ro: [
                        finish_shards(w, sb, r, gate, bm, bn, in_place=True, warps=warps)
                        for w, (_, _, _, _, sb, *_), r in zip(wides, layers, ro)])
    # correctness against the current kernel (in place last: it changes wides)
    ref = [gated_lora_finish(w, fb, gate) for w, (_, _, _, fb, *_) in zip(wides, layers)]
    errors = {}
    for name, fn in variants.items():
        if name.startswith(("blocks", "shards")):
            got = fn()
            errors[name] = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
            off = gate == 0
            assert all(torch.equal(g[off], r[off]) for g, r in zip(got, ref)), f"{name}: ungated rows changed"
    timings = {}
    for name, fn in variants.items():
        timings[name] = time_in_graph(fn, calls=LAYERS)  # one layer's 4 calls; a step's 30 layers in a graph
    best = sorted(timings.items(), key=lambda kv: kv[1])
    print(f"rows {rows} ({per_request} a request): us per layer (4 projections); x30 for a step")
    for name in ("gemm only", "copy", "current"):
        print(f"  {name:26s} {timings[name]:7.2f}")
    for name, us in best[:8]:
        print(f"  {name:26s} {us:7.2f}  max|diff| {errors.get(name, 0):.3g}")
    return dict(timings_us_per_layer=timings, max_abs_diff=errors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    args = p.parse_args()
    torch.manual_seed(0)
    report = {}
    for rows, per_request in ((16, 16), (448, 7), (1024, 16), (64, 1)):
        report[rows] = probe(rows, per_request)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
