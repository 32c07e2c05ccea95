"""GPU check of deterministic (batch-invariant) mode, then what it costs.

kernels: the batch-invariant matmul (SmolLM2 and Qwen3-8B weight shapes, with and without bias),
  RMSNorm, rotary and SiLU-mul give every row the same bits for any number of rows and any
  offset in the batch, close to the float32 reference; cuBLAS's F.linear on the same rows is
  shown for comparison. The fixed-chunk attention gives a query row the same bits alone with
  split KV, in a batch of 64, as one of a 7-token round, and inside prefill chunks of 200 and 64
  rows, and is close to the PyTorch oracle; the normal kernel is shown on the same rows. Then
  the matmul's time against cuBLAS on the 8B shapes.
engine: SmolLM2 (+ the R-ISD adapter), bf16, chat prompts, greedy, EOS ignored: `ar` alone
  against `ar` at concurrency 7 and 64 (requests arriving while others decode, in shuffled
  order), and `risd` at N = 2, 4, 8 (fixed stride) at concurrency 1, 7 and 64 against `ar`
  alone; seeded T = 0.8 (`ar` and `risd` N=4) alone against concurrency 64. Once with
  deterministic=True (every comparison must be 100%), once without (the differences show that
  the check can fail). `isd` needs an I-DLM checkpoint (a MASK token): the same comparisons run
  on the random-weight qwen3-0.6b shape (isd N = 2, 4, 8), deterministic only.
speed (--parts speed): `idlm bench` closed-loop runs, deterministic against normal in the same
  call, at C = 1, 16, 64, SmolLM2 (ar, risd) and the qwen3-8b shape (ar).

    python benchmarks/check_deterministic.py --model /tmp/smollm2.gguf --adapter idlm/adapters/smollm2-risd
    python benchmarks/check_deterministic.py --model /tmp/smollm2.gguf --adapter idlm/adapters/smollm2-risd \
        --parts speed

Prints PASS/FAIL per check and a summary; writes everything to $OUT/check_deterministic[_speed].json
when $OUT is set (or --json). Exit status 1 if a deterministic-mode check failed.
"""

import argparse
import gc
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from idlm import LLM, SamplingParams
from idlm.kernels import batch_invariant as bi
from idlm.kernels.fixed_split import KV_CHUNK
from idlm.kernels.triton_attention import paged_attention
from idlm.models.transformer import apply_rotary, rms_norm, silu_mul

ROOT = Path(__file__).resolve().parents[1]
RESULTS: dict = {"checks": [], "engine": {}, "speed": []}
FAILED: list[str] = []


def record(name: str, ok: bool, must_pass: bool = True, **info) -> None:
    RESULTS["checks"].append(dict(name=name, ok=ok, must_pass=must_pass, **info))
    tag = "PASS" if ok else ("FAIL" if must_pass else "differs (expected without the flag)")
    print(f"[{tag}] {name} {json.dumps(info, default=str) if info else ''}", flush=True)
    if must_pass and not ok:
        FAILED.append(name)


# ---------------------------------------------------------------- kernels

MATMUL_SHAPES = {"smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
                 "qwen3-8b": [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096)]}
ROW_COUNTS = (1, 2, 3, 7, 16, 63, 64, 65, 128, 200, 511, 1024)


def rows_invariant(fn, x: torch.Tensor) -> tuple[bool, int]:
    """fn(x[rows], rows) gives rows [o, o + m) the same bits as the whole batch does, for every m
    and a few offsets o."""
    full = fn(x, slice(None))
    bad = 0
    for m in ROW_COUNTS:
        for o in (0, 5, 37):
            rows = slice(o, o + m)
            if o + m <= x.shape[0] and not torch.equal(fn(x[rows], rows), full[rows]):
                bad += 1
    return bad == 0, bad


