"""`idlm serve [MODEL]`: the OpenAI-compatible server."""

import argparse
import math
import os

from idlm.cli.options import (
    BRANCHES,
    ENGINE,
    MAX_NUM_SEQS,
    MODE,
    MODEL_HELP,
    PROPOSAL,
    SCHEDULING,
    STRIDE,
    STRIDE_POLICY,
    add_options,
    engine_args,
)
from idlm.config import MAX_STRIDE, EngineConfig
from idlm.engine.llm_engine import LLMEngine

API_KEY_ENV = ("IDLM_API_KEY", "VLLM_API_KEY")


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
    add_options(p, (MAX_NUM_SEQS, *SCHEDULING))
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a free slot; beyond that the server answers 429 (default 256)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id of the API; requests may also leave out `model` (default: the hub id, the "
                        "folder's name, the GGUF file's stem, or SmolLM2-135M-Instruct for the embedded default)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1 routes (401 otherwise; /health, /metrics and "
                        f"the playground page stay open); default: ${API_KEY_ENV[0]}, else ${API_KEY_ENV[1]}, else "
                        f"none")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish after SIGINT/SIGTERM before they are cancelled "
                        "(default 10)")
    p.set_defaults(run=run)


def check_args(args: argparse.Namespace) -> None:
    """What can be refused before the model loads (which takes a while)."""
    if args.model_path and args.model:
        raise ValueError("give the model once: as MODEL or as --model")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535 (0 = any free port), got {args.port}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty; leave it out to serve without a key")


def run(args: argparse.Namespace) -> None:
    from idlm.server.serve import serve

    check_args(args)
    engine = LLMEngine(EngineConfig(**engine_args(args, model=args.model_path or args.model)))
    if engine.replays_graphs:  # (seconds to minutes: say so before it starts)
        print(f"idlm: timing decode steps up to {engine.config.max_num_seqs} requests and capturing their CUDA "
              f"graphs, before serving", flush=True)
    seconds = engine.prepare_decode_steps()
    if seconds is not None:
        print(f"idlm: {engine.prepared(seconds)}", flush=True)
    serve(engine, args.served_model_name or engine.name, host=args.host, port=args.port,
          max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, api_key=api_key(args))


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first of API_KEY_ENV that is set, else None (no key asked)."""
    return args.api_key or next((os.environ[name] for name in API_KEY_ENV if os.environ.get(name)), None)
