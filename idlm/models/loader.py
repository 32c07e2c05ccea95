import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from idlm.kernels.cpu_gemm import RowTiledLinear
from idlm.models import gguf
from idlm.models.config import ModelConfig
from idlm.models.gguf import cached_hf_folder, default_gguf_path
from idlm.models.hub import hub_folder, is_hub_id
from idlm.models.quant import GroupQuant, QuantEmbedding, QuantLinear, concat_rows, quantize
from idlm.models.transformer import CausalLM, meta_aware_embedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# none: float weights; gguf: the GGUF file's own Q4_0/Q4_1/Q8_0 blocks; int8 / int4: float weights
# rounded on load to Q8_0 / Q4_1; auto: gguf for a quantised GGUF on the CPU, else none
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default (its GGUF is Q4_1)
QUANT_FORMATS = {"int8": "Q8_0", "int4": "Q4_1"}
# our (fused) projection -> its Hugging Face parts
PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_folder(model: str | Path | None) -> Path:
    """A Hugging Face folder for `model`: the folder itself, a cached conversion of a .gguf file,
    a hub id's snapshot in the Hugging Face cache, or (None) the embedded default model."""
    if model is None:
        return cached_hf_folder(default_gguf_path())
    path = Path(model).expanduser()
    if not path.exists() and is_hub_id(str(model)):
        return hub_folder(str(model))
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist; pass a model folder, a .gguf file or a Hugging "
                         f"Face hub id (org/name)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not .gguf; pass a model folder or a .gguf file")
        return cached_hf_folder(path)
    return path


def model_name(model: str | Path | None) -> str:
    """What users call the model: a hub id as given, a folder's name, a GGUF file's stem, or the
    embedded default's own name."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if not path.exists() and is_hub_id(str(model)):
        return str(model)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def gguf_source(model: str | Path | None) -> Path | None:
    """The GGUF file behind `model` (None: the embedded default), or None for a folder."""
    if model is None:
        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" else None


def resolve_quantization(model: str | Path | None, quantization: str, device: torch.device) -> str:
    """none, gguf, int8 or int4 for this model on this device."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    source = gguf_source(model)
    if device.type != "cpu":
        if quantization in ("auto", "none"):
            return "none"
        raise ValueError(f"quantization {quantization} runs on the CPU only; use --device cpu or --quantization none")
    if quantization == "auto":
        return "gguf" if source is not None and gguf.is_quantized(source) else "none"
    if quantization == "gguf" and source is None:
        raise ValueError("quantization gguf keeps a GGUF file's own blocks; the model is not a .gguf file: "
                         "use int8 or int4 to quantise its weights on load")
    return quantization


def cpu_has_bf16() -> bool:
    """bfloat16 arithmetic in hardware: AMX tiles or AVX-512 BF16."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def auto_dtype(device: torch.device, quantization: str) -> str:
    """bfloat16 on CUDA. On the CPU float32 (for float weights because a CPU bfloat16 GEMM's rows
    depend on how many rows it has; for quantised ones because idlm's CPU kernels take float32:
    on an AMX Xeon's 2 threads they ran the default 1.75x PyTorch's int4 kernel on bfloat16 at
    batch 1, benchmarks/RESULTS.md, issue 16), except quantised weights on a CPU that computes
    in bfloat16 where idlm's kernels do not run (not built, or IDLM_CPU_KERNEL=int4pack)."""
    if device.type == "cuda":
        return "bfloat16"
    if quantization == "none" or not cpu_has_bf16():
        return "float32"
    from idlm.kernels.group_gemm import group_gemm_module

    return "float32" if group_gemm_module() is not None else "bfloat16"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e})") from e
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights; convert the checkpoint to safetensors")
    return files


