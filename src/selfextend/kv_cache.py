"""A KV cache whose layers grow in place, so a decode step writes one token instead of copying all.

`transformers`' DynamicCache concatenates on every update: at 40K tokens a decode step of the embedded Gemma
copies every global layer's keys and values (the largest part of the step; docs/results.md), and every
sliding-window layer copies its window (15 of Gemma's 18 layers, 512 tokens each). `new_cache` builds the same
DynamicCache with each full-attention layer a `GrowingLayer` and each sliding-window layer a `SlidingLayer`:
keys and values live in a buffer with room to spare (a quarter more, at least 256 positions), and the layer's
tensors are views of a run of its positions, new tokens written right after them. A sliding layer moves its
window to a new buffer once its room is used up: one copy of the window per 256 steps instead of one per step.
Crops, batch reordering and restored prefixes work as for DynamicLayer: a layer whose tensors are not a run of
its buffer starts a new buffer from them (as does one filled under `torch.inference_mode` and then written
outside it, once), so a tensor someone else holds is never written into past what the layer itself held.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def _writable(buffer: torch.Tensor) -> bool:
    """Whether `buffer` may be written here: torch refuses writes outside inference mode to one made inside it."""
    return torch.is_inference_mode_enabled() or not buffer.is_inference()


def room_for(buffer: torch.Tensor | None, size: int, like: torch.Tensor, kept: torch.Tensor | None,
             spare: int | None = None) -> torch.Tensor:
    """A buffer of at least `size` positions (dim -2) starting with `kept`: `buffer`, which must already start
    with it, if it has the room and may be written here; else a new one with `spare` positions to spare (by
    default a quarter more, at least 256), so appending one position at a time copies O(1) per position."""
    if buffer is not None and _writable(buffer) and buffer.shape[-2] >= size:
        return buffer
    spare = max(256, size // 4) if spare is None else spare
    grown = like.new_empty(*like.shape[:-2], size + spare, like.shape[-1])
    if kept is not None:
        grown[..., :kept.shape[-2], :] = kept
    return grown


def spare_within(capacity: int | None, size: int) -> int | None:
    """Room to spare that makes a new buffer of `size` positions exactly `capacity` long; None (the default
    growth) without a capacity or past it."""
    return capacity - size if capacity is not None and size <= capacity else None


def _start_in(buffer: torch.Tensor | None, current: torch.Tensor, new: torch.Tensor) -> int | None:
    """The position in `buffer` where `current` (a run of its positions, or empty) starts; None if it is not one,
    or `buffer` cannot take `new` after it."""
    if buffer is None or buffer.dtype != new.dtype or buffer.device != new.device \
            or buffer.shape[:-2] != new.shape[:-2] or buffer.shape[-1] != new.shape[-1]:
        return None
    if not current.numel():
        return 0
    row = buffer.stride(-2) * buffer.element_size()
    start, rest = divmod(current.data_ptr() - buffer.data_ptr(), row)
    if current.stride() != buffer.stride() or current.shape[:-2] != buffer.shape[:-2] or rest \
            or not 0 <= start <= buffer.shape[-2] - current.shape[-2]:
        return None
    return start


def _append(current: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor, spare: int | None = None):
    """`current` followed by `new`, as a view of `buffer`: written right after `current` if it is a run of the
    buffer's positions with room after it, else into a new buffer (`spare` positions to spare, as `room_for`)
    that starts with a copy of `current`."""
    n = current.shape[-2] if current.numel() else 0
    start = _start_in(buffer, current, new)
    if start is None or not _writable(buffer) or start + n + new.shape[-2] > buffer.shape[-2]:
        buffer, start = room_for(None, n + new.shape[-2], new, current if n else None, spare), 0
    end = start + n + new.shape[-2]
    buffer[..., start + n:end, :] = new
    return buffer[..., start:end, :], buffer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into a buffer with room to spare instead of concatenating.

    With a `capacity` (the positions a run will hold: prompt and answer), its buffers are that long from the
    first update, so the cache is never copied to grow and holds no room it will not use.
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__()
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        spare = spare_within(self.capacity, self.get_seq_length() + key_states.shape[-2])
        self.keys, self._key_buffer = _append(self.keys, self._key_buffer, key_states, spare)
        self.values, self._value_buffer = _append(self.values, self._value_buffer, value_states, spare)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class SlidingLayer(DynamicSlidingWindowLayer):
    """A DynamicSlidingWindowLayer that appends into a buffer with room to spare instead of concatenating its
    window on every update; it returns and keeps what that layer does (the window and the new tokens, then the
    last sliding_window - 1 of them). Its room to spare is a quarter of the window (at least 256), however long
    the chunk that filled it, and a buffer left much larger by a long chunk is given up at the next update."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if getattr(self, "record_past", False):  # kept whole until a crop (assisted decoding): transformers' way
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        spare = max(256, self.sliding_window // 4)
        if self._key_buffer is not None and \
                self._key_buffer.shape[-2] > self.sliding_window + key_states.shape[-2] + 2 * spare:
            self._key_buffer = self._value_buffer = None
        keys, self._key_buffer = _append(self.keys, self._key_buffer, key_states, spare)
        values, self._value_buffer = _append(self.values, self._value_buffer, value_states, spare)
        self.keys = keys[:, :, -self.sliding_window + 1:, :]
        self.values = values[:, :, -self.sliding_window + 1:, :]
        return keys, values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def new_cache(config: PretrainedConfig, capacity: int | None = None) -> DynamicCache:
    """An empty DynamicCache for a model of `config`, its layers growing in place; with `capacity`, its
    full-attention layers hold that many positions from the start (more still grow, as without)."""
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = GrowingLayer(capacity)
        elif type(layer) is DynamicSlidingWindowLayer:
            cache.layers[index] = SlidingLayer(sliding_window=layer.sliding_window)
    return cache
