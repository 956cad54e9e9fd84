"""Choosing G and W for an input length, against the length the model really handles.

The planning length P is the model's measured effective length E when one is known (RULER's finding:
real models retrieve reliably only up to some E below their training length L), else L. The rule is
the authors' rule of thumb applied to P: keep the largest position SelfExtend produces, W + (N - W)/G,
within 2/3 of P, with the neighbor window W = P/4. The smallest such G keeps the most positional
detail. W need not be a multiple of G: the formula does not need it.

Groups coarser than FINE_GROUP lose the order of the words they merge: on SmolLM2 at 32K, planned
against E = 2048, G = 38 found 1 of 3 niah needles, where G = 20 found 3 of 3 and G = 8 (W = 2048) 6 of 6
(docs/results.md). So when planning against E needs a coarser group, the plan is made against L instead,
whose budget allows finer groups; on Gemma at 40K, where E needs only G = 7, planning against L had lost
the passkey, so E stays the rule wherever its groups are fine.

When no G up to MAX_GROUP meets the budget, W shrinks (down to P/16) before the budget is given up; past
that, G = MAX_GROUP with W = P/16 as long as every position stays inside L. Only an input that even this
cannot read is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import MIN_PLANNING_LENGTH, SelfExtendConfig, check_effective_length
from ..errors import InputTooLongError
from ..positions import extended_limit, largest_position_used

MAX_GROUP = 64  # beyond this, grouped positions are too coarse to be useful
FINE_GROUP = 20  # coarser groups lose word order (niah on SmolLM2 at 32K: G = 38 lost needles, G <= 20 kept them)
BUDGET_NUMERATOR, BUDGET_DENOMINATOR = 2, 3  # largest position within 2/3 of P (the authors' 1/2-2/3 rule)
WINDOW_DIVISOR = 4  # W = P/4
MIN_WINDOW_DIVISOR = 16  # W is never shrunk below P/16


@dataclass(frozen=True)
class Plan:
    """Settings chosen for an input of `target_length` tokens (None: given without a length), and why."""

    settings: SelfExtendConfig
    target_length: int | None
    reason: str
    against_training_length: bool = False  # E is known, but the plan was made against L (finer groups)

    train_length = property(lambda self: self.settings.train_length)
    method = property(lambda self: self.settings.method)
    group_size = property(lambda self: self.settings.group_size)
    window_size = property(lambda self: self.settings.window_size)
    local_window = property(lambda self: self.settings.local_window)
    effective_length = property(lambda self: self.settings.effective_length)
    effective_source = property(lambda self: self.settings.effective_source)
    max_length = property(lambda self: self.settings.max_length)

    @property
    def largest_position(self) -> int | None:
        """The largest RoPE position the target length uses under these settings."""
        return None if self.target_length is None else self.settings.largest_position(self.target_length)

    @property
    def planning_length(self) -> int:
        """P: the length the plan keeps positions within (E if known and used, else L)."""
        return self.train_length if self.against_training_length else self.effective_length or self.train_length

    @property
    def fits(self) -> bool:
        """Whether the target length is within the settings' limit."""
        return self.target_length is None or self.target_length <= self.max_length

    def as_dict(self) -> dict:
        """The plan for JSON (`selfextend plan --json`)."""
        return {"train_length": self.train_length, "target_length": self.target_length,
                "group_size": self.group_size, "window_size": self.window_size, "max_length": self.max_length,
                "largest_position": self.largest_position, "reason": self.reason,
                "effective_length": self.effective_length, "effective_source": self.effective_source,
                "method": self.method, "local_window": self.local_window, "planning_length": self.planning_length}

    def describe(self) -> list[tuple[str, object]]:
        """The plan as labelled rows for people (`selfextend plan`); the reason goes beside them."""
        preset = self.settings.position_map
        return [("training length L", self.train_length), ("effective length E", self.effective_length or "not known"),
                ("target length N", self.target_length), ("method", preset.title),
                *zip(preset.labels, self.settings.own_settings.values()), (preset.limit_label, self.max_length),
                (preset.largest_label, self.largest_position)]


