"""A decode step's RoPE in C: the same bits as transformers' rotate-half formula, given to every family whose
attention calls it through its own wrapper, and never to a formula it does not recognise."""

from types import MethodType

import pytest
import torch
import transformers.models.gemma3.modeling_gemma3 as gemma3

import selfextend
from selfextend import rope_native
from selfextend.integration import _attention_modules
from selfextend.transformers_compat import cache_kwargs, rotary_wrappers
from selfextend.weights import compress
from conftest import FAMILIES, make_model


def _formula(q, k, cos, sin, unsqueeze_dim=1):
    return gemma3.apply_rotary_pos_emb.forward(q, k, cos, sin, unsqueeze_dim)


@pytest.mark.parametrize("heads,kv_heads,n,d", [(4, 1, 1, 256), (8, 2, 3, 64), (3, 3, 16, 6), (2, 1, 2, 2)])
def test_the_rotation_is_transformers_bit_for_bit(heads, kv_heads, n, d):
    generator = torch.Generator().manual_seed(n)
    for magnitude in (1e-40, 1e-3, 1.0, 1e30):  # subnormal products, ordinary, near float32's largest
        q = torch.randn(2, n, heads, d, generator=generator).mul(magnitude).transpose(1, 2)  # as a model views it
        k = torch.randn(2, kv_heads, n, d, generator=generator).mul(magnitude)
        angles = torch.randn(2, n, d, generator=generator) * 1000
        cos, sin = angles.cos(), angles.sin()
        assert rope_native._takes(q, k, cos, sin, 1)
        for got, want in zip(rope_native.rotate(q, k, cos, sin), _formula(q, k, cos, sin)):
            assert torch.equal(got, want)


def test_calls_it_does_not_take_run_the_models_own_function():
    seen = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        seen.append(q.shape[2])
        return _formula(q, k, cos, sin, unsqueeze_dim)

    forward = MethodType(rope_native.native_forward(original), object())
    long = torch.randn(1, 2, rope_native.NATIVE_POSITIONS + 1, 8)
    angles = torch.randn(1, long.shape[2], 8)
    for q, cos in ((long, angles), (long[:, :, :1].double(), angles[:, :1].double())):
        k = q[:, :1]
        got = forward(q, k, cos.cos(), cos.sin())
        assert all(torch.equal(a, b) for a, b in zip(got, _formula(q, k, cos.cos(), cos.sin())))
    assert seen == [rope_native.NATIVE_POSITIONS + 1, 1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_that_calls_rope_through_a_wrapper_gets_the_native_one(family):
    """The version check: transformers (with `kernels`) gives each attention module its RoPE wrapper; Phi-3
    rotates part of each head its own way and calls no wrapper."""
    model = make_model(family)
    attention = _attention_modules(model)
    wrappers = len(list(rotary_wrappers(model)))
    assert wrappers == (0 if family == "phi3" else len(attention))
    assert rope_native.fuse_rotary(model) == (wrappers, 0)
    assert rope_native.fuse_rotary(model) == (wrappers, 0)  # again: nothing changes


def test_a_formula_it_does_not_recognise_is_left_alone_and_int8_says_so(monkeypatch):
    model = make_model("llama")
    wrapper, _ = next(rotary_wrappers(model))
    monkeypatch.setattr(type(wrapper), "forward", lambda self, q, k, cos, sin, unsqueeze_dim=1: (q * cos[:, None],
                                                                                               k * cos[:, None]))
    layers = len(_attention_modules(model))
    with pytest.warns(UserWarning, match=f"RoPE in C, but {layers} attention layers .* does not recognise"):
        compress(model, "int8")
    assert not any("forward" in w.__dict__ for w, _ in rotary_wrappers(model))  # each runs its own formula


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_int8_models_decode_the_same_logits_with_the_native_rope(family, monkeypatch):
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    runs = []
    for native in (False, True):
        if not native:
            monkeypatch.setattr(rope_native, "fuse_rotary", lambda model: (0, 0))
        else:
            monkeypatch.undo()
        model = selfextend.apply(compress(make_model(family), "int8"), 4, 8)
        assert all(getattr(w.forward, "selfextend_native", False) for w, _ in rotary_wrappers(model)) == native
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            cache, steps = out.past_key_values, []
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(6):
                logits = model(token, **cache_kwargs(model, cache), use_cache=True).logits
                steps.append(logits)
                token = logits[:, -1:].argmax(-1)
        runs.append(torch.cat(steps, 1))
    assert torch.equal(runs[0], runs[1])