def load_model(folder: Path, dtype: torch.dtype, device: str | torch.device, progress: bool = True,
               quantization: str = "none", gguf_path: Path | None = None) -> CausalLM:
    """quantization (resolved: none, gguf, int8, int4): gguf builds the model from gguf_path's
    quantised blocks; int8 / int4 load float weights and quantise every projection. With a
    gguf_path, float weights come from its dequantised copy in the cache."""
    if quantization == "gguf":
        return load_gguf_quantized(folder, gguf_path, dtype)
    if gguf_path is not None:  # int8 / int4 round from the exact float32 values
        folder = gguf.float_folder(gguf_path, dtype if quantization == "none" else torch.float32)
    model = _load_float_model(folder, dtype, device, progress)
    if quantization in QUANT_FORMATS:
        quantize_model(model, QUANT_FORMATS[quantization])
    return model


def _load_float_model(folder: Path, dtype: torch.dtype, device: str | torch.device, progress: bool) -> CausalLM:
    cfg = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)  # allocated once, already in the target dtype
    model.rotary.inv_freq = torch.tensor(cfg.rope_inv_freq(), dtype=torch.float32, device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if cfg.random_weights:
        init_random_weights(model)
    else:
        load_weights(model, safetensors_files(folder), progress)
    return model.eval().requires_grad_(False)


def quantize_model(model: CausalLM, fmt: str) -> None:
    """Every projection becomes QuantLinear in `fmt`; the embedding and the head stay float, the
    head padded to whole row tiles (kernels/cpu_gemm.py)."""
    if model.lm_head.weight.device.type != "cpu":
        raise ValueError("quantised weights run on the CPU only")
    for layer in model.model.layers:
        for path in PROJECTIONS:
            owner, _, attr = path.rpartition(".")
            linear = layer.get_submodule(path)
            weight = quantize(linear.weight, fmt)
            setattr(layer.get_submodule(owner), attr,
                    QuantLinear(weight, linear.bias, cpu_kernel(fmt, model.lm_head.weight.dtype)))
    head = RowTiledLinear(model.cfg.hidden_size, model.cfg.vocab_size, bias=False, device="meta")
    head.weight = model.lm_head.weight
    model.lm_head = head


def load_gguf_quantized(folder: Path, gguf_path: Path, dtype: torch.dtype) -> CausalLM:
    """The model of a quantised GGUF (CPU): the projections run on the file's blocks; the head and
    the norms are float; a quantised embedding, tied or not, dequantises the rows it looks up."""
    cfg = ModelConfig.from_folder(folder)
    tensors = gguf.quantized_tensors(gguf_path)
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
    for i, layer in enumerate(model.model.layers):
        for path, parts in PROJECTIONS.items():
            owner, _, attr = path.rpartition(".")
            weights = [tensors.pop(f"model.layers.{i}.{p}.weight") for p in parts]
            setattr(layer.get_submodule(owner), attr, _linear(concat_weights(weights), dtype))
    embed = tensors.pop("model.embed_tokens.weight")
    head = tensors.pop("lm_head.weight", embed)
    if isinstance(head, GroupQuant) and head.fmt == "Q8_0" and cpu_kernel(head.fmt, dtype) == "group":
        # the file's codes as the head (float32 logits; the embedding's rows share them, tied or
        # not): 31 MB read a step where the float head read 113 MB
        model.lm_head = QuantLinear(head, kernel="group")
    else:
        # a float head: the int4 kernel's bfloat16 output would round logits near 25 to steps of
        # 0.125 and tie the top tokens. On meta first: a CPU head would first be filled with
        # random numbers (~0.25 s of every start)
        model.lm_head = RowTiledLinear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta", dtype=dtype)
        model.lm_head.weight = nn.Parameter(_float(head, dtype), requires_grad=False)
    if isinstance(embed, GroupQuant):
        # rows dequantised on lookup: the head's values, and a tied head's float table then serves the
        # head alone, which lets it go once the head has a packed copy (CausalLM.store_head_column_major)
        model.model.embed_tokens = QuantEmbedding(embed, dtype)
        if head is embed and isinstance(model.lm_head, QuantLinear):  # tied: one copy of the codes
            for name in ("codes", "scale"):  # (Q8_0: no offset)
                setattr(model.model.embed_tokens, name, getattr(model.lm_head, name))
    elif cfg.tie_word_embeddings:
        with torch.device("meta"):
            model.model.embed_tokens = meta_aware_embedding(cfg.vocab_size, cfg.hidden_size)
        model.model.embed_tokens.weight = model.lm_head.weight  # one tensor, also once made column-major
    else:
        model.model.embed_tokens = nn.Embedding.from_pretrained(embed.to(dtype), freeze=True)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                # (torch.empty, not empty_like: empty_like of a meta tensor imports sympy, ~0.7 s)
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False))
    model.rotary.inv_freq = torch.tensor(cfg.rope_inv_freq(), dtype=torch.float32)
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in params or params[name].shape != tensor.shape:
            raise ValueError(f"{gguf_path}: tensor {name!r} of shape {tuple(tensor.shape)} does not fit the model")
        with torch.no_grad():
            params[name].copy_(tensor)
    return model.eval().requires_grad_(False)


