"""Whole-model exactness on tiny seeded models of every covered family: every phase, padded batches."""

import pytest
import torch
from transformers import DynamicCache

import selfextend
from selfextend.attention import blockwise
from selfextend.transformers_compat import cache_kwargs
from conftest import TRAIN_LENGTH, check_greedy_generate_is_recompute, make_model

G, W = 4, 8  # extended limit (64 - 8)·4 + 8 = 232 tokens


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK", 32)  # many blocks even at test lengths


def _ids(n, seed=1, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def test_short_input_is_vanilla(family):
    model = make_model(family)
    ids = _ids(W)
    vanilla = _logits(model, ids)
    selfextend.apply(model, G, W)
    torch.testing.assert_close(_logits(model, ids), vanilla, atol=1e-5, rtol=1e-5)


def test_group_size_one_is_vanilla(family):
    # Past every window: for Gemma 3 this also checks the sliding layers keep their 12-token window
    model = make_model(family)
    ids = _ids(150)
    vanilla = _logits(model, ids)
    selfextend.apply(model, 1, W)
    torch.testing.assert_close(_logits(model, ids), vanilla, atol=1e-5, rtol=1e-5)


def test_prefill_matches_oracle_and_differs_from_vanilla(family):
    model = make_model(family)
    ids = _ids(200)
    vanilla = _logits(model, ids)
    selfextend.apply(model, G, W, backend="reference")
    oracle = _logits(model, ids)
    selfextend.apply(model, G, W)
    got = _logits(model, ids)
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)
    assert (got - vanilla).abs().max() > 1e-3


def test_chunked_prefill_matches_one_shot(family):
    model = selfextend.apply(make_model(family), G, W)
    ids = _ids(200)
    one_shot = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    chunks = [_logits(model, ids[:, a:a + 37], **cache_kwargs(model, cache), use_cache=True) for a in range(0, 200, 37)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_full_recompute(family):
    model = selfextend.apply(make_model(family), G, W)
    check_greedy_generate_is_recompute(model, _ids(150), 12)


def test_left_padded_batch_rows_match_alone(family):
    model = selfextend.apply(make_model(family), G, W)
    long, short = _ids(160, seed=2)[0], _ids(110, seed=3)[0]
    pad = len(long) - len(short)
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = (torch.arange(len(long))[None] >= torch.tensor([0, pad])[:, None]).long()
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True)
        for row, alone_ids in enumerate([long, short]):
            alone = model.generate(alone_ids[None], max_new_tokens=8, do_sample=False, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
            assert torch.equal(together.sequences[row, -8:], alone.sequences[0, -8:])
            for step_batch, step_alone in zip(together.logits, alone.logits):
                torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-4, rtol=1e-4)


def test_apply_twice_replaces_settings_and_remove_restores():
    model = make_model("llama")
    ids = _ids(150)
    vanilla = _logits(model, ids)
    selfextend.apply(model, 2, 16)
    selfextend.apply(model, G, W)
    assert selfextend.settings(model).group_size == G
    again = _logits(model, ids)
    fresh = _logits(selfextend.apply(make_model("llama"), G, W), ids)
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)
    selfextend.remove(model)
    assert selfextend.settings(model) is None
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, ids), vanilla, atol=0, rtol=0)


def test_two_models_keep_their_own_settings():
    a = selfextend.apply(make_model("llama"), G, W)
    b = selfextend.apply(make_model("llama"), 2, 16)
    ids = _ids(150)
    expect_a = _logits(selfextend.apply(make_model("llama"), G, W), ids)
    torch.testing.assert_close(_logits(a, ids), expect_a, atol=0, rtol=0)
    assert (_logits(b, ids) - expect_a).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(group_size=0, window_size=8), ValueError, "group_size must be >= 1"),
    (dict(group_size=4, window_size=-1), ValueError, "window_size must be >= 1"),
    (dict(group_size=2.5, window_size=8), TypeError, "group_size must be an integer"),
    (dict(group_size=4, window_size=TRAIN_LENGTH), ValueError, "smaller than the model's training length"),
    (dict(group_size=4), ValueError, "both group_size and window_size"),
    (dict(), ValueError, "input_length"),
    (dict(group_size=4, window_size=8, backend="cuda-magic"), ValueError, "unknown attention backend"),
])
def test_bad_settings_are_refused(kwargs, error, match):
    model = make_model("llama")
    with pytest.raises(error, match=match):
        selfextend.apply(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_planned_settings_and_too_long_warning():
    model = selfextend.apply(make_model("llama"), input_length=200)
    chosen = selfextend.settings(model)
    assert chosen.max_length >= 200
    with pytest.warns(UserWarning, match=r"exceeds the SelfExtend limit \(L - W\)·G \+ W = 232"):
        _logits(selfextend.apply(model, G, W), _ids(240))


def test_hopeless_length_still_warns_instead_of_failing():
    model = selfextend.apply(make_model("llama"), 2, 8)  # limit (64 - 8)·2 + 8 = 120; 5000 tokens need G > 64
    with pytest.warns(UserWarning, match="need a group size above 64"):
        _logits(model, _ids(5000))


def test_gradients_match_oracle():
    """With autograd on (fine-tuning, or no torch.no_grad), gradients equal the oracle's."""
    grads = {}
    for backend in ("reference", "blockwise"):
        model = make_model("llama")
        selfextend.apply(model, G, W, backend=backend)
        model(_ids(200), labels=_ids(200)).loss.backward()
        grads[backend] = model.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(grads["blockwise"], grads["reference"], atol=1e-5, rtol=1e-4)
