"""Grouped keys kept beside the KV cache: decode steps rotate only new keys, and every way a cache is
changed behind our back (crop, a reused static cache, a fresh cache, batches) gives what rotating the
whole cache every step gives."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import selfextend
from selfextend import integration
from selfextend.attention import blockwise
from selfextend.inference import answer, prefill
from selfextend.kv_cache import new_cache
from selfextend.transformers_compat import cache_kwargs
from conftest import make_model

G, W = 4, 8


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK", 32)


CACHES = {"dynamic": lambda config: DynamicCache(config=config), "growing": new_cache}  # concatenating, in place


def _ids(n, seed=1, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _pair(family="llama"):
    """The same model twice: keeping grouped keys, and rotating the whole cache at every call."""
    return (selfextend.apply(make_model(family), G, W),
            selfextend.apply(make_model(family), G, W, keep_grouped_keys=False))


@torch.no_grad()
def _steps(model, cache, ids, tokens):
    """Prefill ids into cache, then feed `tokens` one at a time; the logits of every call."""
    logits = [model(ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]]
    for token in tokens:
        logits.append(model(torch.tensor([[token]]), **cache_kwargs(model, cache), use_cache=True).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("kind", CACHES)
def test_a_decode_step_rotates_only_its_new_key(rotated_keys, kind):
    kept, _ = _pair()
    cache = CACHES[kind](kept.config)
    _steps(kept, cache, _ids(40), [])
    rotated_keys.clear()
    _steps(kept, cache, _ids(1, seed=2), [5, 6])
    assert rotated_keys == [1] * 3 * kept.config.num_hidden_layers


def test_batch_1_generate_rotates_each_key_once(rotated_keys):
    """The fast path `generate` promises: after the prompt's call, every step rotates its one new key per layer."""
    kept, _ = _pair()
    layers = kept.config.num_hidden_layers
    with torch.no_grad():
        kept.generate(_ids(40), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert rotated_keys[layers:] == [1] * 7 * layers


def test_chunked_prefill_and_answer_rotate_each_key_once(rotated_keys):
    """`inference.prefill` (generate, eval, calibrate, serve) and `answer`: no call rotates more than it added."""
    kept, _ = _pair()
    ids = _ids(100)
    cache = prefill(kept, ids, chunk_size=16)
    assert rotated_keys and max(rotated_keys) <= 16
    rotated_keys.clear()
    answer(kept, ids, cache, 5, pad_token_id=0)
    assert rotated_keys == [1] * 5 * kept.config.num_hidden_layers  # the prompt's last token, then 4 steps


def test_a_cache_we_cannot_find_is_said_not_silent(monkeypatch):
    """Were a transformers release to pass the cache by a name we do not read, kept keys would be off: we say so."""
    kept, _ = _pair()
    monkeypatch.setattr(integration, "given_cache", lambda kwargs: None)
    with pytest.warns(UserWarning, match="rotates all its keys again"):
        prefill(kept, _ids(60), chunk_size=16)


@pytest.mark.parametrize("kind", CACHES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kept_keys_give_what_rotating_every_step_gives(family, kind):
    kept, fresh = _pair(family)
    got = _steps(kept, CACHES[kind](kept.config), _ids(37), [4, 9, 11, 2, 7])
    expected = _steps(fresh, DynamicCache(config=fresh.config), _ids(37), [4, 9, 11, 2, 7])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", CACHES)
def test_a_cropped_cache_continues_right(kind):
    kept, fresh = _pair()
    results = []
    for model in (kept, fresh):
        cache = CACHES[kind](model.config)
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


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_hook_is_on_the_attention_modules_only_and_remove_takes_it_away(family):
    """A decoder layer carries a layer index too: it gets no settings and no hook (they would run for nothing); nor
    does a sliding-window attention layer get the hook."""
    model = selfextend.apply(make_model(family), G, W)
    indexed = [m for m in model.modules() if hasattr(m, "layer_idx")]
    attention = [m for m in indexed if "Attention" in type(m).__name__]
    assert len(attention) == model.config.num_hidden_layers
    assert family == "llama" or len(indexed) == 2 * len(attention)  # Gemma 3's decoder layers have an index too
    assert [m for m in indexed if hasattr(m, "selfextend_state")] == attention
    # sliding-window layers group no keys: no hook, so their calls keep torch's path for modules without hooks
    hooked = [m for m in indexed if m._forward_pre_hooks]
    assert hooked == [m for m in attention if not getattr(m, "sliding_window", None)]
    assert 0 < len(hooked) < len(attention) if family == "gemma3" else hooked == attention
    selfextend.remove(model)
    assert not any(m._forward_pre_hooks for m in indexed)


@pytest.mark.parametrize("kind", CACHES)
def test_keys_swapped_under_the_cache_layer_are_noticed(kind):
    kept, fresh = _pair()
    results = []
    for model in (kept, fresh):
        cache, other = CACHES[kind](model.config), CACHES[kind](model.config)
        _steps(model, cache, _ids(40), [])
        _steps(model, other, _ids(40, seed=5), [])
        for layer, source in zip(cache.layers, other.layers):  # as restoring a kept prefix would
            layer.keys, layer.values = source.keys, source.values
        results.append(_steps(model, cache, _ids(1, seed=6), [4, 2]))
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)
