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
outside it, once), so a tensor someone else holds is never written into past what the layer itself held. On CPU a
buffer of 2 MB or more is in huge pages (`allocator.huge_page_empty`), as the int8 weights are: every decode step
reads the full layers' keys and values whole.

With a `dtype` (float16 for a float32 model: half the cache's memory and the bytes a decode step reads) every
layer stores its keys and values in it, rounded once as they are written, and hands them to attention as
stored; SelfExtend's attention reads them as they are (`few_native`, or widened a range at a time). A key or
value past the dtype's range is refused, never stored as infinity.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from . import cache_native
from .allocator import huge_page_empty


CACHE_DTYPES = ("auto", "model", "float16")  # what --kv-cache-dtype may say


def check_cache_dtype(name: str) -> str:
    """`name` if `--kv-cache-dtype` may say it, else a clear error."""
    if name not in CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}: choose one of {', '.join(CACHE_DTYPES)}")
    return name


def cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device | str) -> torch.dtype | None:
    """What a KV cache stores for `--kv-cache-dtype name` with a model of `model_dtype` on `device` (None: the
    model's dtype): the one decision. float16 is for float32 models on CPU, where SelfExtend's blockwise
    attention reads it; auto chooses it there and the model's dtype elsewhere; model never converts."""
    if check_cache_dtype(name) == "model":
        return None
    if model_dtype != torch.float32 or torch.device(device).type != "cpu":
        if name == "auto":
            return None
        raise ValueError(f"a float16 KV cache is for float32 models on CPU (SelfExtend's blockwise attention reads "
                         f"it): a {str(model_dtype).removeprefix('torch.')} model on {torch.device(device).type} "
                         f"keeps its cache in its own dtype (--kv-cache-dtype model)")
    return torch.float16


def _writable(buffer: torch.Tensor) -> bool:
    """Whether `buffer` may be written here: torch refuses writes outside inference mode to one made inside it."""
    return torch.is_inference_mode_enabled() or not buffer.is_inference()


