"""The model worker: one thread owns the model and runs requests one at a time from a bounded queue.

Requests are not batched: a long prefill keeps the model busy, and SelfExtend's G and W are planned per
request. Each request resumes from the longest kept prefix (see prefix_cache.py), prefills the rest in
chunks (stopping after the chunk in progress when its client has gone) and then generates with the
same `prefill` and `answer` as `selfextend generate`. Results go back to the HTTP side as events on an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..config import FLAGS
from ..inference import CHUNK_SIZE, answer, pad_id, prefill, sampling
from ..integration import apply_plan, settings as applied_settings
from ..planning import Plan, Planner, planner
from .metrics import Metrics
from .prefix_cache import PrefixCache, Recorder, restore
from .text import Detokenizer

log = logging.getLogger("selfextend.serving")


class QueueFullError(Exception):
    """Every place in the queue is taken."""


class Cancelled(Exception):
    """The client went away."""


def request_planner(model: PreTrainedModel, **request) -> Planner:
    """The server's planner: like `generate`'s (method and G/W planned against the measured profile), or settings
    fixed at start; requests past fixed settings' limit are refused. `request` as `planning.planner` takes it."""
    return planner(model, names=FLAGS, why="given when the server started", refuse_past_limit=True, **request)


@dataclass
class Params:
    """What one request asks the model for."""

    ids: torch.Tensor  # (1, n) prompt ids
    max_tokens: int
    plan: Plan
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Result:
    """How a finished request went."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float


@dataclass
class Job:
    """A request in flight: its parameters and the event queue its HTTP handler reads."""

    params: Params
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload=None) -> None:
        """Hand an event ("delta", "done", "error", "cancelled") to the HTTP side, from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


class _Stream(BaseStreamer):
    """Receives tokens from `generate` and sends their text on as deltas."""

    def __init__(self, job: Job, text: Detokenizer, on_first):
        self.job, self.text, self.on_first = job, text, on_first
        self.prompt_seen, self.count = False, 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.count += 1
            if self.count == 1:
                self.on_first()
            delta = self.text.push(token)
            if delta:
                self.job.emit("delta", delta)

    def end(self) -> None:
        pass


