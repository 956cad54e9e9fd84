"""The oracle: SelfExtend written straight from the formula with full n×n matrices. For tests, small inputs."""

from __future__ import annotations

import torch

from ..positions import grouped_key_position, grouped_query_position, uses_neighbor_attention
from ..rotary import GroupedRotation, rotate_by
from .layout import Geometry


def reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry,
    rotation: GroupedRotation | None, scale: float, key_grouped: torch.Tensor | None = None,
    local_window: int | None = None,
) -> torch.Tensor:
    """Eager attention: neighbor logits at RoPE positions (i, j), grouped logits at the grouped positions,
    one softmax per row. With local_window set it is plain sliding-window attention. Returns [b, n, h, d].
    Kept grouped keys (key_grouped) are ignored: the oracle rotates from scratch."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    query = query.float()
    i, j = geometry.query_positions, geometry.key_positions
    distance = (i[:, :, None] - j[:, None, :])[:, None]  # [b, 1, n, m]
    allowed = distance >= 0
    if geometry.valid is not None:
        allowed &= geometry.valid[:, None, None, :]
    logits = query @ key.transpose(-1, -2) * scale
    if local_window is not None:
        allowed &= distance < local_window
    else:
        group_size, window_size, inv_freq = rotation.group_size, rotation.window_size, rotation.inv_freq
        raw_query, raw_key = rotate_by(query, -i, inv_freq), rotate_by(key, -j, inv_freq)
        grouped_query = rotate_by(raw_query, grouped_query_position(i, group_size, window_size, rotation.offset),
                                  inv_freq)
        grouped_key = rotate_by(raw_key, grouped_key_position(j, group_size), inv_freq)
        grouped_logits = grouped_query @ grouped_key.transpose(-1, -2) * scale
        logits = torch.where(uses_neighbor_attention(distance, window_size), logits, grouped_logits)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see no key (padding) give zeros
    return (probs @ value).transpose(1, 2)
