"""Introspective acceptance rate (docs/ARCHITECTURE.md, "Statistics").

Generate with a decoder, keep q_k(x_k), the probability with which each emitted token was
proposed (the MASK distribution for accepted drafts, the clean distribution for the rest), then
run one clean causal forward over prompt + output to get p_k(x_k) and report the mean of
min(1, p_k / q_k): over all tokens, and over draft-proposed tokens only. AR gives 1.0.
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch

from idlm.decoding.sampling import SamplingTensors, token_probs
from idlm.engine.llm import LLM
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.sequence import TokenSource
from idlm.eval.client import per_request
from idlm.kernels.attention import DenseAttention


@dataclass
class IntrospectionReport:
    alpha: float  # over all emitted tokens
    alpha_draft: float  # over emitted tokens that were proposed as drafts (nan if none)
    tokens: int
    draft_tokens: int
    tokens_per_forward: float
    forwards: int = 0
    prompts: int = 0


@torch.inference_mode()
def introspective_acceptance(llm: LLM, prompts: list, params: SamplingParams | list[SamplingParams],
                             use_tqdm: bool = False) -> IntrospectionReport:
    """prompts: text, token ids, or chat conversations (lists of messages, through the chat template).
    A list of params (e.g. one seed per prompt) must share the sampling settings, which p uses too."""
    engine = llm.engine
    ids = [engine.chat_prompt(p) if isinstance(p, list) and p and isinstance(p[0], dict) else p for p in prompts]
    outs = llm.generate(ids, params, use_tqdm=use_tqdm)
    resolved = engine.resolve(params if isinstance(params, SamplingParams) else params[0])
    ratios, draft_ratios, forwards = [], [], 0
    for out in outs:
        forwards += out.stats["forwards"]
        ids = out.prompt_token_ids + out.token_ids
        if not out.token_ids:
            continue
        x = torch.tensor([ids], device=engine.device)
        hidden = engine.model(x, torch.arange(len(ids), device=engine.device)[None], DenseAttention())
        start = len(out.prompt_token_ids) - 1
        logits = engine.model.logits(hidden[0, start:start + len(out.token_ids)])
        st = SamplingTensors.build([(resolved.temperature, resolved.top_k, resolved.top_p, 0)] * len(out.token_ids),
                                   engine.device)
        probs = token_probs(logits, st, engine.mask_ids["isd"])
        p = probs.gather(1, torch.tensor(out.token_ids, device=engine.device)[:, None]).squeeze(1).double().cpu()
        q = torch.tensor(out.token_q, dtype=torch.float64)
        ratio = torch.where(q > 0, (p / q).clamp(max=1.0), torch.ones_like(p))
        ratios.append(ratio)
        is_draft = torch.tensor([s == TokenSource.DRAFT for s in out.token_sources])
        draft_ratios.append(ratio[is_draft])
    every = torch.cat(ratios) if ratios else torch.zeros(0, dtype=torch.float64)
    drafts = torch.cat(draft_ratios) if draft_ratios else torch.zeros(0, dtype=torch.float64)
    return IntrospectionReport(
        alpha=float(every.mean()) if len(every) else float("nan"),
        alpha_draft=float(drafts.mean()) if len(drafts) else float("nan"),
        tokens=len(every), draft_tokens=len(drafts),
        tokens_per_forward=len(every) / forwards if forwards else 0.0,
        forwards=forwards, prompts=len(outs),
    )


def evaluate(llm: LLM, prompts: list, params: SamplingParams) -> dict[str, Any]:
    """`idlm eval alpha`: one seed per prompt when params has a seed."""
    resolved = llm.engine.resolve(params)
    report = introspective_acceptance(llm, prompts, per_request(params, len(prompts)), use_tqdm=True)
    summary = {"model": llm.engine.name, "mode": resolved.mode, "stride": resolved.stride,
               "temperature": resolved.temperature, **asdict(report)}
    return {"task": "alpha", "summary": summary, "sampling": asdict(resolved)}
