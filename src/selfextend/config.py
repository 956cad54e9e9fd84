"""The settings of a position map, and which settings are legal, alone and together: the one owner.

`SelfExtendConfig` holds one map's own settings (SelfExtend: group size G and window W; STRING: shifted
offset S and local window w), checked against the model's training length L, with the effective length
E they were planned against. `check_request` says which combinations a caller may give. Messages name
the settings as the caller spells them (`API`, `FLAGS`, `SPEC`). The planner (planning/) fills in what
the caller leaves open.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError
from .positions import POSITION_MAPS, FarPass, PositionMap

METHODS = tuple(POSITION_MAPS)  # the position maps a settings object can hold
DEFAULT_METHOD = "selfextend"  # named implicitly in one-line descriptions and older saved settings
CHOICES = ("auto", *METHODS)  # what a caller may ask for: auto lets the planner pick the map
CONFIG_KEY = "selfextend"  # where a model's config (and so config.json) keeps the settings
DEFAULT_LOCAL_WINDOW = 128  # STRING's local value w
MIN_PLANNING_LENGTH = 16  # below this there is no usable neighbor window


@dataclass(frozen=True)
class Spelling:
    """How a front end names the settings, so one message serves the library, the command line and eval."""

    group_size: str
    window_size: str
    shifted_offset: str
    local_window: str
    effective_length: str
    input_length: str
    method: str  # how to ask for a method, with {} for its name

    def ask(self, method: str) -> str:
        return self.method.format(method)


API = Spelling("group_size", "window_size", "shifted_offset", "local_window", "effective_length", "input_length",
               "method='{}'")
FLAGS = Spelling("--group-size", "--window", "--shifted-offset", "--local-window", "--effective-length", "--length",
                 "--method {}")
SPEC = Spelling("G", "W", "S", "w", "--effective-length", "--lengths", "{}:..")  # eval's method specs


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_effective_length(train_length: int, effective_length: int) -> int:
    """`effective_length` if it is a usable E for a model trained on `train_length`, else a clear error."""
    if isinstance(effective_length, bool) or not isinstance(effective_length, int):
        raise TypeError(f"effective length must be an integer number of tokens, got {effective_length!r}")
    if effective_length > train_length:
        raise ValueError(f"effective length {effective_length} is larger than the training length {train_length}: "
                         "a model does not handle more than it was trained on")
    if effective_length < MIN_PLANNING_LENGTH:
        raise ValueError(f"effective length {effective_length} is shorter than {MIN_PLANNING_LENGTH} tokens: too "
                         "short for any usable neighbor window")
    return effective_length


def check_method(method: str, choices: tuple[str, ...] = CHOICES) -> str:
    if method not in choices:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(choices)}")
    return method


def check_request(method: str, group_size=None, window_size=None, shifted_offset=None, local_window=None,
                  effective_length=None, names: Spelling = API) -> None:
    """Which settings a caller may give together (the values themselves are checked by SelfExtendConfig)."""
    check_method(method)
    pair = (group_size, window_size)
    if method == "string":
        if pair != (None, None):
            raise ValueError(f"STRING takes {names.shifted_offset} and {names.local_window}, not {names.group_size} "
                             f"and {names.window_size}")
        if effective_length is not None:
            raise ValueError(f"{names.effective_length} plans SelfExtend's G and W; STRING does not use it")
        return
    if (shifted_offset, local_window) != (None, None):
        raise ValueError(f"{names.shifted_offset} and {names.local_window} are STRING's settings: add "
                         f"{names.ask('string')}")
    if None in pair and pair != (None, None):
        raise ValueError(f"give both {names.group_size} and {names.window_size}, or neither to have them planned")
    if None not in pair and effective_length is not None:
        raise ValueError(f"{names.effective_length} plans G and W: give it or {names.group_size}/"
                         f"{names.window_size}, not both")


@dataclass(frozen=True)
class SelfExtendConfig:
    """One position map's settings for a model trained on `train_length` tokens, checked.

    `group_size` and `window_size` are the far pass's G and W for every map: SelfExtend's own settings,
    and for STRING 1 and S, filled in from its own `shifted_offset` and `local_window`. `effective_length`
    is the E they were planned against (None: the training length, or given by hand) and
    `effective_source` where E came from.
    """

    method: str
    train_length: int
    group_size: int | None = None
    window_size: int | None = None
    shifted_offset: int | None = None
    local_window: int | None = None
    effective_length: int | None = None
    effective_source: str | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_method(self.method, METHODS)
        own = self.own_settings
        for name, value in own.items():
            _check_positive_int(name, value)
        _CHECKS[self.method](self)
        far = self.far_pass
        for name in ("group_size", "window_size"):
            if name not in own:  # another map's G and W follow from its own settings
                given = getattr(self, name)
                if given is not None and given != getattr(far, name):
                    raise ValueError(f"{self.position_map.title} takes "
                                     f"{' and '.join(self.position_map.settings)}, not group_size and "
                                     "window_size")
                object.__setattr__(self, name, getattr(far, name))
        if self.effective_length is not None:
            check_effective_length(self.train_length, self.effective_length)

    @classmethod
    def string(cls, train_length: int, shifted_offset: int | None = None, local_window: int | None = None,
               backend: str = "auto", effective_length: int | None = None,
               effective_source: str | None = None) -> "SelfExtendConfig":
        """STRING's settings with its defaults filled in: S = L/3 and w = 128 (S/2 for models too short for it)."""
        shifted_offset = train_length // 3 if shifted_offset is None else shifted_offset
        if local_window is None and isinstance(shifted_offset, int):
            local_window = min(DEFAULT_LOCAL_WINDOW, max(1, shifted_offset // 2))
        return cls("string", train_length, shifted_offset=shifted_offset, local_window=local_window,
                   effective_length=effective_length, effective_source=effective_source, backend=backend)

    @property
    def own_settings(self) -> dict[str, int]:
        """The map's own settings by name, in its order (SelfExtend: group_size, window_size)."""
        return {name: getattr(self, name) for name in self.position_map.settings}

    @property
    def far_pass(self) -> FarPass:
        return self.position_map.far_pass(*self.own_settings.values())

    @property
    def offset(self) -> int:
        """The far pass's query offset c (SelfExtend: W - floor(W/G); STRING: w - S)."""
        return self.far_pass.offset

    @property
    def max_length(self) -> int:
        """Longest input it is meant for: (L - W)·G + W for SelfExtend; L for STRING, which does not extend."""
        return self.position_map.limit(self.train_length, *self.own_settings.values())

    def largest_position(self, length: int) -> int:
        """The largest RoPE position an input of `length` tokens uses."""
        return self.position_map.largest_position(length, *self.own_settings.values())

    def key(self) -> tuple:
        """What makes two settings attend alike (method, G, W, E, w): the prefix cache's and the server's key."""
        return self.method, self.group_size, self.window_size, self.effective_length, self.local_window

    @property
    def position_map(self) -> PositionMap:
        return POSITION_MAPS[self.method]

    def describe(self) -> str:
        """One line for people: `G=8, W=1024` or `STRING S=10922, w=128`."""
        values = ", ".join(f"{symbol}={value}" for symbol, value in zip(self.position_map.symbols,
                                                                         self.own_settings.values()))
        return values if self.method == DEFAULT_METHOD else f"{self.position_map.title} {values}"

    def to_json(self) -> dict:
        """The settings for JSON: method, the far pass's G and W, STRING's w, and E."""
        return {"method": self.method, "group_size": self.group_size, "window_size": self.window_size,
                "local_window": self.local_window, "effective_length": self.effective_length}

    def to_saved(self) -> dict:
        """What `config.selfextend` (so config.json) keeps: enough for `from_saved` to give these settings back."""
        saved = {"method": self.method, **self.own_settings}
        if self.effective_length is not None:
            saved["effective_length"] = self.effective_length
        return saved

    @classmethod
    def from_saved(cls, saved: dict, train_length: int, backend: str = "auto") -> "SelfExtendConfig":
        """The settings `to_saved` wrote (an older file without "method" is SelfExtend's), checked again."""
        method = check_method(saved.get("method", DEFAULT_METHOD), METHODS)
        known = {"method", "effective_length", *POSITION_MAPS[method].settings}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"config.{CONFIG_KEY} has settings {method} does not take: {', '.join(unknown)}")
        own = {name: saved.get(name) for name in POSITION_MAPS[method].settings}
        return cls(method, train_length, **own, effective_length=saved.get("effective_length"),
                   effective_source="saved" if saved.get("effective_length") is not None else None, backend=backend)


def _check_selfextend(config: SelfExtendConfig) -> None:
    if config.shifted_offset is not None or config.local_window is not None:
        raise ValueError("shifted_offset and local_window are STRING's settings; SelfExtend takes group_size and "
                         "window_size")
    if config.window_size >= config.train_length:
        raise ValueError(
            f"window_size ({config.window_size}) must be smaller than the model's training length "
            f"({config.train_length}): neighbor attention already covers every distance it was trained on"
        )


def _check_string(config: SelfExtendConfig) -> None:
    if config.shifted_offset >= config.train_length:
        raise ValueError(f"shifted_offset ({config.shifted_offset}) must be smaller than the model's training "
                         f"length ({config.train_length})")
    if config.local_window >= config.shifted_offset:
        raise ValueError(f"local_window ({config.local_window}) must be smaller than shifted_offset "
                         f"({config.shifted_offset})")


_CHECKS = {"selfextend": _check_selfextend, "string": _check_string}  # each map's own rules, beside its fields


def training_length(model_or_config) -> int:
    """The context length a model (or its config) was trained on: max_position_embeddings of the text config."""
    config = getattr(model_or_config, "config", model_or_config)
    length = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise UnsupportedModelError("the model config has no max_position_embeddings to extend")
    return length
