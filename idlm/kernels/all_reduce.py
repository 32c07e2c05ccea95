"""The sum over a tensor-parallel group that every row-parallel projection ends with.

NCCL by default. On GPUs that can read each other's memory (NVLink peers), the rows a decode step
sums instead go through torch's symmetric-memory kernels: each rank stages its rows in a buffer
every rank can address and one kernel sums them, with no NCCL proxy in between. Measured on two
H200s inside a CUDA graph (benchmarks/tp_allreduce_probe.py): one row of 4096 bf16 7.4 us against
NCCL's 15.8, 64 rows 10.8 against 20.7, 448 rows 22.4 (two-shot) against 46.6; a Qwen3-8B step
does 72 of them. Every rank sums in the same order, so all ranks hold the same result.
"""

import importlib
import os

import torch
import torch.distributed as dist

SYMMETRIC_BYTES = 8 << 20  # the staging buffer; a larger sum (a long prefill chunk) goes through NCCL
ONE_SHOT_MAX_BYTES = 512 << 10  # above this, reduce-scatter + all-gather (two-shot) is the faster kernel
ENV = "IDLM_TP_ALL_REDUCE"  # "nccl" keeps every sum on NCCL


class AllReduce:
    """Sums x over the group in place and returns it (the hook of row-parallel layers)."""

    def __init__(self, group):
        self.group = group
        self.buffer: torch.Tensor | None = None  # the symmetric staging buffer, once set up

    def use_symmetric_memory(self, device: torch.device, dtype: torch.dtype, peers: list[str]) -> bool:
        """Sets up the symmetric-memory path if this host can run it; collective (every rank calls it
        at the same point with the same arguments). False, and NCCL throughout, where it cannot."""
        if not symmetric_memory_usable(device, dtype, peers):
            return False
        import torch.distributed._symmetric_memory as symm_mem

        self.buffer = symm_mem.empty(SYMMETRIC_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group.group_name)
        return True

    def release(self) -> None:
        self.buffer = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buffer, n = self.buffer, x.numel()
        if buffer is None or x.dtype != buffer.dtype or n > buffer.numel() or not x.is_contiguous():
            dist.all_reduce(x, group=self.group)
            return x
        flat, staged = x.view(-1), buffer[:n]
        staged.copy_(flat)
        size = dist.get_world_size(self.group)
        if n * x.element_size() <= ONE_SHOT_MAX_BYTES or n % (16 * size):
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group.group_name, flat)
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group.group_name)
            flat.copy_(staged)
        return x


def symmetric_memory_usable(device: torch.device, dtype: torch.dtype, peers: list[str]) -> bool:
    """CUDA, a dtype the kernels take, every other rank's GPU a peer of this one, torch built with the
    kernels, and not turned off by IDLM_TP_ALL_REDUCE=nccl."""
    if os.environ.get(ENV, "auto") == "nccl" or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32):
        return False
    others = [torch.device(p).index for p in peers if torch.device(p) != device]
    if not all(torch.cuda.can_device_access_peer(device.index, other) for other in others):
        return False
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
        return hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
    except (ImportError, AttributeError, RuntimeError):
        return False
