"""Choosing G and W for an input length, against the length the model really handles.

The planning length P is the model's measured effective length E when one is known (RULER's finding:
real models retrieve reliably only up to some E below their training length L), else L. The rule is
the authors' rule of thumb applied to P: keep the largest position SelfExtend produces, W + (N - W)/G,
within 2/3 of P, with the neighbor window W = P/4. The smallest such G keeps the most positional
detail. W need not be a multiple of G: the formula does not need it.

When no G up to MAX_GROUP meets that budget, W shrinks (down to P/16) before the budget is given up;
past that, G = MAX_GROUP with W = P/16 as long as every position stays inside L. Only an input that
even this cannot read is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..positions import extended_limit, largest_position_used

MAX_GROUP = 64  # beyond this, grouped positions are too coarse to be useful
MIN_PLANNING_LENGTH = 16  # below this there is no usable neighbor window (P/16 >= 1)
BUDGET_NUMERATOR, BUDGET_DENOMINATOR = 2, 3  # largest position within 2/3 of P (the authors' 1/2-2/3 rule)
WINDOW_DIVISOR = 4  # W = P/4
MIN_WINDOW_DIVISOR = 16  # W is never shrunk below P/16


class InputTooLongError(ValueError):
    """No sensible group size makes the input fit."""


@dataclass(frozen=True)
class Plan:
    """The chosen G and W, what they allow, and why."""

    train_length: int
    target_length: int
    group_size: int
    window_size: int
    max_length: int
    largest_position: int
    reason: str
    effective_length: int | None = None  # the E planned against; None: planned against the training length
    effective_source: str | None = None  # where E came from ("given", or the profile file)
    method: str = "selfextend"  # or "string": then window_size is STRING's S and local_window its w
    local_window: int | None = None

    @property
    def planning_length(self) -> int:
        """P: the length the plan keeps positions within (E if known, else L)."""
        return self.effective_length or self.train_length

    def as_dict(self) -> dict:
        return {**asdict(self), "planning_length": self.planning_length}


def check_effective_length(train_length: int, effective_length: int) -> int:
    """`effective_length` if it is a usable E for a model trained on `train_length`, else a clear error."""
    if isinstance(effective_length, bool) or not isinstance(effective_length, int):
        raise TypeError(f"effective length must be an integer number of tokens, got {effective_length!r}")
    if effective_length > train_length:
        raise ValueError(f"effective length {effective_length} is larger than the training length {train_length}: "
                         "a model does not handle more than it was trained on")
    if effective_length < MIN_PLANNING_LENGTH:
        raise ValueError(f"effective length {effective_length} is shorter than {MIN_PLANNING_LENGTH} tokens: too "
                         "short for any usable neighbor window")
    return effective_length


def plan_with(train_length: int, target_length: int, group_size: int, window_size: int, reason: str,
              effective_length: int | None = None, effective_source: str | None = None) -> Plan:
    """The plan of a chosen G and W (by the rule below, or given by hand), with what they allow."""
    return Plan(train_length, target_length, group_size, window_size,
                extended_limit(train_length, group_size, window_size),
                largest_position_used(target_length, group_size, window_size), reason, effective_length,
                effective_source)


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
        return plan_with(train_length, target_length, group, window, reason, effective_length, effective_source)

    window = length // WINDOW_DIVISOR
    if target_length <= length:
        return made(1, window, f"{target_length} tokens fit within the {what}: G = 1 is the model's own attention")
    budget = length * BUDGET_NUMERATOR // BUDGET_DENOMINATOR
    group = _smallest_group(target_length, window, budget)
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
