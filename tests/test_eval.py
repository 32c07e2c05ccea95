"""`idlm eval`: answer extraction, the sandboxed executor, HumanEval (rigged and real), the JSONL
runner (rigged, offline and against a live `idlm serve`), perplexity against transformers, and
alpha through the CLI, on tiny models built here."""

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
from helpers import make_small_idlm, serve_process

from idlm import LLM, SamplingParams
from idlm.cli import build_parser, main
from idlm.cli.options import sampling_params
from idlm.eval import extract, humaneval, jsonl_bench
from idlm.eval.client import Completion, per_request
from idlm.eval.execution import Limits, run_python
from idlm.eval.introspection import introspective_acceptance
from idlm.kernels.attention import DenseAttention


class FakeBackend:
    """Answers every prompt with `answer(prompt)`; records the prompts it was given."""

    name = "fake"

    def __init__(self, answer):
        self.answer = answer
        self.prompts = []

    def complete(self, prompts, params):
        self.prompts += prompts
        return [Completion(self.answer(p), tokens=4, forwards=2) for p in prompts]

    def resolve(self, params):
        return params


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("idlm: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("She has 3 apples and buys 4 more: 7", "7"),
    ("Total: $1,234.50.", "1234.50"),
    ("#### 72", "72"),
    ("a list 1,2,3", "3"),
    ("it drops to -5 degrees", "-5"),
    ("three quarters is 3/4", "3/4"),
    ("no digits here", None),
])
def test_last_number(text, expected):
    assert extract.last_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"nested \boxed{x^{2}+1} done", "x^{2}+1"),
    (r"\fbox{7}", "7"),
    (r"\boxed 9$", "9"),
    (r"cut off \boxed{12", None),
    ("no box", None),
])
def test_boxed(text, expected):
    assert extract.boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is (B).", "B"),
    ("Answer: **C**", "C"),
    (r"so \boxed{D}", "D"),
    ("A. Because cats sit.", "A"),
    ("Either (A) or (C), I'd say", "C"),
    ("A cat would pick B here", "B"),
    ("I don't know", None),
])
def test_choice_letter(text, expected):
    assert extract.choice_letter(text, "ABCD") == expected


@pytest.mark.parametrize("mode, output, answer, correct", [
    ("exact", "  Paris. ", "paris", True),
    ("exact", "Paris is nice", "Paris", False),
    ("last_number", "so 18 eggs, that is 18.0", "Natalia sold 48/2 = 24 ... #### 18", True),
    ("last_number", "1,000", "1000", True),
    ("last_number", "0.75", "3/4", True),
    ("last_number", "19", "#### 18", False),
    ("last_number", "no idea", "18", False),
    ("boxed", r"thus \boxed{\dfrac{1}{2}}", r"\frac{1}{2}", True),
    ("boxed", r"thus \boxed{0.5}", r"\frac{1}{2}", True),
    ("boxed", r"\boxed{90^\circ}", "90", True),
    ("boxed", r"\boxed{x+1}", r"$\boxed{x + 1}$", True),
    ("boxed", r"\boxed{3}", "4", False),
    ("choice", "The answer is (b)... no, (C)", "C", True),
    ("choice", "Answer: A", "(B)", False),
])
def test_grading(mode, output, answer, correct):
    gold = extract.reference(mode, answer)
    assert extract.same(mode, extract.extract(mode, output), gold) is correct


