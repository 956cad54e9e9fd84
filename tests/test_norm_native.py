"""RMSNorm in C: every family's norms are recognised and computed as transformers computes them (only the order of
the sum of squares differs), and a norm of another form is left alone and named."""

import pytest
import torch
from torch import nn

from selfextend.norm_native import NativeNorm, fuse_norms, norm_scale
from selfextend.weights import compress
from conftest import FAMILIES, make_model


def _norms(model):
    return {name: m for name, m in model.named_modules() if "rmsnorm" in type(m).__name__.lower()}


def _randomised(model):
    """Norm weights away from their initial zeros or ones, so each form's multiplier matters."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in _norms(model).values():
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_norm_of_every_family_is_recognised_and_gives_what_transformers_gives(family):
    model = _randomised(make_model(family))
    norms = _norms(model)
    assert norms
    generator = torch.Generator().manual_seed(4)
    cases = {name: [torch.randn(shape + (norm.weight.shape[0],), generator=generator) * 2
                    for shape in [(1, 1), (2, 37), (4, 1100)]]  # 4400 rows: the threaded path (PARALLEL)
             for name, norm in norms.items()}
    expected = {name: [norms[name](x) for x in xs] for name, xs in cases.items()}
    assert fuse_norms(model) == []
    fused = dict(model.named_modules())
    for name, xs in cases.items():
        assert isinstance(fused[name], NativeNorm)
        for x, want in zip(xs, expected[name]):
            torch.testing.assert_close(fused[name](x), want)


def test_inputs_that_are_not_one_run_of_rows_give_the_same():
    norm = NativeNorm(torch.randn(64), 1e-6)
    x = torch.randn(4, 10, 64)
    torch.testing.assert_close(norm(x[:, ::3]), norm(x[:, ::3].contiguous()), atol=0, rtol=0)
    torch.testing.assert_close(norm(x.transpose(0, 1)), norm(x).transpose(0, 1), atol=0, rtol=0)


class _LayerNormWithoutMean(nn.Module):  # eps outside the root: not a form fuse_norms knows
    def __init__(self, d):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), 1e-6

    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps) * self.weight


class MyRMSNorm(_LayerNormWithoutMean):
    pass


def test_another_form_is_left_alone_and_named():
    model = nn.Sequential(MyRMSNorm(16), nn.LayerNorm(16, bias=False))
    assert norm_scale(model[0]) is None and norm_scale(model[1]) is None
    assert fuse_norms(model) == ["0"]
    assert isinstance(model[0], MyRMSNorm) and isinstance(model[1], nn.LayerNorm)


def test_int8_runs_the_norms_in_c_and_says_which_it_cannot():
    model = compress(make_model("gemma3"), "int8")
    assert not _norms(model) and any(isinstance(m, NativeNorm) for m in model.modules())
    odd = make_model("llama")
    odd.model.norm = MyRMSNorm(odd.config.hidden_size)
    with pytest.warns(UserWarning, match="model.norm"):
        compress(odd, "int8")


def test_refuses_what_it_does_not_compute():
    norm = NativeNorm(torch.ones(8), 1e-6)
    with pytest.raises(TypeError, match="float32"):
        norm(torch.ones(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="8 features"):
        norm(torch.ones(2, 9))
