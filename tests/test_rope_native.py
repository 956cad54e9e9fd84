"""A decode step's RoPE in C: the same bits as transformers' rotate-half formula, given to every family whose
attention calls it through its own wrapper, and never to a formula it does not recognise; SelfExtend's grouped
rotation of a decode step's rows in C, the same bits as torch's."""

from types import MethodType

import pytest
import torch
import transformers.models.gemma3.modeling_gemma3 as gemma3

import selfextend
from selfextend import rope_native
from selfextend.integration import _attention_modules
from selfextend.rotary import GroupedRotation, RopeSource, native_turn, rotate, rotation_tables
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,n,d", [(1, 4, 1, 256), (2, 3, 5, 6), (1, 1, 16, 2)])
def test_the_grouped_rotation_is_torchs_bit_for_bit(dtype, b, h, n, d):
    """rotary.rotate fuses addcmul_'s product into its sum: the C rotation must round exactly as it does, float16
    rows rotated in float32 and rounded once (a float16 cache's kept keys are written by both, prefill and decode)."""
    generator = torch.Generator().manual_seed(n * d)
    for magnitude in (1e-40, 1e-3, 1.0, 1e4):  # subnormal, ordinary, near float16's largest (65504)
        x = (torch.randn(b, n, h, d, generator=generator) * magnitude).to(dtype).transpose(1, 2)  # strided heads
        cos, sin = rotation_tables(torch.randint(0, 10**6, (b, n), generator=generator), torch.rand(d // 2) * 2)
        assert rope_native.turns(x, cos, sin)
        want = rotate(x.float(), cos[:, None], sin[:, None]).to(dtype)
        assert torch.equal(rope_native.turn(x, cos, sin), want)


def test_grouped_rotation_takes_the_c_call_for_a_decode_steps_rows_only(monkeypatch):
    rotation = GroupedRotation(4, 8, RopeSource(torch.nn.Module(), "inv_freq"))
    rotation.rope.module.register_buffer("inv_freq", torch.rand(4))
    assert native_turn()
    calls = []
    original = rope_native.turn
    monkeypatch.setattr(rope_native, "turn", lambda *args: calls.append(args[0].shape[2]) or original(*args))
    for n in (1, rope_native.NATIVE_POSITIONS, rope_native.NATIVE_POSITIONS + 1):
        x = torch.randn(1, 2, n, 8)
        positions = torch.arange(100, 100 + n)[None]
        cos, sin = rotation.angles(positions, "key", x.device)
        assert torch.equal(rotation(x, positions, "key"), rotate(x, cos[:, None], sin[:, None]))
        assert torch.equal(rotation(x, 100, "key"), rotate(x, cos[:, None], sin[:, None]))  # from an int position
    x = torch.randn(1, 2, 1, 8, requires_grad=True)  # autograd: torch's operations
    rotation(x, torch.tensor([[5]]), "query").sum().backward()
    assert x.grad is not None
    assert calls == [1, 1, rope_native.NATIVE_POSITIONS, rope_native.NATIVE_POSITIONS]
