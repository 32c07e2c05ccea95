"""The timed loops on an `LLMEngine`, every step timed: exactly C requests in flight (closed
loop), or requests arriving at Poisson times whatever the engine does (open loop)."""

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from idlm.bench.roofline import Roofline
from idlm.bench.workload import Request
from idlm.engine.llm_engine import LLMEngine
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepShape:
    is_prefill: bool
    contexts: list[int]  # keys each sequence's last fed token attends over
    queries: list[int]  # tokens each sequence feeds


class StepProbe:
    """The shape of the batch each engine step ran (step() does not say whether it prefilled, nor
    how long the contexts were), taken when the scheduler handed the batch out: with overlap
    scheduling a step applies the batch handed out, and launched, in the step before."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.handed_out: deque[tuple[ScheduledBatch, StepShape]] = deque()  # not yet applied, oldest first

    def __enter__(self) -> "StepProbe":
        self.engine.scheduler.on_schedule = self._record
        return self

    def __exit__(self, *exc) -> None:
        self.engine.scheduler.on_schedule = None

    def _record(self, batch: ScheduledBatch) -> None:
        self.handed_out.append((batch, self._shape(batch)))

    def last(self) -> StepShape | None:
        """The shape of the batch the engine's last step applied, or None where it ran none."""
        if self.engine.last_batch is None:
            return None
        while True:  # batches are applied in the order they were handed out; a void one never is
            batch, shape = self.handed_out.popleft()
            if batch is self.engine.last_batch:
                return shape

    @staticmethod
    def _shape(batch: ScheduledBatch) -> StepShape:
        queries = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            final = seq.num_computed + n == len(seq)
            queries.append(n + (seq.num_lookahead if final else 0))
        contexts = [seq.num_computed + q for seq, q in zip(batch.seqs, queries)]
        return StepShape(batch.is_prefill, contexts, queries)


@dataclass(slots=True)
class Trace:
    """One request's clock: when it was added, when each output arrived and how many tokens it carried."""

    max_tokens: int
    prompt_tokens: int
    arrival: float
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def token_gaps(self) -> list[float]:
        """Per output token after the first output: the gap since the previous output divided
        by the tokens this output carried (once per token)."""
        gaps = []
        for prev, now, n in zip(self.times, self.times[1:], self.counts[1:]):
            gaps += [(now - prev) / n] * n
        return gaps

    def output_gaps(self) -> list[float]:
        """The gaps between the request's outputs, whatever each carried (time between outputs)."""
        return [now - prev for prev, now in zip(self.times, self.times[1:])]

    def summary(self) -> dict:
        latency = self.times[-1] - self.arrival
        decode = self.times[-1] - self.times[0]
        return {"prompt_tokens": self.prompt_tokens, "output_tokens": self.tokens,
                "ttft_s": self.times[0] - self.arrival, "latency_s": latency,
                "tok_s": self.tokens / latency,
                "decode_tok_s": (self.tokens - 1) / decode if decode > 0 else None}


@dataclass(slots=True)
class StepTiming:
    seconds: float
    shape: StepShape
    floor: float


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p99 = np.percentile(values, [50, 99])
    return float(p50), float(p99)


def _synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


ENGINE_COUNTERS = ("cold_rounds", "verify_rounds", "branch_rounds", "branch_drafts_accepted",
                  "decode_steps_launched_ahead")


def _counters(engine: LLMEngine) -> dict:
    st = engine.stats
    return {"tokens": st.tokens, "request_forwards": st.request_forwards, "forwards": st.forwards,
            "reached": list(st.drafts.reached), "accepted": list(st.drafts.accepted),
            "chosen": dict(engine.policy.chosen), "priced": {b: list(v) for b, v in engine.policy.priced.items()},
            **{k: getattr(st, k) for k in ENGINE_COUNTERS}}


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which n requests arrive at `rate` per second on average."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


def run_closed_loop(engine: LLMEngine, requests: list[Request], concurrency: int, params: SamplingParams,
                    roofline: Roofline, sync_steps: bool = False) -> dict:
    """Runs `requests` keeping `concurrency` of them in flight: a new one is added as soon as one
    finishes. Returns the run's figures (see idlm.bench.report.DEFINITIONS). sync_steps: the
    device synchronised around every step (each step's device work in its time, but a step
    launched ahead then waits for the host: overlap scheduling's pipeline stalls every step)."""
    return _run(engine, requests, params, roofline, concurrency=concurrency, sync_steps=sync_steps)


def run_open_loop(engine: LLMEngine, requests: list[Request], arrivals: list[float], params: SamplingParams,
                  roofline: Roofline, sync_steps: bool = False) -> dict:
    """Adds request i at `arrivals[i]` seconds after the start (or at the first moment after it
    that the loop is not inside a step), however many are in flight; its TTFT counts from that
    scheduled time, so time spent queued behind a step or the engine's own queue is in it."""
    return _run(engine, requests, params, roofline, arrivals=arrivals, sync_steps=sync_steps)


