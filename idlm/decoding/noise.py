"""Counter-based random numbers: every draw is a pure function of (seed, position, stream).

A request's draws therefore do not depend on its batch mates, on preemption and recomputation, or
on the device, and they need no generator state on the host (so they run inside CUDA graphs)."""

import torch

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 keep every product of a 32-bit value inside int64 (no overflow).
MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)


class Stream:
    TARGET = 1  # tokens sampled from the clean distribution: AR, bonus, correction
    DRAFT = 2  # drafts sampled from the MASK distribution
    ACCEPT = 3  # acceptance tests of drafts


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & MASK32
    for m in MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * m) & MASK32
    return x ^ (x >> 15)


# Eagerly the hash is ~90 elementwise kernels, which dominates a small decode step on a GPU;
# integer arithmetic makes the fused kernel bit-identical to the eager one.
COMPILED: list = []  # the torch.compile'd _uniform, once compile_noise() ran


def uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Float64 uniforms in (0, 1), one per (seed, position) pair, for the given stream."""
    seeds, positions = seeds.long(), positions.long()
    if seeds.is_cuda and COMPILED:
        return COMPILED[0](seeds, positions, stream)
    return _uniform(seeds, positions, stream)


def compile_noise(device: torch.device) -> None:
    """Fuse the hash into one kernel with torch.compile (used for CUDA tensors), compiled now for
    one and for several draws of every stream rather than inside a request's first steps."""
    if not COMPILED:
        COMPILED.append(torch.compile(_uniform, dynamic=True, fullgraph=True))
    for size in (1, 3):
        for stream in (Stream.TARGET, Stream.DRAFT, Stream.ACCEPT):
            uniform(torch.arange(size, device=device), torch.arange(size, device=device), stream)


def _uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    key = mix32(mix32(seeds) ^ (seeds >> 32))
    key = mix32(key ^ mix32(positions + (stream << 24)))
    hi = mix32(key ^ 0x5BD1E995)
    lo = mix32(key ^ 0x1B873593)
    bits = (hi << 21) ^ (lo >> 11)  # 53 random bits
    return (bits.double() + 0.5) / float(1 << 53)
