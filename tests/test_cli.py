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
