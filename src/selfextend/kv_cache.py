"""A KV cache whose full-attention layers grow in place, so a decode step writes one token instead of copying all.

`transformers`' DynamicCache concatenates on every update: at 40K tokens a decode step of the embedded Gemma
copies every global layer's keys and values (the largest part of the step; docs/results.md). `new_cache`
builds the same DynamicCache (sliding-window layers as they are) with each full-attention layer a
`GrowingLayer`: keys and values live in a buffer with room to spare (a quarter more at each growth), and
the layer's tensors are views of its first tokens. Crops, batch reordering and restored prefixes work as for
DynamicLayer: a layer whose tensors are not the start of its buffer starts a new buffer from them (as does
one filled under `torch.inference_mode` and then written outside it, once).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


def room_for(buffer: torch.Tensor | None, size: int, like: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """A buffer of at least `size` positions (dim -2) starting with `kept`: `buffer`, which must already start
    with it, if it has the room and may be written here; else a new one with room to spare (a quarter more,
    at least 256), so appending one position at a time copies O(1) per position."""
    writable = buffer is not None and (torch.is_inference_mode_enabled() or not buffer.is_inference())
    if writable and buffer.shape[-2] >= size:  # (torch refuses writes outside inference mode to one made inside)
        return buffer
    grown = like.new_empty(*like.shape[:-2], size + max(256, size // 4), like.shape[-1])
    if kept is not None:
        grown[..., :kept.shape[-2], :] = kept
    return grown


def _append(current: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor):
    """`current` followed by `new`, as a view of `buffer` (reused if `current` is its start and there is room)."""
    n = current.shape[-2] if current.numel() else 0
    size = n + new.shape[-2]
    compatible = (buffer is not None and buffer.dtype == new.dtype and buffer.device == new.device
                  and buffer.shape[:-2] == new.shape[:-2] and buffer.shape[-1] == new.shape[-1]
                  and (n == 0 or (current.data_ptr() == buffer.data_ptr() and current.stride() == buffer.stride())))
    buffer = room_for(buffer if compatible else None, size, new, current if n else None)
    buffer[..., n:size, :] = new
    return buffer[..., :size, :], buffer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into a buffer with room to spare instead of concatenating."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_buffer = _append(self.keys, self._key_buffer, key_states)
        self.values, self._value_buffer = _append(self.values, self._value_buffer, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def new_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty DynamicCache for a model of `config`, its full-attention layers growing in place."""
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = GrowingLayer()
    return cache
