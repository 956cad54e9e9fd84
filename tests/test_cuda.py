"""The GPU path on a real GPU: compiled FlexAttention against the oracle at sizes that take its block-mask
path, and whole models on CUDA (prefill, chunked prefill, decode) against the oracle and full recompute.
Skipped where torch sees no CUDA device; the same code runs uncompiled on CPU in test_kernels/test_models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import selfextend
from conftest import check_greedy_generate_is_recompute, make_model
from selfextend.attention import flex
from selfextend.attention.reference import reference_attention
from selfextend.positions import string_offset
from selfextend.transformers_compat import cache_kwargs
from test_kernels import check_flex_against_oracle, make_problem, make_rotation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
HEAD_DIM = 64
G, W = 4, 8  # the tiny models' settings, as in test_models


def _problem(n_queries: int, n_keys: int, pads: list[int], dtype=torch.float32):
    """test_kernels' problem at a model's head size on the GPU: rotated queries over keys, values, geometry."""
    _, _, v, q, k, geometry = make_problem(n_queries, n_keys, pads, heads=8, head_dim=HEAD_DIM, device=CUDA, dtype=dtype)
    return q, k, v, geometry


ROTATIONS = {"selfextend": lambda: make_rotation(4, 256, head_dim=HEAD_DIM, device=CUDA),
             "string": lambda: make_rotation(1, 700, string_offset(700, 128), head_dim=HEAD_DIM, device=CUDA)}


@pytest.mark.parametrize("n_queries, n_keys, pads", [(1024, 1024, [0]), (300, 2000, [0]), (640, 640, [0, 37])])
@pytest.mark.parametrize("method", sorted(ROTATIONS))
def test_compiled_flex_matches_oracle(n_queries, n_keys, pads, method):
    assert n_queries >= flex.MIN_QUERIES  # the block-mask path, compiled on CUDA
    q, k, v, geometry = _problem(n_queries, n_keys, pads)
    check_flex_against_oracle(flex, q, k, v, geometry, ROTATIONS[method](), 0.125, local_window=512)


def test_bfloat16_flex_adds_no_error_beyond_bfloat16_attention():
    """In bfloat16, SelfExtend's error against the float32 oracle stays within twice what bfloat16 costs plain
    attention (torch's SDPA against float32) on the same inputs: the merge of two passes adds none of its own."""
    q, k, v, geometry = _problem(2048, 2048, [0], dtype=torch.bfloat16)
    rotation = ROTATIONS["selfextend"]()
    got = flex.selfextend_attention(q, k, v, geometry, rotation, 0.125).float()
    expected = reference_attention(q.float(), k.float(), v.float(), geometry, rotation, 0.125)
    sdpa = lambda x, y, z: F.scaled_dot_product_attention(x, y, z, is_causal=True, scale=0.125, enable_gqa=True)
    vanilla_error = (sdpa(q, k, v).float() - sdpa(q.float(), k.float(), v.float())).abs().max()
    assert (got - expected).abs().max() <= 2 * vanilla_error


FAMILIES = ["gemma3", "llama", "llama3", "mistral", "phi3", "qwen2", "qwen3"]


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed)).to(CUDA)


@torch.no_grad()
def _logits(model, ids, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_model_on_cuda_matches_oracle_and_cpu(family):
    """Prefill (flex), chunked prefill (flex, then blockwise with kept grouped keys) and greedy decode on the GPU."""
    cpu_model = selfextend.apply(make_model(family), G, W)
    model = make_model(family).to(CUDA)
    selfextend.apply(model, G, W, backend="reference")
    ids = _ids(200)
    oracle = _logits(model, ids)
    selfextend.apply(model, G, W)  # auto: flex on CUDA
    got = _logits(model, ids)
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.cpu(), _logits(cpu_model, ids.cpu()), atol=1e-4, rtol=1e-4)

    cache = DynamicCache(config=model.config)
    chunks = [_logits(model, ids[:, a:b], **cache_kwargs(model, cache), use_cache=True) for a, b in ((0, 150), (150, 200))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), oracle, atol=1e-5, rtol=1e-5)
    check_greedy_generate_is_recompute(model, ids, 8)


def _generate(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen3"])
def test_static_cache_generate_on_cuda_gives_the_oracle_tokens(family):
    model = selfextend.apply(make_model(family).to(CUDA), G, W)
    oracle = selfextend.apply(make_model(family).to(CUDA), G, W, backend="reference")
    ids = _ids(200)
    static = _generate(model, ids, cache_implementation="static")
    assert torch.equal(static, _generate(model, ids))
    assert torch.equal(static, _generate(oracle, ids))


def test_inductor_compiled_static_generate_on_cuda_gives_the_oracle_tokens():
    """torch.compile's default backend (inductor, CUDA) over model.forward, as transformers documents it."""
    torch._dynamo.reset()
    model = selfextend.apply(make_model("llama").to(CUDA), G, W)
    model.forward = torch.compile(model.forward)
    ids = _ids(200)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
        oracle = selfextend.apply(make_model("llama").to(CUDA), G, W, backend="reference").generate(
            ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, oracle)
