"""Which keys each query may see, in O(n) memory: the compact stand-in for an n×n attention mask.

`transformers` asks the mask function registered for an attention implementation to build the mask;
ours returns a `KVLayout` (offsets, the padding mask and the local window) instead of a 4D tensor,
and the kernels turn it into small per-block masks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class KVLayout:
    """Where queries and keys sit in the cache: query t has cache index q_offset + t, key s has kv_offset + s.

    It travels where `transformers` carries a prepared mask: `generate` with a static cache builds it
    outside the model, calls `.contiguous()` and hands it back as `attention_mask`; accelerate moves it
    between devices with `.to()`. `ndim` is 4 so that transformers treats it as a prepared mask.
    """

    q_offset: int
    kv_offset: int
    valid: torch.Tensor | None = None  # [batch, n_keys] bool, False for padding; None when nothing is padded
    local_window: int | None = None  # keys at index distance >= local_window are hidden (sliding-window layers)

    ndim = 4

    def contiguous(self) -> "KVLayout":
        return self

    def to(self, *args, **kwargs) -> "KVLayout":
        """The layout with its padding mask moved like a tensor (only device moves apply to a bool mask)."""
        if self.valid is None:
            return self
        device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
        return self if device is None else replace(self, valid=self.valid.to(device))


@dataclass(frozen=True)
class Geometry:
    """Per-row RoPE positions of queries and keys, and the index shift: distance(t, s) = shift + t - s.

    Key positions run on by one from each row's first; they are built when read (`key_positions`, or a range of
    them), since a decode step reads only its new keys' and building all of a long cache's costs more than the
    rest of the step's attention Python."""

    shift: int
    query_positions: torch.Tensor  # [batch, n_queries] long
    first_key_position: torch.Tensor  # [batch, 1] long: key index 0's position (negative: before the row's sequence)
    n_keys: int
    valid: torch.Tensor | None  # [batch, n_keys] bool or None

    @property
    def key_positions(self) -> torch.Tensor:
        """[batch, n_keys] long."""
        return self.key_positions_of(0, self.n_keys)

    def key_positions_of(self, start: int, stop: int) -> torch.Tensor:
        """[batch, stop - start] long: the positions of keys start..stop."""
        return self.first_key_position + torch.arange(start, stop, device=self.first_key_position.device)


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
    if isinstance(attention_mask, KVLayout):  # built by `generate` for this very step (static cache)
        return replace(attention_mask, local_window=local_size)
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if valid.shape[-1] < kv_offset + kv_length:
            valid = torch.nn.functional.pad(valid, (0, kv_offset + kv_length - valid.shape[-1]))
        valid = valid[:, kv_offset : kv_offset + kv_length]
        if bool(valid.all()):
            valid = None
    return KVLayout(int(q_offset), int(kv_offset), valid, local_size)


