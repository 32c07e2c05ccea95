"""Does a request's own acceptance so far predict its next rounds? (the adaptive stride policy's
per-request estimate, idlm/engine/stride_policy.py OWN_FADE)

Decodes held-out chats with `risd` at a fixed stride of 4 and no branch drafts, one trace per request
(the drafts each verify round accepted), then:
- how much a request's acceptance persists: its two halves' correlation across requests, and the
  correlation of rounds 1, 2, 4 and 8 apart within one;
- the policy's per-request rule replayed over the traces: at each round the request's own counts,
  shrunk towards the engine-wide rate with PRIOR_WEIGHT pseudo-rounds and faded by `fade` a token
  since it last tested drafts, give its expected tokens a round; below the price of a round (in AR
  steps) it takes AR steps for that round's tokens, and going back costs a cold round. Reported
  against the fixed stride, for round prices from 0.65 to 1.05 times the engine-wide expectation.
A replay, not an engine: a round it skips is assumed to have carried the same tokens as in the trace.

    python benchmarks/policy_traces.py [--model M --adapter A] [--prompts 48] [--max-tokens 192]
        [--traces traces.json]   # reuse traces saved before
"""

import argparse
import json
from pathlib import Path

import numpy as np

from idlm.engine import sequence
from idlm.engine.stride_policy import HYSTERESIS, PRIOR_WEIGHT

HELDOUT = Path(__file__).resolve().parents[1] / "configs" / "smollm2" / "prompts" / "heldout.jsonl"
DRAFTS = 3  # stride 4
RULES = ((PRIOR_WEIGHT, 1.0), (PRIOR_WEIGHT, 0.9), (PRIOR_WEIGHT, 0.8), (4 * PRIOR_WEIGHT, 1.0))


def collect(model: str | None, adapter: str | None, prompts: int, max_tokens: int) -> list[list[int]]:
    """Accepted drafts of each verify round, per request, in order."""
    from idlm import LLM, SamplingParams

    traces: dict[int, list[int]] = {}
    record = sequence.DraftCounts.record

    def recording(counts, num_drafts, num_accepted, times=1):
        if times == 1:  # (the engine's own tallies come per step, with times)
            traces.setdefault(id(counts), []).append(num_accepted)
        record(counts, num_drafts, num_accepted, times)

    sequence.DraftCounts.record = recording
    try:
        llm = LLM(model, **({"adapter": adapter} if adapter else {}), max_num_seqs=8, progress=False)
        chats = [[{"role": "user", "content": json.loads(line)["prompt"]}]
                 for line in HELDOUT.read_text().splitlines()[:prompts]]
        llm.chat(chats, SamplingParams(temperature=0, max_tokens=max_tokens, stride=DRAFTS + 1,
                                       stride_policy="fixed", branches=0))
    finally:
        sequence.DraftCounts.record = record
    per_request = sorted(traces.values(), key=len)
    return [t for t in per_request if 5 <= len(t) <= max_tokens]


def engine_rate(traces: list[np.ndarray]) -> np.ndarray:
    rounds = np.concatenate(traces)
    reached = np.array([(rounds >= j).sum() for j in range(DRAFTS)])
    accepted = np.array([(rounds > j).sum() for j in range(DRAFTS)])
    return accepted / reached


def expected(p: np.ndarray) -> float:
    return 1.0 + float(np.cumprod(p).sum())


def lag_correlation(traces: list[np.ndarray], lag: int) -> float:
    long = [t for t in traces if len(t) > lag]
    return float(np.corrcoef(np.concatenate([t[:-lag] for t in long]), np.concatenate([t[lag:] for t in long]))[0, 1])


def replay(traces: list[np.ndarray], prior: np.ndarray, price: float, weight: float, fade: float) -> float:
    """Tokens per AR-step time of the per-request rule over the traces."""
    tokens = seconds = 0.0
    for trace in traces:
        reached, accepted, rounds = np.zeros(DRAFTS), np.zeros(DRAFTS), True
        for a in trace:
            estimate = expected((accepted + weight * prior) / (reached + weight))
            if estimate > price * (1 / HYSTERESIS if rounds else HYSTERESIS):
                seconds += price if rounds else 2 * price - 1  # back from AR: a cold round's token first
                rounds = True
                reached += np.arange(DRAFTS) <= a
                accepted += np.arange(DRAFTS) < a
            else:
                seconds += 1 + a  # AR steps for the round's tokens
                rounds = False
                reached *= fade ** (1 + a)
                accepted *= fade ** (1 + a)
            tokens += 1 + a
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded default")
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--traces", type=Path, default=None, help="read traces from here if it exists, else save them")
    args = p.parse_args()
    if args.traces is not None and args.traces.exists():
        raw = json.loads(args.traces.read_text())
    else:
        raw = collect(args.model, args.adapter, args.prompts, args.max_tokens)
        if args.traces is not None:
            args.traces.write_text(json.dumps(raw))
    traces = [np.array(t) for t in raw]
    prior = engine_rate(traces)
    print(f"{len(traces)} requests, {sum(map(len, traces))} verify rounds; acceptance by position "
          f"{np.round(prior, 3).tolist()}, {expected(prior):.2f} tokens a round")
    halves = np.array([(t[:len(t) // 2].mean(), t[len(t) // 2:].mean()) for t in traces])
    print(f"a request's two halves correlate {np.corrcoef(halves.T)[0, 1]:.2f}; rounds apart within one:",
          ", ".join(f"{lag}: {lag_correlation(traces, lag):.2f}" for lag in (1, 2, 4, 8)))
    print("price of a round / engine-wide tokens a round, then the rule (prior weight, fade) against the fixed stride:")
    for share in (0.65, 0.75, 0.85, 0.95, 1.05):
        price = share * expected(prior)
        fixed = replay(traces, prior, price, 1e12, 1.0)
        cells = [f"w {w:g} fade {f:g}: {replay(traces, prior, price, w, f) / fixed:.3f}" for w, f in RULES]
        print(f"  {share:.2f} ({price:.2f} AR steps): " + " | ".join(cells))


if __name__ == "__main__":
    main()
