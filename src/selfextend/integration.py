"""Plugging SelfExtend into a `transformers` model through its attention and mask registries.

`apply` registers one attention function and one mask function under the name "selfextend" and
switches the model to it with `set_attn_implementation`; settings live on the model's attention
modules, so several models can carry different settings at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import KVLayout, layout_mask, resolve_backend, resolve_geometry
from .config import SelfExtendConfig, training_length
from .planning import InputTooLongError, plan, plan_for
from .rotary import GroupedRotation, UnsupportedModelError, find_rope

ATTENTION_NAME = "selfextend"
_STATE = "selfextend_state"
_PREVIOUS = "_selfextend_previous_attn_implementation"


@dataclass
class _State:
    config: SelfExtendConfig
    rotation: GroupedRotation
    warned_long: bool = False


def _attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: KVLayout | torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    sliding_window: int | None = None, softcap: float | None = None, position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function `transformers` calls for every layer once SelfExtend is applied."""
    state: _State | None = getattr(module, _STATE, None)
    if state is None:
        raise RuntimeError("this module was not prepared by selfextend.apply(); call apply() on the whole model")
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by SelfExtend attention")
    if dropout and module.training:
        raise NotImplementedError("SelfExtend attention is for inference: attention dropout is not supported")
    if attention_mask is not None and not isinstance(attention_mask, KVLayout):
        raise ValueError("SelfExtend needs the 2D padding mask, not a prepared 4D attention mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    geometry = resolve_geometry(attention_mask, position_ids, query.shape[0], query.shape[2], key.shape[2],
                                query.device)
    backend = resolve_backend(state.config.backend, query.device)
    window = sliding_window or (attention_mask.local_window if attention_mask is not None else None)
    if window is not None:
        return backend.local(query, key, value, geometry, window, scale), None
    _warn_if_too_long(state, geometry)
    return backend.selfextend(query, key, value, geometry, state.rotation, scale), None


def _warn_if_too_long(state: _State, geometry) -> None:
    if state.warned_long:
        return
    length = int(geometry.query_positions[:, -1].max()) + 1
    if length > state.config.max_length:
        state.warned_long = True
        try:
            chosen = plan(state.config.train_length, length, state.config.effective_length)
            suggestion = f"Try group_size={chosen.group_size}, window_size={chosen.window_size}."
        except InputTooLongError as error:
            suggestion = str(error)
        warnings.warn(
            f"input of {length} tokens exceeds the SelfExtend limit (L - W)·G + W = {state.config.max_length} "
            f"for G={state.config.group_size}, W={state.config.window_size}, L={state.config.train_length}; "
            f"positions past training will degrade output. {suggestion}",
            stacklevel=3,
        )


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, layout_mask)


def _attention_modules(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]


def apply(
    model: nn.Module, group_size: int | None = None, window_size: int | None = None, *, backend: str = "auto",
    input_length: int | None = None, effective_length: int | None = None,
) -> nn.Module:
    """Switch `model` (in place) to SelfExtend attention and return it.

    Give group_size and window_size, or neither and input_length to have them planned (against
    `effective_length` if given, else the model's measured profile, else its training length). Applying
    again replaces the settings. Sliding-window layers keep their window and RoPE.
    """
    text_config = model.config.get_text_config()
    rope = find_rope(model, text_config)
    train_length = training_length(model)
    if group_size is None and window_size is None:
        if input_length is None:
            raise ValueError("give group_size and window_size, or input_length to plan them")
        chosen = plan_for(model, input_length, effective_length)
        group_size, window_size, effective_length = chosen.group_size, chosen.window_size, chosen.effective_length
    elif group_size is None or window_size is None:
        raise ValueError("give both group_size and window_size, or neither (with input_length)")
    config = SelfExtendConfig(group_size, window_size, train_length, backend, effective_length)
    resolve_backend(backend, next(model.parameters()).device)  # fails early on an unknown name
    _register()
    state = _State(config, GroupedRotation(group_size, window_size, rope))
    modules = _attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention layers that SelfExtend recognises")
    for module in modules:
        setattr(module, _STATE, state)
    if not hasattr(model, _PREVIOUS):
        setattr(model, _PREVIOUS, model.config._attn_implementation)
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        remove(model)
        raise UnsupportedModelError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
        )
    return model


def remove(model: nn.Module) -> nn.Module:
    """Restore the model's own attention implementation; a model without SelfExtend is returned unchanged."""
    if not hasattr(model, _PREVIOUS):
        return model
    model.set_attn_implementation(getattr(model, _PREVIOUS))
    delattr(model, _PREVIOUS)
    for module in _attention_modules(model):
        if hasattr(module, _STATE):
            delattr(module, _STATE)
    return model


def settings(model: nn.Module) -> SelfExtendConfig | None:
    """The SelfExtend settings applied to `model`, or None."""
    for module in _attention_modules(model):
        state = getattr(module, _STATE, None)
        if state is not None:
            return state.config
    return None
