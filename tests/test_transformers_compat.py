"""Every supported transformers release: our calls use the cache keyword the model declares (no deprecation
warnings), kept grouped keys find the cache under either name, and `generate`'s reminder about passing the
model's maximum length is held back only while the input is within the plan."""

import logging
import warnings

import torch
import transformers
from transformers.utils import logging as transformers_logging

import selfextend
from selfextend.evaluation.perplexity import token_nll
from selfextend.inference import answer, prefill
from selfextend.transformers_compat import NEW_CACHE_NAME, OLD_CACHE_NAME, cache_name, given_cache
from conftest import TRAIN_LENGTH, make_model


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def test_the_cache_name_is_the_one_the_model_declares():
    import inspect

    model = make_model("llama")
    declared = inspect.signature(model.forward).parameters
    assert cache_name(model) in declared
    assert cache_name(model) == (NEW_CACHE_NAME if "cache" in declared else OLD_CACHE_NAME)
    cache = transformers.DynamicCache(config=model.config)
    assert given_cache({NEW_CACHE_NAME: cache}) is cache and given_cache({OLD_CACHE_NAME: cache}) is cache
    assert given_cache({}) is None


def test_our_calls_raise_no_warning():
    """Prefill, answer and perplexity, with kept keys on: no deprecated keyword, no kept-keys warning."""
    model = selfextend.apply(make_model("llama"), 4, 8)
    ids = _ids(60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        answer(model, ids, prefill(model, ids, chunk_size=16), 3, pad_token_id=0)
        token_nll(model, ids, chunk_size=16)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _reminders(model, n: int) -> list[str]:
    """The max-length reminders `generate` logs while `answer` continues an n-token prompt by 4 tokens."""
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    collect = _Collect()
    logger.addHandler(collect)
    transformers_logging.warning_once.cache_clear()  # the reminder is logged once per process otherwise
    try:
        ids = _ids(n)
        answer(model, ids, prefill(model, ids), 4, pad_token_id=0)
    finally:
        logger.removeHandler(collect)
    return [m for m in collect.messages if "predefined maximum length" in m]


def test_the_max_length_reminder_is_held_back_within_the_plan():
    n = TRAIN_LENGTH + 10
    assert _reminders(make_model("llama"), n)  # plain attention past L: transformers' reminder stands
    model = selfextend.apply(make_model("llama"), 4, 8)  # limit (64 - 8)·4 + 8 = 232
    assert not _reminders(model, n)
    selfextend.apply(model, 2, 8)  # limit 120: past it, the reminder stands beside SelfExtend's own warning
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        assert _reminders(model, 120)
    assert any("exceeds the SelfExtend limit" in str(w.message) for w in ours)


def test_models_load_without_hub_kernels(monkeypatch):
    """transformers 5.25 turned hub kernels on by default; we load with them off on every release (no Hub at
    run time, the layers' own numerics)."""
    from selfextend import models

    given = {}
    load = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        given.update(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model = models.load_model(models.resolve("testbed"))
    assert given["use_kernels"] is False and not getattr(model, "use_kernels", False)
