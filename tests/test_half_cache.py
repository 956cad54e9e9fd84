"""A float16 KV cache for a float32 model: keys and values rounded once as they are stored, then read exactly as
their float32 values (the native kernel widens them itself, other calls a range at a time), grouped keys rotated
in float32 from the stored keys and rounded once; refused where it would be read wrong."""

import pytest
import torch

import selfextend
from selfextend.attention import blockwise, few_native, partial
from selfextend.attention.layout import KVLayout, resolve_geometry
from selfextend.evaluation import Evaluation, Method
from selfextend.inference import prefill
from selfextend.kv_cache import GrowingLayer, SlidingLayer, cache_dtype, new_cache
from selfextend.serving.prefix_cache import PrefixCache, Recorder, restore
from selfextend.transformers_compat import cache_kwargs
from conftest import make_model
from test_kernels import make_rotation


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("heads, kv_heads, n, m, d", [(4, 1, 1, 5000, 256), (9, 3, 1, 777, 64), (4, 2, 3, 100, 72),
                                                      (4, 1, 1, 300, 80), (2, 1, 1, 0, 64), (4, 1, 1, 17, 33)])
def test_the_native_kernel_reads_float16_keys_as_their_float32_values_bit_for_bit(heads, kv_heads, n, m, d):
    torch.manual_seed(0)
    query, other = torch.randn(1, heads, n, d), torch.randn(1, heads, n, d)
    buffer = torch.randn(1, kv_heads, m + 40, d).half()
    key, value = buffer[:, :, 40:], torch.randn(1, kv_heads, m, d).half()  # a view into a cache's buffer
    mask = torch.rand(1, 1, n, m, generator=torch.Generator().manual_seed(1)) > 0.3
    for given in (None, mask):
        got = few_native.attend_few(query, key, value, given, 0.1)
        expected = few_native.attend_few(query, key.float(), value.float(), given, 0.1)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    second = torch.randn(1, kv_heads, 300, d).half(), torch.randn(1, kv_heads, 300, d).half()
    got = few_native.attend_two((query, key, value), (other, *second), 0.1)
    expected = few_native.attend_two((query, key.float(), value.float()),
                                     (other, second[0].float(), second[1].float()), 0.1)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="held alike"):
        few_native.attend_two((query, key, value), (other, second[0].float(), second[1].float()), 0.1)


@pytest.mark.parametrize("n_queries", [1, 3, 70])
@pytest.mark.parametrize("G, W", [(4, 8), (3, 20)])
def test_selfextend_attention_over_a_float16_cache_is_attention_over_its_widened_keys(monkeypatch, n_queries, G, W):
    """The float16 keys and values, and grouped keys rounded once, give what their float32 values give: the
    prefill's ranges widened a few keys at a time (split here so that the merge of ranges is exercised)."""
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK", 32)
    monkeypatch.setattr(partial, "WIDEN_KEYS", 24)
    torch.manual_seed(0)
    n_keys, rotation = 150, make_rotation(G, W)
    query = torch.randn(1, 4, n_queries, 16)
    key, value = torch.randn(1, 2, n_keys, 16).half(), torch.randn(1, 2, n_keys, 16).half()
    geometry = resolve_geometry(KVLayout(q_offset=n_keys - n_queries, kv_offset=0), None, 1, n_queries, n_keys,
                                torch.device("cpu"))
    grouped = rotation(key, geometry.key_positions, "key")
    assert grouped.dtype == torch.float16
    torch.testing.assert_close(grouped.float(), rotation(key.float(), geometry.key_positions, "key").half().float(),
                               atol=0, rtol=0)  # rotated in float32, rounded once
    got = blockwise.selfextend_attention(query, key, value, geometry, rotation, 0.25)
    expected = blockwise.selfextend_attention(query, key.float(), value.float(), geometry, rotation, 0.25,
                                              key_grouped=grouped.float())
    torch.testing.assert_close(got, expected)
    local = blockwise.local_attention(query, key, value, geometry, W, 0.25)
    torch.testing.assert_close(local, blockwise.local_attention(query, key.float(), value.float(), geometry, W, 0.25))


