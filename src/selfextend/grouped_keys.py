"""Grouped keys kept beside a KV cache, so a decode step rotates only its new keys, not the whole cache.

A key's grouped form depends only on the key and its position, so it can be kept like the key itself.
One `GroupedKeys` belongs to one cache layer (a `transformers` cache's `layers[i]`); the attention
module's forward pre-hook finds that layer for each call. The kept keys stay valid while the layer's
key tensor is the one seen on the last call (a crop or a restored prefix replaces it) and only
up to the first index the call writes, so an in-place static cache rewritten from index 0 starts over.
Costs one more key tensor per full-attention layer; `apply(..., keep_grouped_keys=False)` turns it off.
"""

from __future__ import annotations

import weakref

import torch

from .attention import Geometry
from .kv_cache import room_for, spare_within
from .rotary import GroupedRotation


class GroupedKeys:
    """Grouped keys of one cache layer's first `count` keys, in a buffer that grows by a quarter at a time, or
    holds `capacity` positions (the layer's) from the start."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.count = 0
        self.first_position = 0  # position of key index 0: the keys' positions are index - start
        self._seen: weakref.ref | None = None

    def holds(self, keys: torch.Tensor | None) -> bool:
        """Whether `keys` (the layer's key tensor before this call's update) is the one seen last time."""
        return self._seen is not None and keys is not None and self._seen() is keys

    def extend(self, key: torch.Tensor, geometry: Geometry, rotation: GroupedRotation, n_grouped: int) -> torch.Tensor:
        """Grouped keys of key[:, :, :n_grouped] (batch 1, positions contiguous), rotating only those not kept."""
        first_position = int(geometry.first_key_position[0, 0])
        fresh = geometry.shift  # indices from here on were (re)written by this call's update
        if self.buffer is None or self.buffer.dtype != key.dtype or self.buffer.device != key.device \
                or self.buffer.shape[:2] != key.shape[:2] or first_position != self.first_position:
            self.buffer, self.count, self.first_position = None, 0, first_position
        self.count = min(self.count, fresh)
        if n_grouped > self.count:
            kept = self.buffer[:, :, :self.count] if self.count else None
            self.buffer = room_for(self.buffer, n_grouped, key, kept, spare_within(self.capacity, n_grouped))
            new = slice(self.count, n_grouped)
            start = first_position + new.start  # an int where it can be: no positions tensor built
            positions = start if start >= 0 else geometry.key_positions_of(new.start, new.stop)
            self.buffer[:, :, new] = rotation(key[:, :, new], positions, "key")
            self.count = n_grouped
        self._seen = weakref.ref(key)
        return self.buffer[:, :, :n_grouped]


def cache_layer(past_key_values, layer_idx: int):
    """The layer object of a `transformers` cache holding this attention layer's keys, or None."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None or not isinstance(layer_idx, int) or layer_idx >= len(layers):
        return None
    return layers[layer_idx]
