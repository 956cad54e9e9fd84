"""SelfExtend settings and their validation against a model's training length."""

from __future__ import annotations

from dataclasses import dataclass

from .positions import extended_limit, string_offset
from .rotary import UnsupportedModelError


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


METHODS = ("selfextend", "string")
DEFAULT_LOCAL_WINDOW = 128  # STRING's local value w


@dataclass(frozen=True)
class SelfExtendConfig:
    """Group size G, neighbor window W, the model's training length L they were checked against, and the
    effective length E they were planned against (None: planned against L, or given by hand).

    With method "string" it is STRING's map instead: G = 1, W = the shifted offset S, and `local_window`
    w, the relative position where far pairs start (positions.py).
    """

    group_size: int
    window_size: int
    train_length: int
    backend: str = "auto"
    effective_length: int | None = None
    method: str = "selfextend"
    local_window: int | None = None

    def __post_init__(self) -> None:
        _check_positive_int("group_size", self.group_size)
        _check_positive_int("window_size", self.window_size)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == "string":
            _check_positive_int("local_window", self.local_window)
            if self.group_size != 1:
                raise ValueError("STRING does not group positions: its group size is 1")
            if self.window_size >= self.train_length:
                raise ValueError(f"shifted_offset ({self.window_size}) must be smaller than the model's training "
                                 f"length ({self.train_length})")
            if self.local_window >= self.window_size:
                raise ValueError(f"local_window ({self.local_window}) must be smaller than shifted_offset "
                                 f"({self.window_size})")
        elif self.local_window is not None:
            raise ValueError("local_window is STRING's setting; SelfExtend takes group_size and window_size")
        if self.window_size >= self.train_length:
            raise ValueError(
                f"window_size ({self.window_size}) must be smaller than the model's training length "
                f"({self.train_length}): neighbor attention already covers every distance it was trained on"
            )

    @classmethod
    def string(cls, train_length: int, shifted_offset: int | None = None, local_window: int | None = None,
               backend: str = "auto") -> "SelfExtendConfig":
        """STRING's settings with its defaults filled in: S = L/3 and w = 128 (S/2 for models too short for it)."""
        shifted_offset = train_length // 3 if shifted_offset is None else shifted_offset
        if local_window is None and isinstance(shifted_offset, int):
            local_window = min(DEFAULT_LOCAL_WINDOW, max(1, shifted_offset // 2))
        return cls(1, shifted_offset, train_length, backend, None, "string", local_window)

    @property
    def offset(self) -> int | None:
        """The far pass's query offset c: STRING's w - S, or None for SelfExtend's own."""
        return string_offset(self.window_size, self.local_window) if self.method == "string" else None

    @property
    def max_length(self) -> int:
        """Longest input it is meant for: (L - W)·G + W for SelfExtend; L for STRING, which does not extend."""
        if self.method == "string":
            return self.train_length
        return extended_limit(self.train_length, self.group_size, self.window_size)


def training_length(model_or_config) -> int:
    """The context length a model (or its config) was trained on: max_position_embeddings of the text config."""
    config = getattr(model_or_config, "config", model_or_config)
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise UnsupportedModelError("the model config has no max_position_embeddings to extend")
    return length
