"""Python lists to host tensors on a step's path: through an array.array, which packs a list of
ints or floats several times faster than torch.tensor iterates it (a decode step at C = 64 sends
a few thousand integers: block tables, rows, round inputs)."""

import array

import torch

_TYPECODES = {torch.long: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def host_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """values (ints, bools or floats) as a 1-D CPU tensor of dtype, the same values as
    torch.tensor(values, dtype=dtype) gives."""
    code = _TYPECODES.get(dtype)
    if code is None or not values:
        return torch.tensor(values, dtype=dtype)
    try:
        packed = array.array(code, values)
    except TypeError:  # (a float in an integer list: torch.tensor's truncation, as before)
        return torch.tensor(values, dtype=dtype)
    return torch.frombuffer(packed, dtype=dtype)
