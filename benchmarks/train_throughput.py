"""Training throughput of the introspective-consistency objective on one GPU (or several under
torchrun): tokens/s per GPU and MFU, FlexAttention block mask vs a dense boolean mask.

Random weights of a named shape, synthetic rows (25% prompt, 75% response), bf16 autocast over
float32 master weights, AdamW; the step is forward + backward + optimizer step of the real
objective (`idlm.training.trainer.Objective`).

    python benchmarks/train_throughput.py --shapes smollm2-135m,qwen3-0.6b --attention flex,dense
    torchrun --nproc-per-node 2 benchmarks/train_throughput.py --shapes smollm2-135m --attention flex
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from idlm.kernels.attention import DenseAttention, FlexAttention
from idlm.models.config import ModelConfig
from idlm.models.transformer import CausalLM
from idlm.training.objective import PackedBatch, combine, dense_mask, double, flex_block_mask, loss_targets
from idlm.training.trainer import Objective

SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=True, max_position_embeddings=40960),
}
PEAK_BF16 = 989e12  # H100 SXM dense bf16, the usual MFU denominator


def synthetic_batch(rows: int, length: int, vocab: int, device) -> PackedBatch:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (rows, length), generator=gen)
    response = (torch.arange(length) >= length // 4).expand(rows, length).clone()
    return PackedBatch(ids, response, torch.zeros(rows, length, dtype=torch.long),
                       torch.arange(length).expand(rows, length).clone()).to(device)


def step_flops(cfg: ModelConfig, batch: PackedBatch, mask: torch.Tensor) -> float:
    """Matmul FLOPs of forward + backward (3x forward): projections on all 2L tokens, lm_head on
    the loss rows, attention on the allowed (query, key) pairs only."""
    tokens = batch.input_ids.numel() * 2
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token_layer = 2 * (h * (q + 2 * kv) + q * h + 3 * h * i)
    t = loss_targets(batch)
    head = 2 * h * cfg.vocab_size * (len(t.noisy_rows) + len(t.clean_rows))
    attention = 4 * q * int(mask.sum()) * cfg.num_layers
    return 3 * (per_token_layer * cfg.num_layers * tokens + head + attention)


def bench(shape: str, attention: str, rows: int, length: int, steps: int, warmup: int, world: int) -> dict:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cfg = ModelConfig.from_dict(SHAPES[shape])
    torch.manual_seed(0)
    with device:
        model = CausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.ones_(p)
    objective = Objective(model, lora=False)
    runner = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    batch = synthetic_batch(rows, length, cfg.vocab_size, device)
    db = double(batch, cfg.vocab_size - 1)
    block = 3
    mask = dense_mask(db, block)
    attn = FlexAttention(flex_block_mask(db, block)[0]) if attention == "flex" else DenseAttention(mask)
    t = loss_targets(batch)

    def one_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            noisy, clean = runner(db, attn, t.noisy_rows, t.noisy_targets, t.clean_rows, t.clean_targets)
            loss = combine(noisy, clean, t.num_response, len(t.clean_targets), 0.2, t.num_response).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    tokens = rows * 2 * length
    return {"shape": shape, "attention": attention, "rows": rows, "clean_len": length, "world": world,
            "step_ms": elapsed * 1e3, "tokens_per_s_per_gpu": tokens / elapsed,
            "clean_tokens_per_s_per_gpu": rows * length / elapsed,
            "mfu": step_flops(cfg, batch, mask) / elapsed / PEAK_BF16,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "card": torch.cuda.get_device_name(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m,qwen3-0.6b")
    parser.add_argument("--attention", default="flex,dense")
    parser.add_argument("--rows", type=int, default=4, help="rows per step per GPU")
    parser.add_argument("--clean-len", type=int, default=2048, help="L: the model sees 2L tokens per row")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    results = []
    for shape in args.shapes.split(","):
        for attention in args.attention.split(","):
            r = bench(shape, attention, args.rows, args.clean_len, args.steps, args.warmup, world)
            results.append(r)
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps(r), flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print("| shape | attention | GPUs | rows x 2L | step ms | tokens/s/GPU | MFU | peak GiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['shape']} | {r['attention']} | {r['world']} | {r['rows']} x {2 * r['clean_len']} | "
                  f"{r['step_ms']:.1f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
