"""A dense CPU GEMM whose rows do not depend on how many rows share it.

BLAS kernels compute whole tiles of rows with one micro-kernel and the leftover rows with
another (on this project's AVX2 CPU, tiles of 4: a row's float32 result differs in its last
bits between a 1-row and a 4-row GEMM). Padding every GEMM to a multiple of the tile makes each
row go through the same micro-kernel whatever the batch. The tile depends on the library, the
CPU and the dtype, so `RowTiledLinear.prepare` measures it for its weight.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

TILES = (1, 2, 4, 8, 16, 32, 64)
PROBE_ROWS = 24
PROBE_OUTPUTS = 2048  # the row tile is the library's choice along M; a slice of the outputs shows it cheaply


def row_tiled(gemm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    pad = -rows % tile
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
    out = gemm(flat)[:rows]
    return out.view(*x.shape[:-1], out.shape[-1])


def row_tiled_linear(linear: nn.Module) -> nn.Module:
    """A float nn.Linear as a prepared RowTiledLinear on the same parameters; other modules (a
    quantised QuantLinear, a RowTiledLinear) as they are."""
    if type(linear) is not nn.Linear:
        return linear
    tiled = RowTiledLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    tiled.weight, tiled.bias = linear.weight, linear.bias
    tiled.prepare()
    return tiled


def rows_invariant(fn, x: torch.Tensor) -> bool:
    """fn gives every row the same bits first among m rows (m = 1..len) as in the whole batch."""
    full = fn(x)
    return all(torch.equal(fn(x[:m]), full[:m]) for m in range(1, len(x) + 1))


def smallest_invariant_tile(gemm: Callable[[torch.Tensor], torch.Tensor], in_features: int,
                            dtype: torch.dtype) -> int:
    x = torch.randn(PROBE_ROWS, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    for tile in TILES:
        if rows_invariant(lambda a, t=tile: row_tiled(gemm, a, t), x):
            return tile
    raise RuntimeError(f"no row tile up to {TILES[-1]} makes this CPU's {dtype} GEMM row-invariant")


def onednn_gemm(packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class RowTiledLinear(nn.Linear):
    """nn.Linear padded to whole row tiles; after prepare(), through oneDNN on a weight packed for
    it (on this AVX2 CPU 4-6x faster than the default BLAS for the head at 4-16 rows)."""

    tile: int = 4
    packed: torch.Tensor | None = None

    def prepare(self) -> None:
        w = self.weight.detach()
        probe = partial(F.linear, weight=w[:PROBE_OUTPUTS])
        if self.bias is None and torch.backends.mkldnn.is_available():
            try:
                packed_probe = torch.ops.mkldnn._reorder_linear_weight(w[:PROBE_OUTPUTS].contiguous(), None)
            except RuntimeError:  # e.g. bfloat16 on a CPU without AVX-512 (`--dtype bfloat16` asked for): BLAS
                packed_probe = None
            if packed_probe is not None:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
                probe = onednn_gemm(packed_probe)
        self.tile = smallest_invariant_tile(probe, w.shape[1], w.dtype)

    def drop_float_weight(self) -> None:
        """Once packed, forward() reads the packed copy alone: the float weight goes, its shape left
        on the meta device so that any other use of it fails at once."""
        if self.packed is not None:
            self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=self.weight.dtype, device="meta"),
                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return row_tiled(onednn_gemm(self.packed), x, self.tile)
        return row_tiled(lambda a: F.linear(a, self.weight, self.bias), x, self.tile)
