import pytest
import torch

from selfextend import InputTooLongError, extended_limit, plan
from selfextend.positions import grouped_key_position, grouped_query_position, largest_position_used


def test_grouped_positions_follow_the_formula():
    # G = 4, W = 8: query 100 -> 100 // 4 + 8 - 2 = 31; key 37 -> 9
    assert grouped_query_position(100, 4, 8) == 31
    assert grouped_key_position(37, 4) == 9
    i = torch.tensor([100, 101, 103, 104])
    assert grouped_query_position(i, 4, 8).tolist() == [31, 31, 31, 32]


def test_grouped_attention_continues_the_neighbor_window():
    # At distance exactly W the grouped relative position is about W, not a jump
    G, W = 4, 16
    for i in range(W, 400):
        j = i - W
        rel = grouped_query_position(i, G, W) - grouped_key_position(j, G)
        assert W - W // G <= rel <= W + 1


def test_group_size_one_is_the_identity():
    i = torch.arange(0, 500)
    assert torch.equal(grouped_query_position(i, 1, 32), i)
    assert torch.equal(grouped_key_position(i, 1), i)


def test_extended_limit_and_largest_position():
    assert extended_limit(4096, 8, 1024) == (4096 - 1024) * 8 + 1024
    # the longest usable input uses exactly the training length
    assert largest_position_used(extended_limit(4096, 8, 1024), 8, 1024) == 4096
    assert largest_position_used(100, 8, 1024) == 100


@pytest.mark.parametrize("train, effective, target", [
    (4096, None, 16384), (32768, None, 65536), (4096, None, 40000), (2048, None, 5000), (128, None, 1024),
    (32768, 16384, 40960), (32768, 16384, 65536), (32768, 20000, 24000), (128, 100, 2048)])
def test_plan_keeps_positions_within_two_thirds_of_the_planning_length(train, effective, target):
    chosen = plan(train, target, effective)
    length = effective or train
    assert chosen.planning_length == length and chosen.window_size == length // 4
    used = largest_position_used(target, chosen.group_size, chosen.window_size)
    assert chosen.largest_position == used <= 2 * length // 3
    assert chosen.max_length >= target
    # the smallest such group: one less would overflow the budget
    assert largest_position_used(target, chosen.group_size - 1, chosen.window_size) > 2 * length // 3


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
