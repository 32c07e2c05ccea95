"""The outside baseline: Hugging Face transformers `generate`, greedy, static left-padded batches."""

import contextlib
import json
import time
from pathlib import Path

import torch
import transformers

from idlm.bench.workload import Request
from idlm.models.shapes import RANDOM_WEIGHTS_KEY


def hf_config(folder: Path) -> transformers.PretrainedConfig:
    raw = json.loads((folder / "config.json").read_text())
    model_type = raw.pop("model_type")
    if model_type == "sdar":  # the I-DLM release is Qwen3 under another name
        model_type = "qwen3"
        raw.pop("architectures", None)
        raw.pop("auto_map", None)
    return transformers.AutoConfig.for_model(model_type, **raw)


def load_hf_model(folder: Path, dtype: torch.dtype, device: torch.device) -> transformers.PreTrainedModel:
    """The checkpoint in `folder`; for a random-weight shape, the same architecture initialised
    at random directly on `device`."""
    cfg = hf_config(folder)
    if getattr(cfg, RANDOM_WEIGHTS_KEY, False):
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, config=cfg, dtype=dtype).to(device)
    return model.eval()


@contextlib.contextmanager
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def run_hf_baseline(folder: Path, dtype: torch.dtype, device: torch.device,
                    batches: list[list[Request]], log=None) -> list[dict]:
    """Times one `generate` call per batch (after a short warm-up call on the same batch): greedy,
    exactly the batch's largest max_tokens new tokens for every row (EOS suppressed)."""
    with quiet_transformers():
        model = load_hf_model(folder, dtype, device)
        cfg = model.config
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
        results = []
        for batch in batches:
            ids, mask = left_pad([r.prompt for r in batch], pad, device)
            new = max(r.max_tokens for r in batch)
            _generate(model, ids, mask, min(new, 4), pad, eos)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            out = _generate(model, ids, mask, new, pad, eos)
            _sync(device)
            elapsed = time.perf_counter() - start
            produced = out.shape[1] - ids.shape[1]
            results.append({
                "batch_size": len(batch), "output_tokens": produced * len(batch), "elapsed_s": elapsed,
                "output_tok_s": produced * len(batch) / elapsed, "per_request_tok_s": produced / elapsed,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            })
            if log:
                log(f"hf batch={len(batch)}: {results[-1]['output_tok_s']:.1f} tok/s")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


@torch.inference_mode()
def _generate(model, ids: torch.Tensor, mask: torch.Tensor, new: int, pad: int, eos: int | None) -> torch.Tensor:
    config = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                           pad_token_id=pad, eos_token_id=eos)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
