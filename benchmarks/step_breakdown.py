"""Where a decode step's wall time goes, per engine function, without a profiler's overhead:
each named function is wrapped in a perf_counter timer (nested times are included in their
caller's). C requests from a workload per mode, one engine (with --requests R > C, a closed loop:
a newcomer joins as each request finishes, until R have run, as `idlm bench` does); every mode runs
the whole loop once untimed first (so CUDA graphs of every shape the loop meets are captured),
then once timed. Steps are also told apart by kind: prefill, decode built on the device from
the step before (next_step.build_step), decode built on the host; decode steps by K and rows
per request too.

  python benchmarks/step_breakdown.py --model M --adapter A --workload W --concurrency 64
"""

import argparse
import functools
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import idlm.engine.llm_engine as llm_engine
import idlm.engine.runner as runner
from idlm.config import EngineConfig
from idlm.engine.decode_graphs import DecodeGraphs
from idlm.engine.detokenizer import IncrementalDetokenizer
from idlm.engine.next_step import SlotState
from idlm.engine.round_graphs import RoundGraph, RoundGraphs
from idlm.engine.round_step import RoundResult
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.scheduler import Scheduler

TOTALS: dict[str, float] = defaultdict(float)
KINDS: dict[str, list[float]] = defaultdict(list)  # step kind -> wall seconds of each step


def timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def classify_steps() -> None:
    """Each LLMEngine._step's wall time, filed under its kind."""
    E, R = llm_engine.LLMEngine, runner.ModelRunner
    step, launch, built, ahead = E._step, R.launch, R._run_built, R.launch_next
    state = {}

    def shape(seqs) -> str:  # a decode step's K and rows per request, the stride policy's key
        return f" K={max(s.num_new for s in seqs)} rows={max(s.layout.num_rows for s in seqs)}"

    def launch_wrapper(self, seqs, num_new):
        state["kind"] = "prefill" if any(n > 1 for n in num_new) else "decode, host-built" + shape(seqs)
        return launch(self, seqs, num_new)

    def ahead_wrapper(self, seqs):
        out = ahead(self, seqs)
        if out is not None:
            # (the step that launched it is filed under this kind)
            state["kind"] = "decode, launched ahead" + shape(seqs)
        return out

    def built_wrapper(self, seqs, carry):
        out = built(self, seqs, carry)
        if out is not None:
            state["kind"] = "decode, device-built" + shape(seqs)
        return out

    def step_wrapper(self):
        state["kind"] = None
        t = time.perf_counter()
        out = step(self)
        if state["kind"] is not None:
            KINDS[state["kind"]].append(time.perf_counter() - t)
        return out

    E._step, R.launch, R._run_built, R.launch_next = step_wrapper, launch_wrapper, built_wrapper, ahead_wrapper


def instrument() -> None:
    E, R = llm_engine.LLMEngine, runner.ModelRunner
    for owner, name, label in [
        (E, "_step", "step"), (Scheduler, "schedule", "schedule"), (R, "launch", "runner.launch"),
        (R, "launch_next", "runner.launch_next"), (R, "collect", "runner.collect"),
        (R, "_run_built", "_run_built"),
        (SlotState, "from_carry", "SlotState.from_carry"), (runner, "padded_block_tables", "block_tables"),
        (DecodeGraphs, "step_from_carry", "graphs.step_from_carry"), (DecodeGraphs, "run", "graphs.run (host-built)"),
        (runner, "feed_rows", "feed_rows"), (R, "_launch_round", "_launch_round"),
        (runner, "round_inputs", "round_inputs"),
        (RoundGraphs, "get", "round_graphs.get"), (RoundGraph, "replay", "round replay"),
        (RoundResult, "read", "result.read (waits for the GPU)"), (E, "_apply_round", "_apply_round"),
        (E, "_append", "_append"), (IncrementalDetokenizer, "feed", "detok.feed"), (E, "_output", "_output"),
    ]:
        timed(owner, name, label)


class Feed:
    """Adds the workload's next request (greedy, stride 4 for isd/risd) each call, until `total`."""

    def __init__(self, engine, lines: list[dict], mode: str, policy: str, total: int):
        self.engine, self.lines, self.mode, self.policy, self.total = engine, lines, mode, policy, total
        self.added = 0

    def __call__(self) -> None:
        if self.added == self.total:
            return
        line = self.lines[self.added % len(self.lines)]
        self.added += 1
        self.engine.add_request(line["prompt"], SamplingParams(
            mode=self.mode, stride=None if self.mode == "ar" else 4, stride_policy=self.policy or None, temperature=0,
            max_tokens=line.get("max_tokens", 256)))


def summarise(run: str, c: int, steps: int, tokens: int, wall: float, engine) -> dict:
    per_step = {k: round(v / steps * 1e3, 3) for k, v in sorted(TOTALS.items(), key=lambda kv: -kv[1])}
    kinds = {k: dict(steps=len(v), median_ms=round(statistics.median(v) * 1e3, 3),
                     mean_ms=round(sum(v) / len(v) * 1e3, 3)) for k, v in sorted(KINDS.items())}
    chosen = dict(sorted(engine.policy.chosen.items()))
    engine.policy.chosen.clear()
    print(f"{run} C={c}: {steps} steps, {tokens} tokens, {tokens / wall:.0f} tok/s, "
          f"{wall / steps * 1e3:.2f} ms a step; adaptive K chosen (warm and timed passes): {chosen}")
    for k, v in kinds.items():
        print(f"  [{k}] {v['steps']} steps, median {v['median_ms']} ms, mean {v['mean_ms']} ms")
    for k, v in per_step.items():
        print(f"  {k:36s} {v:8.3f} ms/step")
    return dict(steps=steps, tokens=tokens, wall_s=wall, tok_s=tokens / wall, ms_per_step=per_step, kinds=kinds,
                adaptive_k_chosen=chosen)


