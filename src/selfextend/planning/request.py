"""From what a caller asks for to a plan: the one path of `apply`, the command line, the server and eval.

A caller has a model (or its training length), maybe a target length, and maybe some settings: a method,
SelfExtend's G and W, STRING's S and w, an effective length E. `planner` checks them once (config.py
says which are legal) and keeps what planning needs (the model's measured profile); `Planner.plan(N)`
gives the plan for N tokens: the given settings, or the planner's choice against E.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import API, SelfExtendConfig, Spelling, check_effective_length, check_request, training_length
from ..errors import InputTooLongError
from .choice import choose, string_plan
from .plan import Plan, longest_input, plan
from .profiles import Profile, find_profile


@dataclass(frozen=True)
class Planner:
    """A caller's request, checked: settings given (`given`), or planned per length against E."""

    train_length: int
    method: str  # auto, selfextend or string
    given: SelfExtendConfig | None
    profile: Profile | None
    effective_length: int | None
    effective_source: str | None
    names: Spelling = API
    why: str = "given"  # the reason given settings carry
    refuse_past_limit: bool = False  # given G and W: refuse longer inputs (else the model warns when it gets there)

    @property
    def limit(self) -> int:
        """The most tokens a plan from this planner reads."""
        if self.given is not None:
            return self.given.max_length
        return longest_input(self.train_length, self.effective_length)

    def describe(self) -> str:
        """What this planner does, in a line for a log."""
        if self.given is not None:
            return f"{self.given.describe()} fixed"
        return f"planned per request against {self.effective_length or self.train_length} tokens"

    def plan(self, target_length: int | None) -> Plan:
        """The plan for `target_length` tokens (None: given settings only), or a clear error."""
        names, given = self.names, self.given
        if given is None:
            if target_length is None:
                raise ValueError(f"give {names.group_size} and {names.window_size}, or {names.input_length} to plan "
                                 "them")
            if self.method == "auto":
                return choose(self.train_length, target_length, self.profile, self.effective_length,
                              self.effective_source)
            return plan(self.train_length, target_length, self.effective_length, self.effective_source)
        if given.method == "string":
            if target_length is not None and target_length > given.max_length:
                raise InputTooLongError(f"{target_length} tokens are past the training length L = "
                                        f"{self.train_length}, and STRING does not extend past it: use "
                                        f"{names.ask('selfextend')} for longer inputs")
            return string_plan(given, target_length, self.why)
        chosen = Plan(given, target_length, self.why)
        if self.refuse_past_limit and not chosen.fits:
            raise InputTooLongError(f"{target_length} tokens exceed the limit (L - W)·G + W = {given.max_length} "
                                    f"of the given {given.describe()}")
        return chosen


def uses_profile(method: str = "auto", group_size: int | None = None, effective_length: int | None = None,
                 **request) -> bool:
    """Whether `planner` looks up the model's measured profile for this request (it needs the model's weights)."""
    return method != "string" and group_size is None and effective_length is None


def planner(model_or_length: nn.Module | int, *, method: str = "auto", group_size: int | None = None,
            window_size: int | None = None, shifted_offset: int | None = None, local_window: int | None = None,
            effective_length: int | None = None, backend: str = "auto", names: Spelling = API, why: str = "given",
            refuse_past_limit: bool = False) -> Planner:
    """Check what a caller gives and keep what planning needs; a model's profile is looked up only if used."""
    check_request(method, group_size, window_size, shifted_offset, local_window, effective_length, names)
    train = model_or_length if isinstance(model_or_length, int) else training_length(model_or_length)
    given = None
    if method == "string":
        given = SelfExtendConfig.string(train, shifted_offset, local_window, backend)
    elif group_size is not None:
        given = SelfExtendConfig("selfextend", train, group_size, window_size, backend=backend)
    profile, source = None, None
    if given is None and effective_length is not None:
        source = "given"
        check_effective_length(train, effective_length)
    elif uses_profile(method, group_size, effective_length) and isinstance(model_or_length, nn.Module):
        profile = find_profile(model_or_length)
        if profile is not None:
            effective_length, source = profile.effective_length, f"measured, {profile.path.name}"
    return Planner(train, method, given, profile, effective_length, source, names, why, refuse_past_limit)


def resolve(model_or_length: nn.Module | int, target_length: int | None, **request) -> Plan:
    """The plan for `target_length` tokens from what a caller gives (see `planner`), or a clear error."""
    return planner(model_or_length, **request).plan(target_length)
