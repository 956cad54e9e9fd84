"""Where supported `transformers` releases differ, the one place that knows how (see the README's version range).

- The KV cache keyword: `past_key_values` up to 5.23, `cache` from 5.24 (the old name is deprecated there and
  warns). We pass the name the model's own `forward` declares, and read whichever one a layer was given.
- `generate`'s reminder that a call "exceeded the model's predefined maximum length": reading past the
  training length is what SelfExtend is for, so the reminder is held back while the input is within the
  plan's limit (past it, SelfExtend's own warning says what to do).
- Hub kernels when loading: 5.25 turned them on by default (`from_pretrained(use_kernels=None)` means True),
  which needs the `kernels` package and replaces layers by kernels fetched from the Hub at run time, with their
  own numerics. Earlier releases default to off; we load with them off on every release (`LOAD_OPTIONS`).
- A model's RoPE: with the `kernels` package, each attention module calls `apply_rotary_pos_emb` through a
  module of its own in `_kernel_funcs` (kernels' `use_kernelized_func`; kernel layer "rotary_pos_emb"), whose
  `forward` is what `kernelize` replaces; `rotary_wrappers` finds them, so `rope_native` can give them its
  forward. Without `kernels` (or on releases before the wrappers) there are none, and RoPE runs as written.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator

from torch import nn

NEW_CACHE_NAME, OLD_CACHE_NAME = "cache", "past_key_values"
LOAD_OPTIONS = {"use_kernels": False}  # from_pretrained's options that every supported release reads alike
_REMINDER_LOGGER = "transformers.generation.stopping_criteria"
_REMINDER = "This is a friendly reminder - the current text generation call has exceeded the model's predefined"


def cache_name(model: nn.Module) -> str:
    """The keyword `model` takes its KV cache by: "cache" where its forward declares it, else "past_key_values"."""
    return NEW_CACHE_NAME if NEW_CACHE_NAME in inspect.signature(model.forward).parameters else OLD_CACHE_NAME


def cache_kwargs(model: nn.Module, cache) -> dict:
    """`{name: cache}` for a call of `model(...)` or `model.generate(...)`, in the name that model expects."""
    return {cache_name(model): cache}


ROTARY_KERNEL = "rotary_pos_emb"  # the kernel layer name transformers gives its `apply_rotary_pos_emb`


def rotary_wrappers(model: nn.Module) -> Iterator[tuple[nn.Module, Callable]]:
    """(wrapper, original) for each attention module's own RoPE wrapper: the module whose `forward` computes its
    `apply_rotary_pos_emb` calls, and that forward as the model defines it."""
    for module in model.modules():
        wrappers = module.__dict__.get("_kernel_funcs")
        for wrapper in wrappers.values() if isinstance(wrappers, dict) else ():
            if isinstance(wrapper, nn.Module) and getattr(type(wrapper), "kernel_layer_name", None) == ROTARY_KERNEL:
                yield wrapper, type(wrapper).forward.__get__(wrapper)


def given_cache(kwargs: dict):
    """The cache a module's forward was called with (under either name), or None."""
    cache = kwargs.get(NEW_CACHE_NAME)
    return cache if cache is not None else kwargs.get(OLD_CACHE_NAME)


class _Reminder(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_REMINDER)


@contextlib.contextmanager
def length_reminder_held_back(hold: bool) -> Iterator[None]:
    """While inside, drop `generate`'s past-the-maximum-length reminder if `hold` (the input is within the plan)."""
    if not hold:
        yield
        return
    logger, reminder = logging.getLogger(_REMINDER_LOGGER), _Reminder()
    logger.addFilter(reminder)
    try:
        yield
    finally:
        logger.removeFilter(reminder)
