"""Deterministic (batch-invariant) mode: the fixed splits' plans, the chunked attention against
the oracle, the flag through config, CLI and server, and on the CPU the end-to-end property
(a row's bits the same alone, batched and in risd rounds). The GPU kernels themselves are checked
by benchmarks/check_deterministic.py."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import make_random_adapter, make_small_idlm
from server_helpers import running_server
from test_quant import assert_rows_invariant, head_inputs, prompts_for

from idlm import LLM, SamplingParams
from idlm.bench.suite import BenchConfig
from idlm.cli import build_parser
from idlm.cli.options import engine_args
from idlm.config import EngineConfig
from idlm.kernels.attention import PagedAttention, PagedBatch
from idlm.kernels.cpu_gemm import RowTiledLinear
from idlm.kernels.fixed_split import (
    KV_CHUNK,
    MATMUL_BLOCK_K,
    chunked_attention,
    combine,
    kv_chunk_plan,
    matmul_chunks,
)
from idlm.kernels.row_attention import RowExactPagedAttention

# ---------------------------------------------------------------- the plans


@pytest.mark.parametrize("n, k", [(576, 576), (960, 576), (576, 1536), (6144, 4096), (4096, 4096),
                                  (24576, 4096), (4096, 12288), (151936, 4096), (100, 70)])
def test_matmul_chunks_cut_k_into_whole_blocks_in_order(n, k):
    chunk_k, num_chunks = matmul_chunks(n, k)
    assert chunk_k % MATMUL_BLOCK_K == 0
    bounds = [(c * chunk_k, min((c + 1) * chunk_k, k)) for c in range(num_chunks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    assert all(lo < hi for lo, hi in bounds)  # no empty chunk
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_big_weights_are_split_and_small_ones_are_not():
    assert matmul_chunks(576, 1536)[1] == 1  # SmolLM2's down_proj: read whole, no second launch
    assert matmul_chunks(4096, 4096)[1] > 1  # Qwen3-8B's o_proj: 64 column tiles, more programs along K
    assert matmul_chunks(151936, 4096)[1] == 1  # a head has programs enough


@pytest.mark.parametrize("max_context", [1, 255, 256, 257, 1000, 4096, 8192 + 64, 131072])
@pytest.mark.parametrize("wanted", [1, 2, 3, 7, 64, 500])
def test_kv_chunk_plan_covers_every_chunk_once(max_context, wanted):
    splits, per_split, total = kv_chunk_plan(wanted, max_context)
    assert total == math.ceil(max_context / KV_CHUNK)
    assert 1 <= splits <= max(1, wanted)
    covered = [c for s in range(splits) for c in range(s * per_split, min((s + 1) * per_split, total))]
    assert covered == list(range(total))  # each chunk by one program, every program some chunk


# ---------------------------------------------------------------- the chunked attention


def visible_keys(ctx: int, gen: torch.Generator) -> torch.Tensor:
    """A row's visibility: every key up to its own except, at random, some in a tree at the end."""
    mask = torch.ones(ctx, dtype=torch.bool)
    tree = int(torch.randint(0, min(ctx, 40), (1,), generator=gen))
    if tree > 1:
        mask[ctx - tree:ctx - 1] = torch.rand(tree - 1, generator=gen) < 0.5
    return mask


@pytest.mark.parametrize("ctx", [1, 63, 64, 255, 256, 257, 700, 1030])
def test_chunked_attention_equals_the_oracle(ctx):
    gen = torch.Generator().manual_seed(ctx)
    heads, dim = 4, 32
    q = torch.randn(heads, dim, generator=gen)
    keys, values = torch.randn(ctx, heads, dim, generator=gen), torch.randn(ctx, heads, dim, generator=gen)
    visible = visible_keys(ctx, gen)
    ours = chunked_attention(q, keys, values, visible)
    ref = F.scaled_dot_product_attention(q[:, None].double(), keys.transpose(0, 1).double(),
                                         values.transpose(0, 1).double(), attn_mask=visible[None, None])[:, 0]
    torch.testing.assert_close(ours.double(), ref, atol=2e-6, rtol=1e-5)


