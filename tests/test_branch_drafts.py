"""Branch drafts (no cold rounds after a rejection) and the adaptive stride."""

import numpy as np
import pytest
import torch
from helpers import make_small_idlm
from torch import nn

from idlm import LLM, SamplingParams
from idlm.decoding.layout import MAX_ROUND_ROWS, max_branches, round_layout, rows_of
from idlm.engine.runner import feed_rows
from idlm.engine.sequence import DraftCounts, Sequence
from idlm.engine.step_cost import MIN_SEEN, ROUND_SHAPES, StepCost, rows_of_round
from idlm.engine.stride_policy import (
    EXPLORE_EVERY,
    EXPLORE_MAX,
    LOOK_STEPS,
    ROUND_MARGIN,
    StridePolicy,
    expected_tokens,
)
from idlm.kernels.attention import DenseAttention, PagedAttention, PagedBatch

# ---------------------------------------------------------------- the layout


@pytest.mark.parametrize("d, k, b", [(3, 3, 3), (3, 3, 1), (7, 7, 7), (2, 3, 2), (15, 15, 2), (0, 3, 0), (0, 0, 0)])
def test_layout_rows_positions_and_visibility(d, k, b):
    lay = round_layout(d, k, b)
    assert lay.num_rows == rows_of(d, k, b) == 1 + d + k + b * k <= MAX_ROUND_ROWS
    bits = [v % (1 << 64) for v in lay.visible]
    for row, v in enumerate(bits):
        assert v >> row & 1 and v < 1 << (row + 1)  # sees itself, nothing after it: a sub-causal tree
    for i in range(1 + d + k):  # the main chain is causal
        assert lay.offsets[i] == i and bits[i] == (1 << (i + 1)) - 1 and lay.is_mask[i] == (i > d)
    for j in range(1, b + 1):
        first = lay.branch_row(j)
        for i in range(k):
            row = first + i
            assert lay.offsets[row] == j + i and lay.is_mask[row]
            seen = {r for r in range(lay.num_rows) if bits[row] >> r & 1}
            # pending, d_1..d_{j-1} and its own earlier rows: never d_j, later drafts or other branches
            assert seen == set(range(j)) | set(range(first, row + 1))


def test_max_branches_fits_the_row_budget():
    for k in range(16):
        b = max_branches(k, k)
        assert b <= k and rows_of(k, k, b) <= MAX_ROUND_ROWS
        assert b == k or rows_of(k, k, b + 1) > MAX_ROUND_ROWS
    assert max_branches(3, 3) == 3 and max_branches(7, 7) == 7 and max_branches(15, 15) == 2


# ---------------------------------------------------------------- attention over a tree


