"""host_tensor packs a step's lists through array.array: the same tensor as torch.tensor gives."""

import random

import pytest
import torch

from idlm.engine.host_tensor import host_tensor


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.float32, torch.float64, torch.bool])
def test_host_tensor_equals_torch_tensor(dtype):
    rng = random.Random(0)
    ints = [rng.randrange(-2**31, 2**31) for _ in range(500)] + [True, False, 0]
    if dtype == torch.long:
        ints += [-2**63, 2**63 - 1]
    floats = [rng.uniform(-1e6, 1e6) for _ in range(500)] + [1 / 3, 1e-40, float("inf"), 0.1]
    cases = [[], [7]] + ([floats] if dtype.is_floating_point else [ints if dtype != torch.bool else [True, False]])
    for values in cases:
        got, want = host_tensor(values, dtype), torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_a_float_in_an_integer_list_truncates_as_torch_tensor_does():
    assert torch.equal(host_tensor([1, 2.7], torch.long), torch.tensor([1, 2.7], dtype=torch.long))
