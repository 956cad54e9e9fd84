"""RoPE as a rotation: re-rotating vectors that a model has already rotated, and finding a model's RoPE.

Rotating a vector that was rotated at position p by a further `delta` gives the vector rotated at
p + delta, so SelfExtend's grouped queries and keys come from the model's own rotated ones.
All models handled use the "rotate half" layout of Hugging Face (pairs (x[k], x[k + d/2])).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model cannot take SelfExtend; the message names the reason."""


def rotation_tables(delta: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of delta·inv_freq, shaped [batch, 1, n, d/2] for broadcasting over heads."""
    angle = delta.to(torch.float64)[..., None] * inv_freq.to(device=delta.device, dtype=torch.float64)
    return angle.cos().float()[:, None], angle.sin().float()[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[k], x[k + d/2]) pair of x [batch, heads, n, d] by the angles in cos/sin [batch, 1, n, d/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move x [batch, heads, n, d], rotated at some positions, by `delta` [batch, n] positions."""
    return rotate(x, *rotation_tables(delta, inv_freq))


def _rotate_half_reference(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True)
class RopeSource:
    """Where the inverse frequencies of the extended layers live, read at call time (dynamic RoPE updates them)."""

    module: nn.Module
    buffer: str

    def inv_freq(self) -> torch.Tensor:
        return getattr(self.module, self.buffer)


def find_rope(model: nn.Module, text_config, layer_type: str = "full_attention") -> RopeSource:
    """Locate the rotary embedding feeding the full-attention layers, or raise naming what is missing."""
    rope_parameters = getattr(text_config, "rope_parameters", None) or {}
    if isinstance(rope_parameters.get(layer_type), dict):
        rope_parameters = rope_parameters[layer_type]
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
