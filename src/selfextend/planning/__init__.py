"""Planning the settings: the formula (plan.py), the method by measurement (choice.py), measured effective
lengths (profiles.py), and the one path from a caller's request to a plan (request.py).

`resolve` is the path every caller takes (apply, generate, plan, eval, calibrate, the server): settings
given by the caller are checked and used; the rest are planned against an effective length E given by
the caller, else the model's measured profile, else the training length.
"""

from __future__ import annotations

from torch import nn

from ..config import check_effective_length
from ..errors import InputTooLongError
from .choice import choose, string_plan
from .plan import MAX_GROUP, Plan, longest_input, plan
from .profiles import Profile, ProfileError, find_profile, load_profile, model_identity, profile_dir, save_profile
from .request import Planner, planner, resolve, uses_profile


def plan_for(model: nn.Module, input_length: int, effective_length: int | None = None) -> Plan:
    """SelfExtend's G and W for `input_length` tokens on `model`, planned against the length it really handles."""
    return resolve(model, input_length, method="selfextend", effective_length=effective_length)


def choose_for(model: nn.Module, input_length: int, effective_length: int | None = None) -> Plan:
    """Like `plan_for`, but the method too: STRING where the model's profile measured it better (choice.py)."""
    return resolve(model, input_length, method="auto", effective_length=effective_length)


__all__ = ["MAX_GROUP", "InputTooLongError", "Plan", "Planner", "Profile", "ProfileError", "check_effective_length",
           "choose", "choose_for", "find_profile", "load_profile", "longest_input", "model_identity", "plan",
           "plan_for", "planner", "profile_dir", "resolve", "save_profile", "string_plan", "uses_profile"]