def test_paged_attention_tree_equals_dense_masked_attention():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, bs = 4, 2, 8, 4
    ctxs, q_lens, tree_rows = [13, 9, 20], [6, 5, 11], [6, 3, 11]  # 2nd: a chunk whose last 3 rows are a tree
    blocks = sum(-(-c // bs) for c in ctxs)
    cache = torch.randn(2, 1, blocks, bs, kv_heads, dim, generator=gen)
    tables, used = [], 0
    for c in ctxs:
        n = -(-c // bs)
        tables.append(list(range(used, used + n)))
        used += n
    width = max(len(t) for t in tables)
    bits, masks = [], []
    for c, q, r in zip(ctxs, q_lens, tree_rows):
        mask = torch.ones(q, c, dtype=torch.bool).tril(c - q)
        for i in range(q):
            if i < q - r:
                bits.append(-1)
                continue
            t = i - (q - r)
            v = (1 << t) | sum(1 << j for j in range(t) if torch.rand((), generator=gen) < 0.5)
            bits.append(v)
            for j in range(r):
                mask[i, c - r + j] = bool(v >> j & 1) and j <= t
        masks.append(mask)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    batch = PagedBatch(slot_mapping=torch.full((starts[-1],), -1), query_start=starts, context_lens=torch.tensor(ctxs),
                       block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                       max_context_len=max(ctxs), max_query_len=max(q_lens), all_written=False,
                       tree_bits=torch.tensor(bits), tree_rows=torch.tensor(tree_rows, dtype=torch.int32))
    q = torch.randn(starts[-1], heads, dim, generator=gen)
    empty = torch.zeros(starts[-1], kv_heads, dim)
    out = PagedAttention(cache, batch)(0, q, empty, empty)
    for s, (c, mask) in enumerate(zip(ctxs, masks)):
        keys = torch.cat([cache[0, 0, b] for b in tables[s]])[:c][None]
        values = torch.cat([cache[1, 0, b] for b in tables[s]])[:c][None]
        dense = DenseAttention(torch.cat([torch.zeros(c - mask.shape[0], c, dtype=torch.bool), mask])[None])
        qs = torch.zeros(1, c, heads, dim)
        qs[0, c - mask.shape[0]:] = q[starts[s]:starts[s + 1]]
        expected = dense(0, qs, keys, values)[0, c - mask.shape[0]:]
        torch.testing.assert_close(out[starts[s]:starts[s + 1]], expected)


# ---------------------------------------------------------------- branch rows see what they should


@pytest.fixture(scope="module")
def idlm_dir(tmp_path_factory):
    return make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)


def test_branch_rows_equal_a_dense_forward_of_their_own_context(idlm_dir):
    """B_j's rows must compute exactly what a forward of [committed, d_1..d_{j-1}, MASK x K] at
    positions P+j.. gives: the shape training teaches, and nothing of d_j or later (a branch
    that saw the rejected d_j would still be exact, every draft being verified, but it would
    propose from a context that is not the one it stands in)."""
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=1024, kv_block_size=4)
    engine = llm.engine
    engine.add_request([2, 3, 4, 5, 6], SamplingParams(mode="isd", stride=4, temperature=1.0, seed=1, max_tokens=60,
                                                       ignore_eos=True, stride_policy="fixed", branches=0))
    seq = next(iter(engine.seqs.values()))
    while len(seq.drafts) < 3:
        engine.step()
    seq.num_new, seq.num_branches = 3, 3
    engine.block_manager.reserve(seq, seq.num_computed + 1 + seq.num_lookahead)
    rows = feed_rows(seq, 1, engine.mask_ids["isd"], 4)
    ids, positions, batch, _ = engine.runner.prepare([seq], [rows])
    model = engine.model
    with torch.no_grad():
        hidden = model(ids, positions, PagedAttention(engine.runner.kv_cache, batch))
        lay, mask = seq.layout, engine.mask_ids["isd"]
        committed = seq.token_ids
        for j in range(1, 4):
            context = committed + seq.drafts[:j - 1] + [mask] * 3
            dense = model(torch.tensor([context]), torch.arange(len(context))[None], DenseAttention())[0]
            torch.testing.assert_close(hidden[lay.branch_row(j):lay.branch_row(j) + 3], dense[-3:],
                                       rtol=1e-5, atol=1e-5)
            wrong = committed + seq.drafts[:j] + [mask] * 3  # as if the branch saw d_j
            seen = model(torch.tensor([wrong]), torch.arange(len(wrong))[None], DenseAttention())[0]
            assert not torch.allclose(hidden[lay.branch_row(j)], seen[-3], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- rigged models: exact counts


class RiggedLM(nn.Module):
    """A stand-in model whose outputs follow fixed rules, run through the engine's real attention.

    A clean row at position p predicts T(p+1). A MASK row learns, through attention (a uniform
    average of 'is MASK' over the rows it sees, which are always the positions 0..p), how many
    MASKs of its block it sees: m = 1 for the first. It proposes T(p+1), or a wrong token when
    `wrong(m, p)`. Greedy output is therefore T(L), T(L+1), .. for a prompt of length L."""

    def __init__(self, base: nn.Module, mask_id: int, wrong):
        super().__init__()
        self.cfg = base.cfg
        self.lm_head = base.lm_head
        self.mask_id = mask_id
        self.wrong = wrong
        self.vocab = base.cfg.vocab_size

    def target(self, p: torch.Tensor) -> torch.Tensor:
        return 2 + (3 * p) % (self.mask_id - 2)

    def forward(self, input_ids, positions, attn, lora_gate=None):
        cfg = self.cfg
        rows = input_ids.shape[0]
        q = torch.zeros(rows, cfg.num_heads, cfg.head_dim)
        k = torch.zeros(rows, cfg.num_kv_heads, cfg.head_dim)
        v = torch.zeros(rows, cfg.num_kv_heads, cfg.head_dim)
        v[:, :, 0] = (input_ids == self.mask_id).float()[:, None]
        seen = attn(0, q, k, v)[:, 0, 0] * (positions + 1)
        return torch.stack([input_ids.float(), positions.float(), seen.round()], dim=-1)

    def head_rows_independent(self) -> bool:
        return True  # each row's logits are a function of that row alone: a round takes them in one call

    def logits(self, hidden):
        ids, p, m = hidden[:, 0].long(), hidden[:, 1].long(), hidden[:, 2].long()
        token = self.target(p + 1)
        wrong = (ids == self.mask_id) & self.wrong(m, p)
        token = torch.where(wrong, 2 + (token - 2 + 1) % (self.mask_id - 2), token)
        return 10.0 * torch.nn.functional.one_hot(token, self.vocab).float()


def rigged_llm(idlm_dir, wrong) -> LLM:
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=2048)
    engine = llm.engine
    engine.model = engine.runner.model = RiggedLM(engine.model, engine.mask_ids["isd"], wrong)
    return llm


PROMPT = [2, 3, 4]
L = len(PROMPT)


def run_rigged(llm, stride, branches, max_tokens=30):
    params = SamplingParams(mode="isd", stride=stride, temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            stride_policy="fixed", branches=branches)
    out = llm.generate([PROMPT], params)[0]
    expected = llm.engine.model.target(torch.arange(L, L + max_tokens)).tolist()
    assert out.token_ids == expected  # every rig decodes exactly the AR output
    return out.stats


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_rigged_first_drafts_of_the_main_chain_wrong_branch_drafts_right(idlm_dir, stride):
    """Main-chain drafts always lose their first draft; the branch of that draft always proposes
    right. With branches: after prefill, rounds alternate rejection at 1 (commits 1, drafts from
    B_1) and all accepted (commits K + 1): exactly one cold round, the prefill's."""
    k, max_tokens = stride - 1, 30
    # positions of the first MASK of a main chain after a bonus: L, L + (K + 2), ...
    llm = rigged_llm(idlm_dir, lambda m, p: (m == 1) & ((p - L) % (k + 2) == 0))
    st = run_rigged(llm, stride, None, max_tokens)
    committed, rounds, branch_rounds = 1, 0, 0
    while committed < max_tokens:
        rounds += 1
        if rounds % 2:
            committed += 1
        else:
            committed += k + 1
            branch_rounds += 1
    assert st["cold_rounds"] == 1 and st["verify_rounds"] == rounds and st["forwards"] == 1 + rounds
    assert st["branch_rounds"] == branch_rounds and st["branch_drafts_accepted"] == k * branch_rounds
    assert st["drafts"]["acceptance"][0] == pytest.approx(branch_rounds / rounds)
    without = run_rigged(rigged_llm(idlm_dir, lambda m, p: (m == 1) & ((p - L) % (k + 2) == 0)), stride, 0,
                         max_tokens)
    assert without["cold_rounds"] > 1 and without["branch_rounds"] == 0


@pytest.mark.parametrize("stride", [2, 4])
def test_rigged_every_draft_wrong_is_plain_ar_with_nothing_lost(idlm_dir, stride):
    llm = rigged_llm(idlm_dir, lambda m, p: torch.ones_like(m, dtype=torch.bool))
    max_tokens = 25
    st = run_rigged(llm, stride, None, max_tokens)
    # one token a forward; every round after the prefill tests (and rejects) the first draft of B_1
    assert st["forwards"] == max_tokens and st["tokens_per_forward"] == 1.0
    assert st["cold_rounds"] == 1 and st["verify_rounds"] == max_tokens - 1
    assert st["branch_rounds"] == max_tokens - 2 and st["drafts"]["accepted"] == [0] * (stride - 1)


@pytest.mark.parametrize("stride", [3, 4])
def test_rigged_every_draft_right_needs_no_branch(idlm_dir, stride):
    llm = rigged_llm(idlm_dir, lambda m, p: torch.zeros_like(m, dtype=torch.bool))
    k, max_tokens = stride - 1, 25
    st = run_rigged(llm, stride, None, max_tokens)
    verify_rounds = -(-(max_tokens - 1) // (k + 1))
    assert st["forwards"] == 1 + verify_rounds and st["cold_rounds"] == 1 and st["branch_rounds"] == 0


# ---------------------------------------------------------------- adaptive stride


def design_formula(a: float, n: int) -> float:
    """Tokens per forward with i.i.d. acceptance a, no branches (docs/ARCHITECTURE.md, "Statistics")."""
    return ((1 - a ** n) / (1 - a) + 1 - a ** (n - 1)) / (2 - a ** (n - 1))


def simulate(accept: list[float], k: int, b: int, rounds: int, rng: np.random.Generator) -> float:
    tokens, drafts = 0, 0
    for _ in range(rounds):
        if drafts == 0:  # cold
            tokens, drafts = tokens + 1, k
            continue
        j = 0
        while j < k and rng.random() < accept[j]:
            j += 1
        tokens += j + 1
        drafts = k if j == k or j < b else 0
    return tokens / rounds


@pytest.mark.parametrize("a", [0.3, 0.55, 0.9])
def test_expected_tokens_matches_the_design_formula_and_a_simulation(a):
    rng = np.random.default_rng(0)
    for k in (1, 3, 7):
        accept = np.full((1, k), a)
        plain = expected_tokens(accept, np.array([k]), np.array([0]))[0]
        assert plain == pytest.approx(design_formula(a, k + 1))
        full = expected_tokens(accept, np.array([k]), np.array([k]))[0]
        assert full == pytest.approx(sum(a ** i for i in range(k + 1)))  # every round a verify round
        uneven = [a, a * 0.9, 0.95, 0.5, 0.8, 0.6, 0.7][:k]
        for b in range(k + 1):
            model = expected_tokens(np.array([uneven]), np.array([k]), np.array([b]))[0]
            assert model == pytest.approx(simulate(uneven, k, b, 100_000, rng), rel=0.015)
    assert expected_tokens(np.full((1, 3), a), np.array([0]), np.array([0]))[0] == 1.0  # K = 0 is AR


def rigged_cost(per_step: float, per_row: float, max_batch: int = 64) -> StepCost:
    """A cost table; the engine's own steps are still observed into it (their real times)."""
    return StepCost.whole_tables(lambda batch: {rows: per_step + per_row * batch * rows
                                                for rows in (1, 4, 7, 16, 31, 64)}, max_batch)


def timed_as_priced(cost: StepCost, batch: int) -> StepCost:
    """Every round shape's steps at `batch` timed at what the table says, so that the policy's choice
    is its price's alone (an untimed shape is looked at first)."""
    cost.measure_up_to(batch)
    for rows in sorted({rows_of_round(k, b) for k, b in ROUND_SHAPES}):
        price = cost.seconds(batch, rows)
        for _ in range(MIN_SEEN):
            cost.observe(batch, rows, price)
    return cost


def seqs_with(acceptance: list[float], n: int, stride: int = 8, **fields) -> list[Sequence]:
    out = []
    for _ in range(n):
        seq = Sequence([2, 3], SamplingParams(**{"mode": "isd", "stride": stride, "temperature": 0, **fields}), seed=0)
        counts = DraftCounts()
        for a in acceptance:  # 1000 rounds reached each position, a of them accepted
            counts.reached.append(1000)
            counts.accepted.append(round(1000 * a))
            counts.proposed.append(1000)
        seq.stats.drafts = counts
        out.append(seq)
    return out


def brute_force(policy: StridePolicy, seqs: list[Sequence]) -> tuple[float, tuple[int, int]]:
    accept = policy._acceptance(seqs, max(s.max_new_drafts for s in seqs))
    best = (-1.0, (0, 0))
    for k in range(max(s.max_new_drafts for s in seqs) + 1):
        for b in range(max_branches(k, k) + 1):
            ks = np.array([min(k, s.max_new_drafts) for s in seqs])
            bs = np.minimum(b, [max_branches(x, x) for x in ks])
            rate = expected_tokens(accept, ks, bs).sum() / policy.cost.seconds(len(seqs), rows_of_round(k, b))
            best = max(best, (rate, (k, b)))
    return best


@pytest.mark.parametrize("per_step, per_row, acceptance, batch", [
    (1.0, 0.0, [0.9] * 7, 1),  # rows are free: the longest stride and every branch
    (1.0, 0.0, [0.2] * 7, 1),
    (1.0, 1.0, [0.9] * 7, 1),  # rows cost as much as the step: AR
    (1.0, 0.02, [0.6] * 7, 4),
    (1.0, 0.02, [0.6] * 7, 64),  # more load, shorter rounds
    (1.0, 0.005, [0.95, 0.9, 0.8, 0.5, 0.3, 0.2, 0.1], 16),
])
def test_adaptive_choice_follows_expected_throughput(per_step, per_row, acceptance, batch):
    policy = StridePolicy("adaptive", None, timed_as_priced(rigged_cost(per_step, per_row), batch))
    seqs = seqs_with(acceptance, batch)
    policy.plan(seqs)
    k, b = seqs[0].num_new, seqs[0].num_branches
    assert all((s.num_new, s.num_branches) == (k, b) for s in seqs)
    rate = lambda kk, bb: (expected_tokens(policy._acceptance(seqs, 7), np.full(batch, kk),  # noqa: E731
                                           np.full(batch, bb)).sum()
                           / policy.cost.seconds(batch, rows_of_round(kk, bb)))
    ar_rate = rate(0, 0)
    best_rate, _ = brute_force(policy, seqs)
    assert rate(k, b) >= ar_rate  # never a choice whose expected gain over AR is negative
    # the candidates it searches come within 2% of every (K, b), unless drafts gain less than the margin
    assert rate(k, b) >= 0.98 * best_rate or (k == 0 and best_rate < ROUND_MARGIN * ar_rate)
    if per_row == 0.0:
        assert k == 7 and b == max_branches(7, 7)
    if per_row == 1.0:
        assert (k, b) == (0, 0)


@pytest.mark.parametrize("gain, drafts", [(1.05, False), (1.15, True)])
def test_adaptive_rounds_must_beat_ar_by_the_margin(gain, drafts):
    """Rounds cost more than their step price says (switches, and requests finishing out of step
    so that each newcomer gets a prefill step of its own): priced only 5% better than AR steps,
    AR is chosen; 15% better, the round."""
    seqs = seqs_with([0.7] * 3, 8, stride=4)
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 0.0))
    accept = policy._acceptance(seqs, 3)
    shapes = [(k, b) for k in range(1, 4) for b in range(max_branches(k, k) + 1)]
    most = max(expected_tokens(accept, np.full(8, k), np.full(8, b)).mean() for k, b in shapes)
    price = most / gain  # every round shape costs this (AR 1): the best round is `gain` x AR

    def measure(batch):
        return {1: 1.0, 2: price, 64: price}

    policy = StridePolicy("adaptive", None, timed_as_priced(StepCost.whole_tables(measure, 64), 8),
                          replan_every=1)
    policy.plan(seqs)
    assert (seqs[0].num_new > 0) == drafts
    n, total = policy.priced[8]  # what `idlm bench` reports: the best round's priced rate over AR's, no margin
    assert n == 1 and total == pytest.approx(gain)


