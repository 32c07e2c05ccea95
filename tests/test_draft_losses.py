"""The acceptance-driven draft losses (KL(p || q), 1 - sum(min(p, q)), the expected accepted run): values by
hand, gradients against finite differences, zero at q = p, and short training runs with each of them."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import counting_data, make_model

from idlm.kernels.attention import DenseAttention
from idlm.models.loader import load_model
from idlm.training import objective
from idlm.training.config import build_config
from idlm.training.data import Example, collate
from idlm.training.objective import draft_terms, length_weights, loss_targets, summed_draft_loss
from idlm.training.trainer import Trainer

P = [0.5, 0.3, 0.2]
Q = [0.2, 0.5, 0.3]


def logits(probs, shift=0.0):
    return torch.tensor(probs, dtype=torch.float64).log()[None] + shift  # a shift leaves the softmax as it is


def test_kl_and_tv_by_hand():
    p, q = logits(P, 1.7), logits(Q, -0.4)
    kl, accept = draft_terms(q, p, "kl")
    expected_kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)  # float32 softmax inside
    assert accept.item() == pytest.approx(0.2 + 0.3 + 0.2, abs=1e-6)  # sum(min(p, q))
    tv, _ = draft_terms(q, p, "tv")
    assert tv.item() == pytest.approx(0.3, abs=1e-6)  # = 0.5 * sum|p - q| = (0.3 + 0.2 + 0.1) / 2
    ce, _ = draft_terms(q, p, "ce", targets=torch.tensor([1]))
    assert ce.item() == pytest.approx(-math.log(0.5), abs=1e-6)  # ce ignores p: -log q(target)
    mixed, _ = draft_terms(q, p, "tv", kl_weight=0.25)
    assert mixed.item() == pytest.approx(0.3 + 0.25 * expected_kl, abs=1e-6)
    # KL is not symmetric; TV is
    kl_back, _ = draft_terms(p, q, "kl")
    assert kl_back.item() == pytest.approx(0.2 * math.log(0.2 / 0.5) + 0.5 * math.log(0.5 / 0.3)
                                           + 0.3 * math.log(0.3 / 0.2), abs=1e-6)
    assert draft_terms(p, q, "tv")[0].item() == pytest.approx(0.3, abs=1e-6)
    with pytest.raises(ValueError, match="draft loss"):
        draft_terms(q, p, "js")


def test_the_losses_vanish_at_q_equal_p():
    torch.manual_seed(0)
    p = torch.randn(5, 11, dtype=torch.float64) * 3
    q = (p + 2.5).clone().requires_grad_(True)  # the same distributions, other logits
    for kind in ("kl", "tv"):
        loss, accept = draft_terms(q, p, kind)
        torch.testing.assert_close(loss, torch.zeros(5, dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(accept, torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(draft_terms(q, p, "kl")[0].sum(), q)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)  # KL's minimum
    # and they are positive away from it
    other = torch.randn(5, 11, dtype=torch.float64)
    assert (draft_terms(other, p, "kl")[0] > 1e-3).all() and (draft_terms(other, p, "tv")[0] > 1e-3).all()


@pytest.mark.parametrize("kind, kl_weight", [("kl", 0.0), ("tv", 0.0), ("ce", 0.0), ("tv", 0.1)])
def test_gradients_match_finite_differences(kind, kl_weight, monkeypatch):
    torch.manual_seed(1)
    q = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (4,))
    assert torch.autograd.gradcheck(lambda q: draft_terms(q, p, kind, kl_weight, targets)[0], (q,))

    # the whole chunked path: hidden -> LM head -> loss, chunks of 3 rows recomputed in backward
    monkeypatch.setattr(objective, "LOSS_CHUNK_ROWS", 3)
    head = torch.nn.Linear(5, 7, bias=False).double()
    hidden = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(8, 5, dtype=torch.float64)
    t = torch.randint(0, 7, (8,))
    assert torch.autograd.gradcheck(lambda h: summed_draft_loss(h, teacher, head, t, kind, kl_weight)[0], (hidden,))
    # the teacher gets no gradient; the head does (it trains in full mode)
    teacher.requires_grad_(True)
    loss, accept = summed_draft_loss(hidden, teacher, head, t, kind, kl_weight)
    loss.backward()
    assert teacher.grad is None and head.weight.grad is not None and not accept.requires_grad
    with torch.no_grad():
        expected = torch.minimum(torch.softmax(head(teacher), -1), torch.softmax(head(hidden), -1)).sum(-1)
    torch.testing.assert_close(accept, expected)


def test_length_weights_by_hand():
    # three runs: rows 0-2 (draft positions 1-3), rows 5-6 (positions 2-3: a response that starts inside its
    # block), row 7 (position 1 again: the next block)
    a = torch.tensor([0.5, 0.4, 0.3, 0.6, 0.7, 0.8], dtype=torch.float64)
    w = length_weights(a, torch.tensor([0, 1, 2, 1, 2, 0]), torch.tensor([0, 1, 2, 5, 6, 7]))
    expected = [1 + 0.4 + 0.4 * 0.3, 0.5 * (1 + 0.3), 0.5 * 0.4, 1 + 0.7, 0.6, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    # positions that rise across a gap in the rows are two runs (another block, or another sample)
    gap = length_weights(a[:2], torch.tensor([0, 2]), torch.tensor([0, 3]))
    torch.testing.assert_close(gap, torch.ones(2, dtype=torch.float64))
    assert len(length_weights(a[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))) == 0


def test_length_loss_has_the_gradient_of_minus_the_expected_accepted_run(monkeypatch):
    """sum_j w_j (1 - a_j), w detached, against E = sum_k prod_{m<=k} a_m differentiated whole; and zero at q = p."""
    monkeypatch.setattr(objective, "LOSS_CHUNK_ROWS", 3)  # the weights' first pass and the loss both chunked
    torch.manual_seed(3)
    head = torch.nn.Linear(5, 7, bias=False).double()
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(7, 5, dtype=torch.float64)
    block_pos, rows = torch.tensor([0, 1, 2, 0, 1, 2, 1]), torch.tensor([0, 1, 2, 3, 4, 5, 9])
    t = torch.zeros(7, dtype=torch.long)
    loss, accept = summed_draft_loss(hidden, teacher, head, t, "length", block_pos=block_pos, rows=rows)
    (grad,) = torch.autograd.grad(loss, hidden)
    a = torch.minimum(torch.softmax(head(teacher), -1), torch.softmax(head(hidden), -1)).sum(-1)
    runs = [a[0:3], a[3:6], a[6:7]]
    expected_run = sum(torch.cumprod(run, 0).sum() for run in runs)
    (grad_e,) = torch.autograd.grad(expected_run, hidden)
    torch.testing.assert_close(grad, -grad_e)
    torch.testing.assert_close(accept, a.detach())
    # plain tv weighs every position alike: not the same gradient
    (grad_tv,) = torch.autograd.grad(summed_draft_loss(hidden, teacher, head, t, "tv")[0], hidden)
    assert not torch.allclose(grad_tv, grad)
    same, _ = summed_draft_loss(teacher.clone().requires_grad_(True), teacher, head, t, "length", block_pos=block_pos,
                                rows=rows)
    assert abs(same.item()) < 1e-9
    with pytest.raises(ValueError, match="draft position"):
        summed_draft_loss(hidden, teacher, head, t, "length")


def test_the_mask_id_is_left_out_of_p_and_q():
    torch.manual_seed(2)
    head = torch.nn.Linear(4, 6, bias=False)
    hidden = torch.randn(3, 4)
    teacher = hidden.clone()
    with torch.no_grad():
        head.weight[5] = 0.0
    loss_same, _ = summed_draft_loss(hidden, teacher, head, torch.zeros(3, dtype=torch.long), "tv", banned=5)
    assert loss_same.item() == pytest.approx(0.0, abs=1e-6)
    teacher_far = torch.randn(3, 4)
    for kind in ("kl", "tv"):
        with_mask, _ = summed_draft_loss(hidden, teacher_far, head, torch.zeros(3, dtype=torch.long), kind, banned=5)
        with torch.no_grad():
            q = torch.softmax(head(hidden)[:, :5], -1)
            p = torch.softmax(head(teacher_far)[:, :5], -1)
        by_hand = (p * (p.log() - q.log())).sum() if kind == "kl" else (1 - torch.minimum(p, q).sum(-1)).sum()
        assert with_mask.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_teacher_rows_are_the_clean_rows_at_the_same_position():
    rows = [[Example([5, 6, 7, 8, 9, 10], [False, False, True, True, True, True])],
            [Example([5, 6, 7], [False, True, True]), Example([4, 4, 4, 4], [False, False, True, True])]]
    batch = collate(rows, pad_id=0)
    length = batch.input_ids.shape[1]
    t = loss_targets(batch, block=2)
    assert torch.equal(t.teacher_rows, t.noisy_rows + length)
    # the clean row at a MASK row's position predicts the same next token: it is among the CE_clean rows
    assert set(t.teacher_rows.tolist()) <= set(t.clean_rows.tolist())
    flat_pos = batch.positions.flatten()
    col = t.noisy_rows % (2 * length)
    row = t.noisy_rows // (2 * length)
    assert torch.equal(t.block_pos, flat_pos.view(len(rows), length)[row, col] % 2)
    assert loss_targets(batch, sdar_masked=batch.response).teacher_rows is None


# ---------------------------------------------------------------- training runs


def tiny(tmp_path, **overrides):
    base = tmp_path / "base"
    if not base.exists():
        make_model(base, "llama")
    data = counting_data(tmp_path / "data.jsonl", 64)
    raw = {"model": str(base), "data": [str(data)], "output_dir": str(tmp_path / "out"), "max_len": 32,
           "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "packing": False, "progress": False,
           "stages": [{"stride": 4, "steps": 6}]}
    raw.update(overrides)
    return build_config(raw, "test")


@pytest.mark.parametrize("kind", ["ce", "kl", "tv", "length"])
def test_risd_training_with_each_draft_loss_keeps_the_base(tmp_path, kind):
    trainer = Trainer(tiny(tmp_path, mode="lora", draft_loss=kind, output_dir=str(tmp_path / kind)))
    before = {k: v.clone() for k, v in trainer.model.hf_state_dict().items()}
    trainer.train()
    after = trainer.model.hf_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if n.endswith("lora_B.0"))
    # gated clean rows (gate 0) are the base model bit for bit
    base = load_model(tmp_path / "base", torch.float32, trainer.device, progress=False)
    ids, pos = torch.tensor([[5, 6, 7, 8, 9]]), torch.arange(5)[None]
    with torch.no_grad():
        clean = trainer.model(ids, pos, DenseAttention(), lora_gate=torch.zeros(1, 5))
        assert torch.equal(clean, base(ids, pos, DenseAttention()))
        assert not torch.equal(trainer.model(ids, pos, DenseAttention(), lora_gate=torch.ones(1, 5)), clean)
    log = [json.loads(line) for line in (tmp_path / kind / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6
    for r in log:
        assert len(r["acceptance"]) == 3 and all(0.0 <= a <= 1.0 for a in r["acceptance"])
        assert r["response_tokens"] > 0 and r.get("draft_loss", "ce") == kind
        if kind == "tv":  # one minus the mean acceptance of the step's MASK rows, summed over its 12
            # MASK rows per example (the last response token, EOS, has no next token) / 13 response tokens
            assert r["ce_noisy"] == pytest.approx((1 - r["acceptance_mean"]) * 12 / 13, abs=1e-4)


@pytest.mark.parametrize("kind", ["tv", "length"])
def test_acceptance_driven_training_raises_the_expected_acceptance(tmp_path, kind):
    """The logged acceptance moves the right way under its own loss (counting language, 40 steps)."""
    cfg = tiny(tmp_path, mode="lora", draft_loss=kind, stages=[{"stride": 3, "steps": 40}], lr=1e-2)
    Trainer(cfg).train()
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    first = sum(r["acceptance_mean"] for r in log[:5]) / 5
    last = sum(r["acceptance_mean"] for r in log[-5:]) / 5
    assert last > first + 0.1, (first, last)


def test_conversion_with_kl_noisy_stream_keeps_ce_clean(tmp_path):
    trainer = Trainer(tiny(tmp_path, draft_loss="kl", stages=[{"stride": 3, "steps": 3, "clean_weight": "auto"}]))
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert all(r["ce_clean"] > 0 and r["ce_noisy"] >= 0 and len(r["acceptance"]) == 2 for r in log)


def test_draft_loss_config_is_checked(tmp_path):
    with pytest.raises(ValueError, match="draft_loss must be one of"):
        tiny(tmp_path, draft_loss="js")
    with pytest.raises(ValueError, match="objective sdar"):
        tiny(tmp_path, objective="sdar", draft_loss="kl")
    with pytest.raises(ValueError, match="draft_kl_weight"):
        tiny(tmp_path, draft_kl_weight=-1)
    assert tiny(tmp_path, draft_kl_weight="1e-1").draft_kl_weight == pytest.approx(0.1)


def test_held_out_acceptance_is_logged_every_eval_every_steps(tmp_path):
    held_out = counting_data(tmp_path / "held_out.jsonl", 10, seed=7)
    trainer = Trainer(tiny(tmp_path, mode="lora", draft_loss="kl", eval_data=str(held_out), eval_every=4,
                           stages=[{"stride": 3, "steps": 6}]))
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_acceptance" in r] == [4, 6]  # every 4 steps and at the end
    final = log[-1]
    assert len(final["eval_acceptance"]) == 2 and 0 < final["eval_acceptance_mean"] <= 1
    again = trainer.evaluate_acceptance()  # a pure function of the weights
    assert again["eval_acceptance"] == final["eval_acceptance"]
    # the noisy loss logged for held-out data is KL here: >= 0
    assert final["eval_noisy_loss"] >= 0

    # scripts/plot_scaling.py: held-out points at the cumulative clean tokens of steps 4 and 6
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_scaling.py"
    spec = importlib.util.spec_from_file_location("plot_scaling", script)
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    argv = sys.argv
    try:
        sys.argv = ["plot_scaling.py", f"kl={tmp_path / 'out' / 'log.jsonl'}", "-o", str(tmp_path / "curve")]
        plot.main()
    finally:
        sys.argv = argv
    curve = json.loads((tmp_path / "curve.json").read_text())["kl"]
    tokens = [sum(r["tokens"] // 2 for r in log[:n]) for n in (4, 6)]
    assert [p["tokens"] for p in curve["held_out"]] == tokens and curve["final_tokens"] == tokens[-1]
    assert curve["held_out"][-1]["acceptance"] == final["eval_acceptance"]
    assert (tmp_path / "curve.png").stat().st_size > 1000
