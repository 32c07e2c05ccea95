import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from idlm.models.config import ModelConfig
from idlm.models.gguf import cached_hf_folder, default_gguf_path
from idlm.models.transformer import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_folder(model: str | Path | None) -> Path:
    """A Hugging Face folder for `model`: the folder itself, a cached conversion of a .gguf file,
    or (None) the embedded default model."""
    if model is None:
        return cached_hf_folder(default_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist; pass a model folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not .gguf; pass a model folder or a .gguf file")
        return cached_hf_folder(path)
    return path


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


def load_model(folder: Path, dtype: torch.dtype, device: str | torch.device, progress: bool = True) -> CausalLM:
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