def concat_weights(parts: list[GroupQuant | torch.Tensor]) -> GroupQuant | torch.Tensor:
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    if all(isinstance(p, GroupQuant) for p in parts):
        return concat_rows(parts)
    raise ValueError("a fused projection mixes quantised and float weights; pass --quantization none")


def _float(w: GroupQuant | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w.dequantize() if isinstance(w, GroupQuant) else w).to(dtype)


def cpu_kernel(fmt: str, dtype: torch.dtype) -> str:
    """QuantLinear's kernel under activations of dtype. Under float32, where idlm's group GEMM
    builds, every format on it (Q8_0 2.5x PyTorch's int4 kernel's two planes at one row on this
    project's AVX2 CPU, with float32 logits for a head; the 4-bit formats, x rounded per group to
    int8, ~1.2x PyTorch's int4 kernel on bfloat16 x at one row: benchmarks/RESULTS.md, issue 16);
    IDLM_CPU_KERNEL=int4pack keeps PyTorch's. Under bfloat16 (AMX or AVX-512 BF16 CPUs), PyTorch's
    int4 kernel, whose fast form takes it."""
    from idlm.kernels.group_gemm import group_gemm_module

    if dtype != torch.float32 or group_gemm_module() is None:
        return "int4pack"
    return "group"


def _linear(w: GroupQuant | torch.Tensor, dtype: torch.dtype) -> nn.Module:
    if isinstance(w, GroupQuant):
        return QuantLinear(w, kernel=cpu_kernel(w.fmt, dtype))
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear.requires_grad_(False)


def init_random_weights(model: CausalLM, std: float = 0.02, seed: int = 0) -> None:
    """Matrices ~ N(0, std), norm weights 1, biases 0, drawn in place on the model's device."""
    gen = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def load_weights(model: CausalLM, files: list[Path], progress: bool) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = set(model.hf_state_dict())
    seen = set()
    with tqdm(desc="loading weights", total=len(expected), disable=not progress, unit="tensor") as bar:
        for file in files:
            if not file.is_file():
                raise ValueError(f"weight file {file} is missing; the checkpoint is incomplete")
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        if name.endswith(IGNORED_SUFFIXES):
                            continue
                        if name not in expected:
                            if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
                                continue
                            raise ValueError(f"{file}: unexpected tensor {name!r}; the weights do not fit config.json")
                        _copy_into(model, params, name, f.get_tensor(name))
                        seen.add(name)
                        bar.update()
            except SafetensorError as e:
                raise ValueError(f"{file} is not a readable safetensors file ({e}); re-download it") from e
    missing = expected - seen
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")


def _copy_into(model: CausalLM, params: dict[str, torch.nn.Parameter], name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    owner, _, proj = module_path.rpartition(".")
    if proj in model.packed:
        fused, shard = model.packed[proj]
        target = params[f"{owner}.{fused}.{leaf}"]
        sizes = model.shard_sizes(fused)
        target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
    else:
        target = params[name]
    if target.shape != tensor.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor)
