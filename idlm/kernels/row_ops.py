"""The elementwise steps and the attention of a CPU inference forward in one call each
(csrc/row_ops.cpp, built with idlm's other CPU kernels): RMS norm, the residual add with the norm
after it, the MLP's silu(gate) * up, Qwen3's q/k norms, the gated LoRA's delta on its gated rows,
and a layer's rotary, cache writes and per-row attention.

Each row is computed alone in a fixed order, so a row's bits do not depend on the rows that share
the call. Used for float32 forwards on the CPU without autograd (an engine's steps);
IDLM_CPU_ROW_OPS=0 keeps PyTorch's ops, for comparisons.
"""

import os

import torch

from idlm.kernels.cpu_kernels import cpu_kernels

_enabled: list[bool] = []


def row_ops():
    """The built kernels when they serve (on), else None."""
    if not _enabled:
        _enabled.append(os.environ.get("IDLM_CPU_ROW_OPS", "1") != "0")
    return cpu_kernels() if _enabled[0] else None


def applies(x: torch.Tensor) -> bool:
    """Whether x's step may run here: float32 on the CPU, with no autograd graph to build."""
    return x.dtype == torch.float32 and not x.is_cuda and not torch.is_grad_enabled() and row_ops() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return row_ops().rms_norm_rows(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(row_ops().add_rms_norm_rows(x, residual, weight, eps))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return row_ops().silu_mul_rows(gate_up)


def qk_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int, num_kv_heads: int,
            eps: float) -> torch.Tensor:
    """A fused qkv projection's rows with each q head and each k head RMS-normed (Qwen3)."""
    return row_ops().qk_norm_rows(qkv, q_weight, k_weight, num_heads, num_kv_heads, eps)


def gated_lora_add(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   gate: torch.Tensor) -> torch.Tensor:
    """out + (x A^T) B^T * gate on the gated rows, the others out's own (the gated LoRA's delta)."""
    width = x.shape[-1]
    total = row_ops().gated_lora_add(out.reshape(-1, out.shape[-1]), x.reshape(-1, width), lora_a, lora_b,
                                     gate.reshape(-1))
    return total.view(out.shape)
