"""Planning G and W: the formula (plan.py), measured effective lengths (profiles.py, calibration.py).

`plan_for` is the one path every caller takes (apply, generate, plan, eval, the server): an effective
length given by the caller wins, else the model's measured profile, else the training length.
"""

from __future__ import annotations

from torch import nn

from ..config import training_length
from .plan import MAX_GROUP, InputTooLongError, Plan, check_effective_length, plan
from .profiles import Profile, ProfileError, find_profile, load_profile, model_identity, profile_dir, save_profile


def plan_for(model: nn.Module, input_length: int, effective_length: int | None = None) -> Plan:
    """G and W for `input_length` tokens on `model`, planned against the length it really handles."""
    source = "given"
    if effective_length is None:
        profile = find_profile(model)
        if profile is not None:
            effective_length, source = profile.effective_length, f"measured, {profile.path.name}"
    return plan(training_length(model), input_length, effective_length, source if effective_length else None)


__all__ = ["MAX_GROUP", "InputTooLongError", "Plan", "Profile", "ProfileError", "check_effective_length",
           "find_profile", "load_profile", "model_identity", "plan", "plan_for", "profile_dir", "save_profile"]
