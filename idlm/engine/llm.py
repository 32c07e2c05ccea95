from collections.abc import Sequence as Seq

from tqdm import tqdm

from idlm.config import EngineConfig
from idlm.engine.llm_engine import LLMEngine, RequestOutput
from idlm.engine.sampling_params import SamplingParams


class LLM:
    """Offline batch API: `LLM(model).generate(prompts, SamplingParams(...))`.

    model=None loads the embedded default model; a path may be a Hugging Face folder or a .gguf."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([self.engine.tokenize(p) for p in prompts], sampling_params, use_tqdm)

    def chat(self, conversations: list[dict[str, str]] | Seq[list[dict[str, str]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([self.engine.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def close(self) -> None:
        """Stops the engine's tensor-parallel workers (tensor_parallel_size > 1); nothing otherwise."""
        self.engine.close()

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no SamplingParams: the model's generation
        config (EngineConfig.generation_config), as vLLM does."""
        return self.engine.default_sampling_params()

    def _run(self, prompts: list[list[int]], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        for sp in sampling_params:
            sp.validate()
        order = {self.engine.add_request(p, sp): i for i, (p, sp) in enumerate(zip(prompts, sampling_params))}
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generating", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update()
        return results
