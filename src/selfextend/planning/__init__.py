"""Planning G and W: the formula (plan.py), measured effective lengths (profiles.py, calibration.py).

`plan_for` is the one path every caller takes for SelfExtend's G and W (apply, generate, plan, eval, the
server): an effective length given by the caller wins, else the model's measured profile, else the
training length. `choose_for` also picks the method (SelfExtend or STRING) by the profile's comparison.
"""

from __future__ import annotations

from torch import nn

from ..config import training_length
from .choice import choose, string_plan
from .plan import MAX_GROUP, InputTooLongError, Plan, check_effective_length, longest_input, plan, plan_with
from .profiles import Profile, ProfileError, find_profile, load_profile, model_identity, profile_dir, save_profile


def measured(model: nn.Module, effective_length: int | None) -> tuple[Profile | None, int | None, str | None]:
    """The profile consulted (none when E is given), E to plan against and where it came from."""
    if effective_length is not None:
        return None, effective_length, "given"
    profile = find_profile(model)
    if profile is None:
        return None, None, None
    return profile, profile.effective_length, f"measured, {profile.path.name}"


def effective_length_of(model: nn.Module, effective_length: int | None = None) -> tuple[int | None, str | None]:
    """E to plan against and where it came from: the given one, else the model's measured profile, else none."""
    return measured(model, effective_length)[1:]


def plan_for(model: nn.Module, input_length: int, effective_length: int | None = None) -> Plan:
    """G and W for `input_length` tokens on `model`, planned against the length it really handles."""
    return plan(training_length(model), input_length, *effective_length_of(model, effective_length))


def choose_for(model: nn.Module, input_length: int, effective_length: int | None = None) -> Plan:
    """Like `plan_for`, but the method too: STRING where the model's profile measured it better (choice.py)."""
    profile, effective, source = measured(model, effective_length)
    return choose(training_length(model), input_length, profile, effective, source)


__all__ = ["MAX_GROUP", "InputTooLongError", "Plan", "Profile", "ProfileError", "check_effective_length", "choose",
           "choose_for", "effective_length_of", "find_profile", "load_profile", "longest_input", "measured",
           "model_identity", "plan", "plan_for", "plan_with", "profile_dir", "save_profile", "string_plan"]
