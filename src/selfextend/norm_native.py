"""A model's RMSNorm layers in one C call each (`norm_native.c`), float32 on CPU.

transformers' RMSNorm modules run about ten torch operations per call, and a decode step of the embedded Gemma 3
calls 109 of them: their dispatch, not their arithmetic, was about a third of the step's time outside the linear
layers and attention. `fuse_norms` swaps each module whose output is recognised, on a probe, as one of the two
forms transformers' models use (x·rsqrt(mean(x²) + eps) times w, or times 1 + w for Gemma) for a `NativeNorm`
that computes the same operations in one call; only the order of the sum of squares differs. Built on first use
with the system's C compiler (`selfextend.native`).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import nn

from .native import load

SOURCE = Path(__file__).with_name("norm_native.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel (raises `NativeBuildError` when it cannot be built here)."""
    lib = load(SOURCE)
    lib.se_rms_norm.restype = None
    lib.se_rms_norm.argtypes = [_P, _I, _I, _I, _P, ctypes.c_float, _P, _I]
    return lib


class NativeNorm(nn.Module):
    """RMSNorm over the last dimension with the multiplier `scale` (a Gemma norm's 1 + weight, a Llama norm's
    weight), held as its `weight` parameter: in a model whose other weights are packed, the parameters that say
    its device and dtype."""

    def __init__(self, scale: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(scale.detach().float().contiguous().clone(), requires_grad=False)
        self.eps, self.features = eps, scale.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step makes 109 of these calls on a few hundred numbers each: every torch call here is counted
        # (a shape passed as a torch.Size costs more than the C call itself)
        d = self.features
        if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != d:
            raise TypeError(f"the native RMSNorm takes float32 CPU inputs of {d} features, got {x.dtype} on "
                            f"{x.device} of {x.shape[-1]}")
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty_like(x)
        library().se_rms_norm(x.data_ptr(), x.numel() // d, d, d, self._parameters["weight"].data_ptr(), self.eps,
                              out.data_ptr(), d)
        return out

    def extra_repr(self) -> str:
        return f"{self.features}, eps={self.eps}"


def norm_scale(module: nn.Module) -> torch.Tensor | None:
    """The multiplier of `module` if it computes RMSNorm in one of transformers' two forms (checked bit for bit on
    a probe against those operations in torch), else None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype != torch.float32 \
            or not isinstance(eps, float) or list(module.children()) or len(list(module.parameters())) != 1:
        return None
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[0], generator=generator) * 3
    normed = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps)
    with torch.no_grad():
        got = module(probe)
        for scale in (1.0 + weight.detach(), weight.detach()):
            if torch.equal(got, normed * scale):
                return scale
    return None


def fuse_norms(model: nn.Module) -> list[str]:
    """Replace (in place) every RMSNorm module of `model` recognised by `norm_scale` by a `NativeNorm`; the names
    of modules named like RMSNorm that were not recognised (they keep running in torch)."""
    library()  # built here, or a NativeBuildError that says why, before anything changes
    unrecognised = []
    for name, module in list(model.named_modules()):
        scale = norm_scale(module)
        if scale is not None:
            parent, _, child = name.rpartition(".")
            eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
            setattr(model.get_submodule(parent) if parent else model, child, NativeNorm(scale, eps))
        elif "rmsnorm" in type(module).__name__.lower():
            unrecognised.append(name)
    return unrecognised