def test_unknown_extraction_mode(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown extraction mode 'regex'"):
        extract.extract("regex", "x")
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    code, _, err = run_cli(capsys, "jsonl", data, "--extract", "regex")
    assert code == 1 and "unknown extraction mode 'regex'" in error_line(err)


# ---------------------------------------------------------------- sandboxed execution

def test_executor_passes_and_fails():
    ok = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('done')")
    assert ok.status == "passed" and ok.stdout.strip() == "done" and ok.passed
    wrong = run_python("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5")
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr
    assert run_python("def f(:\n  pass").status == "failed"
    # exiting early (even with status 0) is not passing the tests that follow
    assert run_python("import sys\nsys.exit(0)\nassert False").status == "failed"
    assert run_python("import posix\nposix._exit(0)").status == "failed"
    assert run_python("x = bytearray(8 << 30)", Limits(memory_mb=512)).status == "failed"


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_executor_kills_at_the_timeout(program):
    start = time.monotonic()
    r = run_python(program, Limits(timeout=1.0))
    assert r.status == "timeout" and time.monotonic() - start < 4


def test_executor_contains_the_program(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = f"""
import os, socket
print(os.getpid(), os.getcwd())
open("scratch.txt", "w").write("mine")  # its own directory is writable
for attempt in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2),
                lambda: os.remove({str(sentinel)!r}),
                lambda: open({str(sentinel)!r}, "w").write("gone")):
    try:
        attempt()
        print("succeeded")
    except Exception as e:
        print("refused", type(e).__name__)
"""
    r = run_python(program)
    assert r.status == "passed", r.stderr
    lines = r.stdout.splitlines()
    pid, cwd = lines[0].split(" ", 1)
    assert int(pid) != os.getpid()
    assert Path(cwd) != Path.cwd() and Path(cwd).name.startswith("idlm-exec-") and not Path(cwd).exists()
    assert lines[1].startswith("refused"), "the program reached a socket on 127.0.0.1"
    with pytest.raises(TimeoutError):
        listener.accept()
    assert lines[2].startswith("refused"), "the program deleted a file outside its directory"
    if "filesystem" in r.isolation:  # a read-only file system outside the program's own tmpfs
        assert lines[3] == "refused OSError"
    assert sentinel.read_text() == "keep" or "filesystem" not in r.isolation
    listener.close()


# ---------------------------------------------------------------- HumanEval

def test_humaneval_with_rigged_completions():
    problems = humaneval.load_problems(limit=2)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    solutions = {p["prompt"]: p["canonical_solution"] for p in problems}
    params = SamplingParams(temperature=0, max_tokens=64)
    # the canonical body plus what a model writes next, which the stop strings cut off
    right = FakeBackend(lambda prompt: solutions[prompt] + "\n\ndef extra():\n    raise SystemExit(1)\n")
    result = humaneval.evaluate(right, problems, params)
    assert result["summary"]["pass@1"] == 1.0 and result["summary"]["passed"] == 2
    assert right.prompts == [p["prompt"] for p in problems]
    assert all(item["passed"] and "extra" not in item["completion"] for item in result["items"])
    assert result["summary"]["tokens_per_forward"] == 2.0
    assert set(humaneval.STOPS) <= set(result["sampling"]["stop"])

    wrong = FakeBackend(lambda prompt: "    return None\n")
    result = humaneval.evaluate(wrong, problems, params)
    assert result["summary"]["pass@1"] == 0.0
    assert [item["status"] for item in result["items"]] == ["failed", "failed"]
    assert all("AssertionError" in item["error"] for item in result["items"])


def test_humaneval_chat_format_runs_the_replys_code_block():
    problems = humaneval.load_problems(limit=2)
    by_request = {humaneval.CHAT_REQUEST.format(prompt=p["prompt"]): p for p in problems}
    params = SamplingParams(temperature=0, max_tokens=64)

    def whole_function(messages):  # prose, then the full function (imports and all) in a fenced block
        p = by_request[messages[-1]["content"]]
        return ("Here is the function:\n\n```python\n" + p["prompt"] + p["canonical_solution"]
                + "```\n\nIt loops over the items.")

    def body_only(messages):  # an unlabelled, unclosed block holding only the body
        return "```\n" + by_request[messages[-1]["content"]]["canonical_solution"]

    for answer in (whole_function, body_only):
        backend = FakeBackend(answer)
        result = humaneval.evaluate(backend, problems, params, chat=True)
        assert result["summary"]["pass@1"] == 1.0 and result["summary"]["format"] == "chat"
        assert all(m[0]["role"] == "user" and "```python" in m[0]["content"] for m in backend.prompts)
        assert result["sampling"]["stop"] == []  # the reply ends at EOS, not at "\ndef "
    prose = humaneval.evaluate(FakeBackend(lambda m: "You should sort the list first."), problems, params, chat=True)
    assert prose["summary"]["pass@1"] == 0.0


def test_humaneval_cli_on_a_tiny_model(capsys, tmp_path, llama_dir):
    out = tmp_path / "he.json"
    code, table, _ = run_cli(capsys, "humaneval", "--model", llama_dir, "--limit", 2, "--max-tokens", 6,
                             "--ignore-eos", "--output", out)
    assert code == 0
    assert re.search(r"pass@1\s+0\.0000", table) and re.search(r"tokens_per_forward\s+1\.0000", table)
    result = json.loads(out.read_text())
    assert [item["task_id"] for item in result["items"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(item["tokens"] == 6 and item["status"] == "failed" for item in result["items"])
    assert result["summary"]["problems"] == 2 and result["sampling"]["mode"] == "ar"


# ---------------------------------------------------------------- JSONL runner

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_accuracy_with_rigged_outputs(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [
        {"q": "2 + 2?", "a": "#### 4"},
        {"q": "10 / 4?", "a": "2.5"},
        {"q": "1000 + 1000?", "a": 2000},
        {"q": "3 * 3?", "a": "9"},
    ])
    outputs = {"2 + 2?": "2 + 2 = 4", "10 / 4?": "it is 5/2", "1000 + 1000?": "2,000.", "3 * 3?": "I think 6"}
    backend = FakeBackend(lambda prompt: outputs[prompt.removeprefix("Q: ")])
    cfg = jsonl_bench.BenchConfig(extraction="last_number", question_key="q", answer_key="a", template="Q: {q}")
    result = jsonl_bench.evaluate(backend, jsonl_bench.load_items(data, cfg), cfg, SamplingParams(temperature=0))
    assert backend.prompts[0] == "Q: 2 + 2?"
    assert [item["correct"] for item in result["items"]] == [True, True, True, False]
    assert result["summary"]["accuracy"] == 0.75 and result["summary"]["correct"] == 3
    assert [item["line"] for item in result["items"]] == [1, 2, 3, 4]

    cfg = jsonl_bench.BenchConfig(extraction="choice", chat=True, system="Be brief.", limit=2,
                                  template=r"{question} Put the letter in \boxed{}.")
    choices = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Pick B", "answer": "B"},
                                                  {"question": "Pick C", "answer": "(C)"},
                                                  {"question": "never asked", "answer": "A"}])
    backend = FakeBackend(lambda conv: r"\boxed{B}")
    result = jsonl_bench.evaluate(backend, jsonl_bench.load_items(choices, cfg), cfg, SamplingParams())
    assert backend.prompts[0] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": r"Pick B Put the letter in \boxed{}."}]
    assert result["summary"]["items"] == 2 and result["summary"]["accuracy"] == 0.5


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": '], r":2: not JSON"),
    (['{"question": "q", "answer": "a"}', '["q", "a"]'], r":2: expected a JSON object"),
    (['{"question": "q", "answer": "a"}', '{"prompt": "q", "answer": "a"}'], r":2: no 'question' field"),
])
def test_jsonl_bad_lines(tmp_path, capsys, lines, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, "jsonl", data, "--model", tmp_path / "never-loaded")
    assert code == 1 and re.search(re.escape(str(data)) + message, error_line(err))


