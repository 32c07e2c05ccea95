"""Introspective-consistency training: the mask, the losses, gated LoRA, resume, learning signal."""

import json
import random

import pytest
import torch
from helpers import counting_data, make_model, make_tokenizer

from idlm import LLM, SamplingParams
from idlm.kernels.attention import DenseAttention
from idlm.models.loader import load_model
from idlm.models.lora import read_adapter_config
from idlm.training.config import build_config, load_train_config
from idlm.training.data import Example, collate, load_examples, make_rows
from idlm.training.objective import (
    allowed,
    block_diffusion_noise,
    combine,
    dense_mask,
    double,
    flex_block_mask,
    loss_targets,
    summed_ce,
)
from idlm.training.trainer import Trainer

# ---------------------------------------------------------------- the attention mask


def brute_force_mask(rows: list[list[Example]], length: int, block: int, bidirectional: bool = False) -> torch.Tensor:
    """The three rules written out position by position, on the [x_t | x_0] layout (bidirectional:
    the sdar baseline's x_t blocks)."""
    out = torch.zeros(len(rows), 2 * length, 2 * length, dtype=torch.bool)
    for r, row in enumerate(rows):
        meta = []  # (sample, position) per token of the clean half, None for padding
        for s, ex in enumerate(row):
            meta += [(s, p) for p in range(len(ex.input_ids))]
        meta += [None] * (length - len(meta))
        for q in range(2 * length):
            for k in range(2 * length):
                mq, mk = meta[q % length], meta[k % length]
                if mq is None:
                    out[r, q, k] = q == k
                    continue
                if mk is None or mq[0] != mk[0]:
                    continue
                (_, pq), (_, pk) = mq, mk
                q_noisy, k_noisy = q < length, k < length
                if q_noisy and k_noisy:
                    out[r, q, k] = pq // block == pk // block and (pk <= pq or bidirectional)
                elif q_noisy:
                    out[r, q, k] = pk // block < pq // block
                elif not k_noisy:
                    out[r, q, k] = pk <= pq
    return out


def random_rows(rng: random.Random, packed: bool) -> list[list[Example]]:
    rows = []
    for _ in range(3):
        row = []
        for _ in range(rng.randint(1, 3) if packed else 1):
            n = rng.randint(1, 9)
            split = rng.randint(0, n - 1)
            row.append(Example(list(range(5, 5 + n)), [i >= split for i in range(n)]))
        rows.append(row)
    return rows


@pytest.mark.parametrize("block", [1, 2, 3, 4])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mask_equals_brute_force(block, packed, bidirectional):
    from torch.nn.attention.flex_attention import create_mask

    rng = random.Random(block * 10 + packed)
    for _ in range(4):
        rows = random_rows(rng, packed)
        batch = collate(rows, pad_id=0)
        db = double(batch, mask_token_id=3)
        expected = brute_force_mask(rows, batch.input_ids.shape[1], block, bidirectional)
        assert torch.equal(dense_mask(db, block, bidirectional), expected)
        _, mask_mod = flex_block_mask(db, block, bidirectional)
        rows_n, length = db.input_ids.shape
        flex = create_mask(mask_mod, rows_n, 1, length, length, device="cpu")[:, 0]
        assert torch.equal(flex, expected)


def test_block_one_mask_sees_only_itself_and_the_clean_prefix():
    q = torch.tensor(True), torch.tensor(5), torch.tensor(0)
    for k_noisy, k_pos, expect in [(True, 5, True), (True, 4, False), (False, 4, True), (False, 5, False)]:
        got = allowed(q[0], torch.tensor(k_noisy), q[1], torch.tensor(k_pos), q[2], torch.tensor(0), 1)
        assert bool(got) == expect


# ---------------------------------------------------------------- the losses


