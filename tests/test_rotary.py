import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import selfextend
from selfextend.rotary import KEPT_BLOCKS, TABLE_BLOCK, GroupedRotation, RopeSource, rotate_by, rotation_tables
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


def test_grouped_angles_are_the_same_bits_however_asked_and_kept_a_few_blocks_at_a_time():
    """A position's angles do not depend on the call that first built them, the whole-length table (the vLLM
    kernel's) holds the same bits, and `angles` keeps a few blocks, not a table as long as the input."""
    holder = torch.nn.Module()
    holder.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 64, 2).double() / 64)).float())
    forward, backward = (GroupedRotation(8, 512, RopeSource(holder, "inv_freq")) for _ in range(2))
    spans = [(0, 2048), (2048, 7000), (7000, 7001), (4095, 4097), (3 * TABLE_BLOCK + 5, 5 * TABLE_BLOCK + 9)]
    for kind in ("query", "key"):
        for rotation, order in ((forward, spans), (backward, spans[::-1])):
            for start, stop in order:
                rotation.angles(torch.arange(start, stop)[None], kind, torch.device("cpu"))
            assert len(rotation._blocks[(kind, torch.device("cpu"))]) <= KEPT_BLOCKS
        for start, stop in spans:
            positions = torch.arange(start, stop)[None]
            cos, sin = forward.angles(positions, kind, torch.device("cpu"))
            again = backward.angles(positions, kind, torch.device("cpu"))
            whole = backward.table(kind, stop, torch.device("cpu"))
            assert torch.equal(cos, again[0]) and torch.equal(sin, again[1])
            assert torch.equal(cos[0], whole[0][start:stop]) and torch.equal(sin[0], whole[1][start:stop])
            expected = rotation_tables(forward._shift(kind, positions[0]), holder.inv_freq)
            torch.testing.assert_close((cos[0], sin[0]), expected, atol=1e-6, rtol=0)
    padded = torch.tensor([[-3, -1, 0, 1], [9000, 9001, 9002, 9003]])  # rows of a left-padded batch
    cos, _ = forward.angles(padded, "key", torch.device("cpu"))
    assert torch.equal(cos[1], forward.angles(padded[1:], "key", torch.device("cpu"))[0][0])
    assert torch.equal(cos[0, :2], cos[0, 2:3].expand(2, -1))  # padding takes position 0's angles


def test_frequencies_changed_in_place_or_replaced_rebuild_the_angles():
    """Dynamic RoPE changes the frequencies between calls (a new tensor, or written in place): the kept blocks
    are rebuilt from the new ones; unchanged ones are not compared again at every call."""
    holder = torch.nn.Module()
    holder.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    rotation = GroupedRotation(4, 32, RopeSource(holder, "inv_freq"))
    positions, cpu = torch.arange(100, 103)[None], torch.device("cpu")

    def expected():
        return rotation_tables(rotation._shift("key", positions[0]), holder.inv_freq)[0]

    assert torch.equal(rotation.angles(positions, "key", cpu)[0][0], expected())
    holder.inv_freq.mul_(0.5)  # in place
    assert torch.equal(rotation.angles(positions, "key", cpu)[0][0], expected())
    holder.inv_freq = holder.inv_freq * 0.25  # replaced
    assert torch.equal(rotation.angles(positions, "key", cpu)[0][0], expected())
    with torch.inference_mode():  # an inference tensor counts no writes: compared at every call
        holder.inv_freq = holder.inv_freq * 2
        assert torch.equal(rotation.angles(positions, "key", cpu)[0][0], expected())
        holder.inv_freq.mul_(3)
        assert torch.equal(rotation.angles(positions, "key", cpu)[0][0], expected())


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
