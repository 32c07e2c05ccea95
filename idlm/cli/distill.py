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
    p.add_argument("--more", nargs=2, action="append", default=[], metavar=("PROMPTS", "OUTPUT"),
                   help="another prompt file answered by the same engine into its own output (repeatable: "
                        "shards of a large set with one model load)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out every output that already holds answers (a sharded run continues where it stopped)")
    add_options(p, (MAX_NUM_SEQS,))
    add_options(p, ENGINE)
    add_options(p, SAMPLING)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.samples_per_prompt < 1:
        raise ValueError("--samples-per-prompt must be >= 1")
    sampling_params(args)  # bad flags fail before the model loads
    jobs = [(Path(args.prompts), Path(args.output))] + [(Path(p), Path(o)) for p, o in args.more]
    if args.skip_existing:
        jobs = [(p, o) for p, o in jobs if not (o.is_file() and o.stat().st_size)]
        if not jobs:
            print("every output already holds answers: nothing to distill")
            return
    prompts = [read_conversations(p) for p, _ in jobs]  # a bad file fails before the model loads
    llm = LLM(**engine_args(args))
    params = sampling_params(args, llm.engine.sampling_defaults)

    def answer(conversations: list[Conversation]) -> list[str]:
        outputs = llm.chat(conversations, per_request(params, len(conversations)), use_tqdm=True)
        return [out.text for out in outputs]

    for conversations, (_, output) in zip(prompts, jobs):
        # written aside and renamed when whole: a run cut short leaves no half-written output
        partial = output.with_name(output.name + ".tmp")
        written = distill(conversations, answer, partial, args.samples_per_prompt)
        partial.replace(output)
        print(f"wrote {written} examples to {output}")
