"""Tensor parallelism on the CPU: 2 processes over gloo give the tokens of 1 (fp32), for ar, isd and
risd, greedy and seeded; a killed worker ends the engine with a clear error within seconds."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_model, make_random_adapter, serve_process
from server_helpers import MODEL, Server, assert_openai_error

from idlm import LLM, SamplingParams
from idlm.config import EngineConfig
from idlm.engine.kv_pool import MAX_LOOKAHEAD
from idlm.engine.tensor_parallel import EngineDead, check_tensor_parallel, rank_devices
from idlm.models.config import ModelConfig
from idlm.models.parallel import check_shardable

MASK = 3  # <|mask|> of the test tokenizer
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40]]
GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, stride=4, stride_policy="fixed")
SEEDED = dict(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, stride=4)


def package(kind: str, folder, **overrides):
    """A tiny random model with a MASK id (so isd runs) and a random gated-LoRA adapter (risd)."""
    make_model(folder / "model", kind, **overrides)
    path = folder / "model" / "config.json"
    raw = json.loads(path.read_text())
    raw.setdefault("mask_token_id", MASK)
    path.write_text(json.dumps(raw))
    make_random_adapter(folder / "model", folder / "adapter", mask_token_id=MASK)
    return folder / "model", folder / "adapter"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return package("sdar", tmp_path_factory.mktemp("tp-qwen3"))  # 4 heads, 2 KV heads: one each


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return package("llama", tmp_path_factory.mktemp("tp-llama"), num_key_value_heads=1)  # the KV head replicated


def engine(model, tp: int) -> LLM:
    folder, adapter = model
    return LLM(str(folder), adapter=str(adapter), tensor_parallel_size=tp, progress=False, kv_cache_tokens=2048,
               max_num_seqs=8)


def outputs(llm: LLM) -> dict:
    out = {}
    for mode in ("ar", "isd", "risd"):
        out[mode] = llm.generate(PROMPTS, SamplingParams(mode=mode, **GREEDY))
        out[f"{mode} seeded"] = llm.generate(PROMPTS, [SamplingParams(mode=mode, seed=i, **SEEDED)
                                                       for i in range(len(PROMPTS))])
    return out


def assert_same(one: dict, two: dict) -> None:
    for key, outs in one.items():
        assert [o.token_ids for o in two[key]] == [o.token_ids for o in outs], key
        for a, b in zip(outs, two[key]):
            for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs):
                assert lp_b == pytest.approx(lp_a, abs=1e-4), key
                assert [t for t, _ in top_b] == [t for t, _ in top_a], key
    assert [o.token_ids for o in one["ar"]] == [o.token_ids for o in one["isd"]] == [o.token_ids for o in one["risd"]]


@pytest.fixture(scope="module")
def llama_tp2(llama):
    llm = engine(llama, 2)
    yield llm
    llm.close()


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_two_ranks_give_the_tokens_of_one(name, request, monkeypatch):
    model = request.getfixturevalue(name)
    single = engine(model, 1)
    one = outputs(single)
    if name == "llama":
        two = outputs(request.getfixturevalue("llama_tp2"))
    else:
        llm = engine(model, 2)
        try:
            assert llm.engine.model.cfg.num_heads == 2 and llm.engine.model.cfg.num_kv_heads == 1
            two = outputs(llm)
            # the padded layout of CUDA graphs, run eagerly: every step goes to the worker packed, as on a GPU
            e = llm.engine
            e.runner.use_padded_decode(e.config.max_num_seqs, e.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
            assert_same(one, outputs(llm))
            # a step that fails on rank 0 may leave a worker inside a collective: the engine ends
            monkeypatch.setattr("idlm.engine.tensor_parallel.DEATH_GRACE_S", 0.2)
            monkeypatch.setattr(e.runner, "_launch_round", lambda *args, **kwargs: 1 / 0)
            e.add_request(PROMPTS[0], SamplingParams(max_tokens=4))
            with pytest.raises(EngineDead, match="failed on rank 0 .ZeroDivisionError"):
                e.step()
        finally:
            llm.close()
    assert_same(one, two)
    for mode in ("isd", "risd"):
        assert sum(o.stats["verify_rounds"] for o in two[mode]) > 0  # rounds with drafts ran on both ranks


def test_a_killed_worker_ends_the_engine_within_seconds(llama_tp2):
    engine = llama_tp2.engine
    worker = engine.tp.procs[0]
    for prompt in PROMPTS:
        engine.add_request(prompt, SamplingParams(mode="risd", temperature=0, max_tokens=400, ignore_eos=True))
    for _ in range(3):
        engine.step()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDead, match=r"worker rank 1 .* died") as err:
        while time.monotonic() - start < 30:
            engine.step()
    assert time.monotonic() - start < 20, err.value
    llama_tp2.close()  # does not hang on the dead peer


def test_a_hung_group_teardown_is_given_up_after_its_timeout(monkeypatch):
    """NCCL's teardown waits for every rank; a rank left alone must still get on (and exit)."""
    import threading

    import torch.distributed as dist

    from idlm.engine import tp_worker

    release, calls = threading.Event(), []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy") or release.wait(5))
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"))
    start = time.monotonic()
    assert tp_worker.end_group(graceful=True, timeout=0.3) is False
    assert time.monotonic() - start < 2 and calls == ["destroy"]
    release.set()
    assert tp_worker.end_group(graceful=False, timeout=2) is True and calls[-1] == "abort"  # a dead peer: abort


