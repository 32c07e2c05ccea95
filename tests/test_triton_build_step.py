"""The one-kernel build of a device-built decode step (kernels/triton_build_step.py) against
next_step.build_step, in Triton's interpreter on the CPU (on the GPU every step built from a carry
runs it inside its graph)."""

import os

import pytest
import torch

from idlm.config import MAX_STRIDE
from idlm.decoding.layout import max_branches
from idlm.engine.next_step import LayoutTable, SlotState, build_step

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton kernels on the CPU need triton and TRITON_INTERPRET=1")


def random_bucket(gen: torch.Generator, bucket: int, real: int, width: int, block_size: int):
    """A carry and plan over a whole bucket as the decode graph's static buffers hold them: `real`
    requests with consistent plans, then padding entries with stale carries (valid 0)."""
    kmax = MAX_STRIDE - 1
    rand = lambda hi, *shape: torch.randint(0, hi, shape, generator=gen)  # noqa: E731
    k = rand(4, bucket)
    num_drafts = torch.minimum(rand(4, bucket), k) * (rand(3, bucket) > 0)
    branches = torch.stack([torch.randint(0, max_branches(int(x), int(x)) + 1, (), generator=gen) for x in k])
    start = rand(width * block_size - 70, bucket)
    carry = torch.cat([torch.stack([rand(50, bucket), start, num_drafts], 1), rand(50, bucket, kmax)], 1)
    valid = (torch.arange(bucket) < real).long()
    plan = torch.stack([k * valid, branches * valid, rand(50, bucket), rand(2, bucket), valid])
    tables = torch.randint(0, 200, (bucket, width), generator=gen, dtype=torch.int32)
    return carry, plan, tables


@pytest.mark.parametrize("seed", range(6))
def test_build_step_kernel_writes_build_steps_rows(seed):
    pytest.importorskip("triton")
    from idlm.kernels.triton_build_step import build_step_into

    gen = torch.Generator().manual_seed(seed)
    layouts = LayoutTable.build(MAX_STRIDE - 1, "cpu")
    bucket, real, width, block_size, scratch = [(4, 3, 6, 16, 999), (8, 8, 5, 32, 7), (3, 1, 9, 8, 12)][seed % 3]
    tokens = [16, 4, 1, 9, 16, 3][seed]
    carry, plan, tables = random_bucket(gen, bucket, real, width, block_size)
    k, branches, mask_id, gated, valid = plan
    state = SlotState.from_carry(carry, k, branches, mask_id, gated.bool(), valid.bool())
    want = build_step(state, layouts, tables, tokens, bucket, block_size, scratch)
    rows = bucket * tokens + 5  # the graph's buffers are longer than a step: the rest stays untouched
    out = dict(ids=torch.full((rows,), -7), positions=torch.full((rows,), -7), slots=torch.full((rows,), -7),
               gate=torch.full((rows,), -7.0), tree_bits=torch.full((rows,), -7),
               context_lens=torch.full((bucket + 2,), -7, dtype=torch.int32),
               tree_rows=torch.full((bucket + 2,), -7, dtype=torch.int32))
    build_step_into(carry, plan, layouts, tables, tokens, block_size, scratch, layouts.is_mask.to(torch.int8), out)
    n = bucket * tokens
    for name in ("ids", "positions", "slots", "tree_bits"):
        assert torch.equal(out[name][:n], getattr(want, name)), name
        assert (out[name][n:] == -7).all(), name
    assert torch.equal(out["gate"][:n], want.gate.float())
    assert torch.equal(out["context_lens"][:bucket], want.context_lens.int())
    assert torch.equal(out["tree_rows"][:bucket], want.tree_rows.int())
    assert (out["context_lens"][bucket:] == -7).all()


