"""The HTTP API: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health and /metrics.

Handlers only validate, tokenize, plan and queue; the model runs on the engine's thread, so a long
prefill never holds up /health, /metrics or /v1/models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputTooLongError
from .engine import Engine, Job, Params, QueueFullError, Result
from .guards import ApiKey, BodyLimit
from .metrics import CountRequests
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionRequest, ChatDelta, Completion,
                       CompletionChunk, CompletionRequest, Health, ModelCard, ModelList, PlanInfo, Sampling,
                       TextChoice, TextChunkChoice, Usage, error_body, now)

log = logging.getLogger("selfextend.serving")
POLL_SECONDS = 0.25  # how often a waiting handler checks that its client is still there
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer


@dataclass(frozen=True)
class ServerOptions:
    """What the server was started with, beside the model."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    max_tokens_cap: int = 4096
    default_max_tokens: int = 512
    chat_template: str | None = None


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.type, self.param, self.code), self.status, self.headers)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response()


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(
            ": ")).response()
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{'.'.join(where) or 'body'}: {message}", param=".".join(where) or None).response()


async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if error.status_code < 500 else "server_error"
    return APIError(error.status_code, str(error.detail), type_).response()


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return APIError(500, f"internal error: {type(error).__name__}", "server_error").response()


def _plan_info(params: Params, result: Result | None = None) -> PlanInfo:
    """Which settings answered, and (once done) how the request went."""
    timings = {} if result is None else {
        "cached_tokens": result.cached_tokens, "queue_seconds": round(result.queue_seconds, 3),
        "prefill_seconds": round(result.prefill_seconds, 3), "decode_seconds": round(result.decode_seconds, 3)}
    return PlanInfo(**params.plan.settings.to_json(), reason=params.plan.reason, **timings)


def _usage(result: Result) -> Usage:
    return Usage.of(result.prompt_tokens, result.completion_tokens, result.cached_tokens)


def _headers(params: Params) -> dict[str, str]:
    return {"x-selfextend-plan": params.plan.settings.describe()}


