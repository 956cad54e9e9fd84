"""One attention partial: inputs whose head dimension is not unit-stride (keys read from a transposed cache, as
vLLM's CPU cache keeps them) give what contiguous ones give."""

import torch

from selfextend.attention.partial import attend


def test_a_strided_head_dimension_gives_the_contiguous_result():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    strided = key.transpose(2, 3).contiguous().transpose(2, 3)  # same values, head dimension strided
    assert strided.stride(-1) != 1
    for causal in (False, True):
        got, got_lse = attend(query, strided, value, None, 0.2, causal)
        expected, expected_lse = attend(query, key, value, None, 0.2, causal)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        torch.testing.assert_close(got_lse, expected_lse, atol=0, rtol=0)


def test_a_decode_steps_few_rows_match_the_explicit_form():
    """The few-row path (heads folded into rows, value product split along the keys) is the explicit softmax:
    GQA, key counts not divisible by the split or below it, masks, a row that sees no key, strided caches."""
    from selfextend.attention.partial import FEW_ROWS, SPLITS, _attend_few, _attend_math, _no_key_rows

    torch.manual_seed(0)
    for n, hq, hkv, m in [(1, 4, 1, 1037), (1, 8, 2, SPLITS - 3), (2, 4, 2, 64), (1, 9, 3, 5000)]:
        assert hq // hkv * n <= FEW_ROWS
        query = torch.randn(2, hq, n, 32)
        buffer_k, buffer_v = torch.randn(2, hkv, m + 40, 32), torch.randn(2, hkv, m + 40, 32)
        key, value = buffer_k[:, :, :m], buffer_v[:, :, :m]  # views of a cache with room to spare
        mask = torch.rand(2, 1, n, m) > 0.3
        mask[1, :, 0] = False  # a row that sees no key
        for given in (None, mask):
            got, got_lse = _no_key_rows(*_attend_few(query, key, value, given, 0.2), given)
            expected, expected_lse = _attend_math(query, key, value, given, 0.2)
            if given is not None:
                expected = expected.masked_fill(~given.any(-1)[..., None], 0.0)
                expected_lse = expected_lse.masked_fill(~given.any(-1), float("-inf"))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_a_decode_step_of_a_selfextend_model_takes_the_few_row_path(monkeypatch):
    """The few-row path is what a decode step runs over many keys (a quiet fallback to the one-thread kernel
    would fail here); over the few keys of its neighbor window it is one call of the flash kernel."""
    import selfextend
    from selfextend.attention import partial
    from selfextend.kv_cache import new_cache
    from selfextend.transformers_compat import cache_kwargs
    from conftest import make_model

    model = selfextend.apply(make_model("llama"), 64, 8)  # a limit of 3592 tokens
    ids = torch.randint(3, 97, (1, partial.FEW_KEYS + 100), generator=torch.Generator().manual_seed(1))
    cache = new_cache(model.config)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
        calls, few = [], partial._attend_few
        monkeypatch.setattr(partial, "_attend_few", lambda *args: calls.append(args[0].shape) or few(*args))
        model(ids[:, -1:], **cache_kwargs(model, cache), use_cache=True)
    assert len(calls) == model.config.num_hidden_layers  # the grouped partial of every layer (2100 keys)
