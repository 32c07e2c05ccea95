"""Bad input: a clear ValueError from the API, one readable line and a non-zero exit from the CLI."""

import json
import shutil
import subprocess
import sys

import pytest

from idlm import LLM, SamplingParams
from idlm.cli import main


def cli_error(capsys, *argv) -> str:
    code = main(list(argv))
    stderr = capsys.readouterr().err
    err = stderr.replace("\r", "\n").strip().splitlines()[-1]  # the line after any progress bar
    assert code != 0
    assert err.startswith("idlm: error: ") and "Traceback" not in stderr
    return err.removeprefix("idlm: error: ")


def api_error(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        LLM(progress=False, **kwargs)
    return str(info.value)


@pytest.fixture
def broken(tmp_path, llama_dir):
    def copy(name: str):
        folder = tmp_path / name
        shutil.copytree(llama_dir, folder)
        return folder
    return copy


def test_missing_model_path(capsys, tmp_path):
    missing = str(tmp_path / "nope")
    message = api_error(model=missing)
    assert "does not exist" in message and missing in message
    assert cli_error(capsys, "generate", "hi", "--model", missing) == message


def test_folder_without_config(capsys, tmp_path):
    assert "no config.json" in api_error(model=str(tmp_path))
    assert "no config.json" in cli_error(capsys, "generate", "hi", "--model", str(tmp_path))


def test_unknown_architecture(capsys, broken):
    folder = broken("gpt2ish")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"model_type": "gpt2"}))
    message = api_error(model=str(folder))
    assert "gpt2" in message and "llama" in message
    assert cli_error(capsys, "generate", "hi", "--model", str(folder)) == message


def test_corrupt_safetensors(capsys, broken):
    folder = broken("corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = api_error(model=str(folder))
    assert str(weights) in message and "safetensors" in message
    assert cli_error(capsys, "generate", "hi", "--model", str(folder)) == message


def test_corrupt_gguf(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    message = api_error(model=str(bad))
    assert str(bad) in message
    assert cli_error(capsys, "generate", "hi", "--model", str(bad)) == message


def test_not_a_model_file(capsys, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert ".gguf" in cli_error(capsys, "generate", "hi", "--model", str(txt))


@pytest.mark.parametrize("kwargs, flag, fragment", [
    ({"temperature": -0.5}, ["--temperature", "-0.5"], "temperature must be >= 0"),
    ({"top_p": 0.0}, ["--top-p", "0"], "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ({"max_tokens": 0}, ["--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    ({"top_k": -1}, ["--top-k", "-1"], "top_k must be"),
])
def test_bad_sampling_params(capsys, llama_dir, kwargs, flag, fragment):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert fragment in str(info.value)
    assert cli_error(capsys, "generate", "the cat", "--model", str(llama_dir), *flag) == str(info.value)


def test_prompt_longer_than_context(capsys, llama_dir):
    llm = LLM(str(llama_dir), progress=False, kv_cache_tokens=1024, max_model_len=64)
    with pytest.raises(ValueError, match="shorten the prompt") as info:
        llm.generate(["the cat " * 40], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()
    # the default tiny context is 512 positions
    assert "shorten the prompt" in cli_error(capsys, "generate", "the cat " * 300, "--model", str(llama_dir))
    assert "64" in str(info.value)


def test_bad_engine_args():
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(progress=False, max_num_seqs=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        from idlm.models.loader import parse_dtype
        parse_dtype("float8")


def test_cli_process_exit_code_and_version(tmp_path):
    done = subprocess.run([sys.executable, "-m", "idlm", "generate", "hi", "--model", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("idlm: error:") and "Traceback" not in done.stderr
    version = subprocess.run([sys.executable, "-m", "idlm", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("idlm ")
