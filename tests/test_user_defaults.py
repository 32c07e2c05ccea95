"""What a vLLM user expects (issue 20): sampling defaults from generation_config.json, the serve
options (API key, hub ids, optional model), arguments refused before the model loads, honest
--stats, and the chat commands. In process, on tiny models."""

import asyncio
import io
import json
import re
import shutil

import httpx
import pytest

from idlm import LLM, SamplingParams
from idlm.cli import main
from idlm.config import EngineConfig
from idlm.engine.llm_engine import LLMEngine


def with_generation_config(src, dst, **config):
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def sampled_dir(llama_dir, tmp_path_factory):
    """The tiny llama whose generation config asks for top-k sampling and 5 new tokens."""
    return with_generation_config(llama_dir, tmp_path_factory.mktemp("gen") / "m", do_sample=True,
                                  temperature=0.9, top_k=3, max_new_tokens=5, eos_token_id=2)


@pytest.fixture(scope="module")
def sampled_engine(sampled_dir):
    return LLMEngine(EngineConfig(model=str(sampled_dir), progress=False, kv_cache_tokens=1024))


def test_generation_config_sets_the_defaults(llama_dir, sampled_dir, sampled_engine, tmp_path):
    assert sampled_engine.sampling_defaults == {"temperature": 0.9, "top_k": 3, "max_tokens": 5}
    plain = LLMEngine(EngineConfig(model=str(llama_dir), progress=False, kv_cache_tokens=1024))
    assert plain.sampling_defaults == {"temperature": 0.0}  # no file: greedy, as the CLI always was
    vllm = LLMEngine(EngineConfig(model=str(sampled_dir), progress=False, kv_cache_tokens=1024,
                                  generation_config="vllm"))
    assert vllm.sampling_defaults == {"temperature": 1.0}
    greedy_file = tmp_path / "g.json"
    greedy_file.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_p": 0.5}))
    from idlm.models.generation_config import sampling_defaults

    assert sampling_defaults(str(greedy_file), llama_dir) == {"temperature": 0.0, "top_p": 0.5}
    assert sampling_defaults(str(sampled_dir), llama_dir)["top_k"] == 3  # a folder holding one
    bad = with_generation_config(llama_dir, tmp_path / "bad", temperature=-1)
    with pytest.raises(ValueError, match="generation config of bad: temperature must be >= 0"):
        LLMEngine(EngineConfig(model=str(bad), progress=False, kv_cache_tokens=1024))
    with pytest.raises(ValueError, match="neither auto, vllm"):
        sampling_defaults(str(tmp_path / "missing.json"), llama_dir)


def test_offline_api_cli_and_server_use_the_generation_config(sampled_dir, sampled_engine, capsys):
    expected = SamplingParams(temperature=0.9, top_k=3, max_tokens=5, seed=7, ignore_eos=True)
    llm = LLM(str(sampled_dir), progress=False, kv_cache_tokens=1024)
    want = llm.generate("the cat", expected)[0]
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.9, top_k=3, max_tokens=5)
    assert main(["generate", "the cat", "--model", str(sampled_dir), "--seed", "7", "--ignore-eos",
                 "--kv-cache-tokens", "1024"]) == 0
    assert capsys.readouterr().out.strip() == want.text.strip()

    from idlm.server.app import create_app
    from idlm.server.async_engine import AsyncEngine

    app = create_app(AsyncEngine(sampled_engine, max_queue=4), "tiny", api_key="sekrit")
    body = {"prompt": "the cat", "seed": 7, "ignore_eos": True}  # no model, temperature, top_k or max_tokens
    key = {"Authorization": "Bearer sekrit"}

    async def scenario():
        async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://idlm") as http,
                    app.router.lifespan_context(app)):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
                r = await http.post("/v1/completions", json=body, headers=headers)
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert (await http.get("/v1/models")).status_code == 401
            assert (await http.get("/health")).json() == {"status": "ok"}
            r = await http.post("/v1/completions", json=body, headers=key)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text
            assert r.json()["usage"]["completion_tokens"] == 5
            greedy = await http.post("/v1/completions", json=body | {"temperature": 0, "max_tokens": 4}, headers=key)
            assert greedy.json()["choices"][0]["text"] == llm.generate(
                "the cat", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].text
            chat = await http.post("/v1/chat/completions", headers=key,
                                   json={"messages": [{"role": "user", "content": "the cat"}], "ignore_eos": True})
            assert chat.json()["usage"]["completion_tokens"] == 5  # max_new_tokens, not the rest of the context
            wrong = await http.post("/v1/completions", json=body | {"model": "other"}, headers=key)
            assert wrong.status_code == 404

    asyncio.run(scenario())