def test_eval_input_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "jsonl", tmp_path / "missing.jsonl")
    assert code == 1 and "missing.jsonl does not exist" in error_line(err)
    data = write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": "no digits"}])
    code, _, err = run_cli(capsys, "jsonl", data, "--extract", "last_number")
    assert code == 1 and f"{data}:1: the answer 'no digits' holds nothing" in error_line(err)
    code, _, err = run_cli(capsys, "jsonl", data, "--template", "no slot")
    assert code == 1 and "must contain {question}" in error_line(err)
    code, _, err = run_cli(capsys, "perplexity", tmp_path / "none.txt", "--url", "http://127.0.0.1:9")
    assert code == 1 and "needs the model's own probabilities" in error_line(err)
    code, _, err = run_cli(capsys, "humaneval", "--problems", tmp_path / "none.jsonl")
    assert code == 1 and "none.jsonl does not exist" in error_line(err)
    with pytest.raises(ValueError, match="does not exist"):
        humaneval.load_problems(tmp_path / "none.jsonl")


# ---------------------------------------------------------------- perplexity

def test_perplexity_matches_transformers(model_dirs, tmp_path, capsys):
    folder, hf = model_dirs["llama"]
    words = "the cat sat on the mat and ran to the park with a big red dog one day".split()
    text = " ".join(words[(7 * i) % len(words)] for i in range(150))
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "ppl.json"
    code, _, _ = run_cli(capsys, "perplexity", tmp_path / "text.txt", "--model", folder, "--device", "cpu",
                         "--context", 48, "--window-stride", 20, "--output", out)
    assert code == 0
    ours = json.loads(out.read_text())["summary"]

    # the sliding-window recipe of transformers' perplexity guide, on its own model
    from transformers import AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(folder).encode(text))
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), 20):
        end = min(begin + 48, len(ids))
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            logits = hf(window).logits.double()
        scored = labels[:, 1:] != -100
        nll += torch.nn.functional.cross_entropy(logits[:, :-1][scored], labels[:, 1:][scored], reduction="sum")
        count += int(scored.sum())
        prev_end = end
        if end == len(ids):
            break
    assert ours["tokens"] == count == len(ids) - 1
    assert ours["windows"] > 3
    assert ours["perplexity"] == pytest.approx(float(torch.exp(nll / count)), rel=1e-4)
    assert ours["mean_nll"] == pytest.approx(float(nll / count), rel=1e-4)


