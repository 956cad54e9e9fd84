"""A decode step's keys and values written into a float16 KV cache in one C call (`cache_native.c`), float32 on
CPU: narrowed as torch's copy narrows them, with the range check that refuses what float16 cannot hold. Built on
first use with the system's C compiler (`selfextend.native`); without one, torch writes them, with a warning."""

from __future__ import annotations

import ctypes
import warnings
from functools import cache
from pathlib import Path

import torch

from .errors import NativeBuildError
from .native import load

SOURCE = Path(__file__).with_name("cache_native.c")
NATIVE_POSITIONS = 16  # writes of up to this many positions take the C call; longer ones (prefill) torch's copy
_P, _I = ctypes.c_void_p, ctypes.c_int64


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (saying once that torch writes instead, slower)."""
    try:
        lib = load(SOURCE)
    except NativeBuildError as error:
        warnings.warn(f"a float16 KV cache is written by torch, slower than selfextend's own: {error}", stacklevel=4)
        return None
    lib.se_store_half.restype = ctypes.c_int64
    lib.se_store_half.argtypes = [_P, _I, _I, _I, _P, _I, _I, _I, _I, _I, _I, _I]
    return lib


def store_half(slot: torch.Tensor, new: torch.Tensor) -> int | None:
    """Write float32 `new` [b, h, t, d] into the float16 `slot` of the same shape (CPU, unit-stride rows) in C:
    how many values were past float16's range (written as infinity, for the caller to refuse), or None where
    the C call does not take these tensors (the caller writes them)."""
    if new.dtype != torch.float32 or slot.dtype != torch.float16 or new.shape != slot.shape or new.dim() != 4 \
            or new.shape[2] > NATIVE_POSITIONS or not new.is_cpu or not slot.is_cpu \
            or new.stride(3) != 1 or slot.stride(3) != 1:
        return None
    lib = library()
    if lib is None:
        return None
    return lib.se_store_half(new.data_ptr(), *new.stride()[:3], slot.data_ptr(), *slot.stride()[:3], *new.shape)
