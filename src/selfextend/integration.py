"""Plugging SelfExtend into a `transformers` model through its attention and mask registries.

Importing selfextend registers one attention function and one mask function under the name
"selfextend"; `apply` switches the model to it with `set_attn_implementation`. Settings live on the
model's attention modules, so several models can carry different settings at once, and in the
model's config (`config.selfextend`), so `save_pretrained` keeps them and a bare `apply(model)` on the
reloaded model restores them.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from transformers import AttentionInterface
from transformers import __version__ as transformers_version
from transformers.masking_utils import AttentionMaskInterface

from .attention import (KVLayout, grouped_key_count, layout_mask, packed_sequences, resolve_backend, resolve_geometry,
                        sequence_starts)
from .config import CONFIG_KEY, SelfExtendConfig, training_length
from .grouped_keys import GroupedKeys, cache_layer
from .errors import InputTooLongError, UnsupportedModelError
from .planning import Plan, plan, resolve
from .rotary import GroupedRotation, find_rope
from .transformers_compat import given_cache

ATTENTION_NAME = "selfextend"
_STATE = "selfextend_state"
_PREVIOUS = "_selfextend_previous_attn_implementation"
_HOOK = "_selfextend_hook"
_KEPT = "_selfextend_kept_keys"  # this call's GroupedKeys, set by the forward pre-hook


@dataclass
class _State:
    config: SelfExtendConfig
    rotation: GroupedRotation
    keep_grouped_keys: bool = True
    kept: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # cache layer -> GroupedKeys
    warned_long: bool = False
    warned_not_kept: bool = False


def _find_kept_keys(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the grouped keys kept for the cache layer this call will update, if any."""
    state: _State | None = getattr(module, _STATE, None)
    kept = None
    layer = cache_layer(given_cache(kwargs), module.layer_idx)
    sliding = getattr(layer, "is_sliding", False)  # a sliding-window layer's attention groups no keys
    if state is not None and state.keep_grouped_keys and layer is not None and not sliding \
            and not torch.compiler.is_compiling():
        kept = state.kept.get(layer)
        if kept is None or not kept.holds(getattr(layer, "keys", None)):
            kept = state.kept[layer] = GroupedKeys(getattr(layer, "capacity", None))
    setattr(module, _KEPT, kept)


