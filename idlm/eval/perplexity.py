"""Clean-stream perplexity of a text file: our own model, causal attention (DenseAttention),
no MASK tokens, over sliding windows of the context. Each window scores only the tokens the
previous window did not, with everything before them in the window as context; the text's
first token has no context and is not scored. For an I-DLM this is its AR stream; an R-ISD
adapter never changes it (the gate is off on clean tokens), so none is loaded.

A converted model's MASK id is part of its vocabulary but never sampled (the decoder bans it), so
the perplexity is that of the distribution the decoder samples from: softmax without the MASK
logit. `perplexity_with_mask` keeps it, for comparison."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from idlm.eval.data import read_text
from idlm.kernels.attention import DenseAttention
from idlm.models.loader import (
    auto_dtype,
    gguf_source,
    load_model,
    model_name,
    parse_dtype,
    resolve_model_folder,
    resolve_quantization,
)
from idlm.models.tokenizer import load_tokenizer
from idlm.models.transformer import CausalLM

DEFAULT_CONTEXT = 2048
LOGIT_ROWS = 1024  # rows turned into logits at a time: a 2048 x 49k float32 block is 400 MB


@dataclass
class PerplexityReport:
    tokens: int  # tokens scored
    mean_nll: float  # nats per token
    perplexity: float
    windows: int
    context: int
    window_stride: int
    banned_token: int | None = None  # the MASK id left out of the softmax
    perplexity_with_mask: float | None = None  # the full softmax, MASK included


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens."""
    if context < 2:
        raise ValueError(f"the context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"the window stride must be in [1, context={context}], got {stride}")
    spans, scored_to = [], 1
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        if end > scored_to:
            spans.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == n:
            break
    return spans


@torch.inference_mode()
def perplexity(model: CausalLM, ids: list[int], context: int, stride: int | None = None,
               progress: bool = False, banned_token: int | None = None) -> PerplexityReport:
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens of text, got {len(ids)}")
    context = min(context, model.cfg.max_position_embeddings)
    stride = stride or max(1, context // 2)
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    nll_with_mask = torch.zeros((), dtype=torch.float64, device=device)
    spans = window_spans(len(ids), context, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", disable=not progress):
        x = tokens[begin:end]
        hidden = model(x[None], torch.arange(end - begin, device=device)[None], DenseAttention())[0]
        # the row before position t predicts token t
        for lo in range(first, end, LOGIT_ROWS):
            hi = min(lo + LOGIT_ROWS, end)
            logits = model.logits(hidden[lo - 1 - begin:hi - 1 - begin]).float()
            if banned_token is not None:
                nll_with_mask += F.cross_entropy(logits, tokens[lo:hi], reduction="sum").double()
                logits[:, banned_token] = float("-inf")
            nll += F.cross_entropy(logits, tokens[lo:hi], reduction="sum").double()
        count += end - first
    mean = float(nll) / count
    with_mask = None if banned_token is None else float((nll_with_mask / count).exp())
    return PerplexityReport(count, mean, float(torch.tensor(mean, dtype=torch.float64).exp()), len(spans), context,
                            stride, banned_token, with_mask)


def evaluate(text_file: Path, model_path: str | None, device: str = "auto", dtype: str = "auto",
             context: int | None = None, stride: int | None = None, quantization: str = "auto") -> dict[str, Any]:
    text = read_text(text_file)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    quantization = resolve_quantization(model_path, quantization, torch.device(device))
    if dtype == "auto":
        dtype = auto_dtype(torch.device(device), quantization)
    folder = resolve_model_folder(model_path)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{model_name(model_path)} has no tokenizer; perplexity needs one to read text")
    model = load_model(folder, parse_dtype(dtype), device, quantization=quantization, gguf_path=gguf_source(model_path))
    ids = tokenizer.encode(text, add_special_tokens=True, verbose=False)
    banned = model.cfg.mask_token_id if model.cfg.mask_token_id is not None else model.cfg.sdar_mask_token_id
    if banned is not None and banned >= model.cfg.vocab_size:
        banned = None
    report = perplexity(model, ids, context or DEFAULT_CONTEXT, stride, progress=True, banned_token=banned)
    return {"task": "perplexity", "summary": {"model": model_name(model_path), "file": str(text_file), "dtype": dtype,
                                              "quantization": quantization,
                                              **asdict(report)}}
