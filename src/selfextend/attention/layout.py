"""Which keys each query may see, in O(n) memory: the compact stand-in for an n×n attention mask.

`transformers` asks the mask function registered for an attention implementation to build the mask;
ours returns a `KVLayout` (offsets, the padding mask and the local window) instead of a 4D tensor,
and the kernels turn it into small per-block masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Where queries and keys sit in the cache: query t has cache index q_offset + t, key s has kv_offset + s."""

    q_offset: int
    kv_offset: int
    valid: torch.Tensor | None = None  # [batch, n_keys] bool, False for padding; None when nothing is padded
    local_window: int | None = None  # keys at index distance >= local_window are hidden (sliding-window layers)


@dataclass(frozen=True)
class Geometry:
    """Per-row RoPE positions of queries and keys, and the index shift: distance(t, s) = shift + t - s."""

    shift: int
    query_positions: torch.Tensor  # [batch, n_queries] long
    key_positions: torch.Tensor  # [batch, n_keys] long
    valid: torch.Tensor | None  # [batch, n_keys] bool or None


def layout_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs,
) -> KVLayout:
    """Mask function for `transformers`' AttentionMaskInterface: a KVLayout instead of a [b, 1, q, kv] tensor."""
    if use_vmap:
        raise NotImplementedError(
            "SelfExtend attention supports causal and sliding-window masks with padding; "
            "this model asked for a custom mask pattern (or_mask_function / and_mask_function)"
        )
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if valid.shape[-1] < kv_offset + kv_length:
            valid = torch.nn.functional.pad(valid, (0, kv_offset + kv_length - valid.shape[-1]))
        valid = valid[:, kv_offset : kv_offset + kv_length]
        if bool(valid.all()):
            valid = None
    return KVLayout(int(q_offset), int(kv_offset), valid, local_size)


def resolve_geometry(
    layout: KVLayout | None, position_ids: torch.Tensor | None, n_batch: int, n_queries: int, n_keys: int,
    device: torch.device,
) -> Geometry:
    """Positions anchored at each row's last query (always a real token under left padding), contiguous per row."""
    if layout is None:  # no mask was built: no padding, queries are the last n_queries keys
        layout = KVLayout(q_offset=n_keys - n_queries, kv_offset=0)
    shift = layout.q_offset - layout.kv_offset
    if position_ids is None:
        last = torch.full((n_batch,), layout.q_offset + n_queries - 1, device=device, dtype=torch.long)
    else:
        last = position_ids[:, -1].to(device=device, dtype=torch.long).expand(n_batch)
    query_positions = last[:, None] - (n_queries - 1 - torch.arange(n_queries, device=device))
    key_positions = last[:, None] - (shift + n_queries - 1 - torch.arange(n_keys, device=device))
    valid = None if layout.valid is None else layout.valid.to(device)
    return Geometry(shift, query_positions, key_positions, valid)
