"""idlm's CPU group GEMM (kernels/group_gemm.py, csrc/group_gemm.cpp): llama.cpp's groupwise
codes times float32 activations, against dequantise-then-matmul, row-invariant bit for bit, its
4-bit weights the GGUF's own blocks, and the selection of the kernel with its fallbacks."""

import logging

import pytest
import torch
import torch.nn.functional as F

from idlm.kernels import cpu_kernels, group_gemm
from idlm.kernels.cpu_gemm import rows_invariant
from idlm.models.loader import cpu_kernel
from idlm.models.quant import FORMATS, QuantLinear, quantize

needs_kernel = pytest.mark.skipif(group_gemm.group_gemm_module() is None,
                                  reason="the group GEMM does not build or run here (no compiler or no AVX2)")


def weight(n: int, k: int, fmt: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=gen) * 0.1 + 0.01, fmt)


def group_linear(x, gq):
    if gq.fmt == "Q8_0":
        return group_gemm.group_linear_q8(x, gq.codes, gq.scale)
    return group_gemm.group_linear_q4(x, *gq.repack_columns(), gq.shape[0])


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k", [(1, 32), (37, 96), (130, 64), (64, 576)])
def test_group_linear_is_dequantise_then_matmul(fmt, n, k):
    gq = weight(n, k, fmt)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1))
    want = x.double() @ gq.dequantize().double().t()
    got = group_linear(x, gq)
    assert got.dtype == torch.float32 and got.shape == (9, n)
    slack = 1e-5 * want.abs().max().item()
    if fmt == "Q8_0":  # float32 x
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=slack)
    else:  # x rounded to int8 per group of 32: at most half a step (max|x_g| / 127) an element
        half_step = (x.view(9, k // 32, 32).abs().amax(-1) / 127 / 2).double().repeat_interleave(32, 1)
        bound = half_step @ gq.dequantize().double().abs().t()
        assert ((got.double() - want).abs() <= bound + slack).all()
        assert bound.max() < 0.1 * want.abs().max()
    # the offsets matter (a kernel that dropped them would fail the line above for Q4_x)
    if gq.offset is not None:
        assert (x.double() @ (gq.dequantize().double() - gq.offset.double().repeat_interleave(32, 1)).t()
                - want).abs().max() > 1e-3


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rows_bits_do_not_depend_on_the_other_rows(fmt):
    """Rows come in blocks of four and a tail of one to three: every row count up to 11 gives each
    row the bits it has alone."""
    gq = weight(70, 128, fmt)
    x = torch.randn(11, 128, generator=torch.Generator().manual_seed(2))

    def fn(a):
        return group_linear(a, gq)

    assert rows_invariant(fn, x)
    assert all(torch.equal(fn(x[i:i + 1])[0], fn(x)[i]) for i in range(len(x)))


@needs_kernel
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1"])
def test_quant_linear_on_the_group_kernel(fmt):
    """QuantLinear(kernel="group") with a bias and a 3-D input: the int4 kernel's result within
    its bfloat16 rounding of x, float32 out."""
    gq = weight(48, 64, fmt)
    bias = torch.randn(48)
    group, int4 = QuantLinear(gq, bias, kernel="group"), QuantLinear(gq, bias)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    got = group(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    # (4-bit: x rounded per group to int8, within about 1% of the float result)
    tolerance = 1e-4 if fmt == "Q8_0" else 2e-2
    torch.testing.assert_close(got, F.linear(x, gq.dequantize(), bias), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got, int4(x), rtol=3e-2, atol=3e-2)


def test_kernel_selection(monkeypatch, caplog):
    """Under float32 activations the group GEMM serves every format; bfloat16 activations keep
    PyTorch's int4 kernel; IDLM_CPU_KERNEL=int4pack, a CPU without AVX2 or a failed build fall back
    to it (the last two with a warning)."""
    group = "group" if group_gemm.group_gemm_module() is not None else "int4pack"
    for fmt in FORMATS:
        assert cpu_kernel(fmt, torch.bfloat16) == "int4pack"
        assert cpu_kernel(fmt, torch.float32) == group

    def fresh():
        monkeypatch.setattr(cpu_kernels, "_module", [])
        return group_gemm.group_gemm_module()

    monkeypatch.setenv("IDLM_CPU_KERNEL", "int4pack")
    assert fresh() is None and cpu_kernel("Q8_0", torch.float32) == "int4pack"
    monkeypatch.delenv("IDLM_CPU_KERNEL")
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx2_fma", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert fresh() is None
    assert "no AVX2" in caplog.text
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx2_fma", lambda: True)

    def no_compiler():
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert fresh() is None
    assert "could not build" in caplog.text and "g++ not found" in caplog.text
