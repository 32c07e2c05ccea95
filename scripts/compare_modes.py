"""Greedy ISD / R-ISD against AR on held-out chat prompts: identical outputs and tokens per forward.

Loads the model once, answers every prompt greedily with mode ar, then with the ISD mode at each
stride, and compares token ids. At temperature 0 ISD must give AR's tokens exactly; where bfloat16
rounding differs between a one-token AR forward and a multi-token verify forward, a near-tie can
flip, so run with --dtype float32 for the exactness check and with bfloat16 for serving speed.

    python scripts/compare_modes.py --model BASE.gguf --adapter runs/smollm2-risd/final --strides 4 -o risd.json
    python scripts/compare_modes.py --model runs/smollm2-idlm/final --mode isd --strides 2 3 4 8 -o isd.json
    python scripts/compare_modes.py --strides 2 3 4 --branches 0 all -o branches.json   # the embedded default

Every ISD run has a fixed stride (stride_policy fixed); --branches gives the most branch drafts a
round adds (0: none, a cold round after each rejection; all: as many as fit), a run each.
--temperatures 0 1 adds sampled runs (a seed per prompt from --seed): their acceptance by draft
position is the speculative-sampling acceptance at that temperature; "identical" is left out
(null) for them, since sampled ISD equals AR in distribution, not token for token.

Tokens per forward (TPF) are from each output's stats: output tokens over the forwards that
request took part in, summed over requests (`tpf`) and averaged per request (`tpf_mean`).
"""

import argparse
import json
import time
from pathlib import Path

from idlm.engine.llm import LLM
from idlm.engine.sampling_params import SamplingParams
from idlm.eval.data import read_conversations


def run(llm: LLM, conversations, params: SamplingParams) -> tuple[list, float]:
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=True)
    return outputs, time.perf_counter() - start


def summary(outputs, seconds: float) -> dict:
    tokens = sum(o.stats["tokens"] for o in outputs)
    forwards = sum(o.stats["forwards"] for o in outputs)
    per_request = [o.stats["tokens_per_forward"] for o in outputs]
    accepted, reached = [], []
    for o in outputs:
        drafts = o.stats.get("drafts") or {}
        for j, (a, r) in enumerate(zip(drafts.get("accepted", []), drafts.get("reached", []))):
            if j == len(accepted):
                accepted.append(0)
                reached.append(0)
            accepted[j] += a
            reached[j] += r
    return {"tokens": tokens, "forwards": forwards, "tpf": tokens / forwards if forwards else 0.0,
            "tpf_mean": sum(per_request) / len(per_request), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "draft_acceptance": [a / r if r else 0.0 for a, r in zip(accepted, reached)],
            "finish_reasons": {k: sum(o.finish_reason == k for o in outputs) for k in ("stop", "length")}}


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default="configs/smollm2/prompts/heldout.jsonl",
                    help='JSONL of {"prompt": str} (sent as a user message) or {"messages": [...]}')
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="gated-LoRA adapter folder (R-ISD)")
    ap.add_argument("--mode", choices=["risd", "isd"], default=None, help="default: risd with --adapter, else isd")
    ap.add_argument("--strides", type=int, nargs="+", default=[4])
    ap.add_argument("--branches", nargs="+", default=["0"], help="0..15 or all, a run each (default 0)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0],
                    help="a run per temperature (default 0 = greedy); T > 0 runs are seeded per prompt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first prompt's sampled runs (default 0)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="KV pool size in tokens (default: sized from free memory; give it when several "
                         "processes share a GPU)")
    ap.add_argument("--deterministic", action="store_true",
                    help="batch-invariant kernels: a request's tokens do not depend on its batch (bf16 on CUDA)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--output", "-o", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    mode = args.mode or ("risd" if args.adapter or args.model is None else "isd")
    branch_caps = [None if b == "all" else int(b) for b in args.branches]

    conversations = read_conversations(Path(args.prompts))[:args.limit]
    llm = LLM(args.model, adapter=args.adapter, dtype=args.dtype, device=args.device,
              max_num_seqs=args.max_num_seqs, kv_cache_tokens=args.kv_cache_tokens,
              deterministic=args.deterministic)
    ar_out, ar_seconds = run(llm, conversations, SamplingParams(temperature=0, max_tokens=args.max_tokens, mode="ar"))
    result = {"prompts": args.prompts, "num_prompts": len(conversations), "model": args.model or "embedded default",
              "adapter": args.adapter, "mode": mode, "dtype": args.dtype,
              "device": str(llm.engine.device), "max_tokens": args.max_tokens,
              "ar": summary(ar_out, ar_seconds), "runs": []}
    print(f"{'mode':<6}{'N':>3}{'br':>4}{'identical':>11}{'TPF':>7}{'TPF/req':>9}{'tok/s':>9}  cold/verify/branch "
          f"rounds  acceptance by draft position")
    print(f"{'ar':<6}{1:>3}{'-':>4}{'-':>11}{result['ar']['tpf']:>7.2f}{result['ar']['tpf_mean']:>9.2f}"
          f"{result['ar']['tokens_per_s']:>9}")
    for temp, stride, cap in ((t, s, b) for t in args.temperatures for s in args.strides for b in branch_caps):
        common = dict(temperature=temp, max_tokens=args.max_tokens, mode=mode, stride=stride, stride_policy="fixed",
                      branches=cap)
        params = (SamplingParams(**common) if temp == 0 else
                  [SamplingParams(**common, seed=args.seed + i) for i in range(len(conversations))])
        out, seconds = run(llm, conversations, params)
        mismatches = []
        for i, (conv, a, b) in enumerate(zip(conversations, ar_out, out)):
            if temp == 0 and a.token_ids != b.token_ids:
                mismatches.append({"index": i, "prompt": conv[-1]["content"],
                                   "first_difference": first_difference(a.token_ids, b.token_ids),
                                   "ar_text": a.text, "text": b.text})
        rounds = {k: sum(o.stats[k] for o in out) for k in ("cold_rounds", "verify_rounds", "branch_rounds")}
        entry = {"stride": stride, "branches": "all" if cap is None else cap, "temperature": temp,
                 "identical": len(conversations) - len(mismatches) if temp == 0 else None,
                 **summary(out, seconds), **rounds, "mismatches": mismatches}
        result["runs"].append(entry)
        same = f"{entry['identical']:>7}/{len(conversations):<3}" if temp == 0 else f"{'T=' + format(temp, 'g'):>11}"
        print(f"{mode:<6}{stride:>3}{entry['branches']:>4}{same}"
              f"{entry['tpf']:>7.2f}{entry['tpf_mean']:>9.2f}{entry['tokens_per_s']:>9}  "
              f"{rounds['cold_rounds']}/{rounds['verify_rounds']}/{rounds['branch_rounds']}  "
              + " ".join(f"{a:.2f}" for a in entry["draft_acceptance"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
