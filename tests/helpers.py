"""Tiny random models and a word-level tokenizer, built inside the tests (nothing downloaded)."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from idlm.kernels.attention import PagedBatch

WORDS = ("the a cat dog sat on mat and ran to park big small red blue one two three four five "
         "six seven eight nine ten is was he she it we they hello world yes no why how what "
         "water fire tree sun moon star day night good bad up down").split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def make_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["[UNK]"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def vocab_size() -> int:
    return len(SPECIALS) + 1 + len(WORDS)


def hf_config(kind: str, **overrides):
    common = dict(SHAPE, vocab_size=vocab_size(), bos_token_id=0, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=10000.0)
    if kind in ("qwen3", "sdar"):
        return transformers.Qwen3Config(**common, head_dim=16, rope_theta=10000.0)
    raise ValueError(kind)


def make_model(folder: Path, kind: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model saved as an HF folder with a tokenizer; `sdar` packages the Qwen3 one like
    the I-DLM release (model_type sdar, block_size, mask_token_id)."""
    torch.manual_seed(seed)
    cfg = hf_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.1).add_(1.0 if p.ndim == 1 else 0.0)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer(folder)
    if kind == "sdar":
        raw = json.loads((folder / "config.json").read_text())
        raw.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=3,
                   mask_token_id=SPECIALS.index("<|mask|>"))
        (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return model.eval()


def make_small_idlm(folder: Path, spread: float = 0.25, vocab: int = 12, seed: int = 0,
                    rig: str | None = None) -> Path:
    """A vocabulary-`vocab` Qwen3 packaged as an I-DLM (MASK = last id), token ids only.

    Embeddings are one shared vector plus `spread` noise, so MASK rows guess the clean rows'
    distributions well enough for drafts to be accepted often, but not always.
    rig="always": every row predicts the same distribution (every draft matches at greedy);
    rig="never": each row predicts a fixed function of its own token, and no clean token
    predicts what the MASK rows guess (no draft ever matches at greedy)."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=vocab, max_position_embeddings=256,
                                   bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.1).add_(1.0 if p.ndim == 1 else 0.0)
        emb = model.model.embed_tokens.weight
        emb.copy_(emb[0:1] + spread * torch.randn_like(emb))
        if rig:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        if rig == "always":
            emb.copy_(emb[0:1].expand_as(emb))
        elif rig == "never":
            normed = model.model.norm(emb)
            model.lm_head.weight.copy_(10 * normed.roll(1, dims=0))  # row t predicts t + 1 (mod vocab)
    model.save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="sdar", architectures=["SDARForCausalLM"], mask_token_id=vocab - 1, block_size=3)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    return folder


def make_random_adapter(model_folder: Path, out: Path, rank: int = 4, scale: float = 0.2, seed: int = 0,
                        mask_token_id: int | None = None) -> Path:
    """A random, non-zero gated-LoRA adapter for the model in model_folder."""
    from idlm.models.loader import load_model
    from idlm.models.lora import AdapterConfig, attach_lora, save_adapter

    model = load_model(model_folder, torch.float32, "cpu", progress=False)
    acfg = AdapterConfig(rank=rank, alpha=2.0 * rank, mask_token_id=mask_token_id)
    attach_lora(model, acfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_lora." in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    save_adapter(model, out, acfg)
    return out


NUMBERS = "one two three four five six seven eight nine ten".split()


def counting_data(path: Path, n: int, seed: int = 0, prompt_len: int = 3, completion_len: int = 12) -> Path:
    """A learnable synthetic language: count on cyclically from where the prompt stops."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            start = rng.randrange(len(NUMBERS))
            words = [NUMBERS[(start + i) % len(NUMBERS)] for i in range(prompt_len + completion_len)]
            f.write(json.dumps({"prompt": " ".join(words[:prompt_len]),
                                "completion": " " + " ".join(words[prompt_len:])}) + "\n")
    return path


@contextlib.contextmanager
def serve_process(model_dir: Path, log: Path, *extra: str, launcher: list[str] | None = None):
    """A real `idlm serve` on a free loopback port; yields (process, base URL), stops it after
    (SIGTERM, then SIGKILL). `launcher` replaces the `idlm` command (it gets the arguments after)."""
    exe = Path(sys.executable).with_name("idlm")
    cmd = launcher or ([str(exe)] if exe.exists() else [sys.executable, "-m", "idlm"])
    cmd = [*cmd, "serve", str(model_dir), "--port", "0", "--device", "cpu", "--kv-cache-tokens", "4096",
           "--shutdown-timeout", "1", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 90
        while "idlm: ready" not in log.read_text():
            assert proc.poll() is None, f"idlm serve exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"idlm serve not ready after 90 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield proc, re.search(r"at (http://127\.0\.0\.1:\d+) ", log.read_text()).group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def count_results(owner, name: str, counts=lambda result: result is not None) -> list[int]:
    """[calls of owner.name whose result `counts`], counted from now on."""
    count, fn = [0], getattr(owner, name)

    def counted(*args):
        result = fn(*args)
        count[0] += bool(counts(result))
        return result

    setattr(owner, name, counted)
    return count


def count_launches_ahead(runner) -> list[int]:
    """[decode steps the runner launched ahead (overlap scheduling)], counted from now on."""
    return count_results(runner, "launch_next")


def count_prefills_ahead(engine) -> list[int]:
    """[prefill steps launched while a decode step was in flight], counted from now on."""
    return count_results(engine.scheduler, "schedule_prefill")


def count_launches_after_prefill(engine) -> list[int]:
    """[decode steps launched ahead while a prefill step was in flight, its prompts' requests in
    them], counted from now on."""
    return count_results(engine.runner, "launch_next", lambda pending: pending is not None
                         and engine.last_batch.is_prefill)


def paged_batch(seqs, block: int, tree=None):
    """A PagedBatch for seqs: (context length after the writes, new rows, block table); tree: per
    sequence (tree rows, the bits of each) or None."""
    starts = [0]
    for _, rows, _ in seqs:
        starts.append(starts[-1] + rows)
    width = max(len(t) for _, _, t in seqs)
    slots = [t[p // block] * block + p % block for ctx, rows, t in seqs for p in range(ctx - rows, ctx)]
    batch = PagedBatch(slot_mapping=torch.tensor(slots), query_start=starts,
                       context_lens=torch.tensor([c for c, _, _ in seqs]),
                       block_tables=torch.tensor([t + [-1] * (width - len(t)) for _, _, t in seqs]).int(),
                       max_context_len=max(c for c, _, _ in seqs), max_query_len=max(r for _, r, _ in seqs))
    if tree is not None:
        bits = []
        for (_, rows, _), (tree_rows, tree_bits) in zip(seqs, tree):
            bits += [0] * (rows - tree_rows) + tree_bits
        batch.tree_bits = torch.tensor(bits)
        batch.tree_rows = torch.tensor([t for t, _ in tree]).int()
    return batch
