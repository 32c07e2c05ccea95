"""The next decode step built on the device from the last round's outcome (engine/next_step.py)
equals the step the host builds (runner.feed_rows -> DecodeGraphs.run), row for row, over the
rounds of real engines: accepts, rejections, cold rounds, branches, mixed modes and strides,
requests joining and leaving, preemption. A wrong advance must be caught."""

from dataclasses import replace

import pytest
import torch
from helpers import make_random_adapter, make_small_idlm
from test_decode_graphs import mixed_params, padded_llm
from test_isd import prompts_for

from idlm import SamplingParams
from idlm.engine.next_step import LayoutTable, SlotState, build_step, carry_table


def advance(state: SlotState, accepted, final_token, new_drafts, has_new) -> SlotState:
    """The state after a round, from its host outcomes (the engine takes run_round's carry_table
    of the same values): new drafts [B, K] kept where has_new, the plan still the round's."""
    table = carry_table(final_token, state.start, accepted, torch.where(has_new[:, None], new_drafts, 0),
                        torch.where(has_new, state.num_new, 0))
    return SlotState.from_carry(table, state.num_new, state.num_branches, state.mask_id, state.gated)


def plan(state: SlotState, num_new, num_branches) -> SlotState:
    return replace(state, num_new=num_new, num_branches=num_branches)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    model = make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)
    return model, make_random_adapter(model, tmp_path_factory.mktemp("adapter"))


def record_steps(llm) -> list[dict]:
    """Every runner step of llm's requests: each sequence's state before it, the host-built padded step
    (None when the step ran outside the padded layout) and the round outcomes."""
    runner = llm.engine.runner
    runner.device_steps = False  # every step built on the host, to compare with
    graphs, launch, collect = runner.decode_graphs, runner.launch, runner.collect
    steps = []

    def run_launch(seqs, num_new):
        if any(s.seq_id not in llm.engine.seqs for s in seqs):  # the adaptive stride's cost measurement
            return launch(seqs, num_new)
        # start: the pending token's cache slot (a prompt chunk feeds n tokens, the pending one last)
        step = dict(packed=None, num_new=list(num_new), seqs=[dict(
            seq_id=s.seq_id, start=s.num_computed + n - 1, pending=s.token_ids[-1], drafts=list(s.drafts),
            num_new=s.num_new, branches=s.num_branches, mode=s.params.mode) for s, n in zip(seqs, num_new)])
        graphs.mirror = lambda packed: step.update(packed=packed)
        step["pending"] = launch(seqs, num_new)
        graphs.mirror = None
        steps.append(step)
        return step["pending"]

    def run_collect(pending):
        outcomes = collect(pending)
        if steps and "outcomes" not in steps[-1] and steps[-1]["pending"] is pending:
            steps[-1]["outcomes"] = outcomes
        return outcomes

    runner.launch, runner.collect = run_launch, run_collect
    return steps


def unpack(packed) -> dict:
    """The host's padded step (decode_graphs.PackedStep) by name, [bucket, ...] each."""
    b, t, p = packed.bucket, packed.tokens, packed.packed
    rows, at, out = b * t, 0, {}
    names = [("ids", rows), ("positions", rows), ("slots", rows), ("gate", rows), ("context_lens", b)]
    if packed.tree:
        names += [("tree_bits", rows), ("tree_rows", b)]
    for name, n in names:
        out[name] = torch.tensor(p[at:at + n]).view(b, -1)
        at += n
    out["tables"] = torch.tensor(p[at:at + b * packed.width]).view(b, packed.width)
    return out


