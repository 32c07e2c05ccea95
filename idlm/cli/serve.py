"""`idlm serve [MODEL]`: the OpenAI-compatible server."""

import argparse

from idlm.cli.options import (
    BRANCHES,
    ENGINE,
    MAX_NUM_SEQS,
    MODE,
    MODEL_HELP,
    PROPOSAL,
    STRIDE,
    STRIDE_POLICY,
    add_options,
    engine_args,
)
from idlm.config import MAX_STRIDE, EngineConfig
from idlm.engine.llm_engine import LLMEngine


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a playground page",
                       description="Serve MODEL over an OpenAI-compatible API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models), with /health, /metrics and a "
                                   "playground at /. Ctrl-C or SIGTERM shuts it down.")
    p.add_argument("model_path", nargs="?", metavar="MODEL", default=None, help=MODEL_HELP)
    add_options(p, ENGINE)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free)")
    add_options(p, (MODE, STRIDE, PROPOSAL, STRIDE_POLICY, BRANCHES),
                mode={"help": "default decoding mode of requests that name none (default: risd with --adapter, "
                              "isd for I-DLM checkpoints, else ar)"},
                stride={"help": f"default N of requests that name none (2-{MAX_STRIDE})"},
                proposal={"default": "sample",
                          "help": "default draft proposal of requests that name none (default sample, exact)"},
                stride_policy={"help": "default stride policy of requests that name none: fixed, or adaptive "
                                       "(default; N is then a maximum, chosen per step for throughput)"},
                branches={"help": "default most branch drafts per round of requests that name none (0 = none; "
                                  "default: as many as fit)"})
    add_options(p, (MAX_NUM_SEQS,))
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a free slot; beyond that the server answers 429 (default 256)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id of the API (default: the model folder or file name)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled "
                        "(default 10)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from idlm.server.serve import serve, served_model_name

    if args.model_path and args.model:
        raise ValueError("give the model once: as MODEL or as --model")
    model = args.model_path or args.model
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    engine = LLMEngine(EngineConfig(**engine_args(args, model=model)))
    serve(engine, args.served_model_name or served_model_name(model), host=args.host, port=args.port,
          max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout)
