"""Batch-invariant kernels (GPU, Triton): each row's result has the same bits whatever else the
launch holds, so a request decodes the same tokens alone, in any batch, and under any mode.

cuBLAS picks a GEMM kernel (tile, split-K) by the number of rows, and torch.compile's reductions
are autotuned per process, so in bfloat16 a row's last bits change with its batch mates and a
greedy output then drifts within a few dozen tokens. Here every kernel has one fixed
configuration:

- `matmul`: x @ W^T (+ bias) with fixed tiles (BLOCK_M x 64 x 64) and the K axis cut into chunks
  that depend only on W's shape (`fixed_split.matmul_chunks`); every chunk is accumulated from
  zero and the chunks are added in order, in one program (many rows) or by a second kernel over
  the chunks' fp32 partials (few rows: more programs read the weight), with the same bits.
- `rms_norm`, `apply_rotary`, `silu_mul`: one program per row (or element block), a fixed
  reduction width; the same kernels run eagerly and inside CUDA graphs (the compiled versions
  of the normal mode contract multiply-adds differently from the eager ones).

`use_batch_invariant(model)` puts them into a loaded model. Attention takes its fixed KV chunks
in `triton_attention.py` (`kv_chunk`), the gated LoRA a fixed row tile in `triton_lora.py`.
"""

import torch
import triton
import triton.language as tl
from torch import nn

from idlm.kernels.fixed_split import MATMUL_BLOCK_K, MATMUL_BLOCK_N, cdiv, matmul_chunks

MATMUL_BLOCK_M = 64
MATMUL_WARPS = 4
MATMUL_STAGES = 4
REDUCE_BLOCK = 1024
SPLIT_BELOW_PROGRAMS = 256  # with fewer (row tile x column tile) programs, one program per K chunk


@triton.jit
def _matmul(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    chunk_k, num_chunks, chunks_per_program,
    HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    first = tl.program_id(2) * chunks_per_program
    last = tl.minimum(first + chunks_per_program, num_chunks)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(first, last):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_end = tl.minimum((c + 1) * chunk_k, K)
        for k0 in range(c * chunk_k, k_end, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < k_end
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + kk[:, None],
                        mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if PARTIALS:  # chunk c's fp32 sum, for _sum_chunks
            tl.store(part_ptr + (c * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc,
                     mask=m_ok[:, None] & n_ok[None, :])
        else:
            total += acc
    if PARTIALS:
        pass  # _sum_chunks finishes
    else:
        if HAS_BIAS:
            total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_chunks(part_ptr, bias_ptr, out_ptr, M, N, stride_om, num_chunks, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    """The chunks' partials added in order from zero, as _matmul adds them in one program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    row, col = offs // N, offs % N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(num_chunks):
        total += tl.load(part_ptr + c * M * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + col, total.to(out_ptr.dtype.element_ty), mask=ok)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           chunking: tuple[int, int] | None = None, partials: bool | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias), every row's bits independent of the other rows.
    chunking (chunk_k, num_chunks) and partials (one program per K chunk) override the plan, for
    tests: the bits must not change with `partials`."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    chunk_k, num_chunks = chunking or matmul_chunks(n, k)
    tiles = (cdiv(m, MATMUL_BLOCK_M), cdiv(n, MATMUL_BLOCK_N))
    if partials is None:
        partials = tiles[0] * tiles[1] < SPLIT_BELOW_PROGRAMS
    partials = partials and num_chunks > 1
    part = torch.empty(num_chunks * m * n if partials else 1, dtype=torch.float32, device=x.device)
    b = bias if bias is not None else out
    _matmul[(*tiles, num_chunks if partials else 1)](
        x2, weight, b, out, part, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
        chunk_k, num_chunks, 1 if partials else num_chunks,
        HAS_BIAS=bias is not None, PARTIALS=partials,
        BLOCK_M=MATMUL_BLOCK_M, BLOCK_N=MATMUL_BLOCK_N, BLOCK_K=MATMUL_BLOCK_K,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=MATMUL_WARPS, num_stages=MATMUL_STAGES,
    )
    if partials:
        _sum_chunks[(cdiv(m * n, REDUCE_BLOCK),)](part, b, out, m, n, out.stride(0), num_chunks,
                                                  HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, heads, stride_xt, stride_xh, dim, eps, BLOCK_D: tl.constexpr):
    r = tl.program_id(0)
    t, h = r // heads, r % heads
    d = tl.arange(0, BLOCK_D)
    ok = d < dim
    x = tl.load(x_ptr + t.to(tl.int64) * stride_xt + h * stride_xh + d, mask=ok, other=0.0).to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, 0) / dim + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * dim + d, (w * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [tokens, heads, dim] with unit stride along dim (a view where possible)."""
    x3 = x.reshape(-1, 1, x.shape[-1]) if x.dim() <= 2 else x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) (float32 inside, rounded to x's dtype before the weight), per row."""
    x3 = _rows(x)
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    rows = x3.shape[0] * x3.shape[1]
    if rows:
        _rms_norm[(rows,)](x3, weight, out, x3.shape[1], x3.stride(0), x3.stride(1), x3.shape[2], eps,
                           BLOCK_D=triton.next_power_of_2(x3.shape[2]), num_warps=4)
    return out.view(x.shape)


@triton.jit
def _rotary(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ok = (h < heads)[:, None]
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * 2 * HALF + d)[None, :]
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + d)[None, :]
    s1 = tl.load(sin_ptr + t * 2 * HALF + d)[None, :]
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + d)[None, :]
    dst = out_ptr + (t * heads + h[:, None]) * 2 * HALF + d[None, :]
    tl.store(dst, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=ok)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, dim] rotated by cos, sin [..., dim] (float32), as transformer.apply_rotary."""
    x3 = _rows(x)
    cos, sin = cos.reshape(-1, x.shape[-1]).contiguous(), sin.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    if x3.shape[0]:
        _rotary[(x3.shape[0],)](x3, cos, sin, out, x3.shape[1], x3.stride(0), x3.stride(1),
                                HALF=x.shape[-1] // 2, BLOCK_H=triton.next_power_of_2(x3.shape[1]), num_warps=4)
    return out.view(x.shape)


@triton.jit
def _silu_mul(x_ptr, out_ptr, rows, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < rows * width
    row, col = offs // width, offs % width
    act = tl.load(x_ptr + row * 2 * width + col, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * width + width + col, mask=ok, other=0.0).to(tl.float32)
    silu = (act / (1.0 + tl.exp(-act))).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, (silu.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half of the last axis."""
    width = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * width).contiguous()
    out = torch.empty(x.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    if x.numel():
        _silu_mul[(cdiv(x.shape[0] * width, REDUCE_BLOCK),)](x, out, x.shape[0], width, BLOCK=REDUCE_BLOCK,
                                                            num_warps=4)
    return out.view(*gate_up.shape[:-1], width)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), the sum rounded to x's dtype before the norm."""
    total = residual + x
    return rms_norm(total, weight, eps), total


OPS = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "apply_rotary": apply_rotary, "silu_mul": silu_mul}


class InvariantLinear(nn.Linear):
    """nn.Linear through `matmul` (same parameters, same names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.bias)


def invariant_linear(linear: nn.Linear) -> InvariantLinear:
    new = InvariantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight = linear.weight
    new.bias = linear.bias
    return new