def check_matmul() -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    for model, shapes in MATMUL_SHAPES.items():
        for n, k in shapes:
            w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
            x = torch.randn(1024, k, device="cuda", generator=gen).bfloat16()
            bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if n == 960 else None
            ours_ok, ours_bad = rows_invariant(lambda a, _, w=w, b=bias: bi.matmul(a, w, b), x)
            _, cublas_bad = rows_invariant(lambda a, _, w=w, b=bias: F.linear(a, w, b), x)
            ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            err = float((bi.matmul(x, w, bias).float() - ref).norm() / ref.norm())
            record(f"matmul {model} {n}x{k}{' +bias' if bias is not None else ''}", ours_ok and err < 1e-2,
                   rel_err=round(err, 6), row_sets_differing=ours_bad, cublas_row_sets_differing=cublas_bad)
            del w, x
    torch.cuda.empty_cache()


def rel_err(ours: torch.Tensor, eager: torch.Tensor) -> float:
    return float((ours.float() - eager.float()).norm() / eager.float().norm())


def check_elementwise() -> None:
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1024, 4096, device="cuda", generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(4096, device="cuda", generator=gen)).bfloat16()
    ok, bad = rows_invariant(lambda a, _: bi.rms_norm(a, w, 1e-6), x)
    err = rel_err(bi.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6))
    record("rms_norm rows", ok and err < 1e-2, rel_err_vs_eager=err, row_sets_differing=bad)
    qkv = torch.randn(1024, 48 * 128, device="cuda", generator=gen).bfloat16()
    q = qkv[:, :32 * 128].view(1024, 32, 128)  # a strided view, as the model's
    hw = (1 + 0.1 * torch.randn(128, device="cuda", generator=gen)).bfloat16()
    ok, bad = rows_invariant(lambda a, _: bi.rms_norm(a, hw, 1e-6), q)
    err = rel_err(bi.rms_norm(q, hw, 1e-6), rms_norm(q, hw, 1e-6))
    record("rms_norm per head (qk-norm)", ok and err < 1e-2, rel_err_vs_eager=err, row_sets_differing=bad)
    pos = torch.arange(1024, device="cuda").float()[:, None] * (1e4 ** (-torch.arange(64, device="cuda") / 64))
    cos, sin = torch.cat([pos, pos], -1).cos(), torch.cat([pos, pos], -1).sin()
    ok, bad = rows_invariant(lambda a, rows: bi.apply_rotary(a, cos[rows], sin[rows]), q)
    err = rel_err(bi.apply_rotary(q, cos, sin), apply_rotary(q, cos, sin))
    record("rotary rows", ok and err < 1e-2, rel_err_vs_eager=err, row_sets_differing=bad)
    gu = torch.randn(1024, 2 * 1536, device="cuda", generator=gen).bfloat16()
    ok, bad = rows_invariant(lambda a, _: bi.silu_mul(a), gu)
    err = rel_err(bi.silu_mul(gu), silu_mul(gu))
    record("silu_mul rows", ok and err < 1e-2, rel_err_vs_eager=err, row_sets_differing=bad)
    from idlm.kernels.triton_lora import gated_lora_add_

    a = (0.05 * torch.randn(2 * 16, 576, device="cuda", generator=gen)).bfloat16()
    b = (0.05 * torch.randn(3072, 2 * 16, device="cuda", generator=gen)).bfloat16()
    xs = torch.randn(1024, 576, device="cuda", generator=gen).bfloat16()
    base = torch.randn(1024, 3072, device="cuda", generator=gen).bfloat16()
    gate = (torch.rand(1024, device="cuda", generator=gen) < 0.5).bfloat16()
    ok, bad = rows_invariant(lambda a_, rows: gated_lora_add_(base[rows].clone(), a_, a, b, gate[rows], invariant=True),
                             xs)
    record("gated LoRA rows (fixed row tile)", ok, row_sets_differing=bad)