def test_loss_targets_never_use_prompt_tokens():
    ex = Example([10, 11, 12, 13, 14, 15], [False, False, False, True, True, True])
    t = loss_targets(collate([[ex]], pad_id=0))
    length = 6
    # noisy: MASK positions 3, 4 predict response tokens 14, 15 (position 2 is prompt, not MASK)
    assert t.noisy_rows.tolist() == [3, 4] and t.noisy_targets.tolist() == [14, 15]
    # clean: positions 2, 3, 4 of x_0 predict the response tokens 13, 14, 15
    assert t.clean_rows.tolist() == [length + 2, length + 3, length + 4]
    assert t.clean_targets.tolist() == [13, 14, 15]
    assert t.num_response == 3
    packed = collate([[ex, Example([20, 21], [False, True])]], pad_id=0)
    tp = loss_targets(packed)
    assert 21 in tp.clean_targets.tolist() and 20 not in tp.noisy_targets.tolist() + tp.clean_targets.tolist()
    assert 15 in tp.noisy_targets.tolist() and len(tp.noisy_targets) == 2  # nothing crosses into sample 2


def test_sdar_noise_and_targets():
    """sdar: only response tokens are MASKed, at a ratio shared inside a block, and each MASK
    predicts its own token; CE_noisy averages over the MASKs."""
    ex = Example(list(range(10, 30)), [i >= 4 for i in range(20)])
    batch = collate([[ex]] * 64, pad_id=0)
    masked = block_diffusion_noise(batch, 4, torch.Generator().manual_seed(0))
    assert not masked[:, :4].any() and masked.any() and not masked.all()
    again = block_diffusion_noise(batch, 4, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)
    fraction = masked[:, 4:].float().mean().item()
    assert 0.4 < fraction < 0.6  # E[t] = 1/2
    per_block = masked[:, 4:].float().view(64, 4, 4).mean(-1)  # blocks 1..4 (positions 4..19)
    assert ((per_block == 0) | (per_block == 1)).float().mean() > 0.3  # ratios drawn per block, not per token
    t = loss_targets(batch, masked)
    assert t.num_noisy == int(masked.sum()) and t.num_response == 64 * 16
    assert torch.equal(t.noisy_targets, batch.input_ids[masked])
    assert torch.equal(t.noisy_rows, (torch.arange(64)[:, None] * 40 + torch.arange(20)[None])[masked])
    db = double(batch, mask_token_id=3, masked=masked)
    assert torch.equal(db.input_ids[:, :20] == 3, masked) and torch.equal(db.is_mask[:, :20], masked)


def test_loss_values_by_hand():
    """Two MASK positions with known logits, clean weight 0.2: L = CE_noisy + 0.2 * CE_clean."""
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 2))
    hidden = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # uniform, then favours token 0
    targets = torch.tensor([1, 0, 2])
    sums = summed_ce(hidden, head, targets)
    logz = torch.log(torch.tensor(2.0 + torch.e))
    expected = 2 * torch.log(torch.tensor(3.0)) + (logz - 1)
    torch.testing.assert_close(sums, expected)
    noisy, clean = torch.tensor(3.0), torch.tensor(1.5)
    losses = combine(noisy, clean, num_response=3, num_clean=3, clean_weight=0.2, denominator=3)
    torch.testing.assert_close(losses.loss, torch.tensor(1.0 + 0.2 * 0.5))
    half = combine(noisy, clean, num_response=3, num_clean=3, clean_weight=0.2, denominator=6)
    torch.testing.assert_close(half.loss, torch.tensor(1.1 / 2))  # this micro-batch holds half the step
    sdar = combine(noisy, clean, num_response=3, num_clean=3, clean_weight=0.2, denominator=6, num_noisy=2)
    torch.testing.assert_close(sdar.loss, torch.tensor((1.5 + 0.2 * 0.5) / 2))  # CE_noisy over 2 MASKs


def test_auto_balance_gradient():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    noisy_sum, clean_sum = (w ** 2).sum() * 3, (w.exp()).sum()
    losses = combine(noisy_sum, clean_sum, num_response=2, num_clean=4, clean_weight="auto", denominator=2)
    (grad_auto,) = torch.autograd.grad(losses.loss, w, retain_graph=True)
    ce_noisy, ce_clean = noisy_sum / 2, clean_sum / 4
    weight = float(ce_noisy / ce_clean)
    (g_noisy,) = torch.autograd.grad(ce_noisy, w, retain_graph=True)
    (g_clean,) = torch.autograd.grad(ce_clean, w)
    torch.testing.assert_close(grad_auto, g_noisy + weight * g_clean)
    assert losses.weight == pytest.approx(weight)
    torch.testing.assert_close(losses.loss, 2 * ce_noisy)


