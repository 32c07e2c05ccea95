"""The pre-norm decoder shared by the Llama, Qwen2, Qwen3 and SDAR families.

Attention is delegated to a backend object (`attn(layer_index, q, k, v) -> out`) so the same
weights serve the paged KV cache of the engine and the dense masks of training and tests.
"""

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from idlm.kernels import row_ops
from idlm.kernels.cpu_gemm import RowTiledLinear, row_tiled_linear
from idlm.models.config import ModelConfig
from idlm.models.lora import GatedLoRA


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def project(linear: nn.Linear, lora: GatedLoRA | None, x: torch.Tensor, gate: torch.Tensor | None):
    if lora is None:
        return linear(x)
    return lora.ungated(linear, x) if gate is None else lora.project(linear, x, gate)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.dtype == torch.float32 and row_ops.applies(x):
        return row_ops.rms_norm(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32 and not x.is_cuda:
        # PyTorch's CPU rms_norm scales the normed row by the weight last: the same bits as the
        # line below, in one call where that was five (61 norms a SmolLM2 decode step)
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A sublayer's output added to the residual stream, and that sum normed for the next
    sublayer: (rms_norm(residual + x), residual + x)."""
    if weight.dtype == residual.dtype == torch.float32 and row_ops.applies(x):
        return row_ops.add_rms_norm(x, residual, weight, eps)
    total = residual + x
    return rms_norm(total, weight, eps), total


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if x.is_cuda:  # (where float32 matmuls may run in TF32, which would round x)
        half = x.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    else:
        rotated = xf @ _half_rotation(x.shape[-1], x.device)
    return (xf * cos + rotated * sin).to(x.dtype)


_ROTATIONS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _half_rotation(dim: int, device: torch.device) -> torch.Tensor:
    """R with x @ R = cat(-x[half:], x[:half]) exactly in float32 (one signed 1 a column, the rest
    0): on a CPU one op where the slices, the negation and the cat were four (a CPU decode step is
    a few rows, so each op's fixed cost is what counts; 1.5% of an `ar` step at batch 1)."""
    key = (dim, device)
    if key not in _ROTATIONS:
        half = dim // 2
        with torch.inference_mode(False):  # made in an engine's step, used in training's autograd too
            r = torch.zeros(dim, dim)
            r[torch.arange(half, dim), torch.arange(half)] = -1.0
            r[torch.arange(half), torch.arange(half, dim)] = 1.0
            _ROTATIONS[key] = r.to(device)
    return _ROTATIONS[key]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if row_ops.applies(gate_up):
        return row_ops.silu_mul(gate_up)
    act, up = gate_up.chunk(2, dim=-1)
    return F.silu(act) * up


# The elementwise steps of a layer. Eager, each is several kernels. Inside CUDA graphs the engine
# uses compiled versions (one fused kernel each), which matters when a decode step is a few rows.
# Only there: called eagerly, a compiled region costs about 100 us of guards and wrappers, more
# than the kernels it saves (an eager 128-token prefill of SmolLM2 took 30 ms, mostly that).
ELEMENTWISE = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "apply_rotary": apply_rotary,
               "silu_mul": silu_mul}
FUSED: dict[str, Callable] = {}
_fusing = [False]


def compile_elementwise() -> None:
    """Fuse each elementwise step into one kernel with torch.compile (CUDA inference), for the
    forwards run under fused_elementwise()."""
    # each model a process loads (a benchmark loads several) adds specialisations, for its eps
    # and its shapes; past dynamo's default of 8 a fullgraph compile fails instead of running
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for name, fn in ELEMENTWISE.items():
        if name not in FUSED:
            FUSED[name] = torch.compile(fn, dynamic=True, fullgraph=True)


@contextlib.contextmanager
def fused_elementwise():
    """Within: the compiled elementwise kernels (for forwards that a CUDA graph captures, and the
    warm-up run before the capture)."""
    _fusing[0] = True
    try:
        yield
    finally:
        _fusing[0] = False


def elementwise(name: str, invariant: bool = False) -> Callable:
    """The step `name`: the batch-invariant Triton kernel (deterministic mode, eager and in graphs
    alike), else the compiled version inside fused_elementwise(), else the plain ops."""
    if invariant:
        from idlm.kernels.batch_invariant import OPS

        return OPS[name]
    return FUSED[name] if _fusing[0] and name in FUSED else ELEMENTWISE[name]


class RMSNorm(nn.Module):
    batch_invariant = False  # CausalLM.use_batch_invariant() sets it

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elementwise("rms_norm", self.batch_invariant)(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this norm of residual + x, residual + x): one kernel inside CUDA graphs."""
        return elementwise("add_rms_norm", self.batch_invariant)(x, residual, self.weight, self.eps)


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(cfg.rope_inv_freq(), dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


class SelfAttention(nn.Module):
    batch_invariant = False

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_lora: GatedLoRA | None = None
        self.o_lora: GatedLoRA | None = None
        self.all_reduce: Callable | None = None  # tensor parallel: sums the ranks' partial outputs (models/parallel.py)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionBackend,
                gate: torch.Tensor | None):
        lead = x.shape[:-1]
        qkv = project(self.qkv_proj, self.qkv_lora, x, gate)
        # the CPU's row-exact attention: q/k norms, rotary, cache writes and attention in a call or two
        packed = getattr(attn, "attend_packed", None)
        out = None
        if packed is not None and (self.q_norm is None or row_ops.applies(qkv)):
            normed = qkv if self.q_norm is None else row_ops.qk_norm(
                qkv, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.num_kv_heads, self.q_norm.eps)
            out = packed(self.layer, normed, *rope, self.num_heads)
        if out is not None:
            out = project(self.o_proj, self.o_lora, out, gate)
            return out if self.all_reduce is None else self.all_reduce(out)
        # a backend that rotates as it writes the cache does both in one kernel (not in deterministic
        # mode, whose rotary is the batch-invariant kernel's)
        fused = None if self.batch_invariant else getattr(attn, "rotate_and_attend", None)
        joint = self.q_norm is None and not self.batch_invariant
        heads = self.heads(qkv, lead) if fused is not None or not joint else None
        out = fused(self.layer, *heads, *rope) if fused is not None else None
        if out is None:
            if joint:
                # q and k sit side by side in the qkv row: one rotary over both heads halves its
                # ops, and q and k are split from its output in one call (a CPU decode step is a
                # few rows, so each op's fixed cost is what counts)
                qk, v = qkv.split((self.q_size + self.kv_size, self.kv_size), dim=-1)
                q, k = elementwise("apply_rotary")(qk.view(*lead, -1, self.head_dim), *rope).split(
                    (self.num_heads, self.num_kv_heads), dim=-2)
                out = attn(self.layer, q, k, v.view(*lead, self.num_kv_heads, self.head_dim))
            else:
                rotary = elementwise("apply_rotary", self.batch_invariant)
                q, k, v = heads
                out = attn(self.layer, rotary(q, *rope), rotary(k, *rope), v)
        out = project(self.o_proj, self.o_lora, out.reshape(*lead, self.q_size), gate)
        return out if self.all_reduce is None else self.all_reduce(out)

    def heads(self, qkv: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [*lead, heads, head_dim] views of the fused projection's output, q and k normed."""
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class MLP(nn.Module):
    batch_invariant = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.gate_up_lora: GatedLoRA | None = None
        self.down_lora: GatedLoRA | None = None
        self.all_reduce: Callable | None = None  # tensor parallel: sums the ranks' partial outputs (models/parallel.py)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        out = self._forward(x, gate)
        return out if self.all_reduce is None else self.all_reduce(out)

    def _forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        lora = self.gate_up_lora
        if lora is not None and lora.leaves_delta_to_consumer(x) and (gate is not None or lora.ungated_wide):
            from idlm.kernels.triton_lora import gated_silu_mul

            # one kernel adds gate_up's gated delta and applies silu_mul (the finish kernel and
            # the compiled silu_mul were two launches); a step without gated rows runs it too, as
            # the compiled silu_mul rounds otherwise than it does
            act = gated_silu_mul(lora.wide_projection(self.gate_up_proj, x), lora.fused_B, gate)
            return project(self.down_proj, self.down_lora, act, gate)
        if x.is_cuda or type(self.gate_up_proj) is not nn.Linear:
            gate_up = project(self.gate_up_proj, self.gate_up_lora, x, gate)
            return project(self.down_proj, self.down_lora, elementwise("silu_mul", self.batch_invariant)(gate_up),
                           gate)
        # two GEMMs on halves of the fused weight: faster than one wide GEMM on small CPU batches
        w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
        half = w.shape[0] // 2
        act = F.linear(x, w[:half], None if b is None else b[:half])
        up = F.linear(x, w[half:], None if b is None else b[half:])
        if self.gate_up_lora is not None and gate is not None:
            delta_act, delta_up = self.gate_up_lora(x, gate).chunk(2, dim=-1)
            act, up = act + delta_act, up + delta_up
        return project(self.down_proj, self.down_lora, F.silu(act) * up, gate)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, attn, gate):
        """x: the last sublayer's output, not yet added to the residual stream (None before the
        first layer, whose x is the stream itself); returns the same pair after this layer. Each
        add shares a kernel with the norm after it."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h, residual = self.post_attention_layernorm.add(self.self_attn(h, rope, attn, gate), residual)
        return self.mlp(h, gate), residual


def meta_aware_embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding, left uninitialised when built on the meta device (as every loader builds the
    model): its random init on meta runs PyTorch's Python reference of normal_, whose first call
    imports torch._dynamo, 2.6 s of a CPU start."""
    weight = torch.empty(num, dim) if torch.get_default_device().type == "meta" else None
    return nn.Embedding(num, dim, _weight=weight)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = meta_aware_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names follow Hugging Face, except the fused `qkv_proj` and `gate_up_proj`."""

    packed = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.rotary = Rotary(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # An adapter may bring its own MASK row, possibly for an id past the vocabulary.
        self.mask_embedding: nn.Parameter | None = None
        self.mask_embedding_id: int | None = None
        self.cpu_stack: Callable | None = None  # a CPU engine's layers in one call (models/cpu_stack.py)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                lora_gate: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states; `logits()` turns the rows you need into logits.

        lora_gate (same shape as input_ids, 0/1) switches the gated LoRA on per token; None
        means off everywhere, which is exactly the base model."""
        x = self.embed(input_ids)
        rope = self.rotary(positions)
        gate = None if lora_gate is None else lora_gate.to(x.dtype)
        if self.cpu_stack is not None and (hidden := self.cpu_stack(x, rope, attn, gate)) is not None:
            return hidden
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, attn, gate)
        return self.model.norm.add(x, residual)[0] if residual is not None else self.model.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mask_embedding is None:
            return self.model.embed_tokens(input_ids)
        x = self.model.embed_tokens(input_ids.clamp(max=self.cfg.vocab_size - 1))
        is_mask = (input_ids == self.mask_embedding_id)[..., None]
        return torch.where(is_mask, self.mask_embedding.to(x.dtype), x)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: where to write them (the decode graphs' one shared buffer); a plain head's GEMM
        writes there itself, any other head's output is copied."""
        if out is None:
            return self.lm_head(hidden)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None and hidden.dim() == 2:
            return torch.mm(hidden, self.lm_head.weight.t(), out=out)
        return out.copy_(self.lm_head(hidden))

    def head_rows_independent(self) -> bool:
        """Whether a row's logits are the same bits whatever rows share the head's call (a
        row-tiled head: the CPU's quantised path), so one call may serve several row sets."""
        return isinstance(self.lm_head, RowTiledLinear)

    def use_batch_invariant(self) -> None:
        """Deterministic mode: each row's bits stop depending on the rest of the forward. On CUDA
        every linear, the head, the norms and the elementwise steps run the fixed-configuration
        Triton kernels of kernels/batch_invariant.py, and the gated LoRA a fixed row tile. On the
        CPU float linears are padded to whole row tiles (kernels/cpu_gemm.py; quantised ones
        already are invariant), and the elementwise steps are plain per-row ops already."""
        if self.model.norm.weight.is_cuda:  # (a quantised CPU head has no float weight)
            from idlm.kernels.batch_invariant import invariant_linear as convert
        else:
            convert = row_tiled_linear
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj, attn.o_proj = convert(attn.qkv_proj), convert(attn.o_proj)
            mlp.gate_up_proj, mlp.down_proj = convert(mlp.gate_up_proj), convert(mlp.down_proj)
        self.lm_head = convert(self.lm_head)
        if self.model.norm.weight.is_cuda:
            for module in self.modules():
                if isinstance(module, RMSNorm | SelfAttention | MLP | GatedLoRA):
                    module.batch_invariant = True

    def store_head_column_major(self) -> None:
        """CPU inference: keep the [vocab, hidden] head weight as the transpose of a contiguous
        [hidden, vocab] tensor. Same values and names; on small batches the CPU GEMM then streams
        the largest matrix of a decode step about 10% faster."""
        head = self.lm_head
        if isinstance(head, RowTiledLinear):
            head.prepare()
            if head.packed is not None:  # oneDNN reads its packed copy alone: no transpose to make
                if getattr(self.model.embed_tokens, "weight", None) is not head.weight:
                    head.drop_float_weight()  # (SmolLM2's: 108 MB of a 600 MB process)
                return
        if isinstance(head, nn.Linear):
            with torch.no_grad():
                head.weight.data = head.weight.data.t().contiguous().t()
        if isinstance(head, RowTiledLinear):
            head.prepare()  # (on BLAS: its row tile measured again on the layout it runs on)

    def shard_sizes(self, fused: str) -> list[int]:
        cfg = self.cfg
        if fused == "qkv_proj":
            return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        return [cfg.intermediate_size, cfg.intermediate_size]

    def hf_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """State dict (ours, or the given one of this model) under Hugging Face names, fused
        projections split again."""
        out = {}
        parts = {fused: [] for fused, _ in self.packed.values()}
        for name, _ in sorted(self.packed.items(), key=lambda kv: kv[1]):
            parts[self.packed[name][0]].append(name)
        for name, tensor in (self.state_dict() if state is None else state).items():
            if "_lora." in name or name == "mask_embedding":
                continue
            fused = next((f for f in parts if f".{f}." in name), None)
            if fused is None:
                out[name] = tensor
                continue
            for hf_name, piece in zip(parts[fused], tensor.split(self.shard_sizes(fused)), strict=True):
                out[name.replace(fused, hf_name)] = piece.contiguous()
        if self.cfg.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out
