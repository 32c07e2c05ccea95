"""GPU engine check: outputs of the engine on CUDA equal the CPU path's (float32), for ar, isd and
risd, with decode steps replayed as CUDA graphs and run eagerly, on tiny models whose head dim
lets the Triton kernel run, for each round shape: no branches, every branch that fits (tree
attention in the Triton kernel), and the adaptive stride. Greedy must match the CPU token for
token; seeded sampling must match between graphs and eager on the GPU. Then requests arriving
mid-decode (at most 12 at once, each with its own length), greedy and seeded; then refills in a
closed loop, where a newcomer's prefill is launched while a decode step is in flight.
The GPU engines launch each decode step before reading the one before (overlap scheduling, the
default; --no-overlap-scheduling: they read first); the CPU reference cannot launch ahead.

    python benchmarks/gpu_engine_check.py [--lora-only] [--no-overlap-scheduling]
"""

import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import (  # noqa: E402
    count_launches_after_prefill,
    count_launches_ahead,
    count_prefills_ahead,
    make_model,
    make_random_adapter,
)

from idlm import LLM, SamplingParams  # noqa: E402

SETUPS = {"cpu": dict(device="cpu"), "cuda-graphs": dict(device="cuda"),
          "cuda-eager": dict(device="cuda", enforce_eager=True)}


OVERLAP = "--no-overlap-scheduling" not in sys.argv[1:]


def run(folder: Path, adapter: Path | None, prompts, params, setup: str, max_num_seqs: int = 64):
    overlap = OVERLAP and setup != "cpu"
    llm = LLM(str(folder), adapter=str(adapter) if adapter else None, dtype="float32", progress=False,
              kv_cache_tokens=8192, max_num_seqs=max_num_seqs, overlap_scheduling=overlap, **SETUPS[setup])
    runner = llm.engine.runner
    launched = count_launches_ahead(runner)
    prefills, after_prefill = count_prefills_ahead(llm.engine), count_launches_after_prefill(llm.engine)
    outs = [o.token_ids for o in llm.generate(prompts, params)]
    if overlap:
        print(f"  ({setup}: {launched[0]} decode steps launched ahead, {after_prefill[0]} of them while a prefill "
              f"was in flight; {prefills[0]} prefills launched ahead)")
    graphs = runner.decode_graphs
    captured = sorted(graphs.graphs) if graphs is not None and graphs.use_graphs else []
    return outs, captured


SHAPES = {"plain": dict(stride_policy="fixed", branches=0), "branches": dict(stride_policy="fixed"),
          "adaptive": dict(stride_policy="adaptive")}


def compare(folder: Path, adapter: Path | None, prompts: list[list[int]], modes: list[str]) -> bool:
    ok = True
    for mode, shape in itertools.product(modes, SHAPES):
        if mode == "ar" and shape != "plain":
            continue
        strides = (2, 3, 4, 8) if mode != "ar" else (4,)
        mixed = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, mode=mode, stride=s, **SHAPES[shape])
                 for s, _ in zip(itertools.cycle(strides), prompts)]
        outs = {setup: run(folder, adapter, prompts, mixed, setup) for setup in SETUPS}
        for setup in ("cuda-graphs", "cuda-eager"):
            same = sum(a == b for a, b in zip(outs["cpu"][0], outs[setup][0]))
            ok &= same == len(prompts)
            print(f"{folder.name} {mode} {shape} greedy: {same}/{len(prompts)} equal on {setup} and cpu "
                  f"(graphs captured: {len(outs[setup][1])})")
        sampled = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=48, ignore_eos=True, mode=mode,
                                  stride=s, **SHAPES[shape])
                   for i, s in zip(range(len(prompts)), itertools.cycle(strides))]
        graph_out, eager_out = (run(folder, adapter, prompts, sampled, s)[0] for s in ("cuda-graphs", "cuda-eager"))
        same = sum(a == b for a, b in zip(graph_out, eager_out))
        print(f"{folder.name} {mode} {shape} seeded T=0.8: {same}/{len(prompts)} equal with graphs and eager")
    return ok


