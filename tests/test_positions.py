import torch

from selfextend import extended_limit
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
