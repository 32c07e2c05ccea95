"""Token distributions (temperature, top-k, top-p, greedy) and the counter-based draws."""

import math

import torch

from idlm.decoding.noise import Stream, uniform
from idlm.decoding.sampling import SamplingTensors, draw, token_probs


def tensors(*rows):
    return SamplingTensors.build(list(rows), torch.device("cpu"))


def test_temperature_top_k_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(4, 1)
    st = tensors((1.0, 0, 1.0, 0), (1.0, 2, 1.0, 0), (1.0, 0, 0.65, 0), (0.0, 0, 1.0, 0))
    p = token_probs(logits, st)
    torch.testing.assert_close(p[0], torch.tensor([0.4, 0.3, 0.2, 0.1]))
    torch.testing.assert_close(p[1], torch.tensor([4 / 7, 3 / 7, 0, 0]))
    torch.testing.assert_close(p[2], torch.tensor([4 / 7, 3 / 7, 0, 0]))  # 0.4 < 0.65 <= 0.7 keeps two
    torch.testing.assert_close(p[3], torch.tensor([1.0, 0, 0, 0]))
    half = token_probs(logits[:1], tensors((0.5, 0, 1.0, 0)))[0]
    torch.testing.assert_close(half, torch.tensor([16, 9, 4, 1]) / 30.0)


def test_banned_token_never_drawn():
    logits = torch.tensor([[0.0, 9.0, 0.0]])
    assert token_probs(logits, tensors((0.0, 0, 1.0, 0)), banned_token=1)[0, 1] == 0
    assert token_probs(logits, tensors((1.0, 0, 1.0, 0)), banned_token=1)[0, 1] == 0


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.125])
    n = 40000
    rows = probs.repeat(n, 1)
    tokens = draw(rows, uniform(torch.full((n,), 123), torch.arange(n), Stream.TARGET))
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[3] == 0
    expected = probs.double() * n
    keep = expected > 0
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 16.3  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_draws_are_a_function_of_seed_position_stream():
    seeds, pos = torch.tensor([5, 5, 6]), torch.tensor([10, 11, 10])
    u = uniform(seeds, pos, Stream.TARGET)
    assert torch.equal(u, uniform(seeds, pos, Stream.TARGET))
    assert len(set(u.tolist())) == 3
    assert not torch.equal(u, uniform(seeds, pos, Stream.DRAFT))
    assert 0 < float(u.min()) and float(u.max()) < 1


def test_uniforms_look_uniform():
    u = uniform(torch.arange(50000), torch.full((50000,), 3), Stream.ACCEPT)
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.003
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    chi2 = float(((hist - 5000) ** 2 / 5000).sum())
    assert chi2 < 27.9  # 99.9% quantile, 9 degrees of freedom


def test_greedy_draw_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    st = tensors(*[(0.0, 0, 1.0, i) for i in range(6)])
    got = draw(token_probs(logits, st), uniform(st.seeds, torch.arange(6), Stream.TARGET), st.all_greedy)
    assert torch.equal(got, logits.argmax(-1))
    assert not math.isnan(float(token_probs(logits, st).sum()))
