"""Choosing the position map by measurement: SelfExtend or STRING, for inputs inside the training length.

Past the training length L only SelfExtend reads an input. Up to the effective length E the model's
own attention works (SelfExtend's plan is then G = 1). Between E and L the model has seen every
position but uses its far ones badly, and both maps help in their own way; the profile's comparison
(`selfextend calibrate --compare`, the same probes run with each map) decides. Without a comparison
the choice stays SelfExtend, and the reason says so.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import SelfExtendConfig
from .plan import Plan, plan
from .profiles import Profile


def _score(results: dict[int, dict], length: int) -> tuple[int, int, int] | None:
    """(correct, total, probed length) at the shortest probed length >= `length`, else the longest probed."""
    if not results:
        return None
    longer = [n for n in results if n >= length]
    at = min(longer) if longer else max(results)
    return results[at]["correct"], results[at]["total"], at


def choose(train_length: int, target_length: int, profile: Profile | None, effective_length: int | None = None,
           effective_source: str | None = None) -> Plan:
    """The plan for `target_length` tokens: SelfExtend's, or STRING's where the profile measured it better."""
    chosen = plan(train_length, target_length, effective_length, effective_source)
    if target_length > train_length:
        return replace(chosen, reason=f"{chosen.reason}. SelfExtend: past the training length only it reads the "
                                      "input (STRING does not extend)")
    if chosen.group_size == 1:
        return chosen
    methods = profile.methods if profile is not None else {}
    string, selfextend = _score(methods.get("string", {}), target_length), _score(methods.get("selfextend", {}),
                                                                                  target_length)
    if string is None or selfextend is None:
        return replace(chosen, reason=f"{chosen.reason}. SelfExtend: no STRING comparison was measured for this "
                                      "model (selfextend calibrate --compare)")
    measured = (f"at {string[2]} tokens the probes scored STRING {string[0]}/{string[1]}, "
                f"SelfExtend {selfextend[0]}/{selfextend[1]}")
    if string[0] * selfextend[1] <= selfextend[0] * string[1]:
        return replace(chosen, reason=f"{chosen.reason}. SelfExtend: {measured}")
    return string_plan(SelfExtendConfig.string(train_length, effective_length=effective_length,
                                               effective_source=effective_source), target_length, measured)


def string_plan(settings: SelfExtendConfig, target_length: int | None, why: str) -> Plan:
    """STRING's settings as a plan for `target_length` tokens, with why they were chosen."""
    return Plan(settings, target_length,
                f"STRING with S = {settings.shifted_offset}, w = {settings.local_window}: {why}")
