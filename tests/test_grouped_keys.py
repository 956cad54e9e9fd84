"""Grouped keys kept beside the KV cache: decode steps rotate only new keys, and every way a cache is
changed behind our back (crop, a reused static cache, a fresh cache, batches) gives what rotating the
whole cache every step gives."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import selfextend
from selfextend.attention import blockwise
from selfextend.rotary import GroupedRotation
from conftest import make_model

G, W = 4, 8


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK", 32)


def _ids(n, seed=1, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _pair(family="llama"):
    """The same model twice: keeping grouped keys, and rotating the whole cache at every call."""
    return (selfextend.apply(make_model(family), G, W),
            selfextend.apply(make_model(family), G, W, keep_grouped_keys=False))


@torch.no_grad()
def _steps(model, cache, ids, tokens):
    """Prefill ids into cache, then feed `tokens` one at a time; the logits of every call."""
    logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
    for token in tokens:
        logits.append(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


def test_a_decode_step_rotates_only_its_new_key(monkeypatch):
    kept, _ = _pair()
    sizes = []
    rotate = GroupedRotation.__call__
    monkeypatch.setattr(GroupedRotation, "__call__",
                        lambda self, x, positions, kind: sizes.append((kind, x.shape[2])) or rotate(self, x, positions, kind))
    cache = DynamicCache(config=kept.config)
    _steps(kept, cache, _ids(40), [])
    sizes.clear()
    _steps(kept, cache, _ids(1, seed=2), [5, 6])
    layers = kept.config.num_hidden_layers
    assert [s for kind, s in sizes if kind == "key"] == [1] * 3 * layers


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kept_keys_give_what_rotating_every_step_gives(family):
    kept, fresh = _pair(family)
    got = _steps(kept, DynamicCache(config=kept.config), _ids(37), [4, 9, 11, 2, 7])
    expected = _steps(fresh, DynamicCache(config=fresh.config), _ids(37), [4, 9, 11, 2, 7])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_cropped_cache_continues_right():
    kept, fresh = _pair()
    results = []
    for model in (kept, fresh):
        cache = DynamicCache(config=model.config)
        _steps(model, cache, _ids(40), [4, 9, 11])
        cache.crop(-13)  # back to 30 tokens, as assisted generation does after a rejected draft
        results.append(_steps(model, cache, _ids(6, seed=3), [8, 1]))
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_a_static_cache_reused_for_another_prompt():
    kept, fresh = _pair()
    results = []
    for model in (kept, fresh):
        cache = StaticCache(config=model.config, max_cache_len=64)
        first = _steps(model, cache, _ids(40), [4, 9])
        cache.reset()  # written again from index 0, in place
        results.append((first, _steps(model, cache, _ids(35, seed=4), [3, 3, 5])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_generate_greedy_and_beams_match():
    kept, fresh = _pair()
    ids = _ids(30)
    for kwargs in ({}, {"num_beams": 3}):
        with torch.no_grad():
            got = kept.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kwargs)
            expected = fresh.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **kwargs)
        assert torch.equal(got, expected)


def test_remove_takes_the_hook_away():
    model, _ = _pair()
    attention = [m for m in model.modules() if hasattr(m, "layer_idx")]
    assert all(m._forward_pre_hooks for m in attention)
    selfextend.remove(model)
    assert not any(m._forward_pre_hooks for m in attention)


def test_keys_swapped_under_the_cache_layer_are_noticed():
    kept, fresh = _pair()
    results = []
    for model in (kept, fresh):
        cache, other = DynamicCache(config=model.config), DynamicCache(config=model.config)
        _steps(model, cache, _ids(40), [])
        _steps(model, other, _ids(40, seed=5), [])
        for layer, source in zip(cache.layers, other.layers):  # as restoring a kept prefix would
            layer.keys, layer.values = source.keys, source.values
        results.append(_steps(model, cache, _ids(1, seed=6), [4, 2]))
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
