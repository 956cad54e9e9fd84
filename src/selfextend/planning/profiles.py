"""Effective-length profiles: what `selfextend calibrate` measured for one model, saved as JSON.

A profile is keyed by the model's identity, a hash of its architecture and of samples of every weight
tensor (rounded to bfloat16, so the same weights loaded in float32 or bfloat16 match; float16 may not).
It is looked up in the cache folder ($SELFEXTEND_HOME/profiles) first, then among the profiles this
package ships (the embedded default's). A corrupt or foreign file is ignored with a warning: a profile
is never used for a model it was not measured on.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..config import training_length
from ..identity import model_identity
from ..paths import cache_home

FORMAT = "selfextend-profile/1"
SHIPPED = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile file that cannot be read as a profile."""


@dataclass(frozen=True)
class Profile:
    """The effective length E measured for one model, and the measurements behind it."""

    identity: str
    model: str  # the name the model was calibrated under, for people; `identity` is what matches
    train_length: int
    effective_length: int
    threshold: float
    accuracy: dict[int, dict]  # probed length -> {"correct", "total", "passed"}
    probes: dict  # tasks, depths, seeds, chunk size, search settings
    created: str
    seconds: float
    stopped_by_budget: bool = False
    # method -> probed length -> {"correct", "total"}: SelfExtend and STRING compared inside L (calibrate --compare)
    methods: dict[str, dict[int, dict]] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    def as_json(self) -> dict:
        data = asdict(self)
        del data["path"]
        data["accuracy"] = {str(k): v for k, v in sorted(self.accuracy.items())}
        data["methods"] = {m: {str(k): v for k, v in sorted(a.items())} for m, a in sorted(self.methods.items())}
        return {"format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict, path: Path | None = None) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a {FORMAT} file")
        try:
            profile = cls(
                identity=str(data["identity"]), model=str(data["model"]), train_length=int(data["train_length"]),
                effective_length=int(data["effective_length"]), threshold=float(data["threshold"]),
                accuracy={int(k): dict(v) for k, v in data["accuracy"].items()}, probes=dict(data["probes"]),
                created=str(data["created"]), seconds=float(data["seconds"]),
                stopped_by_budget=bool(data.get("stopped_by_budget", False)),
                methods={str(m): {int(k): dict(v) for k, v in a.items()} for m, a in data.get("methods", {}).items()},
                path=path)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ProfileError(f"malformed profile: {error!r}") from error
        if not 0 < profile.effective_length <= profile.train_length:
            raise ProfileError(f"effective length {profile.effective_length} is outside 1..{profile.train_length}")
        return profile


def profile_dir() -> Path:
    """Where `selfextend calibrate` writes profiles: $SELFEXTEND_HOME/profiles."""
    return cache_home() / "profiles"


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    """Write `profile` (by default to the cache folder, named by identity); returns the path."""
    path = Path(path) if path is not None else profile_dir() / f"{profile.identity}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(profile.as_json(), indent=1) + "\n")
    partial.replace(path)
    return path


def load_profile(path: Path) -> Profile:
    """The profile in `path`; ProfileError if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProfileError(f"cannot read {path}: {error}") from error
    return Profile.from_json(data, Path(path))


def find_profile(model: nn.Module, folders: list[Path] | None = None) -> Profile | None:
    """The measured profile of `model` (cache folder first, then the shipped ones), or None."""
    identity = model_identity(model)
    for folder in folders if folders is not None else [profile_dir(), SHIPPED]:
        path = Path(folder) / f"{identity}.json"
        if not path.exists():
            continue
        try:
            profile = load_profile(path)
        except ProfileError as error:
            warnings.warn(f"ignoring effective-length profile {path}: {error}", stacklevel=2)
            continue
        if profile.identity != identity or profile.train_length != training_length(model):
            warnings.warn(f"ignoring effective-length profile {path}: it was measured on another model",
                          stacklevel=2)
            continue
        return profile
    return None
