"""GPU backend: FlexAttention with block masks, two passes merged by log-sum-exp.

Neighbor pass: the model's rotation, keys at distance 0 <= d < W (a band: only O(n·W) blocks run).
Grouped pass: grouped rotation, keys at d >= W. Both skip empty blocks, handle GQA without repeating
K/V and return their log-sum-exp, so the merge is exact and no n×n matrix exists. Short query
chunks (decode) go to the blockwise backend, where a block mask would cost more than it saves.
"""

from __future__ import annotations

import collections
import functools

import torch
from torch.nn.attention import flex_attention as _flex

from ..rotary import GroupedRotation
from . import blockwise
from .layout import Geometry
from .merge import merge_states
from .partial import needs_grad

MIN_QUERIES = 128  # below this many queries (or under autograd) the blockwise backend is used
_BLOCK = 128


@functools.cache
def _compiled():
    """flex_attention compiled once per process (eager flex materialises n×n scores); CPU runs it uncompiled.

    Shapes are left to dynamo's automatic dynamic mode, and the recompile limit raised so that new
    lengths, dtypes and masks never fall back to the eager path.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_flex.flex_attention)


def _run(query, key, value, block_mask, scale):
    fn = _compiled() if query.device.type == "cuda" else _flex.flex_attention
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    if hasattr(_flex, "AuxRequest"):
        out, aux = fn(query, key, value, return_aux=_flex.AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return fn(query, key, value, return_lse=True, **kwargs)


_MASKS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_MASK_CACHE_SIZE = 8


def _block_mask(geometry: Geometry, n_queries: int, n_keys: int, low: int, high: int | None, device):
    """Block mask for low <= d (< high) with d = shift + q - kv, on valid keys.

    Every layer of a forward pass shares the geometry, so masks are cached: the key holds the padding
    tensor itself (kept alive in the entry, so its id cannot be reused while cached).
    """
    valid = geometry.valid
    key = (geometry.shift, n_queries, n_keys, low, high, str(device), None if valid is None else id(valid))
    if key in _MASKS:
        _MASKS.move_to_end(key)
        return _MASKS[key][0]
    shift = torch.tensor(geometry.shift, device=device)

    def mask_mod(b, h, q, kv):
        d = shift + q - kv
        keep = d >= low
        if high is not None:
            keep = keep & (d < high)
        if valid is not None:
            keep = keep & valid[b, kv]
        return keep

    batch = None if valid is None else valid.shape[0]
    # compiled on CUDA so the mask is built block by block, never as an n×n tensor
    mask = _flex.create_block_mask(mask_mod, batch, None, n_queries, n_keys, device=device, BLOCK_SIZE=_BLOCK,
                                   _compile=device.type == "cuda")
    _MASKS[key] = (mask, valid)
    if len(_MASKS) > _MASK_CACHE_SIZE:
        _MASKS.popitem(last=False)
    return mask


def _attend_band(query, key, value, geometry, low, high, scale):
    n, m = query.shape[2], key.shape[2]
    return _run(query, key, value, _block_mask(geometry, n, m, low, high, query.device), scale)


def selfextend_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, rotation: GroupedRotation,
    scale: float, key_grouped: torch.Tensor | None = None,
) -> torch.Tensor:
    """SelfExtend attention, [b, hq, n, d] queries over [b, hkv, m, d] keys; returns [b, n, hq, d].

    Kept grouped keys serve the blockwise path (decode steps); the block-mask path rotates all keys."""
    if query.shape[2] < MIN_QUERIES or needs_grad(query, key, value):  # flex's lse carries no gradient
        return blockwise.selfextend_attention(query, key, value, geometry, rotation, scale, key_grouped)
    W = rotation.window_size
    outputs, lses = [], []
    out, lse = _attend_band(query, key, value, geometry, 0, W, scale)
    outputs.append(out)
    lses.append(lse)
    if geometry.shift + query.shape[2] - 1 >= W:  # some query reaches grouped distance
        query_grouped = rotation(query, geometry.query_positions, "query")
        key_grouped = rotation(key, geometry.key_positions, "key")
        out, lse = _attend_band(query_grouped, key_grouped, value, geometry, W, None, scale)
        outputs.append(out)
        lses.append(lse)
    return merge_states(outputs, lses).to(query.dtype).transpose(1, 2)


def local_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry: Geometry, window: int, scale: float,
) -> torch.Tensor:
    """Sliding-window attention through a band block mask: O(n·window)."""
    if query.shape[2] < MIN_QUERIES or needs_grad(query, key, value):
        return blockwise.local_attention(query, key, value, geometry, window, scale)
    out, lse = _attend_band(query, key, value, geometry, 0, window, scale)
    return merge_states([out], [lse]).to(query.dtype).transpose(1, 2)
