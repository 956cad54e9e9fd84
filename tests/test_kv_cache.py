"""The growing KV cache: what DynamicCache holds, without a copy per token, and never writing into tensors
that someone else holds."""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import selfextend
from selfextend.inference import prefill
from selfextend.kv_cache import GrowingLayer, SlidingLayer, new_cache
from selfextend.transformers_compat import cache_kwargs
from conftest import make_model


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def test_every_layer_grows_in_place_and_sliding_layers_keep_their_window():
    config = make_model("gemma3").config
    cache = new_cache(config)
    kinds = [type(layer) for layer in cache.layers]
    plain = DynamicCache(config=config).layers
    assert kinds == [{DynamicLayer: GrowingLayer, DynamicSlidingWindowLayer: SlidingLayer}[type(l)] for l in plain]
    assert len(set(kinds)) == 2
    assert [l.sliding_window for l in cache.layers if l.is_sliding] == [l.sliding_window for l in plain if l.is_sliding]


def test_holds_what_the_concatenating_cache_holds_and_decodes_in_place():
    model = selfextend.apply(make_model("gemma3"), 4, 8)
    ids = _ids(90)
    growing = prefill(model, ids, chunk_size=16)
    dynamic = prefill(model, ids, chunk_size=16, cache=DynamicCache(config=model.config))
    layers = [next(l for l in growing.layers if isinstance(l, kind)) for kind in (GrowingLayer, SlidingLayer)]
    buffers = [layer._key_buffer.data_ptr() for layer in layers]
    for token, mode in ((5, torch.inference_mode), (7, torch.inference_mode), (9, torch.no_grad), (4, torch.no_grad)):
        with mode():  # prefill's mode (in place), then outside it (torch needs a new buffer once)
            step = torch.tensor([[token]])
            got = model(step, **cache_kwargs(model, growing), use_cache=True).logits
            expected = model(step, **cache_kwargs(model, dynamic), use_cache=True).logits
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        if token == 7:  # the decode steps wrote into room kept for them
            assert [layer._key_buffer.data_ptr() for layer in layers] == buffers
    for mine, theirs in zip(growing.layers, dynamic.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_tensors_given_to_a_layer_are_copied_not_written_into():
    layer = GrowingLayer()
    held = torch.randn(1, 2, 5, 4)
    layer.update(held, held)
    shared = layer.keys  # as a kept prefix shares a finished prefill's keys
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert torch.equal(shared, held)
    restored = GrowingLayer()
    restored.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    restored.keys, restored.values = shared, shared  # a restored prefix
    before = shared.clone()
    restored.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    assert torch.equal(shared, before) and restored.keys.shape[-2] == 7
    assert torch.equal(restored.keys[..., :5, :], before) and torch.equal(restored.keys[..., 5:, :], torch.ones(1, 2, 2, 4))


def test_a_sliding_layer_moves_its_window_when_its_room_is_used_up():
    """Hundreds of decode steps: the window moves to a new buffer now and then, never one per step, and the layer
    holds and returns exactly what transformers' own sliding layer does at every step."""
    mine, theirs = SlidingLayer(sliding_window=12), DynamicSlidingWindowLayer(sliding_window=12)
    first = torch.randn(1, 2, 3000, 4)  # a long first chunk: its buffer is given up at the first step
    for layer in (mine, theirs):
        layer.update(first, -first)
    moves, buffer = 0, mine._key_buffer
    for step in range(600):
        new = torch.randn(1, 2, 1 + (step == 300) * 5, 4)  # one chunk of several tokens among the steps
        got, expected = mine.update(new, -new), theirs.update(new, -new)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert mine.get_seq_length() == theirs.get_seq_length()
        moves += mine._key_buffer is not buffer
        buffer = mine._key_buffer
        assert buffer.shape[-2] <= 11 + 6 + 256  # the window, the most new tokens at once, the room to spare
    assert 2 <= moves <= 1 + 600 // 200


def test_a_cache_with_capacity_allocates_its_full_layers_once_and_holds_what_one_without_holds():
    """prefill + answer with the run's capacity: every full layer's keys, values and kept grouped keys live in
    one buffer of exactly that many positions from the first chunk to the last new token; same tokens."""
    from selfextend.inference import answer
    from selfextend.integration import _STATE

    model = selfextend.apply(make_model("llama"), 4, 8)
    ids, new_tokens = _ids(90), 6
    sized = prefill(model, ids, chunk_size=16, capacity=90 + new_tokens)
    full = [layer for layer in sized.layers if isinstance(layer, GrowingLayer)]
    states = {id(s): s for s in (getattr(module, _STATE, None) for module in model.modules()) if s is not None}
    kept = [state.kept[layer] for state in states.values() for layer in full if layer in state.kept]
    assert len(kept) == len(full) == model.config.num_hidden_layers
    buffers = [(layer._key_buffer, layer._value_buffer) for layer in full] + [(k.buffer,) for k in kept]
    assert all(b.shape[-2] == 90 + new_tokens for group in buffers for b in group)
    got = answer(model, ids, sized, new_tokens, pad_token_id=0)
    expected = answer(model, ids, prefill(model, ids, chunk_size=16), new_tokens, pad_token_id=0)
    assert torch.equal(got, expected)
    after = [(layer._key_buffer, layer._value_buffer) for layer in full] + [(k.buffer,) for k in kept]
    assert all(a is b for old, new in zip(buffers, after) for a, b in zip(old, new))  # never grown nor copied
    assert full[0].keys.shape[-2] == 90 + new_tokens - 1


def test_past_its_capacity_a_layer_grows_as_without_one():
    layer = GrowingLayer(capacity=6)
    layer.update(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    assert layer._key_buffer.shape[-2] == 6
    layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    assert layer._key_buffer.shape[-2] == 7 + 256 and layer.keys.shape[-2] == 7


def test_prefill_gives_back_the_memory_each_chunk_freed(monkeypatch):
    from selfextend import inference

    given_back, chunk_ends = [], []
    monkeypatch.setattr(inference, "return_freed_memory", lambda: given_back.append(len(chunk_ends)))
    model = selfextend.apply(make_model("gemma3"), 4, 8)
    inference.prefill(model, _ids(90), chunk_size=16, on_chunk=lambda end, cache: chunk_ends.append(end))
    assert chunk_ends == [16, 32, 48, 64, 80, 89] and given_back == [0, 1, 2, 3, 4, 5]


def test_a_large_cpu_buffer_is_a_huge_page_mapping_and_a_small_one_torch_memory():
    """A decode step reads every full layer's keys and values whole: buffers of 2 MB or more (a long document's)
    get the huge-page mapping the int8 weights get (allocator.huge_page_empty); what the layer holds is unchanged."""
    from selfextend.allocator import HUGE_PAGE
    from selfextend.kv_cache import room_for

    keys = torch.randn(1, 1, 3000, 256)  # 3 MB
    big = GrowingLayer(capacity=3001)
    big.update(keys, keys.clone())
    assert big._key_buffer.data_ptr() % HUGE_PAGE == 0 and big._value_buffer.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(big.keys, keys) and torch.equal(big.values, keys)
    small = room_for(None, 10, keys[..., :10, :], None)
    assert small.shape == (1, 1, 10 + 256, 256)
    grown = room_for(None, 5000, keys, keys[..., :5, :], dtype=torch.float16)  # 3 MB in float16
    assert grown.data_ptr() % HUGE_PAGE == 0 and torch.equal(grown[..., :5, :], keys[..., :5, :].half())
