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
