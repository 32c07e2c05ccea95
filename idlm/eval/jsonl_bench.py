"""A generic question/answer benchmark on the user's own JSONL file (GSM8K-, MATH-500- or
multiple-choice-style): one prompt per line from a template, one answer extracted from each
output (`extract.py`), accuracy over the file."""

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from idlm.engine.sampling_params import SamplingParams
from idlm.eval import extract
from idlm.eval.client import Backend, tokens_per_forward
from idlm.eval.data import Prompt, read_jsonl

CHAT_TEMPLATE = "{question}"
COMPLETION_TEMPLATE = "Question: {question}\nAnswer:"
FIELD = re.compile(r"\{(\w+)\}")


@dataclass
class BenchConfig:
    extraction: str = "exact"
    question_key: str = "question"
    answer_key: str = "answer"
    template: str | None = None  # {field} is replaced by that field of the line; None: per chat/completion
    chat: bool = False
    system: str | None = None
    letters: str = extract.DEFAULT_LETTERS  # the options of `choice`
    limit: int | None = None

    def resolved_template(self) -> str:
        template = self.template or (CHAT_TEMPLATE if self.chat else COMPLETION_TEMPLATE)
        if "{" + self.question_key + "}" not in template:
            raise ValueError(f"the template must contain {{{self.question_key}}}, where the question goes")
        return template


@dataclass
class Item:
    line: int
    fields: dict[str, Any]
    question: str
    answer: str
    gold: str  # the answer in extracted normal form


def fill(template: str, fields: dict[str, Any]) -> str:
    """{name} becomes that field; other braces (LaTeX's \\boxed{}, {x}) stay as they are."""
    return FIELD.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


def load_items(path: Path, cfg: BenchConfig) -> list[Item]:
    """The file's items, checked (together with cfg) before any model is loaded."""
    extract.check_mode(cfg.extraction)
    cfg.resolved_template()
    if cfg.system and not cfg.chat:
        raise ValueError("a system message needs the chat template: add --chat")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
    items = []
    for lineno, row in read_jsonl(path):
        for key in (cfg.question_key, cfg.answer_key):
            if key not in row:
                raise ValueError(f"{path}:{lineno}: no {key!r} field (the keys are set with --question-key and "
                                 f"--answer-key)")
        question, answer = row[cfg.question_key], row[cfg.answer_key]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{path}:{lineno}: {cfg.question_key!r} must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise ValueError(f"{path}:{lineno}: {cfg.answer_key!r} must be a string or a number")
        gold = extract.reference(cfg.extraction, str(answer), cfg.letters)
        if gold is None:
            raise ValueError(f"{path}:{lineno}: the answer {str(answer)[:60]!r} holds nothing that "
                             f"{cfg.extraction} extraction can compare with")
        items.append(Item(lineno, row, question, str(answer), gold))
        if cfg.limit is not None and len(items) == cfg.limit:
            break
    return items


def build_prompt(item: Item, template: str, cfg: BenchConfig) -> Prompt:
    text = fill(template, item.fields)
    if not cfg.chat:
        return text
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return system + [{"role": "user", "content": text}]


def evaluate(backend: Backend, items: list[Item], cfg: BenchConfig, params: SamplingParams) -> dict[str, Any]:
    template = cfg.resolved_template()
    completions = backend.complete([build_prompt(item, template, cfg) for item in items], params)
    graded = []
    for item, c in zip(items, completions):
        prediction = extract.extract(cfg.extraction, c.text, cfg.letters)
        graded.append({"line": item.line, "question": item.question, "answer": item.answer, "gold": item.gold,
                       "output": c.text, "prediction": prediction,
                       "correct": extract.same(cfg.extraction, prediction, item.gold), "tokens": c.tokens,
                       "forwards": c.forwards})
    correct = sum(g["correct"] for g in graded)
    return {
        "task": "jsonl",
        "summary": {
            "source": backend.name,
            "extraction": cfg.extraction,
            "items": len(items),
            "correct": correct,
            "accuracy": correct / len(items),
            "no_answer": sum(g["prediction"] is None for g in graded),
            "tokens": sum(c.tokens for c in completions),
            "tokens_per_forward": tokens_per_forward(completions),
        },
        "items": graded,
        "sampling": asdict(backend.resolve(params)),
    }
