"""GPU check of tensor parallelism (issue 19) on 2 GPUs of one host: tiny Qwen3 and Llama models in
float32 give the same greedy tokens at TP = 2 as at TP = 1 for ar, isd and risd (mixed strides,
branches), with decode steps replayed as CUDA graphs (the all-reduces captured) and run eagerly;
seeded sampling gives the same tokens too; a closed TP = 2 engine ends its process group in time
for a second one to start in the same process; then a killed worker ends a TP = 2 engine with a
clear error within seconds (NCCL: the watcher aborts the communicator). Each engine runs in a
child process (all at once), so that a hang reports FAIL instead of blocking.
Prints a PASS or FAIL line per check, exits 1 on any FAIL.

    python benchmarks/check_tensor_parallel.py        # a few minutes
    python benchmarks/check_tensor_parallel.py --device cpu   # the same checks over gloo (no graphs)
    idlm bench --shape qwen3-8b -tp 1,2 --modes ar,isd --concurrency 1,64 -o tp.json   # the speed
"""

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's idlm (the spawned workers inherit the path)

import torch  # noqa: E402
from helpers import make_model, make_random_adapter  # noqa: E402

from idlm import LLM, SamplingParams  # noqa: E402

MASK = 3
PROMPTS = [[5 + i % 40, 6, 7, 8 + i % 30] * (1 + i % 5) for i in range(8)]
SETUPS = {"tp1-graphs": dict(tensor_parallel_size=1), "tp2-graphs": dict(tensor_parallel_size=2),
          "tp2-eager": dict(tensor_parallel_size=2, enforce_eager=True)}


def package(root: Path, kind: str, **overrides) -> tuple[Path, Path]:
    folder = root / kind
    make_model(folder, kind, **overrides)
    raw = json.loads((folder / "config.json").read_text())
    raw.setdefault("mask_token_id", MASK)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder, make_random_adapter(folder, root / f"{kind}-adapter", mask_token_id=MASK)


def requests(prompts: list[list[int]]) -> dict[str, list[SamplingParams]]:
    out = {}
    for mode in ("ar", "isd", "risd"):
        for shape, fields in {"plain": dict(stride_policy="fixed", branches=0),
                              "branches": dict(stride_policy="fixed"), "adaptive": {}}.items():
            if mode == "ar" and shape != "plain":
                continue
            out[f"{mode} {shape} greedy"] = [
                SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, mode=mode, stride=s, **fields)
                for s, _ in zip(itertools.cycle((2, 3, 4, 8)), prompts)]
        out[f"{mode} seeded"] = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=32, ignore_eos=True,
                                                mode=mode, stride=4) for i in range(len(prompts))]
    return out


def run(folder: str, adapter: str, setup: str, out: str, device: str) -> None:
    """In a child process: one engine's tokens for every batch, and how its close went, as JSON."""
    import torch.distributed as dist

    batches = requests(PROMPTS)
    llm = LLM(folder, adapter=adapter, dtype="float32", device=device, progress=False, kv_cache_tokens=8192,
              max_num_seqs=16, **SETUPS[setup])
    tokens = {name: [o.token_ids for o in llm.generate(PROMPTS, params)] for name, params in batches.items()}
    start = time.monotonic()
    llm.close()
    result = {"tokens": tokens, "close_s": time.monotonic() - start, "group_left": dist.is_initialized()}
    if SETUPS[setup]["tensor_parallel_size"] > 1:  # a second engine in the same process, after close()
        try:
            again = LLM(folder, adapter=adapter, dtype="float32", device=device, progress=False, kv_cache_tokens=8192,
                        max_num_seqs=16, **SETUPS[setup])
            result["second"] = [o.token_ids for o in again.generate(PROMPTS, batches["ar plain greedy"])]
            again.close()
        except Exception as e:
            result["second_error"] = f"{type(e).__name__}: {e}"
    Path(out).write_text(json.dumps(result))
    os._exit(0)  # (whatever the teardown left behind must not keep the child alive)