def compare(steps: list[dict], mask_ids: dict, block_size: int, scratch_slot: int, advance_fn=advance) -> dict:
    """Rebuilds every padded decode step on the device from each request's last round and
    compares it with the host's; returns counts of what was compared and the mismatches."""
    layouts = LayoutTable.build(max(s["num_new"] for st in steps for s in st["seqs"]) or 1, "cpu")
    last: dict[int, tuple[dict, object]] = {}
    seen = dict(rounds=0, steps=0, mismatches=0, rejections=0, cold=0, branched=0)
    for step in steps:
        packed = step["packed"]
        if packed is not None and all(n == 1 for n in step["num_new"]):
            host = unpack(packed)
            picked = [i for i, s in enumerate(step["seqs"]) if s["seq_id"] in last]
            if picked:
                before = [last[step["seqs"][i]["seq_id"]] for i in picked]
                kmax = layouts.lookup.shape[0] - 1
                new_k = max([len(r.new_drafts) for _, r in before] + [1])
                state = SlotState(
                    pending=torch.tensor([s["pending"] for s, _ in before]),
                    start=torch.tensor([s["start"] for s, _ in before]),
                    drafts=torch.tensor([s["drafts"][:kmax] + [0] * (kmax - len(s["drafts"][:kmax]))
                                         for s, _ in before]),
                    num_drafts=torch.tensor([min(len(s["drafts"]), kmax) for s, _ in before]),
                    num_new=torch.tensor([s["num_new"] for s, _ in before]),
                    num_branches=torch.tensor([s["branches"] for s, _ in before]),
                    mask_id=torch.tensor([mask_ids.get(s["mode"]) or 0 for s, _ in before]),
                    gated=torch.tensor([s["mode"] == "risd" for s, _ in before]),
                )
                state = advance_fn(state, torch.tensor([r.accepted for _, r in before]),
                                   torch.tensor([r.final_token for _, r in before]),
                                   torch.tensor([r.new_drafts + [0] * (new_k - len(r.new_drafts)) for _, r in before]),
                                   torch.tensor([bool(r.new_drafts) for _, r in before]))
                now = [step["seqs"][i] for i in picked]
                state = plan(state, torch.tensor([s["num_new"] for s in now]),
                             torch.tensor([s["branches"] for s in now]))
                index = torch.tensor(picked)
                built = build_step(state, layouts, host["tables"][index], packed.tokens, len(picked), block_size,
                                   scratch_slot)
                pairs = [("ids", built.ids), ("positions", built.positions), ("slots", built.slots),
                         ("gate", built.gate.long()), ("context_lens", built.context_lens)]
                if packed.tree:
                    pairs += [("tree_bits", built.tree_bits), ("tree_rows", built.tree_rows)]
                for name, mine in pairs:
                    theirs = host[name][index].flatten()
                    if not torch.equal(mine.view(len(picked), -1).flatten(), theirs):
                        seen["mismatches"] += 1
                seen["rounds"] += len(picked)
                seen["steps"] += 1
        for i, s in enumerate(step["seqs"]):
            r = step["outcomes"].get(i)
            if r is None:
                continue
            last[s["seq_id"]] = (s, r)
            seen["rejections"] += r.accepted < r.num_drafts
            seen["cold"] += r.num_drafts == 0 and s["num_new"] > 0
            seen["branched"] += r.from_branch
    return seen


def engine_rounds(dirs, prompts, params, **llm_kwargs):
    model, adapter = dirs
    llm = padded_llm(model, adapter, **llm_kwargs)
    steps = record_steps(llm)
    outs = llm.generate(prompts, params)
    engine = llm.engine
    mask_ids = engine.runner.mask_ids
    graphs = engine.runner.decode_graphs
    return steps, outs, mask_ids, graphs.block_size, graphs.scratch_slot


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_device_built_steps_equal_host_built(dirs, temperature):
    prompts = prompts_for(24, 12, seed=5, lo=3, hi=30)
    params = mixed_params(len(prompts), temperature=temperature, top_k=0, max_tokens=36, ignore_eos=True)
    for i, p in enumerate(params):
        p.seed = 7 + i
        p.max_tokens = 12 + 3 * (i % 9)  # requests leave at different steps; others join in their place
    steps, _, mask_ids, bs, scratch = engine_rounds(dirs, prompts, params, kv_cache_tokens=8192, max_num_seqs=8)
    seen = compare(steps, mask_ids, bs, scratch)
    assert seen["mismatches"] == 0, seen
    assert seen["rounds"] > 200 and seen["steps"] > 30, seen
    assert seen["rejections"] > 20 and seen["cold"] > 10 and seen["branched"] > 0, seen


def test_device_built_steps_under_preemption(dirs):
    prompts = prompts_for(14, 12, seed=9, lo=10, hi=40)
    params = mixed_params(len(prompts), temperature=0, max_tokens=48, ignore_eos=True)
    steps, outs, mask_ids, bs, scratch = engine_rounds(dirs, prompts, params, kv_cache_tokens=320, kv_block_size=8,
                                                       max_num_seqs=16)
    assert sum(o.stats["preemptions"] for o in outs) > 0
    seen = compare(steps, mask_ids, bs, scratch)
    assert seen["mismatches"] == 0 and seen["rounds"] > 100, seen


