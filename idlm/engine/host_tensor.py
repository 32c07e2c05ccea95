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


class PinnedRing:
    """Pinned host buffers taken in turn for the step's host-to-device copies: pinning a fresh
    tensor cost about 25 us on the H200's host, a few times a step (a fifth of an `ar` step's host
    work at C = 1 went to such small costs). A buffer is refilled only once the copy that read it
    is done: each take() marks, with an event, the end of the copy out of the buffer taken before
    it (its caller copies before taking another), and waits for that mark before reuse."""

    def __init__(self, slots: int = 8):
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.copied: list[torch.cuda.Event | None] = [None] * slots
        self.next = 0
        self.last: int | None = None

    def take(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """values as a pinned host tensor, valid until this ring has been taken from len(slots) more times."""
        if self.last is not None:
            done = torch.cuda.Event()
            done.record()
            self.copied[self.last] = done
        i = self.last = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.copied[i] is not None:
            self.copied[i].synchronize()
        src = host_tensor(values, dtype)
        size = src.numel() * src.element_size()
        buffer = self.buffers[i]
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[i] = torch.empty(max(2 * size, 4096), dtype=torch.uint8, pin_memory=True)
        host = buffer[:size].view(dtype)
        host.copy_(src)
        return host