def test_perplexity_leaves_the_never_sampled_mask_out(tmp_path):
    from idlm.eval.perplexity import perplexity
    from idlm.models.loader import load_model

    model = load_model(make_small_idlm(tmp_path / "idlm", vocab=12), torch.float32, "cpu", progress=False)
    assert model.cfg.mask_token_id == 11
    ids = torch.randint(2, 11, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    report = perplexity(model, ids, context=64, banned_token=11)
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([ids]), torch.arange(40)[None], DenseAttention()))[0, :-1].double()
    target = torch.tensor(ids[1:])
    full = torch.nn.functional.cross_entropy(logits, target)
    logits[:, 11] = float("-inf")
    banned = torch.nn.functional.cross_entropy(logits, target)
    assert report.perplexity == pytest.approx(float(banned.exp()), rel=1e-5)
    assert report.perplexity_with_mask == pytest.approx(float(full.exp()), rel=1e-5)
    assert report.perplexity < report.perplexity_with_mask


# ---------------------------------------------------------------- alpha

def test_alpha_through_the_cli(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": p} for p in [[2, 3, 4, 5], [6, 7], [8, 9, 10, 2]] * 2])
    flags = ["--temperature", 1.0, "--max-tokens", 20, "--ignore-eos", "--seed", 3, "--kv-cache-tokens", 2048,
             "--stride", 4]
    summaries = {}
    for spread in (0.1, 0.4):
        folder = make_small_idlm(tmp_path / f"m{spread}", spread=spread)
        out = tmp_path / f"alpha{spread}.json"
        code, table, _ = run_cli(capsys, "alpha", prompts, "--model", folder, *flags, "--output", out)
        assert code == 0 and "alpha_draft" in table
        summaries[spread] = json.loads(out.read_text())["summary"]
    good, poor = summaries[0.1], summaries[0.4]
    assert good["mode"] == "isd" and good["tokens"] == 6 * 20 and good["draft_tokens"] > 10
    assert 0 < poor["alpha_draft"] < good["alpha_draft"] <= 1 and poor["alpha"] < good["alpha"] < 1

    # the same numbers as the API with the same per-prompt seeds
    llm = LLM(str(tmp_path / "m0.1"), progress=False, kv_cache_tokens=2048)
    params = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=3, stride=4)
    api = introspective_acceptance(llm, [[2, 3, 4, 5], [6, 7], [8, 9, 10, 2]] * 2, per_request(params, 6))
    assert api.alpha == pytest.approx(good["alpha"], abs=1e-9) and api.draft_tokens == good["draft_tokens"]

    code, table, _ = run_cli(capsys, "alpha", prompts, "--model", tmp_path / "m0.1", *flags, "--mode", "ar")
    assert code == 0 and re.search(r"alpha\s+1\.0000", table) and re.search(r"draft_tokens\s+0\b", table)
    code, _, err = run_cli(capsys, "alpha", prompts, "--url", "http://127.0.0.1:9")
    assert code == 1 and "run it with --model instead of --url" in error_line(err)


