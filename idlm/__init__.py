"""idlm: Introspective Diffusion Language Models, converted, decoded exactly, served fast."""

__version__ = "0.1.0"

from idlm.engine.llm import LLM  # noqa: E402
from idlm.engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "__version__"]
