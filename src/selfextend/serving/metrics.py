"""The server's Prometheus metrics, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Requests, tokens, speeds, queue depth and prefix-cache use, as `selfextend_*` series."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("selfextend_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.cancelled = Counter("selfextend_requests_cancelled", "Requests stopped because the client left",
                                 registry=r)
        self.prompt_tokens = Counter("selfextend_prompt_tokens", "Prompt tokens of the requests run", registry=r)
        self.prefill_tokens = Counter("selfextend_prefill_tokens", "Prompt tokens actually prefilled (not reused)",
                                      registry=r)
        self.generation_tokens = Counter("selfextend_generation_tokens", "Tokens generated", registry=r)
        self.prefix_hits = Counter("selfextend_prefix_cache_hits", "Requests that resumed from a kept prefix",
                                   registry=r)
        self.prefix_misses = Counter("selfextend_prefix_cache_misses", "Requests with no usable kept prefix",
                                     registry=r)
        self.reused_tokens = Counter("selfextend_prefix_cache_reused_tokens", "Prompt tokens taken from kept prefixes",
                                     registry=r)
        self.prefix_bytes = Gauge("selfextend_prefix_cache_bytes", "Memory held by kept prefixes", registry=r)
        self.prefix_entries = Gauge("selfextend_prefix_cache_entries", "Kept prefixes", registry=r)
        self.queue_depth = Gauge("selfextend_queue_depth", "Requests waiting for the model", registry=r)
        self.running = Gauge("selfextend_requests_running", "Requests the model is working on (0 or 1)", registry=r)
        self.prefill_speed = Gauge("selfextend_prefill_tokens_per_second", "Prefill speed of the last request",
                                   registry=r)
        self.decode_speed = Gauge("selfextend_decode_tokens_per_second", "Decode speed of the last request",
                                  registry=r)
        self.ttft = Histogram("selfextend_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("selfextend_request_seconds", "From arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware counting every answered request by path (unknown paths as "other") and status."""

    def __init__(self, app: ASGIApp, counter: Counter, paths: tuple[str, ...]):
        self.app, self.counter, self.paths = app, counter, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
