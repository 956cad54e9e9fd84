"""SelfExtend and local attention in query blocks, each block three exact partials merged by log-sum-exp.

For a query block, keys split by index distance d = shift + t - s into
  - neighbor band, 0 <= d < W: the model's own rotation, a [block, block + W] mask;
  - grouped triangle, W <= d < W + block: grouped rotation, a [block, block] mask;
  - grouped rest, every key the whole block sees at d >= W: grouped rotation, no distance mask.
Memory is O(n·(block + W)) per layer, never n×n; work is that of causal attention plus O(n·(block + W)).
"""

from __future__ import annotations

import torch

from ..rotary import GroupedRotation
from .layout import Geometry
from .merge import merge_states
from .partial import attend

DEFAULT_BLOCK = 256  # queries per block; read at call time so tests can shrink it


def _distance_mask(geometry: Geometry, t0: int, t1: int, s0: int, s1: int, low: int, high: int | None):
    """Bool mask [b|1, 1, t1-t0, s1-s0] for low <= d (< high) and valid keys; None when it hides nothing."""
    device = geometry.query_positions.device
    distance = (geometry.shift + torch.arange(t0, t1, device=device))[:, None] - torch.arange(s0, s1, device=device)
    keep = distance >= low
    if high is not None:
        keep &= distance < high
    mask = None if bool(keep.all()) else keep[None, None]
    if geometry.valid is not None:
        valid = geometry.valid[:, None, None, s0:s1]
        mask = valid if mask is None else mask & valid
    return mask


def _band(query, key, value, geometry, t0, t1, window, scale):
    """Partial over keys at distance 0 <= d < window from queries t0..t1, with the model's rotation."""
    s0 = max(0, geometry.shift + t0 - window + 1)
    s1 = min(key.shape[2], geometry.shift + t1)
    mask = _distance_mask(geometry, t0, t1, s0, s1, 0, window)
    return attend(query[:, :, t0:t1], key[:, :, s0:s1], value[:, :, s0:s1], mask, scale)


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, window: int, scale: float,
    block: int | None = None,
) -> torch.Tensor:
    """Causal attention limited to the last `window` keys (sliding-window layers), O(n·window). Returns [b, n, h, d]."""
    b, h, n, d = query.shape
    block = block or DEFAULT_BLOCK
    out = query.new_empty(b, n, h, d)
    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        part, lse = _band(query, key, value, geometry, t0, t1, window, scale)
        out[:, t0:t1] = merge_states([part], [lse]).transpose(1, 2)
    return out


def selfextend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, rotation: GroupedRotation,
    scale: float, block: int | None = None,
) -> torch.Tensor:
    """SelfExtend bi-level attention of already-rotated query [b, hq, n, d] over key/value [b, hkv, m, d].

    Returns [b, n, hq, d], the layout `transformers` expects from an attention function.
    """
    b, h, n, d = query.shape
    block = block or DEFAULT_BLOCK
    shift, W = geometry.shift, rotation.window_size
    n_grouped = max(0, min(key.shape[2], shift + n - W))  # keys some query sees at d >= W
    key_grouped = None
    if n_grouped:
        key_grouped = rotation(key[:, :, :n_grouped], geometry.key_positions[:, :n_grouped], "key")
    out = query.new_empty(b, n, h, d)
    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        part, lse = _band(query, key, value, geometry, t0, t1, W, scale)
        outputs, lses = [part], [lse]
        grouped_end = min(n_grouped, shift + t1 - W)
        if grouped_end > 0:
            query_grouped = rotation(query[:, :, t0:t1], geometry.query_positions[:, t0:t1], "query")
            full_end = max(0, min(grouped_end, shift + t0 - W + 1))
            if full_end > 0:  # keys every query of the block sees in grouped attention
                mask = None if geometry.valid is None else geometry.valid[:, None, None, :full_end]
                part, lse = attend(query_grouped, key_grouped[:, :, :full_end], value[:, :, :full_end], mask, scale)
                outputs.append(part)
                lses.append(lse)
            if grouped_end > full_end:  # the triangle where grouped attention begins row by row
                mask = _distance_mask(geometry, t0, t1, full_end, grouped_end, W, None)
                part, lse = attend(
                    query_grouped, key_grouped[:, :, full_end:grouped_end], value[:, :, full_end:grouped_end],
                    mask, scale,
                )
                outputs.append(part)
                lses.append(lse)
        out[:, t0:t1] = merge_states(outputs, lses).transpose(1, 2)
    return out
