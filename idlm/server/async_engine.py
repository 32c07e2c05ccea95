"""The engine loop of the server: one background thread owns the LLMEngine and loops `step()`.

Handlers on the event loop never touch the engine. They post commands (add, abort, stop) to a
thread-safe queue that the thread drains before every step, so an abort frees its KV before the
next forward. Outputs go back to each request's asyncio queue through `call_soon_threadsafe`."""

import asyncio
import dataclasses
import logging
import queue
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from idlm.engine.llm_engine import LLMEngine, RequestOutput
from idlm.engine.sampling_params import SamplingParams
from idlm.server.metrics import ServerMetrics

logger = logging.getLogger("idlm.server")
STOP_TIMEOUT_S = 30.0
PIECE_CONTEXT = 6  # tokens decoded before a token to find its own text (byte-level BPE, leading spaces)


class EngineNotReady(Exception):
    pass


class QueueFull(Exception):
    pass


class RequestRejected(ValueError):
    """The engine refused the request; `param` names the field at fault when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def param_named_in(message: str, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if re.search(rf"\b{name}\b", message)), None)


@dataclass(eq=False)
class GenerationRequest:
    """A prompt (text or token ids) or a chat (messages), and how to decode it."""

    params: SamplingParams
    max_tokens: int | None  # None: up to the end of the context
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    provenance: bool = False


@dataclass(slots=True)
class StepOutput:
    output: RequestOutput
    pieces: list[str] | None  # the step's new tokens decoded one by one, for provenance requests


@dataclass(eq=False)
class RequestHandle:
    request: GenerationRequest
    accepted: asyncio.Future  # resolves to the prompt length once the engine took the request
    results: asyncio.Queue = field(default_factory=asyncio.Queue)  # StepOutputs, or the Exception that ends it
    request_id: int | None = None  # written by the engine thread before `accepted` resolves
    prompt_tokens: int = 0
    finished: bool = False  # event-loop view: finished, aborted or rejected

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

    def __init__(self, engine: LLMEngine, max_queue: int, metrics: ServerMetrics | None = None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_queue
        self.max_model_len = engine.max_model_len
        self.metrics = metrics or ServerMetrics()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.error: str | None = None  # set by the engine thread when a step failed
        self.in_flight = 0  # event loop only
        self.handles: dict[int, RequestHandle] = {}  # engine thread only
        self.metrics.observe_engine(engine)

    @property
    def ready(self) -> bool:
        return self.thread is not None and not self.stopping and self.error is None

    def not_ready_reason(self) -> str:
        if self.error:
            return self.error
        if self.stopping:
            return "the server is shutting down"
        return "the engine is not running yet; retry in a moment"

    def start(self) -> None:
        assert self.thread is None, "the engine loop runs once"
        self.loop = asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._run, name="idlm-engine", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        """Fails what is still in flight and waits for the thread (at most one step)."""
        if self.thread is None or self.stopping:
            return
        self.stopping = True
        self.commands.put(("stop", None))
        await asyncio.to_thread(self.thread.join, STOP_TIMEOUT_S)

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        """Hands the request to the engine; raises EngineNotReady, QueueFull or RequestRejected."""
        if not self.ready:
            raise EngineNotReady(self.not_ready_reason())
        if self.in_flight >= self.capacity:
            raise QueueFull(f"the server holds its limit of {self.capacity} requests (running and waiting); "
                            f"retry later")
        handle = RequestHandle(request, self.loop.create_future())
        self.in_flight += 1
        self.commands.put(("add", handle))
        try:
            handle.prompt_tokens = await handle.accepted
        except asyncio.CancelledError:
            self.abort(handle)
            raise
        except Exception:
            self._release(handle)
            raise
        return handle

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

    # everything below runs on the engine thread

    def _run(self) -> None:
        while True:
            idle = self.error is not None or not self.engine.has_unfinished()
            for kind, handle in self._take_commands(block=idle):
                if kind == "stop":
                    self._fail_all(EngineNotReady("the server is shutting down"))
                    return
                if kind == "add":
                    self._add(handle)
                else:
                    self._abort(handle)
            if self.error is None and self.engine.has_unfinished():
                try:
                    self._step()
                except Exception as e:
                    logger.exception("engine step failed")
                    self.error = f"the engine failed ({type(e).__name__}: {e}); restart the server"
                    self._fail_all(EngineNotReady(self.error))
            self.metrics.observe_engine(self.engine)

    def _take_commands(self, block: bool) -> list[tuple[str, RequestHandle | None]]:
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
            ids, params = self._prepare(handle.request)
            handle.request_id = self.engine.add_request(ids, params)
        except (ValueError, EngineNotReady) as e:
            self.loop.call_soon_threadsafe(settle, handle.accepted, e)
            return
        self.handles[handle.request_id] = handle
        self.metrics.prompt_tokens.inc(len(ids))
        self.loop.call_soon_threadsafe(settle, handle.accepted, len(ids))

    def _prepare(self, req: GenerationRequest) -> tuple[list[int], SamplingParams]:
        engine = self.engine
        source = "messages" if req.messages is not None else "prompt"
        try:
            ids = engine.chat_prompt(req.messages) if req.messages is not None else engine.tokenize(req.prompt)
            params = engine.resolve(req.params)
        except ValueError as e:
            raise RequestRejected(str(e), param_named_in(str(e), ("mode", "stride", "proposal")) or source) from e
        room = engine.max_model_len - len(ids)
        if req.max_tokens is not None and req.max_tokens > room:
            raise RequestRejected(f"the context holds {engine.max_model_len} tokens and the prompt takes {len(ids)}, "
                                  f"so max_tokens can be at most {room}, got {req.max_tokens}; lower max_tokens or "
                                  f"shorten the {source}", "max_tokens")
        return ids, dataclasses.replace(params, max_tokens=room if req.max_tokens is None else req.max_tokens)

    def _abort(self, handle: RequestHandle) -> None:
        if self.handles.pop(handle.request_id, None) is not None:
            self.engine.abort(handle.request_id)
            self.metrics.requests.labels("aborted").inc()

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        self.metrics.observe_step(outputs, time.perf_counter() - start)
        steps = []
        for out in outputs:
            handle = self.handles.get(out.request_id)
            if handle is None:
                continue
            if out.finished:
                del self.handles[out.request_id]
            pieces = self._pieces(out) if handle.request.provenance else None
            steps.append((handle, StepOutput(out, pieces)))
        if steps:
            self.loop.call_soon_threadsafe(self._deliver, steps)

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
                logger.exception("abort failed")
            self.metrics.requests.labels("aborted").inc()
        steps = [(handle, error) for handle in self.handles.values()]
        self.handles.clear()
        if steps:
            self.loop.call_soon_threadsafe(self._deliver, steps)
