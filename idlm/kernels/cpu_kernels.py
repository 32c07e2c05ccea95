"""idlm's CPU kernels (csrc/: the group GEMM, the per-row steps of a decode layer and the layers in
one call), AVX2 + FMA
+ F16C, built with the compiler that PyTorch's extensions use on first use and kept under
$IDLM_CACHE/kernels (one build per torch version; sources changed since: built again).

A CPU without AVX2, or a machine where the build fails (no C++ compiler), runs PyTorch's ops
instead, with one warning.
"""

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("bindings.cpp", "group_gemm.cpp", "row_ops.cpp", "decoder_stack.cpp")]
_module: list = []  # [the built module or None], once tried


def cpu_has_avx2_fma() -> bool:
    """AVX2 (which every x86 CPU with it pairs with FMA and F16C) as PyTorch's dispatcher sees it."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build():
    from torch.utils.cpp_extension import load

    from idlm.models.cache import cache_root

    folder = cache_root() / "kernels" / f"cpu-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "idlm_cpu.so").exists():
        log.warning("building idlm's CPU kernels into %s (once, about a minute)", folder)
    # -ffp-contract=off: only the FMAs written in the source, so no compiler may fuse others.
    # -fopenmp: at::parallel_for is OpenMP pragmas in ATen's headers, which without it run on one
    # thread (the kernels split columns or (row, head) tasks between threads)
    return load(name="idlm_cpu", sources=[str(s) for s in SOURCES], build_directory=str(folder),
                extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"],
                extra_ldflags=["-fopenmp"], extra_include_paths=[str(SOURCES[0].parent)], verbose=False)


def cpu_kernels():
    """The built module, or None where it cannot run here (see the module's docstring)."""
    if not _module:
        module = None
        if not cpu_has_avx2_fma():
            log.warning("this CPU has no AVX2: idlm's CPU kernels are off (PyTorch's run instead)")
        else:
            try:
                module = _build()
            except Exception as e:  # noqa: BLE001 (a missing compiler, ninja or header: fall back)
                log.warning("could not build idlm's CPU kernels (%s); PyTorch's run instead, slower",
                            str(e).splitlines()[0])
        _module.append(module)
    return _module[0]
