"""`idlm bench` end to end on the tiny random shape, the random-weight loader, and bad input."""

import json
import time

import pytest
import torch

from idlm.cli import build_parser, main
from idlm.config import EngineConfig
from idlm.engine.llm_engine import LLMEngine
from idlm.engine.sampling_params import SamplingParams
from idlm.models.config import ModelConfig
from idlm.models.loader import load_model
from idlm.models.shapes import RANDOM_WEIGHTS_KEY, shape_config, shape_folder
from idlm.models.transformer import CausalLM

TINY_RUN = ["bench", "--shape", "tiny", "--device", "cpu", "--concurrency", "1,2", "--num-prompts", "3",
            "--prompt-len", "8", "--output-len", "5"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))


def no_mask_folder(tmp_path):
    """The tiny shape without a MASK token: random weights, ar (and risd) only."""
    folder = tmp_path / "no-mask"
    folder.mkdir()
    raw = shape_config("tiny")
    del raw["mask_token_id"]
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_bench_end_to_end(tmp_path, capsys):
    out, plot = tmp_path / "r.json", tmp_path / "p.png"
    assert main([*TINY_RUN, "--modes", "ar,isd", "--stride-policy", "fixed,adaptive", "--hf-baseline", "-o", str(out),
                 "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert all(word in table for word in ("ar", "isd", "hf", "TTFT", "roofline"))
    result = json.loads(out.read_text())
    for key in ("command", "date", "device", "torch", "transformers", "model", "dtype", "model_info", "workload",
                "settings", "definitions", "results", "hf_baseline"):
        assert key in result
    assert result["command"].startswith("idlm bench") and "--shape tiny" in result["command"]
    assert result["random_weights"] and result["device"].startswith("cpu")
    assert [(r["mode"], r["concurrency"]) for r in result["results"]] == [
        ("ar", 1), ("ar", 2), ("isd N=4 fixed", 1), ("isd N=4 fixed", 2), ("isd N=4 adaptive", 1),
        ("isd N=4 adaptive", 2)]
    for r in result["results"]:
        assert r["num_requests"] == 3 and r["output_tokens"] == 15
        assert all(q["output_tokens"] == 5 and q["prompt_tokens"] == 8 for q in r["requests"])
        assert r["output_tok_s"] > 0 and r["per_request_tok_s"] > 0
        assert r["tokens_per_forward"] >= 1
        assert 0 <= r["ttft_s_p50"] <= r["ttft_s_p99"] and 0 < r["itl_s_p50"] <= r["itl_s_p99"]
        assert 0 < r["tbt_s_p50"] <= r["tbt_s_p99"]
        if r["mode"] == "ar":  # one token an output: the gap between outputs is the gap between tokens
            assert (r["tbt_s_p50"], r["tbt_s_p99"]) == (r["itl_s_p50"], r["itl_s_p99"])
        assert r["decode_steps"] > 0 and r["decode_step_s_mean"] > 0 and r["roofline_fraction"] > 0
        assert r["decode_batch_mean"] <= r["concurrency"]
        assert r["peak_memory_bytes"] is None
        shapes = r["decode_shapes"]
        assert sum(n for n, _ in shapes.values()) == r["decode_steps"]
        assert all(int(k.split("x")[0]) <= r["concurrency"] and sec > 0 for k, (_, sec) in shapes.items())
    assert all(r["tokens_per_forward"] == 1 for r in result["results"] if r["mode"] == "ar")
    # AR steps feed one row a request; fixed stride-4 rounds more
    assert all(k.endswith("x1") for r in result["results"] if r["mode"] == "ar" for k in r["decode_shapes"])
    assert any(not k.endswith("x1") for k in result["results"][2]["decode_shapes"])
    assert len(result["results"][2]["draft_acceptance"]) == 3  # stride 4: three draft positions
    assert not result["results"][2]["chosen_k"] and sum(result["results"][4]["chosen_k"].values()) > 0
    assert not result["results"][2]["priced_round_gain"]  # the fixed stride prices nothing
    assert all(gain > 0 for r in result["results"][4:] for gain in r["priced_round_gain"].values())
    assert result["results"][5]["priced_round_gain"]
    hf = result["hf_baseline"]
    assert [h["batch_size"] for h in hf] == [1, 2]
    assert all(h["output_tokens"] == 5 * h["batch_size"] and h["output_tok_s"] > 0 for h in hf)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_bench_open_loop_and_measured_bandwidth(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([*TINY_RUN, "--modes", "ar", "--concurrency", "1", "--request-rate", "200,2.5", "-o", str(out)]) == 0
    assert "200/s" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["settings"]["peak_bandwidth"] is None and result["peak_bandwidth_used"] > 1e8
    assert result["peak_bandwidth_source"].startswith("measured")
    closed, fast, slow = result["results"]
    assert closed["concurrency"] == 1 and "request_rate" not in closed
    assert (fast["concurrency"], fast["request_rate"], slow["request_rate"]) == (None, 200, 2.5)
    for r in (fast, slow):
        assert r["num_requests"] == 3 and r["output_tokens"] == 15 and 0 < r["itl_s_p50"] <= r["itl_s_p99"]
    # at 2.5 requests/s the three arrive over about a second: the run waits for them, the fast one does not
    assert slow["elapsed_s"] > 2 * fast["elapsed_s"]


def test_open_loop_adds_requests_at_their_times_and_counts_ttft_from_them(tmp_path):
    from idlm.bench.roofline import Roofline
    from idlm.bench.runner import poisson_arrivals, run_open_loop
    from idlm.bench.workload import Request

    engine = LLMEngine(EngineConfig(model=str(shape_folder("tiny")), device="cpu", kv_cache_tokens=512))
    roofline = Roofline.of(engine.model, 1e12, 1e12)
    params = SamplingParams(temperature=0, ignore_eos=True, mode="ar")
    added = []
    original = engine.add_request
    engine.add_request = lambda prompt, p: added.append(time.perf_counter()) or original(prompt, p)
    requests = [Request([5, 6, 7], 4) for _ in range(3)]
    start = time.perf_counter()
    result = run_open_loop(engine, requests, [0.0, 0.3, 0.31], params, roofline)
    # not before its time, nor long after (the loop adds due requests between steps of a few ms)
    assert all(due <= t - start < due + 0.15 for t, due in zip(added, [0.0, 0.3, 0.31]))
    assert result["num_requests"] == 3 and result["elapsed_s"] >= 0.31
    assert all(r["ttft_s"] >= 0 for r in result["requests"])
    gaps = [b - a for a, b in zip([0.0] + poisson_arrivals(4000, 50.0, 1), poisson_arrivals(4000, 50.0, 1))]
    assert poisson_arrivals(5, 50.0, 1) == poisson_arrivals(5, 50.0, 1)
    assert abs(sum(gaps) / len(gaps) - 1 / 50) < 0.002 and min(gaps) >= 0


def test_bench_file_workload_and_default_modes(tmp_path, capsys):
    """Token-id prompts from a file with their own max_tokens; without a MASK token only ar runs."""
    work = tmp_path / "w.jsonl"
    work.write_text('{"prompt_ids": [5, 6, 7], "max_tokens": 3}\n\n{"prompt": [9, 10, 11, 12, 13]}\n')
    out = tmp_path / "r.json"
    model = str(no_mask_folder(tmp_path))
    assert main(["bench", "--model", model, "--device", "cpu", "--workload", str(work),
                 "--concurrency", "1,2", "--output-len", "4", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["workload"]["kind"] == "file"
    # the file's lines, cycled to at least 4 C requests (fewer would measure mostly the tail)
    assert [(r["mode"], r["concurrency"], r["num_requests"]) for r in result["results"]] == [("ar", 1, 4),
                                                                                            ("ar", 2, 8)]
    for r in result["results"]:
        n = r["num_requests"] // 2
        assert sorted((q["prompt_tokens"], q["output_tokens"]) for q in r["requests"]) == [(3, 3)] * n + [(5, 4)] * n
    assert "under two batches" not in capsys.readouterr().err
    assert main(["bench", "--model", model, "--device", "cpu", "--workload", str(work),
                 "--concurrency", "2", "--num-prompts", "2", "--output-len", "4"]) == 0
    assert "C=2 runs 2 requests, under two batches" in capsys.readouterr().err


def test_random_weight_loader(tmp_path):
    folder = shape_folder("tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    cfg = ModelConfig.from_folder(folder)
    assert cfg.random_weights and cfg.mask_token_id == 255
    model = load_model(folder, torch.bfloat16, "cpu", progress=False)
    assert model.lm_head.weight.shape == (256, 64) and len(model.model.layers) == 2
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert 0.015 < model.model.layers[0].mlp.gate_up_proj.weight.float().std() < 0.025
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    again = load_model(folder, torch.bfloat16, "cpu", progress=False)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded: the same weights every time
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", kv_cache_tokens=512, progress=False))
    assert engine.tokenizer is None and engine.defaults["mode"] == "isd"
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished():
        outputs = engine.step()
    assert len(outputs[0].token_ids) == 6


@pytest.mark.parametrize("shape, params", [("qwen3-8b", 8_190_735_360), ("qwen3-0.6b", 596_049_920),
                                           ("smollm2-135m", 134_515_008)])
def test_shapes_have_the_real_models_sizes(shape, params):
    cfg = ModelConfig.from_folder(shape_folder(shape))
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert 0 <= cfg.mask_token_id < cfg.vocab_size and shape_config(shape)[RANDOM_WEIGHTS_KEY]


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0"], "--concurrency must be"),
    (["--concurrency", "1,x"], "--concurrency must be"),
    (["--modes", "ar,fast"], "unknown mode 'fast'"),
    (["--shape", "qwen9"], "unknown shape 'qwen9'"),
    (["--shape", "tiny", "--model", "x"], "not both"),
    (["--workload", "/nonexistent/w.jsonl"], "cannot read workload file"),
    (["--num-prompts", "2", "--concurrency", "1,4"], "at least the largest concurrency"),
    (["--stride", "1"], "strides must be"),
    (["--stride-policy", "fixed,fast"], "unknown stride policy 'fast'"),
    (["--branches", "16"], "branches must be"),
    (["--request-rate", "0"], "--request-rate must be"),
    (["--request-rate", "inf"], "--request-rate must be"),
    (["--peak-bandwidth", "fast"], "--peak-bandwidth must be auto or a positive number"),
    (["--output-len", "0"], "output-len must be"),
    (["-o", "/nonexistent/r.json"], "folder does not exist"),
    (["--shape", "tiny", "--prompt-len", "2000", "--output-len", "100"], "the model's context is 2048"),
    (["--shape", "tiny", "--workload", "w.jsonl", "--prompt-len", "8"], "--prompt-len is for random prompts"),
])
def test_bad_arguments_fail_cleanly(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("idlm: error:") and message in err and "\n" not in err


def test_bad_workloads_fail_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    for text, message in [('{"prompt": 3}\n', "bad.jsonl:1 needs"), ("not json\n", "bad.jsonl:1 is not JSON"),
                          ('{"prompt": "hi", "max_tokens": 0}\n', "max_tokens"), ("\n", "holds no requests"),
                          ('{"prompt": "text"}\n', "no tokenizer")]:
        bad.write_text(text)
        assert main(["bench", "--shape", "tiny", "--device", "cpu", "--workload", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("idlm: error:") and message in err


def test_isd_needs_a_mask_token(tmp_path, capsys):
    assert main(["bench", "--model", str(no_mask_folder(tmp_path)), "--device", "cpu", "--modes", "isd"]) == 1
    assert "mode isd needs" in capsys.readouterr().err


def test_bench_help():
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["bench", "--help"])
    assert info.value.code == 0


def test_bench_repeats_interleave_the_runs_on_one_engine(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main([*TINY_RUN, "--concurrency", "2", "--modes", "ar,isd", "--stride-policy", "fixed", "--repeats", "2",
                 "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["mode"], r["repeat"]) for r in result["results"]] == [
        ("ar #1", 1), ("isd N=4 fixed #1", 1), ("ar #2", 2), ("isd N=4 fixed #2", 2)]
    assert result["settings"]["repeats"] == 2
    assert all(r["num_requests"] == 3 and r["output_tokens"] == 15 for r in result["results"])
    capsys.readouterr()
    assert main([*TINY_RUN, "--repeats", "0"]) == 1
    assert "repeats must be a positive integer" in capsys.readouterr().err


def test_bench_overlap_both_ways_and_full_warmup(tmp_path, capsys):
    """--overlap-scheduling off,on runs each mode both ways on one engine, the second labelled;
    --warmup full warms up with the run itself. Bad values of either are refused."""
    out = tmp_path / "r.json"
    assert main([*TINY_RUN, "--concurrency", "2", "--modes", "ar", "--overlap-scheduling", "off,on",
                 "--warmup", "full", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["mode"], r["overlap_scheduling"]) for r in result["results"]] == [("ar", False), ("ar overlap", True)]
    assert result["settings"]["warmup"] == "full" and result["settings"]["overlap"] == [False, True]
    capsys.readouterr()
    assert main([*TINY_RUN, "--overlap-scheduling", "maybe"]) == 1
    assert "unknown setting 'maybe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*TINY_RUN, "--warmup", "long"])