def run_refills(folder: Path, adapter: Path | None, prompts, params, setup: str, concurrency: int = 4):
    """A closed loop, as `idlm bench` drives the engine: `concurrency` requests at first, a new one
    added as each finishes, so each newcomer waits while a decode step is in flight (with overlap,
    its prefill is launched ahead). Tokens by prompt index."""
    overlap = OVERLAP and setup != "cpu"
    llm = LLM(str(folder), adapter=str(adapter) if adapter else None, dtype="float32", progress=False,
              kv_cache_tokens=8192, max_num_seqs=concurrency, overlap_scheduling=overlap, **SETUPS[setup])
    engine = llm.engine
    prefills, after_prefill = count_prefills_ahead(engine), count_launches_after_prefill(engine)
    ids, done, queued = {}, {}, iter(range(len(prompts)))
    for i in itertools.islice(queued, concurrency):
        ids[engine.add_request(prompts[i], params[i])] = i
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
                i = next(queued, None)
                if i is not None:
                    ids[engine.add_request(prompts[i], params[i])] = i
    if overlap:
        print(f"  ({setup}: {prefills[0]} prefills launched ahead, {after_prefill[0]} decode steps launched while "
              f"a prefill was in flight)")
    return [done[i] for i in range(len(prompts))], prefills[0]


def compare_joins(folder: Path, adapter: Path | None, prompts: list[list[int]], mode: str, kind: str) -> bool:
    """Requests that join while others decode, strides 2/3/4/8 with branches, each with its own
    length; greedy must equal the CPU, seeded T = 0.8 must equal between graphs and eager.
    kind "arrivals": every request queued at once, at most 12 running, so each later one is
    admitted mid-decode (a prefill beside running rounds). kind "refills": a closed loop
    (run_refills), where under overlap a newcomer's prefill is launched ahead, which must happen."""
    ok = True
    strides = itertools.cycle((2, 3, 4, 8))
    lengths = (lambda i: 12 + 7 * (i % 6)) if kind == "arrivals" else (lambda i: 10 + 5 * (i % 7))
    greedy = [SamplingParams(temperature=0, max_tokens=lengths(i), ignore_eos=True, mode=mode, stride=next(strides))
              for i in range(len(prompts))]

    def outputs(params, setup):
        if kind == "arrivals":
            return run(folder, adapter, prompts, params, setup, max_num_seqs=12)[0], None
        return run_refills(folder, adapter, prompts, params, setup)

    outs = {setup: outputs(greedy, setup) for setup in SETUPS}
    for setup in ("cuda-graphs", "cuda-eager"):
        same = sum(a == b for a, b in zip(outs["cpu"][0], outs[setup][0]))
        ok &= same == len(prompts) and (kind == "arrivals" or outs[setup][1] > 0 or not OVERLAP)
        print(f"{folder.name} {mode} {kind} greedy: {same}/{len(prompts)} equal on {setup} and cpu")
    sampled = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=p.max_tokens, ignore_eos=True,
                              mode=mode, stride=p.stride) for i, p in enumerate(greedy)]
    graph_out, eager_out = (outputs(sampled, s)[0] for s in ("cuda-graphs", "cuda-eager"))
    same = sum(a == b for a, b in zip(graph_out, eager_out))
    ok &= same == len(prompts)
    print(f"{folder.name} {mode} {kind} seeded T=0.8: {same}/{len(prompts)} equal with graphs and eager")
    return ok


def main() -> None:
    lora_only = "--lora-only" in sys.argv[1:]  # the risd checks alone (the gated LoRA's kernels)
    root = Path(tempfile.mkdtemp())
    # head_dim 16 (64 hidden / 4 heads), GQA group 2
    make_model(root / "qwen3", "sdar")  # Qwen3 packaged as an I-DLM: it has a MASK, so isd runs
    make_model(root / "llama", "llama")
    adapter = make_random_adapter(root / "llama", root / "adapter", mask_token_id=3)
    prompts = [[5 + i % 40, 6, 7, 8 + i % 30] * (1 + i % 5) for i in range(40)]
    ok = lora_only or compare(root / "qwen3", None, prompts, ["ar", "isd"])
    ok &= compare(root / "llama", adapter, prompts, ["ar", "risd"])
    ok &= lora_only or compare_joins(root / "qwen3", None, prompts, "isd", "arrivals")
    ok &= compare_joins(root / "llama", adapter, prompts, "risd", "arrivals")
    ok &= lora_only or compare_joins(root / "qwen3", None, prompts[:24], "isd", "refills")
    ok &= compare_joins(root / "llama", adapter, prompts[:24], "risd", "refills")
    print("ALL GREEDY EQUAL" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
