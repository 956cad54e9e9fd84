"""SelfExtend over vLLM's paged KV cache, whatever vLLM backend runs under it: which layers and requests get the
position maps, each step's routes and indices (built by its first SelfExtend layer, shared by the others), the
kept grouped keys, and the project's kernels. A backend module (`cpu_backend`, `gpu_backend`) mixes
`SelfExtendLayer` into vLLM's implementation and says how its cache holds keys and values; vLLM's own kernel
attends for everything SelfExtend leaves alone.

vLLM hands `forward` the queries already rotated at their positions, after writing this step's keys and values
into the paged cache, so each request's keys are read from its blocks (the cache holds them rotated at their own
positions). Their grouped form depends only on the key and its position, so each layer keeps it beside vLLM's
cache, in the same blocks and slots: a step rotates only its new keys (as in transformers; `keep_grouped_keys:
false`, the default on GPUs, rotates the keys it reads instead). Decoding requests and short prefill chunks go
through the CPU's native paged kernel in one call, which reads their blocks in place, or else through the torch
paged kernel in as few calls as `PAGED_BYTES` allows; long prefill chunks go one request at a time through the
blockwise (CPU) or FlexAttention (GPU) kernel, over their gathered keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType

from ..attention import KVLayout, grouped_key_count, resolve_backend, resolve_geometry
from ..attention.paged import PagedPlan, blocks_in_order, paged_attention, paged_plan
from ..attention.paged_native import NATIVE_KEYS, NativeStep, native_step
from ..rotary import GroupedRotation, rotate
from .settings import SelfExtendVLLMError, engine_settings

logger = init_logger("vllm.selfextend")  # under "vllm", whose handlers vLLM configures
PAGED_QUERIES, PAGED_KEYS = 256, 4096  # the torch paged kernel's prefill chunks: its logits are queries × keys
PAGED_BYTES = 1 << 29  # what one torch paged-kernel call may hold (its rows' gathered keys, values and logits)


def gather_blocks(blocks: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """One request's first `length` vectors [1, heads, length, d] (contiguous: the CPU flash kernel reads the head
    dimension as unit-stride) from per-block vectors [n_blocks, heads, block_size, d] (any strides), its blocks
    listed in order by `table_row`."""
    heads, block_size, dim = blocks.shape[1:]
    used = table_row[:-(-length // block_size)].long()
    picked = blocks_in_order(blocks, used)  # [n, heads, block_size, d]
    return picked.transpose(0, 1).reshape(1, heads, -1, dim)[:, :, :length].contiguous()


def empty_like_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """A new uninitialised tensor shaped and stored like `blocks` (the axes in the same memory order): the kept
    grouped keys are stored as vLLM stores the keys, so the kernels read both alike."""
    order = sorted(range(blocks.dim()), key=blocks.stride, reverse=True)
    stored = blocks.new_empty([blocks.shape[i] for i in order])
    return stored.permute([order.index(i) for i in range(blocks.dim())])


def token_positions(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The absolute position of each of a step's tokens: request r's q tokens are the last q of its seq_len."""
    counts = starts[1:] - starts[:-1]
    first = torch.repeat_interleave(lengths - counts - starts[:-1], counts)  # position of token t is first + t
    return first + torch.arange(int(starts[-1]), device=starts.device)


@dataclass(frozen=True)
class StepSlots:
    """Where this step's new keys go and how far each turns to its grouped position, alike for every layer."""

    written: torch.Tensor | None  # which of the step's tokens vLLM wrote (padding is not); None: all of them
    blocks: torch.Tensor  # the written tokens' cache blocks
    offsets: torch.Tensor  # and their slots in those blocks
    angles: tuple[torch.Tensor, torch.Tensor]  # cos/sin [tokens, d/2] from each key's position to its grouped one


