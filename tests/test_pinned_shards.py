"""Behaviour pins for reading split shards as one array that the rest of the suite left loose (see tools/mutate.py).

Each test fails on one plausible bug, named in its docstring as the mutant of ``tools/mutate.py`` it kills,
against ``np.concatenate`` of the parts (the independent reference).
"""

from __future__ import annotations

import numpy as np
import pytest

from magnets.data.shards import ConcatenatedRows


def parts_of(lengths: list[int]) -> list[np.ndarray]:
    """Parts ``[L_p, 3]`` of distinct rows: row r of the whole is ``[r, 100 + r, 200 + r]``."""
    offsets = np.cumsum([0, *lengths])
    ranges = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return [np.stack([r, 100 + r, 200 + r], axis=1) for r in ranges]


@pytest.mark.parametrize("lengths", [[3, 4, 2], [1, 1, 5], [5]])
def test_every_int_row_including_each_shards_first_comes_from_its_shard(lengths: list[int]) -> None:
    """Kills ``shards_row_lookup_side_left`` (``searchsorted(side="left")``): rows inside a shard are found either
    way; the first row of each shard (an offset, row 0 included) is where the two differ."""
    parts = parts_of(lengths)
    rows, whole = ConcatenatedRows(parts), np.concatenate(parts)
    n = len(whole)
    for index in range(-n, n):
        np.testing.assert_array_equal(rows[index], whole[index], err_msg=f"row {index}")
        assert rows[index, 1] == whole[index, 1]
    for index in (n, -n - 1):
        with pytest.raises(IndexError):
            rows[index]
