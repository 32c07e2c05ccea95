"""The OpenAI-compatible routes, the health and metrics routes, and the playground page."""

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from idlm import __version__
from idlm.engine.llm_engine import RequestOutput
from idlm.server.async_engine import (
    PIECE_CONTEXT,
    AsyncEngine,
    EngineNotReady,
    GenerationRequest,
    QueueFull,
    RequestFailed,
    RequestHandle,
    RequestRejected,
    StepOutput,
    param_named_in,
)
from idlm.server.metrics import ServerMetrics
from idlm.server.protocol import (
    COMPLETION_MAX_TOKENS,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Provenance,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    VersionResponse,
)

logger = logging.getLogger("idlm.server")
MAX_BODY_BYTES = 4 << 20
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop_token_ids", "stop", "mode",
                   "stride_policy", "stride", "proposal", "branches", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_p", "logit_bias", "logprobs")
SEED_STEP = 0x9E3779B97F4A7C15  # choice i of a seeded request draws with seed + i * this (mod 2^63)
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape of half a UTF-16 pair, or a false alarm


def error_response(error: APIError, metrics: ServerMetrics) -> JSONResponse:
    metrics.requests.labels(str(error.status)).inc()
    return JSONResponse(error.body(), status_code=error.status)


ENGINE_ERRORS = (RequestRejected, QueueFull, EngineNotReady, RequestFailed)


def engine_error(e: RequestRejected | QueueFull | EngineNotReady | RequestFailed) -> APIError:
    """The OpenAI error for an exception of the engine loop that ends a request."""
    if isinstance(e, RequestRejected):
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full")
    if isinstance(e, EngineNotReady):
        return APIError(503, str(e), code="engine_not_ready")
    return APIError(500, str(e), code="engine_error")


