"""The embedded default on this CPU: idlm (risd with the shipped adapter, and ar, on the GGUF's own
quantised weights) against llama.cpp on the same GGUF and transformers `generate`, greedy, on
held-out chat prompts, at batch 1 and at --batch; the time and resident memory of a second start.

    HF_HUB_OFFLINE=1 python benchmarks/cpu_default.py --prompts 8 --max-tokens 128 --strides 4,2 --json out.json
    HF_HUB_OFFLINE=1 python benchmarks/cpu_default.py --prompts 6 --max-tokens 128 --batch 8 --repeats 4
    HF_HUB_OFFLINE=1 python benchmarks/cpu_default.py --model runs/smollm2-idlm/final --mode isd --strides 4,2,3,8

--mode (risd for the default, isd for a converted model given by --model) runs at each stride N
of --strides under each --stride-policy; results are keyed by the mode for the first (stride,
policy) and "<mode>_N<N>_<policy>" for the others (with every branch that fits unless --branches).
llama.cpp runs in its own process from the benchmark venv of benchmarks/llama_cpp_env.sh (skipped
with a note when that venv is missing or --model is not a GGUF), one sequence at a time: its
batch-8 aggregate is its batch-1 rate. --fp32 adds our ar on the dequantised float32 weights.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from idlm import LLM, SamplingParams
from idlm.models.gguf import float_folder
from idlm.models.loader import gguf_source, resolve_model_folder

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "configs" / "smollm2" / "prompts" / "heldout.jsonl"
LLAMA_PYTHON = ROOT / ".bench-venv" / "llama-cpp" / "bin" / "python"
START = ("import sys, time; t = time.perf_counter(); from idlm import LLM; LLM(sys.argv[1] or None, progress=False); "
         "s = time.perf_counter() - t; rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')]; "
         "print(s, int(rss[0].split()[1]) / 1024)")


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams, batch: int) -> tuple[dict, list[list[int]]]:
    chosen = dict(llm.engine.policy.chosen)
    t = time.perf_counter()
    outs = [o for i in range(0, len(prompts), batch) for o in llm.generate(prompts[i:i + batch], params)]
    seconds = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    tpf = tokens / sum(o.stats["forwards"] for o in outs)
    chosen_k = {k: n - chosen.get(k, 0) for k, n in sorted(llm.engine.policy.chosen.items()) if n > chosen.get(k, 0)}
    return (dict(tokens=tokens, seconds=seconds, tok_s=tokens / seconds, tpf=tpf, chosen_k=chosen_k),
            [o.token_ids for o in outs])


def llama_cpp(gguf: Path, prompts: list[list[int]], max_tokens: int, eos: list[int], n_batch: int) -> dict:
    req = dict(model=str(gguf), prompts=prompts, max_tokens=max_tokens, threads=torch.get_num_threads(),
               n_batch=n_batch, eos=eos)
    out = subprocess.run([str(LLAMA_PYTHON), str(ROOT / "benchmarks" / "llama_cpp_run.py")], input=json.dumps(req),
                         capture_output=True, text=True, check=True)
    run = json.loads(out.stdout)["runs"][0]
    tokens = sum(len(o) for o in run["outputs"])
    return dict(tokens=tokens, seconds=sum(run["seconds"]), tok_s=tokens / sum(run["seconds"]), n_batch=n_batch,
                outputs=run["outputs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="a converted model (folder or GGUF); default: the embedded one")
    p.add_argument("--mode", default="risd", choices=["risd", "isd"], help="the multi-token mode (default risd)")
    p.add_argument("--strides", default="4", help="comma-separated N of the --mode runs (default 4)")
    p.add_argument("--stride-policy", default="adaptive",
                   help="comma-separated: adaptive and/or fixed (default adaptive)")
    p.add_argument("--branches", type=int, default=None, help="most branch drafts a round adds (default: all that fit)")
    p.add_argument("--batch", type=int, default=8, help="the batched runs' batch size (0: none)")
    p.add_argument("--fp32", action="store_true", help="also our ar on the dequantised float32 weights")
    p.add_argument("--llama-n-batch", type=int, default=512,
                   help="llama.cpp's prompt batch (1 on AMX Xeons, where its native build crashed with more)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time every run this many times, in alternating order; tok_s is the median, over_ar the "
                        "median of the ratios to ar within a repeat")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    load = open("/proc/loadavg").read().split()[:3]
    starts = [[float(x) for x in subprocess.run([sys.executable, "-c", START, args.model or ""], capture_output=True,
                                                text=True, check=True).stdout.split()[-2:]] for _ in range(2)]
    llm = LLM(args.model, progress=False)
    engine = llm.engine
    chats = [[{"role": "user", "content": json.loads(line)["prompt"]}]
             for line in HELDOUT.read_text().splitlines()[:args.prompts]]
    ids = [engine.chat_prompt(c) for c in chats]
    results, outputs = {}, {}
    llm.generate([ids[0]], SamplingParams(mode="ar", max_tokens=8))
    # the adaptive stride's price list is timed at its first use; a server pays that once, so it is
    # timed here, before the runs, and reported on its own
    t = time.perf_counter()
    engine.policy.cost.measure_up_to(max(1, args.batch))
    step_cost_table_s = time.perf_counter() - t
    shapes = [(int(n), policy) for n in args.strides.split(",") for policy in args.stride_policy.split(",")]
    runs = [(args.mode if i == 0 else f"{args.mode}_N{n}_{policy}", args.mode, n, policy)
            for i, (n, policy) in enumerate(shapes)]
    runs.append(("ar", "ar", None, None))
    rates: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        # every other repeat in the reverse order: this VM's speed drifts within a run, and a mode
        # always timed after another would carry the drift as a difference between them
        for name, mode, stride, policy in (runs if repeat % 2 == 0 else runs[::-1]):
            params = SamplingParams(mode=mode, stride=stride, temperature=0, max_tokens=args.max_tokens,
                                    stride_policy=policy, branches=args.branches)
            for key, batch in [(name, 1)] + ([(f"{name}_batch{args.batch}", args.batch)] if args.batch > 1 else []):
                result, out = timed(llm, ids, params, batch)
                rates.setdefault(key, []).append(result["tok_s"])
                if repeat == 0:
                    results[key], outputs[key] = result, out
    for key, runs_tok_s in rates.items():
        results[key].update(tok_s=statistics.median(runs_tok_s), tok_s_runs=runs_tok_s)
        ar_key = "ar" if "_batch" not in key else f"ar_batch{args.batch}"
        results[key]["over_ar"] = statistics.median(a / b for a, b in zip(runs_tok_s, rates[ar_key]))
    eos = sorted(engine.eos_ids)
    gguf = gguf_source(args.model)
    if gguf is not None and LLAMA_PYTHON.is_file():
        results["llama.cpp"] = llama_cpp(gguf, ids, args.max_tokens, eos, args.llama_n_batch)
        outputs["llama.cpp"] = results["llama.cpp"].pop("outputs")
    else:
        results["llama.cpp"] = dict(skipped="no GGUF model or no benchmarks/llama_cpp_env.sh venv")
    del llm, engine
    if args.fp32:
        fp32 = LLM(args.model, progress=False, quantization="none")
        fp32.generate([ids[0]], SamplingParams(mode="ar", max_tokens=8))
        results["ar_fp32"], outputs["ar_fp32"] = timed(fp32, ids, SamplingParams(mode="ar", temperature=0,
                                                                                 max_tokens=args.max_tokens), 1)
        del fp32
    # a GGUF's cached folder keeps its float weights in a dtype subfolder (models/gguf.py: float_folder)
    folder = float_folder(gguf) if gguf is not None else resolve_model_folder(args.model)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        hf.generate(torch.tensor([ids[0]]), max_new_tokens=8, do_sample=False)
        for x, ref in zip(ids, outputs["ar"]):
            t = time.perf_counter()
            out = hf.generate(torch.tensor([x]), max_new_tokens=len(ref), min_new_tokens=len(ref), do_sample=False,
                              eos_token_id=eos)
            seconds += time.perf_counter() - t
            tokens += out.shape[1] - len(x)
    results["transformers"] = dict(tokens=tokens, seconds=seconds, tok_s=tokens / seconds)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), model=args.model or "embedded default",
                  threads=torch.get_num_threads(), torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability(),
                  load_before=load,
                  second_start_s=starts[1][0], second_start_rss_mb=starts[1][1], first_start_s=starts[0][0],
                  step_cost_table_s=step_cost_table_s,
                  prompts=args.prompts, max_tokens=args.max_tokens, runs=[r[0] for r in runs],
                  stride_policy=args.stride_policy, results=results,
                  equals_ar={name: outputs[name] == outputs["ar"] for name in outputs if name != "ar"})
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
