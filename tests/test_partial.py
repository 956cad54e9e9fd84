"""One attention partial: inputs whose head dimension is not unit-stride (keys read from a transposed cache, as
vLLM's CPU cache keeps them) give what contiguous ones give."""

import pytest
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


FEW_ROW_CASES = [  # (queries, query heads, KV heads, keys, head dim): GQA; keys past, within and under a chunk
    (1, 4, 1, 1037, 32), (1, 8, 2, 5, 32), (2, 4, 2, 64, 40), (1, 9, 3, 5000, 64), (1, 16, 1, 600, 24),
    (1, 1, 1, 513, 8)]


def _few_row_inputs(n, hq, hkv, m, d):
    query = torch.randn(2, hq, n, d)
    buffer_k, buffer_v = torch.randn(2, hkv, m + 40, d), torch.randn(2, hkv, m + 40, d)
    key, value = buffer_k[:, :, :m], buffer_v[:, :, :m]  # views of a cache with room to spare
    mask = torch.rand(2, 1, n, m) > 0.3
    mask[1, :, 0] = False  # a row that sees no key
    return query, key, value, mask


def _explicit(query, key, value, mask):
    """The explicit softmax, with a row that sees no key at output 0 and lse -inf."""
    from selfextend.attention.partial import _attend_math

    out, lse = _attend_math(query, key, value, mask, 0.2)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1)[..., None], 0.0)
        lse = lse.masked_fill(~mask.any(-1), float("-inf"))
    return out, lse


def test_a_decode_steps_few_rows_match_the_explicit_form():
    """The few-row paths, torch's (heads folded into rows, value product split along the keys) and the native
    kernel (rows padded to groups, keys in chunks merged by log-sum-exp), are the explicit softmax: GQA, key
    counts not divisible by the split, the chunk or the sub-block, head dims not divisible by the vector width,
    masks (per batch entry and broadcast), a row that sees no key, strided caches."""
    from selfextend.attention import few_native
    from selfextend.attention.partial import FEW_ROWS, SPLITS, _attend_few, _no_key_rows

    torch.manual_seed(0)
    assert any(m < SPLITS for _, _, _, m, _ in FEW_ROW_CASES)
    for n, hq, hkv, m, d in FEW_ROW_CASES:
        assert hq // hkv * n <= FEW_ROWS
        query, key, value, mask = _few_row_inputs(n, hq, hkv, m, d)
        for given in (None, mask, mask[:1]):
            expected, expected_lse = _explicit(query, key, value, given)
            for kernel in (_attend_few, few_native.attend_few):
                got, got_lse = _no_key_rows(*kernel(query, key, value, given, 0.2), given)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got_lse, expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("second_keys", [0, 1, 37, 3000])
def test_two_key_sets_in_one_native_call_are_the_softmax_over_both(second_keys):
    """attend_two: one softmax over two key sets, each with its own query (a decode step's neighbor keys and its
    grouped keys), as merging the two explicit partials gives; either set may be empty."""
    from selfextend.attention import few_native
    from selfextend.attention.merge import merge_states

    torch.manual_seed(3)
    for n, hq, hkv, m, d in FEW_ROW_CASES:
        query, key, value, _ = _few_row_inputs(n, hq, hkv, m, d)
        other, key_2, value_2, _ = _few_row_inputs(n, hq, hkv, second_keys, d)
        for first, second in (((query, key, value), (other, key_2, value_2)),
                              ((other, key_2, value_2), (query, key, value))):
            parts = [_explicit(*part, None) for part in (first, second)]
            expected = merge_states([o for o, _ in parts], [lse for _, lse in parts])
            expected_lse = torch.logaddexp(parts[0][1], parts[1][1])
            got, got_lse = few_native.attend_two(first, second, 0.2)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_the_decode_kernel_is_built_16_lanes_wide_where_the_cpu_has_avx512():
    """Built with -march=native, the kernel takes its 16-float path on an AVX-512 CPU, 8 floats elsewhere."""
    from selfextend.attention import few_native
    from selfextend.native import _cpu_flags  # the CPU flags the build is keyed by

    assert few_native.library().se_lanes() == (16 if "avx512f" in _cpu_flags().split() else 8)


