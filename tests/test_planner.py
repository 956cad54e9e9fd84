"""The planner: the formula (positions within 2/3 of the planning length), the method by measurement, and
the one path from a request to a plan, which gives every front end the same rules in its own words."""

import pytest

import selfextend
from selfextend import InputTooLongError, plan
from selfextend.config import API, FLAGS, SPEC, SelfExtendConfig
from selfextend.planning import resolve
from selfextend.positions import POSITION_MAPS, largest_position_used
from conftest import TRAIN_LENGTH, make_model, make_profile


@pytest.mark.parametrize("train, effective, target", [
    (4096, None, 16384), (32768, None, 65536), (4096, None, 40000), (2048, None, 5000), (128, None, 1024),
    (32768, 16384, 40960), (32768, 16384, 65536), (32768, 20000, 24000), (128, 100, 800)])
def test_plan_keeps_positions_within_two_thirds_of_the_planning_length(train, effective, target):
    chosen = plan(train, target, effective)
    length = effective or train
    assert chosen.planning_length == length and chosen.window_size == length // 4
    used = largest_position_used(target, chosen.group_size, chosen.window_size)
    assert chosen.largest_position == used <= 2 * length // 3
    assert chosen.max_length >= target
    # the smallest such group: one less would overflow the budget
    assert largest_position_used(target, chosen.group_size - 1, chosen.window_size) > 2 * length // 3


@pytest.mark.parametrize("train, effective, target, coarse", [
    (8192, 2048, 32768, 38), (32768, 14336, 131072, 22), (8192, 2048, 200000, 234)])
def test_where_e_needs_groups_coarser_than_the_fine_group_the_plan_is_made_against_l(train, effective, target,
                                                                                      coarse):
    """Planning against E would take G = `coarse` > FINE_GROUP: the plan is L's (finer groups), E kept on record."""
    from selfextend.planning.plan import FINE_GROUP, _smallest_group

    assert _smallest_group(target, effective // 4, 2 * effective // 3) == coarse > FINE_GROUP
    chosen, by_training = plan(train, target, effective), plan(train, target)
    assert (chosen.group_size, chosen.window_size) == (by_training.group_size, by_training.window_size)
    assert chosen.group_size < coarse and chosen.planning_length == train
    assert chosen.effective_length == effective and chosen.settings.effective_length == effective
    assert f"it would take G = {coarse}" in chosen.reason and "word order" in chosen.reason
    assert chosen.as_dict()["planning_length"] == train


def test_window_is_not_forced_to_a_multiple_of_the_group():
    chosen = plan(32768, 65536, 16384)
    assert (chosen.group_size, chosen.window_size) == (10, 4096)


def test_plan_short_input_needs_no_grouping():
    assert plan(4096, 3000).group_size == 1
    assert plan(32768, 16000, 16384).group_size == 1


def test_plan_engages_between_the_effective_and_the_training_length():
    chosen = plan(32768, 24000, 16384)
    assert chosen.group_size > 1 and chosen.largest_position <= 2 * 16384 // 3
    assert "effective length E = 16384" in chosen.reason


def test_plan_shrinks_the_window_before_refusing():
    """L = 128 at N = 2048 used to be refused ("needs a group size above 64"); it fits with G <= 64."""
    chosen = plan(128, 4096)
    assert chosen.group_size <= 64 and chosen.window_size < 128 // 4
    assert chosen.largest_position <= 2 * 128 // 3 and "shrunk" in chosen.reason
    coarsest = plan(128, 7000)  # past the 2/3 budget even then, but positions stay inside L
    assert (coarsest.group_size, coarsest.window_size) == (64, 8) and coarsest.max_length >= 7000
    assert "weaker retrieval" in coarsest.reason


def test_plan_refuses_hopeless_lengths():
    with pytest.raises(InputTooLongError, match="at most about"):
        plan(64, 100_000)


@pytest.mark.parametrize("effective, error, match", [
    (40000, ValueError, "larger than the training length"), (8, ValueError, "shorter than 16"),
    (1000.5, TypeError, "integer")])
def test_bad_effective_length(effective, error, match):
    with pytest.raises(error, match=match):
        plan(32768, 50000, effective)


def test_planner_chooses_the_method_by_the_measured_comparison():
    from selfextend.planning import choose

    better = {"string": {48: {"correct": 5, "total": 6}}, "selfextend": {48: {"correct": 3, "total": 6}}}
    chosen = choose(TRAIN_LENGTH, 40, make_profile(methods=better), 24, "measured")
    assert (chosen.method, chosen.group_size, chosen.window_size, chosen.local_window) == ("string", 1, 21, 10)
    assert "STRING 5/6, SelfExtend 3/6" in chosen.reason and chosen.max_length == TRAIN_LENGTH
    tie = {"string": {48: {"correct": 4, "total": 6}}, "selfextend": {48: {"correct": 4, "total": 6}}}
    assert choose(TRAIN_LENGTH, 40, make_profile(methods=tie), 24).method == "selfextend"
    past = choose(TRAIN_LENGTH, 100, make_profile(methods=better), 24)
    assert past.method == "selfextend" and "STRING does not extend" in past.reason
    assert choose(TRAIN_LENGTH, 20, make_profile(methods=better), 24).group_size == 1  # within E: the model's own
    unmeasured = choose(TRAIN_LENGTH, 40, make_profile(), 24)
    assert unmeasured.method == "selfextend" and "no STRING comparison" in unmeasured.reason


def test_choose_for_reads_the_comparison_from_the_models_profile(tmp_path, monkeypatch):
    from selfextend.planning import choose_for, load_profile, model_identity, plan_for, save_profile

    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path))
    model = make_model("llama")
    better = {"string": {48: {"correct": 6, "total": 6}}, "selfextend": {48: {"correct": 2, "total": 6}}}
    path = save_profile(make_profile(model_identity(model), methods=better))
    assert load_profile(path).methods == better  # kept through JSON
    chosen = choose_for(model, 40)
    assert chosen.method == "string" and chosen.effective_length == 24
    assert plan_for(model, 40).method == "selfextend"  # G and W for SelfExtend are still planned as before
    selfextend.apply(model, method="string", shifted_offset=chosen.window_size, local_window=chosen.local_window)
    assert selfextend.settings(model).offset == 10 - 21


