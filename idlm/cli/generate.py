"""`idlm generate` (one prompt, streamed) and `idlm chat` (interactive)."""

import argparse
import sys
import time

from idlm.cli.options import ENGINE, SAMPLING, add_options, engine_args, sampling_params
from idlm.config import EngineConfig
from idlm.engine.llm_engine import LLMEngine
from idlm.engine.sampling_params import SamplingParams


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate a continuation of one prompt, streamed to the terminal",
                         description="Generate a continuation of PROMPT and stream it to the terminal.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--prompt-ids", default=None,
                     help="comma-separated token ids to use instead of the prompt text (for models without a "
                          "tokenizer)")
    gen.add_argument("--stats", action="store_true",
                     help="print forwards, tokens, tokens/forward, rounds, draft acceptance and tokens/s afterwards")
    add_options(gen, ENGINE)
    add_options(gen, SAMPLING)
    gen.set_defaults(run=run_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (chat template, streamed answers)",
                          description="Interactive chat. Type a message and press Enter; /reset forgets "
                                      "the conversation; /exit or Ctrl-D quits.")
    chat.add_argument("--system", default=None, help="system message")
    add_options(chat, ENGINE)
    add_options(chat, SAMPLING)
    chat.set_defaults(run=run_chat)


def stream(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[str, dict]:
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


def prompt_ids(engine: LLMEngine, args: argparse.Namespace) -> list[int]:
    if args.prompt_ids:
        try:
            return engine.tokenize([int(t) for t in args.prompt_ids.split(",")])
        except ValueError as e:
            raise ValueError(f"--prompt-ids must be comma-separated token ids ({e})") from e
    if args.chat:
        return engine.chat_prompt([{"role": "user", "content": args.prompt}])
    return engine.tokenize(args.prompt)


def format_stats(stats: dict, params: SamplingParams, elapsed: float) -> str:
    tokens, forwards = stats["tokens"], stats["forwards"]
    lines = [f"[stats] mode={params.mode} stride={params.stride} proposal={params.proposal}"
             f"{' (lossy)' if params.lossy else ''} tokens={tokens} forwards={forwards} "
             f"tokens/forward={stats['tokens_per_forward']:.2f} time={elapsed:.2f}s tokens/s={tokens / elapsed:.1f}"]
    if params.mode != "ar":
        drafts = stats["drafts"]
        lines.append(f"[stats] stride_policy={params.stride_policy} rounds: cold={stats['cold_rounds']} "
                     f"verify={stats['verify_rounds']} (from a branch: {stats['branch_rounds']}); drafts "
                     f"proposed={sum(drafts['proposed'])} accepted={sum(drafts['accepted'])} (from a branch: "
                     f"{stats['branch_drafts_accepted']}); acceptance by position="
                     + " ".join(f"{a:.2f}" for a in drafts["acceptance"]))
    return "\n".join(lines)


def run_generate(args: argparse.Namespace) -> None:
    params = sampling_params(args)
    engine = LLMEngine(EngineConfig(**engine_args(args)))
    ids = prompt_ids(engine, args)
    params = engine.resolve(params)
    start = time.perf_counter()
    _, stats = stream(engine, ids, params)
    elapsed = time.perf_counter() - start
    if args.stats:
        print(format_stats(stats, params, elapsed), file=sys.stderr)


def run_chat(args: argparse.Namespace) -> None:
    params = sampling_params(args)
    engine = LLMEngine(EngineConfig(**engine_args(args)))
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
