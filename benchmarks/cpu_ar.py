"""Greedy autoregressive decoding on CPU: idlm vs transformers, SmolLM2-135M-Instruct.

Both engines get the same prompt token ids (chat-templated real prompts, cut or extended to exactly
--prompt-tokens tokens, so no padding is needed) and generate exactly --new-tokens tokens each.
Throughput is total generated tokens / wall time of one generate call, prefill included.

    HF_HUB_OFFLINE=1 python benchmarks/cpu_ar.py --batch-sizes 1,8 --json /tmp/cpu_ar.json
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from idlm import LLM, SamplingParams
from idlm.models.gguf import default_gguf_path, float_folder

CHATS = [
    "Explain how a hash map handles collisions, and compare chaining with open addressing.",
    "Write a short poem about the sea at dawn, in the style of a haiku sequence.",
    "What were the main causes of the French Revolution? Give three and explain each briefly.",
    "How do I reverse a linked list in Python? Show the code and explain its complexity.",
    "Summarize the plot of Romeo and Juliet for a ten-year-old reader.",
    "What is the difference between weather and climate, and why does it matter?",
    "Give me a recipe for a simple vegetarian pasta dinner for four people.",
    "Why is the sky blue? Explain Rayleigh scattering in plain words.",
    "List some tips for staying focused while working from home.",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "How does photosynthesis turn sunlight into chemical energy in plants?",
    "Describe the rules of chess for a complete beginner.",
]
FILLER = (
    " Please be precise and give concrete examples where they help. Keep the answer well organized,"
    " use short paragraphs, and say so when something is uncertain or depends on context."
)
GENERATION_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

Prompts = list[list[int]]
Generate = Callable[[Prompts], Prompts]


@dataclass
class Result:
    engine: str
    batch_size: int
    prompt_tokens: int
    new_tokens: int
    times_s: list[float] = field(default_factory=list)
    cpu_util: list[float] = field(default_factory=list)  # process CPU seconds / wall seconds per run

    @property
    def generated(self) -> int:
        return self.batch_size * self.new_tokens

    @property
    def best_tok_s(self) -> float:
        return self.generated / min(self.times_s)

    @property
    def median_tok_s(self) -> float:
        return self.generated / statistics.median(self.times_s)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine and batch size, after one warm-up")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch intra-op threads (default {torch.get_num_threads()})")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--dtype", default="float32", help="model dtype for both engines (default float32)")
    return p.parse_args()


def fit_chat(tokenizer: PreTrainedTokenizerBase, user: str, length: int) -> list[int]:
    """Chat-templated prompt of exactly `length` tokens that still ends with the assistant turn:
    the user message is lengthened with filler if short, and cut before the suffix if long."""
    suffix = tokenizer.encode(GENERATION_SUFFIX, add_special_tokens=False)
    if length <= len(suffix):
        raise ValueError(f"--prompt-tokens must exceed {len(suffix)} (the generation suffix)")
    while True:
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= length:
            break
        user += FILLER
    body = ids[:len(ids) - len(suffix)] if ids[-len(suffix):] == suffix else ids
    return body[:length - len(suffix)] + suffix


def build_prompts(tokenizer: PreTrainedTokenizerBase, batch_size: int, length: int) -> Prompts:
    return [fit_chat(tokenizer, CHATS[i % len(CHATS)], length) for i in range(batch_size)]


def idlm_generator(llm: LLM, new_tokens: int) -> Generate:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def generate(prompts: Prompts) -> Prompts:
        return [list(out.token_ids) for out in llm.generate(prompts, params)]

    return generate


def hf_generator(model: torch.nn.Module, new_tokens: int, pad_id: int) -> Generate:
    @torch.inference_mode()
    def generate(prompts: Prompts) -> Prompts:
        input_ids = torch.tensor(prompts, dtype=torch.long)  # equal lengths: no padding needed
        attention_mask = torch.ones_like(input_ids)
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        return out[:, input_ids.shape[1]:].tolist()

    return generate


def timed(generate: Generate, prompts: Prompts) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process / wall seconds) of one generate call."""
    cpu, start = time.process_time(), time.perf_counter()
    generate(prompts)
    wall = time.perf_counter() - start
    return wall, (time.process_time() - cpu) / wall


