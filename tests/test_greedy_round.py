"""A round whose requests are all greedy runs from argmax tokens (round_step.run_round with
rounds.verify_greedy): the same verdict, new drafts, q and carry as the general path's one-hot
distributions, over random rounds with accepts and rejections, branches, every proposal, the
ratio test with any alpha, a banned token, and each way the round gets its logits."""

import pytest
import torch
from helpers import make_small_idlm

from idlm import LLM
from idlm.decoding.rounds import PROPOSALS
from idlm.engine.round_step import FLOATS, RoundExtras, RoundShape, run_round
from idlm.kernels.cpu_gemm import row_tiled_linear


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_small_idlm(tmp_path_factory.mktemp("idlm"), spread=0.25, vocab=12)
    return LLM(str(folder), progress=False, kv_cache_tokens=1024).engine.model


def random_round(model, gen: torch.Generator, b: int, kmax: int, tokens: int):
    """hidden rows of b requests (T = tokens each) and round inputs in round_inputs' layout, whose
    drafts mostly match their target rows' argmax, so that rounds accept some and reject some."""
    hidden = torch.randn(b * tokens, model.cfg.hidden_size, generator=gen)
    argmax = model.logits(hidden).argmax(-1)
    rand = lambda hi, *shape: torch.randint(0, hi, shape, generator=gen)  # noqa: E731
    rows, drafts, per = [], [], {name: [] for name in ("d", "k", "br", "main", "branch")}
    for i in range(b):
        start = i * tokens
        d, k = int(rand(kmax + 1)), int(rand(kmax + 1))
        br = int(rand(d + 1))
        rows += list(range(start, start + d + 1)) + [start] * (kmax - d)
        mine = [int(argmax[start + j]) if rand(10) < 7 else int(rand(12)) for j in range(d)]
        # past its drafts a request's rows repeat its pending row; a padding draft that matches that
        # row's argmax must still not be accepted
        drafts += mine + [int(argmax[start]) if rand(2) else 0] * (kmax - d)
        for name, value in zip(per, (d, k, br, start + 1 + d, start + 1 + d + k)):
            per[name].append(value)
    proposal, seeds, positions = rand(len(PROPOSALS), b), rand(1000, b), 20 + rand(100, b)
    spec, top_k = rand(2, b), torch.zeros(b, dtype=torch.long)
    ints = torch.cat([torch.tensor(rows, dtype=torch.long), torch.tensor(drafts, dtype=torch.long)]
                     + [torch.tensor(v) for v in per.values()]
                     + [proposal, seeds, positions, spec, top_k])
    alpha = torch.tensor([1.0, 0.5, 2.0])[rand(3, b)]
    floats = torch.cat([torch.zeros(b), torch.ones(b), alpha, torch.zeros(b)])
    assert len(floats) == len(FLOATS) * b
    stored = torch.randn(b * kmax, model.cfg.hidden_size, generator=gen)
    draft_q = torch.where(rand(2, b * kmax) > 0, torch.rand(b * kmax, generator=gen) + 0.05, torch.ones(b * kmax))
    return hidden, ints, floats, stored, draft_q


@pytest.mark.parametrize("logits_from", ["head", "all_logits", "one_head_call"])
@pytest.mark.parametrize("banned", [None, 3])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_round_equals_the_general_round(model, logits_from, banned, seed):
    gen = torch.Generator().manual_seed(seed)
    b, kmax, tokens = 5, [3, 0, 2, 3][seed], 16
    hidden, ints, floats, stored, draft_q = random_round(model, gen, b, kmax, tokens)
    shape = RoundShape(b, kmax, kmax, True, False, False)
    head = model.lm_head
    if logits_from == "one_head_call":
        model.lm_head = row_tiled_linear(head)
        assert model.head_rows_independent()
    all_logits = model.logits(hidden) if logits_from == "all_logits" else None
    try:
        runs = [run_round(model, hidden, None if all_logits is None else all_logits.clone(), ints, floats, stored,
                          draft_q, shape, banned, extras) for extras in (None, RoundExtras())]
    finally:
        model.lm_head = head
    fast, general = runs
    assert fast.names == general.names
    assert torch.equal(fast.packed, general.packed)
    assert torch.equal(fast.carry, general.carry)
    for a, c in ((fast.new_q, general.new_q), (fast.new_hidden, general.new_hidden)):
        assert (a is None and c is None) or torch.equal(a, c)
    values = dict(zip((n for n, _ in fast.names), fast.packed.split([s for _, s in fast.names])))
    if kmax:  # the rounds accept some drafts and reject others
        rows = values["accepted"]
        assert (rows > 0).any() and (rows < ints[b * (2 * kmax + 1):b * (2 * kmax + 2)]).any(), rows