# ---------------------------------------------------------------- data and config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_data_formats_and_truncation(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "yes no"}]},
        {"prompt": "the cat", "completion": " sat on the mat"},
        {"text": "one two three four five six seven eight nine ten one two"},
    ]) + "\n")
    examples, report = load_examples([path], tokenizer, max_len=10)
    chat, pc, text = examples
    words = lambda ids: tokenizer.convert_ids_to_tokens(ids)  # noqa: E731
    assert [t for t, r in zip(words(chat.input_ids), chat.response) if r] == ["yes", "no", "<|im_end|>"]
    assert [t for t, r in zip(words(pc.input_ids), pc.response) if r] == ["sat", "on", "the", "mat", "<|im_end|>"]
    assert all(text.response) and len(text.input_ids) == 10
    assert report.truncated == 1 and report.tokens_cut == 2
    rows = make_rows(examples, max_len=20, packing=True)
    assert [len(r) for r in rows] == [2, 1]


@pytest.mark.parametrize("content, fragment", [
    ('{"text": "hi"}\n{"text": \n', ":2: "),
    ('{"text": "hi"}\n[1, 2]\n', ":2: each line must be a JSON object"),
    ('{"prompt": "a"}\n', ":1: 'prompt' and 'completion' must both be strings"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', ":1: a chat example needs at least one assistant"),
    ('{"title": "x"}\n', ":1: expected a 'messages'"),
    ("\n\n", "holds no usable example"),
])
def test_bad_data_is_reported_with_file_and_line(tmp_path, tokenizer, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")) as info:
        load_examples([path], tokenizer, max_len=16)
    if ":" in fragment:
        assert str(path) in str(info.value)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        build_config({"data": ["x"], "output_dir": "o", "learning_rate": 1}, "cfg.yaml")
    with pytest.raises(ValueError, match="missing required key 'data'"):
        build_config({"output_dir": "o"}, "cfg.yaml")
    with pytest.raises(ValueError, match="stage 0: unknown key 'n'"):
        build_config({"data": ["x"], "output_dir": "o", "stages": [{"n": 2}]}, "cfg.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("data: [a.jsonl]\noutput_dir: out\nlr: 1e-5\n")
    cfg = load_train_config(path, ["--lr", "3e-4", "--packing", "false", "--micro-batch-size", "2"])
    assert cfg.lr == 3e-4 and cfg.packing is False and cfg.micro_batch_size == 2
    with pytest.raises(ValueError, match="unknown config key 'bogus'"):
        load_train_config(path, ["--bogus", "1"])


# ---------------------------------------------------------------- training runs


def tiny_setup(tmp_path, n=64, **overrides):
    base = tmp_path / "base"
    if not base.exists():
        make_model(base, "llama")
    data = counting_data(tmp_path / "data.jsonl", n)
    raw = {"model": str(base), "data": [str(data)], "output_dir": str(tmp_path / "out"), "max_len": 32,
           "micro_batch_size": 4, "lr": 3e-3, "packing": False, "progress": False,
           "stages": [{"stride": 2, "steps": 4}, {"stride": 3, "steps": 4, "clean_weight": "auto"}]}
    raw.update(overrides)
    return build_config(raw, "test")


def test_gated_lora_training_keeps_the_base_model(tmp_path):
    cfg = tiny_setup(tmp_path, mode="lora")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.hf_state_dict().items()}
    final = trainer.train()
    after = trainer.model.hf_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if n.endswith("lora_B.0"))
    assert (final / "adapter_model.safetensors").is_file() and (final / "mask_embedding.safetensors").is_file()
    device = trainer.device
    base = load_model(tmp_path / "base", torch.float32, device, progress=False)
    ids, pos = torch.tensor([[5, 6, 7, 8]], device=device), torch.arange(4, device=device)[None]
    with torch.no_grad():
        clean = trainer.model(ids, pos, DenseAttention(), lora_gate=torch.zeros(1, 4, device=device))
        assert torch.equal(clean, base(ids, pos, DenseAttention()))
    llm = LLM(str(tmp_path / "base"), adapter=str(final), progress=False, kv_cache_tokens=1024)
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    assert (llm.generate([[5, 6, 7]], SamplingParams(mode="risd", **greedy))[0].token_ids
            == llm.generate([[5, 6, 7]], SamplingParams(mode="ar", **greedy))[0].token_ids)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and [r["stride"] for r in log] == [2] * 4 + [3] * 4
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


def test_bfloat16_adapter_file_keeps_risd_exact(tmp_path):
    from safetensors.torch import load_file

    final = Trainer(tiny_setup(tmp_path, mode="lora", save_dtype="bfloat16")).train()
    tensors = load_file(final / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert load_file(final / "mask_embedding.safetensors")["mask_embedding"].dtype == torch.float32
    llm = LLM(str(tmp_path / "base"), adapter=str(final), progress=False, kv_cache_tokens=1024)
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], [4, 5, 6, 7, 8]]
    assert ([o.token_ids for o in llm.generate(prompts, SamplingParams(mode="risd", stride=3, **greedy))]
            == [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", **greedy))])


def test_training_continues_from_a_saved_adapter(tmp_path):
    from safetensors.torch import load_file

    from idlm.models.lora import peft_state_dict

    first = Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=4, lora_alpha=8.0)).train()
    saved = load_file(first / "adapter_model.safetensors")
    second = Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=4, lora_alpha=8.0, init_adapter=str(first),
                                output_dir=str(tmp_path / "second")))
    start = peft_state_dict(second.model, second.adapter_cfg)
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    row = load_file(first / "mask_embedding.safetensors")["mask_embedding"]
    assert torch.equal(second.model.mask_embedding.detach(), row) and second.model.mask_embedding.requires_grad
    assert any(p.requires_grad for n, p in second.model.named_parameters() if n.endswith("lora_B.0"))
    with pytest.raises(ValueError, match="rank 4"):  # a larger rank must keep alpha / rank
        Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=8, init_adapter=str(first),
                           output_dir=str(tmp_path / "third")))
    with pytest.raises(ValueError, match="rank 4"):
        Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=2, lora_alpha=4.0, init_adapter=str(first),
                           output_dir=str(tmp_path / "third")))
    with pytest.raises(ValueError, match="mode lora"):
        tiny_setup(tmp_path, init_adapter=str(first))