def test_a_wrong_advance_is_caught(dirs):
    """Advancing a request by `accepted` instead of accepted + 1 (or dropping the new drafts)
    must show as mismatches: the comparison can fail."""
    prompts = prompts_for(8, 12, seed=2, lo=3, hi=20)
    params = [SamplingParams(mode=("isd", "risd")[i % 2], stride=4, stride_policy="fixed", temperature=0, max_tokens=24,
                             ignore_eos=True) for i in range(len(prompts))]
    steps, _, mask_ids, bs, scratch = engine_rounds(dirs, prompts, params, kv_cache_tokens=4096, max_num_seqs=8)

    def short_by_one(state, accepted, final, new_drafts, has_new):
        right = advance(state, accepted, final, new_drafts, has_new)
        return replace(right, start=state.start + accepted)

    def drops_drafts(state, accepted, final, new_drafts, has_new):
        return advance(state, accepted, final, new_drafts, torch.zeros_like(has_new))

    assert compare(steps, mask_ids, bs, scratch)["mismatches"] == 0
    assert compare(steps, mask_ids, bs, scratch, short_by_one)["mismatches"] > 0
    assert compare(steps, mask_ids, bs, scratch, drops_drafts)["mismatches"] > 0


def test_layout_table_matches_round_layout():
    from idlm.decoding.layout import round_layout
    table = LayoutTable.build(7, "cpu")
    for d, k, b in [(0, 0, 0), (0, 3, 0), (3, 3, 0), (3, 3, 2), (7, 7, 7), (2, 7, 1)]:
        i = int(table.lookup[d, k, b])
        lay = round_layout(d, k, b)
        n = lay.num_rows
        assert int(table.num_rows[i]) == n
        assert table.offsets[i, :n].tolist() == list(lay.offsets)
        assert table.visible[i, :n].tolist() == list(lay.visible)
        assert table.is_mask[i, :n].tolist() == list(lay.is_mask)