def test_adaptive_shortens_rounds_as_the_batch_grows():
    cost = rigged_cost(1.0, 0.004)
    policy = StridePolicy("adaptive", None, cost)
    chosen = []
    for batch in (1, 8, 64):
        timed_as_priced(cost, batch)
        seqs = seqs_with([0.7] * 7, batch)
        policy.plan(seqs)
        chosen.append(rows_of_round(seqs[0].num_new, seqs[0].num_branches))
    assert chosen[0] > chosen[1] > chosen[2]


def test_seeded_sampled_requests_keep_their_stride_whatever_the_load():
    """Their tokens depend on the rounds' shape, which a measured cost would make vary."""
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 0.004))
    mine = seqs_with([0.7] * 7, 1, temperature=1.0, seed=5)[0]
    crowd = seqs_with([0.7] * 7, 63)
    for batch in ([mine], [mine] + crowd):
        policy.plan(batch)
        assert (mine.num_new, mine.num_branches) == (7, 7)
    assert (crowd[0].num_new, crowd[0].num_branches) != (7, 7)  # the unseeded ones follow the load


def test_fixed_requests_keep_their_stride_and_branch_cap():
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 1.0))
    fixed = seqs_with([0.1] * 3, 1, stride=4, stride_policy="fixed", branches=1)[0]
    ar = Sequence([2], SamplingParams(mode="ar", temperature=0), seed=0)
    policy.plan([fixed, ar])
    assert (fixed.num_new, fixed.num_branches, ar.num_new, ar.num_branches) == (3, 1, 0, 0)