RULES = [  # a request, and the one message every front end gets for it, in its own words
    (dict(method="selfextend", group_size=4), "give both {G} and {W}, or neither to have them planned"),
    (dict(method="auto", window_size=8), "give both {G} and {W}, or neither to have them planned"),
    (dict(method="string", group_size=4, window_size=8), "STRING takes {S} and {w}, not {G} and {W}"),
    (dict(method="string", effective_length=32), "{E} plans SelfExtend's G and W; STRING does not use it"),
    (dict(method="selfextend", shifted_offset=20), "{S} and {w} are STRING's settings: add {string}"),
    (dict(method="auto", local_window=3), "{S} and {w} are STRING's settings: add {string}"),
    (dict(method="selfextend", group_size=4, window_size=8, effective_length=32),
     "{E} plans G and W: give it or {G}/{W}, not both"),
    (dict(method="yarn"), "unknown method 'yarn': choose one of auto, selfextend, string"),
]


@pytest.mark.parametrize("names", [API, FLAGS, SPEC], ids=["api", "flags", "spec"])
@pytest.mark.parametrize("request_, message", RULES)
def test_every_front_end_gets_the_same_rule_in_its_own_words(names, request_, message):
    expected = message.format(G=names.group_size, W=names.window_size, S=names.shifted_offset, w=names.local_window,
                              E=names.effective_length, string=names.ask("string"))
    with pytest.raises(ValueError) as error:
        resolve(TRAIN_LENGTH, 40, **request_, names=names)
    assert str(error.value) == expected


def test_string_past_the_training_length_and_given_settings_past_their_limit():
    with pytest.raises(InputTooLongError, match="65 tokens are past the training length L = 64, and STRING does "
                                                "not extend past it: use --method selfextend"):
        resolve(TRAIN_LENGTH, 65, method="string", names=FLAGS)
    given = resolve(TRAIN_LENGTH, 300, method="selfextend", group_size=4, window_size=8)
    assert not given.fits and given.reason == "given"  # the model warns when it gets there
    with pytest.raises(InputTooLongError, match="limit .* = 232 of the given G=4, W=8"):
        resolve(TRAIN_LENGTH, 300, group_size=4, window_size=8, refuse_past_limit=True)
    with pytest.raises(ValueError, match="give group_size and window_size, or input_length to plan them"):
        resolve(TRAIN_LENGTH, None, method="selfextend")


@pytest.mark.parametrize("settings", [
    SelfExtendConfig("selfextend", TRAIN_LENGTH, 4, 8, effective_length=32),
    SelfExtendConfig.string(TRAIN_LENGTH, 20, 4)])
def test_settings_describe_themselves_and_come_back_from_what_they_save(settings):
    preset = POSITION_MAPS[settings.method]
    assert settings.max_length == preset.limit(TRAIN_LENGTH, *settings.own_settings.values())
    assert settings.largest_position(100) == preset.largest_position(100, *settings.own_settings.values())
    assert SelfExtendConfig.from_saved(settings.to_saved(), TRAIN_LENGTH).key() == settings.key()
    assert settings.to_json()["window_size"] == settings.window_size == settings.far_pass.window_size
    assert settings.describe() in ("G=4, W=8", "STRING S=20, w=4")
    with pytest.raises(ValueError, match="does not take: group_size"):
        SelfExtendConfig.from_saved({"method": "string", "shifted_offset": 20, "group_size": 4}, TRAIN_LENGTH)


def test_apply_records_the_effective_length_given_with_group_size_and_window():
    model = selfextend.apply(make_model("llama"), 4, 8, effective_length=32)
    assert (selfextend.settings(model).effective_length, selfextend.settings(model).effective_source) == (32, "given")


@pytest.mark.parametrize("model, target, group, window", [
    ("gemma3-270m", 40000, 7, 3584),  # the README's main job
    ("gemma3-270m", 65536, 11, 3584),
    ("smollm2", 16384, 19, 512),  # docs/results.md, SmolLM2
    ("smollm2", 32768, 10, 2048)])  # against E: G = 38, which lost niah needles there
def test_the_shipped_profiles_plan_what_the_results_report(model, target, group, window):
    """The rule on both real models' measured E: the plans whose results docs/results.md reports."""
    from selfextend.planning.profiles import SHIPPED, load_profile

    profiles = {p.model: p for p in map(load_profile, SHIPPED.glob("*.json"))}
    profile = profiles[model]
    chosen = plan(profile.train_length, target, profile.effective_length)
    assert (chosen.group_size, chosen.window_size) == (group, window)
    assert chosen.largest_position <= 2 * chosen.planning_length // 3
    assert chosen.max_length >= target
