"""The compared methods: parsing, fitted parameters, and RoPE scalings equal to transformers' own models."""

import copy

import pytest
import torch
import transformers

from selfextend.evaluation.methods import Method, applied
from selfextend.planning import InputTooLongError
from selfextend.transformers_compat import cache_kwargs
from conftest import TRAIN_LENGTH, make_model


def test_parse_and_spec():
    assert Method.parse("vanilla").spec == "vanilla"
    assert Method.parse("selfextend:G=8,W=32").fixed == {"G": 8, "W": 32}
    assert Method.parse("yarn:factor=3").spec == "yarn:factor=3.0"
    for bad in ["nope", "linear:G=2", "selfextend:G=8", "yarn:factor=", "vanilla:factor=2"]:
        with pytest.raises(ValueError):
            Method.parse(bad)


def test_parse_list_keeps_parameters_with_their_method():
    specs = [m.spec for m in Method.parse_list("vanilla, selfextend:G=8,W=32,yarn:factor=2,dynamic")]
    assert specs == ["vanilla", "selfextend:G=8,W=32", "yarn:factor=2.0", "dynamic"]


def test_parameters_fitted_to_length():
    model = make_model("llama")  # training length 64
    assert Method.parse("linear").parameters(model, 256) == {"factor": 4.0}
    assert Method.parse("dynamic").parameters(model, 32) == {"factor": 1.0}
    assert Method.parse("yarn:factor=8").parameters(model, 100) == {"factor": 8.0}
    assert Method.parse("selfextend").parameters(model, 256) == {"G": 10, "W": 16}  # the planner's choice
    assert Method.parse("selfextend").parameters(model, 256, effective_length=32) == {"G": 20, "W": 8}
    with pytest.raises(InputTooLongError):
        Method.parse("selfextend").parameters(model, 10**7)


def _native(model, rope: dict):
    """The same weights in a model whose config asks transformers for `rope` on full-attention layers."""
    config = copy.deepcopy(model.config)
    if isinstance(config.rope_parameters.get("full_attention"), dict):
        config.rope_parameters = {**config.rope_parameters,
                                  "full_attention": {**config.rope_parameters["full_attention"], **rope}}
    else:
        config.rope_parameters = {**config.rope_parameters, **rope}
    native = type(model)(config).eval()
    native.load_state_dict(model.state_dict())
    native.set_attn_implementation("sdpa")
    return native


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("rope_type", ["linear", "yarn", "dynamic"])
def test_rope_scaling_equals_transformers_model(family, rope_type):
    """Swapped frequencies give the logits of a model built with that rope type, over one whole forward."""
    model = make_model(family)
    n = 3 * TRAIN_LENGTH
    ids = torch.randint(0, 97, (1, n))
    before = model(ids).logits
    native = _native(model, {"rope_type": rope_type, "factor": 3.0,
                             "original_max_position_embeddings": TRAIN_LENGTH})
    with applied(model, Method.parse(f"{rope_type}:factor=3"), n) as params:
        ours = model(ids).logits
    assert params == {"factor": 3.0}
    torch.testing.assert_close(ours, native(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, before, atol=1e-3)  # the scaling changed something
    assert torch.equal(model(ids).logits, before)  # and is undone on exit


def test_dynamic_is_frozen_across_chunks():
    """Chunked prefill under `dynamic` uses the frequencies of the whole length, as one forward would."""
    model = make_model("llama")
    n = 3 * TRAIN_LENGTH
    ids = torch.randint(0, 97, (1, n))
    with applied(model, Method.parse("dynamic"), n):
        whole = model(ids).logits[:, -1]
        cache = transformers.DynamicCache(config=model.config)
        for start in range(0, n, 40):
            last = model(ids[:, start:start + 40], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(last, whole, atol=1e-5, rtol=1e-5)


def test_selfextend_applied_and_removed():
    model = make_model("llama")
    ids = torch.randint(0, 97, (1, 4 * TRAIN_LENGTH))
    before = model(ids).logits
    with applied(model, Method.parse("selfextend:G=4,W=16"), ids.shape[1]) as params:
        extended = model(ids).logits
    assert params == {"G": 4, "W": 16}
    assert not torch.allclose(extended, before, atol=1e-3)
    assert torch.equal(model(ids).logits, before)



@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_truncated_scores_each_token_from_a_fresh_window(family):
    """Each token's NLL equals a fresh forward over its window: the last C - s .. C - 1 tokens before it."""
    from selfextend.evaluation.perplexity import token_nll, truncated_nll

    model = make_model(family)
    n, context, stride = 3 * TRAIN_LENGTH + 5, TRAIN_LENGTH, TRAIN_LENGTH // 4
    ids = torch.randint(0, 97, (1, n))
    got = truncated_nll(model, ids, context, stride, chunk_size=24)
    assert got.shape == (n - 1,)
    torch.testing.assert_close(got[:context - 1], token_nll(model, ids[:, :context], chunk_size=24))
    with torch.no_grad():
        for target in range(context, n):
            window_end = min(n, context + -(-(target + 1 - context) // stride) * stride)
            start = window_end - context
            assert context - stride <= target - start <= context - 1
            logits = model(ids[:, start:target]).logits[0, -1]
            want = torch.nn.functional.cross_entropy(logits[None], ids[0, target:target + 1])
            torch.testing.assert_close(got[target - 1], want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, token_nll(model, ids))  # vanilla reads further back


def test_truncated_parameters_and_refusals():
    from selfextend.evaluation import Evaluation
    from selfextend.evaluation.perplexity import token_nll, truncated_nll

    model = make_model("llama")
    ids = torch.randint(0, 97, (1, TRAIN_LENGTH))
    torch.testing.assert_close(truncated_nll(model, ids, TRAIN_LENGTH, 8), token_nll(model, ids))
    assert Method.parse("truncated").parameters(model, 500) == {"C": TRAIN_LENGTH, "s": TRAIN_LENGTH // 4}
    assert Method.parse("truncated:C=40,s=5").parameters(model, 500) == {"C": 40, "s": 5}
    for bad in ["truncated:C=0", "truncated:C=8,s=8", "truncated:s=0"]:
        with pytest.raises(ValueError):
            Method.parse(bad)
    with pytest.raises(ValueError, match="perplexity only"):
        Evaluation("passkey", [100], [Method.parse("truncated")], "m")