def test_training_grows_a_saved_adapter_to_a_higher_rank(tmp_path):
    from safetensors.torch import load_file

    first = Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=4, lora_alpha=8.0)).train()
    saved = load_file(first / "adapter_model.safetensors")
    small = Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=4, lora_alpha=8.0, init_adapter=str(first),
                               output_dir=str(tmp_path / "small")))
    grown = Trainer(tiny_setup(tmp_path, mode="lora", lora_rank=8, lora_alpha=16.0, init_adapter=str(first),
                               output_dir=str(tmp_path / "grown")))
    state = {k: v.detach() for k, v in grown.model.named_parameters() if "_lora." in k}
    for k, v in state.items():
        if k.endswith("lora_A"):
            assert v.shape[0] % 8 == 0 and all(v[s * 8 + 4:(s + 1) * 8].abs().sum() > 0 for s in range(len(v) // 8))
        else:
            assert v.shape[1] == 8 and torch.equal(v[:, 4:], torch.zeros_like(v[:, 4:]))
    assert sum(v.numel() for v in saved.values()) * 2 == sum(v.numel() for v in state.values())
    ids, pos = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.arange(6)[None]
    gate = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    with torch.no_grad():
        want = small.model(ids, pos, DenseAttention(), lora_gate=gate)
        assert not torch.equal(want, small.model(ids, pos, DenseAttention(), lora_gate=torch.zeros_like(gate)))
        torch.testing.assert_close(grown.model(ids, pos, DenseAttention(), lora_gate=gate), want,
                                   rtol=1e-5, atol=1e-5)
    final = grown.train()
    assert read_adapter_config(final).rank == 8


def test_clean_loss_kl_holds_the_clean_stream_to_the_starting_model(tmp_path):
    import torch.nn.functional as F

    stages = [{"stride": 2, "steps": 3, "clean_weight": 1.0}, {"stride": 3, "steps": 3, "clean_weight": 1.0}]
    trainer = Trainer(tiny_setup(tmp_path, clean_loss="kl", draft_loss="tv", stages=stages))
    anchor = trainer.objective.anchor
    start = {k: v.clone() for k, v in anchor.state_dict().items()}
    assert not any(p.requires_grad for p in anchor.parameters())
    assert not any(p is q for p in anchor.parameters() for q in trainer.trainable)
    # the clean loss on one batch against KL(p0 || p) by hand, with the model moved off its start
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    batch = collate(trainer.rows[:4], 0)
    db = double(batch, trainer.mask_id)
    attn = DenseAttention(dense_mask(db, 2))
    targets = loss_targets(batch, None, 2)
    _, clean, _ = trainer.objective(db, attn, targets.noisy_rows, targets.noisy_targets, targets.clean_rows,
                                    targets.clean_targets, targets.teacher_rows, targets.block_pos)
    with torch.no_grad():
        rows = targets.clean_rows
        model = trainer.model
        logp0 = F.log_softmax(anchor.lm_head(anchor(db.input_ids, db.positions, attn, None).flatten(0, 1)[rows]), -1)
        logp = F.log_softmax(model.lm_head(model(db.input_ids, db.positions, attn, None).flatten(0, 1)[rows]), -1)
        mask = trainer.mask_id
        if mask < logp.shape[-1]:  # the MASK token is left out of both, as the engine never samples it
            logp0 = F.log_softmax(logp0.index_fill(-1, torch.tensor([mask]), -1e9), -1)
            logp = F.log_softmax(logp.index_fill(-1, torch.tensor([mask]), -1e9), -1)
        want = (logp0.exp() * (logp0 - logp)).sum()
    assert want > 1e-3
    torch.testing.assert_close(clean, want, rtol=1e-4, atol=1e-6)
    # a run from the start: the first step's clean loss is ~0 (the model is its anchor; the forward with
    # autograd may take other kernels), the anchor never moves
    trainer = Trainer(tiny_setup(tmp_path, clean_loss="kl", draft_loss="tv", stages=stages,
                                 output_dir=str(tmp_path / "run")))
    start = {k: v.clone() for k, v in trainer.objective.anchor.state_dict().items()}
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["ce_clean"] < 1e-6 < log[-1]["ce_clean"] and log[0]["clean_loss"] == "kl"
    after = trainer.objective.anchor.state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start)
    assert not all(torch.equal(start[k], v) for k, v in trainer.model.state_dict().items() if k in start)
    for bad, match in [(dict(clean_loss="kl", stages=[{"stride": 2, "steps": 1, "clean_weight": "auto"}]), "number"),
                       (dict(clean_loss="kl", mode="lora"), "mode full"), (dict(clean_loss="mse"), "ce or kl")]:
        with pytest.raises(ValueError, match=match):
            tiny_setup(tmp_path, **bad).validate()


def test_full_checkpoint_loads_as_idlm(tmp_path):
    final = Trainer(tiny_setup(tmp_path)).train()
    raw = json.loads((final / "config.json").read_text())
    assert raw["block_size"] == 2 and raw["vocab_size"] == raw["mask_token_id"] + 1
    llm = LLM(str(final), progress=False, kv_cache_tokens=1024)
    assert llm.engine.defaults["mode"] == "isd" and llm.engine.defaults["stride"] == 3
    assert llm.tokenizer.convert_ids_to_tokens(raw["mask_token_id"]) == "<|MASK|>"
    out = llm.generate(["three four five"], SamplingParams(temperature=0, max_tokens=6))[0]
    assert out.finish_reason in ("stop", "length")


def test_sdar_baseline_trains_and_saves_as_a_causal_model(tmp_path):
    from idlm.eval.block_diffusion import read_sdar_keys

    with pytest.raises(ValueError, match="mode full"):
        tiny_setup(tmp_path, objective="sdar", mode="lora")
    cfg = tiny_setup(tmp_path, objective="sdar")
    final = Trainer(cfg).train()
    raw = json.loads((final / "config.json").read_text())
    assert "mask_token_id" not in raw and "block_size" not in raw
    mask_id, block = read_sdar_keys(final)
    assert block == 3 and mask_id == raw["vocab_size"] - 1
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert all(r["ce_noisy"] > 0 and r["ce_clean"] > 0 for r in log)
    llm = LLM(str(final), progress=False, kv_cache_tokens=1024)
    assert llm.engine.defaults["mode"] == "ar"  # never ISD: its MASKs are not trained for it
    with pytest.raises(ValueError, match="SDAR-style baseline"):
        llm.generate([[5, 6, 7]], SamplingParams(mode="isd", max_tokens=4))


def final_weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    import subprocess
    import sys
    import time

    straight = Trainer(tiny_setup(tmp_path / "a", save_every=2, keep_checkpoints=2)).train()
    kept = sorted(p.name for p in (tmp_path / "a" / "out" / "checkpoints").iterdir())
    assert kept == ["step-0000004", "step-0000006"]  # step 8 is the final one
    cfg_path = tmp_path / "b.yaml"
    tiny = tiny_setup(tmp_path / "b", save_every=2)
    raw = {"model": tiny.model, "data": tiny.data, "output_dir": tiny.output_dir, "max_len": 32,
           "micro_batch_size": 4, "lr": 3e-3, "packing": False, "progress": False, "save_every": 2,
           "stages": [{"stride": 2, "steps": 4}, {"stride": 3, "steps": 4, "clean_weight": "auto"}]}
    cfg_path.write_text(json.dumps(raw))
    script = ("import sys, time, torch; torch.set_num_threads(1)\n"
              "import idlm.training.trainer as t\n"
              "orig = t.Trainer._train_step\n"
              "def slow(self):\n    time.sleep(0.3)\n    return orig(self)\n"
              "t.Trainer._train_step = slow\n"
              "from idlm.training.config import load_train_config\n"
              f"t.Trainer(load_train_config({str(cfg_path)!r})).train()\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    checkpoint = tmp_path / "b" / "out" / "checkpoints" / "step-0000004"
    deadline = time.time() + 120
    while not (checkpoint / "COMPLETE").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert (checkpoint / "COMPLETE").exists() and not (tmp_path / "b" / "out" / "final").exists()
    resumed = Trainer(load_train_config(cfg_path)).train()
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "out" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # steps after the checkpoint, lost with the kill, are not logged twice
    final = tmp_path / "b" / "out" / "final"
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert Trainer(load_train_config(cfg_path)).train() == final  # a finished run has nothing left to train
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp
    assert (tmp_path / "b" / "out" / "log.jsonl").read_text().count("\n") == 8


def test_conversion_raises_isd_acceptance(tmp_path):
    """Counting language, 150 CPU steps (N = 2 then 4): greedy ISD acceptance from ~0 to ~1."""
    cfg = tiny_setup(tmp_path, n=200, stages=[{"stride": 2, "steps": 50},
                                              {"stride": 4, "steps": 100, "clean_weight": "auto"}],
                     micro_batch_size=8)
    final = Trainer(cfg).train()
    prompts = ["three four five", "eight nine ten", "one two three", "six seven eight"]
    def acceptance(llm, mode):
        outs = llm.generate(prompts, SamplingParams(mode=mode, stride=4, temperature=0, max_tokens=12,
                                                    ignore_eos=True, stride_policy="fixed", branches=0))
        proposed = sum(sum(o.stats["drafts"]["reached"]) for o in outs)
        return sum(sum(o.stats["drafts"]["accepted"]) for o in outs) / proposed

    # before: the base model has no MASK token; its MASK rows (risd without adapter, base weights)
    # are what an unconverted model offers. Measured: before 0.00, after 1.00.
    before = acceptance(LLM(str(tmp_path / "base"), progress=False, kv_cache_tokens=1024), "risd")
    after = acceptance(LLM(str(final), progress=False, kv_cache_tokens=1024), "isd")
    assert before < 0.2 and after > 0.9


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The single-process reference of test_two_processes_match_one: the config file and the run's
    output folder. Both parallel modes compare against this same run (same command, inputs and
    seed, so it is trained once, not once per mode)."""
    import subprocess
    import sys

    tmp_path = tmp_path_factory.mktemp("one_process")
    cfg = tiny_setup(tmp_path)
    raw = {"model": cfg.model, "data": cfg.data, "max_len": 32, "micro_batch_size": 4, "lr": 3e-3,
           "packing": False, "progress": False,
           "stages": [{"stride": 2, "steps": 3}, {"stride": 3, "steps": 3, "clean_weight": "auto"}]}
    path = tmp_path / "ddp.yaml"
    path.write_text(json.dumps(raw | {"output_dir": str(tmp_path / "unused")}))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "idlm", "train", str(path), "--output_dir", str(tmp_path / "one"), "--grad_accum", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return path, tmp_path / "one"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel, one_process_run):
    """2 gloo ranks x 1 micro-batch of 4 rows == 1 process x 2 accumulated micro-batches of 4,
    with the model replicated (DDP) or sharded (FSDP2)."""
    import socket
    import subprocess
    import sys

    path, one_dir = one_process_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "idlm", "train", str(path), "--output_dir", str(tmp_path / "two"),
           "--grad_accum", "1", "--parallel", parallel]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = {name: [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
            for name, folder in (("one", one_dir), ("two", tmp_path / "two"))}
    assert len(logs["one"]) == len(logs["two"]) == 6
    for a, b in zip(logs["one"], logs["two"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["ce_noisy"] == pytest.approx(b["ce_noisy"], rel=1e-5)
    assert logs["one"][-1]["loss"] < logs["one"][0]["loss"]
    one, two = final_weights(one_dir / "final"), final_weights(tmp_path / "two" / "final")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_distill_writes_chat_data(tmp_path, llama_dir, capsys):
    from idlm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nwhy the sun\n\n")
    out = tmp_path / "data.jsonl"
    assert main(["distill", str(prompts), str(out), "--model", str(llama_dir), "--max-tokens", "6",
                 "--ignore-eos", "--samples-per-prompt", "2", "--temperature", "1", "--seed", "3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["messages"][0] == {"role": "user", "content": "hello world"}
    assert lines[0]["messages"][-1] != lines[2]["messages"][-1]  # two samples of one prompt differ
    assert lines[0]["messages"][-1]["role"] == "assistant"
    tokenizer = LLM(str(llama_dir), progress=False, kv_cache_tokens=512).tokenizer
    examples, _ = load_examples([out], tokenizer, max_len=64)
    assert len(examples) == 4 and all(any(ex.response) for ex in examples)


def test_distill_answers_shards_with_one_engine_and_skips_finished_ones(tmp_path, llama_dir, capsys, monkeypatch):
    from idlm.cli import distill as distill_cli
    from idlm.cli import main

    loads = []
    real_llm = distill_cli.LLM
    monkeypatch.setattr(distill_cli, "LLM", lambda **kw: loads.append(kw) or real_llm(**kw))
    shards = [tmp_path / f"p{i}.txt" for i in range(3)]
    for i, shard in enumerate(shards):
        shard.write_text(f"prompt {i} a\nprompt {i} b\n")
    outs = [tmp_path / f"a{i}.jsonl" for i in range(3)]
    outs[1].write_text("kept\n")  # answered by an earlier run
    argv = ["distill", str(shards[0]), str(outs[0]), "--more", str(shards[1]), str(outs[1]), "--more",
            str(shards[2]), str(outs[2]), "--model", str(llama_dir), "--max-tokens", "3", "--ignore-eos",
            "--kv-cache-tokens", "512", "--skip-existing"]
    assert main(argv) == 0 and len(loads) == 1
    assert outs[1].read_text() == "kept\n"
    for i in (0, 2):
        lines = [json.loads(line) for line in outs[i].read_text().splitlines()]
        assert [ex["messages"][0]["content"] for ex in lines] == [f"prompt {i} a", f"prompt {i} b"]
    assert not list(tmp_path.glob("*.tmp"))
    assert main(argv) == 0 and len(loads) == 1  # nothing left: no model loaded
    assert "nothing to distill" in capsys.readouterr().out


def test_distill_refuses_token_id_prompts(tmp_path):
    from idlm.eval.data import read_conversations

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert read_conversations(path) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    path.write_text('{"prompt_ids": [1, 2]}\n')
    with pytest.raises(ValueError, match="not prompt_ids"):
        read_conversations(path)


def test_gzipped_jsonl_prompts_are_read_as_jsonl(tmp_path):
    import gzip

    from idlm.eval.data import read_conversations

    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"prompt": "hi", "kind": "v1"}\n{"prompt": "a\\nb"}\n')
    assert read_conversations(path) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a\nb"}]]


def test_resumed_log_keeps_each_step_once(tmp_path):
    from idlm.training.trainer import keep_log_until

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    keep_log_until(log, 4)  # resuming from the checkpoint of step 4: steps 5-7 will be trained again
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    keep_log_until(log, 0)  # a run from scratch
    assert log.read_text() == ""
