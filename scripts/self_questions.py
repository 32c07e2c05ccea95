"""Questions the base model writes itself: turns `idlm distill` answers to
configs/smollm2/prompts/v2/question_seeds.jsonl ("Write one question ... about TOPIC") into prompts.

    idlm distill configs/smollm2/prompts/v2/question_seeds.jsonl data/smollm2-v2/seed_answers.jsonl \
        --model $MODEL --mode ar --temperature 1 --seed 0 --samples-per-prompt 4 --max-tokens 64
    python scripts/self_questions.py data/smollm2-v2/seed_answers.jsonl data/smollm2-v2/self_questions.jsonl

Keeps the first question of each answer (up to and including its first '?', 15 to 300 characters,
quotes and a "Question:" label taken off), once per question after case folding and dropping
punctuation, and never one that repeats a v1 / v2 prompt or a held-out prompt. Their answers
(`idlm distill` again) are then chat training data like the rest.
"""

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_prompts import key  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT_FILES = ["configs/smollm2/prompts/train.jsonl", "configs/smollm2/prompts/heldout.jsonl",
                "configs/smollm2/prompts/v2/train.jsonl.gz", "configs/smollm2/prompts/v2/heldout_code.jsonl",
                "configs/smollm2/prompts/v2/heldout_prose.jsonl"]


def first_question(reply: str) -> str | None:
    text = " ".join(reply.split())
    text = re.sub(r"^(\*\*)?(question|q)\s*[:.]\s*(\*\*)?\s*", "", text, flags=re.IGNORECASE)
    end = text.find("?")
    if end < 0:
        return None
    # the sentence that ends at the '?' ("Sure! Here is one: What ...?" -> "What ...?")
    question = re.split(r"(?<=[.!:])\s+", text[:end + 1])[-1].strip().strip("\"'“”*").strip()
    if not 15 <= len(question) <= 300 or not question[0].isalpha():
        return None
    return question[0].upper() + question[1:]


def read_lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("answers", type=Path, help="chat JSONL written by idlm distill from question_seeds.jsonl")
    ap.add_argument("output", type=Path, help='prompts JSONL to write ({"prompt": str, "kind": "self_question"})')
    args = ap.parse_args()
    seen = {key(json.loads(line)["prompt"]) for f in PROMPT_FILES for line in read_lines(REPO / f) if line.strip()}
    kept, answers = [], 0
    for line in read_lines(args.answers):
        if not line.strip():
            continue
        answers += 1
        question = first_question(json.loads(line)["messages"][-1]["content"])
        if question is None or not key(question) or key(question) in seen:
            continue
        seen.add(key(question))
        kept.append(question)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": q, "kind": "self_question"}, ensure_ascii=False) + "\n" for q in kept)
    print(f"{len(kept)} questions from {answers} answers -> {args.output}")


if __name__ == "__main__":
    main()