def test_close_frees_the_graphs_before_the_group_ends():
    """On two H200s a TP = 2 engine's close() waited 15 s and left the group behind (so no second
    engine could start in that process) until its captured graphs, which hold the NCCL
    communicator, were freed first."""
    from idlm.engine.llm_engine import LLMEngine

    calls = []
    engine = LLMEngine.__new__(LLMEngine)
    engine.runner = type("Runner", (), {"drop_graphs": lambda self: calls.append("drop graphs")})()
    engine.tp = type("TP", (), {"close": lambda self: calls.append("end group")})()
    engine.close()
    assert calls == ["drop graphs", "end group"]


def test_clear_errors_before_anything_starts(qwen3):
    cfg = ModelConfig.from_folder(qwen3[0])
    with pytest.raises(ValueError, match="4 attention heads.*tensor_parallel_size=3"):
        check_shardable(cfg, 3)
    with pytest.raises(ValueError, match="3 KV heads.*tensor_parallel_size=2 must divide"):
        check_shardable(ModelConfig.from_dict({**cfg_dict(qwen3), "num_key_value_heads": 3,
                                               "num_attention_heads": 6}), 2)
    check_shardable(ModelConfig.from_dict({**cfg_dict(qwen3), "num_key_value_heads": 1}), 4)  # replicated: fine
    with pytest.raises(ValueError, match="float weights only.*--quantization none"):
        check_tensor_parallel(cfg, 2, "int8", "tiny", None)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=r"asks for 2 GPUs .* lower --tensor-parallel-size"):
            rank_devices(torch.device("cuda"), 2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0).validate()
    with pytest.raises(ValueError, match="attention heads"):
        LLM(str(qwen3[0]), tensor_parallel_size=3, progress=False)  # refused before any worker starts


def cfg_dict(model) -> dict:
    return json.loads((model[0] / "config.json").read_text())


def test_bench_compares_tensor_parallel_sizes_in_one_call(tmp_path, monkeypatch, capsys):
    from idlm.cli import main

    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    assert main(["bench", "--shape", "tiny", "--device", "cpu", "--concurrency", "2", "--num-prompts", "2",
                 "--prompt-len", "8", "--output-len", "4", "--modes", "ar,isd", "--stride-policy", "fixed",
                 "-tp", "1,2", "-o", str(out)]) == 0
    assert "ar tp=2" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["tensor_parallel_size"]) for r in results] == [
        ("ar tp=1", 1), ("isd N=4 fixed tp=1", 1), ("ar tp=2", 2), ("isd N=4 fixed tp=2", 2)]
    assert all(r["output_tokens"] == 8 for r in results)


def spawned_workers(pid: int) -> list[int]:
    """The tensor-parallel workers among a process's children (not multiprocessing's resource tracker)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    cmdlines = {c: Path(f"/proc/{c}/cmdline").read_bytes() for c in children}
    return [c for c, line in cmdlines.items() if b"spawn_main" in line and b"resource_tracker" not in line]


def test_the_server_answers_503_and_exits_when_a_worker_dies(qwen3, tmp_path):
    launcher = [sys.executable, "-m", "idlm"]  # the idlm of the working folder, as in this process
    log = tmp_path / "serve.log"
    with serve_process(qwen3[0], log, "--served-model-name", MODEL, "--tensor-parallel-size", "2", "--adapter", "none",
                       launcher=launcher) as (proc, url):
        s = Server(url, proc, log)
        body = {"model": MODEL, "prompt": "the cat", "max_tokens": 8, "temperature": 0, "mode": "ar"}
        assert s.post("/v1/completions", body, timeout=30).status_code == 200
        (worker,) = spawned_workers(s.proc.pid)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        r = s.post("/v1/completions", {**body, "max_tokens": 200, "ignore_eos": True}, timeout=30)
        error = assert_openai_error(r, 503, code="engine_not_ready")
        assert "worker rank 1" in error["message"] and "died" in error["message"]
        assert s.proc.wait(30) == 1
        assert time.monotonic() - start < 30
        assert "tensor-parallel worker rank 1" in s.log.read_text()
