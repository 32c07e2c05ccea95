"""y = x W^T for groupwise quantised weights (llama.cpp's Q4_0/Q4_1/Q8_0 blocks), float32
activations and outputs, on AVX2 + FMA CPUs: csrc/group_gemm.cpp, built with idlm's other CPU
kernels (kernels/cpu_kernels.py).

PyTorch's int4 weight-only kernel takes bfloat16 activations and returns bfloat16 (its fast
x86 form): a projection of a float32 model pays two conversions, and a quantised head cannot
give float32 logits. This kernel reads the GGUF's codes as they are, takes and returns float32
(Q8_0 codes meet float32 x; 4-bit ones, repacked eight output columns at a time, meet x rounded
per group of 32 to int8, as llama.cpp's own CPU dot products do), and gives
every row the same bits whatever the rows around it (the C++ file's header says how).

Which projections run on it: `loader.cpu_kernel` (every format under float32 activations;
IDLM_CPU_KERNEL=int4pack none, for comparisons). A CPU without AVX2, or a
machine where the build fails (no C++ compiler), falls back to PyTorch's kernel.
"""

import os

import torch

from idlm.kernels.cpu_kernels import cpu_kernels


def group_gemm_module():
    """The built kernels, or None where they cannot run here or IDLM_CPU_KERNEL=int4pack asks for
    PyTorch's int4 kernel throughout."""
    return None if os.environ.get("IDLM_CPU_KERNEL") == "int4pack" else cpu_kernels()


def group_linear_q4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [M, K] float32 against a 4-bit matrix as GroupQuant.repack_columns lays it out. x meets it
    rounded per group of 32 to int8 (scale max|x| / 127; the group's dot product exact in int32,
    then scaled), llama.cpp's Q8_1 activations. Returns [M, N] float32."""
    return group_gemm_module().group_linear_q4x8(x, codes, scales, out_features)


def group_linear_q8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32; Q8_0 codes [N, K] int8 and their scales [N, K / 32] float32 (apart, so that a
    tied embedding shares them). Returns [M, N] float32."""
    return group_gemm_module().group_linear_q8(x, codes, scale)
