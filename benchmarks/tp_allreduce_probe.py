"""What one tensor-parallel all-reduce costs on this host's GPUs, eagerly and inside a CUDA graph.

A TP = 2 decode step of the Qwen3-8B shape does 72 all-reduces (two per layer) of [C, 4096]
bfloat16 rows; at C = 1 the weights take ~1.9 ms per GPU to read, so the all-reduces decide
whether two GPUs beat one. This times them alone, the way the engine runs them (NCCL through
torch.distributed, one process per GPU, the 72 captured in one graph), beside torch's
symmetric-memory kernels (one-shot and two-shot: peers read each other's buffer directly, no NCCL
proxy), checks that each sums right, and says whether the GPUs can reach each other's memory
directly (peer access; without it NCCL goes through host memory). Figures: benchmarks/RESULTS.md.

    python benchmarks/tp_allreduce_probe.py [--gpus 2] [--rows 1,64] [--hidden 4096] [--count 72]
                                            [--methods nccl,symm-one-shot,symm-two-shot]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from idlm.engine.tensor_parallel import free_port


def all_reduce_chain(method: str, x: torch.Tensor, count: int, group_name: str):
    """`count` all-reduces of x, by NCCL or by torch's symmetric-memory kernels (GPUs that read and
    write each other's memory directly: one kernel, no NCCL proxy), as a callable to time or capture."""
    if method == "nccl":
        def chain():
            for _ in range(count):
                dist.all_reduce(x)
        return chain
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
    symm_mem.rendezvous(buffer, group_name)
    op = {"symm-one-shot": torch.ops.symm_mem.one_shot_all_reduce_out,
          "symm-two-shot": None}[method]

    def chain():
        for _ in range(count):
            buffer.copy_(x.view(-1))
            if op is None:
                torch.ops.symm_mem.two_shot_all_reduce_(buffer, "sum", group_name)
                x.view(-1).copy_(buffer)
            else:
                op(buffer, "sum", group_name, x.view(-1))
    return chain


def rank_main(rank: int, args, port: int) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.gpus,
                            device_id=device)
    try:
        for method in args.methods:
            for rows in args.rows:
                x = torch.ones(rows, args.hidden, dtype=torch.bfloat16, device=device)
                try:
                    chain = all_reduce_chain(method, x, 1, dist.group.WORLD.group_name)
                    x.fill_(rank + 1)
                    chain()
                    right = x.eq(args.gpus * (args.gpus + 1) / 2).all().item()  # the sum of 1..gpus everywhere
                    x.zero_()  # (zeros stay zeros however often they are summed)
                    chain = all_reduce_chain(method, x, args.count, dist.group.WORLD.group_name)
                    eager, captured = time_chain(chain, args.count, args.repeats)
                except Exception as e:  # (a method this host cannot run: say so, try the next)
                    if rank == 0:
                        print(f"{method}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    dist.barrier()
                    break
                dist.barrier()
                if rank == 0:
                    print(f"{method} all-reduce of [{rows}, {args.hidden}] bf16 over {args.gpus} GPUs: eager "
                          f"{1e6 * eager:.1f} us, in a CUDA graph {1e6 * captured:.1f} us; {args.count} of them "
                          f"(a Qwen3-8B TP step): {1e3 * args.count * captured:.2f} ms; sums "
                          f"{'right' if right else 'WRONG'}", flush=True)
    finally:
        dist.destroy_process_group()  # every rank at once


def time_chain(chain, count: int, repeats: int) -> tuple[float, float]:
    """Seconds per all-reduce, eagerly and replayed from one CUDA graph."""
    for _ in range(3):
        chain()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        chain()
    torch.cuda.synchronize()
    eager = (time.perf_counter() - start) / (repeats * count)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()  # (the communicator's first use on this stream, outside the capture)
        with torch.cuda.graph(graph, stream=stream):
            chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return eager, (time.perf_counter() - start) / (repeats * count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--rows", default="1,64", help="comma-separated row counts (the batch's decode rows)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--count", type=int, default=72, help="all-reduces per step")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--methods", default="nccl,symm-one-shot,symm-two-shot",
                   help="comma-separated: nccl, symm-one-shot, symm-two-shot (torch symmetric memory)")
    args = p.parse_args()
    args.rows = [int(r) for r in args.rows.split(",")]
    args.methods = args.methods.split(",")
    visible = torch.cuda.device_count()
    if visible < args.gpus:
        raise SystemExit(f"needs {args.gpus} GPUs, {visible} visible")
    for a in range(args.gpus):
        peers = [b for b in range(args.gpus) if b != a and torch.cuda.can_device_access_peer(a, b)]
        print(f"cuda:{a} ({torch.cuda.get_device_name(a)}) has peer access to {peers or 'no other GPU'}")
    print("NCCL_P2P_DISABLE=" + os.environ.get("NCCL_P2P_DISABLE", "(unset)"), "NCCL_NVLS_ENABLE=" +
          os.environ.get("NCCL_NVLS_ENABLE", "(unset)"), flush=True)
    mp.spawn(rank_main, args=(args, free_port()), nprocs=args.gpus)


if __name__ == "__main__":
    main()
