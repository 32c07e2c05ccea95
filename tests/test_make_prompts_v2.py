"""scripts/make_prompts_v2.py: the pieces that cut prompts out of source files (the whole recipe
reads the standard library and 32 packages, minutes: it is checked by its sha256s, not here)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def v2():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("make_prompts_v2", SCRIPTS / "make_prompts_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = '''
def moving_total(values, window):
    """Return the running totals of values over a sliding window of the given size.

    Parameters
    ----------
    values : list
    """
    totals = []
    current = 0
    for i, v in enumerate(values):
        current += v
        if i >= window:
            current -= values[i - window]
        totals.append(current)
    return totals


def _private(x):
    return x


class Box:
    def area(self):
        """Compute the area of the box from its two sides."""
        w = self.width
        h = self.height
        return w * h
'''


def test_code_prompts_from_a_source_file(v2):
    items = v2.code_items("pkg:mod.py", SOURCE, random.Random(0), max_chars=1200)
    kinds = sorted({i.kind for i in items})
    assert kinds == ["code_complete", "code_continue", "code_docstring", "code_explain"]
    assert all(i.origin == "pkg:mod.py" for i in items)
    assert not any("_private" in i.prompt for i in items)  # private functions are skipped
    docstring = next(i.prompt for i in items if i.kind == "code_docstring" and "moving_total" in i.prompt)
    assert '"""' not in docstring and "totals.append(current)" in docstring
    complete = next(i.prompt for i in items if i.kind == "code_complete" and "moving_total" in i.prompt)
    assert complete.startswith(v2.COMPLETE_LEAD) and "sliding window" in complete and "return totals" not in complete
    method = [i.prompt for i in items if "def area(self):" in i.prompt]
    assert method and all("\n    def" not in p for p in method)  # methods are dedented
    assert v2.code_items("x.py", "def broken(:\n", random.Random(0), 1200) == []


def test_prose_paragraphs_stop_at_sections_and_skip_code(v2):
    doc = ("Compute the thing for every element of the input array. This is the first paragraph and it is "
           "long enough to count as prose because it has many ordinary English words in it. A third sentence "
           "makes it long enough to be continued as well as summarised.\n\n"
           "    x = compute(a)\n    y = compute(b) + x * 2 and more words to pass the length filter here\n\n"
           "- a list item that is not prose even though it goes on for quite a few words in a row here.\n\n"
           "Parameters\n----------\na : array\n\n"
           "A later paragraph after the section header is never taken, however long and well written it "
           "may be, since it documents parameters.")
    paras = v2.paragraphs(doc)
    assert paras == [" ".join(doc.split("\n\n")[0].split())]
    items = v2.prose_items("f.py", paras, random.Random(1))
    assert {i.kind for i in items} == {"prose_continue", "prose_summarize"}
    cont = next(i.prompt for i in items if i.kind == "prose_continue")
    lead, text = cont.split("\n\n", 1)
    assert lead in v2.CONTINUE_LEADS and paras[0].startswith(text) and len(text.split()) < len(paras[0].split())


def test_held_out_split_is_by_file_and_stable(v2):
    names = [f"stdlib:mod{i}.py" for i in range(2000)]
    held = [n for n in names if v2.held_out(n, 40)]
    assert 20 < len(held) < 80 and held == [n for n in names if v2.held_out(n, 40)]
