"""GPU engine check: greedy outputs of the engine on CUDA equal the CPU path's (float32), for ar,
isd and risd, on tiny models whose head dim lets the Triton kernel run, and on SmolLM2 if present.

    python benchmarks/gpu_engine_check.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import make_model, make_random_adapter  # noqa: E402

from idlm import LLM, SamplingParams  # noqa: E402


def compare(folder: Path, adapter: Path | None, prompts: list[list[int]], modes: list[str]) -> None:
    for mode in modes:
        params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, mode=mode, stride=4)
        outs = {}
        for device in ("cpu", "cuda"):
            llm = LLM(str(folder), adapter=str(adapter) if adapter else None, device=device, dtype="float32",
                      progress=False, kv_cache_tokens=4096)
            assert llm.engine.runner.use_triton == (device == "cuda")
            outs[device] = [o.token_ids for o in llm.generate(prompts, params)]
        same = sum(a == b for a, b in zip(outs["cpu"], outs["cuda"]))
        print(f"{folder.name} {mode}: {same}/{len(prompts)} greedy outputs equal on cuda (triton) and cpu")


def main() -> None:
    root = Path(tempfile.mkdtemp())
    # head_dim 16 (64 hidden / 4 heads), GQA group 2
    make_model(root / "qwen3", "qwen3")
    make_model(root / "llama", "llama")
    adapter = make_random_adapter(root / "llama", root / "adapter", mask_token_id=3)
    prompts = [[5 + i % 40, 6, 7, 8 + i % 30] * (1 + i % 5) for i in range(16)]
    compare(root / "qwen3", None, prompts, ["ar"])
    compare(root / "llama", adapter, prompts, ["ar", "risd"])


if __name__ == "__main__":
    main()