def _attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: KVLayout | torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    sliding_window: int | None = None, softcap: float | None = None, position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function `transformers` calls for every layer once SelfExtend is applied."""
    state: _State | None = getattr(module, _STATE, None)
    if state is None:
        saved = getattr(module.config, CONFIG_KEY, None)
        hint = (f"selfextend.apply(model) restores the saved settings {saved}" if saved else
                "call selfextend.apply(model, group_size=G, window_size=W) or apply(model, input_length=N)")
        raise RuntimeError(f"attn_implementation='selfextend' needs SelfExtend applied to the loaded model: {hint}")
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by SelfExtend attention")
    if dropout and module.training:
        raise NotImplementedError("SelfExtend attention is for inference: attention dropout is not supported")
    if attention_mask is not None and not isinstance(attention_mask, KVLayout):
        raise ValueError("SelfExtend needs the 2D padding mask, not a prepared 4D attention mask")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    backend = resolve_backend(state.config.backend, query.device)
    if key.dtype != query.dtype and (not backend.reads_cache_dtypes or query.dtype != torch.float32):
        raise ValueError(f"the KV cache holds {key.dtype} for a {query.dtype} model: only the blockwise attention "
                         f"backend reads a cache in another dtype, for float32 models (backend "
                         f"{state.config.backend!r} on {query.device.type} here)")
    window = sliding_window or (attention_mask.local_window if attention_mask is not None else None)

    kept: GroupedKeys | None = getattr(module, _KEPT, None)
    if kept is not None:
        setattr(module, _KEPT, None)  # the cache layer may go away: keep no reference past this call
    b, n, m = query.shape[0], query.shape[2], key.shape[2]
    parts, geometry = _sequences(module.layer_idx, attention_mask, position_ids, kwargs.get("cu_seq_lens_q"), b, n, m,
                                 query.device)
    if parts is None:
        return _attend_sequence(state, backend, query, key, value, geometry, window, scale, kept, whole_call=True), None
    out = query.new_empty(b, n, query.shape[1], query.shape[3])
    for part in parts:  # packed: each sequence on its own, over its own keys only
        r = slice(part.row, part.row + 1)
        out[r, part.queries] = _attend_sequence(state, backend, query[r, :, part.queries], key[r, :, part.keys],
                                                value[r, :, part.keys], part.geometry, window, scale)
    return out, None


_SEQUENCES = threading.local()  # this thread's current forward pass: its sequences, by the layout its layers get


def _sequences(layer: int, layout: KVLayout | None, position_ids: torch.Tensor | None,
               cu_seq_lens: torch.Tensor | None, b: int, n: int, m: int, device: torch.device):
    """(packed sequences, None) or (None, geometry) of a call. The layers of one forward pass (layer indices
    rising) are given the same layout and position objects, so what those give is worked out once per pass."""
    if torch.compiler.is_compiling():
        return _sequences_of(layout, position_ids, cu_seq_lens, b, n, m, device)
    memo = getattr(_SEQUENCES, "memo", None)
    if memo is None or layer <= memo["layer"] or memo["position_ids"] is not position_ids \
            or memo["cu_seq_lens"] is not cu_seq_lens:
        memo = _SEQUENCES.memo = {"position_ids": position_ids, "cu_seq_lens": cu_seq_lens, "found": []}
    memo["layer"] = layer
    for given, shape, found in memo["found"]:
        if given is layout and shape == (b, n, m, device):
            return found
    found = _sequences_of(layout, position_ids, cu_seq_lens, b, n, m, device)
    memo["found"] = memo["found"][-3:] + [(layout, (b, n, m, device), found)]
    return found


def _sequences_of(layout, position_ids, cu_seq_lens, b, n, m, device):
    layout = layout or KVLayout(q_offset=m - n, kv_offset=0)
    starts = sequence_starts(layout, position_ids, b, n, m, device, cu_seq_lens)
    parts = packed_sequences(layout, starts, device)
    return parts, None if parts is not None else resolve_geometry(layout, None, b, n, m, device, starts)


def _attend_sequence(state: _State, backend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, geometry,
                     window: int | None, scale: float, kept: GroupedKeys | None = None,
                     whole_call: bool = False) -> torch.Tensor:
    """Attention of rows holding one sequence each: the layer's sliding window, or the position map (with the
    grouped keys kept beside the cache, where a whole call of one unpadded sequence can use them)."""
    if window is not None:
        return backend.local(query, key, value, geometry, window, scale)
    _warn_if_too_long(state, geometry)
    key_grouped = None
    n_grouped = grouped_key_count(geometry, query.shape[2], key.shape[2], state.rotation.window_size)
    if whole_call and n_grouped and geometry.valid is None and query.shape[0] == 1:  # where kept keys serve
        if kept is not None:
            key_grouped = kept.extend(key, geometry, state.rotation, n_grouped)
        elif state.keep_grouped_keys and key.shape[2] > query.shape[2] and not torch.compiler.is_compiling():
            _warn_not_kept(state)
    return backend.selfextend(query, key, value, geometry, state.rotation, scale, key_grouped)


def _warn_not_kept(state: _State) -> None:
    """Say once that kept grouped keys were asked for but this model's calls do not let us find its KV cache."""
    if state.warned_not_kept:
        return
    state.warned_not_kept = True
    warnings.warn(f"SelfExtend keeps grouped keys beside the KV cache, but the attention layers were not given a "
                  f"cache it recognises (transformers {transformers_version}): every call rotates all its keys "
                  f"again, which slows decoding. Please report this; apply(..., keep_grouped_keys=False) silences "
                  f"this warning.", stacklevel=3)


def _warn_if_too_long(state: _State, geometry) -> None:
    if state.warned_long:
        return
    length = int(geometry.query_positions[:, -1].max()) + 1
    config = state.config
    if length > config.max_length:
        state.warned_long = True
        try:
            chosen = plan(config.train_length, length, config.effective_length)
            suggestion = f"Try group_size={chosen.group_size}, window_size={chosen.window_size}."
        except InputTooLongError as error:
            suggestion = str(error)
        if config.method == "string":
            what = (f"the training length L = {config.train_length}, past which STRING does not extend; "
                    f"positions past training will degrade output. SelfExtend reads longer inputs:")
        else:
            what = (f"the SelfExtend limit (L - W)·G + W = {config.max_length} for G={config.group_size}, "
                    f"W={config.window_size}, L={config.train_length}; positions past training will degrade output.")
        warnings.warn(f"input of {length} tokens exceeds {what} {suggestion}", stacklevel=3)


AttentionInterface.register(ATTENTION_NAME, _attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, layout_mask)


def _attention_modules(model: nn.Module):
    """The modules that call the attention function: those with a layer index and a config that hold no such
    module themselves (a decoder layer has both too, and holds its attention module)."""
    def indexed(module: nn.Module) -> bool:
        return hasattr(module, "layer_idx") and hasattr(module, "config")

    return [m for m in model.modules() if indexed(m) and not any(indexed(c) for c in m.modules() if c is not m)]