def test_a_float16_cache_stores_half_and_decodes_on_the_native_kernel(monkeypatch):
    """Every layer (sliding ones too) stores float16; a decode step reads it in the native kernel (a full layer's
    two key sets in one call), never by widening; the kept grouped keys are float16 and what rotating every step
    gives."""
    model = selfextend.apply(make_model("gemma3"), 4, 8)
    kept_off = selfextend.apply(make_model("gemma3"), 4, 8, keep_grouped_keys=False)
    ids = _ids(90)
    cache, fresh = prefill(model, ids, 16, cache_dtype=torch.float16), prefill(kept_off, ids, 16,
                                                                                cache_dtype=torch.float16)
    assert {type(layer) for layer in cache.layers} == {GrowingLayer, SlidingLayer}
    assert {layer.keys.dtype for layer in cache.layers} == {layer.values.dtype for layer in cache.layers} \
        == {torch.float16}

    def widened(*args):
        raise AssertionError("a decode step widened the float16 cache instead of reading it natively")

    monkeypatch.setattr(partial, "_widened", widened)
    calls, two = [], few_native.attend_two
    monkeypatch.setattr(few_native, "attend_two",
                        lambda first, second, scale: calls.append((first[1].dtype, second[1].dtype))
                        or two(first, second, scale))
    with torch.inference_mode():
        for token in (5, 7, 9):
            step = torch.tensor([[token]])
            got = model(step, **cache_kwargs(model, cache), use_cache=True).logits
            calls_of_model = len(calls)
            expected = kept_off(step, **cache_kwargs(kept_off, fresh), use_cache=True).logits
            del calls[calls_of_model:]
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
    full_layers = sum(not layer.is_sliding for layer in cache.layers)
    assert calls == [(torch.float16, torch.float16)] * full_layers * 3  # one call a full layer a step, both sets
    state = next(m for m in model.modules() if hasattr(m, "selfextend_state")).selfextend_state
    held = [kept.buffer for kept in state.kept.values() if kept.buffer is not None]  # full layers' only
    assert held and {buffer.dtype for buffer in held} == {torch.float16}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_float16_cache_answers_within_float16_rounding_of_float32(family):
    """Quality, not exactness: the next-token logits move by float16's rounding of the keys and values only."""
    model = selfextend.apply(make_model(family), 4, 8)
    ids = _ids(90)
    caches = prefill(model, ids, 16), prefill(model, ids, 16, cache_dtype=torch.float16)
    with torch.inference_mode():
        for token in (5, 7):
            full, half = (model(torch.tensor([[token]]), **cache_kwargs(model, c), use_cache=True).logits
                          for c in caches)
            torch.testing.assert_close(half, full, atol=2e-3, rtol=0)
            assert not torch.equal(half, full)  # the option did round


def test_one_decision_says_what_each_run_stores():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cache_dtype("auto", torch.float32, cpu) == cache_dtype("float16", torch.float32, "cpu") == torch.float16
    assert cache_dtype("auto", torch.bfloat16, cpu) is cache_dtype("auto", torch.float32, cuda) is None
    assert cache_dtype("model", torch.float32, cpu) is None
    for dtype, device in ((torch.bfloat16, cpu), (torch.float32, cuda)):
        with pytest.raises(ValueError, match="for float32 models on CPU.*--kv-cache-dtype model"):
            cache_dtype("float16", dtype, device)
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int4'"):
        cache_dtype("int4", torch.float32, cpu)


def test_a_value_past_float16s_range_is_refused_not_stored_as_infinity():
    layer = GrowingLayer(storage=torch.float16)
    layer.update(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))
    with pytest.raises(ValueError, match="past torch.float16's range.*--kv-cache-dtype model"):
        layer.update(torch.full((1, 1, 1, 4), 7e4), torch.ones(1, 1, 1, 4))


def test_a_restored_prefix_keeps_the_cache_dtype():
    model = selfextend.apply(make_model("llama"), 4, 8)
    ids = _ids(150)
    store = PrefixCache(1 << 30)
    recorder = Recorder((4, 8, None), ids[0, :-1], 16)
    store.add(recorder.finish(prefill(model, ids, 16, on_chunk=recorder.record, cache_dtype=torch.float16)))
    entry, reused = store.find((4, 8, None), ids[0, :-1])
    resumed = prefill(model, ids, 16, cache=restore(entry, reused, model.config, dtype=torch.float16))
    scratch = prefill(model, ids, 16, cache_dtype=torch.float16)
    for mine, theirs in zip(resumed.layers, scratch.layers):
        assert mine.keys.dtype == torch.float16 and torch.equal(mine.keys, theirs.keys)
        assert torch.equal(mine.values, theirs.values)


