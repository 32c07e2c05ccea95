"""Decoding config files in the reference implementation's YAML vocabulary.

    gen_block_size: 4        # stride N
    block_size: 7            # tokens a verify round feeds, 2N - 1: only checked against the stride
    temperature: 1.0
    top_k: 50
    top_p: 0.95
    use_spec_verify: true    # false: accept a draft only if it is the argmax of p (lossy at T > 0)
    verify_alpha: 1.0        # != 1 scales the acceptance test (lossy)
    conditional_lora: false  # true: mode risd (the gated LoRA on MASK rows)

Our own keys are accepted too (mode, stride, proposal, seed, max_tokens / max_new_tokens). The
reference proposes argmax drafts; we keep our exact `proposal: sample` unless the file names one.
"""

from pathlib import Path
from typing import Any

from idlm.config import read_yaml_mapping
from idlm.engine.sampling_params import SamplingParams

RENAMES = {
    "gen_block_size": "stride", "use_spec_verify": "spec_verify", "max_new_tokens": "max_tokens",
}
OURS = ("temperature", "top_k", "top_p", "verify_alpha", "seed", "max_tokens", "mode", "stride", "proposal",
        "spec_verify", "ignore_eos", "stop")
ROUND_TOKENS = "block_size"  # the reference's name for 2 * stride - 1
KNOWN = set(RENAMES) | set(OURS) | {ROUND_TOKENS, "conditional_lora"}


def load_decoding_config(path: str | Path) -> dict[str, Any]:
    """SamplingParams fields from a decoding YAML; raises ValueError naming any unknown key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "decoding config")
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise ValueError(f"decoding config {path}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(KNOWN))}")
    fields = {RENAMES.get(k, k): v for k, v in raw.items() if k not in (ROUND_TOKENS, "conditional_lora")}
    if "conditional_lora" in raw and "mode" not in raw:
        fields["mode"] = "risd" if raw["conditional_lora"] else "isd"
    stride = fields.get("stride")
    if ROUND_TOKENS in raw and stride is not None and raw[ROUND_TOKENS] != 2 * stride - 1:
        raise ValueError(f"decoding config {path}: block_size {raw[ROUND_TOKENS]} does not match gen_block_size "
                         f"{stride} (a verify round feeds 2 * gen_block_size - 1 = {2 * stride - 1} tokens)")
    SamplingParams(**fields)  # validates every value with the usual messages
    return fields