@pytest.mark.parametrize("overlap", [False, True])
def test_an_engine_building_its_steps_with_the_kernels_decodes_as_the_plain_path(tmp_path, overlap):
    """The padded layout (eager, on the CPU) with every device-built step's rows, and with overlap
    scheduling the round's integers of every step launched ahead, from the kernels: greedy mixed
    ar/isd/risd requests equal the plain path's ar tokens, and seeded sampled ones the plain
    path's."""
    pytest.importorskip("triton")
    from helpers import make_random_adapter, make_small_idlm
    from test_decode_graphs import mixed_params
    from test_isd import prompts_for

    from idlm import LLM, SamplingParams
    from idlm.engine.kv_pool import MAX_LOOKAHEAD

    model = make_small_idlm(tmp_path / "m", spread=0.25, vocab=12)
    adapter = make_random_adapter(model, tmp_path / "a")
    prompts = prompts_for(12, 12, seed=3, lo=5, hi=30)
    plain = LLM(str(model), adapter=str(adapter), progress=False, kv_cache_tokens=8192, max_num_seqs=16)
    padded = LLM(str(model), adapter=str(adapter), progress=False, kv_cache_tokens=8192, max_num_seqs=16,
                 overlap_scheduling=overlap)
    engine = padded.engine
    engine.runner.use_padded_decode(16, engine.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
    graphs = engine.runner.decode_graphs
    graphs.build_kernel = True
    built, rounds = [], []
    original, original_builder = graphs._build_from_carry, graphs.round_inputs_builder
    graphs._build_from_carry = lambda *a: built.append(a) or original(*a)
    graphs.round_inputs_builder = lambda *a: rounds.append(a) or original_builder(*a)
    greedy = mixed_params(len(prompts), temperature=0, max_tokens=24, ignore_eos=True)
    ar = [o.token_ids for o in plain.generate(prompts, SamplingParams(mode="ar", temperature=0, max_tokens=24,
                                                                      ignore_eos=True))]
    assert [o.token_ids for o in padded.generate(prompts, greedy)] == ar
    assert len(built) > 10 and (len(rounds) > 10) == overlap  # the kernels built most steps
    sampled = mixed_params(len(prompts), temperature=1.0, top_k=8, max_tokens=24, ignore_eos=True)
    for i, p in enumerate(sampled):
        p.seed = 100 + i
    assert ([o.token_ids for o in padded.generate(prompts, sampled)]
            == [o.token_ids for o in plain.generate(prompts, sampled)])


@pytest.mark.parametrize("seed", range(6))
def test_round_inputs_kernel_writes_built_round_inputs(seed):
    pytest.importorskip("triton")
    from idlm.engine.round_step import RoundShape, built_round_inputs
    from idlm.kernels.triton_build_step import round_inputs_into

    gen = torch.Generator().manual_seed(seed)
    bucket, real, width, block_size = [(4, 3, 6, 16), (8, 8, 5, 32), (3, 1, 9, 8)][seed % 3]
    tokens = [16, 4, 1, 9, 16, 3][seed]
    dmax = [3, 0, 1, 2, 3, 3][seed]
    carry, plan, _ = random_bucket(gen, bucket, real, width, block_size)
    plan[0] = torch.minimum(plan[0], torch.tensor(dmax))  # (the round's D is the batch's largest K)
    constants = torch.randint(0, 1000, (4 * bucket,), generator=gen)
    shape = RoundShape(bucket, dmax, dmax, True, False, False)
    k, branches, mask_id, gated, valid = plan
    state = SlotState.from_carry(carry, k, branches, mask_id, gated.bool(), valid.bool())
    want = built_round_inputs(state, constants.view(4, bucket), tokens, shape)
    out = torch.full((sum(shape.int_sizes()),), -7)
    assert torch.equal(round_inputs_into(carry, plan, constants, tokens, dmax, out), want)


def test_a_build_kernel_that_fails_falls_back_to_torch_ops_with_a_warning(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    """A Triton compile error on some GPU must not fail every decode step: the build falls back."""
    from helpers import make_random_adapter, make_small_idlm
    from test_decode_graphs import mixed_params, padded_llm
    from test_isd import prompts_for

    import idlm.kernels.triton_build_step as kernels
    from idlm import LLM, SamplingParams

    def broken(*args):
        raise RuntimeError("no such instruction")

    monkeypatch.setattr(kernels, "build_step_into", broken)
    model = make_small_idlm(tmp_path / "m", spread=0.25, vocab=12)
    adapter = make_random_adapter(model, tmp_path / "a")
    prompts = prompts_for(4, 12, seed=3, lo=5, hi=30)
    padded = padded_llm(model, adapter, kv_cache_tokens=4096, max_num_seqs=8)
    padded.engine.runner.decode_graphs.build_kernel = True
    plain = LLM(str(model), adapter=str(adapter), progress=False, kv_cache_tokens=4096, max_num_seqs=8)
    greedy = mixed_params(len(prompts), temperature=0, max_tokens=16, ignore_eos=True)
    with pytest.warns(RuntimeWarning, match="Triton build kernels failed"):
        outs = [o.token_ids for o in padded.generate(prompts, greedy)]
    assert not padded.engine.runner.decode_graphs.build_kernel
    assert outs == [o.token_ids for o in plain.generate(prompts, SamplingParams(mode="ar", temperature=0,
                                                                                max_tokens=16, ignore_eos=True))]
