"""SelfExtend and local attention in query blocks, each a few exact partials merged by log-sum-exp.

Keys split by index distance d = shift + t - s. A block of queries (1024) first takes the grouped rest,
the keys every one of its queries sees grouped, in one call. Its sub-blocks of b <= W queries (256),
starting at key index a = shift + t0, then take, from the newest key back:
  - diagonal     [a, a + b):              neighbor, causal (the kernel's own is_causal, no mask);
  - band         [a - W + 1 + b, a):      neighbor, every query sees every key (no mask);
  - edge         [a - W + 1, a - W + 1 + b) (short of a): neighbor where d < W, a [b, b] mask;
  - grouped edge [a - W, a - W + b):      grouped rotation, causal again (no mask);
  - grouped strip, from the block's grouped rest to a - W: grouped rotation, no mask.
The CPU kernel costs about as much per pair on a [b, b] causal tile as on a full one, so each of the
three triangles wastes b²/2 pairs: small sub-blocks keep that small, large blocks keep the big calls
efficient. Masks cost O(n·b) in all; padding or a cut at the sequence start falls back to masks.
A single query (a decode step) takes its neighbor keys and its grouped rest in one call of the native
kernel, which merges them itself; in a sliding-window layer, its window's keys in one call. Memory is
O(n·(b + W)) per layer, never n×n. On a CPU whose cores another process holds, the blocks of a call, and a
block's sub-blocks, run on one single-threaded worker per core (`workers.py`), the costliest blocks first.
"""

from __future__ import annotations

import torch

from ..rotary import GroupedRotation
from . import few_native
from .layout import Geometry, grouped_key_count
from .merge import merge_states
from .partial import attend, attend_merged
from .workers import run_blocks

DEFAULT_BLOCK = 1024  # queries per block: the CPU kernel tiles queries by 256 from 768 on; tests shrink it
SUB_BLOCK = 256  # queries per sub-block, where the band's and the grouped edges' triangles are


def prepare(device: torch.device) -> None:
    """On CPU, build the native decode kernel now: the first decode step would otherwise wait for the compiler
    (about a second, once per machine) and a first run's decode speed would read that much slower."""
    if device.type == "cpu":
        few_native.available()


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


def _pieces(query, key, value, geometry, t0, window, scale, grouped=None) -> list:
    """Partials of a sub-block of at most `window` queries starting at t0 over its neighbor keys (diagonal,
    band, edge) and, given grouped = (rotated query, grouped keys, first key), its grouped keys from that
    first key on (strip, grouped edge); keys before it are the caller's."""
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
    return [p for p in parts if p is not None]


def _attend_block(
    out, query, key, value, geometry, t0, window, scale, sub, grouped=None, rest=None, starts=None,
) -> None:
    """Write the output rows of the block starting at t0 (`query` is its slice), sub-block by sub-block, each
    merging its pieces with its rows of `rest`, the block's partial over the keys all its queries see grouped.
    The sub-blocks are independent, so they go through `run_blocks` (a busy machine's workers take them: one
    block is a whole call of a prefill chunk), each as this function given its `starts`; while tracing they
    stay one loop here, adding no frame (each frame multiplies torch.compile's graph breaks).

    A block whose every pair is within the window is one sub-block: a causal diagonal and a full band,
    what plain causal attention runs."""
    if geometry.shift + t0 + query.shape[2] - 1 < window:
        sub = query.shape[2]
    if starts is None:
        starts = range(0, query.shape[2], sub)
        if len(starts) > 1 and not torch.compiler.is_compiling():
            run_blocks(_attend_block, [(out, query, key, value, geometry, t0, window, scale, sub, grouped, rest,
                                        (r0,)) for r0 in starts], query)
            return
    for r0 in starts:
        rows = slice(r0, r0 + sub)
        piece = None if grouped is None else (grouped[0][:, :, rows], grouped[1], grouped[2])
        parts = _pieces(query[:, :, rows], key, value, geometry, t0 + r0, window, scale, piece)
        if rest is not None:
            parts.append((rest[0][:, :, rows], rest[1][:, :, rows]))
        if len(parts) == 1:  # attend's output is already 0 on rows that see no key
            merged = parts[0][0].float()
        else:
            merged = merge_states([o for o, _ in parts], [lse for _, lse in parts])
        out[:, t0 + r0:t0 + r0 + merged.shape[2]] = merged.transpose(1, 2)


