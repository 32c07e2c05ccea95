"""The code's shape: which packages may import which, how the command line reaches EngineConfig,
and the deprecated names that still work."""

import argparse
import ast
from pathlib import Path

import pytest

import idlm
from idlm.cli import build_parser
from idlm.cli.options import engine_args
from idlm.config import EngineConfig

PACKAGE = Path(idlm.__file__).parent


def imported_modules(source: str, module: str) -> set[str]:
    """Every module that `module` (dotted name, source text) imports, function-level imports
    included; `from a import b` counts as both a and a.b."""
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            parent = ".".join(part for part in (base, node.module) if part)
            names.add(parent)
            names.update(f"{parent}.{alias.name}" for alias in node.names)
    return names


def forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[:2] in (["idlm", "engine"], ["idlm", "server"]))


def test_the_import_walk_sees_every_form():
    source = "import idlm.engine.llm\nfrom idlm import server\ndef f():\n    from ..engine import llm_engine\n"
    assert forbidden(imported_modules(source, "idlm.training.probe")) == [
        "idlm.engine", "idlm.engine.llm", "idlm.engine.llm_engine", "idlm.server"]
    assert forbidden(imported_modules("from idlm.models import tokenizer\n", "idlm.training.probe")) == []


def test_training_imports_neither_engine_nor_server():
    files = sorted((PACKAGE / "training").rglob("*.py"))
    assert files
    for path in files:
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        bad = forbidden(imported_modules(path.read_text(), module))
        assert not bad, f"{module} imports {bad}"


def test_engine_args_pick_engine_config_fields_by_name():
    args = argparse.Namespace(model="m", device="cpu", dtype=None, max_num_seqs=3, stride=5, prompt="hi",
                              temperature=0.5, top_k=None, run=print)
    kwargs = engine_args(args)
    assert kwargs == {"model": "m", "device": "cpu", "max_num_seqs": 3, "stride": 5}  # None: not given
    config = EngineConfig(**kwargs)
    assert (config.dtype, config.max_num_seqs, config.stride, config.proposal) == ("auto", 3, 5, "sample")
    assert engine_args(args, model=None)["model"] is None  # overrides win, None included


@pytest.mark.parametrize("argv, expected", [
    (["serve", "--max-num-seqs", "3", "--device", "cpu", "--mode", "ar", "--stride", "5"],
     {"max_num_seqs": 3, "device": "cpu", "mode": "ar", "stride": 5, "proposal": "sample"}),
    (["distill", "p.txt", "o.jsonl", "--kv-cache-tokens", "512", "--adapter", "none", "--seed", "7"],
     {"max_num_seqs": 64, "kv_cache_tokens": 512, "adapter": "none", "seed": 7}),
    (["eval", "jsonl", "q.jsonl", "--dtype", "float32", "--model", "m"], {"dtype": "float32", "model": "m"}),
])
def test_every_command_reaches_engine_config_by_name(argv, expected):
    kwargs = engine_args(build_parser().parse_args(argv))
    assert expected.items() <= kwargs.items()
    EngineConfig(**kwargs).validate()


def test_block_size_is_a_deprecated_name_of_kv_block_size():
    with pytest.warns(FutureWarning, match="kv_block_size"):
        config = EngineConfig(block_size=8)
    assert config.kv_block_size == 8
    assert not hasattr(config, "block_size")