def profile_loop(engine, refill) -> dict[str, tuple[int, float]]:
    """Runs the engine's requests to the end under torch.profiler, calling refill() once for each
    request that finishes; prints and returns, per GPU kernel name (shortened), (launches,
    microseconds) per step, the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        n = 0
        while engine.has_unfinished():
            for _ in range(sum(o.finished for o in engine.step())):
                refill()
            n += 1
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    # the raw activity records: kernels replayed from CUDA graphs have no CPU op to hang from
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            entry = by_name[e.name()[:90]]
            entry[0] += 1
            entry[1] += e.duration_ns() / 1e3
    total = sum(v[1] for v in by_name.values())
    print(f"  GPU kernels: {sum(v[0] for v in by_name.values()) / n:.0f} launches, {total / n:.0f} us per step "
          f"({n} steps, profiled)")
    out = {}
    for name, (count, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:60]:
        out[name] = (round(count / n, 2), round(us / n, 2))
        print(f"    {us / n:8.1f} us  {count / n:6.1f}x  {name}")
    return out


def cprofile_loop(engine, refill, top: int) -> list[dict]:
    """Runs the engine's requests to the end under cProfile; prints and returns the `top` functions
    by their own time per step."""
    import cProfile
    import pstats

    prof, n = cProfile.Profile(), 0
    prof.enable()
    while engine.has_unfinished():
        for _ in range(sum(o.finished for o in engine.step())):
            refill()
        n += 1
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(((tt, ct, calls, f"{Path(file).name}:{line} {name}")
                   for (file, line, name), (_, calls, tt, ct, _) in stats.items()), reverse=True)[:top]
    print(f"  host functions, own time per step under cProfile ({n} steps):")
    for tt, ct, calls, where in rows:
        print(f"    {tt / n * 1e3:7.3f} ms own {ct / n * 1e3:7.3f} ms with callees {calls / n:7.1f} calls  {where}")
    return [dict(function=where, own_ms=tt / n * 1e3, cumulative_ms=ct / n * 1e3, calls=calls / n)
            for tt, ct, calls, where in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--workload", required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=0,
                   help="requests in all (default: the concurrency, one wave); more refill the batch as they finish")
    p.add_argument("--modes", default="ar,risd:fixed,risd:adaptive",
                   help="mode[:stride policy], comma-separated; policy k0: adaptive held at K = 0 (AR steps of "
                        "risd requests, to compare with ar's)")
    p.add_argument("--gpu-profile", action="store_true",
                   help="a third pass of each mode under torch.profiler: GPU kernel time per step, by kernel")
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="one more pass of each mode under cProfile: the N functions with the most host time of their "
                        "own (the profiler slows Python, so compare shares, not times)")
    p.add_argument("--overlap-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="EngineConfig.overlap_scheduling (default on)")
    p.add_argument("-o", "--output")
    args = p.parse_args()
    lines = [json.loads(x) for x in Path(args.workload).read_text().splitlines() if x.strip()]
    c = args.concurrency
    total = max(args.requests, c)
    engine = llm_engine.LLMEngine(EngineConfig(model=args.model, adapter=args.adapter, max_num_seqs=c,
                                               enable_prefix_caching=False, progress=False,
                                               overlap_scheduling=args.overlap_scheduling))
    instrument()
    classify_steps()
    report = {}
    if any(run.partition(":")[2] in ("", "adaptive") and not run.startswith("ar") for run in args.modes.split(",")):
        engine.policy.cost.measure_up_to(c)  # as `idlm bench` does: no step of a pass measures the step costs
    choose = engine.policy._choose_shared
    for run in args.modes.split(","):
        mode, _, policy = run.partition(":")
        engine.policy._choose_shared = (lambda shared, batch, decode: ((0, 0), 0)) if policy == "k0" else choose
        policy = "adaptive" if policy == "k0" else policy
        passes = ["warm", "timed"] + ["profiled"] * args.gpu_profile + ["cprofiled"] * bool(args.cprofile)
        for pass_ in passes:
            TOTALS.clear()
            KINDS.clear()
            feed = Feed(engine, lines, mode, policy, total)
            for _ in range(c):
                feed()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            if pass_ == "profiled":
                report[run]["gpu_kernels_us_per_step"] = profile_loop(engine, feed)
                continue
            if pass_ == "cprofiled":
                report[run]["host_functions"] = cprofile_loop(engine, feed, args.cprofile)
                continue
            t0 = time.perf_counter()
            steps = tokens = 0
            while engine.has_unfinished():
                outs = engine.step()
                steps += 1
                tokens += sum(len(o.new_token_sources) for o in outs)
                for _ in range(sum(o.finished for o in outs)):
                    feed()
            wall = time.perf_counter() - t0
            if pass_ == "timed":
                report[run] = summarise(run, c, steps, tokens, wall, engine)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