def test_step_cost_interpolates_then_trusts_the_steps_that_ran():
    measured = []

    def measure(batch):
        measured.append(batch)
        return {1: 1.0 * batch, 16: 2.0 * batch}

    cost = StepCost.whole_tables(measure, 64)
    assert cost.seconds(1, 1) == 1.0 and cost.seconds(1, 16) == 2.0 and cost.seconds(1, 31) == 3.0
    assert cost.seconds(4, 1) == 4.0 and measured == [1, 4]
    assert 4.0 < cost.seconds(8, 1) < 16.0 and measured == [1, 4, 16]
    for _ in range(3):  # steps of 16 rows ran 1.5 times as long as the table says (the engine's own work)
        cost.observe(1, 16, 3.0)
    assert cost.seconds(1, 16) == 3.0  # seen often enough: the median of its steps
    assert cost.seconds(1, 1) == pytest.approx(1.5)  # not seen: the table scaled as the seen steps were
    cost.observe(1, 1, 1.0)  # one-row steps ran as the table said: the scale now grows with rows
    assert cost.seconds(1, 4) == pytest.approx((1 + 3 / 15) * (1 + 0.5 * 3 / 15))
    assert cost.seconds(8, 16) == pytest.approx(20.0 * 1.5)  # another batch size: the nearest one's scale
    cost.observe(64, 1, 100.0)  # a batch size never asked about: measures nothing, learns nothing
    assert measured == [1, 4, 16] and (64, 1) not in cost.seen
    cost.observe(1, 16, 300.0)  # a step that captured a graph: the median shrugs it off
    assert cost.seconds(1, 16) == 3.0