def test_chunked_attention_ignores_keys_a_row_does_not_see_bit_for_bit():
    """What lets a kernel tile read further than a row sees (later rows of its tile, a longer
    round, a longer prefill chunk): extra invisible keys, even whole chunks, change no bit."""
    gen = torch.Generator().manual_seed(0)
    heads, dim, ctx = 2, 16, 600
    q = torch.randn(heads, dim, generator=gen)
    keys, values = torch.randn(ctx + 300, heads, dim, generator=gen), torch.randn(ctx + 300, heads, dim, generator=gen)
    visible = visible_keys(ctx, gen)
    alone = chunked_attention(q, keys[:ctx], values[:ctx], visible)
    padded = chunked_attention(q, keys, values, torch.cat([visible, torch.zeros(300, dtype=torch.bool)]))
    assert torch.equal(alone, padded)


def test_where_the_chunks_start_changes_the_bits():
    """So the check above can fail: chunks placed by the sequence (as the normal mode's splits
    are) rather than at fixed positions give other last bits for some row."""
    gen = torch.Generator().manual_seed(1)
    heads, dim = 4, 32
    differ = 0
    for ctx in (300, 520, 777, 1000):
        q = torch.randn(heads, dim, generator=gen)
        keys, values = torch.randn(ctx, heads, dim, generator=gen), torch.randn(ctx, heads, dim, generator=gen)
        visible = torch.ones(ctx, dtype=torch.bool)
        differ += not torch.equal(chunked_attention(q, keys, values, visible),
                                  chunked_attention(q, keys, values, visible, chunk=128))
    assert differ


def test_combining_an_empty_chunk_is_exact():
    gen = torch.Generator().manual_seed(2)
    m, l_sum, acc = torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5, torch.randn(8, 16, generator=gen)
    empty = (torch.full((8,), -math.inf), torch.zeros(8), torch.zeros(8, 16))
    for merged in (combine(m, l_sum, acc, *empty), combine(*empty, m, l_sum, acc)):
        assert torch.equal(merged[0], m) and torch.equal(merged[1], l_sum) and torch.equal(merged[2], acc)


# ---------------------------------------------------------------- the flag


def test_config_validates_the_flag():
    assert EngineConfig().deterministic is False
    EngineConfig(deterministic=True).validate()
    with pytest.raises(ValueError, match="deterministic must be true or false"):
        EngineConfig(deterministic="yes").validate()


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve"], ["distill", "p.txt", "o.jsonl"]])
def test_cli_passes_the_flag_to_the_engine(command):
    parser = build_parser()
    assert engine_args(parser.parse_args(command + ["--deterministic"]))["deterministic"] is True
    assert "deterministic" not in engine_args(parser.parse_args(command))  # unset: EngineConfig's default


def test_bench_takes_the_flag(monkeypatch):
    from idlm.bench import suite
    from idlm.cli import bench

    seen = {}

    def fake_run(cfg, command, log):
        seen["cfg"], seen["command"] = cfg, command
        raise SystemExit(0)

    monkeypatch.setattr(suite, "run_bench", fake_run)
    args = build_parser().parse_args(["bench", "--shape", "tiny", "--deterministic"])
    with pytest.raises(SystemExit):
        bench.run(args)
    assert seen["cfg"].deterministic is True and "--deterministic" in seen["command"]
    assert BenchConfig().deterministic is False


@pytest.fixture(scope="module")
def float_idlm(tmp_path_factory):
    folder = make_small_idlm(tmp_path_factory.mktemp("fidlm"), spread=0.25, vocab=12)
    adapter = make_random_adapter(folder, tmp_path_factory.mktemp("fadapter"))
    return folder, adapter