def fake_hub_cache(root, repo_id, model_dir):
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_id_resolves_through_the_cache_offline(llama_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from idlm.models.loader import model_name, resolve_model_folder

    snapshot = fake_hub_cache(tmp_path / "hub", "TinyOrg/tiny-llama", llama_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_folder("TinyOrg/tiny-llama") == snapshot
    assert model_name("TinyOrg/tiny-llama") == "TinyOrg/tiny-llama"
    assert main(["generate", "the cat", "--model", "TinyOrg/tiny-llama", "--max-tokens", "3",
                 "--kv-cache-tokens", "1024"]) == 0
    capsys.readouterr()
    assert main(["generate", "the cat", "--model", "TinyOrg/absent", "--max-tokens", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'TinyOrg/absent' is neither a local path nor in the Hugging Face cache" in err
    assert "hf download TinyOrg/absent" in err


def test_max_model_len_and_chat_template(llama_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    engine = LLMEngine(EngineConfig(model=str(llama_dir), progress=False, kv_cache_tokens=1024, max_model_len=40,
                                    chat_template=str(template)))
    assert engine.max_model_len == 40
    assert engine.chat_prompt([{"role": "user", "content": "the cat"}]) == engine.tokenize("the cat ")
    engine._set_chat_template("{{ messages[0]['content'] }} dog")
    assert engine.chat_prompt([{"role": "user", "content": "the cat"}]) == engine.tokenize("the cat dog")
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        engine._set_chat_template("no/such/template.jinja")
    with pytest.raises(ValueError, match=f"max_model_len 4096 is beyond {llama_dir.name}'s context of 512 tokens"):
        LLMEngine(EngineConfig(model=str(llama_dir), progress=False, kv_cache_tokens=1024, max_model_len=4096))
    with pytest.raises(ValueError, match="max_model_len 500 does not fit the KV pool of 256 tokens"):
        LLMEngine(EngineConfig(model=str(llama_dir), progress=False, kv_cache_tokens=256, max_model_len=500))
    with pytest.raises(ValueError, match="max_model_len must be an integer >= 2"):
        EngineConfig(max_model_len=0).validate()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "--port must be from 0 to 65535"),
    (["serve", "--port", "-1"], "--port must be from 0 to 65535"),
    (["serve", "--shutdown-timeout", "-5"], "--shutdown-timeout must be a number of seconds >= 0"),
])
def test_serve_refuses_bad_arguments_before_loading(argv, message, capsys):
    # the model does not exist: had it been loaded first, the error would be about the model
    assert main([*argv, "--model", "/no/such/model"]) == 1
    err = capsys.readouterr().err
    assert err == f"idlm: error: {err.split('idlm: error: ')[1]}" and message in err


@pytest.mark.parametrize("argv, usage", [(["serve", "--prot", "8000"], "usage: idlm serve"),
                                         (["eval", "alpha", "p.txt", "--tempreature", "1"], "usage: idlm eval alpha"),
                                         (["generate", "hi", "--max-tokns", "3"], "usage: idlm generate")])
def test_unknown_option_shows_its_commands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "unrecognized arguments" in err


def test_generate_reads_the_prompt_from_stdin(llama_dir, monkeypatch, capsys):
    argv = ["--model", str(llama_dir), "--max-tokens", "5", "--ignore-eos", "--kv-cache-tokens", "1024"]
    assert main(["generate", "the cat sat", *argv]) == 0
    direct = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\n"))
    assert main(["generate", "-", *argv]) == 0
    assert capsys.readouterr().out == direct


def test_stats_show_what_applies(model_dirs, capsys):
    sdar = str(model_dirs["sdar"][0])
    common = ["--max-tokens", "8", "--ignore-eos", "--stats", "--kv-cache-tokens", "1024"]
    assert main(["generate", "the cat sat", "--model", sdar, "--mode", "ar", *common]) == 0
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("[stats]"))
    assert len(err.splitlines()) == 1
    for field in ("mode=ar", "finish=length", "prompt_tokens=3", "tokens=8", "ttft=", "prefill=", "decode="):
        assert field in err
    assert "stride" not in err and "proposal" not in err and "acceptance" not in err
    assert main(["generate", "the cat sat", "--model", sdar, "--mode", "isd", "--stride-policy", "fixed",
                 "--branches", "0", *common]) == 0
    err = capsys.readouterr().err
    assert "stride=4 stride_policy=fixed proposal=sample" in err
    assert re.search(r"acceptance by position=[01]\.\d\d [01]\.\d\d [01]\.\d\d\n", err)
    assert "branch" not in err
    assert main(["generate", "the cat sat", "--model", str(model_dirs["llama"][0]), "--mode", "isd"]) == 1
    assert "mode isd needs an I-DLM checkpoint" in capsys.readouterr().err


def test_chat_commands(monkeypatch, capsys, llama_dir):
    lines = iter(["/help", "hello world", "/reste", "/reset", " /slash is sent", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    sent = []
    real = LLMEngine.chat_prompt

    def recorded(self, history):
        sent.append(list(history))
        return real(self, history)

    monkeypatch.setattr(LLMEngine, "chat_prompt", recorded)
    assert main(["chat", "--model", str(llama_dir), "--max-tokens", "3", "--kv-cache-tokens", "1024"]) == 0
    err = capsys.readouterr().err
    assert "/reset" in err and "/help" in err and "/exit" in err
    assert "unknown command /reste; /help lists the commands" in err
    assert "(conversation forgotten)" in err
    assert [[m["content"] for m in history if m["role"] == "user"] for history in sent] == [
        ["hello world"], ["/slash is sent"]]


def test_gguf_model_is_named_by_its_file(tmp_path):
    from idlm.models.loader import DEFAULT_MODEL_NAME, model_name

    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(b"")
    assert model_name(str(gguf)) == "Tiny.Q4_1"
    assert model_name(None) == DEFAULT_MODEL_NAME
    (tmp_path / "folder").mkdir()
    assert model_name(str(tmp_path / "folder")) == "folder"


def test_serve_takes_vllm_options(monkeypatch):
    from idlm.cli import build_parser
    from idlm.cli.options import engine_args
    from idlm.cli.serve import api_key

    args = build_parser().parse_args(["serve", "org/model", "--max-model-len", "2048", "--chat-template", "t.jinja",
                                      "--generation-config", "vllm", "--max-num-batched-tokens", "512",
                                      "--gpu-memory-utilization", "0.5", "--enforce-eager",
                                      "--no-overlap-scheduling"])
    assert engine_args(args, model=args.model_path) == {
        "model": "org/model", "device": "auto", "dtype": "auto", "quantization": "auto", "max_model_len": 2048,
        "chat_template": "t.jinja", "generation_config": "vllm", "max_num_batched_tokens": 512,
        "gpu_memory_utilization": 0.5, "enforce_eager": True, "overlap_scheduling": False, "max_num_seqs": 64,
        "proposal": "sample"}
    monkeypatch.delenv("IDLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert api_key(args) is None
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert api_key(args) == "from-vllm"
    monkeypatch.setenv("IDLM_API_KEY", "from-idlm")
    assert api_key(args) == "from-idlm"
    assert api_key(build_parser().parse_args(["serve", "--api-key", "given"])) == "given"