def test_step_cost_learnt_from_long_rounds_never_prices_an_ar_step_at_or_below_zero():
    """On a GPU the table's host-built, synchronous steps cost more than real steps: 64 requests,
    table 2.95 ms for 1 row, 6.34 for 4 and 7.81 for 16, real rounds of 16 rows 4.3 ms. Learnt as a
    difference (-3.5 ms), that priced an AR step below zero, and AR was never chosen."""
    cost = StepCost.whole_tables(lambda batch: {1: 2.95e-3, 4: 6.34e-3, 16: 7.81e-3}, 64, buckets=[64])
    cost.measure_up_to(64)
    for _ in range(3):
        cost.observe(64, 16, 4.3e-3)
    assert cost.seconds(64, 1) == pytest.approx(2.95e-3 * 4.3 / 7.81)
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    seqs = seqs_with([0.3] * 3, 64, stride=4)
    policy.plan(seqs)
    assert seqs[0].num_new == 0  # 1.6 ms an AR step against 4.3 ms a round: AR, at this acceptance


def test_eager_step_cost_times_few_rows_and_extrapolates_in_proportion(idlm_dir):
    """Without graphs a step's rows cost about the same each, and timing a step of 16 requests x
    16 rows took seconds on a CPU: past EAGER_MAX_ROWS rows in all, the table extrapolates."""
    from idlm.engine.step_cost import EAGER_MAX_ROWS, measure_step_cost

    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096, max_num_seqs=16)
    cost = measure_step_cost(llm.engine.runner, 16)
    cost.measure_up_to(16)
    assert sorted(cost.table[1]) == [1, 4, 16] and sorted(cost.table[16]) == [1]
    assert all(batch * rows <= EAGER_MAX_ROWS or rows == 1 for batch, t in cost.table.items() for rows in t)
    assert cost.seconds(16, 4) == pytest.approx(4 * cost.seconds(16, 1))


def test_a_server_measures_every_batch_size_before_it_serves(idlm_dir, capsys, monkeypatch):
    """`idlm serve` prices the adaptive policy's batch sizes at start, not inside a running batch;
    where the defaults do not adapt there is nothing to price."""
    import idlm.server.serve
    from idlm.cli import build_parser
    from idlm.cli.serve import run

    engines = []
    monkeypatch.setattr(idlm.server.serve, "serve", lambda engine, *args, **kwargs: engines.append(engine))
    for policy in ("adaptive", "fixed"):
        run(build_parser().parse_args(["serve", str(idlm_dir), "--device", "cpu", "--kv-cache-tokens", "4096",
                                       "--max-num-seqs", "16", "--stride-policy", policy]))
    adaptive, fixed = engines
    assert sorted(adaptive.policy.cost.table) == [p for p in adaptive.policy.cost.points if p <= 16]
    assert not fixed.policy.cost.table
    assert capsys.readouterr().out.count("decode steps up to 16 requests timed (the adaptive stride's prices)") == 1


def test_with_cuda_graphs_every_decode_shape_is_prepared_whatever_the_policy(idlm_dir):
    """Where decode steps replay CUDA graphs, preparing them captures every bucket's shapes (by
    timing them) even under a fixed default policy: else a batch meeting a new bucket stalls for its
    captures. Without graphs a fixed policy has nothing to prepare."""
    import math

    from idlm.engine.kv_pool import MAX_LOOKAHEAD

    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096, max_num_seqs=8, stride_policy="fixed")
    engine = llm.engine
    assert engine.prepare_decode_steps() is None
    engine.runner.use_padded_decode(8, engine.max_model_len + MAX_LOOKAHEAD, cuda_graphs=False)
    engine.runner.decode_graphs.use_graphs = True  # (as on a GPU; nothing runs here)
    calls = []
    engine.policy.cost.measure_up_to = lambda batch, rows=math.inf: calls.append((batch, rows))
    assert engine.prepare_decode_steps() is not None
    k = engine.defaults["stride"] - 1  # the default stride's rounds, branches and all: no longer ones
    assert calls == [(8, rows_of_round(k, max_branches(k, k)))]


def test_step_cost_with_graph_buckets_charges_the_padded_bucket():
    cost = StepCost.whole_tables(lambda batch: {1: float(batch), 16: 2.0 * batch}, 8, buckets=[1, 2, 4, 8])
    cost.measure_up_to(3)
    assert sorted(cost.table) == [1, 2, 4]
    assert cost.seconds(3, 1) == 4.0 and cost.seconds(5, 16) == 16.0 and cost.seconds(2, 1) == 2.0


def test_adaptive_engine_is_exact_and_reports_its_choices(idlm_dir):
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096)
    prompts = [[2, 3, 4, 5], [6, 7, 8], [9, 2], [3, 3, 3, 3, 3]]
    greedy = dict(temperature=0, max_tokens=30, ignore_eos=True)
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))]
    llm.engine.policy.cost = rigged_cost(1.0, 0.0)  # rows are free: the policy must go multi-token
    outs = llm.generate(prompts, SamplingParams(mode="isd", stride=4, stride_policy="adaptive", **greedy))
    assert [o.token_ids for o in outs] == ar
    assert sum(o.stats["verify_rounds"] for o in outs) > 0 and max(llm.engine.policy.chosen) == 3
    llm.engine.policy.cost = rigged_cost(1.0, 10.0)  # rows are dear: AR steps, but for a look now and then
    chosen = llm.engine.policy.chosen
    chosen.clear()
    outs = llm.generate(prompts, SamplingParams(mode="isd", stride=4, stride_policy="adaptive", **greedy))
    assert [o.token_ids for o in outs] == ar and chosen[0] >= 0.9 * sum(chosen.values())
    assert sum(o.stats["forwards"] for o in outs) >= 0.9 * sum(o.stats["tokens"] for o in outs)


