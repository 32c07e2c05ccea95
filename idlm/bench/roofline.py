"""The fastest a forward can possibly be: max(bytes moved / memory bandwidth, FLOPs / matmul rate)."""

import time
from dataclasses import dataclass

import torch

from idlm.models.quant import QuantLinear
from idlm.models.transformer import CausalLM

H100_BANDWIDTH = 3.0e12  # B/s, device-to-device copy measured on the lent H100
H100_FLOPS = 800e12  # bf16 dense matmul


@dataclass(slots=True)
class Roofline:
    weight_bytes: int  # read by every forward: all weights except an untied embedding table (only rows are read)
    matmul_params: int  # weights multiplied with every fed token: layers and the head
    kv_bytes_per_token: int  # K and V of one token across all layers
    attn_flops_per_pair: int  # FLOPs of QK^T and PV for one (query token, key token) pair, all layers
    bandwidth: float = H100_BANDWIDTH
    flops: float = H100_FLOPS

    @classmethod
    def of(cls, model: CausalLM, bandwidth: float = H100_BANDWIDTH, flops: float = H100_FLOPS) -> "Roofline":
        cfg = model.cfg
        embed = model.model.embed_tokens.weight
        params = {id(p): p for p in model.parameters()}
        if model.lm_head.weight is not embed:
            params.pop(id(embed))
        quantised = [m for m in model.modules() if isinstance(m, QuantLinear)]
        weight_bytes = sum(t.numel() * t.element_size() for t in list(params.values()) +
                           [b for m in quantised for b in m.buffers()])
        matmul = (sum(p.numel() for p in params.values() if p.ndim > 1)
                  + sum(m.in_features * m.out_features for m in quantised))
        elem = embed.element_size()
        return cls(weight_bytes=weight_bytes, matmul_params=matmul,
                   kv_bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem,
                   attn_flops_per_pair=4 * cfg.num_layers * cfg.num_heads * cfg.head_dim,
                   bandwidth=bandwidth, flops=flops)

    def floor(self, contexts: list[int], queries: list[int]) -> float:
        """Seconds for one forward in which sequence i feeds queries[i] tokens and attends over
        contexts[i] keys (its cached tokens plus the fed ones)."""
        moved = self.weight_bytes + self.kv_bytes_per_token * sum(contexts)
        work = 2 * self.matmul_params * sum(queries)
        work += self.attn_flops_per_pair * sum(q * c for q, c in zip(queries, contexts))
        return max(moved / self.bandwidth, work / self.flops)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The device's memory bandwidth as a large copy achieves it, B/s, counting bytes read plus
    bytes written: the best of three timings of `repeats` copies in a row, after a warm-up (a
    CPU copies 1/8 as many bytes)."""
    if device.type != "cuda":
        nbytes //= 8
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for trial in range(4):
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        sync()
        if trial:
            best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * nbytes / best
