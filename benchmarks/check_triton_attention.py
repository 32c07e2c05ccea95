"""GPU check of the Triton paged-attention kernel against the PyTorch oracle, then its speed.

Random inputs, many shapes (batch 1-128, query tokens 1-31, prefill chunks of 200 and 1024 tokens,
contexts 1-8192 including page boundaries, GQA groups 1-4, head dims 64/128, bf16 and fp32); relative error
||out - ref|| / ||ref|| against the oracle run in float32. Then random round trees (visibility bit
sets over the last 1-64 rows of each sequence, sub-causal, as branch drafts feed them), the same
way. Then, on Qwen3-8B one-layer shapes,
time per call and the KV bytes it must read, as achieved bandwidth.

    python benchmarks/check_triton_attention.py [--json out.json] [--checks-only | --speed-only]
    TRITON_INTERPRET=1 python benchmarks/check_triton_attention.py --device cpu --quick   # no GPU
    (Triton 3.6's interpreter needs numpy < 2: with numpy 2 it fails on the original kernel too)
"""

import argparse
import json
import random
import sys

import torch
import triton

from idlm.kernels.attention import PagedAttention, PagedBatch
from idlm.kernels.triton_attention import paged_attention

PAGE = 16


DEVICE = torch.device("cuda")


def random_case(batch, q_len, max_ctx, heads, kv_heads, dim, dtype, rng, exact_ctx=None):
    device = DEVICE
    ctxs = [exact_ctx or rng.randint(q_len, max_ctx) for _ in range(batch)]
    pages_needed = [-(-c // PAGE) for c in ctxs]
    num_blocks = sum(pages_needed) + 8
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in pages_needed:
        tables.append(perm[used:used + n])
        used += n
    width = max(pages_needed)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    cache = torch.randn(2, 1, num_blocks, PAGE, kv_heads, dim, device=device).to(dtype)
    qs = [0]
    for _ in ctxs:
        qs.append(qs[-1] + q_len)
    q = torch.randn(qs[-1], heads, dim, device=device).to(dtype)
    return q, cache, block_tables, qs, ctxs


def random_tree(qs, rng, max_rows=64):
    """Visibility bits for the last R rows of each sequence: each row sees itself and a random subset
    of the tree rows before it (-1, unused, for rows before the tree)."""
    bits, rows = [], []
    for a, b in zip(qs, qs[1:]):
        r = rng.randint(1, min(max_rows, b - a))
        rows.append(r)
        bits.extend([-1] * (b - a - r))
        for i in range(r):
            v = (1 << i) | sum(1 << j for j in range(i) if rng.random() < 0.5)
            bits.append(v - (1 << 64) if v >= 1 << 63 else v)
    return torch.tensor(bits, dtype=torch.long, device=DEVICE), torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def oracle(q, cache, block_tables, qs, ctxs, tree=(None, None)):
    batch = PagedBatch(slot_mapping=torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device),
                       query_start=qs, context_lens=torch.tensor(ctxs, device=q.device), block_tables=block_tables,
                       max_context_len=max(ctxs), max_query_len=max(b - a for a, b in zip(qs, qs[1:])),
                       all_written=False, tree_bits=tree[0], tree_rows=tree[1])
    kv = cache.float()
    attn = PagedAttention(kv, batch)
    empty = torch.zeros(q.shape[0], kv.shape[-2], kv.shape[-1], device=q.device)
    return attn(0, q.float(), empty, empty)


def device_args(q, cache, block_tables, qs, ctxs):
    dev = q.device
    return (q, cache[0, 0], cache[1, 0], block_tables, torch.tensor(qs, dtype=torch.int32, device=dev),
            torch.tensor(ctxs, dtype=torch.int32, device=dev), max(b - a for a, b in zip(qs, qs[1:])), max(ctxs))


def run(q, cache, block_tables, qs, ctxs, splits=None, tree=(None, None)):
    return paged_attention(*device_args(q, cache, block_tables, qs, ctxs), num_splits=splits, tree_bits=tree[0],
                           tree_rows=tree[1])


def tree_check(rng, quick=False) -> list[dict]:
    """Round trees: random sub-causal visibility over the last rows of each sequence."""
    rows = []
    shapes = [(9, 3, 64)] if quick else [(9, 3, 64), (32, 8, 128), (16, 16, 64)]
    dtypes = (torch.float32,) if quick else (torch.bfloat16, torch.float32)
    cases = [(1, 16, 100), (3, 64, 600)] if quick else [(b, q, c) for b in (1, 5, 64) for q in (2, 16, 40, 64, 200)
                                                        for c in (300, 3000) if not (q == 200 and b == 64)]
    for heads, kv_heads, dim in shapes:
        for dtype in dtypes:
            for batch, q_len, max_ctx in cases:
                case = random_case(batch, q_len, max(max_ctx, q_len), heads, kv_heads, dim, dtype, rng)
                tree = random_tree(case[3], rng)
                ref = oracle(*case, tree=tree)
                # a random tree over one or two rows can be causal; then it must match causal attention
                bits, sizes = tree[0].tolist(), tree[1].tolist()
                starts = [case[3][i + 1] - r for i, r in enumerate(sizes)]
                is_causal = all(bits[s + i] in ((1 << (i + 1)) - 1, -1)
                                for s, r in zip(starts, sizes) for i in range(r))
                causal = oracle(*case)
                for splits in (None, 3):
                    out = run(*case, splits=splits, tree=tree).float()
                    err = float((out - ref).norm() / ref.norm())
                    rows.append(dict(heads=heads, kv_heads=kv_heads, dim=dim, dtype=str(dtype)[6:], batch=batch,
                                     q_len=q_len, max_ctx=max_ctx, splits=splits or "auto", tree=True, rel_err=err,
                                     ok=err < (1e-5 if dtype == torch.float32 else 1e-2)
                                     and is_causal == torch.allclose(ref, causal)))
    return rows


QUICK_CASES = [(2, 200, 700, 9, 3, 64), (1, 130, 130, 8, 2, 64), (2, 31, 300, 32, 4, 64), (1, 31, 100, 16, 2, 64),
               (3, 7, 500, 9, 3, 64), (1, 1, 900, 8, 8, 64), (1, 257, 400, 4, 1, 64), (2, 64, 64, 6, 2, 64)]


def quick_check(rng) -> list[dict]:
    """A few float32 cases covering multi-tile prefill, non-power-of-two GQA groups and split-KV:
    small enough for Triton's CPU interpreter."""
    rows = []
    for batch, q_len, max_ctx, heads, kv_heads, dim in QUICK_CASES:
        case = random_case(batch, q_len, max_ctx, heads, kv_heads, dim, torch.float32, rng)
        ref = oracle(*case)
        for splits in (None, 3):
            err = float((run(*case, splits=splits).float() - ref).norm() / ref.norm())
            rows.append(dict(heads=heads, kv_heads=kv_heads, dim=dim, dtype="float32", batch=batch, q_len=q_len,
                             max_ctx=max_ctx, splits=splits or "auto", rel_err=err, ok=err < 1e-5))
    return rows


def check(rng) -> list[dict]:
    rows = []
    shapes = [(32, 8, 128), (9, 3, 64), (16, 16, 64), (16, 8, 128)]
    for heads, kv_heads, dim in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            first = len(rows)
            for batch in (1, 3, 17, 64, 128):
                for q_len in (1, 7, 15, 31, 200, 1024):
                    if q_len > 31 and batch > 3:  # prefill chunks: a few sequences
                        continue
                    for max_ctx in (q_len, 100, 1000, 8192):
                        if max_ctx < q_len and max_ctx != 100:
                            continue
                        if batch * max_ctx > 128 * 1000 and max_ctx == 8192 and batch > 17:
                            continue
                        exact = rng.choice([None, None, PAGE * 3, PAGE * 3 + 1, PAGE * 3 - 1])
                        if exact is not None and exact < q_len:
                            exact = None
                        case = random_case(batch, q_len, max(max_ctx, q_len), heads, kv_heads, dim, dtype, rng,
                                           exact)
                        ref = oracle(*case)
                        for splits in (None, 3):
                            out = run(*case, splits=splits).float()
                            err = float((out - ref).norm() / ref.norm())
                            rows.append(dict(heads=heads, kv_heads=kv_heads, dim=dim, dtype=str(dtype)[6:],
                                             batch=batch, q_len=q_len, max_ctx=max_ctx, splits=splits or "auto",
                                             rel_err=err, ok=err < (1e-5 if dtype == torch.float32 else 1e-2)))
            group = rows[first:]
            print(f"heads {heads}/{kv_heads} dim {dim} {str(dtype)[6:]}: {len(group)} cases, "
                  f"{sum(not r['ok'] for r in group)} over tolerance, worst {max(r['rel_err'] for r in group):.2e}",
                  flush=True)
    return rows


def speed(rng) -> list[dict]:
    rows = []
    heads, kv_heads, dim, ctx = 32, 8, 128, 1024
    for q_len in (1, 7, 15):
        for batch in (1, 8, 32, 64, 128):
            case = random_case(batch, q_len, ctx, heads, kv_heads, dim, torch.bfloat16, rng, exact_ctx=ctx)
            args = device_args(*case)  # host-to-device copies stay out of the timing
            ms = triton.testing.do_bench(lambda a=args: paged_attention(*a, **TUNED), warmup=25, rep=100,
                                         return_mode="median")
            torch_ms = triton.testing.do_bench(lambda c=case: oracle_bf16(*c), warmup=10, rep=50, return_mode="median")
            kv_bytes = batch * ctx * kv_heads * dim * 2 * 2
            rows.append(dict(q_len=q_len, batch=batch, ctx=ctx, triton_us=ms * 1e3, torch_us=torch_ms * 1e3,
                             kv_tb_s=kv_bytes / (ms * 1e-3) / 1e12))
    return rows


def oracle_bf16(q, cache, block_tables, qs, ctxs):
    batch = PagedBatch(slot_mapping=torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device),
                       query_start=qs, context_lens=torch.tensor(ctxs, device=q.device), block_tables=block_tables,
                       max_context_len=max(ctxs), max_query_len=max(b - a for a, b in zip(qs, qs[1:])),
                       all_written=False)
    empty = torch.zeros(q.shape[0], cache.shape[-2], cache.shape[-1], device=q.device, dtype=q.dtype)
    return PagedAttention(cache, batch)(0, q, empty, empty)


