"""A decode step's attention partials in one C call each (`few_native.c`): a few query rows over many keys, float32
on CPU, every key and value read once, with the log-sum-exp the merge needs.

torch has no kernel for this shape that reads the cache at memory speed: its flash kernel runs one query row on
one thread, and the two matrix products `partial._attend_few` makes of it read K and V at about half the
machine's bandwidth and add a dozen small operations per partial. Built on first use with the system's C
compiler (`selfextend.native`).
"""

from __future__ import annotations

import ctypes
import warnings
from functools import cache
from pathlib import Path
from typing import Optional

import torch

from ..errors import NativeBuildError
from ..native import load

SOURCE = Path(__file__).with_name("few_native.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a key set: its query, keys and values


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel (raises `NativeBuildError` when it cannot be built here)."""
    lib = load(SOURCE)
    lib.se_attend_few.restype = _I
    lib.se_attend_few.argtypes = [_P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _P, _P,
                                  _I, _I, _I, _I, _I, _I, _I, ctypes.c_float]
    segment = [_P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _I]  # query, key, value with strides; key count
    lib.se_attend_two.restype = _I
    lib.se_attend_two.argtypes = [*segment, *segment, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float]
    lib.se_lanes.restype = _I
    return lib


@torch.compiler.assume_constant_result
@cache
def available() -> bool:
    """Whether the kernel is built here; if not, says once why decode attention runs on torch's kernels instead."""
    try:
        library()
    except NativeBuildError as error:
        warnings.warn(f"decode attention runs on torch's kernels, slower than selfextend's own: {error}",
                      stacklevel=3)
        return False
    return True


def attend_few(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As `partial.attend` without causality: query [b, hq, n, d] over key/value [b, hkv, m, d] on CPU, the query
    float32, keys and values float32 or float16 (read as their exact float32 values), mask bool broadcastable to
    [b, 1, n, m]. Returns (output [b, hq, n, d], lse [b, hq, n]); a row that sees no key gets output 0 and lse
    -inf."""
    b, hq, n, d = query.shape
    query, key, value = _checked(query, key, value)
    m = key.shape[2]
    mask_strides = (0, 0, 0)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"the mask must be bool, not {mask.dtype}")
        mask = mask.expand(b, 1, n, m)
        mask_strides = (mask.stride(0), mask.stride(2), mask.stride(3))
    out = query.new_empty(b, hq, n, d)
    lse = query.new_empty(b, hq, n)
    done = library().se_attend_few(
        query.data_ptr(), query.stride(0), query.stride(1), query.stride(2),
        key.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
        value.data_ptr(), value.stride(0), value.stride(1), value.stride(2),
        mask.data_ptr() if mask is not None else None, *mask_strides,
        out.data_ptr(), lse.data_ptr(), b, hq, key.shape[1], n, m, d, _half(key), scale)
    if done != 0:
        raise MemoryError("the native decode kernel ran out of memory for its per-chunk states")
    return out, lse


def attend_two(first: Triple, second: Triple, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two key sets, each (query, key, value) as `attend_few` takes them with the same shapes but
    the number of keys: what merging their two partials gives, in one call (a decode step's neighbor keys and
    its grouped keys). Returns (output [b, hq, n, d], lse [b, hq, n])."""
    b, hq, n, d = first[0].shape
    if second[0].shape != first[0].shape or second[1].shape[:2] != first[1].shape[:2]:
        raise ValueError(f"the two key sets' queries {tuple(first[0].shape)}/{tuple(second[0].shape)} and key heads "
                         f"{tuple(first[1].shape[:2])}/{tuple(second[1].shape[:2])} must match")
    segments = [_checked(*part) for part in (first, second)]
    if first[1].dtype != second[1].dtype:
        raise ValueError(f"the two key sets must be held alike, not {first[1].dtype} and {second[1].dtype}")
    out = first[0].new_empty(b, hq, n, d)
    lse = first[0].new_empty(b, hq, n)
    args = []
    for query, key, value in segments:
        args += [query.data_ptr(), *query.stride()[:3], key.data_ptr(), *key.stride()[:3], value.data_ptr(),
                 *value.stride()[:3], key.shape[2]]
    done = library().se_attend_two(*args, out.data_ptr(), lse.data_ptr(), b, hq, first[1].shape[1], n, d,
                                   _half(first[1]), scale)
    if done != 0:
        raise MemoryError("the native decode kernel ran out of memory for its per-chunk states")
    return out, lse


KV_DTYPES = (torch.float32, torch.float16)  # what the kernel reads keys and values as (the KV cache's dtypes)


def _half(key: torch.Tensor) -> int:
    return int(key.dtype == torch.float16)


def _checked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """query, key, value as the kernel reads them (unit-stride heads), or ValueError saying what does not fit."""
    b, hq, n, d = query.shape
    hkv, m = key.shape[1], key.shape[2]
    if query.dtype != torch.float32 or key.dtype not in KV_DTYPES or value.dtype != key.dtype \
            or any(x.device.type != "cpu" for x in (query, key, value)):
        raise ValueError(f"the native decode kernel takes a float32 query and float32 or float16 keys and values "
                         f"alike, on CPU, not {query.dtype}/{key.dtype}/{value.dtype} on {query.device}")
    if key.shape != (b, hkv, m, d) or value.shape != key.shape or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} and key/value {tuple(key.shape)}/{tuple(value.shape)} do not "
                         f"fit [b, hq, n, d] and [b, hkv, m, d] with hkv dividing hq")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))


@torch.library.custom_op("selfextend::attend_few", mutates_args=())
def attend_few_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_few` as a torch operator, so a compiled model calls it without breaking its graph."""
    return attend_few(query, key, value, mask, scale)


@attend_few_op.register_fake
def _(query, key, value, mask, scale):
    b, hq, n, d = query.shape
    return query.new_empty(b, hq, n, d), query.new_empty(b, hq, n)


@torch.library.custom_op("selfextend::attend_two", mutates_args=())
def attend_two_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_2: torch.Tensor,
                  key_2: torch.Tensor, value_2: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_two` as a torch operator, so a compiled model calls it without breaking its graph."""
    return attend_two((query, key, value), (query_2, key_2, value_2), scale)


@attend_two_op.register_fake
def _(query, key, value, query_2, key_2, value_2, scale):
    b, hq, n, d = query.shape
    return query.new_empty(b, hq, n, d), query.new_empty(b, hq, n)
