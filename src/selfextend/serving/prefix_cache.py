"""Kept KV caches of earlier prompts, so a request that shares a long prefix prefills only the rest.

A cache is resumable at chunk boundaries only (multiples of the prefill chunk size): resuming there
runs exactly the forward passes a prefill from scratch would, so reuse never changes a single logit.
Full-attention layers keep every token and are cut back to the boundary on reuse. Sliding-window
layers (Gemma 3's local layers) keep only their last window, which cannot be cut back, so their
state is copied at every boundary while the prompt is read. What SelfExtend computed depends on its
settings, so an entry is found only by a request with the same settings. Memory is bounded: entries
are dropped least recently used first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig

from ..kv_cache import new_cache

Settings = tuple  # what the cached keys and values were computed with: SelfExtendConfig.key()


def _size(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Entry:
    """The tokens a prompt's cache holds, its full layers, and its sliding layers at each chunk boundary."""

    settings: Settings
    tokens: torch.Tensor  # 1-D, the ids the cache holds
    full: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sliding: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)  # boundary → layer → kv
    boundaries: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        full = sum(_size(k, v) for k, v in self.full.values())
        return full + sum(_size(k, v) for layers in self.sliding.values() for k, v in layers.values())


class Recorder:
    """Collects an `Entry` while a prompt is prefilled: pass `record` as the prefill's chunk hook."""

    def __init__(self, settings: Settings, tokens: torch.Tensor, chunk_size: int, keep_from: Entry | None = None,
                 resumed_at: int = 0):
        self.entry = Entry(settings, tokens.detach().cpu())
        self.chunk_size = chunk_size
        if keep_from is not None:  # the boundaries the resumed prefix already had
            self.entry.boundaries = [b for b in keep_from.boundaries if b <= resumed_at]
            self.entry.sliding = {b: keep_from.sliding[b] for b in self.entry.boundaries if b in keep_from.sliding}

    def record(self, end: int, cache: DynamicCache) -> None:
        if end % self.chunk_size:
            return  # the prompt's ragged end: not a boundary a later prefill can resume from
        self.entry.boundaries.append(end)
        self.entry.sliding[end] = {i: (layer.keys.clone(), layer.values.clone())
                                   for i, layer in enumerate(cache.layers) if layer.is_sliding}

    def finish(self, cache: DynamicCache) -> Entry:
        """The entry, holding the full layers of the finished prefill (shared, not copied: later updates
        write past their end or into a new tensor, never into them)."""
        self.entry.full = {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)
                           if not layer.is_sliding and layer.is_initialized}
        return self.entry


class PrefixCache:
    """Entries up to `capacity_bytes`, least recently used dropped first; safe to call from several threads."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"prefix cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, settings: Settings, tokens: torch.Tensor) -> tuple[Entry | None, int]:
        """The entry to resume `tokens` (1-D, the ids to prefill) from and how many tokens it covers (0: none)."""
        best, best_length, best_key = None, 0, None
        tokens = tokens.detach().cpu()
        with self._lock:
            for key, entry in self._entries.items():
                if entry.settings != settings or not entry.boundaries:
                    continue
                m = min(len(entry.tokens), len(tokens))
                differ = (entry.tokens[:m] != tokens[:m]).nonzero()
                common = int(differ[0, 0]) if len(differ) else m
                usable = max((b for b in entry.boundaries if b <= common), default=0)
                if usable > best_length or (usable == best_length and best is not None):
                    best, best_length, best_key = entry, usable, key
            if best_key is not None and best_length > 0:
                self._entries.move_to_end(best_key)
        return (best, best_length) if best_length > 0 else (None, 0)

    def add(self, entry: Entry) -> bool:
        """Keep `entry`, dropping entries it makes redundant (same settings, their tokens a prefix of its own)
        and then the least recently used to make room; False when it alone is too big."""
        size = entry.nbytes
        if not entry.boundaries or size > self.capacity_bytes:
            return False
        with self._lock:
            for key in [k for k, old in self._entries.items() if old.settings == entry.settings
                        and len(old.tokens) <= len(entry.tokens)
                        and torch.equal(old.tokens, entry.tokens[:len(old.tokens)])]:
                del self._entries[key]
            total = sum(e.nbytes for e in self._entries.values())
            while self._entries and total + size > self.capacity_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes
            self._entries[self._next] = entry
            self._next += 1
        return True


def restore(entry: Entry, length: int, config: PretrainedConfig, capacity: int | None = None,
            dtype: torch.dtype | None = None) -> DynamicCache:
    """A new cache holding the first `length` tokens of `entry` (`length` one of its boundaries); its full
    layers take `capacity` positions at their next update, and store `dtype` (see `new_cache`)."""
    cache = new_cache(config, capacity, dtype)
    for i, layer in enumerate(cache.layers):
        if not layer.is_sliding and i not in entry.full:
            continue  # a layer that held nothing (shared keys and values)
        keys, values = entry.sliding[length][i] if layer.is_sliding else entry.full[i]
        if not layer.is_sliding:
            keys, values = keys[:, :, :length], values[:, :, :length]
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if layer.is_sliding:
            layer.cumulative_length = length
    return cache
