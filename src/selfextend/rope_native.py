"""A decode step's RoPE in one C call per layer (`rope_native.c`), float32 on CPU, the same bits as transformers',
and SelfExtend's rotation of its few queries and keys to grouped positions (`turn`), the same bits as `rotary.rotate`.

transformers' `apply_rotary_pos_emb` (rotate-half form) is a dozen torch operations per layer, and with the
`kernels` package it is called through two module wrappers: about 50-90 us a layer on two cores, 1-1.7 ms of a
16K decode step of the embedded Gemma (docs/results.md). `fuse_rotary` gives each attention module's RoPE a
`forward` that rotates calls of up to `NATIVE_POSITIONS` positions in C and hands every other call to the
model's own function; it does so only where that function's output is recognised, bit for bit on probes, as
the rotate-half formula this computes. Built on first use with the system's C compiler (`selfextend.native`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import MethodType

import torch
from torch import nn

from .native import load
from .transformers_compat import rotary_wrappers

SOURCE = Path(__file__).with_name("rope_native.c")
NATIVE_POSITIONS = 16  # calls of up to this many positions take the C call; longer ones (prefill) torch's
_P, _I = ctypes.c_void_p, ctypes.c_int64


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel (raises `NativeBuildError` when it cannot be built here)."""
    lib = load(SOURCE)
    lib.se_rope.restype = None
    lib.se_rope.argtypes = [_P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _I, _I, _P, _P, _I, _I, _I, _I, _I]
    lib.se_turn.restype = None
    lib.se_turn.argtypes = [_P, _I, _I, _I, _P, _P, _I, _I, _P, _I, _I, _I, _I, _I]
    return lib


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, hq, n, d] and k [b, hk, n, d] rotated by cos and sin [b, n, d] (float32, CPU, unit-stride rows)."""
    b, hq, n, d = q.shape
    out_q, out_k = q.new_empty(b, hq, n, d), k.new_empty(b, k.shape[1], n, d)
    library().se_rope(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], cos.data_ptr(), sin.data_ptr(),
                      *cos.stride()[:2], out_q.data_ptr(), out_k.data_ptr(), b, hq, k.shape[1], n, d)
    return out_q, out_k


def turns(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `turn` takes this call: a few positions of float32 or float16 rows on CPU, laid out as it reads them,
    outside autograd and tracing."""
    return x.dim() == 4 and x.shape[2] <= NATIVE_POSITIONS and (x.dtype == torch.float32 or x.dtype == torch.float16) \
        and cos.dtype == torch.float32 and x.is_cpu and cos.is_cpu and x.stride(-1) == 1 and x.shape[3] % 2 == 0 \
        and cos.shape == (x.shape[0], x.shape[2], x.shape[3] // 2) and sin.shape == cos.shape \
        and sin.stride() == cos.stride() and cos.stride(-1) == 1 \
        and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotary.rotate(x, cos[:, None], sin[:, None])` of a call `turns` takes, in C: x [b, h, n, d] float32 (float16:
    rotated in float32, rounded once) by cos and sin [b, n, d/2]."""
    b, h, n, d = x.shape
    out = x.new_empty(b, h, n, d)
    library().se_turn(x.data_ptr(), *x.stride()[:3], cos.data_ptr(), sin.data_ptr(), *cos.stride()[:2],
                      out.data_ptr(), b, h, n, d, int(x.dtype == torch.float16))
    return out


def _takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether `rotate` takes this call: a few positions of float32 CPU tensors laid out as it reads them."""
    # once per layer in a decode step: written out, not as a loop over the tensors (a generator costs microseconds)
    f32 = torch.float32
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or q.shape[2] > NATIVE_POSITIONS \
            or q.dtype != f32 or k.dtype != f32 or cos.dtype != f32 or sin.dtype != f32 \
            or not (q.is_cpu and k.is_cpu and cos.is_cpu and sin.is_cpu):
        return False
    b, _, n, d = q.shape
    return k.shape[0] == b and k.shape[2] == n and k.shape[3] == d and cos.shape == (b, n, d) \
        and sin.shape == cos.shape and sin.stride() == cos.stride() and cos.stride(-1) == 1 \
        and q.stride(-1) == 1 and k.stride(-1) == 1 and d % 2 == 0


def native_forward(original: Callable) -> Callable:
    """A RoPE forward (to bind to its wrapper, as `kernelize` binds a kernel's) that rotates the calls `rotate`
    takes in C and gives every other call, and every traced one, to `original`."""
    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        if _takes(q, k, cos, sin, unsqueeze_dim) and not torch.compiler.is_compiling():
            return rotate(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    forward.selfextend_native = True
    return forward


def _recognised(original: Callable) -> bool:
    """Whether `original` computes what `rotate` does, bit for bit, on probes of a decode step's shapes."""
    generator = torch.Generator().manual_seed(0)
    for heads, kv_heads, n, d in ((4, 1, 1, 256), (3, 3, 2, 6), (8, 2, 5, 64)):
        q, k = (torch.randn(2, h, n, d, generator=generator) * 4 for h in (heads, kv_heads))
        angles = torch.randn(2, n, d, generator=generator) * 100
        cos, sin = angles.cos(), angles.sin()
        with torch.no_grad():
            expected = original(q, k, cos, sin)
        if not all(torch.equal(a, b) for a, b in zip(rotate(q, k, cos, sin), expected)):
            return False
    return True


def fuse_rotary(model: nn.Module) -> tuple[int, int]:
    """Give each RoPE of `model`'s attention modules the native forward where its formula is recognised
    (in place): how many were given it, and how many were not (their formula differs, or `kernelize` gave them a
    kernel: they run as they were)."""
    library()  # built here, or a NativeBuildError that says why, before anything changes
    fused = unrecognised = 0
    for wrapper, original in rotary_wrappers(model):
        if getattr(wrapper.forward, "selfextend_native", False):
            fused += 1
        elif "forward" not in wrapper.__dict__ and _recognised(original):  # not given a kernel by `kernelize`
            wrapper.forward = MethodType(native_forward(original), wrapper)
            fused += 1
        else:
            unrecognised += 1
    return fused, unrecognised
