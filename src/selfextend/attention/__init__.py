"""Attention kernels per backend behind one registry; every backend computes the same formula."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import blockwise, reference
from .layout import (Geometry, KVLayout, grouped_key_count, layout_mask, packed_sequences, resolve_geometry,
                     sequence_starts)


@dataclass(frozen=True)
class Backend:
    """selfextend(q, k, v, geometry, rotation, scale, key_grouped=None) and local(q, k, v, geometry, window,
    scale), both returning [b, n, heads, d]; `reads_cache_dtypes`: whether keys and values may be held in
    another dtype than the query (a float16 KV cache); `prepare(device)`, if any, readies what its calls on that
    device need (a kernel to build) before the first call."""

    selfextend: Callable[..., torch.Tensor]
    local: Callable[..., torch.Tensor]
    reads_cache_dtypes: bool = False
    prepare: Callable[[torch.device], None] | None = None


def _reference_local(query, key, value, geometry, window, scale):
    return reference.reference_attention(query, key, value, geometry, None, scale, local_window=window)


BACKENDS: dict[str, Backend] = {
    "blockwise": Backend(blockwise.selfextend_attention, blockwise.local_attention, reads_cache_dtypes=True,
                         prepare=blockwise.prepare),
    "reference": Backend(reference.reference_attention, _reference_local),
}


try:  # FlexAttention (torch >= 2.5): the GPU backend, also runnable (slowly, uncompiled) on CPU for tests
    from . import flex
except ImportError:  # pragma: no cover - older torch
    flex = None
else:
    BACKENDS["flex"] = Backend(flex.selfextend_attention, flex.local_attention)


def resolve_backend(name: str, device: torch.device) -> Backend:
    """'auto' picks the fastest backend for the device; any other name must be registered."""
    if name == "auto":
        name = "flex" if device.type == "cuda" and "flex" in BACKENDS else "blockwise"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "Backend", "Geometry", "KVLayout", "grouped_key_count", "layout_mask", "packed_sequences",
           "resolve_backend", "resolve_geometry", "sequence_starts"]
