"""Builds the v2 SmolLM2 prompt set (issue 17): >= 50,000 training prompts of varied kinds and
held-out sets kept apart from them, offline and deterministically, from configs/smollm2/prompts/v2/recipe.yaml.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_prompts_v2.py            # writes configs/smollm2/prompts/v2/

Sources (each capped by the recipe, picked by a seeded shuffle):
- v1: configs/smollm2/prompts/train.jsonl as it is (chatterbot first lines, templates, stdlib tasks);
- templates2: new instruction templates over v1's word lists; math: seeded arithmetic word problems;
- code_complete / code_explain / code_docstring: functions of the standard library and of the
  recipe's packages, parsed with ast (sorted file walk): their signature and docstring to complete,
  the whole function to explain, or the function without its docstring to document;
- prose_continue / prose_summarize: prose paragraphs of module, class and function docstrings, of
  the packages' .rst/.md/.txt files and of pydoc_data.topics (not the held-out text's sections):
  the first 25-70 words to continue, or the paragraph to summarise.

Held out: every prompt of a source file whose sha256(path) % heldout_file_modulus == 0 goes to
the held-out pools, from which heldout_code.jsonl and heldout_prose.jsonl take theirs; no training
prompt comes from those files. Training prompts are also dropped when they repeat a held-out
prompt (v1's heldout.jsonl included) after case folding and dropping punctuation, or share an
8-word shingle with a held-out prose prompt or with ../../heldout_text.txt. The HumanEval filter
of make_prompts.py applies to everything. question_seeds.jsonl asks the base model to write a
question on each seed topic (scripts/self_questions.py turns its answers into prompts).
"""

import argparse
import ast
import gzip
import hashlib
import io
import json
import random
import re
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_prompts as v1  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__", "_vendor", "vendor", "benchmarks", "examples",
             "site-packages", "lib2to3", "ensurepip", "idlelib", "turtledemo", "tkinter", "pydoc_data"}
DOC_SUFFIXES = (".rst", ".md", ".txt")
BAD_DOC_NAMES = ("license", "copying", "authors", "notice", "requirements", "entry_points", "top_level", "sources",
                 "dependency_links", "record", "installer", "wheel", "metadata", "changes", "changelog", "history")
SECTION = re.compile(r"^\s*(Parameters|Returns?|Yields?|Raises|Examples?|Notes|See Also|References|Attributes|Args|"
                     r"Arguments|Keyword Arguments|Other Parameters|Warnings?|Methods|Usage|Example Usage)\s*:?\s*$")

CONCEPT_TEMPLATES2 = [
    "What are three common misconceptions about {x}?",
    "Write a short quiz question about {x}, then give the answer.",
    "Summarize the history of {x} in a paragraph.",
    "How would you explain {x} using an analogy?",
    "List the key terms someone needs to understand {x}.",
    "Write a tweet-length explanation of {x}.",
    "What questions do experts still have about {x}?",
    "Give a step-by-step explanation of {x}.",
    "How does {x} affect everyday life?",
    "Write a short paragraph about {x} for a school textbook.",
]
TOPIC_TEMPLATES2 = [
    "Write a free-verse poem about {x}.",
    "Write a dialogue between two characters about {x}.",
    "Write a diary entry about {x}.",
    "Describe {x} using all five senses.",
    "Write a riddle whose answer is {x}.",
    "Write a short fable about {x} with a moral.",
]
ACTIVITY_TEMPLATES2 = [
    "What is a good one-week plan for {x}?",
    "What mistakes do beginners make when {x}?",
    "Write a checklist for {x}.",
    "Explain the benefits of {x}.",
    "How can I stay motivated while {x}?",
    "What do I need to get started with {x}?",
]
PAIR_TEMPLATES2 = [
    "Give one similarity and one difference between {a} and {b}.",
    "Make a table comparing {a} and {b}.",
    "When would you choose {a} over {b}?",
]
PYTHON_TEMPLATES2 = [
    "Write a Python function that {x}, with type hints and a docstring.",
    "Write pytest unit tests for a Python function that {x}.",
    "Explain step by step how a Python program that {x} should work, then write it.",
]
QUESTION_SEED_TEMPLATES = [
    "Write one question that a curious student might ask about {x}. Reply with the question only.",
    "Write one question a beginner could ask a teacher about {x}. Reply with the question only.",
    "Ask a thoughtful question about {x}. Reply with the question only.",
]
CONTINUE_LEADS = ["Continue the following text:", "Continue this passage from technical documentation:",
                  "Write the next few sentences of this text:"]
SUMMARY_LEADS = ["Summarize the following paragraph in one sentence:", "Explain the following passage in simple words:",
                 "What is the main point of this paragraph?"]
