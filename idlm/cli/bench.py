"""`idlm bench`: throughput and latency against concurrency, per decoding mode."""

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from idlm.cli.options import CHAT_TEMPLATE, ENGINE, GENERATION_CONFIG, MAX_MODEL_LEN, QUANTIZATION, add_options
from idlm.config import MAX_STRIDE
from idlm.engine.sampling_params import MODES, STRIDE_POLICIES
from idlm.models.shapes import SHAPES

EXAMPLES = """examples:
  idlm bench --shape qwen3-8b --modes ar,isd,risd --hf-baseline -o results.json --plot plot.png
  idlm bench --model I-DLM-FOLDER --workload prompts.jsonl --concurrency 1,8,32
  idlm bench --modes ar,risd --stride 2,3,4 --stride-policy fixed,adaptive   # the default model
  idlm bench --shape qwen3-8b -tp 1,2 --concurrency 1,64   # one GPU against two, in one call

Every (mode, C) run keeps exactly C requests in flight (a new one is added when one finishes)
until its requests are done, after an untimed warm-up of C short requests (--warmup full: the run
itself once). The table shows output tok/s, per-request tok/s (output tokens / request latency),
TTFT and inter-token latency (per token: the gap between a request's outputs / the tokens the
later one carried), tokens per forward, mean decode step time (steps without prefill), that step
time's roofline fraction (floor = max((weights + KV read) / --peak-bandwidth, FLOPs /
--peak-flops), over the measured time) and peak GPU memory. --request-rate adds open-loop runs
(Poisson arrivals), shown with their rate in the C column. --output writes every figure, per
request too, with the command, device, versions, date and the definitions."""


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="throughput and latency vs concurrency: ar, isd, risd, HF transformers",
                       description="Benchmark the engine: closed-loop runs at each concurrency for each\n"
                                   "decoding mode, optionally against transformers generate.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the bench loads the model folder it resolved (for a GGUF, its float cache), so no --quantization; its
    # requests set every sampling field and use no chat template
    add_options(p, [o for o in ENGINE if o not in (QUANTIZATION, MAX_MODEL_LEN, CHAT_TEMPLATE, GENERATION_CONFIG)],
                kv_cache_tokens={"help": "size of the paged KV pool in tokens (default: enough for --max-num-seqs "
                                         "requests of the longest prompt + output)"},
                tensor_parallel_size={"type": str, "default": "1", "metavar": "N[,N..]",
                                      "help": "comma-separated tensor-parallel sizes, an engine each running every "
                                              "run, e.g. 1,2 to compare one GPU with two in one call (default 1)"})
    p.add_argument("--shape", default=None,
                   help=f"random weights of a real model's shape instead of --model: {', '.join(SHAPES)} "
                        "(has a MASK token, so isd runs; speed only)")
    p.add_argument("--workload", default=None,
                   help='JSONL of {"prompt": "text" or [ids], "max_tokens": N} lines (or "prompt_ids") '
                        "instead of random prompts")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per run (default: max(4 C, 16); with --workload the file's lines, at least 4 C, "
                        "cycled)")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens per random prompt (default 128)")
    p.add_argument("--output-len", type=int, default=256,
                   help="tokens every request generates, EOS ignored (default 256; with --workload, for lines "
                        "without max_tokens)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels C (default 1,4,16,64)")
    p.add_argument("--modes", default=None,
                   help="comma-separated decoding modes: ar, isd, risd (default ar,isd; isd only where the "
                        "model has a MASK token, risd added with --adapter)")
    p.add_argument("--stride", default="4",
                   help=f"comma-separated N of isd and risd, a run each (2-{MAX_STRIDE}, default 4)")
    p.add_argument("--stride-policy", default="adaptive",
                   help="comma-separated stride policies of isd and risd, a run each: fixed (every round proposes "
                        "N-1 drafts) and/or adaptive (N is a maximum, chosen per step; default adaptive)")
    p.add_argument("--branches", type=int, default=None,
                   help="most branch drafts a round adds (0 = none; default: as many as fit)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests the engine decodes together (default: the largest C)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and requests (default 0)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="keep prefix caching on (off by default: runs repeat prompts)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--overlap-scheduling", default="on",
                   help="off, on, or off,on: launch each decode step before the host has read the one before "
                        "(EngineConfig.overlap_scheduling); off,on runs everything both ways on one engine, "
                        "alternating (default on)")
    p.add_argument("--sync-steps", action="store_true",
                   help="synchronise the device around every engine step, so that a step's time holds its device "
                        "work; it stalls overlap scheduling's pipeline every step (idlm bench's only way before "
                        "2026-12-01); default: steps timed as the caller sees them")
    p.add_argument("--warmup", choices=("short", "full"), default="short",
                   help="untimed before each closed-loop run: short (C short requests, default) or full (the run "
                        "itself once, so that no CUDA graph is captured inside the timed run)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run everything R times on the one engine, interleaved (every mode once, then again; rows "
                        "labelled #1 .. #R): on a noisy machine compare modes within a round (default 1)")
    p.add_argument("--hf-baseline", action="store_true",
                   help="also time transformers generate (greedy, static left-padded batches of C prompts)")
    p.add_argument("--request-rate", default=None,
                   help="comma-separated rates (requests/s): open-loop runs besides the closed ones, requests "
                        "arriving at Poisson times however many are in flight; reports TTFT and ITL p50/p99")
    p.add_argument("--peak-bandwidth", default="auto",
                   help="memory bandwidth of the roofline, B/s, or auto: measured in this call by a large "
                        "device copy, read + written bytes (default auto; the H200 copies 4.28e12, the H100 3.0e12)")
    p.add_argument("--peak-flops", type=float, default=800e12,
                   help="matmul rate of the roofline, FLOP/s (default 8e14, H100 bf16)")
    p.add_argument("--output", "-o", default=None, help="write all results as JSON to this file")
    p.add_argument("--plot", default=None,
                   help="write a PNG: total vs per-request tok/s, one curve per mode (and hf), points labelled C")
    p.set_defaults(run=run)


