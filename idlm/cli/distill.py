"""`idlm distill PROMPTS OUT.jsonl`: the engine answers the prompts; idlm.training.distill writes
the answers as training data."""

import argparse
from pathlib import Path

from idlm.cli.options import ENGINE, MAX_NUM_SEQS, SAMPLING, add_options, engine_args, sampling_params
from idlm.engine.llm import LLM
from idlm.eval.client import per_request
from idlm.eval.data import read_conversations
from idlm.training.distill import Conversation, distill


def add_parsers(sub) -> None:
    p = sub.add_parser("distill", help="make on-policy training data: the model answers prompts",
                       description="The model answers every prompt through the engine; writes chat JSONL "
                                   "that `idlm train` reads.")
    p.add_argument("prompts", help="text file (one prompt per line) or JSONL with prompt / messages")
    p.add_argument("output", help="chat JSONL to write")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="answers per prompt (default 1)")
    add_options(p, (MAX_NUM_SEQS,))
    add_options(p, ENGINE)
    add_options(p, SAMPLING)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.samples_per_prompt < 1:
        raise ValueError("--samples-per-prompt must be >= 1")
    sampling_params(args)  # bad flags fail before the model loads
    llm = LLM(**engine_args(args))
    params = sampling_params(args, llm.engine.sampling_defaults)

    def answer(conversations: list[Conversation]) -> list[str]:
        outputs = llm.chat(conversations, per_request(params, len(conversations)), use_tqdm=True)
        return [out.text for out in outputs]

    written = distill(read_conversations(Path(args.prompts)), answer, Path(args.output), args.samples_per_prompt)
    print(f"wrote {written} examples to {args.output}")