COMPLETE_LEAD = "Complete the following Python function:"
EXPLAIN_LEADS = ["Explain what this Python function does:", "Walk me through this Python code:"]
DOCSTRING_LEAD = "Write a docstring for this Python function:"
CONTINUE_CODE_LEAD = "Continue this Python code:"


@dataclass
class Item:
    kind: str
    prompt: str
    origin: str  # the source file (held-out split by file), or the source name


def templates2() -> list[str]:
    out = [t.format(x=c.rstrip("*")) for c in v1.clean(v1.CONCEPTS) for t in CONCEPT_TEMPLATES2]
    out += [t.format(x=c) for c in v1.clean(v1.TOPICS) for t in TOPIC_TEMPLATES2]
    out += [t.format(x=c) for c in v1.clean(v1.ACTIVITIES) for t in ACTIVITY_TEMPLATES2]
    for pair in v1.clean(v1.PAIRS):
        a, b = (p.strip() for p in pair.split("|"))
        out += [t.format(a=a, b=b) for t in PAIR_TEMPLATES2]
    out += [t.format(x=c) for c in v1.clean(v1.PYTHON_TASKS) for t in PYTHON_TEMPLATES2]
    for d in v1.clean(v1.DEVICES):
        out += [f"What can go wrong with {d}, and how is it fixed?", f"Explain {d} to someone who has never seen one."]
    out += [f"Which {x} would you recommend to a beginner, and why?" for x in v1.clean(v1.CATEGORIES)]
    for s in v1.clean(v1.SCENARIOS):
        out += [f"List three consequences if {s}.", f"Write a short story that begins: What if {s}?"]
    out += [f"Write a polite text message to {r} about {s}." for r in v1.clean(v1.RECIPIENTS)
            for s in v1.clean(v1.SUBJECTS)]
    return out


def question_seeds() -> list[str]:
    topics = [c.rstrip("*") for c in v1.clean(v1.CONCEPTS)] + v1.clean(v1.TOPICS) + v1.clean(v1.ACTIVITIES)
    return [t.format(x=x) for x in topics for t in QUESTION_SEED_TEMPLATES]


# ------------------------------------------------------------------------------------- files


