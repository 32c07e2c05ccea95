"""What detokenising costs the engine per decode step: R requests, each fed one more token a step up to
T tokens, with the embedded default's tokenizer (SmolLM2), decoding the whole output every step
against the Rust tokenizer's stream. `--clean-up` sets clean_up_tokenization_spaces as transformers
5.17 does for this tokenizer (the H200 image), which used to force the whole decode.

    python benchmarks/detokenize_cost.py [--requests 64] [--tokens 256] [--clean-up]
"""

import argparse
import random
import time
from pathlib import Path

from idlm.engine.detokenizer import IncrementalDetokenizer
from idlm.models.gguf import cached_hf_folder, default_gguf_path
from idlm.models.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--clean-up", action="store_true")
    args = parser.parse_args()
    tokenizer = load_tokenizer(cached_hf_folder(default_gguf_path()))
    tokenizer.clean_up_tokenization_spaces = args.clean_up
    ids = tokenizer.encode((Path(__file__).parents[1] / "README.md").read_text(), add_special_tokens=False)
    rng = random.Random(0)
    outputs = [ids[s:s + args.tokens] for s in (rng.randrange(len(ids) - args.tokens) for _ in range(args.requests))]
    for label, whole in (("whole decode every step", True), ("stream", False)):
        detoks = [IncrementalDetokenizer(tokenizer, []) for _ in outputs]
        if whole:
            for d in detoks:
                d.stream = None
        streams = detoks[0].stream is not None
        fed = [[] for _ in outputs]
        start = time.perf_counter()
        for n in range(args.tokens):
            for d, out, seen in zip(detoks, outputs, fed):
                seen.append(out[n])  # the engine's token list grows in place, as here
                d.feed(seen, final=False)
                d.release(final=False)
        per_step = (time.perf_counter() - start) / args.tokens
        for d, out in zip(detoks, outputs):
            d.feed(out, final=True)
        same = all(d.text == tokenizer.decode(out, skip_special_tokens=True).rstrip("\ufffd")
                   for d, out in zip(detoks, outputs))
        print(f"{label:24s} (the detokenizer streams: {streams}): {per_step * 1e3:.2f} ms per step of "
              f"{args.requests} requests, mean over {args.tokens} tokens; texts equal a whole decode: {same}")


if __name__ == "__main__":
    main()