def _run(engine: LLMEngine, requests: list[Request], params: SamplingParams, roofline: Roofline,
         concurrency: int | None = None, arrivals: list[float] | None = None, sync_steps: bool = False) -> dict:
    assert not engine.has_unfinished(), "the engine must be idle before a timed run"
    sync = _synchronizer(engine.device)
    # by default a step is timed as the caller sees it, from the call to its return: the outputs it
    # returns are then on the host, and the step launched ahead runs on (an engine loop serving
    # requests never waits for the device between steps)
    step_sync = sync if sync_steps else (lambda: None)
    waiting = deque(requests)
    due = deque(arrivals or [])
    live: dict[int, Trace] = {}
    done: list[Trace] = []
    steps: list[StepTiming] = []

    def admit(arrival: float) -> None:
        req = waiting.popleft()
        request_id = engine.add_request(req.prompt, dataclasses.replace(params, max_tokens=req.max_tokens))
        live[request_id] = Trace(req.max_tokens, len(req.prompt), arrival)

    def admit_due(now: float) -> None:
        while due and start + due[0] <= now:
            admit(start + due.popleft())

    before = _counters(engine)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    with StepProbe(engine) as probe:
        sync()
        start = time.perf_counter()
        if arrivals is None:
            while waiting and len(live) < concurrency:
                admit(time.perf_counter())
        while live or waiting:
            if arrivals is not None:
                admit_due(time.perf_counter())
                if not live:  # idle until the next arrival
                    time.sleep(max(0.0, start + due[0] - time.perf_counter()))
                    continue
            step_sync()
            t0 = time.perf_counter()
            outputs = engine.step()
            step_sync()
            now = time.perf_counter()
            shape = probe.last()
            if shape is None:
                raise RuntimeError(f"the engine scheduled nothing while {len(live)} requests were in flight")
            steps.append(StepTiming(now - t0, shape, roofline.floor(shape.contexts, shape.queries)))
            for out in outputs:
                trace = live[out.request_id]
                new = len(out.token_ids) - trace.tokens
                if new:
                    trace.times.append(now)
                    trace.counts.append(new)
                if out.finished:
                    done.append(live.pop(out.request_id))
                    if waiting and arrivals is None:
                        admit(time.perf_counter())
        elapsed = time.perf_counter() - start
    after = _counters(engine)
    result = _figures(done, steps, elapsed, before, after)
    result["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(engine.device)
                                   if engine.device.type == "cuda" else None)
    return result


def decode_shapes(decode: list[StepTiming]) -> dict[str, list]:
    """Decode steps by shape, "requests x rows" (rows: the most any request fed), most frequent first:
    [steps, mean seconds]. At one concurrency it tells AR steps (x1) at a full batch, a price the
    policy chose, from those of a batch draining at the end of a run."""
    groups: dict[tuple[int, int], list[float]] = {}
    for s in decode:
        groups.setdefault((len(s.shape.queries), max(s.shape.queries)), []).append(s.seconds)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return {f"{b}x{t}": [len(v), sum(v) / len(v)] for (b, t), v in ranked}


def _figures(done: list[Trace], steps: list[StepTiming], elapsed: float, before: dict, after: dict) -> dict:
    requests = [t.summary() for t in done]
    tokens = sum(r["output_tokens"] for r in requests)
    ttft = percentiles([r["ttft_s"] for r in requests])
    itl = percentiles([gap for t in done for gap in t.token_gaps()])
    tbt = percentiles([gap for t in done for gap in t.output_gaps()])
    decode = [s for s in steps if not s.shape.is_prefill]
    decode_time = sum(s.seconds for s in decode)
    delta = {k: after[k] - before[k] for k in ("tokens", "request_forwards", "forwards")}
    reached = [a - b for a, b in zip(after["reached"], before["reached"] + [0] * len(after["reached"]))]
    accepted = [a - b for a, b in zip(after["accepted"], before["accepted"] + [0] * len(after["accepted"]))]
    decode_tok_s = [r["decode_tok_s"] for r in requests if r["decode_tok_s"] is not None]
    chosen = {k: n - before["chosen"].get(k, 0) for k, n in sorted(after["chosen"].items())}
    priced = {b: (n - before["priced"].get(b, [0, 0.0])[0], total - before["priced"].get(b, [0, 0.0])[1])
              for b, (n, total) in sorted(after["priced"].items())}
    return {
        "num_requests": len(requests),
        "output_tokens": tokens,
        "elapsed_s": elapsed,
        "output_tok_s": tokens / elapsed,
        "per_request_tok_s": float(np.mean([r["tok_s"] for r in requests])),
        "per_request_decode_tok_s": float(np.mean(decode_tok_s)) if decode_tok_s else None,
        "latency_s_p50": percentiles([r["latency_s"] for r in requests])[0],
        "ttft_s_p50": ttft[0],
        "ttft_s_p99": ttft[1],
        "itl_s_p50": itl[0],
        "itl_s_p99": itl[1],
        "tbt_s_p50": tbt[0],
        "tbt_s_p99": tbt[1],
        "tokens_per_forward": delta["tokens"] / delta["request_forwards"] if delta["request_forwards"] else None,
        "forwards": delta["forwards"],
        "draft_acceptance": [a / r if r else None for a, r in zip(accepted, reached)],
        **{k: after[k] - before[k] for k in ENGINE_COUNTERS},
        "chosen_k": {str(k): n for k, n in chosen.items() if n},
        "priced_round_gain": {str(b): round(total / n, 4) for b, (n, total) in priced.items() if n},
        "steps": len(steps),
        "decode_steps": len(decode),
        "decode_step_s_mean": decode_time / len(decode) if decode else None,
        "decode_batch_mean": float(np.mean([len(s.shape.queries) for s in decode])) if decode else None,
        "decode_floor_s_mean": sum(s.floor for s in decode) / len(decode) if decode else None,
        "decode_shapes": decode_shapes(decode),
        "roofline_fraction": sum(s.floor for s in decode) / decode_time if decode else None,
        "requests": requests,
    }
