"""HTTP API: OpenAI's `/v1/models`, `/v1/completions` and `/v1/chat/completions`, translated onto the
NATS contract (`prism.v1.infer.<node>`, see gateway.py). No inference happens here.

Text prompts and rendered chat messages are tokenized with the checkpoint's tokenizer.json (the one the
gating uses) and sent as `input_ids`, so that usage is known when a stop string cuts a generation short.
Every generation streams from the gating; a non-streaming response is the joined stream. The first
reply is awaited before the HTTP status is sent, so errors before the first token get their status
(400, 429 + Retry-After, 503, 504); a later error is one SSE `data: {"error": ...}` event, then
`data: [DONE]`.

Failure behaviour: bad input is a 400 in OpenAI's error shape and touches nothing else; a request
body over `max_body_bytes` is a 413; without the configured key, a 401. A client that goes away
(mid-stream or while waiting for a whole response), a stop string and a timeout cancel the
generation on the gating (`prism.v1.infer.<node>.cancel`), which frees its batch slot.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from nats.aio.client import Client as NatsClient
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from tokenizers import Tokenizer

from services.api.chat import ChatTemplate, TemplateError
from services.api.gateway import Gateway, Generation, Piece
from services.api.protocol import (
    SSE_DONE,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    FinishReason,
    chat_completion,
    chunk,
    completion,
    model_list,
    new_id,
    parse_body,
    piece_encoder,
    sse,
    usage,
    usage_chunk,
)
from services.api.settings import ApiSettings
from services.api.stops import StopMatcher
from shared.schemas import MAX_TOKENS_LIMIT

log = structlog.get_logger()
T = TypeVar("T")


class Relay:
    """The text of one generation, piece by piece, cut at the first stop string (which cancels the rest)."""

    def __init__(self, generation: Generation, stops: list[str]) -> None:
        self.generation = generation
        self.matcher = StopMatcher(stops)
        self.finish: FinishReason | None = None
        self._first: Any = None

    async def start(self) -> None:
        """Wait for the gating's first reply: an error reply raises ApiError before any HTTP status is sent."""
        self._first = await self.generation.next()

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it comes; tokens that arrived while the last piece was being sent travel together
        (one write instead of several when the server is busy)."""
        event, self._first = self._first or await self.generation.next(), None
        while isinstance(event, Piece):
            text = event.text
            while isinstance(event := self.generation.next_nowait(), Piece):
                text += event.text
            if text := self.matcher.push(text):
                yield text
            if self.matcher.stopped:
                self.generation.abandon()
                self.finish = "stop"
                return
            event = event or await self.generation.next()
        if tail := self.matcher.flush():
            yield tail
        self.finish = event.finish_reason


class GenerationResponse(StreamingResponse):
    """An SSE stream that cancels its generation when it ends early (client gone, server stopping)."""

    def __init__(self, content: AsyncIterator[bytes], generation: Generation) -> None:
        headers = {"Cache-Control": "no-cache", "X-Prism-Node": generation.node}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.abandon()  # nothing when it finished


class Api:
    def __init__(self, settings: ApiSettings, gateway: Gateway, tokenizer: Tokenizer | None,
                 template: ChatTemplate | None) -> None:
        self.settings = settings
        self.gateway = gateway
        self.tokenizer = tokenizer
        self.template = template
        self.model = settings.served_name()
        config = settings.model / "config.json"
        self.created = int(config.stat().st_mtime) if config.is_file() else 0

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # ---- endpoints -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """For load balancers and orchestrators, without the key: 200 while the last reading of the
        gatings' loads (every `stats_interval_s`) found one to send requests to (the configured node, if
        one is), else 503."""
        node, nodes = self.settings.node, self.gateway.loads
        if (node and node in nodes) or (not node and nodes):
            return JSONResponse({"status": "ok"})
        reason = f"node {node} did not answer" if node else "no gating answered"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(model_list(self.model, self.created))

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req: CompletionRequest = parse_body(await self._body(request), CompletionRequest)
        self._check_model(req.model)
        prompt = req.prompt_input()
        ids = self._encode(prompt) if isinstance(prompt, str) else prompt
        return await self._generate(request, req, ids, req.max_tokens or MAX_TOKENS_LIMIT, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        req: ChatCompletionRequest = parse_body(await self._body(request), ChatCompletionRequest)
        self._check_model(req.model)
        if self.template is None:
            raise ApiError(400, "invalid_request", f"model {self.model} has no chat_template; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except TemplateError as exc:
            raise ApiError(400, "invalid_request", str(exc), param="messages") from None
        return await self._generate(request, req, self._encode(text), req.token_limit(), chat=True)

    # ---- one generation ----------------------------------------------------------------------------

    async def _generate(self, request: Request, req: CompletionRequest | ChatCompletionRequest, ids: list[int],
                        max_tokens: int, *, chat: bool) -> Response:
        node = await self.gateway.pick(request.headers.get("x-prism-node"))
        rid = new_id("chatcmpl" if chat else "cmpl")
        infer: dict[str, Any] = {"input_ids": ids, "max_tokens": max_tokens, "temperature": float(req.temperature),
                                 "top_p": float(req.top_p), "id": rid}
        if req.seed is not None:
            infer["seed"] = req.seed
        generation = await self.gateway.open(node, infer)
        relay = Relay(generation, req.stops())
        await _unless_disconnected(request, relay.start(), generation)  # a queued request can be left too
        if req.stream:
            events = self._events(relay, chat, rid, len(ids), req.include_usage())
            return GenerationResponse(events, generation)
        text = await _unless_disconnected(request, _join(relay), generation)
        assert relay.finish is not None  # set once the pieces end
        use = usage(len(ids), generation.tokens)
        body = (chat_completion if chat else completion)(rid, self.model, text, relay.finish, use)
        return JSONResponse(body, headers={"X-Prism-Node": node})

    async def _events(self, relay: Relay, chat: bool, rid: str, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        extra = {"usage": None} if include_usage else {}  # as OpenAI: null in every chunk but the last
        piece = piece_encoder(chat, rid, self.model, include_usage)
        if chat:
            yield sse({**chunk(True, rid, self.model, None, None, role=True), **extra})
        try:
            async for text in relay.pieces():
                yield piece(text)
            yield sse({**chunk(chat, rid, self.model, None, relay.finish), **extra})
            if include_usage:
                yield sse(usage_chunk(chat, rid, self.model, usage(prompt_tokens, relay.generation.tokens)))
        except ApiError as err:  # the status is sent: the error travels as an event
            yield sse(err.body())
        yield SSE_DONE

    # ---- checks ----------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.settings.key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "invalid_api_key", "an API key is required: 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), key.get_secret_value().encode()):
            raise ApiError(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        """The request body, at most `max_body_bytes` (413 beyond, whether announced or streamed)."""
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def _check_model(self, name: str) -> None:
        if name != self.model:
            raise ApiError(404, "model_not_found", f"the model {name!r} does not exist; this server serves "
                           f"{self.model!r}", param="model")

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "invalid_request", f"model {self.model} has no tokenizer.json; send token ids")
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids  # as the gating encodes
        if not ids:
            raise ApiError(400, "invalid_request", "the prompt encodes to no tokens", param="prompt")
        return ids


async def _join(relay: Relay) -> str:
    return "".join([text async for text in relay.pieces()])


async def _unless_disconnected(request: Request, work: Awaitable[T], generation: Generation) -> T:
    """`await work`, unless the client goes away first: then the generation is cancelled."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        generation.abandon()
        log.info("client_disconnected", node=generation.node)
        raise ApiError(499, "client_closed_request", "the client closed the connection")
    return task.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return await _api_error(request, ApiError(exc.status_code, code, message))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("request_failed", path=request.url.path, error=repr(exc))
    return await _api_error(request, ApiError(500, "internal", "internal error; see the API server's log"))


