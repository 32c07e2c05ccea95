"""The embedded default on this CPU: idlm (risd with the shipped adapter, and ar) against
transformers `generate`, batch 1, greedy, on held-out chat prompts; and the time to start the
model a second time (GGUF conversion cached).

    HF_HUB_OFFLINE=1 python benchmarks/cpu_default.py --prompts 8 --max-tokens 128 --strides 4,2 --json out.json
    HF_HUB_OFFLINE=1 python benchmarks/cpu_default.py --model runs/smollm2-idlm/final --mode isd --strides 4,2,3,8

--mode (risd for the default, isd for a converted model given by --model) runs at each stride N
of --strides; results are keyed by the mode for the first stride and "<mode>_N<N>" for the others.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from idlm import LLM, SamplingParams
from idlm.models.loader import resolve_model_folder

HELDOUT = Path(__file__).resolve().parents[1] / "configs" / "smollm2" / "prompts" / "heldout.jsonl"
START = ("import sys, time; t = time.perf_counter(); from idlm import LLM; LLM(sys.argv[1] or None, progress=False); "
         "print(time.perf_counter() - t)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="a converted model (folder or GGUF); default: the embedded one")
    p.add_argument("--mode", default="risd", choices=["risd", "isd"], help="the multi-token mode (default risd)")
    p.add_argument("--strides", default="4", help="comma-separated N of the --mode runs (default 4)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    starts = [float(subprocess.run([sys.executable, "-c", START, args.model or ""], capture_output=True, text=True,
                                   check=True).stdout.split()[-1]) for _ in range(2)]
    llm = LLM(args.model, progress=False)
    engine = llm.engine
    chats = [[{"role": "user", "content": json.loads(line)["prompt"]}]
             for line in HELDOUT.read_text().splitlines()[:args.prompts]]
    ids = [engine.chat_prompt(c) for c in chats]
    results, outputs = {}, {}
    llm.generate([ids[0]], SamplingParams(mode="ar", max_tokens=8))
    strides = [int(n) for n in args.strides.split(",")]
    runs = [(args.mode if i == 0 else f"{args.mode}_N{n}", args.mode, n) for i, n in enumerate(strides)]
    runs.append(("ar", "ar", None))
    for name, mode, stride in runs:
        params = SamplingParams(mode=mode, stride=stride, temperature=0, max_tokens=args.max_tokens)
        t = time.perf_counter()
        outs = [llm.generate([x], params)[0] for x in ids]
        seconds = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for o in outs)
        forwards = sum(o.stats["forwards"] for o in outs)
        outputs[name] = [o.token_ids for o in outs]
        results[name] = dict(tokens=tokens, seconds=seconds, tok_s=tokens / seconds, tpf=tokens / forwards)
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_folder(args.model)), dtype=torch.float32).eval()
    eos = sorted(engine.eos_ids)
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
    report = dict(date=time.strftime("%Y-%m-%d"), model=args.model or "embedded default",
                  threads=torch.get_num_threads(), torch=torch.__version__,
                  second_start_s=starts[1], first_start_s=starts[0], prompts=args.prompts,
                  max_tokens=args.max_tokens, results=results,
                  equals_ar={name: outputs[name] == outputs["ar"] for name, mode, _ in runs if mode != "ar"})
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
