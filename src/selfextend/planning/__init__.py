"""Planning G and W: the formula (plan.py), measured effective lengths (profiles.py, calibration.py).

`plan_for` is the one path every caller takes (apply, generate, plan, eval, the server): an effective
length given by the caller wins, else the model's measured profile, else the training length.
"""

from __future__ import annotations

from torch import nn

from ..config import training_length
from .plan import MAX_GROUP, InputTooLongError, Plan, check_effective_length, longest_input, plan
from .profiles import Profile, ProfileError, find_profile, load_profile, model_identity, profile_dir, save_profile


def effective_length_of(model: nn.Module, effective_length: int | None = None) -> tuple[int | None, str | None]:
    """E to plan against and where it came from: the given one, else the model's measured profile, else none."""
    if effective_length is not None:
        return effective_length, "given"
    profile = find_profile(model)
    if profile is None:
        return None, None
    return profile.effective_length, f"measured, {profile.path.name}"


def plan_for(model: nn.Module, input_length: int, effective_length: int | None = None) -> Plan:
    """G and W for `input_length` tokens on `model`, planned against the length it really handles."""
    return plan(training_length(model), input_length, *effective_length_of(model, effective_length))


__all__ = ["MAX_GROUP", "InputTooLongError", "Plan", "Profile", "ProfileError", "check_effective_length",
           "effective_length_of", "find_profile", "longest_input", "load_profile", "model_identity", "plan", "plan_for",
           "profile_dir", "save_profile"]
