"""A CPU engine's decoder layers as one C++ call a forward (kernels/csrc/decoder_stack.cpp), where
the model is what that code runs: the pre-norm layer without biases (q/k norms or none), float32
activations, every projection on idlm's group GEMM, attention on the row-exact paged backend. The
same kernels in the same order as the Python forward (models/transformer.py), so the same bits;
what goes is the interpreter's share of a step (2.4 of 14 ms, a SmolLM2 `ar` step on a 2-core CPU).
IDLM_CPU_STACK=0 keeps the Python forward, for comparisons."""

import os

import torch

from idlm.kernels.cpu_kernels import cpu_kernels
from idlm.kernels.row_attention import RowExactPagedAttention
from idlm.kernels.row_ops import row_ops
from idlm.models.quant import QuantLinear


class CpuDecoderStack:
    def __init__(self, stack, head_dim: int):
        self.stack = stack
        self.scale = head_dim ** -0.5

    @classmethod
    def build(cls, model) -> "CpuDecoderStack | None":
        """The model's layers as a DecoderStack, or None where it does not apply (see above)."""
        if os.environ.get("IDLM_CPU_STACK", "1") == "0" or row_ops() is None or cpu_kernels() is None:
            return None
        cfg = model.cfg
        norms, out_features, weights, lora, qk_norms = [], [], [], [], []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.all_reduce is not None or mlp.all_reduce is not None:
                return None
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if attn.q_norm is not None:
                qk_norms += [attn.q_norm.weight, attn.k_norm.weight]
            for linear, adapter in ((attn.qkv_proj, attn.qkv_lora), (attn.o_proj, attn.o_lora),
                                    (mlp.gate_up_proj, mlp.gate_up_lora), (mlp.down_proj, mlp.down_lora)):
                if not isinstance(linear, QuantLinear) or linear.kernel != "group" or linear.bias is not None:
                    return None
                if linear.fmt == "Q8_0":
                    out_features.append(0)
                    weights += [linear.codes, linear.scale]
                else:
                    out_features.append(linear.out_features)
                    weights += [linear.codes, linear.scales]
                if adapter is not None and (adapter.fused_B is None or adapter.wide_weight is not None):
                    return None
                lora += [None, None] if adapter is None else [adapter.lora_A.detach(), adapter.fused_B]
        norms.append(model.model.norm.weight)
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in norms + qk_norms):
            return None
        stack = cpu_kernels().DecoderStack([n.detach() for n in norms], out_features, weights, lora,
                                           [n.detach() for n in qk_norms], cfg.rms_norm_eps, cfg.num_heads,
                                           cfg.num_kv_heads)
        return cls(stack, cfg.head_dim)

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn,
                 gate: torch.Tensor | None) -> torch.Tensor | None:
        """The final-normed hidden rows, or None where this forward is not one it runs (another
        attention backend, autograd on, other shapes): the caller runs the Python layers."""
        if (type(attn) is not RowExactPagedAttention or attn.packed_tables is None or attn.widen
                or torch.is_grad_enabled() or x.dim() != 2 or x.dtype != torch.float32):
            return None
        return self.stack.forward(x, *rope, attn.kv_layers, list(attn.packed_tables), self.scale, gate)