def test_a_decode_step_costs_until_the_next_step_starts(idlm_dir):
    """The caller's work between steps (here a sleep) is part of what a decode step costs: the
    policy must see it, or it underprices rounds whose outputs take longer to handle."""
    import time

    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096)
    engine = llm.engine
    engine.policy.cost = cost = rigged_cost(0.001, 0.0)
    cost.measure_up_to(1)
    engine.add_request([2, 3, 4], SamplingParams(mode="ar", max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        time.sleep(0.02)
    # 8 tokens: 1 prefill step, then 7 decode steps; the first follows the prefill (the request joined
    # the decode batch then) and the last has no next step: both untimed
    (steps,) = cost.seen.values()
    assert len(steps) == 5 and min(steps) >= 0.02


def test_a_step_that_captured_a_graph_is_not_timed(idlm_dir):
    """A first sighting of a shape captures its graphs and compiles their kernels (on an H200 a look at
    a 16-row round took 53-76 ms against 2): timed, that priced rounds out of use for good."""
    import itertools

    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096)
    engine = llm.engine
    engine.policy.cost = cost = rigged_cost(0.001, 0.0)
    cost.measure_up_to(1)
    calls = itertools.count()
    engine.runner.graphs_captured = lambda: int(next(calls) >= 4)  # a graph is captured during the 4th step
    engine.add_request([2, 3, 4], SamplingParams(mode="ar", max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    (steps,) = cost.seen.values()
    assert len(steps) == 4  # 5 decode steps are timed otherwise (the test above)


def test_only_steps_of_the_same_requests_as_the_step_before_are_timed(idlm_dir):
    """The first decode step after a request joins or leaves carries that change's work whatever its
    shape (and the policy replans just then): charged to its shape, it priced AR steps 30% too high
    at 64 requests with refills on an H200."""
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096)
    engine = llm.engine
    engine.policy.cost = cost = rigged_cost(0.001, 0.0)
    cost.measure_up_to(4)
    greedy = dict(mode="ar", ignore_eos=True)
    engine.add_request([2, 3, 4], SamplingParams(max_tokens=12, **greedy))
    engine.add_request([5, 6], SamplingParams(max_tokens=4, **greedy))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        if steps == 6:
            engine.add_request([7, 8, 9], SamplingParams(max_tokens=4, **greedy))
    timed = sum(len(v) for v in cost.seen.values())
    decode_steps = steps - 2  # one prefill step each for the first two together and the third
    # untimed: the first decode step, the first after the short request left, the first after the
    # third joined, the first after it left, and the last
    assert steps == 13 and timed == decode_steps - 5, (steps, timed, dict(cost.seen))


def test_adaptive_looks_at_drafts_at_once_then_now_and_then_when_ar_wins():
    """AR wins at this acceptance. A round never timed near this batch size is looked at at once,
    later ones after EXPLORE_EVERY plans chose AR, twice as many after each look that AR still won, up
    to EXPLORE_MAX; a look lasts LOOK_STEPS steps (its first steps are a cold round and graph captures,
    which are not timed), or until MIN_SEEN steps of its round were timed. On an H200 two-step looks
    never timed a round, and the policy ran 0.6x the fixed stride."""
    cost = rigged_cost(1.0, 0.1)
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    seqs = seqs_with([0.1] * 3, 4, stride=4)
    ks = []
    for _ in range(8 * EXPLORE_MAX):
        policy.plan(seqs)
        ks.append(seqs[0].num_new)
    starts, every = [0], EXPLORE_EVERY
    while True:  # each look AR wins: the next one after twice as many AR plans
        every = min(2 * every, EXPLORE_MAX)
        nxt = starts[-1] + LOOK_STEPS + every - 1
        if nxt >= len(ks):
            break
        starts.append(nxt)
    assert [i for i, k in enumerate(ks) if k > 0] == [
        i for start in starts for i in range(start, start + LOOK_STEPS) if i < len(ks)]
    assert starts[-1] - starts[-2] == LOOK_STEPS + EXPLORE_MAX - 1  # the interval stops growing
    # ... even when plans are otherwise kept for 16 steps
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 0.1))
    ks = []
    for _ in range(16 * 2 * EXPLORE_EVERY + LOOK_STEPS):
        policy.plan(seqs)
        ks.append(seqs[0].num_new)
    second = LOOK_STEPS + 16 * (2 * EXPLORE_EVERY - 1)
    assert [i for i, k in enumerate(ks) if k > 0] == list(range(LOOK_STEPS)) + list(range(second, second + LOOK_STEPS))
    # a look ends once its round was timed
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    policy.plan(seqs)
    rows = rows_of_round(seqs[0].num_new, seqs[0].num_branches)
    assert seqs[0].num_new > 0
    for _ in range(MIN_SEEN):
        policy.plan(seqs)
        assert seqs[0].num_new > 0
        cost.observe(4, rows, cost.seconds(4, rows))
    policy.plan(seqs)
    assert seqs[0].num_new == 0


