"""SelfExtend over a paged KV cache in one C call per layer (`paged_native.c`), for float32 on CPU.

The same attention as `paged.paged_attention`, for rows laid out as an engine's step holds them: the step's
tokens one after another, row r's queries at tokens query_start[r]:query_start[r + 1] (its last ones), its
keys in the blocks of block_table[r]. The torch kernel spends a decode step's time on a chain of small
operations and on building its index plan; this reads the block table and the cache directly, and writes each
query's output in place. Built on first use with the system's C compiler (`selfextend.native`).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ..native import load
from ..rotary import GroupedRotation

SOURCE = Path(__file__).with_name("paged_native.c")
# Prefill chunks worth this kernel: those of rows of up to this many keys. Past it the blockwise kernel's matrix
# products make up for its fixed cost per request (benchmarks/paged_native_crossover.py); decode rows always are.
NATIVE_KEYS = 1024
_P, _I = ctypes.c_void_p, ctypes.c_int64


@cache
def library() -> ctypes.CDLL:
    """The compiled kernels (raises `NativeBuildError` when they cannot be built here)."""
    lib = load(SOURCE)
    lib.se_paged_attention.restype = _I
    lib.se_paged_attention.argtypes = [_P, _I, _I, _P, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P, _I, _P, _P, _P, _I,
                                       _I, _I, _I, _I, _P, _P, _P, _P, _I, ctypes.c_float]
    lib.se_write_grouped.restype = _I
    lib.se_write_grouped.argtypes = [_P, _I, _I, _P, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I]
    return lib


def _check(name: str, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    if x.dtype != dtype or x.device.type != "cpu":
        raise ValueError(f"the native paged kernel takes {name} as {dtype} on CPU, not {x.dtype} on {x.device}")


def _blocks(name: str, x: torch.Tensor, rows: int, columns: int) -> None:
    """Per block and head, a contiguous [rows, columns] matrix."""
    _check(name, x)
    if x.stride(-1) != 1 or x.stride(-2) != columns or x.shape[-2:] != (rows, columns):
        raise ValueError(f"{name}: each block and head must be a contiguous [{rows}, {columns}] matrix")


def _indices(x: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return x.to(dtype).contiguous()


@dataclass(frozen=True)
class NativeStep:
    """A step's rows as the native kernels read them, built once per step and shared by every layer: the index
    tensors in the kernels' dtypes and the rotation tables up to the step's longest row (kept alive here: the
    kernels get their addresses)."""

    block_table: torch.Tensor  # [requests, ≥ blocks] int32
    seq_lens: torch.Tensor  # [requests] int32: keys of each request, its queries last
    query_start: torch.Tensor  # [requests + 1] int32: request r's queries are tokens query_start[r]:[r + 1]
    rows: torch.Tensor  # int32: the requests the attention kernel computes
    slots: torch.Tensor | None  # [tokens] int64: where each token's key was written (< 0: not written)
    tables: tuple[torch.Tensor, ...]  # query cos, sin; key cos, sin [positions, d/2]
    window: int


def native_step(block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, rows: torch.Tensor,
                rotation: GroupedRotation, slots: torch.Tensor | None = None) -> NativeStep:
    """The `NativeStep` of a step whose request r has seq_lens[r] keys in the blocks of block_table[r], the last
    of them its queries, tokens query_start[r]:query_start[r + 1] of the step; `rows`: those to attend."""
    lengths = _indices(seq_lens)
    size = int(lengths.max()) + 1 if len(lengths) else 1
    tables = tuple(t.contiguous() for kind in ("query", "key") for t in rotation.table(kind, size, torch.device("cpu")))
    for t in tables:
        _check("the rotation tables", t)
    return NativeStep(_indices(block_table), lengths, _indices(query_start), _indices(rows),
                      None if slots is None else _indices(slots, torch.int64), tables, rotation.window_size)


def native_paged_attention(query: torch.Tensor, output: torch.Tensor, key_blocks: torch.Tensor,
                           value_blocks: torch.Tensor, step: NativeStep, scale: float,
                           grouped_blocks: torch.Tensor | None = None) -> int:
    """Write into output [tokens, query_heads, d] the SelfExtend attention of the step's rows' queries (query
    [tokens, query_heads, d], rotated at their positions) over their keys, read from the blocks.

    key_blocks [n_blocks, heads, d, block_size] (each block's keys transposed), value_blocks
    [n_blocks, heads, block_size, d] with the keys' block and head strides; grouped_blocks like key_blocks: the
    keys at their grouped positions (kept by the engine), or None to rotate the keys read here. Returns the
    keys rotated here (0 with grouped_blocks)."""
    n_blocks, heads, dim, block_size = key_blocks.shape
    query_heads = query.shape[1]
    _blocks("key_blocks", key_blocks, dim, block_size)
    _blocks("value_blocks", value_blocks, block_size, dim)
    if value_blocks.stride()[:2] != key_blocks.stride()[:2]:
        raise ValueError("key_blocks and value_blocks must share their block and head strides")
    for name, x in (("query", query), ("output", output)):
        _check(name, x)
        if x.stride(-1) != 1 or x.shape[1:] != (query_heads, dim):
            raise ValueError(f"{name} must be [tokens, {query_heads}, {dim}], unit stride in the last dimension")
    if query_heads % heads or dim % 2:
        raise ValueError(f"{query_heads} query heads over {heads} KV heads of dimension {dim}: not a GQA layout")
    if grouped_blocks is not None:
        _blocks("grouped_blocks", grouped_blocks, dim, block_size)
    rotated = library().se_paged_attention(
        query.data_ptr(), query.stride(0), query.stride(1), output.data_ptr(), output.stride(0), output.stride(1),
        key_blocks.data_ptr(), value_blocks.data_ptr(), key_blocks.stride(0), key_blocks.stride(1),
        None if grouped_blocks is None else grouped_blocks.data_ptr(),
        *((0, 0) if grouped_blocks is None else grouped_blocks.stride()[:2]),
        step.block_table.data_ptr(), step.block_table.stride(0), step.seq_lens.data_ptr(),
        step.query_start.data_ptr(), step.rows.data_ptr(), len(step.rows), query_heads, heads, dim, block_size,
        *(t.data_ptr() for t in step.tables), step.window, scale)
    if rotated < 0:
        raise MemoryError("the native paged kernel could not allocate its scratch memory")
    return rotated


def write_grouped_keys(key: torch.Tensor, step: NativeStep, grouped_blocks: torch.Tensor) -> int:
    """Store the grouped form of the step's new keys [tokens, heads, d] (rotated at their positions: request
    r's are its last ones) in `grouped_blocks` [n_blocks, heads, d, block_size] at the step's slots
    (block · block_size + offset; negative: not written, skipped). Returns the keys written."""
    n_blocks, heads, dim, block_size = grouped_blocks.shape
    _blocks("grouped_blocks", grouped_blocks, dim, block_size)
    _check("key", key)
    if key.stride(-1) != 1 or key.shape[1:] != (heads, dim) or dim > 1024:
        raise ValueError(f"key must be [tokens, {heads}, {dim} ≤ 1024], unit stride in the last dimension")
    tokens = int(step.query_start[-1])
    if step.slots is None or tokens > min(len(step.slots), key.shape[0]):
        raise ValueError(f"{tokens} tokens in query_start, but {0 if step.slots is None else len(step.slots)} "
                         f"slots and {key.shape[0]} keys")
    return library().se_write_grouped(key.data_ptr(), key.stride(0), key.stride(1), step.slots.data_ptr(),
                                      step.query_start.data_ptr(), step.seq_lens.data_ptr(), len(step.seq_lens),
                                      step.tables[2].data_ptr(), step.tables[3].data_ptr(), grouped_blocks.data_ptr(),
                                      grouped_blocks.stride(0), grouped_blocks.stride(1), heads, dim, block_size)
