"""The prompt file an on-policy distill answers, and the split of its answers afterwards, for the
GPU scripts (gpu_loss_comparison.sh, gpu_idlm_v2.sh): one `idlm distill` call answers training
and held-out prompts together, and the answers are parted again by prompt.

    python scripts/onpolicy_sets.py prompts N OUT [--heldout-limit L]   # OUT and OUT.heldout
    python scripts/onpolicy_sets.py split ALL OUT_PROMPTS TRAIN HELDOUT  # OUT_PROMPTS.heldout parts ALL
"""

import argparse
import gzip
import json

TRAIN = "configs/smollm2/prompts/v2/train.jsonl.gz"
HELDOUT = ("configs/smollm2/prompts/heldout.jsonl", "configs/smollm2/prompts/v2/heldout_code.jsonl",
           "configs/smollm2/prompts/v2/heldout_prose.jsonl")


def write_prompts(n: int, out: str, heldout_limit: int | None) -> None:
    """The first n training prompts, then every held-out set (its first heldout_limit each)."""
    with gzip.open(TRAIN, "rt", encoding="utf-8") as f:
        train = [json.loads(line)["prompt"] for _, line in zip(range(n), f)]
    held = []
    for path in HELDOUT:
        with open(path, encoding="utf-8") as f:
            held += [json.loads(line)["prompt"] for line in f][:heldout_limit]
    assert not set(train) & set(held), "a held-out prompt is among the training prompts"
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in train + held)
    with open(out + ".heldout", "w", encoding="utf-8") as f:
        json.dump(held, f)
    print(f"{len(train)} training + {len(held)} held-out prompts")


def split(answers: str, prompts: str, train_out: str, heldout_out: str) -> None:
    """The distilled chats of answers, parted by whether their prompt is held out."""
    with open(prompts + ".heldout", encoding="utf-8") as f:
        held = set(json.load(f))
    with open(answers, encoding="utf-8") as f, open(train_out, "w", encoding="utf-8") as tr, \
            open(heldout_out, "w", encoding="utf-8") as ho:
        for line in f:
            (ho if json.loads(line)["messages"][0]["content"] in held else tr).write(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prompts")
    pr.add_argument("n", type=int)
    pr.add_argument("out")
    pr.add_argument("--heldout-limit", type=int, default=None)
    sp = sub.add_parser("split")
    for name in ("answers", "prompts", "train_out", "heldout_out"):
        sp.add_argument(name)
    args = p.parse_args()
    if args.command == "prompts":
        write_prompts(args.n, args.out, args.heldout_limit)
    else:
        split(args.answers, args.prompts, args.train_out, args.heldout_out)


if __name__ == "__main__":
    main()
