"""What every rank of a tensor-parallel group runs (engine/tensor_parallel.py is rank 0's side):
join the group, load its shard; and the loop of ranks 1.., which run every call rank 0 sends them,
in the order it sends them, until it says stop or goes away."""

import contextlib
import dataclasses
import datetime
import os
import pickle
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from idlm.kernels.attention import DenseAttention, PagedAttention, PagedBatch, TritonPagedAttention
from idlm.models.config import ModelConfig
from idlm.models.loader import init_random_weights, load_model
from idlm.models.lora import AdapterConfig, fuse_for_inference, load_adapter
from idlm.models.parallel import shard_model
from idlm.models.transformer import CausalLM

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that hangs (a dead one fails at once)
END_TIMEOUT_S = 15.0  # the most a rank waits for its group's teardown before it goes on without it
BACKENDS = {cls.__name__: cls for cls in (PagedAttention, TritonPagedAttention)}


@dataclasses.dataclass
class ShardSpec:
    """What a rank needs to load its shard (picklable: it travels to the spawned workers)."""

    folder: str
    dtype: torch.dtype
    devices: list[str]  # per rank
    size: int
    port: int
    adapter: str | None
    gguf: str | None
    compile: bool  # CUDA graphs: the compiled elementwise kernels, as on rank 0
    progress: bool


def init_group(spec: ShardSpec, rank: int) -> None:
    device = torch.device(spec.devices[rank])
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
        if rank == 0:
            # a dead worker is rank 0's to report (EngineDead, then a clean exit): NCCL's watchdog
            # would otherwise tear the process down on the communicator's error
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{spec.port}",
                            rank=rank, world_size=spec.size, timeout=COLLECTIVE_TIMEOUT, **kwargs)


def end_group(graceful: bool, timeout: float = END_TIMEOUT_S, device: torch.device | None = None) -> bool:
    """Ends this process's group so that another can start; False if that took longer than `timeout`.

    Every rank must end an NCCL group together, and stay alive until all have (ncclCommFinalize
    and ncclCommDestroy wait for their peers: a rank that ends it alone, or whose peer exits
    half-way, hangs), so at a graceful stop rank 0 and every worker call this at the same time and
    a worker exits only once rank 0 is done; with a dead peer the communicator is aborted instead.
    The wait is bounded either way (in a thread): a hung teardown must not keep a process from
    exiting. `device`: the rank's GPU, current in the teardown thread as in the rank's own."""
    def teardown():
        with contextlib.suppress(Exception):
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            if graceful or dist.get_backend() != "nccl":
                dist.destroy_process_group()
            else:
                dist.distributed_c10d._abort_process_group()

    if not dist.is_initialized():
        return True
    thread = threading.Thread(target=teardown, name="idlm-tp-teardown", daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()


def load_shard(spec: ShardSpec, rank: int) -> tuple[CausalLM, AdapterConfig | None]:
    """Rank `rank`'s shard on its device, adapter attached and fused. Float weights load whole on
    the CPU and are cut there; a random-weight shape is cut on the meta device and only its slice
    is allocated and drawn (its values then differ from the unsharded model's: speed only)."""
    cfg = ModelConfig.from_folder(spec.folder)
    device = torch.device(spec.devices[rank])
    if cfg.random_weights:
        with torch.device("meta"):
            model = CausalLM(cfg).to(spec.dtype)
    else:
        model = load_model(Path(spec.folder), spec.dtype, "cpu", progress=spec.progress and rank == 0,
                           gguf_path=None if spec.gguf is None else Path(spec.gguf))
    adapter = load_adapter(model, spec.adapter) if spec.adapter else None
    model = shard_model(model, rank, spec.size, dist.group.WORLD)
    if cfg.random_weights:
        model = model.to_empty(device=device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        init_random_weights(model, seed=rank)
    else:
        model = model.to(device)
    model.rotary.inv_freq = torch.tensor(cfg.rope_inv_freq(), dtype=torch.float32, device=device)
    fuse_for_inference(model)
    if spec.compile:
        from idlm.models.transformer import compile_elementwise

        compile_elementwise()
    return model.eval().requires_grad_(False), adapter


def device_batch(kind: str, meta, kv_cache: torch.Tensor | None, device: torch.device):
    if kind == "DenseAttention":
        backend = DenseAttention()
        backend.mask = None if meta is None else meta.to(device)
        return backend
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    batch = PagedBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})
    return BACKENDS[kind](kv_cache, batch)


def worker_main(spec: ShardSpec, rank: int, conn, parent: int) -> None:
    """A worker: load the shard, then run every call rank 0 sends until it says stop or goes away."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(max(1, torch.get_num_threads() // spec.size))
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a worker ends with os._exit
    try:
        conn.send(("hello", None))
        init_group(spec, rank)
        model, _ = load_shard(spec, rank)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    conn.send(("ready", None))
    device = torch.device(spec.devices[rank])
    runner = None
    try:
        with torch.inference_mode():
            while True:
                try:
                    command, args = pickle.loads(conn.recv_bytes())
                except EOFError:
                    command, args = "stop", ()
                if command == "stop":
                    if runner is not None:
                        runner.drop_graphs()  # before the group ends: a live graph holds its communicator
                    # together with rank 0, which ends its side as it says stop; then stay until rank 0
                    # is done too (its pipe closes), for a peer that leaves mid-teardown hangs NCCL's
                    end_group(graceful=True, device=device)
                    with contextlib.suppress(OSError):
                        conn.poll(END_TIMEOUT_S)
                    os._exit(0)
                if command == "runner":
                    from idlm.engine.runner import ModelRunner

                    runner = ModelRunner(model, *args, mask_ids={})
                elif command == "padded_decode":
                    runner.use_padded_decode(*args)
                elif command == "graph_step":
                    runner.decode_graphs.step(*args)
                    if device.type == "cuda":
                        # the next step refills the pinned staging buffer its copy to the device reads
                        # from; rank 0 syncs every step, and so, at no cost, does this rank
                        torch.cuda.current_stream(device).synchronize()
                elif command == "forward":
                    ids, positions, gate, kind, meta = args
                    attn = device_batch(kind, meta, None if runner is None else runner.kv_cache, device)
                    model(ids.to(device), positions.to(device), attn, None if gate is None else gate.to(device))
                elif command == "logits":
                    shape, dtype = args
                    hidden = torch.empty(shape, dtype=dtype, device=device)
                    dist.broadcast(hidden, 0)
                    model.logits(hidden)
                else:
                    raise RuntimeError(f"unknown tensor-parallel command {command!r}")
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # (no teardown: rank 0 sees this rank dead and aborts its side)


def _exit_with_parent(parent: int) -> None:
    """A worker stuck in a collective when rank 0 is killed would never see its pipe close."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)
