"""y = x W^T for groupwise quantised weights (llama.cpp's Q4_0/Q4_1/Q8_0 blocks), float32
activations and outputs, on AVX2 + FMA CPUs: csrc/group_gemm.cpp, built with the compiler that
PyTorch's extensions use on first use and kept under $IDLM_CACHE/kernels.

PyTorch's int4 weight-only kernel takes bfloat16 activations and returns bfloat16 (its fast
x86 form): a projection of a float32 model pays two conversions, and a quantised head cannot
give float32 logits. This kernel reads the GGUF's codes as they are, takes and returns float32
(Q8_0 codes meet float32 x; 4-bit ones, read as the file's own blocks of 20 (Q4_1) or 18 (Q4_0)
bytes, meet x rounded per group of 32 to int16), and gives every row the same bits whatever the
rows around it (the C++ file's header says how).

Which projections run on it: `loader.cpu_kernel` (Q8_0 by default; IDLM_CPU_KERNEL=group the
4-bit formats too, IDLM_CPU_KERNEL=int4pack none, for comparisons). A CPU without AVX2, or a
machine where the build fails (no C++ compiler), falls back to PyTorch's kernel with one warning.
"""

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "group_gemm.cpp"
_module: list = []  # [the built module or None], once tried


def cpu_has_avx2_fma() -> bool:
    """AVX2 (which every x86 CPU with it pairs with FMA and F16C) as PyTorch's dispatcher sees it."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build():
    from torch.utils.cpp_extension import load

    from idlm.models.cache import cache_root

    folder = cache_root() / "kernels" / f"group_gemm-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "idlm_group_gemm.so").exists():
        log.warning("building idlm's CPU kernel into %s (once, about a minute)", folder)
    # -ffp-contract=off: only the FMAs written in the source, so no compiler may fuse others
    return load(name="idlm_group_gemm", sources=[str(SOURCE)], build_directory=str(folder),
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"], verbose=False)


def group_gemm_module():
    """The built kernel, or None where it cannot run here (see the module's docstring)."""
    if not _module:
        module = None
        if os.environ.get("IDLM_CPU_KERNEL") == "int4pack":
            pass  # (asked for PyTorch's kernel throughout)
        elif not cpu_has_avx2_fma():
            log.warning("this CPU has no AVX2: quantised projections run on PyTorch's int4 kernel")
        else:
            try:
                module = _build()
            except Exception as e:  # noqa: BLE001 (a missing compiler, ninja or header: fall back)
                log.warning("could not build idlm's CPU group GEMM (%s); quantised projections run on "
                            "PyTorch's int4 kernel, slower on CPUs without AVX-512 BF16", str(e).splitlines()[0])
        _module.append(module)
    return _module[0]


def group_linear_q4(x: torch.Tensor, blocks: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """x [M, K] float32; blocks [N, K / 32 * block_bytes] uint8, llama.cpp's Q4_1 (20-byte) or
    Q4_0 (18-byte) blocks as the file stores them. x meets them rounded per group of 32 to int16
    (the group's dot product exact in int32, then scaled: 100x closer to the float result than
    PyTorch's int4 kernel on bfloat16 x). Returns [M, N] float32."""
    return group_gemm_module().group_linear_q4(x, blocks, block_bytes)


def group_linear_q8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32; Q8_0 codes [N, K] int8 and their scales [N, K / 32] float32 (apart, so that a
    tied embedding shares them). Returns [M, N] float32."""
    return group_gemm_module().group_linear_q8(x, codes, scale)
