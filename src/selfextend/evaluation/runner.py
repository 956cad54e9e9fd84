"""Running a task over lengths × depths × samples × methods, one JSON line per result, resumable.

Every method sees the very same prompt (built once per length, depth and seed), and the model is
loaded once. A rerun with the same output folder skips the results already in its results.jsonl.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import training_length
from ..inference import CHUNK_SIZE, respond
from ..kv_cache import cache_dtype, check_cache_dtype
from ..positions import POSITION_MAPS
from ..samples import token_counter
from .methods import TRUNCATED, Method, applied
from .perplexity import bucket_means, token_nll, truncated_nll
from .tasks import TASKS, is_correct
from .texts import kjv_text

PERPLEXITY = "perplexity"
RESULTS = "results.jsonl"


@dataclass
class Evaluation:
    """What to run: a task (one of TASKS, or `perplexity`) at each length, depth and seed, for each method."""

    task: str
    lengths: list[int]
    methods: list[Method]
    model_name: str
    depths: list[float] = field(default_factory=lambda: [0.5])
    samples: int = 1
    seed: int = 0
    chunk_size: int = CHUNK_SIZE
    bucket: int | None = None  # perplexity: tokens per position bucket (default: training length / 8)
    options: dict = field(default_factory=dict)  # passed to the task generator, e.g. digits=10
    effective_length: int | None = None  # planned SelfExtend plans against this E (default: the model's profile)
    kv_cache_dtype: str = "model"  # what the KV cache stores (kv_cache.CACHE_DTYPES); not model: position maps only

    def __post_init__(self) -> None:
        if self.task not in TASKS and self.task != PERPLEXITY:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join([*TASKS, PERPLEXITY])}")
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"lengths must be at least 2 tokens, got {self.lengths}")
        if not self.methods:
            raise ValueError("give at least one method")
        if self.task != PERPLEXITY and any(m.name == TRUNCATED for m in self.methods):
            raise ValueError(f"{TRUNCATED} scores perplexity only; {self.task} needs the model to read the whole input")
        check_cache_dtype(self.kv_cache_dtype)
        plain = [m.spec for m in self.methods if m.name not in POSITION_MAPS]
        if self.kv_cache_dtype != "model" and plain:
            raise ValueError(f"a {self.kv_cache_dtype} KV cache is read by SelfExtend's attention only, and "
                             f"{', '.join(plain)} run the model's own: evaluate them with --kv-cache-dtype model")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie within [0, 1], got {self.depths}")


def _key(row: dict) -> tuple:
    return (row["task"], row["model"], row["method"], row["length"], row["depth"], row["seed"],
            row.get("kv_cache", "model"))


def load_rows(out_dir: Path) -> list[dict]:
    """The results already written to `out_dir` (a line cut off by an interruption is dropped)."""
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _drop_cut_line(path: Path) -> None:
    """Truncate a last line left without its newline by an interruption, so appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _jobs(ev: Evaluation) -> Iterator[tuple[int, float | None, int | None]]:
    if ev.task == PERPLEXITY:
        yield from ((length, None, None) for length in ev.lengths)
        return
    for length in ev.lengths:
        for depth in ev.depths:
            for seed in range(ev.seed, ev.seed + ev.samples):
                yield length, depth, seed


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ev: Evaluation, out_dir: Path,
             progress: bool = True) -> list[dict]:
    """Run what `out_dir` does not hold yet, appending each result as it comes; returns all rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_length = training_length(model)
    kv_dtype = cache_dtype(ev.kv_cache_dtype, model.dtype, model.device)
    for length in ev.lengths:  # a length no method can handle fails now, not an hour in
        for method in ev.methods:
            method.parameters(model, length, ev.effective_length)
    _drop_cut_line(out_dir / RESULTS)
    done = {_key(row) for row in load_rows(out_dir)}
    todo = [(job, m) for job in _jobs(ev) for m in ev.methods
            if (ev.task, ev.model_name, m.spec, job[0], job[1], job[2], ev.kv_cache_dtype) not in done]
    count = token_counter(tokenizer)
    document = tokenizer(kjv_text(), return_tensors="pt").input_ids if ev.task == PERPLEXITY else None
    if document is not None and document.shape[1] < max(ev.lengths):
        raise ValueError(f"the bundled text has {document.shape[1]} tokens in this tokenizer, fewer than "
                         f"{max(ev.lengths)}")
    bucket = ev.bucket or max(1, train_length // 8)
    device = model.device
    with open(out_dir / RESULTS, "a") as results, tqdm(
        total=sum(job[0] for job, _ in todo), unit="tok", desc=ev.task, file=sys.stderr, disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        built = None  # (job, sample, ids): a prompt is built once and serves every method
        for job, method in todo:
            length, depth, seed = job
            if ev.task == PERPLEXITY:
                ids, sample = document[:, :length].to(device), None
            else:
                if built is None or built[0] != job:
                    sample = TASKS[ev.task](count, length, depth, seed, **ev.options)
                    built = job, sample, tokenizer(sample.prompt, return_tensors="pt").input_ids.to(device)
                _, sample, ids = built
            bar.set_postfix_str(f"{method.spec} @ {length}", refresh=True)
            row = _run_one(model, tokenizer, ev, method, ids, sample, bucket, kv_dtype,
                           on_chunk=lambda n: bar.update(n * length / ids.shape[1]))
            row.update(task=ev.task, model=ev.model_name, length=length, depth=depth, seed=seed)
            if ev.kv_cache_dtype != "model":
                row["kv_cache"] = ev.kv_cache_dtype
            results.write(json.dumps(row) + "\n")
            results.flush()
    return load_rows(out_dir)


def _run_one(model, tokenizer, ev: Evaluation, method: Method, ids: torch.Tensor, sample, bucket: int,
             kv_dtype: torch.dtype | None, on_chunk) -> dict:
    started = time.perf_counter()
    n = ids.shape[1]
    if sample is None:
        chunk = min(ev.chunk_size, 1024)
        with applied(model, method, n, ev.effective_length) as params:
            if method.name == TRUNCATED:
                read = min(n, params["C"]) + math.ceil(max(0, n - params["C"]) / params["s"]) * params["C"]
                nll = truncated_nll(model, ids, params["C"], params["s"], chunk,
                                    on_chunk=lambda k: on_chunk(k * n / read))
            else:
                nll = token_nll(model, ids, chunk, on_chunk=on_chunk, cache_dtype=kv_dtype)
        mean = nll.mean().item()
        return {"method": method.spec, "params": params, "tokens": n, "nll": round(mean, 5),
                "ppl": round(math.exp(mean), 4), "bucket": bucket, "nll_buckets": bucket_means(nll, bucket),
                "seconds": round(time.perf_counter() - started, 2)}
    with applied(model, method, n + sample.max_new_tokens, ev.effective_length) as params:
        got = respond(model, tokenizer, ids, sample.max_new_tokens, ev.chunk_size, kv_dtype)
        on_chunk(n)
    return {"method": method.spec, "params": params, "tokens": n, "expected": list(sample.expected), "got": got,
            "correct": is_correct(sample.expected, got), "seconds": round(time.perf_counter() - started, 2)}
