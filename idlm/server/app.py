"""The OpenAI-compatible routes, the health and metrics routes, and the playground page."""

import asyncio
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
from idlm.server.async_engine import (
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
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    Provenance,
    SamplingRequest,
    Usage,
)

logger = logging.getLogger("idlm.server")
MAX_BODY_BYTES = 4 << 20
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop_token_ids", "stop", "mode",
                   "stride_policy", "stride", "proposal", "branches")
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


def usage(out, prompt_tokens: int) -> Usage:
    stats = out.stats
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=len(out.token_ids),
                 total_tokens=prompt_tokens + len(out.token_ids), forwards=stats["forwards"],
                 tokens_per_forward=stats["tokens_per_forward"], accepted_drafts=sum(stats["drafts"]["accepted"]),
                 draft_acceptance=stats["drafts"]["acceptance"])


@dataclass
class Reply:
    """Builds the bodies answering one request: the whole response, or its stream chunks."""

    chat: bool
    model: str
    id: str
    prompt_tokens: int
    provenance: bool

    def __post_init__(self):
        self.created = int(time.time())

    def _provenance(self, out, sources: list[int], pieces: list[str] | None) -> Provenance | None:
        if not self.provenance:
            return None
        ids = out.token_ids[len(out.token_ids) - len(sources):]
        return Provenance(sources=sources, tokens=pieces, token_ids=ids, forwards=out.stats["forwards"],
                          tokens_per_forward=out.stats["tokens_per_forward"])

    def response(self, out, pieces: list[str] | None) -> BaseModel:
        head = dict(id=self.id, created=self.created, model=self.model, usage=usage(out, self.prompt_tokens),
                    idlm=self._provenance(out, out.token_sources, pieces))
        if self.chat:
            choice = ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason)
            return ChatCompletionResponse(**head, choices=[choice])
        return CompletionResponse(**head, choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)])

    def first_chunk(self) -> BaseModel | None:
        if not self.chat:
            return None
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChatChunkChoice(delta=Delta(role="assistant", content=""))])

    def chunk(self, step: StepOutput) -> BaseModel | None:
        out = step.output
        if not (out.new_text or out.finished or (self.provenance and out.new_token_sources)):
            return None
        head = dict(id=self.id, created=self.created, model=self.model,
                    idlm=self._provenance(out, out.new_token_sources, step.pieces))
        if self.chat:
            choice = ChatChunkChoice(delta=Delta(content=out.new_text or None), finish_reason=out.finish_reason)
            return ChatCompletionChunk(**head, choices=[choice])
        choice = CompletionChoice(text=out.new_text, finish_reason=out.finish_reason)
        return CompletionResponse(**head, choices=[choice])

    def usage_chunk(self, out) -> BaseModel:
        cls = ChatCompletionChunk if self.chat else CompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, choices=[],
                   usage=usage(out, self.prompt_tokens))


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

    def check(req: SamplingRequest) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        unsupported = req.unsupported()
        if unsupported:
            raise APIError(400, unsupported[1], param=unsupported[0], code="unsupported")

    def generation_request(req: SamplingRequest, max_tokens: int | None, chat: bool, **prompt) -> GenerationRequest:
        try:
            params = req.sampling_params(max_tokens, defaults)
        except ValueError as e:
            raise APIError(400, str(e), param=param_named_in(str(e), SAMPLING_FIELDS)) from e
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return GenerationRequest(request_id, params, max_tokens, provenance=req.idlm_provenance, **prompt)

    async def submit(gen: GenerationRequest) -> RequestHandle:
        try:
            return await engine.submit(gen)
        except ENGINE_ERRORS as e:
            raise engine_error(e) from e

    async def respond(request: Request, req: SamplingRequest, gen: GenerationRequest, chat: bool) -> Response:
        handle = await submit(gen)
        reply = Reply(chat, model_name, gen.id, handle.prompt_tokens, req.idlm_provenance)
        if req.stream:
            return EventStream(events(handle, reply, req.include_usage), on_close=lambda: engine.abort(handle))
        collect = asyncio.ensure_future(last_output(handle))
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait((collect, gone), return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                return Response(status_code=499)  # nobody is listening any more
            try:
                out, pieces = collect.result()
            except ENGINE_ERRORS as e:
                raise engine_error(e) from e
            return JSONResponse(reply.response(out, pieces).model_dump(mode="json"))
        finally:
            collect.cancel()
            gone.cancel()
            engine.abort(handle)

    async def last_output(handle: RequestHandle):
        pieces: list[str] | None = [] if handle.request.provenance else None
        async for step in handle.outputs():
            if pieces is not None and step.pieces is not None:
                pieces += step.pieces
        return step.output, pieces

    async def events(handle: RequestHandle, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        first = reply.first_chunk()
        if first is not None:
            yield sse(first)
        try:
            async for step in handle.outputs():
                chunk = reply.chunk(step)
                if chunk is not None:
                    yield sse(chunk)
            if include_usage:
                yield sse(reply.usage_chunk(step.output))
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

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check(req)
        max_tokens = req.max_tokens if req.max_tokens is not None else defaults.get("max_tokens",
                                                                                      COMPLETION_MAX_TOKENS)
        gen = generation_request(req, max_tokens, chat=False, prompt=req.single_prompt())
        return await respond(request, req, gen, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check(req)
        gen = generation_request(req, req.requested_max_tokens, chat=True, messages=[m.as_dict() for m in req.messages])
        return await respond(request, req, gen, chat=True)

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
