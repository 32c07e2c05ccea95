"""The CLI on tiny models: generate, chat (interactive), stats, help."""

import pytest

from idlm.cli import build_parser, main


def test_generate_streams_text(capsys, llama_dir):
    assert main(["generate", "the cat sat", "--model", str(llama_dir), "--max-tokens", "6", "--ignore-eos",
                 "--stats"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) >= 3
    assert "tokens=6" in err and "mode=ar" in err


def test_chat_keeps_history_and_exits(monkeypatch, capsys, llama_dir):
    lines = iter(["hello world", "/reset", "", "why the sun", "/exit"])
    seen = []

    def fake_input(prompt):
        seen.append(prompt)
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", str(llama_dir), "--max-tokens", "5", "--seed", "1", "--temperature", "0.8"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.strip()]) == 2  # two answers
    assert len(seen) == 5


def test_chat_ends_on_eof(monkeypatch, llama_dir):
    def eof(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert main(["chat", "--model", str(llama_dir)]) == 0


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["chat", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 0
    assert "usage: idlm" in capsys.readouterr().out


def test_default_stride_follows_the_checkpoint(tmp_path):
    from helpers import make_small_idlm

    from idlm import LLM

    folder = make_small_idlm(tmp_path / "m")  # block_size 3 in config.json: trained for N = 4
    llm = LLM(str(folder), progress=False, kv_cache_tokens=1024)
    assert llm.engine.defaults == {"mode": "isd", "stride": 4, "proposal": "sample", "stride_policy": "adaptive",
                                   "branches": None}


def test_cache_ls_and_rm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    entry = tmp_path / "gguf" / "Tiny.Q4_1-0123456789abcdef"
    (entry / "float32").mkdir(parents=True)
    (entry / "float32" / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    (entry / "idlm_source.json").write_text('{"gguf": "/models/Tiny.Q4_1.gguf"}')
    (tmp_path / "shapes" / "tiny").mkdir(parents=True)
    (tmp_path / "shapes" / "tiny" / "config.json").write_text("{}")
    (tmp_path / "kernels" / "cpu-torch9.9").mkdir(parents=True)
    (tmp_path / "kernels" / "cpu-torch9.9" / "idlm_cpu.so").write_bytes(b"\0" * 1000)
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "3 entries, 3 MB" in out and "kernels/cpu-torch9.9" in out and "CPU kernels" in out
    assert "gguf/Tiny.Q4_1-0123456789abcdef" in out and "float32" in out and "/models/Tiny.Q4_1.gguf" in out
    assert "shapes/tiny" in out
    assert main(["cache", "rm", "gguf/absent"]) == 1
    assert "no cache entry 'gguf/absent'" in capsys.readouterr().err
    assert main(["cache", "rm", "Tiny.Q4_1-0123456789abcdef"]) == 0
    assert "freed 3 MB" in capsys.readouterr().out and not entry.exists()
    assert main(["cache", "rm"]) == 1
    assert main(["cache", "rm", "--all"]) == 0
    assert not (tmp_path / "shapes" / "tiny").exists() and not (tmp_path / "kernels" / "cpu-torch9.9").exists()
