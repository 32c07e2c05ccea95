"""GPU check of the rotary + KV-write kernel (kernels/triton_rope_kv.py), then its speed against
the four launches it replaces (the compiled rotary of q and of k, two index_copy writes), each
side replayed as a CUDA graph as the decode step runs them.

Shapes: SmolLM2-135M (9 q heads, 3 KV heads, dim 64) and Qwen3-8B (32, 8, 128), 1-4096 token rows,
bf16 and fp32, some rows with slot -1; error against apply_rotary and the paged writer in float32.

    python benchmarks/check_rope_kv.py [--json out.json]
"""

import argparse
import functools
import json

import torch

from idlm.kernels.triton_rope_kv import rope_write_kv
from idlm.models.transformer import FUSED, apply_rotary, compile_elementwise, fused_elementwise

SHAPES = {"smollm2": (9, 3, 64), "qwen3-8b": (32, 8, 128)}
PAGE, BLOCKS = 16, 1024


def case(tokens, heads, kv_heads, dim, dtype, gen, padding=True):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen, device="cuda").to(dtype)
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    positions = torch.randint(0, 8192, (tokens,), generator=gen, device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    angles = (positions.float()[:, None] * inv_freq).repeat(1, 2)
    slots = torch.randperm(BLOCKS * PAGE, generator=gen, device="cuda")[:tokens]
    if padding and tokens > 2:
        slots[1] = -1
    cache = torch.randn(2, BLOCKS, PAGE, kv_heads, dim, generator=gen, device="cuda").to(dtype)
    return q, k, v, angles.cos(), angles.sin(), slots, cache


def unfused(q, k, v, cos, sin, slots, cache, rotary=apply_rotary, padded=True):
    """Rotary, then the paged writer's two copies (rows with slot -1 dropped first, as the engine
    does once a forward; with none, as in a decode step, there is nothing to drop)."""
    kv_heads, dim = k.shape[1:]
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    if padded:
        rows = (slots >= 0).nonzero().squeeze(1)
        k, v, slots = k.index_select(0, rows), v.index_select(0, rows), slots.index_select(0, rows)
    cache[0].view(-1, kv_heads, dim).index_copy_(0, slots, k)
    cache[1].view(-1, kv_heads, dim).index_copy_(0, slots, v)
    return q


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def graph_us(fn, iters=200):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def check(name, heads, kv_heads, dim, dtype, tokens, gen) -> dict:
    """The kernel against apply_rotary and the paged writer run in float32."""
    q, k, v, cos, sin, slots, cache = case(tokens, heads, kv_heads, dim, dtype, gen)
    ref_cache = cache.float()
    ref_q = unfused(q.float(), k.float(), v.float(), cos, sin, slots, ref_cache)
    got_cache = cache.clone()
    got_q = rope_write_kv(q, k, v, cos, sin, slots, got_cache[0], got_cache[1])
    err = max(rel(got_q, ref_q), rel(got_cache, ref_cache))
    passed = err <= (1e-6 if dtype == torch.float32 else 8e-3) and torch.equal(got_cache[1], ref_cache[1].to(dtype))
    print(f"{'ok  ' if passed else 'FAIL'} {name} {str(dtype)[6:]} T={tokens}: rel err {err:.2e}")
    return dict(shape=name, dtype=str(dtype), tokens=tokens, rel_err=err, passed=passed)


def speed(name, heads, kv_heads, dim, tokens, gen) -> dict:
    q, k, v, cos, sin, slots, cache = case(tokens, heads, kv_heads, dim, torch.bfloat16, gen, padding=False)
    with fused_elementwise():
        before = graph_us(functools.partial(unfused, q, k, v, cos, sin, slots, cache, FUSED["apply_rotary"], False))
    after = graph_us(functools.partial(rope_write_kv, q, k, v, cos, sin, slots, cache[0], cache[1]))
    print(f"speed {name} T={tokens}: four launches {before:.1f} us, one kernel {after:.1f} us")
    return dict(shape=name, tokens=tokens, unfused_us=before, fused_us=after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    compile_elementwise()
    checks = [check(name, *shape, dtype, tokens, gen) for name, shape in SHAPES.items()
              for dtype in (torch.bfloat16, torch.float32) for tokens in (1, 7, 25, 64, 448, 1600, 4096)]
    speeds = [speed(name, *shape, tokens, gen) for name, shape in SHAPES.items() for tokens in (1, 25, 448, 1600)]
    failed = sum(not c["passed"] for c in checks)
    print("ALL PASSED" if not failed else f"{failed} FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(checks=checks, speed=speeds), f, indent=1)


if __name__ == "__main__":
    main()
