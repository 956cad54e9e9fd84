"""The methods compared side by side: vanilla, SelfExtend, and transformers' training-free RoPE scalings.

`string` is STRING's position map (An et al., 2025), for inputs up to the training length.
A method is applied to a loaded model for one input length and undone afterwards, so one model serves
every method. `linear`, `dynamic` (NTK) and `yarn` take their frequencies from transformers' own
ROPE_INIT_FUNCTIONS with a factor fitted to the length (N / L, at least 1) unless one is given, and scale
only the layers SelfExtend would extend (Gemma 3's sliding-window layers stay as they are). `dynamic` is
frozen at the input's length, which is what one unchunked forward pass over the whole input would use.
`truncated` (perplexity only) is the floor without any extension: each token scored from a fresh window
of its last C - s .. C tokens (C = L and the stride s = C/4 by default); it leaves the model as it is.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

from transformers import PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..config import SPEC, check_request, training_length
from ..integration import apply_plan, remove
from ..planning import Plan, resolve
from ..positions import POSITION_MAPS
from ..rotary import find_rope, rope_parameters_of

ROPE_SCALINGS = ("linear", "dynamic", "yarn")
TRUNCATED = "truncated"
EVAL_METHODS = ("vanilla", *POSITION_MAPS, *ROPE_SCALINGS, TRUNCATED)
_PARAMETERS = {"vanilla": (), **{name: preset.symbols for name, preset in POSITION_MAPS.items()},
               **{name: ("factor",) for name in ROPE_SCALINGS}, TRUNCATED: ("C", "s")}
_SETTINGS = {symbol: setting for preset in POSITION_MAPS.values()  # a spec's G=.. -> group_size
             for symbol, setting in zip(preset.symbols, preset.settings)}


@dataclass(frozen=True)
class Method:
    """A method name and the parameters the user fixed; the rest are fitted to each length."""

    name: str
    fixed: dict = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, spec: str) -> "Method":
        """`yarn`, `linear:factor=4`, `selfextend:G=8,W=1024`, `string:S=10922,w=128`, `truncated:C=4096`."""
        name, _, rest = spec.strip().partition(":")
        if name not in EVAL_METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(EVAL_METHODS)}")
        fixed = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in _PARAMETERS[name] or not value:
                allowed = ", ".join(_PARAMETERS[name]) or "none"
                raise ValueError(f"bad parameter {item!r} for {name} (parameters: {allowed})")
            fixed[key] = float(value) if key == "factor" else int(value)
        if name == TRUNCATED and not 1 <= fixed.get("s", 1) < fixed.get("C", fixed.get("s", 1) + 1):
            raise ValueError(f"truncated needs 1 <= s < C, got {rest}")
        method = cls(name, fixed)
        if name in POSITION_MAPS:
            check_request(name, **method._settings, names=SPEC)
        return method

    @classmethod
    def parse_list(cls, text: str) -> list["Method"]:
        """`vanilla,selfextend:G=8,W=1024,yarn`: a bare key=value item continues the method before it."""
        specs: list[str] = []
        for item in (part.strip() for part in text.split(",")):
            if "=" in item and ":" not in item and specs:
                specs[-1] += "," + item
            elif item:
                specs.append(item)
        return [cls.parse(spec) for spec in specs]

    @property
    def spec(self) -> str:
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.fixed.items()) if self.fixed else "")

    @property
    def _settings(self) -> dict:
        return {_SETTINGS[key]: value for key, value in self.fixed.items()}

    def plan(self, model: PreTrainedModel, length: int, effective_length: int | None = None) -> Plan | None:
        """A position map's plan at `length` tokens (fixed settings, the rest planned against `effective_length`
        or the model's profile); None for the other methods."""
        if self.name not in POSITION_MAPS:
            return None
        planned_against = None if self.fixed or self.name == "string" else effective_length
        return resolve(model, length, method=self.name, **self._settings, effective_length=planned_against,
                       names=SPEC)

    def parameters(self, model: PreTrainedModel, length: int, effective_length: int | None = None) -> dict:
        """The parameters used at `length` tokens: the fixed ones, the others fitted (SelfExtend's by the
        planner, against `effective_length` or the model's measured profile)."""
        return self._parameters(model, length, self.plan(model, length, effective_length))

    def _parameters(self, model: PreTrainedModel, length: int, chosen: Plan | None) -> dict:
        if chosen is not None:
            labels = _PARAMETERS[self.name]
            return dict(zip(labels, (chosen.settings.own_settings[_SETTINGS[label]] for label in labels)))
        if self.name in ROPE_SCALINGS:
            return {"factor": self.fixed.get("factor", round(max(1.0, length / training_length(model)), 4))}
        if self.name == TRUNCATED:
            context = self.fixed.get("C", training_length(model))
            return {"C": context, "s": self.fixed.get("s", max(1, context // 4))}
        return {}


@contextlib.contextmanager
def applied(model: PreTrainedModel, method: Method, length: int,
            effective_length: int | None = None) -> Iterator[dict]:
    """`model` running `method` for inputs of `length` tokens, restored on exit; yields the parameters."""
    chosen = method.plan(model, length, effective_length)
    params = method._parameters(model, length, chosen)
    if chosen is not None:
        apply_plan(model, chosen)
        try:
            yield params
        finally:
            remove(model)
    elif method.name in ROPE_SCALINGS:
        with _rescaled_rope(model, method.name, params["factor"], training_length(model), length):
            yield params
    else:
        yield params


@contextlib.contextmanager
def _rescaled_rope(model: PreTrainedModel, rope_type: str, factor: float, train_length: int,
                   length: int) -> Iterator[None]:
    """Swap in the full-attention layers' frequencies (and attention scaling) of `rope_type` at `factor`."""
    text_config = model.config.get_text_config()
    source = find_rope(model, text_config)
    per_type = source.buffer != "inv_freq"
    layer_type = "full_attention" if per_type else None
    config = copy.deepcopy(text_config)
    scaled = {**rope_parameters_of(text_config), "rope_type": rope_type, "factor": factor,
              "original_max_position_embeddings": train_length}
    if per_type:
        config.rope_parameters = {**config.rope_parameters, layer_type: scaled}
    else:
        config.rope_parameters = scaled
    device = source.inv_freq().device
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=length, layer_type=layer_type)
    scaling_name = source.buffer.removesuffix("inv_freq") + "attention_scaling"
    saved = (source.inv_freq(), getattr(source.module, scaling_name))
    setattr(source.module, source.buffer, inv_freq.to(saved[0].dtype))
    setattr(source.module, scaling_name, scaling)
    try:
        yield
    finally:
        setattr(source.module, source.buffer, saved[0])
        setattr(source.module, scaling_name, saved[1])
