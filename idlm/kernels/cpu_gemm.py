"""A dense CPU GEMM whose rows do not depend on how many rows share it.

BLAS kernels compute whole tiles of rows with one micro-kernel and the leftover rows with
another (on this project's AVX2 CPU, tiles of 4: a row's float32 result differs in its last
bits between a 1-row and a 4-row GEMM). Padding every GEMM to a multiple of the tile makes each
row go through the same micro-kernel whatever the batch. The tile depends on the BLAS, the CPU
and the dtype, so `RowTiledLinear.calibrate` measures it once for its weight.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

TILES = (1, 2, 4, 8, 16, 32, 64)
PROBE_ROWS = 24
PROBE_OUTPUTS = 2048  # the row tile is the BLAS's choice along M; a slice of the outputs shows it cheaply


def row_tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     tile: int = 4) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    pad = -rows % tile
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
    return F.linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.shape[0])


def rows_invariant(fn, x: torch.Tensor) -> bool:
    """fn gives every row the same bits first among m rows (m = 1..len) as in the whole batch."""
    full = fn(x)
    return all(torch.equal(fn(x[:m]), full[:m]) for m in range(1, len(x) + 1))


def smallest_invariant_tile(weight: torch.Tensor) -> int:
    x = torch.randn(PROBE_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    for tile in TILES:
        if rows_invariant(partial(row_tiled_linear, weight=weight, tile=tile), x):
            return tile
    raise RuntimeError(f"no row tile up to {TILES[-1]} makes this CPU's {weight.dtype} GEMM row-invariant")


class RowTiledLinear(nn.Linear):
    tile: int = 4

    def calibrate(self) -> None:
        """The smallest tile that makes this weight's GEMM row-invariant here (tried on 24 rows)."""
        self.tile = smallest_invariant_tile(self.weight.detach()[:PROBE_OUTPUTS])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiled_linear(x, self.weight, self.bias, self.tile)