def comma_list(text: str, flag: str, parse: Callable[[str], object]) -> tuple:
    try:
        return tuple(parse(item.strip()) for item in text.split(","))
    except ValueError as e:
        raise ValueError(f"{flag} must be a comma-separated list, got {text!r} ({e})") from e


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"{text} is not a positive number")
    return value


def positive_number(text: str, flag: str) -> float:
    try:
        return positive_float(text)
    except ValueError:
        raise ValueError(f"{flag} must be auto or a positive number of B/s, got {text!r}") from None


def one_of(names: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise ValueError(f"unknown {what} {text!r}; choose from {', '.join(names)}")
        return text

    return parse


def command_line(args: argparse.Namespace) -> str:
    """The command line that repeats this run, every option spelled out."""
    words = ["idlm", "bench"]
    for name, value in vars(args).items():
        if name in ("command", "run", "parser") or value is None or value is False:
            continue
        words.append(f"--{name.replace('_', '-')}")
        if value is not True:
            words.append(str(value))
    return shlex.join(words)


def run(args: argparse.Namespace) -> None:
    from idlm.bench import report, suite

    if args.workload and args.prompt_len is not None:
        raise ValueError("--prompt-len is for random prompts; a --workload file brings its own")
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: its folder does not exist")
    cfg = suite.BenchConfig(
        model=args.model, shape=args.shape, workload=args.workload, num_prompts=args.num_prompts,
        prompt_len=128 if args.prompt_len is None else args.prompt_len, output_len=args.output_len,
        concurrency=comma_list(args.concurrency, "--concurrency", positive_int),
        modes=comma_list(args.modes, "--modes", one_of(MODES, "mode")) if args.modes else None,
        strides=comma_list(args.stride, "--stride", int),
        stride_policies=comma_list(args.stride_policy, "--stride-policy", one_of(STRIDE_POLICIES, "stride policy")),
        branches=args.branches,
        temperature=args.temperature, hf_baseline=args.hf_baseline, device=args.device, dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs, adapter=args.adapter, seed=args.seed,
        prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        warmup=args.warmup, overlap=tuple(x == "on" for x in comma_list(args.overlap_scheduling, "--overlap-scheduling",
                                                      one_of(("off", "on"), "setting"))),
        deterministic=bool(args.deterministic), sync_steps=args.sync_steps, repeats=args.repeats,
        tensor_parallel_sizes=comma_list(args.tensor_parallel_size, "--tensor-parallel-size", positive_int),
        request_rates=comma_list(args.request_rate, "--request-rate", positive_float) if args.request_rate else (),
        peak_bandwidth=None if args.peak_bandwidth == "auto" else positive_number(args.peak_bandwidth,
                                                                                 "--peak-bandwidth"),
        peak_flops=args.peak_flops)
    result = suite.run_bench(cfg, command=command_line(args),
                             log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(report.format_table(result))
    if args.output:
        report.write_json(result, Path(args.output))
        print(f"wrote {args.output}", file=sys.stderr)
    if args.plot:
        report.write_plot(result, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)
