"""Answer extraction and comparison for the JSONL benchmark runner.

Modes:
- exact: the whole output against the answer, after trimming, collapsing whitespace,
  case-folding and dropping a final period;
- last_number: the last number in the output against the last number in the answer (GSM8K's
  "#### 72" works as is), compared as numbers ("1,000" = "1000.0", "3/4" = "0.75");
- boxed: the content of the last \\boxed{...} against the answer (or the answer's own \\boxed{}),
  after light LaTeX normalisation, as numbers when both are;
- choice: a multiple-choice letter ("The answer is (B)", "Answer: B", "\\boxed{B}", "B." at the
  start, else the last "(B)", else the last standalone capital letter) against the answer's letter.
"""

import re
from fractions import Fraction

EXTRACTIONS = ("exact", "last_number", "boxed", "choice")
DEFAULT_LETTERS = "ABCDEFGHIJ"
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def check_mode(mode: str) -> None:
    if mode not in EXTRACTIONS:
        raise ValueError(f"unknown extraction mode {mode!r}; choose one of {', '.join(EXTRACTIONS)}")


def normalize_text(text: str) -> str:
    return " ".join(text.split()).casefold().removesuffix(".").strip()


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none."""
    found = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not found:
        return None
    rest = text[found[-1].end():].lstrip()
    if not rest.startswith("{"):  # "\boxed 5"
        word = rest.split()
        return word[0].rstrip("$.") if word else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the output was cut off


def normalize_math(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "^\\circ", "^{\\circ}", "\\%", "%", "$"):
        text = text.replace(junk, "")
    text = re.sub(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", r"\1/\2", text)
    return "".join(text.split()).removesuffix(".")


def choice_letter(text: str, letters: str = DEFAULT_LETTERS) -> str | None:
    cls = f"[{re.escape(letters)}]"
    patterns = (rf"[Aa]nswer(?:\s+is)?\s*[:：]?\s*\**\s*\(?({cls})\)?(?![A-Za-z])",
                rf"\\boxed\{{\s*\(?({cls})\)?\s*\}}",
                rf"^\s*\(?({cls})\)?\s*(?:[.:)]|$)",
                rf"\(({cls})\)",
                rf"\b({cls})\b")
    for pattern in patterns:
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    return None


def extract(mode: str, output: str, letters: str = DEFAULT_LETTERS) -> str | None:
    """The prediction in a model's output, normalised; None when the output holds none."""
    check_mode(mode)
    if mode == "exact":
        return normalize_text(output)
    if mode == "last_number":
        return last_number(output)
    if mode == "boxed":
        found = boxed(output)
        return None if found is None else normalize_math(found)
    return choice_letter(output, letters)


def reference(mode: str, answer: str, letters: str = DEFAULT_LETTERS) -> str | None:
    """The gold answer in the same normal form as `extract`; None when it holds no answer of that kind."""
    check_mode(mode)
    if mode == "boxed":
        return normalize_math(boxed(answer) or answer)
    if mode == "choice":
        return choice_letter(answer.strip(), letters)
    return extract(mode, answer, letters)


def same(mode: str, prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    if mode in ("last_number", "boxed"):
        a, b = as_number(prediction), as_number(gold)
        if a is not None and b is not None:
            return a == b
    return prediction == gold
