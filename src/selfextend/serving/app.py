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
from .protocol import ChatCompletionRequest, CompletionRequest, PlanInfo, Sampling, error_body, now

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


def create_app(engine: Engine, options: ServerOptions) -> FastAPI:
    """The ASGI app serving `engine`'s model under `options.model_name`."""
    tokenizer, planner, metrics = engine.tokenizer, engine.planner, engine.metrics
    vocab_size = engine.model.config.get_text_config().vocab_size
    tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share between threads

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="selfextend", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(
                ": ")).response()
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first["msg"].removeprefix("Value error, ")
        return APIError(400, f"{'.'.join(where) or 'body'}: {message}", param=".".join(where) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        type_ = "invalid_request_error" if error.status_code < 500 else "server_error"
        return APIError(error.status_code, str(error.detail), type_).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(error).__name__}", "server_error").response()

    def tokenize_chat(body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        template = options.chat_template or tokenizer.chat_template
        if template is None:
            raise APIError(400, "this model has no chat template: start the server with --chat-template FILE, "
                                "or use /v1/completions", param="messages")
        try:
            with tokenizer_lock:
                out = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)
        except Exception as error:  # the template's own checks (e.g. roles must alternate)
            raise APIError(400, f"the chat template refused these messages: {error}", param="messages") from error
        return list(out["input_ids"])

    def tokenize_prompt(body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab_size}): got {bad[:5]}", param="prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        with tokenizer_lock:
            return tokenizer(text).input_ids

    def check_model(body: Sampling) -> None:
        if body.model != options.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist: this server serves '{options.model_name}'",
                           param="model", code="model_not_found")

    def params_of(body: Sampling, ids: list[int]) -> Params:
        n = len(ids)
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
        return Params(torch.tensor([ids]), wanted, chosen, body.temperature, body.top_p, body.seed, body.stops())

    def submit(params: Params) -> Job:
        job = Job(params, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFullError as error:
            wait = engine.retry_after()
            raise APIError(429, f"the server is busy: {error}; retry in {wait} s", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)}) from error
        return job

    async def events(job: Job, request: Request) -> AsyncIterator[tuple[str, object]]:
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

    def plan_info(params: Params, result: Result | None) -> dict:
        info = PlanInfo(**params.plan.settings.to_json(), reason=params.plan.reason)
        if result is not None:
            info.cached_tokens, info.queue_seconds = result.cached_tokens, round(result.queue_seconds, 3)
            info.prefill_seconds, info.decode_seconds = round(result.prefill_seconds, 3), round(result.decode_seconds, 3)
        return info.model_dump()

    def usage(result: Result) -> dict:
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}

    def headers(params: Params) -> dict[str, str]:
        return {"x-selfextend-plan": params.plan.settings.describe()}

    async def run(body: Sampling, ids: list[int], request: Request, chat: bool):
        params = params_of(body, ids)
        job = submit(params)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}"
        created = now()
        base = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": options.model_name}
        if body.stream:
            return StreamingResponse(stream(job, params, body, request, base, chat),
                                     media_type="text/event-stream", headers=headers(params))
        parts, result = [], None
        async for kind, payload in events(job, request):
            if kind == "delta":
                parts.append(payload)
            elif kind == "done":
                result = payload
            elif kind == "error":
                raise APIError(500, f"generation failed: {payload}", "server_error")
        if result is None:  # the client left: nobody reads this
            return Response(status_code=CLIENT_CLOSED)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else
                  {"index": 0, "text": text})
        return JSONResponse({**base, "choices": [{**choice, "finish_reason": result.finish_reason, "logprobs": None}],
                             "usage": usage(result), "selfextend": plan_info(params, result)}, headers=headers(params))

    async def stream(job: Job, params: Params, body: Sampling, request: Request, base: dict,
                     chat: bool) -> AsyncIterator[str]:
        base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        ended = False
        if chat:
            yield chunk(None, role=True)
        async for kind, payload in events(job, request):
            if kind == "delta":
                yield chunk(payload)
            elif kind == "done":
                ended = True
                final = json.loads(chunk(None, payload.finish_reason)[len("data: "):])
                yield f"data: {json.dumps({**final, 'selfextend': plan_info(params, payload)})}\n\n"
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(payload)})}\n\n"
            elif kind == "error":
                ended = True
                yield f"data: {json.dumps(error_body(f'generation failed: {payload}', 'server_error'))}\n\n"
        if ended:
            yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body)
        return await run(body, await run_in_threadpool(tokenize_chat, body), request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        return await run(body, await run_in_threadpool(tokenize_prompt, body), request, chat=False)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": now(),
                                             "owned_by": "selfextend", "max_model_len": planner.limit}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": engine.waiting, "model": options.model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    app.add_middleware(BodyLimit, limit=options.max_body_bytes)  # the last added is the outermost
    app.add_middleware(ApiKey, key=options.api_key)
    app.add_middleware(CountRequests, counter=metrics.requests, paths=ENDPOINTS)
    return app