def _step_slots(attn_metadata, block_size: int, rotation: GroupedRotation) -> StepSlots:
    """The step's `StepSlots`, built by its first SelfExtend layer and kept on its metadata for the others."""
    found = getattr(attn_metadata, "_selfextend_slots", None)
    if found is None:
        slots = attn_metadata.slot_mapping[:attn_metadata.num_actual_tokens].long()
        positions = token_positions(attn_metadata.query_start_loc, attn_metadata.seq_lens)
        written = slots >= 0
        if bool(written.all()):
            written = None
        else:
            slots, positions = slots[written], positions[written]
        cos, sin = rotation.angles(positions[:, None], "key", slots.device)  # one row per token: any positions
        found = StepSlots(written, slots // block_size, slots % block_size, (cos[:, 0], sin[:, 0]))
        attn_metadata._selfextend_slots = found
    return found


@dataclass(frozen=True)
class StepRoute:
    """Which of a step's requests go where, alike for every SelfExtend layer of the step."""

    plain: bool  # some requests have n <= W: vLLM's own kernel (plain attention)
    decoding: list[int]  # one query each, past W: the paged kernel
    short: list[int]  # short prefill chunks past W: the paged kernel (native: rows of up to NATIVE_KEYS keys)
    long: list[int]  # long prefill chunks: the blockwise kernel, one at a time
    native: NativeStep | None  # the native kernels' view of the step (None: they do not run here)
    starts: list[int]  # query_start_loc, on the host
    lengths: list[int]  # seq_lens, on the host


def _step_route(attn_metadata, rotation: GroupedRotation, native: bool) -> StepRoute:
    """The step's `StepRoute`, built by its first SelfExtend layer and kept on its metadata for the others."""
    found = getattr(attn_metadata, "_selfextend_route", None)
    if found is None:
        starts, lengths = attn_metadata.query_start_loc.tolist(), attn_metadata.seq_lens.tolist()
        extended = [r for r, n in enumerate(lengths) if n > rotation.window_size]  # some pair at distance >= W
        counts = {r: starts[r + 1] - starts[r] for r in extended}
        decoding = [r for r in extended if counts[r] == 1]
        if native:
            short = [r for r in extended if counts[r] > 1 and lengths[r] <= NATIVE_KEYS]
        else:
            short = [r for r in extended if 1 < counts[r] <= PAGED_QUERIES and lengths[r] <= PAGED_KEYS]
        long = sorted(set(extended) - set(decoding) - set(short))
        step = None
        if native:
            step = native_step(attn_metadata.block_table, attn_metadata.seq_lens, attn_metadata.query_start_loc,
                               torch.tensor(decoding + short), rotation,
                               attn_metadata.slot_mapping[:attn_metadata.num_actual_tokens])
        found = StepRoute(len(extended) < len(lengths), decoding, short, long, step, starts, lengths)
        attn_metadata._selfextend_route = found
    return found


@dataclass(frozen=True)
class PagedRows:
    """Rows read in place by `paged_attention`: its plan, and which of the step's tokens are their queries."""

    plan: PagedPlan
    tokens: torch.Tensor  # [rows, queries] the step's token index of each query (padding repeats the last)


def _step_rows(attn_metadata, rows: list[int], kv_cache: torch.Tensor, rotation: GroupedRotation) -> PagedRows:
    """The `PagedRows` of these rows, built by the step's first SelfExtend layer and kept on the step's
    metadata for the others (the same block table, lengths, cache shape and engine-wide G/W)."""
    n_blocks, heads, block_size = kv_cache.shape[:3]
    key = (tuple(rows), n_blocks, heads, block_size, rotation.group_size, rotation.window_size, rotation.offset)
    kept = attn_metadata.__dict__.setdefault("_selfextend_rows", {})
    if key not in kept:
        index = torch.tensor(rows, device=kv_cache.device)
        starts = attn_metadata.query_start_loc[index].long()
        counts = attn_metadata.query_start_loc[index + 1].long() - starts
        plan = paged_plan(attn_metadata.block_table[index], attn_metadata.seq_lens[index], counts, n_blocks,
                          block_size, heads, rotation)
        kept[key] = PagedRows(plan, starts[:, None] + plan.steps)
    return kept[key]


def paged_groups(rows: list[int], starts: list[int], lengths: list[int], query_heads: int, key_blocks: torch.Tensor,
                 budget: int = PAGED_BYTES) -> list[list[int]]:
    """`rows` in order, cut into groups that one torch paged-kernel call each takes within `budget` bytes: a call
    gathers every row's keys (and their grouped form) and values, padded to its longest row, and holds float32
    logits and probabilities for its most queries over them. A row alone may need more; it then goes alone."""
    heads, dim = key_blocks.shape[1], key_blocks.shape[3]
    per_key = 3 * heads * dim * key_blocks.element_size()  # keys, grouped keys, values
    per_query_key = 2 * query_heads * 4
    groups: list[list[int]] = []
    keys = queries = 0
    for r in rows:
        n, q = lengths[r], starts[r + 1] - starts[r]
        if groups and (len(groups[-1]) + 1) * max(keys, n) * (per_key + per_query_key * max(queries, q)) <= budget:
            groups[-1].append(r)
            keys, queries = max(keys, n), max(queries, q)
        else:
            groups.append([r])
            keys, queries = n, q
    return groups


def _step_groups(attn_metadata, route: StepRoute, query_heads: int, key_blocks: torch.Tensor) -> list[list[int]]:
    """The step's decoding rows, then its short chunks, in `paged_groups`: built by its first SelfExtend layer
    and kept on its metadata for the others (the same heads and cache)."""
    key = (query_heads, tuple(key_blocks.shape), key_blocks.dtype)
    kept = attn_metadata.__dict__.setdefault("_selfextend_groups", {})
    if key not in kept:
        kept[key] = [group for rows in (route.decoding, route.short)
                     for group in paged_groups(rows, route.starts, route.lengths, query_heads, key_blocks)]
    return kept[key]


def refusals(sinks: torch.Tensor | None, alibi_slopes: list[float] | None,
             logits_soft_cap: float | None) -> dict[str, bool]:
    """What SelfExtend cannot run with in any backend (what, whether present); a backend adds its own."""
    return {"attention sinks": sinks is not None, "ALiBi": alibi_slopes is not None,
            "logit soft-capping": logits_soft_cap not in (None, 0)}


class SelfExtendLayer:
    """Mixed into a vLLM attention implementation (first among its bases): SelfExtend (or STRING) for the layers
    and requests it applies to, the implementation's own `forward` for the rest.

    A backend says where its cache [blocks, kv_heads, block_size, …] (vLLM's logical shape) holds a block's keys
    and values (`key_blocks`, `value_blocks`), and may run a native kernel on a step's decoding rows and short
    chunks (`native`, `_native_attention`, `_native_keep`).
    """

    rotation: GroupedRotation | None = None  # None: plain vLLM for this layer
    native = False

    def _setup_selfextend(self, sliding_window: int | None, attn_type: str, refused: dict[str, bool],
                          device: torch.device, kv_sharing_target_layer_name: str | None) -> bool:
        """Read the engine's settings (once per layer, at start-up: only then is vLLM's config current) and
        prepare this layer; False when it stays plain vLLM (not asked for, or a sliding / non-decoder layer).
        Refuses what SelfExtend cannot run exactly (`refused`: what, whether present)."""
        engine = engine_settings(get_current_vllm_config())
        if engine is None or sliding_window is not None or attn_type != AttentionType.DECODER:
            return False
        for what, present in refused.items():
            if present:
                raise SelfExtendVLLMError(f"SelfExtend does not run with {what} in vLLM")
        far = engine.settings.far_pass
        self.rotation = GroupedRotation(far.group_size, far.window_size, engine.rope, far.offset)
        self.kernel = resolve_backend(engine.settings.backend, device)
        self.keep = engine.keep_grouped_keys
        if self.keep and kv_sharing_target_layer_name is not None:  # it never writes keys, so it cannot keep them
            self.keep = False
            logger.info("SelfExtend: a layer reading %s's KV cache rotates the grouped keys it reads at each step "
                        "(kept grouped keys need the layer that writes the keys)", kv_sharing_target_layer_name)
        self.grouped: torch.Tensor | None = None  # [blocks, kv_heads, block_size, d], stored as the keys
        self._grouped_for: tuple | None = None  # the KV cache tensor the kept keys belong to
        self.keys_rotated = 0  # keys rotated to grouped positions so far (the tests check: each new key once)
        self.kernel_calls = Counter()  # calls per kernel: "native", "torch paged", "blockwise" (the tests check)
        return True

    def key_blocks(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The cache's keys as [blocks, kv_heads, block_size, d] (a view, any strides)."""
        raise NotImplementedError

    def value_blocks(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The cache's values as [blocks, kv_heads, block_size, d] (a view, any strides)."""
        raise NotImplementedError

    def _check_layout(self, layer) -> None:
        """Refuse a cache layout this backend's views cannot read (checked at each step: vLLM picks it late)."""

    def _native_attention(self, query: torch.Tensor, output: torch.Tensor, kv_cache: torch.Tensor, step: NativeStep,
                          grouped: torch.Tensor | None) -> None:
        """The step's native rows through the backend's native kernel (only where `native` is set)."""
        raise NotImplementedError

    def _native_keep(self, key: torch.Tensor, step: NativeStep) -> None:
        """The step's new keys, rotated to their grouped positions, into `grouped` by the native writer."""
        raise NotImplementedError

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if self.rotation is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        self._check_layout(layer)
        route = _step_route(attn_metadata, self.rotation, self.native)
        grouped = self._keep(key, kv_cache, attn_metadata, route) if self.keep else None
        if route.plain:  # the requests with n <= W: vLLM's own kernel (plain attention)
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        key_blocks, value_blocks = self.key_blocks(kv_cache), self.value_blocks(kv_cache)
        if route.native is not None and len(route.native.rows):  # decode steps and short chunks, in one call
            self.kernel_calls["native"] += 1
            self._native_attention(query, output, kv_cache, route.native, grouped)
        else:  # decode steps, then short chunks (padded alike), in as few calls as memory allows
            for rows in _step_groups(attn_metadata, route, query.shape[1], key_blocks):
                self._paged(query, kv_cache, (key_blocks, value_blocks), grouped, attn_metadata, rows, output)
                self.kernel_calls["torch paged"] += 1
        for r in route.long:  # long prefill chunks, one request at a time
            a, b, length = route.starts[r], route.starts[r + 1], route.lengths[r]
            blocks = attn_metadata.block_table[r]
            keys, values = gather_blocks(key_blocks, blocks, length), gather_blocks(value_blocks, blocks, length)
            geometry = resolve_geometry(KVLayout(q_offset=length - (b - a), kv_offset=0), None, 1, b - a, length,
                                        query.device)
            self.kernel_calls["blockwise"] += 1
            out = self._attend(query[a:b].transpose(0, 1)[None], keys, values, geometry,
                               None if grouped is None else gather_blocks(grouped, blocks, length))
            output[a:b] = out[0]
        return output

    def _keep(self, key: torch.Tensor, kv_cache: torch.Tensor, attn_metadata, route: StepRoute) -> torch.Tensor:
        """This layer's kept grouped keys, with this step's new keys written into their slots.

        A slot's grouped key is rewritten whenever vLLM writes its key (every step's new tokens pass here), so
        a block reused for another request, or served from the prefix cache, holds the right grouped keys.
        """
        if self._grouped_for != (kv_cache.data_ptr(), kv_cache.shape):  # first step, or vLLM's cache was replaced
            self.grouped = empty_like_blocks(self.key_blocks(kv_cache))
            self._grouped_for = (kv_cache.data_ptr(), kv_cache.shape)
        if route.native is not None:
            self._native_keep(key, route.native)
            return self.grouped
        step = _step_slots(attn_metadata, kv_cache.shape[2], self.rotation)
        new = key[:attn_metadata.num_actual_tokens]
        if step.written is not None:
            new = new[step.written]
        cos, sin = step.angles
        self.grouped[step.blocks, :, step.offsets] = rotate(new, cos[:, None], sin[:, None])
        self.keys_rotated += len(step.blocks)
        return self.grouped

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, geometry,
                kept: torch.Tensor | None) -> torch.Tensor:
        """The project's kernel, with the kept grouped keys, or rotating the gathered keys (counted) without."""
        if kept is None:
            self.keys_rotated += keys.shape[0] * grouped_key_count(geometry, query.shape[2], keys.shape[2],
                                                                   self.rotation.window_size)
        return self.kernel.selfextend(query, keys, values, geometry, self.rotation, self.scale, kept)

    def _paged(self, query: torch.Tensor, kv_cache: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor],
               grouped: torch.Tensor | None, attn_metadata, rows: list[int], output: torch.Tensor) -> None:
        """The queries of `rows` in one kernel call, reading their keys and values in place from the cache's
        `blocks` (key_blocks, value_blocks)."""
        found = _step_rows(attn_metadata, rows, kv_cache, self.rotation)
        if grouped is None:
            self.keys_rotated += len(rows) * found.plan.total
        out = paged_attention(query[found.tokens], *blocks, found.plan, self.rotation, self.scale, grouped)
        real = found.plan.real
        output[found.tokens[real]] = out[real]
