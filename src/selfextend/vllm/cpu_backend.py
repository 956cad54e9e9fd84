"""SelfExtend's attention backend for vLLM on CPU: vLLM's CPU_ATTN, plus the project's position maps
(`layer.SelfExtendLayer`), registered in CPU_ATTN's place.

Tested on vLLM 0.32.0 (`settings.TESTED_VLLM`). The CPU cache stores each block's keys transposed, [head_dim,
block_size] per head, then its values (the `vec` layouts). The step's decoding requests and short prefill
chunks go together through one call of the native paged kernel (`attention/paged_native.c`, float32), which
reads their blocks in place and writes their outputs; without it (another dtype, or no C compiler: said once
at start-up) through the torch paged kernel, a fixed count of operations per layer.
"""

from __future__ import annotations

import functools
import os

import torch
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)

from ..attention import workers
from ..attention.paged_native import NativeStep, library, native_paged_attention, write_grouped_keys
from ..errors import NativeBuildError
from .layer import SelfExtendLayer, logger, refusals
from .settings import SelfExtendVLLMError, cores_note, engine_settings

READABLE_LAYOUTS = ("vec", "vec16")  # KV-cache layouts whose keys this module reads (K transposed per block)


def _halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the cache [blocks, kv_heads, block_size, 2·head_dim]: per block and head, the keys stored
    transposed [head_dim, block_size], then the values [block_size, head_dim]."""
    n_blocks, heads, block_size, twice = kv_cache.shape
    halves = kv_cache.view(n_blocks, heads, 2, block_size * twice // 2)
    return (halves[:, :, 0].view(n_blocks, heads, twice // 2, block_size),
            halves[:, :, 1].view(n_blocks, heads, block_size, twice // 2))


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


class SelfExtendCPUImpl(SelfExtendLayer, CPUAttentionBackendImpl):
    """CPU_ATTN's implementation, with SelfExtend (or STRING) for the requests and layers it applies to."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        refused = {**refusals(sinks, alibi_slopes, logits_soft_cap), "an fp8 KV cache": self.is_fp8_kv_cache}
        if not self._setup_selfextend(sliding_window, attn_type, refused, torch.device("cpu"),
                                      kv_sharing_target_layer_name):
            return
        self.native = native_kernel_problem(get_current_vllm_config().model_config.dtype) is None
        warn_about_cores()
        workers.leave_threads_alone("vLLM's CPU worker")  # it binds torch's threads to cores and keeps their count

    def key_blocks(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return _halves(kv_cache)[0].transpose(-1, -2)

    def value_blocks(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return _halves(kv_cache)[1]

    def _check_layout(self, layer) -> None:
        if layer.isa not in READABLE_LAYOUTS:
            raise SelfExtendVLLMError(f"SelfExtend reads the {'/'.join(READABLE_LAYOUTS)} KV-cache layouts of vLLM's "
                                      f"CPU backend; this machine's is {layer.isa!r}")

    def _native_attention(self, query: torch.Tensor, output: torch.Tensor, kv_cache: torch.Tensor, step: NativeStep,
                          grouped: torch.Tensor | None) -> None:
        keys, values = _halves(kv_cache)
        self.keys_rotated += native_paged_attention(query, output, keys, values, step, self.scale,
                                                    None if grouped is None else grouped.transpose(-1, -2))

    def _native_keep(self, key: torch.Tensor, step: NativeStep) -> None:
        self.keys_rotated += write_grouped_keys(key, step, self.grouped.transpose(-1, -2))


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