def sequence_starts(
    layout: KVLayout | None, position_ids: torch.Tensor | None, n_batch: int, n_queries: int, n_keys: int,
    device: torch.device, cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cache index where each query's sequence begins, [batch, n_queries]: its index minus its position.

    Positions continue by 1 within a sequence; where they do not, a new sequence begins (packed rows, as
    transformers' own find_packed_sequence_indices reads them). Only real tokens count: a padding query
    takes the start of the real token before it (after it, for leading padding). `cu_seq_lens` (flash-
    attention's varlen boundaries, one row) must agree with the positions when both are given.
    """
    layout = layout or KVLayout(q_offset=n_keys - n_queries, kv_offset=0)
    index = layout.q_offset + torch.arange(n_queries, device=device)
    positions = None if position_ids is None else position_ids.to(device=device, dtype=torch.long).expand(n_batch, -1)
    if cu_seq_lens is not None:
        cuts = cu_seq_lens.to(device=device, dtype=torch.long)
        if n_batch != 1 or int(cuts[-1]) != n_queries:
            raise ValueError(f"cu_seq_lens {cuts.tolist()} does not describe one packed row of {n_queries} queries")
        first = cuts[torch.bucketize(torch.arange(n_queries, device=device), cuts[1:], right=True)]
        by_cuts = (index[first] - (0 if positions is None else positions[0, first]))[None]
        if positions is not None and not torch.equal(by_cuts, index - positions):
            raise ValueError("cu_seq_lens and position_ids disagree on where the packed sequences begin")
        return by_cuts
    if positions is None:  # positions are cache indices
        return torch.zeros(n_batch, n_queries, dtype=torch.long, device=device)
    starts = index - positions
    if layout.valid is None:
        return starts
    real = layout.valid.to(device)[:, layout.q_offset - layout.kv_offset + torch.arange(n_queries, device=device)]
    order = torch.arange(n_queries, device=device).expand(n_batch, -1)
    take = torch.where(real, order, -1).cummax(dim=1).values
    first_real = torch.where(real.any(dim=1), real.to(torch.int8).argmax(dim=1), 0)
    return starts.gather(1, torch.where(take < 0, first_real[:, None], take))


def _split_sequences(starts: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(row, first query, end) of each sequence when some row holds several (packed); None otherwise."""
    if starts.shape[1] < 2:  # one query a row (a decode step): one sequence
        return None
    changes = starts[:, 1:] != starts[:, :-1]
    if not bool(changes.any()):
        return None
    runs = []
    for row in range(starts.shape[0]):
        cuts = [0, *(torch.nonzero(changes[row]).flatten() + 1).tolist(), starts.shape[1]]
        runs += [(row, a, b) for a, b in zip(cuts, cuts[1:])]
    return runs


@dataclass(frozen=True)
class SequencePart:
    """One sequence of a packed row: its row, its queries and keys (slices of the call's) and its geometry."""

    row: int
    queries: slice
    keys: slice
    geometry: "Geometry"


def packed_sequences(layout: KVLayout, starts: torch.Tensor, device: torch.device) -> list[SequencePart] | None:
    """Each sequence of packed rows over its own keys only; None when every row holds one sequence."""
    runs = _split_sequences(starts)
    if runs is None:
        return None
    parts = []
    for row, t0, t1 in runs:
        start = starts[row:row + 1, t0:t1]
        k0, k1 = max(int(start[0, 0]), layout.kv_offset) - layout.kv_offset, layout.q_offset + t1 - layout.kv_offset
        valid = None if layout.valid is None else layout.valid[row:row + 1, k0:k1]
        part = KVLayout(layout.q_offset + t0, layout.kv_offset + k0, valid, layout.local_window)
        geometry = resolve_geometry(part, None, 1, t1 - t0, k1 - k0, device, start)
        parts.append(SequencePart(row, slice(t0, t1), slice(k0, k1), geometry))
    return parts


def resolve_geometry(
    layout: KVLayout | None, position_ids: torch.Tensor | None, n_batch: int, n_queries: int, n_keys: int,
    device: torch.device, starts: torch.Tensor | None = None,
) -> Geometry:
    """Positions of queries and keys for rows holding one sequence each (split packed rows first).

    A key before its row's sequence start belongs to another sequence (or is padding) and is hidden.
    """
    layout = layout or KVLayout(q_offset=n_keys - n_queries, kv_offset=0)  # no mask built: no padding
    if starts is None:
        starts = sequence_starts(layout, position_ids, n_batch, n_queries, n_keys, device)
    start = starts[:, -1:]
    shift = layout.q_offset - layout.kv_offset
    query_positions = layout.q_offset + torch.arange(n_queries, device=device) - start
    geometry = Geometry(shift, query_positions, layout.kv_offset - start, n_keys, None)
    valid = None if layout.valid is None else layout.valid.to(device)
    if bool((start > layout.kv_offset).any()):
        after_start = geometry.key_positions >= 0
        valid = after_start if valid is None else valid & after_start
    return replace(geometry, valid=valid)


def grouped_key_count(geometry: Geometry, n_queries: int, n_keys: int, window: int) -> int:
    """How many keys, from index 0, some query sees at distance >= window (in grouped attention)."""
    return max(0, min(n_keys, geometry.shift + n_queries - window))
