"""RoPE as a rotation: re-rotating vectors that a model has already rotated, and finding a model's RoPE.

Rotating a vector that was rotated at position p by a further `delta` gives the vector rotated at
p + delta, so SelfExtend's grouped queries and keys come from the model's own rotated ones.
All models handled use the "rotate half" layout of Hugging Face (pairs (x[k], x[k + d/2])).
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from . import rope_native
from .errors import NativeBuildError, UnsupportedModelError
from .positions import grouped_key_position, grouped_query_position


def rotation_tables(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of delta·inv_freq (angles in float64 before rounding), shaped [*delta.shape, d/2]."""
    angle = delta.to(torch.float64)[..., None] * inv_freq.to(device=delta.device, dtype=torch.float64)
    return angle.cos().float(), angle.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[k], x[k + d/2]) pair of x [batch, heads, n, d] by the angles in cos/sin [batch, 1, n, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(device=x.device, dtype=x.dtype), sin.to(device=x.device, dtype=x.dtype)
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        # out= has no autograd, and breaks compiled graphs: the plain form for training and compile
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty_like(x)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move x [batch, heads, n, d], rotated at some positions, by `delta` [batch, n] positions."""
    cos, sin = rotation_tables(delta, inv_freq)
    return rotate(x, cos[:, None], sin[:, None])


@cache
def native_turn() -> bool:
    """Whether a decode step's grouped rotations run in C (`rope_native.turn`): built here, and the same bits as
    `rotate` on probes of float32 and float16 rows (torch fuses addcmul_'s product into its sum where the CPU has
    fused multiply-add). If not, says once why they run in torch, a little slower."""
    try:
        rope_native.library()
    except NativeBuildError as error:
        warnings.warn(f"SelfExtend's decode-step rotations run on torch's operations, slower: {error}", stacklevel=3)
        return False
    generator = torch.Generator().manual_seed(0)
    for dtype, (b, h, n, d) in ((torch.float32, (1, 4, 1, 256)), (torch.float16, (2, 3, 5, 6))):
        x = (torch.randn(b, h, n, d, generator=generator) * 4).to(dtype)
        cos, sin = rotation_tables(torch.randint(-10**5, 10**5, (b, n), generator=generator),
                                   torch.rand(d // 2, generator=generator))
        if not torch.equal(rope_native.turn(x, cos, sin), _turn_in_torch(x, cos, sin)):
            warnings.warn("SelfExtend's decode-step rotations run on torch's operations, slower: the C rotation's "
                          "bits differ from torch's on this machine (please report it)", stacklevel=3)
            return False
    return True


def _turn_in_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, n, d] rotated by cos/sin [b, n, d/2] with torch's operations; float16 (a float16 KV cache's keys)
    rotated in float32 and rounded once."""
    if x.dtype == torch.float16:
        return rotate(x.float(), cos[:, None], sin[:, None]).to(x.dtype)
    return rotate(x, cos[:, None], sin[:, None])


def _rotate_half_reference(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


TABLE_BLOCK = 4096  # positions per block of cos/sin tables: built a block at a time, each always over the same
# positions, so a position's angles are the same bits whichever call first asks for them
KEPT_BLOCKS = 2  # blocks `angles` keeps per kind and device (a chunk's, a decode step's): O(block), not O(length)


class GroupedRotation:
    """Moves queries and keys from their own RoPE positions to the far pass's ones (positions.py's map).

    The shift depends only on the position, so its cos/sin are built in blocks of `TABLE_BLOCK` positions, per
    model and device (layers split over devices each get their device's, rebuilt if the inverse frequencies
    change), instead of at every layer and step. `angles` keeps the last few blocks only: a table for every
    position up to 40K would hold 134 MB for a head of 256, and its rebuild past 32K briefly twice that.
    """

    def __init__(self, group_size: int, window_size: int, rope: "RopeSource", offset: int | None = None) -> None:
        self.group_size, self.window_size, self.rope = group_size, window_size, rope
        self.offset = offset  # the far pass's query offset c; None: SelfExtend's W - floor(W/G)
        self._blocks: dict[tuple[str, torch.device], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # in use order
        self._tables: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._inv_freq: torch.Tensor | None = None
        self._seen: tuple[torch.Tensor, int | None] | None = None  # the inverse frequencies last compared, and
        # their version

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rope.inv_freq()

    def _shift(self, kind: str, positions: torch.Tensor) -> torch.Tensor:
        if kind == "query":
            return grouped_query_position(positions, self.group_size, self.window_size, self.offset) - positions
        return grouped_key_position(positions, self.group_size) - positions

    def _current(self) -> torch.Tensor:
        """The inverse frequencies, after dropping every block built from others (dynamic RoPE changes them)."""
        inv_freq = self.inv_freq
        # the same tensor, unwritten since, needs no comparing (a decode step asks at every layer); an inference
        # tensor keeps no count of its writes, so it is compared every time
        version = None if inv_freq.is_inference() else inv_freq._version
        seen = self._seen
        if version is not None and seen is not None and seen[0] is inv_freq and seen[1] == version:
            return inv_freq
        if self._inv_freq is None or not torch.equal(self._inv_freq, inv_freq.to(self._inv_freq.device)):
            self._blocks, self._tables, self._inv_freq = {}, {}, inv_freq.clone()
        self._seen = (inv_freq, version)
        return inv_freq

    def _block(self, kind: str, index: int, device: torch.device, inv_freq: torch.Tensor):
        """cos/sin [TABLE_BLOCK, d/2] of positions index·TABLE_BLOCK up to the next block."""
        positions = torch.arange(index * TABLE_BLOCK, (index + 1) * TABLE_BLOCK, device=device)
        return rotation_tables(self._shift(kind, positions), inv_freq.to(device))

    def _span(self, kind: str, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [stop - start, d/2] of positions start..stop, from the kept blocks (built where missing)."""
        inv_freq = self._current()
        kept = self._blocks.setdefault((kind, device), {})
        first = start // TABLE_BLOCK
        blocks = []
        for index in range(first, (stop - 1) // TABLE_BLOCK + 1):
            block = kept.pop(index, None) or self._block(kind, index, device, inv_freq)
            kept[index] = block  # the most recently used last
            blocks.append(block)
        while len(kept) > KEPT_BLOCKS:
            del kept[next(iter(kept))]
        rows = slice(start - first * TABLE_BLOCK, stop - first * TABLE_BLOCK)
        if len(blocks) == 1:
            return blocks[0][0][rows], blocks[0][1][rows]
        return torch.cat([cos for cos, _ in blocks])[rows], torch.cat([sin for _, sin in blocks])[rows]

    def table(self, kind: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [≥ size, d/2] of every position from 0, for a kernel that looks positions up itself (the vLLM
        plugin's paged one); kept per kind and device, grown by doubling, a block at a time."""
        inv_freq = self._current()
        cos, sin = self._tables.get((kind, device), (inv_freq.new_empty(0, 1), inv_freq.new_empty(0, 1)))
        if cos.shape[0] < size:
            have = cos.shape[0] // TABLE_BLOCK
            blocks = [self._block(kind, index, device, inv_freq)
                      for index in range(have, -(-max(size, 2 * cos.shape[0]) // TABLE_BLOCK))]
            cos = torch.cat(([cos] if have else []) + [c for c, _ in blocks])
            sin = torch.cat(([sin] if have else []) + [s for _, s in blocks])
            self._tables[(kind, device)] = (cos, sin)
        return cos, sin

    def angles(self, positions: torch.Tensor, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [b, n, d/2] moving vectors at `positions` [b, n] to their grouped `kind` positions."""
        if torch.compiler.is_compiling():  # traced: from the positions themselves, no kept blocks to guard on
            return rotation_tables(self._shift(kind, positions.clamp_min(0).to(device)), self.inv_freq.to(device))
        if positions.shape[0] == 1:  # one row of consecutive positions (item(): a decode step's one, quicker)
            start = positions.item() if positions.shape[1] == 1 else int(positions[0, 0])
            if start >= 0:
                return self._row(kind, start, positions.shape[1], device)
        index = positions.clamp_min(0).to(device)  # padded positions (< 0) are masked later: any angle will do
        low = int(index.min())
        cos, sin = self._span(kind, low, int(index.max()) + 1, device)
        return cos[index - low], sin[index - low]

    def _row(self, kind: str, start: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [1, n, d/2] of the n consecutive positions from `start` (>= 0)."""
        cos, sin = self._span(kind, start, start + n, device)
        return cos[None], sin[None]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor | int, kind: str) -> torch.Tensor:
        """Rotate x [b, h, n, d] (at `positions` [b, n], contiguous per row; or, for one row, at the n positions from
        an int >= 0) to its grouped `kind` positions. float16 (a float16 KV cache's keys) is rotated in float32 and
        rounded once."""
        cos, sin = self._row(kind, positions, x.shape[2], x.device) if isinstance(positions, int) else \
            self.angles(positions, kind, x.device)
        if rope_native.turns(x, cos, sin) and native_turn():  # a decode step's few: one C call, the same bits
            return rope_native.turn(x, cos, sin)
        return _turn_in_torch(x, cos, sin)


@dataclass(frozen=True)
class RopeSource:
    """Where the inverse frequencies of the extended layers live, read at call time (dynamic RoPE updates them)."""

    module: nn.Module
    buffer: str

    def inv_freq(self) -> torch.Tensor:
        return getattr(self.module, self.buffer)


def rope_parameters_of(text_config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of `layer_type` layers (configs like Gemma 3 keep one dict per layer type)."""
    parameters = getattr(text_config, "rope_parameters", None) or {}
    return parameters[layer_type] if isinstance(parameters.get(layer_type), dict) else parameters


CONFIG_ROPE_TYPES = ("default", "linear", "llama3")  # inverse frequencies that depend on the config alone


def rope_from_config(text_config, layer_type: str = "full_attention") -> RopeSource:
    """The inverse frequencies of `layer_type` layers computed from the config alone, as transformers computes
    them: for engines that run their own RoPE (vLLM). RoPE types whose frequencies follow the input length or
    `max_position_embeddings` (dynamic, yarn, longrope), partial rotary and M-RoPE are refused."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = rope_parameters_of(text_config, layer_type)
    rope_type = parameters.get("rope_type", "default")
    if "mrope_section" in parameters or rope_type == "mrope":
        raise UnsupportedModelError("multimodal RoPE (M-RoPE) is not supported by SelfExtend here")
    if rope_type not in CONFIG_ROPE_TYPES:
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported here: its frequencies depend on the "
                                    f"input or context length (supported: {', '.join(CONFIG_ROPE_TYPES)})")
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embedding is not supported")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if rope_type == "default":
        base = parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    else:
        config = text_config
        if layer_type in (getattr(text_config, "rope_parameters", None) or {}):  # per layer type: that one's
            config = copy.copy(text_config)
            config.rope_parameters = parameters
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    holder = nn.Module()
    holder.register_buffer("inv_freq", inv_freq, persistent=False)
    return RopeSource(holder, "inv_freq")


def find_rope(model: nn.Module, text_config, layer_type: str = "full_attention") -> RopeSource:
    """Locate the rotary embedding feeding the full-attention layers, or raise naming what is missing."""
    rope_parameters = rope_parameters_of(text_config, layer_type)
    if "mrope_section" in rope_parameters or rope_parameters.get("rope_type") == "mrope":
        raise UnsupportedModelError("multimodal RoPE (M-RoPE) is not supported by SelfExtend here")
    for module in model.modules():
        for name in (f"{layer_type}_inv_freq", "inv_freq"):
            if isinstance(getattr(module, name, None), torch.Tensor):
                source = RopeSource(module, name)
                _check_rotary_layout(model, source, text_config)
                return source
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary position embedding (RoPE); SelfExtend only extends RoPE models"
    )


def _check_rotary_layout(model: nn.Module, source: RopeSource, text_config) -> None:
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    rotary_dim = 2 * source.inv_freq().numel()
    if rotary_dim != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embedding ({rotary_dim} of {head_dim} head dimensions) is not supported"
        )
    modeling = sys.modules.get(type(model).__module__)
    model_rotate_half = getattr(modeling, "rotate_half", None)
    probe = torch.arange(1.0, head_dim + 1.0).reshape(1, 1, 1, head_dim)
    if model_rotate_half is None or not torch.equal(model_rotate_half(probe), _rotate_half_reference(probe)):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not use the rotate-half RoPE layout that SelfExtend re-rotates"
        )
