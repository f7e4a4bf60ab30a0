"""ranks.spread: the grid a search tries, at most `count` values evenly spread, ends kept."""

from __future__ import annotations

from onnxcompress.maths.ranks import spread


def test_spread_keeps_short_lists_whole():
    assert spread([16, 32, 48], 6) == [16, 32, 48]
    assert spread([], 3) == []


def test_spread_picks_evenly_with_both_ends():
    values = list(range(0, 160, 16))  # 10 values
    picked = spread(values, 4)
    assert picked == [0, 48, 96, 144]
    assert len(spread(values, 6)) == 6
    assert spread(values, 6)[0] == 0 and spread(values, 6)[-1] == 144


def test_spread_of_one_is_the_first_value():
    assert spread([8, 16, 24], 1) == [8]
