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
    p.add_argument("--adapter", default=None, help="gated-LoRA (R-ISD) adapter folder for the model")


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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        {"generate": run_generate, "chat": run_chat}[args.command](args)
    except ValueError as e:
        print(f"idlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
