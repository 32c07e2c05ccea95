"""The engine loop of the server: one background thread owns the LLMEngine and loops `step()`.

Handlers on the event loop never touch the engine's state. A request is tokenised (chat template
included) in a small worker pool, so a long prompt never holds up the running batch; then the
handler posts commands (add, abort, fail, stop) to a thread-safe queue that the engine thread
drains before every step, so an abort frees its KV before the next forward. Outputs go back to
each request's asyncio queue through `call_soon_threadsafe`.

A step that raises ends the requests it may have touched (500) and the loop carries on while the
KV bookkeeping is still consistent; a second failure in a row, broken bookkeeping, or an engine
that cannot run any more (EngineDead: a tensor-parallel worker died) poisons the engine: every
request ends with 503, `ready` turns false for good and `on_fatal` is called so that the process
can exit and be restarted."""

import asyncio
import dataclasses
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from idlm.engine.llm_engine import LLMEngine, RequestOutput
from idlm.engine.sampling_params import SamplingParams
from idlm.engine.tensor_parallel import EngineDead
from idlm.server.metrics import ServerMetrics

logger = logging.getLogger("idlm.server")
STOP_TIMEOUT_S = 30.0
PIECE_CONTEXT = 6  # tokens decoded before a token to find its own text (byte-level BPE, leading spaces)
TOKENIZER_THREADS = 2
PREPARE_TIMEOUT_S = 10.0
# a prompt longer than this many characters per context token is refused untokenised: no real
# tokenizer packs that much text into one token, so it could not fit the context anyway
CHARS_PER_TOKEN = 64
MAX_FAILED_STEPS = 2  # consecutive failed steps that mean the engine itself is broken
DRAIN_POLL_S = 0.05


class EngineNotReady(Exception):
    """503: starting, shutting down, or failed for good."""


class QueueFull(Exception):
    """429: the bound on requests in flight is reached."""