def apply(
    model: nn.Module, group_size: int | None = None, window_size: int | None = None, *, method: str = "selfextend",
    shifted_offset: int | None = None, local_window: int | None = None, backend: str = "auto",
    input_length: int | None = None, effective_length: int | None = None, keep_grouped_keys: bool = True,
) -> nn.Module:
    """Switch `model` (in place) to SelfExtend attention and return it.

    Give group_size and window_size, or neither and input_length to have them planned (against
    `effective_length` if given, else the model's measured profile, else its training length), or
    nothing to restore the settings saved in the model's config. With group_size and window_size,
    `effective_length` records the E they were planned against. Applying again replaces the settings.
    method="string" maps positions by STRING instead (shifted_offset S, default L/3; local_window w,
    default min(128, S/2)); it does not extend past the training length; method="auto" lets the planner
    choose by the model's profile. Sliding-window layers keep their window and RoPE. keep_grouped_keys
    keeps each full-attention layer's grouped keys beside its KV cache (one more key tensor per layer),
    so a decode step rotates only its new keys.
    """
    rope = find_rope(model, model.config.get_text_config())
    saved = getattr(model.config, CONFIG_KEY, None)
    given = (group_size, window_size, shifted_offset, local_window, input_length, effective_length)
    if method == "selfextend" and given == (None,) * 6 and isinstance(saved, dict):
        config = SelfExtendConfig.from_saved(saved, training_length(model), backend)
    else:
        recorded = effective_length if group_size is not None or window_size is not None else None
        chosen = resolve(model, input_length, method=method, group_size=group_size, window_size=window_size,
                         shifted_offset=shifted_offset, local_window=local_window, backend=backend,
                         effective_length=None if recorded is not None else effective_length)
        config = chosen.settings
        if recorded is not None:
            config = replace(config, effective_length=recorded, effective_source="given")
    return _install(model, config, rope, keep_grouped_keys)


def apply_plan(model: nn.Module, chosen: Plan, backend: str = "auto", keep_grouped_keys: bool = True) -> nn.Module:
    """Apply the settings a plan holds."""
    rope = find_rope(model, model.config.get_text_config())
    return _install(model, replace(chosen.settings, backend=backend), rope, keep_grouped_keys)


def _install(model: nn.Module, config: SelfExtendConfig, rope, keep_grouped_keys: bool) -> nn.Module:
    """Put `config` on every attention module and switch the model to the "selfextend" attention function."""
    device = next(model.parameters()).device
    backend = resolve_backend(config.backend, device)  # fails early on an unknown name
    if backend.prepare is not None:
        backend.prepare(device)
    far = config.far_pass
    state = _State(config, GroupedRotation(far.group_size, far.window_size, rope, far.offset), keep_grouped_keys)
    modules = _attention_modules(model)
    if not modules:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention layers that SelfExtend recognises")
    for module in modules:
        setattr(module, _STATE, state)
        # a sliding-window layer's attention groups no keys (its calls pass the window): no kept keys to find, and
        # no hook to make each of its calls take torch's slower path for modules with hooks
        if not hasattr(module, _HOOK) and not getattr(module, "sliding_window", None):
            setattr(module, _HOOK, module.register_forward_pre_hook(_find_kept_keys, with_kwargs=True))
    if not hasattr(model, _PREVIOUS):  # loaded with attn_implementation="selfextend": remove() goes to SDPA
        previous = model.config._attn_implementation
        setattr(model, _PREVIOUS, "sdpa" if previous == ATTENTION_NAME else previous)
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        remove(model)
        raise UnsupportedModelError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
        )
    setattr(model.config, CONFIG_KEY, config.to_saved())
    return model


def remove(model: nn.Module) -> nn.Module:
    """Restore the model's own attention implementation; a model without SelfExtend is returned unchanged."""
    if not hasattr(model, _PREVIOUS):
        return model
    model.set_attn_implementation(getattr(model, _PREVIOUS))
    delattr(model, _PREVIOUS)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    for module in _attention_modules(model):
        for name in (_STATE, _KEPT):
            if hasattr(module, name):
                delattr(module, name)
        if hasattr(module, _HOOK):
            getattr(module, _HOOK).remove()
            delattr(module, _HOOK)
    return model


def settings(model: nn.Module) -> SelfExtendConfig | None:
    """The SelfExtend settings applied to `model`, or None."""
    for module in _attention_modules(model):
        state = getattr(module, _STATE, None)
        if state is not None:
            return state.config
    return None