def lone_surrogate(data) -> tuple[list[str], str, bool] | None:
    """(path, text, is_key) of a string of parsed JSON (a key or a value) holding half a UTF-16 pair."""
    stack = [([], data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not key.isascii() and not valid_unicode(key):
                    return path, key, True
                stack.append(([*path, key], item))
        elif isinstance(value, list):
            stack.extend(([*path, str(i)], item) for i, item in enumerate(value))
        elif isinstance(value, str) and not value.isascii() and not valid_unicode(value):
            return path, value, False
    return None


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unicode_error(body: bytes) -> APIError | None:
    """400 for a body that is not UTF-8, or whose JSON holds a lone UTF-16 surrogate: no tokenizer
    takes those, and they cannot be echoed back in UTF-8 either."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return APIError(400, f"the body is not valid UTF-8 (byte {e.start}: {body[e.start:e.start + 1]!r}); "
                             f"send JSON encoded as UTF-8", code="invalid_encoding")
    if not SURROGATE_ESCAPE.search(body):
        return None
    try:
        found = lone_surrogate(json.loads(body))
    except (ValueError, RecursionError):
        return None  # malformed JSON: the route's parser answers it
    if found is None:
        return None
    path, text, is_key = found
    where = ".".join(path) or "the body"
    bad = next(c for c in text if "\ud800" <= c <= "\udfff")
    what = "a key of " + where if is_key else where
    return APIError(400, f"{what} holds a lone UTF-16 surrogate ({ascii(bad)[1:-1]}), which is not Unicode text; "
                         f"escape characters beyond U+FFFF as a pair (high \\ud800-\\udbff, then low \\udc00-\\udfff) "
                         f"or send them as UTF-8", param=path[0] if path else None, code="invalid_unicode")


class BodyGuard:
    """Answers 413 to a body over the limit, and 400 to one that is not Unicode text, before any
    handler parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ServerMetrics):
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size <= self.max_bytes:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        # the whole body is read even when over the limit: a client still sending would see a reset, not the 413
        if size > self.max_bytes:
            error = APIError(413, f"the request body has {size} bytes; the limit is {self.max_bytes}",
                             code="request_too_large")
            return await error_response(error, self.metrics)(scope, receive, send)
        body, replayed = b"".join(chunks), False
        error = unicode_error(body) if body else None
        if error is not None:
            return await error_response(error, self.metrics)(scope, receive, send)

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class APIKeyGuard:
    """401 with the OpenAI body for a /v1 request without `Authorization: Bearer <key>`; the
    health, metrics and playground routes stay open (the playground asks for the key)."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: ServerMetrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or wrong API key; send the server's --api-key as "
                                      "`Authorization: Bearer KEY` (the openai client's api_key)",
                                 code="invalid_api_key")
                return await error_response(error, self.metrics)(scope, receive, send)
        await self.app(scope, receive, send)


class LastResort:
    """A 500 with the OpenAI body, logged once, for what no handler caught (never a plain-text 500);
    a client that left is no error."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            pass
        except Exception:
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                error = APIError(500, f"the server failed to answer {scope['method']} {scope['path']}; the error is "
                                      f"logged, retry or report it", code="internal_error")
                await error_response(error, self.metrics)(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends (done, client gone, shutdown)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            await self.body_iterator.aclose()


def usage(outs: list[RequestOutput], prompt_tokens: int) -> Usage:
    """Of all choices: their tokens, forwards and draft counts added up."""
    tokens = sum(len(out.token_ids) for out in outs)
    forwards = sum(out.stats["forwards"] for out in outs)
    reached, accepted = [], []
    for out in outs:
        for mine, theirs in ((reached, out.stats["drafts"]["reached"]), (accepted, out.stats["drafts"]["accepted"])):
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, count in enumerate(theirs):
                mine[j] += count
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens,
                 forwards=forwards, tokens_per_forward=tokens / forwards if forwards else 0.0,
                 accepted_drafts=sum(accepted),
                 draft_acceptance=[a / r if r else 0.0 for a, r in zip(accepted, reached)])


@dataclass
class Reply:
    """Builds the bodies answering one request: the whole response, or its stream chunks, for
    each of its choices."""

    chat: bool
    model: str
    id: str
    prompt_tokens: int
    provenance: bool
    token_text: Callable[[int], str]  # one token's text, decoded alone
    decode: Callable[[list[int]], str]  # token ids' text as the output's text has it
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    echo: str | None = None  # completions: the prompt's text, before the first text of each choice

    def __post_init__(self):
        self.created = int(time.time())
        self.held: dict[int, list] = {}  # per choice: logprobs of tokens whose text no chunk carried yet
        self.offset: dict[int, int] = {}  # per choice: text characters sent so far (completions' text_offset)

    def _provenance(self, out, sources: list[int], pieces: list[str] | None) -> Provenance | None:
        if not self.provenance:
            return None
        ids = out.token_ids[len(out.token_ids) - len(sources):]
        return Provenance(sources=sources, tokens=pieces, token_ids=ids, forwards=out.stats["forwards"],
                          tokens_per_forward=out.stats["tokens_per_forward"])

    def _offsets(self, ids: list[int], before: list[int], offset: int) -> list[int]:
        """Where each token's text starts in the choice's text, each measured in the context of the
        tokens before it (byte-level BPE, leading spaces), as the detokenizer produces it."""
        offsets, context = [], before[-PIECE_CONTEXT:]
        for token in ids:
            offsets.append(offset)
            previous, text = self.decode(context), self.decode([*context, token])
            offset += len(text) - len(previous) if text.startswith(previous) else len(self.decode([token]))
            context = [*context, token][-PIECE_CONTEXT:]
        return offsets

    def _logprobs(self, ids: list[int], entries: list, offset: int,
                  before: list[int] = ()) -> CompletionLogprobs | ChatLogprobs | None:
        if self.logprobs is None:
            return None
        texts = [self.token_text(i) for i in ids]
        if self.chat:
            return ChatLogprobs(content=[
                TokenLogprob(token=text, logprob=lp, bytes=list(text.encode()), top_logprobs=[
                    TopLogprob(token=alt, logprob=v, bytes=list(alt.encode()))
                    for alt, v in ((self.token_text(t), v) for t, v in top)])
                for text, (lp, top) in zip(texts, entries)])
        return CompletionLogprobs(
            tokens=texts, token_logprobs=[lp for lp, _ in entries],
            text_offset=self._offsets(ids, list(before), offset),
            top_logprobs=[{**{self.token_text(t): v for t, v in top}, text: lp}
                          for text, (lp, top) in zip(texts, entries)])

    def _with_prompt(self, out: RequestOutput, part: CompletionLogprobs | None) -> CompletionLogprobs | None:
        """Echo: the prompt's tokens before the output's; the first has no logprob (None)."""
        if part is None or self.echo is None:
            return part
        ids = out.prompt_token_ids
        texts = [self.token_text(t) for t in ids]
        entries = [None, *out.prompt_logprobs]
        return CompletionLogprobs(
            tokens=texts + part.tokens,
            token_logprobs=[e and e[0] for e in entries] + part.token_logprobs,
            top_logprobs=[e and {**{self.token_text(t): v for t, v in e[1]}, text: e[0]}
                          for text, e in zip(texts, entries)] + part.top_logprobs,
            text_offset=self._offsets(ids, [], 0) + part.text_offset)

    def response(self, outs: list[RequestOutput], pieces: list[list[str] | None]) -> BaseModel:
        head = dict(id=self.id, created=self.created, model=self.model, usage=usage(outs, self.prompt_tokens),
                    idlm=self._provenance(outs[0], outs[0].token_sources, pieces[0]))
        if self.chat:
            choices = [ChatChoice(index=i, message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                                  logprobs=self._logprobs(out.token_ids, out.logprobs, 0))
                       for i, out in enumerate(outs)]
            return ChatCompletionResponse(**head, choices=choices)
        echo = self.echo or ""
        choices = [CompletionChoice(index=i, text=echo + out.text, finish_reason=out.finish_reason,
                                    logprobs=self._with_prompt(out, self._logprobs(out.token_ids, out.logprobs,
                                                                                   len(echo))))
                   for i, out in enumerate(outs)]
        return CompletionResponse(**head, choices=choices)

    def first_chunks(self, n: int) -> list[BaseModel]:
        if not self.chat:
            return []
        return [ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                    choices=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
                for i in range(n)]

    def chunk(self, step: StepOutput, index: int = 0) -> BaseModel | None:
        out = step.output
        held = self.held.setdefault(index, [])
        if self.logprobs is not None and out.new_logprobs:
            start = len(out.token_ids) - len(out.new_logprobs)
            held.extend((k, out.token_ids[k], entry) for k, entry in enumerate(out.new_logprobs, start))
        if not (out.new_text or out.finished or (self.provenance and out.new_token_sources)):
            return None
        head = dict(id=self.id, created=self.created, model=self.model,
                    idlm=self._provenance(out, out.new_token_sources, step.pieces))
        ids, entries = [t for _, t, _ in held], [e for _, _, e in held]
        before = out.token_ids[:held[0][0]] if held else []
        held.clear()
        if self.chat:
            choice = ChatChunkChoice(index=index, delta=Delta(content=out.new_text or None),
                                     finish_reason=out.finish_reason, logprobs=self._logprobs(ids, entries, 0))
            return ChatCompletionChunk(**head, choices=[choice])
        sent = self.offset.get(index, 0)  # generated characters sent before this chunk
        first = index not in self.offset
        text = self.echo + out.new_text if self.echo is not None and first else out.new_text
        self.offset[index] = sent + len(out.new_text)
        logprobs = self._logprobs(ids, entries, len(self.echo or "") + sent, before)
        choice = CompletionChoice(index=index, text=text, finish_reason=out.finish_reason,
                                  logprobs=self._with_prompt(out, logprobs) if first else logprobs)
        return CompletionResponse(**head, choices=[choice])

    def usage_chunk(self, outs: list[RequestOutput]) -> BaseModel:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, choices=[],
                   usage=usage(outs, self.prompt_tokens))