class RequestRejected(ValueError):
    """400: the engine refused the request; `param` names the field at fault when known."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class RequestFailed(Exception):
    """500: preparing or running this request failed; the server carries on."""


def param_named_in(message: str, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if re.search(rf"\b{name}\b", message)), None)


@dataclass(eq=False)
class GenerationRequest:
    """A prompt (text or token ids) or a chat (messages), and how to decode it."""

    id: str  # the response id, which names the request in logs too
    params: SamplingParams
    max_tokens: int | None  # None: up to the end of the context (or the generation config's max_new_tokens)
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    provenance: bool = False

    @property
    def source(self) -> str:
        return "messages" if self.messages is not None else "prompt"

    def num_chars(self) -> int:
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt) if isinstance(self.prompt, str) else 0


@dataclass(slots=True)
class StepOutput:
    output: RequestOutput
    pieces: list[str] | None  # the step's new tokens decoded one by one, for provenance requests


@dataclass(eq=False)
class RequestHandle:
    request: GenerationRequest
    accepted: asyncio.Future  # resolves to the prompt length once the engine took the request
    results: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepOutputs, or the Exception that ends it
    prompt_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None  # resolved against the engine, max_tokens set
    request_id: int | None = None  # written by the engine thread before `accepted` resolves
    prompt_tokens: int = 0
    finished: bool = False  # event-loop view: finished, aborted or rejected
    arrival: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None  # engine thread: when its last tokens came out

    async def outputs(self) -> AsyncIterator[StepOutput]:
        while True:
            item = await self.results.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if item.output.finished:
                return


def settle(future: asyncio.Future, value) -> None:
    if not future.done():
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


class AsyncEngine:
    """Admits at most max_num_seqs + max_queue unfinished requests; beyond that, QueueFull."""

    def __init__(self, engine: LLMEngine, max_queue: int, metrics: ServerMetrics | None = None,
                 prepare_timeout: float = PREPARE_TIMEOUT_S):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_queue
        self.max_model_len = engine.max_model_len
        self.max_prompt_chars = engine.max_model_len * CHARS_PER_TOKEN
        self.prepare_timeout = prepare_timeout
        self.metrics = metrics or ServerMetrics()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="idlm-tokenize")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.on_fatal: Callable[[], None] | None = None  # called on the event loop once the engine is poisoned
        self.draining = False  # shutting down: nothing new is admitted
        self.closed = False  # the drain is over: nothing more reaches the engine
        self.stopping = False
        self.error: str | None = None  # set by the engine thread when the engine is poisoned
        self.failed_steps = 0  # consecutive; engine thread only
        self.in_flight = 0  # event loop only
        self.handles: dict[int, RequestHandle] = {}  # engine thread only
        self.metrics.observe_engine(engine)

    @property
    def ready(self) -> bool:
        return self.thread is not None and not self.draining and not self.stopping and self.error is None

    def not_ready_reason(self) -> str:
        if self.error:
            return self.error
        if self.draining or self.stopping:
            return "the server is shutting down; retry once it is back"
        return "the engine is not running yet; retry in a moment"

    def start(self) -> None:
        assert self.thread is None, "the engine loop runs once"
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="idlm-engine", daemon=True)
        self.thread.start()

    async def drain(self, timeout: float, force: Callable[[], bool] = lambda: False) -> None:
        """Stops admitting (503), gives the requests in flight `timeout` seconds to finish (less
        once `force()` is true), then ends the rest with 503."""
        if self.thread is None or self.closed:
            return
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline and not force():
            await asyncio.sleep(DRAIN_POLL_S)
        self.closed = True
        if self.in_flight:
            logger.warning("idlm: shutting down; ending %d requests that did not finish within %g s",
                           self.in_flight, timeout)
            self.commands.put(("fail", EngineNotReady(
                f"the server is shutting down and this request did not finish within its shutdown timeout "
                f"({timeout:g} s); retry it once the server is back")))

    async def stop(self) -> None:
        """Fails what is still in flight and waits for the thread (at most one step)."""
        if self.thread is None or self.stopping:
            return
        self.stopping = self.closed = True
        self.commands.put(("stop", None))
        await asyncio.to_thread(self.thread.join, STOP_TIMEOUT_S)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Tokenises the request and hands it to the engine; raises EngineNotReady, QueueFull,
        RequestRejected or RequestFailed."""
        if not self.ready:
            raise EngineNotReady(self.not_ready_reason())
        if self.in_flight >= self.capacity:
            raise QueueFull(f"the server holds its limit of {self.capacity} requests (running and waiting); "
                            f"retry later")
        handle = RequestHandle(request, self.loop.create_future())
        self.in_flight += 1
        try:
            handle.prompt_ids, handle.params = await self._prepare(request)
            if self.closed or self.error:
                raise EngineNotReady(self.not_ready_reason())
            self.commands.put(("add", handle))
            handle.prompt_tokens = await handle.accepted
        except asyncio.CancelledError:
            self.abort(handle)
            raise
        except Exception:
            self._release(handle)
            raise
        return handle

    async def tokenize(self, prompt: str | None, messages: list[dict[str, str]] | None,
                       add_special_tokens: bool | None, add_generation_prompt: bool) -> list[int]:
        """A prompt's token ids, or a chat's under the chat template (/tokenize); ValueError if
        this model cannot, or the text is too long to tokenise."""
        chars = len(prompt) if prompt is not None else sum(len(m["content"]) for m in messages)
        if chars > self.max_prompt_chars:
            raise ValueError(f"the text has {chars} characters; this server tokenises at most {self.max_prompt_chars}")
        work = asyncio.get_running_loop().run_in_executor(
            self.pool, self._encode, prompt, messages, add_special_tokens, add_generation_prompt)
        try:
            return await asyncio.wait_for(work, self.prepare_timeout)
        except TimeoutError:
            raise ValueError(f"tokenising took more than {self.prepare_timeout:g} s; shorten the text") from None

    async def detokenize(self, ids: list[int]) -> str:
        tokenizer, vocab = self.engine.tokenizer, self.engine.model_config.vocab_size
        if tokenizer is None:
            raise ValueError("this model has no tokenizer")
        if any(t >= vocab for t in ids):
            raise ValueError(f"token ids must be below the vocabulary size, {vocab}")
        return await asyncio.get_running_loop().run_in_executor(self.pool, tokenizer.decode, ids)

    def _encode(self, prompt: str | None, messages: list[dict[str, str]] | None, add_special_tokens: bool | None,
                add_generation_prompt: bool) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; its prompts are token ids")
        if prompt is not None:
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens is not False)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; tokenise a prompt instead")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=bool(add_special_tokens))

    def abort(self, handle: RequestHandle) -> None:
        """Stops an unfinished request (client gone); its KV is freed before the next step."""
        if handle.finished:
            return
        self._release(handle)
        self.commands.put(("abort", handle))

    def _release(self, handle: RequestHandle) -> None:
        if not handle.finished:
            handle.finished = True
            self.in_flight -= 1

    def _deliver(self, steps: list[tuple[RequestHandle, StepOutput | Exception]]) -> None:
        for handle, step in steps:
            if isinstance(step, Exception) or step.output.finished:
                self._release(handle)
            handle.results.put_nowait(step)

    async def _prepare(self, request: GenerationRequest) -> tuple[list[int], SamplingParams]:
        chars = request.num_chars()
        if chars > self.max_prompt_chars:
            raise RequestRejected(f"the {request.source} has {chars} characters; this server takes at most "
                                  f"{self.max_prompt_chars} ({CHARS_PER_TOKEN} per token of its {self.max_model_len}"
                                  f"-token context); shorten the {request.source}", request.source,
                                  "context_length_exceeded")
        work = self.loop.run_in_executor(self.pool, self._tokenize, request)
        try:
            return await asyncio.wait_for(work, self.prepare_timeout)
        except TimeoutError:
            raise RequestRejected(f"tokenising the {request.source} took more than {self.prepare_timeout:g} s; "
                                  f"shorten the {request.source}", request.source, "tokenization_timeout") from None

    def _tokenize(self, request: GenerationRequest) -> tuple[list[int], SamplingParams]:
        """On a pool thread: the prompt's token ids and the params resolved against the engine."""
        engine, source = self.engine, request.source
        try:
            ids = engine.chat_prompt(request.messages) if request.messages is not None else engine.tokenize(
                request.prompt)
            params = engine.resolve(request.params)
        except ValueError as e:
            param = param_named_in(str(e), ("mode", "stride_policy", "stride", "proposal", "branches", "logit_bias",
                                            "response_format"))
            raise RequestRejected(str(e), param or source) from e
        except Exception as e:
            logger.error("request %s: tokenising its %s failed", request.id, source, exc_info=True)
            raise RequestFailed(f"the server failed to tokenise the {source} of request {request.id} "
                                f"({type(e).__name__}: {e}); the error is logged; check the {source}'s text, or "
                                f"report it") from e
        room = engine.max_model_len - len(ids)
        if request.max_tokens is not None and request.max_tokens > room:
            raise RequestRejected(f"the context holds {engine.max_model_len} tokens and the prompt takes {len(ids)}, "
                                  f"so max_tokens can be at most {room}, got {request.max_tokens}; lower max_tokens or "
                                  f"shorten the {source}", "max_tokens", "context_length_exceeded")
        if request.max_tokens is None:  # the rest of the context, or less if the model's generation config says so
            max_tokens = min(room, engine.sampling_defaults.get("max_tokens", room))
            return ids, dataclasses.replace(params, max_tokens=max_tokens)
        return ids, dataclasses.replace(params, max_tokens=request.max_tokens)

    def _fatal(self) -> None:
        if self.on_fatal is not None:
            self.on_fatal()

    # everything below runs on the engine thread

    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception as e:  # a fault of the loop itself: nothing the engine holds can be trusted
                self._poison(e)

    def _turn(self) -> bool:
        """Takes the pending commands, then runs one step; False once told to stop."""
        idle = self.error is not None or not self.engine.has_unfinished()
        for kind, arg in self._take_commands(block=idle):
            if kind == "stop":
                self._fail_all(EngineNotReady("the server is shutting down; retry once it is back"))
                return False
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg)
            else:
                self._fail_all(arg)
        if self.error is None and self.engine.has_unfinished():
            self._step()
        self.metrics.observe_engine(self.engine)
        return True

    def _take_commands(self, block: bool) -> list[tuple[str, RequestHandle | Exception | None]]:
        commands = [self.commands.get()] if block else []
        while True:
            try:
                commands.append(self.commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, handle: RequestHandle) -> None:
        try:
            if self.error:
                raise EngineNotReady(self.error)
            handle.request_id = self.engine.add_request(handle.prompt_ids, handle.params)
        except (ValueError, EngineNotReady) as e:
            self.loop.call_soon_threadsafe(settle, handle.accepted, e)
            return
        except Exception as e:
            logger.error("request %s: the engine failed to take it", handle.request.id, exc_info=True)
            failure = RequestFailed(f"the engine failed to take request {handle.request.id} ({type(e).__name__}: "
                                    f"{e}); the error is logged; the server carries on, retry the request")
            self.loop.call_soon_threadsafe(settle, handle.accepted, failure)
            return
        self.handles[handle.request_id] = handle
        self.metrics.prompt_tokens.inc(len(handle.prompt_ids))
        self.loop.call_soon_threadsafe(settle, handle.accepted, len(handle.prompt_ids))

    def _abort(self, handle: RequestHandle) -> None:
        if self.handles.pop(handle.request_id, None) is not None:
            self.engine.abort(handle.request_id)
            self.metrics.requests.labels("aborted").inc()

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._step_failed(e)
            return
        self.failed_steps = 0
        now = time.perf_counter()
        self.metrics.observe_step(outputs, now - start)
        steps = []
        for out in outputs:
            handle = self.handles.get(out.request_id)
            if handle is None:
                continue
            if out.new_token_sources:
                self.metrics.observe_latency(handle.arrival, handle.last_token_at, now, len(out.new_token_sources))
                handle.last_token_at = now
            if out.finished:
                self.metrics.request_seconds.observe(now - handle.arrival)
            if out.finished:
                del self.handles[out.request_id]
            pieces = self._pieces(out) if handle.request.provenance else None
            steps.append((handle, StepOutput(out, pieces)))
        if steps:
            self.loop.call_soon_threadsafe(self._deliver, steps)

    def _step_failed(self, error: Exception) -> None:
        """Ends the requests the failed step may have touched (every one but those still waiting
        with no KV), so their KV is freed; poisons the engine if that leaves it inconsistent."""
        self.failed_steps += 1
        if self.failed_steps >= MAX_FAILED_STEPS or isinstance(error, EngineDead):  # (a tensor-parallel worker died)
            self._poison(error)
            return
        waiting = self.engine.scheduler.waiting
        untouched = {seq.seq_id for seq in waiting if not seq.block_table and not seq.num_computed}
        victims = [request_id for request_id in self.handles if request_id not in untouched]
        names = ", ".join(self.handles[request_id].request.id for request_id in victims) or "none"
        logger.error("an engine step failed; ending the requests it ran (%s)", names, exc_info=error)
        steps = []
        for request_id in victims:
            self.engine.abort(request_id)
            handle = self.handles.pop(request_id)
            steps.append((handle, RequestFailed(
                f"the engine failed while running request {handle.request.id} ({type(error).__name__}: {error}); "
                f"the request was stopped and the error logged; the server carries on, retry the request")))
        if steps:
            self.loop.call_soon_threadsafe(self._deliver, steps)
        if not self._consistent():
            self._poison(RuntimeError("the KV cache bookkeeping is inconsistent after a failed step"))

    def _consistent(self) -> bool:
        """Every block is either free (once) or held by exactly its live holders."""
        bm, scheduler = self.engine.block_manager, self.engine.scheduler
        live = [*scheduler.running, *scheduler.waiting]
        holders = Counter(block_id for seq in live for block_id in seq.block_table)
        free = set(bm.free_ids)
        return (len(free) == len(bm.free_ids) and len({id(seq) for seq in live}) == len(live)
                and not any(seq.is_finished for seq in live)
                and all(b.ref_count == holders[b.block_id] and (b.ref_count == 0) == (b.block_id in free)
                        for b in bm.blocks))

    def _poison(self, error: Exception) -> None:
        if self.error is None:
            self.error = (f"the engine failed ({type(error).__name__}: {error}); the server is exiting so that it "
                          f"can be restarted")
            logger.error("idlm: the engine failed; ending every request and exiting", exc_info=error)
            self.loop.call_soon_threadsafe(self._fatal)
        else:
            logger.error("idlm: the failed engine raised again", exc_info=error)
        self._fail_all(EngineNotReady(self.error))

    def _pieces(self, out: RequestOutput) -> list[str] | None:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return None
        ids = out.token_ids
        pieces = []
        for k in range(len(ids) - len(out.new_token_sources), len(ids)):
            window = ids[max(0, k - PIECE_CONTEXT):k + 1]
            before = tokenizer.decode(window[:-1], skip_special_tokens=True)
            after = tokenizer.decode(window, skip_special_tokens=True)
            pieces.append(after[len(before):] if after.startswith(before)
                          else tokenizer.decode(window[-1:], skip_special_tokens=True))
        return pieces

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.handles):
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may be broken already; the requests still have to end
                logger.debug("abort of a failed engine's request raised", exc_info=True)
        steps = [(handle, error) for handle in self.handles.values()]
        self.handles.clear()
        if steps:
            self.loop.call_soon_threadsafe(self._deliver, steps)
