"""The padded [bucket, T] decode layout that CUDA graphs replay, checked eagerly on the CPU:
padding rows (short feeds, and extra sequences filling a bucket) must not change any output."""

import itertools

import pytest
from helpers import make_random_adapter, make_small_idlm
from test_isd import SHAPES, prompts_for

from idlm import LLM, SamplingParams
from idlm.engine.decode_graphs import DecodeGraphs
from idlm.engine.kv_pool import MAX_LOOKAHEAD


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model = make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)
    return model, make_random_adapter(model, tmp_path_factory.mktemp("adapter"))


def padded_llm(model, adapter, **kwargs) -> LLM:
    llm = LLM(str(model), adapter=str(adapter), progress=False, **kwargs)
    engine = llm.engine
    engine.runner.use_padded_decode(engine.config.max_num_seqs, engine.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
    return llm


def mixed_params(n: int, **kw) -> list[SamplingParams]:
    modes = itertools.cycle(itertools.product(("ar", "isd", "risd"), (2, 3, 4, 8), SHAPES))
    return [SamplingParams(mode=m, stride=s, **SHAPES[shape], **kw) for m, s, shape in itertools.islice(modes, n)]


def test_buckets_cover_every_batch_size():
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.buckets = [b for b in (1, 2, 4, 8, 12) if b < 10] + [10]
    assert [graphs.bucket_for(n) for n in (1, 3, 8, 9, 10, 11)] == [1, 4, 8, 10, 10, None]


def test_padded_decode_equals_plain_decode(dirs):
    model, adapter = dirs
    prompts = prompts_for(30, 12, seed=3, lo=5, hi=40)
    plain = LLM(str(model), adapter=str(adapter), progress=False, kv_cache_tokens=8192, max_num_seqs=64)
    padded = padded_llm(model, adapter, kv_cache_tokens=8192, max_num_seqs=64)
    steps = []
    runner = padded.engine.runner
    original = runner.decode_graphs.run
    runner.decode_graphs.run = lambda *a: steps.append(len(a[0])) or original(*a)
    greedy = mixed_params(len(prompts), temperature=0, max_tokens=40, ignore_eos=True)
    ar = [o.token_ids for o in plain.generate(prompts, SamplingParams(mode="ar", temperature=0, max_tokens=40,
                                                                      ignore_eos=True))]
    assert [o.token_ids for o in padded.generate(prompts, greedy)] == ar
    assert steps and any(n not in runner.decode_graphs.buckets for n in steps)  # buckets really were padded
    sampled = mixed_params(len(prompts), temperature=1.0, top_k=8, seed=11, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(sampled):
        p.seed = 100 + i
    assert ([o.token_ids for o in padded.generate(prompts, sampled)]
            == [o.token_ids for o in plain.generate(prompts, sampled)])


def test_padded_decode_with_preemption_frees_every_block(dirs):
    model, adapter = dirs
    prompts = prompts_for(14, 12, seed=9, lo=10, hi=40)
    greedy = dict(temperature=0, max_tokens=48, ignore_eos=True)
    tight = padded_llm(model, adapter, kv_cache_tokens=320, kv_block_size=8, max_num_seqs=16)
    ar = [o.token_ids for o in tight.generate(prompts, SamplingParams(mode="ar", **greedy))]
    outs = tight.generate(prompts, mixed_params(len(prompts), **greedy))
    assert sum(o.stats["preemptions"] for o in outs) > 0
    assert [o.token_ids for o in outs] == ar
    bm = tight.engine.block_manager
    assert bm.num_free == len(bm.blocks)
    assert tight.engine.runner.kv_cache.shape[2] == len(bm.blocks) + 1  # the scratch block is outside the pool


def test_steps_without_mask_rows_skip_the_lora(dirs):
    """An ar batch on a model with an adapter runs the padded step without the LoRA (its delta
    would be zero on every row); a risd batch runs it with the LoRA on its MASK rows."""
    model, adapter = dirs
    llm = padded_llm(model, adapter, kv_cache_tokens=4096, max_num_seqs=8)
    graphs = llm.engine.runner.decode_graphs
    seen = []
    original = graphs._forward
    graphs._forward = lambda bucket, tokens, lora, tree, *rest: (seen.append((tokens, lora))
                                                                 or original(bucket, tokens, lora, tree, *rest))
    prompts = prompts_for(4, 12, seed=5, lo=5, hi=20)
    llm.generate(prompts, SamplingParams(mode="ar", temperature=0, max_tokens=6, ignore_eos=True))
    assert seen and all(not lora for _, lora in seen)
    seen.clear()
    llm.generate(prompts, SamplingParams(mode="risd", stride=3, temperature=0, max_tokens=6, ignore_eos=True,
                                         stride_policy="fixed"))
    assert seen and all(lora for tokens, lora in seen if tokens > 1)


def test_short_prefill_steps_take_the_padded_layout(dirs):
    """Prefill steps of at most PREFILL_BATCH prompts of at most PREFILL_ROWS[-1] rows run in the
    padded layout (prompt chunks and final chunks with their round), longer or larger ones
    eagerly, with the same tokens as the plain engine either way."""
    from idlm.engine.decode_graphs import PREFILL_BATCH, PREFILL_ROWS

    model, adapter = dirs
    # six short prompts arrive together (one prefill step of more than PREFILL_BATCH), then long ones
    prompts = prompts_for(6, 12, seed=4, lo=2, hi=20) + prompts_for(4, 12, seed=5, lo=150, hi=240)
    kw = dict(kv_cache_tokens=8192, max_num_seqs=8, max_num_batched_tokens=200)  # chunks the long ones
    plain = LLM(str(model), adapter=str(adapter), progress=False, **kw)
    padded = padded_llm(model, adapter, **kw)
    runner = padded.engine.runner
    original, steps = runner.decode_graphs.run, []
    runner.decode_graphs.run = lambda feeds, starts, tables, tokens: (
        steps.append((len(feeds), tokens)) or original(feeds, starts, tables, tokens))
    prefills = []
    padded.engine.scheduler.on_schedule = lambda batch: batch.is_prefill and prefills.append(batch.num_new_tokens)
    greedy = mixed_params(len(prompts), temperature=0, max_tokens=12, ignore_eos=True)
    ar = [o.token_ids for o in plain.generate(prompts, SamplingParams(mode="ar", temperature=0, max_tokens=12,
                                                                      ignore_eos=True))]
    assert [o.token_ids for o in padded.generate(prompts, greedy)] == ar
    wide = [n for n, t in steps if t > runner.decode_graphs.max_tokens]
    assert wide and all(n <= PREFILL_BATCH for n in wide)  # chunks of long prompts took the layout
    assert max(map(len, prefills)) > PREFILL_BATCH  # and a step of more prompts did not
    assert len([t for _, t in steps if t in PREFILL_ROWS]) < len(prefills)
    sampled = mixed_params(len(prompts), temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    for i, p in enumerate(sampled):
        p.seed = 200 + i
    assert ([o.token_ids for o in padded.generate(prompts, sampled)]
            == [o.token_ids for o in plain.generate(prompts, sampled)])


def test_round_inputs_put_each_value_where_its_name_says():
    """round_inputs lays a round out by name in fixed shapes: each request's values at its index,
    rows past its own drafts repeating its pending row, requests past the batch greedy and
    draftless. A field written under the wrong name or offset shows here."""
    import torch

    from idlm.engine.round_step import FLOATS, INTS, round_inputs, round_shape
    from idlm.engine.sequence import Sequence

    def seq(tokens, drafts, num_new, branches, **params):
        s = Sequence(tokens, SamplingParams(mode="isd", stride=4, proposal="sample", **params), seed=7 + len(tokens))
        s.drafts, s.num_new, s.num_branches = drafts, num_new, branches
        return s

    a = seq([1, 2, 3], [5, 6], 2, 1, temperature=0.5, top_k=3)
    b = seq([1, 2, 3, 4, 5], [], 3, 0, temperature=0, top_p=0.9)
    shape = round_shape([a, b], batch=4, pad_drafts=True)
    assert (shape.batch, shape.dmax, shape.kmax) == (4, 3, 3)
    assert not shape.all_greedy and shape.needs_filter and not shape.use_min_p
    ints, floats = round_inputs([a, b], [10, 40], shape)
    t = dict(zip(INTS, torch.tensor(ints).split(shape.int_sizes())))
    f = dict(zip(FLOATS, torch.tensor(floats).split(shape.batch)))
    assert t["target_rows"].view(4, 4).tolist() == [[10, 11, 12, 10], [40, 40, 40, 40], [0] * 4, [0] * 4]
    assert t["drafts"].view(4, 3).tolist() == [[5, 6, 0], [0] * 3, [0] * 3, [0] * 3]
    assert t["num_drafts"].tolist() == [2, 0, 0, 0] and t["num_new"].tolist() == [2, 3, 0, 0]
    assert t["branches"].tolist() == [1, 0, 0, 0]
    assert t["main_rows"].tolist()[:2] == [10 + a.layout.new_drafts_row, 40 + b.layout.new_drafts_row]
    assert t["branch_rows"].tolist()[:2] == [10 + 3 + 2, 40 + 1 + 3]
    assert t["seeds"].tolist()[:2] == [a.seed, b.seed] and t["positions"].tolist()[:2] == [2, 4]
    assert t["spec_verify"].tolist() == [1, 1, 1, 1] and t["top_k"].tolist() == [3, 0, 0, 0]
    assert f["temperature"].tolist() == [0.5, 0, 0, 0]
    assert f["top_p"].tolist() == pytest.approx([1.0, 0.9, 1.0, 1.0])
    assert f["verify_alpha"].tolist() == [1.0] * 4 and f["min_p"].tolist() == [0.0] * 4


def test_widened_lora_in_the_padded_layout(dirs):
    """The widened LoRA path (GPU engines: A stacked under the base weight) keeps greedy risd
    equal to ar and seeded risd equal to the two-weight engine's, in the padded layout."""
    from idlm.models.lora import widen_for_inference

    model, adapter = dirs
    prompts = prompts_for(12, 12, seed=7, lo=5, hi=30)
    plain = padded_llm(model, adapter, kv_cache_tokens=8192, max_num_seqs=16)
    wide = padded_llm(model, adapter, kv_cache_tokens=8192, max_num_seqs=16)
    widen_for_inference(wide.engine.model)
    greedy = dict(temperature=0, max_tokens=32, ignore_eos=True)
    ar = [o.token_ids for o in plain.generate(prompts, SamplingParams(mode="ar", **greedy))]
    risd = [SamplingParams(mode="risd", stride=s, stride_policy="fixed", **greedy) for s in (2, 3, 4, 8) * 3]
    outs = wide.generate(prompts, risd)
    assert [o.token_ids for o in outs] == ar
    assert sum(sum(o.stats["drafts"]["accepted"]) for o in outs) > 0  # the MASK rows' drafts were used
    sampled = [SamplingParams(mode="risd", stride=4, temperature=1.0, seed=50 + i, max_tokens=32, ignore_eos=True)
               for i in range(len(prompts))]
    assert ([o.token_ids for o in wide.generate(prompts, sampled)]
            == [o.token_ids for o in plain.generate(prompts, sampled)])


def test_logits_written_into_a_shared_buffer_are_the_heads_own(dirs):
    """The decode graphs write every step's logits into one buffer (a graph per shape holding its
    own once ran a GPU out of memory): the plain head's GEMM writes there itself, any other head
    is copied; either way the bits of model.logits."""
    import torch

    from idlm.kernels.cpu_gemm import row_tiled_linear

    llm = LLM(str(dirs[0]), progress=False, kv_cache_tokens=1024)
    model = llm.engine.model
    hidden = torch.randn(5, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    buffer = torch.full((8, model.cfg.vocab_size), float("nan"))
    for head in (model.lm_head, row_tiled_linear(model.lm_head)):
        model.lm_head = head
        out = model.logits(hidden, out=buffer[:5])
        assert out.data_ptr() == buffer.data_ptr() and torch.equal(out, model.logits(hidden))
        assert buffer[5:].isnan().all()