def test_two_key_sets_refuse_queries_of_different_shapes():
    from selfextend.attention import few_native

    query, key, value, _ = _few_row_inputs(1, 4, 1, 10, 16)
    with pytest.raises(ValueError, match="must match"):
        few_native.attend_two((query, key, value), (query[:, :2], key, value), 0.2)


def test_the_native_kernel_reports_rows_that_see_no_key_itself():
    """Output 0 and lse -inf for a row whose mask hides every key, from the kernel alone (no clean-up after)."""
    from selfextend.attention import few_native

    torch.manual_seed(1)
    query, key, value, mask = _few_row_inputs(1, 4, 2, 700, 16)
    out, lse = few_native.attend_few(query, key, value, mask, 0.2)
    assert torch.equal(out[1, :, 0], torch.zeros(4, 16)) and bool((lse[1, :, 0] == float("-inf")).all())
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[0]).all())


def test_without_a_c_compiler_decode_attention_says_so_and_runs_on_torch(no_c_compiler):
    from selfextend.attention.partial import _attend_few, attend

    torch.manual_seed(2)
    query, key, value, _ = _few_row_inputs(1, 4, 1, 3000, 32)
    with pytest.warns(UserWarning, match="decode attention runs on torch's kernels.*no C compiler"):
        got, got_lse = attend(query, key, value, None, 0.2)
    expected, expected_lse = _attend_few(query, key, value, None, 0.2)
    assert torch.equal(got, expected) and torch.equal(got_lse, expected_lse)


def test_a_decode_step_of_a_selfextend_model_takes_the_native_few_row_path(monkeypatch):
    """The native few-row kernel is what a float32 decode step runs, over its many grouped keys and its few
    neighbors in one call (a quiet fallback to torch's kernels, or to two partials, would fail here)."""
    import selfextend
    from selfextend.attention import few_native, partial
    from selfextend.kv_cache import new_cache
    from selfextend.transformers_compat import cache_kwargs
    from conftest import make_model

    model = selfextend.apply(make_model("llama"), 64, 8)  # a limit of 3592 tokens
    ids = torch.randint(3, 97, (1, partial.FEW_KEYS + 100), generator=torch.Generator().manual_seed(1))
    cache = new_cache(model.config)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
        calls, two = [], few_native.attend_two
        monkeypatch.setattr(few_native, "attend_two",
                            lambda first, second, scale: calls.append((first[1].shape[2], second[1].shape[2]))
                            or two(first, second, scale))
        model(ids[:, -1:], **cache_kwargs(model, cache), use_cache=True)
    # every layer's one call: its neighbor window (the last 8 keys) and the grouped keys before them
    layers, n = model.config.num_hidden_layers, ids.shape[1]
    assert calls == [(8, n + 1 - 8)] * layers


def test_a_forward_pass_works_out_its_sequences_once_per_layout(monkeypatch):
    """Every layer of a pass gets the same layout and positions: their geometry is computed once per layout
    (Gemma's two: sliding and full), not once per layer, and a new pass computes it again."""
    import selfextend
    from selfextend import integration
    from selfextend.kv_cache import new_cache
    from selfextend.transformers_compat import cache_kwargs
    from conftest import make_model

    model = selfextend.apply(make_model("gemma3"), 4, 8)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = new_cache(model.config)
    computed, compute = [], integration._sequences_of
    monkeypatch.setattr(integration, "_sequences_of", lambda *args: computed.append(args[0]) or compute(*args))
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
        assert len(computed) == 2 and model.config.num_hidden_layers == 4
        model(ids[:, -1:], **cache_kwargs(model, cache), use_cache=True)
    assert len(computed) == 4
