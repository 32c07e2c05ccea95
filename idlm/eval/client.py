"""Where the text under evaluation comes from: our offline engine (`LLM`) or a running
OpenAI-compatible server (`idlm serve`, or any other for text-only tasks), behind one interface."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm import tqdm

from idlm.engine.llm import LLM
from idlm.engine.llm_engine import RequestOutput
from idlm.engine.sampling_params import SamplingParams
from idlm.eval.data import Prompt


@dataclass
class Completion:
    text: str
    tokens: int
    forwards: int  # 0 when a server does not report it


class Backend(Protocol):
    name: str

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        """Text or token-id prompts continue as they are; conversations go through the chat template."""
        ...

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """params as they will be applied (None: the server's default)."""
        ...


def per_request(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One seed for the run, a different draw for every request (as `idlm distill` does)."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def tokens_per_forward(completions: list[Completion]) -> float | None:
    forwards = sum(c.forwards for c in completions)
    return sum(c.tokens for c in completions) / forwards if forwards else None


class OfflineBackend:
    def __init__(self, llm: LLM, name: str = "offline"):
        self.llm = llm
        self.name = name

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        engine = self.llm.engine
        ids = [engine.chat_prompt(p) if p and isinstance(p[0], dict) else engine.tokenize(p) for p in prompts]
        outs = self.llm.generate(ids, per_request(params, len(ids)), use_tqdm=True) if ids else []
        return [self._completion(o) for o in outs]

    def resolve(self, params: SamplingParams) -> SamplingParams:
        return self.llm.engine.resolve(params)

    @staticmethod
    def _completion(out: RequestOutput) -> Completion:
        return Completion(out.text, len(out.token_ids), out.stats["forwards"])


def request_fields(params: SamplingParams) -> dict[str, Any]:
    """The body fields of a request with these params; options left at their defaults are not
    sent, so that servers other than idlm accept the request."""
    if params.verify_alpha != 1 or not params.spec_verify:
        raise ValueError("verify_alpha and use_spec_verify are not part of the server API; leave them out with --url")
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature}
    optional = {"top_p": params.top_p != 1, "top_k": params.top_k != 0, "seed": params.seed is not None,
                "stop": bool(params.stop), "stop_token_ids": bool(params.stop_token_ids),
                "ignore_eos": params.ignore_eos, "mode": params.mode is not None,
                "stride": params.stride is not None, "proposal": params.proposal is not None}
    body.update({name: getattr(params, name) for name, given in optional.items() if given})
    return body


class ServerBackend:
    """Requests go to /v1/completions (text prompts) or /v1/chat/completions (conversations),
    `concurrency` at a time so that the server can batch them."""

    def __init__(self, url: str, concurrency: int = 8, timeout: float = 600.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {url!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        try:
            import httpx  # only --url needs it: an optional dependency
        except ImportError as e:
            raise ValueError("evaluating against a server needs httpx: pip install 'idlm[eval]'") from e
        self.http_error = httpx.HTTPError
        self.url = url.rstrip("/").removesuffix("/v1")
        self.concurrency = concurrency
        self.http = httpx.Client(base_url=self.url, timeout=timeout)
        models = self._call("GET", "/v1/models").get("data") or []
        if not models:
            raise ValueError(f"{self.url}/v1/models lists no model")
        self.model = models[0]["id"]
        self.name = f"{self.url} ({self.model})"

    def resolve(self, params: SamplingParams) -> SamplingParams:
        request_fields(params)  # refuses what the API cannot carry
        return params

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            r = self.http.request(method, path, json=body)
        except self.http_error as e:
            raise ValueError(f"cannot reach the server at {self.url}: {e}") from e
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise ValueError(f"the server answered {r.status_code} to {path}: {message}")
        return r.json()

    def _one(self, prompt: Prompt, params: SamplingParams) -> Completion:
        body = dict(request_fields(params), model=self.model)
        if prompt and isinstance(prompt[0], dict):
            reply = self._call("POST", "/v1/chat/completions", dict(body, messages=prompt))
            text = reply["choices"][0]["message"]["content"] or ""
        else:
            reply = self._call("POST", "/v1/completions", dict(body, prompt=prompt))
            text = reply["choices"][0]["text"]
        usage = reply.get("usage") or {}
        return Completion(text, usage.get("completion_tokens", 0), usage.get("forwards", 0))

    def complete(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        params_list = per_request(params, len(prompts))
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(prompts), desc="generating") as bar:
            futures = [pool.submit(self._one, p, sp) for p, sp in zip(prompts, params_list)]
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
            try:
                return [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the first error ends the run
                raise
