"""Groupwise quantised weights for CPU inference: llama.cpp's Q4_0, Q4_1 and Q8_0 blocks kept as
they are (not dequantised), and the same formats made from float weights on load.

Every format is affine per group of 32 input features: w = code * scale + offset, computed in
float32 exactly as llama.cpp's dequantisation does. A matrix runs as one or two int4 planes
through PyTorch's int4 weight-only CPU kernel (`_weight_int4pack_mm_for_cpu`): Q4_0 and Q4_1
are one plane; Q8_0's signed byte splits exactly into a high and a low nibble, so
w = (16 d) * hi + d * lo is two planes, laid side by side along the input features of one GEMM.
That kernel accumulates each output in float32 over the input features in order, one output
element per accumulator, so a row's result does not depend on the other rows of the GEMM.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32
FORMATS = ("Q4_0", "Q4_1", "Q8_0")
BLOCK_BYTES = {"Q4_0": 2 + GROUP // 2, "Q4_1": 4 + GROUP // 2, "Q8_0": 2 + GROUP}
# the int4 kernel's output columns come in tiles of 16
_N_ALIGN = 16
_INT4_MM = torch._weight_int4pack_mm_for_cpu  # (the binding: no OpOverload call in Python)


@dataclass
class GroupQuant:
    """w[n, 32 g + i] = codes[n, 32 g + i] * scale[n, g] + offset[n, g] (offset None: 0).

    codes: uint8 0..15 for the 4-bit formats, int8 for Q8_0; scale and offset float32 [N, K / 32]."""

    fmt: str
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        w = self.codes.float().view(n, k // GROUP, GROUP) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k)

    def rows(self, index: torch.Tensor) -> "GroupQuant":
        return GroupQuant(self.fmt, self.codes[index], self.scale[index],
                          None if self.offset is None else self.offset[index])

    def repack_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A 4-bit matrix as the group GEMM's repacked kernel reads it (kernels/csrc/group_gemm.cpp,
        rows_block_q4x8): codes [ceil(N / 8), K / 32, 128] uint8, where for eight columns j and a
        group, input 8q + 4h + t of column j sits at byte 32q + 4j + t, in its low nibble for h = 0
        and its high one for h = 1; scales [ceil(N / 8), K / 32, 16] int16, the float16 bits of the
        eight columns' scale then offset (values float16 holds exactly). Columns past N are zero."""
        n, k = self.shape
        pad, groups = -n % 8, k // GROUP
        codes = F.pad(self.codes, (0, 0, 0, pad)).view(-1, 8, groups, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        packed = (codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)).reshape(-1, groups, 128).contiguous()

        def by_block(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, pad)).view(-1, 8, groups).transpose(1, 2)

        scales = torch.cat([by_block(self.scale), by_block(self.offset)], dim=-1).half().view(torch.int16)
        return packed, scales.contiguous()

    def int4_planes(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(codes 0..15, scale, offset) per plane; their dequantised sum is this matrix."""
        offset = self.offset if self.offset is not None else torch.zeros_like(self.scale)
        if self.fmt != "Q8_0":
            return [(self.codes, self.scale, offset)]
        q = self.codes.to(torch.int16)
        hi, lo = q >> 4, q & 15  # q = 16 hi + lo, hi in [-8, 7]
        return [((hi + 8).to(torch.uint8), self.scale * 16, self.scale * -128),
                (lo.to(torch.uint8), self.scale, torch.zeros_like(self.scale))]


def concat_rows(parts: list[GroupQuant]) -> GroupQuant:
    """Stack matrices of one format along the output features (a fused q/k/v or gate/up)."""
    fmts = {p.fmt for p in parts}
    if len(fmts) != 1:
        raise ValueError(f"a fused projection mixes the formats {sorted(fmts)}; idlm keeps one format per "
                         "projection: re-export the GGUF with one type for q/k/v and for gate/up, or pass "
                         "--quantization none")
    offsets = [p.offset for p in parts]
    return GroupQuant(parts[0].fmt, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                      None if offsets[0] is None else torch.cat(offsets))


def from_gguf_blocks(fmt: str, raw: np.ndarray, shape: tuple[int, int]) -> GroupQuant:
    """Decode llama.cpp blocks (uint8, row-major [N, K / 32 * block bytes]) of a [N, K] matrix."""
    n, k = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, BLOCK_BYTES[fmt])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if fmt == "Q8_0":
        codes = blocks[..., 2:].copy().view(np.int8)
        return GroupQuant(fmt, torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d), None)
    if fmt == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        packed = blocks[..., 4:]
    else:
        m = d * -8.0  # Q4_0: (q - 8) d, the same float32 value as q d - 8 d
        packed = blocks[..., 2:]
    # element i < 16 in the low nibble of byte i, element 16 + i in its high nibble
    codes = np.concatenate([packed & 15, packed >> 4], axis=-1)
    return GroupQuant(fmt, torch.from_numpy(codes.reshape(n, k)), torch.from_numpy(d), torch.from_numpy(m))


def to_gguf_blocks(gq: GroupQuant) -> np.ndarray:
    """The llama.cpp blocks of gq (inverse of from_gguf_blocks; scales must be float16 values)."""
    n, k = gq.shape
    d = gq.scale.numpy().astype(np.float16).view(np.uint8).reshape(n, k // GROUP, 2)
    codes = gq.codes.numpy().reshape(n, k // GROUP, GROUP)
    if gq.fmt == "Q8_0":
        parts = [d, codes.view(np.uint8)]
    else:
        packed = (codes[..., :GROUP // 2] | (codes[..., GROUP // 2:] << 4)).astype(np.uint8)
        parts = [d, packed]
        if gq.fmt == "Q4_1":
            parts.insert(1, gq.offset.numpy().astype(np.float16).view(np.uint8).reshape(n, k // GROUP, 2))
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def quantize(w: torch.Tensor, fmt: str) -> GroupQuant:
    """Float weights [N, K] in a GGUF format, the same bytes as llama.cpp's reference quantisers
    (codes from the float32 scale, rounded half away from zero; scales stored as float16)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {', '.join(FORMATS)}")
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"a quantised matrix needs in_features divisible by {GROUP}, got {k}")
    g = w.detach().float().view(n, k // GROUP, GROUP)
    if fmt == "Q8_0":
        d = g.abs().amax(-1) / 127
        v = g * _inverse(d)[..., None]
        codes = (v.sign() * (v.abs() + 0.5).floor()).clamp(-128, 127).to(torch.int8)
        return GroupQuant(fmt, codes.view(n, k), d.half().float(), None)
    if fmt == "Q4_1":
        lo, hi = g.amin(-1), g.amax(-1)
        d = (hi - lo) / 15
        codes = ((g - lo[..., None]) * _inverse(d)[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)
        return GroupQuant(fmt, codes.view(n, k), d.half().float(), lo.half().float())
    # Q4_0: the signed extreme maps to -8
    d = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0] / -8
    codes = (g * _inverse(d)[..., None] + 8.5).floor().clamp(0, 15).to(torch.uint8)
    d = d.half().float()
    return GroupQuant(fmt, codes.view(n, k), d, d * -8.0)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W groupwise quantised. Two kernels: PyTorch's int4 one (`int4pack`),
    whose activations enter as bfloat16 (its vectorised x86 form) and leave as bfloat16, and
    idlm's group GEMM (`group`, kernels/group_gemm.py: 4-bit codes repacked by columns, Q8_0
    codes and scales, float32 in and out, AVX2). Both accumulate each output in float32 in an
    order that does not depend on the other rows."""

    def __init__(self, weight: GroupQuant, bias: torch.Tensor | None = None, kernel: str = "int4pack"):
        super().__init__()
        self.fmt, self.kernel = weight.fmt, kernel
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if kernel == "group":
            from idlm.kernels.group_gemm import group_gemm_module

            module = group_gemm_module()
            if self.fmt == "Q8_0":
                # copies: a view would keep the whole mapped file it came from resident (QuantEmbedding)
                self.register_buffer("codes", weight.codes.clone())
                self.register_buffer("scale", weight.scale.clone())
                self.gemm = module.group_linear_q8
            else:  # repacked eight columns at a time (kernels/csrc/group_gemm.cpp)
                codes, scales = weight.repack_columns()
                self.register_buffer("codes", codes)
                self.register_buffer("scales", scales)
                self.gemm = module.group_linear_q4x8
            return
        planes = weight.int4_planes()
        self.num_planes = len(planes)
        n_pad = -self.out_features % _N_ALIGN
        codes = torch.cat([p[0] for p in planes], dim=1).to(torch.int32)
        scale = torch.cat([p[1] for p in planes], dim=1)
        # the kernel dequantises (code - 8) * scale + zero
        zero = torch.cat([p[2] + 8 * p[1] for p in planes], dim=1)
        if n_pad:
            codes = F.pad(codes, (0, 0, 0, n_pad), value=8)
            scale, zero = F.pad(scale, (0, 0, 0, n_pad)), F.pad(zero, (0, 0, 0, n_pad))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.plain = self.num_planes == 1 and not n_pad and bias is None  # one kernel call, nothing around it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (a decode step calls this 120 times on SmolLM2: every op and attribute lookup here counts,
        # about 1 us each on a 2-core CPU against the 30 us of a 576-wide projection's kernel)
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.kernel == "group":
            flat = flat if flat.dtype == torch.float32 else flat.float()
            if self.fmt == "Q8_0":
                out = self.gemm(flat, self.codes, self.scale)
            else:
                out = self.gemm(flat, self.codes, self.scales, self.out_features)
            out = out if x.dtype == torch.float32 else out.to(x.dtype)
            if self.bias is not None:
                out = out + self.bias
            return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)
        flat = flat.to(torch.bfloat16, memory_format=torch.contiguous_format)  # (the kernel's A must be)
        if self.plain:
            out = _INT4_MM(flat, self.packed, GROUP, self.scale_zero).to(x.dtype)
            return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)
        if self.num_planes > 1:
            flat = flat.repeat(1, self.num_planes)
        out = _INT4_MM(flat, self.packed, GROUP, self.scale_zero)[:, :self.out_features].to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"kernel={self.kernel}")


class QuantEmbedding(nn.Module):
    """Rows of a groupwise quantised [vocab, hidden] table, dequantised on lookup."""

    def __init__(self, weight: GroupQuant, dtype: torch.dtype):
        super().__init__()
        self.fmt, self.dtype = weight.fmt, dtype
        self.num_embeddings, self.embedding_dim = weight.shape
        # copies: a view would keep the whole mapped file it came from (every layer's blocks) resident
        self.register_buffer("codes", weight.codes.clone())
        self.register_buffer("scale", weight.scale.clone())
        self.register_buffer("offset", None if weight.offset is None else weight.offset.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = GroupQuant(self.fmt, self.codes[flat], self.scale[flat],
                          None if self.offset is None else self.offset[flat])
        return rows.dequantize().to(self.dtype).view(*ids.shape, self.embedding_dim)

