"""SelfExtend and local attention in query blocks, each block a few exact partials merged by log-sum-exp.

Keys split by index distance d = shift + t - s. For a block of B <= W queries starting at key index
a = shift + t0 the pieces are, from the newest key back:
  - diagonal  [a, a + B):              neighbor, causal (the kernel's own is_causal, no mask);
  - band      [a - W + 1 + B, a):      neighbor, every query sees every key (no mask);
  - edge      [a - W + 1, a - W + 1 + B) (short of a): neighbor for s > t + shift - W, a [B, B] mask;
  - grouped edge [a - W, a - W + B):   grouped rotation, causal again (no mask);
  - grouped rest [0, a - W):           grouped rotation, every query sees every key (no mask).
Masks cost O(n·B) in all, never O(n·W); padding or a cut at the sequence start falls back to masks.
Memory is O(n·(B + W)) per layer, never n×n; work is that of causal attention plus O(n·B).
"""

from __future__ import annotations

import torch

from ..rotary import GroupedRotation
from .layout import Geometry, grouped_key_count
from .merge import merge_partials
from .partial import attend

DEFAULT_BLOCK = 1024  # queries per block: the CPU kernel tiles queries by 256 from 768 on; tests shrink it
SUB_BLOCK = 256  # queries per sub-block, where the band's and the grouped edges' triangles are


def _partial(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, t0: int, s0: int, s1: int,
    low: int, high: int | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Partial of the query block starting at t0 over keys s0..s1 (clipped to the cache), pairs at low <= d < high.

    The pattern is read from the indices alone: all pairs kept (no mask), or exactly the top-left causal
    triangle (the kernel's is_causal), else a boolean mask. None when the key range is empty.
    """
    s0, s1 = max(s0, 0), min(s1, key.shape[2])
    if s1 <= s0:
        return None
    n = query.shape[2]
    first = geometry.shift + t0 - s0  # distance from the block's first query to the range's first key
    nearest, farthest = first - (s1 - s0 - 1), first + n - 1
    under_high = high is None or farthest < high
    mask, causal = None, False
    if nearest >= low and under_high:
        if geometry.valid is not None:
            mask = geometry.valid[:, None, None, s0:s1]
    elif first == low and under_high and geometry.valid is None:
        causal = True
    else:
        device = query.device
        distance = first + torch.arange(n, device=device)[:, None] - torch.arange(s1 - s0, device=device)
        mask = distance >= low
        if high is not None:
            mask &= distance < high
        mask = mask[None, None]
        if geometry.valid is not None:
            mask = mask & geometry.valid[:, None, None, s0:s1]
    return attend(query, key[:, :, s0:s1], value[:, :, s0:s1], mask, scale, causal)


def _pieces(query, key, value, geometry, t0, window, scale, grouped=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged (output, lse) of a sub-block of at most `window` queries starting at t0, over its neighbor keys
    (diagonal, band, edge) and, given grouped = (rotated query, grouped keys, first key), its grouped keys
    from that first key on (strip, grouped edge); keys before it are the caller's."""
    start, rows = geometry.shift + t0, query.shape[2]
    edge = start - window + 1
    ranges = ((start, start + rows), (edge + rows, start), (edge, min(edge + rows, start)))
    if rows == 1:  # one query (a decode step) sees its whole neighbor range: one call
        ranges = ((edge, start + 1),)
    parts = [_partial(query, key, value, geometry, t0, s0, s1, 0, window, scale) for s0, s1 in ranges]
    if grouped is not None:
        query_grouped, key_grouped, first = grouped
        for s0, s1 in ((first, edge - 1), (max(first, edge - 1), edge - 1 + rows)):  # strip (full), grouped edge
            parts.append(_partial(query_grouped, key_grouped, value, geometry, t0, s0, s1, window, None, scale))
    parts = [p for p in parts if p is not None]
    return merge_partials([o for o, _ in parts], [lse for _, lse in parts])


def _block_state(query, key, value, geometry, t0, window, scale, sub, grouped=None):
    """(output, lse) of the block's rows, sub-block by sub-block (queries t0.. of `query`, a block's slice)."""
    states = []
    for r0 in range(0, query.shape[2], sub):
        rows = slice(r0, r0 + sub)
        piece = None if grouped is None else (grouped[0][:, :, rows], grouped[1], grouped[2])
        states.append(_pieces(query[:, :, rows], key, value, geometry, t0 + r0, window, scale, piece))
    if len(states) == 1:
        return states[0]
    return torch.cat([o for o, _ in states], dim=2), torch.cat([lse for _, lse in states], dim=2)


def _sub_block(block: int, window: int) -> int:
    return max(1, min(block, window, SUB_BLOCK))


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, window: int, scale: float,
    block: int | None = None,
) -> torch.Tensor:
    """Causal attention limited to the last `window` keys (sliding-window layers), O(n·window). Returns [b, n, h, d]."""
    b, h, n, d = query.shape
    block = block or DEFAULT_BLOCK
    sub = _sub_block(block, window)
    out = query.new_empty(b, n, h, d)
    for t0 in range(0, n, block):
        state, _ = _block_state(query[:, :, t0:t0 + block], key, value, geometry, t0, window, scale, sub)
        out[:, t0:t0 + block] = state.transpose(1, 2)
    return out


def selfextend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, rotation: GroupedRotation,
    scale: float, key_grouped: torch.Tensor | None = None, block: int | None = None,
) -> torch.Tensor:
    """SelfExtend bi-level attention of already-rotated query [b, hq, n, d] over key/value [b, hkv, m, d].

    key_grouped: the grouped keys if kept from earlier steps (at least the first grouped_key_count ones).
    Returns [b, n, hq, d], the layout `transformers` expects from an attention function.
    """
    b, h, n, d = query.shape
    shift, W = geometry.shift, rotation.window_size
    block = block or DEFAULT_BLOCK
    sub = _sub_block(block, W)
    n_grouped = grouped_key_count(geometry, n, key.shape[2], W)
    if not n_grouped:
        key_grouped = None
    elif key_grouped is None:
        key_grouped = rotation(key[:, :, :n_grouped], geometry.key_positions[:, :n_grouped], "key")
    else:
        key_grouped = key_grouped[:, :, :n_grouped]
    out = query.new_empty(b, n, h, d)
    for t0 in range(0, n, block):
        t1 = min(n, t0 + block)
        rest_end = shift + t0 - W + (t1 - t0 == 1)  # keys before it: grouped for every query of the block
        grouped, rest = None, None
        if min(n_grouped, rest_end + t1 - t0) > 0:
            query_grouped = rotation(query[:, :, t0:t1], geometry.query_positions[:, t0:t1], "query")
            grouped = (query_grouped, key_grouped, max(rest_end, 0))
            rest = _partial(query_grouped, key_grouped, value, geometry, t0, 0, rest_end, W, None, scale)
        state = _block_state(query[:, :, t0:t1], key, value, geometry, t0, W, scale, sub, grouped)
        if rest is not None:
            state = merge_partials([state[0], rest[0]], [state[1], rest[1]])
        out[:, t0:t1] = state[0].transpose(1, 2)
    return out
