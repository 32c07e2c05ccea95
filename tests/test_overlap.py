"""Overlap scheduling (EngineConfig.overlap_scheduling): a decode step of the same requests is
launched before the host has read the outcome of the step before, its rows and its round's
inputs built on the device from that round's carry; where requests wait to join, their prefill is
launched instead. Checked on the CPU in the padded layout that
CUDA graphs replay: the same tokens as without it, greedy and seeded, through finishes, stop
tokens, arrivals, aborts and preemption, with every block back in the pool at the end."""

import itertools

import pytest
import torch
from helpers import (
    count_launches_after_prefill,
    count_launches_ahead,
    count_prefills_ahead,
    make_random_adapter,
    make_small_idlm,
)

from idlm import LLM, SamplingParams
from idlm.engine.kv_pool import MAX_LOOKAHEAD

SHAPES = ({"stride_policy": "fixed", "branches": 0}, {"stride_policy": "fixed"}, {"stride_policy": "adaptive"})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model = make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)
    return model, make_random_adapter(model, tmp_path_factory.mktemp("adapter"))


def padded_llm(dirs, overlap: bool, **kwargs) -> LLM:
    model, adapter = dirs
    llm = LLM(str(model), adapter=str(adapter), progress=False, overlap_scheduling=overlap, **kwargs)
    engine = llm.engine
    engine.runner.use_padded_decode(engine.config.max_num_seqs, engine.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
    return llm


def prompts(n: int, seed: int, lo: int = 3, hi: int = 30) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 11, (int(k),), generator=gen).tolist() for k in torch.randint(lo, hi, (n,), generator=gen)]


def mixed_params(n: int, seed: int | None = None, **kw) -> list[SamplingParams]:
    """ar/isd/risd at N = 2/3/4/8, plain, with branches and adaptive, of different lengths; every
    fifth request also stops at token 5 (so requests finish while a step is in flight)."""
    kinds = itertools.cycle(itertools.product(("ar", "isd", "risd"), (2, 3, 4, 8), SHAPES))
    out = []
    for i, (mode, stride, shape) in enumerate(itertools.islice(kinds, n)):
        out.append(SamplingParams(mode=mode, stride=stride, max_tokens=16 + 5 * (i % 7), ignore_eos=True,
                                  stop_token_ids=[5] if i % 5 == 4 else [],
                                  seed=None if seed is None else seed + i, **shape, **kw))
    return out


def test_overlap_gives_the_same_tokens_greedy_and_seeded(dirs):
    ps = prompts(24, seed=1)
    plain = padded_llm(dirs, overlap=False, kv_cache_tokens=8192, max_num_seqs=32)
    overlap = padded_llm(dirs, overlap=True, kv_cache_tokens=8192, max_num_seqs=32)
    launched, decode_steps = count_launches_ahead(overlap.engine.runner), []
    overlap.engine.scheduler.on_schedule = lambda batch: batch.is_prefill or decode_steps.append(batch)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=6, seed=300)):
        expected = [o.token_ids for o in plain.generate(ps, mixed_params(len(ps), **kw))]
        assert [o.token_ids for o in overlap.generate(ps, mixed_params(len(ps), **kw))] == expected
    # most decode steps went out ahead, through requests finishing (all were admitted at once)
    assert launched[0] >= 0.8 * len(decode_steps)
    bm = overlap.engine.block_manager
    assert bm.num_free == len(bm.blocks) and not overlap.engine.has_unfinished()


def run_with_events(llm: LLM, ps: list[list[int]], params: list[SamplingParams]) -> tuple[dict[int, list[int]], int]:
    """Adds the requests in three waves between steps and aborts one of the first wave mid-decode;
    the finished requests' tokens, by prompt index, and the preemptions among them."""
    engine = llm.engine
    ids, done, step, preemptions = {}, {}, 0, 0
    waves = {0: range(0, 8), 6: range(8, 14), 15: range(14, len(ps))}
    while step == 0 or engine.has_unfinished():
        for i in waves.get(step, ()):
            ids[engine.add_request(ps[i], params[i])] = i
        if step == 9:
            engine.abort(next(r for r, i in ids.items() if i == 2))
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
                preemptions += out.stats["preemptions"]
        step += 1
    return done, preemptions


