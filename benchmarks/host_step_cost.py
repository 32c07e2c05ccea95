"""The engine's host work per decode step, on the CPU: a tiny model in the padded decode layout
that CUDA graphs replay (run eagerly here), C requests decoded together with overlap scheduling,
each engine function timed as benchmarks/step_breakdown.py times it. The forward and the round
(graphs.step_from_carry, round replay) are the CPU's arithmetic here, not what a GPU's host spends;
the rest (scheduling, building the step, applying the outcome, outputs) is the Python a GPU's
host runs too, so changes to it can be compared without a GPU.

    python benchmarks/host_step_cost.py [--concurrency 64] [--mode risd] [--repeats 3]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import step_breakdown  # noqa: E402
from helpers import make_random_adapter, make_small_idlm  # noqa: E402

from idlm import LLM, SamplingParams  # noqa: E402
from idlm.engine.kv_pool import MAX_LOOKAHEAD  # noqa: E402

# the GPU's own work, timed here on the CPU's arithmetic: left out of the host total
DEVICE_WORK = ("graphs.step_from_carry", "round replay", "graphs.run (host-built)")
HOST_PARTS = ("_apply_round", "_output", "runner.collect", "runner.launch_next", "schedule")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--mode", default="risd")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    model = make_small_idlm(folder / "model", spread=0.25, vocab=12)
    adapter = make_random_adapter(model, folder / "adapter")
    step_breakdown.instrument()
    llm = LLM(str(model), adapter=str(adapter), progress=False, kv_cache_tokens=65536, overlap_scheduling=True,
              max_num_seqs=args.concurrency)
    engine = llm.engine
    engine.runner.use_padded_decode(args.concurrency, engine.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 11, (20,), generator=gen).tolist() for _ in range(args.concurrency)]
    params = SamplingParams(mode=args.mode, stride=4, stride_policy="fixed", max_tokens=args.max_tokens,
                            ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    runs = []
    for _ in range(args.repeats):
        step_breakdown.TOTALS.clear()
        steps = [0]
        step = engine.step

        def counted(step=step, steps=steps):
            steps[0] += 1
            return step()

        engine.step = counted
        t = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - t
        engine.step = step
        n = steps[0]
        per_step = {k: v / n * 1e3 for k, v in step_breakdown.TOTALS.items()}
        host = per_step["step"] - sum(per_step.get(k, 0.0) for k in DEVICE_WORK)
        runs.append((host, per_step))
        print(f"{n} steps, {wall / n * 1e3:.2f} ms a step; host work {host:.3f} ms a step: "
              + ", ".join(f"{k} {per_step.get(k, 0.0):.3f}" for k in HOST_PARTS))
    print(f"host work a step, median of {args.repeats}: {statistics.median(h for h, _ in runs):.3f} ms "
          f"(C = {args.concurrency}, {args.mode}, torch {torch.__version__}, 1 thread)")


if __name__ == "__main__":
    main()
