"""`idlm generate` (one prompt, streamed) and `idlm chat` (interactive)."""

import argparse
import sys
import time
from dataclasses import dataclass

from idlm.cli.options import ENGINE, SAMPLING, add_options, engine_args, sampling_params
from idlm.config import EngineConfig
from idlm.engine.llm_engine import LLMEngine, RequestOutput
from idlm.engine.sampling_params import SamplingParams


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate a continuation of one prompt, streamed to the terminal",
                         description="Generate a continuation of PROMPT and stream it to the terminal.")
    gen.add_argument("prompt", help="the prompt text; - reads it from standard input (without its final newline)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--prompt-ids", default=None,
                     help="comma-separated token ids to use instead of the prompt text (for models without a "
                          "tokenizer)")
    gen.add_argument("--stats", action="store_true",
                     help="print afterwards the finish reason, time to first token, prefill and decode rates, "
                          "forwards and tokens per forward, and for isd/risd the rounds and draft acceptance")
    add_options(gen, ENGINE)
    add_options(gen, SAMPLING)
    gen.set_defaults(run=run_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (chat template, streamed answers)",
                          description="Interactive chat. Type a message and press Enter; /reset forgets "
                                      "the conversation, /help lists the commands, /exit or Ctrl-D quits.")
    chat.add_argument("--system", default=None, help="system message")
    add_options(chat, ENGINE)
    add_options(chat, SAMPLING)
    chat.set_defaults(run=run_chat)


@dataclass(slots=True)
class Timing:
    """Wall-clock marks of one streamed request: added, first output token, finished."""

    start: float
    first_token: float | None = None
    end: float | None = None


def stream(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[RequestOutput, Timing]:
    """Runs one request, printing its text as it becomes final; returns its last output."""
    timing = Timing(time.perf_counter())
    request_id = engine.add_request(prompt_ids, params)
    while True:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if timing.first_token is None and out.token_ids:
                timing.first_token = time.perf_counter()
            print(out.new_text, end="", flush=True)
            if out.finished:
                timing.end = time.perf_counter()
                print()
                return out, timing


def prompt_text(args: argparse.Namespace) -> str:
    # the newline that ends `echo`'s or a file's last line is no part of the prompt
    return sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt


def prompt_ids(engine: LLMEngine, args: argparse.Namespace) -> list[int]:
    if args.prompt_ids:
        try:
            return engine.tokenize([int(t) for t in args.prompt_ids.split(",")])
        except ValueError as e:
            raise ValueError(f"--prompt-ids must be comma-separated token ids ({e})") from e
    if args.chat:
        return engine.chat_prompt([{"role": "user", "content": prompt_text(args)}])
    return engine.tokenize(prompt_text(args))


def format_stats(out: RequestOutput, params: SamplingParams, timing: Timing) -> str:
    """The figures that apply to this request: decode rate after the first token (the prefill
    makes that one), draft statistics only where drafts were proposed."""
    stats, tokens = out.stats, len(out.token_ids)
    ttft = timing.first_token - timing.start
    line = (f"[stats] mode={params.mode} finish={out.finish_reason} prompt_tokens={len(out.prompt_token_ids)} "
            f"tokens={tokens} forwards={stats['forwards']} tokens/forward={stats['tokens_per_forward']:.2f} "
            f"ttft={ttft:.3f}s prefill={len(out.prompt_token_ids) / ttft:.1f} tok/s")
    if tokens > 1:
        line += f" decode={(tokens - 1) / max(timing.end - timing.first_token, 1e-9):.1f} tok/s"
    line += f" total={timing.end - timing.start:.2f}s"
    if params.mode == "ar":
        return line
    drafts = stats["drafts"]
    isd = (f"[stats] stride={params.stride} stride_policy={params.stride_policy} proposal={params.proposal}"
           f"{' (lossy)' if params.lossy else ''} rounds: cold={stats['cold_rounds']} verify={stats['verify_rounds']}")
    if params.branches != 0:
        isd += f" (from a branch: {stats['branch_rounds']})"
    isd += f"; drafts proposed={sum(drafts['proposed'])} accepted={sum(drafts['accepted'])}"
    if params.branches != 0:
        isd += f" (from a branch: {stats['branch_drafts_accepted']})"
    if drafts["acceptance"]:
        isd += " acceptance by position=" + " ".join(f"{a:.2f}" for a in drafts["acceptance"])
    return line + "\n" + isd


def run_generate(args: argparse.Namespace) -> None:
    sampling_params(args)  # bad flags fail before the model loads
    engine = LLMEngine(EngineConfig(**engine_args(args)))
    params = engine.resolve(sampling_params(args, engine.sampling_defaults))
    out, timing = stream(engine, prompt_ids(engine, args), params)
    if args.stats:
        print(format_stats(out, params, timing), file=sys.stderr)


CHAT_COMMANDS = {"/reset": "forget the conversation (the system message stays)", "/help": "list these commands",
                 "/exit": "quit (also /quit or Ctrl-D)"}


def run_chat(args: argparse.Namespace) -> None:
    sampling_params(args)
    engine = LLMEngine(EngineConfig(**engine_args(args)))
    params = sampling_params(args, engine.sampling_defaults)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("idlm chat: /help lists the commands, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.startswith("/"):
            command = line.split()[0]
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                history = history[:1] if args.system else []
                print("(conversation forgotten)", file=sys.stderr)
            elif command == "/help":
                print("\n".join(f"  {name:<7} {what}" for name, what in CHAT_COMMANDS.items()), file=sys.stderr)
            else:
                print(f"unknown command {command}; /help lists the commands (to send a message that starts with /, "
                      f"start it with a space)", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:
            out, _ = stream(engine, engine.chat_prompt(history), params)
        except ValueError as e:
            history.pop()
            print(f"idlm: error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": out.text})