# ---------------------------------------------------------------- against a live server

@pytest.fixture(scope="module")
def server_url(llama_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(llama_dir, log) as (_, url):
        yield url


@pytest.mark.parametrize("chat", [False, True])
def test_jsonl_against_a_live_server(server_url, llama_dir, tmp_path, capsys, chat):
    questions = ["the cat sat", "hello world why", "red sun and blue moon", "one two"]
    llm = LLM(str(llama_dir), progress=False, kv_cache_tokens=2048)
    params = SamplingParams(temperature=0, max_tokens=5)
    if chat:
        outs = llm.chat([[{"role": "user", "content": f"Q {q}"}] for q in questions], params)
    else:
        outs = llm.generate([f"Q {q}" for q in questions], params)
    answers = [o.text for o in outs]
    answers[-1] += " wrong"  # one of four cannot match
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)])
    out = tmp_path / "served.json"
    code, table, _ = run_cli(capsys, "jsonl", data, "--url", server_url + "/v1", "--template", "Q {question}",
                             "--max-tokens", 5, "--concurrency", 3, "--output", out, *(["--chat"] if chat else []))
    assert code == 0 and re.search(r"accuracy\s+0\.7500", table)
    result = json.loads(out.read_text())
    assert [item["output"] for item in result["items"]][:3] == answers[:3]
    assert result["summary"]["tokens"] == sum(len(o.token_ids) for o in outs)
    assert result["summary"]["tokens_per_forward"] == pytest.approx(1.0)
    assert server_url in result["summary"]["source"]


def test_server_errors_are_one_line(server_url, tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "the cat", "answer": "x"}])
    code, _, err = run_cli(capsys, "jsonl", data, "--url", server_url, "--stride", 4, "--mode", "isd")
    assert code == 1 and "the server answered 400" in error_line(err)
    code, _, err = run_cli(capsys, "jsonl", data, "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the server" in error_line(err)


@pytest.mark.parametrize("argv", [["eval", "--help"], *(["eval", task, "--help"] for task in
                                                        ("alpha", "humaneval", "jsonl", "perplexity"))])
def test_eval_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 0 and "usage: idlm eval" in capsys.readouterr().out


def test_eval_sampling_defaults(tmp_path):
    def params(*argv):
        return sampling_params(build_parser().parse_args(["eval", *argv]), **defaults)

    defaults = {"temperature": 1.0}
    assert params("alpha", "p.txt").temperature == 1.0
    assert params("alpha", "p.txt", "--temperature", "0.5").temperature == 0.5
    defaults = {"temperature": 0.0, "max_tokens": 512}  # what run_jsonl and run_humaneval pass
    assert params("jsonl", "q.jsonl").max_tokens == 512 and params("jsonl", "q.jsonl").temperature == 0
    config = tmp_path / "decoding.yaml"
    config.write_text("max_new_tokens: 100\n")
    assert params("humaneval", "--decoding-config", str(config)).max_tokens == 100
    assert params("humaneval", "--decoding-config", str(config), "--max-tokens", "7").max_tokens == 7
