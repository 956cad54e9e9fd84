"""Lighter weight formats: each layer computes what its stored weights say, and SelfExtend adds no error of its
own on a compressed model (it is compared with the same compressed model, vanilla and the reference oracle)."""

import pytest
import torch
from torch import nn
from transformers import DynamicCache

import selfextend
from selfextend.identity import model_identity
from selfextend.transformers_compat import cache_kwargs
from selfextend.weights import CompactEmbedding, PackedLinear, check_format, compress
from conftest import make_model

G, W = 4, 8
FORMATS = ["float16", "int8"]


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def test_float16_linear_is_the_half_precision_weight_in_float32_arithmetic():
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 48), torch.randn(3, 5, 64)
    expected = nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    torch.testing.assert_close(PackedLinear(linear, "float16")(x), expected, atol=1e-5, rtol=1e-5)


def test_int8_linear_is_its_int8_rows_up_to_each_tokens_activation_rounding():
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 48), torch.randn(4, 64) * torch.tensor([[1.0], [10.0], [0.1], [1000.0]])
    scale = linear.weight.abs().amax(1) / 127
    dequantized = torch.round(linear.weight / scale[:, None]) * scale[:, None]
    packed = PackedLinear(linear, "int8")
    got, expected = packed(x), nn.functional.linear(x, dequantized, linear.bias)
    step = x.abs().amax(1, keepdim=True) * 2 / 127  # each token's own 7-bit activation step
    bound = step / 2 * dequantized.abs().sum(1) + 1e-5 * expected.abs()
    assert ((got - expected).abs() <= bound).all()
    assert (got - expected).abs().max() > 0  # the activation rounding is real, so the bound above is the test
    for row in range(4):  # a token's result does not depend on the others in its call
        assert torch.equal(packed(x[row:row + 1])[0], got[row])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_embedding_rows_are_the_stored_rows_times_their_scales(family, fmt):
    model = make_model(family)
    original = model.get_input_embeddings()
    ids = torch.arange(original.num_embeddings)[None]
    compact = CompactEmbedding(original, fmt)
    weight, multiplier = original.weight.detach(), float(getattr(original, "embed_scale", 1.0))
    if fmt == "float16":
        stored = weight.half().float()
    else:
        stored = compact.rows.float() * compact.row_scale[:, None]
        assert (stored - weight).abs().max() <= compact.row_scale.max() / 2 + 1e-7
    torch.testing.assert_close(compact(ids)[0], stored * multiplier, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compress_replaces_every_linear_and_keeps_the_dense_identity(fmt):
    dense = make_model("gemma3")
    identity = model_identity(dense)
    model = compress(make_model("gemma3"), fmt)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.get_input_embeddings(), CompactEmbedding)
    assert model_identity(model) == identity
    ids = _ids(40)
    close = {"float16": 5e-3, "int8": 0.2}[fmt]  # quality, not exactness: the formats' cost on a random model
    assert (_logits(model, ids) - _logits(dense, ids)).abs().max() < close


# int8 quantizes each layer's input, so a last-bit difference between two exact attention kernels can move a
# value across a rounding boundary: its whole-model results are compared by quality (docs/results.md), and
# the attention it feeds is the same function the dense tests check.
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3"])
def test_selfextend_adds_no_error_of_its_own_on_float16_weights(family):
    model = compress(make_model(family), "float16")
    short, long = _ids(W), _ids(200)
    vanilla_short = _logits(model, short)
    selfextend.apply(model, G, W, backend="reference")
    oracle = _logits(model, long)
    selfextend.apply(model, G, W)
    torch.testing.assert_close(_logits(model, short), vanilla_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, long), oracle, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_on_float16_weights_matches_one_pass():
    model = selfextend.apply(compress(make_model("gemma3"), "float16"), G, W)
    ids = _ids(150)
    cache = DynamicCache(config=model.config)
    chunks = [_logits(model, ids[:, a:a + 37], **cache_kwargs(model, cache), use_cache=True) for a in range(0, 150, 37)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), _logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt, device, dtype, match", [
    ("int4", "cpu", "float32", "unknown weight format"),
    ("int8", "cpu", "bfloat16", "float32 compute on CPU"),
    ("float16", "cuda", "float32", "float32 compute on CPU"),
])
def test_formats_that_cannot_work_are_refused(fmt, device, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_format(fmt, device, dtype)
    check_format("dense", "cpu", "bfloat16")
