"""SelfExtend's attention backend for vLLM on GPUs: vLLM's TRITON_ATTN (CUDA and ROCm) plus the project's position
maps (`layer.SelfExtendLayer`), registered as vLLM's CUSTOM backend: `--attention-backend CUSTOM`.

Not run on a GPU: none was lent to this project. Its code runs in the tests on CPU, inside vLLM's CPU engine
(this backend put in CPU_ATTN's place, vLLM's Triton cache writer done in torch), with every request past the
neighbor window, since vLLM's Triton kernel, which attends for the rest, does not run on CPU. The cache is
vLLM's logical [blocks, kv_heads, block_size, 2·head_dim] (keys, then values), stored in whatever axis order
vLLM chose; decode steps and short chunks go through the torch paged kernel, long prefill chunks through the
project's FlexAttention kernel (blockwise on CPU). Attention runs outside CUDA graphs (it reads the step's
lengths on the host), so vLLM captures the rest piecewise.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.platforms import current_platform
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from .layer import SelfExtendLayer, refusals


class SelfExtendGPUImpl(SelfExtendLayer, TritonAttentionImpl):
    """TRITON_ATTN's implementation, with SelfExtend (or STRING) for the requests and layers it applies to."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 use_alibi_sqrt: bool = False, chunk_lookback: int = -1) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, use_alibi_sqrt,
                         chunk_lookback)
        refused = {**refusals(sinks, alibi_slopes, logits_soft_cap),
                   "a quantized KV cache": is_quantized_kv_cache(kv_cache_dtype),
                   "chunked local attention": chunk_lookback != -1}
        self._setup_selfextend(sliding_window, attn_type, refused, torch.device(current_platform.device_type),
                               kv_sharing_target_layer_name)

    def key_blocks(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return kv_cache[..., :self.head_size]

    def value_blocks(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return kv_cache[..., self.head_size:]

    def fused_rope_kvcache_supported(self) -> bool:
        """A SelfExtend layer keeps its grouped keys from the rotated keys `forward` gets: no fused RoPE there."""
        return self.rotation is None and super().fused_rope_kvcache_supported()

    def fused_output_quant_supported(self, quant_key) -> bool:
        """The project's kernels write float outputs: no quantized output fused into a SelfExtend layer."""
        return self.rotation is None and super().fused_output_quant_supported(quant_key)


class SelfExtendGPUMetadataBuilder(TritonAttentionMetadataBuilder):
    """TRITON_ATTN's metadata builder; SelfExtend's attention reads the step's lengths on the host, so it never
    runs inside a CUDA graph (vLLM then captures the model piecewise, around attention)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class SelfExtendGPUBackend(TritonAttentionBackend):
    """vLLM's TRITON_ATTN (same name, cache layout and metadata) with SelfExtend's implementation."""

    @staticmethod
    def get_impl_cls() -> type[SelfExtendGPUImpl]:
        return SelfExtendGPUImpl

    @staticmethod
    def get_builder_cls() -> type[SelfExtendGPUMetadataBuilder]:
        return SelfExtendGPUMetadataBuilder
