import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import selfextend
from selfextend.rotary import rotate_by
from conftest import COMMON


def _hf_rope(x, positions, inv_freq):
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    out, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    return out


def test_rotating_a_rotated_vector_moves_its_position():
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    x = torch.randn(2, 3, 10, 16)
    p = torch.randint(0, 500, (2, 10))
    delta = torch.randint(-300, 300, (2, 10))
    moved = rotate_by(_hf_rope(x, p, inv_freq), delta, inv_freq)
    torch.testing.assert_close(moved, _hf_rope(x, p + delta, inv_freq), atol=2e-5, rtol=1e-4)


def test_model_without_rope_is_refused():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(selfextend.UnsupportedModelError, match="no rotary position embedding"):
        selfextend.apply(model, 4, 8)


def test_partial_rotary_is_refused():
    config = transformers.PhiConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=64)
    with pytest.raises(selfextend.UnsupportedModelError, match="partial rotary"):
        selfextend.apply(transformers.PhiForCausalLM(config), 4, 8)


def test_multimodal_rope_is_refused():
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, rope_parameters=rope))
    with pytest.raises(selfextend.UnsupportedModelError, match="M-RoPE"):
        selfextend.apply(model, 4, 8)
