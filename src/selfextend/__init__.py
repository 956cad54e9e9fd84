"""SelfExtend: read inputs several times longer than a RoPE model's training context, without fine-tuning."""

from .config import SelfExtendConfig
from .integration import apply, remove, settings, training_length
from .planning import InputTooLongError, Plan, Profile, find_profile, plan, plan_for
from .positions import extended_limit
from .rotary import UnsupportedModelError

__all__ = ["InputTooLongError", "Plan", "Profile", "SelfExtendConfig", "UnsupportedModelError", "apply", "extended_limit",
           "find_profile", "plan", "plan_for", "remove", "settings", "training_length"]
__version__ = "0.1.0"
