"""Tensor-parallel serving: one model over `size` processes of one host (models/parallel.py cuts it).

The engine's process is rank 0: it schedules, runs the round (ModelRunner._launch_round) and owns every
request. It starts ranks 1.. itself (torch.multiprocessing, spawn), which join one process group
(NCCL on GPUs, gloo on the CPU), load their shards and then only run what rank 0 runs, in the same
order, so that the collectives inside the model pair up (their loop: engine/tp_worker.py):

- rank 0's model is a `LeaderModel`: each forward and each head call is first sent to the
  workers (one pickled message per worker over a pipe: the step's inputs, the attention
  metadata), whose own models then run it on their shards and KV pools; the hidden rows a head
  call needs (some stored from earlier steps, on rank 0 only) are broadcast over the group;
- a decode step replayed as a CUDA graph (engine/decode_graphs.py) is sent as its packed inputs:
  every rank copies them into its own buffers and replays the same graph, captured by every rank
  at the same moment, collectives included.

Rank 0 watches its workers: a worker that dies makes the next (or the current) step raise
`EngineDead`, naming the rank, within seconds (a gloo collective fails as soon as the peer's
socket closes; on CUDA a watcher thread aborts the NCCL communicator, which ends collectives
stuck on the dead peer). A worker exits when rank 0's pipe closes.
"""

import contextlib
import dataclasses
import os
import pickle
import socket
import threading
import time
import weakref
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from idlm.engine.tp_worker import END_TIMEOUT_S, ShardSpec, end_group, init_group, load_shard, worker_main
from idlm.kernels.attention import DenseAttention, PagedBatch
from idlm.models.config import ModelConfig
from idlm.models.parallel import check_shardable
from idlm.models.transformer import CausalLM

START_TIMEOUT_S = 600.0  # loading a large checkpoint on every rank
DEATH_GRACE_S = 5.0  # after a failed collective: how long a dying worker may take to be seen dead
_LIVE: list[weakref.ref] = []  # the tensor-parallel engine of this process (rank 0), weakly
_STUCK: list[bool] = []  # [True] once a group's teardown did not finish: this process cannot start another


class EngineDead(RuntimeError):
    """The engine cannot run any more (a tensor-parallel worker died): restart it."""


def rank_devices(device: torch.device, size: int) -> list[str]:
    """The device of each rank: the CPU, or `size` GPUs from the given one on."""
    if device.type != "cuda":
        return ["cpu"] * size
    first = device.index or 0
    visible = torch.cuda.device_count()
    if first + size > visible:
        raise ValueError(f"tensor_parallel_size={size} asks for {size} GPUs (from cuda:{first}) but {visible} "
                         f"{'is' if visible == 1 else 'are'} visible; lower --tensor-parallel-size")
    return [f"cuda:{first + r}" for r in range(size)]


