"""Effective-length profiles, the one planning path (plan_for), and calibration on the testbed."""

import json

import pytest
import torch
import transformers

import selfextend
from selfextend import cli
from selfextend.planning import ProfileError, find_profile, load_profile, model_identity, plan_for, save_profile
from selfextend.evaluation.calibration import CalibrationError, Probes, calibrate
from selfextend.planning.profiles import Profile
from selfextend.testbed import TRAIN_LENGTH as TESTBED_LENGTH, WEIGHTS
from conftest import TRAIN_LENGTH, make_model


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Each test gets its own empty cache folder."""
    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def testbed():
    tokenizer = transformers.AutoTokenizer.from_pretrained(WEIGHTS)
    return transformers.AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype="float32").eval(), tokenizer


def _profile(model, effective: int, **changes) -> Profile:
    fields = dict(identity=model_identity(model), model="tiny", train_length=TRAIN_LENGTH, effective_length=effective,
                  threshold=0.9, accuracy={32: {"correct": 6, "total": 6, "passed": True}}, probes={},
                  created="2026-01-01T00:00:00+00:00", seconds=1.0)
    return Profile(**{**fields, **changes})


def test_identity_is_the_weights_not_the_dtype():
    a, b, other = make_model("llama", seed=0), make_model("llama", seed=0), make_model("llama", seed=1)
    assert model_identity(a) == model_identity(b) != model_identity(other)
    assert model_identity(b.to(torch.bfloat16)) == model_identity(a)
    with torch.no_grad():
        a.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # a fine-tune is another model
    assert model_identity(a) != model_identity(b)


def test_profile_round_trip_and_lookup(home):
    model = make_model("llama")
    path = save_profile(_profile(model, 32))
    assert path.parent == home / "profiles" and load_profile(path).effective_length == 32
    assert find_profile(model).effective_length == 32
    assert find_profile(make_model("llama", seed=1)) is None  # another model's weights: no profile


def test_planning_uses_the_profile_unless_told_otherwise():
    model = make_model("llama")
    assert plan_for(model, 256).effective_length is None
    save_profile(_profile(model, 32))
    chosen = plan_for(model, 256)
    assert chosen.effective_length == 32 and "measured" in chosen.reason
    assert chosen.largest_position <= 2 * 32 // 3
    assert plan_for(model, 256, effective_length=48).effective_length == 48
    assert plan_for(model, 20).group_size == 1  # inside E: the model's own attention
    assert plan_for(model, 40).group_size > 1  # past E but inside L: SelfExtend engages
    selfextend.apply(model, input_length=256)
    assert selfextend.settings(model).effective_length == 32
    assert selfextend.settings(model).group_size == chosen.group_size


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something else"}),
                                     json.dumps({"format": "selfextend-profile/1", "identity": "x"})])
def test_corrupt_profile_is_ignored_with_a_warning(home, content):
    model = make_model("llama")
    path = home / "profiles" / f"{model_identity(model)}.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="ignoring effective-length profile"):
        assert find_profile(model) is None
    with pytest.warns(UserWarning):
        assert plan_for(model, 256).effective_length is None
    with pytest.raises(ProfileError):
        load_profile(path)


def test_foreign_profile_is_never_used(home):
    model, other = make_model("llama"), make_model("llama", seed=1)
    path = save_profile(_profile(other, 32))
    path.rename(path.with_name(f"{model_identity(model)}.json"))  # a file named for `model`, measured on `other`
    with pytest.warns(UserWarning, match="measured on another model"):
        assert find_profile(model) is None


def test_calibrate_finds_the_testbed_effective_length(testbed):
    model, tokenizer = testbed
    profile = calibrate(model, tokenizer, "testbed", Probes(tasks=("passkey",)), progress=False)
    assert profile.effective_length == TESTBED_LENGTH  # vanilla reads the testbed's key at 1x (test_testbed.py)
    assert profile.identity == model_identity(model) and all(a["passed"] for a in profile.accuracy.values())
    assert max(profile.accuracy) == TESTBED_LENGTH and not profile.stopped_by_budget


def test_calibrate_refuses_a_model_that_fails_even_short_inputs(testbed):
    """The testbed never learnt the NIAH template: no profile that would mislead."""
    model, tokenizer = testbed
    with pytest.raises(CalibrationError, match="fails its retrieval probes even at the shortest"):
        calibrate(model, tokenizer, "testbed", Probes(tasks=("niah",)), progress=False)


def test_calibrate_measures_the_model_own_attention(testbed):
    model, tokenizer = testbed
    selfextend.apply(model, 4, 32)
    try:
        with pytest.raises(CalibrationError, match="remove"):
            calibrate(model, tokenizer, "testbed", progress=False)
    finally:
        selfextend.remove(model)


@pytest.mark.parametrize("probes, match", [(dict(tasks=("nope",)), "unknown probe task"),
                                           (dict(depths=(1.5,)), "depths"), (dict(threshold=0.0), "threshold")])
def test_bad_probe_settings(probes, match):
    with pytest.raises(CalibrationError, match=match):
        Probes(**probes)


def test_calibrate_command_writes_what_info_and_plan_use(home, capsys):
    code = cli.main(["calibrate", "--model", "testbed", "--tasks", "passkey", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"effective length E = {TESTBED_LENGTH}" in out and "profile written" in err
    assert len(list((home / "profiles").glob("*.json"))) == 1
    assert cli.main(["info", "--model", "testbed"]) == 0
    assert "effective_length" in capsys.readouterr().out
    assert cli.main(["plan", "--model", "testbed", "--length", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["effective_length"] == TESTBED_LENGTH


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "testbed", "--length", "1000", "--effective-length", "4000"], "larger than the training"),
    (["plan", "--model", "testbed", "--length", "1000", "--effective-length", "4"], "shorter than 16"),
    (["calibrate", "--model", "testbed", "--tasks", "niah", "--quiet"], "no profile written"),
    (["calibrate", "--model", "testbed", "--depths", "2", "--quiet"], "depths"),
    (["calibrate", "--model", "testbed", "--budget", "0", "--quiet"], "--budget"),
    (["generate", "--sample-tokens", "300", "--model", "testbed", "--group-size", "4", "--window", "32",
      "--effective-length", "100", "--quiet"], "not both"),
])
def test_planning_errors_are_clear(argv, message, capsys, home):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (home / "profiles").exists() or not list((home / "profiles").glob("*.json"))


def test_generate_says_whether_the_sample_answer_holds_the_key(capsys):
    assert cli.main(["generate", "--sample-tokens", "100", "--model", "testbed", "--max-new-tokens", "8",
                     "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "[sample] the answer contains the key" in err  # the testbed reads its key within its 128 tokens
