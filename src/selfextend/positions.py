"""The position map: the one place where grouped positions and limits are defined.

Query at position i, key at j <= i, group size G, window W, query offset c:
near pairs (i - j < W) keep RoPE positions (i, j); far pairs (i - j >= W) use query position
floor(i/G) + c and key position floor(j/G). Two presets (`POSITION_MAPS`):
- SelfExtend (Jin et al., 2024): c = W - floor(W/G), so the far pass continues the neighbor window.
- STRING (An et al., 2025) with shifted offset S and local value w: G = 1, W = S, c = w - S, so a far
  pair at distance d sits at relative position d - S + w.
Every function works on Python ints and on integer tensors alike. A new preset is one more entry in
`POSITION_MAPS` (its settings' names and what they give) plus those settings' fields in config.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

IntLike = TypeVar("IntLike", int, torch.Tensor)


def selfextend_offset(group_size: int, window_size: int) -> int:
    """SelfExtend's query offset c = W - floor(W/G): grouped distances start where the window ends."""
    return window_size - window_size // group_size


def string_offset(shifted_offset: int, local_window: int) -> int:
    """STRING's query offset c = w - S (with G = 1 and W = S): a far pair at distance d sits at d - S + w."""
    return local_window - shifted_offset


def grouped_query_position(position: IntLike, group_size: int, window_size: int, offset: int | None = None) -> IntLike:
    """RoPE position a query at `position` takes in the far pass: floor(i/G) + c (c: SelfExtend's unless given)."""
    return position // group_size + (selfextend_offset(group_size, window_size) if offset is None else offset)


def grouped_key_position(position: IntLike, group_size: int) -> IntLike:
    """RoPE position a key at `position` takes in grouped attention."""
    return position // group_size


def uses_neighbor_attention(distance: IntLike, window_size: int) -> IntLike:
    """Whether a query-key pair at `distance` = i - j >= 0 attends with ordinary RoPE."""
    return distance < window_size


def extended_limit(train_length: int, group_size: int, window_size: int) -> int:
    """Longest input whose largest grouped position stays inside the training length: (L - W)·G + W."""
    return (train_length - window_size) * group_size + window_size


def largest_position_used(length: int, group_size: int, window_size: int) -> int:
    """Largest RoPE distance a `length`-token input produces under SelfExtend: W + (N - W)/G, rounded up."""
    if length <= window_size:
        return length
    return window_size + -(-(length - window_size) // group_size)


def string_largest_position(length: int, shifted_offset: int, local_window: int) -> int:
    """Largest RoPE distance a `length`-token input produces under STRING: N - S + w once N passes S."""
    return length if length <= shifted_offset else length - shifted_offset + local_window


@dataclass(frozen=True)
class FarPass:
    """The far pass's group size G, window W and query offset c."""

    group_size: int
    window_size: int
    offset: int


@dataclass(frozen=True)
class PositionMap:
    """A preset: the names of its own settings and, from their values (in that order), its far pass, the
    longest input it reads for training length L, and the largest position an N-token input uses; with the
    words people read for each."""

    title: str
    settings: tuple[str, ...]
    symbols: tuple[str, ...]  # the settings' short names: G, W / S, w
    labels: tuple[str, ...]  # and their long ones
    far_pass: Callable[..., FarPass]
    limit: Callable[..., int]  # (L, *settings)
    largest_position: Callable[..., int]  # (N, *settings)
    limit_label: str
    largest_label: str


POSITION_MAPS: dict[str, PositionMap] = {
    "selfextend": PositionMap(
        "SelfExtend", ("group_size", "window_size"), ("G", "W"), ("group size G", "window W"),
        far_pass=lambda group, window: FarPass(group, window, selfextend_offset(group, window)),
        limit=extended_limit, largest_position=largest_position_used,
        limit_label="extended limit (L-W)·G+W", largest_label="largest position W+(N-W)/G"),
    "string": PositionMap(
        "STRING", ("shifted_offset", "local_window"), ("S", "w"), ("shifted offset S", "local window w"),
        far_pass=lambda shifted, local: FarPass(1, shifted, string_offset(shifted, local)),
        limit=lambda train_length, shifted, local: train_length, largest_position=string_largest_position,
        limit_label="limit (STRING: L)", largest_label="largest position N-S+w"),
}