def check_tensor_parallel(cfg: ModelConfig, size: int, quantization: str, name: str, adapter: str | None) -> None:
    if quantization != "none":
        raise ValueError(f"tensor parallelism runs float weights only, not quantization {quantization}; pass "
                         f"--quantization none or --tensor-parallel-size 1")
    if cfg.random_weights and adapter:
        raise ValueError("a random-weight shape takes no adapter under tensor parallelism; leave out --adapter")
    check_shardable(cfg, size, name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_batch(attn) -> tuple[str, object]:
    """An attention backend as (class name, its metadata on the host), for the workers."""
    if isinstance(attn, DenseAttention):
        return "DenseAttention", None if attn.mask is None else attn.mask.cpu()
    batch = attn.batch
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return type(attn).__name__, PagedBatch(**{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                              for k, v in fields.items()})


class TensorParallel:
    """Rank 0's side: starts the workers, loads its own shard, sends them every call, watches them."""

    def __init__(self, folder, dtype: torch.dtype, device: torch.device, size: int, adapter: str | None,
                 gguf, compile: bool, progress: bool):
        if dist.is_initialized():
            if _STUCK:
                raise ValueError(f"the last tensor-parallel engine's process group did not end within "
                                 f"{END_TIMEOUT_S:.0f} s, so this process cannot start another; start a new process")
            if _LIVE and _LIVE[0]() is None:  # an engine dropped without close() whose teardown did not finish
                end_group(graceful=False)
            else:
                raise ValueError("this process already belongs to a torch.distributed group (a live tensor-parallel "
                                 "engine, or torchrun); close() the other engine, or run one per process")
        self.size = size
        self.spec = ShardSpec(str(folder), dtype, rank_devices(device, size), size, free_port(), adapter,
                              None if gguf is None else str(gguf), compile, progress)
        self.config = ModelConfig.from_folder(folder)
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(self.spec, rank, theirs, os.getpid()), daemon=True,
                               name=f"idlm-tp{rank}")
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self.dead: str | None = None
        self.closing = threading.Event()
        self.owns_group = [False]  # (a list: the finalizer below holds it, not the engine)
        self._closer = weakref.finalize(self, _close, self.conns, self.procs, self.closing, self.owns_group,
                                        torch.device(self.spec.devices[0]))
        try:
            self._expect("hello")
            init_group(self.spec, 0)
            self.owns_group[0] = True
            _LIVE[:] = [weakref.ref(self)]
            local, self.adapter = load_shard(self.spec, 0)
            self._expect("ready")
        except BaseException:
            self.close()
            raise
        self.model = LeaderModel(local, self)
        if self.spec.devices[0].startswith("cuda"):
            threading.Thread(target=_abort_on_death, args=(self.procs, self.closing, dist.group.WORLD),
                             name="idlm-tp-watch", daemon=True).start()

    def _expect(self, what: str) -> None:
        """Waits for every worker's `what` message, failing fast on a worker that dies or errs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = dict(zip(self.conns, range(1, self.size)))
        while pending:
            ready = wait([*pending, *(p.sentinel for p in self.procs)], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise EngineDead(f"tensor-parallel workers {sorted(pending.values())} did not start within "
                                 f"{START_TIMEOUT_S:.0f} s")
            for conn in [c for c in ready if c in pending]:
                try:
                    kind, detail = conn.recv()
                except EOFError:
                    continue  # its sentinel tells the rest
                rank = pending.pop(conn)
                if kind == "error":
                    raise ValueError(f"tensor-parallel worker rank {rank} failed to start: {detail}")
            self.check()

    def check(self) -> None:
        """EngineDead if a worker has died."""
        if self.dead is None:
            for rank, proc in enumerate(self.procs, 1):
                if not proc.is_alive():
                    self.dead = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with exit code "
                                 f"{proc.exitcode}; the engine cannot continue: restart it")
                    break
        if self.dead is not None:
            raise EngineDead(self.dead)

    def send(self, command: str, *args) -> None:
        self.check()
        message = pickle.dumps((command, args), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            try:
                conn.send_bytes(message)
            except OSError as e:
                self._died(e)

    def _died(self, error: BaseException):
        """Raises EngineDead naming the worker if one is dead or dies within DEATH_GRACE_S (a failed
        collective may be seen before the death that caused it), else `error`."""
        deadline = time.monotonic() + DEATH_GRACE_S
        while time.monotonic() < deadline:
            try:
                self.check()
            except EngineDead as dead:
                raise dead from error.__cause__ or error
            wait([p.sentinel for p in self.procs], timeout=0.1)
        raise error

    @contextlib.contextmanager
    def guard(self):
        """A step that fails on rank 0 may leave the ranks out of step (a worker waiting in a
        collective that rank 0 never reached): EngineDead, naming the worker if one died."""
        try:
            yield
        except EngineDead:
            raise
        except Exception as e:
            failed = EngineDead(f"a tensor-parallel step failed on rank 0 ({type(e).__name__}: {e}), which may "
                                f"leave the ranks out of step; restart the engine")
            failed.__cause__ = e
            self._died(failed)

    def mirror_step(self, step) -> None:
        """DecodeGraphs.run's packed step, for the workers to replay too."""
        self.send("graph_step", step)

    def close(self) -> None:
        self._closer()
        if _LIVE and _LIVE[0]() is self:
            _LIVE.clear()


def _abort_on_death(procs, closing: threading.Event, group) -> None:
    """CUDA: a dead worker leaves NCCL collectives waiting for ever; aborting the communicator ends
    them (the step then fails its liveness check). Holds no reference to the engine."""
    wait([p.sentinel for p in procs])
    if not closing.is_set():  # (at close the workers were told to stop)
        with contextlib.suppress(Exception):
            dist.distributed_c10d._abort_process_group(group)


def _close(conns, procs, closing: threading.Event, owns_group: list[bool], device: torch.device) -> None:
    """Stops the workers; the group ends on every rank at once (each worker ends its side on stop)."""
    closing.set()
    message = pickle.dumps(("stop", ()))
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send_bytes(message)
    if owns_group[0]:
        owns_group[0] = False
        if not end_group(graceful=all(proc.is_alive() for proc in procs), device=device):
            _STUCK[:] = [True]
    for conn in conns:  # (each worker waits for this before it exits: see tp_worker.end_group)
        conn.close()
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


class LeaderModel:
    """Rank 0's model: the local shard, whose forward and head calls the workers run too."""

    def __init__(self, local: CausalLM, tp: TensorParallel):
        self.local, self.tp = local, tp

    def __getattr__(self, name: str):
        return getattr(self.local, name)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, lora_gate: torch.Tensor | None = None):
        kind, meta = host_batch(attn)
        self.tp.send("forward", input_ids.cpu(), positions.cpu(), None if lora_gate is None else lora_gate.cpu(),
                     kind, meta)
        with self.tp.guard():
            return self.local(input_ids, positions, attn, lora_gate)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()
        self.tp.send("logits", tuple(hidden.shape), hidden.dtype)
        with self.tp.guard():
            dist.broadcast(hidden, 0)
            return self.local.logits(hidden)