def build(nc: NatsClient, settings: ApiSettings) -> Api:
    """Read the checkpoint's tokenizer and chat template and wire the API's parts."""
    model: Path = settings.model
    if not (model / "config.json").is_file():
        raise ValueError(f"{model} is not a checkpoint directory (no config.json)")
    # The `tokenizers` library itself, not shared.model.tokenizer: importing shared.model brings torch
    # (a second and ~200 MB for a process that never computes).
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json")) if (model / "tokenizer.json").is_file() else None
    return Api(settings, Gateway(nc, settings), tokenizer, ChatTemplate.from_dir(model))


async def main(settings: ApiSettings) -> None:
    from prometheus_client import CollectorRegistry

    from services.api.server import HttpServer
    from shared.logs import configure_logging
    from shared.metrics import ConnectionCollector
    from shared.metrics_http import serve_metrics
    from shared.runtime import connect, serve_until_stopped

    configure_logging(settings.log_level, settings.log_format, service="api")
    nc = await connect(settings, "api")
    server = HttpServer(build(nc, settings))
    # Requests, tokens and latencies are the gatings' to count (the API only translates); its own
    # /metrics has the bytes it moves over NATS, so that every service of the stack can be scraped.
    registry = CollectorRegistry()
    registry.register(ConnectionCollector("api", lambda: nc.stats))
    async with serve_metrics(registry, settings.metrics_bind, settings.metrics_port, "api"):
        await serve_until_stopped(server.start(), server.stop, nc)


def main_cli() -> None:
    from shared.runtime import run_service

    run_service(ApiSettings, main, "api")