def test_overlap_through_arrivals_aborts_and_preemption(dirs):
    """Requests join and one is aborted while steps are in flight, in a KV pool small enough to
    preempt; each finished request decodes the same tokens as without overlap."""
    ps = prompts(20, seed=2, lo=8, hi=30)
    kw = dict(kv_cache_tokens=480, kv_block_size=8, max_num_seqs=12)
    launched_after_prefill = 0
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=500)):
        plain, overlap = padded_llm(dirs, overlap=False, **kw), padded_llm(dirs, overlap=True, **kw)
        launched, prefills = count_launches_ahead(overlap.engine.runner), count_prefills_ahead(overlap.engine)
        after_prefill = count_launches_after_prefill(overlap.engine)
        expected, _ = run_with_events(plain, ps, mixed_params(len(ps), **sampling))
        got, preemptions = run_with_events(overlap, ps, mixed_params(len(ps), **sampling))
        assert 2 not in got and got == expected
        assert launched[0] > 10 and preemptions > 0 and prefills[0] > 0
        launched_after_prefill += after_prefill[0]
        bm = overlap.engine.block_manager
        assert bm.num_free == len(bm.blocks)
    # (greedy, the adaptive requests may look at a new round shape as each request joins, so that no
    # decode step can be launched during a prefill; seeded, every request keeps its fixed stride)
    assert launched_after_prefill > 0


def test_engine_is_idle_once_every_request_reported_finished(dirs):
    """A caller that stops stepping at its last finished output (the bench) finds the engine idle:
    a step launched ahead for requests that all finished meanwhile is void, not work left over."""
    llm = padded_llm(dirs, overlap=True, kv_cache_tokens=4096, max_num_seqs=8)
    engine, launched = llm.engine, count_launches_ahead(llm.engine.runner)
    for mode in ("ar", "risd"):
        ids = {engine.add_request(p, SamplingParams(mode=mode, stride=4, max_tokens=12, ignore_eos=True))
               for p in prompts(4, seed=3)}
        while ids:
            ids -= {out.request_id for out in engine.step() if out.finished}
        assert not engine.has_unfinished()
        bm = engine.block_manager
        assert bm.num_free == len(bm.blocks)
    assert launched[0] > 0


def test_bench_closed_loop_with_refills_under_overlap(dirs):
    """The bench's closed loop (a request added as each one finishes) runs under overlap, where a
    step applies the batch launched in the step before and refills stop launching ahead: every
    step is attributed the batch it applied, and the same tokens come out as without."""
    from idlm.bench.roofline import Roofline
    from idlm.bench.runner import run_closed_loop
    from idlm.bench.workload import Request

    reqs = [Request(p, 8 + 3 * (i % 5)) for i, p in enumerate(prompts(12, seed=4))]
    params = SamplingParams(mode="risd", stride=4, stride_policy="fixed", ignore_eos=True)
    figures = {}
    for overlap in (False, True):
        engine = padded_llm(dirs, overlap=overlap, kv_cache_tokens=4096, max_num_seqs=4).engine
        launched, prefills = count_launches_ahead(engine.runner), count_prefills_ahead(engine)
        after_prefill = count_launches_after_prefill(engine)
        roofline = Roofline.of(engine.model)
        figures[overlap] = [run_closed_loop(engine, reqs, 4, params, roofline) for _ in range(2)]
        assert not engine.has_unfinished()
    for off, on in zip(figures[False], figures[True]):
        assert on["num_requests"] == off["num_requests"] == 12
        assert on["output_tokens"] == off["output_tokens"]
        for f in (on, off):  # (the order of steps differs: a refill's prefill waits for the step in flight)
            assert f["forwards"] == f["steps"] > f["decode_steps"] > 0
    assert launched[0] > 0 and prefills[0] > 0  # refills prefilled while a decode step was in flight
    assert after_prefill[0] > 0  # and the decode step with them launched while their prefill was