class _Halt(StoppingCriteria):
    """Stops generation at a stop string or when the client has gone."""

    def __init__(self, job: Job, text: Detokenizer):
        self.job, self.text = job, text

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        halt = self.text.stopped or self.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Owns the model and its worker thread; `submit` queues a job or raises QueueFullError."""

    def __init__(self, model: PreTrainedModel, tokenizer, planner: Planner, metrics: Metrics, *,
                 chunk_size: int = CHUNK_SIZE, max_queue: int = 16, prefix_cache_bytes: int = 2 << 30,
                 cache_dtype: torch.dtype | None = None):
        if chunk_size < 1 or max_queue < 1:
            raise ValueError("chunk size and queue length must be positive")
        self.model, self.tokenizer, self.planner, self.metrics = model, tokenizer, planner, metrics
        self.chunk_size, self.cache_dtype = chunk_size, cache_dtype  # the KV caches' dtype (None: the model's)
        self.prefix = PrefixCache(prefix_cache_bytes)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self._seconds: list[float] = []  # durations of recent requests, for Retry-After
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="selfextend-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the request in progress within a chunk, refuse the waiting ones, end the thread."""
        if self._current is not None:
            self._current.cancelled.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", RuntimeError("the server is shutting down"))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full as error:
            raise QueueFullError(f"all {self._queue.maxsize} places in the queue are taken") from error
        self.metrics.queue_depth.set(self.waiting)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's length times a recent request's duration."""
        recent = sum(self._seconds) / len(self._seconds) if self._seconds else 1.0
        return max(1, round(recent * max(1, self.waiting)))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            self.metrics.queue_depth.set(self.waiting)
            if job is None:
                return
            if job.cancelled.is_set():
                self.metrics.cancelled.inc()
                job.emit("cancelled")
                continue
            self.metrics.running.set(1)
            self._current = job
            try:
                result = self._run(job)
            except Cancelled:
                self.metrics.cancelled.inc()
                log.info("%s cancelled: the client left", job.id)
                job.emit("cancelled")
            except Exception as error:  # noqa: BLE001 - a failed request must not stop the worker
                log.exception("%s failed", job.id)
                job.emit("error", error)
            else:
                job.emit("done", result)
            finally:
                self._current = None
                self.metrics.running.set(0)

    def _use(self, chosen: Plan) -> None:
        current = applied_settings(self.model)
        if current is None or current.key() != chosen.settings.key():
            apply_plan(self.model, chosen)

    def _run(self, job: Job) -> Result:
        started = time.perf_counter()
        cache, reused = self._prefill(job)
        return self._generate(job, cache, reused, started, time.perf_counter())

    def _prefill(self, job: Job) -> tuple[DynamicCache, int]:
        """The prompt's KV cache, resumed from the longest kept prefix; kept in turn. Also how many tokens were reused."""
        p, metrics = job.params, self.metrics
        self._use(p.plan)
        n = p.ids.shape[1]
        key = p.plan.settings.key()
        prompt = p.ids[0, :max(n - 1, 0)]
        entry, reused = self.prefix.find(key, prompt) if self.prefix.capacity_bytes else (None, 0)
        (metrics.prefix_hits if reused else metrics.prefix_misses).inc()
        metrics.reused_tokens.inc(reused)
        metrics.prompt_tokens.inc(n)
        capacity = n + p.max_tokens  # the prompt and the longest answer: the cache is allocated once
        cache = restore(entry, reused, self.model.config, capacity, self.cache_dtype) if entry is not None else None
        recorder = Recorder(key, prompt, self.chunk_size, entry, reused)
        read = [reused]

        def after_chunk(end: int, cache) -> None:
            metrics.prefill_tokens.inc(end - read[0])
            read[0] = end
            if self.prefix.capacity_bytes:
                recorder.record(end, cache)
            if job.cancelled.is_set():
                raise Cancelled

        cache = prefill(self.model, p.ids, self.chunk_size, cache=cache, on_chunk=after_chunk, capacity=capacity,
                        cache_dtype=self.cache_dtype)
        if self.prefix.capacity_bytes:
            self.prefix.add(recorder.finish(cache))
            metrics.prefix_bytes.set(self.prefix.nbytes)
            metrics.prefix_entries.set(len(self.prefix))
        return cache, reused

    def _generate(self, job: Job, cache: DynamicCache, reused: int, started: float, prefilled: float) -> Result:
        """The answer from the prefilled cache, streamed to the job as text deltas; how the request went."""
        p, metrics = job.params, self.metrics
        n = p.ids.shape[1]
        text = Detokenizer(self.tokenizer, p.stop)
        first = [None]

        def on_first() -> None:
            first[0] = time.perf_counter()
            metrics.ttft.observe(first[0] - job.arrived)

        stream = _Stream(job, text, on_first)
        if p.seed is not None:
            torch.manual_seed(p.seed)
        options = sampling(p.temperature, p.top_p) | ({"eos_token_id": None} if p.ignore_eos else {})
        new = answer(self.model, p.ids, cache, p.max_tokens, pad_id(self.tokenizer), stream, options,
                     StoppingCriteriaList([_Halt(job, text)]))
        if job.cancelled.is_set():
            raise Cancelled
        rest = text.finish()
        if rest:
            job.emit("delta", rest)
        done = time.perf_counter()
        count = stream.count
        ended_by_eos = count > 0 and int(new[count - 1]) in self._eos and not p.ignore_eos
        finish = "stop" if text.stopped or ended_by_eos or count < p.max_tokens else "length"
        metrics.generation_tokens.inc(count)
        prefill_seconds, decode_seconds = prefilled - started, done - (first[0] or prefilled)
        if n - 1 - reused > 0:
            metrics.prefill_speed.set((n - 1 - reused) / max(prefill_seconds, 1e-9))
        if count > 1:
            metrics.decode_speed.set((count - 1) / max(decode_seconds, 1e-9))
        metrics.latency.observe(done - job.arrived)
        self._seconds = (self._seconds + [done - started])[-16:]
        result = Result(finish, n, count, reused, started - job.arrived, prefill_seconds, done - prefilled)
        log.info("%s prompt=%d cached=%d %s queue=%.2fs prefill=%.2fs (%d tok) decode=%d tok in %.2fs finish=%s",
                 job.id, n, reused, p.plan.settings.describe(), result.queue_seconds, prefill_seconds, n - 1 - reused,
                 count, result.decode_seconds, finish)
        return result
