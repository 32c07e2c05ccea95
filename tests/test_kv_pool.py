"""Sizing the KV pool (engine/kv_pool.py): the CPU budget, and on CUDA what a warm-up leaves,
with the GPU's memory figures stood in for so that the arithmetic runs on the CPU."""

import pytest
import torch

from idlm.config import EngineConfig
from idlm.engine import kv_pool
from idlm.models.config import ModelConfig
from idlm.models.loader import load_model

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny(llama_dir):
    return load_model(llama_dir, torch.float32, torch.device("cpu")), ModelConfig.from_folder(llama_dir)


def per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4


def test_cpu_pool_is_the_fixed_budget_and_limits_the_context(tiny):
    model, cfg = tiny
    config = EngineConfig(model="x", kv_block_size=16)
    pool = kv_pool.plan_kv_pool(model, cfg, config, torch.device("cpu"), "tiny")
    tokens = min(kv_pool.CPU_KV_TOKENS, kv_pool.CPU_KV_BYTES // per_token(cfg))
    assert pool.num_blocks == tokens // 16
    small = kv_pool.plan_kv_pool(model, cfg, EngineConfig(model="x", kv_block_size=16, kv_cache_tokens=256),
                                 torch.device("cpu"), "tiny")
    assert small.num_blocks == 16 and small.max_model_len == min(cfg.max_position_embeddings,
                                                                   256 - kv_pool.MAX_LOOKAHEAD)
    with pytest.raises(ValueError, match="does not fit the KV pool"):
        kv_pool.plan_kv_pool(model, cfg, EngineConfig(model="x", kv_cache_tokens=256, max_model_len=250),
                             torch.device("cpu"), "tiny")


def test_gpu_pool_is_what_the_warm_up_leaves(tiny, monkeypatch):
    """free - (1 - utilisation) x total - the warm-up's peak - a full decode batch's buffers."""
    model, cfg = tiny
    allocated = iter([1 * GiB])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: next(allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * GiB)  # 2 GiB of activations
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (60 * GiB, 80 * GiB))
    config = EngineConfig(model="x", max_num_seqs=4, gpu_memory_utilization=0.9, max_num_batched_tokens=64)
    budget = kv_pool._free_memory_after_warmup(model, cfg, config, torch.device("cpu"))
    decode = 4 * kv_pool.MAX_DECODE_TOKENS * (cfg.vocab_size * 14 + cfg.hidden_size * 8)
    assert budget == int(60 * GiB - 8 * GiB - 2 * GiB - decode)
    allocated = iter([1 * GiB])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (9 * GiB, 80 * GiB))
    with pytest.raises(ValueError, match="no GPU memory is left for the KV cache"):
        kv_pool._free_memory_after_warmup(model, cfg, config, torch.device("cpu"))