def walk(root: Path, top: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under top with these suffixes, outside test / vendored folders, sorted by path."""
    if top.is_file():
        return [top] if top.suffix in suffixes else []
    if not top.is_dir():
        return []
    found = [p for p in top.rglob("*") if p.suffix in suffixes and p.is_file()
             and not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
             and not any(part.endswith((".dist-info", ".egg-info")) for part in p.parts)
             and p.stat().st_size <= 400_000]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_tops(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))
                   and not p.name.startswith("_") and p.name not in SKIP_DIRS and p.name != "this.py"),
                  key=lambda p: p.name)


# -------------------------------------------------------------------------------------- code


def function_lines(lines: list[str], node: ast.AST) -> list[str]:
    return textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno])).rstrip().split("\n")


def code_items(rel: str, text: str, rng: random.Random, max_chars: int) -> list[Item]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
            nodes += [n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    out = []
    for node in nodes:
        if node.name.startswith(("_", "test")) or node.name in v1.BAD_NAMES or node.decorator_list:
            continue
        src = function_lines(lines, node)
        if any("\t" in line for line in src):
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        has_doc = doc is not None and isinstance(first, ast.Expr)
        body_start = (first.end_lineno if has_doc else node.body[0].lineno - 1) - node.lineno + 1
        rest = src[body_start:]
        code_rest = [line for line in rest if line.strip() and not line.strip().startswith("#")]
        whole = "\n".join(src)
        if has_doc and v1.first_sentence(doc) and len(code_rest) >= 2 and body_start <= 40:
            k = rng.randint(0, min(3, len(rest) - 2))
            head = "\n".join(src[:body_start + k])
            if len(head) <= max_chars:
                out.append(Item("code_complete", f"{COMPLETE_LEAD}\n\n```python\n{head}\n```", rel))
        if 4 <= len(src) <= 30 and len(whole) <= max_chars and len(code_rest) >= 2:
            lead = EXPLAIN_LEADS[rng.randrange(len(EXPLAIN_LEADS))]
            out.append(Item("code_explain", f"{lead}\n\n```python\n{whole}\n```", rel))
        if 6 <= len(rest) <= 60 and len(code_rest) >= 4:
            # the function without its docstring, cut after 2 .. len - 2 lines of its body
            cut = rng.randint(2, len(rest) - 2)
            head = "\n".join(src[:first.lineno - node.lineno] + rest[:cut]) if has_doc else "\n".join(
                src[:body_start + cut])
            if len(head) <= max_chars:
                out.append(Item("code_continue", f"{CONTINUE_CODE_LEAD}\n\n```python\n{head}\n```", rel))
        if has_doc and 3 <= len(code_rest) <= 30:
            bare = "\n".join(src[:first.lineno - node.lineno] + rest)
            if len(bare) <= max_chars:
                out.append(Item("code_docstring", f"{DOCSTRING_LEAD}\n\n```python\n{bare}\n```", rel))
    return out


def docstrings(text: str) -> list[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 150:
                out.append(doc)
    return out


# ------------------------------------------------------------------------------------- prose


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a docstring or a doc file: up to the first numpydoc / Google section,
    skipping code, lists, tables, headings and directives."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        raw = [line for line in block.split("\n") if line.strip()]
        if not raw:
            continue
        if any(SECTION.match(line) for line in raw):
            break  # the rest is parameters, returns, examples
        if any(set(line.strip()) <= set("-=~^*#") for line in raw):
            continue  # a heading or a rule
        if any(line.lstrip().startswith((".. ", ">>>", "...", "* ", "- ", "+ ", "#", "|", ":", "$", "[", "<", "{"))
               or re.match(r"\s*\d+[.)] ", line) for line in raw):
            continue
        indents = {len(line) - len(line.lstrip()) for line in raw}
        if len(indents) > 1 or min(indents) >= 4:
            continue  # code, quotes, definition lists
        para = " ".join(" ".join(raw).split())
        if prose(para):
            out.append(para)
    return out


WORD = re.compile(r"^[(\"'“]?([A-Za-z][A-Za-z'’-]*|\d+(\.\d+)?)[.,;:!?)\"”]*$")


def prose(para: str) -> bool:
    words = para.split()
    if not 25 <= len(words) <= 220 or not para[0].isupper() or para[-1] not in ".!?":
        return False
    if any(bad in para for bad in ("http://", "https://", ">>>", "::", "TODO", "XXX", "{{", "}}", "\\", "__", "=")):
        return False
    if para.count("`") > 6 or len(re.findall(r"[.!?](\s|$)", para)) < 2:
        return False
    return sum(bool(WORD.match(w)) for w in words) >= 0.75 * len(words)


def prose_items(rel: str, paras: list[str], rng: random.Random) -> list[Item]:
    out = []
    for para in paras:
        words = para.split()
        if len(words) >= 35:
            n = rng.randint(25, min(70, len(words) - 10))
            lead = CONTINUE_LEADS[rng.randrange(len(CONTINUE_LEADS))]
            out.append(Item("prose_continue", f"{lead}\n\n{' '.join(words[:n])}", rel))
        if len(para) <= 1200:
            lead = SUMMARY_LEADS[rng.randrange(len(SUMMARY_LEADS))]
            out.append(Item("prose_summarize", f"{lead}\n\n{para}", rel))
    return out


# -------------------------------------------------------------------------------------- main


def distribution_versions(packages: list[str]) -> dict[str, str]:
    owners = metadata.packages_distributions()
    out = {}
    for pkg in packages:
        for dist in sorted(set(owners.get(pkg, []))):
            out[dist] = metadata.version(dist)
    return out


def package_root(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def held_out(origin: str, modulus: int) -> bool:
    return int(hashlib.sha256(origin.encode()).hexdigest(), 16) % modulus == 0


def gather(recipe: dict, rng: random.Random) -> list[Item]:
    items: list[Item] = []
    max_chars = recipe["max_snippet_chars"]
    sources: list[tuple[str, Path, Path]] = []  # (label, root the label is relative to, top)
    if recipe.get("stdlib", True):
        root = Path(sysconfig.get_paths()["stdlib"])
        sources += [("stdlib", root, top) for top in stdlib_tops(root)]
    for pkg in recipe["packages"]:
        top = package_root(pkg)
        if top is None:
            raise SystemExit(f"package {pkg} of the recipe is not installed")
        sources.append((pkg, top.parent, top))
    for label, root, top in sources:
        for path in walk(root, top, (".py", *DOC_SUFFIXES)):
            rel = f"{label}:{path.relative_to(root).as_posix()}"
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if path.suffix == ".py":
                items += code_items(rel, text, rng, max_chars)
                items += prose_items(rel, [p for d in docstrings(text) for p in paragraphs(d)], rng)
            elif not path.stem.lower().startswith(BAD_DOC_NAMES):
                items += prose_items(rel, paragraphs(text), rng)
    from pydoc_data.topics import topics

    for name in sorted(set(topics) - set(v1.HELDOUT_TOPICS)):
        items += prose_items(f"pydoc_data.topics:{name}", paragraphs(v1.unwrap(topics[name])), rng)
    return items


def write_jsonl(path: Path, rows: list[Item], gz: bool = False) -> None:
    data = "".join(json.dumps({"prompt": r.prompt, "kind": r.kind}, ensure_ascii=False) + "\n" for r in rows)
    raw = data.encode("utf-8")
    if gz:
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
            f.write(raw)
        raw = buf.getvalue()
    path.write_bytes(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "configs/smollm2/prompts/v2/recipe.yaml")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: the recipe's folder")
    args = ap.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    out_dir = args.out_dir or args.recipe.parent
    seed, caps, modulus = recipe["seed"], recipe["caps"], recipe["heldout_file_modulus"]
    if sys.version_info[:2] != (3, 11):
        print(f"note: the committed files were made with Python 3.11.7; {sys.version.split()[0]} parses another "
              "standard library", file=sys.stderr)

    rng = random.Random(seed)
    v1_dir = REPO / "configs/smollm2/prompts"
    v1_train = [json.loads(line)["prompt"] for line in (v1_dir / "train.jsonl").read_text().splitlines()]
    v1_heldout = [json.loads(line)["prompt"] for line in (v1_dir / "heldout.jsonl").read_text().splitlines()]
    items = [Item("v1", p, "v1") for p in v1_train]
    items += [Item("templates2", p, "templates2") for p in templates2()]
    items += [Item("math", p, "math") for p in v1.math_prompts(random.Random(seed + 1), caps["math"] * 2)]
    items += gather(recipe, rng)

    humaneval = v1.HumanEvalFilter()
    kinds = list(caps)
    heldout_pool = {"code": [], "prose": []}
    train_pool: dict[str, list[Item]] = {k: [] for k in kinds}
    for item in items:
        if not humaneval.keep(item.prompt):
            continue
        if item.kind.startswith(("code", "prose")) and held_out(item.origin, modulus):
            heldout_pool[item.kind.split("_")[0]].append(item)
        else:
            train_pool[item.kind].append(item)

    # held-out sets first: they win every conflict
    seen: set[str] = {v1.key(p) for p in v1_heldout}
    heldout = {}
    for name, pool in heldout_pool.items():
        rng.shuffle(pool)
        chosen = []
        for item in pool:
            k = v1.key(item.prompt)
            if k and k not in seen and len(chosen) < recipe["heldout_per_set"]:
                seen.add(k)
                chosen.append(item)
        heldout[name] = chosen
    banned_shingles = set(v1.shingles((REPO / "configs/smollm2/heldout_text.txt").read_text()))
    for item in heldout["prose"]:
        banned_shingles |= v1.shingles(item.prompt.split("\n\n", 1)[1])
    for p in v1_heldout:
        banned_shingles |= v1.shingles(p)

    train, stats = [], {}
    for kind in kinds:
        pool = train_pool[kind]
        if kind != "v1":
            rng.shuffle(pool)
        kept, dropped = [], {"duplicate": 0, "heldout_shingle": 0}
        for item in pool:
            if len(kept) >= caps[kind]:
                break
            k = v1.key(item.prompt)
            if not k or k in seen:
                dropped["duplicate"] += 1
                continue
            # prose must not share 8 words in a row with held-out prose (leads left out)
            if item.kind.startswith("prose") and v1.shingles(item.prompt.split("\n\n", 1)[1]) & banned_shingles:
                dropped["heldout_shingle"] += 1
                continue
            seen.add(k)
            kept.append(item)
        stats[kind] = {"candidates": len(pool), "train": len(kept), **dropped}
        train += kept
    rng.shuffle(train)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl.gz", train, gz=True)
    for name, rows in heldout.items():
        write_jsonl(out_dir / f"heldout_{name}.jsonl", rows)
    seeds = [Item("question_seed", p, "seeds") for p in question_seeds()]
    write_jsonl(out_dir / "question_seeds.jsonl", seeds)
    files = ["train.jsonl.gz", "heldout_code.jsonl", "heldout_prose.jsonl", "question_seeds.jsonl"]
    manifest = {
        "python": sys.version.split()[0],
        "packages": distribution_versions(recipe["packages"]),
        "counts": {"train": len(train), **{f"heldout_{n}": len(r) for n, r in heldout.items()},
                   "question_seeds": len(seeds)},
        "by_kind": stats,
        "humaneval_dropped": humaneval.dropped,
        "sha256": {f: hashlib.sha256((out_dir / f).read_bytes()).hexdigest() for f in files},
    }
    (out_dir / "versions.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{'kind':<18}{'candidates':>11}{'train':>8}{'dup':>8}{'shingle':>9}")
    for kind, s in stats.items():
        print(f"{kind:<18}{s['candidates']:>11}{s['train']:>8}{s['duplicate']:>8}{s['heldout_shingle']:>9}")
    print(f"train {len(train)}; held out: " + ", ".join(f"{n} {len(r)}" for n, r in heldout.items())
          + f"; question seeds {len(seeds)}; HumanEval filter dropped {humaneval.dropped}")
    for f in files:
        print(f"{f}: {(out_dir / f).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