def _block_sizes(geometry: Geometry, n: int, window: int, block: int | None) -> tuple[int, int]:
    """Queries per block and per sub-block; when no pair reaches the window, all n queries are one block."""
    block = block or DEFAULT_BLOCK
    if geometry.shift + n - 1 < window:  # plain causal attention: one call for the diagonal, one for the rest
        block = max(n, 1)
    return block, max(1, min(block, window, SUB_BLOCK))


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, window: int, scale: float,
    block: int | None = None,
) -> torch.Tensor:
    """Causal attention limited to the last `window` keys (sliding-window layers), O(n·window). Returns [b, n, h, d]."""
    b, h, n, d = query.shape
    if n == 1 and geometry.valid is None:  # a decode step: its window's keys are one piece, no mask
        return _pieces(query, key, value, geometry, 0, window, scale)[0][0].transpose(1, 2)
    block, sub = _block_sizes(geometry, n, window, block)
    out = query.new_empty(b, n, h, d)
    run_blocks(_attend_block, [(out, query[:, :, t0:t0 + block], key, value, geometry, t0, window, scale, sub)
                               for t0 in range(0, n, block)], query)
    return out


def selfextend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, rotation: GroupedRotation,
    scale: float, key_grouped: torch.Tensor | None = None, block: int | None = None,
) -> torch.Tensor:
    """SelfExtend bi-level attention of already-rotated query [b, hq, n, d] over key/value [b, hkv, m, d].

    key_grouped: the grouped keys if kept from earlier steps (at least the first grouped_key_count ones). Given
    them, `key` is read only where some query is within W of it: keys farther back may hold anything.
    Returns [b, n, hq, d], the layout `transformers` expects from an attention function.
    """
    b, h, n, d = query.shape
    W = rotation.window_size
    block, sub = _block_sizes(geometry, n, W, block)
    n_grouped = grouped_key_count(geometry, n, key.shape[2], W)
    if not n_grouped:
        key_grouped = None
    elif key_grouped is None:
        key_grouped = rotation(key[:, :, :n_grouped], geometry.key_positions_of(0, n_grouped), "key")
    else:
        key_grouped = key_grouped[:, :, :n_grouped]
    out = query.new_empty(b, n, h, d)
    run_blocks(_selfextend_block, [(out, query, key, value, geometry, rotation, key_grouped, n_grouped, t0, block,
                                    sub, scale) for t0 in range(0, n, block)], query, growing=True)
    return out


def _selfextend_block(out, query, key, value, geometry, rotation, key_grouped, n_grouped, t0, block, sub, scale):
    """Write the output rows of the query block starting at t0: its grouped rest, then its sub-blocks."""
    n, W = query.shape[2], rotation.window_size
    t1 = min(n, t0 + block)
    # keys before it: grouped for every query of the block (an int, not bool arithmetic: dynamo's symbolic
    # shapes cannot add a bool to an int, as torch 2.11's auto-compiled static-cache generate on CUDA showed)
    rest_end = geometry.shift + t0 - W + (1 if t1 - t0 == 1 else 0)
    grouped, rest = None, None
    if min(n_grouped, rest_end + t1 - t0) > 0:
        query_grouped = rotation(query[:, :, t0:t1], geometry.query_positions[:, t0:t1], "query")
        if t1 - t0 == 1 and geometry.valid is None:  # one query (a decode step): its two key sets in one call
            merged = attend_merged((query[:, :, t0:t1], key[:, :, rest_end:rest_end + W],
                                    value[:, :, rest_end:rest_end + W]),
                                   (query_grouped, key_grouped[:, :, :rest_end], value[:, :, :rest_end]), scale)
            if merged is not None:
                out[:, t0:t1] = merged.transpose(1, 2)
                return
        grouped = (query_grouped, key_grouped, max(rest_end, 0))
        rest = _partial(query_grouped, key_grouped, value, geometry, t0, 0, rest_end, W, None, scale)
    _attend_block(out, query[:, :, t0:t1], key, value, geometry, t0, W, scale, sub, grouped, rest)
