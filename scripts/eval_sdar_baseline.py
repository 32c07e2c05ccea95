"""The SDAR-style baseline's alpha and TPF on held-out chat prompts (issue 7, docs/REPRODUCTION.md).

    python scripts/eval_sdar_baseline.py runs/smollm2-sdar/final --strides 4 -o sdar.json

For each block size N (default: the one it was trained at):
- alpha: its own parallel decoding (N tokens per forward) at --temperature (default 1), then
  mean min(1, p/q) with p from its causal clean stream, as `idlm eval alpha` does for ISD;
- TPF and acceptance by block position: lossless decoding with its MASK guesses as proposals
  (idlm/eval/block_diffusion.py), greedy; its output must equal the clean stream's greedy ar
  output, which the engine also produces here, and the script counts identical answers.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from idlm.engine.llm import LLM
from idlm.engine.sampling_params import SamplingParams
from idlm.eval.block_diffusion import (
    BlockDiffusionModel,
    ProbabilityRule,
    clean_probs,
    exact_decode,
    parallel_decode,
    read_sdar_keys,
)
from idlm.eval.data import read_conversations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="an SDAR-style checkpoint folder (idlm train with objective: sdar)")
    ap.add_argument("--prompts", default="configs/smollm2/prompts/heldout.jsonl")
    ap.add_argument("--strides", type=int, nargs="+", default=None, help="block sizes N (default: the trained one)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for alpha")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded together (default 16)")
    ap.add_argument("--output", "-o", default=None)
    args = ap.parse_args()

    try:
        mask_id, trained_block = read_sdar_keys(args.model)
        conversations = read_conversations(Path(args.prompts))[:args.limit]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.batch < 1 or args.max_tokens < 1:
        raise SystemExit("error: --batch and --max-tokens must be >= 1")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, mode="ar", kv_cache_tokens=64 * 1024)
    engine = llm.engine
    prompts = [engine.chat_prompt(c) for c in conversations]
    start = time.perf_counter()
    ar = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=True)
    result = {"model": args.model, "prompts": args.prompts, "num_prompts": len(prompts), "dtype": args.dtype,
              "device": str(engine.device), "max_tokens": args.max_tokens, "trained_block_size": trained_block,
              "ar_seconds": round(time.perf_counter() - start, 1), "runs": []}
    greedy = ProbabilityRule(0.0, 0, 1.0, mask_id, engine.device)
    sampled = ProbabilityRule(args.temperature, 0, 1.0, mask_id, engine.device)
    for n in args.strides or [trained_block]:
        bd = BlockDiffusionModel(engine.model, mask_id, n)
        gen = torch.Generator().manual_seed(args.seed)
        ratios, tokens, forwards, identical = [], 0, 0, 0
        reached, accepted = [0] * n, [0] * n
        for start in tqdm(range(0, len(prompts), args.batch), desc=f"N={n}"):
            batch = prompts[start:start + args.batch]
            natives = parallel_decode(bd, batch, args.max_tokens, sampled, engine.eos_ids, gen)
            exacts = exact_decode(bd, batch, args.max_tokens, greedy, engine.eos_ids, gen)
            for prompt, native, exact, ar_out in zip(batch, natives, exacts, ar[start:start + args.batch]):
                if native.tokens:
                    p = clean_probs(bd, prompt, native.tokens, sampled)
                    q = torch.tensor(native.q, dtype=torch.float64)
                    ratios.append(torch.where(q > 0, (p / q).clamp(max=1.0), torch.ones_like(p)))
                identical += exact.tokens == ar_out.token_ids
                tokens += len(exact.tokens)
                forwards += exact.forwards
                reached = [a + b for a, b in zip(reached, exact.reached)]
                accepted = [a + b for a, b in zip(accepted, exact.accepted)]
        every = torch.cat(ratios)
        entry = {"block_size": n, "alpha": float(every.mean()), "alpha_tokens": len(every),
                 "alpha_temperature": args.temperature, "tpf_exact_greedy": tokens / forwards,
                 "identical_to_ar": identical, "tokens": tokens, "forwards": forwards,
                 "acceptance_by_position": [a / r if r else 0.0 for a, r in zip(accepted, reached)]}
        result["runs"].append(entry)
        print(f"N={n}: alpha {entry['alpha']:.3f} (T={args.temperature}, {len(every)} tokens); exact greedy TPF "
              f"{entry['tpf_exact_greedy']:.2f}, identical to ar {identical}/{len(prompts)}; acceptance by position "
              + " ".join(f"{a:.2f}" for a in entry["acceptance_by_position"]), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
