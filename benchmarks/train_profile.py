"""Where a training step's time goes: a few steps of a training config under torch.profiler, the
kernels (CUDA) or operators (CPU) with the most time, and the step's wall time split into the
forward + loss, the backward and the optimizer.

    python benchmarks/train_profile.py configs/smollm2/risd_v6.yaml --model /tmp/smollm2.gguf \\
        --init_adapter idlm/adapters/smollm2-risd [--steps 6] [--warmup 2] [--top 30]

Any `--key value` after the config overrides it, as with `idlm train`. Nothing is saved: the run's
output_dir is a temporary folder.
"""

import argparse
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from idlm.training.config import load_train_config
from idlm.training.trainer import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=6, help="profiled steps (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="steps before them, not profiled (default 2)")
    p.add_argument("--top", type=int, default=30, help="kernels or operators listed (default 30)")
    args, overrides = p.parse_known_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_train_config(args.config, [*overrides, "--output_dir", out, "--progress", "false",
                                              "--resume", "false", "--eval_every", "0", "--save_every", "0"])
        trainer = Trainer(cfg)
        device = trainer.device
        for _ in range(args.warmup):
            trainer._train_step()
        sync(device)
        walls = []
        parts = {"forward + loss": [], "backward": [], "optimizer": []}
        timed = wrap_phases(trainer, parts, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                t = time.perf_counter()
                record = trainer._train_step()
                sync(device)
                walls.append(time.perf_counter() - t)
        timed.undo()
    rows = trainer.rows_per_step
    print(f"{args.config}: {args.steps} steps of {rows} rows of {cfg.max_len}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}")
    print(f"step wall (profiled) median {statistics.median(walls) * 1e3:.1f} ms; "
          f"{record['tokens_per_s']:.0f} tokens/s in the last")
    for name, times in parts.items():
        if times:
            print(f"  {name:16s} {statistics.median(times) * 1e3:8.1f} ms a step (median, synchronised)")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))


class wrap_phases:
    """Times the objective's forward (with the loss), each backward and the optimizer step, per
    training step (synchronised around each: the split, not the total, is what this is for)."""

    def __init__(self, trainer: Trainer, parts: dict[str, list[float]], device: torch.device):
        self.trainer, self.parts, self.device = trainer, parts, device
        self.saved = (trainer.parallel_objective.forward, trainer.optimizer.step, torch.Tensor.backward)
        acc = {name: 0.0 for name in parts}
        forward, step, backward = self.saved

        def timed(name, fn):
            def run(*args, **kwargs):
                sync(device)
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                sync(device)
                acc[name] += time.perf_counter() - t
                if name == "optimizer":  # the last phase of a step
                    for key in parts:
                        parts[key].append(acc[key])
                        acc[key] = 0.0
                return out
            return run

        trainer.parallel_objective.forward = timed("forward + loss", forward)
        trainer.optimizer.step = timed("optimizer", step)
        torch.Tensor.backward = timed("backward", backward)

    def undo(self) -> None:
        forward, step, backward = self.saved
        self.trainer.parallel_objective.forward = forward
        self.trainer.optimizer.step = step
        torch.Tensor.backward = backward


if __name__ == "__main__":
    main()