def test_cpu_deterministic_rows_are_bit_identical_alone_batched_and_in_rounds(float_idlm):
    """float32 on the CPU: with the flag every projection and the head are row-tiled GEMMs and
    attention is row-exact, so each hidden row an ar request alone gives the head recurs bit for
    bit in a batch and in risd rounds; and greedy risd/isd equal ar."""
    folder, adapter = float_idlm
    llm = LLM(str(folder), adapter=str(adapter), quantization="none", deterministic=True, progress=False,
              kv_cache_tokens=4096)
    model = llm.engine.model
    assert isinstance(model.model.layers[0].mlp.down_proj, RowTiledLinear)
    assert isinstance(model.lm_head, RowTiledLinear)
    assert llm.engine.runner.cpu_attention is RowExactPagedAttention
    assert_rows_invariant(llm)
    prompts = prompts_for(8, 12, seed=8)
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))]
    for mode in ("isd", "risd"):
        outs = llm.generate(prompts, SamplingParams(mode=mode, stride=4, stride_policy="fixed", **greedy))
        assert [o.token_ids for o in outs] == ar


def test_cpu_rows_without_the_flag_depend_on_the_batch(float_idlm):
    """The same check fails without the flag (padded SDPA and the BLAS GEMMs of the normal mode),
    so the test above tests something."""
    folder, adapter = float_idlm
    llm = LLM(str(folder), adapter=str(adapter), quantization="none", progress=False, kv_cache_tokens=4096)
    prompts = prompts_for(8, 12, seed=8)
    greedy = dict(temperature=0, max_tokens=24, ignore_eos=True)
    alone = head_inputs(llm, prompts, SamplingParams(mode="ar", **greedy), batched=False)
    risd = SamplingParams(mode="risd", stride=4, stride_policy="fixed", **greedy)
    assert not alone <= head_inputs(llm, prompts, risd, batched=True)


def test_server_reports_the_flag(float_idlm, tmp_path):
    folder, _ = float_idlm
    with running_server(folder, tmp_path / "serve.log", "--deterministic", "--quantization", "none") as server:
        assert server.get("/version").json()["deterministic"] is True
        assert "deterministic" in server.log.read_text()


# ---------------------------------------------------------------- the Triton kernels, interpreted


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on the CPU need triton and "
                    "TRITON_INTERPRET=1 (the GPU check is benchmarks/check_deterministic.py)")
def test_triton_kernels_in_the_interpreter():
    """The kernels' chunk logic: one program per chunk (partials, then a second kernel) gives the
    same bits as one program walking every chunk, and both are close to the oracle."""
    pytest.importorskip("triton")
    from idlm.kernels import batch_invariant as bi
    from idlm.kernels.triton_attention import paged_attention

    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(70, 600, generator=gen), torch.randn(130, 600, generator=gen), torch.randn(130, generator=gen)
    walked = bi.matmul(x, w, b, chunking=(320, 2), partials=False)
    assert torch.equal(bi.matmul(x, w, b, chunking=(320, 2), partials=True), walked)
    torch.testing.assert_close(walked, F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    page, heads, kv_heads, dim = 16, 6, 2, 16
    ctxs, q_len = [700, 300], 7
    tables = torch.arange(sum(-(-c // page) for c in ctxs)).split([-(-c // page) for c in ctxs])
    block_tables = torch.stack([F.pad(t, (0, 44 - len(t))) for t in tables]).int()
    cache = torch.randn(2, 1, 64, page, kv_heads, dim, generator=gen)
    q = torch.randn(2 * q_len, heads, dim, generator=gen)
    starts = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32)
    outs = [paged_attention(q, cache[0, 0], cache[1, 0], block_tables, starts, torch.tensor(ctxs, dtype=torch.int32),
                            q_len, max(ctxs), num_splits=s, kv_chunk=KV_CHUNK) for s in (1, 2, 3)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    batch = PagedBatch(slot_mapping=torch.full((2 * q_len,), -1), query_start=starts.tolist(),
                       context_lens=torch.tensor(ctxs), block_tables=block_tables, max_context_len=max(ctxs),
                       max_query_len=q_len, all_written=False)
    empty = torch.zeros(2 * q_len, kv_heads, dim)
    torch.testing.assert_close(outs[0], PagedAttention(cache, batch)(0, q, empty, empty), atol=1e-5, rtol=1e-5)
