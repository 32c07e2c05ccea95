"""Gated LoRA (R-ISD): low-rank deltas that act only on gated rows (the MASK rows).

Rows with gate 0 compute exactly the base model, so the clean stream, and with it everything
the user receives, is the base model's. Adapters are stored in PEFT layout
(adapter_config.json + adapter_model.safetensors) with our keys under "idlm" in the config and
the optional trained MASK embedding row in mask_embedding.safetensors.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from idlm.kernels import row_ops

if TYPE_CHECKING:
    from idlm.models.transformer import CausalLM

# the shipped R-ISD adapter of the embedded default model (package data)
DEFAULT_ADAPTER = Path(__file__).resolve().parents[1] / "adapters" / "smollm2-risd"

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# our (possibly fused) projection -> (attribute holding its LoRA, HF sub-projections in shard order)
FUSED = {
    "self_attn.qkv_proj": ("self_attn.qkv_lora", ("q_proj", "k_proj", "v_proj")),
    "self_attn.o_proj": ("self_attn.o_lora", ("o_proj",)),
    "mlp.gate_up_proj": ("mlp.gate_up_lora", ("gate_proj", "up_proj")),
    "mlp.down_proj": ("mlp.down_lora", ("down_proj",)),
}
PEFT_PREFIX = "base_model.model."
# The fused GPU kernel (idlm/kernels/triton_lora.py) serves decode steps and small prefills of
# small models; past these its serial loop over in_features loses to cuBLAS (measured on an H100:
# 3.5-6.5 us against 9-10 at SmolLM2's 576/1536, 14-31 against 11-13 at Qwen3-8B's 4096/12288).
MAX_ROWS = 1024
MAX_IN_FEATURES = 2048


class GatedLoRA(nn.Module):
    """delta(x) = gate * scaling * B_s(A_s x), shard by shard of a fused projection."""

    batch_invariant = False  # deterministic mode: always the Triton kernel, with a fixed row tile

    def __init__(self, in_features: int, out_sizes: list[int], rank: int, scaling: float):
        super().__init__()
        self.rank, self.scaling = rank, scaling
        self.lora_A = nn.Parameter(torch.zeros(len(out_sizes) * rank, in_features))
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(size, rank)) for size in out_sizes)
        self.fused_B: torch.Tensor | None = None  # inference: scaling * block-diagonal [B_1 .. B_s]
        # widened (GPU inference): [W; A], the base weight with A stacked under it, and its bias
        self.wide_weight: torch.Tensor | None = None
        self.wide_bias: torch.Tensor | None = None
        self.ungated_wide = True  # steps without gated rows run the wide GEMM too (ungated)

    def fuse_for_inference(self) -> None:
        """One GEMM for all shards: B_1..B_s as one scaled block-diagonal matrix (frozen weights)."""
        with torch.no_grad():
            self.fused_B = torch.block_diag(*self.lora_B) * self.scaling

    def widen(self, linear: nn.Linear) -> None:
        """Stacks A under linear's weight (after fuse_for_inference), so that a gated step's
        projection is one GEMM for the base output and x A^T together, then a kernel that adds
        the gated delta (project). linear keeps a view of the base rows: ungated steps run
        it as before, and the weights are stored once."""
        with torch.no_grad():
            n = linear.out_features
            wide = torch.cat([linear.weight, self.lora_A.to(linear.weight.dtype)])
            linear.weight.data = wide[:n]
            self.wide_weight = wide
            if linear.bias is not None:
                self.wide_bias = torch.cat([linear.bias, linear.bias.new_zeros(self.lora_A.shape[0])])

    def project(self, linear: nn.Linear, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """linear(x) plus delta(x) on gated rows: from the widened weight once widen() ran, else
        the base output plus the delta (add_to)."""
        if self.wide_weight is None:
            return self.add_to(linear(x), x, gate)
        wide = F.linear(x, self.wide_weight, self.wide_bias)
        if wide.is_cuda:
            from idlm.kernels.triton_lora import gated_lora_finish

            return gated_lora_finish(wide, self.fused_B, gate)
        n = self.fused_B.shape[0]
        base, low = wide[..., :n], wide[..., n:]
        delta = F.linear(low * gate[..., None].to(low.dtype), self.fused_B)
        return torch.where(gate[..., None] != 0, base + delta, base)

    def ungated(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """linear(x) in a step without gated rows. Where a gated step's consumer adds the delta
        (leaves_delta_to_consumer), the step runs the gated steps' GEMM, [W; A] (N = out + rank),
        and keeps the base columns: cuBLAS tiles another N otherwise, and a round's clean rows
        would not carry an AR step's bits in plain bfloat16."""
        if not self.leaves_delta_to_consumer(x) or not self.ungated_wide:
            return linear(x)
        return F.linear(x, self.wide_weight, self.wide_bias)[..., :self.fused_B.shape[0]]

    def leaves_delta_to_consumer(self, x: torch.Tensor) -> bool:
        """Whether the projection's consumer may add the gated delta itself (wide_projection): a
        widened LoRA on a GPU, outside deterministic mode."""
        return self.wide_weight is not None and x.is_cuda and not self.batch_invariant

    def wide_projection(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x [W; A]^T alone (widened): the base columns, then x A^T. Its consumer adds the gated
        delta as it reads (kernels/triton_lora.py gated_silu_mul), so the delta costs no launch of
        its own."""
        return F.linear(x, self.wide_weight, self.wide_bias)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.fused_B is not None:
            return F.linear(F.linear(x, self.lora_A), self.fused_B) * gate[..., None]
        low = F.linear(x, self.lora_A).split(self.rank, dim=-1)
        delta = torch.cat([F.linear(h, b) for h, b in zip(low, self.lora_B)], dim=-1)
        return delta * (gate * self.scaling)[..., None]

    def add_to(self, out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """out + delta(x); on a GPU, fused for inference, one Triton kernel adds it in place
        (idlm/kernels/triton_lora.py)."""
        rows, in_features = x.numel() // x.shape[-1], x.shape[-1]
        if self.batch_invariant or (self.fused_B is not None and x.is_cuda and out.is_contiguous()
                                    and rows <= MAX_ROWS and in_features <= MAX_IN_FEATURES):
            from idlm.kernels.triton_lora import gated_lora_add_

            return gated_lora_add_(out, x, self.lora_A, self.fused_B, gate, invariant=self.batch_invariant)
        if self.fused_B is not None and row_ops.applies(x) and out.dtype == torch.float32:
            # (a CPU engine: the gated rows alone, one C++ call; the decoder stack calls the same)
            return row_ops.gated_lora_add(out, x, self.lora_A, self.fused_B, gate)
        return out + self(x, gate)


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))
    mask_token_id: int | None = None
    stride: int = 4
    gate: str = "mask_rows"
    base_shape: dict[str, int] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def base_shape(model: "CausalLM") -> dict[str, int]:
    cfg = model.cfg
    return {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}


def attach_lora(model: "CausalLM", acfg: AdapterConfig) -> None:
    """Adds zero-initialised gated LoRA modules (B = 0, so the model is unchanged)."""
    unknown = set(acfg.target_modules) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    param = next(model.parameters())
    for layer in model.model.layers:
        for proj_path, (lora_path, parts) in FUSED.items():
            if not set(parts) & set(acfg.target_modules):
                continue
            linear = layer.get_submodule(proj_path)
            sizes = model.shard_sizes(proj_path.split(".")[1]) if len(parts) > 1 else [linear.out_features]
            lora = GatedLoRA(linear.in_features, sizes, acfg.rank, acfg.scaling).to(param.device, param.dtype)
            owner, _, attr = lora_path.rpartition(".")
            setattr(layer.get_submodule(owner), attr, lora)


def lora_modules(model: "CausalLM"):
    """(layer index, HF projection name, shard index, GatedLoRA) for every attached shard."""
    for i, layer in enumerate(model.model.layers):
        for lora_path, parts in FUSED.values():
            owner, attr = lora_path.split(".")
            lora = getattr(getattr(layer, owner), attr)
            if lora is not None:
                for shard, name in enumerate(parts):
                    yield i, f"{owner}.{name}", shard, lora


def peft_state_dict(model: "CausalLM", acfg: AdapterConfig) -> dict[str, torch.Tensor]:
    out = {}
    for i, name, shard, lora in lora_modules(model):
        if name.split(".")[1] not in acfg.target_modules:
            continue
        key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
        r = lora.rank
        out[f"{key}.lora_A.weight"] = lora.lora_A[shard * r:(shard + 1) * r].detach().contiguous()
        out[f"{key}.lora_B.weight"] = lora.lora_B[shard].detach().contiguous()
    return out


def save_adapter(model: "CausalLM", folder: Path, acfg: AdapterConfig, base_name: str = "",
                 dtype: torch.dtype = torch.float32) -> None:
    """PEFT layout; A and B in `dtype` (loading casts them to the model's dtype). The MASK row
    stays float32: it is one row."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acfg.base_shape = base_shape(model)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": acfg.rank, "lora_alpha": acfg.alpha, "target_modules": acfg.target_modules,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "idlm": asdict(acfg),
    }
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    tensors = {k: v.to(dtype).contiguous() for k, v in peft_state_dict(model, acfg).items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    if model.mask_embedding is not None:
        save_file({"mask_embedding": model.mask_embedding.detach().float().contiguous()},
                  folder / "mask_embedding.safetensors")


def read_adapter_config(folder: Path) -> AdapterConfig:
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"adapter {folder} has no adapter_config.json; pass a folder saved by idlm or PEFT")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    ours = raw.get("idlm", {})
    targets = raw.get("target_modules") or list(TARGETS)
    if isinstance(targets, str):
        targets = [t for t in TARGETS if t in targets]
    return AdapterConfig(rank=raw.get("r", 16), alpha=raw.get("lora_alpha", raw.get("r", 16)),
                         target_modules=list(targets), mask_token_id=ours.get("mask_token_id"),
                         stride=ours.get("stride", 4), gate=ours.get("gate", "mask_rows"),
                         base_shape=ours.get("base_shape", {}))


def fuse_for_inference(model: "CausalLM") -> None:
    """Each attached LoRA computes with one fused B (the weights are frozen from here on)."""
    for module in model.modules():
        if isinstance(module, GatedLoRA):
            module.fuse_for_inference()


def widen_for_inference(model: "CausalLM", ungated_too: bool = True) -> None:
    """Every attached LoRA takes the widened path (GatedLoRA.widen), after fuse_for_inference.
    For single-GPU engines outside deterministic mode: there the base GEMMs are fixed-tile
    kernels and the gated delta keeps a fixed row tile (gated_lora_add_). ungated_too=False
    leaves steps without gated rows on the base weight alone (GatedLoRA.ungated; for comparisons)."""
    for layer in model.model.layers:
        for proj_path, (lora_path, _) in FUSED.items():
            owner, _, attr = lora_path.rpartition(".")
            lora = getattr(layer.get_submodule(owner), attr, None)
            linear = layer.get_submodule(proj_path)
            if lora is not None and type(linear) is nn.Linear:
                lora.widen(linear)
                lora.ungated_wide = ungated_too


def load_adapter(model: "CausalLM", folder: Path) -> AdapterConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter path {str(folder)!r} is not a folder; pass an adapter folder")
    acfg = read_adapter_config(folder)
    mine = base_shape(model)
    clash = {k: (v, mine[k]) for k, v in acfg.base_shape.items() if k in mine and mine[k] != v}
    if clash:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in clash.items())
        raise ValueError(f"adapter {folder} was trained for a different base model ({detail}: adapter vs model)")
    try:
        tensors = load_file(folder / "adapter_model.safetensors")
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise ValueError(f"cannot read {folder / 'adapter_model.safetensors'} ({e})") from e
    attach_lora(model, acfg)
    expected = peft_state_dict(model, acfg)
    for key, target in expected.items():
        if key not in tensors:
            raise ValueError(f"adapter {folder} lacks tensor {key!r}")
        if tensors[key].shape != target.shape:
            raise ValueError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, this base model "
                             f"needs {tuple(target.shape)}: the adapter was trained for a different base")
    with torch.no_grad():
        for i, name, shard, lora in lora_modules(model):
            key = f"{PEFT_PREFIX}model.layers.{i}.{name}"
            if key + ".lora_A.weight" not in expected:
                continue
            r = lora.rank
            lora.lora_A[shard * r:(shard + 1) * r].copy_(tensors[key + ".lora_A.weight"])
            lora.lora_B[shard].copy_(tensors[key + ".lora_B.weight"])
    extra = folder / "mask_embedding.safetensors"
    if extra.is_file():
        row = load_file(extra)["mask_embedding"]
        if row.shape != (model.cfg.hidden_size,):
            raise ValueError(f"{extra} holds a row of shape {tuple(row.shape)}, expected ({model.cfg.hidden_size},)")
        param = next(model.parameters())
        model.mask_embedding = nn.Parameter(row.to(param.device, param.dtype), requires_grad=False)
        model.mask_embedding_id = acfg.mask_token_id
    return acfg
