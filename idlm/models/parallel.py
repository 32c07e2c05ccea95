"""Tensor parallelism, Megatron-style: one model split over the ranks of a process group.

- q/k/v and gate/up are column-parallel: each rank keeps its heads (q, and k/v of the KV heads
  those q heads read) and its slice of the intermediate features, so its part of the fused
  `qkv_proj` / `gate_up_proj` is itself a valid fused layer of a model with fewer heads.
- o_proj and down_proj are row-parallel: each rank multiplies its input slice, and one
  all-reduce per projection sums the partial outputs (a bias is added by rank 0 only).
- KV heads: split when there are at least as many as ranks; otherwise each KV head is
  replicated on the ranks whose q heads read it (size % num_kv_heads == 0).
- The embedding and the head are vocab-parallel: rank r holds vocabulary rows
  [r V', (r + 1) V') (V' = ceil(V / size), the last shard zero-padded). A lookup is zero
  outside the rank's rows, then all-reduced; the head's logits shards are all-gathered, so every
  rank ends with the full [rows, V] logits.
- The gated LoRA follows its projection: for the column-parallel ones A is whole and B sliced by
  output rows; for the row-parallel ones A is sliced by input columns and B whole, and the delta
  joins the partial output before the all-reduce (it is linear in A's input, so the sum is exact).

Every rank runs the same forward: the collectives pair up in order. `shard_model` works on meta
tensors too (random-weight shapes shard first, then allocate only their slice).
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from idlm.models.config import ModelConfig
from idlm.models.lora import GatedLoRA
from idlm.models.transformer import CausalLM

# the newer name of all_gather_into_tensor (which torch 2.13 deprecates), with the same arguments
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_shardable(cfg: ModelConfig, size: int, name: str = "the model") -> None:
    """ValueError unless `cfg` splits over `size` ranks."""
    if size == 1:
        return
    if cfg.num_heads % size:
        raise ValueError(f"{name} has {cfg.num_heads} attention heads, which do not split over "
                         f"tensor_parallel_size={size}; choose a size that divides {cfg.num_heads}")
    kv = cfg.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(f"{name} has {kv} KV heads: tensor_parallel_size={size} must divide them or be a "
                         f"multiple of them (replicated KV heads); choose another size")
    if cfg.intermediate_size % size:
        raise ValueError(f"{name}'s MLP width {cfg.intermediate_size} does not split over "
                         f"tensor_parallel_size={size}; choose a size that divides it")


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """One rank's shape: its heads, KV heads and MLP width (the vocabulary stays whole)."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // size, num_kv_heads=max(1, cfg.num_kv_heads // size),
                               intermediate_size=cfg.intermediate_size // size)


def all_reduce_fn(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """The hook that sums a row-parallel projection's partial outputs over the ranks, in place."""

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=group)
        return x
    return all_reduce


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + len(weight)) of the embedding; other ids look up zeros, all-reduced."""

    def __init__(self, weight: torch.Tensor, start: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight).masked_fill(outside[..., None], 0)
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """This rank's vocabulary rows of the head; the logits shards of all ranks are all-gathered."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, size: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_size, self.size, self.group = vocab_size, size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lead, shard = hidden.shape[:-1], self.weight.shape[0]
        local = F.linear(hidden.reshape(-1, hidden.shape[-1]), self.weight)
        gathered = local.new_empty(self.size * local.shape[0], shard)
        ALL_GATHER(gathered, local.contiguous(), group=self.group)
        logits = gathered.view(self.size, -1, shard).transpose(0, 1).reshape(-1, self.size * shard)
        return logits[:, :self.vocab_size].reshape(*lead, self.vocab_size)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=False)


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  keep_bias: bool = True) -> None:
    """Keeps the given output rows / input columns of `linear` (its bias sliced along, or zeroed)."""
    w = linear.weight
    if rows is not None:
        w = w.index_select(0, rows)
        if linear.bias is not None:
            linear.bias = _param(linear.bias.index_select(0, rows))
    if cols is not None:
        w = w.index_select(1, cols)
        if linear.bias is not None and not keep_bias:
            linear.bias = _param(torch.zeros_like(linear.bias))
    linear.weight = _param(w)
    linear.out_features, linear.in_features = w.shape


def _slice_lora(lora: GatedLoRA | None, out_rows: list[torch.Tensor] | None = None,
                in_cols: torch.Tensor | None = None) -> None:
    if lora is None:
        return
    with torch.no_grad():
        if out_rows is not None:
            for i, rows in enumerate(out_rows):
                lora.lora_B[i] = _param(lora.lora_B[i].index_select(0, rows))
        if in_cols is not None:
            lora.lora_A = _param(lora.lora_A.index_select(1, in_cols))


def _span(start: int, length: int, device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device)


def shard_model(model: CausalLM, rank: int, size: int, group) -> CausalLM:
    """`model` (whole, adapter attached, not yet fused) cut down in place to rank `rank`'s shard."""
    cfg = model.cfg
    check_shardable(cfg, size)
    local = local_config(cfg, size)
    d = cfg.head_dim
    dev = model.lm_head.weight.device
    q_heads = _span(rank * local.num_heads, local.num_heads, "cpu")
    # the KV heads this rank's q heads read: a slice of them, or the one it shares with other ranks
    kv_first = rank * local.num_kv_heads if cfg.num_kv_heads >= size else rank * cfg.num_kv_heads // size
    kv_heads = _span(kv_first, local.num_kv_heads, "cpu")

    def features(heads: torch.Tensor) -> torch.Tensor:
        return (heads[:, None] * d + torch.arange(d)).flatten().to(dev)

    q_rows, kv_rows = features(q_heads), features(kv_heads)
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    mlp_rows = _span(rank * local.intermediate_size, local.intermediate_size, dev)
    reduce = all_reduce_fn(group)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _slice_linear(attn.qkv_proj, rows=torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows]))
            _slice_lora(attn.qkv_lora, out_rows=[q_rows, kv_rows, kv_rows])
            _slice_linear(attn.o_proj, cols=q_rows, keep_bias=rank == 0)
            _slice_lora(attn.o_lora, in_cols=q_rows)
            attn.num_heads, attn.num_kv_heads = local.num_heads, local.num_kv_heads
            attn.q_size, attn.kv_size = local.num_heads * d, local.num_kv_heads * d
            attn.all_reduce = reduce
            _slice_linear(mlp.gate_up_proj, rows=torch.cat([mlp_rows, cfg.intermediate_size + mlp_rows]))
            _slice_lora(mlp.gate_up_lora, out_rows=[mlp_rows, mlp_rows])
            _slice_linear(mlp.down_proj, cols=mlp_rows, keep_bias=rank == 0)
            _slice_lora(mlp.down_lora, in_cols=mlp_rows)
            mlp.all_reduce = reduce
        shard = -(-cfg.vocab_size // size)
        start = rank * shard

        def vocab_rows(weight: torch.Tensor) -> torch.Tensor:
            rows = weight[start:start + shard]
            return torch.cat([rows, rows.new_zeros(shard - rows.shape[0], rows.shape[1])])

        embed = VocabParallelEmbedding(vocab_rows(model.model.embed_tokens.weight), start, group)
        head = VocabParallelHead(vocab_rows(model.lm_head.weight), cfg.vocab_size, size, group)
        if cfg.tie_word_embeddings:
            head.weight = embed.weight
        model.model.embed_tokens, model.lm_head = embed, head
    model.cfg = local
    return model