class _Handlers:
    """What the routes do: validate, tokenize, plan and queue; then answer from the job's events."""

    def __init__(self, engine: Engine, options: ServerOptions):
        self.engine, self.options = engine, options
        self.tokenizer, self.planner, self.metrics = engine.tokenizer, engine.planner, engine.metrics
        self.vocab_size = engine.model.config.get_text_config().vocab_size
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body)
        return await self._answer(body, await run_in_threadpool(self._tokenize_chat, body), request, chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body)
        return await self._answer(body, await run_in_threadpool(self._tokenize_prompt, body), request, chat=False)

    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.options.model_name, created=now(), max_model_len=self.planner.limit)])

    async def health(self) -> Health:
        return Health(waiting=self.engine.waiting, model=self.options.model_name)

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    def _tokenize_chat(self, body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        template = self.options.chat_template or self.tokenizer.chat_template
        if template is None:
            raise APIError(400, "this model has no chat template: start the server with --chat-template FILE, "
                                "or use /v1/completions", param="messages")
        try:
            with self.tokenizer_lock:
                out = self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)
        except Exception as error:  # the template's own checks (e.g. roles must alternate)
            raise APIError(400, f"the chat template refused these messages: {error}", param="messages") from error
        return list(out["input_ids"])

    def _tokenize_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size}): got {bad[:5]}",
                               param="prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        with self.tokenizer_lock:
            return self.tokenizer(text).input_ids

    def _check_model(self, body: Sampling) -> None:
        if body.model != self.options.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist: this server serves "
                                f"'{self.options.model_name}'", param="model", code="model_not_found")

    def _params(self, body: Sampling, ids: list[int]) -> Params:
        n, options, planner = len(ids), self.options, self.planner
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if body.max_tokens is not None and body.max_tokens > options.max_tokens_cap:
            raise APIError(400, f"max_tokens is {body.max_tokens}, above this server's cap of "
                                f"{options.max_tokens_cap}", param="max_tokens")
        room = planner.limit - n
        wanted = body.max_tokens or max(1, min(options.default_max_tokens, options.max_tokens_cap, room))
        try:
            chosen = planner.plan(n + wanted)
        except InputTooLongError as error:
            fits = f"at most {room - wanted} prompt tokens fit with max_tokens={wanted}" if room > wanted else \
                "the prompt alone is past the limit"
            raise APIError(400, f"this model's maximum context length with SelfExtend is {planner.limit} tokens; "
                                f"you requested {n + wanted} ({n} in the prompt, {wanted} for the completion): "
                                f"{fits}. ({error})", param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded") from error
        return Params(torch.tensor([ids]), wanted, chosen, body.temperature, body.top_p, body.seed, body.stops(),
                      body.ignore_eos)

    def _submit(self, params: Params) -> Job:
        job = Job(params, asyncio.get_running_loop())
        try:
            self.engine.submit(job)
        except QueueFullError as error:
            wait = self.engine.retry_after()
            raise APIError(429, f"the server is busy: {error}; retry in {wait} s", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)}) from error
        return job

    @staticmethod
    async def _events(job: Job, request: Request) -> AsyncIterator[tuple[str, object]]:
        """The job's events until it ends; if the client leaves first, the job is cancelled."""
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield kind, payload
                if kind != "delta":
                    return
        finally:
            job.cancelled.set()  # a no-op once the job is over; stops it if the client left

    async def _answer(self, body: Sampling, ids: list[int], request: Request, chat: bool) -> Response:
        params = self._params(body, ids)
        job = self._submit(params)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", "created": now(), "model": self.options.model_name}
        if body.stream:
            return StreamingResponse(self._stream(job, params, body, request, head, chat),
                                     media_type="text/event-stream", headers=_headers(params))
        parts, result = [], None
        async for kind, payload in self._events(job, request):
            if kind == "delta":
                parts.append(payload)
            elif kind == "done":
                result = payload
            elif kind == "error":
                raise APIError(500, f"generation failed: {payload}", "server_error")
        if result is None:  # the client left: nobody reads this
            return Response(status_code=CLIENT_CLOSED)
        text = "".join(parts)
        choice = (ChatChoice(message=AssistantMessage(content=text), finish_reason=result.finish_reason) if chat else
                  TextChoice(text=text, finish_reason=result.finish_reason))
        body_out = Completion(**head, object="chat.completion" if chat else "text_completion", choices=[choice],
                              usage=_usage(result), selfextend=_plan_info(params, result))
        return JSONResponse(body_out.model_dump(), headers=_headers(params))

    async def _stream(self, job: Job, params: Params, body: Sampling, request: Request, head: dict,
                      chat: bool) -> AsyncIterator[str]:
        def chunk(text: str | None, finish: str | None = None, role: bool = False, **extra) -> str:
            if chat:
                delta = ChatDelta(role="assistant", content="") if role else \
                    ChatDelta(content=text) if text else ChatDelta()
                choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=None)
            else:
                choice = TextChunkChoice(index=0, text=text or "", finish_reason=finish, logprobs=None)
            return CompletionChunk(**head, object="chat.completion.chunk" if chat else "text_completion",
                                   choices=[choice], **extra).event()

        ended = False
        if chat:
            yield chunk(None, role=True)
        async for kind, payload in self._events(job, request):
            if kind == "delta":
                yield chunk(payload)
            elif kind == "done":
                ended = True
                yield chunk(None, payload.finish_reason, selfextend=_plan_info(params, payload))
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield CompletionChunk(**head, object="chat.completion.chunk" if chat else "text_completion",
                                          choices=[], usage=_usage(payload)).event()
            elif kind == "error":
                ended = True
                yield f"data: {json.dumps(error_body(f'generation failed: {payload}', 'server_error'))}\n\n"
        if ended:
            yield "data: [DONE]\n\n"


def create_app(engine: Engine, options: ServerOptions) -> FastAPI:
    """The ASGI app serving `engine`'s model under `options.model_name`: route wiring around `_Handlers`."""
    handlers = _Handlers(engine, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="selfextend", lifespan=lifespan)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
    app.post("/v1/chat/completions")(handlers.chat_completions)
    app.post("/v1/completions")(handlers.completions)
    app.get("/v1/models")(handlers.models)
    app.get("/health")(handlers.health)
    app.get("/metrics")(handlers.prometheus)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)  # the last added is the outermost
    app.add_middleware(ApiKey, key=options.api_key)
    app.add_middleware(CountRequests, counter=engine.metrics.requests, paths=ENDPOINTS)
    return app