def agreement(ours: Prompts, theirs: Prompts) -> tuple[float, float]:
    """(fraction of sequences identical, mean fraction of tokens before the first divergence)."""
    exact, prefix = 0, 0.0
    for a, b in zip(ours, theirs, strict=True):
        exact += a == b
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += same / max(len(a), len(b))
    return exact / len(ours), prefix / len(ours)


def bench_batch(engines: dict[str, Generate], prompts: Prompts, args: argparse.Namespace) -> dict:
    """One warm-up per engine, then `repeats` rounds alternating engines so drift hits both alike."""
    results = {name: Result(name, len(prompts), args.prompt_tokens, args.new_tokens) for name in engines}
    outputs: dict[str, Prompts] = {}
    for name, gen in engines.items():
        outputs[name] = gen(prompts)
        assert all(len(o) == args.new_tokens for o in outputs[name]), f"{name} did not generate {args.new_tokens}"
    for _ in range(args.repeats):
        for name, gen in engines.items():
            seconds, util = timed(gen, prompts)
            results[name].times_s.append(seconds)
            results[name].cpu_util.append(util)
    exact, prefix = agreement(outputs["idlm"], outputs["transformers"])
    return {"results": results, "exact": exact, "prefix": prefix}


def table_header() -> str:
    return ("| batch | prompt | new | idlm best tok/s | idlm median tok/s | HF best tok/s | HF median tok/s "
            "| ratio (best) | ratio (median) | greedy identical seqs | mean agreeing prefix |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def table_row(row: dict) -> str:
    ours, hf = row["results"]["idlm"], row["results"]["transformers"]
    return (f"| {ours.batch_size} | {ours.prompt_tokens} | {ours.new_tokens} "
            f"| {ours.best_tok_s:.1f} | {ours.median_tok_s:.1f} | {hf.best_tok_s:.1f} | {hf.median_tok_s:.1f} "
            f"| {ours.best_tok_s / hf.best_tok_s:.2f}x | {ours.median_tok_s / hf.median_tok_s:.2f}x "
            f"| {row['exact']:.0%} | {row['prefix']:.1%} |")


def contention_note(row: dict, threads: int) -> str | None:
    """A warning when this process did not get its threads' worth of CPU (others were running)."""
    worst = min(u for res in row["results"].values() for u in res.cpu_util)
    spread = max(max(r.times_s) / min(r.times_s) for r in row["results"].values())
    if worst < 0.8 * threads or spread > 1.3:
        return (f"  warning: batch {row['results']['idlm'].batch_size}: lowest CPU/wall {worst:.2f} with "
                f"{threads} threads, slowest/fastest run {spread:.2f}x, load {os.getloadavg()[0]:.1f}: "
                f"the machine was shared; trust best-of over median")
    return None


def environment(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__}


def to_json(rows: list[dict], args: argparse.Namespace) -> dict:
    runs = []
    for row in rows:
        for res in row["results"].values():
            runs.append({**asdict(res), "best_tok_s": res.best_tok_s, "median_tok_s": res.median_tok_s})
    agree = [{"batch_size": r["results"]["idlm"].batch_size, "identical_seqs": r["exact"],
              "mean_agreeing_prefix": r["prefix"]} for r in rows]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"config": config, "environment": environment(args.threads), "runs": runs, "agreement": agree}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    folder = float_folder(default_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Prefix caching off: every timed call must prefill, as transformers does.
    llm = LLM(dtype=args.dtype, device="cpu", max_num_seqs=max(batch_sizes), progress=False,
              enable_prefix_caching=False)
    engines = {"idlm": idlm_generator(llm, args.new_tokens),
               "transformers": hf_generator(hf_model, args.new_tokens, pad_id)}
    print(f"threads={args.threads} torch={torch.__version__} transformers={transformers.__version__} "
          f"model={folder.name} dtype={args.dtype}", flush=True)
    print(table_header(), flush=True)
    rows = []
    for bs in batch_sizes:
        rows.append(bench_batch(engines, build_prompts(tokenizer, bs, args.prompt_tokens), args))
        print(table_row(rows[-1]), flush=True)
    for note in filter(None, (contention_note(row, args.threads) for row in rows)):
        print(note)
    if args.json:
        args.json.write_text(json.dumps(to_json(rows, args), indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
