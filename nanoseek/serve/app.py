"""The HTTP routes: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, plus
/health, /metrics (Prometheus) and the chat page at /.

Handlers validate everything a request sends before anything reaches the engine (a bad
request costs the batch nothing), hand their choices to the engine's worker thread and read
the outputs back (see worker.py). A client that goes away aborts its choices at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from nanoseek.infer.sampling import SamplingParams
from nanoseek.serve.metrics import Metrics, engine_snapshot
from nanoseek.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    parse_body,
    sampling_params,
)
from nanoseek.serve.responses import ChatBody, Choice, CompletionBody, TokenText, sse
from nanoseek.serve.worker import EngineWorker, Submission

log = logging.getLogger("nanoseek.serve")
STATIC = Path(__file__).parent / "static"
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


@dataclass
class ServerSettings:
    model_name: str = "nanoseek"
    api_key: str | None = None  # None: no auth
    max_n: int = 16  # choices per request (n, times the prompts of a batched completion)
    max_waiting: int = 64  # choices queued beyond the running batch; past it: 429
    max_body_bytes: int = 2 << 20
    thinking: bool | None = None  # chat default: True opens <think>, False closes it, None: model
    created: int = field(default_factory=lambda: int(time.time()))


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):  # EngineError, SamplingError: the request's values
        return APIError(400, str(e))
    log.error("request failed: %r", e)
    return APIError(500, f"internal error: {e}", type="server_error")


class CountRequests:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide disconnects)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label set

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(route, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or a 413 as soon as it is known to be over `limit` bytes."""
    too_big = APIError(
        413, f"the request body is over the limit of {limit} bytes", code="body_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def collect(request: Request, sub: Submission) -> list[Choice] | None:
    """Every choice's whole output; None if the client left first (its choices aborted)."""
    choices = [Choice() for _ in sub.jobs]

    async def consume() -> None:
        async for i, out in sub.events():
            choices[i].add(out)

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        sub.abort()
    if not work.done() or work.cancelled():
        return None
    if work.exception() is not None:  # a choice failed: an OpenAI error, not a crash
        raise _as_api_error(work.exception())
    return choices


class Routes:
    """The handlers over one engine worker: request checks (auth, model, context budget,
    room in the queue), then the choices submitted and their outputs returned whole or
    streamed. Lives on the event loop (`in_flight` is touched nowhere else)."""

    def __init__(self, engine: Any, settings: ServerSettings):
        self.tok = engine.tokenizer
        if self.tok is None:
            raise ValueError(
                "this checkpoint has no tokenizer.json; copy the training tokenizer into it"
            )
        self.engine, self.settings = engine, settings
        self.metrics = Metrics()
        self.worker = EngineWorker(engine, self.metrics)
        self.texts = TokenText(self.tok)
        self.max_len, self.vocab = engine.max_len, engine.model.config.vocab_size
        self.capacity = getattr(engine.cache, "slots", 1) + settings.max_waiting
        self.in_flight = 0  # choices submitted and not finished

    # --- request checks ----------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key; send the header Authorization: Bearer <key>",
                "authentication_error",
                code="invalid_api_key",
            )

    def check_model(self, name: str | None) -> None:
        served = self.settings.model_name
        if name is not None and name != served:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )

    def budget(self, prompt_len: int, asked: int | None, explicit: bool, param: str) -> int:
        """max_tokens for a prompt: what was asked if it fits the context, else a 400."""
        max_len = self.max_len
        room = max_len - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {prompt_len} tokens and the context holds {max_len}; "
                "shorten it (one new token needs room too)",
                param=param,
                code="context_length_exceeded",
            )
        if asked is None:
            return room
        if asked > room and explicit:
            raise APIError(
                400,
                f"max_tokens {asked} plus the prompt's {prompt_len} tokens exceed the context "
                f"length {max_len}; ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return min(asked, room)

    def check_room(self, k: int) -> None:
        most = min(self.settings.max_n, self.capacity)
        if k > most:
            raise APIError(400, f"n: at most {most} choices per request, got {k}", param="n")
        if not self.worker.alive:
            raise APIError(503, "the engine worker is not running", "server_error")
        if self.in_flight + k > self.capacity:
            raise APIError(
                429,
                f"the server is busy ({self.in_flight} choices in flight); retry shortly",
                "rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    def encode_prompt(self, p: str | list[int]) -> list[int]:
        if isinstance(p, str):
            return [self.tok.bos_id, *self.tok.encode(p)]
        if any(t < 0 or t >= self.vocab for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab})", param="prompt")
        return list(p)

    # --- submitting and answering ------------------------------------------------------
    @contextmanager
    def hold(self, k: int, prompt_tokens: int) -> Iterator[None]:
        self.in_flight += k
        self.metrics.prompt_tokens += prompt_tokens
        try:
            yield
        finally:
            self.in_flight -= k

    async def respond(
        self,
        request: Request,
        prompts: list[list[int]],
        params: list[SamplingParams],
        body: ChatBody | CompletionBody,
        stream: bool,
    ) -> Response:
        self.check_room(len(params))
        if not stream:
            with self.hold(len(params), body.prompt_tokens):
                results = await collect(request, Submission(self.worker, prompts, params))
            if results is None:
                return Response(status_code=499)  # the client left: nobody is listening
            self.metrics.completion_tokens += sum(len(c.token_ids) for c in results)
            return JSONResponse(body.whole(results))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            self.events(prompts, params, body), media_type="text/event-stream", headers=headers
        )

    async def events(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        body: ChatBody | CompletionBody,
    ) -> AsyncIterator[str]:
        """SSE: the choices are submitted when the response starts streaming (one that never
        starts leaves nothing behind) and aborted when it stops, however it stops."""
        with self.hold(len(params), body.prompt_tokens):
            sub = Submission(self.worker, prompts, params)
            try:
                for c in body.head():
                    yield sse(c)
                try:
                    async for i, out in sub.events():
                        self.metrics.completion_tokens += len(out.token_ids)
                        for c in body.chunks(i, out):
                            yield sse(c)
                    for c in body.final():
                        yield sse(c)
                except Exception as e:  # headers are sent: the error goes in the stream
                    yield sse(_as_api_error(e).body())
                yield sse("[DONE]")
            finally:
                sub.abort()

    # --- routes ------------------------------------------------------------------------
    async def chat_page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def health(self) -> JSONResponse:
        worker = self.worker
        if not worker.alive:
            why = (
                f"engine worker stopped: {worker.failed!r}"
                if worker.failed
                else "engine worker not running"
            )
            return JSONResponse({"status": "error", "message": why}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self) -> PlainTextResponse:
        worker = self.worker
        if not worker.alive:
            raise APIError(503, "the engine worker is not running", "server_error")
        snap = await asyncio.wait_for(asyncio.wrap_future(worker.call(engine_snapshot)), 60)
        return PlainTextResponse(
            self.metrics.render(snap, worker.queued()), media_type="text/plain; version=0.0.4"
        )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.settings.created,
            "owned_by": "nanoseek",
            "max_model_len": self.max_len,
        }

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, name: str) -> dict[str, Any]:
        self.check_model(name)
        return self.model_card()

    async def chat_completions(self, request: Request) -> Response:
        settings = self.settings
        req = parse_body(await read_body(request, settings.max_body_bytes), ChatRequest)
        self.check_model(req.model)
        n_top = req.n_top()
        thinking = req.thinking_mode(settings.thinking)
        messages = [m.as_template() for m in req.messages]
        ids = await asyncio.to_thread(self.tok.apply_chat_template, messages, True, thinking)
        max_tokens = self.budget(len(ids), req.max_new(), req.max_new() is not None, "messages")
        params = [sampling_params(req, max_tokens, i) for i in range(req.n)]
        mode = {True: "reasoning", False: "content", None: "auto"}[thinking]
        body = ChatBody(
            settings.model_name, self.texts, n_top, len(ids), req.include_usage, mode, req.n
        )
        return await self.respond(request, [ids] * req.n, params, body, req.stream)

    async def completions(self, request: Request) -> Response:
        settings = self.settings
        req = parse_body(await read_body(request, settings.max_body_bytes), CompletionRequest)
        self.check_model(req.model)
        n_top = req.n_top()
        prompts = await asyncio.to_thread(lambda: [self.encode_prompt(p) for p in req.prompts()])
        explicit = "max_tokens" in req.model_fields_set
        per_choice, params = [], []
        for p in prompts:
            max_tokens = self.budget(len(p), req.max_tokens, explicit, "prompt")
            for j in range(req.n):  # choice index = prompt * n + j, as OpenAI orders them
                per_choice.append(p)
                params.append(sampling_params(req, max_tokens, j))
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, not per choice
        body = CompletionBody(
            settings.model_name, self.texts, n_top, prompt_tokens, req.include_usage, len(params)
        )
        return await self.respond(request, per_choice, params, body, req.stream)


def create_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The server over an Engine. The engine must not be used by anyone else meanwhile: the
    app's worker thread owns it from startup to shutdown."""
    settings = settings or ServerSettings()
    routes = Routes(engine, settings)
    worker, metrics = routes.worker, routes.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.settings = worker, metrics, settings
    app.add_middleware(CountRequests, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return _error_response(
            APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind)
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return _error_response(_as_api_error(e))

    auth = [Depends(routes.authorize)]
    app.get("/")(routes.chat_page)
    app.get("/health")(routes.health)
    app.get("/metrics", dependencies=auth)(routes.prometheus)
    app.get("/v1/models", dependencies=auth)(routes.list_models)
    app.get("/v1/models/{name:path}", dependencies=auth)(routes.get_model)
    app.post("/v1/chat/completions", dependencies=auth)(routes.chat_completions)
    app.post("/v1/completions", dependencies=auth)(routes.completions)
    return app
