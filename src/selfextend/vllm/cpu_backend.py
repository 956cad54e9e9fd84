"""SelfExtend's attention backend for vLLM on CPU: vLLM's CPU_ATTN, plus the project's position maps.

The one module that depends on vLLM's internals (tested on vLLM 0.32.0: `TESTED_VLLM`). A layer gets
SelfExtend when the engine's settings ask for it and the layer is a full-attention decoder layer; a
request goes to the project's kernels when its keys reach past the neighbor window W, otherwise to vLLM's
own kernel, unchanged. vLLM hands `forward` the queries already rotated at their positions, after writing
this step's keys and values into the paged cache, so each request's keys are read from its blocks (the
cache holds them rotated at their own positions). Their grouped form depends only on the
key and its position, so each layer keeps it beside vLLM's cache, in the same blocks and slots: a step
rotates only its new keys (as in transformers; `keep_grouped_keys: false` rotates the gathered keys
instead). The step's decoding requests and short prefill chunks go together through one call of the
native paged kernel (`attention/paged_native.c`, float32), which reads their blocks in place and writes
their outputs; without it (another dtype, or no C compiler: said once at start-up) through the torch paged
kernel, a fixed count of operations per layer. Long prefill chunks go one request at a time through the
blockwise kernel, over their gathered keys.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass

import torch
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from ..attention import KVLayout, grouped_key_count, resolve_backend, resolve_geometry, workers
from ..attention.paged import PagedPlan, paged_attention, paged_plan
from ..attention.paged_native import NATIVE_KEYS, NativeStep, library, native_paged_attention, native_step, write_grouped_keys
from ..errors import NativeBuildError
from ..rotary import GroupedRotation, rotate
from .settings import SelfExtendVLLMError, cores_note, engine_settings

logger = init_logger("vllm.selfextend")  # under "vllm", whose handlers vLLM configures
READABLE_LAYOUTS = ("vec", "vec16")  # KV-cache layouts whose keys this module reads (K transposed per block)


def gather_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [1, kv_heads, length, head_dim] of one request, from its cache blocks (in order)."""
    heads, dim = kv_cache.shape[1], kv_cache.shape[3] // 2
    used = blocks[:-(-length // kv_cache.shape[2])].long()[None]
    # contiguous: the CPU flash kernel reads the head dimension as unit-stride
    return (_key_rows(kv_cache, used).reshape(1, heads, -1, dim)[:, :, :length].contiguous(),
            _block_rows(_halves(kv_cache)[1], used).reshape(1, heads, -1, dim)[:, :, :length].contiguous())


def gather_grouped(grouped: torch.Tensor, blocks: torch.Tensor, length: int) -> torch.Tensor:
    """Kept grouped keys [1, kv_heads, length, head_dim] of one request, from its cache blocks (in order)."""
    heads, dim, block_size = grouped.shape[1:]
    used = blocks[:-(-length // block_size)].long()[None]
    return _transposed_rows(grouped, used).reshape(1, heads, -1, dim)[:, :, :length]


def _halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the cache [blocks, kv_heads, block_size, 2·head_dim]: per block and head, the keys stored
    transposed [head_dim, block_size], then the values [block_size, head_dim]."""
    n_blocks, heads, block_size, twice = kv_cache.shape
    halves = kv_cache.view(n_blocks, heads, 2, block_size * twice // 2)
    return (halves[:, :, 0].view(n_blocks, heads, twice // 2, block_size),
            halves[:, :, 1].view(n_blocks, heads, block_size, twice // 2))


def _block_rows(per_block: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The blocks [rows, n] of a per-block view [n_blocks, heads, a, b], as [rows, heads, n, a, b] (one copy)."""
    picked = per_block.index_select(0, blocks.flatten())
    return picked.view(*blocks.shape, *picked.shape[1:]).transpose(1, 2)


def _transposed_rows(per_block: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Vectors stored transposed per block [n_blocks, heads, head_dim, block_size] at blocks [rows, n], as
    [rows, heads, n, block_size, head_dim] (a view of one copy)."""
    return _block_rows(per_block, blocks).transpose(-1, -2)


def _key_rows(kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The keys of blocks [rows, n] as [rows, heads, n, block_size, head_dim] (a view of one copy)."""
    return _transposed_rows(_halves(kv_cache)[0], blocks)


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


PAGED_QUERIES, PAGED_KEYS = 256, 4096  # the torch paged kernel's prefill chunks: its logits are queries × keys


@dataclass(frozen=True)
class StepRoute:
    """Which of a step's requests go where, alike for every SelfExtend layer of the step."""

    plain: bool  # some requests have n <= W: vLLM's own kernel (plain attention)
    decoding: list[int]  # one query each, past W: the paged kernel
    short: list[int]  # short prefill chunks past W: the paged kernel (native: rows of up to NATIVE_KEYS keys)
    long: list[int]  # long prefill chunks: the blockwise kernel, one at a time
    native: NativeStep | None  # the native kernels' view of the step (None: they do not run here)


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
        found = StepRoute(len(extended) < len(lengths), decoding, short, long, step)
        attn_metadata._selfextend_route = found
    return found


@functools.cache
def native_kernel_problem(dtype: torch.dtype) -> str | None:
    """Why the native paged kernel cannot run here (said once per process), or None when it runs."""
    if dtype != torch.float32:
        problem = f"it reads float32 caches, this model runs {dtype}"
    else:
        try:
            library()
            return None
        except NativeBuildError as error:
            problem = str(error)
    logger.warning("SelfExtend: decode steps and short chunks run the torch paged kernel, several times slower "
                   "per layer than the native one: %s", problem)
    return problem


@functools.cache
def warn_about_cores() -> None:
    """Once per worker: say so when vLLM's automatic binding left the model one core of several."""
    note = cores_note(envs.VLLM_CPU_OMP_THREADS_BIND, torch.get_num_threads(), os.cpu_count() or 1)
    if note is not None:
        logger.warning(note)


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


class SelfExtendCPUImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's implementation, with SelfExtend (or STRING) for the requests and layers it applies to."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        vllm_config = get_current_vllm_config()  # only inside vLLM's config context: read it here, not in forward
        engine = engine_settings(vllm_config)  # read once per layer at start-up, never in forward
        self.rotation = None
        if engine is None or sliding_window is not None or attn_type != AttentionType.DECODER:
            return  # plain vLLM: no SelfExtend asked for, or a sliding-window / non-decoder layer
        refused = {"attention sinks": sinks is not None, "ALiBi": alibi_slopes is not None,
                   "logit soft-capping": logits_soft_cap not in (None, 0), "an fp8 KV cache": self.is_fp8_kv_cache}
        for what, present in refused.items():
            if present:
                raise SelfExtendVLLMError(f"SelfExtend does not run with {what} in vLLM")
        far = engine.settings.far_pass
        self.rotation = GroupedRotation(far.group_size, far.window_size, engine.rope, far.offset)
        self.kernel = resolve_backend(engine.settings.backend, torch.device("cpu"))
        self.keep = engine.keep_grouped_keys
        self.native = native_kernel_problem(vllm_config.model_config.dtype) is None
        warn_about_cores()
        workers.leave_threads_alone("vLLM's CPU worker")  # it binds torch's threads to cores and keeps their count
        if self.keep and kv_sharing_target_layer_name is not None:  # it never writes keys, so it cannot keep them
            self.keep = False
            logger.info("SelfExtend: a layer reading %s's KV cache rotates the grouped keys it reads at each step "
                        "(kept grouped keys need the layer that writes the keys)", kv_sharing_target_layer_name)
        self.grouped: torch.Tensor | None = None  # [blocks, kv_heads, head_dim, block_size]: stored as the keys
        self._grouped_for: tuple | None = None  # the KV cache tensor the kept keys belong to
        self.keys_rotated = 0  # keys rotated to grouped positions so far (the tests check: each new key once)
        self.kernel_calls = Counter()  # calls per kernel: "native", "torch paged", "blockwise" (the tests check)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata, output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if self.rotation is None or attn_metadata is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if layer.isa not in READABLE_LAYOUTS:
            raise SelfExtendVLLMError(f"SelfExtend reads the {'/'.join(READABLE_LAYOUTS)} KV-cache layouts of vLLM's "
                                      f"CPU backend; this machine's is {layer.isa!r}")
        route = _step_route(attn_metadata, self.rotation, self.native)
        grouped = self._keep(key, kv_cache, attn_metadata, route) if self.keep else None
        if route.plain:  # the requests with n <= W: vLLM's own kernel (plain attention)
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        if route.native is not None and len(route.native.rows):  # decode steps and short chunks, in one call
            keys, values = _halves(kv_cache)
            self.kernel_calls["native"] += 1
            self.keys_rotated += native_paged_attention(query, output, keys, values, route.native, self.scale,
                                                        grouped)
        elif route.decoding or route.short:
            for rows in (route.decoding, route.short):  # each group in one call, short chunks padded alike
                if rows:
                    self._paged(query, kv_cache, grouped, attn_metadata, rows, output)
                    self.kernel_calls["torch paged"] += 1
        if route.long:
            starts, lengths = attn_metadata.query_start_loc.tolist(), attn_metadata.seq_lens.tolist()
        for r in route.long:  # long prefill chunks, one request at a time
            a, b, length = starts[r], starts[r + 1], lengths[r]
            blocks = attn_metadata.block_table[r]
            keys, values = gather_kv(kv_cache, blocks, length)
            geometry = resolve_geometry(KVLayout(q_offset=length - (b - a), kv_offset=0), None, 1, b - a, length,
                                        query.device)
            self.kernel_calls["blockwise"] += 1
            out = self._attend(query[a:b].transpose(0, 1)[None], keys, values, geometry,
                               None if grouped is None else gather_grouped(grouped, blocks, length))
            output[a:b] = out[0]
        return output

    def _keep(self, key: torch.Tensor, kv_cache: torch.Tensor, attn_metadata, route: StepRoute) -> torch.Tensor:
        """This layer's kept grouped keys, with this step's new keys written into their slots.

        A slot's grouped key is rewritten whenever vLLM writes its key (every step's new tokens pass here), so
        a block reused for another request, or served from the prefix cache, holds the right grouped keys.
        """
        n_blocks, heads, block_size, twice = kv_cache.shape
        if self._grouped_for != (kv_cache.data_ptr(), kv_cache.shape):  # first step, or vLLM's cache was replaced
            self.grouped = kv_cache.new_empty(n_blocks, heads, twice // 2, block_size)
            self._grouped_for = (kv_cache.data_ptr(), kv_cache.shape)
        if route.native is not None:
            self.keys_rotated += write_grouped_keys(key, route.native, self.grouped)
            return self.grouped
        step = _step_slots(attn_metadata, block_size, self.rotation)
        new = key[:attn_metadata.num_actual_tokens]
        if step.written is not None:
            new = new[step.written]
        cos, sin = step.angles
        self.grouped[step.blocks, :, :, step.offsets] = rotate(new, cos[:, None], sin[:, None])
        self.keys_rotated += len(step.blocks)
        return self.grouped

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, geometry,
                kept: torch.Tensor | None) -> torch.Tensor:
        """The project's kernel, with the kept grouped keys, or rotating the gathered keys (counted) without."""
        if kept is None:
            self.keys_rotated += keys.shape[0] * grouped_key_count(geometry, query.shape[2], keys.shape[2],
                                                                   self.rotation.window_size)
        return self.kernel.selfextend(query, keys, values, geometry, self.rotation, self.scale, kept)

    def _paged(self, query: torch.Tensor, kv_cache: torch.Tensor, grouped: torch.Tensor | None, attn_metadata,
               rows: list[int], output: torch.Tensor) -> None:
        """The queries of `rows` in one kernel call, reading their keys in place from the blocks."""
        found = _step_rows(attn_metadata, rows, kv_cache, self.rotation)
        if grouped is None:
            self.keys_rotated += len(rows) * found.plan.total
        keys, values = _halves(kv_cache)
        out = paged_attention(query[found.tokens], keys.transpose(-1, -2), values, found.plan, self.rotation,
                              self.scale, None if grouped is None else grouped.transpose(-1, -2))
        real = found.plan.real
        output[found.tokens[real]] = out[real]


class SelfExtendMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU_ATTN's metadata builder; refuses at start-up a KV-cache layout SelfExtend cannot read."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if engine_settings(vllm_config) is not None and self.isa not in READABLE_LAYOUTS:
            raise SelfExtendVLLMError(f"SelfExtend reads the {'/'.join(READABLE_LAYOUTS)} KV-cache layouts of vLLM's "
                                      f"CPU backend; this machine's is {self.isa!r} (bfloat16 on AMX: use float32)")


class SelfExtendCPUBackend(CPUAttentionBackend):
    """vLLM's CPU_ATTN (same name, same cache layout and metadata) with SelfExtend's implementation."""

    @staticmethod
    def get_impl_cls() -> type[SelfExtendCPUImpl]:
        return SelfExtendCPUImpl

    @staticmethod
    def get_builder_cls() -> type[SelfExtendMetadataBuilder]:
        return SelfExtendMetadataBuilder
