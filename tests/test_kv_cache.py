"""The growing KV cache: what DynamicCache holds, without a copy per token, and never writing into tensors
that someone else holds."""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import selfextend
from selfextend.inference import prefill
from selfextend.kv_cache import GrowingLayer, new_cache
from selfextend.transformers_compat import cache_kwargs
from conftest import make_model


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def test_full_attention_layers_grow_and_sliding_layers_stay():
    config = make_model("gemma3").config
    kinds = [type(layer) for layer in new_cache(config).layers]
    plain = [type(layer) for layer in DynamicCache(config=config).layers]
    assert kinds == [GrowingLayer if kind is DynamicLayer else kind for kind in plain]
    assert GrowingLayer in kinds and len(set(kinds)) == 2


def test_holds_what_the_concatenating_cache_holds_and_decodes_in_place():
    model = selfextend.apply(make_model("gemma3"), 4, 8)
    ids = _ids(90)
    growing = prefill(model, ids, chunk_size=16)
    dynamic = prefill(model, ids, chunk_size=16, cache=DynamicCache(config=model.config))
    layer = next(l for l in growing.layers if isinstance(l, GrowingLayer))
    buffer = layer._key_buffer.data_ptr()
    for token, mode in ((5, torch.inference_mode), (7, torch.inference_mode), (9, torch.no_grad), (4, torch.no_grad)):
        with mode():  # prefill's mode (in place), then outside it (torch needs a new buffer once)
            step = torch.tensor([[token]])
            got = model(step, **cache_kwargs(model, growing), use_cache=True).logits
            expected = model(step, **cache_kwargs(model, dynamic), use_cache=True).logits
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        if token == 7:
            assert layer._key_buffer.data_ptr() == buffer  # the decode steps wrote into room kept for them
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