def attention_scenarios(heads: int, kv_heads: int, dim: int, kv_chunk: int) -> tuple[dict, float]:
    """The outputs of rows at a few positions of one long sequence, computed in several batch and
    query layouts; and the largest relative error against the float32 oracle."""
    from idlm.kernels.attention import PagedAttention, PagedBatch

    page, length = 16, 3000
    gen = torch.Generator("cuda").manual_seed(heads * dim)
    others = 63
    other_ctx = torch.randint(100, 3000, (others,), generator=gen, device="cuda").tolist()
    pages = -(-length // page) + sum(-(-c // page) for c in other_ctx)
    perm = torch.randperm(pages + 4, device="cuda", generator=gen).tolist()
    cache = torch.randn(2, pages + 4, page, kv_heads, dim, device="cuda", generator=gen).bfloat16()
    own = perm[:-(-length // page)]
    tables, used = [], len(own)
    for c in other_ctx:
        tables.append(perm[used:used + -(-c // page)])
        used += -(-c // page)
    q_all = torch.randn(length, heads, dim, device="cuda", generator=gen).bfloat16()
    q_others = torch.randn(others, heads, dim, device="cuda", generator=gen).bfloat16()
    targets = (1999, 2005, 2198)

    def launch(seqs, splits=None):
        """seqs: (positions of our sequence's query rows | None for another sequence's one row)."""
        qs, ctxs, tabs, starts = [], [], [], [0]
        for item in seqs:
            if isinstance(item, int):  # another sequence, its last position
                qs.append(q_others[item:item + 1])
                ctxs.append(other_ctx[item])
                tabs.append(tables[item])
            else:
                qs.append(q_all[item[0]:item[-1] + 1])
                ctxs.append(item[-1] + 1)
                tabs.append(own)
            starts.append(starts[-1] + qs[-1].shape[0])
        width = max(len(t) for t in tabs)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tabs], dtype=torch.int32, device="cuda")
        q = torch.cat(qs)
        out = paged_attention(q, cache[0], cache[1], bt, torch.tensor(starts, dtype=torch.int32, device="cuda"),
                              torch.tensor(ctxs, dtype=torch.int32, device="cuda"),
                              max(b - a for a, b in zip(starts, starts[1:])), max(ctxs), num_splits=splits,
                              kv_chunk=kv_chunk)
        return out, starts, bt, ctxs, q

    found: dict[str, dict[int, torch.Tensor]] = {}
    layouts = {
        "alone, decode": lambda p: [[p]],
        "alone, 3 splits": lambda p: [[p]],
        "batch of 64, decode": lambda p: [*range(31), [p], *range(31, 63)],
        "alone, round of 7": lambda p: [list(range(p - 3, p + 4))],
        "batch of 8, round of 7": lambda p: [*range(3), list(range(p - 6, p + 1)), *range(3, 7)],
        "prefill chunk 1990-2199": lambda p: [list(range(1990, 2200))],
        "prefill chunk of 64": lambda p: [list(range(p - 10, p + 54))],
    }
    worst = 0.0
    for name, layout in layouts.items():
        found[name] = {}
        for p in targets:
            seqs = layout(p)
            out, starts, bt, ctxs, q = launch(seqs, splits=3 if "3 splits" in name else None)
            b = next(i for i, s in enumerate(seqs) if not isinstance(s, int))
            row = starts[b] + seqs[b].index(p)
            found[name][p] = out[row]
            if name == "alone, round of 7":  # the oracle on this launch
                batch = PagedBatch(slot_mapping=torch.full((q.shape[0],), -1, device="cuda"), query_start=starts,
                                   context_lens=torch.tensor(ctxs, device="cuda"), block_tables=bt,
                                   max_context_len=max(ctxs), max_query_len=q.shape[0], all_written=False)
                kv = cache.float()[:, None]
                empty = torch.zeros(q.shape[0], kv_heads, dim, device="cuda")
                ref = PagedAttention(kv, batch)(0, q.float(), empty, empty)
                worst = max(worst, float((out.float() - ref).norm() / ref.norm()))
    return found, worst


def check_attention() -> None:
    for heads, kv_heads, dim in ((9, 3, 64), (32, 8, 128)):
        for kv_chunk, must in ((KV_CHUNK, True), (0, False)):
            found, err = attention_scenarios(heads, kv_heads, dim, kv_chunk)
            names = list(found)
            same = sum(torch.equal(found[n][p], found[names[0]][p]) for n in names for p in found[n])
            total = sum(len(found[n]) for n in names)
            label = "fixed-chunk" if kv_chunk else "normal"
            record(f"attention {label} {heads}/{kv_heads}x{dim}: a row alone = in a batch = in a round = in prefill",
                   same == total and err < 1e-2, must_pass=must, identical=f"{same}/{total}", rel_err=round(err, 6),
                   differing_layouts=[n for n in names if any(not torch.equal(found[n][p], found[names[0]][p])
                                                              for p in found[n])])


def matmul_speed() -> list[dict]:
    import triton

    rows = []
    for n, k in MATMUL_SHAPES["qwen3-8b"]:
        w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        for m in (1, 16, 64, 256, 2048):
            x = torch.randn(m, k, device="cuda").bfloat16()
            ours = triton.testing.do_bench(lambda x=x, w=w: bi.matmul(x, w), warmup=10, rep=50, return_mode="median")
            cublas = triton.testing.do_bench(lambda x=x, w=w: F.linear(x, w), warmup=10, rep=50, return_mode="median")
            rows.append(dict(n=n, k=k, m=m, ours_us=round(ours * 1e3, 1), cublas_us=round(cublas * 1e3, 1),
                             ours_tb_s=round(n * k * 2 / (ours * 1e-3) / 1e12, 2)))
            print(f"matmul {n}x{k} M={m}: ours {ours * 1e3:.1f} us, cuBLAS {cublas * 1e3:.1f} us "
                  f"({n * k * 2 / (ours * 1e-3) / 1e12:.2f} TB/s)", flush=True)
        del w
    torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- engine


def closed_loop(llm: LLM, prompts: list, params: list[SamplingParams], concurrency: int,
                order: list[int]) -> dict[int, list[int]]:
    """Keeps up to `concurrency` requests in flight, adding 1, 2, 5 or 9 of them per step (so
    requests keep arriving while others decode, and prefill steps hold one or several prompts,
    some of them chunked); returns each prompt's tokens."""
    engine = llm.engine
    rng = random.Random(concurrency)
    pending, running, done = list(order), {}, {}
    while pending or running:
        for _ in range(min(rng.choice((1, 2, 5, 9)), concurrency - len(running), len(pending))):
            i = pending.pop(0)
            running[engine.add_request(prompts[i], params[i])] = i
        for out in engine.step():
            if out.finished:
                done[running.pop(out.request_id)] = out.token_ids
    return done


def same_count(a: dict, b: dict) -> int:
    return sum(a[i] == b[i] for i in a)


def engine_checks(llm: LLM, prompts: list, tokens: int, deterministic: bool, modes: tuple[str, ...],
                  strides=(2, 4, 8), label: str = "smollm2") -> dict:
    n = len(prompts)
    rng = random.Random(0)
    shuffled = list(range(n))
    rng.shuffle(shuffled)

    def params(**kw):
        return [SamplingParams(max_tokens=tokens, ignore_eos=True, **kw) for _ in range(n)]

    def seeded(**kw):
        return [SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.8, seed=1000 + i, **kw)
                for i in range(n)]

    out, tag = {}, f"{label} {'deterministic' if deterministic else 'normal'}"
    start = time.perf_counter()
    ar = params(temperature=0, mode="ar")
    alone = closed_loop(llm, prompts, ar, 1, list(range(n)))
    concurrencies = (7, 64) if deterministic else (64,)
    for c in concurrencies:
        same = same_count(alone, closed_loop(llm, prompts, ar, c, shuffled))
        out[f"ar C={c}"] = same
        record(f"{tag}: ar alone == ar at C={c}", same == n, must_pass=deterministic, identical=f"{same}/{n}")
    for mode in modes:
        for stride in strides if deterministic else (4,):
            p = params(temperature=0, mode=mode, stride=stride, stride_policy="fixed")
            for c in (1, 7, 64) if deterministic else (64,):
                same = same_count(alone, closed_loop(llm, prompts, p, c, shuffled if c > 1 else list(range(n))))
                out[f"{mode} N={stride} C={c}"] = same
                record(f"{tag}: {mode} N={stride} at C={c} == ar alone", same == n, must_pass=deterministic,
                       identical=f"{same}/{n}")
        p = params(temperature=0, mode=mode, stride=max(strides), stride_policy="adaptive")
        same = same_count(alone, closed_loop(llm, prompts, p, 64, shuffled))
        out[f"{mode} adaptive N<={max(strides)} C=64"] = same
        record(f"{tag}: {mode} adaptive (N <= {max(strides)}) at C=64 == ar alone", same == n,
               must_pass=deterministic, identical=f"{same}/{n}")
    for mode, extra in (("ar", {}), (modes[0], dict(stride=4, stride_policy="fixed"))):
        p = seeded(mode=mode, **extra)
        same = same_count(closed_loop(llm, prompts, p, 1, list(range(n))), closed_loop(llm, prompts, p, 64, shuffled))
        out[f"seeded T=0.8 {mode}"] = same
        record(f"{tag}: seeded T=0.8 {mode} alone == at C=64", same == n, must_pass=deterministic,
               identical=f"{same}/{n}")
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def load_prompts(llm: LLM, count: int) -> list[list[int]]:
    lines = (ROOT / "configs/smollm2/prompts/heldout.jsonl").read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    texts = (texts * (-(-count // len(texts))))[:count]
    return [llm.engine.chat_prompt([{"role": "user", "content": t}]) for t in texts]


# no prefix caching (every run computes its prompts in its own batches), a small prefill budget
# (a burst of prompts is chunked), a KV pool that leaves the GPU to the next engine
ENGINE = dict(max_num_seqs=64, progress=False, enable_prefix_caching=False, max_num_batched_tokens=256,
              kv_cache_tokens=64 * 512)


def smollm2_checks(args, deterministic: bool) -> dict:
    t0 = time.perf_counter()
    llm = LLM(args.model, adapter=args.adapter, deterministic=deterministic, enforce_eager=args.enforce_eager,
              **ENGINE)
    print(f"engine (deterministic={deterministic}) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return engine_checks(llm, load_prompts(llm, args.prompts), args.tokens, deterministic, ("risd",))


def isd_checks(args) -> dict:
    from idlm.models.shapes import shape_folder

    llm = LLM(str(shape_folder(args.isd_shape)), deterministic=True, enforce_eager=args.enforce_eager, **ENGINE)
    mask = llm.engine.mask_ids["isd"]
    gen = torch.Generator().manual_seed(3)
    prompts = [[t for t in torch.randint(0, 150000, (int(k),), generator=gen).tolist() if t != mask]
               for k in torch.randint(8, 200, (args.isd_prompts,), generator=gen)]
    return engine_checks(llm, prompts, args.isd_tokens, True, ("isd",), label=args.isd_shape)


def engine_steps(args, smollm2_engines: bool = True) -> list:
    """One step per engine (each engine lives only inside its call, freed before the next);
    smollm2_engines=False: the isd engine's alone."""
    def smollm2(deterministic):
        def step():
            RESULTS["engine"][f"smollm2 deterministic={deterministic}"] = smollm2_checks(args, deterministic)
        step.__name__ = f"smollm2 engine (deterministic={deterministic})"
        return step

    def isd():
        RESULTS["engine"][f"{args.isd_shape} deterministic=True"] = isd_checks(args)

    isd.__name__ = f"{args.isd_shape} engine"
    return ([smollm2(True), smollm2(False)] if smollm2_engines else []) + ([isd] if args.isd_shape else [])


# ---------------------------------------------------------------- speed


def run_speed(args) -> None:
    from idlm.bench.suite import BenchConfig, run_bench

    setups = [("smollm2", dict(model=args.model, adapter=args.adapter, modes=("ar", "risd"))),
              ("qwen3-8b", dict(shape="qwen3-8b", modes=("ar",)))]
    for name, kw in setups:
        if name not in args.speed_models:
            continue
        figures = {}
        for deterministic in (False, True):
            cfg = BenchConfig(concurrency=(1, 16, 64), output_len=args.speed_tokens, strides=(4,),
                              stride_policies=("fixed",), deterministic=deterministic, **kw)
            result = run_bench(cfg, log=lambda msg: print(f"[bench] {msg}", flush=True))
            for r in result["results"]:
                figures[(r["mode"], r["concurrency"], deterministic)] = r["output_tok_s"]
            gc.collect()
            torch.cuda.empty_cache()
        for (mode, c, det), tok_s in sorted(figures.items()):
            if det:
                base = figures[(mode, c, False)]
                row = dict(model=name, mode=mode, concurrency=c, normal_tok_s=round(base, 1),
                           deterministic_tok_s=round(tok_s, 1), cost=round(1 - tok_s / base, 3))
                RESULTS["speed"].append(row)
                print(f"speed {name} {mode} C={c}: normal {base:.0f} tok/s, deterministic {tok_s:.0f} tok/s, "
                      f"cost {100 * (1 - tok_s / base):.1f}%", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="SmolLM2 (a .gguf or folder; default: the embedded one)")
    parser.add_argument("--adapter", default=str(ROOT / "idlm/adapters/smollm2-risd"))
    parser.add_argument("--parts", default="kernels,engine", help="comma-separated: kernels, engine, isd (engine's "
                        "isd check alone), speed")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--isd-shape", default="qwen3-0.6b", help="random-weight shape for isd ('' = skip)")
    parser.add_argument("--isd-prompts", type=int, default=100)
    parser.add_argument("--isd-tokens", type=int, default=32)
    parser.add_argument("--speed-models", default="smollm2,qwen3-8b")
    parser.add_argument("--speed-tokens", type=int, default=128)
    parser.add_argument("--enforce-eager", action="store_true", help="engines without CUDA graphs (to tell a "
                                                                         "graph problem from a kernel one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    parts = args.parts.split(",")
    RESULTS.update(command=" ".join(sys.argv), device=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    steps = []
    if "kernels" in parts:
        steps += [check_matmul, check_elementwise, check_attention, lambda: RESULTS.update(matmul_speed=matmul_speed())]
    if "engine" in parts:
        steps += engine_steps(args)
    elif "isd" in parts:
        steps += engine_steps(args, smollm2_engines=False)
    if "speed" in parts:
        steps.append(lambda: run_speed(args))
    for step in steps:
        try:
            step()
        except Exception as e:  # one broken part must not hide the others' results
            traceback.print_exc()
            record(f"{getattr(step, '__name__', 'step')} raised {type(e).__name__}: {e}", False)
        gc.collect()
        torch.cuda.empty_cache()
    must = [c for c in RESULTS["checks"] if c["must_pass"]]
    shown = [c for c in RESULTS["checks"] if not c["must_pass"]]
    print(f"\nSUMMARY: {sum(c['ok'] for c in must)}/{len(must)} deterministic checks passed; without the flag "
          f"{sum(not c['ok'] for c in shown)}/{len(shown)} comparisons differ")
    for name in FAILED:
        print(f"  FAILED: {name}")
    path = args.json or (os.path.join(os.environ["OUT"], "check_deterministic" + ("_speed" if parts == ["speed"]
                                                                                   else "") + ".json")
                         if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(RESULTS, indent=2, default=str))
        print(f"wrote {path}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
