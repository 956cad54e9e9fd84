"""SelfExtend settings and their validation against a model's training length."""

from __future__ import annotations

from dataclasses import dataclass

from .positions import extended_limit
from .rotary import UnsupportedModelError


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class SelfExtendConfig:
    """Group size G, neighbor window W, the model's training length L they were checked against, and the
    effective length E they were planned against (None: planned against L, or given by hand)."""

    group_size: int
    window_size: int
    train_length: int
    backend: str = "auto"
    effective_length: int | None = None

    def __post_init__(self) -> None:
        _check_positive_int("group_size", self.group_size)
        _check_positive_int("window_size", self.window_size)
        if self.window_size >= self.train_length:
            raise ValueError(
                f"window_size ({self.window_size}) must be smaller than the model's training length "
                f"({self.train_length}): neighbor attention already covers every distance it was trained on"
            )

    @property
    def max_length(self) -> int:
        """Longest input whose positions stay within training: (L - W)·G + W."""
        return extended_limit(self.train_length, self.group_size, self.window_size)


def training_length(model_or_config) -> int:
    """The context length a model (or its config) was trained on: max_position_embeddings of the text config."""
    config = getattr(model_or_config, "config", model_or_config)
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise UnsupportedModelError("the model config has no max_position_embeddings to extend")
    return length