def longest_input(train_length: int, effective_length: int | None = None) -> int:
    """The most tokens `plan` accepts: G = MAX_GROUP with W = P/16, every position inside L."""
    length = effective_length or train_length
    return extended_limit(train_length, MAX_GROUP, max(1, length // MIN_WINDOW_DIVISOR))


def _smallest_group(length: int, window: int, budget: int) -> int:
    """Smallest G with W + ceil((N - W)/G) <= budget (budget > W, N > budget)."""
    return -(-(length - window) // (budget - window))


def plan(train_length: int, target_length: int, effective_length: int | None = None,
         effective_source: str | None = None) -> Plan:
    """G and W for reading `target_length` tokens with a model trained on `train_length` tokens.

    With `effective_length` E (measured by `selfextend calibrate`, or known), the plan keeps positions
    where the model really works; without it, it plans against the training length.
    """
    if train_length < MIN_PLANNING_LENGTH:
        raise ValueError(f"training length {train_length} is too short to plan for")
    if target_length < 1:
        raise ValueError(f"target length must be positive, got {target_length}")
    if effective_length is not None:
        check_effective_length(train_length, effective_length)
    length = effective_length or train_length
    what = (f"effective length E = {length}" + (f" ({effective_source})" if effective_source else "")
            if effective_length else f"training length L = {length}")

    def made(group: int, window: int, reason: str) -> Plan:
        settings = SelfExtendConfig("selfextend", train_length, group, window, effective_length=effective_length,
                                    effective_source=effective_source)
        return Plan(settings, target_length, reason)

    window = length // WINDOW_DIVISOR
    if target_length <= length:
        return made(1, window, f"{target_length} tokens fit within the {what}: G = 1 is the model's own attention")
    budget = length * BUDGET_NUMERATOR // BUDGET_DENOMINATOR
    group = _smallest_group(target_length, window, budget)
    if group > FINE_GROUP and effective_length is not None and effective_length < train_length:
        by_training = plan(train_length, target_length)
        settings = replace(by_training.settings, effective_length=effective_length, effective_source=effective_source)
        return Plan(settings, target_length, f"against the {what} it would take G = {group}, and groups coarser than "
                                             f"{FINE_GROUP} lose word order, so planned against the training length: "
                                             f"{by_training.reason}", against_training_length=True)
    if group <= MAX_GROUP:
        used = largest_position_used(target_length, group, window)
        return made(group, window, f"smallest G keeping the largest position W + (N - W)/G = {used} within 2/3 of "
                                   f"the {what} ({used / length:.0%}); W = {window} is a quarter of it")
    smallest_window = max(1, length // MIN_WINDOW_DIVISOR)
    shrunk = (MAX_GROUP * budget - target_length) // (MAX_GROUP - 1)  # largest W for which G = MAX_GROUP fits
    if shrunk >= smallest_window:
        group = _smallest_group(target_length, shrunk, budget)
        used = largest_position_used(target_length, group, shrunk)
        return made(group, shrunk, f"W shrunk from {window} to {shrunk} so that G = {group} <= {MAX_GROUP} keeps the "
                                   f"largest position {used} within 2/3 of the {what} ({used / length:.0%})")
    if extended_limit(train_length, MAX_GROUP, smallest_window) >= target_length:
        used = largest_position_used(target_length, MAX_GROUP, smallest_window)
        return made(MAX_GROUP, smallest_window,
                    f"no G <= {MAX_GROUP} keeps positions within 2/3 of the {what}; the coarsest plan, G = {MAX_GROUP} "
                    f"with W = {smallest_window}, keeps them within the training length (largest {used}, "
                    f"{used / length:.0%} of {length}): expect weaker retrieval")
    most = longest_input(train_length, effective_length)
    raise InputTooLongError(
        f"{target_length} tokens need a group size above {MAX_GROUP} with a {train_length}-token model (planned "
        f"against the {what}); at most about {most} tokens fit with G = {MAX_GROUP}, W = {smallest_window}"
    )