def test_a_choice_of_drafts_brings_the_looks_back_to_their_first_interval():
    """Looks grow rarer while AR keeps winning; once rounds win again (the requests' drafts got
    better), the next run of AR plans looks after EXPLORE_EVERY of them again."""
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 0.1), replan_every=1)
    poor, good = seqs_with([0.1] * 3, 4, stride=4), seqs_with([0.95] * 3, 4, stride=4)

    def first_look(seqs) -> int:
        for i in range(4 * EXPLORE_MAX):
            policy.plan(seqs)
            if seqs[0].num_new:
                return i
        raise AssertionError("no look")

    first_look(poor)
    for _ in range(LOOK_STEPS - 1):  # the rest of the look
        policy.plan(poor)
    assert first_look(poor) == 2 * EXPLORE_EVERY - 1  # AR won the first look: the next after twice as many
    for _ in range(LOOK_STEPS - 1):
        policy.plan(poor)
    for _ in range(MIN_SEEN):  # (AR steps were timed: no look at them)
        policy.cost.observe(4, 1, policy.cost.seconds(4, 1))
    policy.plan(good)
    assert good[0].num_new > 0  # rounds win
    assert first_look(poor) == EXPLORE_EVERY - 1


def test_a_plan_taken_back_counts_for_nothing():
    """Overlap scheduling plans a step before the outcome of the one in flight; where that plan changes,
    or the step cannot be built ahead, the step is given back and planned again. Counted twice, a look
    lasted half its steps (on an H200 one step: its cold round), and K chosen counted plans, not steps."""
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 0.1), replan_every=1)
    seqs = seqs_with([0.1] * 3, 4, stride=4)
    for _ in range(LOOK_STEPS):
        planned = policy.state()
        policy.plan(seqs)
        policy.restore(planned)
        policy.plan(seqs)
        assert seqs[0].num_new > 0
    policy.plan(seqs)
    assert seqs[0].num_new == 0 and sum(policy.chosen.values()) == LOOK_STEPS + 1


def test_adaptive_does_not_look_at_rounds_that_cannot_pay():
    """Rows so dear that a round loses even if every draft were accepted (as on a CPU, where a
    round cost 3 AR steps): looking at drafts would only cost."""
    policy = StridePolicy("adaptive", None, rigged_cost(1.0, 1.0), replan_every=1)
    seqs = seqs_with([0.1] * 3, 4, stride=4)
    for _ in range(3 * EXPLORE_EVERY):
        policy.plan(seqs)
        assert seqs[0].num_new == 0


@pytest.mark.parametrize("fade", [True, False])
def test_a_request_sent_to_ar_by_a_bad_streak_comes_back_to_rounds(monkeypatch, fade):
    """Rounds pay at the engine's acceptance; one request's first eight rounds rejected every draft,
    so it goes AR. An AR step tests no drafts, so without the fade its counts would never move and it
    would stay AR to its end (no look comes: its rounds were timed, and few plans chose AR); with it,
    its own counts fade with the tokens it commits, and rounds come back."""
    import idlm.engine.stride_policy as stride_policy

    if not fade:
        monkeypatch.setattr(stride_policy, "OWN_FADE", 1.0)
    cost = timed_as_priced(StepCost.whole_tables(lambda batch: {1: 1.0, 2: 1.5, 64: 1.5}, 64), 1)
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    for accepted, times in enumerate((300, 210, 147, 343)):  # the engine's rounds: 0.7 at each position
        policy.observe("isd", 3, accepted, times)
    (seq,) = seqs_with([], 1, stride=4)
    seq.stats.drafts.record(3, 0, times=12)
    policy.plan([seq])
    assert seq.num_new == 0
    seq.tokens_since_verify = 30  # thirty AR steps later
    policy.plan([seq])
    assert (seq.num_new > 0) == fade


def test_the_engine_counts_the_tokens_a_request_commits_without_testing_drafts(idlm_dir):
    llm = LLM(str(idlm_dir), progress=False, kv_cache_tokens=4096)
    engine = llm.engine
    engine.policy.cost = rigged_cost(1.0, 0.0)  # rows are free: rounds
    request = engine.add_request([2, 3, 4], SamplingParams(mode="isd", stride=4, stride_policy="adaptive",
                                                          temperature=0, max_tokens=80, ignore_eos=True))
    seq = engine.seqs[request]
    seen, since = [], 0
    while engine.has_unfinished():
        if len(seen) == 6:
            engine.policy.cost = rigged_cost(1.0, 10.0)  # rows are dear: AR steps from the next plan on
        before = (seq.num_output_tokens, seq.stats.verify_rounds)
        engine.step()
        committed, verified = seq.num_output_tokens - before[0], seq.stats.verify_rounds - before[1]
        seen.append(verified)
        since = 0 if verified else since + committed
        assert seq.tokens_since_verify == since
    assert seen.count(0) > 1 and 0 < sum(seen) < len(seen)  # AR steps and some rounds that tested drafts


def test_adaptive_follows_the_steps_that_ran_over_the_table():
    """The table says more rows are nearly free (multi-token wins). Steps that ran say the chosen
    round costs 5 AR steps (so, interpolated, every round with drafts loses at this acceptance);
    then that AR steps got dear."""
    cost = rigged_cost(1.0, 0.01)
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    seqs = seqs_with([0.6] * 3, 4, stride=4)
    cost.measure_up_to(4)
    for _ in range(MIN_SEEN):  # AR steps were timed at the table's price
        cost.observe(4, 1, 1.04)
    policy.plan(seqs)
    first = (seqs[0].num_new, seqs[0].num_branches)
    assert first[0] > 0
    for _ in range(3):
        cost.observe(4, 1, 1.0)
        cost.observe(4, rows_of_round(*first), 5.0)
    policy.plan(seqs)
    assert seqs[0].num_new == 0
    for _ in range(30):
        cost.observe(4, 1, 10.0)
    policy.plan(seqs)
    assert seqs[0].num_new > 0