def room_for(buffer: torch.Tensor | None, size: int, like: torch.Tensor, kept: torch.Tensor | None,
             spare: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A buffer of at least `size` positions (dim -2) starting with `kept`: `buffer`, which must already start
    with it, if it has the room and may be written here; else a new one of `dtype` (default: like's) with `spare`
    positions to spare (by default a quarter more, at least 256), so appending one position at a time copies O(1)
    per position."""
    if buffer is not None and _writable(buffer) and buffer.shape[-2] >= size:
        return buffer
    spare = max(256, size // 4) if spare is None else spare
    shape = (*like.shape[:-2], size + spare, like.shape[-1])
    if like.device.type == "cpu":  # read whole at every decode step: in huge pages, as the weights
        grown = huge_page_empty(shape, dtype or like.dtype)
    else:
        grown = like.new_empty(shape, dtype=dtype or like.dtype)
    if kept is not None:
        grown[..., :kept.shape[-2], :] = kept
    return grown


def spare_within(capacity: int | None, size: int) -> int | None:
    """Room to spare that makes a new buffer of `size` positions exactly `capacity` long; None (the default
    growth) without a capacity or past it."""
    return capacity - size if capacity is not None and size <= capacity else None


def _start_in(buffer: torch.Tensor | None, current: torch.Tensor, new: torch.Tensor, dtype: torch.dtype) -> int | None:
    """The position in `buffer` where `current` (a run of its positions, or empty) starts; None if it is not one,
    or `buffer` cannot take `new` after it, stored as `dtype`."""
    if buffer is None or buffer.dtype != dtype or buffer.device != new.device \
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


def _append(current: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor, spare: int | None = None,
            dtype: torch.dtype | None = None):
    """`current` followed by `new`, as a view of `buffer`: written right after `current` if it is a run of the
    buffer's positions with room after it, else into a new buffer (`spare` positions to spare, as `room_for`)
    that starts with a copy of `current`; stored as `dtype` (default: new's), converted as it is written.
    Returns the view, the buffer and the position in it where the view starts."""
    dtype = dtype or new.dtype
    n = current.shape[-2] if current.numel() else 0
    start = _start_in(buffer, current, new, dtype)
    if start is None or not _writable(buffer) or start + n + new.shape[-2] > buffer.shape[-2]:
        buffer, start = room_for(None, n + new.shape[-2], new, current if n else None, spare, dtype), 0
    end = start + n + new.shape[-2]
    buffer[..., start + n:end, :] = new
    return buffer[..., start:end, :], buffer, start


def _store(slot: torch.Tensor, new: torch.Tensor, name: str) -> None:
    """Write `new` (keys or values, as `name` says) into `slot`, positions of a buffer past what its layer holds,
    converted to the slot's dtype; what that dtype cannot hold is refused, the layer's tensors unchanged."""
    if slot.dtype != new.dtype:
        past = cache_native.store_half(slot, new)
        if past is not None:
            if past:
                _check_range(slot.dtype, new, name)
            return
        _check_range(slot.dtype, new, name)
    slot.copy_(new)


def _check_range(storage: torch.dtype, states: torch.Tensor, name: str) -> None:
    """Refuse keys or values (`name`) that `storage` cannot hold (they would be stored as infinity)."""
    limit = torch.finfo(storage).max
    low, high = (x.item() for x in states.aminmax()) if states.numel() else (0.0, 0.0)
    if max(high, -low) > limit:
        raise ValueError(f"a {name} of {max(high, -low):.4g} is past {storage}'s range ({limit:.6g}): "
                         f"this model needs its KV cache in its own dtype (--kv-cache-dtype model)")


class _Stored:
    """A layer that stores keys and values as `storage` (None: as given), converting them as it writes them, in
    buffers with room after them (`_key_buffer`, `_value_buffer`)."""

    storage: torch.dtype | None = None
    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None
    _held: tuple | None = None  # (keys, values, start): what the last update left the layer holding, and where in
    # the buffers they start, so that a decode step appends without working that out again

    def check_range(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Refuse keys or values that `storage` cannot hold (they would be stored as infinity)."""
        if self.storage is None or key_states.dtype == self.storage:
            return
        _check_range(self.storage, key_states, "key")
        _check_range(self.storage, value_states, "value")

    def _append_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """(keys, values, start): the layer's keys and values with the new ones written after them, where the last
        update left them and its buffers have room; None where anything changed since (the caller appends)."""
        held, keys_buffer = self._held, self._key_buffer
        if held is None or held[0] is not self.keys or held[1] is not self.values \
                or keys_buffer.dtype != (self.storage or key_states.dtype) or keys_buffer.device != key_states.device:
            return None
        start, n, t = held[2], held[0].shape[-2], key_states.shape[-2]
        if start + n + t > keys_buffer.shape[-2] or not _writable(keys_buffer):
            return None
        key_slot, value_slot = keys_buffer.narrow(-2, start + n, t), self._value_buffer.narrow(-2, start + n, t)
        if key_slot.shape != key_states.shape or value_slot.shape != value_states.shape:
            return None
        _store(key_slot, key_states, "key")
        _store(value_slot, value_states, "value")
        return keys_buffer.narrow(-2, start, n + t), self._value_buffer.narrow(-2, start, n + t), start


class GrowingLayer(_Stored, DynamicLayer):
    """A DynamicLayer that appends into a buffer with room to spare instead of concatenating.

    With a `capacity` (the positions a run will hold: prompt and answer), its buffers are that long from the
    first update, so the cache is never copied to grow and holds no room it will not use.
    """

    def __init__(self, capacity: int | None = None, storage: torch.dtype | None = None) -> None:
        super().__init__()
        self.capacity, self.storage = capacity, storage

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        appended = self._append_in_place(key_states, value_states)
        if appended is not None:
            self.keys, self.values, start = appended
        else:
            self.check_range(key_states, value_states)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            spare = spare_within(self.capacity, self.get_seq_length() + key_states.shape[-2])
            keys, self._key_buffer, start = _append(self.keys, self._key_buffer, key_states, spare, self.storage)
            self.values, self._value_buffer, value_start = _append(self.values, self._value_buffer, value_states,
                                                                   spare, self.storage)
            self.keys = keys
            start = start if value_start == start else None
        self._held = None if start is None else (self.keys, self.values, start)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self._held = None
        super().reset()


class SlidingLayer(_Stored, DynamicSlidingWindowLayer):
    """A DynamicSlidingWindowLayer that appends into a buffer with room to spare instead of concatenating its
    window on every update; it returns and keeps what that layer does (the window and the new tokens, then the
    last sliding_window - 1 of them). Its room to spare is a quarter of the window (at least 256), however long
    the chunk that filled it, and a buffer left much larger by a long chunk is given up at the next update."""

    def __init__(self, sliding_window: int, storage: torch.dtype | None = None) -> None:
        super().__init__(sliding_window=sliding_window)
        self.storage = storage

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if getattr(self, "record_past", False):  # kept whole until a crop (assisted decoding): transformers' way
            self.check_range(key_states, value_states)
            self._held = None
            dtype = self.storage or key_states.dtype
            return super().update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)
        spare = max(256, self.sliding_window // 4)
        if self._key_buffer is not None and \
                self._key_buffer.shape[-2] > self.sliding_window + key_states.shape[-2] + 2 * spare:
            self._key_buffer = self._value_buffer = self._held = None
        appended = self._append_in_place(key_states, value_states)
        if appended is not None:
            keys, values, start = appended
        else:
            self.check_range(key_states, value_states)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, self._key_buffer, start = _append(self.keys, self._key_buffer, key_states, spare, self.storage)
            values, self._value_buffer, value_start = _append(self.values, self._value_buffer, value_states, spare,
                                                              self.storage)
            start = start if value_start == start else None
        self.cumulative_length += key_states.shape[-2]
        self.keys = keys[:, :, -self.sliding_window + 1:, :]
        self.values = values[:, :, -self.sliding_window + 1:, :]
        first = keys.shape[-2] - self.keys.shape[-2]
        self._held = None if start is None else (self.keys, self.values, start + first)
        return keys, values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self._held = None
        super().reset()


def new_cache(config: PretrainedConfig, capacity: int | None = None, dtype: torch.dtype | None = None) -> DynamicCache:
    """An empty DynamicCache for a model of `config`, its layers growing in place; with `capacity`, its
    full-attention layers hold that many positions from the start (more still grow, as without); with `dtype`,
    every layer stores its keys and values in it (see the module's note)."""
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = GrowingLayer(capacity, dtype)
        elif type(layer) is DynamicSlidingWindowLayer:
            cache.layers[index] = SlidingLayer(layer.sliding_window, dtype)
        elif dtype is not None:
            raise ValueError(f"a {type(layer).__name__} cache layer cannot store {dtype}: only full and sliding "
                             f"attention layers can")
    return cache
