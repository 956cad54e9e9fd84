"""Measuring a model's effective length E: the longest input it still retrieves from with its own attention.

Retrieval probes (the passkey template and the NIAH needle of the evaluation harness, several depths,
a different key at each) run at lengths searched from L/8: halving while the model fails, doubling
while it passes (up to L), then bisecting between the longest pass and the shortest failure down to a
resolution. A length passes when its accuracy reaches the threshold; its probes stop as soon as the
outcome is settled. E is the longest length that passed.

`compare` then runs the same probes with SelfExtend and with STRING at lengths between E and L, the
evidence by which the planner chooses between them there (choice.py).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from torch import nn
from tqdm import tqdm

from ..config import training_length
from ..inference import CHUNK_SIZE, respond
from ..integration import apply_plan, remove, settings
from ..planning import Profile, model_identity, resolve
from ..samples import token_counter
from .tasks import TASKS, is_correct

DEFAULT_TASKS = ("passkey", "niah")
DEFAULT_DEPTHS = (0.25, 0.5, 0.75)


class CalibrationError(ValueError):
    """The model cannot be calibrated: it fails its probes even at the shortest length, or bad settings."""


@dataclass(frozen=True)
class Probes:
    """What one length is probed with, and how it is judged."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    threshold: float = 0.9
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise CalibrationError(f"unknown probe task(s) {unknown or '(none)'}; choose from {', '.join(TASKS)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise CalibrationError(f"depths must be given and lie within [0, 1], got {list(self.depths)}")
        if not 0.0 < self.threshold <= 1.0:
            raise CalibrationError(f"threshold must lie in (0, 1], got {self.threshold}")

    @property
    def count(self) -> int:
        return len(self.tasks) * len(self.depths)

    @property
    def needed(self) -> int:
        """Correct probes a length needs to pass."""
        return math.ceil(self.threshold * self.count - 1e-9)


def _probe(model: nn.Module, tokenizer, probes: Probes, task: str, length: int, depth: float, index: int) -> bool:
    """One probe: the `task` sample at `length` tokens and `depth` (its key chosen by `index`), answered right?"""
    sample = TASKS[task](token_counter(tokenizer), length, depth, index)
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(model.device)
    return is_correct(sample.expected, respond(model, tokenizer, ids, sample.max_new_tokens, probes.chunk_size))


def compare_lengths(profile: Profile) -> list[int]:
    """Where `compare` probes by default: midway between E and L, and just inside L (room for the answer)."""
    length = profile.train_length
    if profile.effective_length >= length:
        return []
    return sorted({(profile.effective_length + length) // 2, length - max(1, length // 64)})


def compare(model: nn.Module, tokenizer, profile: Profile, probes: Probes = Probes(), lengths: list[int] | None = None,
            progress: bool = True) -> Profile:
    """`profile` with SelfExtend (planned against its E) and STRING (S = L/3, w = 128) run on the same probes at
    `lengths` inside the training length: the evidence the planner chooses between them by."""
    if settings(model) is not None:
        raise CalibrationError("compare applies each method itself: call selfextend.remove(model) first")
    lengths = compare_lengths(profile) if lengths is None else sorted(set(lengths))
    if not lengths:
        raise CalibrationError(f"nothing to compare: the effective length {profile.effective_length} is the "
                               f"training length {profile.train_length}")
    outside = [n for n in lengths if not profile.effective_length < n <= profile.train_length]
    if outside:
        raise CalibrationError(f"compare lengths must lie between E = {profile.effective_length} and L = "
                               f"{profile.train_length} (where the methods differ), got {outside}")
    started = time.perf_counter()
    methods: dict[str, dict[int, dict]] = {"selfextend": {}, "string": {}}
    with tqdm(total=2 * sum(lengths) * probes.count, unit="tok", desc="compare", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for length in lengths:
            for method in methods:
                planned_against = None if method == "string" else profile.effective_length
                apply_plan(model, resolve(profile.train_length, length, method=method,
                                          effective_length=planned_against))
                correct = 0
                try:
                    for index, depth in enumerate(probes.depths):
                        for task in probes.tasks:
                            bar.set_postfix_str(f"{method}: {task} @ {length}, depth {depth}", refresh=True)
                            correct += _probe(model, tokenizer, probes, task, length, depth, index)
                            bar.update(length)
                finally:
                    remove(model)
                methods[method][length] = {"correct": correct, "total": probes.count}
    probes_used = {**profile.probes, "compare": {"tasks": list(probes.tasks), "depths": list(probes.depths),
                                                "seconds": round(time.perf_counter() - started, 1)}}
    return replace(profile, methods=methods, probes=probes_used)


def calibrate(model: nn.Module, tokenizer, name: str, probes: Probes = Probes(), *, start: int | None = None,
              resolution: int | None = None, budget_minutes: float | None = None, progress: bool = True) -> Profile:
    """Search the effective length of `model` (with its own attention); returns the profile, unsaved."""
    if settings(model) is not None:
        raise CalibrationError("calibrate measures the model's own attention: call selfextend.remove(model) first")
    train_length = training_length(model)
    count = token_counter(tokenizer)
    shortest = max(count(TASKS[task](count, 1, 0.5, 0).prompt) for task in probes.tasks) + 1
    start = min(train_length, max(shortest, start or train_length // 8))
    resolution = max(1, resolution or train_length // 16)
    if shortest > train_length:
        raise CalibrationError(f"the shortest probe has {shortest} tokens, more than the training length {train_length}")
    started = time.perf_counter()
    deadline = started + budget_minutes * 60 if budget_minutes else math.inf
    accuracy: dict[int, dict] = {}
    bar = tqdm(total=start * probes.count, unit="tok", desc="calibrate", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)

    def passes(length: int) -> bool:
        correct = run = 0
        for index, depth in enumerate(probes.depths):
            for task in probes.tasks:
                bar.set_postfix_str(f"{task} @ {length}, depth {depth}", refresh=True)
                correct, run = correct + _probe(model, tokenizer, probes, task, length, depth, index), run + 1
                bar.update(length)
                if correct >= probes.needed or run - correct > probes.count - probes.needed:
                    accuracy[length] = {"correct": correct, "total": run, "passed": correct >= probes.needed}
                    return correct >= probes.needed
        raise AssertionError("unreachable: every probe run settles the outcome")

    def probe(length: int) -> bool | None:
        """Whether `length` passes; None once the budget is spent."""
        if time.perf_counter() > deadline:
            return None
        bar.total = bar.n + length * probes.count  # at most this length's probes are left before the next choice
        return passes(length)

    good, bad = None, None  # the longest length that passed, the shortest that failed
    length, stopped = start, False
    with bar:
        while True:  # halve while failing, double while passing
            outcome = probe(length)
            if outcome is None:
                stopped = True
                break
            if outcome:
                good = length
                if length >= train_length or bad is not None:
                    break
                length = min(train_length, 2 * length)
            else:
                bad = length
                if good is not None:
                    break
                if length // 2 < shortest:
                    break
                length //= 2
        while not stopped and good is not None and bad is not None and bad - good > resolution:
            middle = (good + bad) // 2
            outcome = probe(middle)
            if outcome is None:
                stopped = True
            elif outcome:
                good = middle
            else:
                bad = middle
    if good is None:
        tried = ", ".join(f"{n}: {a['correct']}/{a['total']}" for n, a in sorted(accuracy.items()))
        raise CalibrationError(
            f"the model fails its retrieval probes even at the shortest length tried ({tried or 'none, budget spent'}); "
            "no profile written: plan against the training length or give --effective-length")
    return Profile(
        identity=model_identity(model), model=name, train_length=train_length, effective_length=good,
        threshold=probes.threshold, accuracy=accuracy,
        probes={"tasks": list(probes.tasks), "depths": list(probes.depths), "seeds": "depth index",
                "chunk_size": probes.chunk_size, "start": start, "resolution": resolution,
                "budget_minutes": budget_minutes},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - started, 1), stopped_by_budget=stopped)
