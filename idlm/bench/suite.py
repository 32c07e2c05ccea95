"""`idlm bench`: every (mode, concurrency) run on one engine, then the optional HF baseline."""

import gc
import itertools
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers

from idlm import __version__
from idlm.bench.hf_baseline import run_hf_baseline
from idlm.bench.report import DEFINITIONS
from idlm.bench.roofline import H100_FLOPS, Roofline, measure_copy_bandwidth
from idlm.bench.runner import poisson_arrivals, run_closed_loop, run_open_loop
from idlm.bench.workload import Request, cycle, read_workload, synthetic_requests, tokenize_workload
from idlm.config import MAX_STRIDE, EngineConfig
from idlm.engine.kv_pool import MAX_LOOKAHEAD
from idlm.engine.llm_engine import LLMEngine
from idlm.engine.sampling_params import MODES, STRIDE_POLICIES, SamplingParams
from idlm.models.config import ModelConfig
from idlm.models.gguf import float_folder
from idlm.models.loader import gguf_source, resolve_model_folder
from idlm.models.parallel import check_shardable
from idlm.models.shapes import shape_config, shape_folder
from idlm.models.tokenizer import load_tokenizer

WARMUP_TOKENS = 16
KV_BLOCK_SIZE = 16


@dataclass(slots=True)
class BenchConfig:
    model: str | None = None  # folder or .gguf; None (and no shape) = the embedded default model
    shape: str | None = None  # a random-weight shape of idlm.models.shapes
    workload: str | None = None  # JSONL file; None = synthetic
    num_prompts: int | None = None  # requests per run; None = max(4 C, 16), or the file's lines (at least 4 C)
    prompt_len: int = 128
    output_len: int = 256
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    request_rates: tuple[float, ...] = ()  # open-loop runs besides: Poisson arrivals at each rate (requests/s)
    modes: tuple[str, ...] | None = None  # None = ar, isd where the model has a MASK, risd with an adapter
    strides: tuple[int, ...] = (4,)  # N of isd and risd; each is a run of its own
    stride_policies: tuple[str, ...] = ("adaptive",)  # each multi-token (mode, N) runs under each
    branches: int | None = None  # most branches a round adds; None = as many as fit
    temperature: float = 0.0
    hf_baseline: bool = False
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_tokens: int | None = None  # None = enough for max_num_seqs requests of the longest length
    max_num_seqs: int | None = None  # None = the largest concurrency
    adapter: str | None = None
    seed: int = 0
    prefix_caching: bool = False
    enforce_eager: bool = False  # CUDA: decode steps without CUDA graphs
    # EngineConfig.overlap_scheduling of each run; both: every run twice on the same engine, alternating
    overlap: tuple[bool, ...] = (True,)
    # untimed before each closed-loop run: "short" (C short requests, every batch size once) or
    # "full" (the run itself once, so that no graph is captured inside the timed run)
    warmup: str = "short"
    # every run this many times on the one engine, interleaved (all runs once, then again): a noisy
    # machine's drift then falls on every mode alike, and each round's ratios compare side by side
    repeats: int = 1
    deterministic: bool = False  # batch-invariant kernels (EngineConfig.deterministic)
    sync_steps: bool = False  # the device synchronised around every step (runner.run_closed_loop)
    tensor_parallel_sizes: tuple[int, ...] = (1,)  # an engine each, every run on each (labels "tp=N" when several)
    peak_bandwidth: float | None = None  # None: measured on the device in the same call (a large copy)
    peak_flops: float = H100_FLOPS

    def validate(self) -> None:
        if self.model and self.shape:
            raise ValueError("give --model (a checkpoint) or --shape (random weights), not both")
        if self.shape:
            shape_config(self.shape)
        if not self.concurrency or any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be positive integers, got {list(self.concurrency)}")
        if self.modes is not None and (not self.modes or any(m not in MODES for m in self.modes)):
            raise ValueError(f"modes must be some of {', '.join(MODES)}, got {list(self.modes)}")
        for name in ("prompt_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.strides or any(not 2 <= n <= MAX_STRIDE for n in self.strides):
            raise ValueError(f"strides must be from 2 to {MAX_STRIDE}, got {list(self.strides)}")
        if not self.stride_policies or any(p not in STRIDE_POLICIES for p in self.stride_policies):
            raise ValueError(f"stride policies must be some of {', '.join(STRIDE_POLICIES)}, "
                             f"got {list(self.stride_policies)}")
        if self.branches is not None and not 0 <= self.branches < MAX_STRIDE:
            raise ValueError(f"branches must be from 0 to {MAX_STRIDE - 1}, got {self.branches}")
        if self.num_prompts is not None and self.num_prompts < max(self.concurrency):
            raise ValueError(f"num-prompts ({self.num_prompts}) must be at least the largest concurrency "
                             f"({max(self.concurrency)}), or C requests can never be in flight")
        if not self.tensor_parallel_sizes or any(not isinstance(n, int) or n < 1 for n in self.tensor_parallel_sizes):
            raise ValueError(f"tensor-parallel sizes must be positive integers, got {list(self.tensor_parallel_sizes)}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {self.repeats}")
        if self.warmup not in ("short", "full"):
            raise ValueError(f"warmup must be short or full, got {self.warmup!r}")
        if not self.overlap or len(set(self.overlap)) != len(self.overlap):
            raise ValueError(f"overlap scheduling must be off, on, or both once, got {list(self.overlap)}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if any(not r > 0 for r in self.request_rates):
            raise ValueError(f"request rates must be > 0 requests/s, got {list(self.request_rates)}")
        if (self.peak_bandwidth is not None and self.peak_bandwidth <= 0) or self.peak_flops <= 0:
            raise ValueError("peak-bandwidth and peak-flops must be > 0")

    def requests_per_run(self, concurrency: int, file_lines: int) -> int:
        if self.num_prompts is not None:
            return self.num_prompts
        if file_lines:  # cycled past the file's end: fewer than a few batches measure mostly the tail
            return max(file_lines, 4 * concurrency)
        return max(4 * concurrency, 16)


def kv_tokens_for(longest: int, num_seqs: int) -> int:
    """A KV pool that holds num_seqs requests of `longest` tokens, their lookahead and a partial block."""
    per_seq = -(-(longest + MAX_LOOKAHEAD) // KV_BLOCK_SIZE) * KV_BLOCK_SIZE + KV_BLOCK_SIZE
    return num_seqs * per_seq + MAX_LOOKAHEAD + KV_BLOCK_SIZE


def default_modes(engine: LLMEngine) -> tuple[str, ...]:
    modes = ["ar"]
    if engine.mask_ids["isd"] is not None:
        modes.append("isd")
    if engine.adapter is not None:
        modes.append("risd")
    return tuple(modes)


def variants(engine: LLMEngine, cfg: BenchConfig, modes: tuple[str, ...]) -> dict[str, SamplingParams]:
    """The runs, by label: ar once; isd and risd at every stride under every stride policy."""
    runs = {}
    for mode in modes:
        shapes = [(None, None)] if mode == "ar" else [(n, p) for n in cfg.strides for p in cfg.stride_policies]
        for stride, policy in shapes:
            params = engine.resolve(SamplingParams(temperature=cfg.temperature, ignore_eos=True, mode=mode,
                                                   stride=stride, stride_policy=policy, branches=cfg.branches,
                                                   max_tokens=cfg.output_len))
            label = mode if mode == "ar" else f"{mode} N={stride} {policy}"
            runs[label] = params
    return runs


def random_ids(engine: LLMEngine) -> tuple[int, set[int]]:
    """The id range random prompts draw from, and the ids they avoid (MASK, special tokens)."""
    vocab = engine.model_config.vocab_size
    exclude = {t for t in engine.mask_ids.values() if t is not None}
    if engine.tokenizer is not None:
        vocab = min(vocab, len(engine.tokenizer))
        exclude |= set(engine.tokenizer.all_special_ids)
    return vocab, exclude


def warmup_requests(requests: list[Request], vocab: int, exclude: set[int], seed: int) -> list[Request]:
    """Fresh random prompts of the same lengths (no prefix-cache hits later) and few output tokens,
    one more for each request, so the batch shrinks through every size from C down (a batch
    shape met for the first time in a timed run could cost a compilation or graph capture)."""
    fresh = synthetic_requests(len(requests), max(len(r.prompt) for r in requests), 1, vocab, seed, exclude)
    return [Request(f.prompt[:len(r.prompt)], min(r.max_tokens, WARMUP_TOKENS + i))
            for i, (f, r) in enumerate(zip(fresh, requests))]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(cfg: BenchConfig, command: str = "", log: Callable[[str], None] = lambda _: None) -> dict:
    cfg.validate()
    items = read_workload(Path(cfg.workload)) if cfg.workload else []
    folder = shape_folder(cfg.shape) if cfg.shape else resolve_model_folder(cfg.model)
    if not cfg.shape and gguf_source(cfg.model) is not None:  # the bench (and transformers) run its float weights
        folder = float_folder(gguf_source(cfg.model), torch.float32)
    counts = {c: cfg.requests_per_run(c, len(items)) for c in cfg.concurrency}
    for c, n in counts.items():
        if c > 1 and n < 2 * c:
            log(f"note: C={c} runs {n} requests, under two batches: nothing refills the batch as requests "
                f"finish, so tok/s leans on the last ones (the default is at least 4 C)")
    rate_count = cfg.requests_per_run(max(cfg.concurrency), len(items))  # requests of an open-loop run
    model_cfg = ModelConfig.from_folder(folder)
    base: list[Request] = []
    if items:
        base = tokenize_workload(items, load_tokenizer(folder), model_cfg.vocab_size, cfg.output_len)
        longest = max(len(r.prompt) + r.max_tokens for r in base)
    else:
        longest = cfg.prompt_len + cfg.output_len
    if longest > model_cfg.max_position_embeddings:
        raise ValueError(f"a request needs {longest} tokens (prompt + output) but the model's context is "
                         f"{model_cfg.max_position_embeddings}; lower --prompt-len/--output-len")
    for tp in cfg.tensor_parallel_sizes:  # before any engine runs
        check_shardable(model_cfg, tp, cfg.shape or folder.name)
    max_num_seqs = cfg.max_num_seqs or max(cfg.concurrency)
    kv_tokens = cfg.kv_cache_tokens or kv_tokens_for(longest, max_num_seqs)
    result = None
    for tp in cfg.tensor_parallel_sizes:
        engine = LLMEngine(EngineConfig(model=str(folder), device=cfg.device, dtype=cfg.dtype,
                                        max_num_seqs=max_num_seqs, kv_cache_tokens=kv_tokens,
                                        kv_block_size=KV_BLOCK_SIZE, seed=cfg.seed,
                                        enable_prefix_caching=cfg.prefix_caching, adapter=cfg.adapter,
                                        enforce_eager=cfg.enforce_eager, tensor_parallel_size=tp,
                                        deterministic=cfg.deterministic))
        try:
            if longest > engine.max_model_len:
                raise ValueError(f"a request needs {longest} tokens (prompt + output) but the KV pool holds "
                                 f"{engine.max_model_len}; raise --kv-cache-tokens")
            modes = cfg.modes or default_modes(engine)
            runs = variants(engine, cfg, modes)
            # the adaptive stride's prices, and every decode graph, before any timed run (as `idlm serve`)
            prepared = engine.prepare_decode_steps(max((p.stride for p in runs.values() if p.mode != "ar"), default=1))
            if prepared is not None:
                log(engine.prepared(prepared))
            vocab, exclude = random_ids(engine)
            if not base:
                base = synthetic_requests(max(counts.values()), cfg.prompt_len, cfg.output_len, vocab, cfg.seed,
                                          exclude)
            if result is None:
                bandwidth = cfg.peak_bandwidth or measure_copy_bandwidth(engine.device)
                roofline = Roofline.of(engine.model, bandwidth, cfg.peak_flops)
                device, dtype = engine.device, next(engine.model.parameters()).dtype
                result = _header(cfg, command, engine, folder, roofline, modes, max_num_seqs, kv_tokens, items,
                                 device, dtype)
                result["step_cost"] = {}
            else:  # the roofline of one rank's weights
                roofline = Roofline.of(engine.model, roofline.bandwidth, cfg.peak_flops)
            tag = f" tp={tp}" if len(cfg.tensor_parallel_sizes) > 1 else ""
            _bench_engine(engine, cfg, runs, tag, tp, base, counts, rate_count, vocab, exclude, roofline, result, log)
            cost = engine.policy.cost
            step_cost = {"measured_s": {str(batch): {str(rows): s for rows, s in costs.items()}
                                        for batch, costs in cost.table.items()},
                         "seen_s": {f"{batch}x{rows}": list(recent)
                                    for (batch, rows), recent in sorted(cost.seen.items())}}
            if len(cfg.tensor_parallel_sizes) == 1:
                result["step_cost"] = step_cost
            else:
                result["step_cost"][f"tp={tp}"] = step_cost
        finally:
            engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if cfg.hf_baseline:
        batches = [cycle(base, counts[c])[:c] for c in cfg.concurrency]
        result["hf_baseline"] = run_hf_baseline(folder, dtype, device, batches, log)
    return result


def _bench_engine(engine: LLMEngine, cfg: BenchConfig, runs: dict[str, SamplingParams], tag: str, tp: int,
                  base: list[Request], counts: dict[int, int], rate_count: int, vocab: int, exclude: set[int],
                  roofline: Roofline, result: dict, log: Callable[[str], None]) -> None:
    """Every run on one engine, each at every concurrency and request rate (cfg.repeats times over,
    interleaved; the repeats labelled #1, #2, ..)."""
    for repeat, ((label, params), overlap) in itertools.product(range(1, cfg.repeats + 1),
                                                                 itertools.product(runs.items(), cfg.overlap)):
        engine.config.overlap_scheduling = overlap  # read every step: the engine's graphs serve both
        if len(cfg.overlap) > 1:
            label += " overlap" if overlap else ""
        if cfg.repeats > 1:
            label += f" #{repeat}"
        run = dict(mode=label + tag, decoding=params.mode, stride=params.stride, stride_policy=params.stride_policy,
                   branches=params.branches, tensor_parallel_size=tp, overlap_scheduling=overlap, repeat=repeat)
        for c in cfg.concurrency:
            requests = cycle(base, counts[c])
            warm = requests if cfg.warmup == "full" else warmup_requests(requests[:c], vocab, exclude, cfg.seed + 1)
            run_closed_loop(engine, warm, c, params, roofline, cfg.sync_steps)
            figures = run_closed_loop(engine, requests, c, params, roofline, cfg.sync_steps)
            result["results"].append({**run, "concurrency": c, **figures})
            log(f"{label}{tag} C={c}: {figures['num_requests']} requests, {figures['output_tok_s']:.1f} tok/s, "
                f"{figures['per_request_tok_s']:.1f} tok/s per request"
                + (f", K chosen {figures['chosen_k']}" if figures["chosen_k"] else "")
                + (f", rounds priced {figures['priced_round_gain'][str(c)]:.2f}x an AR step at {c}"
                   if str(c) in figures["priced_round_gain"] else ""))
        for rate in cfg.request_rates:
            requests = cycle(base, rate_count)
            run_closed_loop(engine, warmup_requests(requests[:4], vocab, exclude, cfg.seed + 1), 4, params, roofline,
                            cfg.sync_steps)
            figures = run_open_loop(engine, requests, poisson_arrivals(len(requests), rate, cfg.seed), params,
                                    roofline, cfg.sync_steps)
            result["results"].append({**run, "concurrency": None, "request_rate": rate, **figures})
            log(f"{label}{tag} {rate} req/s: {figures['num_requests']} requests, ITL p50/p99 "
                f"{figures['itl_s_p50'] * 1e3:.1f}/{figures['itl_s_p99'] * 1e3:.1f} ms, between outputs "
                f"{figures['tbt_s_p50'] * 1e3:.1f}/{figures['tbt_s_p99'] * 1e3:.1f} ms")


def _header(cfg: BenchConfig, command: str, engine: LLMEngine, folder: Path, roofline: Roofline,
            modes: tuple[str, ...], max_num_seqs: int, kv_tokens: int, items: list, device: torch.device,
            dtype: torch.dtype) -> dict:
    mc = engine.model_config
    if cfg.workload:
        workload = {"kind": "file", "file": cfg.workload, "lines": len(items),
                    "description": f"{cfg.workload} ({len(items)} requests; {cfg.output_len} tokens where a line "
                                   f"gives no max_tokens)"}
    else:
        workload = {"kind": "synthetic", "prompt_len": cfg.prompt_len, "output_len": cfg.output_len,
                    "description": f"random token ids, prompt {cfg.prompt_len}, output {cfg.output_len} "
                                   f"(ignore_eos), seed {cfg.seed}"}
    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "idlm": __version__,
        "model": f"{cfg.shape} (random weights)" if cfg.shape else cfg.model or "embedded default model",
        "model_folder": str(folder),
        "random_weights": mc.random_weights,
        "dtype": str(dtype).removeprefix("torch."),
        "model_info": {"model_type": mc.model_type, "layers": mc.num_layers, "hidden_size": mc.hidden_size,
                       "num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
                       "vocab_size": mc.vocab_size, "parameters": sum(p.numel() for p in engine.model.parameters()),
                       "weight_bytes_per_forward": roofline.weight_bytes,
                       "kv_bytes_per_token": roofline.kv_bytes_per_token},
        "workload": workload,
        "settings": dict(asdict(cfg), modes=list(modes), concurrency=list(cfg.concurrency),
                         max_num_seqs=max_num_seqs, kv_cache_tokens=kv_tokens),
        "peak_bandwidth_used": roofline.bandwidth,
        "peak_bandwidth_source": ("given" if cfg.peak_bandwidth
                                  else "measured: a large device copy, read + written bytes"),
        "definitions": DEFINITIONS,
        "results": [],
        "hf_baseline": None,
    }