def sse(body: BaseModel | dict) -> str:
    data = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {data}\n\n"


async def client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: AsyncEngine, model_name: str, max_body_bytes: int = MAX_BODY_BYTES,
               api_key: str | None = None) -> FastAPI:
    """The app; its lifespan starts and stops the engine loop. Requests leave out the fields they
    want the model's generation config (engine.sampling_defaults) to decide."""
    metrics = engine.metrics
    defaults = engine.engine.sampling_defaults
    playground = files("idlm.server").joinpath("playground.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="idlm", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for Introspective Diffusion Language Models")
    app.add_middleware(BodyGuard, max_bytes=max_body_bytes, metrics=metrics)
    app.add_middleware(LastResort, metrics=metrics)
    if api_key is not None:
        app.add_middleware(APIKeyGuard, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e, metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ())[1:]]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
            loc = []
        elif not loc:
            message = "the body must be a JSON object"
        else:
            message = f"{'.'.join(loc)}: {first['msg']}"
            value = first.get("input")
            if isinstance(value, int | float) and not isinstance(value, bool):
                shown = repr(value)
                message += f", got {shown if len(shown) <= 40 else shown[:37] + '...'}"
        return error_response(APIError(400, message, param=loc[0] if loc else None, code=first.get("type")), metrics)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = e.detail if e.status_code != 404 else f"no route {request.method} {request.url.path}"
        return error_response(APIError(e.status_code, str(message)), metrics)

    tokenizer = engine.engine.tokenizer

    def token_text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def check(req: SamplingRequest) -> None:
        check_model(req.model)
        unsupported = req.unsupported()
        if unsupported:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")
        if (req.n or 1) > engine.capacity:
            raise APIError(400, f"n is {req.n} but this server holds at most {engine.capacity} requests at once; "
                                f"lower n", param="n")

    def generation_requests(req: SamplingRequest, max_tokens: int | None, chat: bool,
                            **prompt) -> list[GenerationRequest]:
        """One engine request per choice; a seeded request's choice i draws with its own seed."""
        try:
            params = req.sampling_params(max_tokens, defaults)
        except ValueError as e:
            raise APIError(400, str(e), param=param_named_in(str(e), SAMPLING_FIELDS)) from e
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        choices = []
        for i in range(req.n or 1):
            seed = None if params.seed is None else (params.seed + i * SEED_STEP) % 2**63
            choices.append(GenerationRequest(request_id, dataclasses.replace(params, seed=seed), max_tokens,
                                             provenance=req.idlm_provenance, **prompt))
        return choices

    async def submit(gens: list[GenerationRequest]) -> list[RequestHandle]:
        handles = []
        try:
            for gen in gens:
                handles.append(await engine.submit(gen))
        except ENGINE_ERRORS as e:
            for handle in handles:
                engine.abort(handle)
            raise engine_error(e) from e
        except BaseException:
            for handle in handles:
                engine.abort(handle)
            raise
        return handles

    async def respond(request: Request, req: SamplingRequest, gens: list[GenerationRequest], chat: bool,
                      echo: str | None = None) -> Response:
        handles = await submit(gens)
        reply = Reply(chat, model_name, gens[0].id, handles[0].prompt_tokens, req.idlm_provenance, token_text,
                      decode, logprobs=req.num_logprobs, echo=echo)

        def abort_all() -> None:
            for handle in handles:
                engine.abort(handle)

        if req.stream:
            return EventStream(events(handles, reply, req.include_usage), on_close=abort_all)
        collect = [asyncio.ensure_future(last_output(handle)) for handle in handles]
        gone = asyncio.ensure_future(client_gone(request))
        try:
            waiting = set(collect)
            while waiting:
                done, _ = await asyncio.wait(waiting | {gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    return Response(status_code=499)  # nobody is listening any more
                waiting -= done
                failed = next((e for e in [task.exception() for task in done] if e is not None), None)
                if isinstance(failed, ENGINE_ERRORS):
                    raise engine_error(failed) from failed
                if failed is not None:
                    raise failed
            results = [task.result() for task in collect]
            body = reply.response([out for out, _ in results], [pieces for _, pieces in results])
            return JSONResponse(body.model_dump(mode="json"))
        finally:
            for task in [*collect, gone]:
                task.cancel()
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: one failed choice already answers for the others
            abort_all()

    async def last_output(handle: RequestHandle):
        pieces: list[str] | None = [] if handle.request.provenance else None
        async for step in handle.outputs():
            if pieces is not None and step.pieces is not None:
                pieces += step.pieces
        return step.output, pieces

    async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StepOutput]]:
        """The steps of every choice, as they come."""
        if len(handles) == 1:
            async for step in handles[0].outputs():
                yield 0, step
            return
        steps: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle) -> None:
            try:
                async for step in handle.outputs():
                    await steps.put((i, step))
            except Exception as e:
                await steps.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        try:
            unfinished = len(handles)
            while unfinished:
                i, step = await steps.get()
                if isinstance(step, Exception):
                    raise step
                unfinished -= step.output.finished
                yield i, step
        finally:
            for task in tasks:
                task.cancel()

    async def events(handles: list[RequestHandle], reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        for first in reply.first_chunks(len(handles)):
            yield sse(first)
        last = {}
        try:
            async for i, step in merged(handles):
                last[i] = step.output
                chunk = reply.chunk(step, i)
                if chunk is not None:
                    yield sse(chunk)
            if include_usage:
                yield sse(reply.usage_chunk([last[i] for i in sorted(last)]))
        except ENGINE_ERRORS as e:
            yield stream_error(engine_error(e))
        except Exception:
            logger.exception("request %s: streaming its answer failed", reply.id)
            yield stream_error(APIError(500, f"the server failed while streaming request {reply.id}; the error is "
                                             f"logged, retry or report it", code="internal_error"))
        yield "data: [DONE]\n\n"

    def stream_error(error: APIError) -> str:
        metrics.requests.labels(str(error.status)).inc()
        return sse(error.body())

    def echoed(prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        if tokenizer is None:
            raise APIError(400, "echo of a token-id prompt needs a tokenizer, and this model has none", param="echo")
        return tokenizer.decode(prompt)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check(req)
        max_tokens = req.max_tokens if req.max_tokens is not None else defaults.get("max_tokens",
                                                                                      COMPLETION_MAX_TOKENS)
        prompt = req.single_prompt()
        gens = generation_requests(req, max_tokens, chat=False, prompt=prompt)
        return await respond(request, req, gens, chat=False, echo=echoed(prompt) if req.echo else None)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check(req)
        gens = generation_requests(req, req.requested_max_tokens, chat=True,
                                   messages=[m.as_dict() for m in req.messages])
        return await respond(request, req, gens, chat=True)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        messages = None if req.messages is None else [m.as_dict() for m in req.messages]
        try:
            ids = await engine.tokenize(req.prompt, messages, req.add_special_tokens, req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages" if messages is not None else "prompt") from e
        strs = [token_text(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        check_model(req.model)
        try:
            return DetokenizeResponse(prompt=await engine.detokenize(req.tokens))
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from e

    @app.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__, deterministic=engine.engine.config.deterministic)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        card = ModelCard(id=model_name, created=int(time.time()), max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> dict[str, str]:
        if not engine.ready:
            raise APIError(503, engine.not_ready_reason(), code="engine_not_ready")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    return app