def test_advance_by_hand():
    """advance moves every request by accepted + 1 and keeps the new drafts only where the round
    kept them (a hand-made batch)."""
    state = SlotState(pending=torch.tensor([5, 6]), start=torch.tensor([10, 20]),
                      drafts=torch.zeros(2, 3, dtype=torch.long),
                      num_drafts=torch.tensor([0, 0]), num_new=torch.tensor([3, 2]), num_branches=torch.tensor([0, 0]),
                      mask_id=torch.tensor([11, 11]), gated=torch.tensor([True, False]))
    after = advance(state, torch.tensor([2, 0]), torch.tensor([7, 8]), torch.tensor([[1, 2, 3], [4, 5, 0]]),
                    torch.tensor([True, False]))
    assert after.start.tolist() == [13, 21] and after.pending.tolist() == [7, 8]
    assert after.num_drafts.tolist() == [3, 0] and after.drafts.tolist() == [[1, 2, 3], [0, 0, 0]]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_with_device_built_steps_gives_the_same_tokens(dirs, temperature):
    """The runner builds a decode step on the device whenever its requests are those of the step
    before; that must change no token (greedy, and seeded sampling), under preemption too."""
    model, adapter = dirs
    prompts = prompts_for(20, 12, seed=13, lo=3, hi=40)
    params = mixed_params(len(prompts), temperature=temperature, top_k=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(params):
        p.seed = 50 + i
        p.max_tokens = 16 + 2 * (i % 11)
    outputs, built = {}, {}
    # host: every step built on the host; device: built inside the step (DecodeGraphs.step_from_carry,
    # run eagerly here: the CPU check of the graph's code)
    for how in ("host", "device"):
        for name, kwargs in (("roomy", dict(kv_cache_tokens=8192, max_num_seqs=8)),
                             ("tight", dict(kv_cache_tokens=320, kv_block_size=8, max_num_seqs=16))):
            llm = padded_llm(model, adapter, **kwargs)
            runner = llm.engine.runner
            runner.device_steps = how != "host"
            calls = []
            graphs = runner.decode_graphs
            original = graphs.step_from_carry
            graphs.step_from_carry = lambda *a, calls=calls, original=original: calls.append(1) or original(*a)
            outputs[how, name] = [o.token_ids for o in llm.generate(prompts, params)]
            built[how, name] = len(calls)
    for name in ("roomy", "tight"):
        assert outputs["device", name] == outputs["host", name]
    assert built["host", "roomy"] == built["host", "tight"] == 0
    assert built["device", "roomy"] > 20 and built["device", "tight"] > 5, built


def test_a_padding_entry_builds_padding_rows():
    """build_step over a whole bucket whose last entries are marked invalid gives, for them, the
    rows DecodeGraphs.run pads with, whatever stale values they hold (step_from_carry's buffers)."""
    layouts = LayoutTable.build(3, "cpu")
    state = SlotState(pending=torch.tensor([5, 9]), start=torch.tensor([10, 37]),
                      drafts=torch.tensor([[1, 2, 3], [4, 4, 4]]), num_drafts=torch.tensor([3, 2]),
                      num_new=torch.tensor([3, 3]), num_branches=torch.tensor([1, 2]),
                      mask_id=torch.tensor([11, 11]), gated=torch.tensor([True, True]))
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    one = build_step(replace(state, **{k: getattr(state, k)[:1] for k in ("pending", "start", "drafts", "num_drafts",
                                                                         "num_new", "num_branches", "mask_id",
                                                                         "gated")}),
                     layouts, tables, 8, 2, 16, 999)
    padded = build_step(replace(state, valid=torch.tensor([True, False])), layouts, tables, 8, 2, 16, 999)
    for name in ("ids", "positions", "slots", "gate", "tree_bits", "context_lens", "tree_rows"):
        assert torch.equal(getattr(padded, name), getattr(one, name)), name


def test_shared_draft_rows_need_a_row_for_every_request():
    """A batch whose drafted requests are rows 0..1 of one round takes that round's rows whole only
    if the round has a row for every request of the batch (a request that joined since has none)."""
    from idlm.engine.runner import ModelRunner
    from idlm.engine.sequence import DraftRows, Sequence

    rows = DraftRows(torch.zeros(2, 3, 4), torch.ones(2, 3), 0)
    seqs = [Sequence([1, 2], SamplingParams(), seed=0) for _ in range(3)]
    seqs[0].draft_rows = rows
    seqs[1].draft_rows = DraftRows(rows.hidden, rows.q, 1)
    assert ModelRunner._shared_draft_rows(seqs[:2], [3, 3], 3).q is rows.q
    assert ModelRunner._shared_draft_rows(seqs, [3, 3, 0], 3) is None  # the third joined: no row 2
    assert ModelRunner._shared_draft_rows(seqs[:2], [3, 3], 4) is None  # more drafts than the round kept
    seqs[1].draft_rows = DraftRows(rows.hidden.clone(), rows.q.clone(), 1)
    assert ModelRunner._shared_draft_rows(seqs[:2], [3, 3], 3) is None  # rows of two rounds


@pytest.mark.parametrize("seed", range(5))
def test_round_inputs_built_over_a_whole_bucket_equal_those_built_over_its_requests(seed):
    """A round graph makes its integers from the decode graph's static buffers, a whole bucket
    whose padding entries hold stale carries and plans (state.valid False): the values, padding
    included, must be those built from the real requests alone and padded, as the host pads them."""
    from idlm.engine.round_step import RoundShape, built_round_inputs

    g = torch.Generator().manual_seed(seed)
    n, bucket, kmax, tokens = 3, 5, 3, 9
    rand = lambda hi, *shape: torch.randint(0, hi, shape, generator=g)  # noqa: E731
    num_new = torch.cat([rand(kmax + 1, n), rand(kmax + 1, bucket - n)])  # stale plans in the padding too
    table = torch.cat([torch.stack([rand(12, bucket), 20 + rand(50, bucket), rand(kmax + 1, bucket)], 1),
                       rand(12, bucket, kmax)], 1)
    branches, mask_id, gated = rand(kmax + 1, bucket), rand(12, bucket), rand(2, bucket).bool()
    valid = torch.arange(bucket) < n
    constants = rand(100, 4 * bucket)
    shape = RoundShape(bucket, kmax, kmax, True, False, False)
    alone = SlotState.from_carry(table[:n], num_new[:n], branches[:n], mask_id[:n], gated[:n])
    whole = SlotState.from_carry(table, num_new, branches, mask_id, gated, valid)
    expected = built_round_inputs(alone, constants.view(4, bucket), tokens, shape)
    assert torch.equal(built_round_inputs(whole, constants.view(4, bucket), tokens, shape), expected)
    assert not torch.equal(built_round_inputs(replace(whole, valid=None), constants.view(4, bucket), tokens, shape),
                           expected)