def test_overlap_with_the_build_inside_the_step_graph(dirs):
    """A step launched ahead builds its rows inside the step's graph (DecodeGraphs.step_from_carry,
    run eagerly here) and its round's integers from the same carry and plan; the same tokens as
    without overlap, greedy and seeded."""
    ps = prompts(16, seed=5)
    plain = padded_llm(dirs, overlap=False, kv_cache_tokens=8192, max_num_seqs=16)
    graphed = padded_llm(dirs, overlap=True, kv_cache_tokens=8192, max_num_seqs=16)
    runner = graphed.engine.runner
    launched, built = count_launches_ahead(runner), [0]
    step_from_carry = runner.decode_graphs.step_from_carry
    runner.decode_graphs.step_from_carry = lambda *a: built.__setitem__(0, built[0] + 1) or step_from_carry(*a)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=6, seed=700)):
        expected = [o.token_ids for o in plain.generate(ps, mixed_params(len(ps), **kw))]
        assert [o.token_ids for o in graphed.generate(ps, mixed_params(len(ps), **kw))] == expected
    assert launched[0] > 20 and built[0] >= launched[0]


def test_adaptive_plans_are_counted_once_per_decode_step(dirs):
    """Where the adaptive policy changes its plan, schedule_next gives the step back to the
    synchronous path, which plans again: the policy's count of chosen strides stays one per
    decode step handed out."""
    llm = padded_llm(dirs, overlap=True, kv_cache_tokens=8192, max_num_seqs=16)
    engine = llm.engine
    decode_steps = []
    engine.scheduler.on_schedule = lambda batch: batch.is_prefill or decode_steps.append(batch)
    launched = count_launches_ahead(engine.runner)
    ps = prompts(16, seed=6)
    params = [SamplingParams(mode="risd", stride=4, stride_policy="adaptive", temperature=0, max_tokens=6 + 3 * i,
                             ignore_eos=True) for i in range(len(ps))]
    llm.generate(ps, params)
    assert launched[0] > 0 and sum(engine.policy.chosen.values()) == len(decode_steps)
    # the engine's count of them (a step launched ahead whose requests all finished first never runs)
    assert 0 < engine.stats.decode_steps_launched_ahead <= launched[0]


def test_a_look_at_drafts_lasts_its_steps_under_overlap(dirs):
    """A look at drafts changes the plan, so overlap scheduling gives its first step back to the
    synchronous path, which plans it again. Counted twice, a two-step look lasted one step on an H200
    (its cold round) and never timed a round. With no step timed, a look lasts LOOK_STEPS decode
    steps, every one of them a round with drafts."""
    from idlm.engine.step_cost import StepCost
    from idlm.engine.stride_policy import LOOK_STEPS

    llm = padded_llm(dirs, overlap=True, kv_cache_tokens=4096, max_num_seqs=4)
    engine = llm.engine
    # rows cost 40% of a step each: AR wins at any acceptance, yet a round could pay were every
    # draft accepted (4 tokens for at most 7 rows' 3.4 steps), so the policy looks at once
    engine.policy.cost = cost = StepCost.whole_tables(lambda batch: {r: 1.0 + 0.4 * (r - 1) for r in (1, 4, 7, 16)},
                                                      4)
    cost.observe = lambda *args: None
    ks = []
    engine.scheduler.on_schedule = lambda batch: batch.is_prefill or ks.append(batch.seqs[0].num_new)
    launched = count_launches_ahead(engine.runner)
    llm.generate([[2, 3, 4, 5]], SamplingParams(mode="risd", stride=4, stride_policy="adaptive", temperature=0,
                                                max_tokens=40, ignore_eos=True))
    runs = [len(list(group)) for k, group in itertools.groupby(ks) if k > 0]
    assert runs and runs[0] == LOOK_STEPS and launched[0] > 0, (ks, runs)