TUNED: dict = {}


def tune(rng) -> dict:
    """A small sweep of tile shapes at one mid-size point (batch 64, 7 query tokens)."""
    case = random_case(64, 7, 1024, 32, 8, 128, torch.bfloat16, rng, exact_ctx=1024)
    args = device_args(*case)
    best = None
    for block_n in (16, 32, 64):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                try:
                    config = dict(block_n=block_n, num_warps=warps, num_stages=stages)
                    ms = triton.testing.do_bench(lambda c=config: paged_attention(*args, **c), warmup=10, rep=50,
                                                 return_mode="median")
                except Exception as e:  # a tile too large for shared memory
                    print(f"block_n={block_n} warps={warps} stages={stages}: {type(e).__name__}")
                    continue
                print(f"block_n={block_n} warps={warps} stages={stages}: {ms * 1e3:.1f} us")
                if best is None or ms < best[0]:
                    best = (ms, config)
    return best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--checks-only", action="store_true")
    parser.add_argument("--trees-only", action="store_true", help="only the round-tree checks (implies --checks-only)")
    parser.add_argument("--quick", action="store_true", help="a few float32 cases only (implies --checks-only)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), or cpu with TRITON_INTERPRET=1 (Triton's interpreter)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    rng = random.Random(0)
    torch.manual_seed(0)
    checks = [] if args.speed_only or args.trees_only else quick_check(rng) if args.quick else check(rng)
    if not args.speed_only:
        checks += tree_check(rng, quick=args.quick)
    bad = [r for r in checks if not r["ok"]]
    worst = {}
    for r in checks:
        key = (r["dtype"], r["dim"], r["heads"] // r["kv_heads"])
        worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    print(f"{len(checks)} cases, {len(bad)} over tolerance (bf16 1e-2, fp32 1e-5)")
    print("| dtype | head dim | group | worst rel err |\n|---|---|---|---|")
    for (dtype, dim, group), err in sorted(worst.items()):
        print(f"| {dtype} | {dim} | {group} | {err:.2e} |")
    for r in bad[:10]:
        print("FAIL", r)
    if args.checks_only or args.quick or args.trees_only:
        sys.exit(1 if bad else 0)
    TUNED.update(tune(rng))
    print("tuned:", TUNED)
    speeds = speed(rng)
    print("\nQwen3-8B layer shapes (32 q heads, 8 kv heads, dim 128), bf16, context 1024, page 16")
    print("| query tokens | batch | triton us | torch gather+SDPA us | KV read TB/s |\n|---|---|---|---|---|")
    for r in speeds:
        print(f"| {r['q_len']} | {r['batch']} | {r['triton_us']:.1f} | {r['torch_us']:.1f} | {r['kv_tb_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checks": checks, "speed": speeds}, f, indent=1)


if __name__ == "__main__":
    main()