def test_readers_that_cannot_read_a_float16_cache_refuse_it():
    model = selfextend.apply(make_model("llama"), 4, 8, backend="reference")
    with pytest.raises(ValueError, match="only the blockwise attention backend"):
        prefill(model, _ids(40), 16, cache_dtype=torch.float16)
    with pytest.raises(ValueError, match="vanilla run the model's own"):
        Evaluation("passkey", [100], Method.parse_list("vanilla,selfextend"), "m", kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        Evaluation("passkey", [100], Method.parse_list("selfextend"), "m", kv_cache_dtype="int4")


def test_a_cache_layer_it_cannot_store_in_float16_is_refused(monkeypatch):
    """new_cache makes its own layer for full and sliding attention; any other kind would keep float32 unsaid."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from selfextend import kv_cache

    class OtherLayer(DynamicLayer):
        pass

    config = make_model("llama").config

    def with_other_layer(config):
        cache = DynamicCache(config=config)
        cache.layers[0] = OtherLayer()
        return cache

    monkeypatch.setattr(kv_cache, "DynamicCache", with_other_layer)
    assert type(new_cache(config).layers[0]) is OtherLayer  # the model's dtype: kept as it is
    with pytest.raises(ValueError, match="OtherLayer cache layer cannot store torch.float16"):
        new_cache(config, dtype=torch.float16)


def test_the_native_write_rounds_as_torch_rounds_and_counts_what_float16_cannot_hold():
    from selfextend import cache_native

    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()  # every finite
    ties = (halves[:-1] + halves[1:]) / 2  # exactly between two halves: to the even one
    values = torch.cat([halves, ties, ties.nextafter(torch.tensor(0.0)), ties.nextafter(torch.tensor(1e9)),
                        torch.tensor([65504.0, 65519.0, 65520.0, 7e4, 1e-30, 2.0 ** -25, 2.0 ** -24 * 1.5])])
    values = torch.cat([values, -values])
    d = 37  # rows that are not whole vectors of eight
    rows = torch.nn.functional.pad(values, (0, -len(values) % d)).view(1, 1, -1, d)
    for t0 in range(0, rows.shape[2], 16):
        new = rows[:, :, t0:t0 + 16]
        slot = torch.empty(new.shape, dtype=torch.float16)
        past = cache_native.store_half(slot, new)
        assert past == int((new.abs() > 65504).sum())
        finite = new.abs() <= 65504
        assert torch.equal(slot.view(torch.int16)[finite], new.half().view(torch.int16)[finite])
    assert cache_native.store_half(torch.empty(1, 1, 17, 4, dtype=torch.float16), torch.ones(1, 1, 17, 4)) is None


def test_decode_steps_write_in_place_what_torch_would_store_and_refuse_without_a_trace(monkeypatch):
    from selfextend import cache_native

    written = []
    store = cache_native.store_half
    monkeypatch.setattr(cache_native, "store_half", lambda slot, new: written.append(1) or store(slot, new))
    for mine, theirs in ((GrowingLayer(storage=torch.float16), GrowingLayer()),
                         (SlidingLayer(24, torch.float16), SlidingLayer(24))):
        first = torch.randn(1, 2, 30, 8)
        mine.update(first, -first)
        theirs.update(first.half().float(), -first.half().float())
        for step in range(300):
            new = torch.randn(1, 2, 1 + (step == 100) * 3, 8) * 100
            got, expected = mine.update(new, -new), theirs.update(new.half().float(), -new.half().float())
            assert all(torch.equal(g.float(), e) for g, e in zip(got, expected))
        held = (mine.keys, mine.values, mine.get_seq_length())
        with pytest.raises(ValueError, match="a value of 7e\\+04 is past"):
            mine.update(torch.ones(1, 2, 1, 8), torch.full((1, 2, 1, 8), -7e4))
        assert (mine.keys, mine.values, mine.get_seq_length()) == held
    assert len(written) >= 2 * 2 * 290  # keys and values, nearly every step of both layers, in one C call each
