"""Tokens per forward and introspective acceptance of the three draft proposals.

Runs on the CPU with tiny I-DLM-packaged models built here (vocabulary 12; `spread` sets how well
MASK rows guess the clean rows), so it measures the decoding rule, not a trained model.

    python benchmarks/proposal_tpf.py [--spreads 0.1,0.25,0.4] [--temperatures 1.0,0.7]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from helpers import make_small_idlm  # noqa: E402

from idlm import LLM, SamplingParams  # noqa: E402
from idlm.eval.introspection import introspective_acceptance  # noqa: E402

PROPOSALS = ("sample", "argmax_exact", "argmax")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spreads", default="0.1,0.25,0.4")
    parser.add_argument("--temperatures", default="1.0,0.7")
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = [[2, 3, 4, 5], [6, 7], [8, 9, 10, 2, 3]] * 20
    print("| spread | T | " + " | ".join(f"{p} TPF (alpha_draft)" for p in PROPOSALS) + " |")
    print("|---|---|" + "---|" * len(PROPOSALS))
    for spread in map(float, args.spreads.split(",")):
        folder = make_small_idlm(Path(tempfile.mkdtemp()), spread=spread)
        llm = LLM(str(folder), progress=False, kv_cache_tokens=8192)
        for temperature in map(float, args.temperatures.split(",")):
            cells = []
            for proposal in PROPOSALS:
                params = SamplingParams(mode="isd", stride=args.stride, temperature=temperature, seed=0,
                                        max_tokens=args.max_tokens, ignore_eos=True, proposal=proposal)
                r = introspective_acceptance(llm, prompts, params)
                cells.append(f"{r.tokens_per_forward:.2f} ({r.alpha_draft:.3f})")
            print(f"| {spread} | {temperature} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
