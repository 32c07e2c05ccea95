"""A dense CPU GEMM whose rows do not depend on how many rows share it.

BLAS kernels compute whole tiles of rows with one micro-kernel and the leftover rows with
another (on this project's AVX2 CPU, tiles of 4: a row's float32 result differs in its last
bits between a 1-row and a 4-row GEMM). Padding every GEMM to a multiple of the tile makes each
row go through the same micro-kernel whatever the batch. tests/test_quant.py checks it on the
CPU it runs on, for the head's shape, up to 256 rows.
"""

import torch
import torch.nn.functional as F
from torch import nn

ROW_TILE = 4


def row_tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    pad = -rows % ROW_TILE
    if pad:
        flat = F.pad(flat, (0, 0, 0, pad))
    return F.linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.shape[0])


class RowTiledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiled_linear(x, self.weight, self.bias)