def test_rounds_that_win_on_a_guessed_ar_price_look_at_ar_steps_once():
    """Rounds were timed (dear), AR steps never: an AR step's price is then the table's scaled by what
    rounds cost over theirs, a guess that kept a CPU on rounds that took 2.2 AR steps. Where rounds
    win on such a price, the policy times AR steps first, once near that batch size."""
    cost = rigged_cost(1.0, 0.01)
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    seqs = seqs_with([0.6] * 3, 4, stride=4)
    cost.measure_up_to(4)
    for rows in {rows_of_round(k, b) for k, b in ROUND_SHAPES if k}:
        for _ in range(MIN_SEEN):
            cost.observe(4, rows, 4.0 * cost.device_seconds(4, rows))
    policy.plan(seqs)
    assert seqs[0].num_new == 0  # a look at AR steps
    for _ in range(MIN_SEEN):
        cost.observe(4, 1, 1.0)  # they cost what the table said
    policy.plan(seqs)
    assert seqs[0].num_new == 0  # AR wins on the price timed
    cost = rigged_cost(1.0, 0.01)  # rounds cheap again: they win, and AR steps are not looked at twice
    policy.cost = cost
    timed_as_priced(cost, 4)
    cost.seen.pop((4, 1))
    policy.plan(seqs)
    assert seqs[0].num_new > 0


def test_seeded_requests_with_branches_draw_the_same_tokens_alone_or_batched(idlm_dir, tmp_path):
    """Under either stride policy (adaptive keeps a seeded, sampled request's stride fixed)."""
    from helpers import make_random_adapter

    llm = LLM(str(idlm_dir), adapter=str(make_random_adapter(idlm_dir, tmp_path / "a")), progress=False,
              kv_cache_tokens=4096)
    prompts = [[2 + i % 9, 3, 4 + i % 5] * (1 + i % 3) for i in range(8)]
    for mode, policy in (("isd", "fixed"), ("risd", "adaptive")):
        params = [SamplingParams(mode=mode, stride=4, temperature=1.0, seed=i, max_tokens=24, ignore_eos=True,
                                 stride_policy=policy) for i in range(len(prompts))]
        batched = llm.generate(prompts, params)
        assert sum(o.stats["branch_rounds"] for o in batched) > 0
        assert [o.token_ids for o in batched] == [llm.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]


def test_one_head_call_reads_the_rows_each_outcome_takes_its_new_drafts_from():
    """With a row-independent head (the CPU's) a round takes all its logits in one call, new-draft
    rows for every outcome included: the rows picked for an outcome must be the ones the round's
    own rule gives (a bonus: the main chain's MASK rows; a rejection at j < branches: branch j's),
    over random layouts and outcomes."""
    from idlm.engine.round_step import new_draft_candidates, picked_candidates

    gen = torch.Generator().manual_seed(0)
    picked_branch = 0
    for _ in range(300):
        b, k = (int(x) for x in torch.randint(1, 7, (2,), generator=gen))
        num_new = torch.randint(0, k + 1, (b,), generator=gen)
        branches = (torch.rand(b, generator=gen) * (num_new + 1).float()).long()  # at most num_new
        num_drafts = torch.randint(0, k + 1, (b,), generator=gen)
        accepted = (torch.rand(b, generator=gen) * (num_drafts + 1).float()).long()
        main_rows = torch.randint(0, 60, (b,), generator=gen)
        t = dict(main_rows=main_rows, branch_rows=main_rows + num_new, num_new=num_new, branches=branches)
        num_rows = 70
        candidates = new_draft_candidates(t, k, int(branches.max()), num_rows)
        bonus = accepted == num_drafts
        picked = candidates.flatten()[picked_candidates(candidates, bonus, accepted)]
        first = torch.where(bonus, main_rows, t["branch_rows"] + accepted * num_new)
        want = (first[:, None] + torch.arange(k)).clamp(max=num_rows - 1)
        has_new = (bonus | (accepted < branches)) & (num_new > 0)
        assert torch.equal(picked[has_new], want[has_new])
        picked_branch += int((has_new & ~bonus & (accepted > 0)).sum())
    assert picked_branch > 20  # branches past the first were picked, not only B_1 and the main chain


def test_step_cost_table_is_measured_only_as_far_as_the_rounds_asked_about():
    """A batch size's table is measured up to the widest round the policy asks about (a stride of 4:
    16 rows), and further only when a wider one is asked about; measure_up_to measures it whole."""
    from idlm.engine.step_cost import ROUND_SHAPES

    measured = []

    def extend(batch, have, up_to):
        costs = dict(have)
        for rows in sorted({rows_of_round(k, b) for k, b in ROUND_SHAPES}):
            if rows in costs:
                continue
            if rows > up_to:
                return costs, up_to
            measured.append((batch, rows))
            costs[rows] = 1.0 + 0.01 * rows
        return costs, float("inf")

    cost = StepCost(extend, 8, buckets=[1, 2, 4, 8])
    policy = StridePolicy("adaptive", None, cost, replan_every=1)
    policy.plan(seqs_with([0.6] * 3, 4, stride=4))
    assert measured and max(rows for _, rows in measured) == rows_of_round(3, max_branches(3, 3))
    assert {batch for batch, _ in measured} == {4}
    before = len(measured)
    for _ in range(MIN_SEEN):  # the AR steps of the look at them that the first plan began
        cost.observe(4, 1, 1.01)
    policy.plan(seqs_with([0.6] * 7, 4, stride=8))  # wider rounds: the same batch size's table goes on
    assert len(measured) > before and all(rows > rows_of_round(3, max_branches(3, 3)) for _, rows in
                                          measured[before:])
    cost.measure_up_to(2)
    assert {batch for batch, _ in measured} == {1, 2, 4}
    assert max(rows for batch, rows in measured if batch == 1) == max(rows_of_round(k, b) for k, b in ROUND_SHAPES)
