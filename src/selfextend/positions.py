"""The SelfExtend position formula: the one place where grouped positions and limits are defined.

Query at position i, key at j <= i, group size G, neighbor window W:
neighbor attention (i - j < W) keeps RoPE positions (i, j); grouped attention (i - j >= W)
uses query position floor(i/G) + W - floor(W/G) and key position floor(j/G).
Every function works on Python ints and on integer tensors alike.
"""

from __future__ import annotations

from typing import TypeVar

import torch

IntLike = TypeVar("IntLike", int, torch.Tensor)


def grouped_query_position(position: IntLike, group_size: int, window_size: int) -> IntLike:
    """RoPE position a query at `position` takes in grouped attention."""
    return position // group_size + window_size - window_size // group_size


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