def run_all(models: dict[str, tuple[Path, Path]], root: Path, device: str, began: float) -> dict:
    """Every (model, setup) in its own child process, all at once; their results by (label, setup)."""
    children = {}
    for label, (folder, adapter) in models.items():
        for setup in SETUPS:
            out = root / f"{len(children)}.json"
            command = [sys.executable, __file__, "--device", device, "--run", str(folder), str(adapter), setup,
                       str(out)]
            children[label, setup] = (out, subprocess.Popen(command))
    results = {}
    for (label, setup), (out, child) in children.items():
        try:
            child.wait(timeout=max(1.0, 360 - (time.monotonic() - began)))
        except subprocess.TimeoutExpired:
            child.kill()
        results[label, setup] = json.loads(out.read_text()) if out.exists() else None
        print(f"({label} {setup} {'done' if out.exists() else f'FAILED (exit {child.returncode})'} at "
              f"{time.monotonic() - began:.0f} s)", flush=True)
    return results


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def kill_check(folder: str, device: str) -> None:
    """In a child process: a TP = 2 engine whose worker is killed mid-generation raises EngineDead."""
    from idlm.engine.tensor_parallel import EngineDead

    llm = LLM(folder, adapter="none", dtype="float32", device=device, progress=False, kv_cache_tokens=8192,
              max_num_seqs=16, tensor_parallel_size=2)
    engine = llm.engine
    for i in range(4):
        engine.add_request([5 + i, 6, 7], SamplingParams(mode="ar", temperature=0, max_tokens=2000, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(engine.tp.procs[0].pid, signal.SIGKILL)
    start = time.monotonic()
    try:
        while engine.has_unfinished():
            engine.step()
        print("no error: the engine ran on without its worker", flush=True)
        os._exit(1)
    except EngineDead as e:
        took = time.monotonic() - start
        print(f"EngineDead after {took:.1f} s: {e}", flush=True)
        os._exit(0 if took < 20 else 1)  # (the teardown of a group with a dead peer is not what is checked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (gloo, eager)")
    parser.add_argument("--kill", default=None, help=argparse.SUPPRESS)  # the child process of the last check
    parser.add_argument("--run", nargs=4, default=None, help=argparse.SUPPRESS)  # an engine's child process
    args = parser.parse_args()
    if args.run:
        run(*args.run, device=args.device)
    if args.kill:
        kill_check(args.kill, args.device)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"FAIL needs 2 GPUs, {torch.cuda.device_count()} visible")
        sys.exit(1)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="idlm-tp-"))
    models = {"qwen3 (2 KV heads: one per rank)": package(root, "sdar"),
              "llama (1 KV head: replicated)": package(root, "llama", num_key_value_heads=1)}
    batches = requests(PROMPTS)
    results = run_all(models, root, args.device, began)
    ok = True
    for label in models:
        outs = {setup: results[label, setup] for setup in SETUPS}
        if any(v is None for v in outs.values()):
            ok &= check(f"{label}: every engine ran", False, ", ".join(s for s, v in outs.items() if v is None))
            continue
        for name in batches:
            for setup in ("tp2-graphs", "tp2-eager"):
                same = sum(a == b for a, b in zip(outs["tp1-graphs"]["tokens"][name], outs[setup]["tokens"][name]))
                ok &= check(f"{label} {name}: {setup} = tp1-graphs", same == len(PROMPTS),
                            f"{same}/{len(PROMPTS)} requests equal")
        greedy = [outs["tp2-graphs"]["tokens"][n] for n in batches if n.endswith("greedy")]
        ok &= check(f"{label} greedy isd/risd = ar at TP = 2", all(g == greedy[0] for g in greedy))
        for setup in ("tp2-graphs", "tp2-eager"):
            out = outs[setup]
            ok &= check(f"{label} {setup}: close() ended the group", not out["group_left"],
                        f"in {out['close_s']:.1f} s")
            ok &= check(f"{label} {setup}: a second TP = 2 engine in the same process gives the same tokens",
                        out.get("second") == outs["tp1-graphs"]["tokens"]["ar plain greedy"],
                        out.get("second_error", ""))
    try:
        child = subprocess.run([sys.executable, __file__, "--device", args.device, "--kill",
                                str(models["llama (1 KV head: replicated)"][0])], capture_output=True, text=True,
                               timeout=120)
        lines = child.stdout.strip().splitlines() or child.stderr.strip().splitlines() or [f"exit {child.returncode}"]
        ok &= check("a killed worker ends the TP = 2 engine with EngineDead within 20 s", child.returncode == 0,
                    lines[-1])
        if child.returncode:
            print(child.stderr[-3000:])
    except subprocess.TimeoutExpired:
        ok &= check("a killed worker ends the TP = 2 engine", False, "hung for 120 s")
    print(f"{'ALL PASS' if ok else 'SOME FAILED'} ({time.monotonic() - began:.0f} s)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
