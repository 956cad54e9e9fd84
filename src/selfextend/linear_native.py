"""Float32 activations times int8 weights in blocks of 32 (one scale each), in C (`linear_native.c`), on CPU.

A decode step is a chain of matrix-vector products that read every weight once, so its speed on a CPU is the
bytes of weights per token. torch's int8 and int4 weight-only kernels are slower than float32 on AVX2 cores and
its dynamic int8 rounds the activations too (benchmarks/weight_kernels.py); this reads 1.0625 bytes per weight
and keeps the activations and every sum in float32. Calls of up to `NATIVE_TOKENS` tokens run in C; longer ones
(prefill, which is compute-bound) widen the weights a slice of rows at a time, in C, for torch's matrix product. Built
on first use with the system's C compiler (`selfextend.native`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .allocator import huge_page_empty
from .native import load

SOURCE = Path(__file__).with_name("linear_native.c")
QBLOCK = 32  # weights per scale, along the input (the C source's QBLOCK)
NATIVE_TOKENS = 16  # calls of up to this many tokens take the C kernel; longer ones torch's matrix product
SCALE_LIMIT = 127 * torch.finfo(torch.float16).max  # the largest weight magnitude a float16 scale holds
SMALLEST_SCALE = 2.0 ** -24  # the smallest float16 (a subnormal): the scale of a block of zeros
WIDEN_BYTES = 32 << 20  # float32 weights widened at a time for a long call's matrix product
_P, _I = ctypes.c_void_p, ctypes.c_int64


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel (raises `NativeBuildError` when it cannot be built here)."""
    lib = load(SOURCE)
    lib.se_linear_int8.restype = None
    lib.se_linear_int8.argtypes = [_P, _I, _I, _P, _P, _I, _I, _P, _P, _I]
    lib.se_widen_int8.restype = None
    lib.se_widen_int8.argtypes = [_P, _P, _I, _I, _P]
    return lib


@dataclass(frozen=True)
class Int8Blocks:
    """Weights [out, in] as int8 `rows` and float16 `scale` [out, ceil(in / QBLOCK)]: row r, input k weighs
    scale[r, k // QBLOCK] * rows[r, k] (llama.cpp's Q8_0: a GGUF's Q8_0 tensor is held exactly)."""

    rows: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        out_rows, inputs = self.rows.shape
        blocks = -(-inputs // QBLOCK)
        if self.rows.dtype != torch.int8 or not self.rows.is_contiguous() or self.scale.dtype != torch.float16 \
                or self.scale.shape != (out_rows, blocks) or not self.scale.is_contiguous():
            raise ValueError(f"int8 blocks: contiguous int8 rows [{out_rows}, {inputs}] and float16 scales "
                             f"[{out_rows}, {blocks}], got {self.rows.dtype} and {self.scale.dtype} "
                             f"{tuple(self.scale.shape)}")

    @classmethod
    def quantize(cls, weight: torch.Tensor, chunk: int = 4096,
                 done: Callable[[torch.Tensor], None] | None = None) -> Int8Blocks:
        """Symmetric int8 per block of `QBLOCK` inputs, each block on its largest magnitude / 127 (rounded to
        float16; the smallest float16 at least, so the tiniest blocks clip at ±127 codes). In chunks of rows, so a
        large embedding needs no float copy of itself; `done` is given each chunk of `weight` read."""
        out_rows, inputs = weight.shape
        blocks = -(-inputs // QBLOCK)
        rows = huge_page_empty(weight.shape, torch.int8)  # streamed at every decode step
        scale = huge_page_empty((out_rows, blocks), torch.float16)  # the LM head's: 10 MB
        for start in range(0, out_rows, chunk):
            part = weight[start:start + chunk].float()
            padded = torch.nn.functional.pad(part, (0, blocks * QBLOCK - inputs)).view(len(part), blocks, QBLOCK)
            largest = padded.abs().amax(dim=2)
            if not bool(largest.le(SCALE_LIMIT).all()):
                raise ValueError(f"int8 blocks hold weights up to {SCALE_LIMIT:.3g} in magnitude (float16 scales), "
                                 f"got {float(largest.max()):.3g}: load these weights dense")
            part_scale = (largest / 127).to(torch.float16).clamp(min=SMALLEST_SCALE)
            scale[start:start + chunk] = part_scale
            codes = torch.round(padded / part_scale.float()[:, :, None]).clamp(-127, 127)
            rows[start:start + chunk] = codes.view(len(part), -1)[:, :inputs]
            if done is not None:
                done(weight[start:start + chunk])
        return cls(rows, scale)

    def widen(self, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop as the float32 weights they stand for (in C, one pass), written into `out`'s first rows
        if given (contiguous float32 with room for them)."""
        rows, scale = self.rows[start:stop], self.scale[start:stop]
        shape = rows.shape
        if out is None:
            out = torch.empty(shape)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.shape[1:] != shape[1:] \
                or len(out) < shape[0]:
            raise ValueError(f"widening needs contiguous float32 room for {tuple(shape)}, got {out.dtype} "
                             f"{tuple(out.shape)}")
        library().se_widen_int8(rows.data_ptr(), scale.data_ptr(), shape[0], shape[1], out.data_ptr())
        return out[:shape[0]]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows of `ids` (an embedding's lookup), widened as `widen` widens them."""
        flat = ids.reshape(-1)
        return Int8Blocks(self.rows[flat], self.scale[flat]).widen().view(*ids.shape, self.rows.shape[1])


def linear(x: torch.Tensor, weights: Int8Blocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] float32 times the weights [out, in], plus bias [out]: [..., out] float32."""
    # a decode step makes 127 of these calls: every torch call here is counted (a shape passed as a torch.Size
    # costs as much as the C call's own overhead)
    out_rows, inputs = weights.rows.shape
    if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != inputs:
        raise TypeError(f"int8 weights [{out_rows}, {inputs}] take float32 CPU inputs of {inputs} features, got "
                        f"{x.dtype} on {x.device} of {x.shape[-1]}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_rows,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous float32 [{out_rows}], got {bias.dtype} {tuple(bias.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    tokens = x.numel() // inputs
    out = torch.empty(*x.shape[:-1], out_rows)
    if tokens <= NATIVE_TOKENS:
        library().se_linear_int8(x.data_ptr(), tokens, inputs, weights.rows.data_ptr(), weights.scale.data_ptr(),
                                 out_rows, inputs, None if bias is None else bias.data_ptr(), out.data_ptr(),
                                 out_rows)
        return out
    flat, flat_out = x.view(tokens, inputs), out.view(tokens, out_rows)
    step = min(out_rows, max(1, WIDEN_BYTES // (4 * inputs)))
    if step == out_rows:  # the whole product at once, straight into `out`
        torch.mm(flat, weights.widen().T, out=flat_out)
    else:
        widened = torch.empty(step, inputs)  # one slice's room, used for every slice
        for start in range(0, out_rows, step):
            flat_out[:, start:start + step] = flat @ weights.widen(start, start + step, widened).T
    if bias is not None:
        flat_out += bias
    return out
