"""Choosing G and W for an input length, by the authors' rule of thumb.

Keep the largest position SelfExtend produces, W + (N - W)/G, within ½–⅔ of the training length L,
with W about L/4 and a multiple of G. The smallest G that does so keeps the most positional detail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .positions import extended_limit, largest_position_used

MAX_SENSIBLE_GROUP = 64  # beyond this, grouped positions are too coarse to be useful


class InputTooLongError(ValueError):
    """No sensible group size makes the input fit."""


@dataclass(frozen=True)
class Plan:
    train_length: int
    target_length: int
    group_size: int
    window_size: int
    max_length: int
    largest_position: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def plan(train_length: int, target_length: int) -> Plan:
    """G and W for reading `target_length` tokens with a model trained on `train_length`."""
    if train_length < 8:
        raise ValueError(f"training length {train_length} is too short to plan for")
    if target_length < 1:
        raise ValueError(f"target length must be positive, got {target_length}")
    window = train_length // 4
    if target_length <= train_length:
        return Plan(train_length, target_length, 1, window, extended_limit(train_length, 1, window),
                    target_length, "fits in the training length: G = 1 is the model's own attention")
    budget = 2 * train_length // 3
    group = 2
    while group <= MAX_SENSIBLE_GROUP:
        window_multiple = max(group, window // group * group)
        if largest_position_used(target_length, group, window_multiple) <= budget:
            break
        group += 1
    else:
        most = extended_limit(train_length, MAX_SENSIBLE_GROUP, max(MAX_SENSIBLE_GROUP, window))
        raise InputTooLongError(
            f"{target_length} tokens need a group size above {MAX_SENSIBLE_GROUP} with a {train_length}-token "
            f"model; at most about {most} tokens fit with G = {MAX_SENSIBLE_GROUP}"
        )
    used = largest_position_used(target_length, group, window_multiple)
    reason = (f"smallest G keeping W + (N - W)/G = {used} within 2/3 of L = {train_length} "
              f"({used / train_length:.0%}); W ≈ L/4, a multiple of G")
    return Plan(train_length, target_length, group, window_multiple,
                extended_limit(train_length, group, window_multiple), used, reason)