@pytest.mark.parametrize("sync_steps", [False, True])
def test_bench_leaves_the_pipeline_alone_unless_asked_to_sync_each_step(dirs, monkeypatch, sync_steps):
    """A device synchronisation around every step made a step launched ahead wait for the host each
    step (on an H200 `idlm bench` timed `ar` at C = 1 at 1.19 ms a token where the engine's loop ran
    1.0 ms). By default the bench synchronises once, before its clock starts."""
    import idlm.bench.runner as runner
    from idlm.bench.roofline import Roofline
    from idlm.bench.workload import Request

    syncs = []
    monkeypatch.setattr(runner, "_synchronizer", lambda device: lambda: syncs.append(1))
    engine = padded_llm(dirs, overlap=True, kv_cache_tokens=4096, max_num_seqs=4).engine
    reqs = [Request(p, 6) for p in prompts(4, seed=7)]
    figures = runner.run_closed_loop(engine, reqs, 4, SamplingParams(ignore_eos=True), Roofline.of(engine.model),
                                     sync_steps=sync_steps)
    assert len(syncs) == (1 + 2 * figures["steps"] if sync_steps else 1)


def test_step_cost_measurement_meets_the_rounds_steps_launched_ahead_will_replay(dirs):
    """Measuring a batch size also runs its shapes' next steps as overlap scheduling launches them,
    so that a running batch meeting one later replays its round (a graph, on a GPU) rather than
    capturing it then; the tokens are those of an engine that measured nothing."""
    from idlm.engine.step_cost import measure_step_cost

    def run(measure: bool):
        llm = padded_llm(dirs, overlap=True, kv_cache_tokens=8192, max_num_seqs=4)
        engine = llm.engine
        engine.policy.cost = measure_step_cost(engine.runner, 4)  # over the padded layout made above
        if measure:
            engine.policy.cost.measure_up_to(4)
        made = set(engine.runner.round_graphs.graphs)
        params = SamplingParams(mode="risd", stride=2, stride_policy="fixed", temperature=0, max_tokens=24,
                                ignore_eos=True)
        out = llm.generate(prompts(4, seed=3, lo=10, hi=12), params)
        new = set(engine.runner.round_graphs.graphs) - made
        return [o.token_ids for o in out], {(key[1].batch, key[1].kmax) for key in new if key[2] is not None}

    tokens, new_launched_ahead = run(measure=True)
    assert (4, 1) not in new_launched_ahead  # 4 requests, 1 draft (4 rows: measured eagerly), met then
    baseline, unmeasured = run(measure=False)
    assert (4, 1) in unmeasured  # the same run without the measurement makes it
    assert tokens == baseline


def test_a_failing_launch_ahead_warm_up_warns_and_the_engine_still_runs(dirs, monkeypatch):
    """Meeting a shape's launched-ahead step is a warm-up: where it fails, the measurement goes on
    with a warning, and the engine serves as it would have (that graph captured when first needed)."""
    from idlm.engine.step_cost import measure_step_cost

    llm = padded_llm(dirs, overlap=True, kv_cache_tokens=8192, max_num_seqs=4)
    engine = llm.engine
    engine.policy.cost = measure_step_cost(engine.runner, 4)

    def broken(seqs):
        raise RuntimeError("no")

    monkeypatch.setattr(engine.runner, "launch_next", broken)
    with pytest.warns(RuntimeWarning, match="overlap scheduling launches it"):
        engine.policy.cost.measure_up_to(4)
    monkeypatch.undo()
    params = SamplingParams(mode="risd", stride=2, stride_policy="fixed", temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate(prompts(4, seed=3, lo=10, hi=12), params)
    assert all(len(o.token_ids) == 12 for o in out)
