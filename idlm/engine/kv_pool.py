"""How large the paged KV pool is, and the context it leaves one request.

`ModelRunner.start` is the pool's one owner and runs nano-vllm's order: the model is loaded, a
warm-up forward shows what activations take (CUDA), the pool is sized from what is left (here),
allocated, and only then are the decode graphs captured into the remaining headroom.
"""

from dataclasses import dataclass

import torch

from idlm.config import EngineConfig
from idlm.decoding.layout import MAX_ROUND_ROWS
from idlm.kernels.attention import DenseAttention
from idlm.models.config import ModelConfig

MAX_DECODE_TOKENS = MAX_ROUND_ROWS  # the widest decode step per request
MAX_LOOKAHEAD = MAX_DECODE_TOKENS  # cache slots a round may write past the pending token
CPU_KV_BYTES = 1 << 30
CPU_KV_TOKENS = 16384


@dataclass(frozen=True)
class KVPool:
    num_blocks: int
    max_model_len: int  # prompt + output of one request: the model's context, the pool's, or the user's limit


def plan_kv_pool(model, model_config: ModelConfig, config: EngineConfig, device: torch.device, name: str,
                 kv_dtype: torch.dtype | None = None) -> KVPool:
    """The pool for `model` (under tensor parallelism rank 0's shard, whose KV heads every rank
    holds as many of): `config.kv_cache_tokens`, else a fixed CPU budget or what the GPU has left
    after a warm-up; clear errors for limits that cannot hold."""
    kv_tokens = config.kv_cache_tokens or _default_tokens(model, model_config, config, device, kv_dtype)
    num_blocks = kv_tokens // config.kv_block_size
    pool_len = num_blocks * config.kv_block_size - MAX_LOOKAHEAD
    if pool_len < 1:
        raise ValueError(f"kv_cache_tokens={kv_tokens} is too small; give at least {MAX_LOOKAHEAD + 64}")
    context = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > context:
        raise ValueError(f"max_model_len {config.max_model_len} is beyond {name}'s context of {context} "
                         f"tokens; give at most {context}")
    if config.max_model_len is not None and config.max_model_len > pool_len:
        raise ValueError(f"max_model_len {config.max_model_len} does not fit the KV pool of {kv_tokens} tokens "
                         f"({pool_len} usable by one request); raise kv_cache_tokens or lower max_model_len")
    return KVPool(num_blocks, min(config.max_model_len or context, context, pool_len))


def _default_tokens(model, model_config: ModelConfig, config: EngineConfig, device: torch.device,
                    kv_dtype: torch.dtype | None = None) -> int:
    cfg = model.cfg  # (under tensor parallelism this rank's KV heads)
    elem = torch.empty((), dtype=kv_dtype).element_size() if kv_dtype else next(model.parameters()).element_size()
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
    if device.type == "cuda":
        return _free_memory_after_warmup(model, model_config, config, device) // per_token
    return max(config.kv_block_size, min(CPU_KV_TOKENS, CPU_KV_BYTES // per_token))


@torch.inference_mode()
def _free_memory_after_warmup(model, cfg: ModelConfig, config: EngineConfig, dev: torch.device) -> int:
    """Bytes the KV pool may take: the engine's share of the GPU minus what is in use, minus the
    peak of a warm-up forward of a full prefill budget, minus the per-step buffers of a full
    decode batch (logits and probabilities of every row at the widest stride, and one decode
    graph's outputs). Graphs of further shapes, captured later, come out of the headroom that
    gpu_memory_utilization leaves."""
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    tokens = min(config.max_num_batched_tokens, cfg.max_position_embeddings)
    ids = torch.zeros(1, tokens, dtype=torch.long, device=dev)
    hidden = model(ids, torch.arange(tokens, device=dev)[None], DenseAttention())
    model.logits(hidden[:, -1])
    torch.cuda.synchronize(dev)
    activations = torch.cuda.max_memory_allocated(dev) - before
    del hidden
    decode_rows = config.max_num_seqs * MAX_DECODE_TOKENS
    decode = decode_rows * (cfg.vocab_size * (2 + 4 + 4 + 4) + cfg.hidden_size * 2 * 4)
    free, total = torch.cuda.mem_get_info(dev)
    budget = free - total * (1 - config.gpu_memory_utilization) - activations - decode
    if budget <= 0:
        raise ValueError(f"no GPU memory is left for the KV cache ({free / 2**30:.1f} GiB free, "
                         f"{(activations + decode) / 2**30:.1f} GiB needed for activations); lower "
                         f"max_num_seqs or max_num_batched_tokens, or raise gpu_memory_utilization")
    return int(budget)
