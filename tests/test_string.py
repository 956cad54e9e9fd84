"""STRING (An et al., 2025) as the position map's second preset: the oracle read pair by pair against
STRING's own definition, every backend against the oracle, every family and phase exact, and its errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import selfextend
from conftest import TRAIN_LENGTH, check_greedy_generate_is_recompute, make_model, make_profile
from selfextend.attention import blockwise
from selfextend.attention.reference import reference_attention
from selfextend.positions import string_offset
from selfextend.rotary import GroupedRotation
from selfextend.transformers_compat import cache_kwargs
from test_kernels import check_flex_against_oracle, check_pair_by_pair, make_problem, make_rotation

S, w = 21, 5  # the tiny models' L = 64: S ≈ L/3


def _string_rotation(shifted_offset: int, local_window: int) -> GroupedRotation:
    return make_rotation(1, shifted_offset, string_offset(shifted_offset, local_window))


def test_oracle_reads_strings_definition_pair_by_pair():
    """Near when d = i - j < S (RoPE at i, j); far when d >= S, at relative position d - S + w. Each pair once."""
    shifted, local = 7, 2
    check_pair_by_pair(_string_rotation(shifted, local),
                       lambda i, j: (i, j) if i - j < shifted else (j + (i - j) - shifted + local, j))


@pytest.mark.parametrize("n_queries, n_keys", [(70, 70), (1, 70), (13, 70), (40, 90)])
@pytest.mark.parametrize("pads", [[0], [0, 11, 3]])
@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("shifted, local", [(20, 4), (6, 1), (30, 29)])
def test_blockwise_matches_oracle(n_queries, n_keys, pads, block, shifted, local):
    _, _, v, q, k, geometry = make_problem(n_queries, n_keys, pads)
    rotation = _string_rotation(shifted, local)
    expected = reference_attention(q, k, v, geometry, rotation, 0.3)
    got = blockwise.selfextend_attention(q, k, v, geometry, rotation, 0.3, block=block)
    rows = geometry.query_positions >= 0
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pads", [[0], [0, 11, 3]])
def test_flex_backend_matches_oracle(pads, monkeypatch):
    flex = pytest.importorskip("selfextend.attention.flex")
    monkeypatch.setattr(flex, "MIN_QUERIES", 2)
    _, _, v, q, k, geometry = make_problem(70, 90, pads)
    check_flex_against_oracle(flex, q, k, v, geometry, _string_rotation(20, 4), 0.3)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "DEFAULT_BLOCK", 16)


def _ids(n, seed=1):
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def _string(model):
    return selfextend.apply(model, method="string", shifted_offset=S, local_window=w)


def test_prefill_matches_oracle_and_differs_from_vanilla(family):
    model = make_model(family)
    ids = _ids(TRAIN_LENGTH)  # STRING works inside the training length
    vanilla = _logits(model, ids)
    selfextend.apply(model, method="string", shifted_offset=S, local_window=w, backend="reference")
    oracle = _logits(model, ids)
    got = _logits(_string(model), ids)
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)
    assert (got - vanilla).abs().max() > 1e-3


def test_chunked_prefill_and_decode_match_one_pass(family):
    model = _string(make_model(family))
    ids = _ids(60)
    one_shot = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    chunks = [_logits(model, ids[:, a:a + 13], **cache_kwargs(model, cache), use_cache=True) for a in range(0, 60, 13)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, atol=1e-5, rtol=1e-5)
    check_greedy_generate_is_recompute(model, ids[:, :50], 10)


def test_left_padded_batch_rows_match_alone(family):
    model = _string(make_model(family))
    long, short = _ids(56, seed=2)[0], _ids(40, seed=3)[0]
    pad = len(long) - len(short)
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = (torch.arange(len(long))[None] >= torch.tensor([0, pad])[:, None]).long()
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True)
        for row, alone_ids in enumerate([long, short]):
            alone = model.generate(alone_ids[None], max_new_tokens=6, do_sample=False, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
            for step_batch, step_alone in zip(together.logits, alone.logits):
                torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-4, rtol=1e-4)


def test_defaults_saved_settings_and_switching_back():
    model = selfextend.apply(make_model("llama"), method="string")
    config = selfextend.settings(model)
    assert (config.method, config.group_size, config.window_size, config.local_window) == ("string", 1, 21, 10)
    assert config.max_length == TRAIN_LENGTH
    assert model.config.selfextend == {"method": "string", "shifted_offset": 21, "local_window": 10}
    ids = _ids(60)
    expected = _logits(model, ids)
    selfextend.apply(model, 4, 8)
    assert selfextend.settings(model).method == "selfextend"
    model.config.selfextend = {"method": "string", "shifted_offset": 21, "local_window": 10}
    selfextend.apply(model)  # a bare apply restores what the config saved
    torch.testing.assert_close(_logits(model, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shifted_offset=TRAIN_LENGTH), ValueError, "smaller than the model's training length"),
    (dict(shifted_offset=20, local_window=20), ValueError, "local_window .* smaller than shifted_offset"),
    (dict(shifted_offset=20, local_window=0), ValueError, "local_window must be >= 1"),
    (dict(input_length=TRAIN_LENGTH + 1), ValueError, "past the training length L = 64, and STRING does not extend"),
    (dict(group_size=4, window_size=8), ValueError, "not group_size and window_size"),
])
def test_bad_string_settings_are_refused(kwargs, error, match):
    model = make_model("llama")
    with pytest.raises(error, match=match):
        selfextend.apply(model, method="string", **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_string_settings_without_the_method_are_refused():
    with pytest.raises(ValueError, match="method='string'"):
        selfextend.apply(make_model("llama"), shifted_offset=20)
    with pytest.raises(ValueError, match="unknown method"):
        selfextend.apply(make_model("llama"), 4, 8, method="yarn")


def test_eval_method_and_command_line(capsys):
    from selfextend.cli import main
    from selfextend.evaluation.methods import Method, applied

    model = make_model("llama")
    method = Method.parse("string:S=20,w=4")
    with applied(model, method, 60) as params:
        assert params == {"S": 20, "w": 4} and selfextend.settings(model).offset == 4 - 20
    assert selfextend.settings(model) is None
    assert Method.parse("string").parameters(model, 60) == {"S": 21, "w": 10}
    with pytest.raises(ValueError, match="does not extend"), applied(model, Method.parse("string"), 65):
        pass
    assert main(["plan", "--model", "testbed", "--length", "100", "--method", "string", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"method": "string"' in out and '"window_size": 42' in out and '"local_window": 21' in out
    assert main(["plan", "--model", "testbed", "--length", "200", "--method", "string"]) == 2
    assert "does not extend past it" in capsys.readouterr().err
    assert main(["plan", "--model", "testbed", "--length", "100", "--local-window", "3"]) == 2
    assert "add --method string" in capsys.readouterr().err


def test_compare_runs_both_methods_on_the_same_probes():
    from selfextend import models
    from selfextend.evaluation.calibration import CalibrationError, Probes, compare, compare_lengths

    source = models.resolve("testbed")
    tokenizer, model = models.load_tokenizer(source), models.load_model(source)
    profile = make_profile(effective=64, train=128)
    assert compare_lengths(profile) == [96, 126]
    probes = Probes(tasks=("passkey",), depths=(0.5,))
    compared = compare(model, tokenizer, profile, probes, lengths=[100], progress=False)
    assert set(compared.methods) == {"selfextend", "string"}
    assert all(r[100]["total"] == 1 for r in compared.methods.values())
    assert selfextend.settings(model) is None  # each method undone
    with pytest.raises(CalibrationError, match="between E = 64 and L = 128"):
        compare(model, tokenizer, profile, probes, lengths=[200], progress=False)
    with pytest.raises(CalibrationError, match="nothing to compare"):
        compare(model, tokenizer, make_profile(effective=128, train=128), probes, progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_static_cache_and_packed_sequences(family):
    """What the run-everywhere work added holds for STRING too: static cache, packed sequences."""
    model = _string(make_model(family))
    oracle = selfextend.apply(make_model(family), method="string", shifted_offset=S, local_window=w,
                              backend="reference")
    ids = _ids(50)
    with torch.no_grad():
        static = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
        assert torch.equal(static, model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
        assert torch.equal(static, oracle.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
        parts = [_ids(n, seed=k) for k, n in enumerate((40, 60))]
        positions = torch.cat([torch.arange(p.shape[1]) for p in parts])[None]
        packed = model(torch.cat(parts, dim=1), position_ids=positions).logits
        torch.testing.assert_close(packed[:, :40], model(parts[0]).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 40:], model(parts[1]).logits, atol=1e-5, rtol=1e-5)
